"""Settings for each stage, as small frozen dataclasses; each CLI flag maps to one field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum

from edgetl.errors import EdgetlError


MIN_INPUT_SIZE = 16
# Classifier backbones top out near 600 px (EfficientNetB7); past this, the folder scan alone
# decodes gigabytes (every image is held at the training size).
MAX_INPUT_SIZE = 1024
MAX_SEED = 2**32 - 1  # numpy's and TensorFlow's seed range


def parse_input_size(value, flag: str = "--input-size") -> int:
    """The one parser of an input size: a whole number of pixels in [16, 1024] (square).

    Raises:
        EdgetlError: not a whole number, or out of bounds; the message names ``flag``.
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise EdgetlError(f"{flag} {value!r} is not a whole number of pixels (e.g. 224)")
    if value < MIN_INPUT_SIZE:
        raise EdgetlError(f"{flag} {value} is too small (minimum {MIN_INPUT_SIZE})")
    if value > MAX_INPUT_SIZE:
        raise EdgetlError(f"{flag} {value} is too large (maximum {MAX_INPUT_SIZE} px: every image "
                          "is decoded at this size)")
    return value


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


class Pooling(str, Enum):
    avg = "avg"
    max = "max"
    flatten = "flatten"


class QatScope(str, Enum):
    all = "all"  # quantize_model on the whole model; frozen layers stay frozen
    trained = "trained"  # annotate only the layers that train; the rest is calibrated at export


class QatRanges(str, Enum):
    data = "data"  # set from a calibration pass over training images; frozen layers' stay fixed
    data_adapt = "data-adapt"  # set from data, then every range follows tfmot's moving average
    tfmot = "tfmot"  # tfmot's own start ([-6, 6]) and moving average


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
        input_size: square input size in pixels (None: the backbone's default).
        val_data: separate validation folder.
        val_split: fraction of each class held out for validation (when no val_data).
        strategy: feature-extract, fine-tune or two-phase.
        unfreeze: number of top base layers to train (fine-tune / two-phase).
        unfreeze_from: name of the first base layer to train.
        epochs: epochs of the first (or only) phase.
        fine_tune_epochs: epochs of the second phase of two-phase.
        lr: learning rate of the first phase.
        fine_tune_lr: learning rate when base layers train.
        batch_size: images per step.
        head: extra head layers, e.g. 'conv:64,dense:128,dropout:0.2'.
        pooling: avg, max or flatten.
        dropout: dropout before the classifier.
        qat: quantization-aware training in the phase that trains base layers.
        qat_scope: which layers get fake quantization.
        qat_ranges: where the fake-quant activation ranges start (and whether frozen layers'
            ranges adapt during QAT).
        augment: random flip/rotation/zoom/contrast on training images.
        class_weights: 'none' or 'auto' (inverse frequency).
        strict: unreadable images are an error instead of being skipped.
        seed: seed for splits, shuffling, augmentation and initialisation.
        resume: continue the run in ``out`` from its last completed epoch.
        overwrite: replace an existing run directory.
        quiet: no progress output.
    """

    data: str
    out: str | None = None
    backbone: str = "mobilenetv2"
    base_model: str | None = None
    cut_layer: str | None = None
    unsafe: bool = False
    weights: str = "imagenet"
    alpha: float | None = None
    input_size: int | None = None
    val_data: str | None = None
    val_split: float | None = None
    strategy: Strategy = Strategy.feature_extract
    unfreeze: int | None = None
    unfreeze_from: str | None = None
    epochs: int = 10
    fine_tune_epochs: int = 10
    lr: float = 1e-3
    fine_tune_lr: float = 1e-4
    batch_size: int = 32
    head: str = ""
    pooling: Pooling = Pooling.avg
    dropout: float = 0.2
    qat: bool = False
    qat_scope: QatScope = QatScope.trained
    qat_ranges: QatRanges = QatRanges.data
    augment: bool = True
    class_weights: str = "none"
    strict: bool = False
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False

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
                            ("--augment", self.augment), ("--strict", self.strict)):
            if not isinstance(value, bool):
                raise EdgetlError(f"{flag} {value!r} must be true or false")
        if self.resume and self.overwrite:
            raise EdgetlError("--resume and --overwrite contradict each other: pick one")
        if self.val_data and self.val_split is not None:
            raise EdgetlError("--val-data and --val-split contradict each other: pick one")
        if self.unfreeze is not None and self.unfreeze_from:
            raise EdgetlError("--unfreeze and --unfreeze-from contradict each other: pick one")
        if self.strategy == Strategy.feature_extract and (self.unfreeze or self.unfreeze_from):
            raise EdgetlError("--unfreeze/--unfreeze-from need --strategy fine-tune or two-phase "
                              "(feature-extract keeps the whole base frozen)")
        if self.unfreeze is not None:
            check_number("--unfreeze", self.unfreeze, integer=True, low=1)
        if self.cut_layer and not self.base_model:
            raise EdgetlError("--cut-layer needs --base-model")
        check_number("--epochs", self.epochs, integer=True, low=1, high=100_000)
        check_number("--fine-tune-epochs", self.fine_tune_epochs, integer=True,
                     low=1 if self.strategy == Strategy.two_phase else 0, high=100_000)
        check_number("--batch-size", self.batch_size, integer=True, low=1, high=65_536)
        check_number("--lr", self.lr, low=0, low_open=True)
        check_number("--fine-tune-lr", self.fine_tune_lr, low=0, low_open=True)
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
                        ("qat_ranges", QatRanges)):
            if k in d:
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
        io: input/output type of integer models.
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
    """

    run: str
    modes: tuple = (Quantization.int8,)
    io: IOType = IOType.int8
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
