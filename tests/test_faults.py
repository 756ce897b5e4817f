"""Faults with real processes (mTLS, real gRPC, real hospital nodes on the brain tumor subset).

Aggregator faults (one run, three faults in a row): the nodes start while the aggregator is down and
wait; the aggregator is SIGKILLed in the middle of a round (one node is SIGSTOPped so that the round
cannot close: the kill lands with updates accepted and the round still open); the restarted
aggregator is made to die while it writes the checkpoint of that same round
(``FEDMEDCLIP_FAULT=die_during_checkpoint:V``); a third start finishes the run. The result must equal
the in-process simulation's exactly as the undisturbed federation does: no accepted update lost or
counted twice, the right number of rounds.

Node faults (another run, quorum 2 of 3, 5 s deadline): a node SIGKILLed mid-run leaves a round
that closes at its deadline with the other two; restarted, it resumes from its saved state and takes
part again; a node SIGSTOPped (silent, connection open) does not hang the round, which closes at its
deadline; resumed (SIGCONT), it takes part again; the run ends with every round done.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from aggregator.checkpoint import FAULT_ENV, FAULT_EXIT_CODE, CheckpointStore
from hospital_node.state import StateStore
from tests.services_support import (
    ROUNDS,
    START_TIMEOUT,
    TRAINERS,
    Cluster,
    assert_matches_reference,
    free_port,
    read_json,
    scrape_or_none,
    start_aggregator,
    start_node,
    total,
    trainers_only,
    updates_accepted,
    wait_for,
)


def _stuck_round(metrics_port: int, updates: int) -> int | None:
    """The open round (1-based) when it holds exactly ``updates`` updates and stays so for a second.

    From the aggregator's /metrics: ``fedmedclip_round_current`` is the number of closed rounds and
    every closed round holds one update per trainer (quorum = every trainer, a 120 s deadline).
    """

    def latest() -> tuple[int, int] | None:
        samples = scrape_or_none(metrics_port)
        if samples is None:
            return None
        closed = int(total(samples, "fedmedclip_round_current"))
        return closed + 1, int(total(samples, "fedmedclip_updates_accepted_total")) - len(TRAINERS) * closed

    now = latest()
    if now is None or now[1] != updates:
        return None
    time.sleep(1.0)
    return now[0] if latest() == now else None


def test_aggregator_down_at_start_killed_mid_round_and_dying_in_its_checkpoint_loses_no_update(
    tmp_path, pki, partition_dir, reference, feature_cache
):
    cluster = Cluster(tmp_path)
    agg_out = tmp_path / "agg"
    port, health, metrics = free_port(), free_port(), free_port()
    node_metrics = {node: free_port() for node in TRAINERS}
    endpoints = agg_out / "endpoints.json"
    try:
        for node in TRAINERS:  # (c) the aggregator is not there yet
            start_node(
                cluster,
                pki,
                partition_dir,
                node,
                port,
                node_metrics[node],
                tmp_path / "state",
                feature_cache,
                "--long-poll-s",
                "3",
            )
        nodes = {p.name: p for p in cluster.procs}
        # a synchronisation, not a check: no metric counts a node's failed calls, so its log says when it retries
        wait_for(
            lambda: all("Register failed" in p.text() and "retrying in" in p.text() for p in nodes.values()),
            START_TIMEOUT,
            "every node to retry against the absent aggregator",
            cluster.procs,
        )
        first = start_aggregator(cluster, pki, "aggregator", agg_out, port, health, metrics, True)
        victim = nodes["hospital_3"]
        wait_for(
            lambda: updates_accepted(node_metrics["hospital_3"]) >= 1,
            START_TIMEOUT,
            "hospital_3 in round 1",
            cluster.procs,
        )
        run_id = read_json(endpoints)["run_id"]
        victim.signal(signal.SIGSTOP)  # the open round cannot close while hospital_3 is stopped
        stuck = wait_for(
            lambda: _stuck_round(metrics, len(TRAINERS) - 1), 60, "a round with 2 of 3 updates", cluster.procs
        )
        first.popen.kill()  # (b) kill -9 mid-round: two updates accepted, round `stuck` open
        first.wait(timeout=30)
        completed = CheckpointStore(agg_out).load().version
        assert completed == stuck - 1
        # (b) again: the restarted aggregator dies while writing the checkpoint of that same round
        second = cluster.add("aggregator_faulty", first.args, env={FAULT_ENV: f"die_during_checkpoint:{stuck}"})
        victim.signal(signal.SIGCONT)
        assert second.wait(timeout=START_TIMEOUT) == FAULT_EXIT_CODE, second.text()[-3000:]
        restored = read_json(endpoints)  # written by the second aggregator once it served
        assert restored["pid"] == second.popen.pid and restored["run_id"] == run_id  # the same run, restored
        assert CheckpointStore(agg_out).load().version == completed  # the torn write left the last complete one
        torn = agg_out / "checkpoint" / ".state.npz.fault.tmp"
        assert torn.exists()
        third = cluster.add("aggregator_restarted", first.args)
        codes = {p.name: p.wait(timeout=START_TIMEOUT) for p in (*nodes.values(), third)}
        report = read_json(agg_out / "report.json")
        logs = {p.name: p.text() for p in cluster.procs}
        final = CheckpointStore(agg_out).load()
    finally:
        cluster.close()
    assert codes == {**{n: 0 for n in TRAINERS}, "aggregator_restarted": 0}, "\n".join(
        f"--- {k}\n{v[-1500:]}" for k, v in logs.items()
    )
    assert report["run_id"] == run_id  # the third start restored the same run once more
    assert not torn.exists()  # the third start removed the torn temporary file of the checkpoint
    # every round once, with all three updates, and the exact result of the undisturbed simulation
    assert final.version == ROUNDS and [r["round"] for r in report["rounds_log"]] == list(range(1, ROUNDS + 1))
    assert all(r["nodes"] == TRAINERS for r in report["rounds_log"])
    assert all(sorted(by_node) == TRAINERS for by_node in final.accepted.values()) and len(final.accepted) == ROUNDS
    assert_matches_reference(report, trainers_only(reference, report))
    print(
        f"\naggregator faults: nodes waited for the absent aggregator; SIGKILL in round {stuck} with "
        f"{len(TRAINERS) - 1} updates accepted -> restarted from version {completed}; died writing checkpoint "
        f"{stuck} (exit {FAULT_EXIT_CODE}) -> restarted from version {completed}; finished {final.version} rounds, "
        f"{len(TRAINERS)} updates each, equal to the in-process simulation"
    )


NODE_FAULT_ROUNDS = 20
DEADLINE_S = 5.0


def _rounds(agg_out: Path) -> list[dict]:
    return (read_json(agg_out / "report.json") or {}).get("rounds_log", [])


def _round_without(agg_out: Path, missing: str, after: int) -> dict | None:
    return next((r for r in _rounds(agg_out)[after:] if missing not in r["nodes"]), None)


def _round_with(agg_out: Path, node: str, after: int) -> dict | None:
    return next((r for r in _rounds(agg_out)[after:] if node in r["nodes"]), None)


def test_killed_and_silent_nodes_do_not_hang_rounds_and_take_part_again(tmp_path, pki, partition_dir, feature_cache):
    cluster = Cluster(tmp_path)
    agg_out = tmp_path / "agg"
    port, metrics, h3_metrics = free_port(), free_port(), free_port()
    try:
        start_aggregator(
            cluster,
            pki,
            "aggregator",
            agg_out,
            port,
            free_port(),
            metrics,
            True,
            2,
            "--rounds",
            str(NODE_FAULT_ROUNDS),
            "--round-timeout-s",
            str(DEADLINE_S),
            "--quorum-timeout-s",
            "120",
        )
        # hospital_3 registers first: rounds open at the quorum of 2 and close as soon as every
        # registered trainer reported, so a late starter on a loaded machine could miss many rounds
        for node in ["hospital_3", "hospital_1", "hospital_2"]:
            start_node(
                cluster,
                pki,
                partition_dir,
                node,
                port,
                h3_metrics if node == "hospital_3" else 0,
                tmp_path / "state",
                feature_cache,
                "--long-poll-s",
                "3",
            )
            if node == "hospital_3":
                wait_for(
                    lambda: total(scrape_or_none(metrics) or {}, "fedmedclip_nodes_registered", role="trainer") >= 1,
                    START_TIMEOUT,
                    "hospital_3 to register",
                    cluster.procs,
                )
        aggregator, h3, h1, h2 = cluster.procs
        # (a) kill -9 of hospital_3 right after its first accepted update
        wait_for(
            lambda: updates_accepted(h3_metrics) >= 1,
            START_TIMEOUT,
            "hospital_3's first accepted update",
            cluster.procs,
        )
        h3.popen.kill()
        h3.wait(timeout=30)
        killed_at = len(_rounds(agg_out))
        closed = wait_for(
            lambda: _round_without(agg_out, "hospital_3", killed_at),
            60,
            "a round to close at its deadline without hospital_3",
            cluster.procs,
        )
        h3_again = cluster.add("hospital_3_restarted", h3.args)
        back = wait_for(
            lambda: _round_with(agg_out, "hospital_3", closed["round"]),
            START_TIMEOUT,
            "the restarted hospital_3 to take part again",
            cluster.procs,
        )
        # (d) hospital_2 goes silent without closing anything
        h2.signal(signal.SIGSTOP)
        stopped_at = len(_rounds(agg_out))
        silent = wait_for(
            lambda: _round_without(agg_out, "hospital_2", stopped_at),
            60,
            "a round to close at its deadline without the stopped hospital_2",
            cluster.procs,
        )
        h2.signal(signal.SIGCONT)
        again = wait_for(
            lambda: _round_with(agg_out, "hospital_2", silent["round"]),
            120,
            "hospital_2 to take part again after SIGCONT",
            cluster.procs,
        )
        codes = {p.name: p.wait(timeout=START_TIMEOUT) for p in (h1, h2, h3_again, aggregator)}
        report = read_json(agg_out / "report.json")
        logs = {p.name: p.text() for p in cluster.procs}
    finally:
        for proc in cluster.procs:
            proc.signal(signal.SIGCONT)  # never leave a stopped process behind
        cluster.close()
    assert codes == {"hospital_1": 0, "hospital_2": 0, "hospital_3_restarted": 0, "aggregator": 0}, "\n".join(
        f"--- {k}\n{v[-1500:]}" for k, v in logs.items()
    )
    assert report["phase"] == "finished" and len(report["rounds_log"]) == NODE_FAULT_ROUNDS
    assert closed["nodes"] == ["hospital_1", "hospital_2"] and silent["nodes"] == ["hospital_1", "hospital_3"]
    for r in (closed, silent):  # closed by its deadline with the quorum (not before: every trainer is registered)
        assert r["seconds"] >= DEADLINE_S - 1e-3, r
    # the restarted hospital_3 kept its saved state (a state of another run would have been archived)
    h3_state = tmp_path / "state" / "hospital_3"
    assert StateStore(h3_state).load().run_id == report["run_id"] and not (h3_state / "archive").exists()
    assert back["round"] > closed["round"]
    assert again["round"] > silent["round"]
    assert report["rounds_log"][-1]["nodes"] == TRAINERS  # everyone is back at the end
    print(
        f"\nnode faults: hospital_3 SIGKILLed -> round {closed['round']} closed at its deadline "
        f"({closed['seconds']:.2f}s) with {closed['nodes']}; restarted, back in round {back['round']}; hospital_2 "
        f"SIGSTOPped -> round {silent['round']} closed at its deadline ({silent['seconds']:.2f}s) with "
        f"{silent['nodes']}; SIGCONT, back in round {again['round']}; {len(report['rounds_log'])} rounds done"
    )
