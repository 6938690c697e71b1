"""Max pooling whose backward pass XLA:CPU runs fast: the gradient of lax.reduce_window's max is a
select-and-scatter, slow there. Forward: the maximum of the window's members, each a strided view;
the residual is which member was the first maximum (torch's choice). Backward: the gradient goes
back to that member. `max_pool_strided` covers `max_pool`'s windows too; the course CNNs keep the
reshape-based `max_pool`, whose timing on their hot path was measured (1MD120 CNN).
"""
import functools
import numbers

import jax
import jax.numpy as jnp


class PooledToNothing(ValueError):
    """A window larger than its input: the network shrinks the images to nothing before this pool."""


def _check(x, window, stride=None, padding=0):
    """torch's refusals, which a reshape or an empty slice passed over (a window larger than the image gave
    a 0x0 output, a padding over half the window windows of padding alone)."""
    stride = window if stride is None else stride
    for name, value in (("window", window), ("stride", stride), ("padding", padding)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"pooling takes a square window, its stride and padding as ints, got {name} {value!r}")
    if x.ndim != 4:
        raise ValueError(f"pooling takes (N, H, W, C) arrays, got shape {x.shape}")
    if window < 1 or stride < 1 or not 0 <= padding <= window // 2:
        raise ValueError(f"window {window}, stride {stride}, padding {padding}: the window and stride are at "
                         "least 1, the padding at most half the window")
    if min(x.shape[1:3]) + 2 * padding < window:
        raise PooledToNothing(f"a {window}x{window} window is larger than the {x.shape[1]}x{x.shape[2]} input"
                              + (f" padded by {padding}" if padding else ""))


def windows(x, size):
    """The size*size members of each non-overlapping window, each as an (n, h/size, w/size, c) view."""
    _check(x, size)
    n, h, w, c = x.shape
    x = x[:, :h - h % size, :w - w % size].reshape(n, h // size, size, w // size, size, c)
    return [[x[:, :, i, :, j] for j in range(size)] for i in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x, size=2):
    """Non-overlapping max pooling, floor mode: torch's MaxPool2d(size), gradient to the first max.

    Elementwise maxima of the window members instead of lax.reduce_window: on XLA:CPU the 1MD120
    CNN's two pools took ~1.8 ms of a 4.5 ms step that way (select-and-scatter), ~0.4 ms this way.
    """
    return functools.reduce(jnp.maximum, [m for row in windows(x, size) for m in row])


def _first_maximum(members):
    """The maxima and, as the residual, which member of each window is the first maximum (as in torch).

    The index is kept rather than found again in the backward pass by comparing members with the
    maxima: XLA may compute the pooled values in two fusions that round differently (seen with the
    batch split over devices), and then no member would equal its maximum and the gradient be lost.
    For the same reason it is one argmax over the stacked members, not a chain of `member > best so far`:
    XLA:CPU fused the tanh or sigmoid producing the members into each comparison and into the maxima apart,
    rounding them differently (jax 0.10.2), so the chain kept a wrong member and sent the gradient there
    (the 1MD120 CNN with tanh: conv gradients off by 2x, against eager jax and torch).
    jnp.max keeps a NaN, as torch does: a NaN activation must reach the loss, not be pooled away (its
    gradient goes to the window's first NaN, torch's to its last: NaN gradients either way). The
    1MD120 CNN's step took 2.70 ms against the chain's 2.83 (medians of 7 alternating rounds, 2-core Xeon).
    """
    stacked = jnp.stack(members)
    index = jnp.int8 if len(members) <= 128 else jnp.int32  # int8 wrapped for a global pool's 32x32 windows
    return stacked.max(0), jnp.argmax(stacked, 0).astype(index)


def _max_pool_fwd(x, size):
    best, first = _first_maximum([m for row in windows(x, size) for m in row])
    return best, (first, x.shape)


def _max_pool_bwd(size, residuals, grad):
    first, (n, h, w, c) = residuals
    rows = [jnp.stack([jnp.where(first == i * size + j, grad, 0.0) for j in range(size)], axis=3)
            for i in range(size)]
    dx = jnp.stack(rows, axis=2).reshape(n, h - h % size, w - w % size, c)
    return (jnp.pad(dx, ((0, 0), (0, h % size), (0, w % size), (0, 0))),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_strided(x, window, stride, padding=0):
    """torch's MaxPool2d(window, stride, padding) (floor mode, -inf padding), e.g. ResNet's 3x3/2/1.

    For ResNet-18's pool at 224 (32 x 112x112x64), flax's nn.max_pool took ~470 ms forward and
    backward on a 2-core EPYC, ~440 of them in the backward select-and-scatter (an eighth of the
    fine-tuning step); this one takes 82 ms.
    """
    return _strided_fwd(x, window, stride, padding)[0]


def _strided_members(x, window, stride, padding):
    """The window*window members of every window, each an (n, out_h, out_w, c) strided view."""
    _check(x, window, stride, padding)
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    out_h, out_w = (h + 2 * padding - window) // stride + 1, (w + 2 * padding - window) // stride + 1
    return [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            for i in range(window) for j in range(window)]


def _strided_fwd(x, window, stride, padding):
    best, first = _first_maximum(_strided_members(x, window, stride, padding))
    return best, (first, x.shape)


def _strided_bwd(window, stride, padding, residuals, grad):
    """Member k's gradient placed at its input positions by a strided (interior) pad; all summed."""
    first, (n, h, w, c) = residuals
    out_h, out_w = first.shape[1:3]
    height, width = h + 2 * padding, w + 2 * padding
    dx = 0.0
    for i in range(window):
        for j in range(window):
            g = jnp.where(first == i * window + j, grad, 0.0)
            dx = dx + jax.lax.pad(g, jnp.zeros((), g.dtype), (
                (0, 0, 0), (i, height - i - stride * (out_h - 1) - 1, stride - 1),
                (j, width - j - stride * (out_w - 1) - 1, stride - 1), (0, 0, 0)))
    return (dx[:, padding:padding + h, padding:padding + w],)


max_pool_strided.defvjp(_strided_fwd, _strided_bwd)
