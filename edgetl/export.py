"""export(ExportConfig) -> ExportResult: Keras run -> verified TFLite with embedded metadata.

``convert`` is the only function that touches ``TFLiteConverter``. After each conversion the
model is checked (integer-only for int8) and evaluated on the run's validation split through the
device runner's own code, beside the Keras model on the very same inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.config import ExportConfig, IOType, Quantization
from edgetl.data import file_sha256
from edgetl.errors import EdgetlError, VerificationError
from edgetl.progress import SILENT, Progress

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


def _io_error(path, e: BaseException) -> EdgetlError:
    """A fault of the machine (full disk, read-only target, vanished folder) as one line."""
    text = getattr(e, "strerror", None) or str(e).strip()
    reason = text.splitlines()[0][:300] if text else type(e).__name__
    return EdgetlError(f"cannot read or write '{path}': {reason}")


# A handler's KeyboardInterrupt can be lost (code that swallows it; CI saw a signalled export
# end with exit 0 once in a few hundred runs), so the signal is also remembered, and checked
# (with any still pending) after each mode and before anything is renamed into place.
_signalled: list = []


def interrupt_on_signal(signum, frame):
    """SIGINT/SIGTERM handler for an export: remembers the signal, raises KeyboardInterrupt."""
    _signalled.append(signum)
    raise KeyboardInterrupt


def _raise_if_signalled() -> None:
    held = {signal.SIGINT, signal.SIGTERM}
    if _signalled or held & signal.sigpending():  # pending: blocked by every thread
        raise KeyboardInterrupt


@contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block ends: renames and clean-up are not cut in half."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Staging:
    """The temporary files of one export, all in the export folder under unique hidden names.

    Every file is written here first; ``commit`` renames them to their final names all together
    (previous files set aside, and put back if any rename fails); ``discard`` removes what is
    left. Names start with ``.<final name>.`` or ``.<stem>.partial<suffix>.`` so a later
    successful export of the same name can sweep what a ``kill -9`` left.
    """

    def __init__(self, out_dir: Path):
        self.dir = out_dir
        self.temps: list[Path] = []

    def write(self, final: Path, data: bytes) -> Path:
        """Writes ``data`` (fsynced) to a new staged file for ``final``; returns its path.

        Raises:
            EdgetlError: the disk is full or the folder cannot be written (names ``final``).
        """
        from edgetl.runner import shareable

        try:
            fd, name = tempfile.mkstemp(dir=self.dir, prefix=f".{final.name}.", suffix=".tmp")
            tmp = Path(name)
            self.temps.append(tmp)
            shareable(fd)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # .tmp may be half-written; a .partial file is complete (fsynced) but not yet checked
            staged = final.with_name(f".{final.stem}.partial{final.suffix}.{tmp.name[-12:-4]}")
            self.temps.append(staged)
            os.replace(tmp, staged)
        except OSError as e:
            raise _io_error(final, e) from None
        return staged

    def drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def commit(self, pairs: list) -> None:
        """Renames each (staged, final) pair in order: all of them, or none.

        A final file that exists is set aside first and deleted only after every rename
        succeeded; on any failure the new files are removed and the old ones put back.
        """
        moved = []  # (final, set-aside copy or None)
        with _signals_held():
            try:
                for staged, final in pairs:
                    backup = None
                    if os.path.lexists(final):
                        backup = final.with_name(f".{final.name}.{secrets.token_hex(4)}.old")
                        os.replace(final, backup)
                    moved.append((final, backup))
                    os.replace(staged, final)
            except BaseException as e:
                for final, backup in reversed(moved):
                    if backup is not None:
                        os.replace(backup, final)
                    else:
                        final.unlink(missing_ok=True)
                if isinstance(e, OSError):
                    raise _io_error(e.filename or self.dir, e) from None
                raise
            for _, backup in moved:  # the new files are in place: a leftover is no failure
                if backup is not None:
                    try:
                        backup.unlink(missing_ok=True)
                    except OSError:
                        pass

    def discard(self) -> None:
        with _signals_held():
            for t in self.temps:
                try:
                    t.unlink(missing_ok=True)
                except OSError:
                    pass

    def sweep(self, finals) -> None:
        """Removes hidden leftovers of earlier killed exports of these final files."""
        prefixes = tuple(f".{f.name}." for f in finals) + tuple(
            f".{f.stem}.partial{f.suffix}" for f in finals)
        for p in self.dir.iterdir():
            if p.name.startswith(prefixes) and p.is_file():
                p.unlink(missing_ok=True)


@contextmanager
def _claim(run: Path):
    """Holds an exclusive lock on the run directory (an ``flock`` of the folder itself, so no
    lock file is created or left behind) while the block runs.

    Raises:
        EdgetlError: another export of this run is running (refused at once, not waited for).
    """
    import fcntl

    try:
        fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise _io_error(run, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EdgetlError(f"another edgetl export of run '{run}' is running: wait for it to "
                              "finish, then export again") from None
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


# --- calibration ---------------------------------------------------------------------------------

def calibration_items(cfg: ExportConfig, run_cfg: dict, split: dict) -> tuple[list[str], str]:
    """The calibration image paths and where they came from (train split, folder or manifest)."""
    from edgetl.data import balanced_sample, scan_folder
    from edgetl.preprocessing import input_shape

    size = input_shape(run_cfg)[:2]
    if cfg.calibration_manifest:
        return _replay_manifest(cfg.calibration_manifest, run_cfg), "manifest"
    if cfg.calibration:
        from edgetl.runner import path_problem

        root = Path(cfg.calibration)
        problem = path_problem(root, "--calibration", "folder",
                               missing=f"--calibration '{root}' does not exist")
        if problem:  # missing, a symlink loop, a file, a FIFO, ...
            raise EdgetlError(f"{problem}; give a folder of images")
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


# A manifest lists at most MAX_NUM_CALIBRATION-ish images with a hash each: a few MB at most.
MAX_MANIFEST_BYTES = 64 << 20


def _replay_manifest(path: str, run_cfg: dict) -> list[str]:
    """The image paths of a calibration manifest, each checked against its sha256.

    Raises:
        EdgetlError: the manifest is missing, not a regular file, not a manifest (wrong shape,
            no images), made for another input, or an image is missing or changed.
    """
    from edgetl.runner import path_problem

    p = Path(path)
    problem = path_problem(p, "--calibration-manifest",  # a symlink loop, a FIFO, a folder, ...
                           missing=f"--calibration-manifest '{p}' does not exist")
    if problem:
        raise EdgetlError(f"{problem}; give the *_calibration.json an export wrote")
    not_manifest = (f"--calibration-manifest '{p}' is not an edgetl calibration manifest "
                    "(a JSON object whose 'images' lists {\"path\", \"sha256\"} entries): give "
                    "the *_calibration.json an export wrote")
    try:
        if p.stat().st_size > MAX_MANIFEST_BYTES:
            raise EdgetlError(not_manifest)
        m = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        raise EdgetlError(not_manifest) from None
    images = m.get("images") if isinstance(m, dict) else None
    if not isinstance(images, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"]
            and "\0" not in e["path"] and isinstance(e.get("sha256"), str) for e in images):
        raise EdgetlError(not_manifest)
    if m.get("input_size") != run_cfg["input_size"] or m.get("preprocessing") != run_cfg[
            "preprocessing"]:
        prep = m.get("preprocessing")
        raise EdgetlError(f"--calibration-manifest '{p}' was made for input "
                          f"{m.get('input_size')} px / preprocessing "
                          f"{prep.get('name') if isinstance(prep, dict) else prep}, but this "
                          f"run uses {run_cfg['input_size']} px / "
                          f"{run_cfg['preprocessing'].get('name')}")
    if not images:  # an export may calibrate on fewer than MIN_CALIBRATION (--num-calibration)
        raise EdgetlError(f"--calibration-manifest '{p}' lists no images: give the "
                          "*_calibration.json an export wrote")
    paths = []
    for entry in images:
        f = entry["path"]
        if not Path(f).is_file():
            raise EdgetlError(f"calibration image '{f}' from the manifest is missing (or not "
                              "a regular file)")
        try:
            digest = file_sha256(f)
        except OSError as e:
            raise _io_error(Path(f), e) from None
        if digest != entry["sha256"]:
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


def manifest_bytes(paths, run_cfg: dict, source: str, seed: int) -> bytes:
    """The calibration manifest (images with their SHA-256) as JSON bytes."""
    manifest = {
        "format": "edgetl-calibration", "format_version": MANIFEST_FORMAT,
        "source": source, "seed": seed, "count": len(paths),
        "input_size": run_cfg["input_size"], "input_shape": run_cfg.get("input_shape"),
        "preprocessing": run_cfg["preprocessing"],
        "images": [{"path": str(p), "sha256": file_sha256(p)} for p in paths],
    }
    return json.dumps(manifest, indent=1).encode()


# --- conversion ----------------------------------------------------------------------------------

def convert(model, mode: Quantization, io: IOType, calibration: np.ndarray | None,
            keep_float: tuple = (), debug_report: list | None = None,
            per_channel: bool = True, on_image=None) -> bytes:
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
        on_image: called with no argument as the converter takes each calibration image
            (progress).
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
            if on_image is not None:
                on_image()

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
        io_errors = (OSError, tf.errors.ResourceExhaustedError, tf.errors.NotFoundError,
                     tf.errors.PermissionDeniedError, tf.errors.DataLossError)
        if isinstance(e, io_errors):  # its scratch SavedModel lives in the temporary folder
            raise _io_error(tempfile.gettempdir(), e) from None
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
    ``b_only``; the interval is the normal approximation of the paired difference
    (benchmarks/run.py's ``paired`` calls this).
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
                    names: list[str], batch: int = 32, on_images=None) -> dict:
    """Top-1 of the Keras model and of the .tflite (through the device runner) on the same
    inputs: absolute accuracy, recall per class, the drop with its paired 95 % interval, and
    warnings for a model near chance or a class never predicted. ``on_images(n)`` is called
    after each batch of n images (progress)."""
    from edgetl.runner import Model

    runner_model = Model(str(tflite_path), delegate="xnnpack")
    y_true, y_keras, y_tfl = [], [], []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        x = load_batch([p for p, _ in chunk], size, prep)
        y_keras.append(np.asarray(keras_model(x, training=False)).argmax(-1))
        y_tfl.append(np.asarray(runner_model.predict(x)).reshape(len(chunk), -1).argmax(-1))
        y_true.append(np.array([label for _, label in chunk]))
        if on_images is not None:
            on_images(len(chunk))
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

MAX_CALIBRATION = 10_000  # 10,000 images of 224 px are 6 GB of float32 in memory
MAX_SEED = 2**32 - 1  # what numpy's RandomState (the calibration sample) accepts


def _check_config(cfg: ExportConfig) -> tuple:
    """Every flag checked before anything is read or written; returns the modes, deduplicated."""
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
    if cfg.edgetpu_allow_cpu and not cfg.edgetpu:
        raise EdgetlError("--edgetpu-allow-cpu needs --edgetpu (it relaxes the Edge TPU check)")
    if cfg.keep_float and Quantization.int8 not in modes:
        raise EdgetlError("--keep-float applies to --int8 only")
    _check_auto(cfg, modes)
    if cfg.calibration and cfg.calibration_manifest:
        raise EdgetlError("--calibration and --calibration-manifest contradict each other: "
                          "pick one")
    if isinstance(cfg.num_calibration, bool) or not isinstance(cfg.num_calibration, int) or not (
            1 <= cfg.num_calibration <= MAX_CALIBRATION):
        raise EdgetlError(f"--num-calibration {cfg.num_calibration} must be at least 1 and at "
                          f"most {MAX_CALIBRATION} (the default is 200; at least "
                          f"{MIN_CALIBRATION} are needed)")
    try:
        max_drop = float(cfg.max_drop)
    except (TypeError, ValueError):
        max_drop = math.nan
    if not (math.isfinite(max_drop) and 0 <= max_drop <= 100):
        raise EdgetlError(f"--max-drop {cfg.max_drop} must be a finite number >= 0 and <= 100 "
                          "(percentage points of top-1 accuracy)")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not (
            0 <= cfg.seed <= MAX_SEED):
        raise EdgetlError(f"--seed {cfg.seed} must be an integer from 0 to {MAX_SEED}")
    if cfg.name is not None:
        n = cfg.name
        if (not n or n.startswith(".") or "/" in n or "\\" in n or len(n) > 200
                or any(ord(ch) < 32 or ord(ch) == 127 for ch in n)):
            raise EdgetlError(f"--name {n!r} must be a plain file name: not empty, no '/' or "
                              "control characters, not starting with '.', at most 200 characters")
    return modes


def _check_auto(cfg: ExportConfig, modes: tuple) -> None:
    """The --auto / --check-calibration / --plots flags, checked with the others."""
    from edgetl.autoquant import MAX_CANDIDATES

    auto = getattr(cfg, "auto", False)
    if auto and Quantization.int8 not in modes:
        raise EdgetlError("--auto needs --int8: it searches around the int8 model")
    if auto and cfg.keep_float:
        raise EdgetlError("--auto and --keep-float contradict each other: --auto chooses the "
                          "float layers itself; drop one of them")
    if auto and not cfg.verify:
        raise EdgetlError("--auto and --no-verify contradict each other: the search measures "
                          "accuracy on the validation split")
    n = getattr(cfg, "auto_max_candidates", MAX_CANDIDATES)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 50:
        raise EdgetlError(f"--auto-max-candidates {n} must be an integer from 2 to 50 (the "
                          f"default is {MAX_CANDIDATES})")
    if getattr(cfg, "plots", False) and not auto:
        raise EdgetlError("--plots needs --auto (it plots the candidates of the search)")
    if getattr(cfg, "check_calibration", False) and Quantization.int8 not in modes:
        raise EdgetlError("--check-calibration needs --int8 (it compares two int8 "
                          "calibrations)")


def export(cfg: ExportConfig, progress: Progress = SILENT, on_report=None) -> ExportResult:
    """Converts a run's model to each requested mode, verifies and describes each file.

    ``progress`` shows each step (calibration images, model, each conversion and verification);
    ``on_report(path, mode, report)`` is called as each mode is verified, before the next one
    converts (its file is renamed into place with the others at the end).

    Everything is written under hidden temporary names in RUN/export and renamed into place at
    the end, all files together; on any failure (an exception of any kind, Ctrl-C) the temporary
    files are removed and files replaced under ``overwrite`` are put back. The run is claimed
    exclusively: a second export of the same run while one runs is refused.

    Raises:
        EdgetlError: bad input or a fault of the machine (exit 2); nothing is left behind.
        VerificationError: a file was written but failed its checks (exit 1); it is kept and
            marked as failed in its metadata.
    """
    modes = _check_config(cfg)  # before TensorFlow loads: a bad flag costs no time
    _signalled.clear()
    from edgetl.preprocessing import input_shape
    from edgetl.train import check_out_dir, load_run

    run = Path(cfg.run)
    run_cfg = load_run(run)
    name = cfg.name or run.resolve().name
    out_dir = run / "export"
    targets = {m: out_dir / f"{name}_{m.value}.tflite" for m in modes}
    _refuse_existing(targets, cfg.overwrite)
    _refuse_selective_on_qat(cfg, run, modes)
    if cfg.compare_ptq:
        check_compare_ptq(run, modes, cfg.verify)
        _refuse_existing({"ptq": out_dir / f"{name}_int8_ptq.tflite"}, cfg.overwrite)
    check_out_dir(out_dir, "export folder")
    from edgetl.train import load_split

    split = load_split(run, len(run_cfg["class_names"]))
    try:
        input_shape(run_cfg), run_cfg["preprocessing"], run_cfg["class_names"]
        split["train"], split["val"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else type(e).__name__
        raise EdgetlError(f"run '{run}' is damaged (config.json or split.json: {what}): copy "
                          "the whole run directory again, or re-train it") from None

    with _claim(run):
        _refuse_existing(targets, cfg.overwrite)  # again: another export may just have ended
        created_dir = not out_dir.exists()
        staging = _Staging(out_dir)
        try:
            return _export_claimed(cfg, modes, run, run_cfg, split, name, targets, staging,
                                   progress, on_report)
        except BaseException as e:
            staging.discard()
            if created_dir:
                try:
                    out_dir.rmdir()  # only when empty: a finished file of this export stays
                except OSError:
                    pass
            translated = _translate(e, out_dir)
            if translated is e:
                raise
            raise translated from None


def _refuse_selective_on_qat(cfg: ExportConfig, run: Path, modes) -> None:
    """--auto, --keep-float and --debug need TFLite's selective quantization (the
    QuantizationDebugger), which cannot convert a QAT model: its int8 comes from the trained
    fake-quant ranges (TensorFlow fails with "Please check if the quantized model is in debug
    mode"). Refused before anything loads.

    Raises:
        EdgetlError: one of those flags with --int8 on a run trained with --qat.
    """
    flag = ("--auto" if cfg.auto else "--keep-float" if cfg.keep_float else
            "--debug" if cfg.debug else None)
    if flag and Quantization.int8 in modes and (run / "qat.h5").is_file():
        raise EdgetlError(
            f"{flag} with --int8 on run '{run}', which was trained with --qat: a QAT model's "
            "int8 comes from its trained fake-quant ranges and cannot be quantized selectively. "
            "Export it without " + flag + "; to see which tensors int8 hurts, run `edgetl "
            "sensitivity RUN` (it uses the run's float model); to search, train without --qat "
            "and export with --auto")


def _translate(e: BaseException, out_dir: Path) -> BaseException:
    """A fault of the machine as edgetl's one line; anything else unchanged."""
    if isinstance(e, EdgetlError) or not isinstance(e, Exception):
        return e
    if isinstance(e, OSError):
        return _io_error(e.filename or out_dir, e)
    if _is_tf_error(e):
        return _io_error(out_dir, e)
    return e


def _is_tf_error(e: BaseException) -> bool:
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None) if tf else None
    return errors is not None and isinstance(e, errors.OpError)


def _refuse_existing(targets: dict, overwrite: bool) -> None:
    finals = [f for p in targets.values() for f in (p, p.with_suffix(".json"))]
    finals += [p.with_name(p.name.rsplit("_", 1)[0] + "_calibration.json")
               for p in targets.values()]
    folders = [str(p) for p in finals if p.is_dir()]
    if folders:  # --overwrite replaces earlier exports, never a folder someone put there
        raise EdgetlError(f"'{folders[0]}' is a folder, not an earlier export: move it away "
                          "or choose another --name")
    existing = [str(p) for p in targets.values() if os.path.lexists(p)]
    if existing and not overwrite:
        raise EdgetlError(f"'{existing[0]}' already exists: pass --overwrite to replace it")


def _export_claimed(cfg, modes, run, run_cfg, split, name, targets, staging,
                    progress: Progress = SILENT, on_report=None) -> ExportResult:
    from edgetl.train import load_model

    from edgetl.preprocessing import input_shape

    size, prep = input_shape(run_cfg), run_cfg["preprocessing"]
    qat = (run / "qat.h5").exists()
    source_model = run / ("qat.h5" if qat else "model.keras")
    needs_calibration = any(m in (Quantization.int8, Quantization.int16x8) for m in modes)
    out_dir = staging.dir

    timings = {}
    t0 = time.perf_counter()
    calib, calib_paths, source = None, [], None
    if needs_calibration:
        with progress.step("calibration images") as step:
            calib_paths, source = calibration_items(cfg, run_cfg, split)
            calib = load_batch(calib_paths, size, prep)
            if not np.isfinite(calib).all():
                raise EdgetlError("calibration images produced non-finite values: check the "
                                  "images")
            step.done(f"{len(calib_paths)} from the {source}")
    timings["calibration_load_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    try:
        with progress.step(f"load {source_model.name}") as step:
            model = load_model(source_model, cfg.unsafe)
            float_note = float_weights(run) if qat else None
            float_model = load_model(run / "model.keras", cfg.unsafe) if qat else model
            step.done(f"{model.count_params():,} parameters{' (QAT)' if qat else ''}")
    except OSError as e:
        raise _io_error(e.filename or source_model, e) from None
    except Exception as e:
        if _is_tf_error(e):
            raise _io_error(source_model, e) from None
        raise
    timings["load_model_s"] = round(time.perf_counter() - t0, 3)

    progress.release()  # the calibration images and the model are good: bad input is past
    try:  # created only now: an export refused while reading leaves the run as it was
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _io_error(out_dir, e) from None
    pairs = []  # (staged, final), in the order they are renamed
    manifest_path, manifest_sha = None, None
    if needs_calibration:
        manifest_path = out_dir / f"{name}_calibration.json"
        data = manifest_bytes(calib_paths, run_cfg, source, cfg.seed)
        manifest_sha = hashlib.sha256(data).hexdigest()
        pairs.append((staging.write(manifest_path, data), manifest_path))

    files, reports, failures = [], {}, []
    for mode in modes:
        report, failed, staged = _export_one(cfg, mode, model, float_model, qat, calib, run,
                                             run_cfg, name, targets[mode], manifest_sha, split,
                                             timings, staging, calib_paths=calib_paths,
                                             progress=progress)
        pairs += staged
        _raise_if_signalled()
        files.append(str(targets[mode]))
        reports[mode.value] = report
        failures += failed
        if float_note and mode not in (Quantization.int8, Quantization.int16x8):
            report["float_weights"] = float_note
            _amend_sidecar(staging, pairs, targets[mode], {"float_weights": float_note})
        if on_report is not None and not (cfg.compare_ptq and mode == Quantization.int8):
            on_report(str(targets[mode]), mode.value, report)  # int8: after its comparison
    if cfg.compare_ptq:
        from edgetl.train import FLOAT_BEFORE_QAT

        ptq_target = out_dir / f"{name}_int8_ptq.tflite"
        before = load_model(run / FLOAT_BEFORE_QAT, cfg.unsafe)
        report, failed, staged = _export_one(cfg, Quantization.int8, before, before,
                                             False, calib, run, run_cfg, name, ptq_target,
                                             manifest_sha, split, timings, staging,
                                             progress=progress)
        pairs += staged
        _raise_if_signalled()
        files.append(str(ptq_target))
        reports["int8_ptq"] = report
        failures += failed
        _add_ptq_comparison(staging, pairs, targets[Quantization.int8], ptq_target,
                            reports[Quantization.int8.value], report, split, run_cfg)
        if on_report is not None:
            on_report(str(targets[Quantization.int8]), Quantization.int8.value,
                      reports[Quantization.int8.value])
            on_report(str(ptq_target), "int8_ptq", report)
    # The manifest and sidecars are renamed first and each model last, all with signals held:
    # Ctrl-C cannot cut this short, and a failed rename puts every previous file back.
    _raise_if_signalled()
    staging.commit(pairs)
    staging.sweep([final for _, final in pairs])
    result = ExportResult(tuple(files), reports, str(manifest_path) if manifest_path else None)
    if failures:
        error = VerificationError("; ".join(failures))
        error.result = result
        raise error
    return result


def format_reports(result: ExportResult) -> str:
    """A readable summary of an export: one block per file."""
    lines = [format_report(path, mode, r)
             for path, (mode, r) in zip(result.files, result.reports.items())]
    if result.manifest:
        lines.append(f"calibration manifest: {result.manifest}")
    return "\n".join(lines)


def format_report(path: str, mode: str, r: dict) -> str:
    """One file's block of ``format_reports``: size, checks, accuracy, verdict."""
    lines = []
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
    lines += _qat_lines(r)
    if r.get("auto") or r.get("calibration_check"):
        from edgetl.autoquant import format_check, format_search

        lines += format_search(r["auto"]) if r.get("auto") else []
        lines += format_check(r["calibration_check"]) if r.get("calibration_check") else []
    for w in r.get("worst_layers", [])[:5]:
        lines.append(f"  debug: {w['layer']} ({w['op']}) rmse/scale {w['rmse_per_scale']:.3f}")
    tpu = r.get("edgetpu")
    if tpu:
        lines.append(f"  edge tpu: {tpu.get('verdict')} [{tpu.get('source')}]")
        problem = edgetpu_problem(tpu)
        if problem and problem["cpu_ops"]:
            lines.append("  edge tpu: on the CPU: " + ", ".join(problem["cpu_ops"][:20]))
    for w in r.get("warnings", []):
        lines.append(f"  warning: {w}")
    n_warn = len((a or {}).get("warnings", [])) + len(r.get("warnings", []))
    status = "passed" if r["passed"] else "FAILED"
    if n_warn and r["passed"]:
        status += f" (the conversion), with {n_warn} warning(s) above"
    lines.append(f"  verification: {status}")
    return "\n".join(lines)


def _export_one(cfg, mode, model, float_model, qat, calib, run, run_cfg, name, target,
                manifest_sha, split, timings, staging,
                calib_paths=(), progress: Progress = SILENT) -> tuple[dict, list[str], list]:
    """Converts, stages and verifies one mode; returns its report, failures and staged files."""
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
    keep_float, auto, written_mode = tuple(cfg.keep_float), None, mode
    calibrates = calib is not None and mode in (Quantization.int8, Quantization.int16x8)
    if mode == Quantization.int8 and getattr(cfg, "auto", False):
        with progress.step("search int8 (--auto)") as step:
            raw, chosen, auto = _auto_convert(cfg, src, calib, split, size, prep, io)
            keep_float, written_mode = tuple(chosen["keep_float"]), Quantization(chosen["mode"])
            io = IOType.float32 if chosen["io"] == "float32" else io
            step.done(f"chose {chosen['mode']}, {len(raw) / 1e6:.2f} MB before metadata")
    else:
        with progress.step(f"convert {mode.value}", len(calib) if calibrates else None) as step:
            step.describe("calibrating" if calibrates else "converting")
            raw = convert(src, mode, io, calib, keep_float if mode == Quantization.int8 else (),
                          debug_rows, on_image=step.advance if calibrates else None)
            step.done(f"{len(raw) / 1e6:.2f} MB before metadata" + (
                f", calibrated on {len(calib)} images" if calibrates else ""))
    convert_s = round(time.perf_counter() - t0, 3)
    info = read_model(raw)
    failures, report = [], {"mode": mode.value, "io": io.value, "convert_s": convert_s}
    if mode == Quantization.int8:
        int16 = written_mode == Quantization.int16x8
        offenders = integer_only_report(info, "int16" if int16 and io != IOType.float32
                                        else io.value, int16x8=int16)
        report["integer_only"] = not offenders
        report["offending_ops"] = offenders
        if offenders and not keep_float:
            failures.append(f"{target.name} is not integer-only: {'; '.join(offenders[:10])}")
        if keep_float:
            report["note"] = (f"layers kept in float ({', '.join(keep_float)}): the model "
                              "is not integer-only")
        elif int16:
            report["note"] = ("--auto chose int16x8 (int16 activations, int8 weights) for this "
                              "file: integer, but not for the Edge TPU")
    if auto is not None:
        report["auto"] = auto
    if mode == Quantization.int8 and getattr(cfg, "check_calibration", False):
        report["calibration_check"] = _calibration_check(cfg, src, calib, calib_paths, split,
                                                         size, prep, io)
        if report["calibration_check"].get("warning"):
            report.setdefault("warnings", []).append(report["calibration_check"]["warning"])
    if debug_rows is not None:
        report["worst_layers"] = debug_rows[:10]
    inputs = [t for t in info.tensors if t.index in info.inputs]
    outputs = [t for t in info.tensors if t.index in info.outputs]
    meta = {
        "format": "edgetl", "format_version": 1, "name": name, "mode": written_mode.value,
        "labels": names,
        "input": {"height": height, "width": width, "channels": channels,
                  "color": "RGB" if channels == 3 else "GRAYSCALE",
                  "resize": "bilinear", "mean": prep["mean"], "std": prep["std"],
                  "channel_order": prep["channel_order"], "preprocessing": prep.get("name"),
                  "preprocessing_reason": prep.get("reason")},
        "io": {"input": [_tensor_meta(t) for t in inputs],
               "output": [_tensor_meta(t) for t in outputs]},
        "settings": {"io": io.value, "qat": qat, "num_calibration": len(calib)
                     if calib is not None else 0, "keep_float": list(keep_float),
                     "max_drop": cfg.max_drop, "seed": cfg.seed, "calibration_manifest_sha256":
                     manifest_sha if calib is not None else None, "edgetpu": cfg.edgetpu,
                     "edgetpu_allow_cpu": cfg.edgetpu_allow_cpu},
        "source_run": source_run(run_cfg),
        "versions": versions(),
    }
    # Verified under a hidden name; only a checked file (with its sidecar) gets the real name, so a
    # killed export never leaves a .tflite that looks finished.
    # Standard TFLite metadata (MediaPipe, LiteRT support library) + edgetl's appended zip.
    staged = staging.write(target, write_metadata(raw, meta, names))
    report["mediapipe"] = mediapipe_note(meta) or "ok"
    if cfg.edgetpu:
        tpu = edgetpu_section(info, str(staged))
        report["edgetpu"] = tpu
        problem = edgetpu_problem(tpu)
        if problem and cfg.edgetpu_allow_cpu and not problem["hard"]:
            report.setdefault("warnings", []).append(
                f"{target.name}: {problem['text']} (accepted: --edgetpu-allow-cpu)")
        elif problem:
            failures.append(f"{target.name} {problem['text']}" + (
                "" if problem["hard"] else "; pass --edgetpu-allow-cpu to accept CPU fallback"))
    if cfg.verify:
        t0 = time.perf_counter()
        val = [tuple(x) for x in split["val"]]
        with progress.step(f"verify {mode.value}", len(val)) as step:
            verification = verify_accuracy(src, staged, val, size, prep, names,
                                           on_images=step.advance)
            step.done(f"{len(val)} validation images: keras "
                      f"{verification['keras_accuracy']:.4f}, tflite "
                      f"{verification['tflite_accuracy']:.4f}")
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
        if auto is not None and not auto["met"]:
            _auto_unmet(auto, gate, target, failures, verification)
    report["passed"] = not failures
    report["size_bytes"] = staged.stat().st_size
    report["timings"] = dict(timings, convert_s=convert_s)
    if failures:  # keep the file, marked as failed in its own metadata
        meta["verification"] = {"passed": False, "failures": failures}
        staging.drop(staged)
        staged = staging.write(target, write_metadata(raw, meta, names))
    extra = _auto_plot(cfg, auto, target, staging) if auto is not None else []
    sidecar = dict(meta, verification=report, file=target.name,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    sidecar_path = target.with_suffix(".json")
    staged_sidecar = staging.write(sidecar_path, json.dumps(sidecar, indent=2).encode())
    return report, failures, extra + [(staged_sidecar, sidecar_path), (staged, target)]


# --- accuracy-driven export (--auto) and calibration check (edgetl/autoquant.py) -----------------

def _val_batch(split: dict, size, prep: dict):
    """The run's whole validation split as one preprocessed batch and its labels."""
    val = [tuple(x) for x in split["val"]]
    return load_batch([p for p, _ in val], size, prep), np.array([label for _, label in val])


def _auto_convert(cfg, src, calib, split, size, prep, io):
    """--auto: the search of autoquant.search on the validation split; (raw, chosen, report)."""
    from edgetl.autoquant import search

    images, labels = _val_batch(split, size, prep)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if sys.stderr.isatty() \
        else None
    raw, chosen, report = search(src, calib, images, labels, io, float(cfg.max_drop),
                                 edgetpu=cfg.edgetpu, max_candidates=cfg.auto_max_candidates,
                                 log=log)
    return raw, chosen, report


def _auto_unmet(auto: dict, gate: str, target: Path, failures: list, verification: dict):
    """A budget --auto could not meet: a failure when the kept file fails the gate (exit 1),
    else a warning (an undecided gate, as without --auto)."""
    c = auto["candidates"][auto["chosen"]]
    text = (f"{target.name}: --auto tried {len(auto['candidates'])} candidate(s) (at most "
            f"{auto['max_candidates']}) and none met --max-drop {auto['max_drop']}; kept the "
            f"best, #{c['index']} {c['candidate']} (drop {c['drop_points']:.2f} points)")
    if auto["edgetpu"]:
        text += "; with --edgetpu only integer int8 candidates are allowed"
    if gate == "failed":
        failures.append(text)
    else:
        verification["warnings"].append(text)


def _auto_plot(cfg, auto: dict, target: Path, staging) -> list:
    """--plots: the Pareto PNG beside the model when matplotlib is installed; else a note (the
    candidates are in the sidecar JSON and the text table)."""
    if not getattr(cfg, "plots", False):
        return []
    from edgetl.autoquant import pareto_png

    png = pareto_png(auto)
    if png is None:
        auto["plot"] = ("no plot: matplotlib is not installed (pip install matplotlib); the "
                        "candidates are in the sidecar JSON under verification.auto")
        return []
    final = target.with_name(f"{target.stem}_pareto.png")
    auto["plot"] = f"Pareto plot: {final}"
    return [(staging.write(final, png), final)]


def _calibration_check(cfg, src, calib, calib_paths, split, size, prep, io) -> dict:
    """--check-calibration: autoquant.check_calibration with the calibration images' labels."""
    from edgetl.autoquant import check_calibration

    if calib is None or len(calib) < 2 * MIN_CALIBRATION:
        return {"skipped": f"{0 if calib is None else len(calib)} calibration images cannot be "
                           f"split into two halves of at least {MIN_CALIBRATION}",
                "stable": None}
    known = {p: label for p, label in split["train"]}
    labels = [known.get(p) for p in calib_paths] if len(calib_paths) == len(calib) else [
        None] * len(calib)
    images, y = _val_batch(split, size, prep)
    return check_calibration(src, calib, labels, images, y, io)


def edgetpu_problem(section: dict) -> dict | None:
    """Why an Edge TPU section is not a full mapping (None: it fully maps).

    Args:
        section: ``inspect.edgetpu_section``'s dict.

    Returns:
        ``{"text": ..., "hard": bool, "cpu_ops": [...]}``: ``hard`` when the model cannot be
        compiled at all (compiler error, a whole-model requirement unmet), else some ops fall
        back to the CPU; ``cpu_ops`` names them (``#index OP`` or ``OP xcount``) in graph order.
    """
    compiler = section.get("compiler") or {}
    if compiler.get("error"):
        return {"text": f"does not compile for the Edge TPU: {compiler['error']}", "hard": True,
                "cpu_ops": []}
    unmet = [r for r in section.get("requirements", [])
             if not r["ok"] and r["name"] != "only supported ops"]
    if unmet:
        return {"text": "cannot run on the Edge TPU: " + "; ".join(
            f"{r['name']}: {r['detail']}" for r in unmet), "hard": True, "cpu_ops": []}
    rows = compiler.get("rows") if compiler else None
    if rows is None:
        rows = section.get("ops", [])
    cpu = [r for r in rows if not r["maps"]]
    if not cpu:
        return None
    names = [f"#{r['index']} {r['op']}" if r.get("index") is not None
             else f"{r['op']} x{r['count']}" for r in cpu]
    count = sum(r.get("count", 1) for r in cpu)
    total = sum(r.get("count", 1) for r in rows)
    text = f"does not fully map to the Edge TPU: {count} of {total} ops would run on the CPU"
    first = section.get("first_unsupported")
    if first and not compiler:
        text += f" (from {first}; every op after it runs on the CPU too)"
    shown = ", ".join(names[:12]) + (f", ... (+{len(names) - 12} more)" if len(names) > 12 else "")
    return {"text": f"{text}: {shown}", "hard": False, "cpu_ops": names}


def _tensor_meta(t) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
            "scale": list(t.scale)[:1] if t.scale else None,
            "zero_point": list(t.zero_point)[:1] if t.zero_point else None}


# --- QAT runs: which float weights, and QAT int8 against PTQ int8 ----------------------------------

def float_weights(run: Path) -> str:
    """What the float modes (float32, float16, dynamic) of a QAT run convert, as one sentence
    for the report and sidecar.

    model.keras: the QAT-trained weights with the fake quantization removed. Measured on the
    real EfficientNet-Lite0 base (Fashion-MNIST, all 10,000 test images, two-phase with QAT in
    the fine-tune phase): 3.6 points (scope trained) and 2.4 points (scope all) above
    float_before_qat.keras, the model before the QAT phase, which has not had the fine-tune
    phase; and within 0.5 / 1.6 points of the QAT int8 file. (The 9-point gap of issue 13 came
    from tfmot's clipping initial ranges, which QAT range initialisation removed.)
    """
    from edgetl.train import FLOAT_BEFORE_QAT

    note = "model.keras: the QAT-trained weights with the fake quantization removed"
    if (run / FLOAT_BEFORE_QAT).is_file():
        note += (f" (not {FLOAT_BEFORE_QAT}, the model before the QAT phase: it misses that "
                 "phase's training; --compare-ptq quantizes it)")
    return note


def check_compare_ptq(run: Path, modes: tuple, verify: bool) -> None:
    """--compare-ptq's preconditions, checked before anything is read or written.

    Raises:
        EdgetlError: not a QAT run, no float model from before QAT, no --int8, or --no-verify.
    """
    from edgetl.train import FLOAT_BEFORE_QAT

    if Quantization.int8 not in modes:
        raise EdgetlError("--compare-ptq compares int8 files: add --int8")
    if not verify:
        raise EdgetlError("--compare-ptq measures both int8 files on the validation images: "
                          "drop --no-verify")
    if not (run / "qat.h5").is_file():
        raise EdgetlError(f"--compare-ptq: run '{run}' was not trained with --qat, so its int8 "
                          "file is already post-training quantized; drop --compare-ptq")
    if not (run / FLOAT_BEFORE_QAT).is_file():
        raise EdgetlError(f"--compare-ptq: run '{run}' has no {FLOAT_BEFORE_QAT} (QAT ran in "
                          "its first phase, or the run predates it), so there is no float model "
                          "to quantize after training; train with --strategy two-phase --qat")


def _tflite_top1(path: Path, items, size, prep: dict, batch: int = 32) -> tuple:
    """Top-1 of a .tflite through the device runner, and the true labels, in item order."""
    from edgetl.runner import Model

    model = Model(str(path), delegate="xnnpack")
    pred, truth = [], []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        x = load_batch([p for p, _ in chunk], size, prep)
        pred.append(np.asarray(model.predict(x)).reshape(len(chunk), -1).argmax(-1))
        truth.append(np.array([label for _, label in chunk]))
    return np.concatenate(pred), np.concatenate(truth)


def qat_against_ptq(qat_pred: np.ndarray, ptq_pred: np.ndarray, truth: np.ndarray,
                    qat_file: str, ptq_file: str) -> dict:
    """QAT int8 minus PTQ int8 on the same images, and which file to ship.

    The better one is named when the paired 95 % interval excludes 0; inside it the two are
    equal within noise and the higher point estimate is named (QAT on a tie: it is what the
    run was trained for), with ``clear`` False.

    Returns:
        ``paired_difference``'s fields (``a`` = QAT) plus ``qat_int8_accuracy``,
        ``ptq_int8_accuracy``, ``ship`` (file name), ``clear`` and ``why`` (a sentence).
    """
    d = paired_difference(qat_pred, ptq_pred, truth)
    lo, hi = d["ci95_points"]
    qat_acc, ptq_acc = float((qat_pred == truth).mean()), float((ptq_pred == truth).mean())
    figures = (f"QAT int8 {qat_acc:.4f} vs PTQ int8 {ptq_acc:.4f} on the same {d['images']} "
               f"validation images: {d['diff_points']:+.2f} points, 95 % interval "
               f"{lo:+.2f} to {hi:+.2f} ({d['a_only']} right only with QAT, {d['b_only']} only "
               "with PTQ)")
    clear = lo > 0 or hi < 0
    ship = ptq_file if (hi < 0 or (not clear and d["diff_points"] < 0)) else qat_file
    if clear:
        why = f"{figures}: ship {ship}"
    else:
        why = (f"{figures}: equal within noise; {ship} by the point estimate (verify on more "
               "images to decide)")
    return dict(d, qat_int8_accuracy=qat_acc, ptq_int8_accuracy=ptq_acc, qat_file=qat_file,
                ptq_file=ptq_file, ship=ship, clear=clear, why=why)


def _add_ptq_comparison(staging, pairs: list, qat_target: Path, ptq_target: Path,
                        qat_report: dict, ptq_report: dict, split: dict, run_cfg: dict) -> None:
    """Measures the staged QAT and PTQ int8 files on the validation split; the comparison goes
    into both reports and sidecars, with a warning on the QAT file when PTQ is clearly better."""
    from edgetl.preprocessing import input_shape
    from edgetl.train import FLOAT_BEFORE_QAT

    staged = {final: path for path, final in pairs}
    items = [tuple(x) for x in split["val"]]
    size, prep = input_shape(run_cfg), run_cfg["preprocessing"]
    qat_pred, truth = _tflite_top1(staged[qat_target], items, size, prep)
    ptq_pred, _ = _tflite_top1(staged[ptq_target], items, size, prep)
    c = qat_against_ptq(qat_pred, ptq_pred, truth, qat_target.name, ptq_target.name)
    qat_report["compare_ptq"] = c
    if c["clear"] and c["ship"] == ptq_target.name:
        qat_report.setdefault("warnings", []).append(
            f"QAT made int8 worse than post-training quantization of the float model before "
            f"QAT: {c['why']}")
    ptq_report["float_weights"] = (f"{FLOAT_BEFORE_QAT}: post-training int8 of the float model "
                                   "from before QAT, for --compare-ptq")
    ptq_report["compare_ptq"] = c
    _amend_sidecar(staging, pairs, qat_target, {"verification": qat_report})
    _amend_sidecar(staging, pairs, ptq_target, {"verification": ptq_report,
                                                "float_weights": ptq_report["float_weights"]})


def _amend_sidecar(staging, pairs: list, target: Path, fields: dict) -> None:
    """Rewrites the staged sidecar JSON of ``target`` with ``fields`` set (in ``pairs``)."""
    sidecar = target.with_suffix(".json")
    for i, (path, final) in enumerate(pairs):
        if final == sidecar:
            data = dict(json.loads(path.read_text()), **fields)
            staging.drop(path)
            pairs[i] = (staging.write(sidecar, json.dumps(data, indent=2).encode()), sidecar)
            return


def _qat_lines(r: dict) -> list[str]:
    """The report lines of a QAT run's extras: which float weights, QAT vs PTQ int8."""
    lines = []
    if r.get("float_weights"):
        lines.append(f"  float weights: {r['float_weights']}")
    c = r.get("compare_ptq")
    if c:
        lines.append(f"  QAT vs PTQ int8: {c['why']}")
    return lines


def source_run(run_cfg: dict) -> dict:
    """The run an export came from, for its metadata: backbone, data hash, training settings.

    A --base-model run names its base file and sha256 (recorded at training) instead of
    --weights, which such a run does not use.
    """
    train = run_cfg.get("train") or {}
    out = {"backbone": run_cfg.get("backbone"), "data_hash": run_cfg.get("data_hash"),
           "train": {k: train.get(k) for k in ("strategy", "epochs", "qat", "alpha", "weights")}}
    if train.get("base_model"):
        record = run_cfg.get("base_model")
        record = record if isinstance(record, dict) else {}
        sha = record.get("sha256")
        valid = isinstance(sha, str) and len(sha) == 64 and all(
            ch in "0123456789abcdef" for ch in sha)
        del out["train"]["weights"]
        out["train"]["base_model"] = {
            "file": Path(str(train["base_model"])).name,
            "sha256": sha if valid else None,
        }
        if not valid:
            out["train"]["base_model"]["note"] = ("sha256 not recorded (a run trained before "
                                                  "edgetl recorded it)")
    return out
