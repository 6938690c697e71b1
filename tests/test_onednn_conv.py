"""oneDNN convolutions on XLA:CPU (flaxlab.onednn_conv): lax's values and gradients, alone, jitted and vmapped
over stacked models; where the path is taken; XLA's convolution in programs split over devices."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from flaxlab import models, onednn_conv

needs_onednn = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not onednn_conv.available(),
    reason=f"oneDNN convolutions need XLA:CPU on x86 and jaxlib {' or '.join(onednn_conv.TESTED_JAXLIB)}")


def _lax(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _close(actual, expected):
    """float32 agreement relative to the largest value: two convolution algorithms round differently."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=2e-5 * np.abs(expected).max())


def _check(ours, reference, args):
    loss = lambda f: lambda *a: (jnp.sin(f(*a)) ** 2).sum()  # noqa: E731
    _close(jax.jit(ours)(*args), reference(*args))
    for a, b in zip(jax.jit(jax.grad(loss(ours), (0, 1)))(*args), jax.grad(loss(reference), (0, 1))(*args)):
        _close(a, b)


SHAPES = [((4, 12, 12, 3), 3, 8, 1), ((4, 12, 10, 32), 5, 8, 0), ((4, 12, 12, 32), 5, 8, 2), ((2, 7, 9, 5), 3, 6, 2),
          ((3, 6, 6, 16), 1, 4, 0)]


@needs_onednn
@pytest.mark.parametrize("x_shape,size,features,padding", SHAPES)
def test_values_and_gradients_match_lax(x_shape, size, features, padding):
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = 0.1 * jax.random.normal(jax.random.key(1), (size, size, x_shape[-1], features))
    ours = lambda x, k: onednn_conv.conv(x, k, padding)  # noqa: E731
    reference = lambda x, k: _lax(x, k, padding)  # noqa: E731
    _check(ours, reference, (x, kernel))
    _close(ours(x, kernel), reference(x, kernel))  # outside jit too
    assert "__onednn$convolution" in jax.jit(ours).lower(x, kernel).as_text()


@needs_onednn
@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 0)])
def test_stacked_models_match_lax(in_axes):
    """vmap over models: stacked images and kernels, images only (folded into the batch), kernels only."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 9, 9, 4))
    kernels = 0.1 * jax.random.normal(jax.random.key(1), (2, 3, 3, 4, 5))
    args = tuple(a if axis == 0 else a[0] for a, axis in zip((x, kernels), in_axes))
    _check(jax.vmap(lambda x, k: onednn_conv.conv(x, k, 1), in_axes),
           jax.vmap(lambda x, k: _lax(x, k, 1), in_axes), args)


@needs_onednn
@pytest.mark.parametrize("apart_min_size,parts_max_product,conditionals,parts", [
    (0, 0, 2, 1),  # transposed apart from their producers, one convolution
    (1 << 30, 1 << 30, 0, 2),  # XLA's transposes, the convolution in two shares of the input features
])
def test_kernel_gradient_matches_lax(apart_min_size, parts_max_product, conditionals, parts, monkeypatch):
    """The kernel gradient's operands transposed inside conditionals (XLA would fuse a ReLU into a strided
    transpose) or not, the convolution whole or split over the input features (Eigen runs small ones on one
    thread): lax's values, alone, for stacked models and differentiated again."""
    monkeypatch.setattr(onednn_conv, "APART_MIN_SIZE", apart_min_size)
    monkeypatch.setattr(onednn_conv, "PARTS_MAX_PRODUCT", parts_max_product)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (3, 4, 9, 9, 6)))
    grad = jax.random.normal(jax.random.key(1), (3, 4, 9, 9, 5))
    ours = jax.jit(lambda x, g: onednn_conv._kernel_grad(x, g, 1))
    reference = lambda x, g: jax.vjp(lambda k: _lax(x, k, 1), jnp.zeros((3, 3, 6, 5)))[1](g)[0]  # noqa: E731
    _close(ours(x[0], grad[0]), reference(x[0], grad[0]))
    hlo = ours.lower(x[0], grad[0]).compile().as_text()
    assert (hlo.count("conditional("), hlo.count(" convolution(")) == (conditionals, parts)
    _close(jax.jit(jax.vmap(ours))(x, grad), jax.vmap(reference)(x, grad))
    second = lambda f: jax.grad(lambda x: (jnp.sin(f(x, grad[0])) ** 2).sum())  # noqa: E731
    _close(jax.jit(second(ours))(x[0]), second(reference)(x[0]))


@needs_onednn
def test_kernel_gradient_paths_by_size():
    """Large images or output gradients get the conditionals; small kernel-gradient products with small output
    gradients are split over the cores; the GTSRB CNN's 64 -> 32 5x5 one (Eigen threads it) and the U-Net's
    (33 MB output gradients) stay whole."""
    assert onednn_conv._kernel_grad_parts(64, 25, 32, 64 * 20 * 20 * 32) == 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert onednn_conv._kernel_grad_parts(16, 9, 16, 32 * 32 * 32 * 16) == min(16, cores)
    assert onednn_conv._kernel_grad_parts(16, 9, 16, 8 * 256 * 256 * 16) == 1
    kernel_grad = jax.jit(jax.grad(lambda k, x: (onednn_conv.conv(x, k, 1) ** 2).sum()))
    kernel = jnp.zeros((3, 3, 6, 5))
    small, large = jnp.ones((4, 9, 9, 6)), jnp.ones((8, 128, 64, 6))
    assert small.size < onednn_conv.APART_MIN_SIZE <= large.size
    assert "conditional(" not in kernel_grad.lower(kernel, small).compile().as_text()
    parts = onednn_conv._kernel_grad_parts(6, 9, 5, large.size // 6 * 5)  # each part's images sliced, then apart
    assert kernel_grad.lower(kernel, large).compile().as_text().count("conditional(") == 1 + parts


@needs_onednn
@pytest.mark.parametrize("devices", [1, 3])
def test_model_convs_take_the_path_where_it_applies(devices, monkeypatch):
    """Every stride-1 fp32 conv of the all-conv net and the GTSRB CNN is a oneDNN call: 8 forward and 7 input-
    gradient convs (the first layer's input gradient is dropped) in the all-conv step; with models side by
    side on several CPU devices the GTSRB CNN's 64->32 5x5 conv (forward and input gradient) keeps the FFT."""
    monkeypatch.setattr(jax, "local_device_count", lambda: devices)
    gtsrb_calls = 5 if devices == 1 else 3
    for name, shape, classes, calls in (("bs6207_allconv", (32, 32, 3), 10, 15),
                                        ("gtsrb_cnn", (28, 28, 3), 43, gtsrb_calls)):
        model = models.make_model({"name": name}, classes)
        x = jnp.zeros((2, *shape))
        params = model.init(jax.random.key(0), x)["params"]
        loss = lambda p, x: model.apply({"params": p}, x).sum()  # noqa: E731
        hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
        assert hlo.count('custom_call_target="__onednn$convolution"') == calls, name
    kernel = jnp.zeros((3, 3, 8, 16))
    assert onednn_conv.applies(jnp.zeros((2, 8, 8, 8)), kernel, 1, 1)
    assert not onednn_conv.applies(jnp.zeros((2, 8, 8, 8)), kernel, 2, 1)  # strided
    assert not onednn_conv.applies(jnp.zeros((2, 8, 8, 8)), kernel, 1, 3)  # padding past the kernel's size less one
    assert not onednn_conv.applies(jnp.zeros((2, 8, 8, 8), jnp.bfloat16), kernel.astype(jnp.bfloat16), 1, 1)
    assert not onednn_conv.applies(jnp.zeros((2, 8, 8, 8)), jnp.zeros((3, 5, 8, 16)), 1, 1)  # not square
    assert not onednn_conv.applies(jnp.zeros((2, 2, 8, 8)), kernel, 1, 0)  # no output


@needs_onednn
def test_torchvision_resnet_convs_take_the_path_where_it_applies():
    """ResNet-18 (flaxlab.pretrained) in a training step: its 13 stride-1 3x3 convs are oneDNN calls, forward and
    input gradient; the 7x7/2 stem, the three 3x3/2 convs and the three 1x1/2 shortcuts stay XLA's."""
    from flaxlab import pretrained
    model = pretrained.ResNet18(10, input_size=0)
    x = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    loss = lambda p, x: model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])[0].sum()  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile().as_text()
    assert hlo.count('custom_call_target="__onednn$convolution"') == 2 * 13


def test_only_checked_jaxlibs_on_x86_and_not_when_switched_off(monkeypatch):
    """The custom call's configuration is read differently by other XLA versions (and a wrong one aborts)."""
    import jaxlib
    onednn_conv.available.cache_clear()
    try:
        monkeypatch.setattr(jaxlib, "__version__", "0.99.0")
        assert not onednn_conv.available()
        onednn_conv.available.cache_clear()
        monkeypatch.setattr(jaxlib, "__version__", onednn_conv.TESTED_JAXLIB[0])
        monkeypatch.setattr("platform.machine", lambda: "arm64")
        assert not onednn_conv.available()
        onednn_conv.available.cache_clear()
        monkeypatch.setattr("platform.machine", lambda: "x86_64")
        monkeypatch.setenv("FLAXLAB_ONEDNN", "0")
        assert not onednn_conv.available()
    finally:
        monkeypatch.undo()
        onednn_conv.available.cache_clear()


SPLIT_PROGRAMS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flaxlab import onednn_conv, parallel
onednn_conv.APART_MIN_SIZE = 0
mesh = parallel.make_mesh(0)
x = jax.random.normal(jax.random.key(0), (4, 8, 8, 6))
kernel = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 6, 5))
expected = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
split = jax.jit(lambda x, k: onednn_conv.conv(x, k, 1), in_shardings=(NamedSharding(mesh, P("data")), None))
per_device = jax.jit(jax.shard_map(lambda x, k: onednn_conv.conv(x, k, 1), mesh=mesh, in_specs=(P("data"), P()),
                                   out_specs=P("data"), check_vma=False))  # as flaxlab.train's
loss = lambda f: lambda x, k: (jnp.sin(f(x, k)) ** 2).sum()
expected_grads = jax.grad(loss(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))), (0, 1))(x, kernel)
for f in (split, per_device):
    np.testing.assert_allclose(f(x, kernel), expected, rtol=1e-4, atol=1e-4)
    print(f.lower(x, kernel).compile().as_text().count("__onednn$convolution"))
    grads = jax.jit(jax.grad(loss(f), (0, 1)))
    for a, b in zip(grads(x, kernel), expected_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    print(grads.lower(x, kernel).compile().as_text().count("conditional("))
"""


@needs_onednn
def test_programs_split_over_devices_keep_xla_convolutions():
    """XLA's partitioner would gather a custom call's inputs onto every device: a batch split over 2 devices
    gets XLA's convolution and plain transposes for the kernel gradient, a `shard_map` program (each device
    its own batch) keeps oneDNN and the kernel gradient's conditionals."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SPLIT_PROGRAMS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    parts = onednn_conv._kernel_grad_parts(6, 9, 5, 2 * 8 * 8 * 5)  # a device's 2 images, each part's apart
    assert out.stdout.split() == ["0", "0", "1", str(1 + parts)]


@pytest.mark.skipif(jax.default_backend() != "cpu" or not onednn_conv._INTERNALS,
                    reason="a fusion decision of XLA:CPU, undone through jax internals")
@pytest.mark.parametrize("name", ["small_cnn", "lenet5_bn"])
def test_first_conv_is_computed_once(name):
    """A 1-channel conv's multiply-adds (`models._conv_one_channel`) land in one fusion of the train step's
    gradient, not again in each consumer (ReLU or batch norm, pooling, their gradients); `computed_once` is the
    identity for values and gradients, vmapped too."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    ours = lambda v: (jnp.sin(onednn_conv.computed_once(2 * v)) ** 2).sum()  # noqa: E731
    reference = lambda v: (jnp.sin(2 * v) ** 2).sum()  # noqa: E731
    _close(jax.jit(jax.grad(ours))(x), jax.grad(reference)(x))
    _close(jax.jit(jax.vmap(jax.grad(ours)))(x), jax.vmap(jax.grad(reference))(x))
    for dtype in (jnp.float32, jnp.int8):  # an integer's x == x XLA folds to true: the predicate is a float's
        once = jax.jit(lambda v: onednn_conv.computed_once(v + 1) * 2).lower(jnp.ones((4, 5), dtype)).compile()
        assert once.as_text().count("conditional(") == 1, dtype
    model = models.make_model({"name": name}, 10)
    images = jnp.ones((8, 28, 28, 1))
    variables = model.init(jax.random.key(0), images)
    loss = lambda p: model.apply({**variables, "params": p}, images, train=True,  # noqa: E731
                                 mutable=["batch_stats"])[0].sum()
    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    forward = [c for c in hlo.split("\n\n") if re.search(r"jvp\(\w+\)/Conv_0/mul", c)]  # not transpose(jvp(..))
    assert len(forward) == 1, [c.splitlines()[0][:80] for c in forward]
