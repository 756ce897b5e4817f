"""Load: one aggregator against 10, 50 and 200 simulated nodes over real gRPC with mTLS (``make bench-load``).

Each size gets a fresh federation (``fedmedclip provision``), one aggregator process with
the real adapter size (D = 512, int8, weighted average) and light nodes (:mod:`bench.light_client`:
no learning, the real protocol) spread over a few worker processes, one thread and one TLS channel
per node. Every node registers, then each round long-polls for the round, uploads a valid encoded
adapter (the seeded initial one plus noise) and waits for the next.

Measured per size, from the aggregator itself: aggregation overhead per round (the aggregator's
``fedmedclip_aggregate_duration_seconds``: validating, decoding and folding every update, publishing
the new global, writing the checkpoint), the wall time of a round (open to publish, which also holds
the nodes' uploads on a shared 2-core machine), errors (refused RPCs on the aggregator, failed RPCs on
the nodes) and the aggregator's resident memory (``VmRSS`` once serving, ``VmHWM`` at the end, from
``/proc/<pid>/status``). Writes ``bench/results/load.md``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from deploy.local_federation import resolve

REPO_ROOT = Path(__file__).resolve().parents[1]
DIM = 512


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in metrics.items() if n == name and all((k, w) in lab for k, w in labels.items()))


# --------------------------------------------------------------------------- worker: light nodes


def worker(address: str, pki: Path, node_ids: list[str], variants: int = 4) -> int:
    """Run ``node_ids`` as light nodes (one thread each) until the run ends; print the errors as JSON."""
    import random

    import torch

    from bench.light_client import Federation, LightNode, encode, perturbed
    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
    from shared.wire.tls import party_material
    from shared.wire.transport import Backoff, call_with_retry

    torch.set_num_threads(1)
    fed = Federation(embed_dim=DIM)
    initial = fed.initial_state()
    payloads = [encode(perturbed(initial, 0.01, seed=s), initial) for s in range(variants)]
    errors: list[str] = []
    uploads, retries = [0], [0]
    lock = threading.Lock()
    backoff = Backoff(0.5, 5.0, give_up_after_s=300)  # as a real node: transient failures are retried

    def retried(_exc) -> None:
        with lock:
            retries[0] += 1

    def run(i: int, node_id: str) -> None:
        node = LightNode(address, node_id, party_material(pki / node_id), fed, num_train=100 + i, timeout_s=60)
        rng = random.Random(i)

        def call(fn, what):
            return call_with_retry(fn, what, backoff, rng, on_retry=retried)

        try:
            call(node.register, "Register")
            wait_for = 0
            while True:
                info = call(lambda wait_for=wait_for: node.round(wait_for, max_wait_s=20), "GetRound")
                if info.phase in (pb.ROUND_PHASE_FINISHED, pb.ROUND_PHASE_FAILED):
                    return
                if info.phase == pb.ROUND_PHASE_COLLECTING:
                    if not info.update_accepted:
                        call(lambda info=info: node.upload(payloads[i % variants], info.round_id), "UploadUpdate")
                        with lock:
                            uploads[0] += 1
                    wait_for = info.round_id + 1
        except Exception as exc:  # noqa: BLE001 - every failure is a result of the benchmark
            with lock:
                errors.append(f"{node_id}: {type(exc).__name__} {exc}")
        finally:
            node.close()

    threads = [threading.Thread(target=run, args=(i, n), daemon=True) for i, n in enumerate(node_ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"errors": errors, "uploads": uploads[0], "retries": retries[0]}), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def measure(n: int, rounds: int, processes: int, tmp: Path) -> dict:
    from aggregator.provision import ProvisionConfig, provision

    node_ids = [f"node_{i:04d}" for i in range(1, n + 1)]
    pki = tmp / "pki"
    provision(ProvisionConfig(nodes=node_ids, out=str(pki)))
    out, port, metrics_port = tmp / "agg", _free_port(), _free_port()
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO_ROOT)
    )
    log = (tmp / "aggregator.log").open("wb")
    agg = subprocess.Popen(
        [
            *resolve(["fedmedclip"]),
            "aggregator",
            "--trust-first-node",
            "true",  # light nodes
            "--config",
            str(pki / "aggregator" / "aggregator.yaml"),
            "--listen",
            f"127.0.0.1:{port}",
            "--health-port",
            "0",
            "--metrics-port",
            str(metrics_port),
            "--out-dir",
            str(out),
            "--rounds",
            str(rounds),
            "--min-nodes",
            str(n),
            "--embed-dim",
            str(DIM),
            "--round-timeout-s",
            "600",
            "--linger-s",
            "1",
            "--registration-timeout-s",
            "600",
            "--exit-when-done",
            "false",
            "--max-workers",
            str(n + 32),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    workers: list[subprocess.Popen] = []
    try:
        end = time.monotonic() + 120
        while not (out / "endpoints.json").exists():
            if agg.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"aggregator did not start; see {tmp / 'aggregator.log'}")
            time.sleep(0.2)
        time.sleep(0.5)
        rss_serving = _proc_kb(agg.pid, "VmRSS")
        hwm_serving = _proc_kb(agg.pid, "VmHWM")
        per = [node_ids[i::processes] for i in range(min(processes, n))]
        cpu0 = _cpu_s(agg.pid)
        t0 = time.perf_counter()
        for ids in per:
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.load",
                        "--worker",
                        "--address",
                        f"127.0.0.1:{port}",
                        "--pki",
                        str(pki),
                        "--node-ids",
                        ",".join(ids),
                    ],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        results = []
        for w in workers:
            stdout, _ = w.communicate(timeout=900)
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        wall = time.perf_counter() - t0
        cpu = _cpu_s(agg.pid) - cpu0
        m = _metrics(metrics_port)
        hwm = _proc_kb(agg.pid, "VmHWM")
        rss_end = _proc_kb(agg.pid, "VmRSS")
        report = json.loads((out / "report.json").read_text())
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        agg.send_signal(signal.SIGTERM)
        try:
            agg.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agg.kill()
        log.close()
    steps = {s: _sum(m, "fedmedclip_aggregate_duration_seconds_sum", step=s) for s in ("fold", "publish", "checkpoint")}
    log_rounds = report["rounds_log"]
    later = log_rounds[1:] or log_rounds  # round 1 waits for the registrations' tail
    return {
        "nodes": n,
        "rounds": len(log_rounds),
        "complete": len(log_rounds) == rounds,
        "errors_nodes": sum(len(r["errors"]) for r in results),
        "error_samples": [e for r in results for e in r["errors"]][:5],
        "refused": _sum(m, "fedmedclip_requests_rejected_total"),
        "uploads": sum(r["uploads"] for r in results),
        "retries": sum(r["retries"] for r in results),
        "accepted": _sum(m, "fedmedclip_updates_accepted_total"),
        "fold_s": steps["fold"] / max(1, len(log_rounds)),
        "close_s": (steps["publish"] + steps["checkpoint"]) / max(1, len(log_rounds)),
        "round_s": sum(r["seconds"] for r in later) / len(later),
        "round_max_s": max(r["seconds"] for r in later),
        "wall_s": wall,
        "cpu_s": cpu / max(1, len(log_rounds)),
        "rss_serving_mb": rss_serving / 1024,
        "hwm_serving_mb": hwm_serving / 1024,
        "rss_end_mb": rss_end / 1024,
        "hwm_mb": hwm / 1024,
    }


def render(rows: list[dict], rounds: int, processes: int) -> str:
    lines = [
        "# Load: one aggregator, many nodes (real gRPC, mTLS)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; the "
        f"aggregator and {processes} worker processes of light nodes (one thread and one TLS channel per node) "
        f"share the cores. Adapter D = {DIM} (int8 on the wire, ~0.53 MB per update), weighted average "
        f"(streaming), {rounds} rounds per size. Aggregation overhead = the aggregator's own time per round to "
        "validate, decode and fold every update, publish the global and write the checkpoint "
        "(fedmedclip_aggregate_duration_seconds, wall time on the shared cores). Aggregator CPU = all of the "
        "aggregator process's CPU time per round (TLS, protobuf, registration and long polls included). "
        "Client retries: transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, e.g. TLS handshakes of hundreds of "
        "nodes at once on a saturated CPU) retried with backoff and jitter, as a real node does. "
        "Round wall time (open to publish, rounds 2..) also holds every "
        "node's upload over loopback. Memory: the aggregator's VmRSS once serving, and its peak (VmHWM) at the "
        "end of the run.",
        "",
        "| nodes | rounds | errors | updates accepted | fold s / round | publish + checkpoint s / round | "
        "aggregation overhead s / round | aggregator CPU s / round | round wall s (mean / max) | RSS serving MB | "
        "peak RSS MB | client retries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['rounds']} | {r['errors_nodes'] + int(r['refused'])} | {int(r['accepted'])} | "
            f"{r['fold_s']:.3f} | {r['close_s']:.3f} | {r['fold_s'] + r['close_s']:.3f} | {r['cpu_s']:.2f} | "
            f"{r['round_s']:.2f} / {r['round_max_s']:.2f} | {r['rss_serving_mb']:.0f} | {r['hwm_mb']:.0f} | "
            f"{r['retries']} |"
        )
    big = rows[-1]
    overhead = big["fold_s"] + big["close_s"]
    growth = rows[-1]["hwm_mb"] - rows[0]["hwm_mb"]
    ok = all(r["errors_nodes"] == 0 and r["refused"] == 0 and r["complete"] for r in rows)
    lines += [
        "",
        f"Goals: no errors: {'met' if ok else 'NOT met'}; at most 2 s of aggregation overhead per round at "
        f"{big['nodes']} nodes: {overhead:.2f} s, {'met' if overhead <= 2.0 else 'NOT met'}; peak RSS flat in the "
        f"number of nodes: {growth:+.0f} MB from {rows[0]['nodes']} to {big['nodes']} nodes "
        f"({growth / rows[0]['hwm_mb']:+.1%}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="10,50,200", help="comma-separated federation sizes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--processes", type=int, default=4, help="worker processes of light nodes")
    p.add_argument("--out", default="bench/results/load.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--pki", help=argparse.SUPPRESS)
    p.add_argument("--node-ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.address, Path(args.pki), args.node_ids.split(","))
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"bench-load-{n}-") as tmp:
            t0 = time.perf_counter()
            row = measure(n, args.rounds, args.processes, Path(tmp))
            rows.append(row)
            print(f"{n} nodes: {json.dumps(row)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    text = render(rows, args.rounds, args.processes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
