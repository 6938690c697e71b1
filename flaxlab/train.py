"""Training engine: a pure train step, device-side epochs, several models trained as one program.

The dataset lives on the device; each epoch draws a permutation there and every step gathers its
batch from it inside jit, so the host never touches the data and never waits inside an epoch.
How an epoch is dispatched is chosen per backend: one call per step on XLA:CPU (measured: a
`lax.scan` epoch is ~4x slower there), whole epochs as one `lax.scan` on GPU/TPU.

N models (seeds, and the hyperparameter values of a sweep that keep shapes) are stacked on a
leading axis. Per backend they are trained by `jax.vmap` of the same step (GPU/TPU) or by the
one-model program, model by model (XLA:CPU, where vmapped convolutions are slow), each model on its
own CPU device where there are several (parallel.split_cpu_devices), so that they run at the same
time; with one model the axis is kept but no vmap is traced.
"""
import ctypes
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from flaxlab import models, parallel
from flaxlab.errors import UsageError
from flaxlab.optim import make_optimizer

EPOCH_MODES = ("auto", "step", "scan")

# XLA:CPU's YNNPACK fusions make the course's small nets slower: the 1MD120 CNN's step took
# 3.0-3.5 ms without them against 3.6-4.3 ms with them (2-core EPYC, jax 0.10.2, alternating runs); the GTSRB
# CNN's 66 against 256 ms (2-core Xeon). But its reductions stay: without them XLA:CPU computed wrong gradients
# for the TDT4265 CNN with batch norm (10% off, against eager jax and float64; jax 0.10.2), and they cost little
# (medians of 7 alternating rounds, 2-core Xeon: the 1MD120 CNN 2.82 ms either way, the all-conv net 21.6
# against 20.7, the GTSRB CNN 67.0 against 66.5, the FNN 14.1 against 13.7). `tests/test_train.py` compares
# compiled gradients with eager ones.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


# glibc's malloc serves each block over 32 MB with a fresh mmap and unmaps it when freed, so the temporary
# buffer XLA:CPU allocates for every call (35 MB for the GTSRB CNN's step) was faulted in page by page on
# every step: 8,662 minor page faults, and the step took 77.5 ms against 64 ms with the memory kept (2-core
# EPYC). Blocks that come from a worker thread's arena are the same unless that arena keeps its emptied
# 64 MB heaps, which a top pad of 64 MB makes it do.
_M_TOP_PAD, _M_TRIM_THRESHOLD, _M_MMAP_MAX = -2, -1, -4
_KEPT_MEMORY = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}


def keep_freed_memory():
    """Makes glibc's malloc serve large blocks from its heaps and keep (up to 1 GiB of) freed memory
    there, so that XLA:CPU's per-call buffers are reused instead of mapped and faulted in anew.
    Returns whether it applied: not on C libraries without mallopt (macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(option, value) == 1 for option, value in _KEPT_MEMORY.items()])


def compile_for_backend(lowered):
    """Compiles with the CPU options above where they apply; a jax that lacks the flag gets none."""
    if jax.default_backend() == "cpu":
        keep_freed_memory()
        try:
            return lowered.compile(compiler_options=CPU_COMPILER_OPTIONS)
        except Exception as e:  # an XLA without the flag (or its value) rejects it by name; other failures are raised
            if not any(option in str(e) for option in CPU_COMPILER_OPTIONS):
                raise
    return lowered.compile()


class TrainState(train_state.TrainState):
    """flax's TrainState plus batch-norm statistics and `hparams`: per-model values the step reads
    (`l1` strength, `dropout` rate), so models stacked in one program can differ in them."""
    batch_stats: Any = flax.struct.field(default_factory=dict)
    hparams: Any = flax.struct.field(default_factory=dict)

    def variables(self, params=None):
        params = self.params if params is None else params
        return {"params": params, "batch_stats": self.batch_stats} if self.batch_stats else {"params": params}


def preprocess(images):
    """uint8 pixels to [0, 1] floats, as the reports' ToTensor() did."""
    return images.astype(jnp.float32) / 255.0


def l1_penalty(params):
    """The sum of |w|, with torch's gradient: sign(w), 0 at 0 (jax's |x| has 1 there, which moved the zero
    biases that torch's L1 leaves alone)."""
    return sum((p * jax.lax.stop_gradient(jnp.sign(p))).sum() for p in jax.tree_util.tree_leaves(params))


def classification_sums(logits, labels, mask=None):
    """Summed loss, correct count and example count: sums add up across steps and batches."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    mask = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    return {"loss": (losses * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}


def dice_scores(predicted, target):
    """Per image: Dice = F1 = 2|P & T| / (|P| + |T|) of the foreground (class > 0); 1 when both are empty."""
    p, t = (predicted > 0).reshape(predicted.shape[0], -1), (target > 0).reshape(target.shape[0], -1)
    overlap, total = (p & t).sum(-1), p.sum(-1) + t.sum(-1)
    return jnp.where(total > 0, 2.0 * overlap / jnp.maximum(total, 1), 1.0)


def segmentation_sums(logits, masks, mask=None):
    """Per image: mean pixel cross-entropy, pixel accuracy and Dice; summed over images, like
    `classification_sums`, so epoch figures are means over images (the reports' per-image averages)."""
    masks = masks.astype(jnp.int32)
    # as one-hot products: optax's integer-label form ends in a take whose gradient XLA constant-folds
    # for seconds at 128x128 and more (a scatter-add into a constant-index buffer)
    log_p = jax.nn.log_softmax(logits)
    losses = -(jax.nn.one_hot(masks, logits.shape[-1], dtype=log_p.dtype) * log_p).sum(-1).mean(axis=(1, 2))
    predicted = logits.argmax(-1)
    correct = (predicted == masks).mean(axis=(1, 2))
    mask = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    return {"loss": (losses * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum(),
            "dice": (dice_scores(predicted, masks) * mask).sum()}


def metric_sums(logits, labels, mask=None):
    """Classification (one label per example) or segmentation (one label per pixel), by the labels' rank."""
    return (segmentation_sums if labels.ndim > 1 else classification_sums)(logits, labels, mask)


def _forward(state, params, images, compute_dtype, **kwargs):
    """The model on a batch; with a compute dtype (bf16), parameters and images are cast to it for the
    forward and backward pass while the stored parameters, batch-norm statistics and loss stay fp32."""
    if compute_dtype is not None:
        params, images = parallel.cast_floats(params, compute_dtype), images.astype(compute_dtype)
    out = state.apply_fn(state.variables(params), images, **kwargs)
    if compute_dtype is None:
        return out
    logits, *rest = out if isinstance(out, tuple) else (out,)
    return (logits.astype(jnp.float32), *rest) if rest else logits.astype(jnp.float32)


def train_step(state, batch, rng, compute_dtype=None):
    """One optimizer step on one batch: (state, batch, rng) -> (state, metric sums)."""
    hparams = state.hparams
    model_kwargs = {"dropout": hparams["dropout"]} if "dropout" in hparams else {}

    def loss_fn(params):
        with models.real_examples(batch.get("mask")):  # batch norm's statistics leave a short batch's filler out
            logits, updates = _forward(state, params, batch["image"], compute_dtype, train=True,
                                       rngs={"dropout": rng}, mutable=["batch_stats"], **model_kwargs)
        sums = metric_sums(logits, batch["label"], batch.get("mask"))
        loss = sums["loss"] / sums["count"]
        if "l1" in hparams:
            loss = loss + hparams["l1"] * l1_penalty(params)
        return loss, (sums, updates)

    (_, (sums, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    if state.batch_stats:
        state = state.replace(batch_stats=updates["batch_stats"])
    return state, sums


def eval_logits(state, images, compute_dtype=None, flip=False):
    """The model's logits; with `flip`, averaged with those of the left-right mirrored images (mirrored
    back for per-pixel logits): test-time augmentation, worth ~2 points on CIFAR-10's all-conv net."""
    logits = _forward(state, state.params, images, compute_dtype, train=False)
    if not flip:
        return logits
    mirrored = _forward(state, state.params, images[:, :, ::-1], compute_dtype, train=False)
    return (logits + (mirrored[:, :, ::-1] if logits.ndim == 4 else mirrored)) / 2


def eval_step(state, batch, compute_dtype=None, flip=False):
    logits = eval_logits(state, batch["image"], compute_dtype, flip)
    return metric_sums(logits, batch["label"], batch.get("mask"))


def _first_value(tree):
    """A new one-element array from this process's first shard of `tree`'s first leaf: ready once the
    computation that made the leaf has run there. Local, so that processes need not probe in step."""
    # copy=True: when the leaf has one element, [:1] is the leaf itself, which the next step deletes (donated)
    return jnp.array(jax.tree.leaves(tree)[0].addressable_shards[0].data[:1], copy=True)


def _add(totals, sums):
    return jax.tree.map(jnp.add, totals, sums)


def _zero_sums(segmentation=False):
    names = ("loss", "correct", "count") + (("dice",) if segmentation else ())
    return {name: jnp.zeros(()) for name in names}


def _is_segmentation(data):
    return data["label"].ndim > 1


def _batch_indices(order, step, batch_size, drop_last):
    """Examples of step `step` in an epoch's `order`, and which of them count (None: all).

    Without `drop_last`, the epoch's last batch is filled up with examples from its start and those
    carry no weight (`mask`): the reports' DataLoaders that kept a short last batch, in fixed shapes.
    """
    if drop_last:
        return jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size), None
    position = step * batch_size + jnp.arange(batch_size)
    return order[position % order.shape[0]], position < order.shape[0]


def _gather_batch(data, order, step, batch_size, drop_last, sharding):
    """A batch gathered on device; with `sharding`, each shard of the training set gives its
    `batch_size` examples and the batch is laid out over the data axis (no example moves)."""
    if sharding is None:
        idx, mask = _batch_indices(order, step, batch_size, drop_last)
        batch = {"image": data["image"][idx], "label": data["label"][idx]}
    else:
        idx, mask = jax.vmap(_batch_indices, in_axes=(0, None, None, None))(order, step, batch_size, drop_last)
        idx = jax.lax.with_sharding_constraint(idx, sharding)
        batch = {k: jax.vmap(lambda d, i: d[i])(data[k], idx) for k in ("image", "label")}
        batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
        mask = None if mask is None else mask.reshape(-1)
    if mask is not None:
        batch["mask"] = mask
    batch["image"] = preprocess(batch["image"])
    return batch if sharding is None else jax.lax.with_sharding_constraint(batch, sharding)


def _indexed_train_step(carry, step, *, data, order, key, batch_size, augment, drop_last=True, sharding=None,
                        compute_dtype=None):
    """Train step number `step` of an epoch, its batch gathered (and augmented) on device."""
    state, totals = carry
    batch = _gather_batch(data, order, step, batch_size, drop_last, sharding)
    key = jax.random.fold_in(key, step)
    if augment is not None:
        augment_key, key = jax.random.split(key)
        maps = batch["label"] if batch["label"].ndim > 1 else None
        batch["image"], maps = augment(augment_key, batch["image"], maps)
        if maps is not None:
            batch["label"] = maps
    state, sums = train_step(state, batch, key, compute_dtype)
    return (state, _add(totals, sums)), None


def train_steps(state, totals, data, order, first_step, key, *, steps, batch_size, augment=None, drop_last=True,
                sharding=None, compute_dtype=None):
    """`steps` consecutive steps of one model: a plain call when steps == 1, else one lax.scan."""
    body = functools.partial(_indexed_train_step, data=data, order=order, key=key, batch_size=batch_size,
                             augment=augment, drop_last=drop_last, sharding=sharding, compute_dtype=compute_dtype)
    if steps == 1:
        return body((state, totals), first_step)[0]
    return jax.lax.scan(body, (state, totals), first_step + jnp.arange(steps))[0]


def _padded_batch(data, index, batch_size, sharding=None):
    """Batch number `index` of a split in order; past its end, example 0 stands in and `mask` is False."""
    idx = index * batch_size + jnp.arange(batch_size)
    mask = idx < data["label"].shape[0]
    idx = jnp.where(mask, idx, 0)
    batch = {"image": preprocess(data["image"][idx]), "label": data["label"][idx], "mask": mask}
    return batch if sharding is None else jax.lax.with_sharding_constraint(batch, sharding)


def _indexed_eval_step(totals, index, *, state, data, batch_size, sharding=None, compute_dtype=None, flip=False):
    batch = _padded_batch(data, index, batch_size, sharding)
    return _add(totals, eval_step(state, batch, compute_dtype, flip)), None


def evaluate(state, data, *, batch_size, sharding=None, compute_dtype=None, flip=False):
    """Metric sums of one model over a whole device-resident split (padded last batch masked)."""
    num_batches = -(-data["label"].shape[0] // batch_size)
    body = functools.partial(_indexed_eval_step, state=state, data=data, batch_size=batch_size, sharding=sharding,
                             compute_dtype=compute_dtype, flip=flip)
    return jax.lax.scan(body, _zero_sums(_is_segmentation(data)), jnp.arange(num_batches))[0]


def _indexed_predictions(_, index, *, state, data, batch_size, sharding=None, compute_dtype=None, flip=False,
                         probabilities=False):
    batch = _padded_batch(data, index, batch_size, sharding)  # `predict` cuts the padded tail off
    logits = eval_logits(state, batch["image"], compute_dtype, flip)
    return None, jax.nn.softmax(logits.astype(jnp.float32)) if probabilities else logits.argmax(-1)


def predict(state, data, *, batch_size, sharding=None, compute_dtype=None, flip=False, probabilities=False):
    """Predicted class of every example (every pixel, for segmentation) of a device-resident split, for one model;
    with `probabilities`, each class's softmax probability instead (a trailing class axis)."""
    n = data["label"].shape[0]
    body = functools.partial(_indexed_predictions, state=state, data=data, batch_size=batch_size,
                             sharding=sharding, compute_dtype=compute_dtype, flip=flip, probabilities=probabilities)
    predictions = jax.lax.scan(body, None, jnp.arange(-(-n // batch_size)))[1]
    return predictions.reshape((-1,) + predictions.shape[2:])[:n]


def epoch_orders(keys, epoch, num_examples, shards=0):
    """Per model: a key for the epoch's steps and a permutation of the training set (with `shards`,
    one permutation of each shard's `num_examples`, shape (models, shards, num_examples))."""
    def one(key):
        perm_key, step_key = jax.random.split(jax.random.fold_in(key, epoch))
        if shards:
            perms = jax.vmap(lambda s: jax.random.permutation(jax.random.fold_in(perm_key, s), num_examples))
            return perms(jnp.arange(shards)).astype(jnp.int32), step_key
        return jax.random.permutation(perm_key, num_examples).astype(jnp.int32), step_key
    return jax.vmap(one)(keys)


def per_model(fn, num_models, in_axes):
    """vmap over the leading model axis; for one model, index it away instead (no batched ops)."""
    if num_models > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def single(*args):
        args = [jax.tree.map(lambda a: a[0], x) if axis == 0 else x for x, axis in zip(args, in_axes)]
        return jax.tree.map(lambda a: a[None], fn(*args))
    return single


MODEL_AXES = ("auto", "vmap", "sequential")


def resolve_model_axis(mode, num_models, backend=None):
    """How stacked models share the device: one vmapped program, or one model after another.

    On XLA:CPU vmap turns each model's convolution into one grouped convolution, which is slow: 4
    vmapped 1MD120 CNNs made 195 model-steps/s against 333-342 for the same 4 run one after another
    with the one-model program (2-core EPYC, jax 0.10.2). Unrolling the 4 models in one program
    gave 342 (no gain, 4x the compile time), lax.map over them 47. So CPU runs them in sequence.
    """
    if num_models == 1:
        return "single"
    if mode == "auto":
        return "sequential" if (backend or jax.default_backend()) == "cpu" else "vmap"
    return mode


def _model_slice(tree, i):
    return jax.tree.map(lambda a: a[i:i + 1], tree)


def _place(tree, device):
    return tree if device is None else jax.device_put(tree, device)


def _concat_models(trees):
    return trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def resolve_epoch_mode(mode, backend=None):
    if mode == "auto":
        return "step" if (backend or jax.default_backend()) == "cpu" else "scan"
    return mode


def largest_divisor_at_most(n, limit):
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def steps_per_epoch(num_examples, batch_size, drop_last=True):
    if drop_last:  # as most of the reports' DataLoaders did
        return num_examples // batch_size
    return -(-num_examples // batch_size)


# Config fields that may differ between models trained in one program (a sweep stacks them), and
# where each lives: the optimizer's injected state, or the TrainState's `hparams`.
STACKABLE = {"optimizer.lr": "optimizer", "optimizer.weight_decay": "optimizer", "l1": "l1", "model.dropout": "dropout"}


def check_split(devices, parallel_mode, num_models, batch_size, variants=1, model_axis="auto"):
    """Refuses models (`--parallel seeds`) or a batch that `devices` cannot split evenly; a sweep asks it of each
    program before it writes its folder (its second program's batch was refused after the first had trained)."""
    if devices > 1 and parallel_mode == "seeds":
        if model_axis == "sequential":
            raise UsageError("--parallel seeds vmaps the models on each device: use --model_axis auto or vmap")
        if num_models % devices:
            count = "--seeds times the variants" if variants > 1 else "--seeds"
            raise UsageError(f"--parallel seeds: {num_models} model{'s' if num_models > 1 else ''} do not split over "
                             f"{devices} devices; train a multiple of {devices} ({count})")
    elif batch_size % devices:
        raise UsageError(f"--batch-size {batch_size} does not split over {devices} devices: "
                         f"use a multiple of {devices}")


class Trainer:
    """Compiled functions for training `num_models` stacked models of one architecture.

    All functions are compiled ahead of time by `compile`, which reports its own duration, so
    compile time is never mixed into step timings and a shape change fails loudly instead of
    retracing silently. The models are stacked on a leading axis whatever the `model_axis`
    strategy; "sequential" only changes how the compiled one-model functions are dispatched.

    With a `mesh` (flaxlab.parallel) the training set comes sharded, (shards, examples, ...), each
    batch of `batch_size` is split over the devices and the states are replicated; with `parallel`
    "seeds" the models are split over the devices instead (vmapped on each) and the training set is
    replicated. `compute_dtype` "bfloat16" computes in bf16 with fp32 parameters, optimizer state and
    batch-norm statistics. `eval_flip` evaluates and predicts on each image and its left-right mirror.
    """

    def __init__(self, model, optimizer, *, num_models=1, batch_size=32, eval_batch_size=1000,
                 epoch_mode="auto", scan_steps=None, model_axis="auto", augment=None, drop_last=True, mesh=None,
                 compute_dtype="float32", parallel_mode="data", eval_flip=False):
        if parallel_mode not in parallel.PARALLEL_MODES:
            raise UsageError(f"unknown parallel mode '{parallel_mode}'; known: {', '.join(parallel.PARALLEL_MODES)}")
        self.mesh, self.devices = mesh, parallel.num_shards(mesh)
        self.models_sharded = mesh is not None and parallel_mode == "seeds"
        self.shards = 1 if self.models_sharded else self.devices  # parts of each batch
        check_split(self.devices, parallel_mode, num_models, batch_size, model_axis=model_axis)
        if self.models_sharded:
            model_axis = "vmap"
        if compute_dtype not in parallel.COMPUTE_DTYPES:
            raise UsageError(f"unknown compute dtype '{compute_dtype}'; known: {', '.join(parallel.COMPUTE_DTYPES)}")
        self.compute_dtype = None if compute_dtype == "float32" else jnp.dtype(compute_dtype)
        self.model, self.optimizer, self.num_models = model, dict(optimizer), num_models
        self.drop_last, self.segmentation = drop_last, False
        self.tx = make_optimizer(self.optimizer)
        self.batch_size, self.eval_batch_size, self.augment = batch_size, eval_batch_size, augment
        self.eval_flip = eval_flip
        self.epoch_mode = resolve_epoch_mode(epoch_mode)
        self.scan_steps = scan_steps
        self.model_axis = resolve_model_axis(model_axis, num_models)
        self.width = 1 if self.model_axis == "sequential" else num_models  # models per compiled call
        # models run one after another on XLA:CPU are spread over its devices (parallel.split_cpu_devices),
        # model i on device i % devices, and models on different devices run at the same time
        local = jax.local_devices()[:num_models]
        self.spread = (local if self.model_axis == "sequential" and mesh is None and len(local) > 1
                       and jax.default_backend() == "cpu" else [])
        self._copies = {}  # (device, id(data)) -> (data, its copy on that device)
        self._compiled = None
        # XLA:CPU's collectives deadlocked with several steps in flight: across processes (gloo, 2 x 2
        # devices) after ~40 steps, and between 8 simulated devices of one process on a busy 2-core machine
        # (jax 0.10.2). So a CPU run on several devices waits for each step; GPUs and TPUs never wait in an epoch.
        self._wait_each_step = mesh is not None and jax.default_backend() == "cpu"

    def init(self, keys, input_shape, hparams=None):
        """Stacked TrainStates, one per key, each initialised independently.

        `hparams` maps STACKABLE fields to one value per model (e.g. {"optimizer.lr": [0.1, 0.01]});
        fields left out take the trainer's optimizer config and the model's own settings.
        """
        hparams = {k: np.asarray(v, np.float32) for k, v in (hparams or {}).items()}
        for key, values in hparams.items():
            if key not in STACKABLE:
                raise UsageError(f"--{key} cannot differ between models of one program; "
                                 f"these can: {', '.join(STACKABLE)}")
            if values.shape != (self.num_models,):
                raise UsageError(f"{key}: {values.shape[0] if values.ndim else 1} values for {self.num_models} models")

        def init_one(key, hp):
            variables = self.model.init({"params": key}, jnp.zeros((1, *input_shape)), train=False)
            optimizer = {**self.optimizer, **{k.split(".", 1)[1]: v for k, v in hp.items()
                                              if STACKABLE[k] == "optimizer"}}
            params = variables["params"]
            return TrainState(step=0, apply_fn=self.model.apply, params=params, tx=self.tx,
                              opt_state=make_optimizer(optimizer).init(params),
                              batch_stats=variables.get("batch_stats", {}),
                              hparams={STACKABLE[k]: v for k, v in hp.items() if STACKABLE[k] != "optimizer"})
        return jax.jit(jax.vmap(init_one), out_shardings=self._stacked_sharding())(keys, hparams)

    def _stacked_sharding(self):
        """Where per-model values live: one device, every device (data parallel), or split (seeds)."""
        if self.mesh is None:
            return None
        return parallel.stacked_sharding(self.mesh) if self.models_sharded else parallel.replicated(self.mesh)

    def images_per_epoch(self, num_examples):
        """Examples trained on per epoch and model (a kept short last batch's filler not counted)."""
        if self.drop_last:
            return self.steps_per_epoch(num_examples) * self.batch_size
        return num_examples - num_examples % self.shards

    def steps_per_epoch(self, num_examples):
        """Steps of an epoch over `num_examples` (the whole training set, of all shards)."""
        return steps_per_epoch(num_examples // self.shards, self.batch_size // self.shards, self.drop_last)

    def _sharding_for(self, batch_size):
        """The batch layout inside jit: over the mesh's data axis when the batch splits evenly."""
        if self.mesh is None or self.models_sharded or batch_size % self.shards:
            return None
        return parallel.batch_sharding(self.mesh)

    def compile(self, states, train_data, test_data, val_data=None):
        """Compiles the epoch's functions for these shapes; returns the seconds it took. Called before the first
        epoch: it also fits the batch size to a training set smaller than one batch (--drop_last false) and
        notes whether the task is segmentation."""
        t0 = time.perf_counter()
        sharded = self.mesh is not None and not self.models_sharded  # the training set in shards
        n = parallel.examples_per_shard(train_data, sharded)
        if not self.drop_last and self.batch_size > n * self.shards:  # one full batch per epoch: no filler
            self.batch_size = n * self.shards
        steps = self.steps_per_epoch(n * self.shards)
        if steps < 1:
            raise UsageError(f"batch size {self.batch_size} is larger than the training set ({n} examples) "
                             "and drop_last is on")
        chunk = 1 if self.epoch_mode == "step" else largest_divisor_at_most(steps, self.scan_steps or steps)
        k = self.width
        self.segmentation = _is_segmentation(test_data)
        states = states if k == self.num_models else _model_slice(states, 0)
        run = functools.partial(train_steps, steps=chunk, batch_size=self.batch_size // self.shards,
                                augment=self.augment, drop_last=self.drop_last, sharding=self._sharding_for(self.batch_size),
                                compute_dtype=self.compute_dtype)
        run = jax.jit(self._per_model(run, (0, 0, None, 0, None, 0)), donate_argnums=(0, 1))
        # an epoch's orders as the compiled function makes them (placed like the states), to lower with
        keys = parallel.replicate_keys(jax.random.split(jax.random.key(0), self.num_models), self.mesh)
        make_orders = jax.jit(epoch_orders, static_argnums=(2, 3), out_shardings=self._stacked_sharding()).lower(
            keys, np.int32(0), n, self.shards if sharded else 0).compile()
        orders, step_keys = (x[:k] for x in make_orders(keys, np.int32(0)))
        ev = self._jit_eval(evaluate)
        places = self.spread or [None]  # a compiled function runs on the device it was compiled for
        self._compiled = {
            "chunk": chunk, "steps": steps,
            "train": {d: compile_for_backend(run.lower(_place(states, d), self._zero_totals(), self._on(train_data, d),
                                                       *_place((orders, np.int32(0), step_keys), d)))
                      for d in places},
            # one per evaluated split size: a split of another size would otherwise retrace silently
            "eval": {split["label"].shape[0]: {d: compile_for_backend(ev.lower(_place(states, d), self._on(split, d)))
                                               for d in places}
                     for split in (test_data, val_data) if split is not None},
            "orders": make_orders,
        }
        return time.perf_counter() - t0

    def _places(self):
        """Per compiled call (see `_groups`), the device its models run on (None: where their arrays are)."""
        calls = 1 if self.width == self.num_models else self.num_models
        return [self.spread[i % len(self.spread)] if self.spread else None for i in range(calls)]

    def _on(self, data, device):
        """`data` on `device`, copied once per device and kept while the same data comes again."""
        if device is None:
            return data
        key = (device, id(data))
        if key not in self._copies or self._copies[key][0] is not data:
            self._copies[key] = (data, jax.device_put(data, device))
        return self._copies[key][1]

    def _gathered(self, per_group):
        """Per-group results (on their devices) as one stacked tree on the first device."""
        home = self.spread[0] if self.spread else None
        return _concat_models(_place(per_group, home))

    def _per_model(self, fn, in_axes):
        """`fn` over the models of one compiled call (see `per_model`); with --parallel seeds each device
        runs it on its own models (shard_map): vmapped convolutions are grouped ones, which XLA's
        partitioner would otherwise split by all-gathering activations and weights across devices."""
        if not self.models_sharded:
            return per_model(fn, self.width, in_axes)
        spec = lambda axis: P(parallel.DATA_AXIS) if axis == 0 else P()  # noqa: E731
        return jax.shard_map(per_model(fn, self.width // self.devices, in_axes), mesh=self.mesh,
                             in_specs=tuple(spec(axis) for axis in in_axes), out_specs=P(parallel.DATA_AXIS),
                             check_vma=False)

    def _jit_eval(self, fn, **more):
        """`evaluate` or `predict` of every model at once, with this trainer's evaluation options."""
        options = dict(batch_size=self.eval_batch_size, sharding=self._sharding_for(self.eval_batch_size),
                       compute_dtype=self.compute_dtype, flip=self.eval_flip, **more)
        return jax.jit(self._per_model(functools.partial(fn, **options), (0, None)))

    def _zero_totals(self):
        # numpy: a host value is an input of any process's program, replicated where the states are
        zeros = jax.tree.map(lambda z: np.zeros((self.width,), np.float32), _zero_sums(self.segmentation))
        return jax.device_put(zeros, self._stacked_sharding()) if self.models_sharded else zeros

    def _groups(self, *stacked):
        """The stacked arguments as the compiled functions take them: all at once, or one model each."""
        if self.width == self.num_models:
            return [stacked]
        return [[_model_slice(x, i) for x in stacked] for i in range(self.num_models)]

    def train_epoch(self, states, train_data, keys, epoch, on_step=None):
        """One epoch for every model. Returns new states and per-model metric sums (on device)."""
        c = self._compiled
        orders, step_keys = c["orders"](keys, np.int32(epoch))
        places = self._places()
        groups = [list(_place(group, d)) for group, d in zip(self._groups(states, orders, step_keys), places)]
        data = [self._on(train_data, d) for d in places]
        totals = [self._zero_totals() for _ in groups]
        for first in range(0, c["steps"], c["chunk"]):
            # every model's step in turn: calls are asynchronous, so models on different devices run at once
            for g, (group, d) in enumerate(zip(groups, places)):
                states, orders, step_keys = group
                # np.int32, not jnp.int32: the latter dispatches a conversion op (~0.5 ms on CPU, per step)
                group[0], totals[g] = c["train"][d](states, totals[g], data[g], orders, np.int32(first), step_keys)
                if self._wait_each_step:
                    jax.block_until_ready(totals[g])
                if on_step is not None:
                    # the probe copies a value out: the next step takes these totals' buffers (donated)
                    on_step(first * len(groups) + (g + 1) * c["chunk"], len(groups) * c["steps"],
                            probe=functools.partial(_first_value, totals[g]))
        return self._gathered([group[0] for group in groups]), self._gathered(totals)

    def evaluate(self, states, data):
        n = data["label"].shape[0]
        if self._compiled is None:  # a restored state scored once: compiled on use, as `predict` is
            run = self._jit_eval(evaluate)
            return _concat_models([run(s, data) for (s,) in self._groups(states)])
        if n not in self._compiled["eval"]:
            raise UsageError(f"evaluate was compiled for splits of {sorted(self._compiled['eval'])} examples, not {n}")
        compiled = self._compiled["eval"][n]
        places = self._places()
        return self._gathered([compiled[d](_place(s, d), self._on(data, d)) for (s,), d in zip(self._groups(states), places)])

    def predict(self, states, data, probabilities=False):
        """Predicted classes, (models, examples), or their probabilities (models, examples, classes); compiled on
        first use, as it runs once per run."""
        run = self._jit_eval(predict, probabilities=probabilities)
        return _concat_models([run(s, data) for (s,) in self._groups(states)])


def summarize(sums):
    """Metric sums (device arrays, one entry per model) to mean loss, accuracy (and Dice) lists on the host."""
    sums = parallel.to_host(sums)
    out = {"loss": (sums["loss"] / sums["count"]).tolist(), "accuracy": (sums["correct"] / sums["count"]).tolist()}
    if "dice" in sums:
        out["dice"] = (sums["dice"] / sums["count"]).tolist()
    return out
