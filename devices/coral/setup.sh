#!/usr/bin/env bash
# Install the Coral Edge TPU runtime (libedgetpu) and the runner's Python packages, on a Raspberry
# Pi or an x86-64 Linux machine (Debian/Ubuntu family), for a Coral USB Accelerator.
#
#   bash setup.sh          # libedgetpu1-std: standard clock
#   bash setup.sh --max    # libedgetpu1-max: maximum clock (faster, the device runs hot)
#
# Then unplug and replug the accelerator (the package installs udev rules) and run
#   ~/edgetl-venv/bin/edgetl-runner MODEL_edgetpu.tflite --delegate edgetpu
set -euo pipefail

PKG="libedgetpu1-std"
for arg in "$@"; do
  case "$arg" in
    --max) PKG="libedgetpu1-max" ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --max or nothing)" >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
say() { printf '\n== %s\n' "$*"; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }

command -v apt-get >/dev/null || die "this script needs a Debian-family OS (Raspberry Pi OS, Debian, Ubuntu)"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "run as root or install sudo"
  SUDO="sudo"
fi

KEYRING=/usr/share/keyrings/coral-edgetpu-archive-keyring.gpg
LIST=/etc/apt/sources.list.d/coral-edgetpu.list
if [ ! -f "$LIST" ]; then
  say "adding the Coral apt repository"
  $SUDO apt-get update
  $SUDO apt-get install -y curl gnupg ca-certificates
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | $SUDO gpg --dearmor --yes -o "$KEYRING"
  echo "deb [signed-by=$KEYRING] https://packages.cloud.google.com/apt coral-edgetpu-stable main" \
    | $SUDO tee "$LIST" >/dev/null
fi

say "installing $PKG (the Edge TPU runtime, libedgetpu.so.1)"
$SUDO apt-get update
# std and max conflict: installing one replaces the other
$SUDO apt-get install -y "$PKG"

if [ -n "${SUDO}" ] && ! id -nG "$USER" | grep -qw plugdev; then
  say "adding $USER to the plugdev group (log out and in again for it to apply)"
  $SUDO usermod -aG plugdev "$USER"
fi

say "Python packages for the runner (the edgetl-runner package, devices/pyproject.toml)"
if [ -f "$HERE/../raspberry-pi/setup.sh" ]; then
  bash "$HERE/../raspberry-pi/setup.sh"
else  # copied beside it as pi-setup.sh by `edgetl fleet setup`, which runs that one first
  [ -f "$HERE/pi-setup.sh" ] || die "raspberry-pi/setup.sh not found next to this script"
fi

say "Edge TPU check"
if command -v lsusb >/dev/null; then
  # 1a6e:089a before the first inference (Global Unichip), 18d1:9302 after it (Google)
  if lsusb | grep -Eq '1a6e:089a|18d1:9302'; then
    echo "Coral USB Accelerator found: $(lsusb | grep -E '1a6e:089a|18d1:9302')"
  else
    echo "No Coral USB Accelerator on USB yet: plug it in (a USB 3 port, blue) after this script."
  fi
fi
ldconfig -p | grep -q libedgetpu.so.1 && echo "libedgetpu.so.1 is installed."

echo
echo "Unplug and replug the accelerator now (new udev rules), then:"
VENV="${EDGETL_VENV:-$HOME/edgetl-venv}"
if [ -x "$VENV/bin/edgetl-runner" ]; then
  echo "  $VENV/bin/edgetl-runner MODEL_edgetpu.tflite --delegate edgetpu"
else
  echo "  $VENV/bin/python edgetl_runner.py MODEL_edgetpu.tflite --delegate edgetpu"
fi
