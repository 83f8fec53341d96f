#!/usr/bin/env bash
# Install what devices/edgetl_runner.py needs on a Raspberry Pi (or any Debian-family ARM/x86 box).
#
#   bash setup.sh              # venv at ~/edgetl-venv
#   EDGETL_VENV=/opt/edgetl bash setup.sh
#
# 64-bit OS (dpkg architecture arm64/amd64): apt's python3-numpy + python3-pil, and the
# edgetl-runner package (devices/pyproject.toml: the runner, the `edgetl-runner` command and
# ai-edge-litert from PyPI) in a venv that sees the system packages (--system-site-packages).
# 32-bit OS (armhf): ai-edge-litert has no 32-bit ARM wheels; tflite-runtime is installed instead
# (the runner accepts it), with the tflite and flatbuffers packages (tflite-runtime ships no
# .tflite schema module: the runner reads models with tflite's), and the package with --no-deps.
# Without devices/pyproject.toml beside this script (e.g. copied alone by `edgetl fleet setup`)
# only the interpreter is installed; run edgetl_runner.py with the venv's python.
# Safe to run again: it only adds what is missing.
set -euo pipefail

VENV="${EDGETL_VENV:-$HOME/edgetl-venv}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PACKAGE="$(cd "$HERE/.." && pwd)"   # devices/: the edgetl-runner package
[ -f "$PACKAGE/pyproject.toml" ] || PACKAGE=""

say() { printf '\n== %s\n' "$*"; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }

command -v apt-get >/dev/null || die "this script needs a Debian-family OS (Raspberry Pi OS, Debian, Ubuntu)"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "run as root or install sudo"
  SUDO="sudo"
fi

ARCH="$(dpkg --print-architecture)"   # the userland: a 32-bit OS on a 64-bit kernel says armhf
say "OS: $(. /etc/os-release && echo "$PRETTY_NAME"), userland $ARCH, kernel $(uname -m)"

say "apt packages: python3-venv python3-numpy python3-pil"
$SUDO apt-get update
$SUDO apt-get install -y python3-venv python3-pip python3-numpy python3-pil

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (with --system-site-packages: reuses apt's numpy and Pillow)"
  python3 -m venv --system-site-packages "$VENV"
fi

case "$ARCH" in
  arm64|amd64)
    INTERP="ai-edge-litert"
    MODULE="ai_edge_litert.interpreter"
    ;;
  armhf|armel)
    INTERP="tflite-runtime"
    MODULE="tflite_runtime.interpreter"
    echo "32-bit OS: ai-edge-litert publishes no 32-bit ARM wheels, installing tflite-runtime."
    echo "If pip finds no tflite-runtime wheel for your Python, install the 64-bit Raspberry Pi OS."
    ;;
  *)
    die "unsupported architecture $ARCH: install numpy, pillow and ai-edge-litert (or tflite-runtime) by hand"
    ;;
esac

if [ -n "$PACKAGE" ] && [ "$INTERP" = "ai-edge-litert" ]; then
  # again on every run: picks up a newer runner; pip keeps what is already satisfied
  say "pip install $PACKAGE (edgetl-runner and $INTERP, into $VENV)"
  "$VENV/bin/python" -m pip install "$PACKAGE"
else
  if "$VENV/bin/python" -c "import $MODULE" >/dev/null 2>&1; then
    say "$INTERP already installed"
  else
    say "pip install $INTERP (into $VENV)"
    "$VENV/bin/python" -m pip install "$INTERP"
  fi
  if [ "$INTERP" = "tflite-runtime" ]; then
    say "pip install tflite flatbuffers (the .tflite schema reader, into $VENV)"
    "$VENV/bin/python" -m pip install "tflite>=2.18" flatbuffers
  fi
  if [ -n "$PACKAGE" ]; then
    say "pip install --no-deps $PACKAGE (edgetl-runner, into $VENV)"
    "$VENV/bin/python" -m pip install --no-deps "$PACKAGE"
  fi
fi

say "check"
"$VENV/bin/python" - <<'EOF'
import sys
import numpy
import PIL
for name in ("ai_edge_litert", "tflite_runtime"):
    try:
        mod = __import__(name)
        print("interpreter:", name, getattr(mod, "__version__", "?"))
        break
    except ImportError:
        pass
else:
    sys.exit("no TFLite interpreter could be imported")
for name in ("ai_edge_litert.schema_py_generated", "tflite"):
    try:
        __import__(name)
        print("schema reader:", name)
        break
    except ImportError:
        pass
else:
    sys.exit("no .tflite schema module could be imported: pip install tflite flatbuffers")
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| pillow", PIL.__version__)
EOF

RUNNER=""
for candidate in "$HERE/../edgetl_runner.py" "$HERE/edgetl_runner.py" "./edgetl_runner.py"; do
  if [ -f "$candidate" ]; then RUNNER="$(cd "$(dirname "$candidate")" && pwd)/edgetl_runner.py"; break; fi
done

say "done"
echo "Run a model with:"
if [ -x "$VENV/bin/edgetl-runner" ]; then
  echo "  $VENV/bin/edgetl-runner MODEL.tflite --threads $(nproc)"
  echo "  $VENV/bin/edgetl-runner MODEL.tflite --data test_images/ --json report.json"
  echo "(or: $VENV/bin/python ${RUNNER:-edgetl_runner.py} MODEL.tflite ...)"
  exit 0
fi
echo "  $VENV/bin/python ${RUNNER:-edgetl_runner.py} MODEL.tflite --threads $(nproc)"
echo "  $VENV/bin/python ${RUNNER:-edgetl_runner.py} MODEL.tflite --data test_images/ --json report.json"
