"""``fedmedclip node run`` (also ``python -m hospital_node run``): the hospital node daemon.

It caches its images' features, registers with the aggregator, then trains, uploads and evaluates
every round. ``python -m hospital_node predict`` and ``python -m hospital_node partition`` are kept as
aliases of ``fedmedclip predict`` and ``fedmedclip partition``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from hospital_node import preflight
from hospital_node.config import ENV_PREFIX, NodeConfig
from shared.ops.command import Command, main_for
from shared.ops.config import ConfigError
from shared.ops.exitcodes import ExitCode
from shared.ops.lifecycle import Shutdown
from shared.ops.lock import DaemonLock

log = logging.getLogger("fedmedclip.node")


def _run(cfg: NodeConfig, args: argparse.Namespace) -> int:
    if args.eval_only:
        cfg = replace(cfg, role="evaluator")
    if not cfg.data:
        raise ConfigError("data: set the hospital's images (an ImageFolder or a CSV manifest path,label[,split])")
    from shared.wire.tls import load_material

    tls = load_material(
        f"node {cfg.node_id}", cfg.aggregator, insecure=cfg.insecure, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key
    )  # refuses to start without certificates or --insecure
    if cfg.audit_pub:  # the key that checks every receipt: a bad path stops the node now, not after encoding
        from shared.audit import PublicKey

        PublicKey.from_file(cfg.audit_pub)
    checks = preflight.require(cfg)  # seconds, before minutes of encoding; raises on a problem
    for check in checks:
        log.info("preflight %s: %s %s", check.name, check.status.value, check.detail)
    with DaemonLock(cfg.state_dir, "node"):  # one node per state folder
        return _serve(cfg, tls, preflight.listing(checks))


def _serve(cfg: NodeConfig, tls, data) -> int:
    from hospital_node.client import NodeStatus, NodeStopped, load_setup, run_node  # torch: after the cheap checks
    from shared.ops.telemetry import Telemetry, serve_metrics

    telemetry = Telemetry("hospital_node")
    status = NodeStatus(cfg.node_id)
    server, port = serve_metrics(telemetry, cfg.metrics_port, cfg.metrics_addr, health=status.health)
    log.info("%s: metrics on :%d/metrics, health on :%d/healthz", cfg.node_id, port, port)
    try:
        with Shutdown(interrupt=NodeStopped) as shutdown:
            try:
                setup = load_setup(
                    cfg, data
                )  # seconds: then ask the aggregator whether it would admit us, before encoding
                check = preflight.check_registration(cfg, setup, tls)
                log.info("preflight %s: %s %s", check.name, check.status.value, check.detail)
                if check.status is preflight.Status.PROBLEM:
                    raise preflight.PreflightError(f"{check.name}: {check.detail} (fix: {check.fix})")
                return run_node(cfg, shutdown.event, telemetry, tls, status, setup)
            except NodeStopped:  # a signal unwound a blocking call; every step already saved its state
                return ExitCode.OK
    finally:
        status.set(phase="stopped")
        server.shutdown()


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="held-out hospital: evaluate every global, never train (same as role: evaluator)",
    )


RUN = Command(
    name="run",
    help="run the node daemon",
    run=_run,
    config=NodeConfig,
    env_prefix=ENV_PREFIX,
    arguments=_run_arguments,
    description=__doc__.split("\n\n")[0],
)
COMMAND = Command(
    name="node",
    help="a hospital node",
    subcommands=(RUN, preflight.CHECK),
    default_subcommand="run",
    description="A hospital node: `node run` is the daemon, `node check` checks its set-up.",
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        from hospital_node.predict import PREDICT

        return main_for(PREDICT, argv[1:], "python -m hospital_node predict")
    if argv[:1] == ["partition"]:
        from hospital_node.data import PARTITION

        return main_for(PARTITION, argv[1:], "python -m hospital_node partition")
    return main_for(COMMAND, argv, "python -m hospital_node")


if __name__ == "__main__":
    raise SystemExit(main())
