"""Accuracy-driven export (``edgetl export --int8 --auto``) and the calibration stability check.

``search`` starts from full int8. When its drop misses ``--max-drop`` (the same verdict as
export's gate: ``drop_gate`` on the point drop, with its paired 95 % interval reported), it tries,
in this order and at most ``max_candidates`` models in all:

1. keep-float steps, greedy by sensitivity: the tensors of ``sensitivity.measure`` ranked by
   ``flips_alone`` (most top-1 flips when quantized alone) then ``own_sqnr_db`` (lowest first);
   step k keeps the k most sensitive *units* in float. A unit is the op that produces the tensor
   plus the ops that read it: a tensor with a bad int8 range hurts where it is read, so keeping
   only its producer in float would re-quantize it with the same range.
2. whole-model int16x8 (int16 activations, int8 weights): TFLite's converter offers 16x8 only for
   the whole model, not per layer; it is tried after the keep-float steps because its kernels are
   mostly reference kernels (slower than float with XNNPACK).

With ``edgetpu`` only integer int8 models are allowed (float layers and int16 do not run on the
Edge TPU): the candidates are full int8 with per-channel weights, then per-tensor weights (the
converter switches this for the whole model only).

The search stops at the first candidate that meets the budget (the fewest changes). When none
does, the candidate with the smallest drop (then the smallest file) is kept and the report says
the budget was not met. Every candidate is measured on the run's validation split (the split
export verifies on; the choice is made on it, so its figure is slightly optimistic) and its p50
latency through the device runner (``runner.benchmark``, XNNPACK, LATENCY_RUNS timed runs).
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np

from edgetl.errors import EdgetlError

MAX_CANDIDATES = 8  # the default bound of the search (--auto-max-candidates)
LATENCY_RUNS, LATENCY_WARMUP = 20, 3
SENSITIVITY_IMAGES = 64  # validation images the sensitivity ranking is measured on
# Calibration stability: two disjoint class-balanced halves disagree when their int8 accuracy
# differs by more than CAL_ACC_POINTS, or when more than CAL_TENSOR_SHARE of the activation
# tensors have ranges that differ by more than CAL_RANGE_REL (relative to the larger range).
CAL_ACC_POINTS = 1.0
CAL_RANGE_REL = 0.20
CAL_TENSOR_SHARE = 0.10
SKIP_OPS = ("QUANTIZE", "DEQUANTIZE")


def _predict_tflite(raw: bytes, images: np.ndarray):
    """(top-1 per image, p50 latency in ms, interpreter name) through the device runner."""
    from edgetl.runner import Model, benchmark

    fd, path = tempfile.mkstemp(suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        model = Model(path, delegate="xnnpack")
        pred = np.concatenate([np.asarray(model.predict(images[i:i + 32])).reshape(
            len(images[i:i + 32]), -1).argmax(-1) for i in range(0, len(images), 32)])
        timing = benchmark(model, runs=LATENCY_RUNS, warmup=LATENCY_WARMUP)
        return pred, timing["p50_ms"], f"{model.interpreter_name} {model.interpreter_version}"
    finally:
        os.unlink(path)


def _judge(y_keras, y_tfl, y_true, max_drop: float) -> dict:
    """The figures drop_gate needs (the shape of verify_accuracy's report) and its verdict."""
    from edgetl.export import drop_gate, paired_difference

    n = len(y_true)
    d = paired_difference(y_keras, y_tfl, y_true)
    acc = {"images": n, "keras_accuracy": float((y_keras == y_true).mean()),
           "tflite_accuracy": float((y_tfl == y_true).mean()),
           "drop_points": round(d["diff_points"], 4),
           "drop_ci95_points": [round(v, 4) for v in d["ci95_points"]],
           "points_per_image": round(100 / n, 4), "keras_only_right": d["a_only"],
           "tflite_only_right": d["b_only"]}
    gate, _ = drop_gate(acc, max_drop)
    acc["gate"] = gate
    return acc


def _units(raw: bytes, rows: list[dict]) -> list[dict]:
    """Sensitivity rows -> keep-float units, most sensitive first: the tensor's producer op and
    every op reading it, named by their output tensors (what the quantization debugger's
    denylist matches)."""
    from edgetl.sensitivity import _interpreter

    interp = _interpreter(raw)
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    index = {v: k for k, v in names.items()}
    ranked = sorted(rows, key=lambda r: (-(r.get("flips_alone") or 0),
                                         math.inf if r["own_sqnr_db"] is None
                                         else r["own_sqnr_db"]))
    units, seen = [], set()
    for r in ranked:
        i = index.get(r["tensor"])
        if i is None:
            continue
        tensors = [r["tensor"]] + [names[o] for op in ops if i in list(op["inputs"])
                                   and op["op_name"] not in SKIP_OPS
                                   for o in op["outputs"] if o >= 0 and o in names]
        key = frozenset(tensors)
        if key in seen:
            continue
        seen.add(key)
        units.append({"tensors": tensors, "layer": r["layer"], "op": r["op"],
                      "flips_alone": r.get("flips_alone"), "own_sqnr_db": r["own_sqnr_db"]})
    return units


def search(model, calib: np.ndarray, images: np.ndarray, labels: np.ndarray, io, max_drop: float,
           edgetpu: bool = False, max_candidates: int = MAX_CANDIDATES, log=None) -> tuple:
    """Finds the least-changed int8-based model whose drop meets ``max_drop``.

    Args:
        model: the Keras model to convert (the float model, or the QAT model of a QAT run).
        calib: (N, H, W, C) float32 calibration batch.
        images, labels: (M, H, W, C) validation batch and its (M,) true classes.
        io: IOType of the full-integer candidates (keep-float candidates have float32 I/O).
        max_drop: the budget, top-1 points against the Keras model.
        edgetpu: integer int8 candidates only.
        max_candidates: bound on converted candidates (full int8 included; >= 2).
        log: optional callable taking one line of progress.

    Returns:
        (raw bytes of the chosen candidate, its settings dict, the report dict with every
        candidate: ``candidates``, ``chosen``, ``met``, ``reference_float32``, ``rule``).

    Raises:
        EdgetlError: a conversion failed.
    """
    from edgetl.config import IOType, Quantization
    from edgetl.export import convert
    from edgetl.sensitivity import _predict, measure

    say = log or (lambda line: None)
    y_keras = _predict(model, images)
    candidates, raws = [], []

    def trial(label: str, mode, cio, keep=(), per_channel=True, changes=()):
        from edgetl.runner import RunnerError

        raw = convert(model, mode, cio, calib, keep_float=tuple(keep), per_channel=per_channel)
        row = {"index": len(candidates), "candidate": label, "mode": Quantization(mode).value,
               "io": ("int16" if mode == Quantization.int16x8 and IOType(cio) != IOType.float32
                      else IOType(cio).value), "per_channel_weights": per_channel,
               "keep_float": list(keep), "changes": list(changes), "size_bytes": len(raw)}
        try:
            pred, p50, interp = _predict_tflite(raw, images)
        except RunnerError as e:  # e.g. XNNPACK refusing a scale: this candidate is out
            row.update(error=str(e).split(": ", 1)[-1][:300], met=False, gate="error",
                       latency_p50_ms=None, accuracy=None, drop_points=None,
                       drop_ci95_points=None)
            say(f"auto: candidate {row['index']} {label}: the runner cannot run it: "
                f"{row['error']}")
        else:
            acc = _judge(y_keras, pred, labels, max_drop)
            row.update(latency_p50_ms=round(p50, 4), accuracy=acc["tflite_accuracy"],
                       drop_points=acc["drop_points"], drop_ci95_points=acc["drop_ci95_points"],
                       gate=acc["gate"], met=acc["gate"] == "passed", interpreter=interp)
            say(f"auto: candidate {row['index']} {label}: drop {row['drop_points']:.2f} "
                f"points, {len(raw) / 1e3:.1f} kB, p50 {row['latency_p50_ms']:.2f} ms"
                f"{' (meets the budget)' if row['met'] else ''}")
        candidates.append(row)
        raws.append(raw)
        return row["met"]

    report = {"max_drop": max_drop, "max_candidates": max_candidates, "edgetpu": edgetpu,
              "keras_accuracy": float((y_keras == labels).mean()), "images": int(len(labels)),
              "rule": ("first candidate meeting --max-drop (point drop <= budget, export's "
                       "gate); none: the smallest drop, then the smallest file"),
              "order": (["int8", "int8 per-tensor weights"] if edgetpu else
                        ["int8", "int8 + keep-float units greedy by sensitivity", "int16x8"])}
    met = trial("int8", Quantization.int8, io)
    if not met and edgetpu:
        met = trial("int8, per-tensor weights", Quantization.int8, io, per_channel=False,
                    changes=["weights per-tensor (whole model)"])
    elif not met:
        steps = max_candidates - 2  # one place is left for int16x8
        units = []
        if steps > 0:
            from edgetl.calibrate import sample

            pick = [i for i, _ in sample(list(zip(range(len(labels)), labels.tolist())),
                                         SENSITIVITY_IMAGES, 0)]
            sens = measure(model, calib, images[pick], labels[pick])
            units = _units(raws[0], sens["tensors"])
            report["sensitivity"] = {"metric": sens["metric"],
                                     "images": sens["model"]["images"],
                                     "units": units[:steps]}
        keep, changes = [], []
        for unit in units[:steps]:
            if met:
                break
            keep += [t for t in unit["tensors"] if t not in keep]
            changes.append(f"float: {unit['layer']} ({unit['op']}) and its readers")
            met = trial(f"int8 + {len(changes)} float unit(s)", Quantization.int8,
                        IOType.float32, keep, changes=list(changes))
        if not met and len(candidates) < max_candidates:
            met = trial("int16x8 (whole model)", Quantization.int16x8, io,
                        changes=["activations int16 (whole model)"])
    passing = [c for c in candidates if c["met"]]
    runnable = [c for c in candidates if c.get("error") is None]
    if not runnable:
        raise EdgetlError(f"--auto: the runner could run none of the {len(candidates)} "
                          f"candidate(s): {candidates[0]['error']}")
    chosen = passing[0] if passing else min(
        runnable, key=lambda c: (c["drop_points"], c["size_bytes"]))
    # full int8 above the budget but its interval reaching below it: a search on noise
    report.update(candidates=candidates, chosen=chosen["index"], met=bool(passing),
                  int8_within_noise=candidates[0].get("gate") == "undecided")
    if not edgetpu:  # the reference the sizes are judged against; never chosen
        raw = convert(model, Quantization.float32, IOType.float32, None)
        pred, p50, _ = _predict_tflite(raw, images)
        acc = _judge(y_keras, pred, labels, max_drop)
        report["reference_float32"] = {"size_bytes": len(raw), "latency_p50_ms": round(p50, 4),
                                       "accuracy": acc["tflite_accuracy"],
                                       "drop_points": acc["drop_points"]}
    return raws[chosen["index"]], chosen, report


def format_search(report: dict) -> list[str]:
    """The candidates as text lines (a table), chosen one marked."""
    lines = [f"  auto: {len(report['candidates'])} candidate(s) of at most "
             f"{report['max_candidates']} on {report['images']} validation images, budget "
             f"--max-drop {report['max_drop']}" + (" (Edge TPU: integer int8 only)"
                                                    if report["edgetpu"] else ""),
             f"    {'#':>2}  {'size kB':>9}  {'p50 ms':>8}  {'accuracy':>8}  {'drop':>6}  "
             f"{'95 % interval':>15}  candidate"]
    ref = report.get("reference_float32")
    rows = list(report["candidates"])
    for c in rows:
        mark = "*" if c["index"] == report["chosen"] else " "
        if c.get("error"):
            lines.append(f"   {mark}{c['index']:>2}  {c['size_bytes'] / 1e3:>9.1f}  "
                         f"{c['candidate']}: the runner cannot run it ({c['error'][:80]})")
            continue
        lo, hi = c["drop_ci95_points"]
        lines.append(f"   {mark}{c['index']:>2}  {c['size_bytes'] / 1e3:>9.1f}  "
                     f"{c['latency_p50_ms']:>8.3f}  {c['accuracy']:>8.4f}  "
                     f"{c['drop_points']:>6.2f}  {lo:>6.2f} to {hi:>5.2f}  {c['candidate']}")
    if ref:
        lines.append(f"     -  {ref['size_bytes'] / 1e3:>9.1f}  {ref['latency_p50_ms']:>8.3f}  "
                     f"{ref['accuracy']:>8.4f}  {ref['drop_points']:>6.2f}  {'':>15}  "
                     "float32 (reference, not a candidate)")
    c = report["candidates"][report["chosen"]]
    if report["met"]:
        lines.append(f"  auto: kept #{c['index']} ({c['candidate']}): the first to meet the "
                     "budget" + (f"; changes: {'; '.join(c['changes'])}" if c["changes"] else ""))
    else:
        lines.append(f"  auto: no candidate met --max-drop {report['max_drop']}; kept the best, "
                     f"#{c['index']} ({c['candidate']}, drop {c['drop_points']:.2f} points)")
    first = report["candidates"][0]
    if first.get("gate") == "undecided" and report["chosen"] != 0:
        lo, hi = first["drop_ci95_points"]
        lines.append(f"  auto: note: full int8's drop ({first['drop_points']:.2f}, 95 % interval "
                     f"{lo:.2f} to {hi:.2f}) is within noise of the budget on "
                     f"{report['images']} images: the changes may only fit this validation "
                     "set; check on held-out images before relying on them")
    if report.get("plot"):
        lines.append(f"  auto: {report['plot']}")
    return lines


def pareto_png(report: dict) -> bytes | None:
    """A PNG of size and p50 latency against accuracy for every candidate, or None when
    matplotlib is not installed (edgetl does not depend on it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io as _io

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = report["candidates"]
    ref = report.get("reference_float32")
    for ax, key, unit in ((axes[0], "size_bytes", "size (kB)"),
                          (axes[1], "latency_p50_ms", "p50 latency (ms)")):
        scale = 1e-3 if key == "size_bytes" else 1.0
        rows = [c for c in report["candidates"] if c.get("error") is None]
        ax.scatter([c[key] * scale for c in rows], [c["accuracy"] for c in rows])
        for c in rows:
            ax.annotate(str(c["index"]), (c[key] * scale, c["accuracy"]))
        if ref:
            ax.scatter([ref[key] * scale], [ref["accuracy"]], marker="x")
            ax.annotate("float32", (ref[key] * scale, ref["accuracy"]))
        ax.axhline(report["keras_accuracy"] - report["max_drop"] / 100, linestyle=":")
        ax.set_xlabel(unit)
        ax.set_ylabel("validation accuracy")
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --- calibration stability ----------------------------------------------------------------------

def _halves(labels: list) -> tuple[list[int], list[int]]:
    """Two disjoint class-balanced halves of positions: within each class, alternate."""
    a, b, turn = [], [], {}
    for i, label in enumerate(labels):
        k = turn.get(label, 0)
        (a if k % 2 == 0 else b).append(i)
        turn[label] = k + 1
    return a, b


def _ranges(raw: bytes) -> dict:
    """Activation tensor name -> its int8 range (scale x 255) in float units."""
    from edgetl.sensitivity import _interpreter, _op_outputs

    out = {}
    for name, (_, _, d) in _op_outputs(_interpreter(raw)).items():
        q = d["quantization_parameters"]
        if d["dtype"] == np.int8 and len(q["scales"]) == 1:
            out[name] = float(q["scales"][0]) * 255
    return out


def check_calibration(model, calib: np.ndarray, calib_labels: list, images: np.ndarray,
                      labels: np.ndarray, io) -> dict:
    """Calibrates twice on disjoint class-balanced halves of the calibration set and compares.

    Args:
        calib: (N, H, W, C) calibration batch; calib_labels: its N class labels (None where
            unknown: those alternate as one class).
        images, labels: the validation batch and its true classes.

    Returns:
        ``{"images_per_half", "accuracy": [a, b], "accuracy_diff_points", "tensors",
        "tensors_differing", "worst_range_diff", "stable", "recommended_images", "rule"}``;
        ``stable`` False comes with ``warning`` (the sentence export prints).
    """
    from edgetl.config import Quantization
    from edgetl.export import convert

    a, b = _halves(list(calib_labels))
    raws = [convert(model, Quantization.int8, io, calib[idx]) for idx in (a, b)]
    accs = []
    for raw in raws:
        pred, _, _ = _predict_tflite(raw, images)
        accs.append(float((pred == labels).mean()))
    ra, rb = _ranges(raws[0]), _ranges(raws[1])
    diffs = [abs(ra[k] - rb[k]) / max(ra[k], rb[k]) for k in ra if k in rb and
             max(ra[k], rb[k]) > 0]
    differing = sum(d > CAL_RANGE_REL for d in diffs)
    acc_diff = abs(accs[0] - accs[1]) * 100
    share = differing / len(diffs) if diffs else 0.0
    stable = acc_diff <= CAL_ACC_POINTS and share <= CAL_TENSOR_SHARE
    n = len(calib)
    # The halves' disagreement shrinks about as 1/sqrt(images): scale n by the squared excess.
    excess = max(acc_diff / CAL_ACC_POINTS, 1.0)
    if share > CAL_TENSOR_SHARE and diffs:
        excess = max(excess, float(np.percentile(diffs, 90)) / CAL_RANGE_REL)
    recommended = int(math.ceil(max(2 * n, n * excess ** 2) / 50) * 50)
    out = {"images": n, "images_per_half": [len(a), len(b)], "accuracy": accs,
           "accuracy_diff_points": round(acc_diff, 4), "tensors": len(diffs),
           "tensors_differing": differing,
           "worst_range_diff": round(max(diffs), 4) if diffs else None,
           "stable": stable, "recommended_images": None if stable else recommended,
           "rule": (f"unstable when the halves' int8 accuracy differs by more than "
                    f"{CAL_ACC_POINTS} point(s), or more than {CAL_TENSOR_SHARE:.0%} of the "
                    f"activation ranges differ by more than {CAL_RANGE_REL:.0%}")}
    if not stable:
        out["warning"] = (
            f"the calibration set is too small: two disjoint halves of {len(a)} and {len(b)} "
            f"images give int8 accuracies {accs[0]:.4f} and {accs[1]:.4f} ({acc_diff:.2f} "
            f"points apart) and {differing} of {len(diffs)} activation ranges differing by "
            f"more than {CAL_RANGE_REL:.0%}; calibrate on at least {recommended} images "
            f"(--num-calibration {recommended}, or a --calibration folder that large)")
    return out


def format_check(check: dict) -> list[str]:
    if check.get("skipped"):
        return [f"  calibration check: skipped: {check['skipped']}"]
    a, b = check["accuracy"]
    return [f"  calibration check: halves of {check['images_per_half'][0]} and "
            f"{check['images_per_half'][1]} images: int8 accuracy {a:.4f} vs {b:.4f}, "
            f"{check['tensors_differing']} of {check['tensors']} ranges differ by more than "
            f"{CAL_RANGE_REL:.0%}: {'stable' if check['stable'] else 'UNSTABLE'}"]

