"""Hostile input against a running aggregator process, over real gRPC with mTLS, and the other way round.

The attacker holds a valid certificate (a compromised hospital, the realistic threat once strangers
are kept out by mTLS) and sends: random bytes as payloads and as whole protobuf messages (hypothesis),
fuzzed header sizes and rounds (hypothesis), truncated / gapped / repeated / reordered chunk streams,
wrong SHA-256, wrong shapes, NaN and Inf, zstd bombs (declaring their size, declaring none, lying about
it), a payload header holding a 5,000-digit integer, payloads in another codec or delta mode than the
federation's, round ids and versions beyond 32 bits, oversized messages and payloads, negative and
absurd sizes, a sample count changed by registering again mid-round, stale and future rounds, replays
with other bytes (under another SHA-256, and under the accepted one), other and unknown node ids,
newlines in every client string that can reach a log line, updates beyond the poisoning bounds, and
hostile evaluation reports (NaN and Inf, out-of-range numbers, a 3 MiB head, a 100 kB report id, a
second report of a version). Each must end with a typed gRPC status and an increment of
``fedmedclip_requests_rejected_total`` (one case, an oversized unary message, is refused by gRPC's
transport before any servicer code runs, so only its status is asserted). Every refusal of the
servicer's own also names, in the status details, the :class:`~shared.wire.reasons.Reason` expected
for the case (gRPC's own refusals, of messages too large or not protobuf, name none). The aggregator
must keep serving: a bystander process (another hospital's certificate) sends a heartbeat every few
milliseconds for the whole module, and each case's table row gives the slowest answer it got while
the case ran, which must stay within its normal latency (:data:`NORMAL_LATENCY_S`). The global model
after the round must equal, byte for byte, the one computed here from the two valid updates alone
with the federation's weights; ``report.json`` must stay strict JSON; no client string may forge a log
line.

A second aggregator shows the weight cap: a node claiming 10^9 training samples moves the global by
at most its share cap (``max_weight_share``, 0.5 by default), not 0.99999996 of the way.

The other direction: a fake, hostile aggregator (a real gRPC server in this process, with the
aggregator's certificate) answers a real hospital node process with malformed globals, chunks over
the message limit, streams that stall, globals that fail validation; the node refuses each with a
typed error, keeps its state, fetches again after a backoff, and finishes once a valid global comes.

The tally is printed and, with ``FEDMEDCLIP_HOSTILE_REPORT=path`` (``make bench-hostile``), written as
Markdown.

The protocol has no chunk sequence numbers: chunks of one upload ride one HTTP/2 stream, in order;
a repeated or missing chunk shows up as a length different from the announced ``wire_bytes`` or,
when the length is made to match, as a SHA-256 mismatch. Both are tried.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import grpc
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.light_client import Federation, LightNode, encode, perturbed
from hospital_node.state import StateStore
from shared.learning.aggregation import capped_weights, make_aggregator
from shared.learning.rounds import WireConfig, decode_adapter, encode_adapter, fold_update, publish_global
from shared.learning.training import TrainConfig, build_adapter, get_method
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.protocol import state_digest
from shared.wire.reasons import Reason, reason_of
from shared.wire.tls import server_credentials
from shared.wire.transport import channel_options, chunks, server_options, sha256_hex
from tests.services_support import (
    START_TIMEOUT,
    Cluster,
    free_port,
    provision_pki,
    read_json,
    scrape,
    start_aggregator_process,
    start_node,
    tls_of,
    total,
    wait_for,
)

FED = Federation(embed_dim=16)
NODES = ["hospital_1", "hospital_2", "hospital_3", "global"]  # hospital_3: allowed, never registers here
SAMPLES = {"hospital_1": 30, "hospital_2": 10}
EXAMPLES = 60  # per hypothesis test
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["AggregatorService"].methods]  # the SecAgg* RPCs too
REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.NOT_FOUND,
}
#: what a payload that is not a valid adapter of the federation can be refused for
PAYLOAD_REASONS = {
    Reason.CODEC_MISMATCH,
    Reason.CODEC,
    Reason.UNKNOWN_CODEC,
    Reason.CHECKSUM_MISMATCH,
    Reason.SHAPE_MISMATCH,
    Reason.NON_FINITE,
    Reason.PAYLOAD_TOO_LARGE,
    Reason.MALFORMED_PAYLOAD,
    Reason.REFERENCE_REQUIRED,
    Reason.WIRE_MISMATCH,
}
ANY = None  # no expectation about the reason (gRPC itself may refuse before the servicer)
#: "within their normal latency": the slowest heartbeat another hospital may get while a case runs. A
#: heartbeat takes a few ms on loopback; a stalled engine (a lock held by a decode, a blocked worker pool)
#: takes seconds. The table shows the measured figures next to the baseline before any case.
NORMAL_LATENCY_S = 1.0
FORGED = "FORGED-LOG-LINE"  # what every log-forging attempt tries to start a log line with
ROUND_BEYOND_32_BITS = 2**32  # read as round 0 when the wire truncates it to 32 bits

#: the bystander: another hospital's heartbeat, as fast as it is answered, timed, until killed
BYSTANDER = """
import sys, time
from pathlib import Path
from bench.light_client import Federation, LightNode
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from tests.services_support import tls_of
address, pki, node, run_id, out = sys.argv[1:6]
client = LightNode(address, node, tls_of(Path(pki), node), Federation(embed_dim=16))
with open(out, "a", buffering=1) as f:
    while True:
        start, t0 = time.time(), time.perf_counter()
        try:
            client.stub.Heartbeat(pb.HeartbeatRequest(run_id=run_id, node_id=node), timeout=30)
            ok = 1
        except Exception:
            ok = 0
        f.write(f"{start:.6f} {time.perf_counter() - t0:.6f} {ok}\\n")
        time.sleep(0.005)
"""


def outcome(call) -> tuple[grpc.StatusCode, Reason | None]:
    """The status code ``call()`` ends with (OK when it returns) and the Reason its status names."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), reason_of(exc)
    return grpc.StatusCode.OK, None


@dataclass
class Tally:
    """Every case tried, by category: what it ended with, and when it ran (for the bystander's figures)."""

    tried: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    counted: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    statuses: dict[str, set] = field(default_factory=dict)
    reasons: dict[str, set] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    windows: list[tuple[str, float, float]] = field(default_factory=list)
    own_aggregator: set[str] = field(default_factory=set)  # cases against the weight-cap aggregator
    node_side: list[dict] = field(default_factory=list)  # the other direction: a hostile aggregator


TALLY = Tally()


@dataclass
class Target:
    agg: dict
    nodes: dict[str, LightNode]
    valid: dict
    big: LightNode  # hospital_1 with a send limit far above the server's receive limit
    pki: Path
    bystander_log: Path
    tally: Tally = field(default_factory=lambda: TALLY)

    @property
    def h1(self) -> LightNode:
        return self.nodes["hospital_1"]

    def rejections(self) -> float:
        return total(scrape(self.agg["metrics"]), "fedmedclip_requests_rejected_total")

    def refuse(
        self, category: str, call, reasons: set[Reason] | None, codes=REFUSED, counted: bool = True
    ) -> grpc.StatusCode:
        """Run one hostile case: refused with one of ``codes`` naming one of ``reasons`` (None: any or none),
        and (``counted``) the rejection counter bumped."""
        t = self.tally
        before = self.rejections()
        start = time.time()
        code, reason = outcome(call)
        t.windows.append((category, start, time.time()))
        t.tried[category] += 1
        assert code in codes, f"{category}: {code}"
        assert reasons is None or reason in reasons, f"{category}: {reason}"
        assert reason is None or code == reason.code, f"{category}: {code} for {reason}"
        t.rejected[category] += 1
        t.statuses.setdefault(category, set()).add(code.name)
        if reason is not None:
            t.reasons.setdefault(category, set()).add(reason.value)
        if counted:  # the status can reach the client before the servicer has finished counting
            wait_for(
                lambda: self.rejections() >= before + 1,
                10,
                f"{category}: a rejection to be counted",
                [self.agg["proc"]],
                interval=0.02,
            )
            t.counted[category] += 1
        return code

    def accept(self, category: str, call, note: str = ""):
        """Run one case the aggregator answers OK by design (a replay, an escaped string); its result."""
        start = time.time()
        result = call()
        self.tally.windows.append((category, start, time.time()))
        self.tally.tried[category] += 1
        self.tally.accepted[category] += 1
        self.tally.statuses.setdefault(category, set()).add("OK")
        if note:
            self.tally.notes[category] = note
        return result


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    pki = provision_pki(root / "pki", NODES)
    cluster = Cluster(root)
    nodes: dict[str, LightNode] = {}
    try:
        agg = start_aggregator_process(
            cluster,
            pki,
            root / "agg",
            "--rounds",
            "1",
            "--min-nodes",
            "2",
            "--embed-dim",
            str(FED.embed_dim),
            "--round-timeout-s",
            "600",
            "--linger-s",
            "600",
            "--exit-when-done",
            "false",
        )
        agg["out"] = root / "agg"
        nodes = {
            n: LightNode(agg["address"], n, tls_of(pki, n), FED, num_train=SAMPLES.get(n, 0), evaluator=n == "global")
            for n in NODES
        }
        for n in ("hospital_1", "hospital_2", "global"):
            nodes[n].register()
        nodes["hospital_3"].run_id = nodes["hospital_1"].run_id
        info = nodes["hospital_1"].round(0, max_wait_s=10)
        assert info.phase == pb.ROUND_PHASE_COLLECTING and info.round_id == 0
        initial = FED.initial_state()
        valid = {n: encode(perturbed(initial, 0.01, seed=i), initial) for i, n in enumerate(SAMPLES, start=1)}
        big_opts = [o for o in channel_options() if o[0] != "grpc.max_send_message_length"]
        big = LightNode(
            agg["address"],
            "hospital_1",
            tls_of(pki, "hospital_1"),
            FED,
            options=big_opts + [("grpc.max_send_message_length", 64 * 1024 * 1024)],
        )
        big.run_id = nodes["hospital_1"].run_id
        nodes["_big"] = big
        bystander_log = root / "bystander.txt"
        cluster.add(
            "bystander",
            ["-c", BYSTANDER, agg["address"], str(pki), "hospital_2", nodes["hospital_2"].run_id, str(bystander_log)],
        )
        wait_for(lambda: len(_samples(bystander_log)) >= 50, 60, "the bystander's first heartbeats", cluster.procs)
        yield Target(
            agg=agg, nodes=nodes, valid=valid | {"initial": initial}, big=big, pki=pki, bystander_log=bystander_log
        )
    finally:
        for node in nodes.values():
            node.close()
        cluster.close()


def _samples(path: Path) -> list[tuple[float, float, bool]]:
    """The bystander's heartbeats: (start, seconds, answered)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((float(parts[0]), float(parts[1]), parts[2] == "1"))
    return out


def _raw_payload_upload(node: LightNode, data: bytes, codec: str = "int8", **header):
    head = pb.PayloadHeader(
        run_id=node.run_id,
        round_id=0,
        node_id=node.node_id,
        update_id="hostile",
        codec=codec,
        wire_bytes=len(data),
        sha256=sha256_hex(data),
    )
    head.MergeFrom(pb.PayloadHeader(**header))
    return lambda: node.upload_messages(
        [pb.UploadUpdateRequest(header=head)] + [pb.UploadUpdateRequest(chunk=c) for c in chunks(data, 4096)]
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _with_field(message, number: int, value: int) -> bytes:
    """``message`` serialized, plus varint field ``number`` = ``value`` (the last value of a field wins):
    how a client not bound by the generated code's 32-bit range sends a 64-bit round id."""
    return message.SerializeToString() + _varint(number << 3) + _varint(value)


def _frame(message_field: int, body: bytes) -> bytes:
    """A length-delimited field: ``body`` (a serialized message) as field ``message_field``."""
    return _varint(message_field << 3 | 2) + _varint(len(body)) + body


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_payload_are_refused(target, data):
    target.refuse(
        "random payload bytes",
        _raw_payload_upload(target.h1, data),
        PAYLOAD_REASONS,
        {grpc.StatusCode.INVALID_ARGUMENT},
    )


@FUZZ
@given(method=st.sampled_from(METHODS), data=st.binary(min_size=1, max_size=512))
def test_random_bytes_as_protobuf_messages_are_refused(target, method, data):
    path = f"/fedmedclip.v1.AggregatorService/{method}"
    channel = target.h1.channel
    if method == "UploadUpdate":
        call = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
        target.refuse("random protobuf bytes", lambda: call(iter([data, data]), timeout=10), ANY)
    elif method == "FetchGlobal":
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        target.refuse("random protobuf bytes", lambda: list(call(data, timeout=10)), ANY)
    else:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        target.refuse("random protobuf bytes", lambda: call(data, timeout=10), ANY)


@FUZZ
@given(
    wire_bytes=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    round_id=st.integers(-(2**31), 2**31 - 1),
    chunk=st.integers(min_value=1, max_value=64 * 1024),
    which=st.sampled_from(["size", "round"]),
)
def test_fuzzed_sizes_and_rounds_are_refused(target, wire_bytes, round_id, chunk, which):
    payload = target.valid["hospital_1"]
    if which == "size":
        if wire_bytes == len(payload.data):
            wire_bytes += 1
        call = lambda: target.h1.upload(payload, 0, chunk_bytes=chunk, wire_bytes=wire_bytes)  # noqa: E731
        target.refuse("negative or absurd sizes", call, {Reason.BAD_STREAM}, {grpc.StatusCode.INVALID_ARGUMENT})
    else:
        round_id = round_id if round_id != 0 else 1
        call = lambda: target.h1.upload(payload, round_id, chunk_bytes=chunk)  # noqa: E731
        target.refuse(
            "stale and future rounds",
            call,
            {Reason.STALE_ROUND, Reason.FUTURE_ROUND},
            {grpc.StatusCode.FAILED_PRECONDITION},
        )


def _int8_raw() -> bytes:
    """The decompressed bytes of a valid int8 payload of the federation (prefix, header, body)."""
    return zstandard.ZstdDecompressor().decompress(encode(FED.initial_state(), FED.initial_state()).data)


def _bomb(declared: bool) -> bytes:
    """A valid int8 FMCS prefix and header, then 96 MiB of zeros: a few KB compressed, over the 64 MiB cap."""
    raw = _int8_raw()
    zeros, n = bytes(1 << 20), 96
    cobj = zstandard.ZstdCompressor(level=3).compressobj(size=len(raw) + n * len(zeros) if declared else -1)
    out = [cobj.compress(raw)] + [cobj.compress(zeros) for _ in range(n)] + [cobj.flush()]
    return b"".join(out)


def _lying_bomb() -> bytes:
    """The declared bomb with its Frame_Content_Size rewritten to the honest payload's size: a frame
    that says it holds one adapter and holds 96 MiB."""
    data = bytearray(_bomb(declared=True))
    fhd = data[4]
    assert fhd >> 6 == 2  # a 4-byte content size field
    offset = 5 + (0 if fhd & 0x20 else 1) + [0, 1, 2, 4][fhd & 0x03]
    data[offset : offset + 4] = struct.pack("<I", len(_int8_raw()))
    return bytes(data)


def _state_with(value: float, codec: str = "int8") -> bytes:
    """A payload of the federation's codec holding ``value`` (NaN/Inf), past the encoder's own finiteness check."""
    state = FED.initial_state()
    state["fc1.threshold"][0] = value  # a weight row holding NaN would be masked off, not sent; 1-D: float16
    with mock.patch("shared.codec._check_finite", lambda *a, **k: None):
        return encode(state, FED.initial_state(), codec).data


def _huge_integer_header() -> bytes:
    """An int8 payload whose header names a dimension of 5,000 digits (Python's int-string limit is 4,300)."""
    raw = _int8_raw()
    hlen = struct.unpack_from("<I", raw, 6)[0]
    header = json.loads(raw[10 : 10 + hlen])
    header["tensors"][0]["shape"][0] = 0  # a placeholder, replaced by the digits below
    text = json.dumps(header, separators=(",", ":")).replace('"shape":[0,', '"shape":[' + "7" * 5000 + ",", 1)
    blob = text.encode()
    return zstandard.ZstdCompressor().compress(struct.pack("<4sHI", b"FMCS", 1, len(blob)) + blob + raw[10 + hlen :])


def test_malformed_streams_and_payloads_are_refused(target):
    t, h1 = target, target.h1
    payload = t.valid["hospital_1"]
    parts = list(chunks(payload.data, 64))
    assert len(parts) >= 6
    head = h1.header(payload, 0)

    def stream(messages):
        return lambda: h1.upload_messages(messages)

    H = pb.UploadUpdateRequest(header=head)
    C = [pb.UploadUpdateRequest(chunk=c) for c in parts]
    bad_stream = {Reason.BAD_STREAM}
    t.refuse("truncated chunk stream", stream([H] + C[: len(C) // 2]), bad_stream)
    t.refuse("truncated chunk stream", stream([H]), bad_stream)
    t.refuse("missing chunk", stream([H] + C[:2] + C[3:]), bad_stream)
    t.refuse("repeated chunk", stream([H] + C[:3] + C[2:]), bad_stream)
    longer = replace_header(head, wire_bytes=len(payload.data) + len(parts[2]))
    t.refuse("repeated chunk", stream([pb.UploadUpdateRequest(header=longer)] + C[:3] + C[2:]), PAYLOAD_REASONS)
    t.refuse("reordered chunks", stream([H, C[1], C[0]] + C[2:]), PAYLOAD_REASONS)
    t.refuse("second header mid-stream", stream([H] + C[:2] + [H] + C[2:]), bad_stream)
    t.refuse("no header", stream(C), bad_stream)
    t.refuse("no header", stream([]), bad_stream)
    for sha in ("0" * 64, "f" * 64, "not-hex", ""):
        t.refuse("wrong SHA-256", lambda sha=sha: h1.upload(payload, 0, sha256=sha), {Reason.CHECKSUM_MISMATCH})
    for dim_state in (
        Federation(embed_dim=32).initial_state(),
        FED.initial_state() | {"extra": torch.zeros(2, 2)},
        {k: v for k, v in FED.initial_state().items() if k != "fc2.bias"},
    ):
        wrong = encode(dim_state, dim_state)
        t.refuse("wrong shapes", lambda wrong=wrong: h1.upload(wrong, 0), {Reason.SHAPE_MISMATCH})
    for value in (float("nan"), float("inf"), float("-inf")):
        t.refuse("NaN or Inf", _raw_payload_upload(h1, _state_with(value)), {Reason.NON_FINITE})
    bomb = _bomb(declared=True)
    assert len(bomb) < 64 * 1024
    t.refuse("zstd bomb declaring 96 MiB", _raw_payload_upload(h1, bomb), {Reason.PAYLOAD_TOO_LARGE})
    t.refuse(
        "zstd frame declaring no size (refused before decompressing)",
        _raw_payload_upload(h1, _bomb(declared=False)),
        {Reason.MALFORMED_PAYLOAD},
    )
    t.refuse(
        "zstd frame lying about its size (stopped after one template's size)",
        _raw_payload_upload(h1, _lying_bomb()),
        {Reason.MALFORMED_PAYLOAD, Reason.PAYLOAD_TOO_LARGE},
    )
    t.refuse(
        "5,000-digit integer in the payload header",
        _raw_payload_upload(h1, _huge_integer_header()),
        {Reason.MALFORMED_PAYLOAD},
    )
    t.refuse("codec mismatch (header vs payload)", lambda: h1.upload(payload, 0, codec="fp16"), {Reason.CODEC_MISMATCH})
    initial = t.valid["initial"]
    other_codec = encode(perturbed(initial, 0.01, seed=7), initial, "fp32")
    t.refuse(
        "payload in another codec than the federation's", lambda: h1.upload(other_codec, 0), {Reason.WIRE_MISMATCH}
    )
    delta = encode_adapter(perturbed(initial, 0.01, seed=8), initial, WireConfig(delta=True))
    t.refuse("delta payload in a federation without delta", lambda: h1.upload(delta, 0), {Reason.WIRE_MISMATCH})
    big = target.big
    t.refuse(
        "oversized message",
        lambda: big.upload_messages([H, pb.UploadUpdateRequest(chunk=bytes(5 << 20))]),
        {None},
        {grpc.StatusCode.RESOURCE_EXHAUSTED},
    )  # gRPC answers; the servicer counts stream_broken
    t.refuse(
        "oversized message",
        lambda: big.stub.Heartbeat(pb.HeartbeatRequest(run_id="x" * (5 << 20), node_id="hospital_1"), timeout=10),
        {None},
        {grpc.StatusCode.RESOURCE_EXHAUSTED},
        counted=False,
    )  # gRPC's transport refuses it before any servicer code runs
    t.refuse("oversized payload", lambda: big.upload(payload, 0, wire_bytes=65 << 20), bad_stream)
    huge = replace_header(head, wire_bytes=66 << 20, update_id="huge")
    t.refuse(
        "oversized payload",
        lambda: big.upload_messages(  # 66 MiB announced and streamed
            [pb.UploadUpdateRequest(header=huge)] + [pb.UploadUpdateRequest(chunk=bytes(1 << 20))] * 66
        ),
        bad_stream,
    )
    for n in (-1, 10**15):
        t.refuse("negative or absurd sizes", lambda n=n: h1.register(num_train_samples=n), {Reason.BAD_SAMPLE_COUNT})
    t.refuse("negative or absurd sizes", lambda: h1.register(embed_dim=-5), {Reason.REGISTRATION_MISMATCH})
    t.refuse(
        "negative or absurd sizes", lambda: h1.upload(payload, 0, num_train_samples=10**15), {Reason.BAD_SAMPLE_COUNT}
    )  # not the count hospital_1 registered
    t.refuse("bad update id", lambda: h1.upload(payload, 0, update_id=""), {Reason.BAD_UPDATE_ID})
    t.refuse("bad update id", lambda: h1.upload(payload, 0, update_id="u" * 10_000), {Reason.BAD_UPDATE_ID})
    t.refuse("wrong run id", lambda: h1.upload(payload, 0, run_id="another-run"), {Reason.WRONG_RUN})
    for version in (0, -1, 2**31 - 1):
        t.refuse("absent global version", lambda v=version: h1.fetch(v), {Reason.NO_SUCH_VERSION})
    t.refuse(
        "absent global version",
        lambda: h1.stub.ReportMetrics(
            pb.ReportMetricsRequest(run_id=h1.run_id, node_id="hospital_1", version=99, report_id="r"), timeout=10
        ),
        {Reason.NO_SUCH_VERSION},
    )
    t.refuse(
        "poisoning: norm",
        lambda: h1.upload(encode({k: v + 5.0 for k, v in initial.items()}, initial), 0),
        {Reason.UPDATE_NORM_TOO_LARGE},
    )
    spike = {k: v.clone() for k, v in initial.items()}
    spike["fc2.weight"][3, 3] = 500.0
    t.refuse("poisoning: value", lambda: h1.upload(encode(spike, initial), 0), {Reason.UPDATE_VALUE_TOO_LARGE})
    t.refuse("evaluator upload", lambda: t.nodes["global"].upload(payload, 0), {Reason.NOT_TRAINER})


def replace_header(head: pb.PayloadHeader, **fields) -> pb.PayloadHeader:
    new = pb.PayloadHeader()
    new.CopyFrom(head)
    for k, v in fields.items():
        setattr(new, k, v)
    return new


def test_a_sample_count_is_fixed_at_the_first_registration(target):
    """Registering again mid-round with another count was the way to re-weigh oneself: now refused."""
    t, h1 = target, target.h1
    for n in (10**9, 31, 1):
        t.refuse(
            "sample count changed by registering again mid-round",
            lambda n=n: h1.register(num_train_samples=n),
            {Reason.SAMPLE_COUNT_CHANGED},
        )
    again = t.accept("registering again with the same count", lambda: h1.register())
    assert again.round.phase == pb.ROUND_PHASE_COLLECTING


def test_client_strings_cannot_forge_log_lines(target):
    """Every client string that can reach a log line, with a newline and a fake line after it."""
    t, h1 = target, target.h1
    payload = t.valid["hospital_1"]
    forged = f"\n{FORGED}"
    t.refuse("newline in update_id", lambda: h1.upload(payload, 0, update_id="u" + forged), {Reason.BAD_UPDATE_ID})
    t.refuse("newline in run_id", lambda: h1.upload(payload, 0, run_id="r" + forged), {Reason.WRONG_RUN})
    t.refuse("newline in the codec name", lambda: h1.upload(payload, 0, codec="int8" + forged), {Reason.CODEC_MISMATCH})
    t.refuse(
        "newline in fingerprint or class names",
        lambda: h1.register(backbone_fingerprint="f" + forged),
        {Reason.REGISTRATION_MISMATCH},
    )
    t.refuse(
        "newline in fingerprint or class names",
        lambda: h1.register(class_names=["glioma" + forged, "meningioma", "notumor", "pituitary"]),
        {Reason.REGISTRATION_MISMATCH},
    )
    # report_id: after the round, when a report can reach its checks (test_reports_are_validated...)
    t.accept(
        "newline in software_version (kept, escaped in the log)",
        lambda: h1.register(software_version="9.9" + forged),
        note="registration accepted, logged escaped",
    )


def test_other_and_unknown_node_ids_and_replays(target):
    t, h1 = target, target.h1
    payload = t.valid["hospital_1"]
    for claimed in ("hospital_2", "hospital_9", "", "h" * 300, "../../etc/passwd"):
        t.refuse(
            "other or unknown node id",
            lambda c=claimed: h1.upload(payload, 0, node_id=c),
            {Reason.IDENTITY_MISMATCH},
            {grpc.StatusCode.PERMISSION_DENIED},
        )
        t.refuse(
            "other or unknown node id",
            lambda c=claimed: h1.stub.Heartbeat(pb.HeartbeatRequest(run_id=h1.run_id, node_id=c), timeout=10),
            {Reason.IDENTITY_MISMATCH},
            {grpc.StatusCode.PERMISSION_DENIED},
        )
    stranger = t.nodes["hospital_3"]  # allowed and certified, never registered
    t.refuse(
        "other or unknown node id",
        lambda: stranger.upload(payload, 0),
        {Reason.UNKNOWN_NODE},
        {grpc.StatusCode.UNAUTHENTICATED},
    )
    first = h1.upload(payload, 0)  # the one valid update of hospital_1
    assert not first.replayed
    again = t.accept(
        "exact replay (answered replayed=true, not counted)",
        lambda: h1.upload(payload, 0),
        note="the same bytes again: the same answer, folded once",
    )
    assert again.replayed and again.update_id == first.update_id
    other = encode(perturbed(t.valid["initial"], 0.01, seed=99), t.valid["initial"])
    t.refuse(
        "replay with other bytes",
        lambda: h1.upload(other, 0),
        {Reason.CONFLICTING_REPLAY},
        {grpc.StatusCode.ALREADY_EXISTS},
    )
    # the accepted id and the accepted SHA-256, other bytes: the bytes are hashed before a replay is answered
    junk = os.urandom(len(payload.data))
    t.refuse(
        "replay: the accepted id and SHA-256, other bytes",
        _raw_payload_upload(h1, junk, update_id=first.update_id, sha256=payload.sha256),
        {Reason.CHECKSUM_MISMATCH},
        {grpc.StatusCode.INVALID_ARGUMENT},
    )
    t.refuse(
        "second update in a round",
        lambda: h1.upload(other, 0, update_id="hostile-2"),
        {Reason.CONFLICTING_UPDATE},
        {grpc.StatusCode.ALREADY_EXISTS},
    )


def test_aggregator_keeps_serving_and_the_global_equals_the_valid_updates_alone(target):
    t = target
    h2 = t.nodes["hospital_2"]
    assert t.agg["proc"].alive()
    h2.upload(t.valid["hospital_2"], 0)
    info = h2.round(1, max_wait_s=20)
    assert info.phase == pb.ROUND_PHASE_FINISHED and info.global_version == 1
    header, data = h2.fetch(1)
    initial = t.valid["initial"]
    weights = capped_weights(SAMPLES, max_samples=1_000_000, max_share=0.5)  # the aggregator's defaults
    assert weights == {"hospital_1": 10.0, "hospital_2": 10.0}  # two nodes, a 0.5 share cap: equal weights
    expected = make_aggregator("weighted")
    for node in ("hospital_1", "hospital_2"):
        p = t.valid[node]
        fold_update(expected, p.data, p.sha256, initial, weights[node], WireConfig())
    want, _ = publish_global(expected, initial, WireConfig())
    assert data == want.data and header.sha256 == want.sha256
    t.refuse(
        "stale round", lambda: t.h1.upload(t.valid["hospital_1"], 0, update_id="late"), {Reason.ROUND_NOT_OPEN}
    )  # the run's one round closed: no round is open any more
    metrics = scrape(t.agg["metrics"])
    assert total(metrics, "fedmedclip_updates_accepted_total") == 2
    assert total(metrics, "fedmedclip_updates_replayed_total") == 1
    assert read_json(t.agg["out"] / "report.json")["rounds_log"][0]["weights"] == weights
    assert t.agg["proc"].alive()


def test_round_ids_and_versions_beyond_32_bits_are_refused_not_truncated(target):
    """A client not bound by the generated code sends a 64-bit round id: read as 32 bits, it was round 0 (and,
    with the round open, an accepted update), version 2^32 + 1 was version 1. Run once the round is closed, so
    that a wire that still truncates fails this test alone, not the rest of the module."""
    t, h1 = target, target.h1
    payload = t.valid["hospital_1"]
    head = _with_field(h1.header(payload, 0, update_id="wide-round"), 2, ROUND_BEYOND_32_BITS)
    messages = [_frame(1, head)] + [pb.UploadUpdateRequest(chunk=c).SerializeToString() for c in chunks(payload.data)]
    upload = h1.channel.stream_unary(
        "/fedmedclip.v1.AggregatorService/UploadUpdate", request_serializer=None, response_deserializer=None
    )
    t.refuse("round id beyond 32 bits", lambda: upload(iter(messages), timeout=10), {Reason.BAD_ROUND_ID})
    fetch = h1.channel.unary_stream(
        "/fedmedclip.v1.AggregatorService/FetchGlobal", request_serializer=None, response_deserializer=None
    )
    request = _with_field(pb.FetchGlobalRequest(run_id=h1.run_id, node_id="hospital_1"), 3, 2**32 + 1)
    t.refuse("global version beyond 32 bits", lambda: list(fetch(request, timeout=10)), {Reason.BAD_ROUND_ID})


def _metrics(**values) -> pb.EvalMetrics:
    base = dict(num_samples=20, accuracy=0.5, balanced_accuracy=0.5, macro_f1=0.5, ece=0.1)
    return pb.EvalMetrics(**(base | values))


def _strict(text: str):
    """``json.loads`` as a strict RFC 8259 parser: NaN, Infinity and -Infinity are not JSON."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_reports_are_validated_bounded_and_strict_json(target):
    t, h1, h2, ev = target, target.h1, target.nodes["hospital_2"], target.nodes["global"]

    def report(node: LightNode, **fields):
        request = pb.ReportMetricsRequest(
            run_id=node.run_id,
            node_id=node.node_id,
            version=1,
            report_id=f"{node.node_id}-v1",
            head="ensemble",
            val=_metrics(),
            test=_metrics(),
        )
        for key, value in fields.items():
            if hasattr(value, "DESCRIPTOR") or value is None:  # a message field: replaced, or cleared
                request.ClearField(key)
                if value is not None:
                    getattr(request, key).CopyFrom(value)
            else:
                setattr(request, key, value)
        return lambda: node.stub.ReportMetrics(request, timeout=10)

    bad = {Reason.BAD_REPORT}
    for value in (float("nan"), float("inf"), float("-inf")):
        t.refuse("report: NaN or Inf metrics", report(h1, val=_metrics(accuracy=value)), bad)
        t.refuse("report: NaN or Inf metrics", report(h1, test=_metrics(ece=value)), bad)
    t.refuse("report: NaN or Inf metrics", report(h1, train=pb.TrainSummary(steps=1, seconds=math.nan)), bad)
    for metrics in (
        _metrics(accuracy=7.0),
        _metrics(macro_f1=-0.5),
        _metrics(num_samples=-1),
        _metrics(num_samples=10**12),
    ):
        t.refuse("report: numbers out of range", report(h1, val=metrics), bad)
    t.refuse("report: 3 MiB head", report(h1, head="h" * (3 << 20)), bad)
    t.refuse("report: unknown head", report(h1, head="best-of-both"), bad)
    t.refuse("report: 100 kB report_id", report(h1, report_id="r" * 100_000), bad)
    forged = f"\n{FORGED}"
    t.refuse("newline in report_id", report(h1, report_id="r" + forged), bad)
    reports_log = t.agg["out"] / "checkpoint" / "reports.jsonl"
    assert not reports_log.exists()  # nothing refused was kept
    # honest reports: hospital_2's val split is empty (n = 0: NaN is its "no value"), stored as null
    assert not t.accept("report: valid", report(h1)).replayed
    empty = _metrics(num_samples=0, accuracy=math.nan, balanced_accuracy=math.nan, macro_f1=math.nan, ece=math.nan)
    assert not t.accept("report: valid", report(h2, val=empty), note="an empty split's NaN is stored as null").replayed
    assert not t.accept("report: valid", report(ev, val=None, head="clip")).replayed
    assert t.accept("report: valid", report(h1)).replayed  # the same id again: a replay
    t.refuse(
        "report: a second report of a version under another id",
        report(h1, report_id="hospital_1-v1-again", val=_metrics(accuracy=1.0)),
        {Reason.CONFLICTING_REPORT},
    )
    # every node's final evaluation is in: report.json is written, and it is strict JSON
    final = wait_for(
        lambda: (read_json(t.agg["out"] / "report.json") or {}).get("history"), 20, "the final report", [t.agg["proc"]]
    )
    text = (t.agg["out"] / "report.json").read_text()
    report_json = _strict(text)
    assert "NaN" not in text and "Infinity" not in text
    assert final[0]["test_accuracy"] == {"hospital_1": 0.5, "hospital_2": 0.5, "global": 0.5}
    assert report_json["history"][0]["mean_val_accuracy"] == 0.5  # hospital_2's empty split has no value
    lines = reports_log.read_text().splitlines()
    assert len(lines) == 3 and all(_strict(line) for line in lines)
    assert reports_log.stat().st_size < 2_000  # one bounded line per report; never the 3 MB of before
    assert _strict(lines[1])["entry"]["val"]["accuracy"] is None
    gauge = [v for _, v in scrape(t.agg["metrics"]).get("fedmedclip_validation_accuracy_ratio", [])]
    assert gauge and all(math.isfinite(v) for v in gauge)


def test_no_client_string_forged_a_log_line(target):
    log_text = target.agg["proc"].text()
    assert FORGED in log_text  # the attempts reached the log...
    assert not [line for line in log_text.splitlines() if line.startswith(FORGED)]
    assert f"\\n{FORGED}" in log_text  # ...escaped, inside the line that logged them


# --------------------------------------------------------------------------- the weight cap


def test_a_node_claiming_1e9_samples_moves_the_global_by_at_most_its_cap(target, tmp_path_factory):
    """Item 2 of the review: with sample-weighted averaging, a node registering 10^9 samples moved the global
    0.99999996 of the way to its update. Now its weight is water-filled to the share cap (0.5 by default)."""
    root = tmp_path_factory.mktemp("weights")
    cluster = Cluster(root)
    claims = {"hospital_1": 30, "hospital_2": 10, "hospital_3": 10**9}
    wire = WireConfig(codec="fp32", drop_masked_rows=False)  # lossless both ways: the share is read exactly
    nodes: dict[str, LightNode] = {}
    try:
        agg = start_aggregator_process(
            cluster,
            target.pki,
            root / "agg",
            "--rounds",
            "1",
            "--min-nodes",
            "3",
            "--codec",
            "fp32",
            "--drop-masked-rows",
            "false",
            "--embed-dim",
            str(FED.embed_dim),
            "--round-timeout-s",
            "600",
            "--linger-s",
            "600",
            "--exit-when-done",
            "false",
        )
        agg["out"] = root / "agg"
        nodes = {n: LightNode(agg["address"], n, tls_of(target.pki, n), FED, num_train=c) for n, c in claims.items()}
        own = Target(
            agg=agg, nodes=nodes, valid={}, big=nodes["hospital_1"], pki=target.pki, bystander_log=target.bystander_log
        )
        for node in nodes.values():
            node.register()  # the liar's 10^9 is in range: registration accepts it, the weights cap it
        assert nodes["hospital_1"].round(0, max_wait_s=10).phase == pb.ROUND_PHASE_COLLECTING
        category = "sample count changed by registering again mid-round (weight-cap aggregator)"
        TALLY.own_aggregator.add(category)
        own.refuse(category, lambda: nodes["hospital_3"].register(num_train_samples=5), {Reason.SAMPLE_COUNT_CHANGED})
        own.refuse(
            category, lambda: nodes["hospital_1"].register(num_train_samples=10**9), {Reason.SAMPLE_COUNT_CHANGED}
        )
        initial = FED.initial_state()
        g = torch.Generator().manual_seed(11)
        push = {k: torch.randn(v.shape, generator=g) for k, v in initial.items()}
        norm = math.sqrt(sum(float((v**2).sum()) for v in push.values()))
        states = {
            "hospital_1": perturbed(initial, 0.01, seed=1),
            "hospital_2": perturbed(initial, 0.01, seed=2),
            "hospital_3": {k: initial[k] + push[k] * (40.0 / norm) for k in initial},
        }  # under the norm bound
        payloads = {n: encode_adapter(s, initial, wire) for n, s in states.items()}
        for n in ("hospital_1", "hospital_2"):
            nodes[n].upload(payloads[n], 0)
        liar = "1e9 training samples claimed, weighted rule (weight-cap aggregator)"
        TALLY.own_aggregator.add(liar)
        own.accept(liar, lambda: nodes["hospital_3"].upload(payloads["hospital_3"], 0))
        info = nodes["hospital_1"].round(1, max_wait_s=20)
        assert info.phase == pb.ROUND_PHASE_FINISHED
        header, data = nodes["hospital_1"].fetch(1)
    finally:
        for node in nodes.values():
            node.close()
        cluster.close()
    weights = capped_weights(claims, max_samples=1_000_000, max_share=0.5)
    assert weights == {"hospital_1": 30.0, "hospital_2": 10.0, "hospital_3": 40.0}
    expected = make_aggregator("weighted")
    for n, p in payloads.items():
        fold_update(expected, p.data, p.sha256, initial, weights[n], wire)
    assert data == publish_global(expected, initial, wire)[0].data  # the aggregator used exactly these weights
    got = decode_adapter(data, header.sha256, initial, wire).tensors
    honest = {k: (30 * states["hospital_1"][k] + 10 * states["hospital_2"][k]) / 40 for k in initial}
    toward = {k: states["hospital_3"][k] - honest[k] for k in initial}
    moved = sum(float(((got[k] - honest[k]) * toward[k]).sum()) for k in initial) / sum(
        float((toward[k] ** 2).sum()) for k in initial
    )
    uncapped = 10**9 / (10**9 + 40)
    assert moved <= 0.5 + 1e-5 and moved == pytest.approx(0.5, abs=1e-5)
    assert uncapped > 0.9999999
    TALLY.notes[liar] = (
        f"accepted, weight capped 10^9 -> 40 of 80: the global moved {moved:.6f} of the way to its "
        f"update (uncapped: {uncapped:.8f})"
    )
    TALLY.notes["_weights"] = (
        f"A node claiming 10^9 training samples next to two honest ones (30 and 10) weighs 40 "
        f"(water-filled to the 0.5 share cap): the published global moved {moved:.6f} of the "
        f"way from the honest nodes' average to its update, where the uncapped sample-weighted "
        f"average moved {uncapped:.8f} of the way."
    )


# --------------------------------------------------------------------------- the other direction

RUN = "hostile-run"
#: what the fake aggregator answers to FetchGlobal v1, in turn: (case, the node's expected answer)
HOSTILE_GLOBALS = [
    ("random bytes as the global", "malformed_payload"),
    ("no header first", "bad_stream"),
    ("more bytes than announced", "bad_stream"),
    ("fewer bytes than announced", "bad_stream"),
    ("chunk over gRPC's 4 MiB message limit", "RESOURCE_EXHAUSTED"),
    ("stalled stream (header, then nothing)", "DEADLINE_EXCEEDED"),
    ("wrong SHA-256", "checksum_mismatch"),
    ("NaN in the global", "non_finite"),
    ("wrong shapes (another embedding width)", "shape_mismatch"),
    ("zstd bomb declaring 96 MiB", "payload_too_large"),
    ("zstd frame declaring no size", "malformed_payload"),
    ("another codec than the one announced (fp32)", "wire_mismatch"),
    ("another version in the header", "bad_round_id"),
    ("the valid global", "accepted"),
]
STALL_S = 3.0  # the node's transfer_timeout_s in this test


class HostileAggregator(pb_grpc.AggregatorServiceServicer):
    """An aggregator that answers FetchGlobal v1 with :data:`HOSTILE_GLOBALS`, one per call, then behaves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fetches: list[tuple[str, int, float]] = []  # (case, version asked for, time)
        self.reports: list[tuple[int, float]] = []
        self.uploads: list[tuple[pb.PayloadHeader, bytes, float]] = []
        self.initial: dict[str, torch.Tensor] | None = None
        self.v1 = None  # the valid global's payload
        self.v1_state: dict[str, torch.Tensor] | None = None

    def _info(self, phase=pb.ROUND_PHASE_COLLECTING) -> pb.RoundInfo:
        return pb.RoundInfo(
            run_id=RUN,
            round_id=1,
            global_version=1,
            total_rounds=2,
            phase=phase,
            registered_trainers=1,
            message="hostile" + "\n" + FORGED,
        )

    def Register(self, request, context):
        with self.lock:
            if self.initial is None:
                initial = build_adapter(get_method(request.method), request.embed_dim, TrainConfig(), 0).travel_state()
                assert state_digest(initial) == request.initial_state_sha256
                self.initial = initial
                self.v1 = encode_adapter(perturbed(initial, 0.01, seed=5), initial, WireConfig())
                self.v1_state = decode_adapter(self.v1.data, self.v1.sha256, initial, WireConfig()).tensors
        return pb.RegisterResponse(
            round=self._info(),
            codec="int8",
            delta=False,
            drop_masked_rows=True,
            heartbeat_interval_ms=1000,
            max_chunk_bytes=1 << 20,
        )

    def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(round=self._info())

    def GetRound(self, request, context):
        done = request.wait_for_round >= 2 and bool(self.uploads)
        return pb.GetRoundResponse(round=self._info(pb.ROUND_PHASE_FINISHED if done else pb.ROUND_PHASE_COLLECTING))

    def ReportMetrics(self, request, context):
        self.reports.append((request.version, time.time()))
        return pb.ReportMetricsResponse(report_id=request.report_id)

    def UploadUpdate(self, request_iterator, context):
        messages = list(request_iterator)
        data = b"".join(m.chunk for m in messages[1:])
        self.uploads.append((messages[0].header, data, time.time()))
        return pb.UploadUpdateResponse(update_id=messages[0].header.update_id, round_id=1, updates_received=1)

    def FetchGlobal(self, request, context):
        with self.lock:
            case = HOSTILE_GLOBALS[min(len(self.fetches), len(HOSTILE_GLOBALS) - 1)][0]
            self.fetches.append((case, request.version, time.time()))
        data, sha = self._payload(case)
        header = pb.PayloadHeader(
            run_id=RUN,
            round_id=0,
            node_id=request.node_id,
            version=request.version,
            codec="int8",
            wire_bytes=len(data),
            sha256=sha,
            raw_bytes=4096,
        )
        if case == "no header first":
            yield pb.FetchGlobalResponse(chunk=data)
            return
        if case == "more bytes than announced":
            header.wire_bytes = len(data) - 10
        elif case == "fewer bytes than announced":
            header.wire_bytes = len(data) + 10
        elif case == "wrong SHA-256":
            header.sha256 = "0" * 64
        elif case == "another version in the header":
            header.version = request.version + 7
        yield pb.FetchGlobalResponse(header=header)
        if case == "stalled stream (header, then nothing)":
            end = time.monotonic() + STALL_S + 5
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.05)
            return
        if case == "chunk over gRPC's 4 MiB message limit":
            yield pb.FetchGlobalResponse(chunk=bytes(5 << 20))
            return
        for part in chunks(data):
            yield pb.FetchGlobalResponse(chunk=part)

    def _payload(self, case: str) -> tuple[bytes, str]:
        initial = self.initial
        assert initial is not None and self.v1 is not None
        if case == "random bytes as the global":
            data = os.urandom(3000)
        elif case == "NaN in the global":
            state = {k: v.clone() for k, v in self.v1_state.items()}
            state["fc1.threshold"][0] = math.nan
            with mock.patch("shared.codec._check_finite", lambda *a, **k: None):  # crafting, past the encoder
                data = encode_adapter(state, initial, WireConfig()).data
        elif case == "wrong shapes (another embedding width)":
            wide = build_adapter(get_method("fedmedclip"), 32, TrainConfig(), 0).travel_state()
            data = encode_adapter(wide, wide, WireConfig()).data
        elif case == "zstd bomb declaring 96 MiB":
            raw = zstandard.ZstdDecompressor().decompress(self.v1.data)
            cobj = zstandard.ZstdCompressor(level=3).compressobj(size=len(raw) + (96 << 20))
            data = b"".join([cobj.compress(raw)] + [cobj.compress(bytes(1 << 20)) for _ in range(96)] + [cobj.flush()])
        elif case == "zstd frame declaring no size":
            raw = zstandard.ZstdDecompressor().decompress(self.v1.data)
            cobj = zstandard.ZstdCompressor(level=3).compressobj(size=-1)
            data = cobj.compress(raw) + cobj.flush()
        elif case == "another codec than the one announced (fp32)":
            data = encode_adapter(self.v1_state, initial, WireConfig(codec="fp32")).data
        else:
            data = self.v1.data
        return data, sha256_hex(data)


def test_a_node_refuses_what_a_hostile_aggregator_sends_keeps_its_state_and_retries(
    pki, partition_dir, feature_cache, tmp_path
):
    fake = HostileAggregator()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[o for o in server_options() if o[0] != "grpc.max_send_message_length"]
        + [("grpc.max_send_message_length", 64 << 20)],
    )
    pb_grpc.add_AggregatorServiceServicer_to_server(fake, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls_of(pki, "aggregator")))
    server.start()
    cluster = Cluster(tmp_path)
    try:
        node = start_node(
            cluster,
            pki,
            partition_dir,
            "hospital_1",
            port,
            free_port(),
            tmp_path / "state",
            feature_cache,
            "--retry-initial-s",
            "0.05",
            "--retry-max-s",
            "0.2",
            "--transfer-timeout-s",
            str(STALL_S),
            "--rpc-timeout-s",
            "10",
        )
        code = node.wait(timeout=START_TIMEOUT)
    finally:
        cluster.close()
        server.stop(0).wait()
    log_text = node.text()
    assert code == 0, log_text[-4000:]
    assert "Traceback" not in log_text
    assert [case for case, _, _ in fake.fetches] == [case for case, _ in HOSTILE_GLOBALS]
    assert all(version == 1 for _, version, _ in fake.fetches)  # it kept asking for v1: it still held v0
    last_fetch = fake.fetches[-1][2]
    # nothing was evaluated, trained or sent before the valid global: every refusal left the node as it was
    assert fake.reports and all(t >= last_fetch for _, t in fake.reports)
    assert len(fake.uploads) == 1 and fake.uploads[0][2] >= last_fetch
    saved = StateStore(tmp_path / "state" / "hospital_1").load()
    assert saved.global_version == 1
    assert all(torch.equal(saved.global_state[k], fake.v1_state[k]) for k in fake.v1_state)
    head, upload = fake.uploads[0][:2]
    decode_adapter(upload, head.sha256, fake.v1_state, WireConfig())  # a valid update, trained from v1
    assert not [line for line in log_text.splitlines() if line.startswith(FORGED)]  # the message was escaped
    for case, expected in HOSTILE_GLOBALS:
        if expected == "accepted":
            outcome_text, retried = "taken: evaluated, trained, uploaded", "-"
        elif expected.isupper():  # gRPC's own status: transient, retried by the call's backoff
            assert f"FetchGlobal v1 failed (StatusCode.{expected}" in log_text, expected
            outcome_text, retried = f"gRPC {expected} (transient)", "yes, with backoff"
        else:
            assert f"global v1 refused ({expected})" in log_text, expected
            outcome_text, retried = f"refused: {expected}", "yes, with backoff"
        TALLY.node_side.append(
            {
                "case": case,
                "answer": outcome_text,
                "retried": retried,
                "state": "kept (v0, nothing sent)" if expected != "accepted" else "now v1",
            }
        )
    assert log_text.count("fetching again in") == sum(1 for _, e in HOSTILE_GLOBALS if e.islower() and e != "accepted")


# --------------------------------------------------------------------------- the tally


AFTER_S = 0.02  # a heartbeat sent just after a case still shows a server the case left busy


def _latency(tally: Tally, samples: list[tuple[float, float, bool]]) -> tuple[dict[str, tuple[int, float, int]], list]:
    """Per category: (heartbeats that overlapped its cases or just followed them, slowest seconds, unanswered);
    the baseline samples, before the first case."""
    start = min(w[1] for w in tally.windows)
    baseline = [s for s in samples if s[0] + s[1] < start]
    per: dict[str, list] = {}
    for category, w0, w1 in tally.windows:
        for s0, dt, ok in samples:
            if s0 <= w1 + AFTER_S and s0 + dt >= w0:
                per.setdefault(category, []).append((dt, ok))
    return {c: (len(v), max(dt for dt, _ in v), sum(1 for _, ok in v if not ok)) for c, v in per.items()}, baseline


def test_tally(target):
    """Write the table (last test of the module); every refusal typed, nobody else slowed beyond normal."""
    t = TALLY
    samples = _samples(target.bystander_log)
    latency, baseline = _latency(t, samples)
    base = sorted(dt for _, dt, _ in baseline)
    base_p50, base_max = base[len(base) // 2], base[-1]
    tried, rejected, accepted = sum(t.tried.values()), sum(t.rejected.values()), sum(t.accepted.values())
    lines = [
        "# Hostile input: cases tried against a running aggregator (mTLS, real gRPC)",
        "",
        f"{tried} cases tried, {rejected} refused with a typed gRPC status (its reason in the status details), "
        f"{sum(t.counted.values())} of them also counted in fedmedclip_requests_rejected_total; {accepted} "
        "answered OK by design (a replay, a registration repeated, an escaped string, the valid reports, the "
        "capped 10^9 claim). The aggregator kept serving: another hospital's heartbeats, sent back to back "
        f"from a separate process for the whole run ({len(samples)} of them), were answered in "
        f"{base_p50 * 1e3:.1f} ms (median; slowest {base_max * 1e3:.1f} ms) before the first case, and the "
        f"slowest one that overlapped each case (or followed it within {AFTER_S * 1e3:.0f} ms) is in the table "
        f"(normal: under {NORMAL_LATENCY_S:.0f} s). "
        "Nothing refused reached the average: the global after the round equals, byte for byte, the one "
        "computed from the 2 valid updates alone with the federation's weights; report.json stays strict JSON; "
        "no client string forged a log line.",
        "",
        t.notes.get("_weights", ""),
        "",
        "| case | tried | refused | counted | accepted | statuses | reasons | other nodes' slowest heartbeat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    slow = []
    for category in t.tried:
        if category in t.own_aggregator:
            served = "- (own aggregator)"
        elif category in latency:
            n, worst, missed = latency[category]
            served = f"{worst * 1e3:.1f} ms ({n} heartbeats{f', {missed} unanswered' if missed else ''})"
            if worst > NORMAL_LATENCY_S or missed:
                slow.append(category)
        else:
            served = "no heartbeat overlapped (a case of a few ms)"
        note = t.notes.get(category)
        lines.append(
            f"| {category} | {t.tried[category]} | {t.rejected[category]} | {t.counted[category]} | "
            f"{t.accepted[category]}{f': {note}' if note else ''} | "
            f"{', '.join(sorted(t.statuses.get(category, ())))} | "
            f"{', '.join(sorted(t.reasons.get(category, ()))) or '-'} | {served} |"
        )
    lines += [
        "",
        "## The other direction: a hostile aggregator against a real hospital node",
        "",
        "A fake aggregator (a real gRPC server with the aggregator's certificate) answers a real node process's "
        "downloads of global v1 with each case below, in turn, then with the valid global. The node refused "
        "each one with a typed error (the reason the aggregator would give) or saw gRPC's own status, kept the "
        "global and the state it held (it asked for v1 again each time, and evaluated, trained and uploaded "
        "nothing until the valid global came), fetched again after a backoff with jitter, and finished the "
        "run (exit code 0, no traceback).",
        "",
        "| case | the node's answer | retried | its state |",
        "|---|---|---|---|",
    ]
    for row in t.node_side:
        lines.append(f"| {row['case']} | {row['answer']} | {row['retried']} | {row['state']} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if os.environ.get("FEDMEDCLIP_HOSTILE_REPORT"):
        Path(os.environ["FEDMEDCLIP_HOSTILE_REPORT"]).write_text(text)
    assert not slow, f"other nodes were slowed beyond {NORMAL_LATENCY_S}s during: {slow}"
    assert rejected == tried - accepted and tried >= 3 * EXAMPLES + 90
    assert len(t.node_side) == len(HOSTILE_GLOBALS)
    assert target.agg["proc"].alive()
