"""The device runner and the commands built on it (predict, bench, inspect, bundle) on hostile and
unusual inputs: names with control characters, FIFOs, metadata archives built to eat memory,
unwritable report paths, every image format Pillow decodes, single-output (sigmoid) binary
classifiers, detector-like models, greyscale and non-square inputs.

Every case asserts the message, the exit code and what is (not) left behind. The small models are
built once per session by TensorFlow in a subprocess (fixed weights: their answers are known).
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl import runner as r

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "devices" / "edgetl_runner.py"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
ESC_LABELS = ["\x1b[2J\x1b[Hcircle", "\x1b]0;PWNED-TITLE\x07cross", "square"]


def runner(*args, timeout=120, cwd=None):
    """The runner file as a device runs it: python3 edgetl_runner.py ..."""
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=cwd)


def edgetl(*args, timeout=180, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgetl.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def one_error_line(proc) -> str:
    """The single ``error: ...`` line of a refused command (no traceback, nothing else)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


BUILD = r'''
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np, tensorflow as tf, tf_keras as keras
L = keras.layers
out = sys.argv[1]

def save(model, name, int8=False, shape=None):
    c = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = lambda: ([np.random.RandomState(i).uniform(
            0, 255, (1,) + shape).astype("float32")] for i in range(8))
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        c.inference_input_type = c.inference_output_type = tf.int8
    open(os.path.join(out, name), "wb").write(c.convert())

def brightness(shape, units, activation):
    """GAP over raw 0..255 pixels -> Dense with fixed weights: bright images -> last unit."""
    i = keras.Input(shape, batch_size=1)
    x = L.GlobalAveragePooling2D()(i)
    d = L.Dense(units, activation=activation)
    y = d(x)
    c = shape[-1]
    if units == 1:
        d.set_weights([np.full((c, 1), 0.1 / c, "float32"), np.array([-12.75], "float32")])
    else:
        w = np.zeros((c, units), "float32"); w[:, -1] = 0.1 / c; w[:, 0] = -0.1 / c
        b = np.zeros(units, "float32"); b[0], b[-1] = 12.75, -12.75  # threshold: 127.5
        d.set_weights([w, b])
    return keras.Model(i, y)

save(brightness((16, 16, 3), 1, "sigmoid"), "sigmoid.tflite")
save(brightness((12, 20, 1), 2, "softmax"), "grey_12x20.tflite")
save(brightness((12, 20, 3), 2, "softmax"), "rgb_12x20.tflite")
save(brightness((16, 16, 3), 3, "softmax"), "int8.tflite", int8=True, shape=(16, 16, 3))
i = keras.Input((16, 16, 3), batch_size=1)
x = L.GlobalAveragePooling2D()(i)
save(keras.Model(i, [L.Dense(4)(x), L.Dense(2, activation="softmax")(x)]), "two_outputs.tflite")
save(keras.Model(i, L.Reshape((5, 4))(L.Dense(20)(x))), "boxes.tflite")
'''


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hardening-models")
    proc = subprocess.run([sys.executable, "-c", BUILD, str(out)], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def with_metadata(base: Path, target: Path, labels: list, labels_txt: bool = True,
                  extra: int = 0, extra_size: int = 0, h: int = 16, w: int = 16) -> Path:
    """``base`` with an edgetl metadata zip appended by hand (as a stranger could write it)."""
    buf = io.BytesIO()
    buf.write(r.strip_metadata(base.read_bytes()))
    meta = {"format": "edgetl", "format_version": 1, "labels": labels,
            "input": {"height": h, "width": w, "mean": [127.5] * 3, "std": [127.5] * 3}}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("edgetl.json", json.dumps(meta))
        if labels_txt:
            z.writestr("labels.txt", "\n".join(labels) + "\n")
        for k in range(extra):
            z.writestr("pad%03d.txt" % k, b"\0" * extra_size)
    target.write_bytes(buf.getvalue())
    return target


def png(path: Path, value: int, size=(24, 24), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(a).convert(mode).save(path, fmt)
    return path


def bright_dark(folder: Path, ext: str = "png", fmt=None, n: int = 2) -> Path:
    for k in range(n):
        png(folder / "dark" / f"d{k}.{ext}", 30 + k, fmt=fmt)
        png(folder / "bright" / f"b{k}.{ext}", 220 - k, fmt=fmt)
    return folder


# --- 1. no injection ---------------------------------------------------------------------------

def test_printable_escapes_controls_and_keeps_text():
    assert r.printable("caf\u00e9 \u732b ok") == "caf\u00e9 \u732b ok"
    assert r.printable("a\x1b[2Jb\nc\rd\x07\x9b\u202e") == "a\\x1b[2Jb\\x0ac\\x0dd\\x07\\x9b\\u202e"
    assert r.printable(r.printable("\x1b")) == "\\x1b"  # idempotent


def test_labels_from_a_model_never_reach_the_terminal_raw(models, tmp_path):
    esc = with_metadata(models / "int8.tflite", tmp_path / "esc.tflite", ESC_LABELS)
    forged = with_metadata(models / "int8.tflite", tmp_path / "nl.tflite",
                           ["cat\n  0.9999  FORGED-LINE", "dog", "bird"], labels_txt=False)
    img = png(tmp_path / "img.png", 128)
    data = tmp_path / "data"
    for label in ESC_LABELS:  # folder names must match the (raw) labels
        png(data / label / "a.png", 128)
    outputs = []
    for proc in (runner(esc, "--image", img, "--runs", "1", "--warmup", "0"),
                 runner(esc, "--data", data, "--runs", "1", "--warmup", "0"),
                 edgetl("predict", esc, img), edgetl("inspect", esc, "--no-compiler"),
                 edgetl("bench", esc, "--data", data, "--runs", "1", "--warmup", "0"),
                 runner(forged, "--image", img, "--runs", "1", "--warmup", "0"),
                 edgetl("predict", forged, img)):
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    for text in outputs:
        assert "\x1b" not in text and "\x07" not in text
        assert not any(line.startswith("  0.9999  FORGED") for line in text.splitlines())
    assert "\\x1b]0;PWNED-TITLE\\x07cross" in outputs[3]  # inspect: escaped, still readable
    assert "cat\\x0a  0.9999  FORGED-LINE" in outputs[5]
    # JSON keeps the labels verbatim
    out = tmp_path / "p.json"
    assert edgetl("predict", esc, img, "--json", out).returncode == 0
    got = {t["label"] for t in json.loads(out.read_text())[0]["top"]}
    assert got == set(ESC_LABELS)


def test_bench_table_escapes_a_model_file_name(models, tmp_path):
    name = tmp_path / "m\x1b]0;T\x07.tflite"
    name.write_bytes((models / "int8.tflite").read_bytes())
    md = tmp_path / "t.md"
    proc = edgetl("bench", name, "--runs", "1", "--warmup", "0", "--markdown", md)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "m\\x1b]0;T\\x07.tflite" in proc.stdout
    assert "\x1b" not in md.read_text()


@pytest.mark.parametrize("where", ["model", "out"])
def test_bundle_refuses_control_characters_in_names(models, tmp_path, where):
    model = tmp_path / ("cat\ntouch PWNED\n#.tflite" if where == "model" else "m.tflite")
    model.write_bytes((models / "int8.tflite").read_bytes())
    out = tmp_path / ("pi.tar.gz" if where == "model" else "pi\x1b[2J.tar.gz")
    proc = edgetl("bundle", model, "--out", out, cwd=tmp_path)
    line = one_error_line(proc)
    assert "control characters" in line and "rename" in line
    assert "\n" not in line and "\x1b" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]  # nothing written


def test_bundle_of_a_plain_name_still_quotes_it(models, tmp_path):
    model = tmp_path / "my model $(x).tflite"
    model.write_bytes((models / "int8.tflite").read_bytes())
    proc = edgetl("bundle", model, "--out", tmp_path / "b", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_sh = (tmp_path / "b" / "run.sh").read_text()
    assert "\"$HERE/\"'my model $(x).tflite' \"$@\"" in run_sh
    assert len(run_sh.splitlines()[1].split("\n")) == 1


# --- 3. only regular files -----------------------------------------------------------------------

@pytest.fixture()
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    return make


def test_fifos_are_skipped_and_listed_never_opened(models, tmp_path, fifo):
    data = bright_dark(tmp_path / "data")
    fifo(data / "dark" / "x.jpg")
    labels = tmp_path / "labels.txt"
    labels.write_text("dark\nbright\n")
    report = tmp_path / "r.json"
    proc = runner(models / "sigmoid.tflite", "--data", data, "--labels", labels, "--runs", "1",
                  "--warmup", "0", "--json", report, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "x.jpg is a named pipe (FIFO), not a regular file" in proc.stdout
    acc = json.loads(report.read_text())["accuracy"]
    assert acc["evaluated"] == 4 and acc["left_out"] == 1 and acc["top1"] == 1.0
    assert acc["left_out_files"][0]["path"].endswith("x.jpg")
    # predict: the FIFO beside a real image is skipped and listed, exit 0
    proc = edgetl("predict", models / "sigmoid.tflite", data / "dark" / "x.jpg",
                  data / "bright" / "b0.png", "--labels", labels, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "skipped: " in proc.stdout and "named pipe" in proc.stdout and "bright" in proc.stdout
    assert "1 of 2 file(s) skipped" in proc.stderr
    # ... alone, it is one line, exit 2
    line = one_error_line(edgetl("predict", models / "sigmoid.tflite", data / "dark" / "x.jpg",
                                 "--labels", labels, timeout=60))
    assert "x.jpg is a named pipe (FIFO)" in line


@pytest.mark.parametrize("what", ["model", "labels", "inspect", "bench labels", "bundle"])
def test_a_fifo_as_the_model_or_labels_file_is_refused_in_one_line(models, tmp_path, fifo, what):
    pipe = fifo(tmp_path / "pipe.tflite")
    good = models / "sigmoid.tflite"
    proc = {
        "model": lambda: runner(pipe, "--runs", "1", timeout=60),
        "labels": lambda: runner(good, "--labels", pipe, "--runs", "1", timeout=60),
        "inspect": lambda: edgetl("inspect", pipe, timeout=60),
        "bench labels": lambda: edgetl("bench", good, "--labels", pipe, "--runs", "1",
                                       timeout=60),
        "bundle": lambda: edgetl("bundle", pipe, "--out", tmp_path / "b", timeout=60),
    }[what]()
    line = one_error_line(proc)
    assert "pipe.tflite is a named pipe (FIFO), not a regular file" in line
    assert not (tmp_path / "b").exists()


# --- 4. bounded memory on hostile metadata -------------------------------------------------------

def test_metadata_archive_has_member_and_total_caps(models, tmp_path):
    many = with_metadata(models / "int8.tflite", tmp_path / "many.tflite", ["a", "b", "c"],
                         extra=80, extra_size=10)
    big = with_metadata(models / "int8.tflite", tmp_path / "big.tflite", ["a", "b", "c"],
                        extra=40, extra_size=16 * 1024 * 1024 - 16)
    assert big.stat().st_size < 2_000_000  # deflate: 640 MB of zeros in under 2 MB
    line = one_error_line(runner(many, "--runs", "1"))
    assert "82 members, more than the 64" in line and "re-export" in line
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from edgetl import runner as r
        try:
            r.Model({str(big)!r})
        except r.RunnerError as e:
            print(e)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec from the parent
        # (a pytest worker that trained models before this test)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print(int(hwm.split()[1]) // 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=ENV)
    message, peak_mb = proc.stdout.strip().splitlines()
    assert "more than the 32 MB cap" in message, proc.stdout
    assert int(peak_mb) < 300, f"peak RSS {peak_mb} MB for a {big.stat().st_size} byte file"
    proc = edgetl("inspect", big, "--no-compiler")  # inspect still shows the model itself
    assert proc.returncode == 0, proc.stderr
    assert "metadata   unreadable:" in proc.stdout and "32 MB cap" in proc.stdout


def test_metadata_archive_is_read_once_per_model_load(models, tmp_path, monkeypatch):
    model = with_metadata(models / "int8.tflite", tmp_path / "m.tflite", ["a", "b", "c"])
    calls = []
    real = r._read_zip_members
    monkeypatch.setattr(r, "_read_zip_members", lambda *a: calls.append(1) or real(*a))
    m = r.Model(model)
    assert m.labels == ["a", "b", "c"] and m.metadata["labels"] == ["a", "b", "c"]
    assert len(calls) == 1


# --- 5. --json where it cannot be written --------------------------------------------------------

@pytest.fixture()
def read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],
                          capture_output=True).returncode != 0:
            pytest.skip("root without permission to mount a read-only tmpfs")
        yield ro
        subprocess.run(["umount", str(ro)], capture_output=True)
    else:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)


def test_json_to_a_read_only_folder_is_refused_before_the_benchmark(models, read_only_dir):
    for proc in (runner(models / "int8.tflite", "--runs", "2", "--warmup", "0", "--json",
                        read_only_dir / "report.json"),
                 edgetl("predict", models / "int8.tflite", RUNNER.parent / "coral" / "x.jpg",
                        "--json", read_only_dir / "p.json"),
                 edgetl("bench", models / "int8.tflite", "--runs", "1", "--json",
                        read_only_dir / "b.json")):
        line = one_error_line(proc)
        assert line.startswith("error: cannot write --json ") and str(read_only_dir) in line
        assert proc.stdout == ""  # refused before anything ran or printed
    assert list(read_only_dir.iterdir()) == []


def test_json_path_that_is_a_folder(models, tmp_path):
    line = one_error_line(runner(models / "int8.tflite", "--runs", "1", "--json", tmp_path))
    assert "it is a folder" in line
    assert list(tmp_path.iterdir()) == []


# --- 6. every image format Pillow decodes --------------------------------------------------------

FORMATS = [("jpg", "JPEG"), ("webp", "WEBP"), ("tif", "TIFF"), ("png", "PNG"), ("bmp", "BMP"),
           ("gif", "GIF")]


def test_every_pillow_format_is_evaluated_and_left_out_files_are_named(models, tmp_path):
    data = tmp_path / "data"
    for ext, fmt in FORMATS:
        png(data / "dark" / f"d.{ext}", 30, fmt=fmt)
        png(data / "bright" / f"b.{ext}", 220, fmt=fmt)
    (data / "dark" / "notes.txt").write_text("not an image")
    (data / "bright" / "broken.webp").write_bytes(b"RIFF0000WEBPjunk")
    labels = tmp_path / "labels.txt"
    labels.write_text("dark\nbright\n")
    out = tmp_path / "r.json"
    proc = runner(models / "sigmoid.tflite", "--data", data, "--labels", labels, "--runs", "1",
                  "--warmup", "0", "--json", out)
    assert proc.returncode == 0, proc.stderr
    acc = json.loads(out.read_text())["accuracy"]
    assert (acc["evaluated"], acc["top1"], acc["left_out"]) == (12, 1.0, 2)
    assert {Path(f["path"]).name for f in acc["left_out_files"]} == {"notes.txt", "broken.webp"}
    assert "12 evaluated, 2 left out" in proc.stdout
    assert "notes.txt: not an image file (.txt is not a format Pillow decodes)" in proc.stdout
    assert "broken.webp" in proc.stdout
    bj = tmp_path / "b.json"
    proc = edgetl("bench", models / "sigmoid.tflite", "--labels", labels, "--data", data,
                  "--runs", "1", "--warmup", "0", "--json", bj)
    assert proc.returncode == 0, proc.stderr
    header, _, row = proc.stdout.splitlines()[:3]
    assert "left out" in header and "100.00%" in row and row.split()[4] == "2"
    assert "2 file(s) of the data folder left out" in proc.stdout
    assert json.loads(bj.read_text())["rows"][0]["left_out"] == 2
    # predict reads the same formats, from a folder one level deep
    proc = edgetl("predict", models / "sigmoid.tflite", data / "bright", "--labels", labels)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bright") >= 6 and "broken.webp\n  skipped: " in proc.stdout


def test_image_extensions_come_from_pillow():
    exts = r.image_extensions()
    for ext in (".webp", ".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp", ".gif"):
        assert ext in exts
    assert ".eps" not in exts and ".pdf" not in exts  # Ghostscript never runs on a user file


# --- 7. single-output sigmoid classifiers, and models that are not classifiers --------------------

def test_sigmoid_binary_classifier_in_runner_bench_and_predict(models, tmp_path):
    model = models / "sigmoid.tflite"
    data = bright_dark(tmp_path / "data")
    labels = tmp_path / "labels.txt"
    labels.write_text("dark\nbright\n")
    out = tmp_path / "r.json"
    proc = runner(model, "--data", data, "--labels", labels, "--runs", "1", "--warmup", "0",
                  "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "single-output (sigmoid) binary classifier: p >= 0.5 -> bright" in proc.stdout
    acc = json.loads(out.read_text())["accuracy"]
    assert acc["top1"] == 1.0 and acc["confusion_matrix"] == [[2, 0], [0, 2]]
    proc = edgetl("predict", model, data / "dark" / "d0.png", data / "bright" / "b0.png",
                  "--labels", labels, "--top", "5")
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.split(str(data / "bright" / "b0.png"))
    assert blocks[0].splitlines()[1].split()[1] == "dark"  # best first, both labels shown
    assert [ln.split()[1] for ln in blocks[1].splitlines()[1:3]] == ["bright", "dark"]
    proc = edgetl("bench", model, "--labels", labels, "--data", data, "--runs", "1",
                  "--warmup", "0")
    assert proc.returncode == 0 and "100.00%" in proc.stdout, proc.stderr
    one = tmp_path / "one.txt"
    one.write_text("bright\n")
    line = one_error_line(runner(model, "--labels", one, "--runs", "1"))
    assert "single (sigmoid) output: give two labels" in line


@pytest.mark.parametrize("name, needle", [("two_outputs.tflite", "2 outputs"),
                                          ("boxes.tflite", "output has shape [1, 5, 4]")])
def test_detector_like_models_are_not_classifiers(models, name, needle):
    line = one_error_line(runner(models / name, "--runs", "1"))
    assert "is not a classifier" in line and needle in line


# --- 8. bench passes preprocessing through; folders matched by name ------------------------------

def test_bench_passes_mean_std_bgr_to_the_runner(models, tmp_path):
    out = tmp_path / "b.json"
    proc = edgetl("bench", models / "sigmoid.tflite", "--runs", "1", "--warmup", "0",
                  "--mean", "1,2,3", "--std", "2", "--bgr", "--json", out)
    assert proc.returncode == 0, proc.stderr
    prep = json.loads(out.read_text())["reports"]["sigmoid.tflite"]["preprocessing"]
    assert (prep["mean"], prep["std"], prep["channel_order"]) == ([1.0, 2.0, 3.0], [2.0], "BGR")
    proc = edgetl("bench", models / "sigmoid.tflite", "--runs", "1", "--raw", "--json", out)
    prep = json.loads(out.read_text())["reports"]["sigmoid.tflite"]["preprocessing"]
    assert proc.returncode == 0 and prep["source"] == "raw pixels (--raw)"
    for args, needle in ((["--raw", "--mean", "1"], "--raw feeds pixels unchanged"),
                         (["--mean", "nan"], "--mean 'nan' must be 1 or 3 finite numbers"),
                         (["--std", "1,0,1"], "--std '1,0,1' contains 0"),
                         (["--mean", "1,2"], "must be 1 or 3")):
        line = one_error_line(edgetl("bench", models / "sigmoid.tflite", "--runs", "1", *args))
        assert needle in line


def test_bench_refuses_folders_that_match_no_label(models, tmp_path):
    data = tmp_path / "data"
    png(data / "0" / "a.png", 30)
    png(data / "1" / "b.png", 220)
    labels = tmp_path / "labels.txt"
    labels.write_text("dark\nbright\n")
    out = tmp_path / "b.json"
    line = one_error_line(edgetl("bench", models / "sigmoid.tflite", "--labels", labels,
                                 "--data", data, "--runs", "1", "--json", out))
    assert "none of the sub-folders" in line and "'0', '1'" in line and "'dark'" in line
    assert not out.exists()
    line = one_error_line(runner(models / "sigmoid.tflite", "--labels", labels, "--data", data))
    assert "none of the sub-folders" in line


def test_predict_reads_a_folder_one_level_deep_and_lists_what_it_skips(models, tmp_path):
    folder = tmp_path / "photos"
    png(folder / "a.png", 30)
    png(folder / "b.jpg", 220, fmt="JPEG")
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    png(folder / "deeper" / "d.png", 30)
    labels = tmp_path / "labels.txt"
    labels.write_text("dark\nbright\n")
    out = tmp_path / "p.json"
    proc = edgetl("predict", models / "sigmoid.tflite", folder, "--labels", labels, "--json", out)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert [Path(p["path"]).name for p in got] == ["a.png", "b.jpg", "c.png", "deeper"]
    assert [p["error"] is None for p in got] == [True, True, False, False]
    assert got[0]["top"][0]["label"] == "dark" and got[1]["top"][0]["label"] == "bright"
    assert "cannot read image" in got[2]["error"] and "one level deep" in got[3]["error"]
    assert "2 of 4 file(s) skipped" in proc.stderr


# --- 9. greyscale and non-square inputs ----------------------------------------------------------

def test_load_image_resizes_to_width_by_height_and_converts_channels(tmp_path):
    a = np.zeros((24, 40, 3), np.uint8)  # H 24, W 40: left half white
    a[:, :20] = 255
    Image.fromarray(a).save(tmp_path / "half.png")
    grey = r.load_image(tmp_path / "half.png", (12, 20), channels=1)
    assert grey.shape == (12, 20, 1) and grey[:, :9].min() == 255 and grey[:, 11:].max() == 0
    rgb = r.load_image(tmp_path / "half.png", (12, 20))
    assert rgb.shape == (12, 20, 3)
    Image.fromarray(a[:, :, 0]).save(tmp_path / "grey.png")  # a grey file into an RGB model
    assert r.load_image(tmp_path / "grey.png", (12, 20)).shape == (12, 20, 3)
    x = r.preprocess(grey, {"mean": [127.5] * 3, "std": [127.5] * 3})
    assert x.shape == (12, 20, 1) and x.max() == 1.0
    with pytest.raises(r.RunnerError, match="1 channel"):
        r.preprocess(grey, {"mean": [1.0, 2.0, 3.0], "std": [1.0]})


@pytest.mark.parametrize("name", ["grey_12x20.tflite", "rgb_12x20.tflite"])
def test_grey_and_non_square_models_classify_grey_and_colour_images(models, tmp_path, name):
    data = tmp_path / "data"
    png(data / "dark" / "grey.png", 30, size=(40, 24), mode="L")
    png(data / "dark" / "colour.jpg", 30, size=(33, 50), fmt="JPEG")
    png(data / "bright" / "grey.png", 220, size=(40, 24), mode="L")
    png(data / "bright" / "colour.webp", 220, size=(50, 33), fmt="WEBP")
    labels = tmp_path / "labels.txt"
    labels.write_text("dark\nbright\n")
    out = tmp_path / "r.json"
    proc = runner(models / name, "--data", data, "--labels", labels, "--runs", "1", "--warmup",
                  "0", "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["input"]["shape"] == [1, 12, 20, 1 if name.startswith("grey") else 3]
    assert report["accuracy"]["top1"] == 1.0 and report["accuracy"]["evaluated"] == 4
    assert len(report["preprocessing"]["mean"]) == (1 if name.startswith("grey") else 3)
