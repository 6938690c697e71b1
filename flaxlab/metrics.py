"""Per-epoch history and the trial tables (mean, std, min, max over seeds) the reports print.

Train loss and accuracy of an epoch are averages over its mini-batches as they were trained (what
the reports' loops printed); test figures are computed after the epoch on the whole test split.
"""
import numpy as np

HISTORY_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def new_history():
    return {"epoch": [], "epoch_time_s": [], **{k: [] for k in HISTORY_KEYS}}


def append_epoch(history, epoch, seconds, train, test):
    """Adds one epoch; `train`/`test` map loss/accuracy to one value per model."""
    history["epoch"].append(epoch)
    history["epoch_time_s"].append(round(seconds, 4))
    for split, values in (("train", train), ("test", test)):
        for name in ("loss", "accuracy"):
            history[f"{split}_{name}"].append([float(v) for v in values[name]])
    return history


def final_stats(history):
    """Rows of (metric, mean, std, min, max) over models, for the last epoch and the best test epoch."""
    rows = []
    for key in HISTORY_KEYS:
        rows.append((f"final {key.replace('_', ' ')}", np.asarray(history[key][-1])))
    rows.append(("best test accuracy", np.asarray(history["test_accuracy"]).max(axis=0)))
    out = []
    for name, values in rows:
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append({"metric": name, "mean": float(values.mean()), "std": std,
                    "min": float(values.min()), "max": float(values.max()), "n": int(len(values))})
    return out


def markdown_table(stats):
    def fmt(name, v):
        return f"{100 * v:.2f}%" if "accuracy" in name else f"{v:.4f}"
    n = stats[0]["n"]
    lines = [f"| metric (over {n} seed{'s' if n > 1 else ''}) | mean | std | min | max |", "|---|---|---|---|---|"]
    for s in stats:
        cells = " | ".join(fmt(s["metric"], s[k]) for k in ("mean", "std", "min", "max"))
        lines.append(f"| {s['metric']} | {cells} |")
    return "\n".join(lines)
