"""The aggregator's round state machine, free of gRPC calls and messages (the servicer is a thin shell around it).

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

Who may join is decided by :class:`aggregator.registry.Registry`; accepted updates are remembered
by :class:`aggregator.ledger.Ledger` (a retry of the same bytes gets the same answer and is never
counted twice; the bytes are hashed before a retry is recognised). Every refusal is an
:class:`aggregator.errors.EngineError` naming its :class:`shared.wire.reasons.Reason`.

Weights (``weighted`` rule): when a round opens, the weights of the trainers registered then are
fixed by :func:`shared.learning.aggregation.capped_weights` over their registered sample counts
(each fixed at the node's first registration, cut to ``max_samples_per_node``, no share above
``max_weight_share``); a trainer that registers while the round is open gets
:func:`shared.learning.aggregation.joiner_weight`. Every update is folded with its node's weight as
it arrives. docs/trust-model.md (section 5) states what this guarantees when nodes drop out.

One process per node id: a node registers with a session id of its process; a registration under
another session takes the node id over (a restarted node, or a second copy: logged loudly and counted
in ``fedmedclip_session_takeovers_total{node}`` when the old session was still live), and the old
session's heartbeats and round polls are refused from then on (``session_replaced``), which stops it.

Every client string is validated (ids: charset and length) or escaped
(:func:`shared.ops.logs.printable`) before it is logged; reported metrics are validated and bounded
(:meth:`RoundEngine.report`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from aggregator.checkpoint import Checkpoint, CheckpointStore, require_same_settings
from aggregator.config import AggregatorConfig
from aggregator.errors import EngineError
from aggregator.ledger import Ledger
from aggregator.registry import MAX_SAMPLES, NodeRecord, Registration, Registry, Role
from aggregator.secure import SecureRound, SecureSettings, SecureView
from shared import __version__
from shared.audit import AuditError, Entry, make_receipt, open_for_aggregator
from shared.codec import CodecError, decode_state, encode_state, payload_info
from shared.learning.aggregation import AggregationError, capped_weights, joiner_weight, make_aggregator
from shared.learning.metrics import METRIC_KEYS
from shared.learning.rounds import (
    UpdateBounds,
    UpdateOutOfBoundsError,
    WireConfig,
    fold_update,
    publish_global,
    publish_state,
)
from shared.learning.training import HEADS, TrainConfig, build_adapter, get_method
from shared.ops.logs import printable
from shared.ops.report import build_report, render_markdown, write_report
from shared.ops.telemetry import Telemetry
from shared.secagg import SecAggError, SecAggMisbehaviour
from shared.wire.protocol import raw_nbytes, state_digest
from shared.wire.reasons import Reason
from shared.wire.transport import sha256_hex

log = logging.getLogger("fedmedclip.aggregator")

#: update and report ids: what the node builds (run id, node id, round), nothing that can forge a log line
CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: the aggregator's rounds fit 32 bits (RoundInfo); a node's int64 value beyond that is not a round of this run
ROUND_ID_RANGE = range(-(2**31), 2**31)
MAX_TRAIN_SECONDS = 1e7  # a reported local training time beyond ~4 months is not one
MAX_SESSION_CHARS = 64  # a node's session id (the node sends 32 hex digits) is kept up to this length


def _number(
    value: object, what: str, *, low: float = 0.0, high: float = math.inf, nan_ok: bool = False
) -> float | None:
    """``value`` as a float in [low, high]; NaN becomes None (no value) where ``nan_ok``; anything else refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EngineError(Reason.BAD_REPORT, f"{what} is not a number")
    x = float(value)
    if math.isnan(x) and nan_ok:
        return None
    if not (math.isfinite(x) and low <= x <= high):
        raise EngineError(Reason.BAD_REPORT, f"{what} = {x!r} is outside [{low:g}, {high:g}]")
    return x


def clean_metrics(metrics: dict | None, what: str) -> dict[str, Any] | None:
    """Evaluation metrics as a node reports them, validated: ``n`` in [0, 10^9] and ``accuracy``; each of
    accuracy, balanced accuracy, macro-F1 and ECE finite in [0, 1], or NaN only for an empty split. A metric
    the node keeps to itself (``share_metrics``), or a NaN, is stored as None."""
    if metrics is None:
        return None
    if not isinstance(metrics, dict) or not {"n", "accuracy"} <= set(metrics) <= {"n", *METRIC_KEYS}:
        raise EngineError(
            Reason.BAD_REPORT, f"{what} metrics must hold n and accuracy, and may hold {', '.join(METRIC_KEYS[1:])}"
        )
    n = metrics["n"]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_SAMPLES:
        raise EngineError(Reason.BAD_REPORT, f"{what} n must be an int in [0, {MAX_SAMPLES}]")
    out: dict[str, Any] = {"n": n}
    for key in METRIC_KEYS:
        out[key] = _number(metrics[key], f"{what} {key}", high=1.0, nan_ok=n == 0) if key in metrics else None
    return out


TRAIN_KEYS = {"steps", "seconds", "loss", "dp_epsilon", "dp_delta"}


def clean_train(train: dict | None) -> dict[str, Any]:
    """A training summary (steps, seconds, loss), validated; a NaN loss is stored as None."""
    if not train:
        return {}
    if not isinstance(train, dict) or not {"steps", "seconds", "loss"} <= set(train) <= TRAIN_KEYS:
        raise EngineError(
            Reason.BAD_REPORT,
            "train must hold steps, seconds and loss, and may hold dp_epsilon and dp_delta",
        )
    steps = train["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 2**31:
        raise EngineError(Reason.BAD_REPORT, "train steps must be an int in [0, 2**31)")
    clean = {
        "steps": steps,
        "seconds": _number(train["seconds"], "train seconds", high=MAX_TRAIN_SECONDS),
        "loss": _number(train["loss"], "train loss", low=-math.inf, high=math.inf, nan_ok=True),
    }
    return clean | privacy_of(train)


def privacy_of(train: dict) -> dict[str, float]:
    """The differential privacy a node states with its training summary (epsilon spent, delta), validated."""
    out = {}
    if "dp_epsilon" in train:
        out["dp_epsilon"] = _number(train["dp_epsilon"], "dp_epsilon", high=1e6)
    if "dp_delta" in train:
        out["dp_delta"] = _number(train["dp_delta"], "dp_delta", high=1.0)
    return out


def check_round_id(value: int, what: str) -> None:
    """A round id or version that does not fit the wire's 32 bits is refused (``bad_round_id``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in ROUND_ID_RANGE:
        raise EngineError(Reason.BAD_ROUND_ID, f"{what} {printable(value, 40)} does not fit 32 bits")


class Phase(StrEnum):
    """Where the round state machine stands (the wire's RoundPhase: aggregator.service maps one to the other)."""

    WAITING_FOR_NODES = "waiting_for_nodes"  # fewer trainers than the quorum: no round open
    COLLECTING = "collecting"  # round `version` is open and takes updates
    FINISHED = "finished"  # every round done; the last global can still be fetched
    FAILED = "failed"  # stopped without finishing (no quorum in time)


@dataclass(frozen=True)
class UpdateHeader:
    run_id: str
    round_id: int
    node_id: str
    update_id: str
    codec: str
    sha256: str
    wire_bytes: int
    num_train: int = 0  # the training samples the node states (0: not stated); must be the registered count
    train: dict[str, float] = field(default_factory=dict)
    secagg_session: str = ""  # codec "secagg": the secure-aggregation session of the masked input


@dataclass(frozen=True)
class UpdateAck:
    update_id: str
    round_id: int
    replayed: bool
    updates_received: int
    receipt: str = ""  # the signed receipt (shared/audit.py): canonical JSON, and its hex signature
    receipt_signature: str = ""


@dataclass(frozen=True)
class Session:
    """A node's live process: its session id and where it registered from (the peer, for the log)."""

    session_id: str
    peer: str


@dataclass(frozen=True)
class RoundView:
    run_id: str
    round_id: int
    global_version: int
    total_rounds: int
    phase: Phase
    deadline_unix_ms: int
    update_accepted: bool
    registered_trainers: int
    updates_received: int
    message: str = ""
    best_version: int = 0  # the run's best global so far (0: none yet)
    decided_version: int = 0  # the newest version every trainer has evaluated


class RoundEngine:
    def __init__(
        self,
        cfg: AggregatorConfig,
        store: CheckpointStore,
        telemetry: Telemetry,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg, self.store, self.t = cfg, store, telemetry
        self.clock, self.wall = clock, wall
        self.wire = WireConfig(codec=cfg.codec, delta=cfg.delta, drop_masked_rows=cfg.drop_masked_rows)
        self.method = get_method(cfg.method)
        self.bounds = UpdateBounds(max_update_norm=cfg.max_update_norm, max_abs_value=cfg.max_abs_value)
        lock = threading.RLock()
        self._trainers_cache: tuple | None = None  # (key, sorted trainers, their set): _trainers()
        self._cond = threading.Condition(lock)  # wakes the driver (run): submissions, registrations, reports
        self._advanced = threading.Condition(lock)  # wakes long polls: a round opened or the run ended
        initial = build_adapter(self.method, cfg.embed_dim, TrainConfig(), cfg.seed).travel_state()
        self.initial_sha256 = state_digest(initial)
        self.template = {name: tuple(t.shape) for name, t in initial.items()}
        self.raw_bytes = raw_nbytes(initial)
        self.signature = {
            "method": cfg.method,
            "seed": cfg.seed,
            "embed_dim": cfg.embed_dim,
            "codec": cfg.codec,
            "delta": cfg.delta,
            "drop_masked_rows": cfg.drop_masked_rows,
            "aggregation": cfg.aggregation,
            "initial_sha256": self.initial_sha256,
        } | ({"secure_aggregation": True} if cfg.secure_aggregation else {})
        self.secure_settings: SecureSettings | None = None
        self.secure_ca = None
        if cfg.secure_aggregation:
            from cryptography import x509

            self.secure_ca = x509.load_pem_x509_certificate(Path(cfg.tls_ca).read_bytes())
            self.secure_settings = SecureSettings(
                clip=cfg.secagg_clip,
                threshold=cfg.secagg_threshold,
                phase_timeout_s=cfg.secagg_phase_timeout_s,
                min_nodes=cfg.min_nodes,
                max_update_norm=cfg.max_update_norm,
                max_abs_value=cfg.max_abs_value,
                uniform=cfg.aggregation == "uniform",
                max_samples=cfg.max_samples_per_node,
                max_share=cfg.max_weight_share,
            )
        self.secure: SecureRound | None = None  # the open round's secure-aggregation state
        self.registry = Registry(
            method=cfg.method,
            embed_dim=cfg.embed_dim,
            initial_sha256=self.initial_sha256,
            fingerprint=cfg.backbone_fingerprint,
            class_names=tuple(cfg.class_names) if cfg.class_names else None,
        )
        self.ledger = Ledger()
        self.last_seen: dict[str, float] = {}
        self.sessions: dict[str, Session] = {}  # each node's live process (session id, peer), by node id
        self._selected: dict[str, int] | None = None  # best and decided version (_selection), and when
        self._selected_at = -math.inf
        self._selection_stale = True
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
            self.phase = Phase.WAITING_FOR_NODES
            log.info(
                "new run %s: %d rounds, method %s, codec %s, quorum %d",
                self.run_id,
                cfg.rounds,
                cfg.method,
                cfg.codec,
                cfg.min_nodes,
            )
        else:
            self._restore(ckpt)
        self._open_audit(resumed=ckpt is not None)
        self.round_bytes = {"up": 0, "up_raw": 0}
        self.aggregator = self._new_aggregator()
        self.weights: dict[str, float] = {}  # the open round's weight of each trainer (fixed at its opening)
        self.weights_open_total = 0.0
        self.folded_weights: dict[str, float] = {}  # the weights the open round's updates were folded with
        self.round_privacy: dict[str, dict[str, float]] = {}  # the open round's nodes' stated DP (epsilon, delta)
        self.round_opened = self.clock()
        self.deadline = 0.0
        self.reg_deadline = self.clock() + cfg.registration_timeout_s
        self.ended_at: float | None = None
        self.done = False
        if self.phase == Phase.COLLECTING:  # restored mid-run: the open round starts again, fresh deadline
            with self._cond:
                self._open_round()
        self.t.round_current.set(self.version)
        self.t.run_active.set(0 if self._ended() else 1)
        self.t.nodes_connected.set_function(self.connected_count)
        self._update_registered_gauge()

    # -- restore -----------------------------------------------------------------------------
    def _restore(self, ckpt: Checkpoint) -> None:
        require_same_settings(self.store.root, ckpt.signature, self.signature)
        self.run_id = ckpt.run_id
        self.version = ckpt.version
        decoded = decode_state(ckpt.global_snapshot, sha256=None, template=self.template)
        self.global_state = decoded.tensors
        self.registry.nodes = {n: NodeRecord.from_dict(rec) for n, rec in ckpt.nodes.items()}
        self._trainers_cache = None
        self.ledger = Ledger(ckpt.accepted)
        self.rounds_log = ckpt.rounds_log
        if ckpt.signature.get("class_names"):
            self.registry.class_names = tuple(ckpt.signature["class_names"])
        self.registry.fingerprint = ckpt.signature.get("fingerprint") or self.registry.fingerprint
        now = self.clock()
        self.last_seen = {n: now for n in self.registry.nodes}  # give every known node a fresh liveness window
        if self.version >= self.cfg.rounds:
            self.phase = Phase.FINISHED
        elif self.registry.trainers():
            self.phase = Phase.COLLECTING
        else:
            self.phase = Phase.WAITING_FOR_NODES
        log.info(
            "restored run %s at global version %d (%s), %d nodes known",
            self.run_id,
            self.version,
            self.phase,
            len(self.registry.nodes),
        )

    # -- the audit log (shared/audit.py, docs/audit.md) --------------------------------------
    def _open_audit(self, resumed: bool) -> None:
        """Open the audit log beside the checkpoint (recording a torn tail a crash left) and record this start:
        a new run, or a resume; rounds the checkpoint closed that the log lacks (a crash between the two) are
        recorded now, marked so. A log that cannot be opened or written stops the aggregator here."""
        self.audit = open_for_aggregator(self.store.root.parent, self.cfg.audit_key, wall=self.wall)
        self.receipts: dict[tuple[str, str], tuple[str, str]] = {}  # (node, update id) -> its receipt, for replays
        existing, self.audit.existing = self.audit.existing, []
        if not resumed:
            self._audit(
                "run_started",
                {
                    "run_id": self.run_id,
                    "rounds": self.cfg.rounds,
                    "min_nodes": self.cfg.min_nodes,
                    "software": __version__,
                    **{k: self.signature[k] for k in ("method", "seed", "codec", "delta", "aggregation")},
                    "initial_sha256": self.initial_sha256,
                },
            )
        else:
            published = 0
            for entry in existing:
                if entry.data.get("run_id") != self.run_id:
                    continue
                if entry.event == "update_accepted":
                    receipt = make_receipt(self.audit.key, self.run_id, entry)
                    self.receipts[(entry.data["node"], entry.data["update_id"])] = receipt
                elif entry.event == "global_published":
                    published = max(published, int(entry.data["version"]))
            for version in range(published + 1, self.version + 1):
                self._audit_round(version - 1, at_resume=True)
            self._audit("aggregator_resumed", {"run_id": self.run_id, "version": self.version, "phase": self.phase})
        if self.audit.broken is not None:
            raise AuditError(f"the audit log {self.audit.path} cannot be written: {self.audit.broken}")

    def _audit(self, event: str, data: dict[str, Any], *, sync: bool = True) -> Entry | None:
        """Append an entry; a log that cannot be written fails the run, loudly, and gives None."""
        try:
            return self.audit.append(event, data, sync=sync)
        except AuditError as exc:
            self._audit_failed(exc)
            return None

    def _audit_failed(self, exc: AuditError) -> None:
        if not self._ended():
            self._end(Phase.FAILED, f"{exc}: an aggregator that cannot keep its audit log stops its run")

    def _durable(self) -> None:
        """Every entry so far on disk (outside the engine's lock: one fsync serves many uploads)."""
        try:
            self.audit.sync()
        except AuditError as exc:
            with self._cond:
                self._audit_failed(exc)
            raise EngineError(Reason.ROUND_NOT_OPEN, f"update not acknowledged: {exc}") from exc

    def _audit_round(self, r: int, at_resume: bool = False) -> None:
        """``round_closed`` (every folded update: node, update id, SHA-256, weight) and ``global_published``."""
        logged = next((x for x in reversed(self.rounds_log) if x.get("round") == r + 1), {})
        weights = logged.get("weights", {})
        updates = [
            {
                "node": node,
                "update_id": a.update_id,
                "sha256": a.sha256,
                "weight": None if weights.get(node) is None else float(weights[node]),
            }
            for node, a in sorted(self.ledger.closed.get(r, {}).items())
        ]
        closed = {"run_id": self.run_id, "round_id": r, "version": r + 1, "updates": updates}
        self._audit("round_closed", closed | ({"recorded_at_resume": True} if at_resume else {}), sync=False)
        payload = self.published.get(r + 1) or self.store.load_published(r + 1)
        self._audit(
            "global_published",
            {
                "run_id": self.run_id,
                "version": r + 1,
                "sha256": None if payload is None else sha256_hex(payload),
                "wire_bytes": 0 if payload is None else len(payload),
            },
        )

    def audit_refusal(self, node_id: str, round_id: int, update_id: str, sha256: str | None, reason: Reason) -> None:
        """Record a refused upload (the servicer calls this for every refusal past the identity check)."""
        with self._cond:
            self._audit(
                "update_refused",
                {
                    "run_id": self.run_id,
                    "round_id": round_id,
                    "node": node_id[:64],
                    "update_id": update_id[:128],
                    "sha256": sha256,
                    "reason": reason.value,
                },
                sync=False,  # made durable by the next synced entry: a flood of refusals costs no fsync each
            )

    # -- views -------------------------------------------------------------------------------
    @property
    def nodes(self) -> dict[str, NodeRecord]:
        return self.registry.nodes

    def connected_count(self) -> int:
        now = self.clock()
        with self._cond:
            return sum(1 for n in self.nodes if now - self.last_seen.get(n, -1e18) <= self.cfg.node_timeout_s)

    def _update_registered_gauge(self) -> None:
        for role in Role:
            self.t.nodes_registered.labels(role=role).set(self.registry.count(role))

    def _trainers(self) -> tuple[list[str], frozenset[str]]:
        """The registered trainers, sorted and as a set, computed once per change of the node table.

        Every long poll, upload and driver step asks; recomputing it each time (a sort over every node)
        made a round quadratic in the federation's size (bench/results/load.md). Registrations and a restore
        invalidate it; a node table replaced or grown behind the engine's back is noticed by identity and size.
        """
        nodes = self.registry.nodes
        key = (id(nodes), len(nodes))
        cache = self._trainers_cache
        if cache is None or cache[0] != key:
            trainers = self.registry.trainers()
            cache = (key, trainers, frozenset(trainers))
            self._trainers_cache = cache
        return cache[1], cache[2]

    def _ended(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.FAILED)

    def _view(self, node_id: str | None) -> RoundView:
        deadline_ms = 0
        if self.phase == Phase.COLLECTING:
            deadline_ms = int((self.wall() + (self.deadline - self.clock())) * 1000)
        if node_id is not None and self._ended() and node_id not in self.seen_end:
            self.seen_end.add(node_id)
            self._cond.notify_all()
        accepted = node_id is not None and self.ledger.accepted_in(node_id, self.version)
        return RoundView(
            run_id=self.run_id,
            round_id=self.version,
            global_version=self.version,
            total_rounds=self.cfg.rounds,
            phase=self.phase,
            deadline_unix_ms=deadline_ms,
            update_accepted=accepted,
            registered_trainers=len(self._trainers()[0]),
            updates_received=len(self.ledger.open),
            message=self.status_message,
            **self._selection(),
        )

    def _selection(self) -> dict[str, int]:
        """The best and the decided version, as the report selects (:func:`build_report`); recomputed at most
        once a second while reports come in, and at once after the run ended."""
        now = self.clock()
        if self._selected is None or (self._selection_stale and (now - self._selected_at >= 1.0 or self._ended())):
            report = self.report_dict()
            complete = [h["round"] for h in report["history"] if h["complete"]]
            self._selected = {
                "best_version": int(report.get("best_round", 0)),
                "decided_version": max(complete, default=0),
            }
            self._selected_at, self._selection_stale = now, False
        return self._selected

    def _check_node(self, run_id: str, node_id: str, session_id: str = "") -> NodeRecord:
        if run_id and run_id != self.run_id:
            raise EngineError(
                Reason.WRONG_RUN,
                f"run {printable(repr(run_id), 80)} is not the current run {self.run_id!r}; register again",
            )
        rec = self.nodes.get(node_id)
        if rec is None:
            raise EngineError(Reason.UNKNOWN_NODE, f"node {node_id!r} is not registered")
        if session_id:
            live = self.sessions.get(node_id)
            if live is None:  # restored from a checkpoint: the first session heard from is the node's
                self.sessions[node_id] = Session(session_id[:MAX_SESSION_CHARS], "")
            elif live.session_id != session_id[:MAX_SESSION_CHARS]:
                raise EngineError(
                    Reason.SESSION_REPLACED,
                    f"another process registered as {node_id}"
                    + (f" (from {live.peer})" if live.peer else "")
                    + "; this session is over: stop this process, only one may run per node id",
                )
        self.last_seen[node_id] = self.clock()
        return rec

    def _claim_session(self, node_id: str, session_id: str, peer: str) -> None:
        """Make ``session_id`` the node's live session; a live one of another process is taken over, loudly."""
        if not session_id:
            return
        session_id = session_id[:MAX_SESSION_CHARS]
        live = self.sessions.get(node_id)
        if live is not None and live.session_id != session_id:
            idle = self.clock() - self.last_seen.get(node_id, -math.inf)
            if idle <= self.cfg.node_timeout_s:
                self.t.session_takeovers.labels(node=node_id).inc()
                log.warning(
                    "node %s registered from a second process (%s) while its session from %s was live "
                    "(heard %.0fs ago): the new one takes over, the old one is refused from now on. Two "
                    "copies of one hospital's node are running, or a restarted node overtook its old process",
                    node_id,
                    printable(peer or "unknown peer", 80),
                    printable(live.peer or "unknown peer", 80),
                    idle,
                )
        self.sessions[node_id] = Session(session_id, printable(peer, 80))

    # -- RPC entry points --------------------------------------------------------------------
    def register(
        self,
        reg: Registration,
        *,
        session_id: str = "",
        peer: str = "",
        dry_run: bool = False,
        identity: str | None = None,
        secure_aggregation: bool = False,
    ) -> RoundView:
        """Admit ``reg`` (EngineError when refused) under the node's new session; with ``dry_run`` check only.

        ``identity``: the verified certificate CN the request came with (None: plaintext), for the audit log."""
        with self._cond:
            if secure_aggregation != self.cfg.secure_aggregation:
                raise EngineError(
                    Reason.REGISTRATION_MISMATCH,
                    f"node {reg.node_id} refused: the federation runs "
                    + (
                        "secure aggregation and this node does not (set secure_aggregation: true)"
                        if self.cfg.secure_aggregation
                        else "without secure aggregation and this node asks for it (set secure_aggregation: false)"
                    ),
                )
            if dry_run:
                self.registry.check(reg)
                view = self._view(None)
                live = self.sessions.get(reg.node_id)
                idle = self.clock() - self.last_seen.get(reg.node_id, -math.inf)
                if live is not None and idle <= self.cfg.node_timeout_s:
                    view = replace(
                        view,
                        message=f"{reg.node_id} is running now (a process heard from {idle:.0f}s ago); "
                        "a node started with this identity would take its session over",
                    )
                return view
            known = self.registry.admit(reg)
            self._trainers_cache = None  # a new node (the same one again: recomputed once, cheaply)
            self._selection_stale = True  # a new trainer changes which versions are complete
            self._claim_session(reg.node_id, session_id, peer)
            self.last_seen[reg.node_id] = self.clock()
            self._update_registered_gauge()
            if len(self.nodes) > self.cfg.max_workers - 4:
                log.warning(
                    "%d nodes and max_workers %d: every node waiting for a round holds a worker thread; "
                    "raise max_workers",
                    len(self.nodes),
                    self.cfg.max_workers,
                )
            rec = self.nodes[reg.node_id]
            if not known:
                self._audit(
                    "node_registered",
                    {
                        "run_id": self.run_id,
                        "node": reg.node_id,
                        "role": rec.role.value,
                        "num_train": rec.num_train,
                        "certificate": identity,
                    },
                )
            log.info(
                "%s %s (%s, %d train / %d val / %d test samples, version %s)",
                "re-registered" if known else "registered",
                reg.node_id,
                rec.role,
                rec.num_train,
                rec.num_val,
                rec.num_test,
                printable(rec.software_version or "unknown", 64),
            )
            cap = self.cfg.max_samples_per_node
            if not known and rec.role == Role.TRAINER and cap is not None and rec.num_train > cap:
                log.warning(
                    "%s states %d training samples: it weighs %d (max_samples_per_node)",
                    reg.node_id,
                    rec.num_train,
                    cap,
                )
            self._cond.notify_all()
            return self._view(reg.node_id)

    def heartbeat(self, run_id: str, node_id: str, session_id: str = "") -> RoundView:
        with self._cond:
            self._check_node(run_id, node_id, session_id)
            return self._view(node_id)

    def round_view(
        self, run_id: str, node_id: str, wait_for_round: int = 0, max_wait_s: float = 0.0, session_id: str = ""
    ) -> RoundView:
        """The current round; waits (at most ``max_wait_s``) while round ``wait_for_round`` is not open."""
        with self._cond:
            self._check_node(run_id, node_id, session_id)
            end = self.clock() + max(0.0, min(max_wait_s, 60.0))
            session = None if self.secure is None else self.secure.session  # a new one wakes the waiter too
            while (
                (self.version < wait_for_round or self.phase == Phase.WAITING_FOR_NODES)
                and not self._ended()
                and not self.done
                and self.clock() < end
                and (self.secure is None or self.secure.session == session)
            ):
                self._advanced.wait(timeout=end - self.clock())
            return self._view(node_id)

    def published_global(self, run_id: str, node_id: str, version: int) -> tuple[bytes, str]:
        """The payload of global ``version`` as published (encoded against version - 1)."""
        with self._cond:
            self._check_node(run_id, node_id)
            check_round_id(version, "global version")
            if version < 1 or version > self.version:
                raise EngineError(
                    Reason.NO_SUCH_VERSION,
                    f"global version {version} does not exist (current {self.version}; version 0 is "
                    "the seeded initial adapter every node builds itself)",
                )
            data = self.published.get(version)
            if data is None:
                data = self.store.load_published(version)
                if data is None:
                    raise EngineError(Reason.MISSING_VERSION, f"published global {version} is missing")
                self.published[version] = data
        return data, sha256_hex(data)

    def submit(self, header: UpdateHeader, payload: bytes, sha256: str | None = None) -> UpdateAck:
        """Validate and fold one upload. ``sha256``: the SHA-256 of ``payload`` as its receiver computed it
        over the very bytes while they arrived (the servicer does); None: hashed here.

        An accepted update is recorded in the audit log (``update_accepted``) and acknowledged with a signed
        receipt of that entry, only once the entry is on disk; a replay gets the same receipt."""
        ack = self._submit(header, payload, sha256)
        self._durable()
        return ack

    def _submit(self, header: UpdateHeader, payload: bytes, sha256: str | None) -> UpdateAck:
        with self._cond:
            rec = self._check_node(header.run_id, header.node_id)
            if not CLIENT_ID.fullmatch(header.update_id):
                raise EngineError(Reason.BAD_UPDATE_ID, "update_id must be 1-128 characters of [A-Za-z0-9_.:-]")
            check_round_id(header.round_id, "round")
            # the bytes themselves are hashed: a retry is recognised by what arrived, never by what it claims
            actual = sha256 if sha256 is not None else sha256_hex(payload)
            claimed = header.sha256.strip().lower() if isinstance(header.sha256, str) else ""
            if claimed != actual:
                raise EngineError(
                    Reason.CHECKSUM_MISMATCH, "update refused: payload SHA-256 does not match the one sent with it"
                )
            replayed = self.ledger.replay(header.node_id, header.update_id, actual, self.version)
            if replayed is not None:  # a retry of an accepted update: the same answer, not counted again
                receipt = self.receipts.get((header.node_id, header.update_id), ("", ""))
                return UpdateAck(header.update_id, replayed[0], True, replayed[1], *receipt)
            if rec.role != Role.TRAINER:
                raise EngineError(Reason.NOT_TRAINER, f"{header.node_id} is an evaluator")
            if self.phase != Phase.COLLECTING:
                raise EngineError(Reason.ROUND_NOT_OPEN, f"no round is open ({self.phase})")
            if header.round_id < self.version:
                raise EngineError(
                    Reason.STALE_ROUND, f"round {header.round_id} is closed; round {self.version} is open"
                )
            if header.round_id > self.version:
                raise EngineError(
                    Reason.FUTURE_ROUND, f"round {header.round_id} is not open yet; round {self.version} is open"
                )
            if header.node_id in self.ledger.open:
                raise EngineError(
                    Reason.CONFLICTING_UPDATE,
                    f"{header.node_id} already has update "
                    f"{self.ledger.open[header.node_id].update_id} in round {self.version}",
                )
            if header.num_train and header.num_train != rec.num_train:
                raise EngineError(
                    Reason.BAD_SAMPLE_COUNT,
                    f"the update states {header.num_train} training samples, the node registered {rec.num_train}",
                )
            privacy = privacy_of(header.train)  # a malformed statement is refused before anything is folded
            if self.secure is not None:
                return self._submit_masked(header, payload, actual, rec, privacy)
            if header.codec == "secagg":
                raise EngineError(
                    Reason.CODEC_MISMATCH, "a masked input, and this federation runs no secure aggregation"
                )
            weight = self._weight_of(header.node_id, rec)
            try:
                t0, c0 = time.perf_counter(), time.thread_time()
                info = payload_info(payload)
                if info.codec != header.codec:
                    raise EngineError(
                        Reason.CODEC_MISMATCH,
                        f"header says codec {printable(repr(header.codec), 40)}, the payload another",
                    )
                with self.t.codec_seconds.labels(operation="decode").time():
                    # first checks the payload's codec and delta flag against the federation's (wire_mismatch);
                    # the bytes were hashed and compared above (sha256=None: not hashed twice)
                    fold_update(
                        self.aggregator, payload, None, self.global_state, weight, self.wire, self.bounds, info=info
                    )
                self.t.aggregate_seconds.labels(step="fold").observe(time.perf_counter() - t0)
                self.t.aggregate_cpu.labels(step="fold").inc(time.thread_time() - c0)
            except (CodecError, UpdateOutOfBoundsError, AggregationError) as exc:
                raise EngineError(exc.reason, f"update refused: {exc}") from exc
            return self._accepted(header, payload, actual, rec, weight, privacy)

    def _accepted(
        self,
        header: UpdateHeader,
        payload: bytes,
        actual: str,
        rec: NodeRecord,
        weight: float,
        privacy: dict,
        **audited: str,
    ) -> UpdateAck:
        """Book an accepted update (the caller holds the lock): its audit entry (with ``audited`` besides the
        usual fields), receipt, ledger, the round's records, the log line."""
        entry = self._audit(
            "update_accepted",
            {
                "run_id": self.run_id,
                "round_id": self.version,
                "node": header.node_id,
                "update_id": header.update_id,
                "sha256": actual,
                "weight": float(weight),
                "num_train": rec.num_train,
                "wire_bytes": len(payload),
                **audited,
            },
            sync=False,  # synced by submit outside the lock, before the receipt leaves
        )
        if entry is None:  # the run failed: its folded sum is never published
            raise EngineError(Reason.ROUND_NOT_OPEN, f"update not accepted: {self.status_message}")
        receipt = self.receipts[(header.node_id, header.update_id)] = make_receipt(self.audit.key, self.run_id, entry)
        self.ledger.accept(header.node_id, header.update_id, actual)
        self.folded_weights[header.node_id] = weight
        if privacy:
            self.round_privacy[header.node_id] = privacy
        self.round_bytes["up"] += len(payload)
        self.round_bytes["up_raw"] += self.raw_bytes
        self.t.updates_accepted.inc()
        loss = header.train.get("loss", math.nan)
        log.info(
            "round %d: update %s from %s (%d bytes, weight %.6g, loss %.4f), %d/%d in",
            self.version + 1,
            printable(header.update_id),
            header.node_id,
            len(payload),
            weight,
            loss if isinstance(loss, float) else math.nan,
            len(self.ledger.open),
            len(self._trainers()[0]),
        )
        self._cond.notify_all()
        return UpdateAck(header.update_id, self.version, False, len(self.ledger.open), *receipt)

    def _submit_masked(
        self, header: UpdateHeader, payload: bytes, actual: str, rec: NodeRecord, privacy: dict
    ) -> UpdateAck:
        """A masked input of the open secure-aggregation session: checked for session, phase and size (its
        content is uniform in the ring by design: nothing else about it can be checked), then recorded."""
        assert self.secure is not None
        if header.codec != "secagg":
            raise EngineError(
                Reason.CODEC_MISMATCH, "this federation runs secure aggregation: updates travel as masked inputs"
            )
        vector = self.secure.masked_input(header.node_id, header.secagg_session, payload)
        weight = self.secure.roster.weights[header.node_id] if self.secure.roster is not None else 0.0
        ack = self._accepted(header, payload, actual, rec, weight, privacy, secagg_session=self.secure.session)
        self.secure.accept_masked(header.node_id, vector)
        return ack

    def _weight_of(self, node_id: str, rec: NodeRecord) -> float:
        """The open round's weight of ``node_id``: fixed at the opening, or at its first upload for a joiner."""
        weight = self.weights.get(node_id)
        if weight is None:
            try:
                weight = joiner_weight(
                    rec.num_train,
                    self.weights_open_total,
                    max_samples=self.cfg.max_samples_per_node,
                    max_share=self.cfg.max_weight_share,
                )
            except AggregationError as exc:
                raise EngineError(exc.reason, f"update refused: {exc}") from exc
            self.weights[node_id] = weight
            log.info("round %d: %s joined after the opening, weight %.6g", self.version + 1, node_id, weight)
        return weight

    def report(
        self,
        run_id: str,
        node_id: str,
        version: int,
        report_id: str,
        val: dict | None,
        test: dict | None,
        head: str,
        train: dict | None = None,
    ) -> bool:
        """Store a node's evaluation of global ``version``; returns True when it is a replay.

        Every field is validated and bounded before anything is kept (``bad_report``): ``report_id`` like an
        update id, ``head`` one of the model's heads, metrics by :func:`clean_metrics`, the training summary
        by :func:`clean_train`. A node's report of a version is kept once: the same id again is a replay,
        another id is refused (``conflicting_report``). Each report is appended to the checkpoint's report
        log (one bounded line), never a rewrite of every report so far.
        """
        with self._cond:
            rec = self._check_node(run_id, node_id)
            check_round_id(version, "version")
            if version < 1 or version > self.version:
                raise EngineError(
                    Reason.NO_SUCH_VERSION, f"metrics for global version {version}, current is {self.version}"
                )
            if not CLIENT_ID.fullmatch(report_id):
                raise EngineError(Reason.BAD_REPORT, "report_id must be 1-128 characters of [A-Za-z0-9_.:-]")
            if head not in HEADS:
                raise EngineError(Reason.BAD_REPORT, f"head must be one of {', '.join(HEADS)}")
            entry = {
                "report_id": report_id,
                "role": rec.role.value,
                "head": head,
                "val": clean_metrics(val, "val"),
                "test": clean_metrics(test, "test"),
                "train": clean_train(train),
            }
            by_node = self.reports.setdefault(str(version), {})
            old = by_node.get(node_id)
            if old is not None:
                if old.get("report_id") == report_id:
                    return True
                raise EngineError(
                    Reason.CONFLICTING_REPORT,
                    f"{node_id} reported version {version} already, as {old.get('report_id')!r}",
                )
            by_node[node_id] = entry
            self._selection_stale = True
            self.store.append_report(version, node_id, entry)
            if version == self.cfg.rounds and all(n in by_node for n in self.nodes):
                self.write_report()  # the final evaluations are in: the report is complete
            shown = entry["val"] if rec.role == Role.TRAINER else entry["test"]
            if shown is not None and shown["accuracy"] is not None:
                self.t.validation_accuracy.labels(node=node_id).set(shown["accuracy"])
            self._cond.notify_all()
            return False

    # -- the state machine -------------------------------------------------------------------
    def _new_aggregator(self):
        return make_aggregator(self.cfg.aggregation, trim_ratio=self.cfg.trim_ratio)

    def _open_round(self) -> None:
        self.phase = Phase.COLLECTING
        self.round_bytes = {"up": 0, "up_raw": 0}
        self.aggregator = self._new_aggregator()
        counts = {n: self.nodes[n].num_train for n in self._trainers()[0]}
        self.weights = capped_weights(
            counts, max_samples=self.cfg.max_samples_per_node, max_share=self.cfg.max_weight_share
        )
        self.weights_open_total = sum(self.weights.values())
        self.folded_weights = {}
        self.round_privacy = {}
        capped = {n: w for n, w in self.weights.items() if w < counts[n]}
        if capped:
            log.warning(
                "round %d: weights capped (max_samples_per_node %s, max_weight_share %s): %s",
                self.version + 1,
                self.cfg.max_samples_per_node,
                self.cfg.max_weight_share,
                ", ".join(f"{n} {counts[n]} -> {w:.6g}" for n, w in sorted(capped.items())),
            )
        self.round_opened = self.clock()
        self.deadline = self.round_opened + self.cfg.round_timeout_s
        if self.secure_settings is not None:
            self.secure = SecureRound(
                self.version,
                self.secure_settings,
                self.secure_ca,
                self.global_state,
                lambda: {n: self.nodes[n].num_train for n in self._trainers()[0]},
                self.round_opened,
                self.deadline,
            )
        self.t.round_current.set(self.version)
        self._advanced.notify_all()
        log.info(
            "round %d/%d open: %d trainers registered, deadline in %.0fs",
            self.version + 1,
            self.cfg.rounds,
            len(self._trainers()[0]),
            self.cfg.round_timeout_s,
        )

    def _close_round(self, secure: tuple[dict, dict] | None = None) -> None:
        """Publish the next global: the streaming average's, or ``secure``'s (the unmasked average and
        what the round log keeps of its session)."""
        r = self.version
        t0, c0 = time.perf_counter(), time.thread_time()
        if secure is not None:
            payload, decoded = publish_state(secure[0], self.global_state, self.wire)
        else:
            payload, decoded = publish_global(self.aggregator, self.global_state, self.wire)
        self.t.aggregate_seconds.labels(step="publish").observe(time.perf_counter() - t0)
        self.t.aggregate_cpu.labels(step="publish").inc(time.thread_time() - c0)
        snapshot = encode_state(decoded, codec="fp32")  # lossless copy for the checkpoint
        self.store.save_published(r + 1, payload.data)
        self.published[r + 1] = payload.data
        updates = sorted(self.ledger.open)
        self.ledger.close(r)
        seconds = self.clock() - self.round_opened
        n_trainers = len(self._trainers()[0])
        self.rounds_log.append(
            {
                "round": r + 1,
                "updates": len(updates),
                "nodes": updates,
                "seconds": seconds,
                "bytes_up": self.round_bytes["up"],
                "bytes_up_raw": self.round_bytes["up_raw"],
                "bytes_down": payload.wire_nbytes * n_trainers,
                "bytes_down_raw": payload.raw_nbytes * n_trainers,
                "global_wire_bytes": payload.wire_nbytes,
                "weights": {n: self.folded_weights[n] for n in updates if n in self.folded_weights},
                # differential privacy as each node stated it with its update (nodes without it: absent)
                "privacy": {n: self.round_privacy[n] for n in updates if n in self.round_privacy},
                # every RPC's message bytes since the last round closed (the first round: since start-up)
                "traffic": self.t.traffic.take(),
            }
            | ({"secure_aggregation": secure[1]} if secure is not None else {})
        )
        self.version = r + 1
        self.global_state = decoded
        status = "finished" if self.version >= self.cfg.rounds else "running"
        t0, c0 = time.perf_counter(), time.thread_time()
        self.store.save(
            Checkpoint(
                run_id=self.run_id,
                version=self.version,
                global_snapshot=snapshot.data,
                signature=self._signature_now(),
                nodes={n: rec.to_dict() for n, rec in self.nodes.items()},
                accepted=self.ledger.to_dict(),
                rounds_log=self.rounds_log,
                status=status,
            )
        )
        self.t.aggregate_seconds.labels(step="checkpoint").observe(time.perf_counter() - t0)
        self.t.aggregate_cpu.labels(step="checkpoint").inc(time.thread_time() - c0)
        self._audit_round(r)  # after the checkpoint: the log records only what a restart resumes from
        self.t.round_seconds.observe(seconds)
        log.info(
            "round %d/%d closed: %d updates, up %.1f KB, global %.1f KB, %.3fs",
            r + 1,
            self.cfg.rounds,
            len(updates),
            self.round_bytes["up"] / 1e3,
            payload.wire_nbytes / 1e3,
            seconds,
        )
        self.t.round_current.set(self.version)
        self.write_report()

    def _signature_now(self) -> dict[str, Any]:
        return self.signature | {
            "class_names": list(self.registry.class_names or ()),
            "fingerprint": self.registry.fingerprint,
        }

    def _end(self, phase: Phase, message: str) -> None:
        self.phase = phase
        self.t.run_active.set(0)
        self.status_message = message
        self.ended_at = self.clock()
        (log.info if phase == Phase.FINISHED else log.error)("run %s %s: %s", self.run_id, phase, message)
        self._audit(
            "run_finished" if phase == Phase.FINISHED else "run_failed",
            {"run_id": self.run_id, "version": self.version, "message": message},
        )
        self._cond.notify_all()
        self._advanced.notify_all()

    def fail(self, message: str) -> None:
        """End the run as FAILED (the driver calls this when it breaks): nodes see it on their next call."""
        with self._cond:
            if not self._ended():
                self._end(Phase.FAILED, message)
            self.done = True
            self._cond.notify_all()
            self._advanced.notify_all()

    def _final_reports_in(self) -> bool:
        if self.phase == Phase.FINISHED:
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
        if self.phase == Phase.WAITING_FOR_NODES:
            n = len(self._trainers()[0])
            if n >= cfg.min_nodes:
                self._open_round()
                return cfg.round_timeout_s
            if now >= self.reg_deadline:
                self._end(
                    Phase.FAILED,
                    f"only {n} of {cfg.min_nodes} trainers registered within {cfg.registration_timeout_s:.0f}s",
                )
                return 0.0
            return self.reg_deadline - now
        if self.phase == Phase.COLLECTING and self.secure is not None:
            return self._step_secure(now)
        if self.phase == Phase.COLLECTING:
            got = self.ledger.open  # node -> update: a set's worth of membership, not copied per step
            trainers, trainer_set = self._trainers()
            # the count first: a round is complete only once as many updates as trainers are in (cheap, per upload)
            everyone = bool(got) and len(got) >= len(trainer_set) and all(n in got for n in trainer_set)
            if everyone or (now >= self.deadline and len(got) >= cfg.min_nodes):
                if not everyone:
                    log.warning(
                        "round %d: deadline passed, closing with %d of %d trainers (%s missing)",
                        self.version + 1,
                        len(got),
                        len(trainers),
                        sorted(trainer_set - got.keys()),
                    )
                return self._close_and_advance()
            if now >= self.deadline + cfg.quorum_timeout_s:
                self._end(
                    Phase.FAILED,
                    f"round {self.version + 1}: {len(got)} of the quorum of {cfg.min_nodes} "
                    f"updates {cfg.round_timeout_s + cfg.quorum_timeout_s:.0f}s after it opened",
                )
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

    def _close_and_advance(self, secure: tuple[dict, dict] | None = None) -> float:
        self._close_round(secure)
        if self._ended():  # the audit log could not be written: the run failed
            return 0.0
        if self.version >= self.cfg.rounds:
            self._end(Phase.FINISHED, f"{self.cfg.rounds} rounds done")
            return 0.0
        self._open_round()
        self._cond.notify_all()
        return self.cfg.round_timeout_s

    def _step_secure(self, now: float) -> float:
        """The open round under secure aggregation: advance its session (aggregator/secure.py); unmask and
        close when it can, start a new session when it missed a quorum or named a node."""
        sec = self.secure
        assert sec is not None
        before = (sec.session, sec.phase)
        action, wait = sec.step(now, self._trainers()[1])
        if action == "sum":
            try:
                with self.t.aggregate_seconds.labels(step="unmask").time():
                    result = sec.result(self.global_state)
            except SecAggMisbehaviour as exc:
                sec.excluded[exc.node] = exc.what
                self._audit(
                    "secagg_node_excluded",
                    {
                        "run_id": self.run_id,
                        "round_id": self.version,
                        "session": sec.session,
                        "node": exc.node,
                        "why": exc.what,
                    },
                )
                log.error("round %d: secure aggregation names %s: %s", self.version + 1, exc.node, exc.what)
                action, sec.abort_reason = "abort", f"{exc.node} {exc.what}"
            except SecAggError as exc:
                action, sec.abort_reason = "abort", str(exc)
            else:
                return self._close_and_advance(result)
        if action == "abort":
            if now >= self.round_opened + self.cfg.round_timeout_s + self.cfg.quorum_timeout_s:
                self._end(
                    Phase.FAILED,
                    f"round {self.version + 1}: secure aggregation found no quorum "
                    f"{self.cfg.round_timeout_s + self.cfg.quorum_timeout_s:.0f}s after the round opened "
                    f"({sec.abort_reason})",
                )
                return 0.0
            record = sec.abort(now, sec.abort_reason)
            self._audit("secagg_session_aborted", {"run_id": self.run_id, "round_id": self.version} | record)
            self.ledger.discard_open()
            self.folded_weights = {}
            self.round_privacy = {}
            wait = 0.0
        if (sec.session, sec.phase) != before:
            self._advanced.notify_all()  # wakes the nodes waiting for the session's next phase
        return max(wait, 0.0)

    # -- secure aggregation: the nodes' messages ------------------------------------------------
    def _secure_round(self, run_id: str, node_id: str, round_id: int) -> SecureRound:
        rec = self._check_node(run_id, node_id)
        if self.secure_settings is None:
            raise EngineError(Reason.SECAGG_PHASE, "this federation runs no secure aggregation")
        if rec.role != Role.TRAINER:
            raise EngineError(Reason.NOT_TRAINER, f"{node_id} is an evaluator")
        check_round_id(round_id, "round")
        if self.phase != Phase.COLLECTING or self.secure is None:
            raise EngineError(Reason.ROUND_NOT_OPEN, f"no round is open ({self.phase})")
        if round_id != self.version:
            raise EngineError(
                Reason.STALE_ROUND if round_id < self.version else Reason.FUTURE_ROUND,
                f"round {round_id} is not the open round {self.version}",
            )
        return self.secure

    def secagg_message(
        self, run_id: str, node_id: str, round_id: int, deliver: Callable[[SecureRound], int]
    ) -> tuple[str, int, int]:
        """A node's key advertisement, shares or unmasking answer for the open round: ``deliver`` hands it to
        the round's session (:class:`aggregator.secure.SecureRound`) and says how many nodes have sent theirs.
        The session, its phase and that count."""
        with self._cond:
            sec = self._secure_round(run_id, node_id, round_id)
            received = deliver(sec)
            self._cond.notify_all()
            return sec.session, sec.phase, received

    def secagg_view(
        self, run_id: str, node_id: str, session: str, wait_for: int, max_wait_s: float, session_id: str = ""
    ) -> tuple[RoundView, SecureView | None]:
        """The open session as ``node_id`` may see it; waits (at most ``max_wait_s``) while the session it
        follows (``session``) is open and still before phase ``wait_for``."""
        with self._cond:
            self._check_node(run_id, node_id, session_id)
            end = self.clock() + max(0.0, min(max_wait_s, 60.0))
            version = self.version
            while (
                self.secure is not None
                and self.version == version
                and not self._ended()
                and (not session or self.secure.session == session)
                and self.secure.phase < wait_for
                and self.clock() < end
            ):
                self._advanced.wait(timeout=end - self.clock())
            if self.secure is None:
                return self._view(node_id), None
            sec = self.secure.view(node_id)
            # the phase's deadline on the wall clock, as RoundInfo gives the round's
            sec.deadline_unix_ms = int((self.wall() + (sec.deadline - self.clock())) * 1000)
            return self._view(node_id), sec

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
            return build_report(
                run_id=self.run_id,
                phase=self.phase,
                message=self.status_message,
                method=self.cfg.method,
                rounds=self.cfg.rounds,
                nodes={n: rec.to_dict() for n, rec in self.nodes.items()},
                reports=self.reports,
                rounds_log=self.rounds_log,
                select_by=self.cfg.select_by,
                extra={
                    "codec": self.cfg.codec,
                    "aggregation": self.cfg.aggregation,
                    "max_samples_per_node": self.cfg.max_samples_per_node,
                    "max_weight_share": self.cfg.max_weight_share,
                    "min_nodes": self.cfg.min_nodes,
                    "seed": self.cfg.seed,
                    "class_names": list(self.registry.class_names or ()),
                    "backbone_fingerprint": self.registry.fingerprint,
                    "version": __version__,
                    "other_versions": self.registry.other_versions(),
                    "global_version": self.version,
                    # every RPC's bytes since the last round closed: the open round's, or after the last
                    # round the final evaluations and the nodes' last polls
                    "traffic_since_last_round": self.t.traffic.peek(),
                },
            )

    def write_report(self) -> None:
        write_report(self.report_dict(), Path(self.cfg.out_dir))

    def markdown(self) -> str:
        return render_markdown(self.report_dict())
