"""How much of the aggregator one node may hold, and how it sheds load (:mod:`aggregator.service` wires it in).

The threat (docs/trust-model.md, section 8): one allow-listed hospital opens upload streams that send a
header and a few bytes and then stall, or long polls by the hundred, until the worker threads and the
upload slots are all taken and every other node waits. One piece per concern:

- :class:`NodeLimits`: what each node has in flight, keyed by its authenticated identity (the
  certificate CN; in insecure mode the claimed node id): RPCs of any kind, upload/download streams,
  long polls. A request over a limit is refused at once (``too_many_*``: RESOURCE_EXHAUSTED, the node
  retries after a backoff), so it gives its worker thread back within milliseconds.
- :class:`StreamWatchdog`: a server-side deadline and a minimum rate per stream. A handler blocked in
  ``next(request_iterator)`` cannot look at a clock, so one thread cancels (``context.cancel()``) the
  streams that break either; the blocked read then ends and the handler refuses with the watchdog's reason.
- :class:`LoadMonitor`: RPCs being handled now, and whether to call the service overloaded (its health).
- :class:`HandshakeFailures`: failed TLS handshakes, counted and logged with the peer's address. No
  Python API of grpcio reports them, so this reads gRPC core's own log back (see the class).

None of this imports gRPC: the service passes in what to call (``context.cancel``, the health setter).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import select
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aggregator.errors import EngineError
from shared.ops.logs import printable
from shared.wire.reasons import Reason

log = logging.getLogger("fedmedclip.aggregator")

#: What a node can hold, and the reason it is refused with when it holds too many.
RPC, STREAM, LONG_POLL = "rpc", "stream", "long_poll"
LIMIT_REASONS = {RPC: Reason.TOO_MANY_REQUESTS, STREAM: Reason.TOO_MANY_STREAMS, LONG_POLL: Reason.TOO_MANY_LONG_POLLS}
_WHAT = {RPC: "requests", STREAM: "upload/download streams", LONG_POLL: "long polls"}
#: Refusals that shed load (health counts them as overload): the node retries after a backoff.
LOAD_REASONS = frozenset(LIMIT_REASONS.values()) | {Reason.UPLOAD_SLOTS_BUSY}


# --------------------------------------------------------------------------- per-node limits


class NodeLimits:
    """How many RPCs, streams and long polls each node has in flight; refuses one over its node's limit."""

    def __init__(self, caps: Mapping[str, int]) -> None:
        self.caps = dict(caps)
        self._held: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()

    def acquire(self, node: str, kinds: tuple[str, ...]) -> None:
        """Take one of each of ``kinds`` for ``node``, all or none; EngineError (``too_many_*``) over a limit."""
        with self._lock:
            held = self._held.get(node, Counter())
            for kind in kinds:
                if held[kind] >= self.caps[kind]:
                    raise EngineError(
                        LIMIT_REASONS[kind],
                        f"node {node!r} already has {held[kind]} "
                        f"{_WHAT[kind]} in flight (limit {self.caps[kind]}); retry after a backoff",
                    )
            held.update(kinds)
            self._held[node] = held

    def release(self, node: str, kinds: tuple[str, ...]) -> None:
        with self._lock:
            held = self._held[node]
            held.subtract(kinds)
            if not +held:  # nothing left: forget the node (the table stays as small as what is in flight)
                del self._held[node]

    @contextmanager
    def hold(self, node: str, *kinds: str) -> Iterator[None]:
        self.acquire(node, kinds)
        try:
            yield
        finally:
            self.release(node, kinds)

    def held(self, node: str) -> dict[str, int]:
        with self._lock:
            return dict(self._held.get(node, {}))


class LogThrottle:
    """At most one log line per key every ``every_s`` seconds; says how many it held back in between."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self._last: dict[Any, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def admit(self, key: Any) -> int | None:
        """None: stay quiet; else log now, mentioning this many lines held back since the last one."""
        now = self.clock()
        with self._lock:
            last, held_back = self._last.get(key, (-math.inf, 0))
            if now - last < self.every_s:
                self._last[key] = (last, held_back + 1)
                return None
            if len(self._last) > 4096:  # claimed ids in insecure mode are unbounded: keep the table small
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.every_s}
            self._last[key] = (now, 0)
            return held_back


# --------------------------------------------------------------------------- a thread that runs while needed


class _Ticker:
    """Calls ``tick`` every ``interval_s`` on a daemon thread, started by :meth:`poke`, until ``tick`` says done."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], bool]) -> None:
        self.name, self.interval_s, self.tick = name, interval_s, tick
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._poked = False

    def poke(self) -> None:
        with self._lock:
            self._poked = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                more = self.tick()
            except Exception:  # noqa: BLE001 - the watchdog must outlive a bad tick
                log.exception("%s: tick failed", self.name)
                more = True
            with self._lock:
                if not more and not self._poked:
                    self._thread = None
                    return
                self._poked = False


# --------------------------------------------------------------------------- stream watchdog


@dataclass(eq=False)
class Transfer:
    """One watched stream: its deadline, and the bytes moved since its rate window opened."""

    cancel: Callable[[], Any]
    deadline: float
    window_start: float
    window_bytes: int = 0
    bytes: int = 0
    paused: bool = False
    tripped: Reason | None = None
    why: str = ""

    def add(self, n: int) -> None:
        self.bytes += n


class StreamWatchdog:
    """Cancels streams past their deadline, or slower than ``min_rate_bps`` once ``grace_s`` has passed.

    The rate is measured over a window that opens when the stream starts and again each time it
    :meth:`resume` s (an upload waiting for a slot is :meth:`pause` d: it reads nothing then, by our choice).
    A stream that trips gets ``tripped`` (the Reason) and its call is cancelled: the node sees CANCELLED,
    the aggregator counts and logs the reason.
    """

    def __init__(
        self,
        timeout_s: float,
        min_rate_bps: float,
        grace_s: float,
        *,
        interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s, self.min_rate_bps, self.grace_s = timeout_s, min_rate_bps, grace_s
        self.clock = clock
        self._streams: set[Transfer] = set()
        self._lock = threading.Lock()
        self._ticker = _Ticker("stream-watchdog", interval_s, self._tick)

    def watch(self, cancel: Callable[[], Any]) -> Transfer:
        now = self.clock()
        transfer = Transfer(cancel=cancel, deadline=now + self.timeout_s, window_start=now)
        with self._lock:
            self._streams.add(transfer)
        self._ticker.poke()
        return transfer

    def unwatch(self, transfer: Transfer) -> None:
        with self._lock:
            self._streams.discard(transfer)

    def pause(self, transfer: Transfer) -> None:
        transfer.paused = True

    def resume(self, transfer: Transfer) -> None:
        transfer.window_start, transfer.window_bytes = self.clock(), transfer.bytes
        transfer.paused = False

    def remaining(self, transfer: Transfer) -> float:
        return max(0.0, transfer.deadline - self.clock())

    @contextmanager
    def watching(self, cancel: Callable[[], Any]) -> Iterator[Transfer]:
        transfer = self.watch(cancel)
        try:
            yield transfer
        finally:
            self.unwatch(transfer)

    def check(self) -> list[Transfer]:
        """Trip and cancel the streams that broke a bound now; those, for the record."""
        now = self.clock()
        tripped = []
        with self._lock:
            for t in list(self._streams):
                if t.paused:  # waiting for an upload slot: the handler bounds that wait by the deadline itself
                    continue
                if now >= t.deadline:
                    t.tripped, t.why = (
                        Reason.STREAM_DEADLINE,
                        f"the stream ran past the aggregator's deadline of {self.timeout_s:g}s",
                    )
                elif not t.paused and now - t.window_start >= self.grace_s:
                    rate = (t.bytes - t.window_bytes) / (now - t.window_start)
                    if rate < self.min_rate_bps:
                        t.tripped, t.why = (
                            Reason.STREAM_TOO_SLOW,
                            f"{rate:.0f} bytes/s over {now - t.window_start:.1f}s, under the minimum "
                            f"{self.min_rate_bps:g} bytes/s",
                        )
                if t.tripped is not None:
                    self._streams.discard(t)
                    tripped.append(t)
        for t in tripped:  # outside the lock: cancelling completes the call's pending operations
            t.cancel()
        return tripped

    def _tick(self) -> bool:
        self.check()
        with self._lock:
            return bool(self._streams)


# --------------------------------------------------------------------------- overload


class LoadMonitor:
    """RPCs being handled now, and whether the aggregator is overloaded.

    Overloaded while at least ``ratio`` of the ``capacity`` worker threads run an RPC, or when a
    request was refused for a load limit (:data:`LOAD_REASONS`), and for ``hold_s`` seconds after
    the last of either: more is asked of the service than it gives, and the status does not flap
    with each call. ``on_change(overloaded)`` is called on each transition (the service turns it
    into its health status).
    """

    def __init__(
        self,
        capacity: int,
        ratio: float,
        hold_s: float,
        on_change: Callable[[bool], None],
        *,
        in_flight: Any = None,
        overloaded_gauge: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.high_water = max(1, math.ceil(ratio * capacity))
        self.hold_s, self.on_change, self.clock = hold_s, on_change, clock
        self.in_flight, self.overloaded_gauge = in_flight, overloaded_gauge
        self._in_flight_children: dict[str, Any] = {}
        self.busy = 0
        self.overloaded = False
        self._until = -math.inf  # overloaded until then (the last sign of it, plus hold_s)
        self._lock = threading.Lock()
        self._ticker = _Ticker("load-monitor", min(0.25, hold_s / 4), self._tick)

    def enter(self, method: str) -> None:
        with self._lock:
            self.busy += 1
            self._evaluate()
        if self.in_flight is not None:
            self._gauge(method).inc()

    def leave(self, method: str) -> None:
        with self._lock:
            self.busy -= 1
            self._evaluate()
        if self.in_flight is not None:
            self._gauge(method).dec()

    def _gauge(self, method: str) -> Any:
        """The in-flight gauge's child for ``method``, looked up once (the service's methods: a bounded set)."""
        child = self._in_flight_children.get(method)
        if child is None:
            child = self._in_flight_children[method] = self.in_flight.labels(method=method)
        return child

    def shed(self) -> None:
        """A request was refused for a load limit."""
        with self._lock:
            self._until = self.clock() + self.hold_s
            self._evaluate()

    def _evaluate(self) -> None:  # under the lock: transitions are reported in order
        now = self.clock()
        if self.busy >= self.high_water:
            self._until = now + self.hold_s
        over = now < self._until
        if over and not self.overloaded:
            self._ticker.poke()  # someone has to notice its end when no call comes
        if over != self.overloaded:
            self.overloaded = over
            if self.overloaded_gauge is not None:
                self.overloaded_gauge.set(int(over))
            self.on_change(over)

    def _tick(self) -> bool:
        with self._lock:
            self._evaluate()
            return self.overloaded


# --------------------------------------------------------------------------- TLS handshake failures

#: gRPC core's log line prefix (absl): severity, date, time, thread id, source file:line.
_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+(\d+) ([\w.]+):\d+\] (.*)$")
_PEER = re.compile(r"endpoint_peer_address=([^,}\s]+)")
_CONTINUATION = re.compile(r"^(=== Source Location Trace: ===|src/\S+:\d+| shutdown=.*|)\s*$")
#: BoringSSL reasons worth a label of their own; any other is "other" (the label set stays bounded).
_SSL_REASONS = frozenset(
    {
        "CERTIFICATE_VERIFY_FAILED",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "NO_SHARED_CIPHER",
        "UNSUPPORTED_PROTOCOL",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_DECRYPT_ERROR",
        "DECRYPTION_FAILED_OR_BAD_RECORD_MAC",
    }
)


def handshake_failure_reason(error: str) -> str:
    """A bounded label for a handshake error text of gRPC core."""
    m = re.search(r"OPENSSL_internal:([A-Z0-9_]+)", error)
    if m:
        return m.group(1).lower() if m.group(1) in _SSL_REASONS else "other"
    low = error.lower()
    if "timed out" in low or "deadline" in low:
        return "timeout"
    if "closed" in low or "reset" in low or "eof" in low:
        return "closed"
    return "other"


def handshake_trace_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether gRPC core traces its handshakes (``GRPC_TRACE`` names ``handshaker`` or ``all``)."""
    names = {n.strip() for n in environ.get("GRPC_TRACE", "").split(",")}
    return bool(names & {"handshaker", "all"})


class HandshakeFailures:
    """Failed TLS handshakes of this process's gRPC server, counted and logged (with the peer when it can be known).

    What grpcio 1.85 lets Python see: nothing per failed handshake. Servicers and interceptors see
    calls, and a call exists only after a handshake succeeded; ``dynamic_ssl_server_credentials``'
    fetcher is called once per handshake, with no argument and before its outcome is known; channelz
    lists established sockets only. gRPC core itself writes one line per failure to the process's
    stderr (``Handshake failed with error SSL_ERROR_SSL ... CERTIFICATE_VERIFY_FAILED``, at INFO, the
    default verbosity), without the peer's address; the address is only in the ``handshaker`` trace
    (``GRPC_TRACE=handshaker``, read when grpc is first imported), on the failing handshake's lines.

    So this reads gRPC core's log back: :meth:`start` puts a pipe on file descriptor 2 and a thread
    that passes every line on to the real stderr, except the lines it consumes: the handshaker trace
    (parsed, not shown) and core's own "Handshake failed" line, which it replaces by one log line of
    ours naming the peer (``ipv4:10.0.0.7:51234``; "an unknown peer" without the trace) and the error,
    and ``on_failure(peer, error)`` (the metric). Without the trace, a handshake that fails without an
    SSL error (a peer that connects and sends nothing until the handshake timeout, or closes
    mid-handshake) is not seen at all. If gRPC changes its log format the count stays at 0: the
    service tests fail then (tests/test_dos.py).
    """

    def __init__(self, on_failure: Callable[[str | None, str], None], *, traced: bool | None = None) -> None:
        self.on_failure = on_failure
        self.traced = handshake_trace_enabled() if traced is None else traced
        self._real: int | None = None
        self._thread: threading.Thread | None = None
        self._read_fd: int | None = None
        self._pending: dict[str, str] = {}  # core thread id -> its SSL error, waiting for the trace's peer
        self._peer: dict[str, str] = {}  # core thread id -> the peer its failing handshake step names
        self._cont: str | None = None  # thread id whose multi-line trace record is being read

    # -- the pipe on fd 2 ------------------------------------------------------------------------
    def start(self) -> None:
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)  # room for bursts of log lines
        except OSError:
            pass
        self._real = os.dup(2)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self._thread = threading.Thread(target=self._pump, name="core-log", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # a traceback on the way out still reaches the real stderr

    def stop(self, timeout_s: float = 5.0) -> None:
        """Give fd 2 back to the real stderr and pass on what is still in the pipe."""
        if self._real is None:
            return
        atexit.unregister(self.stop)
        sys.stderr.flush()
        os.dup2(self._real, 2)  # the pipe's last writer is gone: the pump reads to its end and stops
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._thread is None or not self._thread.is_alive():
            os.close(self._real)
            os.close(self._read_fd)  # type: ignore[arg-type]
        self._real = None

    def _pump(self) -> None:
        buf = b""
        fd = self._read_fd
        while True:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:  # quiet: a partial line (a prompt, a write without newline) goes out as it is
                if buf:
                    self._write(buf)
                    buf = b""
                continue
            data = os.read(fd, 1 << 16)  # type: ignore[arg-type]
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            out = []
            for line in lines:
                try:
                    keep = self.feed(line.decode("utf-8", "replace"))
                except Exception:  # noqa: BLE001 - never lose a line to a parsing bug
                    keep = True
                if keep:
                    out.append(line)
            if out:
                self._write(b"\n".join(out) + b"\n")
        if buf:
            self._write(buf)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._real, view)  # type: ignore[arg-type]
            except OSError:
                return
            view = view[n:]

    # -- parsing ---------------------------------------------------------------------------------
    def feed(self, line: str) -> bool:
        """Take one line of stderr; False when it is consumed (handshake trace, core's handshake failure line)."""
        m = _CORE_LINE.match(line)
        if m is None:
            if self._cont is not None and _CONTINUATION.match(line):  # the rest of a failing step's record
                peer = _PEER.search(line)
                if peer:
                    self._peer[self._cont] = peer.group(1)
                return False
            self._cont = None
            return True
        self._cont = None
        tid, source, message = m.groups()
        if source == "ssl_transport_security.cc" and message.startswith("Handshake failed with error "):
            error = message.removeprefix("Handshake failed with error ")
            if self.traced:
                self._pending[tid] = error  # its peer is on the trace record that follows
            else:
                self._failed(None, error)
            return False
        if not self.traced or source not in ("handshaker.cc", "channel_trace.h") or "andshake" not in message:
            return True
        if message.startswith("CallNextHandshakerLocked: error=") and not message.startswith(
            "CallNextHandshakerLocked: error=OK "
        ):  # the failing step: its arguments name the peer
            self._peer.pop(tid, None)
            self._cont = tid
            peer = _PEER.search(message)
            if peer:
                self._peer[tid] = peer.group(1)
        elif "Failed with error: " in message:  # the handshake's end, right after its failing step, same thread
            error = self._pending.pop(tid, None) or message.split("Failed with error: ", 1)[1]
            self._failed(self._peer.pop(tid, None), error)
            self._cont = tid
        return False

    def _failed(self, peer: str | None, error: str) -> None:
        self.on_failure(peer, error)
        if log.isEnabledFor(logging.WARNING):
            # written straight to the real stderr: this thread must never wait on the pipe it drains
            record = log.makeRecord(
                log.name,
                logging.WARNING,
                __file__,
                0,
                "TLS handshake from %s failed: %s",
                (peer or "an unknown peer (GRPC_TRACE=handshaker logs the address)", printable(error, 300)),
                None,
            )
            handlers = logging.getLogger().handlers
            text = handlers[0].format(record) if handlers else record.getMessage()
            self._write(text.encode("utf-8", "replace") + b"\n")
