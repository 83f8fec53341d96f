"""export under faults: a claimed target, signals, a full disk, a failed rename, --edgetpu.

Nothing lost, nothing half-written: a second export of the same name is refused while the first
runs; Ctrl-C or SIGTERM ends in ``error: interrupted`` (exit 130) with the previous files of an
``--overwrite`` export byte for byte as they were and no temporary file left; a full disk or a
rename that fails names the path in one line (exit 2) and leaves nothing behind. ``--edgetpu``
fails an export that does not fully map to the Edge TPU, naming the ops that would run on the
CPU, unless ``--edgetpu-allow-cpu`` accepts them with a warning.

The tests that need a small disk (a tmpfs) or an immutable file run as root only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
cli = CliRunner()


def _export(run, *args):
    from edgetl.cli import app

    return cli.invoke(app, ["export", str(run), *map(str, args)])


def _files(folder: Path) -> dict:
    """Every file in a folder (hidden ones too) with the hash of its bytes."""
    if not folder.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from edgetl.data import make_synth

    out = tmp_path_factory.mktemp("reliable") / "data"
    make_synth(out, classes=3, per_class=6, size=32, seed=0)
    return out


@pytest.fixture(scope="module")
def exported_run(data, tmp_path_factory) -> Path:
    """A tiny run with a finished int8 + float16 export (run_int8, run_float16, manifest)."""
    from edgetl.train import train

    run = tmp_path_factory.mktemp("reliable") / "run"
    train(tiny_config(data, run, epochs=1))
    r = _export(run, "--int8", "--float16", "--num-calibration", 12, "--max-drop", 100)
    assert r.exit_code == 0, r.output
    shutil.rmtree(run / "checkpoints")
    return run


@pytest.fixture()
def run(exported_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(exported_run, out)
    return out


# --- a target claimed by another export --------------------------------------------------------

def test_export_of_a_claimed_run_is_refused_then_runs_once_released(run):
    export_dir = run / "export"
    before = _files(export_dir)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running export of this run holds
        r = _export(run, "--int8", "--overwrite", "--num-calibration", 12, "--max-drop", 100)
    finally:
        os.close(fd)
    assert r.exit_code == 2, r.output
    assert re.fullmatch(r"error: another edgetl export of run '.*run' is running: wait for it "
                        r"to finish, then export again", _error_line(r.output))
    assert _files(export_dir) == before

    r = _export(run, "--int8", "--overwrite", "--num-calibration", 12, "--max-drop", 100)
    assert r.exit_code == 0, r.output
    assert sorted(_files(export_dir)) == sorted(before)  # no lock file, no temporary file


def test_two_real_exports_of_one_file_the_second_is_refused(exported_run, tmp_path):
    """The first export (a real process) holds its claim from loading to renaming."""
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
    first = subprocess.Popen([str(EDGETL), "export", str(run), "--int8", "--io", "int8",
                              "--num-calibration", "12", "--max-drop", "100"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        staging = False  # the first export has written its first temporary file
        while first.poll() is None and not staging:
            with contextlib.suppress(FileNotFoundError):
                staging = any(n.startswith(".") for n in os.listdir(run / "export"))
            time.sleep(0.01)
        second = _export(run, "--int8", "--io", "uint8", "--num-calibration", 12,
                         "--max-drop", 100)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert second.exit_code == 2, second.output
    assert "another edgetl export of run" in _error_line(second.output)
    sidecar = json.loads((run / "export" / "run_int8.json").read_text())
    assert sidecar["settings"]["io"] == "int8"  # the first export's file, not replaced
    assert sorted(p.name for p in (run / "export").iterdir()) == [
        "run_calibration.json", "run_int8.json", "run_int8.tflite"]


# --- signals -----------------------------------------------------------------------------------

def _signal_when(cmd: list, export_dir: Path, prefix: str, sig: int):
    """Runs an export; sends ``sig`` once a file named ``prefix...`` appears in export_dir."""
    proc = subprocess.Popen([str(EDGETL), *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    sent = False
    try:
        while proc.poll() is None:
            with contextlib.suppress(FileNotFoundError):
                if any(n.startswith(prefix) for n in os.listdir(export_dir)):
                    proc.send_signal(sig)
                    sent = True
                    break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent, f"the export ended before {prefix} appeared: {err[-2000:]}"
    return proc.returncode, out, err


@pytest.mark.parametrize("sig,prefix", [
    (signal.SIGINT, ".run_float16.partial.tflite"),  # int8 done and staged, float16 verifying
    (signal.SIGTERM, ".run_int8.partial.tflite"),  # int8 staged, being verified
    (signal.SIGTERM, ".run_calibration.partial.json"),  # calibrated, converting
])
def test_signal_during_overwrite_puts_everything_back(run, sig, prefix):
    export_dir = run / "export"
    before = _files(export_dir)
    cmd = ["export", str(run), "--int8", "--float16", "--overwrite", "--num-calibration", "12",
           "--max-drop", "100", "--seed", "1"]
    code, out, err = _signal_when(cmd, export_dir, prefix, sig)
    assert code == 130, err[-3000:]
    # After a printed report block the line adds that none of the files was written.
    assert re.fullmatch(r"error: interrupted( \(no file was written, not even those above: "
                        r"an export keeps all its files or none\))?", _error_line(err))
    assert _files(export_dir) == before  # the previous files, byte for byte, and nothing else


def test_signal_during_first_export_leaves_no_export_folder(exported_run, tmp_path):
    run = tmp_path / "fresh"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
    cmd = ["export", str(run), "--int8", "--num-calibration", "12", "--max-drop", "100"]
    code, out, err = _signal_when(cmd, run / "export", ".fresh_int8.partial.tflite",
                                  signal.SIGINT)
    assert code == 130 and _error_line(err) == "error: interrupted"
    assert not (run / "export").exists()


# --- faults of the machine (root: a small tmpfs, an immutable file) -----------------------------

@contextlib.contextmanager
def _tmpfs(path: Path, kb: int):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _run_kb(run: Path) -> int:
    """The size of a run without its export folder, in KB, with room for tmpfs's own pages."""
    files = [p for p in run.rglob("*") if p.is_file() and "export" not in p.relative_to(run).parts]
    return sum(-(-p.stat().st_size // 4096) * 4 for p in files) + 64


@pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")
def test_full_disk_names_the_path_and_leaves_nothing(exported_run, tmp_path):
    with _tmpfs(tmp_path / "small", _run_kb(exported_run) + 300) as small:
        run = small / "run"
        shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
        free_before = shutil.disk_usage(small).free
        r = _export(run, "--int8", "--num-calibration", 12, "--max-drop", 100)
        assert r.exit_code == 2, r.output
        assert re.fullmatch(r"error: cannot read or write '.*small/run/export/run_\w+\.\w+': "
                            r"No space left on device", _error_line(r.output))
        assert not (run / "export").exists()
        assert shutil.disk_usage(small).free == free_before  # the disk is as full as before


@pytest.mark.skipif(not IS_ROOT, reason="mounting a read-only tmpfs needs root")
def test_read_only_target_is_refused_up_front(exported_run, tmp_path):
    with _tmpfs(tmp_path / "ro", _run_kb(exported_run) + 2000) as ro:
        run = ro / "run"
        shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = _export(run, "--int8", "--num-calibration", 12, "--max-drop", 100)
        assert r.exit_code == 2, r.output
        assert re.search(r"cannot write export folder '.*ro/run/export': .* is not writable",
                         _error_line(r.output))
        assert not (run / "export").exists()


@pytest.mark.skipif(not IS_ROOT or not shutil.which("chattr"),
                    reason="an immutable file (chattr +i) needs root")
def test_failed_rename_puts_every_previous_file_back(run):
    export_dir = run / "export"
    before = _files(export_dir)
    stuck = export_dir / "run_float16.tflite"  # the last file renamed: the others went first
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        r = _export(run, "--int8", "--float16", "--overwrite", "--num-calibration", 12,
                    "--max-drop", 100)
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert r.exit_code == 2, r.output
    assert re.fullmatch(r"error: cannot read or write '.*export/run_float16\.tflite': "
                        r"Operation not permitted( \(no file was written, not even those "
                        r"above: an export keeps all its files or none\))?", _error_line(r.output))
    assert _files(export_dir) == before


# --- --edgetpu enforces the mapping ------------------------------------------------------------

@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory) -> Path:
    """A run on a base model whose second op (LEAKY_RELU) is not in Coral's op table."""
    from edgetl.data import make_synth
    from edgetl.keras import keras
    from edgetl.train import train

    root = tmp_path_factory.mktemp("leaky")
    make_synth(root / "data", classes=3, per_class=10, size=32, seed=0)
    layers = keras.layers
    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, padding="same")(inp)
    x = layers.LeakyReLU(0.1)(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, layers.Dense(3, activation="softmax")(x)).save(root / "base.keras")
    from edgetl.config import TrainConfig

    train(TrainConfig(data=str(root / "data"), out=str(root / "run"),
                      base_model=str(root / "base.keras"), input_size=32, epochs=1,
                      batch_size=8, augment=False, quiet=True))
    return root / "run"


def test_edgetpu_fails_an_export_that_falls_back_to_the_cpu(leaky_run):
    from edgetl.runner import read_metadata

    r = _export(leaky_run, "--int8", "--io", "uint8", "--edgetpu", "--num-calibration", 12,
                "--max-drop", 100)
    assert r.exit_code == 1, r.output
    assert "verification: FAILED" in r.output
    line = _error_line(r.output)
    # The first unsupported op, and every op after it (the compiler cuts the graph there).
    assert re.search(r"run_int8\.tflite does not fully map to the Edge TPU: (\d+) of \d+ ops "
                     r"would run on the CPU \(from #\d+ LEAKY_RELU: LEAKY_RELU is not in Coral's "
                     r"supported-operations table; every op after it runs on the CPU too\): "
                     r"#\d+ LEAKY_RELU, #\d+ CONV_2D, .*FULLY_CONNECTED.*; pass "
                     r"--edgetpu-allow-cpu", line), line
    path = leaky_run / "export" / "run_int8.tflite"
    assert read_metadata(str(path))["verification"]["passed"] is False
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["verification"]["passed"] is False
    ops = sidecar["verification"]["edgetpu"]["ops"]
    leaky = next(i for i, o in enumerate(ops) if o["op"] == "LEAKY_RELU")
    assert all(o["maps"] for o in ops[:leaky]) and not any(o["maps"] for o in ops[leaky:])


def test_edgetpu_allow_cpu_passes_with_a_warning(leaky_run):
    r = _export(leaky_run, "--int8", "--io", "uint8", "--edgetpu", "--edgetpu-allow-cpu",
                "--overwrite", "--name", "allowed", "--num-calibration", 12, "--max-drop", 100)
    assert r.exit_code == 0, r.output
    # (the tiny model is near chance: verification warns about that too, in its own lines)
    warning = [ln for ln in r.output.splitlines()
               if ln.strip().startswith("warning:") and "Edge TPU" in ln]
    assert len(warning) == 1 and "LEAKY_RELU" in warning[0], r.output
    assert "(accepted: --edgetpu-allow-cpu)" in warning[0]
    assert "verification: passed" in r.output
    sidecar = json.loads((leaky_run / "export" / "allowed_int8.json").read_text())
    assert sidecar["verification"]["passed"] is True
    assert sidecar["settings"]["edgetpu_allow_cpu"] is True


def test_edgetpu_passes_a_model_that_fully_maps(exported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
    r = _export(run, "--int8", "--io", "uint8", "--edgetpu", "--num-calibration", 12,
                "--max-drop", 100)
    assert r.exit_code == 0, r.output
    assert "edge tpu: should fully map" in r.output and "on the CPU" not in r.output


def test_edgetpu_problem_reads_the_compiler_table():
    """With edgetpu_compiler installed its own table decides; its CPU ops are named by count."""
    from edgetl.export import edgetpu_problem
    from edgetl.inspect import parse_compiler_log

    log = """Edge TPU Compiler version 16.0.384591198
Model compiled successfully in 120 ms.
Number of Edge TPU subgraphs: 1
Total number of operations: 5
Number of operations that will run on Edge TPU: 2
Number of operations that will run on CPU: 3

Operator                       Count      Status

CONV_2D                        1          Mapped to Edge TPU
QUANTIZE                       1          Mapped to Edge TPU
LEAKY_RELU                     1          Operation not supported
CONV_2D                        1          More than one subgraph is not supported
MEAN                           1          More than one subgraph is not supported
"""
    compiler = parse_compiler_log(log)
    section = {"compiler": compiler, "requirements": [], "ops": []}
    problem = edgetpu_problem(section)
    assert problem["hard"] is False
    assert problem["cpu_ops"] == ["LEAKY_RELU x1", "CONV_2D x1", "MEAN x1"]
    assert problem["text"].startswith("does not fully map to the Edge TPU: 3 of 5 ops")
    failed = dict(compiler, error="ERROR: Didn't find op for builtin opcode 'LEAKY_RELU'")
    problem = edgetpu_problem({"compiler": failed, "requirements": [], "ops": []})
    assert problem["hard"] is True and "does not compile for the Edge TPU" in problem["text"]
