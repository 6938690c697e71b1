"""The CIFAR-10 and GTSRB experiments end to end on the shipped samples (and GTSRB on the real data
when ../shared is there): run folders, splits, selected epochs, figures, and one-line errors."""
import json
import re

import pytest

from experiments import EXPERIMENTS
from flaxlab import image_data, plots
from flaxlab.errors import UsageError
from flaxlab.models import count_params, make_model
from flaxlab.runner import run_experiment
from test_cli import cli


def quiet(config, tmp_path, **fields):
    config = {**config, "epochs": 1, "seeds": 1, "checkpoint_every": 0, **fields}
    return run_experiment(config, workdir=tmp_path / config["name"], progress=False, log=lambda *a: None)


@pytest.mark.parametrize("name", ["tdt4265_cnn", "tdt4265_model2", "bs6207_allconv_bn", "gtsrb_cnn_augment"])
def test_image_experiment_writes_its_run_folder(tmp_path, name, monkeypatch):
    eval_flip = name == "bs6207_allconv_bn"  # scored on each image and its mirror
    titles, draw = [], plots.feature_maps_figure
    monkeypatch.setattr(plots, "feature_maps_figure", lambda *a: titles.append(a[3]) or draw(*a))
    result = quiet(EXPERIMENTS[name](), tmp_path, epochs=2, eval_flip=eval_flip)
    names = json.loads((result.workdir / "history.json").read_text())["info"]["data"]["class_names"]
    assert len(titles) == 1 and re.fullmatch(rf".*: Conv_0 on test image 0 \(({'|'.join(map(re.escape, names))})\)",
                                             titles[0]), titles
    files = {p.name for p in result.workdir.iterdir()}
    assert {"config.json", "history.json", "results.md", "curves.png", "confusion.png", "misclassified.png",
            "filters.png", "features.png"} <= files
    history = json.loads((result.workdir / "history.json").read_text())
    assert len(history["history"]["val_accuracy"]) == 2 and history["info"]["data"]["val_examples"] > 0
    assert history["info"]["data"]["source"].startswith("sample:")
    assert result.info["selected_epochs"][0] in (1, 2)
    assert titles[0].startswith(f"{name} (seed 0, selected epoch {result.info['selected_epochs'][0]}): Conv_0")
    assert "at selected epoch" in (result.workdir / "results.md").read_text()
    assert ("left-right mirror (logits averaged)" in (result.workdir / "results.md").read_text()) == eval_flip
    names = image_data.CIFAR10_CLASSES if name != "gtsrb_cnn_augment" else image_data.GTSRB_CLASSES
    assert history["info"]["data"]["class_names"] == list(names)  # what `predict` names its answers by
    pairs = (result.workdir / "results.md").read_text().split("Most confused classes")[1].splitlines()[4]
    assert pairs.split("|")[1].strip() in names  # the table names classes as the data set does


def test_early_stopping_ends_the_run(tmp_path):
    # SGD at lr 5 diverges within a few epochs, after which the val loss (NaN) never improves again
    result = quiet(EXPERIMENTS["tdt4265_cnn"](), tmp_path, epochs=8, patience=1, optimizer={
        **EXPERIMENTS["tdt4265_cnn"]()["optimizer"], "lr": 5.0})
    epochs_run, selected = len(result.history["epoch"]), result.info["selected_epochs"][0]
    assert epochs_run < 8 and epochs_run == selected + 1  # stopped one epoch (the patience) after its best
    assert result.info["stopped_epochs"] == [epochs_run]
    assert f"{epochs_run} of 8 epochs" in (result.workdir / "results.md").read_text()


def test_report_networks_have_the_reports_sizes():
    import jax
    import jax.numpy as jnp
    for name, shape, classes, weights in (("gtsrb_cnn", (28, 28, 3), 43, 87_403),
                                          ("tdt4265_cnn", (32, 32, 3), 10, 390_410),
                                          ("bs6207_allconv", (32, 32, 3), 10, 294_810),
                                          ("ai604_vgg19", (32, 32, 3), 10, 20_353_994)):
        model = make_model({"name": name}, classes)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))["params"]
        assert count_params(params) == weights, name


@pytest.mark.parametrize("args,message", [
    (["run", "gtsrb_cnn", "--data.val_fraction", "0.1"], "leaves nothing to hold out (whole tracks"),
    (["run", "gtsrb_cnn", "--data.val_fraction", "0"], "--best_metric val_accuracy needs a validation split"),
    (["run", "tdt4265_cnn", "--best_metric", "test_accuracy"], "unknown value 'test_accuracy' for --best_metric"),
    (["run", "bs6207_allconv", "--data.size", "32"], "--data.size must be HEIGHT,WIDTH"),
    (["run", "gtsrb_cnn", "--data.size", "4,4"],
     "gtsrb_cnn cannot take 4x4 images: its convolutions and pools shrink them to nothing; it takes e.g. --data.size 16,16"),
    (["run", "bs6207_allconv", "--features.layer", "Conv_99"], "'Conv_99' is not a layer of bs6207_allconv"),
    (["run", "bs6207_allconv", "--features.image", "5000"], "beyond the test split"),
    (["run", "gtsrb_cnn", "--data.source", "tfds"], "TFDS has no gtsrb"),
    (["run", "gtsrb_cnn", "--augment.jitter", "1.5"], "--augment.jitter must be below 1"),
    (["bench", "tdt4265_cnn", "--peer"], "the PyTorch peer has no 'tdt4265_cnn'"),
])
def test_bad_image_options_are_one_line_exit_2(tmp_path, args, message):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_gtsrb_cnn_learns_real_signs_split_by_track(shared_data, tmp_path):
    if not (shared_data / "gtsrb-train-32px.tar.xz").is_file():
        pytest.skip("gtsrb-train-32px.tar.xz not in ../shared/data")
    from flaxlab import data
    dataset = data.load(data_dir=shared_data, **{**EXPERIMENTS["gtsrb_cnn"]()["data"], "source": "files"})
    config = {**EXPERIMENTS["gtsrb_cnn"](), "features": {"layer": "Conv_1", "image": 3}}
    result = run_experiment({**config, "epochs": 1, "seeds": 1, "checkpoint_every": 0}, workdir=tmp_path / "run",
                            dataset=dataset, progress=False, log=lambda *a: None)
    assert len(dataset.test) == 3915 and dataset.num_classes == 43
    assert result.history["test_accuracy"][-1][0] > 0.6  # one epoch; 10 epochs reach ~90% (README)


def test_figures_from_a_runs_checkpoint(tmp_path, capsys):
    from experiments.cli import main
    result = quiet(EXPERIMENTS["gtsrb_cnn"](), tmp_path, checkpoint_every=1)
    assert main(["figures", "--workdir", str(result.workdir), "--layer", "Activation_1", "--image", "7"]) == 0
    assert "from the best-validation state (epoch 1) kept in epoch 1's checkpoint" in capsys.readouterr().out
    from PIL import Image
    assert Image.open(result.workdir / "features-Activation_1-7.png").size[0] > 300
    assert main(["figures", "--workdir", str(result.workdir), "--layer", "Dense_0"]) == 2  # not a map
    assert "error: --layer Dense_0 puts out" in capsys.readouterr().err  # figures' option, not the run's
    assert main(["figures", "--workdir", str(tmp_path / "none")]) == 2
    assert f"--workdir {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    assert main(["evaluate", "--workdir", str(result.workdir), "--flip"]) == 0  # allowed, with a word
    assert "warning: --flip on gtsrb: a mirrored 'keep left' sign is 'keep right'" in capsys.readouterr().out
    from flaxlab import runner
    with pytest.MonkeyPatch.context() as patch:  # a read-only folder (root writes anywhere, so made up here)
        patch.setattr(runner, "unwritable", lambda folder: f"cannot write in {folder}")
        assert main(["figures", "--workdir", str(result.workdir)]) == 2  # was PIL's traceback
    assert "figures are drawn into the run folder" in capsys.readouterr().err


def test_flips_on_data_whose_classes_a_mirror_changes_are_warned_of():
    from flaxlab.runner import flip_warning
    gtsrb = EXPERIMENTS["gtsrb_cnn"]()
    assert flip_warning(gtsrb) is None
    assert flip_warning({**gtsrb, "augment": {**gtsrb["augment"], "flip_lr": True}, "eval_flip": True}).startswith(
        "--augment.flip_lr and --eval_flip on gtsrb: a mirrored 'keep left' sign is 'keep right'")
    cnn = EXPERIMENTS["mnist_cnn"]()
    assert flip_warning({**cnn, "augment": {**cnn["augment"], "flip_ud": True}}).startswith(
        "--augment.flip_ud on mnist: most digits mirrored are no digit, and a 6 upside down is a 9")
    assert flip_warning(EXPERIMENTS["bs6207_allconv"]()) is None  # CIFAR-10's classes are mirror images of themselves
    assert flip_warning(EXPERIMENTS["glas_fcn2_flips"]()) is None  # a mask flips with its image


def test_evaluate_rescores_the_kept_state_with_and_without_mirrors(tmp_path, capsys):
    from experiments.cli import main
    from flaxlab.runner import evaluate_checkpoint
    result = quiet(EXPERIMENTS["tdt4265_cnn"](), tmp_path, epochs=2, checkpoint_every=1)
    selected = result.info["selected_epochs"][0]
    plain = evaluate_checkpoint(result.workdir, log=lambda *a: None)
    for split in ("val", "test"):
        assert plain[split]["accuracy"][0] == pytest.approx(result.history[f"{split}_accuracy"][selected - 1][0])
        assert plain[split]["loss"][0] == pytest.approx(result.history[f"{split}_loss"][selected - 1][0], rel=1e-5)
    mirrored = evaluate_checkpoint(result.workdir, flip=True, log=lambda *a: None)
    assert mirrored["test"]["loss"][0] != pytest.approx(plain["test"]["loss"][0], rel=1e-6)
    assert main(["evaluate", "--workdir", str(result.workdir), "--flip"]) == 0
    out = capsys.readouterr().out
    assert f"best-validation state (epoch {selected})" in out and "left-right mirror" in out and "test (" in out
    assert main(["evaluate", "--workdir", str(tmp_path / "none")]) == 2


def test_gtsrb_trials_table_on_the_sample(tmp_path):
    from flaxlab import sweep
    config = {**EXPERIMENTS["gtsrb_trials"](), "epochs": 1, "seeds": 2}
    result = sweep.run_sweep(config, workdir=tmp_path, progress=False, log=lambda *a: None)
    assert [r["variant"] for r in result.rows] == ["baseline (Adam)", "batch norm", "SGD", "Rprop"]
    text = (tmp_path / "results.md").read_text()
    assert text.count("| mean ± std |") == 4 and "| Rprop | 2 | 1 | 1 |" in text
    assert {"trials.png", "trials.csv", "comparison.png"} <= {p.name for p in tmp_path.iterdir()}
    with pytest.raises(UsageError, match="needs a validation split"):
        sweep.run_sweep({**config, "data": {**config["data"], "val_fraction": 0.0}}, workdir=tmp_path / "no")
