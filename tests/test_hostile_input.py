"""Hostile input against a running aggregator process, over real gRPC with mTLS.

The attacker holds a valid certificate (a compromised hospital, the realistic threat once strangers
are kept out by mTLS) and sends: random bytes as payloads and as whole protobuf messages (hypothesis),
fuzzed header sizes and rounds (hypothesis), truncated / gapped / repeated / reordered chunk streams,
wrong SHA-256, wrong shapes, NaN and Inf, zstd bombs, oversized messages and payloads, negative and
absurd sizes, stale and future rounds, replays with other bytes, other and unknown node ids, and
updates beyond the poisoning bounds. Each must end with a typed gRPC status and an increment of
``fedmedclip_requests_rejected_total`` (one case, an oversized unary message, is refused by gRPC's
transport before any servicer code runs, so only its status is asserted). Every refusal of the
servicer's own also names, in the status details, the :class:`~shared.wire.reasons.Reason` expected
for the case (gRPC's own refusals, of messages too large or not protobuf, name none). The aggregator
must keep serving, and the global model after the round must equal, byte for byte, the one computed
here from the two valid updates alone. The tally is printed and, with ``FEDMEDCLIP_HOSTILE_REPORT=path``
(``make bench-hostile``), written as Markdown.

The protocol has no chunk sequence numbers: chunks of one upload ride one HTTP/2 stream, in order;
a repeated or missing chunk shows up as a length different from the announced ``wire_bytes`` or,
when the length is made to match, as a SHA-256 mismatch. Both are tried.
"""

from __future__ import annotations

import os
from collections import Counter
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
from shared.learning.aggregation import make_aggregator
from shared.learning.rounds import WireConfig, fold_update, publish_global
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.reasons import Reason, reason_of
from shared.wire.transport import channel_options, chunks, sha256_hex
from tests.services_support import Cluster, provision_pki, scrape, start_aggregator_process, tls_of, total, wait_for

FED = Federation(embed_dim=16)
NODES = ["hospital_1", "hospital_2", "hospital_3", "global"]  # hospital_3: allowed, never registers
SAMPLES = {"hospital_1": 30, "hospital_2": 10}
EXAMPLES = 60  # per hypothesis test
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
METHODS = ["Register", "Heartbeat", "GetRound", "FetchGlobal", "UploadUpdate", "ReportMetrics"]
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND}
#: what a payload that is not a valid adapter of the federation can be refused for
PAYLOAD_REASONS = {Reason.CODEC_MISMATCH, Reason.CODEC, Reason.UNKNOWN_CODEC, Reason.CHECKSUM_MISMATCH,
                   Reason.SHAPE_MISMATCH, Reason.NON_FINITE, Reason.PAYLOAD_TOO_LARGE, Reason.MALFORMED_PAYLOAD,
                   Reason.REFERENCE_REQUIRED}
ANY = None  # no expectation about the reason (gRPC itself may refuse before the servicer)


def outcome(call) -> tuple[grpc.StatusCode, Reason | None]:
    """The status code ``call()`` ends with (OK when it returns) and the Reason its status names."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), reason_of(exc)
    return grpc.StatusCode.OK, None


@dataclass
class Target:
    agg: dict
    nodes: dict[str, LightNode]
    valid: dict
    big: LightNode  # hospital_1 with a send limit far above the server's receive limit
    tried: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    counted: Counter = field(default_factory=Counter)
    statuses: dict[str, set] = field(default_factory=dict)
    reasons: dict[str, set] = field(default_factory=dict)

    @property
    def h1(self) -> LightNode:
        return self.nodes["hospital_1"]

    def rejections(self) -> float:
        return total(scrape(self.agg["metrics"]), "fedmedclip_requests_rejected_total")

    def refuse(self, category: str, call, reasons: set[Reason] | None, codes=REFUSED,
               counted: bool = True) -> grpc.StatusCode:
        """Run one hostile case: refused with one of ``codes`` naming one of ``reasons`` (None: any or none),
        and (``counted``) the rejection counter bumped."""
        before = self.rejections()
        code, reason = outcome(call)
        self.tried[category] += 1
        assert code in codes, f"{category}: {code}"
        assert reasons is None or reason in reasons, f"{category}: {reason}"
        assert reason is None or code == reason.code, f"{category}: {code} for {reason}"
        self.rejected[category] += 1
        self.statuses.setdefault(category, set()).add(code.name)
        if reason is not None:
            self.reasons.setdefault(category, set()).add(reason.value)
        if counted:  # the status can reach the client before the servicer has finished counting
            wait_for(lambda: self.rejections() >= before + 1, 10, f"{category}: a rejection to be counted",
                     [self.agg["proc"]], interval=0.02)
            self.counted[category] += 1
        return code


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    pki = provision_pki(root / "pki", NODES)
    cluster = Cluster(root)
    nodes: dict[str, LightNode] = {}
    try:
        agg = start_aggregator_process(cluster, pki, root / "agg", "--rounds", "1", "--min-nodes", "2",
                                       "--embed-dim", str(FED.embed_dim), "--round-timeout-s", "600",
                                       "--linger-s", "600", "--exit-when-done", "false")
        nodes = {n: LightNode(agg["address"], n, tls_of(pki, n), FED, num_train=SAMPLES.get(n, 0),
                              evaluator=n == "global") for n in NODES}
        for n in ("hospital_1", "hospital_2", "global"):
            nodes[n].register()
        nodes["hospital_3"].run_id = nodes["hospital_1"].run_id
        info = nodes["hospital_1"].round(0, max_wait_s=10)
        assert info.phase == pb.ROUND_PHASE_COLLECTING and info.round_id == 0
        initial = FED.initial_state()
        valid = {n: encode(perturbed(initial, 0.01, seed=i), initial) for i, n in enumerate(SAMPLES, start=1)}
        big_opts = [o for o in channel_options() if o[0] != "grpc.max_send_message_length"]
        big = LightNode(agg["address"], "hospital_1", tls_of(pki, "hospital_1"), FED,
                        options=big_opts + [("grpc.max_send_message_length", 64 * 1024 * 1024)])
        big.run_id = nodes["hospital_1"].run_id
        nodes["_big"] = big
        yield Target(agg=agg, nodes=nodes, valid=valid | {"initial": initial}, big=big)
    finally:
        for node in nodes.values():
            node.close()
        cluster.close()


def _raw_payload_upload(node: LightNode, data: bytes, codec: str = "int8", **header):
    head = pb.PayloadHeader(run_id=node.run_id, round_id=0, node_id=node.node_id, update_id="hostile",
                            codec=codec, wire_bytes=len(data), sha256=sha256_hex(data))
    head.MergeFrom(pb.PayloadHeader(**header))
    return lambda: node.upload_messages([pb.UploadUpdateRequest(header=head)]
                                        + [pb.UploadUpdateRequest(chunk=c) for c in chunks(data, 4096)])


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_payload_are_refused(target, data):
    target.refuse("random payload bytes", _raw_payload_upload(target.h1, data), PAYLOAD_REASONS,
                  {grpc.StatusCode.INVALID_ARGUMENT})


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
@given(wire_bytes=st.integers(min_value=-2**63, max_value=2**63 - 1), round_id=st.integers(-2**31, 2**31 - 1),
       chunk=st.integers(min_value=1, max_value=64 * 1024), which=st.sampled_from(["size", "round"]))
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
        target.refuse("stale and future rounds", call, {Reason.STALE_ROUND, Reason.FUTURE_ROUND},
                      {grpc.StatusCode.FAILED_PRECONDITION})


def _bomb(declared: bool) -> bytes:
    """A valid FMCS prefix and header, then 96 MiB of zeros: a few KB compressed, over the 64 MiB cap."""
    raw = zstandard.ZstdDecompressor().decompress(encode(FED.initial_state(), FED.initial_state(), "fp32").data)
    zeros, n = bytes(1 << 20), 96
    cobj = zstandard.ZstdCompressor(level=3).compressobj(size=len(raw) + n * len(zeros) if declared else -1)
    out = [cobj.compress(raw)] + [cobj.compress(zeros) for _ in range(n)] + [cobj.flush()]
    return b"".join(out)


def _state_with(value: float) -> bytes:
    """An fp32 payload holding ``value`` (NaN/Inf), past the encoder's own finiteness check."""
    state = FED.initial_state()
    state["fc1.threshold"][0] = value  # a weight row holding NaN would be masked off, not sent
    with mock.patch("shared.codec._check_finite", lambda *a, **k: None):
        return encode(state, FED.initial_state(), "fp32").data


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
    for dim_state in (Federation(embed_dim=32).initial_state(),
                      FED.initial_state() | {"extra": torch.zeros(2, 2)},
                      {k: v for k, v in FED.initial_state().items() if k != "fc2.bias"}):
        wrong = encode(dim_state, dim_state)
        t.refuse("wrong shapes", lambda wrong=wrong: h1.upload(wrong, 0), {Reason.SHAPE_MISMATCH})
    for value in (float("nan"), float("inf"), float("-inf")):
        t.refuse("NaN or Inf", _raw_payload_upload(h1, _state_with(value), codec="fp32"), {Reason.NON_FINITE})
    for declared in (True, False):
        bomb = _bomb(declared)
        assert len(bomb) < 64 * 1024
        t.refuse("zstd bomb", _raw_payload_upload(h1, bomb, codec="fp32"), {Reason.PAYLOAD_TOO_LARGE})
    t.refuse("codec mismatch", lambda: h1.upload(payload, 0, codec="fp16"), {Reason.CODEC_MISMATCH})
    big = target.big
    t.refuse("oversized message", lambda: big.upload_messages([H, pb.UploadUpdateRequest(chunk=bytes(5 << 20))]),
             {None}, {grpc.StatusCode.RESOURCE_EXHAUSTED})  # gRPC answers; the servicer counts stream_broken
    t.refuse("oversized message", lambda: big.stub.Heartbeat(pb.HeartbeatRequest(
        run_id="x" * (5 << 20), node_id="hospital_1"), timeout=10), {None}, {grpc.StatusCode.RESOURCE_EXHAUSTED},
        counted=False)  # gRPC's transport refuses it before any servicer code runs
    t.refuse("oversized payload", lambda: big.upload(payload, 0, wire_bytes=65 << 20), bad_stream)
    huge = replace_header(head, wire_bytes=66 << 20, update_id="huge")
    t.refuse("oversized payload", lambda: big.upload_messages(  # 66 MiB announced and streamed
        [pb.UploadUpdateRequest(header=huge)] + [pb.UploadUpdateRequest(chunk=bytes(1 << 20))] * 66), bad_stream)
    for n in (-1, 10**15):
        t.refuse("negative or absurd sizes", lambda n=n: h1.register(num_train_samples=n), {Reason.BAD_SAMPLE_COUNT})
    t.refuse("negative or absurd sizes", lambda: h1.register(embed_dim=-5), {Reason.REGISTRATION_MISMATCH})
    t.refuse("negative or absurd sizes", lambda: h1.upload(payload, 0, num_train_samples=10**15),
             {Reason.BAD_SAMPLE_COUNT})  # not the count hospital_1 registered
    t.refuse("bad update id", lambda: h1.upload(payload, 0, update_id=""), {Reason.BAD_UPDATE_ID})
    t.refuse("bad update id", lambda: h1.upload(payload, 0, update_id="u" * 10_000), {Reason.BAD_UPDATE_ID})
    t.refuse("wrong run id", lambda: h1.upload(payload, 0, run_id="another-run"), {Reason.WRONG_RUN})
    for version in (0, -1, 2**31 - 1):
        t.refuse("absent global version", lambda v=version: h1.fetch(v), {Reason.NO_SUCH_VERSION})
    t.refuse("absent global version", lambda: h1.stub.ReportMetrics(pb.ReportMetricsRequest(
        run_id=h1.run_id, node_id="hospital_1", version=99, report_id="r"), timeout=10), {Reason.NO_SUCH_VERSION})
    initial = t.valid["initial"]
    t.refuse("poisoning: norm", lambda: h1.upload(encode({k: v + 5.0 for k, v in initial.items()}, initial), 0),
             {Reason.UPDATE_NORM_TOO_LARGE})
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


def test_other_and_unknown_node_ids_and_replays(target):
    t, h1 = target, target.h1
    payload = t.valid["hospital_1"]
    for claimed in ("hospital_2", "hospital_9", "", "h" * 300, "../../etc/passwd"):
        t.refuse("other or unknown node id", lambda c=claimed: h1.upload(payload, 0, node_id=c),
                 {Reason.IDENTITY_MISMATCH}, {grpc.StatusCode.PERMISSION_DENIED})
        t.refuse("other or unknown node id", lambda c=claimed: h1.stub.Heartbeat(
            pb.HeartbeatRequest(run_id=h1.run_id, node_id=c), timeout=10), {Reason.IDENTITY_MISMATCH},
            {grpc.StatusCode.PERMISSION_DENIED})
    stranger = t.nodes["hospital_3"]  # allowed and certified, never registered
    t.refuse("other or unknown node id", lambda: stranger.upload(payload, 0), {Reason.UNKNOWN_NODE},
             {grpc.StatusCode.UNAUTHENTICATED})
    first = h1.upload(payload, 0)  # the one valid update of hospital_1
    assert not first.replayed
    again = h1.upload(payload, 0)  # an exact retry: the same answer, counted once
    assert again.replayed and again.update_id == first.update_id
    t.tried["exact replay (answered replayed=true, not counted)"] += 1
    other = encode(perturbed(t.valid["initial"], 0.01, seed=99), t.valid["initial"])
    t.refuse("replay with other bytes", lambda: h1.upload(other, 0), {Reason.CONFLICTING_REPLAY},
             {grpc.StatusCode.ALREADY_EXISTS})
    t.refuse("second update in a round", lambda: h1.upload(other, 0, update_id="hostile-2"),
             {Reason.CONFLICTING_UPDATE}, {grpc.StatusCode.ALREADY_EXISTS})


def test_aggregator_keeps_serving_and_the_global_equals_the_valid_updates_alone(target):
    t = target
    h2 = t.nodes["hospital_2"]
    assert t.agg["proc"].alive()
    h2.upload(t.valid["hospital_2"], 0)
    info = h2.round(1, max_wait_s=20)
    assert info.phase == pb.ROUND_PHASE_FINISHED and info.global_version == 1
    header, data = h2.fetch(1)
    initial = t.valid["initial"]
    expected = make_aggregator("weighted")
    for node in ("hospital_1", "hospital_2"):
        p = t.valid[node]
        fold_update(expected, p.data, p.sha256, initial, SAMPLES[node], WireConfig())
    want, _ = publish_global(expected, initial, WireConfig())
    assert data == want.data and header.sha256 == want.sha256
    t.refuse("stale round", lambda: t.h1.upload(t.valid["hospital_1"], 0, update_id="late"),
             {Reason.ROUND_NOT_OPEN})  # the run's one round closed: no round is open any more
    metrics = scrape(t.agg["metrics"])
    assert total(metrics, "fedmedclip_updates_accepted_total") == 2
    assert total(metrics, "fedmedclip_updates_replayed_total") == 1
    assert t.agg["proc"].alive()
    tried, rejected = sum(t.tried.values()), sum(t.rejected.values())
    lines = ["# Hostile input: cases tried against a running aggregator (mTLS, real gRPC)", "",
             f"{tried} cases tried, {rejected} refused with a typed gRPC status (its reason in the status "
             f"details), {sum(t.counted.values())} of them also counted in fedmedclip_requests_rejected_total; "
             "the aggregator kept serving and the global after the round equals, byte for byte, the one "
             "computed from the 2 valid updates alone.", "",
             "| case | tried | refused | counted | statuses | reasons |", "|---|---|---|---|---|---|"]
    for category in t.tried:
        lines.append(f"| {category} | {t.tried[category]} | {t.rejected[category]} | {t.counted[category]} | "
                     f"{', '.join(sorted(t.statuses.get(category, ()))) or 'OK (replayed=true)'} | "
                     f"{', '.join(sorted(t.reasons.get(category, ()))) or '-'} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if os.environ.get("FEDMEDCLIP_HOSTILE_REPORT"):
        Path(os.environ["FEDMEDCLIP_HOSTILE_REPORT"]).write_text(text)
    assert rejected == tried - 1 and tried >= 3 * EXAMPLES + 50
