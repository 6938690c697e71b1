#!/usr/bin/env python3
"""Throughput of fine-tuning ResNet-18 (or VGG-19) at 224x224: flaxlab's jitted step against the same
network in eager PyTorch (tests/torch_models.py, torchvision's structure), on the same machine, one run.

Both take CIFAR-sized 32x32 batches and resize them to 224 and normalise inside the step, train with
Adam, and time `--steps` steps after a warm-up one. Prints a JSON line per side and one with the ratio.

  python tools/bench_transfer.py resnet18 --batch-size 32 --steps 5
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flaxlab import train  # noqa: E402
from flaxlab.models import make_model  # noqa: E402


def flaxlab_images_per_s(arch, images, labels, steps, lr):
    model = make_model({"name": arch, "input_size": 224}, 10)
    trainer = train.Trainer(model, {"name": "adam", "lr": lr})
    state = jax.tree.map(lambda a: a[0], trainer.init(jax.random.split(jax.random.key(0), 1), images.shape[1:]))
    batch = {"image": train.preprocess(images), "label": jnp.asarray(labels)}
    t = time.perf_counter()
    step = jax.jit(train.train_step, donate_argnums=0).lower(state, batch, jax.random.key(1))
    step = train.compile_for_backend(step)
    compile_s = time.perf_counter() - t
    state, _ = step(state, batch, jax.random.key(1))
    jax.block_until_ready(state)
    t = time.perf_counter()
    for i in range(steps):
        state, sums = step(state, batch, jax.random.key(i))
    jax.block_until_ready(sums)
    return len(labels) * steps / (time.perf_counter() - t), compile_s


def torch_images_per_s(arch, images, labels, steps, lr):
    import torch
    import torch_models
    from flaxlab.pretrained import IMAGENET_MEAN, IMAGENET_STD
    model = {"resnet18": torch_models.ResNet18, "vgg19": torch_models.VGG19}[arch](10)
    opt, loss_fn = torch.optim.Adam(model.parameters(), lr=lr), torch.nn.CrossEntropyLoss()
    x = torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float32) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))

    def step():
        xb = (torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False) - mean) / std
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), y).backward()
        opt.step()
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return len(labels) * steps / (time.perf_counter() - t), torch.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=["resnet18", "vgg19"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-4)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.batch_size, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, a.batch_size)
    ours, compile_s = flaxlab_images_per_s(a.arch, images, labels, a.steps, a.lr)
    print(json.dumps(dict(peer="flaxlab", arch=a.arch, device=str(jax.devices()[0]), batch_size=a.batch_size,
                          input="32x32 resized to 224x224 in the step", images_per_s=round(ours, 2),
                          compile_s=round(compile_s, 2))), flush=True)
    peer, version = torch_images_per_s(a.arch, images, labels, a.steps, a.lr)
    print(json.dumps(dict(peer="pytorch-eager", torch=version, arch=a.arch, batch_size=a.batch_size,
                          images_per_s=round(peer, 2))), flush=True)
    print(json.dumps(dict(compare=a.arch, ratio_images_per_s=round(ours / peer, 2))), flush=True)


if __name__ == "__main__":
    main()
