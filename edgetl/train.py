"""train(TrainConfig) -> TrainResult: transfer learning with optional QAT, checkpoints, resume.

A run is a list of phases (head, then fine-tune for two-phase). Each completed epoch writes a
checkpoint directory atomically (temp name, then rename) and then ``state.json``; resume rebuilds
the same model and restores the newest checkpoint, so a killed run loses only the epoch in flight.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgetl import backbones, distribute
from edgetl import cache as feature_cache
from edgetl.config import (FROZEN_RANDOM, Monitor, Pooling, QatRanges, QatScope, Strategy,
                           TrainConfig, input_hw)
from edgetl.data import (augment_ops, class_weights, file_sha256, list_hash, make_dataset,
                         scan_folder, stratified_split)
from edgetl.errors import EdgetlError
from edgetl.preprocessing import describe
from edgetl.progress import SILENT, Progress

RUN_FORMAT = 1
HEAD_PREFIX = "head_"


@dataclass(frozen=True)
class Phase:
    """One training phase.

    Attributes:
        name: 'head' or 'fine-tune'.
        epochs: epochs in this phase.
        lr: learning rate.
        unfreeze: train base layers (from the configured point up).
        qat: wrap the model with fake quantization for this phase.
    """

    name: str
    epochs: int
    lr: float
    unfreeze: bool
    qat: bool


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    Attributes:
        run_dir: the run directory.
        val_accuracy: top-1 accuracy of the final model on the validation split.
        epochs_done: completed epochs over all phases.
        qat: whether the run has a QAT model.
        best_epoch: the (1-based, over all phases) epoch whose weights the model holds.
        warning: why the run stopped early and what to try, when it diverged.
    """

    run_dir: str
    val_accuracy: float
    epochs_done: int
    qat: bool
    best_epoch: int | None = None
    warning: str | None = None


def phases(cfg: TrainConfig) -> list[Phase]:
    """The phases a strategy runs; QAT goes to the phase that trains the most layers."""
    if cfg.strategy == Strategy.feature_extract:
        return [Phase("head", cfg.epochs, cfg.lr, False, cfg.qat)]
    if cfg.strategy == Strategy.fine_tune:
        return [Phase("fine-tune", cfg.epochs, cfg.fine_tune_lr, True, cfg.qat)]
    return [Phase("head", cfg.epochs, cfg.lr, False, False),
            Phase("fine-tune", cfg.fine_tune_epochs, cfg.fine_tune_lr, True, cfg.qat)]


# --- model building -----------------------------------------------------------------------------

# Widest --head layer: far above any classifier head, low enough that a typo (dense:1e9)
# cannot ask for terabytes of weights.
MAX_HEAD_UNITS = 65_536


def parse_head(spec: str) -> list[tuple[str, float]]:
    """'conv:64,dense:128,dropout:0.2' -> [('conv', 64), ('dense', 128), ('dropout', 0.2)]."""
    items = []
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        kind, _, value = part.partition(":")
        kind = kind.strip().lower()
        try:
            num = float(value)
        except ValueError:
            num = None
        if kind not in ("conv", "dense", "dropout") or num is None:
            raise EdgetlError(f"--head item '{part}': use conv:FILTERS, dense:UNITS or "
                              "dropout:RATE, comma-separated (e.g. 'conv:64,dense:128,dropout:0.2')")
        if kind in ("conv", "dense") and not (1 <= num <= MAX_HEAD_UNITS and num == int(num)):
            raise EdgetlError(f"--head item '{part}': {kind} needs a whole number from 1 to "
                              f"{MAX_HEAD_UNITS}")
        if kind == "dropout" and not 0 <= num < 1:
            raise EdgetlError(f"--head item '{part}': dropout rate must be in [0, 1)")
        if kind == "conv" and any(k != "conv" for k, _ in items):
            raise EdgetlError(f"--head item '{part}': conv layers go before dense/dropout "
                              "(they act on the feature map, before pooling)")
        items.append((kind, num))
    return items


def resolve_size(cfg: TrainConfig, spec: backbones.BackboneSpec | None) -> tuple[int, int]:
    """(height, width) of the model input: --input-size, else the base model's fixed size
    (a side it leaves open takes the other side, or 224), else the backbone's default."""
    size = input_hw(cfg.input_size)
    if size:
        return size
    if spec:
        return spec.default_size, spec.default_size
    from edgetl.basemodel import base_model_input_shape

    h, w, _ = base_model_input_shape(cfg.base_model) or (None, None, None)
    return (h or w or 224), (w or h or 224)


def resolve_channels(cfg: TrainConfig) -> int:
    """Image channels of a registry backbone: --channels, else 3 (base models bring their own)."""
    return cfg.channels or 3


def _check_channels(cfg: TrainConfig, spec: backbones.BackboneSpec) -> None:
    if resolve_channels(cfg) != 3 and cfg.weights != "none":
        raise EdgetlError(f"--channels {cfg.channels}: {spec.name} with --weights {cfg.weights} "
                          "takes 3-channel images; drop --channels (greyscale images are "
                          "converted to RGB and train well), or pass --weights none to train a "
                          f"{cfg.channels}-channel {spec.name} from scratch")


def _check_sides(spec: backbones.BackboneSpec, size: tuple, cfg: TrainConfig) -> None:
    """The registry's size/weights/alpha/QAT checks, for each side of a non-square input."""
    for side in dict.fromkeys(size):
        backbones.check_combination(spec, side,
                                    "imagenet" if cfg.weights == "imagenet" else "none",
                                    cfg.alpha, _qat_wraps_everything(cfg))


def _qat_wraps_everything(cfg: TrainConfig) -> bool:
    """QAT over the whole model. With --qat-scope trained only the trained layers are wrapped,
    so an unsupported layer in the frozen part is no obstacle (quantize() names a trained one)."""
    return cfg.qat and QatScope(cfg.qat_scope) == QatScope.all


def build_base(cfg: TrainConfig, size):
    """The backbone without its top, as a flat functional model, plus its registry entry.

    ``size`` is N or (height, width).
    """
    from edgetl.keras import keras

    size = (size, size) if isinstance(size, int) else tuple(size)
    if cfg.base_model:
        from edgetl.basemodel import load_base_model

        base = load_base_model(cfg.base_model, cfg.cut_layer, cfg.unsafe, size)
        if cfg.weights == "none":  # its architecture from scratch: new layers, fresh weights
            base = keras.models.clone_model(base)
        channels = int(base.input_shape[-1])
        if cfg.channels and cfg.channels != channels:
            raise EdgetlError(f"--channels {cfg.channels}: --base-model '{cfg.base_model}' takes "
                              f"{channels}-channel images; drop --channels (images are "
                              f"converted to {'greyscale' if channels == 1 else 'RGB'})")
        return base, None
    spec = backbones.get_backbone(cfg.backbone)
    weights = cfg.weights
    is_file = weights not in ("imagenet", "none")
    _check_sides(spec, size, cfg)
    _check_channels(cfg, spec)
    if is_file and not Path(weights).is_file():
        raise EdgetlError(_weights_problem(weights))
    kwargs = dict(spec.extra)
    if spec.alphas:
        kwargs["alpha"] = cfg.alpha if cfg.alpha is not None else 1.0
    builder = backbones.constructor(spec)
    try:
        base = builder(input_shape=(*size, resolve_channels(cfg)), include_top=False,
                       weights=None if weights == "none" else weights, **kwargs)
    except Exception as e:  # Keras reports a failed download as a plain Exception
        text = str(e)
        if weights == "imagenet" and ("URL fetch failure" in text or "http" in text.lower()):
            import re

            url = re.search(r"https?://\S+?(?=[:\s]|$)", text)
            where = url.group(0) if url else "the Keras weights URL"
            name = where.rsplit("/", 1)[-1]
            raise EdgetlError(
                f"cannot download ImageNet weights for {spec.name} (offline?): download {where} "
                f"on a machine with internet and put it in ~/.keras/models/{name}, or pass "
                "--weights PATH (or --weights none to train from scratch)") from None
        if is_file:
            raise EdgetlError(f"--weights '{weights}' does not fit {spec.name} at "
                              f"{'x'.join(map(str, dict.fromkeys(size)))} px"
                              f"{' alpha ' + str(kwargs.get('alpha')) if spec.alphas else ''}: "
                              f"{text.splitlines()[0][:200]}") from None
        raise
    return base, spec


def build_model(cfg: TrainConfig, n_classes: int, size):
    """Backbone + head built on base.output (tfmot refuses nested models).

    Returns (model, number of base layers, spec or None). Head layers are named 'head_*'.
    """
    from edgetl.keras import keras, tf

    tf.keras.utils.set_random_seed(cfg.seed)
    keras.utils.set_random_seed(cfg.seed)
    base, spec = build_base(cfg, size)
    x = base.output
    head = parse_head(cfg.head)
    i = 0
    for kind, num in head:
        if kind == "conv":
            x = keras.layers.Conv2D(int(num), 3, padding="same", activation="relu",
                                    name=f"{HEAD_PREFIX}conv{i}")(x)
            i += 1
    pool = {Pooling.avg: keras.layers.GlobalAveragePooling2D,
            Pooling.max: keras.layers.GlobalMaxPooling2D,
            Pooling.flatten: keras.layers.Flatten}[Pooling(cfg.pooling)]
    if len(x.shape) == 4:
        x = pool(name=f"{HEAD_PREFIX}pool")(x)
    for kind, num in head:
        if kind == "dense":
            x = keras.layers.Dense(int(num), activation="relu", name=f"{HEAD_PREFIX}dense{i}")(x)
        elif kind == "dropout":
            x = keras.layers.Dropout(num, name=f"{HEAD_PREFIX}dropout{i}")(x)
        i += 1
    if cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout, name=f"{HEAD_PREFIX}dropout")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name=f"{HEAD_PREFIX}predictions")(x)
    model = keras.Model(base.inputs, out, name=f"edgetl_{spec.name if spec else 'custom'}")
    if cfg.weights == "none" and not cfg.base_model:
        # From scratch, the applications' BatchNorm momentum (0.99-0.999) leaves the moving
        # statistics near their initial values for thousands of steps, so short runs evaluate
        # at chance. 0.9 settles within tens of steps.
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = min(layer.momentum, 0.9)
    n_base = len(base.layers)
    return model, n_base, spec


def set_trainable(model, n_base: int, cfg: TrainConfig, unfreeze: bool) -> int:
    """Freezes per strategy.

    BatchNorm layers of a pretrained base stay frozen (inference mode) even where the base
    trains: updating their statistics on a small dataset is the classic fine-tuning trap. With
    --weights none there are no statistics to protect, so they train with their block.

    Returns the index of the first trainable base layer (n_base when the base is frozen).
    """
    from edgetl.keras import keras

    base_layers = model.layers[:n_base]
    start = n_base
    if unfreeze:
        if cfg.unfreeze_from:
            names = [layer.name for layer in base_layers]
            if cfg.unfreeze_from not in names:
                raise layer_name_error("--unfreeze-from", cfg.unfreeze_from, names[1:], cfg)
            start = names.index(cfg.unfreeze_from)
        else:
            n = cfg.unfreeze if cfg.unfreeze is not None else (
                n_base - 1 if cfg.from_scratch() else max(1, (n_base - 1) // 5))
            if n > n_base - 1:
                raise EdgetlError(f"--unfreeze {n} is larger than the base model "
                                  f"({n_base - 1} layers)")
            start = n_base - n
    pretrained = cfg.weights != "none" or cfg.base_model is not None
    for i, layer in enumerate(model.layers):
        if i < n_base:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = i >= start and not (is_bn and pretrained)
        else:
            layer.trainable = True
    return start


def layers_command(cfg: TrainConfig) -> str:
    """The command that lists the layers of ``cfg``'s backbone or base model."""
    import shlex

    what = (f"--base-model {shlex.quote(cfg.base_model)}" if cfg.base_model
            else shlex.quote(cfg.backbone))
    cut = f" --cut-layer {shlex.quote(cfg.cut_layer)}" if cfg.cut_layer else ""
    return f"edgetl backbones {what}{cut} --layers"


def layer_name_error(flag: str, value: str, names: list[str], cfg: TrainConfig) -> EdgetlError:
    """One line: ``value`` is not among ``names``, the closest names, and how to list them all."""
    import difflib

    close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    what = f"'{cfg.base_model}'" if cfg.base_model else backbones.get_backbone(cfg.backbone).name
    span = f" from {names[0]} to {names[-1]}" if names else ""
    return EdgetlError(f"{flag} '{value}' is not a layer of {what}{hint} ({len(names)} layers"
                       f"{span}; list them: {layers_command(cfg)})")


def check_layer_names(cfg: TrainConfig) -> bool | None:
    """--unfreeze-from and --cut-layer checked against the architecture alone, before data or
    weights load: a registry backbone is built with random weights (about a second), a base
    model's names are read from its file's config (nothing deserialised).

    Returns whether a layer with weights lies below --unfreeze-from (it stays frozen), for a
    registry backbone; None otherwise.

    Raises:
        EdgetlError: the name is not a layer (the closest names and the listing command given).
    """
    if cfg.base_model and cfg.cut_layer:
        from edgetl.basemodel import _precheck, _read_file

        _precheck(_read_file(cfg.base_model), cfg.cut_layer, resolve_size(cfg, None))
    if not cfg.unfreeze_from:
        return None
    if cfg.base_model:
        from edgetl.basemodel import _config_layers, _read_file

        info = _read_file(cfg.base_model)
        names = [n for n, _ in _config_layers(info.config)] if info.config else []
        # Flattening renames a clash to '<outer model>_<name>': such a name may be right.
        if names and cfg.unfreeze_from not in names and not any(
                cfg.unfreeze_from.endswith("_" + n) for n in names):
            raise layer_name_error("--unfreeze-from", cfg.unfreeze_from, names, cfg)
        return None
    size = resolve_size(cfg, backbones.get_backbone(cfg.backbone))
    base, _ = build_base(replace(cfg, weights="none"), size)
    names = [layer.name for layer in base.layers[1:]]
    if cfg.unfreeze_from not in names:
        raise layer_name_error("--unfreeze-from", cfg.unfreeze_from, names, cfg)
    return any(layer.weights for layer in base.layers[:names.index(cfg.unfreeze_from) + 1])


def _shape_text(shape) -> str:
    """(None, 7, 7, 1280) -> '7x7x1280'; several outputs joined by ' + '."""
    if isinstance(shape, list):
        return " + ".join(_shape_text(s) for s in shape)
    dims = tuple(shape)[1:] if shape is not None else ()
    return "x".join("?" if d is None else str(d) for d in dims) or "scalar"


def layer_table(cfg: TrainConfig) -> dict:
    """The layers of ``cfg``'s backbone (built with random weights: nothing is downloaded) or
    base model (loaded and cut as ``train`` would), with whether each trains under ``cfg``'s
    strategy (its last phase), for ``edgetl backbones NAME --layers``.

    Returns:
        {"backbone", "input_shape" [h, w, c], "strategy", "weights", "trains" (summary),
         "layers": [{"index", "name", "type", "output_shape", "params", "trainable"}]};
        index is the position in the base model (0 = its input), as --unfreeze-from counts.

    Raises:
        EdgetlError: unknown backbone, unreadable base model, bad size, alpha or layer name.
    """
    cfg.check()
    cfg, _ = cfg.with_defaults()
    spec = None if cfg.base_model else backbones.get_backbone(cfg.backbone)
    size = resolve_size(cfg, spec)
    base, _ = build_base(replace(cfg, weights="none") if spec else cfg, size)
    last = phases(cfg)[-1]
    start = set_trainable(base, len(base.layers), cfg, last.unfreeze)
    rows = [{"index": i, "name": layer.name, "type": type(layer).__name__,
             "output_shape": _shape_text(layer.output_shape), "params": layer.count_params(),
             "trainable": bool(layer.trainable and i > 0)}
            for i, layer in enumerate(base.layers)]
    n = sum(r["trainable"] for r in rows)
    trains = ("the head only" if n == 0 else
              f"the head and {n} of {len(rows) - 1} base layers, from #{start} "
              f"{rows[start]['name']} up"
              + ("; BatchNorm stays frozen (pretrained statistics)"
                 if cfg.weights != "none" or cfg.base_model else ""))
    if len(phases(cfg)) > 1:
        trains = f"the head, then {trains}"
    return {"backbone": spec.name if spec else cfg.base_model,
            "input_shape": [int(d) for d in base.input_shape[1:]],
            "alpha": (cfg.alpha if cfg.alpha is not None else 1.0) if spec and spec.alphas
            else None,
            "strategy": Strategy(cfg.strategy).value, "weights": cfg.weights,
            "trains": trains, "layers": rows}


def quantize(model, scope: QatScope):
    """The QAT model: tfmot fake quantization; unsupported layers are named with the way out."""
    from edgetl.keras import keras, tfmot

    qk = tfmot.quantization.keras
    try:
        if QatScope(scope) == QatScope.all:
            return qk.quantize_model(model)
        trainable = {layer.name for layer in model.layers if layer.trainable}
        # A frozen BatchNormalization after a trained layer is folded into it by the converter;
        # annotated alone, the conv's raw output would be fake-quantized before the BN.
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                inbound = layer.inbound_nodes[0].inbound_layers if layer.inbound_nodes else []
                if any(getattr(i, "name", None) in trainable
                       for i in (inbound if isinstance(inbound, list) else [inbound])):
                    trainable.add(layer.name)

        def annotate(layer):
            if layer.name in trainable and not isinstance(layer, keras.layers.InputLayer):
                return qk.quantize_annotate_layer(layer)
            return layer

        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        return qk.quantize_apply(annotated)
    except Exception as e:  # tfmot fails in many ways (AttributeError for MobileNetV3's TF ops)
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise EdgetlError(f"QAT cannot quantize this model: {first}. Train without --qat and "
                          "export with post-training int8 (edgetl export RUN --int8)") from None


@contextlib.contextmanager
def frozen_stay_frozen(model):
    """While fitting, hides the kernels of frozen quantized layers from the optimizer.

    tfmot's QuantizeWrapper lists its layer's kernel as trainable even when the layer is frozen
    (tensorflow/model-optimization#1067), so QAT would train the frozen part of the base. The
    lists are restored afterwards: HDF5 saving and loading count each layer's weights.
    """
    hidden = []
    for layer in model.layers:
        inner = getattr(layer, "layer", None)
        own = getattr(layer, "_trainable_weights", None)
        if inner is not None and not inner.trainable and own:
            hidden.append((layer, list(own)))
            own[:] = []
    try:
        yield
    finally:
        for layer, own in hidden:
            layer._trainable_weights[:] = own


FLOAT_BEFORE_QAT = "float_before_qat.keras"
QAT_CALIBRATION_IMAGES = 200  # export's default --num-calibration: the same images with seed 0


def init_ranges(qat_model, cfg: TrainConfig, train_items, size, prep: dict, log) -> None:
    """Sets the QAT model's activation ranges from a calibration pass over training images
    (unless --qat-ranges tfmot): the sample export calibrates with by default. ``size`` is
    (height, width, channels)."""
    if QatRanges(cfg.qat_ranges) == QatRanges.tfmot:
        log("QAT ranges start at tfmot's [-6, 6] (--qat-ranges tfmot)")
        return
    from edgetl import calibrate
    from edgetl.runner import RunnerError

    chosen = calibrate.sample(train_items, QAT_CALIBRATION_IMAGES, cfg.seed)
    try:
        images = calibrate.load_images([p for p, _ in chosen], size, prep)
    except RunnerError as e:
        raise EdgetlError(f"QAT range calibration cannot read a training image: {e}") from None
    # From scratch, layers that train have random weights: ranges fitted to their activations
    # would clip everything after them (see calibrate.init_qat_ranges), so only frozen layers'.
    scratch = cfg.from_scratch()
    n = calibrate.init_qat_ranges(qat_model, images, cfg.batch_size, frozen_only=scratch)
    fixed = QatRanges(cfg.qat_ranges) == QatRanges.data
    rest = ("; layers that train from random weights start at tfmot's [-6, 6] "
            "(--weights none)") if scratch else ""
    log(f"QAT ranges initialised from {len(images)} training images ({n} activation ranges, "
        f"min/max; frozen layers' ranges {'fixed' if fixed else 'adapting'}){rest}")


def _ranges_during_fit(model, phase: Phase, cfg: TrainConfig):
    if phase.qat and QatRanges(cfg.qat_ranges) == QatRanges.data:
        from edgetl.calibrate import frozen_ranges_fixed

        return frozen_ranges_fixed(model)
    return contextlib.nullcontext()


def qat_to_float(qat_model, float_model) -> None:
    """Copies QAT-trained weights back into the float model.

    tfmot's wrappers take over their layer's kernel but keep its variable name ('Conv1/kernel'),
    so variables are matched by name.
    """
    by_name = {w.name: w for w in qat_model.weights}
    for w in float_model.weights:
        src = by_name.get(w.name)
        if src is not None and tuple(src.shape) == tuple(w.shape):
            w.assign(src)


# --- run directory -------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _out_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path("runs") / (
        f"{cfg.backbone if not cfg.base_model else 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}")


class _RunDir:
    """What _prepare_run_dir did, so that a failure can undo exactly that."""

    def __init__(self, out: Path):
        self.out = out
        self.created = False  # this process made the run directory
        self.set_aside = False  # --overwrite moved the previous run to _aside(out)


def _prepare_run_dir(cfg: TrainConfig, out: Path, given, done: _RunDir
                     ) -> tuple[Path, TrainConfig, dict | None]:
    """Creates (or, with --resume, reopens) the run directory; never clobbers without --overwrite.

    Called with the run's lock held. ``done`` records what was changed, for the undo.
    """
    aside = _aside(out)
    if cfg.resume:
        config = _read_run_config(out)
        saved = TrainConfig.from_dict(config["train"])  # validated by _read_run_config
        _refuse_changed_flags(cfg, saved, given, out)
        _refuse_special_run_files(out)
        resumed = TrainConfig.from_dict(dict(saved.to_dict(), resume=True, quiet=cfg.quiet,
                                             verbose=cfg.verbose, strict=cfg.strict,
                                             unsafe=cfg.unsafe, cache=cfg.cache, out=str(out)))
        check_out_outside_data(out, resumed)
        state = _read_state(out, resumed)
        if aside.exists() and not cfg.quiet:
            print(f"note: '{aside}' holds a run an interrupted --overwrite set aside; it is "
                  "kept (delete it when you no longer need it)", file=sys.stderr)
        return out, resumed, state
    check_out_dir(out, "--out")
    if aside.exists():
        # Only a killed --overwrite leaves this (the lock says no one else is running here).
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(aside, out)
            print(f"note: put back the run an interrupted --overwrite had set aside in "
                  f"'{aside}'", file=sys.stderr)
        else:
            raise EdgetlError(f"'{aside}' holds the run an interrupted --overwrite set aside "
                              f"(replaced by the run in '{out}'): move it back or delete it, "
                              "then try again")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise EdgetlError(f"run directory '{out}' already exists: pass --overwrite to replace "
                              "it, --resume to continue it, or choose another --out")
        if not (out / "config.json").is_file():
            raise EdgetlError(f"--overwrite refused: '{out}' is not an edgetl run directory "
                              "(no config.json); choose another --out")
        # Set aside, not deleted: put back on any failure, deleted only once this run succeeds.
        with _signals_deferred():
            os.replace(out, aside)
            done.set_aside = True
    if not out.exists():
        out.mkdir(parents=True)
        done.created = True
    return out, cfg, None


def _aside(run: Path) -> Path:
    """Where --overwrite keeps the replaced run until the new one has succeeded."""
    return run.with_name(f".{run.name}.replaced")


def _lock_path(run: Path) -> Path:
    return run.with_name(f".{run.name}.lock")


@contextlib.contextmanager
def _claim(out: Path):
    """Holds an exclusive lock on the run directory (a sibling lock file, flock'ed).

    The kernel drops a flock when its process dies, so a killed run never blocks the next one.
    Missing parent folders are created for the lock file and removed again on failure.

    Raises:
        EdgetlError: another process holds the run.
    """
    import fcntl

    made = []
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    for d in reversed(made):
        d.mkdir()
    lock = _lock_path(out)
    fd = None
    try:
        while fd is None:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None  # not ours: never unlinked here
                raise EdgetlError(f"run directory '{out}' is in use by another edgetl train "
                                  f"(it holds '{lock}'): wait for it to finish, or choose "
                                  "another --out") from None
            try:  # the previous holder may have unlinked the file after we opened it
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                fd = None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    except BaseException:
        if fd is not None:
            _unlock(lock, fd)
            fd = None
        for d in made:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        if fd is not None:
            _unlock(lock, fd)


def _unlock(lock: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(lock)  # while still locked: a waiter re-checks the inode
    os.close(fd)


_deferred = {"depth": 0, "pending": None}


def _on_signal(signum, frame):
    if _deferred["depth"]:
        _deferred["pending"] = signum
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_raise():
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while training runs, so the
    run directory is put right (temp files, a set-aside run) before the process ends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_deferred(then_raise: bool = True):
    """A signal arriving inside waits until the block is done (renames that must pair up);
    ``then_raise=False`` drops it (the run has already finished)."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        if not _deferred["depth"] and _deferred["pending"] is not None:
            _deferred["pending"] = None
            if then_raise:
                raise KeyboardInterrupt


def _remove_temp_files(run: Path) -> None:
    """Removes the temporary names this module writes (.tmp-*, .*.tmp) anywhere in the run."""
    if not run.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(run):
        for name in list(dirnames):
            if name.startswith(".tmp-"):
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                dirnames.remove(name)
        for name in filenames:
            if name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp")):
                with contextlib.suppress(OSError):
                    os.unlink(Path(dirpath) / name)


def _undo(done: _RunDir) -> None:
    """After a failure: temp files go; a set-aside run comes back; a new run without a finished
    epoch is removed (there is nothing to resume). A run with finished epochs stays resumable."""
    out = done.out
    _remove_temp_files(out)
    if done.set_aside:
        failed = out.with_name(f".{out.name}.failed")
        shutil.rmtree(failed, ignore_errors=True)
        if out.exists():
            os.replace(out, failed)
        os.replace(_aside(out), out)
        shutil.rmtree(failed, ignore_errors=True)
    elif done.created and not (out / "state.json").exists():
        shutil.rmtree(out, ignore_errors=True)


def _interrupted(run: Path, kept: bool) -> EdgetlError:
    """Ctrl-C or SIGTERM: exit 130, saying whether the run can be resumed."""
    if kept:
        text = (f"interrupted; the run keeps its finished epochs: continue it with "
                f"`edgetl train --out {run} --resume`")
    else:
        text = "interrupted before this run finished an epoch: nothing of it was kept"
    err = EdgetlError(text)
    err.exit_code = 130
    return err


def _fault(e: BaseException, run: Path, kept: bool) -> EdgetlError | None:
    """A fault of the machine (disk full, read-only, TensorFlow's file and memory errors) as one
    line naming the path; None for anything else."""
    import re

    tf_error = None
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(e, tf.errors.OpError):
        tf_error = e
    if isinstance(e, OSError):
        path = e.filename or run
        reason = e.strerror or str(e)
    elif tf_error is not None:
        text = str(getattr(e, "message", e))
        if isinstance(e, tf.errors.ResourceExhaustedError) and "OOM" in text:
            return EdgetlError("out of memory while training: lower --batch-size or "
                               "--input-size")
        found = re.search(re.escape(str(run)) + r"[^\s;:,'\"]*", text)
        path = found.group(0) if found else run
        if found and "/.tmp-" in path:  # TensorFlow's own temp name inside ours, already removed
            path = path[:path.index("/", path.index("/.tmp-") + 1)] if "/" in path[
                path.index("/.tmp-") + 1:] else path
        known = [r for r in ("No space left on device", "Read-only file system",
                             "Permission denied", "Disk quota exceeded", "No such file or directory")
                 if r in text]
        reason = known[0] if known else (text.splitlines() or [type(e).__name__])[0][:200]
    elif isinstance(e, MemoryError):
        return EdgetlError("out of memory while training: lower --batch-size or --input-size")
    else:
        return None
    then = (f"; the run is kept: fix that, then continue it with `edgetl train --out {run} "
            "--resume`") if kept else ""
    return EdgetlError(f"cannot read or write '{path}': {reason}{then}")


def _read_json(path: Path, what: str):
    """A run's JSON file, or an EdgetlError naming it."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise EdgetlError(f"'{path}' is not a regular file: the run is damaged")
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError):
        raise EdgetlError(f"'{path}' is corrupt (not JSON): {what}") from None
    except OSError as e:
        raise EdgetlError(f"cannot read '{path}': {e.strerror or e}") from None


def _damaged(file: Path, field: str, problem: str, todo: str) -> EdgetlError:
    return EdgetlError(f"'{file}' field '{field}' {problem}: {todo}")


def validate_run_config(config, file: Path, todo: str) -> dict:
    """Checks every field of a run's config.json that resume and export use.

    Returns the config. Raises EdgetlError naming the file and the field.
    """
    import math

    from edgetl.config import parse_input_size

    if not isinstance(config, dict):
        raise EdgetlError(f"'{file}' is not a JSON object: {todo}")
    fmt = config.get("run_format", RUN_FORMAT)
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise _damaged(file, "run_format", f"is {fmt!r}, not a whole number", todo)
    if fmt > RUN_FORMAT:
        raise EdgetlError(f"run '{file.parent}' was written by a newer edgetl (run format "
                          f"{fmt}); upgrade edgetl")
    train_cfg = config.get("train")
    if not isinstance(train_cfg, dict):
        raise _damaged(file, "train", "is missing or not an object", todo)
    try:
        TrainConfig.from_dict(dict(train_cfg, resume=False, overwrite=False)).check()
    except EdgetlError as e:
        import re

        flag = re.search(r"--([a-z-]+)", str(e)) or re.match(r"(\w+)", str(e))
        name = flag.group(1).replace("-", "_") if flag else "?"
        raise _damaged(file, f"train.{name}", f"is invalid ({e})", todo) from None
    if "input_size" in config:
        try:
            parse_input_size(config["input_size"], "value")
        except EdgetlError as e:
            raise _damaged(file, "input_size", f"is invalid ({e})", todo) from None
    prep = config.get("preprocessing")
    if "preprocessing" in config:
        if not isinstance(prep, dict):
            raise _damaged(file, "preprocessing", f"is {prep!r}, not an object with mean, std "
                           "and channel_order", todo)
        for key in ("mean", "std"):
            v = prep.get(key)
            if not (isinstance(v, list) and len(v) in (1, 3) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for x in v)):
                raise _damaged(file, f"preprocessing.{key}", f"is {v!r}, not 1 or 3 finite numbers",
                               todo)
        if any(x == 0 for x in prep["std"]):
            raise _damaged(file, "preprocessing.std", "has a zero", todo)
        # pixels are 0..255: a mean or std far outside (1e30, a negative std) is no model's
        # preprocessing, and fails only after the conversion
        if any(x < 0 for x in prep["std"]) or any(abs(x) > 1e4 for x in prep["mean"] + prep["std"]):
            raise _damaged(file, "preprocessing", f"mean {prep['mean']} std {prep['std']} is not "
                           "a normalisation of pixels 0..255", todo)
        if prep.get("channel_order") not in ("RGB", "BGR"):
            raise _damaged(file, "preprocessing.channel_order",
                           f"is {prep.get('channel_order')!r}, not 'RGB' or 'BGR'", todo)
    names = config.get("class_names")
    if "class_names" in config:
        if not (isinstance(names, list) and len(names) >= 2
                and all(isinstance(n, str) and n for n in names)):
            raise _damaged(file, "class_names", "is not a list of at least 2 names", todo)
        if len(set(names)) != len(names):
            raise _damaged(file, "class_names", "repeats a name", todo)
        import unicodedata

        from edgetl.runner import printable

        bad = [n for n in names if any(unicodedata.category(c) in ("Cc", "Zl", "Zp")
                                       or "\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069"
                                       for c in n)]
        if bad:  # the same rule as class folder names: labels are printed and written a line each
            raise _damaged(file, "class_names", f"has control characters in "
                           f"'{printable(bad[0])}'", todo)
    for key in ("n_base_layers",):
        v = config.get(key)
        if key in config and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _damaged(file, key, f"is {v!r}, not a whole number >= 1", todo)
    return config


# Files of a run that train --resume reads or appends to: a FIFO or device among them would
# block or feed garbage (history.csv is opened for appending after each epoch).
RUN_FILES = ("config.json", "split.json", "state.json", "metrics.json", "history.csv",
             "labels.txt", "model.keras")


def _refuse_special_run_files(out: Path) -> None:
    import stat

    for name in RUN_FILES:
        try:
            mode = os.stat(out / name).st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            raise EdgetlError(f"cannot read '{out / name}': {e.strerror or e}: the run is "
                              "damaged; start a new run (--overwrite)") from None
        if not stat.S_ISREG(mode):
            raise EdgetlError(f"'{out / name}' is not a regular file: the run is damaged; start "
                              "a new run (--overwrite)")
    ckpt = out / "checkpoints"
    if (ckpt.exists() or ckpt.is_symlink()) and not ckpt.is_dir():
        raise EdgetlError(f"'{ckpt}' is not a folder: the run is damaged; start a new run "
                          "(--overwrite)")


def _read_run_config(out: Path) -> dict:
    file = out / "config.json"
    if not file.is_file():
        raise EdgetlError(f"--resume: '{out}' is not an edgetl run (no config.json); start a "
                          "new run without --resume")
    todo = "the run is damaged; start a new run (--overwrite)"
    config = validate_run_config(_read_json(file, todo), file, todo)
    if "data" not in config["train"]:
        raise _damaged(file, "train.data", "is missing", todo)
    return config


def _read_state(out: Path, cfg: TrainConfig) -> dict | None:
    """state.json checked against the run's phases and checkpoints (None: no epoch finished)."""
    file = out / "state.json"
    if not file.exists():
        return None
    todo = "the run is damaged; start a new run (--overwrite)"
    state = _read_json(file, todo)
    if not isinstance(state, dict):
        raise EdgetlError(f"'{file}' is not a JSON object: {todo}")
    plan = phases(cfg)
    phase, epoch, ckpt = state.get("phase"), state.get("epoch"), state.get("checkpoint")
    if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < len(plan):
        raise _damaged(file, "phase", f"is {phase!r}, not a phase of this run "
                       f"(0..{len(plan) - 1})", todo)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or \
            not 0 <= epoch <= plan[phase].epochs:
        raise _damaged(file, "epoch", f"is {epoch!r}, not in 0..{plan[phase].epochs}", todo)
    if not isinstance(ckpt, str) or "/" in ckpt or ckpt.startswith(".") or \
            not (out / "checkpoints" / ckpt / "ckpt.index").is_file():
        raise _damaged(file, "checkpoint", f"names {ckpt!r}, which is not a complete "
                       "checkpoint in checkpoints/", todo)
    return state


# Settings that do not change what a resumed run computes.
# cache: the cached and uncached paths train the same weights, so a resume may switch.
_RESUME_FREE = {"out", "resume", "overwrite", "quiet", "strict", "unsafe", "cache", "verbose"}


def _refuse_changed_flags(cfg: TrainConfig, saved: TrainConfig, given, out: Path) -> None:
    """--resume continues with the run's own settings; a flag that differs is refused by name.

    ``given``: the fields set on the command line (None: the fields that differ from the
    defaults, for library calls).
    """
    mine, theirs = cfg.to_dict(), saved.to_dict()
    if given is None:
        defaults = TrainConfig(data="").to_dict()
        given = {k for k, v in mine.items() if v != defaults[k]}
    differ = []
    for key in sorted(set(given) - _RESUME_FREE):
        if key not in mine:
            continue
        a, b = mine[key], theirs.get(key)
        if key in ("data", "val_data", "base_model") and a is not None and b is not None:
            same = os.path.realpath(a) == os.path.realpath(b)
        else:
            same = a == b
        if not same:
            flag = "--" + key.replace("_", "-")
            if isinstance(a, bool):
                flag = flag if a else "--no-" + key.replace("_", "-")
                differ.append(f"{flag} (run: {'--' if b else '--no-'}{key.replace('_', '-')})")
            else:
                differ.append(f"{flag} {a!r} (run: {b!r})")
    if differ:
        raise EdgetlError(f"--resume continues '{out}' with its own settings, and these flags "
                          f"differ from them: {', '.join(differ)}; drop them to resume, or start "
                          "a new run with --overwrite")


def check_out_outside_data(out: Path, cfg: TrainConfig) -> None:
    """Refuses a run directory inside (or equal to) the data folders: it would be scanned as a
    class, or --overwrite would move the data; and --base-model / --weights files inside it
    (--overwrite sets the old run aside before they are read)."""
    real_out = os.path.realpath(out)
    for flag, folder in (("--data", cfg.data), ("--val-data", cfg.val_data)):
        if not folder:
            continue
        real = os.path.realpath(folder)
        if _is_within(real_out, real) or _is_within(real, real_out):
            where = "is inside" if _is_within(real_out, real) and real_out != real else \
                "contains" if real_out != real else "is"
            raise EdgetlError(f"--out '{out}' {where} {flag} '{folder}': the run directory must "
                              f"be outside the data folder; choose another --out")
    if cfg.resume:  # the run's own settings: its files were outside it when it started
        return
    weights = cfg.weights if cfg.weights not in (None, "imagenet", "none") else None
    for flag, given in (("--base-model", cfg.base_model), ("--weights", weights)):
        if given and os.path.lexists(given) and _is_within(os.path.realpath(given), real_out):
            # --overwrite sets the old run aside before the file is read: it would vanish
            raise EdgetlError(f"{flag} '{given}' is inside --out '{out}', which this run "
                              f"replaces: copy it out of the run directory first, or choose "
                              f"another --out")


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_dir(out: Path, flag: str) -> None:
    """Refuses an output folder that cannot be created or written, before anything is written."""
    if out.is_symlink() and not out.exists():  # mkdir would say only "File exists"
        raise EdgetlError(f"{flag} '{out}' is a broken symlink or a symlink loop (it points to "
                          f"'{os.readlink(out)}'): remove it or choose another {flag}")
    if out.exists() and not out.is_dir():
        if not out.is_file():  # a FIFO, a socket: named
            from edgetl.runner import path_problem

            raise EdgetlError(f"{path_problem(out, flag, 'folder')}: choose another {flag}")
        raise EdgetlError(f"{flag} '{out}' is a file, not a folder: choose another {flag}")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise EdgetlError(f"cannot create {flag} '{out}': '{probe}' is a file, not a folder; "
                          f"choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EdgetlError(f"cannot write {flag} '{out}': '{probe}' is not writable (read-only "
                          f"or no permission); choose another {flag}")


class TrainingDiverged(EdgetlError):
    """Training diverged (non-finite loss, or collapsed to one class) before any usable epoch."""

    exit_code = 1


# A model that had learned (validation accuracy at least halfway from chance to perfect), then
# predicts one class for all validation images for this many epochs in a row, has collapsed.
# Before it has learned, one-class epochs are a normal start from scratch (BatchNorm statistics
# settling), so they alone stop nothing.
COLLAPSE_EPOCHS = 2
# Cross-entropy on clipped probabilities stays below ~16; a loss this many times the chance
# level ln(k) means the weights have blown up (finite, but as useless as NaN).
EXPLODED = 100


def epoch_score(row: dict, monitor: str) -> tuple | None:
    """Sort key of an epoch (higher is better), or None when it cannot be the best.

    val_accuracy ties (common on small validation sets) go to the lower val_loss. An epoch
    whose predictions collapsed to one class ranks below every epoch that did not.
    """
    loss, acc = row.get("val_loss"), row.get("val_accuracy")
    if loss is None or not math.isfinite(loss) or acc is None or not math.isfinite(acc):
        return None
    sound = not row.get("collapsed", False)
    if monitor == "val_loss":
        return (sound, -loss)
    return (sound, acc, -loss)


def divergence(row: dict, previous: list[dict], n_classes: int, learned: bool) -> str | None:
    """Why training has diverged after this epoch, in words, or None.

    ``row`` holds the epoch's logs (loss, val_loss, collapsed, ...); ``previous`` the rows of
    the epochs before it in this process, oldest first; ``learned``: an earlier epoch predicted
    more than one class.
    """
    chance = math.log(max(n_classes, 2))
    for key in ("loss", "val_loss"):
        value = row.get(key)
        what = "training" if key == "loss" else "validation"
        if value is not None and not math.isfinite(value):
            return f"the {what} loss became {value}"
        if value is not None and value > EXPLODED * chance:
            return (f"the {what} loss exploded to {value:.4g} (chance level is ln {n_classes} "
                    f"= {chance:.4f})")
    if not (learned and row.get("collapsed")):
        return None
    recent = previous[len(previous) - (COLLAPSE_EPOCHS - 1):] if COLLAPSE_EPOCHS > 1 else []
    if len(recent) < COLLAPSE_EPOCHS - 1 or not all(r.get("collapsed") for r in recent):
        return None
    return (f"the model collapsed: it predicts one class for every validation image "
            f"({COLLAPSE_EPOCHS} epochs in a row, loss {row['loss']:.4g}; chance level ln "
            f"{n_classes} = {chance:.4f})")


def predicted_classes_metric(n_classes: int):
    """A Keras metric: how many classes the model predicted at least once (0..n_classes)."""
    from edgetl.keras import keras, tf

    class PredictedClasses(keras.metrics.Metric):
        def __init__(self, name="predicted_classes", **kwargs):
            super().__init__(name=name, **kwargs)
            self.counts = self.add_weight(name="counts", shape=(n_classes,),
                                          initializer="zeros")

        def update_state(self, y_true, y_pred, sample_weight=None):
            pred = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
            self.counts.assign_add(tf.math.bincount(pred, minlength=n_classes,
                                                    maxlength=n_classes, dtype=tf.float32))

        def result(self):
            return tf.reduce_sum(tf.cast(self.counts > 0, tf.float32))

        def reset_state(self):
            self.counts.assign(tf.zeros_like(self.counts))

    return PredictedClasses()


class _EpochEnd:
    """Keras callback factory: after each finished epoch, a checkpoint, a history row, the best
    epoch so far and state.json; stops the phase on divergence or (with --patience) when the
    best epoch is ``patience`` epochs old."""

    @staticmethod
    def make(run: Path, phase_index: int, phase: Phase, model, optimizer, quiet: bool,
             first_global_epoch: int, monitor: str = "val_accuracy",
             patience: int | None = None, best: dict | None = None, n_classes: int = 2,
             val_classes: int = 2, initial_epoch: int = 0, verbose: bool = False):
        from edgetl.keras import keras, tf

        class Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.best = best  # may come from an earlier phase (its weights start this one)
                self.done = initial_epoch
                self.rows: list[dict] = []
                self.diverged: str | None = None
                self.early_stopped = False

            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.time()
                self.marks = {}  # first/last batch end times of training and validation

            def _mark(self, kind: str, batch: int) -> None:
                now = time.time()
                if batch == 0:
                    self.marks[kind] = [now, now, 1]
                elif kind in self.marks:
                    self.marks[kind][1:] = [now, batch + 1]

            def on_test_begin(self, logs=None):
                self.marks["test_begin"] = time.time()

            def on_test_batch_end(self, batch, logs=None):
                self._mark("test", batch)

            def steady_seconds(self, seconds: float) -> float | None:
                """The epoch's time without building graphs: the first batch of training and of
                validation traces the model (the first epoch's are many times a step), so each
                counts as an average later batch. None when there is a single batch to time."""
                train, test = self.marks.get("train"), self.marks.get("test")
                if not train or train[2] < 2:
                    return None
                step = (train[1] - train[0]) / (train[2] - 1)
                first = train[0] - self.t0  # the first batch, tracing included
                cut = max(0.0, first - step)
                if test:  # one validation batch: a training step (forward and backward) bounds it
                    vstep = (test[1] - test[0]) / (test[2] - 1) if test[2] >= 2 else step
                    cut += max(0.0, test[0] - self.marks.get("test_begin", test[0]) - vstep)
                return max(seconds - cut, 0.0)

            def on_train_batch_end(self, batch, logs=None):
                self._mark("train", batch)
                # A non-finite loss poisons every weight: no use finishing the epoch.
                loss = (logs or {}).get("loss")
                if loss is not None and not (float(loss) <= EXPLODED * math.log(
                        max(n_classes, 2))):  # NaN compares false
                    self.model.stop_training = True

            def on_epoch_end(self, epoch, logs=None):
                done = epoch + 1
                row = {"epoch": first_global_epoch + done, "phase": phase.name,
                       "phase_epoch": done, "seconds": round(time.time() - self.t0, 2)}
                row.update({k: round(float(v), 6) for k, v in (logs or {}).items()})
                row["collapsed"] = (val_classes > 1
                                    and row.get("val_predicted_classes", 2) <= 1)
                # "Learned": at least halfway from chance to perfect, so that a small validation
                # set predicting two classes by luck does not count.
                learned = bool(self.best and not self.best["collapsed"]
                               and self.best["val_accuracy"] >= (1 + 1 / n_classes) / 2)
                why = divergence(row, self.rows, n_classes, learned)
                if why:
                    self.diverged = f"{why} at epoch {row['epoch']} ({phase.name} " \
                                    f"{done}/{phase.epochs})"
                    self.model.stop_training = True
                    return  # nothing of this epoch is kept
                self.rows.append(row)
                self.done = done
                name = f"p{phase_index}-e{done:03d}"
                score = epoch_score(row, monitor)
                if score is not None and (self.best is None or self.best.get("score") is None
                                          or score > tuple(self.best["score"])):
                    self.best = {"epoch": row["epoch"], "phase": phase_index,
                                 "phase_name": phase.name, "phase_epoch": done,
                                 "checkpoint": name, "qat": phase.qat, "score": list(score),
                                 **{k: row.get(k) for k in ("val_accuracy", "val_loss", "loss",
                                                            "accuracy")},
                                 "collapsed": row["collapsed"]}
                since = done - (self.best["phase_epoch"] if self.best
                                and self.best["phase"] == phase_index else 0)
                if patience and since >= patience and done < phase.epochs:
                    self.early_stopped = True
                    self.model.stop_training = True
                ckpt_root = run / "checkpoints"
                ckpt_root.mkdir(exist_ok=True)
                tmp = ckpt_root / f".tmp-{name}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(tmp / "ckpt"))
                final = ckpt_root / name
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                hist = run / "history.csv"
                new = not hist.exists()
                cols = ["epoch", "phase", "phase_epoch", "seconds", "loss", "accuracy",
                        "val_loss", "val_accuracy"]
                with open(hist, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                    if new:
                        w.writeheader()
                    w.writerow(row)
                state = {"phase": phase_index, "epoch": done, "checkpoint": name,
                         "epochs_before": first_global_epoch, "best": self.best}
                if self.early_stopped:
                    state["ended"] = "early-stopped"
                _atomic_write(run / "state.json", json.dumps(state))
                # Older checkpoints of this phase are superseded; keep the newest two and the
                # best one.
                mine = sorted(p for p in ckpt_root.glob(f"p{phase_index}-e*") if p.is_dir())
                keep = self.best["checkpoint"] if self.best else None
                for old in mine[:-2]:
                    if old.name != keep:
                        shutil.rmtree(old, ignore_errors=True)
                if not quiet:
                    # The first epoch of a phase also builds its graphs: the ETA leaves that out.
                    steady = row["seconds"]
                    if done == initial_epoch + 1:
                        steady = self.steady_seconds(row["seconds"])
                        self.per_epoch = steady
                    else:
                        self.per_epoch = row["seconds"]
                    built = "" if steady is None or row["seconds"] - steady < 1 else \
                        f" ({row['seconds'] - steady:.0f} s of it building the model's graphs)"
                    parts = [f"  {phase.name} epoch {done}/{phase.epochs} done in "
                             f"{row['seconds']} s{built}"]
                    keys = ("loss", "accuracy", "val_accuracy", "val_loss") if verbose else (
                        "val_accuracy", "val_loss")
                    for key in keys:
                        if row.get(key) is not None:
                            parts.append(f"{key} {row[key]:.4f}")
                    if self.best and self.best["checkpoint"] == name:
                        parts[-1] += " (best so far)"
                    if done < phase.epochs and not self.early_stopped:
                        eta = (phase.epochs - done) * (self.per_epoch if self.per_epoch
                                                       is not None else row["seconds"])
                        parts.append(f"phase ETA {eta:.0f} s")
                    if self.early_stopped:
                        parts.append(f"no better epoch for {since}: stopping the phase early "
                                     f"(--patience {patience})")
                    print(", ".join(parts), file=sys.stderr, flush=True)

        return Callback()


def restore_best(run: Path, model, optimizer, best: dict | None, phase_index: int) -> None:
    """Loads the best epoch's weights into ``model`` at the end of phase ``phase_index``.

    A best epoch of this phase comes from its checkpoint (written with this very model and
    optimizer); one of an earlier phase from the weights that phase ended with
    (``keep_phase_weights``): checkpoints do not load across phases, whose optimizers differ.
    """
    if not best:
        return
    from edgetl.keras import tf

    if best["phase"] == phase_index:
        ckpt = run / "checkpoints" / best["checkpoint"] / "ckpt"
        read_checkpoint(tf.train.Checkpoint(model=model, optimizer=optimizer), ckpt)
    else:
        path = _phase_weights(run, best["phase"])
        with _damaged_checkpoint(path):
            model.load_weights(str(path))


@contextlib.contextmanager
def _damaged_checkpoint(path: Path):
    """A checkpoint that cannot be decoded (truncated, overwritten, hand-edited) as one line:
    TensorFlow raises DataLossError, IndexError or ValueError from deep inside its reader."""
    try:
        yield
    except EdgetlError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure of the file is the same news
        tf = sys.modules.get("tensorflow")
        io_fault = isinstance(e, OSError) and getattr(e, "errno", None) is not None
        if tf is not None and isinstance(e, tf.errors.OpError):
            io_fault = isinstance(e, (tf.errors.ResourceExhaustedError,
                                      tf.errors.PermissionDeniedError))
        if io_fault:  # a fault of the machine, not of the file: the usual line
            raise
        import re

        text = re.sub(r"\{\{.*?\}\}\s*", "", str(e)).strip()  # TF's op-name prefix
        reason = (text.splitlines() or [type(e).__name__])[0][:160]
        raise EdgetlError(f"checkpoint '{path}' of the run is damaged ({reason}): the run cannot "
                          "continue from it; start a new run (--overwrite)") from None


def read_checkpoint(checkpoint, ckpt: Path) -> None:
    """``checkpoint.read(ckpt)`` (partial reads allowed); a damaged file is an EdgetlError.

    Every tensor is decoded (and its checksum checked) first: the optimizer's slots are
    restored lazily, at the first training step, where damage would surface as a traceback.
    """
    from edgetl.keras import tf

    with _damaged_checkpoint(ckpt.parent):
        reader = tf.train.load_checkpoint(str(ckpt))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
        checkpoint.read(str(ckpt)).expect_partial()


def _phase_weights(run: Path, phase_index: int) -> Path:
    return run / "checkpoints" / f"phase{phase_index}-end.h5"


def keep_phase_weights(run: Path, model, phase_index: int) -> None:
    """Writes the weights a phase ended with (its best epoch's), for the phases after it."""
    path = _phase_weights(run, phase_index)
    tmp = path.with_name(f".tmp-{path.name}")
    model.save_weights(str(tmp))
    os.replace(tmp, path)


def _prune_history(run: Path, keep_epochs: int) -> None:
    """Drops history rows of epochs that were in flight when a run was killed."""
    hist = run / "history.csv"
    if not hist.exists():
        return
    try:
        with open(hist, newline="") as f:
            rows = list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as e:
        raise EdgetlError(f"'{hist}' is corrupt ({e}): the run is damaged; start a new run "
                          "(--overwrite)") from None
    if len(rows) == keep_epochs:
        return
    rows = rows[:keep_epochs]
    cols = ["epoch", "phase", "phase_epoch", "seconds", "loss", "accuracy", "val_loss",
            "val_accuracy"]
    buf = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    _atomic_write(hist, "\n".join(buf) + "\n")


# --- training ------------------------------------------------------------------------------------

def _datasets(cfg: TrainConfig, size: tuple, progress: Progress = SILENT, spill_dir=None):
    from edgetl.runner import printable  # a path must not drive the terminal

    folders = f"'{printable(cfg.data)}'" + (f" + '{printable(cfg.val_data)}'" if cfg.val_data
                                             else "")
    with progress.step(f"scan {folders}") as step:
        names, train_items, val_items, skipped, pixels, notes = _scan(cfg, size, step.advance,
                                                                      spill_dir)
        step.done(f"{len(train_items) + len(val_items)} images in {len(names)} classes "
                  f"({len(train_items)} train, {len(val_items)} validation"
                  f"{f', {len(skipped)} left out' if skipped else ''})")
    for note in notes:
        progress.line(printable(note))
    return names, train_items, val_items, skipped, pixels


def _scan(cfg: TrainConfig, size: tuple, on_image, spill_dir=None):
    # Decoded as the model takes them (a base model's channels are known once it is loaded:
    # RGB until then, and a greyscale one decodes again).
    channels = 3 if cfg.base_model else resolve_channels(cfg)
    train_folder = scan_folder(cfg.data, size, strict=cfg.strict, keep_pixels=True,
                               on_image=on_image, spill_dir=spill_dir, channels=channels)
    names = list(train_folder.class_names)
    skipped = list(train_folder.skipped)
    pixels = train_folder.pixels
    notes = [train_folder.pixels_note] if train_folder.pixels_note else []
    if cfg.val_data:
        val_folder = scan_folder(cfg.val_data, size, class_names=names, strict=cfg.strict,
                                 keep_pixels=pixels is not None, on_image=on_image,
                                 spill_dir=spill_dir, channels=channels)
        train_items, val_items = list(train_folder.items), list(val_folder.items)
        skipped += list(val_folder.skipped)
        pixels = None if val_folder.pixels is None else {**pixels, **val_folder.pixels}
        if val_folder.pixels_note:
            notes.append(val_folder.pixels_note)
    else:
        frac = cfg.val_split if cfg.val_split is not None else 0.2
        train_items, val_items = stratified_split(train_folder.items, frac, cfg.seed)
    if not val_items:
        raise EdgetlError(f"no validation images: '{cfg.data}' is too small for --val-split; add "
                          "images or pass --val-data DIR")
    return names, train_items, val_items, skipped, pixels, notes


def train(cfg: TrainConfig, given=None) -> TrainResult:
    """Runs (or resumes) a training run and writes its run directory.

    Args:
        cfg: the settings.
        given: with --resume, the fields set on the command line (each must match the run's);
            None: the fields that differ from TrainConfig's defaults.

    The run directory is locked for the whole run. On any failure (an exception of any type,
    SIGINT, SIGTERM) temporary files are removed, a run set aside by --overwrite is put back,
    and a new run that finished no epoch is removed; a run with finished epochs stays resumable.

    Raises:
        EdgetlError: bad input, before anything is written where possible; a fault of the
            machine (disk full, read-only, TensorFlow's file errors), naming the path.
        KeyboardInterrupt: SIGINT or SIGTERM.
    """
    cfg.check()
    # Absolute data paths in config.json and split.json: `edgetl export RUN` then works from any
    # working directory, not only from the one the run was trained in.
    cfg = replace(cfg, **{k: os.path.abspath(getattr(cfg, k)) for k in ("data", "val_data")
                          if getattr(cfg, k)})
    if not distribute.prepare(cfg):  # a non-chief worker writes only a private temporary copy
        return distribute.as_worker(cfg, lambda private: train(private, given))
    notes: list[str] = []
    if not cfg.resume:
        cfg, notes = cfg.with_defaults()  # recorded in config.json as resolved
    if cfg.base_model is None and not cfg.resume:
        backbones.get_backbone(cfg.backbone)  # unknown names fail before any data is read
    if not cfg.resume:
        _preflight(cfg, given)
        frozen_below = check_layer_names(cfg)  # before the folder scan and the weights
        if frozen_below is False and Strategy(cfg.strategy) == Strategy.fine_tune:
            # --unfreeze-from the first layer: nothing random stays frozen
            notes = [n for n in notes if FROZEN_RANDOM not in n]
    out = _out_path(cfg)
    if not cfg.resume:
        check_out_outside_data(out, cfg)
    check_out_dir(out, "--out")
    done = _RunDir(out)
    with _signals_raise(), _claim(out):
        try:
            run, cfg, state = _prepare_run_dir(cfg, out, given, done)
            result = _train(cfg, run, state, notes)
        except BaseException as e:
            with _signals_deferred():
                _undo(done)
            kept = (out / "state.json").exists() and not done.set_aside
            if isinstance(e, KeyboardInterrupt):
                raise _interrupted(out, kept) from None
            fault = _fault(e, out, kept)
            if fault is not None:
                raise fault from None
            raise
        with _signals_deferred(then_raise=False):
            if done.set_aside:
                shutil.rmtree(_aside(out), ignore_errors=True)
    return result


def _preflight(cfg: TrainConfig, given=None) -> None:
    """The checks build_model would make, before TensorFlow loads: bad flags fail in one line
    (TensorFlow prints its own start-up lines to stderr) and before the run directory exists.
    ``given``: the fields set on the command line (None: not known)."""
    parse_head(cfg.head)
    if cfg.base_model is not None:
        _refuse_weights_with_base_model(cfg, explicit="weights" in (given or ()))
        return
    spec = backbones.get_backbone(cfg.backbone)
    _check_sides(spec, resolve_size(cfg, spec), cfg)
    _check_channels(cfg, spec)
    if cfg.weights not in ("imagenet", "none") and not Path(cfg.weights).is_file():
        raise EdgetlError(_weights_problem(cfg.weights))


def _weights_problem(weights: str) -> str:
    """--weights PATH that is no regular file: missing (maybe a misspelt 'imagenet'), or what it
    is instead (a symlink loop, a folder, a FIFO)."""
    from edgetl.runner import path_problem

    missing = f"--weights '{weights}' is not a file"
    return (f"{path_problem(weights, '--weights', missing=missing) or missing}: pass a weights "
            "file (.h5), 'imagenet' or 'none'")


def _refuse_weights_with_base_model(cfg: TrainConfig, explicit: bool = False) -> None:
    """--weights FILE (or a typed --weights imagenet) beside --base-model would be ignored: the
    base model brings its own weights. Refused rather than silently dropped. --weights none
    re-initialises the base; ``explicit``: --weights was typed (imagenet is also the default)."""
    if cfg.weights == "none" or (cfg.weights == "imagenet" and not explicit):
        return
    what = ("ImageNet weights are for registry backbones" if cfg.weights == "imagenet"
            else "pass one of the two")
    raise EdgetlError(f"--weights '{cfg.weights}' with --base-model '{cfg.base_model}': a base "
                      f"model keeps its own weights ({what}); leave --weights out, or pass "
                      "--weights none to re-initialise the base")


def base_model_record(path: str) -> dict:
    """What identifies a --base-model: ``{"file": absolute path, "sha256": hex}``.

    A SavedModel folder's sha256 is over its files (sorted relative paths and their contents).
    """
    p = Path(path).resolve()
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0")
            h.update(file_sha256(f).encode())
    else:
        h = None
    return {"file": str(p), "sha256": h.hexdigest() if h is not None else file_sha256(p)}




def _settings_line(cfg: TrainConfig) -> str:
    """The choices that decide whether a run learns, for the run's first lines."""
    strategy = Strategy(cfg.strategy)
    layers = {Strategy.feature_extract: "head only",
              Strategy.fine_tune: "every layer" if cfg.from_scratch() and not cfg.unfreeze
              and not cfg.unfreeze_from else "top of the base",
              Strategy.two_phase: "head, then top of the base"}[strategy]
    lrs = (f"lr {cfg.lr:g}" if strategy == Strategy.feature_extract else
           f"lr {cfg.fine_tune_lr:g}" if strategy == Strategy.fine_tune else
           f"lr {cfg.lr:g} then {cfg.fine_tune_lr:g}")
    aug = cfg.augmentations if cfg.augment and cfg.augmentations is not None else (
        "flip,rotate,zoom,contrast" if cfg.augment else "none")
    stop = (f", early stop after {cfg.patience} epochs without a better one" if cfg.patience
            else "")
    return (f"settings: {'from scratch' if cfg.from_scratch() else 'pretrained'} weights, "
            f"strategy {strategy.value} ({layers}), {lrs}, augment {aug}, best epoch by "
            f"{Monitor(cfg.monitor).value}{stop}")


# From scratch, LFW faces vs non-faces (160 images, batch 32: 4 steps an epoch) stayed at chance
# after the default 10 epochs (40 steps) and learned from about step 56 (benchmarks, section 10).
MIN_SCRATCH_STEPS = 150


def few_steps_warning(cfg: TrainConfig, n_train: int) -> str | None:
    """A warning when a run from scratch takes fewer than MIN_SCRATCH_STEPS optimizer steps
    (epochs x batches per epoch, all phases); None otherwise."""
    if not cfg.from_scratch() or n_train <= 0:
        return None
    two_phase = cfg.strategy is not None and Strategy(cfg.strategy) == Strategy.two_phase
    epochs = cfg.epochs + (cfg.fine_tune_epochs if two_phase else 0)
    per_epoch = math.ceil(n_train / cfg.batch_size)
    steps = epochs * per_epoch
    if steps >= MIN_SCRATCH_STEPS:
        return None
    need = math.ceil(MIN_SCRATCH_STEPS / per_epoch)
    return (f"warning: {epochs} epoch(s) x {per_epoch} batch(es) = {steps} optimizer steps is "
            f"few for training from scratch (a model often needs {MIN_SCRATCH_STEPS}+ to leave "
            f"chance): use --epochs {need}, or a smaller --batch-size, or more images")


def _train(cfg: TrainConfig, run: Path, state: dict | None, notes=()) -> TrainResult:
    progress = Progress(quiet=cfg.quiet, hold=True)  # released once the model is built
    spec = None if cfg.base_model else backbones.get_backbone(cfg.backbone)
    size = resolve_size(cfg, spec)
    names, train_items, val_items, skipped, pixels = _datasets(cfg, size, progress, run)
    # After the scan (a bad data folder stays a one-line error), before the long waits.
    progress.line(_settings_line(cfg))
    for note in notes:
        progress.line(note)
    few = few_steps_warning(cfg, len(train_items))
    if few:
        progress.line(few)
    if "tensorflow" in sys.modules:  # a settings check needed it: no load step of 0.0 s
        from edgetl.keras import tf

        progress.line(f"TensorFlow {tf.__version__} (already loaded)")
    else:
        with progress.step("load TensorFlow") as step:  # after the data checks, as above
            from edgetl.keras import tf

            step.done(f"TensorFlow {tf.__version__}")
    dist = distribute.strategy(cfg)
    with dist.scope(), dist.errors():  # model, QAT wrappers, optimizer: distributed variables
        return _train_scoped(cfg, run, state, dist, spec, size, names, train_items, val_items,
                             skipped, pixels, progress)


def _train_scoped(cfg, run, state, dist, spec, size, names, train_items, val_items, skipped,
                  pixels, progress) -> TrainResult:
    from edgetl.keras import keras, tf, versions

    from edgetl.runner import printable

    log = progress.line
    if skipped:  # said even with --quiet: data left out is not progress; split.json lists all
        first = printable("; ".join(f"'{p}': {why}" for p, why in skipped[:3]))  # one line
        progress.line(f"note: left out {len(skipped)} file(s) (all listed in "
                      f"{run / 'split.json'}): {first}{'; ...' if len(skipped) > 3 else ''}",
                      always=True)
    if cfg.resume:
        saved = _read_run_config(run)
        if saved.get("class_names", names) != names:
            raise EdgetlError(f"--resume: the classes in '{cfg.data}' ({', '.join(names)}) are "
                              f"not the run's ({', '.join(saved['class_names'])}); restore the "
                              "data folder, or start a new run (--overwrite)")

    from edgetl.runner import printable

    what = (f"--base-model '{printable(cfg.base_model)}'" if cfg.base_model
            else backbones.get_backbone(cfg.backbone).name)
    with progress.step(f"build {what}") as step:
        model, n_base, spec = build_model(cfg, len(names), size)
        step.done(f"{n_base - 1} base layers, {model.count_params():,} parameters, input "
                  f"{'x'.join(str(d) for d in model.input_shape[1:])}, weights "
                  f"{'from the file' if cfg.base_model else printable(cfg.weights)}")
    channels = int(model.input_shape[-1])
    prep = _choose_preprocessing(cfg, spec, model, channels, run)
    log(f"preprocessing: {describe(prep)}: {prep['reason']}")
    if not cfg.resume:
        config = {
            "run_format": RUN_FORMAT,
            "train": cfg.to_dict(),
            "backbone": spec.name if spec else "custom",
            "input_size": size[0] if size[0] == size[1] else list(size),
            "input_shape": [size[0], size[1], channels],
            "preprocessing": prep,
            "class_names": names,
            "n_base_layers": n_base,
            # The weights the run started from: the file and its hash, not "weights: imagenet".
            "base_model": base_model_record(cfg.base_model) if cfg.base_model else None,
            "data_hash": list_hash(train_items + val_items),
            "counts": {"train": len(train_items), "val": len(val_items),
                       "skipped": len(skipped)},
            "versions": versions(),
            "distribute": dist.describe(),
        }
        _atomic_write(run / "config.json", json.dumps(config, indent=2))
        _atomic_write(run / "labels.txt", "\n".join(names) + "\n")
        _atomic_write(run / "split.json", json.dumps(
            {"train": train_items, "val": val_items, "skipped": skipped}, indent=1))
    elif (run / "split.json").exists():
        train_items, val_items = _read_split(run, len(names))
    else:
        # Killed between config.json and split.json: the split is seeded, so the one just made
        # is the run's own as long as the data is unchanged.
        if saved.get("data_hash") != list_hash(train_items + val_items):
            raise EdgetlError(f"--resume: '{run}' has no split.json and its data folder changed "
                              "since the run started; start a new run (--overwrite)")
        _atomic_write(run / "labels.txt", "\n".join(names) + "\n")
        _atomic_write(run / "split.json", json.dumps(
            {"train": train_items, "val": val_items, "skipped": skipped}, indent=1))

    # A run recorded before --augment existed (no augmentations field) used all four.
    augment = cfg.augment and (cfg.augmentations if cfg.augmentations is not None else True)
    train_ds = make_dataset(train_items, size, prep, cfg.batch_size, True, augment,
                            cfg.seed, pixels=pixels, channels=channels)
    val_ds = make_dataset(val_items, size, prep, cfg.batch_size, False, False, cfg.seed,
                          pixels=pixels, channels=channels)
    ops = augment_ops(augment)
    # Unshuffled training images for the feature cache (only where it can be used at all).
    plain_train = make_dataset(train_items, size, prep, cfg.batch_size, False, False, cfg.seed,
                               cache=False, pixels=pixels, channels=channels) if (
        cfg.cache and not ops and dist.replicas < 2) else None
    # Cached phases draw their shuffles from one order, epoch after epoch, as train_ds does.
    cache_order = feature_cache.shuffled_order(len(train_items), cfg.seed) if (
        plain_train is not None) else None
    cache_epochs = {"all": 0, "images": 0, "cached": 0}  # see _fit_inputs
    shutil.rmtree(run / feature_cache.CACHE_DIR, ignore_errors=True)  # left by a kill -9
    del pixels  # the datasets hold their own copies
    eval_ds = val_ds  # the final evaluation sees every image
    train_ds, val_ds = dist.shard(train_ds), dist.shard(val_ds)
    weights = class_weights(train_items, len(names)) if cfg.class_weights == "auto" else None

    progress.release()  # the data, the model and the run's files are good: bad input is past
    plan = phases(cfg)
    done_phase, done_epoch = (state["phase"], state["epoch"]) if state else (-1, 0)
    if cfg.resume and state is None:
        _prune_history(run, 0)  # killed after the first history row, before its state.json
    float_model, qat_model = model, None
    global_epoch, last_done, last_pi = 0, 0, 0
    best = state.get("best") if state else None
    stopped = None  # why the run ended before its last epoch (divergence), if it did
    val_classes = len({label for _, label in val_items})
    for pi, phase in enumerate(plan):
        if pi < done_phase:  # the newest checkpoint (a later phase) holds the whole model
            continue
        if pi > done_phase >= 0 and state.get("complete"):
            break  # a finished run (it may have stopped before its last phase)
        last_pi = pi
        if pi == done_phase:
            global_epoch = state.get("epochs_before", sum(p.epochs for p in plan[:pi]))
        set_trainable(float_model, n_base, cfg, phase.unfreeze)
        current = float_model
        if phase.qat:
            current = quantize(float_model, cfg.qat_scope)
            qat_model = current
            if pi != done_phase and pi > 0:
                # What the user would otherwise have shipped (a float phase trained it): export
                # judges QAT against it. QAT in the first phase has no such model: the float
                # model before it is untrained.
                if getattr(float_model, "optimizer", None) is not None:
                    # Saved with plain Keras metrics: the collapse metric is ours, and a file
                    # naming a class of edgetl's would need --unsafe to load.
                    float_model.compile(optimizer=float_model.optimizer,
                                        loss="sparse_categorical_crossentropy",
                                        metrics=["accuracy"])
                _save_model(float_model, run / FLOAT_BEFORE_QAT)
            if pi != done_phase:  # a resumed phase gets its ranges from the checkpoint
                with progress.step("calibration (QAT ranges)") as step:
                    init_ranges(current, cfg, train_items, (*size, channels), prep, step.done)
            if best is not None and best["phase"] != pi:
                best = None  # fake-quantized scores do not compare with float ones
        optimizer = keras.optimizers.Adam(phase.lr)
        current.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                        metrics=["accuracy", predicted_classes_metric(len(names))])
        initial = 0
        if pi == done_phase:
            ckpt = run / "checkpoints" / state["checkpoint"] / "ckpt"
            read_checkpoint(tf.train.Checkpoint(model=current, optimizer=optimizer), ckpt)
            initial = done_epoch
            _prune_history(run, global_epoch + done_epoch)
            log(f"resuming {phase.name} after epoch {done_epoch}/{phase.epochs}")
            if done_epoch >= phase.epochs or state.get("ended") or state.get("complete"):
                restore_best(run, current, optimizer, best, pi)
                if pi < len(plan) - 1:
                    keep_phase_weights(run, float_model, pi)
                global_epoch += done_epoch
                last_done = done_epoch
                if phase.qat:
                    qat_to_float(current, float_model)
                continue
        with frozen_stay_frozen(current), _ranges_during_fit(current, phase, cfg):
            qat = f", QAT (scope {QatScope(cfg.qat_scope).value})" if phase.qat else ""
            log(f"phase {pi + 1}/{len(plan)}: {phase.name}, {phase.epochs} epoch(s), "
                f"lr {phase.lr:g}{qat}; trainable weights: "
                f"{sum(int(tf.size(w)) for w in current.trainable_weights):,}")
            callback = _EpochEnd.make(run, pi, phase, current, optimizer, cfg.quiet,
                                      global_epoch, Monitor(cfg.monitor).value, cfg.patience,
                                      best, len(names), val_classes, initial,
                                      verbose=cfg.verbose)
            cache_plan = feature_cache.plan(current, enabled=cfg.cache, augment_ops=ops,
                                            qat=phase.qat, replicas=dist.replicas)
            log(f"feature cache: {cache_plan.reason}")
            # On a terminal, Keras' bar (stdout) and then, once the bar has ended its line, the
            # epoch's line: Keras runs callbacks in list order, and a ProgbarLogger of ours in
            # the list replaces the one it would append after ours. In logs, only our line.
            bar = progress.live and sys.stdout.isatty()
            with _fit_inputs(current, cache_plan, run, plain_train, train_items, eval_ds,
                             val_items, cfg, optimizer, len(names), train_ds, val_ds, log,
                             cache_order, cache_epochs) as (fit_model, fit_train, fit_val,
                                                            extra):
                fit_model.fit(fit_train, validation_data=fit_val, epochs=phase.epochs,
                              initial_epoch=initial, class_weight=weights,
                              callbacks=dist.callbacks(current) + extra + (
                                  [keras.callbacks.ProgbarLogger(count_mode="steps")] if bar
                                  else []) + [callback], verbose=1 if bar else 0)
        best = callback.best
        restore_best(run, current, optimizer, best, pi)
        if pi < len(plan) - 1 and not phase.qat:
            keep_phase_weights(run, float_model, pi)
        global_epoch += callback.done
        last_done = callback.done
        if phase.qat:
            qat_to_float(current, float_model)
        if callback.diverged:
            stopped = callback.diverged
            break

    pi, phase = last_pi, plan[last_pi]  # the phase the run ended in
    if stopped and (best is None or best.get("collapsed")):
        hint = f"this phase's was {phase.lr:.3g}; try {phase.lr / 10:.3g}"
        raise TrainingDiverged(
            f"training diverged: {stopped}, and no earlier epoch is usable, so no model was "
            f"saved. Lower the learning rate ({hint}: --lr / --fine-tune-lr)"
            f"{' or train without --qat' if phase.qat else ''}, then train again")
    final = qat_model if qat_model is not None else float_model
    for m in {id(float_model): float_model, id(final): final}.values():
        # The collapse metric is training-time only: saved models carry plain Keras metrics.
        if getattr(m, "optimizer", None) is not None:  # a QAT run never compiles its float model
            m.compile(optimizer=m.optimizer, loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    metrics = evaluate_keras(final, eval_ds, names)
    metrics["model"] = "qat" if qat_model is not None else "float"
    warning = None
    if best:
        metrics["best_epoch"] = {k: v for k, v in best.items() if k != "score"}
        metrics["monitor"] = Monitor(cfg.monitor).value
    if stopped:
        warning = (f"training diverged: {stopped}; stopped there and kept the best epoch "
                   f"{best['epoch']} (val_accuracy {best['val_accuracy']:.4f}). Next time lower "
                   f"the learning rate (this phase's was {phase.lr:.3g}; --lr / --fine-tune-lr)"
                   f"{' or train without --qat' if phase.qat else ''}")
        metrics["stopped"] = {"reason": stopped, "warning": warning}
    elif best and best.get("collapsed"):
        warning = (f"the model has not learned: its best epoch ({best['epoch']}) predicts one "
                   "class for every validation image; train longer (--epochs) or change the "
                   "learning rate (--lr / --fine-tune-lr)")
    _save_model(float_model, run / "model.keras")
    if qat_model is not None:
        _save_model(qat_model, run / "qat.h5")
    _atomic_write(run / "metrics.json", json.dumps(metrics, indent=2))
    _atomic_write(run / "state.json", json.dumps({"phase": pi,
                                                  "epoch": last_done,
                                                  "checkpoint": (json.loads(
                                                      (run / "state.json").read_text()) or {}
                                                  ).get("checkpoint"), "complete": True,
                                                  "best": best}))
    if best:
        log(f"best epoch {best['epoch']} ({best['phase_name']} {best['phase_epoch']}): "
            f"val_accuracy {best['val_accuracy']:.4f}, val_loss {best['val_loss']:.4f}; the "
            f"saved model is that epoch's")
    log(f"val accuracy {metrics['accuracy']:.4f} ({metrics['model']} model); run: {run}")
    return TrainResult(str(run), metrics["accuracy"], global_epoch, qat_model is not None,
                       best["epoch"] if best else None, warning)


@contextlib.contextmanager
def _fit_inputs(current, cache_plan, run, plain_train, train_items, plain_val, val_items, cfg,
                optimizer, n_classes, train_ds, val_ds, log, order, epochs: dict):
    """(model to fit, train data, val data, callbacks): the whole model on images, or, with
    the feature cache, the trained layers (sharing current's weights and optimizer) on cached
    features.

    ``epochs`` counts the epochs run ("all") and the shuffles each source has drawn ("images":
    train_ds, "cached": ``order``): a source first catches up with the epochs run on the other,
    so that every epoch sees the images in the order the uncached run would.
    """
    from edgetl.keras import keras

    def counted(source: str, data, extra=()):
        for _ in range(epochs["all"] - epochs[source]):
            for _ in data:
                pass

        class Count(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                epochs["all"] += 1  # fit has made this epoch's iterator: one shuffle drawn
                epochs[source] = epochs["all"]

        epochs[source] = epochs["all"]
        return [*extra, Count()]

    if cache_plan.use and plain_train is not None:
        with feature_cache.cached_fit(current, cache_plan, run, plain_train,
                                      [label for _, label in train_items], plain_val,
                                      [label for _, label in val_items], cfg.batch_size, order,
                                      log) as (top, cached_train, cached_val):
            if cached_train is not None:  # else no room for it
                top.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                            metrics=["accuracy", predicted_classes_metric(n_classes)])
                yield top, cached_train, cached_val, counted("cached", order)
                return
    yield current, train_ds, val_ds, counted("images", train_ds)


def load_split(run: str | os.PathLike, n_classes: int) -> dict:
    """A finished run's split.json for export/sensitivity: a regular file holding "train" and
    "val" lists of [path, class index 0..n_classes-1] pairs (the files need not exist: the
    readers skip and count missing images).

    Raises:
        EdgetlError: naming the file and the damaged field.
    """
    file = Path(run) / "split.json"
    todo = "the run is damaged; copy the whole run directory again, or re-train it"
    if not (file.exists() or file.is_symlink()):
        raise EdgetlError(f"run '{run}' has no split.json (a run copied in part?): copy the "
                          "whole run directory again")
    split = _read_json(file, todo)
    _check_split(file, split, n_classes, todo)
    return split


def _check_split(file: Path, split, n_classes: int, todo: str, need_val: bool = False) -> None:
    """split.json's shape: "train" and "val" lists (val not empty with ``need_val``) of
    [path, class index 0..n_classes-1] pairs; an EdgetlError naming the damaged field."""
    from edgetl.runner import printable

    if not isinstance(split, dict):
        raise EdgetlError(f"'{file}' is not a JSON object: {todo}")
    for key in ("train", "val"):
        items = split.get(key)
        empty = need_val and key == "val" and items == []
        if not isinstance(items, list) or empty:
            why = ("is not a list" if items is not None and not empty
                   else "is missing or empty" if need_val and key == "val" else "is missing")
            raise _damaged(file, key, why, todo)
        for i, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], int) and not isinstance(item[1], bool)
                    and 0 <= item[1] < n_classes):
                raise _damaged(file, f"{key}[{i}]", f"is {printable(repr(item)[:80])}, not "
                               f"[path, class index 0..{n_classes - 1}]", todo)


def _read_split(run: Path, n_classes: int) -> tuple[list, list]:
    """split.json's train and val lists, checked: [path, class index] pairs of existing files."""
    file = run / "split.json"
    todo = "the run is damaged; start a new run (--overwrite)"
    split = _read_json(file, todo)
    _check_split(file, split, n_classes, todo, need_val=True)
    for key in ("train", "val"):
        for item in split[key]:
            if not os.path.isfile(item[0]):
                raise EdgetlError(f"'{file}' lists '{item[0]}', which is no longer a file: "
                                  "restore the data folder, or start a new run (--overwrite)")
    return [tuple(x) for x in split["train"]], [tuple(x) for x in split["val"]]


def _choose_preprocessing(cfg: TrainConfig, spec, model, channels: int, run: Path) -> dict:
    """The run's one preprocessing: chosen at its start, read back from config.json on resume."""
    from edgetl.preprocessing import choose

    if cfg.resume and (run / "config.json").is_file():
        saved = json.loads((run / "config.json").read_text()).get("preprocessing")
        if isinstance(saved, dict) and "mean" in saved:
            return dict(saved, reason=saved.get("reason") or "recorded when the run started")
    return choose(cfg.preprocessing, cfg.mean, cfg.std,
                  backbone=spec.name if spec else None,
                  backbone_preset=spec.preprocessing if spec else None,
                  base_model=cfg.base_model, model=model, channels=channels)


def _save_model(model, path: Path) -> None:
    import warnings

    # QAT models go to HDF5: tf_keras' .keras format drops tfmot's quantizer variables.
    tmp = path.with_name(f".tmp-{path.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save(str(tmp), **({"save_format": "h5"} if path.suffix == ".h5" else {}))
    os.replace(tmp, path)


def evaluate_keras(model, ds, names: list[str]) -> dict:
    """Accuracy, per-class accuracy and confusion matrix of a Keras model on a dataset."""
    import numpy as np

    y_true, y_pred = [], []
    for x, y in ds:
        p = model(x, training=False).numpy()
        y_pred.append(p.argmax(-1))
        y_true.append(y.numpy())
    y_true = np.concatenate(y_true)
    y_pred = np.concatenate(y_pred)
    k = len(names)
    cm = np.zeros((k, k), int)
    for t, p in zip(y_true, y_pred):
        cm[t, p] += 1
    per_class = {names[i]: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None)
                 for i in range(k)}
    return {"accuracy": float((y_true == y_pred).mean()), "count": int(len(y_true)),
            "per_class": per_class, "confusion": cm.tolist(), "labels": names}


def load_run(run: str | os.PathLike) -> dict:
    """Reads a run's config.json, refusing what is not a finished, intact edgetl run.

    Every field export uses is checked (types, sizes, preprocessing, class names), and against
    the saved model's own config (read without deserialising): one class name per model output,
    input_size equal to the model's input.

    Raises:
        EdgetlError: naming the file and the field.
    """
    from edgetl.runner import path_problem

    run = Path(run)
    cfg_file = run / "config.json"
    problem = path_problem(run, "run folder", "folder", missing="")  # a symlink loop, a FIFO, ...
    if problem:
        raise EdgetlError(f"{problem}; give a run directory of `edgetl train`")
    if not run.is_dir() or not cfg_file.is_file():
        raise EdgetlError(f"'{run}' is not an edgetl run directory (no config.json); train one "
                          "with `edgetl train`")
    todo = "the run is damaged; copy the whole run directory again, or re-train it"
    config = validate_run_config(_read_json(cfg_file, todo), cfg_file, todo)
    for key in ("input_size", "preprocessing", "class_names"):
        if key not in config:
            raise _damaged(cfg_file, key, "is missing", todo)
    if not (run / "model.keras").exists():
        raise EdgetlError(f"run '{run}' has no model.keras: the run did not finish; continue it "
                          "with `edgetl train --out RUN --resume`")
    shape, outputs = _model_io(run / "model.keras")
    size = config["input_size"]
    hw = input_hw(size)
    if shape is not None and any(d is not None and d != want for d, want in zip(shape[1:3], hw)):
        raise _damaged(cfg_file, "input_size", f"is {size}, but model.keras takes "
                       f"{shape[1]}x{shape[2]} px", todo)
    from edgetl.preprocessing import input_shape

    if shape is not None and len(shape) == 4 and shape[3] not in (None, input_shape(config)[2]):
        raise _damaged(cfg_file, "input_shape", f"is {config.get('input_shape')}, but "
                       f"model.keras takes {shape[3]}-channel images", todo)
    if outputs is not None and outputs != len(config["class_names"]):
        raise _damaged(cfg_file, "class_names", f"has {len(config['class_names'])} names, but "
                       f"model.keras has {outputs} outputs (one name per output)", todo)
    return config


def _model_io(path: Path) -> tuple[list | None, int | None]:
    """(input batch shape, number of outputs of the classifier layer) from a saved model's
    config, without deserialising; None where the config does not say."""
    from edgetl import basemodel

    try:
        config = basemodel._read_file(str(path)).config
    except EdgetlError:
        return None, None  # load_model reports an unreadable model
    if not isinstance(config, dict):
        return None, None
    shape = basemodel._config_input_shape(config)
    units = None
    for layer in (config.get("config") or {}).get("layers") or []:
        if isinstance(layer, dict) and (layer.get("config") or {}).get("name") == \
                f"{HEAD_PREFIX}predictions":
            value = layer["config"].get("units")
            units = value if isinstance(value, int) and not isinstance(value, bool) else None
    return (shape if isinstance(shape, list) and len(shape) == 4 else None), units


def load_model(path: str | os.PathLike, unsafe: bool = False):
    """Loads a model a run saved (float or QAT).

    A run may come from someone else: unless ``unsafe``, a model whose config would run code
    when loaded (Lambda layers, classes from outside Keras) is refused before it is deserialised,
    and Keras' safe mode stays on while it loads.
    """
    from edgetl.basemodel import code_in_model_file

    problem = code_in_model_file(str(path))
    if problem and not unsafe:
        raise EdgetlError(f"model '{path}' {problem}: loading it would run code from the file; "
                          "pass --unsafe if you trust this run")
    from edgetl.keras import keras, quantize_scope

    # .h5 files ignore safe_mode=; the scope makes their Lambda layers refuse to deserialise.
    lib = keras.src.saving.serialization_lib
    try:
        with quantize_scope(), lib.SafeModeScope(not unsafe):
            return keras.models.load_model(str(path), compile=False, safe_mode=not unsafe)
    except Exception as e:
        raise EdgetlError(f"cannot load model '{path}': {str(e).splitlines()[0][:200]}; "
                          "re-train the run") from None
