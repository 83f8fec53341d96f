"""The runner reads .tflite files with a maintained schema module; hostile files still fail fast.

The model is read with LiteRT's generated schema (``ai_edge_litert.schema_py_generated``) or, on
a tflite-runtime-only device, the ``tflite`` package's (the same flatc output; TensorFlow's copy as
the last resort); the standard metadata (``M001``) with the ``flatbuffers`` runtime. Both backends
must give the ModelInfo the hand-written reader gave (digests below were taken with it on Google's
real models), and every corrupt, truncated or huge-length file must be refused with one
``RunnerError`` line before any loop runs long. The fallbacks also run for real, in subprocesses
where the modules before them cannot be imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI, realdata
from edgetl import runner as r

DEVICES = Path(__file__).resolve().parents[1] / "devices"

# sha256 (first 16 hex) of json.dumps(asdict(read_model(file)), sort_keys=True), computed with the
# hand-written flatbuffer reader this schema-module reader replaced (commit 14b4f5e).
GOLDEN = {
    "mobilenet_v1_0.25_128_quant.tflite": "9bb73da4236a8a05",
    "mobilenet_v1_0.25_128_quant_edgetpu.tflite": "61bb5d455cbbc5b8",
    "model_invoking_error.tflite": "bb93efadb2bd0401",
    "tf2_mobilenet_v2_1.0_224_ptq.tflite": "5637b5bf42f41e83",
}


def _tflite():
    try:
        import tflite
    except ImportError:
        if IN_CI:
            pytest.fail("the tflite package (test extra) must be installed in CI")
        pytest.skip("the tflite package is not installed (pip install tflite==2.18.0)")
    return tflite


def _litert():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


@pytest.fixture(params=["ai_edge_litert", "tflite"])
def schema(request):
    return _litert() if request.param == "ai_edge_litert" else _tflite()


def _digest(info) -> str:
    text = json.dumps(dataclasses.asdict(info), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _with_standard_metadata(tmp_path: Path) -> Path:
    """Google's uint8 MobileNet v1 with standard metadata and edgetl's, as export writes them."""
    from edgetl import metadata

    base = (realdata("coral") / "mobilenet_v1_0.25_128_quant.tflite").read_bytes()
    info = r.read_model(base)
    io = {"input": [{"name": info.input_tensors[0].name, "dtype": "uint8"}],
          "output": [{"name": info.output_tensors[0].name, "dtype": "uint8"}]}
    meta = {"name": "mnv1", "mode": "int8",
            "input": {"height": 128, "width": 128, "mean": [127.5] * 3, "std": [127.5] * 3,
                      "channel_order": "RGB"}, "io": io, "versions": {"edgetl": "0.1.0"}}
    labels = r.read_labels_file(realdata("coral") / "imagenet_labels.txt")
    path = tmp_path / "mnv1_meta.tflite"
    path.write_bytes(metadata.write(base, meta, labels))
    return path


def _refused(data: bytes, schema=None) -> str:
    """The one-line RunnerError that reading ``data`` raises (model and standard metadata)."""
    with pytest.raises(r.RunnerError) as caught:
        r._check_identifier(data, "m.tflite")
        r._parse_model(data, "m.tflite", schema)
        r.read_standard_metadata(data)
    text = str(caught.value)
    assert text.strip() and "\n" not in text, text
    return text


def _put_u32(data: bytes, pos: int, value: int) -> bytes:
    out = bytearray(data)
    out[pos:pos + 4] = struct.pack("<I", value)
    return bytes(out)


# --- same ModelInfo as the hand-written reader, from both backends -------------------------------

def test_both_backends_read_real_models_as_the_hand_written_reader_did(schema):
    coral = realdata("coral")
    for name, digest in GOLDEN.items():
        data = (coral / name).read_bytes()
        info = r._parse_model(data, name, schema)
        assert _digest(info) == digest, name
    v2 = r._parse_model((coral / "tf2_mobilenet_v2_1.0_224_ptq.tflite").read_bytes(), "v2", schema)
    assert v2.op_counts()["CONV_2D"] == 36 and v2.input_tensors[0].dtype == "uint8"
    assert {op.fused_activation for op in v2.operators if op.op == "CONV_2D"} == {"NONE", "RELU6"}
    assert max(len(t.scale) for t in v2.tensors) > 1  # per-channel scales survive


def test_both_backends_agree_on_an_edgetl_export_with_standard_metadata(tmp_path):
    path = _with_standard_metadata(tmp_path)
    data = path.read_bytes()
    litert = r._parse_model(data, path.name, _litert())
    assert litert == r._parse_model(data, path.name, _tflite())
    assert "TFLITE_METADATA" in litert.metadata_names and litert.min_runtime_version
    std = r.read_standard_metadata(path)
    assert std["name"] == "mnv1" and std["author"] == "edgetl"
    assert std["mean"] == [127.5] * 3 and std["std"] == [127.5] * 3
    assert std["labels_file"] == "labels.txt" and len(std["labels"]) == 1001
    assert std["color_space"] == "RGB" and std["input_min"] == [0.0]


# --- the tflite package path, for real: LiteRT's schema module cannot be imported ----------------

PROBE = r'''
import contextlib, dataclasses, hashlib, io, json, sys
for blocked in filter(None, sys.argv[1].split(",")):
    sys.modules[blocked] = None  # "import" of it now raises ImportError
sys.path.insert(0, sys.argv[2])
import edgetl_runner as r
model, report = sys.argv[3], sys.argv[4]
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = r.main([model, "--runs", "1", "--warmup", "0", "--json", report])
out = {"code": code, "stderr": err.getvalue()}
if code == 0:
    text = json.dumps(dataclasses.asdict(r.read_model(model)), sort_keys=True)
    out.update(schema=r._schema().__name__, digest=hashlib.sha256(text.encode()).hexdigest(),
               standard=r.read_standard_metadata(model),
               report={k: v for k, v in json.load(open(report)).items()
                       if k in ("model", "input", "output", "preprocessing", "labels")})
print(json.dumps(out))
'''


def _probe(blocked: str, model: Path, tmp_path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, blocked, str(DEVICES), str(model),
                           str(tmp_path / f"report-{len(blocked)}.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_without_litert_schema_the_tflite_package_gives_the_same_report(tmp_path):
    _tflite()
    model = _with_standard_metadata(tmp_path)
    litert = _probe("", model, tmp_path)
    fallback = _probe("ai_edge_litert.schema_py_generated", model, tmp_path)
    assert litert["code"] == fallback["code"] == 0, (litert["stderr"], fallback["stderr"])
    assert litert["schema"] == "ai_edge_litert.schema_py_generated"
    assert fallback["schema"] == "tflite"
    assert fallback["digest"] == litert["digest"]
    assert fallback["standard"] == litert["standard"] and fallback["standard"]["mean"]
    assert fallback["report"] == litert["report"]
    assert fallback["report"]["labels"]["count"] == 1001


@pytest.mark.slow
def test_with_tensorflow_alone_its_schema_module_reads_the_model(tmp_path):
    """The last resort, as for the interpreter: TensorFlow's copy of the schema module."""
    model = _with_standard_metadata(tmp_path)
    litert = _probe("", model, tmp_path)
    tf = _probe("ai_edge_litert.schema_py_generated,tflite", model, tmp_path)
    assert tf["code"] == 0, tf["stderr"]
    assert tf["schema"] == "tensorflow.lite.python.schema_py_generated"
    assert tf["digest"] == litert["digest"] and tf["report"] == litert["report"]


def test_without_any_schema_module_the_runner_says_what_to_install(tmp_path):
    model = realdata("coral") / "mobilenet_v1_0.25_128_quant.tflite"
    out = _probe("ai_edge_litert.schema_py_generated,tflite,tensorflow", model, tmp_path)
    assert out["code"] == 2
    lines = out["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "pip install ai-edge-litert" in lines[0] and "pip install tflite flatbuffers" in lines[0]


# --- hostile files: one RunnerError line, fast, from both backends --------------------------------

def _v1() -> bytes:
    return r.strip_metadata((realdata("coral") / "mobilenet_v1_0.25_128_quant.tflite").read_bytes())


def test_truncated_copies_are_refused_at_every_cut(schema):
    data = _v1()
    for k in range(60):
        cut = 16 + (len(data) - 16) * k // 60
        assert "truncated or corrupt" in _refused(data[:cut], schema)


def test_huge_vector_lengths_are_refused_before_any_loop(schema):
    data = _v1()
    model = _litert().Model.GetRootAs(data, 0)
    sg = model.Subgraphs(0)._tab
    tensors_length = sg.Vector(sg.Offset(4)) - 4  # SubGraph.tensors is field 0
    t0 = model.Subgraphs(0).Tensors(0)._tab
    shape_length = t0.Vector(t0.Offset(4)) - 4  # Tensor.shape is field 0
    j = next(j for j in range(model.BuffersLength()) if model.Buffers(j).DataLength())
    buf = model.Buffers(j)._tab
    data_length = buf.Vector(buf.Offset(4)) - 4  # Buffer.data is field 0
    root = model._tab
    buffers_length = root.Vector(root.Offset(12)) - 4  # Model.buffers is field 4
    for pos, value, expected in [
        (tensors_length, 0xFFFFFFFF, "tensors claims 4294967295 elements, more than the file"),
        (tensors_length, len(data) // 8, "truncated or corrupt"),
        (buffers_length, 0x40000000, "buffers claims 1073741824 elements"),
        (shape_length, 0x3FFFFFFF, "points past the end"),
        (data_length, 0xFFFFFFF0, "the data of buffer %d runs past the end" % j),
    ]:
        assert expected in _refused(_put_u32(data, pos, value), schema)


def test_offsets_outside_the_file_are_refused(schema):
    data = _v1()
    assert "points past the end" in _refused(_put_u32(data, 0, len(data) + 4096), schema)
    root = struct.unpack_from("<I", data, 0)[0]
    # the root table's vtable before the start of the file (a negative position)
    assert "outside the file" in _refused(_put_u32(data, root, root + 1000), schema)


def _aliased(count: int, names: int = 0) -> bytes:
    """A model whose tensors vector names one tensor table ``count`` times; with ``names``, that
    many distinct tensors share one name whose length says "up to the end of the file"."""
    import flatbuffers

    s = _litert()
    b = flatbuffers.Builder(1024)
    if names:
        b.CreateByteVector(bytes(1_000_000))  # written last: the name runs over it
    name = b.CreateString("shared-name")
    tables = []
    for _ in range(max(names, 1)):
        s.TensorStart(b)
        s.TensorAddName(b, name)
        tables.append(s.TensorEnd(b))
    refs = tables if names else tables * count
    s.SubGraphStartTensorsVector(b, len(refs))
    for tensor in reversed(refs):
        b.PrependUOffsetTRelative(tensor)
    tensors = b.EndVector()
    s.SubGraphStart(b)
    s.SubGraphAddTensors(b, tensors)
    sg = s.SubGraphEnd(b)
    s.ModelStartSubgraphsVector(b, 1)
    b.PrependUOffsetTRelative(sg)
    subgraphs = b.EndVector()
    s.ModelStart(b)
    s.ModelAddVersion(b, 3)
    s.ModelAddSubgraphs(b, subgraphs)
    b.Finish(s.ModelEnd(b), b"TFL3")
    data = bytes(b.Output())
    if names:
        at = data.index(b"shared-name") - 4
        data = data[:at] + struct.pack("<I", 0xFFFFFFF0) + data[at + 4:]
    return data


def test_tables_repeated_past_the_file_size_are_refused_not_walked(schema):
    assert r._parse_model(_aliased(3), "m.tflite", schema).tensors[2].name == "shared-name"
    # 40,000 references to one table in a 160 kB file: refused before the loop
    text = _refused(_aliased(40_000), schema)
    assert "its tables reference more data than the file holds" in text
    # 200 names that each claim the rest of a 1 MB file: flatbuffers copies each one; a few copies
    # exhaust the budget, not 200
    text = _refused(_aliased(0, names=200), schema)
    assert "its tables reference more data than the file holds" in text


def test_corrupt_standard_metadata_is_one_line(tmp_path, capsys):
    from flatbuffers.table import Table

    path = _with_standard_metadata(tmp_path)
    data = path.read_bytes()
    model = _litert().Model.GetRootAs(data, 0)
    entry = next(model.Metadata(j) for j in range(model.MetadataLength())
                 if model.Metadata(j).Name() == b"TFLITE_METADATA")
    blob = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    at = data.index(blob)
    root = Table(blob, struct.unpack_from("<I", blob, 0)[0])
    subgraphs = root.Vector(root.Offset(10)) - 4  # ModelMetadata.subgraph_metadata is field 3
    for pos, value, expected in [
        (at, len(blob) + 64, "points past the end"),
        (at + subgraphs, 0xFFFFFFFF, "subgraph metadata claims 4294967295 elements"),
    ]:
        bad = _put_u32(data, pos, value)
        with pytest.raises(r.RunnerError) as caught:
            r.read_standard_metadata(bad)
        text = str(caught.value)
        assert "TFLITE_METADATA is truncated or corrupt" in text and expected in text, text
        assert "\n" not in text
        assert r.read_model(bad).metadata_names  # the model itself is intact
    bad_path = tmp_path / "bad.tflite"
    bad_path.write_bytes(_put_u32(data, at + subgraphs, 0xFFFFFFFF))
    capsys.readouterr()
    assert r.main([str(bad_path), "--runs", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "TFLITE_METADATA" in err[0]


def test_tflite_runtime_installs_bring_the_schema_reader():
    """The Pi set-up (and coral's, which runs it) and a bundle's run.sh, on 32-bit ARM."""
    from edgetl.bundle import REQUIREMENTS, RUN_SH

    pi = (DEVICES / "raspberry-pi" / "setup.sh").read_text()
    tflite_branch = pi[pi.index('if [ "$INTERP" = "tflite-runtime" ]; then'):]
    assert 'pip install "tflite>=2.18" flatbuffers' in tflite_branch.split("fi\n", 1)[0]
    assert 'import tflite_runtime, tflite"' in RUN_SH  # else run.sh installs requirements.txt
    assert "`tflite` and `flatbuffers`" in REQUIREMENTS
    subprocess.run(["bash", "-n", str(DEVICES / "raspberry-pi" / "setup.sh")], check=True)
