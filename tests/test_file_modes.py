"""Files edgetl writes through a temporary name get the mode a plain open() gives (0666 minus the
umask), not mkstemp's 0600: exported models and reports are read by other users."""

import os
import stat

import pytest

from edgetl import bench
from edgetl import runner
from edgetl.export import _Staging


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_staged_export_files_bench_and_runner_reports_are_0644(tmp_path, umask_022):
    staging = _Staging(tmp_path)
    staged = staging.write(tmp_path / "m_int8.tflite", b"TFL3 model bytes")
    assert _mode(staged) == 0o644
    staging.discard()
    assert _mode(bench._atomic_write(tmp_path / "b.md", "| table |\n")) == 0o644  # --json too
    runner.write_json(str(tmp_path / "r.json"), {"ok": True})
    assert _mode(tmp_path / "r.json") == 0o644


def test_a_stricter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        runner.write_json(str(tmp_path / "r.json"), {"ok": True})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "r.json") == 0o600
