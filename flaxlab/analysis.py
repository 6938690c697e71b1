"""What a classifier gets wrong: confusion matrix, the most confused class pairs, misclassified examples."""
import numpy as np


def confusion_matrix(labels, predictions, num_classes):
    """counts[true, predicted]."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
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
