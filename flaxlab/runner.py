"""One experiment end to end: config -> data -> N stacked models trained -> history, table, figure.

Everything that can be wrong with the input (config values, data) is checked before the run
folder is created, so a bad command writes nothing.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

import jax
import jax.numpy as jnp
import numpy as np

from flaxlab import config as config_lib
from flaxlab import data as data_lib
from flaxlab import analysis, metrics, parallel, plots, pooling, pretrained, tensorboard
from flaxlab.errors import UsageError
from flaxlab.models import count_params, make_model
from flaxlab.augment import make_augment
from flaxlab.checkpoint import CHECKPOINT_DIR, Checkpoints, kept_epochs
from flaxlab.progress import Progress
from flaxlab.train import STACKABLE, Trainer, steps_per_epoch, summarize

TRAINING_MARKER = "training.json"  # in a run folder while a process trains there


@dataclasses.dataclass
class RunResult:
    workdir: Path
    history: dict
    stats: list
    states: object  # stacked TrainStates, leading axis = seed
    info: dict


def seed_keys(first_seed, num_seeds):
    """Model i of a multi-seed run gets exactly the keys a single run with seed first_seed+i gets."""
    return jax.vmap(jax.random.key)(np.arange(first_seed, first_seed + num_seeds))


@dataclasses.dataclass
class Setup:
    model: object
    trainer: Trainer  # not yet compiled: compiling is slow enough to announce first
    states: object  # stacked TrainStates, one per seed
    train_keys: jax.Array  # one per seed
    train_data: dict  # device-resident splits
    test_data: dict
    val_data: dict = None  # when the dataset holds a validation split

    @property
    def data(self):
        return {"train": self.train_data, "test": self.test_data, "val": self.val_data}


def stacked_hparams(config, variants):
    """Per-model values (variant-major, seeds inner) of the STACKABLE fields that some model needs."""
    flat = config_lib.flatten(config)
    out = {}
    for key in STACKABLE:
        if any(key in v for v in variants) or (key == "l1" and flat["l1"]):
            out[key] = [v.get(key, flat[key]) for v in variants for _ in range(config["seeds"])]
    return out


# errors jax and flax raise when a network's layers do not fit the images' size (a concatenation or sum of
# maps of different sizes, a map pooled to nothing)
SHAPE_ERRORS = (TypeError, ValueError, ZeroDivisionError, IndexError)


def shape_error_gist(e):
    """The part of jax's or flax's shape error a user can read ('Cannot concatenate arrays with shapes that
    differ ...'), without the shapes of the network's insides."""
    if isinstance(e, (ZeroDivisionError, pooling.PooledToNothing)) or str(e).startswith("Shape should be positive"):
        # a weight initialiser's fan-in of 0, or a convolution's output of no pixels: nothing is left
        return "its convolutions and pools shrink them to nothing"
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(":")[0].rstrip(".")[:200]


def _output_shape(model, image_shape, name=None):
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    init = lambda x: model.init_with_output({"params": jax.random.key(0), "dropout": jax.random.key(1)},  # noqa: E731
                                           x, train=False)[0]
    out = jax.eval_shape(init, x)
    name = name or type(model).__name__
    if not isinstance(out, jax.ShapeDtypeStruct):  # (logits, features): an AttributeError in the train step
        raise UsageError(f"{name} returns a {type(out).__name__}, not one array of scores: return the logits alone")
    if not jnp.issubdtype(out.dtype, jnp.floating):  # a TypeError inside optax's loss
        raise UsageError(f"{name} puts out {out.dtype} scores: return float logits")
    return out.shape


def _sizes_that_fit(model, image_shape):
    """The smallest power-of-two multiple whose multiples the network takes (checked on the sides rounded up to
    it and on the next multiple, one of which is an odd one), with the rounded sides, or None."""
    def maps_to_itself(shape):
        try:
            return _output_shape(model, shape)[1:3] == shape[:2]
        except SHAPE_ERRORS:
            return False
    for multiple in (2 ** i for i in range(1, 9)):
        sides = tuple(-(-side // multiple) * multiple for side in image_shape[:2])
        if all(maps_to_itself((*(side + step for side in sides), *image_shape[2:])) for step in (0, multiple)):
            return multiple, sides
    return None


def smallest_sides_that_fit(model, image_shape):
    """The image grown to the least side the (classification) network takes, by doubling then bisection, or None."""
    def fits(side):
        try:
            _output_shape(model, (max(image_shape[0], side), max(image_shape[1], side), *image_shape[2:]))
            return True
        except SHAPE_ERRORS:
            return False
    low, high = min(image_shape[:2]), 2 * min(image_shape[:2])  # (40, 15) may fit at (40, 16)
    while not fits(high):
        low, high = high, 2 * high
        if high > 4096:
            return None
    while high - low > 1:  # low does not fit, high does
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return max(image_shape[0], high), max(image_shape[1], high)


def size_hint(model, image_shape, option="--data.size", with_channels=False, taken=None):
    """'; ...' naming sides near image_shape that the network takes (a network that puts out masks: sides
    it maps to masks of the same size), or ''. `taken`: smallest_sides_that_fit's answer, when known."""
    tail = f",{image_shape[2]}" if with_channels else ""
    fits = _sizes_that_fit(model, image_shape)  # None for a classification net: its output has no sides
    if fits:
        return f"; sides that are multiples of {fits[0]} fit, e.g. {option} {fits[1][0]},{fits[1][1]}{tail}"
    taken = taken or smallest_sides_that_fit(model, image_shape)
    return f"; it takes e.g. {option} {taken[0]},{taken[1]}{tail}" if taken else ""


def check_input(config, model, dataset):
    """Refuses, before anything is trained, images that the network cannot take, or that a segmentation
    network maps to masks of another size (a U-Net with 4 pools needs sides that are multiples of 16): one
    line naming the size and one that fits, not a shape error from inside the network."""
    image_shape = dataset.train.images.shape[1:]
    size = "x".join(map(str, image_shape[:2]))
    taken = None  # the least sides the network takes, when it cannot take these
    try:
        out = _output_shape(model, image_shape, config["model"]["name"])
        problem = (f"maps {size} images to {'x'.join(map(str, out[1:3]))} masks"
                   if dataset.is_segmentation and out[1:3] != image_shape[:2] else None)
    except SHAPE_ERRORS as e:
        if "must be passed to the constructor or at call time" in str(e):  # not the images' size at all
            raise UsageError(f"{config['model']['name']}: {str(e).split(' to the constructor')[0]}: set it from "
                             "`train`, e.g. nn.Dropout(rate, deterministic=not train), "
                             "nn.BatchNorm(use_running_average=not train)") from None
        why = shape_error_gist(e)
        problem = f"cannot take {size} images: {why}"
        taken = smallest_sides_that_fit(model, image_shape)  # what it puts out, at a size it takes
        out = _output_shape(model, (*taken, *image_shape[2:])) if taken else None
    if out is not None and len(out) not in (2, 4):  # (N, 1, classes): an axis error inside the loss
        raise UsageError(f"{config['model']['name']} puts out scores of shape (N, {', '.join(map(str, out[1:]))}): "
                         "a classification network's are (N, classes), a segmentation network's (N, H, W, classes)")
    if out is not None and dataset.is_segmentation != (len(out) == 4):  # said first: no --data.size fixes it
        task = "segmentation" if dataset.is_segmentation else "classification"
        raise UsageError(f"{config['model']['name']} puts out {'a mask' if len(out) == 4 else 'a label'} per "
                         f"image, and {dataset.name} is {task}: choose a {task} network (--model.name)")
    if problem:
        hint = size_hint(model, image_shape, taken=taken)
        raise UsageError(f"{config['model']['name']} {problem}{hint}")
    if out[-1] != dataset.num_classes:  # a network of one's own: the other classes could never be predicted
        raise UsageError(f"{config['model']['name']} puts out {out[-1]} scores per "
                         f"{'pixel' if dataset.is_segmentation else 'image'}, and {dataset.name} has "
                         f"{dataset.num_classes} classes: size its last layer by its num_classes field")


# data sets whose classes a mirror image can change: flips there train or score on wrong labels
MIRROR_CHANGES_CLASS = {
    "gtsrb": "a mirrored 'keep left' sign is 'keep right', and a speed limit's digits mirrored are no number",
    "mnist": "most digits mirrored are no digit, and a 6 upside down is a 9"}


def flip_warning(config, flips=None):
    """A warning when a flip meets a data set whose classes a mirror changes; `flips`: the options in use
    (default: the config's)."""
    why = MIRROR_CHANGES_CLASS.get(config["data"]["name"])
    if flips is None:
        flips = [f"--{key}" for key, on in (("augment.flip_lr", config["augment"].get("flip_lr")),
                                           ("augment.flip_ud", config["augment"].get("flip_ud")),
                                           ("eval_flip", config.get("eval_flip"))) if on]
    if why and flips:
        return f"{' and '.join(flips)} on {config['data']['name']}: {why}, so the flipped images carry wrong labels"
    return None


def set_up(config, dataset, variants=({},), weights=None):
    """Model, trainer, independently initialised states and the data on the device.

    One model per (variant, seed), variant-major; `variants` may only change STACKABLE fields, and
    seed i of every variant starts from the same weights, as a single run with seed + i would. A pretrained
    model's ImageNet `weights` (pretrained.pretrained_variables) are read here unless given.
    """
    model = make_model(config["model"], dataset.num_classes)
    check_input(config, model, dataset)
    num_models = len(variants) * config["seeds"]
    mesh = parallel.make_mesh(config.get("devices", 0))
    split_models = config.get("parallel", "data") == "seeds"
    shards = 1 if split_models else parallel.num_shards(mesh)  # parts of each batch
    steps = steps_per_epoch(len(dataset.train) // shards, max(config["batch_size"] // shards, 1),
                            config.get("drop_last", True))
    optimizer = {**config["optimizer"], "decay_steps": config["epochs"] * steps}  # for a schedule
    # no larger than the largest split scored, in multiples of 8 (the filler of a last batch is computed too:
    # --eval_batch_size 1000000 asked for 31 GB to score 10,000 digits)
    largest = max(len(split) for split in (dataset.test, dataset.val) if split is not None)
    eval_batch_size = min(config["eval_batch_size"], -(-largest // 8) * 8)
    trainer = Trainer(model, optimizer, num_models=num_models,
                      batch_size=config["batch_size"], eval_batch_size=eval_batch_size,
                      epoch_mode=config["epoch_mode"], scan_steps=config.get("scan_steps") or None,
                      model_axis=config.get("model_axis", "auto"), augment=make_augment(config.get("augment")),
                      drop_last=config.get("drop_last", True), mesh=mesh,
                      compute_dtype=config.get("compute_dtype", "float32"),
                      parallel_mode=config.get("parallel", "data"), eval_flip=config.get("eval_flip", False))
    keys = jax.vmap(jax.random.split)(seed_keys(config["seed"], config["seeds"]))
    keys = parallel.replicate_keys(jnp.concatenate([keys] * len(variants)), mesh)
    states = trainer.init(keys[:, 0], dataset.train.images.shape[1:], stacked_hparams(config, variants))
    if config["model"].get("pretrained"):
        states = load_pretrained(states, config["model"], weights)
    place = lambda split: parallel.replicate({"image": split.images, "label": split.labels}, mesh)
    if mesh is None:
        train_data = data_lib.to_device(dataset.train)
    elif split_models:  # every device trains its models on the whole training set
        train_data = place(dataset.train)
    else:
        train_data = parallel.shard_training_set(dataset.train, mesh, config["seed"])
    return Setup(model, trainer, states, keys[:, 1], train_data, place(dataset.test),
                 place(dataset.val) if dataset.val else None)


def restored_from_checkpoint(config):
    """The config to set up states that a checkpoint then replaces: no ImageNet weights read (a finished run's
    `predict`, `evaluate`, `figures` and `--resume` wanted the weights file it started from, or a download)."""
    return {**config, "model": {**config["model"], "pretrained": False}} if config["model"].get("pretrained") \
        else config


def pretrained_weights(config, read=None):
    """The ImageNet variables a pretrained model starts from, or None: read before a run's folder is made, so
    a missing or unreadable file is refused with nothing written. `read`: a dict of those read before."""
    model = config["model"]
    if not model.get("pretrained"):
        return None
    key = (model["name"], model.get("weights", ""))
    read = {} if read is None else read
    if key not in read:
        read[key] = pretrained.pretrained_variables(*key)
    return read[key]


def load_pretrained(states, model_config, loaded=None):
    """Every model's weights and batch-norm statistics from the ImageNet file (or `loaded` from it), but for a
    head of another class count, which keeps each model's own fresh init (flaxlab.pretrained)."""
    arch = model_config["name"]
    if loaded is None:
        loaded = pretrained.pretrained_variables(arch, model_config.get("weights", ""))
    stacked = {"params": states.params, "batch_stats": states.batch_stats}
    merged = pretrained.merge_pretrained(jax.tree.map(lambda a: a[0], stacked), loaded, arch)
    # the same tensors for every model, placed where the fresh ones were (one device, or replicated on a mesh)
    place = lambda new, old: jax.device_put(np.broadcast_to(np.asarray(new, old.dtype), old.shape), old.sharding)
    merged = jax.tree.map(place, merged, stacked)
    head = pretrained.HEADS[arch]
    if merged["params"][head]["kernel"].shape != loaded["params"][head]["kernel"].shape:
        merged["params"][head] = states.params[head]
    return states.replace(**merged)


def write_atomically(path, text):
    """A run folder never holds a half-written file: the text goes to a file beside it, then takes its name."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomically(path, json.dumps(obj, indent=1))


def load_dataset(config, data_dir=None, dataset=None, batch_sizes=None):
    """The config's dataset (unless given), checked to suit the network (said first: a classification net on
    GlaS was refused for its batch size), to hold a batch of every size the run will train with, and a
    validation split when the run selects models by one."""
    if dataset is None:
        dataset = data_lib.load(data_dir=data_dir, **config["data"])
    elif not isinstance(dataset, data_lib.Dataset):  # (images, labels) or a dict: an AttributeError
        raise UsageError(f"dataset must be a flaxlab.data.Dataset(name, source, train, test, num_classes), got "
                         f"{type(dataset).__name__}")
    check_input(config, make_model(config["model"], dataset.num_classes), dataset)
    for batch_size in batch_sizes or [config["batch_size"]]:
        if batch_size > len(dataset.train) and config.get("drop_last", True):
            raise UsageError(f"--batch-size {batch_size} is larger than the training set ({len(dataset.train)} examples)")
    if config["best_metric"] and dataset.val is None:
        raise UsageError(f"--best_metric {config['best_metric']} needs a validation split: set --data.val_fraction")
    crop, side = config.get("augment", {}).get("crop", 0), min(dataset.train.images.shape[1:3])
    if crop >= side:  # shifts of a side or more give crops that hold none of the image
        raise UsageError(f"--augment.crop {crop} shifts images by up to {crop} pixels, as much as their side "
                         f"({side}): some crops would hold none of the image; use less (the reports: 4 at 32x32)")
    if config["best_metric"] == "val_dice" and not dataset.is_segmentation:
        raise UsageError(f"--best_metric val_dice is for segmentation; {dataset.name} is classification")
    return dataset


def default_workdir(name):
    return Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def unwritable(folder):
    """Why files cannot be written in `folder` (made first where missing), or None when they can."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:  # a file written and gone: os.access says yes to root everywhere, /proc included
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        return f"cannot write in {existing}"
    return None


def is_run_folder(folder):
    """Whether `folder` holds a config.json that a flaxlab run or sweep wrote."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"name", "model", "optimizer", "epochs"} <= set(config)


def check_workdir(workdir):
    """Refuses, before any data are loaded or models trained, a run folder that cannot be made or written,
    and one that holds files that no run wrote: a run replaces its folder's config.json, results.md and
    figures (`--workdir .` in a project overwrote the project's config.json)."""
    why = workdir is not None and unwritable(workdir)
    if why:
        raise UsageError(f"--workdir {workdir}: {why}")
    parallel.from_process_0(lambda: _refuse_if_training(workdir))  # process 0's own marker is the others' too
    if workdir is not None and Path(workdir).is_dir() and any(Path(workdir).iterdir()) and not is_run_folder(workdir):
        names = sorted(p.name for p in Path(workdir).iterdir())
        if "config.json" in names and _history_of_run_or_sweep(workdir):  # a run's folder, its config damaged
            raise UsageError(f"--workdir {workdir}: its config.json is damaged (not a flaxlab run's config), so "
                             "nothing there can be resumed or safely replaced: mend it, or give a new or empty folder")
        raise UsageError(f"--workdir {workdir} holds files that no flaxlab run wrote ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}), which a run would overwrite: "
                         f"give a new or empty folder")


def recorded_history(workdir, *keys):
    """history.json's value under `keys` (the whole file without), or None where the file is missing, damaged
    or holds no such entry (a run stopped before its first epoch ended, or older)."""
    try:
        recorded = json.loads((Path(workdir) / "history.json").read_text())
        for key in keys:
            recorded = recorded[key]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return recorded


def _history_of_run_or_sweep(workdir):
    recorded = recorded_history(workdir)
    return isinstance(recorded, dict) and any(keys <= set(recorded) for keys in ({"info", "history"},
                                                                              {"data", "variants"}))


def _refuse_if_training(workdir):
    training = workdir is not None and training_process(workdir)
    if training and training[0] == "alive":
        raise UsageError(f"--workdir {workdir}: a run is training there ({training[1]}): give another folder, "
                         "or wait for it to end (`python -m experiments runs` shows it)")


def make_workdir(workdir):
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make the run folder {workdir}: {e.strerror or e}") from None
    return workdir


def _process_start(pid):
    """When process `pid` started (clock ticks since boot; Linux), which a later process given the same pid
    does not share; None where unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def marked_as_training(workdir):
    """`training.json` in the run folder while process 0 trains and writes there: `runs` tells a run in
    training from one that stopped, and a second launch into the folder is refused while this one lives.
    A killed process leaves it behind, naming a process that is gone."""
    path = Path(workdir) / TRAINING_MARKER
    if not parallel.is_primary():
        yield
        return
    _claim(path, {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")})
    try:
        yield
    finally:
        if _marker_pid(path) == os.getpid():
            path.unlink(missing_ok=True)


def _claim(path, marker):
    """Writes the training marker unless a live process's is there (two launches into one folder passed
    check_workdir while neither had marked it, then both trained and wiped each other's files): the marker
    appears whole or not at all (a hard link of a written file), and only where none is. The folder is locked
    meanwhile, where the file system has locks: two launches finding a stopped run's marker both replaced it."""
    written = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    written.write_text(json.dumps(marker, indent=1))
    try:
        with _folder_locked(path.parent):
            for attempt in range(2):
                try:
                    os.link(written, path)
                    return
                except FileExistsError:
                    _refuse_if_training(path.parent)
                    if attempt:
                        raise UsageError(f"--workdir {path.parent}: another run has just started training there: "
                                         "give another folder") from None
                    path.unlink(missing_ok=True)  # a stopped run's
                except OSError:  # a file system without hard links
                    os.replace(written, path)
                    return
    finally:
        written.unlink(missing_ok=True)


FOLDER_LOCK_WAIT_S = 2.0  # a claim holds the lock for milliseconds


@contextlib.contextmanager
def _folder_locked(folder):
    """An exclusive lock on `folder` while the block runs (flock on the folder itself: no file is left behind;
    the kernel releases it when the process dies); none where the file system or platform has no such locks,
    nor after FOLDER_LOCK_WAIT_S where another process holds it long (`flock DIR python -m experiments ...`
    around this very run waited for ever)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        deadline = time.monotonic() + FOLDER_LOCK_WAIT_S
        while fd is not None and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            except OSError:  # no locks here
                break
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _marker_pid(path):
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def training_process(workdir):
    """('alive' or 'elsewhere', 'pid N on HOST since T') for the process a run folder says trains there:
    alive on this machine, or on another (which may have stopped); None when none does."""
    try:
        marker = json.loads((Path(workdir) / TRAINING_MARKER).read_text())
        pid, host, since = int(marker["pid"]), str(marker["host"]), str(marker["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    who = f"pid {pid} on {host} since {since.replace('T', ' ')}"
    if host != socket.gethostname():
        return "elsewhere", who
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(pid)
    if started is not None and marker.get("process_start") not in (None, started):
        return None  # the pid was given to another process since
    return "alive", who


def folder_of_this_process(workdir, name):
    """`workdir`, or in a multi-host run's other processes a temporary folder (`remove_if_temporary` at the
    end): process 0 alone writes the run folder, which processes sharing a file system would race on."""
    if parallel.is_primary():
        return workdir
    return Path(tempfile.mkdtemp(prefix=f"{name}-process{jax.process_index()}-"))


def remove_if_temporary(workdir):
    if not parallel.is_primary():
        shutil.rmtree(workdir, ignore_errors=True)


# what a run or sweep (and figures, predict) writes in its folder, besides config.json and the training marker
RUN_OUTPUTS = ("history.json", "results.md", "results.csv", "trials.csv", "trials.png", "comparison.png", "curves.png",
               "confusion.png", "confusion.json", "misclassified.png", "filters.png", "overlay*.png", "predictions.png",
               "scores.json", "features*.png", "predicted-masks")


def remove_earlier_run(workdir, log):
    """A fresh run or sweep in a used folder: `--resume` and `evaluate` must not find an earlier run's states
    there and read them under the new config, nor TensorBoard its curves under the new run's name; and a
    sweep's table or a run's figures left there would pass for the new run's."""
    workdir = Path(workdir)
    removed = [name for name in (CHECKPOINT_DIR, tensorboard.FOLDER) if (workdir / name).is_dir()]
    for name in removed:
        shutil.rmtree(workdir / name)
    outputs = sorted({path for pattern in RUN_OUTPUTS for path in workdir.glob(pattern)})
    for path in outputs:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    what = [{tensorboard.FOLDER: "TensorBoard events"}.get(name, name) for name in removed]
    what += ["results and figures"] if outputs else []
    if what:
        log(f"removed the {' and '.join(what)} of the run that was in {workdir} before")


def select_models(improved, new, kept):
    """Per model (leading axis): the new state where it improved, else the kept one."""
    improved = jnp.asarray(improved)
    return jax.tree.map(lambda n, k: jnp.where(improved.reshape((-1,) + (1,) * (n.ndim - 1)), n, k), new, kept)


def _scores(split):
    loss, acc = np.mean(split["loss"]), 100 * np.mean(split["accuracy"])
    return f"loss {loss:.4f} acc {acc:.2f}%" + (f" dice {np.mean(split['dice']):.4f}" if "dice" in split else "")


def _by_variant(split, variants):
    """Each variant's mean score: a sweep program's epoch line is otherwise one mean over different models."""
    key, form = ("dice", "{:.4f}") if "dice" in split else ("accuracy", "{:.2%}")
    means = np.asarray(split[key]).reshape(len(variants), -1).mean(1)
    return f"{key} by variant: " + ", ".join(f"{label} {form.format(m)}" for label, m in zip(variants, means))


def fit(trainer, states, data, keys, epochs, *, select=None, patience=0, checkpoints=None, resumed=None,
        progress=True, log=print, on_epoch=None, variants=()):
    """The epoch loop: train every model, evaluate, record. On a GPU or TPU the only host sync is at an epoch's
    end (and, when the output is not a terminal, once a minute inside a longer epoch for a progress line); a CPU
    run over several devices waits for each step (XLA:CPU's collectives deadlock with several in flight).

    `data` holds device splits "train", "test" and optionally "val". With `select` (a validation
    metric), each model's state at its best epoch is kept (returned as `best`, saved in checkpoints),
    and with `patience` a model stops once it has not improved for that many epochs (its best kept, its scores
    held from then on), training once every model has stopped.
    `resumed` = (states, best, progress) from a checkpoint continues that run at its next epoch.
    `variants`: a sweep program's labels (its models variant-major), whose test scores the epoch line gives.
    Returns (states, best or None, history, best epochs or None).
    """
    val = data.get("val")
    names = metrics.SEGMENTATION if trainer.segmentation else metrics.CLASSIFICATION
    history, best, first, done = metrics.new_history(val is not None, names), None, 1, False
    tracker = metrics.BestEpochs(select, trainer.num_models, patience) if select else None
    if resumed is not None:
        states, best, progress_state = resumed
        history, first, done = progress_state["history"], progress_state["epoch"] + 1, progress_state["stopped"]
        if tracker:
            tracker = metrics.BestEpochs(select, trainer.num_models, patience, progress_state["best_epochs"])
        else:
            best = None
        finished = "stopped early" if done else "all its epochs" if first > epochs else ""
        log(f"resumed after epoch {progress_state['epoch']}" + (f": the run had finished ({finished}), so its results "
                                                                 "and figures are written again" if finished else ""))
    bar = Progress(epochs, enabled=progress, log=log, first_epoch=first)
    for epoch in range(first, epochs + 1):
        if done:
            break
        bar.begin_epoch(epoch)
        t0 = time.perf_counter()
        states, train_sums = trainer.train_epoch(states, data["train"], keys, epoch, on_step=bar.on_step)
        bar.wait(jax.tree.leaves(train_sums))  # the queued steps run, the bar and minute lines going on meanwhile
        jax.block_until_ready(states)  # the epoch's only sync: it makes the timing honest
        seconds = time.perf_counter() - t0
        train, test = summarize(train_sums), summarize(trainer.evaluate(states, data["test"]))
        val_scores = summarize(trainer.evaluate(states, val)) if val is not None else None
        if tracker:  # an early-stopped model's scores stay those of its last epoch
            train, test, val_scores = (metrics.held(history, split, scores, tracker) for split, scores in
                                       (("train", train), ("test", test), ("val", val_scores)))
        metrics.append_epoch(history, epoch, seconds, train, test, val_scores)
        line = f"train {_scores(train)}  " + (f"val {_scores(val_scores)}  " if val_scores else "") + \
            f"test {_scores(test)}"
        if len(variants) > 1:
            line += f"  (test {_by_variant(test, variants)})"
        if tracker:
            improved = tracker.update(epoch, val_scores[select.split("_", 1)[1]])
            best = jax.tree.map(jnp.copy, states) if best is None else select_models(improved, states, best)
            done = tracker.should_stop()
            line += f"  ({int(improved.sum())}/{len(improved)} improved {select})"
        if checkpoints is not None:
            checkpoints.save(epoch, states, best, {"epoch": epoch, "history": history, "stopped": done,
                                                   "best_epochs": tracker.state() if tracker else None},
                             force=done or epoch == epochs)
        if on_epoch is not None:
            on_epoch(history)
        bar.end_epoch(line)
        if done:
            log(f"early stopping after epoch {epoch}: every model has gone {patience} epochs without improving its "
                f"{select}")
    return states, best, history, (tracker.epoch if tracker else None)


def model_name(config, selected=None):
    """How figures name the model they show, the first seed's: with its epoch when the run kept its
    best-validation state (a figure of it went by the last epoch's curves and title)."""
    return f"{config['name']} (seed {config['seed']}{f', selected epoch {selected}' if selected else ''})"


def write_analysis(workdir, config, dataset, predictions, selected=None):
    """For the first seed: confusion.png (counts and row-normalised), misclassified.png; returns (the most
    confused pairs as Markdown, None): write_segmentation_analysis's pair, whose second is per-image scores.
    The matrices of every seed go to confusion.json."""
    labels = dataset.test.labels
    matrices = [analysis.confusion_matrix(labels, p, dataset.num_classes) for p in predictions]
    write_json(workdir / "confusion.json", {"rows_true_columns_predicted": [m.tolist() for m in matrices]})
    title = f"{model_name(config, selected)}, {dataset.name} test"
    names = dataset.class_names
    plots.confusion_figure(matrices[0], workdir / "confusion.png", title, names)
    plots.misclassified_grid(dataset.test.images, labels, predictions[0], workdir / "misclassified.png", title, names)
    pairs = analysis.confused_pairs_markdown(analysis.most_confused_pairs(matrices[0]), names)
    return f"\nMost confused classes (seed {config['seed']}, test split):\n\n{pairs}\n", None


def dice_label(dataset):
    return {"jsrt": "F1"}.get(dataset.name, "DSC")  # what each report calls the per-image Dice


def write_segmentation_analysis(workdir, config, dataset, predictions, selected=None):
    """Per-image Dice of every model on the test split (scores.json), its mean/std/min table, and for the
    first seed the best and worst three test predictions (predictions.png) and one test image with its
    predicted mask (overlay.png, --features.image). Returns the table as Markdown, and the scores."""
    label = dice_label(dataset)
    scores = [analysis.dice_per_image(p, dataset.test.labels) for p in predictions]
    names = {"test_images": list(dataset.test.names)} if dataset.test.names is not None else {}
    write_json(workdir / "scores.json", {"metric": f"{label} (Dice of the foreground) per test image",
                                         **names, "per_seed": [s.round(6).tolist() for s in scores]})
    who = f"{model_name(config, selected)}, {dataset.name} test"
    plots.segmentation_extremes(dataset.test.images, dataset.test.labels, predictions[0], scores[0],
                                workdir / "predictions.png", f"{who}: best and worst {label}", label=label,
                                name=dataset.test.name)
    draw_overlay(workdir / "overlay.png", config, dataset, predictions[0], scores[0], config["features"]["image"],
                 selected)
    table = analysis.dice_table(scores, config["seed"], label)
    return (f"\nPer-image {label} on the test split ({len(dataset.test)} images), each seed's final or selected "
            f"model:\n\n{table}\n", scores)


def draw_overlay(path, config, dataset, prediction, scores, index, selected=None):
    """One test image with its true and predicted masks, and their Dice, from the first model."""
    label = dice_label(dataset)
    title = f"{model_name(config, selected)}, {dataset.name} test: image {dataset.test.name(index)}"
    plots.mask_overlay(dataset.test.images[index], dataset.test.labels[index], prediction[index], path, title,
                       scores[index], label)


def check_views(config, model, dataset, named=None):
    """The feature-map layer and test image a run will draw, refused before training when wrong; `named`:
    what the errors call the options (`figures` takes --layer and --image)."""
    from flaxlab import inspect_model
    named = {"layer": "--features.layer", "image": "--features.image", **(named or {})}
    convs = inspect_model.conv_layer_names(model, dataset.train.images.shape[1:])
    layer = config["features"]["layer"] or (convs[0] if convs else "")
    for key, off in (("last_conv", False), ("image", 0)):
        if not convs and not dataset.is_segmentation and config["features"][key] != off:
            raise UsageError(f"--features.{key}: {config['model']['name']} has no convolutions, so a run draws "
                             f"no feature maps")
    if config["features"]["image"] >= len(dataset.test):
        raise UsageError(f"{named['image']} {config['features']['image']} is beyond the test split "
                         f"({len(dataset.test)} images)")
    if layer:
        names = inspect_model.layer_names(model, None, dataset.train.images.shape[1:])
        if layer not in names:
            raise UsageError(f"{named['layer']} '{layer}' is not a layer of {config['model']['name']}; "
                             f"layers: {', '.join(names)}")
        shape = inspect_model.layer_output_shape(model, dataset.train.images.shape[1:], layer)
        if len(shape) != 3:
            raise UsageError(f"{named['layer']} {layer} puts out {shape}, not feature maps (H, W, C)")
    return convs, layer


def write_views(workdir, config, model, states, dataset, convs, layer, features_name="features.png", selected=None):
    """filters.png (the first conv's filters) and features.png (the chosen layer's maps for the chosen test
    image), both of the first model; nothing for a net without convolutions."""
    from flaxlab import inspect_model
    if not convs:
        return
    first = jax.tree.map(lambda a: np.asarray(a[0]), states)
    who = model_name(config, selected)
    kernel = inspect_model.first_conv_kernel(first.params, convs)
    plots.filter_grid(kernel, workdir / "filters.png", f"{who}: first-layer filters ({convs[0]})")
    index = config["features"]["image"]
    image = dataset.test.images[index]
    label = dataset.test.labels[index]
    if np.ndim(label):  # a segmentation mask
        shown = f"test image {dataset.test.name(index)}"
    else:
        name = dataset.class_names[label] if dataset.class_names else "label\u00a0" + str(label)  # kept on one line
        shown = f"test image {index} ({name})"
    maps = inspect_model.layer_output(model, first.variables(), image, layer)
    if maps.ndim == 3:
        plots.feature_maps_figure(image, maps, workdir / features_name, f"{who}: {layer} on {shown}")
    if config["features"].get("last_conv") and convs[-1] != layer:  # what the deepest layer looks at
        maps = inspect_model.layer_output(model, first.variables(), image, convs[-1])
        plots.feature_maps_figure(image, maps, workdir / features_name.replace(".png", "-last.png"),
                                  f"{who}: {convs[-1]} on {shown}")


def write_summary(workdir, config, dataset, info, history, analysis_md="", best_epochs=None, image_scores=None):
    """results.md (the trial table with the run's facts) and curves.png; returns stats and table."""
    stats = metrics.final_stats(history, best_epochs)
    table = metrics.markdown_table(stats)
    trials = ""
    if config["seeds"] > 1:
        rows = metrics.trial_rows(config["name"], history, config["seed"], best_epochs, image_scores)
        trials = f"\nEvery trial:\n\n{metrics.trial_table(rows)}\n"
        plots.trial_curves({config["name"]: history}, workdir / "trials.png", f"{config['name']}: loss per trial")
    val = f"{len(dataset.val):,} val / " if dataset.val else ""
    counts = f"{len(dataset.train):,} train / {val}{len(dataset.test):,} test"
    write_atomically(workdir / "results.md",
        f"# {config['name']}\n\n{config.get('description', '')}\n\n"
        f"- data: {dataset.source}, {counts} examples\n"
        f"- model: {config['model']['name']}, {info['learnable_weights']:,} learnable weights; {info['seeds']} "
        f"seed(s) from seed {config['seed']}; {len(history['epoch'])} of {config['epochs']} epochs"
        + (f"; each model's state at its best {config['best_metric']} kept (selected epoch)" if best_epochs else "")
        + (f"; early stopping after {config['patience']} epochs without improvement" if config["patience"] else "")
        + (f"; {note}" if (note := metrics.stopped_note(info.get("stopped_epochs"), len(history["epoch"]),
                                                          [f"seed {config['seed'] + i}" for i in range(info["seeds"])]))
           else "")
        + ("; evaluated on each image and its left-right mirror (logits averaged)" if config.get("eval_flip") else "")
        + "\n"
        f"- {info['backend']} ({info['device']}"
        + (f" x {info['devices']} devices, {info['parallel']} parallel" if (info.get("devices") or 1) > 1 else "")
        + f"), jax {info['jax']}: compile {info['compile_s']} s, "
        f"train {info['train_s']} s, {info['steps_per_s']} steps/s\n"
        + (f"- **{note}**\n" if (note := metrics.divergence_note(history, config["optimizer"]["name"])) else "")
        + f"\n{table}\n\n{metrics.BEST_TEST_NOTE}\n{trials}{analysis_md}")
    plots.learning_curves(history, workdir / "curves.png",
                          f"{config['name']}: {dataset.name} ({dataset.source.split(':')[0]}, {counts})", best_epochs)
    return stats, table


def check_resumable(config, workdir):
    """The run folder to resume must exist and hold this experiment with the same settings
    (only `epochs` may grow, and not under a learning-rate schedule, which spans them, nor in a sweep), or the
    resumed run would not be the interrupted one continued. A sweep's config holds its variants."""
    if workdir is None:
        raise UsageError("--resume needs --workdir: the run folder of the interrupted run")
    saved_path = Path(workdir) / "config.json"
    if Path(workdir).is_dir() and not any(Path(workdir).iterdir()):  # a Ctrl-C between making it and config.json
        raise UsageError(f"--resume: {workdir} is empty (a run stopped there before it wrote anything): nothing to go "
                         "on from; run the same command without --resume")
    if not saved_path.is_file():
        raise UsageError(f"--resume: {saved_path} not found; is {workdir} a run folder?")
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        raise UsageError(f"--resume: {saved_path} is not valid JSON") from None
    if bool(saved.get("sweep")) != bool(config.get("sweep")):
        kinds = ("a sweep", "a single run") if saved.get("sweep") else ("a single run", "a sweep")
        raise UsageError(f"--resume: {workdir} is {kinds[0]}'s folder, and this is {kinds[1]}: resume with the "
                         "command and options it ran with")
    saved, mine = config_lib.flatten(saved), config_lib.flatten(json.loads(json.dumps(config)))  # tuples as lists
    # a schedule spans the epochs; a sweep's finished programs ran the epochs they ran
    growable = () if mine.get("optimizer.schedule", "constant") != "constant" or mine.get("sweep") else ("epochs",)
    # a field added since the run was saved counts as unchanged; the description names the options changed
    differ = sorted(k for k in set(saved) | set(mine)
                    if k not in (*growable, "description") and saved.get(k, mine.get(k)) != mine.get(k))
    if differ:
        options = ", ".join("--grid" if k == "sweep" else f"--{k}" for k in differ[:5])  # a sweep's variants
        raise UsageError(f"--resume: {workdir} was run with other settings ({options}); resume with the same options")
    kept = kept_epochs(Path(workdir) / CHECKPOINT_DIR)  # a run's, whose latest --resume goes on from
    if not config.get("sweep") and not kept:  # said before its data are loaded and its program compiled
        raise UsageError(f"no checkpoint in {Path(workdir) / CHECKPOINT_DIR}: a run keeps one when it ends, and with "
                         "--checkpoint_every N one every N epochs; this one stopped before it kept any, so there is "
                         "nothing to go on from: train it again, without --resume")
    if not config.get("sweep") and kept and kept[-1] > config["epochs"]:  # the results would say N of M < N epochs
        raise UsageError(f"--resume: {workdir} has run {kept[-1]} epochs already; --epochs {config['epochs']} would "
                         f"not continue it: give --epochs {kept[-1]} or more")


def data_differs(recorded, dataset):
    """How `dataset` differs from the data a run recorded (history.json's `data`), or ''. A moved folder is the
    same data; a field an older flaxlab did not record counts as the same."""
    mine = dataset.describe()
    keys = ("name", "train_examples", "val_examples", "test_examples", "image_shape", "num_classes", "class_names")
    if all(recorded.get(key, mine.get(key)) == mine.get(key) for key in keys):
        return ""
    return (f"trained on {recorded.get('source')} ({recorded.get('train_examples', 0):,} train), and this launch "
            f"loads {dataset.source} ({len(dataset.train):,} train): give the --data-dir (and --data options) it read")


def _check_resumed_data(workdir, dataset):
    """--resume goes on with the data the run trained on (it once took the sample where --data-dir was left out,
    mixing full-MNIST epochs with sample ones in one history)."""
    recorded = recorded_history(workdir, "info", "data")
    if recorded is None:
        return  # stopped before its first epoch ended: no data recorded, nothing trained on it kept
    if why := data_differs(recorded, dataset):
        raise UsageError(f"--resume: {workdir} was {why}")


def resumed_devices_warning(workdir, trainer):
    """A data-parallel run resumed on another device count goes on with other batches (each device permutes its
    own shard of the training set): not the interrupted run continued, as --devices N would be refused."""
    info = recorded_history(workdir, "info")
    if not isinstance(info, dict):
        return None
    try:
        shards = 1 if info.get("parallel") == "seeds" else int(info.get("devices") or 1)  # parts of each batch
    except (ValueError, TypeError):
        return None
    if shards == trainer.shards:
        return None
    return (f"{workdir} split its batches over {shards} device(s), and this launch over {trainer.shards}: each "
            "device draws its part from its own shard of the training set, so from here on the batches hold other "
            "examples than the uninterrupted run's (give it the devices it had: JAX_NUM_CPU_DEVICES, XLA_FLAGS)")


def _what_an_interrupted_run_left(workdir, epochs_saved, checkpoints, every):
    """The line a Ctrl-C ends a run with: what its folder holds, and how (or whether) it can go on. `every`:
    the run's --checkpoint_every."""
    kept = kept_epochs(workdir / CHECKPOINT_DIR)
    if kept and checkpoints:
        how = f"run the same command with --resume to go on from epoch {kept[-1]}'s checkpoint"
    elif every:
        how = (f"it stopped before its first checkpoint (one every {every} epoch(s)), so there is nothing to go on "
               f"from: run it again, without --resume")
    else:
        how = "a run with --checkpoint_every N keeps checkpoints that --resume goes on from"
    return f"{workdir} holds config.json and the history of {epochs_saved} epoch(s); {how}"


def _run_info(config, dataset, s, data_dir_record, log):
    """history.json's `info` of a run about to train (what it trains, on what, how), said in two lines."""
    trainer = s.trainer
    # the training images' mean pixel: `predict` checks new images by it (a sweep, never predicted from, has none)
    info = {"experiment": config["name"],
            "data": {**dataset.describe(), "pixel_mean": round(float(dataset.train.images.mean()), 1),
                     **data_dir_record},
            "learnable_weights": count_params(jax.tree.map(lambda a: a[0], s.states.params)),
            "backend": jax.default_backend(), "device": str(jax.devices()[0]), "jax": jax.__version__,
            "epoch_mode": trainer.epoch_mode, "model_axis": trainer.model_axis, "seeds": config["seeds"],
            "devices": trainer.devices, "parallel": config.get("parallel", "data") if trainer.devices > 1 else None,
            "processes": jax.process_count(), "compute_dtype": config.get("compute_dtype"),
            "models_side_by_side": len(trainer.spread) or 1}
    where = f"{info['backend']}" + (f" x {trainer.devices} devices ({info['parallel']} parallel)"
                                     if trainer.devices > 1 else "")
    if trainer.spread:
        where += f" ({len(trainer.spread)} models at a time, one per CPU device)"
    log(f"{config['name']}: {config['model']['name']} with {info['learnable_weights']:,} learnable weights, "
        f"{config['seeds']} seed(s), {config['epochs']} epoch{'s' * (config['epochs'] != 1)} on {where} "
        f"({trainer.epoch_mode} mode)")
    val_count = f" / {len(dataset.val):,} val" if dataset.val else ""
    log(f"data: {dataset.source} ({len(dataset.train):,} train{val_count} / {len(dataset.test):,} test examples)")
    if note := shards_note(len(dataset.train), trainer.shards):
        log(note)
    return info


def run_experiment(config, workdir=None, data_dir=None, dataset=None, progress=True, log=print, resume=False,
                   report=None):
    """Trains config['seeds'] models of one experiment as one program and writes its run folder.

    Writes config.json, history.json (per epoch, one value per seed; rewritten after every epoch),
    results.md (the trial table and the most confused classes), curves.png (loss and accuracy, train,
    val and test), confusion.png/.json, misclassified.png, and orbax checkpoints that `resume` continues from
    and `predict` reads: the last epoch's, and with `checkpoint_every` N, every N epochs.
    With `best_metric`, the figures and predictions are those
    of each model's best-validation state. `log` takes the run's lines; `report` (default: `log`) its final
    table and warnings, what a --quiet run still prints; `progress=False` drops the per-epoch lines and the
    step bar (--quiet), `log=lambda *a: None` everything but `report`'s.
    """
    config = config_lib.note_changes(config_lib.validate(config))
    parallel.same_launch(config, resume=resume)
    check_workdir(workdir)
    if resume:  # in a multi-host run, process 0 holds the folder
        parallel.from_process_0(lambda: check_resumable(config, workdir))

    given_dataset = dataset is not None  # from Python: no --data-dir to record (not $FLAXLAB_DATA_DIR's)

    def checked():  # what each process reads for itself, and bad input refused before any device work
        loaded = load_dataset(config, data_dir, dataset)  # the network checked against its images too
        model = make_model(config["model"], loaded.num_classes)
        return loaded, check_views(config, model, loaded), None if resume else pretrained_weights(config)
    dataset, (convs, feature_layer), weights = parallel.in_every_process(
        checked, config, fingerprint=lambda done: done[0].checksum())
    if resume:
        parallel.from_process_0(lambda: _check_resumed_data(workdir, dataset))
    s = set_up(restored_from_checkpoint(config) if resume else config, dataset, weights=weights)
    trainer = s.trainer
    info = _run_info(config, dataset, s, _data_dir_record(dataset, data_dir, given=given_dataset), log)
    if warning := flip_warning(config):
        (report or log)(f"warning: {warning}")
    if resume and (warning := parallel.from_process_0(lambda: resumed_devices_warning(workdir, trainer))):
        (report or log)(f"warning: {warning}")

    workdir = folder_of_this_process(Path(workdir) if workdir else default_workdir(config["name"]), config["name"])
    checkpoints, resumed = None, None
    if resume:
        checkpoints = Checkpoints(workdir, config["checkpoint_every"])
        resumed = checkpoints.restore(s.states, with_best=bool(config["best_metric"]))
    info["compile_s"] = round(trainer.compile(s.states, s.train_data, s.test_data, s.val_data), 3)
    log(f"compiled in {info['compile_s']:.1f} s (not counted in epoch times)")

    make_workdir(workdir)  # only now: bad input has been refused by this point
    with marked_as_training(workdir):
        if not resume:
            remove_earlier_run(workdir, log)
            checkpoints = Checkpoints(workdir, config["checkpoint_every"], create=True)  # the last epoch's at least
        write_json(workdir / "config.json", config)
        saved = [len(resumed[2]["history"]["epoch"]) if resumed else 0]  # epochs whose history is on disk
        board = tensorboard.Board(workdir, tensorboard.run_names(config["seed"], config["seeds"]),
                                  first_epoch=resumed[2]["epoch"] + 1 if resumed else 1)

        def save_history(history):
            write_json(workdir / "history.json", {"info": info, "history": history})
            saved[0] = len(history["epoch"])

        def end_epoch(history):
            save_history(history)
            board.log_epoch(history)
        try:
            try:
                states, best, history, best_epochs = fit(
                    trainer, s.states, s.data, s.train_keys, config["epochs"], select=config["best_metric"] or None,
                    patience=config["patience"], checkpoints=checkpoints, resumed=resumed, progress=progress,
                    log=log, on_epoch=end_epoch)
            finally:
                if checkpoints is not None:
                    checkpoints.close()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(_what_an_interrupted_run_left(workdir, saved[0], checkpoints,
                                                                  config["checkpoint_every"])) from None

        train_s = sum(history["epoch_time_s"])
        steps = trainer.steps_per_epoch(len(dataset.train)) * len(history["epoch"])
        info.update(train_s=round(train_s, 3), steps_per_s=round(steps / train_s, 1),
                    images_per_s=round(trainer.images_per_epoch(len(dataset.train)) * len(history["epoch"])
                                       * config["seeds"] / train_s, 1),
                    epochs_run=len(history["epoch"]), selected_epochs=best_epochs,
                    stopped_epochs=metrics.stopped_epochs(best_epochs, config["patience"], len(history["epoch"])))
        save_history(history)
        report = report or log  # what a --quiet run still says
        if note := metrics.divergence_note(history, config["optimizer"]["name"]):
            report(f"warning: {note}")
        chosen = best if best is not None else states  # the selected (best-validation) models, when selecting
        predictions = parallel.to_host(trainer.predict(chosen, s.test_data))
        chosen = parallel.to_host(chosen)  # figures draw from one local copy
        write_analysis_of = write_segmentation_analysis if dataset.is_segmentation else write_analysis
        selected = best_epochs[0] if best_epochs else None  # the first model's, which the figures show
        analysis_md, image_scores = write_analysis_of(workdir, config, dataset, predictions, selected)
        write_views(workdir, config, s.model, chosen, dataset, convs, feature_layer, selected=selected)
        stats, table = write_summary(workdir, config, dataset, info, history, analysis_md, best_epochs, image_scores)
    report(f"\n{table}\n\nwrote {workdir}/ ({', '.join(sorted(p.name for p in workdir.iterdir()))})")
    remove_if_temporary(workdir)
    return RunResult(workdir, history, stats, chosen, info)


def _data_record(workdir):
    """history.json's record of the data a run read (its source, counts and shapes), or None."""
    recorded = recorded_history(workdir, "info", "data")
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("source"), str) else None


def shards_note(num_examples, shards):
    """What a data-parallel run leaves out (parallel.shard_training_set cuts equal shards), or '': 4 of 4,500
    examples on 8 devices went unsaid, --drop_last false or not."""
    left_out = num_examples % shards
    return (f"note: {left_out} of the {num_examples:,} training examples are left out of training: each of the "
            f"{shards} devices trains on an equal shard of {num_examples // shards:,}") if left_out else ""


def _data_dir_record(dataset, data_dir, given=False):
    """The --data-dir a run read its files from, for `evaluate` and `figures` to read again: its source names
    the file found there (GTSRB's training zip, without the test zip beside it), for people. Nothing for a
    dataset given from Python (not $FLAXLAB_DATA_DIR's, which it did not read)."""
    data_dir = data_lib.data_dir_or_default(data_dir)
    if given or not data_dir or not dataset.source.startswith("files:"):
        return {}
    return {"data_dir": str(Path(data_dir).expanduser().resolve())}


def _recorded_data_dir(workdir, recorded):
    """Where a run read its files ('files:PATH'), or None (the shipped sample, TFDS); refused without a record
    (scoring the shipped sample instead of what the run read went unsaid), and for arrays given from Python
    (the config names MNIST: they were scored on its sample)."""
    if recorded is None:
        raise UsageError(f"{Path(workdir) / 'history.json'} is missing or holds no record of the data the run "
                         "read: pass --data-dir")
    kind, _, rest = recorded["source"].partition(":")
    if kind not in ("files", "sample", "tfds"):
        raise UsageError(f"{workdir} trained on data given from Python ('{recorded['source']}'): pass that "
                         "flaxlab.data.Dataset again, as dataset=")
    if kind != "files":
        return None
    return recorded.get("data_dir") or rest.split(" (")[0]  # an older run's: a folder holding " (" is cut short


def _run_config(workdir):
    if not isinstance(workdir, (str, os.PathLike)):
        raise UsageError(f"a run folder is a path, got {type(workdir).__name__} {workdir!r}")
    if not Path(workdir).is_dir():
        what = "a file, not a run folder" if Path(workdir).exists() else "no such folder"
        raise UsageError(f"--workdir {workdir}: {what}")
    try:
        config = json.loads((Path(workdir) / "config.json").read_text())
    except (OSError, ValueError):
        raise UsageError(f"{Path(workdir) / 'config.json'} is missing or not JSON; is {workdir} a run "
                         "folder?") from None
    if not isinstance(config, dict):
        raise UsageError(f"{Path(workdir) / 'config.json'} holds no run's config (a JSON object); is {workdir} a "
                         "run folder?")
    if config.get("sweep"):
        raise UsageError(f"{workdir} is a sweep's folder; a sweep keeps no states once it ends (a run of one "
                         "variant, with its options, keeps its own)")
    from flaxlab.models import MODELS
    network = (config.get("model") or {}).get("name")
    if isinstance(network, str) and network not in MODELS:
        raise UsageError(f"{workdir} trained a network flaxlab does not know, '{network}' (registered from Python "
                         "in models.MODELS?): register it again, then call flaxlab.runner's functions from Python")
    try:  # an edited file: its message names the file, not an option nobody passed
        return config_lib.validate(config)
    except UsageError as e:
        raise UsageError(f"{Path(workdir) / 'config.json'} is damaged: {e}") from None


def _restore_run(workdir, data_dir, dataset=None, **fields):
    """A run folder's config (with `fields` set), data, set-up and last checkpoint: (config, dataset, setup,
    states, progress), the states being each model's best-validation state when the run kept one. Without
    `data_dir`, the data the run read (it scored the shipped sample instead, whatever the run trained on);
    a `dataset` given (one of the run's shapes) is used instead."""
    workdir = Path(workdir)
    config = config_lib.validate({**_run_config(workdir), **fields})
    recorded = _data_record(workdir)
    if data_dir is None and dataset is None:
        data_dir = _recorded_data_dir(workdir, recorded)
        if data_dir and not Path(data_dir).exists():
            raise UsageError(f"{workdir} was trained on {data_dir}, which is not there now: pass --data-dir")
        if not data_dir and config["data"].get("source") == "auto":  # not $FLAXLAB_DATA_DIR's or a new TFDS copy
            config["data"]["source"] = recorded["source"].partition(":")[0]
        dataset = load_dataset(config, data_dir)
        if why := data_differs(recorded, dataset):  # the files changed since
            raise UsageError(f"{workdir} was {why}")
    else:
        dataset = load_dataset(config, data_dir, dataset)
    # other data of the run's kind are fine; of other shapes the checkpoint was blamed ("another model's")
    given = (list(dataset.train.images.shape[1:]), dataset.num_classes)
    trained = given if recorded is None else (recorded.get("image_shape", given[0]),
                                              recorded.get("num_classes", given[1]))
    if trained != given:
        show = lambda shape, classes: f"{'x'.join(map(str, shape))} images of {classes} classes"  # noqa: E731
        raise UsageError(f"{workdir} trained on {recorded['source']}, {show(*trained)}, and the data given is "
                         f"{show(*given)} ({dataset.source})")
    s = set_up(restored_from_checkpoint(config), dataset)
    checkpoints = Checkpoints(workdir, every=0)
    try:
        states, best, progress = checkpoints.restore(s.states, with_best=bool(config["best_metric"]))
    finally:
        checkpoints.close()
    return config, dataset, s, (best if best is not None else states), progress


def _selected_epochs(config, progress):
    """Each model's selected epoch in a checkpoint's progress record, or None when the run selected none."""
    return (progress.get("best_epochs") or {}).get("epoch") if config["best_metric"] else None


def _kept(config, progress):
    best = _selected_epochs(config, progress)
    if best:
        return (f"the best-validation state (epoch {', '.join(map(str, best))}) kept in epoch "
                f"{progress['epoch']}'s checkpoint")
    return f"the state of epoch {progress['epoch']}'s checkpoint"


def draw_from_checkpoint(workdir, data_dir=None, layer="", image=0, log=print, dataset=None):
    """Filters and one layer's feature maps of a finished (or interrupted) run, from its last checkpoint:
    each model's best-validation state when the run kept one. Writes features-LAYER-IMAGE.png. `dataset`: the
    flaxlab.data.Dataset a run from Python trained on."""
    workdir = Path(workdir)
    if workdir.is_dir() and (why := unwritable(workdir)):  # a missing folder is _restore_run's to name
        raise UsageError(f"--workdir {workdir}: {why}, and figures are drawn into the run folder")
    if image < 0:  # else the config's check named --features.image, which `figures` does not take
        raise UsageError(f"--image must not be negative, got {image}")
    config, dataset, s, states, progress = _restore_run(workdir, data_dir, dataset,
                                                        features={"layer": layer, "image": image})
    convs, layer = check_views(config, s.model, dataset, named={"layer": "--layer", "image": "--image"})
    if not convs:
        raise UsageError(f"{config['model']['name']} has no convolutions to draw")
    name = f"features-{layer.replace('/', '.')}-{image}.png"
    best = _selected_epochs(config, progress)
    selected = best[0] if best else None  # the first model's, which the figures show
    write_views(workdir, config, s.model, states, dataset, convs, layer, name, selected)
    drawn = [f"{workdir}/filters.png", f"{workdir}/{name}"]
    if dataset.is_segmentation:  # the mask the first model predicts for the same image
        prediction = np.asarray(parallel.to_host(s.trainer.predict(states, s.test_data)))[0]
        drawn.append(f"{workdir}/overlay-{image}.png")
        draw_overlay(Path(drawn[-1]), config, dataset, prediction,
                     analysis.dice_per_image(prediction, dataset.test.labels), image, selected)
    log(f"drew {', '.join(drawn[:-1])} and {drawn[-1]} from {_kept(config, progress)}")


def evaluate_checkpoint(workdir, data_dir=None, flip=False, log=print, dataset=None):
    """Val and test scores of a run's kept state, optionally averaged over each image and its mirror
    (--eval_flip): a finished run rescored without training it again. Returns {split: summarize(...)}.
    `dataset`: the flaxlab.data.Dataset a run from Python trained on (or others of its shapes)."""
    config, dataset, s, states, progress = _restore_run(workdir, data_dir, dataset, eval_flip=flip)
    how = "each image and its left-right mirror" if flip else "the images as they are"
    log(f"{config['name']}: {_kept(config, progress)}, on {how}; data: {dataset.source}")
    recorded = _data_record(workdir)
    if recorded and data_differs(recorded, dataset):  # 68% where its own test split gave 54%: 37 of 50 trained on
        log(f"note: {workdir} trained on {recorded['source']} ({recorded.get('train_examples', 0):,} train), and "
            f"these are other data ({len(dataset.train):,} train): their test split may hold images the run trained "
            f"on, so these scores are not its test scores")
    if warning := flip_warning(config, ["--flip"] if flip else []):
        log(f"warning: {warning}")
    scores = {}
    for name, split in (("val", s.val_data), ("test", s.test_data)):
        if split is None:
            continue
        scores[name] = summarize(s.trainer.evaluate(states, split))
        figures = "  ".join(f"{key} {' '.join(metrics.format_score(key, v) for v in values)}"
                            for key, values in scores[name].items())
        log(f"{name} ({split['label'].shape[0]:,} examples): {figures}")
    return scores


def _stand_in_dataset(workdir, config):
    """Zeros of the shapes a run trained on (history.json's record): what restoring its state needs, so that
    `predict` needs neither the data nor the time to load it; and the training images' mean pixel, if recorded."""
    recorded = recorded_history(workdir, "info", "data")
    try:
        shape, num_classes = tuple(recorded["image_shape"]), int(recorded["num_classes"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{Path(workdir) / 'history.json'} is missing or holds no data record; is {workdir} a "
                         "finished run's folder?") from None
    from flaxlab.seg_data import LAYOUTS
    label_shape = shape[:2] if config["data"]["name"] in LAYOUTS else ()
    count = 8 * config["batch_size"]  # a whole batch on every device
    split = data_lib.Split(np.zeros((count, *shape), np.uint8), np.zeros((count, *label_shape), np.int32))
    names = recorded.get("class_names")
    dataset = data_lib.Dataset(recorded.get("name", config["data"]["name"]), recorded.get("source", ""), split, split,
                               num_classes, val=split, class_names=tuple(names) if names else None)
    return dataset, recorded.get("pixel_mean")


@dataclasses.dataclass
class LoadedRun:
    """A finished (or interrupted) run's network and each model's kept variables, for use from Python:
    `model.apply(variables[i], images / 255)` is model i's logits, as `predict` computes them in float32 (a run
    with --eval_flip also averages each image's mirror's; one with --data.equalize_histograms takes images
    equalised by flaxlab.data.equalize, as `logits` does)."""
    config: dict
    model: object  # the linen module
    variables: list  # per model (seed order): {"params": ..., "batch_stats": ...} as numpy arrays
    epoch: int  # of the checkpoint read
    selected_epochs: list  # each model's, when the run kept its best-validation states; else None
    class_names: tuple
    image_shape: tuple  # (height, width, channels) of the images the run trained on

    def logits(self, images, model=None):
        """uint8 images (N, h, w, channels) at the run's size -> logits, (models, N, ...) or model `model`'s.
        Images of other sizes or files: `predict_images` resizes them."""
        from flaxlab.train import preprocess
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != tuple(self.image_shape):
            raise UsageError(f"logits takes uint8 images shaped (N, {', '.join(map(str, self.image_shape))}), as the "
                             f"run trained on; got {images.dtype} {images.shape} (predict_images resizes images)")
        if model is not None and not 0 <= model < len(self.variables):
            count = len(self.variables)
            raise UsageError(f"model {model}: the run has {count} model(s), 0 to {count - 1}")
        if self.config["data"].get("equalize_histograms"):
            images = data_lib.equalize(images)
        chosen = self.variables if model is None else [self.variables[model]]
        out = np.stack([np.asarray(self.model.apply(v, preprocess(jnp.asarray(images)), train=False)) for v in chosen])
        return out if model is None else out[0]


def load_run(workdir):
    """A run folder's network and kept variables (`LoadedRun`), read without its data: each model's
    best-validation state when the run kept one, else its last checkpoint's."""
    config = _run_config(workdir)
    dataset, _ = _stand_in_dataset(workdir, config)
    config, _, s, states, progress = _restore_run(workdir, None, dataset)
    variables = parallel.to_host(states.variables())
    count = len(jax.tree.leaves(variables)[0])
    return LoadedRun(config, s.model, [jax.tree.map(lambda a: a[i], variables) for i in range(count)],
                     progress["epoch"], _selected_epochs(config, progress),
                     dataset.class_names or tuple(map(str, range(dataset.num_classes))), dataset.train.images.shape[1:])


def _inversion_notes(images, files, pixel_mean, invert):
    """A note for images whose dark and light look swapped against the training images' (ink on paper against
    MNIST's light on dark), decided image by image, so that a folder mixing both names the swapped ones. Only
    where the training images are clearly dark or light: a bright photo of a traffic sign is not inverted."""
    if pixel_mean is None or abs(pixel_mean - 127.5) < 64:
        return []
    means = images.reshape(len(images), -1).mean(1)
    swapped = [i for i, mean in enumerate(means)
               if abs(mean - pixel_mean) > 64 and abs(255 - mean - pixel_mean) < abs(mean - pixel_mean)]
    flag = "without" if invert else "with"
    if len(swapped) == len(images):
        mean = float(means.mean())
        return [f"note: these images' mean pixel is {mean:.0f} of 255, the training images' {pixel_mean:.0f}; "
                f"{flag} --invert they would be nearer (dark and light swapped?)"]
    if swapped:
        named = ", ".join(str(files[i]) for i in swapped[:5]) + (", ..." if len(swapped) > 5 else "")
        return [f"note: {len(swapped)} of {len(images)} images ({named}) look dark and light swapped against the "
                f"training images (mean pixel {pixel_mean:.0f} of 255): predict them again {flag} --invert"]
    return []


def predict_images(workdir, paths, top=None, invert=False, out=None, log=print):
    """A run's kept state on image files (`paths`: files and folders, one path, or an array of uint8 images): for
    each, its `top` classes and their probabilities (the mean over the run's models), or for a segmentation run
    the predicted mask at the image's own size, as out/NAME.png."""
    from flaxlab import image_data
    workdir = Path(workdir)
    if top is not None and top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    config = _run_config(workdir)
    dataset, pixel_mean = _stand_in_dataset(workdir, config)
    segmentation = dataset.is_segmentation
    if segmentation and top is not None:
        raise UsageError("--top is for classification runs; a segmentation run writes each image's mask")
    top = top or 3
    if segmentation:
        default = workdir / "predicted-masks"
        out = Path(out) if out else default
        # an earlier predict's masks, where this one writes by default: replaced once this one has its masks
        earlier = out == default and out.is_dir() and all(p.suffix == ".png" and p.is_file() for p in out.iterdir())
        if why := unwritable(out):
            raise UsageError(f"--out {out}: {why}")
        if not earlier and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out}: masks go to a new or empty folder, and {out} is "
                             f"{'a file' if not out.is_dir() else 'not empty'}: name another with --out DIR")
    elif out:
        raise UsageError("--out is for segmentation runs' masks; a classification run prints its classes")
    size, channels = dataset.train.images.shape[1:3], dataset.train.images.shape[3]
    images, files, sizes = image_data.read_images(paths, size, channels, log=log)
    stems = [Path(f).stem for f in files]
    if segmentation and len(set(stems)) < len(stems):
        twice = next(s for s in stems if stems.count(s) > 1)
        raise UsageError(f"two images named {twice}: their masks would both be {out / twice}.png")
    if invert:
        images = 255 - images
    if config["data"].get("equalize_histograms"):
        images = data_lib.equalize(images)
    batch = min(config["eval_batch_size"], -(-len(images) // 8) * 8)
    config, _, s, states, progress = _restore_run(workdir, None, dataset, eval_batch_size=batch)
    labels = np.zeros((len(images), *dataset.train.labels.shape[1:]), np.int32)  # unused: the split's shape
    data = data_lib.to_device(data_lib.Split(images, labels))
    probabilities = np.asarray(parallel.to_host(s.trainer.predict(states, data, probabilities=True))).mean(0)
    models = f", the mean of {config['seeds']} models' probabilities" if config["seeds"] > 1 else ""
    log(f"{config['name']}: {_kept(config, progress)}{models}; images resized to "
        f"{size[0]}x{size[1]}{', greyscale' if channels == 1 else ''}{', inverted' if invert else ''}")
    for line in _inversion_notes(images, files, pixel_mean, invert):
        log(line)
    tiny = [f"{file} ({h}x{w})" for file, (h, w) in zip(files, sizes) if h < size[0] / 4 or w < size[1] / 4]
    if tiny:  # a 1x1 image came out 100% foreground, without a word
        log(f"note: {len(tiny)} image{'s' * (len(tiny) > 1)} far smaller than the {size[0]}x{size[1]} the network "
            f"learnt from, blown up to it: little for it to go on ({', '.join(tiny[:3])}{', ...' * (len(tiny) > 3)})")
    if not segmentation:
        names = dataset.class_names or [str(c) for c in range(dataset.num_classes)]
        for file, p in zip(files, probabilities):
            best = np.argsort(-p, kind="stable")[:top]
            log(f"{file}: " + ", ".join(f"{names[c]} ({100 * p[c]:.1f}%)" for c in best))
        return probabilities
    from PIL import Image
    if earlier:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for file, p, (h, w) in zip(files, probabilities, sizes):
        mask = Image.fromarray((p.argmax(-1) * 255).astype(np.uint8)).resize((w, h), Image.NEAREST)
        target = out / f"{Path(file).stem}.png"
        mask.save(target)
        log(f"{file}: foreground {100 * (np.asarray(mask) > 0).mean():.1f}% of its pixels -> {target}")
    return probabilities
