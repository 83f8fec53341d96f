"""`edgetl train` from the command line: bad input, resume after kill -9, imports, `backbones`.

Bad input must exit 2 with one line that names the bad value, and leave nothing half-written.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgetl.backbones import REGISTRY
from edgetl.cli import app

EDGETL = str(Path(sys.executable).with_name("edgetl"))
TINY = ["--alpha", "0.35", "--input-size", "32", "--weights", "none", "--batch-size", "8",
        "--no-augment", "--quiet"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _copy_classes(synth: Path, dest: Path, classes=("circle", "cross", "square"), n=4) -> Path:
    for name in classes:
        (dest / name).mkdir(parents=True)
        for src in sorted((synth / name).iterdir())[:n]:
            shutil.copy(src, dest / name / src.name)
    return dest


def _assert_refused(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- bad input -----------------------------------------------------------------------------------


def _case(tmp_path: Path, synth: Path, name: str):
    """(extra args, expected substrings of the message) for one kind of bad input."""
    data = synth
    extra: list = []
    if name == "missing data":
        data = tmp_path / "no such folder"
        needles = ["no such folder", "does not exist"]
    elif name == "empty data":
        data = tmp_path / "empty"
        data.mkdir()
        needles = [str(data), "no class sub-folders"]
    elif name == "one class":
        data = _copy_classes(synth, tmp_path / "one", classes=("circle",))
        needles = [str(data), "1 class folder", "circle"]
    elif name == "empty class":
        data = _copy_classes(synth, tmp_path / "d")
        (data / "zebra").mkdir()
        needles = ["zebra", "no readable images"]
    elif name == "unknown backbone":
        extra = ["--backbone", "mobilenetv"]
        needles = ["'mobilenetv'", "Did you mean 'mobilenetv2'?", *REGISTRY]
    elif name == "not an imagenet size":
        extra = ["--input-size", "100", "--weights", "imagenet"]
        needles = ["--input-size 100", "96, 128, 160, 192, 224", "--weights none"]
    elif name == "tiny input":
        extra = ["--input-size", "8"]
        needles = ["--input-size 8", "16"]
    elif name == "unfreeze too many":
        extra = ["--strategy", "fine-tune", "--unfreeze", "10000"]
        needles = ["--unfreeze 10000", "153 layers"]
    elif name == "unknown layer":
        extra = ["--strategy", "fine-tune", "--unfreeze-from", "nosuchlayer"]
        needles = ["'nosuchlayer'", "Conv1"]
    elif name == "resume and overwrite":
        extra = ["--resume", "--overwrite"]
        needles = ["--resume", "--overwrite"]
    elif name == "val-data and val-split":
        extra = ["--val-data", synth, "--val-split", "0.3"]
        needles = ["--val-data", "--val-split"]
    elif name == "unfreeze with feature-extract":
        extra = ["--strategy", "feature-extract", "--unfreeze", "3"]
        needles = ["--unfreeze", "feature-extract", "fine-tune"]
    elif name == "qat unsupported":
        extra = ["--backbone", "mobilenetv3small", "--qat", "--qat-scope", "all"]
        needles = ["--qat", "mobilenetv3small"]
    elif name == "weights file missing":
        extra = ["--weights", "/no/such/file.h5"]
        needles = ["'/no/such/file.h5'", "not a file"]
    elif name == "bad head":
        extra = ["--head", "dense:12,dense:abc"]
        needles = ["'dense:abc'", "dense:UNITS"]
    elif name == "strict with a corrupt image":
        data = _copy_classes(synth, tmp_path / "d")
        (data / "cross" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        extra = ["--strict"]
        needles = ["--strict", "broken.png"]
    else:  # pragma: no cover
        raise AssertionError(name)
    return data, extra, needles


BAD_INPUTS = ["missing data", "empty data", "one class", "empty class", "unknown backbone",
              "not an imagenet size", "tiny input", "unfreeze too many", "unknown layer",
              "resume and overwrite", "val-data and val-split", "unfreeze with feature-extract",
              "qat unsupported", "weights file missing", "bad head", "strict with a corrupt image"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_exits_2_naming_the_value_and_writes_nothing(synth, tmp_path, name):
    data, extra, needles = _case(tmp_path, synth, name)
    out = tmp_path / "run"
    data_before = _tree(data) if data.is_dir() else None

    result = _cli("train", "--data", data, "--out", out, *TINY, "--epochs", "1", *extra)

    _assert_refused(result, *needles)
    assert not out.exists()
    if data_before is not None:
        assert _tree(data) == data_before


def test_existing_out_is_never_overwritten_without_overwrite(synth, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"run_format": 1}')
    (out / "model.keras").write_bytes(b"precious")
    before = _tree(out)

    _assert_refused(_cli("train", "--data", synth, "--out", out, *TINY), str(out), "--overwrite")
    assert _tree(out) == before


def test_resume_refuses_a_folder_that_is_not_a_run(synth, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    before = _tree(out)

    _assert_refused(_cli("train", "--data", synth, "--out", out, "--resume"), str(out),
                    "not an edgetl run")
    assert _tree(out) == before
    _assert_refused(_cli("train", "--data", synth, "--resume"), "--resume needs --out")


def test_the_real_process_prints_one_line_and_no_traceback(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([EDGETL, "train", "--data", tmp_path / "nope", "--out", out, *TINY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: data folder '{tmp_path / 'nope'}' does not exist"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


def test_imagenet_weights_offline_say_where_to_put_the_file(synth, tmp_path):
    out = tmp_path / "run"
    result = _cli("train", "--data", synth, "--out", out, "--weights", "imagenet", "--alpha",
                  "0.35", "--input-size", "96", "--epochs", "1", "--batch-size", "8", "--quiet")
    if result.exit_code == 0:
        pytest.skip("the ImageNet weights downloaded (online, or already in ~/.keras/models)")
    line = _assert_refused(result, "cannot download ImageNet weights for mobilenetv2",
                           "~/.keras/models/", "--weights PATH")
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5" in line
    assert not out.exists()


# --- resume after kill -9 ------------------------------------------------------------------------


def _read_state(run: Path):
    try:
        text = (run / "state.json").read_text()
    except FileNotFoundError:
        return None
    return json.loads(text)  # written atomically: never half a file


def test_resume_after_kill_9_loses_and_repeats_no_epoch(synth, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([EDGETL, "train", "--data", synth, "--out", run, *TINY,
                             "--epochs", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            state = _read_state(run)
            if state is not None:
                # The newest checkpoint is complete whenever state.json names it.
                assert (run / "checkpoints" / state["checkpoint"] / "ckpt.index").is_file()
                if state["epoch"] >= 1:
                    break
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    state = _read_state(run)
    assert not state.get("complete") and 1 <= state["epoch"] < 4, state
    assert (run / "checkpoints" / state["checkpoint"] / "ckpt.index").is_file()
    assert not (run / "model.keras").exists()

    result = _cli("train", "--out", run, "--data", synth, "--resume")

    assert result.exit_code == 0, (result.output, result.exception)
    assert "epochs: 4" in result.stdout
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["phase_epoch"]) for r in rows] == [1, 2, 3, 4]
    state = _read_state(run)
    assert state["complete"] is True and state["epoch"] == 4
    assert (run / "checkpoints" / state["checkpoint"] / "ckpt.index").is_file()
    from edgetl.train import load_model

    model = load_model(run / "model.keras")
    assert model.output_shape == (None, 3)
    assert json.loads((run / "metrics.json").read_text())["count"] > 0


# --- imports and `edgetl backbones` ----------------------------------------------------------


def test_import_and_help_load_no_tensorflow():
    code = (
        "import sys\n"
        "import edgetl, edgetl.cli\n"
        "from edgetl.cli import app\n"
        "for args in (['--help'], ['train', '--help'], ['backbones', '--help']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        "heavy = ('tensorflow', 'tf_keras', 'keras', 'tensorflow_model_optimization')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "--unfreeze-from" in proc.stdout  # the help really was printed


def test_backbones_lists_every_name_with_its_qat_column():
    result = _cli("backbones")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    header = lines[0].split()
    assert header[0] == "name" and "qat" in header
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert rows[name][-1] == ("yes" if spec.qat else "no"), rows[name]
    # EfficientNet-Lite has no published ImageNet weights: the column says so, not a size.
    assert "none (--weights PATH)" in next(x for x in lines if x.startswith("efficientnetlite0 "))


def test_the_same_seed_trains_the_same_model_in_two_processes(synth, tmp_path):
    """Augmentation draws from per-batch seeds, so --seed fixes the model, not just the split."""
    from edgetl.train import load_model

    def weights(run, seed):
        flags = [f for f in TINY if f != "--no-augment"]
        proc = subprocess.run([EDGETL, "train", "--data", synth, "--out", run, *flags,
                               "--epochs", "2", "--seed", str(seed)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((run / "config.json").read_text())["train"]["augment"] is True
        return load_model(run / "model.keras").get_weights()

    a, b = weights(tmp_path / "a", 5), weights(tmp_path / "b", 5)
    assert all((x == y).all() for x, y in zip(a, b))
    c = weights(tmp_path / "c", 6)
    assert any((x != y).any() for x, y in zip(a, c))


def test_run_trained_with_relative_paths_exports_from_another_directory(synth, tmp_path):
    """A run stores absolute data paths: `edgetl export RUN` works from any working directory."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _copy_classes(synth, work / "photos")
    proc = subprocess.run([EDGETL, "train", "--data", "photos", "--out", "run", *TINY,
                           "--epochs", "1"], cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((work / "run" / "config.json").read_text())
    split = json.loads((work / "run" / "split.json").read_text())
    assert config["train"]["data"] == str(work / "photos")
    assert all(os.path.isabs(p) for p, _ in split["train"] + split["val"])
    proc = subprocess.run([EDGETL, "export", str(work / "run"), "--float32", "--max-drop", "100"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (work / "run" / "export" / "run_float32.tflite").is_file()
