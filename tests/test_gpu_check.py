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
            + _rows("mnist_cnn_20_epochs_8_seeds", dict(history_info=True, epochs_run=20, compile_s=4.0, train_s=7.65,
                                                        steps_per_s=4900, epoch_mode="scan", seeds=8,
                                                        final_test_accuracy=0.9888), wall_s=21.0)
            + _rows("mnist_cnn_profile_1_and_8", dict(experiment="mnist_cnn", seeds=8, us_per_step=203.4,
                                                      lines={"Stream #20(Compute)": [41.0, 150.2]},
                                                      ops=[["Stream #20(Compute)", "loop_fusion_3", 1.0, 30.5]]))
            + _rows("conv_ab_kernel_grad_chunks", dict(variant=11, experiment="mnist_cnn", seeds=8, conv="auto",
                                                       kernel_grad_rows=256, steps_per_s=6100.0, compile_s=7.1,
                                                       test_accuracy=0.98),
                    dict(variant=12, experiment="mnist_cnn", seeds=8, conv="auto", kernel_grad_rows=1024,
                         error="XlaRuntimeError: out of memory"))
            + _rows("mnist_cnn_cublas_1_seed", dict(ours, train_s=0.2, steps_per_s=9000.0))
            + _rows("mnist_cnn_cublas_8_seeds", dict(ours, train_s=0.35, steps_per_s=5400.0))
            + _rows("mnist_cnn_bfloat16", ours)
            + _rows("jsrt_unet_vs_peer", exit="timeout"))
    summary = gpu_check.summarize(rows)
    assert "Machine: NVIDIA H200 (gpu, 1 device(s)); jax 0.11.2" in summary
    assert "| 3500 vs 1000: **3.5x** (repeats 3.0, 4.0) | >= 10x |" in summary
    assert "train 1.50 s vs 0.50 s: **3.00x**; with compiling 4.50 s vs 2.50 s: 1.80x; 8 PyTorch runs one " \
           "after another 14.4 s | <= 2x |" in summary
    assert "20 epochs with a test pass each | train **4.25 s**, compile 2.50 s, whole command 12.0 s; final " \
           "test accuracy 0.9891 | <= 5 s" in summary
    assert "| mnist_cnn, 8 vmapped seeds vs 1, 20 epochs, a whole `run` each | train 7.65 s vs 4.25 s: **1.80x**; " \
           "whole command 21.0 s vs 12.0 s: **1.75x**; final test accuracy 0.9888 (mean) | <= 2x |" in summary
    assert "| profile: mnist_cnn, 8 model(s) | 203.4 µs a step; device Stream #20(Compute) 41.0 ops 150.2 µs; " \
           "busiest (µs a step): `loop_fusion_3` 30.5 | - |" in summary
    assert "| conv A/B 11: mnist_cnn, 8 model(s), conv auto, kernel-gradient rows 256 | 6100.0 steps/s, compile " \
           "7.1 s, test accuracy 0.98 | - |" in summary
    assert "| conv A/B 12: mnist_cnn, 8 model(s), conv auto, kernel-gradient rows 1024 | failed: " \
           "XlaRuntimeError" in summary
    assert "| mnist_cnn, 8 seeds vs 1 with XLA's dots on cuBLAS (Triton GEMMs off), one epoch | train 0.35 s vs " \
           "0.20 s: **1.75x**; 9000.0 and 5400.0 steps/s | <= 2x |" in summary
    assert "| mnist cnn bfloat16 | 3000.0 steps/s (scan epochs)" in summary
    assert "- jsrt_unet_vs_peer failed (exit timeout)" in summary


def test_cublas_steps_add_their_xla_flag_to_those_already_set():
    env = {"PATH": "/bin", "XLA_FLAGS": "--xla_gpu_deterministic_ops=true"}
    assert gpu_check.step_env("mnist_cnn_cublas_8_seeds", env)["XLA_FLAGS"] == \
        "--xla_gpu_deterministic_ops=true --xla_gpu_enable_triton_gemm=false"
    assert gpu_check.step_env("mnist_cnn_cublas_1_seed", {})["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"
    assert gpu_check.step_env("mnist_cnn_vs_peer", env) is env
    names = [name for name, _, _ in gpu_check.steps(quick=False, out="/tmp/out")]
    assert set(gpu_check.STEP_XLA_FLAGS) <= set(names)


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
    assert {path for _, _, path, _, _ in gpu_conv_ab.VARIANTS} <= set(gpu_conv_ab.PATHS)
    (chunked,) = [i for i, v in enumerate(gpu_conv_ab.VARIANTS) if v[:2] == ("mnist_cnn", 1) and v[3]]
    row = gpu_conv_ab.run(chunked, None, epochs=1)
    assert "error" not in row and row["kernel_grad_rows"] == 1024, row
    assert models.GPU_KERNEL_GRAD_ROWS is None


def test_profile_sums_each_device_op_of_a_traced_epoch(tmp_path):
    """tools/gpu_profile.py on this CPU (XLA:CPU thunks) and on a GPU trace's shape (kernels on streams)."""
    import gpu_profile
    row, hlo = gpu_profile.profile("mnist_cnn", 1, None)  # the shipped sample: 156 steps an epoch
    assert row["steps"] == 156 and row["us_per_step"] > 0 and "HloModule" in hlo
    assert row["lines"] and all(line.startswith("tf_XLA") for line in row["lines"])  # XLA:CPU's threads, ids dropped
    assert sum(us for _, us in row["lines"].values()) > 0
    assert len(row["ops"]) > 3 and all(calls > 0 and us >= 0 for _, _, calls, us in row["ops"])
    assert "| line | op | calls a step | µs a step |" in gpu_profile.markdown([row])
    trace = {"traceEvents": [
        dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
        dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU")),
        dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #20(Compute)")),
        dict(ph="X", pid=1, tid=7, name="loop_fusion", ts=0, dur=3.0),
        dict(ph="X", pid=1, tid=7, name="loop_fusion", ts=5, dur=2.0),
        dict(ph="X", pid=1, tid=7, name="gemm", ts=9, dur=4.0),
        dict(ph="X", pid=2, tid=3, name="PjitFunction", ts=0, dur=50.0)]}
    assert gpu_profile.device_ops(trace) == {("Stream #20(Compute)", "loop_fusion"): [2, 5.0],
                                             ("Stream #20(Compute)", "gemm"): [1, 4.0]}


def test_only_refuses_an_unknown_step_before_anything_runs(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(tmp_path / "out"),
                          "--only", "mnist_cnn_vs_peer,no_such_step"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown step(s) no_such_step" in out.stderr
    assert not (tmp_path / "out").exists()
