"""Networks of the course reports, as pure Flax linen modules, picked by name from `MODELS`.

Every module takes NHWC float images and `train` (for dropout and batch norm) and returns logits.
Weights start as PyTorch's defaults do (uniform, fan-in scaled), because the reports' learning
rates (SGD lr 1 for the FNN) were tuned for that start.
"""
import contextlib
import contextvars
import dataclasses
import functools
import inspect
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlab import fft_conv, onednn_conv, pretrained
from flaxlab.inits import WEIGHT_INITS, param_inits, torch_bias_init
from flaxlab.pooling import max_pool, windows
from flaxlab.errors import UsageError, did_you_mean

# as PyTorch's modules compute them by default (GELU exact, not flax's tanh approximation), but LeakyReLU's
# slope: 0.2, as the VGG-19 report's; SiLU is swish
ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh, "sigmoid": nn.sigmoid, "elu": nn.elu,
               "leaky_relu": lambda x: nn.leaky_relu(x, 0.2), "gelu": lambda x: nn.gelu(x, approximate=False),
               "silu": nn.silu}


class Dense(nn.Module):
    """A linear layer with PyTorch's default initialisation (the bias too), or another of `WEIGHT_INITS`."""
    features: int
    weight_init: str = "torch"

    @nn.compact
    def __call__(self, x):
        kernel_init, bias_init = param_inits(self.weight_init, "dense", x.shape[-1])
        kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", bias_init, (self.features,))
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


def _xla_conv(x, kernel, strides=(1, 1), padding="VALID"):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_one_channel_fwd(padded, kernel):
    return _conv_one_channel(padded, kernel), (padded, kernel)


def _conv_one_channel_bwd(residuals, grad):
    return jax.vjp(_conv, *residuals)[1](grad)


_conv_one_channel.defvjp(_conv_one_channel_fwd, _conv_one_channel_bwd)


def _pad_spatial(x, padding):
    """Zero padding of an NHWC batch's rows and columns, for the paths that take VALID convolutions."""
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


# Patches of a conv over RGB input, at most this large, go through im2col on XLA:CPU (`uses_patches`).
PATCHES_MAX_BYTES = 16 << 20


def uses_patches(x, kernel, strides, padding):
    """Where im2col was measured faster in whole train steps (in-process A/B, 2-core EPYC): XLA:CPU, float32,
    stride 1, 3 input channels, patches of at most 16 MiB. The all-conv net's step 3.2% shorter (3x3 over
    32x32x3, batch 32: 3.5 MB of patches; every round faster), the GTSRB CNN's 0.5-2.4% (5x5 over 28x28x3,
    batch 64: 11 MB; within the noise in two of three A/Bs); the FCN (14 MB) and VGG-19 even. TDT4265's CNN
    (20 MB) was even too and is past the cap. Wider inputs lost: their patches cost more to build than XLA's
    convolution spends packing them (9x slower at 32x32x16)."""
    kh, kw, c = *kernel.shape[:2], x.shape[-1]
    patch_bytes = _patch_bytes(x, kernel, (strides, strides), ((padding, padding),) * 2)
    return (jax.default_backend() == "cpu" and strides == 1 and c == 3 and kh * kw > 1
            and x.dtype == kernel.dtype == jnp.float32 and 0 < patch_bytes <= PATCHES_MAX_BYTES)


def _pads(padding):
    return ((0, 0), (0, 0)) if padding == "VALID" else tuple(map(tuple, padding))


def _patch_bytes(x, kernel, strides, padding):
    """The size of one model's im2col patches (`_patches`) for this conv."""
    kh, kw, c, _ = kernel.shape
    (top, bottom), (left, right) = _pads(padding)
    rows = (x.shape[1] + top + bottom - kh) // strides[0] + 1
    cols = (x.shape[2] + left + right - kw) // strides[1] + 1
    return x.shape[0] * rows * cols * kh * kw * c * x.dtype.itemsize


def _patch_kernel_grad(cols, grad, kernel_shape, chunk_rows=None):
    """A conv's kernel gradient from its im2col patches: patches^T @ output gradient. With `chunk_rows`, as a
    sum of partial products over chunks of about that many rows (pixels): a batched product with a batch
    entry per chunk, where one product's long contraction gives a GPU few output tiles to share out (a
    kernel gradient is at most (kh*kw*C, O) however many pixels it sums over)."""
    cols, grad = cols.reshape(-1, cols.shape[-1]), grad.reshape(-1, grad.shape[-1])
    rows = cols.shape[0]
    chunks = next(c for c in range(max(1, rows // (chunk_rows or rows)), 0, -1) if rows % c == 0)
    if chunks == 1:
        return (cols.T @ grad).reshape(kernel_shape)
    parts = jnp.einsum("cmk,cmo->cko", cols.reshape(chunks, -1, cols.shape[1]), grad.reshape(chunks, -1, grad.shape[1]))
    return parts.sum(0).reshape(kernel_shape)


def _patches(x, kh, kw, strides=(1, 1), padding="VALID"):
    """(N, h, w, kh*kw*C): each output pixel's window, tap-major, as an HWIO kernel reshapes to (kh*kw*C, O)."""
    (sh, sw), ((top, bottom), (left, right)) = strides, _pads(padding)
    if top or bottom or left or right:
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    h, w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return jnp.concatenate([x[:, i:i + (h - 1) * sh + 1:sh, j:j + (w - 1) * sw + 1:sw, :]
                            for i in range(kh) for j in range(kw)], axis=-1)


@jax.custom_vjp
def _conv_patches(padded, kernel):
    """Stride-1 VALID conv as one matrix product of im2col patches and the kernel; the kernel gradient is the
    product of the same patches (kept from the forward pass) with the output gradient."""
    return _conv_patches_fwd(padded, kernel)[0]


def _conv_patches_fwd(padded, kernel):
    cols = _patches(padded, *kernel.shape[:2])
    y = cols.reshape(-1, cols.shape[-1]) @ kernel.reshape(-1, kernel.shape[-1])
    return y.reshape(cols.shape[:-1] + kernel.shape[-1:]), (cols, padded, kernel)


def _conv_patches_bwd(residuals, grad):
    cols, padded, kernel = residuals
    grad_input = jax.vjp(lambda p: _xla_conv(p, kernel), padded)[1](grad)[0]  # dropped by XLA for a first layer
    return grad_input, _patch_kernel_grad(cols, grad, kernel.shape)


_conv_patches.defvjp(_conv_patches_fwd, _conv_patches_bwd)


def _matmul_conv(x, kernel, strides=(1, 1), padding="VALID"):
    """A conv as im2col and one matrix product, differentiated by jax: vmapped over models, every part of
    it is a batched matrix product or a slice, where XLA's vmapped convolution is a grouped one."""
    cols = _patches(x, *kernel.shape[:2], strides, padding)
    return cols @ kernel.reshape(-1, kernel.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_conv_chunked_grad(x, kernel, strides=(1, 1), padding="VALID"):
    """`_matmul_conv` with its kernel gradient as partial products over chunks of GPU_KERNEL_GRAD_ROWS pixels."""
    return _matmul_conv(x, kernel, strides, padding)


def _matmul_conv_chunked_grad_fwd(x, kernel, strides, padding):
    cols = _patches(x, *kernel.shape[:2], strides, padding)
    return cols @ kernel.reshape(-1, kernel.shape[-1]), (x, cols, kernel)


def _matmul_conv_chunked_grad_bwd(strides, padding, residuals, grad):
    x, cols, kernel = residuals
    grad_cols = grad @ kernel.reshape(-1, kernel.shape[-1]).T
    grad_x = jax.vjp(lambda v: _patches(v, *kernel.shape[:2], strides, padding), x)[1](grad_cols)[0]
    return grad_x, _patch_kernel_grad(cols, grad, kernel.shape, GPU_KERNEL_GRAD_ROWS)


_matmul_conv_chunked_grad.defvjp(_matmul_conv_chunked_grad_fwd, _matmul_conv_chunked_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _patch_grad_conv(x, kernel, strides=(1, 1), padding="VALID"):
    """XLA's convolution and input gradient; the kernel gradient as im2col patches^T @ output gradient,
    which vmapped over models is a batched matrix product instead of a batch-grouped convolution."""
    return _xla_conv(x, kernel, strides, padding)


def _patch_grad_conv_fwd(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _patch_grad_conv_bwd(strides, padding, residuals, grad):
    x, kernel = residuals
    grad_x = jax.vjp(lambda v: _xla_conv(v, kernel, strides, padding), x)[1](grad)[0]
    cols = _patches(x, *kernel.shape[:2], strides, padding)
    return grad_x, _patch_kernel_grad(cols, grad, kernel.shape, GPU_KERNEL_GRAD_ROWS)


_patch_grad_conv.defvjp(_patch_grad_conv_fwd, _patch_grad_conv_bwd)

# One model's im2col patches at most this large make a GPU conv one matrix product (`_conv`).
GPU_MATMUL_MAX_BYTES = 16 << 20
# Rows per partial product of a GPU conv's kernel gradient (`_patch_kernel_grad`); None: one product. Not
# measured on a GPU yet: tools/gpu_conv_ab.py's "chunked" variants set it.
GPU_KERNEL_GRAD_ROWS = None


def _conv(x, kernel, strides=(1, 1), padding="VALID"):
    """XLA's convolution, except on a GPU, where cuDNN's kernel gradient was the slow part, and worst when
    models are vmapped (batch-grouped convolutions). Measured on an H200 (jax 0.11.2, epochs of whole
    train steps): the 1MD120 CNN, all of whose patches are small, ran 8,261 steps/s with XLA's convs and
    12,960 as matrix products; 8 of them vmapped 1,101 and 4,622 (3,164 with only the kernel gradient
    as a product). Two vmapped JSRT U-Nets (patches up to 1.2 GB) ran 8.6 steps/s with XLA's convs,
    80.6 with the kernel gradient as a product, 55.5 as matrix products throughout."""
    if jax.default_backend() != "gpu":
        return _xla_conv(x, kernel, strides, padding)
    if _patch_bytes(x, kernel, strides, padding) <= GPU_MATMUL_MAX_BYTES:
        if GPU_KERNEL_GRAD_ROWS:
            return _matmul_conv_chunked_grad(x, kernel, strides, padding)
        return _matmul_conv(x, kernel, strides, padding)
    return _patch_grad_conv(x, kernel, strides, padding)


@jax.custom_vjp
def _add_bias(y, bias):
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, grad):
    channels = grad.shape[-1]
    return grad, jnp.ones(grad.size // channels, grad.dtype) @ grad.reshape(-1, channels)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def add_bias(y, bias):
    """y + bias over the last axis. On XLA:CPU the bias gradient is a product with a vector of ones: its
    reduction over the leading axes took 0.52 ms for a conv's 32x32x32x16 gradient, the product 0.07 ms
    (2-core EPYC)."""
    if jax.default_backend() == "cpu" and y.dtype == bias.dtype == jnp.float32 and y.ndim > 2 and y.shape[-1] >= 8:
        return _add_bias(y, bias)
    return y + bias


def _models_side_by_side():
    """Several XLA:CPU devices: models trained side by side, one per device (parallel.split_cpu_devices). There
    the convs the FFT path takes stay with it rather than oneDNN: three GTSRB CNNs on three devices made 7.6
    steps/s of all three so and 7.3 with the 64->32 5x5 conv in oneDNN, though one model alone made 22.0
    steps/s with oneDNN and 17.1 with the FFT (2-core Xeon). After both paths' transposes were made apart
    (onednn_conv.transpose_apart): 10.23 against 8.69, and 8.74 for the three one after another on one device."""
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def conv2d(x, kernel, strides=1, padding=0):
    """A 2D convolution of NHWC `x` with an HWIO kernel, square strides and symmetric zero padding, by the
    fastest path measured for it. On XLA:CPU: 1-channel input as multiply-adds (computed once: XLA would
    compute them again in each consumer), else oneDNN where this jaxlib allows it (x86, `onednn_conv.applies`;
    not for the FFT's convs with models side by side), else the FFT, im2col or XLA's convolution; on a GPU,
    `_conv`'s im2col products."""
    fft = fft_conv.is_faster(x, kernel, strides, padding)
    if x.shape[-1] == 1 and strides == 1:
        return onednn_conv.computed_once(_conv_one_channel(_pad_spatial(x, padding), kernel))
    if onednn_conv.applies(x, kernel, strides, padding) and not (fft and _models_side_by_side()):
        return onednn_conv.conv(x, kernel, padding)
    if fft:
        return fft_conv.conv(x, kernel, padding)
    if uses_patches(x, kernel, strides, padding):
        return _conv_patches(_pad_spatial(x, padding), kernel)
    if strides > 1 and jax.default_backend() == "cpu":
        # XLA:CPU fuses the images' producer into the transpose its kernel gradient reads, and computes it
        # again there in transposed order: 261 ms of ResNet-18's 2.5 s fine-tuning step for one block's
        # output (batch norms, residual sum, ReLU). Computed once: 12.5 -> 13.7 images/s (2-core EPYC).
        x = onednn_conv.computed_once(x)
    return _conv(x, kernel, (strides,) * 2, ((padding, padding),) * 2)


class Conv(nn.Module):
    """A 2D convolution with PyTorch's default initialisation and explicit symmetric zero padding (`conv2d`)."""
    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int = 0
    weight_init: str = "torch"  # or another of `WEIGHT_INITS`

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel_init, bias_init = param_inits(self.weight_init, "conv", k * k * x.shape[-1])
        kernel = self.param("kernel", kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", bias_init, (self.features,))
        return add_bias(conv2d(x, kernel, self.strides, self.padding), bias)


# Parameter-free layers as modules, so that model summaries (flaxlab.summary) list them as rows. Flax numbers
# submodules per class (Conv_0, Dense_0, ...), so adding these leaves the parameter names of a network as they were.

class Activation(nn.Module):
    """An elementwise activation from `ACTIVATIONS`, by name."""
    kind: str = "relu"

    def __call__(self, x):
        return ACTIVATIONS[self.kind](x)


class MaxPool(nn.Module):
    """torch's MaxPool2d(size): non-overlapping, floor mode (see `max_pool`)."""
    size: int = 2

    def __call__(self, x):
        return max_pool(x, self.size)


class AvgPool(nn.Module):
    """torch's AvgPool2d(size): non-overlapping windows, floor mode; size = height gives global pooling."""
    size: int = 2

    def __call__(self, x):
        members = [m for row in windows(x, self.size) for m in row]
        return sum(members) / len(members)


class Dropout(nn.Module):
    """Inverted dropout whose rate may be a traced value, so models trained side by side can each
    have their own rate in one program (flax's Dropout needs a Python float)."""
    rate: float = 0.0

    def __call__(self, x, train=False, rate=None):
        rate = self.rate if rate is None else rate
        if not train or (isinstance(rate, (int, float)) and rate == 0):
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(_mask_key(self.make_rng("dropout"), x), keep, x.shape)
        mask = onednn_conv.computed_once(mask)
        return jnp.where(mask, x / keep, 0.0)


def _mask_key(key, x):
    """On XLA:CPU, the same key bits as a Philox 4x32 key: its rounds lower to straight-line ops,
    threefry's to a rolled loop. With the mask computed once (not again in `x / keep` and in its
    gradient), the 1MD120 CNN with dropout 0.3: 4.27 -> 3.15 ms a step (2-core EPYC, 8 paired rounds; 2.8 ms
    without dropout); Philox alone 7.3 ms, fused into each consumer. jax has it from 0.10.2, the oldest we take.

    Not where `x` is laid out over a mesh (data parallel, shard_map): XLA cannot lower Philox's 32-bit
    multiply-high in a partitioned program ("Unable to convert MHLO to StableHLO", jax 0.10.2)."""
    if jax.default_backend() != "cpu" or not jax.typeof(x).sharding.mesh.empty:
        return key
    return jax.random.wrap_key_data(jax.random.key_data(key), impl="philox4x32")


def batch_norm(train, name=None):
    """torch's BatchNorm defaults (momentum 0.1 = flax 0.9, eps 1e-5); running stats go to `batch_stats`."""
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


# the batch's mask of real examples while a train step traces the model (`real_examples`); a context variable,
# so that a model traced in another thread meanwhile does not take this one's mask
_REAL_EXAMPLES = contextvars.ContextVar("real_examples", default=None)


@contextlib.contextmanager
def real_examples(mask):
    """Batch norm in training takes its statistics over the examples `mask` marks (None: all): a short last
    batch is padded with filler examples to the batch's shape (`drop_last` false), which torch's DataLoader
    does not have, and which the loss already leaves out."""
    token = _REAL_EXAMPLES.set(mask)
    try:
        yield
    finally:
        _REAL_EXAMPLES.reset(token)


def _example_weights(x):
    """1 for a real example of `x`'s batch, 0 for filler; None when every example is real (or unknown)."""
    mask = _REAL_EXAMPLES.get()
    if mask is None or mask.shape != x.shape[:1]:  # a network that folds other axes into the batch: all
        return None
    return mask.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_normalize(x, scale, bias, weights, epsilon):
    """(y, batch mean, biased batch variance) over all axes but the last, fast variance as in flax, over the
    examples `weights` marks (None: all). The gradient is written out: two per-channel sums and one elementwise
    pass, where jax's derivative of the same forward takes more passes over the maps. The statistics'
    cotangents are ignored: they only feed the running averages."""
    return _batch_normalize_fwd(x, scale, bias, weights, epsilon)[0]


def _count(x, weights):
    """How many values per channel the statistics are over: all of `x`'s but the last axis, or the marked
    examples' (at least 1: a batch of filler alone leaves the statistics 0, not NaN)."""
    per_channel = x.size // x.shape[-1]
    return per_channel if weights is None else jnp.maximum(weights.sum(), 1.0) * (per_channel // x.shape[0])


def _sums(x, weights):
    """Per-channel sum of `x` over all axes but the last; with `weights`, of the marked examples only (each
    example's sum first, then weighted: no pass over the maps more). Not a matrix product: that would run in
    TF32 on a GPU, bf16 on a TPU, and E[x^2] - E[x]^2 of sums so rounded was percents off."""
    if weights is None:
        return x.reshape(-1, x.shape[-1]).sum(0)
    return (weights[:, None] * x.reshape(x.shape[0], -1, x.shape[-1]).sum(1)).sum(0)


def _batch_stats(x, weights=None):
    """Per-channel mean and biased variance as flax computes them: E[x^2] - E[x]^2, clipped at 0."""
    if weights is None:
        x2 = x.reshape(-1, x.shape[-1])
        mean = x2.mean(0)
        return mean, jnp.maximum((x2 * x2).mean(0) - mean * mean, 0.0)
    n = _count(x, weights)
    mean = _sums(x, weights) / n
    return mean, jnp.maximum(_sums(x * x, weights) / n - mean * mean, 0.0)


def _batch_normalize_fwd(x, scale, bias, weights, epsilon):
    mean, var = _batch_stats(x, weights)
    inv = jax.lax.rsqrt(var + epsilon)
    return ((x - mean) * (inv * scale) + bias, mean, var), (x, mean, inv, scale, weights)


def _batch_normalize_bwd(epsilon, residuals, cotangents):
    x, mean, inv, scale, weights = residuals
    n = _count(x, weights)
    grad = cotangents[0]
    grad_bias = _sums(grad, weights)
    grad_scale = _sums(grad * (x - mean), weights) * inv
    grad_x = (scale * inv / n) * (n * grad - grad_bias - (x - mean) * (inv * grad_scale))
    if weights is not None:  # filler examples feed nothing back
        grad_x = grad_x * weights.reshape((-1,) + (1,) * (x.ndim - 1))
        return grad_x, grad_scale, grad_bias, jnp.zeros_like(weights)
    return grad_x, grad_scale, grad_bias, None


_batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)


class BatchNorm(nn.Module):
    """flax.linen.BatchNorm's defaults, variables and results (fp32 statistics, E[x^2] - E[x]^2), but for the
    running variance, which is torch's: updated with the unbiased batch variance (flax's takes the biased one,
    which made an MLP's eval-mode outputs at batch 64 differ from torch's by ~0.8%).

    On XLA:CPU, in training on fp32, its gradient is written out (`_batch_normalize`): the JSRT U-Net's step (18 of
    them, over 8x256x256x16 maps and below) took 953 against 1,029 ms with flax's, faster in each of 8
    alternating rounds (2-core Xeon). Its sums as products with ones were no faster in the step (1,007 against
    1,009 ms) and 150x less accurate than XLA's reductions."""
    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
        normalize = lambda mean, var: (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias  # noqa: E731
        if self.use_running_average:
            y = normalize(running_mean.value, running_var.value)
        else:
            weights = _example_weights(x)
            if x.dtype == scale.dtype == bias.dtype == jnp.float32 and jax.default_backend() == "cpu":
                y, mean, var = _batch_normalize(x, scale, bias, weights, self.epsilon)
            else:  # bf16 compute, or off XLA:CPU: statistics in fp32, as flax computes them, and jax's gradient
                mean, var = _batch_stats(x.astype(jnp.float32), weights)
                y = normalize(mean, var)
            if not self.is_initializing():
                count = _count(x, weights)  # values per channel (per model, under vmap)
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = (self.momentum * running_var.value
                                     + (1 - self.momentum) * var * (count / jnp.maximum(count - 1, 1)))
        return y.astype(jnp.result_type(x, scale, bias))


class Flatten(nn.Module):
    """Flattens all but the batch dimension, in HWC order."""

    def __call__(self, x):
        return x.reshape(x.shape[0], -1)


class MLP(nn.Module):
    """Fully connected net, e.g. the 1MD120 FNN 784-800-10."""
    hidden: Sequence[int] = (800,)
    num_classes: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train=False):
        x = Flatten()(x)
        for width in self.hidden:
            x = Activation(self.activation)(Dense(width)(x))
        return Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
    """The 1MD120 CNN: 3x3 pad-1 conv blocks, 2x2 max pool after all but the last, one linear layer.

    The report's ablations are fields: `pool_first` (pool before the activation), `batch_norm` after
    each conv, `dropout` after each pooling. `dropout` given at call time (a traced per-model rate in
    a sweep) replaces the field.
    """
    features: Sequence[int] = (8, 16, 32)
    num_classes: int = 10
    activation: str = "relu"
    pool_first: bool = False
    batch_norm: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train=False, dropout=None):
        act = lambda x: Activation(self.activation)(x)
        with_dropout = self.dropout > 0 or dropout is not None  # no rows for unused layers in summaries

        def pool(x):
            x = MaxPool(2)(x)
            return Dropout(self.dropout)(x, train, dropout) if with_dropout else x
        for i, width in enumerate(self.features):
            x = Conv(width, 3, padding=1)(x)
            if self.batch_norm:
                x = batch_norm(train)(x)
            last = i == len(self.features) - 1
            if last:
                x = act(x)
            elif self.pool_first:
                x = act(pool(x))
            else:
                x = pool(act(x))
        return Dense(self.num_classes)(Flatten()(x))


class LayerStack(nn.Module):
    """A network written as a list of layer specs, PyTorch `nn.Sequential` style, ending in Dense(num_classes).

    One module for the reports' plain stacks, so each report's net is a readable spec (below) rather than a class.
    Specs: ("conv", features, kernel_size[, strides[, padding]]), ("dense", features), ("act",) for the
    `activation`, ("max_pool", size), ("avg_pool", size), ("flatten",), ("batch_norm",), ("dropout", rate).
    Batch norm uses torch's defaults (momentum 0.1 = flax 0.9, eps 1e-5); its running stats are `batch_stats`.
    A `dropout` rate given at call time (per model, in a sweep) replaces every dropout layer's rate.
    Conv and dense weights start as `weight_init` says (`WEIGHT_INITS`).
    """
    layers: Sequence[Sequence] = ()
    num_classes: int = 10
    activation: str = "relu"
    weight_init: str = "torch"

    @nn.compact
    def __call__(self, x, train=False, dropout=None):
        for kind, *args in self.layers:
            if kind == "conv":
                x = Conv(*args, weight_init=self.weight_init)(x)
            elif kind == "dense":
                x = Dense(*args, weight_init=self.weight_init)(x)
            elif kind == "act":
                x = Activation(self.activation)(x)
            elif kind == "max_pool":
                x = MaxPool(*args)(x)
            elif kind == "avg_pool":
                x = AvgPool(*args)(x)
            elif kind == "flatten":
                x = Flatten()(x)
            elif kind == "batch_norm":
                x = batch_norm(train)(x)
            elif kind == "dropout":
                x = Dropout(*args)(x, train, dropout)
            else:
                raise UsageError(f"unknown layer '{kind}' in a layer stack")
        if x.ndim > 2:
            x = Flatten()(x)
        return Dense(self.num_classes, weight_init=self.weight_init)(x)


class ConvTranspose(nn.Module):
    """torch's ConvTranspose2d(k, stride=k): each input pixel becomes a k x k patch, no overlap, so it is
    one matrix product and a reshape. torch initialises it with fan-in = out_channels * k * k."""
    features: int
    kernel_size: int = 2

    @nn.compact
    def __call__(self, x):
        k, (n, h, w, c) = self.kernel_size, x.shape
        fan_in = self.features * k * k
        kernel = self.param("kernel", torch_bias_init(fan_in), (k, k, c, self.features))
        bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
        y = jnp.einsum("nhwc,abco->nhawbo", x, kernel).reshape(n, h * k, w * k, self.features)
        return add_bias(y, bias)


class Upsample(nn.Module):
    """torch's Upsample(scale_factor=2) with mode bilinear (align_corners=False) or nearest."""
    method: str = "bilinear"

    def __call__(self, x):
        n, h, w, c = x.shape
        return jax.image.resize(x, (n, 2 * h, 2 * w, c), self.method)


class FCN(nn.Module):
    """The 1MD120 segmentation FCN: 3x3 pad-1 convs of 8, 16, 32 maps with a 2x2 max pool after all but the
    last (as the course's CNN), two 2x2 stride-2 transposed convs back to full size, a 1x1 classifier.

    FCN2 (`refine`) adds a 3x3 conv after each transposed conv and batch norm after every conv; the
    output is per-pixel logits over `num_classes` (softmax over channels).
    """
    features: Sequence[int] = (8, 16, 32)
    num_classes: int = 2
    activation: str = "relu"
    batch_norm: bool = False
    refine: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        def block(x, layer):
            x = layer(x)
            if self.batch_norm:
                x = batch_norm(train)(x)
            return Activation(self.activation)(x)
        for i, width in enumerate(self.features):
            x = block(x, Conv(width, 3, padding=1))
            if i < len(self.features) - 1:
                x = MaxPool(2)(x)
        for width in reversed(self.features[:-1]):
            x = block(x, ConvTranspose(width, 2))
            if self.refine:
                x = block(x, Conv(width, 3, padding=1))
        return Conv(self.num_classes, 1)(x)


class UNet(nn.Module):
    """U-Net (Ronneberger et al.; the ADL report's): `depth` 2x2 max pools, each level two 3x3 pad-1 convs
    with batch norm, `width` maps at the top doubling per level; the decoder upsamples (bilinear or
    nearest, as in the report's ablation, then the bottom level's width is halved as in the common
    PyTorch U-Net) and concatenates the encoder's maps of the same size. 1x1 classifier.
    """
    width: int = 64
    depth: int = 4
    num_classes: int = 2
    activation: str = "relu"
    upsample: str = "bilinear"

    @nn.compact
    def __call__(self, x, train=False):
        def double_conv(x, width):
            for _ in range(2):
                x = Activation(self.activation)(batch_norm(train)(Conv(width, 3, padding=1)(x)))
            return x
        widths = [self.width * 2 ** i for i in range(self.depth)]
        skips = []
        for width in widths:
            x = double_conv(x, width)
            skips.append(x)
            x = MaxPool(2)(x)
        x = double_conv(x, widths[-1])  # bottom: 2**depth * width // 2 maps
        for skip, width in zip(reversed(skips), [w // 2 for w in reversed(widths[1:])] + [widths[0]]):
            x = jnp.concatenate([skip, Upsample(self.upsample)(x)], axis=-1)
            x = double_conv(x, width)
        return Conv(self.num_classes, 1)(x)


UPSAMPLING = ("bilinear", "nearest")


def _conv_blocks(convs, *after):
    """("conv", ...) specs, each followed by the specs in `after` (e.g. ReLU then pooling)."""
    return tuple(layer for conv in convs for layer in (("conv", *conv), *after))


def _bs6207_allconv(batch_norm):
    """3x3 pad-1 conv pairs of 16, 32, 64, 128 maps, 2x2 max pool between pairs, 4x4 average pool."""
    norm = (("batch_norm",),) if batch_norm else ()
    layers = []
    for i, width in enumerate((16, 32, 64, 128)):
        layers += _conv_blocks([(width, 3, 1, 1)] * 2, *norm, ("act",))
        layers += [("max_pool", 2)] if i < 3 else [("avg_pool", 4)]
    return tuple(layers)


def _vgg(blocks, head, batch_norm=False):
    """VGG: blocks of 3x3 pad-1 convs, each block ending in a 2x2 max pool, then the dense `head`."""
    norm = (("batch_norm",),) if batch_norm else ()
    layers = []
    for width, convs in blocks:
        layers += _conv_blocks([(width, 3, 1, 1)] * convs, *norm, ("act",)) + (("max_pool", 2),)
    return tuple(layers) + (("flatten",),) + tuple(layer for width in head for layer in (("dense", width), ("act",)))


VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))  # torchvision's configuration "E"


def _lenet5(batch_norm=True, fc=(120, 84)):
    """LeNet-5 on 28x28 digits: conv 6 5x5 pad 2, pool, conv 16 5x5, pool (16x5x5 = 400 features), then `fc`."""
    norm = (("batch_norm",),) if batch_norm else ()
    layers = (("conv", 6, 5, 1, 2), *norm, ("act",), ("max_pool", 2),
              ("conv", 16, 5), *norm, ("act",), ("max_pool", 2), ("flatten",))
    return layers + tuple(layer for width in fc for layer in (("dense", width), ("act",)))


# The reports' stacks; the final Dense(num_classes) is implicit. Trainable counts for 10 (GTSRB: 43) classes.
REPORT_LAYERS = {
    # TDT4265 task 2, CIFAR-10 32x32x3: 390,410.
    "tdt4265_cnn": _conv_blocks([(32, 5, 1, 2), (64, 5, 1, 2), (128, 5, 1, 2)], ("act",), ("max_pool", 2))
                   + (("flatten",), ("dense", 64), ("act",)),
    # BS6207 all-conv CIFAR-10 net: 294,810; with batch norm 295,770 trainable + 960 running stats.
    "bs6207_allconv": _bs6207_allconv(batch_norm=False),
    "bs6207_allconv_bn": _bs6207_allconv(batch_norm=True),
    # AI604 MNIST: MLP 784-50-30-10 with batch norm, 41,250 trainable (+160 running stats).
    "ai604_mlp_bn": (("flatten",), ("dense", 50), ("batch_norm",), ("act",),
                     ("dense", 30), ("batch_norm",), ("act",)),
    # AI604 MNIST: conv 8 6x6 stride 2 (28 -> 12), batch norm, ReLU: 11,842 trainable; with a 2x2 max pool 3,202.
    "ai604_cnn_bn": (("conv", 8, 6, 2), ("batch_norm",), ("act",)),
    "ai604_cnn_bn_pool": (("conv", 8, 6, 2), ("batch_norm",), ("act",), ("max_pool", 2)),
    # AI604 problem 2: LeNet-5 with batch norm after each conv, 61,750 trainable (+44 running stats); without
    # batch norm 61,706; with two fully connected layers (120, 10) 51,946 + 44.
    "lenet5_bn": _lenet5(), "lenet5": _lenet5(batch_norm=False), "lenet5_bn_fc2": _lenet5(fc=(120,)),
    # ADL GTSRB 28x28x3: 28 -> 24 -> 20 -> pool 10 -> 8 -> pool 4, so 4*4*32 = 512 features into Dense(43).
    "gtsrb_cnn": (("conv", 64, 5), ("act",), ("conv", 32, 5), ("act",), ("max_pool", 2),
                  ("conv", 32, 3), ("act",), ("max_pool", 2)),
    # ... with batch norm after each conv.
    "gtsrb_cnn_bn": (("conv", 64, 5), ("batch_norm",), ("act",), ("conv", 32, 5), ("batch_norm",), ("act",),
                     ("max_pool", 2), ("conv", 32, 3), ("batch_norm",), ("act",), ("max_pool", 2)),
    # TDT4265 task 3: the task 2 net with batch norm after each conv and dropout 0.1 before each dense layer.
    "tdt4265_cnn_bn": _conv_blocks([(32, 5, 1, 2), (64, 5, 1, 2), (128, 5, 1, 2)], ("batch_norm",), ("act",),
                                   ("max_pool", 2)) + (("flatten",), ("dropout", 0.1), ("dense", 64), ("act",),
                                                       ("dropout", 0.1)),
    # AI604: VGG-19's 16 convs (pools take 32x32 down to 1x1x512), head 512-512-128-10 (LeakyReLU 0.2 in the report).
    "ai604_vgg19": _vgg(VGG19_BLOCKS, head=(512, 128)),
    "ai604_vgg19_bn": _vgg(VGG19_BLOCKS, head=(512, 128), batch_norm=True),
}

# What each network is fed in its report: (input shape, number of classes), for summaries by name.
REPORT_INPUTS = {
    "mlp": ((28, 28, 1), 10), "small_cnn": ((28, 28, 1), 10), "tdt4265_cnn": ((32, 32, 3), 10),
    "bs6207_allconv": ((32, 32, 3), 10), "bs6207_allconv_bn": ((32, 32, 3), 10), "ai604_mlp_bn": ((28, 28, 1), 10),
    "ai604_cnn_bn": ((28, 28, 1), 10), "ai604_cnn_bn_pool": ((28, 28, 1), 10), "lenet5_bn": ((28, 28, 1), 10),
    "lenet5": ((28, 28, 1), 10), "lenet5_bn_fc2": ((28, 28, 1), 10), "gtsrb_cnn": ((28, 28, 3), 43),
    "gtsrb_cnn_bn": ((28, 28, 3), 43), "tdt4265_cnn_bn": ((32, 32, 3), 10), "ai604_vgg19": ((32, 32, 3), 10),
    "ai604_vgg19_bn": ((32, 32, 3), 10), "fcn": ((128, 128, 3), 2), "fcn2": ((128, 128, 3), 2),
    "unet": ((256, 256, 1), 2),
    "resnet18": ((32, 32, 3), 10), "vgg19": ((32, 32, 3), 10),  # CIFAR-10; the model resizes it to 224
}

MODELS = {"mlp": MLP, "small_cnn": SmallCNN, "layer_stack": LayerStack, "fcn": FCN,
          "fcn2": functools.partial(FCN, batch_norm=True, refine=True), "unet": UNet,
          **{name: functools.partial(LayerStack, layers=layers) for name, layers in REPORT_LAYERS.items()},
          # torchvision's structure, for ImageNet weights (flaxlab.pretrained)
          "resnet18": pretrained.ResNet18, "vgg19": pretrained.VGG19}


def _settable_fields(name):
    module = MODELS[name]
    fixed = {"parent", "name", "num_classes", *getattr(module, "keywords", {})}
    return [f for f in dataclasses.fields(getattr(module, "func", module)) if f.name not in fixed]


def _required_fields(name):
    """A network's fields without a default (a module of one's own may have some): the config must give them."""
    return [f for f in _settable_fields(name)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def network_options(name):
    """{option: default} of a network: its module's fields (less those its name fixes, and the class count,
    which the data set), plus what the runner reads to load its weights."""
    options = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
               for f in _settable_fields(name)
               if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {**options, **({"pretrained": False, "weights": ""} if name in pretrained.ARCHITECTURES else {})}


def with_option_default(model_config, option):
    """The model section with `option` at its network's default (None for a field without one) when the network
    takes it and the section lacks it (a swapped-in network's options are not listed until set), so that it can
    be set."""
    name = model_config.get("name")
    if not option or option in model_config or name not in MODELS:
        return model_config
    if option in (options := network_options(name)):
        return {**model_config, option: options[option]}
    if option in {f.name for f in _required_fields(name)}:
        return {**model_config, option: None}
    return model_config


def swap_network(model_config, network, given=()):
    """The model section once its name has changed from `network`: the old network's options that the new
    one does not take are dropped, except those in `given` (set by the user, so make_model refuses them)."""
    if model_config.get("name") == network:
        return model_config
    takes = network_options(model_config["name"])
    return {k: v for k, v in model_config.items() if k == "name" or k in takes or f"model.{k}" in given}


def make_model(model_config, num_classes):
    """Builds a model from its config section: {'name': ..., **fields}."""
    kwargs = dict(model_config)
    name = kwargs.pop("name")
    for loading_option in ("pretrained", "weights"):  # read by the runner (flaxlab.pretrained), not the module
        kwargs.pop(loading_option, None)
    if name not in MODELS:
        raise UsageError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    if kwargs.get("activation", "relu") not in ACTIVATIONS:
        raise UsageError(f"unknown activation '{kwargs['activation']}'; known: {', '.join(ACTIVATIONS)}")
    if kwargs.get("weight_init", "torch") not in WEIGHT_INITS:
        raise UsageError(f"unknown weight_init '{kwargs['weight_init']}'; known: {', '.join(WEIGHT_INITS)}")
    if kwargs.get("upsample", "bilinear") not in UPSAMPLING:
        raise UsageError(f"unknown upsampling '{kwargs['upsample']}'; known: {', '.join(UPSAMPLING)}")
    module = MODELS[name]
    cls = getattr(module, "func", module)  # a functools.partial fixes some fields
    if not dataclasses.is_dataclass(cls) or "num_classes" not in {f.name for f in dataclasses.fields(cls)}:
        raise UsageError(f"{name} has no num_classes field: a network flaxlab trains is a linen module with "
                         "`num_classes: int` (set from the data set) whose __call__ takes `train`")
    if "train" not in inspect.signature(cls.__call__).parameters:  # said as "cannot take 28x28 images"
        raise UsageError(f"{name}.__call__ takes no `train` argument: flaxlab calls it with train=True while "
                         "training (dropout, batch norm) and train=False to score")
    required = [f.name for f in _required_fields(name)]
    if missing := [field for field in required if field not in kwargs]:  # a TypeError from the module otherwise
        raise UsageError(f"{name} needs {', '.join('--model.' + f for f in missing)}, a field without a default "
                         f"(from Python: with_field(config, 'model.{missing[0]}', ...))")
    foreign = sorted(set(kwargs) - set(network_options(name)) - set(required))  # was "takes no" for given ones
    if foreign:  # a misspelt option, or --model.name swapped in a network the experiment's options do not fit
        takes = sorted(network_options(name))
        hint = did_you_mean(foreign[0], takes, "--model.") if len(foreign) == 1 else ""
        raise UsageError(f"--model.name {name}: {name} takes no {', '.join('--model.' + k for k in foreign)}{hint}; "
                         f"its options: {', '.join('--model.' + k for k in takes) or 'none'}")
    return module(num_classes=num_classes, **kwargs)


def count_params(params):
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
