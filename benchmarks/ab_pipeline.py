#!/usr/bin/env python3
"""Before/after of the input pipeline: make_dataset of an older commit vs this tree, interleaved.

    .venv/bin/python benchmarks/ab_pipeline.py --before 63939c1 --data FOLDER [--size 48]

Loads ``edgetl/data.py`` as it was at ``--before`` beside the current one, checks that both
give the same pixels (no augmentation, no shuffle), then times epochs of each (first epoch:
decode + cache; later epochs: cached), with and without augmentation, the order reversed every
other round. Prints and writes a JSON of images/s, seconds to the first batch and CPU ms per
image (this process).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git commit of the 'before' data.py")
    ap.add_argument("--data", required=True, help="class folders of images")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import numpy as np

    from edgetl import backbones
    from edgetl.data import make_dataset as after, scan_folder

    old_src = subprocess.run(["git", "show", f"{args.before}:edgetl/data.py"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data_before.py"
        path.write_text(old_src)
        spec = importlib.util.spec_from_file_location("data_before", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["data_before"] = mod
        spec.loader.exec_module(mod)
    before = mod.make_dataset
    prep = backbones.preprocessing(backbones.get_backbone("mobilenetv2"))
    items = list(scan_folder(args.data, (32, 32)).items)
    items = [items[i] for i in np.random.RandomState(0).permutation(len(items))][:args.images]
    size = (args.size, args.size)
    a = np.concatenate([x.numpy() for x, _ in before(items[:300], size, prep, 64, False, False, 0)])
    b = np.concatenate([x.numpy() for x, _ in after(items[:300], size, prep, 64, False, False, 0)])
    same = a.shape == b.shape and bool((a == b).all())
    print("same pixels without augmentation:", same)
    rates: dict = {}
    for r in range(args.rounds):
        order = [("before", before), ("after", after)]
        for name, md in (order if r % 2 == 0 else order[::-1]):
            for augment in (False, True):
                ds = md(items, size, prep, args.batch, True, augment, 0)
                epochs, cpu = [], []
                for e in range(3):
                    t0, c0, n = time.perf_counter(), time.process_time(), 0
                    for x, _ in ds:
                        if e == 0 and n == 0:
                            first_batch = time.perf_counter() - t0
                        n += int(x.shape[0])
                    epochs.append(n / (time.perf_counter() - t0))
                    cpu.append((time.process_time() - c0) / n * 1e3)
                key = f"{name}_{'augment' if augment else 'no_augment'}"
                rates.setdefault(key + "_first_epoch", []).append(epochs[0])
                # seconds until the first batch, and this process's CPU ms per image
                rates.setdefault(key + "_first_batch_s", []).append(first_batch)
                rates.setdefault(key + "_first_epoch_cpu_ms", []).append(cpu[0])
                rates.setdefault(key + "_cached_cpu_ms", []).append(float(np.median(cpu[1:])))
                rates.setdefault(key + "_cached", []).append(float(np.median(epochs[1:])))
    summary = {k: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))}
               for k, v in rates.items()}
    for k in sorted(summary):
        s = summary[k]
        unit = "s" if k.endswith("_s") else "ms" if k.endswith("_ms") else "images/s"
        print(f"{k:36s} {s['median']:8.3g} {unit} ({s['min']:.3g}-{s['max']:.3g})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"before": args.before, "size": args.size, "batch": args.batch,
             "images": len(items), "same_pixels": same, "images_per_s": rates,
             "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
