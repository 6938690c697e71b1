"""Layers from scratch (`flaxlab.layers`) against the frameworks, and the TDT4265 task 1a convolution."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab import layers, pooling
from flaxlab.errors import UsageError

TOLERANCE = 1e-5


@pytest.mark.parametrize("case", layers.comparison_cases(), ids=repr)
def test_layer_matches_framework(case):
    if not case.available():
        pytest.skip(f"{case.needs} is not installed; it is the reference for {case!r}")
    result = case.run()
    assert result["max_abs_diff"] < TOLERANCE, result
    assert result["grad_max_abs_diff"] < TOLERANCE, result


def test_check_all_reports_each_available_case(monkeypatch):
    few = [c for c in layers.comparison_cases() if c.layer in ("flatten", "mse")]
    monkeypatch.setattr(layers, "comparison_cases", lambda seed=0: few)
    report = layers.check_all()
    assert [(r["layer"], r["case"]) for r in report] == [(c.layer, c.case) for c in few]
    assert all(set(r) == {"layer", "case", "max_abs_diff", "grad_max_abs_diff"} for r in report)
    assert all(r["max_abs_diff"] < TOLERANCE and r["grad_max_abs_diff"] < TOLERANCE for r in report)


# TDT4265 assignment 1, task 1a: a 3x5 image convolved with a Sobel kernel, zero padding 1, stride 1.
IMAGE_1A = np.array([[1, 0, 2, 3, 1], [3, 2, 0, 7, 0], [0, 6, 1, 1, 4]], np.float32)
SOBEL = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
REPORTED_1A = np.array([[-2, 1, -1, 2, 13], [-10, 4, -8, -2, 18], [-14, 1, 5, -6, 9]], np.float32)
CORRECT_1A = np.array([[-2, 1, -11, 2, 13], [-10, 4, -8, -2, 18], [-14, 1, 5, -6, 9]], np.float32)


def numpy_true_convolution(image, kernel, padding):
    """The definition, one output pixel at a time: out[r, c] = sum_ij image[r - i + p, c - j + p] * kernel[i, j]
    over the zero-padded image, i.e. the kernel flipped and slid over it."""
    kh, kw = kernel.shape
    padded = np.pad(image, padding)
    out = np.zeros((padded.shape[0] - kh + 1, padded.shape[1] - kw + 1), np.float32)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[r, c] = sum(padded[r + kh - 1 - i, c + kw - 1 - j] * kernel[i, j] for i in range(kh) for j in range(kw))
    return out


def test_tdt4265_task_1a_true_convolution():
    """The report's matrix is right in 14 of 15 entries; entry (row 0, column 2) should be -11, not -1.

    That entry's window is image rows -1..1 (row -1 is padding) by columns 1..3; with the flipped kernel
    [[1, 0, -1], [2, 0, -2], [1, 0, -1]]: 2*0 - 2*3 + 1*2 - 1*7 = -11. The other entries show the report did
    flip the kernel (cross-correlation would negate all of them), so this is an arithmetic slip; -1 is what one
    gets by taking the second image row with the unflipped kernel row (-2 + 7) while flipping the first (-6).
    """
    ours = np.asarray(layers.convolve2d(jnp.asarray(IMAGE_1A)[None, :, :, None], jnp.asarray(SOBEL)[:, :, None, None],
                                        padding=1))[0, :, :, 0]
    np.testing.assert_array_equal(ours, numpy_true_convolution(IMAGE_1A, SOBEL, 1))
    np.testing.assert_array_equal(ours, CORRECT_1A)
    wrong = np.argwhere(ours != REPORTED_1A)
    assert wrong.tolist() == [[0, 2]] and REPORTED_1A[0, 2] == -1 and ours[0, 2] == -11
    # Cross-correlation would have given the negation (the Sobel kernel is antisymmetric left-right).
    cross = np.asarray(layers.conv2d(jnp.asarray(IMAGE_1A)[None, :, :, None], jnp.asarray(SOBEL)[:, :, None, None],
                                     padding=1))[0, :, :, 0]
    np.testing.assert_array_equal(cross, -CORRECT_1A)


def test_convolve2d_matches_scipy():
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(3)
    image, kernel = rng.standard_normal((6, 7)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    ours = layers.convolve2d(jnp.asarray(image)[None, :, :, None], jnp.asarray(kernel)[:, :, None, None],
                             padding=((2, 2), (3, 3)))[0, :, :, 0]
    np.testing.assert_allclose(ours, signal.convolve2d(image, kernel, mode="full"), atol=TOLERANCE)


def test_layers_jit_with_static_options():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, 6, 6, 2)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32)
    conv = jax.jit(layers.conv2d, static_argnames=("stride", "padding", "dilation", "groups"))
    chex.assert_trees_all_close(conv(x, w, stride=2, padding=1), layers.conv2d(x, w, stride=2, padding=1), atol=1e-6)
    pool = jax.jit(functools.partial(layers.max_pool2d, kernel=3, stride=2, padding=1, ceil_mode=True))
    chex.assert_shape(pool(x), (1, 4, 4, 2))


def test_conv_transpose_inverts_conv_shape():
    x = jnp.ones((1, 7, 7, 2))
    down = layers.conv2d(x, jnp.ones((3, 3, 2, 4)), stride=2, padding=1)
    up = layers.conv_transpose2d(down, jnp.ones((3, 3, 4, 2)), stride=2, padding=1)
    chex.assert_shape((down, up), [(1, 4, 4, 4), (1, 7, 7, 2)])


def test_sigmoid_is_finite_at_extremes():
    x = jnp.array([-1000.0, -100.0, 0.0, 100.0, 1000.0])
    np.testing.assert_allclose(layers.sigmoid(x), [0, 0, 0.5, 1, 1], atol=1e-30)
    assert np.isfinite(jax.grad(lambda v: layers.sigmoid(v).sum())(x)).all()


def test_flatten_keeps_nhwc_order():
    x = jnp.arange(2 * 2 * 3 * 4).reshape(2, 2, 3, 4)
    np.testing.assert_array_equal(layers.flatten(x)[1], np.arange(24, 48))


def test_conv2d_rejects_kernel_that_does_not_fit_the_channels():
    with pytest.raises(UsageError):
        layers.conv2d(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 2, 4)), groups=1)
    with pytest.raises(UsageError):
        layers.conv2d(jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1)))
    with pytest.raises(UsageError, match="3 output channels do not split into 2 groups"):
        layers.conv2d(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 1, 3)), groups=2)


@pytest.mark.parametrize("call,message", [
    (lambda: layers.conv2d(jnp.ones((5, 5, 3)), jnp.ones((3, 3, 3, 4))), r"conv2d's input must be NHWC .* \(5, 5, 3\)"),
    (lambda: layers.conv2d(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3))), "conv2d's kernel must be HWIO"),
    (lambda: layers.conv2d(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4)), padding="full"), "'valid' or 'same'"),
    (lambda: layers.conv2d(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4)), 2, "same"), "needs stride 1"),
    (lambda: layers.conv_transpose2d(jnp.ones((5, 5, 3)), jnp.ones((3, 3, 3, 4))), "input must be NHWC"),
    (lambda: layers.max_pool2d(jnp.ones((5, 5, 3)), 2), "pooling layer's input must be NHWC"),
    (lambda: layers.roi_max_pool(jnp.ones((1, 5, 5, 3)), jnp.zeros((1, 4)), 2), r"features must be one image's"),
    (lambda: layers.roi_max_pool(jnp.ones((5, 5, 3)), jnp.zeros((1, 5)), 2), r"no batch-index column"),
    (lambda: layers.batch_norm(jnp.ones((1, 3)), *[jnp.ones(3)] * 4, train=True), "more than 1 value per channel"),
    (lambda: layers.softmax_cross_entropy(jnp.ones((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 1), int)),
     r"labels of shape \(2, 3, 3, 1\) do not match logits of shape \(2, 3, 3, 4\)"),
    (lambda: layers.softmax_cross_entropy(jnp.ones((4, 5)), jnp.array([0, 4, 2, -1])), r"in 0..4 .* got -1..4"),
    (lambda: layers.softmax_cross_entropy(jnp.ones((4, 5)), np.array([0, 5, 2, 1])), r"in 0..4 .* got 0..5"),
    # sizes that were dropped, turned the answer into a float, or ended in an unpacking or indexing error
    (lambda: layers.conv_transpose2d(jnp.ones((1, 3, 3, 2)), jnp.ones((3, 3, 2, 4)), stride=(2, 2, 5)),
     r"stride must be an int or a pair of ints \(height, width\), got \(2, 2, 5\)"),
    (lambda: layers.conv2d(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 4, 2)), stride=1.0), "stride must be an int"),
    (lambda: layers.conv2d(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 4, 2)), padding=((1, 2), (3, 4), (5, 6))),
     r"padding must be an int, \(height, width\) or \(\(top, bottom\), \(left, right\)\)"),
    (lambda: layers.conv2d(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 4, 2)), groups=0), "groups must be a positive"),
    (lambda: layers.max_pool2d(jnp.ones((1, 6, 6, 2)), 3, padding=(1, 1, 1)), r"padding must .* got \(1, 1, 1\)"),
    (lambda: layers.avg_pool2d(jnp.ones((1, 6, 6, 2)), 2, padding="same"), "padding must .* got 'same'"),
    (lambda: layers.max_pool2d(jnp.ones((1, 7, 7, 1)), 3, 1, 0, 1, 2), "ceil_mode must be True or False, got 2"),
    (lambda: layers.roi_max_pool(jnp.ones((5, 5, 1)), jnp.zeros((1, 4)), 0), "output_size must be positive"),
    (lambda: layers.batch_norm(jnp.ones((2, 4, 4, 3)), jnp.ones(1), *[jnp.ones(3)] * 3, train=True),
     r"gamma must have one value per channel, shape \(3,\) for input \(2, 4, 4, 3\)"),
    (lambda: layers.softmax_cross_entropy(jnp.ones((4, 5)), jnp.array([0.0, 1, 2, 3])), "integer class indices"),
    (lambda: layers.softmax_cross_entropy_probs(jnp.ones((4, 5)), jnp.array([0, 1, 2, 3])),
     r"probs of shape \(4,\) do not match logits of shape \(4, 5\)"),
    # a broadcast mean, settings taken as true or as numbers, and tracebacks
    (lambda: layers.mse(np.arange(4.0).reshape(4, 1), np.arange(4.0)), r"one shape, got \(4, 1\) and \(4,\)"),
    (lambda: layers.batch_norm(jnp.ones((2, 3)), *[jnp.ones(3)] * 4, train="False"), "train must be True or False"),
    (lambda: layers.batch_norm(jnp.ones((2, 3)), *[jnp.ones(3)] * 4, True, momentum=2.0), r"momentum .* in \[0, 1\]"),
    (lambda: layers.batch_norm(jnp.ones((2, 3)), *[jnp.ones(3)] * 4, True, momentum="0.1"), "momentum must be"),
    (lambda: layers.batch_norm(jnp.ones((2, 3)), *[jnp.ones(3)] * 4, False, eps=-1.0), "eps must be a number, 0"),
    (lambda: layers.avg_pool2d(jnp.ones((1, 4, 4, 1)), 2, count_include_pad=3), "count_include_pad must be True"),
    (lambda: layers.roi_max_pool(jnp.ones((5, 5, 1)), jnp.array([[np.nan, 0, 3, 3]]), 2), "boxes must be finite"),
    (lambda: layers.softmax_cross_entropy(jnp.ones((3, 4)), jnp.array([0.0, np.nan, 2.0])), "integer class indices"),
    (lambda: layers.softmax_cross_entropy(jnp.ones(()), jnp.zeros((), int)), "logits must have a class axis"),
    (lambda: layers.conv2d(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 2)), groups=2),
     r"kernel \(3, 3, 3, 2\) with 2 groups does not fit 3 input channels")])
def test_bad_input_is_one_clear_error(call, message):
    """Shapes and values torch refuses (or that would give a silent wrong number) are UsageErrors naming them;
    they were unpacking errors, a cross-entropy averaged over a broadcast, and a NaN running variance."""
    with pytest.raises(UsageError, match=message):
        call()


def test_layers_take_nested_lists_as_torch_takes_tensors():
    image = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    kernel = np.ones((2, 2, 1, 1), np.float32)
    for layer, args in ((layers.conv2d, (kernel,)), (layers.conv_transpose2d, (kernel,)), (layers.max_pool2d, (2,)),
                        (layers.avg_pool2d, (2,)), (layers.flatten, ())):
        listed = [a.tolist() if isinstance(a, np.ndarray) else a for a in args]
        np.testing.assert_array_equal(layer(image.tolist(), *listed), layer(jnp.asarray(image), *args))


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on its own speed
def test_named_padding_is_torchs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 7, 6, 2)).astype(np.float32), rng.standard_normal((4, 3, 2, 3)).astype(np.float32)
    for padding, dilation in (("same", 1), ("same", 2), ("valid", 1)):
        expected = torch.nn.functional.conv2d(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(w).permute(3, 2, 0, 1),
                                              padding=padding, dilation=dilation).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(layers.conv2d(x, w, padding=padding, dilation=dilation), expected, atol=1e-5)


@pytest.mark.parametrize("args", [(3, 2, 1), (2, 2, 0, 1, True), (3, 1, 1, 2), ((1, 2), 1)])
def test_max_pool_gradient_goes_where_torchs_goes_with_nans_and_infinities(args):
    """torch's kernel keeps a window's last NaN (`val > max || isnan(val)`) and, where every pixel is -inf, its
    first pixel in the image; the gradient went to the first NaN, and to the padding (lost) before."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((2, 7, 7, 3)).astype(np.float32)
    x[x > 1.2], x[x < -1.0] = np.nan, -np.inf
    x[0, :3, :3] = -np.inf  # windows of -inf only, with padding
    x[1, 0, :4] = np.nan  # several NaNs in a window
    grad = jax.grad(lambda a: layers.max_pool2d(a, *args).sum())(jnp.asarray(x))
    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    torch.nn.functional.max_pool2d(xt, *args).sum().backward()
    np.testing.assert_array_equal(grad, xt.grad.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("size", [2, 12, 17, 32])
def test_the_training_networks_pools_match_torch_up_to_global_pooling(size):
    """The first maximum's index was int8: a 12x12 window's members past 127 and a 32x32 (global) window's
    wrapped, and the gradient went to 4 pixels of each 32x32 window (8.0 against torch's 2.0)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 2)).astype(np.float32)
    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    torch.nn.functional.max_pool2d(xt, size).sum().backward()
    for pool in (lambda a: pooling.max_pool(a, size), lambda a: pooling.max_pool_strided(a, size, size, 0)):
        np.testing.assert_array_equal(jax.grad(lambda a: pool(a).sum())(x), xt.grad.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("pool, message", [
    (lambda x: pooling.max_pool(x, 5), "a 5x5 window is larger than the 4x4 input"),  # was 0x0 out
    (lambda x: pooling.max_pool_strided(x, 3, 2, 2), "the padding at most half the window"),  # -inf out
    (lambda x: pooling.max_pool(x, (2, 2)), r"a square window, its stride and padding as ints, got window \(2, 2\)"),
    (lambda x: pooling.max_pool_strided(x, 2, 0, 0), "window 2, stride 0, padding 0: the window and stride are at"),
    (lambda x: pooling.max_pool(x[0], 2), r"takes \(N, H, W, C\) arrays, got shape \(4, 4, 1\)")])
def test_the_training_networks_pools_refuse_what_torch_refuses(pool, message):
    with pytest.raises(ValueError, match=message):
        pool(jnp.ones((1, 4, 4, 1)))


def test_max_pooling_keeps_a_nan_as_torch_does():
    """A NaN activation must reach the loss: the training networks' pools dropped it when it was not a window's
    first member (the comparison was `>`), so a blown-up run could show a finite loss."""
    from flaxlab import pooling
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 1)).astype(np.float32)
    x[0, 1, 1, 0] = np.nan
    for pool in (lambda a: pooling.max_pool(a, 2), lambda a: pooling.max_pool_strided(a, 2, 2, 0),
                 lambda a: layers.max_pool2d(a, 2)):
        assert np.isnan(pool(x)[0, 0, 0, 0]) and not np.isnan(pool(x)[0, 1, 1, 0])
        assert np.isnan(jax.vjp(pool, x)[0][0, 0, 0, 0])  # the forward pass the gradient is taken on


def _c_round(v):
    """C's round(): halves away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def roi_pool_loop(features, boxes, output_size):
    """torchvision's roi_pool CPU kernel (spatial_scale 1) transcribed as loops: the output and the gradient
    of sum(output * weights) would go to each bin's first maximum in row-major order."""
    height, width, channels = features.shape
    oh, ow = output_size
    out = np.zeros((len(boxes), oh, ow, channels), np.float32)
    argmax = np.full(out.shape, -1)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        start_w, start_h, end_w, end_h = map(_c_round, (x1, y1, x2, y2))
        bin_h = np.float32(max(end_h - start_h + 1, 1)) / np.float32(oh)
        bin_w = np.float32(max(end_w - start_w + 1, 1)) / np.float32(ow)
        for ph in range(oh):
            for pw in range(ow):
                hstart = min(max(int(np.floor(np.float32(ph) * bin_h)) + start_h, 0), height)
                hend = min(max(int(np.ceil(np.float32(ph + 1) * bin_h)) + start_h, 0), height)
                wstart = min(max(int(np.floor(np.float32(pw) * bin_w)) + start_w, 0), width)
                wend = min(max(int(np.ceil(np.float32(pw + 1) * bin_w)) + start_w, 0), width)
                empty = hend <= hstart or wend <= wstart
                for c in range(channels):
                    best, where = (0.0, -1) if empty else (np.finfo(np.float32).min, -1)  # -FLT_MAX
                    for h in range(hstart, hend):
                        for w in range(wstart, wend):
                            if features[h, w, c] > best:
                                best, where = features[h, w, c], h * width + w
                    out[k, ph, pw, c], argmax[k, ph, pw, c] = best, where
    return out, argmax


BOXES = np.array([[0, 0, 10, 8], [1.4, 2.5, 6.6, 4.4], [3, 3, 3, 3], [8, 6, 14, 12], [20, 20, 25, 25],
                  [-0.5, -3, 2.5, 1.5], [5, 5, 2, 1], [0.5, 1.5, 9.5, 7.49]], np.float32)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "relu-ties"])
@pytest.mark.parametrize("output_size", [(2, 3), (3, 3), (1, 1), (4, 2), (7, 7)])
def test_roi_max_pool_matches_torchvision_definition(output_size, ties):
    """Values, and gradients, which go wholly to each bin's first maximum: after a ReLU many bins tie at 0
    (a plain max split the gradient between them)."""
    rng = np.random.default_rng(5)
    features = rng.standard_normal((9, 11, 2)).astype(np.float32)
    features = np.maximum(features - 1, 0) if ties else features
    expected, argmax = roi_pool_loop(features, BOXES, output_size)
    pool = jax.jit(layers.roi_max_pool, static_argnums=2)
    np.testing.assert_array_equal(pool(jnp.asarray(features), jnp.asarray(BOXES), output_size), expected)
    weights = rng.standard_normal(expected.shape).astype(np.float32)
    grad = jax.grad(lambda f: (pool(f, jnp.asarray(BOXES), output_size) * weights).sum())(jnp.asarray(features))
    expected_grad = np.zeros((features.shape[0] * features.shape[1], features.shape[2]), np.float32)
    for (k, ph, pw, c), where in np.ndenumerate(argmax):
        if where >= 0:
            expected_grad[where, c] += weights[k, ph, pw, c]
    np.testing.assert_allclose(grad, expected_grad.reshape(features.shape), atol=TOLERANCE)


@pytest.mark.parametrize("bins", [7, 14])
def test_roi_bins_are_torchvisions_float32_ones(bins):
    """torchvision computes a bin's rows in float32: 57 rows in 7 bins end at row 57 (7 * float32(57 / 7) is
    57.000004), one more than exact arithmetic gives; 16 of the extents 1-512 differ so in 7 bins."""
    features = np.random.default_rng(1).standard_normal((600, 1, 1)).astype(np.float32)
    boxes = np.array([[0, 0, 0, extent - 1] for extent in range(1, 513)], np.float32)
    expected, _ = roi_pool_loop(features, boxes, (bins, 1))
    np.testing.assert_array_equal(jax.jit(layers.roi_max_pool, static_argnums=2)(features, boxes, (bins, 1)), expected)


def test_roi_max_pool_passes_over_nan_and_minus_inf_as_torchvision():
    """torchvision keeps a pixel only if it beats the maximum so far, which starts at -FLT_MAX."""
    features = np.array([[1, np.nan], [3, 2], [-np.inf, -np.inf]], np.float32)[..., None]
    boxes = np.array([[0, 0, 1, 1], [0, 2, 1, 2]], np.float32)
    expected, argmax = roi_pool_loop(features, boxes, (1, 1))
    np.testing.assert_array_equal(layers.roi_max_pool(features, boxes, 1), expected)
    np.testing.assert_array_equal(expected.ravel(), [3, np.finfo(np.float32).min])
    grad = jax.grad(lambda f: layers.roi_max_pool(f, boxes, 1).sum())(jnp.asarray(features))
    np.testing.assert_array_equal(grad.ravel(), [0, 0, 1, 0, 0, 0])  # none for the -FLT_MAX bin (argmax -1)


def test_max_pool2d_takes_torchs_positional_order():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((1, 7, 7, 1)).astype(np.float32)
    expected = torch.nn.functional.max_pool2d(torch.tensor(x).permute(0, 3, 1, 2), 3, 1, 0, 2, True)
    np.testing.assert_array_equal(layers.max_pool2d(x, 3, 1, 0, 2, True), expected.permute(0, 2, 3, 1).numpy())


def test_batch_norm_inference_uses_running_stats_and_keeps_them():
    x = jnp.full((3, 2), 5.0)
    y, mean, var = layers.batch_norm(x, jnp.ones(2), jnp.zeros(2), jnp.full(2, 1.0), jnp.full(2, 4.0), train=False,
                                     eps=0.0)
    np.testing.assert_allclose(y, 2.0)
    np.testing.assert_array_equal(np.stack([mean, var]), [[1, 1], [4, 4]])
