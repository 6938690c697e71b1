"""Shape arithmetic of convolution and pooling, so a network's sizes can be checked before any array exists.

One spatial axis at a time, with PyTorch's conventions (the course reports' framework): floor division for
convolutions, `ceil_mode` for pooling, `output_padding` for transposed convolutions. Nonsense input (a size of
zero, a kernel larger than the padded input) is a `UsageError`; a question with no answer (no padding keeps the
size of an even kernel) is an `ImpossibleShape`, which is also a `ValueError`.
"""
import numbers

import numpy as np

from flaxlab.errors import UsageError


class ImpossibleShape(UsageError, ValueError):
    """The sizes asked for cannot be had with these settings."""


def _require_positive(**values):
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:  # numpy ints too
            raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _require_padding(padding):
    """Padding on both sides: an int, or (before, after)."""
    if isinstance(padding, str):
        raise UsageError(f"padding must be an int or (before, after), got {padding!r} (same_padding(kernel, dilation) "
                         "gives the padding that keeps the size)")
    pair = (padding, padding) if isinstance(padding, numbers.Integral) else tuple(padding) if isinstance(
        padding, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in pair):
        raise UsageError(f"padding must be an int or (before, after) ints, got {padding!r}")
    before, after = pair
    if before < 0 or after < 0:
        raise UsageError(f"padding must not be negative, got {padding!r}")
    return before, after


def effective_kernel(kernel, dilation=1):
    """How many input pixels a dilated kernel spans."""
    _require_positive(kernel=kernel, dilation=dilation)
    return dilation * (kernel - 1) + 1


def conv_output_size(size, kernel, stride=1, padding=0, dilation=1):
    """floor((size + pads - span) / stride) + 1: the windows that fit wholly inside the padded input."""
    _require_positive(size=size, kernel=kernel, stride=stride, dilation=dilation)
    before, after = _require_padding(padding)
    span = effective_kernel(kernel, dilation)
    if size + before + after < span:
        raise UsageError(f"a kernel spanning {span} pixels does not fit in {size} pixels padded by {padding}")
    return (size + before + after - span) // stride + 1


def pool_output_size(size, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """PyTorch's pooling size: stride defaults to the kernel, and `ceil_mode` keeps a last partial window
    only when it starts inside the input or the left padding (never in the right padding alone)."""
    stride = kernel if stride is None else stride
    _require_positive(size=size, kernel=kernel, stride=stride, dilation=dilation)
    if not isinstance(padding, numbers.Integral) or isinstance(padding, bool) or padding < 0:
        raise UsageError(f"pooling padding must be a non-negative integer, got {padding!r}")
    if not isinstance(ceil_mode, (bool, np.bool_)):  # "no" was taken as True
        raise UsageError(f"ceil_mode must be True or False, got {ceil_mode!r}")
    if padding > kernel // 2:  # torch's rule, on the kernel, not its dilated span
        raise UsageError(f"pooling padding {padding} is more than half the kernel size {kernel}")
    span = effective_kernel(kernel, dilation)
    reach = size + 2 * padding - span  # negative when the window is larger than the padded input
    out = (-(-reach // stride) if ceil_mode else reach // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    if out < 1:  # with ceil_mode a window hanging past the padding still counts, as in torch
        raise UsageError(f"a pooling window spanning {span} pixels does not fit in {size} pixels padded by {padding}")
    return out


def conv_transpose_output_size(size, kernel, stride=1, padding=0, output_padding=0, dilation=1):
    """(size - 1) * stride - 2 * padding + span + output_padding, as torch.nn.ConvTranspose2d."""
    _require_positive(size=size, kernel=kernel, stride=stride, dilation=dilation)
    if not isinstance(padding, numbers.Integral) or isinstance(padding, bool) or padding < 0:  # True was 1
        raise UsageError(f"padding must be a non-negative integer, got {padding!r}")
    if (not isinstance(output_padding, numbers.Integral) or isinstance(output_padding, bool)
            or not 0 <= output_padding < max(stride, dilation)):
        # Larger values would add rows that no input pixel reaches; torch refuses them too.
        raise UsageError(f"output_padding must be in [0, max(stride, dilation)) = [0, {max(stride, dilation)}), "
                         f"got {output_padding!r}")
    out = (size - 1) * stride - 2 * padding + effective_kernel(kernel, dilation) + output_padding
    if out <= 0:
        raise UsageError(f"padding {padding} crops all {out + 2 * padding} output pixels away")
    return out


def same_padding(kernel, dilation=1):
    """The padding on each side that keeps the size at stride 1: (span - 1) / 2."""
    span = effective_kernel(kernel, dilation)
    if span % 2 == 0:
        raise ImpossibleShape(
            f"a kernel spanning {span} pixels (kernel {kernel}, dilation {dilation}) cannot keep the size with "
            f"equal padding on both sides: it needs {span - 1} pixels of padding in all; pad asymmetrically, "
            f"({(span - 1) // 2}, {span // 2})")
    return (span - 1) // 2


def kernel_for_output(in_size, out_size, stride=1, padding=0, dilation=1):
    """The kernel size that maps in_size to out_size.

    At stride > 1 several kernels can give the same size; this returns the largest, the one that drops the
    fewest trailing input rows (none when (out - 1) * stride + span == in + 2 * padding has a solution).
    """
    _require_positive(in_size=in_size, out_size=out_size, stride=stride, dilation=dilation)
    before, after = _require_padding(padding)
    largest_span = in_size + before + after - (out_size - 1) * stride
    kernel = (largest_span - 1) // dilation + 1
    if largest_span < 1 or conv_output_size(in_size, kernel, stride, padding, dilation) != out_size:
        raise ImpossibleShape(
            f"no kernel maps {in_size} to {out_size} pixels at stride {stride}, padding {padding}, "
            f"dilation {dilation}")
    return kernel
