"""The house: the learning core and the data pipeline never import gRPC; the package installs as one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(
    ".".join(p.relative_to(REPO_ROOT).with_suffix("").parts)
    for folder in ("shared/learning", "shared/data")
    for p in (REPO_ROOT / folder).glob("*.py")
) + ["shared.codec", "shared.backbone", "shared.errors", "shared.simulation"]


def test_learning_and_data_never_import_grpc():
    """One fresh interpreter imports the whole core; a module that pulls in gRPC is named."""
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        "    bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'grpc_', 'google.rpc')))\n"
        "    if bad:\n"
        "        print(name, bad[:5]); sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout.strip()} {done.stderr[-500:]}"


def test_the_package_ships_its_protocol():
    from importlib.resources import files

    proto = files("shared.wire.proto") / "fedmedclip" / "v1" / "aggregator_service.proto"
    assert proto.is_file()
    assert proto.read_text() == (REPO_ROOT / "protos" / "fedmedclip" / "v1" / "aggregator_service.proto").read_text()
