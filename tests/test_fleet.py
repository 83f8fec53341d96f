"""edgetl fleet against a loopback fleet: real SSH servers (asyncssh) that run real commands.

Each "device" is an SSH server on a 127.0.0.x address with its own host key and home folder; a
command arrives over SSH and runs as ``/bin/sh -c COMMAND`` in that home (tar, mktemp, python and
the runner all really run). The client is edgetl's own transport, checking host keys against a
known_hosts file the test writes. One port is closed (a dead device), one server presents a host
key that known_hosts does not list. Traffic goes to loopback only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import asyncssh  # a dependency of edgetl (fleet's transport); its server plays the devices
import pytest

from edgetl import bench as B
from edgetl import fleet as F
from edgetl.errors import EdgetlError
from conftest import coral


ROOT = Path(__file__).resolve().parents[1]
V1 = "mobilenet_v1_0.25_128_quant.tflite"
PHOTOS = {"bird.bmp": "chickadee", "cat.bmp": "Egyptian cat",
          "grace_hopper.bmp": "military uniform"}
COMMAND_TIMEOUT = 300  # seconds a served command may run before the server kills it



# --------------------------------------------------------------------------------------------
# The loopback fleet
# --------------------------------------------------------------------------------------------


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True  # authentication required: the client key (authorized_client_keys)

    def password_auth_supported(self) -> bool:
        return False


async def _pump(reader, write, limit: float) -> None:
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), limit)
        if not chunk:
            return
        write(chunk)


def _executor(home: Path):
    """A process factory that runs the requested command for real, in ``home``."""

    async def handle(process) -> None:
        env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "LANG": "C.UTF-8"}
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", process.command or "true", cwd=home, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)

        async def feed() -> None:
            try:
                while True:
                    chunk = await process.stdin.read(65536)
                    if not chunk:
                        break
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError, asyncssh.Error):
                pass
            finally:
                proc.stdin.close()

        feeder = asyncio.ensure_future(feed())
        try:
            await asyncio.wait_for(asyncio.gather(
                _pump(proc.stdout, process.stdout.write, COMMAND_TIMEOUT),
                _pump(proc.stderr, process.stderr.write, COMMAND_TIMEOUT),
                proc.wait()), COMMAND_TIMEOUT)
            code = proc.returncode
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            code = 124
        feeder.cancel()
        process.exit(code)

    return handle


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Fleet:
    """SSH servers on loopback in a background event loop; stopped by ``close``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []
        client = asyncssh.generate_private_key("ssh-ed25519")
        self.identity = root / "id_ed25519"
        client.write_private_key(str(self.identity))
        self.identity.chmod(0o600)
        self.client_public = client.export_public_key().decode()
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text("")
        self.homes: dict[str, Path] = {}

    def _call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def device(self, name: str, address: str, trusted: bool = True) -> int:
        """Start one device; known_hosts lists its host key (``trusted``) or another key."""
        home = self.root / "homes" / name
        home.mkdir(parents=True)
        self.homes[name] = home
        key = asyncssh.generate_private_key("ssh-ed25519")
        listed = key if trusted else asyncssh.generate_private_key("ssh-ed25519")
        port = _free_port(address)
        authorized = asyncssh.import_authorized_keys(self.client_public)

        async def start():
            return await asyncssh.listen(
                address, port, server_factory=_Server, server_host_keys=[key],
                authorized_client_keys=authorized, process_factory=_executor(home),
                encoding=None, allow_scp=False, agent_forwarding=False, x11_forwarding=False)

        self.servers.append(self._call(start()))
        public = listed.export_public_key().decode().split()
        with self.known_hosts.open("a") as f:
            f.write(f"[{address}]:{port} {public[0]} {public[1]}\n")
        return port

    def close(self) -> None:
        async def stop():
            for s in self.servers:
                s.close()
                await s.wait_closed()

        try:
            self._call(stop(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    f = Fleet(root)
    try:
        f.ports = {
            "pi4-a": f.device("pi4-a", "127.0.0.1"),
            "pi5-b": f.device("pi5-b", "127.0.0.2"),
            "pi-alias": f.device("pi-alias", "127.0.0.3"),
            "stranger": f.device("stranger", "127.0.0.1", trusted=False),
        }
        f.dead = _free_port("127.0.0.4")  # nothing listens there
        f.ssh_config = root / "ssh_config"
        f.ssh_config.write_text(
            f"Host pi-alias\n  HostName 127.0.0.3\n  Port {f.ports['pi-alias']}\n"
            f"  IdentityFile {f.identity}\n")
        yield f
    finally:
        f.close()


def inventory(fleet: Fleet, path: Path, extra: str = "") -> Path:
    py = json.dumps(sys.executable)
    path.write_text(f"""\
[defaults]
identity = {json.dumps(str(fleet.identity))}
known_hosts = {json.dumps(str(fleet.known_hosts))}
ssh_config = {json.dumps(str(fleet.ssh_config))}
python = {py}

[hosts.pi4-a]
host = "127.0.0.1"
port = {fleet.ports['pi4-a']}
labels = ["pi4", "live"]

[hosts.pi5-b]
host = "127.0.0.2"
port = {fleet.ports['pi5-b']}
labels = ["pi5", "live"]

[hosts.pi-alias]  # everything else from ssh_config
labels = ["live"]

[hosts.dead]
host = "127.0.0.4"
port = {fleet.dead}

[hosts.stranger]
host = "127.0.0.1"
port = {fleet.ports['stranger']}

[hosts.no-python]
host = "127.0.0.2"
port = {fleet.ports['pi5-b']}
python = "/nonexistent/python3"
{extra}""")
    return path


def edgetl(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=os.environ.get("HOME", "/root"))
    return subprocess.run([sys.executable, "-m", "edgetl.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for photo, label in PHOTOS.items():
        (root / label).mkdir()
        shutil.copy(coral(photo), root / label / photo)
    return root


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_fleet_bench_merges_live_hosts_and_names_each_failure(fleet, photos, tmp_path):
    hosts = inventory(fleet, tmp_path / "fleet.toml")
    labels = coral("imagenet_labels.txt")
    out = tmp_path / "fleet.json"
    md = tmp_path / "fleet.md"
    proc = edgetl("fleet", "bench", coral(V1), "--hosts", hosts, "--data", photos, "--labels",
                  labels, "--runs", 3, "--warmup", 1, "--threads", 1, "--json", out,
                  "--markdown", md, "--timeout", 300)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 3 of 6 rows failed"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout

    rows = {r["host"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["pi4-a", "pi5-b", "pi-alias", "dead", "stranger", "no-python"]
    local = B.bench([coral(V1)], data=photos, labels=labels, runs=3, warmup=1, threads=1)[0]
    reports = json.loads(out.read_text())["reports"]
    for name in ("pi4-a", "pi5-b", "pi-alias"):
        r = rows[name]
        assert r["status"] == "ok" and r["error"] is None, r
        assert r["model"] == V1 and r["size_bytes"] == coral(V1).stat().st_size
        assert r["top1"] == local["top1"] and r["top5"] == local["top5"]
        assert r["threads"] == 1 and r["delegate"] == "xnnpack"
        assert r["interpreter"].startswith(local["interpreter"])
        remote = reports[f"{name}/{V1}"]
        here = local["report"]["accuracy"]
        assert remote["accuracy"]["confusion_matrix"] == here["confusion_matrix"]
        assert remote["accuracy"]["per_class"] == here["per_class"]
        assert remote["model"]["op_counts"] == local["report"]["model"]["op_counts"]
        assert r["p50_ms"] > 0 and r["throughput_ips"] > 0 and r["peak_rss_mb"] > 0
    assert "connection refused" in rows["dead"]["error"] and "127.0.0.4" in rows["dead"]["error"]
    assert "host key" in rows["stranger"]["error"] and "known_hosts" in rows["stranger"]["error"]
    assert "never accepts" in rows["stranger"]["error"]
    assert "'/nonexistent/python3' not found" in rows["no-python"]["error"]
    assert all(rows[h]["model"] is None and rows[h]["status"] == "failed"
               for h in ("dead", "stranger", "no-python"))

    table = proc.stdout
    for name in rows:
        assert name in table
    assert "failed: connection refused by 127.0.0.4" in table
    assert f"{local['top1']:.2%}" in table
    assert md.read_text().count("\n") == 2 + len(rows)
    # the remote run folders are gone; the stranger never ran anything
    for name in ("pi4-a", "pi5-b", "pi-alias"):
        assert list((fleet.homes[name] / ".edgetl-fleet" / "runs").iterdir()) == []
    assert list(fleet.homes["stranger"].iterdir()) == []
    # no key material in what was written
    secret = fleet.identity.read_text().splitlines()[1]
    assert secret not in out.read_text() + md.read_text() + proc.stdout + proc.stderr


def test_fleet_bench_exit_0_when_all_succeed_and_odd_names_are_quoted(fleet, tmp_path):
    hosts = inventory(fleet, tmp_path / "fleet.toml")
    odd = tmp_path / "my model $(touch PWNED); 'x'.tflite"
    shutil.copy(coral(V1), odd)
    out = tmp_path / "fleet.json"
    proc = edgetl("fleet", "bench", odd, "--hosts", hosts, "--only", "pi4", "--runs", 2,
                  "--warmup", 0, "--timeout", 300, "--keep", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["host", "device", "model"]
    assert len(lines) == 3 and lines[2].startswith("pi4-a") and lines[2].rstrip().endswith("ok")
    assert not list(fleet.root.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    [row] = json.loads(out.read_text())["rows"]
    kept = fleet.homes["pi4-a"] / row["remote_dir"]  # --keep: the run folder stays, as shipped
    assert (kept / "m0" / odd.name).read_bytes() == odd.read_bytes()
    assert json.loads((kept / "m0" / "report.json").read_text())["model"]["size_bytes"] == \
        odd.stat().st_size
    shutil.rmtree(kept)


def _pinned_wheels() -> str:
    """As tests/test_emulate.py: the host's LiteRT and numpy, so both sides run the same build."""
    from importlib import metadata

    parts = []
    for dist in ("ai-edge-litert", "numpy"):
        try:
            parts.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(dist)
    return " ".join(parts + ["pillow"])


@pytest.mark.slow
def test_fleet_bench_on_an_emulated_pi_matches_the_host_and_is_flagged(fleet, photos, tmp_path):
    pi_sh = ROOT / "devices" / "emulate" / "pi.sh"
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("the emulated Raspberry Pi needs Linux and bash")
    env = dict(os.environ, EDGETL_PI_PIP=_pinned_wheels())
    env.setdefault("EDGETL_PIP", f"{sys.executable} -m pip")
    setup = subprocess.run(["bash", str(pi_sh), "--setup"], env=env, capture_output=True,
                           text=True, timeout=1800)
    if setup.returncode == 3:
        pytest.skip(f"no emulated Raspberry Pi here: {setup.stderr.strip().splitlines()[-1]}")
    assert setup.returncode == 0, setup.stderr
    sysroot = os.environ.get("EDGETL_PI_SYSROOT") or str(Path.home() / ".cache/edgetl/pi-sysroot")
    # the "device"'s python3 is the emulated Pi's (its home differs from ours: pass the cache)
    wrapper = fleet.homes["pi5-b"] / "pi4-python3"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"EDGETL_PI_SYSROOT={shlex.quote(sysroot)} "
        f"EDGETL_PI_PIP={shlex.quote(env['EDGETL_PI_PIP'])} "
        f"exec bash {shlex.quote(str(pi_sh))} --quiet --pi 4 --python \"$@\"\n")
    wrapper.chmod(0o755)
    hosts = inventory(fleet, tmp_path / "fleet.toml", extra=f"""
[hosts.emulated-pi4]
host = "127.0.0.2"
port = {fleet.ports['pi5-b']}
python = "{wrapper}"
labels = ["emu"]
""")
    out = tmp_path / "fleet.json"
    proc = edgetl("fleet", "bench", coral(V1), "--hosts", hosts, "--only", "emu", "--only", "pi4",
                  "--data", photos, "--labels", coral("imagenet_labels.txt"), "--runs", 2,
                  "--warmup", 0, "--threads", 1, "--json", out, "--timeout", 900, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    rows = {r["host"]: r for r in json.loads(out.read_text())["rows"]}
    reports = json.loads(out.read_text())["reports"]
    emu, live = rows["emulated-pi4"], rows["pi4-a"]
    assert emu["emulated"] == "qemu cortex-a72" and emu["arch"] == "aarch64"
    assert live["emulated"] is None
    assert emu["top1"] == live["top1"] and emu["top5"] == live["top5"]
    assert reports[f"emulated-pi4/{V1}"]["accuracy"]["confusion_matrix"] == \
        reports[f"pi4-a/{V1}"]["accuracy"]["confusion_matrix"]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("emulated-pi4"))
    assert "(EMULATED)" in line
    assert "timings are not device latency" in proc.stdout


def test_fleet_check_reports_environment_and_alias_from_ssh_config(fleet, tmp_path):
    hosts = inventory(fleet, tmp_path / "fleet.toml")
    out = tmp_path / "check.json"
    proc = edgetl("fleet", "check", "--hosts", hosts, "--json", out, "--timeout", 60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: 3 of 6 hosts failed: dead: connection refused")
    rows = {r["host"]: r for r in json.loads(out.read_text())["rows"]}
    import platform

    for name in ("pi4-a", "pi5-b", "pi-alias"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["arch"] == platform.machine() and r["python"] == platform.python_version()
        assert r["interpreter"].startswith("ai_edge_litert ") and r["numpy"] and r["pillow"]
    assert rows["pi-alias"]["address"] == "pi-alias"
    # check copies nothing
    assert not (fleet.homes["pi5-b"] / ".edgetl-fleet").exists() or \
        list((fleet.homes["pi5-b"] / ".edgetl-fleet" / "runs").iterdir()) == []


def test_fleet_setup_leaves_ready_hosts_alone(fleet, tmp_path):
    hosts = inventory(fleet, tmp_path / "fleet.toml")
    rows = F.setup(F.select(F.load_inventory(hosts), ["live"]), timeout=120)
    assert [r["action"] for r in rows] == ["already set up"] * 3
    assert [r["status"] for r in rows] == ["ok"] * 3


def test_a_coral_host_without_libedgetpu_is_refused_before_running(fleet, tmp_path):
    hosts = inventory(fleet, tmp_path / "fleet.toml", extra=f"""
[hosts.coral]
host = "127.0.0.1"
port = {fleet.ports['pi4-a']}
delegate = "edgetpu"
labels = ["pi5", "coral"]
""")
    rows = F.bench(F.select(F.load_inventory(hosts), ["coral"]),
                   F.Job(models=(str(coral(V1)),), runs=1, warmup=0, timeout=120))
    if rows[0]["status"] == "ok":  # pragma: no cover - a machine with a Coral runtime
        pytest.skip("libedgetpu is installed here")
    assert len(rows) == 1 and "libedgetpu.so.1 is not installed" in rows[0]["error"]


def test_without_any_known_hosts_file_the_host_is_refused_not_trusted(fleet, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/known_hosts, no ~/.ssh/config
    host = F.Host(name="pi4-a", host="127.0.0.1", port=fleet.ports["pi4-a"],
                  identity=str(fleet.identity), python=sys.executable)
    [row] = F.check([host], timeout=30)
    assert row["status"] == "failed" and "is not in known_hosts" in row["error"]
    assert f"ssh -p {fleet.ports['pi4-a']} 127.0.0.1" in row["error"]
    assert not (tmp_path / ".ssh").exists()  # nothing was written on the user's behalf


def test_what_a_hostile_host_prints_cannot_drive_the_terminal(fleet, tmp_path):
    evil = fleet.homes["pi4-a"] / "evil-python"
    evil.write_text("#!/bin/sh\n"
                    "printf 'error: \\033]0;owned\\007\\033[2J boom\\nFORGED\\033[0m' >&2\n"
                    "exit 1\n")
    evil.chmod(0o755)
    hosts = inventory(fleet, tmp_path / "fleet.toml", extra=f"""
[hosts.evil]
host = "127.0.0.1"
port = {fleet.ports['pi4-a']}
python = "{evil}"
""")
    proc = edgetl("fleet", "check", "--hosts", hosts, "--only", "evil", timeout=120)
    assert proc.returncode == 1
    assert "\x1b" not in proc.stdout + proc.stderr and "\x07" not in proc.stdout + proc.stderr
    assert "did not run: \\x1b]0;owned\\x07\\x1b[2J boom" in proc.stdout  # escaped, on its row
    assert "FORGED" not in proc.stdout  # a second line never becomes a row
    assert len(proc.stdout.splitlines()) == 3 and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("flag, value, expected", [
    ("--timeout", "nan", "timeout must be a number of seconds above 0, got nan"),
    ("--timeout", "0", "timeout must be a number of seconds above 0, got 0.0"),
    ("--jobs", "0", "jobs must be at least 1, got 0"),
])
def test_bad_limits_are_refused(tmp_path, flag, value, expected):
    hosts = tmp_path / "fleet.toml"
    hosts.write_text('[hosts.a]\nhost = "127.0.0.4"\nport = 9\n')
    for command in ("check", "setup"):
        proc = edgetl("fleet", command, "--hosts", hosts, flag, value, timeout=60)
        assert proc.returncode == 2 and proc.stderr == f"error: {expected}\n", proc.stderr


def test_a_key_the_host_does_not_authorize_is_an_authentication_failure(fleet, tmp_path):
    other = tmp_path / "id_other"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(other))
    other.chmod(0o600)
    host = F.Host(name="pi4-a", host="127.0.0.1", port=fleet.ports["pi4-a"], user="pi",
                  identity=str(other), known_hosts=str(fleet.known_hosts),
                  ssh_config=str(fleet.ssh_config), python=sys.executable)
    [row] = F.check([host], timeout=30)
    assert row["status"] == "failed"
    assert row["error"].startswith(f"authentication failed for pi@127.0.0.1:{fleet.ports['pi4-a']}")


def test_a_host_that_hangs_gets_its_timeout_as_reason(fleet, tmp_path):
    slow = fleet.homes["pi5-b"] / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 8\n")
    slow.chmod(0o755)
    hosts = inventory(fleet, tmp_path / "fleet.toml", extra=f"""
[hosts.slow]
host = "127.0.0.2"
port = {fleet.ports['pi5-b']}
python = "{slow}"
""")
    rows = F.check(F.select(F.load_inventory(hosts), ["slow", "pi4-a"]), timeout=2)
    assert [r["host"] for r in rows] == ["pi4-a", "slow"]
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "did not finish within 2 s"


@pytest.mark.parametrize("body, expected", [
    ('[hosts.a]\nhost = "x"\npassword = "hunter2"\n', "password is not supported"),
    ('[hosts.a]\nhots = "x"\n', "unknown key 'hots'"),
    ('[hosts.a]\nport = 70000\n', "port must be a number from 1 to 65535, got 70000"),
    ('[hosts."a\\nb"]\nhost = "x"\n', "control character"),
    ('[hosts."a;rm"]\nhost = "x"\n', "may hold only letters"),
    ('[hosts.a]\npython = "py\\u0007"\n', "contains a control character"),
    ('[hosts.a]\ndelegate = "gpu"\n', "unknown delegate 'gpu'"),
    ('[defaults]\nuser = "pi"\n', "no hosts"),
    ('[hosts.a\n', "is not a valid TOML inventory"),
])
def test_bad_inventory_is_one_line_exit_2(tmp_path, body, expected):
    hosts = tmp_path / "fleet.toml"
    hosts.write_text(body)
    with pytest.raises(EdgetlError) as e:
        F.load_inventory(hosts)
    assert expected in str(e.value)
    proc = edgetl("fleet", "check", "--hosts", hosts, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr
    assert "hunter2" not in proc.stderr


def test_bad_job_is_refused_before_any_host_is_contacted(tmp_path):
    hosts = tmp_path / "fleet.toml"
    hosts.write_text('[hosts.a]\nhost = "127.0.0.4"\nport = 9\n')
    odd = tmp_path / "a\nb.tflite"
    shutil.copy(coral(V1), odd)
    proc = edgetl("fleet", "bench", odd, "--hosts", hosts, timeout=60)
    assert proc.returncode == 2 and "control character" in proc.stderr, proc.stderr
    proc = edgetl("fleet", "bench", tmp_path / "missing.tflite", "--hosts", hosts, timeout=60)
    assert proc.returncode == 2 and "model file not found" in proc.stderr
    proc = edgetl("fleet", "bench", coral(V1), "--hosts", hosts, "--only", "pi9", timeout=60)
    assert proc.returncode == 2 and "--only pi9 matches no host" in proc.stderr
