"""Exporting a transfer-learning QAT run (issue 13 item 5): QAT int8 against PTQ int8 of the float
model from before QAT (--compare-ptq), which float weights --float32 converts, the base model's
sha256 in the metadata, and --base-model with --weights none refused.

One tiny run serves every test: a small CNN trained here and saved as the --base-model, two-phase
with --qat (so the run keeps float_before_qat.keras), 32 px.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import small_trained_net

SIZE = 32
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([str(Path(sys.executable).with_name("edgetl")), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """(run directory, base model file, data folder) of a --base-model two-phase --qat run."""
    from edgetl.config import Strategy, TrainConfig
    from edgetl.data import make_synth
    from edgetl.keras import keras
    from edgetl.train import train

    root = tmp_path_factory.mktemp("transfer_export")
    make_synth(root / "data", classes=3, per_class=30, size=SIZE, seed=5)
    model, _, _ = small_trained_net(root / "data", SIZE, (8, 16), epochs=8)
    base = root / "base.h5"
    model.save(str(base), save_format="h5")
    keras.backend.clear_session()
    run = root / "run"
    train(TrainConfig(data=str(root / "data"), out=str(run), base_model=str(base),
                      input_size=SIZE, strategy=Strategy.two_phase, epochs=10, lr=1e-2,
                      fine_tune_epochs=4, fine_tune_lr=1e-3, batch_size=16, augment=False,
                      quiet=True, qat=True))
    return run, base, root / "data"


@pytest.fixture(scope="module")
def exported(qat_run):
    """export --int8 --float32 --compare-ptq of the QAT run."""
    from edgetl.config import ExportConfig, Quantization
    from edgetl.errors import VerificationError
    from edgetl.export import export

    run, _, _ = qat_run
    try:
        return export(ExportConfig(run=str(run), modes=(Quantization.int8, Quantization.float32),
                                   compare_ptq=True, max_drop=100.0))
    except VerificationError as e:  # only a near-chance warning could do this; keep the figures
        return e.result


def test_compare_ptq_writes_the_ptq_file_and_names_the_one_to_ship(qat_run, exported):
    from edgetl.export import format_reports
    from edgetl.runner import read_model

    run, _, _ = qat_run
    qat_file, ptq_file = run / "export" / "run_int8.tflite", run / "export" / "run_int8_ptq.tflite"
    assert [Path(f).name for f in exported.files] == [
        "run_int8.tflite", "run_float32.tflite", "run_int8_ptq.tflite"]
    assert qat_file.is_file() and ptq_file.is_file()
    ptq_report = exported.reports["int8_ptq"]
    assert ptq_report["integer_only"]
    # Not the same model twice: PTQ of the float model before QAT differs from the QAT file.
    assert read_model(str(ptq_file)).tensors != read_model(str(qat_file)).tensors

    # The task is learnt (chance is 1/3), so the two files are compared on something real.
    assert exported.reports["int8"]["accuracy"]["float_before_qat_accuracy"] > 0.6
    c = exported.reports["int8"]["compare_ptq"]
    assert c == ptq_report["compare_ptq"]
    n = len(json.loads((run / "split.json").read_text())["val"])
    assert c["images"] == n
    # Both files measured on the same images as their own verification did.
    assert c["qat_int8_accuracy"] == exported.reports["int8"]["accuracy"]["tflite_accuracy"]
    assert c["ptq_int8_accuracy"] == ptq_report["accuracy"]["tflite_accuracy"]
    assert c["diff_points"] == pytest.approx(
        (c["qat_int8_accuracy"] - c["ptq_int8_accuracy"]) * 100, abs=1e-9)
    assert c["diff_points"] == pytest.approx((c["a_only"] - c["b_only"]) / n * 100)
    assert c["ship"] in ("run_int8.tflite", "run_int8_ptq.tflite")
    assert c["ship"] in c["why"]
    # PTQ of the float model before QAT is verified against that model.
    assert ptq_report["accuracy"]["keras_accuracy"] == pytest.approx(
        exported.reports["int8"]["accuracy"]["float_before_qat_accuracy"])

    # The sidecars on disk carry it too, and the text report says it.
    qat_side = json.loads(qat_file.with_suffix(".json").read_text())
    assert qat_side["verification"]["compare_ptq"]["ship"] == c["ship"]
    ptq_side = json.loads(ptq_file.with_suffix(".json").read_text())
    assert ptq_side["float_weights"].startswith("float_before_qat.keras")
    assert ptq_side["settings"]["qat"] is False
    text = format_reports(exported)
    assert "QAT vs PTQ int8:" in text
    assert f"ship {c['ship']}" in text or f"noise; {c['ship']} by the point estimate" in text


def test_float32_of_a_qat_run_says_it_converts_the_qat_weights(qat_run, exported):
    run, _, _ = qat_run
    r = exported.reports["float32"]
    assert r["float_weights"].startswith("model.keras: the QAT-trained weights")
    assert "float_before_qat.keras" in r["float_weights"]  # says which one it is not
    side = json.loads((run / "export" / "run_float32.json").read_text())
    assert side["float_weights"] == r["float_weights"]
    assert "float_weights" not in exported.reports["int8"]
    # The float32 file computes model.keras (the QAT weights in float), not float_before_qat.
    from edgetl.calibrate import load_images
    from edgetl.runner import Model
    from edgetl.train import load_model

    val = [p for p, _ in json.loads((run / "split.json").read_text())["val"]]
    x = load_images(val, SIZE, json.loads((run / "config.json").read_text())["preprocessing"])
    tfl = np.asarray(Model(str(run / "export" / "run_float32.tflite")).predict(x))
    before = np.asarray(load_model(run / "float_before_qat.keras")(x, training=False))
    after = np.asarray(load_model(run / "model.keras")(x, training=False))
    np.testing.assert_allclose(tfl.reshape(after.shape), after, atol=1e-4)
    assert np.abs(after - before).max() > 1e-3  # QAT changed the weights: the check can fail


def test_metadata_names_the_base_model_and_its_sha256(qat_run, exported):
    from edgetl.metadata import read

    run, base, _ = qat_run
    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    assert json.loads((run / "config.json").read_text())["base_model"]["sha256"] == sha
    for path in exported.files:
        side = json.loads(Path(path).with_suffix(".json").read_text())
        train = side["source_run"]["train"]
        assert train["base_model"] == {"file": "base.h5", "sha256": sha}
        assert "weights" not in train  # a --base-model run does not use --weights
        description = read(path)["description"]
        assert f"base model base.h5, sha256 {sha}" in description
        assert "imagenet" not in description


def test_qat_against_ptq_names_the_clearly_better_file_or_says_within_noise():
    from edgetl.export import qat_against_ptq

    truth = np.zeros(400, dtype=int)
    ptq = np.zeros(400, dtype=int)
    qat = ptq.copy()
    qat[:40] = 1  # QAT wrong on 40 images PTQ gets right: 10 points worse
    c = qat_against_ptq(qat, ptq, truth, "q.tflite", "p.tflite")
    assert (c["ship"], c["clear"], c["diff_points"]) == ("p.tflite", True, -10.0)
    assert c["ci95_points"][1] < 0
    c = qat_against_ptq(ptq, qat, truth, "q.tflite", "p.tflite")
    assert (c["ship"], c["clear"]) == ("q.tflite", True)
    qat = ptq.copy()
    qat[:1] = 1  # one image: within noise, named by the point estimate
    c = qat_against_ptq(qat, ptq, truth, "q.tflite", "p.tflite")
    assert (c["ship"], c["clear"]) == ("p.tflite", False)
    assert "within noise" in c["why"]
    c = qat_against_ptq(ptq, ptq, truth, "q.tflite", "p.tflite")
    assert (c["ship"], c["clear"]) == ("q.tflite", False)  # a tie: the QAT file


def test_compare_ptq_refusals_write_nothing(qat_run, tmp_path):
    from edgetl.errors import EdgetlError
    from edgetl.export import check_compare_ptq

    run, _, _ = qat_run
    before = sorted(p.name for p in (run / "export").iterdir())
    r = _cli("export", run, "--float32", "--compare-ptq", "--name", "other")
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines == ["error: --compare-ptq compares int8 files: add --int8"], r.stderr
    assert sorted(p.name for p in (run / "export").iterdir()) == before
    with pytest.raises(EdgetlError, match="drop --no-verify"):
        check_compare_ptq(run, ("int8",), verify=False)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(EdgetlError, match="was not trained with --qat"):
        check_compare_ptq(plain, ("int8",), verify=True)
    (plain / "qat.h5").write_bytes(b"")
    with pytest.raises(EdgetlError, match="has no float_before_qat.keras"):
        check_compare_ptq(plain, ("int8",), verify=True)


def test_weights_file_with_base_model_is_refused_and_none_reinitialises(qat_run, tmp_path):
    _, base, data = qat_run
    out = tmp_path / "out"
    r = _cli("train", "--data", data, "--base-model", base, "--weights", base,
             "--out", out, "--input-size", SIZE)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "a base model keeps its own weights" in lines[0], lines
    assert "Traceback" not in r.stderr and not out.exists()
    # A typed --weights imagenet is refused too (it is also the default, which stays quiet).
    r = _cli("train", "--data", data, "--base-model", base, "--weights", "imagenet",
             "--out", out, "--input-size", SIZE)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "ImageNet weights are for registry backbones" in lines[0] and not out.exists()
    # --weights none: the base's architecture with fresh weights, trained from scratch
    from edgetl.config import TrainConfig
    from edgetl.keras import keras
    from edgetl.train import build_base

    cfg = TrainConfig(data=str(data), base_model=str(base), weights="none", input_size=SIZE)
    assert cfg.from_scratch()
    kept = keras.models.load_model(base)
    model, _ = build_base(cfg, SIZE)
    first = next(layer for layer in kept.layers if layer.weights)
    fresh = model.get_layer(first.name).get_weights()[0]
    assert fresh.shape == first.get_weights()[0].shape
    assert not np.allclose(fresh, first.get_weights()[0])


@pytest.mark.parametrize("flags", [["--auto", "--max-drop", "0.5"], ["--keep-float", "MEAN"],
                                   ["--debug"]])
def test_selective_quantization_of_a_qat_run_is_refused_in_one_line(qat_run, exported, flags):
    # TFLite's selective quantization cannot convert a fake-quantized graph: it used to fail after
    # the conversion with TensorFlow's "Please check if the quantized model is in debug mode".
    run, _, _ = qat_run
    before = sorted(p.name for p in (run / "export").iterdir())
    r = _cli("export", run, "--int8", *flags, "--name", "selective")
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {flags[0]} with --int8 on run "), lines
    assert "trained with --qat" in lines[0] and "edgetl sensitivity" in lines[0]
    assert sorted(p.name for p in (run / "export").iterdir()) == before
