"""`compare`: runs and sweeps trained apart, read back from their folders into one table and one figure."""
import csv
import json
import socket

import pytest

from conftest import small_dataset
from test_cli import cli
from test_sweep import cnn, quiet

from flaxlab import compare
from flaxlab import data as data_lib
from flaxlab.compare import compare_runs
from flaxlab.errors import UsageError
from flaxlab.runner import run_experiment
from flaxlab.sweep import run_sweep


@pytest.fixture(scope="module")
def folders(tmp_path_factory, mnist_sample):
    """Three runs of one experiment (two selecting their best-val epoch) and a two-variant sweep, on 1,000 digits."""
    root = tmp_path_factory.mktemp("runs")
    data = small_dataset(mnist_sample, 1000, 300)
    with_val = data_lib.Dataset(data.name, data.source, data.train, data.test, 10, val=data.test)
    run_experiment(cnn(epochs=2), root / "plain", dataset=data, log=quiet, progress=False)
    for lr in (0.05, 0.2):
        run_experiment(cnn(epochs=2, best_metric="val_accuracy", **{"optimizer.lr": lr, "data.val_fraction": 0.1}),
                       root / f"lr{lr}", dataset=with_val, log=quiet, progress=False)
    run_sweep(cnn(epochs=2), [{"optimizer.lr": 0.1}, {"optimizer.lr": 0.3}], root / "swept", dataset=data,
              log=quiet, progress=False)
    return root


def test_runs_and_a_sweeps_variants_side_by_side(folders, tmp_path):
    lines = []
    rows = compare_runs([folders / "plain", folders / "lr0.05", folders / "swept"], tmp_path / "out",
                        log=lines.append)
    assert [(r["variant"], r["program"]) for r in rows] == [
        (f"cnn ({folders / 'plain'})", 1), (f"cnn ({folders / 'lr0.05'})", 2), ("cnn: lr=0.1", 3), ("cnn: lr=0.3", 3)]
    plain = json.loads((folders / "plain" / "history.json").read_text())["history"]
    assert rows[0]["test_accuracy_mean"] == pytest.approx(plain["test_accuracy"][-1][0])
    sweep_rows = {r["variant"]: r for r in csv.DictReader(open(folders / "swept" / "results.csv"))}
    assert rows[3]["test_accuracy_mean"] == pytest.approx(float(sweep_rows["lr=0.3"]["test_accuracy_mean"]))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "compare.json", "comparison.png", "results.csv", "results.md", "trials.csv"]
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 10_000
    assert lines[-1].startswith(
        f"run 1: {folders / 'plain'} (cnn)\nrun 2: {folders / 'lr0.05'} (cnn; against run 1: "
        "best_metric '' -> val_accuracy, data.val_fraction 0.0 -> 0.1, optimizer.lr 0.1 -> 0.05)\n"
        f"run 3: {folders / 'swept'} (cnn, a sweep of 2 variants)\n  - lr=0.3: optimizer.lr 0.1 -> 0.3\n\n")
    assert f"- run 3: {folders / 'swept'} (cnn, a sweep of 2 variants)\n  - lr=0.3: optimizer.lr 0.1 -> 0.3\n" in (
        tmp_path / "out" / "results.md").read_text()
    assert "\n| variant | run | seeds | final test accuracy" in lines[-1]
    # the run with a validation split was tested on the same test images: no note about different data
    assert not any(line.startswith("note:") for line in lines)
    # all select a best epoch, or the trial table shows final scores only
    assert "selected epoch" not in (tmp_path / "out" / "results.md").read_text()
    compare_runs([folders / "lr0.05", folders / "lr0.2"], tmp_path / "selecting", log=lines.append)
    text = (tmp_path / "selecting" / "results.md").read_text()
    assert "| selected epoch | val accuracy | test accuracy |" in text
    compare_runs([folders / "lr0.05", folders / "swept"], tmp_path / "out", log=lines.append)  # reused folder
    assert "| cnn: lr=0.3 | 2 |" in (tmp_path / "out" / "results.md").read_text()


def test_an_unfinished_run_is_said_to_be_scored_at_its_last_epoch(folders, tmp_path):
    """A run stopped after 1 of 2 epochs was ranked by that epoch's scores as if it had finished."""
    import shutil
    shutil.copytree(folders / "plain", tmp_path / "stopped")
    recorded = json.loads((tmp_path / "stopped" / "history.json").read_text())
    del recorded["info"]["train_s"]  # written when a run ends
    recorded["history"] = {key: values[:1] for key, values in recorded["history"].items()}
    (tmp_path / "stopped" / "history.json").write_text(json.dumps(recorded))
    lines = []
    compare_runs([folders / "plain", tmp_path / "stopped"], tmp_path / "out", log=lines.append)
    assert f"run 1: {folders / 'plain'} (cnn)\nrun 2: {tmp_path / 'stopped'} (cnn; unfinished, stopped: scores of " \
           "its last epoch)\n" in lines[-1]


def test_runs_scored_at_another_size_are_noted_as_tested_on_different_data(folders, tmp_path):
    """The same test files at another --data.size (Dice on downsampled masks) went unnoted."""
    import shutil
    shutil.copytree(folders / "plain", tmp_path / "small")
    recorded = json.loads((tmp_path / "small" / "history.json").read_text())
    recorded["info"]["data"]["image_shape"] = [14, 14, 1]
    (tmp_path / "small" / "history.json").write_text(json.dumps(recorded))
    lines = []
    compare_runs([folders / "plain", tmp_path / "small"], tmp_path / "out", log=lines.append)
    note = next(line for line in lines if line.startswith("note:"))
    assert "tested on different data" in note and "300 test, 14x14)" in note and "300 test, 28x28)" in note
    assert note.index("run 1: ") < note.index("300 test, 28x28); run 2: ") < note.index("300 test, 14x14)")  # sorted


def test_bad_input_is_one_line(folders, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((folders / "plain" / "config.json").read_text())
    (damaged / "history.json").write_text('{"history": {"epoch": [1]}}')
    plain = json.loads((folders / "plain" / "history.json").read_text())
    edits = {"longer": lambda h: h["history"]["epoch"].append(3),  # a list cut or grown: matplotlib's traceback
             "strings": lambda h: h["history"]["test_accuracy"].__setitem__(0, ["0.88"]),  # numpy's
             "data": lambda h: h["info"].__setitem__("data", "oops"),  # an AttributeError
             "scalars": lambda h: h["history"].__setitem__("test_accuracy", [a[0] for a in h["history"]
                                                                             ["test_accuracy"]])}  # len() of a number
    for name, edit in edits.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((folders / "plain" / "config.json").read_text())
        edit(edited := json.loads(json.dumps(plain)))
        (tmp_path / name / "history.json").write_text(json.dumps(edited))
    for args, message in (
            *[([str(folders / "plain"), str(tmp_path / name)], f"{tmp_path / name}/history.json is damaged or not a "
               "flaxlab run's") for name in edits],
            ([str(folders / "plain")], "compare needs two run folders or more (or a sweep's)"),
            ([str(folders / "plain"), str(tmp_path)], f"{tmp_path} has no readable history.json and config.json"),
            ([str(folders / "plain"), "nosuch"], "nosuch: no such folder"),
            (["nosuch"], "nosuch: no such folder"),  # was "compare needs two run folders"
            ([str(folders / "plain"), str(damaged)], f"{damaged}/history.json is damaged or not a flaxlab run's"),
            ([str(folders / "plain"), str(folders / "swept"), str(folders / "plain")],
             f"{folders / 'plain'} is given twice"),
            ([str(folders / "plain"), str(folders / "swept"), "--out", str(tmp_path)],
             f"--out {tmp_path} holds files that compare did not write (damaged, data, longer)"),
            ([str(folders / "plain"), str(folders / "swept"), "--epochs", "3"], "unexpected argument '--epochs'")):
        out = cli("compare", *args, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.startswith(f"error: {message}") and out.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["damaged", *edits, "notes.txt"])  # nothing written


def test_classification_and_segmentation_are_not_compared(folders, tmp_path):
    segmentation = tmp_path / "seg"
    segmentation.mkdir()
    (segmentation / "config.json").write_text(json.dumps({"name": "glas_fcn", "seed": 0}))
    (segmentation / "history.json").write_text(json.dumps({"info": {}, "history": {
        "epoch": [1], "train_loss": [[0.5]], "test_loss": [[0.5]], "train_accuracy": [[0.8]],
        "test_accuracy": [[0.8]], "train_dice": [[0.6]], "test_dice": [[0.6]]}}))
    with pytest.raises(UsageError, match="classification runs or segmentation runs, not both"):
        compare_runs([folders / "plain", segmentation], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_segmentation_runs_are_compared_with_their_per_image_std_and_min(tmp_path):
    """The JSRT report gives F1 mean, std and min over the test images: a run's scores.json and a sweep's trials.csv
    hold them, and compare's trial table gives them (it gave the mean alone)."""
    history = {"epoch": [1], "train_loss": [[0.5]], "test_loss": [[0.5]], "train_accuracy": [[0.8]],
               "test_accuracy": [[0.8]], "train_dice": [[0.6]], "test_dice": [[0.7]]}
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    run.mkdir()
    sweep.mkdir()
    (run / "config.json").write_text(json.dumps({"name": "jsrt_unet", "seed": 0}))
    (run / "history.json").write_text(json.dumps({"info": {}, "history": history}))
    (run / "scores.json").write_text(json.dumps({"per_seed": [[0.5, 0.7, 0.9]]}))
    (sweep / "config.json").write_text(json.dumps({"name": "jsrt_unet", "seed": 0, "sweep": [{"label": "elu"}]}))
    (sweep / "history.json").write_text(json.dumps({"variants": {"elu": history}}))
    (sweep / "trials.csv").write_text("variant,trial,seed,test_images_std,test_images_min,final_test_dice\n"
                                      "elu,1,0,0.05,0.4,0.7\n")
    compare_runs([run, sweep], tmp_path / "out")
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| std over test images | min over test images | final test dice |" in table
    assert "| 0.1633 | 0.5000 | 0.7000 |" in table and "| 0.0500 | 0.4000 | 0.7000 |" in table
    for damaged in ("[1, 2]", '{"per_seed": [["a"]]}'):  # an edited file: left out too (a list was a traceback)
        (run / "scores.json").write_text(damaged)
        compare_runs([run, sweep], tmp_path / f"out-{len(damaged)}")
        assert "std over test images" not in (tmp_path / f"out-{len(damaged)}" / "results.md").read_text()
    (run / "scores.json").unlink()  # a run without them: the columns are left out, not made up
    compare_runs([run, sweep], tmp_path / "out2")
    assert "std over test images" not in (tmp_path / "out2" / "results.md").read_text()


def test_runs_lists_each_folder_with_its_state_and_score(folders, tmp_path, mnist_sample):
    """`runs`: finished runs and sweeps with their final score (a sweep's best variant), and where a stopped one
    stands: the checkpoint --resume goes on from, the variants a sweep finished, no epoch yet, a damaged history."""
    import shutil
    from test_sweep import stop_at
    from flaxlab.compare import list_runs
    from flaxlab.sweep import parse_grid
    for name in ("plain", "swept", "lr0.05"):
        shutil.copytree(folders / name, tmp_path / name)
    data = small_dataset(mnist_sample, 256, 64)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cnn(epochs=3, checkpoint_every=1), tmp_path / "stopped", dataset=data, log=stop_at("epoch 2/3"))
    config = cnn(epochs=1)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, parse_grid(config, ["model.features=4/4,8"]), tmp_path / "stopped-sweep", dataset=data,
                  log=stop_at("program 2/2"))
    (tmp_path / "new").mkdir()
    shutil.copy(tmp_path / "plain" / "config.json", tmp_path / "new")
    shutil.copytree(tmp_path / "plain", tmp_path / "damaged")
    (tmp_path / "damaged" / "history.json").write_text("{")
    shutil.copytree(tmp_path / "plain", tmp_path / "damaged-config")
    (tmp_path / "damaged-config" / "config.json").write_text("{")  # it went unlisted
    (tmp_path / "notes").mkdir()  # not a run folder: left out
    shutil.copytree(tmp_path / "plain", tmp_path / "early")  # as if --patience had stopped it after 2 of 5 epochs
    early = json.loads((tmp_path / "early" / "config.json").read_text())
    (tmp_path / "early" / "config.json").write_text(json.dumps({**early, "epochs": 5}))
    plain = json.loads((folders / "plain" / "history.json").read_text())["history"]["test_accuracy"][-1][0]
    swept = json.loads((folders / "swept" / "history.json").read_text())["variants"]
    best = max(swept, key=lambda label: swept[label]["test_accuracy"][-1][0])
    selecting = json.loads((folders / "lr0.05" / "history.json").read_text())
    selected = selecting["history"]["test_accuracy"][selecting["info"]["selected_epochs"][0] - 1][0]
    rows = [line.split(" | ")[1:-1] for line in list_runs(tmp_path).splitlines()[2:]]
    assert rows == [
        ["cnn", "", "", "history.json damaged", ""], ["", "", "", "config.json damaged", ""],
        ["cnn", "1", "2 of 5", "finished, stopped early", f"{100 * plain:.2f}% accuracy, final"],
        ["cnn", "1", "2 of 2", "finished", f"{100 * selected:.2f}% accuracy, selected epoch"],  # results.md's
        ["cnn", "", "0 of 2", "stopped before its first epoch ended", ""],
        ["cnn", "1", "2 of 2", "finished", f"{100 * plain:.2f}% accuracy, final"],
        ["cnn", "1", "2 of 3", "stopped; --resume goes on from epoch 2's checkpoint", rows[6][-1]],
        ["cnn", "1", "1 of 1", "stopped: 1 of 2 variants", rows[7][-1]],
        ["cnn", "2", "2 of 2", "finished",
         f"{100 * swept[best]['test_accuracy'][-1][0]:.2f}% accuracy, final ({best}, the best)"]]
    assert [line.split(" | ")[0] for line in list_runs(tmp_path).splitlines()[2:]] == [
        f"| {tmp_path / name}" for name in ("damaged", "damaged-config", "early", "lr0.05", "new", "plain", "stopped",
                                             "stopped-sweep", "swept")]
    assert len(list_runs(tmp_path / "plain").splitlines()) == 3  # a run folder itself
    (tmp_path / "damaged" / "history.json").write_text("[]")  # JSON, but no run's record: no "stopped" run
    assert list_runs(tmp_path / "damaged").splitlines()[2].split(" | ")[4] == "history.json damaged"
    sweep = json.loads((tmp_path / "swept" / "config.json").read_text())
    (tmp_path / "swept" / "config.json").write_text(json.dumps({**sweep, "sweep": "dropout"}))  # listed 7 variants
    assert list_runs(tmp_path / "swept").splitlines()[2].split(" | ")[4] == "config.json damaged"
    with pytest.raises(UsageError, match=f"{tmp_path / 'swept'}/config.json is damaged: the sweep must be a list"):
        compare_runs([tmp_path / "plain", tmp_path / "swept"], tmp_path / "out")
    with pytest.raises(UsageError, match="config.json: a file, not a folder"):
        list_runs(tmp_path / "plain" / "config.json")
    assert list_runs(tmp_path / "notes") == f"no run folders in {tmp_path / 'notes'}"
    assert cli("runs", str(tmp_path / "missing"), cwd=tmp_path).stderr == f"error: {tmp_path / 'missing'}: no such folder\n"
    assert cli("runs", cwd=tmp_path / "notes").stdout.startswith("no runs yet: runs/ does not exist here")  # a first use


def test_a_run_in_training_is_listed_so_and_its_folder_refused(tmp_path, mnist_sample):
    """training.json names the process while it trains (gone when the run ends, or stopped by Ctrl-C): `runs`
    says 'training' while that process lives on this machine, 'stopped' once it is gone (killed: the file stays),
    and a second launch into the folder is refused while it lives."""
    import socket
    import subprocess
    import sys
    from test_sweep import stop_at
    from flaxlab.compare import list_runs
    data = small_dataset(mnist_sample, 256, 64)
    seen = []

    def log(line):
        if line.startswith("epoch 1/"):
            seen.append(json.loads((tmp_path / "run" / "training.json").read_text()))
        stop_at("epoch 2/3")(line)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cnn(epochs=3), tmp_path / "run", dataset=data, log=log)
    assert seen[0]["host"] == socket.gethostname() and seen[0]["pid"] > 0
    assert not (tmp_path / "run" / "training.json").exists()
    state = lambda: list_runs(tmp_path / "run").splitlines()[2].split(" | ")[4]  # noqa: E731
    assert state() == "stopped"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        marker = {**seen[0], "pid": alive.pid, "process_start": None}
        (tmp_path / "run" / "training.json").write_text(json.dumps(marker))
        assert state() == f"training (pid {alive.pid} on {socket.gethostname()} since {seen[0]['since'].replace('T', ' ')})"
        with pytest.raises(UsageError, match=f"--workdir {tmp_path / 'run'}: a run is training there \\(pid {alive.pid} "):
            run_experiment(cnn(epochs=1), tmp_path / "run", dataset=data, log=quiet)
        with pytest.raises(UsageError, match="a run is training there"):
            run_sweep(cnn(epochs=1), [{}], tmp_path / "run", dataset=data, log=quiet)
        (tmp_path / "run" / "training.json").unlink()  # the other launch marks it while this one compiles:

        def marked_meanwhile(line):
            if line.startswith("compiled in"):
                (tmp_path / "run" / "training.json").write_text(json.dumps(marker))
        files = sorted(p.name for p in (tmp_path / "run").iterdir())
        with pytest.raises(UsageError, match="a run is training there"):
            run_experiment(cnn(epochs=1), tmp_path / "run", dataset=data, log=marked_meanwhile)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == files + ["training.json"]
        assert json.loads((tmp_path / "run" / "training.json").read_text()) == marker  # the other's, left alone
    finally:
        alive.kill()
        alive.wait()
    assert state() == "stopped"  # its process is gone: killed, as a lost Colab runtime would be
    (tmp_path / "run" / "training.json").write_text(json.dumps({**marker, "host": "elsewhere"}))
    assert state().startswith(f"training or stopped (pid {alive.pid} on elsewhere since ")
    run_experiment(cnn(epochs=1), tmp_path / "run", dataset=data, log=quiet)  # a gone process's marker: no refusal
    assert not (tmp_path / "run" / "training.json").exists() and state() == "finished"


CLAIMANT = """
import os, socket, sys, time
from pathlib import Path
from flaxlab import runner
from flaxlab.errors import UsageError
check = runner._refuse_if_training
runner._refuse_if_training = lambda workdir: (check(workdir), time.sleep(1.5))  # the race's window widened
runner.FOLDER_LOCK_WAIT_S = 30
print("ready", flush=True)
sys.stdin.readline()
try:
    runner._claim(Path(sys.argv[1]) / runner.TRAINING_MARKER, {"pid": os.getpid(), "host": socket.gethostname(),
                  "process_start": runner._process_start(os.getpid()), "since": "2026-12-07T00:00:00"})
    print("claimed", flush=True)
except UsageError as e:
    print(e, flush=True)
sys.stdin.readline()  # alive until both have tried: a claimant's marker names a live process
"""


def test_two_launches_finding_a_stopped_runs_marker_do_not_both_claim_the_folder(tmp_path):
    """Both found the stopped run's marker stale, then each replaced it in turn, and both trained in one folder:
    the folder is locked from the check to the claim."""
    import os
    import subprocess
    import sys
    from conftest import REPO
    marker = tmp_path / "training.json"
    marker.write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname(), "since": "2026-12-06T00:00:00"}))
    children = [subprocess.Popen([sys.executable, "-c", CLAIMANT, str(tmp_path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                for _ in range(2)]
    try:
        assert [child.stdout.readline() for child in children] == ["ready\n"] * 2
        for child in children:  # both claim at once
            child.stdin.write("go\n")
            child.stdin.flush()
        outcomes = sorted((child.stdout.readline().strip() for child in children), key=lambda said: said != "claimed")
    finally:
        for child in children:
            child.communicate("end\n", timeout=30)
    assert outcomes[0] == "claimed" and "a run is training there" in outcomes[1], outcomes
    assert json.loads(marker.read_text())["pid"] in {child.pid for child in children}


def test_a_claim_does_not_wait_for_ever_on_a_folder_locked_around_the_run(tmp_path):
    """`flock DIR python -m experiments run --workdir DIR`: the run waited for its own wrapper's lock, unsaid."""
    import fcntl
    import os
    import time
    from flaxlab import runner
    wrapper = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(wrapper, fcntl.LOCK_EX)
    try:
        start = time.monotonic()
        runner._claim(tmp_path / runner.TRAINING_MARKER, {"pid": os.getpid()})
        assert time.monotonic() - start < runner.FOLDER_LOCK_WAIT_S + 5
    finally:
        os.close(wrapper)
    assert json.loads((tmp_path / runner.TRAINING_MARKER).read_text()) == {"pid": os.getpid()}


def test_a_sweeps_variant_is_compared_with_every_field_it_sets():
    config = {**cnn(), "sweep": [{"label": "SGD"}, {"label": "Rprop", "optimizer.name": "rprop", "optimizer.lr": 1e-3},
                                 {"label": "gone", "no.such": 1}]}
    rprop = compare._variant_config(config, "Rprop")
    assert rprop["optimizer"]["name"] == "rprop" and config["optimizer"]["name"] == "sgd"
    assert compare.differences(rprop, cnn()) == ["optimizer.lr 0.1 -> 0.001", "optimizer.name sgd -> rprop"]
    assert compare.differences({**cnn(), "data": {**cnn()["data"], "size": (28, 28)}}, cnn()) == [
        "data.size (empty) -> 28,28"]
    assert compare._variant_config(config, "gone") == config  # a field this flaxlab lacks: the label says it


def test_differences_name_only_changed_options():
    """`run mnist_cnn --model.features 8,16,32` (the default, parsed as a list) changed nothing to name."""
    from experiments import EXPERIMENTS
    experiment = EXPERIMENTS["mnist_cnn"]()
    config = {**experiment, "epochs": 3, "model": {**experiment["model"], "features": [8, 16, 32]}}
    assert compare.differences(config, experiment) == ["epochs 20 -> 3"]
    # another network is one entry with its options, not every option of the old one as gone
    mlp = {**experiment, "model": {"name": "mlp", "hidden": [64]}}
    assert compare.differences(mlp, experiment) == ["model.name small_cnn -> mlp (hidden=64)"]
