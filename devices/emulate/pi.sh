#!/usr/bin/env bash
# Run the edgetl device runner on an emulated Raspberry Pi (64-bit Raspberry Pi OS = Debian bookworm
# arm64) on an x86_64 Debian/Ubuntu machine, under qemu user-mode emulation.
#
#   bash devices/emulate/pi.sh --pi 4 MODEL.tflite [runner args...]
#
# The first run builds an aarch64 userland (Python 3.11 from Debian bookworm arm64 + the aarch64 wheels
# of numpy, ai-edge-litert and pillow) into a cache dir and fetches a static qemu-aarch64; later runs
# reuse both. Nothing on the host is installed or changed: apt runs with a private configuration.
# See devices/emulate/README.md. Timings measured here are NOT device latency.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="pi.sh"

usage() {
  cat <<'EOF'
Usage:
  bash devices/emulate/pi.sh [--pi 3|4|5] [OPTIONS] MODEL.tflite [RUNNER ARGS...]
  bash devices/emulate/pi.sh [--pi 3|4|5] [OPTIONS] --python [PYTHON ARGS...]
  bash devices/emulate/pi.sh [OPTIONS] --setup | --info

Runs devices/edgetl_runner.py (or, with --python, the emulated python3.11) on an emulated
Raspberry Pi running 64-bit Raspberry Pi OS (Debian bookworm arm64), under qemu-aarch64.

Profiles:
  --pi 4        Raspberry Pi 4, Cortex-A72 (default)
  --pi 5        Raspberry Pi 5, Cortex-A76
  --pi 3        Raspberry Pi 3 / Zero 2 W, Cortex-A53

Options:
  --sysroot DIR  cache dir for the userland and qemu (default: $EDGETL_PI_SYSROOT,
                 else ${XDG_CACHE_HOME:-~/.cache}/edgetl/pi-sysroot)
  --setup        build or check the cache only, run nothing
  --rebuild      delete the cache and build it again (e.g. for Debian security updates)
  --info         print qemu, sysroot and package versions
  --python       run the emulated python3.11 with the remaining arguments
  --quiet        no banner on stderr
  -h, --help     this text

Environment:
  EDGETL_PI_SYSROOT      cache dir (as --sysroot)
  EDGETL_PI_PIP          wheels to install (default: "numpy ai-edge-litert pillow"); pin versions
                         here, e.g. "ai-edge-litert==2.3.0 numpy==2.4.6 pillow"
  EDGETL_PIP             host pip command (default: "python3 -m pip"); "emulated" = Debian's pip
                         run under emulation
  EDGETL_QEMU            qemu-aarch64 binary to use instead of the cached one
  EDGETL_DEBIAN_MIRROR   Debian mirror (default: the host's, else http://deb.debian.org/debian)
  EDGETL_DEBIAN_SECURITY_MIRROR   (default: the host's, else http://deb.debian.org/debian-security)
  EDGETL_DEBIAN_KEYRING  (default: /usr/share/keyrings/debian-archive-keyring.gpg)

Exit status: the runner's; 2 = bad usage; 3 = this machine cannot provide the emulator or the
userland (no qemu to be had, Debian mirror or PyPI unreachable, not x86_64 Linux); 1 = other error.
The runner sees EDGETL_EMULATED="qemu <cpu>" (e.g. "qemu cortex-a72") and marks its report as emulated.
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
unavailable() { echo "$PROG: unavailable: $*" >&2; exit 3; }
# A download failed: exit 3 if the log shows the network was the reason, else it is an error here.
failed_download() {  # $1 = log, $2 = message
  if grep -Eqi "could not resolve|temporary failure|unable to connect|connection (refused|reset|timed out)|failed to establish|newconnectionerror|max retries|network is unreachable|proxyerror|timed out|no route to host|(403|404|407|50[0-9]) " "$1" 2>/dev/null; then
    unavailable "$2 (network; see $1)"
  fi
  die "$2 (see $1)"
}
log() { [[ "${QUIET:-0}" == 1 ]] || echo "$PROG: $*" >&2; }

# ---------------------------------------------------------------- arguments
PI=4
MODE=runner
SETUP_ONLY=0
REBUILD=0
INFO=0
QUIET=0
SYSROOT_ARG=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --pi) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; PI="$2"; shift 2 ;;
    --pi=*) PI="${1#--pi=}"; shift ;;
    --sysroot) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; SYSROOT_ARG="$2"; shift 2 ;;
    --sysroot=*) SYSROOT_ARG="${1#--sysroot=}"; shift ;;
    --setup) SETUP_ONLY=1; shift ;;
    --rebuild) REBUILD=1; shift ;;
    --info) INFO=1; shift ;;
    --quiet) QUIET=1; shift ;;
    --python) MODE=python; shift; break ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "$PROG: unknown option $1 (options for the runner go after MODEL.tflite)" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done

case "$PI" in
  3) CPU=cortex-a53; PART=0xd03; VARIANT=0x0; REV=4; MODEL_NAME="Raspberry Pi 3 Model B Rev 1.2"
     BOARD_REV=a02082; FEATURES="fp asimd evtstrm crc32 cpuid" ;;
  4) CPU=cortex-a72; PART=0xd08; VARIANT=0x0; REV=3; MODEL_NAME="Raspberry Pi 4 Model B Rev 1.4"
     BOARD_REV=d03114; FEATURES="fp asimd evtstrm crc32 cpuid" ;;
  5) CPU=cortex-a76; PART=0xd0b; VARIANT=0x4; REV=1; MODEL_NAME="Raspberry Pi 5 Model B Rev 1.0"
     BOARD_REV=d04170
     FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
  *) echo "$PROG: --pi must be 3, 4 or 5, not '$PI'" >&2; exit 2 ;;
esac

if [[ "$MODE" == runner && $SETUP_ONLY == 0 && $INFO == 0 && $# -eq 0 ]]; then
  echo "$PROG: missing MODEL.tflite" >&2; usage >&2; exit 2
fi

[[ "$(uname -s)" == Linux ]] || unavailable "needs Linux (this is $(uname -s))"
case "$(uname -m)" in
  x86_64) ;;
  *) unavailable "needs an x86_64 host (this is $(uname -m)); on an arm64 machine run devices/edgetl_runner.py directly" ;;
esac

CACHE="${SYSROOT_ARG:-${EDGETL_PI_SYSROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/edgetl/pi-sysroot}}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
ROOT="$CACHE/root"                    # the aarch64 userland (dpkg -x of Debian bookworm arm64 debs)
SITE_GUEST=/opt/edgetl/site-packages  # where the wheels go, as the guest sees it
PIP_SPEC="${EDGETL_PI_PIP:-numpy ai-edge-litert pillow}"
KEYRING="${EDGETL_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
# Python 3.11 = what Raspberry Pi OS bookworm ships; libstdc++6 is needed by the LiteRT wheel.
# base-files gives /etc/os-release ("Debian GNU/Linux 12 (bookworm)", as on Raspberry Pi OS).
DEBS=(python3.11 libstdc++6 base-files)

# One build at a time per cache dir (pytest-xdist workers, parallel CI jobs).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.lock"
  flock 9
fi

# ---------------------------------------------------------------- Debian mirrors
host_mirror() {  # $1 = debian | debian-security: the first matching URI in the host's apt sources
  local suffix="$1" f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    while read -r uri; do
      uri="${uri%/}"
      if [[ "$uri" == */"$suffix" && "$uri" != *snapshot.debian.org* ]]; then echo "$uri"; return 0; fi
    done < <(grep -v '^[[:space:]]*#' "$f" 2>/dev/null | grep -Eo '(https?|file)://[^][[:space:]]+' || true)
  done
  return 1
}
MIRROR="${EDGETL_DEBIAN_MIRROR:-$(host_mirror debian || echo http://deb.debian.org/debian)}"
SEC_MIRROR="${EDGETL_DEBIAN_SECURITY_MIRROR:-$(host_mirror debian-security || echo http://deb.debian.org/debian-security)}"

# A private apt: own sources, state, cache and architecture; the host's apt is not touched.
# $1 = arch (arm64 | amd64), $2.. = suites ("bookworm" from $MIRROR, "bookworm-security" from $SEC_MIRROR)
private_apt() {
  local arch="$1"; shift
  local d="$CACHE/apt-$arch" suite
  [[ -r "$KEYRING" ]] || unavailable "no Debian archive keyring at $KEYRING (apt-get install debian-archive-keyring, or set EDGETL_DEBIAN_KEYRING)"
  mkdir -p "$d/state/lists/partial" "$d/cache/archives/partial" "$d/etc/sources.list.d" "$d/etc/preferences.d" "$d/etc/apt.conf.d"
  : > "$d/state/status"   # empty: apt resolves the full dependency closure
  : > "$d/etc/sources.list"
  for suite in "$@"; do
    if [[ "$suite" == *-security ]]; then
      echo "deb [arch=$arch signed-by=$KEYRING] $SEC_MIRROR $suite main" >> "$d/etc/sources.list"
    else
      echo "deb [arch=$arch signed-by=$KEYRING] $MIRROR $suite main" >> "$d/etc/sources.list"
    fi
  done
  cat > "$d/apt.conf" <<EOF
Dir::State "$d/state";
Dir::State::status "$d/state/status";
Dir::Cache "$d/cache";
Dir::Etc "$d/etc";
Dir::Etc::SourceList "$d/etc/sources.list";
Dir::Etc::SourceParts "$d/etc/sources.list.d";
Dir::Etc::Preferences "$d/etc/preferences";
Dir::Etc::PreferencesParts "$d/etc/preferences.d";
Dir::Etc::Parts "$d/etc/apt.conf.d";
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
APT::Install-Recommends "false";
APT::Get::AllowUnauthenticated "false";
APT::Sandbox::User "$(id -un)";
Debug::NoLocking "true";
EOF
  echo "$d"
}

apt_private() {  # $1 = private apt dir, rest = apt-get args
  local d="$1"; shift
  APT_CONFIG="$d/apt.conf" apt-get -q -o APT::Update::Error-Mode=any "$@"
}

# ---------------------------------------------------------------- qemu
QEMU_DIR="$CACHE/qemu"
QEMU=""
fetch_qemu() {  # a static qemu-aarch64 from Debian, without installing it: bookworm-backports (qemu 10) else bookworm (7.2)
  command -v apt-get >/dev/null 2>&1 || return 1
  local d tmp deb f
  d="$(private_apt amd64 bookworm bookworm-backports bookworm-security)"
  # Failures are not fatal here: without backports, bookworm's qemu 7.2 will do.
  APT_CONFIG="$d/apt.conf" apt-get -q update >"$CACHE/qemu-fetch.log" 2>&1 || true
  tmp="$(mktemp -d "$CACHE/qemu.tmp.XXXXXX")"
  # qemu >= 9.1 ships static binaries in qemu-user; bookworm's 7.2 has them in qemu-user-static.
  if (cd "$tmp" && apt_private "$d" download qemu-user/bookworm-backports) >>"$CACHE/qemu-fetch.log" 2>&1; then
    f=./usr/bin/qemu-aarch64
  elif (cd "$tmp" && apt_private "$d" download qemu-user-static) >>"$CACHE/qemu-fetch.log" 2>&1; then
    f=./usr/bin/qemu-aarch64-static
  else
    rm -rf "$tmp" "$d"; return 1
  fi
  deb="$(ls "$tmp"/*.deb)"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" "$f" || { rm -rf "$tmp" "$d"; return 1; }
  "$tmp/$f" --version >/dev/null 2>&1 || { rm -rf "$tmp" "$d"; return 1; }
  mkdir -p "$QEMU_DIR"
  mv -f "$tmp/$f" "$QEMU_DIR/qemu-aarch64"
  basename "$deb" > "$QEMU_DIR/FROM"
  rm -rf "$tmp" "$d"  # the package lists alone are 160 MB
}

find_qemu() {
  if [[ -n "${EDGETL_QEMU:-}" ]]; then
    QEMU="$EDGETL_QEMU"
    "$QEMU" --version >/dev/null 2>&1 || unavailable "EDGETL_QEMU=$EDGETL_QEMU does not run"
    return
  fi
  if [[ -x "$QEMU_DIR/qemu-aarch64" ]]; then QEMU="$QEMU_DIR/qemu-aarch64"; return; fi
  log "fetching a static qemu-aarch64 from Debian (bookworm-backports, else bookworm)"
  if fetch_qemu; then QEMU="$QEMU_DIR/qemu-aarch64"; return; fi
  local q
  for q in qemu-aarch64-static qemu-aarch64; do
    if command -v "$q" >/dev/null 2>&1; then QEMU="$(command -v "$q")"; log "using the host's $QEMU"; return; fi
  done
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing qemu-user-static with apt-get"
    if apt-get install -y -q qemu-user-static >"$CACHE/qemu-apt.log" 2>&1 \
       || { apt-get update -q >>"$CACHE/qemu-apt.log" 2>&1 && apt-get install -y -q qemu-user-static >>"$CACHE/qemu-apt.log" 2>&1; }; then
      QEMU="$(command -v qemu-aarch64-static)"; return
    fi
  fi
  unavailable "no qemu-aarch64 could be fetched or found (see $CACHE/qemu-fetch.log; try: sudo apt-get install qemu-user-static)"
}

# ---------------------------------------------------------------- the userland
relativize_symlinks() {  # absolute links inside $1 would point into the host's / under qemu -L
  local root="$1" l t
  while IFS= read -r -d '' l; do
    t="$(readlink "$l")"
    ln -sfn "$(realpath -m --relative-to="$(dirname "$l")" "$root$t")" "$l"
  done < <(find "$root" -type l -lname '/*' -print0)
}

build_root() {
  command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 \
    || unavailable "needs apt-get and dpkg (a Debian or Ubuntu host)"
  local d tmp deb
  log "building the aarch64 userland (Debian bookworm arm64: ${DEBS[*]}) in $ROOT"
  d="$(private_apt arm64 bookworm bookworm-updates bookworm-security)"
  apt_private "$d" update >"$CACHE/apt-arm64.log" 2>&1 \
    || unavailable "apt could not reach $MIRROR for arm64 (see $CACHE/apt-arm64.log; set EDGETL_DEBIAN_MIRROR)"
  rm -f "$d/cache/archives/"*.deb
  apt_private "$d" install -y --download-only "${DEBS[@]}" >>"$CACHE/apt-arm64.log" 2>&1 \
    || failed_download "$CACHE/apt-arm64.log" "could not download the arm64 packages ${DEBS[*]}"
  tmp="$CACHE/root.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  for deb in "$d/cache/archives/"*.deb; do
    dpkg-deb -x "$deb" "$tmp"
    basename "$deb" .deb >> "$tmp/.edgetl-debs"
  done
  echo "${DEBS[*]}" > "$tmp/.edgetl-request"
  relativize_symlinks "$tmp"
  # Empty top-level dirs would shadow the host's under qemu -L (a guest listing /tmp would see them).
  for e in boot dev home media mnt proc root run srv sys tmp; do rmdir "$tmp/$e" 2>/dev/null || true; done
  # Empty dirs that would otherwise fall through -L to the host's x86 site-packages.
  mkdir -p "$tmp/usr/local/lib/python3.11/dist-packages" "$tmp/usr/local/lib/python3/dist-packages"
  rm -rf "$d"  # the package lists alone are 160 MB
  rm -rf "$ROOT"; mv "$tmp" "$ROOT"
  make_profile
  precompile /usr/lib/python3.11
}

host_pip() {  # prints the host pip command, or nothing
  if [[ -n "${EDGETL_PIP:-}" ]]; then echo "$EDGETL_PIP"; return; fi
  local py
  for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -m pip --version >/dev/null 2>&1; then echo "$py -m pip"; return; fi
  done
}

install_wheels() {
  local site="$ROOT$SITE_GUEST" tmp="$ROOT$SITE_GUEST.tmp" pip
  pip="$(host_pip)"
  rm -rf "$tmp"; mkdir -p "$tmp"
  log "installing aarch64 wheels: $PIP_SPEC"
  if [[ -n "$pip" && "$pip" != emulated ]]; then
    # All four manylinux tags: with only 2014/2_17 pip silently picks ai-edge-litert 1.4.0.
    # shellcheck disable=SC2086
    $pip install --quiet --disable-pip-version-check --no-warn-script-location --no-compile \
        --target "$tmp" --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
        --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        $PIP_SPEC >"$CACHE/pip.log" 2>&1 \
      || failed_download "$CACHE/pip.log" "pip could not get the aarch64 wheels for '$PIP_SPEC'"
  else
    # No pip on the host: Debian's pip, run under emulation (slower, same result).
    log "no host pip: using Debian's python3-pip under emulation"
    local d
    d="$(private_apt arm64 bookworm bookworm-updates bookworm-security)"
    apt_private "$d" update >>"$CACHE/apt-arm64.log" 2>&1 || unavailable "apt could not reach $MIRROR"
    (cd "$d/cache/archives" && apt_private "$d" download python3-pip) >>"$CACHE/apt-arm64.log" 2>&1 \
      || failed_download "$CACHE/apt-arm64.log" "could not download python3-pip"
    mkdir -p "$CACHE/pip-root"
    dpkg-deb -x "$d/cache/archives/"python3-pip_*.deb "$CACHE/pip-root"
    rm -rf "$d"
    # Host pip config files and path options (find-links, constraints) name host paths that the
    # guest would resolve inside the sysroot: leave them out; index URLs and proxies from the
    # environment still apply.
    GUEST_UNSET=(-u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_REQUIREMENT -u PIP_EXTRA_INDEX_URL)
    GUEST_PATH_EXTRA="$CACHE/pip-root/usr/lib/python3/dist-packages"
    # shellcheck disable=SC2086
    PIP_CONFIG_FILE=/dev/null guest_python -m pip install --quiet \
        --disable-pip-version-check --no-compile --target "$tmp" --only-binary=:all: $PIP_SPEC \
        >"$CACHE/pip.log" 2>&1 || failed_download "$CACHE/pip.log" "emulated pip could not get '$PIP_SPEC'"
    GUEST_UNSET=(); GUEST_PATH_EXTRA=""
    rm -rf "$CACHE/pip-root"
  fi
  rm -rf "$site"; mv "$tmp" "$site"
  precompile "$SITE_GUEST"
  echo "$PIP_SPEC" > "$ROOT/.edgetl-pip"
}

# Are the wheels asked for already there? Plain names and name==version are checked against the
# installed dist-info; anything else must equal the spec of the last install.
wheels_satisfied() {
  local site="$ROOT$SITE_GUEST" req name ver
  [[ -d "$site" ]] || return 1
  [[ "$(cat "$ROOT/.edgetl-pip" 2>/dev/null)" == "$PIP_SPEC" ]] && return 0
  shopt -s nocaseglob
  for req in $PIP_SPEC; do
    case "$req" in
      *==*) name="${req%%==*}"; ver="${req#*==}" ;;
      *[^A-Za-z0-9._-]*) shopt -u nocaseglob; return 1 ;;
      *) name="$req"; ver="*" ;;
    esac
    name="$(echo "$name" | tr '.-' '__')"
    # shellcheck disable=SC2086
    if ! compgen -G "$site/${name}-${ver}.dist-info" >/dev/null; then shopt -u nocaseglob; return 1; fi
  done
  shopt -u nocaseglob
}

# Byte-compile ahead of time: under qemu -L the guest cannot create __pycache__ dirs inside the
# sysroot (new absolute paths go to the host), and without .pyc files every start takes seconds longer.
precompile() {  # $1 = guest dir; .pyc files are the same on every arch, so a host Python 3.11 may do it
  local py
  py="$(command -v python3 || true)"
  if [[ -n "$py" ]] && [[ "$("$py" -c 'import sys; print(sys.implementation.cache_tag)' 2>/dev/null)" == cpython-311 ]]; then
    "$py" -m compileall -q -j 0 -d "$1" "$ROOT$1" >/dev/null 2>&1 || true
  else
    guest_python -m compileall -q -j 0 -d "$1" "$ROOT$1" >/dev/null 2>&1 || true
  fi
}

make_profile() {
  local p="$CACHE/profiles/$CPU" e i
  mkdir -p "$p/proc"
  for e in "$ROOT"/* ; do
    [[ "$(basename "$e")" == proc ]] && continue
    ln -sfn "../../root/$(basename "$e")" "$p/$(basename "$e")"
  done
  {
    for i in 0 1 2 3; do
      printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$FEATURES"
      printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$VARIANT" "$PART" "$REV"
    done
    printf 'Revision\t: %s\nModel\t\t: %s (emulated: qemu %s)\n' "$BOARD_REV" "$MODEL_NAME" "$CPU"
  } > "$p/proc/cpuinfo.tmp"
  mv -f "$p/proc/cpuinfo.tmp" "$p/proc/cpuinfo"
  mkdir -p "$p/proc/device-tree"  # the board name, as the Pi's kernel gives it (qemu 8+ fakes cpuinfo itself)
  printf '%s (emulated: qemu %s)\0' "$MODEL_NAME" "$CPU" > "$p/proc/device-tree/model"
  PROFILE="$p"
}

GUEST_PATH_EXTRA=""
GUEST_UNSET=()
guest_python() {  # run the emulated python3.11 with a clean Python environment (no host PYTHONPATH)
  env -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONSAFEPATH -u VIRTUAL_ENV -u LD_LIBRARY_PATH -u LD_PRELOAD \
      -u QEMU_LD_PREFIX -u QEMU_CPU ${GUEST_UNSET[@]+"${GUEST_UNSET[@]}"} \
      PYTHONPATH="${GUEST_PATH_EXTRA:+$GUEST_PATH_EXTRA:}$SITE_GUEST" PYTHONNOUSERSITE=1 \
      EDGETL_EMULATED="qemu $CPU" \
      "$QEMU" -cpu "$CPU" -L "$PROFILE" "$PROFILE/usr/bin/python3.11" "$@"
}

setup() {
  local t0=$SECONDS
  if [[ $REBUILD == 1 ]]; then
    log "removing $CACHE"
    rm -rf "$ROOT" "$CACHE/profiles" "$QEMU_DIR" "$CACHE"/apt-*
  fi
  find_qemu
  local built=0
  if [[ ! -x "$ROOT/usr/bin/python3.11" || "$(cat "$ROOT/.edgetl-request" 2>/dev/null)" != "${DEBS[*]}" ]]; then
    build_root; built=1
  fi
  make_profile
  if ! wheels_satisfied; then
    install_wheels; built=1
    make_profile  # links the new /opt
  fi
  if [[ $built == 1 ]]; then
    # Smoke test: the guest is aarch64 and imports the interpreter.
    local out
    out="$(guest_python -c 'import platform, numpy, ai_edge_litert.interpreter; print(platform.machine())' 2>&1)" \
      || die "the emulated python does not start: $out"
    [[ "$out" == *aarch64* ]] || die "the emulated python reports '$out', not aarch64"
    log "ready in $((SECONDS - t0)) s: $(du -sh "$CACHE" 2>/dev/null | cut -f1) in $CACHE"
  fi
}

info() {
  echo "qemu:     $QEMU"
  echo "qemu_version: $("$QEMU" --version | head -1)"
  [[ -f "$QEMU_DIR/FROM" && "$QEMU" == "$QEMU_DIR/qemu-aarch64" ]] && echo "qemu_from: $(cat "$QEMU_DIR/FROM")"
  echo "profile:  Raspberry Pi $PI ($CPU) $PROFILE"
  echo "sysroot:  $ROOT ($(du -sh "$ROOT" 2>/dev/null | cut -f1); cache total $(du -sh "$CACHE" 2>/dev/null | cut -f1))"
  echo "mirror:   $MIRROR $SEC_MIRROR"
  echo "wheels:   $(cat "$ROOT/.edgetl-pip")"
  guest_python - <<'EOF'
import platform, sys
from importlib import metadata
print("python:  ", sys.version.split()[0], platform.machine())
for name in ("numpy", "ai-edge-litert", "pillow"):
    try:
        print(f"{name}: {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: (not installed)")
EOF
}

# Make sure a --json report says it was emulated, whatever the runner version writes.
mark_report() {
  local report="$1"
  [[ -s "$report" ]] || return 0
  local py=guest_python
  command -v python3 >/dev/null 2>&1 && py=python3
  "$py" - "$report" "qemu $CPU" <<'EOF' || true
import json, sys
path, emulated = sys.argv[1], sys.argv[2]
with open(path) as f:
    report = json.load(f)
if isinstance(report, dict):
    machine = report.setdefault("machine", {})
    if isinstance(machine, dict) and not machine.get("emulated"):
        machine["emulated"] = emulated
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        import os
        os.replace(path + ".tmp", path)
EOF
}

# ---------------------------------------------------------------- main
setup
if [[ $INFO == 1 ]]; then info; exit 0; fi
if [[ $SETUP_ONLY == 1 ]]; then
  [[ "$QUIET" == 1 ]] || echo "$PROG: ready: Raspberry Pi $PI ($CPU), qemu $("$QEMU" --version | head -1 | awk '{print $3}'), sysroot $ROOT" >&2
  exit 0
fi
flock -u 9 2>/dev/null || true

BANNER="emulated Raspberry Pi $PI ($CPU) under $("$QEMU" --version | head -1 | awk '{print $1, $3}'): outputs are the device's; timings are NOT device latency (qemu translates every instruction: emulated times say nothing about a real Pi)"
if [[ "$MODE" == python ]]; then
  log "$BANNER"
  set +e; guest_python "$@"; rc=$?; set -e
  exit $rc
fi

RUNNER="${EDGETL_RUNNER:-$HERE/../edgetl_runner.py}"
[[ -f "$RUNNER" ]] || die "runner not found: $RUNNER"
# Find --json OUT among the runner's arguments.
REPORT=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --json) REPORT="${args[$((i + 1))]:-}" ;;
    --json=*) REPORT="${args[$i]#--json=}" ;;
  esac
done
log "$BANNER"
set +e; guest_python "$RUNNER" "$@"; rc=$?; set -e
[[ -n "$REPORT" && "$REPORT" != "-" ]] && mark_report "$REPORT"
exit $rc
