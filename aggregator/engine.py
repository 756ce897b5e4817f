"""The aggregator's round state machine, free of gRPC (the servicer is a thin shell around it).

States: WAITING_FOR_NODES -> COLLECTING (round r, trains from global version r) -> ... ->
FINISHED after ``rounds`` aggregations, or FAILED when the quorum does not come in time.
A round closes when every registered trainer has an accepted update, or when its deadline has
passed and at least ``min_nodes`` updates are in; it fails ``quorum_timeout_s`` after the
deadline without a quorum. Closing folds nothing new: updates were folded into the streaming
average as they arrived (:func:`shared.learning.rounds.fold_update`, which validates every payload
first); closing publishes (:func:`shared.learning.rounds.publish_global`), writes the published payload
and then the checkpoint atomically, and opens the next round.

Every public method takes the lock; :meth:`RoundEngine.run` drives deadlines with
``Condition.wait(timeout)``, woken by submissions and registrations: no polling loop. Nodes that
long-poll for the next round wait on a second condition over the same lock, woken only when a round
opens or the run ends (not by each of hundreds of submissions).

Accepted updates are remembered by node, update id and SHA-256, per round (and in the checkpoint):
a retry of the same bytes gets the same answer and is never counted twice; other bytes under an
accepted id are refused.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.checkpoint import Checkpoint, CheckpointStore
from aggregator.config import AggregatorConfig
from shared import __version__
from shared.learning.aggregation import AggregationError, make_aggregator
from shared.codec import CodecError, decode_state, encode_state, payload_codec
from shared.learning.rounds import UpdateBounds, UpdateOutOfBoundsError, WireConfig, fold_update, publish_global
from shared.wire.protocol import raw_nbytes, state_digest
from shared.ops.report import build_report, render_markdown, write_report
from shared.ops.telemetry import Telemetry
from shared.learning.training import TrainConfig, build_adapter, get_method
from shared.wire.transport import sha256_hex

log = logging.getLogger("fedmedclip.aggregator")

WAITING, COLLECTING, FINISHED, FAILED = "waiting_for_nodes", "collecting", "finished", "failed"
TRAINER, EVALUATOR = "trainer", "evaluator"
MAX_SAMPLES = 10**9  # a sample count beyond this is a lie (it would weigh the average), not a hospital


class EngineError(Exception):
    """A refused request: ``code`` is a gRPC status name, ``reason`` a bounded metrics label."""

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@dataclass(frozen=True)
class Registration:
    node_id: str
    role: str
    fingerprint: str
    class_names: tuple[str, ...]
    embed_dim: int
    method: str
    initial_sha256: str
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0


@dataclass(frozen=True)
class UpdateHeader:
    run_id: str
    round_id: int
    node_id: str
    update_id: str
    codec: str
    sha256: str
    wire_bytes: int
    train: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateAck:
    update_id: str
    round_id: int
    replayed: bool
    updates_received: int


@dataclass(frozen=True)
class RoundView:
    run_id: str
    round_id: int
    global_version: int
    total_rounds: int
    phase: str
    deadline_unix_ms: int
    update_accepted: bool
    registered_trainers: int
    updates_received: int
    message: str = ""


def _reason(exc: Exception) -> str:
    """``ChecksumMismatchError`` -> ``checksum_mismatch`` (a bounded label: one per error class)."""
    name = type(exc).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class RoundEngine:
    def __init__(self, cfg: AggregatorConfig, store: CheckpointStore, telemetry: Telemetry, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.cfg, self.store, self.t = cfg, store, telemetry
        self.clock, self.wall = clock, wall
        self.wire = WireConfig(codec=cfg.codec, delta=cfg.delta, drop_masked_rows=cfg.drop_masked_rows)
        self.method = get_method(cfg.method)
        self.bounds = UpdateBounds(max_update_norm=cfg.max_update_norm, max_abs_value=cfg.max_abs_value)
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # wakes the driver (run): submissions, registrations, reports
        self._advanced = threading.Condition(lock)  # wakes long polls: a round opened or the run ended
        initial = build_adapter(self.method, cfg.embed_dim, TrainConfig(), cfg.seed).travel_state()
        self.initial_sha256 = state_digest(initial)
        self.template = {name: tuple(t.shape) for name, t in initial.items()}
        self.raw_bytes = raw_nbytes(initial)
        self.signature = {"method": cfg.method, "seed": cfg.seed, "embed_dim": cfg.embed_dim, "codec": cfg.codec,
                          "delta": cfg.delta, "drop_masked_rows": cfg.drop_masked_rows,
                          "aggregation": cfg.aggregation, "initial_sha256": self.initial_sha256}
        self.class_names: tuple[str, ...] | None = tuple(cfg.class_names) if cfg.class_names else None
        self.fingerprint: str | None = cfg.backbone_fingerprint
        self.nodes: dict[str, dict[str, Any]] = {}
        self.last_seen: dict[str, float] = {}
        self.accepted: dict[str, dict[str, dict[str, str]]] = {}  # round -> node -> {update_id, sha256}
        self.rounds_log: list[dict[str, Any]] = []
        self.reports: dict[str, dict[str, Any]] = store.load_reports()
        self.published: dict[int, bytes] = {}
        self.seen_end: set[str] = set()
        self.status_message = ""
        store.discard_torn()
        ckpt = store.load()
        if ckpt is None:
            self.run_id = uuid.uuid4().hex[:12]
            self.version = 0
            self.global_state = initial
            self.phase = WAITING
            log.info("new run %s: %d rounds, method %s, codec %s, quorum %d", self.run_id, cfg.rounds, cfg.method,
                     cfg.codec, cfg.min_nodes)
        else:
            self._restore(ckpt)
        self.round_updates: dict[str, dict[str, str]] = {}  # open round: node -> {update_id, sha256}
        self.round_bytes = {"up": 0, "up_raw": 0}
        self.aggregator = self._new_aggregator()
        self.round_opened = self.clock()
        self.deadline = 0.0
        self.reg_deadline = self.clock() + cfg.registration_timeout_s
        self.ended_at: float | None = None
        self.done = False
        if self.phase == COLLECTING:  # restored mid-run: the open round starts again, fresh deadline
            with self._cond:
                self._open_round()
        self.t.round_current.set(self.version)
        self.t.nodes_connected.set_function(self.connected_count)
        self._update_registered_gauge()

    # -- restore -----------------------------------------------------------------------------
    def _restore(self, ckpt: Checkpoint) -> None:
        changed = {k: (ckpt.signature.get(k), v) for k, v in self.signature.items() if ckpt.signature.get(k) != v}
        if changed:
            raise ValueError(f"checkpoint in {self.store.root} was made with another configuration {changed}; "
                             "use a new out_dir or the same settings")
        self.run_id = ckpt.run_id
        self.version = ckpt.version
        decoded = decode_state(ckpt.global_snapshot, sha256=None, template=self.template)
        self.global_state = decoded.tensors
        self.nodes = ckpt.nodes
        self.accepted = ckpt.accepted
        self.rounds_log = ckpt.rounds_log
        if ckpt.signature.get("class_names"):
            self.class_names = tuple(ckpt.signature["class_names"])
        self.fingerprint = ckpt.signature.get("fingerprint") or self.fingerprint
        now = self.clock()
        self.last_seen = {n: now for n in self.nodes}  # give every known node a fresh liveness window
        if self.version >= self.cfg.rounds:
            self.phase = FINISHED
        elif self._trainers():
            self.phase = COLLECTING
        else:
            self.phase = WAITING
        log.info("restored run %s at global version %d (%s), %d nodes known", self.run_id, self.version, self.phase,
                 len(self.nodes))

    # -- views -------------------------------------------------------------------------------
    def _trainers(self) -> list[str]:
        return sorted(n for n, rec in self.nodes.items() if rec["role"] == TRAINER)

    def connected_count(self) -> int:
        now = self.clock()
        with self._cond:
            return sum(1 for n in self.nodes if now - self.last_seen.get(n, -1e18) <= self.cfg.node_timeout_s)

    def _update_registered_gauge(self) -> None:
        for role in (TRAINER, EVALUATOR):
            self.t.nodes_registered.labels(role=role).set(sum(1 for r in self.nodes.values() if r["role"] == role))

    def _view(self, node_id: str | None) -> RoundView:
        deadline_ms = 0
        if self.phase == COLLECTING:
            deadline_ms = int((self.wall() + (self.deadline - self.clock())) * 1000)
        if node_id is not None and self.phase in (FINISHED, FAILED) and node_id not in self.seen_end:
            self.seen_end.add(node_id)
            self._cond.notify_all()
        accepted = node_id is not None and (node_id in self.round_updates
                                            or node_id in self.accepted.get(str(self.version), {}))
        return RoundView(run_id=self.run_id, round_id=self.version, global_version=self.version,
                         total_rounds=self.cfg.rounds, phase=self.phase, deadline_unix_ms=deadline_ms,
                         update_accepted=accepted, registered_trainers=len(self._trainers()),
                         updates_received=len(self.round_updates), message=self.status_message)

    def _check_node(self, run_id: str, node_id: str) -> dict[str, Any]:
        if run_id and run_id != self.run_id:
            raise EngineError("FAILED_PRECONDITION", "wrong_run",
                              f"run {run_id!r} is not the current run {self.run_id!r}; register again")
        rec = self.nodes.get(node_id)
        if rec is None:
            raise EngineError("UNAUTHENTICATED", "unknown_node", f"node {node_id!r} is not registered")
        self.last_seen[node_id] = self.clock()
        return rec

    # -- RPC entry points --------------------------------------------------------------------
    def register(self, reg: Registration) -> RoundView:
        with self._cond:
            if not reg.node_id or len(reg.node_id) > 64 or not re.fullmatch(r"[A-Za-z0-9_.-]+", reg.node_id):
                raise EngineError("INVALID_ARGUMENT", "bad_node_id", "node_id must be 1-64 characters [A-Za-z0-9_.-]")
            if reg.role not in (TRAINER, EVALUATOR):
                raise EngineError("INVALID_ARGUMENT", "bad_role", "role must be trainer or evaluator")
            problems = []
            if self.fingerprint is not None and reg.fingerprint != self.fingerprint:
                problems.append(f"backbone fingerprint {reg.fingerprint[:16]}... differs from the federation's "
                                f"{self.fingerprint[:16]}...")
            if self.class_names is not None and tuple(reg.class_names) != self.class_names:
                problems.append(f"label space {list(reg.class_names)} differs from the federation's "
                                f"{list(self.class_names)}")
            if reg.embed_dim != self.cfg.embed_dim:
                problems.append(f"embedding width {reg.embed_dim} differs from the federation's {self.cfg.embed_dim}")
            if reg.method != self.cfg.method:
                problems.append(f"method {reg.method!r} differs from the federation's {self.cfg.method!r}")
            elif reg.initial_sha256 != self.initial_sha256:
                problems.append("initial adapter differs from the federation's (another seed?)")
            if not all(0 <= n <= MAX_SAMPLES for n in (reg.num_train, reg.num_val, reg.num_test)):
                raise EngineError("INVALID_ARGUMENT", "bad_sample_count",
                                  f"sample counts must be in [0, {MAX_SAMPLES}]")
            if reg.role == TRAINER and reg.num_train <= 0:
                problems.append("a trainer needs at least one training sample")
            if problems:
                log.warning("refused node %s: %s", reg.node_id, "; ".join(problems))
                raise EngineError("FAILED_PRECONDITION", "registration_mismatch",
                                  f"node {reg.node_id} refused: " + "; ".join(problems))
            if self.fingerprint is None:
                self.fingerprint = reg.fingerprint
            if self.class_names is None:
                self.class_names = tuple(reg.class_names)
            known = self.nodes.get(reg.node_id)
            if known is not None and known["role"] != reg.role:
                raise EngineError("ALREADY_EXISTS", "node_id_taken",
                                  f"node id {reg.node_id} is registered as a {known['role']}")
            self.nodes[reg.node_id] = {"role": reg.role, "num_train": reg.num_train, "num_val": reg.num_val,
                                       "num_test": reg.num_test}
            self.last_seen[reg.node_id] = self.clock()
            self._update_registered_gauge()
            if len(self.nodes) > self.cfg.max_workers - 4:
                log.warning("%d nodes and max_workers %d: every node waiting for a round holds a worker thread; "
                            "raise max_workers", len(self.nodes), self.cfg.max_workers)
            log.info("%s %s (%s, %d train / %d val / %d test samples)",
                     "re-registered" if known else "registered", reg.node_id, reg.role, reg.num_train, reg.num_val,
                     reg.num_test)
            self._cond.notify_all()
            return self._view(reg.node_id)

    def heartbeat(self, run_id: str, node_id: str) -> RoundView:
        with self._cond:
            self._check_node(run_id, node_id)
            return self._view(node_id)

    def round_view(self, run_id: str, node_id: str, wait_for_round: int = 0, max_wait_s: float = 0.0) -> RoundView:
        """The current round; waits (at most ``max_wait_s``) while round ``wait_for_round`` is not open."""
        with self._cond:
            self._check_node(run_id, node_id)
            end = self.clock() + max(0.0, min(max_wait_s, 60.0))
            while ((self.version < wait_for_round or self.phase == WAITING) and self.phase not in (FINISHED, FAILED)
                   and not self.done and self.clock() < end):
                self._advanced.wait(timeout=end - self.clock())
            return self._view(node_id)

    def published_global(self, run_id: str, node_id: str, version: int) -> tuple[bytes, str]:
        """The payload of global ``version`` as published (encoded against version - 1)."""
        with self._cond:
            self._check_node(run_id, node_id)
            if version < 1 or version > self.version:
                raise EngineError("FAILED_PRECONDITION", "no_such_version",
                                  f"global version {version} does not exist (current {self.version}; version 0 is "
                                  "the seeded initial adapter every node builds itself)")
            data = self.published.get(version)
            if data is None:
                data = self.store.load_published(version)
                if data is None:
                    raise EngineError("NOT_FOUND", "missing_version", f"published global {version} is missing")
                self.published[version] = data
        return data, sha256_hex(data)

    def submit(self, header: UpdateHeader, payload: bytes) -> UpdateAck:
        with self._cond:
            rec = self._check_node(header.run_id, header.node_id)
            for rnd, by_node in [*self.accepted.items(), (str(self.version), self.round_updates)]:
                entry = by_node.get(header.node_id)
                if entry is not None and entry["update_id"] == header.update_id:  # a retry
                    if entry["sha256"] != header.sha256:
                        raise EngineError("ALREADY_EXISTS", "conflicting_replay",
                                          f"update {header.update_id} was accepted with other content")
                    return UpdateAck(header.update_id, int(rnd), True, len(by_node))
            if rec["role"] != TRAINER:
                raise EngineError("PERMISSION_DENIED", "not_trainer", f"{header.node_id} is an evaluator")
            if self.phase != COLLECTING:
                raise EngineError("FAILED_PRECONDITION", "round_not_open", f"no round is open ({self.phase})")
            if header.round_id < self.version:
                raise EngineError("FAILED_PRECONDITION", "stale_round",
                                  f"round {header.round_id} is closed; round {self.version} is open")
            if header.round_id > self.version:
                raise EngineError("FAILED_PRECONDITION", "future_round",
                                  f"round {header.round_id} is not open yet; round {self.version} is open")
            if header.node_id in self.round_updates:
                raise EngineError("ALREADY_EXISTS", "conflicting_update",
                                  f"{header.node_id} already has update "
                                  f"{self.round_updates[header.node_id]['update_id']} "
                                  f"in round {self.version}")
            if not header.update_id or len(header.update_id) > 128:
                raise EngineError("INVALID_ARGUMENT", "bad_update_id", "update_id must be 1-128 characters")
            try:
                if payload_codec(payload) != header.codec:
                    raise EngineError("INVALID_ARGUMENT", "codec_mismatch",
                                      f"header says codec {header.codec!r}, the payload another")
                t0 = time.perf_counter()
                with self.t.codec_seconds.labels(operation="decode").time():
                    fold_update(self.aggregator, payload, header.sha256, self.global_state, int(rec["num_train"]),
                                self.wire, self.bounds)
                self.t.aggregate_seconds.labels(step="fold").observe(time.perf_counter() - t0)
            except (CodecError, UpdateOutOfBoundsError) as exc:
                raise EngineError("INVALID_ARGUMENT", _reason(exc), f"payload refused: {exc}") from exc
            except AggregationError as exc:
                raise EngineError("INVALID_ARGUMENT", "aggregation", f"update refused: {exc}") from exc
            self.round_updates[header.node_id] = {"update_id": header.update_id, "sha256": header.sha256}
            self.round_bytes["up"] += len(payload)
            self.round_bytes["up_raw"] += self.raw_bytes
            self.t.updates_accepted.inc()
            log.info("round %d: update %s from %s (%d bytes, loss %.4f), %d/%d in", self.version + 1, header.update_id,
                     header.node_id, len(payload), header.train.get("loss", float("nan")), len(self.round_updates),
                     len(self._trainers()))
            self._cond.notify_all()
            return UpdateAck(header.update_id, self.version, False, len(self.round_updates))

    def report(self, run_id: str, node_id: str, version: int, report_id: str, val: dict | None, test: dict | None,
               head: str, train: dict | None = None) -> bool:
        """Store a node's evaluation of global ``version``; returns True when it is a replay."""
        with self._cond:
            rec = self._check_node(run_id, node_id)
            if version < 1 or version > self.version:
                raise EngineError("FAILED_PRECONDITION", "no_such_version",
                                  f"metrics for global version {version}, current is {self.version}")
            by_node = self.reports.setdefault(str(version), {})
            old = by_node.get(node_id)
            if old is not None and old.get("report_id") == report_id:
                return True
            by_node[node_id] = {"report_id": report_id, "role": rec["role"], "head": head, "val": val, "test": test,
                                "train": train or {}}
            self.store.save_reports(self.reports)
            if version == self.cfg.rounds and all(n in by_node for n in self.nodes):
                self.write_report()  # the final evaluations are in: the report is complete
            shown = val if rec["role"] == TRAINER else test
            if shown is not None:
                self.t.validation_accuracy.labels(node=node_id).set(shown["accuracy"])
            self._cond.notify_all()
            return False

    # -- the state machine -------------------------------------------------------------------
    def _new_aggregator(self):
        return make_aggregator(self.cfg.aggregation, trim_ratio=self.cfg.trim_ratio)

    def _open_round(self) -> None:
        self.phase = COLLECTING
        self.round_updates = {}
        self.round_bytes = {"up": 0, "up_raw": 0}
        self.aggregator = self._new_aggregator()
        self.round_opened = self.clock()
        self.deadline = self.round_opened + self.cfg.round_timeout_s
        self.t.round_current.set(self.version)
        self._advanced.notify_all()
        log.info("round %d/%d open: %d trainers registered, deadline in %.0fs", self.version + 1, self.cfg.rounds,
                 len(self._trainers()), self.cfg.round_timeout_s)

    def _close_round(self) -> None:
        r = self.version
        t0 = time.perf_counter()
        payload, decoded = publish_global(self.aggregator, self.global_state, self.wire)
        self.t.aggregate_seconds.labels(step="publish").observe(time.perf_counter() - t0)
        snapshot = encode_state(decoded, codec="fp32")  # lossless copy for the checkpoint
        self.store.save_published(r + 1, payload.data)
        self.published[r + 1] = payload.data
        self.accepted[str(r)] = dict(self.round_updates)
        seconds = self.clock() - self.round_opened
        n_trainers = len(self._trainers())
        self.rounds_log.append({"round": r + 1, "updates": len(self.round_updates),
                                "nodes": sorted(self.round_updates), "seconds": seconds,
                                "bytes_up": self.round_bytes["up"], "bytes_up_raw": self.round_bytes["up_raw"],
                                "bytes_down": payload.wire_nbytes * n_trainers,
                                "bytes_down_raw": payload.raw_nbytes * n_trainers,
                                "global_wire_bytes": payload.wire_nbytes})
        self.version = r + 1
        self.global_state = decoded
        status = "finished" if self.version >= self.cfg.rounds else "running"
        t0 = time.perf_counter()
        self.store.save(Checkpoint(run_id=self.run_id, version=self.version, global_snapshot=snapshot.data,
                                   signature=self._signature_now(), nodes=self.nodes, accepted=self.accepted,
                                   rounds_log=self.rounds_log, status=status))
        self.t.aggregate_seconds.labels(step="checkpoint").observe(time.perf_counter() - t0)
        self.t.round_seconds.observe(seconds)
        log.info("round %d/%d closed: %d updates, up %.1f KB, global %.1f KB, %.3fs", r + 1, self.cfg.rounds,
                 len(self.round_updates), self.round_bytes["up"] / 1e3, payload.wire_nbytes / 1e3, seconds)
        self.round_updates = {}
        self.t.round_current.set(self.version)
        self.write_report()

    def _signature_now(self) -> dict[str, Any]:
        return self.signature | {"class_names": list(self.class_names or ()), "fingerprint": self.fingerprint}

    def _end(self, phase: str, message: str) -> None:
        self.phase = phase
        self.status_message = message
        self.ended_at = self.clock()
        (log.info if phase == FINISHED else log.error)("run %s %s: %s", self.run_id, phase, message)
        self._cond.notify_all()
        self._advanced.notify_all()

    def _final_reports_in(self) -> bool:
        if self.phase == FINISHED:
            final = self.reports.get(str(self.version), {})
            return all(n in final for n in self.nodes)
        return all(n in self.seen_end for n in self.nodes)

    def step(self) -> float | None:
        """Advance the state machine once; seconds until it needs to look again, None when done."""
        with self._cond:
            return self._step()

    def _step(self) -> float | None:
        now = self.clock()
        cfg = self.cfg
        if self.phase == WAITING:
            n = len(self._trainers())
            if n >= cfg.min_nodes:
                self._open_round()
                return cfg.round_timeout_s
            if now >= self.reg_deadline:
                self._end(FAILED, f"only {n} of {cfg.min_nodes} trainers registered within "
                          f"{cfg.registration_timeout_s:.0f}s")
                return 0.0
            return self.reg_deadline - now
        if self.phase == COLLECTING:
            got = set(self.round_updates)
            everyone = bool(got) and set(self._trainers()) <= got
            if everyone or (now >= self.deadline and len(got) >= cfg.min_nodes):
                if not everyone:
                    log.warning("round %d: deadline passed, closing with %d of %d trainers (%s missing)",
                                self.version + 1, len(got), len(self._trainers()),
                                sorted(set(self._trainers()) - got))
                self._close_round()
                if self.version >= cfg.rounds:
                    self._end(FINISHED, f"{cfg.rounds} rounds done")
                    return 0.0
                self._open_round()
                self._cond.notify_all()
                return cfg.round_timeout_s
            if now >= self.deadline + cfg.quorum_timeout_s:
                self._end(FAILED, f"round {self.version + 1}: {len(got)} of the quorum of {cfg.min_nodes} updates "
                          f"{cfg.round_timeout_s + cfg.quorum_timeout_s:.0f}s after it opened")
                return 0.0
            return (self.deadline if now < self.deadline else self.deadline + cfg.quorum_timeout_s) - now
        # FINISHED or FAILED: serve the last global and collect final reports, for a bounded time
        if self.ended_at is None:
            self.ended_at = now
        if self._final_reports_in() or now >= self.ended_at + cfg.linger_s:
            self.done = True
            self._cond.notify_all()
            self._advanced.notify_all()
            return None
        return self.ended_at + cfg.linger_s - now

    def run(self, stop: threading.Event) -> None:
        """Drive the state machine until done or ``stop`` is set (wake-ups: notify or deadline)."""
        with self._cond:
            while not stop.is_set():
                timeout = self._step()
                if timeout is None:
                    break
                if timeout > 0:
                    self._cond.wait(timeout=timeout)

    def stop(self, stop: threading.Event) -> None:
        """Set ``stop`` and wake :meth:`run` and every waiting RPC."""
        with self._cond:
            stop.set()
            self.done = True
            self._cond.notify_all()
            self._advanced.notify_all()

    # -- report ------------------------------------------------------------------------------
    def report_dict(self) -> dict[str, Any]:
        with self._cond:
            return build_report(run_id=self.run_id, phase=self.phase, message=self.status_message,
                                method=self.cfg.method, rounds=self.cfg.rounds, nodes=self.nodes,
                                reports=self.reports, rounds_log=self.rounds_log,
                                extra={"codec": self.cfg.codec, "aggregation": self.cfg.aggregation,
                                       "min_nodes": self.cfg.min_nodes, "seed": self.cfg.seed,
                                       "class_names": list(self.class_names or ()),
                                       "backbone_fingerprint": self.fingerprint, "version": __version__,
                                       "global_version": self.version})

    def write_report(self) -> None:
        write_report(self.report_dict(), Path(self.cfg.out_dir))

    def markdown(self) -> str:
        return render_markdown(self.report_dict())
