"""Shape arithmetic (`flaxlab.shapes`): TDT4265 task 1c-1f, PyTorch's sizes, and errors for nonsense."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab import layers, shapes
from flaxlab.errors import UsageError


def test_tdt4265_1c_padding_two_keeps_size_of_5x5_kernel():
    assert shapes.same_padding(5) == 2
    assert shapes.conv_output_size(512, 5, stride=1, padding=2) == 512


def test_tdt4265_1d_9x9_kernel_maps_512_to_504():
    assert shapes.conv_output_size(512, 9) == 504
    assert shapes.kernel_for_output(512, 504) == 9


def test_tdt4265_1e_2x2_pooling_stride_2_halves_504():
    assert shapes.pool_output_size(504, 2, stride=2) == 252
    assert shapes.pool_output_size(504, 2) == 252  # stride defaults to the kernel


def test_tdt4265_1f_3x3_kernel_maps_252_to_250():
    assert shapes.conv_output_size(252, 3) == 250
    assert shapes.kernel_for_output(252, 250) == 3


@pytest.mark.parametrize("size,kernel,stride,padding,dilation", [
    (7, 3, 2, 1, 1), (8, 3, 2, 1, 1), (9, 4, 3, 0, 1), (9, 3, 1, 2, 2), (5, 5, 1, 0, 1), (6, 2, 3, 1, 2)])
def test_conv_output_size_matches_layer(size, kernel, stride, padding, dilation):
    out = layers.conv2d(jnp.ones((1, size, size, 1)), jnp.ones((kernel, kernel, 1, 1)), stride, padding, dilation)
    assert out.shape[1] == shapes.conv_output_size(size, kernel, stride, padding, dilation)


@pytest.mark.parametrize("size,kernel,stride,padding,ceil_mode,expected", [
    (7, 3, 2, 1, False, 4), (8, 3, 2, 1, False, 4), (8, 3, 2, 1, True, 5), (5, 2, 2, 0, False, 2),
    (5, 2, 2, 0, True, 3), (6, 3, 2, 1, True, 4),
    (5, 2, 2, 1, True, 3)])  # ceil would give 4, but the 4th window would start in the right padding
def test_pool_output_size_follows_torch(size, kernel, stride, padding, ceil_mode, expected):
    assert shapes.pool_output_size(size, kernel, stride, padding, ceil_mode=ceil_mode) == expected


def test_pool_output_size_agrees_with_torch_on_a_grid():
    """Sizes and refusals: torch's padding limit is half the kernel, not its dilated span, and with ceil_mode a
    window larger than the padded input still gives one output."""
    torch = pytest.importorskip("torch", reason="torch is the reference for pooling sizes")
    for size, kernel, stride, dilation, ceil_mode in itertools.product(range(1, 9), (2, 3, 4), (1, 2, 3), (1, 2),
                                                                      (False, True)):
        for padding in range(kernel // 2 + 2):
            try:
                expected = torch.nn.functional.max_pool2d(torch.zeros(1, 1, size, size), kernel, stride, padding,
                                                          dilation, ceil_mode=ceil_mode).shape[-1]
            except RuntimeError:
                expected = None
            try:
                ours = shapes.pool_output_size(size, kernel, stride, padding, dilation, ceil_mode)
            except UsageError:
                ours = None
            assert ours == expected, (size, kernel, stride, padding, dilation, ceil_mode)


def test_numpy_integers_are_sizes_too():
    assert shapes.conv_output_size(np.int64(28), np.int32(3), padding=np.int64(1)) == 28
    assert shapes.pool_output_size(np.int64(28), 2) == 14


@pytest.mark.parametrize("size,kernel,stride,padding,output_padding,dilation,expected", [
    (4, 3, 2, 1, 1, 1, 8), (3, 4, 2, 1, 0, 1, 6), (4, 3, 1, 0, 0, 2, 8), (3, 2, 3, 0, 2, 1, 10)])
def test_conv_transpose_output_size(size, kernel, stride, padding, output_padding, dilation, expected):
    assert shapes.conv_transpose_output_size(size, kernel, stride, padding, output_padding, dilation) == expected
    x = jnp.ones((1, size, size, 1))
    y = layers.conv_transpose2d(x, jnp.ones((kernel, kernel, 1, 1)), stride, padding, output_padding, dilation)
    assert y.shape[1] == expected


@pytest.mark.parametrize("kernel,dilation,expected", [(1, 1, 0), (3, 1, 1), (5, 1, 2), (7, 1, 3), (3, 2, 2),
                                                      (2, 2, 1)])
def test_same_padding_keeps_size(kernel, dilation, expected):
    assert shapes.same_padding(kernel, dilation) == expected
    assert shapes.conv_output_size(10, kernel, 1, expected, dilation) == 10


@pytest.mark.parametrize("kernel", [2, 4])
def test_same_padding_of_even_kernel_is_impossible(kernel):
    with pytest.raises(ValueError, match="cannot keep the size"):
        shapes.same_padding(kernel)


@pytest.mark.parametrize("in_size,out_size,stride,padding,dilation,expected", [
    (28, 28, 1, 1, 1, 3), (28, 14, 2, 0, 1, 2), (9, 5, 1, 0, 2, 3), (7, 3, 2, 0, 1, 3), (8, 3, 2, 0, 1, 4)])
def test_kernel_for_output(in_size, out_size, stride, padding, dilation, expected):
    kernel = shapes.kernel_for_output(in_size, out_size, stride, padding, dilation)
    assert kernel == expected
    assert shapes.conv_output_size(in_size, kernel, stride, padding, dilation) == out_size


@pytest.mark.parametrize("in_size,out_size,stride,dilation", [(10, 11, 1, 1), (10, 7, 1, 2), (10, 3, 2, 3)])
def test_kernel_for_output_without_solution(in_size, out_size, stride, dilation):
    # 11 > 10 without padding; 10 -> 7 needs a span of 4, but dilation 2 spans only odd widths; at stride 2 and
    # dilation 3 the spans 1, 4, 7, 10 give 5, 4, 2, 1 outputs, never 3.
    with pytest.raises(ValueError, match="no kernel maps"):
        shapes.kernel_for_output(in_size, out_size, stride, dilation=dilation)


@pytest.mark.parametrize("call", [
    lambda: shapes.conv_output_size(0, 3), lambda: shapes.conv_output_size(5, 0),
    lambda: shapes.conv_output_size(5, 3, stride=0), lambda: shapes.conv_output_size(5, 3, padding=-1),
    lambda: shapes.conv_output_size(2, 5), lambda: shapes.conv_output_size(5.0, 3),
    lambda: shapes.pool_output_size(4, 2, padding=2), lambda: shapes.pool_output_size(-1, 2),
    lambda: shapes.conv_transpose_output_size(3, 3, stride=2, output_padding=2),
    lambda: shapes.conv_transpose_output_size(1, 1, padding=1),
    lambda: shapes.kernel_for_output(0, 3), lambda: shapes.kernel_for_output(5, 0),
    lambda: shapes.same_padding(0), lambda: shapes.conv_output_size(5, 3, padding="same"),
    lambda: shapes.pool_output_size(5, 2, ceil_mode="no"),
    lambda: shapes.conv_transpose_output_size(5, 3, padding=True),
    lambda: shapes.conv_transpose_output_size(5, 3, stride=2, output_padding=True)])
def test_nonsense_is_a_usage_error(call):
    with pytest.raises(UsageError):
        call()
