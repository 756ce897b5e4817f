"""Prometheus metrics of both services, and the gRPC server interceptor that feeds some of them.

Names follow docs/conventions.md: prefix ``fedmedclip_``, base units as suffix, counters end in
``_total``, durations are histograms, label sets are bounded (node ids yes, image ids never).
Each service builds one :class:`Telemetry` on its own registry (no global mutable state) and
serves it on ``/metrics`` with :func:`serve_metrics`. A compression ratio is a PromQL division:
``fedmedclip_update_raw_bytes_total / fedmedclip_update_bytes_total``.

All traffic, not only the adapters: every protobuf message of the AggregatorService is counted, by RPC
and direction (``up``: node to aggregator, ``down``), in ``fedmedclip_rpc_message_bytes_total`` and
in a :class:`Traffic` tally that the aggregator reads once per round (its report's ``traffic``) and
the node once per round (a log line). The aggregator counts with :class:`MetricsInterceptor`, the node
with :class:`CountingClientInterceptor`. They count message bytes as serialised, not the HTTP/2 and
TLS framing around them (a few percent more on the wire).
"""

from __future__ import annotations

import json
import platform
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

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
        self.traffic = Traffic(
            Counter(
                "fedmedclip_rpc_message_bytes_total",
                "Protobuf message bytes of every AggregatorService RPC, by RPC and direction (up: node to aggregator)",
                ["grpc_method", "direction"],
                registry=r,
            )
        )
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
            self.aggregate_cpu = Counter(
                "fedmedclip_aggregate_cpu_seconds_total",
                "CPU time of the aggregating thread in each step of fedmedclip_aggregate_duration_seconds "
                "(its wall time also holds waits for the interpreter and the CPU, which other calls share)",
                ["step"],
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
            self.run_active = Gauge(
                "fedmedclip_run_active",
                "1 while the run waits for nodes or collects rounds, 0 once it finished or failed",
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
            self.session_takeovers = Counter(
                "fedmedclip_session_takeovers_total",
                "Registrations of a node id by a second process while its session was live (the old one is refused)",
                ["node"],
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
                "Distinct images whose features were computed (counted per batch, as encoding goes) or read "
                "from the cache",
                ["source"],
                registry=r,
            )
            self.encode_pending = Gauge(
                "fedmedclip_encode_pending_images",
                "Images still to encode at start-up (cache misses not encoded yet); 0 once features are ready",
                registry=r,
            )
            self.updates_rejected = Counter(
                "fedmedclip_updates_rejected_total",
                "Updates of this node the aggregator refused, by reason",
                ["reason"],
                registry=r,
            )
            # differential privacy, by node (absent when the node trains without it)
            self.dp_epsilon = Gauge(
                "fedmedclip_dp_epsilon",
                "Differential privacy: epsilon this node has spent in the current run (at fedmedclip_dp_delta)",
                ["node"],
                registry=r,
            )
            self.dp_delta = Gauge(
                "fedmedclip_dp_delta", "Differential privacy: delta of the guarantee", ["node"], registry=r
            )
            self.dp_epsilon_budget = Gauge(
                "fedmedclip_dp_epsilon_budget",
                "Differential privacy: the epsilon budget of the run (+Inf: none); training stops before passing it",
                ["node"],
                registry=r,
            )
            self.dp_budget_exhausted = Gauge(
                "fedmedclip_dp_budget_exhausted",
                "Differential privacy: 1 once one more round would pass the budget (the node trains no further)",
                ["node"],
                registry=r,
            )

    def count_payload(self, direction: str, encoding: str, wire_bytes: int, raw_bytes: int) -> None:
        self.update_bytes.labels(direction=direction, encoding=encoding).inc(wire_bytes)
        self.update_raw_bytes.labels(direction=direction, encoding=encoding).inc(raw_bytes)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


def serve_metrics(
    telemetry: Telemetry, port: int, addr: str = "127.0.0.1", health: Callable[[], dict[str, Any]] | None = None
) -> tuple[Any, int]:
    """Serve ``/metrics`` on ``addr:port`` (0 picks a free port), and ``/healthz`` when ``health`` is given:
    its dict as JSON, HTTP 200 while ``health()["status"] == "ok"``, else 503. Returns (server, actual port);
    ``server.shutdown()`` stops it."""
    metrics = make_wsgi_app(telemetry.registry)

    def app(environ, start_response):
        if health is not None and environ.get("PATH_INFO") == "/healthz":
            body = health()
            status = "200 OK" if body.get("status") == "ok" else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]
        return metrics(environ, start_response)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    server = make_server(addr, port, app, Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
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


class Traffic:
    """Message bytes by RPC and direction: a Prometheus counter, and a tally since the last :meth:`take`."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._children: dict[tuple[str, str], Any] = {}  # (method, direction) -> the counter's child
        self._lock = threading.Lock()
        self._since: defaultdict[tuple[str, str], int] = defaultdict(int)

    def add(self, method: str, direction: str, nbytes: int) -> None:
        child = self._children.get((method, direction))
        if child is None:  # labels() takes the metric's lock and builds its key: once per RPC and direction
            child = self._children[(method, direction)] = self.counter.labels(grpc_method=method, direction=direction)
        child.inc(nbytes)
        with self._lock:
            self._since[(method, direction)] += nbytes

    def take(self) -> dict[str, Any]:
        """The bytes since the last call (and start a new tally): ``{"up", "down", "by_rpc": {rpc: {up, down}}}``."""
        with self._lock:
            since, self._since = self._since, defaultdict(int)
        return self._summary(since)

    def peek(self) -> dict[str, Any]:
        """The bytes since the last :meth:`take`, as it returns them, without starting a new tally."""
        with self._lock:
            since = dict(self._since)
        return self._summary(since)

    @staticmethod
    def _summary(since: dict[tuple[str, str], int]) -> dict[str, Any]:
        by_rpc: dict[str, dict[str, int]] = {}
        for (method, direction), n in sorted(since.items()):
            by_rpc.setdefault(method, {"up": 0, "down": 0})[direction] += n
        return {
            "up": sum(v["up"] for v in by_rpc.values()),
            "down": sum(v["down"] for v in by_rpc.values()),
            "by_rpc": by_rpc,
        }


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by final status code and times it (unary and streaming alike)."""

    def __init__(self, telemetry: Telemetry, clock: Callable[[], float] = time.perf_counter) -> None:
        self.t = telemetry
        self.clock = clock
        # method -> the wrapped handler: built once per registered method, not per call (a load of hundreds of
        # nodes makes thousands of calls a round); unknown methods (None) are never kept, so the map stays bounded
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}  # labels -> (handled, seconds) children

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        full = handler_call_details.method
        cached = self._handlers.get(full)
        if cached is not None:
            return cached
        wrapped = self._intercept(continuation, handler_call_details)
        if wrapped is not None:
            self._handlers[full] = wrapped
        return wrapped

    def _intercept(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        deserializer = self._counting(handler.request_deserializer, method)
        serializer = self._sizing(handler.response_serializer, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, method, "unary"),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, service, method, "client_stream"),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, method, "server_stream"),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, service, method, "bidi_stream"),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        return handler

    def _counting(self, deserializer, method: str):
        """Count each request's bytes, and messages that are not the protobuf they claim to be (gRPC then
        answers INTERNAL)."""
        rejected = getattr(self.t, "requests_rejected", None)
        if deserializer is None:
            return deserializer

        def deserialize(data: bytes):
            self.t.traffic.add(method, "up", len(data))
            try:
                return deserializer(data)
            except Exception:
                if rejected is not None:
                    rejected.labels(method=method, reason=Reason.UNDECODABLE).inc()
                raise

        return deserialize

    def _sizing(self, serializer, method: str):
        """Count each response's bytes as serialised."""
        if serializer is None:
            return serializer

        def serialize(message) -> bytes:
            data = serializer(message)
            self.t.traffic.add(method, "down", len(data))
            return data

        return serialize

    def _observe(self, service: str, method: str, kind: str, code: str, start: float) -> None:
        key = (service, method, kind, code)
        children = self._children.get(key)
        if children is None:  # a bounded set: registered methods times status codes
            children = self._children[key] = (
                self.t.grpc_handled.labels(grpc_service=service, grpc_method=method, grpc_type=kind, grpc_code=code),
                self.t.grpc_seconds.labels(grpc_service=service, grpc_method=method, grpc_type=kind),
            )
        children[0].inc()
        children[1].observe(self.clock() - start)

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


class _CountedStream:
    """A response stream that counts each message it yields; everything else is the call's (cancel, code)."""

    def __init__(self, call, count: Callable[[int], None]) -> None:
        self._call, self._count = call, count

    def __iter__(self) -> _CountedStream:
        return self

    def __next__(self):
        message = next(self._call)
        self._count(message.ByteSize())
        return message

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class CountingClientInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor
):
    """The node's side of :class:`Traffic`: every message it sends (``up``) and receives (``down``), by RPC."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    def _adder(self, details, direction: str) -> Callable[[int], None]:
        full = details.method.decode() if isinstance(details.method, bytes) else details.method
        method = _split_method(full)[1]
        return lambda n: self.traffic.add(method, direction, n)

    def _count_response(self, details, outcome):
        if outcome.exception() is None:
            self._adder(details, "down")(outcome.result().ByteSize())
        return outcome

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self._adder(client_call_details, "up")(request.ByteSize())
        return self._count_response(client_call_details, continuation(client_call_details, request))

    def intercept_unary_stream(self, continuation, client_call_details, request):
        self._adder(client_call_details, "up")(request.ByteSize())
        return _CountedStream(continuation(client_call_details, request), self._adder(client_call_details, "down"))

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        up = self._adder(client_call_details, "up")

        def counted():
            for message in request_iterator:
                up(message.ByteSize())
                yield message

        return self._count_response(client_call_details, continuation(client_call_details, counted()))
