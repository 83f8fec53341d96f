"""The calibration pass: which images calibrate a model, and what its activations span on them.

Shared by export (the converter's representative dataset) and by QAT range initialisation, so
both see the same images decoded and normalised by the runner's own code.

QAT range initialisation: tfmot starts every activation range at [-6, 6] and moves it by an
exponential moving average with decay 0.999, so a few hundred fine-tuning steps leave it near
-6..6 while a pretrained base's activations reach -55..48; the frozen layers' ranges then clip
and int8 loses points against post-training quantization. ``init_qat_ranges`` sets every
activation range from the min/max over the calibration images (the statistic TFLite's own
post-training calibration uses) before QAT starts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np


def sample(items, count: int, seed: int) -> list:
    """A class-balanced sample of (path, label) items, at most ``count`` long."""
    from edgetl.data import balanced_sample

    return balanced_sample(list(items), min(count, len(items)), seed)


def load_images(paths, size, prep: dict) -> np.ndarray:
    """Images -> preprocessed float32 batch (N, height, width, channels), with the runner's
    decode and normalisation (what the device does). ``size`` is (height, width, channels) or
    a square N (RGB). Raises RunnerError for an unreadable image."""
    from edgetl.runner import load_image, preprocess

    h, w, c = (size, size, 3) if isinstance(size, int) else tuple(size)
    pixels = np.stack([load_image(p, (h, w), channels=c) for p in paths])
    return preprocess(pixels, prep).astype(np.float32)


@dataclass(frozen=True)
class RangeStat:
    """One fake-quant activation range of a QAT model and what the calibration images did to it.

    Attributes:
        layer: the QAT model's layer that owns the range ('quant_<name>' or the input layer).
        variable: name of the range's min variable.
        frozen: the wrapped layer does not train.
        low, high: the range as set in the model.
        seen_low, seen_high: smallest and largest value the calibration images produced.
        clipped: fraction of the calibration values outside [low, high].
    """

    layer: str
    variable: str
    frozen: bool
    low: float
    high: float
    seen_low: float
    seen_high: float
    clipped: float


def _quantizer_classes():
    from edgetl.keras import tfmot

    q = tfmot.quantization.keras.quantizers
    return (q.MovingAverageQuantizer, q.AllValuesQuantizer, q.LastValueQuantizer)


def frozen_layers(qat_model) -> set[str]:
    """Names of the QAT model's layers whose output cannot change while training: the layer and
    every layer upstream of it are frozen (a frozen BatchNorm after a trained conv is not)."""
    trains = {}
    for layer in qat_model.layers:  # functional models list layers in topological order
        inner = getattr(layer, "layer", layer)
        inbound = layer.inbound_nodes[0].inbound_layers if layer.inbound_nodes else []
        inbound = inbound if isinstance(inbound, list) else [inbound]
        own = bool(inner.trainable_weights) if inner.trainable else False
        trains[layer.name] = own or any(trains.get(i.name, False) for i in inbound)
    return {name for name, t in trains.items() if not t}


def _range_owners(qat_model) -> dict:
    """id(variable) -> (layer name, frozen) for every weight of the model."""
    frozen = frozen_layers(qat_model)
    return {id(w): (layer.name, layer.name in frozen)
            for layer in qat_model.layers for w in layer.weights}


@contextlib.contextmanager
def _quantizers_wrapped(make):
    """While active, every tfmot quantizer class's ``__call__`` is ``make(original)``."""
    classes = _quantizer_classes()
    saved = {cls: cls.__call__ for cls in classes}
    for cls in classes:
        cls.__call__ = make(saved[cls])
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.__call__ = original


@contextlib.contextmanager
def _observing(record):
    """While active, every activation quantizer reports its input to ``record`` and passes it
    through unquantized: downstream layers see float activations, as in post-training
    calibration. Weight quantizers (their input is a variable) run as usual."""
    from edgetl.keras import tf

    def make(original):
        def call(self, inputs, training, weights, **kwargs):
            if isinstance(inputs, tf.Variable) or "min_var" not in weights:
                return original(self, inputs, training, weights, **kwargs)
            record(inputs, weights)
            return inputs
        return call

    with _quantizers_wrapped(make):
        yield


def _batches(images: np.ndarray, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def observe(qat_model, images: np.ndarray, batch_size: int = 32) -> list[RangeStat]:
    """Runs the calibration images through the QAT model in inference mode and reports, per
    activation range, what the images span and how much of it the current range clips.

    Args:
        qat_model: a tfmot QAT model (quantize_model / quantize_apply).
        images: preprocessed float32 images (N, H, W, 3).
    """
    owners = _range_owners(qat_model)
    seen = {}  # id(min var) -> [min var, max var, low, high, outside, total]

    def record(x, weights):
        lo_var, hi_var = weights["min_var"], weights["max_var"]
        x = x.numpy()
        lo, hi = float(lo_var.numpy().min()), float(hi_var.numpy().max())
        entry = seen.setdefault(id(lo_var), [lo_var, hi_var, np.inf, -np.inf, 0, 0])
        entry[2] = min(entry[2], float(x.min()))
        entry[3] = max(entry[3], float(x.max()))
        entry[4] += int(np.count_nonzero((x < lo) | (x > hi)))
        entry[5] += x.size

    with _observing(record):
        for batch in _batches(images, batch_size):
            qat_model(batch, training=False)
    stats = []
    for key, (lo_var, hi_var, low, high, outside, total) in seen.items():
        layer, frozen = owners.get(key, ("?", False))
        stats.append(RangeStat(layer, lo_var.name, frozen, float(lo_var.numpy().min()),
                               float(hi_var.numpy().max()), low, high, outside / max(total, 1)))
    return stats


def init_qat_ranges(qat_model, images: np.ndarray, batch_size: int = 32,
                    frozen_only: bool = False) -> int:
    """Sets every fake-quant activation range of a QAT model to the min/max its input takes
    over the calibration images (widened to include 0, as tfmot's own ranges are).

    ``frozen_only``: only the ranges of frozen layers (``frozen_layers``); the others keep
    tfmot's initial [-6, 6]. For layers that train from random weights: their activations are
    not meaningful yet (about 1e-6 deep in an untrained MobileNetV2), and a range fitted to them
    clips every later activation to a constant, so training never leaves chance.

    Returns the number of ranges set. Weight ranges are left alone: tfmot recomputes them from
    the weights at every training step.
    """
    stats = observe(qat_model, images, batch_size)
    if frozen_only:
        stats = [s for s in stats if s.frozen]
    by_name = {w.name: w for layer in qat_model.layers for w in layer.weights}
    for s in stats:
        lo_var = by_name[s.variable]
        hi_var = by_name[s.variable[:-len("_min:0")] + "_max:0"] if s.variable.endswith(
            "_min:0") else None
        if hi_var is None:
            raise RuntimeError(f"fake-quant range '{s.variable}' has no matching max variable")
        lo_var.assign(np.full(lo_var.shape, min(s.seen_low, 0.0), np.float32))
        hi_var.assign(np.full(hi_var.shape, max(s.seen_high, 0.0), np.float32))
    return len(stats)


@contextlib.contextmanager
def frozen_ranges_fixed(qat_model):
    """While fitting, the activation ranges of frozen layers (see ``frozen_layers``) stay as they
    are: their quantizers run in inference mode (no moving-average update); the ranges of
    layers that train, or that see a trained layer's output, keep adapting.
    Active while the training graph is traced (i.e. around ``fit``)."""
    names = frozen_layers(qat_model)
    frozen = {id(w) for layer in qat_model.layers if layer.name in names for w in layer.weights}
    from edgetl.keras import tf

    def make(original):
        # Weight ranges still follow the weights (they never change for a frozen layer).
        def call(self, inputs, training, weights, **kwargs):
            if id(weights.get("min_var")) in frozen and not isinstance(inputs, tf.Variable):
                training = False
            return original(self, inputs, training, weights, **kwargs)
        return call

    with _quantizers_wrapped(make):
        yield
