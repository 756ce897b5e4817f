"""A real Prometheus server scrapes a real federation with the project's own scrape config, and every
dashboard panel and every rule is evaluated through Prometheus' HTTP API.

The federation is what ``make demo`` runs (``deploy/local_federation.py``: partition, provision,
``service_commands``; mTLS included) on a small real subset, with many rounds so it is still
training while the queries run. Prometheus runs ``deploy/prometheus/prometheus.yml`` with only the
file_sd target files and the intervals swapped (1 s). The test:

1. waits until Prometheus has seen several rounds, with a rejected update in between (a stream that
   starts with a chunk, sent with hospital_1's certificate: ``bad_stream``);
2. evaluates every expression of every panel of every provisioned dashboard (``$__rate_interval``
   -> 1m) and asserts each returns at least one finite sample; the table panel -> value goes to
   ``bench/results/dashboard_queries.md``;
3. evaluates every recording rule (data) and checks every rule is healthy in ``/api/v1/rules``;
4. SIGKILLs the held-out node: the node-silent and target-down alert expressions then return data
   and the alerts go pending. The stalled-round alert cannot fire in minutes (15 min window): its
   expression must evaluate cleanly and return nothing while rounds advance; it firing is shown by
   ``promtool test rules`` (tests/test_deploy.py).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.services_support import (
    PROM_DIR,
    RATE_INTERVAL,
    REPO_ROOT,
    Cluster,
    free_port,
    panel_queries,
    rules,
    service_env,
    show,
    wait_for,
)

RESULTS = REPO_ROOT / "bench" / "results" / "dashboard_queries.md"
PER_CLASS = 20
HOSPITALS = 3
ROUNDS = 500  # never reached: the test stops the federation once it has what it needs
MIN_ROUNDS = 4
START_TIMEOUT = 300.0


def prom_get(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read().decode())
    assert body["status"] == "success", body
    return body["data"]


def query(port: int, expr: str) -> list[dict]:
    data = prom_get(port, "/api/v1/query", query=expr)
    assert data["resultType"] == "vector", (expr, data["resultType"])
    return data["result"]


def render_config(tmp: Path, targets: dict[str, list[dict]]) -> Path:
    """deploy/prometheus/prometheus.yml with only the target files and the intervals swapped."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / r) for r in config["rule_files"]]
    for job in config["scrape_configs"]:
        for sd in job["file_sd_configs"]:
            files = []
            for f in sd["files"]:
                out = tmp / "targets" / Path(f).name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(yaml.safe_dump(targets.get(job["job_name"], [])))
                files.append(str(out))
            sd["files"] = files
            sd["refresh_interval"] = "1s"
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def reject_one_update(address: str, pki: Path) -> None:
    """An upload that starts with a chunk instead of a header, from a node with a valid certificate."""
    import grpc

    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc

    party = pki / "hospital_1"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(party / "ca.pem").read_bytes(),
        private_key=(party / "key.pem").read_bytes(),
        certificate_chain=(party / "cert.pem").read_bytes(),
    )
    with grpc.secure_channel(address, creds) as channel:
        stub = pb_grpc.AggregatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadUpdate(iter([pb.UploadUpdateRequest(chunk=b"not a header")]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: run make system-deps (apt-get install -y prometheus)")
    return path


def test_prometheus_evaluates_every_dashboard_panel_and_rule_on_a_live_federation(
    tmp_path, brain_tumor_root, feature_cache, prometheus_binary
):
    from deploy import local_federation as lf

    nodes = lf.node_names(HOSPITALS)
    partition, pki = tmp_path / "partition", tmp_path / "pki"
    env = service_env()
    subprocess.run(
        lf.resolve(
            lf.partition_command(
                str(partition), hospitals=HOSPITALS, seed=0, alpha=0.5, per_class=PER_CLASS, data=str(brain_tumor_root)
            )
        ),
        cwd=REPO_ROOT,
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
    )
    subprocess.run(
        lf.resolve(lf.provision_command(str(pki), nodes, classes_file=str(partition / "classes.txt"))),
        cwd=REPO_ROOT,
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    )
    grpc_port, health_port, metrics_port, prom_port = free_port(), free_port(), free_port(), free_port()
    node_ports = {n: free_port() for n in nodes}
    commands = lf.service_commands(
        nodes,
        min_nodes=HOSPITALS,
        rounds=ROUNDS,
        codec="int8",
        seed=0,
        threads=1,
        partition_dir=str(partition),
        out_dir=str(tmp_path / "run"),
        cache_dir=str(feature_cache),
        listen=f"127.0.0.1:{grpc_port}",
        aggregator_address=f"127.0.0.1:{grpc_port}",
        health_port=health_port,
        metrics_port=metrics_port,
        node_metrics_ports=node_ports,
        pki_dir=str(pki),
        extra_aggregator=("--heartbeat-interval-s", "1", "--node-timeout-s", "4", "--exit-when-done", "false"),
        extra_node=("--dp-epsilon", "8"),  # differential privacy: the privacy panel's series
    )
    config = render_config(
        tmp_path,
        {
            "aggregator": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            "hospital_node": [
                {"targets": [f"127.0.0.1:{p}"], "labels": {"hospital": n}} for n, p in node_ports.items()
            ],
            "prometheus": [{"targets": [f"127.0.0.1:{prom_port}"]}],
        },
    )
    (tmp_path / "logs").mkdir()
    cluster = Cluster(tmp_path / "logs")  # the services; Prometheus is not a Python process
    prom_log = (tmp_path / "logs" / "prometheus.log").open("ab")
    prom = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _ready(prom_port), 60, "prometheus to be ready")
        cluster.add("aggregator", lf.resolve(commands["aggregator"]))  # the console script, run by python
        from deploy.healthcheck import check_grpc

        wait_for(
            lambda: check_grpc(f"127.0.0.1:{health_port}", timeout_s=1),
            START_TIMEOUT,
            "the aggregator's grpc.health.v1 to say SERVING",
            cluster.procs,
        )
        reject_one_update(f"127.0.0.1:{grpc_port}", pki)  # the first rejection (the series appears at 1)
        for node in nodes:
            cluster.add(node, lf.resolve(commands[node]))

        def rounds_seen() -> bool:
            result = query(prom_port, 'fedmedclip_round_current{job="aggregator"}')
            return bool(result) and float(result[0]["value"][1]) >= MIN_ROUNDS

        wait_for(rounds_seen, START_TIMEOUT, f"Prometheus to see {MIN_ROUNDS} rounds", cluster.procs, interval=1)
        reject_one_update(f"127.0.0.1:{grpc_port}", pki)  # the second: an increase inside the rate window
        time.sleep(3)  # a few scrapes and rule evaluations

        # every target Prometheus knows is up (the project's config scraped every service)
        active = prom_get(prom_port, "/api/v1/targets")["activeTargets"]
        assert {t["labels"]["job"] for t in active} == {"aggregator", "hospital_node", "prometheus"}
        assert all(t["health"] == "up" for t in active), [(t["scrapeUrl"], t["lastError"]) for t in active]

        rows, failures = [], []
        for _dash, panel, ref, expr in panel_queries():
            result = query(prom_port, expr.replace("$__rate_interval", RATE_INTERVAL))
            finite = [s for s in result if math.isfinite(float(s["value"][1]))]
            rows.append((panel, ref, expr, show(result)))
            if not finite:
                failures.append((panel, ref, expr, result))
        rule_rows = []
        for rule in rules():
            if "record" in rule:
                result = query(prom_port, rule["record"])
                rule_rows.append((f"record {rule['record']}", show(result)))
                if not result:
                    failures.append((rule["record"], "", rule["expr"], result))
        stalled = [r for r in rules() if r.get("alert") == "FedMedCLIPRoundStalled"][0]
        assert query(prom_port, stalled["expr"]) == [], "rounds advance: the stalled-round alert must be quiet"
        rule_rows.append(("alert FedMedCLIPRoundStalled (rounds advancing)", "no series: not firing, as expected"))

        # a node dies: the aggregator stops hearing from it and Prometheus stops reaching it
        victim = cluster.procs[-1]
        assert victim.name == "global"
        victim.popen.send_signal(signal.SIGKILL)
        for name in ("FedMedCLIPNodeSilent", "FedMedCLIPTargetDown"):
            rule = [r for r in rules() if r.get("alert") == name][0]
            result = wait_for(
                lambda rule=rule: query(prom_port, rule["expr"]),
                60,
                f"{name}'s expression to return data",
                cluster.procs,
                interval=1,
            )
            rule_rows.append((f"alert {name} (after SIGKILL of node global)", show(result)))
        wait_for(
            lambda: (
                {
                    a["labels"]["alertname"]
                    for a in prom_get(prom_port, "/api/v1/alerts")["alerts"]
                    if a["state"] == "pending"
                }
                >= {"FedMedCLIPNodeSilent", "FedMedCLIPTargetDown"}
            ),
            30,
            "the two alerts to go pending",
            interval=1,
        )
        groups = prom_get(prom_port, "/api/v1/rules")["groups"]
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
        assert len([r for g in groups for r in g["rules"]]) == len(rules())

        _write_table(rows, rule_rows)
        print("\n" + RESULTS.read_text())
        assert not failures, "queries without data:\n" + "\n".join(
            f"{p} {r}: {e} -> {res}" for p, r, e, res in failures
        )
    finally:
        cluster.close()
        prom.send_signal(signal.SIGTERM)
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
        prom_log.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _write_table(rows: list[tuple[str, str, str, str]], rule_rows: list[tuple[str, str]]) -> None:
    lines = [
        "# Dashboard and rule queries against a live federation",
        "",
        f"Written by `tests/test_deploy_prometheus.py` ({time.strftime('%Y-%m-%d %H:%M')}): Prometheus "
        f"{_prom_version()} with `deploy/prometheus/prometheus.yml` (scrape interval 1 s) scraping the "
        f"aggregator and {HOSPITALS} + 1 nodes of a `make demo` federation over mTLS ({PER_CLASS} images per class, "
        f"int8), after at least {MIN_ROUNDS} rounds and one rejected update inside the window; "
        f"`$__rate_interval` = {RATE_INTERVAL}. Values are instant query results at that moment.",
        "",
        "| panel | query | value |",
        "|---|---|---|",
    ]
    for panel, ref, expr, value in rows:
        lines.append(f"| {panel} | {ref}: `{expr.replace('|', '∣')}` | {value or '(no data)'} |")
    lines += ["", "| rule | value |", "|---|---|"]
    lines += [f"| {name} | {value or '(no data)'} |" for name, value in rule_rows]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


def _prom_version() -> str:
    out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout.split()
    return out[2] if len(out) > 2 else "?"
