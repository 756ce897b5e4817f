"""The deployment files hold what they promise, checked offline (no Docker engine, no cluster).

- compose: ``docker-compose config`` (Debian's docker-compose 1.29) accepts deploy/compose.yaml, and
  every FedMedCLIP service runs exactly the command ``make demo`` runs for it
  (``deploy/local_federation.py:service_commands`` with container paths);
- Prometheus: ``promtool check config``, ``check rules`` and ``test rules`` (the alert unit tests);
- Grafana: provisioning as open-telemetry/opentelemetry-demo lays it out, every panel on the
  provisioned datasource uid, every metric a panel or rule names exists in shared/ops/telemetry.py;
- Kubernetes: the schema validator ``kubernetes-validate`` (bundled schemas, strict) and what
  matters checked directly (StatefulSet + claim template, grpc probes on the health port, Secret
  mounts, non-root, the same image and commands as compose);
- the set-up step gives each hospital its own images only, and the healthcheck reads grpc.health.v1.

``make test`` installs promtool and docker-compose (deploy/install-system-deps.sh); these tests fail
(never skip) without them.
"""

from __future__ import annotations

import csv
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.services_support import REPO_ROOT, service_env

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana" / "provisioning"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*/*.json"))
K8S = DEPLOY / "k8s"
TELEMETRY = (REPO_ROOT / "shared" / "ops" / "telemetry.py").read_text()

# container layout shared by compose and Kubernetes (deploy/Dockerfile creates these, owned by uid 10001)
CONTAINER = {
    "partition_dir": "/srv/fedmedclip/partition",
    "out_dir": "/var/lib/fedmedclip",
    "cache_dir": "/var/cache/fedmedclip/features",
    "listen": "0.0.0.0:50051",
    "aggregator_address": "aggregator:50051",
    "health_port": 50052,
    "metrics_port": 9100,
    "pki_dir": "/etc/fedmedclip/tls",
}
NODE_METRICS_PORT = 9101
SERVICE_OF_NODE = {
    "hospital_1": "hospital-1",
    "hospital_2": "hospital-2",
    "hospital_3": "hospital-3",
    "global": "global",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run make system-deps (it installs the Debian packages prometheus and "
            "docker-compose), or apt-get install -y prometheus docker-compose"
        )
    return path


def run_tool(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def compose_config() -> dict:
    env = {k: v for k, v in service_env().items() if not k.startswith(("FEDMEDCLIP_", "TORCH_INDEX_URL"))}
    result = subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE), "config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def demo_commands() -> dict[str, list[str]]:
    """What ``make demo`` runs, with its own defaults, asked for container paths and fixed ports."""
    from deploy import local_federation as lf

    defaults = {
        k: p.default
        for k, p in inspect.signature(lf.run_federation).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    rounds = int(re.search(r"^DEMO_ROUNDS \?= (\d+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1))
    nodes = lf.node_names(defaults["hospitals"], defaults["holdout"])
    assert defaults["tls"] is True, "make demo runs over mTLS, and so does the testbed"
    return lf.service_commands(
        nodes,
        min_nodes=defaults["hospitals"],
        rounds=rounds,
        codec=defaults["codec"],
        seed=defaults["seed"],
        threads=defaults["threads"],
        node_metrics_ports=dict.fromkeys(nodes, NODE_METRICS_PORT),
        **CONTAINER,
    )


def k8s_docs() -> list[dict]:
    return [
        d
        for f in sorted(K8S.glob("*.yaml"))
        if f.name != "kustomization.yaml"
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]


def metric_names(expr: str) -> set[str]:
    """The fedmedclip_ series an expression reads, histogram suffixes removed (recorded series excluded)."""
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"(?<![:\w])fedmedclip_[a-z_]+", expr)}


# --------------------------------------------------------------------------- compose


def test_compose_file_validates_with_docker_compose(compose_config):
    services = compose_config["services"]
    assert {"setup", "aggregator", "hospital-1", "hospital-2", "hospital-3", "global", "prometheus", "grafana"} <= set(
        services
    )
    for name in ("aggregator", "hospital-1", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name


def test_compose_services_run_exactly_the_commands_make_demo_runs(compose_config):
    services = compose_config["services"]
    demo = demo_commands()
    assert set(demo) == {"aggregator", *SERVICE_OF_NODE}
    for name, argv in demo.items():
        service = services["aggregator" if name == "aggregator" else SERVICE_OF_NODE[name]]
        assert service["command"] == argv, name  # the console script, as `make demo` runs it


def test_compose_orders_start_up_and_keeps_state_in_named_volumes(compose_config):
    services, volumes = compose_config["services"], set(compose_config["volumes"])
    agg = services["aggregator"]
    assert agg["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert "grpc" in agg["healthcheck"]["test"] and "127.0.0.1:50052" in agg["healthcheck"]["test"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in agg["volumes"]}
    assert mounts["/var/lib/fedmedclip"] == "aggregator-checkpoints" and "aggregator-checkpoints" in volumes
    for node, name in SERVICE_OF_NODE.items():
        svc = services[name]
        assert svc["depends_on"]["aggregator"]["condition"] == "service_healthy"
        assert svc["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        mounts = {m.split(":")[1]: (m.split(":")[0], m.endswith(":ro")) for m in svc["volumes"]}
        assert mounts["/srv/fedmedclip/partition"] == (f"{name}-data", True)  # its own data, read-only
        assert mounts[f"/etc/fedmedclip/tls/{node}"] == (f"{name}-tls", True)  # its own certificate only
        assert mounts["/var/cache/fedmedclip"][0] == f"{name}-features"
        assert mounts["/var/lib/fedmedclip/nodes"][0] == f"{name}-state"
        assert f"/etc/fedmedclip/tls/{node}/node.yaml" in svc["command"]  # mTLS: its provisioned identity
        assert {f"{name}-data", f"{name}-tls", f"{name}-features", f"{name}-state"} <= volumes
    setup = services["setup"]
    assert "deploy.testbed_setup" in setup["command"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # only the observability UIs are published, and only on loopback
    published = {name: svc.get("ports", []) for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"prometheus", "grafana"}
    for ports in published.values():  # "127.0.0.1:3000:3000" (compose 1.29) or the long form (compose v2)
        assert all((p.get("host_ip") if isinstance(p, dict) else p.split(":")[0]) == "127.0.0.1" for p in ports)


def test_no_secret_in_any_committed_deployment_file():
    texts = {
        p: p.read_text(errors="replace")
        for p in [*DEPLOY.rglob("*"), REPO_ROOT / ".dockerignore"]
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert not [p for p in texts if p.suffix in (".pem", ".key", ".crt", ".p12")]
    for path, text in texts.items():
        assert "BEGIN PRIVATE KEY" not in text and "BEGIN EC PRIVATE KEY" not in text, path
        assert not re.search(r"(?i)(password|passwd|secret_key|api_key)\s*[:=]\s*['\"]?\w{4,}", text), path
        assert "kind: Secret" not in text, path  # Kubernetes Secrets are created at set-up, never committed


def test_dockerfile_is_registry_free_multi_stage_non_root_with_a_grpc_health_check():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)  # made locally by deploy/engine
    assert re.search(r"^ARG TORCH_INDEX_URL=$", text, re.M)  # a CPU or CUDA index where one is reachable
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3  # multi-stage: build tools stay out
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), "the image must not run as root"
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", text, re.M)
    assert 'FEDMEDCLIP_HEALTHCHECK="grpc 127.0.0.1:50052"' in text
    for module in (
        "shared/",
        "aggregator/",
        "hospital_node/",
        "deploy/healthcheck.py",
        "deploy/testbed_setup.py",
        "deploy/local_federation.py",
    ):
        assert module in text, module
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"  # allow-list: no .venv, runs or data in the context


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_config_and_rules_pass_promtool():
    promtool = tool("promtool")
    run_tool(promtool, "check", "config", str(PROM / "prometheus.yml"))
    run_tool(promtool, "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))
    run_tool(promtool, "test", "rules", "rules_test.yml", cwd=PROM / "tests")  # exits 1 when an alert test fails


def test_prometheus_scrapes_every_service_of_the_testbed(compose_config):
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert {"aggregator", "hospital_node", "prometheus", "grafana"} <= set(jobs)
    targets = {}
    for name, job in jobs.items():
        for sd in job["file_sd_configs"]:
            for f in sd["files"]:
                targets[name] = [t for group in yaml.safe_load((PROM / f).read_text()) for t in group["targets"]]
    services = compose_config["services"]
    assert targets["aggregator"] == ["aggregator:9100"]
    assert sorted(targets["hospital_node"]) == sorted(f"{s}:{NODE_METRICS_PORT}" for s in SERVICE_OF_NODE.values())
    assert targets["grafana"] == ["grafana:3000"]
    # each target's port is the --metrics-port its service is started with
    assert services["aggregator"]["command"][services["aggregator"]["command"].index("--metrics-port") + 1] == "9100"
    for name in SERVICE_OF_NODE.values():
        cmd = services[name]["command"]
        assert cmd[cmd.index("--metrics-port") + 1] == str(NODE_METRICS_PORT)
        assert services[name]["environment"]["FEDMEDCLIP_NODE_METRICS_ADDR"] == "0.0.0.0"
    assert services["prometheus"]["build"]["context"] == str(PROM)  # config and rules baked into its image


# --------------------------------------------------------------------------- Grafana


def test_grafana_provisioning_follows_the_opentelemetry_demo_layout():
    ds = yaml.safe_load((GRAFANA / "datasources" / "default.yaml").read_text())["datasources"]
    assert [d["uid"] for d in ds] == ["fedmedclip-prometheus"] and ds[0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "dashboards" / "fedmedclip.yaml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/provisioning/dashboards/fedmedclip"]
    assert DASHBOARDS and all(d.parent.name == "fedmedclip" for d in DASHBOARDS)


def test_dashboard_panels_cover_the_issue_and_name_only_exported_metrics():
    dash = json.loads(DASHBOARDS[0].read_text())
    titles = [p["title"] for p in dash["panels"]]
    for wanted in (
        "Rounds over time",
        "Round duration",
        "Bytes per round: raw vs wire",
        "Compression ratio",
        "Updates accepted and rejected",
        "Validation accuracy per node",
        "Nodes connected",
        "Local train time per node",
        "Differential privacy: epsilon spent per hospital",
    ):
        assert any(t.startswith(wanted) for t in titles), wanted
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all(p["datasource"]["uid"] == "fedmedclip-prometheus" for p in dash["panels"])
    assert all(t["datasource"]["uid"] == "fedmedclip-prometheus" for p in dash["panels"] for t in p["targets"])
    assert any("histogram_quantile(0.99" in e for e in exprs) and any("histogram_quantile(0.5" in e for e in exprs)
    assert any(
        "fedmedclip_update_raw_bytes_total" in e and "/" in e and "fedmedclip_update_bytes_total" in e for e in exprs
    )
    rules = [
        r["expr"]
        for f in (PROM / "rules").glob("*.yml")
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
    ]
    named = set().union(*(metric_names(e) for e in exprs + rules))
    assert named, "no metric found in the panels"
    for name in named:
        assert f'"{name}"' in TELEMETRY or f'"{name.removesuffix("_total")}"' in TELEMETRY, (
            f"{name} is not exported by shared/ops/telemetry.py"
        )


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_pass_the_schema_validator():
    import kubernetes_validate

    docs = k8s_docs()
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml"
    )


def test_kubernetes_aggregator_statefulset_node_deployment_probes_mounts_and_commands(compose_config):
    docs = k8s_docs()
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    assert "Secret" not in by_kind  # made at set-up from the provisioning output, never committed
    (sts,) = by_kind["StatefulSet"]
    (svc,) = [s for s in by_kind["Service"] if s["metadata"]["name"] == "aggregator"]
    pod = sts["spec"]["template"]["spec"]
    (agg,) = pod["containers"]
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "aggregator"
    assert {"name": "checkpoints", "mountPath": "/var/lib/fedmedclip"} in agg[
        "volumeMounts"
    ] and "checkpoints" in claims
    ports = {p["name"]: p["containerPort"] for p in agg["ports"]}
    assert ports == {"grpc": 50051, "health": 50052, "metrics": 9100}
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert agg[probe]["grpc"]["port"] == ports["health"], probe
    (dep,) = by_kind["Deployment"]
    npod = dep["spec"]["template"]["spec"]
    (node,) = npod["containers"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    volumes = {v["name"]: v for v in npod["volumes"]}
    mounts = {m["mountPath"]: m for m in node["volumeMounts"]}
    assert volumes[mounts["/srv/fedmedclip/partition"]["name"]]["persistentVolumeClaim"]["readOnly"] is True
    tls = volumes[mounts["/etc/fedmedclip/tls/hospital_1"]["name"]]
    assert (
        tls["secret"]["secretName"] == "fedmedclip-hospital-1-tls"
        and mounts["/etc/fedmedclip/tls/hospital_1"]["readOnly"]
    )
    agg_tls = {v["name"]: v for v in pod["volumes"]}["tls"]
    assert agg_tls["secret"]["secretName"] == "fedmedclip-aggregator-tls"
    for p, c in ((pod, agg), (npod, node)):
        assert p["securityContext"]["runAsNonRoot"] is True and p["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # the same image and the same commands as the compose testbed (hence as make demo)
    services = compose_config["services"]
    assert agg["image"] == node["image"] == services["aggregator"]["image"] == services["hospital-1"]["image"]
    assert agg["command"] == services["aggregator"]["command"]
    assert node["command"] == services["hospital-1"]["command"]
    env = {e["name"]: e.get("value") for e in node["env"]}
    for key, value in services["hospital-1"]["environment"].items():
        if key.startswith("FEDMEDCLIP_NODE_"):
            assert env[key] == value, key


# --------------------------------------------------------------------------- set-up and health check


def test_testbed_setup_gives_each_hospital_only_its_own_images(tmp_path, brain_tumor_root):
    from hospital_node.data import load_local

    volumes = tmp_path / "volumes"
    view = tmp_path / "view"  # where a node "mounts" its data volume; a symlink per node stands in for it
    setup = [
        sys.executable,
        "-m",
        "deploy.testbed_setup",
        "--data",
        str(brain_tumor_root),
        "--volumes",
        str(volumes),
        "--per-class",
        "15",
        "--node-data-dir",
        str(view),
    ]
    subprocess.run(setup, cwd=REPO_ROOT, env=service_env(), check=True, timeout=300, capture_output=True)
    names = {}
    for node in SERVICE_OF_NODE:
        data = volumes / node / "data"
        config = yaml.safe_load((data / f"{node}.yaml").read_text())
        assert config["node_id"] == node and config["data"] == f"{view}/{node}.csv"
        with (data / f"{node}.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert rows and all(r["path"].startswith(f"{view}/images/") for r in rows)
        images = sorted(p.relative_to(data).as_posix() for p in (data / "images").rglob("*") if p.is_file())
        assert images == sorted(r["path"].removeprefix(f"{view}/") for r in rows)  # nothing but its own
        names[node] = {Path(r["path"]).name.split("-", 1)[1] for r in rows}
        if view.is_symlink():
            view.unlink()
        view.symlink_to(data)
        local = load_local(config["data"], evaluator=config["role"] == "evaluator")
        assert sum(local.counts()) == len(rows)
        tls = volumes / node / "tls"
        assert (tls / "key.pem").stat().st_mode & 0o077 == 0 and (tls / "cert.pem").is_file()
    for a in names:
        for b in names:
            if a < b:
                assert not names[a] & names[b], (a, b)  # no image is in two hospitals
    agg_tls = yaml.safe_load((volumes / "aggregator" / "tls" / "aggregator.yaml").read_text())
    # as the aggregator container sees it (a relative path is relative to the config file's folder)
    container_tls = PurePosixPath(CONTAINER["pki_dir"]) / "aggregator"
    assert container_tls / agg_tls["tls_key"] == container_tls / "key.pem"
    assert sorted(agg_tls["allowed_nodes"]) == sorted(SERVICE_OF_NODE)
    assert not list(volumes.rglob("ca.key")), "the CA key must never reach a volume"
    # idempotent: a second run finds the volumes ready and leaves them alone
    before = (volumes / "hospital_1" / "data" / "hospital_1.csv").stat().st_mtime_ns
    subprocess.run(setup, cwd=REPO_ROOT, env=service_env(), check=True, timeout=120, capture_output=True)
    assert (volumes / "hospital_1" / "data" / "hospital_1.csv").stat().st_mtime_ns == before


def test_healthcheck_reads_grpc_health_and_fails_on_a_closed_port():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from deploy.healthcheck import main as check

    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check(["grpc", f"127.0.0.1:{port}"]) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check(["grpc", f"127.0.0.1:{port}"]) == 0
    finally:
        server.stop(0)
    assert check(["grpc", f"127.0.0.1:{port}"]) == 1
    assert check(["bogus"]) == 2


def test_the_demo_stops_with_the_reason_when_a_node_cannot_start(tmp_path, brain_tumor_root, feature_cache):
    """``make demo``'s launcher: a node that exits with an error (here: asked to run the CPU-only ONNX Runtime
    tower on CUDA, what a GPU hospital given a CPU kit meets) ends the run at once with that node's own
    error, instead of the aggregator waiting for it until the run's timeout."""
    from deploy import local_federation as lf

    with pytest.raises(RuntimeError) as failure:
        lf.run_federation(
            tmp_path / "demo",
            hospitals=2,
            rounds=2,
            per_class=8,
            cache_dir=str(feature_cache),
            timeout_s=600,
            quiet=True,
            extra_node=("--device", "cuda", "--runtime", "onnxruntime"),
        )
    message = str(failure.value)
    assert re.search(r"\b(hospital_1|hospital_2|global) exited with code [1-9]", message), message
    assert "runtime onnxruntime runs on the CPU; use runtime torch on cuda" in message
    run = str(tmp_path / "demo")
    alive = []  # every process of the run was stopped with it
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and run in (proc / "cmdline").read_bytes().decode(errors="replace"):
                alive.append(proc.name)
        except OSError:
            continue  # ended meanwhile
    assert alive == []


def test_the_demo_runs_a_federation_with_the_torch_runtime(tmp_path, brain_tumor_root, feature_cache):
    """``make demo DEMO_ARGS="--runtime torch"`` (what GPU hospitals need, with ``--device cuda``): every kit
    names the runtime, and the federation runs to its end with it."""
    from deploy import local_federation as lf

    report = lf.run_federation(
        tmp_path / "demo", hospitals=2, rounds=2, per_class=8, cache_dir=str(feature_cache), timeout_s=600,
        quiet=True, runtime="torch",
    )  # fmt: skip
    assert report["phase"] == "finished" and len(report["history"]) == 2
    for node in ("hospital_1", "hospital_2", "global"):
        kit = yaml.safe_load((tmp_path / "demo" / "pki" / node / "node.yaml").read_text())
        assert kit["runtime"] == "torch"


def test_the_demo_provisions_the_runtime_its_gpu_nodes_can_run(capsys):
    """``make demo DEMO_ARGS="--device cuda"``: the kits name torch (what auto is on a GPU), never the CPU-only
    ONNX Runtime; asking for it on a GPU, or for a device torch does not know, is a usage error before anything
    starts."""
    from deploy import local_federation as lf

    assert lf.kit_runtime("auto", "cpu") == "auto"
    assert lf.kit_runtime("onnxruntime", "cpu") == "onnxruntime"
    assert lf.kit_runtime("auto", "cuda") == lf.kit_runtime("torch", "cuda:1") == "torch"
    for args, said in (
        (["--device", "cuda", "--runtime", "onnxruntime"], "runs on the CPU"),
        (["--device", "tpu9"], "--device tpu9"),
    ):
        with pytest.raises(SystemExit) as usage:
            lf.main(args)
        assert usage.value.code == 2 and said in capsys.readouterr().err
