"""Helpers for the service tests: real processes on loopback, free ports, bounded waits, /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def provision_pki(root: Path, nodes: list[str]) -> Path:
    """A federation's certificates and configs in ``root`` (``python -m aggregator provision``)."""
    from aggregator.provision import provision

    provision(root, nodes)
    return root


def aggregator_identity(pki: Path) -> list[str]:
    """Flags that give the aggregator its certificate, the CA and the allow-list."""
    return ["--config", str(pki / "aggregator" / "aggregator.yaml")]


def node_identity(pki: Path, node: str) -> list[str]:
    """Flags that give a node its certificate (CN = node) and the CA."""
    return ["--config", str(pki / node / "node.yaml")]


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of service_env()

    def start(self) -> "Proc":
        handle = self.log.open("ab")
        self.popen = subprocess.Popen([sys.executable, *self.args], cwd=REPO_ROOT, env=service_env() | self.env,
                                      stdout=handle, stderr=subprocess.STDOUT)
        handle.close()
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout}s; log tail:\n{self.text()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode


@dataclass
class Cluster:
    """Processes of one test, always cleaned up (``close`` is registered as a finalizer)."""

    root: Path
    procs: list[Proc] = field(default_factory=list)

    def add(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, self.root / f"{name}.log", env=dict(env or {}))
        self.procs.append(proc)
        return proc.start()

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def start_aggregator_process(cluster: Cluster, pki: Path, out: Path, *flags: str, name: str = "aggregator",
                             timeout: float = 120.0) -> dict:
    """A real aggregator process with mTLS on free ports; waits until it serves. Its endpoints and ports."""
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    endpoints = out / "endpoints.json"
    endpoints.unlink(missing_ok=True)
    proc = cluster.add(name, ["-m", "aggregator", *aggregator_identity(pki), "--listen", f"127.0.0.1:{ports['grpc']}",
                              "--health-port", str(ports["health"]), "--metrics-port", str(ports["metrics"]),
                              "--out-dir", str(out), *flags])
    info = wait_for(lambda: read_json(endpoints) or (not proc.alive() and {"dead": True}), timeout,
                    "the aggregator to serve", [proc])
    assert "dead" not in info, proc.text()[-3000:]
    return ports | {"proc": proc, "address": f"127.0.0.1:{ports['grpc']}", "run_id": info["run_id"]}


def tls_of(pki: Path, party: str):
    """A party's certificates as :class:`shared.wire.tls.TlsMaterial` (for in-test clients)."""
    from shared.wire.tls import party_material

    return party_material(pki / party)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, procs: list[Proc] = (),
             interval: float = 0.25):
    """Poll ``predicate`` until truthy; fail with the logs of ``procs`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tails = "\n".join(f"--- {p.name} ---\n{p.text()[-2500:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def scrape(port: int) -> dict[str, list]:
    """``{sample name: [(labels, value), ...]}`` from a /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {"__families__": []}
    for family in text_string_to_metric_families(text):
        samples["__families__"].append((family.name, family.type))
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))
