"""export --auto: a budget met by keeping a layer built to be sensitive in float, the refusal
path (an impossible budget keeps the best candidate and says so), the Edge TPU restriction
(integer candidates only), the calibration stability check and the flags' bad values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_config

runner = CliRunner()
OUTLIER = 1e5  # one unit stuck at this value: its int8 scale (~400) rounds the features to 0


def _export(run, *args):
    from edgetl.cli import app

    return runner.invoke(app, ["export", str(run), *map(str, args)])


def make_sensitive_run(data: Path, out: Path, shrink: float = 1.0) -> Path:
    """A run whose model.keras is a small conv net with one layer built to be sensitive:
    'outlier' passes the 16 features through (times ``shrink``) and adds a unit that is always
    OUTLIER, so its int8 range is [0, OUTLIER] and the features round to zero; 'head' ignores
    that unit and undoes ``shrink``. With shrink 1e-3 the int16 scale (~3) rounds them to zero
    too (the float model is unchanged: ReLU commutes with a positive scale).
    Float accuracy is that of the trained net, int8 answers one class."""
    from edgetl.export import load_batch
    from edgetl.keras import keras, tf
    from edgetl.train import train

    train(tiny_config(data, out, epochs=1, strategy="feature-extract"))  # the run's files
    cfg = json.loads((out / "config.json").read_text())
    split = json.loads((out / "split.json").read_text())
    x = load_batch([p for p, _ in split["train"]], (32, 32, 3), cfg["preprocessing"])
    y = np.array([label for _, label in split["train"]])
    k = len(cfg["class_names"])
    tf.random.set_seed(0)
    inp = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inp)
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    f = keras.layers.Dense(16, activation="relu", name="features")(h)
    small = keras.Model(inp, keras.layers.Dense(k, activation="softmax", name="head0")(f))
    small.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    small.fit(x, y, epochs=40, batch_size=32, verbose=0)
    o = keras.layers.Dense(17, activation="relu", name="outlier")(f)
    model = keras.Model(inp, keras.layers.Dense(k, activation="softmax", name="head")(o))
    w, b = np.zeros((16, 17), np.float32), np.zeros(17, np.float32)
    w[:, :16], b[16] = np.eye(16) * shrink, OUTLIER
    model.get_layer("outlier").set_weights([w, b])
    kernel, bias = small.get_layer("head0").get_weights()
    model.get_layer("head").set_weights([np.concatenate([kernel / shrink, np.zeros((1, k))]),
                                       bias])
    model.save(out / "model.keras")
    if shrink == 1.0:  # the same features, shrunk: a model that int16x8 wrecks too
        shutil.copytree(out, out.with_name(out.name + "_int16"))
        _with_shrink(model, 1e-3).save(out.with_name(out.name + "_int16") / "model.keras")
    return out


def _with_shrink(model, shrink: float):
    from edgetl.keras import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    w, b = clone.get_layer("outlier").get_weights()
    w[:, :16] *= shrink
    clone.get_layer("outlier").set_weights([w, b])
    kernel, bias = clone.get_layer("head").get_weights()
    kernel[:16] /= shrink
    clone.get_layer("head").set_weights([kernel, bias])
    return clone


@pytest.fixture(scope="module")
def sensitive_run(tmp_path_factory) -> Path:
    from edgetl.data import make_synth

    base = tmp_path_factory.mktemp("auto")
    make_synth(base / "data", classes=4, per_class=40, size=32, seed=3)
    return make_sensitive_run(base / "data", base / "run")


def _sidecar(run: Path, name: str) -> dict:
    return json.loads((run / "export" / f"{name}_int8.json").read_text())


def test_auto_keeps_the_sensitive_layer_float_and_meets_the_budget(sensitive_run):
    from edgetl.runner import read_model

    r = _export(sensitive_run, "--int8", "--auto", "--max-drop", 5, "--num-calibration", 40,
                "--name", "met", "--plots", "--check-calibration")
    assert r.exit_code == 0, r.output
    side = _sidecar(sensitive_run, "met")
    auto = side["verification"]["auto"]
    first, chosen = auto["candidates"][0], auto["candidates"][auto["chosen"]]
    assert first["candidate"] == "int8" and first["drop_points"] > 30  # int8 wrecks it
    assert auto["met"] and chosen["met"] and chosen["drop_points"] <= 5
    assert any("outlier" in t for t in chosen["keep_float"])  # found by sensitivity
    assert chosen["mode"] == "int8" and chosen["io"] == "float32"
    for c in auto["candidates"]:
        assert {"size_bytes", "latency_p50_ms", "accuracy", "drop_points", "drop_ci95_points",
                "changes"} <= set(c) and c["size_bytes"] > 0 and c["latency_p50_ms"] > 0
    assert auto["reference_float32"]["size_bytes"] > chosen["size_bytes"]
    # the written file is the chosen one, verified by export's own path
    acc = side["verification"]["accuracy"]
    assert acc["drop_points"] <= 5 and side["settings"]["keep_float"] == chosen["keep_float"]
    info = read_model(str(sensitive_run / "export" / "met_int8.tflite"))
    fcs = [op for op in info.operators if op.op == "FULLY_CONNECTED"]
    assert any(info.tensors[op.inputs[0]].dtype == "float32" for op in fcs)
    assert "kept #" in r.output and "first to meet the budget" in r.output
    assert "float32 (reference, not a candidate)" in r.output
    png = sensitive_run / "export" / "met_int8_pareto.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # JSON and the table only, and the report says why
        assert not png.exists() and "matplotlib is not installed" in r.output
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check = side["verification"]["calibration_check"]
    assert check["images_per_half"] == [20, 20] and check["stable"] in (True, False)
    assert "calibration check: halves of 20 and 20 images" in r.output


def test_auto_impossible_budget_says_so_and_keeps_the_best(sensitive_run):
    # Two candidates: full int8 and whole-model int16x8; the outlier wrecks both (or the
    # runner's XNNPACK refuses int8's scales: then that candidate is reported and skipped).
    run = sensitive_run.with_name(sensitive_run.name + "_int16")
    r = _export(run, "--int8", "--auto", "--max-drop", 5, "--num-calibration", 40,
                "--auto-max-candidates", 2, "--name", "unmet")
    assert r.exit_code == 1, r.output
    assert "none met --max-drop 5.0; kept the best" in r.output
    side = _sidecar(run, "unmet")
    auto = side["verification"]["auto"]
    assert [c["candidate"] for c in auto["candidates"]] == ["int8", "int16x8 (whole model)"]
    assert not auto["met"] and side["verification"]["passed"] is False
    runnable = [c for c in auto["candidates"] if c.get("error") is None]
    best = min(runnable, key=lambda c: (c["drop_points"], c["size_bytes"]))
    assert auto["chosen"] == best["index"] and best["drop_points"] > 5
    assert (run / "export" / "unmet_int8.tflite").exists()  # kept, marked failed
    assert side["mode"] == best["mode"]


def test_auto_with_edgetpu_tries_integer_candidates_only(sensitive_run):
    from edgetl.inspect import integer_only_report
    from edgetl.runner import read_model

    r = _export(sensitive_run, "--int8", "--auto", "--edgetpu", "--max-drop", 5,
                "--num-calibration", 40, "--name", "tpu")
    assert r.exit_code == 1, r.output
    assert "only integer int8 candidates are allowed" in r.output
    auto = _sidecar(sensitive_run, "tpu")["verification"]["auto"]
    assert [c["candidate"] for c in auto["candidates"]] == ["int8", "int8, per-tensor weights"]
    assert all(c["keep_float"] == [] and c["mode"] == "int8" for c in auto["candidates"])
    assert "reference_float32" not in auto
    info = read_model(str(sensitive_run / "export" / "tpu_int8.tflite"))
    assert integer_only_report(info, "uint8") == []


def test_check_calibration_flags_halves_that_disagree(sensitive_run):
    from edgetl.autoquant import check_calibration
    from edgetl.config import IOType
    from edgetl.export import load_batch
    from edgetl.train import load_model

    cfg = json.loads((sensitive_run / "config.json").read_text())
    split = json.loads((sensitive_run / "split.json").read_text())
    prep = cfg["preprocessing"]
    real = load_batch([p for p, _ in split["train"][:12]], (32, 32, 3), prep)
    dark = np.full_like(real, real.min())  # one half sees only black images: tiny ranges
    calib = np.stack([a for pair in zip(dark, real) for a in pair])  # even -> A, odd -> B
    images = load_batch([p for p, _ in split["val"]], (32, 32, 3), prep)
    labels = np.array([label for _, label in split["val"]])
    model = load_model(sensitive_run / "model.keras")
    out = check_calibration(model, calib, [None] * len(calib), images, labels, IOType.float32)
    assert out["images_per_half"] == [12, 12] and out["stable"] is False
    assert out["tensors_differing"] > 0 and out["recommended_images"] >= 48
    assert f"calibrate on at least {out['recommended_images']} images" in out["warning"]


@pytest.mark.parametrize("args,message", [
    (["--float32", "--auto"], "--auto needs --int8"),
    (["--int8", "--auto", "--keep-float", "MEAN"], "--auto and --keep-float contradict"),
    (["--int8", "--auto", "--no-verify"], "--auto and --no-verify contradict"),
    (["--int8", "--auto", "--auto-max-candidates", 1], "--auto-max-candidates 1"),
    (["--int8", "--plots"], "--plots needs --auto"),
    (["--float32", "--check-calibration"], "--check-calibration needs --int8"),
])
def test_bad_auto_flags(tmp_path, args, message):
    r = _export(tmp_path / "no-run", *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert r.output.startswith("error: ") and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []
