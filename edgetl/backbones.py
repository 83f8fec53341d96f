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
            "imagenet sizes": ",".join(map(str, s.imagenet_sizes)) if s.imagenet_sizes
            else f">={s.min_size}",
            "preprocessing": s.preprocessing,
            "alpha": ",".join(map(str, s.alphas)) if s.alphas else "-",
            "qat": "yes" if s.qat else "no",
        })
    return rows
