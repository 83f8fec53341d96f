"""Untrusted model files: loading one never runs code from it unless --unsafe is given.

Each crafted file carries code that would write a marker file: a Lambda layer whose function
writes it (in .h5, .keras and SavedModel form), and a class whose module writes it when Keras
imports it ("custom objects"). Every path that loads a user's model is tried: ``edgetl train
--base-model`` and ``edgetl export`` of a run directory received from someone else (its
model.keras or qat.h5). Without --unsafe the command exits 2 with one line naming the layer and
the marker is never written; with --unsafe the same file does write it, which proves the files
really carry code. tests/test_basemodel.py checks the loader's messages in detail.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config

cli = CliRunner()
TINY = ["--alpha", "0.35", "--input-size", "32", "--weights", "none", "--batch-size", "8",
        "--epochs", "1", "--no-augment", "--quiet"]
MARKER_MODULE = "edgetl_marker_module"


def _marker_lambda(marker: Path):
    # eval keeps the marker path inside the function's code, which Keras marshals into the file
    return eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")  # noqa: S307


def _lambda_model(marker: Path, outputs: int | None = None):
    """Input 32x32x3 -> Lambda(writes marker) -> Conv2D [-> GAP -> Dense softmax]."""
    from edgetl.keras import keras

    inp = keras.Input((32, 32, 3), name="image")
    y = keras.layers.Lambda(_marker_lambda(marker), name="sneaky")(inp)
    y = keras.layers.Conv2D(4, 3, name="conv")(y)
    if outputs:
        y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
        y = keras.layers.Dense(outputs, activation="softmax", name="head_predictions")(y)
    return keras.Model(inp, y)


def _save(model, path: Path, marker: Path, **kw) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path), **kw)
    marker.unlink(missing_ok=True)  # building and saving ran the function; start clean
    return path


def _custom_module_keras(path: Path, marker: Path, module_dir: Path) -> Path:
    """A .keras whose model class lives in a module that writes the marker when imported."""
    from edgetl.keras import keras

    module_dir.mkdir(exist_ok=True)
    (module_dir / f"{MARKER_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from tf_keras.src.engine.functional import Functional as Boom\n")
    inp = keras.Input((32, 32, 3))
    plain = path.with_name("plain.keras")
    keras.Model(inp, keras.layers.Conv2D(4, 3, name="conv")(inp)).save(str(plain))
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config.update(module=MARKER_MODULE, class_name="Boom", registered_name="Boom")
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    return path


def _train(data: Path, out: Path, *extra):
    from edgetl.cli import app

    return cli.invoke(app, ["train", "--data", str(data), "--out", str(out), *TINY,
                            *map(str, extra)])


def _refused(result, needle: str, marker: Path) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0] and "--unsafe" in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not marker.exists(), "the file's code ran without --unsafe"


# --- --base-model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["h5", "keras", "savedmodel"])
def test_base_model_lambda_runs_nothing_without_unsafe(fmt, synth, tmp_path):
    from edgetl.basemodel import load_base_model

    marker = tmp_path / "marker.txt"
    path = tmp_path / {"h5": "model.h5", "keras": "model.keras", "savedmodel": "sm"}[fmt]
    _save(_lambda_model(marker), path, marker, **({"save_format": "tf"}
                                                   if fmt == "savedmodel" else {}))
    result = _train(synth, tmp_path / "run", "--base-model", path)
    _refused(result, "Lambda layer", marker)
    assert not (tmp_path / "run").exists()

    if fmt == "savedmodel":  # the SavedModel revives the traced graph, not the Python code
        return
    load_base_model(str(path), None, True, 32)  # --unsafe: the same file runs its code
    assert marker.read_text() == "ran"


def test_base_model_custom_object_module_is_never_imported_without_unsafe(synth, tmp_path,
                                                                           monkeypatch):
    import sys

    from edgetl.basemodel import load_base_model

    marker, modules = tmp_path / "marker.txt", tmp_path / "site"
    path = _custom_module_keras(tmp_path / "custom.keras", marker, modules)
    monkeypatch.syspath_prepend(str(modules))  # as if the module were installed
    monkeypatch.delitem(sys.modules, MARKER_MODULE, raising=False)
    result = _train(synth, tmp_path / "run", "--base-model", path)
    _refused(result, f"from module '{MARKER_MODULE}'", marker)
    assert MARKER_MODULE not in sys.modules

    load_base_model(str(path), None, True, 32)  # --unsafe: Keras imports the module
    assert marker.read_text() == "imported"


# --- a run directory from someone else -------------------------------------------------------------

@pytest.fixture(scope="module")
def stranger_run(synth, tmp_path_factory) -> Path:
    """A genuine tiny run (3 classes) to tamper with."""
    from edgetl.train import train

    run = tmp_path_factory.mktemp("stranger") / "run"
    train(tiny_config(synth, run, epochs=1))
    return run


def _tampered(stranger_run: Path, tmp_path: Path, file: str) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(stranger_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    marker = tmp_path / "marker.txt"
    _save(_lambda_model(marker, outputs=3), run / file, marker,
          **({"save_format": "h5"} if file.endswith(".h5") else {}))
    return run, marker


@pytest.mark.parametrize("file", ["model.keras", "qat.h5"])
def test_export_of_a_strangers_run_runs_nothing_without_unsafe(file, stranger_run, tmp_path):
    from edgetl.cli import app
    from edgetl.train import load_model

    run, marker = _tampered(stranger_run, tmp_path, file)
    result = cli.invoke(app, ["export", str(run), "--int8", "--num-calibration", "12"])
    _refused(result, "has a Lambda layer 'sneaky'", marker)
    assert not (run / "export").exists()

    load_model(run / file, unsafe=True)  # what `edgetl export --unsafe` does
    assert marker.read_text() == "ran"


def test_export_unsafe_flag_reaches_the_loader(stranger_run, tmp_path, monkeypatch):
    """`edgetl export --unsafe` passes the permission on (and only it does)."""
    import edgetl.train as train_mod
    from edgetl.cli import app

    seen = []

    def fake_load(path, unsafe=False):
        seen.append(unsafe)
        raise train_mod.EdgetlError("stop here")

    monkeypatch.setattr(train_mod, "load_model", fake_load)
    run = tmp_path / "run"
    shutil.copytree(stranger_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    for flags in ([], ["--unsafe"]):
        result = cli.invoke(app, ["export", str(run), "--int8", "--num-calibration", "12",
                                  *flags])
        assert result.exit_code == 2 and "stop here" in result.stderr
    assert seen == [False, True]


def test_genuine_runs_need_no_unsafe(stranger_run):
    """The safety check passes edgetl's own float and QAT files (tfmot's classes are code
    edgetl installs, not code from the file)."""
    from edgetl.basemodel import code_in_model_file

    assert code_in_model_file(str(stranger_run / "model.keras")) is None
