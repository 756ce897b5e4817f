"""The gRPC shell around :class:`aggregator.engine.RoundEngine`, and :func:`serve`, the whole service."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aggregator.checkpoint import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.engine import FAILED, FINISHED, EngineError, Registration, RoundEngine, RoundView, UpdateHeader
from shared.atomic import atomic_write
from shared.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.protocol import ROLE_NAMES, SERVICE_NAME, metrics_from_proto
from shared.telemetry import MetricsInterceptor, Telemetry, serve_metrics
from shared.transport import CHUNK_BYTES, MAX_PAYLOAD_BYTES, PayloadAssemblyError, assemble, chunks, server_options

log = logging.getLogger("fedmedclip.aggregator")

_PHASES = {"waiting_for_nodes": pb.ROUND_PHASE_WAITING_FOR_NODES, "collecting": pb.ROUND_PHASE_COLLECTING,
           FINISHED: pb.ROUND_PHASE_FINISHED, FAILED: pb.ROUND_PHASE_FAILED}
MAX_LONG_POLL_S = 30.0


def round_info(view: RoundView) -> pb.RoundInfo:
    return pb.RoundInfo(run_id=view.run_id, round_id=view.round_id, global_version=view.global_version,
                        total_rounds=view.total_rounds, phase=_PHASES[view.phase],
                        deadline_unix_ms=view.deadline_unix_ms, update_accepted=view.update_accepted,
                        registered_trainers=view.registered_trainers, updates_received=view.updates_received,
                        message=view.message)


class AggregatorServicer(pb_grpc.AggregatorServiceServicer):
    def __init__(self, engine: RoundEngine, cfg: AggregatorConfig, telemetry: Telemetry) -> None:
        self.engine, self.cfg, self.t = engine, cfg, telemetry

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: EngineError) -> None:
        context.abort(getattr(grpc.StatusCode, exc.code), exc.message)

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        reg = Registration(node_id=request.node_id, role=ROLE_NAMES.get(request.role, "unspecified"),
                           fingerprint=request.backbone_fingerprint, class_names=tuple(request.class_names),
                           embed_dim=request.embed_dim, method=request.method,
                           initial_sha256=request.initial_state_sha256, num_train=request.num_train_samples,
                           num_val=request.num_val_samples, num_test=request.num_test_samples)
        try:
            view = self.engine.register(reg)
        except EngineError as exc:
            self._abort(context, exc)
        return pb.RegisterResponse(round=round_info(view), codec=self.cfg.codec, delta=self.cfg.delta,
                                   drop_masked_rows=self.cfg.drop_masked_rows,
                                   heartbeat_interval_ms=int(self.cfg.heartbeat_interval_s * 1000),
                                   max_chunk_bytes=CHUNK_BYTES)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        try:
            return pb.HeartbeatResponse(round=round_info(self.engine.heartbeat(request.run_id, request.node_id)))
        except EngineError as exc:
            self._abort(context, exc)

    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.GetRoundResponse:
        wait = min(max(request.max_wait_ms, 0) / 1000.0, MAX_LONG_POLL_S)
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, never after it
            wait = max(0.0, min(wait, remaining - 1.0))
        try:
            view = self.engine.round_view(request.run_id, request.node_id, request.wait_for_round, wait)
        except EngineError as exc:
            self._abort(context, exc)
        return pb.GetRoundResponse(round=round_info(view))

    def FetchGlobal(self, request: pb.FetchGlobalRequest, context: grpc.ServicerContext):
        try:
            data, sha = self.engine.published_global(request.run_id, request.node_id, request.version)
        except EngineError as exc:
            self._abort(context, exc)
        yield pb.FetchGlobalResponse(header=pb.PayloadHeader(
            run_id=self.engine.run_id, round_id=request.version - 1, node_id=request.node_id,
            version=request.version, codec=self.cfg.codec, delta=self.cfg.delta, raw_bytes=self.engine.raw_bytes,
            wire_bytes=len(data), sha256=sha))
        sent = 0
        for part in chunks(data):
            yield pb.FetchGlobalResponse(chunk=part)
            sent += len(part)
            self.t.update_bytes.labels(direction="down", encoding=self.cfg.codec).inc(len(part))
        self.t.update_raw_bytes.labels(direction="down", encoding=self.cfg.codec).inc(self.engine.raw_bytes)

    def UploadUpdate(self, request_iterator, context: grpc.ServicerContext) -> pb.UploadUpdateResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("content") != "header":
            self.t.updates_rejected.labels(reason="bad_stream").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload starts with a header message")
        h = first.header
        received = [0]

        def parts():
            for message in request_iterator:
                if message.WhichOneof("content") != "chunk":
                    raise PayloadAssemblyError("a second header inside one upload")
                received[0] += len(message.chunk)
                yield message.chunk

        try:
            payload = assemble(parts(), h.wire_bytes, MAX_PAYLOAD_BYTES)
        except PayloadAssemblyError as exc:
            self._count_up(h.codec, received[0], 0)
            self.t.updates_rejected.labels(reason="bad_stream").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._count_up(h.codec, len(payload), self.engine.raw_bytes)
        header = UpdateHeader(run_id=h.run_id, round_id=h.round_id, node_id=h.node_id, update_id=h.update_id,
                              codec=h.codec, sha256=h.sha256, wire_bytes=h.wire_bytes,
                              train={"steps": h.train.steps, "seconds": h.train.seconds, "loss": h.train.loss})
        try:
            ack = self.engine.submit(header, payload)
        except EngineError as exc:
            self.t.updates_rejected.labels(reason=exc.reason).inc()
            log.warning("update %s from %s refused (%s): %s", h.update_id, h.node_id, exc.code, exc.message)
            self._abort(context, exc)
        return pb.UploadUpdateResponse(update_id=ack.update_id, round_id=ack.round_id, replayed=ack.replayed,
                                       updates_received=ack.updates_received)

    def _count_up(self, codec: str, wire: int, raw: int) -> None:
        encoding = codec if codec in ("fp32", "fp16", "int8", "int4") else "unknown"  # bounded label set
        self.t.count_payload("up", encoding, wire, raw)

    def ReportMetrics(self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext) -> pb.ReportMetricsResponse:
        val = metrics_from_proto(request.val) if request.HasField("val") else None
        test = metrics_from_proto(request.test) if request.HasField("test") else None
        train = {"steps": request.train.steps, "seconds": request.train.seconds, "loss": request.train.loss} \
            if request.HasField("train") else None
        try:
            replayed = self.engine.report(request.run_id, request.node_id, request.version, request.report_id, val,
                                          test, request.head, train)
        except EngineError as exc:
            self._abort(context, exc)
        return pb.ReportMetricsResponse(report_id=request.report_id, replayed=replayed)


def _host_port(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return f"{host}:{port}"


def serve(cfg: AggregatorConfig) -> int:
    """Run the aggregator until its rounds are done (``exit_when_done``) or SIGTERM/SIGINT; the exit code."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    telemetry = Telemetry("aggregator")
    metrics_server, metrics_port = serve_metrics(telemetry, cfg.metrics_port, cfg.metrics_addr)

    health_servicer = health.HealthServicer()
    health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options())
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    health_port = health_server.add_insecure_port(_host_port(cfg.listen, cfg.health_port))
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_server.start()

    engine = RoundEngine(cfg, CheckpointStore(out), telemetry)  # loads the checkpoint, if any

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers),
                         interceptors=[MetricsInterceptor(telemetry)], options=server_options())
    pb_grpc.add_AggregatorServiceServicer_to_server(AggregatorServicer(engine, cfg, telemetry), server)
    if cfg.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    endpoints = {"pid": os.getpid(), "run_id": engine.run_id, "address": _host_port(cfg.listen, port),
                 "health_address": _host_port(cfg.listen, health_port), "metrics_port": metrics_port}
    atomic_write(out / "endpoints.json", json.dumps(endpoints, indent=1).encode())
    log.info("aggregator serving on %s (health %s, metrics :%d%s), run %s", endpoints["address"],
             endpoints["health_address"], metrics_port, ", reflection on" if cfg.reflection else "", engine.run_id)

    stop = threading.Event()
    finished = threading.Event()
    signalled: list[int] = []

    def on_signal(signum, _frame) -> None:
        signalled.append(signum)
        # no locks in a signal handler: a helper thread wakes the engine
        threading.Thread(target=engine.stop, args=(stop,), daemon=True).start()
        finished.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def drive() -> None:
        try:
            engine.run(stop)
        finally:
            finished.set()

    driver = threading.Thread(target=drive, name="round-driver", daemon=True)
    driver.start()
    try:
        finished.wait()
        if not signalled and not cfg.exit_when_done:
            log.info("run %s; serving until SIGTERM", engine.phase)
            finished.clear()
            finished.wait()
    finally:
        log.info("shutting down (%s)", f"signal {signalled[0]}" if signalled else engine.phase)
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        engine.stop(stop)
        server.stop(cfg.shutdown_grace_s).wait()
        driver.join(timeout=cfg.shutdown_grace_s)
        engine.write_report()
        health_server.stop(1.0).wait()
        metrics_server.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(engine.markdown(), flush=True)
    return 1 if engine.phase == FAILED else 0
