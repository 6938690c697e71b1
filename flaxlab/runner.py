"""One experiment end to end: config -> data -> N stacked models trained -> history, table, figure.

Everything that can be wrong with the input (config values, data) is checked before the run
folder is created, so a bad command writes nothing.
"""
import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxlab import config as config_lib
from flaxlab import data as data_lib
from flaxlab import analysis, metrics, plots
from flaxlab.errors import UsageError
from flaxlab.models import count_params, make_model
from flaxlab.augment import make_augment
from flaxlab.progress import Progress
from flaxlab.train import STACKABLE, Trainer, summarize


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


def stacked_hparams(config, variants):
    """Per-model values (variant-major, seeds inner) of the STACKABLE fields that some model needs."""
    flat = config_lib.flatten(config)
    out = {}
    for key in STACKABLE:
        if any(key in v for v in variants) or (key == "l1" and flat["l1"]):
            out[key] = [v.get(key, flat[key]) for v in variants for _ in range(config["seeds"])]
    return out


def set_up(config, dataset, variants=({},)):
    """Model, trainer, independently initialised states and the data on the device.

    One model per (variant, seed), variant-major; `variants` may only change STACKABLE fields, and
    seed i of every variant starts from the same weights, as a single run with seed + i would.
    """
    model = make_model(config["model"], dataset.num_classes)
    num_models = len(variants) * config["seeds"]
    trainer = Trainer(model, config["optimizer"], num_models=num_models,
                      batch_size=config["batch_size"], eval_batch_size=config["eval_batch_size"],
                      epoch_mode=config["epoch_mode"], scan_steps=config.get("scan_steps") or None,
                      model_axis=config.get("model_axis", "auto"), augment=make_augment(config.get("augment")))
    keys = jax.vmap(jax.random.split)(seed_keys(config["seed"], config["seeds"]))
    keys = jnp.concatenate([keys] * len(variants))
    states = trainer.init(keys[:, 0], dataset.train.images.shape[1:], stacked_hparams(config, variants))
    return Setup(model, trainer, states, keys[:, 1], data_lib.to_device(dataset.train),
                 data_lib.to_device(dataset.test))


def write_json(path, obj):
    """Writes JSON atomically: a run folder never holds a half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_dataset(config, data_dir=None, dataset=None, batch_sizes=None):
    """The config's dataset (unless given), checked to hold a batch of every size the run will train with."""
    if dataset is None:
        dataset = data_lib.load(data_dir=data_dir, **config["data"])
    for batch_size in batch_sizes or [config["batch_size"]]:
        if batch_size > len(dataset.train):
            raise UsageError(f"--batch-size {batch_size} is larger than the training set ({len(dataset.train)} examples)")
    return dataset


def default_workdir(name):
    return Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def fit(trainer, states, train_data, test_data, keys, epochs, progress=True, log=print, on_epoch=None):
    """The epoch loop: train every model, evaluate, record. The only host sync is at an epoch's end."""
    history = metrics.new_history()
    bar = Progress(epochs, enabled=progress, log=log)
    for epoch in range(1, epochs + 1):
        bar.begin_epoch(epoch)
        t0 = time.perf_counter()
        states, train_sums = trainer.train_epoch(states, train_data, keys, epoch, on_step=bar.on_step)
        jax.block_until_ready(states)  # the epoch's only sync: it makes the timing honest
        seconds = time.perf_counter() - t0
        train, test = summarize(train_sums), summarize(trainer.evaluate(states, test_data))
        metrics.append_epoch(history, epoch, seconds, train, test)
        if on_epoch is not None:
            on_epoch(history)
        bar.end_epoch(f"train loss {np.mean(train['loss']):.4f} acc {100 * np.mean(train['accuracy']):.2f}%  "
                      f"test loss {np.mean(test['loss']):.4f} acc {100 * np.mean(test['accuracy']):.2f}%")
    return states, history


def write_analysis(workdir, config, dataset, predictions):
    """For the first seed: confusion.png (counts and row-normalised), misclassified.png; returns the
    most confused pairs as Markdown. The matrices of every seed go to confusion.json."""
    labels = dataset.test.labels
    matrices = [analysis.confusion_matrix(labels, p, dataset.num_classes) for p in predictions]
    write_json(workdir / "confusion.json", {"rows_true_columns_predicted": [m.tolist() for m in matrices]})
    title = f"{config['name']} (seed {config['seed']}), {dataset.name} test"
    plots.confusion_figure(matrices[0], workdir / "confusion.png", title)
    plots.misclassified_grid(dataset.test.images, labels, predictions[0], workdir / "misclassified.png", title)
    return analysis.confused_pairs_markdown(analysis.most_confused_pairs(matrices[0]))


def write_summary(workdir, config, dataset, info, history, confused_pairs=""):
    """results.md (the trial table with the run's facts) and curves.png; returns stats and table."""
    stats = metrics.final_stats(history)
    table = metrics.markdown_table(stats)
    counts = f"{len(dataset.train):,} train / {len(dataset.test):,} test"
    if confused_pairs:
        confused_pairs = f"\nMost confused classes (seed {config['seed']}, test split):\n\n{confused_pairs}\n"
    (workdir / "results.md").write_text(
        f"# {config['name']}\n\n{config.get('description', '')}\n\n"
        f"- data: {dataset.source}, {counts} examples\n"
        f"- model: {info['learnable_weights']:,} learnable weights; {info['seeds']} seed(s) from seed "
        f"{config['seed']}; {config['epochs']} epochs\n"
        f"- {info['backend']} ({info['device']}), jax {info['jax']}: compile {info['compile_s']} s, "
        f"train {info['train_s']} s, {info['steps_per_s']} steps/s\n\n{table}\n{confused_pairs}")
    plots.learning_curves(history, workdir / "curves.png",
                          f"{config['name']}: {dataset.name} ({dataset.source.split(':')[0]}, {counts})")
    return stats, table


def run_experiment(config, workdir=None, data_dir=None, dataset=None, progress=True, log=print):
    """Trains config['seeds'] models of one experiment as one program and writes its run folder.

    Writes config.json, history.json (per epoch, one value per seed; rewritten after every epoch),
    results.md (the trial table and the most confused classes), curves.png (loss and accuracy, train vs
    test), confusion.png/.json and misclassified.png.
    """
    config_lib.validate(config)
    dataset = load_dataset(config, data_dir, dataset)
    s = set_up(config, dataset)
    trainer = s.trainer
    info = {"experiment": config["name"], "data": dataset.describe(),
            "learnable_weights": count_params(jax.tree.map(lambda a: a[0], s.states.params)),
            "backend": jax.default_backend(), "device": str(jax.devices()[0]), "jax": jax.__version__,
            "epoch_mode": trainer.epoch_mode, "model_axis": trainer.model_axis, "seeds": config["seeds"]}
    log(f"{config['name']}: {s.model.__class__.__name__} with {info['learnable_weights']:,} learnable weights, "
        f"{config['seeds']} seed(s), {config['epochs']} epochs on {info['backend']} ({trainer.epoch_mode} mode)")
    log(f"data: {dataset.source} ({len(dataset.train):,} train / {len(dataset.test):,} test examples)")
    info["compile_s"] = round(trainer.compile(s.states, s.train_data, s.test_data), 3)

    workdir = Path(workdir) if workdir else default_workdir(config["name"])
    workdir.mkdir(parents=True, exist_ok=True)  # only now: bad input has been refused by this point
    write_json(workdir / "config.json", config)
    save_history = lambda history: write_json(workdir / "history.json", {"info": info, "history": history})
    states, history = fit(trainer, s.states, s.train_data, s.test_data, s.train_keys, config["epochs"],
                          progress=progress, log=log, on_epoch=save_history)

    train_s = sum(history["epoch_time_s"])
    steps = trainer.steps_per_epoch(len(dataset.train)) * config["epochs"]
    info.update(train_s=round(train_s, 3), steps_per_s=round(steps / train_s, 1),
                images_per_s=round(steps * config["batch_size"] * config["seeds"] / train_s))
    save_history(history)
    predictions = np.asarray(trainer.predict(states, s.test_data))
    confused_pairs = write_analysis(workdir, config, dataset, predictions)
    stats, table = write_summary(workdir, config, dataset, info, history, confused_pairs)
    log(f"\n{table}\n\nwrote {workdir}/ ({', '.join(sorted(p.name for p in workdir.iterdir()))})")
    return RunResult(workdir, history, stats, states, info)
