"""Shared defaults every experiment config starts from, and a way to derive variants from one."""
from flaxlab.config import with_fields


def base_config(name, description, **sections):
    """The full set of fields, so every one of them can be overridden on the command line."""
    config = {
        "name": name,
        "description": " ".join(description.split()),
        # size: (height, width) to resize to, () = as stored; val_fraction: held out of train for early
        # stopping / the best checkpoint (0 = none); test_fraction: held out as test when a set has no test split;
        # equalize_histograms: each image's luminance histogram equalised on load
        "data": {"name": "mnist", "source": "auto", "size": (), "val_fraction": 0.0, "test_fraction": 0.1,
                 "equalize_histograms": False},
        "model": {},
        # schedule: constant, or cosine (the learning rate decays to 0 over the run's epochs)
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
                      "schedule": "constant"},
        "l1": 0.0,  # L1 penalty on all weights, added to the loss
        "batch_size": 32,
        "drop_last": True,  # an epoch's short last batch is dropped (False: trained on, e.g. batch > train set)
        "eval_batch_size": 1000,
        "epochs": 20,
        "seeds": 1,  # models trained side by side in one program
        "seed": 0,  # the first model's seed; model i uses seed + i
        # on device, inside the train step; crop: zero-pad by this many pixels, then a random crop back;
        # jitter: brightness and contrast factors in [1 - jitter, 1 + jitter]; rotate: +- degrees
        "augment": {"crop": 0, "flip_lr": False, "flip_ud": False, "rotate": 0.0, "jitter": 0.0},
        # validation, test and predictions average each image's logits with its left-right mirror's
        "eval_flip": False,
        # devices to run on (0 = all of them, of every host; 1 = one)
        "devices": 0,
        # data: each batch split over the devices; seeds: the stacked models (seeds, sweep values) split over
        # them, each device training whole batches of its own models (a multiple of the device count)
        "parallel": "data",
        # join a multi-host run (jax.distributed.initialize); also done when JAX_COORDINATOR_ADDRESS is set
        "distributed": False,
        "compute_dtype": "float32",  # bfloat16: bf16 compute, fp32 parameters and batch-norm statistics
        "deterministic": False,  # GPU: run-to-run identical results (XLA's deterministic ops; slower)
        "model_axis": "auto",  # several models: vmap them (GPU/TPU) or run one after another (CPU)
        "epoch_mode": "auto",  # step: one dispatch per step (fast on CPU); scan: lax.scan epochs (GPU/TPU)
        "scan_steps": 0,  # scan mode: steps per lax.scan chunk (rounded down to a divisor of the epoch's); 0 = all
        "best_metric": "",  # val_accuracy or val_loss: keep each model's best state (needs data.val_fraction)
        "patience": 0,  # early stopping: stop once no model's best_metric improved for this many epochs; 0 = off
        "checkpoint_every": 0,  # orbax checkpoint every N epochs (and the last), for --resume; 0 = none
        # feature maps drawn after a run: of this layer ("" = the first conv; e.g. Conv_1, Activation_2) for
        # this test image (its index)
        "features": {"layer": "", "image": 0, "last_conv": False},  # last_conv: the last conv's maps too
        "sweep": (),  # variants, each a dict of dotted fields: `run` trains them all (see flaxlab.sweep)
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def variant(config, name, description, of=None, **dotted):
    """A copy of `config` under a new name, with dotted fields replaced: an ablation in one line (`sweep=` its
    variants: a named sweep; `of`: one of a sweep's variants, as a run of its own)."""
    return with_fields({**config, "name": name, "description": description}, {**(of or {}), **dotted})
