"""Figures as in the reports: train vs test loss and accuracy per epoch."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _curve(ax, epochs, values, label, color):
    values = np.asarray(values)  # (epochs, models)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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


def sweep_comparison(histories, path, title):
    """One curve per variant (mean over seeds, min-max band): test accuracy and train loss per epoch."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10" if len(histories) <= 10 else "tab20")
    for i, (label, history) in enumerate(histories.items()):
        final = 100 * np.mean(history["test_accuracy"][-1])
        _curve(acc_ax, history["epoch"], history["test_accuracy"], f"{label} ({final:.2f}%)", colors(i))
        _curve(loss_ax, history["epoch"], history["train_loss"], label, colors(i))
    acc_ax.set_ylabel("test accuracy")
    loss_ax.set_ylabel("train loss")
    loss_ax.set_yscale("log")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, title="variant (final mean)", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_figure(counts, path, title, class_names=None):
    """The confusion matrix twice, as the reports show it: counts, and rows normalised to 0-1."""
    from flaxlab.analysis import row_normalised
    names = class_names or [str(i) for i in range(len(counts))]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, values, label, fmt in ((axes[0], counts, "count", "d"), (axes[1], row_normalised(counts), "share", ".2f")):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.046, label=label)
        ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(names) <= 12:
            top = values.max()
            for (t, p), v in np.ndenumerate(values):
                ax.text(p, t, format(v, fmt), ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * top else "black")
    axes[0].set_title("counts")
    axes[1].set_title("row-normalised")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def misclassified_grid(images, labels, predictions, path, title, class_names=None, count=25):
    """The first `count` misclassified test images, each titled true -> predicted."""
    names = class_names or [str(i) for i in range(int(max(labels.max(), predictions.max())) + 1)]
    wrong = np.flatnonzero(labels != predictions)[:count]
    cols = 5
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong):
        image = images[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        ax.set_title(f"{names[labels[i]]} -> {names[predictions[i]]}", fontsize=9, color="tab:red")
    fig.suptitle(f"{title}: {int((labels != predictions).sum())} misclassified (true -> predicted)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
