"""Runnable course experiments: each is a small config over flaxlab's shared building blocks."""
from experiments import mnist

EXPERIMENTS = {**mnist.EXPERIMENTS}
