"""export: integer-only int8 from plain and QAT runs, verification, reproducibility, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_config

runner = CliRunner()


def _export(run, *args):
    from edgetl.cli import app

    return runner.invoke(app, ["export", str(run), *map(str, args)])


@pytest.fixture(scope="module")
def plain_run(learnable, tmp_path_factory):
    from edgetl.train import train

    out = tmp_path_factory.mktemp("export") / "plain"
    train(tiny_config(learnable, out, input_size=48, strategy="fine-tune",
                      unfreeze_from="Conv1", fine_tune_lr=3e-3, epochs=10, batch_size=16))
    return out


@pytest.fixture(scope="module")
def qat_run(learnable, tmp_path_factory):
    from edgetl.train import train

    out = tmp_path_factory.mktemp("export") / "qat"
    train(tiny_config(learnable, out, input_size=48, strategy="fine-tune",
                      unfreeze_from="Conv1", fine_tune_lr=3e-3, epochs=10, batch_size=16,
                      qat=True))
    return out


@pytest.fixture(scope="module")
def plain_int8(plain_run):
    # 48 validation images: one image is 2.08 points, so the default gate (2 points) would make
    # this fixture depend on single images of a barely trained model; the gate has its own test.
    r = _export(plain_run, "--int8", "--num-calibration", 40, "--max-drop", 10)
    assert r.exit_code == 0, r.output
    return plain_run / "export" / "plain_int8.tflite"


def _int8_ok(path: Path, io="uint8"):  # uint8: the default I/O
    from edgetl.inspect import integer_only_report
    from edgetl.runner import read_model

    info = read_model(str(path))
    assert integer_only_report(info, io) == []
    ins = [info.tensors[i] for i in info.inputs]
    outs = [info.tensors[i] for i in info.outputs]
    assert [t.dtype for t in ins] == [io] and [t.dtype for t in outs] == [io]
    assert ins[0].shape == [1, 48, 48, 3]  # batch 1, static: what the Edge TPU wants
    return info


def test_int8_export_is_integer_only_and_carries_metadata(plain_run, plain_int8):
    from edgetl.runner import Model, read_metadata

    _int8_ok(plain_int8)
    meta = read_metadata(str(plain_int8))  # the .tflite alone is enough
    labels = (plain_run / "labels.txt").read_text().split()
    assert meta["labels"] == labels and meta["mode"] == "int8"
    assert meta["input"]["height"] == 48 and meta["input"]["mean"] == [127.5] * 3
    assert meta["io"]["input"][0]["dtype"] == "uint8" and meta["io"]["input"][0]["scale"]
    assert meta["versions"]["tensorflow"].startswith("2.")
    sidecar = json.loads(plain_int8.with_suffix(".json").read_text())
    acc = sidecar["verification"]["accuracy"]
    for key in ("keras_accuracy", "tflite_accuracy", "drop_points", "top1_agreement",
                "per_class_keras", "per_class_tflite"):
        assert key in acc
    assert acc["images"] == len(json.loads((plain_run / "split.json").read_text())["val"])
    assert acc["keras_accuracy"] > 0.4  # the tiny model learned something to compare against
    assert sidecar["verification"]["passed"] is (acc["drop_points"] <= 10.0)
    assert sidecar["settings"]["max_drop"] == 10.0
    # The runner runs it with no flags: preprocessing and labels come from the file.
    m = Model(str(plain_int8))
    assert m.labels == labels


def test_qat_run_exports_integer_only_from_the_qat_model(qat_run):
    r = _export(qat_run, "--int8", "--num-calibration", 40)
    assert r.exit_code in (0, 1), r.output
    path = qat_run / "export" / "qat_int8.tflite"
    _int8_ok(path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["settings"]["qat"] is True
    assert sidecar["verification"]["accuracy"]["top1_agreement"] >= 0.8


def test_reexport_from_manifest_is_byte_identical(plain_run, plain_int8, tmp_path):
    manifest = plain_run / "export" / "plain_calibration.json"
    m = json.loads(manifest.read_text())
    assert m["count"] == 40 and all(len(e["sha256"]) == 64 for e in m["images"])
    copy = tmp_path / "manifest.json"
    shutil.copy(manifest, copy)
    r = _export(plain_run, "--int8", "--calibration-manifest", copy, "--name", "again",
                "--no-verify")
    assert r.exit_code == 0, r.output
    again = plain_run / "export" / "again_int8.tflite"
    from edgetl.metadata import strip as strip_metadata  # the name is in the standard metadata

    assert strip_metadata(again.read_bytes()) == strip_metadata(plain_int8.read_bytes())
    # Same run, same manifest, same name: the whole file, metadata included, is identical.
    r = _export(plain_run, "--int8", "--calibration-manifest", copy, "--overwrite",
                "--max-drop", 10)
    assert r.exit_code in (0, 1), r.output
    assert (plain_run / "export" / "plain_int8.tflite").read_bytes() == plain_int8.read_bytes()


def test_manifest_with_a_changed_image_is_refused(plain_run, plain_int8, tmp_path):
    m = json.loads((plain_run / "export" / "plain_calibration.json").read_text())
    img = tmp_path / "changed.png"
    shutil.copy(m["images"][0]["path"], img)
    m["images"][0]["path"] = str(img)
    img.write_bytes(img.read_bytes() + b"x")
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps(m))
    r = _export(plain_run, "--int8", "--calibration-manifest", bad, "--name", "changed")
    assert r.exit_code == 2 and "changed since the manifest" in r.output
    assert not (plain_run / "export" / "changed_int8.tflite").exists()


def test_integer_check_catches_a_float_model(plain_run, plain_int8):
    from edgetl.inspect import integer_only_report
    from edgetl.runner import read_model

    r = _export(plain_run, "--float32", "--no-verify")
    assert r.exit_code == 0, r.output
    offenders = integer_only_report(read_model(str(plain_run / "export" / "plain_float32.tflite")),
                                    "int8")
    assert any("CONV_2D" in o and "float32" in o for o in offenders)
    assert any(o.startswith("model input") for o in offenders)


def test_max_drop_gate_trips_on_sabotaged_calibration(plain_run, plain_int8, tmp_path):
    from PIL import Image

    from edgetl.runner import read_metadata

    zeros = tmp_path / "zeros"
    zeros.mkdir()
    for i in range(12):
        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(zeros / f"{i}.png")
    r = _export(plain_run, "--int8", "--calibration", zeros, "--name", "sabotaged")
    assert r.exit_code == 1, r.output
    assert "more than --max-drop" in r.output
    path = plain_run / "export" / "sabotaged_int8.tflite"
    assert path.exists()  # kept, and marked as failed in its own metadata
    assert read_metadata(str(path))["verification"]["passed"] is False
    assert json.loads(path.with_suffix(".json").read_text())["verification"]["passed"] is False


def test_several_modes_uint8_io_and_edgetpu_report(plain_run, plain_int8):
    r = _export(plain_run, "--int8", "--io", "uint8", "--edgetpu", "--name", "coral",
                "--num-calibration", 20, "--max-drop", 100)
    assert r.exit_code == 0, r.output
    path = plain_run / "export" / "coral_int8.tflite"
    _int8_ok(path, "uint8")
    tpu = json.loads(path.with_suffix(".json").read_text())["verification"]["edgetpu"]
    assert tpu["ops"] and "offline" in tpu["source"].lower()
    r = _export(plain_run, "--float16", "--dynamic", "--name", "multi", "--no-verify")
    assert r.exit_code == 0, r.output
    from edgetl.inspect import infer_mode
    from edgetl.runner import read_model

    for mode in ("float16", "dynamic"):
        p = plain_run / "export" / f"multi_{mode}.tflite"
        assert infer_mode(read_model(str(p))) == mode


def test_debug_reports_worst_layers(plain_run, plain_int8):
    r = _export(plain_run, "--int8", "--debug", "--name", "dbg", "--num-calibration", 12,
                "--no-verify", "--json")
    assert r.exit_code == 0, r.output
    worst = json.loads(r.stdout)["int8"]["worst_layers"]
    assert worst and {"layer", "op", "rmse_per_scale"} <= set(worst[0])


def test_keep_float_leaves_ops_in_float_and_says_so(plain_run, plain_int8):
    from edgetl.runner import read_model

    r = _export(plain_run, "--int8", "--keep-float", "MEAN", "--name", "kf",
                "--num-calibration", 12, "--no-verify")
    assert r.exit_code == 0, r.output
    path = plain_run / "export" / "kf_int8.tflite"
    report = json.loads(path.with_suffix(".json").read_text())["verification"]
    assert report["integer_only"] is False and "not integer-only" in report["note"]
    info = read_model(str(path))
    means = [op for op in info.operators if op.op == "MEAN"]
    assert means and all(info.tensors[op.inputs[0]].dtype == "float32" for op in means)


@pytest.mark.parametrize("args,message", [
    (["--num-calibration", "0"], "--num-calibration 0"),
    (["--edgetpu", "--io", "float32"], "--edgetpu with --io float32"),
    (["--edgetpu", "--float32"], "--edgetpu needs --int8 alone"),
    (["--calibration", "X", "--calibration-manifest", "Y"], "contradict"),
    (["--int8"], "already exists"),
])
def test_bad_export_flags(plain_run, plain_int8, args, message):
    before = sorted(p.name for p in (plain_run / "export").iterdir())
    r = _export(plain_run, *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert sorted(p.name for p in (plain_run / "export").iterdir()) == before


def test_bad_runs_and_calibration_folders(plain_run, plain_int8, tmp_path):
    r = _export(tmp_path, "--int8")
    assert r.exit_code == 2 and "not an edgetl run directory" in r.output
    broken = tmp_path / "broken"
    shutil.copytree(plain_run, broken, ignore=shutil.ignore_patterns("export"))
    (broken / "model.keras").write_bytes(b"not a model")
    r = _export(broken, "--int8")
    assert r.exit_code == 2 and "cannot load model" in r.output
    assert not (broken / "export" / "broken_int8.tflite").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _export(plain_run, "--int8", "--calibration", empty, "--name", "e")
    assert r.exit_code == 2 and "0 readable image" in r.output
    other = tmp_path / "other" / "zebra"
    other.mkdir(parents=True)
    r = _export(plain_run, "--int8", "--calibration", other.parent, "--name", "o")
    assert r.exit_code == 2 and "zebra" in r.output
