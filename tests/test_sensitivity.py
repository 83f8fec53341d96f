"""sensitivity: per-tensor float32-vs-int8 error ranking on a model with a layer built to be
sensitive, the JSON and text from one dict, and the refusals (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_config

runner = CliRunner()


def _cli(*args):
    from edgetl.cli import app

    return runner.invoke(app, ["sensitivity", *map(str, args)])


def _heavy_tail_model(size: int, classes: int):
    """Two branches into the head; one ends in t**4 (a Multiply of a tensor with itself): its
    values are mostly near zero with rare huge ones, so its min/max int8 range spends nearly all
    codes on the tail and rounds the bulk away. Nothing else in the model is like that."""
    from edgetl.keras import keras

    keras.utils.set_random_seed(0)  # the same initial weights on every run
    k = keras.layers
    x = k.Input((size, size, 3))
    a = k.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    t = k.Conv2D(8, 1, name="pre")(a)
    h = k.Multiply(name="heavy_tail")([t, t, t, t])
    b = k.Conv2D(8, 3, padding="same", activation="relu", name="conv_b")(a)
    c = k.Concatenate(name="cat")([b, h])
    g = k.GlobalAveragePooling2D(name="gap")(c)
    y = k.Dense(classes, activation="softmax", name="head")(g)
    return keras.Model(x, y)


@pytest.fixture(scope="module")
def sensitive_run(synth, tmp_path_factory):
    """A real run (config.json, split.json, labels) whose model.keras is then replaced by the
    hand-built model above, saved the way train saves models."""
    from edgetl.train import _save_model, load_run, train

    out = tmp_path_factory.mktemp("sens") / "run"
    train(tiny_config(synth, out, epochs=1))
    cfg = load_run(out)
    model = _heavy_tail_model(cfg["input_size"], len(cfg["class_names"]))
    _save_model(model, out / "model.keras")
    return out


@pytest.fixture(scope="module")
def report(sensitive_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("sens-json") / "sens.json"
    r = _cli(sensitive_run, "--num-images", 6, "--num-calibration", 20, "--top", 5,
             "--json", path)
    assert r.exit_code == 0, r.output
    return r.output, json.loads(path.read_text())


def test_built_to_be_sensitive_layer_ranks_first(report):
    _, data = report
    rows = data["tensors"]
    assert rows[0]["rank"] == 1 and "heavy_tail" in rows[0]["tensor"]
    assert rows[0]["op"] == "MUL"
    # Clearly worse than every tensor outside the heavy-tail chain, not a coin toss.
    others = [r["own_sqnr_db"] for r in rows if "heavy_tail" not in r["tensor"]
              and r["own_sqnr_db"] is not None]
    assert others and rows[0]["own_sqnr_db"] < min(others) - 3
    # Ranked by the stated key, lowest first.
    keys = [r["own_sqnr_db"] for r in rows if r["own_sqnr_db"] is not None]
    assert keys == sorted(keys)
    assert data["metric"].startswith("own_sqnr_db")
    # Layers whose output is one TFLite tensor get their quantized-alone flips counted.
    by_layer = {r["layer"]: r for r in rows}
    for layer in ("conv_b", "cat", "gap"):
        assert 0 <= by_layer[layer]["flips_alone"] <= data["model"]["images"]


def test_tensors_matched_by_name_with_their_quantization(report):
    _, data = report
    names = {r["tensor"] for r in data["tensors"]}
    for layer in ("conv_a", "conv_b", "cat", "head"):
        assert any(layer in n for n in names), (layer, names)
    for r in data["tensors"]:
        assert r["dtype"] == "int8" and r["scale"] > 0 and -128 <= r["zero_point"] <= 127
        assert 0 <= r["clipped"] <= 1 and r["rmse_per_scale"] >= 0
    m = data["model"]
    assert m["images"] == 6 and m["calibration_images"] == 20
    assert m["tensors_matched"] == len(data["tensors"]) <= m["tensors_int8"]
    assert 0 <= m["top1_agreement"] <= 1 and m["top1_flips"] == round(6 * (1 - m["top1_agreement"]))
    assert m["int8_size_bytes"] < m["float32_size_bytes"]
    assert data["settings"]["calibration_source"] == "training split"


def test_text_table_and_json_come_from_the_same_dict(report):
    text, data = report
    table = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert len(table) == 5  # --top 5
    for line, row in zip(table, data["tensors"]):
        assert line.split()[0] == str(row["rank"]) and row["op"] in line
        assert f"{row['own_sqnr_db']:.1f}" in line
    assert f"({data['model']['top1_flips']} flip(s))" in text


def test_validation_images_exclude_calibration_images(sensitive_run):
    from edgetl.calibrate import sample
    from edgetl.config import ExportConfig
    from edgetl.export import calibration_items
    from edgetl.train import load_run

    # The property the report relies on, checked on the run's own split.
    split = json.loads((sensitive_run / "split.json").read_text())
    calib, _ = calibration_items(ExportConfig(run=str(sensitive_run), num_calibration=20),
                                 load_run(sensitive_run), split)
    val = [tuple(x) for x in split["val"] if x[0] not in set(calib)]
    assert val and not {p for p, _ in sample(val, 6, 0)} & set(calib)


@pytest.mark.parametrize("args, needle", [
    (["--num-images", 0], "--num-images 0 must be at least 1"),
    (["--num-images", -3], "--num-images -3 must be at least 1"),
    (["--num-calibration", 0], "--num-calibration 0 must be at least 1"),
    (["--top", 0], "--top 0 must be at least 1"),
])
def test_bad_numbers_refused_in_one_line(sensitive_run, args, needle):
    r = _cli(sensitive_run, *args)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {needle}")


def test_not_a_run_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        r = _cli(bad)
        assert r.exit_code == 2
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert f"'{bad}' is not an edgetl run directory" in lines[0]


def test_unwritable_json_refused_before_work(sensitive_run, tmp_path):
    target = tmp_path / "no-such-folder" / "s.json"
    r = _cli(sensitive_run, "--json", target)
    assert r.exit_code == 2 and r.output.startswith("error: cannot write --json")
    assert not target.parent.exists()


def test_damaged_split_refused(sensitive_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sensitive_run, copy)
    (copy / "split.json").write_text("{not json")
    r = _cli(copy)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "is damaged" in lines[0] and "split.json" in lines[0]


def test_flips_alone_quantizes_only_that_layer_and_restores_it():
    from edgetl.keras import keras
    from edgetl.sensitivity import _flips_alone, _predict

    keras.utils.set_random_seed(0)
    k = keras.layers
    x = k.Input((16, 16, 3))
    c = k.Conv2D(4, 3, name="c")(x)
    y = k.Dense(3, name="head")(k.GlobalAveragePooling2D(name="gap")(c))
    model = keras.Model(x, y)
    images = np.random.default_rng(1).uniform(-1, 1, (30, 16, 16, 3)).astype(np.float32)
    base = _predict(model, images)
    first = np.asarray(model.get_layer("c")(images[:1]), dtype=np.float64)
    # A scale so coarse that every value of 'c' rounds to zero: the head sees only its bias
    # (zero), so every image falls to class 0; a right-sized scale changes nothing.
    rows = [{"tensor": "model/c/BiasAdd", "layer": "c", "dtype": "int8", "scale": 1e6,
             "zero_point": 0, "flips_alone": None},
            {"tensor": "model/gap/Mean", "layer": "gap", "dtype": "int8", "scale": 1.0,
             "zero_point": 0, "flips_alone": None},
            {"tensor": "model/x/y;model/c/other", "layer": "x", "dtype": "int8", "scale": 1.0,
             "zero_point": 0, "flips_alone": None}]
    gap_first = np.asarray(model.get_layer("gap")(model.get_layer("c")(images[:1])),
                           dtype=np.float64)
    rows[1]["scale"] = float(np.abs(gap_first).max()) / 100
    _flips_alone(model, rows, {"model/c/BiasAdd": first, "model/gap/Mean": gap_first,
                               "model/x/y;model/c/other": first}, images)
    assert len(set(base)) > 1  # the test means something only if classes vary
    assert rows[0]["flips_alone"] == int((base != 0).sum()) > 0
    assert isinstance(rows[1]["flips_alone"], int)  # matched by its values on image 0
    assert rows[2]["flips_alone"] is None  # no Keras layer named 'x' with these values
    assert "call" not in model.get_layer("c").__dict__  # the model is left as it was
    assert (_predict(model, images) == base).all()


def test_validation_inside_calibration_refused(sensitive_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sensitive_run, copy)
    split = json.loads((copy / "split.json").read_text())
    split["val"] = split["train"]  # every validation image would be a calibration image
    (copy / "split.json").write_text(json.dumps(split))
    r = _cli(copy, "--num-calibration", 200)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "no validation image outside the calibration set" in lines[0]
