"""The gRPC shell around :class:`aggregator.engine.RoundEngine`, and :func:`serve`, the whole service.

Every RPC first passes :meth:`AggregatorServicer._authorize`, the one identity check (mTLS: the
client certificate's CN is on the allow-list and is the node id the request claims); every refusal
goes through :meth:`AggregatorServicer._refuse`: a rich status naming its
:class:`shared.wire.reasons.Reason` (:func:`shared.wire.reasons.abort`), a log line and
``fedmedclip_requests_rejected_total{method,reason}`` (and ``fedmedclip_updates_rejected_total{reason}``
for uploads). The engine's phases and roles map to the wire's enums here, and only here
(:data:`PHASE_TO_PROTO`, :data:`ROLE_TO_PROTO`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aggregator.checkpoint import FAULT_ENV, CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.engine import Phase, RoundEngine, RoundView, UpdateHeader
from aggregator.errors import EngineError
from aggregator.registry import Registration, Role
from shared.ops.atomic import atomic_write
from shared.ops.config import ConfigError
from shared.ops.lifecycle import Shutdown
from shared.ops.logs import printable
from shared.ops.telemetry import MetricsInterceptor, Telemetry, serve_metrics
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.protocol import SERVICE_NAME, metrics_from_proto
from shared.wire.reasons import Reason, abort
from shared.wire.tls import load_material, peer_common_name, server_credentials
from shared.wire.transport import CHUNK_BYTES, MAX_PAYLOAD_BYTES, PayloadAssemblyError, assemble, chunks, server_options

log = logging.getLogger("fedmedclip.aggregator")

PHASE_TO_PROTO = {Phase.WAITING_FOR_NODES: pb.ROUND_PHASE_WAITING_FOR_NODES,
                  Phase.COLLECTING: pb.ROUND_PHASE_COLLECTING, Phase.FINISHED: pb.ROUND_PHASE_FINISHED,
                  Phase.FAILED: pb.ROUND_PHASE_FAILED}
ROLE_TO_PROTO = {Role.TRAINER: pb.NODE_ROLE_TRAINER, Role.EVALUATOR: pb.NODE_ROLE_EVALUATOR}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}
MAX_LONG_POLL_S = 30.0


def round_info(view: RoundView) -> pb.RoundInfo:
    return pb.RoundInfo(run_id=view.run_id, round_id=view.round_id, global_version=view.global_version,
                        total_rounds=view.total_rounds, phase=PHASE_TO_PROTO[view.phase],
                        deadline_unix_ms=view.deadline_unix_ms, update_accepted=view.update_accepted,
                        registered_trainers=view.registered_trainers, updates_received=view.updates_received,
                        message=view.message)


class AggregatorServicer(pb_grpc.AggregatorServiceServicer):
    def __init__(self, engine: RoundEngine, cfg: AggregatorConfig, telemetry: Telemetry, *, tls: bool) -> None:
        self.engine, self.cfg, self.t, self.tls = engine, cfg, telemetry, tls
        self.allowed = frozenset(cfg.allowed_nodes) if cfg.allowed_nodes else None
        # folding is serialised by the engine anyway: more payloads in memory at once buy nothing
        self.upload_slots = threading.BoundedSemaphore(cfg.upload_slots)

    def _authorize(self, context: grpc.ServicerContext, node_id: str) -> None:
        """The identity check of every request: may this peer speak for ``node_id``?"""
        if not self.tls:  # insecure mode: only the claimed id can be checked
            if self.allowed is not None and node_id not in self.allowed:
                raise EngineError(Reason.IDENTITY_NOT_ALLOWED, f"node {node_id!r} is not allowed")
            return
        cn = peer_common_name(context)
        if cn is None:  # the handshake demands a certificate; this is defence in depth
            raise EngineError(Reason.NO_CERTIFICATE, "a client certificate is required")
        if self.allowed is None or cn not in self.allowed:
            raise EngineError(Reason.IDENTITY_NOT_ALLOWED, f"certificate {cn!r} is not on the aggregator's allow-list")
        if cn != node_id:
            raise EngineError(Reason.IDENTITY_MISMATCH, f"certificate {cn!r} cannot speak for node {node_id!r}")

    def _refuse(self, context: grpc.ServicerContext, method: str, node_id: str, exc: EngineError) -> None:
        """Count, log and answer a refusal with its rich status (raises, as context.abort does)."""
        self.t.requests_rejected.labels(method=method, reason=exc.reason).inc()
        if method == "UploadUpdate":
            self.t.updates_rejected.labels(reason=exc.reason).inc()
        log.warning("%s from %r refused (%s, %s): %s", method, node_id[:64], exc.code.name, exc.reason,
                    printable(exc.message, 1000))
        abort(context, exc.reason, exc.message)

    def _unary(self, context: grpc.ServicerContext, method: str, node_id: str, call):
        try:
            self._authorize(context, node_id)
            return call()
        except EngineError as exc:
            self._refuse(context, method, node_id, exc)

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        reg = Registration(node_id=request.node_id, role=ROLE_FROM_PROTO.get(request.role),
                           fingerprint=request.backbone_fingerprint, class_names=tuple(request.class_names),
                           embed_dim=request.embed_dim, method=request.method,
                           initial_sha256=request.initial_state_sha256, num_train=request.num_train_samples,
                           num_val=request.num_val_samples, num_test=request.num_test_samples,
                           software_version=request.software_version)
        view = self._unary(context, "Register", request.node_id, lambda: self.engine.register(reg))
        return pb.RegisterResponse(round=round_info(view), codec=self.cfg.codec, delta=self.cfg.delta,
                                   drop_masked_rows=self.cfg.drop_masked_rows,
                                   heartbeat_interval_ms=int(self.cfg.heartbeat_interval_s * 1000),
                                   max_chunk_bytes=CHUNK_BYTES)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        view = self._unary(context, "Heartbeat", request.node_id,
                           lambda: self.engine.heartbeat(request.run_id, request.node_id))
        return pb.HeartbeatResponse(round=round_info(view))

    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.GetRoundResponse:
        wait = min(max(request.max_wait_ms, 0) / 1000.0, MAX_LONG_POLL_S)
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, never after it
            wait = max(0.0, min(wait, remaining - 1.0))
        view = self._unary(context, "GetRound", request.node_id, lambda: self.engine.round_view(
            request.run_id, request.node_id, request.wait_for_round, wait))
        return pb.GetRoundResponse(round=round_info(view))

    def FetchGlobal(self, request: pb.FetchGlobalRequest, context: grpc.ServicerContext):
        data, sha = self._unary(context, "FetchGlobal", request.node_id, lambda: self.engine.published_global(
            request.run_id, request.node_id, request.version))
        yield pb.FetchGlobalResponse(header=pb.PayloadHeader(
            run_id=self.engine.run_id, round_id=request.version - 1, node_id=request.node_id,
            version=request.version, codec=self.cfg.codec, delta=self.cfg.delta, raw_bytes=self.engine.raw_bytes,
            wire_bytes=len(data), sha256=sha))
        for part in chunks(data):
            yield pb.FetchGlobalResponse(chunk=part)
            self.t.update_bytes.labels(direction="down", encoding=self.cfg.codec).inc(len(part))
        self.t.update_raw_bytes.labels(direction="down", encoding=self.cfg.codec).inc(self.engine.raw_bytes)

    def UploadUpdate(self, request_iterator, context: grpc.ServicerContext) -> pb.UploadUpdateResponse:
        received = [0]

        def parts():
            for message in request_iterator:
                if message.WhichOneof("content") != "chunk":
                    raise PayloadAssemblyError("a second header inside one upload")
                received[0] += len(message.chunk)
                yield message.chunk

        node_id = ""
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("content") != "header":
                raise EngineError(Reason.BAD_STREAM, "an upload starts with a header message")
            h = first.header
            node_id = h.node_id
            self._authorize(context, h.node_id)  # before a single payload byte is read
            header = UpdateHeader(run_id=h.run_id, round_id=h.round_id, node_id=h.node_id, update_id=h.update_id,
                                  codec=h.codec, sha256=h.sha256, wire_bytes=h.wire_bytes,
                                  num_train=h.num_train_samples,
                                  train={"steps": h.train.steps, "seconds": h.train.seconds, "loss": h.train.loss})
            with self.upload_slots:
                try:
                    payload = assemble(parts(), h.wire_bytes, MAX_PAYLOAD_BYTES)
                except PayloadAssemblyError as exc:
                    self._count_up(h.codec, received[0], 0)
                    raise EngineError(exc.reason, str(exc)) from exc
                except grpc.RpcError as exc:  # gRPC ended the stream: a message over the size limit, a client gone
                    self._count_up(h.codec, received[0], 0)
                    raise EngineError(Reason.STREAM_BROKEN, "the upload stream broke off") from exc
                self._count_up(h.codec, len(payload), self.engine.raw_bytes)
                ack = self.engine.submit(header, payload)
                del payload
        except EngineError as exc:
            self._refuse(context, "UploadUpdate", node_id, exc)
        if ack.replayed:
            self.t.updates_replayed.inc()
        return pb.UploadUpdateResponse(update_id=ack.update_id, round_id=ack.round_id, replayed=ack.replayed,
                                       updates_received=ack.updates_received)

    def _count_up(self, codec: str, wire: int, raw: int) -> None:
        encoding = codec if codec in ("fp32", "fp16", "int8", "int4") else "unknown"  # bounded label set
        self.t.count_payload("up", encoding, wire, raw)

    def ReportMetrics(self, request: pb.ReportMetricsRequest,
                      context: grpc.ServicerContext) -> pb.ReportMetricsResponse:
        val = metrics_from_proto(request.val) if request.HasField("val") else None
        test = metrics_from_proto(request.test) if request.HasField("test") else None
        train = {"steps": request.train.steps, "seconds": request.train.seconds, "loss": request.train.loss} \
            if request.HasField("train") else None
        replayed = self._unary(context, "ReportMetrics", request.node_id, lambda: self.engine.report(
            request.run_id, request.node_id, request.version, request.report_id, val, test, request.head, train))
        return pb.ReportMetricsResponse(report_id=request.report_id, replayed=replayed)


def _host_port(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return f"{host}:{port}"


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on ``address`` (TLS with ``credentials``); the port, or a ConfigError naming the address."""
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(f"cannot listen on {address}: not an address of this machine, or the port is taken")
    return port


def serve(cfg: AggregatorConfig) -> int:
    """Run the aggregator until its rounds are done (``exit_when_done``) or SIGTERM/SIGINT; the exit code."""
    tls = load_material("the aggregator", cfg.listen, insecure=cfg.insecure, ca=cfg.tls_ca, cert=cfg.tls_cert,
                        key=cfg.tls_key)
    if tls is not None and not cfg.allowed_nodes:
        raise ConfigError("allowed_nodes is empty: with TLS the aggregator admits only the node ids (certificate "
                          "CNs) listed there; `python -m aggregator provision` writes it")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    telemetry = Telemetry("aggregator")
    # resumes, if any; a checkpoint it cannot resume stops it here (CheckpointError), before anything listens
    engine = RoundEngine(cfg, CheckpointStore(out, fault=os.environ.get(FAULT_ENV)), telemetry)
    metrics_server, metrics_port = serve_metrics(telemetry, cfg.metrics_port, cfg.metrics_addr)

    health_servicer = health.HealthServicer()
    health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options())
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    health_port = _bind(health_server, _host_port(cfg.listen, cfg.health_port))
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_server.start()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers),
                         interceptors=[MetricsInterceptor(telemetry)], options=server_options())
    pb_grpc.add_AggregatorServiceServicer_to_server(AggregatorServicer(engine, cfg, telemetry, tls=tls is not None),
                                                    server)
    if cfg.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, cfg.listen, server_credentials(tls) if tls is not None else None)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    endpoints = {"pid": os.getpid(), "run_id": engine.run_id, "address": _host_port(cfg.listen, port),
                 "health_address": _host_port(cfg.listen, health_port), "metrics_port": metrics_port}
    atomic_write(out / "endpoints.json", json.dumps(endpoints, indent=1).encode())
    log.info("aggregator serving on %s (%s; health %s, metrics :%d%s), run %s", endpoints["address"],
             f"mTLS, {len(cfg.allowed_nodes or ())} nodes allowed" if tls else "PLAINTEXT, no identity",
             endpoints["health_address"], metrics_port, ", reflection on" if cfg.reflection else "", engine.run_id)

    stop = threading.Event()
    finished = threading.Event()

    def drive() -> None:
        try:
            engine.run(stop)
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
            for name in ("", SERVICE_NAME):
                health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            engine.stop(stop)
            server.stop(cfg.shutdown_grace_s).wait()
            driver.join(timeout=cfg.shutdown_grace_s)
            engine.write_report()
            health_server.stop(1.0).wait()
            metrics_server.shutdown()
    print(engine.markdown(), flush=True)
    return 1 if engine.phase == Phase.FAILED else 0
