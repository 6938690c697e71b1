#!/usr/bin/env python3
"""Benchmark a workload against ../shared/peers/torch_reference.py in one run.

  python tools/bench.py mnist_cnn --peer          # = python -m experiments bench mnist_cnn --peer
  python tools/bench.py mnist_cnn --seeds 4 --peer

Prints JSON lines: flaxlab's run, the peer's run(s), and the ratio. Speed goals are these ratios,
measured on one machine in one run.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
