"""What a model gets wrong: a classifier's confusion matrix, most confused class pairs and misclassified
examples; a segmenter's per-image Dice scores with the mean, std and min the reports tabulate."""
import numpy as np


def confusion_matrix(labels, predictions, num_classes):
    """counts[true, predicted]."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    both = np.concatenate([labels.ravel(), predictions.ravel()])
    if both.size and not 0 <= both.min() <= both.max() < num_classes:  # was a reshape's ValueError, or a wrong count
        raise ValueError(f"classes run from 0 to {num_classes - 1}; got {both.min()} to {both.max()}")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def row_normalised(counts):
    """Each true class's row as fractions (0-1); a class absent from the labels stays all zero."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, float), where=totals > 0)


def most_confused_pairs(counts, top=10):
    """The largest off-diagonal cells: (true, predicted, count, fraction of that true class)."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    rates = row_normalised(counts)
    order = np.argsort(off, axis=None, kind="stable")[::-1][:top]
    pairs = [np.unravel_index(i, off.shape) for i in order]
    return [(int(t), int(p), int(off[t, p]), float(rates[t, p])) for t, p in pairs if off[t, p] > 0]


def confused_pairs_markdown(pairs, class_names=None):
    name = (lambda c: class_names[c]) if class_names else str
    lines = ["| true | predicted | count | share of true class |", "|---|---|---|---|"]
    lines += [f"| {name(t)} | {name(p)} | {n} | {100 * r:.1f}% |" for t, p, n, r in pairs]
    return "\n".join(lines)


def dice_per_image(predicted, masks):
    """Dice (DSC) of the foreground of each image, 1 where both masks are empty. For binary masks it equals
    the per-image F1 score (precision and recall of foreground pixels), the JSRT report's name for it."""
    p = np.asarray(predicted).reshape(len(predicted), -1) > 0
    t = np.asarray(masks).reshape(len(masks), -1) > 0
    overlap, total = (p & t).sum(1), p.sum(1) + t.sum(1)
    return np.where(total > 0, 2 * overlap / np.maximum(total, 1), 1.0)


def dice_table(scores, first_seed, label="DSC"):
    """Markdown: per model (seed), the mean, std, min and max of its per-image scores over the test
    split, then the mean ± std of those means over the seeds when there are several."""
    lines = [f"| seed | test images | mean {label} | std (n) | min | max |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(scores):
        lines.append(f"| {first_seed + i} | {len(s)} | {s.mean():.4f} | {s.std():.4f} | {s.min():.4f} | {s.max():.4f} |")
    if len(scores) > 1:
        means = np.array([s.mean() for s in scores])
        lines.append(f"| mean ± std (n - 1) over seeds | | **{means.mean():.4f} ± {means.std(ddof=1):.4f}** | "
                     f"{np.mean([s.std() for s in scores]):.4f} | {min(s.min() for s in scores):.4f} | |")
    return "\n".join(lines)
