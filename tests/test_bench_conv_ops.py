"""tools/bench_conv_ops.py: it must find a network's conv layers as the model runs them, and its flaxlab and
PyTorch passes must compute the same thing, or the per-pass times it sets side by side mean nothing."""
import json
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_conv_ops  # noqa: E402


def test_finds_every_conv_layer_of_the_all_conv_net_with_its_shapes():
    convs = bench_conv_ops.model_convolutions("bs6207_allconv", batch_size=4)
    widths = [(3, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    sizes = [32, 32, 16, 16, 8, 8, 4, 4]
    assert [(shape, bench_conv_ops.kernel_shape(conv, shape)) for conv, shape in convs] == [
        ((4, s, s, i), (3, 3, i, o)) for s, (i, o) in zip(sizes, widths)]
    assert all((conv.strides, conv.padding) == (1, 1) for conv, _ in convs)
    assert bench_conv_ops.to_nchw(np.zeros(convs[1][1])).shape == (4, 16, 32, 32)


@pytest.mark.parametrize("network, layer", [("bs6207_allconv", 0), ("bs6207_allconv", 2), ("gtsrb_cnn", 1),
                                            ("small_cnn", 0)])
def test_flaxlab_and_torch_passes_agree(network, layer):
    """Through each of flaxlab's paths: oneDNN (on x86; else im2col for RGB, lax, the FFT for GTSRB's 64 -> 32
    5x5), the 1-channel one."""
    torch = pytest.importorskip("torch", reason="the comparison's other side is PyTorch")
    conv, shape = bench_conv_ops.model_convolutions(network, batch_size=2)[layer]
    inputs = bench_conv_ops.conv_inputs(conv, shape)
    ours, peer = bench_conv_ops.xla_passes(conv, *inputs), bench_conv_ops.torch_passes(conv, *inputs)
    to_torch = {"forward": bench_conv_ops.to_nchw, "input_grad": bench_conv_ops.to_nchw,
                "kernel_grad": bench_conv_ops.to_oihw}
    for name, convert in to_torch.items():
        with torch.no_grad():
            expected = peer[name]().numpy()
        np.testing.assert_allclose(convert(ours[name]()), expected, rtol=1e-4, atol=1e-3)


def test_prints_a_row_per_conv_layer_and_totals(capsys):
    pytest.importorskip("torch", reason="the comparison's other side is PyTorch")
    assert bench_conv_ops.main(["small_cnn", "--batch-size", "2", "--calls", "1", "--rounds", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[-1]["network"] == "small_cnn" and rows[-1]["convolutions"] == len(rows) - 1 >= 2
    assert all(row[f"{side}_{p}_ms"] > 0 for row in rows[:-1] for side in ("xla", "torch")
               for p in bench_conv_ops.PASSES)


@pytest.mark.parametrize("args, message", [(["resnet50"], "unknown network 'resnet50'"),
                                           (["small_cnn", "--rounds", "0"], "must be positive")])
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    assert bench_conv_ops.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
