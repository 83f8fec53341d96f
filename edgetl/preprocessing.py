"""What a model expects as input: presets, detection from a model's first layers, and the one
choice a run makes (used by train, recorded in config.json, read by export and the metadata).

A preprocessing is a dict ``{"name", "mean", "std", "channel_order", "reason"}``: the model input
is ``(pixels - mean) / std`` on pixels 0..255, per channel, after an optional RGB -> BGR swap,
which the device runner applies with numpy alone. ``mean``/``std`` have one value per channel
(1 for greyscale models, 3 for colour ones).

How ``train`` chooses (``choose``), first match wins:

1. ``--mean``/``--std`` (on top of ``--preprocessing`` when it names a preset);
2. ``--preprocessing tf|torch|caffe|raw``;
3. ``auto`` with a registry backbone: its preset (``edgetl backbones``);
4. ``auto`` with ``--base-model``: the sidecar file ``<model>.preprocessing.json`` if present;
5. ``auto`` with ``--base-model`` whose first layers normalise its input (``Rescaling``,
   ``Normalization``, the arithmetic that ``preprocess_input`` leaves in a model, EfficientNet's
   built-in scaling): ``raw`` 0..255 pixels;
6. otherwise ``tf`` (``x / 127.5 - 1``).

An explicit choice that contradicts the model's own normalising layers is kept (the user asked
for it) but its reason says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetl.backbones import PREPROCESSING as PRESETS
from edgetl.errors import EdgetlError

SIDECAR_SUFFIX = ".preprocessing.json"

# Layers that normalise pixel values (what makes a model want raw 0..255 input).
_NORMALISING_LAYERS = {"Rescaling", "Normalization"}
# TFOpLambda functions that preprocess_input (and hand-written x / 255 etc.) leave in a model.
_NORMALISING_OPS = {"math.truediv", "math.divide", "math.subtract", "math.multiply", "math.add",
                    "__operators__.add", "__operators__.sub", "math.negative", "nn.bias_add",
                    "math.scalar_mul", "math.divide_no_nan", "math.multiply_no_nan"}
# Layers that pass values through unchanged in range (shape, order, dtype, augmentation), so a
# normalising layer after them still sees raw pixels.
_PASS_THROUGH_LAYERS = {"InputLayer", "Resizing", "CenterCrop", "Cropping2D", "RandomFlip",
                        "RandomRotation", "RandomZoom", "RandomTranslation", "RandomCrop",
                        "RandomContrast", "RandomBrightness", "RandomHeight", "RandomWidth",
                        "Permute", "Reshape"}
_PASS_THROUGH_OPS = {"__operators__.getitem", "cast", "reverse", "stack", "concat",
                     "identity", "image.resize"}


def preset(name: str, channels: int = 3) -> dict:
    """A named preset (tf, torch, caffe, raw) for ``channels`` (1 or 3) channels."""
    if name not in PRESETS:
        raise EdgetlError(f"unknown preprocessing '{name}': use one of "
                          f"{', '.join(sorted(PRESETS))}")
    return for_channels(dict(PRESETS[name], name=name), channels)


def for_channels(prep: dict, channels: int) -> dict:
    """The same preprocessing with one mean/std value per channel.

    A colour preset on a greyscale model uses the average of its three values (the luma of an
    image whose channels are equal); one value on a colour model applies to all three.
    """
    out = dict(prep)
    for key in ("mean", "std"):
        values = [float(v) for v in out[key]]
        if channels == 1 and len(values) == 3:
            values = [sum(values) / 3.0]
        elif channels == 3 and len(values) == 1:
            values = values * 3
        out[key] = values
    if channels == 1:
        out["channel_order"] = "RGB"  # meaningless for one channel; BGR would only confuse
    return out


def describe(prep: dict) -> str:
    """One short phrase: 'tf ((x - 127.5) / 127.5, RGB)'."""
    def show(values):
        vals = [f"{v:g}" for v in values]
        return vals[0] if len(set(vals)) == 1 else "[" + ", ".join(vals) + "]"

    mean, std = show(prep["mean"]), show(prep["std"])
    if all(float(v) == 0 for v in prep["mean"]) and all(float(v) == 1 for v in prep["std"]):
        formula = "raw 0..255 pixels"
    else:
        formula = f"(x - {mean}) / {std}"
    order = "" if len(prep["mean"]) == 1 else f", {prep['channel_order']}"
    return f"{prep.get('name')} ({formula}{order})"


# --- detection ---------------------------------------------------------------------------------

def _layer_kind(layer) -> tuple[str, str]:
    """('normalise' | 'pass' | 'other', description) of a layer at the front of a model."""
    cls = type(layer).__name__
    if cls in _NORMALISING_LAYERS:
        return "normalise", f"{cls} '{layer.name}'"
    if cls in ("TFOpLambda", "SlicingOpLambda"):
        fn = str(getattr(layer, "symbol", "") or layer.get_config().get("function", ""))
        fn = fn.removeprefix("tf.")
        if fn in _NORMALISING_OPS:
            named = "" if layer.name.startswith(f"tf.{fn}") else f" '{layer.name}'"
            return "normalise", f"tf.{fn}{named}"
        if fn in _PASS_THROUGH_OPS:
            return "pass", f"tf.{fn}"
        return "other", f"tf.{fn}"
    if cls in _PASS_THROUGH_LAYERS:
        return "pass", cls
    return "other", cls


def normalising_layers(model) -> list[str]:
    """The layers at the front of a (flat, tf_keras) model that normalise its input pixels.

    Walks forward from the input through layers that keep the value range (augmentation,
    resizing, cropping, casts, channel reordering) and collects the normalising ones met before
    the first other layer: Rescaling, Normalization and TF-op arithmetic (what
    ``preprocess_input`` leaves in a model).

    Returns:
        Descriptions such as ["Rescaling 'rescale'"] (empty: the model takes normalised input).
    """
    inputs = list(getattr(model, "inputs", None) or [])
    if len(inputs) != 1:
        return []
    front = {id(inputs[0])}  # tensors that still hold (reordered / augmented) raw pixels
    found = []
    for layer in model.layers:
        for node in getattr(layer, "inbound_nodes", None) or []:
            tensors = node.input_tensors if isinstance(node.input_tensors, (list, tuple)) \
                else [node.input_tensors]
            if not tensors or not any(id(t) in front for t in tensors):
                continue
            kind, what = _layer_kind(layer)
            if kind == "other":
                continue
            if kind == "normalise":
                found.append(what)
            outs = node.output_tensors if isinstance(node.output_tensors, (list, tuple)) \
                else [node.output_tensors]
            front.update(id(t) for t in outs)
    return found


# --- the sidecar file --------------------------------------------------------------------------

def sidecar_path(path: str) -> Path:
    """Where the preprocessing of a base model may be written: ``<path>.preprocessing.json``."""
    return Path(str(path).rstrip("/\\") + SIDECAR_SUFFIX)


def read_sidecar(path: str) -> dict | None:
    """The preprocessing a sidecar file next to ``path`` names, or None when there is none.

    The file holds ``{"preset": "tf"|"caffe"|"torch"|"raw"}`` and/or ``{"mean": [r, g, b],
    "std": [r, g, b], "channel_order": "RGB"|"BGR"}`` (on pixels 0..255; one number applies to
    every channel).

    Raises:
        EdgetlError: the file is not valid JSON or names something unknown.
    """
    side = sidecar_path(path)
    if not side.is_file():
        return None

    def bad(why: str):
        return EdgetlError(f"preprocessing file '{side}' {why}: write "
                           '{"preset": "tf"} (or caffe, torch, raw) or {"mean": [r, g, b], '
                           '"std": [r, g, b], "channel_order": "RGB"}')

    try:
        spec = json.loads(side.read_text())
    except (ValueError, OSError) as e:
        raise bad(f"is not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise bad("is not a JSON object")
    name = spec.get("preset")
    if name is not None:
        if name not in PRESETS:
            raise bad(f"names an unknown preset '{name}' (valid: {', '.join(sorted(PRESETS))})")
        base = dict(PRESETS[name], name=name)
    else:
        base = dict(PRESETS["tf"], name="custom")
    out = dict(base)
    custom = "custom" if name is None else f"{name}+custom"
    for key in ("mean", "std"):
        if key in spec:
            value = spec[key]
            value = [value] * 3 if isinstance(value, (int, float)) else value
            if (not isinstance(value, list) or len(value) != 3
                    or not all(isinstance(v, (int, float)) for v in value)):
                raise bad(f"has '{key}' {spec[key]!r}, not 3 numbers")
            out[key] = [float(v) for v in value]
            out["name"] = custom
    if any(s == 0 for s in out["std"]):
        raise bad("has a std of 0")
    order = spec.get("channel_order", out["channel_order"])
    if str(order).upper() not in ("RGB", "BGR"):
        raise bad(f"has channel_order '{order}' (use RGB or BGR)")
    if str(order).upper() != base["channel_order"]:
        out["name"] = custom
    out["channel_order"] = str(order).upper()
    return out


# --- the choice --------------------------------------------------------------------------------

def choose(preprocessing: str = "auto", mean=None, std=None, *, backbone: str | None = None,
           backbone_preset: str | None = None, base_model: str | None = None, model=None,
           channels: int = 3) -> dict:
    """The preprocessing a run uses, and why (the ``reason`` key, one sentence).

    Args:
        preprocessing: 'auto' or a preset name (``--preprocessing``).
        mean: ``--mean`` values (1 or 3) or None.
        std: ``--std`` values (1 or 3) or None.
        backbone: registry backbone name (when no base model).
        backbone_preset: that backbone's preset.
        base_model: path of ``--base-model`` (for its sidecar file).
        model: the built backbone (tf_keras), whose first layers are inspected.
        channels: 1 or 3.

    Returns:
        {"name", "mean", "std", "channel_order", "reason"}, one mean/std value per channel.

    Raises:
        EdgetlError: 3 mean/std values for a 1-channel model, or a bad sidecar file.
    """
    preprocessing = str(getattr(preprocessing, "value", preprocessing) or "auto")
    normalising = normalising_layers(model) if model is not None else []
    own = (f"the model's first layers normalise its input ({', '.join(normalising[:3])})"
           if normalising else "")
    if preprocessing != "auto":
        prep = dict(PRESETS[preprocessing], name=preprocessing)
        reason = f"--preprocessing {preprocessing}"
    elif mean is not None or std is not None:
        prep = dict(PRESETS["tf"], name="custom")
        reason = ""
    elif backbone_preset is not None:
        prep = dict(PRESETS[backbone_preset], name=backbone_preset)
        reason = f"the preset of backbone {backbone} (see `edgetl backbones`)"
    elif base_model is not None and read_sidecar(base_model) is not None:
        prep = read_sidecar(base_model)
        reason = f"from {sidecar_path(base_model)}"
    elif normalising:
        prep = dict(PRESETS["raw"], name="raw")
        reason = f"{own}, so it gets raw pixels"
    else:
        prep = dict(PRESETS["tf"], name="tf")
        reason = ("the default for --base-model (no Rescaling/Normalization or preprocess_input "
                  "arithmetic at its input); choose with --preprocessing tf|torch|caffe|raw")
    if mean is not None or std is not None:
        for key, values in (("mean", mean), ("std", std)):
            if values is None:
                continue
            values = [float(v) for v in values]
            if channels == 1 and len(values) == 3:
                raise EdgetlError(f"--{key} {' '.join(f'{v:g}' for v in values)}: the model "
                                  "takes 1-channel (greyscale) images; give one number")
            prep[key] = values * 3 if (channels == 3 and len(values) == 1) else values
        flags = " ".join(f for f, v in (("--mean", mean), ("--std", std)) if v is not None)
        prep["name"] = "custom" if preprocessing == "auto" else f"{preprocessing}+custom"
        reason = f"{reason} with {flags}" if reason else flags
    prep = for_channels(prep, channels)
    raw = all(v == 0 for v in prep["mean"]) and all(v == 1 for v in prep["std"])
    if normalising and not raw:
        reason += (f"; note: {own}: if it was trained on 0..255 pixels, use "
                   "--preprocessing raw")
    prep["reason"] = reason
    return prep


def input_shape(run_cfg: dict) -> tuple[int, int, int]:
    """(height, width, channels) of a run's model, from its config.json.

    Runs before channels and non-square sizes were recorded hold a square ``input_size`` only.
    """
    shape = run_cfg.get("input_shape")
    if isinstance(shape, list) and len(shape) == 3:
        return int(shape[0]), int(shape[1]), int(shape[2])
    size = run_cfg["input_size"]
    if isinstance(size, list):
        return int(size[0]), int(size[1]), 3
    return int(size), int(size), 3


__all__ = ["choose", "describe", "for_channels", "input_shape", "normalising_layers", "preset",
           "read_sidecar", "sidecar_path", "SIDECAR_SUFFIX", "PRESETS"]
