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
