"""What secure aggregation costs against the plain mode (``make bench-secagg``): one aggregator process and
N light nodes over real gRPC with mTLS on loopback, the real adapter (D = 512), N = 4, 20, 100.

For each size the bench provisions one federation (for the largest N), then, per mode, starts a fresh
aggregator process (``python -m aggregator``) and drives N light nodes (:mod:`bench.light_client`, one thread
and one TLS channel each, all in this process) through 3 rounds:

* plain: each node waits for the round (GetRound), fetches the published global (FetchGlobal) and uploads
  its update (the global plus Gaussian noise) in the aggregator's default codec, int8;
* secure: the same, but the update goes through secure aggregation (:meth:`LightNode.secure_round`: the node
  daemon's own session code, :mod:`hospital_node.secure`): keys, shares, masked input, unmasking.

Measured per (N, mode), over rounds 2..R (round 1 also holds the first calls' set-up): the round's wall time
as the aggregator logs it (open to publish) and as the bench sees it, the message bytes of every RPC per node
and round (the aggregator's ``traffic`` tally), the adapter payload per node, the RPCs per node and round
(counted at the client, by method), the node's masking time (``NodeSession.mask``) and the aggregator's
unmasking time (``fedmedclip_aggregate_duration_seconds{step="unmask"}``). Under secure aggregation the
bench also checks round 1: the aggregator's published global must be exactly the one the sum of the nodes'
ring inputs gives, and that average must equal the float64 weighted average of the nodes' updates within
the round's error bound. Writes ``bench/results/secagg.md``, ``.json`` and ``.png``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIM = 512
NOISE = 0.01  # standard deviation of a node's update around the global (what a round of training looks like)
NUM_TRAIN = 100  # every node states the same count: equal weights
LONG_POLL_S = 20.0  # as the node daemon (hospital_node config long_poll_s)
MODES = ("plain", "secure")


# --------------------------------------------------------------------------- instrumentation


class Probe:
    """What the light nodes of one run record: RPCs by node, round and method (client side), the times each
    node saw a round open and close, its CPU time for the round's protocol work, its masking time, and per
    secure session the ring sum of the inputs it masked (the verification recomputes the unmasked sum)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tag: dict[str, object] = {}  # node -> the round its calls count for ("setup", r, "end")
        self.calls: defaultdict[tuple[str, object, str], int] = defaultdict(int)
        self.opened: defaultdict[int, dict[str, float]] = defaultdict(dict)  # round -> node -> perf_counter
        self.closed: defaultdict[int, dict[str, float]] = defaultdict(dict)
        self.cpu: defaultdict[int, dict[str, float]] = defaultdict(dict)  # round -> node -> thread CPU s
        self.mask: list[dict] = []  # {node, round, session, wall_s, cpu_s}
        self.ring_sums: dict[str, object] = {}  # session -> uint32 sum of the masked nodes' ring inputs
        self.ring_nodes: defaultdict[str, set[str]] = defaultdict(set)
        self.unmask: dict[int, tuple[float, float]] = {}  # round -> (sum, count) of the unmask histogram after it
        self.polls: list[tuple[str, object, int, int, int, float]] = []  # SecAggPoll answers: node, tag, round,
        # phase, message bytes, perf_counter

    def count(self, node: str, method: str) -> None:
        with self.lock:
            self.calls[(node, self.tag.get(node), method)] += 1


class CountingStub:
    """A light node's stub that counts each call (retries included: each is a real RPC) for :class:`Probe`."""

    def __init__(self, stub, node: str, probe: Probe) -> None:
        self._stub, self._node, self._probe = stub, node, probe

    def __getattr__(self, method: str):
        fn = getattr(self._stub, method)

        def call(*args, **kwargs):
            self._probe.count(self._node, method)
            response = fn(*args, **kwargs)
            if method == "SecAggPoll":  # which phase each answer carried, and its size (the phases' timeline)
                st = response.state
                with self._probe.lock:
                    self._probe.polls.append(
                        (
                            self._node,
                            self._probe.tag.get(self._node),
                            st.round_id,
                            st.phase,
                            response.ByteSize(),
                            time.perf_counter(),
                        )
                    )
            return response

        return call


def timed_uploader(probe: Probe, round_id: int):
    """A :class:`SecureUploader` factory whose sessions time ``NodeSession.mask`` and add the input they
    mask to the session's ring sum (what the aggregator must unmask to)."""
    import numpy as np

    from hospital_node.secure import SecureUploader
    from shared.secagg import NodeSession

    class TimedSession(NodeSession):
        def mask(self, vector, members):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = super().mask(vector, members)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            with probe.lock:
                probe.mask.append(
                    {"node": self.node, "round": round_id, "session": self.session, "wall_s": wall, "cpu_s": cpu}
                )
                if self.node not in probe.ring_nodes[self.session]:
                    total = probe.ring_sums.get(self.session)
                    vec = np.asarray(vector, dtype=np.uint32)
                    probe.ring_sums[self.session] = vec.copy() if total is None else total + vec  # wraps mod 2^32
                    probe.ring_nodes[self.session].add(self.node)
            return out

    class TimedUploader(SecureUploader):
        def new_session(self, session):
            return TimedSession(self.node, session, self.signer, self.link.tls.cert, self.link.tls.ca)

    return TimedUploader


class Globals:
    """The published globals, decoded once per round and shared by every node thread (each node still
    fetches the payload itself, as a real node does)."""

    def __init__(self, initial, wire) -> None:
        self.lock = threading.Lock()
        self.decoded = {0: initial}
        self.wire = wire

    def get(self, r: int, node) -> dict:
        if r == 0:  # version 0 is the seeded initial adapter every node builds itself
            return self.decoded[0]
        header, data = node.fetch(r)
        with self.lock:
            if r not in self.decoded:
                from shared.learning.rounds import decode_adapter

                self.decoded[r] = decode_adapter(data, header.sha256, self.decoded[r - 1], self.wire).tensors
            return self.decoded[r]


# --------------------------------------------------------------------------- aggregator process


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def start_aggregator(pki: Path, out: Path, n: int, mode: str, rounds: int, log_path: Path) -> tuple:
    from bench.light_client import aggregator_args
    from bench.load import _free_port

    port, metrics_port = _free_port(), _free_port()
    cmd = [
        sys.executable,
        "-m",
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
            "300",
            "--secagg-phase-timeout-s",
            "120",
            # every long-polling node holds a server worker (64 by default): 2N + 32 keeps N long polls under the
            # overload mark (0.75 of the workers), where health would say NOT_SERVING (nothing is refused there)
            "--max-workers",
            str(2 * n + 32),
        ),
    ] + (["--secure-aggregation", "true"] if mode == "secure" else [])
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO)
    )
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, f"127.0.0.1:{port}", metrics_port, cmd


def _wait_serving(proc: subprocess.Popen, out: Path, log_path: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not (out / "endpoints.json").exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"the aggregator did not start:\n{_tail(log_path)}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- one (N, mode)


def _wait_round(node, r: int):
    """GetRound long polls until round ``r`` collects (or the run ended)."""
    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb

    while True:
        info = node.round(r, max_wait_s=LONG_POLL_S)
        if info.phase in (pb.ROUND_PHASE_FINISHED, pb.ROUND_PHASE_FAILED):
            return info
        if info.phase == pb.ROUND_PHASE_COLLECTING and info.round_id >= r:
            return info


def update_of(reference: dict, r: int, i: int) -> dict:
    from bench.light_client import perturbed

    return perturbed(reference, NOISE, seed=1000 * r + i)


def measure(n: int, mode: str, rounds: int, pki: Path, tmp: Path, run_timeout_s: float) -> dict:
    from bench.light_client import Federation, LightNode, encode
    from bench.load import _metrics, _sum
    from hospital_node.secure import adapter_encoder
    from shared.learning.rounds import WireConfig
    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
    from shared.wire.tls import party_material

    fed = Federation(embed_dim=DIM)
    initial = fed.initial_state()
    names = [f"node_{i:03d}" for i in range(1, n + 1)]
    out, log_path = tmp / f"agg-{n}-{mode}", tmp / f"aggregator-{n}-{mode}.log"
    probe = Probe()
    globals_ = Globals(initial, WireConfig(codec="int8"))
    errors: dict[str, str] = {}
    proc, address, metrics_port, cmd = start_aggregator(pki, out, n, mode, rounds, log_path)
    nodes: dict[str, LightNode] = {}
    t_start = time.perf_counter()
    try:
        _wait_serving(proc, out, log_path)
        for name in names:
            node = LightNode(address, name, party_material(pki / name), fed, num_train=NUM_TRAIN, timeout_s=120.0)
            node.stub = CountingStub(node.stub, name, probe)
            probe.tag[name] = "setup"
            node.register(secure_aggregation=(mode == "secure"))
            nodes[name] = node

        def unmask_metrics(r: int) -> None:
            m = _metrics(metrics_port)
            probe.unmask[r] = (
                _sum(m, "fedmedclip_aggregate_duration_seconds_sum", step="unmask"),
                _sum(m, "fedmedclip_aggregate_duration_seconds_count", step="unmask"),
            )

        def one(i: int, name: str) -> None:
            node = nodes[name]
            try:
                for r in range(rounds):
                    probe.tag[name] = r
                    info = _wait_round(node, r)
                    if info.round_id != r or info.phase != pb.ROUND_PHASE_COLLECTING:
                        raise RuntimeError(f"expected round {r + 1} to collect, got {info}")
                    if r > 0 and mode == "plain":  # the plain node learns that round r - 1 closed here
                        probe.closed[r - 1][name] = time.perf_counter()
                    probe.opened[r][name] = time.perf_counter()
                    reference = globals_.get(r, node)
                    update = update_of(reference, r, i)  # the "training": not timed as protocol work
                    c0 = time.thread_time()
                    if mode == "plain":
                        payload = encode(update, reference)
                        node.upload(payload, r)
                    else:
                        encoder = adapter_encoder(name, update, reference, drop_masked_rows=True)
                        if not node.secure_round(r, encoder, timed_uploader(probe, r), long_poll_s=LONG_POLL_S):
                            raise RuntimeError(f"round {r + 1} closed without this node's input")
                        probe.closed[r][name] = time.perf_counter()
                    probe.cpu[r][name] = time.thread_time() - c0
                    if i == 0 and mode == "secure":
                        unmask_metrics(r)
                probe.tag[name] = "end"
                info = _wait_round(node, rounds)
                if mode == "plain":
                    probe.closed[rounds - 1][name] = time.perf_counter()
            except Exception as exc:  # noqa: BLE001 - reported, and the run fails loudly
                errors[name] = f"{type(exc).__name__}: {exc}"

        threads = [threading.Thread(target=one, args=(i, name), daemon=True) for i, name in enumerate(names)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + run_timeout_s
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise RuntimeError(f"N={n} {mode}: nodes still running after {run_timeout_s:.0f}s\n{_tail(log_path)}")
        if errors:
            sample = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items())[:5])
            raise RuntimeError(f"N={n} {mode}: {len(errors)} nodes failed: {sample}\n{_tail(log_path)}")
        wall = time.perf_counter() - t_start
        report = json.loads((out / "report.json").read_text())
        m = _metrics(metrics_port)
        verification = verify_round_1(report, probe, initial, names, nodes[names[0]]) if mode == "secure" else None
    finally:
        for node in nodes.values():
            node.close()
        _stop(proc)
    log_text = log_path.read_text(errors="replace")
    warnings = [ln for ln in log_text.splitlines() if " WARNING " in ln or " ERROR " in ln]
    return summarise(n, mode, rounds, report, probe, m, verification, wall, cmd, warnings)


# --------------------------------------------------------------------------- verification (secure, round 1)


def verify_round_1(report: dict, probe: Probe, initial: dict, names: list[str], node) -> dict:
    """Round 1 under secure aggregation, two checks (a failure raises):

    1. the unmasked average: the ring sum of the survivors' inputs (what each node masked), decoded, equals
       the float64 weighted average of the nodes' updates (weights capped at a share of 0.5, as the plain
       rule) within the round log's ``error_bound``;
    2. the aggregator unmasked exactly that sum: its published global (int8, the aggregator's codec) is, byte
       for byte, the payload the bench makes from that average (same encoder, same reference)."""
    from bench.light_client import plain_average
    from shared.learning.aggregation import capped_weights
    from shared.learning.rounds import WireConfig, decode_adapter, publish_state
    from shared.secagg import RingLayout

    entry = report["rounds_log"][0]["secure_aggregation"]
    session, survivors = entry["session"], entry["survivors"]
    if survivors != names or entry["aborted"]:
        raise AssertionError(f"round 1: survivors {survivors}, aborted sessions {entry['aborted']}")
    if probe.ring_nodes[session] != set(survivors):
        raise AssertionError(f"round 1: the bench saw inputs of {sorted(probe.ring_nodes[session])} masked")
    layout = RingLayout.of(initial)
    unmasked = layout.decode(probe.ring_sums[session], initial)
    weights = capped_weights(dict.fromkeys(entry["roster"], NUM_TRAIN), max_samples=1_000_000, max_share=0.5)
    want = plain_average({n: update_of(initial, 0, names.index(n)) for n in survivors}, initial, weights)
    worst = max(float((unmasked[k].double() - want[k]).abs().max()) for k in want)
    bound = entry["error_bound"]
    # the fixed point's bound, then one rounding to float32 (values ~0.05: < 1e-8)
    if not worst <= bound + 1e-7:
        raise AssertionError(f"round 1: the unmasked average is {worst:.3g} from the plain one, bound {bound:.3g}")
    wire = WireConfig(codec="int8")
    mine, mine_decoded = publish_state(unmasked, initial, wire)
    header, data = node.fetch(1)
    if header.sha256 != mine.sha256 or data != mine.data:
        got = decode_adapter(data, header.sha256, initial, wire).tensors
        diff = max(float((got[k] - mine_decoded[k]).abs().max()) for k in got)
        raise AssertionError(
            f"round 1: the published global is not the one the sum of the masked inputs gives ({header.sha256} "
            f"vs {mine.sha256}; largest difference {diff:.3g})"
        )
    published = decode_adapter(data, header.sha256, initial, wire).tensors
    vs_plain = max(float((published[k].double() - want[k]).abs().max()) for k in want)
    return {
        "session": session,
        "survivors": len(survivors),
        "threshold": entry["threshold"],
        "scale": entry["scale"],
        "error_bound": bound,
        "unmasked_vs_plain_max_abs": worst,
        "published_sha256_matches": True,
        "published_int8_vs_plain_max_abs": vs_plain,
    }


# --------------------------------------------------------------------------- summary


def reconstruct_cost(n: int, threshold: float = 0.5) -> dict[str, float]:
    """Milliseconds to check and rebuild one secret from the shares of all ``n`` holders, as the unmasking does:
    ``cold`` for the first secret of a round (it computes the holders' Lagrange weights and parity word), ``warm``
    for every other one (they are reused: the same holders)."""
    import secrets

    from shared.secagg import reconstruct, split, threshold_for

    t = threshold_for(n, threshold)
    xs = [x + 1000 * n for x in range(1, n + 1)]  # points no earlier call of this process has cached
    first, second = (split(secrets.randbits(256), xs, t) for _ in range(2))
    t0 = time.perf_counter()
    reconstruct(first, t)
    t1 = time.perf_counter()
    reconstruct(second, t)
    t2 = time.perf_counter()
    return {"cold": 1000 * (t1 - t0), "warm": 1000 * (t2 - t1)}


def _mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else float("nan")


def summarise(n, mode, rounds, report, probe, m, verification, wall, cmd, warnings) -> dict:
    from bench.load import _sum

    log = report["rounds_log"]
    if len(log) != rounds:
        raise RuntimeError(f"N={n} {mode}: {len(log)} rounds logged, {rounds} expected")
    later = list(range(1, rounds)) or [0]  # round 1 also holds the first calls' set-up
    by_rpc: dict[str, dict[str, float]] = {}
    for r in later:
        for rpc, v in log[r]["traffic"]["by_rpc"].items():
            acc = by_rpc.setdefault(rpc, {"up": 0.0, "down": 0.0})
            acc["up"] += v["up"] / n / len(later)
            acc["down"] += v["down"] / n / len(later)
    calls: dict[str, float] = defaultdict(float)
    for (_node, tag, method), k in probe.calls.items():
        if tag in later:
            calls[method] += k / n / len(later)
    bench_round = [min(probe.closed[r].values()) - min(probe.opened[r].values()) for r in range(rounds)]
    masks = [x for x in probe.mask if x["round"] in later]
    unmask_per_round = []
    prev = (0.0, 0.0)
    for r in range(rounds):
        s, c = probe.unmask.get(r, prev)
        unmask_per_round.append(s - prev[0] if c > prev[1] else None)
        prev = (s, c)
    unmask_later = [unmask_per_round[r] for r in later if unmask_per_round[r] is not None]
    secure = [x.get("secure_aggregation") for x in log]
    # secure: when the first node saw each phase (the previous one closed), from the round's opening; and what
    # one SecAggPoll answer weighs by the phase it carries (per node and round)
    phases: dict[str, list[float]] = defaultdict(list)
    poll_bytes: dict[str, float] = defaultdict(float)
    poll_count: dict[str, float] = defaultdict(float)
    names = {1: "keys", 2: "shares", 3: "masked", 4: "unmask", 5: "closed"}
    for r in later if probe.polls else []:
        opened = min(probe.opened[r].values())
        seen = {}
        for _node, _tag, rid, phase, _nbytes, t in probe.polls:
            if rid == r:
                seen[phase] = min(seen.get(phase, t), t)
        marks = [opened] + [seen.get(p) for p in (2, 3, 4)] + [min(probe.closed[r].values())]
        for label, a, b in zip(("keys", "shares", "masked", "unmask"), marks[:-1], marks[1:], strict=True):
            if a is not None and b is not None:
                phases[label].append(b - a)
    for _node, tag, rid, phase, nbytes, _t in probe.polls:
        if tag in later:
            key = names.get(phase, str(phase)) if rid == tag else "after the round closed"
            poll_bytes[key] += nbytes / n / len(later)
            poll_count[key] += 1 / n / len(later)
    row = {
        "nodes": n,
        "mode": mode,
        "rounds": rounds,
        "round_s_aggregator": _mean(log[r]["seconds"] for r in later),
        "round_s_bench": _mean(bench_round[r] for r in later),
        "round_s_aggregator_each": [x["seconds"] for x in log],
        "round_s_bench_each": bench_round,
        "bytes_up_per_node": _mean(log[r]["traffic"]["up"] / n for r in later),
        "bytes_down_per_node": _mean(log[r]["traffic"]["down"] / n for r in later),
        "traffic_by_rpc_per_node": {k: {d: round(v) for d, v in by_rpc[k].items()} for k in sorted(by_rpc)},
        "payload_bytes_per_node": _mean(log[r]["bytes_up"] / max(1, log[r]["updates"]) for r in later),
        "updates_per_round": [x["updates"] for x in log],
        "rpcs_per_node": sum(calls.values()),
        "rpcs_per_node_by_method": {k: round(v, 2) for k, v in sorted(calls.items())},
        "node_protocol_cpu_s": _mean(v for r in later for v in probe.cpu[r].values()),
        "mask_cpu_s": _mean(x["cpu_s"] for x in masks) if masks else None,
        "mask_wall_s": _mean(x["wall_s"] for x in masks) if masks else None,
        "mask_cpu_s_max": max((x["cpu_s"] for x in masks), default=None),
        "unmask_s": _mean(unmask_later) if unmask_later else None,
        "unmask_s_each": unmask_per_round,
        "unmask_s_total_metrics": _sum(m, "fedmedclip_aggregate_duration_seconds_sum", step="unmask") or None,
        "phase_s": {k: _mean(v) for k, v in phases.items()} or None,
        "poll_answers_per_node_by_phase": {k: round(v, 2) for k, v in poll_count.items()} or None,
        "poll_bytes_per_node_by_phase": {k: round(v) for k, v in poll_bytes.items()} or None,
        "sessions": [x["sessions"] for x in secure] if secure[0] else None,
        "threshold": secure[0]["threshold"] if secure[0] else None,
        "error_bound": [x["error_bound"] for x in secure] if secure[0] else None,
        "verification": verification,
        "aggregator_warnings": warnings[:20],
        "aggregator_warning_count": len(warnings),
        "wall_s": wall,
        "aggregator_command": shlex.join(["python", *cmd[1:]]),
    }
    return row


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:.3f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def _opt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(rows: list[dict], sizes: list[int], rounds: int, command: str, provision_s: float) -> str:
    lines = [
        "# Secure aggregation: what it costs against the plain mode",
        "",
        f"Made by `{command}` (`.venv/bin/python -m bench.secagg`).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work, Python "
        f"{platform.python_version()}; loopback, mTLS. One aggregator process per (N, mode) (`python -m aggregator`, "
        f"fresh, {rounds} rounds, flags in secagg.json); the N light nodes (bench/light_client.py: the real protocol, "
        "no learning) are threads of the bench process, one TLS channel each. Adapter: D = 512, 526,336 values in "
        "6 tensors; each node's update is the global plus Gaussian noise (sd 0.01), every node states "
        f"{NUM_TRAIN} training samples (equal weights). Plain: uploads in the aggregator's default codec, int8. "
        "Secure: `LightNode.secure_round` with `adapter_encoder` (the node daemon's session code), "
        "threshold t = floor(N/2) + 1, clip 1; the published global is int8 in both modes. Every node fetches "
        "each published global itself (FetchGlobal), as a real node does. Provisioning the federation "
        f"({max(sizes)} node certificates) took {provision_s:.1f} s.",
        "",
        "All figures are means over rounds 2..R: round 1 also holds the first calls' set-up (first TLS streams "
        "of each channel, first long polls, lazy imports). Round wall s (aggregator): the round's `seconds` in "
        "report.json (open to publish); the bench's own view (first node to see the round open to first node to "
        "see it closed) is in secagg.json. Bytes up/down per node and round: every RPC's message bytes "
        "(the aggregator's `traffic` tally between two round closes: protobuf messages as serialised, without "
        "HTTP/2 and TLS framing) divided by N. Adapter payload: the update's bytes as uploaded (int8 payload; "
        "masked ring vector). RPCs per node and round: counted at the client (each light node's stub wrapped; "
        "retries count). Node masking s: CPU time of the node's thread in `NodeSession.mask` (its self mask "
        "and one ChaCha20 pairwise mask per other member, over 529,408 ring elements). Aggregator unmask s: "
        '`fedmedclip_aggregate_duration_seconds{step="unmask"}` per round (rebuilding every survivor\'s self-mask '
        "seed from t Shamir shares, removing the masks, decoding).",
        "",
        "**At N = 100 all 100 nodes run on this one 2-core machine**: the secure round's wall time holds 100 "
        "nodes' masking (and share dealing, roster checks, share decryption) serialised on 2 cores. In a real "
        "federation each hospital masks on its own machine, concurrently: what masking adds to a round there "
        "is the per-node figure (node masking s), not N times it.",
        "",
        "| N | mode | round wall s (aggregator) | bytes up / node / round | bytes down / node / round "
        "| adapter payload bytes / node | RPCs / node / round | node masking s (secure) "
        "| aggregator unmask s (secure) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['mode']} | {r['round_s_aggregator']:.2f} | {_fmt_bytes(r['bytes_up_per_node'])} "
            f"| {_fmt_bytes(r['bytes_down_per_node'])} | {r['payload_bytes_per_node']:,.0f} | {r['rpcs_per_node']:.1f} "
            f"| {_opt(r['mask_cpu_s'], '.3f')} | {_opt(r['unmask_s'], '.3f')} |"
        )
    lines += [
        "",
        "Ratios secure / plain:",
        "",
        "| N | round wall (aggregator) | round wall (bench) | bytes up / node | bytes down / node | adapter payload "
        "| RPCs / node |",
        "|---|---|---|---|---|---|---|",
    ]
    pairs = _pairs(rows)
    for n, (p, s) in pairs.items():
        lines.append(
            f"| {n} | {s['round_s_aggregator'] / p['round_s_aggregator']:.1f}x "
            f"| {s['round_s_bench'] / p['round_s_bench']:.1f}x "
            f"| {s['bytes_up_per_node'] / p['bytes_up_per_node']:.2f}x "
            f"| {s['bytes_down_per_node'] / p['bytes_down_per_node']:.2f}x "
            f"| {s['payload_bytes_per_node'] / p['payload_bytes_per_node']:.2f}x "
            f"| {s['rpcs_per_node'] / p['rpcs_per_node']:.1f}x |"
        )
    lines += ["", "RPCs per node and round, by method (client side, rounds 2..R):", ""]
    for r in rows:
        by = ", ".join(f"{k} {v:g}" for k, v in r["rpcs_per_node_by_method"].items())
        lines.append(f"* N = {r['nodes']}, {r['mode']}: {by}")
    lines += ["", "Bytes per node and round by RPC (up / down, rounds 2..R):", ""]
    for r in rows:
        by = ", ".join(
            f"{k} {_fmt_bytes(v['up'])} / {_fmt_bytes(v['down'])}" for k, v in r["traffic_by_rpc_per_node"].items()
        )
        lines.append(f"* N = {r['nodes']}, {r['mode']}: {by}")
    lines += ["", "Node-side time per round (the node's thread, rounds 2..R):", ""]
    for r in rows:
        extra = (
            f"; masking {r['mask_cpu_s']:.3f} s CPU ({r['mask_wall_s']:.3f} s wall under the bench's contention, "
            f"slowest {r['mask_cpu_s_max']:.3f} s CPU)"
            if r["mask_cpu_s"] is not None
            else ""
        )
        lines.append(
            f"* N = {r['nodes']}, {r['mode']}: all protocol work (plain: int8 encode and upload; secure: the whole "
            f"`secure_round`) {r['node_protocol_cpu_s']:.3f} s CPU{extra}"
        )
    lines += [
        "",
        "The secure round's phases (rounds 2..R; each from the moment the first node saw the previous phase close, "
        "so the keys phase starts at the round's opening and holds the nodes' fetching the global and their "
        "update; unmask ends when the first node saw the round closed, so it holds the aggregator's unmasking), "
        "and what one node's SecAggPoll answers weigh, by the phase they wait for (each carries only its phase's "
        "part: the roster with the shares phase's answer, the masking set and the node's inbox with the masked "
        "phase's, the survivors with the unmasking's):",
        "",
    ]
    for r in rows:
        if r["phase_s"]:
            ph = ", ".join(f"{k} {v:.2f} s" for k, v in r["phase_s"].items())
            polls = ", ".join(
                f"{k} {r['poll_answers_per_node_by_phase'][k]:g} x, {_fmt_bytes(v)}"
                for k, v in r["poll_bytes_per_node_by_phase"].items()
            )
            lines.append(f"* N = {r['nodes']}: {ph}; SecAggPoll answers per node: {polls}")
    lines += ["", "Correctness (secure, round 1):", ""]
    for r in rows:
        v = r["verification"]
        if v:
            lines.append(
                f"* N = {r['nodes']}: threshold {v['threshold']}, scale {v['scale']:,}; the unmasked average is "
                f"{v['unmasked_vs_plain_max_abs']:.3g} from the float64 weighted average at most (error bound "
                f"{v['error_bound']:.3g}); the published int8 global is byte for byte the one that average gives "
                f"(so the aggregator unmasked exactly the sum of the masked inputs); int8 rounding puts it "
                f"{v['published_int8_vs_plain_max_abs']:.3g} from the float64 average."
            )
    lines += ["", "What this means:", ""]
    lines += _meaning(rows, pairs)
    lines += ["", "![secure vs plain](secagg.png)", ""]
    return "\n".join(lines)


def _pairs(rows: list[dict]) -> dict[int, tuple[dict, dict]]:
    by = {(r["nodes"], r["mode"]): r for r in rows}
    return {
        n: (by[(n, "plain")], by[(n, "secure")])
        for n in sorted({r["nodes"] for r in rows})
        if (n, "plain") in by and (n, "secure") in by
    }


def _meaning(rows: list[dict], pairs: dict) -> list[str]:
    out = []
    if pairs:
        p, s = next(iter(pairs.values()))
        ratio = s["payload_bytes_per_node"] / p["payload_bytes_per_node"]
        out.append(
            f"* Upload size: the int8 codec sends 1 byte per value (plus a float16 scale per row of the two weight "
            "matrices, the 1-D tensors in float16; rows the adapter's learned mask switches off are not sent): "
            f"{p['payload_bytes_per_node']:,.0f} bytes per update here. The masked ring vector is 4 bytes per "
            "value plus a 4-byte row weight per row (529,408 ring elements): "
            f"{s['payload_bytes_per_node']:,.0f} bytes (rows switched off ride as zeros), {ratio:.2f}x the int8 "
            "payload (measured). A masked vector is uniform in the ring: nothing compresses it, and the ring's "
            "width (32 bits) is what the fixed point needs so that the sum of N inputs never wraps."
        )
        ups = ", ".join(
            f"{s['bytes_up_per_node'] / p['bytes_up_per_node']:.2f}x at N = {n}" for n, (p, s) in pairs.items()
        )
        downs = ", ".join(
            f"{_fmt_bytes(s['bytes_down_per_node'])} vs {_fmt_bytes(p['bytes_down_per_node'])} at N = {n}"
            for n, (p, s) in pairs.items()
        )
        out.append(f"* All traffic per node and round: up {ups}; down {downs} (secure vs plain).")
    secure = [r for r in rows if r["mode"] == "secure"]
    if len(secure) > 1:
        a, b = secure[0], secure[-1]
        poll = {r["nodes"]: r["traffic_by_rpc_per_node"].get("SecAggPoll", {}).get("down", 0) for r in secure}
        out.append(
            "* Pairwise masks make a node's CPU grow linearly with N: masking took "
            f"{a['mask_cpu_s']:.3f} s CPU per node at N = {a['nodes']} and {b['mask_cpu_s']:.3f} s at N = "
            f"{b['nodes']} (one ChaCha20 expansion of the whole vector per other member). The roster (every "
            "member's certificate, keys, signature, weight) and the inbox (one encrypted share pair per other "
            "member) each node downloads grow linearly with N too: SecAggPoll down "
            + ", ".join(f"{_fmt_bytes(v)} at N = {k}" for k, v in poll.items())
            + " per node and round; the aggregator relays N^2 share ciphertexts per round."
        )
        big = secure[-1]["poll_bytes_per_node_by_phase"] or {}
        if big.get("shares") and big.get("masked"):
            out.append(
                f"* Of the {_fmt_bytes(sum(big.values()))} of SecAggPoll answers a node downloads per round at N = "
                f"{secure[-1]['nodes']}, the shares phase's answer (the roster) is {_fmt_bytes(big['shares'])} and "
                f"the masked phase's (the masking set and the node's inbox) {_fmt_bytes(big['masked'])}: each is "
                "sent once per session, to the poll that waits for its phase."
            )
        each = ", ".join(f"{_opt(r['unmask_s'], '.3f')} s at N = {r['nodes']}" for r in secure)
        cost = ", ".join(
            f"{r['reconstruct_ms']['cold']:.2f} ms and {r['reconstruct_ms']['warm']:.2f} ms at N = {r['nodes']}"
            for r in secure
            if r.get("reconstruct_ms")
        )
        out.append(
            f"* The aggregator's unmasking: {each} per round. For each of the N survivors it checks the N shares "
            "returned of its self-mask seed with one random parity check of the dual code (N multiplications over "
            "GF(2^521 - 1)) and rebuilds the seed from t of them with Lagrange weights computed once per round "
            "(they depend only on which nodes hold the shares), then removes that node's mask (one ChaCha20 "
            f"expansion). One secret, the round's first and any other (timed in this process): {cost}. The "
            "unmasking runs in the aggregator's engine step, under the engine's lock: RPCs that need the engine "
            "wait for it. (Before the parity check, each share beyond the first t was checked with a Lagrange "
            "evaluation of its own: 5.6 s per round at N = 100.)"
        )
    if pairs:
        p, s = next(iter(pairs.values()))
        out.append(
            f"* Round trips: a plain round is {p['rpcs_per_node']:.0f} RPCs per node with one barrier (every upload "
            f"in, then the round closes); a secure round is {s['rpcs_per_node']:.0f} with four (keys, shares, "
            "masked input, unmasking): each node waits for the slowest member three more times per round, and a "
            "phase that misses its quorum restarts the session with new keys."
        )
    out.append(
        "* SecAgg+ (Bell et al., CCS 2020) masks each node with O(log N) neighbours of a sparse random graph "
        "instead of all N - 1 others, which makes the node's masking, its share dealing and the roster it needs "
        "grow with log N; it is not implemented here."
    )
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for mode, marker, color in (("plain", "o", "tab:blue"), ("secure", "s", "tab:orange")):
        rs = [r for r in rows if r["mode"] == mode]
        ns = [r["nodes"] for r in rs]
        axes[0].plot(ns, [r["round_s_aggregator"] for r in rs], marker=marker, color=color, label=mode)
        axes[1].plot(ns, [r["bytes_up_per_node"] / 1e6 for r in rs], marker=marker, color=color, label=f"{mode} up")
        axes[1].plot(
            ns,
            [r["bytes_down_per_node"] / 1e6 for r in rs],
            marker=marker,
            color=color,
            linestyle="--",
            label=f"{mode} down",
        )
    secure = [r for r in rows if r["mode"] == "secure"]
    ns = [r["nodes"] for r in secure]
    axes[2].plot(ns, [r["mask_cpu_s"] for r in secure], marker="s", label="node masking (CPU, per node)")
    axes[2].plot(ns, [r["unmask_s"] for r in secure], marker="^", label="aggregator unmasking")
    axes[2].plot(ns, [r["node_protocol_cpu_s"] for r in secure], marker="v", label="node's whole secure round (CPU)")
    titles = (
        "round wall time (aggregator), s",
        "MB per node per round, all RPCs",
        "secure aggregation compute, s",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["nodes"] for r in rows}), [str(n) for n in sorted({r["nodes"] for r in rows})])
        ax.set_xlabel("nodes N")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle("Secure aggregation vs plain (int8), D = 512, loopback, all nodes on one 2-core machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.secagg", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4,20,100", help="comma-separated numbers of nodes")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--secure-rounds-at",
        default="",
        help="fewer rounds for the secure mode at some sizes, e.g. 100:2 (when a size is too slow)",
    )
    p.add_argument("--run-timeout-s", type=float, default=900.0, help="per (N, mode)")
    p.add_argument("--out", default="bench/results/secagg.md")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from aggregator.provision import ProvisionConfig, provision

    torch.set_num_threads(1)
    sizes = [int(x) for x in args.sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"modes: {MODES}")
    fewer = {int(k): int(v) for k, v in (x.split(":") for x in args.secure_rounds_at.split(",") if x)}
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        tmp = Path(tmp)
        pki = tmp / "pki"
        provision(ProvisionConfig(nodes=[f"node_{i:03d}" for i in range(1, max(sizes) + 1)], out=str(pki)))
        provision_s = time.perf_counter() - t0
        for n in sizes:
            for mode in modes:
                rounds = fewer.get(n, args.rounds) if mode == "secure" else args.rounds
                t1 = time.perf_counter()
                row = measure(n, mode, rounds, pki, tmp, args.run_timeout_s)
                if mode == "secure":
                    row["reconstruct_ms"] = reconstruct_cost(n)
                rows.append(row)
                brief = {k: row[k] for k in ("round_s_aggregator", "bytes_up_per_node", "rpcs_per_node", "mask_cpu_s")}
                print(f"N={n} {mode}: {json.dumps(brief)} ({time.perf_counter() - t1:.0f}s)", flush=True)
    given = sys.argv[1:] if argv is None else argv
    command = "make bench-secagg" + (f' ARGS="{shlex.join(given)}"' if given else "")
    text = render(rows, sizes, args.rounds, command, provision_s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "total_s": time.perf_counter() - t0, "rows": rows}, indent=1) + "\n"
    )
    plot(rows, out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
