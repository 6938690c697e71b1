#!/usr/bin/env python3
"""Which convolution a GPU should run: XLA's, one im2col matrix product, or XLA's with an im2col kernel
gradient (flaxlab.models._conv picks between the last two by patch size), in whole train epochs; and whether
the im2col kernel gradient should be summed from partial products over chunks of pixels
(models.GPU_KERNEL_GRAD_ROWS; variants 11-16, not run on a GPU yet).

Each variant is one bench epoch set in this process with `models._conv` replaced by the path named;
one JSON line per variant. The numbers in `models._conv`'s docstring came from a scratch script with the
same paths and the MNIST and U-Net variants (H200, 2026-12-01); the GTSRB rows have not run on a GPU yet.

  python3 tools/gpu_conv_ab.py --data-dir .gpu/shared/data              # device run: carry [".gpu"], ~150 s
  python tools/gpu_conv_ab.py --variants 0 --epochs 1                  # a CPU smoke run on the shipped sample
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cli import _apply_overrides, _experiment  # noqa: E402
from flaxlab import bench, models  # noqa: E402

PATHS = {"xla": models._xla_conv, "matmul": models._matmul_conv, "patch_grad": models._patch_grad_conv,
         "auto": models._conv}
VARIANTS = [  # (experiment, seeds, conv path, models.GPU_KERNEL_GRAD_ROWS, extra overrides)
    ("mnist_cnn", 1, "xla", None, ()), ("mnist_cnn", 1, "matmul", None, ()),
    ("mnist_cnn", 8, "xla", None, ()), ("mnist_cnn", 8, "matmul", None, ()), ("mnist_cnn", 8, "patch_grad", None, ()),
    ("jsrt_unet", 2, "xla", None, ("--model_axis", "sequential")), ("jsrt_unet", 2, "patch_grad", None, ()),
    ("jsrt_unet", 2, "matmul", None, ()),
    ("gtsrb_cnn", 3, "xla", None, ()), ("gtsrb_cnn", 3, "auto", None, ()), ("gtsrb_cnn", 3, "patch_grad", None, ()),
    # the kernel gradient from partial products over chunks of pixels (11-16), against 3, 1, 6 and 9
    ("mnist_cnn", 8, "auto", 256, ()), ("mnist_cnn", 8, "auto", 1024, ()), ("mnist_cnn", 8, "auto", 4096, ()),
    ("mnist_cnn", 1, "auto", 1024, ()), ("jsrt_unet", 2, "auto", 16384, ()), ("gtsrb_cnn", 3, "auto", 1024, ()),
]


def run(index, data_dir, epochs):
    name, seeds, path, rows, extra = VARIANTS[index]
    row = dict(variant=index, experiment=name, seeds=seeds, conv=path, kernel_grad_rows=rows, extra=" ".join(extra))
    original = models._conv, models.GPU_KERNEL_GRAD_ROWS
    models._conv, models.GPU_KERNEL_GRAD_ROWS = PATHS[path], rows  # looked up by name when a Conv is traced
    try:
        config = _apply_overrides(_experiment(name), ["--seeds", str(seeds), *extra])
        found = bench.bench_flaxlab(bench.peer_workload(config)[1], data_dir, epochs=epochs)
        row.update({k: found[k] for k in ("backend", "epoch_mode", "train_s", "compile_s", "steps_per_s",
                                          "images_per_s", "test_accuracy")})
    except Exception as e:  # noqa: BLE001 - one variant's failure is a result, the others still run
        row.update(error=f"{type(e).__name__}: {e}"[:500], traceback=traceback.format_exc()[-800:])
    finally:
        models._conv, models.GPU_KERNEL_GRAD_ROWS = original
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="the data sets' folder (default: the shipped samples)")
    parser.add_argument("--variants", help="comma-separated indices into VARIANTS (default: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    chosen = [int(i) for i in args.variants.split(",")] if args.variants else range(len(VARIANTS))
    for index in chosen:
        t0 = time.perf_counter()
        row = dict(run(index, args.data_dir, args.epochs), wall_s=round(time.perf_counter() - t0, 1))
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
