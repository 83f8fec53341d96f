"""What is inside a ``.tflite``: ops, dtypes, quantization, Edge TPU compatibility.

Pure Python over the runner's reader (``edgetl.runner.read_model``, LiteRT's generated schema
module): no TensorFlow, no interpreter, so it also answers for files the interpreter refuses
(custom ops, broken models).

Two questions get a precise answer here:

* **Is it integer-only?** Every op computes on 8-bit integers (int32 for biases and shapes; int16
  activations only in int16x8 mode), no float tensor flows into or out of any op, and there is no
  QUANTIZE/DEQUANTIZE inside the graph. The only conversions allowed are at the model's boundary,
  and only when they implement the I/O type that was asked for: ``io="uint8"`` allows a QUANTIZE
  uint8->int8 on an input and int8->uint8 on an output (the TFLite converter's way of giving an
  int8 model uint8 I/O); ``io="float32"`` allows a QUANTIZE float32->int8 on an input and a
  DEQUANTIZE int8->float32 on an output. ``io="int8"`` allows none.
* **Will it run on the Edge TPU?** An offline check against Coral's documented op table
  (https://coral.ai/docs/edgetpu/models-intro/#supported-operations), or the compiler's own
  answer when ``edgetpu_compiler`` is on PATH.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError

IO_TYPES = ("int8", "uint8", "float32")
FLOAT_TYPES = frozenset({"float16", "float32", "float64", "bfloat16", "complex64", "complex128"})
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
OFFLINE_SOURCE = "offline check (Coral's documented op table)"
NO_COMPILER = OFFLINE_SOURCE + "; edgetpu_compiler not found"
AFTER_FIRST_UNSUPPORTED = "CPU (after first unsupported op)"
COMPILER_MAPPED = "Mapped to Edge TPU"

# Coral's supported-operations table: TFLite builtin name -> (Coral's name, documented limitation).
# The limitations that can be checked from shapes and dtypes alone are checked in _edgetpu_op_issue;
# the others are shown as notes. HARD_SWISH is deliberately absent: Coral's table does not list it
# and google-coral/edgetpu#272 ("Will EdgeTPU support LeakyRelu and Hardswish ops?") is still open.
EDGETPU_OPS: dict[str, tuple[str, str]] = {
    "ADD": ("Add", ""),
    "AVERAGE_POOL_2D": ("AveragePool2d", "No fused activation function."),
    "CONCATENATION": (
        "Concatenation",
        "No fused activation function. A constant input must be all zeros, with only 2 inputs.",
    ),
    "CONV_2D": ("Conv2d", "Must use the same dilation in x and y dimensions."),
    "DEPTHWISE_CONV_2D": ("DepthwiseConv2d", "Must use the same dilation in x and y dimensions."),
    "EXPAND_DIMS": ("ExpandDims", ""),
    "FULLY_CONNECTED": (
        "FullyConnected",
        "Only the default weights format. Output tensor is one-dimensional.",
    ),
    "L2_NORMALIZATION": ("L2Normalization", ""),
    "LOGISTIC": ("Logistic", ""),
    "LSTM": ("LSTM", "Unidirectional LSTM only."),
    "UNIDIRECTIONAL_SEQUENCE_LSTM": ("LSTM", "Unidirectional LSTM only."),
    "MAXIMUM": ("Maximum", ""),
    "MAX_POOL_2D": ("MaxPool2d", "No fused activation function."),
    "MEAN": (
        "Mean",
        "No reduction in batch dimension. A z-reduction needs a z-dimension multiple of 4.",
    ),
    "MINIMUM": ("Minimum", ""),
    "MUL": ("Mul", ""),
    "PACK": ("Pack", "No packing in batch dimension."),
    "PAD": ("Pad", "No padding in batch dimension."),
    "PRELU": ("PReLU", "Alpha must be 1-dimensional (Keras PReLU: shared_axes=[1, 2])."),
    "QUANTIZE": ("Quantize", ""),
    "REDUCE_MAX": ("ReduceMax", "Cannot operate on the batch dimension."),
    "REDUCE_MIN": ("ReduceMin", "Cannot operate on the batch dimension."),
    "RELU": ("ReLU", ""),
    "RELU6": ("ReLU6", ""),
    "RELU_N1_TO_1": ("ReLUN1To1", ""),
    "RESHAPE": ("Reshape", "Certain reshapes might not be mapped for large tensor sizes."),
    "RESIZE_BILINEAR": (
        "ResizeBilinear",
        "3-D input/output; may stay on the CPU to avoid precision loss, depending on sizes.",
    ),
    "RESIZE_NEAREST_NEIGHBOR": (
        "ResizeNearestNeighbor",
        "3-D input/output; may stay on the CPU to avoid precision loss, depending on sizes.",
    ),
    "RSQRT": ("Rsqrt", ""),
    "SLICE": ("Slice", ""),
    "SOFTMAX": ("Softmax", "Only a 1-D input tensor with at most 16,000 elements."),
    "SPACE_TO_DEPTH": ("SpaceToDepth", ""),
    "SPLIT": ("Split", "No splitting in batch dimension."),
    "SQUEEZE": ("Squeeze", "Only when the squeezed dimensions are leading 1s (no relayout)."),
    "STRIDED_SLICE": (
        "StridedSlice",
        "All strides equal to 1, ellipsis-axis-mask == 0 and new-axis-mask == 0.",
    ),
    "SUB": ("Sub", ""),
    "SUM": ("Sum", "Cannot operate on the batch dimension."),
    "SQUARED_DIFFERENCE": ("Squared-difference", ""),
    "TANH": ("Tanh", ""),
    "TRANSPOSE": ("Transpose", ""),
    "TRANSPOSE_CONV": ("TransposeConv", ""),
}
SOFTMAX_MAX_ELEMENTS = 16000


def _runner():
    """The device runner module, imported late so ``import edgetl.inspect`` stays light."""
    from edgetl import runner

    return runner


def load_info(path: str | os.PathLike) -> Any:
    """Read a ``.tflite`` file's structure with the runner's reader (no interpreter).

    Args:
        path: the model file.

    Returns:
        The runner's ``ModelInfo``.

    Raises:
        EdgetlError: the file is missing or is not a TFLite flatbuffer (one line, naming the file).
    """
    runner = _runner()
    p = Path(path)
    problem = runner.path_problem(p, "model file")  # missing, a symlink loop, a FIFO, ...
    if problem:
        raise EdgetlError(f"{problem}; pass the path of a .tflite file")
    try:  # opens regular files only: a FIFO or a device is refused, never read
        return runner.read_model(p)
    except runner.RunnerError as e:
        raise EdgetlError(str(e)) from e
    except Exception as e:  # a truncated or hostile flatbuffer must still give one line
        raise EdgetlError(
            f"{p} is not a readable TFLite model ({type(e).__name__}: {e}); "
            "pass a .tflite file written by the TFLite converter"
        ) from e


# --------------------------------------------------------------------------------------------
# Small accessors: the reader's dataclasses, read defensively so third-party files never crash.


def _tensor(info: Any, index: int) -> Any | None:
    if index is None or index < 0 or index >= len(info.tensors):
        return None  # optional input (-1) or a malformed index
    return info.tensors[index]


def _dims(t: Any) -> list[int]:
    return [int(d) for d in (getattr(t, "shape", None) or [])]


def _signature(t: Any) -> list[int]:
    sig = getattr(t, "shape_signature", None)
    return [int(d) for d in sig] if sig is not None and len(sig) else _dims(t)


def _dynamic_dims(t: Any) -> bool:
    """A size unknown at compile time. A -1 batch whose concrete shape is 1 does not count: every
    Keras model converts that way, and the Edge TPU compiler takes it as batch 1."""
    sig, dims = _signature(t), _dims(t)
    return any(d < 0 and not (i == 0 and dims[:1] == [1]) for i, d in enumerate(sig))


def _op_tensors(info: Any, op: Any) -> tuple[list[Any], list[Any]]:
    ins = [t for t in (_tensor(info, i) for i in op.inputs) if t is not None]
    outs = [t for t in (_tensor(info, i) for i in op.outputs) if t is not None]
    return ins, outs


def _io_indices(info: Any) -> tuple[list[int], list[int]]:
    def idx(items):
        return [int(getattr(x, "index", x)) for x in items]

    return idx(info.inputs), idx(info.outputs)


def _io_tensors(info: Any, which: str) -> list[Any]:
    ins, outs = _io_indices(info)
    return [info.tensors[i] for i in (ins if which == "input" else outs)]


def _subgraph_count(info: Any) -> int:
    for name in ("subgraph_count", "num_subgraphs", "subgraphs"):
        value = getattr(info, name, None)
        if value is not None:
            return len(value) if isinstance(value, (list, tuple)) else int(value)
    return 1


def _describe(t: Any, role: str) -> str:
    return f"{t.dtype} {role} '{t.name}'"


def _scales(t: Any) -> list[float]:
    return [float(s) for s in (getattr(t, "scale", None) or [])]


def _zero_points(t: Any) -> list[int]:
    return [int(z) for z in (getattr(t, "zero_point", None) or [])]


# --------------------------------------------------------------------------------------------
# Integer-only


def integer_only_report(
    info: Any,
    io: str = "int8",
    *,
    int16x8: bool = False,
    allow_uint8: bool = False,
) -> list[str]:
    """List what keeps a model from being integer-only with the given I/O type.

    A model is integer-only when every op computes on int8 (int32 biases and shapes; int16
    activations only with ``int16x8``), no float tensor flows into or out of any op, no
    QUANTIZE/DEQUANTIZE sits inside the graph, and the model's inputs and outputs have type ``io``.
    Conversions at the boundary are legitimate only when they implement ``io``: with ``"uint8"`` a
    QUANTIZE uint8->int8 on a model input and int8->uint8 on a model output (what the TFLite
    converter emits for ``inference_input_type=tf.uint8``); with ``"float32"`` a QUANTIZE
    float32->int8 on an input and a DEQUANTIZE int8->float32 on an output.

    Args:
        info: the runner's ``ModelInfo`` (``edgetl.runner.read_model``).
        io: the I/O type asked for: ``"int8"``, ``"uint8"`` or ``"float32"`` (``"int16"`` too with
            ``int16x8``).
        int16x8: accept int16 activations (and int64 biases): TFLite's 16x8 quantization mode.
        allow_uint8: accept uint8 activations inside the graph, as in TF1-era asymmetric uint8
            models (Coral's MobileNets). edgetl's own exports never need this.

    Returns:
        One line per offending op or I/O tensor, e.g. ``"#12 ADD (float32 input 'x')"`` or
        ``"model input 'images' is float32, expected int8"``; empty when the model is integer-only.

    Raises:
        EdgetlError: ``io`` is not one of the accepted types.
    """
    accepted = IO_TYPES + (("int16",) if int16x8 else ())
    if io not in accepted:
        raise EdgetlError(f"unknown I/O type {io!r}; use one of {', '.join(accepted)}")
    act = {"int8"} | ({"int16"} if int16x8 else set()) | ({"uint8"} if allow_uint8 else set())
    allowed = act | {"int32", "int64", "bool"}
    in_idx, out_idx = _io_indices(info)
    offenders: list[str] = []

    for t in _io_tensors(info, "input"):
        if t.dtype != io:
            offenders.append(f"model input '{t.name}' is {t.dtype}, expected {io}")
    for t in _io_tensors(info, "output"):
        if t.dtype != io:
            offenders.append(f"model output '{t.name}' is {t.dtype}, expected {io}")

    for op in info.operators:
        ins, outs = _op_tensors(info, op)
        where = f"#{op.index} {op.op}"
        if op.op in ("QUANTIZE", "DEQUANTIZE"):
            problem = _boundary_problem(op.op, ins, outs, io, act, in_idx, out_idx)
            if problem:
                offenders.append(f"{where} ({problem})")
            continue
        bad = [_describe(t, "input") for t in ins if t.dtype not in allowed]
        bad += [_describe(t, "output") for t in outs if t.dtype not in allowed]
        if bad:
            shown = ", ".join(bad[:3]) + (f", +{len(bad) - 3} more" if len(bad) > 3 else "")
            offenders.append(f"{where} ({shown})")
    return offenders


def _boundary_problem(
    name: str,
    ins: list[Any],
    outs: list[Any],
    io: str,
    act: set[str],
    in_idx: list[int],
    out_idx: list[int],
) -> str | None:
    """Why a QUANTIZE/DEQUANTIZE is not a legitimate I/O conversion for ``io`` (None: it is)."""
    if not ins or not outs:
        return "malformed conversion op"
    a, b = ins[0], outs[0]
    conv = f"{a.dtype} '{a.name}' -> {b.dtype} '{b.name}'"
    on_input = a.index in in_idx
    on_output = b.index in out_idx
    if name == "QUANTIZE":
        if on_input and a.dtype == io and io in ("uint8", "float32") and b.dtype in act:
            return None
        if on_output and io == "uint8" and a.dtype in act and b.dtype == "uint8":
            return None
        if on_input or on_output:
            return f"I/O conversion {conv} does not match io={io}"
        return f"QUANTIZE inside the graph: {conv}"
    # DEQUANTIZE
    if on_output and io == "float32" and a.dtype in act and b.dtype == "float32":
        return None
    if a.dtype in FLOAT_TYPES:
        return f"float weights dequantized at run time: {conv}"
    if on_output:
        return f"I/O conversion {conv} does not match io={io}"
    return f"DEQUANTIZE inside the graph: {conv}"


def is_integer_only(
    info: Any,
    io: str = "int8",
    *,
    int16x8: bool = False,
    allow_uint8: bool = False,
) -> bool:
    """Whether a model is integer-only with the given I/O type.

    Args:
        info: the runner's ``ModelInfo``.
        io: ``"int8"``, ``"uint8"`` or ``"float32"`` (see ``integer_only_report``).
        int16x8: accept int16 activations (16x8 quantization mode).
        allow_uint8: accept uint8 activations inside the graph (TF1-era uint8 models).

    Returns:
        True when ``integer_only_report`` finds nothing.
    """
    return not integer_only_report(info, io, int16x8=int16x8, allow_uint8=allow_uint8)


# --------------------------------------------------------------------------------------------
# Format / mode


def _weight_dtypes(info: Any) -> Counter:
    """Dtypes of the weight inputs (input 1) of the ops that carry weights."""
    weighted = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}
    c: Counter = Counter()
    for op in info.operators:
        if op.op in weighted and len(op.inputs) > 1:
            t = _tensor(info, op.inputs[1])
            if t is not None:
                c[t.dtype] += 1
    return c


def infer_mode(info: Any) -> str:
    """Name a model's numeric format from its tensors and ops alone.

    Args:
        info: the runner's ``ModelInfo``.

    Returns:
        ``"edgetpu"`` (compiled for the Edge TPU), ``"int8"`` / ``"int16x8"`` (integer-only),
        ``"int8 (uint8 I/O)"`` / ``"int8 (float I/O)"`` (int8 inside, another I/O type),
        ``"uint8"`` (TF1-era: uint8 throughout),
        ``"float16"`` (float16 weights), ``"dynamic"`` (int8 weights, float activations),
        ``"float32"``, or ``"mixed"`` (integer activations and some float ops, e.g. an int8
        export with ``--keep-float``).
    """
    names = {op.op for op in info.operators}
    if EDGETPU_CUSTOM_OP in names:
        return "edgetpu"
    ins = _io_tensors(info, "input")
    io = ins[0].dtype if ins else "float32"
    act_dtypes = {t.dtype for t in info.tensors}
    int16x8 = "int16" in act_dtypes and io in ("int16", "float32")
    for candidate in (io, "float32"):
        if candidate in IO_TYPES + (("int16",) if int16x8 else ()) and is_integer_only(
            info, candidate, int16x8=int16x8, allow_uint8=True
        ):
            if int16x8:
                return "int16x8"
            if candidate == "uint8" and "int8" in act_dtypes:  # int8 inside, as export says
                return "int8 (uint8 I/O)"
            return candidate if candidate != "float32" else "int8 (float I/O)"
    weights = _weight_dtypes(info)
    if weights.get("float16") or ("DEQUANTIZE" in names and "float16" in act_dtypes):
        return "float16"
    # Dynamic range: int8 weights with float activations. The converter leaves tensors under
    # 1024 elements (small depthwise kernels) in float, so some float weights are normal.
    # An int8 model with a few float ops (--keep-float, --auto) has integer activations too.
    runtime = {info.tensors[i].dtype for i in _activation_indices(info) if i < len(info.tensors)}
    if weights.get("int8") and "float32" in act_dtypes and weights["int8"] >= weights.get(
            "float32", 0) and not runtime & {"int8", "uint8", "int16"}:
        return "dynamic"
    if act_dtypes & {"int8", "uint8", "int16"}:
        return "mixed"
    return "float32"


# --------------------------------------------------------------------------------------------
# Edge TPU


def _activation_indices(info: Any) -> set[int]:
    """Tensors computed at run time (model inputs and op outputs), as opposed to weights."""
    ins, _ = _io_indices(info)
    return set(ins) | {i for op in info.operators for i in op.outputs if i is not None and i >= 0}


def _edgetpu_op_issue(info: Any, op: Any, activations: set[int]) -> str | None:
    """Why one op cannot map to the Edge TPU by Coral's table (None: it can)."""
    if op.op not in EDGETPU_OPS:
        return f"{op.op} is not in Coral's supported-operations table"
    ins, outs = _op_tensors(info, op)
    for role, tensors in (("input", ins), ("output", outs)):
        for t in tensors:
            if t.dtype not in ("int8", "uint8", "int32"):
                return f"{_describe(t, role)}: the Edge TPU computes on 8-bit quantized tensors"
            if t.dtype == "int32" or t.index not in activations:
                continue  # biases, weights, shape/axis parameters: the size rules are for data
            if _dynamic_dims(t):
                return f"{role} '{t.name}' has a dynamic shape {_signature(t)}"
            dims = _dims(t)
            if any(d > 1 for d in dims[:-3]):
                return (
                    f"{role} '{t.name}' shape {dims}: only the 3 innermost dimensions may be "
                    "larger than 1 (batch must be 1)"
                )
    if op.op == "SOFTMAX" and ins:
        dims = _dims(ins[0])
        n = math.prod(dims) if dims else 1
        if sum(d > 1 for d in dims) > 1 or n > SOFTMAX_MAX_ELEMENTS:
            return (
                f"Softmax input shape {dims}: only 1-D with at most "
                f"{SOFTMAX_MAX_ELEMENTS} elements"
            )
    if op.op == "FULLY_CONNECTED" and outs:
        dims = _dims(outs[0])
        if sum(d > 1 for d in dims) > 1:
            return f"FullyConnected output shape {dims}: the output must be one-dimensional"
    fused = getattr(op, "fused_activation", None)
    if fused and str(fused).upper() not in ("NONE", "0") and op.op in (
        "AVERAGE_POOL_2D",
        "MAX_POOL_2D",
        "CONCATENATION",
    ):
        return f"{op.op} with fused activation {fused}: not supported"
    return None


def _is_cpu_boundary(info: Any, op: Any, in_idx: list[int], out_idx: list[int]) -> bool:
    """A float<->int conversion at the model boundary: stays on the CPU, does not cut the graph."""
    ins, outs = _op_tensors(info, op)
    if not ins or not outs:
        return False
    if op.op == "QUANTIZE":
        return ins[0].index in in_idx and ins[0].dtype in FLOAT_TYPES
    if op.op == "DEQUANTIZE":
        return outs[0].index in out_idx and outs[0].dtype in FLOAT_TYPES
    return False


def edgetpu_report(info: Any) -> list[dict]:
    """Per-op Edge TPU mapping, by Coral's documented op table (offline, no compiler).

    The Edge TPU compiler cuts the graph once: from the first unsupported op on, everything runs
    on the CPU even when supported, and such ops are reported as ``"CPU (after first unsupported
    op)"``. Float<->int conversions at the model's own inputs/outputs run on the CPU without
    cutting the graph. In a model already compiled for the Edge TPU, the ``edgetpu-custom-op``
    runs on the Edge TPU and every other op on the CPU.

    Args:
        info: the runner's ``ModelInfo``.

    Returns:
        One dict per op, in execution order: ``index``, ``op``, ``count`` (1), ``maps`` (bool),
        ``reason`` (``"Mapped to Edge TPU"`` or why not) and ``note`` (Coral's documented
        limitation for the op, which the offline check cannot always verify; may be empty).
    """
    rows: list[dict] = []
    names = [op.op for op in info.operators]
    if EDGETPU_CUSTOM_OP in names:
        for op in info.operators:
            on_tpu = op.op == EDGETPU_CUSTOM_OP
            reason = (
                "compiled Edge TPU subgraph"
                if on_tpu
                else "CPU (outside the compiled Edge TPU subgraph)"
            )
            rows.append(_row(op.index, op.op, on_tpu, reason))
        return rows
    in_idx, out_idx = _io_indices(info)
    activations = _activation_indices(info)
    cut = False
    for op in info.operators:
        if cut:
            rows.append(_row(op.index, op.op, False, AFTER_FIRST_UNSUPPORTED))
            continue
        if _is_cpu_boundary(info, op, in_idx, out_idx):
            rows.append(_row(op.index, op.op, False, "CPU (float I/O conversion)"))
            continue
        issue = _edgetpu_op_issue(info, op, activations)
        if issue:
            cut = True
            rows.append(_row(op.index, op.op, False, issue))
            continue
        rows.append(_row(op.index, op.op, True, COMPILER_MAPPED, note=EDGETPU_OPS[op.op][1]))
    return rows


def _row(
    index: int | None, op: str, maps: bool, reason: str, count: int = 1, note: str = ""
) -> dict:
    return {"index": index, "op": op, "count": count, "maps": maps, "reason": reason, "note": note}


def summarize_rows(rows: list[dict]) -> list[dict]:
    """Merge op rows into the compiler's table form: one row per (op, reason), first seen first.

    Args:
        rows: ``edgetpu_report`` or ``parse_compiler_log`` rows.

    Returns:
        Rows with ``index`` None and ``count`` summed, like the compiler's "Operator / Count /
        Status" table.
    """
    merged: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["op"], r["reason"])
        if key in merged:
            merged[key]["count"] += r["count"]
        else:
            merged[key] = dict(r, index=None)
    return list(merged.values())


def edgetpu_requirements(info: Any) -> list[dict]:
    """Whole-model Edge TPU requirements, each checked offline.

    Args:
        info: the runner's ``ModelInfo``.

    Returns:
        One dict per requirement: ``name``, ``ok`` (bool), ``detail``. Requirements: integer-only
        (8-bit), uint8 or int8 input and output, batch 1, static shapes, a single subgraph, and
        every op in Coral's table.
    """
    ins, outs = _io_tensors(info, "input"), _io_tensors(info, "output")
    io_types = sorted({t.dtype for t in ins + outs})
    io = io_types[0] if len(io_types) == 1 else None
    req: list[dict] = []

    if io in ("int8", "uint8"):
        offenders = integer_only_report(info, io, allow_uint8=True)
        detail = "yes" if not offenders else "; ".join(offenders[:3]) + (
            f" (+{len(offenders) - 3} more)" if len(offenders) > 3 else ""
        )
        req.append({"name": "integer-only (8-bit)", "ok": not offenders, "detail": detail})
    else:
        req.append(
            {
                "name": "integer-only (8-bit)",
                "ok": False,
                "detail": f"I/O is {'/'.join(io_types) or 'missing'}; "
                "quantize with int8 or uint8 I/O",
            }
        )
    req.append(
        {
            "name": "uint8 or int8 input and output",
            "ok": bool(io_types) and set(io_types) <= {"int8", "uint8"},
            "detail": ", ".join(f"{t.name or '?'}: {t.dtype}" for t in ins + outs),
        }
    )
    batches = [(_dims(t) or [1])[0] for t in ins]
    req.append(
        {
            "name": "batch 1",
            "ok": all(b == 1 for b in batches),
            "detail": "input batch " + ", ".join(str(b) for b in batches),
        }
    )
    dynamic = [
        info.tensors[i].name
        for i in sorted(_activation_indices(info))
        if i < len(info.tensors) and _dynamic_dims(info.tensors[i])
    ]
    req.append(
        {
            "name": "static shapes",
            "ok": not dynamic,
            "detail": "yes" if not dynamic else "dynamic: " + ", ".join(dynamic[:5]),
        }
    )
    n = _subgraph_count(info)
    req.append({"name": "single subgraph", "ok": n == 1, "detail": f"{n} subgraph(s)"})
    unknown = sorted(
        {op.op for op in info.operators if op.op not in EDGETPU_OPS} - {EDGETPU_CUSTOM_OP}
    )
    req.append(
        {
            "name": "only supported ops",
            "ok": not unknown,
            "detail": "yes" if not unknown else "not in Coral's table: " + ", ".join(unknown),
        }
    )
    return req


def parse_compiler_log(text: str) -> dict:
    """Parse ``edgetpu_compiler`` output (console with ``-s``, or the ``*_edgetpu.log`` file).

    Args:
        text: the compiler's text.

    Returns:
        A dict with ``version`` (str or None), ``compiled`` (bool), ``error`` (the failure line or
        None), ``subgraphs``, ``total_ops``, ``tpu_ops``, ``cpu_ops`` (ints or None) and ``rows``:
        one dict per line of the "Operator / Count / Status" table, in the same form as
        ``edgetpu_report`` (``index`` None, ``op``, ``count``, ``maps``, ``reason`` = the status).
    """

    def number(pattern: str) -> int | None:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None

    version = re.search(r"Edge TPU Compiler version\s+(\S+)", text)
    rows: list[dict] = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"^\s*Operator\s+Count\s+Status\s*$", line):
            in_table = True
            continue
        if not in_table:
            continue
        m = re.match(r"^\s*([A-Za-z][\w\-]*)\s+(\d+)\s+(\S.*?)\s*$", line)
        if m:
            status = m.group(3)
            rows.append(_row(None, m.group(1), status == COMPILER_MAPPED, status, int(m.group(2))))
        elif line.strip() and rows:
            in_table = False  # the table ended
    error = None
    for line in text.splitlines():
        if re.search(r"(?i)(compilation failed|^\s*error:|internal compiler error)", line):
            error = line.strip()
            break
    tpu = number(r"Number of operations that will run on Edge TPU:\s*(\d+)")
    cpu = number(r"Number of operations that will run on CPU:\s*(\d+)")
    if rows and tpu is None:
        tpu = sum(r["count"] for r in rows if r["maps"])
        cpu = sum(r["count"] for r in rows if not r["maps"])
    return {
        "version": version.group(1) if version else None,
        "compiled": "Model compiled successfully" in text and error is None,
        "error": error,
        "subgraphs": number(r"Number of Edge TPU subgraphs:\s*(\d+)"),
        "total_ops": number(r"Total number of operations:\s*(\d+)"),
        "tpu_ops": tpu,
        "cpu_ops": cpu,
        "rows": rows,
    }


def run_edgetpu_compiler(
    path: str | os.PathLike, out_dir: str | os.PathLike, timeout: float = 300.0
) -> dict:
    """Compile a model with ``edgetpu_compiler`` and parse what it says.

    Args:
        path: the ``.tflite`` to compile.
        out_dir: where the compiler writes ``<name>_edgetpu.tflite`` and its ``.log``.
        timeout: seconds before the compiler is stopped.

    Returns:
        ``parse_compiler_log``'s dict plus ``output`` (the compiled model's path, or None),
        ``returncode`` and ``text`` (console output followed by the log file).

    Raises:
        EdgetlError: ``edgetpu_compiler`` is not on PATH, or it did not finish in time.
    """
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        raise EdgetlError(
            "edgetpu_compiler not found on PATH; install it on x86-64 Linux "
            "(https://coral.ai/docs/edgetpu/compiler/) or rely on the offline check"
        )
    src = Path(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [exe, "-s", "-o", str(out), str(src)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise EdgetlError(f"edgetpu_compiler did not finish within {timeout:.0f} s on {src}") from e
    text = proc.stdout + proc.stderr
    log = out / f"{src.stem}_edgetpu.log"
    if log.is_file():
        log_text = log.read_text(errors="replace")
        if not re.search(r"^\s*Operator\s+Count\s+Status", text, re.M):
            text += "\n" + log_text
    result = parse_compiler_log(text)
    compiled = out / f"{src.stem}_edgetpu.tflite"
    result.update(
        output=str(compiled) if compiled.is_file() else None,
        returncode=proc.returncode,
        text=text,
    )
    if proc.returncode != 0 and result["error"] is None:
        result["error"] = f"edgetpu_compiler exited with {proc.returncode}"
        result["compiled"] = False
    return result


def edgetpu_section(
    info: Any, path: str | os.PathLike | None = None, compiler: bool = True
) -> dict:
    """The Edge TPU part of an inspection: requirements, per-op rows, verdict.

    Args:
        info: the runner's ``ModelInfo``.
        path: the model file, needed to run ``edgetpu_compiler``.
        compiler: run ``edgetpu_compiler`` when it is on PATH (else the offline check only).

    Returns:
        A dict: ``compiled`` (already compiled for the Edge TPU), ``source`` (which check
        answered), ``verdict`` (one line), ``requirements`` (``edgetpu_requirements``), ``ops``
        (``edgetpu_report`` rows), ``tpu_ops``/``cpu_ops`` counts, ``first_unsupported``
        (``"#i OP: reason"`` or None), and ``compiler`` (``run_edgetpu_compiler``'s dict without
        its raw text, or None).
    """
    rows = edgetpu_report(info)
    compiled = any(op.op == EDGETPU_CUSTOM_OP for op in info.operators)
    tpu = sum(r["maps"] for r in rows)
    cpu = len(rows) - tpu
    first = next(
        (r for r in rows if not r["maps"] and not r["reason"].startswith("CPU (")),
        None,
    )
    section: dict[str, Any] = {
        "compiled": compiled,
        "source": OFFLINE_SOURCE,
        "requirements": [] if compiled else edgetpu_requirements(info),
        "ops": rows,
        "tpu_ops": tpu,
        "cpu_ops": cpu,
        "first_unsupported": (
            f"#{first['index']} {first['op']}: {first['reason']}" if first else None
        ),
        "compiler": None,
    }
    if compiled:
        section["source"] = f"compiled model ({EDGETPU_CUSTOM_OP} present)"
        section["verdict"] = (
            f"already compiled for the Edge TPU ({tpu} {EDGETPU_CUSTOM_OP}, {cpu} op(s) on CPU)"
        )
        return section
    if compiler and path is not None and shutil.which("edgetpu_compiler"):
        with tempfile.TemporaryDirectory(prefix="edgetl-edgetpu-") as tmp:
            result = run_edgetpu_compiler(path, tmp)
        result.pop("text", None)
        result["output"] = None  # it lived in a temporary directory
        section["compiler"] = result
        section["source"] = f"edgetpu_compiler {result['version'] or '(unknown version)'}"
        if result["error"]:
            section["verdict"] = f"edgetpu_compiler failed: {result['error']}"
        else:
            section["verdict"] = (
                f"edgetpu_compiler: {result['tpu_ops']} op(s) on Edge TPU, "
                f"{result['cpu_ops']} on CPU"
            )
        return section
    if shutil.which("edgetpu_compiler") is None:
        section["source"] = NO_COMPILER
    else:
        section["source"] = OFFLINE_SOURCE + "; edgetpu_compiler not run"
    reqs_ok = all(r["ok"] for r in section["requirements"])
    if tpu == len(rows) and reqs_ok:
        section["verdict"] = f"should fully map: all {tpu} ops on the Edge TPU"
    elif tpu == 0:
        section["verdict"] = "will not map: every op would run on the CPU"
    else:
        section["verdict"] = f"partially maps: {tpu} of {len(rows)} ops on the Edge TPU"
    return section


# --------------------------------------------------------------------------------------------
# The whole inspection


def _io_entry(t: Any) -> dict:
    return {
        "index": t.index,
        "name": t.name,
        "dtype": t.dtype,
        "shape": _dims(t),
        "scale": _scales(t),
        "zero_point": _zero_points(t),
    }


def _metadata_summary(meta: dict | None) -> dict | None:
    if not meta:
        return None
    out = {k: v for k, v in meta.items() if k != "labels"}
    labels = meta.get("labels")
    if isinstance(labels, (list, tuple)):
        out["labels_count"] = len(labels)
        out["labels_preview"] = list(labels[:5])
    return out


def inspect_model(path: str | os.PathLike, *, compiler: bool = True) -> dict:
    """Describe a ``.tflite`` file: structure, quantization, integer-only status, Edge TPU fit.

    Works on any TFLite flatbuffer, including third-party models, Edge TPU-compiled models and
    models whose custom ops no interpreter can run; nothing is executed.

    Args:
        path: the model file.
        compiler: run ``edgetpu_compiler`` when it is on PATH (the offline check always runs).

    Returns:
        A JSON-able dict: ``path``, ``size_bytes``, ``schema_version``, ``subgraphs``, ``mode``
        (``infer_mode``), ``op_count``, ``ops`` (name -> count, most frequent first),
        ``tensor_dtypes`` (dtype -> count), ``inputs``/``outputs`` (name, dtype, shape, scale,
        zero_point), ``integer_only`` (``ok``, ``io``, ``offenders``), ``edgetpu``
        (``edgetpu_section``), ``metadata_names`` (the flatbuffer's metadata entries),
        ``metadata`` (edgetl's metadata with ``labels`` replaced by ``labels_count`` and
        ``labels_preview``, or None) and ``metadata_error`` (why appended metadata could not be
        read, or None).

    Raises:
        EdgetlError: the file is missing or not a TFLite model (one line).
    """
    p = Path(path)
    info = load_info(p)
    runner = _runner()
    meta_error = None
    try:
        meta = runner.read_metadata(p)
    except Exception as e:  # damaged metadata is reported, and must not hide the model itself
        meta, meta_error = None, " ".join(str(e).split()) or type(e).__name__
    ops = Counter(op.op for op in info.operators)
    dtypes = Counter(t.dtype for t in info.tensors)
    ins, outs = _io_tensors(info, "input"), _io_tensors(info, "output")
    io_types = {t.dtype for t in ins + outs}
    io = next(iter(io_types)) if len(io_types) == 1 else (ins[0].dtype if ins else "int8")
    int16x8 = "int16" in dtypes and io in ("int16", "float32")
    if io in IO_TYPES or (int16x8 and io == "int16"):
        offenders = integer_only_report(info, io, int16x8=int16x8, allow_uint8=True)
    else:
        offenders = [f"model I/O is {io}, not one of {', '.join(IO_TYPES)}"]
    if any(op.op == EDGETPU_CUSTOM_OP for op in info.operators):
        # The compiled subgraph is opaque: its tensors are 8-bit, but its ops are not visible.
        offenders = [o for o in offenders if EDGETPU_CUSTOM_OP not in o]
    return {
        "path": str(p),
        "size_bytes": p.stat().st_size,
        "schema_version": getattr(info, "version", None),
        "min_runtime_version": getattr(info, "min_runtime_version", None) or None,
        "description": getattr(info, "description", None) or None,
        "subgraphs": _subgraph_count(info),
        "mode": infer_mode(info),
        "op_count": len(info.operators),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "tensor_count": len(info.tensors),
        "tensor_dtypes": dict(sorted(dtypes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "inputs": [_io_entry(t) for t in ins],
        "outputs": [_io_entry(t) for t in outs],
        "integer_only": {"ok": not offenders, "io": io, "offenders": offenders},
        "edgetpu": edgetpu_section(info, p, compiler=compiler),
        "metadata_names": list(getattr(info, "metadata_names", None) or []),
        "metadata": _metadata_summary(meta),
        "metadata_error": meta_error,
    }


def _fmt_quant(entry: dict) -> str:
    if not entry["scale"]:
        return "not quantized"
    if len(entry["scale"]) == 1:
        return f"scale {entry['scale'][0]:.6g}, zero point {entry['zero_point'][0]}"
    return f"per-channel ({len(entry['scale'])} scales)"


def format_inspect(report: dict, max_rows: int = 12) -> str:
    """Render ``inspect_model``'s dict as a readable text block.

    Args:
        report: ``inspect_model``'s result.
        max_rows: how many Edge TPU op rows to show before summarising the rest.

    Returns:
        Multi-line text (no trailing newline); control characters in names read from the model
        (labels, tensor names, metadata strings) are escaped, so they cannot drive a terminal.
    """
    mb = report["size_bytes"] / 1e6
    lines = [
        f"{report['path']}",
        f"  size       {mb:.2f} MB ({report['size_bytes']} bytes), TFLite schema "
        f"v{report['schema_version']}, {report['subgraphs']} subgraph(s)"
        + (
            f", min runtime {report['min_runtime_version']}"
            if report["min_runtime_version"]
            else ""
        ),
        f"  format     {report['mode']}",
        f"  ops        {report['op_count']}: "
        + ", ".join(f"{k} x{v}" for k, v in report["ops"].items()),
        f"  tensors    {report['tensor_count']}: "
        + ", ".join(f"{k} x{v}" for k, v in report["tensor_dtypes"].items()),
    ]
    for kind in ("inputs", "outputs"):
        for e in report[kind]:
            lines.append(
                f"  {kind[:-1]:<10} '{e['name']}' {e['dtype']} {e['shape']} ({_fmt_quant(e)})"
            )
    io = report["integer_only"]
    if io["ok"]:
        lines.append(f"  integer-only yes ({io['io']} I/O)")
    elif report["mode"] in ("float32", "float16", "dynamic"):  # float on purpose: no list
        lines.append(f"  integer-only no (a {report['mode']} model: float by design; --json "
                     f"lists its {len(io['offenders'])} float ops and tensors)")
    else:
        lines.append(f"  integer-only NO ({io['io']} I/O): {len(io['offenders'])} offender(s)")
        lines += [f"    {o}" for o in io["offenders"][:max_rows]]
        if len(io["offenders"]) > max_rows:
            lines.append(f"    ... {len(io['offenders']) - max_rows} more")
    tpu = report["edgetpu"]
    lines.append(f"  Edge TPU   {tpu['verdict']}")
    lines.append(f"    source: {tpu['source']}")
    for r in tpu["requirements"]:
        lines.append(f"    [{'ok' if r['ok'] else 'NO'}] {r['name']}: {r['detail']}")
    if tpu["first_unsupported"]:
        lines.append(f"    first unsupported op: {tpu['first_unsupported']}")
    rows = summarize_rows(tpu["compiler"]["rows"] if tpu["compiler"] else tpu["ops"])
    if rows:
        lines.append(f"    {'Operator':<26} {'Count':>5}  Status")
    for r in rows[:max_rows]:
        lines.append(f"    {r['op']:<26} {r['count']:>5}  {r['reason']}")
    if len(rows) > max_rows:
        rest = rows[max_rows:]
        on_tpu = sum(r["count"] for r in rest if r["maps"])
        lines.append(
            f"    ... {len(rest)} more row(s): {on_tpu} op(s) on Edge TPU, "
            f"{sum(r['count'] for r in rest) - on_tpu} on CPU"
        )
    meta = report["metadata"]
    if report.get("metadata_error"):
        lines.append(f"  metadata   unreadable: {report['metadata_error']}")
    elif meta:
        lines.append(
            f"  metadata   edgetl: name {meta.get('name')!r}, mode {meta.get('mode')!r}, "
            f"{meta.get('labels_count', 0)} labels"
        )
        inp = meta.get("input")
        if isinstance(inp, dict):
            lines.append(
                "    input: "
                + ", ".join(f"{k}={v}" for k, v in inp.items() if not isinstance(v, dict))
            )
        if meta.get("labels_preview"):
            more = meta.get("labels_count", 0) - len(meta["labels_preview"])
            tail = f", ... +{more}" if more > 0 else ""
            lines.append("    labels: " + ", ".join(meta["labels_preview"]) + tail)
        for key in ("settings", "source_run", "versions"):
            value = meta.get(key)
            if isinstance(value, dict) and value:
                lines.append(
                    f"    {key}: " + ", ".join(f"{k}={v}" for k, v in list(value.items())[:12])
                )
        check = meta.get("verification")
        if isinstance(check, dict) and "passed" in check:
            failures = "; ".join(check.get("failures") or [])
            lines.append(
                "    verification: " + ("passed" if check["passed"] else f"FAILED: {failures}")
            )
    elif report["metadata_names"]:
        lines.append(f"  metadata   TFLite metadata: {', '.join(report['metadata_names'])}")
    else:
        lines.append("  metadata   none (not an edgetl export)")
    printable = _runner().printable
    return "\n".join(printable(line) for line in lines)
