"""The one table of exit codes every ``fedmedclip`` command uses."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # the run finished, or a clean stop on SIGTERM/SIGINT
    FAILED = 1  # the run failed (no quorum, an unexpected error: see the log)
    USAGE = 2  # bad input or configuration: a one-line message names it, no traceback
    REFUSED = 3  # the aggregator refused this node for good (its reason is logged)
    RUN_CHANGED = 4  # the aggregator started another run than the one this node's state belongs to
    AUDIT_FAILED = 5  # fedmedclip audit verify: the audit log or a receipt does not verify (the first problem is named)


def describe() -> str:
    """The table as text, for ``--help`` epilogues."""
    return "exit codes: " + ", ".join(f"{int(c)} {c.name.lower().replace('_', ' ')}" for c in ExitCode)
