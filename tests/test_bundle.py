"""edgetl.bundle: a folder or tarball that runs on a device with nothing but the runner's deps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgetl import bundle as Bu
from edgetl import runner
from edgetl.errors import EdgetlError
from conftest import coral

V1 = "mobilenet_v1_0.25_128_quant.tflite"



@pytest.fixture(scope="module")
def edgetl_model(tmp_path_factory) -> Path:
    """Google's uint8 MobileNet with edgetl metadata attached, plus an export sidecar."""
    d = tmp_path_factory.mktemp("export")
    labels = runner.read_labels_file(coral("imagenet_labels.txt"))
    meta = {
        "name": "mobilenet-v1-025",
        "mode": "uint8",
        # (pixel - 128) / 128 is exactly the model's input quantization: the uint8 tensor gets
        # the raw pixel, as Coral feeds it.
        "input": {"height": 128, "width": 128, "mean": [128.0] * 3, "std": [128.0] * 3},
    }
    model = d / "mnv1.tflite"
    model.write_bytes(runner.attach_metadata(coral(V1).read_bytes(), meta, labels))
    (d / "mnv1.json").write_text(json.dumps({"file": "mnv1.tflite", "mode": "uint8"}))
    return model


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for photo, label in {"bird.bmp": "chickadee", "cat.bmp": "Egyptian cat"}.items():
        (root / label).mkdir()
        shutil.copy(coral(photo), root / label / photo)
    return root


def run_bundled(folder: Path, model: str, *args: str) -> dict:
    """Run the bundle's own runner copy, from inside the bundle, and return its JSON report."""
    out = folder.parent / f"{folder.name}-report.json"
    cmd = [sys.executable, "edgetl_runner.py", model, "--runs", "2", "--warmup", "0"]
    proc = subprocess.run(
        cmd + ["--json", str(out), *args], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "edgetl runner" in proc.stdout and "latency" in proc.stdout
    return json.loads(out.read_text())


def test_bundle_folder_has_everything_and_runs(tmp_path, edgetl_model, photos):
    out = Bu.bundle(edgetl_model, tmp_path / "pi")
    assert out == tmp_path / "pi"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["edgetl_runner.py", "mnv1.tflite", "mnv1.json", "labels.txt", "requirements.txt",
         "pyproject.toml", "run.sh", "README.txt"]
    )
    assert (out / "edgetl_runner.py").read_bytes() == Path(runner.__file__).resolve().read_bytes()
    assert (out / "mnv1.tflite").read_bytes() == edgetl_model.read_bytes()
    labels = (out / "labels.txt").read_text().splitlines()
    assert len(labels) == 1001 and labels[0] == "background"
    reqs = (out / "requirements.txt").read_text()
    assert [ln for ln in reqs.splitlines() if not ln.startswith("#")] == [
        "numpy", "pillow", "ai-edge-litert"
    ]
    assert "tflite-runtime" in reqs and "32-bit" in reqs
    run_sh = (out / "run.sh").read_text()
    assert run_sh.startswith("#!/bin/sh\n")
    assert "--system-site-packages" in run_sh
    assert 'pip install -r "$HERE/requirements.txt"' in run_sh
    assert 'exec "$PY" "$HERE/edgetl_runner.py" "$HERE/"mnv1.tflite "$@"' in run_sh
    assert os.access(out / "run.sh", os.X_OK) and os.access(out / "edgetl_runner.py", os.X_OK)
    subprocess.run(["sh", "-n", str(out / "run.sh")], check=True)
    assert "./run.sh --delegate edgetpu" in (out / "README.txt").read_text()

    report = run_bundled(out, "mnv1.tflite", "--data", str(photos))
    assert report["model"]["path"] == str(out / "mnv1.tflite")
    assert report["model"]["name"] == "mobilenet-v1-025"
    assert report["labels"]["source"] == "edgetl metadata"
    assert report["accuracy"]["top1"] == 1.0  # chickadee and Egyptian cat, from its own labels


def test_run_sh_uses_an_existing_venv(tmp_path, edgetl_model):
    out = Bu.bundle(edgetl_model, tmp_path / "b")
    (out / ".venv" / "bin").mkdir(parents=True)
    # A ready .venv stands in for the one run.sh would create on the device (a wrapper script:
    # a bare symlink to this venv's python would lose its site-packages).
    py = out / ".venv" / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    # Run from another folder: relative arguments are the caller's, the bundle finds its files.
    proc = subprocess.run(
        ["sh", str(out / "run.sh"), "--runs", "1", "--warmup", "0", "--json", "r.json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mnv1.tflite" in proc.stdout and "throughput" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["path"] == str(out / "mnv1.tflite")


def test_bundle_tarball_is_reproducible_and_runs(tmp_path, edgetl_model):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Bu.bundle(edgetl_model, tmp_path / "a" / "pi.tar.gz")
    second = Bu.bundle(edgetl_model, tmp_path / "b" / "pi.tar.gz")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1]
    with tarfile.open(first) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["pi"] + sorted(
            f"pi/{n}" for n in ("edgetl_runner.py", "mnv1.tflite", "mnv1.json", "labels.txt",
                                "requirements.txt", "pyproject.toml", "run.sh", "README.txt")
        )
        assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}
        modes = {m.name: m.mode for m in members}
        assert modes["pi/run.sh"] == 0o755 and modes["pi/mnv1.tflite"] == 0o644
        tar.extractall(tmp_path / "x", filter="data")
    report = run_bundled(tmp_path / "x" / "pi", "mnv1.tflite")
    assert report["model"]["size_bytes"] == edgetl_model.stat().st_size


def test_third_party_model_without_metadata_has_no_labels_file(tmp_path):
    out = Bu.bundle(coral(V1), tmp_path / "coral.tgz")
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "coral/labels.txt" not in names and f"coral/{V1}" in names
    assert not any(n.endswith(".json") for n in names)


def test_existing_output_is_refused_unless_overwrite(tmp_path, edgetl_model):
    target = tmp_path / "pi"
    Bu.bundle(edgetl_model, target)
    (target / "stale.txt").write_text("from an older bundle")
    with pytest.raises(EdgetlError, match=r"already exists; pass --overwrite"):
        Bu.bundle(edgetl_model, target)
    assert (target / "stale.txt").exists()
    Bu.bundle(edgetl_model, target, overwrite=True)
    assert not (target / "stale.txt").exists() and (target / "run.sh").is_file()
    tgz = tmp_path / "pi.tar.gz"
    Bu.bundle(edgetl_model, tgz)
    with pytest.raises(EdgetlError, match="already exists"):
        Bu.bundle(edgetl_model, tgz)
    Bu.bundle(edgetl_model, tgz, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pi", "pi.tar.gz"]  # no temp leftovers


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(EdgetlError, match="model file not found"):
        Bu.bundle(tmp_path / "missing.tflite", tmp_path / "out")
    with pytest.raises(EdgetlError) as e:
        Bu.bundle(coral("cat.bmp"), tmp_path / "out")
    assert "cat.bmp" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EdgetlError, match="does not exist"):
        Bu.bundle(coral(V1), tmp_path / "no" / "such" / "out")
    assert not (tmp_path / "out").exists()
