"""The shape every ``fedmedclip`` subcommand shares: one config dataclass, one way to read it, one exit table.

A :class:`Command` names its config dataclass (read as defaults < YAML ``--config`` files <
``<env_prefix>*`` environment < flags, unknown keys refused; :mod:`shared.ops.config`), a function
that runs it, and optionally extra non-config arguments or nested subcommands. :func:`run_parsed`
sets up logging, reads the config and maps errors to :class:`~shared.ops.exitcodes.ExitCode`: a
user error (every :class:`~shared.errors.FedMedCLIPError`) ends in one line on stderr and exit 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import FedMedCLIPError
from shared.ops.config import ConfigError, add_config_flags, load_config
from shared.ops.exitcodes import ExitCode, describe
from shared.ops.logs import default_level, setup_logging

log = logging.getLogger("fedmedclip")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[Any, argparse.Namespace], int] | None = None  # (config, parsed arguments) -> exit code
    config: type | None = None  # the settings dataclass
    env_prefix: str = ""  # e.g. FEDMEDCLIP_NODE_
    arguments: Callable[[argparse.ArgumentParser], None] | None = None  # arguments that are not settings
    description: str = ""
    subcommands: tuple[Command, ...] = field(default_factory=tuple)
    default_subcommand: str | None = None  # `fedmedclip node --config x` means `fedmedclip node run --config x`


def configure_parser(parser: argparse.ArgumentParser, cmd: Command) -> None:
    """Add ``cmd``'s arguments (or its subcommands) to ``parser``."""
    parser.description = cmd.description or cmd.help
    parser.epilog = describe()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if cmd.subcommands:
        sub = parser.add_subparsers(dest=f"{cmd.name}_command", metavar="COMMAND", required=True)
        for child in cmd.subcommands:
            configure_parser(sub.add_parser(child.name, help=child.help), child)
        return
    parser.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default: $FEDMEDCLIP_LOG_LEVEL, else INFO)"
    )
    if cmd.config is not None:
        parser.add_argument(
            "--config",
            action="append",
            metavar="YAML",
            help="settings file (repeatable: later files override earlier ones; default "
            f"${cmd.env_prefix}CONFIG); the environment ({cmd.env_prefix}<KEY>) overrides "
            "files and flags override both",
        )
    if cmd.arguments is not None:
        cmd.arguments(parser)
    if cmd.config is not None:
        add_config_flags(parser, cmd.config)
    parser.set_defaults(command=cmd)


def with_default_subcommand(cmd: Command, argv: Sequence[str]) -> list[str]:
    """Insert ``cmd.default_subcommand`` when ``argv`` names none (and asks for no help)."""
    argv = list(argv)
    names = {c.name for c in cmd.subcommands}
    if cmd.default_subcommand and (not argv or (argv[0] not in names and argv[0] not in ("-h", "--help"))):
        return [cmd.default_subcommand, *argv]
    return argv


def read_config(cmd: Command, args: argparse.Namespace) -> Any:
    import os

    if cmd.config is None:
        return None
    return load_config(
        cmd.config,
        yaml_path=args.config or os.environ.get(cmd.env_prefix + "CONFIG"),
        env_prefix=cmd.env_prefix,
        flags=args,
    )


def run_parsed(args: argparse.Namespace) -> int:
    """Run the command ``args`` was parsed for; the exit code."""
    cmd: Command = args.command
    try:
        setup_logging(args.log_level or default_level())
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        return int(cmd.run(read_config(cmd, args), args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except FedMedCLIPError as exc:  # bad input: a missing folder, an unreadable image, a foreign checkpoint...
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"error: {exc.strerror or exc}: another process holds the port ({exc}); choose another port "
                "or stop the other process",
                file=sys.stderr,
            )
            return ExitCode.USAGE
        log.exception("%s failed: %s", cmd.name, exc)
        return ExitCode.FAILED
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: the daemon's last word, then exit 1
        log.exception("%s failed: %s", cmd.name, exc)
        return ExitCode.FAILED


def main_for(cmd: Command, argv: Sequence[str] | None, prog: str) -> int:
    """A stand-alone entry point for one command (``python -m aggregator``, ``python -m hospital_node``)."""
    parser = argparse.ArgumentParser(prog=prog)
    configure_parser(parser, cmd)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(with_default_subcommand(cmd, argv) if cmd.subcommands else list(argv))
    return run_parsed(args)
