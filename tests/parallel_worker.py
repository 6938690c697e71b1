"""Checks that need several devices, run by tests/test_parallel.py in a fresh process: jax fixes its
device count when it starts, so the suite's own process (one CPU device) cannot hold them.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_worker.py devices
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import EXPERIMENTS  # noqa: E402
from flaxlab import data as data_lib, parallel, runner, train  # noqa: E402
from flaxlab.errors import UsageError  # noqa: E402
from flaxlab.models import make_model  # noqa: E402


def sample(name="mnist_cnn", **fields):
    config = {**EXPERIMENTS[name](), **fields}
    return config, data_lib.load(**{**config["data"], "source": "sample"})


def check_batch_norm_step_matches_one_device():
    """One step of a batch-norm CNN on a batch split over 8 devices = the same step on one device:
    the batch statistics are those of the whole batch (synchronised), and so are the gradients."""
    config, ds = sample("lenet5_bn")
    model = make_model(config["model"], ds.num_classes)
    # SGD: Adam would scale the conv biases' noise-sized gradients (batch norm follows them) to full steps
    trainer = train.Trainer(model, {"name": "sgd", "lr": 0.1})
    state = jax.tree.map(lambda a: a[0], trainer.init(jax.random.split(jax.random.key(0), 1), ds.train.images.shape[1:]))
    batch = {"image": train.preprocess(ds.train.images[:64]), "label": jnp.asarray(ds.train.labels[:64])}
    step = jax.jit(train.train_step)
    one_state, one_sums = step(state, batch, jax.random.key(1))
    mesh = parallel.make_mesh(0)
    sharded = jax.device_put(batch, parallel.batch_sharding(mesh))
    assert len(sharded["image"].sharding.device_set) == 8
    many_state, many_sums = step(jax.device_put(state, parallel.replicated(mesh)), sharded, jax.random.key(1))
    chex.assert_trees_all_close(one_sums, many_sums, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(one_state.params, many_state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one_state.batch_stats, many_state.batch_stats, rtol=1e-5, atol=1e-6)
    assert many_state.params["Conv_0"]["kernel"].sharding.is_fully_replicated


def train_sample(config, ds, epochs, spread=True):
    s = runner.set_up(config, ds)
    if not spread:
        s.trainer.spread = []
    s.trainer.compile(s.states, s.train_data, s.test_data)
    hlo = next(iter(s.trainer._compiled["train"].values())).as_text()
    states = s.states
    for epoch in range(1, epochs + 1):
        states, _ = s.trainer.train_epoch(states, s.train_data, s.train_keys, epoch)
    return s, states, hlo, train.summarize(s.trainer.evaluate(states, s.test_data))


def check_trainer_on_devices(devices):
    """The engine on a mesh: training set sharded, states replicated, no example crosses devices, and
    it learns as on one device."""
    config, ds = sample(devices=devices)
    s, states, hlo, test = train_sample(config, ds, epochs=2)
    assert s.train_data["image"].shape == (devices, len(ds.train) // devices, 28, 28, 1)
    assert s.train_data["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(states.params))
    shard_bytes = s.train_data["image"].size // devices
    gathers = [line for line in hlo.splitlines() if "all-gather(" in line or "all-to-all(" in line]
    assert not any(f"{shard_bytes}" in line or "625,28,28" in line for line in gathers), gathers
    assert min(test["accuracy"]) > 0.9, test
    return test


def check_seeds_vmapped_and_scanned():
    """Two seeds vmapped and whole-epoch lax.scan (the GPU/TPU path) on the mesh, bf16 compute."""
    config, ds = sample(seeds=2, model_axis="vmap", epoch_mode="scan", compute_dtype="bfloat16")
    ds = data_lib.Dataset(ds.name, ds.source, data_lib.Split(ds.train.images[:2048], ds.train.labels[:2048]),
                          ds.test, ds.num_classes)
    s, states, _, test = train_sample(config, ds, epochs=2)
    assert jax.tree.leaves(states.params)[0].dtype == jnp.float32
    assert min(test["accuracy"]) > 0.8, test
    return test


def check_seeds_split_over_devices():
    """`--parallel seeds`: 8 stacked models, one per device, each on whole batches of the replicated
    training set, with no communication between devices; they end as the same 8 models vmapped on one device."""
    config, ds = sample(seeds=8, parallel="seeds")
    ds = data_lib.Dataset(ds.name, ds.source, data_lib.Split(ds.train.images[:1024], ds.train.labels[:1024]),
                          ds.test, ds.num_classes)
    s, states, hlo, test = train_sample(config, ds, epochs=1)
    kernel = states.params["Conv_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("data"), kernel.sharding
    assert [shard.data.shape[0] for shard in kernel.addressable_shards] == [1] * 8
    assert s.train_data["image"].sharding.is_fully_replicated and s.train_data["image"].shape[0] == 1024
    collectives = ("all-reduce(", "all-gather(", "all-to-all(", "collective-permute(", "reduce-scatter(")
    assert not [line for line in hlo.splitlines() if any(c in line for c in collectives)]
    _, one_device, _, one_test = train_sample({**config, "devices": 1, "parallel": "data", "model_axis": "vmap"}, ds, 1)
    chex.assert_trees_all_close(parallel.to_host(states.params), parallel.to_host(one_device.params),
                                rtol=1e-3, atol=2e-3)  # 1 vs 8 groups in a conv: rounding, amplified
    np.testing.assert_allclose(test["accuracy"], one_test["accuracy"], atol=2e-3)
    try:
        runner.set_up({**config, "seeds": 3}, ds)
        raise AssertionError("3 models were split over 8 devices")
    except UsageError as e:
        assert "3 models do not split over 8 devices" in str(e), e
    import tempfile
    from flaxlab.sweep import run_sweep
    with tempfile.TemporaryDirectory() as tmp:  # a sweep's programs, each refused before any trains
        for fields, variants, message in (
                ({"seeds": 1}, [{"model.dropout": 0.0}, {"model.dropout": 0.3}],
                 "2 models do not split over 8 devices; train a multiple of 8 (--seeds times the variants)"),
                ({"seeds": 1, "parallel": "data"}, [{"batch_size": 32}, {"batch_size": 30}],
                 "--batch-size 30 does not split over 8 devices"),
                ({"seeds": 8, "model_axis": "sequential"}, [{"batch_size": 32}, {"batch_size": 64}],
                 "--parallel seeds vmaps the models on each device")):
            try:
                run_sweep({**config, **fields}, variants, workdir=Path(tmp) / "sweep", dataset=ds, log=lambda *a: None)
                raise AssertionError(f"{variants} ran")
            except UsageError as e:
                assert message in str(e), e
            assert not (Path(tmp) / "sweep").exists()
    return test


def check_sequential_models_spread_over_devices():
    """Models trained one after another (XLA:CPU's default) go to devices 0, 1, 2, 0, ..., run at the same
    time, come back stacked on device 0, and equal the same models trained on device 0 alone."""
    config, ds = sample(seeds=4, devices=1, model_axis="sequential")
    ds = data_lib.Dataset(ds.name, ds.source, data_lib.Split(ds.train.images[:1024], ds.train.labels[:1024]),
                          ds.test, ds.num_classes)
    s, states, _, test = train_sample(config, ds, epochs=2)
    assert s.trainer.spread == jax.local_devices()[:4] and s.trainer.devices == 1
    assert sorted(d.id for d in s.trainer._compiled["train"]) == [0, 1, 2, 3]
    assert {d.id for leaf in jax.tree.leaves(states) for d in leaf.devices()} == {0}
    alone, alone_states, _, alone_test = train_sample(config, ds, epochs=2, spread=False)
    assert alone.trainer.spread == [] and list(alone.trainer._compiled["train"]) == [None]
    chex.assert_trees_all_close(parallel.to_host(states.params), parallel.to_host(alone_states.params), rtol=0, atol=0)
    assert test == alone_test and min(test["accuracy"]) > 0.5, test
    return test


def check_dropout_on_the_mesh():
    """Dropout where the batch is split over the devices (data parallel) and inside shard_map (--parallel
    seeds) compiles (the Philox mask of a one-device CPU program does not lower in a partitioned one), gives
    every example its own mask whatever the device count, and models learn through it."""
    from flaxlab.models import Dropout
    x = jnp.ones((64, 12, 12, 8))
    apply = jax.jit(lambda x, key: Dropout(0.3).apply({}, x, train=True, rngs={"dropout": key}))

    def on(mesh):
        key = jax.device_put(jax.random.key(3), parallel.replicated(mesh))
        return np.asarray(apply(jax.device_put(x, parallel.batch_sharding(mesh)), key))
    sharded = on(parallel.make_mesh(8))
    np.testing.assert_array_equal(sharded, on(parallel.make_mesh(2)))
    per_example = sharded.reshape(64, -1) != 0
    assert (per_example[1:] != per_example[0]).any(axis=1).all() and abs(per_example.mean() - 0.7) < 0.02
    out = {}
    for mode, seeds in (("data", 1), ("seeds", 8)):
        config, ds = sample(seeds=seeds, parallel=mode, dropout=0.3)
        ds = data_lib.Dataset(ds.name, ds.source, data_lib.Split(ds.train.images[:2048], ds.train.labels[:2048]),
                              ds.test, ds.num_classes)
        _, _, _, out[mode] = train_sample(config, ds, epochs=2)
        assert min(out[mode]["accuracy"]) > 0.7, (mode, out[mode])
    return out


def check_multi_host():
    """One process of a multi-host run (JAX_COORDINATOR_ADDRESS etc. set by the test): it holds only its
    shards of the training set, and every process ends with the same replicated models."""
    import faulthandler
    faulthandler.dump_traceback_later(120, exit=True)  # a hung collective ends the worker with a traceback
    parallel.set_up_process()
    assert jax.process_count() == 2 and jax.device_count() == 2 * jax.local_device_count(), jax.devices()
    config, ds = sample()
    s, states, _, test = train_sample(config, ds, epochs=2)
    local = s.train_data["image"].addressable_shards
    assert len(local) == jax.local_device_count() and s.train_data["image"].shape[0] == jax.device_count()
    assert min(test["accuracy"]) > 0.9, test
    kernel = parallel.to_host(states.params["Conv_0"]["kernel"])
    return {"process": jax.process_index(), "test": test, "kernel_sum": float(np.abs(kernel).sum())}


def main(mode):
    if mode == "host":
        print(json.dumps(check_multi_host()))
        return
    assert jax.device_count() >= 2, jax.devices()
    if mode == "devices":
        check_batch_norm_step_matches_one_device()
        out = {"8": check_trainer_on_devices(8), "vmap_scan_bf16": check_seeds_vmapped_and_scanned(),
               "seeds_split": check_seeds_split_over_devices(), "spread": check_sequential_models_spread_over_devices(),
               "dropout": check_dropout_on_the_mesh()}
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
