"""The command line as a user meets it: the main job, its files, and one-line errors with exit code 2."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args,message", [
    (["run", "mnist_cnnn"], "unknown experiment 'mnist_cnnn' (did you mean mnist_cnn?); known: ai604_cnn_bn"),
    (["run", "mnist_cnn", "--optimiser.lr", "0.1"], "unknown option '--optimiser.lr' (did you mean --optimizer.lr?)"),
    (["run", "mnist_cnn", "--optimizer.name=sdg"], "unknown value 'sdg' for --optimizer.name (did you mean sgd?); "
                                                  "choose one of sgd, adam, rprop"),
    (["sweep", "mnist_cnn", "--grid", "dropuot=0,0.1"], "unknown field 'dropuot' in --grid (did you mean dropout?)"),
    # what other frameworks call a field
    (["run", "mnist_cnn", "--learning-rate", "0.1"], "unknown option '--learning_rate' (did you mean --optimizer.lr?)"),
    (["run", "mnist_cnn", "--optimizer", "adam"], "unknown option '--optimizer' (did you mean --optimizer.name?)"),
    (["run", "mnist_cnn", "--num_epochs", "3"], "unknown option '--num_epochs' (did you mean --epochs?)"),
    (["sweep", "mnist_cnn", "--grid", "learning_rate=0.1,0.2"],
     "unknown field 'learning_rate' in --grid (did you mean optimizer.lr?)"),
    (["run", "xyz"], "unknown experiment 'xyz'; known:"),  # nothing near: no guess
    (["run", "mnist_cnn", "--name", "adam"], "--name is ambiguous: --data.name, --model.name, --optimizer.name"),
    (["run", "mnist_cnn", "--optimizer.name", "adam", "--momentum", "0.9"],
     "--optimizer.momentum is for --optimizer.name sgd; adam does not use it"),  # as its full name is
    (["run", "mnist_cnn", "--epochs", "ten"], "bad value 'ten' for epochs"),
    (["run", "mnist_cnn", "--batch-size", "0"], "--batch_size must be positive"),
    (["run", "mnist_cnn", "--batch-size", "100000"], "larger than the training set"),
    (["run", "mnist_cnn", "--model.activation", "swish"], "unknown value 'swish'"),
    (["run", "mnist_cnn", "--optimizer.momentum", "1.5"], "--optimizer.momentum must be below 1, got 1.5"),
    (["run", "mnist_cnn", "--model.features", "0,4"], "--model.features must be positive sizes, got 0,4"),
    (["run", "jsrt_unet", "--model.depth", "0"], "--model.depth must be positive, got 0"),
    (["run", "mnist_cnn", "--data-dir", "no/such/folder"], "is not a folder"),
    (["run", "mnist_cnn", "--data.source", "files"], "needs --data-dir"),
    (["run", "mnist_cnn", "--data.test_fraction", "0.2"], "MNIST has its own test split"),  # was ignored
    (["run", "mnist_cnn", "--augment.crop", "28"], "--augment.crop 28 shifts images by up to 28 pixels"),
    (["run", "mnist_cnn", "--model.features", "8,,16"], "bad value '8,,16' for model.features: an empty item"),
    (["run", "mnist_cnn", "--optimizer.lr", "inf"], "--optimizer.lr must be a finite number, got inf"),  # ran all-NaN
    (["run", "mnist_cnn", "--augment.rotate", "nan"], "--augment.rotate must be a finite number, got nan"),
    (["run", "mnist_cnn", "--augment.rotate", "400"], "--augment.rotate is the largest angle either way, at most 180"),
    (["run", "mnist_cnn", "stray"], "unexpected argument 'stray'"),
    (["run", "mnist_cnn", "--grid", "lr=0.1,0.2"], "--grid: a grid of variants is sweep's: python -m experiments"),
    (["show", "mnist_cnn", "--data-dir", "x"], "--data-dir: this command reads no data"),  # was "'--data_dir'"
    (["run", "mnist_cnn", "--data_dir=x"], "--data_dir: the option is spelt --data-dir"),
    (["evaluate", "--workdir", "w", "--data_dir", "x"], "--data_dir: the option is spelt --data-dir"),  # unexpected
    (["run", "mnist_cnn", "--epochs"], "needs a value"),
    (["train", "mnist_cnn"], "invalid choice: 'train'"),
    (["run"], "required: experiment"),
    (["summary", "resnet1000"], "unknown model or experiment 'resnet1000'"),
    (["layers", "--seed", "-1"], "--seed must not be negative, got -1"),
    (["summary", "tdt4265_cnn", "--input-shape", "4,4,3"],
     "cannot take --input-shape 4,4,3: its convolutions and pools shrink them to nothing; it takes e.g. --input-shape 8,8,3"),
    (["summary", "mnist_cnn", "--model.features", "8,16,32,64,128,256"],  # a traceback: no --data.size to name
     "mnist_cnn cannot take 28x28 images: its convolutions and pools shrink them to nothing; it takes e.g."),
    (["run", "mnist_cnn", "--seed", "4294967295", "--seeds", "2"],  # 2**32 was seed 0 again, 2**64 a traceback
     "--seed 4294967295 with --seeds 2: the seeds must stay below 2**32"),
    (["summary", "mnist_cnn", "--data.size", "2,2"],
     "mnist_cnn cannot take --data.size 2,2: its convolutions and pools shrink them to nothing; it takes e.g. --data.size 4,4"),
    (["summary", "jsrt_unet", "--input-shape", "100,100,1"],  # a U-Net takes multiples of 16, not all sides >= 112
     "; sides that are multiples of 16 fit, e.g. --input-shape 112,112,1"),
    (["summary", "mnist_cnn", "--epochs", "3"], "--epochs does not change the model"),
    (["summary", "mnist_cnn", "--optimizer.lr", "0.1"], "--optimizer.lr does not change the model"),  # its default
    (["summary", "gtsrb_cnn", "--input-shape", "40,15,3"], "it takes e.g. --input-shape 40,16,3"),  # not 41,41
    (["summary", "mnist_cnn", "--input-shape="], "bad --input-shape ''"),
    (["summary", "layer_stack"], "layer_stack has no report input to show it on: give --input-shape H,W,C"),
    (["summary", "unet", "--model.width", "4"],  # was "unexpected argument"
     "--model.width: a network by its name is shown with its defaults; --model.* options go with an experiment "
     "that trains it (e.g. `summary jsrt_unet --model.width 4`)"),
    (["list", "mnist"], "unexpected argument 'mnist'"),
    (["run", "glas_fcn", "--model.name", "small_cnn"],
     "small_cnn puts out a label per image, and glas is segmentation: choose a segmentation network"),
    (["run", "glas_fcn", "--data.name", "mnist"], "fcn puts out a mask per image, and mnist is classification"),
    (["run", "mnist_cnn", "--workdir="], "--workdir is empty: give a folder"),  # it ran in the current folder
    (["evaluate", "--workdir", ""], "--workdir is empty: give a folder"),
    (["run", "mnist_cnn", "--data.source", "sample", "--data-dir", "."],
     "--data-dir . is not read with --data.source sample (the shipped sample): give one or the other"),
    (["run", "mnist_cnn", "--data.name", "glas"], "small_cnn puts out a label per image, and glas is segmentation"),
    (["sweep", "mnist_cnn", "--grid", "data.name=mnist,glas"],  # before the batch of 32 > GlaS's 12 sample images
     "small_cnn puts out a label per image, and glas is segmentation"),
    (["run", "mnist_cnn", "--model.name", "unet"], "unet puts out a mask per image"),  # before its 28x28 misfit
    (["run", "mnist_cnn", "--model.hidden", "100"],  # mlp's, not small_cnn's
     "--model.hidden is an option of mlp, vgg19, not of small_cnn: give --model.name too"),
    (["run", "mnist_fnn", "--features.last_conv", "true"], "--features.last_conv: mlp has no convolutions"),
    (["run", "mnist_cnn", "--model.x", "1", "--model.name", "nosuch"], "unknown value 'nosuch' for --model.name"),
    (["run", "mnist_cnn", "--optimizer.name", "rprop", "--optimizer.momentum", "0.9"],  # was ignored
     "--optimizer.momentum is for --optimizer.name sgd; rprop does not use it"),
    (["run", "gtsrb_cnn", "--optimizer.nesterov", "true"], "--optimizer.nesterov is for --optimizer.name sgd"),
    (["run", "mnist_cnn", "--optimizer.nesterov", "true"], "--optimizer.nesterov needs --optimizer.momentum above 0"),
    (["run", "mnist_cnn", "--optimizer.name", "adamw"],  # "did you mean adam?": coupled L2, not AdamW's decay
     "--optimizer.name adamw: not offered (AdamW decays the weights apart from the gradient)"),
    (["sweep", "mnist_cnn", "--grid", "optimizer.name=sgd,rprop", "--optimizer.schedule", "cosine"],  # torch's leave it
     "--optimizer.schedule cosine with Rprop: its steps adapt by themselves"),
    (["run", "ai604_vgg19_scratch", "--model.weights", "w.pth"],  # trained from random weights, the file unread
     "--model.weights: this run starts from random weights (--model.pretrained false), so it would not read them"),
    (["run", "mnist_cnn", "--model.name", "lenet5_bn", "--model.features", "3,4"],  # was a TypeError traceback
     "--model.name lenet5_bn: lenet5_bn takes no --model.features"),
    (["summary", "gtsrb_cnn", "--input-shape", "28x28"], "bad --input-shape"),
    (["run", "mnist_cnn", "--data.size", "3,3"],
     "small_cnn cannot take 3x3 images: its convolutions and pools shrink them to nothing; it takes e.g. --data.size 4,4"),
    (["bench", "mnist_cnn", "--peer", "--markdown", "."], "--markdown .: it is a folder"),
    (["bench", "mnist_cnn", "--peer", "--model.features", "64,128,256"],
     "--model.features would change flaxlab's side"),
    (["bench", "mnist_cnn", "--peer", "--data.source", "sample"], "--data.source would change flaxlab's side"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["run", "mnist_cnn"], ["sweep", "mnist_cnn", "--grid", "dropout=0,0.1"]])
def test_a_workdir_that_is_a_file_is_refused_before_training(tmp_path, command):
    (tmp_path / "taken").write_text("not a folder")
    for workdir, message in [("taken", "--workdir taken: taken is a file, not a folder"),
                             ("taken/run", "--workdir taken/run: taken is a file, not a folder")]:
        out = cli(*command, "--workdir", workdir, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr == f"error: {message}\n" and out.stdout == "", out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


@pytest.mark.parametrize("command", [["run", "mnist_cnn"], ["summary", "mnist_cnn"]])
def test_a_platform_jax_cannot_start_is_one_line(tmp_path, command):
    out = subprocess.run([sys.executable, "-m", "experiments", *command], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "nosuch"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: jax has no usable backend for JAX_PLATFORMS=nosuch: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting", [{"JAX_NUM_CPU_DEVICES": "abc"}, {"JAX_NUM_CPU_DEVICES": "0"},
                                     {"XLA_FLAGS": "--xla_force_host_platform_device_count=two"}])
def test_a_device_count_jax_cannot_use_is_one_line(tmp_path, setting):
    """jax raised a ValueError's traceback when imported (XLA: 94 lines of its flags; on 0, it blamed a plugin)."""
    out = subprocess.run([sys.executable, "-m", "experiments", "list"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), **setting})
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.endswith("give a whole number of CPU devices, 1 or more\n")


def test_another_network_drops_the_experiments_own_network_options(tmp_path):
    """`--model.name` swaps the network and keeps the rest of the experiment (data, optimizer, epochs);
    `--optimizer.name` likewise drops SGD's momentum."""
    out = cli("show", "mnist_cnn", "--model.name", "lenet5_bn", "--model.activation", "tanh", cwd=tmp_path)
    config = json.loads(out.stdout)
    assert config["model"] == {"name": "lenet5_bn", "activation": "tanh"} and config["optimizer"]["lr"] == 0.1
    config = json.loads(cli("show", "mnist_cnn", "--model.hidden", "100", "--model.name", "mlp", cwd=tmp_path).stdout)
    assert config["model"] == {"name": "mlp", "activation": "relu", "hidden": [100]}  # the new network's option
    config = json.loads(cli("show", "gtsrb_cnn_sgd", "--optimizer.name", "adam", cwd=tmp_path).stdout)
    assert config["optimizer"]["name"] == "adam" and config["optimizer"]["momentum"] == 0  # SGD's, dropped
    config = json.loads(cli("show", "tdt4265_resnet18", "--model.name", "vgg19", cwd=tmp_path).stdout)
    assert config["model"] == {"name": "vgg19", "input_size": 224, "normalize": True, "pretrained": True,
                               "weights": ""}


def test_main_job_on_the_shipped_sample(tmp_path):
    out = cli("run", "mnist_cnn", "--epochs", "2", "--seeds", "2", "--workdir", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "21,578 learnable weights" in out.stdout and "sample" in out.stdout
    run = tmp_path / "run"
    history = json.loads((run / "history.json").read_text())
    assert history["info"]["data"]["source"].startswith("sample")
    assert history["info"]["data"]["train_examples"] == 5000 and history["info"]["data"]["test_examples"] == 1000
    assert history["history"]["epoch"] == [1, 2] and len(history["history"]["test_accuracy"][-1]) == 2
    assert min(history["history"]["test_accuracy"][-1]) > 0.85
    assert "| final test accuracy |" in (run / "results.md").read_text() and "over 2 seeds" in out.stdout
    assert "(report: 99%). Changed here: epochs 20 -> 2, seeds 1 -> 2.\n" in (run / "results.md").read_text()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "config.json").read_text())["seeds"] == 2


def test_show_applies_overrides_and_list_names_experiments(tmp_path):
    shown = json.loads(cli("show", "mnist_cnn", "--optimizer.lr=0.05", "--model.features", "4,8,16",
                           cwd=tmp_path).stdout)
    assert shown["optimizer"]["lr"] == 0.05 and shown["model"]["features"] == [4, 8, 16]
    # a unique last part names its field, as --grid takes it: --lr, --dropout, --momentum
    shown = json.loads(cli("show", "mnist_cnn", "--lr", "0.05", "--dropout=0.2", "--momentum", "0.9",
                           cwd=tmp_path).stdout)
    assert (shown["optimizer"]["lr"], shown["model"]["dropout"], shown["optimizer"]["momentum"]) == (0.05, 0.2, 0.9)
    # and a swapped-in network's options, before or after --model.name (--hidden was an unknown option)
    shown = json.loads(cli("show", "mnist_cnn", "--hidden", "64,32", "--model.name", "mlp", cwd=tmp_path).stdout)
    assert shown["model"] == {"name": "mlp", "activation": "relu", "hidden": [64, 32]}
    # a weights file under ~ is kept as the file it named (config.json kept '~', another HOME's on resume)
    shown = json.loads(cli("show", "tdt4265_resnet18", "--model.weights", "~/w.pth", cwd=tmp_path).stdout)
    assert shown["model"]["weights"] == str(Path.home() / "w.pth")
    # what `run` would refuse, `show` refuses too (it used to print such a config as if it would run)
    refused = cli("show", "mnist_cnn", "--data.test_fraction", "0.2", cwd=tmp_path)
    assert refused.returncode == 2 and "MNIST has its own test split" in refused.stderr and not refused.stdout
    listed = cli("list", cwd=tmp_path).stdout
    for name in ("mnist_fnn", "mnist_cnn", "mnist_cnn_pool_first", "mnist_cnn_tanh", "mnist_cnn_adam"):
        assert name in listed


def test_bench_prints_peer_fields(tmp_path):
    from flaxlab.bench import PEER_FIELDS
    out = cli("bench", "mnist_fnn", "--batch-size", "256", "--data-dir", str(REPO / "flaxlab/assets/mnist-sample"),
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.splitlines()[0])
    assert set(PEER_FIELDS) <= set(line) and line["peer"] == "flaxlab" and line["compile_s"] > 0
    assert line["steps"] == 5000 // 256 and line["images_per_s"] > 0 and line["models_side_by_side"] == 1
    # two seeds: one XLA:CPU device each (two cores or more), so that they train side by side
    out = cli("bench", "mnist_fnn", "--batch-size", "256", "--seeds", "2", "--as-peer-runs", "--data-dir",
              str(REPO / "flaxlab/assets/mnist-sample"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.splitlines()[0])
    assert line["seeds"] == 2 and line["models_side_by_side"] == (2 if len(os.sched_getaffinity(0)) > 1 else 1)
    # the data source asked for, even where ../shared/data is the default folder (it used to be read regardless)
    out = cli("bench", "mnist_fnn", "--batch-size", "256", "--data.source", "sample", cwd=tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout.splitlines()[0])["data"].startswith("sample:"), out.stderr


@pytest.mark.parametrize("name", ["mnist_fnn", "mnist_cnn", "gtsrb_cnn", "bs6207_allconv", "jsrt_unet"])
def test_bench_trains_each_workload_as_the_peer_does(name):
    """No validation split, augmentation, schedule or early stopping: the peer trains on all but its test split."""
    from experiments import EXPERIMENTS
    from flaxlab.bench import PEER_WORKLOADS, peer_workload
    from flaxlab.config import validate
    peer, config = peer_workload(EXPERIMENTS[name]())
    assert peer == PEER_WORKLOADS[name] and validate(config) is config
    assert config["data"].get("val_fraction", 0) == 0 and config["augment"] == {} and not config["best_metric"]
    assert config["optimizer"]["schedule"] == "constant" and config["patience"] == 0


def test_bench_against_the_pytorch_peer_in_one_run(tmp_path, shared_data):
    pytest.importorskip("torch", reason="the PyTorch peer needs torch")
    out = cli("bench", "mnist_fnn", "--peer", "--markdown", "docs/bench.md", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ours, peer, ratio = (json.loads(line) for line in out.stdout.splitlines())
    assert ours["peer"] == "flaxlab" and peer["peer"] == "pytorch-eager" and ours["steps"] == peer["steps"] == 58
    assert ratio["ratio_images_per_s"] > 0 and ours["test_accuracy"] > 0.85
    table = (tmp_path / "docs/bench.md").read_text()
    assert "cores; cpu (" in table and f"| `mnist_fnn` vs `mnist_fnn` | 1 | 1 | {ratio['flaxlab_steps_per_s']:.3g} |" \
        in table
    assert ratio["peer_steps_per_s"] == pytest.approx(peer["steps_per_s"], rel=0.01)
    assert ratio["ratio_steps_per_s"] == ratio["ratio_images_per_s"]  # one seed: from unrounded counts, equal
    assert ratio["flaxlab_train_s"] == ours["train_s"] and "others_busy_peer_cores" in ratio


def test_bench_says_when_other_processes_kept_the_cores_busy(monkeypatch):
    """Beside one busy process the peer's two threads collapsed and mnist_cnn read 24.8x (1.4x idle), unsaid.
    The cores' busy time is faked (a real machine's other load would make this test flaky): what is left once
    this process's and its waited-for children's CPU time are taken off is the others'."""
    import time
    from flaxlab import bench
    assert bench._busy_seconds() is None or bench.others_busy(lambda: None)[1] >= 0  # the real reading
    others = [0.0]

    def cores_busy():  # ours and our children's CPU time, and `others` core-seconds of someone else's
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + others[0]
    monkeypatch.setattr(bench, "_busy_seconds", cores_busy)

    def someone_else_busy(seconds):
        time.sleep(seconds)
        others[0] += seconds  # one core, all the time
    _, busy = bench.others_busy(lambda: someone_else_busy(1.0))
    assert 0.8 <= busy <= 1.0
    spin = [sys.executable, "-c", "import time; t = time.process_time()\nwhile time.process_time() - t < 0.5: pass"]
    _, quiet = bench.others_busy(lambda: (subprocess.run(spin), sum(i * i for i in range(1_000_000))))
    assert quiet == 0.0  # our own work and our child's are not others'
    row = {"ratio_images_per_s": 24.8, "flaxlab_steps_per_s": 201, "peer_steps_per_s": 8.1, "compile_s": 1.0,
           "seeds": 1, "devices": 1, "others_busy_flaxlab_cores": 0.0, "others_busy_peer_cores": 1.0}
    table = bench.markdown_table({"mnist_cnn": [row]}, 1, ["--batch-size", "64"])
    assert "| 0.0 / 1.0 (**ratio too high**) |" in table
    assert "1 epoch(s) per run with --batch-size 64" in table
    assert table.splitlines()[2].count("|") == table.splitlines()[3].count("|") == table.splitlines()[4].count("|")
    assert bench.busy_note({**row, "others_busy_flaxlab_cores": 1.0, "others_busy_peer_cores": 0.0}) == \
        "ratio too low"  # flaxlab's side slowed
    assert bench.busy_note({**row, "others_busy_peer_cores": None}) == ""  # not measured


def test_bench_refuses_before_running_what_would_not_compare(tmp_path, shared_data):
    """Each was found only after flaxlab's side had run (the --markdown one as a traceback), or not at all
    (flaxlab trained on other data than the peer read, or in bfloat16 against its float32)."""
    refused = [(["--data-dir", str(tmp_path)], "the PyTorch peer reads its data from"),
               (["--markdown="], "--markdown is empty: give a file"),  # ran, and wrote no table
               (["--compute_dtype", "bfloat16"], "--compute_dtype would change flaxlab's side only")]
    if Path("/proc/self").is_dir():  # where root may write anywhere else
        refused.append((["--markdown", "/proc/x/table.md"], "--markdown /proc/x/table.md: cannot write in /proc"))
    for args, message in refused:
        out = cli("bench", "mnist_fnn", "--peer", *args, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
        assert out.stdout == ""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)  # data, but no peers/
    out = subprocess.run([sys.executable, "-m", "experiments", "bench", "mnist_fnn", "--peer"], cwd=tmp_path,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "FLAXLAB_SHARED": str(tmp_path / "shared")})
    assert out.returncode == 2 and "no PyTorch peer at" in out.stderr and out.stdout == "", out.stderr


def test_unet_peer_is_flaxlabs_unet():
    """tools/torch_unet_peer.py's network with flaxlab's U-Net weights gives flaxlab's outputs (eval mode)."""
    torch = pytest.importorskip("torch", reason="the U-Net peer is PyTorch")
    import jax
    import numpy as np
    sys.path.insert(0, str(REPO / "tools"))
    from torch_unet_peer import UNet
    from flaxlab.models import make_model
    model = make_model({"name": "unet", "width": 4, "depth": 3}, 2)
    x = np.random.default_rng(0).random((2, 32, 32, 1), np.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    stats = jax.tree.map(lambda a: a + np.random.default_rng(1).random(a.shape, np.float32), variables["batch_stats"])
    peer = UNet(width=4, depth=3).eval()
    convs = [m for m in peer.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in peer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == sum(k.startswith("Conv_") for k in variables["params"])
    with torch.no_grad():
        for i, conv in enumerate(convs):
            p = variables["params"][f"Conv_{i}"]
            conv.weight.copy_(torch.tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.tensor(np.asarray(p["bias"])))
        for i, norm in enumerate(norms):
            p, st = variables["params"][f"BatchNorm_{i}"], stats[f"BatchNorm_{i}"]
            norm.weight.copy_(torch.tensor(np.asarray(p["scale"])))
            norm.bias.copy_(torch.tensor(np.asarray(p["bias"])))
            norm.running_mean.copy_(torch.tensor(np.asarray(st["mean"])))
            norm.running_var.copy_(torch.tensor(np.asarray(st["var"])))
        expected = peer(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    ours = model.apply({"params": variables["params"], "batch_stats": stats}, x, train=False)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in UNet(16).parameters()) == 839_506  # jsrt_unet's learnable weights


def test_summary_prints_the_reports_counts(tmp_path):
    out = cli("summary", "bs6207_allconv_bn", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Total params: 296,730" in out.stdout and "Non-trainable params: 960" in out.stdout
    assert "MaxPool_0 (MaxPool)" in out.stdout and "(16, 16, 16)" in out.stdout
    out = cli("summary", "mnist_cnn", cwd=tmp_path)
    assert "Total params: 21,578" in out.stdout and "Flatten_0 (Flatten)              (1568,)" in out.stdout
    out = cli("summary", "mnist_cnn", "--data.size", "14,14", cwd=tmp_path)  # was shown at 28x28, silently
    assert "input 14x14x1" in out.stdout and "Total params: 8,778" in out.stdout  # the dense layer takes 3x3x32
    out = cli("summary", "tdt4265_resnet18", cwd=tmp_path)  # torchvision's 11,689,512 less 1000-class fc plus 10
    assert "input 32x32x3 (resized to 224x224 inside the network)" in out.stdout, out.stderr  # conv1 gives 112x112
    assert "Trainable params: 11,181,642" in out.stdout
    # an ablation over networks: a table each (it showed the sweep's base, LeNet-5, which neither variant trains)
    out = cli("summary", "ai604_cnn_bn", cwd=tmp_path)
    assert re.findall(r"(ai604_cnn_bn \(.*\)), input 28x28x1\n(?:.*\n)*?Trainable params: ([\d,]+)", out.stdout) == [
        ("ai604_cnn_bn (name=ai604_cnn_bn)", "11,842"), ("ai604_cnn_bn (name=ai604_cnn_bn_pool)", "3,202")]
    out = cli("summary", "gtsrb_trials", cwd=tmp_path)  # variants with one network share its table
    assert out.stdout.count("Total params") == 2 and "gtsrb_trials (baseline (Adam); SGD; Rprop), input" in out.stdout
    out = cli("summary", "ai604_cnn_bn", "--data.size", "6,6", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error: ai604_cnn_bn (name=ai604_cnn_bn_pool) cannot take")


def test_run_help_says_that_every_config_field_is_an_option(tmp_path):
    out = cli("run", "--help", cwd=tmp_path)
    assert out.returncode == 0 and "Every field of the experiment's config is an option too" in out.stdout
    assert "--epochs 5" in out.stdout and "show NAME" in out.stdout


def test_a_closed_pipe_does_not_kill_the_run(tmp_path):
    """`run ... | head -1` died at its second line with a BrokenPipeError traceback; now the run goes on, silent,
    and writes its folder. `list | head -1` ends quietly, as a process ended by SIGPIPE (141)."""
    run = subprocess.Popen([sys.executable, "-m", "experiments", "run", "mnist_cnn", "--epochs", "1", "--workdir",
                            "run"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.stdout.readline().startswith("mnist_cnn: small_cnn with 21,578 learnable weights")
    run.stdout.close()  # as `head -1` does
    assert run.wait(timeout=300) == 0 and "Traceback" not in run.stderr.read()
    assert "final test accuracy" in (tmp_path / "run" / "results.md").read_text()
    listing = subprocess.Popen([sys.executable, "-m", "experiments", "list"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, "PYTHONPATH": str(REPO)})
    listing.stdout.readline()
    listing.stdout.close()
    assert listing.wait(timeout=60) in (0, 141) and "Traceback" not in listing.stderr.read()


def test_a_folder_of_someone_elses_files_is_not_a_run_folder(tmp_path):
    """`--workdir .` in a project replaced its config.json and results.md; a run or sweep now refuses a
    folder with files no run wrote, and still reuses its own (sweep into a run's folder included). With
    --quiet, a run says only its result, and warnings."""
    (tmp_path / "config.json").write_text('{"mine": 1}')
    for command in (["run", "mnist_cnn"], ["sweep", "mnist_cnn", "--grid", "lr=0.1,0.2"]):
        out = cli(*command, "--epochs", "1", "--workdir", ".", cwd=tmp_path)
        assert out.returncode == 2 and "--workdir . holds files that no flaxlab run wrote (config.json)" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"] and "mine" in (tmp_path / "config.json").read_text()
    ran = cli("run", "mnist_cnn", "--epochs", "1", "--quiet", "--workdir", "run", cwd=tmp_path)
    # --quiet: the final table and where it went, no header or epoch lines (it printed nothing at all)
    assert ran.returncode == 0 and ran.stdout.startswith("| metric (1 seed) | value |") and "epoch 1/1" not in ran.stdout
    assert ran.stdout.rstrip().splitlines()[-1].startswith("wrote run/ (checkpoints, config.json, ")
    swept = cli("sweep", "mnist_cnn", "--grid", "lr=0.1,1e3", "--epochs", "1", "--quiet", "--workdir", "run",
                cwd=tmp_path)
    assert swept.returncode == 0 and swept.stdout.startswith("warning: lr=1000: training diverged")
    assert "| lr=0.1 | 1 |" in swept.stdout and "program 1/1" not in swept.stdout
    config = tmp_path / "run" / "config.json"
    config.write_text(config.read_text()[:50])  # a run's own folder, its config cut short: "files no run wrote"
    for resume in ((), ("--resume",)):
        out = cli("run", "mnist_cnn", "--epochs", "1", "--workdir", "run", *resume, cwd=tmp_path)
        assert out.returncode == 2 and "--workdir run: its config.json is damaged (not a flaxlab run's config)" \
            in out.stderr, out.stderr


def test_version(capsys):
    from flaxlab import __version__
    from experiments.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"flaxlab {__version__}\n"


def test_a_sweep_gets_cpu_devices_for_its_largest_program_only(monkeypatch):
    """Its programs train one after another: four programs of one network width each made four devices."""
    from experiments import EXPERIMENTS, cli as experiments_cli
    from flaxlab import parallel
    asked = []
    monkeypatch.setattr(parallel, "split_cpu_devices", lambda models, distributed=False: asked.append(models))
    for name in ("mnist_cnn_widths", "mnist_cnn_dropout"):
        config = {**EXPERIMENTS[name](), "seeds": 2, "model_axis": "sequential"}
        experiments_cli._split_cpu(config, config["sweep"])
    assert asked == [2, 14]  # 1 model x 2 seeds; 7 dropout rates stacked in one program x 2 seeds
