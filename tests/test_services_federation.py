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

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.services_support import (REPO_ROOT, Cluster, aggregator_identity, free_port, node_identity, provision_pki,
                                    read_json, scrape, service_env, total, wait_for)

PER_CLASS = 40
HOSPITALS = 3
ROUNDS = 4
TRAINERS = [f"hospital_{i}" for i in range(1, HOSPITALS + 1)]
ALL_NODES = TRAINERS + ["global"]
START_TIMEOUT = 240.0  # every wait is bounded; first start loads the backbone in 4 processes on 2 cores


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """mTLS for every process here; 'intruder' holds a valid certificate but another backbone."""
    return provision_pki(tmp_path_factory.mktemp("pki"), ALL_NODES + ["intruder"])


@pytest.fixture(scope="module")
def partition_dir(tmp_path_factory, brain_tumor_root) -> Path:
    out = tmp_path_factory.mktemp("partition")
    subprocess.run([sys.executable, "-m", "hospital_node", "partition", "--data", str(brain_tumor_root),
                    "--hospitals", str(HOSPITALS), "--alpha", "0.5", "--seed", "0", "--per-class", str(PER_CLASS),
                    "--out", str(out)], cwd=REPO_ROOT, env=service_env(), check=True, timeout=300,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def reference(brain_tumor_root, feature_cache) -> dict:
    """The in-process simulation with the same seed and partition (also fills the shared feature cache)."""
    from shared.simulation import SimConfig, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(SimConfig(data_root=str(brain_tumor_root), per_class=PER_CLASS, n_hospitals=HOSPITALS,
                             rounds=ROUNDS, seed=0, cache_dir=str(feature_cache), progress=False))
    finally:
        torch.set_num_threads(threads)


def start_aggregator(cluster: Cluster, pki: Path, name: str, out: Path, port: int, health: int, metrics: int,
                     exit_when_done: bool, min_nodes: int = HOSPITALS, *extra: str,
                     env: dict[str, str] | None = None) -> None:
    cluster.add(name, ["-m", "aggregator", *aggregator_identity(pki), "--listen", f"127.0.0.1:{port}",
                       "--health-port", str(health),
                       "--metrics-port", str(metrics), "--out-dir", str(out), "--rounds", str(ROUNDS),
                       "--min-nodes", str(min_nodes), "--round-timeout-s", "120", "--linger-s", "60",
                       "--heartbeat-interval-s", "1", "--exit-when-done", str(exit_when_done).lower(), *extra], env=env)


def start_node(cluster: Cluster, pki: Path, partition: Path, node: str, port: int, metrics: int, state: Path,
               cache: Path, *extra: str, identity: str | None = None) -> None:
    cluster.add(identity or node, ["-m", "hospital_node", "run", "--config", str(partition / f"{node}.yaml"),
                                   *node_identity(pki, identity or node),
                       "--aggregator", f"127.0.0.1:{port}", "--metrics-port", str(metrics),
                       "--state-dir", str(state / node), "--cache-dir", str(cache), "--threads", "1",
                       "--progress", "false", "--retry-max-s", "2", *extra])


def finished(report_path: Path, nodes: list[str]):
    report = read_json(report_path)
    if not report or report.get("phase") != "finished":
        return None
    final = report["history"][-1] if report["history"] else {}
    if final.get("round") != ROUNDS or not all(n in final.get("test_accuracy", {}) for n in nodes):
        return None
    return report


def assert_matches_reference(report: dict, ref: dict) -> None:
    assert report["best_round"] == ref["best_round"]
    assert len(report["history"]) == len(ref["history"]) == ROUNDS
    for got, want in zip(report["history"], ref["history"]):
        assert got["round"] == want["round"]
        assert math.isclose(got["mean_val_accuracy"], want["mean_val_accuracy"], abs_tol=1e-6)
        for client, acc in want["test_accuracy"].items():
            assert math.isclose(got["test_accuracy"][client], acc, abs_tol=1e-6), (got["round"], client)
        assert math.isclose(got["bytes_up"], want["bytes_up"], rel_tol=1e-3)
        assert math.isclose(got["bytes_down"], want["bytes_down"], rel_tol=1e-3)
    for client, metrics in ref["test"].items():
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert math.isclose(report["test"][client][key], metrics[key], abs_tol=1e-6), (client, key)
        assert math.isclose(report["test"][client]["ece"], metrics["ece"], abs_tol=1e-4)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert math.isclose(report["avg"][key], ref["avg"][key], abs_tol=1e-6)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, pki, partition_dir, reference, feature_cache):
    """Aggregator + 3 trainers + the held-out evaluator, run to the end, still serving /metrics."""
    root = tmp_path_factory.mktemp("federation")
    cluster = Cluster(root)
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    node_metrics = {n: free_port() for n in ALL_NODES}
    try:
        start_aggregator(cluster, pki, "aggregator", root / "agg", ports["grpc"], ports["health"], ports["metrics"],
                         exit_when_done=False)
        for node in ALL_NODES:
            start_node(cluster, pki, partition_dir, node, ports["grpc"], node_metrics[node], root / "state",
                       feature_cache, "--exit-when-done", "false")
        report = wait_for(lambda: finished(root / "agg" / "report.json", ALL_NODES), START_TIMEOUT,
                          "the federation to finish", cluster.procs)
        # the last metrics report lands just before the node idles; give its counters a moment
        wait_for(lambda: all("run over" in p.text() for p in cluster.procs[1:]), 30, "nodes to finish",
                 cluster.procs)
        yield {"root": root, "cluster": cluster, "ports": ports, "node_metrics": node_metrics, "report": report,
               "pki": pki}
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
    for name, kind in {"fedmedclip_round_duration_seconds": "histogram",
                       "fedmedclip_aggregate_duration_seconds": "histogram",
                       "fedmedclip_codec_duration_seconds": "histogram",
                       "fedmedclip_update_bytes": "counter", "fedmedclip_update_raw_bytes": "counter",
                       "fedmedclip_updates_accepted": "counter", "fedmedclip_updates_rejected": "counter",
                       "fedmedclip_round_current": "gauge", "fedmedclip_nodes_connected": "gauge",
                       "fedmedclip_validation_accuracy_ratio": "gauge", "fedmedclip_build_info": "gauge",
                       "fedmedclip_grpc_server_handled": "counter",
                       "fedmedclip_grpc_server_handling_seconds": "histogram"}.items():
        assert families.get(name) == kind, name
    assert total(agg, "fedmedclip_round_duration_seconds_count") == ROUNDS
    assert total(agg, "fedmedclip_round_current") == ROUNDS
    assert total(agg, "fedmedclip_nodes_connected") == len(ALL_NODES)
    assert total(agg, "fedmedclip_updates_accepted_total") == ROUNDS * HOSPITALS
    assert {lab["node"] for lab, _ in agg["fedmedclip_validation_accuracy_ratio"]} == set(ALL_NODES)
    assert agg["fedmedclip_build_info"][0][0]["service"] == "aggregator"
    assert total(agg, "fedmedclip_grpc_server_handled_total", grpc_method="UploadUpdate", grpc_code="OK") \
        == ROUNDS * HOSPITALS
    assert total(agg, "fedmedclip_grpc_server_handled_total", grpc_method="FetchGlobal", grpc_code="OK") \
        == ROUNDS * len(ALL_NODES)
    assert total(agg, "fedmedclip_grpc_server_handling_seconds_count", grpc_method="Register") >= len(ALL_NODES)
    for node, samples in nodes.items():
        fams = dict(samples["__families__"])
        for name in ("fedmedclip_local_train_duration_seconds", "fedmedclip_encode_duration_seconds",
                     "fedmedclip_codec_duration_seconds", "fedmedclip_validation_accuracy_ratio"):
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


def test_health_is_serving_and_a_node_with_another_backbone_fingerprint_is_refused(federation, partition_dir,
                                                                                   feature_cache):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    import grpc

    ports = federation["ports"]
    with grpc.insecure_channel(f"127.0.0.1:{ports['health']}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fedmedclip.v1.AggregatorService"), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    cluster = Cluster(federation["root"])
    try:
        # other prompts: same image features (cache hits) but another backbone fingerprint
        start_node(cluster, federation["pki"], partition_dir, "hospital_1", ports["grpc"], free_port(),
                   federation["root"] / "intruder", feature_cache, "--templates", "an MRI scan showing {}",
                   identity="intruder")
        proc = cluster.procs[0]
        code = proc.wait(timeout=START_TIMEOUT)
    finally:
        cluster.close()
    assert code == 3, proc.text()[-2000:]
    assert "FAILED_PRECONDITION" in proc.text() and "fingerprint" in proc.text()
    agg = scrape(ports["metrics"])
    assert total(agg, "fedmedclip_grpc_server_handled_total", grpc_method="Register",
                 grpc_code="FAILED_PRECONDITION") >= 1


def test_predict_classifies_a_folder_with_the_hospitals_ensemble(federation, partition_dir, feature_cache, tmp_path):
    import csv
    import shutil

    rows = list(csv.DictReader((partition_dir / "hospital_1.csv").open()))
    images = tmp_path / "images"
    images.mkdir()
    for row in rows[:5]:
        shutil.copy(row["path"], images / Path(row["path"]).name)
    out = tmp_path / "predictions.csv"
    done = subprocess.run([sys.executable, "-m", "hospital_node", "predict", "--config",
                           str(partition_dir / "hospital_1.yaml"), "--state-dir",
                           str(federation["root"] / "state" / "hospital_1"), "--cache-dir", str(feature_cache),
                           "--images", str(images), "--out", str(out), "--progress", "false"],
                          cwd=REPO_ROOT, env=service_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = list(csv.DictReader(out.open()))
    assert len(got) == 5
    classes = (partition_dir / "classes.txt").read_text().split()
    for row in got:
        probs = [float(row[f"p_{c}"]) for c in classes]
        assert abs(sum(probs) - 1) < 1e-4 and row["prediction"] == classes[probs.index(max(probs))]


def test_services_shut_down_cleanly_on_sigterm(federation):
    cluster: Cluster = federation["cluster"]
    for proc in cluster.procs:
        proc.signal(signal.SIGTERM)
    codes = {p.name: p.wait(timeout=30) for p in cluster.procs}
    assert codes == {p.name: 0 for p in cluster.procs}
    assert "shutting down" in cluster.procs[0].text()


def test_node_and_aggregator_restarts_resume_from_saved_state(tmp_path, pki, partition_dir, reference, feature_cache):
    """hospital_2 is SIGKILLed mid-run and the aggregator restarted from its checkpoint: same result."""
    cluster = Cluster(tmp_path)
    try:
        grpc_port, health, metrics = free_port(), free_port(), free_port()
        agg_out = tmp_path / "agg"
        start_aggregator(cluster, pki, "aggregator", agg_out, grpc_port, health, metrics, exit_when_done=True)
        for node in TRAINERS:
            start_node(cluster, pki, partition_dir, node, grpc_port, 0, tmp_path / "state", feature_cache)
        aggregator, hospital_1, victim, hospital_3 = cluster.procs
        wait_for(lambda: "round 2: update accepted" in victim.text(), START_TIMEOUT, "hospital_2 to finish round 2",
                 cluster.procs)
        victim.popen.kill()  # SIGKILL: no chance to save anything more
        victim.wait(timeout=30)
        run_id = read_json(agg_out / "endpoints.json")["run_id"]
        time.sleep(1.0)  # the others run into the round that waits for hospital_2
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
    assert codes == {"hospital_2_restarted": 0, "hospital_1": 0, "hospital_3": 0, "aggregator_restarted": 0}, \
        "\n".join(f"--- {k}\n{v[-1500:]}" for k, v in logs.items())
    assert "resumed from" in logs["hospital_2_restarted"]
    assert f"restored run {run_id}" in logs["aggregator_restarted"]
    assert report["run_id"] == run_id and report["phase"] == "finished"
    assert "retrying in" in logs["hospital_1"] + logs["hospital_3"]
    assert_matches_reference(report, trainers_only(reference, report))


def trainers_only(reference: dict, report: dict) -> dict:
    """The reference without the held-out evaluator, for runs without one (AVG includes the held-out one)."""
    return dict(reference, test={k: v for k, v in reference["test"].items() if k != "global"}, avg=report["avg"],
                history=[dict(h, test_accuracy={k: v for k, v in h["test_accuracy"].items() if k != "global"})
                         for h in reference["history"]])
