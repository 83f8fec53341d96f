"""``--base-model``: the user's own saved Keras model as the backbone.

A file saved by Keras 2 (tf_keras) or Keras 3 (``.keras``, ``.h5``, or a tf_keras SavedModel
directory) becomes one flat tf_keras functional model that ends at a feature map (or a feature
vector), ready for ``train.build_model`` to put a new head on ``base.output``.

How it works:

* **Safety first.** Before anything is deserialised, the raw config is read (``config.json`` from
  the ``.keras`` zip, the ``model_config`` attribute of an ``.h5``, ``keras_metadata.pb`` of a
  SavedModel) and a model with a ``Lambda`` layer, a Python lambda, a class that is not a
  built-in Keras one (custom or registered objects, a ``module`` outside Keras) or a ``TFOpLambda``
  calling a TensorFlow function outside plain math (``tf.io.*``, ``tf.raw_ops.*``, ...) is
  refused unless ``unsafe=True``. Loading also runs in Keras' safe mode unless ``unsafe``.
* **Keras 2 files** load with tf_keras; nested models are flattened by calling the same layer
  objects again on new tensors, following each inner model's node graph (weights are shared).
* **Keras 3 files** (``keras_version`` 3.x in ``metadata.json`` or the ``.h5`` attributes) load
  with Keras 3 in this same process (Keras 3 and tf_keras coexist under
  ``TF_USE_LEGACY_KERAS=1``); each layer is rebuilt in tf_keras from its config converted to the
  Keras 2 form, its weights copied by name (shapes checked), and the rebuilt model is checked
  against the original on a random batch.
* **The cut**: ``cut_layer``'s output, or by default the last 4D tensor below the classification
  head (walking back from the output through single-input layers with a non-4D output, e.g.
  Dense, Dropout, Flatten, global pooling; a 1x1 classifier conv after a global pooling with
  ``keepdims`` is skipped too).

* **Input**: 1 (greyscale) or 3 (RGB) channels, any height x width; a size the model fixes must
  match ``--input-size``.

The preprocessing a base model gets is chosen by ``edgetl.preprocessing.choose`` (its first
layers, ``--preprocessing``, or a sidecar file ``<model path>.preprocessing.json``).
"""

from __future__ import annotations

import difflib
import json
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from edgetl.errors import EdgetlError
from edgetl.preprocessing import SIDECAR_SUFFIX, read_sidecar, sidecar_path

H5_SUFFIXES = (".h5", ".hdf5")

# Layers whose classes do not live in ``keras.layers`` but are built into Keras 2.
_K2_EXTRA_BUILTINS = {"Functional", "Sequential", "Model", "InputLayer", "TFOpLambda",
                      "SlicingOpLambda", "TensorFlowOpLayer"}
# TFOpLambda calls any ``tf.<name>`` by name; these namespaces can touch files, run Python or
# change global state, so they count as code.
_TF_OP_DENY = ("io.", "raw_ops.", "compat.", "summary.", "debugging.", "print", "saved_model.",
               "data.", "distribute.", "train.", "autograph.", "config.", "sysconfig.",
               "load_op_library", "load_library", "py_function", "numpy_function", "script_ops",
               "experimental.", "lookup.", "queue.", "__internal__", "keras.", "estimator.")
_SPATIAL_1X1_HEAD = {"Conv2D", "Dropout", "SpatialDropout2D", "Activation", "ReLU", "Softmax",
                     "Reshape", "Flatten", "BatchNormalization"}
_GLOBAL_POOLS = {"GlobalAveragePooling2D", "GlobalMaxPooling2D", "GlobalAvgPool2D",
                 "GlobalMaxPool2D"}
_RENAMED_ACTIVATIONS = {"silu": "swish"}


def _k3_activation(name: str):
    """Keras 3 activations that Keras 2 lacks or defines differently (Keras 2's hard_sigmoid
    is 0.2x + 0.5), as TF ops on a tf_keras tensor; None for the others."""
    from edgetl.keras import tf

    def hard_sigmoid(x):
        return tf.nn.relu6(x + 3.0) * (1.0 / 6.0)

    return {
        "hard_sigmoid": hard_sigmoid,
        "hard_silu": lambda x: x * hard_sigmoid(x),
        "hard_swish": lambda x: x * hard_sigmoid(x),
        "relu6": tf.nn.relu6,
        "leaky_relu": lambda x: tf.nn.leaky_relu(x, alpha=0.2),  # Keras 3's default slope
    }.get(name)
# Layers that typically form a classification head (for naming layers near the cut point).
_HEAD_CLASSES = {"Dense", "Softmax", "Activation", "Dropout", "Flatten", "Reshape",
                 "GlobalAveragePooling2D", "GlobalMaxPooling2D", "GlobalAvgPool2D",
                 "GlobalMaxPool2D", "Functional", "Sequential", "Model"}


@dataclass(frozen=True)
class _File:
    """What a model path holds, read without deserialising anything.

    Attributes:
        path: the path as given.
        kind: 'keras' (zip), 'h5' or 'savedmodel'.
        keras3: saved by Keras 3.
        config: the model config (class_name/config dict) or None (SavedModel).
    """

    path: str
    kind: str
    keras3: bool
    config: dict | None


# --- reading the file ----------------------------------------------------------------------------

def _read_file(path: str) -> _File:
    """Checks the path and reads its model config; raises EdgetlError for anything unusable."""
    p = Path(path)
    if not p.exists():  # or a symlink loop: named as one
        from edgetl.runner import path_problem

        missing = f"--base-model '{path}' does not exist"
        raise EdgetlError(f"{path_problem(p, '--base-model', missing=missing)}: pass a saved "
                          "Keras model (.keras, .h5 or a SavedModel directory)")
    if p.is_dir():
        return _read_savedmodel(path, p)
    if not p.is_file():  # a FIFO, socket or device: opening it could block forever
        from edgetl.data import _not_regular

        raise EdgetlError(f"--base-model '{path}' is {(_not_regular(p) or 'not a regular file')}"
                          "; pass a saved Keras model file (.keras, .h5) or a SavedModel "
                          "directory")
    suffix = p.suffix.lower()
    if suffix == ".keras":
        return _read_keras_zip(path, p)
    if suffix in H5_SUFFIXES:
        return _read_h5(path, p)
    raise EdgetlError(f"--base-model '{path}': unknown model format '{suffix or p.name}'; pass a "
                      "Keras model saved as .keras or .h5, or a SavedModel directory")


def _read_keras_zip(path: str, p: Path) -> _File:
    if not zipfile.is_zipfile(p):
        raise EdgetlError(f"--base-model '{path}' is not a .keras file (not a zip archive): "
                          "save the model with model.save('model.keras')")
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            if "config.json" not in names:
                raise EdgetlError(f"--base-model '{path}' is a zip archive without config.json, "
                                  "not a Keras model: save the model with "
                                  "model.save('model.keras')")
            config = json.loads(z.read("config.json"))
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise EdgetlError(f"--base-model '{path}' is a corrupt .keras file ({e}); save the "
                          "model again") from None
    if not isinstance(config, dict):
        raise EdgetlError(f"--base-model '{path}': config.json is not a Keras model config")
    version = str(meta.get("keras_version", ""))
    keras3 = version.startswith("3") if version else _looks_keras3(config)
    return _File(path, "keras", keras3, config)


def _read_h5(path: str, p: Path) -> _File:
    import h5py

    try:
        with h5py.File(p, "r") as f:
            raw = f.attrs.get("model_config")
            version = f.attrs.get("keras_version", "")
    except OSError:
        raise EdgetlError(f"--base-model '{path}' is not a readable HDF5 file (corrupt or "
                          "truncated?): save the model again with model.save()") from None
    if raw is None:
        raise EdgetlError(f"--base-model '{path}' holds weights only (no model config): save the "
                          "whole model with model.save('model.keras'), or pass a weights file "
                          "to --weights with a registry --backbone")
    try:
        config = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        raise EdgetlError(f"--base-model '{path}': the model config inside is not valid JSON; "
                          "save the model again") from None
    version = version.decode() if isinstance(version, bytes) else str(version)
    keras3 = version.startswith("3") if version else _looks_keras3(config)
    return _File(path, "h5", keras3, config)


def _read_savedmodel(path: str, p: Path) -> _File:
    if not (p / "saved_model.pb").is_file() and not (p / "saved_model.pbtxt").is_file():
        raise EdgetlError(f"--base-model '{path}' is a directory but not a SavedModel (no "
                          "saved_model.pb): pass a .keras/.h5 file or a SavedModel directory")
    if not (p / "variables").is_dir():
        raise EdgetlError(f"--base-model '{path}': the SavedModel has no variables/ directory; "
                          "copy the whole SavedModel directory (saved_model.pb and variables/)")
    if not (p / "keras_metadata.pb").is_file():
        raise EdgetlError(f"--base-model '{path}' is a SavedModel without Keras metadata "
                          "(written by tf.saved_model.save or Keras 3 model.export): edgetl needs "
                          "the Keras model; save it with model.save('model.keras')")
    return _File(path, "savedmodel", False, None)


def _looks_keras3(config: dict) -> bool:
    text = json.dumps(config)
    return '"batch_shape"' in text or '"DTypePolicy"' in text


# --- safety --------------------------------------------------------------------------------------

def _k2_builtin_names() -> set[str]:
    from edgetl.keras import keras

    names = {n for n, o in vars(keras.layers).items()
             if isinstance(o, type) and issubclass(o, keras.layers.Layer)}
    return names | _K2_EXTRA_BUILTINS


def _is_keras_module(module) -> bool:
    return module is None or module in ("keras", "tf_keras") or str(module).startswith(
        ("keras.", "tf_keras."))


def _config_problem(obj, builtins: set[str] | None, owner: str = "", is_layer: bool = False):
    """The first thing in a raw config that would run code from the file, or None.

    Args:
        obj: a JSON config (nested dicts and lists).
        builtins: known layer class names (Keras 2 files), or None to trust Keras modules.
        owner: name of the enclosing layer, for the message.
        is_layer: obj is an entry of a 'layers' list.
    """
    if isinstance(obj, list):
        for item in obj:
            found = _config_problem(item, builtins, owner, is_layer)
            if found:
                return found
        return None
    if not isinstance(obj, dict):
        return None
    cls = obj.get("class_name")
    if isinstance(cls, str):
        cfg = obj.get("config")
        name = (cfg.get("name") if isinstance(cfg, dict) else None) or obj.get("name") or owner
        where = f"layer '{name}'" if name else "the model"
        if cls == "Lambda":
            return f"has a Lambda layer '{name}'"
        if cls in ("__lambda__", "__bytes__") or (cls == "function" and not _is_keras_module(
                obj.get("module"))):
            return f"has a Python function inside {where}"
        if not _is_keras_module(obj.get("module")):
            return f"has a class '{cls}' from module '{obj.get('module')}' in {where} " \
                   "(not a built-in Keras class)"
        registered = obj.get("registered_name")
        if isinstance(registered, str) and ">" in registered:
            return f"has a custom registered class '{registered}' in {where}"
        if is_layer and builtins is not None and cls not in builtins:
            return f"has a custom layer '{name}' (class {cls}, not a built-in Keras layer)"
        if cls in ("TFOpLambda", "SlicingOpLambda") and isinstance(cfg, dict):
            fn = str(cfg.get("function", ""))
            if fn.removeprefix("tf.").startswith(_TF_OP_DENY):
                return f"has a layer '{name}' calling tf.{fn}"
        owner = name or owner
    for key, value in obj.items():
        found = _config_problem(value, builtins, owner, key == "layers" and isinstance(value, list))
        if found:
            return found
    return None


def _savedmodel_problem(path: str, builtins: set[str]):
    """Best effort: reads keras_metadata.pb (layer class names and configs) without loading."""
    import importlib

    from edgetl.keras import keras

    raw = (Path(path) / "keras_metadata.pb").read_bytes()
    try:
        pb2 = importlib.import_module(f"{keras.__name__}.protobuf.saved_metadata_pb2")
        meta = pb2.SavedMetadata()
        meta.ParseFromString(raw)
        nodes = [(n.identifier, n.metadata) for n in meta.nodes]
    except Exception:  # unknown layout: fall back to scanning the bytes
        if b'"class_name": "Lambda"' in raw:
            return "has a Lambda layer"
        return None
    for identifier, text in nodes:
        if not identifier.startswith("_tf_keras_") or identifier == "_tf_keras_metric":
            continue
        try:
            item = json.loads(text)
        except ValueError:
            continue
        found = _config_problem({"class_name": item.get("class_name"),
                                 "config": item.get("config") or {"name": item.get("name")}},
                                builtins, is_layer=True)
        if found:
            return found
    return None


def _check_safe(info: _File, unsafe: bool) -> None:
    if unsafe:
        return
    builtins = None if info.keras3 else _k2_builtin_names()
    if info.kind == "savedmodel":
        problem = _savedmodel_problem(info.path, builtins)
    else:
        problem = _config_problem(info.config, builtins, is_layer=True)
    if problem:
        raise EdgetlError(f"--base-model '{info.path}' {problem}: loading it would run code "
                          "from the file; pass --unsafe if you trust it")


# tfmot's QAT wrappers: installed code named in edgetl's own qat.h5, not code from the file.
_TRUSTED_MODULES = ("tensorflow_model_optimization.",)


def _without_trusted_modules(obj):
    if isinstance(obj, list):
        return [_without_trusted_modules(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _without_trusted_modules(v) for k, v in obj.items()
                if not (k == "module" and str(v).startswith(_TRUSTED_MODULES))}
    return obj


def code_in_model_file(path: str) -> str | None:
    """What in a saved ``.keras`` / ``.h5`` model would run code from the file when it loads.

    Used for the model files of a run (``edgetl export``): a Lambda layer, a Python function, a
    class from a module outside Keras (and tfmot) or a custom registered class. Only the config
    is read; nothing is deserialised.

    Returns:
        The problem in words ("has a Lambda layer 'x'"), or None.

    Raises:
        EdgetlError: the file is missing or is not a readable Keras model.
    """
    try:
        info = _read_file(str(path))
    except EdgetlError as e:  # the reasons are _read_file's, worded for --base-model
        text, prefix = str(e), f"--base-model '{path}'"
        rest = text[len(prefix):] if text.startswith(prefix) else " " + text
        rest = rest[1:].strip() if rest.startswith(":") else "it " + rest.strip()
        raise EdgetlError(f"cannot load model '{path}': {rest}") from None
    if info.config is None:  # a SavedModel directory: not something a run holds
        return "is a SavedModel directory, not a run's model file"
    return _config_problem(_without_trusted_modules(info.config), None, is_layer=True)


# --- loading -------------------------------------------------------------------------------------

def _keras3():
    """The Keras 3 package, imported after tf_keras (they coexist with TF_USE_LEGACY_KERAS=1)."""
    import edgetl.keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

    try:
        import keras as keras3
    except ImportError:
        keras3 = None
    if keras3 is None or not str(getattr(keras3, "__version__", "")).startswith("3"):
        raise EdgetlError("this model was saved by Keras 3, which is not installed: "
                          "pip install 'keras>=3' (edgetl rebuilds it in Keras 2)")
    return keras3


def _load(info: _File, unsafe: bool):
    """The saved model object (tf_keras or Keras 3), in safe mode unless unsafe."""
    from edgetl.keras import keras

    try:
        if info.keras3:
            keras3 = _keras3()
            return keras3.saving.load_model(info.path, compile=False, safe_mode=not unsafe)
        if info.kind == "keras":
            return keras.models.load_model(info.path, compile=False, safe_mode=not unsafe)
        # .h5 and SavedModel ignore the safe_mode argument; the scope makes Lambda loading fail.
        lib = getattr(getattr(getattr(keras, "src", None), "saving", None),
                      "serialization_lib", None)
        scope = lib.SafeModeScope(not unsafe) if lib is not None else nullcontext()
        with scope:
            return keras.models.load_model(info.path, compile=False)
    except EdgetlError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EdgetlError(f"--base-model '{info.path}' cannot be loaded: {first}") from None


# --- Keras 3 -> Keras 2 layers -------------------------------------------------------------------

class _Unconvertible(Exception):
    """A Keras 3 layer without a Keras 2 equivalent (only fatal if it is below the cut)."""


def _k2_config(value):
    """A Keras 3 config value in the Keras 2 form (dtype policies as names, no module keys)."""
    if isinstance(value, dict):
        if value.get("class_name") == "DTypePolicy" or value.get("class_name") == (
                "FloatDTypePolicy"):
            return (value.get("config") or {}).get("name", "float32")
        if "class_name" in value and "config" in value:
            return {"class_name": value["class_name"], "config": _k2_config(value["config"])}
        return {k: _k2_config(v) for k, v in value.items() if k != "shared_object_id"}
    if isinstance(value, (list, tuple)):
        return [_k2_config(v) for v in value]
    return value


def _accepted_kwargs(cls) -> set[str] | None:
    """Constructor arguments a tf_keras layer class accepts (None: anything)."""
    import inspect

    names = {"name", "trainable", "dtype", "dynamic", "input_dim", "input_shape",
             "batch_input_shape", "batch_size", "weights", "activity_regularizer", "autocast"}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
        if klass.__name__ == "Layer":
            break
    return names


# Keras 3-only config keys (absent from the tf_keras layer) and whether a value means what
# Keras 2 does without the key; any other value changes behaviour and is refused.
_KERAS2_BEHAVIOUR = {
    "data_format": lambda v, cfg: v in (None, "channels_last"),
    # Keras 2's RandomContrast clips to 0..255
    "value_range": lambda v, cfg: isinstance(v, (list, tuple)) and list(v) == [0, 255],
    # Resizing: the fill only applies with pad_to_aspect_ratio
    "fill_mode": lambda v, cfg: not cfg.get("pad_to_aspect_ratio"),
    "fill_value": lambda v, cfg: not cfg.get("pad_to_aspect_ratio") or not v,
}
# Keras 3 image augmentation layers without a Keras 2 counterpart (inactive at inference).
_K3_ONLY_AUGMENTATION = {"AutoContrast", "AugMix", "CutMix", "Equalization", "MixUp",
                         "Pipeline", "RandAugment", "RandomColorDegeneration",
                         "RandomColorJitter", "RandomElasticTransform", "RandomErasing",
                         "RandomGaussianBlur", "RandomGrayscale", "RandomHue", "RandomInvert",
                         "RandomPerspective", "RandomPosterization", "RandomSaturation",
                         "RandomSharpness", "RandomShear", "Solarization"}


def _convert_layer(layer, unsafe: bool):
    """A new tf_keras layer with the config of a Keras 3 layer (weights are copied later)."""
    from edgetl.keras import keras

    cls_name = type(layer).__name__
    if cls_name == "Lambda" and unsafe:
        return keras.layers.Lambda(layer.function, arguments=dict(layer.arguments or {}),
                                   name=layer.name)
    if cls_name == "RandomCrop":
        raise _Unconvertible(f"layer '{layer.name}' (RandomCrop) passes images through "
                             "unchanged at inference in Keras 3 but crops/resizes them in Keras "
                             "2; remove it from the model before saving")
    k2cls = getattr(keras.layers, cls_name, None)
    if not (isinstance(k2cls, type) and issubclass(k2cls, keras.layers.Layer)):
        extra = (": it only acts in training; remove it from the model before saving (edgetl "
                 "augments with --augment)") if cls_name in _K3_ONLY_AUGMENTATION else ""
        raise _Unconvertible(f"layer '{layer.name}' ({cls_name}) has no Keras 2 equivalent"
                             f"{extra}")
    config = _k2_config(layer.get_config())
    for key in [k for k in config if k.endswith("_initializer")]:
        config.pop(key)  # the weights are copied over: initializers do not matter
    post = None
    if isinstance(config.get("activation"), str):
        post = _k3_activation(config["activation"])
        if post is not None:  # the layer stays linear; the activation follows as TF ops
            config["activation"] = "linear"
        config["activation"] = _RENAMED_ACTIVATIONS.get(config["activation"],
                                                        config["activation"])
    accepted = _accepted_kwargs(k2cls)
    if accepted is not None:
        full = dict(config)
        for key in [k for k in config if k not in accepted]:
            value = config.pop(key)
            same = _KERAS2_BEHAVIOUR.get(key)
            if same is not None and same(value, full):
                continue
            if value not in (None, False, 0, "", [], {}):
                raise _Unconvertible(f"layer '{layer.name}' ({cls_name}) uses {key}={value!r}, "
                                     "which changes its behaviour and Keras 2 does not have; "
                                     "save the model without it")
    try:
        new = k2cls.from_config(config)
        new._edgetl_activation = post
        return new
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise _Unconvertible(f"layer '{layer.name}' ({cls_name}) cannot be rebuilt in Keras 2: "
                             f"{first}") from None


_K3_BINARY_OPS = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply",
                  "TrueDivide": "truediv", "Divide": "truediv"}


def _apply_k3_op(op, args, kwargs):
    """A Keras 3 operation node (``x / 127.5``, ``preprocess_input``'s arithmetic) applied to
    tf_keras tensors: tf_keras records it as a TF-op layer. Plain math and indexing only."""
    import numpy as np

    from edgetl.keras import tf

    name = type(op).__name__

    def plain(v):  # Keras 3 constants (tf tensors) as numpy: tf_keras can serialise those
        return np.asarray(v) if tf.is_tensor(v) and not hasattr(v, "_keras_history") else v

    args = [tf.nest.map_structure(plain, a) for a in args]
    if kwargs:
        raise _Unconvertible(f"operation '{op.name}' ({name}) with arguments "
                             f"{sorted(kwargs)} has no Keras 2 equivalent")
    if name in _K3_BINARY_OPS and len(args) == 2:
        return getattr(tf.math, _K3_BINARY_OPS[name])(args[0], args[1])
    if name == "Negative" and len(args) == 1:
        return tf.math.negative(args[0])
    if name == "Cast" and len(args) == 1:
        return tf.cast(args[0], str(getattr(op, "dtype", "float32")))
    if name == "GetItem" and len(args) == 2:
        key = args[1]
        return args[0][tuple(key) if isinstance(key, list) else key]
    if name == "Stack" and len(args) == 1:
        return tf.stack(list(args[0]), axis=int(getattr(op, "axis", 0)))
    if name == "Flip" and len(args) == 1 and isinstance(getattr(op, "axis", None), int):
        return tf.reverse(args[0], axis=[op.axis])
    raise _Unconvertible(f"operation '{op.name}' ({name}) has no Keras 2 equivalent")


def _copy_weights(src, dst, path: str) -> None:
    """Keras 3 layer weights -> tf_keras layer, matched by name (else by order), shapes checked."""
    import numpy as np

    source = [w for w in src.weights if "seed_generator" not in getattr(w, "path", w.name)]
    target = list(dst.weights)
    if len(source) != len(target):
        raise EdgetlError(f"--base-model '{path}': layer '{src.name}' has {len(source)} weights "
                          f"in Keras 3 but {len(target)} when rebuilt in Keras 2; save the model "
                          "with tf_keras or cut below it with --cut-layer")

    def short(w):
        return w.name.split("/")[-1].split(":")[0]

    by_name = {short(w): w for w in source}
    if set(by_name) == {short(w) for w in target} and len(by_name) == len(source):
        pairs = [(by_name[short(t)], t) for t in target]
    else:
        pairs = list(zip(source, target))
    for s, t in pairs:
        value = np.asarray(s.numpy())
        if tuple(value.shape) != tuple(t.shape):
            raise EdgetlError(f"--base-model '{path}': weight '{short(s)}' of layer '{src.name}' "
                              f"has shape {tuple(value.shape)} but the rebuilt Keras 2 layer "
                              f"expects {tuple(t.shape)}")
        t.assign(value)


# --- flattening ----------------------------------------------------------------------------------

class _Missing:
    """Stands for the output of a layer that could not be rebuilt (Keras 3 only)."""

    def __init__(self, rank: int, reason: str):
        self.rank = rank
        self.reason = reason


@dataclass
class _Record:
    value: object
    layer: str
    cls: str
    inputs: list


class _Flattener:
    """Rebuilds a (possibly nested) Keras 2 or Keras 3 model as one flat tf_keras graph.

    Nested models are walked node by node, so their layers land directly in the new graph.
    tf_keras layers are called again as they are; Keras 3 layers are converted first.
    """

    def __init__(self, path: str, keras3_module, unsafe: bool):
        self.path = path
        self.k3 = keras3_module
        self.unsafe = unsafe
        self.records: dict[int, _Record] = {}  # id(new tensor) -> who made it
        self.by_name: dict[str, list] = {}  # layer or nested model name -> its new outputs
        self.order: list[str] = []
        self.converted: dict[int, object] = {}  # id(Keras 3 layer) -> tf_keras layer
        self.pairs: list[tuple] = []  # (Keras 3 layer, tf_keras layer)
        self.names_taken: dict[str, int] = {}  # layer name -> id of the layer that has it

    # graph access, Keras 2 or Keras 3 ------------------------------------------------------
    def _is_model(self, layer) -> bool:
        from edgetl.keras import keras

        if self.k3 is not None:
            return isinstance(layer, self.k3.Model)
        return isinstance(layer, keras.Model)

    def _graph(self, model):
        """The functional object whose nodes describe the model, or None (plain Sequential)."""
        if self.k3 is not None and isinstance(model, self.k3.Sequential):
            return getattr(model, "_functional", None)
        if getattr(model, "_is_graph_network", True) and hasattr(model, "_nodes_by_depth"):
            return model
        return None

    def _nodes(self, graph):
        """(layer, args, kwargs, flat outputs) of each call, in topological order."""
        from edgetl.keras import tf

        by_depth = graph._nodes_by_depth
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                if node.is_input:
                    continue
                if self.k3 is not None:
                    yield (node.operation, node.arguments.args, node.arguments.kwargs,
                           list(node.outputs))
                else:
                    yield (node.layer, node.call_args, node.call_kwargs,
                           tf.nest.flatten(node.outputs))

    # building ------------------------------------------------------------------------------
    def _unique_name(self, layer, parent: str) -> str | None:
        """A new name if another layer of the flat graph already has this one."""
        owner = self.names_taken.get(layer.name)
        if owner is None or owner == id(layer):
            self.names_taken[layer.name] = id(layer)
            return None
        base = f"{parent}_{layer.name}"
        name, i = base, 1
        while name in self.names_taken:
            i += 1
            name = f"{base}_{i}"
        self.names_taken[name] = id(layer)
        return name

    def _layer_for(self, layer, parent: str):
        """The tf_keras layer to call for an original layer (converted once, then shared)."""
        if self.k3 is None:
            new_name = self._unique_name(layer, parent)
            if new_name:
                layer._name = new_name
            return layer
        if id(layer) in self.converted:
            return self.converted[id(layer)]
        if not isinstance(layer, self.k3.layers.Layer):
            raise _Unconvertible(f"operation '{getattr(layer, 'name', layer)}' "
                                 f"({type(layer).__name__}) is not a Keras layer")
        new = _convert_layer(layer, self.unsafe)
        new_name = self._unique_name(layer, parent)
        if new_name:
            new._name = new_name
        self.converted[id(layer)] = new
        self.pairs.append((layer, new))
        return new

    def _record(self, name: str, cls: str, outputs: list, inputs: list) -> None:
        for y in outputs:  # a nested model's outputs keep the record of their inner layer
            self.records.setdefault(id(y), _Record(y, name, cls, inputs))
        self.by_name[name] = outputs
        if name not in self.order:
            self.order.append(name)

    def walk(self, model, inputs: list) -> list:
        """Calls model's layers on ``inputs`` (new tensors); returns the new outputs."""
        from edgetl.keras import tf

        graph = self._graph(model)
        if graph is None:
            if not hasattr(model, "layers") or type(model).__name__ != "Sequential":
                raise EdgetlError(f"--base-model '{self.path}': model '{model.name}' is a "
                                  "subclassed Keras model without a layer graph; save a "
                                  "functional or Sequential model")
            x = inputs
            for layer in model.layers:
                x = self._call(layer, (x[0],), {}, [None], model.name)
            return x
        values = {id(t): v for t, v in zip(graph.inputs, inputs)}
        for layer, args, kwargs, outputs in self._nodes(graph):

            def swap(t):
                return values[id(t)] if hasattr(t, "_keras_history") else t

            new_args = tf.nest.map_structure(swap, tuple(args))
            new_kwargs = {k: tf.nest.map_structure(swap, v) for k, v in (kwargs or {}).items()
                          if k not in ("training", "mask")}
            new_out = self._call(layer, new_args, new_kwargs, outputs, model.name)
            for t, v in zip(outputs, new_out):
                values[id(t)] = v
        return [values[id(t)] for t in graph.outputs]

    def _call(self, layer, args, kwargs, outputs, parent: str) -> list:
        from edgetl.keras import tf

        flat_in = [t for t in tf.nest.flatten((args, kwargs))
                   if isinstance(t, _Missing) or hasattr(t, "_keras_history")]
        if self._is_model(layer):
            out = self.walk(layer, flat_in)
            self._record(layer.name, type(layer).__name__, out, flat_in)
            return out
        missing = next((t for t in flat_in if isinstance(t, _Missing)), None)
        reason = missing.reason if missing else None
        if reason is None and self.k3 is not None and not isinstance(layer, self.k3.layers.Layer):
            try:  # a Keras 3 operation (arithmetic on tensors), not a layer
                out = tf.nest.flatten(_apply_k3_op(layer, args, kwargs))
                self._record(layer.name, type(layer).__name__, out, flat_in)
                return out
            except _Unconvertible as e:
                reason = str(e)
        if reason is None:
            try:
                new = self._layer_for(layer, parent)
            except _Unconvertible as e:
                reason = str(e)
        if reason is not None:
            out = [_Missing(len(t.shape) if t is not None and t.shape is not None else 0, reason)
                   for t in outputs]
        else:
            out = tf.nest.flatten(new(*args, **kwargs))
            post = getattr(new, "_edgetl_activation", None)
            if post is not None:
                out = [post(t) for t in out]
        self._record(getattr(new, "name", layer.name) if reason is None else layer.name,
                     type(layer).__name__, out, flat_in)
        return out


def _rank(t) -> int:
    if isinstance(t, _Missing):
        return t.rank
    return len(t.shape)


def _default_cut(flat: _Flattener, output, path: str):
    """The last 4D tensor below the classification head (walking back from the output)."""
    t = output
    while _rank(t) != 4:
        rec = flat.records.get(id(t))
        if rec is None:
            break
        if len(rec.inputs) != 1:
            raise EdgetlError(f"--base-model '{path}': cannot find the classification head: "
                              f"layer '{rec.layer}' ({rec.cls}) joins {len(rec.inputs)} inputs; "
                              "pass --cut-layer NAME (the layer whose output feeds the new head)")
        t = rec.inputs[0]
    if id(t) not in flat.records:
        raise EdgetlError(f"--base-model '{path}' has no 4D layer (feature map) to cut at: "
                          "edgetl needs a convolutional model; pass --cut-layer NAME to choose "
                          "the feature layer yourself")
    # Skip a 1x1 classifier conv sitting on a global pooling with keepdims (MobileNet v1 style).
    u = t
    while True:
        rec = flat.records.get(id(u))
        if rec is None or len(rec.inputs) != 1 or _rank(u) != 4:
            break
        shape = getattr(u, "shape", None)
        if shape is None or tuple(shape[1:3]) != (1, 1):
            break
        if rec.cls in _GLOBAL_POOLS:
            src = rec.inputs[0]
            if _rank(src) == 4 and id(src) in flat.records:
                return src
            break
        if rec.cls not in _SPATIAL_1X1_HEAD:
            break
        u = rec.inputs[0]
    return t


def _cut_tensor(flat: _Flattener, outputs: list, cut_layer: str | None, path: str,
                input_name: str):
    if cut_layer is None:
        if len(outputs) != 1:
            raise EdgetlError(f"--base-model '{path}' has {len(outputs)} outputs: pass "
                              "--cut-layer NAME to choose the feature layer")
        return _default_cut(flat, outputs[0], path)
    if cut_layer == input_name:
        raise EdgetlError(f"--cut-layer '{cut_layer}' is the input of '{path}': choose a layer "
                          "that outputs a feature map")
    if cut_layer not in flat.by_name:
        names = flat.order
        near = []
        try:
            point = flat.records[id(_default_cut(flat, outputs[0], path))].layer
            i = names.index(point)
            near = names[max(0, i - 3):i + 3]
        except (EdgetlError, KeyError, ValueError, IndexError):
            near = names[-6:]
        close = difflib.get_close_matches(cut_layer, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise EdgetlError(f"--cut-layer '{cut_layer}' is not a layer of '{path}'{hint} "
                          f"(layers near the default cut: {', '.join(near)}; "
                          f"{len(names)} layers in all)")
    out = flat.by_name[cut_layer]
    if len(out) != 1:
        raise EdgetlError(f"--cut-layer '{cut_layer}' has {len(out)} outputs: choose a layer "
                          "with one output")
    t = out[0]
    if _rank(t) not in (2, 4):
        raise EdgetlError(f"--cut-layer '{cut_layer}' outputs a rank-{_rank(t)} tensor: choose a "
                          "layer that outputs a feature map (N, H, W, C) or a vector (N, C)")
    return t


def _size_hint(h, w, size: tuple) -> str:
    """The --input-size value that fits a model fixing height h and/or width w."""
    want = (h or size[0], w or size[1])
    return str(want[0]) if want[0] == want[1] else f"{want[0]}x{want[1]}"


def _size_problem(path: str, h, w, size: tuple) -> str | None:
    if (h is None or h == size[0]) and (w is None or w == size[1]):
        return None
    asked = str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]} (height x width)"
    return (f"--base-model '{path}' takes {h}x{w} images (height x width) but the input size is "
            f"{asked}: pass --input-size {_size_hint(h, w, size)} (or save the model with a "
            "flexible input, Input(shape=(None, None, channels)))")


def _input_shape(model, path: str, size: tuple) -> tuple:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise EdgetlError(f"--base-model '{path}' has no defined input (a model built without "
                          "an input shape): save a model built with an Input layer")
    if len(inputs) != 1:
        raise EdgetlError(f"--base-model '{path}' has {len(inputs)} inputs: edgetl needs a model "
                          "with one image input")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4:
        raise EdgetlError(f"--base-model '{path}' takes inputs of shape {shape}, not images "
                          "(batch, height, width, channels)")
    _, h, w, c = shape
    if c not in (1, 3):
        raise EdgetlError(f"--base-model '{path}' takes {c}-channel images: edgetl feeds "
                          "greyscale (1 channel) or RGB (3 channels) images; save the model with "
                          "Input(shape=(height, width, 1 or 3))")
    problem = _size_problem(path, h, w, size)
    if problem:
        raise EdgetlError(problem)
    return (size[0], size[1], c), getattr(inputs[0], "name", "input").split(":")[0]


def _config_layers(config) -> list[tuple[str, str]]:
    """(name, class) of every layer in a raw config, nested models' layers included, in order."""
    found = []

    def visit(obj, in_layers: bool):
        if isinstance(obj, list):
            for item in obj:
                visit(item, in_layers)
        elif isinstance(obj, dict):
            cfg = obj.get("config")
            if in_layers and isinstance(obj.get("class_name"), str) and isinstance(cfg, dict):
                if obj["class_name"] != "InputLayer":
                    found.append((cfg.get("name") or obj.get("name"), obj["class_name"]))
            for key, value in obj.items():
                visit(value, key == "layers")

    visit(config, False)
    return [(n, c) for n, c in found if isinstance(n, str)]


def _config_input_shape(config):
    """The batch input shape of the outermost model in a raw config, or None."""
    layers = (config.get("config") or {}).get("layers") if isinstance(config, dict) else None
    for item in layers or []:
        cfg = item.get("config") or {} if isinstance(item, dict) else {}
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if isinstance(shape, list):
            return shape
        if item.get("class_name") in ("Functional", "Sequential", "Model"):
            return _config_input_shape(item)
        break
    build = (config.get("build_config") or {}).get("input_shape") if isinstance(
        config, dict) else None
    return build if isinstance(build, list) else None


def _precheck(info: _File, cut_layer: str | None, size: tuple) -> None:
    """Input size and cut layer checked on the raw config (the load re-checks both)."""
    if info.config is None:
        return
    shape = _config_input_shape(info.config)
    if isinstance(shape, list) and len(shape) == 4:
        _, h, w, _c = shape
        problem = _size_problem(info.path, h, w, size)
        if problem:
            raise EdgetlError(problem)
    layers = _config_layers(info.config)
    names = [n for n, _ in layers]
    if cut_layer is not None and names and cut_layer not in names:
        body = [n for n, c in layers if c not in _HEAD_CLASSES]
        near = body[-4:] + [n for n in names[names.index(body[-1]) + 1:]][:3] if body else \
            names[-6:]
        close = difflib.get_close_matches(cut_layer, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise EdgetlError(f"--cut-layer '{cut_layer}' is not a layer of '{info.path}'{hint} "
                          f"(layers near the top: {', '.join(near)}; "
                          f"{len(names)} layers in all)")


def _check_rebuilt(original, rebuilt, path: str) -> None:
    """The rebuilt Keras 2 graph computes what the Keras 3 model computes (random batch)."""
    import numpy as np

    shape = (2,) + tuple(rebuilt.input_shape[1:])
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype("float32")
    want = original(x, training=False)
    got = rebuilt(x, training=False)
    want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
    got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    for w, g in zip(want, got):
        diff = float(np.max(np.abs(w - g))) if w.size else 0.0
        if w.shape != g.shape or diff > 1e-3 * (1.0 + float(np.max(np.abs(w)))):
            raise EdgetlError(f"--base-model '{path}': the model rebuilt in Keras 2 does not "
                              f"match the Keras 3 original (max difference {diff:.3g}); save "
                              "the model with tf_keras instead")


# --- public API ----------------------------------------------------------------------------------

def load_base_model(path: str, cut_layer: str | None = None, unsafe: bool = False,
                    size: int | tuple = 224):
    """The user's saved model as a flat tf_keras backbone that ends at its features.

    Args:
        path: a ``.keras`` or ``.h5`` file or a SavedModel directory (Keras 2 or Keras 3).
        cut_layer: layer whose output becomes the backbone output; None cuts below the
            classification head (the last 4D tensor before Dense/Flatten/pooling...).
        unsafe: allow Lambda layers and non-Keras classes (they run code from the file).
        size: input size in pixels, N or (height, width); must equal the model's fixed size.

    Returns:
        A tf_keras functional model with one (height, width, channels) input (channels: the
        model's own, 1 or 3), no nested models, whose output is a feature map (N, H, W, C) or
        a feature vector (N, C).

    Raises:
        EdgetlError: for a missing or unreadable file, an unsafe model without ``unsafe``, an
            input size that does not fit, a missing ``cut_layer`` or no 4D layer to cut at.
    """
    path = str(path)
    size = (size, size) if isinstance(size, int) else tuple(size)
    info = _read_file(path)  # fails fast, before TensorFlow is imported
    from edgetl.keras import keras

    _check_safe(info, unsafe)
    _precheck(info, cut_layer, size)  # cheap mistakes fail before the (slow) load
    model = _load(info, unsafe)
    keras3 = _keras3() if info.keras3 else None
    shape, input_name = _input_shape(model, path, size)
    flat = _Flattener(path, keras3, unsafe)
    inp = keras.Input(shape=shape, name=input_name)
    flat.names_taken[input_name] = -1
    outputs = flat.walk(model, [inp])
    cut = _cut_tensor(flat, outputs, cut_layer, path, input_name)
    if isinstance(cut, _Missing):
        raise EdgetlError(f"--base-model '{path}': {cut.reason}; pass --cut-layer with a layer "
                          "below it, or save the model with tf_keras")
    if keras3 is not None:
        for src, dst in flat.pairs:
            _copy_weights(src, dst, path)
        if not any(isinstance(o, _Missing) for o in outputs):
            _check_rebuilt(model, keras.Model(inp, outputs), path)
    return keras.Model(inp, cut, name=f"{model.name}_base")


def base_model_input_shape(path: str) -> tuple | None:
    """(height, width, channels) a saved model's input fixes, read from its config; each is
    None where the model leaves it open. None for an unreadable file or a SavedModel.

    Reads the config only (no deserialisation), so it is safe on any file.
    """
    try:
        info = _read_file(str(path))
    except EdgetlError:
        return None
    config = info.config
    if config is None:  # SavedModel: the size is checked when loading
        return None
    shapes = []

    def visit(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "InputLayer" and isinstance(obj.get("config"), dict):
                c = obj["config"]
                shapes.append(c.get("batch_shape") or c.get("batch_input_shape"))
                return
            for key in ("batch_input_shape", "batch_shape"):
                if isinstance(obj.get(key), list):
                    shapes.append(obj[key])
                    return
            for value in obj.values():
                visit(value)
                if shapes:
                    return
        elif isinstance(obj, list):
            for value in obj:
                visit(value)
                if shapes:
                    return

    visit(config)
    shape = shapes[0] if shapes else None
    if isinstance(shape, list) and len(shape) == 4:
        return tuple(int(v) if isinstance(v, int) else None for v in shape[1:])
    return None


def base_model_input_size(path: str) -> int | None:
    """The square input size a saved model fixes, read from its config (None: flexible,
    non-square or unknown; see base_model_input_shape)."""
    shape = base_model_input_shape(path)
    if shape and shape[0] and shape[0] == shape[1]:
        return int(shape[0])
    return None


def base_model_preprocessing(path: str) -> dict:
    """The preprocessing a sidecar file ``<path>.preprocessing.json`` names, else "tf".

    ``train`` chooses with ``edgetl.preprocessing.choose``, which also looks at the model's
    first layers; this is the file-only part of that choice.

    Returns:
        {"mean": [3 floats], "std": [3 floats], "channel_order": "RGB"|"BGR", "name": str}.
    """
    from edgetl.backbones import PREPROCESSING

    return read_sidecar(path) or dict(PREPROCESSING["tf"], name="tf")


__all__ = ["load_base_model", "base_model_preprocessing", "base_model_input_size",
           "base_model_input_shape",
           "sidecar_path", "SIDECAR_SUFFIX"]
