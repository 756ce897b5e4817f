"""Differential privacy in a real federation: node daemons training with DP-SGD over real gRPC.

The aggregator and three trainer daemons on loopback (mTLS), the small federation's partition. hospital_1
and hospital_2 run with an epsilon budget for the run (their noise derived from it); hospital_3 runs with a
noise multiplier given directly and an epsilon cap that allows two rounds of its data, not three. Asserted:
every update states the epsilon its node has spent, the aggregator's report holds them per round and node
(and its Markdown shows them), each node's /metrics agrees with what it stated, nobody passes its budget,
and hospital_3 stops training at its cap, says so, and the run still finishes without it.
"""

from __future__ import annotations

import csv
import math

from shared.learning.privacy import DPConfig, epsilon_of
from tests.services_support import (
    ROUNDS,
    START_TIMEOUT,
    Cluster,
    free_port,
    read_json,
    scrape,
    scrape_or_none,
    start_aggregator,
    start_node,
    total,
    wait_for,
)

BUDGET = 6.0
SIGMA_3 = 1.0


def train_count(partition, node: str) -> int:
    with (partition / f"{node}.csv").open() as f:
        return sum(row["split"] == "train" for row in csv.DictReader(f))


def cap_for_two_rounds(n: int) -> float:
    """An epsilon cap between what two and three rounds of hospital_3's DP-SGD spend."""
    plan = DPConfig(noise_multiplier=SIGMA_3).plan(num_train=n, batch_size=32, local_epochs=1, rounds=ROUNDS)
    two, three = (epsilon_of(plan.sample_rate, SIGMA_3, k * plan.steps_per_round, plan.delta) for k in (2, 3))
    assert two < three
    return (two + three) / 2


def test_dp_nodes_state_their_epsilon_and_a_capped_node_stops_at_its_budget(
    tmp_path, pki, partition_dir, feature_cache
):
    cap = cap_for_two_rounds(train_count(partition_dir, "hospital_3"))
    cluster = Cluster(tmp_path)
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    node_metrics = {n: free_port() for n in ("hospital_1", "hospital_2", "hospital_3")}
    out = tmp_path / "agg"
    try:
        start_aggregator(
            cluster,
            pki,
            "aggregator",
            out,
            ports["grpc"],
            ports["health"],
            ports["metrics"],
            False,
            2,  # quorum: the rounds after hospital_3's last close at their deadline with the other two
            "--round-timeout-s",
            "15",
        )
        dp = {
            "hospital_1": ("--dp-epsilon", str(BUDGET)),
            "hospital_2": ("--dp-epsilon", str(BUDGET)),
            "hospital_3": ("--dp-noise-multiplier", str(SIGMA_3), "--dp-epsilon", repr(cap)),
        }

        def start(node: str) -> None:
            start_node(
                cluster,
                pki,
                partition_dir,
                node,
                ports["grpc"],
                node_metrics[node],
                tmp_path / "state",
                feature_cache,
                "--once",
                "false",  # stays up after the run, /metrics with it
                *dp[node],
            )

        start("hospital_3")  # registered before the first round opens: it trains from round 1 (its cap: 2 rounds)
        wait_for(
            lambda: total(scrape_or_none(ports["metrics"]) or {}, "fedmedclip_nodes_registered", role="trainer") >= 1,
            START_TIMEOUT,
            "hospital_3 to register",
            cluster.procs,
        )
        start("hospital_1")
        start("hospital_2")

        def done():
            report = read_json(out / "report.json")
            return report if report and report.get("phase") == "finished" else None

        report = wait_for(done, START_TIMEOUT, "the DP federation to finish", cluster.procs)
        log = report["rounds_log"]
        assert [r["round"] for r in log] == list(range(1, ROUNDS + 1))
        # the first round opens once two trainers are registered (hospital_3 and the first of the other two):
        # the last one to register may join a round or two later, then takes part in every round
        joined = {n: next(i for i, r in enumerate(log) if n in r["nodes"]) for n in ("hospital_1", "hospital_2")}
        assert min(joined.values()) == 0 and max(joined.values()) <= ROUNDS - 2, joined
        for node, first in joined.items():
            assert all(node in r["privacy"] for r in log[first:]), (node, log)
            spent = [r["privacy"][node]["dp_epsilon"] for r in log[first:]]
            assert all(0 < a < b for a, b in zip(spent, spent[1:])), spent  # grows every round it trains
            assert spent[-1] <= BUDGET  # never past its budget
            if first == 0:  # calibrated to the run: a node in every round spends most of its budget
                assert spent[-1] > 0.5 * BUDGET, spent
            assert all(0 < r["privacy"][node]["dp_delta"] <= 1e-5 for r in log[first:])
        third = [r["privacy"]["hospital_3"]["dp_epsilon"] for r in log if "hospital_3" in r["privacy"]]
        assert len(third) == 2 and third[-1] <= cap, third
        assert all("hospital_3" not in r["nodes"] for r in log[2:])  # no update past its cap
        markdown = (out / "report.md").read_text()
        assert "Differential privacy: epsilon each node has spent" in markdown

        for node, port in node_metrics.items():
            metrics = scrape(port)
            stated = [r["privacy"][node]["dp_epsilon"] for r in log if node in r["privacy"]][-1]
            assert math.isclose(total(metrics, "fedmedclip_dp_epsilon", node=node), stated, rel_tol=1e-9)
            budget = BUDGET if node != "hospital_3" else cap
            assert math.isclose(total(metrics, "fedmedclip_dp_epsilon_budget", node=node), budget, rel_tol=1e-9)
            exhausted = total(metrics, "fedmedclip_dp_budget_exhausted", node=node)
            assert exhausted == (1.0 if node == "hospital_3" else 0.0)
        node3_log = (tmp_path / "hospital_3.log").read_text()
        assert "privacy budget: one more round would spend epsilon" in node3_log
        assert "differential privacy: noise multiplier 1.000" in node3_log
    finally:
        cluster.close()
