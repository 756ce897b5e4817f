"""The gRPC shell around :class:`aggregator.engine.RoundEngine`, and :func:`serve`, the whole service.

Every RPC first passes :meth:`AggregatorServicer._authorize`, the one identity check (mTLS: the
client certificate's CN is on the allow-list and is the node id the request claims); every refusal
goes through :meth:`AggregatorServicer._refuse`: a rich status naming its
:class:`shared.wire.reasons.Reason` (:func:`shared.wire.reasons.abort`), a log line and
``fedmedclip_requests_rejected_total{method,reason}`` (and ``fedmedclip_updates_rejected_total{reason}``
for uploads). The engine's phases and roles map to the wire's enums here, and only here
(:data:`PHASE_TO_PROTO`, :data:`ROLE_TO_PROTO`).

Load (docs/trust-model.md, section 8, gaps 1 and 2; :mod:`aggregator.limits`): every RPC runs inside
:meth:`AggregatorServicer._serving`, which counts it (:class:`~aggregator.limits.LoadMonitor`) and
holds the node's share of the server (:class:`~aggregator.limits.NodeLimits`, keyed by the identity
``_authorize`` checked); uploads and downloads are watched by a
:class:`~aggregator.limits.StreamWatchdog`, and an upload takes one of the ``upload_slots`` only once
its header is valid and its node registered. Health (:class:`ServiceHealth`): the empty service name
is liveness, the AggregatorService's name readiness, NOT_SERVING while overloaded. Requests that
do not parse are refused by :class:`DecodeGuard`, never by grpcio (which would leak them).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aggregator.checkpoint import FAULT_ENV, CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.engine import Phase, RoundEngine, RoundView, UpdateHeader
from aggregator.errors import EngineError
from aggregator.limits import (
    LOAD_REASONS,
    LONG_POLL,
    RPC,
    STREAM,
    HandshakeFailures,
    LoadMonitor,
    LogThrottle,
    NodeLimits,
    StreamWatchdog,
    Transfer,
    handshake_failure_reason,
)
from aggregator.registry import NodeRecord, Registration, Role
from aggregator.secure import SecPhase, SecureView
from shared import kernels
from shared.ops.atomic import atomic_write
from shared.ops.config import ConfigError
from shared.ops.lifecycle import Shutdown
from shared.ops.logs import printable
from shared.ops.telemetry import MetricsInterceptor, Telemetry, serve_metrics
from shared.secagg import DealtShares, SecAggError
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.protocol import (
    SERVICE_NAME,
    advertisement_from_proto,
    member_to_proto,
    metrics_from_proto,
    share_from_proto,
)
from shared.wire.reasons import Reason, abort
from shared.wire.tls import load_material, peer_common_name, server_credentials
from shared.wire.transport import CHUNK_BYTES, MAX_PAYLOAD_BYTES, PayloadAssemblyError, assemble, chunks, server_options

log = logging.getLogger("fedmedclip.aggregator")

PHASE_TO_PROTO = {
    Phase.WAITING_FOR_NODES: pb.ROUND_PHASE_WAITING_FOR_NODES,
    Phase.COLLECTING: pb.ROUND_PHASE_COLLECTING,
    Phase.FINISHED: pb.ROUND_PHASE_FINISHED,
    Phase.FAILED: pb.ROUND_PHASE_FAILED,
}
ROLE_TO_PROTO = {Role.TRAINER: pb.NODE_ROLE_TRAINER, Role.EVALUATOR: pb.NODE_ROLE_EVALUATOR}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}
MAX_LONG_POLL_S = 30.0
#: Per-connection memory at a thousand connections (bench/results/load.md): no BDP probing, so an upload that
#: waits for its slot buffers at most the initial HTTP/2 window (64 KiB) instead of a window grown to megabytes;
#: uploads are paced by ``upload_slots`` anyway, so a larger window buys no throughput.
#: (Capping gRPC's TCP reads, grpc.experimental.tcp_max_read_chunk_size = 64 KiB, was measured too: the same peak
#: memory at 500 nodes, a little more CPU; not set.)
AGGREGATOR_SERVER_OPTIONS: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 0)]
#: torch's intra-op threads in the aggregator process (:func:`_tune_interpreter`).
TORCH_THREADS = 1
#: The interpreter's thread switch interval in the aggregator (:func:`_tune_interpreter`; Python's default: 5 ms).
SWITCH_INTERVAL_S = 0.001
#: Allocations between young-generation garbage collections (Python's default: 700).
GC_GEN0_THRESHOLD = 20_000
#: glibc malloc arenas of the aggregator process (:func:`_limit_malloc_arenas`); mallopt's M_ARENA_MAX is -8
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8
#: What the service's request deserializers give for bytes that are not the message (:class:`DecodeGuard`).
UNDECODABLE = object()


def round_info(view: RoundView) -> pb.RoundInfo:
    return pb.RoundInfo(
        run_id=view.run_id,
        round_id=view.round_id,
        global_version=view.global_version,
        total_rounds=view.total_rounds,
        phase=PHASE_TO_PROTO[view.phase],
        deadline_unix_ms=view.deadline_unix_ms,
        update_accepted=view.update_accepted,
        registered_trainers=view.registered_trainers,
        updates_received=view.updates_received,
        message=view.message,
        best_version=view.best_version,
        decided_version=view.decided_version,
    )


def train_summary(msg: pb.TrainSummary) -> dict:
    """A TrainSummary as the engine takes it; the differential privacy fields only when the node set them."""
    train: dict = {"steps": msg.steps, "seconds": msg.seconds, "loss": msg.loss}
    for name in ("dp_epsilon", "dp_delta"):
        if msg.HasField(name):
            train[name] = getattr(msg, name)
    return train


class AggregatorServicer(pb_grpc.AggregatorServiceServicer):
    def __init__(
        self, engine: RoundEngine, cfg: AggregatorConfig, telemetry: Telemetry, *, tls: bool, on_overload=None
    ) -> None:
        self.engine, self.cfg, self.t, self.tls = engine, cfg, telemetry, tls
        self.allowed = frozenset(cfg.allowed_nodes) if cfg.allowed_nodes else None
        # folding is serialised by the engine anyway: more payloads in memory at once buy nothing
        self.upload_slots = threading.BoundedSemaphore(cfg.upload_slots)
        self.limits = NodeLimits(
            {RPC: cfg.max_rpcs_per_node, STREAM: cfg.max_streams_per_node, LONG_POLL: cfg.max_long_polls_per_node}
        )
        self.watchdog = StreamWatchdog(cfg.stream_timeout_s, cfg.stream_min_rate_bps, cfg.stream_grace_s)
        self.load = LoadMonitor(
            cfg.max_workers,
            cfg.overload_ratio,
            cfg.overload_hold_s,
            on_overload or (lambda overloaded: None),
            in_flight=telemetry.rpcs_in_flight,
            overloaded_gauge=telemetry.overloaded,
        )
        self.quiet = LogThrottle()  # a flood of refusals for a load limit is not a flood of log lines

    def _certified(self, context: grpc.ServicerContext) -> str:
        """With TLS: the verified certificate's CN, on the allow-list (the identity the limits are keyed by)."""
        cn = peer_common_name(context)
        if cn is None:  # the handshake demands a certificate; this is defence in depth
            raise EngineError(Reason.NO_CERTIFICATE, "a client certificate is required")
        if self.allowed is None or cn not in self.allowed:
            raise EngineError(Reason.IDENTITY_NOT_ALLOWED, f"certificate {cn!r} is not on the aggregator's allow-list")
        return cn

    def _authorize(self, context: grpc.ServicerContext, node_id: str) -> None:
        """The identity check of every request: may this peer speak for ``node_id``?"""
        if not self.tls:  # insecure mode: only the claimed id can be checked
            if self.allowed is not None and node_id not in self.allowed:
                raise EngineError(Reason.IDENTITY_NOT_ALLOWED, f"node {node_id!r} is not allowed")
            return
        cn = self._certified(context)
        if cn != node_id:
            raise EngineError(Reason.IDENTITY_MISMATCH, f"certificate {cn!r} cannot speak for node {node_id!r}")

    def _refuse(self, context: grpc.ServicerContext, method: str, node_id: str, exc: EngineError) -> None:
        """Count, log and answer a refusal with its rich status (raises, as context.abort does)."""
        self._count_refusal(method, node_id, exc)
        abort(context, exc.reason, exc.message)

    def _count_refusal(self, method: str, node_id: str, exc: EngineError) -> None:
        self.t.requests_rejected.labels(method=method, reason=exc.reason).inc()
        if method == "UploadUpdate":
            self.t.updates_rejected.labels(reason=exc.reason).inc()
        held_back = 0
        if exc.reason in LOAD_REASONS:
            self.load.shed()
        if exc.reason in LOAD_REASONS or exc.reason is Reason.UNDECODABLE:  # floods, with nothing in them to read
            held_back = self.quiet.admit((node_id, method, exc.reason))
            if held_back is None:
                return
        log.warning(
            "%s from %r refused (%s, %s): %s%s",
            method,
            node_id[:64],
            exc.code.name,
            exc.reason,
            printable(exc.message, 1000),
            f" ({held_back} more like it not logged)" if held_back else "",
        )

    @contextmanager
    def _serving(self, context: grpc.ServicerContext, method: str, node_id: str, *kinds: str) -> Iterator[None]:
        """Authorize the call, then hold the node's share of the server for it (EngineError: refused)."""
        self.load.enter(method)
        try:
            self._authorize(context, node_id)
            with self.limits.hold(node_id, RPC, *kinds):
                yield
        finally:
            self.load.leave(method)

    def refuse_undecodable(self, context: grpc.ServicerContext, method: str) -> None:
        """A request that is not the protobuf message it claims to be (raises, as context.abort does)."""
        sender = (peer_common_name(context) if self.tls else None) or context.peer()  # no node id to go by
        self._refuse(
            context,
            method,
            sender,
            EngineError(Reason.UNDECODABLE, f"the {method} request is not a valid protobuf message of its type"),
        )

    def _unary(self, context: grpc.ServicerContext, method: str, node_id: str, call, *kinds: str):
        try:
            with self._serving(context, method, node_id, *kinds):
                return call()
        except EngineError as exc:
            self._refuse(context, method, node_id, exc)

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        reg = Registration(
            node_id=request.node_id,
            role=ROLE_FROM_PROTO.get(request.role),
            fingerprint=request.backbone_fingerprint,
            class_names=tuple(request.class_names),
            embed_dim=request.embed_dim,
            method=request.method,
            initial_sha256=request.initial_state_sha256,
            num_train=request.num_train_samples,
            num_val=request.num_val_samples,
            num_test=request.num_test_samples,
            software_version=request.software_version,
        )
        view = self._unary(
            context,
            "Register",
            request.node_id,
            lambda: self.engine.register(
                reg,
                session_id=request.session_id,
                peer=context.peer(),
                dry_run=request.dry_run,
                identity=request.node_id if self.tls else None,  # _authorize checked the certificate's CN is it
                secure_aggregation=request.secure_aggregation,
            ),
        )
        return pb.RegisterResponse(
            round=round_info(view),
            codec=self.cfg.codec,
            delta=self.cfg.delta,
            drop_masked_rows=self.cfg.drop_masked_rows,
            heartbeat_interval_ms=int(self.cfg.heartbeat_interval_s * 1000),
            max_chunk_bytes=CHUNK_BYTES,
            secure_aggregation=self.cfg.secure_aggregation,
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        view = self._unary(
            context,
            "Heartbeat",
            request.node_id,
            lambda: self.engine.heartbeat(request.run_id, request.node_id, request.session_id),
        )
        return pb.HeartbeatResponse(round=round_info(view))

    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.GetRoundResponse:
        wait = min(max(request.max_wait_ms, 0) / 1000.0, MAX_LONG_POLL_S)
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, never after it
            wait = max(0.0, min(wait, remaining - 1.0))
        view = self._unary(
            context,
            "GetRound",
            request.node_id,
            lambda: self.engine.round_view(
                request.run_id, request.node_id, request.wait_for_round, wait, request.session_id
            ),
            *((LONG_POLL,) if wait > 0 else ()),
        )
        return pb.GetRoundResponse(round=round_info(view))

    def FetchGlobal(self, request: pb.FetchGlobalRequest, context: grpc.ServicerContext):
        node_id = request.node_id
        try:
            with (
                self._serving(context, "FetchGlobal", node_id, STREAM),
                self.watchdog.watching(context.cancel) as transfer,
            ):
                data, sha = self.engine.published_global(request.run_id, node_id, request.version)
                try:
                    yield pb.FetchGlobalResponse(
                        header=pb.PayloadHeader(
                            run_id=self.engine.run_id,
                            round_id=request.version - 1,
                            node_id=node_id,
                            version=request.version,
                            codec=self.cfg.codec,
                            delta=self.cfg.delta,
                            raw_bytes=self.engine.raw_bytes,
                            wire_bytes=len(data),
                            sha256=sha,
                        )
                    )
                    for part in chunks(data):
                        yield pb.FetchGlobalResponse(chunk=part)
                        transfer.add(len(part))
                        self.t.update_bytes.labels(direction="down", encoding=self.cfg.codec).inc(len(part))
                except GeneratorExit:  # the call ended under us: the node went away, or the watchdog cancelled it
                    if transfer.tripped is not None:
                        self._count_refusal("FetchGlobal", node_id, EngineError(transfer.tripped, transfer.why))
                    raise
                self.t.update_raw_bytes.labels(direction="down", encoding=self.cfg.codec).inc(self.engine.raw_bytes)
        except EngineError as exc:
            self._refuse(context, "FetchGlobal", node_id, exc)

    def UploadUpdate(self, request_iterator, context: grpc.ServicerContext) -> pb.UploadUpdateResponse:
        """Receive one update: identity and the node's stream limit, header, registration, slot, payload, fold.

        With TLS the certificate names the node before a byte is read, so its limits apply from the
        first moment; in insecure mode from the header on. The watchdog bounds the whole stream (a
        stalled header included); an upload slot is taken only once the header is valid and the node
        is a registered trainer of this run, and the wait for it is bounded by the stream's deadline.
        """
        self.load.enter("UploadUpdate")
        transfer = self.watchdog.watch(context.cancel)
        node_id, held = "", ""
        h, sha256 = None, None  # the header once its identity is checked; the bytes' SHA-256 once received
        try:
            if self.tls:
                node_id = self._certified(context)
                self.limits.acquire(node_id, (RPC, STREAM))
                held = node_id
            first = self._next(request_iterator, transfer)
            if first is None or first.WhichOneof("content") != "header":
                raise EngineError(Reason.BAD_STREAM, "an upload starts with a header message")
            node_id = first.header.node_id
            self._authorize(context, node_id)  # before a single payload byte is read
            h = first.header
            if not held:
                self.limits.acquire(node_id, (RPC, STREAM))
                held = node_id
            header = UpdateHeader(
                run_id=h.run_id,
                round_id=h.round_id,
                node_id=h.node_id,
                update_id=h.update_id,
                codec=h.codec,
                sha256=h.sha256,
                wire_bytes=h.wire_bytes,
                num_train=h.num_train_samples,
                train=train_summary(h.train) if h.HasField("train") else {},  # none: kept by the node (share_metrics)
                secagg_session=h.secagg_session,
            )
            self._admissible(header)
            self.watchdog.pause(transfer)  # waiting for a slot reads nothing: not the node's slowness
            if not self.upload_slots.acquire(timeout=self.watchdog.remaining(transfer)):
                raise EngineError(
                    Reason.UPLOAD_SLOTS_BUSY,
                    f"no upload slot came free within the aggregator's "
                    f"stream deadline of {self.cfg.stream_timeout_s:g}s; retry after a backoff",
                )
            self.t.upload_slots_in_use.inc()
            try:
                self.watchdog.resume(transfer)
                payload, sha256 = self._receive(request_iterator, transfer, h)
                self.watchdog.unwatch(transfer)  # every byte is in: folding is the engine's time, not the stream's
                self._count_up(h.codec, len(payload), self.engine.raw_bytes)
                ack = self.engine.submit(header, payload, sha256)
                del payload
            finally:
                self.upload_slots.release()
                self.t.upload_slots_in_use.dec()
        except EngineError as exc:
            if h is not None and exc.reason not in LOAD_REASONS:  # the audit log: refusals of an identified node
                self.engine.audit_refusal(node_id, h.round_id, h.update_id, sha256, exc.reason)
            self._refuse(context, "UploadUpdate", node_id, exc)
        finally:
            self.watchdog.unwatch(transfer)
            if held:
                self.limits.release(held, (RPC, STREAM))
            self.load.leave("UploadUpdate")
        if ack.replayed:
            self.t.updates_replayed.inc()
        return pb.UploadUpdateResponse(
            update_id=ack.update_id,
            round_id=ack.round_id,
            replayed=ack.replayed,
            updates_received=ack.updates_received,
            receipt=ack.receipt,
            receipt_signature=ack.receipt_signature,
        )

    @staticmethod
    def _cut_off(transfer: Transfer) -> None:
        """A read ended because the watchdog cancelled the call: say so, whatever the read saw."""
        if transfer.tripped is not None:
            raise EngineError(transfer.tripped, transfer.why)

    def _next(self, request_iterator, transfer: Transfer):
        try:
            message = next(request_iterator, None)
        except grpc.RpcError as exc:
            self._cut_off(transfer)
            raise EngineError(Reason.STREAM_BROKEN, "the upload stream broke off") from exc
        self._cut_off(transfer)
        if message is UNDECODABLE:
            raise EngineError(Reason.UNDECODABLE, "an upload message is not a valid UploadUpdateRequest")
        return message

    def _receive(self, request_iterator, transfer: Transfer, h: pb.PayloadHeader) -> tuple[bytes, str]:
        """The payload and its SHA-256, hashed chunk by chunk as they arrive (outside the engine's lock)."""
        hasher = hashlib.sha256()

        def parts():
            for message in request_iterator:
                if message is UNDECODABLE:
                    raise EngineError(Reason.UNDECODABLE, "an upload message is not a valid UploadUpdateRequest")
                if message.WhichOneof("content") != "chunk":
                    raise PayloadAssemblyError("a second header inside one upload")
                chunk = message.chunk
                transfer.add(len(chunk))
                hasher.update(chunk)
                yield chunk

        try:
            payload = assemble(parts(), h.wire_bytes, MAX_PAYLOAD_BYTES)
            return payload, hasher.hexdigest()
        except PayloadAssemblyError as exc:
            self._count_up(h.codec, transfer.bytes, 0)
            self._cut_off(transfer)
            raise EngineError(exc.reason, str(exc)) from exc
        except grpc.RpcError as exc:  # gRPC ended the stream: a message over the size limit, a client gone
            self._count_up(h.codec, transfer.bytes, 0)
            self._cut_off(transfer)
            raise EngineError(Reason.STREAM_BROKEN, "the upload stream broke off") from exc

    def _admissible(self, header: UpdateHeader) -> NodeRecord:
        """What can be refused before a slot is taken: a stranger to this run, an evaluator, an impossible size.

        The engine checks all of it again (and the round) under its lock; this reads its run id and
        node table without the lock (a dict lookup) and leaves its liveness bookkeeping alone.
        """
        engine = self.engine
        if header.run_id and header.run_id != engine.run_id:
            raise EngineError(
                Reason.WRONG_RUN, f"run {header.run_id!r} is not the current run {engine.run_id!r}; register again"
            )
        rec = engine.nodes.get(header.node_id)
        if rec is None:
            raise EngineError(Reason.UNKNOWN_NODE, f"node {header.node_id!r} is not registered")
        if rec.role != Role.TRAINER:
            raise EngineError(Reason.NOT_TRAINER, f"{header.node_id} is an evaluator")
        if not 0 <= header.wire_bytes <= MAX_PAYLOAD_BYTES:
            raise EngineError(
                Reason.BAD_STREAM, f"announced payload of {header.wire_bytes} bytes is outside [0, {MAX_PAYLOAD_BYTES}]"
            )
        return rec

    def _count_up(self, codec: str, wire: int, raw: int) -> None:
        encoding = codec if codec in ("fp32", "fp16", "int8", "int4", "secagg") else "unknown"  # bounded label set
        self.t.count_payload("up", encoding, wire, raw)

    def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext
    ) -> pb.ReportMetricsResponse:
        val = metrics_from_proto(request.val) if request.HasField("val") else None
        test = metrics_from_proto(request.test) if request.HasField("test") else None
        train = train_summary(request.train) if request.HasField("train") else None
        replayed = self._unary(
            context,
            "ReportMetrics",
            request.node_id,
            lambda: self.engine.report(
                request.run_id, request.node_id, request.version, request.report_id, val, test, request.head, train
            ),
        )
        return pb.ReportMetricsResponse(report_id=request.report_id, replayed=replayed)

    # -- secure aggregation (aggregator/secure.py) -----------------------------------------------
    def _secagg(self, context, method: str, node_id: str, call):
        def run():
            try:
                session, phase, received = call()
            except SecAggError as exc:
                raise EngineError(exc.reason, str(exc)) from exc
            return pb.SecAggAck(session=session, phase=int(phase), received=received)

        return getattr(pb, f"{method}Response")(ack=self._unary(context, method, node_id, run))

    def SecAggAdvertise(self, request: pb.SecAggAdvertiseRequest, context: grpc.ServicerContext):
        return self._secagg(
            context,
            "SecAggAdvertise",
            request.node_id,
            lambda: self.engine.secagg_message(
                request.run_id,
                request.node_id,
                request.round_id,
                lambda sec: sec.advertise(request.node_id, request.session, advertisement_from_proto(request)),
            ),
        )

    def SecAggShare(self, request: pb.SecAggShareRequest, context: grpc.ServicerContext):
        dealt = DealtShares(
            request.node_id,
            {holder: bytes(box) for holder, box in request.ciphertexts.items()},
            request.b_commitment,
            bytes(request.commitment_signature),
        )
        return self._secagg(
            context,
            "SecAggShare",
            request.node_id,
            lambda: self.engine.secagg_message(
                request.run_id,
                request.node_id,
                request.round_id,
                lambda sec: sec.share(request.node_id, request.session, dealt),
            ),
        )

    def SecAggUnmask(self, request: pb.SecAggUnmaskRequest, context: grpc.ServicerContext):
        return self._secagg(
            context,
            "SecAggUnmask",
            request.node_id,
            lambda: self.engine.secagg_message(
                request.run_id,
                request.node_id,
                request.round_id,
                lambda sec: sec.unmask_shares(
                    request.node_id, request.session, [share_from_proto(s) for s in request.shares]
                ),
            ),
        )

    def SecAggPoll(self, request: pb.SecAggPollRequest, context: grpc.ServicerContext) -> pb.SecAggPollResponse:
        wait = min(max(request.max_wait_ms, 0) / 1000.0, MAX_LONG_POLL_S)
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - 1.0))
        view, sec = self._unary(
            context,
            "SecAggPoll",
            request.node_id,
            lambda: self.engine.secagg_view(
                request.run_id, request.node_id, request.session, request.wait_for_phase, wait, request.session_id
            ),
            *((LONG_POLL,) if wait > 0 else ()),
        )
        return pb.SecAggPollResponse(state=secagg_state(view, sec, self.cfg, request.wait_for_phase))


def secagg_state(view: RoundView, sec: SecureView | None, cfg: AggregatorConfig, wanted: int) -> pb.SecAggState:
    """What a node may see of the open session (SecAggState). The roster goes only to a node asking for the
    shares phase, the masking set and inbox only to one asking for the masked-input phase, the survivors only
    to one asking for the unmasking: each once per session, not with every poll (at 100 nodes the roster and
    an inbox are about 90 and 75 kB)."""
    msg = pb.SecAggState(run_id=view.run_id, round_id=view.round_id, phase=int(SecPhase.CLOSED))
    if sec is None or view.phase != Phase.COLLECTING:
        return msg
    msg.session, msg.phase = sec.session, int(sec.phase)
    msg.deadline_unix_ms = sec.deadline_unix_ms  # the phase's
    msg.message = sec.message
    if sec.roster is not None:
        msg.threshold, msg.clip = sec.roster.threshold, sec.roster.clip
        msg.max_update_norm = cfg.max_update_norm or 0.0
        msg.max_abs_value = cfg.max_abs_value or 0.0
        if wanted == SecPhase.SHARES:
            msg.roster.extend(member_to_proto(a, sec.roster.weights[n]) for n, a in sorted(sec.roster.members.items()))
    if wanted == SecPhase.MASKED:
        msg.members.extend(sec.members)
        for dealer, box in sec.inbox.items():
            msg.inbox[dealer] = box
    if wanted == SecPhase.UNMASK:
        msg.survivors.extend(sec.survivors)
        msg.excluded.extend(sec.excluded)
    return msg


class DecodeGuard(grpc.ServerInterceptor):
    """Requests that are not the protobuf they claim to be are refused by our code, never by grpcio.

    grpcio 1.85 answers a request it fails to deserialize with INTERNAL but never releases the call:
    its HTTP/2 stream stays open and about 16 KB stay allocated, per message (measured: 20,000 such
    requests on one connection, +330 MiB RSS; 10,000 on the plaintext health port, +189 MiB; under a
    per-connection stream cap every later call on that connection is refused). So every handler gets
    a deserializer that returns :data:`UNDECODABLE` instead of raising, and the call is refused here:
    the AggregatorService's by ``servicer`` (``undecodable``, INTERNAL as before, now with the reason;
    UploadUpdate checks each message it reads itself), any other service's (health, reflection) with
    INTERNAL. A refusal of our own releases everything.
    """

    def __init__(self, servicer: AggregatorServicer | None = None) -> None:
        self.servicer = servicer
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # method -> guarded handler; registered ones only

    def _ours(self, full: str) -> bool:
        return self.servicer is not None and full.startswith(f"/{SERVICE_NAME}/")

    def _refuse(self, context: grpc.ServicerContext, full: str) -> None:
        if self._ours(full):
            self.servicer.refuse_undecodable(context, full.rsplit("/", 1)[1])  # type: ignore[union-attr]
        context.abort(grpc.StatusCode.INTERNAL, "the request is not a valid protobuf message of its type")

    def _checked(self, requests, context: grpc.ServicerContext, full: str):
        for request in requests:
            if request is UNDECODABLE:
                self._refuse(context, full)
            yield request

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        full = handler_call_details.method
        cached = self._handlers.get(full)
        if cached is not None:  # built once per method, not per call
            return cached
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        guarded = self._guarded(handler, full)
        self._handlers[full] = guarded
        return guarded

    def _guarded(self, handler, full: str):
        inner, out = handler.request_deserializer, handler.response_serializer

        def deserialize(data: bytes):
            try:
                return inner(data)
            except Exception:  # noqa: BLE001 - whatever the parser raises, the bytes are not the message
                return UNDECODABLE

        if handler.unary_unary:
            unary = handler.unary_unary

            def checked_unary(request, context):
                if request is UNDECODABLE:
                    self._refuse(context, full)
                return unary(request, context)

            return grpc.unary_unary_rpc_method_handler(checked_unary, deserialize, out)
        if handler.unary_stream:
            server_stream = handler.unary_stream

            def checked_server_stream(request, context):
                if request is UNDECODABLE:
                    self._refuse(context, full)
                yield from server_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(checked_server_stream, deserialize, out)
        if handler.stream_unary:
            client_stream = handler.stream_unary
            if self._ours(full):  # UploadUpdate refuses an undecodable message with the stream's bookkeeping
                return grpc.stream_unary_rpc_method_handler(client_stream, deserialize, out)
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, context: client_stream(self._checked(requests, context, full), context),
                deserialize,
                out,
            )
        bidi = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(
            lambda requests, context: bidi(self._checked(requests, context, full), context), deserialize, out
        )


class ServiceHealth:
    """The aggregator's grpc.health.v1 statuses, set in one place.

    ``""`` (the server as a whole) is liveness: SERVING from the moment the service listens until
    shutdown, whatever the load, so a liveness probe never restarts an aggregator a flood is
    hammering. The AggregatorService's own name is readiness: NOT_SERVING also while overloaded
    (:class:`aggregator.limits.LoadMonitor`), so a readiness probe or an operator sees it.
    """

    def __init__(self, servicer: health.HealthServicer) -> None:
        self.servicer = servicer
        self._lock = threading.Lock()
        self._up = False
        self._overloaded = False
        self._publish()

    def up(self, value: bool) -> None:
        with self._lock:
            self._up = value
            self._publish()

    def overloaded(self, value: bool) -> None:
        with self._lock:
            if value != self._overloaded and self._up:
                (log.warning if value else log.info)(
                    "overload %s: health of %s is %s",
                    "began" if value else "ended",
                    SERVICE_NAME,
                    "NOT_SERVING" if value else "SERVING",
                )
            self._overloaded = value
            self._publish()

    def _publish(self) -> None:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        self.servicer.set("", serving if self._up else not_serving)
        self.servicer.set(SERVICE_NAME, serving if self._up and not self._overloaded else not_serving)


def _watch_handshakes(telemetry: Telemetry) -> HandshakeFailures:
    """Count (``fedmedclip_tls_handshake_failures_total``) and log every failed TLS handshake; see the class."""

    def failed(peer: str | None, error: str) -> None:
        telemetry.tls_handshake_failures.labels(reason=handshake_failure_reason(error)).inc()

    watcher = HandshakeFailures(failed)
    if not watcher.traced:
        log.info(
            "TLS handshake failures are counted; their peer address is logged only with GRPC_TRACE=handshaker "
            "in the aggregator's environment"
        )
    watcher.start()
    return watcher


def _host_port(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return f"{host}:{port}"


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on ``address`` (TLS with ``credentials``); the port, or a ConfigError naming the address."""
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(f"cannot listen on {address}: not an address of this machine, or the port is taken")
    return port


def _limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (``M_ARENA_MAX``) for the threads made from now on; False where not glibc.

    The sync server runs one thread per open call, so one per connected node while it long-polls; glibc gives
    threads up to 8 arenas per core, and each arena keeps the freed upload buffers its threads held. Two
    arenas keep the peak resident memory lower at hundreds of nodes (bench/results/load.md) at the price of
    some lock contention inside malloc, which the engine's lock serialises anyway.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def _tune_interpreter() -> None:
    """The interpreter settings of a server with hundreds of threads (bench/results/load.md).

    One intra-op thread for torch: the fold is serialised by the engine's lock and its tensors are small, so
    a second thread never pays, and torch's pool spins between operations on the cores the gRPC threads need
    (measured on 2 cores: 15-30 ms of CPU per update folded with torch's default of 2 threads, ~2 ms with 1).
    A shorter switch interval: the thread folding an update (holding the engine's lock, so every other
    upload waits on it) gives the GIL away at each tensor operation and may then wait up to the interval
    behind a thread running Python to get it back (measured at 200 nodes, 1 ms against the default 5 ms: fold
    5.2-5.5 against 5.8-6.0 ms of wall time per update, the same CPU). Fewer young collections, and everything
    alive once the service is built (torch, the model, the engine) frozen out of the collector: each full
    collection walked hundreds of thousands of long-lived objects that are never garbage.
    """
    torch.set_num_threads(TORCH_THREADS)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def serve(cfg: AggregatorConfig) -> int:
    """Run the aggregator until its rounds are done (``exit_when_done``) or SIGTERM/SIGINT; the exit code."""
    _limit_malloc_arenas()
    tls = load_material(
        "the aggregator", cfg.listen, insecure=cfg.insecure, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key
    )
    if tls is not None and not cfg.allowed_nodes:
        raise ConfigError(
            "allowed_nodes is empty: with TLS the aggregator admits only the node ids (certificate "
            "CNs) listed there; `fedmedclip provision` writes it"
        )
    if not (cfg.class_names and cfg.backbone_fingerprint) and not cfg.trust_first_node:
        raise ConfigError(
            "class_names and backbone_fingerprint are not set: the first node to register would set "
            "the federation's label space and backbone. Provision with --classes or --classes-file "
            "(fedmedclip provision pins both), or set trust_first_node: true to allow it"
        )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    telemetry = Telemetry("aggregator")
    # resumes, if any; a checkpoint it cannot resume stops it here (CheckpointError), before anything listens
    engine = RoundEngine(cfg, CheckpointStore(out, fault=os.environ.get(FAULT_ENV)), telemetry)
    kernels.warm_up()  # the fold's compiled loops, before the first update (about a second, unless cached)
    metrics_server, metrics_port = serve_metrics(telemetry, cfg.metrics_port, cfg.metrics_addr)

    health_servicer = health.HealthServicer()
    health_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), options=server_options(), interceptors=[DecodeGuard()]
    )  # plaintext, reachable without a certificate
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    health_port = _bind(health_server, _host_port(cfg.listen, cfg.health_port))
    status = ServiceHealth(health_servicer)  # NOT_SERVING until the service listens
    health_server.start()

    servicer = AggregatorServicer(engine, cfg, telemetry, tls=tls is not None, on_overload=status.overloaded)
    # gRPC refuses RPCs beyond max_concurrent_rpcs itself (RESOURCE_EXHAUSTED, no reason): a bound on the queue
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.max_workers),
        interceptors=[MetricsInterceptor(telemetry), DecodeGuard(servicer)],
        options=server_options() + AGGREGATOR_SERVER_OPTIONS,
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs or 4 * cfg.max_workers,
    )
    pb_grpc.add_AggregatorServiceServicer_to_server(servicer, server)
    if cfg.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, cfg.listen, server_credentials(tls) if tls is not None else None)
    handshakes = _watch_handshakes(telemetry) if tls is not None else None
    _tune_interpreter()
    server.start()
    status.up(True)
    endpoints = {
        "pid": os.getpid(),
        "run_id": engine.run_id,
        "address": _host_port(cfg.listen, port),
        "health_address": _host_port(cfg.listen, health_port),
        "metrics_port": metrics_port,
    }
    atomic_write(out / "endpoints.json", json.dumps(endpoints, indent=1).encode())
    log.info(
        "audit log %s, signed with key %s (public key %s)",
        engine.audit.path,
        engine.audit.key.public.key_id,
        cfg.audit_key and Path(cfg.audit_key).with_suffix(".pub") or out / "audit.pub",
    )
    log.info(
        "aggregator serving on %s (%s; health %s, metrics :%d%s), run %s",
        endpoints["address"],
        f"mTLS, {len(cfg.allowed_nodes or ())} nodes allowed" if tls else "PLAINTEXT, no identity",
        endpoints["health_address"],
        metrics_port,
        ", reflection on" if cfg.reflection else "",
        engine.run_id,
    )

    stop = threading.Event()
    finished = threading.Event()

    def drive() -> None:
        try:
            engine.run(stop)
        except Exception as exc:  # a bug must end the run, visibly, not leave the nodes waiting for ever
            log.exception("the round driver failed")
            engine.fail(f"internal error in the round driver: {exc!r}")
        finally:
            finished.set()

    with Shutdown() as shutdown:
        shutdown.on_stop(lambda: engine.stop(stop))  # no locks in a signal handler: the helper runs these
        shutdown.on_stop(finished.set)
        driver = threading.Thread(target=drive, name="round-driver", daemon=True)
        driver.start()
        try:
            finished.wait()
            if not shutdown.requested and not cfg.exit_when_done:
                log.info("run %s; serving until SIGTERM", engine.phase.value)
                shutdown.event.wait()
        finally:
            log.info("shutting down (%s)", f"signal {shutdown.signum}" if shutdown.requested else engine.phase.value)
            status.up(False)
            engine.stop(stop)
            server.stop(cfg.shutdown_grace_s).wait()
            driver.join(timeout=cfg.shutdown_grace_s)
            engine.write_report()
            engine.audit.close()
            health_server.stop(1.0).wait()
            metrics_server.shutdown()
            if handshakes is not None:
                handshakes.stop()
    print(engine.markdown(), flush=True)
    return 1 if engine.phase == Phase.FAILED else 0
