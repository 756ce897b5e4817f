"""Startup kits: one self-contained folder per party, explicit file modes, the CA apart, pinned label space."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from aggregator.config import AggregatorConfig
from hospital_node.config import NodeConfig
from shared.ops.config import load_config

FEDMEDCLIP = Path(sys.executable).with_name("fedmedclip")
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _provision(tmp_path: Path, *extra: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    cmd = [
        str(FEDMEDCLIP),
        "provision",
        "--nodes",
        "hospital_1,hospital_2,global",
        "--evaluators",
        "global",
        "--out",
        str(tmp_path / "kits"),
        "--classes-file",
        str(tmp_path / "classes.txt"),
        *extra,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        preexec_fn=lambda: os.umask(umask),
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_kits_have_explicit_modes_whatever_the_umask_and_the_ca_key_lies_apart(tmp_path):
    done = _provision(tmp_path, umask=0o000)
    assert done.returncode == 0, done.stderr
    kits, ca = tmp_path / "kits", tmp_path / "kits-ca"
    assert not list(kits.rglob("ca.key")), "the CA key must not be in any kit"
    assert _mode(ca) == 0o700 and _mode(ca / "ca.key") == 0o600
    for party in ("aggregator", "hospital_1", "hospital_2", "global"):
        folder = kits / party
        assert _mode(folder) == 0o700
        assert _mode(folder / "key.pem") == 0o600
        for name in ("ca.pem", "cert.pem", "README.md", "aggregator.yaml" if party == "aggregator" else "node.yaml"):
            assert _mode(folder / name) == 0o644, (party, name)
        for name in ("start.sh", "stop.sh"):
            assert _mode(folder / name) == 0o700
        assert (folder / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes()


def test_a_kit_works_wherever_it_is_copied(tmp_path):
    assert _provision(tmp_path).returncode == 0
    elsewhere = tmp_path / "hospital-side" / "fedmedclip"
    shutil.copytree(tmp_path / "kits" / "hospital_1", elsewhere)
    shutil.rmtree(tmp_path / "kits")  # nothing may still point at the operator's folder
    cfg = load_config(NodeConfig, yaml_path=[elsewhere / "node.yaml"], env={})
    assert cfg.node_id == "hospital_1" and cfg.role == "trainer" and cfg.classes == CLASSES
    for path in (cfg.tls_ca, cfg.tls_cert, cfg.tls_key):
        assert Path(path).is_file() and Path(path).parent == elsewhere
    assert cfg.state_dir == str(elsewhere / "state") and cfg.cache_dir == str(elsewhere / "cache")
    from shared.wire.tls import load_material

    material = load_material(
        "node hospital_1", cfg.aggregator, insecure=False, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key
    )
    assert material is not None


def test_the_aggregator_kit_pins_label_space_and_fingerprint_and_listens_on_loopback(tmp_path, backbone):
    assert _provision(tmp_path).returncode == 0
    agg = load_config(AggregatorConfig, yaml_path=[tmp_path / "kits" / "aggregator" / "aggregator.yaml"], env={})
    assert agg.listen == "127.0.0.1:50051"
    assert agg.class_names == CLASSES
    assert agg.backbone_fingerprint == backbone.fingerprint(CLASSES)  # what an honest node will present
    assert agg.allowed_nodes == ["hospital_1", "hospital_2", "global"]
    assert agg.out_dir == str(tmp_path / "kits" / "aggregator" / "runs")
    held_out = yaml.safe_load((tmp_path / "kits" / "global" / "node.yaml").read_text())
    assert held_out["role"] == "evaluator"
    # a public listen address is an explicit choice
    assert _provision(tmp_path, "--listen", "0.0.0.0:50051").returncode == 0
    agg = yaml.safe_load((tmp_path / "kits" / "aggregator" / "aggregator.yaml").read_text())
    assert agg["listen"] == "0.0.0.0:50051"


def test_provisioning_again_keeps_certificates_and_adds_a_hospital(tmp_path):
    assert _provision(tmp_path).returncode == 0
    before = (tmp_path / "kits" / "hospital_1" / "cert.pem").read_bytes()
    ca_before = (tmp_path / "kits-ca" / "ca.pem").read_bytes()
    done = subprocess.run(
        [
            str(FEDMEDCLIP),
            "provision",
            "--nodes",
            "hospital_1,hospital_2,global,hospital_3",
            "--out",
            str(tmp_path / "kits"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "kits" / "hospital_1" / "cert.pem").read_bytes() == before
    assert (tmp_path / "kits-ca" / "ca.pem").read_bytes() == ca_before
    assert (tmp_path / "kits" / "hospital_3" / "key.pem").is_file()
    agg = yaml.safe_load((tmp_path / "kits" / "aggregator" / "aggregator.yaml").read_text())
    assert "hospital_3" in agg["allowed_nodes"]


def test_a_ca_folder_inside_the_kits_is_refused(tmp_path):
    done = _provision(tmp_path, "--ca-dir", str(tmp_path / "kits" / "ca"))
    assert done.returncode == 2 and "keep the CA key apart" in done.stderr


def test_insecure_in_the_environment_cannot_downgrade_a_provisioned_service(tmp_path):
    assert _provision(tmp_path).returncode == 0
    kit = tmp_path / "kits" / "aggregator"
    done = subprocess.run(
        [
            str(FEDMEDCLIP),
            "aggregator",
            "--config",
            str(kit / "aggregator.yaml"),
            "--metrics-port",
            "0",
            "--health-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, HF_HUB_OFFLINE="1", FEDMEDCLIP_AGGREGATOR_INSECURE="true"),
    )
    assert done.returncode == 2, done.stderr
    assert "insecure is set, but so is TLS material" in done.stderr.strip().splitlines()[-1]
    assert not (kit / "runs" / "endpoints.json").exists()  # it never served


def test_an_aggregator_without_pinned_classes_and_fingerprint_refuses_to_start(tmp_path):
    """Trust on first use is an explicit choice: else an attacker registering first would lock others out."""
    done = subprocess.run(
        [str(FEDMEDCLIP), "provision", "--nodes", "hospital_1", "--out", str(tmp_path / "kits")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    config = tmp_path / "kits" / "aggregator" / "aggregator.yaml"
    assert "class_names" not in yaml.safe_load(config.read_text())
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [str(FEDMEDCLIP), "aggregator", "--config", str(config), "--metrics-port", "0", "--health-port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2
    assert "class_names and backbone_fingerprint are not set" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "kits" / "aggregator" / "runs" / "endpoints.json").exists()


def test_an_unknown_runtime_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "kits"
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "provision", "--nodes", "a,b", "--out", str(out), "--runtime", "tpu"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2, proc.stderr
    assert "runtime must be one of ['auto', 'torch', 'onnxruntime']" in proc.stdout + proc.stderr
    assert not out.exists()


def test_secure_aggregation_kits_agree_aggregator_and_nodes(tmp_path):
    """``--secure-aggregation true`` puts the setting in every kit, so the nodes and the aggregator agree (a node
    that disagrees is refused at registration: tests/test_secagg_services.py)."""
    from aggregator.provision import ProvisionConfig, provision

    provision(ProvisionConfig(nodes=["hospital_1", "hospital_2"], out=str(tmp_path / "kits"), secure_aggregation=True))
    agg = load_config(AggregatorConfig, yaml_path=[tmp_path / "kits" / "aggregator" / "aggregator.yaml"], env={})
    assert agg.secure_aggregation and not agg.insecure
    for node in ("hospital_1", "hospital_2"):
        cfg = load_config(NodeConfig, yaml_path=[tmp_path / "kits" / node / "node.yaml"], env={})
        assert cfg.secure_aggregation
    provision(ProvisionConfig(nodes=["hospital_3"], out=str(tmp_path / "plain")))
    assert not load_config(
        NodeConfig, yaml_path=[tmp_path / "plain" / "hospital_3" / "node.yaml"], env={}
    ).secure_aggregation
