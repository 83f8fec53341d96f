"""Shared fixtures: generated datasets, tiny training runs, and the real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Keras 2 for everything, whichever test imports TensorFlow first.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def realdata(sub: str = "") -> Path:
    """Path into ../shared/realdata; skips when absent, except in CI where it must be there."""
    path = REALDATA / sub
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{path} is missing in CI: the real-data tests must run there")
        pytest.skip(f"{path} not found (real third-party data lives in ../shared/realdata)")
    return path


def coral(name: str) -> Path:
    """A file of the real Coral data (Google's models, labels, photos): skip when missing, fail
    in CI."""
    return realdata(f"coral/{name}")


TINY = dict(backbone="mobilenetv2", alpha=0.35, input_size=32, weights="none", batch_size=8,
            augment=False, quiet=True)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """3 classes x 12 generated 32 px images."""
    from edgetl.data import make_synth

    out = tmp_path_factory.mktemp("synth") / "data"
    make_synth(out, classes=3, per_class=12, size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def learnable(tmp_path_factory) -> Path:
    """4 classes x 60 generated 48 px images: enough for a tiny model to learn."""
    from edgetl.data import make_synth

    out = tmp_path_factory.mktemp("learnable") / "data"
    make_synth(out, classes=4, per_class=60, size=48, seed=3)
    return out


def tiny_config(data, out, **kw):
    from edgetl.config import TrainConfig

    return TrainConfig(data=str(data), out=str(out), **{**TINY, **kw})


def pytest_terminal_summary(terminalreporter):
    """Prints the size of the bad-input catalogue (tests/test_bad_inputs.py) and its result."""
    reports = [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])
               if getattr(r, "when", "") == "call"
               and "test_bad_inputs.py::test_catalogue[" in r.nodeid]
    if reports:
        failed = sum(r.failed for r in reports)
        terminalreporter.write_line(f"bad-input catalogue: {len(reports)} cases, "
                                    f"{len(reports) - failed} passed, {failed} failed")


def small_trained_net(data: Path, size: int, filters: tuple, epochs: int):
    """A small conv net (strided 3x3 convs named c1, c2, ..., then pool, pred) trained on the
    class folders in ``data``: a stand-in for a pretrained base, which cannot be downloaded here.

    Returns ``(model, x, y)``: the tf_keras model and the images (pixels scaled to -1..1) and
    class indices it was fitted on.
    """
    import numpy as np

    from edgetl import calibrate
    from edgetl.data import scan_folder
    from edgetl.keras import keras, tf

    tf.keras.utils.set_random_seed(0)
    items = scan_folder(data, (size, size)).items
    prep = {"name": "tf", "mean": [127.5] * 3, "std": [127.5] * 3, "channel_order": "RGB"}
    x = calibrate.load_images([p for p, _ in items], size, prep)
    y = np.asarray([c for _, c in items])
    inp = h = keras.Input((size, size, 3))
    for i, f in enumerate(filters, 1):
        h = keras.layers.Conv2D(f, 3, strides=2 if i <= 2 else 1, activation="relu",
                                name=f"c{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(int(y.max()) + 1, activation="softmax", name="pred")(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    return model, x, y
