"""export --auto: a budget met by keeping a layer built to be sensitive in float, the refusal
path (an impossible budget keeps the best candidate and says so), the Edge TPU restriction
(integer candidates only), the calibration stability check and the flags' bad values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_config

runner = CliRunner()
OUTLIER = 1e5  # one unit stuck at this value: int8's scale (~392) rounds every feature to 0


def _export(run, *args):
    from edgetl.cli import app

    return runner.invoke(app, ["export", str(run), *map(str, args)])


def make_sensitive_run(data: Path, out: Path) -> Path:
    """A run whose model.keras is a small conv net with one layer built to be sensitive:
    'outlier' passes the 16 features through and adds a unit that is always OUTLIER, so its
    int8 range is [0, OUTLIER] and the features round to zero; 'head' ignores that unit.
    Float accuracy is that of the trained net, int8 answers one class."""
    from edgetl.export import load_batch
    from edgetl.keras import keras, tf
    from edgetl.train import train

    train(tiny_config(data, out, epochs=1, strategy="feature-extract"))  # the run's files
    cfg = json.loads((out / "config.json").read_text())
    split = json.loads((out / "split.json").read_text())
    x = load_batch([p for p, _ in split["train"]], (32, 32, 3), cfg["preprocessing"])
    y = np.array([label for _, label in split["train"]])
    k = len(cfg["class_names"])
    tf.random.set_seed(0)
    inp = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inp)
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    f = keras.layers.Dense(16, activation="relu", name="features")(h)
    small = keras.Model(inp, keras.layers.Dense(k, activation="softmax", name="head0")(f))
    small.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    small.fit(x, y, epochs=40, batch_size=32, verbose=0)
    o = keras.layers.Dense(17, activation="relu", name="outlier")(f)
    model = keras.Model(inp, keras.layers.Dense(k, activation="softmax", name="head")(o))
    w, b = np.zeros((16, 17), np.float32), np.zeros(17, np.float32)
    w[:, :16], b[16] = np.eye(16), OUTLIER
    model.get_layer("outlier").set_weights([w, b])
    kernel, bias = small.get_layer("head0").get_weights()
    model.get_layer("head").set_weights([np.concatenate([kernel, np.zeros((1, k))]), bias])
    model.save(out / "model.keras")
    return out
