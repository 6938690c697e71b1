"""Benchmark a course workload and, in the same run, its eager-PyTorch peer.

Prints JSON lines with the fields of ../shared/peers/torch_reference.py (steps_per_s, images_per_s,
train_s, load_s, test_accuracy, ...) plus compile_s, which flaxlab keeps apart from train time, and
a final line with the ratios. Speed is a ratio measured in one run on one machine, never a test.
"""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from flaxlab import config as config_lib
from flaxlab import data as data_lib
from flaxlab.errors import UsageError
from flaxlab.train import summarize

PEER_FIELDS = ("workload", "device", "seed", "batch_size", "steps", "load_s", "train_s", "steps_per_s",
               "images_per_s", "test_accuracy", "test_size")


def shared_dir():
    """../shared (beside the repository or the working directory), $FLAXLAB_SHARED, or $FLAXLAB_SHARED_DATA/.."""
    data = os.environ.get("FLAXLAB_SHARED_DATA")
    candidates = [os.environ.get("FLAXLAB_SHARED"), data and Path(data).parent,
                  Path(__file__).resolve().parents[2] / "shared", Path.cwd().parent / "shared"]
    return next((Path(c) for c in candidates if c and (Path(c) / "data").is_dir()), None)


def _load(config, data_dir):
    """Benchmarks read files when given a folder, else the shipped sample, never a TFDS download, unless a
    --data.source says which."""
    source = config["data"]["source"]
    if source == "auto":
        source = "files" if data_dir else "sample"
    # ../shared/data is bench's default folder, which the sample does not read
    return data_lib.load(**{**config["data"], "source": source}, data_dir=None if source == "sample" else data_dir)


def _figures(value):
    """Three significant figures: a U-Net makes 2.47 images/s on a CPU, an MLP 50,000."""
    return float(f"{value:.3g}") if value < 1000 else round(value)


def bench_flaxlab(config, data_dir, epochs=1):
    """Trains config['seeds'] models for `epochs` epochs; returns one JSON-able dict."""
    from flaxlab.runner import set_up
    t0 = time.perf_counter()
    dataset = _load(config, data_dir)
    load_s = time.perf_counter() - t0
    s = set_up(config, dataset)
    trainer, states = s.trainer, s.states
    compile_s = trainer.compile(states, s.train_data, s.test_data)
    t = time.perf_counter()
    for epoch in range(1, epochs + 1):
        states, _ = trainer.train_epoch(states, s.train_data, s.train_keys, epoch)
    jax.block_until_ready(states)
    train_s = time.perf_counter() - t
    test = summarize(trainer.evaluate(states, s.test_data))
    steps = trainer.steps_per_epoch(len(dataset.train)) * epochs
    images = trainer.images_per_epoch(len(dataset.train)) * epochs * config["seeds"]
    return dict(peer="flaxlab", jax=jax.__version__, workload=config["name"], device=str(jax.devices()[0]),
                backend=jax.default_backend(), epoch_mode=trainer.epoch_mode, seeds=config["seeds"],
                seed=config["seed"], batch_size=config["batch_size"], steps=steps, data=dataset.source,
                load_s=round(load_s, 2), compile_s=round(compile_s, 3), train_s=round(train_s, 3),
                steps_per_s=_figures(steps / train_s), images=images, images_per_s=_figures(images / train_s),
                test_accuracy=round(float(np.mean(test["accuracy"])), 4), test_size=len(dataset.test),
                devices=trainer.devices, models_side_by_side=len(trainer.spread) or 1,
                compute_dtype=config.get("compute_dtype", "float32"),
                **({"test_dice": round(float(np.mean(test["dice"])), 4)} if "dice" in test else {}))


# experiment -> the peer's name for the same workload (torch_reference.py's WORKLOADS; unet is
# tools/torch_unet_peer.py, as torch_reference.py has no segmentation workload)
PEER_WORKLOADS = {"mnist_fnn": "mnist_fnn", "mnist_cnn": "mnist_cnn", "gtsrb_cnn": "gtsrb_cnn",
                  "bs6207_allconv": "cifar_allconv", "jsrt_unet": "unet"}
UNET_PEER = Path(__file__).resolve().parents[1] / "tools" / "torch_unet_peer.py"


def peer_workload(config):
    """The peer's workload for an experiment, and the experiment as the peer runs it: no augmentation
    (the peer has none), one model per seed, the same optimizer, batch size and network, a constant
    learning rate, full batches, and no validation split taken out of the training set."""
    if config["name"] not in PEER_WORKLOADS:
        raise UsageError(f"the PyTorch peer has no '{config['name']}'; it runs {', '.join(sorted(PEER_WORKLOADS))}")
    # the peers hold out no validation split: JSRT's trains on JSRT's train split and tests on its val split,
    # the others test on MNIST's test set or on 5,000 held-out images (flaxlab's CIFAR-10 test split, 10%, is
    # that size; its GTSRB one is 20% of the tracks)
    config = {**config, "augment": {}, "drop_last": True, "best_metric": "", "patience": 0,
              "optimizer": {**config["optimizer"], "schedule": "constant"},
              "data": {**config["data"], "val_fraction": 0.0}}
    return PEER_WORKLOADS[config["name"]], config


# with --peer, the overrides that the peer gets too, and those that change only how flaxlab runs the same workload
PEER_TAKES = {"batch_size", "seeds", "model.width"}
HOW_IT_RUNS = {"devices", "parallel", "distributed", "deterministic", "model_axis", "epoch_mode", "scan_steps",
               "eval_batch_size", "seed"}  # not compute_dtype: bfloat16 against the peer's float32 is other work


def check_peer_overrides(default, config):
    """Refuses an override that would change flaxlab's workload but not the peer's (a wider net, other images,
    another optimizer): the ratio would compare two different workloads."""
    changed = [k for k in config_lib.changed_fields(default, config) if k not in PEER_TAKES | HOW_IT_RUNS
               and not (k == "data.source" and config["data"]["source"] in ("auto", "files"))]  # the peer's files
    if changed:
        raise UsageError(f"--peer runs the PyTorch workload as written; --{changed[0]} would change flaxlab's side "
                         f"only (the peer takes --batch-size, --seeds and the U-Net's --model.width)")


def peer_script(workload, shared):
    """The peer's script, refused when missing or without torch: checked before flaxlab's side runs."""
    script = UNET_PEER if workload == "unet" else shared / "peers" / "torch_reference.py"
    if not script.is_file():
        raise UsageError(f"no PyTorch peer at {script}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("the PyTorch peer needs torch: `pip install torch==2.13.0`") from None
    return script


def check_peer_data(data_dir, shared):
    """The peer reads its data from ../shared/data: a --data-dir elsewhere would change flaxlab's side only."""
    peers = (shared / "data").resolve()
    if data_dir and not Path(data_dir).resolve().is_relative_to(peers):
        raise UsageError(f"--peer: the PyTorch peer reads its data from {peers}; --data-dir {data_dir} would change "
                         f"flaxlab's side only (leave it out, or give that folder)")


def run_peer(workload, epochs, batch_size, seeds, shared, extra=()):
    """Runs the peer as a subprocess; returns its JSON lines as dicts (one per seed)."""
    script = peer_script(workload, shared)
    cmd = [sys.executable, str(script), workload, "--epochs", str(epochs), "--batch-size", str(batch_size),
           "--seeds", str(seeds), *extra]
    env = {**os.environ, "SHARED_DATA": str(shared / "data")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}"
        raise UsageError(f"the PyTorch peer failed: {why}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def compare(ours, peers):
    """Ratio of flaxlab to the peer in throughput; with N seeds, flaxlab's N models side by side (vmapped, or one
    per CPU device) vs N sequential runs. From unrounded counts: the two ratios of one seed agree."""
    peer_train_s = sum(p["train_s"] for p in peers)
    peer_steps = sum(p["steps"] for p in peers)  # every seed's over every seed's time (seed 0's alone disagreed)
    peer_images = sum(p["steps"] * p["batch_size"] for p in peers)
    return dict(compare=ours["workload"], machine=platform.node() or platform.machine(), seeds=ours["seeds"],
                flaxlab_images_per_s=ours["images_per_s"], peer_images_per_s=_figures(peer_images / peer_train_s),
                flaxlab_steps_per_s=ours["steps_per_s"], peer_steps_per_s=_figures(peer_steps / peer_train_s),
                ratio_images_per_s=round(ours["images"] * peer_train_s / (ours["train_s"] * peer_images), 2),
                ratio_steps_per_s=round(ours["steps"] * peer_train_s / (ours["train_s"] * peer_steps), 2)
                if ours["seeds"] == 1 else None,
                flaxlab_train_s=ours["train_s"], flaxlab_compile_s=ours["compile_s"],
                peer_train_s=round(peer_train_s, 2))


def _busy_seconds():
    """Busy CPU time so far of the cores this process may run on (all their processes; /proc/stat's per-CPU lines,
    in a container its cpuset's, not the host's), in seconds, or None off Linux."""
    cores = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    busy = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name != "cpu" and (cores is None or name in cores):
                    ticks = [int(v) for v in fields[:8]]
                    busy += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait (steal: another VM's)
    except (OSError, ValueError, IndexError):
        return None
    return busy / os.sysconf("SC_CLK_TCK")


def others_busy(work):
    """`work()`, and the cores other processes (or VMs) kept busy meanwhile: the cores' busy time less this
    process's and its waited-for children's, over the wall time, averaged over the whole of `work` (a side's
    start-up and compile included); None off Linux. Eager PyTorch's threads slow down far more than XLA's when a
    core is taken (mnist_cnn's ratio read 24.8x beside one busy process, 1.4x on an idle machine)."""
    busy, mine, t0 = _busy_seconds(), os.times(), time.perf_counter()
    result = work()
    wall, after, now = time.perf_counter() - t0, _busy_seconds(), os.times()
    if busy is None or after is None or wall <= 0:
        return result, None
    own = sum(getattr(now, k) - getattr(mine, k) for k in ("user", "system", "children_user", "children_system"))
    return result, round(max(0.0, (after - busy - own) / wall), 2)


BUSY = 0.25  # cores kept busy by other processes past which a ratio is flagged


def busy_note(comparison):
    """Which way other processes bent a ratio, or '': busy while the peer ran, it reads too high; while flaxlab
    ran, too low."""
    sides = [side for side in ("peer", "flaxlab") if (comparison.get(f"others_busy_{side}_cores") or 0) > BUSY]
    if not sides:
        return ""
    return "ratio unreliable" if len(sides) == 2 else "ratio too high" if sides == ["peer"] else "ratio too low"


def bench_flaxlab_apart(name, overrides, data_dir, epochs=1):
    """`bench_flaxlab` of experiment `name` (with command-line `overrides`) in a fresh `python -m experiments
    bench` process: XLA:CPU's device count is fixed when jax starts, and so each workload of `bench all`
    runs on the devices it gets when run alone (parallel.split_cpu_devices)."""
    cmd = [sys.executable, "-m", "experiments", "bench", name, "--as-peer-runs", "--epochs", str(epochs),
           *(["--data-dir", str(data_dir)] if data_dir else []), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True)
    rows = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not rows:
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}"
        raise UsageError(f"flaxlab's bench of {name} failed: {why.removeprefix('error: ')}")
    return json.loads(rows[-1])


def bench_against_peer(name, config, overrides, data_dir, shared, epochs=1, repeat=1, emit=lambda row: None,
                       warn=lambda line: print(line, file=sys.stderr)):
    """flaxlab (`bench_flaxlab_apart`) and its peer on experiment `name` (`config`: it with the command line's
    `overrides`), alternating `repeat` times; every JSON row goes to `emit`.
    Returns the comparisons, each with both sides' steps/s and flaxlab's compile time."""
    workload, config = peer_workload(config)
    extra = ("--width", str(config["model"]["width"])) if workload == "unet" else ()
    comparisons = []
    for _ in range(repeat):
        ours, busy_ours = others_busy(lambda: bench_flaxlab_apart(name, overrides, data_dir, epochs))
        emit(ours)
        peers, busy_peer = others_busy(lambda: run_peer(workload, epochs, config["batch_size"], config["seeds"],
                                                        shared, extra))
        for row in peers:
            emit(row)
        comparison = compare(ours, peers)
        comparison.update(compile_s=ours["compile_s"], device=ours["device"], peer_device=peers[0]["device"],
                          devices=ours["devices"], models_side_by_side=ours["models_side_by_side"],
                          others_busy_flaxlab_cores=busy_ours, others_busy_peer_cores=busy_peer)
        if note := busy_note(comparison):
            warn(f"warning: other processes kept cores busy while {name} was benched (flaxlab's side: {busy_ours}, "
                 f"the peer's: {busy_peer} cores on average): {note}; bench on an idle machine")
        emit(comparison)
        comparisons.append(comparison)
    if repeat > 1:
        emit(median_ratio(comparisons))
    return comparisons


def machine():
    """The machine in words: CPU model and cores, accelerator, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    device = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores; {jax.default_backend()} ({getattr(device, 'device_kind', device)} "
            f"x {jax.device_count()}); jax {jax.__version__}, torch {torch_version}, Python {platform.python_version()}")


def _span(values, digits=None):
    """'low-high' (3 significant figures, or `digits` decimals)."""
    low, high = min(values), max(values)
    text = (lambda v: f"{v:.3g}") if digits is None else (lambda v: f"{v:.{digits}f}")
    return text(low) if text(low) == text(high) else f"{text(low)}-{text(high)}"


def markdown_table(results, epochs, overrides=()):
    """results: {experiment: comparisons}. A table of steps/s and the median ratio, the machine, the settings
    and how busy other processes kept it named."""
    given = f" with {' '.join(overrides)}" if overrides else ""
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}; {epochs} epoch(s) per run{given}, flaxlab "
             "and the PyTorch peer alternating; ratio = flaxlab's images/s over the peer's (median over repeats). "
             "With several seeds, a flaxlab step trains every seed's model, a peer step one model. The peer's time "
             "includes its DataLoader's batching, as the reports' scripts did.", "",
             "| workload | seeds | flaxlab devices | flaxlab steps/s | PyTorch steps/s | ratio (median, range) "
             "| flaxlab compile s | cores busy with other work (flaxlab's side / the peer's) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        ratios = [r["ratio_images_per_s"] for r in rows]
        busy = {side: [r[key] for r in rows if r.get(key := f"others_busy_{side}_cores") is not None]
                for side in ("flaxlab", "peer")}
        notes = sorted({note for r in rows if (note := busy_note(r))})
        busy_text = ("not measured" if not busy["flaxlab"] or not busy["peer"] else
                     f"{_span(busy['flaxlab'], 1)} / {_span(busy['peer'], 1)}"
                     + (f" (**{', '.join(notes)}**)" if notes else ""))
        lines.append(f"| `{name}` vs `{PEER_WORKLOADS[name]}` | {rows[0]['seeds']} | {rows[0].get('devices', 1)} "
                     f"| {_span([r['flaxlab_steps_per_s'] for r in rows])} | {_span([r['peer_steps_per_s'] for r in rows])} "
                     f"| **{np.median(ratios):.2f}x** ({_span(ratios, 2)}) "
                     f"| {_span([r['compile_s'] for r in rows], 1)} | {busy_text} |")
    return "\n".join(lines) + "\n"


def median_ratio(comparisons):
    """The median over alternating repeats: one slow minute of a shared machine does not decide it."""
    values = sorted(c["ratio_images_per_s"] for c in comparisons)
    return dict(compare=comparisons[0]["compare"], repeats=len(values), ratios=values,
                median_ratio_images_per_s=round(float(np.median(values)), 2))


def _train_programs(programs, epochs, model_axis=None):
    """Wall seconds (set-up, compile, train, per-epoch evaluation) of training the programs in turn."""
    from flaxlab.runner import fit, set_up
    t0 = time.perf_counter()
    accuracies, compile_s = [], 0.0
    for config, variants, dataset in programs:
        if model_axis:
            config = {**config, "model_axis": model_axis}
        s = set_up(config, dataset, variants)
        compile_s += s.trainer.compile(s.states, s.train_data, s.test_data, s.val_data)
        _, _, history, _ = fit(s.trainer, s.states, s.data, s.train_keys, epochs, progress=False,
                               log=lambda *a: None)
        accuracies += history["test_accuracy"][-1]
    return dict(wall_s=round(time.perf_counter() - t0, 2), compile_s=round(compile_s, 2),
                models=len(accuracies), mean_test_accuracy=round(float(np.mean(accuracies)), 4))


def bench_sweep(config, variants, data_dir, epochs=1):
    """A sweep trained as planned (stacked per program, the engine's model axis, and vmap forced)
    against every one of its models trained alone, one after another, by the same engine."""
    from flaxlab import sweep
    programs = sweep.plan(config, variants)
    datasets = sweep.program_datasets(programs, lambda c, loaded: _load(c, data_dir) if loaded is None else loaded)
    stacked = [(p.config, [overrides for _, overrides in p.variants], d) for p, d in zip(programs, datasets)]
    alone = [({**p.config, "seeds": 1, "seed": p.config["seed"] + i}, [overrides], d)
             for p, d in zip(programs, datasets) for _, overrides in p.variants for i in range(config["seeds"])]
    rows = []
    for mode, plan, axis in (("stacked", stacked, None), ("stacked_vmap", stacked, "vmap"), ("one_by_one", alone, None)):
        row = dict(sweep=config["name"], mode=mode, programs=len(plan), epochs=epochs, data=datasets[0].source,
                   device=str(jax.devices()[0]), **_train_programs(plan, epochs, axis))
        print(json.dumps(row), flush=True)
        rows.append(row)
    one_by_one = rows[-1]["wall_s"]
    return dict(sweep=config["name"], models=rows[0]["models"], machine=platform.node() or platform.machine(),
                model_axis=programs[0].config.get("model_axis", "auto"),
                speedup_stacked=round(one_by_one / rows[0]["wall_s"], 2),
                speedup_stacked_vmap=round(one_by_one / rows[1]["wall_s"], 2))
