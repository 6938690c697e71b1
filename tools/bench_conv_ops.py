"""Each convolution layer of a flaxlab network timed alone, flaxlab on XLA against PyTorch: forward, input
gradient and kernel gradient, on the same machine in one process, alternating rounds, medians.

A train step is mostly these passes, so this says which layers and which pass keep a network's step behind
(or ahead of) the eager-PyTorch peer's, where a step-level bench only gives the total. The layers are the
model's `Conv` calls, found by running it once; each is timed through the path flaxlab takes for it alone
(oneDNN on x86, lax's convolution, the FFT, im2col or the 1-channel multiply-adds), compiled as the engine
compiles a step (`train.compile_for_backend`). PyTorch's side is `conv2d` (with the bias, as flaxlab's
forward has it) and `torch.nn.grad.conv2d_input` / `conv2d_weight`.

  python tools/bench_conv_ops.py bs6207_allconv --batch-size 32
"""
import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flaxlab import models, train  # noqa: E402
from flaxlab.errors import UsageError  # noqa: E402

PASSES = ("forward", "input_grad", "kernel_grad")


def model_convolutions(name, batch_size):
    """(Conv layer, input shape) of every `Conv` call in the model's forward pass, in call order."""
    if name not in models.REPORT_INPUTS:
        raise UsageError(f"unknown network '{name}'; known: {', '.join(models.REPORT_INPUTS)}")
    shape, classes = models.REPORT_INPUTS[name]
    model = models.make_model({"name": name}, classes)
    found = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, models.Conv) and context.method_name == "__call__":
            conv = context.module
            found.append((models.Conv(conv.features, conv.kernel_size, conv.strides, conv.padding), args[0].shape))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((batch_size, *shape)))
    return found


def kernel_shape(conv, input_shape):
    return (conv.kernel_size, conv.kernel_size, input_shape[-1], conv.features)


def torch_conv_args(conv):
    return dict(stride=(conv.strides,) * 2, padding=(conv.padding,) * 2)


def to_nchw(maps):
    """Feature maps (an input, an output or their gradients) from flaxlab's NHWC to PyTorch's NCHW."""
    return np.ascontiguousarray(np.asarray(maps).transpose(0, 3, 1, 2))


def to_oihw(kernel):
    return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))


def conv_inputs(conv, input_shape, seed=0):
    """Random input, kernel, bias and output gradient of one layer, as numpy arrays in flaxlab's layout."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape, np.float32)
    w = (rng.standard_normal(kernel_shape(conv, input_shape)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(conv.features) * 0.1).astype(np.float32)
    out = jax.eval_shape(functools.partial(_apply, conv), x, w, b)
    return x, w, b, rng.standard_normal(out.shape, np.float32)


def _apply(conv, x, w, b):
    return conv.apply({"params": {"kernel": w, "bias": b}}, x)


def xla_passes(conv, x, w, b, g):
    """The three passes of one layer, compiled as the engine compiles a step; each call returns its result
    on the device (not waited for)."""
    layer = functools.partial(_apply, conv)
    fns = {"forward": (lambda x, w, b, g: layer(x, w, b)),
           "input_grad": (lambda x, w, b, g: jax.vjp(lambda x: layer(x, w, b), x)[1](g)[0]),
           "kernel_grad": (lambda x, w, b, g: jax.vjp(lambda w: layer(x, w, b), w)[1](g)[0])}
    args = [jnp.asarray(a) for a in (x, w, b, g)]
    out = {}
    for name, fn in fns.items():
        compiled = train.compile_for_backend(jax.jit(fn).lower(*args))
        out[name] = functools.partial(compiled, *args)
    return out


def torch_passes(conv, x, w, b, g):
    """The same passes in PyTorch, from the same numpy inputs; results in NCHW / OIHW."""
    import torch
    F = torch.nn.functional
    kw = torch_conv_args(conv)
    x, g, w, b = (torch.from_numpy(a) for a in (to_nchw(x), to_nchw(g), to_oihw(w), b))
    return {"forward": lambda: F.conv2d(x, w, b, **kw),
            "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, **kw),
            "kernel_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, **kw)}


def time_ms(fn, calls):
    """Milliseconds a call, each call waited for (XLA's are asynchronous, PyTorch's eager ones are not)."""
    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t) / calls * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("network", help=f"one of: {', '.join(models.REPORT_INPUTS)}")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--calls", type=int, default=50, help="calls per timing")
    ap.add_argument("--rounds", type=int, default=5, help="alternating XLA/PyTorch rounds; medians are printed")
    a = ap.parse_args(argv)
    try:
        if a.batch_size < 1 or a.calls < 1 or a.rounds < 1:
            raise UsageError("--batch-size, --calls and --rounds must be positive")
        convs = model_convolutions(a.network, a.batch_size)
        import torch
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: this comparison needs torch: `pip install torch==2.13.0`", file=sys.stderr)
        return 2
    totals = {f"{side}_{p}_ms": 0.0 for side in ("xla", "torch") for p in PASSES}
    for i, (conv, input_shape) in enumerate(convs):
        inputs = conv_inputs(conv, input_shape)
        ours, peer = xla_passes(conv, *inputs), torch_passes(conv, *inputs)
        times = {f"{side}_{p}_ms": [] for side in ("xla", "torch") for p in PASSES}
        for _ in range(a.rounds):
            for p in PASSES:
                times[f"xla_{p}_ms"].append(time_ms(ours[p], a.calls))
                times[f"torch_{p}_ms"].append(time_ms(peer[p], a.calls))
        row = {k: round(statistics.median(v), 3) for k, v in times.items()}
        for k, v in row.items():
            totals[k] += v
        print(json.dumps(dict(conv=i, input=list(input_shape), kernel=list(kernel_shape(conv, input_shape)),
                              stride=conv.strides, padding=conv.padding, **row)), flush=True)
    print(json.dumps(dict(network=a.network, batch_size=a.batch_size, convolutions=len(convs),
                          jax=jax.__version__, torch=torch.__version__, threads=torch.get_num_threads(),
                          **{k: round(v, 2) for k, v in totals.items()})), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
