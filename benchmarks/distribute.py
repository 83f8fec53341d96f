"""Training throughput under tf.distribute: what edgetl train --distribute costs or gains.

    .venv/bin/python benchmarks/distribute.py                 # this machine: 1 vs 2 replicas
                                                              # (CPU devices), 1 vs 2 workers
    .venv/bin/python benchmarks/distribute.py --mode gpu      # a multi-GPU machine: images/s per
                                                              # replica count (1, 2, 4, ... GPUs)

Each configuration runs in its own process (devices and multi-worker servers are fixed when
TensorFlow starts): a QAT MobileNetV2 (weights none, all layers training) under the strategy,
fed by an in-memory repeated dataset, timed by Keras' own fit loop after warm-up steps. Local
mode interleaves A B / B A per round and prints the median of the per-round ratios (2 vs 1) with
their min-max; on a machine whose cores are already busy, a ratio below 1 is the overhead of the
strategy (all-reduce, per-replica graphs, a second process), not a measure of scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One configuration: prints {'images_per_s': ...} from the chief."""
    from edgetl import distribute
    from edgetl.config import TrainConfig

    cfg = TrainConfig(data="-", distribute=args.kind, batch_size=args.batch, out="-")
    distribute.prepare(cfg)
    from edgetl.keras import keras, tf, tfmot
    import numpy as np

    dist = distribute.strategy(cfg)
    with dist.scope():
        base = keras.applications.MobileNetV2(input_shape=(args.size, args.size, 3),
                                              include_top=False, weights=None, alpha=args.alpha)
        x = keras.layers.GlobalAveragePooling2D()(base.output)
        model = keras.Model(base.inputs, keras.layers.Dense(10, activation="softmax")(x))
        if args.qat:
            model = tfmot.quantization.keras.quantize_model(model)
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    n = args.batch * 4
    xs = rng.random((n, args.size, args.size, 3), np.float32)
    ys = rng.integers(0, 10, n)
    ds = dist.shard(tf.data.Dataset.from_tensor_slices((xs, ys)).repeat().batch(args.batch))
    marks = {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == args.warmup:
                marks["t0"] = time.perf_counter_ns()

        def on_train_batch_end(self, batch, logs=None):
            marks["t1"] = time.perf_counter_ns()

    model.fit(ds, steps_per_epoch=args.warmup + args.steps, epochs=1, verbose=0,
              callbacks=[Clock()])
    seconds = (marks["t1"] - marks["t0"]) / 1e9
    print(json.dumps({"images_per_s": args.steps * args.batch / seconds,
                      "replicas": dist.replicas, "workers": dist.workers}), flush=True)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def measure(kind: str, args, replicas: int = 1, workers: int = 1, gpus: str | None = None):
    """Images/s of one configuration (run in fresh processes, killed after --timeout)."""
    cmd = [sys.executable, __file__, "--child", "--kind", kind, "--batch", str(args.batch),
           "--size", str(args.size), "--alpha", str(args.alpha), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--qat"] if args.qat else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TF_CONFIG", None)
    if replicas > 1 and gpus is None:
        env["EDGETL_CPU_REPLICAS"] = str(replicas)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    envs = [env]
    if workers > 1:
        cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(workers)]}
        envs = [dict(env, TF_CONFIG=json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": i}}))
                for i in range(workers)]
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, start_new_session=True) for e in envs]
    try:
        out = procs[0].communicate(timeout=args.timeout)[0]
        for p in procs[1:]:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if procs[0].returncode != 0 or not lines:
        raise SystemExit(f"{kind} replicas={replicas} workers={workers} failed "
                         f"(exit {procs[0].returncode})")
    return json.loads(lines[-1])["images_per_s"]


def local(args) -> dict:
    pairs = {"2 replicas / 1 (mirrored, CPU devices)": (("none", 1, 1), ("mirrored", 2, 1)),
             "2 workers / 1 (multi-worker, local processes)": (("none", 1, 1),
                                                               ("multi-worker", 1, 2))}
    report = {}
    for name, (a, b) in pairs.items():
        ratios, rows = [], []
        for r in range(args.rounds):
            order = (a, b) if r % 2 == 0 else (b, a)
            got = {cfg: measure(cfg[0], args, replicas=cfg[1], workers=cfg[2]) for cfg in order}
            ratios.append(got[b] / got[a])
            rows.append({"one": round(got[a], 2), "two": round(got[b], 2)})
            print(f"  {name} round {r + 1}: {got[a]:.1f} vs {got[b]:.1f} images/s",
                  file=sys.stderr, flush=True)
        report[name] = {"median_ratio": round(statistics.median(ratios), 3),
                        "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                        "rounds": rows}
    return report


def gpu(args) -> dict:
    """Images/s per replica count over the visible GPUs (1, 2, 4, ... up to all)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = listed.split(",") if listed else [str(i) for i in range(_gpu_count())]
    if not ids:
        raise SystemExit("no GPU visible: --mode gpu is for a multi-GPU machine")
    counts = sorted({c for c in (1, 2, 4, 8, 16) if c <= len(ids)} | {len(ids)})
    report = {}
    per_gpu = args.batch
    for c in counts:
        args.batch = per_gpu * c  # weak scaling: the same batch on every GPU
        ips = measure("mirrored" if c > 1 else "none", args, gpus=",".join(ids[:c]))
        report[str(c)] = {"images_per_s": round(ips, 1),
                          "per_replica": round(ips / c, 1)}
        print(f"  {c} GPU(s): {ips:.1f} images/s", file=sys.stderr, flush=True)
    base = report["1"]["images_per_s"]
    for c in report:
        report[c]["scaling"] = round(report[c]["images_per_s"] / base, 3)
    return report


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("local", "gpu"), default="local")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="global batch [32]; gpu mode: per GPU [64]")
    p.add_argument("--size", type=int, default=None, help="input px [32; gpu: 224]")
    p.add_argument("--alpha", type=float, default=None, help="[0.35; gpu: 1.0]")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--qat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="none", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu_mode = args.mode == "gpu"
    args.size = args.size or (224 if gpu_mode else 32)
    args.alpha = args.alpha or (1.0 if gpu_mode else 0.35)
    args.batch = args.batch or (64 if gpu_mode else 32)
    if args.child:
        return child(args)
    result = local(args) if not gpu_mode else gpu(args)
    report = {"mode": args.mode, "results": result,
              "settings": {k: getattr(args, k) for k in ("batch", "size", "alpha", "steps",
                                                         "warmup", "qat", "rounds")},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_avg": os.getloadavg()},
              "command": " ".join(sys.argv)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
