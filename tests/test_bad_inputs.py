"""The bad-input catalogue: what edgetl refuses (or accepts by design), and what it says.

One table, one row per bad input: (id, setup, expected exit code, expected message). Each row
builds its bad input in a fresh folder and runs the real command: ``edgetl ...`` through typer's
CliRunner (in process, fast), or ``edgetl_runner.py`` through its ``main()``. A refused row must
exit with its code, print exactly one line (``error: ...`` matching the message) and no
traceback, and leave every watched folder exactly as it was: nothing half-written, nothing
deleted. A few rows are accepted *by design* (16-bit PNG, CMYK JPEG, a PNG named .jpg, unicode
class names, images of any size for calibration, corrupt images skipped and listed without
``--strict``); those rows assert the acceptance instead (exit 0, the file used or listed).

``test_subprocess_subset`` re-runs a representative subset as real processes to prove "one line
on stderr, no traceback" outside the test harness. docs/errors.md is the human-readable version
of this table. The count is printed at the end of the session by tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
EDGETL = Path(sys.executable).with_name("edgetl")
RUNNER = REPO / "devices" / "edgetl_runner.py"
TINY_FLAGS = ["--alpha", "0.35", "--input-size", "32", "--weights", "none", "--batch-size", "8",
              "--epochs", "1", "--no-augment", "--quiet"]

cli = CliRunner()


# --- shared inputs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """3 classes x 6 generated 32 px PNGs: the smallest set a tiny run trains on."""
    from edgetl.data import make_synth

    out = tmp_path_factory.mktemp("bad-small") / "data"
    make_synth(out, classes=3, per_class=6, size=32, seed=0)
    return out


@pytest.fixture(scope="module")
def tiny_run(small_data, tmp_path_factory) -> Path:
    """A finished tiny run with a verified int8 export in run/export/run_int8.tflite."""
    from edgetl.config import ExportConfig
    from edgetl.export import export
    from edgetl.train import train

    run = tmp_path_factory.mktemp("bad-run") / "run"
    train(tiny_config(small_data, run, epochs=1))
    export(ExportConfig(run=str(run), num_calibration=12, max_drop=100.0))
    return run


# --- small builders -------------------------------------------------------------------------------

def _noise(size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _jpeg(path: Path, size=64) -> Path:
    from PIL import Image

    Image.fromarray(_noise(size)).save(path, "JPEG", quality=90)
    return path


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A real 20000 x 20000 PNG (1-bit grey, about 60 KB): 400 megapixels when decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _zip_of_text(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "holiday photos, not a model")
    return path


class Env:
    """What a row's setup may use: a fresh folder, copies of the shared inputs, monkeypatch."""

    def __init__(self, request, tmp: Path, monkeypatch):
        self.request, self.tmp, self.monkeypatch = request, tmp, monkeypatch
        self.watched = [tmp]

    def data(self, name: str = "data") -> Path:
        out = self.tmp / name
        shutil.copytree(self.request.getfixturevalue("small_data"), out)
        return out

    @property
    def run(self) -> Path:
        """The shared finished run (read-only: rows that damage a run use run_copy)."""
        run = self.request.getfixturevalue("tiny_run")
        if run not in self.watched:
            self.watched.append(run)
        return run

    @property
    def int8(self) -> Path:
        return self.run / "export" / "run_int8.tflite"

    def run_copy(self, name: str = "run") -> Path:
        out = self.tmp / name
        shutil.copytree(self.run, out, ignore=shutil.ignore_patterns("checkpoints"))
        return out

    def train(self, data: Path, *extra) -> list:
        flags = TINY_FLAGS
        if "--base-model" in extra:  # a base model brings its own weights: --weights is refused
            i = TINY_FLAGS.index("--weights")
            flags = TINY_FLAGS[:i] + TINY_FLAGS[i + 2:]
        return ["edgetl", "train", "--data", data, "--out", self.tmp / "out", *flags, *extra]


@dataclass(frozen=True)
class Case:
    """One row of the catalogue.

    Attributes:
        id: short name of the bad input.
        setup: builds the input in Env and returns the command (``["edgetl", ...]`` or
            ``["runner", ...]``).
        code: expected exit code.
        message: regex the one ``error:`` line must match (refused rows).
        accepted: for rows accepted by design, a check run after the command (exit code 0).
    """

    id: str
    setup: Callable[[Env], list]
    code: int
    message: str = ""
    accepted: Callable[[Env], None] | None = None


# --- train: image folders ----------------------------------------------------------------------

def _truncated_jpeg(e: Env):
    d = e.data()
    raw = _jpeg(d / "circle" / "cut.jpg").read_bytes()
    (d / "circle" / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    return d


def _split(e: Env) -> dict:
    return json.loads((e.tmp / "out" / "split.json").read_text())


def _used(e: Env, name: str) -> None:
    split = _split(e)
    used = [p for p, _ in split["train"] + split["val"]]
    assert any(p.endswith(name) for p in used), used
    assert split["skipped"] == []


def _skipped(e: Env, name: str, reason: str) -> None:
    skipped = _split(e)["skipped"]
    assert any(p.endswith(name) and re.search(reason, why) for p, why in skipped), skipped


def _png_as_jpg(e: Env):
    from PIL import Image

    d = e.data()
    Image.fromarray(_noise()).save(d / "cross" / "really_a_png.jpg", "PNG")
    return e.train(d, "--strict")


def _png16(e: Env):
    from PIL import Image

    d = e.data()
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(ramp).save(d / "square" / "deep.png")
    assert Image.open(d / "square" / "deep.png").mode.startswith("I")
    return e.train(d, "--strict")


def _cmyk(e: Env):
    from PIL import Image

    d = e.data()
    Image.new("CMYK", (40, 40), (0, 120, 200, 10)).save(d / "circle" / "print.jpg", "JPEG")
    return e.train(d, "--strict")


UNICODE_CLASSES = ("café au lait", "日本 猫", "Ünïcode ☃")


def _unicode_names(e: Env):
    d = e.data()
    for old, new in zip(sorted(os.listdir(d)), UNICODE_CLASSES):
        os.rename(d / old, d / new)
    return e.train(d, "--strict")


def _unicode_ok(e: Env) -> None:
    labels = (e.tmp / "out" / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == sorted(UNICODE_CLASSES)
    assert json.loads((e.tmp / "out" / "config.json").read_text())["class_names"] == labels


def _class_symlink_loop(e: Env):
    d = e.data()
    os.symlink("..", d / "everything")  # a class folder that leads back above the data folder
    return e.train(d)


def _class_symlink_self(e: Env):
    d = e.data()
    os.symlink("ouroboros", d / "ouroboros")
    return e.train(d)


def _inner_symlink_loop(e: Env, strict: bool):
    d = e.data()
    os.symlink("..", d / "circle" / "up")  # inside a class: would relabel every other class
    return e.train(d, *(["--strict"] if strict else []))


def _empty_class(e: Env):
    d = e.data()
    (d / "empty").mkdir()
    return e.train(d)


def _one_class(e: Env):
    d = e.data()
    for name in ("cross", "square"):
        shutil.rmtree(d / name)
    return e.train(d)


def _flat_folder(e: Env):
    d = e.tmp / "flat"
    d.mkdir()
    _jpeg(d / "a.jpg")
    return e.train(d)


def _file_as_data(e: Env):
    f = _jpeg(e.tmp / "photo.jpg")
    return e.train(f)


def _val_unknown_class(e: Env):
    d, v = e.data(), e.data("val")
    os.rename(v / "square", v / "hexagon")
    return e.train(d, "--val-data", v)


def _newer_run_resume(e: Env):
    run = e.run_copy()
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(cfg, run_format=99)))
    e.watched.append(run)
    return ["edgetl", "train", "--data", e.data(), "--out", run, "--resume"]


def _out_exists(e: Env):
    out = e.tmp / "out"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    return e.train(e.data())


def _out_is_file(e: Env):
    (e.tmp / "out").write_text("not a folder")
    return e.train(e.data())


def _out_under_file(e: Env):
    (e.tmp / "afile").write_text("not a folder")
    return ["edgetl", "train", "--data", e.data(), "--out", e.tmp / "afile" / "run", *TINY_FLAGS]


def _out_read_only(e: Env):
    """A read-only --out parent. Tests run as root (chmod cannot stop root), so the check that
    edgetl makes, os.access, is made to answer as a read-only mount would."""
    parent = e.tmp / "ro"
    parent.mkdir()
    real_access = os.access
    e.monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent
                          else real_access(p, mode, **kw))
    return ["edgetl", "train", "--data", e.data(), "--out", parent / "run", *TINY_FLAGS]


def _overwrite_bad_data(e: Env):
    """--overwrite with data that is refused: the old run must survive."""
    run = e.run_copy("out")
    d = e.data()
    shutil.rmtree(d / "cross")
    shutil.rmtree(d / "square")
    return ["edgetl", "train", "--data", d, "--out", run, "--overwrite", *TINY_FLAGS]


def _base_model_zip(e: Env):
    return e.train(e.data(), "--base-model", _zip_of_text(e.tmp / "photos.keras"))


def _base_model_truncated_h5(e: Env):
    p = e.tmp / "model.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 200)
    return e.train(e.data(), "--base-model", p)


def _savedmodel_no_variables(e: Env):
    from edgetl.keras import keras

    inp = keras.Input((32, 32, 3))
    model = keras.Model(inp, keras.layers.Conv2D(4, 3)(inp))
    sm = e.tmp / "sm"
    model.save(str(sm), save_format="tf")
    shutil.rmtree(sm / "variables")  # half-copied
    return e.train(e.data(), "--base-model", sm)


def _base_model_lambda(e: Env):
    from edgetl.keras import keras

    inp = keras.Input((32, 32, 3))
    y = keras.layers.Lambda(lambda x: x * 2.0, name="doubler")(inp)
    keras.Model(inp, keras.layers.Conv2D(4, 3)(y)).save(e.tmp / "lambda.h5")
    return e.train(e.data(), "--base-model", e.tmp / "lambda.h5")


# --- export --------------------------------------------------------------------------------------

def _export(run, *extra):
    return ["edgetl", "export", run, *extra]


def _newer_run_export(e: Env):
    run = e.run_copy()
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(cfg, run_format=99)))
    shutil.rmtree(run / "export")
    return _export(run)


def _corrupt_config(e: Env):
    run = e.run_copy()
    (run / "config.json").write_text('{"run_format": 1, "train": {')
    return _export(run, "--overwrite")


def _unfinished_run(e: Env):
    run = e.run_copy()
    (run / "model.keras").unlink()
    shutil.rmtree(run / "export")
    return _export(run)


def _half_copied_run(e: Env):
    run = e.run_copy()
    (run / "split.json").unlink()
    shutil.rmtree(run / "export")
    return _export(run)


def _run_model_zip(e: Env):
    run = e.run_copy()
    _zip_of_text(run / "model.keras")
    shutil.rmtree(run / "export")
    return _export(run)


def _calibration_other_size_accepted(e: Env):
    from PIL import Image

    run = e.run_copy()
    shutil.rmtree(run / "export")
    cal = e.tmp / "calib"
    cal.mkdir()
    for i in range(12):  # 96 px photos for a 32 px model: resized like the training images
        Image.fromarray(_noise(96, seed=i)).save(cal / f"{i}.png")
    e.calibrated = run / "export" / "run_int8.tflite"
    return _export(run, "--calibration", cal, "--no-verify")


def _calibration_other_size_ok(e: Env) -> None:
    manifest = json.loads((e.calibrated.parent / "run_calibration.json").read_text())
    assert manifest["count"] == 12 and manifest["input_size"] == 32
    assert manifest["source"].startswith("folder ")
    assert e.calibrated.is_file()


def _manifest_other_size(e: Env):
    m = json.loads((e.run / "export" / "run_calibration.json").read_text())
    (e.tmp / "m.json").write_text(json.dumps(dict(m, input_size=224)))
    return _export(e.run, "--calibration-manifest", e.tmp / "m.json", "--name", "other")


def _calibration_few(e: Env):
    cal = e.tmp / "calib"
    cal.mkdir()
    for i in range(3):
        _jpeg(cal / f"{i}.jpg")
    return _export(e.run, "--calibration", cal, "--name", "few")


def _calibration_wrong_classes(e: Env):
    cal = e.data("calib")
    os.rename(cal / "circle", cal / "hexagon")
    return _export(e.run, "--calibration", cal, "--name", "wrong")


def _export_exists(e: Env):
    return _export(e.run)


def _export_dir_is_file(e: Env):
    run = e.run_copy()
    shutil.rmtree(run / "export")
    (run / "export").write_text("not a folder")
    return _export(run)


def _run_missing(e: Env):
    return _export(e.tmp / "no-such-run")


# --- inspect / bench / runner / bundle / data ----------------------------------------------------

def _corrupt_flatbuffer(e: Env) -> Path:
    data = bytearray(e.int8.read_bytes())
    assert data[4:8] == b"TFL3"
    data[0:4] = struct.pack("<I", len(data) + 4096)  # root table past the end
    for i in range(16, min(len(data), 4096), 7):
        data[i] = 0xFF
    p = e.tmp / "corrupt.tflite"
    p.write_bytes(bytes(data))
    return p


def _truncated_tflite(e: Env) -> Path:
    data = e.int8.read_bytes()
    p = e.tmp / "half.tflite"
    p.write_bytes(data[: int(len(data) * 0.6)])
    return p


def _zip_as_tflite(e: Env) -> Path:
    return _zip_of_text(e.tmp / "model.tflite")


def _h5_as_tflite(e: Env) -> Path:
    p = e.tmp / "model.tflite"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    return p


def _empty_tflite(e: Env) -> Path:
    p = e.tmp / "empty.tflite"
    p.write_bytes(b"")
    return p


def _metadata_damaged(e: Env) -> Path:
    data = bytearray(e.int8.read_bytes())
    i = bytes(data).rindex(b'"labels"')
    data[i + 2] ^= 0x55  # the member's CRC no longer matches
    p = e.tmp / "damaged_meta.tflite"
    p.write_bytes(bytes(data))
    return p


def _metadata_newer(e: Env) -> Path:
    from edgetl import runner

    meta = runner.read_metadata(e.int8)
    raw = runner.attach_metadata(e.int8.read_bytes(), dict(meta, format_version=9),
                                 meta["labels"])
    p = e.tmp / "future.tflite"
    p.write_bytes(raw)
    return p


def _labels_wrong_count(e: Env):
    (e.tmp / "labels.txt").write_text("cat\ndog\nbird\nfish\nhorse\n")
    return ["runner", e.int8, "--labels", e.tmp / "labels.txt", "--runs", "1", "--warmup", "0"]


def _runner_data_unknown_class(e: Env):
    d = e.data()
    os.rename(d / "cross", d / "hexagon")
    return ["runner", e.int8, "--data", d, "--runs", "1", "--warmup", "0"]


def _bundle_exists(e: Env):
    (e.tmp / "pi").mkdir()
    (e.tmp / "pi" / "keep.txt").write_text("mine")
    return ["edgetl", "bundle", e.int8, "--out", e.tmp / "pi"]


def _idx_truncated(e: Env):
    (e.tmp / "images.idx").write_bytes(b"\0\0\x08\x03" + struct.pack(">III", 100, 28, 28)
                                       + b"\0" * 500)
    (e.tmp / "labels.idx").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 100) + b"\0" * 100)
    return ["edgetl", "data", "idx", e.tmp / "images.idx", e.tmp / "labels.idx", e.tmp / "out"]


def _synth_nonempty(e: Env):
    (e.tmp / "photos").mkdir()
    (e.tmp / "photos" / "mine.jpg").write_bytes(b"precious")
    return ["edgetl", "data", "synth", e.tmp / "photos"]


CASES = [
    # train: the image folder (refused, or skipped and listed, or accepted by design)
    Case("truncated-jpeg-strict", lambda e: e.train(_truncated_jpeg(e), "--strict"), 2,
         r"--strict: 1 unreadable file\(s\), first '.*cut\.jpg': cannot read image .*truncated"),
    Case("truncated-jpeg-skipped", lambda e: e.train(_truncated_jpeg(e)), 0,
         accepted=lambda e: _skipped(e, "cut.jpg", "truncated")),
    Case("zero-byte-image-strict",
         lambda e: e.train(_touch(e.data() / "circle" / "empty.jpg"), "--strict"), 2,
         r"--strict: .*empty\.jpg': cannot read image .*the file is empty \(0 bytes\)"),
    Case("text-named-jpg-strict",
         lambda e: e.train(_text(e.data() / "cross" / "notes.jpg"), "--strict"), 2,
         r"notes\.jpg': cannot read image .*not an image Pillow can decode"),
    Case("decompression-bomb-20000px-strict",
         lambda e: e.train(_bomb(e), "--strict"), 2,
         r"bomb\.png is too large to decode safely \(over 89478485 pixels\): resize it first"),
    Case("png-with-jpg-extension-accepted", _png_as_jpg, 0,
         accepted=lambda e: _used(e, "really_a_png.jpg")),
    Case("png-16bit-accepted", _png16, 0, accepted=lambda e: _used(e, "deep.png")),
    Case("cmyk-jpeg-accepted", _cmyk, 0, accepted=lambda e: _used(e, "print.jpg")),
    Case("unicode-and-spaces-in-class-names-accepted", _unicode_names, 0,
         accepted=_unicode_ok),
    Case("class-folder-symlink-loop", _class_symlink_loop, 2,
         r"class folder '.*everything' is a symlink loop: it points back to .*remove it"),
    Case("class-folder-symlink-to-itself", _class_symlink_self, 2,
         r"class folder '.*ouroboros' is a broken symlink or a symlink loop"),
    Case("symlink-loop-inside-class-strict", lambda e: _inner_symlink_loop(e, True), 2,
         r"--strict: 1 unreadable file\(s\), first '.*circle/up': symlink loop to a parent"),
    Case("symlink-loop-inside-class-skipped", lambda e: _inner_symlink_loop(e, False), 0,
         accepted=lambda e: (_skipped(e, "circle/up", "symlink loop"),
                             _only_own_images(e))),
    Case("empty-class-folder", _empty_class, 2,
         r"class folder '.*empty' has no readable images: add images or remove the folder"),
    Case("single-class", _one_class, 2, r"has 1 class folder\(s\) \(circle\); a classifier "
                                        r"needs at least 2"),
    Case("no-class-folders", _flat_folder, 2, r"has no class sub-folders: put each class's"),
    Case("data-is-a-file", _file_as_data, 2, r"data folder '.*photo\.jpg' is not a folder"),
    Case("data-missing", lambda e: e.train(e.tmp / "nope"), 2,
         r"data folder '.*nope' does not exist"),
    Case("val-data-with-unknown-class", _val_unknown_class, 2,
         r"has classes the model does not know: hexagon"),
    # train: flags and the run directory
    Case("conflict-resume-overwrite",
         lambda e: e.train(e.data(), "--resume", "--overwrite"), 2,
         r"--resume and --overwrite contradict each other: pick one"),
    Case("conflict-val-data-val-split",
         lambda e: e.train(e.data(), "--val-data", e.data("v"), "--val-split", "0.3"), 2,
         r"--val-data and --val-split contradict each other"),
    Case("conflict-unfreeze-feature-extract",
         lambda e: e.train(e.data(), "--strategy", "feature-extract", "--unfreeze", "5"), 2,
         r"--unfreeze/--unfreeze-from need --strategy fine-tune or two-phase"),
    Case("resume-without-out",
         lambda e: ["edgetl", "train", "--data", e.data(), "--resume"], 2,
         r"--resume needs --out RUN"),
    Case("unknown-backbone", lambda e: e.train(e.data(), "--backbone", "mobilenetv9"), 2,
         r"mobilenetv9"),
    Case("bad-head-spec", lambda e: e.train(e.data(), "--head", "dense:big"), 2,
         r"--head item 'dense:big': use conv:FILTERS"),
    Case("input-size-too-small", lambda e: e.train(e.data(), "--input-size", "8"), 2,
         r"--input-size 8 is too small \(minimum 16\)"),
    Case("run-from-newer-edgetl-resume", _newer_run_resume, 2,
         r"was written by a newer edgetl \(run format 99\); upgrade edgetl"),
    Case("out-exists-not-a-run", _out_exists, 2,
         r"run directory '.*out' already exists: pass --overwrite"),
    Case("out-is-a-file", _out_is_file, 2, r"--out '.*out' is a file, not a folder"),
    Case("out-under-a-file", _out_under_file, 2,
         r"cannot create --out '.*afile/run': '.*afile' is a file"),
    Case("out-read-only", _out_read_only, 2,
         r"cannot write --out '.*ro/run': '.*ro' is not writable \(read-only"),
    Case("overwrite-with-refused-data-keeps-old-run", _overwrite_bad_data, 2,
         r"a classifier needs at least 2"),
    Case("base-model-zip-of-something-else", _base_model_zip, 2,
         r"photos\.keras' is a zip archive without config\.json, not a Keras model"),
    Case("base-model-truncated-h5", _base_model_truncated_h5, 2,
         r"model\.h5' is not a readable HDF5 file \(corrupt or truncated\?\)"),
    Case("base-model-savedmodel-without-variables", _savedmodel_no_variables, 2,
         r"sm': the SavedModel has no variables/ directory"),
    Case("base-model-lambda-without-unsafe", _base_model_lambda, 2,
         r"has a Lambda layer 'doubler': loading it would run code .*--unsafe"),
    # export
    Case("export-run-missing", _run_missing, 2, r"'.*no-such-run' is not an edgetl run"),
    Case("export-run-from-newer-edgetl", _newer_run_export, 2,
         r"was written by a newer edgetl \(run format 99\); upgrade edgetl"),
    Case("export-corrupt-config-json", _corrupt_config, 2, r"config\.json' is corrupt"),
    Case("export-unfinished-run", _unfinished_run, 2,
         r"has no model\.keras: the run did not finish; continue it"),
    Case("export-half-copied-run", _half_copied_run, 2,
         r"has no split\.json \(a run copied in part\?\): copy the whole run directory"),
    Case("export-model-keras-is-zip-of-something-else", _run_model_zip, 2,
         r"cannot load model '.*model\.keras': it is a zip archive without config\.json"),
    Case("export-calibration-folder-other-image-size-accepted",
         _calibration_other_size_accepted, 0, accepted=_calibration_other_size_ok),
    Case("export-calibration-manifest-other-input-size", _manifest_other_size, 2,
         r"was made for input 224 px .* but this run uses 32 px"),
    Case("export-calibration-too-few-images", _calibration_few, 2,
         r"has only 3 readable image\(s\); at least 10 are needed"),
    Case("export-calibration-unknown-classes", _calibration_wrong_classes, 2,
         r"has classes the model does not know: hexagon"),
    Case("export-conflict-calibration-and-manifest",
         lambda e: _export(e.run, "--calibration", e.tmp, "--calibration-manifest",
                           e.tmp / "m.json", "--name", "x"), 2,
         r"--calibration and --calibration-manifest contradict each other"),
    Case("export-conflict-edgetpu-float16",
         lambda e: _export(e.run, "--float16", "--edgetpu", "--name", "x"), 2,
         r"--edgetpu needs --int8 alone"),
    Case("export-conflict-keep-float-without-int8",
         lambda e: _export(e.run, "--float32", "--keep-float", "MEAN", "--name", "x"), 2,
         r"--keep-float applies to --int8 only"),
    Case("export-exists-without-overwrite", _export_exists, 2,
         r"run_int8\.tflite' already exists: pass --overwrite"),
    Case("export-folder-is-a-file", _export_dir_is_file, 2,
         r"export folder '.*export' is a file, not a folder"),
    # inspect: broken model files
    Case("inspect-tfl3-but-corrupt-flatbuffer",
         lambda e: ["edgetl", "inspect", _corrupt_flatbuffer(e)], 2,
         r"corrupt\.tflite is truncated or corrupt \(root offset|corrupt\.tflite is truncated"),
    Case("inspect-truncated-tflite", lambda e: ["edgetl", "inspect", _truncated_tflite(e)], 2,
         r"half\.tflite is truncated or corrupt .*re-export or re-copy"),
    Case("inspect-zip-named-tflite", lambda e: ["edgetl", "inspect", _zip_as_tflite(e)], 2,
         r"is not a TFLite model \(no TFL3 identifier\) \(it is a zip archive\)"),
    Case("inspect-h5-named-tflite", lambda e: ["edgetl", "inspect", _h5_as_tflite(e)], 2,
         r"\(it is a Keras \.h5 file: export it to \.tflite first\)"),
    Case("inspect-zero-byte-tflite", lambda e: ["edgetl", "inspect", _empty_tflite(e)], 2,
         r"empty\.tflite is too small to be a TFLite model \(0 bytes\)"),
    Case("inspect-missing", lambda e: ["edgetl", "inspect", e.tmp / "gone.tflite"], 2,
         r"model file not found: .*gone\.tflite"),
    # bench
    Case("bench-truncated-tflite", lambda e: ["edgetl", "bench", _truncated_tflite(e)], 2,
         r"half\.tflite is truncated or corrupt"),
    Case("bench-same-model-twice", lambda e: ["edgetl", "bench", e.int8, e.int8], 2,
         r"the same model is listed twice"),
    Case("bench-runs-zero", lambda e: ["edgetl", "bench", e.int8, "--runs", "0"], 2,
         r"runs must be at least 1, got 0"),
    Case("bench-data-missing",
         lambda e: ["edgetl", "bench", e.int8, "--data", e.tmp / "nope"], 2,
         r"data folder not found: .*nope"),
    # the device runner
    Case("runner-tfl3-but-corrupt-flatbuffer", lambda e: ["runner", _corrupt_flatbuffer(e)], 2,
         r"corrupt\.tflite is truncated or corrupt"),
    Case("runner-truncated-tflite", lambda e: ["runner", _truncated_tflite(e)], 2,
         r"half\.tflite is truncated or corrupt"),
    Case("runner-labels-file-wrong-count", _labels_wrong_count, 2,
         r"labels file .*labels\.txt has 5 labels but the model has 3 outputs"),
    Case("runner-data-class-not-a-label", _runner_data_unknown_class, 2,
         r"has sub-folders that match no label: 'hexagon'"),
    Case("runner-damaged-metadata", lambda e: ["runner", _metadata_damaged(e)], 2,
         r"damaged_meta\.tflite has a corrupt metadata archive appended"),
    Case("runner-metadata-from-newer-edgetl", lambda e: ["runner", _metadata_newer(e)], 2,
         r"metadata format_version 9 is newer than this runner understands"),
    Case("runner-conflict-raw-and-mean",
         lambda e: ["runner", e.int8, "--raw", "--mean", "127", "--runs", "1"], 2,
         r"--raw feeds pixels unchanged: leave out --mean/--std"),
    Case("runner-json-into-missing-folder",
         lambda e: ["runner", e.int8, "--json", e.tmp / "nope" / "r.json"], 2,
         r"cannot write --json .*: folder .*nope does not exist"),
    Case("runner-image-missing",
         lambda e: ["runner", e.int8, "--image", e.tmp / "gone.jpg"], 2,
         r"image not found: .*gone\.jpg"),
    Case("predict-not-an-image",
         lambda e: ["edgetl", "predict", e.int8, _shopping_list(e.tmp / "notes.jpg")], 2,
         r"notes\.jpg"),
    # bundle and the dataset helpers
    Case("bundle-out-exists", _bundle_exists, 2, r"pi already exists; pass --overwrite"),
    Case("bundle-not-a-tflite",
         lambda e: ["edgetl", "bundle", _zip_as_tflite(e), "--out", e.tmp / "pi"], 2,
         r"no TFL3 identifier"),
    Case("data-idx-truncated", _idx_truncated, 2,
         r"images\.idx' is truncated: header says \(100, 28, 28\)"),
    Case("data-synth-into-non-empty-folder", _synth_nonempty, 2,
         r"photos' exists and is not empty"),
    # device runner, predict, bench, bundle: hostile names and files (issues 11, 12)
    Case("runner-model-is-fifo", lambda e: ["runner", _fifo(e.tmp / "pipe.tflite")], 2,
         r"pipe\.tflite is a named pipe \(FIFO\), not a regular file"),
    Case("runner-json-is-folder",
         lambda e: ["runner", e.int8, "--runs", "1", "--json", e.tmp], 2,
         r"cannot write --json .*: it is a folder"),
    Case("bundle-name-control-chars",
         lambda e: ["edgetl", "bundle", _copy_as(e.int8, e.tmp / "a\nb.tflite"), "--out",
                    e.tmp / "pi"], 2, r"'a\\nb\.tflite' contains control characters"),
    Case("runner-metadata-many-members", lambda e: ["runner", _many_members(e)], 2,
         r"80 members, more than the 64"),
    Case("bench-folders-match-no-label",
         lambda e: ["edgetl", "bench", e.int8, "--data", _digit_folders(e), "--runs", "1"], 2,
         r"none of the sub-folders of .* \('0', '1'\) matches a label"),
    # export: every numeric flag checked before work (issue 11), --edgetpu-allow-cpu alone
    Case("export-max-drop-nan", lambda e: _export(e.run, "--max-drop", "nan", "--name", "x"), 2,
         r"--max-drop nan must be a finite number >= 0"),
    Case("export-max-drop-inf", lambda e: _export(e.run, "--max-drop", "inf", "--name", "x"), 2,
         r"--max-drop inf must be a finite number >= 0"),
    Case("export-max-drop-negative",
         lambda e: _export(e.run, "--max-drop", "-1", "--name", "x"), 2,
         r"--max-drop -1\.0 must be a finite number >= 0"),
    Case("export-num-calibration-too-many",
         lambda e: _export(e.run, "--num-calibration", "100000000", "--name", "x"), 2,
         r"--num-calibration 100000000 must be at least 1 and at most 10000"),
    Case("export-seed-negative", lambda e: _export(e.run, "--seed", "-1", "--name", "x"), 2,
         r"--seed -1 must be an integer from 0 to 4294967295"),
    Case("export-seed-too-large", lambda e: _export(e.run, "--seed", str(2**32), "--name", "x"),
         2, r"--seed 4294967296 must be an integer from 0 to 4294967295"),
    Case("export-name-with-slash", lambda e: _export(e.run, "--name", "../elsewhere"), 2,
         r"--name '\.\./elsewhere' must be a plain file name"),
    Case("export-edgetpu-allow-cpu-without-edgetpu",
         lambda e: _export(e.run, "--edgetpu-allow-cpu", "--name", "x"), 2,
         r"--edgetpu-allow-cpu needs --edgetpu"),
    Case("train-unfreeze-from-unknown-layer",
         lambda e: e.train(e.data(), "--strategy", "fine-tune", "--unfreeze-from",
                           "block_16_expnd"), 2,
         r"--unfreeze-from 'block_16_expnd' is not a layer of mobilenetv2; did you mean "
         r"'block_16_expand'.*edgetl backbones mobilenetv2 --layers"),
    Case("backbones-layers-without-a-model", lambda e: ["edgetl", "backbones", "--layers"], 2,
         r"--layers lists one model: give a backbone name"),
]


# --- session 5 hunt: hidden variants of the known kinds ---------------------------------------

def _inventory(e: Env) -> Path:
    inv = e.tmp / "fleet.toml"
    inv.write_text('[hosts.pi1]\nhost = "127.0.0.9"\n')
    return inv


def _run_with(e: Env, name: str, text: str | None) -> Path:
    """A copy of the run whose file ``name`` holds ``text`` (None: a FIFO)."""
    run = e.run_copy()
    (run / name).unlink()
    if text is None:
        os.mkfifo(run / name)
    else:
        (run / name).write_text(text)
    e.watched.append(run)
    return run


def _tampered_config(e: Env, change) -> Path:
    run = e.run_copy()
    cfg = json.loads((run / "config.json").read_text())
    change(cfg)
    (run / "config.json").write_text(json.dumps(cfg))
    e.watched.append(run)
    return run


def _resume_same_data(e: Env, run: Path) -> list:
    data = json.loads((run / "config.json").read_text())["train"]["data"]
    return ["edgetl", "train", "--data", data, "--out", run, "--resume"]


def _model_copy(e: Env) -> Path:
    return _copy_as(e.int8, e.tmp / "m.tflite")


def _image(e: Env) -> Path:
    return _jpeg(e.tmp / "photo.jpg")


HUNT5 = [
    Case("train-head-conv-inf", lambda e: e.train(e.data(), "--head", "conv:inf"), 2,
         r"--head item 'conv:inf': conv needs a whole number from 1 to 65536"),
    Case("train-head-dense-nan", lambda e: e.train(e.data(), "--head", "dense:nan"), 2,
         r"--head item 'dense:nan': dense needs a whole number from 1 to 65536"),
    Case("train-head-dense-huge", lambda e: e.train(e.data(), "--head", "dense:1e9"), 2,
         r"--head item 'dense:1e9': dense needs a whole number from 1 to 65536"),
    Case("train-lr-huge", lambda e: e.train(e.data(), "--lr", "1e30"), 2,
         r"--lr 1e\+30 must be a number > 0 and <= 10"),
    Case("train-fine-tune-lr-huge", lambda e: e.train(e.data(), "--fine-tune-lr", "1e9"), 2,
         r"--fine-tune-lr 1000000000\.0 must be a number > 0 and <= 1000000\.0"),
    Case("train-mean-negative", lambda e: e.train(e.data(), "--mean", "-1"), 2,
         r"--mean -1\.0: the values apply to pixels 0\.\.255"),
    Case("train-std-huge", lambda e: e.train(e.data(), "--std", "1e30"), 2,
         r"--std 1e\+30: the values apply to pixels 0\.\.255"),
    Case("train-patience-huge",
         lambda e: e.train(e.data(), "--patience", "99999999999999999999"), 2,
         r"--patience 99999999999999999999 must be at most 100000"),
    Case("bench-runs-huge",
         lambda e: ["edgetl", "bench", e.int8, "--runs", "99999999999999999999"], 2,
         r"--runs 99999999999999999999 is too many: give at most 1000000"),
    Case("bench-warmup-huge",
         lambda e: ["edgetl", "bench", e.int8, "--warmup", "99999999999999999999"], 2,
         r"--warmup 99999999999999999999 is too many"),
    Case("bench-threads-huge",
         lambda e: ["edgetl", "bench", e.int8, "--threads", "99999999999999999999"], 2,
         r"--threads 99999999999999999999 is too many: give at most 1024"),
    Case("bench-std-negative", lambda e: ["edgetl", "bench", e.int8, "--std", "-1"], 2,
         r"--std '-1': the values apply to pixels 0\.\.255"),
    Case("runner-warmup-huge", lambda e: ["runner", e.int8, "--warmup", "10000000"], 2,
         r"--warmup 10000000 is too many: give at most 1000000"),
    Case("runner-batch-size-huge", lambda e: ["runner", e.int8, "--batch-size", "100000"], 2,
         r"--batch-size 100000 is too many: give at most 4096"),
    Case("runner-threads-huge", lambda e: ["runner", e.int8, "--threads", "2147483648"], 2,
         r"--threads 2147483648 is too many"),
    Case("runner-mean-out-of-range", lambda e: ["runner", e.int8, "--mean", "1e30"], 2,
         r"--mean 1e\+30: the values apply to pixels 0\.\.255"),
    Case("sensitivity-seed-negative", lambda e: ["edgetl", "sensitivity", e.run, "--seed", "-1"],
         2, r"--seed -1 must be an integer from 0 to 4294967295"),
    Case("sensitivity-num-images-huge",
         lambda e: ["edgetl", "sensitivity", e.run, "--num-images", "99999999999999999999"], 2,
         r"--num-images 99999999999999999999 must be at most 10000"),
    Case("fleet-timeout-huge",
         lambda e: ["edgetl", "fleet", "check", "--hosts", _inventory(e), "--timeout", "1e30"],
         2, r"--timeout 1e\+30 is too long: give at most 604800 s"),
    Case("fleet-jobs-huge",
         lambda e: ["edgetl", "fleet", "check", "--hosts", _inventory(e), "--jobs",
                    "99999999999999999999"], 2, r"--jobs 99999999999999999999 is too many"),
    Case("export-split-not-a-list",
         lambda e: _export(_run_with(e, "split.json", '{"train": 5, "val": "x"}'), "--name",
                           "x"), 2, r"split\.json' field 'train' is not a list"),
    Case("export-split-class-index-out-of-range",
         lambda e: _export(_run_with(e, "split.json", '{"train": [["a.png", 7]], "val": []}'),
                           "--name", "x"), 2,
         r"split\.json' field 'train\[0\]' is \['a\.png', 7\], not \[path, class index 0\.\.2\]"),
    Case("export-split-is-fifo",
         lambda e: _export(_run_with(e, "split.json", None), "--name", "x"), 2,
         r"split\.json' is not a regular file"),
    Case("sensitivity-split-is-fifo",
         lambda e: ["edgetl", "sensitivity", _run_with(e, "split.json", None)], 2,
         r"split\.json' is not a regular file"),
    Case("resume-history-is-fifo",
         lambda e: _resume_same_data(e, _run_with(e, "history.csv", None)), 2,
         r"history\.csv' is not a regular file: the run is damaged"),
    Case("bench-json-is-the-model",
         lambda e: ["edgetl", "bench", _model_copy(e), "--runs", "1", "--json",
                    e.tmp / "m.tflite"], 2,
         r"cannot write --json .*m\.tflite: it is an input of this command"),
    Case("bench-json-and-markdown-same-file",
         lambda e: ["edgetl", "bench", e.int8, "--runs", "1", "--json", e.tmp / "r",
                    "--markdown", e.tmp / "r"], 2,
         r"--json and --markdown name the same file"),
    Case("bench-plots-onto-a-file",
         lambda e: ["edgetl", "bench", e.int8, "--runs", "1", "--plots",
                    _jpeg(e.tmp / "p.jpg")], 2, r"cannot write --plots .*p\.jpg: it is a file"),
    Case("bench-json-inside-data",
         lambda e: ["edgetl", "bench", e.int8, "--runs", "1", "--data", e.data(), "--json",
                    e.tmp / "data" / "circle" / "r.json"], 2,
         r"cannot write --json .*r\.json: it is inside the --data folder"),
    Case("predict-json-is-the-image",
         lambda e: ["edgetl", "predict", e.int8, _image(e), "--json", e.tmp / "photo.jpg"], 2,
         r"cannot write --json .*photo\.jpg: it is an input of this command"),
    Case("runner-json-is-the-model",
         lambda e: ["runner", _model_copy(e), "--runs", "1", "--json", e.tmp / "m.tflite"], 2,
         r"cannot write --json .*m\.tflite: it is an input of this command"),
    Case("runner-json-inside-data",
         lambda e: ["runner", e.int8, "--runs", "1", "--data", e.data(), "--json",
                    e.tmp / "data" / "r.json"], 2,
         r"cannot write --json .*r\.json: it is inside the --data folder"),
    Case("sensitivity-json-is-a-run-file",
         lambda e: ["edgetl", "sensitivity", e.run, "--json", e.run / "config.json"], 2,
         r"cannot write --json .*config\.json: it is an input of this command"),
    Case("export-config-mean-huge",
         lambda e: _export(_tampered_config(e, lambda c: c["preprocessing"].update(
             mean=[1e30] * 3)), "--name", "x"), 2,
         r"config\.json' field 'preprocessing' mean \[1e\+30.*is not a normalisation of pixels"),
    Case("export-config-class-name-escape",
         lambda e: _export(_tampered_config(e, lambda c: c.update(
             class_names=["a\x1b]0;X\x07", "b", "c"])), "--name", "x"), 2,
         r"config\.json' field 'class_names' has control characters in 'a\\x1b\]0;X\\x07'"),
    Case("fleet-json-is-the-inventory",
         lambda e: ["edgetl", "fleet", "check", "--hosts", _inventory(e), "--json",
                    e.tmp / "fleet.toml"], 2,
         r"cannot write --json .*fleet\.toml: it is an input of this command"),
]
CASES += HUNT5


# --- session 6 hunt ------------------------------------------------------------------------------

def _manifest(e: Env, change) -> Path:
    """A copy of the run's calibration manifest, changed by ``change(m)``."""
    out = e.tmp / "m.json"
    m = json.loads((e.run / "export" / "run_calibration.json").read_text())
    change(m)
    out.write_text(json.dumps(m))
    return out


def _broken_link(p: Path) -> Path:
    p.symlink_to(p.with_name("nowhere"))
    return p


def _run_with_export(e: Env, make) -> Path:
    """A copy of the run whose export/ folder is made by ``make(path)``."""
    run = e.run_copy()
    shutil.rmtree(run / "export")
    make(run / "export")
    e.watched.append(run)
    return run


def _idx_pair(e: Env, folder: Path | None = None) -> tuple[Path, Path]:
    folder = folder or e.tmp
    folder.mkdir(exist_ok=True)
    (folder / "images.idx").write_bytes(b"\0\0\x08\x03" + struct.pack(">III", 4, 28, 28)
                                        + b"\0" * (4 * 28 * 28))
    (folder / "labels.idx").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 4)
                                        + bytes([0, 1, 0, 1]))
    return folder / "images.idx", folder / "labels.idx"


def _idx_names(e: Env, text: str) -> list:
    images, labels = _idx_pair(e)
    (e.tmp / "names.txt").write_text(text)
    return ["edgetl", "data", "idx", images, labels, e.tmp / "out", "--names",
            e.tmp / "names.txt"]


def _models_folder(e: Env) -> Path:
    models = e.tmp / "models"
    models.mkdir()
    (models / "other.tflite").write_bytes(b"precious")
    return _copy_as(e.int8, models / "m.tflite")


HUNT6 = [
    Case("export-manifest-images-not-entries",
         lambda e: _export(e.run, "--int8", "--name", "x", "--calibration-manifest",
                           _manifest(e, lambda m: m.update(images=[5]))), 2,
         r"--calibration-manifest '.*m\.json' is not an edgetl calibration manifest"),
    Case("export-manifest-entry-without-sha256",
         lambda e: _export(e.run, "--int8", "--name", "x", "--calibration-manifest",
                           _manifest(e, lambda m: m["images"][0].pop("sha256"))), 2,
         r"--calibration-manifest '.*m\.json' is not an edgetl calibration manifest"),
    Case("export-manifest-no-images",
         lambda e: _export(e.run, "--int8", "--name", "x", "--calibration-manifest",
                           _manifest(e, lambda m: m.update(images=[]))), 2,
         r"--calibration-manifest '.*m\.json' lists no images"),
    Case("export-overwrite-onto-a-folder",
         lambda e: _export(_run_with_export(e, lambda p: (p / "run_float32.tflite" / "keep")
                                            .mkdir(parents=True)),
                           "--float32", "--no-verify", "--overwrite"), 2,
         r"'.*export/run_float32\.tflite' is a folder, not an earlier export: move it away"),
    Case("export-folder-broken-symlink",
         lambda e: _export(_run_with_export(e, _broken_link), "--float32", "--no-verify"), 2,
         r"export folder '.*export' is a broken symlink or a symlink loop"),
    Case("train-out-broken-symlink",
         lambda e: _out_replaced(e.train(e.data()), _broken_link(e.tmp / "out2")), 2,
         r"--out '.*out2' is a broken symlink or a symlink loop"),
    Case("bundle-out-holds-the-model",
         lambda e: ["edgetl", "bundle", _models_folder(e), "--out", e.tmp / "models",
                    "--overwrite"], 2,
         r"--out .*models contains the model .*m\.tflite: replacing it would delete the input"),
    Case("bundle-out-is-the-model",
         lambda e: ["edgetl", "bundle", _model_copy(e), "--out", e.tmp / "m.tflite",
                    "--overwrite"], 2, r"--out .*m\.tflite is the model"),
    Case("bundle-out-broken-symlink",
         lambda e: ["edgetl", "bundle", e.int8, "--out", _broken_link(e.tmp / "pi")], 2,
         r"--out .*pi is a broken symlink or a symlink loop"),
    Case("data-idx-names-dotdot", lambda e: _idx_names(e, "shirt\n..\n"), 2,
         r"--names '.*names\.txt': class name '\.\.' cannot be a folder name"),
    Case("data-idx-names-control", lambda e: _idx_names(e, "shirt\n\x1b[2Jcoat\n"), 2,
         r"class name '\\x1b\[2Jcoat' cannot be a folder name"),
    Case("data-idx-names-repeated", lambda e: _idx_names(e, "shirt\nshirt\n"), 2,
         r"class name 'shirt' is given twice"),
    Case("data-idx-out-holds-the-inputs",
         lambda e: ["edgetl", "data", "idx", *_idx_pair(e, e.tmp / "mnist"), e.tmp / "mnist",
                    "--overwrite"], 2,
         r"OUT '.*mnist' holds the IMAGES file '.*images\.idx': choose another OUT folder"),
    Case("data-idx-header-huge",
         lambda e: ["edgetl", "data", "idx", _copy_bytes(e.tmp / "big.idx", b"\0\0\x08\x03"
                    + struct.pack(">III", 4000000000, 28, 28)), _idx_pair(e)[1],
                    e.tmp / "out"], 2,
         r"'.*big\.idx' header says \(4000000000, 28, 28\): .* more than the 1024 MB"),
    Case("train-overwrite-base-model-inside-out",
         lambda e: _out_replaced(e.train(e.data(), "--base-model", e.run_copy("out") /
                                         "model.keras", "--overwrite"), e.tmp / "out"), 2,
         r"--base-model '.*out/model\.keras' is inside --out '.*out', which this run replaces"),
    Case("train-overwrite-weights-inside-out",
         lambda e: e.train(e.data(), "--overwrite") + ["--weights",
                                                        e.run_copy("out") / "model.keras"], 2,
         r"--weights '.*out/model\.keras' is inside --out '.*out', which this run replaces"),
    Case("runner-json-is-a-fifo",
         lambda e: ["runner", e.int8, "--runs", "1", "--json", _fifo(e.tmp / "r.json")], 2,
         r"cannot write --json .*r\.json: it is a named pipe \(FIFO\), not a regular file"),
    Case("bench-markdown-is-a-fifo",
         lambda e: ["edgetl", "bench", e.int8, "--runs", "1", "--markdown",
                    _fifo(e.tmp / "r.md")], 2,
         r"cannot write --markdown .*r\.md: it is a named pipe \(FIFO\)"),
    Case("predict-json-is-proc-link",
         lambda e: ["edgetl", "predict", e.int8, _image(e), "--json",
                    _symlink(e.tmp / "out", "/proc/self/fd/1")], 2,
         r"cannot write --json .*out: it is a link to an open file of a process"),
    Case("bundle-out-is-a-fifo",
         lambda e: ["edgetl", "bundle", e.int8, "--out", _fifo(e.tmp / "pi"), "--overwrite"], 2,
         r"--out .*pi is not a regular file or folder \(a device, a pipe or a socket\)"),
    Case("train-class-names-nfc-and-nfd", lambda e: e.train(_nfc_nfd_classes(e)), 2,
         r"class folders .* are the same name written with different Unicode characters "
         r"\(NFC and NFD forms\)"),
    Case("sensitivity-model-is-fifo",
         lambda e: ["edgetl", "sensitivity", _run_with(e, "model.keras", None)], 2,
         r"cannot load model '.*model\.keras': it is not a regular file: a FIFO"),
]
CASES += HUNT6


def _nfc_nfd_classes(e: Env) -> Path:
    """Class folders 'café' typed on a Mac (NFD) and elsewhere (NFC), beside the others."""
    import unicodedata

    d = e.data()
    for form in ("NFC", "NFD"):
        shutil.copytree(d / "circle", d / unicodedata.normalize(form, "café"))
    return d


def _symlink(p: Path, target: str) -> Path:
    p.symlink_to(target)
    return p


def _out_replaced(argv: list, out: Path) -> list:
    argv[argv.index("--out") + 1] = out
    return argv


def _copy_bytes(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _copy_as(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _many_members(e) -> Path:
    out = _copy_as(e.int8, e.tmp / "many.tflite")
    with zipfile.ZipFile(out, "a") as z:  # appended members: 2 of edgetl's + 78 more
        for k in range(78):
            z.writestr(f"pad{k:03d}.txt", "x")
    return out


def _digit_folders(e) -> Path:
    data = e.data()
    for k, d in enumerate(sorted(p for p in data.iterdir() if p.is_dir())[:2]):
        d.rename(data / str(k))
    for d in data.iterdir():
        if not d.name.isdigit():
            shutil.rmtree(d)
    return data


def _touch(p: Path) -> Path:
    p.write_bytes(b"")
    return p.parents[1]


def _text(p: Path) -> Path:
    p.write_text("shopping list: milk, eggs")
    return p.parents[1]


def _shopping_list(p: Path) -> Path:
    p.write_text("shopping list: milk, eggs")
    return p


def _bomb(e: Env) -> Path:
    d = e.data()
    _bomb_png(d / "square" / "bomb.png")
    return d


def _only_own_images(e: Env) -> None:
    split = _split(e)
    for path, label in split["train"] + split["val"]:
        assert Path(path).parent.name == ["circle", "cross", "square"][label], path


# --- running a row -------------------------------------------------------------------------------

def _snapshot(folders) -> dict:
    """Every file and folder under the watched folders: kind, size, mtime, symlink target."""
    snap = {}
    for top in folders:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = os.lstat(p)
                snap[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                os.readlink(p) if p.is_symlink() else None)
    return snap


def _invoke(argv: list) -> tuple[int, str, str, BaseException | None]:
    """(exit code, stdout, stderr, unexpected exception) of one command, in process."""
    args = [str(a) for a in argv[1:]]
    if argv[0] == "runner":
        from edgetl import runner

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = runner.main(args)
        return code, out.getvalue(), err.getvalue(), None
    from edgetl.cli import app

    result = cli.invoke(app, args)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stdout, result.stderr, exc


def _error_line(stdout: str, stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stdout + stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _dump(case: Case, line: str) -> None:
    """EDGETL_CATALOGUE_DUMP=FILE collects the real messages (docs/errors.md is made from them)."""
    if os.environ.get("EDGETL_CATALOGUE_DUMP"):
        with open(os.environ["EDGETL_CATALOGUE_DUMP"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": case.id, "code": case.code, "line": line},
                               ensure_ascii=False) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case: Case, request, tmp_path, monkeypatch):
    env = Env(request, tmp_path, monkeypatch)
    argv = case.setup(env)
    before = _snapshot(env.watched)
    code, out, err, exc = _invoke(argv)
    assert exc is None, f"unexpected {type(exc).__name__}: {exc}"
    assert code == case.code, (code, out, err)
    if case.accepted is not None:
        case.accepted(env)
        _dump(case, "(accepted)")
        return
    line = _error_line(out, err)
    assert re.search(case.message, line), f"{case.message!r} not in {line!r}"
    _dump(case, line.replace(str(tmp_path), "…"))
    assert out.strip() == "", out
    assert _snapshot(env.watched) == before, "a refused command changed the files"


def test_catalogue_is_large_and_its_ids_distinct():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    refused = [c for c in CASES if c.accepted is None]
    assert len(refused) >= 30, len(refused)


def test_overwrite_refused_keeps_the_old_run_loadable(request, tmp_path, monkeypatch):
    """The row above checks the files are untouched; here the old run still exports."""
    env = Env(request, tmp_path, monkeypatch)
    argv = _overwrite_bad_data(env)
    assert _invoke(argv)[0] == 2
    run = tmp_path / "out"
    assert not (run.parent / f".{run.name}.replaced").exists()
    from edgetl.train import load_model, load_run

    assert load_run(run)["class_names"] == ["circle", "cross", "square"]
    assert load_model(run / "model.keras").output_shape == (None, 3)


# Real processes for a representative subset: the one line is what a user sees in a terminal.
SUBPROCESS_IDS = ["truncated-jpeg-strict", "decompression-bomb-20000px-strict",
                  "class-folder-symlink-loop", "conflict-resume-overwrite", "out-under-a-file",
                  "base-model-lambda-without-unsafe",  # refused after TensorFlow has loaded
                  "export-run-from-newer-edgetl", "export-half-copied-run",
                  "inspect-tfl3-but-corrupt-flatbuffer", "bench-same-model-twice",
                  "runner-labels-file-wrong-count", "runner-damaged-metadata",
                  "bundle-out-exists"]


@pytest.mark.parametrize("case_id", SUBPROCESS_IDS)
def test_subprocess_subset(case_id, request, tmp_path, monkeypatch):
    case = next(c for c in CASES if c.id == case_id)
    env = Env(request, tmp_path, monkeypatch)
    argv = [str(a) for a in case.setup(env)]
    exe = [sys.executable, str(RUNNER)] if argv[0] == "runner" else [str(EDGETL)]
    before = _snapshot(env.watched)
    proc = subprocess.run(exe + argv[1:], capture_output=True, text=True, timeout=300)
    assert proc.returncode == case.code, (proc.stdout, proc.stderr)
    line = _error_line(proc.stdout, proc.stderr)
    assert re.search(case.message, line), line
    assert _snapshot(env.watched) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores folder permissions; the catalogue row out-read-only "
                           "checks the message through the os.access answer of a read-only mount")
def test_read_only_out_for_real(request, tmp_path, monkeypatch):
    env = Env(request, tmp_path, monkeypatch)
    data = env.data()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, out, err, exc = _invoke(["edgetl", "train", "--data", data, "--out", ro / "run",
                                       *TINY_FLAGS])
    finally:
        ro.chmod(0o755)
    assert exc is None and code == 2
    assert re.search(r"cannot write --out '.*ro/run': '.*ro' is not writable", _error_line(out, err))
    assert list(ro.iterdir()) == []
