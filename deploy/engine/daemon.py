"""The project's own Docker engine: packages, ``dockerd`` in the background, and a full tear-down.

``Engine.up()`` is idempotent: it installs what is missing, starts ``dockerd`` only when it is not
already answering, and returns whether this call started it. ``Engine.down()`` removes every
container, network and volume of the engine, stops ``dockerd`` by its pid (SIGTERM, SIGKILL after a
grace period), then puts back what starting it changed on the host: the netfilter rules and chains
it added (the difference to a snapshot taken before it started), the bridges it made, and the
``ip_forward`` sysctl. Images stay in the data root (the build cache); ``down(purge=True)`` removes
the data root too (a cold start next time).
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = {
    "docker.io": "/usr/sbin/dockerd",
    "docker-compose": "/usr/bin/docker-compose",
    "debootstrap": "/usr/sbin/debootstrap",
    "tini": "/usr/bin/docker-init",
    "iptables": "/usr/sbin/iptables-save",
}
DOCKER = "/usr/bin/docker"  # Debian's client: BuildKit works with it (the one in /usr/local/bin has no buildx)
COMPOSE = "/usr/bin/docker-compose"
SYSCTLS = ("net/ipv4/ip_forward",)  # what dockerd turns on; put back on down


class EngineError(RuntimeError):
    """The engine cannot be brought up or down; the message says why and what to do."""


def say(msg: str) -> None:
    print(f"[engine] {msg}", flush=True)


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass
class Engine:
    """Where the engine lives; every path can be moved with an environment variable."""

    data_root: Path = _env_path("FEDMEDCLIP_ENGINE_DATA_ROOT", "/var/lib/fedmedclip-docker")
    run_dir: Path = _env_path("FEDMEDCLIP_ENGINE_RUN_DIR", "/run/fedmedclip-engine")
    log_dir: Path = _env_path("FEDMEDCLIP_ENGINE_LOG_DIR", "/var/log/fedmedclip-engine")
    start_timeout_s: float = 90.0
    stop_timeout_s: float = 30.0

    # ------------------------------------------------------------------ paths and environment
    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "dockerd.pid"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def log(self) -> Path:
        return self.log_dir / "dockerd.log"

    @property
    def snapshot(self) -> Path:
        """The host's network state before this engine first started (netfilter, links, sysctls)."""
        return self.run_dir / "host-before.json"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for docker and docker-compose: this engine, BuildKit, Debian's client first."""
        env = dict(os.environ if base is None else base)
        env.update(
            DOCKER_HOST=self.host,
            DOCKER_BUILDKIT="1",
            COMPOSE_DOCKER_CLI_BUILD="1",
            PATH="/usr/bin:/usr/sbin:" + env.get("PATH", "/usr/local/bin:/bin:/sbin"),
        )
        env.pop("DOCKER_CONTEXT", None)
        env.pop("DOCKER_TLS_VERIFY", None)
        return env

    def docker(
        self,
        *args: str,
        check: bool = True,
        capture: bool = True,
        timeout: float | None = 300,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess:
        result = subprocess.run([DOCKER, *args], env=self.env(), capture_output=capture, timeout=timeout, input=input)
        if check and result.returncode != 0:
            err = (result.stderr or b"").decode(errors="replace").strip() if capture else ""
            raise EngineError(f"docker {' '.join(args)} failed (exit {result.returncode}): {err}")
        return result

    def docker_out(self, *args: str, timeout: float | None = 120) -> str:
        return self.docker(*args, timeout=timeout).stdout.decode().strip()

    # ------------------------------------------------------------------ state
    def pid(self) -> int | None:
        """The pid of this engine's dockerd when it runs (checked against /proc, not only the pid file)."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return bool(argv) and Path(argv[0].decode()).name == "dockerd" and str(self.data_root).encode() in argv

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            conn = _UnixHTTPConnection(str(self.socket), timeout)
            conn.request("GET", "/_ping")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def running(self) -> bool:
        return self.pid() is not None and self.ping()

    def other_daemons(self) -> list[tuple[int, str]]:
        """dockerd processes that are not this engine's (their bridge docker0 would clash with ours)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                argv
                and argv[0]
                and Path(argv[0].decode(errors="replace")).name == "dockerd"
                and not self._is_ours(int(entry.name))
            ):
                found.append((int(entry.name), " ".join(a.decode(errors="replace") for a in argv if a)))
        return found

    # ------------------------------------------------------------------ up
    def ensure_packages(self) -> None:
        """apt-get install what is missing (Debian's docker.io 20.10, docker-compose 1.29, debootstrap)."""
        if os.geteuid() != 0:
            raise EngineError("the engine needs root (dockerd, debootstrap and apt-get do): run as root or with sudo")
        missing = [pkg for pkg, path in PACKAGES.items() if not Path(path).exists()]
        if not missing:
            return
        if not shutil.which("apt-get"):
            raise EngineError(f"missing {', '.join(missing)} and no apt-get: this engine is for Debian 12 hosts")
        say(f"installing Debian packages: {' '.join(missing)}")
        # nothing may start a system dockerd on /var/lib/docker meanwhile: a policy-rc.d that says no
        policy = Path("/usr/sbin/policy-rc.d")
        made_policy = not policy.exists()
        if made_policy:
            policy.write_text("#!/bin/sh\n# fedmedclip engine: no service starts while packages install\nexit 101\n")
            policy.chmod(0o755)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            t0 = time.monotonic()
            for cmd in (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            ):
                result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                if result.returncode != 0:
                    raise EngineError(
                        f"{' '.join(cmd)} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}"
                    )
            say(f"packages installed in {time.monotonic() - t0:.0f}s")
        finally:
            if made_policy:
                policy.unlink(missing_ok=True)

    def _preflight(self) -> None:
        problems = []
        filesystems = Path("/proc/filesystems").read_text()
        if "overlay" not in filesystems:
            subprocess.run(["modprobe", "overlay"], capture_output=True)
            if "overlay" not in Path("/proc/filesystems").read_text():
                problems.append(
                    "the kernel has no overlay file system (storage driver overlay2); modprobe overlay failed"
                )
        if not Path("/sys/fs/cgroup").is_dir() or not any(Path("/sys/fs/cgroup").iterdir()):
            problems.append("no cgroup hierarchy is mounted at /sys/fs/cgroup")
        others = self.other_daemons()
        if others:
            pid, cmd = others[0]
            problems.append(
                f"another Docker daemon runs (pid {pid}: {cmd}); its bridge docker0 and netfilter chains "
                "would clash with this engine's: stop it first (or use that daemon by hand)"
            )
        if problems:
            raise EngineError("the engine cannot start:\n  - " + "\n  - ".join(problems))

    def _snapshot_host(self) -> None:
        """Record the host's netfilter rules, links and sysctls before dockerd changes them (kept until down)."""
        if self.snapshot.exists():  # an earlier start of this engine was not taken down: its snapshot is older
            return
        state = {
            "netfilter": _iptables_save(),
            "links": _links(),
            "sysctls": {k: Path("/proc/sys", k).read_text().strip() for k in SYSCTLS if Path("/proc/sys", k).exists()},
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot.write_text(json.dumps(state))

    def up(self) -> bool:
        """The engine answering on its socket; True when this call started it."""
        self.ensure_packages()
        if self.running():
            say(f"engine already running (pid {self.pid()}, {self.host})")
            return False
        stale = self.pid()
        if stale is not None:  # alive but not answering: a hung daemon of ours
            raise EngineError(
                f"this engine's dockerd (pid {stale}) runs but does not answer on {self.socket}: "
                f"see {self.log}; `python -m deploy.engine down` stops it"
            )
        self._preflight()
        self._snapshot_host()
        for path in (self.run_dir, self.log_dir, self.data_root):
            path.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        mtu = _uplink_mtu()
        cmd = [
            "/usr/sbin/dockerd",
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            "--host",
            self.host,
            "--storage-driver",
            "overlay2",
            "--log-level",
            "warn",
        ] + (["--mtu", str(mtu)] if mtu else [])
        say(f"starting dockerd: {' '.join(cmd)}")
        with self.log.open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            offset = log.tell()
            env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", ""))
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < self.start_timeout_s:
                if proc.poll() is not None:
                    self._after_stop()  # whatever it set up before it gave up: mounts, rules, socket
                    raise EngineError(self._why_not_started(proc.returncode, offset))
                if self.ping() and self.pid() == proc.pid:
                    say(
                        f"engine up in {time.monotonic() - t0:.1f}s (pid {proc.pid}, data root {self.data_root}, "
                        f"log {self.log}); export DOCKER_HOST={self.host}"
                    )
                    return True
                time.sleep(0.2)
        except BaseException:  # Ctrl-C or SIGTERM while it starts: it must not outlive this call
            if proc.poll() is None:
                _terminate(proc.pid, self.stop_timeout_s)
                self._after_stop()
            raise
        _terminate(proc.pid, 10.0)
        self._after_stop()
        raise EngineError(self._why_not_started(None, offset))

    def _why_not_started(self, code: int | None, offset: int) -> str:
        try:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            text = ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        fatal = [ln for ln in lines if "level=fatal" in ln or "level=error" in ln or "failed to start" in ln]
        hints = []
        joined = "\n".join(lines).lower()
        if "iptables" in joined or "nf_tables" in joined:
            hints.append(
                "netfilter: dockerd could not program iptables (is the iptables package installed and does "
                "the kernel have nf_tables or ip_tables?)"
            )
        if "overlay" in joined and ("not supported" in joined or "driver not supported" in joined):
            hints.append(
                "storage: overlay2 is not supported on the file system under the data root "
                f"({self.data_root}); set FEDMEDCLIP_ENGINE_DATA_ROOT to an ext4/xfs path"
            )
        if "address already in use" in joined or "pid file found" in joined:
            hints.append("another daemon holds this engine's socket or pid file")
        if "cgroup" in joined and "no such file" in joined:
            hints.append("cgroups: the cgroup hierarchy is missing or incomplete")
        what = (
            f"exited with code {code}"
            if code is not None
            else f"did not answer on {self.socket} within {self.start_timeout_s:.0f}s (stopped)"
        )
        return (
            f"dockerd {what}.\n"
            + ("".join(f"  cause: {h}\n" for h in hints))
            + "  daemon log ("
            + str(self.log)
            + "):\n    "
            + "\n    ".join((fatal or lines)[-15:])
        )

    # ------------------------------------------------------------------ down
    def clear(self) -> dict[str, int]:
        """Remove every container, user network and volume of the engine (it must be running)."""
        counts = {}
        ids = self.docker_out("ps", "-aq").split()
        if ids:
            self.docker("rm", "-f", "-v", *ids, timeout=300)
        counts["containers"] = len(ids)
        nets = [n for n in self.docker_out("network", "ls", "-q", "--filter", "type=custom").split()]
        for net in nets:
            self.docker("network", "rm", net, check=False)
        counts["networks"] = len(nets)
        vols = self.docker_out("volume", "ls", "-q").split()
        if vols:
            self.docker("volume", "rm", "-f", *vols, timeout=300)
        counts["volumes"] = len(vols)
        return counts

    def down(self, purge: bool = False) -> None:
        """Nothing of the engine left running; the host's network state as it was before ``up``."""
        pid = self.pid()
        if pid is not None and self.ping():
            counts = self.clear()
            say(
                f"removed {counts['containers']} containers, {counts['networks']} networks, {counts['volumes']} volumes"
            )
        if pid is not None:
            say(f"stopping dockerd (pid {pid})")
            if not _terminate(pid, self.stop_timeout_s):
                say(f"dockerd (pid {pid}) ignored SIGTERM for {self.stop_timeout_s:.0f}s: killed")
        self._after_stop()
        if purge and self.data_root.exists():
            say(f"removing the data root {self.data_root} (images and build cache)")
            shutil.rmtree(self.data_root)
        say("engine down")

    def _after_stop(self) -> None:
        """With dockerd gone: its containerd, mounts, netfilter rules, bridges, sysctls, socket and pid file."""
        self._stop_managed_containerd()
        self._unmount_leftovers()
        restored = self._restore_host()
        if restored:
            say("host network state put back: " + "; ".join(restored))
        for path in (self.socket, self.pidfile):
            path.unlink(missing_ok=True)
        if self.exec_root.exists():
            shutil.rmtree(self.exec_root, ignore_errors=True)

    def _stop_managed_containerd(self) -> None:
        """The containerd dockerd started for itself normally stops with it; one left behind is stopped here."""
        pidfile = self.exec_root / "containerd" / "containerd.pid"
        try:
            pid = int(pidfile.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"containerd" in argv and str(self.exec_root).encode() in argv:
            say(f"stopping dockerd's containerd (pid {pid})")
            _terminate(pid, 15.0)

    def _unmount_leftovers(self) -> None:
        roots = (str(self.data_root), str(self.exec_root))
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(roots)), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)

    def _restore_host(self) -> list[str]:
        try:
            before = json.loads(self.snapshot.read_text())
        except (OSError, ValueError):
            return []
        done = []
        removed = _netfilter_restore(before["netfilter"])
        if removed:
            done.append(removed)
        for link in sorted(set(_links()) - set(before["links"])):
            if link == "docker0" or link.startswith(("br-", "veth")):
                subprocess.run(["ip", "link", "delete", link], capture_output=True)
                done.append(f"link {link} deleted")
        for key, value in before.get("sysctls", {}).items():
            path = Path("/proc/sys", key)
            if path.exists() and path.read_text().strip() != value:
                path.write_text(value + "\n")
                done.append(f"{key.replace('/', '.')} = {value}")
        self.snapshot.unlink(missing_ok=True)
        return done

    def leftovers(self) -> list[str]:
        """What of the engine still exists on the host (empty after a complete ``down``)."""
        left = []
        if self.pid() is not None:
            left.append(f"dockerd pid {self.pid()}")
        if self.socket.exists():
            left.append(f"socket {self.socket}")
        roots = (str(self.data_root), str(self.exec_root))
        left += [
            f"mount {line.split()[1]}"
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(roots)
        ]
        left += [f"link {name}" for name in _links() if name == "docker0" or name.startswith("br-")]
        saved = _iptables_save()
        left += [
            f"netfilter chain {table}/{chain}"
            for table, t in saved.items()
            for chain in t["chains"]
            if chain.startswith("DOCKER")
        ]
        return left

    def status(self) -> dict:
        pid = self.pid()
        info = {
            "running": pid is not None and self.ping(),
            "pid": pid,
            "socket": str(self.socket),
            "data_root": str(self.data_root),
            "log": str(self.log),
        }
        if info["running"]:
            info["containers"] = len(self.docker_out("ps", "-aq").split())
            info["images"] = self.docker_out("images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").splitlines()
        return info


# ---------------------------------------------------------------------- host helpers


def _terminate(pid: int, grace_s: float) -> bool:
    """SIGTERM, wait, SIGKILL; True when it stopped within the grace period."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _uplink_mtu() -> int | None:
    """The MTU of the default route's interface: containers must not send bigger packets than the host can."""
    out = subprocess.run(["ip", "-o", "route", "show", "default"], capture_output=True, text=True).stdout.split()
    if "dev" not in out:
        return None
    dev = out[out.index("dev") + 1]
    try:
        return int(Path(f"/sys/class/net/{dev}/mtu").read_text())
    except (OSError, ValueError):
        return None


def _iptables_save() -> dict[str, dict]:
    """``{table: {"chains": {name: policy}, "rules": [rule, ...]}}`` from iptables-save (empty without it)."""
    if not shutil.which("iptables-save"):
        return {}
    text = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    tables: dict[str, dict] = {}
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            tables[table] = {"chains": {}, "rules": []}
        elif table and line.startswith(":"):
            name, policy = line[1:].split()[:2]
            tables[table]["chains"][name] = policy
        elif table and line.startswith("-A "):
            tables[table]["rules"].append(line[3:])
    return tables


def _is_docker_rule(rule: str) -> bool:
    """A rule dockerd writes: it jumps to or lives in a DOCKER* chain, or names a Docker bridge."""
    return any(mark in rule for mark in ("DOCKER", "docker0", "br-"))


def _netfilter_restore(before: dict[str, dict]) -> str:
    """Delete Docker's rules and DOCKER* chains added since ``before``; built-in chain policies back as they were.

    Only Docker's own: a rule someone else added meanwhile stays.
    """
    now = _iptables_save()
    removed_rules, removed_chains, policies = 0, [], []
    for table, state in now.items():
        old = before.get(table, {"chains": {}, "rules": []})
        keep = collections.Counter(old["rules"])
        for rule in state["rules"]:
            if keep[rule] > 0:
                keep[rule] -= 1
                continue
            if not _is_docker_rule(rule):
                continue
            if subprocess.run(["iptables", "-t", table, "-D", *shlex.split(rule)], capture_output=True).returncode == 0:
                removed_rules += 1
        for chain, policy in state["chains"].items():
            if chain in old["chains"]:
                if policy != "-" and old["chains"][chain] != policy:
                    subprocess.run(["iptables", "-t", table, "-P", chain, old["chains"][chain]], capture_output=True)
                    policies.append(f"{table}/{chain} {old['chains'][chain]}")
            elif policy == "-" and chain.startswith("DOCKER"):  # a chain of Docker's that did not exist before
                subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
                if subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True).returncode == 0:
                    removed_chains.append(f"{table}/{chain}")
            elif policy != "ACCEPT":  # a built-in chain of a table that did not exist: back to the default
                subprocess.run(["iptables", "-t", table, "-P", chain, "ACCEPT"], capture_output=True)
                policies.append(f"{table}/{chain} ACCEPT")
    parts = []
    if removed_rules:
        parts.append(f"{removed_rules} netfilter rules")
    if removed_chains:
        parts.append(f"chains {', '.join(removed_chains)}")
    if policies:
        parts.append(f"policies {', '.join(policies)}")
    return "removed " + "; ".join(parts) if parts else ""


def main_status(engine: Engine) -> int:
    info = engine.status()
    for k, v in info.items():
        if isinstance(v, list):
            print(f"{k}:")
            for item in v:
                print(f"  {item}")
        else:
            print(f"{k}: {v}")
    return 0 if info["running"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m deploy.engine")
