"""The TFDS path, on a tiny MNIST that TFDS's own `mnist` builder prepares offline from local IDX files.

No TensorFlow and no network: the real `tfds.image_classification.mnist.MNIST` builder runs its
`download_and_prepare` (split generators, example writer, shuffler, array_record shards,
dataset_info.json / features.json), with three seams patched, as TFDS's own builder tests do:
  * `DownloadManager.download_and_extract` returns our local, already-gunzipped IDX files;
  * mnist's `_extract_mnist_images/_labels` read them with numpy and hand over PNG bytes (the
    originals read through `tf.io.gfile` and yield arrays that only TensorFlow can PNG-encode);
  * mnist's hard-coded 60000/10000 example counts are set to our 64/16.
Reading back goes through the unpatched `tfds.data_source` (array_record + PIL decoding).
"""
import importlib.resources
import io
import shutil
import socket
import sys
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
Image = pytest.importorskip("PIL.Image")

from flaxlab import data  # noqa: E402
from flaxlab.errors import DataError  # noqa: E402

N_TRAIN, N_TEST = 64, 16


def _no_network(*args, **kwargs):
    raise OSError("network access attempted in an offline test")


def _png(image):
    buf = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A TFDS data_dir holding mnist/3.0.1 with N_TRAIN/N_TEST real digits from the shipped sample."""
    from tensorflow_datasets.image_classification import mnist

    root = tmp_path_factory.mktemp("tfds")
    raw, data_dir = root / "extracted", root / "tfds"
    raw.mkdir()
    expected, extracted = {}, {}
    for split, prefix, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
        for kind, key in (("images-idx3", "data"), ("labels-idx1", "labels")):
            src = data.SAMPLE_DIR / f"{prefix}-{kind}-ubyte.gz"
            arr = data.read_idx(src)[:n]
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            dst = raw / src.name[:-3]  # what TFDS's extractor would leave: the gunzipped IDX file
            dst.write_bytes(header + arr.tobytes())
            extracted[f"{split}_{key}"] = str(dst)
            expected[split, key] = arr

    def download_and_extract(self, url_or_urls):
        assert set(url_or_urls) == set(extracted), url_or_urls
        return {k: extracted[k] for k in url_or_urls}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        try:  # tfds 4.9.10 imports `importlib_resources` while building, but only requires it on Python < 3.9
            import importlib_resources  # noqa: F401
        except ImportError:
            mp.setitem(sys.modules, "importlib_resources", importlib.resources)
        mp.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
        mp.setattr(mnist, "_TRAIN_EXAMPLES", N_TRAIN)
        mp.setattr(mnist, "_TEST_EXAMPLES", N_TEST)
        mp.setattr(mnist, "_extract_mnist_images", lambda path, n: [_png(x) for x in data.read_idx(path)[:n, ..., None]])
        mp.setattr(mnist, "_extract_mnist_labels", lambda path, n: data.read_idx(path)[:n].astype(np.int64))
        builder = tfds.builder("mnist", data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    shutil.rmtree(data_dir / "downloads", ignore_errors=True)
    return data_dir, expected


def test_tiny_tfds_has_the_real_layout(tiny_tfds):
    data_dir, _ = tiny_tfds
    version_dir = data_dir / "mnist" / "3.0.1"
    names = sorted(p.name for p in version_dir.iterdir())
    assert "dataset_info.json" in names and "features.json" in names
    assert any(n.startswith("mnist-train.array_record") for n in names)
    assert any(n.startswith("mnist-test.array_record") for n in names)


def test_load_mnist_from_tfds(tiny_tfds, monkeypatch):
    data_dir, expected = tiny_tfds
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    assert data.tfds_prepared("mnist", data_dir)
    ds = data.load_mnist(source="tfds", tfds_dir=data_dir)
    assert ds.source.startswith("tfds")
    assert ds.num_classes == 10
    for split, n in ((ds.train, N_TRAIN), (ds.test, N_TEST)):
        assert split.images.shape == (n, 28, 28, 1) and split.images.dtype == np.uint8
        assert split.labels.shape == (n,) and split.labels.dtype == np.int32
        assert 0 <= split.labels.min() and split.labels.max() <= 9
    # TFDS shuffles examples when writing: compare as multisets of (image, label), which must match exactly.
    for name, split in (("train", ds.train), ("test", ds.test)):
        got = sorted((int(l), im.tobytes()) for im, l in zip(split.images, split.labels))
        want = sorted((int(l), im.tobytes()) for im, l in zip(expected[name, "data"], expected[name, "labels"]))
        assert got == want


def test_auto_prefers_prepared_tfds(tiny_tfds, monkeypatch):
    data_dir, _ = tiny_tfds
    monkeypatch.delenv("FLAXLAB_DATA_DIR", raising=False)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    ds = data.load_mnist(source="auto", tfds_dir=data_dir)
    assert ds.source == "tfds:mnist" and len(ds.train) == N_TRAIN


def test_tfds_prepared_needs_a_complete_build(tmp_path):
    assert not data.tfds_prepared("mnist", tmp_path)
    (tmp_path / "mnist" / "incomplete.AB12CD_3.0.1").mkdir(parents=True)  # what a failed download leaves
    (tmp_path / "mnist" / "incomplete.AB12CD_3.0.1" / "dataset_info.json").write_text("{}")
    (tmp_path / "mnist" / "3.0.1").mkdir()
    assert not data.tfds_prepared("mnist", tmp_path)
    (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
    assert data.tfds_prepared("mnist", tmp_path)


@pytest.mark.parametrize("error", [ConnectionError(), OSError("Network is unreachable\nmore detail"),
                                   ConnectionError("Failed to establish a new connection: [Errno -3]")])
def test_load_tfds_offline_raises_one_line_data_error(tmp_path, monkeypatch, error):
    """Errors from TFDS itself (online, or offline where the mirror's name resolves) become one line."""
    monkeypatch.setattr(data, "offline", lambda: False)
    calls = []

    def offline_data_source(name, **kwargs):
        calls.append((name, kwargs))
        raise error

    monkeypatch.setattr(tfds, "data_source", offline_data_source)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        data.load_tfds("mnist", tmp_path, download=True)
    assert time.perf_counter() - start < 2
    assert calls and calls[0][0] == "mnist" and calls[0][1]["download"] is True
    assert calls[0][1]["data_dir"] == str(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "TFDS could not provide 'mnist'" in message and type(error).__name__ in message
    assert "--data-dir" in message and "--data.source=sample" in message
    assert not data.tfds_prepared("mnist", tmp_path)


def test_offline_fails_at_once_not_after_tfds_retries(tmp_path, monkeypatch):
    """Offline, TFDS retried its download for 3.5 minutes before failing; a name that does not resolve now
    fails at once. (A set prepared on disk loads without the check: test_load_mnist_from_tfds.)"""
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)

    def no_name(host, port):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_name)
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: pytest.fail("TFDS was asked to download"))
    assert data.offline()
    start = time.perf_counter()
    with pytest.raises(DataError, match="TFDS would download 'mnist', but this machine is offline.*--data-dir"):
        data.load_tfds("mnist", tmp_path, download=True)
    assert time.perf_counter() - start < 2
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # names resolve behind the proxy: let TFDS try
    assert not data.offline()


def test_cifar10_through_tfds_data_source(monkeypatch):
    monkeypatch.setattr(data, "offline", lambda: False)
    rng = np.random.default_rng(0)
    splits = {"train": (rng.integers(0, 256, (40, 32, 32, 3), np.uint8), np.arange(40) % 10),
              "test": (rng.integers(0, 256, (20, 32, 32, 3), np.uint8), np.arange(20) % 10)}

    def data_source(name, split, **kwargs):
        assert name == "cifar10"
        return [[{"image": x, "label": y} for x, y in zip(*splits[s])] for s in split]

    monkeypatch.setattr(tfds, "data_source", data_source)
    ds = data.load("cifar10", source="tfds", size=(16, 16), val_fraction=0.25)
    assert ds.source.startswith("tfds:cifar10") and ds.test.images.shape == (20, 16, 16, 3)
    assert (len(ds.train), len(ds.val)) == (30, 10) and np.bincount(ds.val.labels).tolist() == [1] * 10

    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: _no_network())
    with pytest.raises(DataError, match="TFDS could not provide 'cifar10'.*cifar-10-python.tar.gz"):
        data.load("cifar10", source="tfds")
