"""Stride-1 convolutions through oneDNN on x86 XLA:CPU: the library eager PyTorch's CPU convolutions run on.

XLA:CPU runs convolutions with Eigen's spatial convolution, compiled for a baseline ISA. jaxlib's XLA:CPU also
links oneDNN, which picks its kernels for the machine at run time (AVX-512 and AMX on the Xeon VM), and runs
it for an HLO custom call, `__onednn$convolution`, that XLA's own passes do not emit for these convolutions.
This module emits it. Measured on the 2-core Xeon VM (jax 0.10.2, median ms of single passes, batch 32):
the all-conv net's 3x3 convs over 16-128 maps took 0.25-0.74 ms forward against Eigen's 0.35-0.93, and the
GTSRB CNN's 64->32 5x5 conv 3.3 against 4.2 ms forward and 3.4 against 5.7 ms for the input gradient.
Whole train steps (in-process A/B): the all-conv net 18.25 -> 15.63 ms, the GTSRB CNN 54.8 -> 44.8 ms (its
FFT conv included), the 1MD120 CNN 2.42 -> 2.35 ms, the JSRT U-Net 1,052 -> 987 ms. Models side by side on
several CPU devices gained nothing from it where the FFT path gains (see `models._models_side_by_side`).

The custom call runs forward convolutions only. The input gradient is one too (the output gradient
convolved with the kernel flipped and its two feature axes swapped); the kernel gradient stays XLA's: as a
forward oneDNN convolution (the images' batch and feature axes swapped) it took 595 against 0.84 ms. XLA
gets its operands already transposed, and small ones split over the cores (`_kernel_grad`).

The custom call's configuration is a protobuf whose encoding has changed between XLA versions (spatial
axes 1- or 0-based, window values offset or not) and that nothing checks: a wrong one aborts the process.
So the path is used only with the jaxlib versions it was checked against (TESTED_JAXLIB), where tests
compare it with lax's convolution; other versions (or a jax whose internals used here moved), other machines
and FLAXLAB_ONEDNN=0 keep XLA's.
A program partitioned over several devices (data parallelism) gets XLA's convolution too, which XLA's
partitioner splits by batch; `shard_map` programs (one model set per device) keep oneDNN.
"""
import functools
import json
import os
import platform

import jax
import jax.numpy as jnp
import jaxlib

from flaxlab import parallel

try:  # jax internals: the custom call's lowering, the batching rule and the partitioning context
    from jax._src import dispatch, sharding_impls
    from jax._src.interpreters import ad, batching, mlir
    from jax.extend.core import Primitive
    _INTERNALS = True
except ImportError:
    _INTERNALS = False

TESTED_JAXLIB = ("0.10.2",)
# Where the images or the output gradient have at least this many elements, the kernel gradient's transposes
# are made apart (`_kernel_grad`); below, the conditionals cost more than they save. In-process step A/Bs on
# the Xeon: the 1MD120 CNN 2.71 ms without them, 2.80 with them on every conv; the all-conv net 17.3 ms
# without, 17.2 on every conv, 16.8 from 2**18 (16.0 against 17.1 from 2**19 in a second run); the GTSRB CNN
# 41.4 ms on every conv, 40.9 from 2**18 (its first conv's output gradient is the large operand).
APART_MIN_SIZE = 1 << 18
# The kernel gradient is split over the cores (`_kernel_grad_parts`) below both: its (in features x taps) x out
# features product (Eigen's threads split that product; the GTSRB CNN's 1600 x 32 took 17.3 ms on one core and
# 11.0 on two, the all-conv net's 144 x 16 1.44 and 1.73), and its output gradient's elements (each part reads
# all of it: the U-Net's 33 MB ones were slower split).
PARTS_MAX_PRODUCT = 1 << 15
PARTS_MAX_GRAD = 1 << 19
_NHWC, _HWIO, _HWOI = (0, 3, 1, 2), (3, 2, 0, 1), (2, 3, 0, 1)  # (batch or out-features, features, spatial...)


@functools.cache
def available():
    """Whether this process may emit oneDNN convolutions: an x86 machine, a checked jaxlib, not switched off."""
    return (_INTERNALS and os.environ.get("FLAXLAB_ONEDNN", "1") != "0"
            and platform.machine().lower() in ("x86_64", "amd64") and jaxlib.__version__ in TESTED_JAXLIB)


def applies(x, kernel, strides, padding):
    """Stride-1 float32 convolutions of NHWC images with a square HWIO kernel and equal zero padding on every
    side, at most the kernel's size less one (the input gradient's padding is that less `padding`), on CPU."""
    size = kernel.shape[0]
    return (jax.default_backend() == "cpu" and available() and strides == 1 and x.ndim == kernel.ndim == 4
            and kernel.shape[1] == size and x.dtype == kernel.dtype == jnp.float32 and 0 <= padding < size
            and min(x.shape[1:3]) + 2 * padding >= size)


def _output_shape(x_shape, kernel_shape, padding, swap):
    kh, kw, first, second = kernel_shape
    return (x_shape[0], x_shape[1] + 2 * padding - kh + 1, x_shape[2] + 2 * padding - kw + 1,
            first if swap else second)


def _xla_conv(x, kernel, *, padding, swap):
    """What the primitive computes, in XLA: `swap` reads the kernel as HWOI (the input gradient's)."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWOI" if swap else "HWIO", "NHWC"))


def _partitioned(axis_context):
    """Whether XLA's partitioner will split this program over devices (it would gather a custom call's inputs)."""
    if isinstance(axis_context, sharding_impls.ShardingContext):
        return axis_context.num_devices > 1
    if isinstance(axis_context, sharding_impls.SPMDAxisContext):
        return set(axis_context.manual_axes) != set(axis_context.mesh.axis_names)
    return False


def _layout(axes):
    batch, feature, *spatial = axes
    return {"dims": 4, "data": {"batch_dim": batch, "feature_dim": feature, "spatial_dims": spatial}}


def _lowering(ctx, x, kernel, *, padding, swap):
    if _partitioned(ctx.module_context.axis_context):
        return mlir.lower_fun(functools.partial(_xla_conv, padding=padding, swap=swap), multiple_results=False)(
            ctx, x, kernel)
    kh, kw = ctx.avals_in[1].shape[:2]
    out_features, in_features, *spatial = _HWOI if swap else _HWIO
    # The encoding jaxlib 0.10.2 reads (found by trying, checked against lax in the tests): 0-based axes,
    # pads and strides as they are, window dilations as XLA's (1: none).
    config = {"onednn_conv_config": {
        "dims": 4, "feature_groups": 1, "input": _layout(_NHWC), "output": _layout(_NHWC),
        "kernel": {"dims": 4, "filter": {"input_feature_dim": in_features, "output_feature_dim": out_features,
                                         "spatial_dims": spatial}},
        "window": {"size": [kh, kw], "pad_left": [padding] * 2, "pad_right": [padding] * 2, "strides": [1, 1],
                   "window_dilations": [1, 1]}}}
    row_major = [3, 2, 1, 0]
    return mlir.custom_call("__onednn$convolution", operands=[x, kernel], backend_config=json.dumps(config),
                            result_types=[mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])],
                            api_version=1, operand_layouts=[row_major, row_major], result_layouts=[row_major]).results




def _batched(args, dims, *, padding, swap):
    """Stacked models: images only stacked fold into the batch; stacked kernels run one model at a time
    (XLA would make a grouped convolution, slow on XLA:CPU)."""
    (x, kernel), (x_axis, kernel_axis) = args, dims
    if kernel_axis is None:
        x = jnp.moveaxis(x, x_axis, 0)
        y = _conv_p.bind(x.reshape(-1, *x.shape[2:]), kernel, padding=padding, swap=swap)
        return y.reshape(*x.shape[:2], *y.shape[1:]), 0
    take = lambda a, axis, i: a if axis is None else jax.lax.index_in_dim(a, i, axis, False)  # noqa: E731
    return jnp.stack([_conv_p.bind(take(x, x_axis, i), take(kernel, kernel_axis, i), padding=padding, swap=swap)
                      for i in range(kernel.shape[kernel_axis])]), 0


def _transpose_in_branch(x, *, perm):
    """`x` transposed inside a conditional whose two branches are the same. XLA:CPU fuses an elementwise
    producer (a ReLU, its gradient's select) into a transpose that moves the minor axis, and that fusion reads
    its input strided: 5.1 ms for a ReLU and the batch<->feature transpose of 64x24x24x64 floats, against
    1.1 ms for the transpose of a materialised array (2-core Xeon). A conditional's operand is materialised."""
    middle = x.reshape(-1)[x.size // 2]  # not a padded array's border, which XLA would fold to a constant
    middle = middle.astype(jnp.float32)  # an integer's x == x, too, XLA folds to true
    transpose = functools.partial(jnp.transpose, axes=perm)
    if perm == tuple(range(x.ndim)):  # jax drops a conditional's output that is its operand unchanged
        transpose = lambda v: v * jnp.ones((), v.dtype)  # noqa: E731
    return jax.lax.cond(middle == middle, transpose, transpose, x)


def _plain_transpose_lowering(ctx, x, *, perm):
    return mlir.lower_fun(functools.partial(jnp.transpose, axes=perm), multiple_results=False)(ctx, x)


def _transpose_lowering(ctx, x, *, perm):
    if _partitioned(ctx.module_context.axis_context):  # the condition would gather a split array
        return _plain_transpose_lowering(ctx, x, perm=perm)
    return mlir.lower_fun(functools.partial(_transpose_in_branch, perm=perm), multiple_results=False)(ctx, x)


def _transpose_batched(args, dims, *, perm):
    x = jnp.moveaxis(args[0], dims[0], 0)
    return _transpose_p.bind(x, perm=(0, *(axis + 1 for axis in perm))), 0


def _transpose_transposed(cotangent, x, *, perm):
    return [_transpose_p.bind(cotangent, perm=tuple(perm.index(axis) for axis in range(len(perm))))]


def transpose_apart(x, perm):
    """`jnp.transpose(x, perm)`, on XLA:CPU made apart from `x`'s producer (`_transpose_in_branch`)."""
    if not _INTERNALS:
        return jnp.transpose(x, perm)
    return _transpose_p.bind(x, perm=tuple(perm))


def computed_once(x):
    """`x`, on XLA:CPU made apart from its consumers (`_transpose_in_branch`), so that it is computed once. XLA
    fuses a cheap elementwise producer into each consumer that reads it and computes it again there: the 1MD120
    CNN's first conv (9 multiply-adds an output) ran inside its ReLU, its max pool, and both of their gradients,
    1.4 ms of a 3.9 ms step (2-core EPYC)."""
    return transpose_apart(x, tuple(range(x.ndim)))


def _kernel_grad_parts(in_features, window, out_features, grad_size):
    """How many convolutions, each over a share of the input features, the kernel gradient is split into: one
    per core where Eigen would run it on one thread, since XLA runs the parts at the same time. The all-conv
    net's step 14.09 -> 13.48 ms (in-process A/B, 11 rounds, 2-core Xeon); the GTSRB CNN's 36.5 against 36.1
    ms and the 1MD120 CNN's 2.31 ms either way."""
    if in_features * window * out_features >= PARTS_MAX_PRODUCT or grad_size > PARTS_MAX_GRAD:
        return 1
    return max(1, min(in_features, parallel.cpu_cores()))


def _kernel_grad(x, grad, padding):
    """The kernel gradient as XLA's convolution of the images, batch and feature axes swapped, with the output
    gradient as its kernel. Large operands are transposed to the layouts that convolution reads beforehand,
    each apart from its producer (`_transpose_in_branch`): whole train steps against XLA's own transposes
    (in-process A/B, medians, 2-core Xeon): GTSRB CNN 49.0 -> 42.2 ms, all-conv net 18.1 -> 17.3 ms, JSRT
    U-Net 1,067 -> 986 ms; the same parameters after a step.

    Split over the cores, each part's images are sliced before they are transposed: a slice of the transposed
    images was a copy of its own (0.23-0.26 ms each for the all-conv net's 32x32 16->16 conv). Whole steps,
    in-process A/Bs on the 2-core EPYC, medians of 12 rounds: all-conv net 19.48 -> 18.28 and 18.50 -> 17.63 ms
    (faster in 11 of 12 rounds), 1MD120 CNN 2.00 -> 1.93 ms, three GTSRB CNNs 158.3 against 157.5 ms; the same
    parameters after an epoch."""
    apart = max(x.size, grad.size) >= APART_MIN_SIZE
    transpose = transpose_apart if apart else jnp.transpose
    grad_t = transpose(grad, (1, 2, 0, 3))  # (height, width, batch, out features)
    kh, kw = (x.shape[i] + 2 * padding - grad.shape[i] + 1 for i in (1, 2))
    parts = _kernel_grad_parts(x.shape[3], kh * kw, grad.shape[3], grad.size)
    bounds = [x.shape[3] * i // parts for i in range(parts + 1)]
    kernel_t = jnp.concatenate([  # each part's images as (in features, height, width, batch)
        _xla_conv(transpose(x[..., start:stop], (3, 1, 2, 0)), grad_t, padding=padding, swap=False)
        for start, stop in zip(bounds, bounds[1:])])
    return jnp.transpose(kernel_t, (1, 2, 0, 3))


if _INTERNALS:
    _transpose_p = Primitive("transpose_apart")
    _transpose_p.def_impl(functools.partial(dispatch.apply_primitive, _transpose_p))
    _transpose_p.def_abstract_eval(lambda x, *, perm: jax.core.ShapedArray(tuple(x.shape[a] for a in perm), x.dtype))
    mlir.register_lowering(_transpose_p, _plain_transpose_lowering)
    mlir.register_lowering(_transpose_p, _transpose_lowering, platform="cpu")
    batching.primitive_batchers[_transpose_p] = _transpose_batched
    ad.deflinear2(_transpose_p, _transpose_transposed)

    _conv_p = Primitive("onednn_conv")
    _conv_p.def_impl(functools.partial(dispatch.apply_primitive, _conv_p))
    _conv_p.def_abstract_eval(lambda x, kernel, *, padding, swap: jax.core.ShapedArray(
        _output_shape(x.shape, kernel.shape, padding, swap), x.dtype))
    mlir.register_lowering(_conv_p, _lowering, platform="cpu")
    batching.primitive_batchers[_conv_p] = _batched


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x, kernel, padding):
    """NHWC images convolved with an HWIO kernel (stride 1, `padding` zeros on every side), as lax's
    convolution computes it; see `applies` for where it may be used."""
    return _conv_p.bind(x, kernel, padding=padding, swap=False)


def _conv_fwd(x, kernel, padding):
    return conv(x, kernel, padding), (x, kernel)


def _conv_bwd(padding, residuals, grad):
    x, kernel = residuals
    kh = kernel.shape[0]
    grad_x = _conv_p.bind(grad, kernel[::-1, ::-1], padding=kh - 1 - padding, swap=True)
    return grad_x, _kernel_grad(x, grad, padding)


conv.defvjp(_conv_fwd, _conv_bwd)
