"""The services as real processes over real gRPC on loopback, against the in-process simulation.

One module-scoped federation (aggregator + 3 trainers + the held-out evaluator, on a small real
subset of the brain tumor set) serves several tests; a second federation is disrupted (a node is
SIGKILLed, the aggregator is restarted) and must still end where the simulation ends.

Tolerance: a trainer node is built exactly as the simulation builds its learner (same method,
TrainConfig, seed, hospital index, cached features, split) and every process runs torch with one
thread, like the reference here. Measured: accuracy, balanced accuracy and macro-F1 identical in
every round and client, bytes per round identical, ECE within 1e-5 (the prompt features are
computed in each process; their last float32 bits can differ). Asserted: accuracies within 1e-6,
ECE within 1e-4, the same best round, bytes per round within 0.1 %.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hospital_node.state import StateStore
from shared.ops.exitcodes import ExitCode
from shared.wire.reasons import Reason
from tests.services_support import (
    ALL_NODES,
    HOSPITALS,
    REPO_ROOT,
    ROUNDS,
    START_TIMEOUT,
    TRAINERS,
    Cluster,
    assert_matches_reference,
    finished,
    free_port,
    read_json,
    scrape,
    scrape_or_none,
    service_env,
    start_aggregator,
    start_node,
    total,
    trainers_only,
    updates_accepted,
    wait_for,
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, pki, partition_dir, reference, feature_cache):
    """Aggregator + 3 trainers + the held-out evaluator, run to the end, still serving /metrics."""
    root = tmp_path_factory.mktemp("federation")
    cluster = Cluster(root)
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    node_metrics = {n: free_port() for n in ALL_NODES}
    try:
        start_aggregator(
            cluster,
            pki,
            "aggregator",
            root / "agg",
            ports["grpc"],
            ports["health"],
            ports["metrics"],
            exit_when_done=False,
        )
        for node in ALL_NODES:
            start_node(
                cluster,
                pki,
                partition_dir,
                node,
                ports["grpc"],
                node_metrics[node],
                root / "state",
                feature_cache,
                "--once",
                "false",  # a daemon: it stays up after the run, /metrics with it
            )
        report = wait_for(
            lambda: finished(root / "agg" / "report.json", ALL_NODES),
            START_TIMEOUT,
            "the federation to finish",
            cluster.procs,
        )
        # a node counts the last global it fetched, and its last upload before it, once its round gauge
        # shows the final version: from then on its counters are final
        wait_for(
            lambda: all(
                total(scrape_or_none(p) or {}, "fedmedclip_round_current") == ROUNDS for p in node_metrics.values()
            ),
            30,
            "every node to fetch the final global",
            cluster.procs,
        )
        yield {
            "root": root,
            "cluster": cluster,
            "ports": ports,
            "node_metrics": node_metrics,
            "report": report,
            "pki": pki,
        }
    finally:
        cluster.close()


def test_grpc_federation_matches_in_process_simulation(federation, reference):
    report = federation["report"]
    assert report["trainers"] == TRAINERS and report["evaluators"] == ["global"]
    assert set(report["test"]) == set(ALL_NODES)
    assert_matches_reference(report, reference)
    md = (federation["root"] / "agg" / "report.md").read_text()
    assert "| global |" in md and "| AVG |" in md


def test_metrics_endpoints_expose_named_series_and_byte_counters_match_the_wire(federation):
    agg = scrape(federation["ports"]["metrics"])
    nodes = {n: scrape(p) for n, p in federation["node_metrics"].items()}
    families = dict(agg["__families__"])
    for name, kind in {
        "fedmedclip_round_duration_seconds": "histogram",
        "fedmedclip_aggregate_duration_seconds": "histogram",
        "fedmedclip_codec_duration_seconds": "histogram",
        "fedmedclip_update_bytes": "counter",
        "fedmedclip_update_raw_bytes": "counter",
        "fedmedclip_updates_accepted": "counter",
        "fedmedclip_updates_rejected": "counter",
        "fedmedclip_round_current": "gauge",
        "fedmedclip_nodes_connected": "gauge",
        "fedmedclip_validation_accuracy_ratio": "gauge",
        "fedmedclip_build_info": "gauge",
        "fedmedclip_grpc_server_handled": "counter",
        "fedmedclip_grpc_server_handling_seconds": "histogram",
    }.items():
        assert families.get(name) == kind, name
    assert total(agg, "fedmedclip_round_duration_seconds_count") == ROUNDS
    assert total(agg, "fedmedclip_round_current") == ROUNDS
    assert total(agg, "fedmedclip_nodes_connected") == len(ALL_NODES)
    assert total(agg, "fedmedclip_updates_accepted_total") == ROUNDS * HOSPITALS
    assert {lab["node"] for lab, _ in agg["fedmedclip_validation_accuracy_ratio"]} == set(ALL_NODES)
    assert agg["fedmedclip_build_info"][0][0]["service"] == "aggregator"
    assert (
        total(agg, "fedmedclip_grpc_server_handled_total", grpc_method="UploadUpdate", grpc_code="OK")
        == ROUNDS * HOSPITALS
    )
    assert total(
        agg, "fedmedclip_grpc_server_handled_total", grpc_method="FetchGlobal", grpc_code="OK"
    ) == ROUNDS * len(ALL_NODES)
    assert total(agg, "fedmedclip_grpc_server_handling_seconds_count", grpc_method="Register") >= len(ALL_NODES)
    for node, samples in nodes.items():
        fams = dict(samples["__families__"])
        for name in (
            "fedmedclip_local_train_duration_seconds",
            "fedmedclip_encode_duration_seconds",
            "fedmedclip_codec_duration_seconds",
            "fedmedclip_validation_accuracy_ratio",
        ):
            assert fams.get(name) in ("histogram", "gauge"), (node, name)
        assert samples["fedmedclip_build_info"][0][0]["service"] == "hospital_node"
        assert total(samples, "fedmedclip_round_current") == ROUNDS
        trained = 0 if node == "global" else ROUNDS
        assert total(samples, "fedmedclip_local_train_duration_seconds_count") == trained, node
    # bytes: what the nodes sent is what the aggregator received, is what the report accounts for
    log = federation["report"]["rounds_log"]
    up_sent = sum(total(s, "fedmedclip_update_bytes_total", direction="up") for s in nodes.values())
    up_received = total(agg, "fedmedclip_update_bytes_total", direction="up", encoding="int8")
    assert up_sent == up_received == sum(r["bytes_up"] for r in log) > 0
    down_sent = total(agg, "fedmedclip_update_bytes_total", direction="down", encoding="int8")
    down_received = sum(total(s, "fedmedclip_update_bytes_total", direction="down") for s in nodes.values())
    assert down_sent == down_received == sum(r["global_wire_bytes"] for r in log) * len(ALL_NODES)
    raw_up = total(agg, "fedmedclip_update_raw_bytes_total", direction="up")
    assert raw_up == sum(total(s, "fedmedclip_update_raw_bytes_total", direction="up") for s in nodes.values())
    assert raw_up / up_received > 3.5  # int8 + zstd against float32: the ratio is a division of two counters


def test_health_is_serving_and_a_node_with_another_backbone_fingerprint_is_refused(
    federation, partition_dir, feature_cache
):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ports = federation["ports"]
    with grpc.insecure_channel(f"127.0.0.1:{ports['health']}") as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service="fedmedclip.v1.AggregatorService"), timeout=10)
            .status
        )
    assert status == health_pb2.HealthCheckResponse.SERVING
    cluster = Cluster(federation["root"])
    try:
        # other prompts: same image features (cache hits) but another backbone fingerprint
        start_node(
            cluster,
            federation["pki"],
            partition_dir,
            "hospital_1",
            ports["grpc"],
            free_port(),
            federation["root"] / "intruder",
            feature_cache,
            "--templates",
            "an MRI scan showing {}",
            identity="intruder",
        )
        proc = cluster.procs[0]
        code = proc.wait(timeout=START_TIMEOUT)
    finally:
        cluster.close()
    # refused by the dry-run registration, after the backbone loaded and before any image was encoded
    assert code == ExitCode.USAGE, proc.text()[-2000:]
    assert "preflight registration: PROBLEM" in proc.text() and "registration_mismatch" in proc.text()
    assert "encoded in" not in proc.text()
    agg = scrape(ports["metrics"])
    assert (
        total(agg, "fedmedclip_grpc_server_handled_total", grpc_method="Register", grpc_code="FAILED_PRECONDITION") >= 1
    )
    assert total(agg, "fedmedclip_requests_rejected_total", reason=Reason.REGISTRATION_MISMATCH.value) >= 1


def test_predict_classifies_a_folder_with_the_hospitals_ensemble(federation, partition_dir, feature_cache, tmp_path):
    import csv
    import shutil

    rows = list(csv.DictReader((partition_dir / "hospital_1.csv").open()))
    images = tmp_path / "images"
    images.mkdir()
    for row in rows[:5]:
        shutil.copy(row["path"], images / Path(row["path"]).name)
    out = tmp_path / "predictions.csv"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hospital_node",
            "predict",
            "--config",
            str(partition_dir / "hospital_1.yaml"),
            "--state-dir",
            str(federation["root"] / "state" / "hospital_1"),
            "--cache-dir",
            str(feature_cache),
            "--images",
            str(images),
            "--out",
            str(out),
            "--progress",
            "false",
        ],
        cwd=REPO_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    best = read_json(federation["root"] / "agg" / "report.json")["best_round"]
    assert f"the global of round {best}, the run's best by its selection (the last is {ROUNDS})" in done.stdout
    got = list(csv.DictReader(out.open()))
    assert len(got) == 5
    classes = (partition_dir / "classes.txt").read_text().split()
    for row in got:
        probs = [float(row[f"p_{c}"]) for c in classes]
        assert abs(sum(probs) - 1) < 1e-4 and row["prediction"] == classes[probs.index(max(probs))]


def test_every_receipt_of_the_run_verifies_against_the_aggregators_audit_log_and_a_forged_one_fails(
    federation, tmp_path
):
    """Each node checked (audit_pub from its kit) and kept a receipt per accepted update; they all match the log."""
    import json
    import shutil

    root, pki = federation["root"], federation["pki"]
    key = pki / "hospital_1" / "aggregator_audit.pub"  # the key a hospital got with its kit

    def verify(receipts: Path) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("fedmedclip")
        args = [str(exe), "audit", "verify", str(root / "agg" / "audit.log"), "--key", str(key)]
        return subprocess.run([*args, "--receipts", str(receipts)], capture_output=True, text=True, timeout=60)

    done = verify(root / "state")
    n = ROUNDS * HOSPITALS
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert f"receipts in {root / 'state'}: {n} checked, {n} match the log" in done.stdout
    assert "ends with run_finished" in done.stdout or "last event run_finished" in done.stdout
    for node in TRAINERS:
        text = next(p for p in federation["cluster"].procs if p.name == node).text()
        assert text.count("receipt verified") == ROUNDS and "receipt does not hold" not in text, node
    forged = tmp_path / "receipts"
    shutil.copytree(root / "state" / "hospital_2" / "receipts", forged)
    victim = sorted(forged.rglob("*.json"))[1]
    body = json.loads(victim.read_text())
    body["receipt"]["sha256"] = "0" * 64  # claims another update than the one accepted
    victim.write_text(json.dumps(body))
    done = verify(forged)
    assert done.returncode == ExitCode.AUDIT_FAILED, done.stdout + done.stderr
    assert f"FAILED receipt {victim}: the signature does not verify" in done.stdout
    assert f"{ROUNDS} checked, {ROUNDS - 1} match the log" in done.stdout


def test_services_shut_down_cleanly_on_sigterm(federation):
    cluster: Cluster = federation["cluster"]
    for proc in cluster.procs:
        proc.signal(signal.SIGTERM)
    codes = {p.name: p.wait(timeout=30) for p in cluster.procs}
    assert codes == {p.name: 0 for p in cluster.procs}  # Python's default SIGTERM would end them with -15


def test_node_and_aggregator_restarts_resume_from_saved_state(tmp_path, pki, partition_dir, reference, feature_cache):
    """hospital_2 is SIGKILLed mid-run and the aggregator restarted from its checkpoint: same result."""
    cluster = Cluster(tmp_path)
    try:
        grpc_port, health, metrics, victim_metrics = free_port(), free_port(), free_port(), free_port()
        agg_out = tmp_path / "agg"
        start_aggregator(cluster, pki, "aggregator", agg_out, grpc_port, health, metrics, exit_when_done=True)
        for node in TRAINERS:
            start_node(
                cluster,
                pki,
                partition_dir,
                node,
                grpc_port,
                victim_metrics if node == "hospital_2" else 0,
                tmp_path / "state",
                feature_cache,
            )
        aggregator, hospital_1, victim, hospital_3 = cluster.procs
        wait_for(
            lambda: updates_accepted(victim_metrics) >= 2, START_TIMEOUT, "hospital_2 to finish round 2", cluster.procs
        )
        victim.popen.kill()  # SIGKILL: no chance to save anything more
        victim.wait(timeout=30)
        run_id = read_json(agg_out / "endpoints.json")["run_id"]
        # the others upload to round 3, which waits for hospital_2; the restarted aggregator has to get these again
        wait_for(
            lambda: updates_accepted(metrics) >= 3 * HOSPITALS - 1,
            START_TIMEOUT,
            "hospital_1 and hospital_3 to upload to round 3",
            cluster.procs,
        )
        aggregator.signal(signal.SIGTERM)
        assert aggregator.wait(timeout=30) == 0
        assert (agg_out / "checkpoint" / "state.npz").exists()
        time.sleep(1.0)  # the surviving nodes now retry with backoff
        aggregator2 = cluster.add("aggregator_restarted", aggregator.args)
        victim2 = cluster.add("hospital_2_restarted", victim.args)
        codes = {p.name: p.wait(timeout=START_TIMEOUT) for p in (victim2, hospital_1, hospital_3, aggregator2)}
        report = read_json(agg_out / "report.json")
        logs = {p.name: p.text() for p in cluster.procs}
    finally:
        cluster.close()
    assert codes == {"hospital_2_restarted": 0, "hospital_1": 0, "hospital_3": 0, "aggregator_restarted": 0}, "\n".join(
        f"--- {k}\n{v[-1500:]}" for k, v in logs.items()
    )
    assert report["run_id"] == run_id and report["phase"] == "finished"  # the restarted aggregator, the same run
    assert all(r["nodes"] == TRAINERS for r in report["rounds_log"])  # every node came back, nothing was lost
    # hospital_2 kept its saved state (a state of another run is archived) and resumed
    # from it: a fresh private model would not give the simulation's accuracies below
    victim_state = tmp_path / "state" / "hospital_2"
    assert StateStore(victim_state).load().run_id == run_id and not (victim_state / "archive").exists()
    assert_matches_reference(report, trainers_only(reference, report))
