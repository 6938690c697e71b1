"""Input pipeline: each dataset from TFDS, from its files, or from the sample the package ships.

Datasets are small enough to live whole on the accelerator, so loading returns numpy arrays
once and `to_device` puts each split there; shuffling and batching then happen on device
inside the jitted train step (see `flaxlab.train`).
"""
import dataclasses
import gzip
import hashlib
import importlib
import os
import socket
import threading
import zlib
from pathlib import Path

import numpy as np

from flaxlab.errors import DataError

SAMPLE_DIR = Path(__file__).parent / "assets" / "mnist-sample"
SOURCES = ("auto", "files", "tfds", "sample")
DATA_DIR_VARIABLE = "FLAXLAB_DATA_DIR"  # --data-dir's default
HOW_TO_GET_MNIST = (
    "download the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from http://yann.lecun.com/exdb/mnist/ "
    "and pass their folder with --data-dir, or use --data.source=sample for the shipped sample")


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, NHWC
    labels: np.ndarray  # int32
    names: tuple = None  # each example's file name, where a data set has them (segmentation): figures name it

    def __len__(self):
        return len(self.labels)

    def __post_init__(self):
        """Arrays of one's own (`run_experiment(config, dataset=...)`) checked as the loaders' are: float
        pixels were scaled by 1/255 a second time, and trained to chance without a word."""
        shape, dtype = getattr(self.images, "shape", ()), getattr(self.images, "dtype", None)
        if len(shape) != 4:
            raise DataError(f"images must be (examples, height, width, channels); these are {tuple(shape)}"
                            + (": add a channel axis, images[..., None]" if len(shape) == 3 else ""))
        if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):  # (N, 1, 28, 28): "cannot take 1x28 images"
            raise DataError(f"images must be channels-last, (examples, height, width, channels); these look "
                            f"channels-first, {tuple(shape)}: images.transpose(0, 2, 3, 1)")
        if dtype != np.uint8:
            raise DataError(f"images must be uint8 pixels, 0 to 255, as the loaders give them (the train step "
                            f"scales them to [0, 1]); these are {dtype}")
        labels_dtype = getattr(self.labels, "dtype", None)
        if labels_dtype is None or not np.issubdtype(labels_dtype, np.integer):
            raise DataError(f"labels must be integer class indices; these are {labels_dtype or type(self.labels)}")
        if len(self.labels) != shape[0]:
            raise DataError(f"{shape[0]} images but {len(self.labels)} labels")
        if self.labels.ndim != 1 and self.labels.shape[1:] != shape[1:3]:  # one-hot: "... is segmentation"
            raise DataError(f"labels must be class indices, (examples,), or masks of the images' size, (examples, "
                            f"{shape[1]}, {shape[2]}); these are {self.labels.shape}"
                            + (" (one-hot? labels.argmax(-1))" if self.labels.ndim == 2 else ""))
        if self.names is not None and len(self.names) != shape[0]:
            raise DataError(f"{shape[0]} images but {len(self.names)} names")

    def name(self, i):
        """How figures and tables call example i: its index, and its file name when known."""
        return f"{i} ({self.names[i]})" if self.names is not None else str(i)

    def take(self, index):
        return Split(self.images[index], self.labels[index],
                     None if self.names is None else tuple(self.names[i] for i in index))


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    source: str  # where the examples came from, recorded with every run
    train: Split
    test: Split
    num_classes: int
    val: Split = None  # held out of train for early stopping and best-model selection, when asked for
    class_names: tuple = None  # what label i is, for figures and tables; None: the digits 0, 1, ...

    def __post_init__(self):
        for name, split in (("train", self.train), ("test", self.test), ("val", self.val)):
            if not isinstance(split, Split) and not (name == "val" and split is None):
                raise DataError(f"{self.name}: {name} must be a flaxlab.data.Split(images, labels), got "
                                f"{type(split).__name__}")
            if name != "val" and not len(split):  # scored nothing, then failed on a figure's image
                raise DataError(f"{self.name}: the {name} split is empty")
        splits = {"train": self.train, "val": self.val, "test": self.test}
        for name, split in splits.items():
            if split is None or not len(split):
                continue
            if split.images.shape[1:] != self.train.images.shape[1:]:
                raise DataError(f"{self.name}: {name} images are {split.images.shape[1:]}, train images "
                                f"{self.train.images.shape[1:]}")
            low, high = int(split.labels.min()), int(split.labels.max())
            if low < 0 or high >= self.num_classes:
                raise DataError(f"{self.name}: {name} labels run from {low} to {high}, outside 0 to "
                                f"{self.num_classes - 1} (num_classes {self.num_classes})")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def is_segmentation(self):
        return self.train.labels.ndim > 1  # one label per pixel

    def checksum(self):
        """A digest of every split's images and labels: the processes of a multi-host run must train on the same
        examples, wherever each read its files from."""
        digest = hashlib.blake2b(digest_size=16)
        for split in (self.train, self.val, self.test):
            for array in ((split.images, split.labels) if split is not None else ()):
                digest.update(f"{array.shape} {array.dtype}".encode())
                digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

    def describe(self):
        return {"name": self.name, "source": self.source, "train_examples": len(self.train),
                "val_examples": len(self.val) if self.val else 0,
                "test_examples": len(self.test), "image_shape": list(self.train.images.shape[1:]),
                "num_classes": self.num_classes,
                **({"class_names": list(self.class_names)} if self.class_names else {})}


# --- IDX files (the official MNIST format) -----------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Reads an IDX file, gzipped or not, and checks its header against its size."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzipped, whatever the name says (a browser may drop or keep the .gz)
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # zlib's: a damaged .gz (a traceback, exit code 1)
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find_idx(folder, split, kind):
    """Finds e.g. train-images-idx3-ubyte[.gz] or the train-images.idx3-ubyte spelling."""
    prefix = {"train": "train", "test": "t10k"}[split]
    ndim = {"images": 3, "labels": 1}[kind]
    for name in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def data_dir_or_default(data_dir):
    """--data-dir, else $FLAXLAB_DATA_DIR, else None."""
    return data_dir or os.environ.get(DATA_DIR_VARIABLE) or None


def data_dir_option(data_dir):
    """How a message names a data folder: as the --data-dir given, or as the variable it came from."""
    from_variable = os.environ.get(DATA_DIR_VARIABLE)
    return f"{DATA_DIR_VARIABLE}={from_variable}" if from_variable and from_variable == str(data_dir) \
        else f"--data-dir {data_dir}"


def cache_dir():
    """Where decoded data sets and downloaded weights are kept: $FLAXLAB_CACHE (or $FLAXLAB_CACHE_DIR, which
    the data cache once read alone), else ~/.cache/flaxlab."""
    return Path(os.environ.get("FLAXLAB_CACHE") or os.environ.get("FLAXLAB_CACHE_DIR")
                or "~/.cache/flaxlab").expanduser()


def load_mnist_files(data_dir):
    """MNIST from a folder holding the four IDX files (or from its `mnist/` subfolder)."""
    if not Path(data_dir).expanduser().is_dir():
        raise DataError(f"{data_dir_option(data_dir)} is not a folder; {HOW_TO_GET_MNIST}")
    data_dir = Path(data_dir).expanduser()
    partial = None  # a folder with some of the four files: the others are what to name
    for folder in (data_dir, data_dir / "mnist", data_dir / "MNIST" / "raw"):
        paths = {(s, k): _find_idx(folder, s, k) for s in ("train", "test") for k in ("images", "labels")}
        if all(paths.values()):
            break
        if any(paths.values()) and partial is None:
            partial = folder, [f"{'t10k' if s == 'test' else s}-{k}-idx{3 if k == 'images' else 1}-ubyte"
                               for (s, k), path in paths.items() if path is None]
    else:
        if partial:
            raise DataError(f"{partial[0]} lacks MNIST's {', '.join(partial[1])} (or .gz); {HOW_TO_GET_MNIST}")
        raise DataError(f"no MNIST IDX files in {data_dir}; {HOW_TO_GET_MNIST}")
    splits = {}
    for s in ("train", "test"):
        images, labels = read_idx(paths[s, "images"]), read_idx(paths[s, "labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"MNIST {s} files in {folder} disagree: images {images.shape}, labels {labels.shape}")
        for path, array in ((paths[s, "images"], images), (paths[s, "labels"], labels)):
            if array.dtype != np.uint8:
                raise DataError(f"{path} holds {array.dtype.name} values; MNIST's IDX files hold unsigned bytes")
        if labels.max(initial=0) > 9:
            raise DataError(f"MNIST {s} labels in {folder} go beyond 9: corrupt file?")
        splits[s] = Split(np.ascontiguousarray(images[..., None]), labels.astype(np.int32))
    return splits["train"], splits["test"]


# --- TFDS ----------------------------------------------------------------------------------

def _tfds_data_dir(data_dir=None):
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def tfds_prepared(name, data_dir=None):
    """Whether TFDS already holds `name` on disk, so loading it needs no network.

    TFDS writes `<data_dir>/<name>[/<config>]/<version>/dataset_info.json` last, when a build
    is complete; a bare `<name>/` folder (e.g. a failed download's `incomplete.*`) doesn't count.
    """
    root = _tfds_data_dir(data_dir) / name
    return any(not any(part.startswith("incomplete") for part in info.relative_to(root).parts)
               for pattern in ("*/dataset_info.json", "*/*/dataset_info.json") for info in root.glob(pattern))


def offline(host="storage.googleapis.com", timeout_s=5.0):
    """Whether this machine certainly cannot reach the internet (the name of TFDS's mirror does not resolve).

    Offline, TFDS retries each download ten times with backoff: 3.5 minutes before its error. A slow answer
    or a proxy counts as online: only a definite failure is worth refusing early."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    failed = []

    def resolve():
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            failed.append(True)

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(failed)


def load_tfds(name, data_dir=None, download=True, how_to=HOW_TO_GET_MNIST):
    """A dataset through `tfds.data_source` (array_record; unlike `tfds.load`, no TensorFlow needed)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("tensorflow-datasets is not installed; `pip install tensorflow-datasets`, "
                        f"or {how_to}") from None
    if download and not tfds_prepared(name, data_dir) and offline():
        raise DataError(f"TFDS would download '{name}', but this machine is offline (storage.googleapis.com "
                        f"does not resolve); {how_to}")
    try:
        sources = tfds.data_source(name, split=["train", "test"], data_dir=str(_tfds_data_dir(data_dir)),
                                   download=download)
    except Exception as e:  # tfds raises many kinds when offline; all mean the same to a user
        first_line = (str(e).strip().splitlines() or ["no message"])[0][:160]
        raise DataError(f"TFDS could not provide '{name}' ({type(e).__name__}: {first_line}); "
                        f"without internet, {how_to}") from None
    splits = []
    for source in sources:
        records = [source[i] for i in range(len(source))]
        images = np.stack([r["image"] for r in records]).astype(np.uint8)  # NHWC, C = 1 for MNIST
        splits.append(Split(images, np.array([r["label"] for r in records], np.int32)))
    return tuple(splits)


# --- entry points ----------------------------------------------------------------------------

def resolve_source(name, source, data_dir, tfds_dir=None, tfds_name=None):
    """'auto' prefers --data-dir, then a TFDS copy on disk, then the shipped sample."""
    if source not in SOURCES:
        raise DataError(f"unknown data source '{source}'; choose one of {', '.join(SOURCES)}")
    if source == "auto":
        return "files" if data_dir else "tfds" if tfds_name and tfds_prepared(tfds_name, tfds_dir) else "sample"
    if source == "tfds" and not tfds_name:
        raise DataError(f"TFDS has no {name}; use --data.source=files with --data-dir, or the sample")
    return source


def load_mnist(source="auto", data_dir=None, tfds_dir=None, size=(), val_fraction=0.0, test_fraction=0.1):
    """MNIST (its official test split; `test_fraction` is unused: the command line refuses it), resized and with
    a val split on request."""
    from flaxlab.image_data import check_size, make_splits, resize_all
    size = check_size(size) if size else ()  # size=32 from Python: a TypeError, as CIFAR-10's and GTSRB's are not
    data_dir = data_dir_or_default(data_dir)
    source = resolve_source("mnist", source, data_dir, tfds_dir, "mnist")
    if source == "files":
        if not data_dir:
            raise DataError(f"--data.source=files needs --data-dir; {HOW_TO_GET_MNIST}")
        train, test = load_mnist_files(data_dir)
        where = f"files:{Path(data_dir).expanduser().resolve()}"
    elif source == "tfds":
        train, test = load_tfds("mnist", tfds_dir)
        where = "tfds:mnist"
    else:
        train, test = load_mnist_files(SAMPLE_DIR)
        where = "sample:flaxlab/assets/mnist-sample"
    if size:
        train, test = (Split(resize_all(s.images, tuple(size)), s.labels) for s in (train, test))
    train, val, test, note = make_splits(train, test, val_fraction, test_fraction, seed=0)
    return Dataset("mnist", where + note, train, test, num_classes=10, val=val)


def _loaded_on_use(module, name):
    """flaxlab.`module`.`name`, imported on first use (that module imports this one)."""
    def load(**kwargs):
        return getattr(importlib.import_module(f"flaxlab.{module}"), name)(**kwargs)
    return load


DATASETS = {"mnist": load_mnist,
            **{name: _loaded_on_use("image_data", name) for name in ("cifar10", "gtsrb", "images")},
            **{name: _loaded_on_use("seg_data", name) for name in ("glas", "jsrt", "paired")}}


def equalize(images):
    """Histogram equalisation of each image's luminance (colour kept): GTSRB's photos range from
    near-black to washed out, and equalised signs are what its strong baselines train on."""
    out = np.empty_like(images)
    weights = np.array([0.299, 0.587, 0.114], np.float32)[: images.shape[-1]]
    weights /= weights.sum()
    for i, image in enumerate(images):
        luma = np.clip(image.astype(np.float32) @ weights, 0, 255).astype(np.uint8)
        cdf = np.bincount(luma.ravel(), minlength=256).cumsum()
        lo = cdf[cdf > 0][0]
        lut = np.round(255 * (cdf - lo) / max(cdf[-1] - lo, 1)).clip(0, 255)
        gain = lut[luma] / np.maximum(luma, 1)
        out[i] = np.clip(image * gain[..., None], 0, 255).astype(np.uint8)
    return out


def load(name, equalize_histograms=False, **kwargs):
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    if kwargs.get("data_dir") and kwargs.get("source") == "sample":  # the folder would go unread
        raise DataError(f"--data-dir {kwargs['data_dir']} is not read with --data.source sample (the shipped "
                        "sample): give one or the other")
    dataset = DATASETS[name](**kwargs)
    if equalize_histograms:
        splits = {k: getattr(dataset, k) for k in ("train", "val", "test") if getattr(dataset, k) is not None}
        dataset = dataclasses.replace(dataset, **{k: dataclasses.replace(s, images=equalize(s.images))
                                                for k, s in splits.items()})
    return dataset


def to_device(split, sharding=None):
    """Puts a whole split on the device once; batches are gathered from it inside jit."""
    import jax
    return {"image": jax.device_put(split.images, sharding), "label": jax.device_put(split.labels, sharding)}
