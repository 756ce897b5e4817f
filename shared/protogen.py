"""Compile ``protos/`` into ``shared/proto/`` with grpcio-tools (``make protos``; never edit the output).

The proto path is mapped as ``shared/proto=protos`` so the generated modules import each other as
``shared.proto.fedmedclip.v1...``; the protobuf package stays ``fedmedclip.v1``.
``python -m shared.protogen [--out DIR]`` writes below DIR (default: the repository root).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED = REPO_ROOT / "shared" / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path | str = REPO_ROOT) -> list[Path]:
    """Run protoc; returns the generated files (paths below ``out_root``)."""
    from grpc_tools import protoc

    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    files = [f"shared/proto/{p.relative_to(PROTO_ROOT).as_posix()}" for p in proto_files()]
    args = ["grpc_tools.protoc", f"--proto_path=shared/proto={PROTO_ROOT}", f"--python_out={out}",
            f"--grpc_python_out={out}", f"--pyi_out={out}", *files]
    import os

    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # protoc resolves the virtual paths of the inputs from here
    try:
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return sorted((out / "shared" / "proto").rglob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.protogen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT))
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
