"""Denial of service by one allow-listed hospital, against a real aggregator process over mTLS.

The attacker holds a valid certificate and is a registered trainer (a compromised hospital). In a
process of its own (this file run as a script: ``python tests/test_dos.py flood ...``, grpc.aio over
several connections) it keeps FLOOD_STREAMS upload streams that send a header and 100 bytes and then
stall, and FLOOD_POLLS ``GetRound`` long polls, re-opening each a moment after it ends. Meanwhile two
honest nodes heartbeat every 50 ms, upload their updates and complete their round. The tests check:

- the flood: streams and long polls beyond the node's limits are refused at once with
  ``too_many_streams`` / ``too_many_long_polls`` (RESOURCE_EXHAUSTED); the admitted stalled uploads are
  cancelled by the watchdog, within the stream deadline;
- the honest nodes' round completes during the flood and every heartbeat of theirs is answered (their
  round-trip p99 is printed and measured in bench/results/flood.md, not asserted: a speed figure);
- health: the AggregatorService's status goes NOT_SERVING under the flood and back after, while the
  server's (liveness) stays SERVING; and likewise when honest long polls fill the workers past the
  high-water mark;
- a node on the allow-list that is not registered cannot take an upload slot;
- a TLS handshake with a certificate from another CA is logged with the peer's address and counted
  (and without gRPC's handshaker trace, still counted).

RSS and thread count of the aggregator are read from /proc before, during and after the flood; with
``FEDMEDCLIP_FLOOD_REPORT=path`` the figures are written as Markdown (bench/results/flood.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # run as the attacker's script: the repository root first on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import pytest

from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.reasons import Reason
from shared.wire.transport import channel_options

FLOOD_STREAMS = 200  # stalled upload streams the attacker keeps trying
FLOOD_POLLS = 100  # long polls the attacker keeps trying
FLOOD_S = 20.0  # how long the flood lasts
REOPEN_S = 1.0  # the attacker re-opens each stream / poll this long after it ended
CONNECTIONS = 4  # the attacker's connections (the limits are per node, whatever the connection)
HEARTBEAT_EVERY_S = 0.05
STREAM_TIMEOUT_S, GRACE_S, MIN_RATE = 10.0, 2.0, 4096
MAX_STREAMS, MAX_POLLS, HOLD_S = 2, 2, 3.0
MAX_WORKERS, OVERLOAD_RATIO = 64, 0.25  # high-water mark: 16 workers busy
HONEST = ["hospital_1", "hospital_2"]
ATTACKER, STRANGER = "hospital_3", "hospital_4"  # the stranger is allowed in, but never registers
WAITERS = [f"waiter_{i}" for i in range(8)]  # evaluators whose 2 long polls each reach the high-water mark


# --------------------------------------------------------------------------- the attacker (a process of its own)


def _reason(error: grpc.aio.AioRpcError) -> str | None:
    """The Reason an aio call's rich status names (shared.wire.reasons.reason_of takes sync calls only)."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return None


async def _flood(args) -> dict:
    import asyncio

    from shared.wire.tls import party_material

    material = party_material(Path(args.kit))
    creds = grpc.ssl_channel_credentials(
        root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
    )
    channels = [
        grpc.aio.secure_channel(args.address, creds, options=channel_options() + [("fedmedclip.test.conn", i)])
        for i in range(args.connections)
    ]
    stubs = [pb_grpc.AggregatorServiceStub(c) for c in channels]
    # connected first: streams opened before the server's HTTP/2 settings arrive would be refused by the transport
    await asyncio.wait_for(asyncio.gather(*[c.channel_ready() for c in channels]), 30)
    header = pb.PayloadHeader(
        run_id=args.run_id,
        round_id=0,
        node_id=args.node,
        update_id="stall",
        codec="int8",
        wire_bytes=1_000_000,
        sha256="0" * 64,
    )
    start = time.monotonic()
    stop_at = start + args.seconds
    outcomes: list[tuple[str, str, str | None, float, float]] = []  # kind, code, reason, seconds, opened at

    async def upload(stub) -> None:
        call = stub.UploadUpdate(timeout=3 * STREAM_TIMEOUT_S)
        try:
            await call.write(pb.UploadUpdateRequest(header=header))
            await call.write(pb.UploadUpdateRequest(chunk=b"\0" * 100))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):  # refused already: the status is the call's
            pass
        await call  # and then nothing, until the call ends

    async def poll(stub) -> None:
        await stub.GetRound(
            pb.GetRoundRequest(run_id=args.run_id, node_id=args.node, wait_for_round=99, max_wait_ms=5000), timeout=20
        )

    async def keep(kind: str, i: int) -> None:
        stub = stubs[i % len(stubs)]
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                await (upload(stub) if kind == "upload" else poll(stub))
                code, reason = "OK", None
            except grpc.aio.AioRpcError as exc:
                code, reason = exc.code().name, _reason(exc)
                if code not in ("RESOURCE_EXHAUSTED", "CANCELLED"):
                    print(kind, code, exc.details(), flush=True)
            outcomes.append((kind, code, reason, time.monotonic() - t0, t0 - start))
            await asyncio.sleep(REOPEN_S)

    await asyncio.gather(
        *[keep("upload", i) for i in range(args.streams)], *[keep("poll", i) for i in range(args.polls)]
    )
    for channel in channels:
        await channel.close()
    return {"outcomes": outcomes, "seconds": time.monotonic() - start}


def _attacker_main(argv: list[str]) -> int:
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(prog="tests/test_dos.py flood")
    for name in ("address", "kit", "node", "run-id", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--streams", type=int, default=FLOOD_STREAMS)
    parser.add_argument("--polls", type=int, default=FLOOD_POLLS)
    parser.add_argument("--seconds", type=float, default=FLOOD_S)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    args = parser.parse_args(argv)
    result = asyncio.run(_flood(args))
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["flood"]:
        raise SystemExit("usage: python tests/test_dos.py flood --address ... (the attacker of tests/test_dos.py)")
    raise SystemExit(_attacker_main(sys.argv[2:]))


# --------------------------------------------------------------------------- the federation under test

from bench.light_client import Federation, LightNode, encode, perturbed  # noqa: E402
from shared.wire.protocol import SERVICE_NAME  # noqa: E402
from shared.wire.reasons import reason_of  # noqa: E402
from shared.wire.tls import TlsMaterial, party_material  # noqa: E402
from shared.wire.transport import sha256_hex  # noqa: E402
from tests.services_support import (  # noqa: E402
    Cluster,
    Proc,
    provision_pki,
    scrape,
    scrape_or_none,
    start_aggregator_process,
    tls_of,
    total,
    wait_for,
)

FED = Federation(embed_dim=16)


def start_aggregator(
    cluster: Cluster, pki: Path, out: Path, *flags: str, env: dict[str, str] | None = None, name: str = "aggregator"
) -> dict:
    """A real aggregator process with mTLS on free ports (``env`` on top of the suite's); waits until it serves."""
    return start_aggregator_process(cluster, pki, out, *flags, env=env, name=name, timeout=180)


def proc_status(pid: int) -> tuple[float, int]:
    """RSS (MiB) and thread count of a process, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


class Health:
    """grpc.health.v1 of the aggregator (its plaintext health port), one channel for many checks."""

    def __init__(self, port: int) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.pb = health_pb2
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str) -> str:
        response = self.stub.Check(self.pb.HealthCheckRequest(service=service), timeout=5)
        return self.pb.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()


@dataclass
class Fed:
    root: Path
    pki: Path
    agg: dict
    nodes: dict[str, LightNode]
    health: Health

    @property
    def pid(self) -> int:
        return self.agg["proc"].popen.pid


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("dos")
    pki = provision_pki(root / "pki", HONEST + [ATTACKER, STRANGER] + WAITERS)
    cluster = Cluster(root)
    nodes: dict[str, LightNode] = {}
    health = None
    try:
        agg = start_aggregator(
            cluster,
            pki,
            root / "agg",
            "--rounds",
            "2",
            "--min-nodes",
            "2",
            "--embed-dim",
            str(FED.embed_dim),
            "--round-timeout-s",
            "5",
            "--quorum-timeout-s",
            "900",
            "--linger-s",
            "600",
            "--exit-when-done",
            "false",
            "--max-workers",
            str(MAX_WORKERS),
            "--max-streams-per-node",
            str(MAX_STREAMS),
            "--max-long-polls-per-node",
            str(MAX_POLLS),
            "--stream-timeout-s",
            str(STREAM_TIMEOUT_S),
            "--stream-grace-s",
            str(GRACE_S),
            "--stream-min-rate-bps",
            str(MIN_RATE),
            "--overload-ratio",
            str(OVERLOAD_RATIO),
            "--overload-hold-s",
            str(HOLD_S),
            env={"GRPC_TRACE": "handshaker"},
        )  # what `python -m aggregator` should set itself (see the report)
        nodes = {
            n: LightNode(agg["address"], n, tls_of(pki, n), FED, num_train=10 * (i + 1))
            for i, n in enumerate(HONEST + [ATTACKER])
        }
        for node in nodes.values():
            node.register()
        nodes[STRANGER] = LightNode(agg["address"], STRANGER, tls_of(pki, STRANGER), FED)
        nodes[STRANGER].run_id = agg["run_id"]
        assert nodes["hospital_1"].round(0, max_wait_s=10).phase == pb.ROUND_PHASE_COLLECTING
        health = Health(agg["health"])
        yield Fed(root=root, pki=pki, agg=agg, nodes=nodes, health=health)
    finally:
        if health is not None:
            health.close()
        for node in nodes.values():
            node.close()
        cluster.close()


def stalled_upload(node: LightNode, gate: threading.Event, **header):
    """An upload that sends its header and 100 bytes and then nothing until ``gate`` is set: a future."""
    head = pb.PayloadHeader(
        run_id=node.run_id,
        round_id=0,
        node_id=node.node_id,
        update_id="stall",
        codec="int8",
        wire_bytes=1_000_000,
        sha256="0" * 64,
    )
    head.MergeFrom(pb.PayloadHeader(**header))

    def messages():
        yield pb.UploadUpdateRequest(header=head)
        yield pb.UploadUpdateRequest(chunk=b"\0" * 100)
        gate.wait()

    return node.stub.UploadUpdate.future(messages(), timeout=3 * STREAM_TIMEOUT_S)


def ended(future) -> tuple[grpc.StatusCode, Reason | None]:
    try:
        future.result()
    except grpc.RpcError as exc:
        return exc.code(), reason_of(exc)
    return grpc.StatusCode.OK, None


# --------------------------------------------------------------------------- registration, TLS, high water


def test_a_node_that_is_not_registered_cannot_take_an_upload_slot(fed):
    stranger = fed.nodes[STRANGER]
    gate = threading.Event()
    slots_seen: list[float] = []
    try:
        t0 = time.monotonic()
        calls = [stalled_upload(stranger, gate) for _ in range(10)]
        while not all(c.done() for c in calls) and time.monotonic() - t0 < GRACE_S + 5:
            slots_seen.append(total(scrape(fed.agg["metrics"]), "fedmedclip_upload_slots_in_use"))
            time.sleep(0.05)
        outcomes = [ended(c) for c in calls]
    finally:
        gate.set()
    # each stream is refused on its header (or over the node's stream limit): none is left for the watchdog
    assert {reason for _, reason in outcomes} <= {Reason.UNKNOWN_NODE, Reason.TOO_MANY_STREAMS}, outcomes
    assert Reason.UNKNOWN_NODE in {reason for _, reason in outcomes}
    assert max(slots_seen, default=0) == 0
    # the same stalled stream from a registered trainer does take a slot, until the watchdog cancels it
    gate = threading.Event()
    try:
        t0 = time.monotonic()
        call = stalled_upload(fed.nodes[ATTACKER], gate, run_id=fed.agg["run_id"])
        wait_for(
            lambda: total(scrape(fed.agg["metrics"]), "fedmedclip_upload_slots_in_use") == 1,
            GRACE_S,
            "the registered node's stalled upload to hold a slot",
            [fed.agg["proc"]],
            interval=0.05,
        )
        code, _ = ended(call)
        cut = time.monotonic() - t0
    finally:
        gate.set()
    assert code == grpc.StatusCode.CANCELLED and GRACE_S <= cut < STREAM_TIMEOUT_S, (code, cut)
    assert total(scrape(fed.agg["metrics"]), "fedmedclip_upload_slots_in_use") == 0
    assert (
        total(
            scrape(fed.agg["metrics"]),
            "fedmedclip_requests_rejected_total",
            method="UploadUpdate",
            reason="stream_too_slow",
        )
        >= 1
    )
    assert (
        total(
            scrape(fed.agg["metrics"]),
            "fedmedclip_requests_rejected_total",
            method="UploadUpdate",
            reason="unknown_node",
        )
        >= 1
    )


def _other_ca_material(fed: Fed) -> TlsMaterial:
    """hospital_1's name on a certificate of another federation's CA (the aggregator's CA trusted, to reach it)."""
    other = provision_pki(fed.root / "other-pki", ["hospital_1"])
    mine, theirs = party_material(fed.pki / "hospital_1"), party_material(other / "hospital_1")
    return TlsMaterial(ca=mine.ca, cert=theirs.cert, key=theirs.key)


def test_failed_handshakes_are_logged_with_the_peer_and_counted(fed):
    def failures(**labels) -> float:
        return total(scrape(fed.agg["metrics"]), "fedmedclip_tls_handshake_failures_total", **labels)

    before = failures()
    for material in (_other_ca_material(fed), None):  # another CA's certificate; plaintext on the TLS port
        intruder = LightNode(fed.agg["address"], "hospital_1", material, FED, timeout_s=5)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                intruder.register()
        finally:
            intruder.close()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: failures() >= before + 2, 10, "both failed handshakes to be counted", [fed.agg["proc"]])
    assert failures(reason="certificate_verify_failed") >= 1
    log = fed.agg["proc"].text()
    peers = [re.findall(r"ipv4:127\.0\.0\.1:\d+", line) for line in log.splitlines() if "OPENSSL_internal" in line]
    assert len(peers) == 2 and all(len(p) == 1 for p in peers), log[-3000:]  # one line per failure, with its peer
    assert peers[0] != peers[1]  # each names its own connection
    assert "handshaker.cc" not in log  # gRPC core's trace is read, not passed on
    wait_for(
        lambda: fed.health.status(SERVICE_NAME) == "SERVING",
        HOLD_S + 5,
        "the aggregator to serve on",
        [fed.agg["proc"]],
    )  # (the last test's refusals for a load limit count as overload for HOLD_S)


def test_without_the_handshaker_trace_handshake_failures_are_still_counted(tmp_path):
    pki = provision_pki(tmp_path / "pki", ["hospital_1"])
    other = provision_pki(tmp_path / "other-pki", ["hospital_1"])
    cluster = Cluster(tmp_path)
    env = {"GRPC_TRACE": ""}  # whatever the environment of the suite says
    try:
        agg = start_aggregator(cluster, pki, tmp_path / "agg", "--embed-dim", "16", env=env)
        bad = TlsMaterial(
            ca=party_material(pki / "hospital_1").ca,
            cert=party_material(other / "hospital_1").cert,
            key=party_material(other / "hospital_1").key,
        )
        for material in (bad, None):  # another CA's certificate; plaintext on the TLS port
            intruder = LightNode(agg["address"], "hospital_1", material, FED, timeout_s=5)
            try:
                with pytest.raises(grpc.RpcError):
                    intruder.register()
            finally:
                intruder.close()
        wait_for(
            lambda: total(scrape_or_none(agg["metrics"]) or {}, "fedmedclip_tls_handshake_failures_total") >= 2,
            10,
            "both failed handshakes to be counted",
            [agg["proc"]],
        )
        samples = scrape(agg["metrics"])
        assert total(samples, "fedmedclip_tls_handshake_failures_total", reason="certificate_verify_failed") >= 1
        assert "CERTIFICATE_VERIFY_FAILED" in agg["proc"].text()  # logged, without a peer address to give
    finally:
        cluster.close()


def test_health_reports_overload_when_long_polls_fill_the_workers_past_the_high_water_mark(fed):
    high_water = math.ceil(OVERLOAD_RATIO * MAX_WORKERS)
    assert len(WAITERS) * MAX_POLLS >= high_water
    waiters = [LightNode(fed.agg["address"], n, tls_of(fed.pki, n), FED, evaluator=True) for n in WAITERS]
    try:
        for w in waiters:
            w.register()
        wait_for(lambda: fed.health.status(SERVICE_NAME) == "SERVING", HOLD_S + 5, "no overload to begin with")
        polls = [
            w.stub.GetRound.future(
                pb.GetRoundRequest(run_id=w.run_id, node_id=w.node_id, wait_for_round=99, max_wait_ms=12000), timeout=40
            )
            for w in waiters
            for _ in range(MAX_POLLS)
        ]
        wait_for(
            lambda: fed.health.status(SERVICE_NAME) == "NOT_SERVING",
            10,
            "health to report overload",
            [fed.agg["proc"]],
            interval=0.1,
        )
        samples = scrape(fed.agg["metrics"])
        assert total(samples, "fedmedclip_overloaded") == 1
        assert total(samples, "fedmedclip_rpcs_in_flight", method="GetRound") >= high_water
        assert fed.health.status("") == "SERVING"  # liveness: the process serves, loaded or not
        assert all(ended(p)[0] == grpc.StatusCode.OK for p in polls)  # every one served: no limit was reached
        wait_for(
            lambda: fed.health.status(SERVICE_NAME) == "SERVING",
            10,
            "health to recover",
            [fed.agg["proc"]],
            interval=0.1,
        )
        assert total(scrape(fed.agg["metrics"]), "fedmedclip_overloaded") == 0
    finally:
        for w in waiters:
            w.close()


def test_undecodable_requests_neither_grow_the_aggregator_nor_break_the_connection(fed):
    """grpcio keeps ~16 KB and an open stream per request it fails to parse: the aggregator parses for it."""
    n = 2000
    node = fed.nodes["hospital_1"]
    register = node.channel.unary_unary(
        "/fedmedclip.v1.AggregatorService/Register", request_serializer=None, response_deserializer=None
    )
    check = fed.health.channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
    )
    rejected = total(
        scrape(fed.agg["metrics"]), "fedmedclip_requests_rejected_total", method="Register", reason="undecodable"
    )
    rss_before, _ = proc_status(fed.pid)
    outcomes: dict[tuple, int] = {}
    for _ in range(n):
        for call in (register, check):  # the TLS port (a certified node), the plaintext health port (anyone)
            try:
                call(b"\x00\x00" + bytes(4000), timeout=10)  # field number 0: never a valid message
                key = ("OK",)
            except grpc.RpcError as exc:
                key = (exc.code().name, reason_of(exc))
            outcomes[key] = outcomes.get(key, 0) + 1
    grown = proc_status(fed.pid)[0] - rss_before
    assert outcomes == {("INTERNAL", Reason.UNDECODABLE): n, ("INTERNAL", None): n}, outcomes
    assert grown < 16, f"RSS grew {grown:.0f} MiB over {2 * n} undecodable requests (grpcio alone: ~60 MiB)"
    assert (
        total(scrape(fed.agg["metrics"]), "fedmedclip_requests_rejected_total", method="Register", reason="undecodable")
        == rejected + n
    )
    node.round(0)  # the same connection serves on
    assert fed.health.status("") == "SERVING"


# --------------------------------------------------------------------------- the flood


@dataclass
class Flood:
    attacker: dict
    heartbeats: dict[str, list[tuple[float, float, bool]]]  # node -> (time, seconds, ok)
    window: tuple[float, float]  # the flood, in time.monotonic() of this process
    samples: list[dict] = field(default_factory=list)  # RSS, threads, health over time
    before: tuple[float, int] = (0.0, 0)
    after: tuple[float, int] = (0.0, 0)
    acks: dict[str, pb.UploadUpdateResponse] = field(default_factory=dict)
    round_done_s: float = math.nan  # from the flood's start to round 1 open
    round_during_flood: bool = False  # the attacker was still running when the round was done
    load: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # the machine's load average then
    next_round: pb.RoundInfo | None = None
    global_ok: bool = False
    metrics: dict = field(default_factory=dict)  # the aggregator's, after the flood
    metrics_before: dict = field(default_factory=dict)
    recovered_s: float = math.nan

    def during(self) -> list[float]:
        a, b = self.window
        return [s for beats in self.heartbeats.values() for t, s, ok in beats if a <= t <= b]

    def baseline(self) -> list[float]:
        return [s for beats in self.heartbeats.values() for t, s, ok in beats if t < self.window[0]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@pytest.fixture(scope="module")
def flood(fed):
    agg = fed.agg
    honest = [fed.nodes[n] for n in HONEST]
    stop = threading.Event()
    beats: dict[str, list] = {n.node_id: [] for n in honest}
    samples: list[dict] = []

    def heartbeat(node: LightNode) -> None:
        request = pb.HeartbeatRequest(run_id=node.run_id, node_id=node.node_id)
        while not stop.wait(HEARTBEAT_EVERY_S):
            t0 = time.perf_counter()
            try:
                node.stub.Heartbeat(request, timeout=3)
                ok = True
            except grpc.RpcError:
                ok = False
            beats[node.node_id].append((time.monotonic(), time.perf_counter() - t0, ok))

    def sample() -> None:
        while not stop.wait(0.5):
            rss, threads = proc_status(fed.pid)
            samples.append(
                {
                    "t": time.monotonic(),
                    "rss": rss,
                    "threads": threads,
                    "service": fed.health.status(SERVICE_NAME),
                    "server": fed.health.status(""),
                }
            )

    wait_for(lambda: fed.health.status(SERVICE_NAME) == "SERVING", HOLD_S + 5, "no overload before the flood")
    threads = [threading.Thread(target=heartbeat, args=(n,), daemon=True) for n in honest]
    threads.append(threading.Thread(target=sample, daemon=True))
    for t in threads:
        t.start()
    out = fed.root / "attacker.json"
    attacker = Proc(
        "attacker",
        [
            str(Path(__file__).resolve()),
            "flood",
            "--address",
            agg["address"],
            "--kit",
            str(fed.pki / ATTACKER),
            "--node",
            ATTACKER,
            "--run-id",
            agg["run_id"],
            "--out",
            str(out),
        ],
        fed.root / "attacker.log",
    )
    result = Flood(attacker={}, heartbeats=beats, window=(0.0, 0.0), samples=samples)
    try:
        time.sleep(3.0)  # the baseline: heartbeats without a flood
        result.before = proc_status(fed.pid)
        result.metrics_before = scrape(agg["metrics"])
        result.load = os.getloadavg()
        attacker.start()
        wait_for(
            lambda: total(scrape(agg["metrics"]), "fedmedclip_requests_rejected_total", reason="too_many_streams") > 0,
            60,
            "the flood to begin",
            [attacker, agg["proc"]],
        )
        flood_began = time.monotonic()
        time.sleep(3.0)
        initial = FED.initial_state()
        for i, node in enumerate(honest, start=1):  # the honest round, in the middle of the flood
            result.acks[node.node_id] = node.upload(encode(perturbed(initial, 0.01, seed=i), initial), 0)
        result.next_round = honest[0].round(1, max_wait_s=20)
        result.round_done_s = time.monotonic() - flood_began
        head, data = honest[1].fetch(1)
        result.global_ok = head.sha256 == sha256_hex(data) and len(data) == head.wire_bytes > 0
        result.round_during_flood = attacker.alive()
        code = attacker.wait(FLOOD_S + 60)
        result.window = (flood_began, time.monotonic())
        assert code == 0, attacker.text()[-3000:]
        result.attacker = json.loads(out.read_text())
        result.metrics = scrape(agg["metrics"])
        t0 = time.monotonic()
        wait_for(
            lambda: fed.health.status(SERVICE_NAME) == "SERVING",
            HOLD_S + 10,
            "health to recover after the flood",
            [agg["proc"]],
            interval=0.1,
        )
        result.recovered_s = time.monotonic() - t0
        time.sleep(2.0)
        result.after = proc_status(fed.pid)
    finally:
        stop.set()
        attacker.stop()
        for t in threads:
            t.join(timeout=10)
    report = os.environ.get("FEDMEDCLIP_FLOOD_REPORT")
    if report:
        write_report(Path(report), result)
    return result


def _count(result: Flood, kind: str, code: str, reason: str | None = "any") -> int:
    return sum(
        1
        for k, c, r, _, _ in result.attacker["outcomes"]
        if k == kind and c == code and (reason == "any" or r == reason)
    )


def test_flood_extra_streams_and_long_polls_are_refused_and_stalled_ones_are_cancelled(flood):
    outcomes = flood.attacker["outcomes"]
    uploads = [o for o in outcomes if o[0] == "upload"]
    polls = [o for o in outcomes if o[0] == "poll"]
    assert len(uploads) >= FLOOD_STREAMS and len(polls) >= FLOOD_POLLS
    # beyond the node's limits: refused at once, naming the reason
    refused_up = [o for o in uploads if o[2] == Reason.TOO_MANY_STREAMS.name]
    refused_poll = [o for o in polls if o[2] == Reason.TOO_MANY_LONG_POLLS.name]
    assert refused_up and all(o[1] == "RESOURCE_EXHAUSTED" for o in refused_up)
    assert refused_poll and all(o[1] == "RESOURCE_EXHAUSTED" for o in refused_poll)
    # the admitted stalled uploads: cancelled by the watchdog within the stream deadline; at most MAX_STREAMS at once
    cancelled = [o for o in uploads if o[1] == "CANCELLED"]
    assert cancelled and all(GRACE_S <= o[3] < STREAM_TIMEOUT_S for o in cancelled), cancelled
    # each admitted stall lasts at least the grace, and the node has at most MAX_STREAMS at once (without the
    # limit, all FLOOD_STREAMS would stall each time)
    assert len(cancelled) <= MAX_STREAMS * (flood.attacker["seconds"] / GRACE_S + 1), len(cancelled)
    # grpc.aio's own race: a refusal that lands while the client's write is in flight ends the call with INTERNAL
    # "Internal error from Core" on the client, the server's status lost; the server's counts below show that
    # every one of them was a too_many_streams refusal
    lost = [o for o in uploads if o[1] == "INTERNAL"]
    assert {o[1] for o in uploads} <= {"RESOURCE_EXHAUSTED", "CANCELLED", "INTERNAL"}, {o[1] for o in uploads}
    assert {(o[1], o[2]) for o in polls} <= {("OK", None), ("RESOURCE_EXHAUSTED", Reason.TOO_MANY_LONG_POLLS.name)}

    # the aggregator's own account of the flood
    def counted(method: str, reason: str) -> float:
        return total(flood.metrics, "fedmedclip_requests_rejected_total", method=method, reason=reason) - total(
            flood.metrics_before, "fedmedclip_requests_rejected_total", method=method, reason=reason
        )

    assert counted("UploadUpdate", "stream_too_slow") == len(cancelled)
    assert counted("UploadUpdate", "too_many_streams") == len(refused_up) + len(lost)
    assert counted("GetRound", "too_many_long_polls") == len(refused_poll)


def test_flood_other_nodes_complete_their_round_and_their_heartbeats_stay_fast(flood):
    assert all(not ack.replayed and ack.round_id == 0 for ack in flood.acks.values()) and len(flood.acks) == 2
    assert flood.next_round is not None and flood.next_round.round_id == 1
    assert flood.global_ok
    assert flood.round_during_flood, "the round completed after the flood, not during it"
    during = flood.during()
    assert len(during) >= 100
    failed = [1 for beats in flood.heartbeats.values() for t, s, ok in beats if not ok]
    p99, base = percentile(during, 0.99), percentile(flood.baseline(), 0.99)
    seen = (
        f"heartbeat p99 {p99 * 1000:.1f} ms under the flood over {len(during)} heartbeats; {base * 1000:.1f} ms "
        f"just before it, without a flood (a high figure there is the machine's load, not the flood's)"
    )
    print(seen)
    # every heartbeat answered within its deadline (before the limits, they timed out after 3 s); the p99
    # itself is a speed figure, measured in bench/results/flood.md, not asserted on a shared machine
    assert not failed, f"{len(failed)} heartbeats failed; {seen}"


def test_flood_health_reports_overload_and_recovers_after(flood):
    a, b = flood.window
    during = [s for s in flood.samples if a <= s["t"] <= b]
    assert during and any(s["service"] == "NOT_SERVING" for s in during), during
    assert all(s["server"] == "SERVING" for s in flood.samples)  # liveness never flips under load
    # (and SERVING again after it: the fixture waited for that)
    # memory and threads stay bounded: the refused calls hold nothing
    peak_rss = max(s["rss"] for s in during)
    peak_threads = max(s["threads"] for s in during)
    assert peak_rss - flood.before[0] < 200, (flood.before, peak_rss)
    assert peak_threads <= flood.before[1] + MAX_WORKERS + 8, (flood.before, peak_threads)


# --------------------------------------------------------------------------- the report


def write_report(path: Path, r: Flood) -> None:
    a, b = r.window
    during = [s for s in r.samples if a <= s["t"] <= b]
    base, flooded = r.baseline(), r.during()

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.1f}" if values else "n/a"

    def n(kind: str, code: str, reason: str | None = "any") -> int:
        return _count(r, kind, code, reason)

    lines = [
        "# One hospital floods the aggregator (tests/test_dos.py)",
        "",
        "Produced by `FEDMEDCLIP_FLOOD_REPORT=bench/results/flood.md .venv/bin/python -m pytest -q "
        f"tests/test_dos.py` on this machine: {os.cpu_count()} cores, shared with the attacker, the honest nodes "
        f"and whatever else ran (load average {r.load[0]:.1f} as the flood began).",
        "",
        f"A real aggregator process (mTLS, `max_workers` {MAX_WORKERS}, `upload_slots` 4, `max_streams_per_node` "
        f"{MAX_STREAMS}, `max_long_polls_per_node` {MAX_POLLS}, `stream_timeout_s` {STREAM_TIMEOUT_S:g}, "
        f"`stream_grace_s` {GRACE_S:g}, `stream_min_rate_bps` {MIN_RATE}). One registered hospital keeps "
        f"{FLOOD_STREAMS} upload streams (header + 100 bytes, then a stall) and {FLOOD_POLLS} `GetRound` long "
        f"polls going over {CONNECTIONS} connections for {FLOOD_S:g} s, re-opening each {REOPEN_S:g} s after it "
        f"ends. Two honest hospitals heartbeat every {HEARTBEAT_EVERY_S * 1000:.0f} ms and complete a round in the "
        "middle of it.",
        "",
        f"The attacker made {len(r.attacker['outcomes'])} calls in {r.attacker['seconds']:.0f} s "
        f"({len(r.attacker['outcomes']) / r.attacker['seconds']:.0f}/s):",
        "",
        "| attacker's calls | count |",
        "|---|---|",
        f"| uploads refused `too_many_streams` (RESOURCE_EXHAUSTED) | {n('upload', 'RESOURCE_EXHAUSTED')} |",
        f"| uploads admitted, stalled, cancelled by the watchdog | {n('upload', 'CANCELLED')} |",
        f"| uploads refused, the status lost by the aio client (INTERNAL, a client-side race) | "
        f"{n('upload', 'INTERNAL')} |",
        f"| long polls refused `too_many_long_polls` | {n('poll', 'RESOURCE_EXHAUSTED')} |",
        f"| long polls admitted and answered | {n('poll', 'OK')} |",
        "",
    ]
    cut = sorted(o[3] for o in r.attacker["outcomes"] if o[0] == "upload" and o[1] == "CANCELLED")
    if cut:
        lines += [
            f"Stalled uploads were cancelled {cut[0]:.2f}-{cut[-1]:.2f} s after they opened "
            f"(grace {GRACE_S:g} s, deadline {STREAM_TIMEOUT_S:g} s).",
            "",
        ]
    lines += [
        "| honest nodes | before the flood | under the flood |",
        "|---|---|---|",
        f"| heartbeats measured | {len(base)} | {len(flooded)} |",
        f"| heartbeat round trip p50 (ms) | {ms(base, 0.5)} | {ms(flooded, 0.5)} |",
        f"| heartbeat round trip p99 (ms) | {ms(base, 0.99)} | {ms(flooded, 0.99)} |",
        f"| heartbeat round trip max (ms) | {ms(base, 1.0)} | {ms(flooded, 1.0)} |",
        f"| round completed (both updates in, round 2 open) | - | {r.round_done_s:.1f} s after the flood began |",
        "",
        "| aggregator process | before | under the flood (peak) | after |",
        "|---|---|---|---|",
        f"| RSS (MiB) | {r.before[0]:.0f} | {max((s['rss'] for s in during), default=math.nan):.0f} | "
        f"{r.after[0]:.0f} |",
        f"| threads | {r.before[1]} | {max((s['threads'] for s in during), default=0)} | {r.after[1]} |",
        f"| health of {SERVICE_NAME} | SERVING | NOT_SERVING in "
        f"{sum(s['service'] == 'NOT_SERVING' for s in during)}/{len(during)} samples | SERVING again "
        f"{r.recovered_s:.1f} s after the flood |",
        "",
    ]
    lines += [
        "Before this change (measured once, the same flood against `aggregator/service.py` and "
        "`shared/wire/transport.py` of commit c7eab1e, the fixture made to tolerate the failures): the honest "
        "heartbeats' p99 was 3004 ms (3 s client timeouts; p50 5.7 ms), their round completed only 28.5 s into the "
        "flood, when the attacker's stalled uploads reached their own 30 s deadline; every attacker upload ended "
        "DEADLINE_EXCEEDED on its side, the aggregator ran 77 threads (its 64 workers all taken) and health said "
        "SERVING throughout.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
