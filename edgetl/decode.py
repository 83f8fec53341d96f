"""Decoding image files on every core: a pool of worker processes running the device runner's
``load_image``, so the pixels are bit for bit those of the serial decode (TF's own decoders and
resize are not).

Workers are started with 'spawn' (TensorFlow is loaded in the parent; forking it is unsafe) and
import only this module, the runner, Pillow and numpy. They ignore Ctrl-C (the parent stops them)
and exit when the parent is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types
from collections import deque

import numpy as np


def cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def decode_chunk(paths, size: tuple[int, int], channels: int) -> np.ndarray:
    """Images as one uint8 array (len(paths), height, width, channels), by the runner's
    load_image (edgetl.data.load_pixels). Raises RunnerError for an unreadable file."""
    from edgetl.runner import load_image

    h, w = size
    return np.stack([load_image(p, (h, w), channels=channels) for p in paths])


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # the parent was killed: no orphan keeps running
            os._exit(0)


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _probe() -> bool:
    return "tensorflow" in sys.modules


def start_pool(workers: int | None = None):
    """A started pool of ``workers`` processes (default: cores()), or None with one ``note:``
    line on stderr when processes cannot be started here (decode serially then)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    workers = workers or cores()
    pool = None
    main = sys.modules.get("__main__")
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
        # 'spawn' runs the parent's main script again in each worker: a user's script would
        # load TensorFlow there (or train again, without an `if __name__ == "__main__"` guard).
        # The workers are all started here (one per waiting task), with a bare main module.
        sys.modules["__main__"] = types.ModuleType("__main__")
        # Workers inherit an ignored SIGINT from birth (a terminal's Ctrl-C reaches the whole
        # group; a worker still starting would print its own traceback): the parent stops them.
        ignore = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore else None
        try:
            probes = [pool.submit(_probe) for _ in range(workers)]
        finally:
            sys.modules["__main__"] = main
            if ignore:
                signal.signal(signal.SIGINT, previous)
        for f in probes:  # a failure to start shows here, not mid-epoch
            f.result()
        return pool
    except Exception as e:  # noqa: BLE001 - any failure to start processes: decode serially
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        print(f"note: cannot start {workers} decoding process(es) ({type(e).__name__}: "
              f"{' '.join(str(e).split())}); decoding in this process", file=sys.stderr, flush=True)
        return None


def decode_chunks(chunks, size: tuple[int, int], channels: int, workers: int | None = None):
    """Yields decode_chunk(chunk, size, channels) for each chunk of paths, in order, decoded
    ``workers`` processes at a time (serially when the pool cannot start). At most 2 x workers
    chunks are in flight, so memory stays bounded whatever the consumer's pace. The pool is
    shut down when the generator finishes, fails or is closed.

    Raises:
        RunnerError: an unreadable file (as the serial decode).
    """
    workers = workers or cores()
    pool = start_pool(workers)
    if pool is None:
        for chunk in chunks:
            yield decode_chunk(chunk, size, channels)
        return
    ahead = 2 * workers
    pending = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(decode_chunk, list(chunk), size, channels))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
