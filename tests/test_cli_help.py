"""Every command's help follows the same habits: -h and --help, defaults and choices shown,
examples, nothing cut off at 80 columns; `edgetl --version`. Walks ALL commands, so a new command or option
that breaks a habit fails here (the conventions are in edgetl/cli.py, above CONTEXT)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from enum import Enum

import pytest
import typer
from typer.testing import CliRunner

import edgetl
from conftest import ROOT
from edgetl.cli import app

COMMAND = typer.main.get_command(app)


def _walk(cmd, path=()):
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _walk(sub, path + (name,))


ALL = list(_walk(COMMAND))
IDS = [" ".join(p) or "edgetl" for p, _ in ALL]


def _help(path, flag="--help", width=80):
    result = CliRunner().invoke(app, [*path, flag], terminal_width=width, prog_name="edgetl",
                                env={"COLUMNS": str(width)})
    return result.exit_code, result.stdout


def _context(cmd, path):
    from typer._click.core import Context

    parent = Context(COMMAND, info_name="edgetl")
    return Context(cmd, info_name=path[-1] if path else "edgetl", parent=parent)


def _choices(param) -> list:
    """The values of an Enum-typed parameter (typer makes it a choice), else []."""
    kind = param.type_descriptor.annotation
    kind = next((k for k in getattr(kind, "__args__", ()) if k is not type(None)), kind)
    return [m.value for m in kind] if isinstance(kind, type) and issubclass(kind, Enum) else []


def _value_options(cmd):
    """Options that take a value: flags, -h/--help and --version excepted."""
    return [p for p in cmd.params if p.param_type_name == "option" and not p.is_flag
            and not getattr(p, "is_bool_flag", False) and p.name not in ("help", "version")]


def test_all_commands_are_walked():
    names = set(IDS)
    assert {"edgetl", "train", "export", "inspect", "bench", "predict", "bundle", "backbones",
            "sensitivity", "data", "data synth", "data idx", "fleet", "fleet bench",
            "fleet check", "fleet setup"} <= names


@pytest.mark.parametrize("path,cmd", ALL, ids=IDS)
def test_help_habits(path, cmd):
    code, text = _help(path)
    assert code == 0, text
    # -h is --help
    assert _help(path, "-h") == (0, text)
    lines = text.splitlines()
    # not cut off at 80 columns: no ellipsis, nothing wider, no truncated command summary
    assert "…" not in text
    assert all(len(line) <= 80 for line in lines), [ln for ln in lines if len(ln) > 80]
    assert not [ln for ln in lines if ln.rstrip().endswith("...")
                and not ln.startswith("Usage:")], text
    # usage names the arguments
    usage = lines[0]
    assert usage.startswith("Usage: edgetl" + "".join(f" {p}" for p in path)), usage
    for param in cmd.params:
        if param.param_type_name == "argument":
            assert param.metavar and param.metavar in usage, (param.name, usage)
    # examples: at least one line that runs this very command
    assert "Examples:" in text
    prefix = " ".join(("edgetl",) + path)
    examples = text[text.index("Examples:"):].splitlines()[1:]
    assert any(line.strip().startswith(prefix) for line in examples), examples
    # every option that takes a value shows its default (or that it is required) ...
    ctx = _context(cmd, path)
    for option in _value_options(cmd):
        record = option.get_help_record(ctx)
        assert record is not None, option.name
        assert "[default: " in record[1] or "[required]" in record[1], record
    # ... and every fixed set of values is listed
    flat = " ".join(text.split())
    for option in cmd.params:
        for choice in _choices(option):
            assert choice in flat, (option.name, choice)


# Free-text options whose values come from a fixed set: their choices are in the help too.
FIXED_SETS = {
    ("train", "backbone"): lambda: __import__("edgetl.backbones").backbones.REGISTRY,
    ("train", "weights"): lambda: ["imagenet", "none", "PATH"],
    ("train", "class_weights"): lambda: ["none", "auto"],
    ("train", "augment"): lambda: ["flip", "rotate", "zoom", "contrast", "none"],
    ("bench", "delegate"): lambda: __import__("edgetl.runner").runner.DELEGATES,
    ("data idx", "names"): lambda: ["fashion-mnist", "mnist", "FILE"],
}


@pytest.mark.parametrize("where,values", FIXED_SETS.items(), ids=[f"{c} --{o}" for c, o in
                                                                   FIXED_SETS])
def test_fixed_sets_of_strings_list_their_values(where, values):
    command, option = where
    path = tuple(command.split())
    cmd = dict(ALL)[path]
    param = next(p for p in cmd.params if p.name == option)
    opts, help_text = param.get_help_record(_context(cmd, path))
    shown = " ".join(f"{opts} {help_text}".split())
    for value in values():
        assert re.search(rf"(?<![\w-]){re.escape(value)}(?![\w-])", shown), (value, shown)


def test_enum_choices_cover_the_registries():
    """The enums typer lists are the library's own (DESIGN habit 3), all of them."""
    from edgetl.config import Distribute, Monitor, Pooling, Preset, QatRanges, Strategy

    code, text = _help(("train",), width=200)
    flat = " ".join(text.split())
    for enum in (Strategy, Monitor, Pooling, Preset, QatRanges, Distribute):
        assert "<" + "|".join(m.value for m in enum) + ">" in flat, enum


def test_version_prints_the_package_version():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert edgetl.__version__ == version
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"edgetl {version}\n"
    code, text = _help((), "-h")
    assert code == 0 and "--version" in text


def test_help_and_version_in_a_real_terminal_width_load_no_tensorflow():
    """The console path: 80 columns from the environment, and still no TensorFlow."""
    code = (
        "import json, sys\n"
        "from edgetl.cli import app\n"
        "out = {}\n"
        "for args in (['-h'], ['--version'], ['train', '-h'], ['fleet', 'bench', '-h']):\n"
        "    try:\n"
        "        app(args, prog_name='edgetl')\n"
        "    except SystemExit as e:\n"
        "        out[' '.join(args)] = e.code\n"
        "heavy = ('tensorflow', 'tf_keras', 'keras', 'tensorflow_model_optimization')\n"
        "print(json.dumps([out, sorted(m for m in sys.modules if m.split('.')[0] in heavy)]))\n"
    )
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    *printed, last = proc.stdout.splitlines()
    exits, heavy = json.loads(last)
    assert heavy == []
    assert set(exits.values()) == {0}, exits
    assert printed[0].startswith("Usage: edgetl [OPTIONS] COMMAND")
    assert f"edgetl {edgetl.__version__}" in printed
    assert max(len(line) for line in printed) <= 80


def test_readme_defaults_table_matches_the_cli():
    """README's **Defaults** table states `--flag value` pairs: each must be the CLI's default."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("**Defaults**"):].split("\n\n")[1]
    checked = 0
    for row in table.splitlines()[2:]:
        command = re.match(r"\| `([\w ]+)` \|", row)
        if not command or command.group(1) == "runner":
            continue
        path = tuple(command.group(1).split())
        cmd = dict(ALL)[path]
        # "... with `--weights none`" names a condition, not a default
        for flag, value in re.findall(r"(?<!with )`(--[\w-]+) ([^`\s]+)`", row):
            param = next((p for p in cmd.params if flag in p.opts), None)
            assert param is not None, (path, flag)
            default = getattr(param.default, "value", param.default)
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert float(value) == default, (path, flag, value, default)
            elif default is None:  # what None means, in words: the README names the value
                assert re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.-])",
                                 str(param.show_default)), (path, flag, value, param.show_default)
            else:
                assert value == str(default), (path, flag, value, default)
            checked += 1
    assert checked >= 25
