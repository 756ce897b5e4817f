"""A real federation on this machine: the aggregator and N hospital nodes as separate processes.

``python -m deploy.local_federation --out runs/demo --rounds 30`` (``make demo``) partitions the
brain tumor set (``fedmedclip partition``: N training hospitals + the held-out one), starts
``fedmedclip aggregator`` and one ``fedmedclip node run`` per hospital on loopback (free ports picked
at run time), all over mutual TLS with certificates made by ``fedmedclip provision`` into ``<out>/pki``, shows
each node's encoding progress (read from its ``/metrics``) until every node's features are ready, prints
accuracy and bytes per round as the aggregator reports them, leaves ``<out>/aggregator/report.md``
and ``report.json``, and shuts every process down (SIGTERM, then SIGKILL after a grace period),
also on Ctrl-C. These are the same commands the compose testbed runs, one per container.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("fedmedclip.demo")


def fedmedclip_exe() -> str:
    """The ``fedmedclip`` console script of this interpreter's environment (``make venv`` installs it)."""
    exe = Path(sys.executable).with_name("fedmedclip")
    if not exe.is_file():
        raise RuntimeError(
            f"{exe} is missing: install the project into this environment (pip install -e .; make venv does it)"
        )
    return str(exe)


def resolve(argv: list[str]) -> list[str]:
    """``["fedmedclip", ...]`` with the console script's path, ready for :mod:`subprocess`."""
    return [fedmedclip_exe(), *argv[1:]] if argv[:1] == ["fedmedclip"] else list(argv)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Launcher:
    """Starts service processes, logs each to a file, and always stops them all."""

    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
            FEDMEDCLIP_NODE_ONCE="true",  # the demo's nodes end with its run (a real node waits for the next)
        )
        with (self.log_dir / f"{name}.log").open("ab") as handle:
            # own process group: a Ctrl-C in the terminal reaches this launcher only, which then stops
            # the services in order instead of all of them dying at once
            proc = subprocess.Popen(
                resolve(args), cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def stop_all(self, grace_s: float = 15.0) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killing it", name, grace_s)
                proc.kill()
                proc.wait(timeout=10)
        return {name: proc.returncode for name, proc in self.procs.items()}

    def failed(self) -> str | None:
        """Why the run cannot finish, when a service other than ``aggregator`` exited with an error: its name,
        exit code and last log line (a node that stopped at start-up would otherwise leave the aggregator
        waiting for it until the run's timeout)."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if name != "aggregator" and code not in (None, 0):
                lines = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
                last = lines[-1] if lines else "(no output)"
                return f"{name} exited with code {code}: {last}"
        return None


@dataclass(frozen=True)
class EncodeCounts:
    """One node's start-up encoding, as its ``/metrics`` show it (distinct images)."""

    encoded: int
    cached: int
    pending: int

    @property
    def ready(self) -> bool:
        return self.pending == 0 and self.encoded + self.cached > 0


def scrape_encode_counts(port: int, timeout_s: float = 2.0) -> EncodeCounts | None:
    """A node's encoding counts from ``127.0.0.1:<port>/metrics``; None while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fedmedclip_encode_images_total":
                values[sample.labels["source"]] = sample.value
            elif sample.name == "fedmedclip_encode_pending_images":
                values["pending"] = sample.value
    return EncodeCounts(int(values.get("encoded", 0)), int(values.get("cache", 0)), int(values.get("pending", 0)))


@dataclass
class EncodingDisplay:
    """The demo's console while the nodes encode: per node, images encoded of those to encode, and images/s."""

    ports: dict[str, int]  # node -> its metrics port
    counts: dict[str, EncodeCounts | None] = field(default_factory=dict)
    _first: dict[str, tuple[float, int]] = field(default_factory=dict)  # node -> (time, encoded) first seen encoding
    _rate: dict[str, float] = field(default_factory=dict)

    def poll(self) -> None:
        now = time.monotonic()
        for node, port in self.ports.items():
            counts = self.counts[node] = scrape_encode_counts(port)
            if counts is None or counts.encoded + counts.pending == 0:
                continue
            t0, n0 = self._first.setdefault(node, (now, counts.encoded))
            if now > t0 and counts.encoded > n0:
                self._rate[node] = (counts.encoded - n0) / (now - t0)

    @property
    def ready(self) -> bool:
        return all((c := self.counts.get(node)) is not None and c.ready for node in self.ports)

    def _node(self, node: str) -> str:
        c = self.counts.get(node)
        if c is None:
            return f"{node} starting"
        if c.encoded + c.cached == 0 and c.pending == 0:
            return f"{node} loading"
        if c.ready:
            return f"{node} ready ({c.encoded} encoded, {c.cached} cached)"
        rate = self._rate.get(node)
        return f"{node} {c.encoded}/{c.encoded + c.pending} {f'{rate:.1f}' if rate else '-'} img/s"

    def line(self) -> str:
        left = [c.pending / self._rate[n] for n, c in self.counts.items() if c and c.pending and self._rate.get(n)]
        eta = f"  (about {max(left) / 60:.0f} min left)" if left and max(left) >= 60 else ""
        return "encoding: " + " | ".join(self._node(n) for n in self.ports) + eta

    def summary(self, seconds: float) -> str:
        """The last line of the display (every node ready, or the rounds began without one)."""
        head = "features ready" if self.ready else "rounds began"
        return f"{head} after {seconds:.0f}s: " + " | ".join(self._node(n) for n in self.ports)


def _fmt(value: float | None) -> str:
    """An accuracy for the round table; a metric not reported (null in the strict-JSON report) is "-"."""
    return "-" if value is None else f"{value:.4f}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def node_names(hospitals: int, holdout: bool = True) -> list[str]:
    """The node ids ``fedmedclip partition`` writes configs for: the trainers, then the held-out one."""
    return [f"hospital_{i}" for i in range(1, hospitals + 1)] + (["global"] if holdout else [])


def partition_command(
    out: str,
    *,
    hospitals: int,
    seed: int,
    alpha: float | None,
    per_class: int | None,
    holdout: bool = True,
    data: str | None = None,
) -> list[str]:
    """The command that writes every hospital's manifest and node config."""
    cmd = [
        "fedmedclip",
        "partition",
        "--hospitals",
        str(hospitals),
        "--seed",
        str(seed),
        "--alpha",
        str(alpha if alpha is not None else 0),
        "--out",
        out,
    ]
    if data:
        cmd += ["--data", data]
    if per_class:
        cmd += ["--per-class", str(per_class)]
    if not holdout:
        cmd += ["--holdout", "false"]
    return cmd


def provision_command(
    pki_dir: str,
    nodes: list[str],
    *,
    aggregator_hosts: str = "localhost",
    classes_file: str | None = None,
    evaluators: tuple[str, ...] = ("global",),
    ca_dir: str | None = None,
    runtime: str = "auto",
) -> list[str]:
    """The command that writes the federation's CA and every party's startup kit.

    ``classes_file`` (a partition's ``classes.txt``) pins the label space and the backbone fingerprint
    in the aggregator's config, so no node can set them by registering first. ``runtime``: the image tower
    runtime written into every node's kit (``torch`` where any node runs on a GPU).
    """
    cmd = [
        "fedmedclip",
        "provision",
        "--nodes",
        ",".join(nodes),
        "--out",
        pki_dir,
        "--aggregator-host",
        aggregator_hosts,
    ]
    held_out = [n for n in evaluators if n in nodes]
    if held_out:
        cmd += ["--evaluators", ",".join(held_out)]
    cmd += ["--classes-file", classes_file] if classes_file else []
    cmd += ["--runtime", runtime] if runtime != "auto" else []
    return cmd + (["--ca-dir", ca_dir] if ca_dir else [])


def identity_args(pki_dir: str | None, party: str) -> list[str]:
    """A party's certificate config (``pki_dir/<party>/<party or node>.yaml``), or ``--insecure`` without one."""
    if pki_dir is None:
        return ["--insecure"]
    return ["--config", f"{pki_dir}/{party}/{'aggregator' if party == 'aggregator' else 'node'}.yaml"]


def service_commands(
    nodes: list[str],
    *,
    min_nodes: int,
    rounds: int,
    codec: str,
    seed: int,
    threads: int,
    partition_dir: str,
    out_dir: str,
    cache_dir: str,
    listen: str,
    aggregator_address: str,
    health_port: int,
    metrics_port: int,
    node_metrics_ports: dict[str, int],
    extra_aggregator: tuple[str, ...] = (),
    extra_node: tuple[str, ...] = (),
    pki_dir: str | None = None,
) -> dict[str, list[str]]:
    """The command of every service of a federation, by service name.

    ``make demo`` runs exactly these on loopback (host paths, free ports); ``deploy/compose.yaml`` runs
    exactly these, one per container (container paths, fixed ports), and a test holds the two together.
    Paths are joined with ``/`` so container paths can be asked for from any host. ``pki_dir``: the
    folder :func:`provision_command` wrote (mTLS); None runs plaintext (``--insecure``, loud warnings).
    """
    commands = {
        "aggregator": [
            "fedmedclip",
            "aggregator",
            *identity_args(pki_dir, "aggregator"),
            "--listen",
            listen,
            "--health-port",
            str(health_port),
            "--metrics-port",
            str(metrics_port),
            "--out-dir",
            f"{out_dir}/aggregator",
            "--rounds",
            str(rounds),
            "--min-nodes",
            str(min_nodes),
            "--codec",
            codec,
            "--seed",
            str(seed),
            "--round-timeout-s",
            "300",
            "--linger-s",
            "60",
            *extra_aggregator,
        ]
    }
    for node in nodes:
        commands[node] = [
            "fedmedclip",
            "node",
            "run",
            "--config",
            f"{partition_dir}/{node}.yaml",
            *identity_args(pki_dir, node),
            "--aggregator",
            aggregator_address,
            "--metrics-port",
            str(node_metrics_ports[node]),
            "--state-dir",
            f"{out_dir}/nodes/{node}",
            "--cache-dir",
            cache_dir,
            "--threads",
            str(threads),
            "--progress",
            "false",
            *extra_node,
        ]
    return commands


def run_federation(
    out: Path,
    *,
    hospitals: int = 3,
    rounds: int = 30,
    per_class: int | None = None,
    alpha: float | None = 0.5,
    seed: int = 0,
    codec: str = "int8",
    holdout: bool = True,
    cache_dir: str = ".cache/features",
    timeout_s: float = 1800.0,
    threads: int = 1,
    quiet: bool = False,
    extra_aggregator: tuple[str, ...] = (),
    extra_node: tuple[str, ...] = (),
    tls: bool = True,
    progress_every_s: float = 5.0,
    runtime: str = "auto",
) -> dict:
    """Run one federation to the end; returns the aggregator's report (raises on failure or timeout).

    ``tls=False`` runs plaintext (``--insecure``): no certificates, loud warnings in every log. ``runtime``:
    every node's image tower runtime (in its kit, or on its command line without one).
    """
    if not tls and runtime != "auto":
        extra_node = (*extra_node, "--runtime", runtime)
    out = out.resolve()
    partition_dir = out / "partition"
    cmd = resolve(
        partition_command(
            str(partition_dir), hospitals=hospitals, seed=seed, alpha=alpha, per_class=per_class, holdout=holdout
        )
    )
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL if quiet else None)
    nodes = node_names(hospitals, holdout)
    pki = out / "pki"
    if tls:
        subprocess.run(
            resolve(
                provision_command(str(pki), nodes, classes_file=str(partition_dir / "classes.txt"), runtime=runtime)
            ),
            cwd=REPO_ROOT,
            check=True,
            stdout=subprocess.DEVNULL if quiet else None,
        )
    port = free_port()
    launcher = Launcher(out / "logs")
    agg_out = out / "aggregator"
    report_path = agg_out / "report.json"
    shown = 0
    node_metrics_ports = {node: free_port() for node in nodes}
    commands = service_commands(
        nodes,
        min_nodes=hospitals,
        rounds=rounds,
        codec=codec,
        seed=seed,
        threads=threads,
        partition_dir=str(partition_dir),
        out_dir=str(out),
        cache_dir=cache_dir,
        listen=f"127.0.0.1:{port}",
        aggregator_address=f"127.0.0.1:{port}",
        health_port=free_port(),
        metrics_port=free_port(),
        node_metrics_ports=node_metrics_ports,
        extra_aggregator=extra_aggregator,
        extra_node=extra_node,
        pki_dir=str(pki) if tls else None,
    )
    try:
        started = time.monotonic()
        for name, argv in commands.items():
            launcher.start(name, argv)
        # until every node's features are ready: its encoding progress every progress_every_s
        progress = None if quiet else EncodingDisplay(node_metrics_ports)
        next_line = started + progress_every_s
        if not quiet:
            print(
                f"aggregator on 127.0.0.1:{port} ({f'mTLS, certificates in {pki}' if tls else 'PLAINTEXT'}); "
                f"{len(nodes)} nodes; logs in {launcher.log_dir}",
                flush=True,
            )
        deadline = time.monotonic() + timeout_s
        aggregator = launcher.procs["aggregator"]
        while True:
            finished = aggregator.poll() is not None
            # a round's row appears once every trainer has evaluated it (the held-out evaluator may lag
            # behind, e.g. while it still encodes its images: its accuracy shows when it has reported)
            history = (_read_json(report_path) or {}).get("history", [])
            if progress is not None:
                progress.poll()
                now = time.monotonic()
                if progress.ready or finished or (history and history[0].get("complete")):
                    print(progress.summary(now - started), flush=True)
                    print(
                        f"{'round':>5}  {'mean val acc':>12}  {'up KB':>8}  {'down KB':>8}  {'seconds':>7}  "
                        "test accuracy",
                        flush=True,
                    )
                    progress = None
                elif now >= next_line:
                    print(progress.line(), flush=True)
                    next_line = now + progress_every_s
            while shown < len(history) and history[shown].get("complete"):
                h = history[shown]
                if not quiet:
                    tests = "  ".join(f"{k} {_fmt(v)}" for k, v in h["test_accuracy"].items())
                    print(
                        f"{h['round']:>5}  {_fmt(h['mean_val_accuracy']):>12}  {(h['bytes_up'] or 0) / 1e3:>8.1f}  "
                        f"{(h['bytes_down'] or 0) / 1e3:>8.1f}  {h['seconds'] or 0:>7.3f}  {tests}",
                        flush=True,
                    )
                shown += 1
            if finished:
                break
            failure = launcher.failed()
            if failure is not None:
                raise RuntimeError(f"federation failed: {failure} (logs in {launcher.log_dir})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the federation did not finish within {timeout_s:.0f}s")
            time.sleep(0.5)
        codes = launcher.stop_all()
    except BaseException:
        launcher.stop_all()
        raise
    report = _read_json(report_path) or {}
    if codes.get("aggregator") != 0 or report.get("phase") != "finished":
        raise RuntimeError(f"federation failed: exit codes {codes}; see {launcher.log_dir}")
    return report


def kit_runtime(runtime: str, device: str) -> str:
    """The runtime the demo writes into every kit for nodes on ``device``: as asked on the CPU; on a GPU what the
    nodes resolve there (``auto``: torch), and a BackboneError for the CPU-only onnxruntime. Every node must run
    the runtime behind the federation's pinned fingerprint, so the kits name the GPU's."""
    if device == "cpu":
        return runtime
    from shared.backbone import BackboneSpec, resolve_runtime

    return resolve_runtime(BackboneSpec(runtime=runtime), device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.local_federation", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--per-class", type=int, default=None, help="stratified subset (default: the whole set)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default="int8")
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC without certificates (tests only)")
    p.add_argument(
        "--dp-epsilon", type=float, default=None, help="differential privacy: every hospital's epsilon budget"
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="secure aggregation: the aggregator sees only the sum of the updates (needs mTLS)",
    )
    from shared.backbone import RUNTIMES, BackboneError  # the one list (provision checks against it too)

    p.add_argument(
        "--runtime",
        default="auto",
        choices=RUNTIMES,
        help="every node's image tower runtime: auto (ONNX Runtime with --device cpu, torch on a GPU), torch, "
        "onnxruntime (CPU only)",
    )
    p.add_argument("--device", default="cpu", help="where the nodes encode and train: cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        runtime = kit_runtime(args.runtime, args.device)
    except (BackboneError, RuntimeError) as exc:  # RuntimeError: torch does not know the device
        p.error(f"--runtime {args.runtime} --device {args.device}: {exc}")
    secure = ("--secure-aggregation", "true") if args.secure_aggregation else ()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if (out / "aggregator" / "checkpoint").exists():
        import shutil

        shutil.rmtree(out)  # a demo starts a new run; the services themselves would resume the old one
    # Ctrl-C (even when started from a shell that ignores SIGINT in background jobs) and SIGTERM unwind
    # the launcher, which then stops every service
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_federation(
            out,
            hospitals=args.hospitals,
            rounds=args.rounds,
            per_class=args.per_class,
            alpha=args.alpha if args.alpha > 0 else None,
            seed=args.seed,
            codec=args.codec,
            cache_dir=args.cache_dir,
            timeout_s=args.timeout_s,
            tls=not args.insecure,
            extra_aggregator=secure,
            extra_node=(("--dp-epsilon", str(args.dp_epsilon)) if args.dp_epsilon is not None else ())
            + secure
            + (("--device", args.device) if args.device != "cpu" else ()),
            runtime=runtime,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: every service was stopped", file=sys.stderr)
        return 130
    report_md = out / "aggregator" / "report.md"
    print()
    print(report_md.read_text())
    print(f"report: {report_md} and {report_md.with_suffix('.json')}; logs: {out / 'logs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
