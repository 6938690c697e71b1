#!/usr/bin/env python3
"""PyTorch peer of the U-Net workload, written as ../shared/peers/torch_reference.py writes the others
(which has no segmentation workload): eager PyTorch, a DataLoader, one Adam step per mini-batch, on
the real JSRT lungs in ../shared/data. Prints one JSON line per seed in torch_reference.py's fields.

The network is flaxlab's `unet` (experiments `jsrt_unet`): 4 levels of two 3x3 convs with batch norm
and ReLU, 16 maps at the top doubling per level, bilinear upsampling, a 1x1 classifier over 2 classes;
pixel-wise cross-entropy. Trained on JSRT's 174 train images, tested on its 22 val images.

  python tools/torch_unet_peer.py unet --epochs 1 [--width 16] [--batch-size 8] [--seeds 1]
"""
import argparse
import io
import json
import os
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn

DATA = os.environ.get("SHARED_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                  "data"))


def jsrt(split):
    from PIL import Image
    images, masks = {}, {}
    with tarfile.open(f"{DATA}/jsrt-lungs-256-trainval.tar.gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) >= 4 and parts[-3] == split and parts[-1].endswith(".png"):
                array = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("L"))
                (images if parts[-2] == "images" else masks)[parts[-1]] = array
    names = sorted(images)
    return np.stack([images[n] for n in names])[:, None], (np.stack([masks[n] for n in names]) > 0).astype(np.int64)


def double_conv(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                         nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, width=16, depth=4, num_classes=2, upsample="bilinear"):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList(double_conv(i, o) for i, o in zip([1] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2)
        self.bottom = double_conv(widths[-1], widths[-1])
        outs = [w // 2 for w in reversed(widths[1:])] + [widths[0]]
        ins = [widths[-1]] + outs[:-1]
        self.up = nn.ModuleList(double_conv(skip + x, o) for skip, x, o in zip(reversed(widths), ins, outs))
        self.upsample = nn.Upsample(scale_factor=2, mode=upsample, **({"align_corners": False}
                                                                       if upsample == "bilinear" else {}))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([skip, self.upsample(x)], 1))
        return self.head(x)


def dice(pred, target):
    overlap, total = (pred & target).sum((1, 2)), pred.sum((1, 2)) + target.sum((1, 2))
    return np.where(total > 0, 2 * overlap / np.maximum(total, 1), 1.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["unet"])
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = jsrt("train"), jsrt("val")
    load_s = time.perf_counter() - t0
    dev = torch.device(a.device)
    ds = torch.utils.data.TensorDataset(torch.tensor(xtr, dtype=torch.float32) / 255.0, torch.tensor(ytr))
    xte_t = (torch.tensor(xte, dtype=torch.float32) / 255.0).to(dev)
    for seed in range(a.seeds):
        torch.manual_seed(seed)
        model = UNet(a.width).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, drop_last=True)
        steps, done = int(len(dl) * a.epochs), 0
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        while done < steps:
            for xb, yb in dl:
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                opt.step()
                done += 1
                if done >= steps:
                    break
        if dev.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xte_t[i:i + 8]).argmax(1).cpu() for i in range(0, len(xte_t), 8)]).numpy()
        print(json.dumps(dict(peer="pytorch-eager", torch=torch.__version__, workload="unet", device=str(dev),
                              threads=torch.get_num_threads(), seed=seed, batch_size=a.batch_size, steps=steps,
                              load_s=round(load_s, 2), train_s=round(train_s, 3),
                              steps_per_s=round(steps / train_s, 2), images_per_s=round(steps * a.batch_size / train_s, 1),
                              test_accuracy=round(float((pred == yte).mean()), 4),
                              test_dice=round(float(dice(pred > 0, yte > 0).mean()), 4), test_size=len(yte),
                              weights=sum(p.numel() for p in model.parameters()))), flush=True)


if __name__ == "__main__":
    main()
