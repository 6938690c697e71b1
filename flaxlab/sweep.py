"""Sweeps: many variants of one experiment in as few compiled programs as their shapes allow.

A sweep is a list of variants, each a few dotted config fields ({"model.dropout": 0.2}), taken
from the experiment's `sweep` field or from `--grid key=v1,v2` (the cartesian product of all
grids). Variants that differ only in STACKABLE fields (learning rate, weight decay, L1, dropout
rate) and seeds become one program, their models stacked; every other difference (widths, depth,
activation, optimizer) is a separate program, run one after another in the same command.
"""
import csv
import dataclasses
import io
import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np

from flaxlab import config as config_lib
from flaxlab import analysis, metrics, parallel, plots, tensorboard
from flaxlab.checkpoint import CHECKPOINT_DIR, Checkpoints, kept_epochs
from flaxlab.errors import UsageError
from flaxlab.runner import (check_resumable, check_workdir, data_differs, default_workdir, fit, flip_warning,
                            folder_of_this_process, load_dataset, make_workdir, marked_as_training, pretrained_weights,
                            remove_earlier_run, remove_if_temporary, set_up, write_atomically, write_json)
from flaxlab.train import STACKABLE, check_split


# fields a grid cannot vary, and why (a grid over any of them trained the same models under other names)
NOT_SWEPT = {"seeds": "every variant trains --seeds N models", "distributed": "it is set once per process",
             "deterministic": "it is set once per process",
             "checkpoint_every": "it says how often the sweep saves its programs, not how a model trains",
             "features": "a sweep draws no feature maps"}
IGNORED_BY_SWEEP = {"features": NOT_SWEPT["features"]}  # as options, too


def why_not_swept(key):
    """Why a sweep cannot vary the dotted field `key` (itself or its section is in NOT_SWEPT), or None."""
    return NOT_SWEPT.get(key) or NOT_SWEPT.get(key.split(".")[0])


def resolve_key(config, key):
    """A dotted field by its full name or by a unique last part: `dropout` -> `model.dropout`."""
    key = key.replace("-", "_")
    matches = config_lib.fields_named(config, key)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"--grid {key} is ambiguous: {', '.join(matches)}")
    fields = [k for k in config_lib.flatten(config) if k not in config_lib.FIXED]
    griddable = sorted(k for k in fields if not why_not_swept(k))
    near = config_lib.field_hint(key, griddable, spellings=[k.rpartition(".")[2] for k in griddable])  # dropuot
    raise UsageError(f"unknown field '{key}' in --grid{near}; fields: {', '.join(griddable)}")


def parse_grid(config, specs):
    """`--grid` texts ("dropout=0,0.1" or, for a list field, "model.features=8,16/16,32") -> variants."""
    flat = config_lib.flatten(config)
    axes = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not values.strip():
            raise UsageError(f"bad --grid '{spec}': expected field=value1,value2,...")
        key = resolve_key(config, name.strip())
        if why := why_not_swept(key):
            raise UsageError(f"--grid cannot vary {key}: {why}")
        separator = "/" if isinstance(flat[key], (tuple, list)) else ","
        if not all(v.strip() for v in values.split(separator)):  # 'lr=0.1,,0.2' or 'dropout=0,': a typo
            raise UsageError(f"bad --grid '{spec}': an empty value between '{separator}'s")
        try:
            parsed = [config_lib.parse_value(key, v.strip(), flat[key]) for v in values.split(separator)]
        except UsageError as e:
            if separator == "/":  # '8-16,16-32' for two variants: say how --grid takes a list field's values
                raise UsageError(f"{e}; --grid separates a list field's values with /: "
                                 f"{name.strip()}=8,16/16,32") from None
            raise
        if len(set(map(repr, parsed))) != len(parsed):
            raise UsageError(f"--grid {key} repeats a value")
        axes.append([(key, v) for v in parsed])
    if len({key for axis in axes for key, _ in axis[:1]}) != len(axes):
        raise UsageError("--grid names the same field twice")
    return [dict(point) for point in itertools.product(*axes)]


def _format(value):
    if isinstance(value, (tuple, list)):
        return "-".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def variant_label(variant):
    if "label" in variant:
        return variant["label"]
    return ", ".join(f"{key.split('.')[-1]}={_format(value)}" for key, value in variant.items()) or "base"


def variant_config(config, variant):
    out = config_lib.with_fields({**config, "sweep": ()}, variant)
    return config_lib.validate(config_lib.drop_unused(out, config, set(variant)))


@dataclasses.dataclass
class Program:
    """One compiled program of a sweep: a config and the variants whose models it stacks."""
    config: dict
    variants: list  # of (label, overrides of STACKABLE fields)


def plan(config, variants):
    """Groups variants by everything but their STACKABLE fields, in first-seen order."""
    if not variants:
        raise UsageError(f"{config['name']} defines no sweep; give one or more --grid field=v1,v2")
    labels = [variant_label(v) for v in variants]
    if len(set(labels)) != len(labels):
        raise UsageError("two variants of the sweep have the same label")
    swept = {k for v in variants for k in v if k in STACKABLE}
    programs = {}
    for variant, label in zip(variants, labels):
        full = variant_config(config, variant)
        flat = config_lib.flatten(full)
        shape_key = json.dumps({k: v for k, v in flat.items() if k not in STACKABLE and k not in ("name", "description")},
                               sort_keys=True, default=str)
        program = programs.setdefault(shape_key, Program(full, []))
        program.variants.append((label, {k: flat[k] for k in swept}))
    return list(programs.values())


def program_datasets(programs, load):
    """Each program's dataset, loaded once per distinct data config: a grid over a data field (`data.size`,
    `data.val_fraction`) trains each program on its own data; every other sweep shares one dataset.
    `load(config, loaded)` gets the dataset already loaded for that data config, or None."""
    loaded, datasets = {}, []
    for program in programs:
        key = _data_key(program)
        loaded[key] = load(program.config, loaded.get(key))
        datasets.append(loaded[key])
    return datasets


def _data_key(program):
    return json.dumps(program.config["data"], sort_keys=True, default=str)


@dataclasses.dataclass
class SweepResult:
    workdir: Path
    rows: list  # one per variant: label, program, stats
    histories: dict  # label -> history (values per seed)
    programs: list  # per program: variants, models, compile_s, train_s


def _split_history(history, index, seeds):
    out = {"epoch": history["epoch"], "epoch_time_s": history["epoch_time_s"]}
    for key in metrics.history_keys(history):
        out[key] = [values[index * seeds:(index + 1) * seeds] for values in history[key]]
    return out


def variant_row(label, program_index, history, trials=()):
    """A variant's final test score (accuracy, or Dice for segmentation) over its seeds; with `trials` (rows
    of metrics.trial_rows) that selected epochs, first the score at them, the state each model kept."""
    score = metrics.score_name(history)
    stats = {s["metric"]: s for s in metrics.final_stats(history)}
    final, best = stats[f"final test {score}"], stats[f"best test {score}"]
    kept = [t[f"test_{score}"] for t in trials if t["variant"] == label and f"test_{score}" in t]
    selected = {f"selected_test_{score}_mean": float(np.mean(kept)),
                f"selected_test_{score}_std": float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0} if kept else {}
    return {"variant": label, "program": program_index, "seeds": final["n"], **selected,
            f"test_{score}_mean": final["mean"], f"test_{score}_std": final["std"], f"test_{score}_min": final["min"],
            f"test_{score}_max": final["max"], f"best_test_{score}_mean": best["mean"],
            "test_loss_mean": stats["final test loss"]["mean"],
            f"train_{score}_mean": stats[f"final train {score}"]["mean"]}


def markdown_table(rows, first="program"):
    """`first`: what the second column numbers (a sweep's programs; compare's runs)."""
    score = "dice" if "test_dice_mean" in rows[0] else "accuracy"
    fmt = lambda v: metrics.format_score(score, v)  # noqa: E731
    selecting = f"selected_test_{score}_mean" in rows[0]  # the kept models' score leads, as in results.md
    kept = f"test {score} at selected epoch (mean ± std) | " if selecting else ""  # the sample std (n - 1)
    lines = [f"| variant | {first} | seeds | {kept}"
             + f"final test {score} (mean ± std) | min | max | best test {score} (mean) | final test loss |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if selecting else "")]
    for r in rows:
        final = metrics.format_mean_std(score, r[f"test_{score}_mean"], r[f"test_{score}_std"], r["seeds"])
        if selecting:
            final = metrics.format_mean_std(score, r[f"selected_test_{score}_mean"], r[f"selected_test_{score}_std"],
                                            r["seeds"]) + f" | {final}"
        lines.append(f"| {r['variant']} | {r['program']} | {r['seeds']} | {final} | {fmt(r[f'test_{score}_min'])} | "
                     f"{fmt(r[f'test_{score}_max'])} | {fmt(r[f'best_test_{score}_mean'])} | "
                     f"{r['test_loss_mean']:.4f} |")
    return "\n".join(lines)


def csv_text(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _finished_programs(workdir, programs, datasets):
    """What an interrupted sweep's history.json holds of its whole programs: (histories, trials, program info,
    seconds spent), refused when they are not these programs' variants on this data."""
    try:
        saved = json.loads((Path(workdir) / "history.json").read_text())
    except FileNotFoundError:
        return {}, [], [], 0.0  # stopped before its first epoch ended
    except (OSError, ValueError):
        raise UsageError(f"--resume: {Path(workdir) / 'history.json'} is not valid JSON") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("programs"), list):
        raise UsageError(f"--resume: {Path(workdir) / 'history.json'} is not a sweep's history")
    finished = saved["programs"]
    if finished and "trials" not in saved:
        raise UsageError(f"--resume: {workdir} was written by an earlier flaxlab, which kept too little to go on from")
    for info, program, data in zip(finished, programs, datasets):
        if info.get("variants") != [label for label, _ in program.variants]:
            raise UsageError(f"--resume: program {info.get('program')} in {workdir} trained other variants")
        if why := data_differs(info.get("data") or {}, data):
            raise UsageError(f"--resume: {workdir}'s program {info['program']} was {why}")
    labels = [label for info in finished for label in info["variants"]]
    return ({label: saved["variants"][label] for label in labels},
            [row for row in saved.get("trials", []) if row["variant"] in labels], finished, saved.get("wall_s", 0.0))


def _what_an_interrupted_sweep_left(workdir, program, programs, checkpoints):
    """The line a Ctrl-C ends a sweep with: what its folder holds, and where --resume goes on."""
    kept = kept_epochs(checkpoints.directory) if checkpoints else []
    where = (f"program {program}'s checkpoint of epoch {kept[-1]}" if kept else
             f"program {program}'s first epoch" + ("" if checkpoints else
                                                   " (with --checkpoint_every N, from its last N-th epoch)"))
    return (f"{workdir}/history.json holds {program - 1} of {programs} program(s) trained; run the same command "
            f"with --resume to go on from {where}")


def _epochs_text(programs):
    epochs = sorted({p.config["epochs"] for p in programs})  # a grid over epochs gives each program its own
    return f"{' or '.join(map(str, epochs))} epoch{'s' * (epochs != [1])}"


def _train_program(workdir, program, index, program_count, data, weights, *, resume, several, progress, log,
                   on_epoch):
    """Trains one program's variants x seeds side by side: ({variant: its history}, best epochs, per-image Dice
    of segmentation, the program's record). `on_epoch` takes each variant's history so far, after every epoch."""
    labels, seeds = [label for label, _ in program.variants], program.config["seeds"]

    def by_variant(history):
        return {label: _split_history(history, i, seeds) for i, label in enumerate(labels)}
    data_note = (f"; {'x'.join(map(str, data.train.images.shape[1:3]))} images, {len(data.train):,} train"
                 if several else "")
    every = program.config["checkpoint_every"]
    checkpoints = Checkpoints(workdir, every, create=True, part=_checkpoint_part(index)) if every else None
    try:
        log(f"program {index}/{program_count}: {'; '.join(labels)} ({len(labels) * seeds} model(s){data_note})")
        s = set_up(program.config, data, [overrides for _, overrides in program.variants], weights)
        resumed = None
        if resume and checkpoints and checkpoints.latest_epoch() is not None:
            resumed = checkpoints.restore(s.states, with_best=bool(program.config["best_metric"]))
        compile_s = s.trainer.compile(s.states, s.train_data, s.test_data, s.val_data)
        board = tensorboard.Board(workdir, tensorboard.run_names(program.config["seed"], seeds, labels),
                                  first_epoch=resumed[2]["epoch"] + 1 if resumed else 1)

        def end_epoch(history):
            on_epoch(by_variant(history))
            board.log_epoch(history)
        try:
            states, best, history, best_epochs = fit(
                s.trainer, s.states, s.data, s.train_keys, program.config["epochs"],
                select=program.config["best_metric"] or None, patience=program.config["patience"],
                checkpoints=checkpoints, resumed=resumed, progress=progress, log=log, on_epoch=end_epoch,
                variants=labels)
        finally:
            if checkpoints is not None:
                checkpoints.close()
        image_scores = None
        if data.is_segmentation:  # per-image Dice of each model's final (or selected) state
            predictions = parallel.to_host(s.trainer.predict(best if best is not None else states, s.test_data))
            image_scores = [analysis.dice_per_image(p, data.test.labels) for p in predictions]
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_what_an_interrupted_sweep_left(workdir, index, program_count,
                                                                checkpoints)) from None
    train_s = sum(history["epoch_time_s"])
    images = s.trainer.images_per_epoch(len(data.train)) * len(history["epoch"]) * len(labels) * seeds
    info = {"program": index, "variants": labels, "models": len(labels) * seeds, "seed": program.config["seed"],
            "data": data.describe(), "model_axis": s.trainer.model_axis,
            "devices": s.trainer.devices, "parallel": program.config.get("parallel", "data"),
            "compile_s": round(compile_s, 3), "train_s": round(train_s, 3),
            "epochs_run": len(history["epoch"]), "images_per_s": round(images / train_s, 1),
            "stopped_epochs": metrics.stopped_epochs(best_epochs, program.config["patience"], len(history["epoch"]))}
    return by_variant(history), best_epochs, image_scores, info


def _checkpoint_part(index):
    """The folder (under the checkpoints) of the program in training, removed once it is in history.json."""
    return f"program_{index}"


def _program_line(p, seeds, first_seed, several):
    """results.md's line of a trained program (its record in history.json): models, speed, data, early stops."""
    devices = f", {p['devices']} devices, {p.get('parallel', 'data')} parallel" if p.get("devices", 1) > 1 else ""
    epochs = f"{p['epochs_run']} epoch{'s' * (p['epochs_run'] != 1)}"
    line = (f"- program {p['program']}: {', '.join(p['variants'])}: {p['models']} model(s) ({p['model_axis']}"
            f"{devices}), compile {p['compile_s']} s, train {p['train_s']} s ({epochs}, {p['images_per_s']} images/s)")
    if several:
        data = p["data"]
        line += (f"; data: {'x'.join(map(str, data['image_shape'][:2]))} images, {data['train_examples']:,} train / "
                 f"{data['val_examples']:,} val / {data['test_examples']:,} test")
    names = [f"{label} seed {p.get('seed', first_seed) + i}" for label in p["variants"] for i in range(seeds)]
    if note := metrics.stopped_note(p.get("stopped_epochs"), p["epochs_run"], names):
        line += f"; {note}"
    return line


def _write_results(workdir, config, programs, dataset, histories, trials, program_info, rows, wall_s, several):
    """results.md/.csv, trials.csv, trials.png and comparison.png of a finished sweep; its table, for the log."""
    seeds, table = config["seeds"], markdown_table(rows)
    score = metrics.score_name(next(iter(histories.values())))
    selected = (f" (test {score} at each model's best {config['best_metric']} epoch, and at the last)"
                if config["best_metric"] else "")
    write_atomically(workdir / "results.csv", csv_text(rows))
    write_atomically(workdir / "trials.csv", csv_text(trials))
    optimizer_of = {label: p.config["optimizer"]["name"] for p in programs for label, _ in p.variants}
    programs_md = "\n".join(_program_line(p, seeds, config["seed"], several) for p in program_info)
    write_atomically(workdir / "results.md",
        f"# {config['name']}\n\n{config.get('description', '')}\n\n"
        f"- data: {dataset.source}, {len(dataset.train):,} train / "
        f"{f'{len(dataset.val):,} val / ' if dataset.val else ''}{len(dataset.test):,} test examples\n"
        f"- {sum(len(p.variants) for p in programs)} variants x {seeds} seed(s) from seed {config['seed']}, "
        f"{_epochs_text(programs)}; {len(programs)} program(s), {wall_s:.1f} s in all\n{programs_md}\n"
        + "".join(f"- **{label}: {note}**\n" for label, history in histories.items()
                  if (note := metrics.divergence_note(history, optimizer_of[label])))
        + f"\n{table}\n\n{metrics.BEST_TEST_NOTE}\n\n"
        f"Every trial{selected}:\n\n{metrics.trial_table(trials)}\n")
    plots.trial_curves(histories, workdir / "trials.png", f"{config['name']}: loss per trial")
    selected_epochs = {label: [row["selected_epoch"] for row in trials if row["variant"] == label]
                       for label in histories} if config["best_metric"] else None
    plots.sweep_comparison(histories, workdir / "comparison.png",
                           f"{config['name']}: {dataset.name} ({len(dataset.test):,} test), {seeds} seed(s) each",
                           selected_epochs=selected_epochs)
    return table


def run_sweep(config, variants=None, workdir=None, data_dir=None, dataset=None, progress=True, log=print,
              report=None, resume=False):
    """Trains every variant x seed, program by program; writes the sweep's run folder.

    Writes config.json, history.json (per variant, per epoch, one value per seed; rewritten after
    every epoch), results.md and results.csv (mean ± std over seeds per variant) and comparison.png
    (test accuracy and train loss per epoch, one curve per variant). `report` (default: `log`) takes the
    final table and warnings, what a --quiet sweep still prints. With `checkpoint_every` N, the program in
    training keeps a checkpoint every N epochs (removed when it ends); `resume` goes on in `workdir` after
    the programs it finished, the interrupted one from its last checkpoint (or first epoch).
    """
    config = config_lib.note_changes(config_lib.validate(config))
    report = report or log
    parallel.same_launch({**config, "sweep": variants if variants is not None else config.get("sweep")},
                         resume=resume)
    check_workdir(workdir)
    if variants is not None:  # {"optimizer.lr": [0.1, 0.2]} from Python: an AttributeError
        config_lib.check_sweep({"sweep": variants})
    variants = list(config.get("sweep") or ()) if variants is None else list(variants)
    for key in {key for v in variants for key in v if key != "label"}:  # from Python: --grid refuses these
        if why := why_not_swept(key):  # {"seeds": 2} was ignored, then an IndexError once the first epoch ended
            raise UsageError(f"a sweep cannot vary {key}: {why}")
    programs = plan(config, variants)
    for program in programs:  # the devices split each program's models or batches; said before any trains
        check_split(parallel.num_shards(parallel.make_mesh(program.config.get("devices", 0))),
                    program.config.get("parallel", "data"), len(program.variants) * program.config["seeds"],
                    program.config["batch_size"], variants=len(program.variants),
                    model_axis=program.config.get("model_axis", "auto"))
    # every field each variant sets (a program's variants differ only in STACKABLE ones; the rest is the program's)
    saved_config = {**config, "sweep": [dict(v, label=variant_label(v)) for v in variants]}
    if resume:  # in a multi-host run, process 0 holds the folder
        parallel.from_process_0(lambda: check_resumable(saved_config, workdir))
    if dataset is not None and len({_data_key(p) for p in programs}) > 1:
        raise UsageError("this sweep changes data fields, so it loads its datasets itself: pass no dataset")

    def checked():  # what each process reads for itself, and bad input refused before any device work
        # each program's network, batch size and best-model split checked against its data, loaded once per data
        loaded = program_datasets(programs, lambda c, done: load_dataset(c, data_dir, dataset if done is None else done))
        read = {}  # a pretrained network's weights file, read once however many programs start from it
        return loaded, [pretrained_weights(p.config, read) for p in programs]
    datasets, weights = parallel.in_every_process(
        checked, saved_config, fingerprint=lambda done: [d.checksum() for d in {id(d): d for d in done[0]}.values()])
    dataset, several = datasets[0], len({id(d) for d in datasets}) > 1
    seeds = config["seeds"]
    total = sum(len(p.variants) for p in programs)
    epochs = _epochs_text(programs)
    val_count = f" / {len(dataset.val):,} val" if dataset.val else ""
    log(f"{config['name']}: {total} variants x {seeds} seed(s) = {total * seeds} models in {len(programs)} "
        f"program(s), {epochs} each; data: {dataset.source} ({len(dataset.train):,} train{val_count} / "
        f"{len(dataset.test):,} test{', per program below' if several else ''})")
    for warning in dict.fromkeys(filter(None, (flip_warning(p.config) for p in programs))):
        report(f"warning: {warning}")

    histories, trials, program_info, earlier_s = {}, [], [], 0.0
    if resume:
        histories, trials, program_info, earlier_s = parallel.from_process_0(
            lambda: _finished_programs(workdir, programs, datasets))
        if program_info:
            log(f"resuming: program(s) 1-{len(program_info)} of {len(programs)} were trained before")
    workdir = folder_of_this_process(Path(workdir) if workdir else default_workdir(config["name"]), config["name"])
    make_workdir(workdir)
    with marked_as_training(workdir):
        if not resume:
            remove_earlier_run(workdir, log)
            write_json(workdir / "config.json", saved_config)
        rows = [variant_row(label, info["program"], histories[label], trials) for info in program_info
                for label in info["variants"]]
        start = time.perf_counter()

        def save(partial=None):
            write_json(workdir / "history.json", {"data": dataset.describe(), "programs": program_info,
                                                   "variants": {**histories, **(partial or {})}, "trials": trials,
                                                   "wall_s": round(earlier_s + time.perf_counter() - start, 3)})

        for index, (program, data) in enumerate(zip(programs, datasets), 1):
            if index <= len(program_info):
                continue
            trained, best_epochs, image_scores, info = _train_program(
                workdir, program, index, len(programs), data, weights[index - 1], resume=resume, several=several,
                progress=progress, log=log, on_epoch=save)
            labels = list(trained)
            histories.update(trained)
            for i, label in enumerate(labels):
                trials += metrics.trial_rows(label, histories[label], program.config["seed"],
                                             best_epochs[i * seeds:(i + 1) * seeds] if best_epochs else None,
                                             image_scores[i * seeds:(i + 1) * seeds] if image_scores else None)
            program_info.append(info)
            rows += [variant_row(label, index, histories[label], trials) for label in labels]
            for label in labels:
                if note := metrics.divergence_note(histories[label], program.config["optimizer"]["name"]):
                    report(f"warning: {label}: {note}")
            save()
            if config["checkpoint_every"]:  # the program is in history.json: its states are not needed again
                shutil.rmtree(workdir / CHECKPOINT_DIR / _checkpoint_part(index), ignore_errors=True)
        if (workdir / CHECKPOINT_DIR).is_dir() and not any((workdir / CHECKPOINT_DIR).iterdir()):
            (workdir / CHECKPOINT_DIR).rmdir()
        table = _write_results(workdir, config, programs, dataset, histories, trials, program_info, rows,
                               wall_s=earlier_s + time.perf_counter() - start, several=several)
    report(f"\n{table}\n\nwrote {workdir}/ ({', '.join(sorted(p.name for p in workdir.iterdir()))})")
    remove_if_temporary(workdir)
    return SweepResult(workdir, rows, histories, program_info)
