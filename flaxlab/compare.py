"""Runs trained apart, side by side: the TDT4265 report's task 2 net against its task 3 models, a run against
a sweep's variants; and `runs`, the run folders of a folder with how far each has come. Reads each run folder's
history.json (a sweep's: every variant); trains nothing."""
import csv
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flaxlab import metrics, plots
from flaxlab.config import check_sweep, differences, with_field
from flaxlab.errors import UsageError
from flaxlab.runner import default_workdir, make_workdir, unwritable, write_atomically, write_json
from flaxlab.sweep import csv_text, markdown_table, variant_row

WRITES = ("compare.json", "results.md", "results.csv", "trials.csv", "comparison.png")


class Run(NamedTuple):
    folder: Path
    label: str
    history: dict
    first_seed: int
    selected_epochs: list  # each model's selected (best-validation) epoch; None when the run selected none
    data: dict  # the data record of history.json
    config: dict  # the folder's config.json
    image_stats: list = None  # segmentation: each model's (std, min) of its per-image test scores, where written


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _trials_csv(folder):
    try:
        with open(Path(folder) / "trials.csv", newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []


def _sweep_image_stats(rows):
    """{variant: [(std, min) of each seed's per-image test scores]} from a segmentation sweep's trials.csv rows."""
    stats = {}
    for row in rows:
        try:
            stats.setdefault(row["variant"], []).append((float(row["test_images_std"]), float(row["test_images_min"])))
        except (KeyError, TypeError, ValueError):  # classification, or a damaged file
            return {}
    return stats


def _run_image_stats(folder):
    """[(std, min) of each seed's per-image test scores] from a segmentation run's scores.json; None without."""
    scores_json = _read_json(Path(folder) / "scores.json")
    try:
        return [(float(np.std(scores)), float(np.min(scores))) for scores in scores_json["per_seed"]]
    except (TypeError, ValueError, KeyError):  # none, or an edited file (a list, scores as text)
        return None


def _sweep_selected_epochs(rows):
    """{variant: [selected epoch per seed]} from a sweep's trials.csv rows; {} when it selected none."""
    selected = {}
    for row in rows:
        try:
            selected.setdefault(row["variant"], []).append(int(float(row["selected_epoch"])))
        except (KeyError, TypeError, ValueError):  # no selection (or a damaged file): final scores only
            return {}
    return selected


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _well_formed(history):
    """Train and test scores, a list per key with an entry per epoch: a number (the epoch, its time), or one per
    model (the scores: a bare number failed deep in the table)."""
    keys = ("epoch", "train_loss", "test_loss", "test_accuracy")
    if not isinstance(history, dict) or not all(isinstance(history.get(k), list) for k in keys):
        return False
    for key, values in history.items():
        if not isinstance(values, list) or len(values) != len(history["epoch"]):
            return False
        if key.startswith(("train_", "val_", "test_")) and not all(isinstance(value, list) for value in values):
            return False
        rows = [value if isinstance(value, list) else [value] for value in values]
        if len({len(row) for row in rows}) > 1 or not all(_is_number(v) for row in rows for v in row):
            return False
    return True


def _history(history, folder):
    """`history` if it holds finished epochs with train and test scores; None if none yet. An edited file
    (scores as strings, a list cut short) failed deep inside the table or figure."""
    if not _well_formed(history):
        raise UsageError(f"{folder}/history.json is damaged or not a flaxlab run's")
    return history if history["epoch"] else None


def _selected(epochs, history):
    """The selected epochs, if every one is among the history's (a run stopped early kept only its own)."""
    return epochs if epochs and all(e in history["epoch"] for e in epochs) else None


def read_runs(folder):
    """The Runs of a run folder (one) or a sweep's (one per variant), as far as their epochs have come."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    recorded, config = _read_json(folder / "history.json"), _read_json(folder / "config.json")
    if not isinstance(recorded, dict) or not isinstance(config, dict) or "name" not in config:
        raise UsageError(f"{folder} has no readable history.json and config.json: is it a run folder?")
    try:
        check_sweep(config)
    except UsageError as e:
        raise UsageError(f"{folder}/config.json is damaged: {e}") from None
    info = recorded.get("info") or {}
    data = (recorded.get("data", {}), info.get("data", {}) if isinstance(info, dict) else None)  # a sweep's, a run's
    if not all(isinstance(d, dict) for d in data):
        raise UsageError(f"{folder}/history.json is damaged or not a flaxlab run's")
    if "variants" in recorded:  # a sweep
        trials = _trials_csv(folder)
        selected, image_stats = _sweep_selected_epochs(trials), _sweep_image_stats(trials)
        histories = {label: _history(history, folder) for label, history in dict(recorded["variants"]).items()}
        return [Run(folder, f"{config['name']}: {label}", history, config.get("seed", 0),
                    _selected(selected.get(label), history), recorded.get("data", {}), _variant_config(config, label),
                    image_stats.get(label))
                for label, history in histories.items() if history]
    history = _history(recorded.get("history"), folder)
    if not history:
        return []
    return [Run(folder, config["name"], history, config.get("seed", 0), _selected(info.get("selected_epochs"), history),
                info.get("data", {}), config, _run_image_stats(folder))]


def _variant_config(config, label):
    """A sweep's config with the fields its variant `label` sets (as config.json lists them) set."""
    variant = next((v for v in config.get("sweep") or () if isinstance(v, dict) and v.get("label") == label), {})
    for key, value in variant.items():
        if key != "label":
            try:
                config = with_field(config, key, value)
            except UsageError:  # a field this flaxlab no longer has: the variant's label still says it
                pass
    return config


def _listing(folders, runs):
    """A line per folder: its experiment and how its config differs from run 1's; a sweep's variants (indented)
    with what each sets apart from that."""
    first, lines = _read_json(Path(folders[0]) / "config.json"), []
    for i, folder in enumerate(folders, 1):
        config = _read_json(Path(folder) / "config.json")
        mine = [run for run in runs if run.folder == Path(folder)]
        changes = [differences(run.config, first) for run in mine] if config.get("sweep") else [
            differences(config, first)]
        common = [c for c in changes[0] if all(c in other for other in changes)]
        kind = f", a sweep of {len(mine)} variants" if config.get("sweep") else ""
        state = _state(folder, config, _read_json(Path(folder) / "history.json") or {}).split(";")[0]
        unfinished = "" if state.startswith("finished") else f"; unfinished, {state}: scores of its last epoch"
        lines.append(f"run {i}: {folder} ({config['name']}{kind}{unfinished}"
                     + (f"; against run 1: {', '.join(common)})" if common else ")"))
        if config.get("sweep"):
            lines += [f"  - {run.label.split(': ', 1)[1]}: {', '.join(c for c in own if c not in common)}"
                      for run, own in zip(mine, changes) if len(own) > len(common)]
    return lines


def _labels(runs):
    """Each run's label, with its folder as given where two runs of one experiment meet."""
    counts = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    return [run.label if counts[run.label] == 1 else f"{run.label} ({run.folder})" for run in runs]


def check_out(out):
    why = unwritable(out)
    if why:
        raise UsageError(f"--out {out}: {why}")
    out = Path(out)
    others = sorted(p.name for p in out.iterdir() if p.name not in WRITES) if out.is_dir() else []
    if others:
        raise UsageError(f"--out {out} holds files that compare did not write ({', '.join(others[:3])}): give a new "
                         "or empty folder")


def compare_runs(folders, out=None, log=print):
    """Writes OUT/results.md (a table over runs, then every trial), results.csv, trials.csv, comparison.png
    (test score and train loss per epoch, one curve per run) and compare.json; returns the table's rows."""
    for folder in folders:  # one missing folder of two was "compare needs two run folders"
        if not Path(folder).is_dir():
            raise UsageError(f"{folder}: no such folder")
    if len(folders) < 2 and not all("variants" in (_read_json(Path(f) / "history.json") or {}) for f in folders):
        raise UsageError("compare needs two run folders or more (or a sweep's)")
    resolved = [Path(f).resolve() for f in folders]
    if len(set(resolved)) < len(resolved):
        twice = next(f for f, r in zip(folders, resolved) if resolved.count(r) > 1)
        raise UsageError(f"{twice} is given twice")
    runs = []
    for folder in folders:
        found = read_runs(folder)
        if not found:
            raise UsageError(f"{folder} holds no finished epoch yet")
        runs += found
    scores = {metrics.score_name(run.history) for run in runs}
    if len(scores) > 1:
        raise UsageError("compare takes classification runs or segmentation runs, not both (accuracy vs Dice)")
    out = Path(out) if out else default_workdir("compare")
    check_out(out)
    labels = _labels(runs)
    histories = {label: run.history for label, run in zip(labels, runs)}
    selecting = all(run.selected_epochs for run in runs)
    # the JSRT report's F1 std and min over test images, where every run wrote them, of the states the table scores:
    # a run's scores.json holds its selected states' (when it selected), which a table of final scores does not show
    per_image = all(run.image_stats and len(run.image_stats) == np.size(run.history["test_loss"][-1])
                    and bool(run.selected_epochs) == selecting for run in runs)
    rows, trials = [], []
    number = {Path(folder): i for i, folder in enumerate(folders, 1)}  # a sweep's variants share their folder's
    for label, run in zip(labels, runs):
        mine = metrics.trial_rows(label, run.history, run.first_seed, run.selected_epochs if selecting else None)
        for row, (std, least) in zip(mine, run.image_stats if per_image else ()):
            row.update(test_images_std=std, test_images_min=least)
        rows.append({**variant_row(label, number[run.folder], run.history, mine), "epochs": len(run.history["epoch"]),
                     "folder": str(run.folder)})
        trials += mine
    # the same files at another --data.size are other data too (Dice on downsampled masks)
    tested_on = {}  # data -> the runs tested on it, in the runs' order (was sorted by source)
    for run in runs:
        data = (run.data.get("source"), run.data.get("test_examples"),
                "x".join(map(str, (run.data.get("image_shape") or [])[:2])))
        tested_on.setdefault(data, {})[number[run.folder]] = None  # a sweep's variants: its one run number
    note = ("" if len(tested_on) == 1 else
            "**the runs were tested on different data**: " + "; ".join(
                f"run{'s' * (len(on) > 1)} {', '.join(map(str, on))}: {s} ({n} test{f', {size}' if size else ''})"
                for (s, n, size), on in tested_on.items())
            + ", so their scores do not compare exactly")
    table = markdown_table(rows, first="run")
    make_workdir(out)
    score = scores.pop()
    selected_note = " (test score at each model's selected epoch, and at the last)" if selecting else ""
    listing = _listing(folders, runs)
    write_atomically(out / "results.md",
        "# comparison\n\n" + "".join(f"{'  ' if line.startswith(' ') else '- '}{line.strip()}\n" for line in listing)
        + (f"\n{note}\n" if note else "") + f"\n{table}\n\n{metrics.BEST_TEST_NOTE}\n\nEvery trial{selected_note}:\n\n"
        f"{metrics.trial_table(trials)}\n")
    write_atomically(out / "results.csv", csv_text(rows))
    write_atomically(out / "trials.csv", csv_text(trials))
    data = runs[0].data
    on = (" (tested on different data)" if note  # a slide of the figure alone would not say so
          else f" on {data.get('name', '?')} ({data.get('test_examples', 0):,} test)")
    curves = f" ({len(histories)} curves)" if len(histories) > len(folders) else ""  # a sweep's variants
    plots.sweep_comparison(histories, out / "comparison.png", f"{len(folders)} runs{curves}{on}: test {score}, "
                           "train loss", legend="run",
                           selected_epochs={label: run.selected_epochs for label, run in zip(labels, runs)} if selecting
                           else None)
    write_json(out / "compare.json", {"runs": [str(f) for f in folders], "labels": labels})
    if note:
        log(f"note: {note.replace('**', '')}")
    log("\n".join(listing) + f"\n\n{table}\n\nwrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return rows


def _training_or_stopped(found):
    """'training (pid N on HOST since T)' while the process `runner.training_process` found lives, else 'stopped'."""
    if found is None:
        return "stopped"
    return f"training ({found[1]})" if found[0] == "alive" else f"training or stopped ({found[1]})"


def _state(folder, config, recorded):
    """How far a run or sweep has come: 'finished', or training or stopped, and what --resume would go on from."""
    from flaxlab.checkpoint import CHECKPOINT_DIR, kept_epochs
    from flaxlab.runner import training_process
    saved = Path(folder) / CHECKPOINT_DIR
    kept = [epoch for where in (saved, *saved.glob("program_*")) for epoch in kept_epochs(where)]  # a sweep's program
    found = training_process(folder)
    state = _training_or_stopped(found)
    resume = f"; --resume goes on from epoch {kept[-1]}'s checkpoint" if kept and found is None else ""
    if "variants" in recorded:
        done = sum(len(p.get("variants", [])) for p in recorded.get("programs", []))
        total = len(config.get("sweep") or ())
        return "finished" if done == total else f"{state}: {done} of {total} variants{resume}"
    if "train_s" not in (recorded.get("info") or {}):
        return f"{state}{resume}"
    ran = len((recorded.get("history") or {}).get("epoch") or ())
    return "finished, stopped early" if ran < config.get("epochs", ran) else "finished"  # by --patience


def _kept_test(run):
    """(score name, the test score's stats over the run's seeds, at which epoch): the kept models' score,
    at each one's selected epoch when the run selected models by validation (results.md's headline), else
    the final one."""
    name = metrics.score_name(run.history)
    metric, when = (f"test {name} at selected epoch", "selected epoch") if run.selected_epochs else \
        (f"final test {name}", "final")
    return name, next(s for s in metrics.final_stats(run.history, run.selected_epochs) if s["metric"] == metric), when


def _sweep_readable(config):
    try:
        check_sweep(config)
    except UsageError:
        return False
    return True


def list_runs(folder="runs"):
    """The run folders in `folder` (or `folder` itself, a run folder), a row each: experiment, models, epochs,
    state, test score of the kept models (mean ± std over seeds; a sweep's best variant). Returns the Markdown
    table."""
    import datetime
    from flaxlab.runner import is_run_folder, training_process
    folder = Path(folder)
    if folder == Path("runs") and not folder.exists():  # the default, before any run
        return "no runs yet: runs/ does not exist here (a run writes runs/NAME unless --workdir names a folder)"
    if not folder.is_dir():
        raise UsageError(f"{folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}")
    # a folder with a history but no readable config.json is a damaged run, listed as one (it went unlisted)
    looks_like_run = lambda p: is_run_folder(p) or (p / "history.json").is_file()  # noqa: E731
    folders = [folder] if looks_like_run(folder) else sorted(p for p in folder.iterdir() if looks_like_run(p))
    if not folders:
        return f"no run folders in {folder}"
    lines = ["| run folder | experiment | models | epochs | state | test score | last written |",
             "|---|---|---|---|---|---|---|"]
    for path in folders:
        config, recorded = _read_json(path / "config.json"), _read_json(path / "history.json")
        newest = f"{datetime.datetime.fromtimestamp(max(p.stat().st_mtime for p in path.iterdir())):%Y-%m-%d %H:%M}"
        if not is_run_folder(path) or not _sweep_readable(config):
            lines.append("| " + " | ".join([str(path), "", "", "", "config.json damaged", "", newest]) + " |")
            continue
        cells = [str(path), config["name"]]
        try:
            runs = read_runs(path) if isinstance(recorded, dict) else []
        except UsageError:
            runs, recorded = [], "damaged"
        if (recorded is None and (path / "history.json").exists()) or not isinstance(recorded, (dict, type(None))):
            recorded = "damaged"
        if not isinstance(recorded, dict):
            state = ("history.json damaged" if recorded == "damaged" else
                     f"{_training_or_stopped(training_process(path))} before its first epoch ended")
            cells += ["", "" if recorded == "damaged" else f"0 of {config.get('epochs')}", state, ""]
        else:
            best, score = max(runs, default=None, key=lambda run: _kept_test(run)[1]["mean"]), ""
            if best is not None:
                name, kept, when = _kept_test(best)
                score = f"{metrics.format_mean_std(name, kept['mean'], kept['std'], kept['n'])} {name}, {when}"
                score += f" ({best.label.split(': ', 1)[1]}, the best)" if len(runs) > 1 else ""
            models = sum(len(run.history["test_loss"][-1]) for run in runs)
            epochs = max((len(run.history["epoch"]) for run in runs), default=0)
            cells += [str(models or ""), f"{epochs} of {config.get('epochs')}", _state(path, config, recorded), score]
        lines.append("| " + " | ".join(cells + [newest]) + " |")
    return "\n".join(lines)
