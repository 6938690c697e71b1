"""Confusion matrices, confused pairs and predictions: counts checked by hand and against the model."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab import analysis, data, metrics, models, optim, train


def test_confusion_matrix_counts_and_rows():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 2, 2])
    counts = analysis.confusion_matrix(labels, predicted, 4)
    np.testing.assert_array_equal(counts, [[1, 1, 0, 0], [0, 2, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(analysis.row_normalised(counts)[1], [0, 2 / 3, 1 / 3, 0])
    np.testing.assert_array_equal(analysis.row_normalised(counts)[3], 0)  # class never seen: no division by zero
    # a class past the count was a reshape's ValueError (or, past it by less than a row, counted in the wrong cell)
    for bad, message in ((([0, 5], [0, 1]), "classes run from 0 to 2; got 0 to 5"),
                         (([0, 1], [0, -1]), "classes run from 0 to 2; got -1 to 1"),
                         (([0, 1], [0]), r"labels \(2,\) and predictions \(1,\) differ in shape")):
        with pytest.raises(ValueError, match=message):
            analysis.confusion_matrix(*bad, 3)


def test_most_confused_pairs_are_the_largest_off_diagonal_cells():
    counts = np.array([[50, 3, 0], [9, 40, 1], [0, 4, 20]])
    pairs = analysis.most_confused_pairs(counts, top=3)
    assert [(t, p, n) for t, p, n, _ in pairs] == [(1, 0, 9), (2, 1, 4), (0, 1, 3)]
    assert abs(pairs[0][3] - 9 / 50) < 1e-9
    assert "| 1 | 0 | 9 | 18.0% |" in analysis.confused_pairs_markdown(pairs)


def test_the_misclassified_grid_takes_each_class_in_turn():
    """A test split stored class by class (an image folder's) showed only its first class's mistakes."""
    from flaxlab.plots import spread_over_classes
    labels = np.repeat([0, 1, 2], 10)
    wrong = np.concatenate([np.arange(0, 10), [12, 15], [25]])  # class 0: ten wrong, class 1 two, class 2 one
    np.testing.assert_array_equal(spread_over_classes(wrong, labels, 7), [0, 1, 2, 3, 12, 15, 25])
    np.testing.assert_array_equal(spread_over_classes(wrong, labels, 2), [0, 12])
    np.testing.assert_array_equal(spread_over_classes(wrong, labels, 100), np.sort(wrong))
    assert spread_over_classes(np.array([], int), labels, 5).size == 0


def test_predictions_are_the_models_argmax_for_every_example(mnist_sample):
    model = models.make_model({"name": "mlp", "hidden": (16,)}, 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    tx=optim.make_optimizer({"name": "sgd", "lr": 0.1}))
    split = data.to_device(mnist_sample.test)
    predicted = jax.jit(lambda s, d: train.predict(s, d, batch_size=300))(state, split)  # 1000 = 3*300 + 100
    expected = model.apply(variables, train.preprocess(split["image"])).argmax(-1)
    np.testing.assert_array_equal(predicted, expected)


def test_runs_write_the_confusion_of_every_seed(tmp_path, mnist_sample):
    from experiments import EXPERIMENTS
    from experiments.common import variant
    from flaxlab.runner import run_experiment
    config = variant(EXPERIMENTS["mnist_fnn"](), "fnn", "analysis", epochs=1, seeds=2, batch_size=128,
                     **{"model.hidden": (32,), "optimizer.lr": 0.5})
    result = run_experiment(config, workdir=tmp_path, dataset=mnist_sample, progress=False, log=lambda *_: None)
    matrices = np.array(json.loads((tmp_path / "confusion.json").read_text())["rows_true_columns_predicted"])
    assert matrices.shape == (2, 10, 10) and (matrices.sum(axis=(1, 2)) == 1000).all()
    np.testing.assert_allclose(np.trace(matrices, axis1=1, axis2=2) / 1000, result.history["test_accuracy"][-1],
                               atol=1e-6)
    assert "Most confused classes" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "misclassified.png").read_bytes()[:4] == b"\x89PNG"


def test_epoch_axes_show_whole_epochs_of_every_curve(tmp_path, monkeypatch):
    """A one-epoch run's curves ran from 0.945 to 1.055 in fractional epochs; then a sweep whose first
    variant ran one epoch (a grid over epochs, or an early stop) cut the others off at epoch 2."""
    import matplotlib.pyplot as plt
    from flaxlab import plots
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # kept open to be looked at, closed below
    one = {"epoch": [1], "test_accuracy": [[0.5, 0.6]], "train_loss": [[1.0, 0.9]]}
    five = {"epoch": [1, 2, 3, 4, 5], "test_accuracy": np.linspace(0.5, 0.9, 10).reshape(5, 2),
            "train_loss": np.linspace(1, 0.1, 10).reshape(5, 2)}
    plots.sweep_comparison({"epochs=1": one}, tmp_path / "one.png", "one")
    plots.sweep_comparison({"epochs=1": one, "epochs=5": five}, tmp_path / "both.png", "both")
    for ax in figures[0].axes:
        assert list(ax.get_xticks()) == [1] and ax.get_xlim() == (0, 2)
    for ax in figures[1].axes:
        low, high = ax.get_xlim()
        assert low <= 1 and high >= 5 and all(float(t).is_integer() for t in ax.get_xticks())
    for figure in figures:
        close(figure)


def test_learning_curves_mark_the_selected_epochs_and_give_their_test_scores(tmp_path, monkeypatch):
    """A run that kept its best-validation states drew only the last epoch's test accuracy, while its other
    figures showed the kept states: the selected epochs are marked, and their mean test score is in the title."""
    import matplotlib.pyplot as plt
    from flaxlab import plots
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    accuracy = [[0.90, 0.80], [0.95, 0.85], [0.93, 0.88]]
    history = {"epoch": [1, 2, 3], "train_loss": [[0.5, 0.6], [0.3, 0.4], [0.2, 0.3]], "test_loss": [[0.4] * 2] * 3,
               "val_loss": [[0.4] * 2] * 3, "train_accuracy": accuracy, "val_accuracy": accuracy,
               "test_accuracy": accuracy}
    plots.learning_curves(history, tmp_path / "kept.png", "kept", selected_epochs=[2, 3])
    plots.learning_curves(history, tmp_path / "last.png", "last")
    kept, last = figures
    assert kept.axes[1].get_title() == "final test accuracy 90.50%,\nat selected epochs 91.50%"  # (95 + 88) / 2
    assert last.axes[1].get_title() == "final test accuracy 90.50%"
    for ax in kept.axes:
        marks = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert sorted(line.get_xdata()[0] for line in marks) == [2, 3]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val", "test", "selected epoch"]
    assert not [line for line in last.axes[0].get_lines() if line.get_linestyle() == ":"]
    plots.sweep_comparison({"a": history, "b": history}, tmp_path / "sweep.png", "sweep",
                           selected_epochs={"a": [2, 3], "b": [1, 1]})  # a sweep's, compare's: in the legend
    legend = figures[-1].axes[0].get_legend()
    assert legend.get_title().get_text() == "variant (final mean, at selected epochs)"
    assert [t.get_text() for t in legend.get_texts()] == ["a (90.50%, 91.50%)", "b (90.50%, 85.00%)"]
    for figure in figures:
        close(figure)


def test_a_diverged_run_is_said_and_drawn(tmp_path):
    """Train losses that stop being finite, or end far above a guess's, are named (which models, from which
    epoch), and the figures of a run that diverged at once are drawn (matplotlib refused to log-scale an all-NaN
    loss: a traceback)."""
    from flaxlab import plots
    nan = float("nan")
    history = {"epoch": [1, 2], "train_loss": [[0.5, 0.4], [nan, 0.3]], "test_loss": [[0.5, 0.4], [nan, 0.3]],
               "train_accuracy": [[0.5, 0.6]] * 2, "test_accuracy": [[0.5, 0.6]] * 2}
    assert metrics.divergence_note(history) == ("training diverged: the train loss of 1 of 2 model(s) is not finite "
                                                "(from epoch 2); a lower --optimizer.lr usually cures it")
    assert metrics.divergence_note({**history, "train_loss": [[0.5, 0.4], [0.3, 0.2]]}) == ""
    # SGD at lr 1000 on the MNIST CNN: a finite train loss of 6e6, one class predicted, and no note
    assert metrics.divergence_note({**history, "train_loss": [[6e6, 0.4], [6e6, 0.3]]}) == (
        "training diverged: the train loss of 1 of 2 model(s) ended above 10 or not finite (from epoch 1); "
        "a lower --optimizer.lr usually cures it")
    assert metrics.divergence_note({**history, "train_loss": [[12.0, 0.4], [9.0, 0.3]]}) == ""  # recovered
    assert metrics.divergence_note({**history, "train_loss": [[0.5, 0.4], [25.0, 0.3]]}, "rprop").endswith(
        "(from epoch 2); Rprop's steps grow by themselves from --optimizer.lr (up to 50), and it was made for "
        "full-batch gradients: try a larger --batch-size, or Adam")
    at_once = {**history, "epoch": [1], "train_loss": [[nan, nan]], "test_loss": [[nan, nan]],
               "train_accuracy": [[0.1, 0.1]], "test_accuracy": [[0.1, 0.1]]}
    plots.learning_curves(at_once, tmp_path / "curves.png", "diverged")
    plots.trial_curves({"lr=1e38": at_once}, tmp_path / "trials.png", "diverged")
    plots.trial_curves({"lr=1e38": at_once, "lr=0.1": history}, tmp_path / "trials2.png", "one scale, one diverged")
    plots.sweep_comparison({"lr=1e38": at_once, "lr=0.1": history}, tmp_path / "comparison.png", "diverged")
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("curves.png", "trials.png", "comparison.png"))


def test_confusion_figures_of_many_classes_stay_readable_and_bounded(tmp_path):
    """43 GTSRB names get room (their labels overlapped at 5.2 inches); a folder set of 500 classes gets class
    numbers on a bounded figure rather than 500 labels on 80 inches."""
    from PIL import Image
    from flaxlab import image_data, plots
    rng = np.random.default_rng(0)
    plots.confusion_figure(rng.integers(0, 9, (43, 43)), tmp_path / "gtsrb.png", "gtsrb", image_data.GTSRB_CLASSES)
    plots.confusion_figure(rng.integers(0, 9, (500, 500)), tmp_path / "many.png", "500 classes",
                           [f"class {i}" for i in range(500)])
    assert Image.open(tmp_path / "gtsrb.png").size[1] > 5.2 * 120  # taller than the 10-class figure
    assert Image.open(tmp_path / "many.png").size[0] <= 26 * 120


def test_a_figure_stopped_mid_write_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """Ctrl-C during savefig left half a PNG where the last epoch's figure was."""
    import matplotlib.figure
    from flaxlab import plots
    path = tmp_path / "confusion.png"
    plots.confusion_figure(np.eye(3, dtype=int), path, "before")
    before = path.read_bytes()

    def stopped(fig, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", stopped)
    with pytest.raises(KeyboardInterrupt):
        plots.confusion_figure(np.eye(3, dtype=int), path, "after")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]


def test_the_epoch_each_model_stopped_at_is_its_best_plus_patience():
    """Seeds stopped at epochs 2, 2 and 4 of 4 (selected 1, 1, 3): epochs 3-4 of the first two hold epoch 2's
    scores, which history.json did not say."""
    assert metrics.stopped_epochs([1, 1, 3], 1, 4) == [2, 2, 4]
    assert metrics.stopped_epochs([4, 2], 3, 4) == [4, 4]  # never stopped: ran to the end
    assert metrics.stopped_epochs([1, 1], 0, 4) is None and metrics.stopped_epochs(None, 2, 4) is None
    assert metrics.stopped_note([2, 4], 4, ["seed 0", "seed 1"]) == ("stopped early: seed 0 after epoch 2 (scores "
                                                                    "held from then on)")  # not seed 1, which ran on
    assert metrics.stopped_note([4, 4], 4, ["seed 0", "seed 1"]) == "" == metrics.stopped_note(None, 4, ["seed 0"])
    assert "std (n - 1)" in metrics.markdown_table(metrics.final_stats(
        {"epoch": [1], **{f"{s}_{m}": [[0.5, 0.6]] for s in ("train", "test") for m in ("loss", "accuracy")}}))


def test_the_stats_table_shows_whole_epochs_as_whole():
    stats = metrics.final_stats({"epoch": [1, 2], "train_loss": [[0.5, 0.6], [0.4, 0.5]], "test_loss": [[0.5] * 2] * 2,
                                 "train_accuracy": [[0.8] * 2] * 2, "test_accuracy": [[0.8, 0.9], [0.85, 0.9]],
                                 "val_loss": [[0.5, 0.3], [0.4, 0.6]], "val_accuracy": [[0.8] * 2] * 2},
                                best_epochs=[2, 1])
    table = metrics.markdown_table(stats)
    assert "| selected epoch | 1.5 | 0.7 | 1 | 2 |" in table and "| final test accuracy | 87.50% |" in table
    assert "| val loss at selected epoch | 0.3500 |" in table  # what --best_metric val_loss chose by


def test_one_seed_shows_its_values_without_a_spread():
    stats = metrics.final_stats({"epoch": [1], "train_loss": [[0.5]], "test_loss": [[0.4]], "train_accuracy": [[0.8]],
                                 "test_accuracy": [[0.884]]})
    table = metrics.markdown_table(stats)
    assert table.startswith("| metric (1 seed) | value |\n|---|---|\n") and "| final test accuracy | 88.40% |" in table
    assert "std" not in table and "| 0.00%" not in table


def test_a_trial_table_of_one_trial_gives_no_spread():
    """One trial's '± 0.0000' read as a spread measured to be none; its sample std is undefined."""
    history = {"epoch": [1, 2], "test_loss": [[1.0], [0.5]], "test_accuracy": [[0.5], [0.8125]],
               "train_loss": [[1.0], [0.6]], "train_accuracy": [[0.4], [0.7]]}
    table = metrics.trial_table(metrics.trial_rows("base", history, 0))
    assert table.endswith("| base | mean ± std |  | **81.25%** (one trial: no std) |")
    two = {k: [v * 2 for v in values] if k != "epoch" else values for k, values in history.items()}
    assert "**81.25 ± 0.00%**" in metrics.trial_table(metrics.trial_rows("base", two, 0))
