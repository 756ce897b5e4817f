"""``fedmedclip``: the one command. ``fedmedclip COMMAND --help`` describes each subcommand.

The table below is the only place that knows every command; each lives beside the code it runs and
is imported only when asked for, so ``fedmedclip --help`` is instant and ``fedmedclip provision``
never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from shared import __version__
from shared.ops.command import Command, configure_parser, run_parsed, with_default_subcommand
from shared.ops.exitcodes import describe

# name -> (one line of help, "module:attribute" of its Command)
COMMANDS: dict[str, tuple[str, str]] = {
    "aggregator": ("run the aggregator daemon (the federation's server)", "aggregator.__main__:COMMAND"),
    "node": ("run a hospital node daemon (node run)", "hospital_node.__main__:COMMAND"),
    "provision": ("make a federation's CA, certificates and per-party configs (mTLS)", "aggregator.provision:COMMAND"),
    "partition": (
        "split a pooled ImageFolder into per-hospital manifests (a simulated federation)",
        "hospital_node.data:PARTITION",
    ),
    "encode": ("build a node's feature cache ahead of time (the slow, one-off part)", "hospital_node.predict:ENCODE"),
    "simulate": ("run a whole federation in one process and write its report", "shared.simulation:COMMAND"),
    "predict": ("classify a folder of images with this hospital's model, write a CSV", "hospital_node.predict:PREDICT"),
    "audit": ("verify or show the aggregator's signed audit log, and receipts against it", "shared.audit:COMMAND"),
}


def load_command(name: str) -> Command:
    module, attr = COMMANDS[name][1].split(":")
    return getattr(importlib.import_module(module), attr)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``selected``'s own arguments are loaded (the others are listed by name)."""
    parser = argparse.ArgumentParser(
        prog="fedmedclip",
        description="FedMedCLIP: federated medical image "
        "classification with frozen CLIP encoders and a shared adapter.",
        epilog=describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedmedclip {__version__}")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    for name, (help_text, _) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text)
        if name == selected:
            configure_parser(child, load_command(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and argv[0] in COMMANDS else None
    if selected is not None:
        cmd = load_command(selected)
        if cmd.subcommands:
            argv = [selected, *with_default_subcommand(cmd, argv[1:])]
    args = build_parser(selected).parse_args(argv)
    return run_parsed(args)


if __name__ == "__main__":
    raise SystemExit(main())
