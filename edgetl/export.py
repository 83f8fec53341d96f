"""export(ExportConfig) -> ExportResult: Keras run -> verified TFLite with embedded metadata.

``convert`` is the only function that touches ``TFLiteConverter``. After each conversion the
model is checked (integer-only for int8) and evaluated on the run's validation split through the
device runner's own code, beside the Keras model on the very same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgetl.config import ExportConfig, IOType, Quantization
from edgetl.errors import EdgetlError, VerificationError

MIN_CALIBRATION = 10
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ExportResult:
    """What one export call wrote and measured.

    Attributes:
        files: paths of the .tflite files written, one per mode.
        reports: per mode, the verification report (also in each sidecar JSON).
        manifest: path of the calibration manifest (None when no mode needed calibration).
    """

    files: tuple
    reports: dict
    manifest: str | None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- calibration ---------------------------------------------------------------------------------

def calibration_items(cfg: ExportConfig, run_cfg: dict, split: dict) -> tuple[list[str], str]:
    """The calibration image paths and where they came from (train split, folder or manifest)."""
    from edgetl.data import balanced_sample, scan_folder
    from edgetl.preprocessing import input_shape

    size = input_shape(run_cfg)[:2]
    if cfg.calibration_manifest:
        return _replay_manifest(cfg.calibration_manifest, run_cfg), "manifest"
    if cfg.calibration:
        root = Path(cfg.calibration)
        if not root.is_dir():
            raise EdgetlError(f"--calibration '{root}' is not a folder of images")
        if any(p.is_dir() for p in root.iterdir()):
            folder = scan_folder(root, size, class_names=run_cfg["class_names"])
            items = list(folder.items)
        else:  # a flat folder of images
            from edgetl.runner import RunnerError, load_image

            items = []
            for p in sorted(root.iterdir()):
                if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".gif"):
                    try:
                        load_image(str(p), size)
                        items.append((str(p), 0))
                    except RunnerError:
                        pass
        source = f"folder {root}"
    else:
        items = [tuple(x) for x in split["train"]]
        source = "training split"
    if len(items) < MIN_CALIBRATION:
        raise EdgetlError(f"calibration from {source} has only {len(items)} readable image(s); "
                          f"at least {MIN_CALIBRATION} are needed for stable int8 ranges")
    chosen = balanced_sample(items, min(cfg.num_calibration, len(items)), cfg.seed)
    return [p for p, _ in chosen], source


def _replay_manifest(path: str, run_cfg: dict) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise EdgetlError(f"--calibration-manifest '{p}' does not exist")
    try:
        m = json.loads(p.read_text())
        images = m["images"]
    except (ValueError, KeyError, TypeError):
        raise EdgetlError(f"--calibration-manifest '{p}' is not an edgetl calibration "
                          "manifest") from None
    if m.get("input_size") != run_cfg["input_size"] or m.get("preprocessing") != run_cfg[
            "preprocessing"]:
        raise EdgetlError(f"--calibration-manifest '{p}' was made for input "
                          f"{m.get('input_size')} px / preprocessing "
                          f"{(m.get('preprocessing') or {}).get('name')}, but this run uses "
                          f"{run_cfg['input_size']} px / {run_cfg['preprocessing'].get('name')}")
    paths = []
    for entry in images:
        f = entry["path"]
        if not Path(f).is_file():
            raise EdgetlError(f"calibration image '{f}' from the manifest is missing")
        if _sha256(f) != entry["sha256"]:
            raise EdgetlError(f"calibration image '{f}' changed since the manifest was written "
                              "(sha256 differs): the export would not be reproducible")
        paths.append(f)
    return paths


def load_batch(paths, shape, prep: dict) -> np.ndarray:
    """Images -> preprocessed float32 batch, with the runner's own decode and normalisation
    (the calibration pass QAT range initialisation uses too).

    ``shape`` is (height, width, channels) or a square size N (RGB).
    """
    from edgetl.calibrate import load_images

    return load_images(paths, shape, prep)


def write_manifest(path: Path, paths, run_cfg: dict, source: str, seed: int) -> dict:
    manifest = {
        "format": "edgetl-calibration", "format_version": MANIFEST_FORMAT,
        "source": source, "seed": seed, "count": len(paths),
        "input_size": run_cfg["input_size"], "input_shape": run_cfg.get("input_shape"),
        "preprocessing": run_cfg["preprocessing"],
        "images": [{"path": str(p), "sha256": _sha256(p)} for p in paths],
    }
    _atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())
    return manifest


# --- conversion ----------------------------------------------------------------------------------

def convert(model, mode: Quantization, io: IOType, calibration: np.ndarray | None,
            keep_float: tuple = (), debug_report: list | None = None,
            per_channel: bool = True) -> bytes:
    """Keras model -> TFLite bytes. The only code in edgetl that touches TFLiteConverter.

    Args:
        model: the Keras (float or QAT) model.
        mode: the quantization mode.
        io: input/output type of integer models (float32 keeps float I/O).
        calibration: preprocessed images for the representative dataset (int8, int16x8).
        keep_float: layer names to leave in float (int8 only; uses the quantization debugger).
        debug_report: when a list, the quantization debugger's per-layer statistics are
            appended to it (int8 only).
        per_channel: per-channel weight scales (the default); False gives one scale per
            tensor (benchmarks/run.py compares the two).
    """
    from edgetl.keras import tf

    h, w, c = model.input_shape[1:]
    # Batch 1 and static shapes: what the Edge TPU and most device runtimes want.
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, h, w, c], tf.float32, name="image"))
    # The converter saves its input as a SavedModel first; handing it the Keras model makes it
    # walk every layer's trackables (80% of the time for MobileNetV2). A bare module holding the
    # function and the variables gives the same bytes about 5x faster.
    holder = tf.Module()
    holder.fn = fn
    holder.variables_ = list(model.variables)
    mode = Quantization(mode)
    io = IOType(io)

    def representative():
        for i in range(len(calibration)):
            yield [calibration[i:i + 1]]

    def make():  # a fresh converter each time: the debugger leaves its converter calibrate-only
        conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
        if mode == Quantization.float16:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        elif mode == Quantization.dynamic:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        elif mode in (Quantization.int8, Quantization.int16x8):
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = representative
            if mode == Quantization.int8:
                conv.target_spec.supported_ops = (
                    [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] if not keep_float
                    else [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS])
                io_dtype = {IOType.int8: tf.int8, IOType.uint8: tf.uint8,
                            IOType.float32: tf.float32}[io]
            else:
                conv.target_spec.supported_ops = [
                    tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
                io_dtype = tf.float32 if io == IOType.float32 else tf.int16
            conv.inference_input_type = io_dtype
            conv.inference_output_type = io_dtype
            if not per_channel:
                conv._experimental_disable_per_channel = True
        return conv

    try:
        if mode == Quantization.int8 and debug_report is not None:
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=make(), debug_dataset=representative)
            debugger.run()
            debug_report.extend(_debug_rows(debugger))
        if mode == Quantization.int8 and keep_float:
            # Names in UPPER case are op types (MEAN), others tensor names from --debug's table.
            ops = [k for k in keep_float if k.isupper()]
            nodes = [k for k in keep_float if not k.isupper()]
            options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_nodes=nodes or None, denylisted_ops=ops or None)
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=make(), debug_dataset=representative, debug_options=options)
            return bytes(debugger.get_nondebug_quantized_model())
        return bytes(make().convert())
    except EdgetlError:
        raise
    except Exception as e:  # the converter reports user-caused failures as generic errors
        raise EdgetlError(f"TFLite conversion ({mode.value}) failed: "
                          f"{str(e).strip().splitlines()[0][:300]}") from None


def _debug_rows(debugger) -> list[dict]:
    """The quantization debugger's layer statistics, worst first (RMSE relative to the scale)."""
    import csv
    import io as _io

    buf = _io.StringIO()
    debugger.layer_statistics_dump(buf)
    buf.seek(0)
    rows = []
    for r in csv.DictReader(buf):
        try:
            scale = float(r.get("scale") or 0) or 1.0
            rmse = float(r.get("mean_squared_error") or 0) ** 0.5
            rows.append({"layer": r.get("tensor_name"), "op": r.get("op_name"),
                         "rmse": rmse, "rmse_per_scale": rmse / scale})
        except ValueError:
            continue
    rows.sort(key=lambda r: -r["rmse_per_scale"])
    return rows


# --- verification --------------------------------------------------------------------------------

def paired_difference(a: np.ndarray, b: np.ndarray, truth: np.ndarray) -> dict:
    """Accuracy of predictions a minus that of b on the same images, in points, with a 95 %
    interval.

    Only the images where exactly one of the two is right count (McNemar): ``a_only`` and
    ``b_only``; the interval is the normal approximation of the paired difference (the same
    as benchmarks/run.py's ``paired``).
    """
    ra, rb = a == truth, b == truth
    n = len(truth)
    a_only, b_only = int((ra & ~rb).sum()), int((~ra & rb).sum())
    diff = (a_only - b_only) / n
    var = max(a_only + b_only - (a_only - b_only) ** 2 / n, 0.0) / n ** 2
    half = 1.96 * var ** 0.5
    return {"diff_points": diff * 100, "ci95_points": [(diff - half) * 100, (diff + half) * 100],
            "a_only": a_only, "b_only": b_only, "images": n}


def wilson_low(correct: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson 95 % interval of a proportion correct/n."""
    if n == 0:
        return 0.0
    p = correct / n
    centre = p + z * z / (2 * n)
    margin = z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    return (centre - margin) / (1 + z * z / n)


def verify_accuracy(keras_model, tflite_path: Path, items, size, prep: dict,
                    names: list[str], batch: int = 32) -> dict:
    """Top-1 of the Keras model and of the .tflite (through the device runner) on the same
    inputs: absolute accuracy, recall per class, the drop with its paired 95 % interval, and
    warnings for a model near chance or a class never predicted."""
    from edgetl.runner import Model

    runner_model = Model(str(tflite_path), delegate="xnnpack")
    y_true, y_keras, y_tfl = [], [], []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        x = load_batch([p for p, _ in chunk], size, prep)
        y_keras.append(np.asarray(keras_model(x, training=False)).argmax(-1))
        y_tfl.append(np.asarray(runner_model.predict(x)).reshape(len(chunk), -1).argmax(-1))
        y_true.append(np.array([label for _, label in chunk]))
    y_true, y_keras, y_tfl = (np.concatenate(a) for a in (y_true, y_keras, y_tfl))
    k = len(names)
    n = len(y_true)

    def per_class(pred):
        return {names[i]: (float((pred[y_true == i] == i).mean()) if (y_true == i).any()
                           else None) for i in range(k)}

    acc_k = float((y_keras == y_true).mean())
    acc_t = float((y_tfl == y_true).mean())
    counts = np.bincount(y_true, minlength=k)
    majority = int(counts.argmax())
    chance = float(counts[majority] / n)
    drop = paired_difference(y_keras, y_tfl, y_true)
    warnings = []
    if wilson_low(int((y_tfl == y_true).sum()), n) <= chance:
        warnings.append(f"the model is near chance: tflite accuracy {acc_t:.4f} on {n} images "
                        f"is not clearly above the {chance:.4f} of always answering "
                        f"'{names[majority]}'; the conversion is not the problem, the trained "
                        "model is (see the run's history.csv and metrics.json)")
    never = [names[i] for i in range(k) if counts[i] and not (y_tfl == i).any()]
    if never:
        warnings.append(f"{len(never)} of {int((counts > 0).sum())} classes are never "
                        f"predicted on the validation images ({', '.join(never[:5])}"
                        f"{', ...' if len(never) > 5 else ''})")
    return {
        "images": int(n),
        "keras_accuracy": acc_k,
        "tflite_accuracy": acc_t,
        "chance_accuracy": chance,
        "drop_points": round((acc_k - acc_t) * 100, 4),
        "drop_ci95_points": [round(v, 4) for v in drop["ci95_points"]],
        "points_per_image": round(100 / n, 4) if n else None,
        "keras_only_right": drop["a_only"],
        "tflite_only_right": drop["b_only"],
        "top1_agreement": float((y_keras == y_tfl).mean()),
        "per_class_keras": per_class(y_keras),
        "per_class_tflite": per_class(y_tfl),
        "never_predicted": never,
        "warnings": warnings,
        "interpreter": f"{runner_model.interpreter_name} {runner_model.interpreter_version}",
    }


def _against_float_before_qat(run: Path, verification: dict, items, size: int, prep: dict,
                              unsafe: bool) -> None:
    """A QAT int8 file judged against what the user would otherwise have shipped: the float
    model from before QAT (the run keeps it as float_before_qat.keras)."""
    from edgetl.train import FLOAT_BEFORE_QAT, load_model

    path = run / FLOAT_BEFORE_QAT
    if not path.exists():  # runs made before edgetl kept it
        return
    model = load_model(path, unsafe)
    right = 0
    for start in range(0, len(items), 32):
        chunk = items[start:start + 32]
        x = load_batch([p for p, _ in chunk], size, prep)
        pred = np.asarray(model(x, training=False)).argmax(-1)
        right += int((pred == np.array([label for _, label in chunk])).sum())
    acc = right / max(len(items), 1)
    verification["float_before_qat_accuracy"] = acc
    verification["drop_vs_float_before_qat_points"] = round(
        (acc - verification["tflite_accuracy"]) * 100, 4)


def drop_gate(acc: dict, max_drop: float) -> tuple[str, str | None]:
    """The --max-drop verdict on a verify_accuracy report, accounting for sample size.

    Returns ('passed' | 'failed' | 'undecided', a sentence or None). It fails only when the
    whole 95 % interval of the drop lies above max_drop; when the point drop is above it but the
    interval reaches below, the validation set is too small to decide. A pass on a set where
    one image weighs more than max_drop comes with a sentence saying so.
    """
    drop, (low, high) = acc["drop_points"], acc["drop_ci95_points"]
    figures = (f"top-1 dropped {drop:.2f} points ({acc['keras_accuracy']:.4f} -> "
               f"{acc['tflite_accuracy']:.4f}; 95 % interval {low:.2f} to {high:.2f} over "
               f"{acc['images']} images, {acc['keras_only_right']} right only in Keras and "
               f"{acc['tflite_only_right']} only in the tflite)")
    if drop <= max_drop:
        if acc["points_per_image"] and acc["points_per_image"] > max_drop:
            return "passed", (f"the validation set is too small to judge --max-drop {max_drop}: "
                              f"one of its {acc['images']} images is "
                              f"{acc['points_per_image']:.2f} points")
        return "passed", None
    if low > max_drop:
        return "failed", f"{figures}, more than --max-drop {max_drop}"
    return "undecided", (f"{figures}: above --max-drop {max_drop}, but the validation set is "
                         f"too small to decide (one image is {acc['points_per_image']:.2f} "
                         "points); verify on more images (--val-data with more images at "
                         "training)")


# --- the stage -----------------------------------------------------------------------------------

def _check_config(cfg: ExportConfig) -> tuple:
    modes = tuple(dict.fromkeys(Quantization(m) for m in cfg.modes))
    if not modes:
        raise EdgetlError("no export mode: pass --int8 (and/or --float32, --float16, --dynamic, "
                          "--int16x8)")
    if cfg.edgetpu:
        if modes != (Quantization.int8,):
            raise EdgetlError("--edgetpu needs --int8 alone: the Edge TPU runs only full-integer "
                              "int8 models")
        if IOType(cfg.io) == IOType.float32:
            raise EdgetlError("--edgetpu with --io float32: the Edge TPU needs uint8 or int8 "
                              "I/O; use --io uint8 (Coral's default) or --io int8")
        if cfg.keep_float:
            raise EdgetlError("--edgetpu and --keep-float contradict each other: float layers "
                              "cannot run on the Edge TPU")
    if cfg.keep_float and Quantization.int8 not in modes:
        raise EdgetlError("--keep-float applies to --int8 only")
    if cfg.calibration and cfg.calibration_manifest:
        raise EdgetlError("--calibration and --calibration-manifest contradict each other: "
                          "pick one")
    if cfg.num_calibration < 1:
        raise EdgetlError(f"--num-calibration {cfg.num_calibration} must be at least 1 "
                          f"(the default is 200; at least {MIN_CALIBRATION} are needed)")
    if cfg.max_drop < 0:
        raise EdgetlError(f"--max-drop {cfg.max_drop} must be >= 0 (percentage points)")
    return modes


def export(cfg: ExportConfig) -> ExportResult:
    """Converts a run's model to each requested mode, verifies and describes each file.

    Raises:
        EdgetlError: bad input (exit 2), before anything is written.
        VerificationError: a file was written but failed its checks (exit 1); it is kept and
            marked as failed in its metadata.
    """
    from edgetl.preprocessing import input_shape
    from edgetl.train import check_out_dir, load_model, load_run

    modes = _check_config(cfg)
    run = Path(cfg.run)
    run_cfg = load_run(run)
    name = cfg.name or run.resolve().name
    out_dir = run / "export"
    targets = {m: out_dir / f"{name}_{m.value}.tflite" for m in modes}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise EdgetlError(f"'{existing[0]}' already exists: pass --overwrite to replace it")
    check_out_dir(out_dir, "export folder")
    if not (run / "split.json").is_file():
        raise EdgetlError(f"run '{run}' has no split.json (a run copied in part?): copy the "
                          "whole run directory again")
    try:
        split = json.loads((run / "split.json").read_text())
        size, prep, names = (input_shape(run_cfg), run_cfg["preprocessing"],
                             run_cfg["class_names"])
        split["train"], split["val"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else type(e).__name__
        raise EdgetlError(f"run '{run}' is damaged (config.json or split.json: {what}): copy "
                          "the whole run directory again, or re-train it") from None
    qat = (run / "qat.h5").exists()
    source_model = run / ("qat.h5" if qat else "model.keras")
    needs_calibration = any(m in (Quantization.int8, Quantization.int16x8) for m in modes)

    timings = {}
    t0 = time.perf_counter()
    calib, calib_paths, source = None, [], None
    if needs_calibration:
        calib_paths, source = calibration_items(cfg, run_cfg, split)
        calib = load_batch(calib_paths, size, prep)
        if not np.isfinite(calib).all():
            raise EdgetlError("calibration images produced non-finite values: check the images")
    timings["calibration_load_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    model = load_model(source_model, cfg.unsafe)
    float_model = load_model(run / "model.keras", cfg.unsafe) if qat else model
    timings["load_model_s"] = round(time.perf_counter() - t0, 3)

    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = None
    if needs_calibration:
        manifest_path = out_dir / f"{name}_calibration.json"
        manifest_existed = manifest_path.exists()
        write_manifest(manifest_path, calib_paths, run_cfg, source, cfg.seed)

    files, reports, failures = [], {}, []
    try:
        for mode in modes:
            report, failed = _export_one(cfg, mode, model, float_model, qat, calib, run,
                                         run_cfg, name, targets[mode], manifest_path, split,
                                         timings)
            files.append(str(targets[mode]))
            reports[mode.value] = report
            failures += failed
    except EdgetlError:
        if not files:  # refused before any file: leave the export folder as it was
            if manifest_path is not None and not manifest_existed:
                manifest_path.unlink(missing_ok=True)
            if created_dir and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise
    result = ExportResult(tuple(files), reports, str(manifest_path) if manifest_path else None)
    if failures:
        error = VerificationError("; ".join(failures))
        error.result = result
        raise error
    return result


def format_reports(result: ExportResult) -> str:
    """A readable summary of an export: one block per file."""
    lines = []
    for path, (mode, r) in zip(result.files, result.reports.items()):
        lines.append(f"{path}  ({r['size_bytes'] / 1e6:.2f} MB, {mode}, io {r['io']}, "
                     f"converted in {r['convert_s']:.1f} s)")
        if "integer_only" in r:
            lines.append(f"  integer-only: {'yes' if r['integer_only'] else 'NO'}"
                         + "".join(f"\n    {o}" for o in r["offending_ops"][:20]))
        if "note" in r:
            lines.append(f"  note: {r['note']}")
        a = r.get("accuracy")
        if a:
            lines.append(f"  accuracy on {a['images']} validation images: keras "
                         f"{a['keras_accuracy']:.4f}  tflite {a['tflite_accuracy']:.4f}  drop "
                         f"{a['drop_points']:.2f} points  top-1 agreement "
                         f"{a['top1_agreement']:.4f}  ({a['interpreter']})")
            if "float_before_qat_accuracy" in a:
                lines.append(f"  against the float model before QAT: "
                             f"{a['float_before_qat_accuracy']:.4f} -> tflite "
                             f"{a['tflite_accuracy']:.4f}  drop "
                             f"{a['drop_vs_float_before_qat_points']:.2f} points")
            if "chance_accuracy" in a:
                lines.append(f"  tflite accuracy {a['tflite_accuracy']:.4f} vs chance "
                             f"{a['chance_accuracy']:.4f} (always the most frequent class); "
                             f"drop 95 % interval {a['drop_ci95_points'][0]:.2f} to "
                             f"{a['drop_ci95_points'][1]:.2f} points, one image "
                             f"{a['points_per_image']:.2f}")
            recall = [(k, v) for k, v in a["per_class_tflite"].items() if v is not None]
            shown = sorted(recall, key=lambda kv: kv[1])[:10]
            lines.append(f"  recall per class (tflite{', weakest 10' if len(recall) > 10 else ''}"
                         "): " + ", ".join(f"{k} {v:.3f}" for k, v in shown))
            for w in a.get("warnings", []):
                lines.append(f"  warning: {w}")
        for w in r.get("worst_layers", [])[:5]:
            lines.append(f"  debug: {w['layer']} ({w['op']}) rmse/scale {w['rmse_per_scale']:.3f}")
        tpu = r.get("edgetpu")
        if tpu:
            lines.append(f"  edge tpu: {tpu.get('verdict')} [{tpu.get('source')}]")
        n_warn = len((a or {}).get("warnings", []))
        status = "passed" if r["passed"] else "FAILED"
        if n_warn and r["passed"]:
            status += f" (the conversion), with {n_warn} warning(s) above"
        lines.append(f"  verification: {status}")
    if result.manifest:
        lines.append(f"calibration manifest: {result.manifest}")
    return "\n".join(lines)


def _export_one(cfg, mode, model, float_model, qat, calib, run, run_cfg, name, target,
                manifest_path, split, timings) -> tuple[dict, list[str]]:
    from edgetl.inspect import edgetpu_section, integer_only_report
    from edgetl.keras import versions
    from edgetl.metadata import mediapipe_note, write as write_metadata
    from edgetl.runner import read_model

    from edgetl.preprocessing import input_shape

    size, prep, names = input_shape(run_cfg), run_cfg["preprocessing"], run_cfg["class_names"]
    height, width, channels = size
    io = IOType(cfg.io) if mode in (Quantization.int8, Quantization.int16x8) else IOType.float32
    if mode == Quantization.int8 and cfg.keep_float:
        io = IOType.float32  # selective quantization keeps float I/O
    # Float modes have float I/O; QAT models only matter for integer modes.
    src = model if mode in (Quantization.int8, Quantization.int16x8) else float_model
    debug_rows = [] if (cfg.debug and mode == Quantization.int8) else None
    t0 = time.perf_counter()
    raw = convert(src, mode, io, calib, tuple(cfg.keep_float) if mode == Quantization.int8
                  else (), debug_rows)
    convert_s = round(time.perf_counter() - t0, 3)
    info = read_model(raw)
    failures, report = [], {"mode": mode.value, "io": io.value, "convert_s": convert_s}
    if mode == Quantization.int8:
        offenders = integer_only_report(info, io.value)
        report["integer_only"] = not offenders
        report["offending_ops"] = offenders
        if offenders and not cfg.keep_float:
            failures.append(f"{target.name} is not integer-only: {'; '.join(offenders[:10])}")
        if cfg.keep_float:
            report["note"] = (f"layers kept in float ({', '.join(cfg.keep_float)}): the model "
                              "is not integer-only")
    if debug_rows is not None:
        report["worst_layers"] = debug_rows[:10]
    inputs = [t for t in info.tensors if t.index in info.inputs]
    outputs = [t for t in info.tensors if t.index in info.outputs]
    meta = {
        "format": "edgetl", "format_version": 1, "name": name, "mode": mode.value,
        "labels": names,
        "input": {"height": height, "width": width, "channels": channels,
                  "color": "RGB" if channels == 3 else "GRAYSCALE",
                  "resize": "bilinear", "mean": prep["mean"], "std": prep["std"],
                  "channel_order": prep["channel_order"], "preprocessing": prep.get("name"),
                  "preprocessing_reason": prep.get("reason")},
        "io": {"input": [_tensor_meta(t) for t in inputs],
               "output": [_tensor_meta(t) for t in outputs]},
        "settings": {"io": io.value, "qat": qat, "num_calibration": len(calib)
                     if calib is not None else 0, "keep_float": list(cfg.keep_float),
                     "max_drop": cfg.max_drop, "seed": cfg.seed, "calibration_manifest_sha256":
                     _sha256(str(manifest_path)) if manifest_path and calib is not None
                     else None},
        "source_run": {"backbone": run_cfg.get("backbone"), "data_hash": run_cfg.get("data_hash"),
                       "train": {k: run_cfg["train"].get(k) for k in
                                 ("strategy", "epochs", "qat", "alpha", "weights")}},
        "versions": versions(),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    # Verified under a hidden name; only a checked file (with its sidecar) gets the real name, so a
    # killed export never leaves a .tflite that looks finished.
    staged = target.with_name(f".{target.stem}.partial.tflite")
    try:
        # Standard TFLite metadata (MediaPipe, LiteRT support library) + edgetl's appended zip.
        _atomic_write_bytes(staged, write_metadata(raw, meta, names))
        report["mediapipe"] = mediapipe_note(meta) or "ok"
        if cfg.edgetpu:
            report["edgetpu"] = edgetpu_section(info, str(staged))
        if cfg.verify:
            t0 = time.perf_counter()
            val = [tuple(x) for x in split["val"]]
            verification = verify_accuracy(src, staged, val, size, prep, names)
            report["verify_s"] = round(time.perf_counter() - t0, 3)
            report["accuracy"] = verification
            if qat and mode == Quantization.int8:
                _against_float_before_qat(run, verification, val, size, prep, cfg.unsafe)
            gate, why = drop_gate(verification, cfg.max_drop)
            report["drop_gate"] = gate
            if gate == "failed":
                failures.append(f"{target.name}: {why}")
            elif why:
                verification["warnings"].append(why)
        report["passed"] = not failures
        report["size_bytes"] = staged.stat().st_size
        report["timings"] = dict(timings, convert_s=convert_s)
        if failures:  # keep the file, marked as failed in its own metadata
            meta["verification"] = {"passed": False, "failures": failures}
            _atomic_write_bytes(staged, write_metadata(raw, meta, names))
        sidecar = dict(meta, verification=report, file=target.name,
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _atomic_write_bytes(target.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    return report, failures


def _tensor_meta(t) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
            "scale": list(t.scale)[:1] if t.scale else None,
            "zero_point": list(t.zero_point)[:1] if t.zero_point else None}
