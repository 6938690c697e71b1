"""The engine: a pure step, seeds under vmap equal to separate runs, no recompiles, exact eval sums."""
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_dataset
from experiments import EXPERIMENTS
from experiments.common import variant
from flaxlab import data, inspect_model, models, optim, train
from flaxlab.runner import run_experiment


def tiny_mlp_config(**dotted):
    config = variant(EXPERIMENTS["mnist_fnn"](), "tiny", "a small MLP for engine tests",
                     **{"model.hidden": (32,), "batch_size": 64, "epochs": 2, "optimizer.lr": 0.5})
    return variant(config, "tiny", "a small MLP for engine tests", **dotted)


def quiet(*_):
    pass


def test_train_step_is_pure_and_learns(mnist_sample):
    model = models.make_model({"name": "small_cnn"}, 10)
    tx = optim.make_optimizer({"name": "adam", "lr": 3e-3})
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
    batch = {"image": train.preprocess(jnp.asarray(mnist_sample.train.images[:64])),
             "label": jnp.asarray(mnist_sample.train.labels[:64])}
    before = jax.tree.map(np.array, state.params)
    step = jax.jit(train.train_step)
    losses = []
    new = state
    for _ in range(20):
        new, sums = step(new, batch, jax.random.key(1))
        losses.append(float(sums["loss"] / sums["count"]))
    chex.assert_trees_all_close(state.params, before)  # the input state is untouched
    assert losses[-1] < 0.5 * losses[0]
    assert int(new.step) == 20


def test_l1_penalty_adds_sign_gradient():
    params = {"w": jnp.array([1.5, -2.0, 0.5, 0.0])}  # torch's |x| has gradient 0 at 0 (batch norm's biases start so)
    grad = jax.grad(lambda p: 0.1 * train.l1_penalty(p))(params)
    chex.assert_trees_all_close(grad, {"w": jnp.array([0.1, -0.1, 0.1, 0.0])})
    assert float(train.l1_penalty(params)) == 4.0


@pytest.mark.parametrize("model_config,shape", [
    ({"name": "small_cnn", "activation": "tanh"}, (28, 28, 1)), ({"name": "lenet5", "activation": "sigmoid"}, (28, 28, 1)),
    ({"name": "tdt4265_cnn_bn"}, (32, 32, 3)), ({"name": "small_cnn", "batch_norm": True}, (28, 28, 1))])
def test_the_compiled_train_step_has_eager_jaxs_gradients(model_config, shape):
    """XLA:CPU (jax 0.10.2) compiled wrong gradients for these, forward pass and loss right: a tanh or sigmoid
    into the max pool's comparisons (the conv gradients 2x off), and without YNNPACK's reduction fusions the
    TDT4265 CNN with batch norm (10% off). Eager jax matches torch and float64 to ~1e-6."""
    model = models.make_model(model_config, 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(-1.0),
                                    batch_stats=variables.get("batch_stats", {}),  # params + grads, in one step
                                    hparams={"dropout": jnp.float32(0.0)} if "tdt" in model_config["name"] else {})
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.random((4, *shape), dtype=np.float32)),
             "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32)}
    compiled = train.compile_for_backend(jax.jit(train.train_step).lower(state, batch, jax.random.key(1)))
    with jax.disable_jit():
        eager = train.train_step(state, batch, jax.random.key(1))[0]
    stepped = compiled(state, batch, jax.random.key(1))[0].params
    for (path, got), want, before in zip(jax.tree_util.tree_leaves_with_path(stepped), jax.tree.leaves(eager.params),
                                         jax.tree.leaves(state.params)):
        grad, expected = np.asarray(got - before), np.asarray(want - before)
        if "batch_stats" in variables and path[-1].key == "bias" and "Conv" in path[0].key:
            continue  # a conv's bias before batch norm: its gradient is 0, so only rounding is compared
        np.testing.assert_allclose(grad, expected, atol=1e-4 * np.abs(expected).max(), err_msg=str(path))


@pytest.mark.parametrize("name", ["ai604_cnn_bn", "ai604_mlp_bn"])
def test_batch_norm_leaves_a_short_batchs_filler_out(name):
    """drop_last false: the last batch holds filler examples, masked out of the loss; batch norm's statistics
    (and so every gradient before it, and the running statistics) are those of the real examples alone, as
    torch's short last batch gives. Two models vmapped, as seeds train."""
    model = models.make_model({"name": name}, 10)
    images = jax.random.uniform(jax.random.key(1), (2, 4, 28, 28, 1))
    labels = jnp.array([[0, 1, 2, 0], [3, 4, 5, 3]])
    states = jax.vmap(lambda key: train.TrainState.create(
        apply_fn=model.apply, tx=optim.make_optimizer({"name": "sgd", "lr": 0.1}),
        **model.init(key, images[0, :1], train=False)))(jax.random.split(jax.random.key(0)))
    step = jax.jit(jax.vmap(train.train_step, in_axes=(0, 0, None)))
    rng = jax.random.key(2)
    real, real_sums = step(states, {"image": images[:, :3], "label": labels[:, :3]}, rng)
    padded, sums = step(states, {"image": images, "label": labels, "mask": jnp.array([[1, 1, 1, 0]] * 2)}, rng)
    chex.assert_trees_all_close((padded.params, padded.batch_stats), (real.params, real.batch_stats), atol=1e-5)
    chex.assert_trees_all_close(sums, real_sums, rtol=1e-6)
    x, weights = jax.random.normal(jax.random.key(3), (5, 3, 3, 4)), jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
    chex.assert_trees_all_close(models._batch_stats(x, weights), models._batch_stats(x[jnp.array([0, 2, 3])]),
                                atol=1e-6)  # the other path's statistics (bf16 compute, GPUs): jax's gradient


def test_batch_norms_example_mask_is_the_tracing_threads_own_and_exact():
    """The mask is a context variable: a model traced in another thread meanwhile took this thread's mask. Its
    sums are not a matrix product (TF32 on GPUs, bf16 on TPUs: percents off in the variance), and a batch of
    filler alone leaves the statistics 0, not NaN."""
    import threading
    x, mask = jax.random.normal(jax.random.key(3), (4, 3, 3, 2)), jnp.array([True, False, True, True])
    seen = []
    with models.real_examples(mask):
        other = threading.Thread(target=lambda: seen.append(models._example_weights(x)))
        other.start()
        other.join()
        mine = models._example_weights(x)
    assert seen == [None] and mine.tolist() == [1.0, 0.0, 1.0, 1.0] and models._example_weights(x) is None
    assert "dot_general" not in str(jax.make_jaxpr(models._batch_stats)(x, mine))
    assert np.isfinite(models._batch_stats(x, jnp.zeros(4))).all()


def test_eval_sums_are_exact_with_a_padded_last_batch(mnist_sample):
    model = models.make_model({"name": "mlp", "hidden": (16,)}, 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1))
    split = data.to_device(mnist_sample.test)
    sums = jax.jit(lambda s, d: train.evaluate(s, d, batch_size=300))(state, split)  # 1000 = 3*300 + 100
    logits = model.apply(variables, train.preprocess(split["image"]))
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, split["label"]).sum()
    assert float(sums["count"]) == 1000
    np.testing.assert_allclose(float(sums["loss"]), float(expected), rtol=1e-5)
    assert float(sums["correct"]) == float((logits.argmax(-1) == split["label"]).sum())


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror(mnist_sample):
    model = models.make_model({"name": "small_cnn"}, 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1))
    split = data.to_device(mnist_sample.test)
    images = train.preprocess(split["image"])
    logits = (model.apply(variables, images) + model.apply(variables, images[:, :, ::-1])) / 2
    sums = jax.jit(lambda s, d: train.evaluate(s, d, batch_size=300, flip=True))(state, split)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, split["label"]).sum()
    np.testing.assert_allclose(float(sums["loss"]), float(expected), rtol=1e-5)
    assert float(sums["correct"]) == float((logits.argmax(-1) == split["label"]).sum())
    predicted = jax.jit(lambda s, d: train.predict(s, d, batch_size=300, flip=True))(state, split)
    np.testing.assert_array_equal(predicted, logits.argmax(-1))


def test_eval_flip_mirrors_per_pixel_logits_back():
    conv = models.Conv(features=3, kernel_size=3)  # a lopsided kernel: its output is no mirror image
    images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
    variables = conv.init(jax.random.key(0), images)
    state = train.TrainState.create(apply_fn=lambda v, x, train: conv.apply(v, x), params=variables["params"],
                                    tx=optax.sgd(0.1))
    expected = (conv.apply(variables, images) + conv.apply(variables, images[:, :, ::-1])[:, :, ::-1]) / 2
    chex.assert_trees_all_close(train.eval_logits(state, images, flip=True), expected, atol=1e-6)


def test_stacked_seeds_equal_separate_runs(mnist_sample, tmp_path):
    ds = small_dataset(mnist_sample, 1024, 256)
    together = run_experiment(tiny_mlp_config(seeds=3, seed=5), workdir=tmp_path / "together", dataset=ds,
                              progress=False, log=quiet)
    for i in range(3):
        alone = run_experiment(tiny_mlp_config(seed=5 + i), workdir=tmp_path / f"alone{i}", dataset=ds,
                               progress=False, log=quiet)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], together.states.params),
                                    jax.tree.map(lambda a: a[0], alone.states.params), atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(together.history["test_accuracy"])[:, i],
                                   np.asarray(alone.history["test_accuracy"])[:, 0])
    # and the seeds really differ
    assert not np.allclose(together.history["train_loss"][0][0], together.history["train_loss"][0][1])


def test_scan_epochs_equal_per_step_dispatch(mnist_sample, tmp_path):
    ds = small_dataset(mnist_sample, 512, 128)
    step = run_experiment(tiny_mlp_config(epoch_mode="step"), workdir=tmp_path / "step", dataset=ds, progress=False, log=quiet)
    scan = run_experiment(tiny_mlp_config(epoch_mode="scan", scan_steps=3),  # 8 steps: chunks of 2
                          workdir=tmp_path / "scan", dataset=ds, progress=False, log=quiet)
    assert scan.info["epoch_mode"] == "scan" and step.info["epoch_mode"] == "step"
    chex.assert_trees_all_close(step.states.params, scan.states.params, atol=1e-5, rtol=1e-4)


def test_epochs_never_recompile(mnist_sample, monkeypatch, tmp_path):
    traced = chex.assert_max_traces(train.train_step, n=1)
    monkeypatch.setattr(train, "train_step", traced)
    ds = small_dataset(mnist_sample, 256, 64)
    run_experiment(tiny_mlp_config(epochs=3), workdir=tmp_path, dataset=ds, progress=False, log=quiet)
    chex.clear_trace_counter()


def test_the_eval_batch_is_no_larger_than_the_largest_split(mnist_sample):
    """--eval_batch_size 1000000 once padded 10,000 test digits to a million and ran out of memory."""
    from flaxlab.runner import set_up
    ds = small_dataset(mnist_sample, 256, 61)
    assert set_up(tiny_mlp_config(eval_batch_size=10**6), ds).trainer.eval_batch_size == 64  # 61 up to 8's multiple
    assert set_up(tiny_mlp_config(eval_batch_size=16), ds).trainer.eval_batch_size == 16


def test_model_axis_follows_backend():
    assert train.resolve_model_axis("auto", 4, "cpu") == "sequential"  # vmapped convs are grouped convs, slow there
    assert train.resolve_model_axis("auto", 4, "gpu") == "vmap"
    assert train.resolve_model_axis("sequential", 1, "gpu") == "single"  # one model: nothing to choose
    assert train.resolve_model_axis("vmap", 4, "cpu") == "vmap"


def test_epoch_mode_follows_backend():
    assert train.resolve_epoch_mode("auto", "cpu") == "step"
    assert train.resolve_epoch_mode("auto", "gpu") == "scan"
    assert train.resolve_epoch_mode("scan", "cpu") == "scan"


@pytest.mark.parametrize("name", sorted(n for n, make in EXPERIMENTS.items()
                                        if not make()["sweep"] and make()["data"]["name"] == "mnist"))
def test_every_experiment_runs_and_learns_on_the_sample(name, mnist_sample, tmp_path):
    """Each real config at smoke size (2 epochs on the 5,000-digit sample): it learns and writes its run folder."""
    config = variant(EXPERIMENTS[name](), name, "smoke", epochs=2)
    if config["batch_size"] > 256:  # the FNN's batch 1024 leaves too few steps on 5,000 digits
        config = variant(config, name, "smoke", batch_size=256, **{"optimizer.lr": 0.5})
    result = run_experiment(config, workdir=tmp_path, dataset=mnist_sample, progress=False, log=quiet)
    assert result.history["test_accuracy"][-1][0] > 0.6, result.history
    has_convs = inspect_model.conv_layer_names(models.make_model(config["model"], 10), (28, 28, 1))
    convs = {"filters.png", "features.png"} if has_convs else set()
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "history.json", "results.md", "curves.png",
                                                    "confusion.json", "confusion.png", "misclassified.png",
                                                    "checkpoints", "tensorboard", *convs}


def test_cnn_accuracy_on_real_mnist_after_one_epoch(mnist_full, tmp_path):
    """The 1MD120 CNN's real config, one epoch of the full 60,000 digits (the 20-epoch run reaches ~99%)."""
    config = variant(EXPERIMENTS["mnist_cnn"](), "mnist_cnn", "one real epoch", epochs=1)
    result = run_experiment(config, workdir=tmp_path, dataset=mnist_full, progress=False, log=quiet)
    assert result.history["test_accuracy"][-1][0] >= 0.975, result.history
    assert result.info["data"]["train_examples"] == 60000


MEDIAN_PAGE_FAULTS = """
import resource, sys, jax, jax.numpy as jnp, numpy as np
from flaxlab import train

def median_faults_per_call(fn, *args, calls=8):
    jax.block_until_ready(fn(*args))
    faults = []
    for _ in range(calls):  # a first block in each of malloc's arenas is faulted in once: the median
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(fn(*args))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return float(np.median(faults))

inputs, weights = jnp.ones((4200, 2048), jnp.float32), jnp.ones((2048,), jnp.float32)
sines_times_weights = jax.jit(lambda x, w: jnp.sin(x) @ w)  # the dot reads sin(x) from a 34 MB buffer
before = median_faults_per_call(sines_times_weights, inputs, weights)
applied = train.keep_freed_memory()
print(before, applied, median_faults_per_call(sines_times_weights, inputs, weights))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_cpu_buffers_over_32_mb_are_reused_not_mapped_afresh():
    """A 34 MB temporary was faulted in anew (8,400 pages) on every call until keep_freed_memory().
    In a fresh process: freed blocks stay in the heap for the rest of a process's life."""
    out = subprocess.run([sys.executable, "-c", MEDIAN_PAGE_FAULTS], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    before, applied, after = out.stdout.split()
    if float(before) < 1000:  # e.g. transparent huge pages for every mapping: 2 MB per fault
        pytest.skip(f"this machine faults a fresh 34 MB block in with {before} faults, not page by page")
    assert float(before) > 8000 and applied == "True" and float(after) < 100, out.stdout


def test_compile_for_backend_drops_only_an_unknown_flag():
    """Every compile failure was taken for a jax without the CPU flag: an out-of-memory compiled twice."""
    from flaxlab.train import compile_for_backend

    class Lowered:
        def __init__(self, error):
            self.error, self.calls = error, []

        def compile(self, compiler_options=None):
            self.calls.append(compiler_options)
            if compiler_options and self.error:
                raise RuntimeError(self.error)
            return "compiled"

    older = Lowered("INVALID_ARGUMENT: No such compile option: 'xla_cpu_experimental_ynn_fusion_type'")
    assert compile_for_backend(older) == "compiled" and older.calls[1] is None
    failing = Lowered("RESOURCE_EXHAUSTED: out of memory while compiling")
    with pytest.raises(RuntimeError, match="out of memory"):
        compile_for_backend(failing)
    assert len(failing.calls) == 1
