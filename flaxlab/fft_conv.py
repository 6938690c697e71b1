"""Stride-1 convolution through the 2D FFT, for large kernels on XLA:CPU.

XLA:CPU's direct convolution is slowest in its two backward passes: for the GTSRB CNN's 64->32 5x5 conv
on 24x24 maps (batch 64) the forward pass took 15 ms and the backward passes 40-45 ms (2-core EPYC). In
the frequency domain each of the three products is one small complex matrix product per frequency,
about 8x fewer multiply-adds; with the transforms, forward and backward together took 40-44 ms against
53-60 ms, and the whole train step 54-61 ms against 69-72 ms.

The correlation of an H x W map with a k x k kernel is a circular one of size H x W (a zero-padded map
is padded first): no output that is kept wraps around. Results agree with lax's convolution to ~1e-6
(relative to the largest value), as float32 FFTs do.
"""
import jax
import jax.numpy as jnp


def _spectrum(maps, size):
    """(N, C, h, w) real maps -> (frequencies, N, C) complex: the 2D real FFT of each, zero-padded to `size`."""
    spectrum = jnp.fft.rfft2(maps, s=size)
    n, c, rows, cols = spectrum.shape
    return spectrum.reshape(n, c, rows * cols).transpose(2, 0, 1)


def _maps(spectrum, size, crop):
    """(frequencies, N, C) complex -> (N, C, *crop) real: the inverse of `_spectrum`, its top-left corner."""
    _, n, c = spectrum.shape
    spectrum = spectrum.transpose(1, 2, 0).reshape(n, c, size[0], size[1] // 2 + 1)
    return jnp.fft.irfft2(spectrum, s=size)[:, :, :crop[0], :crop[1]]


def _forward(x, kernel):
    h, w = x.shape[1:3]
    kh, kw = kernel.shape[:2]
    size = (h, w)
    x_f = _spectrum(x.transpose(0, 3, 1, 2), size)                  # (F, N, I)
    kernel_f = _spectrum(kernel.transpose(2, 3, 0, 1), size)        # (F, I, O)
    # correlation: Y = X conj(K) at each frequency
    y_f = jnp.einsum("fni,fio->fno", x_f, jnp.conj(kernel_f))
    y = _maps(y_f, size, (h - kh + 1, w - kw + 1)).transpose(0, 2, 3, 1)
    return y, (x_f, kernel_f, size, (kh, kw))


def _backward(residuals, grad_y):
    x_f, kernel_f, size, (kh, kw) = residuals
    grad_f = _spectrum(grad_y.transpose(0, 3, 1, 2), size)          # (F, N, O)
    # dx is the (circular) convolution of dy with the kernel; dK the correlation of x with dy, summed over images
    grad_x = _maps(jnp.einsum("fno,fio->fni", grad_f, kernel_f), size, size)
    grad_kernel = _maps(jnp.einsum("fni,fno->fio", x_f, jnp.conj(grad_f)), size, (kh, kw))
    return grad_x.transpose(0, 2, 3, 1), grad_kernel.transpose(2, 3, 0, 1)


@jax.custom_vjp
def correlate_valid(x, kernel):
    """NHWC maps and an HWIO kernel -> the VALID stride-1 correlation (what lax's convolution computes)."""
    return _forward(x, kernel)[0]


correlate_valid.defvjp(_forward, _backward)


def conv(x, kernel, padding=0):
    """Stride-1 convolution with symmetric zero padding, through the FFT."""
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return correlate_valid(x, kernel)


def is_faster(x, kernel, strides, padding):
    """Where the FFT was measured faster (fwd+bwd, batch 64, 2-core EPYC): XLA:CPU, float32, stride 1, no
    padding, 5x5 or larger kernels over 32 or more input maps (the GTSRB CNN's 24x24x64 -> 32: 40-42 ms
    against 53-60 ms). Not for TDT4265's padded 5x5 convs (16x16x32 -> 64: 32-37 ms either way;
    8x8x64 -> 128: 43 ms against 27-48 ms) nor 3x3 kernels (40 ms against 13.5 ms)."""
    return (jax.default_backend() == "cpu" and strides == 1 and padding == 0 and x.dtype == jnp.float32
            and min(kernel.shape[:2]) >= 5 and x.shape[-1] >= 32)
