"""One folder (or tarball) to copy to a Raspberry Pi or Coral board: runner, model, labels, script.

The bundle needs no edgetl on the device: ``edgetl_runner.py`` is the standalone runner (stdlib +
numpy + pillow + a LiteRT interpreter) and the model carries its own metadata.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import shlex
import shutil
import tarfile
import tempfile
from pathlib import Path

from edgetl.errors import EdgetlError

RUNNER_NAME = "edgetl_runner.py"
TAR_SUFFIXES = (".tar.gz", ".tgz")
EXECUTABLE = ("run.sh", RUNNER_NAME)

REQUIREMENTS = """\
# What the edgetl runner needs on the device.
# 64-bit Raspberry Pi OS / Debian 12+ / Python 3.9+: ai-edge-litert (LiteRT, the successor of
# tflite-runtime). On 32-bit Pi OS (armv7l) ai-edge-litert has no wheels: replace the last line
# with `tflite-runtime` (which stopped at 2.14, Python <= 3.11), `tflite` and `flatbuffers` (the
# runner reads .tflite files with tflite's schema module; tflite-runtime has none).
numpy
pillow
ai-edge-litert
"""

RUN_SH = """\
#!/bin/sh
# Run {model} with the standalone edgetl runner; arguments are passed on (./run.sh --help).
# Relative paths in arguments (--data photos/) are relative to where you run it from.
# The first run creates .venv next to this script (--system-site-packages, so apt's python3-numpy
# etc. are reused) and installs requirements.txt, unless python3 already has what is needed.
set -eu
HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
has_deps() {{
  "$1" -c "import numpy, PIL" >/dev/null 2>&1 || return 1
  "$1" -c "import ai_edge_litert" >/dev/null 2>&1 || "$1" -c "import tflite_runtime, tflite" >/dev/null 2>&1
}}
if [ -x "$HERE/.venv/bin/python" ]; then
  PY="$HERE/.venv/bin/python"
elif has_deps python3; then
  PY=python3
else
  echo "run.sh: creating $HERE/.venv and installing requirements.txt (first run only)" >&2
  python3 -m venv --system-site-packages "$HERE/.venv"
  "$HERE/.venv/bin/python" -m pip install --upgrade pip >/dev/null
  "$HERE/.venv/bin/python" -m pip install -r "$HERE/requirements.txt"
  PY="$HERE/.venv/bin/python"
fi
exec "$PY" "$HERE/{runner}" "$HERE/"{model_q} "$@"
"""


README = """\
edgetl bundle: {model}

Files
  {model}
      the model; {model_note}
  {runner}
      the standalone runner: Python 3 + numpy + pillow + a LiteRT interpreter, no edgetl needed
{extra}  run.sh
      creates .venv on first use when python3 lacks the packages, then runs the runner
  requirements.txt
      numpy, pillow, ai-edge-litert (32-bit Raspberry Pi OS: tflite-runtime, tflite and
      flatbuffers instead)
  pyproject.toml
      the edgetl-runner package: `pip install .` here installs the runner as the
      `edgetl-runner` command, with the packages above

Run
  ./run.sh                      latency, throughput and peak memory on this device
  ./run.sh --data photos/       + top-1/top-5 accuracy on a folder with one sub-folder per class
  ./run.sh --image photo.jpg    the top-5 labels of an image, with their scores
  ./run.sh --json report.json   also write the full report as JSON
  ./run.sh --help               every option
Without run.sh, from this folder: python3 {runner} {model_q} [options]

Coral Edge TPU: install the Edge TPU runtime (libedgetpu1-std, https://coral.ai/software/), then
  ./run.sh --delegate edgetpu
with a model compiled by edgetpu_compiler.
"""

WITH_METADATA = "edgetl metadata embedded (labels, input size, preprocessing)"
WITHOUT_METADATA = (
    "no edgetl metadata: pixels are fed raw unless --mean/--std\n"
    "      are given, and --data needs --labels FILE"
)


def _runner_file() -> Path:
    """The runner's source file, symlinks resolved (``edgetl/runner.py`` links to ``devices/``)."""
    from edgetl import runner

    return Path(runner.__file__).resolve()


def _is_tar(out: Path) -> bool:
    return out.name.endswith(TAR_SUFFIXES)


def _sidecar(model: Path) -> Path | None:
    for candidate in (model.with_suffix(".json"), model.with_name(model.name + ".json")):
        if candidate.is_file():
            return candidate
    return None


def _labels(model: Path) -> tuple[bool, list[str] | None]:
    """(has edgetl metadata, its labels or None)."""
    from edgetl import runner

    try:
        meta = runner.read_metadata(model)
    except runner.RunnerError as e:  # damaged metadata would fail on the device too
        raise EdgetlError(str(e)) from e
    labels = [str(x) for x in (meta or {}).get("labels") or []]
    for label in labels:
        if "\n" in label or "\r" in label:  # labels.txt is one label a line
            raise EdgetlError(
                f"{model}: label {label!r} in the model's metadata contains a line break; "
                "re-export the model with single-line labels"
            )
    return meta is not None, (labels or None)


def _check_name(name: str, what: str) -> None:
    """Refuse control characters in a name that goes into run.sh, README.txt and tar members.

    A newline in a model's file name would start a new shell line in run.sh's comment; an
    escape sequence would reach the terminal of whoever reads README.txt or lists the tarball.
    """
    from edgetl.runner import printable

    if printable(name) != name:
        raise EdgetlError(
            f"{what} {name!r} contains control characters (a line break, tab or escape "
            "sequence), which would reach run.sh and README.txt on the device; rename it"
        )


def bundle_files(model_path: str | os.PathLike) -> dict[str, bytes]:
    """Everything that goes into a bundle, by file name.

    Args:
        model_path: the ``.tflite`` to ship.

    Returns:
        File name -> content: the runner, the model, its sidecar JSON if any, ``labels.txt``
        (when the metadata has labels), ``requirements.txt``, ``pyproject.toml`` (the
        edgetl-runner package), ``run.sh`` and ``README.txt``.

    Raises:
        EdgetlError: the model is missing, not a regular file or not a TFLite file, its name has
            control characters, or a label has a line break.
    """
    from edgetl import runner

    model = Path(model_path)
    problem = runner.path_problem(model, "model file")  # missing, a symlink loop, a FIFO, ...
    if problem:
        raise EdgetlError(f"{problem}; pass the path of a .tflite file")
    _check_name(model.name, "model file name")
    try:  # regular files only: a FIFO or a device is refused, never read
        data = runner.check_tflite(model)
    except runner.RunnerError as e:
        raise EdgetlError(str(e)) from e
    files: dict[str, bytes] = {
        RUNNER_NAME: _runner_file().read_bytes(),
        model.name: data,
    }
    extra = ""
    sidecar = _sidecar(model)
    if sidecar is not None:
        try:
            files[sidecar.name] = runner._read_file(sidecar, "sidecar file")
        except runner.RunnerError as e:
            raise EdgetlError(str(e)) from e
        extra += f"  {sidecar.name}\n      the export's settings and verification results\n"
    has_meta, labels = _labels(model)
    if labels:
        files["labels.txt"] = ("\n".join(labels) + "\n").encode()
        extra += (
            f"  labels.txt\n      the {len(labels)} class names, one a line (as in the model)\n"
        )
    model_q = shlex.quote(model.name)
    files["requirements.txt"] = REQUIREMENTS.encode()
    # the edgetl-runner package (devices/pyproject.toml): `pip install .` in the bundle gives the
    # `edgetl-runner` command
    files["pyproject.toml"] = (Path(__file__).parent / "runner_pyproject.toml").read_bytes()
    files["run.sh"] = RUN_SH.format(model=model.name, model_q=model_q, runner=RUNNER_NAME).encode()
    files["README.txt"] = README.format(
        model=model.name,
        model_q=model_q,
        runner=RUNNER_NAME,
        extra=extra,
        model_note=WITH_METADATA if has_meta else WITHOUT_METADATA,
    ).encode()
    return files


def _write_dir(files: dict[str, bytes], target: Path) -> None:
    target.mkdir()
    for name, data in sorted(files.items()):
        p = target / name
        p.write_bytes(data)
        p.chmod(0o755 if name in EXECUTABLE else 0o644)


def _write_tar(files: dict[str, bytes], target: Path, root: str) -> None:
    """A reproducible tar.gz: sorted entries, mtime 0, owner root, fixed modes, bare gzip header."""
    with open(target, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, mtime=0
    ) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        top = tarfile.TarInfo(root)
        top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(top)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size, info.mtime = len(data), 0
            info.mode = 0o755 if name in EXECUTABLE else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def _link_or_replace(staged: Path, out: Path) -> None:
    """Puts ``staged`` at ``out`` without replacing a file that appeared meanwhile (a hard link
    fails with FileExistsError); file systems without hard links (FAT on a USB stick) fall back
    to a rename after one more check."""
    try:
        os.link(staged, out)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(out):
            raise FileExistsError(errno.EEXIST, "exists", str(out)) from None
        os.replace(staged, out)


def bundle(
    model_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a device bundle: a folder, or a ``.tar.gz``/``.tgz`` when ``out`` ends so.

    The bundle is written under a temporary name next to ``out`` and renamed into place, so an
    interrupted run never leaves a half bundle. A tarball is reproducible: same inputs, same bytes.
    Its entries sit in one top folder named after the tarball (``pi.tar.gz`` -> ``pi/``).

    Args:
        model_path: the ``.tflite`` to ship.
        out: the folder to create, or a path ending in ``.tar.gz``/``.tgz``.
        overwrite: replace an existing ``out``.

    Returns:
        The path written (``out``).

    Raises:
        EdgetlError: the model is not a TFLite file, a name has control characters (refused,
            not escaped: they would reach run.sh and the tar member names), ``out`` exists and
            ``overwrite`` is False, or ``out``'s parent folder does not exist.
    """
    out = Path(out)
    _check_name(out.name, "--out name")
    if out.exists() and not overwrite:
        raise EdgetlError(
            f"{out} already exists; pass --overwrite to replace it or choose another --out"
        )
    if not out.parent.is_dir():
        raise EdgetlError(f"folder {out.parent} does not exist; create it or choose another --out")
    if out.exists() and not out.is_dir() and not out.is_file():
        raise EdgetlError(f"--out {out} is not a regular file or folder (a device, a pipe or a "
                          "socket): --overwrite would replace it; choose another --out")
    from edgetl.runner import RunnerError, refuse_special_output

    try:
        refuse_special_output(str(out), "--out")  # /dev/stdout: a link into /proc
    except RunnerError as e:
        raise EdgetlError(str(e)) from None
    if out.is_symlink() and not out.exists():
        raise EdgetlError(f"--out {out} is a broken symlink or a symlink loop (it points to "
                          f"{os.readlink(out)}): remove it or choose another --out")
    real_out, real_model = os.path.realpath(out), os.path.realpath(model_path)
    if real_model == real_out or real_model.startswith(real_out.rstrip(os.sep) + os.sep):
        # --overwrite would delete the model (and whatever sits beside it in that folder)
        what = "is" if real_model == real_out else "contains"
        raise EdgetlError(f"--out {out} {what} the model {model_path}: replacing it would "
                          "delete the input; choose another --out")
    files = bundle_files(model_path)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        if _is_tar(out):
            root = out.name[: -len(next(s for s in TAR_SUFFIXES if out.name.endswith(s)))]
            staged = tmp / out.name
            _write_tar(files, staged, root or "bundle")
        else:
            staged = tmp / "bundle"
            _write_dir(files, staged)
        if overwrite and os.path.lexists(out):  # move the old one aside, removed after the swap
            old = tmp / "old"
            os.replace(out, old)
            try:
                os.replace(staged, out)
            except BaseException:  # put the old bundle back: tmp (and old in it) is removed
                if not os.path.lexists(out):
                    os.replace(old, out)
                raise
        elif overwrite:
            os.replace(staged, out)
        elif staged.is_dir():
            os.rename(staged, out)  # fails if another bundle filled --out meanwhile
        else:
            _link_or_replace(staged, out)
    except FileExistsError:
        raise EdgetlError(f"{out} already exists (another command wrote it meanwhile?); pass "
                          "--overwrite to replace it or choose another --out") from None
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:
            raise EdgetlError(f"{out} already exists (another command wrote it meanwhile?); "
                              "pass --overwrite to replace it or choose another --out") from None
        # a full disk, a read-only folder: name --out, not a temporary file
        raise EdgetlError(f"cannot read or write '{out}': {e.strerror or e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
