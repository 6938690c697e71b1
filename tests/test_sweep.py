"""Sweeps: grids parsed against the config, variants grouped into as few programs as shapes allow,
stacked variants equal to separate runs (per-model lr, weight decay, L1, dropout rate, batch norm
statistics), and the sweep's table and figure."""
import csv
import json

import chex
import jax
import numpy as np
import pytest

from conftest import small_dataset
from flaxlab import data
from experiments import EXPERIMENTS, cli
from experiments.common import variant
from flaxlab import sweep
from flaxlab.errors import UsageError
from flaxlab.runner import run_experiment, set_up


def quiet(*_):
    pass


def cnn(**dotted):
    return variant(EXPERIMENTS["mnist_cnn"](), "cnn", "test CNN",
                   **{"model.features": (4, 8), "batch_size": 32, "epochs": 1, **dotted})


def test_grid_resolves_short_names_and_makes_a_product():
    variants = sweep.parse_grid(cnn(), ["dropout=0,0.2", "lr=0.1,0.05,0.01"])
    assert len(variants) == 6
    assert variants[1] == {"model.dropout": 0.0, "optimizer.lr": 0.05}
    features = sweep.parse_grid(cnn(), ["model.features=8,16/16,32,64"])
    assert features == [{"model.features": (8, 16)}, {"model.features": (16, 32, 64)}]
    assert sweep.variant_label(features[1]) == "features=16-32-64"


@pytest.mark.parametrize("spec, message", [
    ("nosuch=1,2", "unknown field"), ("dropout", "expected field=value"), ("dropout=0,x", "bad value"),
    ("dropout=0.1,0.1", "repeats"), ("name=a,b", "ambiguous"), ("description=a", "unknown field"),
    ("seeds=1,2", "cannot vary seeds: every variant trains --seeds N models"),
    ("layer=Conv_0,Conv_1", "cannot vary features.layer: a sweep draws no feature maps"),
    ("checkpoint_every=0,1", "cannot vary checkpoint_every"),
    ("lr=0.1,,0.2", "an empty value between ','s"), ("dropout=0,", "an empty value"),
    ("features=8,16/", "bad --grid 'features=8,16/': an empty value between '/'s"),
    ("features=8-16,16-32", "bad value '8-16,16-32' .*separates a list field's values with /: features=8,16/16,32")])
def test_bad_grids_are_one_clear_error(spec, message):
    with pytest.raises(UsageError, match=message):
        sweep.parse_grid(cnn(), [spec])


def test_an_unknown_grid_field_lists_only_what_a_grid_can_vary():
    with pytest.raises(UsageError) as e:
        sweep.parse_grid(cnn(), ["nosuch=1,2"])
    listed = str(e.value).split("fields: ")[1].split(", ")
    assert "model.dropout" in listed and not {"seeds", "checkpoint_every", "features.layer"} & set(listed)


def test_a_grid_over_networks_drops_the_options_the_other_network_does_not_take():
    variants = sweep.parse_grid(cnn(), ["model.name=small_cnn,lenet5_bn"])
    configs = [sweep.variant_config(cnn(), v) for v in variants]
    assert configs[0]["model"] == cnn()["model"] and configs[1]["model"] == {"name": "lenet5_bn", "activation": "relu"}
    assert len(sweep.plan(cnn(), variants)) == 2


def test_variants_that_keep_shapes_share_one_program():
    variants = sweep.parse_grid(cnn(), ["dropout=0,0.3", "lr=0.1,0.05", "weight_decay=0,1e-3", "l1=0,1e-4"])
    assert len(sweep.plan(cnn(), variants)) == 1
    assert len(sweep.plan(cnn(), sweep.parse_grid(cnn(), ["model.features=4/4,8/4,8,16"]))) == 3
    programs = sweep.plan(*(lambda c: (c, list(c["sweep"])))(EXPERIMENTS["mnist_cnn_regularization"]()))
    assert [len(p.variants) for p in programs] == [3, 1]  # SGD with and without L1/L2 stacked; Adam apart
    assert len(sweep.plan(EXPERIMENTS["mnist_cnn_dropout"](), list(EXPERIMENTS["mnist_cnn_dropout"]()["sweep"]))) == 1


@pytest.mark.parametrize("model_axis", ["vmap", "sequential"])
def test_stacked_variants_equal_separate_runs(mnist_sample, tmp_path, model_axis):
    """lr, weight decay, L1 and dropout rate differ per stacked model; batch norm keeps stats per model.

    4 steps: vmap's grouped convolutions round differently from plain ones (~1e-8), and over more
    steps a max-pool tie can flip on such a difference and the runs drift apart (1e-3 by step 8).
    """
    ds = small_dataset(mnist_sample, 128, 64)
    base = cnn(**{"model.batch_norm": True, "model_axis": model_axis, "seeds": 2, "seed": 3})
    variants = [{"optimizer.lr": 0.1, "model.dropout": 0.0},
                {"optimizer.lr": 0.05, "model.dropout": 0.3, "optimizer.weight_decay": 1e-3, "l1": 1e-4}]
    s = set_up(base, ds, variants)
    assert s.trainer.model_axis == model_axis
    s.trainer.compile(s.states, s.train_data, s.test_data)
    states, sums = s.trainer.train_epoch(s.states, s.train_data, s.train_keys, 1)
    for v, overrides in enumerate(variants):
        for seed in range(2):
            alone = run_experiment(variant(base, "alone", "", seeds=1, seed=3 + seed, **overrides),
                                   workdir=tmp_path / f"{v}{seed}", dataset=ds, progress=False, log=quiet)
            model = 2 * v + seed
            pick = lambda tree: jax.tree.map(lambda a: a[model], tree)
            first = lambda tree: jax.tree.map(lambda a: a[0], tree)
            chex.assert_trees_all_close(pick(states.params), first(alone.states.params), atol=2e-5, rtol=1e-4)
            chex.assert_trees_all_close(pick(states.batch_stats), first(alone.states.batch_stats), atol=2e-5, rtol=1e-4)
    # the two seeds of a variant start alike across variants but end differently: lr and dropout took effect
    assert not np.allclose(states.params["Dense_0"]["kernel"][0], states.params["Dense_0"]["kernel"][2])


def test_a_sweep_writes_table_csv_and_figure(mnist_sample, tmp_path):
    ds = small_dataset(mnist_sample, 512, 128)
    config = cnn(epochs=2, seeds=2)
    result = sweep.run_sweep(config, sweep.parse_grid(config, ["model.features=4/4,8", "dropout=0,0.5"]),
                             workdir=tmp_path, dataset=ds, progress=False, log=quiet)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "history.json", "results.md", "results.csv",
                                                    "comparison.png", "trials.csv", "trials.png", "tensorboard"}
    trials = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert len(trials) == 8 and [t["seed"] for t in trials[:2]] == ["0", "1"]
    assert "| features=4, dropout=0.5 | mean ± std |" in (tmp_path / "results.md").read_text()
    assert [p["models"] for p in result.programs] == [4, 4]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["features=4, dropout=0", "features=4, dropout=0.5",
                                            "features=4-8, dropout=0", "features=4-8, dropout=0.5"]
    for row, label in zip(rows, result.histories):
        accuracies = np.asarray(result.histories[label]["test_accuracy"][-1])
        assert accuracies.shape == (2,)
        assert float(row["test_accuracy_mean"]) == pytest.approx(accuracies.mean())
        assert float(row["test_accuracy_std"]) == pytest.approx(accuracies.std(ddof=1))
    assert "± " in (tmp_path / "results.md").read_text()


def test_a_one_seed_variant_shows_no_spread():
    row = {"variant": "lr=0.1", "program": 1, "seeds": 1, "test_accuracy_mean": 0.9889, "test_accuracy_std": 0.0,
           "test_accuracy_min": 0.9889, "test_accuracy_max": 0.9889, "best_test_accuracy_mean": 0.99,
           "test_loss_mean": 0.04}
    table = sweep.markdown_table([row, {**row, "variant": "lr=0.2", "seeds": 2, "test_accuracy_std": 0.001}])
    assert "| lr=0.1 | 1 | 1 | 98.89% | 98.89% |" in table and "| lr=0.2 | 1 | 2 | 98.89 ± 0.10% |" in table


def test_a_grid_over_epochs_trains_and_reports_each_length(mnist_sample, tmp_path):
    config = cnn()
    result = sweep.run_sweep(config, sweep.parse_grid(config, ["epochs=1,3"]), workdir=tmp_path,
                             dataset=small_dataset(mnist_sample, 256, 64), progress=False, log=quiet)
    assert [len(h["epoch"]) for h in result.histories.values()] == [1, 3]
    text = (tmp_path / "results.md").read_text()
    assert "2 variants x 1 seed(s) from seed 0, 1 or 3 epochs;" in text  # it said the config's 20 epochs


@pytest.mark.parametrize("name", sorted(n for n, make in EXPERIMENTS.items()
                                        if make()["sweep"] and make()["data"]["name"] == "mnist"))
def test_every_named_sweep_runs_on_the_sample(name, mnist_sample, tmp_path):
    """Each ablation at smoke size: one epoch on 1,000 digits, every variant trained and tabled."""
    config = variant(EXPERIMENTS[name](), name, "smoke", epochs=1)
    result = sweep.run_sweep(config, workdir=tmp_path, dataset=small_dataset(mnist_sample, 1000, 200),
                             progress=False, log=quiet)
    assert len(result.rows) == len(config["sweep"])
    assert all(np.isfinite(r["test_loss_mean"]) and r["test_accuracy_mean"] > 0.05 for r in result.rows)
    # config.json keeps every field each variant sets (it once kept only what one program stacks: Rprop read as SGD)
    saved = json.loads((tmp_path / "config.json").read_text())["sweep"]
    assert saved == json.loads(json.dumps([dict(v, label=sweep.variant_label(v)) for v in config["sweep"]]))


def test_a_sweep_over_a_data_field_trains_each_program_on_its_data(mnist_sample, tmp_path):
    """A grid over data.size was once ignored (every program trained on the base size); now each size is loaded."""
    config = cnn(seeds=2)
    variants = sweep.parse_grid(config, ["data.size=14,14/28,28", "dropout=0,0.5"])
    with pytest.raises(UsageError, match="changes data fields"):
        sweep.run_sweep(config, variants, workdir=tmp_path / "given", dataset=mnist_sample, log=quiet)
    result = sweep.run_sweep(config, variants, workdir=tmp_path / "run", progress=False, log=quiet)
    assert [p["data"]["image_shape"] for p in result.programs] == [[14, 14, 1], [28, 28, 1]]
    assert [p["models"] for p in result.programs] == [4, 4]
    final = {label: np.mean(h["test_accuracy"][-1]) for label, h in result.histories.items()}
    assert final["size=14-14, dropout=0"] != final["size=28-28, dropout=0"]
    assert min(final.values()) > 0.3
    assert "data: 14x14 images, 5,000 train" in (tmp_path / "run" / "results.md").read_text()


def test_sweep_command_errors(capsys, tmp_path):
    for argv, message in ([["sweep", "mnist_cnn"], "defines no sweep"],
                          [["sweep", "mnist_cnn", "--grid", "bogus=1"], "unknown field 'bogus'"],
                          [["sweep", "mnist_cnn", "--grid", "dropout=0,1.5"], "must be below 1"],
                          [["sweep", "mnist_cnn", "--grid", "activation=relu,swish"], "unknown value 'swish'"],
                          [["sweep", "glas_fcn", "--grid", "lr=0.1,0.01", "--data.size", "9,9"],
                           "fcn maps 9x9 images to 8x8 masks"],
                          [["sweep", "mnist_cnn", "--grid", "data.size=28,28/3,3"], "small_cnn cannot take 3x3 images"],
                          [["run", "mnist_cnn_dropout", "--model.dropout", "0.3"], "--model.dropout is what the sweep"],
                          [["sweep", "mnist_cnn", "--grid", "lr=0.1,0.2", "--optimizer.lr", "0.3"],
                           "--optimizer.lr is what the sweep varies"],
                          # options a sweep would ignore (it once did, silently)
                          [["sweep", "mnist_cnn", "--grid", "lr=0.1,0.2", "--features.image", "3"],
                           "--features.image: a sweep draws no feature maps"],
                          [["sweep", "gtsrb_cnn", "--grid", "augment.crop=2,28"], "--augment.crop 28 shifts images"]):
        assert cli.main(argv + ["--workdir", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_sweep_command_trains_on_the_sample(capsys, tmp_path):
    argv = ["sweep", "mnist_cnn", "--grid", "lr=0.1,0.05", "--epochs", "1", "--workdir", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["lr=0.1", "lr=0.05"]
    assert all(float(r["test_accuracy_mean"]) > 0.8 for r in rows)  # one epoch of the 5,000-digit sample
    # the epoch line's scores are means over the program's models: it gives each variant's too
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    by_variant = ", ".join(f"{r['variant']} {float(r['test_accuracy_mean']):.2%}" for r in rows)
    assert f"(test accuracy by variant: {by_variant})" in line, line


def stop_at(*starts):
    """A log that stops the sweep, as Ctrl-C would, at the first line beginning with the last of `starts` after
    lines beginning with each of the others, in turn."""
    waiting = list(starts)

    def log(line):
        if line.startswith(waiting[0]):
            waiting.pop(0)
        if not waiting:
            raise KeyboardInterrupt
    return log


def test_an_interrupted_sweep_resumes_to_the_same_end(mnist_sample, tmp_path):
    """Stopped in its second program at epoch 2: --resume keeps the first program, trains the second from its
    first epoch (or, with --checkpoint_every 1, from its checkpoint of epoch 2), and ends bit for bit as an
    uninterrupted sweep, the best-validation epochs too; each program's checkpoints go when it ends."""
    train = small_dataset(mnist_sample, 640, 128)
    ds = data.Dataset("mnist", train.source, data.Split(train.train.images[:512], train.train.labels[:512]),
                      train.test, 10, val=data.Split(train.train.images[512:], train.train.labels[512:]))
    config = cnn(epochs=3, seeds=2, best_metric="val_accuracy", **{"data.val_fraction": 0.2})
    variants = sweep.parse_grid(config, ["model.features=4/4,8", "lr=0.1,0.05"])
    whole = sweep.run_sweep(config, variants, workdir=tmp_path / "whole", dataset=ds, progress=False, log=quiet)
    drop_times = lambda h: {k: v for k, v in h.items() if k != "epoch_time_s"}  # noqa: E731
    for every in (0, 1):
        config = {**config, "checkpoint_every": every}
        with pytest.raises(KeyboardInterrupt) as stopped:
            sweep.run_sweep(config, variants, workdir=tmp_path / str(every), dataset=ds, progress=True,
                            log=stop_at("program 2/2", "epoch 2/3"))
        where = ("program 2's checkpoint of epoch 2" if every else
                 "program 2's first epoch (with --checkpoint_every N, from its last N-th epoch)")
        assert str(stopped.value) == (f"{tmp_path / str(every)}/history.json holds 1 of 2 program(s) trained; run "
                                      f"the same command with --resume to go on from {where}")
        kept = tmp_path / str(every) / "checkpoints"
        assert sorted(p.name for p in kept.glob("*/*")) == (["1", "2"] if every else [])
        lines = []
        resumed = sweep.run_sweep(config, variants, workdir=tmp_path / str(every), dataset=ds, progress=True,
                                  log=lines.append, resume=True)
        assert lines[1] == "resuming: program(s) 1-1 of 2 were trained before"
        assert lines[2].startswith("program 2/2") and not any(line.startswith("program 1/2") for line in lines)
        assert ("resumed after epoch 2" in lines) == bool(every)
        assert [drop_times(h) for h in resumed.histories.values()] == [drop_times(h) for h in whole.histories.values()]
        assert resumed.rows == whole.rows
        for name in ("results.csv", "trials.csv"):
            assert (tmp_path / str(every) / name).read_text() == (tmp_path / "whole" / name).read_text()
        assert not kept.exists()
    assert "selected_epoch" in (tmp_path / "whole" / "trials.csv").read_text()
    # the variant table leads with the kept models' score, the per-trial table's mean ± std
    trial_rows = list(csv.DictReader(open(tmp_path / "whole" / "trials.csv")))
    for row in csv.DictReader(open(tmp_path / "whole" / "results.csv")):
        kept = [float(t["test_accuracy"]) for t in trial_rows if t["variant"] == row["variant"]]
        assert float(row["selected_test_accuracy_mean"]) == pytest.approx(np.mean(kept))
        assert float(row["selected_test_accuracy_std"]) == pytest.approx(np.std(kept, ddof=1))
    assert "| seeds | test accuracy at selected epoch (mean ± std) | final test accuracy (mean ± std) |" in (
        tmp_path / "whole" / "results.md").read_text()


def test_resuming_a_sweep_refuses_another_sweep_or_data(mnist_sample, tmp_path):
    config = cnn(epochs=1)
    variants = sweep.parse_grid(config, ["model.features=4/4,8"])
    ds = small_dataset(mnist_sample, 256, 64)
    sweep.run_sweep(config, variants, workdir=tmp_path, dataset=ds, progress=False, log=quiet)
    for other, message in (([config, sweep.parse_grid(config, ["model.features=4/8"])], "other settings (--grid)"),
                           ([cnn(epochs=2), variants], "other settings (--epochs)"),
                           ([config, None], "is a sweep's folder, and this is a single run")):
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            (run_experiment(other[0], workdir=tmp_path, dataset=ds, resume=True) if other[1] is None else
             sweep.run_sweep(*other, workdir=tmp_path, dataset=ds, resume=True, log=quiet))
    other_data = small_dataset(mnist_sample, 512, 64)
    with pytest.raises(UsageError, match=r"program 1 was trained on .*\(256 train\), and this launch loads .*\(512 "):
        sweep.run_sweep(config, variants, workdir=tmp_path, dataset=other_data, resume=True, log=quiet)
    # a single run too: it went on with other data (the sample, where --data-dir was left out), without a word
    run_experiment({**config, "checkpoint_every": 1}, workdir=tmp_path / "run", dataset=ds, progress=False, log=quiet)
    with pytest.raises(UsageError, match=r"run was trained on .*\(256 train\), and this launch loads .*\(512 train\)"):
        run_experiment({**config, "epochs": 2, "checkpoint_every": 1}, workdir=tmp_path / "run", dataset=other_data,
                       resume=True, log=quiet)
