"""`fedmedclip node check` against a real aggregator, and `node run` stopping at once on a bad kit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FEDMEDCLIP = Path(sys.executable).with_name("fedmedclip")
CLASSES = "glioma,meningioma,notumor,pituitary"


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FEDMEDCLIP), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(stdout: str) -> dict[str, str]:
    """``name -> status`` of the check table."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("PASSED", "PROBLEM", "UNREACHABLE"):
            out[parts[0]] = parts[1]
    return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory, brain_tumor_root):
    """Two federations' kits (ours and a foreign one), a hospital's images, and our aggregator running."""
    root = tmp_path_factory.mktemp("preflight")
    port = _free_port()
    for name in ("ours", "foreign"):
        done = _run(
            "provision", "--nodes", "hospital_1", "--out", str(root / name), "--classes", CLASSES, "--port", str(port)
        )
        assert done.returncode == 0, done.stderr
    images = root / "images"
    for cls in ("glioma", "notumor"):
        (images / cls).mkdir(parents=True)
        for src in sorted((brain_tumor_root / "Training" / cls).iterdir())[:5]:
            shutil.copy(src, images / cls / src.name)
    agg_dir = root / "ours" / "aggregator"
    proc = subprocess.Popen(
        [
            str(FEDMEDCLIP),
            "aggregator",
            "--config",
            str(agg_dir / "aggregator.yaml"),
            "--health-port",
            "0",
            "--metrics-port",
            "0",
            "--registration-timeout-s",
            "600",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        deadline = time.monotonic() + 120
        while not (agg_dir / "runs" / "endpoints.json").exists():
            assert proc.poll() is None, "the aggregator exited"
            assert time.monotonic() < deadline, "the aggregator did not start"
            time.sleep(0.2)
        yield {"root": root, "images": images, "port": port}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _registered_trainers(federation) -> float:
    import json
    import urllib.request

    endpoints = json.loads((federation["root"] / "ours" / "aggregator" / "runs" / "endpoints.json").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{endpoints['metrics_port']}/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(x for x in text.splitlines() if x.startswith('fedmedclip_nodes_registered{role="trainer"}'))
    return float(line.split()[-1])


def test_a_good_kit_passes_every_check(federation):
    kit = federation["root"] / "ours" / "hospital_1"
    done = _run("node", "check", "--config", str(kit / "node.yaml"), "--data", str(federation["images"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _rows(done.stdout) == {
        "identity": "PASSED",
        "data": "PASSED",
        "folders": "PASSED",
        "aggregator": "PASSED",
        "registration": "PASSED",
    }
    assert "would admit hospital_1" in done.stdout and "waiting for nodes" in done.stdout
    assert _registered_trainers(federation) == 0  # a dry run registers nothing


def test_a_registration_the_aggregator_would_refuse_is_found_before_any_encoding(federation, tmp_path):
    kit = federation["root"] / "ours" / "hospital_1"
    another_seed = ("--config", str(kit / "node.yaml"), "--data", str(federation["images"]), "--seed", "7")
    done = _run("node", "check", *another_seed, "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert _rows(done.stdout)["registration"] == "PROBLEM"
    assert "registration_mismatch" in done.stdout and "initial adapter differs" in done.stdout
    assert "fix: this node's classes, backbone, method or seed must be the federation's" in done.stdout
    # the daemon stops on it too, once its backbone is loaded and before a single image is encoded
    cache = tmp_path / "run-cache"
    done = _run("node", "run", *another_seed, "--metrics-port", "0", "--cache-dir", str(cache), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "registration" in last and "initial adapter differs" in last
    assert not list(cache.rglob("*.npz"))  # no feature was computed
    assert _registered_trainers(federation) == 0


def test_a_certificate_of_another_federation_is_named_not_retried(federation):
    ours, foreign = federation["root"] / "ours" / "hospital_1", federation["root"] / "foreign" / "hospital_1"
    # the whole foreign kit: this node does not trust our aggregator
    done = _run("node", "check", "--config", str(foreign / "node.yaml"), "--data", str(federation["images"]))
    assert done.returncode == 2
    assert _rows(done.stdout)["aggregator"] == "PROBLEM" and "does not trust the aggregator" in done.stdout
    # our CA, a foreign certificate: found locally, before any connection
    done = _run(
        "node",
        "check",
        "--config",
        str(ours / "node.yaml"),
        "--data",
        str(federation["images"]),
        "--tls-cert",
        str(foreign / "cert.pem"),
        "--tls-key",
        str(foreign / "key.pem"),
    )
    assert done.returncode == 2 and _rows(done.stdout)["identity"] == "PROBLEM"
    assert "not signed by the CA" in done.stdout
    # the aggregator's own verdict on a foreign certificate, asked directly
    from hospital_node.config import NodeConfig
    from hospital_node.preflight import Status, check_aggregator

    check = check_aggregator(
        NodeConfig(
            node_id="hospital_1",
            aggregator=f"localhost:{federation['port']}",
            tls_ca=str(ours / "ca.pem"),
            tls_cert=str(foreign / "cert.pem"),
            tls_key=str(foreign / "key.pem"),
        )
    )
    assert check.status is Status.PROBLEM and "refused this certificate" in check.detail
    # and the daemon stops at once with that message instead of retrying for minutes (the default
    # give_up_after_s is 600 s: the subprocess timeout below would fail the test first)
    done = _run(
        "node",
        "run",
        "--config",
        str(foreign / "node.yaml"),
        "--data",
        str(federation["images"]),
        "--metrics-port",
        "0",
        timeout=120,
    )
    assert done.returncode == 2
    assert "does not trust the aggregator" in done.stderr.strip().splitlines()[-1]


def test_a_class_folder_outside_the_label_space_is_named(federation, tmp_path):
    kit = federation["root"] / "ours" / "hospital_1"
    images = tmp_path / "images"
    shutil.copytree(federation["images"], images)
    shutil.copytree(images / "glioma", images / "Glioma_old")
    done = _run("node", "check", "--config", str(kit / "node.yaml"), "--data", str(images))
    assert done.returncode == 2 and _rows(done.stdout)["data"] == "PROBLEM"
    assert "Glioma_old" in done.stdout and "fix:" in done.stdout


def test_an_unreachable_aggregator_is_reported_as_such(federation, tmp_path):
    kit = federation["root"] / "ours" / "hospital_1"
    done = _run(
        "node",
        "check",
        "--config",
        str(kit / "node.yaml"),
        "--data",
        str(federation["images"]),
        "--aggregator",
        f"127.0.0.1:{_free_port()}",
    )
    assert done.returncode == 2 and _rows(done.stdout)["aggregator"] == "UNREACHABLE"


def test_a_dp_delta_not_below_one_over_n_is_named_before_any_encoding(federation):
    kit = federation["root"] / "ours" / "hospital_1"
    base = ("node", "check", "--config", str(kit / "node.yaml"), "--data", str(federation["images"]))
    done = _run(*base, "--dp-epsilon", "3", "--dp-delta", "0.5")
    assert done.returncode == 2 and _rows(done.stdout)["data"] == "PROBLEM"
    assert "is not below 1/n" in done.stdout and "fix: set dp_delta below" in done.stdout
    done = _run(*base, "--dp-epsilon", "3")  # the default delta, min(1e-5, 0.1 / n), is always below 1/n
    assert _rows(done.stdout)["data"] == "PASSED" and "differential privacy at delta 1e-05" in done.stdout
