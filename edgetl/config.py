"""Settings for each stage, as small frozen dataclasses; each CLI flag maps to one field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

from edgetl.errors import EdgetlError


MIN_INPUT_SIZE = 16
# Classifier backbones top out near 600 px (EfficientNetB7); past this, the folder scan alone
# decodes gigabytes (every image is held at the training size).
MAX_INPUT_SIZE = 1024
MAX_SEED = 2**32 - 1  # numpy's and TensorFlow's seed range


def parse_input_size(value, flag: str = "--input-size"):
    """The one parser of an input size: N (square, returned as an int) or "HxW" / [h, w]
    (height x width, the Keras and TFLite order; returned as a (h, w) tuple); every side in
    [MIN_INPUT_SIZE, MAX_INPUT_SIZE].

    Raises:
        EdgetlError: not a size, or a side out of bounds; the message names ``flag``.
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    pair = None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[1]))
    elif isinstance(value, str):
        parts = value.strip().lower().replace("\u00d7", "x").split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            pair = (int(parts[0]), int(parts[1]))
    if pair is None and (isinstance(value, bool) or not isinstance(value, int)):
        raise EdgetlError(f"{flag} {value!r} is not a size: give N (square) or HxW, height x "
                          "width, e.g. 96 or 160x120")
    sides = pair or (value,)
    shown = value if pair is None else f"{pair[0]}x{pair[1]}"
    if min(sides) < MIN_INPUT_SIZE:
        raise EdgetlError(f"{flag} {shown} is too small (minimum {MIN_INPUT_SIZE})")
    if max(sides) > MAX_INPUT_SIZE:
        raise EdgetlError(f"{flag} {shown} is too large (maximum {MAX_INPUT_SIZE} px: every "
                          "image is decoded at this size)")
    if pair is None:
        return value
    return pair if pair[0] != pair[1] else pair[0]


def input_hw(value) -> tuple[int, int] | None:
    """``--input-size`` (None, N, "HxW" or [h, w]) as (height, width), or None when not set."""
    if value is None or value == "":
        return None
    size = parse_input_size(value)
    return (size, size) if isinstance(size, int) else size


def check_number(flag: str, value, *, integer: bool = False, low=None, high=None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Refuses a non-number, NaN, an infinity or a value out of [low, high] (open ends if asked).

    Raises:
        EdgetlError: naming ``flag`` and the accepted range.
    """
    kind = "a whole number" if integer else "a number"
    ok = not isinstance(value, bool) and (isinstance(value, int) if integer
                                          else isinstance(value, (int, float)))
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise EdgetlError(f"{flag} {value!r} must be {kind}{' ' + rng if rng else ''}"
                          f"{'' if integer else ' (finite)'}")


class Strategy(str, Enum):
    feature_extract = "feature-extract"
    fine_tune = "fine-tune"
    two_phase = "two-phase"


# Learning rates by situation. From random weights, 3e-3 everywhere (scikit-learn digits, 10
# epochs at 32 px: 93.7 % validation vs 79.4 % with 1e-3; 92.5 % held-out int8);
# fine-tuning pretrained base layers needs a small rate so the features survive. The qat branch
# measured 1e-4 against 1e-5 for the latter (1e-4: 1.3 points more int8 top-1 on EfficientNet-Lite0,
# 100 images per class): change it here, nowhere else.
SCRATCH_LR = 3e-3
# with_defaults' warning about a frozen random base (train drops it where nothing is frozen)
FROZEN_RANDOM = "keeps random layers frozen"
# Largest --lr / --fine-tune-lr: far above any that trains (tests force divergence with 1e6);
# 1e30 only makes NaN weights.
MAX_LR = 1e6
HEAD_LR = 1e-3
PRETRAINED_FINE_TUNE_LR = 1e-4

# Augmentations --augment can name, in the order they are applied, and the default set. Flips
# are left out of the default: a flipped digit or letter is another class (or none), while
# photos lose little without them (README: "Augmentation").
AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast")
DEFAULT_AUGMENT = "rotate,zoom,contrast"


class Monitor(str, Enum):
    val_accuracy = "val_accuracy"  # ties broken by the lower val_loss
    val_loss = "val_loss"


def parse_augment(spec: str | None) -> tuple[str, ...]:
    """'flip,rotate' -> ('flip', 'rotate') in AUGMENTATIONS order; 'none' or '' -> ().

    Raises:
        EdgetlError: an unknown name (the valid ones are listed).
    """
    parts = {p.strip().lower() for p in (spec or "").split(",") if p.strip()}
    if parts == {"none"}:
        return ()
    unknown = sorted(parts - set(AUGMENTATIONS))
    if unknown:
        raise EdgetlError(f"--augment '{spec}': unknown '{unknown[0]}'; use a comma-separated "
                          f"list of {', '.join(AUGMENTATIONS)}, or 'none'")
    return tuple(a for a in AUGMENTATIONS if a in parts)


class Pooling(str, Enum):
    avg = "avg"
    max = "max"
    flatten = "flatten"


class QatScope(str, Enum):
    all = "all"  # quantize_model on the whole model; frozen layers stay frozen
    trained = "trained"  # annotate only the layers that train; the rest is calibrated at export


class Distribute(str, Enum):
    auto = "auto"  # mirrored when more than one GPU is visible, otherwise none
    none = "none"
    mirrored = "mirrored"  # one machine, all visible GPUs (or EDGETL_CPU_REPLICAS CPU devices)
    multi_worker = "multi-worker"  # MultiWorkerMirroredStrategy from TF_CONFIG


class QatRanges(str, Enum):
    data = "data"  # set from a calibration pass over training images; frozen layers' stay fixed
    data_adapt = "data-adapt"  # set from data, then every range follows tfmot's moving average
    tfmot = "tfmot"  # tfmot's own start ([-6, 6]) and moving average


class Preset(str, Enum):
    """How pixels 0..255 become model input (``--preprocessing``); see edgetl/preprocessing.py."""

    auto = "auto"  # detected from the model's first layers, else the backbone's preset
    tf = "tf"
    torch = "torch"
    caffe = "caffe"
    raw = "raw"


class Quantization(str, Enum):
    int8 = "int8"
    float32 = "float32"
    float16 = "float16"
    dynamic = "dynamic"
    int16x8 = "int16x8"


class IOType(str, Enum):
    int8 = "int8"
    uint8 = "uint8"
    float32 = "float32"


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train`` needs; written to the run's config.json.

    Attributes:
        data: folder with one sub-folder per class.
        out: run directory (None: runs/<backbone>-<timestamp>).
        backbone: registry name (ignored when base_model is given).
        base_model: the user's own saved model used as the backbone.
        cut_layer: layer of base_model whose output feeds the new head.
        unsafe: allow Lambda layers / custom code in base_model.
        weights: 'imagenet', 'none' or a weights file path.
        alpha: MobileNet width multiplier.
        input_size: input size in pixels: N (square) or "HxW" (height x width, the Keras and
            TFLite order); None: the base model's fixed size, else the backbone's default.
        channels: image channels, 1 (greyscale) or 3 (None: the base model's, else 3).
        preprocessing: auto, tf, torch, caffe or raw (see edgetl/preprocessing.py).
        mean: per-channel mean on 0..255 pixels (1 or 3 numbers; overrides the preset's).
        std: per-channel std on 0..255 pixels (1 or 3 numbers; overrides the preset's).
        val_data: separate validation folder.
        val_split: fraction of each class held out for validation (when no val_data).
        strategy: feature-extract, fine-tune or two-phase (None: by situation, see
            ``with_defaults``: feature-extract with pretrained weights, fine-tune of every layer
            from scratch).
        unfreeze: number of top base layers to train (fine-tune / two-phase; None: a fifth of
            the base, or all of it with --weights none).
        unfreeze_from: name of the first base layer to train.
        epochs: epochs of the first (or only) phase.
        fine_tune_epochs: epochs of the second phase of two-phase.
        lr: learning rate of the first phase (None: HEAD_LR, or SCRATCH_LR from scratch).
        fine_tune_lr: learning rate when base layers train (None: PRETRAINED_FINE_TUNE_LR for
            pretrained weights; from scratch, the first phase's lr).
        batch_size: images per step.
        head: extra head layers, e.g. 'conv:64,dense:128,dropout:0.2'.
        pooling: avg, max or flatten.
        dropout: dropout before the classifier.
        qat: quantization-aware training in the phase that trains base layers.
        qat_scope: which layers get fake quantization: all (default; frozen ones too, with
            ranges from data) or trained (benchmarks/results/2026-12-01-qat-scope-9-seeds.md).
        qat_ranges: where the fake-quant activation ranges start (and whether frozen layers'
            ranges adapt during QAT).
        augment: augmentation on or off (False: none, whatever ``augmentations`` says).
        augmentations: which transforms, comma-separated from AUGMENTATIONS (None:
            DEFAULT_AUGMENT for a new run; a run recorded without it used all four).
        class_weights: 'none' or 'auto' (inverse frequency).
        strict: unreadable images are an error instead of being skipped.
        seed: seed for splits, shuffling, augmentation and initialisation.
        resume: continue the run in ``out`` from its last completed epoch.
        overwrite: replace an existing run directory.
        quiet: no progress output.
        distribute: tf.distribute strategy (auto, none, mirrored, multi-worker); batch_size is
            the global batch, split across replicas; learning rates are not scaled.
        monitor: what picks the best epoch, whose weights are the run's model.
        patience: stop a phase after this many epochs without a better best epoch (None: never).
        cache: train phases whose lower layers are frozen on those layers' output, computed
            once per image (edgetl/cache.py); only where exact: no augmentation, no QAT.
        verbose: each epoch's line also gives the training loss and accuracy.
    """

    data: str
    out: str | None = None
    backbone: str = "mobilenetv2"
    base_model: str | None = None
    cut_layer: str | None = None
    unsafe: bool = False
    weights: str = "imagenet"
    alpha: float | None = None
    input_size: int | str | None = None
    channels: int | None = None
    preprocessing: Preset = Preset.auto
    mean: tuple | None = None
    std: tuple | None = None
    val_data: str | None = None
    val_split: float | None = None
    strategy: Strategy | None = None
    unfreeze: int | None = None
    unfreeze_from: str | None = None
    epochs: int = 10
    fine_tune_epochs: int = 10
    lr: float | None = None
    fine_tune_lr: float | None = None
    batch_size: int = 32
    head: str = ""
    pooling: Pooling = Pooling.avg
    dropout: float = 0.2
    qat: bool = False
    qat_scope: QatScope = QatScope.all
    qat_ranges: QatRanges = QatRanges.data
    augment: bool = True
    class_weights: str = "none"
    strict: bool = False
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    distribute: Distribute = Distribute.auto
    augmentations: str | None = None
    monitor: Monitor = Monitor.val_accuracy
    patience: int | None = None
    cache: bool = True
    verbose: bool = False

    def check(self) -> None:
        """Refuses contradictory, impossible or non-finite settings before anything is read or
        written; every message names its flag."""
        for flag, value in (("--data", self.data), ("--backbone", self.backbone),
                            ("--weights", self.weights), ("--head", self.head),
                            ("--class-weights", self.class_weights)):
            if not isinstance(value, str):
                raise EdgetlError(f"{flag} {value!r} must be text")
        for flag, value in (("--out", self.out), ("--base-model", self.base_model),
                            ("--cut-layer", self.cut_layer), ("--val-data", self.val_data),
                            ("--unfreeze-from", self.unfreeze_from)):
            if value is not None and not isinstance(value, str):
                raise EdgetlError(f"{flag} {value!r} must be text")
        for flag, value in (("--unsafe", self.unsafe), ("--qat", self.qat),
                            ("--augment", self.augment), ("--strict", self.strict),
                            ("--cache", self.cache)):
            if not isinstance(value, bool):
                raise EdgetlError(f"{flag} {value!r} must be true or false")
        if self.resume and self.overwrite:
            raise EdgetlError("--resume and --overwrite contradict each other: pick one")
        if self.val_data and self.val_split is not None:
            raise EdgetlError("--val-data and --val-split contradict each other: pick one")
        if self.unfreeze is not None and self.unfreeze_from:
            raise EdgetlError("--unfreeze and --unfreeze-from contradict each other: pick one")
        # Unset, the strategy is fine-tune from scratch and feature-extract otherwise. With
        # --resume the run's own strategy decides: a flag unlike the run's is refused by name
        # (train._refuse_changed_flags), not against defaults the run may not have used.
        strategy = self.strategy or (Strategy.fine_tune if self.from_scratch()
                                     else Strategy.feature_extract)
        if strategy == Strategy.feature_extract and (self.unfreeze or self.unfreeze_from) \
                and not self.resume:
            given = (f"--unfreeze {self.unfreeze}" if self.unfreeze
                     else f"--unfreeze-from {self.unfreeze_from}")
            raise EdgetlError("--unfreeze/--unfreeze-from need --strategy fine-tune or two-phase "
                              f"(feature-extract keeps the whole base frozen): add --strategy "
                              f"fine-tune to {given}, or leave it out")
        if self.unfreeze is not None:
            check_number("--unfreeze", self.unfreeze, integer=True, low=1)
        if self.cut_layer and not self.base_model:
            raise EdgetlError("--cut-layer needs --base-model")
        check_number("--epochs", self.epochs, integer=True, low=1, high=100_000)
        check_number("--fine-tune-epochs", self.fine_tune_epochs, integer=True,
                     low=1 if self.strategy == Strategy.two_phase else 0, high=100_000)
        check_number("--batch-size", self.batch_size, integer=True, low=1, high=65_536)
        if self.lr is not None:  # None: by situation (with_defaults)
            check_number("--lr", self.lr, low=0, low_open=True, high=MAX_LR)
        if self.fine_tune_lr is not None:
            check_number("--fine-tune-lr", self.fine_tune_lr, low=0, low_open=True, high=MAX_LR)
        check_number("--dropout", self.dropout, low=0, high=1, high_open=True)
        if self.val_split is not None:
            check_number("--val-split", self.val_split, low=0, high=1, low_open=True,
                         high_open=True)
        if self.alpha is not None:
            check_number("--alpha", self.alpha, low=0, low_open=True, high=10)
        check_number("--seed", self.seed, integer=True, low=0, high=MAX_SEED)
        if self.class_weights not in ("none", "auto"):
            raise EdgetlError(f"--class-weights '{self.class_weights}': use 'none' or 'auto'")
        if self.input_size is not None:
            parse_input_size(self.input_size)
        if self.patience is not None and self.patience > 100_000:
            raise EdgetlError(f"--patience {self.patience} must be at most 100000 (leave it out "
                              "to train every epoch)")
        if self.patience is not None and self.patience < 1:
            raise EdgetlError(f"--patience {self.patience} must be at least 1 (leave it out to "
                              "train every epoch)")
        parse_augment(self.augmentations)
        if not self.augment and parse_augment(self.augmentations):
            raise EdgetlError(f"--no-augment and --augment {self.augmentations} contradict each "
                              "other: pick one")
        try:
            Monitor(self.monitor)
        except ValueError:
            raise EdgetlError(f"--monitor '{self.monitor}': use val_accuracy or val_loss") from None

        if self.channels not in (None, 1, 3):
            raise EdgetlError(f"--channels {self.channels}: use 1 (greyscale) or 3 (colour)")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is None:
                continue
            if len(values) not in (1, 3) or not all(v == v and abs(v) != float("inf")
                                                    for v in values):
                raise EdgetlError(f"--{flag.lstrip('-')} {' '.join(map(str, values))}: give 1 "
                                  "or 3 finite numbers (on pixels 0..255)")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise EdgetlError(f"--std {' '.join(map(str, self.std))}: every std must be > 0")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and any(not 0 <= v <= 255 for v in values):
                raise EdgetlError(f"{flag} {' '.join(map(str, values))}: the values apply to "
                                  "pixels 0..255, give numbers from 0 to 255")

    def from_scratch(self) -> bool:
        """Random initial weights (a --base-model's too: --weights none re-initialises it):
        nothing pretrained to protect or to freeze."""
        return self.weights == "none"

    def with_defaults(self) -> tuple["TrainConfig", list[str]]:
        """The settings left to the situation (None), filled in, and the notes to print: the
        strategy chosen for the user, or a warning about the one they chose.

        From scratch (--weights none) a frozen base stays random, so an unset strategy trains
        every layer; an explicit frozen strategy is kept (it was asked for) with a warning note.
        """
        notes, changes = [], {}
        scratch = self.from_scratch()
        strategy = self.strategy
        if strategy is None:
            strategy = Strategy.fine_tune if scratch else Strategy.feature_extract
            changes["strategy"] = strategy
            if scratch and not (self.unfreeze or self.unfreeze_from):
                notes.append("strategy fine-tune of every layer (--weights none: a frozen "
                             "random base learns nothing; pass --strategy to choose)")
        if scratch and (Strategy(strategy) != Strategy.fine_tune or self.unfreeze
                        or self.unfreeze_from):
            notes.append(f"warning: --weights none with --strategy {Strategy(strategy).value}"
                         f"{' --unfreeze ' + str(self.unfreeze) if self.unfreeze else ''}"
                         f"{' --unfreeze-from ' + self.unfreeze_from if self.unfreeze_from else ''}"
                         f" {FROZEN_RANDOM}; it usually stays near chance. Leave out "
                         "--strategy/--unfreeze/--unfreeze-from to train every layer")
        lr = self.lr if self.lr is not None else (SCRATCH_LR if scratch else HEAD_LR)
        ft = self.fine_tune_lr
        if ft is None:
            ft = lr if scratch else PRETRAINED_FINE_TUNE_LR
        changes.update(lr=lr, fine_tune_lr=ft)
        if not self.augment:
            changes["augmentations"] = "none"
        elif self.augmentations is None:
            changes["augmentations"] = DEFAULT_AUGMENT
        return replace(self, **changes), notes

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Enum):
                d[k] = v.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        for k, enum in (("strategy", Strategy), ("pooling", Pooling), ("qat_scope", QatScope),
                        ("qat_ranges", QatRanges), ("monitor", Monitor),
                        ("distribute", Distribute),
                        ("preprocessing", Preset)):
            if d.get(k) is not None:
                try:
                    d[k] = enum(d[k])
                except ValueError:
                    raise EdgetlError(f"{k} {d[k]!r} is not one of "
                                      f"{', '.join(e.value for e in enum)}") from None
        try:
            return cls(**d)
        except TypeError as e:  # a required field (data) is missing
            raise EdgetlError(str(e).split(".")[-1].strip()) from None


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``export`` needs; recorded in the model's metadata.

    Attributes:
        run: training run directory.
        modes: conversions to write (int8, float32, float16, dynamic, int16x8).
        io: input/output type of integer models: uint8 (the default: MediaPipe Tasks and
            Coral's tools take it; plain LiteRT too), int8 (MediaPipe refuses it), float32.
        num_calibration: calibration images (class-balanced sample of the training split).
        calibration: the user's own calibration folder (class folders or flat images).
        calibration_manifest: replay the calibration of an earlier export.
        max_drop: largest accepted top-1 drop vs the Keras model, in percentage points.
        edgetpu: enforce and report Edge TPU compatibility: an export that does not fully map
            to the Edge TPU fails verification.
        debug: run TensorFlow's quantization debugger and report the worst layers.
        keep_float: layers to leave in float (the model is then not integer-only).
        name: file stem of the exports (default: the run directory's name).
        seed: seed of the calibration sample.
        overwrite: replace existing exports.
        verify: evaluate on the validation set after converting.
        unsafe: allow the run's model files to run code when loaded (Lambda layers, custom
            objects); only for runs you trust.
        edgetpu_allow_cpu: with edgetpu, accept ops that fall back to the CPU (a warning).
        compare_ptq: for a QAT run with int8: also write NAME_int8_ptq.tflite (post-training
            int8 of the float model from before QAT) and report QAT vs PTQ int8 on the same
            validation images, naming the one to ship.
        auto: with int8 and a missed max_drop, search candidates (keep-float units by
            sensitivity, int16x8; with edgetpu per-tensor weights only) until one meets it
            (edgetl/autoquant.py).
        auto_max_candidates: bound on the models ``auto`` converts and measures (2 to 50).
        check_calibration: calibrate twice on disjoint class-balanced halves and warn when
            they disagree (the calibration set is too small).
        plots: with auto, a Pareto PNG (size and latency vs accuracy) when matplotlib is
            installed.
    """

    run: str
    modes: tuple = (Quantization.int8,)
    io: IOType = IOType.uint8
    num_calibration: int = 200
    calibration: str | None = None
    calibration_manifest: str | None = None
    max_drop: float = 2.0
    edgetpu: bool = False
    debug: bool = False
    keep_float: tuple = field(default_factory=tuple)
    name: str | None = None
    seed: int = 0
    overwrite: bool = False
    verify: bool = True
    unsafe: bool = False
    edgetpu_allow_cpu: bool = False
    compare_ptq: bool = False
    auto: bool = False
    auto_max_candidates: int = 8
    check_calibration: bool = False
    plots: bool = False
