"""First-epoch decoding, serial vs process pool (issue 17 item 2), interleaved in one run.

Writes N Fashion-MNIST training images as PNGs (28 px, as `edgetl data fashion-mnist` does),
then times make_dataset's first pass (training order, augmentation on, as benchmarks/run.py
section 6 does for folders over 1 GiB of pixels) at each size, decoding in this process
(POOL_DECODE_BYTES huge) or on every core (POOL_DECODE_BYTES 0), rounds interleaved
(serial, pool, then pool, serial, ...); and decoding alone (a one-thread loop of the runner's
load_image vs the pool), with CPU seconds per image. Prints JSON.

    PYTHONPATH=. python benchmarks/decode_pool.py --images 3000 --sizes 48 224 --rounds 2
"""

import argparse
import atexit
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetl import data, decode

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT.parent / "shared" / "realdata" / "fashion-mnist"


def _cpu():
    """CPU seconds of this process and its reaped children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 224])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--folder", help="a class folder to read instead of Fashion-MNIST")
    a = ap.parse_args()
    if a.folder:
        items = list(data.scan_folder(a.folder).items)[:a.images]
    else:
        work = Path(tempfile.mkdtemp(prefix="edgetl-decode-"))
        atexit.register(shutil.rmtree, work, True)
        data.idx_to_folders(str(FMNIST / "train-images-idx3-ubyte.gz"),
                            str(FMNIST / "train-labels-idx1-ubyte.gz"), work / "fm",
                            limit=a.images // 10)
        items = list(data.scan_folder(work / "fm").items)
    prep = {"mean": [127.5] * 3, "std": [127.5] * 3, "channel_order": "RGB"}
    out = {"images": len(items), "workers": decode.cores(), "date": time.strftime("%Y-%m-%d"),
           "ips": {}}
    paths = [p for p, _ in items]
    chunks = [paths[i:i + data.DECODE_CHUNK] for i in range(0, len(paths), data.DECODE_CHUNK)]
    for size in a.sizes:
        ips = {"serial": [], "pool": []}
        # Decoding alone: a one-thread loop vs decode_chunks (pool start included), wall time
        # and CPU seconds per image of this process plus its (reaped) workers.
        alone = {"serial": [], "pool": [], "serial_cpu_ms": [], "pool_cpu_ms": []}
        for r in range(a.rounds):
            for mode in (("serial", "pool") if r % 2 == 0 else ("pool", "serial")):
                data.POOL_DECODE_BYTES = 1 << 60 if mode == "serial" else 0
                ds = data.make_dataset(items, (size, size), prep, 32, True, True, 0)
                t0 = time.perf_counter()
                n = sum(int(x.shape[0]) for x, _ in ds)
                ips[mode].append(n / (time.perf_counter() - t0))
                del ds
                c0, t0 = _cpu(), time.perf_counter()
                if mode == "serial":
                    for c in chunks:
                        decode.decode_chunk(c, (size, size), 3)
                else:
                    for _ in decode.decode_chunks(chunks, (size, size), 3):
                        pass
                alone[mode].append(len(paths) / (time.perf_counter() - t0))
                alone[mode + "_cpu_ms"].append(1000 * (_cpu() - c0) / len(paths))
        out["ips"][size] = {
            "first_epoch": {**ips, "pool_over_serial": [p / s for p, s in
                                                        zip(ips["pool"], ips["serial"])]},
            "decode_alone": {**alone, "pool_over_serial": [p / s for p, s in
                                                           zip(alone["pool"], alone["serial"])]}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
