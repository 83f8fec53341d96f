"""edgetl.bench: two real Coral models compared through the device runner, one process each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgetl import bench as B
from edgetl.errors import EdgetlError
from conftest import coral

V1 = "mobilenet_v1_0.25_128_quant.tflite"
V2 = "tf2_mobilenet_v2_1.0_224_ptq.tflite"
# photo -> the ImageNet class folder it belongs in (names as in imagenet_labels.txt)
PHOTOS = {"bird.bmp": "chickadee", "cat.bmp": "Egyptian cat", "grace_hopper.bmp": "military uniform"}



@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for photo, label in PHOTOS.items():
        (root / label).mkdir()
        shutil.copy(coral(photo), root / label / photo)
    return root


@pytest.fixture(scope="module")
def rows(photos):
    return B.bench(
        [coral(V1), coral(V2)],
        data=photos,
        labels=coral("imagenet_labels.txt"),
        runs=3,
        warmup=1,
        threads=1,
    )


def test_rows_one_per_model_in_order(rows):
    assert [r["name"] for r in rows] == [V1, V2]
    for r in rows:
        assert r["error"] is None
        # No edgetl metadata: inferred from the tensors (v1: TF1-era uint8 throughout; v2: int8
        # inside with uint8 I/O, as edgetl's default export).
        assert r["format"] == {V1: "uint8", V2: "int8 (uint8 I/O)"}[r["name"]]
        assert r["size_bytes"] == coral(r["name"]).stat().st_size
        assert r["size_mb"] == pytest.approx(r["size_bytes"] / 1e6)  # MB = 10^6 bytes
        for key in ("p50_ms", "p90_ms", "throughput_ips", "peak_rss_mb"):
            assert r[key] > 0, key
        assert r["p90_ms"] >= r["p50_ms"]
        assert r["report"]["runs"] == 3 and r["report"]["warmup"] == 1
        assert r["report"]["threads"] == 1


def test_accuracy_on_the_coral_photos(rows):
    # Both models are deterministic integer models: v1 0.25 takes Grace Hopper's uniform for an
    # academic gown; v2 gets all three.
    v1, v2 = rows
    assert v1["top1"] == pytest.approx(2 / 3)
    assert v2["top1"] == pytest.approx(1.0)
    assert v1["report"]["accuracy"]["evaluated"] == 3
    assert v1["report"]["labels"]["count"] == 1001


def test_ratio_columns_are_relative_to_the_first_model(rows):
    v1, v2 = rows
    assert v1["size_x"] == 1.0 and v1["speed_x"] == 1.0
    assert v2["size_x"] == pytest.approx(v2["size_bytes"] / v1["size_bytes"])
    assert v2["speed_x"] == pytest.approx(v1["p50_ms"] / v2["p50_ms"])


def test_each_model_runs_in_its_own_runner_process(rows, monkeypatch):
    # Peak RSS is a per-process figure: one fresh process of the device runner file per model.
    assert all(r["peak_rss_mb"] == r["report"]["memory"]["peak_rss_mb"] > 0 for r in rows)
    calls = []
    real_run = B.subprocess.run

    def spy(cmd, *args, **kwargs):
        calls.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(B.subprocess, "run", spy)
    B.bench([coral(V2), coral(V1)], runs=1, warmup=0)
    assert [c[:3] for c in calls] == [
        [B.sys.executable, str(B.runner_path()), str(coral(V2))],
        [B.sys.executable, str(B.runner_path()), str(coral(V1))],
    ]
    assert B.runner_path().name == "edgetl_runner.py"


def test_text_markdown_and_json_outputs(rows, tmp_path):
    table = B.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == [
        "model", "format", "size", "MB", "top-1", "left", "out", "p50", "ms", "p90", "ms", "mean",
        "img/s", "peak", "RSS", "MB", "size", "x", "speed", "x",
    ]
    assert lines[2].startswith(V1) and "66.67%" in lines[2]
    assert lines[3].startswith(V2) and "100.00%" in lines[3]
    # where it was measured, with the SIMD features that decide int8 vs float32 speed
    machine = rows[0]["report"]["machine"]
    assert lines[-1].startswith(f"measured on {machine['cpu']}, {machine['machine']} (")
    assert (" ".join(machine["simd"]) or "no int8-relevant SIMD") in lines[-1]
    md = B.format_markdown(rows)
    assert md.startswith(
        "| model | format | size (MB) | top-1 | left out | p50 (ms) | p90 (ms) | images/s (mean) "
        "| peak RSS (MB) "
        "| size × | speed × |\n|---|---|---:|"
    )
    assert f"| {V1} | uint8 | 0.53 | 66.67% |" in md
    assert md.rstrip().splitlines()[-1].startswith("Measured on ")
    out = B.write_json(rows, tmp_path / "bench.json")
    data = json.loads(out.read_text())
    assert data["columns"][:5] == ["name", "format", "size_mb", "top1", "left_out"]
    assert [r["name"] for r in data["rows"]] == [V1, V2]
    assert "report" not in data["rows"][0]
    assert data["reports"][V2]["accuracy"]["top1"] == 1.0
    assert B.write_markdown(rows, tmp_path / "bench.md").read_text() == md


def test_without_data_there_is_no_accuracy_column():
    rows = B.bench([coral(V1)], runs=2, warmup=0)
    assert rows[0]["top1"] is None
    assert "top-1" not in B.format_table(rows)
    assert "top-1" not in B.format_markdown(rows)


def test_a_model_the_runner_cannot_run_gets_an_error_row():
    rows = B.bench([coral(V1), coral("model_invoking_error.tflite")], runs=2, warmup=0)
    assert rows[0]["error"] is None
    bad = rows[1]
    assert bad["p50_ms"] is None and bad["report"] is None and bad["speed_x"] is None
    assert "fake-op-double" in bad["error"] and "\n" not in bad["error"]
    assert "error: " in B.format_table(rows) and "- error: " in B.format_markdown(rows)


def test_bad_arguments_fail_before_anything_runs(tmp_path):
    with pytest.raises(EdgetlError, match="no model to benchmark"):
        B.bench([])
    with pytest.raises(EdgetlError, match="model file not found"):
        B.bench([tmp_path / "missing.tflite"])
    with pytest.raises(EdgetlError, match="cat.bmp"):
        B.bench([coral("cat.bmp")])
    with pytest.raises(EdgetlError, match="runs must be at least 1"):
        B.bench([coral(V1)], runs=0)
    with pytest.raises(EdgetlError, match="unknown delegate 'gpu'"):
        B.bench([coral(V1)], delegate="gpu")
    with pytest.raises(EdgetlError, match="data folder not found"):
        B.bench([coral(V1)], data=tmp_path / "nope")
    with pytest.raises(EdgetlError, match="listed twice"):
        B.bench([coral(V1), coral(V1)])


def test_plots_need_matplotlib(rows, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(EdgetlError, match=r"pip install 'edgetl\[plots\]'"):
            B.plot(rows, tmp_path)
        return
    written = B.plot(rows, tmp_path / "plots")
    names = sorted(p.name for p in written)
    # The runner's report has every timed run (latency_ms.runs_ms): a histogram is drawn.
    assert rows[0]["report"]["latency_ms"]["runs_ms"]
    assert names == sorted(
        [
            "latency.png",
            "latency_hist.png",
            f"confusion_{Path(V1).stem}.png",
            f"confusion_{Path(V2).stem}.png",
        ]
    )
    assert all(p.stat().st_size > 1000 for p in written)


def test_edgetl_predict_classifies_photos_with_the_labels_in_the_model(tmp_path):
    from typer.testing import CliRunner

    from edgetl.cli import app

    cat, bird = coral("cat.bmp"), coral("bird.bmp")
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["predict", str(coral(V1)), str(cat), str(bird), "--top", "2",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    preds = json.loads(out.read_text())
    assert [p["top"][0]["label"] for p in preds] == ["Egyptian cat", "chickadee"]
    assert all(len(p["top"]) == 2 for p in preds)
    lines = result.stdout.splitlines()
    assert lines[0] == str(cat) and lines[1].endswith("  Egyptian cat")
    assert lines[3] == str(bird) and lines[4].endswith("  chickadee")

    result = CliRunner().invoke(app, ["predict", str(coral(V1)), str(tmp_path / "gone.png")])
    assert result.exit_code == 2 and "gone.png" in result.stderr
    assert "Traceback" not in result.output
