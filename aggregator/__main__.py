"""``python -m aggregator [--config aggregator.yaml] [--rounds 20 ...]``: run the aggregator service."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aggregator.config import ENV_PREFIX, AggregatorConfig
from shared.service_config import ConfigError, add_config_flags, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggregator", description="FedMedCLIP aggregator service")
    parser.add_argument("--config", default=os.environ.get(ENV_PREFIX + "CONFIG"), help="YAML file")
    parser.add_argument("--log-level", default=os.environ.get("FEDMEDCLIP_LOG_LEVEL", "INFO"))
    add_config_flags(parser, AggregatorConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(AggregatorConfig, yaml_path=args.config, env_prefix=ENV_PREFIX, flags=args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    from aggregator.service import serve  # imports torch; after the cheap checks

    return serve(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
