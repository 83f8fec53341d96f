"""Fuzzing the .tflite reader: byte mutations of real models through every path that reads one.

The corpus is Google's quantized MobileNet from ../shared/realdata/coral (with its labels zip) and
a tiny int8 classifier converted in the test, carrying edgetl metadata. Hypothesis mutates the
flatbuffer part (root table, vtables, vector lengths and offsets, mostly in the first KBs where
the tables live, the rest anywhere): byte flips, 16/32-bit fields set to edge values,
truncation. Every input goes through ``read_model``, ``check_tflite``, ``read_model_metadata``
and ``edgetl.inspect.inspect_model`` (only ``RunnerError``/``EdgetlError`` allowed), then — when
the runner's own reader accepts it — through ``Model`` (LiteRT builds, allocates, invokes) in a
forked child: a signal there (LiteRT segfaults on some malformed flatbuffers the runner would
have passed on) or a hang is a finding, as is a traceback.

What this found: LiteRT's Python interpreter segfaults while *building* a model whose root table
has no ``subgraphs`` vector (two zeroed vtable bytes are enough); the runner now refuses it
("it has no subgraph") before the interpreter sees it.

Memory: the fuzzing process's own peak RSS and every child's are bounded (asserted). The budget is
``EDGETL_FUZZ_SECONDS`` (default 40 s); runs are seeded, so CI repeats the same inputs. A finding
is saved as ``<tmp>/finding.tflite``.

By hand, longer::

    EDGETL_FUZZ_SECONDS=600 .venv/bin/python tests/test_fuzz_tflite.py --out /tmp/fuzz --corpus ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "coral"
BUDGET = float(os.environ.get("EDGETL_FUZZ_SECONDS", "40"))
CHILD_SECONDS = 30  # one model load + invoke; longer is a hang
MAX_CHILD_RSS_MB = 1024
MAX_SELF_GROWTH_MB = 300
PER_INPUT_DEADLINE_MS = 20000


# --- the fuzzer (runs in its own process) ---------------------------------------------------------

def _rss_mb(who) -> float:
    import resource

    return resource.getrusage(who).ru_maxrss / 1024.0


def _load_in_child(path: Path, report: Path) -> str | None:
    """Load + invoke in a forked child; None when it ended cleanly, else what went wrong."""
    import numpy as np

    from edgetl import runner as r

    pid = os.fork()
    if pid == 0:  # the child: only the runner's typed errors may come out
        code = 0
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)  # LiteRT's own log lines
            m = r.Model(path)
            if m.input.shape and len(m.input.shape) == 4:
                x = np.zeros([max(1, d) for d in m.input.shape[1:]], np.float32)
                m.class_scores(x)
        except r.RunnerError as e:
            code = 3 if str(e).strip() else 5
        except BaseException:
            import traceback

            report.write_text(traceback.format_exc())
            code = 4
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_SECONDS
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"loading hung for more than {CHILD_SECONDS} s"
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        return f"loading the model crashed the process (signal {os.WTERMSIG(status)})"
    code = os.WEXITSTATUS(status)
    if code == 4:
        return "loading raised: " + report.read_text()
    if code == 5:
        return "an empty error message"
    return None


def check(data: bytes, scratch: Path, stats: dict) -> None:
    """Every reader on one input; anything but edgetl's own errors is a finding."""
    from edgetl import EdgetlError
    from edgetl import runner as r
    from edgetl.inspect import inspect_model

    accepted = True
    for fn in (r.read_model, r.check_tflite, r.read_model_metadata):
        try:
            fn(data)
        except r.RunnerError as e:
            assert str(e).strip(), "an empty error message"
            accepted = False
    path = scratch / "input.tflite"
    path.write_bytes(data)
    try:
        inspect_model(path, compiler=False)
    except EdgetlError as e:
        assert str(e).strip(), "an empty error message"
    if accepted:  # the interpreter only ever sees what the runner's reader accepted
        stats["loaded"] += 1
        problem = _load_in_child(path, scratch / "child-traceback.txt")
        assert problem is None, problem


def fuzz(corpus: list[Path], out: Path, budget: float) -> int:
    import resource
    import struct

    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    from edgetl import runner as r

    r._import_interpreter()  # imported once, before the children fork
    bases = [p.read_bytes() for p in corpus]
    heads = [len(r.strip_metadata(b)) for b in bases]
    stats = {"inputs": 0, "loaded": 0}
    last = [b""]
    out.mkdir(parents=True, exist_ok=True)
    for base in bases:  # the untouched files read and load cleanly
        check(base, out, stats)
    start_rss = _rss_mb(resource.RUSAGE_SELF)

    @st.composite
    def mutated(draw):
        i = draw(st.integers(0, len(bases) - 1))
        data = bytearray(bases[i])
        n, head = len(data), heads[i]
        where = st.one_of(
            st.integers(0, min(head, 256) - 1),  # root offset, identifier, root vtable
            st.integers(0, min(head, 8192) - 1),  # tables, vtables, vectors of the first KBs
            st.integers(0, head - 1),  # anywhere in the flatbuffer
        )
        edits = draw(st.lists(st.tuples(where, st.sampled_from(["byte", "u16", "u32"]),
                                        st.integers(0, 2 ** 32 - 1)), min_size=1, max_size=4))
        for pos, kind, value in edits:
            if kind == "byte":
                data[pos] = value & 0xFF
            else:
                size = 2 if kind == "u16" else 4
                edge = draw(st.sampled_from([0, 1, 4, value, n, head, 2 ** (8 * size) - 1]))
                packed = struct.pack("<H" if size == 2 else "<I", edge % 2 ** (8 * size))
                data[pos: pos + size] = packed[: max(0, n - pos)]
        if draw(st.integers(0, 9)) == 0:
            del data[draw(st.integers(0, len(data))):]
        return bytes(data)

    @settings(max_examples=60, deadline=PER_INPUT_DEADLINE_MS, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(mutated())
    def one(data):
        last[0] = data
        stats["inputs"] += 1
        check(data, out, stats)

    started, batch = time.monotonic(), 0
    try:
        while time.monotonic() - started < budget:
            seed(2000 + batch)(one)()
            batch += 1
    except BaseException:
        (out / "finding.tflite").write_bytes(last[0])
        raise
    growth = _rss_mb(resource.RUSAGE_SELF) - start_rss
    child = _rss_mb(resource.RUSAGE_CHILDREN)
    print(f"fuzz: {stats['inputs']} mutated inputs, {stats['loaded']} loaded by LiteRT, in "
          f"{time.monotonic() - started:.0f} s ({batch} seeded batches); RSS growth "
          f"{growth:.0f} MB, largest child {child:.0f} MB; no finding")
    assert growth < MAX_SELF_GROWTH_MB, f"the reader's process grew by {growth:.0f} MB"
    assert child < MAX_CHILD_RSS_MB, f"a model load peaked at {child:.0f} MB RSS"
    return 0


# --- the test ------------------------------------------------------------------------------------

BUILD = r'''
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np, tensorflow as tf, tf_keras as keras
sys.path.insert(0, sys.argv[2])
from edgetl import runner as r
L = keras.layers
i = keras.Input((16, 16, 3), batch_size=1)
x = L.GlobalAveragePooling2D()(L.Conv2D(4, 3, activation="relu")(i))
m = keras.Model(i, L.Dense(3, activation="softmax")(x))
c = tf.lite.TFLiteConverter.from_keras_model(m)
c.optimizations = [tf.lite.Optimize.DEFAULT]
c.representative_dataset = lambda: ([np.random.RandomState(k).uniform(
    -1, 1, (1, 16, 16, 3)).astype("float32")] for k in range(8))
c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
c.inference_input_type = c.inference_output_type = tf.int8
meta = {"name": "tiny", "mode": "int8", "input": {"height": 16, "width": 16,
        "mean": [127.5] * 3, "std": [127.5] * 3, "channel_order": "RGB"}}
open(sys.argv[1], "wb").write(r.attach_metadata(c.convert(), meta, ["a", "b", "c"]))
'''


def test_tflite_reader_and_loader_survive_mutated_real_models(tmp_path):
    coral = REALDATA / "mobilenet_v1_0.25_128_quant.tflite"
    if not coral.is_file():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{coral} is missing in CI")
        pytest.skip(f"{coral} not found (real third-party models)")
    pytest.importorskip("hypothesis")
    if not hasattr(os, "fork"):
        pytest.skip("the loader is fuzzed in forked children (POSIX)")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(root))
    tiny = tmp_path / "tiny_int8.tflite"
    proc = subprocess.run([sys.executable, "-c", BUILD, str(tiny), str(root)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, __file__, "--out", str(tmp_path / "fuzz"), "--budget", str(BUDGET),
           str(coral), str(tiny)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET + 300, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fuzzer hung (no result {BUDGET + 300:.0f} s into a {BUDGET:.0f} s "
                    f"budget); the input in flight: {tmp_path / 'fuzz'}")
    assert proc.returncode >= 0, (f"the fuzzer process crashed (signal {-proc.returncode}); "
                                  f"stderr: {proc.stderr[-3000:]}")
    assert proc.returncode == 0, (f"finding saved as {tmp_path / 'fuzz' / 'finding.tflite'}:\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("fuzz: ") and "no finding" in summary, proc.stdout
    words = summary.split()
    assert int(words[1]) >= 100 and int(words[4]) >= 20, summary  # a real number of inputs
    print(summary)


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for a finding")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds to fuzz")
    parser.add_argument("corpus", type=Path, nargs="+", help=".tflite files to mutate")
    args = parser.parse_args()
    sys.exit(fuzz(args.corpus, args.out, args.budget))
