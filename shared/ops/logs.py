"""One logging set-up for every command: a level, one line per record, UTC-free local timestamps."""

from __future__ import annotations

import logging
import os

LOG_LEVEL_ENV = "FEDMEDCLIP_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def default_level() -> str:
    return os.environ.get(LOG_LEVEL_ENV, "INFO")


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once (again on a second call: the last level wins)."""
    level = level if level is not None else default_level()
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
        level = name
    logging.basicConfig(level=level, format=FORMAT, force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def printable(text: object, limit: int = 200) -> str:
    """A client-supplied string made safe for one log line: control characters escaped, length capped."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + f"...(+{len(s) - limit} chars)"
    return s.encode("unicode_escape", "backslashreplace").decode("ascii") if not s.isprintable() else s
