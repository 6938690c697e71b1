"""TensorBoard scalars without TensorFlow: a run's curves, live while it trains (`tensorboard --logdir runs`).

An events file is a TFRecord file of `Event` protocol buffers (tensorflow/core/util/event.proto): each record is
its length, a masked CRC-32C of the length, the bytes, and their masked CRC-32C. The few fields written here are
encoded by hand: wall_time (1, double), step (2, varint), file_version (3, string), summary (5), whose values
(1) each hold a tag (1, string) and a simple_value (2, float), or session_log (7) with its status (1, START = 1).
"""
import socket
import struct
import time
from pathlib import Path

from flaxlab import metrics, parallel

FOLDER = "tensorboard"  # in a run folder: one subfolder (a TensorBoard run) per model


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc):
    """TFRecord's masking of a CRC stored beside the data it covers."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data):
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(crc32c(length))) + data + struct.pack("<I", _masked(crc32c(data)))


def _varint(value):
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number, payload):
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time, step=0, file_version=None, scalars=None, start=False):
    """An Event's bytes: a file_version, a SessionLog START, or a Summary of scalars {tag: value}."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        return out + _field(3, file_version.encode())
    if start:
        return out + _field(7, _varint(1 << 3) + _varint(1))
    values = b"".join(_field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
                      for tag, value in scalars.items())
    return out + _field(5, values)


class EventsFile:
    """Appends scalar summaries to a new events file in `folder`; each write is flushed to disk, so TensorBoard
    shows a run's epochs as they end. A resumed run writes a second file beside the first, which opens with a
    SessionLog START at `first_step`: TensorBoard then drops the earlier files' steps from there on (the epochs
    run after the checkpoint, redone), as it does for TensorFlow's restarted runs; without it, both were drawn."""

    def __init__(self, folder, first_step=1):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.time()
        self.path = folder / f"events.out.tfevents.{stamp:.0f}.{socket.gethostname()}.flaxlab"
        self._append(event(stamp, file_version="brain.Event:2"))
        self._append(event(stamp, first_step, start=True))

    def _append(self, data):
        with open(self.path, "ab") as f:
            f.write(record(data))

    def scalars(self, step, values):
        self._append(event(time.time(), step, scalars=values))


def run_names(first_seed, seeds, labels=None):
    """The TensorBoard run of each model, in the stacked models' order: seed_N, or a sweep's VARIANT/seed_N."""
    names = [f"seed_{first_seed + i}" for i in range(seeds)]
    return names if labels is None else [f"{label.replace(', ', ',').replace('/', '-')}/{name}"
                                         for label in labels for name in names]


class Board:
    """One TensorBoard run per model (`names`, e.g. 'seed_0', or a sweep's 'lr=0.1/seed_0'), under
    `workdir`/tensorboard: every epoch's scores per split, as 'loss/train', 'accuracy/test', ...; TensorBoard
    draws a metric's runs (seeds, variants) in one chart."""

    def __init__(self, workdir, names, first_epoch=1):
        # process 0's only: a multi-host run's other processes would write the same curves again
        self.files = ([EventsFile(Path(workdir) / FOLDER / name, first_epoch) for name in names]
                      if parallel.is_primary() else [])

    def log_epoch(self, history):
        """The last epoch of a history (one value per model in each series)."""
        tags = {key: "{1}/{0}".format(*key.split("_", 1)) for key in metrics.history_keys(history)}  # loss/train
        for model, events in enumerate(self.files):
            values = {tag: history[key][-1][model] for key, tag in tags.items()}
            events.scalars(history["epoch"][-1], {**values, "time/epoch_s": history["epoch_time_s"][-1]})
