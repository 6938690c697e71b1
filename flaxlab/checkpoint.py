"""Run checkpoints with orbax's CheckpointManager: the stacked train states (every seed together),
each model's best-validation state, and the run's progress (epoch, history, best epochs).

A checkpoint holds everything an epoch's end depends on; every random key of the next epochs is
derived from the seeds and the epoch number, so a resumed run continues exactly where the
interrupted one was (tests/test_checkpoint.py kills a run with SIGKILL and compares).
Saving is asynchronous (the arrays are copied to host first), so training goes on while it writes;
orbax writes into a temporary folder and renames it when complete, so a killed save leaves the
previous checkpoint intact.
"""
import inspect
import json
import logging
import sys
from pathlib import Path

import jax
import numpy as np

from flaxlab import parallel
from flaxlab.errors import UsageError

CHECKPOINT_DIR = "checkpoints"


def _host_copy(tree):
    # a copy, not a view: the train step donates the device buffers of the states it is given. Every process
    # of a multi-host run makes it (models split over the processes' devices are gathered, collectively).
    return jax.tree.map(lambda a: np.array(a, copy=True), parallel.to_host(tree))


def _is_abandoned_read(unraisable):
    """What orbax leaves behind when one of a checkpoint's concurrent reads fails: it closes its event loop
    with the other reads in flight; as TensorStore finishes each it reports 'Event loop is closed', and
    the reads' coroutines, collected unawaited, report their own errors ('Exception ignored in ...')."""
    error, where = unraisable.exc_value, unraisable.object
    return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed") or (
        inspect.iscoroutine(where) and where.__name__.startswith("_read")
        and "orbax" in where.cr_code.co_filename)


def _is_abandoned_future(record):
    """asyncio's log line for a read's future or task collected with its TensorStore error never retrieved (the
    same abandoned reads, seen from the event loop's side: 'ERROR:asyncio:Future exception was never retrieved',
    or 'Task exception ...' for orbax's async_deserialize tasks, seen in CI under load)."""
    error = record.exc_info[1] if record.exc_info else None
    never = ("Future exception was never retrieved", "Task exception was never retrieved")
    return record.getMessage().startswith(never) and "tensorstore" in str(error)


def _drop_abandoned_reads():
    """Drops, from here on, the reports of `_is_abandoned_read` and `_is_abandoned_future` (up to 190 lines of
    tracebacks, before or after the one-line error, from threads, as late as the interpreter's exit), and only
    those."""
    hook = sys.unraisablehook
    if getattr(hook, "drops_abandoned_reads", False):
        return
    logging.getLogger("asyncio").addFilter(lambda record: not _is_abandoned_future(record))

    def drop_abandoned_reads(unraisable):
        if not _is_abandoned_read(unraisable):
            hook(unraisable)
    drop_abandoned_reads.drops_abandoned_reads = True
    sys.unraisablehook = drop_abandoned_reads


def kept_epochs(directory):
    """The epochs whose checkpoints a folder holds (orbax names each by its step), oldest first."""
    return sorted(int(p.name) for p in Path(directory).glob("*") if p.name.isdigit())


class Checkpoints:
    """`every` epochs (and on `force`: a run's last epoch), keeping the `keep` most recent; `every` 0 with `create`:
    the last epoch's only (what every run keeps, for `predict`, `evaluate` and `figures`). `part`: a
    subfolder of the run's checkpoints (a sweep's program keeps its own while it trains).

    In a multi-host run, process 0 writes the host copy of the states (replicated, or gathered from every
    process's devices) alone, as it writes the rest of the run folder; the other processes hold no folder."""

    def __init__(self, workdir, every=1, keep=2, create=None, part=None):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = (Path(workdir) / CHECKPOINT_DIR / (part or "")).resolve()
        self.every = every
        create = bool(every) if create is None else create
        options = {}
        if jax.process_count() > 1:  # orbax would wait at barriers for every process to save its shards
            options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=0,
                                                                                    active_processes={0})
            if create and jax.process_index() == 0:  # orbax's `create` is not for a subset of the processes
                self.directory.mkdir(parents=True, exist_ok=True)
            create = False
        self.manager = None if jax.process_index() else ocp.CheckpointManager(
            self.directory, item_names=("state", "best", "progress"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every or 1, create=create,
                                                 **options))

    def save(self, epoch, states, best, progress, force=False):
        """Saves when `epoch` is a multiple of `every` (or `force`); returns whether it did."""
        if not force and not (self.every and epoch % self.every == 0):
            return False
        args = self._ocp.args
        # a snapshot: orbax writes the JSON in a thread after save() returns, when the caller's next epoch has
        # appended to the history it holds
        progress = json.loads(json.dumps(progress))
        items = {"state": args.StandardSave(_host_copy(states)), "progress": args.JsonSave(progress)}
        if best is not None:
            items["best"] = args.StandardSave(_host_copy(best))
        return self.manager is None or self.manager.save(epoch, force=True, args=args.Composite(**items))

    def latest_epoch(self):
        """The latest checkpoint's epoch (None: none), in a multi-host run process 0's, in every process."""
        return parallel.from_process_0(lambda: self.manager.latest_step())

    def restore(self, states, with_best):
        """The latest checkpoint, shaped and placed like the given (freshly initialised) states: (states, best,
        progress); `best` is None unless `with_best`. In a multi-host run process 0 reads it and sends it to
        the others."""
        if jax.process_count() == 1:
            return self._read(states, with_best)
        from jax.experimental import multihost_utils
        host = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), states)
        read = []

        def on_process_0():
            read.append(self._read(host, with_best))
            return read[0][2]  # the progress, JSON; the arrays go below
        progress = parallel.from_process_0(on_process_0)
        trees = multihost_utils.broadcast_one_to_all(read[0][:2] if read else (host, host if with_best else None))
        place = lambda tree: jax.tree.map(  # noqa: E731
            lambda like, a: jax.make_array_from_callback(like.shape, like.sharding, lambda index: a[index]), states, tree)
        return place(trees[0]), place(trees[1]) if with_best else None, progress

    def _read(self, states, with_best):
        epoch = self.manager.latest_step()
        if epoch is None:
            raise UsageError(f"no checkpoint in {self.directory}: a run keeps one when it ends, and with "
                             f"--checkpoint_every N one every N epochs; this one stopped before it kept any, so "
                             f"there is nothing to go on from or score: train it again, without --resume")
        args = self._ocp.args
        target = lambda tree: jax.tree.map(  # noqa: E731  (host arrays are restored as host arrays)
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) if isinstance(a, jax.Array) else a,
            tree)
        items = {"state": args.StandardRestore(target(states)), "progress": args.JsonRestore()}
        if with_best:
            items["best"] = args.StandardRestore(target(states))
        _drop_abandoned_reads()
        try:
            restored = self.manager.restore(epoch, args=args.Composite(**items))
        except Exception as e:  # a checkpoint of another model, or damaged files
            why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore")[0]
            why = why.split(". ")[0][:200]  # orbax's advice on its own restore options went on, cut mid-word
        else:
            return restored.state, restored.get("best") if with_best else None, restored.progress
        raise UsageError(f"cannot read the checkpoint {self.directory / str(epoch)} (another model's, or damaged): "
                         f"{why}")

    def close(self):
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
