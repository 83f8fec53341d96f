"""Hidden variants of the known failure kinds (session 5 hunt) that the catalogue rows in
tests/test_bad_inputs.py do not cover: what a command prints when it accepts the input."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from edgetl import runner as r

CORAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "coral"


def _coral(name: str) -> Path:
    path = CORAL / name
    if not path.is_file():
        pytest.skip(f"real third-party data not available: {path}")
    return path


def _main(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = r.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_runner_image_report_prints_one_prediction_a_line(tmp_path):
    """The text report escaped the whole predictions block: its newlines came out as \\x0a."""
    model = _coral("mobilenet_v1_0.25_128_quant.tflite")
    cat = _coral("cat.bmp")
    evil = tmp_path / "x\x1b]0;PWN\x07\nFORGED.bmp"
    evil.write_bytes(cat.read_bytes())
    code, out, err = _main(model, "--labels", _coral("imagenet_labels.txt"), "--image", cat,
                           evil, "--top", "2")
    assert code == 0, err
    lines = out.splitlines()
    i = lines.index(str(cat))  # the path alone on its line, then one line per label
    assert lines[i + 1].startswith("    0.") and lines[i + 2].startswith("    0.")
    assert lines[i + 3] == str(tmp_path / "x\\x1b]0;PWN\\x07\\x0aFORGED.bmp")
    assert "\\x0a    0." not in out and "\x1b" not in out
    assert not any(line.startswith("FORGED") for line in lines)


def test_runner_flag_ranges_leave_metadata_alone():
    """--mean/--std flags are on pixels 0..255; the limits do not apply to 127.5 presets."""
    model = _coral("mobilenet_v1_0.25_128_quant.tflite")
    code, _, err = _main(model, "--runs", "1", "--warmup", "0", "--mean", "127.5",
                         "--std", "255", "--quiet")
    assert code == 0, err
    code, _, err = _main(model, "--runs", "1", "--mean", "300", "--quiet")
    assert code == 2 and err.startswith("error: --mean 300: the values apply to pixels 0..255")


def test_check_outputs_paths(tmp_path):
    (tmp_path / "m.tflite").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    r.check_outputs([(tmp_path / "r.json", "--json"), (None, "--markdown")],
                    [tmp_path / "m.tflite"], [(tmp_path / "data", "--data")])
    r.check_outputs([(tmp_path / "data2.json", "--json")], [], [(tmp_path / "data", "--data")])
    with pytest.raises(r.RunnerError, match="it is an input of this command"):
        r.check_outputs([(tmp_path / "sub" / ".." / "m.tflite", "--json")],
                        [tmp_path / "m.tflite"])
    with pytest.raises(r.RunnerError, match="--json and --markdown name the same file"):
        r.check_outputs([(tmp_path / "a", "--json"), (tmp_path / "." / "a", "--markdown")])
    with pytest.raises(r.RunnerError, match="inside the --data folder"):
        r.check_outputs([(tmp_path / "data" / "c" / "r.json", "--json")], [],
                        [(tmp_path / "data", "--data")])


def test_head_parse_refuses_non_finite_and_huge():
    from edgetl.errors import EdgetlError
    from edgetl.train import MAX_HEAD_UNITS, parse_head

    assert parse_head(f"dense:{MAX_HEAD_UNITS}") == [("dense", MAX_HEAD_UNITS)]
    for spec in ("conv:inf", "dense:nan", "dense:1e9", f"dense:{MAX_HEAD_UNITS + 1}"):
        with pytest.raises(EdgetlError, match="needs a whole number from 1 to 65536"):
            parse_head(spec)
