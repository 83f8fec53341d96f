"""The device package (devices/pyproject.toml, `edgetl-runner`): installed alone into a clean venv
it runs a real model and brings no TensorFlow and no edgetl with it.

The venv is made by `pip install` of a copy of devices/ and cached in ~/.cache/edgetl/ under a hash
of the package's files (override with EDGETL_RUNNER_VENV), so it is rebuilt only when they change
(about 20 s with pip's cache, once). Without PyPI the test skips, except in CI where it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgetl

from conftest import IN_CI, ROOT, realdata

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

DEVICES = ROOT / "devices"
PACKAGE_FILES = ("pyproject.toml", "edgetl_runner.py")


def _package() -> dict:
    return tomllib.loads((DEVICES / "pyproject.toml").read_text())


def _names(requirements) -> list[str]:
    """'numpy>=1.23' -> 'numpy' (markers and versions dropped)."""
    return [re.split(r"[<>=!~;\[ ]", r.strip(), maxsplit=1)[0].lower()
            for r in requirements if r.strip() and not r.lstrip().startswith("#")]


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"the device package test must run in CI: {reason}")
    pytest.skip(reason)


def _clean_env() -> dict:
    """No PYTHONPATH or virtualenv of ours leaks into the device venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"  # ~/.local's packages are not the device's
    return env


def device_venv() -> Path:
    """A venv with only `pip install devices/` in it, cached under the package's own hash."""
    digest = hashlib.sha256(b"".join((DEVICES / f).resolve().read_bytes()
                                     for f in PACKAGE_FILES)).hexdigest()[:12]
    cache = Path.home() / ".cache" / "edgetl"
    home = Path(os.environ.get("EDGETL_RUNNER_VENV") or cache / f"edgetl-runner-{digest}")
    if (home / "bin" / "edgetl-runner").exists():
        return home
    staging = home.with_name(f".{home.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    # A copy of devices/: pip builds in the source folder and would leave build/ in the clone.
    src = staging.with_name(staging.name + "-src")
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(DEVICES, src, symlinks=False)
    try:
        made = subprocess.run([sys.executable, "-m", "venv", str(staging)], capture_output=True,
                              text=True, env=_clean_env())
        if made.returncode != 0:
            _unavailable(f"cannot make a venv: {made.stderr.strip()[-300:]}")
        pip = subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", str(src)],
                             capture_output=True, text=True, timeout=900, env=_clean_env())
        if pip.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            last = (pip.stderr.strip().splitlines() or ["no output"])[-1]
            _unavailable(f"pip install devices/ failed (PyPI unreachable?): {last}")
    finally:
        shutil.rmtree(src, ignore_errors=True)
    # venv scripts hard-code their folder, but `python -m` and sys.prefix follow the binary;
    # the test calls the console script through the venv's python, which survives the rename.
    if not os.environ.get("EDGETL_RUNNER_VENV"):  # other versions, made over a day ago
        for old in cache.glob("edgetl-runner-*"):
            if old != home and time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    try:
        os.replace(staging, home)
    except OSError:  # another test process got there first
        shutil.rmtree(staging, ignore_errors=True)
    return home


def test_package_metadata_matches_edgetl_and_the_bundle():
    from edgetl.bundle import REQUIREMENTS

    device = _package()["project"]
    edgetl = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert device["name"] == "edgetl-runner" and device["version"] == edgetl["version"]
    from edgetl.runner import __version__ as runner_version  # what --version prints

    assert runner_version == device["version"]
    assert device["scripts"] == {"edgetl-runner": "edgetl_runner:main"}
    deps = _names(device["dependencies"])
    assert deps == ["numpy", "pillow", "ai-edge-litert"]
    assert not {"tensorflow", "tf-keras", "tensorflow-model-optimization"} & set(deps)
    # one list of what a device needs: edgetl's [device] extra and the bundle's requirements.txt
    assert _names(edgetl["optional-dependencies"]["device"]) == deps
    assert _names(REQUIREMENTS.splitlines()) == deps
    # edgetl/runner.py is the packaged module itself, and the bundle ships the package's file
    assert (ROOT / "edgetl" / "runner.py").resolve() == (DEVICES / "edgetl_runner.py").resolve()
    assert (ROOT / "edgetl" / "runner_pyproject.toml").resolve() == \
        (DEVICES / "pyproject.toml").resolve()


def test_a_bundle_is_the_device_package(tmp_path):
    """`pip install .` in a bundle installs edgetl-runner: its pyproject and runner are
    devices/'s."""
    from edgetl.bundle import bundle

    model = realdata("coral") / "mobilenet_v1_0.25_128_quant.tflite"
    out = bundle(model, tmp_path / "pi")
    assert (out / "pyproject.toml").read_bytes() == (DEVICES / "pyproject.toml").read_bytes()
    modules = tomllib.loads((out / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert [f"{m}.py" for m in modules["py-modules"]] == ["edgetl_runner.py"]
    assert (out / "edgetl_runner.py").read_bytes() == (DEVICES / "edgetl_runner.py").read_bytes()
    assert "pip install ." in (out / "README.txt").read_text()


def test_setup_scripts_install_the_package_and_parse():
    pi = (DEVICES / "raspberry-pi" / "setup.sh").read_text()
    assert 'pip install "$PACKAGE"' in pi and 'pip install --no-deps "$PACKAGE"' in pi
    for script in (DEVICES / "raspberry-pi" / "setup.sh", DEVICES / "coral" / "setup.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.slow
def test_clean_venv_runs_a_real_model_without_tensorflow(tmp_path):
    from edgetl import runner

    coral = realdata("coral")
    venv = device_venv()
    python, script = venv / "bin" / "python", venv / "bin" / "edgetl-runner"
    env = _clean_env()

    probe = ("import importlib.util as u, json, edgetl_runner;"
             "print(json.dumps({m: u.find_spec(m) is not None for m in "
             "('tensorflow', 'edgetl', 'tf_keras', 'ai_edge_litert', 'numpy', 'PIL')}));"
             "print(edgetl_runner.__file__)")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found, where = done.stdout.splitlines()
    assert json.loads(found) == {"tensorflow": False, "edgetl": False, "tf_keras": False,
                                 "ai_edge_litert": True, "numpy": True, "PIL": True}
    # the installed module is this checkout's runner (the cache key follows its bytes)
    assert Path(where).read_bytes() == (DEVICES / "edgetl_runner.py").read_bytes()

    # Google's uint8 MobileNet v1 with edgetl metadata (labels, preprocessing), and two photos
    model = tmp_path / "mnv1.tflite"
    labels = runner.read_labels_file(coral / "imagenet_labels.txt")
    meta = {"name": "mobilenet-v1-025", "mode": "uint8",
            "input": {"height": 128, "width": 128, "mean": [128.0] * 3, "std": [128.0] * 3}}
    model.write_bytes(runner.attach_metadata(
        (coral / "mobilenet_v1_0.25_128_quant.tflite").read_bytes(), meta, labels))
    photos = tmp_path / "photos"
    for photo, label in {"bird.bmp": "chickadee", "cat.bmp": "Egyptian cat"}.items():
        (photos / label).mkdir(parents=True)
        shutil.copy(coral / photo, photos / label / photo)

    version = subprocess.run([str(python), str(script), "--version"], capture_output=True,
                             text=True, env=env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"edgetl-runner {edgetl.__version__} (report format 1)"

    report_path = tmp_path / "report.json"
    done = subprocess.run([str(python), str(script), str(model), "--data", str(photos),
                           "--runs", "3", "--warmup", "1", "--json", str(report_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "edgetl runner" in done.stdout and "latency" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["interpreter"]["name"] == "ai_edge_litert"
    assert report["labels"]["source"] == "edgetl metadata"
    assert report["accuracy"]["top1"] == 1.0  # chickadee and Egyptian cat
    assert report["runs"] == 3 and len(report["latency_ms"]["runs_ms"]) == 3

    # bad input is the runner's one line and exit 2, from the console script too
    bad = subprocess.run([str(python), str(script), str(tmp_path / "missing.tflite")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr
