"""TensorBoard events written without TensorFlow: CRC-32C against the standard's check values, records and events
read back by TensorBoard's own reader (CI installs tensorboard; without it those tests skip), a run's and a
sweep's curves per model, and a resumed run's."""
import struct

import numpy as np
import pytest

from conftest import small_dataset
from experiments import EXPERIMENTS
from experiments.common import variant
from flaxlab import sweep, tensorboard
from flaxlab.runner import run_experiment


def quiet(*_):
    pass


def read_records(path):
    """The records of a TFRecord file, each CRC checked."""
    data, out = path.read_bytes(), []
    while data:
        length = data[:8]
        (size,) = struct.unpack("<Q", length)
        assert struct.unpack("<I", data[8:12])[0] == tensorboard._masked(tensorboard.crc32c(length))
        body = data[12:12 + size]
        assert struct.unpack("<I", data[12 + size:16 + size])[0] == tensorboard._masked(tensorboard.crc32c(body))
        out.append(body)
        data = data[16 + size:]
    return out


def scalars(folder):
    """{tag: [(step, value)]} of a TensorBoard run folder, as TensorBoard reads it."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed (CI installs it: pip install tensorboard)").EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_crc32c_gives_the_standards_check_values():
    """RFC 3720, B.4 (iSCSI's CRC-32C, TFRecord's), and the common '123456789' check value."""
    assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA
    assert tensorboard.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tensorboard.crc32c(bytes(range(32))) == 0x46DD794E
    assert tensorboard.crc32c(b"123456789") == 0xE3069283


def test_events_read_back_by_tensorboard(tmp_path):
    events = tensorboard.EventsFile(tmp_path / "run")
    for step in (1, 2, 300):
        events.scalars(step, {"loss/train": 1 / step, "accuracy/test": 0.5 + step / 1000})
    assert len(read_records(events.path)) == 5  # the file version, a SessionLog START, then one event per step
    assert read_records(events.path)[0].endswith(b"brain.Event:2")
    read = scalars(tmp_path / "run")
    assert [s for s, _ in read["loss/train"]] == [1, 2, 300]
    np.testing.assert_allclose([v for _, v in read["loss/train"]], [1, 0.5, 1 / 300], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in read["accuracy/test"]], [0.501, 0.502, 0.8], rtol=1e-6)


def test_a_resumed_runs_redone_epochs_replace_the_interrupted_ones(tmp_path):
    """A run stopped after epoch 3, resumed from epoch 2's checkpoint, logs epoch 3 again: TensorBoard drew both
    (steps 1, 2, 3, 3, 4; a sweep, which redoes its program, every step twice) until the new file said where the
    session starts."""
    interrupted = tensorboard.EventsFile(tmp_path / "run")
    for step in (1, 2, 3):
        interrupted.scalars(step, {"loss/train": float(step)})
    resumed = tensorboard.EventsFile(tmp_path / "run", first_step=3)
    for step in (3, 4):
        resumed.scalars(step, {"loss/train": 10.0 * step})
    assert scalars(tmp_path / "run")["loss/train"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    multiplexer = pytest.importorskip("tensorboard.backend.event_processing.plugin_event_multiplexer")
    web = multiplexer.EventMultiplexer({"run": str(tmp_path / "run")})  # what the web app reads
    web.Reload()
    assert [(e.step, e.tensor_proto.float_val[0]) for e in web.Tensors("run", "loss/train")] == \
        [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_run_writes_each_seeds_curves_and_a_resumed_run_goes_on(mnist_sample, tmp_path):
    config = variant(EXPERIMENTS["mnist_cnn"](), "tb", "", **{"model.features": (4, 8), "epochs": 3, "seeds": 2,
                                                            "seed": 5, "checkpoint_every": 1})
    data = small_dataset(mnist_sample, 256, 64)
    result = run_experiment(config, workdir=tmp_path, dataset=data, progress=False, log=quiet)
    runs = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert runs == ["seed_5", "seed_6"]
    for seed, run in enumerate(runs):
        read = scalars(tmp_path / "tensorboard" / run)
        assert set(read) == {"loss/train", "accuracy/train", "loss/test", "accuracy/test", "time/epoch_s"}
        assert [s for s, _ in read["accuracy/test"]] == [1, 2, 3]
        np.testing.assert_allclose([v for _, v in read["accuracy/test"]],
                                   [a[seed] for a in result.history["test_accuracy"]], rtol=1e-6)
    # --epochs 5 --resume goes on: a second events file beside the first, epochs 4 and 5
    resumed = run_experiment({**config, "epochs": 5}, workdir=tmp_path, dataset=data, progress=False, log=quiet,
                             resume=True)
    assert len(list((tmp_path / "tensorboard" / "seed_6").iterdir())) == 2
    read = scalars(tmp_path / "tensorboard" / "seed_6")
    assert [s for s, _ in read["loss/train"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([v for _, v in read["loss/train"]], [a[1] for a in resumed.history["train_loss"]],
                               rtol=1e-6)
    # a fresh run in the folder starts TensorBoard's runs afresh too
    run_experiment({**config, "seeds": 1}, workdir=tmp_path, dataset=data, progress=False, log=quiet)
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == ["seed_5"]
    assert [s for s, _ in scalars(tmp_path / "tensorboard" / "seed_5")["loss/train"]] == [1, 2, 3]


def test_a_sweep_writes_a_run_per_variant_and_seed(mnist_sample, tmp_path):
    config = variant(EXPERIMENTS["mnist_cnn"](), "tb", "", **{"model.features": (4, 8), "epochs": 2, "seeds": 2})
    result = sweep.run_sweep(config, sweep.parse_grid(config, ["model.features=4/4,8", "lr=0.1,0.05"]),
                             workdir=tmp_path, dataset=small_dataset(mnist_sample, 256, 64), progress=False, log=quiet)
    folders = sorted(str(p.relative_to(tmp_path / "tensorboard")) for p in (tmp_path / "tensorboard").glob("*/*"))
    assert folders == sorted(f"features={f},lr={lr}/seed_{s}" for f in ("4", "4-8") for lr in ("0.1", "0.05")
                             for s in (0, 1))
    read = scalars(tmp_path / "tensorboard" / "features=4-8,lr=0.05" / "seed_1")
    np.testing.assert_allclose([v for _, v in read["accuracy/test"]],
                               [a[1] for a in result.histories["features=4-8, lr=0.05"]["test_accuracy"]], rtol=1e-6)
