"""The aggregator's state on disk, written atomically (temp file, fsync, os.replace, fsync dir).

Layout under ``<out_dir>/checkpoint/``:

* ``state.npz``: ``meta`` (UTF-8 JSON: run id, global version, config signature, registered
  nodes, accepted update ids per round, bytes per round) and ``global`` (the current global
  adapter as a lossless fp32 codec payload). No pickle.
* ``globals/v000001.fmcs`` ...: every published global payload, as it went on the wire; a node
  that holds version v-1 decodes version v from it, so these are kept for nodes that fall behind.
* ``reports.jsonl``: every evaluation a node reported, one strict-JSON line per report, appended as
  it arrives (a report costs one bounded line, never a rewrite of all of them; the engine keeps one
  report per node and version, each field bounded). A ``reports.json`` of an older version is read
  too, then followed by the lines.

Fault injection for the crash tests: ``FEDMEDCLIP_FAULT=die_during_checkpoint:V`` makes the process
die (``os._exit``, no clean-up) in the middle of writing the checkpoint of global version V,
leaving a torn temporary file, exactly as a power cut inside :func:`shared.ops.atomic.atomic_write`
would. The restarted aggregator resumes from the last complete checkpoint.

A checkpoint resumes only under the settings it was made with (:func:`require_same_settings`);
otherwise, or when it cannot be read, the aggregator stops with a :class:`CheckpointError`, a
configuration error: one line, no traceback, exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.ops.atomic import atomic_write
from shared.ops.config import ConfigError

log = logging.getLogger("fedmedclip.aggregator")

FAULT_ENV = "FEDMEDCLIP_FAULT"
FAULT_EXIT_CODE = 86


class CheckpointError(ConfigError):
    """The out_dir holds a checkpoint this aggregator cannot resume."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was made under other settings (method, seed, codec...) than the aggregator's now."""


def require_same_settings(root: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError`, naming every setting that differs, when ``current`` is not ``saved``."""
    changed = [
        f"{key} {_short(saved.get(key))} -> {_short(value)}"
        for key, value in current.items()
        if saved.get(key) != value
    ]
    if changed:
        raise CheckpointMismatchError(
            f"the checkpoint in {root} was made with other settings "
            f"({', '.join(changed)}); use a new out_dir or the original settings"
        )


def _short(value: Any) -> str:
    """A value for a one-line message: long strings (digests) cut to their first 12 characters."""
    return repr(value[:12] + "..." if isinstance(value, str) and len(value) > 16 else value)


@dataclass
class Checkpoint:
    run_id: str
    version: int  # aggregations done; the open round is round `version`
    global_snapshot: bytes  # fp32 codec payload of the current global (lossless)
    signature: dict[str, Any]  # what must not change between restarts
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> NodeRecord.to_dict()
    accepted: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # Ledger.to_dict()
    rounds_log: list[dict[str, Any]] = field(default_factory=list)  # bytes and seconds per round
    status: str = "running"


class CheckpointStore:
    def __init__(self, out_dir: Path | str, fault: str | None = None) -> None:
        self.root = Path(out_dir) / "checkpoint"
        self.state_path = self.root / "state.npz"
        self.globals_dir = self.root / "globals"
        self.reports_path = self.root / "reports.jsonl"
        self.legacy_reports_path = self.root / "reports.json"  # the whole table, as older versions wrote it
        self.fault = fault  # see FAULT_ENV: crash tests only

    def discard_torn(self) -> None:
        """Remove temporary files a crash left mid-write (never part of the state)."""
        for torn in self.root.glob(".*.tmp"):
            log.warning("removing %s, left by an interrupted write", torn)
            torn.unlink(missing_ok=True)

    def load(self) -> Checkpoint | None:
        if not self.state_path.exists():
            return None
        try:
            with np.load(self.state_path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                snapshot = bytes(data["global"])
            return Checkpoint(global_snapshot=snapshot, **meta)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise CheckpointError(
                f"the checkpoint {self.state_path} cannot be read ({exc}); use a new out_dir or move it away"
            ) from exc

    def save(self, ckpt: Checkpoint) -> None:
        meta = {k: v for k, v in ckpt.__dict__.items() if k != "global_snapshot"}
        buf = _npz_bytes(
            meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
            **{"global": np.frombuffer(ckpt.global_snapshot, dtype=np.uint8)},
        )
        if self.fault == f"die_during_checkpoint:{ckpt.version}":
            _die_mid_write(self.state_path, buf)
        atomic_write(self.state_path, buf)

    def published_path(self, version: int) -> Path:
        return self.globals_dir / f"v{version:06d}.fmcs"

    def save_published(self, version: int, data: bytes) -> None:
        atomic_write(self.published_path(version), data)

    def load_published(self, version: int) -> bytes | None:
        path = self.published_path(version)
        return path.read_bytes() if path.exists() else None

    def load_reports(self) -> dict[str, dict[str, Any]]:
        """``{version: {node: report}}``: the legacy table if any, then every complete line of the report log."""
        reports: dict[str, dict[str, Any]] = {}
        if self.legacy_reports_path.exists():
            reports = json.loads(self.legacy_reports_path.read_text(encoding="utf-8"))
        if not self.reports_path.exists():
            return reports
        with self.reports_path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    record = json.loads(line)
                    reports.setdefault(str(int(record["version"])), {})[str(record["node"])] = dict(record["entry"])
                except (ValueError, KeyError, TypeError):
                    # only an interrupted append can leave a bad line, the last one: that report is resent
                    log.warning("%s line %d is incomplete or damaged; skipped", self.reports_path, number)
        return reports

    def append_report(self, version: int, node: str, entry: dict[str, Any]) -> None:
        """Append one report as one strict-JSON line (metrics, not model state: flushed, not fsynced)."""
        line = (
            json.dumps(
                {"version": version, "node": node, "entry": entry}, allow_nan=False, separators=(",", ":")
            ).encode("utf-8")
            + b"\n"
        )
        self.root.mkdir(parents=True, exist_ok=True)
        with self.reports_path.open("a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:  # an append interrupted by a crash leaves no newline: end that line first
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = b"\n" + line
            handle.write(line)


def _die_mid_write(path: Path, data: bytes) -> None:
    """Fault injection: half of ``data`` in the temp file atomic_write would use, then die on the spot."""
    tmp = path.with_name(f".{path.name}.fault.tmp")
    with tmp.open("wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    log.error("FAULT INJECTED: dying while writing %s", path)
    logging.shutdown()
    os._exit(FAULT_EXIT_CODE)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
