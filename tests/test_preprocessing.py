"""How a run's preprocessing is chosen: a base model that normalises its own input (Rescaling,
Normalization, preprocess_input arithmetic, EfficientNet) gets raw pixels; presets and
--mean/--std otherwise; the choice is printed with its reason and recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgetl.errors import EdgetlError
from edgetl.preprocessing import choose, describe, normalising_layers, sidecar_path

ROOT = Path(__file__).resolve().parents[1]


def _tiny(first=None, channels=3, size=(32, 32)):
    """A tf_keras conv net whose input goes through ``first`` (a function on the input)."""
    from edgetl.keras import keras

    inp = keras.Input((*size, channels))
    x = first(inp) if first else inp
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(2)(x))


def _k2_cases():
    from edgetl.keras import keras

    L = keras.layers
    app = keras.applications
    return {
        "rescaling": (lambda x: L.Rescaling(1 / 255.0, name="rescale")(x), ["Rescaling"]),
        "normalization": (lambda x: L.Normalization(mean=[120.0] * 3, variance=[3600.0] * 3)(x),
                          ["Normalization"]),
        "flip then rescaling": (lambda x: L.Rescaling(1 / 127.5, -1)(L.RandomFlip()(x)),
                                ["Rescaling"]),
        "tf preprocess_input": (app.mobilenet_v2.preprocess_input,
                                ["tf.math.truediv", "tf.math.subtract"]),
        "caffe preprocess_input": (app.resnet50.preprocess_input, ["tf.nn.bias_add"]),
        "torch preprocess_input": (app.densenet.preprocess_input,
                                   ["tf.math.truediv", "tf.nn.bias_add", "tf.math.truediv"]),
        "x / 255 by hand": (lambda x: x / 255.0, ["tf.math.truediv"]),
        "plain": (None, []),
        "conv first, rescaling later": (lambda x: L.Rescaling(0.5)(L.Conv2D(3, 1)(x)), []),
    }


@pytest.mark.parametrize("case", list(_k2_cases()))
def test_normalising_layers_found_at_the_front(case):
    first, expected = _k2_cases()[case]
    found = normalising_layers(_tiny(first))
    assert [f.split(" '")[0] for f in found] == expected


def test_keras_applications_with_built_in_scaling():
    from edgetl.keras import keras

    eff = keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None,
                                            include_top=False)
    assert [f.split(" ")[0] for f in normalising_layers(eff)] == ["Rescaling", "Normalization"]
    v3 = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None,
                                             include_top=False, include_preprocessing=True)
    assert [f.split(" ")[0] for f in normalising_layers(v3)] == ["Rescaling"]
    v2 = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, alpha=0.35,
                                        include_top=False)
    assert normalising_layers(v2) == []


def test_choice_order_and_reasons(tmp_path):
    from edgetl.keras import keras

    rescaled = _tiny(lambda x: keras.layers.Rescaling(1 / 255.0, name="rescale")(x))
    plain = _tiny()
    model = str(tmp_path / "m.keras")

    auto = choose(base_model=model, model=rescaled)
    assert auto["name"] == "raw" and auto["mean"] == [0.0] * 3 and auto["std"] == [1.0] * 3
    assert "Rescaling 'rescale'" in auto["reason"] and "raw" in auto["reason"]

    default = choose(base_model=model, model=plain)
    assert default["name"] == "tf" and "--preprocessing" in default["reason"]

    # The user's explicit choice is kept, with a note when the model normalises itself.
    forced = choose("tf", base_model=model, model=rescaled)
    assert forced["name"] == "tf" and forced["mean"] == [127.5] * 3
    assert "note" in forced["reason"] and "--preprocessing raw" in forced["reason"]
    assert "note" not in choose("raw", base_model=model, model=rescaled)["reason"]

    custom = choose("auto", (100.0,), (50.0, 60.0, 70.0), base_model=model, model=plain)
    assert custom["name"] == "custom" and custom["mean"] == [100.0] * 3
    assert custom["std"] == [50.0, 60.0, 70.0] and custom["reason"] == "--mean --std"
    on_preset = choose("caffe", None, (2.0,), base_model=model, model=plain)
    assert on_preset["name"] == "caffe+custom" and on_preset["channel_order"] == "BGR"

    # The sidecar file is the user's word for auto; the registry preset for backbones.
    sidecar_path(model).write_text('{"preset": "torch"}')
    side = choose(base_model=model, model=rescaled)
    assert side["name"] == "torch" and "m.keras.preprocessing.json" in side["reason"]
    assert "note" in side["reason"]
    reg = choose(backbone="resnet50", backbone_preset="caffe", model=plain)
    assert reg["name"] == "caffe" and "resnet50" in reg["reason"]


def test_one_channel_presets_and_flags():
    grey = choose("torch", channels=1, model=_tiny(channels=1))
    assert len(grey["mean"]) == 1 and grey["mean"][0] == pytest.approx((123.675 + 116.28
                                                                        + 103.53) / 3)
    assert grey["channel_order"] == "RGB"
    assert choose("auto", (0.0,), (255.0,), channels=1)["std"] == [255.0]
    with pytest.raises(EdgetlError, match=r"--mean 1 2 3: the model takes 1-channel"):
        choose("auto", (1, 2, 3), None, channels=1)
    assert describe(choose("raw", channels=1)) == "raw (raw 0..255 pixels)"
    assert describe(choose("tf")) == "tf ((x - 127.5) / 127.5, RGB)"


# --- end to end: a model with Rescaling inside, trained on raw pixels ---------------------------

@pytest.fixture(scope="module")
def rescaling_model(tmp_path_factory):
    """The user's model: Rescaling(1/255) inside, trained on raw synth pixels (Keras' recipe)."""
    from edgetl.data import make_synth
    from edgetl.keras import keras
    from edgetl.runner import load_image

    root = tmp_path_factory.mktemp("rescaling")
    data = root / "data"
    make_synth(data, classes=3, per_class=20, size=32, seed=1)
    xs, ys = [], []
    for i, c in enumerate(sorted(os.listdir(data))):
        for p in sorted((data / c).glob("*.png")):
            xs.append(load_image(p, (32, 32)))
            ys.append(i)
    x, y = np.stack(xs).astype("float32"), np.array(ys)
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((32, 32, 3))
    h = L.Rescaling(1 / 255.0, name="rescale")(inp)
    for f in (16, 32):
        h = L.MaxPooling2D()(L.ReLU()(L.BatchNormalization()(L.Conv2D(f, 3, padding="same",
                                                                         use_bias=False)(h))))
    out = L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=30, batch_size=16, verbose=0)
    assert model.evaluate(x, y, verbose=0)[1] >= 0.9  # the set-up learned
    path = root / "base.keras"
    model.save(path)
    return data, path


def _train_cli(data, base, out, *flags):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "edgetl.cli", "train", "--data", str(data), "--base-model",
           str(base), "--input-size", "32", "--epochs", "8", "--lr", "0.01", "--no-augment",
           "--batch-size", "16", "--out", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_rescaling_inside_reaches_the_accuracy_of_the_right_preset(rescaling_model, tmp_path):
    data, base = rescaling_model
    auto = _train_cli(data, base, tmp_path / "auto")
    assert auto.returncode == 0, auto.stderr[-2000:]
    line = next(x for x in auto.stderr.splitlines() if x.startswith("preprocessing:"))
    assert line.startswith("preprocessing: raw (raw 0..255 pixels, RGB): the model's first "
                           "layers normalise its input (Rescaling 'rescale')"), line
    # printed before the first epoch
    assert auto.stderr.index("preprocessing:") < auto.stderr.index("epoch 1/")
    raw = _train_cli(data, base, tmp_path / "raw", "--preprocessing", "raw")
    assert raw.returncode == 0, raw.stderr[-2000:]
    acc = {name: json.loads((tmp_path / name / "metrics.json").read_text())["accuracy"]
           for name in ("auto", "raw")}
    assert acc["auto"] == acc["raw"] >= 0.8, acc
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["preprocessing"]["name"] == "raw"
    assert "Rescaling 'rescale'" in config["preprocessing"]["reason"]
    assert config["train"]["preprocessing"] == "auto"

    # What the bug did: x/127.5-1 into the model's own Rescaling. Kept when asked, with a note.
    wrong = _train_cli(data, base, tmp_path / "tf", "--preprocessing", "tf")
    assert wrong.returncode == 0
    assert "note: the model's first layers normalise its input" in wrong.stderr
    acc_tf = json.loads((tmp_path / "tf" / "metrics.json").read_text())["accuracy"]
    assert acc_tf < acc["raw"]


def test_export_metadata_records_the_preprocessing(rescaling_model, tmp_path):
    from edgetl.config import ExportConfig, TrainConfig
    from edgetl.export import export
    from edgetl.runner import read_metadata
    from edgetl.train import train

    data, base = rescaling_model
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), base_model=str(base), input_size=32, epochs=2, lr=0.01,
                      augment=False, batch_size=16, out=str(run), quiet=True))
    result = export(ExportConfig(run=str(run), num_calibration=20, max_drop=100))
    meta = read_metadata(result.files[0])
    assert meta["input"]["preprocessing"] == "raw"
    assert meta["input"]["mean"] == [0.0] * 3 and meta["input"]["std"] == [1.0] * 3
    assert "Rescaling 'rescale'" in meta["input"]["preprocessing_reason"]


def test_resume_keeps_the_recorded_preprocessing(rescaling_model, tmp_path):
    from edgetl.config import TrainConfig
    from edgetl.train import train

    data, base = rescaling_model
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(data), base_model=str(base), input_size=32, epochs=1,
                      augment=False, batch_size=16, out=str(run), quiet=True)
    train(cfg)
    config = json.loads((run / "config.json").read_text())
    # a sidecar appearing later does not change a run that already started
    sidecar_path(str(base)).write_text('{"preset": "caffe"}')
    try:
        train(TrainConfig(data=str(data), out=str(run), resume=True, quiet=True))
    finally:
        sidecar_path(str(base)).unlink()
    assert json.loads((run / "config.json").read_text())["preprocessing"] == \
        config["preprocessing"]


# --- Keras 3 files ------------------------------------------------------------------------------

KERAS3_PREPROCESS = textwrap.dedent("""
    import sys
    import keras

    out = sys.argv[1]
    for name in ("mobilenet_v2", "resnet50", "densenet"):
        inp = keras.Input((32, 32, 3))
        x = getattr(keras.applications, name).preprocess_input(inp)
        x = keras.layers.Conv2D(4, 3, name="conv")(x)
        y = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
        keras.Model(inp, y).save(f"{out}/{name}.keras")
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(keras.layers.RandomFlip()(inp))
    y = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3, name="conv")(x)))
    keras.Model(inp, y).save(f"{out}/rescaling.keras")
    keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None,
                                      include_top=False).save(f"{out}/efficientnet.keras")
""")


def run_keras3(script: str, out: Path) -> None:
    """Runs ``script`` with Keras 3 (no TF_USE_LEGACY_KERAS), as a user of `import keras` does."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def k3_preprocess(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("k3pre")
    run_keras3(KERAS3_PREPROCESS, out)
    return out


@pytest.mark.parametrize("name, expected", [
    ("mobilenet_v2", ["tf.math.truediv", "tf.math.subtract"]),
    ("resnet50", ["tf.math.add"]),  # the channel flip is indexing + stack, then the mean
    ("densenet", ["tf.math.truediv", "tf.math.add", "tf.math.truediv"]),
    ("rescaling", ["Rescaling"]),
    ("efficientnet", ["Rescaling", "Normalization"]),
])
def test_keras3_preprocessing_is_rebuilt_and_detected(k3_preprocess, name, expected):
    from edgetl.basemodel import load_base_model

    # load_base_model checks the rebuilt graph against the Keras 3 original on a batch
    base = load_base_model(str(k3_preprocess / f"{name}.keras"), None, False, 32)
    found = [f.split(" ")[0] for f in normalising_layers(base)]
    assert found == expected
    assert choose(base_model=str(k3_preprocess / f"{name}.keras"), model=base)["name"] == "raw"


# Every Keras 3 preprocessing / augmentation layer that can be built on an image, saved inside
# a small model the way a Keras 3 user saves one.
KERAS3_LAYERS = textwrap.dedent("""
    import json
    import sys
    import keras

    out = sys.argv[1]
    L = keras.layers
    layers = {
        # with a Keras 2 counterpart, Keras 3-only keys at their Keras 2 behaviour
        "RandomFlip": lambda: L.RandomFlip(data_format="channels_last"),
        "RandomRotation": lambda: L.RandomRotation(0.1),
        "RandomZoom": lambda: L.RandomZoom(0.1),
        "RandomTranslation": lambda: L.RandomTranslation(0.1, 0.1),
        "RandomContrast": lambda: L.RandomContrast(0.1),
        "RandomBrightness": lambda: L.RandomBrightness(0.1),
        "Resizing": lambda: L.Resizing(28, 28),
        "CenterCrop": lambda: L.CenterCrop(28, 28),
        "Rescaling": lambda: L.Rescaling(1 / 255.0),
        "Normalization": lambda: L.Normalization(mean=[120.0] * 3, variance=[3600.0] * 3),
        # Keras 3-only values that change behaviour; a layer that behaves differently
        "RandomCrop": lambda: L.RandomCrop(28, 28),
        "RandomContrast value_range": lambda: L.RandomContrast(0.1, value_range=(0, 1)),
        "Resizing pad_to_aspect_ratio": lambda: L.Resizing(28, 28, pad_to_aspect_ratio=True),
        # Keras 3-only layers
        "AutoContrast": lambda: L.AutoContrast(),
        "Equalization": lambda: L.Equalization(),
        "RandomGrayscale": lambda: L.RandomGrayscale(),
        "RandomInvert": lambda: L.RandomInvert(),
        "RandomErasing": lambda: L.RandomErasing(),
        "RandomGaussianBlur": lambda: L.RandomGaussianBlur(),
        "RandomColorJitter": lambda: L.RandomColorJitter(brightness_factor=0.1),
        "RandomColorDegeneration": lambda: L.RandomColorDegeneration(0.2),
        "RandomHue": lambda: L.RandomHue(0.2),
        "RandomSaturation": lambda: L.RandomSaturation(0.2),
        "RandomSharpness": lambda: L.RandomSharpness(0.2),
        "RandomPosterization": lambda: L.RandomPosterization(4),
        "RandomPerspective": lambda: L.RandomPerspective(),
        "RandomShear": lambda: L.RandomShear(0.1),
        "RandomElasticTransform": lambda: L.RandomElasticTransform(),
        "Solarization": lambda: L.Solarization(),
        "RandAugment": lambda: L.RandAugment(),
        "Pipeline": lambda: L.Pipeline([L.RandomFlip()]),
    }
    built = []
    for name, make in layers.items():
        try:
            inp = keras.Input((32, 32, 3))
            x = keras.layers.Conv2D(4, 3, name="conv")(make()(inp))
            y = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
            path = f"{out}/{name.replace(' ', '_')}.keras"
            keras.Model(inp, y).save(path)
            loaded = keras.saving.load_model(path)
            # some layers return their input at inference and leave no node in the graph
            kept = len(loaded.layers) == 5
            built.append([name, kept])
        except Exception as e:  # this Keras 3 lacks it, or cannot save or load it back
            print(name, e, file=sys.stderr)
    json.dump(dict(built), open(f"{out}/built.json", "w"))
    keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, include_top=False,
                                        include_preprocessing=True).save(f"{out}/v3.keras")
""")

K2_COUNTERPART = ["RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation",
                  "RandomContrast", "RandomBrightness", "Resizing", "CenterCrop", "Rescaling",
                  "Normalization"]
CHANGES_BEHAVIOUR = {"RandomContrast value_range": "value_range=[0, 1]",
                     "Resizing pad_to_aspect_ratio": "pad_to_aspect_ratio=True"}
K3_ONLY = ["AutoContrast", "Equalization", "RandomGrayscale", "RandomInvert", "RandomErasing",
           "RandomGaussianBlur", "RandomColorJitter", "RandomColorDegeneration", "RandomHue",
           "RandomSaturation", "RandomSharpness", "RandomPosterization", "RandomPerspective",
           "RandomShear", "RandomElasticTransform", "Solarization", "RandAugment", "Pipeline"]


@pytest.fixture(scope="module")
def k3_layers(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("k3layers")
    run_keras3(KERAS3_LAYERS, out)
    built = json.loads((out / "built.json").read_text())
    # the layers with a Keras 2 counterpart exist in every Keras 3
    assert set(K2_COUNTERPART) | set(CHANGES_BEHAVIOUR) <= set(built)
    return out


def _k3_layer_file(k3_layers: Path, name: str) -> tuple[Path, bool]:
    """The saved model holding layer ``name``, and whether its graph kept the layer."""
    built = json.loads((k3_layers / "built.json").read_text())
    if name not in built:
        pytest.skip(f"this Keras 3 cannot build, save or load back {name}")
    return k3_layers / f"{name.replace(' ', '_')}.keras", built[name]


@pytest.mark.parametrize("name", K2_COUNTERPART)
def test_keras3_layer_with_keras2_behaviour_converts(k3_layers, name):
    from edgetl.basemodel import load_base_model

    path, kept = _k3_layer_file(k3_layers, name)
    base = load_base_model(str(path), None, False, 32)
    assert kept and name in [type(layer).__name__ for layer in base.layers]
    assert base.layers[-1].name == "conv"


@pytest.mark.parametrize("name", sorted(CHANGES_BEHAVIOUR))
def test_keras3_only_value_that_changes_behaviour_is_named(k3_layers, name):
    from edgetl.basemodel import load_base_model

    with pytest.raises(EdgetlError) as err:
        load_base_model(str(_k3_layer_file(k3_layers, name)[0]), None, False, 32)
    text = str(err.value)
    layer = name.split()[0]
    assert f"({layer}) uses {CHANGES_BEHAVIOUR[name]}, which changes its behaviour" in text
    assert "\n" not in text


@pytest.mark.parametrize("name", K3_ONLY)
def test_keras3_only_layer_is_refused_by_name(k3_layers, name):
    from edgetl.basemodel import load_base_model

    path, kept = _k3_layer_file(k3_layers, name)
    if not kept:  # identity at inference: Keras 3 saved a graph without it, which converts
        assert type(load_base_model(str(path), None, False, 32).layers[-1]).__name__ == "Conv2D"
        return
    with pytest.raises(EdgetlError, match=rf"\({name}\) has no Keras 2 equivalent: it only "
                                          r"acts in training; remove it"):
        load_base_model(str(path), None, False, 32)


def test_keras3_random_crop_differs_and_is_refused(k3_layers):
    from edgetl.basemodel import load_base_model

    with pytest.raises(EdgetlError, match=r"\(RandomCrop\) passes images through unchanged at "
                                          r"inference in Keras 3 but crops/resizes them in "
                                          r"Keras 2"):
        load_base_model(str(_k3_layer_file(k3_layers, "RandomCrop")[0]), None, False, 32)


def test_keras3_mobilenetv3_with_hard_silu_and_rescaling_converts(k3_layers):
    from edgetl.basemodel import load_base_model

    base = load_base_model(str(k3_layers / "v3.keras"), None, False, 32)
    assert tuple(base.output.shape) == (None, 1, 1, 576)
    assert normalising_layers(base)[0].startswith("Rescaling")


KERAS3_APPS = textwrap.dedent("""
    import sys
    import keras

    out = sys.argv[1]
    for name, size in (("EfficientNetB0", 32), ("EfficientNetV2B0", 32), ("ResNet50", 32),
                       ("ResNet50V2", 32), ("DenseNet121", 32), ("NASNetMobile", 32),
                       ("Xception", 71), ("InceptionV3", 75), ("VGG16", 32),
                       ("ConvNeXtTiny", 32)):
        getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None,
                                          include_top=False).save(f"{out}/{name}.keras")
""")


@pytest.fixture(scope="module")
def k3_apps(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("k3apps")
    run_keras3(KERAS3_APPS, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, size, normalises", [
    ("EfficientNetB0", 32, True), ("EfficientNetV2B0", 32, True), ("ResNet50", 32, False),
    ("ResNet50V2", 32, False), ("DenseNet121", 32, False), ("NASNetMobile", 32, False),
    ("Xception", 71, False), ("InceptionV3", 75, False), ("VGG16", 32, False),
])
def test_keras3_applications_convert(k3_apps, name, size, normalises):
    from edgetl.basemodel import load_base_model

    base = load_base_model(str(k3_apps / f"{name}.keras"), None, False, size)
    assert len(base.output.shape) == 4
    assert bool(normalising_layers(base)) == normalises


@pytest.mark.slow
def test_keras3_convnext_layer_scale_is_refused_by_name(k3_apps):
    from edgetl.basemodel import load_base_model

    with pytest.raises(EdgetlError, match=r"\(LayerScale\) has no Keras 2 equivalent; pass "
                                          r"--cut-layer"):
        load_base_model(str(k3_apps / "ConvNeXtTiny.keras"), None, False, 32)
