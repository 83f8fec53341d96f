"""Which tf.distribute strategy a run trains under, built once; train asks it for a scope.

- ``none``: TensorFlow's default strategy (one device; the scope changes nothing).
- ``mirrored``: ``MirroredStrategy`` over the visible GPUs, or over the CPU devices that
  ``EDGETL_CPU_REPLICAS=N`` splits the CPU into (tests and benchmarks on machines without GPUs).
- ``multi-worker``: ``MultiWorkerMirroredStrategy`` from the standard ``TF_CONFIG``. It must exist
  before TensorFlow runs its first op, so ``prepare`` records the request and ``edgetl.keras``
  calls ``at_startup`` while it imports TensorFlow.
- ``auto``: mirrored when more than one GPU is visible, otherwise none.

Rules every strategy follows here: ``--batch-size`` is the global batch, split evenly across
replicas; learning rates are used as given (not scaled: the gradient is the mean over the same
global batch as on one device). Input pipelines are sharded per worker with
``AutoShardPolicy.DATA`` (every worker reads the same seeded, in-memory dataset and keeps its
share of each batch). Only the chief writes the run directory; the other workers train on a
private copy in a temporary folder that is deleted when they finish.

tfmot creates its fake-quant range variables without an aggregation (``VariableAggregation.NONE``)
and its input quantizer assigns them in each replica, so replicas keep different ranges and
saving takes replica 0's (tensorflow/model-optimization#1068). ``SyncRanges`` makes them agree at
every epoch end: the smallest ``*_min`` and the largest ``*_max`` over all replicas and workers,
which is what one device would have seen on the whole global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from edgetl.config import Distribute
from edgetl.errors import EdgetlError

CPU_REPLICAS_ENV = "EDGETL_CPU_REPLICAS"
# Seconds a worker waits for the others (at start, and for each collective) before giving up.
TIMEOUT_ENV = "EDGETL_WORKER_TIMEOUT"
DEFAULT_TIMEOUT = 120
LR_RULE = "not scaled: --batch-size is the global batch, the learning rate applies to its mean"
SHARDING = "tf.data AutoShardPolicy.DATA (each worker keeps its share of every global batch)"

_pending: Distribute | None = None  # multi-worker requested, to be built at TensorFlow start-up
_built: "Distribution | None" = None
_watchdog = None  # a process that ends this one if joining the cluster hangs
_private = False  # True while a non-chief worker trains on its private copy


class WorkerLostError(EdgetlError):
    """A worker of a multi-worker run died or stopped answering; the run can be resumed."""

    exit_code = 1


@dataclass(frozen=True)
class Distribution:
    """The strategy a run trains under.

    Attributes:
        strategy: the tf.distribute strategy object.
        kind: the resolved choice: 'none', 'mirrored' or 'multi-worker'.
        replicas: replicas in sync over all workers (the global batch is split this many ways).
        workers: worker processes (1 unless multi-worker).
        task: this process's task in TF_CONFIG, e.g. 'worker:0' ('' when not multi-worker).
        devices: the devices of this worker's replicas.
    """

    strategy: object
    kind: str
    replicas: int
    workers: int
    task: str
    devices: tuple

    def scope(self):
        """Variables created inside (model, QAT wrappers, optimizer, metrics) are distributed."""
        return self.strategy.scope()

    def describe(self) -> dict:
        """What config.json records."""
        return {"strategy": self.kind, "replicas": self.replicas, "workers": self.workers,
                "task": self.task, "devices": list(self.devices), "lr_rule": LR_RULE,
                "global_batch": True, "sharding": SHARDING if self.workers > 1 else None,
                "timeout_s": timeout() if self.workers > 1 else None}

    def shard(self, ds):
        """A batched dataset made ready for fit: the DATA auto-shard policy (in-memory datasets
        have no files to shard by), and no final batch smaller than the number of replicas (a
        replica given an empty batch fails inside tfmot's fake-quant ops and would turn its
        ranges to 0); at most replicas - 1 images per epoch are skipped that way."""
        from edgetl.keras import tf

        if self.replicas < 2:
            return ds
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        n = self.replicas
        return ds.filter(lambda x, *rest: tf.shape(x)[0] >= n).with_options(options)

    def callbacks(self, model) -> list:
        """Callbacks fit needs under this strategy (fake-quant ranges agreed at epoch end)."""
        if self.replicas < 2 or not _range_variables(model):
            return []
        from edgetl.keras import keras

        dist = self

        class SyncRanges(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                sync_ranges(dist, model)

        return [SyncRanges()]

    def errors(self):
        """Context that turns a lost worker into one WorkerLostError line."""
        return _worker_errors(self)


def timeout() -> int:
    """Seconds from EDGETL_WORKER_TIMEOUT (default 120)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = 0
    if value < 1:
        raise EdgetlError(f"{TIMEOUT_ENV}={raw!r}: use a whole number of seconds >= 1")
    return value


def read_tf_config() -> dict | None:
    """TF_CONFIG parsed and checked: {'cluster': {job: [host:port, ...]}, 'task': {type, index}}.

    Raises:
        EdgetlError: not JSON, no cluster/task, a task that is not in the cluster, or a task type
            edgetl does not run (only 'chief' and 'worker').
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        conf = json.loads(raw)
        cluster, task = conf["cluster"], conf["task"]
        kind, index = task["type"], int(task["index"])
        jobs = {j: list(cluster[j]) for j in ("chief", "worker") if j in cluster}
    except (ValueError, KeyError, TypeError):
        raise EdgetlError("TF_CONFIG is not valid: set it to JSON like {\"cluster\": {\"worker\": "
                          "[\"host1:port\", \"host2:port\"]}, \"task\": {\"type\": \"worker\", "
                          "\"index\": 0}}") from None
    if kind not in jobs or not 0 <= index < len(jobs[kind]):
        have = ", ".join(f"{j}: {len(h)}" for j, h in jobs.items()) or "no chief or worker jobs"
        raise EdgetlError(f"TF_CONFIG task {kind}:{index} is not in its cluster ({have}); "
                          "edgetl runs 'chief' and 'worker' tasks only")
    if len(jobs.get("chief", [])) > 1:
        raise EdgetlError("TF_CONFIG has more than one chief: list one chief and the others as "
                          "workers")
    return {"cluster": jobs, "task": {"type": kind, "index": index}}


def is_chief(conf: dict) -> bool:
    """The task that writes: the 'chief', or worker 0 when the cluster has no chief."""
    kind, index = conf["task"]["type"], conf["task"]["index"]
    return kind == "chief" or ("chief" not in conf["cluster"] and index == 0)


def prepare(cfg) -> bool:
    """Checks the choice before TensorFlow loads; records a multi-worker request.

    Returns False for a non-chief worker, which must train on a private copy (``as_worker``).

    Raises:
        EdgetlError: multi-worker without TF_CONFIG or without --out; TensorFlow already
            started in this process; bad EDGETL_CPU_REPLICAS / EDGETL_WORKER_TIMEOUT.
    """
    global _pending
    cpu_replicas()
    kind = Distribute(cfg.distribute)
    if kind != Distribute.multi_worker:
        return True
    timeout()
    conf = read_tf_config()
    if conf is None:
        raise EdgetlError("--distribute multi-worker needs TF_CONFIG in the environment (the "
                          "cluster and this process's task); see README 'Training on several "
                          "GPUs or machines'")
    if not cfg.out:
        raise EdgetlError("--distribute multi-worker needs --out RUN: the same run folder on "
                          "every worker (the chief writes it, --resume reads it)")
    if _built is None:
        if _tf_started():
            raise EdgetlError("--distribute multi-worker must be chosen before TensorFlow "
                              "starts: run it in a fresh process (the edgetl command does)")
        _pending = kind
        global _watchdog
        if _watchdog is None:  # started now, while stderr is still the user's terminal
            try:  # sys.stderr, not fd 2: fd 2 may be the native-log filter's pipe, which dies
                err = sys.stderr.fileno()  # with this process before it passes the line on
            except (AttributeError, OSError, ValueError):
                err = None
            _watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())],
                                         stdin=subprocess.PIPE, stderr=err)
        if not os.environ.get("EDGETL_TF_LOGS"):
            # TensorFlow logs a lost peer as C++ errors on stderr; edgetl says it in one line.
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return _private or is_chief(conf)


def _tf_started() -> bool:
    import sys

    context = sys.modules.get("tensorflow.python.eager.context")  # loaded only if TF is
    return context is not None and context.context()._context_handle is not None


def cpu_replicas() -> int:
    """EDGETL_CPU_REPLICAS as a number (0: unset)."""
    raw = os.environ.get(CPU_REPLICAS_ENV, "")
    if not raw:
        return 0
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise EdgetlError(f"{CPU_REPLICAS_ENV}={raw!r}: use a whole number of CPU devices, 1-64")
    return int(raw)


def at_startup(tf) -> None:
    """Called by edgetl.keras after importing TensorFlow, before its first op: splits the CPU
    into EDGETL_CPU_REPLICAS logical devices and builds a pending multi-worker strategy."""
    n = cpu_replicas() if os.environ.get(CPU_REPLICAS_ENV, "").isdigit() else 0
    if n > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    if _pending == Distribute.multi_worker:
        _build_multi_worker(tf)


def _build_multi_worker(tf) -> None:
    global _built
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    conf = read_tf_config()
    wait = timeout()
    cluster = tf.train.ClusterSpec(conf["cluster"])
    jobs = [j for j in ("chief", "worker") if j in conf["cluster"]]
    # The coordination service notices a dead worker by its missing heartbeat, and bounds the
    # wait for workers that never start and for the shutdown barrier: no hang on any of them.
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2

    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        cluster_register_timeout_in_ms=wait * 1000,
        heartbeat_timeout_in_ms=min(wait, 30) * 1000,
        shutdown_barrier_timeout_in_ms=min(wait, 30) * 1000,
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(
            name=j, num_tasks=cluster.num_tasks(j)) for j in jobs])
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=wait)
    task = f"{conf['task']['type']}:{conf['task']['index']}"
    missing = (f"multi-worker: {task} could not join the cluster within {wait} s; start every "
               f"worker listed in TF_CONFIG (or raise {TIMEOUT_ENV})")
    # Joining blocks inside TensorFlow holding the GIL (deaf to SIGTERM and to Python threads;
    # the coordination service's register timeout did not fire in tests): a watchdog process
    # prints the one line and ends this one if the cluster is not up in time.
    watchdog = _watchdog
    if watchdog is not None:
        watchdog.stdin.write(f"{wait} error: {missing}\n".encode())
        watchdog.stdin.flush()
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        # A first all-reduce: returns once every worker is up.
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    except (tf.errors.OpError, RuntimeError) as e:
        raise WorkerLostError(f"{missing} ({_why(e)})") from None
    finally:
        if watchdog is not None:
            watchdog.stdin.close()  # joined (or failed): the watchdog leaves quietly
            watchdog.wait()
    workers = sum(len(conf["cluster"][j]) for j in jobs)
    devices = tuple(strategy.extended.worker_devices)
    _built = Distribution(strategy, "multi-worker", strategy.num_replicas_in_sync, workers, task,
                          devices)


_WATCHDOG = """
import os, select, signal, sys
pid = int(sys.argv[1])
line = sys.stdin.buffer.readline().decode()  # the timeout and message, or EOF
if line:
    wait, message = line.rstrip("\\n").split(" ", 1)
    ready, _, _ = select.select([sys.stdin], [], [], float(wait))
if line and not ready:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


def strategy(cfg) -> Distribution:
    """The run's strategy, built on first use and then the same object (strategies hold devices
    and, for multi-worker, a server: they are made once per process).

    Raises:
        EdgetlError: mirrored with one device and no EDGETL_CPU_REPLICAS is fine (one replica);
            a global batch smaller than the number of replicas is refused.
    """
    global _built
    kind = Distribute(cfg.distribute)
    if _built is None or _built.kind != _resolved(kind):
        from edgetl.keras import tf

        resolved = _resolved(kind)
        if resolved == "multi-worker":
            raise EdgetlError("--distribute multi-worker was not prepared before TensorFlow "
                              "started: run it through the edgetl command")
        if resolved == "mirrored":
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            strat = tf.distribute.MirroredStrategy(
                devices, cross_device_ops=None if gpus else tf.distribute.ReductionToOneDevice())
            _built = Distribution(strat, "mirrored", strat.num_replicas_in_sync, 1, "",
                                  tuple(devices))
        else:
            strat = tf.distribute.get_strategy()
            _built = Distribution(strat, "none", 1, 1, "", ())
    if cfg.batch_size < _built.replicas:
        raise EdgetlError(f"--batch-size {cfg.batch_size} is smaller than the {_built.replicas} "
                          "replicas it is split across: use at least one image per replica")
    return _built


def _resolved(kind: Distribute) -> str:
    if kind == Distribute.auto:
        from edgetl.keras import tf

        return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    return kind.value


def as_worker(cfg, train_fn):
    """Runs ``train_fn`` for a non-chief worker on a private copy of the run, in a temporary
    folder deleted afterwards: the worker takes part in every step but writes nothing shared.

    Raises:
        EdgetlError: --resume when the chief's run folder cannot be read here.
    """
    global _private
    tmp = Path(tempfile.mkdtemp(prefix="edgetl-worker-"))
    try:
        private = tmp / "run"
        if cfg.resume:
            chief = Path(cfg.out)
            if not (chief / "config.json").is_file():
                raise EdgetlError(f"--resume: this worker cannot read the chief's run '{chief}' "
                                  "(no config.json): --out must be a folder every worker sees")
            shutil.copytree(chief, private, ignore=shutil.ignore_patterns(
                "*.tflite", "*.keras", "*.h5", ".*"))
        _private = True
        result = train_fn(replace(cfg, out=str(private), overwrite=False))
        return replace(result, run_dir=str(cfg.out))
    finally:
        _private = False
        shutil.rmtree(tmp, ignore_errors=True)


def _range_variables(model) -> list:
    return [w for w in model.non_trainable_weights
            if w.name.rsplit("/", 1)[-1].split(":")[0].endswith(("_min", "_max"))
            and hasattr(w, "values")]


def sync_ranges(dist: Distribution, model) -> int:
    """Makes every replica's fake-quant ranges equal: min over replicas (and workers) of each
    ``*_min`` variable, max of each ``*_max``. Returns the number of variables synced."""
    from edgetl.keras import tf

    variables = _range_variables(model)
    if not variables or dist.replicas < 2:
        return 0
    lows = [v.name.rsplit("/", 1)[-1].split(":")[0].endswith("_min") for v in variables]

    @tf.function
    def agree():
        def per_replica():
            ctx = tf.distribute.get_replica_context()
            out = []
            for v, low in zip(variables, lows):
                every = ctx.all_gather(tf.expand_dims(tf.identity(v), 0), axis=0)
                out.append(tf.reduce_min(every, 0) if low else tf.reduce_max(every, 0))
            return out

        return dist.strategy.run(per_replica)

    agreed = agree()
    for v, value in zip(variables, agreed):
        v.assign(dist.strategy.experimental_local_results(value)[0])
    return len(variables)


class _worker_errors:
    """Turns TensorFlow's errors about an unreachable or aborted peer into WorkerLostError."""

    def __init__(self, dist: Distribution):
        self.dist = dist

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if value is None or self.dist.workers < 2:
            return False
        from edgetl.keras import tf

        lost = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.AbortedError, tf.errors.CancelledError, tf.errors.InternalError,
                tf.errors.FailedPreconditionError)
        if isinstance(value, lost) or (isinstance(value, RuntimeError)
                                       and "cluster" in str(value).lower()):
            raise WorkerLostError(
                f"multi-worker run lost a worker ({self.dist.task} saw: {_why(value)}); restart "
                "every worker with --resume to continue from the last finished epoch") from None
        return False


def _why(error) -> str:
    """The useful part of TensorFlow's message about a failed peer."""
    import re

    text = str(error)
    dead = re.search(r"unhealthy.*?/job:(\w+)/replica:\d+/task:(\d+)", text, re.S)
    if dead:
        return f"{dead.group(1)}:{dead.group(2)} stopped sending heartbeats"
    text = re.sub(r"\{\{[^}]*\}\}|\[\[[^]]*\]\]", "", text)
    first = next((line.strip() for line in text.splitlines() if line.strip()),
                 type(error).__name__)
    return first[:160]
