#!/usr/bin/env python3
"""Soak: does memory stay flat over many inferences and over a large evaluation folder?

    .venv/bin/python benchmarks/soak.py                 # both parts (~5 min on 2 cores)
    .venv/bin/python benchmarks/soak.py --invokes 500 --images 100   # a smoke run

1. **Invoke soak.** The device runner (``edgetl.runner.Model``, the code shipped to devices)
   loads a MobileNetV2 1.0/224 int8 model and classifies 10,000 times through ``Model.predict``
   (quantize the input, set the tensor, invoke, read and dequantize the output: the per-image
   path of an evaluation), cycling through real photos. RSS (VmRSS) is sampled every 1,000
   invokes; the figure is the growth from the end of the warm-up (200 invokes) to the last
   invoke [goal: under 1 MB].
2. **Bench over a large folder.** ``edgetl bench MODEL --data DIR`` (each model in a fresh runner
   process) on folders of 100 and of 1,000 images: the runner's peak RSS must not grow with the
   folder (images are decoded batch by batch, never the whole set; 1,000 decoded 224 px images
   would be 150 MB).

The model is Google's ``tf2_mobilenet_v2_1.0_224_ptq.tflite`` from ../shared/realdata/coral, or
with ``--export`` an edgetl int8 export of a random-weight MobileNetV2 1.0/224 made with
``edgetl.export.convert`` (about a minute on 2 cores). Timings are printed for information only.
Writes the results as JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORAL = ROOT.parent / "shared" / "realdata" / "coral"
GOOGLE_V2 = CORAL / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
PHOTOS = {"cat.bmp": "Egyptian cat", "bird.bmp": "chickadee",
          "grace_hopper.bmp": "military uniform"}

import numpy as np  # noqa: E402

from edgetl import runner  # noqa: E402


def rss_mb() -> float:
    return runner.memory_info()["rss_mb"]


def export_mobilenet_v2(out: Path) -> Path:
    """An edgetl int8 export of MobileNetV2 1.0/224 (random weights, 1000 classes)."""
    from edgetl.config import IOType, Quantization
    from edgetl.export import convert
    from edgetl.keras import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=1.0, input_shape=(224, 224, 3), weights=None,
                                           classes=1000)
    calib = np.random.default_rng(0).uniform(-1, 1, (16, 224, 224, 3)).astype(np.float32)
    raw = convert(model, Quantization.int8, IOType.int8, calib)
    meta = {"name": "mobilenetv2_random", "mode": "int8",
            "input": {"height": 224, "width": 224, "mean": [127.5] * 3, "std": [127.5] * 3,
                      "channel_order": "RGB"}}
    path = out / "mobilenetv2_int8.tflite"
    labels_file = CORAL / "imagenet_labels.txt"  # line 0 is 'background'
    labels = (labels_file.read_text().splitlines()[1:1001] if labels_file.is_file()
              else [f"class_{i}" for i in range(1000)])
    path.write_bytes(runner.attach_metadata(raw, meta, labels))
    return path


def invoke_soak(model_path: Path, invokes: int, warmup: int = 200, every: int = 1000) -> dict:
    model = runner.Model(model_path, threads=2)
    size = model.input_size
    prep = model.default_prep()
    photos = [CORAL / name for name in PHOTOS if (CORAL / name).is_file()]
    if photos:
        pixels = np.stack([runner.load_image(p, size) for p in photos])
    else:
        pixels = np.random.default_rng(0).integers(0, 255, (3,) + size + (3,), dtype=np.uint8)
    inputs = runner.preprocess(pixels, prep)
    for i in range(warmup):
        model.predict(inputs[i % len(inputs)])
    gc.collect()
    start_rss = rss_mb()
    samples = [(0, start_rss)]
    t0 = time.perf_counter()
    top1 = []
    for i in range(1, invokes + 1):
        scores = model.predict(inputs[i % len(inputs)])
        if i <= len(inputs):
            top1.append(int(scores.argmax()))
        if i % every == 0 or i == invokes:
            samples.append((i, rss_mb()))
    seconds = time.perf_counter() - t0
    gc.collect()
    end_rss = rss_mb()
    return {
        "model": str(model_path),
        "interpreter": f"{model.interpreter_name} {model.interpreter_version}",
        "invokes": invokes,
        "warmup": warmup,
        "rss_after_warmup_mb": round(start_rss, 2),
        "rss_end_mb": round(end_rss, 2),
        "rss_growth_mb": round(end_rss - start_rss, 3),
        "rss_samples_mb": [(i, round(v, 2)) for i, v in samples],
        "peak_rss_mb": round(runner.memory_info()["peak_rss_mb"], 1),
        "mean_ms_per_predict": round(seconds * 1000 / invokes, 2),
        "top1_of_the_photos": [model.labels[k] if model.labels else k for k in top1],
    }


def make_folder(root: Path, count: int) -> Path:
    """``count`` 224 px JPEGs in 3 class folders named by ImageNet labels (cropped real photos)."""
    from PIL import Image

    rng = np.random.default_rng(count)
    sources = [(label, Image.open(CORAL / name).convert("RGB")) for name, label in PHOTOS.items()
               if (CORAL / name).is_file()]
    for i in range(count):
        label, img = sources[i % len(sources)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.7, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        (root / label).mkdir(parents=True, exist_ok=True)
        img.crop((x, y, x + side, y + side)).resize((224, 224)).save(
            root / label / f"{i:05d}.jpg", quality=90)
    return root


def bench_soak(model_path: Path, counts: tuple, work: Path) -> dict:
    from edgetl.bench import bench

    out = {}
    for count in counts:
        folder = make_folder(work / f"images{count}", count)
        t0 = time.perf_counter()
        row = bench([model_path], data=folder, runs=20, warmup=5, threads=2)[0]
        assert row["error"] is None, row["error"]
        acc = row["report"]["accuracy"]
        out[count] = {"images": acc["images"], "evaluated": acc["evaluated"],
                      "top1": acc["top1"], "runner_peak_rss_mb": round(row["peak_rss_mb"], 1),
                      "seconds": round(time.perf_counter() - t0, 1)}
        shutil.rmtree(folder)
    small, large = min(counts), max(counts)
    out["peak_rss_growth_mb"] = round(out[large]["runner_peak_rss_mb"]
                                      - out[small]["runner_peak_rss_mb"], 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="an int8 MobileNetV2 .tflite [Google's PTQ file]")
    p.add_argument("--export", action="store_true",
                   help="soak an edgetl int8 export of MobileNetV2 1.0/224 instead")
    p.add_argument("--invokes", type=int, default=10_000)
    p.add_argument("--images", type=int, default=1_000, help="large folder size for bench")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--write-export", type=Path, help=argparse.SUPPRESS)  # the child of --export
    args = p.parse_args(argv)
    if args.write_export:
        export_mobilenet_v2(args.write_export)
        return 0

    with tempfile.TemporaryDirectory(prefix="edgetl-soak-") as tmp:
        work = Path(tmp)
        model = args.model or GOOGLE_V2
        if args.export and not args.model:
            # Exported in a child process: the soak process holds the runner and the interpreter
            # only, as on a device, not TensorFlow's 800 MB.
            subprocess.run([sys.executable, __file__, "--write-export", str(work)], check=True)
            model = work / "mobilenetv2_int8.tflite"
        if not Path(model).is_file():
            print(f"error: {model} not found: pass --model or --export", file=sys.stderr)
            return 2
        result = {"machine": runner.machine_info(), "command": sys.argv}
        print(f"invoke soak: {args.invokes:,} predictions of {Path(model).name} ...", flush=True)
        soak = result["invoke_soak"] = invoke_soak(Path(model), args.invokes)
        print(f"  RSS {soak['rss_after_warmup_mb']} MB after warm-up -> {soak['rss_end_mb']} MB "
              f"after {soak['invokes']:,} predictions: growth {soak['rss_growth_mb']:+.3f} MB "
              f"(goal < 1 MB); {soak['mean_ms_per_predict']} ms each; samples "
              f"{soak['rss_samples_mb']}", flush=True)
        if not args.skip_bench:
            counts = (min(100, args.images), args.images)
            print(f"bench soak: edgetl bench on {counts[0]} and {counts[1]} images ...",
                  flush=True)
            b = result["bench_soak"] = bench_soak(Path(model), counts, work)
            for count in counts:
                print(f"  {count:>5} images: runner peak RSS {b[count]['runner_peak_rss_mb']} MB, "
                      f"top-1 {b[count]['top1']:.3f}, {b[count]['seconds']} s", flush=True)
            print(f"  peak RSS growth {counts[0]} -> {counts[1]} images: "
                  f"{b['peak_rss_growth_mb']:+.1f} MB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    ok = soak["rss_growth_mb"] < 1.0
    print("soak: " + ("ok" if ok else "RSS GREW by %.3f MB" % soak["rss_growth_mb"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
