"""Backbones as data: each entry knows its builder, input size, preprocessing and QAT status.

Nothing outside this module branches on a backbone name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from edgetl.errors import EdgetlError

# The families' ``preprocess_input`` conventions, as (x - mean) / std on 0..255 pixels, so the
# device runner can apply them with numpy alone.
PREPROCESSING = {
    # x / 127.5 - 1
    "tf": {"mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5], "channel_order": "RGB"},
    # RGB -> BGR, subtract the ImageNet mean (BGR order), no scaling
    "caffe": {"mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0], "channel_order": "BGR"},
    # x / 255, then ImageNet mean/std
    "torch": {
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
        "channel_order": "RGB",
    },
    # The model normalises inside (EfficientNet): feed 0..255
    "raw": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "channel_order": "RGB"},
}

MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone of the registry.

    Attributes:
        name: the CLI name (``--backbone``).
        keras_name: the ``tf_keras.applications`` constructor.
        default_size: input height/width used when ``--input-size`` is not given.
        preprocessing: key of ``PREPROCESSING``.
        min_size: smallest input size the architecture accepts.
        imagenet_sizes: sizes with published ImageNet weights (None: any size >= min_size).
        alphas: width multipliers with ImageNet weights (empty: no ``alpha`` argument).
        qat: True when tfmot's default 8-bit QAT quantizes every layer of it.
        qat_note: why QAT is not supported, and the way out.
        extra: extra keyword arguments for the constructor.
        native: built by edgetl (``keras_name`` names a builder in this module), not by
            ``tf_keras.applications``.
        imagenet_note: set when ``--weights imagenet`` cannot be served: where the weights
            come from and how to pass them.
    """

    name: str
    keras_name: str
    default_size: int
    preprocessing: str
    min_size: int = 32
    imagenet_sizes: tuple | None = None
    alphas: tuple = ()
    qat: bool = True
    qat_note: str = ""
    extra: dict = field(default_factory=dict)
    native: bool = False
    imagenet_note: str = ""


_LITE_WEIGHTS = (
    "Keras publishes no ImageNet weights for EfficientNet-Lite and edgetl downloads none from "
    "unofficial sources. Google's ImageNet checkpoints are in github.com/tensorflow/tpu "
    "(models/official/efficientnet/lite, Apache-2.0): convert one to a Keras 2 .h5 with "
    "keras.applications.EfficientNet layer names (stem_conv, block1a_dwconv, ..., top_conv) "
    "and pass --weights PATH, or pass a whole saved Keras model as --base-model FILE, or use "
    "--weights none"
)
_QAT_NO_BN = (
    "it has BatchNormalization layers that do not follow a convolution (pre-activation / "
    "dense blocks), which tfmot's default 8-bit scheme cannot quantize; train without --qat "
    "and export with post-training int8"
)
_QAT_NO_ADD_MUL = (
    "it uses layers tfmot's default 8-bit scheme cannot quantize (TF-op arithmetic for "
    "hard-swish, Rescaling/Normalization inside the model); train without --qat and export "
    "with post-training int8"
)

REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("mobilenetv2", "MobileNetV2", 224, "tf", 32, (96, 128, 160, 192, 224),
                     MOBILENET_ALPHAS),
        BackboneSpec("mobilenetv3small", "MobileNetV3Small", 224, "tf", 32, (224,), (0.75, 1.0),
                     qat=False, qat_note=_QAT_NO_ADD_MUL,
                     extra={"include_preprocessing": False, "minimalistic": False}),
        BackboneSpec("mobilenetv3large", "MobileNetV3Large", 224, "tf", 32, (224,), (0.75, 1.0),
                     qat=False, qat_note=_QAT_NO_ADD_MUL,
                     extra={"include_preprocessing": False, "minimalistic": False}),
        BackboneSpec("efficientnetb0", "EfficientNetB0", 224, "raw", 32, None, qat=False,
                     qat_note=_QAT_NO_ADD_MUL),
        BackboneSpec("efficientnetb1", "EfficientNetB1", 240, "raw", 32, None, qat=False,
                     qat_note=_QAT_NO_ADD_MUL),
        BackboneSpec("efficientnetb2", "EfficientNetB2", 260, "raw", 32, None, qat=False,
                     qat_note=_QAT_NO_ADD_MUL),
        BackboneSpec("efficientnetb3", "EfficientNetB3", 300, "raw", 32, None, qat=False,
                     qat_note=_QAT_NO_ADD_MUL),
        *(BackboneSpec(f"efficientnetlite{i}", f"EfficientNetLite{i}", size, "tf", 32, None,
                       native=True, imagenet_note=_LITE_WEIGHTS)
          for i, size in enumerate((224, 240, 260, 280, 300))),
        BackboneSpec("resnet50", "ResNet50", 224, "caffe"),
        BackboneSpec("resnet101", "ResNet101", 224, "caffe"),
        BackboneSpec("resnet152", "ResNet152", 224, "caffe"),
        BackboneSpec("resnet50v2", "ResNet50V2", 224, "tf", qat=False, qat_note=_QAT_NO_BN),
        BackboneSpec("resnet101v2", "ResNet101V2", 224, "tf", qat=False, qat_note=_QAT_NO_BN),
        BackboneSpec("resnet152v2", "ResNet152V2", 224, "tf", qat=False, qat_note=_QAT_NO_BN),
        BackboneSpec("vgg16", "VGG16", 224, "caffe"),
        BackboneSpec("vgg19", "VGG19", 224, "caffe"),
        BackboneSpec("inceptionv3", "InceptionV3", 299, "tf", 75),
        BackboneSpec("xception", "Xception", 299, "tf", 71),
        BackboneSpec("densenet121", "DenseNet121", 224, "torch", qat=False, qat_note=_QAT_NO_BN),
        BackboneSpec("nasnetmobile", "NASNetMobile", 224, "tf", 32, (224,), qat=False,
                     qat_note=_QAT_NO_BN),
    ]
}


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for ``name``, or an error listing the valid names and the closest one."""
    key = name.lower().replace("-", "").replace("_", "")
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, REGISTRY, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise EdgetlError(
        f"unknown backbone '{name}'.{hint} Valid: {', '.join(REGISTRY)} (see `edgetl backbones`)"
    )


def check_combination(spec: BackboneSpec, size: int, weights: str, alpha: float | None,
                      qat: bool) -> None:
    """Refuse combinations the weights or tfmot cannot serve, saying why and what to do."""
    if size < spec.min_size:
        raise EdgetlError(
            f"--input-size {size} is too small for {spec.name}: it needs at least {spec.min_size}"
        )
    if alpha is not None and not spec.alphas:
        raise EdgetlError(f"--alpha applies to MobileNets only, not to {spec.name}")
    if weights == "imagenet":
        if spec.imagenet_note:
            raise EdgetlError(f"--weights imagenet for {spec.name}: {spec.imagenet_note}")
        if spec.imagenet_sizes and size not in spec.imagenet_sizes:
            raise EdgetlError(
                f"--input-size {size}: ImageNet weights for {spec.name} exist only for "
                f"{', '.join(map(str, spec.imagenet_sizes))} px; pick one of those, or use "
                "--weights none to train from scratch"
            )
        if alpha is not None and spec.alphas and alpha not in spec.alphas:
            raise EdgetlError(
                f"--alpha {alpha}: ImageNet weights for {spec.name} exist only for alpha "
                f"{', '.join(map(str, spec.alphas))}"
            )
    if qat and not spec.qat:
        raise EdgetlError(f"--qat is not supported for {spec.name}: {spec.qat_note} (or try "
                          "--qat-scope trained, which wraps only the layers that train)")


def constructor(spec: BackboneSpec):
    """The function that builds the backbone, called like ``tf_keras.applications``' ones:
    ``(input_shape=, include_top=, weights=None | path, **spec.extra)``."""
    if spec.native:
        return globals()[spec.keras_name]
    from edgetl.keras import keras

    return getattr(keras.applications, spec.keras_name)


# --- EfficientNet-Lite, built natively -----------------------------------------------------------
# EfficientNet without squeeze-excitation, with ReLU6, stem (32) and head (1280) not scaled, and
# the first and last stages not repeated more (Google's efficientnet_lite_builder). Layer names
# follow keras.applications.EfficientNet, so a converted checkpoint loads by name.

# (kernel, repeats, filters in, filters out, expand ratio, stride) per stage: EfficientNet-B0.
_LITE_STAGES = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2),
                (3, 3, 40, 80, 6, 2), (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2),
                (3, 1, 192, 320, 6, 1))
# (width, depth) per variant.
_LITE_SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8)}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * filters else new)


def efficientnet_lite(variant: int, input_shape=None, include_top: bool = False,
                      weights: str | None = None, classes: int = 1000):
    """EfficientNet-Lite{variant} as a flat tf_keras functional model.

    Args:
        variant: 0..4.
        input_shape: (H, W, 3); H and W may be None.
        include_top: add avg_pool, top_dropout and the 1000-class ``predictions`` layer.
        weights: None (random) or a Keras 2 .h5 (weights or whole model) with the same layer
            names; loaded by name, and every weighted layer must be found in it.

    Raises:
        EdgetlError: ``weights`` lacks a layer of the model or a shape differs.
    """
    import math

    from edgetl.keras import keras

    width, depth = _LITE_SCALING[variant]
    layers = keras.layers
    inp = layers.Input(shape=input_shape or (None, None, 3))

    x = layers.Conv2D(32, 3, 2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    last = len(_LITE_STAGES) - 1
    for i, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(_LITE_STAGES):
        f_in, f_out = _round_filters(f_in, width), _round_filters(f_out, width)
        if i not in (0, last):
            repeats = int(math.ceil(depth * repeats))
        for j in range(repeats):
            p = f"block{i + 1}{chr(97 + j)}_"
            cin = f_in if j == 0 else f_out
            shortcut = x
            h = x
            if expand != 1:
                h = layers.Conv2D(cin * expand, 1, padding="same", use_bias=False,
                                  name=f"{p}expand_conv")(h)
                h = layers.BatchNormalization(epsilon=1e-3, momentum=0.99,
                                              name=f"{p}expand_bn")(h)
                h = layers.ReLU(6.0, name=f"{p}expand_activation")(h)
            h = layers.DepthwiseConv2D(kernel, stride if j == 0 else 1, padding="same",
                                       use_bias=False, name=f"{p}dwconv")(h)
            h = layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name=f"{p}bn")(h)
            h = layers.ReLU(6.0, name=f"{p}activation")(h)
            h = layers.Conv2D(f_out, 1, padding="same", use_bias=False,
                              name=f"{p}project_conv")(h)
            h = layers.BatchNormalization(epsilon=1e-3, momentum=0.99,
                                          name=f"{p}project_bn")(h)
            if j > 0:  # same shape in and out: stride 1, cin == f_out
                h = layers.Add(name=f"{p}add")([h, shortcut])
            x = h
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(0.2 if variant < 2 else 0.3, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, x, name=f"efficientnet_lite{variant}")
    if weights not in (None, "none"):
        _load_by_name(model, str(weights))
    return model


def _load_by_name(model, path: str) -> None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            names = {n.decode() if isinstance(n, bytes) else n
                     for n in group.attrs.get("layer_names", [])}
    except (OSError, KeyError) as e:
        raise EdgetlError(f"--weights '{path}' is not a Keras .h5 weights file: {e}") from None
    missing = [layer.name for layer in model.layers if layer.weights and layer.name not in names]
    if missing:
        raise EdgetlError(f"--weights '{path}' does not fit {model.name}: no weights for "
                          f"{len(missing)} layer(s), e.g. {', '.join(missing[:3])}")
    # A deeper variant has every block name of a shallower one: by name it would "fit".
    extra = sorted(n for n in names if n.startswith("block") and n not in
                   {layer.name for layer in model.layers})
    if extra:
        raise EdgetlError(f"--weights '{path}' does not fit {model.name}: it has blocks the "
                          f"model lacks ({', '.join(extra[:3])}): weights of another variant?")
    try:
        model.load_weights(path, by_name=True)
    except ValueError as e:
        raise EdgetlError(f"--weights '{path}' does not fit {model.name}: "
                          f"{str(e).splitlines()[0][:200]}") from None


def EfficientNetLite0(**kw):  # noqa: N802 - named like tf_keras.applications' constructors
    return efficientnet_lite(0, **kw)


def EfficientNetLite1(**kw):  # noqa: N802
    return efficientnet_lite(1, **kw)


def EfficientNetLite2(**kw):  # noqa: N802
    return efficientnet_lite(2, **kw)


def EfficientNetLite3(**kw):  # noqa: N802
    return efficientnet_lite(3, **kw)


def EfficientNetLite4(**kw):  # noqa: N802
    return efficientnet_lite(4, **kw)


def preprocessing(spec: BackboneSpec) -> dict:
    """The preprocessing dict (mean, std, channel_order) for the runner and the data pipeline."""
    return dict(PREPROCESSING[spec.preprocessing], name=spec.preprocessing)


def table() -> list[dict]:
    """The registry as rows for ``edgetl backbones``."""
    rows = []
    for s in REGISTRY.values():
        rows.append({
            "name": s.name,
            "input": s.default_size,
            "imagenet sizes": "none (--weights PATH)" if s.imagenet_note
            else ",".join(map(str, s.imagenet_sizes)) if s.imagenet_sizes
            else f">={s.min_size}",
            "preprocessing": s.preprocessing,
            "alpha": ",".join(map(str, s.alphas)) if s.alphas else "-",
            "qat": "yes" if s.qat else "no",
        })
    return rows
