"""Feature caching for frozen layers (edgetl/cache.py): the cached path trains the same weights
as the uncached one, saves the full model, and is off where it would not be exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config


def _run(cfg):
    from edgetl.train import train

    result = train(cfg)
    return Path(result.run_dir)


def _weights(run: Path, prefix=("head_",)) -> dict:
    from edgetl.train import load_model

    model = load_model(run / "model.keras")
    return {w.name: w.numpy() for layer in model.layers if layer.name.startswith(prefix)
            for w in layer.weights}


def _log(capfd) -> str:
    return capfd.readouterr().err


def _same(a: dict, b: dict, n: int) -> None:
    assert a.keys() == b.keys() and len(a) == n, (sorted(a), sorted(b))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def _initial_head(synth, tmp_path, kw) -> np.ndarray:
    from edgetl.train import build_model

    model, _, _ = build_model(tiny_config(synth, tmp_path / "x", **kw), 3, (32, 32))
    return model.get_layer("head_predictions").kernel.numpy()


def test_feature_extract_cached_in_memory_or_on_disk_trains_the_uncached_head(
        synth, tmp_path, capfd, monkeypatch):
    from edgetl import cache
    from edgetl.train import load_model

    # Frozen random base (--weights none with an explicit frozen strategy), no augmentation;
    # dropout 0: the head's Dropout would draw other masks in the smaller graph.
    kw = dict(strategy="feature-extract", epochs=3, seed=5, dropout=0.0, head="dense:8",
              quiet=False)
    cached = _run(tiny_config(synth, tmp_path / "cached", **kw))
    log = _log(capfd)
    assert "feature cache: on (the output of 'head_pool'" in log and "in memory" in log
    plain = _run(tiny_config(synth, tmp_path / "plain", cache=False, **kw))
    assert "feature cache: off (--no-cache)" in _log(capfd)
    monkeypatch.setattr(cache, "CACHE_MEMORY_BYTES", 1000)
    monkeypatch.setattr(cache, "DISK_MARGIN_BYTES", 0)
    disk = _run(tiny_config(synth, tmp_path / "disk", **kw))
    assert f"on disk in '{disk / cache.CACHE_DIR}'" in _log(capfd)

    a = _weights(cached)
    _same(a, _weights(plain), 4)  # dense8 and predictions: kernel, bias
    _same(a, _weights(disk), 4)
    # The head did train (the comparison is not between two untouched heads).
    assert not np.allclose(a["head_predictions/kernel:0"], _initial_head(synth, tmp_path, kw))
    # Nothing left behind (the disk cache included); the saved model is the full graph.
    for run in (cached, disk):
        assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    full = load_model(cached / "model.keras")
    assert full.input_shape == (None, 32, 32, 3) and len(full.layers) > 100


@pytest.mark.slow
def test_two_phase_cached_trains_the_uncached_weights_in_both_phases(synth, tmp_path, capfd):
    from edgetl.train import load_model

    kw = dict(strategy="two-phase", epochs=2, fine_tune_epochs=2, unfreeze=5, seed=7,
              dropout=0.0, quiet=False)
    cached = _run(tiny_config(synth, tmp_path / "cached", **kw))
    log = _log(capfd)
    # Phase 1 caches the pooled base output; phase 2 the output below the top 5 layers.
    assert "feature cache: on (the output of 'head_pool'" in log
    assert "feature cache: on (the output of 'block_16_depthwise_relu'" in log
    plain = _run(tiny_config(synth, tmp_path / "plain", cache=False, **kw))

    def phase1(run):
        model = load_model(run / "model.keras")
        model.load_weights(str(run / "checkpoints" / "phase0-end.h5"))
        return {w.name: w.numpy() for w in model.get_layer("head_predictions").weights}

    _same(phase1(cached), phase1(plain), 2)
    # Phase 2 continues the shuffles where phase 1 left them: its last checkpoint (every
    # variable: the model's and the optimizer's) is the uncached run's.
    from edgetl.keras import tf

    def last(run):
        reader = tf.train.load_checkpoint(str(run / "checkpoints" / "p1-e002" / "ckpt"))
        values = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                  if "save_counter" not in k}
        return {k: v for k, v in values.items() if np.asarray(v).dtype.kind in "fiu"}

    a, b = last(cached), last(plain)
    _same(a, b, len(a))
    # The whole model and the optimizer's moments (what --resume reads back).
    assert len(a) > 250 and sum(k.startswith("optimizer/_variables/") for k in a) >= 4


def test_plan_stops_at_random_and_training_layers():
    """Dropout in the frozen part ends the cached prefix before it (it is random in training);
    a trainable BatchNormalization is not cached either; a frozen one is."""
    from edgetl.cache import plan
    from edgetl.keras import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(2, name="out")(x)
    model = keras.Model(inp, out)
    for layer in model.layers:
        layer.trainable = layer.name == "out"
    p = plan(model, enabled=True, augment_ops=(), qat=False, replicas=1)
    assert p.use and p.where == "'bn1'", p.reason  # stops before the Dropout
    model.get_layer("bn1").trainable = True
    p = plan(model, enabled=True, augment_ops=(), qat=False, replicas=1)
    assert p.use and p.where == "'c1'", p.reason
    for layer in model.layers:
        layer.trainable = True
    p = plan(model, enabled=True, augment_ops=(), qat=False, replicas=1)
    assert not p.use and "nothing frozen" in p.reason
    assert "QAT" in plan(model, enabled=True, augment_ops=(), qat=True, replicas=1).reason
    assert plan(model, enabled=False, augment_ops=(), qat=False, replicas=1).reason == \
        "off (--no-cache)"
    # Nothing frozen is said first: --augment none would not turn the cache on (from scratch).
    assert "nothing frozen" in plan(model, enabled=True, augment_ops=("flip",), qat=False,
                                    replicas=1).reason
    model.get_layer("c1").trainable = False
    assert "augmentation flip changes the images every epoch" in plan(
        model, enabled=True, augment_ops=("flip",), qat=False, replicas=1).reason


@pytest.mark.slow
def test_no_cache_flag_on_the_command_line_and_the_model_exports(synth, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    edgetl = [sys.executable, "-m", "edgetl.cli"]
    common = ["--data", str(synth), "--weights", "none", "--alpha", "0.35", "--input-size",
              "32", "--strategy", "feature-extract", "--epochs", "1", "--batch-size", "8"]
    off = subprocess.run(edgetl + ["train", "--out", str(tmp_path / "off"), "--no-cache",
                                   "--augment", "flip"] + common,
                         capture_output=True, text=True, env=env)
    assert off.returncode == 0, off.stderr[-2000:]
    assert "feature cache: off (--no-cache)" in off.stderr
    on = subprocess.run(edgetl + ["train", "--out", str(tmp_path / "on"), "--augment", "none"]
                        + common, capture_output=True, text=True, env=env)
    assert on.returncode == 0, on.stderr[-2000:]
    assert "feature cache: on" in on.stderr
    exp = subprocess.run(edgetl + ["export", str(tmp_path / "on"), "--int8", "--max-drop",
                                   "100"], capture_output=True, text=True, env=env)
    assert exp.returncode == 0, exp.stderr[-2000:]
    assert list((tmp_path / "on").rglob("*.tflite"))
