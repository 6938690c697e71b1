"""Per-epoch history and the trial tables (mean, std, min, max over seeds) the reports print.

Train loss and accuracy of an epoch are averages over its mini-batches as they were trained (what
the reports' loops printed); test figures are computed after the epoch on the whole test split.
"""
import numpy as np

VAL_KEYS = ("val_loss", "val_accuracy")
CLASSIFICATION = ("loss", "accuracy")
SEGMENTATION = ("loss", "accuracy", "dice")  # accuracy: of pixels; dice: per image, = F1 for binary masks
BEST_TEST_NOTE = ("\"best test\" is each model's best epoch by its test score itself: an optimistic figure, as "
                  "no run could pick that epoch without seeing the test set (--best_metric picks by a validation "
                  "split)")

# what picks a model's best epoch (its kept checkpoint, early stopping)
SELECTION_METRICS = VAL_KEYS + ("val_dice",)


def history_keys(history):
    """The history's per-split series, in a fixed order: train, test, then val; loss, accuracy, dice."""
    return tuple(f"{split}_{name}" for split in ("train", "test", "val") for name in SEGMENTATION
                 if f"{split}_{name}" in history)


def new_history(with_val=False, names=CLASSIFICATION):
    splits = ("train", "test") + (("val",) if with_val else ())
    return {"epoch": [], "epoch_time_s": [], **{f"{split}_{name}": [] for split in splits for name in names}}


def append_epoch(history, epoch, seconds, train, test, val=None):
    """Adds one epoch; `train`/`test`/`val` map loss/accuracy(/dice) to one value per model."""
    history["epoch"].append(epoch)
    history["epoch_time_s"].append(round(seconds, 4))
    for split, values in (("train", train), ("test", test), ("val", val)):
        if values is not None:
            for name, per_model in values.items():
                history[f"{split}_{name}"].append([float(v) for v in per_model])
    return history


class BestEpochs:
    """Per model: the best epoch so far by a validation metric, and epochs since it (for early stopping)."""

    def __init__(self, metric, num_models, patience=0, state=None):
        self.metric, self.patience = metric, patience
        self.sign = -1.0 if metric.endswith("loss") else 1.0
        state = state or {"value": [None] * num_models, "epoch": [0] * num_models, "stale": [0] * num_models}
        self.value, self.epoch, self.stale = state["value"], state["epoch"], state["stale"]

    def update(self, epoch, values):
        """Takes this epoch's values (one per model); returns which models improved. A model that has gone
        `patience` epochs without improving has stopped, as its own run would: its kept epoch stays, however
        it goes on in the stacked program until every model has stopped (`held`)."""
        improved, stopped = [], self.stopped()
        for i, v in enumerate(values):
            if stopped[i]:
                improved.append(False)
                continue
            # a NaN kept as the best (a first epoch that diverged) is beaten by any number
            better = self.value[i] is None or np.isfinite(v) and (
                not np.isfinite(self.value[i]) or self.sign * v > self.sign * self.value[i])
            if better:
                self.value[i], self.epoch[i], self.stale[i] = float(v), epoch, 0
            else:
                self.stale[i] += 1
            improved.append(better)
        return np.array(improved)

    def stopped(self):
        """Which models early stopping has stopped (before the epoch `update` takes next)."""
        return np.array([self.patience > 0 and stale >= self.patience for stale in self.stale])

    def should_stop(self):
        """Early stopping: every model has gone `patience` epochs without improving."""
        return self.patience > 0 and min(self.stale) >= self.patience

    def state(self):
        return {"value": self.value, "epoch": self.epoch, "stale": self.stale}


def stopped_epochs(best_epochs, patience, epochs_run):
    """The epoch after which early stopping stopped each model (its best + patience; the last epoch run for one
    that never stopped), or None without early stopping: the history holds a stopped model's scores from then
    on (`held`), which a reader averaging over epochs would not know."""
    if not best_epochs or not patience:
        return None
    return [min(int(best) + patience, epochs_run) for best in best_epochs]


def stopped_note(stopped, epochs_run, names):
    """Which models early stopping stopped before the last epoch run, by `names` (one per model), or ''."""
    early = [f"{name} after epoch {epoch}" for name, epoch in zip(names, stopped or ()) if epoch < epochs_run]
    return f"stopped early: {', '.join(early)} (scores held from then on)" if early else ""


def held(history, split, scores, tracker):
    """A split's scores of this epoch, the models `tracker` has stopped those of the epoch they stopped at (their
    best + patience; found by number, as a history written before scores were held goes on past it): such a model
    trains on in the stacked program, but its final and best test figures and curves are its own run's, which
    ended there (a seed stopped at epoch 2 was reported at the stacked program's epoch 4)."""
    stopped = np.flatnonzero(tracker.stopped())
    if scores is None or not len(stopped):
        return scores
    scores = {name: list(values) for name, values in scores.items()}
    for i in stopped:
        stop = tracker.epoch[i] + tracker.patience
        at = history["epoch"].index(stop) if stop in history["epoch"] else -1
        for name, values in scores.items():
            values[i] = history[f"{split}_{name}"][at][i]
    return scores


DIVERGED_LOSS = 10.0  # a mean loss above this is worse than a uniform guess among 20,000 classes


def divergence_note(history, optimizer="sgd"):
    """'' or a line naming the models whose train loss blew up (not finite, or above any guess's), and from
    which epoch: their scores are a diverged network's (predicting one class), and a lower learning rate is
    the usual cure, except for Rprop, whose steps grow from it by themselves."""
    losses = np.asarray(history["train_loss"], dtype=np.float64)  # (epochs, models)
    with np.errstate(invalid="ignore"):
        bad = ~(losses <= DIVERGED_LOSS)  # NaN compares false
    diverged = np.flatnonzero(bad[-1])
    if not len(diverged):
        return ""
    first = history["epoch"][int(np.argmax(bad[:, diverged].any(axis=1)))]
    finite = np.isfinite(losses[-1, diverged]).any()
    what = f"ended above {DIVERGED_LOSS:g} or not finite" if finite else "is not finite"
    cure = ("Rprop's steps grow by themselves from --optimizer.lr (up to 50), and it was made for full-batch "
            "gradients: try a larger --batch-size, or Adam" if optimizer == "rprop" else
            "a lower --optimizer.lr usually cures it")
    return (f"training diverged: the train loss of {len(diverged)} of {losses.shape[1]} model(s) {what} "
            f"(from epoch {first}); {cure}")


def at_selected(history, key, best_epochs):
    """Each model's `key` value at its own selected epoch (best_epochs: per model)."""
    return np.array([history[key][history["epoch"].index(epoch)][i] for i, epoch in enumerate(best_epochs)])


def final_stats(history, best_epochs=None):
    """Rows of (metric, mean, std, min, max) over models, for the last epoch and the best test epoch;
    with `best_epochs` (per model), also the figures at each model's selected (best validation) epoch."""
    rows = []
    for key in history_keys(history):
        rows.append((f"final {key.replace('_', ' ')}", np.asarray(history[key][-1])))
    rows.append(("best test accuracy", np.asarray(history["test_accuracy"]).max(axis=0)))
    if "test_dice" in history:
        rows.append(("best test dice", np.asarray(history["test_dice"]).max(axis=0)))
    if best_epochs:
        rows.append(("selected epoch", np.asarray(best_epochs, float)))
        # val loss too: what --best_metric val_loss selects by
        for key in ("val_loss", "val_accuracy", "val_dice", "test_loss", "test_accuracy", "test_dice"):
            if key in history:
                rows.append((f"{key.replace('_', ' ')} at selected epoch", at_selected(history, key, best_epochs)))
    out = []
    for name, values in rows:
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append({"metric": name, "mean": float(values.mean()), "std": std,
                    "min": float(values.min()), "max": float(values.max()), "n": int(len(values))})
    return out


def markdown_table(stats):
    def fmt(name, v):
        if name == "selected epoch":  # a whole epoch reads as one: 12, not 12.0; a mean over seeds 12.5
            return f"{v:.1f}".rstrip("0").rstrip(".")
        return f"{100 * v:.2f}%" if "accuracy" in name else f"{v:.4f}"
    n = stats[0]["n"]
    columns = ("mean", "std", "min", "max") if n > 1 else ("mean",)  # one seed has no spread: a std of 0 misleads
    head = f"| metric (over {n} seeds) | mean | std (n - 1) | min | max |" if n > 1 else "| metric (1 seed) | value |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for s in stats:
        cells = " | ".join(fmt(s["metric"], s[k]) for k in columns)
        lines.append(f"| {s['metric']} | {cells} |")
    return "\n".join(lines)


def score_name(history):
    """The figure a run is judged by: Dice for segmentation, accuracy for classification."""
    return "dice" if "test_dice" in history else "accuracy"


def format_score(name, value):
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4f}"


def format_mean_std(name, mean, std, n):
    """'98.89 ± 0.10%' over several models; '98.89%' for one, which has no spread to show."""
    if n == 1:
        return format_score(name, mean)
    return f"{format_score(name, mean).rstrip('%')} ± {format_score(name, std)}"


def trial_rows(label, history, first_seed, best_epochs=None, image_scores=None):
    """One row per model (trial) of a variant: its final test score, with `best_epochs` its selected
    epoch and the scores there (the reports' per-trial tables), with `image_scores` (per model, the
    per-image scores of its selected state on the test split) their std and min over the images."""
    score = score_name(history)
    rows = []
    for i, final in enumerate(history[f"test_{score}"][-1]):
        row = {"variant": label, "trial": i + 1, "seed": first_seed + i, f"final_test_{score}": final}
        if best_epochs:
            at = history["epoch"].index(best_epochs[i])
            row.update({"selected_epoch": best_epochs[i], f"val_{score}": history[f"val_{score}"][at][i],
                        f"test_{score}": history[f"test_{score}"][at][i]})
        if image_scores is not None:
            row.update(test_images_std=float(np.std(image_scores[i])), test_images_min=float(np.min(image_scores[i])))
        rows.append(row)
    return rows


def trial_table(rows):
    """Markdown: variant, trial, test score, then mean ± std per variant (the ADL reports' tables)."""
    score = "dice" if "final_test_dice" in rows[0] else "accuracy"
    fmt = lambda v: format_score(score, v)  # noqa: E731
    selecting, per_image = f"test_{score}" in rows[0], "test_images_std" in rows[0]
    key = f"test_{score}" if selecting else f"final_test_{score}"
    head = "| variant | trial | seed | " + (f"selected epoch | val {score} | test {score} | " if selecting else "") \
        + ("std over test images | min over test images | " if per_image else "") + f"final test {score} |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == label]
        for r in mine:
            cells = [label, str(r["trial"]), str(r["seed"])]
            if selecting:
                cells += [str(r["selected_epoch"]), fmt(r[f"val_{score}"]), fmt(r[f"test_{score}"])]
            if per_image:
                cells += [fmt(r["test_images_std"]), fmt(r["test_images_min"])]
            cells.append(fmt(r[f"final_test_{score}"]))
            lines.append("| " + " | ".join(cells) + " |")
        values = np.array([r[key] for r in mine])
        if len(values) > 1:
            summary = f"**{fmt(values.mean()).rstrip('%')} ± {fmt(values.std(ddof=1))}**"
        else:  # one trial has no sample std (± 0 read as a spread measured to be none)
            summary = f"**{fmt(values.mean())}** (one trial: no std)"
        cells = [label, "mean ± std", ""] + (["", "", summary] if selecting else [])
        if per_image:
            cells += [fmt(np.mean([r["test_images_std"] for r in mine])), fmt(min(r["test_images_min"] for r in mine))]
        cells += [] if selecting else [summary]
        cells += [""] if selecting else []
        lines.append("| " + " | ".join(cells) + " |")
    if per_image:  # the reports give both kinds; say which each is
        lines += ["", "± is the sample standard deviation over a variant's trials (n - 1); the std over test images "
                      "is the population one over a model's images (n), numpy's default."]
    elif len(rows) > len({r["variant"] for r in rows}):  # some variant has trials to spread
        lines += ["", "± is the sample standard deviation over a variant's trials (n - 1)."]
    return "\n".join(lines)
