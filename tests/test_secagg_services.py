"""Secure aggregation against a real aggregator process (mTLS, real gRPC), driven by light nodes.

Light nodes (bench/light_client.py) hold real certificates of a provisioned federation and run the very
session code the node daemon runs (hospital_node/secure.py), with small adapters whose updates the test
knows. So the test can compute, in float64, the weighted average the aggregator must publish, and check
the published global (codec fp32) against it within the stated fixed-point bound. Nodes that drop out,
cheat or wait are subclasses of the session code. Checked here:

* the unmasked average equals the plain weighted average of the nodes' updates within the error bound
  the round log states, with every node in; with one node gone before its masked input (its pairwise
  masks are removed with its reconstructed key) and one gone after it (its input counts, its self mask
  is rebuilt from the others' shares);
* what the aggregator received from each node (the bytes its audit log hashes) is uniform: a chi-square
  test over byte values, and no correlation with the node's input;
* a dealer whose shares do not lie on one polynomial is named, excluded from the round, and the round
  completes without it in a new session; a node that returns a share its dealer did not sign is named;
* an aggregator killed with SIGKILL in the middle of the unmasking resumes with a new session: the round
  is redone from the keys, and nothing of the killed session is ever unmasked;
* registration is refused, with the reason, when a node and the federation disagree on the mode;
* malformed secure-aggregation messages are refused with their reason and the round completes.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bench.light_client import Federation, LightNode, perturbed, plain_average
from hospital_node.secure import SecureUploader, adapter_encoder
from shared.audit import PublicKey, verify_log
from shared.learning.aggregation import capped_weights
from shared.learning.rounds import WireConfig, decode_adapter
from shared.secagg import PRIME, NodeSession, SecAggError
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.reasons import Reason, reason_of
from tests.services_support import (
    ALL_NODES,
    HOSPITALS,
    ROUNDS,
    START_TIMEOUT,
    TRAINERS,
    Cluster,
    assert_matches_reference,
    finished,
    free_port,
    provision_pki,
    read_json,
    scrape_or_none,
    small_simulation,
    start_aggregator,
    start_aggregator_process,
    start_node,
    tls_of,
    total,
    wait_for,
)

DIM = 16
FED = Federation(embed_dim=DIM)
NODES = ["h1", "h2", "h3", "h4", "h5"]
COUNTS = {n: 100 * (i + 1) for i, n in enumerate(NODES)}  # weights 1:2:3:4:5 (capped at a share of 0.5)


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    return provision_pki(tmp_path_factory.mktemp("secagg-pki"), NODES)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def start(cluster: Cluster, kits: Path, out: Path, *flags: str, name: str = "aggregator", ports=None) -> dict:
    return start_aggregator_process(
        cluster,
        kits,
        out,
        "--secure-aggregation",
        "true",
        "--codec",
        "fp32",
        "--embed-dim",
        str(DIM),
        "--round-timeout-s",
        "30",
        "--quorum-timeout-s",
        "120",
        "--linger-s",
        "3",
        "--exit-when-done",
        "false",  # the test fetches the last global after the run; the cluster stops the aggregator
        *flags,
        name=name,
        ports=ports,
    )


def light(agg: dict, kits: Path, names: list[str]) -> dict[str, LightNode]:
    nodes = {n: LightNode(agg["address"], n, tls_of(kits, n), FED, num_train=COUNTS[n]) for n in names}
    for node in nodes.values():
        node.register(secure_aggregation=True)
    return nodes


class Vanished(Exception):
    """A light node that stops talking (a hospital whose process died)."""


class DropBeforeMasking(SecureUploader):
    def __init__(self, link, round_id, encode, upload):
        def gone(masked, session):
            raise Vanished("before its masked input")

        super().__init__(link, round_id, encode, gone)


class DropAfterMasking(SecureUploader):
    def unmask(self, ns, survivors):
        raise Vanished("after its masked input")


def update_of(node: str, r: int, reference: dict) -> dict[str, torch.Tensor]:
    return perturbed(reference, 0.02, seed=1000 * r + NODES.index(node))


def play(nodes: dict[str, LightNode], r: int, reference: dict, uploaders: dict | None = None) -> dict:
    """Every node takes part in round ``r`` at once (threads); what each one raised, by node."""
    errors: dict[str, BaseException] = {}

    def one(name: str, node: LightNode) -> None:
        encode = adapter_encoder(name, update_of(name, r, reference), reference, drop_masked_rows=True)
        try:
            node.secure_round(r, encode, (uploaders or {}).get(name, SecureUploader))
        except BaseException as exc:  # noqa: BLE001 (reported, and asserted on by the caller)
            errors[name] = exc

    threads = {name: threading.Thread(target=one, args=(name, node), daemon=True) for name, node in nodes.items()}
    for t in threads.values():
        t.start()
    end = time.monotonic() + 120
    for t in threads.values():
        t.join(timeout=max(0.0, end - time.monotonic()))
    running = [name for name, t in threads.items() if t.is_alive()]
    assert not running, f"{running} did not finish round {r + 1} in 120 s; the others raised {errors!r}"
    return errors


def roster_weights(entry: dict) -> dict[str, float]:
    """The weights of a session's roster as the plain rule sets them: capped sample counts (no share above 0.5)."""
    return capped_weights({n: COUNTS[n] for n in entry["roster"]}, max_samples=1_000_000, max_share=0.5)


def published(node: LightNode, version: int, reference: dict) -> dict[str, torch.Tensor]:
    header, data = node.fetch(version)
    return decode_adapter(data, header.sha256, reference, WireConfig(codec="fp32")).tensors


def assert_close_to_plain(got: dict, want: dict, bound: float) -> float:
    worst = max(float((got[k].double() - want[k]).abs().max()) for k in want)
    # the bound is the fixed point's; the result is then rounded once to float32 (values ~0.1: < 1e-8)
    assert worst <= bound + 1e-7, (worst, bound)
    return worst


def chi_square_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).astype(np.float64)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_255_P1E6 = 376.0  # the chi-square critical value for 255 degrees of freedom at p = 1e-6 (scipy.stats.chi2.isf)


def report_round(out: Path, r: int) -> dict:
    report = read_json(out / "report.json")
    return next(x for x in report["rounds_log"] if x["round"] == r + 1)


def audit_entries(kits: Path, out: Path) -> list[dict]:
    verdict = verify_log((out / "audit.log").read_bytes(), PublicKey.from_file(kits / "aggregator" / "audit.pub"))
    assert verdict.ok, verdict
    return [e.value for e in verdict.entries]


def test_secure_rounds_sum_exactly_with_dropouts_and_look_uniform(cluster, kits, tmp_path):
    out = tmp_path / "agg"
    agg = start(cluster, kits, out, "--rounds", "2", "--min-nodes", "3", "--secagg-phase-timeout-s", "4")
    refused = LightNode(agg["address"], "h1", tls_of(kits, "h1"), FED, num_train=COUNTS["h1"])
    with pytest.raises(grpc.RpcError) as err:  # a node that does not run secure aggregation is refused, and told why
        refused.register()
    assert reason_of(err.value) is Reason.REGISTRATION_MISMATCH and "secure aggregation" in err.value.details()
    nodes = light(agg, kits, NODES)
    state = nodes["h1"].stub.SecAggPoll(pb.SecAggPollRequest(run_id=nodes["h1"].run_id, node_id="h1"), timeout=10).state
    now_ms = time.time() * 1000
    assert state.phase == pb.SEC_AGG_PHASE_KEYS and state.session and not state.roster  # nothing asked, nothing sent
    assert now_ms < state.deadline_unix_ms <= now_ms + 30_000 + 1_000  # the keys phase ends with the round's deadline

    # round 1: everyone in
    g0 = FED.initial_state()
    assert play(nodes, 0, g0) == {}
    entry = report_round(out, 0)["secure_aggregation"]
    assert entry["survivors"] == NODES and entry["threshold"] == 3 and entry["aborted"] == []
    g1 = published(nodes["h1"], 1, g0)
    worst = assert_close_to_plain(
        g1, plain_average({n: update_of(n, 0, g0) for n in NODES}, g0, roster_weights(entry)), entry["error_bound"]
    )
    print(f"round 1: largest error against the plain average {worst:.3g}, bound {entry['error_bound']:.3g}")
    for name, node in nodes.items():  # what the aggregator received is uniform bytes, unrelated to the input
        stat = chi_square_bytes(node.last_masked)
        assert stat < CHI2_255_P1E6, (name, stat)
        masked = np.frombuffer(node.last_masked, dtype="<u4").astype(np.float64)
        plain = update_of(name, 0, g0)["fc1.weight"].flatten().double().numpy()
        assert abs(np.corrcoef(masked[: plain.size], plain)[0, 1]) < 0.2
    received = {
        e["data"]["sha256"]
        for e in audit_entries(kits, out)
        if e["event"] == "update_accepted" and e["data"]["round_id"] == 0
    }
    assert received == {hashlib.sha256(n.last_masked).hexdigest() for n in nodes.values()}

    # round 2: h4 goes before sending its masked input, h5 after it
    errors = play(nodes, 1, g1, {"h4": DropBeforeMasking, "h5": DropAfterMasking})
    assert set(errors) == {"h4", "h5"} and all(isinstance(e, Vanished) for e in errors.values()), errors
    entry = report_round(out, 1)["secure_aggregation"]
    assert entry["members"] == NODES  # all five dealt their shares
    assert entry["survivors"] == ["h1", "h2", "h3", "h5"]  # h5's input is in; h4's is not
    assert entry["answered"] == ["h1", "h2", "h3"]
    g2 = published(nodes["h1"], 2, g1)
    survivors = {n: update_of(n, 1, g1) for n in ("h1", "h2", "h3", "h5")}
    worst = assert_close_to_plain(g2, plain_average(survivors, g1, roster_weights(entry)), entry["error_bound"])
    print(f"round 2 (h4 dropped before masking, h5 after): largest error {worst:.3g}")
    assert nodes["h1"].round().phase == pb.ROUND_PHASE_FINISHED
    for node in nodes.values():
        node.close()
    refused.close()


class CheatingDealer(NodeSession):
    """Deals h1 a share of its secrets that is off by one, signed as its own: the inconsistency is the dealer's."""

    def _split(self, secret, xs, t):
        shares = super()._split(secret, xs, t)
        first = min(shares)
        shares[first] = (shares[first] + 1) % PRIME
        return shares


class Cheater(SecureUploader):
    def new_session(self, session):
        if getattr(self, "cheated", False):
            return super().new_session(session)
        self.cheated = True
        return CheatingDealer(self.node, session, self.signer, self.link.tls.cert, self.link.tls.ca)


class Forger(SecureUploader):
    """Returns one share with its value changed: its dealer's signature no longer holds."""

    def unmask(self, ns, survivors):
        shares = super().unmask(ns, survivors)
        if getattr(self, "forged", False):
            return shares
        self.forged = True
        first = shares[0]
        return [type(first)(first.dealer, first.kind, first.x, first.y ^ 1, first.signature), *shares[1:]]


class Hostile(SecureUploader):
    """Sends a malformed message of each kind before the real one; each must be refused with its reason."""

    refusals: list[Reason] = []

    def _send(self, what, rpc, request):
        bad = type(request)()
        bad.CopyFrom(request)
        if what == "SecAggAdvertise":
            bad.c_public = bad.c_public[:31]
            self._expect(rpc, bad)
            bad.CopyFrom(request)
            bad.signature = bytes(len(bad.signature))
            self._expect(rpc, bad)
            bad.CopyFrom(request)
            bad.session = "0" * 16
            self._expect(rpc, bad)
        elif what == "SecAggShare":
            del bad.ciphertexts[sorted(bad.ciphertexts)[0]]
            self._expect(rpc, bad)
        elif what == "SecAggUnmask":
            bad.shares[0].y = b"\x01"
            self._expect(rpc, bad)
        return super()._send(what, rpc, request)

    def _expect(self, rpc, request):
        with pytest.raises(grpc.RpcError) as err:
            rpc(request, timeout=10)
        self.refusals.append(reason_of(err.value))


def test_cheating_dealer_and_forged_share_are_named_and_rounds_complete(cluster, kits, tmp_path):
    out = tmp_path / "agg"
    names = ["h1", "h2", "h3", "h4"]
    agg = start(cluster, kits, out, "--rounds", "2", "--min-nodes", "3", "--secagg-phase-timeout-s", "5")
    nodes = light(agg, kits, names)
    g0 = FED.initial_state()
    # round 1: h4 deals bad shares and h2 is hostile (every malformed message first)
    assert play(nodes, 0, g0, {"h4": Cheater, "h2": Hostile}) == {}
    entry = report_round(out, 0)["secure_aggregation"]
    # each of h2's malformed messages was refused with its reason, in both sessions of the round
    one_session = [Reason.SECAGG, Reason.SECAGG, Reason.SECAGG_PHASE, Reason.SECAGG, Reason.SECAGG]
    assert Hostile.refusals == one_session * entry["sessions"], Hostile.refusals
    assert list(entry["excluded"]) == ["h4"] and "dealt b shares" in entry["excluded"]["h4"]
    assert entry["survivors"] == ["h1", "h2", "h3"] and entry["sessions"] == 2
    g1 = published(nodes["h1"], 1, g0)
    assert_close_to_plain(
        g1,
        plain_average({n: update_of(n, 0, g0) for n in ("h1", "h2", "h3")}, g0, roster_weights(entry)),
        entry["error_bound"],
    )
    # round 2: h4 is back (exclusion lasts one round); h3 forges a share it returns
    assert play(nodes, 1, g1, {"h3": Forger}) == {}
    entry = report_round(out, 1)["secure_aggregation"]
    assert list(entry["excluded"]) == ["h3"] and "did not sign" in entry["excluded"]["h3"]
    g2 = published(nodes["h1"], 2, g1)
    assert_close_to_plain(
        g2,
        plain_average({n: update_of(n, 1, g1) for n in ("h1", "h2", "h4")}, g1, roster_weights(entry)),
        entry["error_bound"],
    )
    events = [(e["event"], e["data"].get("node")) for e in audit_entries(kits, out)]
    assert ("secagg_node_excluded", "h4") in events and ("secagg_node_excluded", "h3") in events
    for node in nodes.values():
        node.close()


class Stalling(SecureUploader):
    """Waits, before answering the unmasking, until the test lets it go (the aggregator is killed meanwhile)."""

    reached = threading.Event()
    release = threading.Event()

    def unmask(self, ns, survivors):
        if not Stalling.release.is_set():
            Stalling.reached.set()
            Stalling.release.wait(60)
        return super().unmask(ns, survivors)


def test_aggregator_killed_mid_unmasking_redoes_the_round(cluster, kits, tmp_path):
    out = tmp_path / "agg"
    names = ["h1", "h2", "h3"]
    flags = ("--rounds", "2", "--min-nodes", "3", "--secagg-phase-timeout-s", "60")
    agg = start(cluster, kits, out, *flags)
    nodes = light(agg, kits, names)
    g0 = FED.initial_state()
    assert play(nodes, 0, g0) == {}  # round 1 closes: the checkpoint the restart resumes from
    g1 = published(nodes["h1"], 1, g0)
    result: dict = {}

    def play_round_2() -> None:
        try:
            result["errors"] = play(nodes, 1, g1, {"h3": Stalling})
        except BaseException as exc:  # noqa: BLE001 (asserted on below, with its message)
            result["raised"] = exc

    player = threading.Thread(target=play_round_2, daemon=True)
    player.start()
    assert Stalling.reached.wait(60), "h3 never reached the unmasking"
    # every masked input of round 2 is in (the unmasking phase has begun), h1 and h2 may have answered it
    killed = {
        e["data"]["secagg_session"]
        for e in audit_entries(kits, out)
        if e["event"] == "update_accepted" and e["data"]["round_id"] == 1
    }
    agg["proc"].signal(signal.SIGKILL)
    agg["proc"].wait(10)
    start(
        cluster,
        kits,
        out,
        *flags,
        name="aggregator-restarted",
        ports={k: agg[k] for k in ("grpc", "health", "metrics")},
    )
    Stalling.release.set()
    player.join(180)
    assert not player.is_alive() and result == {"errors": {}}, result
    assert nodes["h1"].round().phase == pb.ROUND_PHASE_FINISHED
    entry = report_round(out, 1)["secure_aggregation"]
    assert len(killed) == 1 and entry["session"] not in killed  # the round was redone in a new session
    closed = [
        e["data"] for e in audit_entries(kits, out) if e["event"] == "round_closed" and e["data"]["round_id"] == 1
    ]
    assert len(closed) == 1 and len(closed[0]["updates"]) == 3
    # only the new session's inputs are in the sum: nothing of the killed one was unmasked
    assert all(u["update_id"].endswith(entry["session"]) for u in closed[0]["updates"])
    g2 = published(nodes["h1"], 2, g1)
    assert_close_to_plain(
        g2, plain_average({n: update_of(n, 1, g1) for n in names}, g1, roster_weights(entry)), entry["error_bound"]
    )
    print(json.dumps({"killed session": sorted(killed), "redone in": entry["session"]}))
    for node in nodes.values():
        node.close()


def test_plain_federation_refuses_a_secure_node(cluster, kits, tmp_path):
    agg = start_aggregator_process(cluster, kits, tmp_path / "plain", "--embed-dim", str(DIM), "--rounds", "1")
    node = LightNode(agg["address"], "h1", tls_of(kits, "h1"), FED)
    with pytest.raises(grpc.RpcError) as err:
        node.register(secure_aggregation=True)
    assert reason_of(err.value) is Reason.REGISTRATION_MISMATCH and "without secure aggregation" in err.value.details()
    node.close()


def test_secure_aggregation_configuration_is_refused_where_it_cannot_hold():
    from aggregator.config import AggregatorConfig

    with pytest.raises(ValueError, match="median rule needs to see"):
        AggregatorConfig(secure_aggregation=True, aggregation="median", tls_ca="ca.pem")
    with pytest.raises(ValueError, match="needs mTLS"):
        AggregatorConfig(secure_aggregation=True, insecure=True)
    with pytest.raises(SecAggError):
        from shared.secagg import ring_scale

        ring_scale(0.0, 3)


def test_a_federation_of_node_daemons_under_secure_aggregation_equals_the_secure_simulation(
    tmp_path, pki, partition_dir, feature_cache, brain_tumor_root
):
    """The real thing: the aggregator and the small federation's node daemons (3 trainers and the held-out
    evaluator, real images, mTLS) with secure aggregation on. Its report equals the in-process simulation's
    with secure aggregation and the same seed, round by round: the unmasked sums are exact integers, so the
    two compute the same globals. Every upload the aggregator accepted was a masked input, its audit log
    verifies, and every node's receipts match it."""
    reference = small_simulation(brain_tumor_root, feature_cache, secure_aggregation=True)
    cluster = Cluster(tmp_path)
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    out = tmp_path / "agg"
    try:
        start_aggregator(
            cluster, pki, "aggregator", out, ports["grpc"], ports["health"], ports["metrics"], False, HOSPITALS,
            "--secure-aggregation", "true",
        )  # fmt: skip
        for node in ["global", *TRAINERS]:  # the evaluator first: it must evaluate every version, round 1's too
            start_node(
                cluster, pki, partition_dir, node, ports["grpc"], free_port(), tmp_path / "state", feature_cache,
                "--secure-aggregation", "true",
            )  # fmt: skip
            if node == "global":
                wait_for(
                    lambda: total(
                        scrape_or_none(ports["metrics"]) or {}, "fedmedclip_nodes_registered", role="evaluator"
                    ),
                    START_TIMEOUT,
                    "the evaluator to register",
                    cluster.procs,
                )
        report = wait_for(lambda: finished(out / "report.json", ALL_NODES), START_TIMEOUT, "the run", cluster.procs)
        assert_matches_reference(report, reference)
        for r in report["rounds_log"]:
            entry = r["secure_aggregation"]
            assert entry["survivors"] == entry["answered"] == TRAINERS and entry["threshold"] == 2
        assert "Secure aggregation: the aggregator saw masked inputs only" in (out / "report.md").read_text()
        entries = audit_entries(pki, out)
        accepted = [e["data"] for e in entries if e["event"] == "update_accepted"]
        assert len(accepted) == ROUNDS * HOSPITALS and all(a["secagg_session"] for a in accepted)
        for node in TRAINERS:
            assert f"round {ROUNDS}: secure aggregation: session" in (tmp_path / f"{node}.log").read_text()
            receipts = sorted((tmp_path / "state" / node / "receipts").rglob("*.json"))
            assert len(receipts) == ROUNDS
    finally:
        cluster.close()
