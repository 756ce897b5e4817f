"""The aggregator's round state machine without gRPC, and its typed statuses over real gRPC in-process.

Small adapters (D = 16) keep these fast; the real federation over processes is in
test_services_federation.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import grpc
import pytest
import torch

from aggregator.checkpoint import CheckpointMismatchError, CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.engine import Phase, RoundEngine, UpdateHeader
from aggregator.errors import EngineError
from aggregator.registry import NodeRecord, Registration, Role
from aggregator.service import PHASE_TO_PROTO, ROLE_FROM_PROTO
from shared import __version__
from shared.learning.rounds import WireConfig, decode_adapter, encode_adapter
from shared.learning.training import TrainConfig, build_adapter, get_method
from shared.ops.config import ConfigError
from shared.ops.telemetry import Telemetry
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.protocol import state_digest
from shared.wire.reasons import Reason, reason_of
from shared.wire.transport import CHUNK_BYTES, MIN_CHUNK_BYTES, chunk_size, chunks
from tests.services_support import in_process_aggregator

DIM = 16
FP = "f" * 64
CLASSES = ("a", "b", "c")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return build_adapter(get_method("fedmedclip"), DIM, TrainConfig(), seed).travel_state()


def make_engine(tmp_path, clock=None, **overrides) -> RoundEngine:
    cfg = AggregatorConfig(
        out_dir=str(tmp_path),
        rounds=2,
        min_nodes=2,
        embed_dim=DIM,
        round_timeout_s=10,
        quorum_timeout_s=5,
        linger_s=1,
        **overrides,
    )
    return RoundEngine(cfg, CheckpointStore(tmp_path), Telemetry("aggregator"), clock=clock or time.monotonic)


def registration(node: str, **kw) -> Registration:
    base = dict(
        node_id=node,
        role=Role.TRAINER,
        fingerprint=FP,
        class_names=CLASSES,
        embed_dim=DIM,
        method="fedmedclip",
        initial_sha256=state_digest(initial_state()),
        num_train=10,
    )
    base.update(kw)
    return Registration(**base)


def update_payload(global_state, scale: float = 0.01, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in global_state.items()}
    return encode_adapter(state, global_state, WireConfig())


def header(
    engine, node: str, payload, round_id: int | None = None, update_id: str | None = None, num_train: int = 0
) -> UpdateHeader:
    r = engine.version if round_id is None else round_id
    return UpdateHeader(
        run_id=engine.run_id,
        round_id=r,
        node_id=node,
        update_id=update_id or f"{node}-r{r}",
        codec=payload.codec,
        sha256=payload.sha256,
        wire_bytes=len(payload.data),
        num_train=num_train,
    )


def refusal(call) -> Reason:
    """The Reason of the EngineError ``call()`` raises (its status code is the Reason's)."""
    with pytest.raises(EngineError) as refused:
        call()
    assert refused.value.code == refused.value.reason.code
    return refused.value.reason


def test_round_closes_when_every_trainer_reported_and_retries_get_the_same_answer(tmp_path):
    eng = make_engine(tmp_path)
    eng.register(registration("h1"))
    eng.register(registration("h2"))
    assert eng.step() is not None and eng.phase == Phase.COLLECTING
    p1, p2 = update_payload(eng.global_state, seed=1), update_payload(eng.global_state, seed=2)
    ack = eng.submit(header(eng, "h1", p1), p1.data)
    assert not ack.replayed and ack.updates_received == 1
    again = eng.submit(header(eng, "h1", p1), p1.data)  # a retry: same id, same answer
    assert again.replayed and again.update_id == ack.update_id and again.round_id == 0
    # another update for the same round
    assert (
        refusal(lambda: eng.submit(header(eng, "h1", p1, update_id="h1-other"), p1.data)) is Reason.CONFLICTING_UPDATE
    )
    eng.submit(header(eng, "h2", p2), p2.data)
    eng.step()
    assert eng.version == 1 and eng.phase == Phase.COLLECTING
    # the retry of a closed round's update still gets the accepted answer
    assert eng.submit(header(eng, "h1", p1, round_id=0, update_id="h1-r0"), p1.data).replayed
    # the published global decodes, against version 0, to exactly the aggregator's state
    data, sha = eng.published_global(eng.run_id, "h1", 1)
    decoded = decode_adapter(data, sha, initial_state(), WireConfig())
    assert all(torch.equal(decoded.tensors[k], eng.global_state[k]) for k in eng.global_state)
    ckpt = CheckpointStore(tmp_path).load()
    assert ckpt.version == 1 and ckpt.accepted == {
        "0": {"h1": {"update_id": "h1-r0", "sha256": p1.sha256}, "h2": {"update_id": "h2-r0", "sha256": p2.sha256}}
    }
    # node records are stored as plain dicts, the shape the checkpoint always had (plus software_version)
    assert ckpt.nodes["h1"] == {"role": "trainer", "num_train": 10, "num_val": 0, "num_test": 0, "software_version": ""}


def test_stale_and_future_rounds_and_bad_payloads_get_typed_refusals(tmp_path):
    eng = make_engine(tmp_path)
    for n in ("h1", "h2"):
        eng.register(registration(n))
    eng.step()
    p = update_payload(eng.global_state)
    assert refusal(lambda: eng.submit(header(eng, "h1", p, round_id=1), p.data)) is Reason.FUTURE_ROUND
    assert Reason.FUTURE_ROUND.code == grpc.StatusCode.FAILED_PRECONDITION
    corrupt = bytearray(p.data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    assert refusal(lambda: eng.submit(header(eng, "h1", p), bytes(corrupt))) is Reason.CHECKSUM_MISMATCH
    assert Reason.CHECKSUM_MISMATCH.code == grpc.StatusCode.INVALID_ARGUMENT
    extra = initial_state() | {"extra": torch.zeros(2, 2)}
    wrong_shape = encode_adapter(extra, extra, WireConfig())
    assert refusal(lambda: eng.submit(header(eng, "h1", wrong_shape), wrong_shape.data)) is Reason.SHAPE_MISMATCH
    # an upload that states another sample count than the node registered (10)
    assert refusal(lambda: eng.submit(header(eng, "h1", p, num_train=11), p.data)) is Reason.BAD_SAMPLE_COUNT
    assert eng.aggregator.count == 0  # nothing refused touched the average
    assert refusal(lambda: eng.submit(header(eng, "h9", p), p.data)) is Reason.UNKNOWN_NODE
    eng.submit(header(eng, "h1", p, num_train=10), p.data)
    eng.submit(header(eng, "h2", p, update_id="h2-r0"), p.data)
    eng.step()
    assert (
        refusal(lambda: eng.submit(header(eng, "h1", p, round_id=0, update_id="h1-late"), p.data)) is Reason.STALE_ROUND
    )


def test_registration_with_another_fingerprint_label_space_or_seed_is_refused(tmp_path):
    eng = make_engine(tmp_path)
    eng.register(registration("h1"))
    for bad in (
        dict(fingerprint="0" * 64),
        dict(class_names=("a", "b")),
        dict(initial_sha256=state_digest(initial_state(seed=1))),
        dict(embed_dim=32),
    ):
        assert refusal(lambda bad=bad: eng.register(registration("h2", **bad))) is Reason.REGISTRATION_MISMATCH
    assert refusal(lambda: eng.register(registration("h2", role=None))) is Reason.BAD_ROLE
    assert refusal(lambda: eng.register(registration("h2", num_val=-1))) is Reason.BAD_SAMPLE_COUNT
    assert refusal(lambda: eng.register(registration("h 2"))) is Reason.BAD_NODE_ID
    assert refusal(lambda: eng.register(registration("h1", role=Role.EVALUATOR, num_train=0))) is Reason.NODE_ID_TAKEN
    assert set(eng.nodes) == {"h1"}


def test_software_version_is_recorded_per_node_and_a_mismatch_reported(tmp_path):
    eng = make_engine(tmp_path)
    eng.register(registration("h1", software_version=__version__))
    eng.register(registration("h2", software_version="0.0.1"))
    assert eng.nodes["h2"] == NodeRecord(role=Role.TRAINER, num_train=10, software_version="0.0.1")
    report = eng.report_dict()
    assert report["nodes"]["h1"]["software_version"] == __version__
    assert report["other_versions"] == {"h2": "0.0.1"}
    # a checkpoint written before records carried a software_version still loads
    assert NodeRecord.from_dict({"role": "evaluator", "num_train": 0, "num_val": 0, "num_test": 5}) == NodeRecord(
        role=Role.EVALUATOR, num_train=0, num_test=5
    )


def test_the_upload_chunk_size_follows_the_aggregator_within_bounds():
    assert chunk_size(0) == CHUNK_BYTES  # none advertised
    assert chunk_size(64 * 1024) == 64 * 1024
    assert chunk_size(1) == MIN_CHUNK_BYTES
    assert chunk_size(1 << 40) == CHUNK_BYTES


def test_phases_and_roles_map_one_to_one_onto_the_wire_enums():
    assert set(PHASE_TO_PROTO) == set(Phase)
    assert sorted(PHASE_TO_PROTO.values()) == sorted(v for v in pb.RoundPhase.values() if v)
    assert set(ROLE_FROM_PROTO.values()) == set(Role)
    assert sorted(ROLE_FROM_PROTO) == sorted(v for v in pb.NodeRole.values() if v)


def test_deadline_closes_with_quorum_and_fails_without_it(tmp_path):
    clock = FakeClock()
    eng = make_engine(tmp_path / "a", clock=clock)
    for n in ("h1", "h2", "h3"):
        eng.register(registration(n))
    eng.step()
    for n in ("h1", "h2"):
        p = update_payload(eng.global_state, seed=hash(n) % 100)
        eng.submit(header(eng, n, p), p.data)
    assert eng.step() == pytest.approx(10) and eng.version == 0  # h3 missing, deadline not reached
    clock.now += 10
    eng.step()
    assert eng.version == 1  # quorum of 2 met at the deadline
    clock.now += 10 + 5  # no update at all: past deadline + quorum timeout
    eng.step()
    assert eng.phase == Phase.FAILED and eng.report_dict()["phase"] == "failed"
    eng2 = make_engine(tmp_path / "b", clock=clock)
    eng2.register(registration("h1"))
    clock.now += eng2.cfg.registration_timeout_s + 1
    eng2.step()
    report = eng2.report_dict()
    assert eng2.phase == Phase.FAILED and report["phase"] == "failed" and report["global_version"] == 0


def test_restart_from_checkpoint_keeps_run_global_and_accepted_ids(tmp_path):
    eng = make_engine(tmp_path)
    for n in ("h1", "h2"):
        eng.register(registration(n))
    eng.step()
    sent = {n: update_payload(eng.global_state, seed=len(n) + i) for i, n in enumerate(("h1", "h2"))}
    for n, p in sent.items():
        eng.submit(header(eng, n, p), p.data)
    eng.step()
    again = make_engine(tmp_path)
    assert again.run_id == eng.run_id and again.version == 1 and again.phase == Phase.COLLECTING
    assert again.nodes == eng.nodes
    assert all(torch.equal(again.global_state[k], eng.global_state[k]) for k in eng.global_state)
    p = sent["h1"]
    assert again.submit(header(again, "h1", p, round_id=0, update_id="h1-r0"), p.data).replayed
    other = update_payload(eng.global_state)  # other bytes under the accepted id: refused, not counted
    assert (
        refusal(lambda: again.submit(header(again, "h1", other, round_id=0, update_id="h1-r0"), other.data))
        is Reason.CONFLICTING_REPLAY
    )
    with pytest.raises(CheckpointMismatchError) as mismatch:
        make_engine(tmp_path, codec="fp16")
    assert isinstance(mismatch.value, ConfigError)  # the CLI prints it and exits 2


def test_run_finishes_after_the_last_round_and_waits_for_final_reports(tmp_path):
    eng = make_engine(tmp_path)
    for n in ("h1", "h2"):
        eng.register(registration(n))
    stop = threading.Event()
    driver = threading.Thread(target=eng.run, args=(stop,), daemon=True)
    driver.start()
    for _ in range(2):
        view = eng.round_view(eng.run_id, "h1", eng.version, max_wait_s=5)
        for n in ("h1", "h2"):
            p = update_payload(eng.global_state, seed=view.round_id + len(n))
            eng.submit(header(eng, n, p), p.data)
        eng.round_view(eng.run_id, "h1", view.round_id + 1, max_wait_s=5)
    assert eng.phase == Phase.FINISHED and eng.version == 2
    metrics = {"n": 3, "accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0, "ece": 0.0}
    assert not eng.report(eng.run_id, "h1", 2, "r1", metrics, metrics, "ensemble")
    assert eng.report(eng.run_id, "h1", 2, "r1", metrics, metrics, "ensemble")  # replay
    assert driver.is_alive()  # still waiting for h2's final report
    eng.report(eng.run_id, "h2", 2, "r2", metrics, metrics, "ensemble")
    driver.join(timeout=5)
    assert not driver.is_alive() and eng.done
    assert eng.report_dict()["best_round"] == 2


@pytest.fixture()
def grpc_aggregator(tmp_path):
    """The real servicer on a real gRPC server on loopback, in this process."""
    with in_process_aggregator(tmp_path, rounds=2, embed_dim=DIM) as served_aggregator:
        yield served_aggregator


def _upload(stub, eng, node, payload, round_id=0, update_id=None, wire_bytes=None):
    head = pb.PayloadHeader(
        run_id=eng.run_id,
        round_id=round_id,
        node_id=node,
        update_id=update_id or f"{node}-r{round_id}",
        codec=payload.codec,
        wire_bytes=len(payload.data) if wire_bytes is None else wire_bytes,
        sha256=payload.sha256,
        raw_bytes=payload.raw_nbytes,
    )
    messages = [pb.UploadUpdateRequest(header=head)] + [
        pb.UploadUpdateRequest(chunk=c) for c in chunks(payload.data, 4096)
    ]
    return stub.UploadUpdate(iter(messages), timeout=10)


def register_fields() -> dict:
    """A trainer's RegisterRequest fields (all but the node id) that this module's aggregator admits."""
    return dict(
        role=pb.NODE_ROLE_TRAINER,
        backbone_fingerprint=FP,
        class_names=list(CLASSES),
        embed_dim=DIM,
        method="fedmedclip",
        initial_state_sha256=state_digest(initial_state()),
        num_train_samples=10,
    )


def test_grpc_statuses_for_refused_registrations_and_updates(grpc_aggregator):
    eng, stub, telemetry = grpc_aggregator
    req = register_fields()
    for n in ("h1", "h2"):
        stub.Register(pb.RegisterRequest(node_id=n, **req), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Register(pb.RegisterRequest(node_id="h3", **(req | {"backbone_fingerprint": "0" * 64})), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(refused.value) is Reason.REGISTRATION_MISMATCH
    info = stub.GetRound(pb.GetRoundRequest(run_id=eng.run_id, node_id="h1", max_wait_ms=5000), timeout=10).round
    assert info.phase == pb.ROUND_PHASE_COLLECTING and info.round_id == 0
    p = update_payload(eng.global_state)
    with pytest.raises(grpc.RpcError) as short:  # fewer bytes than announced
        _upload(stub, eng, "h1", p, wire_bytes=len(p.data) + 10)
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(short.value) is Reason.BAD_STREAM
    bad = replace(p, sha256="0" * 64)
    with pytest.raises(grpc.RpcError) as checksum:
        _upload(stub, eng, "h1", bad)
    assert checksum.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(checksum.value) is Reason.CHECKSUM_MISMATCH
    with pytest.raises(grpc.RpcError) as future:
        _upload(stub, eng, "h1", p, round_id=1)
    assert future.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_of(future.value) is Reason.FUTURE_ROUND
    with pytest.raises(grpc.RpcError) as unknown:
        _upload(stub, eng, "nobody", p)
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED and reason_of(unknown.value) is Reason.UNKNOWN_NODE
    first = _upload(stub, eng, "h1", p)
    retry = _upload(stub, eng, "h1", p)
    assert not first.replayed and retry.replayed and retry.update_id == first.update_id
    rejected = {
        s.labels["reason"]: s.value
        for m in telemetry.registry.collect()
        if m.name == "fedmedclip_updates_rejected"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert rejected == {"bad_stream": 1.0, "checksum_mismatch": 1.0, "future_round": 1.0, "unknown_node": 1.0}
    _upload(stub, eng, "h2", update_payload(eng.global_state, seed=5))
    info = stub.GetRound(
        pb.GetRoundRequest(run_id=eng.run_id, node_id="h1", wait_for_round=1, max_wait_ms=5000), timeout=10
    ).round
    assert info.round_id == 1 and info.global_version == 1
    with pytest.raises(grpc.RpcError) as stale:
        _upload(stub, eng, "h1", p, round_id=0, update_id="h1-late")
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_of(stale.value) is Reason.STALE_ROUND
    parts = list(stub.FetchGlobal(pb.FetchGlobalRequest(run_id=eng.run_id, node_id="h1", version=1), timeout=10))
    assert parts[0].WhichOneof("content") == "header"
    payload = b"".join(m.chunk for m in parts[1:])
    assert len(payload) == parts[0].header.wire_bytes
    decoded = decode_adapter(payload, parts[0].header.sha256, initial_state(), WireConfig())
    assert all(torch.equal(decoded.tensors[k], eng.global_state[k]) for k in eng.global_state)


def test_updates_beyond_the_poisoning_bounds_are_refused_before_they_touch_the_average(tmp_path):
    eng = make_engine(tmp_path, max_update_norm=1.0, max_abs_value=2.0)
    for n in ("h1", "h2"):
        eng.register(registration(n))
    eng.step()
    g = eng.global_state
    far = encode_adapter({k: v + 0.5 for k, v in g.items()}, g, WireConfig())  # every value small, the step large
    spike = {k: v.clone() for k, v in g.items()}
    spike["fc2.weight"][1, 1] = 3.0
    spiked = encode_adapter(spike, g, WireConfig())
    for payload, reason in ((far, Reason.UPDATE_NORM_TOO_LARGE), (spiked, Reason.UPDATE_VALUE_TOO_LARGE)):
        assert refusal(lambda p=payload: eng.submit(header(eng, "h1", p), p.data)) is reason
    assert eng.aggregator.count == 0 and not eng.ledger.open
    ok = update_payload(g, scale=0.01)
    assert not eng.submit(header(eng, "h1", ok), ok.data).replayed  # a normal update still goes in


def test_the_robust_aggregation_rule_is_chosen_in_the_aggregator_config(tmp_path):
    from shared.learning.aggregation import make_aggregator
    from shared.learning.rounds import fold_update, publish_global
    from shared.ops.config import load_config

    yaml_file = tmp_path / "aggregator.yaml"
    yaml_file.write_text("aggregation: trimmed_mean\ntrim_ratio: 0.34\nmax_update_norm: null\n")
    cfg = load_config(
        AggregatorConfig,
        yaml_path=str(yaml_file),
        env={},
        flags={"out_dir": str(tmp_path), "rounds": 1, "min_nodes": 3, "embed_dim": DIM},
    )
    eng = RoundEngine(cfg, CheckpointStore(tmp_path), Telemetry("aggregator"))
    for n in ("h1", "h2", "h3"):
        eng.register(registration(n))
    eng.step()
    g = eng.global_state
    sent = [update_payload(g, seed=1), update_payload(g, seed=2), update_payload(g, scale=20.0, seed=3)]  # h3 poisons
    expected = make_aggregator("trimmed_mean", trim_ratio=0.34)
    for node, p in zip(("h1", "h2", "h3"), sent, strict=True):
        eng.submit(header(eng, node, p), p.data)
        fold_update(expected, p.data, p.sha256, g, 10, WireConfig())
    eng.step()
    want = publish_global(expected, g, WireConfig())[1]
    assert eng.version == 1 and all(torch.equal(eng.global_state[k], want[k]) for k in want)
    drift = max(float((eng.global_state[k] - g[k]).abs().max()) for k in g)
    assert drift < 0.1  # the 20x outlier was trimmed away, per coordinate


def test_config_files_merge_in_order_and_bool_flags_stand_alone(tmp_path):
    import argparse

    from shared.ops.config import add_config_flags, load_config

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("rounds: 3\nmin_nodes: 2\n")
    b.write_text("rounds: 7\nallowed_nodes: [h1, h2]\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser, AggregatorConfig)
    cfg = load_config(AggregatorConfig, yaml_path=[a, b], env={}, flags=parser.parse_args(["--insecure"]))
    assert (cfg.rounds, cfg.min_nodes, cfg.allowed_nodes, cfg.insecure) == (7, 2, ["h1", "h2"], True)
    assert not load_config(AggregatorConfig, env={}, flags=parser.parse_args(["--insecure", "false"])).insecure


def test_a_percent_sign_in_a_settings_description_reaches_the_help_as_written():
    import argparse
    import dataclasses

    from shared.ops.config import add_config_flags

    @dataclasses.dataclass
    class Settings:
        speed: float = 1.0  # steps ~25 % shorter

    parser = argparse.ArgumentParser()
    add_config_flags(parser, Settings)
    assert "--speed FLOAT steps ~25 % shorter (default: 1.0)" in " ".join(parser.format_help().split())


def _takeovers(eng, node: str) -> float:
    return eng.t.registry.get_sample_value("fedmedclip_session_takeovers_total", {"node": node}) or 0.0


def test_a_second_process_of_a_node_takes_its_session_over_and_the_first_is_refused(tmp_path):
    clock = FakeClock()
    eng = make_engine(tmp_path, clock=clock)
    eng.register(registration("h1"), session_id="a" * 32, peer="ipv4:10.0.0.1:5000")
    eng.heartbeat(eng.run_id, "h1", "a" * 32)
    clock.now += 3
    eng.register(registration("h1"), session_id="b" * 32, peer="ipv4:10.0.0.2:5000")  # a copy, while a is live
    assert _takeovers(eng, "h1") == 1
    assert refusal(lambda: eng.heartbeat(eng.run_id, "h1", "a" * 32)) is Reason.SESSION_REPLACED
    assert refusal(lambda: eng.round_view(eng.run_id, "h1", session_id="a" * 32)) is Reason.SESSION_REPLACED
    assert eng.heartbeat(eng.run_id, "h1", "b" * 32).run_id == eng.run_id  # the new process is served
    # a node restarted after its old process went quiet for node_timeout_s takes over without a warning
    clock.now += eng.cfg.node_timeout_s + 1
    eng.register(registration("h1"), session_id="c" * 32)
    assert _takeovers(eng, "h1") == 1 and eng.sessions["h1"].session_id == "c" * 32
    eng.heartbeat(eng.run_id, "h1")  # a node that sends no session id is not tracked
    assert set(eng.nodes) == {"h1"}


def test_after_a_restart_the_aggregator_adopts_the_first_session_it_hears_from(tmp_path):
    eng = make_engine(tmp_path)
    eng.register(registration("h1"), session_id="a")
    eng.register(registration("h2"), session_id="b")
    eng.step()
    p1, p2 = update_payload(eng.global_state, seed=1), update_payload(eng.global_state, seed=2)
    eng.submit(header(eng, "h1", p1), p1.data)
    eng.submit(header(eng, "h2", p2), p2.data)
    eng.step()  # round 1 closed: checkpointed
    again = make_engine(tmp_path)
    assert again.sessions == {} and set(again.nodes) == {"h1", "h2"}
    again.heartbeat(again.run_id, "h1", "a")  # the node's process from before the restart
    assert refusal(lambda: again.heartbeat(again.run_id, "h1", "x")) is Reason.SESSION_REPLACED


def test_a_dry_run_registration_checks_everything_and_registers_nothing(tmp_path):
    eng = make_engine(tmp_path)
    view = eng.register(registration("h1"), dry_run=True)
    assert eng.nodes == {} and view.phase == Phase.WAITING_FOR_NODES and view.run_id == eng.run_id
    assert eng.registry.fingerprint is None  # a dry run pins nothing
    eng.register(registration("h1"), session_id="a")
    assert refusal(lambda: eng.register(registration("h1", num_train=11), dry_run=True)) is Reason.SAMPLE_COUNT_CHANGED
    mismatch = refusal(lambda: eng.register(registration("h2", fingerprint="other"), dry_run=True))
    assert mismatch is Reason.REGISTRATION_MISMATCH
    assert "h1 is running now" in eng.register(registration("h1"), dry_run=True).message
    assert set(eng.nodes) == {"h1"} and eng.sessions["h1"].session_id == "a" and _takeovers(eng, "h1") == 0


def test_every_message_is_counted_and_the_node_and_the_aggregator_count_the_same_bytes(tmp_path):
    node = Telemetry("hospital_node")
    with in_process_aggregator(tmp_path, rounds=2, embed_dim=DIM, node_telemetry=node) as (eng, stub, agg):
        for n in ("h1", "h2"):
            stub.Register(pb.RegisterRequest(node_id=n, session_id=n * 8, **register_fields()), timeout=10)
        stub.Heartbeat(pb.HeartbeatRequest(run_id=eng.run_id, node_id="h1", session_id="h1" * 8), timeout=10)
        with pytest.raises(grpc.RpcError):  # a refusal: the request is counted, no response comes back
            stub.Heartbeat(pb.HeartbeatRequest(run_id=eng.run_id, node_id="h9"), timeout=10)
        stub.GetRound(pb.GetRoundRequest(run_id=eng.run_id, node_id="h1", max_wait_ms=5000), timeout=10)
        p = update_payload(eng.global_state)
        assert not _upload(stub, eng, "h1", p).replayed
        sent, received = node.traffic.take(), agg.traffic.take()
    assert sent == received  # message bytes as serialised: the same on both ends, RPC by RPC
    assert set(sent["by_rpc"]) == {"Register", "Heartbeat", "GetRound", "UploadUpdate"}
    assert sent["by_rpc"]["UploadUpdate"]["up"] > len(p.data)  # the payload and its header
    assert sent["up"] == sum(v["up"] for v in sent["by_rpc"].values()) and sent["down"] > 0
    counted = node.registry.get_sample_value(
        "fedmedclip_rpc_message_bytes_total", {"grpc_method": "UploadUpdate", "direction": "up"}
    )
    assert counted == sent["by_rpc"]["UploadUpdate"]["up"]
    assert node.traffic.take() == {"up": 0, "down": 0, "by_rpc": {}}  # take() starts a new tally


def test_the_round_view_names_the_best_and_the_decided_version(tmp_path):
    clock = FakeClock()
    eng = make_engine(tmp_path, clock=clock)
    for n in ("h1", "h2"):
        eng.register(registration(n))
    eng.step()
    for _ in range(2):  # two rounds: versions 1 and 2
        for i, n in enumerate(("h1", "h2")):
            p = update_payload(eng.global_state, seed=i + 1)
            eng.submit(header(eng, n, p), p.data)
        eng.step()
    assert eng.version == 2
    metrics = lambda acc: {"n": 10, "accuracy": acc}  # noqa: E731
    view = eng.heartbeat(eng.run_id, "h1")
    assert (view.best_version, view.decided_version) == (0, 0)
    eng.report(eng.run_id, "h1", 1, "h1-v1", metrics(0.8), None, "ensemble")
    eng.report(eng.run_id, "h2", 1, "h2-v1", metrics(0.6), None, "ensemble")
    eng.report(eng.run_id, "h1", 2, "h1-v2", metrics(0.5), None, "ensemble")  # version 2 not complete yet
    clock.now += 1.0  # recomputed at most once a second while reports come in
    view = eng.heartbeat(eng.run_id, "h1")
    assert (view.best_version, view.decided_version) == (1, 1)
    eng.report(eng.run_id, "h2", 2, "h2-v2", metrics(1.0), None, "ensemble")  # mean 0.75 beats 0.7
    clock.now += 1.0
    view = eng.heartbeat(eng.run_id, "h1")
    assert (view.best_version, view.decided_version) == (2, 2) == (eng.report_dict()["best_round"], 2)
