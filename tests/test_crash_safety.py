"""Crash safety: `kill -9` at any moment never leaves a corrupt 'latest' or a finished-looking file.

Training is killed with SIGKILL in a seeded random loop and resumed with ``--resume`` until it
finishes: history.csv must hold epochs 1..N exactly once and model.keras must load. Then the
narrow windows a random kill rarely hits are hit on purpose: a small prelude wraps ``os.replace``
(every atomic write in edgetl ends with one) and SIGKILLs the process just before or just after
the rename of a chosen file. Export gets the same treatment: a killed export never leaves a
``<name>_int8.tflite`` that looks finished (unverified or half-written), only a hidden temporary
file or nothing.

tests/test_cli_train.py covers one kill after an epoch in detail; this file covers the loop and
every write window.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

EDGETL = Path(sys.executable).with_name("edgetl")
EPOCHS = 5
TINY = ["--alpha", "0.35", "--input-size", "32", "--weights", "none", "--batch-size", "8",
        "--no-augment"]

# Runs `edgetl` after wrapping os.replace: EDGETL_KILL="before:<text>" or "after:<text>" kills
# the process (SIGKILL, no clean-up of any kind) around the first rename whose target contains
# <text>.
PRELUDE = """
import os, signal, sys
when, _, needle = os.environ["EDGETL_KILL"].partition(":")
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    hit = needle in os.fspath(dst)
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv[0] = "edgetl"
from edgetl.cli import app
app()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from edgetl.data import make_synth

    out = tmp_path_factory.mktemp("crash") / "data"
    make_synth(out, classes=3, per_class=20, size=32, seed=1)
    return out


def _train_cmd(data: Path, run: Path, resume: bool) -> list[str]:
    cmd = [str(EDGETL), "train", "--data", str(data), "--out", str(run), *TINY,
           "--epochs", str(EPOCHS)]
    return cmd + (["--resume"] if resume else [])


def _history_epochs(run: Path) -> list[int]:
    with open(run / "history.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _check_latest(run: Path) -> None:
    """Whatever state.json names as the latest checkpoint is complete, at any moment."""
    state_file = run / "state.json"
    if not state_file.exists():
        return
    state = json.loads(state_file.read_text())  # written atomically: never half a file
    ckpt = run / "checkpoints" / state["checkpoint"]
    assert (ckpt / "ckpt.index").is_file(), (state, list(ckpt.parent.iterdir()))
    assert any(p.name.startswith("ckpt.data-") for p in ckpt.iterdir()), state
    hist = _history_epochs(run) if (run / "history.csv").exists() else []
    # rows of the epoch in flight may be there; rows of recorded epochs must be
    assert hist[:state["epoch"]] == list(range(1, state["epoch"] + 1)), (hist, state)


def _finished(run: Path, out: str) -> None:
    from edgetl.train import load_model

    assert f"epochs: {EPOCHS}" in out, out
    assert _history_epochs(run) == list(range(1, EPOCHS + 1))
    state = json.loads((run / "state.json").read_text())
    assert state["complete"] is True and state["epoch"] == EPOCHS
    assert load_model(run / "model.keras").output_shape == (None, 3)
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".tmp-*"))


class _Watch:
    """Runs a command; notes when its stderr says training started (the 'phase' line)."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        self.started = threading.Event()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.out: list[str] = []
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True).start()

    def _read_err(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("phase "):
                self.started.set()

    def kill(self) -> bool:
        """SIGKILL if still running; True when it was killed."""
        if self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        return True

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # let the reader threads drain the pipes
        return code


def _rows(run: Path) -> int:
    try:
        return len(_history_epochs(run))
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def test_training_killed_at_random_points_resumes_to_the_same_epochs(data, tmp_path):
    """Seeded random kills: some during start-up, most a random moment into an epoch."""
    rng = random.Random(15)
    run = tmp_path / "run"
    kills, where = 0, []
    for attempt in range(10):
        w = _Watch(_train_cmd(data, run, resume=(run / "config.json").exists()))
        try:
            if kills < 4:
                if rng.random() < 0.2:  # start-up: data scan, model build, checkpoint restore
                    w.started.wait(timeout=rng.uniform(0.5, 6.0))
                else:  # k more finished epochs, then a random moment into the next one (or into
                    # the checkpoint write, or the final save)
                    target = min(_rows(run) + rng.choice([0, 1, 1, 2]), EPOCHS - 2)
                    deadline = time.monotonic() + 300
                    while _rows(run) < target and w.proc.poll() is None:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    time.sleep(rng.uniform(0.0, 0.8))
                rows = _rows(run)
                if w.kill():
                    kills += 1
                    where.append(rows)
                    _check_latest(run)
                    continue
            code = w.wait(timeout=300)
        finally:
            w.kill()
        assert code == 0, "".join(w.lines[-5:])
        break
    else:
        pytest.fail("training never finished")
    assert kills >= 3, f"only {kills} kills landed before training finished"
    _finished(run, "".join(w.out))
    print(f"killed {kills} times (history rows at each kill: {where}); resumed each time")


# --- every write window, on purpose ----------------------------------------------------------------

def _run_with_kill(cmd: list[str], kill_at: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EDGETL_KILL=kill_at)
    return subprocess.run([sys.executable, "-c", PRELUDE, *cmd[1:]], env=env,
                          capture_output=True, text=True, timeout=300)


# (kill point, what the run directory holds afterwards)
TRAIN_WINDOWS = [
    ("before:split.json", "config.json written, split.json not yet: the split is made again"),
    ("before:checkpoints/p0-e002", "epoch 2's checkpoint written under its temporary name"),
    ("after:checkpoints/p0-e003", "epoch 3's checkpoint in place, history and state not yet"),
    ("before:state.json", "the history row appended, state.json not yet renamed"),
    ("before:model.keras", "every epoch done, model.keras under its temporary name"),
]


def test_training_killed_in_each_write_window_resumes_cleanly(data, tmp_path):
    """One run, killed once in each window in turn, then resumed to the end."""
    run = tmp_path / "run"
    for kill_at, what in TRAIN_WINDOWS:
        proc = _run_with_kill(_train_cmd(data, run, resume=(run / "config.json").exists()),
                              kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-2000:])
        _check_latest(run)
        assert not (run / "model.keras").exists(), what
    final = subprocess.run(_train_cmd(data, run, resume=True), capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    _finished(run, final.stdout)


# --- export ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> Path:
    from conftest import tiny_config

    from edgetl.train import train

    run = tmp_path_factory.mktemp("crash-export") / "run"
    train(tiny_config(data, run, epochs=1))
    return run


def _no_finished_looking_tflite(export_dir: Path) -> None:
    """Either no run_int8.tflite, or one that is complete, verified and has its sidecar."""
    from edgetl.runner import read_metadata, read_model

    target = export_dir / "run_int8.tflite"
    if not target.exists():
        return
    read_model(target)
    assert read_metadata(target)["mode"] == "int8"
    sidecar = json.loads((export_dir / "run_int8.json").read_text())
    assert "accuracy" in sidecar["verification"], "a .tflite exists that was never verified"


EXPORT_WINDOWS = [
    "before:.run_int8.partial.tflite",  # converted, bytes in the temporary file, not renamed
    "after:.run_int8.partial.tflite",  # staged under its hidden name, verification starting
    "before:run_int8.json",  # verified, the sidecar not yet in place
]


def test_export_killed_mid_write_leaves_no_finished_looking_tflite(run_dir, tmp_path):
    """Killed in each window in turn (no --overwrite needed to try again), then finished."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "export"))
    cmd = [str(EDGETL), "export", str(run), "--int8", "--num-calibration", "12", "--max-drop",
           "100"]
    export_dir = run / "export"
    for kill_at in EXPORT_WINDOWS:
        proc = _run_with_kill(cmd, kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-2000:])
        assert not (export_dir / "run_int8.tflite").exists(), kill_at
        leftovers = sorted(p.name for p in export_dir.iterdir())
        assert all(n.startswith(".") or n.endswith(".json") for n in leftovers), leftovers

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    _no_finished_looking_tflite(export_dir)
    assert (export_dir / "run_int8.tflite").exists()
    assert not [p for p in export_dir.iterdir() if p.name.startswith(".")]
