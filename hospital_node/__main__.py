"""``python -m hospital_node {run,predict,partition}``.

run        the node daemon: cache features, register, then train/upload/evaluate every round
predict    classify a folder of images with this hospital's ensemble, write a CSV
partition  split a pooled ImageFolder into per-hospital manifests (the simulation's partition)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from hospital_node.config import ENV_PREFIX, NodeConfig
from shared.errors import FedMedCLIPError
from shared.ops.config import ConfigError, add_config_flags, load_config


def _config(args: argparse.Namespace) -> NodeConfig:
    cfg = load_config(NodeConfig, yaml_path=args.config or os.environ.get(ENV_PREFIX + "CONFIG"),
                      env_prefix=ENV_PREFIX, flags=args)
    if getattr(args, "eval_only", False):
        from dataclasses import replace

        cfg = replace(cfg, role="evaluator")
    return cfg


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from shared.wire.tls import load_material

    tls = load_material(f"node {cfg.node_id}", cfg.aggregator, insecure=cfg.insecure, ca=cfg.tls_ca,
                        cert=cfg.tls_cert, key=cfg.tls_key)  # refuses to start without certificates or --insecure
    from hospital_node.client import run_node  # torch and the backbone: after the cheap checks
    from shared.ops.telemetry import Telemetry, serve_metrics

    telemetry = Telemetry("hospital_node")
    server, port = serve_metrics(telemetry, cfg.metrics_port, cfg.metrics_addr)
    logging.getLogger("fedmedclip.node").info("%s: metrics on :%d", cfg.node_id, port)
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        stop.set()
        from hospital_node.client import NodeStopped

        raise NodeStopped()  # unwinds a blocking call; every step already saved its state

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    try:
        code = run_node(cfg, stop, telemetry, tls)
        if not cfg.exit_when_done and not stop.is_set():
            logging.getLogger("fedmedclip.node").info("run over (exit code %d); serving metrics until SIGTERM", code)
            stop.wait()
        return code
    except Exception as exc:  # noqa: BLE001 - the daemon's last word, then a non-zero exit
        if type(exc).__name__ == "NodeStopped":
            return 0
        logging.getLogger("fedmedclip.node").exception("node %s failed: %s", cfg.node_id, exc)
        return 1
    finally:
        server.shutdown()


def _cmd_predict(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from hospital_node.predict import predict_folder

    n = predict_folder(cfg, args.images, args.out)
    print(f"{n} images classified -> {args.out}")
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from hospital_node.data import partition
    from shared.data import default_data_root

    summary = partition(args.data or default_data_root(), args.out, hospitals=args.hospitals,
                        alpha=args.alpha if args.alpha and args.alpha > 0 else None, seed=args.seed,
                        per_class=args.per_class, holdout=not args.no_holdout)
    for h in summary["hospitals"]:
        print(f"{h['name']:>12}: train {h['train']:4d}  val {h['val']:4d}  test {h['test']:4d}  "
              f"classes {h['class_counts']}  -> {h['manifest']}")
    return 0


CONFIG_HELP = f"YAML file (repeatable: later files override earlier ones; default ${ENV_PREFIX}CONFIG)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hospital_node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("FEDMEDCLIP_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node daemon")
    run.add_argument("--config", action="append", help=CONFIG_HELP)
    run.add_argument("--eval-only", action="store_true", help="held-out hospital: evaluate every global, never train")
    add_config_flags(run, NodeConfig)
    run.set_defaults(func=_cmd_run)
    pred = sub.add_parser("predict", help="classify a folder of images, write a CSV")
    pred.add_argument("--config", action="append", help=CONFIG_HELP)
    pred.add_argument("--images", required=True, help="folder of images (searched recursively)")
    pred.add_argument("--out", default="predictions.csv")
    add_config_flags(pred, NodeConfig)
    pred.set_defaults(func=_cmd_predict)
    part = sub.add_parser("partition", help="write per-hospital manifests of a simulated federation")
    part.add_argument("--data", default=None, help="pooled ImageFolder (default: the bundled brain tumor set)")
    part.add_argument("--hospitals", type=int, default=3)
    part.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew; 0 or less = iid")
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--per-class", type=int, default=None, help="stratified subset of N images per class")
    part.add_argument("--no-holdout", action="store_true", help="no held-out 'global' hospital")
    part.add_argument("--out", required=True)
    part.set_defaults(func=_cmd_partition)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except FedMedCLIPError as exc:  # bad input (a missing data folder, an unreadable image...): say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
