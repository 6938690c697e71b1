"""Data parallelism (jax.sharding mesh), multi-host runs and bf16 compute.

Checks that need several devices run in fresh processes (tests/parallel_worker.py): simulated CPU
devices must be asked for before jax starts, and this process already has its one.
"""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from flaxlab import parallel, train
from flaxlab.errors import UsageError
from flaxlab.models import make_model

WORKER = REPO / "tests" / "parallel_worker.py"


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(REPO), **extra}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_json(text):
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_one_device_needs_no_mesh():
    assert parallel.make_mesh(0) is None and parallel.make_mesh(1) is None
    with pytest.raises(UsageError, match="only 1 device"):
        parallel.make_mesh(jax.device_count() + 1)


def test_data_parallel_on_8_simulated_devices():
    """The batch-norm step on 8 devices equals the one-device step; the engine shards the training set,
    replicates the states, moves no example between devices and learns; vmapped seeds with scan epochs
    and bf16 compute run on the mesh too; with --parallel seeds, 8 models split over the 8 devices train
    without communication and equal the same models on one device; without a mesh, models trained one
    after another are spread over the devices and equal the same run on one; dropout compiles and learns on
    the mesh (see parallel_worker.py)."""
    out = subprocess.run([sys.executable, str(WORKER), "devices"], env=_env(8), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = _last_json(out.stdout)
    assert result["8"]["accuracy"][0] > 0.9 and min(result["vmap_scan_bf16"]["accuracy"]) > 0.8
    assert len(result["seeds_split"]["accuracy"]) == 8 and np.mean(result["seeds_split"]["accuracy"]) > 0.3
    assert len(result["spread"]["accuracy"]) == 4
    assert len(result["dropout"]["seeds"]["accuracy"]) == 8


SPLIT = """
import sys
from flaxlab import parallel
split = parallel.split_cpu_devices(int(sys.argv[1]), distributed=sys.argv[2:] == ["distributed"])
import jax
print(split, jax.local_device_count(), parallel.make_mesh(0) is None, jax.device_count() > 1 and parallel.make_mesh(2) is not None)
"""


def test_cpu_is_split_into_one_device_per_model_before_jax_starts():
    """A CPU run of several models gets one XLA:CPU device per model (at most two per core, and 8), to run
    them side by side, with no data parallelism over them unless asked; a run of one model keeps one device,
    and nothing changes where the count was set, in a multi-host run, or once jax has started."""
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}

    def run(models, *args, **extra):
        out = subprocess.run([sys.executable, "-c", SPLIT, str(models), *args], env={**env, "PYTHONPATH": str(REPO), **extra},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()
    assert run(1) == ["False", "1", "True", "False"]
    for models in (3, 20):
        count = min(models, 2 * cores, 8)
        assert run(models) == (["True", str(count), "True", "True"] if cores > 1 else ["False", "1", "True", "False"])
    assert run(3, JAX_NUM_CPU_DEVICES="1")[:2] == ["False", "1"]
    assert run(3, XLA_FLAGS="--xla_force_host_platform_device_count=5")[:2] == ["False", "5"]
    assert run(3, "distributed")[:2] == ["False", "1"]  # a multi-host mesh would split batches over them
    jax.devices()  # this process's backend has started
    assert not parallel.split_cpu_devices(3) and jax.device_count() == 1


def _two_processes(args, devices_each=2, timeout=600, per_process=((), ())):
    """Both processes' (exit code, stdout, stderr); `per_process` holds arguments that only one of them gets."""
    port = _free_port()
    procs = [subprocess.Popen([*args, *per_process[i]],
                              env=_env(devices_each, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def test_two_processes_train_one_model_over_loopback():
    """Two processes with two CPU devices each (gloo collectives over loopback): each holds only its
    shards of the training set, and both end with the same model, as one 4-device program."""
    results = _two_processes([sys.executable, str(WORKER), "host"])
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-3000:]
    first, second = (_last_json(stdout) for _, stdout, _ in results)
    assert {first["process"], second["process"]} == {0, 1}
    assert first["test"] == second["test"] and first["kernel_sum"] == second["kernel_sum"]
    assert first["test"]["accuracy"][0] > 0.9


def test_a_process_whose_peers_never_come_gives_up_in_one_line(tmp_path):
    """Process 1 of 2 with no coordinator: a notice while it waits, then one error line and exit code 2
    at FLAXLAB_JOIN_TIMEOUT (jax would abort with a C++ stack trace), and no run folder."""
    cmd = [sys.executable, "-m", "experiments", "run", "mnist_cnn", "--workdir", str(tmp_path / "run")]
    env = _env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
               FLAXLAB_JOIN_TIMEOUT="4")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and lines[0].startswith("waiting for the multi-host run of 2 processes"), out.stderr
    assert lines[-1].startswith("error: the multi-host run of 2 processes at 127.0.0.1:") and \
        "(this is process 1) did not start within 4 s" in lines[-1], out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_multi_host_run_writes_one_run_folder(command, tmp_path):
    """Process 0 alone writes the folder and speaks; a sweep's variants (dropout, data parallel) as well. The run's
    checkpoints (of 8 seeds split over both processes' devices, gathered) hold the models it scored, and a
    multi-host --resume from epoch 1's ends as the run did."""
    from flaxlab.checkpoint import kept_epochs
    from flaxlab.runner import evaluate_checkpoint
    workdir = tmp_path / "run"
    what = (["mnist_cnn", "--seeds", "8", "--parallel", "seeds", "--checkpoint_every", "1"] if command == "run" else
            ["mnist_cnn_dropout", "--grid", "dropout=0,0.3"])
    cmd = [sys.executable, "-m", "experiments", command, *what, "--data.source", "sample", "--epochs", "2",
           "--workdir", str(workdir)]
    results = _two_processes(cmd)
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    reports = [out for _, out, _ in results if "wrote " in out]
    silent = [out for _, out, _ in results if "wrote " not in out]
    # and no "[Gloo] Rank 1 is connected to 1 peer ranks" lines from C++ (parallel._connect_gloo_quietly)
    assert len(reports) == 1 and silent[0] == "" and "Gloo" not in reports[0], [out for _, out, _ in results]
    history = json.loads((workdir / "history.json").read_text())
    if command == "sweep":
        assert [(row["variant"], float(row["test_accuracy_mean"]) > 0.85) for row in csv.DictReader(
            (workdir / "results.csv").open())] == [("dropout=0", True), ("dropout=0.3", True)]
        assert len(list((workdir / "tensorboard" / "dropout=0.3" / "seed_0").iterdir())) == 1
        return
    assert "cpu x 4 devices (seeds parallel)" in reports[0]
    assert history["info"]["devices"] == 4 and history["info"]["processes"] == 2
    accuracy = history["history"]["test_accuracy"][-1]
    assert len(accuracy) == 8 and min(accuracy) > 0.85, accuracy
    assert len(list((workdir / "tensorboard" / "seed_7").iterdir())) == 1  # process 0's curves only
    assert kept_epochs(workdir / "checkpoints") == [1, 2]
    np.testing.assert_allclose(evaluate_checkpoint(workdir, log=lambda line: None)["test"]["accuracy"], accuracy,
                               atol=1e-6)  # here, on one device
    history["history"] = {k: v[:1] for k, v in history["history"].items()}  # as if stopped after epoch 1 ...
    (workdir / "history.json").write_text(json.dumps(history))
    shutil.rmtree(workdir / "checkpoints" / "2")
    resumed = _two_processes([*cmd, "--resume"])  # ... and resumed, process 0 sending the others its checkpoint
    assert [r[0] for r in resumed] == [0, 0], [r[2][-2000:] for r in resumed]
    assert json.loads((workdir / "history.json").read_text())["history"]["test_accuracy"][-1] == accuracy


def test_the_processes_go_on_together_or_stop_together(monkeypatch):
    """parallel.in_every_process as process 0 of two, with process 1's reply made up: its error, a bug in it, its
    other options or other data stop this process too, in a line naming process 1; a bug here keeps its traceback."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    config = {"epochs": 1, "optimizer": {"lr": 0.1}}

    def process_1_says(**reply):
        monkeypatch.setattr(parallel, "_gather_bytes", lambda mine: [mine, json.dumps(reply).encode()])

    process_1_says(config=config, fingerprint="abc")
    assert parallel.in_every_process(lambda: 7, config, fingerprint=lambda value: "abc") == 7
    for reply, message in [
            (dict(config=config, error="--data-dir /x is not a folder"), "process 1: --data-dir /x is not a folder"),
            (dict(config=config, error="KeyError: 'x'"), "process 1: KeyError: 'x'"),
            (dict(config=config, fingerprint="abd"), "process 1 of the multi-host run read other data than process 0"),
            (dict(config={**config, "optimizer": {"lr": 0.2}}, error="anything"),  # the options first
             "process 1 of the multi-host run was given other options than process 0 (--optimizer.lr)")]:
        process_1_says(**reply)
        with pytest.raises(UsageError) as raised:
            parallel.in_every_process(lambda: 7, config, fingerprint=lambda value: "abc")
        assert str(raised.value).startswith(message), (str(raised.value), message)
    process_1_says(config=config, fingerprint="abc")
    with pytest.raises(ZeroDivisionError):  # this process's own bug, as raised
        parallel.in_every_process(lambda: 1 / 0, config)
    # what process 0 (this one) reads for all: a value, a UsageError, a bug
    assert parallel.from_process_0(lambda: {"epochs": [1, 2]}) == {"epochs": [1, 2]}
    with pytest.raises(UsageError, match="^--resume: no folder$"):
        parallel.from_process_0(lambda: (_ for _ in ()).throw(UsageError("--resume: no folder")))
    with pytest.raises(ZeroDivisionError):
        parallel.from_process_0(lambda: 1 / 0)


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_bad_input_in_one_process_stops_every_process_in_one_line(command, tmp_path):
    """Data that only one process lacks or reads otherwise, or options that differ: every process exits 2 at once
    with the line that names the process (the others used to wait in their next collective, then die with a
    traceback, or train on other examples without a word), and no folder is written."""
    import gzip
    sample, other = tmp_path / "sample", tmp_path / "other"
    shutil.copytree(REPO / "flaxlab" / "assets" / "mnist-sample", sample)
    shutil.copytree(sample, other)
    labels = bytearray(gzip.decompress((sample / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[-1] = (labels[-1] + 1) % 10  # one test label of another host's copy
    (other / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    cmd = [sys.executable, "-m", "experiments", command, "mnist_cnn", "--epochs", "1", "--workdir",
           str(tmp_path / "run"), *(["--grid", "seed=1,2"] if command == "sweep" else [])]
    missing = tmp_path / "nowhere"
    results = _two_processes(cmd, timeout=300, per_process=(["--data-dir", str(sample)], ["--data-dir", str(missing)]))
    lines = [err.splitlines()[-1] for _, _, err in results]
    assert [rc for rc, _, _ in results] == [2, 2], [err[-2000:] for _, _, err in results]
    assert lines[1].startswith(f"error: process 1: --data-dir {missing} is not a folder") and lines[0] == lines[1], lines
    for per_process, line in [
            ((["--data-dir", str(sample)], ["--data-dir", str(sample), "--resume"]),  # a hang, or tracebacks
             "error: process 1 of the multi-host run was given other options than process 0 (--resume): start "
             "every process with the same command"),
            ((["--data-dir", str(sample)], ["--data-dir", str(other)]),
             "error: process 1 of the multi-host run read other data than process 0 (other examples, or the same in "
             "another order): give every host the same data files"),
            ((["--data-dir", str(sample)], ["--data-dir", str(sample), "--epochs", "2", "--optimizer.lr", "0.05"]),
             "error: process 1 of the multi-host run was given other options than process 0 (--epochs, "
             "--optimizer.lr): start every process with the same command")]:
        for rc, _, err in _two_processes(cmd, timeout=300, per_process=per_process):
            assert rc == 2 and err.splitlines()[-1] == line, err
    assert not (tmp_path / "run").exists()


def test_multi_host_launch_resumes_a_sweep_from_process_0s_folder(tmp_path):
    """Process 0 reads the folder (the sweep's finished programs, the stopped program's checkpoint) and sends
    it to the others, which hold none; a folder that cannot be resumed is one line in every process."""
    from experiments import EXPERIMENTS
    from test_sweep import stop_at
    from flaxlab.sweep import parse_grid, run_sweep
    workdir = tmp_path / "sweep"
    config = {**EXPERIMENTS["mnist_cnn"](), "epochs": 2, "checkpoint_every": 1}
    config["data"] = {**config["data"], "source": "sample"}
    with pytest.raises(KeyboardInterrupt):  # here, one process: program 2 stopped after its first epoch
        run_sweep(config, parse_grid(config, ["model.features=4/4,8"]), workdir, log=stop_at("program 2/2", "epoch 1/2"))
    options = ["--grid", "model.features=4/4,8", "--data.source", "sample", "--epochs", "2", "--checkpoint_every", "1",
               "--resume"]
    results = _two_processes([sys.executable, "-m", "experiments", "sweep", "mnist_cnn", *options,
                              "--workdir", str(workdir)])
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    said = next(out for _, out, _ in results if "wrote " in out)
    assert "resuming: program(s) 1-1 of 2 were trained before" in said and "resumed after epoch 1" in said, said
    rows = list(csv.DictReader((workdir / "results.csv").open()))
    assert [row["variant"] for row in rows] == ["features=4", "features=4-8"], rows
    assert all(float(row["test_accuracy_mean"]) > 0.8 for row in rows), rows
    results = _two_processes([sys.executable, "-m", "experiments", "sweep", "mnist_cnn", *options,
                              "--workdir", str(tmp_path / "none")])
    for rc, _, err in results:
        assert rc == 2 and err.splitlines()[-1] == (f"error: --resume: {tmp_path / 'none'}/config.json not found; "
                                                    f"is {tmp_path / 'none'} a run folder?"), err



def test_bfloat16_compute_keeps_fp32_parameters_and_statistics(mnist_sample):
    model = make_model({"name": "lenet5_bn"}, 10)
    batch = {"image": train.preprocess(mnist_sample.train.images[:64]), "label": jnp.asarray(mnist_sample.train.labels[:64])}
    trainer = train.Trainer(model, {"name": "sgd", "lr": 0.1})
    state = jax.tree.map(lambda a: a[0], trainer.init(jax.random.split(jax.random.key(0), 1), (28, 28, 1)))
    full, full_sums = jax.jit(train.train_step)(state, batch, jax.random.key(1))
    half, half_sums = jax.jit(lambda s, b, k: train.train_step(s, b, k, jnp.bfloat16))(state, batch, jax.random.key(1))
    for leaf in jax.tree.leaves((half.params, half.batch_stats, half.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    np.testing.assert_allclose(half_sums["loss"], full_sums["loss"], rtol=0.02)
    np.testing.assert_allclose(half.batch_stats["BatchNorm_0"]["mean"], full.batch_stats["BatchNorm_0"]["mean"],
                               rtol=0.02, atol=1e-3)
    step = jax.tree.map(lambda a, b: a - b, full.params, state.params)
    half_step = jax.tree.map(lambda a, b: a - b, half.params, state.params)
    cosine = lambda a, b: float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    assert cosine(half_step["Dense_0"]["kernel"], step["Dense_0"]["kernel"]) > 0.99


def test_deterministic_gpu_ops_flag_and_bad_multi_host_environment(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    parallel.set_up_process(deterministic=True)
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=1 {parallel.DETERMINISTIC_GPU_FLAG}"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(UsageError, match="JAX_NUM_PROCESSES"):
        parallel.set_up_process()


def test_a_data_parallel_run_says_what_its_equal_shards_leave_out():
    from flaxlab.runner import shards_note
    assert shards_note(4500, 8) == ("note: 4 of the 4,500 training examples are left out of training: each of the 8 "
                                    "devices trains on an equal shard of 562")
    assert shards_note(5000, 8) == shards_note(4500, 1) == ""


@pytest.mark.parametrize("args, message", [
    (["--compute_dtype", "float16"], "unknown value 'float16' for --compute_dtype"),
    (["--devices", "3"], "--devices 3: only 1 device(s) here (cpu); a CPU is split into 3 by XLA_FLAGS="),
    (["--devices", "-1"], "--devices must not be negative"),
    (["--parallel", "batch"], "unknown value 'batch' for --parallel"),
])
def test_bad_parallel_options_are_one_line(args, message, tmp_path, capsys):
    from experiments.cli import main
    assert main(["run", "mnist_cnn", "--data.source", "sample", "--epochs", "1", "--workdir", str(tmp_path / "r"),
                 *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
