#!/usr/bin/env python3
"""edgetl runner: time and evaluate a .tflite image classifier on the device it runs on.

One standalone file: the Python standard library, numpy and a TFLite interpreter (ai-edge-litert,
tflite-runtime or, last resort, TensorFlow); models are read with LiteRT's generated schema module
(with tflite-runtime: the ``tflite`` package's). Pillow is needed only to decode images.
The same file is importable as ``edgetl.runner``; training and export verification use it, so the
device and the workstation see identical pixels and identical quantization.

Usage::

    python3 edgetl_runner.py MODEL.tflite                      # latency, throughput, memory
    python3 edgetl_runner.py MODEL.tflite --data test/         # + top-1/top-5, per class, confusion
    python3 edgetl_runner.py MODEL.tflite --delegate edgetpu   # Coral Edge TPU (libedgetpu)
    python3 edgetl_runner.py mobilenet_quant.tflite --labels labels.txt --data photos/   # third-party

An edgetl model carries its labels and preprocessing in a zip archive appended to the .tflite (the
TFLite Support "associated files" convention; interpreters ignore trailing bytes). Models without it
are fed their input "raw" by default (pixels unchanged in the model's input dtype, the convention of
the official quantized MobileNets); ``--mean``/``--std``/``--bgr``/``--raw`` change that.

Labels rule: a labels file must have one label per model output. A file with exactly one label fewer
than the outputs is accepted by assuming output 0 is a "background" class (TF-slim/Coral ImageNet
models have 1001 outputs, many label files 1000 lines); the report says so. Anything else is an error.

Exit codes: 0 success, 2 bad input (one ``error: ...`` line on stderr), 130 interrupted.
Runs on Python >= 3.9 and numpy >= 1.19.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import io
import json
import math
import os
import platform
import re
import stat
import struct
import sys
import tempfile
import time
import warnings
import zipfile

try:
    import numpy as np
except ImportError as _exc:  # pragma: no cover - a device without numpy
    raise ImportError(
        "edgetl_runner needs numpy: `pip install numpy` or `sudo apt install python3-numpy`"
    ) from _exc

__all__ = [
    "RUNNER_VERSION",
    "RunnerError",
    "printable",
    "image_extensions",
    "expand_images",
    "TensorInfo",
    "OpInfo",
    "ModelInfo",
    "IOInfo",
    "Model",
    "check_tflite",
    "check_outputs",
    "path_problem",
    "symlink_loop",
    "refuse_special_output",
    "check_writable",
    "read_model_metadata",
    "classify",
    "read_model",
    "attach_metadata",
    "strip_metadata",
    "read_metadata",
    "read_standard_metadata",
    "read_labels",
    "read_labels_file",
    "match_labels",
    "prep_from_metadata",
    "load_image",
    "preprocess",
    "list_images",
    "benchmark",
    "evaluate",
    "machine_info",
    "memory_info",
    "build_parser",
    "run",
    "format_report",
    "main",
]

__version__ = "0.1.0"  # the edgetl-runner package's (and edgetl's) version
RUNNER_VERSION = "1"  # of the report format (JSON "runner.version")
LEFT_OUT_SHOWN = 5  # files left out that text reports name (JSON: all of them, and these first)
METADATA_JSON = "edgetl.json"
METADATA_LABELS = "labels.txt"
METADATA_FORMAT = "edgetl"
METADATA_FORMAT_VERSION = 1
# Used when Pillow is missing; with Pillow, every extension it can open (image_extensions()).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default: 0.25 GB of RGBA, ~9459 x 9459
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
DELEGATES = ("xnnpack", "edgetpu", "none")
INTERPRETERS = ("ai_edge_litert", "tflite_runtime", "tensorflow")
CORAL_README = "devices/coral/README.md"

MB = 1_000_000  # every size and memory figure: MB = 10^6 bytes
_MAX_METADATA_MEMBER = 16 * MB
# The whole archive: edgetl writes 2 small members, Google's models a few labels files; these caps
# keep a hostile archive (many members just under the per-member cap) far below a Pi's memory.
_MAX_METADATA_TOTAL = 32 * MB
_MAX_METADATA_MEMBERS = 64
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


class RunnerError(Exception):
    """Bad input for the runner: the message names the bad value and what to do next.

    ``main()`` prints it as one ``error: ...`` line and exits with code 2.
    """

    exit_code = 2


# C0/C1 controls, DEL, line/paragraph separators and bidi overrides: what lets a label or a file
# name move the cursor, set a terminal title or forge a line when printed.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match) -> str:
    code = ord(match.group())
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code


def printable(text) -> str:
    """``str(text)`` with control characters escaped (``\\x1b``, ``\\n``, ``\\u202e``) for a terminal.

    Text reports print every name read from a file (labels, paths, metadata) through this; JSON
    reports keep the text verbatim.
    """
    return _CONTROL.sub(_escape_char, str(text))


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def symlink_loop(path) -> bool:
    """True when ``path`` (or a folder on the way to it) is a symlink loop."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def path_problem(path, what: str, want: str = "file", missing: "str | None" = None
                 ) -> "str | None":
    """Why ``path`` is not the regular file (``want="file"``) or folder (``"folder"``) that
    ``what`` needs, in one phrase naming both; None when it is. Symlinks are followed; stat only,
    nothing is opened (a FIFO would block).

    A symlink loop is named as one: ``os.path.exists`` is False for it, as for a missing path.
    ``missing``: the phrase for a path that does not exist (default ``WHAT not found: PATH``).
    """
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        return missing if missing is not None else "%s not found: %s" % (what, name)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "%s %s is a symlink loop (it leads back to itself)" % (what, name)
        return "cannot read %s %s: %s" % (what, name, exc.strerror or exc)
    if want == "folder":
        if stat.S_ISDIR(mode):
            return None
        kind = "a file" if stat.S_ISREG(mode) else _file_kind(mode)
        return "%s %s is %s, not a folder" % (what, name, kind)
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "%s %s is a folder, not a file" % (what, name)
    return "%s %s is %s, not a regular file" % (what, name, _file_kind(mode))


def _open_regular(path, what: str):
    """Open ``path`` for reading only if it is a regular file; never blocks (FIFOs, devices).

    Raises:
        RunnerError: missing, not a regular file (named), or unreadable.
    """
    name = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(name, flags)
    except FileNotFoundError:
        raise RunnerError("%s not found: %s" % (what, name)) from None
    except IsADirectoryError:
        raise RunnerError("%s %s is a folder, not a file" % (what, name)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunnerError(path_problem(name, what)) from None
        try:
            kind = _file_kind(os.stat(name).st_mode)
        except OSError:
            kind = ""
        if kind and kind != "not a regular file":
            raise RunnerError("%s %s is %s, not a regular file" % (what, name, kind)) from None
        raise RunnerError("cannot read %s %s: %s" % (what, name, exc.strerror or exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise RunnerError("%s %s is a folder, not a file" % (what, name))
        if not stat.S_ISREG(mode):
            raise RunnerError("%s %s is %s, not a regular file" % (what, name, _file_kind(mode)))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _regular_file_problem(path) -> "str | None":
    """None for a regular file (symlinks followed), else why it is skipped; opens nothing."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "image not found: %s" % path
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "%s is a symlink loop (skipped)" % path
        return "cannot read %s: %s" % (path, exc.strerror or exc)
    if stat.S_ISREG(mode):
        return None
    return "%s is %s, not a regular file (skipped)" % (path, _file_kind(mode))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of subgraph 0.

    Attributes:
        index: tensor index in the subgraph.
        name: tensor name.
        dtype: ``int8``, ``uint8``, ``float32``, ``int32``, ``int16``, ``float16``, ``int64``, ...
        shape: dimensions (batch first for activations).
        scale: quantization scales (one per tensor or per channel); empty when not quantized.
        zero_point: quantization zero points, same length as ``scale``.
        quantized_dimension: axis of per-channel quantization.
        buffer: index of the buffer holding constant data (0: none, i.e. an activation).
        shape_signature: shape with -1 for dynamic dimensions; empty when the model has none.
    """

    index: int
    name: str
    dtype: str
    shape: list
    scale: list
    zero_point: list
    quantized_dimension: int = 0
    buffer: int = 0
    shape_signature: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One operator of subgraph 0.

    Attributes:
        index: execution position.
        op: builtin name (``CONV_2D``) or custom code (``edgetpu-custom-op``).
        inputs: tensor indices (-1: optional input left out).
        outputs: tensor indices.
        custom: True for custom operators.
        version: operator version from the operator code.
        fused_activation: ``NONE``, ``RELU``, ``RELU6``, ... for ops whose options carry one
            (convolutions, pooling, fully connected, concatenation, add/sub/mul/div); else "".
    """

    index: int
    op: str
    inputs: list
    outputs: list
    custom: bool = False
    version: int = 1
    fused_activation: str = ""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a .tflite holds, read without an interpreter.

    Attributes:
        version: schema version (3).
        description: the converter's description string.
        operator_codes: op name per operator code (``CONV_2D``, ``edgetpu-custom-op``, ...).
        tensors: subgraph 0 tensors.
        operators: subgraph 0 operators in execution order.
        inputs: subgraph 0 input tensor indices.
        outputs: subgraph 0 output tensor indices.
        metadata_names: names of the flatbuffer metadata entries (``min_runtime_version``, ...).
        num_subgraphs: number of subgraphs.
        num_buffers: number of buffers.
        min_runtime_version: the ``min_runtime_version`` metadata string, when present.
        size_bytes: size of the flatbuffer plus anything appended (bytes given to the reader).
    """

    version: int
    description: str
    operator_codes: list
    tensors: list
    operators: list
    inputs: list
    outputs: list
    metadata_names: list
    num_subgraphs: int
    num_buffers: int = 0
    min_runtime_version: str = ""
    size_bytes: int = 0

    @property
    def input_tensors(self) -> list:
        return [self.tensors[i] for i in self.inputs]

    @property
    def output_tensors(self) -> list:
        return [self.tensors[i] for i in self.outputs]

    @property
    def op_names(self) -> list:
        return [op.op for op in self.operators]

    def op_counts(self) -> dict:
        """``{op name: count}`` over subgraph 0, most frequent first."""
        counts = {}  # type: dict
        for op in self.operators:
            counts[op.op] = counts.get(op.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def is_edgetpu(self) -> bool:
        """True when the model was compiled by ``edgetpu_compiler`` (has an edgetpu-custom-op)."""
        return any(op.op == EDGETPU_CUSTOM_OP for op in self.operators)


# --------------------------------------------------------------------------------------------
# Reading the flatbuffer: LiteRT's generated schema module, guarded at the boundary
# --------------------------------------------------------------------------------------------

# What flatbuffers' generated readers raise on corrupt bytes (they check no bounds): struct.error
# past the end, TypeError from flatbuffers' range check on a negative offset, ValueError from a
# numpy view past the end. Each becomes the one-line RunnerError of _guarded().
_CORRUPT_ERRORS = (struct.error, IndexError, UnicodeDecodeError, ValueError, RecursionError,
                   OverflowError, TypeError)
_TABLE_COST = 96  # bytes charged per table visited; real files have 40+ bytes per table
_SCHEMA = []  # type: list

# Options table (a class of the generated schema) carrying each op's fused activation.
_FUSED_ACTIVATION_OPTIONS = dict(
    CONV_2D="Conv2DOptions", DEPTHWISE_CONV_2D="DepthwiseConv2DOptions",
    AVERAGE_POOL_2D="Pool2DOptions", MAX_POOL_2D="Pool2DOptions", L2_POOL_2D="Pool2DOptions",
    CONCATENATION="ConcatenationOptions", FULLY_CONNECTED="FullyConnectedOptions",
    ADD="AddOptions", SUB="SubOptions", MUL="MulOptions", DIV="DivOptions",
    TRANSPOSE_CONV="TransposeConvOptions", CONV_3D="Conv3DOptions",
    CONV_3D_TRANSPOSE="Conv3DOptions",
)


_CUSTOM_CODE = 32  # BuiltinOperator.CUSTOM
_ENUMS = {}  # type: dict


def _enum(schema, kind: str) -> dict:
    """``{value: NAME}`` of an enum of the generated schema, e.g. ``BuiltinOperator``."""
    key = (schema.__name__, kind)
    if key not in _ENUMS:
        _ENUMS[key] = {v: k for k, v in vars(getattr(schema, kind)).items() if k.isupper()}
    return _ENUMS[key]


def builtin_op_name(code: int) -> str:
    """Name of a BuiltinOperator value, e.g. 3 -> ``CONV_2D``; unknown values -> ``BUILTIN_<n>``.

    Raises:
        RunnerError: no schema module installed (see ``_schema``).
    """
    return _enum(_schema(), "BuiltinOperator").get(code, "BUILTIN_%d" % code)


class _Corrupt(Exception):
    """A check here found the flatbuffer corrupt; _guarded() turns it into a RunnerError."""


def _schema():
    """The generated TFLite schema module: LiteRT's own, else the ``tflite`` package's (PyPI, the
    same flatc output, for tflite-runtime, which ships none), else TensorFlow's.

    Raises:
        RunnerError: none is installed.
    """
    if not _SCHEMA:
        for module in ("ai_edge_litert.schema_py_generated", "tflite",
                       "tensorflow.lite.python.schema_py_generated"):
            try:
                _SCHEMA.append(importlib.import_module(module))
                break
            except ImportError:
                pass
        else:
            raise RunnerError(
                "reading a .tflite needs a TFLite schema module: `pip install ai-edge-litert`, or "
                "beside tflite-runtime `pip install tflite flatbuffers`"
            )
    return _SCHEMA[0]


def _guarded(read, name: str, size: int):
    """``read()``, with any sign of a corrupt or truncated flatbuffer as one RunnerError line."""
    try:
        return read()
    except _Corrupt as exc:
        reason = str(exc)
    except _CORRUPT_ERRORS as exc:
        text = (str(exc).splitlines() or [""])[0]
        where = re.search(r"at offset (\d+)", text)  # struct's message names the offset
        if isinstance(exc, struct.error) or "buffer is smaller" in text:  # numpy's
            reason = "a field%s points past the end" % (" at offset %s" % where[1] if where else "")
        elif isinstance(exc, TypeError):  # flatbuffers' own range check on an offset
            reason = "an offset points outside the file (%s)" % text[:80]
        else:
            reason = "%s: %s" % (type(exc).__name__, text[:120])
    raise RunnerError(
        "%s is truncated or corrupt (%s; the file has %d bytes): re-export or re-copy the model"
        % (name, reason, size)
    )


class _Budget:
    """Bounds the work of reading one flatbuffer before any loop runs.

    A vector's declared length must fit in the buffer, and the bytes read in all stay under 4x the
    buffer: a real file is read about once, while corrupt offsets that all point at one large
    vector would otherwise cost O(n^2).
    """

    def __init__(self, size: int):
        self.size = size
        self.left = 4 * size + 65536

    def _charge(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise _Corrupt("its tables reference more data than the file holds")

    def tables(self, count: int, what: str) -> range:
        """Indices of a vector of ``count`` tables (4-byte offsets), checked to fit the buffer."""
        if count * 4 > self.size:
            raise _Corrupt("%s claims %d elements, more than the file holds" % (what, count))
        self._charge(count * _TABLE_COST)
        return range(count)

    def values(self, array) -> list:
        """A generated ``...AsNumpy()`` vector (a view, bounds-checked by numpy) as a list."""
        if isinstance(array, int):  # the generated readers' "absent"
            return []
        self._charge(array.nbytes)
        return array.tolist()

    def text(self, raw) -> str:
        """A generated string (bytes, copied by flatbuffers up to the end of the buffer)."""
        self._charge(len(raw or b""))
        return raw.decode("utf-8", "replace") if raw else ""


def _parse_model(data: bytes, name: str, schema=None) -> ModelInfo:
    """Parse ``data`` (identifier already checked) with ``schema`` (default :func:`_schema`).

    Raises:
        RunnerError: truncated or corrupt, or no schema module installed.
    """
    schema = schema or _schema()
    return _guarded(lambda: _read_model_tables(data, schema), name, len(data))


def _read_model_tables(data: bytes, schema) -> ModelInfo:
    n = len(data)
    budget = _Budget(n)
    model = schema.Model.GetRootAs(data, 0)
    op_names, types = _enum(schema, "BuiltinOperator"), _enum(schema, "TensorType")
    activations = _enum(schema, "ActivationFunctionType")
    codes = []
    versions = []
    for j in budget.tables(model.OperatorCodesLength(), "operator codes"):
        t = model.OperatorCodes(j)
        code = max(t.DeprecatedBuiltinCode(), t.BuiltinCode())
        if code == _CUSTOM_CODE:
            codes.append(budget.text(t.CustomCode()) or "CUSTOM")
        else:
            codes.append(op_names.get(code, "BUILTIN_%d" % code))
        versions.append(t.Version())

    num_subgraphs = len(budget.tables(model.SubgraphsLength(), "subgraphs"))
    tensors = []
    operators = []
    inputs = []  # type: list
    outputs = []  # type: list
    if num_subgraphs:
        sg = model.Subgraphs(0)
        for i in budget.tables(sg.TensorsLength(), "tensors"):
            t = sg.Tensors(i)
            dtype = types.get(t.Type(), "unknown(%d)" % t.Type()).lower()
            scale, zero_point, qdim = [], [], 0  # type: list, list, int
            q = t.Quantization()
            if q is not None:
                scale = budget.values(q.ScaleAsNumpy())
                zero_point = budget.values(q.ZeroPointAsNumpy())
                qdim = q.QuantizedDimension()
            tensors.append(
                TensorInfo(
                    index=i,
                    name=budget.text(t.Name()),
                    dtype=dtype,
                    shape=budget.values(t.ShapeAsNumpy()),
                    scale=[float(s) for s in scale],
                    zero_point=[int(z) for z in zero_point],
                    quantized_dimension=qdim,
                    buffer=t.Buffer(),
                    shape_signature=budget.values(t.ShapeSignatureAsNumpy()),
                )
            )
        n_tensors = len(tensors)
        builtin_names = set(op_names.values())

        def check_indices(indices: list, what: str, optional: bool) -> list:
            for k in indices:
                if not (0 <= k < n_tensors or (optional and k == -1)):
                    raise _Corrupt("%s refers to tensor %d of %d" % (what, k, n_tensors))
            return indices

        inputs = check_indices(budget.values(sg.InputsAsNumpy()), "subgraph input", False)
        outputs = check_indices(budget.values(sg.OutputsAsNumpy()), "subgraph output", False)
        for i in budget.tables(sg.OperatorsLength(), "operators"):
            o = sg.Operators(i)
            opcode = o.OpcodeIndex()
            if opcode >= len(codes):
                raise _Corrupt("operator %d uses operator code %d of %d" % (i, opcode, len(codes)))
            fused = ""
            options_class = _FUSED_ACTIVATION_OPTIONS.get(codes[opcode])
            if options_class is not None:
                table = o.BuiltinOptions()
                code = 0
                if table is not None:
                    options = getattr(schema, options_class)()
                    options.Init(table.Bytes, table.Pos)
                    code = options.FusedActivationFunction()
                fused = activations.get(code, "ACTIVATION_%d" % code)
            operators.append(
                OpInfo(
                    index=i,
                    op=codes[opcode],
                    inputs=check_indices(budget.values(o.InputsAsNumpy()), "operator", True),
                    outputs=check_indices(budget.values(o.OutputsAsNumpy()), "operator", True),
                    custom=codes[opcode] not in builtin_names,
                    version=versions[opcode],
                    fused_activation=fused,
                )
            )

    # Buffers: every data vector (and >2 GB style offset/size) must lie inside the file; this is
    # what catches a truncated copy, whose weights run past the end.
    num_buffers = model.BuffersLength()
    for j in budget.tables(num_buffers, "buffers"):
        b = model.Buffers(j)
        try:
            b.DataAsNumpy()  # a view, not a copy: numpy checks it lies inside the bytes
        except ValueError:
            raise _Corrupt("the data of buffer %d runs past the end" % j) from None
        offset, size = b.Offset(), b.Size()
        if offset > 1 and offset + size > n:
            raise _Corrupt("a buffer at offset %d of %d bytes lies past the end" % (offset, size))

    # What the interpreter dereferences without checking (it segfaults on a model without
    # subgraphs, found by tests/test_fuzz_tflite.py): refuse here, in one line.
    if not num_subgraphs:
        raise _Corrupt("it has no subgraph")
    metadata_names = []
    min_runtime = ""
    for j in budget.tables(model.MetadataLength(), "metadata"):
        m = model.Metadata(j)
        meta_name = budget.text(m.Name())
        metadata_names.append(meta_name)
        index = m.Buffer()
        if meta_name == "min_runtime_version" and index < num_buffers:
            raw = model.Buffers(index).DataAsNumpy()
            if not isinstance(raw, int):
                min_runtime = raw[:64].tobytes().split(b"\0", 1)[0].decode("ascii", "replace")

    return ModelInfo(
        version=model.Version(),
        description=budget.text(model.Description()),
        operator_codes=codes,
        tensors=tensors,
        operators=operators,
        inputs=list(inputs),
        outputs=list(outputs),
        metadata_names=metadata_names,
        num_subgraphs=num_subgraphs,
        num_buffers=num_buffers,
        min_runtime_version=min_runtime,
        size_bytes=n,
    )


def _read_file(path, what: str = "model file") -> bytes:
    path = os.fspath(path)
    f = _open_regular(path, what)
    try:
        with f:
            return f.read()
    except OSError as exc:
        raise RunnerError("cannot read %s %s: %s" % (what, path, exc.strerror or exc)) from None


def _check_identifier(data: bytes, name: str) -> None:
    if len(data) < 16:
        raise RunnerError(
            "%s is too small to be a TFLite model (%d bytes): re-export or re-copy it"
            % (name, len(data))
        )
    if data[4:8] != b"TFL3":
        hint = ""
        if data[:4] == b"PK\x03\x04":
            hint = " (it is a zip archive)"
        elif data[:8] == b"\x89HDF\r\n\x1a\n":
            hint = " (it is a Keras .h5 file: export it to .tflite first)"
        raise RunnerError(
            "%s is not a TFLite model (no TFL3 identifier)%s: pass a .tflite file" % (name, hint)
        )


def _model_bytes(path_or_bytes) -> "tuple[bytes, str]":
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        name = "the model bytes"
    else:
        name = os.fspath(path_or_bytes)
        data = _read_file(name)
    _check_identifier(data, name)
    return data, name


def check_tflite(path) -> bytes:
    """Read a .tflite file and check it is a complete TFLite flatbuffer.

    Args:
        path: the model file.

    Returns:
        The file's bytes.

    Raises:
        RunnerError: missing, not a file, too small, no ``TFL3`` identifier, or truncated/corrupt.
    """
    data, name = _model_bytes(path)
    _parse_model(data, name)
    return data


def read_model(path_or_bytes) -> ModelInfo:
    """Read a .tflite's ops, tensors and quantization with the generated schema (no interpreter).

    Args:
        path_or_bytes: a path or the model bytes (an appended metadata archive is ignored).

    Raises:
        RunnerError: not a TFLite model, truncated or corrupt.
    """
    data, name = _model_bytes(path_or_bytes)
    return _parse_model(data, name)


# --------------------------------------------------------------------------------------------
# Metadata: a zip archive appended to the .tflite
# --------------------------------------------------------------------------------------------


def _has_eocd(data: bytes) -> bool:
    """True when the bytes end with a zip end-of-central-directory record (+ its comment)."""
    n = len(data)
    lo = max(8, n - 22 - 65535)
    pos = data.rfind(b"PK\x05\x06", lo)
    while pos >= 0:
        if pos + 22 <= n and pos + 22 + struct.unpack_from("<H", data, pos + 20)[0] == n:
            return True
        pos = data.rfind(b"PK\x05\x06", lo, pos)
    return False


def _corrupt_archive(name: str, exc) -> RunnerError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return RunnerError(
        "%s has a corrupt metadata archive appended (%s): re-export the model" % (name, reason)
    )


def _appended_zip(data: bytes, name: str):
    """``(start, ZipFile)`` of the zip appended to a model, or ``(len(data), None)``.

    Both layouts are read: member offsets counted from the start of the file (the TFLite Support
    convention, which this runner writes) and from the start of the archive (plain concatenation).
    """
    if len(data) < 8 + 22 or not _has_eocd(data):
        return len(data), None
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
        if not infos:
            raise ValueError("the archive is empty")
        start = min(info.header_offset for info in infos)
    except Exception as exc:  # zipfile raises many types on corrupt input
        raise _corrupt_archive(name, exc) from None
    if start < 8 or data[start : start + 4] != b"PK\x03\x04":
        raise _corrupt_archive(name, "no local file header at offset %d" % start)
    return start, zf


def strip_metadata(model_bytes: bytes) -> bytes:
    """The model without any appended zip archive (edgetl metadata or TFLite associated files)."""
    data, name = _model_bytes(model_bytes)
    return data[: _appended_zip(data, name)[0]]


def _zip_member(info_name: str, payload: bytes) -> "tuple[zipfile.ZipInfo, bytes]":
    info = zipfile.ZipInfo(info_name, date_time=_ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED  # stored: byte-identical on every zlib version
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info, payload


def attach_metadata(model_bytes: bytes, metadata: dict, labels: list) -> bytes:
    """Append edgetl metadata (``edgetl.json`` + ``labels.txt`` in a zip) to a .tflite.

    Deterministic: fixed zip timestamps, sorted JSON keys, stored (uncompressed) members. Any zip
    already appended is removed first, so attaching twice gives the same bytes as attaching once.

    Args:
        model_bytes: the .tflite bytes.
        metadata: the metadata dict (``format``/``format_version`` are filled in when missing).
        labels: one label per model output.

    Returns:
        The model bytes with the archive appended.

    Raises:
        RunnerError: not a TFLite model, metadata not JSON-serialisable, a label with a newline.
    """
    base = strip_metadata(model_bytes)
    labels = [str(label) for label in labels]
    for label in labels:
        if "\n" in label or "\r" in label:
            raise RunnerError("label %r contains a line break: labels must be single lines" % label)
    meta = dict(metadata)
    meta.setdefault("format", METADATA_FORMAT)
    meta.setdefault("format_version", METADATA_FORMAT_VERSION)
    meta["labels"] = labels
    try:
        text = json.dumps(meta, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RunnerError("metadata cannot be written as JSON: %s" % exc) from None
    members = [
        _zip_member(METADATA_JSON, (text + "\n").encode("utf-8")),
        _zip_member(METADATA_LABELS, "".join(label + "\n" for label in labels).encode("utf-8")),
    ]
    # Written after the model in one buffer, so member offsets count from the start of the file
    # as TFLite Support's MetadataPopulator writes them (``unzip -l model.tflite`` works).
    buf = io.BytesIO()
    buf.write(base)
    with zipfile.ZipFile(buf, "w") as zf:
        for info, payload in members:
            zf.writestr(info, payload)
    return buf.getvalue()


def _read_zip_members(path_or_bytes):
    """``(members, name)``: the .json/.txt members of the archive appended to a model (or None).

    Bounded: at most ``_MAX_METADATA_MEMBERS`` entries, ``_MAX_METADATA_MEMBER`` bytes per member
    and ``_MAX_METADATA_TOTAL`` bytes in all, whatever the archive claims.
    """
    data, name = _model_bytes(path_or_bytes)
    start, zf = _appended_zip(data, name)
    if zf is None:
        return None, name
    members = {}
    total = 0
    try:
        with zf:
            infos = zf.infolist()
            if len(infos) > _MAX_METADATA_MEMBERS:
                raise ValueError(
                    "%d members, more than the %d a model's metadata may have"
                    % (len(infos), _MAX_METADATA_MEMBERS)
                )
            wanted = [i for i in infos if i.filename.lower().endswith((".json", ".txt"))]
            declared = sum(max(0, i.file_size) for i in wanted)
            if declared > _MAX_METADATA_TOTAL:
                raise ValueError(
                    "its text members declare %d bytes, more than the %d MB cap"
                    % (declared, _MAX_METADATA_TOTAL // MB)
                )
            for info in wanted:
                if info.file_size > _MAX_METADATA_MEMBER:
                    raise ValueError(
                        "%s is implausibly large (over the %d MB cap per member)"
                        % (info.filename, _MAX_METADATA_MEMBER // MB)
                    )
                limit = min(_MAX_METADATA_MEMBER, _MAX_METADATA_TOTAL - total)
                with zf.open(info) as f:
                    payload = f.read(limit + 1)
                if len(payload) > limit:  # the header lied about the size
                    raise ValueError(
                        "%s holds more than its header says (caps: %d MB per member, %d MB "
                        "in all)" % (info.filename, _MAX_METADATA_MEMBER // MB,
                                      _MAX_METADATA_TOTAL // MB)
                    )
                total += len(payload)
                members[info.filename] = payload
    except Exception as exc:  # zipfile raises many types on corrupt input
        raise _corrupt_archive(name, exc) from None
    return members, name


def _decode_labels(payload: bytes, name: str) -> list:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise RunnerError("%s: labels are not UTF-8 text: re-export the model" % name) from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _metadata_from_members(members, name: str) -> "dict | None":
    if not members or METADATA_JSON not in members:
        return None
    try:
        meta = json.loads(members[METADATA_JSON].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RunnerError("%s: metadata %s is not valid JSON" % (name, METADATA_JSON)) from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise RunnerError("%s: %s is not edgetl metadata (no format: edgetl)" % (name, METADATA_JSON))
    fv = meta.get("format_version")
    if not isinstance(fv, int) or fv > METADATA_FORMAT_VERSION:
        raise RunnerError(
            "%s: metadata format_version %r is newer than this runner understands (%d): "
            "update edgetl_runner.py" % (name, fv, METADATA_FORMAT_VERSION)
        )
    if METADATA_LABELS in members:
        meta["labels"] = _decode_labels(members[METADATA_LABELS], name)
    labels = meta.get("labels")
    if labels is not None and (
        not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
    ):
        raise RunnerError("%s: metadata labels are not a list of strings" % name)
    return meta


def _metadata_entry(data: bytes, name: str, key: str) -> "bytes | None":
    """The buffer bytes of the model's flatbuffer metadata entry ``key``, or None (unguarded)."""
    model = _schema().Model.GetRootAs(data, 0)
    budget = _Budget(len(data))
    for j in budget.tables(model.MetadataLength(), "metadata"):
        m = model.Metadata(j)
        if budget.text(m.Name()) == key:
            index, count = m.Buffer(), model.BuffersLength()
            if index >= count:
                raise RunnerError("%s: %s points at buffer %d of %d: re-export the model"
                                  % (name, key, index, count))
            raw = model.Buffers(index).DataAsNumpy()
            return b"" if isinstance(raw, int) else raw.tobytes()
    return None


def _read_metadata_tables(blob: bytes) -> dict:
    """The few fields of metadata_schema.fbs (MediaPipe / TFLite Support, identifier M001) that an
    image classifier needs, read with the flatbuffers runtime: no maintained package ships that
    schema for a device. Fields are numbered (vtable slots) in the schema's declaration order."""
    from flatbuffers import number_types as N
    from flatbuffers.table import Table

    budget = _Budget(len(blob))

    def field(tab, slot):  # offset of the field in its table, 0 when absent
        return tab.Offset(4 + 2 * slot)

    def string(tab, slot):
        return budget.text(tab.String(tab.Pos + field(tab, slot))) if field(tab, slot) else ""

    def scalar(tab, slot, flags):
        return tab.Get(flags, tab.Pos + field(tab, slot)) if field(tab, slot) else 0

    def floats(tab, slot):
        o = field(tab, slot)
        return budget.values(tab.GetVectorAsNumpy(N.Float32Flags, o)) if o else []

    def table(tab, slot):
        o = field(tab, slot)
        return Table(tab.Bytes, tab.Indirect(tab.Pos + o)) if o else None

    def tables(tab, slot, what):  # one at a time: callers stop at the first that fits
        o = field(tab, slot)
        for i in budget.tables(tab.VectorLen(o), what) if o else ():
            yield Table(tab.Bytes, tab.Indirect(tab.Vector(o) + 4 * i))

    root = Table(blob, struct.unpack_from("<I", blob, 0)[0])
    out = {
        "name": string(root, 0), "description": string(root, 1), "version": string(root, 2),
        "author": string(root, 4), "min_parser_version": string(root, 7),
        "mean": None, "std": None, "input_min": None, "input_max": None, "color_space": None,
        "labels_file": None, "labels": None,
    }
    subgraph = next(tables(root, 3, "subgraph metadata"), None)
    if subgraph is None:
        return out
    tensor = next(tables(subgraph, 2, "input tensor metadata"), None)
    if tensor is not None:
        content = table(tensor, 3)
        if content is not None and scalar(content, 0, N.Uint8Flags) == 2:  # ImageProperties
            props = table(content, 1)
            if props is not None:
                space = scalar(props, 0, N.Int8Flags)
                out["color_space"] = {1: "RGB", 2: "GRAYSCALE"}.get(space, "UNKNOWN")
        for unit in tables(tensor, 4, "process units"):
            options = table(unit, 1)
            if scalar(unit, 0, N.Uint8Flags) == 1 and options is not None:  # Normalization
                out["mean"], out["std"] = floats(options, 0), floats(options, 1)
                break
        stats = table(tensor, 5)
        if stats is not None:
            out["input_max"], out["input_min"] = floats(stats, 0) or None, floats(stats, 1) or None
    output = next(tables(subgraph, 3, "output tensor metadata"), None)
    for f in tables(output, 6, "associated files") if output is not None else ():
        if scalar(f, 2, N.Int8Flags) == 2:  # TENSOR_AXIS_LABELS (the first: default locale)
            out["labels_file"] = string(f, 0)
            break
    return out


def read_standard_metadata(path_or_bytes, with_labels: bool = True) -> "dict | None":
    """The standard TFLite metadata (``TFLITE_METADATA``, as MediaPipe and Model Maker write it).

    Reads the fields an image classifier needs: name, description, version, author; the first
    input's ``NormalizationOptions`` and value range; the first output's ``TENSOR_AXIS_LABELS``
    file, with its labels when that file is in the appended archive (and ``with_labels``: a
    caller that has read the archive already passes False).

    Returns:
        ``{"name", "description", "version", "author", "min_parser_version", "mean", "std",
        "input_min", "input_max", "color_space", "labels_file", "labels"}`` (``mean``/``std``/
        ``labels`` None when absent), or None when the model has no standard metadata.

    Raises:
        RunnerError: not a TFLite model, or standard metadata present but corrupt.
    """
    data, name = _model_bytes(path_or_bytes)
    blob = _guarded(lambda: _metadata_entry(data, name, "TFLITE_METADATA"), name, len(data))
    if blob is None:
        return None
    what = "%s TFLITE_METADATA" % name
    if len(blob) < 8 or blob[4:8] != b"M001":
        raise RunnerError("%s is not a metadata flatbuffer (no M001 identifier)" % what)
    out = _guarded(lambda: _read_metadata_tables(blob), what, len(blob))
    if out["labels_file"] and with_labels:
        members, _ = _read_zip_members(data)
        if members and out["labels_file"] in members:
            out["labels"] = _decode_labels(members[out["labels_file"]], name)
    return out


def _labels_from_members(members, name: str, meta: "dict | None"):
    if not members:
        return None, None
    if meta is not None:
        return meta.get("labels"), "edgetl metadata"
    texts = sorted(k for k in members if k.lower().endswith(".txt"))
    named = [k for k in texts if "label" in k.lower()]
    pick = named if len(named) == 1 else texts
    if len(pick) != 1:
        return None, None
    return _decode_labels(members[pick[0]], name), "associated file " + pick[0]


def read_model_metadata(path_or_bytes) -> "tuple[dict | None, list | None, str | None]":
    """``(metadata, labels, labels_source)`` of a model, reading its archive once.

    Labels are kept verbatim (control characters included); print them with :func:`printable`.

    Raises:
        RunnerError: not a TFLite model, or metadata present but corrupt or over the caps.
    """
    members, name = _read_zip_members(path_or_bytes)
    meta = _metadata_from_members(members, name)
    labels, source = _labels_from_members(members, name, meta)
    return meta, labels, source


def read_metadata(path_or_bytes) -> "dict | None":
    """The edgetl metadata dict of a model, with ``labels``; None when it has none.

    Raises:
        RunnerError: not a TFLite model, or metadata present but corrupt.
    """
    members, name = _read_zip_members(path_or_bytes)
    return _metadata_from_members(members, name)


def read_labels(path_or_bytes) -> "list | None":
    """The labels a model carries, or None.

    edgetl metadata first; otherwise a TFLite Support associated labels file (the only ``.txt``
    member, or the one whose name contains ``label``), as in Google's official models.
    """
    return read_model_metadata(path_or_bytes)[1]


def _labels_and_source(path_or_bytes):
    return read_model_metadata(path_or_bytes)[1:]


def read_labels_file(path) -> list:
    """Read a labels file: one label per line, or Coral's ``<index> <label>`` lines.

    Trailing blank lines are ignored. When every line starts with a number followed by a space,
    tab or colon, the number is the output index (gaps are filled with ``#<index>``).
    """
    data = _read_file(path, "labels file")
    name = os.fspath(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RunnerError("labels file %s is not UTF-8 text" % name) from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise RunnerError("labels file %s is empty: write one label per line" % name)
    indexed = {}
    for line in lines:
        head, sep, rest = line.replace(":", " ", 1).partition(" ")
        if not (sep and head.isdigit() and rest.strip()) or int(head) in indexed:
            indexed = {}
            break
        indexed[int(head)] = rest.strip()
    if indexed and len(indexed) == len(lines) and max(indexed) < 4 * len(lines) + 16:
        return [indexed.get(i, "#%d" % i) for i in range(max(indexed) + 1)]
    return lines


def match_labels(labels: list, num_outputs: int, source: str) -> "tuple[list, str]":
    """Apply the labels rule: exact count, or one fewer with output 0 taken as background.

    A model with one output is a sigmoid binary classifier: it takes two labels, the first for
    p < 0.5 and the second for p >= 0.5.

    Returns:
        ``(labels, note)``; the note is empty unless a background label was assumed or the model
        is a single-output binary classifier.
    """
    if num_outputs == 1:
        if len(labels) == 2:
            return list(labels), (
                "single-output (sigmoid) binary classifier: p >= 0.5 -> %s, else %s"
                % (printable(labels[1]), printable(labels[0]))
            )
        raise RunnerError(
            "%s has %d label(s) but the model has a single (sigmoid) output: give two labels, "
            "the first for p < 0.5 and the second for p >= 0.5" % (source, len(labels))
        )
    if len(labels) == num_outputs:
        return list(labels), ""
    if len(labels) == num_outputs - 1 and num_outputs > 1:
        return ["background"] + list(labels), (
            "%s has %d labels for %d outputs: output 0 is taken as background"
            % (source, len(labels), num_outputs)
        )
    raise RunnerError(
        "%s has %d labels but the model has %d outputs: give one label per output "
        "(or one fewer when output 0 is a background class)" % (source, len(labels), num_outputs)
    )


def prep_from_metadata(metadata: dict) -> dict:
    """The preprocessing dict (mean, std, channel_order, resize) from edgetl metadata."""
    inp = metadata.get("input") or {}
    if not isinstance(inp, dict):
        raise RunnerError("model metadata 'input' is not a mapping: re-export the model")
    prep = {
        "mean": inp.get("mean", [0.0, 0.0, 0.0]),
        "std": inp.get("std", [1.0, 1.0, 1.0]),
        "channel_order": inp.get("channel_order", "RGB"),
        "resize": inp.get("resize", "bilinear"),
    }
    _check_prep(prep, "model metadata")
    return prep


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

_RESAMPLE_NAMES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise RunnerError(
            "decoding images needs Pillow: `pip install pillow` or `sudo apt install python3-pil`"
        ) from None
    return Image, ImageOps


def _to_channels(img, Image, channels: int = 3):
    """Any Pillow mode -> RGB (3) or L (1, greyscale); 16/32-bit modes scaled to 8 bits."""
    img = _to_rgb(img, Image, grey=channels == 1)
    if channels == 1 and img.mode != "L":
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = img.convert("L")  # ITU-R 601-2 luma, Pillow's (and Keras') grey conversion
    return img


def _to_rgb(img, Image, grey: bool = False):
    """Any Pillow mode -> RGB; 16-bit and 32-bit modes are scaled to 8 bits, not clipped."""
    np_mod = np
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np_mod.asarray(img)
        if mode.startswith("I;16") or mode == "I":
            # 16-bit data (PNG/TIFF); "I" images outside 0..65535 are clipped to it.
            a = np_mod.clip(a.astype(np_mod.float64), 0, 65535) * (255.0 / 65535.0)
        else:
            a = np_mod.nan_to_num(a.astype(np_mod.float64))
            a = a * 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else a
            a = np_mod.clip(a, 0, 255)
        grey_img = Image.fromarray(np_mod.round(a).astype(np_mod.uint8), "L")
        return grey_img if grey else grey_img.convert("RGB")
    if grey and mode in ("L", "LA", "1"):
        return img.convert("L")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(
    path, size: "tuple[int, int]", resample: str = "bilinear", channels: int = 3
) -> np.ndarray:
    """Decode one image to uint8 pixels of shape ``(height, width, channels)``.

    EXIF orientation is applied, the first frame of an animation is used, any mode becomes RGB
    (``channels`` 3) or greyscale L (``channels`` 1; colour images converted with the ITU-R
    601-2 luma), 16-bit scaled, not clipped, and the image is resized with Pillow
    (``reducing_gap=None``) to ``size`` (any H x W). Only a regular file is opened (a FIFO or a
    device is refused, never read). Training and the device both call this, so they see
    identical pixels.

    Args:
        path: image file.
        size: ``(height, width)``.
        resample: ``bilinear`` (default), ``nearest``, ``bicubic``, ``lanczos``, ``box``, ``hamming``.
        channels: 3 (RGB) or 1 (greyscale).

    Raises:
        RunnerError: unreadable, not a regular file, truncated, not an image, or a
            decompression bomb.
    """
    Image, ImageOps = _pil()
    height, width = int(size[0]), int(size[1])
    if resample not in _RESAMPLE_NAMES:
        raise RunnerError(
            "unknown resize method %r: use one of %s" % (resample, ", ".join(_RESAMPLE_NAMES))
        )
    filters = getattr(Image, "Resampling", Image)
    method = getattr(filters, resample.upper())
    if channels not in (1, 3):
        raise RunnerError("channels must be 1 or 3, got %r" % (channels,))
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    name = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_regular(name, "image") as f, Image.open(f) as img:
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_channels(img, Image, channels)
                if img.size != (width, height):
                    img = img.resize((width, height), method, reducing_gap=None)
                pixels = np.asarray(img, dtype=np.uint8)
                if pixels.ndim == 2:
                    pixels = pixels[:, :, None]
    except RunnerError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RunnerError(
            "%s is too large to decode safely (over %d pixels): resize it first"
            % (name, MAX_IMAGE_PIXELS)
        ) from None
    except FileNotFoundError:
        raise RunnerError("image not found: %s" % name) from None
    except MemoryError:
        raise RunnerError("%s is too large to decode in memory" % name) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, Image.UnidentifiedImageError):  # its text names a file object
            empty = os.path.isfile(name) and os.path.getsize(name) == 0
            reason = "the file is empty (0 bytes)" if empty else "not an image Pillow can decode"
        raise RunnerError("cannot read image %s: %s" % (name, reason)) from None
    if pixels.shape != (height, width, channels):
        raise RunnerError("cannot read image %s: decoded to shape %s" % (name, pixels.shape))
    return pixels


# Upper bounds of the counting flags: a million timed runs is days on a Pi; more threads or a
# bigger decode batch than these only exhaust the machine (the interpreter takes a C int).
MAX_RUNS = 1_000_000
MAX_THREADS = 1024
MAX_BATCH = 4096
# Bytes of images decoded at once by evaluate() (--data): bounds memory whatever the input size.
DECODE_BUDGET = 256 * 1024 * 1024


def _check_prep(prep: dict, source: str) -> None:
    for key in ("mean", "std"):
        values = prep.get(key)
        if values is None:
            continue
        try:
            arr = np.asarray(values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise RunnerError("%s: %s %r is not a list of numbers" % (source, key, values)) from None
        if arr.size not in (1, 3) or not np.all(np.isfinite(arr)):
            raise RunnerError(
                "%s: %s %r must be 1 or 3 finite numbers" % (source, key, values)
            )
        if key == "std" and np.any(arr == 0):
            raise RunnerError("%s: std %r contains 0" % (source, values))
    order = str(prep.get("channel_order", "RGB")).upper()
    if order not in ("RGB", "BGR"):
        raise RunnerError("%s: channel_order %r must be RGB or BGR" % (source, order))
    resize = prep.get("resize", "bilinear")
    if resize not in _RESAMPLE_NAMES:
        raise RunnerError(
            "%s: resize %r is not one of %s" % (source, resize, ", ".join(_RESAMPLE_NAMES))
        )


def preprocess(pixels_uint8: np.ndarray, prep: "dict | None") -> np.ndarray:
    """Pixels -> model input floats: optional RGB->BGR, then ``(x - mean) / std`` per channel.

    Args:
        pixels_uint8: ``(h, w, c)`` or ``(n, h, w, c)`` pixels, ``c`` 3 (RGB) or 1 (greyscale).
        prep: ``{"mean": [...], "std": [...], "channel_order": "RGB"|"BGR"}`` (mean/std in the final
            channel order); None means raw 0..255 floats. For greyscale pixels, 3 equal values
            count as one; BGR changes nothing.

    Returns:
        float32 array of the same shape.

    Raises:
        RunnerError: a bad shape, or 3 different mean/std values for greyscale pixels.
    """
    x = np.asarray(pixels_uint8)
    if x.ndim not in (3, 4) or x.shape[-1] not in (1, 3):
        raise RunnerError(
            "expected pixels of shape (h, w, 3|1) or (n, h, w, 3|1), got %s" % (x.shape,)
        )
    x = x.astype(np.float32)
    if not prep:
        return x
    _check_prep(prep, "preprocessing")
    if str(prep.get("channel_order", "RGB")).upper() == "BGR" and x.shape[-1] == 3:
        x = x[..., ::-1]
    mean = np.asarray(prep.get("mean", [0.0]), dtype=np.float32).reshape(-1)
    std = np.asarray(prep.get("std", [1.0]), dtype=np.float32).reshape(-1)
    if x.shape[-1] == 1:
        for key, arr in (("mean", mean), ("std", std)):
            if arr.size == 3 and not np.all(arr == arr[0]):
                raise RunnerError(
                    "%s %s has 3 different values but the model input has 1 channel "
                    "(greyscale): give one value" % (key, [float(v) for v in arr])
                )
        mean, std = mean[:1], std[:1]
    return ((x - mean) / std).astype(np.float32)


_NOT_IMAGE_FORMATS = ("EPS", "PDF")  # EPS decoding runs Ghostscript on the file: never


def image_extensions() -> tuple:
    """Every file extension Pillow can decode here (``.jpg .png .webp .tif ...``), lower case.

    Without Pillow: ``IMAGE_EXTENSIONS``.
    """
    try:
        from PIL import Image
    except ImportError:
        return IMAGE_EXTENSIONS
    Image.init()
    exts = {
        ext.lower()
        for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and fmt not in _NOT_IMAGE_FORMATS
    }
    return tuple(sorted(exts | set(IMAGE_EXTENSIONS)))


def _not_image_reason(path: str) -> str:
    ext = os.path.splitext(path)[1].lower() or "no extension"
    return "%s: not an image file (%s is not a format Pillow decodes)" % (path, ext)


def expand_images(paths: list) -> "tuple[list, list]":
    """Image files from a list of files and folders (a folder: its images, one level deep).

    Returns:
        ``(files, skipped)``: files in the order given (a folder's sorted), and ``(path, reason)``
        for what was left out: missing paths, non-regular files (FIFOs, devices, sockets), files
        of a format Pillow does not decode, and sub-folders (not searched).
    """
    exts = None
    files, skipped = [], []
    for p in paths:
        p = os.fspath(p)
        if not os.path.isdir(p):
            problem = _regular_file_problem(p)
            if problem:
                skipped.append((p, problem))
            else:
                files.append(p)
            continue
        exts = exts or image_extensions()
        try:
            entries = sorted(os.listdir(p))
        except OSError as exc:
            skipped.append((p, "cannot list folder %s: %s" % (p, exc.strerror or exc)))
            continue
        for entry in entries:
            if entry.startswith("."):
                continue
            full = os.path.join(p, entry)
            if os.path.isdir(full):
                skipped.append((full, "%s is a sub-folder (folders are read one level deep)" % full))
                continue
            problem = _regular_file_problem(full)
            if problem:
                skipped.append((full, problem))
            elif not entry.lower().endswith(exts):
                skipped.append((full, _not_image_reason(full)))
            else:
                files.append(full)
    return files, skipped


def list_images(folder, labels: "list | None" = None):
    """Find ``folder/<class>/**/<image>`` files.

    Args:
        folder: one sub-folder per class; images are any format Pillow decodes
            (:func:`image_extensions`: JPEG, PNG, WebP, TIFF, BMP, GIF, ...; any case).
        labels: the model's labels; sub-folder names are then looked up in it (exact text, then
            case-insensitive, then the text before the first comma, then a plain output index,
            the last only beside folders named after labels: folders that match no label by
            name are refused, never mapped to outputs by their number alone).

    Returns:
        ``(items, class_names, skipped)``: ``items`` is a sorted list of ``(path, class_index)``,
        ``class_names`` the labels (or the sorted folder names), ``skipped`` a list of
        ``(path, reason)`` for files left out (not an image format, not a regular file).

    Raises:
        RunnerError: folder missing or without images, or a folder name not among the labels.
    """
    root = os.fspath(folder)
    problem = path_problem(root, "data folder", "folder")
    if problem:
        raise RunnerError(problem + "; give a folder with one sub-folder of images per class")
    try:
        entries = sorted(os.listdir(root))
    except OSError as exc:
        raise RunnerError("cannot list data folder %s: %s" % (root, exc.strerror or exc)) from None
    skipped = []
    class_dirs = []
    for entry in entries:
        if entry.startswith("."):
            continue
        full = os.path.join(root, entry)
        if os.path.isdir(full):
            class_dirs.append(entry)
        else:
            skipped.append((full, "%s is not in a class sub-folder" % full))
    if not class_dirs:
        raise RunnerError(
            "data folder %s has no class sub-folders: put each class's images in a sub-folder "
            "named after the class" % root
        )

    if labels is None:
        class_names = list(class_dirs)
        index_of = {name: i for i, name in enumerate(class_names)}
    else:
        class_names = list(labels)
        index_of, unknown = _folder_label_indices(class_dirs, class_names)
        if not index_of:
            shown = ", ".join(repr(u) for u in class_dirs[:5])
            more = " and %d more" % (len(class_dirs) - 5) if len(class_dirs) > 5 else ""
            first = ", ".join(repr(x) for x in class_names[:5])
            raise RunnerError(
                "none of the sub-folders of %s (%s%s) matches a label of the model (%d labels: "
                "%s%s): name each sub-folder after the label of its class"
                % (root, shown, more, len(class_names), first,
                   ", ..." if len(class_names) > 5 else "")
            )
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10])
            more = " and %d more" % (len(unknown) - 10) if len(unknown) > 10 else ""
            raise RunnerError(
                "data folder %s has sub-folders that match no label: %s%s; name each sub-folder "
                "after a label (or its output index)" % (root, shown, more)
            )

    items = []
    root_real = os.path.realpath(root)
    exts = image_extensions()
    for d in class_dirs:
        if _is_within(root_real, os.path.realpath(os.path.join(root, d))):
            # 'cls -> ..' would file every image of the data folder under this class
            full = os.path.join(root, d)
            skipped.append((full, "%s: symlink loop to the data folder (skipped)" % full))
            continue
        for path in _walk_images(os.path.join(root, d), skipped, exts):
            items.append((path, index_of[d]))
    if not items:
        first = "; first left out: %s" % skipped[0][1] if skipped else ""
        raise RunnerError(
            "data folder %s has no images in its class sub-folders (%d files left out%s)"
            % (root, len(skipped), first)
        )
    return items, class_names, skipped


def _folder_label_indices(folders: list, labels: list):
    exact, lower, first = {}, {}, {}  # type: dict, dict, dict
    for i, label in enumerate(labels):
        exact.setdefault(label, []).append(i)
        lower.setdefault(label.lower(), []).append(i)
        first.setdefault(label.split(",")[0].strip().lower(), []).append(i)
    index_of, unknown, by_index = {}, [], []
    for d in folders:
        for table, key in ((exact, d), (lower, d.lower()), (first, d.lower())):
            hits = table.get(key)
            if hits:
                if len(hits) > 1:
                    raise RunnerError(
                        "sub-folder %r matches labels %s: rename it to the output index you "
                        "mean, e.g. %r" % (d, hits, str(hits[0]))
                    )
                index_of[d] = hits[0]
                break
        else:
            if d.isdigit() and int(d) < len(labels):
                by_index.append(d)
            else:
                unknown.append(d)
    if index_of:  # an output index is taken as such only beside folders named after labels
        index_of.update((d, int(d)) for d in by_index)
    else:
        unknown = by_index + unknown
    return index_of, unknown


def _is_within(path: str, folder: str) -> bool:
    """True when real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_images(top: str, skipped: list, exts: tuple = IMAGE_EXTENSIONS) -> list:
    found = []
    seen = set()
    top_real = os.path.realpath(top)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real != top_real and _is_within(top_real, real):  # 'up -> ..' walks other classes
            skipped.append((dirpath, "%s: symlink loop to a parent folder (skipped)" % dirpath))
            dirnames[:] = []
            continue
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.realpath(dirpath)
        if key in seen:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            path = os.path.join(dirpath, fn)
            problem = _regular_file_problem(path)  # a FIFO named x.jpg would block decoding
            if problem:
                skipped.append((path, problem))
            elif fn.lower().endswith(exts):
                found.append(path)
            else:
                skipped.append((path, _not_image_reason(path)))
    return sorted(found)


# --------------------------------------------------------------------------------------------
# Interpreter
# --------------------------------------------------------------------------------------------


def _version_of(module, dist: str) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib import metadata as importlib_metadata

        return importlib_metadata.version(dist)
    except Exception:
        return "unknown"


def _import_interpreter(preferred: "str | None" = None):
    """``(name, version, Interpreter, load_delegate, OpResolverType or None)`` of the first found."""
    order = INTERPRETERS if preferred in (None, "", "auto") else (preferred,)
    if preferred not in (None, "", "auto") and preferred not in INTERPRETERS:
        raise RunnerError(
            "unknown interpreter %r: use one of auto, %s" % (preferred, ", ".join(INTERPRETERS))
        )
    tried = []
    for name in order:
        try:
            if name == "ai_edge_litert":
                import ai_edge_litert
                from ai_edge_litert import interpreter as mod

                version = _version_of(ai_edge_litert, "ai-edge-litert")
                return name, version, mod.Interpreter, mod.load_delegate, getattr(
                    mod, "OpResolverType", None
                )
            if name == "tflite_runtime":
                import tflite_runtime
                from tflite_runtime import interpreter as mod

                version = _version_of(tflite_runtime, "tflite-runtime")
                return name, version, mod.Interpreter, mod.load_delegate, getattr(
                    mod, "OpResolverType", None
                )
            import tensorflow as tf  # last resort: heavy

            exp = tf.lite.experimental
            return "tensorflow.lite", tf.__version__, tf.lite.Interpreter, exp.load_delegate, getattr(
                exp, "OpResolverType", None
            )
        except Exception as exc:  # ImportError, or a broken install (numpy ABI mismatch, ...)
            tried.append("%s (%s)" % (name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    raise RunnerError(
        "no TFLite interpreter could be imported (tried %s): `pip install ai-edge-litert` "
        "(64-bit OS) or `pip install tflite-runtime` (32-bit Raspberry Pi OS)" % "; ".join(tried)
    )


def _edgetpu_library() -> str:
    system = platform.system()
    if system == "Darwin":
        return "libedgetpu.1.dylib"
    if system == "Windows":
        return "edgetpu.dll"
    return "libedgetpu.so.1"


@contextlib.contextmanager
def _swallow_unraisable():
    """Silence 'Exception ignored in Delegate.__del__' noise from a failed load_delegate."""
    hook = getattr(sys, "unraisablehook", None)
    if hook is not None:
        sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        import gc

        gc.collect()
        if hook is not None:
            sys.unraisablehook = hook


def _load_edgetpu_delegate(load_delegate):
    library = _edgetpu_library()
    import ctypes

    try:
        ctypes.CDLL(library)
    except OSError as exc:
        raise RunnerError(
            "cannot load the Edge TPU delegate library %s (%s): install the Edge TPU runtime "
            "`sudo apt install libedgetpu1-std` from the Coral apt repository (see %s)"
            % (library, str(exc).splitlines()[0], CORAL_README)
        ) from None
    error = None
    with _swallow_unraisable():
        try:
            delegate = load_delegate(library, {})
        except Exception as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            delegate = None
    if delegate is None:
        raise RunnerError(
            "the Edge TPU delegate %s loaded but found no usable Edge TPU (%s): plug in the Coral "
            "USB Accelerator (USB 3 port), check `lsusb` lists it and that you are in the plugdev "
            "group (see %s)" % (library, error, CORAL_README)
        )
    return delegate


# Ops that only move or re-type a tensor (the op before them decides what the output is), and
# ops whose output, without a fused activation, is an unbounded score.
_PASS_THROUGH_OPS = {"QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE", "CAST"}
_LINEAR_OPS = {"FULLY_CONNECTED", "CONV_2D", "ADD", "SUB", "MUL", "MEAN", "BATCH_MATMUL"}


def output_is_logit(info: ModelInfo) -> bool:
    """True when a single-output model's output is a logit, not a sigmoid probability: it
    comes from a linear op without activation (Keras ``Dense(1)`` trained with
    ``from_logits=True``, as in TensorFlow's transfer-learning tutorial), not from LOGISTIC.
    Anything else (LOGISTIC, a clamp, a custom op) keeps the probability reading."""
    producers = {t: op for op in info.operators for t in op.outputs}
    tensor = info.outputs[0] if info.outputs else -1
    for _ in range(len(info.operators)):
        op = producers.get(tensor)
        if op is None or op.custom or not op.inputs:
            return False
        if op.op not in _PASS_THROUGH_OPS:
            return op.op in _LINEAR_OPS and op.fused_activation in ("", "NONE")
        tensor = op.inputs[0]
    return False


def _edgetpu_error(name: str) -> RunnerError:
    return RunnerError(
        "%s was compiled for the Coral Edge TPU (it contains an %s): run it with "
        "--delegate edgetpu on a machine with a Coral device and libedgetpu1-std installed "
        "(see %s), or run the model from before edgetpu_compiler on the CPU"
        % (name, EDGETPU_CUSTOM_OP, CORAL_README)
    )


def _interpreter_error(name: str, exc: Exception, interpreter: str, what: str) -> RunnerError:
    text = str(exc)
    if EDGETPU_CUSTOM_OP in text:
        return _edgetpu_error(name)
    marker = "unresolved custom op:"
    if marker in text.lower():
        op = text[text.lower().index(marker) + len(marker) :].strip().split()[0].rstrip(".")
        return RunnerError(
            "%s cannot run: it uses the custom op %r, which %s does not provide "
            "(re-export the model with built-in ops only)" % (name, op, interpreter)
        )
    first = " ".join(text.split())[:300] or type(exc).__name__
    return RunnerError("%s: %s failed: %s" % (name, what, first))


@dataclasses.dataclass(frozen=True)
class IOInfo:
    """The model's input or output tensor as the interpreter sees it.

    Attributes:
        name: tensor name.
        index: interpreter tensor index.
        dtype: numpy dtype name (``uint8``, ``int8``, ``float32``, ...).
        shape: dimensions.
        scale: quantization scale (0.0: not quantized).
        zero_point: quantization zero point.
    """

    name: str
    index: int
    dtype: str
    shape: list
    scale: float
    zero_point: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _io_info(detail: dict) -> IOInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0)) or (0.0, 0)
    return IOInfo(
        name=str(detail.get("name", "")),
        index=int(detail["index"]),
        dtype=np.dtype(detail["dtype"]).name,
        shape=[int(d) for d in detail["shape"]],
        scale=float(scale),
        zero_point=int(zero_point),
    )


class Model:
    """A .tflite loaded in the best available interpreter.

    Attributes:
        path: the model file.
        info: what the flatbuffer holds (``ModelInfo``).
        metadata: edgetl metadata dict, or None.
        standard_metadata: the standard TFLite metadata (``read_standard_metadata``), or None.
        labels: labels the model carries (edgetl metadata or an associated labels file), or None.
        labels_source: where ``labels`` came from (``edgetl metadata``, ``associated file ...``).
        interpreter_name: ``ai_edge_litert``, ``tflite_runtime`` or ``tensorflow.lite``.
        interpreter_version: its version.
        delegate: ``xnnpack`` (the interpreter's default), ``edgetpu`` or ``none``.
        threads: requested thread count (None: the interpreter's default).
        input: input tensor (``IOInfo``).
        output: output tensor (``IOInfo``).
        load_seconds: time to build the interpreter and allocate its tensors.
        first_invoke_ms: duration of the first invoke (None until one ran).
        notes: things the report should mention (e.g. a delegate option the interpreter lacks).
    """

    def __init__(
        self,
        path,
        threads: "int | None" = None,
        delegate: str = "xnnpack",
        interpreter: "str | None" = None,
    ):
        self.path = os.fspath(path)
        if delegate not in DELEGATES:
            raise RunnerError("unknown delegate %r: use one of %s" % (delegate, ", ".join(DELEGATES)))
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise RunnerError("threads must be a positive integer, got %r" % (threads,))
        self.delegate = delegate
        self.threads = threads
        self.notes = []  # type: list
        data, _ = _model_bytes(self.path)
        self.size_bytes = len(data)
        self.info = _parse_model(data, self.path)
        try:  # the archive is read once per load
            self.metadata, self.labels, self.labels_source = read_model_metadata(data)
            self.standard_metadata = read_standard_metadata(data, with_labels=False)
        except RunnerError as exc:  # read from bytes: name the file, not "the model bytes"
            raise RunnerError(str(exc).replace("the model bytes", self.path, 1)) from None
        if self.info.is_edgetpu and delegate != "edgetpu":
            raise _edgetpu_error(self.path)
        if len(self.info.inputs) != 1 or len(self.info.outputs) != 1:
            raise RunnerError(
                "%s is not a classifier: it has %d inputs and %d outputs (a detector or other "
                "multi-output model); the runner handles image classifiers with one input and one "
                "score output" % (self.path, len(self.info.inputs), len(self.info.outputs))
            )
        self.output_is_logit = output_is_logit(self.info)
        (
            self.interpreter_name,
            self.interpreter_version,
            interpreter_cls,
            load_delegate,
            resolver,
        ) = _import_interpreter(interpreter)
        t0 = time.perf_counter()
        kwargs = {"model_content": data}
        if threads is not None:
            kwargs["num_threads"] = threads
        if delegate == "edgetpu":
            kwargs["experimental_delegates"] = [_load_edgetpu_delegate(load_delegate)]
            if not self.info.is_edgetpu:
                self.notes.append(
                    "the model has no %s (not compiled with edgetpu_compiler): it runs on the CPU"
                    % EDGETPU_CUSTOM_OP
                )
        elif delegate == "none":
            if resolver is not None and hasattr(resolver, "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
                kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            else:
                self.notes.append(
                    "%s %s cannot disable its default delegates: --delegate none ran with them"
                    % (self.interpreter_name, self.interpreter_version)
                )
        self._data = data  # the interpreter reads the model from this buffer
        label = "%s %s" % (self.interpreter_name, self.interpreter_version)
        try:
            self._interp = interpreter_cls(**kwargs)
            self._interp.allocate_tensors()
        except RunnerError:
            raise
        except Exception as exc:
            raise _interpreter_error(self.path, exc, label, "loading the model in " + label) from None
        self.load_seconds = time.perf_counter() - t0
        self.input = _io_info(self._interp.get_input_details()[0])
        self.output = _io_info(self._interp.get_output_details()[0])
        out_shape = self.output.shape
        if len(out_shape) > 2 and any(d != 1 for d in out_shape[:-1]):
            raise RunnerError(
                "%s is not a classifier: its output has shape %s (a map or a list of boxes, not "
                "one score per class); the runner handles outputs of shape [1, classes]"
                % (self.path, out_shape)
            )
        self.first_invoke_ms = None  # type: float | None
        self._in_dtype = np.dtype(self.input.dtype)
        self._out_dtype = np.dtype(self.output.dtype)

    def __repr__(self) -> str:
        return "Model(%r, interpreter=%s %s, delegate=%s)" % (
            self.path,
            self.interpreter_name,
            self.interpreter_version,
            self.delegate,
        )

    # -- sizes --------------------------------------------------------------------------------
    @property
    def input_size(self) -> "tuple[int, int]":
        """``(height, width)`` of the image input (any H x W, not only square)."""
        shape = self.input.shape
        if len(shape) != 4 or shape[3] not in (1, 3) or shape[1] < 1 or shape[2] < 1:
            raise RunnerError(
                "%s input shape %s is not an image batch (n, h, w, 1 or 3 channels)"
                % (self.path, shape)
            )
        return int(shape[1]), int(shape[2])

    @property
    def channels(self) -> int:
        """1 (greyscale input) or 3 (RGB)."""
        self.input_size  # checks the shape
        return int(self.input.shape[3])

    @property
    def num_outputs(self) -> int:
        """Scores per image (the output size without the batch dimension)."""
        return int(np.prod(self.output.shape[1:])) if len(self.output.shape) > 1 else 1

    @property
    def num_classes(self) -> int:
        """Classes the model tells apart: 2 for a single (sigmoid) output, else ``num_outputs``."""
        return 2 if self.num_outputs == 1 else self.num_outputs

    def class_scores(self, x_float: np.ndarray) -> np.ndarray:
        """:meth:`predict`, with a single sigmoid output p expanded to the two scores [1-p, p]
        (a single logit output z is turned into p = sigmoid(z) first)."""
        y = self.predict(x_float)
        if self.num_outputs != 1:
            return y
        if self.output_is_logit:
            y = 1.0 / (1.0 + np.exp(-np.clip(y.astype(np.float64), -80.0, 80.0)))
        return np.concatenate([1.0 - y, y], axis=-1).astype(np.float32)

    # -- preprocessing --------------------------------------------------------------------------
    def raw_prep(self) -> dict:
        """Preprocessing that feeds the pixels unchanged in the model's input dtype.

        For a uint8 input the quantized value equals the pixel (the convention of Google's
        quantized MobileNets); for int8, pixel - 128; for float inputs, 0..255 floats.
        """
        mean, std = 0.0, 1.0
        if self._in_dtype.kind in "iu" and self.input.scale > 0:
            std = 1.0 / self.input.scale
            mean = float(self.input.zero_point) + (128.0 if self._in_dtype == np.int8 else 0.0)
        n = 1 if len(self.input.shape) == 4 and self.input.shape[3] == 1 else 3
        return {"mean": [mean] * n, "std": [std] * n, "channel_order": "RGB", "resize": "bilinear"}

    def default_prep(self) -> dict:
        """The metadata's preprocessing when present, else :meth:`raw_prep`."""
        if self.metadata is not None and "input" in self.metadata:
            return prep_from_metadata(self.metadata)
        return self.standard_prep() or self.raw_prep()

    def standard_prep(self) -> "dict | None":
        """Mean/std from standard TFLite metadata, for a float input (None otherwise).

        As MediaPipe and the TFLite Support library do, an integer input gets the raw pixels:
        its quantization is the normalisation.
        """
        std_meta = self.standard_metadata or {}
        if std_meta.get("mean") is None or std_meta.get("std") is None:
            return None
        if self._in_dtype.kind != "f":
            return None
        prep = {"mean": std_meta["mean"], "std": std_meta["std"], "channel_order": "RGB",
                "resize": "bilinear"}
        try:
            _check_prep(prep, "standard metadata")
        except RunnerError as exc:  # unusable: the pixels go in raw, and the report says why
            note = "%s ignored" % exc
            if note not in self.notes:
                self.notes.append(note)
            return None
        return prep

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Float model input -> the model's input dtype (quantized with its own parameters)."""
        x = np.asarray(x, dtype=np.float32)
        dt = self._in_dtype
        if dt.kind in "iu":
            # One float temporary instead of four (same operations, same results): an image's
            # worth of fresh pages per step costs more than the arithmetic on a small device.
            if self.input.scale > 0:
                q = np.divide(x, np.float32(self.input.scale), dtype=np.float32)
                # Round half up, with a margin for float error: with mean 127.5 / std 127.5 and
                # zero point 127, pixel p lands on p - 0.5, which then always maps to the raw
                # pixel (what MediaPipe and Coral's tools feed), not to p or p - 1 by parity.
                q += np.float32(self.input.zero_point + 0.5 + 1e-3)
                np.floor(q, out=q)
            else:
                q = x.copy()
            info = np.iinfo(dt)
            np.clip(q, info.min, info.max, out=q)
            return q.astype(dt)
        return x.astype(dt)

    def dequantize_output(self, y: np.ndarray) -> np.ndarray:
        if self._out_dtype.kind in "iu" and self.output.scale > 0:
            return (
                (y.astype(np.float32) - np.float32(self.output.zero_point))
                * np.float32(self.output.scale)
            ).astype(np.float32)
        return np.asarray(y, dtype=np.float32)

    # -- inference ----------------------------------------------------------------------------
    def _invoke(self) -> None:
        try:
            if self.first_invoke_ms is None:
                t0 = time.perf_counter_ns()
                self._interp.invoke()
                self.first_invoke_ms = (time.perf_counter_ns() - t0) / 1e6
            else:
                self._interp.invoke()
        except Exception as exc:
            raise _interpreter_error(self.path, exc, self.interpreter_name, "invoke") from None

    def invoke_raw(self, x_in_model_dtype: np.ndarray) -> np.ndarray:
        """Set the input (already in the model's dtype and shape), invoke, return the raw output."""
        try:
            self._interp.set_tensor(self.input.index, x_in_model_dtype)
        except Exception as exc:
            raise RunnerError(
                "%s: cannot set input of shape %s dtype %s (model wants %s %s): %s"
                % (
                    self.path,
                    getattr(x_in_model_dtype, "shape", "?"),
                    getattr(x_in_model_dtype, "dtype", "?"),
                    self.input.shape,
                    self.input.dtype,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
            ) from None
        self._invoke()
        return self._interp.get_tensor(self.output.index)

    def predict(self, x_float: np.ndarray) -> np.ndarray:
        """Scores for one image ``(h, w, 3)`` or a batch ``(n, h, w, 3)`` of preprocessed floats.

        Inputs are quantized with the model's input parameters; outputs dequantized likewise.

        Returns:
            float32 scores of shape ``(num_outputs,)`` or ``(n, num_outputs)``.
        """
        x = np.asarray(x_float)
        single = x.ndim == len(self.input.shape) - 1
        if single:
            x = x[None]
        if x.ndim != len(self.input.shape) or list(x.shape[1:]) != self.input.shape[1:]:
            raise RunnerError(
                "%s: input of shape %s does not fit the model input %s"
                % (self.path, list(np.asarray(x_float).shape), self.input.shape)
            )
        q = self.quantize_input(x)
        batch = max(1, int(self.input.shape[0]))
        n = q.shape[0]
        out = np.empty((n, self.num_outputs), dtype=np.float32)
        for start in range(0, n, batch):
            chunk = q[start : start + batch]
            m = chunk.shape[0]
            if m < batch:  # pad the last chunk of a fixed-batch model
                pad = np.zeros((batch - m,) + chunk.shape[1:], dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            y = self.invoke_raw(np.ascontiguousarray(chunk))
            out[start : start + m] = self.dequantize_output(y.reshape(batch, -1)[:m])
        return out[0] if single else out


# --------------------------------------------------------------------------------------------
# Benchmark and evaluation
# --------------------------------------------------------------------------------------------


def benchmark(model: Model, runs: int = 200, warmup: int = 20) -> dict:
    """Time ``invoke()`` alone: the input is set once beforehand, warm-up runs are excluded.

    Returns:
        ``runs``, ``warmup``, ``first_ms`` and ``min_ms``, ``mean_ms``, ``p50_ms``, ``p90_ms``,
        ``p99_ms``, ``max_ms``, ``throughput_ips`` (images/s = batch * 1000 / mean), ``batch`` and
        ``runs_ms`` (every timed run, in order).
    """
    if not isinstance(runs, int) or runs < 1:
        raise RunnerError("runs must be at least 1, got %r" % (runs,))
    if not isinstance(warmup, int) or warmup < 0:
        raise RunnerError("warmup must be 0 or more, got %r" % (warmup,))
    rng = np.random.RandomState(0)
    dt = np.dtype(model.input.dtype)
    shape = tuple(max(1, d) for d in model.input.shape)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        x = rng.randint(max(info.min, -128), min(info.max, 255) + 1, size=shape).astype(dt)
    else:
        x = rng.uniform(-1.0, 1.0, size=shape).astype(dt)
    model.invoke_raw(x)  # sets the input; the first invoke is timed inside the model
    invoke = model._interp.invoke
    clock = time.perf_counter_ns
    try:
        for _ in range(warmup):
            invoke()
        times = [0] * runs
        for i in range(runs):
            t0 = clock()
            invoke()
            times[i] = clock() - t0
    except Exception as exc:
        raise _interpreter_error(model.path, exc, model.interpreter_name, "invoke") from None
    ms = np.asarray(times, dtype=np.float64) / 1e6
    mean = float(ms.mean())
    batch = max(1, int(model.input.shape[0]))
    return {
        "runs": runs,
        "warmup": warmup,
        "first_ms": model.first_invoke_ms,
        "min_ms": float(ms.min()),
        "mean_ms": mean,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "throughput_ips": batch * 1000.0 / mean if mean > 0 else float("inf"),
        "batch": batch,
        "runs_ms": [round(float(v), 6) for v in ms],
    }


def classify(model: Model, paths: list, prep: "dict | None", labels: "list | None" = None,
             top: int = 5) -> list:
    """The ``top`` best classes for each image file (or folder of images), in the order given.

    A folder contributes its images one level deep. Files that cannot be classified (missing,
    not a regular file, not an image format, unreadable) are kept in order with an ``error`` and
    no scores, so one bad file does not stop the others. A single-output (sigmoid) model gives
    two scores, [1-p, p].

    Returns:
        ``[{path, top: [{index, label, score}], error}]``; ``score`` is the dequantized output
        (a probability for a softmax model); ``label`` is None without labels; ``error`` is None
        or why the file was skipped (``top`` then empty).

    Raises:
        RunnerError: a bad ``top``, or no image at all could be classified.
    """
    if not isinstance(top, int) or top < 1:
        raise RunnerError("--top must be at least 1, got %r" % (top,))
    size = model.input_size
    channels = model.channels
    resample = (prep or {}).get("resize", "bilinear")
    k = min(top, model.num_classes)
    results = []
    for given in paths:
        files, skipped = expand_images([given])
        here = [{"path": p, "top": [], "error": reason} for p, reason in skipped]
        for path in files:
            try:
                pixels = load_image(path, size, resample, channels)
            except RunnerError as exc:
                here.append({"path": path, "top": [], "error": str(exc)})
                continue
            scores = model.class_scores(preprocess(pixels, prep))
            best = np.argsort(-scores, kind="stable")[:k]
            here.append({
                "path": path,
                "top": [{"index": int(i), "label": labels[i] if labels else None,
                         "score": float(scores[i])} for i in best],
                "error": None,
            })
        results += sorted(here, key=lambda item: item["path"])  # a folder's files in name order
    if not any(r["error"] is None for r in results):
        first = results[0]["error"] if results else "a folder without images"
        raise RunnerError(
            "no image could be classified among the %d path(s) given; first: %s"
            % (len(paths), first)
        )
    return results


def evaluate(
    model: Model,
    items: list,
    prep: "dict | None",
    class_names: list,
    batch_size: int = 32,
) -> dict:
    """Top-1/top-5 accuracy, per-class accuracy and a confusion matrix over labelled images.

    Images are streamed ``batch_size`` at a time. Unreadable images are skipped and listed.

    Args:
        model: the loaded model.
        items: ``(path, class_index)`` pairs; ``class_index`` indexes ``class_names`` and the
            model outputs.
        prep: preprocessing dict (see :func:`preprocess`); its ``resize`` names the filter.
        class_names: one name per model output.
        batch_size: images decoded at once.

    Returns:
        ``images``, ``evaluated``, ``skipped``, ``skipped_files`` (``[{path, reason}]``),
        ``top1``, ``top5`` (None under 5 outputs), ``correct_top1``, ``correct_top5``,
        ``per_class`` (``[{index, label, total, correct, accuracy}]`` for classes with images),
        ``confusion_labels`` (rows: true classes with images), ``confusion_columns`` (the same,
        plus ``(other)`` when a prediction can fall outside them), ``confusion_matrix``,
        ``predictions`` and ``targets`` (output indices per item, -1 for skipped images).
    """
    n_out = model.num_classes
    if len(class_names) != n_out:
        raise RunnerError(
            "%d class names for a model with %d outputs: give one name per output"
            % (len(class_names), n_out)
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RunnerError("batch_size must be at least 1, got %r" % (batch_size,))
    for _, c in items:
        if not 0 <= c < n_out:
            raise RunnerError("class index %d is outside the model's %d outputs" % (c, n_out))
    size = model.input_size
    channels = model.channels
    # A stranger's model may take 8192 x 8192 images: 32 of them at once (decoded, then as
    # float32) is 30 GB. The batch shrinks to what DECODE_BUDGET holds, down to one image.
    per_image = size[0] * size[1] * channels * 5  # uint8 pixels + float32 preprocessed
    batch_size = max(1, min(batch_size, DECODE_BUDGET // per_image))
    resample = (prep or {}).get("resize", "bilinear")
    present = sorted({c for _, c in items})
    row_of = {c: i for i, c in enumerate(present)}
    other = len(present) < n_out
    cols = len(present) + (1 if other else 0)
    confusion = [[0] * cols for _ in present]
    predictions = [-1] * len(items)
    targets = [c for _, c in items]
    skipped = []
    correct1 = correct5 = 0
    k = min(5, n_out)

    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pixels, where = [], []
        for j, (path, _) in enumerate(chunk):
            try:
                pixels.append(load_image(path, size, resample, channels))
                where.append(start + j)
            except RunnerError as exc:
                skipped.append({"path": os.fspath(path), "reason": str(exc)})
        if not pixels:
            continue
        scores = model.class_scores(preprocess(np.stack(pixels), prep))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        for row, i in enumerate(where):
            truth = targets[i]
            pred = int(top[row, 0])
            predictions[i] = pred
            correct1 += pred == truth
            correct5 += truth in top[row]
            col = row_of.get(pred, len(present))
            confusion[row_of[truth]][col] += 1

    evaluated = len(items) - len(skipped)
    per_class = []
    for c in present:
        r = confusion[row_of[c]]
        total = sum(r)
        per_class.append(
            {
                "index": c,
                "label": class_names[c],
                "total": total,
                "correct": r[row_of[c]],
                "accuracy": r[row_of[c]] / total if total else None,
            }
        )
    labels_present = [class_names[c] for c in present]
    return {
        "images": len(items),
        "evaluated": evaluated,
        "skipped": len(skipped),
        "skipped_files": skipped,
        "top1": correct1 / evaluated if evaluated else None,
        "top5": (correct5 / evaluated if evaluated else None) if n_out >= 5 else None,
        "correct_top1": int(correct1),
        "correct_top5": int(correct5) if n_out >= 5 else None,
        "num_classes": len(present),
        "per_class": per_class,
        "confusion_labels": labels_present,
        "confusion_columns": labels_present + (["(other)"] if other else []),
        "confusion_matrix": confusion,
        "predictions": predictions,
        "targets": targets,
    }


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def memory_info() -> dict:
    """``peak_rss_mb`` and ``rss_mb`` (MB = 10^6 bytes) of this process (/proc/self/status, else
    getrusage).

    Linux keeps getrusage's ``ru_maxrss`` across fork and exec, so a runner started by a large
    process (a TensorFlow training script, pytest) would report its parent's peak; ``VmHWM`` is
    the peak of this program's own memory.
    """
    peak = current = None
    for line in _read_text("/proc/self/status").splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmHWM", "VmRSS"):
            try:
                value = int(line.split()[1]) * 1024 / MB  # /proc's kB are KiB
            except (IndexError, ValueError):
                continue
            if key == "VmHWM":
                peak = value
            else:
                current = value
    if peak is None:
        try:
            import resource

            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # bytes on macOS, KiB on Linux
            peak = maxrss / MB if sys.platform == "darwin" else maxrss * 1024 / MB
        except (ImportError, OSError, ValueError):
            pass
    return {"peak_rss_mb": peak, "rss_mb": current}


# CPU features that decide int8 vs float32 speed in XNNPACK: int8 dot products (x86 VNNI, ARM
# dotprod/i8mm) make int8 faster; without them (AVX2 alone, Cortex-A72) it can be slower.
SIMD_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp",
                 "i8mm", "sve")


def machine_info() -> dict:
    """CPU, board, architecture, cores, OS, Python and numpy versions, memory use."""
    cpu = board = hardware = ""
    flags = set()
    for line in _read_text("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        if key == "model name" and not cpu:
            cpu = value
        elif key == "Model" and not board:
            board = value
        elif key == "Hardware" and not hardware:
            hardware = value
    if not board:
        board = _read_text("/proc/device-tree/model").strip("\0\n ")
    os_name = ""
    for line in _read_text("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            os_name = line.split("=", 1)[1].strip().strip('"')
    if not os_name:
        os_name = "%s %s" % (platform.system(), platform.release())
    info = {
        "cpu": cpu or hardware or board or platform.processor() or platform.machine(),
        "board": board or None,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "simd": [f for f in SIMD_FEATURES if f in flags],
        # Set by devices/emulate/pi.sh (e.g. "qemu cortex-a72"): timings are then not device latency.
        "emulated": os.environ.get("EDGETL_EMULATED") or None,
    }
    info.update(memory_info())
    return info


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise RunnerError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="edgetl_runner.py",
        description="Time and evaluate a .tflite image classifier on this device "
        "(edgetl runner %s)." % RUNNER_VERSION,
        epilog="Exit codes: 0 ok, 2 bad input. Models without edgetl metadata get their pixels "
        "raw (unchanged in the input dtype) unless --mean/--std are given; --data then needs "
        "--labels. A labels file with one label fewer than the outputs means output 0 is "
        "background.",
    )
    p.add_argument("model", help="the .tflite model")
    p.add_argument("--data", help="folder with one sub-folder of images per class: adds accuracy")
    p.add_argument("--labels", help="labels file (one per line) for models without metadata")
    p.add_argument("--image", nargs="+", metavar="FILE",
                   help="classify these images (a folder: its images, one level deep): the --top "
                   "best labels of each; unreadable files are skipped and listed (timed only "
                   "when --runs is given)")
    p.add_argument("--top", type=int, default=5, help="labels shown per --image (default 5)")
    p.add_argument("--runs", type=int, default=None, help="timed runs (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed warm-up runs (default 20)")
    p.add_argument("--threads", type=int, default=None, help="interpreter threads (default: its own)")
    p.add_argument(
        "--delegate",
        choices=DELEGATES,
        default="xnnpack",
        help="xnnpack: the interpreter's default CPU path; edgetpu: Coral (libedgetpu); "
        "none: plain built-in kernels",
    )
    p.add_argument(
        "--interpreter",
        choices=("auto",) + INTERPRETERS,
        default="auto",
        help="force an interpreter (default: ai_edge_litert, tflite_runtime, tensorflow in order)",
    )
    p.add_argument("--mean", type=float, nargs="+", metavar="M", help="per-channel mean (1 or 3)")
    p.add_argument("--std", type=float, nargs="+", metavar="S", help="per-channel std (1 or 3)")
    p.add_argument("--raw", action="store_true", help="feed pixels unchanged in the input dtype")
    p.add_argument("--bgr", action="store_true", help="the model wants BGR channel order")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded at once (--data)")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--quiet", action="store_true", help="print no table (errors still go to stderr)")
    p.add_argument("--version", action="version", version="edgetl-runner %s (report format %s)"
                   % (__version__, RUNNER_VERSION))
    return p


# C++ chatter that LiteRT and TensorFlow's converter print on file descriptor 2 whatever the log
# level: "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", "fully_quantize: 0, ...".
NATIVE_NOISE = (b"INFO: ", b"fully_quantize: ")


# The filter runs in its own small process, so what native code writes just before it aborts
# still reaches the terminal after this process is gone. It reads the pipe on stdin and writes
# to stdout (the user's stderr); it leaves when every writer has closed the pipe.
_FILTER = r"""
import os, sys
noise = tuple(a.encode() for a in sys.argv[1:])
def write(data):
    while data:
        data = data[os.write(1, data):]
def maybe_noise(start):
    return any(start.startswith(n) or n.startswith(start) for n in noise)
pending = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    pending += chunk
    *lines, pending = pending.split(b"\n")
    out = b"".join(ln + b"\n" for ln in lines if not ln.startswith(noise))
    if pending and not maybe_noise(pending):  # a partial line, e.g. a \r progress bar
        out, pending = out + pending, b""
    write(out)
if not pending.startswith(noise):
    write(pending)
"""


@contextlib.contextmanager
def filtered_native_stderr(noise: tuple = NATIVE_NOISE):
    """Drops the lines native code writes to file descriptor 2 that start with one of ``noise``
    and passes every other byte on as it comes.

    Python's own ``sys.stderr`` is pointed straight at the terminal meanwhile, so progress bars
    and error lines are untouched. The filter is a separate process: a message written just
    before a crash still shows. Does nothing when ``sys.stderr`` is not descriptor 2 (a test
    capturing it), when EDGETL_TF_LOGS is set, or when the filter cannot start.
    """
    import subprocess

    try:
        if os.environ.get("EDGETL_TF_LOGS") or sys.stderr.fileno() != 2:
            raise ValueError("not filtered")
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        yield
        return
    read_end, write_end = os.pipe()
    try:
        # Its own session: Ctrl-C reaches edgetl, not the filter (it ends on end of input).
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER] + [n.decode() for n in noise],
            stdin=read_end, stdout=saved, stderr=saved, start_new_session=True)
    except OSError:
        for fd in (read_end, write_end, saved):
            os.close(fd)
        yield
        return
    os.close(read_end)
    python_side = sys.stderr
    sys.stderr = open(os.dup(saved), "w", buffering=1, errors="backslashreplace",
                      encoding=getattr(python_side, "encoding", None) or "utf-8")
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.stderr.close()
        sys.stderr = python_side
        os.dup2(saved, 2)  # this process's last writer closes: the filter drains and ends
        os.close(saved)
        try:  # a child still holding the pipe keeps it going; it ends with that child
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _resolve_prep(args, model: Model) -> "tuple[dict, str]":
    if args.raw and (args.mean or args.std):
        raise RunnerError("--raw feeds pixels unchanged: leave out --mean/--std, or drop --raw")
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        # flags apply to pixels 0..255 (NaN and a model's own metadata: _check_prep)
        if values and any(math.isfinite(v) and not 0 <= v <= 255 for v in values):
            raise RunnerError("%s %s: the values apply to pixels 0..255, give numbers from 0 "
                              "to 255" % (flag, " ".join("%g" % v for v in values)))
    if args.raw:
        prep, source = model.raw_prep(), "raw pixels (--raw)"
    elif model.metadata is not None and "input" in model.metadata:
        prep, source = prep_from_metadata(model.metadata), "edgetl metadata"
    elif model.standard_prep() is not None:
        prep, source = model.standard_prep(), "standard TFLite metadata (NormalizationOptions)"
    else:
        prep, source = model.raw_prep(), "raw pixels (no edgetl metadata)"
    prep = dict(prep)
    if args.mean:
        prep["mean"] = list(args.mean)
    if args.std:
        prep["std"] = list(args.std)
    if args.mean or args.std:
        source = "--mean/--std flags"
    if args.bgr:
        prep["channel_order"] = "BGR"
        source += ", BGR (--bgr)"
    _check_prep(prep, "--mean/--std" if (args.mean or args.std) else source)
    return prep, source


def run(options) -> dict:
    """Run the CLI's work and return the report dict.

    Args:
        options: the argument list (as for the command line) or a parsed ``argparse.Namespace``.

    Raises:
        RunnerError: any bad input.
    """
    args = options if isinstance(options, argparse.Namespace) else build_parser().parse_args(
        [str(o) for o in options]
    )
    timed = args.runs is not None or not args.image
    runs = 200 if args.runs is None else args.runs
    if runs < 1:
        raise RunnerError("--runs must be at least 1, got %d" % runs)
    if args.warmup < 0:
        raise RunnerError("--warmup must be 0 or more, got %d" % args.warmup)
    if args.threads is not None and args.threads < 1:
        raise RunnerError("--threads must be at least 1, got %d" % args.threads)
    if args.batch_size < 1:
        raise RunnerError("--batch-size must be at least 1, got %d" % args.batch_size)
    for flag, value, most in (("--runs", runs, MAX_RUNS), ("--warmup", args.warmup, MAX_RUNS),
                              ("--threads", args.threads, MAX_THREADS),
                              ("--batch-size", args.batch_size, MAX_BATCH)):
        if value is not None and value > most:
            raise RunnerError("%s %d is too many: give at most %d" % (flag, value, most))
    for flag in ("mean", "std"):
        values = getattr(args, flag)
        if values is not None and len(values) not in (1, 3):
            raise RunnerError("--%s takes 1 or 3 numbers, got %d" % (flag, len(values)))

    quiet_native = getattr(args, "_filter_native_stderr", True)
    with filtered_native_stderr() if quiet_native else contextlib.nullcontext():
        model = Model(
            args.model,
            threads=args.threads,
            delegate=args.delegate,
            interpreter=None if args.interpreter == "auto" else args.interpreter,
        )
    notes = list(model.notes)
    n_out = model.num_outputs
    if n_out == 1 and not args.labels and model.labels is None:
        notes.append(
            "single-output (sigmoid) binary classifier: scores are [1-p, p] for outputs 0 and 1; "
            "pass --labels with two lines to name them"
        )
    if n_out == 1 and model.output_is_logit:
        notes.append("its single output is a logit (a linear layer, no sigmoid): p = sigmoid(output)")

    labels, labels_source = None, None
    if args.labels:
        labels, note = match_labels(read_labels_file(args.labels), n_out, "labels file " + args.labels)
        labels_source = args.labels
        if note:
            notes.append(note)
        if model.labels is not None:
            notes.append("--labels replaces the labels stored in the model")
    elif model.labels is not None:
        labels, note = match_labels(model.labels, n_out, "the model's " + model.labels_source)
        labels_source = model.labels_source
        if note:
            notes.append(note)

    prep, prep_source = _resolve_prep(args, model)
    notes += [n for n in model.notes if n not in notes]  # e.g. unusable standard metadata
    meta_in = (model.metadata or {}).get("input") or {}
    if meta_in:
        try:
            h, w = int(meta_in.get("height", 0)), int(meta_in.get("width", 0))
        except (TypeError, ValueError):
            h = w = 0
        if (h, w) != (0, 0) and [h, w] != list(model.input_size):
            raise RunnerError(
                "%s: metadata input size %dx%d does not match the model input %s: re-export it"
                % (args.model, h, w, model.input.shape)
            )

    items = class_names = listing_skipped = None
    if args.data:
        if labels is None:
            raise RunnerError(
                "--data needs class labels: %s has no edgetl metadata, pass --labels FILE"
                % args.model
            )
        model.input_size  # an image model is required for --data
        items, class_names, listing_skipped = list_images(args.data, labels)

    predictions = None
    if args.image:
        model.input_size  # an image model is required for --image
        predictions = classify(model, args.image, prep, labels, args.top)

    if timed:
        bench = benchmark(model, runs=runs, warmup=args.warmup)
    else:  # classification only: the first inference is the one timing there is
        bench = dict({k + "_ms": None for k in ("min", "mean", "p50", "p90", "p99", "max")},
                     first_ms=model.first_invoke_ms, runs_ms=[], throughput_ips=None, runs=0,
                     warmup=0)

    accuracy = None
    if items is not None:
        accuracy = evaluate(model, items, prep, class_names, batch_size=args.batch_size)
        listed = [{"path": p, "reason": r} for p, r in listing_skipped]
        accuracy["ignored_files"] = listed
        accuracy["ignored"] = len(listed)
        # every file of the folder that did not count: unreadable images + files not listed
        accuracy["left_out"] = accuracy["skipped"] + len(listed)
        accuracy["left_out_files"] = (accuracy["skipped_files"] + listed)[:LEFT_OUT_SHOWN]

    machine = machine_info()
    info = model.info
    report = {
        "runner": {"name": "edgetl_runner", "version": RUNNER_VERSION},
        "model": {
            "path": os.path.abspath(model.path),
            "size_bytes": model.size_bytes,
            "name": (model.metadata or {}).get("name"),
            "has_metadata": model.metadata is not None,
            "mode": (model.metadata or {}).get("mode"),
            "ops": len(info.operators),
            "op_counts": info.op_counts(),
            "edgetpu": info.is_edgetpu,
        },
        "interpreter": {"name": model.interpreter_name, "version": model.interpreter_version},
        "delegate": model.delegate,
        "threads": model.threads,
        "load_ms": model.load_seconds * 1000.0,
        "first_inference_ms": bench["first_ms"],
        "latency_ms": dict(
            {k: bench[k + "_ms"] for k in ("min", "mean", "p50", "p90", "p99", "max")},
            runs_ms=bench["runs_ms"],
        ),
        "throughput_ips": bench["throughput_ips"],
        "runs": bench["runs"],
        "warmup": bench["warmup"],
        "memory": {"peak_rss_mb": machine["peak_rss_mb"], "rss_mb": machine["rss_mb"]},
        "machine": machine,
        "input": model.input.as_dict(),
        "output": model.output.as_dict(),
        "preprocessing": dict(prep, source=prep_source),
        "labels": {"source": labels_source, "count": len(labels) if labels else 0},
        "accuracy": accuracy,
        "predictions": predictions,
        "images_skipped": (
            None if predictions is None else sum(1 for p in predictions if p.get("error"))
        ),
        "notes": notes,
    }
    return report


def _fmt_ms(v) -> str:
    return "-" if v is None else ("%.3f" % v if v < 10 else "%.1f" % v)


def _fmt_pct(v) -> str:
    return "-" if v is None else "%.2f%%" % (100.0 * v)


def _fmt_io(d: dict) -> str:
    q = " scale %.6g zero point %d" % (d["scale"], d["zero_point"]) if d["scale"] else ""
    return "%s %s%s" % (d["dtype"], d["shape"], q)


def format_report(report: dict) -> str:
    """The report as an aligned text table."""
    rows = []
    m = report["model"]
    mach = report["machine"]
    lat = report["latency_ms"]
    prep = report["preprocessing"]
    rows.append(("model", "%s (%s bytes)" % (m["path"], format(m["size_bytes"], ","))))
    if m["has_metadata"]:
        rows.append(("metadata", "edgetl: %s, mode %s" % (m["name"], m["mode"])))
    else:
        rows.append(("metadata", "none"))
    lab = report["labels"]
    rows.append(("labels", "%d from %s" % (lab["count"], lab["source"]) if lab["source"] else "none"))
    rows.append(
        ("interpreter", "%s %s" % (report["interpreter"]["name"], report["interpreter"]["version"]))
    )
    rows.append(
        (
            "delegate",
            {
                "xnnpack": "xnnpack (the interpreter's default CPU path)",
                "none": "none (built-in kernels, no default delegates)",
                "edgetpu": "edgetpu (%s)" % _edgetpu_library(),
            }.get(report["delegate"], report["delegate"]),
        )
    )
    rows.append(("threads", "default" if report["threads"] is None else str(report["threads"])))
    rows.append(("input", _fmt_io(report["input"])))
    rows.append(("output", _fmt_io(report["output"])))
    rows.append(
        (
            "preprocessing",
            "%s: mean %s std %s %s"
            % (
                prep["source"],
                [round(float(x), 4) for x in prep["mean"]],
                [round(float(x), 4) for x in prep["std"]],
                prep.get("channel_order", "RGB"),
            ),
        )
    )
    rows.append(("load", "%s ms" % _fmt_ms(report["load_ms"])))
    rows.append(("first inference", "%s ms" % _fmt_ms(report["first_inference_ms"])))
    if report["runs"]:
        rows.append(
            (
                "latency",
                "min %s  mean %s  p50 %s  p90 %s  p99 %s  max %s ms  (%d runs, %d warm-up)"
                % tuple(
                    [_fmt_ms(lat[k]) for k in ("min", "mean", "p50", "p90", "p99", "max")]
                    + [report["runs"], report["warmup"]]
                ),
            )
        )
        rows.append(("throughput", "%.1f images/s (from the mean latency)"
                     % report["throughput_ips"]))
    else:
        rows.append(("latency", "not timed (--image without --runs)"))
    mem = report["memory"]
    rows.append(
        (
            "memory",
            "peak %s MB RSS (now %s MB)"
            % (
                "-" if mem["peak_rss_mb"] is None else "%.1f" % mem["peak_rss_mb"],
                "-" if mem["rss_mb"] is None else "%.1f" % mem["rss_mb"],
            ),
        )
    )
    rows.append(
        (
            "machine",
            "%s, %s%s, %s cores, %s, Python %s, numpy %s"
            % (
                (mach["board"] + " / " if mach.get("board") else "") + str(mach["cpu"]),
                mach["machine"],
                " (%s)" % " ".join(mach["simd"]) if mach.get("simd") else "",
                mach["cores"],
                mach["os"],
                mach["python"],
                mach["numpy"],
            ),
        )
    )
    acc = report["accuracy"]
    if acc is not None:
        rows.append(
            (
                "accuracy",
                "top-1 %s (%d/%d)  top-5 %s"
                % (_fmt_pct(acc["top1"]), acc["correct_top1"], acc["evaluated"], _fmt_pct(acc["top5"])),
            )
        )
        rows.append(
            (
                "images",
                "%d evaluated, %d left out (%d unreadable, %d not images or not regular files)"
                % (acc["evaluated"], acc.get("left_out", acc["skipped"]), acc["skipped"],
                   acc.get("ignored", 0)),
            )
        )
    for note in report["notes"]:
        rows.append(("note", note))
    width = max(len(k) for k, _ in rows)
    lines = ["edgetl runner %s" % report["runner"]["version"]]
    lines += ["%-*s  %s" % (width, k, v) for k, v in rows]

    if report.get("predictions"):
        # one entry per line: the escaping below would turn the block's newlines into \x0a
        lines += ["", *format_predictions(report["predictions"]).split("\n")]
        if report.get("images_skipped"):
            lines.append("%d file(s) skipped (see above)" % report["images_skipped"])

    if acc is not None:
        per = acc["per_class"]
        if per:
            lines.append("")
            lines.append("per class accuracy")
            name_w = min(40, max(len(c["label"]) for c in per))
            for c in per[:100]:
                lines.append(
                    "  %-*s  %7s  (%d/%d)"
                    % (name_w, c["label"][:name_w], _fmt_pct(c["accuracy"]), c["correct"], c["total"])
                )
            if len(per) > 100:
                lines.append("  ... %d more classes in the JSON report" % (len(per) - 100))
        cols = acc["confusion_columns"]
        if acc["confusion_matrix"] and len(cols) <= 20:
            lines.append("")
            lines.append("confusion matrix (rows: true class, columns: predicted)")
            tags = ["c%d" % i for i in range(len(acc["confusion_labels"]))]
            tags += ["other"] if len(cols) > len(tags) else []
            cell = max([len(t) for t in tags] + [len(str(v)) for r in acc["confusion_matrix"] for v in r])
            lines.append("  %-*s  %s" % (5, "", " ".join("%*s" % (cell, t) for t in tags)))
            for i, r in enumerate(acc["confusion_matrix"]):
                lines.append(
                    "  %-5s  %s  %s"
                    % (tags[i], " ".join("%*d" % (cell, v) for v in r), acc["confusion_labels"][i])
                )
        elif acc["confusion_matrix"]:
            lines.append("confusion matrix: %d classes, see --json" % len(cols))
        for key, title in (("skipped_files", "unreadable images (skipped)"),
                           ("ignored_files", "files left out of the data folder")):
            listed = acc.get(key) or []
            if listed:
                lines.append("")
                lines.append("%s: %d" % (title, len(listed)))
                for item in listed[:LEFT_OUT_SHOWN]:
                    lines.append("  " + item["reason"])
                if len(listed) > LEFT_OUT_SHOWN:
                    lines.append("  ... %d more in the JSON report" % (len(listed) - LEFT_OUT_SHOWN))
    # names read from files (labels, paths, metadata) must not drive the terminal
    return "\n".join(printable(line) for line in lines)


def format_predictions(predictions: list) -> str:
    """Each image's path, then its best classes: score and label, one per line.

    A skipped file shows ``  skipped: reason``. Control characters in paths and labels are
    escaped (:func:`printable`), so a label cannot forge a line or drive the terminal.
    """
    lines = []
    for pred in predictions:
        lines.append(printable(pred["path"]))
        if pred.get("error"):
            lines.append("  skipped: " + printable(pred["error"]))
        for t in pred["top"]:
            name = t["label"] if t["label"] is not None else "output %d" % t["index"]
            lines.append("  %8.4f  %s" % (t["score"], printable(name)))
    return "\n".join(lines)


def check_writable(path: str, flag: str = "--json") -> None:
    """Refuse, before any work, an output file that cannot be written.

    Creates and removes a temporary file next to ``path`` (the way the report is written).

    Raises:
        RunnerError: ``cannot write --json PATH: reason`` (missing folder, a folder at PATH,
            read-only or full file system, no permission).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise RunnerError("cannot write %s %s: folder %s does not exist" % (flag, path, directory))
    if os.path.isdir(path):
        raise RunnerError("cannot write %s %s: it is a folder; give a file name" % (flag, path))
    if symlink_loop(path):  # the report would replace the link
        raise RunnerError("cannot write %s %s: it is a symlink loop (it leads back to itself); "
                          "give the real path" % (flag, path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgetl-report-", suffix=".json", dir=directory)
    except OSError as exc:
        raise RunnerError("cannot write %s %s: %s" % (flag, path, exc.strerror or exc)) from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass


def shareable(fd: int) -> None:
    """Gives a file made by ``tempfile.mkstemp`` (mode 0600) the mode a plain ``open`` gives
    (0666 minus the umask): reports and models are read by other users (a deploy account, a web
    server) as every other file the user writes."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.fchmod(fd, 0o666 & ~mask)
    except (AttributeError, OSError):  # no fchmod (Windows) or a file system without modes
        pass


def refuse_special_output(path: str, flag: str = "--json") -> None:
    """Refuse an output that names a device, FIFO or socket (``/dev/null``, ``/dev/stdout``):
    a report is written to a temporary file and renamed over the name, which, run as root,
    would replace the device node (or the /dev/stdout symlink) with a regular file.

    Raises:
        RunnerError: ``cannot write --json /dev/null: it is a device, not a regular file; ...``.
    """
    link = path
    for _ in range(40):  # /dev/stdout -> /proc/self/fd/1 -> (a file when redirected): one hop
        if not os.path.islink(link):  # at a time, as realpath would resolve past /proc
            break
        link = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link)))
        if link == "/proc" or link.startswith("/proc/"):
            raise RunnerError(
                "cannot write %s %s: it is a link to an open file of a process (%s), not a "
                "regular file (writing would replace the link); give a file name"
                % (flag, path, link)
            )
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise RunnerError(
            "cannot write %s %s: it is %s, not a regular file (writing would replace it); "
            "give a file name" % (flag, path, _file_kind(os.stat(path).st_mode))
        )


def check_outputs(outputs, inputs=(), folders=()) -> None:
    """Refuse, before any work, output files that would destroy an input or each other.

    Args:
        outputs: ``(path, flag)`` pairs of the files a command will write (None: not given).
        inputs: files the command reads (model, images, labels, inventory): never overwritten.
        folders: ``(path, flag)`` pairs of folders the command reads (``--data``): a report
            written inside would join the data.

    Raises:
        RunnerError: naming the flag, the path and what it collides with.
    """
    outs = [(str(p), f) for p, f in outputs if p]
    real = [os.path.realpath(p) for p, _ in outs]
    for i, (path, flag) in enumerate(outs):
        refuse_special_output(path, flag)
        for j in range(i):
            if real[i] == real[j]:
                raise RunnerError("%s and %s name the same file %s: give each its own file"
                                  % (outs[j][1], flag, path))
        for item in inputs:
            if item and os.path.realpath(str(item)) == real[i]:
                raise RunnerError("cannot write %s %s: it is an input of this command (%s); "
                                  "give another file name" % (flag, path, item))
        for folder, folder_flag in folders:
            if not folder:
                continue
            top = os.path.realpath(str(folder))
            if real[i] == top or real[i].startswith(top.rstrip(os.sep) + os.sep):
                raise RunnerError("cannot write %s %s: it is inside the %s folder %s; write it "
                                  "elsewhere" % (flag, path, folder_flag, folder))


def write_json(path: str, report: dict) -> None:
    """Write ``report`` as JSON to ``path`` (temporary file, then rename; removed on failure).

    Raises:
        RunnerError: ``cannot write --json PATH: reason``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise RunnerError("cannot write --json %s: folder %s does not exist" % (path, directory))
    refuse_special_output(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgetl-report-", suffix=".json", dir=directory)
    except OSError as exc:
        raise RunnerError("cannot write --json %s: %s" % (path, exc.strerror or exc)) from None
    try:
        shareable(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise RunnerError("cannot write --json %s: %s" % (path, exc.strerror or exc)) from None
        raise


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError("not JSON serialisable: %r" % type(obj))


def finite(report):
    """Replace inf/nan (e.g. throughput of a 0 ms mean) by None so the JSON stays standard."""
    if isinstance(report, dict):
        return {k: finite(v) for k, v in report.items()}
    if isinstance(report, list):
        return [finite(v) for v in report]
    if isinstance(report, float) and not math.isfinite(report):
        return None
    return report


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
        if args.json:
            # an --image folder is read like --data: a report inside it would join the images
            check_outputs([(args.json, "--json")], [args.model, args.labels, *(args.image or [])],
                          [(args.data, "--data")]
                          + [(i, "--image") for i in args.image or [] if os.path.isdir(i)])
            check_writable(args.json)
        report = finite(run(args))
        if args.json:
            write_json(args.json, report)
        if not args.quiet:
            print(format_report(report))
            if args.json:
                print("report written to %s" % args.json)
        return 0
    except RunnerError as exc:
        sys.stdout.flush()
        print("error: %s" % printable(" ".join(str(exc).split())), file=sys.stderr)
        return RunnerError.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
