"""Compile ``protos/`` into ``shared/wire/proto/`` with grpcio-tools (``make protos``; never edit the output).

The proto path is mapped as ``shared/wire/proto=protos`` so the generated modules import each other
as ``shared.wire.proto.fedmedclip.v1...``; the protobuf package stays ``fedmedclip.v1``. The
``.proto`` sources are copied beside the generated code, so an installed package carries the
protocol it speaks (``importlib.resources.files("shared.wire.proto")``).
``python -m shared.wire.protogen [--out DIR]`` writes below DIR (default: the repository root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = "shared/wire/proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path | str = REPO_ROOT) -> list[Path]:
    """Run protoc and copy the sources; returns the generated files (paths below ``out_root``)."""
    from grpc_tools import protoc

    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    files = [f"{PACKAGE_DIR}/{p.relative_to(PROTO_ROOT).as_posix()}" for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PACKAGE_DIR}={PROTO_ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *files,
    ]
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # protoc resolves the virtual paths of the inputs from here
    try:
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    for source in proto_files():
        target = out / PACKAGE_DIR / source.relative_to(PROTO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    generated = out / PACKAGE_DIR
    return sorted([*generated.rglob("*_pb2*.py*"), *generated.rglob("*.proto")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.wire.protogen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT))
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
