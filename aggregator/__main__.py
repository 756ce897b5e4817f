"""``python -m aggregator [--config aggregator.yaml] [--rounds 20 ...]``: run the aggregator service.

``python -m aggregator provision --nodes hospital_1,hospital_2 --out pki``: make a federation's CA,
certificates and configs (:mod:`aggregator.provision`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aggregator.config import ENV_PREFIX, AggregatorConfig
from shared.ops.config import ConfigError, add_config_flags, load_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["provision"]:
        from aggregator.provision import main as provision

        return provision(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m aggregator", description="FedMedCLIP aggregator service")
    parser.add_argument("--config", action="append", help="YAML file (repeatable: later files override earlier "
                        f"ones; default ${ENV_PREFIX}CONFIG)")
    parser.add_argument("--log-level", default=os.environ.get("FEDMEDCLIP_LOG_LEVEL", "INFO"))
    add_config_flags(parser, AggregatorConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(AggregatorConfig, yaml_path=args.config or os.environ.get(ENV_PREFIX + "CONFIG"),
                          env_prefix=ENV_PREFIX, flags=args)
        from aggregator.service import serve  # imports torch; after the cheap checks

        return serve(cfg)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
