"""edgetl train --distribute: refusals before TensorFlow starts, fake-quant ranges agreed across
replicas, QAT with 1 and 2 replicas giving the same int8 model, and a real 2-worker run that loses
a worker, resumes and exports.

Every TensorFlow run is a subprocess with a hard timeout (devices and multi-worker strategies
must be set before TensorFlow starts, and a hung worker must not hang the suite); worker process
groups are killed whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

EDGETL = str(Path(sys.executable).with_name("edgetl"))
TINY = ["--backbone", "mobilenetv2", "--alpha", "0.35", "--input-size", "32", "--weights", "none",
        "--no-augment", "--quiet", "--seed", "1"]
# Stated tolerances for QAT trained on 1 vs 2 replicas at the same global batch (README):
RANGE_TOL = 0.05  # largest difference of a fake-quant range bound, relative to its span
OUTPUT_TOL = 0.05  # largest difference of a dequantized int8 class probability


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "EDGETL_CPU_REPLICAS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli(args, timeout=900, **env):
    return subprocess.run([EDGETL, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for word in words:
        assert word in lines[0]
    return lines[0]


# --- refusals before TensorFlow starts ----------------------------------------------------------

def _tf_config(index=0, workers=2):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{20000 + i}" for i in range(workers)]},
                       "task": {"type": "worker", "index": index}})


@pytest.mark.parametrize("env, words", [
    ({}, ["TF_CONFIG", "multi-worker"]),
    ({"TF_CONFIG": "{not json"}, ["TF_CONFIG is not valid"]),
    ({"TF_CONFIG": _tf_config(index=5)}, ["worker:5", "not in its cluster"]),
    ({"TF_CONFIG": _tf_config(), "EDGETL_WORKER_TIMEOUT": "soon"}, ["EDGETL_WORKER_TIMEOUT"]),
])
def test_multi_worker_refusals(synth, tmp_path, env, words):
    out = tmp_path / "run"
    proc = _cli(["train", "--data", synth, "--out", out, *TINY, "--distribute", "multi-worker"],
                timeout=120, **env)
    _one_line_error(proc, *words)
    assert not out.exists()


def test_multi_worker_needs_out(synth, tmp_path):
    proc = _cli(["train", "--data", synth, *TINY, "--distribute", "multi-worker"], timeout=120,
                TF_CONFIG=_tf_config())
    _one_line_error(proc, "--out")


def test_bad_cpu_replicas(synth, tmp_path):
    out = tmp_path / "run"
    proc = _cli(["train", "--data", synth, "--out", out, *TINY, "--distribute", "mirrored"],
                timeout=120, EDGETL_CPU_REPLICAS="two")
    _one_line_error(proc, "EDGETL_CPU_REPLICAS", "'two'")
    assert not out.exists()


def test_config_round_trip():
    from edgetl.config import Distribute, TrainConfig

    cfg = TrainConfig(data="d", distribute=Distribute.multi_worker)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.distribute is Distribute.multi_worker
    assert TrainConfig.from_dict({"data": "d"}).distribute is Distribute.auto  # older runs


# --- fake-quant ranges across replicas ----------------------------------------------------------

SYNC_CHECK = r"""
import json, numpy as np
from edgetl.keras import tf, keras, tfmot
from edgetl import distribute
from edgetl.config import TrainConfig
dist = distribute.strategy(TrainConfig(data="-", distribute="mirrored", batch_size=8))
with dist.scope():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    model = tfmot.quantization.keras.quantize_model(keras.Model(inp, out))
    model.compile("adam", "sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
# Replica 0 sees images in [0, 1], replica 1 in [0, 3]: the input range differs per replica.
x = np.concatenate([rng.random((4, 8, 8, 3)), 3 * rng.random((4, 8, 8, 3))]).astype("float32")
y = rng.integers(0, 2, 8)
model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
def spread():
    return {v.name: float(np.max(np.abs(v.values[0].numpy() - v.values[1].numpy())))
            for v in distribute._range_variables(model)}
before = spread()
n = distribute.sync_ranges(dist, model)
after = spread()
top = [v for v in model.weights if v.name.endswith("quantize_layer_max:0")][0]
print(json.dumps({"replicas": dist.replicas, "synced": n, "before": before, "after": after,
                  "input_max": float(top.numpy()), "data_max": float(x.max())}))
"""


def test_ranges_agree_across_replicas(tmp_path):
    """tfmot's input range is assigned per replica (no aggregation): without the sync, replica
    0's copy (the one saved) knows only its own half of the batch."""
    proc = subprocess.run([sys.executable, "-c", SYNC_CHECK], capture_output=True, text=True,
                          timeout=300, env=_env(EDGETL_CPU_REPLICAS=2), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2 and report["synced"] > 0
    assert max(report["before"].values()) > 0.5  # the bug: replicas disagree
    assert max(report["after"].values()) == 0.0  # fixed: every replica holds the same range
    assert report["input_max"] == pytest.approx(report["data_max"], rel=1e-5)  # the global max


# --- QAT on 1 vs 2 replicas ---------------------------------------------------------------------

def _int8_outputs(model_path: Path, images: np.ndarray) -> np.ndarray:
    """Dequantized class probabilities of an int8 .tflite on float images."""
    from edgetl.runner import _import_interpreter

    interp = _import_interpreter()[2](model_path=str(model_path))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    (s, z), (os_, oz) = inp["quantization"], out["quantization"]
    probs = []
    for img in images:
        interp.set_tensor(inp["index"], np.clip(np.round(img / s + z), -128, 127)
                          .astype(inp["dtype"])[None])
        interp.invoke()
        probs.append((interp.get_tensor(out["index"]).astype(np.float32) - oz) * os_)
    return np.concatenate(probs)


def _qat_ranges(path: Path) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.endswith(("_min:0", "_max:0")) \
                    and "optimizer" not in name:
                out[name] = np.asarray(obj)
        f.visititems(visit)
    return out


@pytest.mark.slow
def test_qat_one_vs_two_replicas_same_int8(learnable, tmp_path):
    """The same seeded QAT run on 1 and on 2 replicas (two CPU devices, same global batch of 16)
    gives the same fake-quant ranges and int8 outputs within the stated tolerances."""
    args = ["--data", learnable, *TINY, "--batch-size", "16", "--epochs", "2", "--qat",
            "--strategy", "fine-tune", "--unfreeze", "20", "--fine-tune-lr", "1e-3",
            "--qat-scope", "all"]
    runs = {}
    for replicas in (1, 2):
        run = tmp_path / f"r{replicas}"
        proc = _cli(["train", *args, "--out", run, "--distribute",
                     "mirrored" if replicas > 1 else "none"], timeout=1200,
                    EDGETL_CPU_REPLICAS=replicas)
        assert proc.returncode == 0, proc.stderr[-3000:]
        dist = json.loads((run / "config.json").read_text())["distribute"]
        assert (dist["strategy"], dist["replicas"], dist["workers"]) == (
            ("mirrored", 2, 1) if replicas > 1 else ("none", 1, 1))
        assert dist["lr_rule"].startswith("not scaled")
        exp = _cli(["export", run, "--int8", "--num-calibration", "40", "--no-verify"],
                   timeout=900)
        assert exp.returncode == 0, exp.stderr[-3000:]
        runs[replicas] = run

    r1, r2 = _qat_ranges(runs[1] / "qat.h5"), _qat_ranges(runs[2] / "qat.h5")
    assert r1.keys() == r2.keys() and len(r1) > 50
    worst = max(float(np.max(np.abs(r1[k] - r2[k]))) / max(1e-6, float(np.max(np.abs(r1[k]))))
                for k in r1)
    assert worst <= RANGE_TOL, worst

    from edgetl.runner import load_image, preprocess  # the device's decode + normalisation

    split = json.loads((runs[1] / "split.json").read_text())
    prep = json.loads((runs[1] / "config.json").read_text())["preprocessing"]
    images = preprocess(np.stack([load_image(p, (32, 32)) for p, _ in split["val"]]), prep)
    tfl = {k: next(r.rglob("*int8*.tflite")) for k, r in runs.items()}
    p1, p2 = _int8_outputs(tfl[1], images), _int8_outputs(tfl[2], images)
    assert float(np.max(np.abs(p1 - p2))) <= OUTPUT_TOL
    assert float(np.mean(p1.argmax(1) == p2.argmax(1))) >= 0.95


# --- two local workers --------------------------------------------------------------------------

def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextmanager
def _workers(args, tmp, n=2, timeout=60):
    """n local worker processes of `edgetl train`, each in its own process group (killed at the
    end whatever happens); TMPDIR points into tmp so their temporary folders can be checked."""
    ports = _free_ports(n)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for i in range(n):
            conf = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            log = open(tmp / f"worker{i}.log", "w")
            procs.append(subprocess.Popen(
                [EDGETL, "train", *map(str, args), "--distribute", "multi-worker"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=_env(TF_CONFIG=conf, EDGETL_WORKER_TIMEOUT=timeout, TMPDIR=tmp)))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


def _wait(proc, seconds):
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker still running after {seconds} s (a hang)")


@pytest.mark.slow
def test_two_workers_kill_resume_export(synth, tmp_path):
    """Two local workers train a tiny QAT model; worker 1 is killed after the first epoch and
    worker 0 ends with one line; both restart with --resume, finish from epoch 1, and the chief's
    run exports to a verified int8 model. Only the chief's run folder is written."""
    run = tmp_path / "run"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    args = ["--data", synth, "--out", run, *TINY, "--batch-size", "8", "--epochs", "2", "--qat"]
    with _workers(args, scratch) as (w0, w1):
        deadline = time.time() + 900
        while not (run / "state.json").exists():
            assert time.time() < deadline and w0.poll() is None, \
                (scratch / "worker0.log").read_text()[-3000:]
            time.sleep(1)
        os.killpg(w1.pid, signal.SIGKILL)
        killed = time.time()
        rc = _wait(w0, 300)
    log = (scratch / "worker0.log").read_text()
    lines = [line for line in log.splitlines() if line.strip()]
    assert rc == 1 and lines[-1].startswith("error: multi-worker run lost a worker"), log[-3000:]
    assert len([line for line in lines if line.startswith("error:")]) == 1
    assert "--resume" in lines[-1] and time.time() - killed < 300
    assert json.loads((run / "state.json").read_text())["epoch"] >= 1

    left = {p for p in scratch.iterdir() if p.name.startswith("edgetl-worker-")}  # SIGKILLed
    with _workers([*args, "--resume"], scratch) as (w0, w1):
        assert _wait(w0, 1200) == 0, (scratch / "worker0.log").read_text()[-3000:]
        assert _wait(w1, 120) == 0, (scratch / "worker1.log").read_text()[-3000:]
    hist = (run / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in hist[1:]] == ["1", "2"]
    assert json.loads((run / "state.json").read_text()).get("complete") is True
    conf = json.loads((run / "config.json").read_text())["distribute"]
    assert (conf["strategy"], conf["workers"], conf["replicas"]) == ("multi-worker", 2, 2)
    assert "AutoShardPolicy.DATA" in conf["sharding"]
    # Workers that finish remove their private copies (a SIGKILLed one cannot).
    assert {p for p in scratch.iterdir() if p.name.startswith("edgetl-worker-")} == left

    exp = _cli(["export", run, "--int8", "--num-calibration", "20"], timeout=900)
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert list(run.rglob("*int8*.tflite"))


def test_lone_worker_gives_up_in_one_line(synth, tmp_path):
    """A worker whose peers never start ends after EDGETL_WORKER_TIMEOUT with one line."""
    run = tmp_path / "run"
    conf = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]},
                       "task": {"type": "worker", "index": 0}})
    t0 = time.time()
    proc = subprocess.run([EDGETL, "train", "--data", str(synth), "--out", str(run), *TINY,
                           "--distribute", "multi-worker"], capture_output=True, text=True,
                          timeout=400, env=_env(TF_CONFIG=conf, EDGETL_WORKER_TIMEOUT=15))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and lines == [
        "error: multi-worker: worker:0 could not join the cluster within 15 s; start every "
        "worker listed in TF_CONFIG (or raise EDGETL_WORKER_TIMEOUT)"], proc.stderr[-2000:]
    assert time.time() - t0 < 400
    assert not run.exists() or not any(run.iterdir())
