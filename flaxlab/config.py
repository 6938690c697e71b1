"""Experiment configs are plain nested dicts; the command line overrides any field by its dotted name.

`--optimizer.lr=0.05`, `--batch-size 64` and `--model.features 8,16,32` all parse against the type of
the default, and every string field with a fixed set of values is checked against it, so a typo is
one clear error before anything runs or is written.
"""
import copy
import json
import math
import numbers
import os

import numpy as np

from flaxlab.errors import UsageError, did_you_mean


def _choices():
    from flaxlab import data, metrics, models, optim, parallel, train
    return {
        "data.name": tuple(data.DATASETS), "data.source": data.SOURCES, "model.name": tuple(models.MODELS),
        "model.activation": tuple(models.ACTIVATIONS), "optimizer.name": optim.OPTIMIZERS,
        "optimizer.schedule": optim.SCHEDULES,
        "epoch_mode": train.EPOCH_MODES, "model_axis": train.MODEL_AXES, "compute_dtype": parallel.COMPUTE_DTYPES,
        "parallel": parallel.PARALLEL_MODES,
        "best_metric": ("", *metrics.SELECTION_METRICS),
    }


FIXED = ("name", "description", "sweep")  # identify the experiment (and its variants); not options
POSITIVE = ("epochs", "batch_size", "seeds", "eval_batch_size", "optimizer.lr", "model.width", "model.depth")
POSITIVE_EACH = ("model.features", "model.hidden")  # layer widths
NON_NEGATIVE = ("l1", "optimizer.weight_decay", "optimizer.momentum", "seed", "scan_steps", "augment.rotate",
                "augment.crop", "augment.jitter", "patience", "checkpoint_every", "features.image", "model.dropout",
                "devices", "model.input_size")
BELOW_ONE = ("augment.jitter", "model.dropout", "optimizer.momentum")  # a momentum of 1 or more diverges
NUMBERS = (*POSITIVE, *NON_NEGATIVE, "data.val_fraction", "data.test_fraction")
WHOLE = ("epochs", "batch_size", "seeds", "eval_batch_size", "model.width", "model.depth", "seed", "scan_steps",
         "augment.crop", "patience", "checkpoint_every", "features.image", "devices", "model.input_size")
SECTIONS = ("data", "model", "optimizer")  # what every config holds, as dicts
# fields that only some values of another field use: {field: (that field, the values that use it, off)}
USED_WITH = {"optimizer.momentum": ("optimizer.name", ("sgd",), 0.0),
             "optimizer.nesterov": ("optimizer.name", ("sgd",), False)}


def flatten(config, prefix=""):
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def fields_named(config, key):
    """The fields `key` can mean: itself, dotted, or those it is the last part of (`lr`: optimizer.lr), as options
    and --grid take them."""
    fields = [k for k in flatten(config) if k not in FIXED]
    return [key] if key in fields else [k for k in fields if k.endswith("." + key)]


def _guessed(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_value(key, text, default):
    """Command-line text to a value of the default's type (a list field takes comma-separated items)."""
    def scalar(t, like):
        if isinstance(like, bool):
            if t.lower() in ("1", "true", "yes", "on"):
                return True
            if t.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return type(like)(t)

    if default is None:  # a field without a default (a network of one's own): a number, a list of them, or text
        items = tuple(_guessed(t.strip()) for t in text.split(","))
        return items if "," in text else items[0]
    try:
        if isinstance(default, (tuple, list)):
            like = default[0] if default else 0
            items = [t.strip() for t in text.split(",")] if text.strip() else []  # '' is the empty list
            if not all(items):  # '8,,16' or ',': a typo, not a list of two or none
                raise UsageError(f"bad value '{text}' for {key}: an empty item between commas")
            return tuple(scalar(t, like) for t in items)
        if key == "model.weights" and text.startswith("~"):  # config.json keeps the file, not the HOME it meant
            return os.path.expanduser(text)
        return scalar(text, default)
    except ValueError:
        kind = "comma-separated list" if isinstance(default, (tuple, list)) else type(default).__name__
        raise UsageError(f"bad value '{text}' for {key}: expected {kind}") from None


def with_field(config, key, value):
    """A copy of `config` with the existing dotted field `key` set to `value`; a new `model.name` drops the old
    network's options that the new one does not take, and its own can then be set, as on the command line."""
    if key.startswith("model.") and isinstance(config.get("model"), dict):
        from flaxlab.models import with_option_default
        config = {**config, "model": with_option_default(config["model"], key.partition("model.")[2])}
    changed = _set_field(config, key, value)
    if key == "model.name" and isinstance(config["model"], dict):
        from flaxlab.models import MODELS, swap_network
        if value in MODELS:  # an unknown name is validate's to report
            changed["model"] = swap_network(changed["model"], config["model"].get("name"))
    return changed


def with_fields(config, fields):
    """`config` with each dotted field of `fields` set (a variant's `label` is no field), `model.name` first: a
    swapped-in network's options are set after it, as on the command line, whatever the dict's order."""
    for key, value in sorted(fields.items(), key=lambda item: item[0] != "model.name"):
        if key != "label":
            config = with_field(config, key, value)
    return config


def _set_field(config, key, value):
    config = copy.deepcopy(config)
    *path, leaf = key.split(".")
    node = config
    for part in path:
        if not isinstance(node.get(part), dict):
            raise UsageError(f"no field '{key}' in the config{_with_field_hint(config, key)}")
        node = node[part]
    if leaf not in node:
        raise UsageError(f"no field '{key}' in the config{_with_field_hint(config, key)}")
    node[leaf] = value.item() if isinstance(value, np.generic) else value  # np.int64(2): a plain 2, as JSON saves it
    return config


def _with_field_hint(config, key):
    """with_field takes full dotted names: `lr` is `optimizer.lr` (as an option, `--lr` is)."""
    named = [k for k in fields_named(config, key) if k != key]
    if len(named) == 1:
        return f" (did you mean {named[0]}? with_field takes the whole dotted name)"
    return field_hint(key, flatten(config))


# what other frameworks and the reports call some fields: a hint for an unknown option, never a silent rename
OTHER_NAMES = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "epoch": "epochs",
               "batch": "batch_size", "bs": "batch_size", "wd": "weight_decay", "trials": "seeds",
               "num_seeds": "seeds", "early_stopping": "patience", "optimizer": "optimizer.name",
               "optim": "optimizer.name", "model": "model.name", "network": "model.name", "dataset": "data.name"}


def field_hint(key, fields, prefix="", spellings=()):
    """' (did you mean --optimizer.lr?)' for an unknown field: the field of its other name (learning_rate: lr), or
    the nearest spelling among `fields` and `spellings`."""
    section, _, leaf = key.rpartition(".")
    other = OTHER_NAMES.get(leaf)
    named = [k for k in fields if other and (k == other or k.endswith("." + other))
             and (not section or k.startswith(section + "."))]
    return (f" (did you mean {prefix}{named[0]}?)" if len(named) == 1
            else did_you_mean(key, [*fields, *spellings], prefix))


def override(config, key, text):
    """A copy of `config` with the dotted `key` set from its command-line text."""
    key = key.replace("-", "_")
    flat = {k: v for k, v in flatten(config).items() if k not in FIXED}
    if key not in flat:
        raise UsageError(f"unknown option '--{key}'{field_hint(key, flat, '--')}; options: "
                         f"{', '.join('--' + k for k in sorted(flat))}")
    return _set_field(config, key, parse_value(key, text, flat[key]))  # drop_unused swaps the network's options


def drop_unused(config, before, given=()):
    """`config` without what only the choices it replaced used, unless `given` (dotted fields the user set;
    validate and make_model refuse those): `--optimizer.name adam` on an SGD-with-momentum experiment turns the
    momentum off, `--model.name mlp` drops the experiment's own network options (models.swap_network)."""
    from flaxlab.models import MODELS, swap_network
    flat, was = flatten(config), flatten(before)
    for key, (owner, users, off) in USED_WITH.items():
        if key in flat and flat[owner] != was.get(owner) and flat[owner] not in users and key not in given:
            config = with_field(config, key, off)
    if config["model"].get("name") in MODELS:  # an unknown name is validate's to report
        config = {**config, "model": swap_network(config["model"], before["model"].get("name"), given)}
    return config


# an experiment's name -> the function that gives its config (the `experiments` package registers its own)
EXPERIMENT_DEFAULTS = {}


def differences(config, reference):
    """'field old -> new' for each option in which `config` differs from `reference` (names and sweeps aside)."""
    flat, base = (flatten(json.loads(json.dumps(c))) for c in (config, reference))  # a tuple is its list

    def show(value):
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value)) or "(empty)"
        return repr(value) if value == "" else str(value)
    keys = [key for key in sorted(set(flat) | set(base))
            if key not in ("name", "description", "sweep") and flat.get(key) != base.get(key)]
    out = [f"{key} {show(base.get(key, '-'))} -> {show(flat.get(key, '-'))}" for key in keys]
    if "model.name" in keys:  # another network: its options, not each of the old one's as gone
        options = ", ".join(f"{key[6:]}={show(value)}" for key, value in flat.items()
                            if key.startswith("model.") and key != "model.name")
        out = [line for line, key in zip(out, keys) if not key.startswith("model.")] + [
            f"model.name {show(base.get('model.name', '-'))} -> {show(flat['model.name'])}"
            + (f" ({options})" if options else "")]
    return sorted(out)


def note_changes(config):
    """The config with its description ending in 'Changed here: ...', the fields in which it differs from its
    experiment's: results.md repeats the description, which told the defaults (a run from Python, 3 epochs of
    one's own network, was described as the report's 20 epochs of its CNN)."""
    make = EXPERIMENT_DEFAULTS.get(config.get("name"))
    if make is None or not isinstance(config.get("description"), str):
        return config
    description = config["description"].split(" Changed here: ")[0]  # a config.json read back: noted afresh
    changed = differences(config, make())
    return {**config, "description": description + (f" Changed here: {', '.join(changed)}." if changed else "")}


def changed_fields(before, after):
    """The dotted fields whose values differ between two configs (what the command line overrode)."""
    before, after = flatten(before), flatten(after)
    return sorted(k for k in after if after[k] != before.get(k) and k not in FIXED)


def check_sweep(config):
    """A sweep's variants are a list of {field: value} ("sweep": "dropout" in an edited config.json was listed
    as 7 variants, and dict("dropout") raised)."""
    sweep = config.get("sweep") or ()
    if not isinstance(sweep, (list, tuple)) or not all(isinstance(v, dict) for v in sweep):
        raise UsageError(f"the sweep must be a list of variants, each {{field: value, ...}}, got {sweep!r}")


NOT_OFFERED = {("optimizer.name", "adamw"): "not offered (AdamW decays the weights apart from the gradient); "
               "--optimizer.name adam with --optimizer.weight_decay is torch's Adam, the decay added to the gradient"}


def validate(config):
    """Raises UsageError for a value outside its allowed set or range."""
    missing = ([s for s in ("name", "epochs", "batch_size") if s not in config]
               + [s for s in SECTIONS if not isinstance(config.get(s), dict)])
    missing += ["model.name"] if isinstance(config.get("model"), dict) and "name" not in config["model"] else []
    if missing:  # a config built by hand in Python
        raise UsageError(f"the config lacks {', '.join(missing)}: start from an experiment's, "
                         "experiments.EXPERIMENTS[name](), and change it with flaxlab.config.with_field")
    check_sweep(config)
    flat = flatten(config)
    for key in NUMBERS:  # with_field(config, "optimizer.lr", "0.1") in Python: a TypeError deep in the run
        if key in flat and (isinstance(flat[key], bool) or not isinstance(flat[key], (int, float))):
            raise UsageError(f"--{key} must be a number, got {flat[key]!r}")
    for key in WHOLE:  # epochs=2.5 or batch_size=100.0 in Python: a TypeError after the run folder was made
        if key in flat and not isinstance(flat[key], int):
            raise UsageError(f"--{key} must be a whole number (an int), got {flat[key]!r}")
    for key, value in flat.items():  # nan passes every comparison below, and inf made a run all NaN
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{key} must be a finite number, got {value}")
    for key, allowed in _choices().items():
        # one letter away from an offered value, which means another thing
        if isinstance(flat.get(key), str) and (key, flat[key]) in NOT_OFFERED:
            raise UsageError(f"--{key} {flat[key]}: {NOT_OFFERED[key, flat[key]]}")
        if key in flat and flat[key] not in allowed:
            raise UsageError(f"unknown value '{flat[key]}' for --{key}{did_you_mean(flat[key], allowed)}; choose one "
                             f"of {', '.join(allowed)}")
    for key in POSITIVE:
        if key in flat and not flat[key] > 0:
            raise UsageError(f"--{key} must be positive, got {flat[key]}")
    for key in NON_NEGATIVE:
        if key in flat and flat[key] < 0:
            raise UsageError(f"--{key} must not be negative, got {flat[key]}")
    for key in (*POSITIVE_EACH, "data.size"):  # "8,16,32" in an edited config.json: a TypeError in a comparison
        if key in flat and (not isinstance(flat[key], (list, tuple))
                            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in flat[key])):
            raise UsageError(f"--{key} must be a list of whole numbers, got {flat[key]!r}")
    for key in POSITIVE_EACH:
        if key in flat and not all(value > 0 for value in flat[key]):
            raise UsageError(f"--{key} must be positive sizes, got {','.join(map(str, flat[key]))}")
    size = flat.get("data.size", ())
    if size and (len(size) != 2 or min(size) < 1):
        raise UsageError(f"--data.size must be HEIGHT,WIDTH with positive sizes, got {','.join(map(str, size))}")
    for key in ("data.val_fraction", "data.test_fraction"):
        if not 0 <= flat.get(key, 0) < 1:
            raise UsageError(f"--{key} must be in [0, 1), got {flat[key]}")
    if flat.get("patience") and not flat.get("best_metric"):
        raise UsageError("--patience (early stopping) needs --best_metric val_loss, val_accuracy or val_dice")
    if flat.get("best_metric") and not flat.get("data.val_fraction"):
        raise UsageError(f"--best_metric {flat['best_metric']} needs a validation split: set --data.val_fraction")
    if flat.get("seed", 0) + flat.get("seeds", 1) > 2 ** 32:  # 2**32 gave seed 0's model again; 2**64 a traceback
        raise UsageError(f"--seed {flat.get('seed', 0)} with --seeds {flat.get('seeds', 1)}: the seeds must stay below "
                         "2**32 (4294967296), the 32 bits of jax's random keys")
    if flat.get("augment.rotate", 0) > 180:
        raise UsageError(f"--augment.rotate is the largest angle either way, at most 180 degrees, "
                         f"got {flat['augment.rotate']}")
    for key in BELOW_ONE:
        if flat.get(key, 0) >= 1:
            raise UsageError(f"--{key} must be below 1, got {flat[key]}")
    for key, (owner, users, off) in USED_WITH.items():
        if flat.get(key, off) != off and flat[owner] not in users:
            raise UsageError(f"--{key} is for --{owner} {' or '.join(users)}; {flat[owner]} does not use it")
    if flat.get("optimizer.name") == "rprop" and flat.get("optimizer.schedule", "constant") != "constant":
        raise UsageError("--optimizer.schedule cosine with Rprop: its steps adapt by themselves, and torch's "
                         "schedulers leave them alone (Rprop reads the lr once, as its first step size); use "
                         "--optimizer.schedule constant")
    if flat.get("optimizer.nesterov") and not flat.get("optimizer.momentum"):  # plain SGD: torch refuses it
        raise UsageError("--optimizer.nesterov needs --optimizer.momentum above 0 (without momentum it is plain SGD)")
    return config
