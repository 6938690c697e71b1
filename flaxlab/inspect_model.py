"""Looking inside trained image classifiers: layer outputs (feature maps) and first-layer filters, for reports.

A layer is named by its module path joined with "/" ("Conv_0", "BatchNorm_3", "Block_0/Conv_1"), the path under
which flax's `capture_intermediates` stores its `__call__` output; `layer_output` reads exactly that, so any name
from `layer_names` or `conv_layer_names` is accepted. Flax numbers submodules per class, so "Conv_1" is the
second convolution built in its parent, whatever other layers lie between.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlab.errors import UsageError
from flaxlab.image_data import natural_key
from flaxlab.models import Conv
from flaxlab.pretrained import Conv2d
from flaxlab.train import preprocess

CONV_TYPES = (Conv, Conv2d, nn.Conv)


def _layer_calls(model, input_shape, variables=None):
    """(name, module) of every captured submodule output, ordered by call entry (a composite layer before its parts).

    Traced abstractly (`jax.eval_shape`): no weights are computed, so this is cheap even without `variables`.
    `capture_intermediates` sows only when a call returns, so its own order puts composite layers after their
    parts; an interceptor records the order instead, and the captured tree says which calls count.
    """
    calls = {}  # name -> module; dicts keep insertion order, and a layer called twice keeps its first place

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path:  # the model itself is no layer
            calls.setdefault("/".join(context.module.path), context.module)
        return next_fun(*args, **kwargs)

    def run(variables):
        x = jnp.zeros((1, *input_shape), jnp.float32)
        if variables is None:
            variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)
        with nn.intercept_methods(record):
            _, state = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
        captured.update(_captured_names(state.get("intermediates", {})))

    captured = set()
    jax.eval_shape(run, variables)
    return [(name, module) for name, module in calls.items() if name in captured]


def _captured_names(intermediates, prefix=()):
    """Paths of the modules whose `__call__` output was sown into the intermediates tree."""
    names = []
    for key, value in intermediates.items():
        if key == "__call__":
            if prefix:
                names.append("/".join(prefix))
        elif hasattr(value, "items"):
            names += _captured_names(value, prefix + (key,))
    return names


def layer_names(model, variables, input_shape):
    """Every layer `layer_output` accepts, in call order, e.g. to list them when a name is wrong."""
    return [name for name, _ in _layer_calls(model, input_shape, variables)]


def conv_layer_names(model, input_shape):
    """The convolutions in call order; needs no trained weights, so figures can pick layers before loading any."""
    return [name for name, module in _layer_calls(model, input_shape) if isinstance(module, CONV_TYPES)]


def layer_output(model, variables, image, layer):
    """The named layer's output for one HWC image (uint8 scaled to [0, 1] as in training), as numpy without
    the batch dimension, e.g. (H', W', C') for a convolution. Inference mode: batch norm uses its running stats."""
    image = jnp.asarray(image)
    if image.ndim != 3:
        raise UsageError(f"layer_output takes one HWC image, got shape {tuple(image.shape)}")
    x = (preprocess(image) if image.dtype == jnp.uint8 else image.astype(jnp.float32))[None]
    path = tuple(layer.split("/"))
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda module, method: method == "__call__" and module.path == path)
    found = state.get("intermediates", {})  # absent when nothing matched
    for key in path:
        found = found.get(key, {})
    if "__call__" not in found:
        valid = layer_names(model, variables, tuple(image.shape))
        raise UsageError(f"unknown layer '{layer}'; valid layers: {', '.join(valid)}")
    return np.asarray(found["__call__"][0][0])  # first call of the layer, first (only) image


def layer_output_shape(model, input_shape, layer):
    """The named layer's output shape for one image, without the batch dimension; traced, not computed."""
    path = tuple(layer.split("/"))

    def run(x):
        variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)
        _, state = model.apply(variables, x, train=False, mutable=["intermediates"],
                               capture_intermediates=lambda m, method: method == "__call__" and m.path == path)
        found = state.get("intermediates", {})
        for key in path:
            found = found.get(key, {})
        return found["__call__"][0]
    return tuple(jax.eval_shape(run, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)).shape[1:])


def _conv_kernels(tree, prefix=()):
    kernels = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            kernels.update(_conv_kernels(value, prefix + (key,)))
        elif key == "kernel" and np.ndim(value) == 4:  # HWIO; dense kernels are 2-D
            kernels["/".join(prefix)] = value
    return kernels


def first_conv_kernel(params, conv_names=None):
    """The first convolution's kernel (HWIO numpy), the filters a report shows as images.

    The params tree's own order is not call order once it has been through `jax.tree_util` or a checkpoint
    (keys sorted as text: 'Conv_10' < 'Conv_2'), so without `conv_names` (from `conv_layer_names`) the lowest
    per-class number wins. Flax numbers layers as they are built, which is call order for convolutions that share
    a parent and are each called where built (all flaxlab networks), but not for `Conv(...)(Conv(...)(x))`, where
    Conv_1 runs first: pass `conv_names` for such models. Takes a params tree or the whole variables dict.
    """
    if "params" in params:
        params = params["params"]
    kernels = _conv_kernels(params)
    if not kernels:
        raise UsageError("the model has no convolution (no 4-D 'kernel' in its params)")
    if conv_names:
        if conv_names[0] not in kernels:
            raise UsageError(f"no convolution kernel at '{conv_names[0]}'; found: {', '.join(sorted(kernels))}")
        return np.asarray(kernels[conv_names[0]])
    return np.asarray(kernels[min(kernels, key=natural_key)])
