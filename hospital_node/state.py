"""A node's private state on disk, so a restarted node resumes where it stopped.

``<state_dir>/state.pt`` holds the learner's private state (MLP, both optimisers, batch-order RNG:
:meth:`HospitalLearner.private_state`), the last global adapter the node decoded and its version, the
round it last trained, and the update of that round until the round is closed (a restarted node re-sends
the same bytes under the same update id, which the aggregator recognises, and never trains that round
again). It is written atomically (temp file, fsync, rename) by a background thread, from a copy taken
when :meth:`StateStore.save` is called, and writes land in the order they were asked for. The save after
training waits for its write (``wait=True``) before the update is uploaded, so the update and the private
model that made it are on disk together; the snapshots and an evaluator's saves stay off the round's
critical path.

When a run ends, or the file belongs to another run, it is archived (:meth:`StateStore.archive`), never
overwritten. Read back with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary objects. It stays on the node; nothing in it goes on the wire except the pending update. A
file this code cannot read is a :class:`StateError`; a background write that failed is raised as one at
the next save or :meth:`StateStore.flush`.
"""

from __future__ import annotations

import io
import logging
import pickle
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.errors import FedMedCLIPError
from shared.ops.atomic import atomic_write

log = logging.getLogger("fedmedclip.node")

FORMAT = 1
ARCHIVE = "archive"  # <state_dir>/archive/<run_id>/state.pt: the state of each run that ended
SNAPSHOTS = "snapshots"  # beside state.pt: v<version>.pt, the model behind an evaluation (best, undecided)


class StateError(FedMedCLIPError):
    """The saved state cannot be read (another format, a damaged file): the message names the file."""


@dataclass
class PendingUpdate:
    round_id: int
    update_id: str
    payload: bytes
    sha256: str
    codec: str
    raw_bytes: int
    train: dict[str, float]


@dataclass
class NodeState:
    run_id: str
    node_id: str
    fingerprint: str
    global_version: int
    global_state: dict[str, torch.Tensor]
    learner: dict[str, Any] | None = None
    trained_round: int = -1
    evaluated_version: int = 0
    pending: PendingUpdate | None = None
    best_version: int = 0  # the run's best global as the aggregator last said (0: none yet)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Snapshot:
    """What produced a node's evaluation of one global: that global and the private model then.

    ``fedmedclip predict`` uses the snapshot of the run's best version (:attr:`NodeState.best_version`).
    """

    run_id: str
    version: int
    global_state: dict[str, torch.Tensor]
    learner: dict[str, Any] | None  # HospitalLearner.private_state() without the optimisers; None: evaluator


class _Writer:
    """One background thread that runs file operations in the order they were submitted."""

    def __init__(self) -> None:
        self.ops: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, op: Callable[[], None]) -> None:
        self.raise_error()
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
            self.thread.start()
        self.ops.put(op)

    def flush(self) -> None:
        """Wait until every submitted operation is done; raise the first one that failed."""
        self.ops.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise StateError(f"a background save of the node's state failed: {error}") from error

    def _run(self) -> None:
        while True:
            op = self.ops.get()
            try:
                op()
            except BaseException as exc:  # noqa: BLE001 (kept and raised in the node's thread)
                if self.error is None:
                    self.error = exc
                log.error("background save failed: %s", exc)
            finally:
                self.ops.task_done()


def _copy(value: Any) -> Any:
    """A copy of a state blob whose tensors the node may change while the copy is being written."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


class StateStore:
    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "state.pt"
        self.writer = _Writer()

    def flush(self) -> None:
        """Wait until every save asked for is on disk (durable); raise a :class:`StateError` if one failed."""
        self.writer.flush()

    def latest(self) -> Path | None:
        """The state a prediction should use: ``state.pt`` (a run going on), else the last run archived."""
        self.flush()
        if self.path.exists():
            return self.path
        archived = sorted((self.dir / ARCHIVE).glob("*/state*.pt"), key=lambda f: f.stat().st_mtime)
        return archived[-1] if archived else None

    def load(self, path: Path | None = None) -> NodeState | None:
        """The state in ``path`` (default ``state.pt``); None when there is none."""
        self.flush()
        path = path or self.path
        blob = _read(path)
        if blob is None:
            return None
        pending = blob.get("pending")
        return NodeState(
            run_id=blob["run_id"],
            node_id=blob["node_id"],
            fingerprint=blob["fingerprint"],
            global_version=int(blob["global_version"]),
            global_state=dict(blob["global_state"]),
            learner=blob.get("learner"),
            trained_round=int(blob["trained_round"]),
            evaluated_version=int(blob["evaluated_version"]),
            best_version=int(blob.get("best_version", 0)),
            pending=PendingUpdate(
                round_id=int(pending["round_id"]),
                update_id=pending["update_id"],
                payload=pending["payload"].numpy().tobytes(),
                sha256=pending["sha256"],
                codec=pending["codec"],
                raw_bytes=int(pending["raw_bytes"]),
                train=dict(pending["train"]),
            )
            if pending
            else None,
        )

    def save(self, state: NodeState, *, wait: bool = False) -> None:
        """Save ``state``: a copy now, written in the background (``wait``: on disk, durably, before returning)."""
        pending = None
        if state.pending is not None:
            p = state.pending
            pending = {
                "round_id": p.round_id,
                "update_id": p.update_id,
                "payload": torch.frombuffer(bytearray(p.payload), dtype=torch.uint8),
                "sha256": p.sha256,
                "codec": p.codec,
                "raw_bytes": p.raw_bytes,
                "train": p.train,
            }
        blob = {
            "format": FORMAT,
            "run_id": state.run_id,
            "node_id": state.node_id,
            "fingerprint": state.fingerprint,
            "global_version": state.global_version,
            "global_state": state.global_state,
            "learner": state.learner,
            "trained_round": state.trained_round,
            "evaluated_version": state.evaluated_version,
            "pending": pending,
            "best_version": state.best_version,
        }
        if not wait:  # the node goes on changing its tensors while the write waits its turn
            blob = _copy(blob)
        self.writer.submit(lambda: _save(blob, self.path))
        if wait:
            self.flush()

    # -- snapshots: <state_dir>/snapshots/v<version>.pt, beside the state they belong to ------------
    def save_snapshot(self, snap: Snapshot) -> None:
        blob = {"format": FORMAT, "run_id": snap.run_id, "version": snap.version, "global_state": snap.global_state}
        blob["learner"] = snap.learner
        blob = _copy(blob)
        path = self.dir / SNAPSHOTS / f"v{snap.version}.pt"
        self.writer.submit(lambda: _save(blob, path))

    def keep_snapshots(self, keep: Callable[[int], bool]) -> None:
        """Delete every snapshot whose version ``keep`` rejects (after the writes asked for before)."""

        def prune() -> None:
            for path in (self.dir / SNAPSHOTS).glob("v*.pt"):
                version = path.stem[1:]
                if version.isdigit() and not keep(int(version)):
                    path.unlink(missing_ok=True)

        self.writer.submit(prune)

    @staticmethod
    def load_snapshot(state_path: Path, version: int) -> Snapshot | None:
        """The snapshot of ``version`` beside the state file ``state_path`` (live or archived); None if absent."""
        blob = _read(state_path.parent / SNAPSHOTS / f"v{version}.pt")
        if blob is None:
            return None
        return Snapshot(blob["run_id"], int(blob["version"]), dict(blob["global_state"]), blob.get("learner"))

    def _archive_folder(self, run_id: str) -> Path:
        return self.dir / ARCHIVE / (re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:64].lstrip(".") or "unknown-run")

    def unarchive(self, run_id: str) -> bool:
        """Put the archived state of run ``run_id`` back (a finished run continued with more rounds); True if done."""
        self.flush()
        folder = self._archive_folder(run_id)
        if self.path.exists() or not (folder / "state.pt").exists():
            return False
        (folder / "state.pt").replace(self.path)
        if (folder / SNAPSHOTS).is_dir() and not (self.dir / SNAPSHOTS).exists():
            (folder / SNAPSHOTS).replace(self.dir / SNAPSHOTS)
        log.info("state of run %s taken back from %s: the run goes on", run_id, folder)
        return True

    def archive(self, run_id: str, reason: str) -> Path | None:
        """Move the state of run ``run_id`` to ``<state_dir>/archive/<run_id>/state.pt`` (never overwritten)."""
        self.flush()
        if not self.path.exists():
            return None
        folder = self._archive_folder(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / "state.pt"
        n = 1
        while dest.exists():
            dest, n = folder / f"state.{n}.pt", n + 1
        self.path.replace(dest)
        snapshots = self.dir / SNAPSHOTS
        if snapshots.is_dir() and not (folder / SNAPSHOTS).exists():
            snapshots.replace(folder / SNAPSHOTS)  # the best round's model goes with its run
        log.info("state of run %s archived to %s: %s", run_id, dest, reason)
        return dest


def _save(blob: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(blob, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def _read(path: Path) -> dict | None:
    """A state or snapshot file as saved (tensors and plain containers only); None when there is none."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise StateError(f"{path} cannot be read ({exc}); move it away to start this node afresh") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise StateError(f"{path}: unknown state format {found!r}; move it away to start this node afresh")
    return blob
