"""Figures as in the reports: train vs test loss and accuracy per epoch."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _curve(ax, epochs, values, label, color):
    values = np.asarray(values)  # (epochs, models)
    ax.plot(epochs, values.mean(axis=1), label=label, color=color, marker="o", markersize=3)
    if values.shape[1] > 1:
        ax.fill_between(epochs, values.min(axis=1), values.max(axis=1), color=color, alpha=0.2)


def learning_curves(history, path, title):
    """Loss and accuracy, train vs test; with several seeds the mean and a min-max band."""
    epochs = history["epoch"]
    n = np.asarray(history["test_loss"]).shape[1]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        _curve(ax, epochs, history[f"train_{metric}"], "train", "tab:blue")
        _curve(ax, epochs, history[f"test_{metric}"], "test", "tab:orange")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_yscale("log")
    acc_ax.set_title(f"final test accuracy {100 * np.mean(history['test_accuracy'][-1]):.2f}%", fontsize=10)
    fig.suptitle(title + (f" (mean of {n} seeds, band = min-max)" if n > 1 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
