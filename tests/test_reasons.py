"""Refusals say why: every refusal carries a Reason in its rich gRPC status, and the node acts on it.

Against the real servicer on a real gRPC server on loopback (in this process): an unknown node, a
wrong run, a registration that does not match, a stale round and a bad checksum are each refused
with the status code of their Reason and a ``google.rpc.ErrorInfo`` naming it; the node's helpers
map each to its action (register again, follow the current round, give up) and an unreachable
aggregator to a retry. A checkpoint made under other settings stops the aggregator with a typed
configuration error: one line, exit code 2, no traceback.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aggregator.checkpoint import CheckpointError, CheckpointMismatchError, CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.engine import RoundEngine, UpdateHeader
from aggregator.registry import Registration, Role
from hospital_node.client import NodeClient, NodeRefused
from shared.codec import CodecError
from shared.errors import FedMedCLIPError
from shared.learning.aggregation import AggregationError
from shared.learning.rounds import UpdateOutOfBoundsError
from shared.ops.config import ConfigError
from shared.ops.telemetry import Telemetry
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.protocol import state_digest
from shared.wire.reasons import DOMAIN, Action, Reason, action_of, reason_of
from shared.wire.transport import Backoff, PayloadAssemblyError, chunks
from tests.services_support import (
    REPO_ROOT,
    SMALL_CLASSES,
    SMALL_FINGERPRINT,
    free_port,
    in_process_aggregator,
    initial_adapter_state,
    register_request,
    service_env,
    update_payload,
)

DIM = 16


def upload(stub, run_id: str, node: str, p, round_id: int = 0, **header):
    head = pb.PayloadHeader(
        run_id=run_id,
        round_id=round_id,
        node_id=node,
        update_id=f"{node}-r{round_id}",
        codec=p.codec,
        wire_bytes=len(p.data),
        sha256=p.sha256,
        raw_bytes=p.raw_nbytes,
    )
    head.MergeFrom(pb.PayloadHeader(**header))
    messages = [pb.UploadUpdateRequest(header=head)] + [pb.UploadUpdateRequest(chunk=c) for c in chunks(p.data)]
    return stub.UploadUpdate(iter(messages), timeout=10)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@pytest.fixture()
def served(tmp_path):
    """The real servicer on a real gRPC server on loopback, a driver thread, and a stub."""
    with in_process_aggregator(tmp_path, rounds=3, embed_dim=DIM) as served_aggregator:
        yield served_aggregator


def test_every_reason_has_one_status_code_and_one_action_and_an_aip193_name():
    assert len({r.value for r in Reason}) == len(Reason)
    for reason in Reason:
        assert isinstance(reason.code, grpc.StatusCode) and reason.code != grpc.StatusCode.OK
        assert isinstance(reason.action, Action)
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+[A-Z0-9]", reason.name) and len(reason.name) <= 63
        assert reason.value == reason.name.lower()
    # the reasons the node handles without giving up
    assert Reason.UNKNOWN_NODE.action is Action.REREGISTER
    assert {r for r in Reason if r.action is Action.RESYNC} == {
        Reason.ROUND_NOT_OPEN,
        Reason.STALE_ROUND,
        Reason.FUTURE_ROUND,
        Reason.CONFLICTING_UPDATE,
        Reason.CONFLICTING_REPLAY,
        Reason.SECAGG_PHASE,  # secure aggregation: another session is open; the node follows it
        Reason.SECAGG_EXCLUDED,  # named for breaking the protocol: out of this round, back in the next
    }


def _subclasses(cls: type) -> list[type]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


def test_each_payload_error_class_names_its_own_reason_with_the_label_it_always_had():
    classes = [
        c
        for base in (CodecError, UpdateOutOfBoundsError, AggregationError, PayloadAssemblyError)
        for c in _subclasses(base)
    ]
    assert len(classes) >= 13
    for cls in classes:
        assert issubclass(cls, FedMedCLIPError)
        assert isinstance(cls.__dict__.get("reason"), Reason), f"{cls.__name__} names no reason of its own"
    assert len({c.reason for c in classes}) == len(classes)
    for cls in classes:  # the metrics label the engine derived from the class name until now
        if cls is not PayloadAssemblyError:
            assert cls.reason == re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__.removesuffix("Error")).lower()
    assert PayloadAssemblyError.reason is Reason.BAD_STREAM


def test_refusals_carry_their_reason_in_the_rich_status_and_map_to_the_node_action(served):
    engine, stub, telemetry = served
    stub.Register(register_request("h1", DIM), timeout=10)
    stub.Register(register_request("h2", DIM), timeout=10)
    run_id = engine.run_id

    unknown = refused(lambda: stub.GetRound(pb.GetRoundRequest(run_id=run_id, node_id="h9"), timeout=10))
    status = rpc_status.from_call(unknown)
    assert status.code == grpc.StatusCode.UNAUTHENTICATED.value[0] and status.message == unknown.details()
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and (info.reason, info.domain) == ("UNKNOWN_NODE", DOMAIN)
    assert reason_of(unknown) is Reason.UNKNOWN_NODE and action_of(unknown) is Action.REREGISTER

    wrong_run = refused(lambda: stub.Heartbeat(pb.HeartbeatRequest(run_id="another", node_id="h1"), timeout=10))
    assert wrong_run.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(wrong_run) is Reason.WRONG_RUN and action_of(wrong_run) is Action.GIVE_UP

    mismatch = refused(lambda: stub.Register(register_request("h3", DIM, embed_dim=DIM * 2), timeout=10))
    assert mismatch.code() == grpc.StatusCode.FAILED_PRECONDITION  # the same code as a wrong run...
    assert reason_of(mismatch) is Reason.REGISTRATION_MISMATCH  # ...another reason
    assert action_of(mismatch) is Action.GIVE_UP

    info = stub.GetRound(pb.GetRoundRequest(run_id=run_id, node_id="h1", max_wait_ms=5000), timeout=10).round
    assert info.phase == pb.ROUND_PHASE_COLLECTING and info.round_id == 0
    bad = update_payload(1, DIM)
    checksum = refused(lambda: upload(stub, run_id, "h1", bad, sha256="0" * 64))
    assert checksum.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(checksum) is Reason.CHECKSUM_MISMATCH and action_of(checksum) is Action.GIVE_UP
    samples = refused(lambda: upload(stub, run_id, "h1", bad, num_train_samples=11))  # registered 10
    assert reason_of(samples) is Reason.BAD_SAMPLE_COUNT

    upload(stub, run_id, "h1", update_payload(1, DIM), num_train_samples=10)
    upload(stub, run_id, "h2", update_payload(2, DIM))
    info = stub.GetRound(
        pb.GetRoundRequest(run_id=run_id, node_id="h1", wait_for_round=1, max_wait_ms=5000), timeout=10
    ).round
    assert info.round_id == 1
    stale = refused(lambda: upload(stub, run_id, "h1", update_payload(3, DIM), round_id=0, update_id="h1-late"))
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(stale) is Reason.STALE_ROUND and action_of(stale) is Action.RESYNC

    rejected = {
        s.labels["reason"]: s.value
        for m in telemetry.registry.collect()
        if m.name == "fedmedclip_requests_rejected"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert rejected == {
        "unknown_node": 1.0,
        "wrong_run": 1.0,
        "registration_mismatch": 1.0,
        "checksum_mismatch": 1.0,
        "bad_sample_count": 1.0,
        "stale_round": 1.0,
    }
    handled = {
        (s.labels["grpc_method"], s.labels["grpc_code"])
        for m in telemetry.registry.collect()
        if m.name == "fedmedclip_grpc_server_handled"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert {
        ("GetRound", "UNAUTHENTICATED"),
        ("Register", "FAILED_PRECONDITION"),
        ("UploadUpdate", "INVALID_ARGUMENT"),
    } <= handled


def test_an_unreachable_aggregator_carries_no_reason_and_is_retried():
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        stub = pb_grpc.AggregatorServiceStub(channel)
        down = refused(lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id="h1"), timeout=5))
    assert down.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(down) is None and action_of(down) is Action.RETRY


def _bare_client() -> tuple[NodeClient, list[str]]:
    """A NodeClient with only what ``_call`` uses (no backbone, no data): its re-registrations are recorded."""
    client = NodeClient.__new__(NodeClient)
    client.stop = threading.Event()
    client.refused = None
    client.backoff = Backoff(0.01, 0.01, give_up_after_s=1.0)
    client.rng = random.Random(0)
    client._sleep = lambda seconds: None
    registered: list[str] = []
    client._register = lambda: registered.append("again")
    return client, registered


def test_the_node_registers_again_gives_up_or_resyncs_by_reason(served):
    engine, stub, _ = served
    client, registered = _bare_client()

    def register_h3() -> None:
        registered.append("again")
        stub.Register(register_request("h3", DIM), timeout=10)

    client._register = register_h3  # the aggregator forgot h3: one registration and the call goes through
    info = client._call("GetRound", lambda: stub.GetRound(pb.GetRoundRequest(node_id="h3"), timeout=10))
    assert registered == ["again"] and info.round.run_id == engine.run_id

    client, registered = _bare_client()  # still unknown after registering again: the error goes up
    with pytest.raises(grpc.RpcError) as still:
        client._call("GetRound", lambda: stub.GetRound(pb.GetRoundRequest(node_id="h9"), timeout=10))
    assert registered == ["again"] and reason_of(still.value) is Reason.UNKNOWN_NODE

    with pytest.raises(NodeRefused) as refused_for_good:
        client._call(
            "Register",
            lambda: stub.Register(register_request("h4", DIM, method="fedclip"), timeout=10),
            reregister=False,
        )
    assert refused_for_good.value.reason is Reason.REGISTRATION_MISMATCH
    assert isinstance(refused_for_good.value, FedMedCLIPError)
    assert "FAILED_PRECONDITION" in str(refused_for_good.value)

    stub.Register(register_request("h1", DIM), timeout=10)
    stub.Register(register_request("h2", DIM), timeout=10)
    stub.GetRound(pb.GetRoundRequest(run_id=engine.run_id, node_id="h1", max_wait_ms=5000), timeout=10)
    with pytest.raises(grpc.RpcError) as moved_on:  # RESYNC is the caller's: _upload drops the update
        client._call("UploadUpdate", lambda: upload(stub, engine.run_id, "h1", update_payload(1, DIM), round_id=1))
    assert reason_of(moved_on.value) is Reason.FUTURE_ROUND


def _checkpoint_made_with_defaults(out) -> None:
    """A checkpoint after one round, with codec int8 (the default)."""
    cfg = AggregatorConfig(out_dir=str(out), rounds=2, min_nodes=1, embed_dim=DIM)
    engine = RoundEngine(cfg, CheckpointStore(out), Telemetry("aggregator"))
    engine.register(
        Registration(
            node_id="h1",
            role=Role.TRAINER,
            fingerprint=SMALL_FINGERPRINT,
            class_names=tuple(SMALL_CLASSES),
            embed_dim=DIM,
            method="fedmedclip",
            initial_sha256=state_digest(initial_adapter_state(DIM)),
            num_train=10,
        )
    )
    engine.step()
    p = update_payload(1, DIM)
    engine.submit(
        UpdateHeader(
            run_id=engine.run_id,
            round_id=0,
            node_id="h1",
            update_id="u",
            codec=p.codec,
            sha256=p.sha256,
            wire_bytes=len(p.data),
        ),
        p.data,
    )
    engine.step()
    assert CheckpointStore(out).load().version == 1


def test_a_checkpoint_from_other_settings_is_a_typed_one_line_error_and_the_cli_exits_2(tmp_path):
    out = tmp_path / "agg"
    _checkpoint_made_with_defaults(out)
    other = AggregatorConfig(out_dir=str(out), rounds=2, min_nodes=1, embed_dim=DIM, codec="fp16")
    with pytest.raises(CheckpointMismatchError) as mismatch:
        RoundEngine(other, CheckpointStore(out), Telemetry("aggregator"))
    assert isinstance(mismatch.value, ConfigError) and isinstance(mismatch.value, FedMedCLIPError)
    message = str(mismatch.value)
    assert "\n" not in message and "codec 'int8' -> 'fp16'" in message
    assert message.endswith("use a new out_dir or the original settings")

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aggregator",
            "--insecure",
            "--trust-first-node",
            "true",
            "--out-dir",
            str(out),
            "--embed-dim",
            str(DIM),
            "--codec",
            "fp16",
            "--listen",
            "127.0.0.1:0",
            "--health-port",
            "0",
            "--metrics-port",
            "0",
        ],
        cwd=REPO_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if message in line]


def test_an_unreadable_checkpoint_is_a_typed_error(tmp_path):
    store = CheckpointStore(tmp_path)
    store.state_path.parent.mkdir(parents=True)
    store.state_path.write_bytes(b"not an npz file")
    with pytest.raises(CheckpointError) as unreadable:
        store.load()
    assert isinstance(unreadable.value, ConfigError) and str(store.state_path) in str(unreadable.value)
