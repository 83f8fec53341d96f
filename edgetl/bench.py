"""Compare models side by side: size, accuracy, latency, memory, measured by the device runner.

Each model runs in its own process of ``edgetl_runner.py`` (the very file shipped to devices, run
with this Python): peak RSS is a per-process figure, so only a fresh process per model gives an
honest one, and one model's allocator state cannot slow the next one down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError

# (key, text header, markdown header, format)
COLUMNS = (
    ("name", "model", "model", "{}"),
    ("format", "format", "format", "{}"),
    ("size_mb", "size MB", "size (MB)", "{:.2f}"),
    ("top1", "top-1", "top-1", "{:.2%}"),
    ("left_out", "left out", "left out", "{}"),
    ("p50_ms", "p50 ms", "p50 (ms)", "{:.3g}"),
    ("p90_ms", "p90 ms", "p90 (ms)", "{:.3g}"),
    # images/s over all timed runs (batch * 1000 / mean ms): the label says mean, as it is not
    # 1000 / p50 when a few runs are slow
    ("throughput_ips", "mean img/s", "images/s (mean)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "peak RSS (MB)", "{:.1f}"),
    ("size_x", "size x", "size ×", "{:.2f}x"),
    ("speed_x", "speed x", "speed ×", "{:.2f}x"),
)
MB = 1_000_000  # MB = 10^6 bytes, as the runner's RSS figures and every size edgetl prints


def _runner():
    from edgetl import runner

    return runner


def runner_path() -> Path:
    """The runner file benchmarks run (``edgetl/runner.py`` resolved to ``devices/``)."""
    return Path(_runner().__file__).resolve()


def parse_values(text: str | None, flag: str) -> list[float] | None:
    """``"127.5"`` or ``"123.7,116.3,103.5"`` -> 1 or 3 finite floats (None stays None).

    Raises:
        EdgetlError: not numbers, not 1 or 3 of them, or not finite.
    """
    if text is None:
        return None
    parts = [x for x in str(text).replace(",", " ").split() if x]
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise EdgetlError(f"{flag} {text!r} is not a number or 3 comma-separated numbers") from None
    if len(values) not in (1, 3) or not all(v == v and abs(v) != float("inf") for v in values):
        raise EdgetlError(f"{flag} {text!r} must be 1 or 3 finite numbers, e.g. 127.5 or "
                          "123.7,116.3,103.5")
    if flag == "--std" and any(v == 0 for v in values):
        raise EdgetlError(f"--std {text!r} contains 0; a standard deviation divides the pixels")
    if any(not 0 <= v <= 255 for v in values):
        raise EdgetlError(f"{flag} {text!r}: the values apply to pixels 0..255, give numbers "
                          "from 0 to 255")
    return values


def _check_labels_match(models: list, data, labels) -> None:
    """Refuse a data folder whose sub-folder names match none of a model's labels."""
    runner = _runner()
    root = Path(data)
    try:
        folders = sorted(e.name for e in root.iterdir() if e.is_dir() and
                         not e.name.startswith("."))
    except OSError:
        return  # the runner says why, per model
    if not folders:
        return
    for m in models:
        try:
            names = runner.read_labels_file(labels) if labels else runner.read_labels(m)
        except runner.RunnerError as e:
            raise EdgetlError(str(e)) from e
        if not names:
            continue  # the runner asks for --labels
        try:
            index_of, _ = runner._folder_label_indices(folders, list(names))
        except runner.RunnerError:
            continue  # an ambiguous folder name: the runner's own message, per model
        if not index_of:
            shown = ", ".join(repr(f) for f in folders[:5]) + (", ..." if len(folders) > 5 else "")
            first = ", ".join(repr(x) for x in names[:5]) + (", ..." if len(names) > 5 else "")
            source = f"labels file {labels}" if labels else f"the labels stored in {m}"
            raise EdgetlError(
                f"none of the sub-folders of {data} ({shown}) matches a label of {source} "
                f"({len(names)} labels: {first}); name each sub-folder after the label of its "
                "class (folders are not matched to outputs by position)"
            )


def _check_args(models: list, data, labels, runs: int, warmup: int, threads, delegate: str) -> None:
    runner = _runner()
    if not models:
        raise EdgetlError("no model to benchmark; pass one or more .tflite files")
    for m in models:
        p = Path(m)
        problem = runner.path_problem(p, "model file")  # missing, a symlink loop, a FIFO, ...
        if problem:
            raise EdgetlError(f"{problem}; pass the path of a .tflite file")
        try:  # regular files only: a FIFO or a device is refused, never read
            runner.check_tflite(p)
        except runner.RunnerError as e:
            raise EdgetlError(str(e)) from e
    names = [Path(m).resolve() for m in models]
    if len(set(names)) != len(names):
        raise EdgetlError("the same model is listed twice; list each model once")
    problem = data is not None and runner.path_problem(data, "data folder", "folder")
    if problem:
        raise EdgetlError(f"{problem}; give a folder with one sub-folder per class")
    problem = labels is not None and runner.path_problem(labels, "labels file")
    if problem:
        raise EdgetlError(f"{problem}; give a text file with one label a line")
    if labels is not None:
        try:  # a FIFO or a device is refused here, in one line, before any model runs
            runner.read_labels_file(labels)
        except runner.RunnerError as e:
            raise EdgetlError(str(e)) from e
    if not isinstance(runs, int) or runs < 1:
        raise EdgetlError(f"--runs must be at least 1, got {runs!r}")
    if runs > runner.MAX_RUNS:
        raise EdgetlError(f"--runs {runs} is too many: give at most {runner.MAX_RUNS}")
    if not isinstance(warmup, int) or warmup < 0:
        raise EdgetlError(f"--warmup must be 0 or more, got {warmup!r}")
    if warmup > runner.MAX_RUNS:
        raise EdgetlError(f"--warmup {warmup} is too many: give at most {runner.MAX_RUNS}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise EdgetlError(f"--threads must be at least 1, got {threads!r}")
    if threads is not None and threads > runner.MAX_THREADS:
        raise EdgetlError(f"--threads {threads} is too many: give at most {runner.MAX_THREADS}")
    if delegate not in runner.DELEGATES:
        choices = ", ".join(runner.DELEGATES)
        raise EdgetlError(f"unknown delegate {delegate!r}; use one of {choices}")
    if data is not None:
        _check_labels_match(models, data, labels)


def run_runner(
    model: str | os.PathLike,
    data: str | os.PathLike | None = None,
    runs: int = 200,
    warmup: int = 20,
    threads: int | None = None,
    delegate: str = "xnnpack",
    labels: str | os.PathLike | None = None,
    timeout: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    raw: bool = False,
    bgr: bool = False,
) -> dict:
    """Run the device runner on one model in a fresh process and return its JSON report.

    Args:
        model: the ``.tflite`` file.
        data: class-folder image set for accuracy (None: latency and memory only).
        runs: timed runs.
        warmup: untimed warm-up runs.
        threads: interpreter threads (None: the interpreter's default).
        delegate: ``"xnnpack"``, ``"edgetpu"`` or ``"none"``.
        labels: labels file for models without edgetl metadata.
        timeout: seconds before the run is stopped (None: no limit).
        mean, std: per-channel preprocessing (1 or 3 values) for models without metadata.
        raw: feed pixels unchanged in the input dtype.
        bgr: the model wants BGR channel order.

    Returns:
        The runner's report dict (see ``edgetl.runner.run``).

    Raises:
        EdgetlError: the runner refused the input or failed; the message is its one-line error.
    """
    with tempfile.TemporaryDirectory(prefix="edgetl-bench-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, str(runner_path()), str(model), "--json", str(out), "--quiet"]
        cmd += ["--runs", str(runs), "--warmup", str(warmup), "--delegate", delegate]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        if data is not None:
            cmd += ["--data", str(data)]
        if labels is not None:
            cmd += ["--labels", str(labels)]
        if mean:
            cmd += ["--mean", *map(repr, map(float, mean))]
        if std:
            cmd += ["--std", *map(repr, map(float, std))]
        if raw:
            cmd.append("--raw")
        if bgr:
            cmd.append("--bgr")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise EdgetlError(f"{model}: the runner did not finish within {timeout:.0f} s") from e
        if proc.returncode != 0 or not out.is_file():
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("error:")]
            why = errors[-1][len("error:") :].strip() if errors else (
                lines[-1] if lines else "no message"
            )
            if proc.returncode != 2:  # not the runner's own "bad input" exit: say how it ended
                why = f"runner exited with code {proc.returncode}: {why}"
            raise EdgetlError(why if str(model) in why else f"{model}: {why}")
        return json.loads(out.read_text(encoding="utf-8"))


def _format_of(model: Path, report: dict | None) -> str:
    mode = (report or {}).get("model", {}).get("mode")
    if mode:
        return str(mode)
    from edgetl.inspect import infer_mode

    return infer_mode(_runner().read_model(model))


def _row(model: Path, report: dict | None, error: str | None) -> dict:
    size = model.stat().st_size
    try:
        fmt = _format_of(model, report)
    except Exception:  # an unreadable model still gets its error row
        fmt = "?"
    row: dict[str, Any] = {
        "name": model.name,
        "path": str(model),
        "format": fmt,
        "size_bytes": size,
        "size_mb": size / MB,
        "top1": None,
        "top5": None,
        "p50_ms": None,
        "p90_ms": None,
        "mean_ms": None,
        "throughput_ips": None,
        "peak_rss_mb": None,
        "size_x": None,
        "speed_x": None,
        "interpreter": None,
        "delegate": None,
        "left_out": None,
        "left_out_files": None,
        "error": error,
        "report": report,
    }
    if report:
        acc = report.get("accuracy") or {}
        lat = report.get("latency_ms") or {}
        row.update(
            top1=acc.get("top1"),
            top5=acc.get("top5"),
            p50_ms=lat.get("p50"),
            p90_ms=lat.get("p90"),
            mean_ms=lat.get("mean"),
            throughput_ips=report.get("throughput_ips"),
            peak_rss_mb=(report.get("memory") or {}).get("peak_rss_mb"),
            interpreter=(report.get("interpreter") or {}).get("name"),
            delegate=report.get("delegate"),
        )
        if report.get("accuracy"):
            row.update(
                left_out=acc.get("left_out", acc.get("skipped")),
                left_out_files=[f.get("path") for f in acc.get("left_out_files") or []],
            )
    return row


def bench(
    models: list[str | os.PathLike],
    data: str | os.PathLike | None = None,
    runs: int = 200,
    warmup: int = 20,
    threads: int | None = None,
    delegate: str = "xnnpack",
    labels: str | os.PathLike | None = None,
    timeout: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    raw: bool = False,
    bgr: bool = False,
    progress=None,
) -> list[dict]:
    """Benchmark models one after another, each in a fresh runner process, into one table.

    All arguments are checked before anything runs. A model the runner cannot run (a custom op,
    an Edge TPU model without a Coral) does not stop the others: its row carries ``error``.

    Args:
        models: ``.tflite`` files; the first one is the baseline of the ratio columns.
        data: class-folder image set for top-1/top-5 accuracy (None: no accuracy columns).
        runs: timed runs per model.
        warmup: untimed warm-up runs per model.
        threads: interpreter threads (None: the interpreter's default).
        delegate: ``"xnnpack"``, ``"edgetpu"`` or ``"none"``.
        labels: labels file for models without edgetl metadata (needed with ``data`` then).
        timeout: seconds per model before its run is stopped (None: no limit).
        mean, std: per-channel preprocessing (1 or 3 values), passed to the runner for
            third-party models without metadata (they override a model's own metadata).
        raw: feed pixels unchanged in the input dtype (the runner's ``--raw``).
        bgr: the model wants BGR channel order (the runner's ``--bgr``).
        progress: an ``edgetl.progress.Progress``: one step per model (None: silent).

    Returns:
        One dict per model, in the given order: ``name`` (file name), ``path``, ``format``
        (metadata mode, else inferred from tensors and ops), ``size_bytes``, ``size_mb`` (MB = 10^6 bytes),
        ``top1``/``top5`` (None without data), ``p50_ms``, ``p90_ms``, ``mean_ms``,
        ``throughput_ips`` (images/s over the timed runs: batch * 1000 / mean_ms),
        ``peak_rss_mb`` (of that model's process), ``size_x`` (size / first model's size),
        ``speed_x`` (first model's p50 / this p50: 2.0 means twice as fast),
        ``interpreter``, ``delegate``, ``left_out`` (files of the data folder not evaluated:
        unreadable, not an image format, not a regular file; None without data),
        ``left_out_files`` (the first few of them), ``error`` (None, or the runner's one-line
        error) and
        ``report`` (the runner's full report, None on error).

    Raises:
        EdgetlError: a missing or non-TFLite model, a missing data folder or labels file, a data
            folder whose sub-folders match none of a model's labels, ``raw`` with ``mean``/``std``,
            or a bad number.
    """
    _check_args(models, data, labels, runs, warmup, threads, delegate)
    if raw and (mean or std):
        raise EdgetlError("--raw feeds pixels unchanged: leave out --mean/--std, or drop --raw")
    for flag, values in (("--mean", mean), ("--std", std)):
        if values is not None:
            parse_values(",".join(map(str, values)), flag)
    from edgetl.progress import SILENT

    progress = progress or SILENT
    rows = []
    for i, m in enumerate(models, 1):
        path = Path(m)
        with progress.step(f"model {i}/{len(models)} {path.name}") as step:
            try:
                report = run_runner(path, data, runs, warmup, threads, delegate, labels,
                                    timeout, mean=mean, std=std, raw=raw, bgr=bgr)
                rows.append(_row(path, report, None))
            except EdgetlError as e:
                rows.append(_row(path, None, str(e)))
            step.done(_step_detail(rows[-1]))
    base = rows[0]
    for r in rows:
        r["size_x"] = r["size_bytes"] / base["size_bytes"] if base["size_bytes"] else None
        if r["p50_ms"] and base["p50_ms"]:
            r["speed_x"] = base["p50_ms"] / r["p50_ms"]
    return rows


def _step_detail(row: dict) -> str:
    """One model's progress line: its p50 and top-1, or that it failed (the table says why)."""
    if row.get("error"):
        return "could not run (see the table)"
    top1 = f", top-1 {row['top1']:.4f}" if row.get("top1") is not None else ""
    return f"p50 {row['p50_ms']:.3g} ms{top1}"


def _columns(rows: list[dict]) -> list[tuple]:
    has_acc = any(r.get("top1") is not None or r.get("left_out") is not None for r in rows)
    return [c for c in COLUMNS if c[0] not in ("top1", "left_out") or has_acc]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _errors(rows: list[dict]) -> list[str]:
    return [r["error"] for r in rows if r.get("error")]


def machine_line(rows: list[dict]) -> str | None:
    """Where the rows were measured: CPU, its int8-relevant SIMD, cores, OS, interpreter."""
    report = next((r["report"] for r in rows if r.get("report")), None)
    if report is None:
        return None
    m = report["machine"]
    simd = " ".join(m.get("simd") or []) or "no int8-relevant SIMD"
    emulated = f", EMULATED ({m['emulated']}): timings are not device latency" \
        if m.get("emulated") else ""
    return (f"measured on {m['cpu']}, {m['machine']} ({simd}), {m['cores']} cores, {m['os']}; "
            f"{report['interpreter']['name']} {report['interpreter']['version']}{emulated}")


def format_table(rows: list[dict]) -> str:
    """Render bench rows as an aligned text table (errors listed under it).

    Args:
        rows: ``bench``'s result.

    Returns:
        The table; the top-1 column appears only when some row has an accuracy.
    """
    printable = _runner().printable
    cols = _columns(rows)
    cells = [[c[1] for c in cols]] + [[printable(_cell(r, c[0], c[3])) for c in cols]
                                      for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    out = []
    for n, line in enumerate(cells):
        text = "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))
        )
        out.append(text.rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out += [f"error: {e}" for e in _errors(rows)]
    for r in rows:
        if r.get("left_out"):
            shown = ", ".join(r.get("left_out_files") or [])
            out.append(f"{r['name']}: {r['left_out']} file(s) of the data folder left out "
                       f"(not evaluated){': ' + shown if shown else ''}"
                       f"{', ...' if r['left_out'] > len(r.get('left_out_files') or []) else ''}")
    if len(rows) > 1:
        out.append(f"size x and speed x are relative to {rows[0]['name']} (speed: p50 ratio)")
    where = machine_line(rows)
    if where:
        out.append(where)
    return "\n".join(printable(line) for line in out)


def format_markdown(rows: list[dict]) -> str:
    """Render bench rows as a GitHub-flavoured Markdown table.

    Args:
        rows: ``bench``'s result.

    Returns:
        Markdown text: the table, then any errors as a list.
    """
    cols = _columns(rows)
    printable = _runner().printable

    def esc(text: str) -> str:
        return printable(text).replace("|", "\\|")

    out = ["| " + " | ".join(c[2] for c in cols) + " |"]
    out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
    for r in rows:
        out.append("| " + " | ".join(esc(_cell(r, c[0], c[3])) for c in cols) + " |")
    errors = _errors(rows)
    if errors:
        out.append("")
        out += [f"- error: {esc(e)}" for e in errors]
    if len(rows) > 1:
        out.append("")
        out.append(f"Ratios are relative to `{rows[0]['name']}` (speed: p50 latency ratio).")
    left = [r for r in rows if r.get("left_out")]
    if left:
        out.append("")
        out += [f"- {esc(r['name'])}: {r['left_out']} file(s) of the data folder left out: "
                + esc(", ".join(r.get("left_out_files") or [])) for r in left]
    where = machine_line(rows)
    if where:
        out += ["", esc(where[0].upper() + where[1:]) + "."]
    return "\n".join(out) + "\n"


def to_json(rows: list[dict]) -> dict:
    """A JSON-able summary: the table rows, and each model's full runner report.

    Args:
        rows: ``bench``'s result.

    Returns:
        ``{"columns": [...], "rows": [row without "report"], "reports": {name: report}}``.
    """
    return {
        "columns": [c[0] for c in _columns(rows)],
        "rows": [{k: v for k, v in r.items() if k != "report"} for r in rows],
        "reports": {r["name"]: r["report"] for r in rows},
    }


def write_json(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write ``to_json(rows)`` to ``path`` (temporary name, then rename).

    Args:
        rows: ``bench``'s result.
        path: the output file; its folder must exist.

    Returns:
        The path written.

    Raises:
        EdgetlError: the folder does not exist.
    """
    return _atomic_write(Path(path), json.dumps(to_json(rows), indent=2) + "\n")


def write_markdown(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write ``format_markdown(rows)`` to ``path`` (temporary name, then rename).

    Args:
        rows: ``bench``'s result.
        path: the output file; its folder must exist.

    Returns:
        The path written.

    Raises:
        EdgetlError: the folder does not exist.
    """
    return _atomic_write(Path(path), format_markdown(rows))


def _atomic_write(path: Path, text: str) -> Path:
    if not path.parent.is_dir():
        raise EdgetlError(f"folder {path.parent} does not exist; create it or choose another path")
    _runner().refuse_special_output(str(path), "output")  # never rename over /dev/null
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _runner().shareable(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgetlError(
            "--plots needs matplotlib, which is not installed: pip install 'edgetl[plots]'"
        ) from None
    return plt


def plot(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Draw the comparison as PNG files.

    Writes ``latency.png`` (p50/p90 bars per model), ``latency_hist.png`` (every timed run, from
    the runner's ``latency_ms.runs_ms``; skipped for reports without it) and
    ``confusion_<model>.png`` for each model evaluated on data.

    Args:
        rows: ``bench``'s result.
        out_dir: folder for the images (created if missing).

    Returns:
        The files written.

    Raises:
        EdgetlError: matplotlib is not installed (``pip install 'edgetl[plots]'``).
    """
    plt = _matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ok = [r for r in rows if r.get("p50_ms") is not None]
    if ok:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(ok) + 2), 3.5))
        xs = range(len(ok))
        width = 0.38
        ax.bar([x - width / 2 for x in xs], [r["p50_ms"] for r in ok], width, label="p50")
        ax.bar([x + width / 2 for x in xs], [r["p90_ms"] for r in ok], width, label="p90")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["name"] for r in ok], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("latency (ms)")
        ax.set_title("Latency per image")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "latency.png", plt))
    raw = []
    for r in ok:
        runs_ms = ((r.get("report") or {}).get("latency_ms") or {}).get("runs_ms")
        if runs_ms:
            raw.append((r["name"], runs_ms))
    if raw:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, values in raw:
            ax.hist(values, bins=40, alpha=0.5, label=name)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("runs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / "latency_hist.png", plt))
    for r in rows:
        acc = (r.get("report") or {}).get("accuracy") or {}
        matrix = acc.get("confusion_matrix")
        if not matrix:
            continue
        rows_l, cols_l = acc["confusion_labels"], acc["confusion_columns"]
        side = min(12.0, max(5.0, 2.5 + 0.45 * len(cols_l)))
        fig, ax = plt.subplots(figsize=(side, side * 0.85))
        ax.imshow(matrix, cmap="Blues")
        top = max(max(line) for line in matrix) or 1
        ax.set_xticks(range(len(cols_l)))
        ax.set_xticklabels([c[:18] for c in cols_l], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows_l)))
        ax.set_yticklabels([c[:18] for c in rows_l], fontsize=7)
        if len(cols_l) <= 25:
            for i, line in enumerate(matrix):
                for j, v in enumerate(line):
                    color = "white" if v > top / 2 else "black"
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top1 = acc.get("top1")
        title = r["name"] + (f"\ntop-1 {top1:.1%}" if top1 is not None else "")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / f"confusion_{Path(r['name']).stem}.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
