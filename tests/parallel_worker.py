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


def train_sample(config, ds, epochs):
    s = runner.set_up(config, ds)
    s.trainer.compile(s.states, s.train_data, s.test_data)
    hlo = s.trainer._compiled["train"].as_text()
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


def check_multi_host():
    import faulthandler; faulthandler.dump_traceback_later(120, exit=True)
    """One process of a multi-host run (JAX_COORDINATOR_ADDRESS etc. set by the test): it holds only its
    shards of the training set, and every process ends with the same replicated models."""
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
        out = {"8": check_trainer_on_devices(8), "vmap_scan_bf16": check_seeds_vmapped_and_scanned()}
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
