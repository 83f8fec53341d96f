"""QAT ranges initialised from data (issue 13): a pretrained base's frozen layers do not clip.

The base is "pretrained-like": a tiny CNN trained here, then rescaled without changing its
function (ReLU is positively homogeneous: conv1 x8, conv2's bias x8, conv3's kernel / 8), so its
frozen layers' activations reach well past tfmot's initial [-6, 6], as a real ImageNet base's do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import small_trained_net

from tests.conftest import realdata

# A frozen layer's fake-quant range may clip at most this fraction of the values the
# calibration images give it (min/max ranges clip none of them).
MAX_CLIPPED = 0.001
# QAT int8 may trail PTQ int8 by at most this many points on the 100 held-out images.
TOLERANCE_POINTS = 5.0
SIZE = 48
PREP = {"name": "tf", "mean": [127.5] * 3, "std": [127.5] * 3, "channel_order": "RGB"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(train folder, held-out test folder, pretrained-like base .h5)."""
    from edgetl.data import make_synth
    from edgetl.keras import keras

    root = tmp_path_factory.mktemp("qatranges")
    make_synth(root / "train", classes=4, per_class=50, size=SIZE, seed=3)
    make_synth(root / "test", classes=4, per_class=25, size=SIZE, seed=11)
    model, x, _ = small_trained_net(root / "train", SIZE, (8, 16, 16), epochs=15)
    before = model.predict(x, verbose=0)
    k1, b1 = model.get_layer("c1").get_weights()
    model.get_layer("c1").set_weights([k1 * 8, b1 * 8])
    k2, b2 = model.get_layer("c2").get_weights()
    model.get_layer("c2").set_weights([k2, b2 * 8])
    k3, b3 = model.get_layer("c3").get_weights()
    model.get_layer("c3").set_weights([k3 / 8, b3])
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-4)
    base = root / "base.h5"
    model.save(str(base), save_format="h5")
    keras.backend.clear_session()
    return root / "train", root / "test", base


def _train(task, out, **kw):
    from edgetl.config import Strategy, TrainConfig
    from edgetl.train import train

    data, _, base = task
    cfg = TrainConfig(data=str(data), out=str(out), base_model=str(base), input_size=SIZE,
                      strategy=Strategy.two_phase, epochs=4, fine_tune_epochs=3,
                      fine_tune_lr=1e-3, batch_size=16, augment=False, quiet=True, **kw)
    return train(cfg)


def _int8_accuracy(run, test) -> tuple[float, dict]:
    from edgetl.config import ExportConfig, Quantization
    from edgetl.export import export
    from edgetl.runner import Model, evaluate, list_images

    res = export(ExportConfig(run=str(run), modes=(Quantization.int8,), max_drop=100.0))
    assert res.reports["int8"]["integer_only"]
    names = json.loads((run / "config.json").read_text())["class_names"]
    items, _, _ = list_images(str(test), names)
    meta = json.loads((run / "config.json").read_text())["preprocessing"]
    r = evaluate(Model(res.files[0]), items, dict(meta, resize="bilinear"), names, batch_size=50)
    return 100.0 * float(r["top1"]), res.reports["int8"]


def test_frozen_ranges_cover_calibration_and_qat_int8_not_below_ptq(task, tmp_path):
    from edgetl import calibrate
    from edgetl.train import QAT_CALIBRATION_IMAGES, load_model

    _, test, _ = task
    qat_run = tmp_path / "qat"
    _train(task, qat_run, qat=True, qat_scope="all")  # the scope where frozen layers carry ranges
    split = json.loads((qat_run / "split.json").read_text())
    chosen = calibrate.sample([tuple(x) for x in split["train"]], QAT_CALIBRATION_IMAGES, 0)
    images = calibrate.load_images([p for p, _ in chosen], SIZE, PREP)

    qat_model = load_model(qat_run / "qat.h5")
    stats = calibrate.observe(qat_model, images)
    frozen = [s for s in stats if s.frozen]
    assert {s.layer for s in frozen} >= {"quant_c1", "quant_c2"}
    worst = max(frozen, key=lambda s: s.clipped)
    assert worst.clipped <= MAX_CLIPPED, worst
    # The base really is wide: tfmot's own start [-6, 6] would clip those same layers.
    assert max(s.seen_high for s in frozen) > 6
    for layer in qat_model.layers:
        for w in layer.weights:
            if w.name.endswith(("output_min:0", "post_activation_min:0")):
                w.assign(np.full(w.shape, -6.0, np.float32))
            elif w.name.endswith(("output_max:0", "post_activation_max:0")):
                w.assign(np.full(w.shape, 6.0, np.float32))
    assert max(s.clipped for s in calibrate.observe(qat_model, images) if s.frozen) > MAX_CLIPPED

    float_run = tmp_path / "float"
    _train(task, float_run)
    (qat_acc, qat_report), (ptq_acc, ptq_report) = (_int8_accuracy(qat_run, test),
                                                    _int8_accuracy(float_run, test))
    assert ptq_acc > 40, ptq_acc  # the task is learnt (chance: 25 %)
    assert qat_acc >= ptq_acc - TOLERANCE_POINTS, (qat_acc, ptq_acc)
    # Export judges the QAT file against the float model from before QAT, too.
    v = qat_report["accuracy"]
    assert (qat_run / "float_before_qat.keras").is_file()
    assert 0 <= v["float_before_qat_accuracy"] <= 1
    assert v["drop_vs_float_before_qat_points"] == pytest.approx(
        (v["float_before_qat_accuracy"] - v["tflite_accuracy"]) * 100, abs=1e-3)
    assert "float_before_qat_accuracy" not in ptq_report["accuracy"]
    print(f"QAT int8 {qat_acc:.1f} vs PTQ int8 {ptq_acc:.1f} on 100 held-out images")


def test_initialisation_prints_one_line(task, tmp_path):
    """The user sees how the ranges were set (and that tfmot's start was asked for)."""
    import subprocess
    import sys

    data, _, base = task
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [str(Path(sys.executable).with_name("edgetl")), "train", "--data", str(data), "--out",
           str(tmp_path / "r"), "--base-model", str(base), "--input-size", str(SIZE),
           "--strategy", "fine-tune", "--epochs", "1", "--qat", "--no-augment",
           "--batch-size", "32"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if "QAT ranges initialised" in x]
    assert len(lines) == 1, r.stderr[-2000:]
    assert re.search(r"QAT ranges initialised from 160 training images \(\d+ activation "
                     r"ranges, min/max; frozen layers' ranges fixed\)", lines[0]), lines


@pytest.mark.slow
def test_real_pretrained_base_qat_int8_above_chance(tmp_path):
    """The shared ImageNet EfficientNet-Lite0: 1 epoch of QAT, int8 export, integer-only."""
    base = realdata("pretrained/efficientnet_lite0_imagenet_keras2.h5")
    fm = realdata("fashion-mnist")
    from edgetl.config import Strategy
    from edgetl.data import idx_to_folders

    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    idx_to_folders(str(fm / "train-images-idx3-ubyte.gz"), str(fm / "train-labels-idx1-ubyte.gz"),
                   train_dir, limit=20)
    idx_to_folders(str(fm / "t10k-images-idx3-ubyte.gz"), str(fm / "t10k-labels-idx1-ubyte.gz"),
                   test_dir, limit=10)
    from edgetl.config import TrainConfig
    from edgetl.train import train

    run = tmp_path / "run"
    train(TrainConfig(data=str(train_dir), out=str(run), base_model=str(base), input_size=64,
                      strategy=Strategy.fine_tune, epochs=1, fine_tune_lr=1e-4, batch_size=16,
                      qat=True, quiet=True))
    acc, _ = _int8_accuracy(run, test_dir)
    assert acc > 20, acc  # 10 classes: chance is 10 %


# --- EfficientNet-Lite in the registry -----------------------------------------------------------

# Parameters of the 1000-class models, in millions, from Google's EfficientNet-Lite README.
LITE_PARAMS_M = {0: 4.7, 1: 5.4, 2: 6.1, 3: 8.2, 4: 13.0}


def test_efficientnet_lite_sizes_match_the_published_models():
    from edgetl.backbones import efficientnet_lite, get_backbone

    for i, params in LITE_PARAMS_M.items():
        spec = get_backbone(f"efficientnet-lite{i}")
        assert spec.qat and spec.preprocessing == "tf"
        model = efficientnet_lite(i, input_shape=(32, 32, 3), include_top=True)
        assert abs(model.count_params() / 1e6 - params) < 0.15, (i, model.count_params())
        names = {layer.name for layer in model.layers}
        assert not any("se_" in n or "swish" in n for n in names)  # no squeeze-excite
        assert {"stem_conv", "block1a_dwconv", "top_activation", "predictions"} <= names


def test_efficientnet_lite_imagenet_says_where_weights_come_from(synth, tmp_path):
    from edgetl.config import TrainConfig
    from edgetl.errors import EdgetlError
    from edgetl.train import train

    out = tmp_path / "run"
    with pytest.raises(EdgetlError) as e:
        train(TrainConfig(data=str(synth), out=str(out), backbone="efficientnetlite2",
                          quiet=True))  # --weights imagenet is the default
    text = str(e.value)
    assert "--weights imagenet for efficientnetlite2" in text
    assert "github.com/tensorflow/tpu" in text and "--weights PATH" in text
    assert "--weights none" in text and "\n" not in text
    assert not out.exists()


def test_efficientnet_lite0_loads_the_shared_imagenet_file_by_name():
    """Built natively, Lite0 takes the real ImageNet file as --weights PATH, layer for layer."""
    path = realdata("pretrained/efficientnet_lite0_imagenet_keras2.h5")
    coral = realdata("coral")
    from edgetl import calibrate
    from edgetl.backbones import efficientnet_lite, get_backbone, preprocessing
    from edgetl.config import TrainConfig
    from edgetl.keras import keras
    from edgetl.train import build_base

    ref = keras.models.load_model(str(path), compile=False)
    native = efficientnet_lite(0, input_shape=(224, 224, 3), include_top=True, weights=str(path))
    assert [x.name for x in native.layers[1:]] == [x.name for x in ref.layers[1:]]
    photos = [str(coral / f"{n}.bmp") for n in ("cat", "bird", "grace_hopper")]
    x = calibrate.load_images(photos, 224, preprocessing(get_backbone("efficientnetlite0")))
    np.testing.assert_allclose(native.predict(x, verbose=0), ref.predict(x, verbose=0),
                               atol=1e-5)
    assert list(native.predict(x, verbose=0).argmax(-1)) == [285, 19, 652]  # cat, chickadee, uniform
    # The user's path: --backbone efficientnetlite0 --weights PATH (the top is not needed).
    base, spec = build_base(TrainConfig(data=".", backbone="efficientnetlite0",
                                        weights=str(path)), 96)
    assert spec.name == "efficientnetlite0" and base.output.shape[-1] == 1280
    cut = keras.Model(ref.input, ref.get_layer("top_activation").output)
    x96 = calibrate.load_images(photos, 96, preprocessing(spec))
    np.testing.assert_allclose(base.predict(x96, verbose=0), cut.predict(x96, verbose=0),
                               atol=1e-4)


def test_efficientnet_lite_weights_that_do_not_fit_are_refused(tmp_path):
    from edgetl.backbones import efficientnet_lite
    from edgetl.errors import EdgetlError

    for variant in (1, 2):  # deeper with the same widths; wider
        other = tmp_path / f"lite{variant}.h5"
        efficientnet_lite(variant, input_shape=(32, 32, 3)).save_weights(str(other))
        with pytest.raises(EdgetlError, match="does not fit efficientnet_lite0"):
            efficientnet_lite(0, input_shape=(32, 32, 3), weights=str(other))


def test_qat_from_scratch_learns(learnable, tmp_path):
    """From scratch (--weights none) every quantized layer trains from random weights: their
    activations are tiny (about 1e-6 deep in the net), and ranges fitted to them clipped every
    later activation to a constant, so the run stayed at chance (loss ln 4, the demo's case).
    Only frozen layers' ranges come from data there; the run must learn."""
    from conftest import tiny_config
    from edgetl.train import train

    result = train(tiny_config(learnable, tmp_path / "run", input_size=48, epochs=6,
                               batch_size=16, qat=True, qat_scope="all", quiet=True))
    assert result.val_accuracy >= 0.5, result.val_accuracy  # chance is 0.25
    # QAT in the first phase: no trained float model to compare the int8 file with
    assert not (tmp_path / "run" / "float_before_qat.keras").exists()
