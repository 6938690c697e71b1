import gzip
import re
import struct

import numpy as np
import pytest

from flaxlab import data
from flaxlab.errors import DataError


def write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist_dir(tmp_path, n_train=20, n_test=10, gz=False, spelling="-idx"):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        suffix = ".gz" if gz else ""
        dot = spelling
        write_idx(tmp_path / f"{prefix}-images{dot}3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(tmp_path / f"{prefix}-labels{dot}1-ubyte{suffix}", np.arange(n) % 10, gz)
    return tmp_path


def test_sample_ships_balanced_real_digits(mnist_sample):
    assert mnist_sample.source.startswith("sample")
    assert mnist_sample.train.images.shape == (5000, 28, 28, 1) and mnist_sample.train.images.dtype == np.uint8
    assert mnist_sample.test.images.shape == (1000, 28, 28, 1)
    assert np.bincount(mnist_sample.train.labels).tolist() == [500] * 10
    # real digits: mostly black background with bright strokes, not noise
    assert 20 < mnist_sample.train.images.mean() < 50


@pytest.mark.parametrize("gz,spelling", [(False, "-idx"), (True, "-idx"), (False, ".idx")])
def test_idx_files_in_official_spellings(tmp_path, gz, spelling):
    ds = data.load_mnist(source="files", data_dir=fake_mnist_dir(tmp_path, gz=gz, spelling=spelling))
    assert ds.source == f"files:{tmp_path.resolve()}"
    assert ds.describe()["train_examples"] == 20 and ds.describe()["test_examples"] == 10
    assert ds.train.labels.dtype == np.int32 and ds.train.labels.tolist() == [i % 10 for i in range(20)]


def test_auto_prefers_data_dir_then_sample(tmp_path, monkeypatch):
    monkeypatch.delenv("FLAXLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no-tfds"))
    assert data.load_mnist(data_dir=fake_mnist_dir(tmp_path)).source.startswith("files:")
    assert data.load_mnist().source.startswith("sample:")


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no MNIST IDX files"):
        data.load_mnist(source="files", data_dir=tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        data.load_mnist(source="files", data_dir=tmp_path / "missing")
    fake_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()  # one file missing is named, not taken for none there
    with pytest.raises(DataError, match=f"{tmp_path} lacks MNIST's t10k-labels-idx1-ubyte \\(or .gz\\)"):
        data.load_mnist(source="files", data_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x0a\x01\x02")  # truncated
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.load_mnist(source="files", data_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataError, match="bad magic"):
        data.load_mnist(source="files", data_dir=tmp_path)
    packed = bytearray(gzip.compress(bytes(range(256)) * 64, mtime=0))
    packed[40:100] = bytes(b ^ 0xFF for b in packed[40:100])  # damaged inside the deflate stream: zlib's error
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(packed))
    with pytest.raises(DataError, match="cannot read .*t10k-labels-idx1-ubyte.gz"):
        data.load_mnist(source="files", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown data source"):
        data.load_mnist(source="kaggle")


def test_idx_files_are_read_by_content_not_name(tmp_path):
    """A gzipped file without .gz (or a plain one with it) reads as what it holds; float pixels are named."""
    fake_mnist_dir(tmp_path, gz=True)
    expected = data.load_mnist(source="files", data_dir=tmp_path).train
    for f in tmp_path.glob("train-*.gz"):
        f.rename(f.with_suffix(""))
    again = data.load_mnist(source="files", data_dir=tmp_path).train
    np.testing.assert_array_equal(again.images, expected.images)
    np.testing.assert_array_equal(again.labels, expected.labels)
    header = struct.pack(">BBBB", 0, 0, 0x0D, 3) + struct.pack(">III", 10, 28, 28)  # 0x0D: big-endian float32
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(header + np.zeros((10, 28, 28), ">f4").tobytes())
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz holds float32 values; MNIST's IDX files hold"):
        data.load_mnist(source="files", data_dir=tmp_path)


def test_full_mnist_from_shared_data(mnist_full):
    assert len(mnist_full.train) == 60000 and len(mnist_full.test) == 10000
    assert np.bincount(mnist_full.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_to_device_keeps_whole_split(mnist_sample):
    import jax
    on_device = data.to_device(mnist_sample.test)
    assert isinstance(on_device["image"], jax.Array) and on_device["image"].shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.asarray(on_device["label"]), mnist_sample.test.labels)


def test_resized_mnist_keeps_one_channel_and_the_digits(mnist_sample):
    """--data.size on grey images (PIL takes them as (H, W), not (H, W, 1))."""
    resized = data.load_mnist(source="sample", size=(32, 32))
    assert resized.train.images.shape == (5000, 32, 32, 1) and resized.train.images.dtype == np.uint8
    # one side for both, as CIFAR-10's and GTSRB's loaders take it (a TypeError here)
    np.testing.assert_array_equal(data.load("mnist", source="sample", size=32).test.images, resized.test.images)
    from PIL import Image
    digit = mnist_sample.test.images[7, ..., 0]
    expected = np.asarray(Image.fromarray(digit).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(resized.test.images[7, ..., 0], expected)
    assert abs(resized.train.images.mean() - mnist_sample.train.images.mean()) < 3


def test_a_data_folder_from_the_environment_is_named_as_such(monkeypatch, tmp_path):
    """$FLAXLAB_DATA_DIR is --data-dir's default; a message about it said '--data-dir', which was not given."""
    monkeypatch.setenv("FLAXLAB_DATA_DIR", "/no/such/folder")
    with pytest.raises(DataError, match="^FLAXLAB_DATA_DIR=/no/such/folder is not a folder"):
        data.load("mnist", source="files")
    with pytest.raises(DataError, match="^FLAXLAB_DATA_DIR=/no/such/folder not found"):
        data.load("glas", source="files")
    with pytest.raises(DataError, match="^--data-dir /other/folder not found"):
        data.load("cifar10", source="files", data_dir="/other/folder")
    monkeypatch.setenv("FLAXLAB_CACHE", str(tmp_path))  # decoded data sets and weights, one variable
    assert data.cache_dir() == tmp_path


def test_arrays_of_ones_own_are_checked_as_the_loaders_are(mnist_sample):
    """`run_experiment(config, dataset=Dataset(...))` with float pixels trained to chance without a word (the train
    step scaled them by 1/255 again); labels beyond num_classes ended in a traceback in the confusion matrix."""
    train, test = mnist_sample.train, mnist_sample.test
    for images, labels, message in (
            (train.images[..., 0], train.labels, "these are (5000, 28, 28): add a channel axis, images[..., None]"),
            (train.images / 255.0, train.labels, "images must be uint8 pixels, 0 to 255"),
            (train.images, train.labels.astype(np.float32), "labels must be integer class indices; these are float32"),
            (train.images, train.labels[:10], "5000 images but 10 labels"),
            (train.images, np.eye(10, dtype=np.int32)[train.labels], "these are (5000, 10) (one-hot? labels.argmax(-1))"),
            (train.images.transpose(0, 3, 1, 2), train.labels, "these look channels-first, (5000, 1, 28, 28)")):
        with pytest.raises(DataError, match=re.escape(message)):
            data.Split(images, labels)
    with pytest.raises(DataError, match="mine: train labels run from 0 to 9, outside 0 to 4"):
        data.Dataset("mine", "arrays", train, test, num_classes=5)
    with pytest.raises(DataError, match=r"test images are \(14, 14, 1\), train images \(28, 28, 1\)"):
        data.Dataset("mine", "arrays", train, data.Split(test.images[:, ::2, ::2], test.labels), num_classes=10)
    with pytest.raises(DataError, match="2 class names for 10 classes"):
        data.Dataset("mine", "arrays", train, test, num_classes=10, class_names=("a", "b"))
    assert data.Dataset("mine", "arrays", train, test, num_classes=10).train is train
