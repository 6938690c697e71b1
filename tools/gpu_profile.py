#!/usr/bin/env python3
"""Where a train step's time goes: one epoch traced by jax's profiler per model count, its device work summed
by op (GPU kernels; XLA:CPU thunks on a CPU), and the compiled train program's HLO to look the names up in.

Made for issue 7's open GPU target (8 vmapped 1MD120 CNNs in <= 2x the time of one: 2.44x on an H200): set
side by side, the two epochs say which kernels grow with the model count and which are per-step overhead.
One JSON line per model count; with --out, also OUT/profile.md (the tables) and OUT/hlo_<seeds>.txt.

  python3 tools/gpu_profile.py --data-dir .gpu/shared/data --out "$OUT"   # device run: carry [".gpu"], ~90 s
  python tools/gpu_profile.py --seeds 1,2 --out /tmp/prof                 # a CPU smoke run on the shipped sample
"""
import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from experiments.cli import _apply_overrides, _experiment  # noqa: E402
from flaxlab import bench, models  # noqa: E402
from flaxlab.runner import set_up  # noqa: E402

# profiler events that wrap or wait for the ops rather than being one
_NOT_OPS = ("ThunkExecutor", "Threadpool", "ThreadpoolListener", "$")


def device_ops(trace):
    """{(line, op name): [calls, total µs]} of the device's work in a perfetto trace: every event of a
    /device:GPU (or TPU) process, else the XLA:CPU thunks on XLA's threads. A line is a thread with its
    id dropped: a GPU stream, or a derived line such as "XLA Ops" (the same time again, by HLO op)."""
    events = trace["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"].split("/")[0] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    accelerator = {pid for pid, name in processes.items() if name.startswith(("/device:GPU", "/device:TPU"))}

    def is_op(e):
        if accelerator:
            return e["pid"] in accelerator
        return "XLA" in threads.get((e["pid"], e["tid"]), "") and not e["name"].startswith(_NOT_OPS)

    found = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and is_op(e):
            key = (threads.get((e["pid"], e["tid"]), str(e["tid"])), e["name"])
            found[key][0] += 1
            found[key][1] += e.get("dur", 0.0)
    return dict(found)


def traced_epoch(trainer, states, data, keys, epoch):
    """One epoch under the profiler; returns (new states, seconds, the perfetto trace as a dict)."""
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        t0 = time.perf_counter()
        states, _ = trainer.train_epoch(states, data, keys, epoch)
        jax.block_until_ready(states)
        seconds = time.perf_counter() - t0
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(next(Path(folder).rglob("perfetto_trace.json.gz"))))
    return states, seconds, trace


def profile(name, seeds, data_dir, overrides=(), top=25):
    """Set up as `bench` does, compile, one epoch untraced (warm-up), one traced."""
    config = bench.peer_workload(_apply_overrides(_experiment(name), ["--seeds", str(seeds), *overrides]))[1]
    dataset = bench._load(config, data_dir)
    s = set_up(config, dataset)
    trainer, states = s.trainer, s.states
    compile_s = trainer.compile(states, s.train_data, s.test_data)
    states, _ = trainer.train_epoch(states, s.train_data, s.train_keys, 1)
    jax.block_until_ready(states)
    t0 = time.perf_counter()
    states, _ = trainer.train_epoch(states, s.train_data, s.train_keys, 2)
    jax.block_until_ready(states)
    untraced_s = time.perf_counter() - t0
    _, traced_s, trace = traced_epoch(trainer, states, s.train_data, s.train_keys, 3)
    steps = trainer.steps_per_epoch(len(dataset.train))
    ops = sorted(device_ops(trace).items(), key=lambda item: -item[1][1])
    lines = collections.defaultdict(lambda: [0, 0.0])
    for (line, _), (calls, total) in ops:
        lines[line][0] += calls
        lines[line][1] += total
    hlo = next(iter(trainer._compiled["train"].values())).as_text()  # {device: compiled}, one program
    row = dict(experiment=name, seeds=seeds, backend=jax.default_backend(), device=str(jax.devices()[0]),
               epoch_mode=trainer.epoch_mode, overrides=" ".join(overrides),
               kernel_grad_rows=models.GPU_KERNEL_GRAD_ROWS, steps=steps, compile_s=round(compile_s, 2),
               epoch_s=round(untraced_s, 4), traced_epoch_s=round(traced_s, 4),
               us_per_step=round(1e6 * untraced_s / steps, 1),
               lines={line: [round(calls / steps, 1), round(total / steps, 1)]
                      for line, (calls, total) in lines.items()},
               ops=[[line, op, round(calls / steps, 2), round(total / steps, 2)]
                    for (line, op), (calls, total) in ops[:top]])
    return row, hlo


def markdown(rows):
    lines = []
    for row in rows:
        lines += [f"## {row['experiment']}, {row['seeds']} model(s), {row['epoch_mode']} epochs ({row['backend']}; "
                  f"kernel-gradient rows {row['kernel_grad_rows']}; {row['overrides'] or 'no overrides'})",
                  "", f"{row['us_per_step']} µs a step ({row['steps']} steps in {row['epoch_s']} s untraced); "
                  f"compile {row['compile_s']} s. Device lines, ops and µs a step: "
                  + "; ".join(f"{line} {calls} ops {us} µs" for line, (calls, us) in row["lines"].items()) + ".",
                  "", "| line | op | calls a step | µs a step |", "|---|---|---|---|",
                  *(f"| {line} | `{op}` | {calls} | {us} |" for line, op, calls, us in row["ops"]), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="mnist_cnn")
    parser.add_argument("--seeds", default="1,8", help="comma-separated model counts, one traced epoch each")
    parser.add_argument("--data-dir", type=Path, help="the data sets' folder (default: the shipped samples)")
    parser.add_argument("--kernel-grad-rows", type=int, help="models.GPU_KERNEL_GRAD_ROWS for these runs")
    parser.add_argument("--out", type=Path, help="folder for results.jsonl, profile.md and the HLO")
    parser.add_argument("overrides", nargs="*", help="config overrides, as `run` takes them (after --)")
    args = parser.parse_args()
    models.GPU_KERNEL_GRAD_ROWS = args.kernel_grad_rows
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seeds in (int(n) for n in args.seeds.split(",")):
        row, hlo = profile(args.experiment, seeds, args.data_dir, args.overrides)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            suffix = f"_rows{args.kernel_grad_rows}" if args.kernel_grad_rows else ""
            (args.out / f"hlo_{args.experiment}_{seeds}{suffix}.txt").write_text(hlo)
            with open(args.out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            (args.out / "profile.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
