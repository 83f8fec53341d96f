"""The standalone device runner (devices/edgetl_runner.py, imported as edgetl.runner).

Real third-party models and photos from ../shared/realdata/coral; those tests skip when the folder
is absent and fail instead when CI=true.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgetl import runner as r
from conftest import coral

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "devices" / "edgetl_runner.py"

SMALL = "mobilenet_v1_0.25_128_quant.tflite"
V2 = "tf2_mobilenet_v2_1.0_224_ptq.tflite"
EDGETPU = "mobilenet_v1_0.25_128_quant_edgetpu.tflite"
BROKEN = "model_invoking_error.tflite"
PHOTOS = {"cat.bmp": "Egyptian cat", "bird.bmp": "chickadee", "grace_hopper.bmp": "military uniform"}
ACADEMIC_GOWN = "academic gown, academic robe, judge's robe"



@pytest.fixture(scope="module")
def imagenet_labels() -> list:
    return coral("imagenet_labels.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def small_model():
    return r.Model(coral(SMALL))


def cli(*args, cwd=None, timeout=120):
    """Run the runner file as a device would: python3 devices/edgetl_runner.py ..."""
    return subprocess.run(
        [sys.executable, str(RUNNER), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def photo_folder(tmp_path: Path, extra_broken: bool = True) -> Path:
    """Class sub-folders named by the ImageNet label texts, one real photo each."""
    root = tmp_path / "data"
    for photo, label in PHOTOS.items():
        (root / label).mkdir(parents=True)
        shutil.copy(coral(photo), root / label / photo)
    if extra_broken:
        (root / "chickadee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


# ------------------------------------------------------------------------------------------
# The file itself


def test_edgetl_runner_is_a_symlink_to_the_device_file():
    link = REPO / "edgetl" / "runner.py"
    assert link.is_symlink()
    assert os.readlink(link) == "../devices/edgetl_runner.py"
    assert Path(r.__file__).resolve() == RUNNER.resolve()


def test_runner_source_stays_compatible_with_python39():
    src = RUNNER.read_text()
    assert "from __future__ import annotations" in src
    tree = ast.parse(src, feature_version=(3, 9))  # rejects match statements and other 3.10+ syntax
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    third_party = imported - set(sys.stdlib_module_names)
    # interpreters, and flatbuffers (the schema modules are imported by name, in _schema)
    assert third_party == {"numpy", "PIL", "ai_edge_litert", "tflite_runtime", "tensorflow",
                           "flatbuffers"}
    assert "zip(strict" not in src and "removeprefix" not in src


def test_runner_imports_no_tensorflow_and_no_pillow_for_latency(tmp_path):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['edgetl_runner.py', {str(coral(SMALL))!r}, '--runs', '3', '--warmup', '1',"
        f" '--json', {str(tmp_path / 'r.json')!r}, '--quiet']\n"
        "try:\n"
        f"    runpy.run_path({str(RUNNER)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'PIL', 'edgetl')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interpreter"]["name"] == "ai_edge_litert"


def test_missing_pillow_gives_install_hint(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['PIL'] = None\n"
        f"sys.path.insert(0, {str(RUNNER.parent)!r})\n"
        "import edgetl_runner as r\n"
        "try:\n"
        f"    r.load_image({str(coral('cat.bmp'))!r}, (8, 8))\n"
        "except r.RunnerError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install pillow" in proc.stdout and "python3-pil" in proc.stdout


# ------------------------------------------------------------------------------------------
# Real models through the API and the CLI


@pytest.mark.parametrize("model_name", [SMALL, V2])
def test_api_classifies_the_real_photos(model_name, imagenet_labels):
    model = r.Model(coral(model_name))
    assert model.interpreter_name == "ai_edge_litert" and model.interpreter_version
    assert model.input.dtype == "uint8" and model.output.dtype == "uint8"
    assert model.num_outputs == 1001 and model.metadata is None
    prep = model.raw_prep()
    batch = np.stack([r.load_image(coral(p), model.input_size) for p in PHOTOS])
    # raw preprocessing + the model's own quantization feeds the pixels unchanged
    assert np.array_equal(model.quantize_input(r.preprocess(batch, prep)), batch)
    scores = model.predict(r.preprocess(batch, prep))
    assert scores.shape == (3, 1001) and scores.dtype == np.float32
    top1 = [imagenet_labels[int(i)] for i in scores.argmax(axis=1)]
    if model_name == V2:
        assert top1 == list(PHOTOS.values())
    else:
        # MobileNet v1 0.25/128 (about 40% ImageNet top-1) gets the cat and the bird; for Grace
        # Hopper its top-1 is "academic gown" under every Pillow resize filter (checked), with
        # "military uniform" in its top 5.
        assert top1 == ["Egyptian cat", "chickadee", ACADEMIC_GOWN]
        top5 = np.argsort(-scores[2], kind="stable")[:5]
        assert imagenet_labels.index("military uniform") in top5
    # one image at a time gives the same scores as the batch
    single = model.predict(r.preprocess(batch[1], prep))
    assert single.shape == (1001,) and np.array_equal(single, scores[1])


def test_delegate_none_runs_and_agrees(small_model):
    plain = r.Model(coral(SMALL), delegate="none", threads=1)
    x = r.preprocess(r.load_image(coral("bird.bmp"), plain.input_size), plain.raw_prep())
    assert plain.delegate == "none" and plain.threads == 1
    assert int(plain.predict(x).argmax()) == int(small_model.predict(x).argmax())


def test_cli_data_folder_top1_is_100_percent_on_mobilenet_v2(tmp_path):
    data = photo_folder(tmp_path)
    out = tmp_path / "report.json"
    proc = cli(coral(V2), "--data", data, "--labels", coral("imagenet_labels.txt"),
               "--runs", "5", "--warmup", "1", "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    acc = report["accuracy"]
    assert acc["top1"] == 1.0 and acc["top5"] == 1.0
    assert acc["evaluated"] == 3 and acc["skipped"] == 1
    assert acc["skipped_files"][0]["path"].endswith("broken.jpg")
    assert "top-1 100.00% (3/3)" in proc.stdout


def test_cli_report_has_every_field(tmp_path):
    data = photo_folder(tmp_path)
    out = tmp_path / "report.json"
    proc = cli(coral(SMALL), "--data", data, "--labels", coral("imagenet_labels.txt"),
               "--runs", "7", "--warmup", "2", "--threads", "1", "--json", out)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert rep["model"]["path"] == str(coral(SMALL))
    assert rep["model"]["size_bytes"] == coral(SMALL).stat().st_size
    assert rep["model"]["op_counts"]["CONV_2D"] == 15
    assert rep["interpreter"]["name"] == "ai_edge_litert" and rep["interpreter"]["version"]
    assert rep["delegate"] == "xnnpack" and rep["threads"] == 1
    assert rep["load_ms"] > 0 and rep["first_inference_ms"] > 0
    lat = rep["latency_ms"]
    assert set(lat) >= {"min", "mean", "p50", "p90", "p99", "max", "runs_ms"}
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert len(lat["runs_ms"]) == 7 and rep["runs"] == 7 and rep["warmup"] == 2
    assert rep["throughput_ips"] == pytest.approx(1000.0 / lat["mean"])
    assert rep["memory"]["peak_rss_mb"] > 10 and rep["memory"]["rss_mb"] > 10
    m = rep["machine"]
    assert set(m) >= {"cpu", "machine", "cores", "os", "python", "numpy", "peak_rss_mb"}
    assert rep["input"] == {
        "name": "input", "index": rep["input"]["index"], "dtype": "uint8",
        "shape": [1, 128, 128, 3], "scale": 0.0078125, "zero_point": 128,
    }
    assert rep["output"]["dtype"] == "uint8" and rep["output"]["shape"] == [1, 1001]
    assert rep["preprocessing"]["mean"] == [128.0] * 3 and rep["preprocessing"]["std"] == [128.0] * 3
    assert rep["labels"] == {"source": str(coral("imagenet_labels.txt")), "count": 1001}
    acc = rep["accuracy"]
    assert acc["top1"] == pytest.approx(2 / 3) and acc["top5"] == 1.0
    assert acc["skipped"] == 1 and acc["images"] == 4
    assert [c["label"] for c in acc["per_class"]] == ["chickadee", "Egyptian cat", "military uniform"]
    assert acc["confusion_columns"][-1] == "(other)"
    assert len(acc["confusion_matrix"]) == 3 and len(acc["confusion_matrix"][0]) == 4
    assert sum(map(sum, acc["confusion_matrix"])) == 3
    labels = r.read_labels_file(coral("imagenet_labels.txt"))
    assert sorted(p for p in acc["predictions"] if p >= 0) == sorted(
        labels.index(x) for x in ("Egyptian cat", "chickadee", ACADEMIC_GOWN))
    # the table on stdout carries the same facts
    for word in ("interpreter", "ai_edge_litert", "latency", "p99", "throughput", "peak",
                 "first inference", "per class accuracy", "confusion matrix", "broken.jpg"):
        assert word in proc.stdout


def test_cli_uses_labels_carried_by_the_model(tmp_path):
    # Google's models carry imagenet_labels.txt as a TFLite Support associated file.
    data = photo_folder(tmp_path, extra_broken=False)
    out = tmp_path / "r.json"
    proc = cli(coral(SMALL), "--data", data, "--runs", "2", "--warmup", "0", "--json", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    rep = json.loads(out.read_text())
    assert rep["labels"]["source"] == "associated file imagenet_labels.txt"
    assert rep["accuracy"]["correct_top1"] == 2


def test_cli_image_classifies_the_real_photos_untimed_unless_asked(tmp_path):
    v2 = coral(V2)
    photos = [coral(name) for name in PHOTOS]
    out = tmp_path / "r.json"
    proc = cli(v2, "--labels", coral("imagenet_labels.txt"), "--mean", "127.5", "--std", "127.5",
               "--image", *photos, "--top", "3", "--json", out)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    preds = rep["predictions"]
    assert [p["path"] for p in preds] == [str(p) for p in photos]
    assert [p["top"][0]["label"] for p in preds] == list(PHOTOS.values())
    for p in preds:
        scores = [t["score"] for t in p["top"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and scores[0] > 0.5
    # classification only: no timed runs, but the first inference is measured
    assert rep["runs"] == 0 and rep["latency_ms"]["p50"] is None
    assert rep["first_inference_ms"] > 0
    assert "not timed" in proc.stdout
    for name, label in PHOTOS.items():
        assert label in proc.stdout
    # --runs times it as usual
    proc = cli(v2, "--image", photos[0], "--runs", "3", "--warmup", "0", "--top", "1",
               "--json", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert rep["runs"] == 3 and rep["latency_ms"]["p50"] > 0
    assert len(rep["predictions"][0]["top"]) == 1


# ------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback


def _bad_inputs(tmp_path: Path) -> dict:
    small = coral(SMALL)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(small.read_bytes()[:300_000])
    labels_999 = tmp_path / "labels999.txt"
    labels_999.write_text("\n".join(coral("imagenet_labels.txt").read_text().splitlines()[:999]))
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "not a tflite": ([coral("cat.bmp")], "no TFL3 identifier"),
        "truncated": ([truncated], "truncated"),
        "invoke fails": ([coral(BROKEN)], "fake-op-double"),
        "edgetpu without delegate": ([coral(EDGETPU)], "--delegate edgetpu"),
        "missing delegate library": ([coral(EDGETPU), "--delegate", "edgetpu"], "libedgetpu"),
        "labels count": ([small, "--labels", labels_999], "999 labels"),
        "runs 0": ([small, "--runs", "0"], "--runs"),
        "missing model": ([tmp_path / "nope.tflite"], "not found"),
        "missing data": ([small, "--labels", coral("imagenet_labels.txt"), "--data",
                          tmp_path / "nowhere"], "data folder not found"),
        "empty data": ([small, "--labels", coral("imagenet_labels.txt"), "--data", empty],
                       "no class sub-folders"),
        "mean count": ([small, "--mean", "1", "2"], "--mean"),
        "raw with mean": ([small, "--raw", "--std", "2"], "--raw"),
        # with a readable image beside it, a missing one is skipped and listed (exit 0)
        "image missing": ([small, "--image", tmp_path / "gone.jpg"], "gone.jpg"),
        "top 0": ([small, "--image", coral("cat.bmp"), "--top", "0"], "--top"),
    }


BAD_CASES = [
    "not a tflite", "truncated", "invoke fails", "edgetpu without delegate",
    "missing delegate library", "labels count", "runs 0", "missing model", "missing data",
    "empty data", "mean count", "raw with mean", "image missing", "top 0",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    if case == "missing delegate library" and any(
        Path(d, "libedgetpu.so.1").exists() for d in ("/usr/lib", "/usr/lib/x86_64-linux-gnu",
                                                     "/usr/lib/aarch64-linux-gnu")):
        pytest.skip("libedgetpu is installed here")
    args, needle = _bad_inputs(tmp_path)[case]
    proc = cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_main_in_process_returns_2_without_traceback(capsys):
    assert r.main([str(coral(SMALL)), "--runs", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --runs must be at least 1, got 0\n"


def test_edgetpu_error_explains_the_coral_setup():
    with pytest.raises(r.RunnerError) as e:
        r.Model(coral(EDGETPU))
    msg = str(e.value)
    assert "Edge TPU" in msg and "devices/coral/README.md" in msg
    assert "unresolved custom op" not in msg


def test_delegate_that_loads_but_finds_no_tpu_is_one_clean_error(monkeypatch, capfd):
    class FakeDelegate:
        def __init__(self):
            raise_later = self  # noqa: F841 - like ai_edge_litert's Delegate, fails half-built

        def __del__(self):
            raise AttributeError("'Delegate' object has no attribute '_library'")

    def load_delegate(library, options=None):
        FakeDelegate()
        raise ValueError("Failed to load delegate from " + library)

    monkeypatch.setattr(r, "_edgetpu_library", lambda: "libc.so.6")  # a library that does load
    with pytest.raises(r.RunnerError, match="found no usable Edge TPU.*Failed to load delegate"):
        r._load_edgetpu_delegate(load_delegate)
    assert "Exception ignored" not in capfd.readouterr().err


def test_labels_rule_background(imagenet_labels, tmp_path):
    assert r.match_labels(imagenet_labels, 1001, "x") == (imagenet_labels, "")
    labels, note = r.match_labels(imagenet_labels[1:], 1001, "x")
    assert labels[0] == "background" and labels[1:] == imagenet_labels[1:] and "background" in note
    with pytest.raises(r.RunnerError, match="999 labels but the model has 1001 outputs"):
        r.match_labels(imagenet_labels[:999], 1001, "x")
    f = tmp_path / "l.txt"
    f.write_text("\n".join(imagenet_labels[1:]) + "\n\n")
    proc = cli(coral(SMALL), "--labels", f, "--runs", "2", "--warmup", "0")
    assert proc.returncode == 0 and "output 0 is taken as background" in proc.stdout


def test_labels_file_formats(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("cat\ndog\n\n")
    assert r.read_labels_file(plain) == ["cat", "dog"]
    coral_style = tmp_path / "coral.txt"
    coral_style.write_text("0  background\n1 cat\n3: dog\n")
    assert r.read_labels_file(coral_style) == ["background", "cat", "#2", "dog"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(r.RunnerError, match="empty"):
        r.read_labels_file(empty)


# ------------------------------------------------------------------------------------------
# The flatbuffer reader


def test_read_model_matches_the_interpreter():
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    path = coral(SMALL)
    info = r.read_model(path)
    assert info.version == 3 and info.num_subgraphs == 1
    assert info.metadata_names == ["min_runtime_version", "TFLITE_METADATA"]
    assert info.min_runtime_version == "1.5.0"
    assert info.op_counts() == {
        "CONV_2D": 15, "DEPTHWISE_CONV_2D": 13, "AVERAGE_POOL_2D": 1, "RESHAPE": 1, "SOFTMAX": 1,
    }
    it = Interpreter(model_path=str(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()  # no XNNPACK: its DELEGATE nodes would join the op list
    assert info.op_names == [op["op_name"] for op in it._get_ops_details()]
    for op, ref in zip(info.operators, it._get_ops_details()):
        assert list(op.inputs) == [int(i) for i in ref["inputs"]]
        assert list(op.outputs) == [int(i) for i in ref["outputs"]]
    details = {d["index"]: d for d in it.get_tensor_details()}
    for t in info.tensors:
        d = details[t.index]
        assert t.name == d["name"]
        assert t.dtype == np.dtype(d["dtype"]).name
        assert t.shape == [int(x) for x in d["shape"]]
        q = d["quantization_parameters"]
        assert np.allclose(t.scale, q["scales"]) and t.zero_point == [int(z) for z in q["zero_points"]]
    inp, out = info.input_tensors[0], info.output_tensors[0]
    assert (inp.dtype, inp.shape, inp.scale, inp.zero_point) == ("uint8", [1, 128, 128, 3], [0.0078125], [128])
    assert (out.dtype, out.shape) == ("uint8", [1, 1001])
    conv = next(op for op in info.operators if op.op == "CONV_2D")
    assert conv.fused_activation == "RELU6" and not conv.custom


def test_read_model_v2_and_edgetpu_and_broken():
    v2 = r.read_model(coral(V2))
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "QUANTIZE", "MEAN"} <= set(v2.op_names)
    per_channel = [t for t in v2.tensors if len(t.scale) > 1]
    assert per_channel and all(len(t.scale) == len(t.zero_point) for t in per_channel)
    assert v2.input_tensors[0].dtype == "uint8" and v2.input_tensors[0].zero_point == [127]

    tpu = r.read_model(coral(EDGETPU))
    assert tpu.op_names == ["edgetpu-custom-op"] and tpu.operators[0].custom and tpu.is_edgetpu
    assert tpu.input_tensors[0].dtype == "uint8"

    broken = r.read_model(coral(BROKEN).read_bytes())
    assert broken.op_names == ["fake-op-double"]


def test_builtin_op_table_matches_the_schema():
    from ai_edge_litert import schema_py_generated as schema

    ops = schema.BuiltinOperator
    for name, value in vars(ops).items():
        if name.isupper():
            assert r.builtin_op_name(value) == name
    assert r.builtin_op_name(3) == "CONV_2D" and r.builtin_op_name(4) == "DEPTHWISE_CONV_2D"
    assert r.builtin_op_name(10_000) == "BUILTIN_10000"
    assert r.read_model(coral(V2)).input_tensors[0].dtype == "uint8"  # TensorType, lower case


def test_check_tflite_rejects_bad_files(tmp_path):
    data = coral(SMALL).read_bytes()
    assert r.check_tflite(coral(SMALL)) == data
    cases = {
        "missing.tflite": None,
        "tiny.tflite": data[:10],
        "notflite.tflite": b"\0" * 64,
        "cut.tflite": data[: len(data) // 2],
        "cut_end.tflite": data[:-30_000],
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    for name, needle in [("missing.tflite", "not found"), ("tiny.tflite", "too small"),
                         ("notflite.tflite", "no TFL3 identifier"), ("cut.tflite", "truncated"),
                         ("cut_end.tflite", "truncated")]:
        with pytest.raises(r.RunnerError, match=needle):
            r.check_tflite(tmp_path / name)
    with pytest.raises(r.RunnerError, match="not a file"):
        r.check_tflite(tmp_path)


# ------------------------------------------------------------------------------------------
# Metadata


META = {
    "format": "edgetl", "format_version": 1, "name": "pets", "mode": "uint8",
    "input": {"height": 128, "width": 128, "channels": 3, "color": "RGB", "resize": "bilinear",
              "mean": [128.0, 128.0, 128.0], "std": [128.0, 128.0, 128.0], "channel_order": "RGB"},
    "extra": {"z": 1, "a": [1, 2]},
}


def test_metadata_round_trip_and_determinism(tmp_path, imagenet_labels):
    base = coral(SMALL).read_bytes()
    meta = json.loads(json.dumps(META))
    a = r.attach_metadata(base, meta, imagenet_labels)
    assert meta == META  # not mutated
    assert a == r.attach_metadata(base, dict(reversed(list(META.items()))), imagenet_labels)
    assert r.attach_metadata(a, META, imagenet_labels) == a  # old archive stripped first
    assert a[: len(r.strip_metadata(base))] == r.strip_metadata(base)
    assert r.strip_metadata(a) == r.strip_metadata(base)
    got = r.read_metadata(a)
    assert got["labels"] == imagenet_labels
    assert {k: v for k, v in got.items() if k != "labels"} == META
    assert r.read_labels(a) == imagenet_labels
    with zipfile.ZipFile(io.BytesIO(a)) as zf:  # a plain zip tool sees the two members
        assert zf.namelist() == ["edgetl.json", "labels.txt"]
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
    # Google's models carry an associated labels file, but no edgetl metadata
    assert r.read_metadata(base) is None
    assert r.read_labels(base) == imagenet_labels
    assert r.read_metadata(coral(BROKEN)) is None and r.read_labels(coral(BROKEN)) is None
    # the flatbuffer is untouched
    assert r.read_model(a) == dataclasses.replace(r.read_model(base), size_bytes=len(a))


def test_metadata_model_loads_and_predicts_the_same(tmp_path, small_model, imagenet_labels):
    path = tmp_path / "with_meta.tflite"
    path.write_bytes(r.attach_metadata(coral(SMALL).read_bytes(), META, imagenet_labels))
    model = r.Model(path)
    assert model.metadata["name"] == "pets" and model.labels_source == "edgetl metadata"
    prep = model.default_prep()
    assert prep["mean"] == [128.0] * 3 and prep["channel_order"] == "RGB"
    x = r.preprocess(r.load_image(coral("cat.bmp"), model.input_size), prep)
    assert np.array_equal(model.predict(x), small_model.predict(x))
    # the CLI needs no flags for an edgetl model
    data = photo_folder(tmp_path, extra_broken=False)
    out = tmp_path / "r.json"
    proc = cli(path, "--data", data, "--runs", "2", "--warmup", "0", "--json", out)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert rep["model"]["has_metadata"] and rep["model"]["name"] == "pets"
    assert rep["preprocessing"]["source"] == "edgetl metadata"
    assert rep["accuracy"]["correct_top1"] == 2


def test_corrupt_metadata_raises_runner_error(imagenet_labels):
    a = bytearray(r.attach_metadata(coral(SMALL).read_bytes(), META, imagenet_labels))
    i = bytes(a).rindex(b'"pets"')
    a[i + 1] ^= 0xFF  # CRC no longer matches
    with pytest.raises(r.RunnerError, match="corrupt metadata"):
        r.read_metadata(bytes(a))
    bad_json = r.attach_metadata(coral(SMALL).read_bytes(), {"format": "other"}, [])
    with pytest.raises(r.RunnerError, match="not edgetl metadata"):
        r.read_metadata(bad_json)
    with pytest.raises(r.RunnerError, match="JSON"):
        r.attach_metadata(coral(SMALL).read_bytes(), {"x": float("nan")}, [])
    with pytest.raises(r.RunnerError, match="line break"):
        r.attach_metadata(coral(SMALL).read_bytes(), {}, ["a\nb"])
    with pytest.raises(r.RunnerError, match="TFL3"):
        r.attach_metadata(b"PK\x03\x04" + b"\0" * 100, {}, [])


def test_fuzzed_models_raise_only_runner_error(imagenet_labels):
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    base = coral(SMALL).read_bytes()
    with_meta = r.attach_metadata(base, META, imagenet_labels[:5])
    info = r.read_model(base)
    # the tables of this file sit after its weights: aim most mutations at them
    tables_start = min(len(base) - 40_000, 480_000)

    def check(data: bytes) -> None:
        for fn in (r.read_model, r.read_metadata, r.read_labels):
            try:
                fn(data)
            except r.RunnerError:
                pass

    position = st.one_of(
        st.integers(0, 64),
        st.integers(tables_start, len(base) - 1),
        st.integers(0, len(base) - 1),
        st.integers(len(r.strip_metadata(base)), len(with_meta) - 1),
    )

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(
        use_meta=st.booleans(),
        edits=st.lists(st.tuples(position, st.integers(0, 255)), min_size=1, max_size=8),
        cut=st.one_of(st.none(), st.integers(0, len(with_meta))),
    )
    def fuzz(use_meta, edits, cut):
        data = bytearray(with_meta if use_meta else base)
        for pos, value in edits:
            if pos < len(data):
                data[pos] = value
        if cut is not None:
            del data[cut:]
        check(bytes(data))

    fuzz()
    assert r.read_model(base) == info  # the reader keeps no state


# ------------------------------------------------------------------------------------------
# Images, preprocessing, folders


def _save(img, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_load_image_modes(tmp_path):
    from PIL import Image

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    paths = {
        "L": _save(Image.new("L", (30, 20), 77), tmp_path / "l.png"),
        "LA": _save(Image.new("LA", (30, 20), (77, 10)), tmp_path / "la.png"),
        "P": _save(Image.fromarray(rgb).convert("P"), tmp_path / "p.gif"),
        "RGBA": _save(Image.new("RGBA", (30, 20), (200, 0, 0, 255)), tmp_path / "rgba.png"),
        "CMYK": _save(Image.new("CMYK", (30, 20), (0, 0, 0, 0)), tmp_path / "cmyk.jpg"),
        "F": _save(Image.fromarray(np.full((20, 30), 0.5, np.float32)), tmp_path / "f.tiff"),
        "I": _save(Image.fromarray(np.full((20, 30), 65535, np.int32)), tmp_path / "i.tiff"),
    }
    for mode, path in paths.items():
        px = r.load_image(path, (10, 12))
        assert px.shape == (10, 12, 3) and px.dtype == np.uint8, mode
    assert (r.load_image(paths["L"], (10, 12)) == 77).all()
    assert (r.load_image(paths["RGBA"], (4, 4))[..., 0] == 200).all()
    assert (r.load_image(paths["CMYK"], (4, 4)) == 255).all()
    assert (r.load_image(paths["F"], (4, 4)) == 128).all()
    assert (r.load_image(paths["I"], (4, 4)) == 255).all()


def test_load_image_scales_16_bit_instead_of_clipping(tmp_path):
    from PIL import Image

    a = np.array([[0, 257 * 100, 65535, 32768]], dtype=np.uint16).repeat(4, axis=0)
    path = _save(Image.fromarray(a), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    px = r.load_image(path, (4, 4), resample="nearest")
    assert px[0, :, 0].tolist() == [0, 100, 255, 128]


def test_load_image_first_gif_frame_and_exif_rotation(tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert tuple(r.load_image(gif, (8, 8))[0, 0]) == (255, 0, 0)

    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 40x20 image displays as 20x40
    path = tmp_path / "rot.jpg"
    wide.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    wide.save(path, exif=exif.tobytes())
    px = r.load_image(path, (40, 20))  # (height, width) of the displayed image: no stretching
    assert px[:8].mean() > 200 and px[-8:].mean() < 150


def test_load_image_bad_files(tmp_path, monkeypatch):
    from PIL import Image

    text = tmp_path / "a.jpg"
    text.write_text("hello")
    with pytest.raises(r.RunnerError, match="cannot read image .*a.jpg"):
        r.load_image(text, (8, 8))
    good = _save(Image.new("RGB", (64, 64), (1, 2, 3)), tmp_path / "good.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(r.RunnerError, match="cut.jpg"):
        r.load_image(cut, (8, 8))
    with pytest.raises(r.RunnerError, match="not found"):
        r.load_image(tmp_path / "none.png", (8, 8))
    monkeypatch.setattr(r, "MAX_IMAGE_PIXELS", 1000)
    try:
        for size in (40, 60):  # a warning above the limit, an error above twice the limit
            bomb = _save(Image.new("RGB", (size, size)), tmp_path / f"bomb{size}.png")
            with pytest.raises(r.RunnerError, match="too large"):
                r.load_image(bomb, (8, 8))
    finally:
        Image.MAX_IMAGE_PIXELS = r.MAX_IMAGE_PIXELS


def test_preprocess():
    px = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(r.preprocess(px, None), px.astype(np.float32))
    out = r.preprocess(px, {"mean": [1, 2, 3], "std": [2, 2, 2], "channel_order": "BGR"})
    assert out.dtype == np.float32
    assert np.allclose(out, (px[..., ::-1].astype(np.float32) - [1, 2, 3]) / 2)
    assert r.preprocess(px[None], {"mean": [127.5], "std": [127.5]}).shape == (1, 2, 2, 3)
    with pytest.raises(r.RunnerError):
        r.preprocess(px, {"std": [0, 1, 1]})
    with pytest.raises(r.RunnerError):
        r.preprocess(px[..., :2], None)


def test_list_images(tmp_path, imagenet_labels):
    root = tmp_path / "d"
    for cls, files in {"b": ["2.JPG", "1.png", "x.txt"], "a": ["z.Jpeg", "sub/y.gif"]}.items():
        for f in files:
            (root / cls / f).parent.mkdir(parents=True, exist_ok=True)
            (root / cls / f).write_bytes(b"")
    (root / "loose.jpg").write_bytes(b"")
    os.symlink(root / "a", root / "a" / "sub" / "loop")  # must not hang
    items, names, skipped = r.list_images(root)
    assert names == ["a", "b"]
    rel = [(str(Path(p).relative_to(root)), c) for p, c in items]
    assert rel == [("a/sub/y.gif", 0), ("a/z.Jpeg", 0), ("b/1.png", 1), ("b/2.JPG", 1)]
    assert {Path(p).name for p, _ in skipped} == {"x.txt", "loose.jpg"}

    lab = tmp_path / "lab"
    for folder in ("Egyptian cat", "TENCH", "207"):
        (lab / folder).mkdir(parents=True)
        (lab / folder / "i.png").write_bytes(b"")
    items, names, _ = r.list_images(lab, imagenet_labels)
    assert names == imagenet_labels
    assert sorted(c for _, c in items) == [0 + 1, 207, imagenet_labels.index("Egyptian cat")]
    (lab / "crane").mkdir()  # two ImageNet classes are called "crane"
    with pytest.raises(r.RunnerError, match="crane"):
        r.list_images(lab, imagenet_labels)
    shutil.rmtree(lab / "crane")
    (lab / "unicorn").mkdir()
    with pytest.raises(r.RunnerError, match="'unicorn'"):
        r.list_images(lab, imagenet_labels)
    with pytest.raises(r.RunnerError, match="no images"):
        (tmp_path / "e" / "cls").mkdir(parents=True)
        r.list_images(tmp_path / "e")


def test_evaluate_streams_and_counts(tmp_path, small_model, imagenet_labels):
    data = photo_folder(tmp_path)
    items, names, _ = r.list_images(data, imagenet_labels)
    res = r.evaluate(small_model, items, small_model.raw_prep(), names, batch_size=2)
    assert res["images"] == 4 and res["evaluated"] == 3 and res["skipped"] == 1
    assert res["predictions"][[Path(p).name for p, _ in items].index("broken.jpg")] == -1
    assert res["targets"] == [c for _, c in items]
    assert res["correct_top1"] == 2 and res["correct_top5"] == 3
    assert {c["label"]: c["accuracy"] for c in res["per_class"]} == {
        "Egyptian cat": 1.0, "chickadee": 1.0, "military uniform": 0.0}
    with pytest.raises(r.RunnerError, match="outputs"):
        r.evaluate(small_model, items, None, names[:10])


def test_benchmark_and_machine_info(small_model):
    b = r.benchmark(small_model, runs=5, warmup=1)
    assert b["runs"] == 5 and len(b["runs_ms"]) == 5 and b["first_ms"] > 0
    assert b["min_ms"] <= b["p50_ms"] <= b["max_ms"] and b["throughput_ips"] > 0
    with pytest.raises(r.RunnerError):
        r.benchmark(small_model, runs=0)
    m = r.machine_info()
    assert m["cores"] >= 1 and m["machine"] and m["python"] and m["numpy"] == np.__version__
    # the int8-relevant SIMD features, as /proc/cpuinfo lists them
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert m["simd"] == [f for f in r.SIMD_FEATURES if f in flags]
    assert ("avx2" in m["simd"]) == ("avx2" in flags)
    assert m["cpu"] and m["os"] and m["peak_rss_mb"] > 0
