"""``fedmedclip aggregator`` (also ``python -m aggregator``): run the aggregator daemon.

``python -m aggregator provision ...`` is kept as an alias of ``fedmedclip provision``.
"""

from __future__ import annotations

import argparse
import os
import sys

from aggregator.config import ENV_PREFIX, AggregatorConfig
from shared.ops.command import Command, main_for
from shared.ops.lock import DaemonLock


def _serve(cfg: AggregatorConfig, _args: argparse.Namespace) -> int:
    # gRPC core names a failed TLS handshake's peer only in its handshaker trace, read when grpc is first
    # imported (nothing has imported it yet here); aggregator.limits.HandshakeFailures consumes those lines
    traces = [t for t in os.environ.get("GRPC_TRACE", "").split(",") if t.strip()]
    if not {"handshaker", "all"} & set(traces):
        os.environ["GRPC_TRACE"] = ",".join([*traces, "handshaker"])
    from aggregator.service import serve  # imports torch: after the cheap checks

    with DaemonLock(cfg.out_dir, "aggregator"):  # one aggregator per output folder
        return serve(cfg)


COMMAND = Command(
    name="aggregator",
    help="run the aggregator daemon",
    run=_serve,
    config=AggregatorConfig,
    env_prefix=ENV_PREFIX,
    description="Run the FedMedCLIP aggregator: it admits the allow-listed hospitals (mTLS), opens rounds, "
    "averages their adapter updates and publishes each global, until the run ends or SIGTERM.",
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["provision"]:
        from aggregator.provision import COMMAND as PROVISION

        return main_for(PROVISION, argv[1:], "python -m aggregator provision")
    return main_for(COMMAND, argv, "python -m aggregator")


if __name__ == "__main__":
    raise SystemExit(main())
