"""CIFAR-10 and GTSRB loaders on tiny folders, archives and pickles written here; real GTSRB when present."""
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from flaxlab import data, image_data  # noqa: E402
from flaxlab.errors import DataError, UsageError  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder: nothing is written to ~/.cache."""
    monkeypatch.setenv("FLAXLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def solid(color, h=8, w=8):
    return np.full((h, w, 3), color, np.uint8)


def encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_tree(root, files):
    """files: {relative path: bytes}, written as a folder, or as a tar/zip archive when root names one."""
    root = str(root)
    if root.endswith(".zip"):
        with zipfile.ZipFile(root, "w") as zf:
            for rel, raw in files.items():
                zf.writestr(rel, raw)
    elif root.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz")):
        mode = {".tar": "w", ".gz": "w:gz", ".tgz": "w:gz", ".xz": "w:xz"}[os.path.splitext(root)[1]]
        with tarfile.open(root, mode) as tf:
            for rel, raw in files.items():
                info = tarfile.TarInfo(rel)
                info.size = len(raw)
                tf.addfile(info, io.BytesIO(raw))
    else:
        for rel, raw in files.items():
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(raw)
    return root


# pixel value 10*class + image index, so every image says where it came from
def folder_files(classes=("cat", "ant", "bee"), per_class=3, prefix="train/", fmt="PNG", size=(8, 8)):
    ext = {"PNG": "png", "PPM": "ppm", "JPEG": "jpg"}[fmt]
    return {f"{prefix}{c}/{i:04d}.{ext}": encode(solid(10 * k + i, *size), fmt)
            for k, c in enumerate(classes) for i in range(per_class)}


@pytest.mark.parametrize("name", ["tree", "a.tar", "a.tar.gz", "a.tar.xz", "a.zip"])
def test_image_folder_labels_sorted_classes_from_folders_and_archives(tmp_path, name):
    path = write_tree(tmp_path / name, folder_files())
    images, labels, classes = image_data.read_image_folder(path)
    assert classes == ["ant", "bee", "cat"]
    assert images.shape == (9, 8, 8, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
    # "ant" was written as class 1: its images hold values 10..12 and now carry label 0
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert images[:, 0, 0, 0].tolist() == [10, 11, 12, 20, 21, 22, 0, 1, 2]


def test_image_folder_resizes_mixed_sizes_and_formats(tmp_path):
    files = {**folder_files(("a",), 2, prefix="", fmt="PPM", size=(8, 8)),
             **folder_files(("b",), 2, prefix="", fmt="JPEG", size=(12, 6))}
    files["b/grey.png"] = encode(np.full((5, 5), 200, np.uint8), "PNG")  # greyscale -> RGB
    path = write_tree(tmp_path / "mixed.tar.gz", files)
    with pytest.raises(DataError, match="differ in size.*give --data.size"):
        image_data.read_image_folder(path)
    images, labels, classes = image_data.read_image_folder(path, size=(4, 6))
    assert images.shape == (5, 4, 6, 3) and classes == ["a", "b"] and labels.tolist() == [0, 0, 1, 1, 1]
    assert (images[labels == 0][0] == 0).all() and (images[-1] == 200).all()  # solid colours survive bilinear


def test_image_folder_with_train_and_test_splits(tmp_path):
    files = {**folder_files(("a", "b"), 2, prefix="data/train/"), **folder_files(("b", "c"), 1, prefix="data/test/")}
    path = write_tree(tmp_path / "splits", files)
    with pytest.raises(DataError, match="several splits .*test, train"):
        image_data.read_image_folder(path)
    _, labels, classes = image_data.read_image_folder(path, split="test")
    assert classes == ["a", "b", "c"] and labels.tolist() == [1, 2]  # indices shared with train
    with pytest.raises(DataError, match="no split folder 'val'"):
        image_data.read_image_folder(path, split="val")


@pytest.mark.parametrize("name", ["own", "own.tar"])
def test_your_own_class_folders_as_a_data_set(tmp_path, private_cache, name):
    """--data.name images: labels index the sorted class folders, test/ (else val/) is the test split, an archive's
    top folder is no split, and the class names reach the Dataset (for the figures and the confused-pairs table)."""
    files = {**folder_files(("zebra", "ant"), 4, prefix="own/train/"),
             **folder_files(("ant", "zebra"), 2, prefix="own/val/")}
    root = write_tree(tmp_path / name, files)
    ds = data.load("images", data_dir=root if name.endswith(".tar") else Path(root) / "own")
    assert ds.class_names == ("ant", "zebra") and ds.num_classes == 2 and ds.describe()["class_names"] == ["ant", "zebra"]
    assert (len(ds.train), len(ds.test)) == (8, 4) and "test = its val/ split" in ds.source
    # "ant" was written as class 1 of train: values 10..13, now label 0
    assert ds.train.images[ds.train.labels == 0][:, 0, 0, 0].tolist() == [10, 11, 12, 13]
    assert ds.test.labels.tolist() == [0, 0, 1, 1]
    flat = write_tree(tmp_path / "flat.tar", folder_files(("b", "a"), 5, prefix="photos/"))
    ds = image_data.load_image_folder(flat, test_fraction=0.2, val_fraction=0.25)
    assert ds.class_names == ("a", "b") and (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 2)
    assert "test = 20% of train, stratified by class" in ds.source
    both = write_tree(tmp_path / "both", {**files, **folder_files(("ant", "zebra"), 1, prefix="own/test/")})
    ds = image_data.load_image_folder(Path(both) / "own")
    assert len(ds.test) == 2 and "test = its test/ split" in ds.source and "(val/ unused)" in ds.source


def test_your_own_class_folders_errors(tmp_path):
    with pytest.raises(DataError, match="reads your own files: pass a folder or archive of"):
        data.load("images")
    with pytest.raises(DataError, match="not --data.source tfds"):
        data.load("images", source="tfds", data_dir=str(tmp_path))
    one = write_tree(tmp_path / "one", folder_files(("cat",), 2, prefix=""))
    with pytest.raises(DataError, match=r"1 class folder \(cat\); a classifier needs two or more"):
        data.load("images", data_dir=one)
    nested = write_tree(tmp_path / "nested", {**folder_files(("a", "b"), 1, prefix="x/"),
                                                **folder_files(("a", "b"), 1, prefix="y/")})
    with pytest.raises(DataError, match="no train split in .*found 'x', 'y'"):
        data.load("images", data_dir=nested)
    typo = write_tree(tmp_path / "typo", {**folder_files(("cat", "dog"), 2, prefix="train/"),
                                          **folder_files(("cat", "dgo"), 1, prefix="test/")})
    with pytest.raises(DataError, match=r"test/ has class folder\(s\) that train/ lacks \(dgo\): name each class's"):
        data.load("images", data_dir=typo)  # was a third class, never trained, its test images all wrong


def test_read_images_for_predict_turns_phone_photos_upright_and_sorts_naturally(tmp_path):
    upright = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4) * 10  # taller than wide
    Image.fromarray(upright).save(tmp_path / "2.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: turn 90 degrees clockwise to view
    Image.fromarray(np.rot90(upright)).save(tmp_path / "10.png", exif=exif)  # stored on its side
    images, files, sizes = image_data.read_images([tmp_path], (6, 4), 1)
    assert [Path(f).name for f in files] == ["2.png", "10.png"] and sizes == [(6, 4), (6, 4)]
    np.testing.assert_array_equal(images[1, ..., 0], upright)
    np.testing.assert_array_equal(images[0, ..., 0], upright)
    assert image_data.read_images([tmp_path / "2.png"], (3, 2), 3)[0].shape == (1, 3, 2, 3)
    # a drawing app's export: black ink where alpha is 255, clear (black, alpha 0) elsewhere; was all black
    ink = np.zeros((6, 4, 4), np.uint8)
    ink[2:4, 1:3, 3] = 255
    Image.fromarray(ink, "RGBA").save(tmp_path / "drawn.png")
    drawn = image_data.read_images([tmp_path / "drawn.png"], (6, 4), 1)[0][0, ..., 0]
    assert (drawn[2:4, 1:3] == 0).all() and (drawn[:2] == 255).all() and (drawn[4:] == 255).all()


def test_read_images_scales_16_bit_and_float_images_and_says_what_a_folder_also_held(tmp_path):
    """Pillow's convert("L") clipped 16-bit pixels at 255 (an X-ray came out black and white) and made floats 0."""
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(pixels).save(tmp_path / "8bit.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    Image.fromarray(pixels.astype(np.uint16) * 16).save(tmp_path / "12bit.png")  # a 12-bit X-ray, stored in 16
    Image.fromarray(pixels / 255.0).save(tmp_path / "float.tiff")
    frames = [Image.fromarray(pixels), Image.fromarray(255 - pixels)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "notes.txt").write_text("x"), (tmp_path / "sub").mkdir()
    lines = []
    images, files, _ = image_data.read_images([tmp_path, tmp_path / "8bit.png"], (8, 8), 1, log=lines.append)
    assert [Path(f).name for f in files] == ["8bit.png", "12bit.png", "16bit.png", "float.tiff", "moving.gif"]
    for image in images:
        np.testing.assert_allclose(image[..., 0], pixels, atol=1)
    assert lines == [f"note: {tmp_path} also holds 2 entries that are not image files (notes.txt, sub/), left out; "
                     f"subfolders are not searched, and images are {', '.join(image_data.IMAGE_SUFFIXES)}",
                     f"note: {tmp_path / 'moving.gif'} holds 2 frames; the first is read"]
    with pytest.raises(DataError, match="an empty path was given"):  # was the current folder
        image_data.read_images([""], (8, 8), 1)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="gone.png is a link to .*nowhere.png, which is not there"):
        image_data.read_images([tmp_path / "gone.png"], (8, 8), 1)


def test_a_dangling_link_in_a_data_folder_is_no_traceback(tmp_path):
    """The cache's signature stats every file of the folder, the loaders read only images."""
    tree = write_tree(tmp_path / "tree", {**folder_files(("cat", "dog"), 2, prefix="train/"),
                                          **folder_files(("cat", "dog"), 1, prefix="test/")})
    (tmp_path / "tree" / "train" / "cat" / "notes.txt").symlink_to(tmp_path / "nowhere")
    assert image_data._signature([tree]) != image_data._signature([tmp_path / "tree2"])
    assert len(data.load("images", data_dir=tree).train) == 4


def test_missing_empty_and_corrupt_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        image_data.read_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no images in"):
        image_data.read_image_folder(write_tree(tmp_path / "empty.tar", {}))
    (tmp_path / "zero.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read archive"):
        image_data.read_image_folder(tmp_path / "zero.tar.gz")
    files = folder_files(("a",), 2)
    good = write_tree(tmp_path / "ok.tar.xz", files)
    raw = open(good, "rb").read()
    (tmp_path / "cut.tar.xz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match="cannot read archive .*cut.tar.xz"):
        image_data.read_image_folder(tmp_path / "cut.tar.xz")
    raw = open(write_tree(tmp_path / "ok.tar", folder_files(("a", "b"), 2)), "rb").read()
    for cut in (1536, 1500):  # an uncompressed tar cut at a block boundary inside a member, and anywhere
        (tmp_path / "cut.tar").write_bytes(raw[:cut])
        with pytest.raises(DataError, match="cannot read archive .*cut.tar: .*(truncated or corrupt?)"):
            image_data.read_image_folder(tmp_path / "cut.tar")
    files["train/a/bad.png"] = encode(solid(1), "PNG")[:30]  # truncated PNG
    with pytest.raises(DataError, match=r"cannot decode image .*bad\.png") as e:
        image_data.read_image_folder(write_tree(tmp_path / "bad.tar", files))
    assert "\n" not in str(e.value)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 in .*cs.toronto.edu"):
        image_data.load_cifar10(tmp_path / "empty-dir")
    with pytest.raises(DataError, match="--data-dir .* not found.*cs.toronto.edu"):
        image_data.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no GTSRB in .*benchmark.ini.rub.de"):
        image_data.load_gtsrb(tmp_path / "empty-dir")


# --- CIFAR-10 ---------------------------------------------------------------------------

def write_cifar_pickles(folder, n=4, corrupt=None):
    """Tiny official-format batches: image i of a batch has R = i, G = 100 + batch, B = 200, pixel (0, 1) = 7."""
    folder.mkdir(parents=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        chw = np.zeros((n, 3, 32, 32), np.uint8)
        chw[:, 0], chw[:, 1], chw[:, 2] = np.arange(n)[:, None, None], 100 + b, 200
        chw[:, 0, 0, 1] = 7
        batch = {b"batch_label": b"x", b"labels": [(b + i) % 10 for i in range(n)], b"data": chw.reshape(n, 3072)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    if corrupt:
        (folder / corrupt).write_bytes(b"\x80\x02not a pickle")
    return folder


def test_cifar_pickles_rows_are_chw(tmp_path):
    train, test = image_data.read_cifar_pickle(write_cifar_pickles(tmp_path / "cifar-10-batches-py"))
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert train.images.flags.c_contiguous and train.labels.dtype == np.int32
    assert train.images[5, 3, 3].tolist() == [1, 101, 200]  # batch 2, image 1
    assert train.images[0, 0, 1, 0] == 7 and train.images[0, 1, 0, 0] == 0  # row-major: (row 0, col 1)
    assert test.labels.tolist() == [5, 6, 7, 8]


def test_load_cifar10_prefers_official_pickles_and_resizes(tmp_path):
    write_cifar_pickles(tmp_path / "cifar-10-batches-py")
    ds = image_data.load_cifar10(tmp_path, size=(16, 16))
    assert ds.source == f"files:{(tmp_path / 'cifar-10-batches-py').resolve()}"  # official test: no val
    assert ds.train.images.shape == (20, 16, 16, 3) and len(ds.test) == 4 and ds.num_classes == 10
    assert ds.train.images[5, 8, 8].tolist() == [1, 101, 200]


def test_cifar_pickle_errors(tmp_path):
    folder = write_cifar_pickles(tmp_path / "p", corrupt="data_batch_3")
    with pytest.raises(DataError, match="cannot unpickle .*data_batch_3.*cs.toronto.edu"):
        image_data.load_cifar10(folder)
    (folder / "test_batch").write_bytes(pickle.dumps(os.system))  # a pickle that would run code
    (folder / "data_batch_3").unlink()
    write_cifar_pickles(tmp_path / "q")
    (tmp_path / "q" / "test_batch").write_bytes((folder / "test_batch").read_bytes())
    with pytest.raises(DataError, match="refusing to load"):
        image_data.read_cifar_pickle(tmp_path / "q")
    with pytest.raises(DataError, match="batches missing in .*: data_batch_3"):
        image_data.read_cifar_pickle(folder)


def test_cifar_image_tar_holds_out_stratified_val_and_caches(tmp_path, private_cache, monkeypatch):
    files = folder_files(image_data.CIFAR10_CLASSES, per_class=10, fmt="JPEG", size=(32, 32))
    write_tree(tmp_path / "cifar10-train-jpg.tar", files)
    ds = image_data.load_cifar10(tmp_path, test_fraction=0.2, seed=1)
    assert "test = 20% of train, stratified by class, seed 1" in ds.source and ds.val is None
    assert ds.train.images.shape == (80, 32, 32, 3) and ds.test.images.shape == (20, 32, 32, 3)
    assert np.bincount(ds.test.labels).tolist() == [2] * 10
    assert len(set(ds.train.labels[:10].tolist())) > 3  # shuffled: a prefix is not one class
    # JPEG of a solid colour: close to 10 * class + index
    assert np.abs(ds.train.images[:, 16, 16, 0].astype(int) - (ds.train.labels * 10 + 0)).max() <= 12

    assert (private_cache / "cifar10-images-native.npz").is_file()
    monkeypatch.setattr(image_data, "_decode", lambda *a: pytest.fail("decoded despite the cache"))
    again = image_data.load_cifar10(tmp_path, test_fraction=0.2, seed=1)
    assert np.array_equal(again.train.images, ds.train.images) and np.array_equal(again.test.labels, ds.test.labels)
    os.utime(tmp_path / "cifar10-train-jpg.tar", ns=(1, 1))  # a changed archive is decoded again
    with pytest.raises(pytest.fail.Exception):
        image_data.load_cifar10(tmp_path, test_fraction=0.2, seed=1)


def test_cifar_image_folder_with_wrong_classes(tmp_path):
    write_tree(tmp_path / "cifar10", folder_files(("airplane", "dog"), 1, prefix="train/"))
    with pytest.raises(DataError, match="class folders airplane, dog, not CIFAR-10's"):
        image_data.load_cifar10(tmp_path, cache=False)


# --- splits -------------------------------------------------------------------------------

def test_split_random_is_stratified_disjoint_and_deterministic():
    labels = np.repeat([0, 1, 2], [100, 50, 30])
    train_idx, val_idx = image_data.split_random(labels, 0.2, seed=3)
    assert np.bincount(labels[val_idx]).tolist() == [20, 10, 6]
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(180))
    again = image_data.split_random(labels, 0.2, seed=3)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)
    assert not np.array_equal(image_data.split_random(labels, 0.2, seed=4)[1], val_idx)
    assert len(image_data.split_random(50, 0.1)[1]) == 5  # a count: unstratified
    # 45 per class: 4.5 each, rounded alone to 4, held out 40 of 450 for 10%
    val_labels = np.repeat(np.arange(10), 45)[image_data.split_random(np.repeat(np.arange(10), 45), 0.1)[1]]
    assert len(val_labels) == 45 and set(np.bincount(val_labels)) == {4, 5}
    with pytest.raises(UsageError, match="val_fraction"):
        image_data.split_random(labels, 1.0)


def test_split_by_group_keeps_tracks_whole():
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for c in range(5):
        for t in range(rng.integers(4, 12)):
            n = int(rng.integers(5, 31))
            labels += [c] * n
            groups += [c * 1000 + t] * n
    labels, groups = np.array(labels), np.array(groups)
    train_idx, val_idx = image_data.split_by_group(labels, groups, 0.25, seed=7)
    assert not set(groups[train_idx]) & set(groups[val_idx])
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(len(labels)))
    for c in range(5):
        share = np.sum(labels[val_idx] == c) / np.sum(labels == c)
        assert 0.1 < share < 0.4, (c, share)
    again = image_data.split_by_group(labels, groups, 0.25, seed=7)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)
    assert not np.array_equal(image_data.split_by_group(labels, groups, 0.25, seed=8)[1], val_idx)
    # one track per class: nothing can be held out without splitting it
    assert len(image_data.split_by_group([0] * 6 + [1] * 4, [1] * 6 + [2] * 4, 0.2)[1]) == 0


# --- GTSRB ---------------------------------------------------------------------------------

TRAIN = "GTSRB/Final_Training/Images"


def gtsrb_files(classes=(0, 1, 2), tracks=3, per_track=4, csv_for=(0, 2), test=0, size=(10, 12)):
    """Class c, track t, image i is a solid (c, t, i) picture; class 2's csv labels its files 5 (csv wins)."""
    files = {}
    for c in classes:
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for t in range(tracks):
            for i in range(per_track):
                name = f"{t:05d}_{i:05d}.ppm"
                files[f"{TRAIN}/{c:05d}/{name}"] = encode(solid((c, t, i), *size), "PPM")
                rows.append(f"{name};{size[1]};{size[0]};1;1;5;5;{5 if c == 2 else c}")
        if c in csv_for:
            files[f"{TRAIN}/{c:05d}/GT-{c:05d}.csv"] = "\r\n".join(rows).encode() + b"\r\n"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for j in range(test):
        files[f"GTSRB/Final_Test/Images/{j:05d}.ppm"] = encode(solid((j, 99, 99), 20, 20), "PPM")
        rows.append(f"{j:05d}.ppm;20;20;1;1;5;5;{j % 3}")
    if test:
        files[f"GTSRB/{image_data.GTSRB_TEST_CSV}"] = "\n".join(rows).encode()
    return files


def test_read_gtsrb_labels_from_csv_or_folder_and_tracks(tmp_path):
    path = write_tree(tmp_path / "gtsrb.tar.xz", gtsrb_files())
    images, labels, tracks = image_data.read_gtsrb(path, size=(6, 6))
    assert images.shape == (36, 6, 6, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0] * 12 + [1] * 12 + [5] * 12
    assert tracks.tolist()[:5] == [0, 0, 0, 0, 1] and sorted(set(tracks.tolist())) == [0, 1, 2, 1000, 1001, 1002,
                                                                                        2000, 2001, 2002]
    assert images[17, 0, 0].tolist() == [1, 1, 1]  # class 1, track 1, image 1
    folder = write_tree(tmp_path / "extracted", gtsrb_files())
    images2, labels2, tracks2 = image_data.read_gtsrb(folder, size=(6, 6))
    assert np.array_equal(images2, images) and np.array_equal(labels2, labels) and np.array_equal(tracks2, tracks)
    with pytest.raises(DataError, match="no GTSRB test images"):
        image_data.read_gtsrb_test(path, size=(6, 6))


def test_read_gtsrb_test_split(tmp_path):
    files = gtsrb_files(test=5)
    images, labels = image_data.read_gtsrb_test(write_tree(tmp_path / "g.zip", files), size=(8, 8))
    assert images.shape == (5, 8, 8, 3) and labels.tolist() == [0, 1, 2, 0, 1] and images[3, 0, 0, 0] == 3
    del files[f"GTSRB/{image_data.GTSRB_TEST_CSV}"]
    with pytest.raises(DataError, match="no test labels .*GT-final_test.csv"):
        image_data.read_gtsrb_test(write_tree(tmp_path / "nolabels.tar", files), size=(8, 8))


def test_load_gtsrb_val_by_track_or_official_test(tmp_path):
    write_tree(tmp_path / "gtsrb-train-32px.tar.xz", gtsrb_files(classes=range(4), tracks=5, csv_for=()))
    ds = image_data.load_gtsrb(tmp_path, size=(8, 8), test_fraction=0.2, seed=0)
    assert ds.num_classes == 43 and ds.train.images.shape[1:] == (8, 8, 3)
    assert ds.source.endswith("gtsrb-train-32px.tar.xz (test = 20% of train, by track, seed 0)")
    assert len(ds.test) == 16 and np.bincount(ds.test.labels).tolist() == [4] * 4  # one track per class
    track = lambda split: {tuple(im[0, 0, :2]) for im in split.images}  # noqa: E731  (class, track) pixels
    assert not track(ds.train) & track(ds.test)
    with_val = image_data.load_gtsrb(tmp_path, size=(8, 8), val_fraction=0.25, test_fraction=0.2, seed=0)
    assert np.array_equal(with_val.test.labels, ds.test.labels)  # val comes out of what test leaves
    assert len(with_val.val) == 16 and len(with_val.train) == 48 and with_val.source.endswith("by track)")
    assert not track(with_val.train) & track(with_val.val) and not track(with_val.val) & track(with_val.test)
    with pytest.raises(UsageError, match="no test split of its own: hold one out of train with --data.test_fraction"):
        image_data.load_gtsrb(tmp_path, size=(8, 8), test_fraction=0.0)

    write_tree(tmp_path / "with-test", gtsrb_files(test=6))
    ds = image_data.load_gtsrb(tmp_path / "with-test", size=(8, 8))
    assert ds.source == f"files:{(tmp_path / 'with-test' / 'GTSRB').resolve()}"  # official test: no val
    assert len(ds.train) == 36 and ds.test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(UsageError, match="needs size"):
        image_data.load_gtsrb(tmp_path, size=None)


def test_load_gtsrb_official_test_from_the_download_zips(tmp_path):
    files = gtsrb_files(test=4)
    gt = files.pop(f"GTSRB/{image_data.GTSRB_TEST_CSV}")
    write_tree(tmp_path / "GTSRB_Final_Training_Images.zip", {k: v for k, v in files.items() if "Test" not in k})
    write_tree(tmp_path / "GTSRB_Final_Test_Images.zip", {k: v for k, v in files.items() if "Test" in k})
    ds = image_data.load_gtsrb(tmp_path, size=(8, 8))
    assert "test = 20% of train" in ds.source and len(ds.test) == 12  # test images without labels: held-out tracks instead
    write_tree(tmp_path / "GTSRB_Final_Test_GT.zip", {image_data.GTSRB_TEST_CSV: gt})
    ds = image_data.load_gtsrb(tmp_path, size=(8, 8))
    assert ds.source.endswith("GTSRB_Final_Test_Images.zip (official test)")
    assert len(ds.train) == 36 and ds.test.labels.tolist() == [0, 1, 2, 0]


def test_cifar_image_folder_with_its_own_test_split(tmp_path):
    files = {**folder_files(image_data.CIFAR10_CLASSES, 2, prefix="train/"),
             **folder_files(image_data.CIFAR10_CLASSES, 1, prefix="test/")}
    ds = image_data.load_cifar10(write_tree(tmp_path / "cifar10.tar.gz", files), size=(8, 8))
    assert ds.source == f"files:{(tmp_path / 'cifar10.tar.gz').resolve()} (test = its test/ split)"
    assert len(ds.train) == 20 and sorted(ds.test.labels.tolist()) == list(range(10))
    # a val/ folder is the test split, as for --data.name images (it went unused, unsaid), and one folder above
    # the classes is a prefix (it was refused as 'no train/ split')
    renamed = {name.replace("test/", "val/"): data for name, data in files.items()}
    ds = image_data.load_cifar10(write_tree(tmp_path / "val.tar", renamed), size=(8, 8), cache=False)
    assert ds.source.endswith("(test = its val/ split)") and len(ds.test) == 10
    prefixed = {name.replace("train/", "cifar10-images/"): data for name, data in files.items() if "test/" not in name}
    ds = image_data.load_cifar10(write_tree(tmp_path / "prefix.tar", prefixed), size=(8, 8), cache=False)
    assert len(ds.train) + len(ds.test) == 20 and "test = 10% of train" in ds.source


def test_real_gtsrb_splits_by_track(shared_data):
    archive = shared_data / "gtsrb-train-32px.tar.xz"
    if not archive.is_file():
        pytest.skip(f"{archive} not found")
    ds = image_data.load_gtsrb(shared_data, size=(28, 28), test_fraction=0.2, seed=0)
    assert ds.num_classes == 43 and ds.train.images.shape[1:] == (28, 28, 3)
    assert len(ds.train) + len(ds.test) == 19605 and abs(len(ds.test) / 19605 - 0.2) < 0.02
    assert set(np.unique(ds.train.labels).tolist()) == set(range(43)) == set(np.unique(ds.test.labels).tolist())
    # the loader's split, recomputed from the tracks it read: no track on both sides
    with np.load(image_data.cache_dir() / "gtsrb-28x28.npz") as cached:  # what the loader read, tracks included
        arrays = dict(cached)
    train_idx, val_idx = image_data.split_by_group(arrays["train_labels"], arrays["train_tracks"], 0.2, seed=0)
    tracks = arrays["train_tracks"]
    assert not set(tracks[train_idx].tolist()) & set(tracks[val_idx].tolist())
    assert len(set(tracks.tolist())) == 1307
    assert np.array_equal(ds.test.labels, arrays["train_labels"][val_idx])
    # the class names fit the pictures: the blue signs (centre bluer than red) are the blue "mandatory" ones
    centre = np.stack([ds.train.images[ds.train.labels == c][:, 10:18, 10:18].mean((0, 1, 2)) for c in range(43)])
    blue = {ds.class_names[c] for c in np.flatnonzero(centre[:, 2] > centre[:, 0] + 25)}
    assert blue == {"turn right ahead", "turn left ahead", "ahead only", "straight or right", "straight or left",
                    "keep right", "keep left", "roundabout"}
    assert {"stop", "no entry"} <= {ds.class_names[c] for c in np.flatnonzero(centre[:, 0] > centre[:, 2] + 25)}


# --- the datasets as experiments load them ---------------------------------------------------

def test_shipped_samples_load_with_train_val_test():
    cifar = data.load("cifar10", source="sample", val_fraction=0.1)
    assert cifar.source.startswith("sample:flaxlab/assets/cifar10-sample")
    assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (540, 60, 200)
    assert cifar.train.images.shape[1:] == (32, 32, 3) and np.bincount(cifar.val.labels).tolist() == [6] * 10
    assert cifar.source.endswith(" (val = 10% of train, stratified by class)")  # it has a test split of its own
    gtsrb = data.load("gtsrb", source="sample", size=(28, 28), val_fraction=0.2, test_fraction=0.2)
    assert (len(gtsrb.train), len(gtsrb.val), len(gtsrb.test)) == (516, 172, 172)
    assert gtsrb.source.endswith(" (test = 20% of train, by track, seed 0) (val = 20% of the rest of train, by track)")
    assert gtsrb.num_classes == 43 and gtsrb.train.images.shape[1:] == (28, 28, 3)
    resized = data.load("cifar10", source="sample", size=(16, 16))
    assert resized.train.images.shape[1:] == (16, 16, 3) and resized.val is None


def test_dataset_errors_are_one_line():
    with pytest.raises(UsageError, match="val_fraction 0.1 of 688 examples leaves nothing to hold out"):
        data.load("gtsrb", source="sample", val_fraction=0.1)  # 4-image tracks are held out whole
    with pytest.raises(DataError, match="TFDS has no gtsrb"):
        data.load("gtsrb", source="tfds")
    with pytest.raises(DataError, match="needs --data-dir"):
        data.load("cifar10", source="files")


def test_histogram_equalisation_spreads_a_dark_image_and_keeps_its_hues():
    from flaxlab import data
    rng = np.random.default_rng(0)
    dark = (rng.random((2, 16, 16, 1)) * 60 * np.array([1.0, 0.5, 0.25])).astype(np.uint8)  # dim, orange-ish
    out = data.equalize(dark)
    assert out.dtype == np.uint8 and out.shape == dark.shape
    assert out[..., 0].max() >= 250 and out[..., 0].min() <= 5  # the full range is used
    brighter = out.astype(float).sum(-1) >= dark.astype(float).sum(-1)
    assert brighter.mean() > 0.9
    lit = (dark[..., 0] > 20) & (out[..., 0] < 250)  # not clipped at white
    ratio = out[..., 1][lit] / out[..., 0][lit]
    assert lit.sum() > 100 and np.abs(ratio - 0.5).max() < 0.05  # hue kept: the channels scale together
    sample = data.load("gtsrb", source="sample", equalize_histograms=True)
    plain = data.load("gtsrb", source="sample")
    assert sample.train.images.mean() > plain.train.images.mean()


def test_a_cache_that_cannot_be_written_is_gone_without(tmp_path, monkeypatch):
    """$FLAXLAB_CACHE naming a file: the failed write's clean-up raised NotADirectoryError, a traceback."""
    from flaxlab.image_data import _cached
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FLAXLAB_CACHE", str(tmp_path / "a-file"))
    arrays = _cached("mine", (8, 8), [], lambda: {"x": np.arange(3)}, use_cache=True)
    np.testing.assert_array_equal(arrays["x"], np.arange(3))
    monkeypatch.setenv("FLAXLAB_CACHE", str(tmp_path / "cache"))  # and a writable one is read back
    _cached("mine", (8, 8), [], lambda: {"x": np.arange(3)}, use_cache=True)
    assert _cached("mine", (8, 8), [], lambda: 1 / 0, use_cache=True)["x"].tolist() == [0, 1, 2]
