"""Benchmark models on many devices over SSH: inventory -> per-host runner jobs -> one table.

Each host gets the same bundle (models, the standalone runner, optional data) in a fresh remote
folder, runs ``edgetl_runner.py --json`` once per model (a fresh process each, as ``edgetl bench``
does), and the reports come back into one table. Hosts run in parallel, at most ``jobs`` at a time,
each within its own time limit; a host that fails gets a row with a one-line reason and the others
go on.

The SSH side sits behind ``Transport`` (one method: run a command, optionally feeding stdin);
``AsyncsshTransport`` is the one in use. Host keys are checked against known_hosts and never
accepted silently; only keys and the agent authenticate (no passwords are read or stored).
Every value that reaches a remote shell goes through ``shlex.quote``.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import shlex
import socket
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgetl.errors import EdgetlError

HOST_KEYS = ("host", "user", "port", "identity", "python", "delegate", "labels", "workdir")
DEFAULT_KEYS = HOST_KEYS[1:] + ("known_hosts", "ssh_config")
DELEGATES = ("xnnpack", "edgetpu", "none")
DEFAULT_WORKDIR = ".edgetl-fleet"  # relative to the remote home (an SSH session starts there)
DEFAULT_VENV = "edgetl-venv"  # what devices/raspberry-pi/setup.sh creates in the home folder
CONNECT_TIMEOUT = 20.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# --------------------------------------------------------------------------------------------
# Inventory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One device of the inventory.

    Attributes:
        name: the inventory name; also the SSH host (a ``~/.ssh/config`` alias works) when
            ``host`` is not given.
        host: address or DNS name (None: ``name``).
        user: login name (None: from ``~/.ssh/config``, else the local user).
        port: SSH port (None: from ``~/.ssh/config``, else 22).
        identity: private key file (None: ``~/.ssh/config``, the agent, default keys).
        python: the remote Python (None: ``~/edgetl-venv/bin/python`` when present, else python3).
        delegate: ``xnnpack``, ``edgetpu`` (a Coral is attached) or ``none``.
        labels: free tags such as ``pi4`` or ``coral``, for ``--only``.
        workdir: remote folder for run folders, relative to the home folder unless absolute.
        known_hosts: known_hosts file (None: ``~/.ssh/config``'s, else ``~/.ssh/known_hosts``).
        ssh_config: SSH config file (None: ``~/.ssh/config``).
    """

    name: str
    host: str | None = None
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    python: str | None = None
    delegate: str = "xnnpack"
    labels: tuple[str, ...] = ()
    workdir: str = DEFAULT_WORKDIR
    known_hosts: str | None = None
    ssh_config: str | None = None

    @property
    def address(self) -> str:
        """``[user@]host[:port]`` as given (for messages and the table)."""
        text = self.host or self.name
        if self.user:
            text = f"{self.user}@{text}"
        return f"{text}:{self.port}" if self.port else text

    @property
    def is_coral(self) -> bool:
        return self.delegate == "edgetpu"


def _refuse_control(where: str, value: str) -> None:
    if _CONTROL.search(value):
        raise EdgetlError(f"{where} {value!r} contains a control character; remove it")


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise EdgetlError(f"{where} must be a non-empty string, got {value!r}")
    _refuse_control(where, value)
    return value


def _host_from(name: str, raw: dict, defaults: dict, source: Path) -> Host:
    where = f"{source}: host {name!r}"
    if not isinstance(raw, dict):
        raise EdgetlError(f"{where} must be a table ([hosts.{name}]), got {raw!r}")
    for key in raw:
        if key in ("password", "passphrase"):
            raise EdgetlError(f"{where}: {key} is not supported; use a key (identity) or ssh-agent")
        if key not in HOST_KEYS:
            raise EdgetlError(f"{where}: unknown key {key!r}; valid keys: {', '.join(HOST_KEYS)}")
    merged = {**defaults, **raw}
    values: dict[str, Any] = {"name": name}
    for key in ("host", "user", "identity", "python", "workdir", "known_hosts", "ssh_config"):
        if merged.get(key) is not None:
            values[key] = _text(f"{where}: {key}", merged[key])
    for key in ("identity", "known_hosts", "ssh_config"):
        if key in values:
            values[key] = str(Path(values[key]).expanduser())
    if "port" in merged:
        port = merged["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise EdgetlError(f"{where}: port must be a number from 1 to 65535, got {port!r}")
        values["port"] = port
    delegate = merged.get("delegate", "xnnpack")
    if delegate not in DELEGATES:
        raise EdgetlError(
            f"{where}: unknown delegate {delegate!r}; use one of {', '.join(DELEGATES)}")
    values["delegate"] = delegate
    labels = merged.get("labels", [])
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list):
        raise EdgetlError(f"{where}: labels must be a list of strings, got {labels!r}")
    values["labels"] = tuple(_text(f"{where}: label", x) for x in labels)
    return Host(**values)


def load_inventory(path: str | os.PathLike) -> list[Host]:
    """Read a TOML inventory: ``[defaults]`` (optional) and one ``[hosts.NAME]`` table per device.

    Args:
        path: the inventory file (``fleet.toml``).

    Returns:
        The hosts, in file order.

    Raises:
        EdgetlError: the file is missing or not TOML, has no hosts, an unknown key, a password,
            a bad port/delegate, or a name or value with a control character.
    """
    from edgetl.runner import path_problem

    source = Path(path)
    problem = path_problem(source, "inventory file")  # missing, a symlink loop, a FIFO, ...
    if problem:
        raise EdgetlError(f"{problem}; see `edgetl fleet --help`")
    try:
        doc = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgetlError(f"{source} is not a valid TOML inventory: {e}") from None
    unknown = set(doc) - {"defaults", "hosts"}
    if unknown:
        raise EdgetlError(
            f"{source}: unknown section {sorted(unknown)[0]!r}; use [defaults] and [hosts.NAME]"
        )
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise EdgetlError(f"{source}: [defaults] must be a table")
    for key in defaults:
        if key in ("password", "passphrase"):
            raise EdgetlError(
                f"{source}: {key} is not supported; use a key (identity) or ssh-agent")
        if key not in DEFAULT_KEYS:
            raise EdgetlError(
                f"{source}: unknown key {key!r} in [defaults]; "
                f"valid keys: {', '.join(DEFAULT_KEYS)}"
            )
    hosts = doc.get("hosts")
    if not isinstance(hosts, dict) or not hosts:
        raise EdgetlError(f"{source}: no hosts; add one table per device, e.g. [hosts.pi4-a]")
    out = []
    for name, raw in hosts.items():
        _refuse_control(f"{source}: host name", name)
        if not _NAME.match(name):
            raise EdgetlError(
                f"{source}: host name {name!r} may hold only letters, digits, '.', '_', '+', '-'"
            )
        out.append(_host_from(name, raw, {k: v for k, v in defaults.items()}, source))
    return out


def select(hosts: list[Host], only: list[str] | None) -> list[Host]:
    """The hosts whose name or one of whose labels is in ``only`` (None or empty: all).

    Raises:
        EdgetlError: no host matches.
    """
    if not only:
        return hosts
    chosen = [h for h in hosts if h.name in only or set(h.labels) & set(only)]
    if not chosen:
        known = sorted({h.name for h in hosts} | {x for h in hosts for x in h.labels})
        raise EdgetlError(
            f"--only {','.join(only)} matches no host; names and labels: {', '.join(known)}")
    return chosen


# --------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------


class HostError(Exception):
    """A host-level failure; ``str()`` is the one-line reason shown in its row."""


@dataclass(frozen=True)
class Completed:
    """What a remote command returned: exit code, and its output as bytes."""

    code: int
    stdout: bytes
    stderr: bytes


class Transport(Protocol):
    """The SSH side fleet needs: run one shell command on the host, optionally feeding stdin."""

    async def run(self, command: str, stdin: bytes | None = None) -> Completed: ...

    async def close(self) -> None: ...


def _asyncssh():
    try:
        import asyncssh
    except ImportError:
        raise EdgetlError(
            "edgetl fleet needs asyncssh, which is not installed: pip install asyncssh") from None
    return asyncssh


class AsyncsshTransport:
    """``Transport`` over one asyncssh connection (keys and agent only, known_hosts enforced)."""

    def __init__(self, conn) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, host: Host, timeout: float = CONNECT_TIMEOUT) -> "AsyncsshTransport":
        """Open the connection; raises ``HostError`` with a one-line reason on any failure."""
        asyncssh = _asyncssh()
        target = host.host or host.name
        kwargs: dict[str, Any] = {
            "connect_timeout": timeout,
            "password": None,  # never asked, never stored
            "kbdint_auth": False,
            "login_timeout": timeout,
        }
        if host.port is not None:
            kwargs["port"] = host.port
        if host.user is not None:
            kwargs["username"] = host.user
        if host.identity is not None:
            if not Path(host.identity).is_file():
                raise HostError(f"identity file not found: {host.identity}")
            kwargs["client_keys"] = [host.identity]
        if host.known_hosts is not None:  # never None into asyncssh: None would skip checking
            if not Path(host.known_hosts).is_file():
                raise HostError(f"known_hosts file not found: {host.known_hosts}")
            kwargs["known_hosts"] = host.known_hosts
        if host.ssh_config is not None:
            if not Path(host.ssh_config).is_file():
                raise HostError(f"ssh config file not found: {host.ssh_config}")
            kwargs["config"] = [host.ssh_config]
        try:
            conn = await asyncssh.connect(target, **kwargs)
        except asyncssh.HostKeyNotVerifiable:
            port = f"-p {host.port} " if host.port else ""
            user = f"{host.user}@" if host.user else ""
            raise HostError(
                f"host key of {host.address} is not in known_hosts or does not match it; check its "
                f"fingerprint, then add it (`ssh {port}{user}{target}` once, or ssh-keyscan); "
                "edgetl never accepts a host key by itself"
            ) from None
        except asyncssh.PermissionDenied:
            raise HostError(
                f"authentication failed for {host.address}: edgetl logs in with keys or the agent "
                "only; set identity or add your public key to the host's ~/.ssh/authorized_keys"
            ) from None
        except ConnectionRefusedError:
            raise HostError(
                f"connection refused by {host.address} (no SSH server there?)") from None
        except socket.gaierror:
            raise HostError(f"cannot resolve host name {target!r}") from None
        except asyncio.TimeoutError:
            raise HostError(f"no answer from {host.address} within {timeout:.0f} s") from None
        except asyncssh.Error as e:
            raise HostError(f"ssh to {host.address} failed: {_one_line(e.reason)}") from None
        except OSError as e:
            why = _one_line(e.strerror or e)
            raise HostError(f"cannot connect to {host.address}: {why}") from None
        return cls(conn)

    async def run(self, command: str, stdin: bytes | None = None) -> Completed:
        asyncssh = _asyncssh()
        try:
            proc = await self._conn.run(command, input=stdin, encoding=None, check=False)
        except asyncssh.Error as e:
            raise HostError(f"connection lost: {_one_line(e.reason)}") from None
        except OSError as e:
            raise HostError(f"connection lost: {_one_line(e.strerror or e)}") from None
        code = proc.exit_status if proc.exit_status is not None else 255
        return Completed(code, proc.stdout or b"", proc.stderr or b"")

    async def close(self) -> None:
        self._conn.close()
        try:
            await asyncio.wait_for(self._conn.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError):
            pass


def printable(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN``: what a host sends back is untrusted
    and must not drive the user's terminal (escape sequences) or forge table lines."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _one_line(value: Any) -> str:
    return printable(" ".join(str(value).split()))


def _stderr_reason(done: Completed) -> str:
    lines = [ln.strip() for ln in done.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return _one_line(errors[-1][len("error:"):])
    return _one_line(lines[-1]) if lines else "no message"


# --------------------------------------------------------------------------------------------
# Remote steps (every interpolated value is shlex.quote'd)
# --------------------------------------------------------------------------------------------

_PROBE_PY = r"""
import importlib.util, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable,
       "python_ok": sys.version_info >= (3, 9)}
def version(dist):
    try:
        from importlib.metadata import version as v
        return v(dist)
    except Exception:
        return "?"
out["numpy"] = version("numpy") if importlib.util.find_spec("numpy") else None
out["pillow"] = version("pillow") if importlib.util.find_spec("PIL") else None
out["interpreter"] = None
for mod, dist in (("ai_edge_litert", "ai-edge-litert"), ("tflite_runtime", "tflite-runtime"),
                  ("tensorflow", "tensorflow")):
    if importlib.util.find_spec(mod):
        out["interpreter"] = "%s %s" % (mod, version(dist))
        break
print("probe=" + json.dumps(out))
"""

_STATE_SH = (
    'echo "governor=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null)"; '
    'echo "temp=$(cat /sys/class/thermal/thermal_zone0/temp 2>/dev/null)"'
)


def _python_sh(host: Host) -> str:
    """Shell code setting PY: the inventory's python, else ~/edgetl-venv's, else python3."""
    if host.python:
        return f"PY={shlex.quote(host.python)}"
    venv = f'"$HOME"/{DEFAULT_VENV}/bin/python'
    return f"if [ -x {venv} ]; then PY={venv}; else PY=python3; fi"


def _probe_command(host: Host) -> str:
    lib = (
        'if ldconfig -p 2>/dev/null | grep -q libedgetpu.so.1 || ls /usr/lib/*/libedgetpu.so.1 '
        '/usr/lib/libedgetpu.so.1 >/dev/null 2>&1; '
        'then echo libedgetpu=yes; else echo libedgetpu=no; fi'
    )
    return "; ".join([
        _python_sh(host),
        'echo "arch=$(uname -m)"',
        'echo "os=$( (. /etc/os-release && echo "$PRETTY_NAME") 2>/dev/null)"',
        'echo "python_cmd=$PY"',
        _STATE_SH,
        lib,
        'if command -v "$PY" >/dev/null 2>&1; then "$PY" -c ' + shlex.quote(_PROBE_PY)
        + '; else echo python_missing=1; fi',
    ])


def _parse_lines(text: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = printable(value.strip())
    return out


def _state(lines: dict[str, str]) -> dict:
    temp = None
    try:
        temp = int(lines.get("temp", "")) / 1000.0
    except ValueError:
        pass
    return {"governor": lines.get("governor") or None, "temp_c": temp}


async def probe(t: Transport, host: Host) -> dict:
    """Arch, OS, Python, numpy/Pillow, interpreter, libedgetpu, CPU governor and temperature.

    Returns:
        A dict with ``arch``, ``os``, ``python_cmd``, ``python`` (version or None), ``numpy``,
        ``pillow``, ``interpreter`` (``"ai_edge_litert 2.x"`` or None), ``libedgetpu`` (bool),
        ``governor``, ``temp_c``, ``ready`` (the runner can run) and ``problem`` (why not, or None).
    """
    done = await t.run(_probe_command(host))
    lines = _parse_lines(done.stdout)
    info: dict[str, Any] = {
        "arch": lines.get("arch") or None,
        "os": lines.get("os") or None,
        "python_cmd": lines.get("python_cmd") or None,
        "python": None, "numpy": None, "pillow": None, "interpreter": None,
        "libedgetpu": lines.get("libedgetpu") == "yes",
        **_state(lines),
    }
    py = None
    if "probe" in lines:
        try:
            py = json.loads(lines["probe"])
        except json.JSONDecodeError:
            py = None
    if isinstance(py, dict):
        for key in ("python", "numpy", "pillow", "interpreter"):
            value = py.get(key)
            info[key] = printable(str(value)) if value is not None else None
    setup_hint = "run `edgetl fleet setup` for this host, or set python in the inventory"
    if "python_missing" in lines:
        problem = f"python {info['python_cmd']!r} not found on the host; {setup_hint}"
    elif not isinstance(py, dict):
        problem = f"python {info['python_cmd']!r} did not run: {_stderr_reason(done)}"
    elif not py.get("python_ok"):
        problem = f"python {info['python']} is too old; the runner needs Python 3.9 or later"
    elif not info["numpy"] or not info["pillow"] or not info["interpreter"]:
        missing = [n for n, k in (("numpy", "numpy"), ("pillow", "pillow"),
                                  ("a TFLite interpreter (ai-edge-litert)", "interpreter"))
                   if not info[k]]
        problem = f"{info['python_cmd']} lacks {', '.join(missing)}; {setup_hint}"
    elif host.is_coral and not info["libedgetpu"]:
        problem = ("delegate edgetpu but libedgetpu.so.1 is not installed; "
                   "run `edgetl fleet setup` (devices/coral/setup.sh)")
    else:
        problem = None
    info["ready"] = problem is None
    info["problem"] = problem
    return info


async def make_run_dir(t: Transport, host: Host) -> str:
    """A fresh remote folder ``<workdir>/runs/run-XXXXXXXX``; returns its path as mktemp printed."""
    runs = f"{host.workdir.rstrip('/')}/runs"
    template = shlex.quote(runs + "/run-XXXXXXXX")
    done = await t.run(f"mkdir -p -- {shlex.quote(runs)} && mktemp -d {template}")
    path = done.stdout.decode("utf-8", "replace").strip()
    if done.code != 0 or not path.startswith(runs + "/run-") or _CONTROL.search(path):
        raise HostError(f"cannot create a run folder under {runs}: {_stderr_reason(done)}")
    return path


async def upload(t: Transport, run_dir: str, archive: bytes) -> None:
    """Unpack a tar archive (made by ``pack``) into ``run_dir`` on the host."""
    done = await t.run(f"tar -xf - -C {shlex.quote(run_dir)}", stdin=archive)
    if done.code != 0:
        raise HostError(f"copying the bundle failed: {_stderr_reason(done)}")


async def remove(t: Transport, run_dir: str) -> None:
    """Delete the run folder; bounded, and silent on failure (it also runs after a timeout)."""
    try:
        await asyncio.wait_for(t.run(f"rm -rf -- {shlex.quote(run_dir)}"), 15)
    except (asyncio.TimeoutError, HostError, OSError):
        pass


# --------------------------------------------------------------------------------------------
# The bundle that travels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What every host runs.

    Attributes:
        models: local ``.tflite`` paths; on the host model ``i`` lives in ``m<i>/``.
        data: class-folder image set for accuracy (None: latency and memory only).
        labels: labels file for models without edgetl metadata.
        runs: timed runs per model.
        warmup: untimed runs per model.
        threads: interpreter threads (None: the interpreter's default).
        timeout: seconds per host for the whole job, connection included.
        jobs: hosts worked on at the same time.
        keep: leave the remote run folder in place (its path is each row's ``remote_dir``).
    """

    models: tuple[str, ...]
    data: str | None = None
    labels: str | None = None
    runs: int = 200
    warmup: int = 20
    threads: int | None = None
    timeout: float = 900.0
    jobs: int = 8
    keep: bool = False


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _data_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(folder, name)
            rel = p.relative_to(root).as_posix()
            _refuse_control("data file name", rel)
            if p.is_file():
                out.append((rel, p))
    return out


def pack(job: Job) -> bytes:
    """The tar archive every host unpacks: ``m<i>/`` per model (``edgetl bundle``'s files),
    ``data/`` and ``labels.txt`` when given.

    Raises:
        EdgetlError: a model is not a TFLite file.
    """
    from edgetl.bundle import EXECUTABLE, bundle_files

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, model in enumerate(job.models):
            for name, data in sorted(bundle_files(model).items()):
                _add(tar, f"m{i}/{name}", data, 0o755 if name in EXECUTABLE else 0o644)
        if job.data is not None:
            for rel, p in _data_files(Path(job.data)):
                _add(tar, f"data/{rel}", p.read_bytes())
        if job.labels is not None:
            _add(tar, "labels.txt", Path(job.labels).read_bytes())
    return buf.getvalue()


def check_job(job: Job) -> None:
    """Refuse bad settings before any host is contacted (the same checks as ``edgetl bench``).

    Raises:
        EdgetlError: a missing or non-TFLite model, a missing data folder or labels file,
            a bad number, or a file name with a control character.
    """
    from edgetl import bench

    for m in job.models:
        _refuse_control("model path", str(m))
    bench._check_args(list(job.models), job.data, job.labels, job.runs, job.warmup, job.threads,
                      "xnnpack")
    check_limits(job.timeout, job.jobs)


MAX_TIMEOUT = 7 * 24 * 3600
MAX_JOBS = 256


def check_limits(timeout: float, jobs: int) -> None:
    """Refuse a per-host ``timeout`` that is not a finite number of seconds above 0, and
    ``jobs`` below 1.

    Raises:
        EdgetlError: naming the bad value.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise EdgetlError(f"jobs must be at least 1, got {jobs!r}")
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise EdgetlError(f"timeout must be a number of seconds above 0, got {timeout!r}")
    # the OS timers behind subprocess/threading overflow far below 1e30 s
    if timeout > MAX_TIMEOUT:
        raise EdgetlError(f"--timeout {timeout:g} is too long: give at most {MAX_TIMEOUT} s "
                          "(a week)")
    if jobs > MAX_JOBS:
        raise EdgetlError(f"--jobs {jobs} is too many: give at most {MAX_JOBS}")


# --------------------------------------------------------------------------------------------
# Per-host work
# --------------------------------------------------------------------------------------------


def _row(host: Host, model: str | None, info: dict | None, report: dict | None,
         error: str | None, fmt: str | None = None) -> dict:
    machine = (report or {}).get("machine") or {}
    lat = (report or {}).get("latency_ms") or {}
    acc = (report or {}).get("accuracy") or {}
    info = info or {}
    device = machine.get("board") or machine.get("cpu") or info.get("arch")
    return {
        "host": host.name,
        "address": host.address,
        "labels": list(host.labels),
        "device": device,
        "arch": machine.get("machine") or info.get("arch"),
        "os": machine.get("os") or info.get("os"),
        "emulated": machine.get("emulated"),
        "model": Path(model).name if model else None,
        "format": ((report or {}).get("model") or {}).get("mode") or (fmt if model else None),
        "size_bytes": ((report or {}).get("model") or {}).get("size_bytes"),
        "size_mb": (((report or {}).get("model") or {}).get("size_bytes") or 0) / 1e6 or None,
        "top1": acc.get("top1"),
        "top5": acc.get("top5"),
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "p99_ms": lat.get("p99"),
        "mean_ms": lat.get("mean"),
        "throughput_ips": (report or {}).get("throughput_ips"),
        "peak_rss_mb": ((report or {}).get("memory") or {}).get("peak_rss_mb"),
        "threads": (report or {}).get("threads"),
        "delegate": (report or {}).get("delegate") or host.delegate,
        "interpreter": " ".join(str(x) for x in ((report or {}).get("interpreter") or {}).values())
        or info.get("interpreter"),
        "python": machine.get("python") or info.get("python"),
        "governor": info.get("governor"),
        "temp_c": info.get("temp_c"),
        "status": "ok" if error is None else "failed",
        "error": error,
        "report": report,
    }


def _runner_command(host: Host, job: Job, i: int, model: str) -> str:
    from edgetl.bundle import RUNNER_NAME

    args = [f"m{i}/{RUNNER_NAME}", f"m{i}/{Path(model).name}", "--json", f"m{i}/report.json",
            "--quiet", "--runs", str(job.runs), "--warmup", str(job.warmup),
            "--delegate", host.delegate]
    if job.threads is not None:
        args += ["--threads", str(job.threads)]
    if job.data is not None:
        args += ["--data", "data"]
    if job.labels is not None:
        args += ["--labels", "labels.txt"]
    return " ".join(shlex.quote(a) for a in args)


async def _bench_host(host: Host, job: Job, archive: bytes, formats: dict, connect) -> list[dict]:
    t = await connect(host)
    try:
        info = await probe(t, host)
        if not info["ready"]:
            return [_row(host, None, info, None, info["problem"])]
        run_dir = await make_run_dir(t, host)
        rows = []
        try:
            await upload(t, run_dir, archive)
            py = shlex.quote(info["python_cmd"])
            for i, model in enumerate(job.models):
                cmd = f"cd {shlex.quote(run_dir)} && {py} {_runner_command(host, job, i, model)}"
                done = await t.run(cmd)
                state = _state(_parse_lines((await t.run(_STATE_SH)).stdout))
                minfo = {**info, **state}
                if done.code != 0:
                    why = _stderr_reason(done)
                    if done.code != 2:
                        why = f"runner exited with code {done.code}: {why}"
                    rows.append(_row(host, model, minfo, None, why, formats[model]))
                    continue
                got = await t.run(f"cat -- {shlex.quote(f'{run_dir}/m{i}/report.json')}")
                try:
                    report = json.loads(got.stdout.decode("utf-8"))
                    if not isinstance(report, dict) or "latency_ms" not in report:
                        raise ValueError("not a runner report")
                except (ValueError, UnicodeDecodeError) as e:
                    rows.append(_row(host, model, minfo, None, f"unreadable runner report: {e}",
                                     formats[model]))
                    continue
                rows.append(_row(host, model, minfo, report, None, formats[model]))
        finally:
            if not job.keep:
                await remove(t, run_dir)
        for row in rows:  # where to look on the host (relative paths are under its home)
            row["remote_dir"] = run_dir if job.keep else None
        return rows
    finally:
        await t.close()


async def _guarded(host: Host, timeout: float, sem: asyncio.Semaphore, work) -> list[dict] | dict:
    """Runs ``work()`` for one host within ``timeout``; a failure becomes a one-line reason."""
    async with sem:
        try:
            return await asyncio.wait_for(work(), timeout)
        except asyncio.TimeoutError:
            return {"error": f"did not finish within {timeout:.0f} s"}
        except HostError as e:
            return {"error": str(e)}
        except EdgetlError as e:
            return {"error": str(e)}
        except Exception as e:  # one host's surprise must not sink the others
            return {"error": f"{type(e).__name__}: {_one_line(e)}"}


async def _fan_out(hosts: list[Host], timeout: float, jobs: int, work) -> list:
    sem = asyncio.Semaphore(jobs)
    return await asyncio.gather(*(_guarded(h, timeout, sem, lambda h=h: work(h)) for h in hosts))


def _connect_default(host: Host):
    return AsyncsshTransport.connect(host)


def bench(hosts: list[Host], job: Job, connect=None) -> list[dict]:
    """Benchmark ``job.models`` on every host in parallel; one row per (host, model).

    Args:
        hosts: from ``load_inventory`` (``select`` to narrow).
        job: models, data and settings.
        connect: ``async (Host) -> Transport`` (None: asyncssh).

    Returns:
        Rows in inventory order, models in the given order. Each has ``host``, ``address``,
        ``device`` (board, else CPU), ``arch``, ``os``, ``emulated``, ``model``, ``format``,
        ``size_bytes``, ``size_mb``, ``top1``, ``top5``, ``p50_ms``, ``p90_ms``, ``p99_ms``,
        ``mean_ms``, ``throughput_ips`` (batch * 1000 / mean_ms), ``peak_rss_mb``, ``threads``,
        ``delegate``, ``interpreter``, ``python``, ``governor``, ``temp_c`` (after the run; None
        when unreadable), ``status`` (``ok``/``failed``), ``error`` (the one-line reason) and
        ``report`` (the runner's report). A host that fails before its models run gets one row
        with ``model`` None.

    Raises:
        EdgetlError: bad settings (checked before any host is contacted).
    """
    from edgetl.bench import _format_of

    check_job(job)
    archive = pack(job)
    formats = {}
    for m in job.models:  # a property of the file: the same on every host
        try:
            formats[m] = _format_of(Path(m), None)
        except Exception:
            formats[m] = None
    connect = connect or _connect_default
    results = asyncio.run(_fan_out(hosts, job.timeout, job.jobs,
                                   lambda h: _bench_host(h, job, archive, formats, connect)))
    rows: list[dict] = []
    for host, result in zip(hosts, results):
        if isinstance(result, dict):
            rows.append(_row(host, None, None, None, result["error"]))
        else:
            rows.extend(result)
    return rows


async def _check_host(host: Host, connect) -> dict:
    t = await connect(host)
    try:
        return await probe(t, host)
    finally:
        await t.close()


def _check_row(host: Host, result: dict) -> dict:
    info = result if "ready" in result else {}
    error = result.get("error") or info.get("problem")
    keys = ("arch", "os", "python_cmd", "python", "numpy", "pillow", "interpreter",
            "libedgetpu", "governor", "temp_c")
    return {"host": host.name, "address": host.address, "labels": list(host.labels),
            "delegate": host.delegate, **{k: info.get(k) for k in keys},
            "status": "ok" if error is None else "failed", "error": error}


def check(hosts: list[Host], timeout: float = 60.0, jobs: int = 8, connect=None) -> list[dict]:
    """Reachability and environment of every host (nothing is copied or installed).

    Returns:
        One row per host: ``host``, ``address``, ``labels``, ``delegate``, ``arch``, ``os``,
        ``python_cmd``, ``python``, ``numpy``, ``pillow``, ``interpreter``, ``libedgetpu``,
        ``governor``, ``temp_c``, ``status`` and ``error``.
    """
    check_limits(timeout, jobs)
    connect = connect or _connect_default
    results = asyncio.run(_fan_out(hosts, timeout, jobs, lambda h: _check_host(h, connect)))
    return [_check_row(h, r) for h, r in zip(hosts, results)]


def setup_scripts() -> dict[str, Path]:
    """The device set-up scripts of this checkout: ``pi`` and ``coral``.

    Raises:
        EdgetlError: edgetl runs from an install without ``devices/``.
    """
    devices = Path(__file__).resolve().parent.parent / "devices"
    scripts = {"pi": devices / "raspberry-pi" / "setup.sh", "coral": devices / "coral" / "setup.sh"}
    for path in scripts.values():
        if not path.is_file():
            raise EdgetlError(
                f"set-up script not found: {path}; run edgetl from a clone of its repository")
    return scripts


async def _setup_host(host: Host, scripts: dict[str, bytes], connect) -> dict:
    t = await connect(host)
    try:
        info = await probe(t, host)
        if info["ready"]:
            return {**info, "action": "already set up"}
        run_dir = await make_run_dir(t, host)
        try:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for name, data in scripts.items():
                    _add(tar, name, data, 0o755)
            await upload(t, run_dir, buf.getvalue())
            wanted = ["pi-setup.sh"] + (["coral-setup.sh"] if host.is_coral else [])
            for name in wanted:
                # stdin is closed: a sudo that wants a password fails at once instead of waiting
                done = await t.run(f"cd {shlex.quote(run_dir)} && bash ./{name} </dev/null")
                if done.code != 0:
                    why = f"{name} failed (exit {done.code}): {_stderr_reason(done)}"
                    return {**info, "problem": why, "ready": False, "action": "set-up failed"}
        finally:
            await remove(t, run_dir)
        after = await probe(t, host)
        return {**after, "action": "set up"}
    finally:
        await t.close()


def setup(hosts: list[Host], timeout: float = 1800.0, jobs: int = 8, connect=None) -> list[dict]:
    """Run the device set-up script on every host that is not ready (idempotent).

    A host whose Python already has numpy, Pillow and an interpreter (and libedgetpu, for
    ``delegate = "edgetpu"``) is left alone. Otherwise ``devices/raspberry-pi/setup.sh`` (and
    ``devices/coral/setup.sh`` for Coral hosts) runs there: apt packages (root or passwordless
    sudo) and a venv at ``~/edgetl-venv``, which ``bench`` then uses.

    Returns:
        ``check``'s rows plus ``action`` (``already set up``, ``set up``, ``set-up failed``).

    Raises:
        EdgetlError: the set-up scripts are not found locally.
    """
    check_limits(timeout, jobs)
    paths = setup_scripts()
    scripts = {"pi-setup.sh": paths["pi"].read_bytes(),
               "coral-setup.sh": paths["coral"].read_bytes()}
    connect = connect or _connect_default
    results = asyncio.run(
        _fan_out(hosts, timeout, jobs, lambda h: _setup_host(h, scripts, connect)))
    rows = []
    for h, r in zip(hosts, results):
        row = _check_row(h, r)
        row["action"] = r.get("action")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

# (key, text header, markdown header, format)
BENCH_COLUMNS = (
    ("host", "host", "host", "{}"),
    ("device", "device", "device", "{}"),
    ("model", "model", "model", "{}"),
    ("format", "format", "format", "{}"),
    ("size_mb", "size MB", "size (MB)", "{:.2f}"),
    ("p50_ms", "p50 ms", "p50 (ms)", "{:.2f}"),
    ("p90_ms", "p90 ms", "p90 (ms)", "{:.2f}"),
    ("p99_ms", "p99 ms", "p99 (ms)", "{:.2f}"),
    ("throughput_ips", "mean img/s", "images/s (mean)", "{:.1f}"),  # as bench: batch * 1000 / mean
    ("top1", "top-1", "top-1", "{:.2%}"),
    ("peak_rss_mb", "peak RSS MB", "peak RSS (MB)", "{:.1f}"),
    ("threads", "threads", "threads", "{}"),
    ("delegate", "delegate", "delegate", "{}"),
    ("interpreter", "interpreter", "interpreter", "{}"),
    ("governor", "governor", "governor", "{}"),
    ("temp_c", "temp C", "temp (°C)", "{:.1f}"),
    ("status", "status", "status", "{}"),
)
CHECK_COLUMNS = (
    ("host", "host", "host", "{}"),
    ("address", "address", "address", "{}"),
    ("arch", "arch", "arch", "{}"),
    ("os", "OS", "OS", "{}"),
    ("python", "python", "python", "{}"),
    ("interpreter", "interpreter", "interpreter", "{}"),
    ("delegate", "delegate", "delegate", "{}"),
    ("libedgetpu", "libedgetpu", "libedgetpu", "{}"),
    ("governor", "governor", "governor", "{}"),
    ("temp_c", "temp C", "temp (°C)", "{:.1f}"),
    ("status", "status", "status", "{}"),
)
SETUP_COLUMNS = CHECK_COLUMNS[:-1] + (("action", "action", "action", "{}"),) + CHECK_COLUMNS[-1:]
_LEFT = {"host", "device", "model", "format", "address", "arch", "os", "python", "interpreter",
         "delegate", "governor", "status", "libedgetpu", "action"}


def _cell(row: dict, key: str, fmt: str) -> str:
    return printable(_raw_cell(row, key, fmt))


def _raw_cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "status" and row.get("error"):
        return f"failed: {row['error']}"
    if key == "device" and value and row.get("emulated"):
        value = f"{value} (EMULATED)"
    if key == "threads" and value is None and row.get("report"):
        return "default"
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _columns(rows: list[dict], columns) -> list[tuple]:
    has_acc = any(r.get("top1") is not None for r in rows)
    return [c for c in columns if c[0] != "top1" or has_acc]


def format_table(rows: list[dict], columns=BENCH_COLUMNS) -> str:
    """Rows (of ``bench``, ``check`` or ``setup``) as an aligned text table.

    The status column is last: ``ok`` or ``failed: <one-line reason>``. Emulated devices are
    flagged in the device column (their timings are not device latency).
    """
    cols = _columns(rows, columns)
    cells = [[c[1] for c in cols]] + [[_cell(r, c[0], c[3]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    widths[-1] = len(cols[-1][1])  # a long reason does not stretch the rule line
    out = []
    for n, line in enumerate(cells):
        text = "  ".join(v.ljust(w) if c[0] in _LEFT else v.rjust(w)
                         for c, v, w in zip(cols, line, widths))
        out.append(text.rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    if any(r.get("emulated") for r in rows):
        out.append("EMULATED devices: outputs are the device's, timings are not device latency")
    return "\n".join(out)


def format_markdown(rows: list[dict], columns=BENCH_COLUMNS) -> str:
    """Rows as a GitHub-flavoured Markdown table."""
    cols = _columns(rows, columns)

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| " + " | ".join(c[2] for c in cols) + " |"]
    out.append("|" + "|".join("---" if c[0] in _LEFT else "---:" for c in cols) + "|")
    for r in rows:
        out.append("| " + " | ".join(esc(_cell(r, c[0], c[3])) for c in cols) + " |")
    return "\n".join(out) + "\n"


def to_json(rows: list[dict], columns=BENCH_COLUMNS) -> dict:
    """``{"columns": [...], "rows": [row without "report"], "reports": {"host/model": report}}``."""
    return {
        "columns": [c[0] for c in _columns(rows, columns)],
        "rows": [{k: v for k, v in r.items() if k != "report"} for r in rows],
        "reports": {f"{r['host']}/{r['model']}": r["report"] for r in rows if r.get("report")},
    }


def write_json(rows: list[dict], path: str | os.PathLike, columns=BENCH_COLUMNS) -> Path:
    from edgetl.bench import _atomic_write

    return _atomic_write(Path(path), json.dumps(to_json(rows, columns), indent=2) + "\n")


def write_markdown(rows: list[dict], path: str | os.PathLike, columns=BENCH_COLUMNS) -> Path:
    from edgetl.bench import _atomic_write

    return _atomic_write(Path(path), format_markdown(rows, columns))


def failed(rows: list[dict]) -> list[dict]:
    """The rows whose host or model failed."""
    return [r for r in rows if r.get("error")]
