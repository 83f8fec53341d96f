"""QAT scope all vs trained over training seeds (issue 13): gathers the transfer section's
cached predictions of each seed's ``qat_trained_data`` and ``qat_all_data`` runs.

Usage: scope_seeds.py SEED=WORK [SEED=WORK ...]; each WORK is a ``run.py --work`` folder (or
holds ``transfer/<run>`` for both runs). A run may sit in its own folder: ``SEED=WORK1,WORK2``.
Prints JSON: per seed each scope's QAT int8 and PTQ int8 (same run) accuracy on the 10,000
held-out test images, the paired difference all − trained with its 95 % interval, and the mean
difference over seeds with the spread of the per-seed differences.
"""
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from edgetl.export import paired_difference
from edgetl.runner import list_images

RUNS = ("qat_trained_data", "qat_all_data")


def main(argv: list[str]) -> dict:
    out = {"seeds": {}}
    for arg in argv:
        seed, works = arg.split("=", 1)
        preds, truth = {}, None
        for name in RUNS:
            run = next(Path(w) / "transfer" / name for w in works.split(",")
                       if (Path(w) / "transfer" / name / "transfer_predictions.json").exists())
            saved = json.loads((run / "transfer_predictions.json").read_text())
            preds[name] = {k: np.asarray(v) for k, v in saved["predictions"].items()}
            if truth is None:
                names = (run / "labels.txt").read_text().splitlines()
                items, _, _ = list_images(str(run.parent / "fm_test_1000"), names)
                truth = np.asarray([c for _, c in items])
        row = {}
        for name in RUNS:
            for k in ("qat_int8", "ptq_int8_same_run", "keras_qat"):
                row[f"{name}_{k}"] = round(100 * float((preds[name][k] == truth).mean()), 2)
        for name in RUNS:  # PTQ of the same run's model.keras (QAT weights, fake quant removed)
            row[f"{name}_qat_int8_minus_own_ptq"] = paired_difference(
                preds[name]["qat_int8"], preds[name]["ptq_int8_same_run"], truth)
        row["all_minus_trained_qat_int8"] = paired_difference(
            preds["qat_all_data"]["qat_int8"], preds["qat_trained_data"]["qat_int8"], truth)
        out["seeds"][seed] = row
    diffs = [r["all_minus_trained_qat_int8"] for r in out["seeds"].values()]
    pts = [round(d["diff_points"], 2) for d in diffs]
    out["mean_all_minus_trained"] = round(statistics.mean(pts), 2)
    out["per_seed_all_minus_trained"] = pts
    if len(pts) > 1:
        out["stdev_over_seeds"] = round(statistics.stdev(pts), 2)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1, default=float))
