"""Shared pytest fixtures and the suite's markers for FedMedCLIP.

Every test carries exactly one of three markers, given here by its module (``MARKERS``):

- ``unit``: fast and in-process (``pytest -m unit`` runs in well under a minute);
- ``services``: starts real gRPC processes, or takes more than a few seconds in-process (a
  simulation on real images, the full scan of the image set);
- ``deploy``: the deployment checks (docker-compose, promtool, Kubernetes schemas, a live Prometheus,
  the compose testbed on a Docker engine).

A test module missing from ``MARKERS`` stops the collection with a usage error, so a new module
cannot go unmarked. Fixtures shared by several modules live here, never imported across modules;
plain helpers live in tests/services_support.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # lets plain `pytest` import `shared` without installing it
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one folder of exported image towers for the whole suite and its subprocesses (exported once)
os.environ.setdefault("FEDMEDCLIP_RUNTIME_CACHE", str(REPO_ROOT / ".cache" / "runtime"))

TESTS_DIR = Path(__file__).resolve().parent

MARKER_HELP = {
    "unit": "fast in-process tests (pytest -m unit)",
    "services": "real gRPC processes, or more than a few seconds in-process (pytest -m services)",
    "deploy": "deployment checks: compose, promtool, Kubernetes schemas, a live Prometheus, the compose testbed "
    "(pytest -m deploy)",
}

# test module (path under tests/) -> its marker; a module missing here fails the collection
MARKERS = {
    # unit: in-process, fast
    "test_aggregation.py": "unit",
    "test_backbone.py": "unit",
    "test_codec.py": "unit",
    "test_data.py": "unit",
    "test_encode_runtime.py": "unit",  # lookup-table preprocessing, the ONNX Runtime tower against PyTorch, its cache
    "test_encode_progress.py": "unit",  # a node's encoding metrics as the demo's launcher reads them
    "test_features.py": "unit",
    "test_kernels.py": "unit",  # the compiled per-update loops against numpy and torch, and their index guards
    "test_fold_rows.py": "unit",  # the aggregator's fast fold against a plain reference and the full-tensor path
    "test_load_paths.py": "unit",  # the aggregator's cheaper per-call paths (trainer and handler caches)
    "test_layout.py": "unit",  # one short interpreter per core module (imports only)
    "test_lifecycle.py": "unit",  # SIGTERM handling of both daemons, each case in a short interpreter of its own
    "test_metrics.py": "unit",  # per-class metrics, round selection, report helpers
    "test_model.py": "unit",
    "test_privacy.py": "unit",  # DP-SGD clipping against per-image gradients, the accountant, the budget
    "test_secagg.py": "unit",  # secure aggregation: Shamir, the exact ring sum under dropouts, misbehaviour named
    "test_services_engine.py": "unit",  # the round engine and an in-process gRPC server, no processes
    "test_services_protocol.py": "unit",
    "test_audit.py": "unit",  # the signed audit log and receipts: real logs changed byte by byte, an in-process server
    # services: real processes, or more than a few seconds in-process
    "test_cli.py": "services",  # subprocesses of the console script, and two node daemons on one state folder
    "test_compile.py": "services",  # torch.compile'd training steps against eager ones (compiling takes seconds)
    "test_dos.py": "services",
    "test_faults.py": "services",
    "test_feature_cache_concurrency.py": "services",  # encoder processes sharing one feature cache folder
    "test_hostile_input.py": "services",
    "test_identity.py": "services",
    "test_joining.py": "services",  # the README's joining steps: kits, an aggregator and two node daemons
    "test_node_lifecycle.py": "services",  # node daemons across two aggregator runs, two copies of one node
    "test_preflight.py": "services",  # a real aggregator and node daemons
    "test_privacy_services.py": "services",  # node daemons training with differential privacy over gRPC
    "test_provision.py": "services",  # the console script and a backbone fingerprint per case
    "test_reasons.py": "services",
    "test_services_federation.py": "services",
    "test_simulation.py": "services",  # in-process simulations on real images
    "test_simulation_ray.py": "services",  # the Ray backend: a local Ray started and stopped per test
    "test_simulation_processes.py": "services",  # the process backend: worker processes started and stopped per test
    "test_secagg_services.py": "services",  # secure aggregation, real processes: sums, dropouts, cheats, kill -9
    "test_audit_services.py": "services",  # a real aggregator SIGKILLed, its log torn, restarted on the same chain
    "test_trust.py": "services",
    # deploy: the deployment checks
    "test_deploy.py": "deploy",
    "test_deploy_prometheus.py": "deploy",
    "test_testbed.py": "deploy",  # a Docker engine, images built here, docker-compose up
}


def pytest_configure(config: pytest.Config) -> None:
    for name, help_text in MARKER_HELP.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked: set[str] = set()
    for item in items:
        try:
            module = item.path.resolve().relative_to(TESTS_DIR).as_posix()
        except ValueError:  # not under tests/: not ours to mark
            continue
        marker = MARKERS.get(module)
        if marker is None:
            unmarked.add(module)
            continue
        item.add_marker(getattr(pytest.mark, marker))
    if unmarked:
        raise pytest.UsageError(
            f"tests/conftest.py: no marker for {', '.join(sorted(unmarked))}; add each module to MARKERS "
            f"with one of {', '.join(MARKER_HELP)}"
        )


# --------------------------------------------------------------------------- data and backbone


@pytest.fixture(scope="session")
def brain_tumor_root() -> Path:
    """The real brain tumor MRI set: $FEDMEDCLIP_DATA, else <repo>/../shared/data/brain-tumor-mri.

    The suite needs it; a checkout without it fails loudly instead of skipping the tests that
    matter most.
    """
    from shared.data import default_data_root

    root = default_data_root()
    if not root.is_dir():
        pytest.fail(
            f"brain tumor MRI set not found at {root}: set FEDMEDCLIP_DATA or place the team's shared/ "
            "beside the checkout"
        )
    return root


@pytest.fixture(scope="session")
def backbone():
    """The offline default backbone on the CPU, built once for the whole suite."""
    from shared.backbone import load_backbone

    return load_backbone(device="cpu")


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One feature cache for the session, so each real image is encoded once per test run."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def four_hospitals(brain_tumor_root, feature_cache):
    """A small simulation to compare backends on: 4 hospitals on 80 real images, 3 rounds, on the CPU."""
    from shared.simulation import SimConfig

    return SimConfig(
        data_root=str(brain_tumor_root),
        per_class=20,
        n_hospitals=4,
        rounds=3,
        cache_dir=str(feature_cache),
        device="cpu",
        progress=False,
    )


# --------------------------------------------------------------------------- the small federation
# (tests/services_support.py: its size, how its processes start, how a report is compared)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """mTLS for every process of the small federation; 'intruder' holds a valid certificate but another backbone."""
    from tests.services_support import ALL_NODES, provision_pki

    return provision_pki(tmp_path_factory.mktemp("pki"), ALL_NODES + ["intruder"])


@pytest.fixture(scope="session")
def partition_dir(tmp_path_factory, brain_tumor_root) -> Path:
    """The small federation's partition, written by ``python -m hospital_node partition``."""
    from tests.services_support import HOSPITALS, PER_CLASS, service_env

    out = tmp_path_factory.mktemp("partition")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hospital_node",
            "partition",
            "--data",
            str(brain_tumor_root),
            "--hospitals",
            str(HOSPITALS),
            "--alpha",
            "0.5",
            "--seed",
            "0",
            "--per-class",
            str(PER_CLASS),
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=service_env(),
        check=True,
        timeout=300,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def reference(brain_tumor_root, feature_cache) -> dict:
    """The in-process simulation with the small federation's seed and partition (also fills the feature cache)."""
    from tests.services_support import small_simulation

    return small_simulation(brain_tumor_root, feature_cache)
