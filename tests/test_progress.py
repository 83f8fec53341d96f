"""Progress while a person waits, and layer names where users need them (issue 14, items 6-7).

In a log (not a terminal) every step prints one line when it ends, in the order the steps run;
each export mode's report is printed before the next mode converts; `edgetl backbones NAME
--layers` lists the layers flags name; a bad --unfreeze-from fails before data or weights load.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgetl.cli import app
from edgetl.errors import EdgetlError
from edgetl.progress import Progress

from conftest import tiny_config

EDGETL = str(Path(sys.executable).with_name("edgetl"))
TINY = ["--alpha", "0.35", "--input-size", "32", "--weights", "none", "--batch-size", "8",
        "--no-augment"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _run(*args) -> list[str]:
    """A real edgetl process with stdout and stderr in one pipe (not a terminal): its lines in
    the order it wrote them."""
    proc = subprocess.run([EDGETL, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout
    return proc.stdout.splitlines()


def _index(lines: list[str], pattern: str, start: int = 0) -> int:
    for i in range(start, len(lines)):
        if re.search(pattern, lines[i]):
            return i
    raise AssertionError(f"no line after {start} matches {pattern!r}:\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def logged_run(synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("progress") / "run"
    lines = _run("train", "--data", synth, "--out", run, *TINY, "--epochs", "2", "--verbose")
    return run, lines


# --- progress ------------------------------------------------------------------------------------

def test_train_log_has_one_line_per_step_in_order(logged_run):
    _, lines = logged_run
    order = [r"^scan '.*': 36 images in 3 classes \(\d+ train, \d+ validation\)"
             r" \(\d+\.\d s\)$", r"^settings: ", r"^load TensorFlow: ", r"^build mobilenetv2: 153 base layers",
             r"^phase 1/1: ", r"fine-tune epoch 1/2 done", r"fine-tune epoch 2/2 done",
             r"^best epoch ", r"^run: "]
    at = 0
    for pattern in order:
        at = _index(lines, pattern, at) + 1
    for step in ("scan ", "load TensorFlow", "build "):
        assert sum(line.startswith(step) for line in lines) == 1, lines
    # Not a terminal: no Keras bar, nothing redrawn, nothing glued onto another line.
    assert not any("\r" in line or "\b" in line or line.startswith("Epoch ") for line in lines)
    epochs = [line for line in lines if " epoch " in line and " done in " in line]
    assert len(epochs) == 2
    for line in epochs:  # --verbose: the training loss and accuracy too
        assert re.search(r"\bloss \d+\.\d{4}, accuracy \d+\.\d{4}, val_accuracy ", line), line
    assert "phase ETA" in epochs[0] and "phase ETA" not in epochs[1]


def test_export_prints_each_mode_as_it_is_verified(logged_run):
    run, _ = logged_run
    lines = _run("export", run, "--int8", "--float16", "--max-drop", "100", "--overwrite")
    order = [r"^calibration images: \d+ from the training split", r"^load model\.keras: ",
             r"^convert int8: .* MB before metadata, calibrated on \d+ images \(\d+\.\d s\)$",
             r"^verify int8: \d+ validation images: keras ", r"_int8\.tflite  \(",
             r"^  verification: ", r"^convert float16: ", r"^verify float16: ",
             r"_float16\.tflite  \(", r"^  verification: ", r"^calibration manifest: ",
             r"^--io types: "]
    at = 0
    for pattern in order:
        at = _index(lines, pattern, at) + 1
    assert sum(line.startswith("convert ") for line in lines) == 2
    # The converter's and LiteRT's C++ chatter is filtered out of fd 2.
    assert not [line for line in lines if line.startswith(("fully_quantize", "INFO: "))], lines


def test_export_quiet_prints_the_reports_only(logged_run):
    run, _ = logged_run
    result = _cli("export", run, "--float32", "--max-drop", "100", "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert "_float32.tflite  (" in result.stdout
    steps = [line for line in result.output.splitlines()
             if re.match(r"^(calibration images|load |convert |verify )", line)]
    assert steps == []


def test_steps_in_a_log_one_line_each_none_when_quiet_or_failed():
    out = io.StringIO()
    p = Progress(stream=out)
    assert not p.live  # a StringIO is not a terminal
    with p.step("scan 'x'", total=3) as step:
        for _ in range(3):
            step.advance()
        step.done("3 images")
    with pytest.raises(ValueError):
        with p.step("build"):
            raise ValueError("boom")  # the error reports it: no success line
    with p.step("load"):
        pass
    assert re.fullmatch(r"scan 'x': 3 images \(\d+\.\d s\)\nload: done \(\d+\.\d s\)\n",
                        out.getvalue()), out.getvalue()
    quiet = io.StringIO()
    with Progress(quiet=True, stream=quiet).step("scan") as step:
        step.done("x")
    assert quiet.getvalue() == ""


def test_held_lines_print_on_release_and_never_before_an_error():
    """Bad input stays one error line in a log: lines wait until the inputs are checked."""
    out = io.StringIO()
    p = Progress(stream=out, hold=True)
    with p.step("scan"):
        pass
    p.line("note: kept even when quiet", always=True)
    assert out.getvalue() == ""
    p.release()
    p.line("phase 1/1")
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == [
        "scan", "note", "phase 1/1"]
    quiet = io.StringIO()
    q = Progress(quiet=True, stream=quiet, hold=True)
    q.line("settings")
    q.line("note: left out 1 file", always=True)
    q.release()
    assert quiet.getvalue() == "note: left out 1 file\n"


def test_folder_scan_reports_every_image(synth):
    from edgetl.data import scan_folder

    seen = []
    folder = scan_folder(synth, (32, 32), on_image=lambda: seen.append(1))
    assert len(seen) == len(folder.items) + len(folder.skipped) == 36


# --- layer names ---------------------------------------------------------------------------------

def test_backbones_layers_lists_index_name_type_shape_and_what_trains():
    result = _cli("backbones", "mobilenetv2", "--layers", "--alpha", "0.35", "--input-size", "32",
                  "--weights", "none", "--strategy", "fine-tune", "--unfreeze-from",
                  "block_16_expand", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = report["layers"]
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert rows[0]["type"] == "InputLayer" and rows[0]["output_shape"] == "32x32x3"
    by_name = {r["name"]: r for r in rows}
    assert by_name["Conv1"]["type"] == "Conv2D" and by_name["Conv1"]["output_shape"] == "16x16x16"
    start = by_name["block_16_expand"]["index"]
    # From scratch, everything from the named layer up trains (BatchNorm included), nothing below.
    assert [r["trainable"] for r in rows] == [i >= start for i in range(len(rows))]
    assert report["strategy"] == "fine-tune" and "block_16_expand" in report["trains"]

    text = _cli("backbones", "mobilenetv2", "--layers", "--alpha", "0.35", "--input-size", "32")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert "feature-extract" in lines[0] and "the head only" in lines[0]
    assert lines[1].split() == ["index", "name", "type", "output", "params", "trains"]
    assert lines[3].split()[:3] == ["1", "Conv1", "Conv2D"] and lines[3].split()[-1] == "no"
    assert len(lines) == 2 + len(rows)


def test_backbones_layers_needs_exactly_one_model():
    for args in (["backbones", "--layers"],
                 ["backbones", "mobilenetv2", "--layers", "--base-model", "m.h5"]):
        result = _cli(*args)
        assert result.exit_code == 2
        assert result.output.count("\n") == 1 and "backbones mobilenetv2 --layers" in \
            result.output, result.output
    result = _cli("backbones", "mobilenetv9", "--layers")
    assert result.exit_code == 2 and "mobilenetv2" in result.output
    result = _cli("backbones", "--alpha", "0.5")  # not silently ignored
    assert result.exit_code == 2 and "--alpha applies to a layer list: add --layers" in \
        result.output


def _small_h5(path: Path) -> Path:
    from edgetl.keras import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, name="stem")(inp)
    x = keras.layers.Conv2D(8, 3, name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(2, name="logits")(x)
    keras.Model(inp, out).save(path)
    return path


def test_base_model_layers_are_the_cut_backbone(tmp_path):
    model = _small_h5(tmp_path / "m.h5")
    result = _cli("backbones", "--base-model", model, "--layers", "--json")
    assert result.exit_code == 0, result.output
    names = [r["name"] for r in json.loads(result.stdout)["layers"]]
    assert names[1:] == ["stem", "features"]  # cut below the pooling and the classifier


def test_bad_unfreeze_from_fails_before_weights_or_data_load(synth, tmp_path):
    """The weights file is junk and the data folder missing: the layer name is still what
    fails, so neither was read."""
    from edgetl.train import train

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "no-such-data", out, weights=str(junk), strategy="fine-tune",
                      unfreeze_from="block_16_expnd")
    with pytest.raises(EdgetlError) as e:
        train(cfg)
    text = str(e.value)
    assert "--unfreeze-from 'block_16_expnd' is not a layer of mobilenetv2" in text
    assert "'block_16_expand'" in text and "edgetl backbones mobilenetv2 --layers" in text
    assert "\n" not in text and not out.exists()


def test_bad_unfreeze_from_on_a_base_model_reads_only_its_config(synth, tmp_path):
    import h5py

    from edgetl.train import train

    model = _small_h5(tmp_path / "m.h5")
    with h5py.File(model, "a") as f:  # no weights left: loading the model would fail
        del f["model_weights"]
    cfg = tiny_config(tmp_path / "no-such-data", tmp_path / "run", base_model=str(model),
                      weights="imagenet", strategy="fine-tune", unfreeze_from="featurs")
    with pytest.raises(EdgetlError) as e:
        train(cfg)
    assert "--unfreeze-from 'featurs' is not a layer of" in str(e.value)
    assert "'features'" in str(e.value) and "--base-model" in str(e.value)
    with pytest.raises(EdgetlError) as e:  # --cut-layer too, before the (missing) data
        train(replace(cfg, unfreeze_from=None, cut_layer="featurs"))
    assert "--cut-layer 'featurs' is not a layer of" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_few_steps_from_scratch_are_warned_before_training(logged_run):
    from edgetl.config import TrainConfig
    from edgetl.train import few_steps_warning

    _, lines = logged_run  # 36 images, batch 8, 2 epochs from scratch: far below 150 steps
    warned = [line for line in lines if line.startswith("warning: ") and "optimizer steps" in line]
    assert len(warned) == 1 and "--epochs" in warned[0], lines
    assert lines.index(warned[0]) < next(i for i, l in enumerate(lines) if l.startswith("phase "))
    lfw = TrainConfig(data="d", weights="none").with_defaults()[0]  # 128 images, defaults
    assert "10 epoch(s) x 4 batch(es) = 40 optimizer steps" in few_steps_warning(lfw, 128)
    assert "--epochs 38" in few_steps_warning(lfw, 128)
    assert few_steps_warning(lfw, 4000) is None  # MNIST 5k: 1,250 steps
    assert few_steps_warning(TrainConfig(data="d").with_defaults()[0], 128) is None  # pretrained: not from scratch


def test_sensitivity_reports_each_step(logged_run):
    run, _ = logged_run
    lines = _run("sensitivity", run, "--num-images", "6", "--top", "2")
    order = [r"^load images: \d+ calibration, 6 validation \(", r"^load model\.keras: ",
             r"^convert float32: .* MB \(", r"^convert int8: .* MB, calibrated on \d+ images",
             r"^compare tensors: \d+ int8 tensors with a float32 twin on 6 images \(",
             r"^flips per tensor: \d+ layer outputs quantized alone, 6 images each \(",
             r"^per-tensor int8 sensitivity of "]
    at = 0
    for pattern in order:
        at = _index(lines, pattern, at) + 1
    assert not [line for line in lines if line.startswith(("fully_quantize", "INFO: "))], lines


def test_bench_reports_each_model_as_it_is_measured():
    from conftest import realdata

    coral = realdata("coral")
    v1, v2 = coral / "mobilenet_v1_0.25_128_quant.tflite", coral / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
    lines = _run("bench", v1, v2, "--runs", "3", "--warmup", "1")
    first = _index(lines, rf"^model 1/2 {re.escape(v1.name)}: p50 [\d.]+ ms \(\d+\.\d s\)$")
    second = _index(lines, rf"^model 2/2 {re.escape(v2.name)}: p50 [\d.]+ ms \(", first + 1)
    _index(lines, r"^model +format +size MB", second + 1)  # the table comes after


def test_scan_line_names_both_folders_with_val_data(synth, tmp_path):
    from edgetl.config import TrainConfig
    from edgetl.data import make_synth
    from edgetl.progress import Progress
    from edgetl.train import _datasets

    val = tmp_path / "val"
    make_synth(val, classes=3, per_class=4, size=32, seed=9)
    buf = io.StringIO()
    _datasets(TrainConfig(data=str(synth), val_data=str(val)), (32, 32),
              Progress(stream=buf, live=False))
    assert re.match(rf"scan '{re.escape(str(synth))}' \+ '{re.escape(str(val))}': 48 images in "
                    r"3 classes \(36 train, 12 validation\)", buf.getvalue()), buf.getvalue()
