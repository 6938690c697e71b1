"""Keras-style model summaries: one row per layer in call order, with output shape and parameter count.

Rows come from intercepting every submodule's `__call__` while the model is initialised abstractly
(`jax.eval_shape`, so nothing is computed or allocated). Pooling, activation and flatten layers appear because
flaxlab's networks use them as parameter-free modules (`models.MaxPool`, `models.Activation`, ...).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlab.models import count_params


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer call: `name` is its path in the variable tree (e.g. 'Conv_0'), `kind` its class."""
    name: str
    kind: str
    output_shape: tuple  # without the batch dimension; a tuple of shapes for layers with several outputs
    trainable: int  # in the `params` collection
    non_trainable: int  # in `batch_stats` (batch norm's running mean and variance)
    depth: int = 1  # 1 for the model's own layers, more for layers inside composite ones

    @property
    def params(self):
        return self.trainable + self.non_trainable


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    rows: list
    trainable: int
    non_trainable: int

    @property
    def total(self):
        return self.trainable + self.non_trainable


def _subtree(variables, collection, path):
    tree = variables.get(collection, {})
    for key in path:
        tree = tree.get(key, {})
    return tree


def _shape_without_batch(output):
    shapes = [tuple(leaf.shape[1:]) for leaf in jax.tree_util.tree_leaves(output)]
    return shapes[0] if len(shapes) == 1 else tuple(shapes)


def summarize_model(model, input_shape, train=False):
    """Rows and totals for `model` applied to one input of `input_shape` (no batch dimension, e.g. (32, 32, 3)).

    Totals come from the variables, not the rows, so shared or nested layers are not counted twice.
    """
    calls = []  # (path, kind, output), appended at call entry so rows keep call order, nested or not

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not context.module.path:  # the model itself is no row
            return next_fun(*args, **kwargs)
        kind = type(context.module).__name__
        for option in ("kind", "method"):  # Activation(relu), Upsample(nearest): the ablations' switches
            if isinstance(getattr(context.module, option, None), str):
                kind += f"({getattr(context.module, option)})"
        call = [tuple(context.module.path), kind, None]
        calls.append(call)
        call[2] = next_fun(*args, **kwargs)
        return call[2]

    def init():
        with nn.intercept_methods(record):
            return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                              jnp.zeros((1, *input_shape)), train=train)

    variables = jax.eval_shape(init)
    rows = [LayerRow(name="/".join(path), kind=kind, output_shape=_shape_without_batch(output),
                     trainable=count_params(_subtree(variables, "params", path)),
                     non_trainable=count_params(_subtree(variables, "batch_stats", path)), depth=len(path))
            for path, kind, output in calls]
    return ModelSummary(rows=rows, trainable=count_params(variables.get("params", {})),
                        non_trainable=count_params(variables.get("batch_stats", {})))


def format_summary(summary, title=None):
    """The summary as a text table, like Keras's `model.summary()`."""
    header = ("Layer (type)", "Output shape", "Param #")
    lines = [("  " * (row.depth - 1) + f"{row.name} ({row.kind})", str(row.output_shape), f"{row.params:,}")
             for row in summary.rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(3)]

    def fmt(cells):
        return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]:>{widths[2]}}"

    rule = "-" * len(fmt(header))
    out = ([title] if title else []) + [rule, fmt(header), rule, *map(fmt, lines), rule,
                                        f"Total params: {summary.total:,}",
                                        f"Trainable params: {summary.trainable:,}",
                                        f"Non-trainable params: {summary.non_trainable:,}"]
    return "\n".join(out)
