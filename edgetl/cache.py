"""Feature caching for frozen layers: the frozen part of a model runs once per image, and the
layers that train fit on its cached output.

A phase that trains only the top of a model (feature-extract, the head phase of two-phase, a
fine-tune of the top N layers) recomputes the same frozen layers for every image in every epoch.
``cached_fit`` finds the largest frozen prefix of the model whose output is exactly what the
uncached run computes (frozen layers, BatchNormalization in inference mode, nothing random in
training: no Dropout or noise layers, no losses), computes its output once per image, and returns
a model of the remaining layers (sharing the same layer objects, so the full model is trained in
place) with datasets of the cached tensors. The saved model is therefore the same graph.

Exact means: for the same seed, the same batches in the same order reach the trained layers as
in the uncached run (the shuffle is the same seeded shuffle over the same number of elements), so
the trained weights agree up to float rounding. Where it would not be exact the cache is off and
the reason is printed:

- augmentation on (the images differ every epoch): only ``--augment none`` runs cache;
- a QAT phase (fake quantization; frozen ranges may adapt);
- tf.distribute with more than one replica or worker;
- nothing frozen below the trained layers (training from scratch).

Random layers in the trained part (the head's Dropout) draw other masks than in the uncached run:
the same distribution, not the same numbers.

Features up to CACHE_MEMORY_BYTES stay in memory; beyond that they go to ``.npy`` files in the
run directory (``.tmp-feature-cache``), removed when the phase ends (and by the run's clean-up on
failure).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_MEMORY_BYTES = 1 << 30  # cached features kept in memory up to this; beyond, on disk
CACHE_DIR = ".tmp-feature-cache"  # in the run directory; .tmp-* is removed on failure too
DISK_MARGIN_BYTES = 1 << 30  # free space left on the disk after a disk cache


@dataclass(frozen=True)
class CachePlan:
    """Whether a phase trains on cached features, and why (printed at the phase start).

    Attributes:
        use: train on cached features.
        reason: why (or why not), in words.
        boundary: the KerasTensors the frozen prefix hands to the trained layers.
        where: name(s) of the layers whose output is cached.
        floats: floats per image over all boundary tensors.
    """

    use: bool
    reason: str
    boundary: tuple = ()
    where: str = ""
    floats: int = 0


def _exact_when_frozen(layer) -> bool:
    """The layer computes in training exactly what it computes in inference, and trains nothing."""
    from edgetl.keras import keras

    if layer.trainable_weights or getattr(layer, "activity_regularizer", None) is not None:
        return False
    if layer.losses:
        return False
    if isinstance(layer, keras.layers.BatchNormalization):
        return not layer.trainable  # a frozen BN runs in inference mode (Keras 2)
    # Dropout, noise, random augmentation layers and nested models take `training`.
    return not getattr(layer, "_expects_training_arg", False)


def frozen_boundary(model) -> tuple[list, list]:
    """(boundary KerasTensors, prefix layers): the largest prefix of ``model`` (in its
    topological layer order) whose layers are exact when frozen and depend only on the prefix,
    and the tensors it passes to the rest. Raises ValueError for a layer used more than once."""
    from edgetl.keras import keras

    def node(layer):
        # This model's own call of the layer (a trained-layers model made by cached_fit adds
        # another node to the same layers).
        mine = [n for i, n in enumerate(layer.inbound_nodes)
                if f"{layer.name}_ib-{i}" in model._network_nodes]
        if len(mine) != 1:
            raise ValueError(f"layer '{layer.name}' is used more than once")
        return mine[0]

    prefix: dict[int, object] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            prefix[id(layer)] = layer
            continue
        parents = [t._keras_history.layer for t in node(layer).keras_inputs]
        if all(id(p) in prefix for p in parents) and _exact_when_frozen(layer):
            prefix[id(layer)] = layer
    boundary, seen = [], set()
    for layer in model.layers:
        if id(layer) in prefix:
            continue
        for t in node(layer).keras_inputs:
            if id(t._keras_history.layer) in prefix and id(t) not in seen:
                seen.add(id(t))
                boundary.append(t)
    for t in model.outputs:
        if id(t._keras_history.layer) in prefix and id(t) not in seen:
            seen.add(id(t))
            boundary.append(t)
    return boundary, list(prefix.values())


def plan(model, *, enabled: bool, augment_ops: tuple, qat: bool, replicas: int) -> CachePlan:
    """Decides whether a phase trains on cached features (see the module docstring)."""
    if not enabled:
        return CachePlan(False, "off (--no-cache)")
    if qat:
        return CachePlan(False, "off (a QAT phase: fake quantization, not cached)")
    if replicas > 1:
        return CachePlan(False, f"off (tf.distribute with {replicas} replicas)")
    try:
        boundary, prefix = frozen_boundary(model)
    except ValueError as e:
        return CachePlan(False, f"off ({e})")
    if any(id(t) in {id(o) for o in model.outputs} for t in boundary):
        return CachePlan(False, "off (no layer trains)")
    if not any(layer.weights for layer in prefix):  # before augmentation: --augment none
        return CachePlan(False, "off (nothing frozen below the trained layers)")  # won't help
    if augment_ops:
        return CachePlan(False, f"off (augmentation {','.join(augment_ops)} changes the images "
                                "every epoch; with --augment none the frozen layers' output is "
                                "computed once per image)")
    floats = sum(int(np.prod(t.shape[1:])) for t in boundary)
    where = ", ".join(f"'{t._keras_history.layer.name}'" for t in boundary)
    return CachePlan(True, f"on (the output of {where}, {floats:,} floats per image, computed "
                           "once; --no-cache turns it off)", tuple(boundary), where, floats)


def _compute(prefix_model, ds, n: int, folder: Path | None, tag: str) -> list:
    """The prefix's outputs for every image of the unshuffled dataset ``ds``: arrays
    (n, *shape) float32, in memory or as .npy memory maps in ``folder``."""
    from edgetl.keras import tf

    shapes = [tuple(int(d) for d in t.shape[1:]) for t in prefix_model.outputs]
    if folder is None:
        arrays = [np.empty((n, *s), np.float32) for s in shapes]
    else:
        arrays = [np.lib.format.open_memmap(str(folder / f"{tag}-{i}.npy"), mode="w+",
                                            dtype=np.float32, shape=(n, *s))
                  for i, s in enumerate(shapes)]
    run = tf.function(lambda x: prefix_model(x, training=False), reduce_retracing=True)
    offset = 0
    for x, _ in ds:
        outs = run(x)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        k = int(x.shape[0])
        for arr, out in zip(arrays, outs):
            arr[offset:offset + k] = out.numpy()
        offset += k
    if offset != n:
        raise RuntimeError(f"feature cache: {offset} images computed, {n} expected")
    for arr in arrays:
        if isinstance(arr, np.memmap):
            arr.flush()
    return arrays


def shuffled_order(n: int, seed: int):
    """Image indices in make_dataset's training order: the same seeded shuffle over the same
    number of elements draws the same permutation. One object for the whole run: every epoch
    (of any phase) takes the next permutation, as the uncached training dataset does."""
    from edgetl.keras import tf

    return tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)


def _dataset(arrays: list, labels: np.ndarray, batch_size: int, order=None):
    """Batches of (cached features, labels): in ``order`` (shuffled_order), else in item
    order."""
    from edgetl.keras import tf

    ds = order if order is not None else tf.data.Dataset.range(len(labels))
    ds = ds.batch(batch_size)
    label_t = tf.constant(labels)
    single = len(arrays) == 1
    if not any(isinstance(a, np.memmap) for a in arrays):
        consts = [tf.constant(a) for a in arrays]

        def gather(idx):
            xs = tuple(tf.gather(c, idx) for c in consts)
            return (xs[0] if single else xs), tf.gather(label_t, idx)
    else:
        def read(idx):
            return tuple(np.ascontiguousarray(a[idx]) for a in arrays)

        def gather(idx):
            xs = tf.numpy_function(read, [idx], [tf.float32] * len(arrays), stateful=False)
            xs = tuple(tf.ensure_shape(x, (None, *a.shape[1:])) for x, a in zip(xs, arrays))
            return (xs[0] if single else xs), tf.gather(label_t, idx)
    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


@contextlib.contextmanager
def cached_fit(model, cache_plan: CachePlan, run: Path, plain_train, train_labels,
               plain_val, val_labels, batch_size: int, order, log):
    """Yields (model of the trained layers, train dataset, val dataset) on cached features.

    ``plain_train`` / ``plain_val``: unshuffled, unaugmented batches of (images, labels) in
    item order; ``*_labels`` the labels in that order; ``order``: shuffled_order of the run.
    The trained-layers model shares its layers (and so its weights) with ``model``. A disk
    cache is removed on the way out.
    """
    import time

    from edgetl.keras import keras

    t0 = time.time()
    boundary = list(cache_plan.boundary)
    prefix_model = keras.Model(model.inputs, boundary if len(boundary) > 1 else boundary[0])
    top = keras.Model(boundary if len(boundary) > 1 else boundary[0], model.outputs,
                      name=f"{model.name}_trained_part")
    n_train, n_val = len(train_labels), len(val_labels)
    total = (n_train + n_val) * cache_plan.floats * 4
    folder = None
    if total > CACHE_MEMORY_BYTES:
        folder = run / CACHE_DIR
        free = shutil.disk_usage(run).free
        if total + DISK_MARGIN_BYTES > free:
            log(f"feature cache: off (the features need {total / 1e9:.1f} GB on disk, "
                f"{free / 1e9:.1f} GB free in '{run}')")
            yield model, None, None
            return
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    try:
        train_arrays = _compute(prefix_model, plain_train, n_train, folder, "train")
        val_arrays = _compute(prefix_model, plain_val, n_val, folder, "val")
        where = f"on disk in '{folder}'" if folder else "in memory"
        log(f"feature cache: {n_train + n_val} images' features ({total / 1e6:.1f} MB "
            f"{where}, bound {CACHE_MEMORY_BYTES / 1e9:.2f} GB in memory) computed in "
            f"{time.time() - t0:.1f} s")
        yield (top, _dataset(train_arrays, np.asarray(train_labels, np.int32), batch_size,
                             order),
               _dataset(val_arrays, np.asarray(val_labels, np.int32), batch_size))
    finally:
        if folder is not None:
            train_arrays = val_arrays = None  # noqa: F841  (close the memory maps first)
            shutil.rmtree(folder, ignore_errors=True)
