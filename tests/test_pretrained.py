"""ResNet-18 and VGG-19 with torchvision's structure: weights converted from a PyTorch state_dict give
PyTorch's outputs (random weights and batch-norm statistics, offline), resizing happens in the model."""
import urllib.error

import jax
import numpy as np
import pytest

from flaxlab import pretrained
from flaxlab.errors import DataError, UsageError
from flaxlab.models import count_params

torch = pytest.importorskip("torch", reason="the reference networks are PyTorch")
torch_models = pytest.importorskip("torch_models")


def _torch_outputs(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def _check(arch, torch_model, flax_model, path, size):
    x = np.random.default_rng(0).random((2, size, size, 3), np.float32)
    variables = pretrained.convert_state_dict(pretrained.read_state_dict(path), arch)
    fresh = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), x))
    assert jax.tree.structure(fresh) == jax.tree.structure(variables)
    expected = _torch_outputs(torch_model, x)
    np.testing.assert_allclose(flax_model.apply(variables, x), expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-4)


def test_resnet18_state_dict_from_pth_gives_torchs_outputs(tmp_path):
    torch.manual_seed(0)
    model = torch_models.randomize_batch_norm(torch_models.ResNet18(10)).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")  # num_batches_tracked included: dropped
    _check("resnet18", model, pretrained.ResNet18(10, input_size=0, normalize=False), tmp_path / "resnet18.pth", 64)


def test_vgg19_state_dict_from_npz_gives_torchs_outputs(tmp_path):
    """At 64x64 the last maps are 2x2, which the 7x7 adaptive pool spreads unevenly: the permutation of the
    first classifier weight from torch's C,H,W order to H,W,C matters (1e-3 off without it)."""
    torch.manual_seed(0)
    model = torch_models.VGG19(10, hidden=64).eval()
    np.savez(tmp_path / "vgg19.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
    _check("vgg19", model, pretrained.VGG19(10, input_size=0, normalize=False, hidden=64), tmp_path / "vgg19.npz", 64)


def test_full_size_networks_have_torchvisions_weight_counts():
    for model, count in ((pretrained.ResNet18(), 11_689_512), (pretrained.VGG19(), 143_667_240)):
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32)))
        assert count_params(shapes["params"]) == count


def test_a_fresh_init_is_torchvisions():
    """From scratch, the networks start as torchvision's (`weights=None`) do: conv kernels N(0, 2 / fan-out),
    VGG's linear layers N(0, 0.01^2) with zero biases, ResNet's fc at torch.nn.Linear's default."""
    images = np.zeros((1, 32, 32, 3), np.float32)
    vgg = pretrained.VGG19(10, input_size=0, hidden=64).init(jax.random.key(0), images)["params"]
    resnet = pretrained.ResNet18(10, input_size=0).init(jax.random.key(0), images)["params"]
    convs = [layer["kernel"] for name, layer in vgg.items() if name.startswith("features")]
    convs += [resnet["conv1"]["kernel"], resnet["layer3_0"]["conv2"]["kernel"],
              resnet["layer4_0"]["downsample_0"]["kernel"]]
    for kernel in map(np.asarray, convs):
        expected = np.sqrt(2 / (kernel.shape[0] * kernel.shape[1] * kernel.shape[3]))
        assert abs(kernel.std() / expected - 1) < 0.1 and abs(kernel.mean()) < 0.1 * expected, kernel.shape
    assert len(convs) == 16 + 3
    for name in ("classifier_0", "classifier_3", "classifier_6"):
        assert abs(np.asarray(vgg[name]["kernel"]).std() / 0.01 - 1) < 0.1, name
        assert not np.asarray(vgg[name]["bias"]).any() and not np.asarray(vgg["features_0"]["bias"]).any()
    bound = 1 / np.sqrt(512)
    for leaf in (np.asarray(resnet["fc"]["kernel"]), np.asarray(resnet["fc"]["bias"])):
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound


def test_images_are_resized_and_normalised_inside_the_model():
    x = np.random.default_rng(1).random((2, 32, 32, 3), np.float32)
    ours = np.asarray(pretrained.prepare_input(x, 224, True))
    resized = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(224, 224),
                                              mode="bilinear", align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pretrained.IMAGENET_MEAN, pretrained.IMAGENET_STD))
    np.testing.assert_allclose(ours, ((resized - mean) / std).numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_pretrained_weights_fill_all_but_a_new_head(tmp_path):
    torch.manual_seed(0)
    torch.save(torch_models.ResNet18(1000).state_dict(), tmp_path / "r.pth")
    loaded = pretrained.pretrained_variables("resnet18", tmp_path / "r.pth")
    model = pretrained.ResNet18(10, input_size=0)
    fresh = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    merged = pretrained.merge_pretrained(fresh, loaded, "resnet18")
    np.testing.assert_array_equal(merged["params"]["conv1"]["kernel"], loaded["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(merged["batch_stats"]["layer4_1"]["bn2"]["var"],
                                  loaded["batch_stats"]["layer4_1"]["bn2"]["var"])
    assert merged["params"]["fc"]["kernel"].shape == (512, 10)  # the new head keeps its fresh init


def test_missing_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*_):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(pretrained.urllib.request, "urlretrieve", offline)
    monkeypatch.setenv("FLAXLAB_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="resnet18-f37072fd.pth on a machine with internet and pass it with --model.weights"):
        pretrained.pretrained_variables("resnet18")
    assert not list(tmp_path.rglob("*.part"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read weights"):
        pretrained.read_state_dict(tmp_path / "bad.pth")
    with pytest.raises(DataError, match="does not exist"):
        pretrained.read_state_dict(tmp_path / "none.npz")
    with pytest.raises(DataError, match="is a folder"):
        pretrained.read_state_dict(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not an archive")  # numpy advised unpickling it
    with pytest.raises(DataError, match="bad.npz: not an .npz archive"):
        pretrained.read_state_dict(tmp_path / "bad.npz")
    np.savez(tmp_path / "objects.npz", conv1=np.array([{"weight": 1}], dtype=object))
    with pytest.raises(DataError, match="objects.npz: it holds pickled objects, not arrays"):
        pretrained.read_state_dict(tmp_path / "objects.npz")
    torch = pytest.importorskip("torch")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")  # an AttributeError's traceback once
    with pytest.raises(DataError, match="list.pth: it holds a list, not a state dict"):
        pretrained.read_state_dict(tmp_path / "list.pth")
    # torch's own messages: advice to unpickle (with terminal colour codes), a cut sentence, a bare KeyError number
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    whole_model = (r"module.pth: it holds pickled Python objects \(a whole model, saved with torch.save\(model\)\?\), "
                   r"not only tensors: save model.state_dict\(\) instead$")
    with pytest.raises(DataError, match=whole_model):
        pretrained.read_state_dict(tmp_path / "module.pth")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "cut.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "cut.pth").read_bytes()[:300])
    with pytest.raises(DataError, match=r"cut.pth: not a whole file of torch.save's \(cut short or damaged\)$"):
        pretrained.read_state_dict(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_text("junk\n")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(5000))  # was "a whole model"
    with pytest.raises(DataError, match="random.pth: not a file torch.save wrote, or a damaged one$"):
        pretrained.read_state_dict(tmp_path / "random.pth")
    with pytest.raises(DataError, match="junk.pth: not a file torch.save wrote, or a damaged one$"):
        pretrained.read_state_dict(tmp_path / "junk.pth")


def test_weights_files_of_another_network_are_refused_and_wrapped_ones_read(tmp_path, monkeypatch):
    """A ResNet-34's file filled a ResNet-18 and its extra blocks went unused, unsaid; a bfloat16 file was a
    TypeError's traceback; a DataParallel or training-script checkpoint, a list of every module as missing."""
    torch.manual_seed(0)
    state = torch_models.ResNet18(1000).state_dict()
    model = pretrained.ResNet18(10, input_size=0)
    fresh = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))

    def merged(saved):
        torch.save(saved, tmp_path / "w.pth")
        return pretrained.merge_pretrained(fresh, pretrained.pretrained_variables("resnet18", tmp_path / "w.pth"),
                                           "resnet18")
    deeper = {**state, **{k.replace("layer1.1.", "layer1.2."): v for k, v in state.items() if "layer1.1." in k}}
    with pytest.raises(DataError, match="the resnet18 weights hold layer1.2, which resnet18 has not: a file of "
                                        "another network"):
        merged(deeper)
    expected = merged(state)
    wrapped = {"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}
    jax.tree.map(np.testing.assert_array_equal, merged(wrapped), expected)
    half = merged({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()})
    np.testing.assert_allclose(half["params"]["conv1"]["kernel"], expected["params"]["conv1"]["kernel"], rtol=1e-2)
    with pytest.raises(DataError, match=r"pretrained layer2.0.conv1.weight has shape \(128, 64, 5, 5\), the "
                                        r"model's \(128, 64, 3, 3\)$"):  # as the file names and holds it
        merged({**state, "layer2.0.conv1.weight": torch.zeros(128, 64, 5, 5)})
    with pytest.raises(DataError, match=r"pretrained fc.weight has shape \(1000, 256\), the model's \(10, 512\)"):
        merged({**state, "fc.weight": torch.zeros(1000, 256)})  # was kept as a new head's
    with pytest.raises(DataError, match="fc.weight has 1000 classes, its fc.bias 7: a damaged file"):
        merged({**state, "fc.bias": torch.zeros(7)})
    with pytest.raises(DataError, match="layer1.0.bn1.running_var holds NaN or infinite values"):
        merged({**state, "layer1.0.bn1.running_var": torch.full((64,), float("nan"))})
    vgg = {"features.0.weight": torch.zeros(64, 3, 3, 3), "classifier.0.weight": torch.zeros(4096, 512)}
    with pytest.raises(DataError, match=r"lack bn1, conv1, .*; hold classifier\.0, features\.0, which resnet18 has "
                                        "not: a file of another network"):  # only the batch norms it lacked were named
        merged(vgg)
    with pytest.raises(DataError, match=r"pretrained conv1 is one tensor of shape \(8,\), where the model has "
                                        r"conv1\.weight"):  # the head's check made it an AttributeError once
        pretrained.merge_pretrained({"params": {"conv1": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}}},
                                    {"params": {"conv1": np.zeros(8, np.float32)}}, "resnet18")
    with pytest.raises(DataError, match=r"classifier.0.weight has shape \(4096, 512\): torchvision's VGG-19 takes "
                                        "512x7x7 = 25088"):  # a CIFAR VGG's: a reshape's traceback
        pretrained.convert_state_dict({k: v.numpy() for k, v in vgg.items()}, "vgg19")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pretrained.fetch_weights("resnet18", "~/w.pth") == tmp_path / "w.pth"
    monkeypatch.setenv("FLAXLAB_CACHE", str(tmp_path / "w.pth"))  # a file: mkdir's traceback
    with pytest.raises(UsageError, match="set FLAXLAB_CACHE to a writable folder, or pass --model.weights PATH"):
        pretrained.fetch_weights("resnet18")


@pytest.mark.parametrize("name", ["tdt4265_resnet18", "ai604_vgg19_transfer"])  # a run, a sweep
def test_missing_weights_write_no_run_folder(tmp_path, monkeypatch, name):
    """A sweep read its weights file once its folder held config.json, which `runs` then listed as stopped."""
    from experiments import EXPERIMENTS
    from flaxlab.config import with_field
    from flaxlab.errors import UsageError
    from flaxlab.runner import run_experiment
    from flaxlab.sweep import run_sweep
    config = with_field(EXPERIMENTS[name](), "model.weights", str(tmp_path / "none.pth"))
    train = run_sweep if config.get("sweep") else run_experiment
    with pytest.raises((DataError, UsageError), match="none.pth does not exist"):
        train(config, workdir=tmp_path / "run", progress=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_fine_tuning_experiment_starts_from_the_weights_file(tmp_path):
    """tdt4265_resnet18 end to end on the CIFAR-10 sample (at 32x32 instead of 224, for the CI's CPU), from a
    weights file: the trained conv1 started from the file's, and the first and last conv maps are drawn."""
    from experiments import EXPERIMENTS
    from flaxlab import data
    from flaxlab.config import with_field
    from flaxlab.runner import run_experiment, set_up
    torch.manual_seed(0)
    torch.save(torch_models.randomize_batch_norm(torch_models.ResNet18(1000)).state_dict(), tmp_path / "r.pth")
    config = EXPERIMENTS["tdt4265_resnet18"]()
    for key, value in {"model.weights": str(tmp_path / "r.pth"), "model.input_size": 32, "epochs": 1,
                       "batch_size": 16}.items():
        config = with_field(config, key, value)
    dataset = data.load(**{**config["data"], "source": "sample"})
    start = set_up(config, dataset).states
    expected = np.asarray(torch.load(tmp_path / "r.pth")["conv1.weight"]).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(start.params["conv1"]["kernel"][0], expected)
    result = run_experiment(config, workdir=tmp_path / "run", dataset=dataset, progress=False, log=lambda *a: None)
    assert {"features.png", "features-last.png", "filters.png", "confusion.png"} <= {p.name for p in result.workdir.iterdir()}
    assert result.history["test_accuracy"][-1][0] > 0.1
    # the trained run needs its checkpoint, not the file it started from (evaluate and predict read it again)
    from flaxlab.runner import evaluate_checkpoint
    (tmp_path / "r.pth").rename(tmp_path / "moved.pth")
    scores = evaluate_checkpoint(tmp_path / "run", dataset=dataset, log=lambda *a: None)
    assert scores["test"]["accuracy"] == pytest.approx(result.history["test_accuracy"][-1], abs=1e-6)
