"""edgetl.train: what each strategy freezes, BatchNorm, QAT, the run directory, the QAT registry.

Runs are tiny (MobileNetV2 alpha 0.35 at 32 px, 1 epoch). Weights are compared with the seeded
initial model: ``build_model(cfg, ...)`` builds exactly the model a run starts from.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from edgetl.errors import EdgetlError


def _train(cfg):
    from edgetl.train import train

    return train(cfg)


def _initial(cfg, n_classes: int = 3):
    """The seeded model a run with ``cfg`` starts from, and its number of base layers."""
    from edgetl.train import build_model

    model, n_base, _ = build_model(cfg, n_classes, cfg.input_size)
    return model, n_base


def _load(path):
    from edgetl.train import load_model

    return load_model(path)


def _is_bn(layer) -> bool:
    from edgetl.keras import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def _changed(before, after) -> bool:
    a, b = before.get_weights(), after.get_weights()
    assert len(a) == len(b), before.name
    return any(not np.array_equal(x, y) for x, y in zip(a, b))


def _history(run) -> list[dict]:
    with open(Path(run) / "history.csv") as f:
        return list(csv.DictReader(f))


def _val_batch(run):
    from edgetl.data import make_dataset

    run = Path(run)
    config = json.loads((run / "config.json").read_text())
    split = json.loads((run / "split.json").read_text())
    size = config["input_size"]
    ds = make_dataset([tuple(x) for x in split["val"]], (size, size), config["preprocessing"],
                      1000, False, False, 0)
    return next(iter(ds))


def _agreement(model_a, model_b, x) -> float:
    a = model_a(x, training=False).numpy().argmax(-1)
    b = model_b(x, training=False).numpy().argmax(-1)
    return float((a == b).mean())


@pytest.fixture(scope="session")
def pretrained_base(synth, tmp_path_factory) -> Path:
    """A seeded tiny MobileNetV2 base saved as .h5, standing in for pretrained weights.

    Its BatchNorm statistics are measured on the synth images (and gamma/beta perturbed), so
    activations have a sane scale and "BN unchanged" is checked against non-default values.
    """
    from edgetl.backbones import get_backbone, preprocessing
    from edgetl.data import make_dataset, scan_folder
    from edgetl.keras import keras

    keras.utils.set_random_seed(7)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None)
    items = list(scan_folder(synth, (32, 32)).items)
    x, _ = next(iter(make_dataset(items, (32, 32), preprocessing(get_backbone("mobilenetv2")),
                                  len(items), False, False, 0)))
    bns = [layer for layer in base.layers if _is_bn(layer)]
    for layer in bns:
        layer.momentum = 0.0
    base(x, training=True)  # moving statistics := this batch's
    rng = np.random.RandomState(1)
    for layer in bns:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([gamma * rng.uniform(0.8, 1.2, gamma.shape),
                           beta + rng.normal(0, 0.05, beta.shape), mean, var])
    path = tmp_path_factory.mktemp("pretrained") / "mobilenetv2_035_32.h5"
    base.save_weights(str(path))
    return path


# --- strategies ----------------------------------------------------------------------------------


def test_feature_extract_trains_only_the_head_and_writes_a_complete_run(synth, tmp_path):
    from edgetl.data import list_hash, scan_folder

    cfg = tiny_config(synth, tmp_path / "run", strategy="feature-extract", epochs=1, seed=3)
    result = _train(cfg)
    run = Path(result.run_dir)
    initial, n_base = _initial(cfg)
    trained = _load(run / "model.keras")

    # Freezing: every base layer (BatchNorm statistics included) as initialised; the head trained.
    assert [layer.name for layer in trained.layers[1:]] == [
        layer.name for layer in initial.layers[1:]]
    base = [layer for layer in initial.layers[:n_base] if layer.weights]
    assert len(base) > 100
    assert [layer.name for layer in base if _changed(layer, trained.get_layer(layer.name))] == []
    head = [layer for layer in initial.layers if layer.name.startswith("head_") and layer.weights]
    assert [layer.name for layer in head] == ["head_predictions"]
    assert _changed(head[0], trained.get_layer("head_predictions"))

    # The run directory carries its context.
    assert {p.name for p in run.iterdir()} >= {"model.keras", "labels.txt", "config.json",
                                               "history.csv", "metrics.json", "split.json",
                                               "checkpoints", "state.json"}
    assert not [p.name for p in run.rglob("*") if ".tmp" in p.name]
    folder = scan_folder(synth, (32, 32))
    names = list(folder.class_names)
    assert (run / "labels.txt").read_text().splitlines() == names
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["seed"] == 3 and config["train"]["strategy"] == "feature-extract"
    assert config["input_size"] == 32 and config["class_names"] == names
    assert config["preprocessing"]["mean"] == [127.5] * 3
    assert config["preprocessing"]["channel_order"] == "RGB"
    assert {"edgetl", "tensorflow", "tf_keras", "tfmot", "numpy", "python"} <= set(
        config["versions"])
    split = json.loads((run / "split.json").read_text())
    train_items = [tuple(x) for x in split["train"]]
    val_items = [tuple(x) for x in split["val"]]
    assert sorted(train_items + val_items) == sorted(folder.items)
    assert not set(train_items) & set(val_items)
    assert {label for _, label in val_items} == {0, 1, 2}
    assert re.fullmatch(r"[0-9a-f]{64}", config["data_hash"])
    assert config["data_hash"] == list_hash(train_items + val_items)
    rows = _history(run)
    assert [(r["epoch"], r["phase"], r["phase_epoch"]) for r in rows] == [("1", "head", "1")]
    assert 0 <= float(rows[0]["val_accuracy"]) <= 1 and float(rows[0]["loss"]) > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(result.val_accuracy)
    assert set(metrics["per_class"]) == set(names)
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == metrics["count"] == len(val_items)
    assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    state = json.loads((run / "state.json").read_text())
    assert state["complete"] is True
    assert (run / "checkpoints" / state["checkpoint"] / "ckpt.index").is_file()
    assert result.epochs_done == 1 and result.qat is False and not (run / "qat.h5").exists()

    # Never overwritten without --overwrite; untouched when refused.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(EdgetlError, match="already exists.*--overwrite"):
        _train(cfg)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_fine_tune_unfreeze_n_trains_exactly_the_top_n_base_layers(synth, tmp_path):
    n = 12
    cfg = tiny_config(synth, tmp_path / "run", strategy="fine-tune", unfreeze=n, epochs=1,
                      fine_tune_lr=1e-3)
    result = _train(cfg)
    initial, n_base = _initial(cfg)
    trained = _load(Path(result.run_dir) / "model.keras")

    base = initial.layers[:n_base]
    top, rest = base[n_base - n:], base[:n_base - n]
    assert top[0].name == "block_15_add" and top[-1].name == "out_relu"
    changed = {layer.name for layer in base
               if layer.weights and _changed(layer, trained.get_layer(layer.name))}
    assert not changed & {layer.name for layer in rest}
    top_weighted = [layer.name for layer in top if layer.weights and not _is_bn(layer)]
    assert top_weighted == ["block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"]
    assert set(top_weighted) <= changed
    # --weights none: no statistics to protect, so the unfrozen BatchNorm layers train too.
    top_bn = [layer.name for layer in top if _is_bn(layer)]
    assert len(top_bn) == 4 and set(top_bn) <= changed
    assert _changed(initial.get_layer("head_predictions"), trained.get_layer("head_predictions"))
    assert [r["phase"] for r in _history(result.run_dir)] == ["fine-tune"]


def test_unfreeze_from_with_a_pretrained_base_keeps_batchnorm_frozen(synth, tmp_path,
                                                                       pretrained_base):
    from edgetl.keras import keras

    cfg = tiny_config(synth, tmp_path / "run", strategy="fine-tune",
                      unfreeze_from="block_15_expand", weights=str(pretrained_base), epochs=1,
                      fine_tune_lr=1e-3)
    result = _train(cfg)
    initial, n_base = _initial(cfg)
    trained = _load(Path(result.run_dir) / "model.keras")

    # The run started from the file's weights (not from a fresh initialisation).
    saved = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                           include_top=False, weights=str(pretrained_base))
    for layer in saved.layers:
        if layer.weights:
            assert not _changed(layer, initial.get_layer(layer.name)), layer.name
    bn_stats = initial.get_layer("block_15_expand_BN").get_weights()
    assert not np.allclose(bn_stats[2], 0) and not np.allclose(bn_stats[3], 1)

    base = initial.layers[:n_base]
    start = [layer.name for layer in base].index("block_15_expand")
    changed = {layer.name for layer in base
               if layer.weights and _changed(layer, trained.get_layer(layer.name))}
    unfrozen = [layer for layer in base[start:] if layer.weights and not _is_bn(layer)]
    assert len(unfrozen) == 7  # block_15 and block_16 expand/depthwise/project, Conv_1
    assert changed == {layer.name for layer in unfrozen}
    # gamma, beta, moving mean and variance of every BatchNorm layer, frozen part or not
    for layer in base:
        if _is_bn(layer):
            for before, after in zip(layer.get_weights(),
                                     trained.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(before, after, err_msg=layer.name)


def test_two_phase_runs_head_then_fine_tune(synth, tmp_path):
    cfg = tiny_config(synth, tmp_path / "run", strategy="two-phase", unfreeze=5, epochs=2,
                      fine_tune_epochs=1)
    result = _train(cfg)

    rows = _history(result.run_dir)
    assert [(r["epoch"], r["phase"], r["phase_epoch"]) for r in rows] == [
        ("1", "head", "1"), ("2", "head", "2"), ("3", "fine-tune", "1")]
    assert result.epochs_done == 3
    state = json.loads((Path(result.run_dir) / "state.json").read_text())
    assert state["complete"] is True and state["phase"] == 1
    assert state["checkpoint"] == "p1-e001"
    ckpts = sorted(p.name for p in (Path(result.run_dir) / "checkpoints").iterdir())
    assert "p1-e001" in ckpts and not [c for c in ckpts if c.startswith(".tmp")]


def test_resume_after_a_kill_before_the_first_state_json_repeats_no_history_row(synth, tmp_path):
    """Killed between epoch 1's history row and its state.json: the epoch reruns, once."""
    cfg = tiny_config(synth, tmp_path / "run", strategy="feature-extract", epochs=1)
    run = Path(_train(cfg).run_dir)
    for name in ("state.json", "model.keras", "metrics.json"):
        (run / name).unlink()
    assert len(_history(run)) == 1

    result = _train(cfg.__class__(data=cfg.data, out=cfg.out, resume=True, quiet=True))

    assert result.epochs_done == 1
    assert [(r["epoch"], r["phase"]) for r in _history(run)] == [("1", "head")]
    assert json.loads((run / "state.json").read_text())["complete"] is True
    assert (run / "model.keras").is_file()


def test_resume_without_split_json_rebuilds_it_unless_the_data_changed(synth, tmp_path):
    """Killed between config.json and split.json: the seeded split is made again."""
    import shutil

    from edgetl.errors import EdgetlError

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    cfg = tiny_config(data, tmp_path / "run", epochs=1)
    run = Path(_train(cfg).run_dir)
    split = (run / "split.json").read_text()
    for name in ("split.json", "labels.txt", "state.json", "model.keras", "metrics.json",
                 "history.csv"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints")
    resume = cfg.__class__(data=cfg.data, out=cfg.out, resume=True, quiet=True)

    extra = data / "circle" / "extra.png"
    shutil.copy(next((data / "circle").iterdir()), extra)
    with pytest.raises(EdgetlError, match="has no split.json and its data folder changed"):
        _train(resume)
    assert not (run / "split.json").exists()
    extra.unlink()

    assert _train(resume).epochs_done == 1
    assert (run / "split.json").read_text() == split
    assert (run / "labels.txt").read_text().split() == sorted(d.name for d in data.iterdir())


# --- QAT -----------------------------------------------------------------------------------------


def _weights_by_suffix(layer) -> dict:
    """A layer's arrays keyed by variable name without the layer prefix ('kernel:0', ...)."""
    return {w.name.split("/")[-1]: w.numpy() for w in layer.weights}


def test_qat_fine_tune_wraps_trains_the_top_and_copies_weights_back(synth, tmp_path,
                                                                     pretrained_base):
    cfg = tiny_config(synth, tmp_path / "run", strategy="fine-tune", unfreeze=10, qat=True,
                      qat_scope="all", weights=str(pretrained_base), epochs=1,
                      fine_tune_lr=1e-3, val_split=0.5)
    result = _train(cfg)
    run = Path(result.run_dir)
    initial, n_base = _initial(cfg)

    assert result.qat is True and (run / "qat.h5").is_file()
    qat = _load(run / "qat.h5")
    float_model = _load(run / "model.keras")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "qat"

    # qat_scope 'all': every layer of the float model is wrapped, trained ones included.
    wrapped = {layer.name: layer for layer in qat.layers
               if type(layer).__name__ == "QuantizeWrapperV2"}
    assert all(name.startswith("quant_") for name in wrapped)
    assert {f"quant_{layer.name}" for layer in initial.layers[1:]} == set(wrapped)
    base = initial.layers[:n_base]
    trained_names = [layer.name for layer in base[n_base - 10:]
                     if layer.weights and not _is_bn(layer)]
    assert trained_names == ["block_16_depthwise", "block_16_project", "Conv_1"]
    for name in trained_names + ["head_predictions"]:
        assert wrapped[f"quant_{name}"].trainable

    # Kernels: frozen layers as initialised (tfmot would train them: model-optimization#1067),
    # trained ones changed; the float model holds exactly the QAT-trained weights.
    changed = []
    for layer in initial.layers:
        if not layer.weights:
            continue
        q = _weights_by_suffix(wrapped[f"quant_{layer.name}"])
        f = _weights_by_suffix(float_model.get_layer(layer.name))
        for key, value in _weights_by_suffix(layer).items():
            np.testing.assert_array_equal(f[key], q[key], err_msg=f"{layer.name}/{key}")
            if not np.array_equal(value, q[key]):
                changed.append(layer.name)
    assert sorted(set(changed)) == sorted(trained_names + ["head_predictions"])


def test_qat_scope_trained_wraps_only_trained_layers_and_matches_the_float_model(
        synth, tmp_path, pretrained_base):
    cfg = tiny_config(synth, tmp_path / "run", strategy="fine-tune", unfreeze=10, qat=True,
                      qat_scope="trained", weights=str(pretrained_base), epochs=1,
                      fine_tune_lr=1e-3, val_split=0.5)
    result = _train(cfg)
    run = Path(result.run_dir)
    initial, n_base = _initial(cfg)
    qat = _load(run / "qat.h5")
    float_model = _load(run / "model.keras")

    wrapped = {layer.name[len("quant_"):] for layer in qat.layers
               if type(layer).__name__ == "QuantizeWrapperV2"}
    base = initial.layers[:n_base]
    trained = {layer.name for layer in base[n_base - 10:] if not _is_bn(layer)}
    trained |= {layer.name for layer in initial.layers[n_base:]}  # the head
    # A frozen BatchNorm right after a trained layer is wrapped with it: the converter folds it
    # into that conv, so the conv's raw output must not be fake-quantized on its own.
    folded = {"block_16_depthwise_BN", "block_16_project_BN", "Conv_1_bn"}
    assert wrapped == trained | folded
    frozen = {layer.name for layer in base[:n_base - 10] if layer.weights}
    assert "block_16_expand" in frozen and len(frozen) > 90
    assert frozen <= {layer.name for layer in qat.layers}  # plain float layers, not wrapped

    x, _ = _val_batch(run)
    assert len(x) == 18
    assert _agreement(qat, float_model, x) >= 0.8


def test_qat_on_a_backbone_tfmot_cannot_quantize_is_one_clear_error(tmp_path):
    """tfmot raises AttributeError inside MobileNetV3's TF-op layers: still an EdgetlError."""
    from edgetl.train import quantize

    cfg = tiny_config(tmp_path, tmp_path / "run", backbone="mobilenetv3small", alpha=0.75)
    model, _ = _initial(cfg)
    with pytest.raises(EdgetlError, match="QAT cannot quantize this model.*without --qat"):
        quantize(model, "all")


# --- the registry's QAT column -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(
    __import__("edgetl.backbones", fromlist=["REGISTRY"]).REGISTRY))
def test_registry_qat_flag_is_what_tfmot_does(name, tmp_path):
    """quantize_model succeeds on the backbone (with edgetl's head) exactly when qat=True."""
    from edgetl.backbones import REGISTRY
    from edgetl.train import quantize

    spec = REGISTRY[name]
    cfg = tiny_config(tmp_path, tmp_path / "run", backbone=name,
                      input_size=max(32, spec.min_size), alpha=0.35 if spec.alphas else None)
    model, _ = _initial(cfg)
    try:
        quantize(model, "all")
        works = True
    except EdgetlError as e:
        assert "QAT cannot quantize this model" in str(e)
        works = False
    assert works == spec.qat, f"{name}: registry says qat={spec.qat}, tfmot says {works}"
