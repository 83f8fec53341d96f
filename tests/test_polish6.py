"""Session 6 polish: leftovers found by fresh-user trials (help metavars, bench throughput,
dev.py output, demo wording, symlink loops and special files as inputs, runner --json inside
--image, the resume/--unfreeze-from refusal)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from edgetl.cli import app


def _walk(cmd, path=()):
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _walk(sub, path + (name,))


def _edgetl(*args):
    result = CliRunner().invoke(app, list(args), terminal_width=80, prog_name="edgetl",
                                env={"COLUMNS": "80"})
    return result.exit_code, result.stdout, result.stderr


# 1. list arguments: "MODEL... <path>", not typer's "<list[Path]>"

@pytest.mark.parametrize("path,name", [(("bench",), "MODEL"), (("predict",), "IMAGE"),
                                       (("fleet", "bench"), "MODEL")])
def test_list_argument_help_is_readable(path, name):
    code, out, _ = _edgetl(*path, "--help")
    assert code == 0, out
    assert f"  {name}... <path>  " in out, out
    assert "list[" not in out


def test_no_help_shows_a_python_type():
    for path, _ in _walk(typer.main.get_command(app)):
        code, out, _ = _edgetl(*path, "--help")
        assert code == 0 and "list[" not in out and "Path]" not in out, (path, out)


# 2. throughput: images/s over the timed runs (batch * 1000 / mean ms), labelled "mean"

V1 = "mobilenet_v1_0.25_128_quant.tflite"


@pytest.fixture(scope="module")
def bench_rows():
    from conftest import coral
    from edgetl import bench as B

    return B.bench([coral(V1)], labels=coral("imagenet_labels.txt"), runs=5, warmup=1,
                   threads=1)


def test_bench_throughput_is_labelled_as_the_mean(bench_rows):
    from edgetl import bench as B

    row = bench_rows[0]
    assert row["throughput_ips"] == pytest.approx(1000.0 / row["mean_ms"])
    header = B.format_table(bench_rows).splitlines()[0]
    assert "mean img/s" in header and "p50 ms" in header
    assert "| images/s (mean) |" in B.format_markdown(bench_rows)
    assert B.to_json(bench_rows)["rows"][0]["mean_ms"] == row["mean_ms"]


def test_runner_text_says_where_throughput_comes_from(bench_rows):
    from edgetl import runner as r

    report = bench_rows[0]["report"]
    assert r.RUNNER_VERSION == "1"  # field meaning unchanged: the format stays 1
    line = next(ln for ln in r.format_report(report).splitlines() if "throughput" in ln)
    assert line.endswith(" images/s (from the mean latency)"), line


def test_fleet_throughput_column_and_rows_say_mean():
    from edgetl import fleet as f

    assert ("throughput_ips", "mean img/s", "images/s (mean)", "{:.1f}") in f.BENCH_COLUMNS
    host = f.Host(name="pi")
    report = {"latency_ms": {"p50": 1.0, "mean": 2.0}, "throughput_ips": 500.0}
    row = f._row(host, "m.tflite", {}, report, None)
    assert row["mean_ms"] == 2.0 and row["throughput_ips"] == 500.0
