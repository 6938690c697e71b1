"""Models: the reports' parameter counts, shapes, and forward numerics against the PyTorch originals."""
import chex
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab import fft_conv, models, onednn_conv
from flaxlab.errors import UsageError
from experiments import EXPERIMENTS


@pytest.mark.parametrize("name,count", [("mnist_cnn", 21578), ("mnist_fnn", 636010), ("mnist_cnn_tanh", 21578)])
def test_learnable_weight_counts_match_report(name, count):
    model = models.make_model(EXPERIMENTS[name]()["model"], 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    assert models.count_params(params) == count


@pytest.mark.parametrize("cfg", [{"name": "small_cnn"}, {"name": "small_cnn", "pool_first": True},
                                 {"name": "mlp", "hidden": (50, 30)}])
def test_logit_shapes(cfg):
    model = models.make_model(cfg, 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert model.apply(variables, jnp.zeros((7, 28, 28, 1))).shape == (7, 10)


def test_init_follows_torch_default_bounds():
    params = models.make_model({"name": "mlp", "hidden": (800,)}, 10).init(
        jax.random.key(0), jnp.zeros((1, 784)))["params"]
    bound = 1 / np.sqrt(784)
    for leaf in jax.tree_util.tree_leaves(params["Dense_0"]):  # kernel and bias
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound


def to_torch_cnn(params, torch, pool_first=False, activation="relu"):
    """The 1MD120 CNN in PyTorch (NCHW), holding our weights: conv HWIO->OIHW, linear rows from HWC to CHW order."""
    nn = torch.nn
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}[activation]
    convs = [nn.Conv2d(i, o, 3, 1, 1) for i, o in ((1, 8), (8, 16), (16, 32))]
    layers = []
    for i, conv in enumerate(convs):
        p = params[f"Conv_{i}"]
        conv.weight.data = torch.tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
        conv.bias.data = torch.tensor(np.asarray(p["bias"]))
        block = [act(), nn.MaxPool2d(2)] if i < 2 else [act()]
        layers += [conv] + (block[::-1] if pool_first and i < 2 else block)
    linear = nn.Linear(32 * 7 * 7, 10)
    k = np.asarray(params["Dense_0"]["kernel"])  # (7*7*32 in HWC order, 10)
    linear.weight.data = torch.tensor(k.reshape(7, 7, 32, 10).transpose(3, 2, 0, 1).reshape(10, -1).copy())
    linear.bias.data = torch.tensor(np.asarray(params["Dense_0"]["bias"]))
    return nn.Sequential(*layers, nn.Flatten(), linear)


@pytest.mark.parametrize("pool_first,activation", [(False, "relu"), (True, "relu"), (False, "tanh"), (False, "gelu"),
                                                        (False, "silu"), (False, "elu")])
def test_cnn_forward_matches_pytorch(pool_first, activation):
    torch = pytest.importorskip("torch", reason="torch is the reference for the CNN numerics")
    model = models.make_model({"name": "small_cnn", "pool_first": pool_first, "activation": activation}, 10)
    params = model.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))["params"]
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
    with torch.no_grad():
        theirs = to_torch_cnn(params, torch, pool_first, activation)(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_unknown_model_or_activation_is_usage_error():
    with pytest.raises(UsageError, match="unknown model"):
        models.make_model({"name": "resnet9000"}, 10)
    with pytest.raises(UsageError, match="unknown activation"):
        models.make_model({"name": "small_cnn", "activation": "mish"}, 10)


@pytest.mark.parametrize("in_channels,kernel,strides,padding",
                         [(1, 3, 1, 1), (1, 3, 1, 0), (1, 3, 2, 1), (3, 3, 1, 1), (3, 5, 1, 0), (3, 5, 1, 2),
                          (3, 3, 2, 1), (32, 5, 1, 0), (32, 5, 1, 2)])
def test_conv_and_its_gradients_match_lax(in_channels, kernel, strides, padding):
    """The one-channel fast path, oneDNN (stride 1 on x86 CPUs), where it does not apply the FFT path (32 maps,
    5x5, unpadded, on CPU) and im2col (RGB, stride 1, on CPU), and the general path against lax.conv, values
    and gradients."""
    conv = models.Conv(8, kernel, strides, padding)
    x = jax.random.normal(jax.random.key(0), (4, 12, 12, in_channels))
    on_cpu = jax.default_backend() == "cpu"
    assert fft_conv.is_faster(x, jnp.zeros((kernel, kernel, in_channels, 8)), strides, padding) == (
        on_cpu and (in_channels, kernel, padding) == (32, 5, 0))
    assert models.uses_patches(x, jnp.zeros((kernel, kernel, in_channels, 8)), strides, padding) == (
        on_cpu and in_channels == 3 and strides == 1)
    params = conv.init(jax.random.key(1), x)["params"]

    def reference(params, x):
        y = jax.lax.conv_general_dilated(x, params["kernel"], (strides,) * 2, [(padding, padding)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + params["bias"]

    loss = lambda f: lambda params, x: (f(params, x) ** 2).sum()
    ours = lambda params, x: conv.apply({"params": params}, x)
    np.testing.assert_allclose(ours(params, x), reference(params, x), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(reference), (0, 1))(params, x)):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4), a, b)


def test_im2col_conv_under_vmap_and_where_it_is_not_used():
    """Stacked models (vmap over kernels and images) get lax's values and gradients through im2col; bf16,
    more than 3 channels and patches over PATCHES_MAX_BYTES keep lax's convolution."""
    padded = jax.random.normal(jax.random.key(0), (2, 3, 10, 10, 3))
    kernels = jax.random.normal(jax.random.key(1), (2, 3, 3, 3, 5))
    lax_conv = lambda p, k: jax.lax.conv_general_dilated(p, k, (1, 1), "VALID",  # noqa: E731
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda conv: lambda p, k: (jax.vmap(conv)(p, k) ** 3).sum()  # noqa: E731
    np.testing.assert_allclose(jax.vmap(models._conv_patches)(padded, kernels), jax.vmap(lax_conv)(padded, kernels),
                               rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(jax.grad(loss(models._conv_patches), (0, 1))(padded, kernels),
                            jax.grad(loss(lax_conv), (0, 1))(padded, kernels)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
    kernel = jnp.zeros((3, 3, 3, 16))
    assert models.uses_patches(jnp.zeros((32, 32, 32, 3)), kernel, 1, 1) == (jax.default_backend() == "cpu")
    assert not models.uses_patches(jnp.zeros((32, 32, 32, 3), jnp.bfloat16), kernel.astype(jnp.bfloat16), 1, 1)
    assert not models.uses_patches(jnp.zeros((32, 32, 32, 4)), jnp.zeros((3, 3, 4, 16)), 1, 1)
    assert not models.uses_patches(jnp.zeros((32, 224, 224, 3)), kernel, 1, 1)  # VGG's first conv at 224: 173 MB


@pytest.mark.parametrize("conv,chunk_rows", [("_matmul_conv", None), ("_patch_grad_conv", None),
                                             ("_patch_grad_conv", 16), ("_matmul_conv_chunked_grad", 16)])
@pytest.mark.parametrize("in_channels,kernel,strides,padding",
                         [(1, 3, 1, ((1, 1), (1, 1))), (4, 3, 2, ((1, 1), (1, 1))), (3, 5, 1, "VALID"),
                          (6, 1, 1, "VALID"), (2, 3, 2, ((0, 1), (2, 0)))])
def test_gpu_convs_match_lax_under_vmap(monkeypatch, conv, chunk_rows, in_channels, kernel, strides, padding):
    """The GPU paths (im2col products; XLA's conv with an im2col kernel gradient; either with the kernel
    gradient summed from partial products over chunks of ~16 pixels), vmapped over two models as multi-seed
    runs train them: lax's values and gradients, with strides and uneven padding."""
    monkeypatch.setattr(models, "GPU_KERNEL_GRAD_ROWS", chunk_rows)
    x = jax.random.normal(jax.random.key(0), (2, 3, 11, 11, in_channels))
    kernels = jax.random.normal(jax.random.key(1), (2, kernel, kernel, in_channels, 5))
    reference = lambda x, k: jax.lax.conv_general_dilated(x, k, (strides,) * 2, padding,  # noqa: E731
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, k: getattr(models, conv)(x, k, (strides,) * 2, padding)  # noqa: E731
    loss = lambda f: lambda x, k: (jnp.sin(jax.vmap(f)(x, k)) ** 2).sum()  # noqa: E731
    np.testing.assert_allclose(jax.vmap(ours)(x, kernels), jax.vmap(reference)(x, kernels), rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.grad(loss(ours), (0, 1))(x, kernels), jax.grad(loss(reference), (0, 1))(x, kernels)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_path_by_backend_and_patch_size(monkeypatch):
    """XLA's convolution off GPUs; on a GPU one matrix product while one model's patches fit in
    GPU_MATMUL_MAX_BYTES (the 1MD120 CNN's), else only the kernel gradient as one (the U-Net's)."""
    def primitives(x_shape, kernel_shape):
        x, kernel = jnp.zeros(x_shape), jnp.zeros(kernel_shape)
        return str(jax.make_jaxpr(lambda x, k: models._conv(x, k, (1, 1), ((1, 1), (1, 1))))(x, kernel))
    mnist, unet = ((32, 14, 14, 8), (3, 3, 8, 16)), ((8, 256, 256, 64), (3, 3, 64, 64))
    if jax.default_backend() == "cpu":
        assert "dot_general" not in primitives(*mnist) and "custom_vjp" not in primitives(*unet)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "dot_general" in primitives(*mnist) and "conv_general_dilated" not in primitives(*mnist)
    assert "custom_vjp_call" in primitives(*unet)
    monkeypatch.setattr(models, "GPU_KERNEL_GRAD_ROWS", 1024)  # both paths' kernel gradients from partial products
    assert "custom_vjp_call" in primitives(*mnist) and "conv_general_dilated" not in primitives(*mnist)
    for (x_shape, kernel_shape), partials in ((mnist, "f32[4,72,16]"), (unet, "f32[512,576,64]")):
        x, kernel = jnp.zeros(x_shape), jnp.zeros(kernel_shape)  # 6,272 pixels in 4 chunks; 524,288 in 512
        grad = jax.make_jaxpr(jax.grad(lambda k: models._conv(x, k, (1, 1), ((1, 1), (1, 1))).sum()))(kernel)
        assert partials in str(grad)


@pytest.mark.parametrize("shape", [(4, 6, 6, 5), (16, 7)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax(shape, dtype):
    """flaxlab's batch norm against flax's: variables, outputs in training and evaluation, the running mean
    (the running variance is torch's, unbiased), and (fp32, where its gradient is written out) the gradients,
    vmapped over two models too."""
    ours, theirs = (layer(use_running_average=False, momentum=0.9, epsilon=1e-5)
                    for layer in (models.BatchNorm, flax.linen.BatchNorm))
    x = (3 * jax.random.normal(jax.random.key(0), (2, *shape)) + 1).astype(dtype)
    variables = theirs.init(jax.random.key(1), x[0])
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x[0])) == jax.tree.map(jnp.shape, variables)
    params = {"scale": jnp.linspace(0.5, 2, shape[-1]), "bias": jnp.linspace(-1, 1, shape[-1])}
    stats = {"mean": jnp.full(shape[-1:], 0.3), "var": jnp.full(shape[-1:], 2.0)}
    cast = lambda tree: jax.tree.map(lambda v: v.astype(dtype), tree)  # noqa: E731 - bf16 compute casts params

    def apply(layer, params, x, train=True):
        out = layer.clone(use_running_average=not train).apply(
            {"params": cast(params), "batch_stats": stats}, x, mutable=["batch_stats"] if train else False)
        return out if train else (out, None)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for train in (True, False):
        (y, new), (y_ref, new_ref) = (apply(layer, params, x[0], train) for layer in (ours, theirs))
        assert y.dtype == y_ref.dtype == dtype
        np.testing.assert_allclose(y.astype(jnp.float32), y_ref.astype(jnp.float32), **tolerance)
        if train:
            unbiased = jnp.var(x[0].astype(jnp.float32), tuple(range(len(shape) - 1)), ddof=1)
            new_ref = {"batch_stats": {"mean": new_ref["batch_stats"]["mean"], "var": 0.9 * 2.0 + 0.1 * unbiased}}
            chex.assert_trees_all_close(new, new_ref, rtol=1e-5, atol=1e-6)
    if dtype == jnp.bfloat16:
        return
    weights = jax.random.normal(jax.random.key(2), shape)
    loss = lambda layer: lambda params, x: (apply(layer, params, x)[0] * weights).sum() ** 2  # noqa: E731
    for stacked in (False, True):
        grad = (lambda f: jax.vmap(jax.grad(f, (0, 1)), (None, 0))) if stacked else (lambda f: jax.grad(f, (0, 1)))
        inputs = x if stacked else x[0]
        chex.assert_trees_all_close(grad(loss(ours))(params, inputs), grad(loss(theirs))(params, inputs),
                                    rtol=2e-4, atol=2e-4)
    assert isinstance(models.batch_norm(True), models.BatchNorm)


def test_batch_norm_running_statistics_are_torchs():
    """Two training steps then evaluation, against torch's BatchNorm1d: the running variance takes the unbiased
    batch variance (flax's the biased one: eval outputs then differed by ~0.8% at batch 64)."""
    torch = pytest.importorskip("torch")
    x = np.asarray(3 * jax.random.normal(jax.random.key(0), (2, 64, 5)) + 1)
    layer, reference = models.batch_norm(True), torch.nn.BatchNorm1d(5)
    variables = layer.init(jax.random.key(1), x[0])
    for batch in x:
        _, updates = layer.apply(variables, batch, mutable=["batch_stats"])
        variables = {**variables, **updates}
        reference(torch.tensor(batch))
    np.testing.assert_allclose(variables["batch_stats"]["var"], reference.running_var.numpy(), rtol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["mean"], reference.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    evaluated = models.batch_norm(False).apply(variables, x[0])
    np.testing.assert_allclose(evaluated, reference.eval()(torch.tensor(x[0])).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_bias_gradient_as_a_product_matches_the_sum():
    """add_bias's gradient (a product with ones on CPU, for 8 or more channels) equals that of y + bias, for
    one model and vmapped over stacked models; fewer channels and bf16 keep the plain sum."""
    y = jax.random.normal(jax.random.key(0), (3, 4, 6, 6, 8))
    bias = jax.random.normal(jax.random.key(1), (3, 8))
    weights = jax.random.normal(jax.random.key(2), (4, 6, 6, 8))
    loss = lambda add: lambda y, b: jnp.sum(jnp.tanh(add(y, b)) * weights[..., :y.shape[-1]])
    plain = jax.grad(loss(jnp.add), (0, 1))
    ours = jax.grad(loss(models.add_bias), (0, 1))
    chex.assert_trees_all_close(ours(y[0], bias[0]), plain(y[0], bias[0]), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.vmap(ours)(y, bias), jax.vmap(plain)(y, bias), rtol=1e-5, atol=1e-5)
    uses_product = lambda *args: "dot_general" in str(jax.make_jaxpr(ours)(*args))
    assert uses_product(y[0], bias[0]) == (jax.default_backend() == "cpu")
    assert not uses_product(y[0, ..., :6], bias[0, :6])
    assert not uses_product(y[0].astype(jnp.bfloat16), bias[0].astype(jnp.bfloat16))


@pytest.mark.parametrize("shape,size", [((3, 8, 8, 4), 2), ((2, 7, 9, 3), 2), ((2, 9, 9, 2), 3)])
def test_max_pool_matches_reduce_window_and_torch_gradient(shape, size):
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))  # relu: many tied zeros in a window
    x = x.at[0, 0, 0, 0].set(1.0).at[0, 0, 1, 0].set(1.0)  # a tie between two maxima
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, size, size, 1), "VALID")
    np.testing.assert_array_equal(models.max_pool(x, size), ref)
    torch = pytest.importorskip("torch", reason="torch is the reference for max-pool gradients")
    g = jax.random.normal(jax.random.key(1), ref.shape)
    ours = jax.vjp(lambda x: models.max_pool(x, size), x)[1](g)[0]
    tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
    torch.nn.functional.max_pool2d(tx, size).backward(torch.tensor(np.asarray(g).transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(ours, tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize("shape,window,stride,padding", [((2, 12, 12, 3), 3, 2, 1), ((2, 9, 11, 2), 3, 2, 1),
                                                         ((1, 8, 8, 2), 2, 2, 0), ((1, 10, 10, 2), 3, 1, 0)])
def test_strided_max_pool_matches_flax_and_torch_gradient(shape, window, stride, padding):
    """ResNet's overlapping 3x3/2/1 pool: values as flax's reduce_window, gradient as torch's (ties to the first)."""
    import flax.linen as nn
    from flaxlab.pooling import max_pool_strided
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))  # relu: tied zeros, some shared by two windows
    ref = nn.max_pool(x, (window, window), (stride, stride), padding=[(padding, padding)] * 2)
    np.testing.assert_array_equal(max_pool_strided(x, window, stride, padding), ref)
    torch = pytest.importorskip("torch", reason="torch is the reference for max-pool gradients")
    g = jax.random.normal(jax.random.key(1), ref.shape)
    ours = jax.jit(jax.vjp(lambda x: max_pool_strided(x, window, stride, padding), x)[1])(g)[0]
    tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
    torch.nn.functional.max_pool2d(tx, window, stride, padding).backward(
        torch.tensor(np.asarray(g).transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(ours, tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize("x_shape,kernel_shape,padding", [((3, 24, 24, 16), (5, 5, 16, 8), 0),
                                                          ((2, 11, 13, 5), (5, 3, 5, 4), 1),
                                                          ((2, 9, 10, 3), (2, 4, 3, 6), 2)])
def test_fft_conv_and_its_gradients_match_lax(x_shape, kernel_shape, padding):
    """Odd and even sizes, non-square kernels, padding; under jit and vmap (stacked models)."""
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernels = jax.random.normal(jax.random.key(1), (2, *kernel_shape))

    def direct(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def through_fft(x, kernel):
        return fft_conv.conv(x, kernel, padding)

    def values_and_grads(conv):
        def one(kernel):
            y, vjp = jax.vjp(conv, x, kernel)
            return (y, *vjp(jnp.cos(y)))
        return jax.jit(jax.vmap(one))(kernels)

    reference, ours = values_and_grads(direct), values_and_grads(through_fft)
    for a, b in zip(reference, ours):  # float32 FFTs: errors ~1e-6 of the largest value
        chex.assert_trees_all_close(b, a, atol=2e-5 * float(jnp.abs(a).max()), rtol=0)
    if jax.default_backend() == "cpu" and onednn_conv._INTERNALS:
        # the images and the output gradient go channels-first apart from their producers (a ReLU here)
        step = jax.jit(jax.grad(lambda x, k: (through_fft(jax.nn.relu(x), k) ** 2).sum(), (0, 1)))
        assert step.lower(x, kernels[0]).compile().as_text().count("conditional(") == 2


def test_vgg_weight_init_is_torchvisions():
    """`weight_init: vgg` is torchvision's VGG initialisation: conv kernels N(0, 2 / fan-out), dense kernels
    N(0, 0.01^2), zero biases; the default stays PyTorch's (uniform biases). Unknown names are usage errors."""
    images = jnp.zeros((1, 32, 32, 3))
    params = models.make_model({"name": "ai604_vgg19", "weight_init": "vgg"}, 10).init(jax.random.key(0), images)
    layers = params["params"]
    for name, layer in layers.items():
        kernel = np.asarray(layer["kernel"])
        expected = np.sqrt(2 / (kernel.shape[0] * kernel.shape[1] * kernel.shape[3])) if name.startswith("Conv") \
            else 0.01
        assert abs(kernel.std() / expected - 1) < 0.1, name
        assert abs(kernel.mean()) < 0.1 * expected, name
        assert not np.asarray(layer["bias"]).any(), name
    assert sum(name.startswith("Conv") for name in layers) == 16 and sum(name.startswith("Dense") for name in layers) == 3
    default = models.make_model({"name": "ai604_vgg19"}, 10).init(jax.random.key(0), images)["params"]
    assert np.asarray(default["Conv_0"]["bias"]).any()
    with pytest.raises(UsageError, match="unknown weight_init 'he'"):
        models.make_model({"name": "ai604_vgg19", "weight_init": "he"}, 10)
