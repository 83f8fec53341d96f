#!/usr/bin/env python3
"""Run a .tflite model on fixed inputs and save its raw (int8/uint8) outputs, for bit-exact comparison.

Runs the same on the build machine and on an emulated Raspberry Pi (stdlib + numpy + a LiteRT
interpreter, like devices/edgetl_runner.py), so the two .npz files can be compared element by element:

    python3 devices/emulate/raw_outputs.py MODEL.tflite --out host.npz
    bash devices/emulate/pi.sh --pi 4 --python devices/emulate/raw_outputs.py MODEL.tflite --out pi4.npz
    python3 devices/emulate/raw_outputs.py --compare host.npz pi4.npz

Inputs are either ``--inputs FILE.npz`` (``input_0`` .. ``input_k``, each shaped ``(N, *input_shape)``)
or ``--samples N`` tensors drawn from ``numpy.random.RandomState(--seed)`` over each input's dtype range.
The output ``.npz`` holds ``output_0`` .. ``output_m``, each ``(N, *output_shape)``, plus a ``meta``
JSON string (machine, interpreter, versions, kernels); the same meta is printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

KERNELS = ("xnnpack", "builtin", "reference")


def _interpreter_api():
    """(Interpreter, OpResolverType, name) of the first interpreter found, in the runner's order."""
    try:
        from ai_edge_litert import interpreter as mod

        return mod.Interpreter, mod.OpResolverType, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as mod  # type: ignore[no-redef]

        return mod.Interpreter, mod.OpResolverType, "tflite_runtime"
    except ImportError:
        pass
    import tensorflow as tf  # last resort, as in the runner

    return tf.lite.Interpreter, tf.lite.experimental.OpResolverType, "tensorflow.lite"


def _make_interpreter(model: str, kernels: str, threads: int):
    interpreter_cls, resolver, name = _interpreter_api()
    # xnnpack: the default path (XNNPACK delegate applied by default, as on a Pi);
    # builtin: the optimized builtin kernels (their int8 SIMD code differs between x86 and ARM);
    # reference: the portable reference kernels.
    op_resolver = {
        "xnnpack": resolver.AUTO,
        "builtin": resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        "reference": resolver.BUILTIN_REF,
    }[kernels]
    interp = interpreter_cls(model_path=model, num_threads=threads, experimental_op_resolver_type=op_resolver)
    interp.allocate_tensors()
    return interp, name


def _version(dist: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:  # noqa: BLE001 - a missing distribution is not an error here
        return None


def _random_inputs(details, samples: int, seed: int) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    arrays = []
    for d in details:
        shape, dtype = (samples, *d["shape"]), np.dtype(d["dtype"])
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            arrays.append(rng.randint(info.min, int(info.max) + 1, size=shape).astype(dtype))
        else:
            arrays.append(rng.uniform(-1.0, 1.0, size=shape).astype(dtype))
    return arrays


class _RunnerInterpreter:
    """The device runner's own ``Model`` behind the few interpreter calls used here."""

    def __init__(self, runner_path: str, model: str, kernels: str, threads: int):
        import importlib.util

        spec = importlib.util.spec_from_file_location("edgetl_runner", runner_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["edgetl_runner"] = mod
        spec.loader.exec_module(mod)
        if kernels == "reference":
            raise SystemExit("the runner has no reference-kernel path: use --kernels xnnpack or builtin")
        self.model = mod.Model(model, threads=threads, delegate="xnnpack" if kernels == "xnnpack" else "none")
        self.name = "edgetl_runner (%s %s)" % (self.model.interpreter_name, self.model.interpreter_version)
        self._x = None

    @staticmethod
    def _details(io):  # the runner's public IOInfo, as interpreter details
        return [{"name": io.name, "index": io.index, "dtype": np.dtype(io.dtype), "shape": list(io.shape),
                 "quantization": (io.scale, io.zero_point)}]

    def get_input_details(self):
        return self._details(self.model.input)

    def get_output_details(self):
        return self._details(self.model.output)

    def set_tensor(self, index, x):
        self._x = x

    def invoke(self):
        self._y = self.model.invoke_raw(self._x)

    def get_tensor(self, index):
        return self._y


def run(model: str, out: str, *, inputs: str | None, samples: int, seed: int, kernels: str, threads: int,
        runner: str | None = None) -> dict:
    if runner:
        interp = _RunnerInterpreter(runner, model, kernels, threads)
        interp_name = interp.name
    else:
        interp, interp_name = _make_interpreter(model, kernels, threads)
    in_details = sorted(interp.get_input_details(), key=lambda d: d["index"])
    out_details = sorted(interp.get_output_details(), key=lambda d: d["index"])
    if inputs:
        with np.load(inputs) as z:
            arrays = [z[f"input_{i}"] for i in range(len(in_details))]
    else:
        arrays = _random_inputs(in_details, samples, seed)
    n = arrays[0].shape[0]
    for d, a in zip(in_details, arrays):
        if tuple(a.shape[1:]) != tuple(d["shape"]) or a.dtype != np.dtype(d["dtype"]) or a.shape[0] != n:
            raise SystemExit(
                f"input {d['name']!r} wants {n} x {tuple(d['shape'])} {np.dtype(d['dtype'])}, "
                f"got {a.shape} {a.dtype}"
            )
    outputs = [np.empty((n, *d["shape"]), dtype=d["dtype"]) for d in out_details]
    for k in range(n):
        for d, a in zip(in_details, arrays):
            interp.set_tensor(d["index"], a[k])
        interp.invoke()
        for d, o in zip(out_details, outputs):
            o[k] = interp.get_tensor(d["index"])
    meta = {
        "model": os.path.basename(model),
        "machine": platform.machine(),
        "emulated": os.environ.get("EDGETL_EMULATED") or None,
        "python": platform.python_version(),
        "interpreter": interp_name,
        "versions": {"numpy": np.__version__, "ai-edge-litert": _version("ai-edge-litert")},
        "kernels": kernels,
        "threads": threads,
        "samples": n,
        "inputs": inputs or f"RandomState({seed})",
        "outputs": [
            {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(s) for s in d["shape"]],
             "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]}
            for d in out_details
        ],
    }
    tmp = out + ".tmp.npz"
    np.savez(tmp, meta=np.array(json.dumps(meta)), **{f"output_{j}": o for j, o in enumerate(outputs)})
    os.replace(tmp, out)
    return meta


def compare(a_path: str, b_path: str) -> dict:
    """Max absolute difference in integer steps, per output and overall."""
    with np.load(a_path) as a, np.load(b_path) as b:
        keys = sorted(k for k in a.files if k.startswith("output_"))
        if keys != sorted(k for k in b.files if k.startswith("output_")):
            raise SystemExit(f"{a_path} and {b_path} have different outputs")
        per = {}
        for k in keys:
            if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
                raise SystemExit(f"{k}: {a[k].shape} {a[k].dtype} vs {b[k].shape} {b[k].dtype}")
            diff = np.abs(a[k].astype(np.int64) - b[k].astype(np.int64)) if a[k].dtype.kind in "iu" \
                else np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))
            per[k] = {"max_abs_diff": diff.max().item(), "elements_differing": int((diff != 0).sum()),
                      "elements": int(diff.size)}
        return {"max_abs_diff": max(v["max_abs_diff"] for v in per.values()), "outputs": per,
                "a": json.loads(str(a["meta"])), "b": json.loads(str(b["meta"]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="the .tflite model")
    p.add_argument("--out", help="where to write the outputs (.npz)")
    p.add_argument("--inputs", help=".npz with input_0.. arrays shaped (N, *input_shape)")
    p.add_argument("--samples", type=int, default=4, help="random inputs when --inputs is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", choices=KERNELS, default="xnnpack")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runner", metavar="edgetl_runner.py",
                   help="run through the device runner's Model.invoke_raw instead of a bare interpreter")
    p.add_argument("--compare", nargs=2, metavar=("A.npz", "B.npz"), help="compare two output files")
    args = p.parse_args(argv)
    if args.compare:
        result = compare(*args.compare)
        try:
            print(json.dumps(result, indent=2))
        except BrokenPipeError:
            pass
        return 0 if result["max_abs_diff"] == 0 else 1
    if not args.model or not args.out:
        p.error("MODEL and --out are required (or --compare A B)")
    meta = run(args.model, args.out, inputs=args.inputs, samples=args.samples, seed=args.seed,
               kernels=args.kernels, threads=args.threads, runner=args.runner)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
