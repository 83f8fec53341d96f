"""--base-model: loading the user's Keras 2 / Keras 3 model as a flat backbone, safely."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgetl.basemodel import (base_model_input_size, base_model_preprocessing, load_base_model,
                              sidecar_path)
from edgetl.errors import EdgetlError

# Written by Keras 3 in a subprocess without TF_USE_LEGACY_KERAS, the way a user of plain
# `import keras` saves models today.
KERAS3_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import keras

    assert keras.__version__.startswith("3"), keras.__version__
    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(alpha=0.35, input_shape=(48, 48, 3), weights=None,
                                          include_top=False)
    seq = keras.Sequential([keras.Input((48, 48, 3)), base,
                            keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(3, activation="softmax")])
    seq.save(f"{out}/seq.keras")
    x = np.random.default_rng(1).uniform(-1, 1, (2, 48, 48, 3)).astype("float32")
    kernels = {name: base.get_layer(name).get_weights()[0]
               for name in ("Conv1", "block_3_depthwise", "Conv_1")}
    bn = base.get_layer("Conv_1_bn").get_weights()
    np.savez(f"{out}/seq.npz", x=x, features=np.asarray(base(x)), bn_mean=bn[2], **kernels)

    # Functional, nested, fully convolutional (no fixed input size).
    flexible = keras.applications.MobileNetV2(alpha=0.35, input_shape=(None, None, 3),
                                              weights=None, include_top=False)
    inp = keras.Input((None, None, 3))
    y = keras.layers.GlobalAveragePooling2D()(flexible(inp))
    keras.Model(inp, keras.layers.Dense(2)(y)).save(f"{out}/func.keras")

    @keras.saving.register_keras_serializable(package="mypkg")
    class Scale(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    inp = keras.Input((32, 32, 3))
    y = Scale()(keras.layers.Conv2D(4, 3)(inp))
    y = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(y))
    keras.Model(inp, y).save(f"{out}/custom.keras")
""")


@pytest.fixture(scope="module")
def k3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("k3")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "-c", KERAS3_SCRIPT, str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(out / "seq.keras") as z:
        assert json.loads(z.read("metadata.json"))["keras_version"].startswith("3")
    return out


@pytest.fixture(scope="module")
def k2_h5(tmp_path_factory):
    """A tf_keras MobileNetV2 nested in a functional model with a head, saved as .h5."""
    from edgetl.keras import keras

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(alpha=0.35, input_shape=(48, 48, 3), weights=None,
                                          include_top=False)
    inp = keras.Input((48, 48, 3))
    y = keras.layers.GlobalAveragePooling2D()(base(inp, training=False))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(y))
    path = tmp_path_factory.mktemp("k2") / "model.h5"
    model.save(path)
    kernels = {n: base.get_layer(n).get_weights()[0] for n in ("Conv1", "block_5_project",
                                                               "Conv_1")}
    return path, kernels


def _no_nested(model) -> bool:
    from edgetl.keras import keras

    return not any(isinstance(layer, keras.Model) for layer in model.layers)


def test_keras2_h5_is_flattened_to_feature_map_with_saved_weights(k2_h5):
    path, kernels = k2_h5
    base = load_base_model(str(path), None, False, 48)
    assert tuple(base.output.shape) == (None, 2, 2, 1280)  # cut below GAP + Dense
    assert base.layers[-1].name == "out_relu"
    assert _no_nested(base)
    for name, kernel in kernels.items():
        np.testing.assert_array_equal(base.get_layer(name).get_weights()[0], kernel)


def test_keras3_nested_sequential_rebuilt_in_keras2_with_exact_weights(k3):
    from edgetl.keras import keras

    saved = np.load(k3 / "seq.npz")
    base = load_base_model(str(k3 / "seq.keras"), None, False, 48)
    assert isinstance(base, keras.Model) and type(base).__module__.startswith("tf_keras")
    assert _no_nested(base)
    assert tuple(base.output.shape) == (None, 2, 2, 1280)
    for name in ("Conv1", "block_3_depthwise", "Conv_1"):
        np.testing.assert_array_equal(base.get_layer(name).get_weights()[0], saved[name])
    np.testing.assert_array_equal(base.get_layer("Conv_1_bn").get_weights()[2], saved["bn_mean"])
    np.testing.assert_allclose(base(saved["x"], training=False).numpy(), saved["features"],
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def k3_cut(k3):
    """The nested, fully convolutional Keras 3 model cut at --cut-layer block_5_add."""
    return load_base_model(str(k3 / "func.keras"), "block_5_add", False, 48)


def test_keras3_functional_flexible_size_and_cut_layer(k3, k3_cut):
    path = str(k3 / "func.keras")
    assert base_model_input_size(path) is None
    assert base_model_input_size(str(k3 / "seq.keras")) == 48
    base = load_base_model(path, None, False, 64)  # no fixed size: built at the size asked
    assert tuple(base.input.shape) == (None, 64, 64, 3)
    assert tuple(base.output.shape) == (None, 2, 2, 1280)
    assert tuple(k3_cut.output.shape) == (None, 6, 6, 16)
    assert k3_cut.layers[-1].name == "block_5_add" and _no_nested(k3_cut)
    assert "Conv_1" not in [layer.name for layer in k3_cut.layers]


def test_fixed_input_size_mismatch_is_explained(k3):
    with pytest.raises(EdgetlError, match=r"takes 48x48 images.*--input-size 48"):
        load_base_model(str(k3 / "seq.keras"), None, False, 64)


def test_missing_cut_layer_lists_names(k3):
    with pytest.raises(EdgetlError) as err:
        load_base_model(str(k3 / "seq.keras"), "block_5_ad", False, 48)
    text = str(err.value)
    assert "--cut-layer 'block_5_ad' is not a layer" in text
    assert "did you mean 'block_5_add'" in text and "out_relu" in text


def test_train_end_to_end_on_keras3_base_model(k3, tmp_path):
    from edgetl.config import TrainConfig
    from edgetl.data import make_synth
    from edgetl.train import train

    data = tmp_path / "data"
    make_synth(data, classes=2, per_class=8, size=32)
    model = tmp_path / "mine.keras"
    shutil.copy(k3 / "func.keras", model)
    sidecar_path(str(model)).write_text('{"preset": "torch"}')
    result = train(TrainConfig(data=str(data), base_model=str(model),
                               weights="none", epochs=1, input_size=48, batch_size=8,
                               out=str(tmp_path / "run"), quiet=True))
    run = Path(result.run_dir)
    assert (run / "metrics.json").is_file() and result.epochs_done == 1
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == "custom" and config["preprocessing"]["name"] == "torch"


def test_flat_base_can_be_quantized_by_tfmot(k3_cut):
    from edgetl.keras import keras, tfmot

    base = k3_cut  # from a Keras 3 model nested in a Keras 3 model
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    model = keras.Model(base.input, keras.layers.Dense(2)(x))
    qat = tfmot.quantization.keras.quantize_model(model)
    assert qat(np.zeros((1, 48, 48, 3), "float32")).shape == (1, 2)


def _lambda_model(path: Path, marker: Path) -> None:
    from edgetl.keras import keras

    # eval keeps the marker path inside the function's code (marshalled into the .h5)
    fn = eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")  # noqa: S307
    inp = keras.Input((32, 32, 3))
    y = keras.layers.Conv2D(4, 3, name="conv")(keras.layers.Lambda(fn, name="sneaky")(inp))
    y = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(y))
    keras.Model(inp, y).save(path)
    marker.unlink()  # building the model ran the function once


def test_lambda_layer_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "lambda.h5", tmp_path / "marker.txt"
    _lambda_model(path, marker)
    with pytest.raises(EdgetlError, match=r"has a Lambda layer 'sneaky'.*pass --unsafe"):
        load_base_model(str(path), None, False, 32)
    assert not marker.exists()
    base = load_base_model(str(path), None, True, 32)
    assert base.layers[-1].name == "conv" and len(base.output.shape) == 4
    assert marker.exists()  # with --unsafe the file's code did run


def test_custom_keras3_class_is_refused(k3):
    with pytest.raises(EdgetlError, match=r"custom registered class 'mypkg>Scale'.*--unsafe"):
        load_base_model(str(k3 / "custom.keras"), None, False, 32)


def test_tf_op_that_touches_files_is_refused():
    from edgetl.basemodel import _config_problem

    layer = {"class_name": "TFOpLambda", "config": {"name": "w", "function": "io.write_file"}}
    assert "tf.io.write_file" in _config_problem({"layers": [layer]}, None)
    layer["config"]["function"] = "math.multiply"
    assert _config_problem({"layers": [layer]}, None) is None


def _no_4d_model(path: Path) -> None:
    from edgetl.keras import keras

    inp = keras.Input((8, 8, 3))
    keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(inp))).save(path)


def _weights_only(path: Path) -> None:
    from edgetl.keras import keras

    inp = keras.Input((8, 8, 3))
    keras.Model(inp, keras.layers.Conv2D(2, 3)(inp)).save_weights(path)


@pytest.mark.parametrize("name, make, expected", [
    ("absent.keras", None, r"'.*absent.keras' does not exist: pass a saved Keras model"),
    ("model.onnx", lambda p: p.write_bytes(b"onnx"), r"unknown model format '.onnx'"),
    ("text.keras", lambda p: p.write_text("hello"), r"is not a .keras file \(not a zip"),
    ("other.keras", lambda p: zipfile.ZipFile(p, "w").writestr("a.txt", "x"),
     r"zip archive without config.json"),
    ("broken.h5", lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64),
     r"not a readable HDF5 file"),
    ("weights.h5", _weights_only, r"holds weights only"),
    ("flat.h5", _no_4d_model, r"has no 4D layer \(feature map\) to cut at.*--cut-layer"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, name, make, expected):
    path = tmp_path / name
    if make:
        make(path)
    with pytest.raises(EdgetlError, match=expected) as err:
        load_base_model(str(path), None, False, 8)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_savedmodel_without_variables_or_keras_metadata(tmp_path):
    sm = tmp_path / "sm"
    sm.mkdir()
    (sm / "saved_model.pb").write_bytes(b"")
    with pytest.raises(EdgetlError, match=r"has no variables/ directory"):
        load_base_model(str(sm), None, False, 48)
    (sm / "variables").mkdir()
    with pytest.raises(EdgetlError, match=r"without Keras metadata.*model.save"):
        load_base_model(str(sm), None, False, 48)
    (tmp_path / "plain").mkdir()
    with pytest.raises(EdgetlError, match=r"not a SavedModel \(no saved_model.pb\)"):
        load_base_model(str(tmp_path / "plain"), None, False, 48)


def test_preprocessing_default_and_sidecar(tmp_path):
    model = tmp_path / "m.keras"
    assert base_model_preprocessing(str(model)) == {
        "mean": [127.5] * 3, "std": [127.5] * 3, "channel_order": "RGB", "name": "tf"}
    side = sidecar_path(str(model))
    assert side.name == "m.keras.preprocessing.json"
    side.write_text('{"preset": "caffe"}')
    assert base_model_preprocessing(str(model))["channel_order"] == "BGR"
    side.write_text('{"mean": 0, "std": 255}')
    assert base_model_preprocessing(str(model)) == {
        "mean": [0.0] * 3, "std": [255.0] * 3, "channel_order": "RGB", "name": "custom"}
    side.write_text('{"mean": [1, 2]}')
    with pytest.raises(EdgetlError, match=r"has 'mean' \[1, 2\], not 3 numbers"):
        base_model_preprocessing(str(model))
