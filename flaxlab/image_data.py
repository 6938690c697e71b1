"""Image-classification inputs: CIFAR-10, GTSRB and any folder of class folders, as uint8 NHWC arrays.

Like `flaxlab.data`, everything is read once into numpy and later put whole on the device.
Archives are streamed with `tarfile`/`zipfile` (nothing is extracted to disk), images decoded
with Pillow, and the decoded arrays cached in `~/.cache/flaxlab` (or `$FLAXLAB_CACHE`),
keyed by the source's size and mtime, so only the first load pays for decoding.

Without an official test split, `Dataset.test` is a validation split held out of the training
set; `Dataset.source` says so. GTSRB's validation split is made by track: the ~30 photos of one
physical sign are near-duplicates, and splitting them across train/val would inflate accuracy.
"""
import contextlib
import csv
import dataclasses
import hashlib
import io
import lzma
import os
import pickle
import re
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from flaxlab.data import (Dataset, Split, cache_dir, data_dir_option, data_dir_or_default, load_tfds,
                          resolve_source)
from flaxlab.errors import DataError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".zip")
CACHE_VERSION = 2  # bump when what is cached (or how it is decoded) changes

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# where load_cifar10 looks inside --data-dir, best first: the official pickles (exact pixels, test split)
CIFAR10_CANDIDATES = ("cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar10-train-jpg.tar", "cifar10-jpg.tar",
                      "cifar10.tar", "cifar10.tar.gz", "cifar10.zip", "cifar10", "CIFAR-10-images", "cifar-10")
HOW_TO_GET_CIFAR10 = (
    f"download the python version (cifar-10-python.tar.gz) from {CIFAR10_URL} and pass its folder "
    "(or the extracted cifar-10-batches-py/) with --data-dir; an image folder or tar of "
    "[train|test/]<class>/<image> also works")

GTSRB_NUM_CLASSES = 43
# the signs of GTSRB's ClassId 0..42 (the names of the benchmark's signnames.csv, shortened for figures)
GTSRB_CLASSES = (
    "20 km/h", "30 km/h", "50 km/h", "60 km/h", "70 km/h", "80 km/h", "end of 80 km/h", "100 km/h", "120 km/h",
    "no passing", "no passing >3.5t", "right of way", "priority road", "yield", "stop", "no vehicles",
    "no vehicles >3.5t", "no entry", "general caution", "curve left", "curve right", "double curve",
    "bumpy road", "slippery road", "road narrows right", "road work", "traffic signals", "pedestrians",
    "children", "bicycles", "ice/snow", "wild animals", "end of all limits", "turn right ahead",
    "turn left ahead", "ahead only", "straight or right", "straight or left", "keep right", "keep left",
    "roundabout", "end of no passing", "end no passing >3.5t")
GTSRB_URL = "https://benchmark.ini.rub.de/gtsrb_dataset.html"
GTSRB_CANDIDATES = ("GTSRB_Final_Training_Images.zip", "GTSRB", "gtsrb", "Final_Training", "Images",
                    "gtsrb-train-32px.tar.xz", "gtsrb.tar", "gtsrb.tar.gz", "gtsrb.tar.xz", "gtsrb.zip")
GTSRB_TEST_ARCHIVES = ("GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip")
GTSRB_TEST_CSV = "GT-final_test.csv"
HOW_TO_GET_GTSRB = (
    f"download GTSRB_Final_Training_Images.zip (and for the official test split GTSRB_Final_Test_Images.zip "
    f"plus GTSRB_Final_Test_GT.zip) from {GTSRB_URL} and pass their folder with --data-dir")

_TRACK_NAME = re.compile(r"^(\d+)_(\d+)$")  # GTSRB training files: TTTTT_IIIII.ppm (track, image in track)


# --- reading files from a folder or an archive -------------------------------------------

def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _image_error(e):
    """Why Pillow could not decode a file; for a file that is no image at all it named an io.BytesIO object."""
    if type(e).__name__ == "UnidentifiedImageError":
        return "not an image file that Pillow can read"
    return _first_line(e)


def is_archive(path):
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def _iter_files(path, want):
    """Yields (relative posix path, bytes) of the files under `path` for which `want(relpath)` holds.

    Folders are walked in sorted order; archives are streamed member by member (tar in "r|*"
    mode, so .tar.xz is decompressed once, front to back), reading only the wanted members.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                rel = (Path(root) / name).relative_to(path).as_posix()
                if want(rel):
                    try:
                        yield rel, (Path(root) / name).read_bytes()
                    except OSError as e:
                        raise DataError(f"cannot read {Path(root) / name}: {_first_line(e)}") from None
        return
    if not path.exists():
        raise DataError(f"{path} not found")
    if not is_archive(path):
        raise DataError(f"{path} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    rel = info.filename[2:] if info.filename.startswith("./") else info.filename
                    if not info.is_dir() and want(rel):
                        yield rel, zf.read(info)
        else:
            with tarfile.open(path, "r|*") as tf:
                for member in tf:
                    rel = member.name[2:] if member.name.startswith("./") else member.name
                    if member.isfile() and want(rel):
                        data = tf.extractfile(member).read()
                        if len(data) != member.size:
                            raise EOFError(f"{rel} ends after {len(data)} of its {member.size} bytes")
                        yield rel, data
            if path.name.lower().endswith(".tar") and path.stat().st_size % tarfile.BLOCKSIZE:
                # an uncompressed tar cut between members reads as a shorter archive, not as an error
                raise EOFError(f"its size is not a whole number of {tarfile.BLOCKSIZE}-byte tar blocks")
    except (tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, zlib.error, EOFError, OSError) as e:
        raise DataError(f"cannot read archive {path}: {_first_line(e)} (truncated or corrupt?)") from None


def _where(path, rel):
    """How to name a file in messages: a path inside a folder, archive:member inside an archive."""
    return str(Path(path) / rel) if Path(path).is_dir() else f"{path}:{rel}"


def _is_image(rel):
    name = PurePosixPath(rel).name
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".") and "__MACOSX" not in rel


def natural_key(name):
    """train_2 before train_10, Conv_2 before Conv_10: numbers in names compared as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("Pillow is not installed; `pip install pillow` to read image files") from None
    return Image


HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # Pillow's 16- and 32-bit and float greyscale


def eight_bit(im):
    """A 16-bit, 32-bit or float greyscale PIL image as 8-bit greyscale, scaled by its depth (others as they
    are): Pillow's convert("L") clips such pixels at 255, so a 16-bit X-ray came out black and white, a float
    one black. Integers are scaled by the least of 8, 10, 12, 14 or 16 bits that holds the brightest pixel (a
    12-bit X-ray is stored in 16), floats by 1 where they lie in [0, 1], else by 255."""
    if im.mode not in HIGH_DEPTH_MODES:
        return im
    pixels = np.nan_to_num(np.asarray(im, np.float64))
    top = pixels.max(initial=0)
    if im.mode == "F":
        scale = 1.0 if top <= 1 else 255.0
    else:
        scale = next((2.0 ** bits - 1 for bits in (8, 10, 12, 14, 16) if top < 2 ** bits), 2.0 ** 32 - 1)
    return _pil().fromarray(np.clip(pixels * (255 / scale), 0, 255).round().astype(np.uint8), "L")


def _decode(raw, path, rel, size):
    """One image file's bytes -> uint8 (h, w, 3), resized (bilinear) to `size` when given."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.mode == "RGB":
                im.load()  # decode now, inside the try: a truncated file fails here
            else:
                im = eight_bit(im).convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, np.uint8)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError...: all mean "bad file"
        raise DataError(f"cannot decode image {_where(path, rel)}: {_image_error(e)}") from None


def _stack(arrays, where):
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DataError(f"images in {where} differ in size ({a[0]}x{a[1]} and {b[0]}x{b[1]}): give --data.size "
                        "HEIGHT,WIDTH to resize them all")
    return np.stack(arrays) if arrays else np.zeros((0, 0, 0, 3), np.uint8)


def check_size(size):
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise UsageError(f"image size must be (height, width) with positive integers, got {size}")
    return int(size[0]), int(size[1])


def resize_all(images, size):
    if size is None or images.shape[1:3] == size:
        return images
    Image = _pil()
    out = np.empty((len(images), *size, images.shape[3]), np.uint8)
    for i, image in enumerate(images):  # PIL takes a grey image as (H, W), not (H, W, 1)
        resized = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).resize((size[1], size[0]),
                                                                                            Image.BILINEAR)
        out[i] = np.asarray(resized).reshape(out.shape[1:])
    return out


# --- image folders: [split/]<class>/<image> ----------------------------------------------

def _read_image_tree(path, size):
    """All images of a [prefix/][split/]<class>/<file> tree: {split: (images, class names per image)}."""
    records = []  # (split, class, relpath, array)
    for rel, raw in _iter_files(path, _is_image):
        parts = PurePosixPath(rel).parts
        if len(parts) < 2:
            continue  # an image outside any class folder
        records.append((parts[-3] if len(parts) >= 3 else "", parts[-2], rel, _decode(raw, path, rel, size)))
    if not records:
        raise DataError(f"no images in {path}: expected [train/]<class>/<file> with one of "
                        f"{', '.join(IMAGE_SUFFIXES)}")
    records.sort(key=lambda r: r[:3])  # archives need not be in order; folders and archives must agree
    splits = {}
    for split, cls, _, array in records:
        splits.setdefault(split, ([], []))
        splits[split][0].append(array)
        splits[split][1].append(cls)
    return {s: (_stack(arrays, path), names) for s, (arrays, names) in splits.items()}


def read_image_folder(path, size=None, split=None):
    """Reads a `[split/]<class>/<image>` folder or archive; labels index the sorted class names.

    When the tree holds several split folders (e.g. train/ and test/), `split` picks one; class
    indices then come from the classes of all splits, so they agree across splits.
    Returns (images uint8 NHWC, labels int32, class_names).
    """
    size = check_size(size)
    splits = _read_image_tree(path, size)
    class_names = sorted({c for _, names in splits.values() for c in names})
    if split is None:
        if len(splits) > 1:
            raise DataError(f"{path} holds several splits ({', '.join(sorted(splits))}); pass split=")
        split = next(iter(splits))
    if split not in splits:
        raise DataError(f"no split folder '{split}' in {path}; found: {', '.join(sorted(splits)) or '(none)'}")
    images, names = splits[split]
    index = {c: i for i, c in enumerate(class_names)}
    return images, np.array([index[c] for c in names], np.int32), class_names


# --- CIFAR-10, official python pickles ---------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a pickle from the web can't run code."""
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                                      "numpy._core.numeric")
        for name in ("_reconstruct", "_frombuffer", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(raw, where):
    try:
        return _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError...: a corrupt or foreign file
        raise DataError(f"cannot unpickle {where}: {_first_line(e)}") from None


def read_cifar_pickle(folder):
    """CIFAR-10's python version: `cifar-10-batches-py/` or the `cifar-10-python.tar.gz` itself.

    Each batch holds b"data" (N, 3072): 1024 red, then green, then blue values per row-major
    32x32 image, and b"labels". Returns (train Split, test Split).
    """
    folder = Path(folder).expanduser()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not folder.exists():
        raise DataError(f"{folder} not found")
    found = {}
    for rel, raw in _iter_files(folder, lambda rel: PurePosixPath(rel).name in names):
        found.setdefault(PurePosixPath(rel).name, (rel, raw))
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"CIFAR-10 batches missing in {folder}: {', '.join(missing)}")
    batches = {}
    for name in names:
        rel, raw = found[name]
        where = _where(folder, rel)
        batch = _unpickle(raw, where)
        try:
            images = np.asarray(batch[b"data"], np.uint8)
            labels = np.asarray(batch[b"labels"], np.int64)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where} is not a CIFAR-10 batch (no b'data'/b'labels')") from None
        if images.ndim != 2 or images.shape[1] != 3072 or labels.shape != (len(images),):
            raise DataError(f"{where} is corrupt: data {images.shape}, labels {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= 10):
            raise DataError(f"{where} has labels outside 0..9: corrupt file?")
        batches[name] = (images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32))
    train = Split(np.ascontiguousarray(np.concatenate([batches[n][0] for n in names[:5]])),
                  np.concatenate([batches[n][1] for n in names[:5]]))
    return train, Split(np.ascontiguousarray(batches["test_batch"][0]), batches["test_batch"][1])


# --- GTSRB ---------------------------------------------------------------------------------

def _is_gtsrb_test_image(rel):
    return _is_image(rel) and any(p.lower() == "final_test" for p in PurePosixPath(rel).parts[:-1])


def _is_gtsrb_train_image(rel):
    parts = PurePosixPath(rel).parts
    return _is_image(rel) and len(parts) >= 2 and parts[-2].isdigit() and not _is_gtsrb_test_image(rel)


def _is_gtsrb_csv(rel):
    name = PurePosixPath(rel).name
    return name.lower().endswith(".csv") and name.startswith("GT-") and "__MACOSX" not in rel


def _parse_gt_csv(raw, where):
    """A GT-*.csv (Filename;Width;...;ClassId) -> {filename: class id}; None without a ClassId column."""
    try:
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig")), delimiter=";"))
        if not rows or "ClassId" not in rows[0] or "Filename" not in rows[0]:
            return None
        return {row["Filename"].strip(): int(row["ClassId"]) for row in rows}
    except (UnicodeDecodeError, ValueError, TypeError, csv.Error) as e:
        raise DataError(f"{where} is not a GTSRB ground-truth csv (Filename;...;ClassId): {_first_line(e)}") from None


def _scan_gtsrb(path, size, train=True, test=True):
    """One pass over a GTSRB folder/archive: training images by class folder, test images, GT csvs."""
    found = {"train": [], "test": [], "csv": {}}

    def want(rel):
        return ((train and _is_gtsrb_train_image(rel)) or (test and _is_gtsrb_test_image(rel))
                or _is_gtsrb_csv(rel))

    for rel, raw in _iter_files(path, want):
        p = PurePosixPath(rel)
        if _is_gtsrb_csv(rel):
            found["csv"][rel] = raw
        else:
            found["test" if _is_gtsrb_test_image(rel) else "train"].append((p.parent.name, p.name,
                                                                           _decode(raw, path, rel, size)))
    return found


def _gtsrb_train_arrays(found, path):
    if not found["train"]:
        raise DataError(f"no GTSRB training images in {path}: expected "
                        "GTSRB/Final_Training/Images/000NN/TTTTT_IIIII.ppm")
    found["train"].sort(key=lambda r: r[:2])
    gt = {}  # (class folder, filename) -> ClassId
    for rel, raw in found["csv"].items():
        folder = PurePosixPath(rel).parent.name
        if folder.isdigit():
            for name, cls in (_parse_gt_csv(raw, _where(path, rel)) or {}).items():
                gt[folder, name] = cls
    labels, tracks = [], []
    for folder, name, _ in found["train"]:
        labels.append(gt.get((folder, name), int(folder)))
        match = _TRACK_NAME.match(PurePosixPath(name).stem)
        if not match or int(match[1]) >= 1000:
            raise DataError(f"{path}: {folder}/{name} is not named TTTTT_IIIII (track_image) as GTSRB training "
                            "images are; the track is needed to split by track")
        tracks.append(int(folder) * 1000 + int(match[1]))
    labels = np.array(labels, np.int32)
    if labels.min() < 0 or labels.max() >= GTSRB_NUM_CLASSES:
        raise DataError(f"GTSRB labels in {path} go beyond 0..{GTSRB_NUM_CLASSES - 1}: corrupt csv?")
    return _stack([r[2] for r in found["train"]], path), labels, np.array(tracks, np.int64)


def read_gtsrb(path, size):
    """GTSRB training images (official layout) from a folder or archive.

    Labels come from each class's GT-000NN.csv, or from the folder name 000NN where the csv is
    missing. Returns (images, labels, tracks): tracks = class folder * 1000 + track number, one id
    per physical sign, for `split_by_group`.
    """
    size = check_size(size)
    return _gtsrb_train_arrays(_scan_gtsrb(path, size, test=False), path)


def _gtsrb_test_labels(found, path, gt_csv=None):
    """{filename: class} for the test images, from `gt_csv` or a GT-final_test.csv in `found`; else None."""
    if gt_csv is not None:
        return _read_test_csv(gt_csv), str(gt_csv)
    for rel, raw in found["csv"].items():
        if PurePosixPath(rel).name == GTSRB_TEST_CSV:
            gt = _parse_gt_csv(raw, _where(path, rel))
            if gt is not None:
                return gt, _where(path, rel)
    return None, None


def _gtsrb_test_arrays(found, path, gt_csv=None):
    if not found["test"]:
        raise DataError(f"no GTSRB test images in {path}: expected Final_Test/Images/NNNNN.ppm")
    found["test"].sort(key=lambda r: r[1])
    gt, where = _gtsrb_test_labels(found, path, gt_csv)
    if gt is None:
        raise DataError(f"no test labels for {path}: expected {GTSRB_TEST_CSV} (with a ClassId column, from "
                        "GTSRB_Final_Test_GT.zip) next to Final_Test/ or passed as gt_csv")
    missing = [name for _, name, _ in found["test"] if name not in gt]
    if missing:
        raise DataError(f"{where} has no label for {len(missing)} test images (e.g. {missing[0]})")
    labels = np.array([gt[name] for _, name, _ in found["test"]], np.int32)
    if labels.min() < 0 or labels.max() >= GTSRB_NUM_CLASSES:
        raise DataError(f"GTSRB test labels in {where} go beyond 0..{GTSRB_NUM_CLASSES - 1}: corrupt csv?")
    return _stack([r[2] for r in found["test"]], path), labels


def _read_test_csv(gt_csv):
    gt_csv = Path(gt_csv).expanduser()
    if gt_csv.is_file() and not is_archive(gt_csv):
        raw, where = gt_csv.read_bytes(), str(gt_csv)
    else:
        hits = list(_iter_files(gt_csv, lambda rel: PurePosixPath(rel).name == GTSRB_TEST_CSV))
        if not hits:
            raise DataError(f"no {GTSRB_TEST_CSV} in {gt_csv}")
        raw, where = hits[0][1], f"{gt_csv}:{hits[0][0]}"
    gt = _parse_gt_csv(raw, where)
    if gt is None:
        raise DataError(f"{where} has no ClassId column; the labelled one is {GTSRB_TEST_CSV} "
                        "from GTSRB_Final_Test_GT.zip")
    return gt


def read_gtsrb_test(path, size, gt_csv=None):
    """GTSRB's official test split: `Final_Test/Images/*.ppm` labelled by GT-final_test.csv.

    The csv is looked for in `path` itself, or given as `gt_csv` (the csv, or GTSRB_Final_Test_GT.zip).
    Raises DataError when the images or the labels are absent. Returns (images, labels).
    """
    size = check_size(size)
    return _gtsrb_test_arrays(_scan_gtsrb(path, size, train=False), path, gt_csv)


# --- validation splits -------------------------------------------------------------------

def _check_fraction(val_fraction):
    if not 0 <= val_fraction < 1:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")


def split_random(labels, val_fraction, seed=0):
    """(train_idx, val_idx) with `val_fraction` of each class held out, both in shuffled order.

    `labels` may also be a count n, for a plain (unstratified) random split of range(n).
    """
    _check_fraction(val_fraction)
    labels = np.zeros(int(labels), np.int64) if np.ndim(labels) == 0 else np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # floor(fraction * count) per class, and one more for the classes with the largest remainders until the
    # whole is the fraction of all, rounded: each class rounded alone held 40 of 450 out for 10% (4.5 -> 4)
    exact = val_fraction * counts
    take = np.floor(exact).astype(int)
    take[np.argsort(take - exact, kind="stable")[:int(np.floor(val_fraction * len(labels) + 0.5)) - take.sum()]] += 1
    val = []
    for c, count in zip(classes, take):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.append(members[:count])
    is_val = np.zeros(len(labels), bool)
    is_val[np.concatenate(val) if val else []] = True
    return rng.permutation(np.flatnonzero(~is_val)), rng.permutation(np.flatnonzero(is_val))


def split_by_group(labels, groups, val_fraction, seed=0):
    """(train_idx, val_idx) that never split a group (a GTSRB track), stratified per class.

    Each group belongs to its most common class; per class, whole groups are taken in random order
    whenever that brings the held-out count closer to `val_fraction` of the class. A class with one
    big group may so end up without validation images: duplicates across the split would be worse.
    """
    _check_fraction(val_fraction)
    labels, groups = np.asarray(labels), np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise UsageError(f"labels {labels.shape} and groups {groups.shape} must be 1-D and of equal length")
    rng = np.random.default_rng(seed)
    group_ids, group_of = np.unique(groups, return_inverse=True)
    class_ids, class_of = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(group_ids), len(class_ids)), np.int64)
    np.add.at(counts, (group_of, class_of), 1)
    sizes, group_class = counts.sum(1), counts.argmax(1)
    val_group = np.zeros(len(group_ids), bool)
    for c in range(len(class_ids)):
        members = rng.permutation(np.flatnonzero(group_class == c))
        target, taken = val_fraction * sizes[members].sum(), 0
        for g in members:
            if taken + sizes[g] / 2 <= target:  # taking g lands nearer the target than leaving it
                val_group[g], taken = True, taken + sizes[g]
    is_val = val_group[group_of]
    return rng.permutation(np.flatnonzero(~is_val)), rng.permutation(np.flatnonzero(is_val))


# --- cache ---------------------------------------------------------------------------------

def _signature(sources):
    """What the cache is keyed by: each source's path, size and mtime (every file's, for folders)."""
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for source in sources:
        source = Path(source).expanduser().resolve()
        h.update(f"|{source}".encode())
        if source.is_file():
            st = source.stat()
            h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            for root, dirs, files in os.walk(source):
                dirs.sort()
                for name in sorted(files):
                    try:
                        st = (Path(root) / name).stat()
                    except OSError:  # a link to nothing, say: no file the loaders read (a traceback before)
                        st = (Path(root) / name).lstat()
                    h.update(f"|{Path(root, name).relative_to(source)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _cached(name, size, sources, compute, use_cache):
    """compute() -> {name: array}, stored as one .npz; a stale, corrupt or unwritable cache is ignored."""
    if not use_cache:
        return compute()
    file = cache_dir() / f"{name}-{f'{size[0]}x{size[1]}' if size else 'native'}.npz"
    key = _signature(sources)
    try:
        with np.load(file, allow_pickle=False) as z:
            if str(z["_key"]) == key:
                return {k: z[k] for k in z.files if k != "_key"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    arrays = compute()
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, _key=np.array(key), **arrays)
        os.replace(tmp, file)
    except OSError:  # no cache then (a full disk, $FLAXLAB_CACHE a file: whose tmp cannot be unlinked either)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return arrays


# --- entry points --------------------------------------------------------------------------

def _find(data_dir, candidates, looks_right, how_to):
    """data_dir itself when it holds the data, else the first candidate: a file, or a folder that looks right."""
    if not Path(data_dir).expanduser().exists():
        raise DataError(f"{data_dir_option(data_dir)} not found; {how_to}")
    data_dir = Path(data_dir).expanduser()
    if data_dir.is_file() or looks_right(data_dir):
        return data_dir
    for name in candidates:
        if (data_dir / name).is_file() or ((data_dir / name).is_dir() and looks_right(data_dir / name)):
            return data_dir / name
    return None


def _cifar_looks_right(folder):
    return ((folder / "data_batch_1").is_file() or (folder / "airplane").is_dir()
            or (folder / "train" / "airplane").is_dir())


def _with_how_to(how_to, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DataError as e:
        raise DataError(f"{e}; {how_to}") from None


def _hold_out(split, fraction, seed, groups=None, what="test"):
    """(rest, held-out) parts of `split` (and the rest's groups); `fraction` of each class, by group if given."""
    if what == "test" and not fraction:
        raise UsageError("this data set has no test split of its own: hold one out of train with "
                         "--data.test_fraction (e.g. 0.1)")
    if not 0 < fraction < 1:
        raise UsageError(f"{what}_fraction must be in (0, 1), got {fraction}")
    rest, held = (split_random(split.labels, fraction, seed) if groups is None
                  else split_by_group(split.labels, groups, fraction, seed))
    if len(held) == 0 or len(rest) == 0:
        whole = " (whole tracks are held out)" if groups is not None else ""
        raise UsageError(f"--data.{what}_fraction {fraction} of {len(split)} examples leaves "
                         f"{'nothing to hold out' if len(held) == 0 else 'nothing to train on'}{whole}")
    return (Split(split.images[rest], split.labels[rest]), Split(split.images[held], split.labels[held]),
            None if groups is None else groups[rest])


def make_splits(train, test, val_fraction, test_fraction, seed, groups=None, how="stratified by class"):
    """train/val/test: without an official test split, test is held out of train first; then val.

    Returns the splits and a note on where test and val came from, for `Dataset.source`.
    """
    note, test_held = "", test is None
    if test_held:
        train, test, groups = _hold_out(train, test_fraction, seed, groups)
        note += f" (test = {test_fraction:.0%} of train, {how}, seed {seed})"
    val = None
    if val_fraction:
        train, val, _ = _hold_out(train, val_fraction, seed + 1, groups, "val")
        rest = "the rest of train" if test_held else "train"  # "the rest" only where test was held out first
        note += f" (val = {val_fraction:.0%} of {rest}, {how})"
    return train, val, test, note


def _cifar10_arrays(source, size, pickled):
    if pickled:
        train, test = read_cifar_pickle(source)
        return {"train_images": resize_all(train.images, size), "train_labels": train.labels,
                "test_images": resize_all(test.images, size), "test_labels": test.labels}
    splits = _read_image_tree(source, size or (32, 32))
    classes = sorted({c for _, names in splits.values() for c in names})
    if tuple(classes) != CIFAR10_CLASSES:
        raise DataError(f"{source} has class folders {', '.join(classes[:12])}, not CIFAR-10's "
                        f"{', '.join(CIFAR10_CLASSES)}")
    # a val/ folder beside train/ was left out unsaid, and a top folder above the classes refused
    splits, train_split, test_split, unused = _tree_splits(splits, source, HOW_TO_GET_CIFAR10)
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    arrays = {"splits": np.array([train_split, test_split or ""]), "unused": np.array(unused, dtype=str)}
    for key, split in (("train", train_split), ("test", test_split)):
        if split in splits:
            images, names = splits[split]
            order = np.random.default_rng(0).permutation(len(names))  # folders come sorted by class
            arrays[f"{key}_images"] = images[order]
            arrays[f"{key}_labels"] = np.array([index[c] for c in names], np.int32)[order]
    return arrays


def load_cifar10(data_dir, size=None, val_fraction=0.0, test_fraction=0.1, seed=0, cache=True):
    """CIFAR-10 from the official pickles, or from an image folder/tar such as cifar10-train-jpg.tar.

    With no test split on disk, `test` is `test_fraction` of train, stratified by class; `val` is
    `val_fraction` of what remains (none when 0).
    """
    size = check_size(size)
    source = _find(data_dir, CIFAR10_CANDIDATES, _cifar_looks_right, HOW_TO_GET_CIFAR10)
    if source is None:
        raise DataError(f"no CIFAR-10 in {data_dir} (looked for {', '.join(CIFAR10_CANDIDATES)} and "
                        f"[train/]<class>/<image>); {HOW_TO_GET_CIFAR10}")
    pickled = (source / "data_batch_1").is_file() if source.is_dir() else source.name.startswith("cifar-10-python")

    def compute():
        return _with_how_to(HOW_TO_GET_CIFAR10, _cifar10_arrays, source, size, pickled)

    # image trees cached apart from the pickles: caches from before split folders were named lack that record
    arrays = _cached("cifar10" if pickled else "cifar10-images", size, [source], compute, cache)
    where = f"files:{source.resolve()}" + ("" if pickled else _split_note(arrays))
    train = Split(arrays["train_images"], arrays["train_labels"])
    test = Split(arrays["test_images"], arrays["test_labels"]) if "test_images" in arrays else None
    train, val, test, note = make_splits(train, test, val_fraction, test_fraction, seed)
    return Dataset("cifar10", where + note, train, test, num_classes=10, val=val, class_names=CIFAR10_CLASSES)


CIFAR10_SAMPLE = Path(__file__).parent / "assets" / "cifar10-sample" / "cifar10-sample.tar"
GTSRB_SAMPLE = Path(__file__).parent / "assets" / "gtsrb-sample" / "gtsrb-sample.tar.xz"


def _files_or_sample(source, data_dir, how_to, load, sample, **kwargs):
    """`load` on --data-dir, or on the shipped sample (which `Dataset.source` then names as such)."""
    if source == "files":
        if not data_dir:
            raise DataError(f"--data.source=files needs --data-dir; {how_to}")
        return load(data_dir, **kwargs)
    ds = load(sample, cache=False, **kwargs)
    return dataclasses.replace(ds, source=f"sample:flaxlab/assets/{sample.parent.name}"
                                          + ds.source.partition(sample.name)[2])


def cifar10(source="auto", data_dir=None, tfds_dir=None, size=(), val_fraction=0.0, test_fraction=0.1):
    """CIFAR-10 for an experiment: from --data-dir, TFDS or the shipped sample (600 train / 200 test)."""
    data_dir = data_dir_or_default(data_dir)
    source = resolve_source("cifar10", source, data_dir, tfds_dir, "cifar10")
    if source != "tfds":
        return _files_or_sample(source, data_dir, HOW_TO_GET_CIFAR10, load_cifar10, CIFAR10_SAMPLE,
                                size=size or None, val_fraction=val_fraction, test_fraction=test_fraction)
    train, test = load_tfds("cifar10", tfds_dir, how_to=HOW_TO_GET_CIFAR10)
    size = check_size(size or None)
    train, test = (Split(resize_all(s.images, size), s.labels) for s in (train, test))
    train, val, test, note = make_splits(train, test, val_fraction, test_fraction, seed=0)
    return Dataset("cifar10", "tfds:cifar10" + note, train, test, num_classes=10, val=val, class_names=CIFAR10_CLASSES)


def gtsrb(source="auto", data_dir=None, tfds_dir=None, size=(28, 28), val_fraction=0.0, test_fraction=0.2):
    """GTSRB for an experiment: from --data-dir or the shipped sample (43 classes x 5 tracks x 4 images)."""
    data_dir = data_dir_or_default(data_dir)
    source = resolve_source("gtsrb", source, data_dir, tfds_dir)
    return _files_or_sample(source, data_dir, HOW_TO_GET_GTSRB, load_gtsrb, GTSRB_SAMPLE,
                            size=size or (28, 28), val_fraction=val_fraction, test_fraction=test_fraction)


def _gtsrb_looks_right(folder):
    return any((folder / sub).is_dir() for sub in ("Final_Training", "00000", "Images/00000"))


def _gtsrb_arrays(source, size, test_images=None, gt_csv=None):
    """Training images, labels and tracks, plus the official test split where images and labels are there."""
    found = _scan_gtsrb(source, size, test=test_images is None)
    images, labels, tracks = _gtsrb_train_arrays(found, source)
    arrays = {"train_images": images, "train_labels": labels, "train_tracks": tracks}
    if test_images is not None:
        source, found = test_images, _scan_gtsrb(test_images, size, train=False)
    # test images without their labels (GTSRB_Final_Test_GT.zip) are no use: part of train is held out instead
    if found["test"] and _gtsrb_test_labels(found, source, gt_csv)[0] is not None:
        arrays["test_images"], arrays["test_labels"] = _gtsrb_test_arrays(found, source, gt_csv)
    return arrays


def load_gtsrb(data_dir, size=(28, 28), val_fraction=0.0, test_fraction=0.2, seed=0, cache=True):
    """GTSRB (43 classes) from the official layout, as a folder or archive (e.g. gtsrb-train-32px.tar.xz).

    Uses the official test split when Final_Test/ and its labels are there (in the same folder, or as
    GTSRB_Final_Test_Images.zip + GTSRB_Final_Test_GT.zip in data_dir); otherwise `test` is
    `test_fraction` of train, made of whole tracks, stratified by class. `val` (when `val_fraction`)
    is made of whole tracks too.
    """
    size = check_size(size)
    if size is None:
        raise UsageError("GTSRB images come in many sizes; load_gtsrb needs size=(h, w)")
    source = _find(data_dir, GTSRB_CANDIDATES, _gtsrb_looks_right, HOW_TO_GET_GTSRB)
    if source is None:
        raise DataError(f"no GTSRB in {data_dir} (looked for {', '.join(GTSRB_CANDIDATES)}); {HOW_TO_GET_GTSRB}")
    data_dir = Path(data_dir).expanduser()
    test_images = data_dir / GTSRB_TEST_ARCHIVES[0] if data_dir.is_dir() else None
    test_images = test_images if test_images and test_images.is_file() else None
    gt_csv = next((p for p in (data_dir / GTSRB_TEST_CSV, data_dir / GTSRB_TEST_ARCHIVES[1])
                   if data_dir.is_dir() and p.is_file()), None)

    def compute():
        return _with_how_to(HOW_TO_GET_GTSRB, _gtsrb_arrays, source, size, test_images, gt_csv)

    arrays = _cached("gtsrb", size, [p for p in (source, test_images, gt_csv) if p], compute, cache)
    where = f"files:{source.resolve()}"
    train, tracks, test = Split(arrays["train_images"], arrays["train_labels"]), arrays["train_tracks"], None
    if "test_images" in arrays:
        order = np.random.default_rng(seed).permutation(len(train))  # files come by class
        train, tracks = Split(train.images[order], train.labels[order]), tracks[order]
        test = Split(arrays["test_images"], arrays["test_labels"])
        if test_images is not None:
            where += f" + {test_images.resolve()} (official test)"
    train, val, test, note = make_splits(train, test, val_fraction, test_fraction, seed, tracks, "by track")
    return Dataset("gtsrb", where + note, train, test, num_classes=GTSRB_NUM_CLASSES, val=val,
                   class_names=GTSRB_CLASSES)


# --- any folder of class folders (what torchvision's ImageFolder reads) ------------------------

HOW_TO_GET_IMAGES = ("pass a folder or archive of [train/]CLASS/IMAGE (and, if it has one, test/CLASS/IMAGE) with "
                     "--data-dir; the class folders' names, sorted, are the labels")
IMAGE_TEST_SPLITS = ("test", "val", "valid", "validation")  # the first one present is the test split


def _tree_splits(splits, source, how_to):
    """(splits, train split, test split, unused splits) of a class-folder tree: an archive's one top folder is a
    prefix, not a split, and test is the first of IMAGE_TEST_SPLITS present."""
    known = {"", "train", *IMAGE_TEST_SPLITS}
    if len(splits) == 1 and not known.intersection(splits):  # an archive's top folder: a prefix, not a split
        splits = {"": next(iter(splits.values()))}
    train_split = "train" if "train" in splits else "" if "" in splits else None
    if train_split is None:
        raise DataError(f"no train split in {source} (found {', '.join(repr(s) for s in sorted(splits))}); "
                        f"{how_to}")
    test_split = next((s for s in IMAGE_TEST_SPLITS if s in splits), None)
    return splits, train_split, test_split, sorted(set(splits) - {train_split, test_split})


def _split_note(arrays):
    """What a tree's test split was, and which split folders went unused, for `Dataset.source`."""
    test = arrays["splits"][1] if "test_images" in arrays else ""
    return ((f" (test = its {test}/ split)" if test else "")
            + (f" ({', '.join(f'{s}/' for s in arrays['unused'])} unused)" if len(arrays["unused"]) else ""))


def _image_folder_arrays(source, size):
    splits, train_split, test_split, unused = _tree_splits(_read_image_tree(source, size), source, HOW_TO_GET_IMAGES)
    untrained = sorted(set(splits[test_split][1]) - set(splits[train_split][1])) if test_split else []
    if untrained:  # never learnable, scored as wrong: most likely a folder named two ways
        raise DataError(f"{source}: {test_split}/ has class folder(s) that {train_split or 'the top'}/ lacks "
                        f"({', '.join(untrained[:5])}): name each class's folder the same in every split")
    classes = sorted({c for s in (train_split, test_split) if s in splits for c in splits[s][1]})
    index = {c: i for i, c in enumerate(classes)}
    arrays = {"class_names": np.array(classes), "splits": np.array([train_split, test_split or ""]),
              "unused": np.array(unused, dtype=str)}
    for key, split in (("train", train_split), ("test", test_split)):
        if split in splits:
            images, names = splits[split]
            arrays[f"{key}_images"] = images
            arrays[f"{key}_labels"] = np.array([index[c] for c in names], np.int32)
    return arrays


def load_image_folder(data_dir, size=None, val_fraction=0.0, test_fraction=0.1, seed=0, cache=True):
    """A classification set of class folders: `[train/]CLASS/IMAGE`, tested on its `test/` (or `val/`) split,
    else on `test_fraction` of train held out, stratified by class; images resized to `size` when given."""
    size = check_size(size)
    source = _find(data_dir, (), lambda folder: True, HOW_TO_GET_IMAGES)
    arrays = _cached("images", size, [source], lambda: _image_folder_arrays(source, size), cache)
    classes = tuple(str(c) for c in arrays["class_names"])
    if len(classes) < 2:
        raise DataError(f"{source} has {len(classes)} class folder{'s' if len(classes) != 1 else ''} "
                        f"({', '.join(classes)}); a classifier needs two or more; {HOW_TO_GET_IMAGES}")
    train = Split(arrays["train_images"], arrays["train_labels"])
    test = Split(arrays["test_images"], arrays["test_labels"]) if "test_images" in arrays else None
    where = f"files:{source.resolve()}" + _split_note(arrays)
    train, val, test, note = make_splits(train, test, val_fraction, test_fraction, seed)
    return Dataset("images", where + note, train, test, num_classes=len(classes), val=val, class_names=classes)


def images(source="auto", data_dir=None, tfds_dir=None, size=(), val_fraction=0.0, test_fraction=0.1):
    """Your own images for an experiment: class folders from --data-dir (no sample ships)."""
    data_dir = data_dir_or_default(data_dir)
    if source not in ("auto", "files") or not data_dir:
        other = "" if source in ("auto", "files") else f", not --data.source {source}"
        raise DataError(f"--data.name images reads your own files{other}: {HOW_TO_GET_IMAGES}")
    return load_image_folder(data_dir, size=size or None, val_fraction=val_fraction, test_fraction=test_fraction)


# --- loose image files, for a trained model to label (`predict`) --------------------------------

def _as_network_input(im, size, channels):
    """A PIL image as uint8 (h, w, channels) at `size` (bilinear); a clear background becomes white paper."""
    Image = _pil()
    im = eight_bit(im)
    if "A" in im.getbands() or "transparency" in im.info:  # a drawing app's ink on a clear background:
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))  # on paper
    im = im.convert("L" if channels == 1 else "RGB")
    return np.asarray(im.resize((size[1], size[0]), Image.BILINEAR), np.uint8).reshape(size[0], size[1], channels)


def _arrays_as_images(images, size, channels):
    """uint8 images of Python's, (N, h, w) or (N, h, w, 1|3|4), prepared as read_images prepares files."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"images given as an array must be uint8 pixels, 0 to 255, as image files hold them; "
                        f"got {images.dtype} (floats in [0, 1]: (images * 255).round().astype(np.uint8))")
    if images.ndim == 3 and images.shape[-1] in (1, 3, 4):  # one image, read as N narrow ones
        raise DataError(f"an array of shape {images.shape} is one image (height, width, channels), or {len(images)} "
                        f"images {images.shape[1]}x{images.shape[2]} pixels: give one image as image[None], (1, "
                        f"height, width, channels)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or 0 in images.shape:
        raise DataError(f"images given as an array must be (N, height, width) or (N, height, width, 1, 3 or 4 "
                        f"channels), got shape {images.shape}")
    Image = _pil()
    prepared = [_as_network_input(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im), size, channels)
                for im in images]
    return np.stack(prepared), [f"image-{i}" for i in range(len(images))], [images.shape[1:3]] * len(images)


def read_images(paths, size, channels, log=None):
    """Image files, and the images of folders (not their subfolders), as uint8 (N, h, w, channels) resized to
    `size` (bilinear): what `predict` gives a trained network. Returns (images, file paths, original (h, w)s).
    `paths` may be one path, or (from Python) an array of uint8 images, named image-0, image-1, ...
    `log` is told what a folder held besides images, and which files hold several frames (the first is read)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    elif hasattr(paths, "shape") and hasattr(paths, "dtype"):  # numpy or jax
        return _arrays_as_images(paths, size, channels)
    paths = list(paths)
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):  # [] or a list of arrays
        raise DataError("give image files or folders (paths), or the images as one uint8 array (N, height, width"
                        "[, channels]): np.stack a list of them")
    Image = _pil()
    from PIL import ImageOps
    log = log or (lambda line: None)
    files = []
    for given in paths:
        path = Path(given)
        if not str(given):  # Path("") is the current folder
            raise DataError("an empty path was given for an image")
        if path.is_dir():
            entries = sorted(path.iterdir(), key=lambda f: natural_key(f.name))
            found = [f for f in entries if f.is_file() and _is_image(f.name)]
            if not found:
                raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder {path}"
                                f"{' (its subfolders are not searched)' if any(f.is_dir() for f in entries) else ''}")
            files += found
            taken = set(found)  # a folder of 10,000 digits: a list's `in` made this 10^8 comparisons
            other = [f.name + "/" * f.is_dir() for f in entries if f not in taken and not f.name.startswith(".")]
            if other:
                log(f"note: {path} also holds {len(other)} entr{'y that is' if len(other) == 1 else 'ies that are'} not "
                    f"image files ({', '.join(other[:4])}{', ...' if len(other) > 4 else ''}), left out; subfolders "
                    f"are not searched, and images are {', '.join(IMAGE_SUFFIXES)}")
        elif path.is_file():
            files.append(path)
        elif path.is_symlink():
            raise DataError(f"{path} is a link to {os.readlink(path)}, which is not there")
        else:
            raise DataError(f"{path} not found")
    first = {}  # a file given twice (or in a folder given too) is read once
    for file in files:
        first.setdefault(file.resolve(), file)
    files = list(first.values())
    images, sizes = [], []
    for file in files:
        try:
            with warnings.catch_warnings():  # Pillow's DecompressionBombWarning; past twice its limit, an error
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(file) as im:
                    if getattr(im, "n_frames", 1) > 1:
                        log(f"note: {file} holds {im.n_frames} frames; the first is read")
                    im = ImageOps.exif_transpose(im)  # a phone's photo, upright as its viewer shows it
                    sizes.append((im.height, im.width))
                    images.append(_as_network_input(im, size, channels))
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError...: all mean "bad file"
            raise DataError(f"cannot read {file}: {_image_error(e)}") from None
    return np.stack(images), [str(f) for f in files], sizes
