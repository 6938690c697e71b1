"""Networks of the course reports, as pure Flax linen modules, picked by name from `MODELS`.

Every module takes NHWC float images and `train` (for dropout and batch norm) and returns logits.
Weights start as PyTorch's defaults do (uniform, fan-in scaled), because the reports' learning
rates (SGD lr 1 for the FNN) were tuned for that start.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlab.errors import UsageError

ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh, "sigmoid": nn.sigmoid, "elu": nn.elu,
               "leaky_relu": lambda x: nn.leaky_relu(x, 0.2)}

# torch.nn.Linear/Conv2d: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_bias_init(fan_in):
    bound = 1 / jnp.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
    """nn.Dense with PyTorch's default initialisation (the bias too)."""
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, kernel_init=torch_kernel_init,
                        bias_init=_torch_bias_init(x.shape[-1]))(x)


class Conv(nn.Module):
    """nn.Conv with PyTorch's default initialisation and explicit symmetric padding."""
    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int = 0

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        return nn.Conv(self.features, (k, k), (self.strides, self.strides), padding=[(self.padding,) * 2] * 2,
                       kernel_init=torch_kernel_init, bias_init=_torch_bias_init(k * k * x.shape[-1]))(x)


class MLP(nn.Module):
    """Fully connected net, e.g. the 1MD120 FNN 784-800-10."""
    hidden: Sequence[int] = (800,)
    num_classes: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = ACTIVATIONS[self.activation](Dense(width)(x))
        return Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
    """The 1MD120 CNN: 3x3 pad-1 conv blocks, 2x2 max pool after all but the last, one linear layer.

    `pool_first` swaps pooling and activation (pool before ReLU), one of the report's ablations.
    """
    features: Sequence[int] = (8, 16, 32)
    num_classes: int = 10
    activation: str = "relu"
    pool_first: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        act = ACTIVATIONS[self.activation]
        pool = lambda y: nn.max_pool(y, (2, 2), (2, 2))
        for i, width in enumerate(self.features):
            x = Conv(width, 3, padding=1)(x)
            last = i == len(self.features) - 1
            if last:
                x = act(x)
            elif self.pool_first:
                x = act(pool(x))
            else:
                x = pool(act(x))
        return Dense(self.num_classes)(x.reshape(x.shape[0], -1))


MODELS = {"mlp": MLP, "small_cnn": SmallCNN}


def make_model(model_config, num_classes):
    """Builds a model from its config section: {'name': ..., **fields}."""
    kwargs = dict(model_config)
    name = kwargs.pop("name")
    if name not in MODELS:
        raise UsageError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    if kwargs.get("activation", "relu") not in ACTIVATIONS:
        raise UsageError(f"unknown activation '{kwargs['activation']}'; known: {', '.join(ACTIVATIONS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_params(params):
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
