"""Progress without a terminal: a line per epoch, and inside an epoch longer than a minute a line a minute whose
count is of steps done (the engine's dispatch runs ahead, so the line waits for it first)."""
import io
import sys

from conftest import small_dataset
from test_train import tiny_mlp_config
from flaxlab import progress
from flaxlab.runner import run_experiment


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_a_minute_inside_a_long_epoch(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    lines, waits = [], []
    bar = progress.Progress(2, stream=io.StringIO(), log=lines.append)  # StringIO: not a terminal
    bar.begin_epoch(1)
    for step, now in ((1, 10), (2, 61), (3, 100), (4, 125), (10, 300)):  # the last step: the epoch line follows
        clock.now = now
        bar.on_step(step, 10, wait=lambda step=step: waits.append(step))
    assert lines == ["epoch 1/2: 2/10 steps  [61s]", "epoch 1/2: 4/10 steps  [125s]"]
    assert waits == [2, 4]  # waited before each line, and only then
    bar.end_epoch("train loss 1.0")
    assert lines[-1] == "epoch 1/2  train loss 1.0  [300s, eta 300s]"
    bar.begin_epoch(2)
    clock.now = 330  # a minute counts from the epoch's start
    bar.on_step(1, 10, wait=lambda: waits.append("again"))
    assert len(lines) == 3 and len(waits) == 2


def test_no_lines_when_disabled(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    lines = []
    bar = progress.Progress(1, enabled=False, stream=io.StringIO(), log=lines.append)
    bar.begin_epoch(1)
    clock.now = 1000
    bar.on_step(1, 10, wait=lambda: lines.append("waited"))
    bar.end_epoch("x")
    assert lines == []


def test_a_run_logs_its_steps_done(mnist_sample, monkeypatch, tmp_path):
    """With a line due at every step, an epoch of 8 steps logs steps 1-7 of each epoch, then its epoch line;
    the waits change nothing in what is trained."""
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under `pytest -s`
    ds = small_dataset(mnist_sample, 512, 128)  # batch 64: 8 steps
    lines = []
    logged = run_experiment(tiny_mlp_config(), workdir=tmp_path / "logged", dataset=ds, log=lines.append)
    in_epoch = [line for line in lines if " steps  [" in line]
    assert [line.split("  [")[0] for line in in_epoch] == [f"epoch {e}/2: {s}/8 steps" for e in (1, 2)
                                                         for s in range(1, 8)]
    quiet = run_experiment(tiny_mlp_config(), workdir=tmp_path / "quiet", dataset=ds, progress=False,
                           log=lambda *_: None)
    assert logged.history["train_loss"] == quiet.history["train_loss"]
