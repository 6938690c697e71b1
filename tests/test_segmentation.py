"""Segmentation: paired and GlaS-release data, the FCNs and U-Net (against PyTorch's layers), per-image
Dice, masks that move with their images, short last batches, and the experiments end to end on the
shipped samples (and on the real GlaS when ../shared is there)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from experiments import EXPERIMENTS
from flaxlab import analysis, data, models, plots, seg_data, train
from flaxlab.errors import DataError, UsageError
from flaxlab.runner import draw_from_checkpoint, evaluate_checkpoint, run_experiment
from test_cli import cli


def _png(array, path, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def _pairs(root, split, count, size=(20, 30), grey=False, rng=np.random.default_rng(0)):
    for i in range(count):
        shape = size if grey else (*size, 3)
        _png(rng.integers(0, 256, shape, dtype=np.uint8), root / split / "images" / f"case{i}.png")
        mask = np.zeros(size, np.uint8)
        mask[: size[0] // 2, : i + 1] = 255
        _png(mask, root / split / "masks" / f"case{i}.png")


def test_paired_layout_resizes_images_bilinear_and_masks_nearest(tmp_path):
    _pairs(tmp_path, "train", 5, grey=True)
    _pairs(tmp_path, "test", 2, grey=True)
    ds = seg_data.load_segmentation("paired", tmp_path, size=(10, 15), val_fraction=0.2, cache=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 1, 2) and ds.is_segmentation
    assert ds.train.images.shape[1:] == (10, 15, 1) and ds.train.labels.shape[1:] == (10, 15)
    assert set(np.unique(ds.train.labels)) <= {0, 1} and ds.num_classes == 2
    native = seg_data.read_pairs(tmp_path)["test"]
    assert native[0].shape == (2, 20, 30, 1) and native[2] == ["case0", "case1"]
    np.testing.assert_array_equal(native[1][1], (np.asarray(Image.open(tmp_path / "test/masks/case1.png")) > 0))


def test_paired_layout_takes_mixed_grey_and_colour_files_and_an_archives_top_folder(tmp_path):
    import tarfile
    _pairs(tmp_path / "mixed", "train", 2, grey=True)
    _pairs(tmp_path / "mixed", "train", 1)  # case0 again, in colour: grey case1 stays
    images = seg_data.read_pairs(tmp_path / "mixed")["train"][0]  # "differ in size (20x30 and 20x30)" before
    assert images.shape == (2, 20, 30, 3) and (images[1, ..., 0] == images[1, ..., 2]).all()
    _pairs(tmp_path / "mine", "mydata", 5)
    with tarfile.open(tmp_path / "mydata.tar", "w") as tar:
        tar.add(tmp_path / "mine" / "mydata", arcname="mydata")
    for source in (tmp_path / "mine" / "mydata", tmp_path / "mydata.tar"):  # "no train split (found 'mydata')"
        ds = seg_data.load_segmentation("paired", source, size=(10, 15), test_fraction=0.2, cache=False)
        assert (len(ds.train), len(ds.test)) == (4, 1)


def test_glas_release_layout_marks_every_gland_id_as_foreground(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("testA", 2), ("testB", 1)):
        for i in range(1, n + 1):
            _png(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8), tmp_path / f"{split}_{i}.bmp", "BMP")
            anno = np.zeros((16, 24), np.uint8)
            anno[2:6, 2:6], anno[8:12, 10:20] = 1, 7  # two glands, instance ids 1 and 7
            _png(anno, tmp_path / f"{split}_{i}_anno.bmp", "BMP")
    splits = seg_data.read_pairs(tmp_path)
    assert sorted(splits) == ["testA", "testB", "train"] and splits["train"][2] == ["train_1", "train_2", "train_3"]
    assert splits["train"][1].sum(axis=(1, 2)).tolist() == [16 + 40] * 3
    ds = seg_data.load_segmentation("glas", tmp_path, size=(8, 12), cache=False)
    assert (len(ds.train), len(ds.test)) == (3, 2) and "test = its testA split" in ds.source
    assert "split 'testB' unused" in ds.source


def test_each_layout_takes_another_layouts_test_split_and_the_choice_is_not_cached(tmp_path, monkeypatch):
    """JSRT radiographs whose test split is named testA are tested on it (it held 10% of train out instead), GlaS
    images in a val split on that; a cache written by one layout does not decide another's splits. A data set's
    archive given to another's experiment (GlaS's colour images to the JSRT U-Net) is refused."""
    monkeypatch.setenv("FLAXLAB_CACHE", str(tmp_path / "cache"))
    _pairs(tmp_path / "glas", "train", 4)
    _pairs(tmp_path / "glas", "testA", 2)
    _pairs(tmp_path / "glas", "val", 3)
    _pairs(tmp_path / "jsrt", "train", 4, grey=True)
    _pairs(tmp_path / "jsrt", "val", 3, grey=True)
    _pairs(tmp_path / "jsrt", "testA", 2, grey=True)
    for layout, test_split, tests in (("glas", "testA", 2), ("jsrt", "val", 3), ("paired", "testA", 2)):
        for _ in range(2):  # the second load reads the cache; paired's of the JSRT folder, written by jsrt's
            folder = tmp_path / ("glas" if layout == "glas" else "jsrt")
            ds = seg_data.load_segmentation(layout, folder, size=(8, 12))
            assert (len(ds.train), len(ds.test)) == (4, tests) and f"test = its {test_split} split" in ds.source
            assert ds.test.names == tuple(f"case{i}" for i in range(tests))  # the figures' names, cached too
    (tmp_path / "jsrt" / "val").rename(tmp_path / "jsrt-val")
    (tmp_path / "glas" / "testA").rename(tmp_path / "glas-testA")
    for layout, test_split, tests in (("jsrt", "testA", 2), ("glas", "val", 3)):
        ds = seg_data.load_segmentation(layout, tmp_path / layout, size=(8, 12), cache=False)
        assert (len(ds.train), len(ds.test)) == (4, tests) and f"test = its {test_split} split" in ds.source
        assert "unused" not in ds.source
    with pytest.raises(DataError, match="holds colour images, and jsrt's are greyscale: is it another data set's"):
        seg_data.load_segmentation("jsrt", tmp_path / "glas", size=(8, 12))
    with pytest.raises(DataError, match="holds greyscale images, and glas's are colour"):
        seg_data.load_segmentation("glas", tmp_path / "jsrt", size=(8, 12))
    held = seg_data.load_segmentation("glas", tmp_path / "glas", size=(20, 30), val_fraction=0.5)
    assert len(held.val) == 2 and set(held.train.names + held.val.names) == {f"case{i}" for i in range(4)}
    for split in (held.train, held.val):  # a held-out image keeps its name: case i's mask is i + 1 columns wide
        assert [int(n[4:]) + 1 for n in split.names] == [int(m[0].sum()) for m in split.labels]
    assert held.val.name(1) == f"1 ({held.val.names[1]})" and data.Split(held.val.images, held.val.labels).name(1) == "1"
    with pytest.raises(DataError, match="2 images but 1 names"):
        data.Split(held.val.images, held.val.labels, ("case0",))


def test_bad_segmentation_data_is_one_clear_error(tmp_path):
    _pairs(tmp_path, "train", 2)
    (tmp_path / "train" / "masks" / "case1.png").unlink()
    with pytest.raises(DataError, match="case1.png has no mask"):
        seg_data.read_pairs(tmp_path)
    (tmp_path / "train" / "images" / "case1.png").write_bytes(b"not a png")
    _png(np.zeros((20, 30), np.uint8), tmp_path / "train" / "masks" / "case1.png")
    with pytest.raises(DataError, match="cannot decode .*case1.png"):
        seg_data.read_pairs(tmp_path)
    _png(np.zeros((5, 5, 3), np.uint8), tmp_path / "train" / "images" / "case1.png")
    for size in (None, (8, 8)):  # resized alike, a swapped mask went unsaid
        with pytest.raises(DataError, match="masks/case1.png is 30x20 and its image train/images/case1.png 5x5: a "
                                            r"mask is its image's size \(swapped or mismatched files\?\)"):
            seg_data.read_pairs(tmp_path, size)
    with pytest.raises(DataError, match="no images with masks"):
        seg_data.read_pairs(tmp_path / "train" / "images")


def test_a_jpeg_masks_compression_noise_is_not_foreground(tmp_path):
    """Any non-zero value is foreground, but JPEG smears a mask's edges into in-between values."""
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 10:30] = 255
    _png(np.zeros((32, 48, 3), np.uint8), tmp_path / "train" / "images" / "case0.png")
    _png(mask, tmp_path / "train" / "masks" / "case0.jpg", "JPEG")
    assert (np.asarray(Image.open(tmp_path / "train" / "masks" / "case0.jpg")) > 0).sum() > (mask > 0).sum()
    np.testing.assert_array_equal(seg_data.read_pairs(tmp_path)["train"][1][0], mask > 0)


def test_shipped_samples_load_as_the_experiments_want_them():
    glas = data.load("glas", source="sample", size=(128, 128), val_fraction=0.15)
    assert glas.train.images.shape[1:] == (128, 128, 3) and len(glas.test) == 6 and len(glas.val) == 2
    jsrt = data.load("jsrt", source="sample", val_fraction=0.15)
    assert jsrt.train.images.shape[1:] == (256, 256, 1) and len(jsrt.test) == 6
    assert 0.2 < jsrt.train.labels.mean() < 0.5  # lungs are about a third of a chest X-ray


def test_real_glas_and_jsrt_have_their_documented_sizes(shared_data):
    glas = data.load("glas", source="files", data_dir=shared_data)
    jsrt = data.load("jsrt", source="files", data_dir=shared_data)
    assert (len(glas.train), len(glas.test)) == (85, 60) and (len(jsrt.train), len(jsrt.test)) == (174, 22)


def test_dice_is_the_per_image_f1_of_the_foreground():
    rng = np.random.default_rng(2)
    predicted, target = rng.random((6, 9, 9)) > 0.5, rng.random((6, 9, 9)) > 0.6
    predicted[5], target[5] = False, False  # both empty: a perfect score
    tp = (predicted & target).sum((1, 2))
    precision, recall = tp / np.maximum(predicted.sum((1, 2)), 1), tp / np.maximum(target.sum((1, 2)), 1)
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    f1[5] = 1.0
    np.testing.assert_allclose(analysis.dice_per_image(predicted, target), f1, rtol=1e-12)
    np.testing.assert_allclose(train.dice_scores(jnp.asarray(predicted, jnp.int32), jnp.asarray(target, jnp.int32)),
                               f1, rtol=1e-6)


def test_a_mask_all_foreground_is_drawn_white(tmp_path, monkeypatch):
    """imshow scaled a constant mask's one value to black: an FCN's first epoch, every pixel gland (DSC 0.92 in
    its title), was drawn as if it had found nothing."""
    import matplotlib.pyplot as plt
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    masks, everything = np.zeros((2, 8, 8), np.uint8), np.ones((2, 8, 8), np.uint8)
    plots.segmentation_extremes(images, masks, everything, np.array([0.9, 0.1]), tmp_path / "p.png", "t", count=1)
    axes = drawn[0].axes  # rows of image, ground truth, prediction
    for truth, prediction in zip(axes[1::3], axes[2::3]):
        assert truth.images[0].get_clim() == prediction.images[0].get_clim() == (0, 1)
        assert prediction.images[0].norm(1) == 1.0 and truth.images[0].norm(0) == 0.0  # white, black


def test_segmentation_sums_average_pixels_per_image_and_skip_masked_images():
    logits = jax.random.normal(jax.random.key(0), (3, 4, 5, 2))
    masks = jax.random.bernoulli(jax.random.key(1), 0.4, (3, 4, 5)).astype(jnp.uint8)
    sums = train.segmentation_sums(logits, masks, jnp.array([True, True, False]))
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, masks.astype(jnp.int32))
    np.testing.assert_allclose(sums["loss"], per_pixel[:2].mean(axis=(1, 2)).sum(), rtol=1e-6)
    assert float(sums["count"]) == 2
    np.testing.assert_allclose(sums["dice"], analysis.dice_per_image(np.asarray(logits.argmax(-1))[:2],
                                                                     np.asarray(masks)[:2]).sum(), rtol=1e-6)


def test_transposed_conv_and_upsampling_match_pytorch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal((2, 5, 6, 4)).astype(np.float32)
    layer = models.ConvTranspose(3, 2)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    ours = np.asarray(layer.apply(variables, jnp.asarray(x)))
    reference = torch.nn.ConvTranspose2d(4, 3, 2, stride=2)
    with torch.no_grad():  # torch's weight is (in, out, kh, kw)
        reference.weight.copy_(torch.from_numpy(np.array(variables["params"]["kernel"]).transpose(2, 3, 0, 1).copy()))
        reference.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
        theirs = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    bound = 1 / np.sqrt(3 * 2 * 2)  # torch's init: fan-in = out_channels * k * k
    assert np.abs(variables["params"]["kernel"]).max() <= bound
    for method in ("bilinear", "nearest"):
        up = torch.nn.Upsample(scale_factor=2, mode=method, **({"align_corners": False} if method == "bilinear" else {}))
        theirs = up(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(models.Upsample(method).apply({}, jnp.asarray(x)), theirs, atol=1e-5)


@pytest.mark.parametrize("name,shape,weights", [("fcn", (128, 128, 3), 8_634), ("fcn2", (128, 128, 3), 11_746),
                                                ("unet", (256, 256, 1), 13_394_242)])
def test_segmentation_networks_keep_the_input_size(name, shape, weights):
    model = models.make_model({"name": name}, 2)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))
    assert models.count_params(variables["params"]) == weights
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *shape))), variables)
    assert out.shape == (2, *shape[:2], 2)


def test_a_kept_short_last_batch_trains_on_every_image_once():
    dataset = data.load("glas", source="sample", size=(32, 32))
    model = models.make_model({"name": "fcn"}, 2)
    trainer = train.Trainer(model, {"name": "adam", "lr": 1e-3}, batch_size=4, drop_last=False)
    states = trainer.init(jax.random.key(0)[None], dataset.train.images.shape[1:])
    device = {name: data.to_device(getattr(dataset, name)) for name in ("train", "test")}
    trainer.compile(states, device["train"], device["test"])
    assert trainer.steps_per_epoch(len(dataset.train)) == 3  # 12 images: 4 + 4 + 4; 10 would be 4 + 4 + 2
    states, sums = trainer.train_epoch(states, device["train"], jax.random.key(1)[None], 1)
    assert float(sums["count"][0]) == len(dataset.train) and int(states.step[0]) == 3
    small = data.Split(dataset.train.images[:10], dataset.train.labels[:10])
    trainer = train.Trainer(model, {"name": "adam", "lr": 1e-3}, batch_size=4, drop_last=False)
    trainer.compile(states, data.to_device(small), device["test"])
    states, sums = trainer.train_epoch(states, data.to_device(small), jax.random.key(1)[None], 1)
    assert float(sums["count"][0]) == 10 and trainer.images_per_epoch(10) == 10


def _quiet(config, tmp_path, **fields):
    config = {**config, "epochs": 2, "checkpoint_every": 0, **fields}
    return run_experiment(config, workdir=tmp_path / config["name"], progress=False, log=lambda *a: None)


def test_glas_fcn2_with_flips_writes_dice_tables_and_prediction_figures(tmp_path, monkeypatch):
    titles, draw = [], plots.feature_maps_figure
    monkeypatch.setattr(plots, "feature_maps_figure", lambda *a: titles.append(a[3]) or draw(*a))
    result = _quiet(EXPERIMENTS["glas_fcn2_flips"](), tmp_path, features={"layer": "", "image": 4})
    selected = result.info["selected_epochs"][0]  # the state the figures show
    assert titles == [f"glas_fcn2_flips (seed 0, selected epoch {selected}): Conv_0 on test image 4 (testA_5)"]
    files = {p.name for p in result.workdir.iterdir()}
    assert {"predictions.png", "overlay.png", "scores.json", "curves.png", "filters.png", "features.png"} <= files
    assert "confusion.png" not in files
    written = json.loads((result.workdir / "scores.json").read_text())
    scores = written["per_seed"]
    assert len(scores) == 1 and len(scores[0]) == 6 and written["test_images"] == [f"testA_{i}" for i in range(1, 7)]
    text = (result.workdir / "results.md").read_text()
    assert "Per-image DSC on the test split (6 images)" in text and "val dice at selected epoch" in text
    history = result.history
    assert len(history["val_dice"]) == 2 and np.mean(scores[0]) == pytest.approx(
        history["test_dice"][history["epoch"].index(result.info["selected_epochs"][0])][0], abs=1e-5)
    assert Image.open(result.workdir / "predictions.png").size[1] > 1000  # six rows
    overlays, overlay = [], plots.mask_overlay  # `figures --image 2` redraws the mask too, from the checkpoint
    monkeypatch.setattr(plots, "mask_overlay", lambda *a: overlays.append(a) or overlay(*a))
    said = []
    draw_from_checkpoint(result.workdir, image=2, log=said.append)
    (image, mask, prediction, path, title, score, label), = overlays
    assert path == result.workdir / "overlay-2.png" and path.exists() and title.endswith("test: image 2 (testA_3)")
    assert score == pytest.approx(scores[0][2], abs=1e-6) and label == "DSC" and prediction.shape == mask.shape
    assert said[0].startswith(f"drew {result.workdir}/filters.png, {result.workdir}/features-Conv_0-2.png and "
                              f"{result.workdir}/overlay-2.png from the best-validation state")
    with pytest.raises(UsageError, match="^--image must not be negative, got -1$"):  # not --features.image
        draw_from_checkpoint(result.workdir, image=-1)
    glas = data.load("glas", source="sample", size=tuple(result.info["data"]["image_shape"][:2]))
    train, test = (data.Split(s.images[..., :1], s.labels) for s in (glas.train, glas.test))
    grey = data.Dataset("grey", "greyscale", train, test, num_classes=2, val=test)
    with pytest.raises(UsageError, match=r"trained on sample:.*, \d+x\d+x3 images of 2 classes, and the data given is "
                                         r"\d+x\d+x1 images of 2 classes \(greyscale\)"):  # "the checkpoint is damaged"
        evaluate_checkpoint(result.workdir, dataset=grey, log=lambda *a: None)


def test_unet_trials_table_reports_per_image_f1_std_and_min(tmp_path):
    from flaxlab import sweep
    config = {**EXPERIMENTS["jsrt_unet_trials"](), "epochs": 1}
    config["model"] = {**config["model"], "width": 4, "depth": 2}
    result = sweep.run_sweep(config, workdir=tmp_path, progress=False, log=lambda *a: None)
    assert [r["variant"] for r in result.rows] == ["bilinear, ReLU", "nearest, ReLU", "bilinear, ELU"]
    assert len(result.programs) == 3 and all(r["seeds"] == 2 for r in result.rows)
    text = (tmp_path / "results.md").read_text()
    assert "final test dice (mean ± std)" in text and "| std over test images | min over test images |" in text
    assert text.count("| mean ± std |") == 3 and "sample standard deviation over a variant's trials (n - 1)" in text


@pytest.mark.parametrize("args,message", [
    (["run", "mnist_cnn", "--best_metric", "val_dice", "--data.val_fraction", "0.1"], "val_dice is for segmentation"),
    (["run", "jsrt_unet", "--model.upsample", "cubic"], "unknown upsampling 'cubic'"),
    (["run", "glas_fcn", "--data.source", "tfds"], "TFDS has no glas"),
    (["run", "glas_fcn", "--data.val_fraction", "0.01"], "leaves nothing to hold out"),
    (["run", "glas_fcn", "--features.image", "60"], "beyond the test split"),
    (["run", "jsrt_unet", "--data.size", "20,20"],  # 4 pools: 20 -> 10 -> 5 -> 2, up to 4 beside a 5x5 skip
     "unet cannot take 20x20 images"),
    (["run", "jsrt_unet", "--data.size", "20,20"], "; sides that are multiples of 16 fit, e.g. --data.size 32,32"),
    (["run", "glas_fcn", "--data.size", "9,9"], "fcn maps 9x9 images to 8x8 masks; sides that are multiples of 4 "
                                                "fit, e.g. --data.size 12,12"),
])
def test_bad_segmentation_options_are_one_line_exit_2(tmp_path, args, message):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_paired_data_needs_a_folder(tmp_path):
    out = cli("run", "glas_fcn", "--data.name", "paired", cwd=tmp_path)
    assert out.returncode == 2 and "no sample of 'paired'" in out.stderr and "--data-dir" in out.stderr


def test_fcn2_segments_real_glands(shared_data, tmp_path):
    config = {**EXPERIMENTS["glas_fcn2_flips"](), "patience": 0}
    dataset = data.load(data_dir=shared_data, **{**config["data"], "source": "files"})
    result = run_experiment({**config, "epochs": 15}, workdir=tmp_path / "run", dataset=dataset, progress=False,
                            log=lambda *a: None)
    assert max(result.history["test_dice"][e][0] for e in range(15)) > 0.7  # 100 epochs: see the README
