"""Standard TFLite metadata: written by export, read back by MediaPipe's own schema module, used by
MediaPipe Tasks' ImageClassifier, and by edgetl's runner for third-party models.

mediapipe cannot live in edgetl's environment (it needs absl-py ~= 2.3, tensorflow-model-
optimization absl-py ~= 1.2), so the client test runs it in a side venv made once and cached in
~/.cache/edgetl/ (override with EDGETL_MEDIAPIPE_VENV). Without PyPI the client test skips, except
in CI where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import IN_CI, tiny_config

MEDIAPIPE = "mediapipe==1.2.3"
# Scores of MediaPipe vs the edgetl runner on the same image. int8: both feed the raw pixel to
# the uint8 input (the runner rounds the half-step tie upward), so the outputs are the same
# quantized values; one output step (1/256) of slack. float32: same kernels, float noise only.
INT8_TOL = 1.0 / 256 + 1e-6
FLOAT_TOL = 1e-4

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(learnable, tmp_path_factory):
    """A tiny trained run exported with the defaults (int8, uint8 I/O) and as float32."""
    from edgetl.cli import app
    from edgetl.train import train

    out = tmp_path_factory.mktemp("meta") / "shapes"
    train(tiny_config(learnable, out, input_size=48, strategy="fine-tune",
                      unfreeze_from="Conv1", fine_tune_lr=3e-3, epochs=10, batch_size=16))
    r = runner.invoke(app, ["export", str(out), "--int8", "--float32", "--num-calibration", "40",
                            "--max-drop", "100"])
    assert r.exit_code == 0, r.output
    assert "uint8 (the default) loads in MediaPipe Tasks" in r.output  # the I/O advice line
    return out


def _files(run: Path):
    return run / "export" / "shapes_int8.tflite", run / "export" / "shapes_float32.tflite"


def test_export_writes_standard_metadata_beside_edgetl_metadata(exported):
    from edgetl import metadata
    from edgetl.runner import read_metadata, read_model

    labels = (exported / "labels.txt").read_text().split()
    int8, float32 = _files(exported)
    for path, dtype, lo, hi in ((int8, "uint8", [0.0], [255.0]),
                                (float32, "float32", [-1.0] * 3, [1.0] * 3)):
        assert "TFLITE_METADATA" in read_model(str(path)).metadata_names
        std = metadata.read(str(path))
        assert std["name"] == "shapes" and std["author"] == "edgetl"
        assert std["version"] and "4 classes" in std["description"]
        assert std["min_parser_version"] == "1.0.0"
        assert std["mean"] == [127.5] * 3 and std["std"] == [127.5] * 3  # the run's "tf" preset
        assert std["input_min"] == lo and std["input_max"] == hi
        assert std["color_space"] == "RGB"
        assert std["labels_file"] == "labels.txt" and std["labels"] == labels
        own = read_metadata(str(path))  # edgetl's JSON is still there, labels and all
        assert own["labels"] == labels and own["io"]["input"][0]["dtype"] == dtype
        with zipfile.ZipFile(path) as zf:  # one archive: the labels file serves both
            assert sorted(zf.namelist()) == ["edgetl.json", "labels.txt"]
    report = json.loads(int8.with_suffix(".json").read_text())["verification"]
    assert report["io"] == "uint8" and report["mediapipe"] == "ok"


def test_write_is_deterministic_and_replaces_existing_metadata(exported):
    from edgetl import metadata
    from edgetl.runner import read_metadata, strip_metadata

    int8, _ = _files(exported)
    data = int8.read_bytes()
    meta = read_metadata(data)
    labels = meta.pop("labels")
    again = metadata.write(data, meta, labels)  # already carries both: replaced, not added
    assert again == metadata.write(again, meta, labels)
    assert metadata.read(again)["labels"] == labels
    # One TFLITE_METADATA entry, however often it is written.
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(strip_metadata(again), 0)
    names = [model.Metadata(i).Name() for i in range(model.MetadataLength())]
    assert names.count(b"TFLITE_METADATA") == 1
    # Weights stay on 16-byte boundaries (the schema's force_align), as the converter wrote them.
    starts = [model.Buffers(i)._tab.Vector(model.Buffers(i)._tab.Offset(4))
              for i in range(model.BuffersLength()) if model.Buffers(i).DataLength()]
    assert len(starts) > 50 and all(p % 16 == 0 for p in starts)


def test_mediapipe_note_names_what_mediapipe_would_get_wrong():
    from edgetl.metadata import mediapipe_note

    def meta(dtype, scale=2 / 255, zero=127, mean=(127.5,) * 3, std=(127.5,) * 3, order="RGB"):
        return {"input": {"mean": list(mean), "std": list(std), "channel_order": order},
                "io": {"input": [{"dtype": dtype, "scale": [scale], "zero_point": [zero]}]}}

    assert mediapipe_note(meta("uint8")) is None
    assert mediapipe_note(meta("float32")) is None
    assert "int8 input" in mediapipe_note(meta("int8"))
    assert "BGR" in mediapipe_note(meta("float32", order="BGR"))
    assert "per-channel" in mediapipe_note(meta("uint8", mean=(123.7, 116.3, 103.5)))
    assert "calibrate with images spanning" in mediapipe_note(meta("uint8", scale=1 / 200))


def _third_party_model(src: Path, dest: Path) -> Path:
    """A model as Model Maker writes it: standard metadata + labels.txt, no edgetl.json."""
    from edgetl import metadata
    from edgetl.runner import read_metadata, read_model, strip_metadata

    data = src.read_bytes()
    labels = read_metadata(data)["labels"]
    info = read_model(data)
    buf = metadata.metadata_buffer(name="third party", description="d", version="v1",
                                   author="someone", input_name=info.tensors[info.inputs[0]].name,
                                   input_dtype="float32", mean=[127.5], std=[127.5],
                                   output_name=info.tensors[info.outputs[0]].name)
    dest.write_bytes(metadata.add_to_model(strip_metadata(data), buf))
    with zipfile.ZipFile(dest, "a") as zf:
        zf.writestr("labels.txt", "\n".join(labels))
    return dest


def test_third_party_model_with_standard_metadata_needs_no_flags(exported, learnable, tmp_path):
    from edgetl.runner import Model, main, read_metadata

    _, float32 = _files(exported)
    model = _third_party_model(float32, tmp_path / "third_party.tflite")
    assert read_metadata(str(model)) is None  # nothing of edgetl's own
    m = Model(str(model))
    assert m.labels == read_metadata(str(float32))["labels"]
    assert m.default_prep()["mean"] == [127.5] * 3 and m.default_prep()["std"] == [127.5] * 3
    out = tmp_path / "third.json"
    ref = tmp_path / "ref.json"
    assert main([str(model), "--data", str(learnable), "--runs", "2", "--warmup", "1",
                 "--json", str(out)]) == 0
    assert main([str(float32), "--data", str(learnable), "--runs", "2", "--warmup", "1",
                 "--json", str(ref)]) == 0
    third, ours = json.loads(out.read_text()), json.loads(ref.read_text())
    assert third["preprocessing"]["source"].startswith("standard TFLite metadata")
    assert third["labels"]["source"] == "associated file labels.txt"
    assert third["accuracy"]["top1"] == ours["accuracy"]["top1"]
    assert third["accuracy"]["images"] == ours["accuracy"]["images"] > 0


def test_integer_model_with_standard_metadata_gets_raw_pixels(exported, tmp_path):
    from edgetl.runner import Model

    int8, _ = _files(exported)
    model = _third_party_model(int8, tmp_path / "third_party_u8.tflite")
    m = Model(str(model))
    # MediaPipe's rule: the quantization of an integer input is its normalisation.
    assert m.standard_prep() is None and m.default_prep() == m.raw_prep()


def test_unusable_or_corrupt_standard_metadata(exported, tmp_path, capsys):
    from edgetl import metadata
    from edgetl.errors import EdgetlError
    from edgetl.runner import Model, RunnerError, main, read_model, strip_metadata

    _, float32 = _files(exported)
    data = strip_metadata(float32.read_bytes())
    info = read_model(data)
    names = dict(input_name=info.tensors[info.inputs[0]].name,
                 output_name=info.tensors[info.outputs[0]].name)
    # The writer refuses std 0; a third-party file that has it anyway (patched here) gets raw
    # pixels, and the report says why.
    with pytest.raises(EdgetlError, match="std non-zero"):
        metadata.metadata_buffer(name="x", description="", version="", author="",
                                 input_dtype="float32", mean=[0.0], std=[0.0], **names)
    buf = metadata.metadata_buffer(name="x", description="", version="", author="",
                                   input_dtype="float32", mean=[0.0], std=[3.0], **names)
    assert buf.count(struct.pack("<3f", 3, 3, 3)) == 1
    buf = buf.replace(struct.pack("<3f", 3, 3, 3), struct.pack("<3f", 0, 0, 0))
    zero_std = tmp_path / "zero_std.tflite"
    zero_std.write_bytes(metadata.add_to_model(data, buf))
    m = Model(str(zero_std))
    assert m.default_prep() == m.raw_prep()
    out = tmp_path / "r.json"
    assert main([str(zero_std), "--runs", "2", "--warmup", "1", "--json", str(out)]) == 0
    assert any("std [0.0, 0.0, 0.0] contains 0" in n and "ignored" in n
               for n in json.loads(out.read_text())["notes"])
    # A TFLITE_METADATA buffer that is not a metadata flatbuffer: one error line, exit 2.
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(metadata.add_to_model(data, b"not a metadata flatbuffer"))
    with pytest.raises(RunnerError, match="TFLITE_METADATA is not a metadata flatbuffer"):
        Model(str(bad))
    capsys.readouterr()
    assert main([str(bad), "--runs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "M001" in err[0]


# --- the real client: MediaPipe Tasks' ImageClassifier ---------------------------------------------

CLIENT = r'''
import json, sys
import mediapipe as mp
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core.base_options import BaseOptions
from mediapipe.tasks.metadata import metadata_schema_py_generated as mfb
from mediapipe.tasks.metadata import schema_py_generated as sfb

model, images = sys.argv[1], sys.argv[2:]
data = open(model, "rb").read()
root = sfb.Model.GetRootAsModel(data, 0)
meta = None
for i in range(root.MetadataLength()):
    if root.Metadata(i).Name() == b"TFLITE_METADATA":
        buf = root.Buffers(root.Metadata(i).Buffer()).DataAsNumpy().tobytes()
        assert mfb.ModelMetadata.ModelMetadataBufferHasIdentifier(buf, 0)
        m = mfb.ModelMetadataT.InitFromObj(mfb.ModelMetadata.GetRootAsModelMetadata(buf, 0))
        t_in = m.subgraphMetadata[0].inputTensorMetadata[0]
        t_out = m.subgraphMetadata[0].outputTensorMetadata[0]
        meta = {"name": m.name.decode(), "min_parser_version": m.minParserVersion.decode(),
                "mean": [float(v) for v in t_in.processUnits[0].options.mean],
                "std": [float(v) for v in t_in.processUnits[0].options.std],
                "color_space": t_in.content.contentProperties.colorSpace,
                "label_file": t_out.associatedFiles[0].name.decode(),
                "label_type": t_out.associatedFiles[0].type}
options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model),
                                        max_results=-1)
results = []
with vision.ImageClassifier.create_from_options(options) as classifier:
    for path in images:
        cats = classifier.classify(mp.Image.create_from_file(path)).classifications[0].categories
        cats = sorted(cats, key=lambda c: c.index)
        results.append({"labels": [c.category_name for c in cats],
                        "scores": [float(c.score) for c in cats]})
print(json.dumps({"metadata": meta, "results": results}))
'''


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"the MediaPipe client test must run in CI: {reason}")
    pytest.skip(reason)


def mediapipe_python() -> Path:
    """Python of a cached side venv with MediaPipe (made on first use from PyPI)."""
    home = Path(os.environ.get("EDGETL_MEDIAPIPE_VENV")
                or Path.home() / ".cache" / "edgetl" / MEDIAPIPE.replace("==", "-"))
    python = home / "bin" / "python"
    check = [str(python), "-c", "from mediapipe.tasks.python import vision"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    staging = home.with_name(f".{home.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(staging)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        _unavailable(f"cannot make a venv for MediaPipe: {made.stderr.strip()[-300:]}")
    pip = subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", MEDIAPIPE],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last = (pip.stderr.strip().splitlines() or ["no output"])[-1]
        _unavailable(f"pip install {MEDIAPIPE} failed (PyPI unreachable?): {last}")
    # venv scripts hard-code their folder: a renamed venv's python still runs (python -m pip
    # and imports use sys.prefix, found from the binary's location).
    shutil.rmtree(home, ignore_errors=True)
    try:
        os.replace(staging, home)
    except OSError:  # another test process got there first
        shutil.rmtree(staging, ignore_errors=True)
    if subprocess.run(check, capture_output=True).returncode != 0:
        _unavailable(f"{MEDIAPIPE} installed but does not import")
    return python


@pytest.mark.slow
def test_mediapipe_image_classifier_matches_the_runner(exported, tmp_path):
    from edgetl.runner import Model, load_image, preprocess

    python = mediapipe_python()
    split = json.loads((exported / "split.json").read_text())
    images = [p for p, _ in split["val"]]
    labels = (exported / "labels.txt").read_text().split()
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    for path, tol in zip(_files(exported), (INT8_TOL, FLOAT_TOL)):
        done = subprocess.run([str(python), str(script), str(path), *images],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        # MediaPipe's own schema module reads what edgetl wrote.
        assert got["metadata"] == {"name": "shapes", "min_parser_version": "1.0.0",
                                   "mean": [127.5] * 3, "std": [127.5] * 3, "color_space": 1,
                                   "label_file": "labels.txt", "label_type": 2}
        m = Model(str(path))
        prep = m.default_prep()
        for image, result in zip(images, got["results"]):
            assert result["labels"] == labels  # the embedded labels, in output order
            ours = m.predict(preprocess(load_image(image, m.input_size), prep)[None])[0]
            theirs = np.array(result["scores"])
            assert theirs.argmax() == ours.argmax(), (path.name, image, theirs, ours)
            assert np.abs(theirs - ours).max() <= tol, (path.name, image, theirs, ours)


@pytest.mark.slow
def test_mediapipe_refuses_int8_io_which_is_why_uint8_is_the_default(exported, tmp_path):
    from edgetl.cli import app

    r = runner.invoke(app, ["export", str(exported), "--int8", "--io", "int8", "--name", "i8",
                            "--num-calibration", "20", "--no-verify"])
    assert r.exit_code == 0, r.output
    path = exported / "export" / "i8_int8.tflite"
    assert "int8 input" in json.loads(path.with_suffix(".json").read_text())[
        "verification"]["mediapipe"]
    python = mediapipe_python()
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    image = json.loads((exported / "split.json").read_text())["val"][0][0]
    done = subprocess.run([str(python), str(script), str(path), image], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0 and "Type mismatch for input tensor" in done.stderr
