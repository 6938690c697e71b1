"""Model inspection: layer names in call order, layer outputs against hand computations, and the figures."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from flaxlab import plots
from flaxlab.errors import UsageError
from flaxlab.inspect_model import conv_layer_names, first_conv_kernel, layer_names, layer_output
from flaxlab.models import Conv, make_model


def _random_variables(model, input_shape, seed=0):
    """Variables of the init's shapes, drawn in numpy: an eager flax init of the all-conv net takes ~8 s here."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        bound = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.5
        return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
    return jax.tree_util.tree_map(draw, shapes)


def _built(name, num_classes, input_shape, seed=0):
    model = make_model({"name": name}, num_classes)
    variables = _random_variables(model, input_shape, seed)
    image = np.random.default_rng(seed).integers(0, 256, input_shape, dtype=np.uint8)
    return model, variables, image


@pytest.fixture(scope="module")
def gtsrb():
    return _built("gtsrb_cnn", 43, (28, 28, 3))


@pytest.fixture(scope="module")
def allconv_bn():
    """With running stats that are not the init's 0 and 1, so using them (not batch stats) shows."""
    model, variables, image = _built("bs6207_allconv_bn", 10, (32, 32, 3))
    rng = np.random.default_rng(7)
    stats = {layer: {"mean": rng.normal(size=s["mean"].shape).astype(np.float32),
                     "var": rng.uniform(0.5, 2.0, s["var"].shape).astype(np.float32)}
             for layer, s in variables["batch_stats"].items()}
    return model, {**variables, "batch_stats": stats}, image


@pytest.fixture(scope="module")
def small_cnn():
    return _built("small_cnn", 10, (28, 28, 1))


def _hand_conv(image_hwc, kernel, bias, padding):
    x = jnp.asarray(image_hwc, jnp.float32)[None] / 255.0
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y + bias)[0]


def test_conv_layer_names_in_call_order():
    assert conv_layer_names(make_model({"name": "gtsrb_cnn"}, 43), (28, 28, 3)) == ["Conv_0", "Conv_1", "Conv_2"]
    assert conv_layer_names(make_model({"name": "bs6207_allconv_bn"}, 10), (32, 32, 3)) == [
        f"Conv_{i}" for i in range(8)]
    assert conv_layer_names(make_model({"name": "mlp"}, 10), (28, 28, 1)) == []


def test_layer_names_in_call_order(gtsrb, allconv_bn):
    model, variables, _ = gtsrb
    assert layer_names(model, variables, (28, 28, 3)) == [
        "Conv_0", "Activation_0", "Conv_1", "Activation_1", "MaxPool_0", "Conv_2", "Activation_2", "MaxPool_1",
        "Flatten_0", "Dense_0"]
    model, variables, _ = allconv_bn
    assert layer_names(model, variables, (32, 32, 3))[:7] == [
        "Conv_0", "BatchNorm_0", "Activation_0", "Conv_1", "BatchNorm_1", "Activation_1", "MaxPool_0"]


def test_first_conv_output_is_the_convolution(gtsrb, allconv_bn):
    for (model, variables, image), padding in ((gtsrb, 0), (allconv_bn, 1)):
        conv = variables["params"]["Conv_0"]
        got = layer_output(model, variables, image, "Conv_0")
        assert isinstance(got, np.ndarray)
        chex.assert_trees_all_close(got, _hand_conv(image, conv["kernel"], conv["bias"], padding), atol=1e-5)


def test_batch_norm_output_uses_running_stats(allconv_bn):
    model, variables, image = allconv_bn
    conv = layer_output(model, variables, image, "Conv_0")
    norm, stats = variables["params"]["BatchNorm_0"], variables["batch_stats"]["BatchNorm_0"]
    expected = (conv - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * norm["scale"] + norm["bias"]
    chex.assert_trees_all_close(layer_output(model, variables, image, "BatchNorm_0"), expected, atol=1e-5)


def test_uint8_images_are_scaled_as_in_training(gtsrb):
    model, variables, image = gtsrb
    chex.assert_trees_all_close(layer_output(model, variables, image, "Conv_1"),
                                layer_output(model, variables, image.astype(np.float32) / 255, "Conv_1"), atol=1e-5)


@pytest.mark.parametrize("layer,shape", [("Conv_1", (20, 20, 32)), ("MaxPool_0", (10, 10, 32)),
                                         ("Conv_2", (8, 8, 32)), ("Dense_0", (43,))])
def test_deeper_layer_shapes(gtsrb, layer, shape):
    model, variables, image = gtsrb
    chex.assert_shape(layer_output(model, variables, image, layer), shape)


def test_deeper_layer_shapes_with_batch_norm(allconv_bn):
    model, variables, image = allconv_bn
    chex.assert_shape(layer_output(model, variables, image, "Conv_2"), (16, 16, 32))
    chex.assert_shape(layer_output(model, variables, image, "Activation_7"), (4, 4, 128))


def test_unknown_layer_lists_the_valid_ones(gtsrb):
    model, variables, image = gtsrb
    with pytest.raises(UsageError, match="unknown layer 'Conv_9'; valid layers: Conv_0, Activation_0, .*Dense_0$"):
        layer_output(model, variables, image, "Conv_9")


def test_layer_output_takes_one_image(gtsrb):
    model, variables, image = gtsrb
    with pytest.raises(UsageError, match="one HWC image"):
        layer_output(model, variables, image[None], "Conv_0")


class _Block(nn.Module):
    """Python builds the outer Conv (Conv_0) before the inner one (Conv_1) it is applied to, so Conv_1 runs first."""

    @nn.compact
    def __call__(self, x):
        return nn.relu(Conv(4, 3, padding=1)(nn.relu(Conv(4, 3, padding=1)(x))))


class _Nested(nn.Module):
    """Convolutions inside a composite layer and at the top, to pin the name format and the call order."""

    @nn.compact
    def __call__(self, x, train=False):
        x = _Block()(Conv(4, 3)(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_nested_layers_are_paths_in_call_order():
    model = _Nested()
    assert conv_layer_names(model, (8, 8, 3)) == ["Conv_0", "_Block_0/Conv_1", "_Block_0/Conv_0"]
    variables = _random_variables(model, (8, 8, 3))
    assert layer_names(model, variables, (8, 8, 3)) == [
        "Conv_0", "_Block_0", "_Block_0/Conv_1", "_Block_0/Conv_0", "Dense_0"]
    image = np.random.default_rng(0).uniform(size=(8, 8, 3)).astype(np.float32)
    conv = variables["params"]["_Block_0"]["Conv_0"]
    outer_input = jax.nn.relu(layer_output(model, variables, image, "_Block_0/Conv_1"))
    expected = jax.lax.conv_general_dilated(outer_input[None], conv["kernel"], (1, 1), [(1, 1)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0] + conv["bias"]
    chex.assert_trees_all_close(layer_output(model, variables, image, "_Block_0/Conv_0"), expected, atol=1e-5)


class _Outer(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return Conv(2, 3)(Conv(3, 3)(x))  # Conv_1 (3 maps) runs first


def test_first_conv_kernel_follows_call_order_given_the_names():
    model = _Outer()
    params = _random_variables(model, (8, 8, 1))["params"]
    chex.assert_shape(first_conv_kernel(params, conv_layer_names(model, (8, 8, 1))), (3, 3, 1, 3))
    chex.assert_shape(first_conv_kernel(params), (3, 3, 3, 2))  # by number alone: the documented limit


def test_first_conv_kernel(gtsrb, small_cnn):
    _, variables, _ = gtsrb
    kernel = first_conv_kernel(variables["params"])
    chex.assert_shape(kernel, (5, 5, 3, 64))
    np.testing.assert_array_equal(kernel, variables["params"]["Conv_0"]["kernel"])
    chex.assert_shape(first_conv_kernel(small_cnn[1]), (3, 3, 1, 8))  # the whole variables dict works too


def test_first_conv_kernel_orders_by_number_not_text():
    kernels = {f"Conv_{i}": {"kernel": np.full((3, 3, 1, 2), i, np.float32)} for i in (10, 2, 11)}
    params = {"Dense_0": {"kernel": np.zeros((4, 2))}, **kernels}  # as sorted as text, not call order
    assert first_conv_kernel(params)[0, 0, 0, 0] == 2
    assert first_conv_kernel(params, conv_names=["Conv_11", "Conv_2"])[0, 0, 0, 0] == 11


def test_first_conv_kernel_without_convolution():
    params = _random_variables(make_model({"name": "mlp"}, 10), (28, 28, 1))["params"]
    with pytest.raises(UsageError, match="no convolution"):
        first_conv_kernel(params)


def _png_size(path):
    assert path.stat().st_size > 0
    with Image.open(path) as png:
        assert png.format == "PNG"
        return png.size


@pytest.mark.parametrize("shape", [(5, 5, 3, 64), (3, 3, 1, 8), (3, 3, 8, 16), (3, 3, 3, 1)])
def test_filter_grid_writes_png(tmp_path, shape):
    kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    kernel[..., 0] = 0.5  # a constant filter must not divide by zero
    width, height = _png_size(plots.filter_grid(kernel, tmp_path / "filters.png", "filters"))
    assert width > 0 and height > 0
    assert plt.get_fignums() == []


def test_filter_grid_of_trained_kernels(tmp_path, gtsrb, small_cnn):
    for _, variables, _ in (gtsrb, small_cnn):
        assert min(_png_size(plots.filter_grid(first_conv_kernel(variables), tmp_path / "f.png", "first"))) > 0


def test_feature_maps_figure_writes_png(tmp_path, gtsrb, small_cnn):
    for model, variables, image in (gtsrb, small_cnn):
        maps = layer_output(model, variables, image, "Conv_0")
        path = plots.feature_maps_figure(image, maps, tmp_path / "maps.png", "maps")
        assert min(_png_size(path)) > 0
        float_image = image.astype(np.float32) / 255
        few = plots.feature_maps_figure(float_image, maps, tmp_path / "few.png", "maps", max_maps=3)
        assert _png_size(few)[1] < _png_size(path)[1]  # 2 rows of panels instead of 3 (8 maps) or 9 (64)
    assert plt.get_fignums() == []


def test_feature_maps_figure_needs_hwc_maps(tmp_path, gtsrb):
    model, variables, image = gtsrb
    with pytest.raises(UsageError, match=r"\(H, W, C\)"):
        plots.feature_maps_figure(image, layer_output(model, variables, image, "Dense_0"), tmp_path / "x.png", "x")
