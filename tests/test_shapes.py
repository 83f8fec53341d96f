"""Any channel count and shape: greyscale (1-channel) models and data, non-square H x W inputs,
end to end through train -> int8 export -> verification through the runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgetl.config import TrainConfig, input_hw, parse_input_size
from edgetl.errors import EdgetlError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, expected", [
    (96, (96, 96)), ("96", (96, 96)), ("160x120", (160, 120)), ("160X120", (160, 120)),
    (" 48 x 32 ", (48, 32)), ([48, 32], (48, 32)), (None, None),
])
def test_parse_input_size_is_height_by_width(value, expected):
    assert input_hw(value) == expected
    if value is not None:  # one parser: N stays an int, HxW becomes (h, w)
        assert parse_input_size(value) == (expected[0] if expected[0] == expected[1]
                                           else expected)


@pytest.mark.parametrize("value, message", [
    ("abc", r"--input-size 'abc' is not a size: give N \(square\) or HxW, height x width"),
    ("160x", r"--input-size '160x' is not a size"), ("1x2x3", r"give N"), ("-5", r"give N"),
    ("2000x100", r"--input-size 2000x100 is too large \(maximum 1024"),
    (8, r"--input-size 8 is too small \(minimum 16\)"),
    ("200x10", r"--input-size 200x10 is too small \(minimum 16\)"),
])
def test_bad_input_sizes_are_refused(value, message):
    with pytest.raises(EdgetlError, match=message):
        parse_input_size(value)


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "edgetl.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("flags, message", [
    (["--input-size", "160x"], "error: --input-size '160x' is not a size: give N (square) or HxW"),
    (["--channels", "2"], "error: --channels 2: use 1 (greyscale) or 3 (colour)"),
    (["--mean", "1,2"], "error: --mean 1.0 2.0: give 1 or 3 finite numbers"),
    (["--mean", "a,b"], "error: --mean 'a,b' is not a number list"),
    (["--std", "0"], "error: --std 0.0: every std must be > 0"),
    (["--channels", "1", "--backbone", "mobilenetv2", "--alpha", "0.35", "--input-size", "96"],
     "error: --channels 1: mobilenetv2 with --weights imagenet takes 3-channel images; drop "
     "--channels (greyscale images are converted to RGB and train well), or pass --weights none"),
])
def test_bad_shape_and_preprocessing_flags_are_one_line(synth, tmp_path, flags, message):
    proc = _cli("train", "--data", synth, "--out", tmp_path / "run", *flags, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (tmp_path / "run").exists()


def test_load_pixels_grey_stays_grey_colour_is_converted(tmp_path):
    from PIL import Image

    from edgetl.data import load_pixels

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    colour = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(colour).save(tmp_path / "c.png")
    np.testing.assert_array_equal(load_pixels(tmp_path / "g.png", (20, 30), 1)[..., 0], grey)
    np.testing.assert_array_equal(load_pixels(tmp_path / "c.png", (20, 30), 1)[..., 0],
                                  np.asarray(Image.fromarray(colour).convert("L")))
    assert load_pixels(tmp_path / "g.png", (20, 30), 3).shape == (20, 30, 3)
    assert load_pixels(tmp_path / "c.png", (12, 8), 1).shape == (12, 8, 1)  # height x width


def _runner_report(tflite: Path, data: Path):
    """The device runner's CLI on a labelled folder."""
    from edgetl import runner

    return runner.run([str(tflite), "--data", str(data)])


def _export_and_check(run: Path, height: int, width: int, channels: int):
    from edgetl.config import ExportConfig
    from edgetl.export import export
    from edgetl.runner import Model, read_metadata

    result = export(ExportConfig(run=str(run), num_calibration=24, max_drop=100))
    tflite = Path(result.files[0])
    report = result.reports["int8"]
    assert report["integer_only"] and report["passed"]
    # verified through the runner's Model on the validation split, beside the Keras model
    assert report["accuracy"]["top1_agreement"] >= 0.9, report["accuracy"]
    meta = read_metadata(tflite)
    assert (meta["input"]["height"], meta["input"]["width"], meta["input"]["channels"]) == \
        (height, width, channels)
    assert meta["input"]["color"] == ("GRAYSCALE" if channels == 1 else "RGB")
    assert len(meta["input"]["mean"]) == channels == len(meta["input"]["std"])
    assert Model(str(tflite)).input.shape == [1, height, width, channels]
    manifest = json.loads(Path(result.manifest).read_text())
    assert manifest["input_shape"] == [height, width, channels]
    # The device's own decode (grey conversion, resize) and preprocessing from the metadata give
    # the accuracy export measured: training, calibration and the device see the same pixels.
    from edgetl.runner import evaluate

    device = Model(str(tflite))
    val = [tuple(x) for x in json.loads((run / "split.json").read_text())["val"]]
    on_device = evaluate(device, val, device.default_prep(), meta["labels"])
    assert on_device["top1"] == pytest.approx(report["accuracy"]["tflite_accuracy"])
    return tflite, report


@pytest.fixture(scope="module")
def grey_data(tmp_path_factory):
    """The synth set saved as greyscale PNGs (mode L)."""
    from PIL import Image

    from edgetl.data import make_synth

    root = tmp_path_factory.mktemp("grey")
    make_synth(root / "colour", classes=3, per_class=24, size=32, seed=2)
    for p in (root / "colour").rglob("*.png"):
        dst = root / "data" / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("L").save(dst)
    return root / "data"


def _images(folder: Path, mode: str) -> tuple:
    """(pixels as float32 N x H x W x C, labels) of a class folder, decoded with Pillow."""
    from PIL import Image

    xs, ys = [], []
    for i, c in enumerate(sorted(p.name for p in folder.iterdir())):
        for p in sorted((folder / c).glob("*.png")):
            a = np.asarray(Image.open(p).convert(mode), np.float32)
            xs.append(a[..., None] if a.ndim == 2 else a)
            ys.append(i)
    return np.stack(xs), np.array(ys)


def test_grey_keras2_base_model_train_export_verify(grey_data, tmp_path):
    from edgetl.keras import keras
    from edgetl.train import train

    # The user's grey model, trained on raw grey pixels (so its features are worth having).
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((32, 32, 1))
    x = L.Rescaling(1 / 255.0)(inp)
    for f in (8, 16):
        x = L.MaxPooling2D()(L.ReLU()(L.BatchNormalization()(L.Conv2D(f, 3, padding="same")(x))))
    y = L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, y)
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(*_images(grey_data, "L"), epochs=20, batch_size=16, verbose=0)
    base = tmp_path / "grey.h5"
    model.save(base)

    run = tmp_path / "run"
    result = train(TrainConfig(data=str(grey_data), base_model=str(base), epochs=3, lr=0.01,
                               augment=True, batch_size=8, out=str(run), quiet=True))
    config = json.loads((run / "config.json").read_text())
    assert config["input_shape"] == [32, 32, 1] and config["input_size"] == 32
    assert config["preprocessing"]["name"] == "raw" and config["preprocessing"]["mean"] == [0.0]
    assert result.val_accuracy >= 0  # ran; the accuracy parity is checked at export
    tflite, _ = _export_and_check(run, 32, 32, 1)
    report = _runner_report(tflite, grey_data)
    assert report["accuracy"]["evaluated"] == 72


def test_grey_base_model_refuses_other_channels(grey_data, tmp_path):
    from edgetl.keras import keras
    from edgetl.train import train

    inp = keras.Input((32, 32, 1))
    y = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))
    base = tmp_path / "grey.keras"
    keras.Model(inp, keras.layers.Dense(2)(y)).save(base)
    with pytest.raises(EdgetlError, match=r"--channels 3: --base-model '.*grey.keras' takes "
                                          r"1-channel images; drop --channels"):
        train(TrainConfig(data=str(grey_data), base_model=str(base), channels=3, epochs=1,
                          out=str(tmp_path / "run"), quiet=True))
    assert not (tmp_path / "run").exists()
    inp = keras.Input((32, 32, 4))
    y = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))
    rgba = tmp_path / "rgba.keras"
    keras.Model(inp, keras.layers.Dense(2)(y)).save(rgba)
    with pytest.raises(EdgetlError, match=r"takes 4-channel images: edgetl feeds greyscale \(1 "
                                          r"channel\) or RGB \(3 channels\)"):
        train(TrainConfig(data=str(grey_data), base_model=str(rgba), epochs=1,
                          out=str(tmp_path / "run"), quiet=True))


KERAS3_NON_SQUARE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import keras
    import numpy as np
    from PIL import Image

    out, data = sys.argv[1], Path(sys.argv[2])
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((48, 32, 3))  # height 48, width 32
    x = keras.applications.mobilenet_v2.preprocess_input(inp)
    x = L.RandomFlip(data_format="channels_last")(x)
    for f in (8, 16):
        x = L.Conv2D(f, 3, padding="same", activation="hard_silu")(x)
        x = L.MaxPooling2D()(L.BatchNormalization()(x))
    y = L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, y)
    xs, ys = [], []  # trained on the data resized to 32 wide x 48 high, raw pixels
    for i, c in enumerate(sorted(p.name for p in data.iterdir())):
        for p in sorted((data / c).glob("*.png")):
            img = Image.open(p).convert("RGB").resize((32, 48), Image.BILINEAR)
            xs.append(np.asarray(img, np.float32))
            ys.append(i)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(np.stack(xs), np.array(ys), epochs=30, batch_size=16, verbose=0)
    model.save(f"{out}/tall.keras")
""")


@pytest.fixture(scope="module")
def tall_data(tmp_path_factory) -> Path:
    from edgetl.data import make_synth

    out = tmp_path_factory.mktemp("talldata") / "data"
    make_synth(out, classes=3, per_class=30, size=32, seed=4)
    return out


@pytest.fixture(scope="module")
def k3_tall(tmp_path_factory, tall_data) -> Path:
    out = tmp_path_factory.mktemp("k3tall")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "-c", KERAS3_NON_SQUARE, str(out), str(tall_data)],
                          env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tall.keras"


def test_non_square_keras3_base_model_train_export_verify(k3_tall, tall_data, tmp_path):
    from edgetl.train import train

    run = tmp_path / "run"
    train(TrainConfig(data=str(tall_data), base_model=str(k3_tall), epochs=5, lr=0.01,
                      augment=False, batch_size=8, out=str(run), quiet=True))
    config = json.loads((run / "config.json").read_text())
    # no --input-size: the model's fixed 48 x 32 (height x width)
    assert config["input_size"] == [48, 32] and config["input_shape"] == [48, 32, 3]
    assert config["preprocessing"]["name"] == "raw"  # preprocess_input inside
    tflite, export_report = _export_and_check(run, 48, 32, 3)
    report = _runner_report(tflite, tall_data)
    assert report["accuracy"]["evaluated"] == 90


def test_fixed_non_square_size_mismatch_names_the_right_flag(k3_tall, synth, tmp_path):
    proc = _cli("train", "--data", synth, "--base-model", k3_tall, "--input-size", "32",
                "--out", tmp_path / "run")
    assert proc.returncode == 2
    # progress lines (the settings line) may come first; the error is one line, the last
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = lines[-1]
    assert errors == [line] and line.startswith("error: --base-model")
    assert "Traceback" not in proc.stderr
    assert "takes 48x32 images (height x width) but the input size is 32: pass --input-size " \
           "48x32" in line
    assert not (tmp_path / "run").exists()


def test_registry_backbone_grey_and_non_square_from_scratch(grey_data, tmp_path):
    from edgetl.train import load_model, train

    run = tmp_path / "run"
    train(TrainConfig(data=str(grey_data), backbone="mobilenetv2", alpha=0.35, weights="none",
                      channels=1, input_size="48x32", epochs=1, batch_size=8, augment=True,
                      out=str(run), quiet=True))
    config = json.loads((run / "config.json").read_text())
    assert config["input_shape"] == [48, 32, 1] and config["train"]["input_size"] == "48x32"
    assert config["preprocessing"]["mean"] == [127.5]
    assert load_model(run / "model.keras").input_shape == (None, 48, 32, 1)
