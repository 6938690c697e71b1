"""Figures as in the reports: train vs test loss and accuracy per epoch."""
import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from flaxlab.metrics import at_selected  # noqa: E402


def _save(fig, path, title, dpi=120, fontsize=None, top_inches=0.0):
    """Titles, lays out and writes the figure whole or not at all (a run stopped mid-write left half a PNG)."""
    try:
        fig.suptitle(title, **({"fontsize": fontsize} if fontsize else {}))  # None would not be the title's size
        fig.tight_layout(rect=(0, 0, 1, 1 - top_inches / fig.get_figheight()))
        part = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.part")
        try:
            fig.savefig(part, dpi=dpi, format=Path(path).suffix[1:] or "png")
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
    finally:
        plt.close(fig)
    return path


def _epoch_axis(ax, epochs):
    """Whole epochs on the x axis; a one-epoch run gets one tick, not 0.945 to 1.055 in fractions. Set once
    an axis holds all its curves, from all their epochs: a one-epoch variant's limits cut a longer one off."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:
        ax.set_xticks(list(epochs))
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)


def _log_scale(ax):
    """Losses on a log scale, unless no curve has a finite positive value (a run that diverged at once:
    matplotlib refuses to log-scale it)."""
    values = [np.asarray(line.get_ydata(), np.float64) for line in ax.get_lines()]
    if any((np.isfinite(v) & (v > 0)).any() for v in values):
        ax.set_yscale("log")
        shown = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in values])
        low, high = shown.min(), shown.max()  # digits enough to tell ticks 0.6935 and 0.694 apart
        digits = 3 if high >= 2 * low else max(3, int(np.ceil(np.log10(high / max(high - low, 1e-12 * high)))) + 2)
        plain = FuncFormatter(lambda value, _: f"{value:.{digits}g}")  # 0.725, not 7.25x10^-1
        ax.yaxis.set_major_formatter(plain)
        # within a decade the ticks labelled are minor ones; across decades those would crowd the axis
        ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    else:
        ax.text(0.5, 0.5, "not finite: training diverged", transform=ax.transAxes, ha="center", va="center")


def _curve(ax, epochs, values, label, color):
    values = np.asarray(values)  # (epochs, models)
    ax.plot(epochs, values.mean(axis=1), label=label, color=color, marker="o", markersize=3)
    if values.shape[1] > 1:
        ax.fill_between(epochs, values.min(axis=1), values.max(axis=1), color=color, alpha=0.2)


SPLIT_COLORS = {"train": "tab:blue", "val": "tab:green", "test": "tab:orange"}


def learning_curves(history, path, title, selected_epochs=None):
    """Loss and accuracy (and Dice, for segmentation), train vs (val and) test; with several seeds the mean
    and a min-max band. A run that kept its best-validation states marks their epochs (the figures of the
    run show those states, not the last epoch's) and gives their test scores beside the final ones."""
    epochs = history["epoch"]
    n = np.asarray(history["test_loss"]).shape[1]
    panels = ("loss", "accuracy") + (("dice",) if "test_dice" in history else ())
    # a segmentation's accuracy is of pixels; its Dice is the per-image F1 (the JSRT report's name, GlaS's DSC)
    names = {"accuracy": "pixel accuracy", "dice": "Dice (F1)"} if "test_dice" in history else {}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    loss_ax, acc_ax = axes[:2]
    for ax, metric in zip(axes, panels):
        for split, color in SPLIT_COLORS.items():
            if f"{split}_{metric}" in history:
                _curve(ax, epochs, history[f"{split}_{metric}"], split, color)
        for i, epoch in enumerate(sorted(set(selected_epochs or ()))):
            ax.axvline(epoch, color="grey", linestyle=":", label="selected epoch" if i == 0 else None)
        _epoch_axis(ax, epochs)
        ax.set_ylabel(names.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend()
    _log_scale(loss_ax)
    titles = [(f"test {names.get('accuracy', 'accuracy')}", "test_accuracy", lambda v: f"{100 * v:.2f}%")]
    if "test_dice" in history:
        titles.append(("test Dice = F1 (per-image mean)", "test_dice", lambda v: f"{v:.4f}"))
    for ax, (name, key, show) in zip(axes[1:], titles):
        text = f"final {name} {show(np.mean(history[key][-1]))}"
        if selected_epochs:
            kept = at_selected(history, key, selected_epochs).mean()
            text += f",\nat selected epoch{'s' if n > 1 else ''} {show(kept)}"  # one line was cut off
        ax.set_title(text, fontsize=10)
    return _save(fig, path, title + (f" (mean of {n} seeds, band = min-max)" if n > 1 else ""))


def trial_curves(histories, path, title):
    """Loss per epoch of every trial (model) on its own: train solid, test (or val) dashed; one panel per variant.
    The legend names each trial's colour once and the two line styles, beside the panels: with 8 trials a
    legend of every line covered the curves. The panels share one loss scale: each its own made a loss of 9
    look like one of 0.05."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories) + 1.4, 3.8), squeeze=False, sharey=True)
    trials = 0
    for ax, (label, history) in zip(axes[0], histories.items()):
        held = "val" if "val_loss" in history else "test"
        train, other = np.asarray(history["train_loss"]), np.asarray(history[f"{held}_loss"])
        trials = max(trials, train.shape[1])
        marker = "o" if len(history["epoch"]) == 1 else None  # one point: a line alone would not show
        for i in range(train.shape[1]):
            color = plt.get_cmap("tab10")(i % 10)
            ax.plot(history["epoch"], train[:, i], color=color, marker=marker)
            ax.plot(history["epoch"], other[:, i], color=color, linestyle="--", marker=marker, fillstyle="none")
        ax.set_title(label, fontsize=10)
        _epoch_axis(ax, history["epoch"])
        _log_scale(ax)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    # ten colours, named once each: a legend of 100 trials is taller than the figure
    handles = [Line2D([], [], color=plt.get_cmap("tab10")(i), label=f"trial {i + 1}" + (
        f", {i + 11}, ..." if trials > 10 else "")) for i in range(min(trials, 10))]
    point = "o" if any(len(history["epoch"]) == 1 for history in histories.values()) else None  # as drawn
    handles += [Line2D([], [], color="black", marker=point, label="train"),
                Line2D([], [], color="black", linestyle="--", marker=point, fillstyle="none", label=held)]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, path, title, dpi=110)


def sweep_comparison(histories, path, title, legend="variant", selected_epochs=None):
    """One curve per variant (mean over seeds, min-max band): test accuracy (Dice, for segmentation) and
    train loss per epoch. With `selected_epochs` ({label: each model's}), the legend gives the test score at
    the selected epochs beside the final one (the tables lead with it)."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10" if len(histories) <= 10 else "tab20")
    score = "dice" if "test_dice" in next(iter(histories.values())) else "accuracy"
    show = (lambda v: f"{100 * v:.2f}%") if score == "accuracy" else (lambda v: f"{v:.4f}")
    for i, (label, history) in enumerate(histories.items()):
        scores = show(np.mean(history[f"test_{score}"][-1]))
        if selected_epochs:
            scores += f", {show(at_selected(history, f'test_{score}', selected_epochs[label]).mean())}"
        _curve(acc_ax, history["epoch"], history[f"test_{score}"], f"{label} ({scores})", colors(i))
        _curve(loss_ax, history["epoch"], history["train_loss"], label, colors(i))
    acc_ax.set_ylabel(f"test {score}")
    loss_ax.set_ylabel("train loss")
    _log_scale(loss_ax)
    epochs = sorted(set().union(*(history["epoch"] for history in histories.values())))  # early stops end sooner
    for ax in (acc_ax, loss_ax):
        _epoch_axis(ax, epochs)
        ax.grid(alpha=0.3)
    means = "final mean, at selected epochs" if selected_epochs else "final mean"
    acc_ax.legend(fontsize=8, title=f"{legend} ({means})", title_fontsize=8)
    seeds = max(len(history[f"test_{score}"][-1]) for history in histories.values())
    return _save(fig, path, title + (" (mean over seeds, band = min-max)" if seeds > 1 else ""))


def confusion_figure(counts, path, title, class_names=None):
    """The confusion matrix twice, as the reports show it: counts, and rows normalised to 0-1."""
    from flaxlab.analysis import row_normalised
    names = class_names or [str(i) for i in range(len(counts))]
    many, words = len(names) > 12, max(map(len, names)) > 3  # GTSRB's 43; class names rather than digits
    labelled = len(names) <= 80  # past that, class numbers every few ticks: a folder set of 1,000 classes
    # 43 labels need ~0.15 inch each at 6 points (at 5.2 inches, 10 points, they overlapped)
    side = max(5.2, 0.15 * len(names) + (1.2 if words else 0)) if labelled else 12.0
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.6, side))
    for ax, values, label, fmt in ((axes[0], counts, "count", "d"), (axes[1], row_normalised(counts), "share", ".2f")):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.046, label=label)
        size = 6 if len(names) > 20 else None
        if labelled:
            ax.set_xticks(range(len(names)), names, rotation=90 if many else 45 if words else 0, fontsize=size,
                          ha="right" if words else "center", rotation_mode="anchor" if words else "default",
                          va="center" if words and many else "top")
            ax.set_yticks(range(len(names)), names, fontsize=size)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(names) <= 12:
            top = values.max()
            for (t, p), v in np.ndenumerate(values):
                ax.text(p, t, format(v, fmt), ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * top else "black")
    axes[0].set_title("counts")
    axes[1].set_title("row-normalised")
    return _save(fig, path, title)


def misclassified_grid(images, labels, predictions, path, title, class_names=None, count=25):
    """Up to `count` misclassified test images, each titled true -> predicted."""
    names = class_names or [str(i) for i in range(int(max(labels.max(), predictions.max())) + 1)]
    wrong = spread_over_classes(np.flatnonzero(labels != predictions), labels, count)
    titles = [f"{names[labels[i]]} -> {names[predictions[i]]}" for i in wrong]
    titles = [t if len(t) <= 22 else t.replace(" -> ", "\n-> ") for t in titles]  # GTSRB's names overlapped
    cols, lines = 5, max((t.count("\n") + 1 for t in titles), default=1)
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, (1.8 + 0.2 * lines) * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, text in zip(axes.ravel(), wrong, titles):
        image = images[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        ax.set_title(text, fontsize=9, color="tab:red")
    return _save(fig, path, f"{title}: {int((labels != predictions).sum())} misclassified (true -> predicted)")


def spread_over_classes(indices, labels, count):
    """Up to `count` of `indices`, taken from each true class in turn (then grouped by class): a test split
    stored class by class (an image folder's) would otherwise show only its first classes' mistakes."""
    by_class = [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    rounds = max((len(group) for group in by_class), default=0)
    picked = [group[r] for r in range(rounds) for group in by_class if r < len(group)][:count]
    return np.asarray(sorted(picked, key=lambda i: (labels[i], i)), dtype=int)


def _square_grid(count):
    """(rows, cols) for `count` panels, as near square as possible: 64 -> 8x8, 6 -> 2x3."""
    cols = int(np.ceil(np.sqrt(count)))
    return int(np.ceil(count / cols)), cols


def _min_max(values):
    """Scaled to [0, 1] on its own, so weak filters are as visible as strong ones; constant -> 0.5."""
    low, high = values.min(), values.max()
    return np.full_like(values, 0.5) if high == low else (values - low) / (high - low)


def _wrapped(text, width_inches):
    """A title broken into lines that fit a figure `width_inches` wide at 10 points (a narrow grid of 8 maps cut
    "glas_fcn2_flips (seed 0, ...): Conv_0 on test image 44 (testA_45)" off at both ends)."""
    chars = max(int(width_inches * 11), 20)
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.splitlines())


def filter_grid(kernel_hwio, path, title):
    """One tile per output filter of a conv kernel (HWIO): RGB for 3 input channels, grayscale for 1,
    grayscale of the mean over input channels otherwise; each tile min-max normalised on its own."""
    kernel = np.asarray(kernel_hwio, np.float32)
    if kernel.ndim != 4:
        from flaxlab.errors import UsageError
        raise UsageError(f"filter_grid takes an HWIO conv kernel, got shape {kernel.shape}")
    kh, kw, cin, cout = kernel.shape
    shown = {3: "RGB", 1: "grayscale"}.get(cin, f"mean of {cin} input channels")
    rows, cols = _square_grid(cout)
    width = max(0.9 * cols + 0.4, 4.5)
    text = _wrapped(f"{title}\n{cout} filters {kh}x{kw}, {shown}, each scaled to its own min-max", width)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 0.9 * rows + 0.3 + 0.25 * len(text.splitlines())),
                             squeeze=False)
    for ax in axes.ravel()[cout:]:
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[:cout]):
        ax.set_xticks([])  # the frame stays, so white pixels at a tile's edge are not lost in the page
        ax.set_yticks([])
        tile = kernel[..., i]
        if cin == 3:
            ax.imshow(_min_max(tile), interpolation="nearest")
        else:
            ax.imshow(_min_max(tile.mean(axis=-1)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    return _save(fig, path, text, fontsize=10)


def feature_maps_figure(image, maps_hwc, path, title, max_maps=64):
    """The input image, then one viridis panel per channel of a layer's output (the first `max_maps`),
    each on its own colour scale and labelled with its channel number."""
    image, maps = np.asarray(image), np.asarray(maps_hwc, np.float32)
    if maps.ndim != 3:
        from flaxlab.errors import UsageError
        raise UsageError(f"feature_maps_figure takes (H, W, C) maps, got shape {maps.shape}")
    count = min(maps.shape[-1], max_maps)
    rows, cols = _square_grid(count + 1)
    h, w, c = maps.shape
    shown = f"{c} maps {h}x{w}" if count == c else f"first {count} of {c} maps {h}x{w}"
    width = max(1.3 * cols + 0.4, 4.5)
    text = _wrapped(f"{title}\n{shown}, each on its own colour scale", width)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 1.4 * rows + 0.3 + 0.25 * len(text.splitlines())),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    panels = axes.ravel()
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 1)
    gray = image.shape[-1] == 1
    if gray:
        panels[0].imshow(image[..., 0], cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
    else:
        panels[0].imshow(image)
    panels[0].set_title("input", fontsize=8)
    for channel, ax in enumerate(panels[1:count + 1]):
        ax.imshow(maps[..., channel], cmap="viridis", interpolation="nearest")
        ax.set_title(str(channel), fontsize=7)
    return _save(fig, path, text, fontsize=10)


def _show(ax, image, title=None, mask=None, value_range=None):
    """`value_range` (low, high) pins a grey image's black and white: a mask all foreground is white, not black
    (imshow scales a constant image's one value to black)."""
    image = np.asarray(image)
    low, high = value_range or (None, None)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
              vmin=low, vmax=high)
    if mask is not None:  # foreground in translucent yellow (autumn's top; red is lost on H&E's pinks)
        ax.imshow(np.ma.masked_where(np.asarray(mask) == 0, mask), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
    if value_range:  # a frame, so that a white mask is not lost on the white page
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)


def segmentation_extremes(images, masks, predictions, scores, path, title, count=3, label="DSC", name=str):
    """The `count` best and worst test images by score: image, ground truth, prediction in each row;
    `name(i)`: how the row calls test image i."""
    order = np.argsort(scores, kind="stable")
    picks = [("best", i) for i in order[::-1][:count]] + [("worst", i) for i in order[:count]]
    fig, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.5 * len(picks)), squeeze=False)
    for row, (kind, i) in zip(axes, picks):
        _show(row[0], images[i], f"{kind}: test image {name(i)}")
        _show(row[1], masks[i][..., None], "ground truth", value_range=(0, 1))
        _show(row[2], predictions[i][..., None], f"prediction, {label} {scores[i]:.3f}", value_range=(0, 1))
    return _save(fig, path, title, dpi=100, top_inches=0.15)  # tight_layout alone let the title touch row 1


def mask_overlay(image, mask, prediction, path, title, score=None, label="DSC"):
    """One test image with its true mask and its predicted mask drawn over it."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    _show(axes[0], image, "image")
    _show(axes[1], image, "ground truth", mask)
    _show(axes[2], image, "prediction" + (f" ({label} {score:.3f})" if score is not None else ""), prediction)
    return _save(fig, path, title, dpi=110)
