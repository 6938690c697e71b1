"""Orbax checkpoints and --resume: a run killed with SIGKILL and resumed ends exactly as an
uninterrupted one; best-validation states and early stopping per model."""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from flaxlab import metrics, runner
from flaxlab.checkpoint import Checkpoints
from flaxlab.errors import DataError, UsageError
from flaxlab.runner import evaluate_checkpoint, predict_images, select_models

# two seeds of the GTSRB CNN on the shipped sample, a checkpoint every epoch, each model's best val state kept
RUN = ["run", "gtsrb_cnn", "--data.source", "sample", "--seeds", "2", "--epochs", "5", "--checkpoint_every", "1",
       "--quiet"]


def cli(*args, cwd, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "experiments", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, **kwargs)


def finished(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-2000:]
    return out, err


def history(workdir):
    return json.loads((workdir / "history.json").read_text())["history"]


def test_sigkilled_run_resumes_to_the_same_end(tmp_path):
    finished(cli(*RUN, "--workdir", "whole", cwd=tmp_path))
    killed = cli(*RUN, "--workdir", "killed", cwd=tmp_path)
    checkpoint = tmp_path / "killed" / "checkpoints" / "2"
    while not checkpoint.is_dir() and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "checkpoints" / "5").exists()

    _, err = finished(cli(*RUN, "--workdir", "killed", "--resume", cwd=tmp_path))
    whole, resumed = history(tmp_path / "whole"), history(tmp_path / "killed")
    assert resumed["epoch"] == whole["epoch"] == [1, 2, 3, 4, 5]
    for key in metrics.history_keys(whole):
        assert resumed[key] == whole[key], key  # bit for bit: same keys, same states, same compiled program
    results = lambda name: (tmp_path / name / "results.md").read_text().split("\n\n")[-2]  # noqa: E731 the table
    assert results("killed") == results("whole")


@pytest.mark.parametrize("stop, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_says_what_the_run_folder_holds_and_how_to_go_on(tmp_path, stop, code, word):
    """SIGINT mid-run: exit code 130 and one line naming the folder, the epochs on disk and, with
    checkpoints, the --resume that goes on (the line was a bare 'interrupted'). SIGTERM (a batch system's time
    limit) the same, with 143: it died without a word, its training marker left behind."""
    run = [*RUN[:-5], "--epochs", "500", "--checkpoint_every", "1", "--workdir", "stopped"]
    # Python's own SIGINT handler, even where the suite runs as a background job (which ignores SIGINT)
    stopped = subprocess.Popen(
        [sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         f"sys.argv = ['experiments', *{run!r}]; runpy.run_module('experiments', run_name='__main__')"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    while not (tmp_path / "stopped" / "checkpoints" / "2").is_dir() and stopped.poll() is None:
        time.sleep(0.02)
    stopped.send_signal(stop)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == code and err.count("\n") == 1, err
    assert not (tmp_path / "stopped" / "training.json").exists()
    assert err.startswith(f"{word}: stopped holds config.json and the history of ") and \
        "epoch(s); run the same command with --resume to go on from epoch " in err, err
    epochs = len(history(tmp_path / "stopped")["epoch"])
    assert f"the history of {epochs} epoch(s)" in err and 2 <= epochs < 500


def test_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path):
    """It said 'a run with --checkpoint_every N keeps checkpoints' to a run given --checkpoint_every 1."""
    from flaxlab.runner import _what_an_interrupted_run_left
    line = _what_an_interrupted_run_left(tmp_path, 0, object(), 1)
    assert line.endswith("it stopped before its first checkpoint (one every 1 epoch(s)), so there is nothing to go "
                         "on from: run it again, without --resume"), line
    assert _what_an_interrupted_run_left(tmp_path, 0, object(), 0).endswith("a run with --checkpoint_every N keeps "
                                                                            "checkpoints that --resume goes on from")


def test_resume_names_a_sweeps_folder(tmp_path):
    """It said the folder 'was run with other settings (--sweep)'."""
    from experiments import EXPERIMENTS
    from flaxlab.runner import check_resumable
    (tmp_path / "config.json").write_text(json.dumps({**EXPERIMENTS["mnist_cnn"](), "sweep": [{"dropout": 0.1}]}))
    with pytest.raises(UsageError, match="is a sweep's folder, and this is a single run: resume with the command"):
        check_resumable(EXPERIMENTS["mnist_cnn"](), tmp_path)


def test_a_damaged_checkpoints_abandoned_reads_are_not_logged(caplog):
    """Of the futures garbage-collected with an error never retrieved, asyncio's log loses those of TensorStore
    reads (a damaged checkpoint's: 'ERROR:asyncio:Future exception was never retrieved', or 'Task exception ...',
    with the read's spec over hundreds of characters, after the one-line error under load), and only those."""
    import asyncio
    import gc
    from flaxlab import checkpoint
    checkpoint._drop_abandoned_reads()
    loop = asyncio.new_event_loop()
    for message in ("OUT_OF_RANGE: Error reading [tensorstore_spec='{}']", "another failure"):
        future = loop.create_future()
        future.set_exception(ValueError(message))
        del future
        gc.collect()

    async def read(message):  # as orbax's async_deserialize: a task whose error nobody awaits
        raise ValueError(message)
    for message in ("OUT_OF_RANGE: Error reading [tensorstore_spec='{}']", "a task's other failure"):
        task = loop.create_task(read(message))
        loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails
        del task
        gc.collect()
    loop.close()
    logged = [r.exc_info[1].args[0] for r in caplog.records if r.name == "asyncio" and r.exc_info]
    assert logged == ["another failure", "a task's other failure"]


def test_resume_of_an_empty_folder_says_nothing_was_trained(tmp_path):
    """A Ctrl-C between making the run folder and writing its config.json left it empty, and --resume then said
    "config.json not found; is it a run folder?"."""
    from experiments import EXPERIMENTS
    with pytest.raises(UsageError, match="is empty .*: nothing to go on from; run the same command without --resume"):
        runner.check_resumable(EXPERIMENTS["mnist_cnn"](), tmp_path)


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    def error(*args):
        out = cli(*args, cwd=tmp_path)
        _, err = out.communicate(timeout=300)
        assert out.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err
    assert "--resume needs --workdir" in error(*RUN, "--resume")
    assert "not found; is" in error(*RUN, "--resume", "--workdir", "nothing-here")
    once = [*RUN[:-5], "--epochs", "1", "--checkpoint_every", "0", "--workdir", "once"]
    finished(cli(*once, cwd=tmp_path))  # its last epoch's checkpoint only
    assert sorted(p.name for p in (tmp_path / "once" / "checkpoints").iterdir()) == ["1"]
    shutil.rmtree(tmp_path / "once" / "checkpoints")
    assert "no checkpoint in" in error(*once, "--resume")
    assert cli(*once, "--resume", cwd=tmp_path).communicate(timeout=300)[0] == ""  # before the data and the program
    assert "other settings (--optimizer.lr)" in error(*once, "--resume", "--optimizer.lr", "0.1")
    assert "once is a single run's folder, and this is a sweep" in error("sweep", "mnist_cnn", "--grid", "dropout=0,0.1",
                                                                          "--resume", "--workdir", "once")
    damaged = [*RUN[:-5], "--epochs", "1", "--checkpoint_every", "1", "--workdir", "damaged"]
    finished(cli(*damaged, cwd=tmp_path))
    shutil.copytree(tmp_path / "damaged", tmp_path / "scrambled")
    for part in (tmp_path / "damaged" / "checkpoints" / "1" / "state").rglob("*"):
        if part.is_file() and part.stat().st_size > 1000:
            part.write_bytes(part.read_bytes()[:100])  # cut short, as by a full disk
    for part in (tmp_path / "scrambled" / "checkpoints" / "1" / "state").rglob("d/*"):
        part.write_bytes(bytes(range(100)))  # every array unreadable: orbax's other reads once printed 190 lines
    for args in ([*damaged, "--resume"], ["evaluate", "--workdir", "damaged"], ["figures", "--workdir", "damaged"],
                 [*damaged[:-1], "scrambled", "--resume"], ["evaluate", "--workdir", "scrambled"]):
        assert "(another model's, or damaged)" in error(*args)
    two = [*RUN[:-5], "--epochs", "2", "--checkpoint_every", "1", "--workdir", "two"]
    finished(cli(*two, cwd=tmp_path))
    config = (tmp_path / "two" / "config.json").read_text()
    shorter = [*two[:-6], "--epochs", "1", *two[-4:], "--resume"]  # once rewrote it as "2 of 1 epochs"
    assert "two has run 2 epochs already; --epochs 1 would not continue it: give --epochs 2 or more" in error(*shorter)
    assert cli(*shorter, cwd=tmp_path).communicate(timeout=300)[0] == ""  # refused before the run's first line
    assert (tmp_path / "two" / "config.json").read_text() == config


def test_a_fresh_run_in_a_used_folder_removes_the_earlier_runs_checkpoints(tmp_path):
    """Else `evaluate` (or `--resume`) would score the earlier run's states under the new run's config."""
    run = ["run", "mnist_cnn", "--quiet", "--workdir", "used"]
    finished(cli(*run, "--epochs", "2", "--checkpoint_every", "1", cwd=tmp_path))
    assert sorted(p.name for p in (tmp_path / "used" / "checkpoints").iterdir()) == ["1", "2"]
    finished(cli(*run, "--epochs", "1", "--optimizer.lr", "0.05", cwd=tmp_path))
    assert sorted(p.name for p in (tmp_path / "used" / "checkpoints").iterdir()) == ["1"]  # its own last epoch's
    run = [*run, "--epochs", "1"]
    finished(cli("sweep", "mnist_cnn", "--grid", "lr=0.1,0.05", *run[2:], cwd=tmp_path))
    assert not (tmp_path / "used" / "checkpoints").exists()
    evaluate = cli("evaluate", "--workdir", "used", cwd=tmp_path)
    _, err = evaluate.communicate(timeout=300)
    assert evaluate.returncode == 2 and "used is a sweep's folder; a sweep keeps no states once it ends" in err, err
    # nor does one kind's results pass for the other's: the run's figures were left beside the sweep's table
    names = {p.name for p in (tmp_path / "used").iterdir()}
    assert "trials.csv" in names and not names & {"confusion.png", "misclassified.png", "features.png", "filters.png"}
    finished(cli(*run, cwd=tmp_path))
    names = {p.name for p in (tmp_path / "used").iterdir()}
    assert "confusion.png" in names and not names & {"trials.csv", "results.csv", "comparison.png", "trials.png"}


def test_evaluate_reads_the_data_the_run_read(tmp_path):
    """Without --data-dir, evaluate scored the shipped sample whatever the run had trained on."""
    from test_data import fake_mnist_dir
    (tmp_path / "idx").mkdir()
    data = fake_mnist_dir(tmp_path / "idx", n_train=64, n_test=16)
    finished(cli("run", "mnist_cnn", "--data-dir", str(data), "--epochs", "1", "--checkpoint_every", "1", "--quiet",
                 "--workdir", "run", cwd=tmp_path))
    out, _ = finished(cli("evaluate", "--workdir", "run", cwd=tmp_path))
    assert f"data: files:{data.resolve()}" in out and "test (16 examples)" in out, out
    data.rename(tmp_path / "moved")
    evaluate = cli("evaluate", "--workdir", "run", cwd=tmp_path)
    _, err = evaluate.communicate(timeout=300)
    assert evaluate.returncode == 2 and "which is not there now: pass --data-dir" in err, err
    out, _ = finished(cli("evaluate", "--workdir", "run", "--data-dir", "moved", cwd=tmp_path))
    assert "test (16 examples)" in out and "note:" not in out, out  # the same files, moved
    (tmp_path / "other").mkdir()  # other data: their test split may hold the run's training images
    other = fake_mnist_dir(tmp_path / "other", n_train=48, n_test=16)
    out, _ = finished(cli("evaluate", "--workdir", "run", "--data-dir", str(other), cwd=tmp_path))
    assert f"note: run trained on files:{data.resolve()} (64 train), and these are other data (48 train)" in out, out
    recorded = json.loads((tmp_path / "run" / "history.json").read_text())
    del recorded["info"]  # no record of the data: it scored the shipped sample, and said nothing
    (tmp_path / "run" / "history.json").write_text(json.dumps(recorded))
    with pytest.raises(UsageError, match="history.json is missing or holds no record of the data the run read: "
                                         "pass --data-dir"):
        evaluate_checkpoint(tmp_path / "run")


def test_evaluate_reads_the_data_folder_and_the_source_the_run_recorded(tmp_path, monkeypatch):
    """The folder was the source's text cut at its first ' (' (GlaS's 'Warwick QU Dataset (Released 2016_07_08)'),
    and a run on the shipped sample read $FLAXLAB_DATA_DIR's files once that was set (and refused them)."""
    from experiments import EXPERIMENTS
    from test_data import fake_mnist_dir
    monkeypatch.delenv("FLAXLAB_DATA_DIR", raising=False)
    (tmp_path / "MNIST (a copy)").mkdir()
    data = fake_mnist_dir(tmp_path / "MNIST (a copy)", n_train=64, n_test=16)
    config = {**EXPERIMENTS["mnist_cnn"](), "epochs": 1}
    runner.run_experiment(config, tmp_path / "files", data_dir=str(data), progress=False, log=lambda *a: None)
    runner.run_experiment(config, tmp_path / "sample", progress=False, log=lambda *a: None)
    monkeypatch.setenv("FLAXLAB_DATA_DIR", str(data))
    for run, test_examples in (("files", 16), ("sample", 1000)):
        lines = []
        evaluate_checkpoint(tmp_path / run, log=lines.append)
        assert f"test ({test_examples:,} examples)" in lines[-1] and not any("note:" in x for x in lines), lines


@pytest.mark.parametrize("edit,message", [
    (lambda c: [1, 2, 3], "config.json holds no run's config (a JSON object)"),
    (lambda c: {**c, "model": {**c["model"], "features": "8,16,32"}},
     "config.json is damaged: --model.features must be a list of whole numbers, got '8,16,32'"),
    (lambda c: {**c, "batch_size": "abc"}, "config.json is damaged: --batch_size must be a number, got 'abc'")])
def test_predict_and_evaluate_name_a_damaged_config(tmp_path, edit, message):
    """An edited config.json: a TypeError deep in predict (evaluate's error blamed an option nobody passed)."""
    from experiments import EXPERIMENTS
    config = EXPERIMENTS["mnist_cnn"]()
    (tmp_path / "config.json").write_text(json.dumps(edit(config)))
    image = np.zeros((1, 28, 28), np.uint8)
    for call in (lambda: evaluate_checkpoint(tmp_path), lambda: predict_images(tmp_path, image)):
        with pytest.raises(UsageError, match=re.escape(f"{tmp_path}/{message}")):
            call()


def test_a_scheduled_run_resumes_only_with_its_own_epochs(tmp_path):
    from flaxlab.runner import check_resumable
    from experiments import EXPERIMENTS
    config = EXPERIMENTS["glas_fcn"]()
    config["optimizer"] = {**config["optimizer"], "schedule": "cosine"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # epoch 1's (without one, --resume has nothing to go on from)
    check_resumable(config, tmp_path)
    with pytest.raises(UsageError, match="other settings \\(--epochs\\)"):
        check_resumable({**config, "epochs": config["epochs"] + 10}, tmp_path)


def test_best_epochs_and_early_stopping_per_model():
    best = metrics.BestEpochs("val_loss", num_models=2, patience=2)
    assert best.update(1, [1.0, 1.0]).tolist() == [True, True]
    assert best.update(2, [0.5, 1.2]).tolist() == [True, False]
    assert best.update(3, [0.6, 1.1]).tolist() == [False, False] and not best.should_stop()  # model 0 stale 1
    assert best.update(4, [0.7, 1.3]).tolist() == [False, False] and best.should_stop()
    assert best.epoch == [2, 1] and best.value == [0.5, 1.0]
    again = metrics.BestEpochs("val_loss", 2, 2, state=json.loads(json.dumps(best.state())))  # as checkpointed
    assert again.should_stop() and again.epoch == [2, 1]
    accuracy = metrics.BestEpochs("val_accuracy", 1)
    assert accuracy.update(1, [0.5]).tolist() == [True] and not accuracy.update(2, [0.4])[0]
    stacked = metrics.BestEpochs("val_loss", 2, patience=2)  # seed 0 stops after epoch 3, as it would alone
    for epoch, values in enumerate([[1.0, 1.0], [1.1, 0.9], [1.2, 0.8], [0.5, 0.7]], 1):
        stacked.update(epoch, values)
    assert stacked.epoch == [1, 4] and stacked.value == [1.0, 0.7] and not stacked.should_stop()
    assert stacked.stopped().tolist() == [True, False]
    # its scores stay those of its last epoch (3): its final and best test figures are its own run's
    history = {"epoch": [1, 2, 3], "test_loss": [[1.0, 1.0], [1.1, 0.9], [1.2, 0.8]],
               "test_accuracy": [[0.5, 0.5], [0.6, 0.6], [0.4, 0.7]]}
    assert metrics.held(history, "test", {"loss": [0.5, 0.7], "accuracy": [0.9, 0.8]}, stacked) == {
        "loss": [1.2, 0.7], "accuracy": [0.4, 0.8]}
    assert metrics.held(history, "val", None, stacked) is None
    # a history written before scores were held goes on past the stop: its stop epoch's are taken, not the last's
    history = {key: values + [[0.3, 0.6]] for key, values in history.items() if key != "epoch"}
    history["epoch"] = [1, 2, 3, 4]
    assert metrics.held(history, "test", {"loss": [0.5, 0.7]}, stacked) == {"loss": [1.2, 0.7]}


def test_a_stopped_models_scores_stay_its_own_runs_through_a_resume():
    """fit itself holds them (a seed stopped at epoch 2 had the stacked program's epoch 4 as its final score), and a
    run resumed after its stop goes on holding them."""
    import copy
    val = {1: [0.5, 0.9], 2: [0.6, 0.8], 3: [0.4, 0.7], 4: [0.3, 0.6], 5: [0.2, 0.5]}  # model 0 stops after epoch 2

    class Trainer:  # scores by epoch, no network
        num_models, segmentation = 2, False

        def train_epoch(self, states, data, keys, epoch, on_step=None):
            self.epoch = epoch
            return {"w": states["w"] + 1}, {"loss": jnp.ones(2), "correct": jnp.full(2, 0.5), "count": jnp.ones(2)}

        def evaluate(self, states, split):
            scores = jnp.array(val[self.epoch]) if split == "val" else jnp.full(2, 0.1 * self.epoch)
            return {"loss": scores, "correct": scores, "count": jnp.ones(2)}

    class Saved:
        def save(self, epoch, states, best, progress, force=False):
            self.at = (states, best, copy.deepcopy(progress))

    data, quiet = {"train": None, "test": "test", "val": "val"}, lambda *a: None
    fit = functools.partial(runner.fit, Trainer(), {"w": jnp.zeros(2)}, data, None, select="val_loss", patience=1,
                            progress=False, log=quiet)
    _, _, history, selected = fit(5)
    assert selected == [1, 5] and np.allclose(history["test_accuracy"], [[0.1, 0.1], [0.2, 0.2], [0.2, 0.3],
                                                                         [0.2, 0.4], [0.2, 0.5]])
    saved = Saved()
    fit(3, checkpoints=saved)
    states, best, progress = saved.at
    _, _, resumed, _ = fit(5, resumed=(states, best, json.loads(json.dumps(progress))))
    assert {k: v for k, v in resumed.items() if k != "epoch_time_s"} == {
        k: v for k, v in history.items() if k != "epoch_time_s"}
    diverged = metrics.BestEpochs("val_loss", 1, patience=2)  # a NaN first epoch is beaten by any number
    improved = [diverged.update(e, [v])[0] for e, v in enumerate([np.nan, np.nan, 0.9, 0.5], 1)]
    assert improved == [True, False, True, True]
    assert diverged.epoch == [4] and not diverged.should_stop()


def test_checkpoint_holds_the_progress_of_its_own_epoch(tmp_path, monkeypatch):
    """orbax serialises the progress JSON in a thread after save() returns; the next epoch appends to the same
    history meanwhile (here: json.dumps made slow, as a busy CPU may)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler
    real_dumps = json.dumps

    class SlowJson:
        @staticmethod
        def dumps(x, *a, **k):
            time.sleep(0.3)
            return real_dumps(x, *a, **k)
    monkeypatch.setattr(json_checkpoint_handler, "json", SlowJson)
    checkpoints = Checkpoints(tmp_path, every=1, create=True)
    history, stale = {"epoch": [1], "train_loss": [[0.5]]}, [0]
    checkpoints.save(1, {"w": jnp.ones(3)}, None, {"epoch": 1, "history": history, "stopped": False,
                                                   "best_epochs": {"stale": stale}})
    history["epoch"].append(2), history["train_loss"].append([0.4])  # fit's next epoch
    stale[0] = 1
    checkpoints.close()
    monkeypatch.undo()
    _, _, progress = Checkpoints(tmp_path).restore({"w": jnp.zeros(3)}, with_best=False)
    assert progress["history"]["epoch"] == [1] and progress["best_epochs"]["stale"] == [0]


def test_select_models_takes_improved_models_state():
    new = {"w": jnp.ones((3, 2, 2)), "step": jnp.array([5, 5, 5])}
    kept = {"w": jnp.zeros((3, 2, 2)), "step": jnp.array([1, 2, 3])}
    out = select_models(np.array([True, False, True]), new, kept)
    chex.assert_trees_all_equal(out, {"w": jnp.stack([jnp.ones((2, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2))]),
                                      "step": jnp.array([5, 2, 5])})


def test_run_keeps_each_models_best_validation_state(tmp_path):
    from flaxlab.runner import run_experiment
    from experiments import EXPERIMENTS
    config = {**EXPERIMENTS["gtsrb_cnn"](), "epochs": 3, "seeds": 2, "checkpoint_every": 0}
    result = run_experiment(config, workdir=tmp_path / "run", progress=False, log=lambda *a: None)
    h = result.history
    chosen = result.info["selected_epochs"]
    val = np.asarray(h["val_accuracy"])
    assert chosen == [int(np.argmax(val[:, i])) + 1 for i in range(2)]  # first epoch of the highest val accuracy
    table = (tmp_path / "run" / "results.md").read_text()
    assert "test accuracy at selected epoch" in table and "val 172" not in table


def test_predict_labels_your_own_image_files_with_a_runs_kept_state(tmp_path):
    """`predict`: 20 test digits as PNG files get the run's own classes, and as dark-on-light RGB photos at 4x the
    size (--invert) nearly all the same; the probabilities are the mean over the run's two models."""
    from PIL import Image
    from flaxlab import data, runner
    finished(cli("run", "mnist_cnn", "--epochs", "2", "--seeds", "2", "--checkpoint_every", "2", "--quiet",
                 "--workdir", "run", cwd=tmp_path))
    test = data.load("mnist", source="sample").test
    (tmp_path / "digits").mkdir(), (tmp_path / "paper").mkdir()
    for i in range(20):
        Image.fromarray(test.images[i, ..., 0]).save(tmp_path / "digits" / f"{i}.png")
        photo = Image.fromarray(255 - test.images[i, ..., 0]).resize((112, 112)).convert("RGB")
        photo.save(tmp_path / "paper" / f"{i}.jpg")
    out, _ = finished(cli("predict", "--workdir", "run", "digits", "--top", "2", cwd=tmp_path))
    lines = out.splitlines()
    assert "the mean of 2 models' probabilities; images resized to 28x28, greyscale" in lines[0], out
    assert [line.split(":")[0] for line in lines[1:]] == [f"digits/{i}.png" for i in range(20)]  # 2 before 10
    top = [int(line.split(": ")[1].split(" ")[0]) for line in lines[1:]]
    assert sum(t == label for t, label in zip(top, test.labels[:20])) >= 16, (out, test.labels[:20])
    out, _ = finished(cli("predict", "--workdir", "run", "paper", cwd=tmp_path))  # ink on paper, not inverted
    assert "with --invert they would be nearer (dark and light swapped?)" in out.splitlines()[1], out
    assert all(len(line.split("%), ")) == 2 for line in lines[1:])
    probabilities = runner.predict_images(tmp_path / "run", [tmp_path / "paper"], invert=True, log=lambda *a: None)
    np.testing.assert_allclose(probabilities.sum(-1), 1, rtol=1e-5)
    assert (probabilities.argmax(-1) == np.array(top)).sum() >= 16
    assert "note:" not in cli("predict", "--workdir", "run", "paper", "--invert", cwd=tmp_path).communicate()[0]
    for i in range(3):  # a folder mixing both: the note names the swapped ones
        shutil.copy(tmp_path / "paper" / f"{i}.jpg", tmp_path / "digits" / f"paper-{i}.jpg")
    out, _ = finished(cli("predict", "--workdir", "run", "digits", cwd=tmp_path))
    assert ("note: 3 of 23 images (digits/paper-0.jpg, digits/paper-1.jpg, digits/paper-2.jpg) look dark and light "
            "swapped against the training images (mean pixel 33 of 255): predict them again with --invert") in out
    for i in range(3):
        (tmp_path / "digits" / f"paper-{i}.jpg").unlink()
    loaded = runner.load_run(tmp_path / "run")  # from Python: the network and each model's variables
    assert len(loaded.variables) == 2 and loaded.epoch == 2 and loaded.selected_epochs is None
    assert loaded.class_names == tuple(map(str, range(10))) and loaded.config["seeds"] == 2
    logits = loaded.logits(test.images[:20])
    predicted = runner.predict_images(tmp_path / "run", test.images[:20], log=lambda *a: None)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)).mean(0), predicted, atol=1e-6)
    np.testing.assert_array_equal(loaded.logits(test.images[:20], model=1), logits[1])

    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    for paths, options, message in (([tmp_path / "nothing.png"], {}, "nothing.png not found"),
                                    ([tmp_path / "notes.png"], {}, "notes.png: not an image file that Pillow can read"),
                                    ([tmp_path / "empty"], {}, "no image files"),
                                    ([tmp_path / "digits"], {"top": 0}, "--top must be at least 1"),
                                    ([tmp_path / "digits"], {"out": tmp_path / "o"}, "--out is for segmentation")):
        with pytest.raises((UsageError, DataError), match=message):
            runner.predict_images(tmp_path / "run", paths, log=lambda *a: None, **options)
    finished(cli("run", "mnist_cnn", "--epochs", "1", "--quiet", "--workdir", "default", cwd=tmp_path))
    out, _ = finished(cli("predict", "--workdir", "default", "digits", "--top", "1", cwd=tmp_path))
    assert "the state of epoch 1's checkpoint" in out  # every run keeps its last epoch's
    shutil.rmtree(tmp_path / "default" / "checkpoints")
    missing = cli("predict", "--workdir", "default", "digits", cwd=tmp_path)
    out, err = missing.communicate(timeout=300)
    assert missing.returncode == 2 and err.count("\n") == 1 and "a run keeps one when it ends" in err, err


def test_predict_writes_a_segmentation_runs_masks_at_each_images_size(tmp_path):
    from PIL import Image
    from flaxlab import data, runner
    finished(cli("run", "glas_fcn", "--epochs", "1", "--checkpoint_every", "1", "--quiet", "--workdir", "run",
                 cwd=tmp_path))
    images = data.load("glas", source="sample").test.images
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "a" / "one.png")
    Image.fromarray(images[1]).resize((90, 70)).save(tmp_path / "a" / "two.jpg")
    Image.fromarray(images[2]).save(tmp_path / "b" / "one.png")
    probabilities = runner.predict_images(tmp_path / "run", [tmp_path / "a"], log=lambda *a: None)
    assert probabilities.shape == (2, *images.shape[1:3], 2)
    masks = tmp_path / "run" / "predicted-masks"
    assert sorted(p.name for p in masks.iterdir()) == ["one.png", "two.png"]
    two = np.asarray(Image.open(masks / "two.png"))
    assert two.shape == (70, 90) and set(np.unique(two)) <= {0, 255}
    with pytest.raises(DataError, match="missing.png not found"):  # a failed predict leaves the last masks alone
        runner.predict_images(tmp_path / "run", [tmp_path / "missing.png"], log=lambda *a: None)
    assert sorted(p.name for p in masks.iterdir()) == ["one.png", "two.png"]
    runner.predict_images(tmp_path / "run", [tmp_path / "b"], log=lambda *a: None)  # its masks replace the last's
    assert sorted(p.name for p in masks.iterdir()) == ["one.png"]
    runner.predict_images(tmp_path / "run", [tmp_path / "b" / "one.png", tmp_path / "b"], log=lambda *a: None)
    assert sorted(p.name for p in masks.iterdir()) == ["one.png"]  # one image given twice: one mask, no refusal
    with pytest.raises(UsageError, match="a is not empty: name another with --out DIR"):  # other files are kept
        runner.predict_images(tmp_path / "run", [tmp_path / "b"], out=tmp_path / "a", log=lambda *a: None)
    with pytest.raises(UsageError, match="two images named one"):
        runner.predict_images(tmp_path / "run", [tmp_path / "a", tmp_path / "b"], out=tmp_path / "o",
                              log=lambda *a: None)
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="--top is for classification runs"):  # it went unused without a word
        runner.predict_images(tmp_path / "run", [tmp_path / "b"], top=2, out=tmp_path / "o", log=lambda *a: None)
    Image.fromarray(images[0][:3, :5]).save(tmp_path / "tiny.png")  # a 3x5 image came out 93% gland unsaid
    said = []
    runner.predict_images(tmp_path / "run", [tmp_path / "tiny.png"], out=tmp_path / "t", log=said.append)
    assert any(line.startswith("note: 1 image far smaller than the 128x128 the network learnt from") and
               "tiny.png (3x5)" in line for line in said), said


def test_a_data_parallel_run_resumed_on_other_devices_is_warned_of(tmp_path):
    """A run on 4 devices resumed with JAX_NUM_CPU_DEVICES=1 went on with other batches, unsaid (--devices 1 is
    refused as another setting): each device permutes its own shard of the training set."""
    from types import SimpleNamespace
    from flaxlab.runner import resumed_devices_warning
    for info, shards, warned in (({"devices": 4, "parallel": "data"}, 1, True), ({"devices": 4, "parallel": "data"}, 4,
                                 False), ({"devices": 4, "parallel": "seeds"}, 1, False), ({"devices": 1}, 2, True)):
        (tmp_path / "history.json").write_text(json.dumps({"info": info}))
        warning = resumed_devices_warning(tmp_path, SimpleNamespace(shards=shards))
        assert bool(warning) == warned and (not warned or f"over {shards}: each device draws" in warning)
