"""Progress without a terminal: a line per epoch, and inside an epoch longer than a minute a line a minute whose
count is of steps run, not dispatched (dispatch runs ahead of them), found without waiting for any."""
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


class Probe:
    """A step's probe: ready once the fake engine has run that step."""
    def __init__(self, step, engine):
        self.step, self.engine = step, engine

    def is_ready(self):
        return self.step <= self.engine["ran"]


def test_a_line_a_minute_counts_the_steps_run(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    lines, probed, engine = [], [], {"ran": 0}
    bar = progress.Progress(2, stream=io.StringIO(), log=lines.append)  # StringIO: not a terminal
    bar.begin_epoch(1)

    def probe(step):
        probed.append(step)
        return Probe(step, engine)

    # (step dispatched, time, steps run by then); the last step: the epoch line follows
    for step, now, ran in ((1, 0.5, 0), (2, 1, 0), (3, 1.5, 0), (4, 61, 0), (5, 61.5, 2), (6, 125, 3),
                           (7, 125.5, 5), (8, 190, 7), (10, 300, 10)):
        clock.now, engine["ran"] = now, ran
        bar.on_step(step, 10, probe=lambda step=step: probe(step))
    # every step until the first has run, then one a second at most
    assert probed == [1, 2, 3, 4, 6, 8, 10]
    # nothing run at 61 s; at 190 s step 7 has run, but the last probed step known to have run is 6
    assert lines == ["epoch 1/2: 0/10 steps  [61s]", "epoch 1/2: 3/10 steps  [125s]", "epoch 1/2: 6/10 steps  [190s]"]
    bar.end_epoch("train loss 1.0")
    assert lines[-1] == "epoch 1/2  train loss 1.0  [300s, eta 300s]"
    bar.begin_epoch(2)
    clock.now = 330  # a minute counts from the epoch's start, and the count from 0
    bar.on_step(1, 10, probe=lambda: probe(1))
    assert len(lines) == 4
    clock.now = 391
    bar.on_step(2, 10)  # without a probe, dispatched counts as run
    assert lines[-1] == "epoch 2/2: 2/10 steps  [391s]"


def test_the_lines_go_on_while_the_queued_steps_run(monkeypatch):
    """A large network's few steps are all dispatched in its epoch's first seconds; the minute lines went quiet
    for the minutes the device then took (ResNet-18 at 224: 16 steps, 181 s, no line)."""
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    lines, engine = [], {"ran": 0}

    def sleep(seconds):  # a look a second; a step runs every 40 s
        clock.now += 1.0
        engine["ran"] = min(4, int(clock.now // 40))
    monkeypatch.setattr(progress.time, "sleep", sleep)
    bar = progress.Progress(1, stream=io.StringIO(), log=lines.append)
    bar.begin_epoch(1)
    for step in range(1, 5):  # all 4 dispatched at once, none run
        bar.on_step(step, 4, probe=lambda step=step: Probe(step, engine))

    class Last:  # the epoch's last outputs, computed at 150 s
        def is_ready(self):
            return clock.now >= 150
    bar.wait([Last()])
    assert clock.now == 150 and lines == ["epoch 1/1: 1/4 steps  [60s]", "epoch 1/1: 3/4 steps  [120s]"]


def test_no_lines_when_disabled(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    lines = []
    bar = progress.Progress(1, enabled=False, stream=io.StringIO(), log=lines.append)
    bar.begin_epoch(1)
    clock.now = 1000
    bar.on_step(1, 10, probe=lambda: lines.append("probed"))
    bar.end_epoch("x")
    assert lines == []


def test_a_run_logs_its_steps_run(mnist_sample, monkeypatch, tmp_path):
    """With a line due at every step, an epoch of 8 steps logs a line at steps 1-7 of each epoch (and more while
    the queued steps run), each a count of steps run so far, below 8, that never goes down; the probes change
    nothing in what is trained."""
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    monkeypatch.setattr(progress, "PROBE_EVERY_S", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under `pytest -s`
    ds = small_dataset(mnist_sample, 512, 128)  # batch 64: 8 steps
    lines = []
    logged = run_experiment(tiny_mlp_config(), workdir=tmp_path / "logged", dataset=ds, log=lines.append)
    in_epoch = [line.split("  [")[0] for line in lines if " steps  [" in line]
    for epoch in (1, 2):
        epoch_lines = [line for line in in_epoch if line.startswith(f"epoch {epoch}/2: ")]
        counts = [int(line.split(": ")[1].split("/")[0]) for line in epoch_lines]
        assert len(epoch_lines) >= 7 and all(line.endswith("/8 steps") for line in epoch_lines)
        assert counts == sorted(counts) and all(count <= min(step, 7) for step, count in enumerate(counts, 1)), counts
    assert len(in_epoch) == sum(line.startswith(("epoch 1/2: ", "epoch 2/2: ")) for line in in_epoch)
    quiet = run_experiment(tiny_mlp_config(), workdir=tmp_path / "quiet", dataset=ds, progress=False,
                           log=lambda *_: None)
    assert logged.history["train_loss"] == quiet.history["train_loss"]
