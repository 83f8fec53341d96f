"""edgetl.inspect: integer-only rules, Edge TPU table and compiler log, real third-party models."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgetl import inspect as ins
from edgetl.errors import EdgetlError
from conftest import coral

REPO = Path(__file__).resolve().parents[1]



# ------------------------------------------------------------------------------------------
# A tiny stand-in for the runner's ModelInfo, to pin the rules without any converter.


def fake_model(tensors: dict, ops: list, inputs: list, outputs: list, subgraphs: int = 1):
    """tensors: name -> (dtype, shape[, shape_signature]); ops: (op, [inputs], [outputs])."""
    names = list(tensors)
    tinfo = []
    for i, (name, spec) in enumerate(tensors.items()):
        dtype, shape = spec[0], list(spec[1])
        sig = list(spec[2]) if len(spec) > 2 else None
        quant = dtype in ("int8", "uint8", "int16")
        tinfo.append(
            SimpleNamespace(
                index=i,
                name=name,
                dtype=dtype,
                shape=shape,
                shape_signature=sig,
                scale=[0.1] if quant else [],
                zero_point=[0] if quant else [],
            )
        )
    oinfo = [
        SimpleNamespace(
            index=k,
            op=op,
            inputs=[names.index(n) for n in ins_],
            outputs=[names.index(n) for n in outs],
        )
        for k, (op, ins_, outs) in enumerate(ops)
    ]
    return SimpleNamespace(
        operators=oinfo,
        tensors=tinfo,
        inputs=[names.index(n) for n in inputs],
        outputs=[names.index(n) for n in outputs],
        num_subgraphs=subgraphs,
        metadata_names=[],
        version=3,
    )


IMG = [1, 8, 8, 3]
FEAT = [1, 8, 8, 4]
CONV_W = {"w": ("int8", [4, 3, 3, 3]), "b": ("int32", [4])}


def int8_model(io: str = "int8"):
    """conv -> relu, with the converter's boundary ops for uint8 / float32 I/O."""
    t = {"x": (io, IMG), **CONV_W, "c": ("int8", FEAT), "y": ("int8", FEAT)}
    ops = [("CONV_2D", ["xq" if io != "int8" else "x", "w", "b"], ["c"]), ("RELU", ["c"], ["y"])]
    if io == "int8":
        return fake_model(t, ops, ["x"], ["y"])
    t["xq"] = ("int8", IMG)
    t["out"] = (io, FEAT)
    first = ("QUANTIZE", ["x"], ["xq"])
    last = ("QUANTIZE" if io == "uint8" else "DEQUANTIZE", ["y"], ["out"])
    return fake_model(t, [first, *ops, last], ["x"], ["out"])


@pytest.mark.parametrize("io", ["int8", "uint8", "float32"])
def test_boundary_conversions_are_legitimate_only_for_the_asked_io(io):
    info = int8_model(io)
    assert ins.integer_only_report(info, io) == []
    assert ins.is_integer_only(info, io)
    for other in set(ins.IO_TYPES) - {io}:
        offenders = ins.integer_only_report(info, other)
        assert f"model input 'x' is {io}, expected {other}" in offenders
        assert not ins.is_integer_only(info, other)


def test_uint8_boundary_quantize_is_named_when_int8_io_is_asked():
    offenders = ins.integer_only_report(int8_model("uint8"), "int8")
    assert "#0 QUANTIZE (I/O conversion uint8 'x' -> int8 'xq' does not match io=int8)" in offenders
    assert any(o.startswith("#3 QUANTIZE (I/O conversion int8 'y' -> uint8 'out'") for o in offenders)


def test_float_op_inside_is_named_by_index_op_and_tensor():
    t = {"x": ("int8", IMG), "f": ("float32", IMG), "y": ("int8", IMG)}
    ops = [("DEQUANTIZE", ["x"], ["f"]), ("ADD", ["f", "f"], ["y"])]
    offenders = ins.integer_only_report(fake_model(t, ops, ["x"], ["y"]), "int8")
    assert offenders == [
        "#0 DEQUANTIZE (DEQUANTIZE inside the graph: int8 'x' -> float32 'f')",
        "#1 ADD (float32 input 'f', float32 input 'f')",
    ]


def test_quantize_inside_the_graph_is_an_offender_even_int8_to_int8():
    t = {"x": ("int8", IMG), "r": ("int8", IMG), "y": ("int8", IMG)}
    ops = [("QUANTIZE", ["x"], ["r"]), ("RELU", ["r"], ["y"])]
    info = fake_model(t, ops, ["x"], ["y"])
    # The op's input *is* the model input, but int8->int8 is a requantization, not an I/O type.
    assert ins.integer_only_report(info, "int8") == [
        "#0 QUANTIZE (I/O conversion int8 'x' -> int8 'r' does not match io=int8)"
    ]
    t["z"] = ("int8", IMG)
    inner = fake_model(t, [("RELU", ["x"], ["r"]), ("QUANTIZE", ["r"], ["z"])], ["x"], ["z"])
    assert ins.integer_only_report(inner, "int8") == [
        "#1 QUANTIZE (I/O conversion int8 'r' -> int8 'z' does not match io=int8)"
    ]
    t["y2"] = ("int8", IMG)
    middle = fake_model(
        t,
        [("RELU", ["x"], ["r"]), ("QUANTIZE", ["r"], ["z"]), ("RELU", ["z"], ["y2"])],
        ["x"],
        ["y2"],
    )
    assert ins.integer_only_report(middle, "int8") == [
        "#1 QUANTIZE (QUANTIZE inside the graph: int8 'r' -> int8 'z')"
    ]


def test_float16_weights_are_not_integer_only():
    t = {"x": ("float32", IMG), "w16": ("float16", [4, 3, 3, 3]), "w": ("float32", [4, 3, 3, 3]),
         "y": ("float32", FEAT)}
    ops = [("DEQUANTIZE", ["w16"], ["w"]), ("CONV_2D", ["x", "w"], ["y"])]
    info = fake_model(t, ops, ["x"], ["y"])
    offenders = ins.integer_only_report(info, "float32")
    assert offenders[0].startswith("#0 DEQUANTIZE (float weights dequantized at run time")
    assert offenders[1] == "#1 CONV_2D (float32 input 'x', float32 input 'w', float32 output 'y')"
    assert ins.infer_mode(info) == "float16"


def test_int16x8_and_legacy_uint8_need_their_flag():
    t = {"x": ("int16", IMG), "w": ("int8", [4, 3, 3, 3]), "b": ("int64", [4]), "y": ("int16", FEAT)}
    info = fake_model(t, [("CONV_2D", ["x", "w", "b"], ["y"])], ["x"], ["y"])
    with pytest.raises(EdgetlError, match="unknown I/O type 'int16'"):
        ins.integer_only_report(info, "int16")
    assert ins.is_integer_only(info, "int16", int16x8=True)
    assert ins.infer_mode(info) == "int16x8"

    t = {"x": ("uint8", IMG), **CONV_W, "y": ("uint8", FEAT)}
    t["w"] = ("uint8", [4, 3, 3, 3])
    legacy = fake_model(t, [("CONV_2D", ["x", "w", "b"], ["y"])], ["x"], ["y"])
    assert ins.integer_only_report(legacy, "uint8") == [
        "#0 CONV_2D (uint8 input 'x', uint8 input 'w', uint8 output 'y')"
    ]
    assert ins.is_integer_only(legacy, "uint8", allow_uint8=True)
    assert ins.infer_mode(legacy) == "uint8"


def test_unknown_io_type_is_a_one_line_error():
    with pytest.raises(EdgetlError, match=r"unknown I/O type 'int4'; use one of int8, uint8, float32"):
        ins.integer_only_report(int8_model(), "int4")


def test_modes_inferred_from_tensors():
    assert ins.infer_mode(int8_model("int8")) == "int8"
    assert ins.infer_mode(int8_model("uint8")) == "int8 (uint8 I/O)"  # as export names it
    assert ins.infer_mode(int8_model("float32")) == "int8 (float I/O)"
    t = {"x": ("float32", IMG), "w": ("int8", [4, 3, 3, 3]), "y": ("float32", FEAT)}
    assert ins.infer_mode(fake_model(t, [("CONV_2D", ["x", "w"], ["y"])], ["x"], ["y"])) == "dynamic"
    t["w"] = ("float32", [4, 3, 3, 3])
    assert ins.infer_mode(fake_model(t, [("CONV_2D", ["x", "w"], ["y"])], ["x"], ["y"])) == "float32"
    # int8 with one op kept in float (--keep-float): integer activations, so not "dynamic"
    t = {"x": ("float32", IMG), "q": ("int8", IMG), "w": ("int8", [4, 3, 3, 3]),
         "c": ("int8", FEAT), "y": ("float32", FEAT), "z": ("float32", FEAT)}
    ops = [("QUANTIZE", ["x"], ["q"]), ("CONV_2D", ["q", "w"], ["c"]),
           ("DEQUANTIZE", ["c"], ["y"]), ("MEAN", ["y"], ["z"])]
    assert ins.infer_mode(fake_model(t, ops, ["x"], ["z"])) == "mixed"


# ------------------------------------------------------------------------------------------
# Edge TPU, offline


def test_edgetpu_everything_after_first_unsupported_op_runs_on_cpu():
    t = {"x": ("int8", IMG), **CONV_W, "c": ("int8", FEAT), "l": ("int8", FEAT),
         "c2": ("int8", FEAT), "w2": ("int8", [4, 3, 3, 4])}
    ops = [
        ("CONV_2D", ["x", "w", "b"], ["c"]),
        ("LEAKY_RELU", ["c"], ["l"]),
        ("CONV_2D", ["l", "w2", "b"], ["c2"]),
    ]
    rows = ins.edgetpu_report(fake_model(t, ops, ["x"], ["c2"]))
    assert [(r["index"], r["op"], r["maps"]) for r in rows] == [
        (0, "CONV_2D", True), (1, "LEAKY_RELU", False), (2, "CONV_2D", False)
    ]
    assert rows[0]["reason"] == "Mapped to Edge TPU"
    assert rows[1]["reason"] == "LEAKY_RELU is not in Coral's supported-operations table"
    assert rows[2]["reason"] == "CPU (after first unsupported op)"
    section = ins.edgetpu_section(fake_model(t, ops, ["x"], ["c2"]), compiler=False)
    assert section["first_unsupported"].startswith("#1 LEAKY_RELU")
    assert section["verdict"] == "partially maps: 1 of 3 ops on the Edge TPU"
    assert (section["tpu_ops"], section["cpu_ops"]) == (1, 2)


def test_edgetpu_float_io_conversions_stay_on_cpu_without_cutting():
    rows = ins.edgetpu_report(int8_model("float32"))
    assert [(r["op"], r["maps"], r["reason"]) for r in rows] == [
        ("QUANTIZE", False, "CPU (float I/O conversion)"),
        ("CONV_2D", True, "Mapped to Edge TPU"),
        ("RELU", True, "Mapped to Edge TPU"),
        ("DEQUANTIZE", False, "CPU (float I/O conversion)"),
    ]
    reqs = {r["name"]: r["ok"] for r in ins.edgetpu_requirements(int8_model("float32"))}
    assert reqs["uint8 or int8 input and output"] is False
    assert reqs["integer-only (8-bit)"] is False


def test_edgetpu_float_op_batch_and_softmax_limits():
    t = {"x": ("float32", IMG), "y": ("float32", IMG)}
    rows = ins.edgetpu_report(fake_model(t, [("RELU", ["x"], ["y"])], ["x"], ["y"]))
    assert rows[0]["reason"] == (
        "float32 input 'x': the Edge TPU computes on 8-bit quantized tensors"
    )
    t = {"x": ("int8", [2, 8, 8, 3]), "y": ("int8", [2, 8, 8, 3])}
    info = fake_model(t, [("RELU", ["x"], ["y"])], ["x"], ["y"])
    assert "batch must be 1" in ins.edgetpu_report(info)[0]["reason"]
    assert {r["name"]: r["ok"] for r in ins.edgetpu_requirements(info)}["batch 1"] is False
    t = {"x": ("int8", [1, 20000]), "y": ("int8", [1, 20000])}
    row = ins.edgetpu_report(fake_model(t, [("SOFTMAX", ["x"], ["y"])], ["x"], ["y"]))[0]
    assert not row["maps"] and "at most 16000 elements" in row["reason"]
    t = {"x": ("int8", [1, 4]), "y": ("int8", [1, 4])}
    row = ins.edgetpu_report(fake_model(t, [("HARD_SWISH", ["x"], ["y"])], ["x"], ["y"]))[0]
    assert not row["maps"]


def test_edgetpu_dynamic_shape_and_subgraphs_are_requirements():
    # A -1 batch with a concrete batch of 1 is how every Keras model converts: not dynamic.
    t = {"x": ("int8", IMG, [-1, 8, 8, 3]), "y": ("int8", IMG, [-1, 8, 8, 3])}
    info = fake_model(t, [("RELU", ["x"], ["y"])], ["x"], ["y"])
    assert {r["name"]: r["ok"] for r in ins.edgetpu_requirements(info)}["static shapes"] is True
    t = {"x": ("int8", IMG, [1, -1, -1, 3]), "y": ("int8", IMG, [1, -1, -1, 3])}
    info = fake_model(t, [("RELU", ["x"], ["y"])], ["x"], ["y"], subgraphs=2)
    reqs = {r["name"]: r for r in ins.edgetpu_requirements(info)}
    assert reqs["static shapes"]["ok"] is False and "x" in reqs["static shapes"]["detail"]
    assert reqs["single subgraph"]["ok"] is False
    assert "dynamic shape" in ins.edgetpu_report(info)[0]["reason"]


def test_edgetpu_compiled_model_is_reported_as_such():
    t = {"x": ("uint8", IMG), "y": ("uint8", [1, 10])}
    info = fake_model(t, [("edgetpu-custom-op", ["x"], ["y"])], ["x"], ["y"])
    section = ins.edgetpu_section(info)
    assert section["compiled"] is True
    assert section["verdict"].startswith("already compiled for the Edge TPU")
    assert section["ops"][0]["maps"] is True
    assert ins.infer_mode(info) == "edgetpu"


# ------------------------------------------------------------------------------------------
# edgetpu_compiler output. The samples follow the compiler's real console output and log layout
# (Edge TPU Compiler 16.0.384591198, as quoted in google-coral/edgetpu issues #342, #490).

PARTIAL_LOG = """\
Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 1354 ms.

Input model: flowers_int8.tflite
Input size: 2.41MiB
Output model: out/flowers_int8_edgetpu.tflite
Output size: 2.67MiB
On-chip memory used for caching model parameters: 2.49MiB
On-chip memory remaining for caching model parameters: 4.71MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 1
Total number of operations: 69
Operation log: out/flowers_int8_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage \
of the model will instead run on the CPU, which is slower. If possible, consider updating your \
model to use only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 64
Number of operations that will run on CPU: 5

Operator                       Count      Status

QUANTIZE                       1          Operation is otherwise supported, but not mapped due to some unspecified limitation
CONV_2D                        35         Mapped to Edge TPU
DEPTHWISE_CONV_2D              17         Mapped to Edge TPU
ADD                            10         Mapped to Edge TPU
MEAN                           1          Mapped to Edge TPU
QUANTIZE                       1          Mapped to Edge TPU
FULLY_CONNECTED                1          More than one subgraph is not supported
SOFTMAX                        1          More than one subgraph is not supported
DEQUANTIZE                     2          Operation is working on an unsupported data type
Compilation child process completed within timeout period.
Compilation succeeded!
"""

FULL_LOG_FILE = """\
Edge TPU Compiler version 15.0.340273435
Input: mobilenet_v1_0.25_128_quant.tflite
Output: mobilenet_v1_0.25_128_quant_edgetpu.tflite

Operator                       Count      Status

AVERAGE_POOL_2D                1          Mapped to Edge TPU
CONV_2D                        15         Mapped to Edge TPU
DEPTHWISE_CONV_2D              13         Mapped to Edge TPU
RESHAPE                        1          Mapped to Edge TPU
SOFTMAX                        1          Mapped to Edge TPU
"""

FAILED_LOG = """\
Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.
ERROR: Restored original execution plan after delegate application failure.
Compilation failed: Compilation failed due to large activation tensors in model.
Compilation child process completed within timeout period.
Compilation failed!
"""


def test_parse_compiler_log_partial_mapping():
    r = ins.parse_compiler_log(PARTIAL_LOG)
    assert r["version"] == "16.0.384591198"
    assert r["compiled"] is True and r["error"] is None
    assert (r["subgraphs"], r["total_ops"], r["tpu_ops"], r["cpu_ops"]) == (1, 69, 64, 5)
    assert len(r["rows"]) == 9
    assert r["rows"][0] == {
        "index": None,
        "op": "QUANTIZE",
        "count": 1,
        "maps": False,
        "reason": "Operation is otherwise supported, but not mapped due to some unspecified limitation",
        "note": "",
    }
    assert r["rows"][1]["op"] == "CONV_2D" and r["rows"][1]["count"] == 35 and r["rows"][1]["maps"]
    assert [x["op"] for x in r["rows"] if not x["maps"]] == [
        "QUANTIZE", "FULLY_CONNECTED", "SOFTMAX", "DEQUANTIZE"
    ]
    assert sum(x["count"] for x in r["rows"]) == r["total_ops"]


def test_parse_compiler_log_file_without_summary_counts_rows():
    r = ins.parse_compiler_log(FULL_LOG_FILE)
    assert r["version"] == "15.0.340273435"
    assert (r["tpu_ops"], r["cpu_ops"]) == (31, 0)
    assert all(x["maps"] for x in r["rows"])
    assert r["compiled"] is False  # the log file alone does not say "compiled successfully"


def test_parse_compiler_log_failure():
    r = ins.parse_compiler_log(FAILED_LOG)
    assert r["compiled"] is False
    assert r["error"] == "ERROR: Restored original execution plan after delegate application failure."
    assert r["rows"] == [] and r["tpu_ops"] is None


def test_run_edgetpu_compiler_with_a_stand_in_compiler(tmp_path, monkeypatch):
    """The real compiler is x86-only and not installed here: a script with its output stands in."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "sample.txt").write_text(PARTIAL_LOG)
    script = bindir / "edgetpu_compiler"
    script.write_text(
        "#!/bin/sh\n"
        "# usage: edgetpu_compiler -s -o OUT MODEL\n"
        'out="$3"; model="$4"; stem=$(basename "$model" .tflite)\n'
        f'cat "{tmp_path / "sample.txt"}"\n'
        'cp "$model" "$out/${stem}_edgetpu.tflite"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    model = tmp_path / "m.tflite"
    model.write_bytes(b"\0" * 8)
    r = ins.run_edgetpu_compiler(model, tmp_path / "out")
    assert r["returncode"] == 0 and r["tpu_ops"] == 64
    assert r["output"] == str(tmp_path / "out" / "m_edgetpu.tflite")
    section = ins.edgetpu_section(int8_model("int8"), model)
    assert section["source"] == "edgetpu_compiler 16.0.384591198"
    assert section["verdict"] == "edgetpu_compiler: 64 op(s) on Edge TPU, 5 on CPU"


def test_run_edgetpu_compiler_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EdgetlError, match="edgetpu_compiler not found on PATH"):
        ins.run_edgetpu_compiler(tmp_path / "m.tflite", tmp_path)
    section = ins.edgetpu_section(int8_model("int8"), tmp_path / "m.tflite")
    assert section["source"] == (
        "offline check (Coral's documented op table); edgetpu_compiler not found"
    )


# ------------------------------------------------------------------------------------------
# Real third-party models (Google's Coral test data)


def test_inspect_google_uint8_mobilenet():
    report = ins.inspect_model(coral("mobilenet_v1_0.25_128_quant.tflite"), compiler=False)
    json.dumps(report)
    assert report["size_bytes"] == coral("mobilenet_v1_0.25_128_quant.tflite").stat().st_size
    assert report["schema_version"] == 3
    assert report["ops"] == {
        "CONV_2D": 15, "DEPTHWISE_CONV_2D": 13, "AVERAGE_POOL_2D": 1, "RESHAPE": 1, "SOFTMAX": 1
    }
    assert list(report["ops"])[0] == "CONV_2D"  # most frequent first
    assert report["inputs"][0]["dtype"] == "uint8"
    assert report["inputs"][0]["shape"] == [1, 128, 128, 3]
    assert report["inputs"][0]["scale"] == [0.0078125]
    assert report["inputs"][0]["zero_point"] == [128]
    assert report["outputs"][0]["shape"] == [1, 1001]
    # TF1-era uint8 model: integer-only, with uint8 activations throughout.
    assert report["integer_only"] == {"ok": True, "io": "uint8", "offenders": []}
    assert report["mode"] == "uint8"
    assert report["edgetpu"]["verdict"] == "should fully map: all 31 ops on the Edge TPU"
    assert report["edgetpu"]["source"].startswith("offline check")
    assert report["metadata"] is None
    text = ins.format_inspect(report)
    assert "integer-only yes (uint8 I/O)" in text
    assert "CONV_2D                       15  Mapped to Edge TPU" in text


def test_inspect_tf2_ptq_model_with_uint8_boundary_quantize():
    info = ins.load_info(coral("tf2_mobilenet_v2_1.0_224_ptq.tflite"))
    # The converter's uint8 I/O: QUANTIZE uint8->int8 first, int8->uint8 last; int8 inside.
    quantize = [op for op in info.operators if op.op == "QUANTIZE"]
    assert [op.index for op in quantize] == [0, len(info.operators) - 1]
    assert ins.integer_only_report(info, "uint8") == []
    strict = ins.integer_only_report(info, "int8")
    assert strict[0] == "model input 'input' is uint8, expected int8"
    assert any(o.startswith("#0 QUANTIZE (I/O conversion uint8 'input' -> int8") for o in strict)
    report = ins.inspect_model(coral("tf2_mobilenet_v2_1.0_224_ptq.tflite"), compiler=False)
    assert report["ops"]["QUANTIZE"] == 2 and report["tensor_dtypes"]["int8"] > 100
    assert report["mode"] == "int8 (uint8 I/O)"  # int8 inside: named as edgetl's export names it
    assert report["edgetpu"]["tpu_ops"] == 68


def test_inspect_edgetpu_compiled_model():
    report = ins.inspect_model(coral("mobilenet_v1_0.25_128_quant_edgetpu.tflite"))
    assert report["ops"] == {"edgetpu-custom-op": 1}
    assert report["mode"] == "edgetpu"
    assert report["edgetpu"]["compiled"] is True
    assert "already compiled for the Edge TPU" in ins.format_inspect(report)


def test_inspect_model_with_unknown_custom_op_still_reports():
    report = ins.inspect_model(coral("model_invoking_error.tflite"), compiler=False)
    json.dumps(report)
    assert report["op_count"] >= 1
    assert report["integer_only"]["ok"] is False
    assert report["edgetpu"]["tpu_ops"] == 0
    assert ins.format_inspect(report)


def test_inspect_non_tflite_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(EdgetlError) as e:
        ins.inspect_model(coral("cat.bmp"))
    assert "\n" not in str(e.value) and "cat.bmp" in str(e.value)
    with pytest.raises(EdgetlError, match="model file not found"):
        ins.inspect_model(tmp_path / "nope.tflite")
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    with pytest.raises(EdgetlError) as e:
        ins.inspect_model(empty)
    assert "\n" not in str(e.value)


def test_imports_no_tensorflow():
    code = (
        "import sys, edgetl.inspect, edgetl.bench, edgetl.bundle\n"
        "heavy = [m for m in ('tensorflow', 'tf_keras', 'keras') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------------------
# What the TFLite converter really emits (converted in a subprocess: TensorFlow stays out of
# this test process, whatever else the session imported).

CONVERT = r"""
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, tf_keras as keras
out = sys.argv[1]
inp = keras.Input((16, 16, 3))
x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
x = keras.layers.DepthwiseConv2D(3)(x)
x = keras.layers.GlobalAveragePooling2D()(x)
model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
def rep():
    rng = np.random.default_rng(0)
    for _ in range(4):
        yield [rng.random((1, 16, 16, 3), dtype=np.float32)]
INT8 = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
X16 = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
for name, ops, io, f16 in [("int8", INT8, tf.int8, False), ("uint8", INT8, tf.uint8, False),
                           ("float_io", INT8, None, False), ("float16", None, None, True),
                           ("float32", None, None, False), ("int16x8", X16, tf.int16, False)]:
    c = tf.lite.TFLiteConverter.from_keras_model(model)
    if name != "float32":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
    if ops:
        c.representative_dataset = rep
        c.target_spec.supported_ops = ops
    if io is not None:
        c.inference_input_type = c.inference_output_type = io
    if f16:
        c.target_spec.supported_types = [tf.float16]
    with open(os.path.join(out, name + ".tflite"), "wb") as f:
        f.write(c.convert())
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("tensorflow")
    out = tmp_path_factory.mktemp("converted")
    subprocess.run(
        [sys.executable, "-c", CONVERT, str(out)], check=True, capture_output=True, timeout=300
    )
    converted = _Converted({p.stem: ins.load_info(p) for p in out.glob("*.tflite")})
    converted.dir = out
    return converted


class _Converted(dict):
    """name -> ModelInfo, with ``dir``: the folder of the .tflite files."""


def test_a_float_model_is_one_integer_only_line_not_a_list_of_offenders(converted):
    text = ins.format_inspect(ins.inspect_model(converted.dir / "float32.tflite",
                                                compiler=False))
    line = next(x for x in text.splitlines() if x.lstrip().startswith("integer-only"))
    assert line.strip().startswith("integer-only no (a float32 model: float by design; --json")
    assert "offender" not in text.split("Edge TPU")[0]


def test_converter_outputs_match_the_integer_only_rules(converted):
    expected_ok = {
        "int8": {"int8"},
        "uint8": {"uint8"},
        "float_io": {"float32"},
        "float16": set(),
        "float32": set(),
        "int16x8": set(),  # int16 activations need int16x8=True
    }
    for name, ok_ios in expected_ok.items():
        info = converted[name]
        for io in ins.IO_TYPES:
            assert ins.is_integer_only(info, io) == (io in ok_ios), (name, io)
    assert ins.is_integer_only(converted["int16x8"], "int16", int16x8=True)
    # The uint8 and float I/O variants carry the converter's boundary ops, and only those.
    assert [op.op for op in converted["uint8"].operators][::6] == ["QUANTIZE", "QUANTIZE"]
    ends = [op.op for op in converted["float_io"].operators]
    assert (ends[0], ends[-1]) == ("QUANTIZE", "DEQUANTIZE")
    modes = {name: ins.infer_mode(info) for name, info in converted.items()}
    assert modes == {
        "int8": "int8",
        "uint8": "int8 (uint8 I/O)",
        "float_io": "int8 (float I/O)",
        "float16": "float16",
        "float32": "float32",
        "int16x8": "int16x8",
    }


def test_converter_int8_model_maps_to_the_edgetpu_offline(converted):
    # Keras models convert with a -1 batch in the shape signature: still batch 1 for the compiler.
    for name in ("int8", "uint8"):
        section = ins.edgetpu_section(converted[name], compiler=False)
        assert section["verdict"].startswith("should fully map"), (name, section["verdict"])
    section = ins.edgetpu_section(converted["float32"], compiler=False)
    assert section["tpu_ops"] == 0
    assert section["first_unsupported"].startswith("#0 CONV_2D: float32 input")


def test_inspect_shows_edgetl_metadata(tmp_path):
    from edgetl import runner

    labels = [f"class {i}" for i in range(1001)]
    meta = {
        "name": "flowers",
        "mode": "uint8",
        "input": {"height": 128, "width": 128, "mean": [127.5] * 3, "std": [127.5] * 3},
        "settings": {"io": "uint8", "qat": False},
        "versions": {"edgetl": "0.1.0", "tensorflow": "2.21.0"},
        "verification": {"passed": False, "failures": ["top-1 dropped 3.1 points"]},
    }
    model = tmp_path / "flowers.tflite"
    model.write_bytes(runner.attach_metadata(coral("mobilenet_v1_0.25_128_quant.tflite").read_bytes(),
                                             meta, labels))
    report = ins.inspect_model(model, compiler=False)
    assert report["size_bytes"] == model.stat().st_size
    m = report["metadata"]
    assert m["name"] == "flowers" and m["mode"] == "uint8" and "labels" not in m
    assert m["labels_count"] == 1001 and m["labels_preview"] == labels[:5]
    assert m["settings"] == {"io": "uint8", "qat": False}
    assert report["mode"] == "uint8" and report["metadata_error"] is None
    text = ins.format_inspect(report)
    assert "metadata   edgetl: name 'flowers', mode 'uint8', 1001 labels" in text
    assert "versions: edgetl=0.1.0, tensorflow=2.21.0" in text
    assert "verification: FAILED: top-1 dropped 3.1 points" in text

    broken = tmp_path / "broken.tflite"
    data = model.read_bytes()
    # Same length, so the zip still parses, but its CRC no longer matches.
    broken.write_bytes(data.replace(b'"format": "edgetl"', b'"format": "other!"'))
    report = ins.inspect_model(broken, compiler=False)
    assert report["metadata"] is None and "corrupt metadata" in report["metadata_error"]
    assert report["ops"]["CONV_2D"] == 15  # the model itself is still described
