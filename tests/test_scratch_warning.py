"""From scratch, --unfreeze-from warns that random layers stay frozen only when some do: from
the first layer every layer trains (the demo's old command got the warning for nothing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgetl.data import make_synth

WARNING = "keeps random layers frozen"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("scratch_warning") / "d"
    make_synth(root, classes=2, per_class=8, size=32, seed=2)
    return root


def _train(folder, out, layer):
    cmd = [sys.executable, "-m", "edgetl.cli", "train", "--data", str(folder), "--weights",
           "none", "--alpha", "0.35", "--input-size", "32", "--epochs", "1", "--batch-size",
           "8", "--augment", "none", "--strategy", "fine-tune", "--unfreeze-from", layer,
           "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CI="true"),
                          timeout=600)


@pytest.mark.parametrize("layer, warned", [("Conv1", False), ("block_16_project", True)])
def test_the_frozen_random_layers_warning_is_true(folder, tmp_path, layer, warned):
    p = _train(folder, tmp_path / "run", layer)
    assert p.returncode == 0, p.stderr
    assert (WARNING in p.stderr) == warned, p.stderr
