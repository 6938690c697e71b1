"""Stride-1 convolution through the 2D FFT, for large kernels on XLA:CPU.

XLA:CPU's direct convolution is slowest in its two backward passes: for the GTSRB CNN's 64->32 5x5 conv
on 24x24 maps (batch 64) the forward pass took 15 ms and the backward passes 40-45 ms (2-core EPYC). In
the frequency domain each of the three products is one small complex matrix product per frequency,
about 8x fewer multiply-adds; with the transforms, forward and backward together took 40-44 ms against
53-60 ms, and the whole train step 54-61 ms against 69-72 ms.

The products are real matrix products over [Re | Im] halves, the same multiply-adds as complex ones: in a
profile of the GTSRB step, Eigen's complex products took 7.5-8.6 ms each and these 3.0-4.3 ms. The kernel's
spectrum, and the kernel gradient's top-left corner, come from small products with the DFT's terms for the
kernel's few taps, not from FFTs of kernels padded to the image size. With both, three GTSRB CNNs side by
side made 6.6-7.0 steps/s against 6.5-6.9 (five alternating runs, each 1-4% faster, 2-core Xeon); one model
alone took 58.9 ms a step either way.

The correlation of an H x W map with a k x k kernel is a circular one of size H x W (a zero-padded map
is padded first): no output that is kept wraps around. Results agree with lax's convolution to ~1e-6
(relative to the largest value), as float32 FFTs do.

Where oneDNN convolutions are available (flaxlab.onednn_conv: x86, a checked jaxlib) they are faster for
one model and taken first: the GTSRB step 54.8 ms with this path, 44.8 ms with oneDNN's (2-core Xeon). With
models side by side on several CPU devices this path stays (7.6 against 7.3 steps/s of three GTSRB CNNs).

The maps go channels-first apart from their producer and the spectra's [Re | Im] layout is one transpose
(`_channels_first`, `_spectrum`): the GTSRB step with this path 49.6 -> 44.3 ms (in-process A/B, the same
parameters after a step), three GTSRB CNNs side by side 9.10 -> 10.23 steps/s of all three (2-core Xeon;
8.69 with every conv in oneDNN, 8.74 for the three one after another on one device).
"""
import jax
import jax.numpy as jnp
import numpy as np

from flaxlab import onednn_conv


def _spectrum(maps, size):
    """(N, C, h, w) real maps -> (F, N, 2C) real: [Re | Im] of the 2D real FFT of each, zero-padded to `size`."""
    spectrum = jnp.fft.rfft2(maps, s=size)
    n, c, rows, cols = spectrum.shape
    parts = jnp.stack([spectrum.real, spectrum.imag]).reshape(2, n, c, rows * cols)  # one transpose, not two
    return parts.transpose(3, 1, 0, 2).reshape(rows * cols, n, 2 * c)


def _channels_first(maps):
    """NHWC -> NCHW, apart from the maps' producer (a ReLU or its gradient, which XLA:CPU would fuse into
    the transpose and read strided; see `onednn_conv.transpose_apart`)."""
    return onednn_conv.transpose_apart(maps, (0, 3, 1, 2))


def _maps(spectrum, size, crop):
    """(F, N, 2C) [Re | Im] -> (N, C, *crop) real: the inverse of `_spectrum`, its top-left corner."""
    _, n, c = spectrum.shape
    c //= 2
    spectrum = jax.lax.complex(spectrum[..., :c], spectrum[..., c:])
    spectrum = spectrum.transpose(1, 2, 0).reshape(n, c, size[0], size[1] // 2 + 1)
    return jnp.fft.irfft2(spectrum, s=size)[:, :, :crop[0], :crop[1]]


def _angles(size, window):
    """(F, kh * kw): 2 pi (u a / H + v b / W) for the half spectrum's frequencies (u, v) and the taps (a, b)."""
    (height, width), (kh, kw) = size, window
    u, v = np.arange(height)[:, None, None, None], np.arange(width // 2 + 1)[None, :, None, None]
    a, b = np.arange(kh)[None, None, :, None], np.arange(kw)[None, None, None, :]
    return (2 * np.pi * (u * a / height + v * b / width)).reshape(height * (width // 2 + 1), kh * kw)


def _conjugate_kernel_product(kernel, size):
    """A (kh, kw, A, B) kernel's conjugate spectrum C = conj(K) as an (F, 2A, 2B) block [[Re C, Im C], [-Im C, Re C]]:
    a [Re X | Im X] spectrum times it is [Re XC | Im XC]."""
    kh, kw, a, b = kernel.shape
    angles = _angles(size, (kh, kw))
    cos, imag = np.cos(angles), np.sin(angles)  # K = sum of taps * (cos - i sin), so Im conj(K) has +sin
    terms = np.stack([np.stack([cos, -imag], 1), np.stack([imag, cos], 1)])  # (2, F, 2, taps)
    stacks = jnp.einsum("sfpt,tc->sfpc", jnp.asarray(terms, jnp.float32), kernel.reshape(kh * kw, a * b))
    to_real, to_imag = stacks.reshape(2, -1, 2 * a, b)
    return jnp.concatenate([to_real, to_imag], -1)


def _kernel_maps(real, imag, size, window):
    """(F, A, B) real and imaginary parts -> the (kh, kw, A, B) top-left corner of their inverse real FFT."""
    angles = _angles(size, window).T                                     # (taps, F)
    width = size[1]
    weights = np.full(width // 2 + 1, 2.0)  # the half spectrum stands for both halves, but for v = 0 and W/2
    weights[0] = 1.0
    if width % 2 == 0:
        weights[-1] = 1.0
    weights = np.tile(weights, size[0]) / (size[0] * width)
    terms = np.stack([np.cos(angles) * weights, -np.sin(angles) * weights], 1)  # Re(S e^{+i angle}) per tap
    _, a, b = real.shape
    taps = jnp.einsum("tpf,pfc->tc", jnp.asarray(terms, jnp.float32), jnp.stack([real, imag]).reshape(2, -1, a * b))
    return taps.reshape(*window, a, b)


def _forward(x, kernel):
    h, w = x.shape[1:3]
    kh, kw = kernel.shape[:2]
    size = (h, w)
    x_f = _spectrum(_channels_first(x), size)                                 # (F, N, 2I)
    # correlation: Y = X conj(K) at each frequency
    kernel_f = _conjugate_kernel_product(kernel, size)                         # (F, 2I, 2O)
    y = _maps(x_f @ kernel_f, size, (h - kh + 1, w - kw + 1)).transpose(0, 2, 3, 1)
    return y, (x_f, kernel_f, kernel.shape[:2])


def _backward(residuals, grad_y):
    x_f, kernel_f, window = residuals
    size = (grad_y.shape[1] + window[0] - 1, grad_y.shape[2] + window[1] - 1)
    grad_f = _spectrum(_channels_first(grad_y), size)                          # (F, N, 2O)
    # dx is the (circular) convolution of dy with the kernel: dX = dY K^T, and the block of K^T is the
    # transpose of the forward pass's block of conj(K)
    grad_x = _maps(grad_f @ kernel_f.transpose(0, 2, 1), size, size)
    # dK is the correlation of x with dy, summed over images: sum_n X conj(dY), from the four real products
    # [Re X | Im X]^T [Re dY | Im dY]
    products = jnp.einsum("fni,fno->fio", x_f, grad_f)
    i, o = x_f.shape[-1] // 2, grad_f.shape[-1] // 2
    grad_kernel = _kernel_maps(products[:, :i, :o] + products[:, i:, o:], products[:, i:, :o] - products[:, :i, o:],
                               size, window)
    return grad_x.transpose(0, 2, 3, 1), grad_kernel


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
