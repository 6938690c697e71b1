"""Layers written from their definitions, to check what the frameworks compute and to learn from.

Convolution, transposed convolution, pooling, RoI pooling, batch norm and the losses as plain jnp indexing,
slicing and sums, no lax.conv or reduce_window: slow, but each line is the textbook formula, and each function
is jit-able and differentiable. `check_all` compares every one, values and gradients, with the framework's
version (lax, flax, optax; PyTorch where lax has no equivalent, when torch is installed).

Images are NHWC and kernels HWIO, as in flax. Sizes, strides, paddings and dilations are Python ints (or
pairs), so under jit they are static arguments. Output sizes follow PyTorch, via `flaxlab.shapes`.
"""
import functools
import itertools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from flaxlab import shapes
from flaxlab.errors import UsageError


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy ints too


def _pair(value, name):
    """An int, or (height, width) ints, as torch takes sizes: anything else (a float, a third entry that
    would be dropped) is refused, naming `name`."""
    pair = (value, value) if _is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(map(_is_int, pair)):
        raise UsageError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    return pair


def _padding_pairs(padding):
    """int p, (ph, pw) or ((top, bottom), (left, right)) -> ((top, bottom), (left, right))."""
    if _is_int(padding):
        return (padding, padding), (padding, padding)
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        pairs = tuple((p, p) if _is_int(p) else tuple(p) if isinstance(p, (tuple, list)) else () for p in padding)
        if all(len(pair) == 2 and all(map(_is_int, pair)) for pair in pairs):
            return pairs
    raise UsageError(f"padding must be an int, (height, width) or ((top, bottom), (left, right)) ints, 'valid' or "
                     f"'same', got {padding!r}")


def _named_padding(padding, kernel, stride, dilation):
    """torch's padding="valid" (none) and "same" (stride 1; an even span's extra pixel at the bottom/right)."""
    if padding == "valid":
        return 0
    if padding != "same":
        raise UsageError(f"padding must be an int, pairs, 'valid' or 'same', got {padding!r}")
    if stride != (1, 1):
        raise UsageError("padding='same' needs stride 1 (torch refuses it for strided convolutions too)")
    return tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation))


def _flag(value, name):
    if not isinstance(value, (bool, np.bool_)):  # a value meant for another argument, or "False" (true)
        raise UsageError(f"{name} must be True or False, got {value!r}")


def _require_ndim(name, array, ndim, layout):
    if jnp.ndim(array) != ndim:
        raise UsageError(f"{name} must be {layout}, got shape {tuple(jnp.shape(array))}")


def _windows(x, kernel, stride, dilation, out):
    """Every kernel tap's strided view of padded NHWC `x`: shape (kh, kw, N, oh, ow, C).

    Tap (i, j) of output pixel (r, c) reads x[r * stride + i * dilation, c * stride + j * dilation].
    """
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out
    return jnp.stack([jnp.stack([x[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw]
                                 for j in range(kw)]) for i in range(kh)])


def conv2d(x, w, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation, what deep-learning frameworks call convolution: out[n, r, c, o] =
    sum over i, j, k of x_padded[n, r*s + i*d, c*s + j*d, k] * w[i, j, k, o], within each group.

    w is (kh, kw, C_in / groups, C_out); group g maps input channels g*C_in/groups... to output channels
    g*C_out/groups..., as lax's feature_group_count and torch's groups. `padding` may also be torch's
    "valid" or "same".
    """
    x, w = jnp.asarray(x), jnp.asarray(w)  # nested lists too
    _require_ndim("conv2d's input", x, 4, "NHWC (batch, height, width, channels)")
    _require_ndim("conv2d's kernel", w, 4, "HWIO (height, width, in channels / groups, out channels)")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if not _is_int(groups) or groups <= 0:
        raise UsageError(f"groups must be a positive integer, got {groups!r}")
    kh, kw, group_in, c_out = w.shape
    n, h, wd, c_in = x.shape
    if isinstance(padding, str):
        padding = _named_padding(padding, (kh, kw), stride, dilation)
    (pt, pb), (pl, pr) = _padding_pairs(padding)
    if group_in * groups != c_in:
        raise UsageError(f"kernel {w.shape} with {groups} group{'s' * (groups > 1)} does not fit {c_in} input channels "
                         f"(it takes {group_in * groups})")
    if c_out % groups:
        raise UsageError(f"kernel {w.shape}: {c_out} output channels do not split into {groups} groups")
    out = (shapes.conv_output_size(h, kh, stride[0], (pt, pb), dilation[0]),
           shapes.conv_output_size(wd, kw, stride[1], (pl, pr), dilation[1]))
    padded = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    taps = _windows(padded, (kh, kw), stride, dilation, out).reshape(kh, kw, n, *out, groups, group_in)
    grouped_w = w.reshape(kh, kw, group_in, groups, c_out // groups)
    y = jnp.einsum("ijnrcgk,ijkgo->nrcgo", taps, grouped_w, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(n, *out, c_out)


def convolve2d(x, w, stride=1, padding=0, dilation=1, groups=1):
    """True convolution (the signal-processing one): the kernel flipped in both spatial axes, then conv2d."""
    return conv2d(x, w[::-1, ::-1], stride, padding, dilation, groups)


def conv_transpose2d(x, w, stride=1, padding=0, output_padding=0, dilation=1):
    """torch.nn.ConvTranspose2d: every input pixel adds its kernel-weighted copy into the output,
    out[n, r*s + i*d - p, c*s + j*d - p, o] += x[n, r, c, k] * w[i, j, k, o], then `output_padding` extra
    rows/columns at the bottom/right (which only those sums reach).

    w is (kh, kw, C_in, C_out), C_in being this layer's input channels: torch's weight (C_in, C_out, kh, kw)
    transposed by (2, 3, 0, 1). It is the gradient of conv2d with that kernel taken as (kh, kw, C_out, C_in).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _require_ndim("conv_transpose2d's input", x, 4, "NHWC (batch, height, width, channels)")
    _require_ndim("conv_transpose2d's kernel", w, 4, "HWIO (height, width, in channels, out channels)")
    stride, dilation, padding, output_padding = (_pair(value, name) for value, name in (
        (stride, "stride"), (dilation, "dilation"), (padding, "padding"), (output_padding, "output_padding")))
    kh, kw, c_in, c_out = w.shape
    n, h, wd, x_channels = x.shape
    if x_channels != c_in:
        raise UsageError(f"kernel {w.shape} expects {c_in} input channels, got {x_channels}")
    out = tuple(shapes.conv_transpose_output_size(size, k, s, p, op, d) for size, k, s, p, op, d in
                zip((h, wd), (kh, kw), stride, padding, output_padding, dilation))
    # Scatter into an uncropped canvas, then cut `padding` off the top/left: padding crops in a transposed conv.
    canvas = jnp.zeros((n, out[0] + 2 * padding[0], out[1] + 2 * padding[1], c_out), x.dtype)
    for i, j in itertools.product(range(kh), range(kw)):
        contribution = jnp.einsum("nrck,ko->nrco", x, w[i, j], precision=jax.lax.Precision.HIGHEST)
        r0, c0 = i * dilation[0], j * dilation[1]
        canvas = canvas.at[:, r0:r0 + (h - 1) * stride[0] + 1:stride[0],
                           c0:c0 + (wd - 1) * stride[1] + 1:stride[1]].add(contribution)
    return canvas[:, padding[0]:padding[0] + out[0], padding[1]:padding[1] + out[1]]


def _pool_geometry(x, kernel, stride, padding, dilation, ceil_mode):
    _require_ndim("a pooling layer's input", x, 4, "NHWC (batch, height, width, channels)")
    kernel, dilation, padding = _pair(kernel, "kernel"), _pair(dilation, "dilation"), _pair(padding, "padding")
    stride = kernel if stride is None else _pair(stride, "stride")
    _flag(ceil_mode, "ceil_mode")
    out = tuple(shapes.pool_output_size(size, k, s, p, d, ceil_mode)
                for size, k, s, p, d in zip(x.shape[1:3], kernel, stride, padding, dilation))
    # ceil_mode's last window may reach past the right padding: pad that far too.
    after = tuple(max(p, (o - 1) * s + d * (k - 1) + 1 - size - p)
                  for size, k, s, p, d, o in zip(x.shape[1:3], kernel, stride, padding, dilation, out))
    return kernel, stride, dilation, tuple(zip(padding, after)), out


def _first_max(members, axis):
    """The maximum along `axis`, taken from its first maximal member (a NaN wins), so the gradient goes wholly
    to that member, as in torch; a plain max() splits it between ties (common after a ReLU: zeros)."""
    first = jnp.expand_dims(jnp.argmax(members, axis=axis), axis)
    return jnp.squeeze(jnp.take_along_axis(members, first, axis=axis), axis)


def max_pool2d(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """torch.nn.MaxPool2d, its arguments in its order: the maximum over each window of the input (padding never
    wins). The gradient goes to the member torch's kernel keeps: the window's first maximum in row-major order,
    but its last NaN where it holds NaNs, and its first pixel in the image where all are -inf."""
    x = jnp.asarray(x)
    kernel, stride, dilation, pads, out = _pool_geometry(x, kernel, stride, padding, dilation, ceil_mode)
    def members(a, fill):  # (taps, N, oh, ow, C)
        windows = _windows(jnp.pad(a, ((0, 0), *pads, (0, 0)), constant_values=fill), kernel, stride, dilation, out)
        return windows.reshape(-1, *windows.shape[2:])
    taps = members(x, -jnp.inf)
    inside = members(jnp.ones((1, *x.shape[1:3], 1), bool), False)  # (taps, 1, oh, ow, 1)
    nan = jnp.isnan(taps)
    kept = jnp.where(nan.any(0), len(taps) - 1 - jnp.argmax(nan[::-1], 0),  # torch: `val > max || isnan(val)`
                     jnp.where(taps.max(0) == -jnp.inf, jnp.argmax(inside, 0), jnp.argmax(taps, 0)))
    return jnp.take_along_axis(taps, kept[None], axis=0)[0]


def avg_pool2d(x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """torch.nn.AvgPool2d: the window's sum over its count, which counts the zero padding when
    `count_include_pad`, but never the part of a ceil_mode window that hangs past the padding."""
    x = jnp.asarray(x)
    kernel, stride, dilation, pads, out = _pool_geometry(x, kernel, stride, padding, 1, ceil_mode)
    _flag(count_include_pad, "count_include_pad")
    (pt, pb), (pl, pr) = pads

    def window_sums(a, pads):
        return _windows(jnp.pad(a, ((0, 0), *pads, (0, 0))), kernel, stride, dilation, out).sum(axis=(0, 1))

    # The divisor is a window sum too: of ones where a pixel counts (the input, and the padding if asked).
    counted, counted_pads = jnp.ones((1, *x.shape[1:3], 1), x.dtype), pads
    if count_include_pad:
        counted = jnp.pad(counted, ((0, 0), (pt, pt), (pl, pl), (0, 0)), constant_values=1)
        counted_pads = ((0, pb - pt), (0, pr - pl))
    return window_sums(x, pads) / window_sums(counted, counted_pads)


def flatten(x):
    """(N, ...) -> (N, features), in NHWC order (not torch's CHW order)."""
    x = jnp.asarray(x)
    if jnp.ndim(x) == 0:
        raise UsageError("flatten's input must be a batch (N, ...), got a scalar")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 cannot be inferred for an empty batch


def sigmoid(x):
    """1 / (1 + e^-x), evaluated as e^x / (1 + e^x) for negative x so neither form overflows."""
    e = jnp.exp(-jnp.abs(x))
    return jnp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _round_half_away(v):
    """C's round(), which torchvision uses for box corners; jnp.round rounds halves to even."""
    return jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)


def _roi_bin_edges(extent, bins):
    """torchvision's bin edges, floor(k * b) and ceil((k + 1) * b) for b = float32(extent) / bins, in its float32
    arithmetic: (K, bins) offsets from the box's start. Computed by numpy: XLA:CPU's float32 division is not
    IEEE's (for extents 1-5,000, a third of its quotients by 3 differ in the last bit), and torchvision's
    rounding puts 57 rows in 7 bins at rows 0-8, ..., 48-57 (7 * float32(57 / 7) = 57.000004)."""
    def edges(extent):
        size = np.asarray(extent).astype(np.float32)[..., None] / np.float32(bins)
        k = np.arange(bins + 1, dtype=np.float32)
        return np.floor(k[:-1] * size).astype(np.int32), np.ceil(k[1:] * size).astype(np.int32)

    shape = jax.ShapeDtypeStruct((*jnp.shape(extent), bins), jnp.int32)
    return jax.pure_callback(edges, (shape, shape), jax.lax.stop_gradient(extent), vmap_method="sequential")


def roi_max_pool(features, boxes, output_size):
    """torchvision.ops.roi_pool with spatial_scale=1: (H, W, C) features, (K, 4) boxes (x1, y1, x2, y2)
    -> (K, oh, ow, C).

    Each box's corners are rounded, the box (inclusive of both corners, at least 1 pixel) is cut into
    oh x ow bins of fractional size, bin (a, b) covers rows floor(a * bin_h) .. ceil((a + 1) * bin_h) - 1
    (so neighbouring bins may share a row), clipped to the image; the output is each bin's maximum, or 0
    for a bin wholly outside the image. The gradient goes to each bin's first maximum (row-major), as there.
    Bin edges are computed in float32 as torchvision's are (on the host: see _roi_bin_edges).
    """
    features = jnp.asarray(features)
    _require_ndim("roi_max_pool's features", features, 3, "one image's (H, W, C)")
    if jnp.ndim(boxes) != 2 or jnp.shape(boxes)[1] != 4:
        raise UsageError(f"roi_max_pool's boxes must be (K, 4): x1, y1, x2, y2 (no batch-index column, as "
                         f"torchvision's (K, 5) rois have), got shape {tuple(jnp.shape(boxes))}")
    oh, ow = _pair(output_size, "output_size")
    if oh <= 0 or ow <= 0:
        raise UsageError(f"output_size must be positive, got {output_size!r}")
    if _concrete(boxes) is not None and not np.isfinite(_concrete(boxes)).all():  # rounded to a corner of nothing
        raise UsageError(f"roi_max_pool's boxes must be finite numbers, got {np.asarray(boxes).tolist()}")
    height, width, _ = features.shape
    x1, y1, x2, y2 = _round_half_away(jnp.asarray(boxes, jnp.float32)).astype(jnp.int32).T

    def bin_masks(start, end, bins, size):
        """(K, bins, size): which pixels each bin covers."""
        lo, hi = _roi_bin_edges(jnp.maximum(end - start + 1, 1), bins)
        lo, hi = jnp.clip(lo + start[:, None], 0, size), jnp.clip(hi + start[:, None], 0, size)
        pixel = jnp.arange(size)
        return (pixel >= lo[..., None]) & (pixel < hi[..., None])

    rows, cols = bin_masks(y1, y2, oh, height), bin_masks(x1, x2, ow, width)
    # torchvision keeps a pixel that beats the bin's maximum so far, which starts at -FLT_MAX: never a NaN or
    # -inf, and a bin of those gives -FLT_MAX and no gradient.
    lowest = jnp.finfo(jnp.float32).min
    features = jnp.where(features > lowest, features, lowest)
    # The bin is a rectangle, so its maximum is a maximum over columns, then over rows; first maxima both
    # times give torchvision's choice: the topmost row holding the maximum, its leftmost column.
    over_cols = _first_max(jnp.where(cols[:, :, None, :, None], features[None, None], -jnp.inf), 3)  # (K, ow, H, C)
    over_rows = _first_max(jnp.where(rows[:, :, None, :, None], over_cols[:, None], -jnp.inf), 3)  # (K, oh, ow, C)
    empty = ~(rows.any(-1)[:, :, None] & cols.any(-1)[:, None, :])
    return jnp.where(empty[..., None], 0.0, over_rows)


def batch_norm(x, gamma, beta, running_mean, running_var, train, momentum=0.1, eps=1e-5):
    """torch.nn.BatchNorm: normalise each channel (last axis) by the batch's mean and biased variance in
    training, by the running ones in inference. Returns (y, new_running_mean, new_running_var); the running
    variance is updated with the unbiased batch variance, as torch does."""
    x = jnp.asarray(x)
    if jnp.ndim(x) < 2:
        raise UsageError(f"batch_norm's input must be (N, ..., C), channels last, got shape {jnp.shape(x)}")
    _flag(train, "train")
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool) or not 0 <= momentum <= 1:
        raise UsageError(f"batch_norm's momentum must be a number in [0, 1] (torch's: the new batch's share), "
                         f"got {momentum!r}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:  # -1 gave inf
        raise UsageError(f"batch_norm's eps must be a number, 0 or more, got {eps!r}")
    for name, value in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                        ("running_var", running_var)):
        if jnp.shape(value) != x.shape[-1:]:  # broadcasting would give every channel another's numbers
            raise UsageError(f"batch_norm's {name} must have one value per channel, shape {x.shape[-1:]} for input "
                             f"{x.shape} (channels last), got shape {jnp.shape(value)}")
    if train:
        axes = tuple(range(x.ndim - 1))
        count = x.size // x.shape[-1]
        if count < 2:
            raise UsageError(f"batch norm in training needs more than 1 value per channel (torch refuses it too), "
                             f"got shape {x.shape}")
        mean = x.mean(axes)
        var = ((x - mean) ** 2).mean(axes)
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)
    else:
        mean, var = running_mean, running_var
    return (x - mean) / jnp.sqrt(var + eps) * gamma + beta, running_mean, running_var


def _log_softmax(logits):
    shifted = logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))  # exp() cannot overflow
    return shifted - jnp.log(jnp.exp(shifted).sum(-1, keepdims=True))


def softmax_cross_entropy(logits, labels):
    """Mean over the batch (and pixels) of -log softmax(logits)[label], for integer labels: logits (..., K),
    labels (...), as torch's cross_entropy takes (N,) or per-pixel (N, H, W) targets (with classes last here).

    Labels outside 0..K-1 are refused when they are concrete; under jit a label of K or more gives NaN (jnp's
    gather fills), and a negative one counts from the end as numpy's indexing does, so check them before."""
    if jnp.ndim(logits) == 0:
        raise UsageError("logits must have a class axis, (..., K), got a scalar")
    if jnp.shape(labels) != jnp.shape(logits)[:-1]:
        raise UsageError(f"labels of shape {jnp.shape(labels)} do not match logits of shape {jnp.shape(logits)}: "
                         f"give one integer label per row of logits, shape {jnp.shape(logits)[:-1]}")
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise UsageError(f"labels must be integer class indices, got {jnp.asarray(labels).dtype} (for probabilities, "
                         f"or one-hot rows, use softmax_cross_entropy_probs)")
    concrete = _concrete(labels)
    if concrete is not None and concrete.size:
        low, high = int(concrete.min()), int(concrete.max())
        if low < 0 or high >= jnp.shape(logits)[-1]:
            raise UsageError(f"labels must be in 0..{jnp.shape(logits)[-1] - 1} (one per class of the logits), "
                             f"got {low}..{high}")
    return -jnp.take_along_axis(_log_softmax(jnp.asarray(logits)), jnp.asarray(labels)[..., None], axis=-1).mean()


def softmax_cross_entropy_probs(logits, probs):
    """Mean over the batch of -sum_k probs_k log softmax(logits)_k, for soft (probability) targets."""
    if jnp.shape(probs) != jnp.shape(logits):
        raise UsageError(f"probs of shape {jnp.shape(probs)} do not match logits of shape {jnp.shape(logits)}: give "
                         f"a probability per class (integer labels go to softmax_cross_entropy)")
    return -(probs * _log_softmax(logits)).sum(-1).mean()


def mse(a, b):
    """Mean over all elements of (a - b)^2, of two arrays of one shape."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:  # broadcasting (4, 1) against (4,) averaged 16 differences
        raise UsageError(f"mse's arrays must have one shape, got {a.shape} and {b.shape}")
    return ((a - b) ** 2).mean()


def _concrete(array):
    """The values of `array` as numpy, or None under jit (unknown until run)."""
    try:
        return np.asarray(array)
    except jax.errors.TracerArrayConversionError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Checks against the frameworks.


def _torch():
    """torch if installed, else None: the checks that need it are skipped, nothing else needs it."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _lax_conv(x, w, stride=1, padding=0, dilation=1, groups=1, lhs_dilation=1):
    return jax.lax.conv_general_dilated(
        x, w, _pair(stride, "stride"), _padding_pairs(padding), lhs_dilation=_pair(lhs_dilation, "lhs_dilation"),
        rhs_dilation=_pair(dilation, "dilation"),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)


def _lax_conv_transpose(x, w, stride=1, padding=0, output_padding=0, dilation=1):
    """Transposed conv as lax computes gradients: dilate the input by the stride, pad by span - 1 - padding
    (plus output_padding after), and correlate with the spatially flipped kernel."""
    spans = [d * (k - 1) for k, d in zip(w.shape[:2], _pair(dilation, "dilation"))]
    paddings = _pair(padding, "padding"), _pair(output_padding, "output_padding")
    pads = [(s - p, s - p + op) for s, p, op in zip(spans, *paddings)]
    return _lax_conv(x, w[::-1, ::-1], 1, pads, dilation, lhs_dilation=stride)


def _reduce_window_pool(x, kernel, stride, padding, ceil_mode, dilation, init, op):
    kernel, stride, dilation, pads, _ = _pool_geometry(x, kernel, stride, padding, dilation, ceil_mode)
    return jax.lax.reduce_window(x, init, op, (1, *kernel, 1), (1, *stride, 1), ((0, 0), *pads, (0, 0)),
                                 window_dilation=(1, *dilation, 1))


def _lax_max_pool(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    return _reduce_window_pool(x, kernel, stride, padding, ceil_mode, dilation, -jnp.inf, jax.lax.max)


def _flax_avg_pool(x, kernel, stride=None, padding=0, count_include_pad=True):
    import flax.linen as nn
    kernel, padding = _pair(kernel, "kernel"), _pair(padding, "padding")
    return nn.avg_pool(x, kernel, kernel if stride is None else _pair(stride, "stride"), [(p, p) for p in padding],
                       count_include_pad)


def _flax_batch_norm(x, gamma, beta, running_mean, running_var, train, momentum=0.1, eps=1e-5):
    """y and the running mean from flax.linen.BatchNorm; the running variance from the unbiased formula,
    because flax updates it with the biased one."""
    import flax.linen as nn
    layer = nn.BatchNorm(use_running_average=not train, momentum=1 - momentum, epsilon=eps, use_fast_variance=False)
    variables = {"params": {"scale": gamma, "bias": beta}, "batch_stats": {"mean": running_mean, "var": running_var}}
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    new_var = running_var
    if train:
        new_var = (1 - momentum) * running_var + momentum * jnp.var(x, tuple(range(x.ndim - 1)), ddof=1)
    return y, updates["batch_stats"]["mean"], new_var


def _optax_ce(logits, labels):
    import optax
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _optax_ce_probs(logits, probs):
    import optax
    return optax.softmax_cross_entropy(logits, probs).mean()


def _optax_mse(a, b):
    import optax
    return (optax.l2_loss(a, b) * 2).mean()


def _nchw(t):
    return t.permute(0, 3, 1, 2) if t.ndim == 4 else t


def _nhwc(t):
    return t.permute(0, 2, 3, 1) if t.ndim == 4 else t


def _torch_conv_transpose(torch, x, w, stride=1, padding=0, output_padding=0, dilation=1):
    y = torch.nn.functional.conv_transpose2d(_nchw(x), w.permute(2, 3, 0, 1).contiguous(), stride=stride,
                                             padding=padding, output_padding=output_padding, dilation=dilation)
    return _nhwc(y)


def _torch_max_pool(torch, x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    return _nhwc(torch.nn.functional.max_pool2d(_nchw(x), kernel, stride, padding, dilation, ceil_mode))


def _torch_avg_pool(torch, x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    return _nhwc(torch.nn.functional.avg_pool2d(_nchw(x), kernel, stride, padding, ceil_mode, count_include_pad))


def _torch_batch_norm(torch, x, gamma, beta, running_mean, running_var, train, momentum=0.1, eps=1e-5):
    running_mean, running_var = running_mean.detach().clone(), running_var.detach().clone()  # updated in place
    y = torch.nn.functional.batch_norm(_nchw(x), running_mean, running_var, gamma, beta, train, momentum, eps)
    return _nhwc(y), running_mean, running_var


def _torchvision_roi_pool(torch, features, boxes, output_size):
    from torchvision.ops import roi_pool
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)  # batch index 0
    return _nhwc(roi_pool(features.permute(2, 0, 1)[None], rois, _pair(output_size, "output_size"), 1.0))


class Case:
    """One comparison: `layer(*inputs, **options)` against `reference` (a jax function, or one taking torch
    first and torch tensors) in values and in the gradient of a random linear functional of the (first) output
    with respect to the inputs listed in `differentiable`."""

    def __init__(self, layer, case, ours, reference, inputs, options=None, differentiable=(0,), backend="jax",
                 needs=None):
        self.layer, self.case, self.ours, self.reference = layer, case, ours, reference
        self.inputs, self.options, self.differentiable = inputs, options or {}, differentiable
        self.backend, self.needs = backend, needs or ("torch" if backend == "torch" else None)

    def __repr__(self):
        return f"{self.layer}-{self.case}"

    def available(self):
        if self.needs is None:
            return True
        try:
            __import__(self.needs)
        except ImportError:
            return False
        return True

    def run(self, seed=0):
        """{layer, case, max_abs_diff, grad_max_abs_diff}."""
        ours_out, ours_grads, weights = self._jax_values_and_grads(self.ours, seed)
        if self.backend == "jax":
            ref_out, ref_grads, _ = self._jax_values_and_grads(self.reference, seed, weights)
        else:
            ref_out, ref_grads = self._torch_values_and_grads(weights)
        return {"layer": self.layer, "case": self.case,
                "max_abs_diff": _max_diff(ours_out, ref_out), "grad_max_abs_diff": _max_diff(ours_grads, ref_grads)}

    def _jax_values_and_grads(self, fn, seed, weights=None):
        inputs = [jnp.asarray(a) for a in self.inputs]
        # One compiled program per case: op-by-op dispatch of the many slices is slower than compiling them.
        out = jax.jit(functools.partial(fn, **self.options))(*inputs)
        first = out[0] if isinstance(out, tuple) else out
        if weights is None:
            weights = np.asarray(np.random.default_rng(seed + 1).standard_normal(np.shape(first)), np.float32)

        def functional(*diff):
            args = list(inputs)
            for i, a in zip(self.differentiable, diff):
                args[i] = a
            result = fn(*args, **self.options)
            return ((result[0] if isinstance(result, tuple) else result) * weights).sum()

        grads = jax.jit(jax.grad(functional, argnums=tuple(range(len(self.differentiable)))))(
            *[inputs[i] for i in self.differentiable])
        return jax.tree_util.tree_map(np.asarray, out), [np.asarray(g) for g in grads], weights

    def _torch_values_and_grads(self, weights):
        torch = _torch()
        inputs = [torch.tensor(np.asarray(a), requires_grad=i in self.differentiable)
                  for i, a in enumerate(self.inputs)]
        out = self.reference(torch, *inputs, **self.options)
        first = out[0] if isinstance(out, tuple) else out
        (first * torch.tensor(weights)).sum().backward()
        values = tuple(t.detach().numpy() for t in out) if isinstance(out, tuple) else out.detach().numpy()
        return values, [inputs[i].grad.numpy() for i in self.differentiable]


def _max_diff(a, b):
    diffs = jax.tree_util.tree_map(lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)), initial=0.0))
                                   if np.shape(u) == np.shape(v) else float("inf"), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def comparison_cases(seed=0):
    """Every layer against its framework version on small random inputs, several shapes and options each."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    cases = []
    for name, x_shape, w_shape, options in [
            ("3x3-pad1", (2, 6, 7, 3), (3, 3, 3, 4), {"padding": 1}),
            ("stride2x3-asym-pad", (2, 9, 8, 2), (3, 2, 2, 3), {"stride": (2, 3), "padding": ((1, 0), (2, 1))}),
            ("dilation2", (1, 9, 9, 2), (3, 3, 2, 2), {"dilation": 2, "padding": 2}),
            ("groups2-stride2", (2, 6, 6, 4), (3, 3, 2, 6), {"groups": 2, "stride": 2, "padding": 1}),
            ("depthwise", (1, 5, 5, 3), (3, 3, 1, 3), {"groups": 3})]:
        inputs = (normal(*x_shape), normal(*w_shape))
        cases.append(Case("conv2d", name, conv2d, _lax_conv, inputs, options, (0, 1)))
        cases.append(Case("convolve2d", name, convolve2d,
                          lambda x, w, **o: _lax_conv(x, jnp.flip(w, (0, 1)), **o), inputs, options, (0, 1)))
    for name, x_shape, w_shape, options in [
            ("3x3-s2-p1-op1", (2, 4, 5, 3), (3, 3, 3, 2), {"stride": 2, "padding": 1, "output_padding": 1}),
            ("4x4-s2-p1", (1, 3, 3, 2), (4, 4, 2, 3), {"stride": 2, "padding": 1}),
            ("3x3-dilation2", (1, 4, 4, 2), (3, 3, 2, 2), {"dilation": 2}),
            ("2x3-s3x2-op2x1", (1, 3, 4, 1), (2, 3, 1, 2), {"stride": (3, 2), "padding": (0, 1),
                                                              "output_padding": (2, 1)})]:
        inputs = (normal(*x_shape), normal(*w_shape))
        cases.append(Case("conv_transpose2d", name + "-lax", conv_transpose2d, _lax_conv_transpose, inputs,
                          options, (0, 1)))
        cases.append(Case("conv_transpose2d", name + "-torch", conv_transpose2d, _torch_conv_transpose, inputs,
                          options, (0, 1), "torch"))
    for name, x_shape, options in [
            ("2x2", (2, 6, 6, 3), {"kernel": 2}),
            ("3x3-s2-p1", (1, 7, 7, 2), {"kernel": 3, "stride": 2, "padding": 1}),
            ("3x3-s2-p1-ceil", (1, 7, 8, 2), {"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
            ("2x2-ceil", (1, 5, 5, 1), {"kernel": 2, "ceil_mode": True}),
            ("2x2-dilation2", (1, 8, 8, 2), {"kernel": 2, "stride": 1, "dilation": 2})]:
        inputs = (normal(*x_shape),)
        if "dilation" not in options:  # lax has no gradient for dilated max pooling windows
            cases.append(Case("max_pool2d", name + "-lax", max_pool2d, _lax_max_pool, inputs, options))
        cases.append(Case("max_pool2d", name + "-torch", max_pool2d, _torch_max_pool, inputs, options,
                          backend="torch"))
    # After a ReLU many windows tie at 0: torch gives the whole gradient to the first of them
    ties = (np.maximum(normal(2, 6, 6, 3), 0) * (rng.random((2, 6, 6, 3)) < 0.3),)
    cases.append(Case("max_pool2d", "3x3-s1-relu-ties-torch", max_pool2d, _torch_max_pool, ties,
                      {"kernel": 3, "stride": 1}, backend="torch"))
    for name, x_shape, options in [
            ("2x2", (2, 6, 6, 3), {"kernel": 2}),
            ("3x3-s2-p1", (1, 7, 7, 2), {"kernel": 3, "stride": 2, "padding": 1}),
            ("3x3-s2-p1-nopad", (1, 7, 7, 2), {"kernel": 3, "stride": 2, "padding": 1, "count_include_pad": False}),
            ("3x3-s2-p1-ceil", (1, 6, 6, 2), {"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
            ("3x3-s2-p1-ceil-nopad", (1, 6, 6, 2), {"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                                                     "count_include_pad": False}),
            ("2x2-ceil", (1, 5, 5, 1), {"kernel": 2, "ceil_mode": True})]:
        inputs = (normal(*x_shape),)
        if not options.get("ceil_mode"):  # flax has no ceil mode
            cases.append(Case("avg_pool2d", name + "-flax", avg_pool2d, _flax_avg_pool, inputs, options))
        cases.append(Case("avg_pool2d", name + "-torch", avg_pool2d, _torch_avg_pool, inputs, options,
                          backend="torch"))
    for name, shape, train in [("nhwc-train", (4, 3, 3, 5), True), ("nhwc-eval", (4, 3, 3, 5), False),
                               ("nc-train", (6, 4), True)]:
        c = shape[-1]
        inputs = (normal(*shape, scale=2.0) + 1, normal(c), normal(c), normal(c),
                  rng.uniform(0.5, 2, c).astype(np.float32))
        options = {"train": train, "momentum": 0.1, "eps": 1e-5}
        cases.append(Case("batch_norm", name + "-flax", batch_norm, _flax_batch_norm, inputs, options, (0, 1, 2)))
        cases.append(Case("batch_norm", name + "-torch", batch_norm, _torch_batch_norm, inputs, options, (0, 1, 2),
                          "torch"))
    for name, logits in [("small", normal(5, 4)), ("large-logits", normal(3, 10, scale=30.0)),
                         ("per-pixel", normal(2, 3, 3, 4))]:
        labels = rng.integers(0, logits.shape[-1], logits.shape[:-1]).astype(np.int32)
        probs = rng.dirichlet(np.ones(logits.shape[-1]), logits.shape[:-1]).astype(np.float32)
        cases.append(Case("softmax_cross_entropy", name, softmax_cross_entropy, _optax_ce, (logits, labels)))
        cases.append(Case("softmax_cross_entropy_probs", name, softmax_cross_entropy_probs, _optax_ce_probs,
                          (logits, probs), differentiable=(0, 1)))
    for name, shape in [("vector", (7,)), ("nhwc", (2, 3, 3, 2))]:
        cases.append(Case("mse", name, mse, _optax_mse, (normal(*shape), normal(*shape)), differentiable=(0, 1)))
    cases.append(Case("sigmoid", "wide-range", sigmoid, jax.nn.sigmoid, (normal(4, 6, scale=40.0),)))
    cases.append(Case("flatten", "nhwc", flatten, lambda x: jnp.reshape(x, (x.shape[0], -1)),
                      (normal(2, 3, 4, 5),)))
    features = normal(9, 11, 3)
    boxes = np.array([[0, 0, 10, 8], [1.4, 2.5, 6.6, 4.4], [3, 3, 3, 3], [8, 6, 14, 12], [20, 20, 25, 25]],
                     np.float32)
    cases.append(Case("roi_max_pool", "2x3-bins", roi_max_pool, _torchvision_roi_pool, (features, boxes),
                      {"output_size": (2, 3)}, backend="torch", needs="torchvision"))
    cases.append(Case("roi_max_pool", "2x3-bins-relu-ties", roi_max_pool, _torchvision_roi_pool,
                      (np.maximum(features, 0), boxes), {"output_size": (2, 3)}, backend="torch", needs="torchvision"))
    return cases


def check_all(seed=0):
    """[{layer, case, max_abs_diff, grad_max_abs_diff}] for every comparison whose framework is installed."""
    return [case.run(seed) for case in comparison_cases(seed) if case.available()]
