"""Shared pytest fixtures for FedMedCLIP."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # lets plain `pytest` import `shared` without installing it
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def brain_tumor_root() -> Path:
    """The real brain tumor MRI set: $FEDMEDCLIP_DATA, else <repo>/../shared/data/brain-tumor-mri.

    The suite needs it; a checkout without it fails loudly instead of skipping the tests that
    matter most.
    """
    from shared.data import default_data_root

    root = default_data_root()
    if not root.is_dir():
        pytest.fail(f"brain tumor MRI set not found at {root}: set FEDMEDCLIP_DATA or place the team's shared/ beside the checkout")
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
