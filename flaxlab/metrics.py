"""Per-epoch history and the trial tables (mean, std, min, max over seeds) the reports print.

Train loss and accuracy of an epoch are averages over its mini-batches as they were trained (what
the reports' loops printed); test figures are computed after the epoch on the whole test split.
"""
import numpy as np

HISTORY_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
VAL_KEYS = ("val_loss", "val_accuracy")
SELECTION_METRICS = VAL_KEYS  # what picks a model's best epoch (its kept checkpoint, early stopping)


def history_keys(history):
    return HISTORY_KEYS + (VAL_KEYS if "val_loss" in history else ())


def new_history(with_val=False):
    return {"epoch": [], "epoch_time_s": [], **{k: [] for k in HISTORY_KEYS + (VAL_KEYS if with_val else ())}}


def append_epoch(history, epoch, seconds, train, test, val=None):
    """Adds one epoch; `train`/`test`/`val` map loss/accuracy to one value per model."""
    history["epoch"].append(epoch)
    history["epoch_time_s"].append(round(seconds, 4))
    for split, values in (("train", train), ("test", test), ("val", val)):
        if values is not None:
            for name in ("loss", "accuracy"):
                history[f"{split}_{name}"].append([float(v) for v in values[name]])
    return history


class BestEpochs:
    """Per model: the best epoch so far by a validation metric, and epochs since it (for early stopping)."""

    def __init__(self, metric, num_models, patience=0, state=None):
        self.metric, self.patience = metric, patience
        self.sign = -1.0 if metric.endswith("loss") else 1.0
        state = state or {"value": [None] * num_models, "epoch": [0] * num_models, "stale": [0] * num_models}
        self.value, self.epoch, self.stale = state["value"], state["epoch"], state["stale"]

    def update(self, epoch, values):
        """Takes this epoch's values (one per model); returns which models improved."""
        improved = []
        for i, v in enumerate(values):
            better = self.value[i] is None or self.sign * v > self.sign * self.value[i]
            if better:
                self.value[i], self.epoch[i], self.stale[i] = float(v), epoch, 0
            else:
                self.stale[i] += 1
            improved.append(better)
        return np.array(improved)

    def should_stop(self):
        """Early stopping: every model has gone `patience` epochs without improving."""
        return self.patience > 0 and min(self.stale) >= self.patience

    def state(self):
        return {"value": self.value, "epoch": self.epoch, "stale": self.stale}


def final_stats(history, best_epochs=None):
    """Rows of (metric, mean, std, min, max) over models, for the last epoch and the best test epoch;
    with `best_epochs` (per model), also the figures at each model's selected (best validation) epoch."""
    rows = []
    for key in history_keys(history):
        rows.append((f"final {key.replace('_', ' ')}", np.asarray(history[key][-1])))
    rows.append(("best test accuracy", np.asarray(history["test_accuracy"]).max(axis=0)))
    if best_epochs:
        at = [history["epoch"].index(e) for e in best_epochs]
        rows.append(("selected epoch", np.asarray(best_epochs, float)))
        for key in ("val_accuracy", "test_loss", "test_accuracy"):
            rows.append((f"{key.replace('_', ' ')} at selected epoch",
                         np.array([history[key][j][i] for i, j in enumerate(at)])))
    out = []
    for name, values in rows:
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append({"metric": name, "mean": float(values.mean()), "std": std,
                    "min": float(values.min()), "max": float(values.max()), "n": int(len(values))})
    return out


def markdown_table(stats):
    def fmt(name, v):
        return f"{100 * v:.2f}%" if "accuracy" in name else f"{v:.1f}" if name == "selected epoch" else f"{v:.4f}"
    n = stats[0]["n"]
    lines = [f"| metric (over {n} seed{'s' if n > 1 else ''}) | mean | std | min | max |", "|---|---|---|---|---|"]
    for s in stats:
        cells = " | ".join(fmt(s["metric"], s[k]) for k in ("mean", "std", "min", "max"))
        lines.append(f"| {s['metric']} | {cells} |")
    return "\n".join(lines)


def trial_rows(label, history, first_seed, best_epochs=None):
    """One row per model (trial) of a variant: its final test accuracy, and with `best_epochs` its selected
    epoch and the test accuracy there (the reports' per-trial tables)."""
    rows = []
    for i, final in enumerate(history["test_accuracy"][-1]):
        row = {"variant": label, "trial": i + 1, "seed": first_seed + i, "final_test_accuracy": final}
        if best_epochs:
            at = history["epoch"].index(best_epochs[i])
            row.update(selected_epoch=best_epochs[i], val_accuracy=history["val_accuracy"][at][i],
                       test_accuracy=history["test_accuracy"][at][i])
        rows.append(row)
    return rows


def trial_table(rows):
    """Markdown: variant, trial, test accuracy, then mean ± std per variant (the ADL report's table)."""
    selecting = "test_accuracy" in rows[0]
    key = "test_accuracy" if selecting else "final_test_accuracy"
    head = "| variant | trial | seed | " + ("selected epoch | val accuracy | test accuracy | final test accuracy |"
                                          if selecting else "final test accuracy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == label]
        for r in mine:
            cells = [label, str(r["trial"]), str(r["seed"])]
            if selecting:
                cells += [str(r["selected_epoch"]), f"{100 * r['val_accuracy']:.2f}%", f"{100 * r['test_accuracy']:.2f}%"]
            cells.append(f"{100 * r['final_test_accuracy']:.2f}%")
            lines.append("| " + " | ".join(cells) + " |")
        values = np.array([r[key] for r in mine])
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        summary = f"**{100 * values.mean():.2f} ± {100 * std:.2f}%**"
        cells = [label, "mean ± std", ""] + (["", "", summary, ""] if selecting else [summary])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
