"""Data parallelism with `jit` and `jax.sharding`: one mesh over all devices (of all hosts), the batch
split on its `data` axis, parameters and optimizer state replicated.

No pmap (in maintenance mode) and no hand-written collectives: the train step is the one-device
step, and XLA's partitioner inserts the all-reduces. That covers batch norm too: its batch mean and
variance are means over the global batch axis, so they are synchronised across devices as written.

The training set is placed as (shards, examples per shard, ...), shard i on device i; each epoch
permutes every shard on its own and each device gathers its part of a batch from its own shard, so
no example crosses devices. In a multi-host run each process puts only its own shards on its devices
(`jax.make_array_from_process_local_data`). Test and validation splits are replicated.
"""
import os
import sys
import threading

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from flaxlab.errors import UsageError

DATA_AXIS = "data"
COMPUTE_DTYPES = ("float32", "bfloat16")
# what a mesh splits: each batch (data parallelism), or the stacked models (seeds, sweep values), each
# device then training its own models on whole batches, with no communication between devices
PARALLEL_MODES = ("data", "seeds")
# XLA's flag for run-to-run identical GPU results (slower scatter and reductions); read when the backend starts
DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"
# XLA:CPU devices `split_cpu_devices` makes at most: two per core, and never more than 8 (never measured)
CPU_DEVICES_PER_CORE, MAX_CPU_DEVICES = 2, 8
_cpu_split = False
# seconds the processes of a multi-host run wait for each other to join; past it jax would abort the process
# with a C++ stack trace, so flaxlab gives up first, in one line (FLAXLAB_JOIN_TIMEOUT sets it)
JOIN_TIMEOUT_S = 300


def cpu_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_cpu_devices(models, distributed=False):
    """Gives XLA:CPU one device per model of a run that trains `models` models one after another (seeds,
    sweep values), at most two per core and 8, so that they run at the same time, each on its own device
    (`train.Trainer` spreads them). A run of one model keeps one device.

    Much of a small net's step runs on one thread on XLA:CPU (its batched matrix products, FFTs and most
    fusions), so several models at once use the cores better than one at a time: on a 2-core EPYC, three
    GTSRB CNNs made 7.2-7.7 steps/s (of all three) on three devices, 6.1-6.8 on two and 5.2-5.9 on one. But
    every extra device slows the others a little (the all-conv net's step: 22.7 ms with one device, 23-27
    with two, 24-26 with three), so there are no more than the run uses. Only before jax starts its backends,
    and where neither JAX_NUM_CPU_DEVICES nor XLA_FLAGS set the count (JAX_NUM_CPU_DEVICES=1 turns this off).
    Not in a multi-host (`distributed`) run, whose mesh spans every process's devices: there these devices
    would split each batch.
    Data parallelism over these devices stays opt-in (`--devices N`): `make_mesh`'s default keeps one.
    Returns whether it split."""
    global _cpu_split
    if ("JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or os.environ.get("JAX_COORDINATOR_ADDRESS") or distributed):
        return False
    cores = cpu_cores()
    count = min(models, CPU_DEVICES_PER_CORE * cores, MAX_CPU_DEVICES)
    if cores < 2 or count < 2:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except Exception:  # jax's backends have started: the count is fixed  # noqa: BLE001
        return False
    _cpu_split = True
    return True


def with_xla_flag(flags, flag):
    """An XLA_FLAGS value with `flag` after those already set (once)."""
    return flags if flag in flags else f"{flags} {flag}".strip()


def set_up_process(distributed=False, deterministic=False):
    """What must happen before jax starts its backend: joining a multi-host run, determinism flags.

    `distributed` (or JAX_COORDINATOR_ADDRESS in the environment) calls jax.distributed.initialize();
    the coordinator, process count and process id come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID when set, else from jax's cluster detection (TPU pods, SLURM, Open MPI).
    """
    if deterministic:
        os.environ["XLA_FLAGS"] = with_xla_flag(os.environ.get("XLA_FLAGS", ""), DETERMINISTIC_GPU_FLAG)
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    joining = (distributed or address) and not jax.distributed.is_initialized()
    if joining:
        _join(address)
    check_backend()
    if joining and jax.default_backend() == "cpu":
        _connect_gloo_quietly()


def check_backend():
    """jax's devices, or one line saying why it has none (JAX_PLATFORMS naming a platform this machine lacks
    raised an AssertionError or a RuntimeError from deep inside the first network)."""
    try:
        return jax.devices()
    except (RuntimeError, AssertionError) as e:
        platforms = os.environ.get("JAX_PLATFORMS")
        why = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise UsageError(f"jax has no usable backend{f' for JAX_PLATFORMS={platforms}' if platforms else ''}: {why}"
                         f"{'; unset JAX_PLATFORMS to use what this machine has' if platforms else ''}") from None


def _join(address):
    kwargs = {}
    if address:
        try:
            kwargs = dict(coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                          process_id=int(os.environ["JAX_PROCESS_ID"]))
        except (KeyError, ValueError):
            raise UsageError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                             "(integers) too") from None
    try:
        timeout = int(os.environ.get("FLAXLAB_JOIN_TIMEOUT", JOIN_TIMEOUT_S))
        assert timeout > 0
    except (ValueError, AssertionError):
        raise UsageError(f"FLAXLAB_JOIN_TIMEOUT must be a positive whole number of seconds, "
                         f"got '{os.environ['FLAXLAB_JOIN_TIMEOUT']}'") from None
    run = (f" of {kwargs['num_processes']} processes at {address} (this is process {kwargs['process_id']})"
           if kwargs else "")
    # jax blocks in C++ until every process has joined, so the notices come from timer threads
    waiting = threading.Timer(min(10, timeout / 2), _say, [f"waiting for the multi-host run{run} to "
                                                           f"start; giving up after {timeout} s"])
    give_up = threading.Timer(timeout, _give_up, [
        f"error: the multi-host run{run} did not start within {timeout} s: start every process, each with "
        f"the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES and its own JAX_PROCESS_ID"])
    for timer in (waiting, give_up):
        timer.daemon = True
        timer.start()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout + 60)
    except (RuntimeError, ValueError) as e:
        why = str(e).splitlines()[0]
        if not address and "coordinator_address" in why:  # jax found no cluster (TPU pod, SLURM, Open MPI)
            why = ("jax detected no cluster to join (a TPU pod, SLURM, Open MPI); elsewhere set "
                   "JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES and JAX_PROCESS_ID in every process")
        elif "Failed to start RPC server" in why:  # process 0 serves the coordinator at the address
            why = (f"process 0 could not serve the coordinator at {address}: is its port taken (by another "
                   f"program, or an earlier run still alive)? Give every process another JAX_COORDINATOR_ADDRESS port")
        raise UsageError(f"could not join the multi-host run: {why}") from None
    finally:
        waiting.cancel()
        give_up.cancel()


def _connect_gloo_quietly():
    """Gloo prints a line on stdout from C++ ("[Gloo] Rank 0 is connected to 1 peer ranks...") for every group of
    devices it first connects, in the middle of a run's output; connecting the groups that flaxlab's collectives
    use (one device of each process; all devices) here, with stdout shut, keeps the run's output its own."""
    from jax.experimental import multihost_utils
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        multihost_utils.process_allgather(np.int32(0))
        multihost_utils.broadcast_one_to_all(np.int32(0))
        mesh = jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))
        ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA_AXIS)),
                                                      np.ones(jax.local_device_count(), np.float32))
        jax.block_until_ready(jax.jit(jax.numpy.sum, out_shardings=NamedSharding(mesh, P()))(ones))
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _say(line):
    print(line, file=sys.stderr, flush=True)


def _give_up(line):
    _say(line)
    os._exit(2)  # the main thread is inside jax's C++ wait, which no exception reaches


def is_primary():
    """The process that writes files and prints (process 0; the only one without jax.distributed)."""
    return jax.process_index() == 0


def make_mesh(devices=0):
    """A 1-D mesh over the first `devices` devices (0: all, of every process, except the CPU devices of
    `split_cpu_devices` in a one-process run: one), or None for one device.

    Auto axes: with make_mesh's default Explicit axes, a normal Flax train step (conv, dropout) fails.
    """
    available = jax.device_count()
    if devices > available:
        cpu = (f"; a CPU is split into {devices} by XLA_FLAGS=--xla_force_host_platform_device_count={devices} "
               "set before Python starts" if jax.default_backend() == "cpu" else "")
        raise UsageError(f"--devices {devices}: only {available} device(s) here ({jax.default_backend()}){cpu}")
    if not devices and _cpu_split and jax.default_backend() == "cpu" and jax.process_count() == 1:
        devices = 1  # devices made by split_cpu_devices run models side by side, not a batch in parts
    count = devices or available
    if count == 1:
        return None
    if jax.process_count() > 1 and count != available:
        raise UsageError(f"--devices {devices}: a multi-host run uses all {available} devices (--devices 0)")
    return jax.make_mesh((count,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:count])


def num_shards(mesh):
    return 1 if mesh is None else mesh.shape[DATA_AXIS]


def replicated(mesh):
    return NamedSharding(mesh, P())


def batch_sharding(mesh):
    """The layout of a batch inside the step: examples split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def stacked_sharding(mesh):
    """Stacked models (leading axis) split over the mesh, `--parallel seeds`: a batch's layout, on the model axis."""
    return batch_sharding(mesh)


def _global_array(sharding, array, global_shape):
    """`array` (this process's rows along axis 0, or everything when replicated) as one global array."""
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_process_local_data(sharding, array, global_shape)


def replicate(tree, mesh):
    """Every leaf on every device of the mesh (host values must be equal on every process)."""
    if mesh is None:
        return tree
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: _global_array(sharding, np.asarray(a), np.shape(a)), tree)


def replicate_keys(keys, mesh):
    """PRNG keys (equal on every process) replicated over the mesh."""
    if mesh is None:
        return keys
    return jax.random.wrap_key_data(replicate(jax.random.key_data(keys), mesh), impl=jax.random.key_impl(keys))


def _local_shards(mesh):
    """The mesh positions of this process's devices (contiguous, as jax.make_mesh lays them out)."""
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[0] + len(mine))):
        raise UsageError("this process's devices are not contiguous in the mesh")
    return mine[0], mine[-1] + 1


def shard_training_set(split, mesh, seed=0):
    """A split as {"image", "label"} of shape (shards, n, ...), shard i on mesh device i.

    The examples are shuffled once (the same way on every process: files are often sorted by class)
    and cut into equal shards; the last len % shards examples are left out of training.
    """
    shards = num_shards(mesh)
    n = len(split.labels) // shards
    order = np.random.default_rng(seed).permutation(len(split.labels))[:n * shards]
    first, last = _local_shards(mesh)
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def place(array):
        local = array[order].reshape((shards, n) + array.shape[1:])[first:last]
        return _global_array(sharding, local, (shards, n) + array.shape[1:])
    return {"image": place(split.images), "label": place(split.labels)}


def examples_per_shard(data, sharded):
    return data["label"].shape[1 if sharded else 0]


def to_host(tree):
    """Device arrays as numpy, in any process: replicated global arrays are read from a local copy."""
    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return np.asarray(a)
        if a.sharding.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(one, tree)


def _gather_bytes(sent):
    """Every process's `sent` bytes, in process order."""
    from jax.experimental import multihost_utils
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(sent)))).reshape(-1)
    data = np.zeros(int(sizes.max()), np.uint8)
    data[:len(sent)] = np.frombuffer(sent, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(data)).reshape(len(sizes), -1)
    return [bytes(row[:size]) for row, size in zip(rows, sizes)]


def from_process_0(read):
    """`read()` on process 0 alone (which alone holds the run folder), its JSON value sent to every process; a
    UsageError it raises is raised in every process, where they would otherwise wait for process 0 forever (any
    other exception is raised again in process 0, and named in the others' UsageError)."""
    if jax.process_count() == 1:
        return read()
    import json
    sent, failure = b"", None
    if is_primary():
        try:
            sent = json.dumps({"value": read()}).encode()
        except UsageError as e:
            sent = json.dumps({"error": str(e)}).encode()
        except Exception as e:  # a bug: its traceback here, a line in the others
            failure = e
            sent = json.dumps({"error": f"process 0: {type(e).__name__}: {e}".splitlines()[0]}).encode()
    message = json.loads(_gather_bytes(sent)[0])  # the others send nothing
    if failure is not None:
        raise failure
    if "error" in message:
        raise UsageError(message["error"])
    return message["value"]


def same_launch(config, **flags):
    """Stops every process of a multi-host run, in one line, unless all were started with the same options and
    `flags` (--resume): a process told to resume reads the run folder through process 0 first, a collective the
    others would not make (a hang, or tracebacks in every process)."""
    in_every_process(lambda: None, {**config, **flags})


def in_every_process(do, config, fingerprint=None):
    """`do()` in every process of a multi-host run, which then go on together or stop together: a UsageError
    in one process (its data missing, say) is raised in all, naming the process, where the others would
    otherwise wait for it in their next collective until jax gives up with a traceback (any other exception is
    raised again in its own process, and named in the others' UsageError). Every process must have
    been given the same `config`, and `fingerprint(do())` must agree (the data each read), or they would train
    different programs, or one program on different examples."""
    if jax.process_count() == 1:
        return do()
    import json
    from flaxlab.config import flatten
    value, failure, sent = None, None, {"config": json.loads(json.dumps(config, default=str))}
    try:
        value = do()
        sent["fingerprint"] = fingerprint(value) if fingerprint else None
    except UsageError as e:
        sent["error"] = str(e)
    except Exception as e:  # a bug: its traceback in this process, a line in the others, and none left waiting
        failure, sent["error"] = e, f"{type(e).__name__}: {e}".splitlines()[0]
    replies = [json.loads(b) for b in _gather_bytes(json.dumps(sent).encode())]
    first = flatten(replies[0]["config"])
    for index, reply in enumerate(replies[1:], 1):  # said first: the other options may be what errors come from
        mine = flatten(reply["config"])
        # the description names the options changed from the experiment's: they are named themselves
        differ = sorted(k for k in set(first) | set(mine) if first.get(k) != mine.get(k) and k != "description")
        if differ:
            options = ", ".join("--grid" if k == "sweep" else f"--{k}" for k in differ[:5])
            raise UsageError(f"process {index} of the multi-host run was given other options than process 0 "
                             f"({options}): start every process with the same command")
    if failure is not None:
        raise failure
    for index, reply in enumerate(replies):
        if "error" in reply:  # the same line in every process
            raise UsageError(f"process {index}: {reply['error']}")
    differ = [str(i) for i, reply in enumerate(replies) if reply["fingerprint"] != replies[0]["fingerprint"]]
    if differ:
        raise UsageError(f"process {', '.join(differ)} of the multi-host run read other data than process 0 (other "
                         f"examples, or the same in another order): give every host the same data files")
    return value


def cast_floats(tree, dtype):
    """Floating leaves as `dtype`: bf16 compute from fp32 parameters (their gradients stay fp32)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jax.numpy.issubdtype(a.dtype, jax.numpy.floating) else a, tree)
