"""Decoding in a pool of processes (edgetl/decode.py) gives the serial decode's pixels, in order."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from multiprocessing import spawn
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl import data, decode
from edgetl.runner import RunnerError

SIZE = (20, 24)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """70 small images over two classes: RGB PNG, JPEG, greyscale PNG, RGBA PNG, odd sizes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.RandomState(0)
    items = []
    for i in range(70):
        label = i % 2
        d = root / f"c{label}"
        d.mkdir(exist_ok=True)
        hw = (17 + i % 9, 31 - i % 7)
        kind = i % 4
        if kind == 0:
            img, name = Image.fromarray(rng.randint(0, 256, hw + (3,), np.uint8)), f"{i}.png"
        elif kind == 1:
            img, name = Image.fromarray(rng.randint(0, 256, hw + (3,), np.uint8)), f"{i}.jpg"
        elif kind == 2:
            img, name = Image.fromarray(rng.randint(0, 256, hw, np.uint8), "L"), f"{i}.png"
        else:
            img, name = Image.fromarray(rng.randint(0, 256, hw + (4,), np.uint8), "RGBA"), f"{i}.png"
        img.save(d / name)
        items.append((str(d / name), label))
    return items


def _children_gone(timeout: float = 10.0) -> list:
    """_children() once they have all ended, or what is left after ``timeout`` seconds (a child
    whose exec failed can still be exiting when the call that started it has returned)."""
    end = time.monotonic() + timeout
    while (left := _children()) and time.monotonic() < end:
        time.sleep(0.1)
    return left


def _children():
    """Live child processes of this process (from /proc; zombies are not running), but for
    multiprocessing's resource tracker: one per parent, it exits with the parent."""
    me, out = os.getpid(), []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == me and stat[0] != "Z" and b"resource_tracker" not in cmd:
                out.append(int(pid))
    return out


@pytest.mark.parametrize("channels", [3, 1])
def test_pool_gives_the_serial_pixels_in_order(folder, channels):
    paths = [p for p, _ in folder]
    chunks = [paths[i:i + 8] for i in range(0, len(paths), 8)]
    pooled = list(decode.decode_chunks(chunks, SIZE, channels, workers=2))
    serial = [np.stack([data.load_pixels(p, SIZE, channels) for p in c]) for c in chunks]
    assert len(pooled) == len(serial)
    for a, b in zip(pooled, serial):
        assert a.dtype == np.uint8 and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert _children() == []  # the pool is shut down when the pass ends


@pytest.mark.parametrize("channels", [3, 1])
def test_make_dataset_uses_the_pool_over_the_threshold(folder, monkeypatch, channels):
    prep = {"mean": [0.0] * channels, "std": [1.0] * channels, "channel_order": "RGB"}

    def batches():
        ds = data.make_dataset(folder, SIZE, prep, 16, False, False, 0, channels=channels)
        return [(x.numpy(), y.numpy()) for x, y in ds]

    monkeypatch.setattr(data, "POOL_DECODE_BYTES", 1 << 40)
    serial = batches()
    monkeypatch.setattr(data, "POOL_DECODE_BYTES", 0)
    monkeypatch.setattr(data, "POOL_MIN_FILE_BYTES", 1 << 40)  # small files: no pool
    started = []
    real = decode.start_pool
    monkeypatch.setattr(decode, "start_pool", lambda w=None: started.append(w) or real(w))
    assert batches() and not started, "a pool for files smaller than POOL_MIN_FILE_BYTES"
    monkeypatch.setattr(data, "POOL_MIN_FILE_BYTES", 0)
    pooled = batches()
    assert started, "the pool path was not taken"
    assert len(pooled) == len(serial)
    for (xa, ya), (xb, yb) in zip(pooled, serial):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert _children() == []


def test_workers_do_not_load_tensorflow():
    pool = decode.start_pool(2)
    try:
        assert [pool.submit(decode._probe).result() for _ in range(4)] == [False] * 4
    finally:
        pool.shutdown()


def test_workers_are_one_per_core():
    assert decode.cores() == len(os.sched_getaffinity(0)) >= 1


def test_unreadable_file_raises_the_serial_error(folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = [folder[0][0], str(bad)]
    with pytest.raises(RunnerError) as serial:
        data.load_pixels(str(bad), SIZE)
    with pytest.raises(RunnerError) as pooled:
        list(decode.decode_chunks([paths[:1], paths[1:]], SIZE, 3, workers=2))
    assert str(pooled.value) == str(serial.value)
    assert _children() == []


def test_falls_back_to_serial_with_one_line_when_processes_cannot_start(folder, capsys):
    paths = [p for p, _ in folder[:10]]
    exe = spawn.get_executable()  # no python there: the workers cannot start
    spawn.set_executable("/nonexistent/python")
    try:
        out = list(decode.decode_chunks([paths[:5], paths[5:]], SIZE, 3, workers=2))
    finally:
        spawn.set_executable(exe)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: cannot start 2 decoding process(es)")
    assert "decoding in this process" in err[0]
    np.testing.assert_array_equal(out[0], np.stack([data.load_pixels(p, SIZE) for p in paths[:5]]))
    assert _children_gone() == []


def test_closing_mid_pass_stops_the_workers(folder):
    paths = [p for p, _ in folder]
    gen = decode.decode_chunks([paths[i:i + 2] for i in range(0, len(paths), 2)], SIZE, 3,
                               workers=2)
    next(gen)
    assert len(_children()) == 2
    gen.close()
    assert _children() == []


def test_ctrl_c_leaves_no_worker_behind(folder, tmp_path):
    """SIGINT to the whole process group (as a terminal's Ctrl-C) mid-decode: the parent exits
    with KeyboardInterrupt, the workers do not print tracebacks and none outlives it. The
    script has no `if __name__ == "__main__"` guard: workers do not run it again."""
    paths = [p for p, _ in folder] * 40
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        # As a process started from a terminal: Ctrl-C not ignored, not blocked, whatever
        # this test's own process inherited (dispositions and masks pass through exec).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        from edgetl import decode
        paths = {paths!r}
        gen = decode.decode_chunks([paths[i:i + 4] for i in range(0, len(paths), 4)],
                                   (64, 64), 3, workers=2)
        next(gen)
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()
                and open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[1]
                == str(os.getpid())
                and b"resource_tracker" not in open(f"/proc/{{p}}/cmdline", "rb").read()]
        print(" ".join(map(str, pids)), flush=True)
        try:
            for _ in gen:
                time.sleep(0.2)
        finally:
            gen.close()
    """))
    env = dict(os.environ, PYTHONPATH=str(Path(decode.__file__).parents[1]))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    workers = [int(x) for x in p.stdout.readline().split()]
    assert len(workers) == 2
    os.killpg(p.pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"no exit 60 s after SIGINT; this test process: SIGINT handler "
                    f"{signal.getsignal(signal.SIGINT)!r}, blocked "
                    f"{signal.pthread_sigmask(signal.SIG_BLOCK, [])}")
    assert p.returncode != 0 and "KeyboardInterrupt" in err
    assert err.count("Traceback") == 1  # the parent's only
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers)
