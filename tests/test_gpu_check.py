"""tools/gpu_check.py, the prepared device-machine check: its summary must hold up the first time it runs
on a GPU, where a crash costs a lease's minutes. The steps themselves are the bench and run commands."""
import json
import subprocess
import sys

import pytest

from conftest import REPO
from test_cli import cli

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402
import gpu_conv_ab  # noqa: E402


def _rows(step, *rows, exit=0, wall_s=1.0):
    return [dict(row, step=step) for row in rows] + [dict(step=step, step_done=step, exit=exit, wall_s=wall_s)]


def test_summary_sets_each_target_beside_what_was_measured():
    ours = dict(peer="flaxlab", steps_per_s=3000.0, train_s=0.6, compile_s=2.0, epoch_mode="scan", test_accuracy=0.97)
    peer = dict(peer="pytorch-eager", steps_per_s=1000.0, train_s=1.8)
    rows = (_rows("machine", dict(step_info="machine", python="3.12.3", jax="0.11.2", flax="0.12", optax="0.2.8",
                                  backend="gpu", devices=["cuda:0"], device_kind="NVIDIA H200", torch="2.11.0",
                                  torch_device="NVIDIA H200"))
            + _rows("mnist_cnn_vs_peer", ours, peer, dict(ratio_steps_per_s=3.0, ratio_images_per_s=3.0),
                    dict(ours, steps_per_s=4000.0, train_s=0.4), peer, dict(ratio_steps_per_s=4.0, ratio_images_per_s=4.0))
            + _rows("mnist_cnn_8_seeds_vs_8_peer_runs", dict(ours, train_s=1.5, compile_s=3.0), *[peer] * 8)
            + _rows("mnist_cnn_20_epochs", dict(history_info=True, epochs_run=20, compile_s=2.5, train_s=4.25,
                                                steps_per_s=8800, epoch_mode="scan", final_test_accuracy=0.9891),
                    wall_s=12.0)
            + _rows("mnist_cnn_bfloat16", ours)
            + _rows("jsrt_unet_vs_peer", exit="timeout"))
    summary = gpu_check.summarize(rows)
    assert "Machine: NVIDIA H200 (gpu, 1 device(s)); jax 0.11.2" in summary
    assert "| 3500 vs 1000: **3.5x** (repeats 3.0, 4.0) | >= 10x |" in summary
    assert "train 1.50 s vs 0.50 s: **3.00x**; with compiling 4.50 s vs 2.50 s: 1.80x; 8 PyTorch runs one " \
           "after another 14.4 s | <= 2x |" in summary
    assert "20 epochs with a test pass each | train **4.25 s**, compile 2.50 s, whole command 12.0 s; final " \
           "test accuracy 0.9891 | <= 5 s" in summary
    assert "| mnist cnn bfloat16 | 3000.0 steps/s (scan epochs)" in summary
    assert "- jsrt_unet_vs_peer failed (exit timeout)" in summary


def test_history_row_reads_a_run_folder(tmp_path):
    out = cli("run", "mnist_fnn", "--epochs", "1", "--batch-size", "256", "--workdir", str(tmp_path / "run"),
              "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (row,) = gpu_check.history_row(tmp_path / "run")
    history = json.loads((tmp_path / "run/history.json").read_text())
    assert row["epochs_run"] == 1 and row["train_s"] == history["info"]["train_s"] > 0
    assert row["final_test_accuracy"] == pytest.approx(history["history"]["test_accuracy"][-1][0]) 
    assert 0.3 < row["final_test_accuracy"] <= 1  # above chance after one epoch on the 5,000-digit sample
    assert gpu_check.history_row(tmp_path / "missing") == []


def test_conv_ab_swaps_the_conv_path_for_one_variant_only():
    """tools/gpu_conv_ab.py's variants train with the path they name and leave flaxlab's own in place."""
    from flaxlab import models
    original = models._conv
    (index,) = [i for i, v in enumerate(gpu_conv_ab.VARIANTS) if v[:3] == ("mnist_cnn", 1, "matmul")]
    row = gpu_conv_ab.run(index, None, epochs=1)  # the shipped 5,000-digit sample
    assert "error" not in row, row
    assert row["conv"] == "matmul" and row["steps_per_s"] > 0 and row["test_accuracy"] > 0.3
    assert models._conv is original
    assert {path for _, _, path, _ in gpu_conv_ab.VARIANTS} <= set(gpu_conv_ab.PATHS)


def test_only_refuses_an_unknown_step_before_anything_runs(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(tmp_path / "out"),
                          "--only", "mnist_cnn_vs_peer,no_such_step"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown step(s) no_such_step" in out.stderr
    assert not (tmp_path / "out").exists()
