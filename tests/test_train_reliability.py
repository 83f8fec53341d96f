"""Reliability of `edgetl train` (issue 11, the training side), one section per kind:

nothing lost (--overwrite puts the old run back on any failure and signal; a set-aside run is
never deleted by a later run; the run directory is locked), only regular files opened, bounded
input size, every value checked before work starts (numeric flags, typer's parse errors as one
line, the run's files validated on --resume and export, changed flags refused on --resume),
faults of the machine as one line, --out inside --data refused.

Each test asserts the message, the exit code and the files left behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config

EDGETL = Path(sys.executable).with_name("edgetl")
TINY = ["--alpha", "0.35", "--input-size", "32", "--weights", "none", "--batch-size", "8",
        "--no-augment", "--quiet"]
cli = CliRunner()


# --- helpers ------------------------------------------------------------------------------------

def _invoke(*args) -> tuple[int, str, str]:
    from edgetl.cli import app

    result = cli.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and "╭" not in stderr, stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _tree(top: Path) -> dict:
    """Every path under top (hidden ones included) with its size and mtime."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            snap[str(p.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


def _temp_names(top: Path) -> list[str]:
    return [p for p in _tree(top) if Path(p).name.startswith(".tmp-")
            or Path(p).name.endswith(".tmp")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from edgetl.data import make_synth

    out = tmp_path_factory.mktemp("rel-data") / "data"
    make_synth(out, classes=3, per_class=6, size=32, seed=0)
    return out


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A finished 1-epoch tiny run (never modified: tests copy it)."""
    from edgetl.train import train

    run = tmp_path_factory.mktemp("rel-run") / "run"
    train(tiny_config(data, run, epochs=1))
    return run


def _copy_run(finished: Path, where: Path) -> Path:
    run = where / "run"
    shutil.copytree(finished, run)
    return run


# --- nothing lost: --overwrite, signals, the lock ---------------------------------------------

def _start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(EDGETL), "train", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["set-aside", "first-epoch"])
def test_signal_during_overwrite_puts_the_old_run_back(sig, when, data, finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    before = _tree(run)
    proc = _start(["--data", data, "--out", run, "--overwrite", *TINY, "--epochs", "500"],
                  tmp_path)
    # Right after the old run is set aside, or once the new run has its first checkpoint.
    _wait_for(tmp_path / ".run.replaced", proc)
    if when == "first-epoch":
        _wait_for(run / "state.json", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("error: interrupted before this run finished an "
                                            "epoch: nothing of it was kept")
    assert "Traceback" not in err
    assert _tree(run) == before  # the old run, byte for byte (sizes and mtimes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .replaced, .lock, .failed


def test_signal_after_an_epoch_leaves_a_resumable_run_without_temp_files(data, tmp_path):
    from edgetl.config import TrainConfig
    from edgetl.train import _read_state

    run = tmp_path / "run"
    proc = _start(["--data", data, "--out", run, *TINY, "--epochs", "500"], tmp_path)
    _wait_for(run / "state.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == (
        "error: interrupted; the run keeps its finished epochs: continue it with "
        f"`edgetl train --out {run} --resume`")
    assert _temp_names(run) == []
    assert not (tmp_path / ".run.lock").exists()
    saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["train"])
    state = _read_state(run, saved)  # names a complete checkpoint
    assert (run / "checkpoints" / state["checkpoint"] / "ckpt.index").is_file()


def test_signal_before_the_first_epoch_leaves_nothing(data, tmp_path):
    run = tmp_path / "sub" / "run"
    proc = _start(["--data", data, "--out", run, *TINY, "--epochs", "500"], tmp_path)
    _wait_for(run, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith(
        "error: interrupted")
    if not (run / "state.json").exists():  # else an epoch finished first: resumable, kept
        assert err.strip().endswith("nothing of it was kept")
        assert not (tmp_path / "sub").exists()


def test_a_later_run_never_deletes_a_set_aside_run(data, finished, tmp_path):
    """A killed --overwrite (SIGKILL: nothing can put the old run back) leaves .run.replaced.
    Decision: a later train puts it back when run/ is missing or empty, and otherwise refuses
    (naming it) until the user moves it back or deletes it; nothing deletes it silently."""
    aside = tmp_path / ".run.replaced"
    shutil.copytree(finished, aside)
    before = _tree(aside)
    (tmp_path / "run").mkdir()  # what a killed --overwrite leaves before its first file
    code, _, err = _invoke("train", "--data", data, "--out", tmp_path / "run", *TINY,
                           "--epochs", "1")
    # Put back, then the usual refusal of an existing run without --overwrite.
    assert code == 2
    assert "note: put back the run an interrupted --overwrite had set aside" in err
    assert "already exists: pass --overwrite" in err.strip().splitlines()[-1]
    assert not aside.exists() and _tree(tmp_path / "run") == before

    # run/ holds the (resumable) run that replaced it: refused, both kept, with --overwrite too.
    shutil.copytree(tmp_path / "run", aside)
    for extra in ([], ["--overwrite"]):
        code, _, err = _invoke("train", "--data", data, "--out", tmp_path / "run", *TINY,
                               "--epochs", "1", *extra)
        line = _one_error_line(err)
        assert code == 2 and ".run.replaced' holds the run an interrupted --overwrite set " \
                             "aside" in line and "move it back or delete it" in line
        assert _tree(aside) == before


def test_a_second_train_on_a_locked_run_is_refused(data, tmp_path):
    run = tmp_path / "run"
    fd = os.open(tmp_path / ".run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running `edgetl train --out run` holds
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, _, err = _invoke("train", "--data", data, "--out", run, *TINY, *extra)
            line = _one_error_line(err)
            assert code == 2
            assert re.search(r"run directory '.*run' is in use by another edgetl train \(it "
                             r"holds '.*\.run\.lock'\)", line), line
        assert not run.exists()
    finally:
        os.close(fd)


def test_a_stale_lock_file_does_not_block(data, finished, tmp_path):
    """A lock file left by a killed process (no flock held) is taken over."""
    run = _copy_run(finished, tmp_path)
    (tmp_path / ".run.lock").write_text("12345\n")
    code, _, err = _invoke("train", "--data", data, "--out", run, *TINY, "--epochs", "1",
                           "--resume")
    assert code == 0, err
    assert not (tmp_path / ".run.lock").exists()


def test_two_real_trainings_on_one_out_one_is_refused(data, tmp_path):
    run = tmp_path / "run"
    first = _start(["--data", data, "--out", run, *TINY, "--epochs", "500"], tmp_path)
    _wait_for(tmp_path / ".run.lock", first)
    second = subprocess.run([str(EDGETL), "train", "--data", str(data), "--out", str(run),
                             *TINY, "--epochs", "1"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert second.returncode == 2
    assert "is in use by another edgetl train" in _one_error_line(second.stderr)


# --- only regular files -------------------------------------------------------------------------

def test_fifo_in_a_class_folder_is_skipped_listed_or_refused_never_opened(data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data, d)
    os.mkfifo(d / "circle" / "x.jpg")
    code = ("from edgetl.data import scan_folder; f = scan_folder(%r, (32, 32)); "
            "print([r for p, r in f.skipped if p.endswith('x.jpg')])" % str(d))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "not a regular file: a FIFO (named pipe), never opened" in proc.stdout
    proc = subprocess.run([str(EDGETL), "train", "--data", str(d), "--out",
                           str(tmp_path / "run"), *TINY, "--strict"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert re.search(r"--strict: 1 unreadable file\(s\), first '.*circle/x\.jpg': not a "
                     r"regular file: a FIFO", line), line
    assert not (tmp_path / "run").exists()


def test_base_model_fifo_is_refused_without_opening_it(data, tmp_path):
    fifo = tmp_path / "model.h5"
    os.mkfifo(fifo)
    proc = subprocess.run([str(EDGETL), "train", "--data", str(data), "--out",
                           str(tmp_path / "run"), "--base-model", str(fifo), "--epochs", "1",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "model.h5' is not a regular file: a FIFO (named pipe), never opened" in line, line
    assert not (tmp_path / "run").exists()


# --- formats ------------------------------------------------------------------------------------

def test_webp_and_tiff_are_read_and_unsupported_files_are_named(tmp_path):
    import numpy as np
    from PIL import Image

    from edgetl.data import scan_folder
    from edgetl.errors import EdgetlError

    rng = np.random.default_rng(0)
    for cls, ext, fmt in (("apple", "jpg", "JPEG"), ("pear", "webp", "WEBP"),
                          ("plum", "tif", "TIFF")):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "d" / cls / f"{i}.{ext}", fmt)
    folder = scan_folder(tmp_path / "d", (32, 32))
    assert folder.counts() == {"apple": 3, "pear": 3, "plum": 3} and not folder.skipped

    for i in range(2):
        (tmp_path / "d" / "fig").mkdir(exist_ok=True)
        (tmp_path / "d" / "fig" / f"{i}.xyz").write_bytes(b"not an image")
    with pytest.raises(EdgetlError) as e:
        scan_folder(tmp_path / "d", (32, 32))
    assert re.search(r"class folder '.*fig' has no readable images \(it has 2 file\(s\) left "
                     r"out: \.xyz; e\.g\. '.*0\.xyz': not an image file \(extension '\.xyz' "
                     r"is not a format Pillow reads\); edgetl reads JPEG, PNG, WebP, TIFF",
                     str(e.value)), str(e.value)


def test_left_out_files_are_named_in_the_output_and_recorded(data, tmp_path, capsys):
    from edgetl.train import train

    d = tmp_path / "data"
    shutil.copytree(data, d)
    for name in ("notes.txt", "a.xyz", "b.xyz", "c.xyz"):
        (d / "circle" / name).write_text("x")
    train(tiny_config(d, tmp_path / "run", epochs=1))  # --quiet: the note is still shown
    err = capsys.readouterr().err
    assert re.search(r"note: left out 4 file\(s\) \(all listed in .*run/split\.json\): "
                     r"'.*a\.xyz': not an image file .*; \.\.\.", err), err
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["skipped"]) == 4
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["counts"]["skipped"] == 4


# --- every value checked before work starts ---------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--seed", "-1", r"--seed -1 must be a whole number >= 0 and <= 4294967295"),
    ("--seed", str(2**32), r"--seed 4294967296 must be a whole number >= 0 and <= 4294967295"),
    ("--alpha", "nan", r"--alpha nan must be a number > 0 and <= 10 \(finite\)"),
    ("--alpha", "-1", r"--alpha -1\.0 must be a number > 0"),
    ("--alpha", "0", r"--alpha 0\.0 must be a number > 0"),
    ("--lr", "inf", r"--lr inf must be a number > 0 and <= 1000000\.0 \(finite\)"),
    ("--lr", "0", r"--lr 0\.0 must be a number > 0"),
    ("--fine-tune-lr", "nan", r"--fine-tune-lr nan must be a number > 0"),
    ("--dropout", "nan", r"--dropout nan must be a number >= 0 and < 1"),
    ("--val-split", "1", r"--val-split 1\.0 must be a number > 0 and < 1"),
    ("--val-split", "-inf", r"--val-split -inf must be a number > 0 and < 1"),
    ("--epochs", "0", r"--epochs 0 must be a whole number >= 1"),
    ("--epochs", "-5", r"--epochs -5 must be a whole number >= 1"),
    ("--batch-size", "0", r"--batch-size 0 must be a whole number >= 1"),
    ("--batch-size", "10000000", r"--batch-size 10000000 must be a whole number >= 1 and <= "),
    ("--input-size", "30000", r"--input-size 30000 is too large \(maximum 1024 px"),
    ("--input-size", "8", r"--input-size 8 is too small \(minimum 16\)"),
])
def test_bad_numbers_are_refused_naming_the_flag(flag, value, message, data, tmp_path):
    out = tmp_path / "new" / "run"
    args = [a for a in TINY]
    if flag in args:
        i = args.index(flag)
        del args[i:i + 2]
    code, _, err = _invoke("train", "--data", data, "--out", out, *args, flag, value)
    assert code == 2
    assert re.search(message, _one_error_line(err)), err
    assert not (tmp_path / "new").exists()


def test_input_size_parsing_is_one_function():
    from edgetl.config import MAX_INPUT_SIZE, parse_input_size
    from edgetl.errors import EdgetlError

    assert parse_input_size(" 96 ") == 96 and parse_input_size(MAX_INPUT_SIZE) == MAX_INPUT_SIZE
    for bad in ("abc", 1.5, True, None, MAX_INPUT_SIZE + 1, 15):
        with pytest.raises(EdgetlError, match="--input-size"):
            parse_input_size(bad)


@pytest.mark.parametrize("argv,line", [
    (["train", "--data", "d", "--epochs", "nan"], "error: --epochs: 'nan' is not an integer"),
    (["train", "--data", "d", "--lr", "fast"], "error: --lr: 'fast' is not a number"),
    (["train", "--data", "d", "--strategy", "bogus"],
     "error: --strategy: 'bogus' is not one of 'feature-extract', 'fine-tune', 'two-phase'"),
    (["train", "--data", "d", "--bogus"], "error: no such option: --bogus"),
    (["export", "r", "--max-drop", "lots"], "error: --max-drop: 'lots' is not a number"),
    (["bench", "m.tflite", "--runs=x"], "error: --runs: 'x' is not an integer"),
    (["data", "synth", "o", "--size", "1.5"], "error: --size: '1.5' is not an integer"),
    (["data", "synth"], "error: OUT is required (see 'edgetl data synth --help')"),
    (["nosuch"], "error: no such command 'nosuch' (see 'edgetl --help')"),
])
def test_parse_errors_are_one_line_for_every_command(argv, line, tmp_path):
    proc = subprocess.run([str(EDGETL), *argv], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2
    got = _one_error_line(proc.stderr)
    assert got == line or (line.startswith("error: no such option") and got.startswith(line))
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_train_without_data_is_refused_in_one_line(tmp_path):
    code, _, err = _invoke("train", "--out", tmp_path / "run")
    assert code == 2 and _one_error_line(err).startswith("error: --data is required")


# --- the run's files, validated when --resume and export read them -----------------------------

def _edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


DAMAGE = [
    ("config.json", lambda p: p.write_text('{"run_format": 1, "train": {'),
     r"'.*config\.json' is corrupt \(not JSON\)"),
    ("config.json", lambda p: _edit_json(p, lambda c: c.pop("train")),
     r"'.*config\.json' field 'train' is missing or not an object"),
    ("config.json", lambda p: _edit_json(p, lambda c: c["train"].update(strategy="bogus")),
     r"'.*config\.json' field 'train\.strategy' is invalid \(strategy 'bogus' is not one of"),
    ("config.json", lambda p: _edit_json(p, lambda c: c["train"].update(epochs=-3)),
     r"'.*config\.json' field 'train\.epochs' is invalid \(--epochs -3 must be"),
    ("config.json", lambda p: _edit_json(p, lambda c: c["train"].update(batch_size="8")),
     r"'.*config\.json' field 'train\.batch_size' is invalid"),
    ("config.json", lambda p: _edit_json(p, lambda c: c["train"].update(seed=-1)),
     r"'.*config\.json' field 'train\.seed' is invalid"),
    ("config.json", lambda p: _edit_json(p, lambda c: c.update(class_names="abc")),
     r"'.*config\.json' field 'class_names' is not a list of at least 2 names"),
    ("state.json", lambda p: p.write_text('{"phase": 0, "epo'),
     r"'.*state\.json' is corrupt \(not JSON\)"),
    ("state.json", lambda p: _edit_json(p, lambda s: s.update(phase=7)),
     r"'.*state\.json' field 'phase' is 7, not a phase of this run \(0\.\.0\)"),
    ("state.json", lambda p: _edit_json(p, lambda s: s.update(epoch=99)),
     r"'.*state\.json' field 'epoch' is 99, not in 0\.\.1"),
    ("state.json", lambda p: _edit_json(p, lambda s: s.update(checkpoint="../../etc")),
     r"'.*state\.json' field 'checkpoint' names '\.\./\.\./etc', which is not a complete "
     r"checkpoint"),
    ("split.json", lambda p: p.write_text("[1, 2"),
     r"'.*split\.json' is corrupt \(not JSON\)"),
    ("split.json", lambda p: _edit_json(p, lambda s: s["train"].append(["x.png", 9])),
     r"'.*split\.json' field 'train\[\d+\]' is \['x\.png', 9\], not \[path, class index 0\.\.2\]"),
    ("split.json", lambda p: _edit_json(p, lambda s: s.update(val=[])),
     r"'.*split\.json' field 'val' is missing or empty"),
]


@pytest.mark.parametrize("file,damage,message", DAMAGE,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(DAMAGE)])
def test_resume_of_a_damaged_run_names_file_and_field(file, damage, message, data, finished,
                                                      tmp_path):
    run = _copy_run(finished, tmp_path)
    damage(run / file)
    before = _tree(run)
    code, _, err = _invoke("train", "--out", run, "--resume", "--quiet")
    assert code == 2
    assert re.search(message, _one_error_line(err)), err
    assert _tree(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_refuses_flags_that_differ_and_accepts_equal_ones(data, finished, tmp_path):
    from edgetl.data import make_synth

    run = _copy_run(finished, tmp_path)
    other = tmp_path / "other"
    make_synth(other, classes=4, per_class=3, size=32, seed=1)
    before = _tree(run)
    code, _, err = _invoke("train", "--out", run, "--resume", "--data", other, "--epochs", "3",
                           "--lr", "0.5", "--augment", "flip")
    line = _one_error_line(err)
    assert code == 2 and _tree(run) == before
    assert re.search(r"--resume continues '.*run' with its own settings, and these flags differ "
                     r"from them: --augment \(run: --no-augment\), --data '.*other' \(run: "
                     r"'.*data'\), --epochs 3 \(run: 1\), --lr 0\.5 \(run: 0\.003\); drop them",
                     line), line
    # The same values (and settings that do not change the result) are fine.
    code, out, err = _invoke("train", "--out", run, "--resume", "--data", data, *TINY,
                             "--epochs", "1", "--strict")
    assert code == 0, err
    assert "epochs: 1" in out


def test_export_refuses_a_hand_edited_config(finished, tmp_path):
    from edgetl.errors import EdgetlError
    from edgetl.train import load_run

    cases = [
        (lambda c: c.update(input_size="abc"), r"field 'input_size' is invalid"),
        (lambda c: c.update(input_size=64),
         r"field 'input_size' is 64, but model\.keras takes 32x32 px"),
        (lambda c: c.update(preprocessing="tf"), r"field 'preprocessing' is 'tf', not an object"),
        (lambda c: c["preprocessing"].update(std=[1, 0, 1]),
         r"field 'preprocessing\.std' has a zero"),
        (lambda c: c["preprocessing"].update(mean=[1, 2]),
         r"field 'preprocessing\.mean' is \[1, 2\], not 1 or 3 finite numbers"),
        (lambda c: c["preprocessing"].update(channel_order="GRB"),
         r"field 'preprocessing\.channel_order' is 'GRB'"),
        (lambda c: c.update(class_names=c["class_names"][:2]),
         r"field 'class_names' has 2 names, but model\.keras has 3 outputs"),
        (lambda c: c.update(class_names=["a", "a", "b"]), r"field 'class_names' repeats a name"),
        (lambda c: c.pop("input_size"), r"field 'input_size' is missing"),
    ]
    for i, (change, message) in enumerate(cases):
        run = tmp_path / f"r{i}"
        shutil.copytree(finished, run)
        _edit_json(run / "config.json", change)
        with pytest.raises(EdgetlError, match=r"'.*r%d/config\.json' " % i + message):
            load_run(run)
    assert load_run(finished)["class_names"] == ["circle", "cross", "square"]
    code, _, err = _invoke("export", tmp_path / "r6", "--num-calibration", "12")
    assert code == 2 and "has 2 names, but model.keras has 3 outputs" in _one_error_line(err)
    assert not (tmp_path / "r6" / "export").exists()


# --- --out inside --data ------------------------------------------------------------------------

def test_out_inside_data_is_refused_naming_out(data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data, d)
    before = _tree(d)
    for out, where in ((d / "run", "is inside"), (d / "circle" / "run", "is inside"),
                       (d, "is")):
        code, _, err = _invoke("train", "--data", d, "--out", out, *TINY, "--overwrite")
        line = _one_error_line(err)
        assert code == 2
        assert re.search(rf"--out '.*' {where} --data '.*data': the run directory must be "
                         r"outside the data folder", line), line
    assert _tree(d) == before


# --- faults of the machine ----------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_while_checkpointing_is_one_line_and_leaves_a_resumable_run(data, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(full)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = full / "run"
        proc = subprocess.run([str(EDGETL), "train", "--data", str(data), "--out", str(run),
                               "--alpha", "0.35", "--input-size", "64", "--weights", "none",
                               # a frozen base keeps the first checkpoint small enough to fit,
                               # so the disk fills on a later epoch, with a run to keep
                               "--strategy", "feature-extract",
                               "--epochs", "3", "--batch-size", "8", "--no-augment", "--quiet"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr
        line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert "Traceback" not in proc.stderr and len(line) == 1
        assert re.search(r"error: cannot read or write '.*full/run/checkpoints/\.tmp-p0-e\d{3}': "
                         r"No space left on device; the run is kept: fix that, then continue it "
                         r"with `edgetl train --out .*run --resume`", line[0]), line[0]
        assert _temp_names(run) == [] and (run / "state.json").is_file()
        assert not (full / ".run.lock").exists()
    finally:
        subprocess.run(["umount", str(full)])


@pytest.mark.parametrize("args,message", [
    (["--size", "5000"], r"--size 5000 is too large \(maximum 1024 px"),
    (["--size", "8"], r"--size 8 is too small \(minimum 16\)"),
    (["--seed", "-1"], r"--seed -1 must be a whole number >= 0"),
    (["--per-class", "0"], r"--per-class 0 must be a whole number >= 1"),
    (["--classes", "1"], r"--classes 1 must be between 2 and 6"),
])
def test_data_synth_numbers_are_checked(args, message, tmp_path):
    code, _, err = _invoke("data", "synth", tmp_path / "out", *args)
    assert code == 2 and re.search(message, _one_error_line(err)), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["cat\nrm -rf", "dog\x1b[2J", "bird\u202e"])
def test_class_folder_with_control_characters_is_refused(bad, tmp_path):
    from edgetl.data import make_synth

    data = tmp_path / "data"
    make_synth(data, classes=2, per_class=3, size=32, seed=0)
    first = sorted(data.iterdir())[0]
    first.rename(data / bad)
    code, _, err = _invoke("train", "--data", data, "--out", tmp_path / "run", *TINY)
    line = _one_error_line(err)
    assert code == 2 and "has control characters in its name" in line and "rename it" in line
    assert not (tmp_path / "run").exists()
