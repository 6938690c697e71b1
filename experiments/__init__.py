"""Runnable course experiments: each is a small config over flaxlab's shared building blocks."""
import sys

from flaxlab.errors import device_count_setting_problem

if sys.argv[:1] == ["-m"] and (problem := device_count_setting_problem()):  # `python -m experiments`: jax,
    print(f"error: {problem}", file=sys.stderr)  # imported below, would end in a traceback
    sys.exit(2)

from experiments import cifar10, gtsrb, mnist, segmentation, transfer  # noqa: E402
from flaxlab import config  # noqa: E402

EXPERIMENTS = {**mnist.EXPERIMENTS, **gtsrb.EXPERIMENTS, **cifar10.EXPERIMENTS, **segmentation.EXPERIMENTS,
               **transfer.EXPERIMENTS}
config.EXPERIMENT_DEFAULTS.update(EXPERIMENTS)  # a run of a changed config notes the changes
