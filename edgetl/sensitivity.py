"""sensitivity(SensitivityConfig) -> report: which tensors int8 quantization hurts, measured.

The run's model is converted twice by export's own ``convert`` (float32, and int8 with float I/O
calibrated like ``edgetl export --int8``). Both .tflite files run on the same validation images,
which are disjoint from the calibration images, with every intermediate tensor kept
(``experimental_preserve_all_tensors``, no delegate); int8 tensors are matched to float tensors by
name. Per matched int8 activation tensor, over all its values on all images:

- ``own_sqnr_db``: 10 log10(sum f^2 / sum (f - q(f))^2), where f is the float model's tensor and
  q(f) is f quantized with the int8 tensor's own scale and zero point (clipped to its range) and
  dequantized. The error this tensor's range adds by itself, independent of upstream layers: the
  ranking key (lowest first).
- ``sqnr_db``: the same with the int8 model's dequantized tensor instead of q(f): the error
  accumulated from the input up to this tensor.
- ``rmse_per_scale``: RMSE of the int8 model's tensor against the float one, in units of the
  tensor's scale (0.29 is pure rounding; far more means error arriving from upstream or clipping).
- ``clipped``: fraction of the float values outside the int8 tensor's representable range.
- ``flips_alone``: images whose Keras top-1 changes when only this tensor is quantized (its
  scale/zero point applied to the matching Keras layer output; weights stay float).

The QuantizationDebugger is not used (it fails on some TF versions); weights' own rounding error
shows in ``sqnr_db`` of the op's output, not in ``own_sqnr_db``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError

METRIC = ("own_sqnr_db: SQNR (dB) of the float tensor against itself quantized with the int8 "
          "tensor's scale/zero point; lowest first")


@dataclass(frozen=True)
class SensitivityConfig:
    """Settings of one sensitivity measurement.

    Attributes:
        run: training run directory.
        num_images: validation images to compare on (class-balanced sample of the run's
            validation split; the calibration images are excluded).
        num_calibration: calibration images from the training split, as ``export --int8``.
        seed: seed of both samples (the same calibration sample as export with this seed).
        unsafe: allow Lambda layers / custom code in the run's model file.
    """

    run: str
    num_images: int = 50
    num_calibration: int = 200
    seed: int = 0
    unsafe: bool = False


def _check(cfg: SensitivityConfig) -> None:
    from edgetl.config import MAX_SEED
    from edgetl.export import MAX_CALIBRATION

    if cfg.num_images < 1:
        raise EdgetlError(f"--num-images {cfg.num_images} must be at least 1 (the default is "
                          "50)")
    if cfg.num_images > MAX_CALIBRATION:
        raise EdgetlError(f"--num-images {cfg.num_images} must be at most {MAX_CALIBRATION} "
                          "(the default is 50)")
    if cfg.num_calibration < 1:
        raise EdgetlError(f"--num-calibration {cfg.num_calibration} must be at least 1 (the "
                          "default is 200)")
    if cfg.num_calibration > MAX_CALIBRATION:
        raise EdgetlError(f"--num-calibration {cfg.num_calibration} must be at most "
                          f"{MAX_CALIBRATION} (the default is 200)")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not (
            0 <= cfg.seed <= MAX_SEED):
        raise EdgetlError(f"--seed {cfg.seed} must be an integer from 0 to {MAX_SEED}")


def _interpreter_module():
    """(module with Interpreter and OpResolverType, its name and version)."""
    try:
        import ai_edge_litert
        from ai_edge_litert import interpreter as mod

        return mod, f"ai_edge_litert {getattr(ai_edge_litert, '__version__', '?')}"
    except ImportError:  # pragma: no cover - the TF fallback
        from edgetl.keras import tf

        return tf.lite.experimental, f"tensorflow.lite {tf.__version__}"


def _interpreter(raw: bytes):
    """An interpreter that keeps every intermediate tensor (no delegate: a delegate's fused
    kernels would hide them)."""
    mod, _ = _interpreter_module()
    make = getattr(mod, "Interpreter", None)
    if make is None:  # pragma: no cover - the TF fallback
        from edgetl.keras import tf

        make = tf.lite.Interpreter
    no_delegate = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = make(model_content=raw, experimental_preserve_all_tensors=True,
                  experimental_op_resolver_type=no_delegate)
    interp.allocate_tensors()
    return interp


def _op_outputs(interp) -> dict:
    """Tensor name -> (index, op name, details) for every op output of the model."""
    details = {d["index"]: d for d in interp.get_tensor_details()}
    out = {}
    for op in interp._get_ops_details():
        for i in op["outputs"]:
            if i >= 0 and i in details:
                out[details[i]["name"]] = (i, op["op_name"], details[i])
    return out


def _pairs(float_interp, int8_interp) -> list[dict]:
    """The int8 model's quantized activation tensors that have a float twin of the same name."""
    floats = _op_outputs(float_interp)
    pairs = []
    for name, (i, op, d) in _op_outputs(int8_interp).items():
        q = d["quantization_parameters"]
        if d["dtype"] not in (np.int8, np.int16) or len(q["scales"]) != 1 or name not in floats:
            continue
        fi, _, fd = floats[name]
        if list(fd["shape"]) != list(d["shape"]):
            continue
        info = np.iinfo(d["dtype"])
        pairs.append({"tensor": name, "op": op, "int8_index": i, "float_index": fi,
                      "shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                      "scale": float(q["scales"][0]), "zero_point": int(q["zero_points"][0]),
                      "qmin": int(info.min), "qmax": int(info.max),
                      "sum_f2": 0.0, "sum_err2": 0.0, "sum_own2": 0.0, "clipped": 0, "n": 0})
    return pairs


def _db(signal: float, noise: float) -> float | None:
    """SQNR in dB; None when there is no error at all (or no signal)."""
    if noise <= 0 or signal <= 0:
        return None
    return round(10 * math.log10(signal / noise), 3)


def _layer_of(tensor: str) -> str:
    """The Keras layer a TFLite tensor name points at: a fused name lists the op that produces
    the tensor first ('model/conv_relu/Relu6;model/conv_bn/...' -> 'conv_relu')."""
    parts = tensor.split(";")[0].split("/")
    return parts[-2] if len(parts) >= 2 else parts[0]


def _fake_quant(y, scale: float, zero_point: int, qmin: int, qmax: int):
    from edgetl.keras import tf

    codes = tf.clip_by_value(tf.round(y / scale) + zero_point, qmin, qmax)
    return (codes - zero_point) * scale


def _predict(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(model(images[i:i + batch], training=False)).reshape(
        len(images[i:i + batch]), -1).argmax(-1) for i in range(0, len(images), batch)])


def _flips_alone(model, rows: list[dict], first: dict, images: np.ndarray, step=None) -> None:
    """Sets each row's ``flips_alone``: images whose Keras top-1 changes when only this tensor is
    quantized (its int8 scale/zero point applied to the Keras layer's output; weights and every
    other tensor stay float). Only for rows whose values on the first image equal a Keras layer's
    output (a fused tensor that is not a layer's output keeps None)."""
    from edgetl.keras import keras

    names = {layer.name for layer in model.layers}
    by_layer = {}
    for r in rows:
        if r["layer"] in names:
            by_layer.setdefault(r["layer"], []).append(r)
    if not by_layer:
        return
    layers = list(by_layer)
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in layers])
    outs = probe(images[:1], training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    base = _predict(model, images)
    for name, out in zip(layers, outs):
        if step is not None:
            step.advance()
        out = np.asarray(out, dtype=np.float64)
        tol = 1e-4 * float(np.abs(out).max()) + 1e-6
        same = [r for r in by_layer[name] if first[r["tensor"]].shape == out.shape
                and np.allclose(first[r["tensor"]], out, rtol=1e-3, atol=tol)]
        if len(same) != 1:
            continue
        r, layer = same[0], model.get_layer(name)
        info = np.iinfo(r["dtype"])
        original = layer.call

        def call(*args, _original=original, _r=r, _info=info, **kwargs):
            return _fake_quant(_original(*args, **kwargs), _r["scale"], _r["zero_point"],
                               int(_info.min), int(_info.max))

        layer.__dict__["call"] = call  # the instance attribute shadows the method, undone below
        try:
            r["flips_alone"] = int((_predict(model, images) != base).sum())
        finally:
            del layer.__dict__["call"]


def measure(model, calib: np.ndarray, images: np.ndarray, labels=None,
            flips: bool = True, progress=None) -> dict:
    """Per-tensor float-vs-int8 error of a Keras model on preprocessed images.

    Args:
        model: the float Keras model.
        calib: (N, H, W, 3) float32 calibration batch for the int8 conversion.
        images: (M, H, W, 3) float32 images to compare on, disjoint from ``calib``.
        labels: optional (M,) true class indices, for the accuracy of both files.
        flips: also count, per tensor, the top-1 flips of the Keras model when only that
            tensor is quantized (one pass over ``images`` per tensor).
        progress: an ``edgetl.progress.Progress`` for the steps (None: silent).

    Returns:
        The report dict: ``metric``, ``model`` (output agreement, accuracies, tensor counts) and
        ``tensors`` (one row per matched tensor, worst ``own_sqnr_db`` first, with ``rank``,
        ``layer`` and ``flips_alone``: images whose top-1 changes when only this tensor is
        quantized, None where no Keras layer output matches the tensor).

    Raises:
        EdgetlError: conversion failed, or no tensor could be matched by name.
    """
    from edgetl.config import IOType, Quantization
    from edgetl.export import convert
    from edgetl.progress import SILENT

    progress = progress or SILENT
    with progress.step("convert float32") as step:
        float_raw = convert(model, Quantization.float32, IOType.float32, None)
        step.done(f"{len(float_raw) / 1e6:.2f} MB")
    with progress.step("convert int8") as step:
        int8_raw = convert(model, Quantization.int8, IOType.float32, calib)
        step.done(f"{len(int8_raw) / 1e6:.2f} MB, calibrated on {len(calib)} images")
    fl, q8 = _interpreter(float_raw), _interpreter(int8_raw)
    pairs = _pairs(fl, q8)
    if not pairs:
        raise EdgetlError("no int8 tensor of the model has a float32 twin of the same name: "
                          "the converter renamed them all; sensitivity cannot be measured")
    f_in, q_in = fl.get_input_details()[0]["index"], q8.get_input_details()[0]["index"]
    f_out, q_out = fl.get_output_details()[0]["index"], q8.get_output_details()[0]["index"]
    out_f2 = out_err2 = 0.0
    top_f, top_q = [], []
    first = {}  # tensor name -> float32 model's value on the first image
    with progress.step("compare tensors", total=len(images)) as step:
        for x in images:
            step.advance()
            fl.set_tensor(f_in, x[None])
            q8.set_tensor(q_in, x[None])
            fl.invoke()
            q8.invoke()
            for p in pairs:
                f = fl.get_tensor(p["float_index"]).astype(np.float64)
                qv = q8.get_tensor(p["int8_index"]).astype(np.float64)
                s, z = p["scale"], p["zero_point"]
                deq = (qv - z) * s
                codes = np.round(f / s) + z
                own = (np.clip(codes, p["qmin"], p["qmax"]) - z) * s
                p["sum_f2"] += float((f * f).sum())
                p["sum_err2"] += float(((f - deq) ** 2).sum())
                p["sum_own2"] += float(((f - own) ** 2).sum())
                p["clipped"] += int(((codes < p["qmin"]) | (codes > p["qmax"])).sum())
                p["n"] += f.size
                first.setdefault(p["tensor"], f)
            yf = fl.get_tensor(f_out).astype(np.float64).ravel()
            yq = q8.get_tensor(q_out).astype(np.float64).ravel()
            out_f2 += float((yf * yf).sum())
            out_err2 += float(((yf - yq) ** 2).sum())
            top_f.append(int(yf.argmax()))
            top_q.append(int(yq.argmax()))
        step.done(f"{len(pairs)} int8 tensors with a float32 twin on {len(images)} images")

    rows = []
    for p in pairs:
        n = max(p["n"], 1)
        rows.append({
            "tensor": p["tensor"], "op": p["op"], "shape": p["shape"], "dtype": p["dtype"],
            "scale": p["scale"], "zero_point": p["zero_point"],
            "own_sqnr_db": _db(p["sum_f2"], p["sum_own2"]),
            "sqnr_db": _db(p["sum_f2"], p["sum_err2"]),
            "rmse_per_scale": round(math.sqrt(p["sum_err2"] / n) / p["scale"], 4),
            "clipped": round(p["clipped"] / n, 6),
            "layer": _layer_of(p["tensor"]), "flips_alone": None,
        })
    # None (no error at all) sorts last.
    rows.sort(key=lambda r: (r["own_sqnr_db"] is None, r["own_sqnr_db"] or 0.0,
                             r["sqnr_db"] is None, r["sqnr_db"] or 0.0))
    for k, r in enumerate(rows, 1):
        r["rank"] = k
    if flips:
        with progress.step("flips per tensor") as step:
            _flips_alone(model, rows, first, images, step)
            step.done(f"{step.count} layer outputs quantized alone, {len(images)} images each")
    top_f, top_q = np.array(top_f), np.array(top_q)
    summary = {
        "images": int(len(images)), "calibration_images": int(len(calib)),
        "tensors_matched": len(rows), "tensors_int8": len(_op_outputs(q8)),
        "output_sqnr_db": _db(out_f2, out_err2),
        "top1_agreement": float((top_f == top_q).mean()),
        "top1_flips": int((top_f != top_q).sum()),
        "float32_size_bytes": len(float_raw), "int8_size_bytes": len(int8_raw),
    }
    if labels is not None:
        labels = np.asarray(labels)
        summary["float32_accuracy"] = float((top_f == labels).mean())
        summary["int8_accuracy"] = float((top_q == labels).mean())
        summary["drop_points"] = round((summary["float32_accuracy"]
                                        - summary["int8_accuracy"]) * 100, 4)
    return {"metric": METRIC, "model": summary, "tensors": rows}


def sensitivity(cfg: SensitivityConfig, progress=None) -> dict:
    """Measures a run's per-tensor int8 sensitivity on its validation images.

    ``progress``: an ``edgetl.progress.Progress`` for the steps (None: silent).

    Returns:
        The ``measure`` report plus ``run``, ``settings`` and ``interpreter``.

    Raises:
        EdgetlError: not a run, a damaged run, bad settings, too few images (exit 2).
    """
    from edgetl.calibrate import sample
    from edgetl.config import ExportConfig
    from edgetl.export import calibration_items, load_batch
    from edgetl.preprocessing import input_shape
    from edgetl.train import load_model, load_run, load_split

    _check(cfg)
    run = Path(cfg.run)
    run_cfg = load_run(run)
    split = load_split(run, len(run_cfg["class_names"]))
    try:
        # (height, width, channels): a non-square or greyscale run's input_size alone is not it
        size, prep = input_shape(run_cfg), run_cfg["preprocessing"]
        val = [tuple(x) for x in split["val"]]
        split["train"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else type(e).__name__
        raise EdgetlError(f"run '{run}' is damaged (config.json or split.json: {what}): copy "
                          "the whole run directory again, or re-train it") from None
    calib_paths, source = calibration_items(
        ExportConfig(run=str(run), num_calibration=cfg.num_calibration, seed=cfg.seed),
        run_cfg, split)
    taken = set(calib_paths)
    val = [it for it in val if it[0] not in taken]  # calibration-disjoint, whatever the split
    if not val:
        raise EdgetlError(f"run '{run}' has no validation image outside the calibration set: "
                          "sensitivity needs images the ranges were not fitted on")
    chosen = sample(val, cfg.num_images, cfg.seed)
    from edgetl.progress import SILENT

    progress = progress or SILENT
    with progress.step("load images") as step:
        calib = load_batch(calib_paths, size, prep)
        images = load_batch([p for p, _ in chosen], size, prep)
        step.done(f"{len(calib)} calibration, {len(images)} validation")
    with progress.step("load model.keras") as step:
        model = load_model(run / "model.keras", cfg.unsafe)
        step.done(f"{model.count_params():,} parameters")
    if hasattr(progress, "release"):
        progress.release()  # the images and the model are good: bad input is past
    report = measure(model, calib, images, [label for _, label in chosen], progress=progress)
    return {"run": str(run), "settings": {"num_images": cfg.num_images,
                                          "num_calibration": cfg.num_calibration,
                                          "seed": cfg.seed, "calibration_source": source,
                                          "float_model": "model.keras"},
            "interpreter": f"{_interpreter_module()[1]} (no delegate)", **report}


def format_report(report: dict, top: int = 20) -> str:
    """The report as a text table: the ``top`` worst tensors, then the whole-model figures."""
    def db(v):
        return "exact" if v is None else f"{v:.1f}"

    m = report["model"]
    lines = [f"per-tensor int8 sensitivity of {report.get('run', 'the model')} on {m['images']} "
             f"validation images ({m['calibration_images']} calibration images; "
             f"{m['tensors_matched']} tensors matched by name)",
             f"ranked by {report['metric']}; flips: images whose top-1 changes when only that "
             "tensor is quantized", "",
             f"{'rank':>4}  {'own dB':>7}  {'acc. dB':>7}  {'rmse/s':>7}  {'clipped':>8}  "
             f"{'flips':>5}  {'op':<18} layer (full tensor names in the JSON)"]
    for r in report["tensors"][:top]:
        flips = "-" if r.get("flips_alone") is None else str(r["flips_alone"])
        lines.append(f"{r['rank']:>4}  {db(r['own_sqnr_db']):>7}  {db(r['sqnr_db']):>7}  "
                     f"{r['rmse_per_scale']:>7.3f}  {r['clipped']:>8.2%}  {flips:>5}  "
                     f"{r['op']:<18} {r['layer']}")
    lines.append("")
    line = (f"output: SQNR {db(m['output_sqnr_db'])} dB, top-1 agreement float32 vs int8 "
            f"{m['top1_agreement']:.4f} ({m['top1_flips']} flip(s))")
    if "drop_points" in m:
        line += (f"; accuracy float32 {m['float32_accuracy']:.4f} int8 {m['int8_accuracy']:.4f}"
                 f" (drop {m['drop_points']:.2f} points)")
    lines.append(line)
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    """Writes the report (the same dict the text table shows) atomically."""
    from edgetl.bench import _atomic_write

    _atomic_write(Path(path), json.dumps(report, indent=2))
