"""Write ``docs/configuration.md``: every setting of every ``fedmedclip`` command, from the code.

``python -m shared.ops.configdoc`` (``make docs``) regenerates it; a test fails when it is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from shared.cli import COMMANDS, load_command
from shared.ops.command import Command
from shared.ops.config import field_help

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _type_name(tp: object) -> str:
    text = str(tp).replace("typing.", "").replace(" | ", " or ")
    return getattr(tp, "__name__", text) if not typing.get_args(tp) else text


def _leaves(cmd: Command, prefix: str) -> list[tuple[str, Command]]:
    if cmd.subcommands:
        return [leaf for child in cmd.subcommands for leaf in _leaves(child, f"{prefix} {child.name}")]
    return [(prefix, cmd)]


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the code by `python -m shared.ops.configdoc`; do not edit by hand.",
        "",
        "Every command reads its settings the same way: defaults, then YAML files (`--config`, repeatable, "
        "later files win), then environment variables (`<PREFIX><KEY>`, upper case), then flags "
        "(`--key-name`). Unknown keys in a file and unknown variables with the command's prefix are refused. "
        "Lists are comma-separated in the environment and in flags; booleans accept true/false, 1/0, yes/no, "
        "on/off. Relative paths in a YAML file are relative to that file.",
        "",
    ]
    seen: dict[type, str] = {}
    for name in COMMANDS:
        for title, cmd in _leaves(load_command(name), f"fedmedclip {name}"):
            if cmd.config is None:
                continue
            lines += [f"## `{title}`", "", cmd.help[:1].upper() + cmd.help[1:] + ".", ""]
            if cmd.config in seen:
                lines += [f"The same settings as `{seen[cmd.config]}` (environment prefix `{cmd.env_prefix}`).", ""]
                continue
            seen[cmd.config] = title
            lines += [
                f"Environment prefix `{cmd.env_prefix}`; settings file `--config` or `${cmd.env_prefix}CONFIG`.",
                "",
                "| key | type | default | description |",
                "|---|---|---|---|",
            ]
            helps = field_help(cmd.config)
            hints = typing.get_type_hints(cmd.config)
            defaults = cmd.config()
            for f in dataclasses.fields(cmd.config):
                default = getattr(defaults, f.name)
                desc = helps[f.name].replace("|", "\\|")
                lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{default!r}` | {desc} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.ops.configdoc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DOC))
    args = parser.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(), encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
