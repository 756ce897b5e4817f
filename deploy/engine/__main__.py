"""``python -m deploy.engine COMMAND``: see deploy/engine/__init__.py (and the README, "The testbed")."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from deploy.engine.daemon import Engine, EngineError, main_status, say


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deploy.engine", description=(__import__("deploy.engine").engine.__doc__.split("\n\n")[0])
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="packages, dockerd in the background, wait until it answers (idempotent)")
    down = sub.add_parser("down", help="no container, network or volume left; dockerd stopped; host rules put back")
    down.add_argument("--purge", action="store_true", help="also delete the data root (images, build cache)")
    sub.add_parser("status", help="is the engine running, what does it hold (exit 1 when it is not running)")
    sub.add_parser("env", help="the environment line that points docker and docker-compose at this engine")
    build = sub.add_parser("build", help="engine up, then the base, project and Prometheus images")
    build.add_argument("--no-cache", action="store_true")
    build.add_argument("--torch-index-url", default="", help="torch/torchvision from this index (CUDA or CPU wheels)")
    tb = sub.add_parser("testbed", help="engine up, images, docker-compose up, the round table followed to the end")
    tb.add_argument("--per-class", type=int, default=None, help="stratified subset per class (default: all images)")
    tb.add_argument("--rounds", type=int, default=None, help="rounds (default: make demo's)")
    tb.add_argument("--data", default=None, help="the pooled ImageFolder (default: the team's brain tumor set)")
    tb.add_argument("--project", default=None, help="docker-compose project name (default fedmedclip)")
    tb.add_argument("--timeout-s", type=float, default=4 * 3600.0)
    tdown = sub.add_parser("testbed-down", help="docker-compose down -v, then the engine down")
    tdown.add_argument("--project", default=None)
    tdown.add_argument("--keep-engine", action="store_true", help="leave the engine running")
    args = p.parse_args(argv)
    engine = Engine()
    # SIGTERM unwinds like Ctrl-C, so every command cleans up what it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.cmd == "up":
            engine.up()
        elif args.cmd == "down":
            engine.down(purge=args.purge)
        elif args.cmd == "status":
            return main_status(engine)
        elif args.cmd == "env":
            print(f"export DOCKER_HOST={engine.host}")
        elif args.cmd == "build":
            from deploy.engine.images import build_all

            engine.up()
            record = build_all(engine, no_cache=args.no_cache, torch_index_url=args.torch_index_url)
            print(json.dumps(record, indent=2))
        elif args.cmd == "testbed":
            from deploy.engine.testbed import run_testbed

            return run_testbed(
                engine,
                per_class=args.per_class,
                rounds=args.rounds,
                data=args.data,
                project=args.project,
                timeout_s=args.timeout_s,
            )
        elif args.cmd == "testbed-down":
            from deploy.engine.testbed import Testbed

            if engine.running():
                Testbed(engine, project=args.project).down()
            if not args.keep_engine:
                engine.down()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
