"""Fuzzing the runner's .tflite metadata reader on mutated real files.

The corpus is the real models in ../shared/realdata/coral (Google's own MobileNets carry a labels
file in an appended zip, the TFLite Support convention) plus the same models with edgetl's
metadata attached. Hypothesis mutates them, aiming most edits at the appended zip (local headers,
central directory, end record) and the rest at the flatbuffer header or anywhere: byte flips,
32-bit fields set to edge values, truncation, junk appended. Every mutated file goes through
``read_metadata``, ``read_labels``, ``strip_metadata``, ``read_model``, ``attach_metadata`` and
``edgetl.inspect.inspect_model``; the only exceptions allowed are ``RunnerError`` /
``EdgetlError``.

The fuzzer runs in a subprocess with a timeout, so a crash of the interpreter (a signal) or a
hang is a finding too, not a stuck test run. The budget is ``EDGETL_FUZZ_SECONDS`` (default 30
s); the run is seeded, so CI repeats the same inputs. A finding is written to
``<tmp>/finding.tflite`` with its traceback.

Run longer by hand::

    EDGETL_FUZZ_SECONDS=600 .venv/bin/python tests/test_fuzz_metadata.py --out /tmp/fuzz
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "coral"
BUDGET = float(os.environ.get("EDGETL_FUZZ_SECONDS", "30"))
PER_INPUT_DEADLINE_MS = 5000  # a slow input is a finding (quadratic parsing, a zip bomb...)
MODELS = ("mobilenet_v1_0.25_128_quant.tflite", "mobilenet_v1_0.25_128_quant_edgetpu.tflite",
          "model_invoking_error.tflite", "tf2_mobilenet_v2_1.0_224_ptq.tflite")


# --- the fuzzer (runs in its own process) ---------------------------------------------------------

def corpus(folder: Path) -> list[bytes]:
    """The real models, and each one again with edgetl metadata in place of its own zip."""
    from edgetl import runner as r

    labels = (folder / "imagenet_labels.txt").read_text().splitlines()
    files = [(folder / name).read_bytes() for name in MODELS]
    meta = {"name": "fuzz", "mode": "int8", "input": {"height": 128, "width": 128, "mean": [0.0],
                                                      "std": [1.0], "channel_order": "RGB"}}
    with_meta = [r.attach_metadata(f, meta, labels[: 1001]) for f in files[:3]]
    return files + with_meta


def check(data: bytes, scratch: Path) -> None:
    """Every reader on one input; anything but edgetl's own errors propagates."""
    from edgetl import EdgetlError
    from edgetl import runner as r
    from edgetl.inspect import inspect_model

    for fn in (r.read_metadata, r.read_labels, r.strip_metadata, r.read_model, r.check_tflite,
               lambda d: r.attach_metadata(d, {"name": "again"}, ["a", "b"])):
        try:
            fn(data)
        except r.RunnerError as e:
            assert str(e).strip(), "an empty error message"
    path = scratch / "input.tflite"
    path.write_bytes(data)
    try:
        inspect_model(path, compiler=False)
    except EdgetlError:
        pass


def fuzz(folder: Path, out: Path, budget: float) -> int:
    import struct

    from hypothesis import HealthCheck, seed, settings
    from hypothesis import strategies as st
    from hypothesis import given

    from edgetl import runner as r

    bases = corpus(folder)
    tails = [len(r.strip_metadata(b)) for b in bases]
    count = [0]
    last = [b""]

    @st.composite
    def mutated(draw):
        i = draw(st.integers(0, len(bases) - 1))
        data = bytearray(bases[i])
        n, zip_start = len(data), min(tails[i], len(data) - 1)
        where = st.one_of(
            st.integers(zip_start, n - 1),  # the appended zip, anywhere
            st.integers(max(zip_start, n - 120), n - 1),  # central directory and end record
            st.integers(0, 63),  # flatbuffer root offset, identifier, first tables
            st.integers(0, n - 1),
        )
        edits = draw(st.lists(st.tuples(where, st.sampled_from(["byte", "u16", "u32"]),
                                        st.integers(0, 2 ** 32 - 1)), min_size=1, max_size=6))
        for pos, kind, value in edits:
            if kind == "byte":
                data[pos] = value & 0xFF
            else:
                size = 2 if kind == "u16" else 4
                edge = draw(st.sampled_from([0, 1, value, n, n - zip_start, 2 ** (8 * size) - 1]))
                packed = struct.pack("<H" if size == 2 else "<I", edge % 2 ** (8 * size))
                data[pos: pos + size] = packed[: max(0, n - pos)]
        cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
        if cut is not None:
            del data[cut:]
        junk = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
        if junk is not None:
            data += junk
        return bytes(data)

    @settings(max_examples=150, deadline=PER_INPUT_DEADLINE_MS, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(mutated())
    def one(data):
        last[0] = data
        count[0] += 1
        check(data, out)

    out.mkdir(parents=True, exist_ok=True)
    started, batch = time.monotonic(), 0
    try:
        while time.monotonic() - started < budget:
            seed(1000 + batch)(one)()
            batch += 1
    except BaseException:
        (out / "finding.tflite").write_bytes(last[0])
        raise
    for base in bases:  # and the untouched files read cleanly
        check(base, out)
    print(f"fuzz: {count[0]} mutated inputs in {time.monotonic() - started:.0f} s "
          f"({batch} seeded batches), no finding")
    return 0


# --- the test ------------------------------------------------------------------------------------

def test_metadata_reader_survives_mutated_real_files(tmp_path):
    if not REALDATA.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{REALDATA} is missing in CI")
        pytest.skip(f"{REALDATA} not found (real third-party models)")
    pytest.importorskip("hypothesis")
    cmd = [sys.executable, __file__, "--out", str(tmp_path), "--budget", str(BUDGET)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET + 180,
                              env=dict(os.environ, PYTHONHASHSEED="0"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fuzzer hung (no result {BUDGET + 180:.0f} s into a {BUDGET:.0f} s "
                    f"budget); the input in flight: {tmp_path}")
    finding = tmp_path / "finding.tflite"
    assert proc.returncode >= 0, (f"the fuzzer process crashed (signal {-proc.returncode}); "
                                  f"stderr: {proc.stderr[-3000:]}")
    assert proc.returncode == 0, (f"finding saved as {finding}:\n{proc.stdout[-2000:]}\n"
                                  f"{proc.stderr[-4000:]}")
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("fuzz: ") and "no finding" in summary, proc.stdout
    assert int(summary.split()[1]) >= 500, summary  # the budget bought a real number of inputs
    print(summary)


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for a finding")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds to fuzz")
    parser.add_argument("--corpus", type=Path, default=REALDATA)
    args = parser.parse_args()
    sys.exit(fuzz(args.corpus, args.out, args.budget))
