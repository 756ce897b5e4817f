"""A node daemon's life across runs, with real processes (mTLS, real gRPC, the brain tumor subset).

Run 1 (2 rounds): three hospitals, each sharing a different amount of its evaluations
(``share_metrics`` all / val_accuracy / none). The aggregator selects its best round from what it
gets, every byte of every RPC is in its report, the node keeping its metrics still has them all
locally. When the run ends the aggregator exits; the nodes stay up, say so on ``/healthz`` and
archive the run's state.

Run 2: a new aggregator on the same address; the nodes of run 1 join it without a restart (hospital_3
is held stopped, so the run waits for it). A second process of hospital_1 (another state folder, the
same certificate) then registers: it takes the session over, the first process is refused (exit 3, its
message names the takeover), the aggregator warns and counts it; hospital_3 goes on, run 2 finishes.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

from hospital_node.state import StateStore
from tests.services_support import (
    START_TIMEOUT,
    TRAINERS,
    Cluster,
    free_port,
    read_json,
    scrape_or_none,
    start_aggregator,
    start_node,
    total,
    wait_for,
)

RUN_ROUNDS = 2
SHARE = {"hospital_1": "all", "hospital_2": "val_accuracy", "hospital_3": "none"}


def _done(report_path: Path) -> dict | None:
    """The report once the run finished and every trainer's final evaluation is in (whatever it shared)."""
    report = read_json(report_path)
    if not report or report.get("phase") != "finished" or not report.get("history"):
        return None
    final = report["history"][-1]
    return report if final["round"] == RUN_ROUNDS and final["complete"] else None


def _health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return json.loads(response.read()) if response.status == 200 else None
    except OSError:
        return None


def _reports(run_dir: Path) -> dict[tuple[int, str], dict]:
    lines = (run_dir / "checkpoint" / "reports.jsonl").read_text().splitlines()
    return {(r["version"], r["node"]): r["entry"] for r in map(json.loads, lines)}


def test_a_node_outlives_its_run_joins_the_next_and_one_process_holds_an_identity(
    pki, partition_dir, feature_cache, tmp_path
):
    cluster = Cluster(tmp_path)
    port = free_port()
    state = tmp_path / "state"
    metrics = {n: free_port() for n in TRAINERS}
    rounds = ("--rounds", str(RUN_ROUNDS), "--linger-s", "30")
    try:
        # ---------------------------------------------------------------- run 1
        run1 = tmp_path / "run1"
        agg1 = start_aggregator(cluster, pki, "aggregator-1", run1, port, free_port(), free_port(), True, 3, *rounds)
        nodes = {
            n: start_node(
                cluster,
                pki,
                partition_dir,
                n,
                port,
                metrics[n],
                state,
                feature_cache,
                "--once",
                "false",
                "--share-metrics",
                SHARE[n],
            )
            for n in TRAINERS
        }
        report1 = wait_for(lambda: _done(run1 / "report.json"), START_TIMEOUT, "run 1 to finish", cluster.procs)
        assert agg1.wait(timeout=90) == 0  # the run is over, the aggregator is gone
        for n in TRAINERS:  # ... and every node is still up, waiting for the federation's next run
            health = wait_for(
                lambda n=n: (_health(metrics[n]) or {}).get("phase") == "waiting_for_next_run" and _health(metrics[n]),
                60,
                f"{n} to wait for the next run",
                cluster.procs,
            )
            assert nodes[n].alive() and health["status"] == "ok" and health["run_id"] == report1["run_id"]
            archived = state / n / "archive" / report1["run_id"] / "state.pt"
            assert archived.is_file() and not (state / n / "state.pt").exists()  # archived, not overwritten
            store = StateStore(state / n)
            assert store.latest() == archived and store.load(archived).global_version == RUN_ROUNDS  # for predict

        # what each node shared, and the selection made from it
        kept = _reports(run1)
        for v in range(1, RUN_ROUNDS + 1):
            full, acc_only, nothing = (kept[(v, n)] for n in TRAINERS)
            assert full["val"]["macro_f1"] is not None and full["test"]["accuracy"] is not None
            assert acc_only["val"]["accuracy"] is not None and acc_only["test"] is None
            assert {k for k, x in acc_only["val"].items() if x is not None} == {"n", "accuracy"}
            assert nothing["val"] is None and nothing["test"] is None
        assert report1["best_round"] in range(1, RUN_ROUNDS + 1)
        assert set(report1["test"]) == {"hospital_1"}  # test metrics only from the node that shares them
        local = [json.loads(x) for x in (state / "hospital_3" / "evaluations.jsonl").read_text().splitlines()]
        assert [e["version"] for e in local] == list(range(1, RUN_ROUNDS + 1))
        assert all(e["shared"] == "none" and e["val"]["macro_f1"] is not None for e in local)  # kept in full

        # every RPC's bytes, per round, beside the adapters'
        for row in report1["rounds_log"]:
            traffic = row["traffic"]
            assert traffic["up"] > row["bytes_up"] and traffic["down"] > 0
            assert traffic["by_rpc"]["UploadUpdate"]["up"] > row["bytes_up"]
            assert row["round"] == 1 or traffic["by_rpc"]["ReportMetrics"]["up"] > 0  # evaluations of the last
        assert "Register" in report1["rounds_log"][0]["traffic"]["by_rpc"]
        assert report1["traffic_since_last_round"]["by_rpc"]["ReportMetrics"]["up"] > 0  # ... and the final ones
        assert "sent" in nodes["hospital_2"].text() and "received" in nodes["hospital_2"].text()

        # ---------------------------------------------------------------- run 2
        run2 = tmp_path / "run2"
        agg2_metrics = free_port()
        nodes["hospital_3"].signal(signal.SIGSTOP)  # run 2 cannot open its first round without it
        try:
            agg2 = start_aggregator(
                cluster, pki, "aggregator-2", run2, port, free_port(), agg2_metrics, False, 3, *rounds
            )
            run2_id = wait_for(
                lambda: (read_json(run2 / "endpoints.json") or {}).get("run_id"), 120, "run 2", cluster.procs
            )
            wait_for(
                lambda: (_health(metrics["hospital_1"]) or {}).get("run_id") == run2_id,
                60,
                "hospital_1 to join run 2 by itself",
                cluster.procs,
            )
            # a second process with hospital_1's certificate (another state folder): it takes the session over
            second = start_node(
                cluster,
                pki,
                partition_dir,
                "hospital_1",
                port,
                free_port(),
                tmp_path / "second",
                feature_cache,
                identity="hospital_1",
                name="hospital_1-second",
            )
            first = nodes["hospital_1"]
            wait_for(lambda: not first.alive(), START_TIMEOUT, "the first hospital_1 to be refused", cluster.procs)
            assert first.popen.returncode == 3, first.text()[-2000:]
            assert "another process registered as hospital_1" in first.text()
            assert "registered from a second process" in agg2.text()
            samples = scrape_or_none(agg2_metrics) or {}
            assert total(samples, "fedmedclip_session_takeovers_total", node="hospital_1") == 1
        finally:
            nodes["hospital_3"].signal(signal.SIGCONT)
        report2 = wait_for(lambda: _done(run2 / "report.json"), START_TIMEOUT, "run 2 to finish", cluster.procs)
        assert report2["run_id"] == run2_id != report1["run_id"]
        assert second.wait(timeout=60) == 0  # the process that took over finished run 2 (once: it then exits)
        for n in ("hospital_2", "hospital_3"):  # the same processes as in run 1
            assert nodes[n].alive() and f"run {report2['run_id']}" in nodes[n].text()
            assert "the aggregator serves a new run: joining it" in nodes[n].text()
        for n in ("hospital_2", "hospital_3"):
            nodes[n].signal(signal.SIGTERM)
            assert nodes[n].wait(timeout=60) == 0
    finally:
        cluster.close()


def test_a_run_continued_after_it_ended_gets_its_archived_state_back(tmp_path):
    import torch

    from hospital_node.state import NodeState, Snapshot

    store = StateStore(tmp_path)
    state = NodeState("run1", "h1", "fp", 3, {"w": torch.ones(2)}, best_version=2)
    store.save(state)
    store.save_snapshot(Snapshot("run1", 2, {"w": torch.zeros(2)}, None))
    archived = store.archive("run1", "the run is over")
    assert archived == tmp_path / "archive" / "run1" / "state.pt" and not store.path.exists()
    assert store.latest() == archived and StateStore.load_snapshot(archived, 2).version == 2
    assert not store.unarchive("run2")  # another run: nothing to take back
    assert store.unarchive("run1") and store.load().global_version == 3  # the aggregator continues run1
    assert StateStore.load_snapshot(store.path, 2) is not None and not archived.exists()
    store.save(state)
    store.archive("run1", "over again")
    store.save(state)
    assert store.archive("run1", "and again").name == "state.1.pt"  # never overwritten


def test_state_is_written_in_the_background_from_a_copy_taken_at_save_time(tmp_path):
    """The node goes on changing its tensors while a save waits its turn; the file holds them as they were."""
    import threading

    import torch

    from hospital_node.state import NodeState, PendingUpdate

    store = StateStore(tmp_path)
    state = NodeState("run1", "h1", "fp", 1, {"w": torch.ones(2)}, learner={"mlp": torch.zeros(3)}, trained_round=0)
    store.save(state, wait=True)
    gate = threading.Event()
    store.writer.submit(gate.wait)  # the background writer is busy (a slow disk)
    try:
        state.learner["mlp"] += 5  # round 1 trained
        state.trained_round = 1
        state.pending = PendingUpdate(1, "u1", b"\x01" * 1000, "sha1", "int8", 4000, {})
        store.save(state)  # returns at once
        state.learner["mlp"] += 5  # the node moves on (e.g. evaluates, trains the next round)
        on_disk = torch.load(store.path, weights_only=True)
        assert on_disk["trained_round"] == 0, "nothing of round 1 can be on disk while the writer is busy"
    finally:
        gate.set()
    store.flush()
    done = StateStore(tmp_path).load()
    assert done.trained_round == 1 and done.pending.update_id == "u1" and done.pending.payload == b"\x01" * 1000
    assert torch.equal(done.learner["mlp"], torch.full((3,), 5.0)), "the copy taken at save time"
    state.trained_round = 2
    store.save(state, wait=True)  # what a trainer does before uploading: on disk when it returns
    assert torch.load(store.path, weights_only=True)["trained_round"] == 2


def test_a_failed_background_save_is_raised_at_the_next_save(tmp_path):
    import pytest
    import torch

    from hospital_node.state import NodeState, StateError

    store = StateStore(tmp_path / "state")
    state = NodeState("run1", "h1", "fp", 1, {"w": torch.ones(2)})
    store.save(state, wait=True)
    store.path.unlink()
    store.path.mkdir()  # state.pt cannot be replaced by a file now
    store.save(state)
    with pytest.raises(StateError, match="background save"):
        store.flush()
