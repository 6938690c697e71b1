#!/usr/bin/env python3
"""Each convolution of a flaxlab network timed alone, XLA against PyTorch: forward, input gradient and
kernel gradient, on the same machine in one process, alternating rounds, medians.

A whole train step is a sum of these passes plus a little glue, so this says which layers and which pass
keep a network's step behind (or ahead of) the eager-PyTorch peer's, where a step-level bench only gives
the total. The convolutions are read from the model's traced forward pass: every lax convolution it runs,
with its shapes, strides, padding and dilation (flaxlab's own paths, such as the FFT convolution, are not
lax convolutions and are left out). XLA's side is compiled as the engine compiles a step
(`train.compile_for_backend`); PyTorch's side is `conv2d` and `torch.nn.grad.conv2d_input/_weight`.

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

import jax  # noqa: E402
import jax.extend.core as jax_core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flaxlab import train  # noqa: E402
from flaxlab.errors import UsageError  # noqa: E402
from flaxlab.models import REPORT_INPUTS, make_model  # noqa: E402

PASSES = ("forward", "input_grad", "kernel_grad")


def model_convolutions(name, batch_size):
    """(lhs shape, rhs shape, params) of every lax convolution in the model's forward pass, in order."""
    if name not in REPORT_INPUTS:
        raise UsageError(f"unknown network '{name}'; known: {', '.join(REPORT_INPUTS)}")
    shape, classes = REPORT_INPUTS[name]
    model = make_model({"name": name}, classes)
    x = jnp.zeros((batch_size, *shape), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.append((eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, dict(eqn.params)))
            for sub in jax_core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return found


def torch_conv_args(lhs_shape, params):
    """stride, padding and dilation for torch's conv2d, or None where it has no equal (asymmetric padding,
    input dilation, groups, not 2-D, outputs laid out unlike inputs)."""
    pads, dn = params["padding"], params["dimension_numbers"]
    if (len(lhs_shape) != 4 or dn.out_spec != dn.lhs_spec or params["feature_group_count"] != 1
            or params["batch_group_count"] != 1 or any(d != 1 for d in params["lhs_dilation"])
            or any(lo != hi for lo, hi in pads)):
        return None
    return dict(stride=tuple(params["window_strides"]), padding=tuple(lo for lo, _ in pads),
                dilation=tuple(params["rhs_dilation"]))


def to_nchw(maps, params):
    """Feature maps (an input, an output or their gradients) from the model's layout to PyTorch's."""
    return np.ascontiguousarray(np.asarray(maps).transpose(params["dimension_numbers"].lhs_spec))


def to_oihw(kernel, params):
    return np.ascontiguousarray(np.asarray(kernel).transpose(params["dimension_numbers"].rhs_spec))


def conv_inputs(lhs_shape, rhs_shape, params, seed=0):
    """Random input, kernel and output gradient of one convolution, as numpy arrays in the model's layout."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lhs_shape, np.float32)
    w = (rng.standard_normal(rhs_shape) * 0.1).astype(np.float32)
    out = jax.eval_shape(functools.partial(_lax_conv, params=params), x, w)
    return x, w, rng.standard_normal(out.shape, np.float32)


def _lax_conv(x, w, params):
    return jax.lax.conv_general_dilated(x, w, **{k: params[k] for k in (
        "window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers", "feature_group_count",
        "batch_group_count")})


def xla_passes(x, w, g, params):
    """The three passes of one convolution, compiled as the engine compiles a step; each call returns its
    result on the device (not waited for)."""
    conv = functools.partial(_lax_conv, params=params)
    fns = {"forward": (lambda x, w, g: conv(x, w)),
           "input_grad": (lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
           "kernel_grad": (lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])}
    x, w, g = (jnp.asarray(a) for a in (x, w, g))
    out = {}
    for name, fn in fns.items():
        compiled = train.compile_for_backend(jax.jit(fn).lower(x, w, g))
        out[name] = functools.partial(compiled, x, w, g)
    return out


def torch_passes(x, w, g, params):
    """The same passes in PyTorch, from the same numpy inputs (model layout); results in NCHW / OIHW."""
    import torch
    F = torch.nn.functional
    kw = torch_conv_args(x.shape, params)
    x, g = (torch.from_numpy(to_nchw(a, params)) for a in (x, g))
    w = torch.from_numpy(to_oihw(w, params))
    return {"forward": lambda: F.conv2d(x, w, **kw),
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
    ap.add_argument("network", help=f"one of: {', '.join(REPORT_INPUTS)}")
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
    for i, (lhs_shape, rhs_shape, params) in enumerate(convs):
        inputs = conv_inputs(lhs_shape, rhs_shape, params)
        ours = xla_passes(*inputs, params)
        peer = torch_passes(*inputs, params) if torch_conv_args(lhs_shape, params) else {}
        times = {f"{side}_{p}_ms": [] for side in ("xla", "torch") for p in PASSES if side == "xla" or peer}
        for _ in range(a.rounds):
            for p in PASSES:
                times[f"xla_{p}_ms"].append(time_ms(ours[p], a.calls))
                if peer:
                    times[f"torch_{p}_ms"].append(time_ms(peer[p], a.calls))
        row = {k: round(statistics.median(v), 3) for k, v in times.items()}
        for k, v in row.items():
            totals[k] += v
        print(json.dumps(dict(conv=i, input=list(lhs_shape), kernel=list(rhs_shape),
                              stride=list(params["window_strides"]), padding=[list(p) for p in params["padding"]],
                              **row, **({} if peer else {"torch": "no conv2d equal"}))), flush=True)
    print(json.dumps(dict(network=a.network, batch_size=a.batch_size, convolutions=len(convs),
                          jax=jax.__version__, torch=torch.__version__, threads=torch.get_num_threads(),
                          **{k: round(v, 2) for k, v in totals.items()})), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
