"""Helpers for the service tests: real processes on loopback, free ports, bounded waits, /metrics.

Plain functions and constants only; the fixtures built on them (``pki``, ``partition_dir``,
``reference``) live in tests/conftest.py, so no test module imports another.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def provision_pki(root: Path, nodes: list[str]) -> Path:
    """A federation's startup kits in ``root``, one folder per party (``fedmedclip provision``).

    The CA lies apart, in ``<root>-ca``; every kit holds the CA's certificate as ``ca.pem``.
    """
    from aggregator.provision import ProvisionConfig, provision

    provision(ProvisionConfig(nodes=list(nodes), out=str(root)))
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

    def start(self) -> Proc:
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, *self.args],
            cwd=REPO_ROOT,
            env=service_env() | self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
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
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s; log tail:\n{self.text()[-3000:]}"
            ) from None

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


def start_aggregator_process(
    cluster: Cluster,
    pki: Path,
    out: Path,
    *flags: str,
    name: str = "aggregator",
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    ports: dict[str, int] | None = None,
) -> dict:
    """A real aggregator process with mTLS on free ports, or on ``ports`` (a restart where its nodes expect it;
    ``env`` on top of the suite's); waits until it serves.

    Its endpoints and ports."""
    ports = dict(ports) if ports else {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    endpoints = out / "endpoints.json"
    endpoints.unlink(missing_ok=True)
    # these federations let their first node pin the label space and fingerprint (light clients bring their own);
    # the pinned set-up is what make demo, the testbed and the startup-kit tests run
    proc = cluster.add(
        name,
        [
            "-m",
            "aggregator",
            *aggregator_identity(pki),
            "--trust-first-node",
            "true",
            "--listen",
            f"127.0.0.1:{ports['grpc']}",
            "--health-port",
            str(ports["health"]),
            "--metrics-port",
            str(ports["metrics"]),
            "--out-dir",
            str(out),
            *flags,
        ],
        env=env,
    )
    info = wait_for(
        lambda: read_json(endpoints) or (not proc.alive() and {"dead": True}),
        timeout,
        "the aggregator to serve",
        [proc],
    )
    assert "dead" not in info, proc.text()[-3000:]
    return ports | {"proc": proc, "address": f"127.0.0.1:{ports['grpc']}", "run_id": info["run_id"]}


def tls_of(pki: Path, party: str):
    """A party's certificates as :class:`shared.wire.tls.TlsMaterial` (for in-test clients)."""
    from shared.wire.tls import party_material

    return party_material(pki / party)


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, procs: list[Proc] = (), interval: float = 0.25
):
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


def scrape_or_none(port: int) -> dict[str, list] | None:
    """:func:`scrape`, or None while the endpoint does not answer (for :func:`wait_for`)."""
    try:
        return scrape(port)
    except OSError:
        return None


def updates_accepted(metrics_port: int) -> float:
    """A service's ``fedmedclip_updates_accepted_total`` (0 while its /metrics does not answer)."""
    return total(scrape_or_none(metrics_port) or {}, "fedmedclip_updates_accepted_total")


# --------------------------------------------------------------------------- the small federation
# The real federation that tests/test_services_federation.py and tests/test_faults.py run: an
# aggregator and HOSPITALS trainers (+ the held-out evaluator) on PER_CLASS images per class of the
# brain tumor set, for ROUNDS rounds; ``reference`` (tests/conftest.py) is the in-process simulation
# of the same run.

PER_CLASS = 40
HOSPITALS = 3
ROUNDS = 4
TRAINERS = [f"hospital_{i}" for i in range(1, HOSPITALS + 1)]
ALL_NODES = TRAINERS + ["global"]
START_TIMEOUT = 240.0  # every wait is bounded; first start loads the backbone in 4 processes on 2 cores


def start_aggregator(
    cluster: Cluster,
    pki: Path,
    name: str,
    out: Path,
    port: int,
    health: int,
    metrics: int,
    exit_when_done: bool,
    min_nodes: int = HOSPITALS,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Proc:
    return cluster.add(
        name,
        [
            "-m",
            "aggregator",
            *aggregator_identity(pki),
            "--trust-first-node",
            "true",
            "--listen",
            f"127.0.0.1:{port}",
            "--health-port",
            str(health),
            "--metrics-port",
            str(metrics),
            "--out-dir",
            str(out),
            "--rounds",
            str(ROUNDS),
            "--min-nodes",
            str(min_nodes),
            "--round-timeout-s",
            "120",
            "--linger-s",
            "60",
            "--heartbeat-interval-s",
            "1",
            "--exit-when-done",
            str(exit_when_done).lower(),
            *extra,
        ],
        env=env,
    )


def start_node(
    cluster: Cluster,
    pki: Path,
    partition: Path,
    node: str,
    port: int,
    metrics: int,
    state: Path,
    cache: Path,
    *extra: str,
    identity: str | None = None,
    name: str | None = None,
) -> Proc:
    return cluster.add(
        name or identity or node,
        [
            "-m",
            "hospital_node",
            "run",
            "--config",
            str(partition / f"{node}.yaml"),
            *node_identity(pki, identity or node),
            "--aggregator",
            f"127.0.0.1:{port}",
            "--metrics-port",
            str(metrics),
            "--state-dir",
            str(state / node),
            "--cache-dir",
            str(cache),
            "--threads",
            "1",
            "--progress",
            "false",
            "--retry-max-s",
            "2",
            "--once",
            "true",  # the process ends with the run (``extra`` may say otherwise)
            *extra,
        ],
    )


def finished(report_path: Path, nodes: list[str]):
    """The aggregator's report once the run is over and every node's final evaluation is in, else None."""
    report = read_json(report_path)
    if not report or report.get("phase") != "finished":
        return None
    final = report["history"][-1] if report["history"] else {}
    if final.get("round") != ROUNDS or not all(n in final.get("test_accuracy", {}) for n in nodes):
        return None
    return report


def small_simulation(data_root: Path, feature_cache: Path, **settings) -> dict:
    """The in-process simulation of the small federation (its seed, partition and rounds; ``settings`` on top),
    on one torch thread as each node daemon runs: the report a federation of the small set-up must equal."""
    import torch

    from shared.simulation import SimConfig, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(
            SimConfig(
                data_root=str(data_root),
                per_class=PER_CLASS,
                n_hospitals=HOSPITALS,
                rounds=ROUNDS,
                seed=0,
                cache_dir=str(feature_cache),
                progress=False,
                **settings,
            )
        )
    finally:
        torch.set_num_threads(threads)


def assert_matches_reference(report: dict, ref: dict) -> None:
    """A federation's report equals the in-process simulation's (tolerances: tests/test_services_federation.py)."""
    assert report["best_round"] == ref["best_round"]
    assert len(report["history"]) == len(ref["history"]) == ROUNDS
    for got, want in zip(report["history"], ref["history"]):
        assert got["round"] == want["round"]
        assert math.isclose(got["mean_val_accuracy"], want["mean_val_accuracy"], abs_tol=1e-6)
        for client, acc in want["test_accuracy"].items():
            assert math.isclose(got["test_accuracy"][client], acc, abs_tol=1e-6), (got["round"], client)
        assert math.isclose(got["bytes_up"], want["bytes_up"], rel_tol=1e-3)
        assert math.isclose(got["bytes_down"], want["bytes_down"], rel_tol=1e-3)
    for client, metrics in ref["test"].items():
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert math.isclose(report["test"][client][key], metrics[key], abs_tol=1e-6), (client, key)
        assert math.isclose(report["test"][client]["ece"], metrics["ece"], abs_tol=1e-4)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert math.isclose(report["avg"][key], ref["avg"][key], abs_tol=1e-6)


def backend_outcome(report: dict) -> str:
    """What two simulation backends must agree on, exactly: per-round metrics and bytes, the best round and its
    test metrics."""
    from shared.ops.report import dumps_strict

    report = json.loads(dumps_strict(report))  # as report.json holds it (NaN: null)
    return json.dumps(
        {
            "history": [
                {k: h[k] for k in ("round", "mean_val", "test_accuracy", "test_balanced_accuracy", "bytes_up")}
                | {"keep_ratios": h["keep_ratios"], "bytes_down": h["bytes_down"]}
                for h in report["history"]
            ],
            "best": (report["best_round"], report["best_mean_val"]),
            "test": report["test"],
            "avg": report["avg"],
            "test_heads": report["test_heads"],
        },
        sort_keys=True,
    )


def trainers_only(reference: dict, report: dict) -> dict:
    """The reference without the held-out evaluator, for runs without one (AVG includes the held-out one)."""
    return dict(
        reference,
        test={k: v for k, v in reference["test"].items() if k != "global"},
        avg=report["avg"],
        history=[
            dict(h, test_accuracy={k: v for k, v in h["test_accuracy"].items() if k != "global"})
            for h in reference["history"]
        ],
    )


# --------------------------------------------------------------------------- dashboards and rules
# What tests/test_deploy_prometheus.py (and the compose testbed) evaluate against a live Prometheus.

PROM_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted((REPO_ROOT / "deploy" / "grafana" / "provisioning" / "dashboards").glob("*/*.json"))
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval becomes in the queries


def panel_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard, panel, refId, expr) for every target of every provisioned dashboard."""
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel["targets"]:
                out.append((dash["title"], panel["title"], target["refId"], target["expr"]))
    return out


def rules() -> list[dict]:
    """Every recording and alerting rule of deploy/prometheus/rules/."""
    import yaml

    return [
        r
        for f in sorted((PROM_DIR / "rules").glob("*.yml"))
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
    ]


def show(result: list[dict]) -> str:
    """A Prometheus instant-query result in one short line (for the results table)."""
    parts = []
    for sample in result[:6]:
        labels = ",".join(
            f"{k}={v}"
            for k, v in sorted(sample["metric"].items())
            if k in ("direction", "reason", "node", "hospital", "job")
        )
        value = float(sample["value"][1])
        parts.append(f"{labels + ' ' if labels else ''}{value:.4g}")
    return "; ".join(parts) + (f"; ... ({len(result)} series)" if len(result) > 6 else "")


@contextlib.contextmanager
def in_process_aggregator(out: Path, *, rounds: int, embed_dim: int, node_telemetry=None):
    """The real servicer on a real gRPC server on loopback, in this process, with its round driver.

    Yields ``(engine, stub, telemetry)``; everything is stopped on the way out. With ``node_telemetry``
    (a node's :class:`Telemetry`) the stub counts its traffic as a node does.
    """
    import threading
    from concurrent import futures

    import grpc

    from aggregator.checkpoint import CheckpointStore
    from aggregator.config import AggregatorConfig
    from aggregator.engine import RoundEngine
    from aggregator.service import AggregatorServicer
    from shared.ops.telemetry import CountingClientInterceptor, MetricsInterceptor, Telemetry
    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
    from shared.wire.transport import channel_options, server_options

    cfg = AggregatorConfig(out_dir=str(out), rounds=rounds, min_nodes=2, embed_dim=embed_dim, round_timeout_s=30)
    telemetry = Telemetry("aggregator")
    engine = RoundEngine(cfg, CheckpointStore(out), telemetry)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[MetricsInterceptor(telemetry)],
        options=server_options(),
    )
    pb_grpc.add_AggregatorServiceServicer_to_server(AggregatorServicer(engine, cfg, telemetry, tls=False), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    driver = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    driver.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    calls = channel
    if node_telemetry is not None:
        calls = grpc.intercept_channel(channel, CountingClientInterceptor(node_telemetry.traffic))
    try:
        yield engine, pb_grpc.AggregatorServiceStub(calls), telemetry
    finally:
        engine.stop(stop)
        channel.close()
        server.stop(0).wait()
        driver.join(timeout=5)


def initial_adapter_state(dim: int) -> dict:
    """The initial FAM of method fedmedclip, seed 0, at width ``dim`` (what :func:`in_process_aggregator` serves)."""
    from shared.learning.training import TrainConfig, build_adapter, get_method

    return build_adapter(get_method("fedmedclip"), dim, TrainConfig(), 0).travel_state()


def update_payload(seed: int, dim: int):
    """A valid update for :func:`initial_adapter_state`: it plus seeded noise, on the wire with the default codec."""
    import torch

    from shared.learning.rounds import WireConfig, encode_adapter

    g = torch.Generator().manual_seed(seed)
    base = initial_adapter_state(dim)
    return encode_adapter(
        {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, base, WireConfig()
    )


SMALL_FINGERPRINT = "f" * 64  # the backbone a small in-process federation's nodes state (no backbone is loaded)
SMALL_CLASSES = ["a", "b", "c"]


def register_request(node_id: str, dim: int, **overrides):
    """A trainer's RegisterRequest for a small in-process federation (:func:`initial_adapter_state` at ``dim``)."""
    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
    from shared.wire.protocol import state_digest

    fields = dict(
        node_id=node_id,
        role=pb.NODE_ROLE_TRAINER,
        backbone_fingerprint=SMALL_FINGERPRINT,
        class_names=SMALL_CLASSES,
        embed_dim=dim,
        method="fedmedclip",
        initial_state_sha256=state_digest(initial_adapter_state(dim)),
        num_train_samples=10,
    )
    return pb.RegisterRequest(**(fields | overrides))
