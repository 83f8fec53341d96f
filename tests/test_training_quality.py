"""Training a user can trust (issue 14): defaults that learn, the best epoch is the model,
divergence is caught, augmentation is a choice, verification that means something.

The real-data test trains the README's default command (with --weights none, at a tiny size)
on scikit-learn's digits and checks the int8 model on held-out images.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetl.errors import EdgetlError
from typer.testing import CliRunner

from conftest import tiny_config

EDGETL = str(Path(sys.executable).with_name("edgetl"))
TINY = ["--alpha", "0.35", "--weights", "none"]


def _cli(*args):
    from edgetl.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _run(*args, timeout=900):
    return subprocess.run([EDGETL, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _val_loss_and_accuracy(run: Path) -> tuple[float, float]:
    """Cross-entropy and accuracy of the run's saved float model on its validation split."""
    from edgetl.data import make_dataset
    from edgetl.train import load_model

    config = json.loads((run / "config.json").read_text())
    size = config["input_size"]
    val = [tuple(x) for x in json.loads((run / "split.json").read_text())["val"]]
    model = load_model(run / "model.keras")
    losses, right = [], []
    for x, y in make_dataset(val, (size, size), config["preprocessing"], 64, False, False, 0):
        p = model(x, training=False).numpy()
        y = y.numpy()
        losses += list(-np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0)))
        right += list(p.argmax(-1) == y)
    return float(np.mean(losses)), float(np.mean(right))


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --- defaults that learn -------------------------------------------------------------------------


def test_defaults_depend_on_whether_the_weights_are_pretrained():
    from edgetl.config import (DEFAULT_AUGMENT, HEAD_LR, PRETRAINED_FINE_TUNE_LR, SCRATCH_LR,
                               Strategy, TrainConfig)

    scratch, notes = TrainConfig(data="d", weights="none").with_defaults()
    assert scratch.strategy == Strategy.fine_tune  # every layer: nothing pretrained to freeze
    assert scratch.lr == scratch.fine_tune_lr == SCRATCH_LR
    assert scratch.augmentations == DEFAULT_AUGMENT and "flip" not in DEFAULT_AUGMENT
    assert len(notes) == 1 and "every layer" in notes[0]

    pretrained, notes = TrainConfig(data="d").with_defaults()
    assert pretrained.strategy == Strategy.feature_extract and notes == []
    assert (pretrained.lr, pretrained.fine_tune_lr) == (HEAD_LR, PRETRAINED_FINE_TUNE_LR)
    assert PRETRAINED_FINE_TUNE_LR < HEAD_LR
    own = TrainConfig(data="d", base_model="mine.keras").with_defaults()[0]
    assert own.strategy == Strategy.feature_extract  # a base model of one's own is pretrained
    # --weights none re-initialises a base model: its architecture trains from scratch
    fresh = TrainConfig(data="d", weights="none", base_model="mine.keras").with_defaults()[0]
    assert fresh.strategy == Strategy.fine_tune and fresh.from_scratch()

    # From scratch one --lr sets every phase; an explicit choice is kept, with a warning.
    assert TrainConfig(data="d", weights="none", lr=0.01).with_defaults()[0].fine_tune_lr == 0.01
    kept, notes = TrainConfig(data="d", weights="none",
                              strategy="feature-extract").with_defaults()
    assert kept.strategy == Strategy.feature_extract
    assert len(notes) == 1 and notes[0].startswith("warning: --weights none with --strategy "
                                                   "feature-extract")
    # From scratch the unset strategy is fine-tune, so --unfreeze-from is not refused as if it
    # were feature-extract: it runs, with the warning that random layers stay frozen.
    top, notes = TrainConfig(data="d", weights="none", unfreeze_from="Conv_1").with_defaults()
    assert top.strategy == Strategy.fine_tune and len(notes) == 1
    assert "--unfreeze-from Conv_1 keeps random layers frozen" in notes[0]
    with pytest.raises(EdgetlError, match="need --strategy fine-tune or two-phase"):
        TrainConfig(data="d", unfreeze_from="Conv_1").check()  # pretrained: feature-extract
    assert TrainConfig(data="d", augment=False).with_defaults()[0].augmentations == "none"


def test_the_run_prints_and_records_the_settings_it_chose(synth, tmp_path):
    run = tmp_path / "run"
    proc = _run("train", "--data", synth, "--out", run, *TINY, "--input-size", 32,
                "--batch-size", 8, "--epochs", 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = [line for line in proc.stderr.splitlines() if line.startswith(("settings:",
                                                                          "strategy"))]
    assert first[0] == ("settings: from scratch weights, strategy fine-tune (every layer), "
                        "lr 0.003, augment rotate,zoom,contrast, best epoch by val_accuracy")
    assert "every layer" in first[1]
    train = json.loads((run / "config.json").read_text())["train"]
    assert train["strategy"] == "fine-tune" and train["lr"] == train["fine_tune_lr"] == 3e-3
    assert train["augmentations"] == "rotate,zoom,contrast" and train["augment"] is True
    assert train["monitor"] == "val_accuracy" and train["patience"] is None
    # every base layer trained
    from edgetl.train import load_model

    model = load_model(run / "model.keras")
    n_base = json.loads((run / "config.json").read_text())["n_base_layers"]
    assert all(layer.trainable for layer in model.layers[1:n_base])


@pytest.mark.parametrize("args, needle", [
    (["--augment", "flip,blur"], "--augment 'flip,blur': unknown 'blur'"),
    (["--no-augment", "--augment", "flip"], "--no-augment and --augment flip contradict"),
    (["--patience", "0"], "--patience 0 must be at least 1"),
    (["--lr", "0"], "--lr 0"),
])
def test_bad_training_quality_flags_exit_2_in_one_line(synth, tmp_path, args, needle):
    result = _cli("train", "--data", synth, "--out", tmp_path / "run", *TINY, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "run").exists()


# --- augmentation as a choice --------------------------------------------------------------------


def test_augmentation_choice_is_seeded_and_all_four_is_the_old_pipeline(synth):
    from edgetl.backbones import get_backbone, preprocessing
    from edgetl.config import parse_augment
    from edgetl.data import make_dataset, scan_folder

    items = list(scan_folder(synth, (24, 24)).items)
    prep = preprocessing(get_backbone("mobilenetv2"))

    def epoch(augment, seed=1):
        ds = make_dataset(items, (24, 24), prep, 64, True, augment, seed)
        return np.concatenate([x.numpy() for x, _ in ds])

    old = epoch(True)  # what augment=True always meant: the four transforms
    np.testing.assert_array_equal(old, epoch("flip,rotate,zoom,contrast"))
    np.testing.assert_array_equal(old, epoch("contrast, zoom,ROTATE,flip"))  # order, case
    np.testing.assert_array_equal(epoch("rotate,zoom"), epoch("zoom,rotate"))
    np.testing.assert_array_equal(epoch("none"), epoch(False))
    choices = {c: epoch(c) for c in ("flip", "rotate", "zoom", "contrast", "rotate,zoom,contrast")}
    plain = epoch("none")
    for name, x in choices.items():
        assert not np.array_equal(x, plain), name  # each transform does something
        assert x.min() >= -1.0 and x.max() <= 1.0
    assert not np.array_equal(choices["rotate,zoom,contrast"], old)  # no flip: another draw
    # A flip alone mirrors some images exactly, and no others.
    flipped = [np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b)
               for a, b in zip(choices["flip"], plain)]
    same = [np.array_equal(a, b) for a, b in zip(choices["flip"], plain)]
    assert any(flipped) and all(f or s for f, s in zip(flipped, same))
    assert parse_augment("none") == () and parse_augment("zoom,flip") == ("flip", "zoom")


# --- the best epoch is the model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def patient_run(learnable, tmp_path_factory):
    from edgetl.train import train

    out = tmp_path_factory.mktemp("best") / "run"
    result = train(tiny_config(learnable, out, input_size=48, batch_size=16, epochs=12,
                               lr=1e-2, monitor="val_loss", patience=2))
    return out, result


def test_the_saved_model_is_the_best_epoch_and_it_is_recorded(patient_run):
    run, result = patient_run
    rows = _history(run)
    losses = [float(r["val_loss"]) for r in rows]
    best = int(np.argmin(losses))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"] == "val_loss"
    assert metrics["best_epoch"]["epoch"] == result.best_epoch == best + 1
    assert metrics["best_epoch"]["val_loss"] == pytest.approx(losses[best])
    # The weights saved are that epoch's: its validation loss and accuracy, not the last one's.
    loss, acc = _val_loss_and_accuracy(run)
    assert loss == pytest.approx(losses[best], abs=1e-4)
    assert acc == pytest.approx(float(rows[best]["val_accuracy"]), abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(acc)
    state = json.loads((run / "state.json").read_text())
    assert state["complete"] is True and state["best"]["checkpoint"] == f"p0-e{best + 1:03d}"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert f"p0-e{best + 1:03d}" in kept and f"p0-e{len(rows):03d}" in kept


def test_patience_stops_the_phase_when_the_best_epoch_is_that_old(patient_run):
    run, result = patient_run
    losses = [float(r["val_loss"]) for r in _history(run)]
    # The run stopped at the first epoch two epochs past the best so far, or ran to the end.
    stop = next((e for e in range(1, len(losses) + 1)
                 if e - (int(np.argmin(losses[:e])) + 1) >= 2), 12)
    assert len(losses) == stop == result.epochs_done
    assert stop < 12, losses  # this seeded run does stop early: the check above is not vacuous


PRELUDE = """
import os, signal, sys
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.fspath(dst).endswith("model.keras"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv[0] = "edgetl"
from edgetl.cli import app
app()
"""


def test_resume_after_an_early_stop_trains_no_more_and_keeps_the_best(learnable, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", learnable, "--out", run, *TINY, "--input-size", 48,
            "--batch-size", 16, "--epochs", 12, "--lr", "1e-2", "--monitor", "val_loss",
            "--patience", 1, "--augment", "none", "--quiet"]
    killed = subprocess.run([sys.executable, "-c", PRELUDE, *map(str, args)],
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((run / "state.json").read_text())
    assert state.get("ended") == "early-stopped" and state["epoch"] < 12
    rows_before = _history(run)
    proc = _run(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _history(run) == rows_before  # no epoch trained again or added
    losses = [float(r["val_loss"]) for r in rows_before]
    assert f"best epoch: {int(np.argmin(losses)) + 1}" in proc.stdout
    assert _val_loss_and_accuracy(run)[0] == pytest.approx(min(losses), abs=1e-4)


# --- divergence ----------------------------------------------------------------------------------


def test_a_run_that_diverges_from_the_start_exits_1_and_saves_no_model(learnable, tmp_path):
    run = tmp_path / "run"
    proc = _run("train", "--data", learnable, "--out", run, *TINY, "--input-size", 48,
                "--batch-size", 16, "--epochs", 3, "--lr", "1e6")
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = _lines(proc.stderr, "error: ")
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith("error: training diverged: ")
    assert "no earlier epoch is usable" in errors[0] and "try 1e+05" in errors[0]
    assert not run.exists()  # nothing half-written


def test_a_run_that_diverges_later_stops_and_keeps_its_best_epoch(learnable, tmp_path):
    # A base that has learned the shapes (trained from scratch), then two-phase on top of it with
    # a fine-tune learning rate that blows the weights up.
    base = tmp_path / "base"
    proc = _run("train", "--data", learnable, "--out", base, *TINY, "--input-size", 48,
                "--batch-size", 16, "--epochs", 6, "--augment", "none", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    proc = _run("train", "--data", learnable, "--out", run, "--base-model", base / "model.keras",
                "--input-size", 48, "--batch-size", 16, "--strategy", "two-phase", "--epochs", 3,
                "--fine-tune-epochs", 3, "--fine-tune-lr", "1e6", "--augment", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]  # a good epoch was kept: exit 0, warned
    warnings = _lines(proc.stderr, "warning: training diverged: ")
    assert len(warnings) == 1 and "at epoch 4 (fine-tune 1/3)" in warnings[0]
    assert "kept the best epoch" in warnings[0] and "--fine-tune-lr" in warnings[0]
    rows = _history(run)
    assert [r["phase"] for r in rows] == ["head"] * 3  # the diverged epoch left nothing behind
    accs = [(float(r["val_accuracy"]), -float(r["val_loss"])) for r in rows]
    best = max(range(3), key=lambda i: accs[i]) + 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"]["epoch"] == best and metrics["best_epoch"]["phase_name"] == "head"
    assert "diverged" not in metrics["stopped"]["reason"]  # the reason, worded for people
    assert metrics["stopped"]["reason"].endswith("at epoch 4 (fine-tune 1/3)")
    loss, acc = _val_loss_and_accuracy(run)
    assert loss == pytest.approx(float(rows[best - 1]["val_loss"]), abs=1e-4)
    assert metrics["accuracy"] == pytest.approx(acc) == pytest.approx(accs[best - 1][0])
    assert acc > 0.35 and not metrics["best_epoch"]["collapsed"]  # not blown up (chance 0.25)


def test_divergence_rules():
    from edgetl.train import divergence, epoch_score

    ok = {"loss": 0.9, "val_loss": 1.0, "collapsed": False}
    one = {"loss": 1.4, "val_loss": 1.39, "collapsed": True}
    assert divergence(ok, [], 4, learned=False) is None
    assert "became nan" in divergence(dict(ok, loss=math.nan), [], 4, learned=False)
    assert "became inf" in divergence(dict(ok, val_loss=math.inf), [], 4, learned=True)
    assert "exploded" in divergence(dict(ok, loss=1e9), [], 4, learned=False)
    # One class before the model has learned: a slow start, not a collapse.
    assert divergence(one, [one, one], 4, learned=False) is None
    # After it has learned: two one-class epochs in a row are a collapse; one is not.
    assert divergence(one, [ok], 4, learned=True) is None
    assert "collapsed" in divergence(one, [ok, one], 4, learned=True)
    # Ranking: accuracy, ties to the lower loss; a collapsed epoch below any other.
    assert epoch_score({"val_accuracy": 0.8, "val_loss": 0.5}, "val_accuracy") > epoch_score(
        {"val_accuracy": 0.8, "val_loss": 0.6}, "val_accuracy")
    assert epoch_score({"val_accuracy": 0.9, "val_loss": 9, "collapsed": True},
                       "val_accuracy") < epoch_score({"val_accuracy": 0.3, "val_loss": 2},
                                                     "val_accuracy")
    assert epoch_score({"val_accuracy": 0.5, "val_loss": math.nan}, "val_loss") is None


# --- verification that means something -----------------------------------------------------------


def test_drop_gate_accounts_for_the_sample_size():
    from edgetl.export import drop_gate, paired_difference

    truth = np.zeros(32, int)
    keras = np.zeros(32, int)
    tfl = keras.copy()
    tfl[0] = 1  # one image of 32 changes its answer: 3.1 points
    p = paired_difference(keras, tfl, truth)
    assert p["diff_points"] == pytest.approx(3.125) and (p["a_only"], p["b_only"]) == (1, 0)
    low, high = p["ci95_points"]
    assert low < 0 < 3.125 < high

    def report(pd, n, k_acc):
        return {"drop_points": pd["diff_points"], "drop_ci95_points": pd["ci95_points"],
                "images": n, "points_per_image": 100 / n, "keras_accuracy": k_acc,
                "tflite_accuracy": k_acc - pd["diff_points"] / 100,
                "keras_only_right": pd["a_only"], "tflite_only_right": pd["b_only"]}

    gate, why = drop_gate(report(p, 32, 1.0), 2.0)
    assert gate == "undecided" and "too small to decide" in why and "3.12 points" in why
    # The same drop rate on 1,000 images is a real drop.
    truth, keras = np.zeros(1000, int), np.zeros(1000, int)
    tfl = keras.copy()
    tfl[:40] = 1
    gate, why = drop_gate(report(paired_difference(keras, tfl, truth), 1000, 1.0), 2.0)
    assert gate == "failed" and "more than --max-drop 2.0" in why
    # No drop on a set where one image outweighs the gate: passed, and said so.
    gate, why = drop_gate(report(paired_difference(keras[:32], keras[:32], truth[:32]), 32, 1.0),
                          2.0)
    assert gate == "passed" and "too small to judge --max-drop 2.0" in why


def test_paired_difference_is_the_benchmarks_one():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from run import paired
    finally:
        sys.path.pop(0)
    from edgetl.export import paired_difference

    rng = np.random.RandomState(0)
    truth, a, b = (rng.randint(0, 3, 200) for _ in range(3))
    assert paired_difference(a, b, truth) == paired(a, b, truth)


def test_export_warns_about_a_model_that_predicts_one_class(patient_run, tmp_path):
    import shutil

    from edgetl.train import _save_model, load_model

    src, _ = patient_run
    run = tmp_path / "onesided"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("export", "checkpoints"))
    model = load_model(run / "model.keras")
    head = model.get_layer("head_predictions")
    kernel, bias = head.get_weights()
    bias[:] = 0
    bias[2] = 50.0  # whatever the image, class 2
    head.set_weights([kernel * 0, bias])
    _save_model(model, run / "model.keras")

    result = _cli("export", run, "--int8", "--num-calibration", 12, "--max-drop", 5)
    assert result.exit_code == 0, result.output  # the conversion itself is faithful
    out = result.stdout
    names = (run / "labels.txt").read_text().split()
    assert "warning: the model is near chance: tflite accuracy 0.2500" in out
    others = [n for i, n in enumerate(names) if i != 2]
    assert f"3 of 4 classes are never predicted on the validation images ({', '.join(others)})" \
        in out
    assert "recall per class (tflite): " in out and f"{names[2]} 1.000" in out
    assert "verification: passed (the conversion), with 2 warning(s) above" in out
    acc = json.loads((run / "export" / "onesided_int8.json").read_text())[
        "verification"]["accuracy"]
    assert acc["tflite_accuracy"] == acc["chance_accuracy"] == 0.25
    assert acc["never_predicted"] == others and len(acc["warnings"]) == 2
    assert acc["per_class_tflite"][names[2]] == 1.0


# --- real data: scikit-learn digits --------------------------------------------------------------


def _digits(root: Path) -> tuple[Path, Path]:
    """scikit-learn's 1,797 digits (8 x 8, 0..16) as PNG class folders: a seeded fifth held out."""
    from PIL import Image

    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    order = np.random.RandomState(0).permutation(len(d.target))
    for i, k in enumerate(order):
        folder = root / ("test" if i < len(order) // 5 else "train") / str(d.target[k])
        folder.mkdir(parents=True, exist_ok=True)
        img = (d.images[k] * (255 / 16)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img, "L").save(folder / f"{k:04d}.png")
    return root / "train", root / "test"


@pytest.mark.slow
def test_digits_default_command_from_scratch_reaches_90_percent_int8_held_out(tmp_path):
    from edgetl.data import scan_folder
    from edgetl.export import load_batch
    from edgetl.runner import Model

    train_dir, test_dir = _digits(tmp_path / "digits")
    run = tmp_path / "run"
    # The README's default command with --weights none; a small MobileNetV2 to fit CI's CPUs.
    proc = _run("train", "--data", train_dir, "--out", run, *TINY, "--input-size", 32,
                timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("export", run, "--int8", "--float32", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    folder = scan_folder(test_dir, (32, 32))
    config = json.loads((run / "config.json").read_text())
    assert list(folder.class_names) == config["class_names"]
    truth = np.array([label for _, label in folder.items])
    x = load_batch([p for p, _ in folder.items], 32, config["preprocessing"])
    figures = {}
    for mode in ("float32", "int8"):
        model = Model(str(run / "export" / f"run_{mode}.tflite"))
        pred = np.concatenate([np.asarray(model.predict(x[i:i + 64])).reshape(
            len(x[i:i + 64]), -1).argmax(-1) for i in range(0, len(x), 64)])
        figures[mode] = float((pred == truth).mean())
    print(f"digits held out ({len(truth)} images): float32 {figures['float32']:.4f}, "
          f"int8 {figures['int8']:.4f}")
    assert figures["int8"] >= 0.90, figures
    assert figures["float32"] >= 0.90, figures
