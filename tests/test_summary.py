"""Model summaries and the reports' networks: parameter counts as the reports give them, shapes, batch norm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab import models
from flaxlab.summary import format_summary, summarize_model

CIFAR, MNIST, GTSRB = (32, 32, 3), (28, 28, 1), (28, 28, 3)

# name, input shape, classes, trainable (params), non-trainable (batch_stats), from the reports or their arithmetic
REPORT_COUNTS = [
    ("tdt4265_cnn", CIFAR, 10, 390_410, 0),
    ("bs6207_allconv", CIFAR, 10, 294_810, 0),
    ("bs6207_allconv_bn", CIFAR, 10, 295_770, 960),  # report: 296,730 total, of which 960 non-trainable
    ("ai604_mlp_bn", MNIST, 10, 41_250, 160),  # report counts trainable only, as PyTorch's numel over parameters()
    ("ai604_cnn_bn", MNIST, 10, 11_842, 16),
    ("ai604_cnn_bn_pool", MNIST, 10, 3_202, 16),
    ("gtsrb_cnn", GTSRB, 43, 87_403, 0),
    ("small_cnn", MNIST, 10, 21_578, 0),  # 1MD120 CNN
    ("mlp", MNIST, 10, 636_010, 0),  # 1MD120 FNN
]


def summary_of(name, input_shape, num_classes=10):
    return summarize_model(models.make_model({"name": name}, num_classes), input_shape)


@pytest.mark.parametrize("name,input_shape,num_classes,trainable,non_trainable", REPORT_COUNTS)
def test_report_parameter_counts(name, input_shape, num_classes, trainable, non_trainable):
    summary = summary_of(name, input_shape, num_classes)
    assert (summary.trainable, summary.non_trainable, summary.total) == (
        trainable, non_trainable, trainable + non_trainable)
    assert sum(row.params for row in summary.rows) == summary.total  # no nesting in these, so rows add up
    assert f"Total params: {summary.total:,}" in format_summary(summary)


def test_bs6207_bn_total_is_the_reported_one():
    assert summary_of("bs6207_allconv_bn", CIFAR).total == 296_730


def test_counts_past_int32_from_a_huge_input():
    # 100,000 x 100,000 digits: the dense layer's fan-in of 2e10 overflowed an int32 in its bias init
    summary = summary_of("small_cnn", (100_000, 100_000, 3))
    assert summary.rows[-1].trainable == 32 * 25_000 * 25_000 * 10 + 10


def test_rows_keep_call_order_with_pooling_and_activation_rows():
    rows = summary_of("tdt4265_cnn", CIFAR).rows
    assert [row.kind.split("(")[0] for row in rows] == (
        ["Conv", "Activation", "MaxPool"] * 3 + ["Flatten", "Dense", "Activation", "Dense"])
    pools = [row.output_shape for row in rows if row.kind == "MaxPool"]
    assert pools == [(16, 16, 32), (8, 8, 64), (4, 4, 128)]
    assert rows[0].kind == "Conv" and rows[0].output_shape == (32, 32, 32) and rows[0].params == 2432
    assert rows[1].kind == "Activation(relu)" and rows[1].params == 0
    assert rows[-1].output_shape == (10,)


def test_the_unets_rows_name_its_upsampling_and_activation():
    """`summary jsrt_unet` and `summary jsrt_unet_nearest` printed the same rows."""
    for method, activation in (("bilinear", "relu"), ("nearest", "elu")):
        network = models.make_model({"name": "unet", "width": 4, "depth": 2, "upsample": method,
                                     "activation": activation}, 2)
        kinds = {row.kind for row in summarize_model(network, (32, 32, 1)).rows}
        assert {f"Upsample({method})", f"Activation({activation})"} <= kinds, kinds


def test_gtsrb_last_layer_gets_512_features():
    rows = summary_of("gtsrb_cnn", GTSRB, 43).rows
    flatten = [row for row in rows if row.kind == "Flatten"]
    assert [row.output_shape for row in flatten] == [(512,)]
    assert rows[-1].name == "Dense_0" and rows[-1].output_shape == (43,) and rows[-1].params == 512 * 43 + 43


def test_batch_norm_rows_split_trainable_and_running_stats():
    rows = summary_of("ai604_mlp_bn", MNIST).rows
    norms = [row for row in rows if row.kind == "BatchNorm"]
    assert [(row.trainable, row.non_trainable, row.output_shape) for row in norms] == [(100, 100, (50,)),
                                                                                       (60, 60, (30,))]
    text = format_summary(summary_of("ai604_mlp_bn", MNIST), title="ai604_mlp_bn")
    assert "Trainable params: 41,250" in text and "Non-trainable params: 160" in text and "BatchNorm_1" in text


def test_existing_networks_get_pool_activation_and_flatten_rows():
    kinds = [row.kind for row in summary_of("small_cnn", MNIST).rows]
    assert kinds == ["Conv", "Activation(relu)", "MaxPool"] * 2 + ["Conv", "Activation(relu)", "Flatten", "Dense"]
    kinds = [row.kind for row in summarize_model(models.make_model({"name": "mlp", "activation": "tanh"}, 10),
                                                 MNIST).rows]
    assert kinds == ["Flatten", "Dense", "Activation(tanh)", "Dense"]


@pytest.mark.parametrize("name,features", [("small_cnn", (8, 16, 32)), ("mlp", None)])
def test_existing_parameter_trees_are_unchanged(name, features):
    """The parameter-free layer modules must not shift flax's per-class names (checkpoints, torch comparisons)."""
    params = jax.eval_shape(models.make_model({"name": name}, 10).init, jax.random.key(0),
                            jnp.zeros((1, *MNIST)))["params"]
    if name == "small_cnn":
        assert set(params) == {"Conv_0", "Conv_1", "Conv_2", "Dense_0"}
        assert [params[f"Conv_{i}"]["kernel"].shape[-1] for i in range(3)] == list(features)
    else:
        assert set(params) == {"Dense_0", "Dense_1"}
    assert all(set(layer) == {"kernel", "bias"} for layer in params.values())


def test_small_cnn_matches_a_plain_function_of_its_params():
    """SmallCNN's outputs, written out with the primitives, as it computed them before the layer modules."""
    model = models.make_model({"name": "small_cnn"}, 10)
    x = jax.random.normal(jax.random.key(1), (3, *MNIST))
    params = quick_variables(model, x)["params"]
    h = x
    for i in range(3):
        h = models.Conv(params[f"Conv_{i}"]["kernel"].shape[-1], 3, padding=1).apply(
            {"params": params[f"Conv_{i}"]}, h)
        h = jax.nn.relu(h)
        if i < 2:
            h = models.max_pool(h, 2)
    expected = h.reshape(3, -1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


def quick_variables(model, x):
    """Random variables of the model's shapes: `model.init` takes ~10 s for an 8-conv net on the 2-core CPU."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.key(0), x))


NEW_MODELS = [(name, shape, classes) for name, shape, classes, *_ in REPORT_COUNTS
              if name not in ("small_cnn", "mlp")]


@pytest.mark.parametrize("name,input_shape,num_classes", NEW_MODELS)
def test_new_models_forward_in_train_and_eval(name, input_shape, num_classes):
    assert name in models.MODELS
    model = models.make_model({"name": name}, num_classes)
    x = jax.random.normal(jax.random.key(2), (4, *input_shape))
    variables = quick_variables(model, x[:1])

    @jax.jit
    def forward(variables, x):  # one compiled program: eager op-by-op dispatch is slower on the shared CPU
        train_out = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
        return model.apply(variables, x, train=False, mutable=["batch_stats"]), train_out

    (eval_logits, eval_updates), (logits, updates) = forward(variables, x)
    assert eval_logits.shape == logits.shape == (4, num_classes)
    if "batch_stats" in variables:  # train mode moves the running stats (torch momentum 0.1: 0.9 old + 0.1 batch)
        old, new = variables["batch_stats"]["BatchNorm_0"], updates["batch_stats"]["BatchNorm_0"]
        assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])
        # eval mode leaves them alone
        np.testing.assert_array_equal(eval_updates["batch_stats"]["BatchNorm_0"]["mean"], old["mean"])
    else:
        assert updates == {} or not updates.get("batch_stats")


def test_batch_norm_momentum_is_torchs():
    """Running mean after one step = 0.9 * 0 + 0.1 * batch mean, as torch.nn.BatchNorm2d's default momentum 0.1."""
    model = models.make_model({"name": "ai604_cnn_bn"}, 10)
    x = jax.random.uniform(jax.random.key(2), (8, *MNIST))
    variables = quick_variables(model, x[:1])
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    conv = models.Conv(8, 6, 2).apply({"params": variables["params"]["Conv_0"]}, x)
    np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], 0.1 * conv.mean(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-6)


def test_layer_stack_is_configurable_and_rejects_unknown_layers():
    from flaxlab.errors import UsageError
    model = models.make_model({"name": "layer_stack", "layers": (("conv", 4, 3, 1, 1), ("act",), ("avg_pool", 2),
                                                                 ("dropout", 0.5), ("dense", 6))}, 3)
    summary = summarize_model(model, (8, 8, 2))
    assert [row.output_shape for row in summary.rows] == [(8, 8, 4), (8, 8, 4), (4, 4, 4), (4, 4, 4), (4, 4, 6),
                                                          (96,), (3,)]
    assert summary.trainable == (9 * 2 * 4 + 4) + (4 * 6 + 6) + (96 * 3 + 3)
    with pytest.raises(UsageError, match="unknown layer"):
        models.make_model({"name": "layer_stack", "layers": (("warp", 2),)}, 3).init(
            jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def test_avg_pool_is_torchs_floor_mode_mean():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    expected = x[:, :4, :4].reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(models.AvgPool(2).apply({}, x), expected, rtol=1e-6)
