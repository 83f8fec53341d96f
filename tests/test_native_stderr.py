"""What native code writes to file descriptor 2 while edgetl runs: known C++ chatter is dropped,
everything else passes as it comes, and Python's own stderr is untouched."""

import subprocess
import sys
import textwrap

from edgetl.runner import NATIVE_NOISE

SCRIPT = textwrap.dedent("""
    import os, sys
    from edgetl.runner import filtered_native_stderr
    print("before", file=sys.stderr, flush=True)
    with filtered_native_stderr():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
        os.write(2, b"native warning kept\\nfully_quantize: 0, inference_type: 6\\n")
        print("python line", file=sys.stderr, flush=True)
        os.write(2, b"INF")  # a noise line split across writes
        os.write(2, b"O: split\\n")
        os.write(2, b"bar 50%\\r")  # a partial line that is not noise passes at once
        {inner}
    print("after", file=sys.stderr, flush=True)
    os.write(2, b"INFO: unfiltered outside the block\\n")
""")


def _stderr(inner: str = "pass", env=None) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(inner=inner)],
                          capture_output=True, text=True, timeout=60, env=env)
    return proc.returncode, proc.stderr


def test_noise_is_dropped_and_the_rest_kept():
    rc, err = _stderr()
    assert rc == 0, err
    assert "INFO: Created" not in err and "fully_quantize" not in err and "INFO: split" not in err
    for kept in ("before", "native warning kept", "python line", "bar 50%", "after",
                 "INFO: unfiltered outside the block"):
        assert kept in err, err
    assert err.index("before") < err.index("python line") < err.index("after")
    assert all(n.startswith(b"INFO: ") or n == b"fully_quantize: " for n in NATIVE_NOISE)


def test_an_error_inside_the_block_still_restores_stderr():
    rc, err = _stderr('raise SystemExit("error: bad value")')
    assert rc == 1
    assert err.rstrip().endswith("error: bad value"), err
    assert "native warning kept" in err and "INFO: Created" not in err


def test_edgetl_tf_logs_keeps_everything():
    import os

    rc, err = _stderr(env={**os.environ, "EDGETL_TF_LOGS": "1"})
    assert rc == 0 and "INFO: Created" in err and "fully_quantize" in err


def test_a_message_written_just_before_a_crash_still_shows():
    # A C++ CHECK failure writes its line, then aborts: the filter outlives the process.
    rc, err = _stderr('os.write(2, b"F0000 check failed: native abort\\n"); os.abort()')
    assert rc != 0
    assert "F0000 check failed: native abort" in err and "INFO: Created" not in err
