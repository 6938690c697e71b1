"""The README's Python example (a notebook's use: a network of one's own, a run, a sweep) runs as written."""
import contextlib
import functools
import io
import json
import re

from conftest import REPO
from test_cli import cli

from flaxlab import models, runner


def readme_python_example():
    text = (REPO / "README.md").read_text()
    section = text.split("### From Python: a notebook, your own network", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_trains_its_own_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))  # the example's registration ends with the test
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(readme_python_example(), "README.md", "exec"), namespace)
    result, swept = namespace["result"], namespace["swept"]
    assert len(result.history["test_accuracy"]) == 3 and result.history["test_accuracy"][-1][0] > 0.85
    assert result.info["learnable_weights"] == 16 * 9 + 16 + 16 * 14 * 14 * 10 + 10  # the module the user wrote
    assert [row["variant"] for row in swept.rows] == ["lr=0.05", "lr=0.2"]
    assert (tmp_path / "runs/tiny/results.md").is_file() and (tmp_path / "runs/tiny-lr/results.md").is_file()
    # results.md says what was changed, as after the command line's options (it told mnist_cnn's defaults alone)
    assert "(report: 99%). Changed here: epochs 20 -> 3, model.name small_cnn -> tiny_cnn (width=16).\n" in \
        (tmp_path / "runs/tiny/results.md").read_text()
    assert "final test accuracy" in out.getvalue()
    # and, with the module registered, the run's checkpoint serves predict in the same session
    lines = []
    digit = tmp_path / "digit.png"
    from PIL import Image
    from flaxlab import data
    Image.fromarray(data.load("mnist", source="sample").test.images[0, ..., 0]).save(digit)
    runner.predict_images(tmp_path / "runs/tiny", [digit], log=lines.append)
    assert lines[-1].startswith(f"{digit}: ")
    # one path (it was read letter by letter), and arrays of one's own, (N, h, w) at any size, as the file is read
    one = runner.predict_images(tmp_path / "runs/tiny", str(digit), log=lines.append)
    assert lines[-1].startswith(f"{digit}: ")
    test = data.load("mnist", source="sample").test
    from_arrays = runner.predict_images(tmp_path / "runs/tiny", test.images[:3, ..., 0], log=lines.append)
    assert lines[-3].startswith("image-0: ") and from_arrays.shape == (3, 10)
    import numpy as np
    np.testing.assert_allclose(from_arrays[0], one[0], rtol=1e-6)
    import pytest
    from flaxlab.errors import DataError
    with pytest.raises(DataError, match="must be uint8 pixels, 0 to 255"):
        runner.predict_images(tmp_path / "runs/tiny", test.images[:3] / 255.0, log=lines.append)
    # a process that has not registered it says so, in one line
    out = cli("predict", "--workdir", "runs/tiny", str(digit), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr == (
        "error: runs/tiny trained a network flaxlab does not know, 'tiny_cnn' (registered from Python in "
        "models.MODELS?): register it again, then call flaxlab.runner's functions from Python\n")


def test_configs_built_or_changed_by_hand_are_checked_before_anything_runs(tmp_path):
    """From Python, a misspelt field was a bare KeyError, a number given as text a TypeError deep in the run, and
    a hand-made dict a KeyError('data'): each is now one UsageError, and no run folder is made."""
    import numpy as np
    import pytest
    from experiments import EXPERIMENTS
    from flaxlab.config import with_field
    from flaxlab.errors import UsageError
    from flaxlab.runner import run_experiment
    config = EXPERIMENTS["mnist_cnn"]()
    with pytest.raises(UsageError, match=r"no field 'optimiser.lr' in the config \(did you mean optimizer.lr\?\)"):
        with_field(config, "optimiser.lr", 0.1)
    with pytest.raises(UsageError, match=r"no field 'optimizer.learning_rate' in the config \(did you mean "
                                         r"optimizer.lr\?\)"):  # what other frameworks call it
        with_field(config, "optimizer.learning_rate", 0.1)
    with pytest.raises(UsageError, match=r"no field 'lr' in the config \(did you mean optimizer.lr\? with_field "
                                         r"takes the whole dotted name\)"):  # as the command line's --lr
        with_field(config, "lr", 0.1)
    with pytest.raises(UsageError, match=r"no field 'model.learning_rate' in the config$"):  # no wrong guess
        with_field(config, "model.learning_rate", 0.1)
    for bad, message in ((with_field(config, "optimizer.lr", "0.1"), "--optimizer.lr must be a number, got '0.1'"),
                         (with_field(config, "epochs", True), "--epochs must be a number, got True"),
                         ({"name": "mine", "model": {"name": "small_cnn"}},
                          "the config lacks epochs, batch_size, data, optimizer: start from an experiment's"),
                         # whole numbers given as floats were TypeErrors after the run folder was made
                         (with_field(config, "epochs", 2.5), "--epochs must be a whole number (an int), got 2.5"),
                         (with_field(config, "batch_size", 100.0), "--batch_size must be a whole number"),
                         (with_field(config, "model", {"features": (8,)}), "the config lacks model.name"),
                         # a list where a name goes was a TypeError (unhashable) from the check of names not offered
                         (with_field(config, "optimizer.name", ["adam"]),
                          "unknown value '['adam']' for --optimizer.name"),
                         (with_field(config, "model", {"name": "small_cnn", "featurs": (8,)}),
                          "small_cnn takes no --model.featurs (did you mean --model.features?); its options: ")):
        with pytest.raises(UsageError, match=re.escape(message)):
            run_experiment(bad, workdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # numpy's numbers (a loop over np.linspace) are plain numbers to a config, as JSON saves them
    assert with_field(config, "optimizer.lr", np.float32(0.5))["optimizer"]["lr"] == 0.5
    assert type(with_field(config, "epochs", np.int64(2))["epochs"]) is int
    # another network drops the old one's options, as --model.name does (mlp was refused 'features')
    assert with_field(config, "model.name", "mlp")["model"] == {"name": "mlp", "activation": "relu"}
    # and its own options can be set then, as --model.name mlp --model.hidden 64,32 (no field 'model.hidden')
    mlp = with_field(with_field(config, "model.name", "mlp"), "model.hidden", (64, 32))
    assert mlp["model"] == {"name": "mlp", "activation": "relu", "hidden": (64, 32)}
    with pytest.raises(UsageError, match=r"no field 'model.features' in the config"):  # small_cnn's, not mlp's
        with_field(mlp, "model.features", (8,))


def test_a_notebook_users_mistakes_are_one_clear_error_and_own_arrays_are_scored_on_themselves(tmp_path, capsys):
    """Found by a test user in a notebook: a run trained on arrays of one's own was rescored, silently, on the
    shipped MNIST sample (4.6% accuracy); one image given to predict_images was read as 28 images; a network
    without `num_classes` or `train`, or of 5 outputs on 10 classes, a tuple as `dataset` and a dict as a sweep's
    variants ended in TypeErrors, AttributeErrors or a run that could never predict half the classes."""
    import flax.linen as nn
    import pytest
    from experiments import EXPERIMENTS
    from experiments.cli import main as cli_main
    from flaxlab import config as config_lib
    from flaxlab import data
    from flaxlab.config import with_field
    from flaxlab.errors import DataError, UsageError
    from flaxlab.sweep import run_sweep

    class Five(nn.Module):  # 5 outputs, whatever num_classes says
        num_classes: int

        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(5)(x.reshape(len(x), -1))

    class NoClasses(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(10)(x.reshape(len(x), -1))

    class NoTrain(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.num_classes)(x.reshape(len(x), -1))

    class Extra(nn.Module):  # (N, 1, classes); (logits, features); a Dropout not told `train`
        num_classes: int
        out: str

        @nn.compact
        def __call__(self, x, train=False):
            logits = nn.Dense(self.num_classes)(nn.Dropout(0.5)(x) if self.out == "dropout" else x).mean((1, 2))
            return {"axis": logits[:, None, :], "tuple": (logits, x), "dropout": logits,
                    "int": logits.astype(int)}[self.out]

    class Width(nn.Module):  # a field without a default was refused as an option it "takes no"
        num_classes: int
        width: int

        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(self.num_classes)(nn.Dense(self.width)(x.reshape(len(x), -1)))

    registered = dict(models.MODELS)
    try:
        models.MODELS.update(five=Five, no_classes=NoClasses, no_train=NoTrain, width=Width,
                             **{out: functools.partial(Extra, out=out) for out in ("axis", "tuple", "dropout", "int")})
        config = with_field(EXPERIMENTS["mnist_cnn"](), "epochs", 1)
        for name, message in (("five", "five puts out 5 scores per image, and mnist has 10 classes"),
                              ("no_classes", "no_classes has no num_classes field"),
                              ("no_train", "no_train.__call__ takes no `train` argument"),
                              ("width", "width needs --model.width, a field without a default (from Python: "
                                        "with_field(config, 'model.width', ...))"),
                              ("axis", "axis puts out scores of shape (N, 1, 10): a classification network's are "
                                       "(N, classes)"),
                              ("tuple", "tuple returns a tuple, not one array of scores: return the logits alone"),
                              ("int", "int puts out int32 scores: return float logits"),
                              ("dropout", 'dropout: Parameter "deterministic" must be passed: set it from `train`')):
            with pytest.raises(UsageError, match=re.escape(message)):
                runner.run_experiment(with_field(config, "model", {"name": name}), workdir=tmp_path / "bad")
        assert models.make_model({"name": "width", "width": 16}, 10).width == 16
        # and is set as any option, after the network's name whatever the order (it was "no field 'model.width'")
        for given in ({"model.name": "width", "model.width": 16}, {"model.width": 16, "model.name": "width"}):
            assert config_lib.with_fields(config, given)["model"] == {"name": "width", "width": 16}
        assert cli_main(["show", "mnist_cnn", "--model.name", "width", "--model.width", "16"]) == 0
        assert json.loads(capsys.readouterr().out)["model"] == {"name": "width", "width": 16}
        assert [config_lib.parse_value("model.x", text, None) for text in ("16,8", "0.5", "relu", "true")] == [
            (16, 8), 0.5, "relu", True]  # no default to take the type of
    finally:
        models.MODELS.clear()
        models.MODELS.update(registered)
    sample = data.load("mnist", source="sample")
    flipped = data.Split(255 - sample.test.images[:300], sample.test.labels[:300])
    with pytest.raises(UsageError, match="dataset must be a flaxlab.data.Dataset"):
        runner.run_experiment(config, workdir=tmp_path / "bad", dataset=(flipped.images, flipped.labels))
    with pytest.raises(DataError, match="mine: test must be a flaxlab.data.Split"):
        data.Dataset("mine", "my arrays", flipped, None, 10)
    with pytest.raises(DataError, match="mine: the test split is empty"):
        data.Dataset("mine", "my arrays", flipped, flipped.take([]), 10)
    with pytest.raises(UsageError, match="the sweep must be a list of variants"):
        run_sweep(config, {"optimizer.lr": [0.1, 0.2]}, workdir=tmp_path / "bad")
    for key in ("seeds", "checkpoint_every"):  # as --grid refuses them (seeds: an IndexError after an epoch)
        with pytest.raises(UsageError, match=f"a sweep cannot vary {key}: "):
            run_sweep(config, [{key: 1}, {key: 2}], workdir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

    mine = data.Dataset("inverted", "my inverted digits", flipped, flipped, 10)
    result = runner.run_experiment(config, workdir=tmp_path / "own", dataset=mine, log=lambda *a: None)
    with pytest.raises(UsageError, match="trained on data given from Python .'my inverted digits'.: pass that "
                                         "flaxlab.data.Dataset again, as dataset="):
        runner.evaluate_checkpoint(tmp_path / "own", log=lambda *a: None)
    scores = runner.evaluate_checkpoint(tmp_path / "own", dataset=mine, log=lambda *a: None)
    assert scores["test"]["accuracy"] == pytest.approx(result.history["test_accuracy"][-1], abs=1e-6)

    loaded = runner.load_run(tmp_path / "own")
    images = flipped.images[:4]
    assert loaded.logits(images).shape == (1, 4, 10)
    for bad, message in ((images / 255.0, "logits takes uint8 images shaped (N, 28, 28, 1)"),
                         (images[..., 0], "got uint8 (4, 28, 28)")):
        with pytest.raises(UsageError, match=re.escape(message)):
            loaded.logits(bad)
    with pytest.raises(UsageError, match="model 1: the run has 1 model"):
        loaded.logits(images, model=1)
    for bad, message in ((images[0], "an array of shape (28, 28, 1) is one image"),
                         ([images[0], images[1]], "give image files or folders"), ([], "give image files")):
        with pytest.raises(DataError, match=re.escape(message)):
            runner.predict_images(tmp_path / "own", bad, log=lambda *a: None)
    with pytest.raises(UsageError, match="a run folder is a path, got int 3"):
        runner.load_run(3)
