"""Standard TFLite metadata: what MediaPipe Tasks, the LiteRT support library and Android Studio read.

An exported ``.tflite`` carries two things:

* the standard ``ModelMetadata`` flatbuffer, stored in the model's own ``metadata`` list under the
  name ``TFLITE_METADATA`` (the TFLite Support / MediaPipe convention): name, description,
  version, author; the image input's colour space, ``NormalizationOptions`` (mean/std per channel)
  and value range; the output's labels as the associated file ``labels.txt`` of type
  ``TENSOR_AXIS_LABELS``;
* the zip archive appended after the model (associated files, the same convention), holding
  ``labels.txt`` and edgetl's own ``edgetl.json`` (settings, calibration manifest hash,
  verification, versions: fields the standard has no place for). The runner writes and reads it.

Why the table is built here with ``flatbuffers.Builder`` rather than with MediaPipe's
``metadata_writers``: no maintained writer installs beside edgetl's training stack. mediapipe
(>= 0.10.30) needs absl-py ~= 2.3 while tensorflow-model-optimization needs absl-py ~= 1.2, and its
``MetadataPopulator`` imports a ``_pywrap_metadata_version`` module its wheels no longer ship;
mediapipe <= 0.10.21 needs numpy < 2 and protobuf < 5; tflite-support needs protobuf < 4. The
model itself is re-packed with LiteRT's own schema module (``ai_edge_litert.schema_py_generated``),
as MediaPipe's populator does with its copy of it. Field numbers below follow
``metadata_schema.fbs`` (MediaPipe / TFLite Support); the client test reads the result back with
MediaPipe's generated schema module and runs it in MediaPipe's ``ImageClassifier``.

Everything is deterministic: the same model and arguments give the same bytes.
"""

from __future__ import annotations

import numpy as np

from edgetl.errors import EdgetlError

METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
MODEL_IDENTIFIER = b"TFL3"
LABELS_FILE = "labels.txt"
# The fields used here all exist since metadata schema 1.0.0 (tensor-level process units, Stats,
# TENSOR_AXIS_LABELS files without a version): MediaPipe's GetMinimumMetadataParserVersion gives
# 1.0.0 for them.
MIN_PARSER_VERSION = "1.0.0"

# metadata_schema.fbs enums
TENSOR_AXIS_LABELS = 2
COLOR_SPACE_RGB = 1
CONTENT_FEATURE, CONTENT_IMAGE = 1, 2
OPTIONS_NORMALIZATION = 1

# Which input/output type suits which runtime (printed by `edgetl export`).
IO_ADVICE = ("--io types: uint8 (the default) loads in MediaPipe Tasks, Coral's tools and "
             "LiteRT; int8 in plain LiteRT only (MediaPipe refuses it); float32 I/O for callers "
             "feeding floats")


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency of edgetl
        raise EdgetlError("writing TFLite metadata needs ai-edge-litert: "
                          "pip install ai-edge-litert") from None
    return schema


def _builder(size: int):
    """A flatbuffers Builder that starts byte vectors (weight buffers) on 16-byte boundaries.

    The schema declares ``Buffer.data`` with ``force_align: 16`` and the converter honours it; the
    Python object API does not, and unaligned weights are what MediaPipe's populator leaves.
    """
    import flatbuffers

    class Builder(flatbuffers.Builder):
        def StartVector(self, elemSize, numElems, alignment):  # noqa: N802, N803 (their API)
            if elemSize == 1:
                alignment = max(alignment, 16)
            return super().StartVector(elemSize, numElems, alignment)

    return Builder(size)


def _floats(b, values) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype="<f4"))


def _offsets(b, items: list) -> int:
    b.StartVector(4, len(items), 4)
    for item in reversed(items):
        b.PrependUOffsetTRelative(item)
    return b.EndVector()


def _table(b, fields: list) -> int:
    """One table from ``(slot, kind, value)``: kind is "offset", "u8" or "i8"; None skips."""
    b.StartObject(max(slot for slot, _, _ in fields) + 1)
    for slot, kind, value in fields:
        if value is None:
            continue
        if kind == "offset":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "u8":
            b.PrependUint8Slot(slot, value, 0)
        else:
            b.PrependInt8Slot(slot, value, 0)
    return b.EndObject()


def metadata_buffer(*, name: str, description: str, version: str, author: str,
                    input_name: str, input_dtype: str, mean, std, output_name: str,
                    labels_file: str = LABELS_FILE) -> bytes:
    """The ``ModelMetadata`` flatbuffer of a one-input image classifier.

    Args:
        name, description, version, author: general information.
        input_name, output_name: the tensors' names in the model (as MediaPipe's writer fills in).
        input_dtype: the model's input type (``uint8``, ``int8``, ``float32``): the value range is
            0..255 for uint8, ``(0 - mean) / std .. (255 - mean) / std`` per channel for float32,
            and absent otherwise (MediaPipe's ``InputImageTensorMd`` rule).
        mean, std: per-channel normalisation, RGB order, 1 or 3 values each.
        labels_file: name of the associated labels file (one label per output, one per line).

    Returns:
        The flatbuffer bytes (file identifier ``M001``).

    Raises:
        EdgetlError: mean/std not 1 or 3 finite numbers, or a std of 0.
    """
    import flatbuffers

    try:
        mean = [float(m) for m in np.broadcast_to(np.asarray(mean, dtype=np.float64), (3,))]
        std = [float(s) for s in np.broadcast_to(np.asarray(std, dtype=np.float64), (3,))]
    except (TypeError, ValueError):
        raise EdgetlError(f"normalisation mean {mean!r} / std {std!r} must be 1 or 3 numbers "
                          "each") from None
    if not all(np.isfinite(mean + std)) or 0.0 in std:
        raise EdgetlError(f"normalisation mean {mean} / std {std} must be finite, std non-zero")
    if input_dtype == "uint8":
        lo, hi = [0.0], [255.0]
    elif input_dtype == "float32":
        lo = [(0.0 - m) / s for m, s in zip(mean, std)]
        hi = [(255.0 - m) / s for m, s in zip(mean, std)]
    else:
        lo = hi = None

    b = flatbuffers.Builder(1024)
    # Input: image content (RGB), normalisation, value range.
    image_props = _table(b, [(0, "i8", COLOR_SPACE_RGB)])
    in_content = _table(b, [(0, "u8", CONTENT_IMAGE), (1, "offset", image_props)])
    norm = _table(b, [(0, "offset", _floats(b, mean)), (1, "offset", _floats(b, std))])
    unit = _table(b, [(0, "u8", OPTIONS_NORMALIZATION), (1, "offset", norm)])
    units = _offsets(b, [unit])
    in_stats = None
    if lo is not None:
        in_stats = _table(b, [(0, "offset", _floats(b, hi)), (1, "offset", _floats(b, lo))])
    in_name = b.CreateString(input_name)
    in_desc = b.CreateString("Input image to be classified.")
    in_meta = _table(b, [(0, "offset", in_name), (1, "offset", in_desc),
                         (3, "offset", in_content), (4, "offset", units),
                         (5, "offset", in_stats)])
    # Output: class scores, labels as an associated file.
    file_name = b.CreateString(labels_file)
    file_desc = b.CreateString("Labels for categories that the model can recognize.")
    label_file = _table(b, [(0, "offset", file_name), (1, "offset", file_desc),
                            (2, "i8", TENSOR_AXIS_LABELS)])
    files = _offsets(b, [label_file])
    b.StartObject(0)  # FeatureProperties: an empty table
    feature = b.EndObject()
    out_content = _table(b, [(0, "u8", CONTENT_FEATURE), (1, "offset", feature)])
    out_stats = _table(b, [(0, "offset", _floats(b, [1.0])), (1, "offset", _floats(b, [0.0]))])
    out_name = b.CreateString(output_name)
    out_desc = b.CreateString("Probabilities of the labels respectively.")
    out_meta = _table(b, [(0, "offset", out_name), (1, "offset", out_desc),
                          (3, "offset", out_content), (5, "offset", out_stats),
                          (6, "offset", files)])
    subgraph = _table(b, [(2, "offset", _offsets(b, [in_meta])),
                          (3, "offset", _offsets(b, [out_meta]))])
    strings = [b.CreateString(s) for s in (name, description, version, author)]
    parser = b.CreateString(MIN_PARSER_VERSION)
    root = _table(b, [(0, "offset", strings[0]), (1, "offset", strings[1]),
                      (2, "offset", strings[2]), (3, "offset", _offsets(b, [subgraph])),
                      (4, "offset", strings[3]), (7, "offset", parser)])
    b.Finish(root, METADATA_IDENTIFIER)
    return bytes(b.Output())


def add_to_model(model_bytes: bytes, metadata: bytes) -> bytes:
    """The model (without any appended archive) with ``metadata`` as its ``TFLITE_METADATA``.

    Replaces an existing ``TFLITE_METADATA`` entry, as MediaPipe's ``MetadataPopulator`` does; the
    model is unpacked and re-packed with LiteRT's schema module, so the same input gives the same
    bytes.

    Raises:
        EdgetlError: the bytes are not a TFLite model.
    """
    schema = _schema()
    if len(model_bytes) < 8 or model_bytes[4:8] != MODEL_IDENTIFIER:
        raise EdgetlError("cannot add TFLite metadata: the bytes are not a TFLite model")
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model_bytes, 0))
    entry = schema.BufferT()
    entry.data = np.frombuffer(metadata, dtype=np.uint8)
    model.buffers = model.buffers or []
    model.metadata = model.metadata or []
    for m in model.metadata:
        if m.name.decode("utf-8", "replace") == METADATA_NAME:
            model.buffers[m.buffer] = entry
            break
    else:
        model.buffers.append(entry)
        field = schema.MetadataT()
        field.name = METADATA_NAME
        field.buffer = len(model.buffers) - 1
        model.metadata.append(field)
    b = _builder(len(model_bytes) + len(metadata) + 1024)
    b.Finish(model.Pack(b), MODEL_IDENTIFIER)
    return bytes(b.Output())


def strip(model_bytes: bytes) -> bytes:
    """The model without its ``TFLITE_METADATA`` entry and without any appended archive.

    What stays is the converter's model, re-packed: two exports of the same weights compare equal
    whatever their names. The metadata's buffer is left empty, so buffer indices do not move.
    """
    from edgetl.runner import strip_metadata

    schema = _schema()
    base = strip_metadata(model_bytes)
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(base, 0))
    kept = []
    for m in model.metadata or []:
        if m.name.decode("utf-8", "replace") == METADATA_NAME:
            model.buffers[m.buffer] = schema.BufferT()
        else:
            kept.append(m)
    model.metadata = kept
    b = _builder(len(base) + 1024)
    b.Finish(model.Pack(b), MODEL_IDENTIFIER)
    return bytes(b.Output())


def write(model_bytes: bytes, meta: dict, labels: list) -> bytes:
    """The exported file: model + standard metadata + appended ``labels.txt`` and ``edgetl.json``.

    Args:
        model_bytes: the converter's output (an archive already appended is replaced).
        meta: edgetl's metadata dict (``name``, ``mode``, ``input`` with ``mean``/``std``/
            ``channel_order``, ``io`` with the input/output tensors, ``versions``, ...).
        labels: one label per model output.

    Returns:
        The bytes to write; identical for identical arguments.

    Raises:
        EdgetlError: not a TFLite model, or metadata that cannot be written.
    """
    from edgetl.runner import RunnerError, attach_metadata, strip_metadata

    inp, io = meta.get("input") or {}, meta.get("io") or {}
    try:
        tensor_in, tensor_out = io["input"][0], io["output"][0]
    except (KeyError, IndexError, TypeError):
        raise EdgetlError("metadata has no input/output tensor description") from None
    mean, std = inp.get("mean", [0.0]), inp.get("std", [1.0])
    source = meta.get("source_run") or {}
    description = (f"Image classifier of {len(labels)} classes ({_backbone_text(source)}, "
                   f"{meta.get('mode', '?')}), trained and exported by edgetl; "
                   "edgetl.json in the appended archive holds its settings, verification and "
                   "versions.")
    version = str((meta.get("versions") or {}).get("edgetl", ""))
    try:
        buf = metadata_buffer(name=str(meta.get("name") or "model"), description=description,
                              version=version, author="edgetl",
                              input_name=tensor_in["name"], input_dtype=tensor_in["dtype"],
                              mean=mean, std=std, output_name=tensor_out["name"])
        return attach_metadata(add_to_model(strip_metadata(model_bytes), buf), meta, labels)
    except RunnerError as e:
        raise EdgetlError(str(e)) from None


def _backbone_text(source: dict) -> str:
    """The backbone for the description: a --base-model run names its file and sha256."""
    source = source if isinstance(source, dict) else {}
    train = source.get("train")
    base = train.get("base_model") if isinstance(train, dict) else None
    if isinstance(base, dict):
        sha = base.get("sha256")
        return (f"base model {base.get('file')}, sha256 "
                f"{sha if sha else 'not recorded'}")
    return f"{source.get('backbone') or 'custom'} backbone"


# --- reading ---------------------------------------------------------------------------------------

def read(path_or_bytes) -> dict | None:
    """The standard metadata of a model as a dict, or None when it has none.

    Returns:
        ``{"name", "description", "version", "author", "min_parser_version", "mean", "std",
        "input_min", "input_max", "color_space", "labels_file", "labels"}``; ``mean``/``std`` are
        None without ``NormalizationOptions``, ``labels`` None when the labels file is not in
        the appended archive.

    Raises:
        RunnerError: not a TFLite model, or metadata present but corrupt.
    """
    from edgetl.runner import read_standard_metadata

    return read_standard_metadata(path_or_bytes)


def mediapipe_note(meta: dict) -> str | None:
    """Why MediaPipe Tasks would feed this model other inputs than edgetl does, or None.

    MediaPipe applies ``NormalizationOptions`` to float inputs only; a uint8 input gets the raw
    pixels, which is right when the input's quantization maps pixel ``p`` to ``(p - mean) / std``
    within a quantization step. int8 input is refused outright; BGR models get RGB.
    """
    inp = meta.get("input") or {}
    tensor = ((meta.get("io") or {}).get("input") or [{}])[0]
    if str(inp.get("channel_order", "RGB")).upper() == "BGR":
        return "BGR input: MediaPipe feeds RGB"
    dtype = tensor.get("dtype")
    if dtype == "int8":
        return "int8 input: MediaPipe accepts uint8 or float32 input only (use --io uint8)"
    if dtype == "uint8":
        mean = np.asarray(inp.get("mean", [0.0]), dtype=np.float64).reshape(-1)
        std = np.asarray(inp.get("std", [1.0]), dtype=np.float64).reshape(-1)
        scale = (tensor.get("scale") or [None])[0]
        zero = (tensor.get("zero_point") or [None])[0]
        if scale is None or zero is None:
            return None
        if np.ptp(mean) > 1e-6 or np.ptp(std) > 1e-6:
            return ("per-channel mean/std with uint8 input: MediaPipe feeds raw pixels, which one "
                    "per-tensor input quantization cannot normalise per channel")
        # p -> (p - zero) * scale against p -> (p - mean) / std, over the pixel range.
        err = max(abs((p - zero) * scale - (p - mean[0]) / std[0]) for p in (0.0, 255.0))
        if err > scale:
            return (f"uint8 input quantization (scale {scale:.6g}, zero point {zero}) does not "
                    f"map pixels to (p - {mean[0]:g}) / {std[0]:g} (off by {err / scale:.1f} "
                    "steps): MediaPipe feeds raw pixels; calibrate with images spanning 0..255")
    return None
