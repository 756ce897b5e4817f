"""Load: one aggregator against 10 to 1,000 simulated nodes over real gRPC with mTLS (``make bench-load``).

Each size gets a fresh federation (``fedmedclip provision``), one aggregator process with
the real adapter size (D = 512, int8, weighted average) and light nodes (:mod:`bench.light_client`:
no learning, the real protocol) spread over a few worker processes, one thread and one TLS channel
per node. Every node registers, then each round long-polls for the round, uploads a valid encoded
adapter (the seeded initial one plus noise) and waits for the next. Concurrency is bounded: in each
worker process at most ``--concurrency`` nodes at a time connect and register, or upload (a long poll
holds no such slot), as a real federation's nodes finish local training at different moments rather
than all in the same millisecond; every node is still connected and long-polling the whole run.

Measured per size, from the aggregator itself: aggregation overhead per round (the aggregator's
``fedmedclip_aggregate_duration_seconds``: validating, decoding and folding every update, publishing
the new global, writing the checkpoint), the wall time of a round (open to publish, which also holds
the nodes' uploads on a shared 2-core machine), the per-update cost (validation, decode and fold of one
update: the ``fold`` step's sum over its count), errors (refused RPCs on the aggregator, failed RPCs on
the nodes) and the aggregator's resident memory (``VmRSS`` once serving, ``VmHWM`` at the end, from
``/proc/<pid>/status``). Writes ``bench/results/load.md`` with the command that made it and whether each
goal of issue 13 is met. Not part of ``make test``.
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


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads so far, summed by thread name (gRPC's own threads are not Python's)."""
    by_name: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        by_name[name] = by_name.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return dict(sorted(by_name.items(), key=lambda kv: -kv[1]))


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


def worker(address: str, pki: Path, node_ids: list[str], concurrency: int, variants: int = 4) -> int:
    """Run ``node_ids`` as light nodes (one thread each) until the run ends, at most ``concurrency`` of them
    connecting, registering or uploading at once; print the errors as JSON."""
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
    busy = threading.BoundedSemaphore(concurrency)
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
            with busy:
                call(node.register, "Register")
            wait_for = 0
            while True:
                info = call(lambda wait_for=wait_for: node.round(wait_for, max_wait_s=20), "GetRound")
                if info.phase in (pb.ROUND_PHASE_FINISHED, pb.ROUND_PHASE_FAILED):
                    return
                if info.phase == pb.ROUND_PHASE_COLLECTING:
                    if not info.update_accepted:
                        with busy:
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


def placement(mode: str) -> tuple[set[int] | None, set[int] | None]:
    """CPU sets of (the aggregator, the light-node workers): ``split`` gives the aggregator the first allowed
    core and the workers the rest, as separate machines would be; ``shared`` lets everything share every core."""
    cores = sorted(os.sched_getaffinity(0))
    if mode == "shared" or len(cores) < 2:
        return None, None
    return {cores[0]}, set(cores[1:])


def _pinned(cpus: set[int] | None):
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def measure(
    n: int, rounds: int, processes: int, concurrency: int, tmp: Path, pin: str = "split", profile: Path | None = None
) -> dict:
    from aggregator.provision import ProvisionConfig, provision
    from bench.light_client import aggregator_args

    agg_cpus, worker_cpus = placement(pin)

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
            *aggregator_args(
                pki,
                out,
                port,
                metrics_port,
                rounds,
                n,
                DIM,
                "--round-timeout-s",
                "600",
                "--linger-s",
                "1",
                "--registration-timeout-s",
                "600",
                "--max-workers",
                str(n + 32),
            ),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_pinned(agg_cpus),
    )
    workers: list[subprocess.Popen] = []
    spy: subprocess.Popen | None = None
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
        if profile is not None:  # py-spy samples the aggregator from the workers' cores (it costs it no CPU)
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--nonblocking",
                    "-r",
                    "50",
                    "-f",
                    "raw",
                    "-o",
                    str(profile),
                    "-p",
                    str(agg.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_pinned(worker_cpus),
            )
        cpu0 = _cpu_s(agg.pid)
        peak_threads = [_proc_kb(agg.pid, "Threads")]
        sampling = threading.Event()

        timeline: list[tuple[float, int, int]] = []

        def sample_threads() -> None:  # the aggregator's thread count (its peak) and resident memory, every 0.2 s
            while not sampling.wait(0.2):
                try:
                    threads_now, rss_now = _proc_kb(agg.pid, "Threads"), _proc_kb(agg.pid, "VmRSS")
                except (OSError, KeyError):
                    return
                peak_threads[0] = max(peak_threads[0], threads_now)
                timeline.append((round(time.perf_counter() - t0, 2), rss_now // 1024, threads_now))

        sampler = threading.Thread(target=sample_threads, daemon=True)
        sampler.start()
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
                        "--concurrency",
                        str(concurrency),
                    ],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                    preexec_fn=_pinned(worker_cpus),
                )
            )
        results = []
        for w in workers:
            stdout, _ = w.communicate(timeout=1200)
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        wall = time.perf_counter() - t0
        cpu = _cpu_s(agg.pid) - cpu0
        sampling.set()
        sampler.join()
        if profile is not None:
            profile.with_suffix(".threads.json").write_text(json.dumps(_thread_cpu(agg.pid), indent=0))
            profile.with_suffix(".timeline.json").write_text(json.dumps(timeline))
            profile.with_suffix(".smaps").write_text(Path(f"/proc/{agg.pid}/smaps").read_text())
        m = _metrics(metrics_port)
        hwm = _proc_kb(agg.pid, "VmHWM")
        rss_end = _proc_kb(agg.pid, "VmRSS")
        report = json.loads((out / "report.json").read_text())
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
        agg.send_signal(signal.SIGTERM)
        try:
            agg.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agg.kill()
        log.close()
    steps = {s: _sum(m, "fedmedclip_aggregate_duration_seconds_sum", step=s) for s in ("fold", "publish", "checkpoint")}
    folds = _sum(m, "fedmedclip_aggregate_duration_seconds_count", step="fold")
    cpu_steps = {s: _sum(m, "fedmedclip_aggregate_cpu_seconds_total", step=s) for s in steps}
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
        "fold_ms_per_update": 1000 * steps["fold"] / max(1.0, folds),
        "close_s": (steps["publish"] + steps["checkpoint"]) / max(1, len(log_rounds)),
        "fold_cpu_s": cpu_steps["fold"] / max(1, len(log_rounds)),
        "fold_cpu_ms_per_update": 1000 * cpu_steps["fold"] / max(1.0, folds),
        "close_cpu_s": (cpu_steps["publish"] + cpu_steps["checkpoint"]) / max(1, len(log_rounds)),
        "round_s": sum(r["seconds"] for r in later) / len(later),
        "round_max_s": max(r["seconds"] for r in later),
        "wall_s": wall,
        "cpu_s": cpu / max(1, len(log_rounds)),
        "cpu_ms_per_node_round": 1000 * cpu / max(1, len(log_rounds)) / n,
        "threads": peak_threads[0],
        "rss_serving_mb": rss_serving / 1024,
        "hwm_serving_mb": hwm_serving / 1024,
        "rss_end_mb": rss_end / 1024,
        "hwm_mb": hwm / 1024,
    }


def _row_at(rows: list[dict], n: int) -> dict | None:
    return next((r for r in rows if r["nodes"] == n), None)


def _goal(text: str, ok: bool | None) -> str:
    return f"{text}: {'not measured' if ok is None else 'met' if ok else 'NOT met'}"


def render(rows: list[dict], rounds: int, processes: int, concurrency: int, command: str, pin: str = "split") -> str:
    agg_cpus, worker_cpus = placement(pin)
    if agg_cpus is None:
        where = (
            f"the aggregator and {processes} worker processes of light nodes share all {os.cpu_count()} cores "
            "(`--pin shared`: the nodes' TLS and protobuf compete with the aggregator for the CPU)"
        )
    else:
        where = (
            f"the aggregator is pinned to core {min(agg_cpus)} and the {processes} worker processes of light nodes "
            f"to core(s) {','.join(str(c) for c in sorted(worker_cpus or ()))} (`--pin split`, sched_setaffinity), as "
            "separate machines would be; other processes of the machine still run anywhere"
        )
    lines = [
        "# Load: one aggregator, many nodes (real gRPC, mTLS)",
        "",
        f"Made by `{command}`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {where}. "
        f"Light nodes: one thread and one TLS channel per node; in each worker at most {concurrency} nodes connect "
        "and register, or upload, at once (bounded concurrency; every node stays connected and long-polls the "
        f"whole run). Adapter D = {DIM} (int8 on the wire, ~0.53 MB per update), weighted average (streaming), "
        f"{rounds} rounds per size. Aggregation overhead = the aggregator's own time per round to validate, "
        "decode and fold every update, publish the global and write the checkpoint "
        "(fedmedclip_aggregate_duration_seconds: wall time, which also holds the folding thread's waits for the "
        "GIL and the core while other calls run). Fold ms / update = that wall time for one update (codec peek, "
        "decode to the sent rows, bounds, fold into the running sums; the SHA-256 is computed as the chunks "
        "arrive, outside it); fold CPU ms / update = the folding thread's own CPU time for it "
        "(fedmedclip_aggregate_cpu_seconds_total). Aggregator CPU = all of the aggregator process's CPU time "
        "(user + system) per round, registrations, TLS, HTTP/2, protobuf and long polls included, and per node "
        "and round. Round wall time (open to publish, rounds 2..) also holds every node's upload over loopback. "
        "Threads: the aggregator's peak thread count (the sync gRPC server holds one per long-polling node). "
        "Memory: the aggregator's VmRSS once serving, and its peak (VmHWM) at the end of the run. Client retries: "
        "transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, e.g. TLS handshakes of hundreds of nodes at once) "
        "retried with backoff and jitter, as a real node does.",
        "",
        "| nodes | rounds | errors | updates accepted | fold ms / update (wall) | fold CPU ms / update | "
        "fold s / round | publish + checkpoint s / round | aggregation overhead s / round (wall) | "
        "aggregation CPU s / round | aggregator CPU s / round | aggregator CPU ms / node / round | "
        "round wall s (mean / max) | threads | RSS serving MB | peak RSS MB | client retries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['rounds']} | {r['errors_nodes'] + int(r['refused'])} | {int(r['accepted'])} | "
            f"{r['fold_ms_per_update']:.2f} | {r['fold_cpu_ms_per_update']:.2f} | {r['fold_s']:.3f} | "
            f"{r['close_s']:.3f} | {r['fold_s'] + r['close_s']:.3f} | {r['fold_cpu_s'] + r['close_cpu_s']:.3f} | "
            f"{r['cpu_s']:.2f} | {r['cpu_ms_per_node_round']:.1f} | "
            f"{r['round_s']:.2f} / {r['round_max_s']:.2f} | {r['threads']} | {r['rss_serving_mb']:.0f} | "
            f"{r['hwm_mb']:.0f} | {r['retries']} |"
        )
    ok = all(r["errors_nodes"] == 0 and r["refused"] == 0 and r["complete"] for r in rows)
    at200, at1000 = _row_at(rows, 200), _row_at(rows, 1000)

    def overhead(r: dict) -> float:
        return r["fold_s"] + r["close_s"]

    def cpu(r: dict) -> str:
        return f"; its CPU time {r['fold_cpu_s'] + r['close_cpu_s']:.2f} s"

    small, big = rows[0], rows[-1]
    per_node = (big["hwm_mb"] - small["hwm_mb"]) / (big["nodes"] - small["nodes"]) if len(rows) > 1 else None
    goals = [
        _goal("no errors", ok),
        _goal(
            "aggregation overhead (wall) <= 0.5 s / round at 200 nodes"
            + (f" ({overhead(at200):.2f} s{cpu(at200)})" if at200 else ""),
            None if at200 is None else overhead(at200) <= 0.5,
        ),
        _goal(
            "<= 2.5 s at 1,000 nodes" + (f" ({overhead(at1000):.2f} s{cpu(at1000)})" if at1000 else ""),
            None if at1000 is None else overhead(at1000) <= 2.5,
        ),
        _goal(
            "round wall time <= 1.5 s at 200 nodes" + (f" ({at200['round_s']:.2f} s mean)" if at200 else ""),
            None if at200 is None else at200["round_s"] <= 1.5,
        ),
        _goal(
            "peak RSS growth <= 0.2 MB per node"
            + (
                f" ({big['hwm_mb'] - small['hwm_mb']:+.0f} MB from {small['nodes']} to {big['nodes']} nodes, "
                f"{per_node:+.3f} MB per node)"
                if per_node is not None
                else ""
            ),
            None if per_node is None else per_node <= 0.2,
        ),
    ]
    lines += ["", "Goals (issue 13): " + "; ".join(goals) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="10,50,200,500,1000", help="comma-separated federation sizes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--processes", type=int, default=4, help="worker processes of light nodes")
    p.add_argument(
        "--concurrency", type=int, default=16, help="nodes per worker process connecting or uploading at once"
    )
    p.add_argument(
        "--pin",
        choices=("split", "shared"),
        default="split",
        help="split: the aggregator on one core, the light nodes on the others (as separate machines); "
        "shared: all of them on every core",
    )
    p.add_argument("--profile", help="a folder: py-spy samples the aggregator (raw stacks, one file per size)")
    p.add_argument("--out", default="bench/results/load.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--pki", help=argparse.SUPPRESS)
    p.add_argument("--node-ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.address, Path(args.pki), args.node_ids.split(","), args.concurrency)
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"bench-load-{n}-") as tmp:
            t0 = time.perf_counter()
            profile = None
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                profile = Path(args.profile).resolve() / f"aggregator-{n}.txt"
            row = measure(n, args.rounds, args.processes, args.concurrency, Path(tmp), args.pin, profile)
            rows.append(row)
            print(f"{n} nodes: {json.dumps(row)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    given = sys.argv[1:] if argv is None else argv
    command = "make bench-load" + (f' ARGS="{" ".join(given)}"' if given else "")
    text = render(rows, args.rounds, args.processes, args.concurrency, command, args.pin)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
