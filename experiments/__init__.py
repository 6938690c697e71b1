"""Runnable course experiments: each is a small config over flaxlab's shared building blocks."""
from experiments import cifar10, gtsrb, mnist, segmentation, transfer
from flaxlab import config

EXPERIMENTS = {**mnist.EXPERIMENTS, **gtsrb.EXPERIMENTS, **cifar10.EXPERIMENTS, **segmentation.EXPERIMENTS,
               **transfer.EXPERIMENTS}
config.EXPERIMENT_DEFAULTS.update(EXPERIMENTS)  # a run of a changed config notes the changes
