"""Trust, part two: one hospital can neither stall nor steer the federation (docs/trust-model.md).

The precise rules behind the hostile-input suite (tests/test_hostile_input.py, which attacks a real
aggregator process and a real node process and writes bench/results/hostile.md), checked here on the
round engine and the node client directly, on real gRPC where a wire is involved:

* weights: a sample count fixed at the first registration, cut to ``max_samples_per_node``, no share
  above ``max_weight_share`` (water-filled when a round opens), a joiner's weight, what holds when
  nodes drop out, the same rule in the in-process simulation;
* reports: every field validated and bounded, typed refusals, one report per node and version, an
  append-only report log that survives a restart and a torn line, strict JSON;
* ids validated and client strings escaped before they are logged;
* a payload header with a 5,000-digit integer, a replay under the accepted hash with other bytes, a
  payload in another codec or delta mode, round ids beyond 32 bits: each a typed refusal;
* the node: a global it cannot take is refused with a typed error, its state kept, fetched again
  after a backoff, and given up (exit code 1) only after ``give_up_after_s``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import struct
import threading
import time
from concurrent import futures
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
import zstandard

from aggregator.checkpoint import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.engine import Phase, RoundEngine, UpdateHeader
from aggregator.errors import EngineError
from aggregator.registry import Registration, Role
from hospital_node.client import GlobalRefused, NodeClient
from hospital_node.config import NodeConfig
from shared.learning.aggregation import capped_weights, joiner_weight, make_aggregator
from shared.learning.rounds import WireConfig, encode_adapter, fold_update, make_update, publish_global
from shared.learning.training import HospitalLearner, TrainConfig, build_adapter, get_method
from shared.ops.report import strict_json
from shared.ops.telemetry import Telemetry
from shared.simulation import SimConfig, SimulateConfig, prepare, run
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.protocol import state_digest
from shared.wire.reasons import Reason
from shared.wire.transport import Backoff, channel_options, chunks, server_options, sha256_hex

DIM = 16
FP = "f" * 64
CLASSES = ("a", "b", "c")
METRICS = {"n": 20, "accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5, "ece": 0.1}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def initial_state() -> dict[str, torch.Tensor]:
    return build_adapter(get_method("fedmedclip"), DIM, TrainConfig(), 0).travel_state()


def make_engine(tmp_path, clock=None, **overrides) -> RoundEngine:
    settings = (
        dict(
            out_dir=str(tmp_path),
            rounds=2,
            min_nodes=2,
            embed_dim=DIM,
            round_timeout_s=10,
            quorum_timeout_s=5,
            linger_s=1,
        )
        | overrides
    )
    return RoundEngine(
        AggregatorConfig(**settings), CheckpointStore(tmp_path), Telemetry("aggregator"), clock=clock or time.monotonic
    )


def registration(node: str, num_train: int = 10, **kw) -> Registration:
    base = dict(
        node_id=node,
        role=Role.TRAINER,
        fingerprint=FP,
        class_names=CLASSES,
        embed_dim=DIM,
        method="fedmedclip",
        initial_sha256=state_digest(initial_state()),
        num_train=num_train,
    )
    return Registration(**(base | kw))


def update(global_state, seed: int = 1, wire: WireConfig = WireConfig(), scale: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in global_state.items()}
    return encode_adapter(state, global_state, wire)


def header(engine, node: str, payload, **kw) -> UpdateHeader:
    fields = dict(
        run_id=engine.run_id,
        round_id=engine.version,
        node_id=node,
        update_id=f"{node}-r{engine.version}",
        codec=payload.codec,
        sha256=payload.sha256,
        wire_bytes=len(payload.data),
    )
    return UpdateHeader(**(fields | kw))


def refusal(call) -> Reason:
    with pytest.raises(EngineError) as refused:
        call()
    assert refused.value.code == refused.value.reason.code
    return refused.value.reason


def opened(tmp_path, counts: dict[str, int], **overrides) -> RoundEngine:
    eng = make_engine(tmp_path, min_nodes=len(counts), **overrides)
    for node, n in counts.items():
        eng.register(registration(node, n))
    eng.step()
    assert eng.phase == Phase.COLLECTING
    return eng


# --------------------------------------------------------------------------- weights (item 2)


def test_the_weights_are_water_filled_over_the_trainers_when_a_round_opens(tmp_path):
    counts = {"h1": 30, "h2": 10, "liar": 10**9}
    eng = opened(tmp_path, counts)
    assert (
        eng.weights
        == capped_weights(counts, max_samples=1_000_000, max_share=0.5)
        == {"h1": 30.0, "h2": 10.0, "liar": 40.0}
    )
    payloads = {n: update(eng.global_state, seed=i) for i, n in enumerate(counts, start=1)}
    for n, p in payloads.items():
        eng.submit(header(eng, n, p), p.data)
    eng.step()
    assert eng.version == 1 and eng.rounds_log[0]["weights"] == {"h1": 30.0, "h2": 10.0, "liar": 40.0}
    # the published global is the fold with exactly these weights
    expected = make_aggregator("weighted")
    for n, p in payloads.items():
        fold_update(expected, p.data, p.sha256, initial_state(), eng.weights[n], WireConfig())
    assert eng.published[1] == publish_global(expected, initial_state(), WireConfig())[0].data


def test_without_caps_the_weights_are_the_sample_counts_as_before(tmp_path):
    counts = {"h1": 30, "h2": 10, "liar": 10**9}
    eng = opened(tmp_path, counts, max_samples_per_node=None, max_weight_share=None)
    assert eng.weights == {n: float(c) for n, c in counts.items()}
    shares = {n: w / sum(eng.weights.values()) for n, w in eng.weights.items()}
    assert shares["liar"] > 0.9999999  # the review's finding, when both caps are turned off


def test_a_sample_count_is_fixed_for_the_run_even_across_a_restart(tmp_path):
    eng = opened(tmp_path, {"h1": 30, "h2": 10})
    assert refusal(lambda: eng.register(registration("h1", 10**9))) is Reason.SAMPLE_COUNT_CHANGED
    assert refusal(lambda: eng.register(registration("h2", 9))) is Reason.SAMPLE_COUNT_CHANGED
    assert Reason.SAMPLE_COUNT_CHANGED.code == grpc.StatusCode.FAILED_PRECONDITION
    eng.register(registration("h1", 30))  # the same count: a node restarting registers again, as always
    assert eng.nodes["h1"].num_train == 30 and eng.weights == {"h1": 10.0, "h2": 10.0}  # two nodes, cap 0.5
    for n in ("h1", "h2"):
        p = update(eng.global_state, seed=len(n))
        eng.submit(header(eng, n, p), p.data)
    eng.step()  # a checkpoint with the counts
    restored = make_engine(tmp_path, min_nodes=2)
    assert restored.version == 1 and restored.phase == Phase.COLLECTING
    assert refusal(lambda: restored.register(registration("h1", 10**9))) is Reason.SAMPLE_COUNT_CHANGED
    assert restored.nodes["h1"].num_train == 30 and restored.weights == {"h1": 10.0, "h2": 10.0}


def test_a_trainer_joining_an_open_round_takes_at_most_the_share_cap_of_the_round(tmp_path):
    eng = opened(tmp_path, {"h1": 30, "h2": 10})
    assert eng.weights == {"h1": 10.0, "h2": 10.0}  # two trainers and a 0.5 cap: equal weights
    eng.register(registration("late", 10**9))  # registers while round 1 is open, and uploads in it
    p = update(eng.global_state, seed=3)
    eng.submit(header(eng, "late", p), p.data)
    w = joiner_weight(10**9, 20.0, max_samples=1_000_000, max_share=0.5)
    assert eng.weights["late"] == w == 20.0
    assert eng.weights["late"] / sum(eng.weights.values()) <= 0.5


def test_what_holds_when_nodes_drop_out_of_a_round(tmp_path):
    """Weights are fixed when the round opens; if some trainers' updates are missing when it closes at its
    deadline, each folded node's share is w_i / (sum of the folded weights) <= max_share * W_open / W_folded."""
    clock = FakeClock()
    counts = {"h1": 30, "h2": 10, "liar": 10**9}
    eng = make_engine(tmp_path, clock=clock, min_nodes=2)
    for n, c in counts.items():
        eng.register(registration(n, c))
    eng.step()
    assert eng.weights == {"h1": 30.0, "h2": 10.0, "liar": 40.0}  # W_open = 80
    for n in ("liar", "h2"):  # h1 drops out
        p = update(eng.global_state, seed=len(n))
        eng.submit(header(eng, n, p), p.data)
    clock.now += 11  # past the deadline, with the quorum of 2
    eng.step()
    folded = eng.rounds_log[0]["weights"]
    assert folded == {"liar": 40.0, "h2": 10.0}
    share = folded["liar"] / sum(folded.values())
    assert share == pytest.approx(0.8) and share <= 0.5 * 80 / 50 + 1e-12  # the documented bound, reached


def test_the_simulation_folds_with_the_same_weights(brain_tumor_root, backbone, feature_cache):
    """One round of the simulation equals the round replayed step by step with capped_weights, when the cap
    binds (3 hospitals, max_weight_share 0.34: the largest holds 47% of the samples) and when it does not."""
    cfg = SimConfig(
        data_root=str(brain_tumor_root),
        per_class=40,
        n_hospitals=3,
        alpha=0.5,
        rounds=1,
        cache_dir=str(feature_cache),
        device="cpu",
        progress=False,
        max_weight_share=0.34,
    )
    prepared = prepare(cfg, backbone=backbone)
    training = [h for h in prepared.hospitals if not h.held_out]
    counts = {h.name: len(h.split.train) for h in training}
    assert max(counts.values()) / sum(counts.values()) > 0.34  # the cap binds
    assert max(counts.values()) / sum(counts.values()) <= 0.5  # the default does not

    def replay(max_share: float | None) -> list[float]:
        torch.manual_seed(cfg.seed)
        method = get_method(cfg.method)
        dim = prepared.features.shape[1]
        learners = [
            HospitalLearner(
                method,
                cfg.train,
                dim=dim,
                num_classes=len(prepared.dataset.class_names),
                text_features=prepared.text,
                logit_scale=prepared.backbone.logit_scale,
                seed=cfg.seed,
                hospital_index=i,
                device="cpu",
            )
            for i in range(len(training))
        ]
        g0 = build_adapter(method, dim, cfg.train, cfg.seed).travel_state()
        weights = capped_weights(counts, max_samples=cfg.max_samples_per_node, max_share=max_share)
        agg = make_aggregator("weighted")
        for h, learner in zip(training, learners, strict=True):
            idx = torch.from_numpy(np.array(h.split.train, dtype=np.int64))
            payload, _ = make_update(learner, g0, prepared.features[idx], prepared.labels[idx], 0, cfg.wire)
            fold_update(agg, payload.data, payload.sha256, g0, weights[h.name], cfg.wire)
        _, g1 = publish_global(agg, g0, cfg.wire)
        accs = []
        for h, learner in zip(training, learners, strict=True):
            learner.load_adapter_state(g1)
            idx = torch.from_numpy(np.array(h.split.val, dtype=np.int64))
            accs.append(learner.evaluate(prepared.features[idx], prepared.labels[idx])["accuracy"])
        return accs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for share in (0.34, 0.5):
            report = run(replace(cfg, max_weight_share=share), prepared)
            accs = replay(share)
            assert report["history"][0]["mean_val_accuracy"] == pytest.approx(sum(accs) / len(accs), abs=1e-9)
            assert report["config"]["max_weight_share"] == share
    finally:
        torch.set_num_threads(threads)
    assert SimulateConfig(max_weight_share=0.3).sim_config().max_weight_share == 0.3
    with pytest.raises(ValueError):
        SimulateConfig(max_weight_share=1.5)


# --------------------------------------------------------------------------- reports (item 4)


def finished_engine(tmp_path) -> RoundEngine:
    eng = make_engine(tmp_path, rounds=1)
    for n in ("h1", "h2"):
        eng.register(registration(n))
    eng.register(registration("ev", 0, role=Role.EVALUATOR))
    eng.step()
    for n in ("h1", "h2"):
        p = update(eng.global_state, seed=len(n))
        eng.submit(header(eng, n, p), p.data)
    eng.step()
    assert eng.version == 1
    return eng


@pytest.mark.parametrize(
    "bad",
    [
        dict(val=METRICS | {"accuracy": math.nan}),
        dict(val=METRICS | {"accuracy": math.inf}),
        dict(test=METRICS | {"ece": -math.inf}),
        dict(val=METRICS | {"accuracy": 1.5}),
        dict(val=METRICS | {"macro_f1": -0.1}),
        dict(val=METRICS | {"n": -1}),
        dict(val=METRICS | {"n": 10**10}),
        dict(val=METRICS | {"n": 1.5}),
        dict(val={"accuracy": 0.5}),
        dict(val=METRICS | {"extra": 1.0}),
        dict(head="h" * (3 << 20)),
        dict(head="best"),
        dict(head=""),
        dict(report_id="r" * 100_000),
        dict(report_id=""),
        dict(report_id="r\nFORGED"),
        dict(report_id="r\x00"),
        dict(train={"steps": 1, "seconds": math.nan, "loss": 0.1}),
        dict(train={"steps": -1, "seconds": 1.0, "loss": 0.1}),
        dict(train={"steps": 1, "seconds": 1e12, "loss": 0.1}),
        dict(train={"steps": 1, "seconds": 1.0, "loss": math.inf}),
    ],
)
def test_every_report_field_is_validated_and_bounded(tmp_path, bad):
    eng = finished_engine(tmp_path)
    fields = dict(report_id="h1-v1", val=METRICS, test=METRICS, head="ensemble", train=None) | bad
    assert (
        refusal(
            lambda: eng.report(
                eng.run_id, "h1", 1, fields["report_id"], fields["val"], fields["test"], fields["head"], fields["train"]
            )
        )
        is Reason.BAD_REPORT
    )
    assert eng.reports.get("1", {}) == {} and not eng.store.reports_path.exists()


def test_a_node_may_share_only_its_validation_accuracy_or_nothing_and_selection_uses_what_it_gets(tmp_path):
    eng = finished_engine(tmp_path)
    assert not eng.report(eng.run_id, "h1", 1, "h1-v1", {"n": 20, "accuracy": 0.625}, None, "ensemble")  # val_accuracy
    assert not eng.report(eng.run_id, "h2", 1, "h2-v1", None, None, "ensemble")  # none: only "evaluated"
    kept = eng.reports["1"]
    assert kept["h1"]["val"] == {"n": 20, "accuracy": 0.625, "balanced_accuracy": None, "macro_f1": None, "ece": None}
    assert kept["h1"]["test"] is None and kept["h2"]["val"] is None and kept["h2"]["test"] is None
    report = eng.report_dict()
    assert report["best_round"] == 1 and report["best_mean_val_accuracy"] == 0.625  # from what was shared
    assert report["test"] == {}  # no trainer shared a test metric
    # metrics without n or accuracy are still refused
    for bad in ({"n": 20}, {"accuracy": 0.5}, {"n": 20, "macro_f1": 0.5}):
        assert refusal(lambda b=bad: eng.report(eng.run_id, "ev", 1, "ev-v1", None, b, "clip")) is Reason.BAD_REPORT


def test_with_no_validation_accuracy_shared_no_round_is_selected_and_the_report_says_why(tmp_path):
    eng = finished_engine(tmp_path)
    for n in ("h1", "h2"):
        eng.report(eng.run_id, n, 1, f"{n}-v1", None, None, "ensemble")
    report = eng.report_dict()
    assert "best_round" not in report and report["history"][0]["complete"]
    assert "No trainer shares its validation accuracy" in eng.markdown()


def test_the_aggregator_selects_by_the_configured_metric(tmp_path):
    eng = finished_engine(tmp_path)  # one round: version 1 only
    assert eng.report_dict()["select_by"] == "accuracy"
    bal = make_engine(tmp_path / "bal", rounds=1, select_by="balanced_accuracy")
    assert bal.t.registry.get_sample_value("fedmedclip_run_active") == 1  # waiting for nodes
    assert eng.t.registry.get_sample_value("fedmedclip_run_active") == 0  # finished
    for n in ("h1", "h2"):
        bal.register(registration(n))
    bal.step()
    for n in ("h1", "h2"):
        p = update(bal.global_state, seed=len(n))
        bal.submit(header(bal, n, p), p.data)
    bal.step()
    bal.report(bal.run_id, "h1", 1, "h1-v1", METRICS | {"balanced_accuracy": 0.3}, METRICS, "ensemble")
    bal.report(bal.run_id, "h2", 1, "h2-v1", {"n": 20, "accuracy": 0.9}, None, "ensemble")  # no balanced acc.
    report = bal.report_dict()
    assert report["select_by"] == "balanced_accuracy" and report["best_mean_val"] == 0.3  # from h1 alone
    assert report["best_mean_val_accuracy"] == (0.5 + 0.9) / 2
    assert "Best round 1 by mean val balanced accuracy (0.3000)" in bal.markdown()
    with pytest.raises(ValueError, match="select_by"):
        AggregatorConfig(select_by="auc")


def test_reports_are_kept_once_appended_as_strict_json_and_survive_a_restart(tmp_path):
    eng = finished_engine(tmp_path)
    empty = {"n": 0, "accuracy": math.nan, "balanced_accuracy": math.nan, "macro_f1": math.nan, "ece": math.nan}
    assert not eng.report(
        eng.run_id, "h1", 1, "h1-v1", METRICS, METRICS, "ensemble", {"steps": 3, "seconds": 0.5, "loss": math.nan}
    )
    assert eng.report(eng.run_id, "h1", 1, "h1-v1", METRICS, METRICS, "ensemble")  # a replay
    assert (
        refusal(lambda: eng.report(eng.run_id, "h1", 1, "h1-v1-b", METRICS | {"accuracy": 1.0}, METRICS, "ensemble"))
        is Reason.CONFLICTING_REPORT
    )
    assert not eng.report(eng.run_id, "h2", 1, "h2-v1", empty, METRICS, "ensemble")  # an empty val split
    assert not eng.report(eng.run_id, "ev", 1, "ev-v1", None, METRICS, "clip")
    lines = eng.store.reports_path.read_text().splitlines()
    assert len(lines) == 3 and eng.store.reports_path.stat().st_size < 1500
    for line in lines:
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in reports.jsonl"))
    assert json.loads(lines[0])["entry"]["train"] == {"steps": 3, "seconds": 0.5, "loss": None}
    assert json.loads(lines[1])["entry"]["val"]["accuracy"] is None
    text = (tmp_path / "report.json").read_text()  # every final evaluation is in: written
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    assert report["history"][0]["mean_val_accuracy"] == 0.5 and report["best_round"] == 1
    assert "| h2 |" in (tmp_path / "report.md").read_text()
    # a crash in the middle of an append leaves a torn last line: skipped on restart, and the next append
    # starts a line of its own
    with eng.store.reports_path.open("ab") as handle:
        handle.write(b'{"version": 1, "node": "h9", "entry": {"rep')
    restored = make_engine(tmp_path, rounds=1)
    assert set(restored.reports["1"]) == {"h1", "h2", "ev"}
    assert restored.report(restored.run_id, "h1", 1, "h1-v1", METRICS, METRICS, "ensemble")  # still a replay
    restored.store.append_report(1, "h8", {"report_id": "x"})
    assert CheckpointStore(tmp_path).load_reports()["1"]["h8"] == {"report_id": "x"}


def test_a_legacy_reports_json_is_still_read(tmp_path):
    store = CheckpointStore(tmp_path)
    store.root.mkdir(parents=True)
    store.legacy_reports_path.write_text(json.dumps({"1": {"h1": {"report_id": "old"}}}))
    store.append_report(2, "h1", {"report_id": "new"})
    assert store.load_reports() == {"1": {"h1": {"report_id": "old"}}, "2": {"h1": {"report_id": "new"}}}


def test_report_json_is_strict_json_whatever_it_holds(tmp_path):
    eng = make_engine(tmp_path)
    eng.register(registration("h1"))
    eng.write_report()  # no round yet: seconds per round and means are not numbers
    text = (tmp_path / "report.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    assert strict_json({"a": [math.nan, 1.0, math.inf], "b": {"c": -math.inf}}) == {
        "a": [None, 1.0, None],
        "b": {"c": None},
    }


# --------------------------------------------------------------------------- ids and logs (item 5)


@pytest.mark.parametrize("update_id", ["", "u" * 129, "u\nFORGED", "u\rx", "u x", "ü", "u\x1b[31m"])
def test_update_ids_are_validated_at_the_boundary(tmp_path, update_id):
    eng = opened(tmp_path, {"h1": 10, "h2": 10})
    p = update(eng.global_state)
    assert refusal(lambda: eng.submit(header(eng, "h1", p, update_id=update_id), p.data)) is Reason.BAD_UPDATE_ID
    assert eng.aggregator.count == 0


def test_client_strings_reach_the_log_escaped(tmp_path, caplog):
    eng = make_engine(tmp_path)
    with caplog.at_level(logging.INFO, logger="fedmedclip.aggregator"):
        eng.register(registration("h1", software_version="1.0\nFORGED line"))
        with pytest.raises(EngineError) as refused:
            eng.register(registration("h2", class_names=("a\nFORGED", "b", "c")))
        with pytest.raises(EngineError):
            eng.heartbeat("r\nFORGED", "h1")
    assert refused.value.reason is Reason.REGISTRATION_MISMATCH
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "1.0\\nFORGED line" in text
    assert not [line for line in text.splitlines() if line.startswith("FORGED")]
    assert eng.nodes["h1"].software_version == "1.0\nFORGED line"  # kept as sent; escaped where logged


@pytest.mark.parametrize(
    "bad",
    [
        dict(fingerprint="f" * 129),
        dict(fingerprint=""),
        dict(fingerprint="f f"),
        dict(class_names=()),
        dict(class_names=("a" * 201,)),
        dict(class_names=tuple(f"c{i}" for i in range(1001))),
        dict(method="m" * 200),
        dict(initial_sha256=""),
    ],
)
def test_registration_strings_are_bounded(tmp_path, bad):
    eng = make_engine(tmp_path)
    assert refusal(lambda: eng.register(registration("h1", **bad))) is Reason.REGISTRATION_MISMATCH
    assert eng.registry.fingerprint is None and eng.registry.class_names is None  # nothing pinned


# --------------------------------------------------------------------------- payloads (items 6, 7, 10)


def _with_huge_integer(payload: bytes) -> bytes:
    raw = zstandard.ZstdDecompressor().decompress(payload)
    hlen = struct.unpack_from("<I", raw, 6)[0]
    text = raw[10 : 10 + hlen].decode().replace('"shape":[', '"shape":[' + "9" * 5000 + "0,", 1)
    blob = text.encode()
    return zstandard.ZstdCompressor().compress(struct.pack("<4sHI", b"FMCS", 1, len(blob)) + blob + raw[10 + hlen :])


def test_a_5000_digit_integer_in_a_payload_header_is_a_typed_refusal(tmp_path):
    eng = opened(tmp_path, {"h1": 10, "h2": 10})
    data = _with_huge_integer(update(eng.global_state).data)
    h = header(eng, "h1", update(eng.global_state), sha256=sha256_hex(data), wire_bytes=len(data))
    assert refusal(lambda: eng.submit(h, data)) is Reason.MALFORMED_PAYLOAD


def test_a_replay_is_recognised_by_the_bytes_not_by_the_claimed_hash(tmp_path):
    eng = opened(tmp_path, {"h1": 10, "h2": 10})
    p = update(eng.global_state)
    assert not eng.submit(header(eng, "h1", p), p.data).replayed
    junk = bytes(random.Random(0).randbytes(len(p.data)))
    assert refusal(lambda: eng.submit(header(eng, "h1", p), junk)) is Reason.CHECKSUM_MISMATCH
    assert refusal(lambda: eng.submit(header(eng, "h1", p), p.data[:-1])) is Reason.CHECKSUM_MISMATCH
    assert eng.submit(header(eng, "h1", p, sha256=p.sha256.upper()), p.data).replayed  # the same bytes
    other = update(eng.global_state, seed=9)
    assert (
        refusal(lambda: eng.submit(header(eng, "h1", other, update_id=f"h1-r{eng.version}"), other.data))
        is Reason.CONFLICTING_REPLAY
    )
    assert eng.aggregator.count == 1


def test_a_payload_in_another_codec_or_delta_mode_than_the_federations_is_refused(tmp_path):
    eng = opened(tmp_path, {"h1": 10, "h2": 10})
    for wire in (WireConfig(codec="fp32"), WireConfig(codec="int4"), WireConfig(delta=True)):
        p = update(eng.global_state, wire=wire)
        assert refusal(lambda p=p: eng.submit(header(eng, "h1", p), p.data)) is Reason.WIRE_MISMATCH
    p = update(eng.global_state)
    assert refusal(lambda: eng.submit(header(eng, "h1", p, codec="fp32"), p.data)) is Reason.CODEC_MISMATCH
    assert eng.aggregator.count == 0
    eng.submit(header(eng, "h1", p), p.data)  # the federation's codec (int8), no delta


def test_round_ids_and_versions_beyond_32_bits_are_refused(tmp_path):
    eng = finished_engine(tmp_path)
    p = update(eng.global_state)
    for round_id in (2**31, 2**32, 2**63 - 1, -(2**31) - 1):
        assert refusal(lambda r=round_id: eng.submit(header(eng, "h1", p, round_id=r), p.data)) is Reason.BAD_ROUND_ID
    for version in (2**32 + 1, -(2**40)):
        assert refusal(lambda v=version: eng.published_global(eng.run_id, "h1", v)) is Reason.BAD_ROUND_ID
        assert (
            refusal(lambda v=version: eng.report(eng.run_id, "h1", v, "r", None, METRICS, "ensemble"))
            is Reason.BAD_ROUND_ID
        )
    assert refusal(lambda: eng.published_global(eng.run_id, "h1", 2**31 - 1)) is Reason.NO_SUCH_VERSION


# --------------------------------------------------------------------------- the node (the other direction)


class RandomBytesAggregator(pb_grpc.AggregatorServiceServicer):
    """Every download of a global is random bytes (with their own correct SHA-256)."""

    def __init__(self) -> None:
        self.fetches = 0

    def FetchGlobal(self, request, context):
        self.fetches += 1
        data = random.Random(self.fetches).randbytes(2048)
        yield pb.FetchGlobalResponse(
            header=pb.PayloadHeader(
                version=request.version, codec="int8", wire_bytes=len(data), sha256=sha256_hex(data)
            )
        )
        for part in chunks(data):
            yield pb.FetchGlobalResponse(chunk=part)


@pytest.fixture()
def hostile_server():
    servicer = RandomBytesAggregator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options())
    pb_grpc.add_AggregatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    yield servicer, channel
    channel.close()
    server.stop(0).wait()


def _fetching_client(channel, give_up_after_s: float) -> NodeClient:
    """A NodeClient with what fetching a global uses (its learner and data are not needed for that)."""
    client = NodeClient.__new__(NodeClient)
    client.cfg = NodeConfig(node_id="h1", transfer_timeout_s=5.0, rpc_timeout_s=5.0)
    client.stop = threading.Event()
    client.refused = None
    client.backoff = Backoff(0.01, 0.05, give_up_after_s=give_up_after_s)
    client.rng = random.Random(0)
    client.stub = pb_grpc.AggregatorServiceStub(channel)
    client.run_id = "run"
    client.wire = WireConfig()
    client.t = Telemetry("hospital_node")
    return client


def test_a_node_refuses_a_bad_global_keeps_its_reference_and_gives_up_only_after_its_bound(hostile_server):
    servicer, channel = hostile_server
    client = _fetching_client(channel, give_up_after_s=0.5)
    reference = initial_state()
    before = {k: v.clone() for k, v in reference.items()}
    with pytest.raises(GlobalRefused) as refused:
        client._fetch_global(1, reference)
    assert refused.value.reason is Reason.MALFORMED_PAYLOAD and refused.value.version == 1
    assert servicer.fetches >= 3  # fetched again after each refusal, with backoff, until the bound
    assert all(torch.equal(reference[k], before[k]) for k in before)
