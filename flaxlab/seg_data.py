"""Segmentation inputs: images with per-pixel masks, as uint8 NHWC images and NHW {0, 1} masks.

Two layouts, read from a folder or an archive (streamed, as in `flaxlab.image_data`):
- paired: `[SPLIT/]images/NAME.ext` with `[SPLIT/]masks/NAME.ext` (ext png, bmp, jpg; the mask's may
  differ), as in ../shared/data's JSRT and GlaS archives;
- the GlaS release: `SPLIT_N.bmp` with `SPLIT_N_anno.bmp` (SPLIT train, testA, testB), whose
  annotations number the glands (instance ids): every value > 0 is gland.
Images are resized bilinearly, masks by nearest neighbour, both to the experiment's size; greyscale
images (JSRT's X-rays) keep one channel.
"""
import dataclasses
import io
import re
from pathlib import Path, PurePosixPath

import numpy as np

from flaxlab.data import Dataset, Split, data_dir_or_default, resolve_source
from flaxlab.errors import DataError, UsageError
from flaxlab.image_data import (IMAGE_SUFFIXES, _cached, check_size, _find, _image_error, _iter_files, _pil, _where,
                                _with_how_to, eight_bit, natural_key)

SPLIT_NAMES = {"", "train", "test", "testA", "testB", "val"}  # what a split folder (or GlaS name) may be called
_GLAS_NAME = re.compile(r"^(train|testA|testB|test|val)_(\d+)(_anno)?$")

GLAS_URL = "https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/"
HOW_TO_GET_GLAS = (f"download the GlaS (Warwick-QU) release from {GLAS_URL} and pass its folder (or zip) with "
                   "--data-dir; a folder or tar of SPLIT/images/NAME.png + SPLIT/masks/NAME.png also works")
GLAS_CANDIDATES = ("glas-half-train-testA.tar.gz", "glas", "Warwick QU Dataset (Released 2016_07_08)",
                   "warwick_qu_dataset_released_2016_07_08.zip", "Warwick_QU_Dataset", "GlaS")
JSRT_URL = "http://db.jsrt.or.jp/eng.php"
HOW_TO_GET_JSRT = (f"get the JSRT radiographs ({JSRT_URL}) with lung masks (e.g. SCR) as 256x256 "
                   "SPLIT/images/ID.png + SPLIT/masks/ID.png and pass their folder or tar with --data-dir")
JSRT_CANDIDATES = ("jsrt-lungs-256-trainval.tar.gz", "jsrt256", "jsrt", "JSRT")
HOW_TO_GET_PAIRED = "pass a folder or archive of SPLIT/images/NAME.png with SPLIT/masks/NAME.png with --data-dir"

ASSETS = Path(__file__).parent / "assets"
SAMPLES = {"glas": ASSETS / "glas-sample" / "glas-sample.tar.gz",
           "jsrt": ASSETS / "jsrt-sample" / "jsrt-sample.tar.gz"}


def _role(rel):
    """(split, name, 'image' | 'mask') of a file in either layout, or None for other files."""
    path = PurePosixPath(rel)
    if not path.name.lower().endswith(IMAGE_SUFFIXES) or path.name.startswith(".") or "__MACOSX" in rel:
        return None
    if path.parent.name in ("images", "masks"):
        split = path.parent.parent.name
        return split, path.stem, "image" if path.parent.name == "images" else "mask"
    match = _GLAS_NAME.match(path.stem)
    if match:
        return match.group(1), f"{match.group(1)}_{match.group(2)}", "mask" if match.group(3) else "image"
    return None


def _open(raw, path, rel):
    Image = _pil()
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()  # decode now: a truncated file fails here
        return im
    except Exception as e:  # Pillow raises many kinds for a bad file
        raise DataError(f"cannot decode {_where(path, rel)}: {_image_error(e)}") from None


def _decode_image(raw, path, rel, size):
    """(uint8 (h, w, 1) for greyscale files, (h, w, 3) for the rest, bilinearly resized; the file's (w, h))."""
    Image = _pil()
    im = _open(raw, path, rel)
    native = im.size
    im = eight_bit(im)
    im = im.convert("L" if im.mode in ("L", "1", "LA") else "RGB")
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(im, np.uint8)
    return array[..., None] if array.ndim == 2 else array, native


def _decode_mask(raw, path, rel, size):
    """({0, 1} uint8 (h, w), nearest resize; the file's (w, h)): any non-zero value is foreground (0/255 masks,
    GlaS's gland ids), but in a JPEG, whose compression smears edges into in-between values (3.9% of GlaS's
    pixels turned foreground), only values above half its brightest."""
    Image = _pil()
    im = _open(raw, path, rel)
    native, lossy = im.size, im.format == "JPEG"
    if im.mode not in ("L", "P", "I", "I;16", "1"):  # colour masks: any non-black pixel
        im = im.convert("L")
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.NEAREST)
    values = np.asarray(im)
    return (values > (values.max() / 2 if lossy else 0)).astype(np.uint8), native


def _stack(arrays, what, path):
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DataError(f"{what} in {path} differ in size ({a[1]}x{a[0]} and {b[1]}x{b[0]}); set --data.size H,W")
    return np.stack(arrays)


def read_pairs(path, size=None):
    """{split: (images NHWC, masks NHW, names)} of a folder or archive in either layout, names sorted."""
    size = check_size(size)
    found = {}
    for rel, raw in _iter_files(path, lambda rel: _role(rel) is not None):
        split, name, kind = _role(rel)
        decode = _decode_image if kind == "image" else _decode_mask
        entry = found.setdefault(split, {}).setdefault(name, {})
        if kind in entry:
            raise DataError(f"two {kind}s named {name} in split '{split or '.'}' of {path}")
        entry[kind] = (rel, *decode(raw, path, rel, size))  # (rel, array, the file's size)
    if not found:
        raise DataError(f"no images with masks in {path} (expected SPLIT/images/NAME + SPLIT/masks/NAME, "
                        "or GlaS's SPLIT_N.bmp + SPLIT_N_anno.bmp)")
    if len(found) == 1 and not SPLIT_NAMES.intersection(found):  # an archive's top folder: a prefix, not a split
        found = {"": next(iter(found.values()))}
    out = {}
    for split, entries in sorted(found.items()):
        for name, entry in entries.items():
            if len(entry) == 1:
                (kind, (rel, *_)), = entry.items()
                raise DataError(f"{_where(path, rel)} has no {'mask' if kind == 'image' else 'image'} "
                                f"(split '{split or '.'}' pairs images/NAME with masks/NAME)")
        names = sorted(entries, key=natural_key)
        for name in names:  # resizing to --data.size would hide it: each image then gets another's mask
            (image_rel, _, image_size), (mask_rel, _, mask_size) = entries[name]["image"], entries[name]["mask"]
            if image_size != mask_size:
                raise DataError(f"{_where(path, mask_rel)} is {mask_size[0]}x{mask_size[1]} and its image "
                                f"{image_rel} {image_size[0]}x{image_size[1]}: a mask is its image's size (swapped "
                                f"or mismatched files?)")
        pictures = [entries[n]["image"][1] for n in names]
        if len({p.shape[-1] for p in pictures}) > 1:  # mixed greyscale and colour files: colour for all
            pictures = [np.broadcast_to(p, (*p.shape[:2], 3)) for p in pictures]
        images = _stack(pictures, "images", path)
        masks = _stack([entries[n]["mask"][1] for n in names], "masks", path)
        out[split] = (images, masks, names)
    return out


def random_hold_out(split, fraction, seed, what="val"):
    """(rest, held-out) of a segmentation split: `fraction` of its images at random."""
    if what == "test" and not fraction:
        raise UsageError("this data set has no test split of its own: hold one out of train with "
                         "--data.test_fraction (e.g. 0.1)")
    if not 0 < fraction < 1:
        raise UsageError(f"--data.{what}_fraction must be in (0, 1), got {fraction}")
    n = len(split)
    held = int(round(fraction * n))
    if held < 1 or held >= n:
        raise UsageError(f"--data.{what}_fraction {fraction} of {n} images leaves "
                         f"{'nothing to hold out' if held < 1 else 'nothing to train on'}")
    order = np.random.default_rng(seed).permutation(n)
    rest, out = np.sort(order[held:]), np.sort(order[:held])
    return split.take(rest), split.take(out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a segmentation data set is found and which of its splits are train and test."""
    name: str
    candidates: tuple
    how_to: str
    train: tuple = ("train", "")
    test: tuple = ("test", "testA", "val")
    default_size: tuple = None
    channels: int = None  # what its images hold: another data set's archive trained without a word


LAYOUTS = {
    "glas": Layout("glas", GLAS_CANDIDATES, HOW_TO_GET_GLAS, test=("testA", "test", "val"), default_size=(128, 128),
                   channels=3),
    # JSRT's own `val` split is what the ADL report evaluates on: it is the test split here, and
    # --data.val_fraction holds a validation split out of train for early stopping
    "jsrt": Layout("jsrt", JSRT_CANDIDATES, HOW_TO_GET_JSRT, test=("val", "test", "testA"), default_size=(256, 256),
                   channels=1),
    "paired": Layout("paired", (), HOW_TO_GET_PAIRED),
}


def _looks_right(folder):
    return any(folder.glob("*/images")) or any(folder.glob("images")) or any(folder.glob("*_anno.bmp")) \
        or any(folder.glob("*/*_anno.bmp"))


def load_segmentation(layout, data_dir, size=None, val_fraction=0.0, test_fraction=0.2, seed=0, cache=True):
    """One segmentation data set from --data-dir: its train split, its test split (held out of train
    when there is none) and, with `val_fraction`, a validation split held out of train."""
    layout = LAYOUTS[layout]
    size = check_size(size)
    source = _find(data_dir, layout.candidates, _looks_right, layout.how_to)
    if source is None:
        raise DataError(f"no {layout.name} data in {data_dir} (looked for {', '.join(layout.candidates)} "
                        f"and SPLIT/images + SPLIT/masks); {layout.how_to}")

    def compute():  # every split, so that the choice of train and test below is not cached
        splits = _with_how_to(layout.how_to, read_pairs, source, size)
        arrays = {"splits": np.array(list(splits))}
        for i, (images, masks, names) in enumerate(splits.values()):
            arrays.update({f"images_{i}": images, f"masks_{i}": masks, f"names_{i}": np.array(names)})
        return arrays

    arrays = _cached(f"segmentation-{layout.name}-named", size, [source], compute, cache)
    splits = {str(name): Split(arrays[f"images_{i}"], arrays[f"masks_{i}"], tuple(map(str, arrays[f"names_{i}"])))
              for i, name in enumerate(arrays["splits"])}
    train_split = next((s for s in layout.train if s in splits), None)
    if train_split is None:
        raise DataError(f"no train split in {source} (found {', '.join(repr(s) for s in splits)}); {layout.how_to}")
    test_split = next((s for s in layout.test if s in splits and s != train_split), None)
    train = splits[train_split]
    channels = train.images.shape[-1]
    if layout.channels and channels != layout.channels:
        kinds = {1: "greyscale", 3: "colour"}
        raise DataError(f"{source} holds {kinds.get(channels, f'{channels}-channel')} images, and {layout.name}'s are "
                        f"{kinds[layout.channels]}: is it another data set's? (--data.name paired takes any pairs "
                        "of images and masks)")
    where = f"files:{Path(source).resolve()}"
    if test_split is not None:
        test = splits[test_split]
        where += f" (test = its {test_split} split)"
    else:
        train, test = random_hold_out(train, test_fraction, seed, "test")
        where += f" (test = {test_fraction:.0%} of train, seed {seed})"
    unused = [repr(s or ".") for s in splits if s not in (train_split, test_split)]
    if unused:  # e.g. the GlaS release's testB: said, so that nobody takes the score for one over all of it
        where += f" (split{'s' if len(unused) > 1 else ''} {', '.join(unused)} unused)"
    val = None
    if val_fraction:
        train, val = random_hold_out(train, val_fraction, seed + 1)
        where += f" (val = {val_fraction:.0%} of {'train' if test_split else 'the rest of train'})"
    return Dataset(layout.name, where, train, test, num_classes=2, val=val)


def _entry_point(layout):
    def load(source="auto", data_dir=None, tfds_dir=None, size=(), val_fraction=0.0, test_fraction=0.2):
        data_dir = data_dir_or_default(data_dir)
        source = resolve_source(layout, source, data_dir, tfds_dir)
        size = size or LAYOUTS[layout].default_size
        if source == "files":
            if not data_dir:
                raise DataError(f"--data.source=files needs --data-dir; {LAYOUTS[layout].how_to}")
            return load_segmentation(layout, data_dir, size, val_fraction, test_fraction)
        if layout not in SAMPLES:
            raise DataError(f"no sample of '{layout}' ships with flaxlab; {LAYOUTS[layout].how_to}")
        sample = SAMPLES[layout]
        ds = load_segmentation(layout, sample, size, val_fraction, test_fraction, cache=False)
        return dataclasses.replace(ds, source=f"sample:flaxlab/assets/{sample.parent.name}"
                                              + ds.source.partition(sample.name)[2])
    load.__name__ = layout
    load.__doc__ = f"The {layout} segmentation set for an experiment: from --data-dir" + \
        (" or the shipped sample." if layout in SAMPLES else ".")
    return load


glas, jsrt, paired = (_entry_point(name) for name in ("glas", "jsrt", "paired"))
