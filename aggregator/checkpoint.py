"""The aggregator's state on disk, written atomically (temp file, fsync, os.replace, fsync dir).

Layout under ``<out_dir>/checkpoint/``:

* ``state.npz``: ``meta`` (UTF-8 JSON: run id, global version, config signature, registered
  nodes, accepted update ids per round, bytes per round) and ``global`` (the current global
  adapter as a lossless fp32 codec payload). No pickle.
* ``globals/v000001.fmcs`` ...: every published global payload, as it went on the wire; a node
  that holds version v-1 decodes version v from it, so these are kept for nodes that fall behind.
* ``reports.json``: every evaluation a node reported, by version.

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
    changed = [f"{key} {_short(saved.get(key))} -> {_short(value)}" for key, value in current.items()
               if saved.get(key) != value]
    if changed:
        raise CheckpointMismatchError(f"the checkpoint in {root} was made with other settings "
                                      f"({', '.join(changed)}); use a new out_dir or the original settings")


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
        self.reports_path = self.root / "reports.json"
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
            raise CheckpointError(f"the checkpoint {self.state_path} cannot be read ({exc}); "
                                  "use a new out_dir or move it away") from exc

    def save(self, ckpt: Checkpoint) -> None:
        meta = {k: v for k, v in ckpt.__dict__.items() if k != "global_snapshot"}
        buf = _npz_bytes(meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
                         **{"global": np.frombuffer(ckpt.global_snapshot, dtype=np.uint8)})
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
        if not self.reports_path.exists():
            return {}
        return json.loads(self.reports_path.read_text(encoding="utf-8"))

    def save_reports(self, reports: dict[str, dict[str, Any]]) -> None:
        # metrics, not model state: never torn, but not fsynced (10 ms each, several per round)
        atomic_write(self.reports_path, json.dumps(reports, allow_nan=True).encode("utf-8"), durable=False)


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
