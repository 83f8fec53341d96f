#!/usr/bin/env python3
"""Set-up and the two README commands, for a fresh machine with only python3.

    python3 dev.py demo   # venv + install, then train -> export -> verify -> bench on built-in data
    python3 dev.py test   # venv + install, then the test suite (what CI runs)

Both create .venv next to this file (once; again when pyproject.toml changes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".edgetl-installed"


def sh(*cmd, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def setup() -> None:
    """Creates the venv and installs edgetl with its test extras (skipped when up to date)."""
    if sys.version_info < (3, 10):
        sys.exit(f"error: edgetl needs Python >= 3.10, this is {sys.version.split()[0]}")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want and PY.exists():
        return
    if not PY.exists():
        sh(sys.executable, "-m", "venv", VENV)
    sh(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    sh(PY, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]")
    STAMP.write_text(want)


def demo() -> None:
    """The whole pipeline on generated data: a few minutes on 2 cores, no internet."""
    work = ROOT / "demo"
    edgetl = BIN / "edgetl"
    data, val, run = work / "data", work / "val", work / "run"
    sh(edgetl, "data", "synth", data, "--classes", 4, "--per-class", 150, "--size", 64,
       "--overwrite")
    sh(edgetl, "data", "synth", val, "--classes", 4, "--per-class", 25, "--size", 64,
       "--seed", 1, "--overwrite")
    # ImageNet weights need the internet; the demo trains a small MobileNetV2 from scratch,
    # with quantization-aware training, and exports int8 from the QAT model.
    sh(edgetl, "train", "--data", data, "--val-data", val, "--backbone", "mobilenetv2",
       "--alpha", 0.35, "--input-size", 64, "--weights", "none", "--epochs", 10, "--qat",
       "--out", run, "--overwrite")
    import json

    accuracy = json.loads((run / "metrics.json").read_text())["accuracy"]
    if accuracy < 0.5:  # 4 classes: chance is 0.25; the demo's model reaches 0.9 and more
        sys.exit(f"error: the demo's model did not learn (validation accuracy {accuracy:.2f}, "
                 "chance 0.25): this is a bug in edgetl, please report it")
    sh(edgetl, "export", run, "--int8", "--float32", "--overwrite")
    exports = run / "export"
    sh(edgetl, "inspect", exports / "run_int8.tflite")
    sh(edgetl, "bench", exports / "run_float32.tflite", exports / "run_int8.tflite",
       "--data", val, "--markdown", work / "bench.md")
    photos = [sorted(d.iterdir())[0] for d in sorted(val.iterdir())[:2]]
    sh(edgetl, "predict", exports / "run_int8.tflite", *photos, "--top", 2)
    print(f"\ndemo done: run in {run}, models in {exports}, bench table in {work / 'bench.md'}")


def test(extra: list[str]) -> int:
    env = dict(os.environ)
    cmd = [str(PY), "-m", "pytest", "-n", "2", "--dist", "loadfile", "-p", "no:cacheprovider"]
    print("+", " ".join(cmd + extra), flush=True)
    return subprocess.run(cmd + extra, cwd=ROOT, env=env).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    if argv[0] == "demo":
        demo()
        return 0
    if argv[0] == "test":
        return test(argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as e:
        print(f"error: step failed with exit code {e.returncode}: "
              f"{' '.join(map(str, e.cmd))}", file=sys.stderr)
        sys.exit(e.returncode or 1)
    finally:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
