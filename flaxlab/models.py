"""Networks of the course reports, as pure Flax linen modules, picked by name from `MODELS`.

Every module takes NHWC float images and `train` (for dropout and batch norm) and returns logits.
Weights start as PyTorch's defaults do (uniform, fan-in scaled), because the reports' learning
rates (SGD lr 1 for the FNN) were tuned for that start.
"""
import functools
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
    """A linear layer with PyTorch's default initialisation (the bias too)."""
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", torch_kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", _torch_bias_init(x.shape[-1]), (self.features,))
        return x @ kernel + bias


@jax.custom_vjp
def _conv_one_channel(padded, kernel):
    """Stride-1 VALID conv of a 1-channel image as kh*kw broadcast multiply-adds (one fused loop).

    XLA:CPU's convolution is ~9x slower than this for a single input channel (measured: 0.9 ms vs
    0.1 ms for 32 MNIST digits into 8 maps); the gradient still goes through lax's convolution.
    """
    kh, kw = kernel.shape[:2]
    h, w = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
    return sum(padded[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(kh) for j in range(kw))


def _lax_conv(x, kernel, strides=(1, 1), padding="VALID"):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_one_channel_fwd(padded, kernel):
    return _conv_one_channel(padded, kernel), (padded, kernel)


def _conv_one_channel_bwd(residuals, grad):
    return jax.vjp(_lax_conv, *residuals)[1](grad)


_conv_one_channel.defvjp(_conv_one_channel_fwd, _conv_one_channel_bwd)


class Conv(nn.Module):
    """A 2D convolution with PyTorch's default initialisation and explicit symmetric zero padding."""
    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int = 0

    @nn.compact
    def __call__(self, x):
        k, p = self.kernel_size, self.padding
        kernel = self.param("kernel", torch_kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", _torch_bias_init(k * k * x.shape[-1]), (self.features,))
        if x.shape[-1] == 1 and self.strides == 1:
            y = _conv_one_channel(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))), kernel)
        else:
            y = _lax_conv(x, kernel, (self.strides,) * 2, [(p, p), (p, p)])
        return y + bias


def _windows(x, size):
    """The size*size members of each non-overlapping window, each as an (n, h/size, w/size, c) view."""
    n, h, w, c = x.shape
    x = x[:, :h - h % size, :w - w % size].reshape(n, h // size, size, w // size, size, c)
    return [[x[:, :, i, :, j] for j in range(size)] for i in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x, size=2):
    """Non-overlapping max pooling, floor mode: torch's MaxPool2d(size), gradient to the first max.

    Elementwise maxima of the window members instead of lax.reduce_window: on XLA:CPU the 1MD120
    CNN's two pools took ~1.8 ms of a 4.5 ms step that way (select-and-scatter), ~0.4 ms this way.
    """
    return functools.reduce(jnp.maximum, [m for row in _windows(x, size) for m in row])


def _max_pool_fwd(x, size):
    y = max_pool(x, size)
    return y, (x, y)


def _max_pool_bwd(size, residuals, grad):
    x, y = residuals
    taken = jnp.zeros(y.shape, bool)
    rows = []
    for row in _windows(x, size):
        cols = []
        for member in row:
            hit = (member == y) & ~taken  # the first maximum of a window gets the gradient, as in torch
            taken = taken | hit
            cols.append(jnp.where(hit, grad, 0.0))
        rows.append(jnp.stack(cols, axis=3))
    n, h, w, c = x.shape
    dx = jnp.stack(rows, axis=2).reshape(n, h - h % size, w - w % size, c)
    return (jnp.pad(dx, ((0, 0), (0, h % size), (0, w % size), (0, 0))),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


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
        pool = max_pool
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
