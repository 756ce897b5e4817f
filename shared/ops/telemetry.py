"""Prometheus metrics of both services, and the gRPC server interceptor that feeds some of them.

Names follow docs/conventions.md: prefix ``fedmedclip_``, base units as suffix, counters end in
``_total``, durations are histograms, label sets are bounded (node ids yes, image ids never).
Each service builds one :class:`Telemetry` on its own registry (no global mutable state) and
serves it on ``/metrics`` with :func:`serve_metrics`. A compression ratio is a PromQL division:
``fedmedclip_update_raw_bytes_total / fedmedclip_update_bytes_total``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from shared import __version__
from shared.wire.reasons import Reason

SERVICES = ("aggregator", "hospital_node")

# Round and training phases on this machine run from milliseconds to minutes.
_SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


class Telemetry:
    """The metrics one service exports. ``service`` picks which series exist."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        if service not in SERVICES:
            raise ValueError(f"service must be one of {SERVICES}")
        self.service = service
        self.registry = registry or CollectorRegistry()
        r = self.registry
        info = Info("fedmedclip_build", "Build of this service", registry=r)
        info.info({"version": __version__, "service": service, "python": platform.python_version()})
        self.round_current = Gauge(
            "fedmedclip_round_current", "Round currently open (aggregator) or trained (node)", registry=r
        )
        self.update_bytes = Counter(
            "fedmedclip_update_bytes_total", "Adapter payload bytes on the wire", ["direction", "encoding"], registry=r
        )
        self.update_raw_bytes = Counter(
            "fedmedclip_update_raw_bytes_total",
            "The same adapters as plain float32, all rows (the raw side of the ratio)",
            ["direction", "encoding"],
            registry=r,
        )
        self.codec_seconds = Histogram(
            "fedmedclip_codec_duration_seconds",
            "Codec encode/decode time per payload",
            ["operation"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.validation_accuracy = Gauge(
            "fedmedclip_validation_accuracy_ratio",
            "Last validation accuracy per node (test accuracy for an evaluator)",
            ["node"],
            registry=r,
        )
        self.updates_accepted = Counter("fedmedclip_updates_accepted_total", "Adapter updates accepted", registry=r)
        if service == "aggregator":
            self.round_seconds = Histogram(
                "fedmedclip_round_duration_seconds",
                "Wall time of a round, open to publish",
                buckets=_SECONDS_BUCKETS,
                registry=r,
            )
            self.aggregate_seconds = Histogram(
                "fedmedclip_aggregate_duration_seconds",
                "Time to fold one update into the running average, and to publish",
                ["step"],
                buckets=_SECONDS_BUCKETS,
                registry=r,
            )
            self.updates_rejected = Counter(
                "fedmedclip_updates_rejected_total", "Adapter updates refused, by reason", ["reason"], registry=r
            )
            self.updates_replayed = Counter(
                "fedmedclip_updates_replayed_total",
                "Retries of an accepted update, answered again and not counted twice",
                registry=r,
            )
            self.requests_rejected = Counter(
                "fedmedclip_requests_rejected_total",
                "Requests of any RPC refused with a typed status (identity checks included), by RPC and reason",
                ["method", "reason"],
                registry=r,
            )
            self.nodes_connected = Gauge(
                "fedmedclip_nodes_connected", "Registered nodes heard from within the liveness window", registry=r
            )
            self.nodes_registered = Gauge(
                "fedmedclip_nodes_registered", "Registered nodes, by role", ["role"], registry=r
            )
            self.grpc_handled = Counter(
                "fedmedclip_grpc_server_handled_total",
                "RPCs completed, by status code",
                ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
                registry=r,
            )
            self.grpc_seconds = Histogram(
                "fedmedclip_grpc_server_handling_seconds",
                "RPC handling time",
                ["grpc_service", "grpc_method", "grpc_type"],
                buckets=_SECONDS_BUCKETS,
                registry=r,
            )
            # load (aggregator/limits.py); refusals for a limit are in fedmedclip_requests_rejected_total{reason}
            self.rpcs_in_flight = Gauge(
                "fedmedclip_rpcs_in_flight",
                "RPCs being handled now, each on a worker thread, by RPC",
                ["method"],
                registry=r,
            )
            self.upload_slots_in_use = Gauge(
                "fedmedclip_upload_slots_in_use", "Upload slots taken (uploads being received)", registry=r
            )
            self.overloaded = Gauge(
                "fedmedclip_overloaded",
                "1 while health reports overload: workers over the high-water mark, or requests "
                "refused for a load limit within overload_hold_s",
                registry=r,
            )
            self.tls_handshake_failures = Counter(
                "fedmedclip_tls_handshake_failures_total",
                "TLS handshakes that failed on the aggregator's ports, by failure (read from gRPC core's log)",
                ["reason"],
                registry=r,
            )
        else:
            self.local_train_seconds = Histogram(
                "fedmedclip_local_train_duration_seconds",
                "Local training time of one round",
                buckets=_SECONDS_BUCKETS,
                registry=r,
            )
            self.encode_seconds = Histogram(
                "fedmedclip_encode_duration_seconds",
                "Image feature encoding at start-up (cache misses only)",
                buckets=_SECONDS_BUCKETS,
                registry=r,
            )
            self.encode_images = Counter(
                "fedmedclip_encode_images_total",
                "Images whose features were computed or read from the cache",
                ["source"],
                registry=r,
            )
            self.updates_rejected = Counter(
                "fedmedclip_updates_rejected_total",
                "Updates of this node the aggregator refused, by reason",
                ["reason"],
                registry=r,
            )

    def count_payload(self, direction: str, encoding: str, wire_bytes: int, raw_bytes: int) -> None:
        self.update_bytes.labels(direction=direction, encoding=encoding).inc(wire_bytes)
        self.update_raw_bytes.labels(direction=direction, encoding=encoding).inc(raw_bytes)


def serve_metrics(telemetry: Telemetry, port: int, addr: str = "127.0.0.1") -> tuple[Any, int]:
    """Serve ``/metrics`` on ``addr:port`` (0 picks a free port); returns (server, actual port)."""
    server, _thread = start_http_server(port, addr=addr, registry=telemetry.registry)
    return server, int(server.server_port)


# --------------------------------------------------------------------------- gRPC interceptor


def _split_method(full: str) -> tuple[str, str]:
    # "/fedmedclip.v1.AggregatorService/Register" -> ("fedmedclip.v1.AggregatorService", "Register")
    parts = full.strip("/").split("/")
    return (parts[0], parts[1]) if len(parts) == 2 else ("unknown", full)


def _code_name(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        code = default
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by final status code and times it (unary and streaming alike)."""

    def __init__(self, telemetry: Telemetry, clock: Callable[[], float] = time.perf_counter) -> None:
        self.t = telemetry
        self.clock = clock

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        deserializer = self._counting(handler.request_deserializer, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, method, "unary"),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, service, method, "client_stream"),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, method, "server_stream"),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, service, method, "bidi_stream"),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _counting(self, deserializer, method: str):
        """Count messages that are not the protobuf they claim to be (gRPC then answers INTERNAL)."""
        rejected = getattr(self.t, "requests_rejected", None)
        if deserializer is None or rejected is None:
            return deserializer

        def deserialize(data: bytes):
            try:
                return deserializer(data)
            except Exception:
                rejected.labels(method=method, reason=Reason.UNDECODABLE).inc()
                raise

        return deserialize

    def _observe(self, service: str, method: str, kind: str, code: str, start: float) -> None:
        self.t.grpc_handled.labels(grpc_service=service, grpc_method=method, grpc_type=kind, grpc_code=code).inc()
        self.t.grpc_seconds.labels(grpc_service=service, grpc_method=method, grpc_type=kind).observe(
            self.clock() - start
        )

    def _wrap_unary(self, behavior, service: str, method: str, kind: str):
        def wrapped(request_or_iterator, context: grpc.ServicerContext):
            start = self.clock()
            try:
                response = behavior(request_or_iterator, context)
            except BaseException:
                self._observe(service, method, kind, _code_name(context, grpc.StatusCode.UNKNOWN), start)
                raise
            self._observe(service, method, kind, _code_name(context, grpc.StatusCode.OK), start)
            return response

        return wrapped

    def _wrap_stream(self, behavior, service: str, method: str, kind: str):
        def wrapped(request_or_iterator, context: grpc.ServicerContext) -> Iterator:
            start = self.clock()
            try:
                yield from behavior(request_or_iterator, context)
            except GeneratorExit:  # the client went away mid-stream
                self._observe(service, method, kind, grpc.StatusCode.CANCELLED.name, start)
                raise
            except BaseException:
                self._observe(service, method, kind, _code_name(context, grpc.StatusCode.UNKNOWN), start)
                raise
            self._observe(service, method, kind, _code_name(context, grpc.StatusCode.OK), start)

        return wrapped
