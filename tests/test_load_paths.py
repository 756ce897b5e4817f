"""The aggregator's per-call paths made cheaper for a thousand nodes (bench/results/load.md), still right.

The engine's cached trainer list follows every registration (a new trainer, an evaluator, a refused one),
and a round still closes only once every trainer's update is in; the interceptors build each method's
handler once and still count every call; the aggregator's interpreter settings.
"""

from __future__ import annotations

import gc
import sys
import time

import grpc
import pytest
import torch

from aggregator.checkpoint import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.engine import Phase, RoundEngine, UpdateHeader
from aggregator.errors import EngineError
from aggregator.registry import Registration, Role
from aggregator.service import DecodeGuard, _tune_interpreter
from shared.learning.rounds import WireConfig, encode_adapter
from shared.learning.training import TrainConfig, build_adapter, get_method
from shared.ops.telemetry import MetricsInterceptor, Telemetry
from shared.wire.protocol import state_digest

DIM = 16
FP = "f" * 64
CLASSES = ("a", "b", "c")


def initial_state() -> dict[str, torch.Tensor]:
    return build_adapter(get_method("fedmedclip"), DIM, TrainConfig(), 0).travel_state()


def make_engine(tmp_path, **overrides) -> RoundEngine:
    settings = dict(out_dir=str(tmp_path), rounds=2, min_nodes=2, embed_dim=DIM, round_timeout_s=10, linger_s=1)
    cfg = AggregatorConfig(**(settings | overrides))
    return RoundEngine(cfg, CheckpointStore(tmp_path), Telemetry("aggregator"), clock=time.monotonic)


def registration(node: str, role: Role = Role.TRAINER) -> Registration:
    return Registration(
        node_id=node,
        role=role,
        fingerprint=FP,
        class_names=CLASSES,
        embed_dim=DIM,
        method="fedmedclip",
        initial_sha256=state_digest(initial_state()),
        num_train=10 if role == Role.TRAINER else 0,
    )


def submit(eng: RoundEngine, node: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in eng.global_state.items()}
    payload = encode_adapter(state, eng.global_state, WireConfig())
    eng.submit(
        UpdateHeader(
            run_id=eng.run_id,
            round_id=eng.version,
            node_id=node,
            update_id=f"{node}-r{eng.version}",
            codec=payload.codec,
            sha256=payload.sha256,
            wire_bytes=len(payload.data),
            num_train=10,
        ),
        payload.data,
    )


def test_trainer_count_follows_registrations(tmp_path):
    eng = make_engine(tmp_path, min_nodes=1)
    eng.register(registration("h1"))
    assert eng.round_view(eng.run_id, "h1").registered_trainers == 1
    eng.register(registration("h2"))
    assert eng.round_view(eng.run_id, "h1").registered_trainers == 2
    eng.register(registration("e1", Role.EVALUATOR))  # a new node, not a trainer
    eng.register(registration("h0"))  # re-registrations and new trainers alike
    eng.register(registration("h1"))
    with pytest.raises(EngineError):  # a trainer cannot come back as an evaluator: nothing changes
        eng.register(registration("h2", Role.EVALUATOR))
    assert eng.round_view(eng.run_id, "h1").registered_trainers == 3
    assert eng._trainers()[0] == ["h0", "h1", "h2"]


def test_round_closes_only_when_every_trainer_is_in(tmp_path):
    eng = make_engine(tmp_path, min_nodes=2)
    for node in ("h1", "h2", "h3"):
        eng.register(registration(node))
    eng.step()
    assert eng.phase == Phase.COLLECTING and eng.version == 0
    submit(eng, "h1", 1)
    submit(eng, "h2", 2)
    eng.step()  # two of three in, the deadline far away: still open
    assert eng.version == 0 and set(eng.ledger.open) == {"h1", "h2"}
    submit(eng, "h3", 3)
    eng.step()
    assert eng.version == 1 and eng.rounds_log[-1]["nodes"] == ["h1", "h2", "h3"]


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Context:
    def code(self):
        return None


def test_interceptors_build_each_handler_once_and_count_every_call():
    telemetry = Telemetry("aggregator")
    built = []

    def echo(request, context):
        return request

    def continuation(details):
        built.append(details.method)
        if details.method != "/fedmedclip.v1.AggregatorService/Heartbeat":
            return None  # an unknown method: no handler, and none kept
        return grpc.unary_unary_rpc_method_handler(echo, lambda b: b.decode(), lambda s: s.encode())

    metrics = MetricsInterceptor(telemetry)
    guard = DecodeGuard()

    def chain(details):
        return metrics.intercept_service(lambda d: guard.intercept_service(continuation, d), details)

    method = "/fedmedclip.v1.AggregatorService/Heartbeat"
    handlers = [chain(_Details(method)) for _ in range(3)]
    assert built == [method] and handlers[0] is handlers[1] is handlers[2]
    for i in range(3):
        request = handlers[0].request_deserializer(f"ping{i}".encode())
        assert handlers[0].unary_unary(request, _Context()) == f"ping{i}"
    handled = telemetry.grpc_handled.labels(
        grpc_service="fedmedclip.v1.AggregatorService", grpc_method="Heartbeat", grpc_type="unary", grpc_code="OK"
    )
    assert handled._value.get() == 3
    up = telemetry.traffic.peek()["by_rpc"]["Heartbeat"]["up"]
    assert up == sum(len(f"ping{i}") for i in range(3))
    unknown = "/fedmedclip.v1.AggregatorService/Nope"
    assert chain(_Details(unknown)) is None and chain(_Details(unknown)) is None
    assert built.count(unknown) == 2 and unknown not in metrics._handlers


@pytest.fixture
def restored_interpreter():
    interval, threshold, threads = sys.getswitchinterval(), gc.get_threshold(), torch.get_num_threads()
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*threshold)
    gc.unfreeze()
    torch.set_num_threads(threads)


def test_interpreter_tuning(restored_interpreter):
    _tune_interpreter()
    assert torch.get_num_threads() == 1
    assert sys.getswitchinterval() == pytest.approx(0.001)
    assert gc.get_threshold()[0] == 20_000
    assert gc.get_freeze_count() > 0
