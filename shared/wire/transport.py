"""What both services agree on about the wire: message limits, keepalive, chunking, retries.

No learning here and no service logic: the aggregator and the hospital node import these so the
two ends of a channel are configured from one place.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from shared.errors import FedMedCLIPError
from shared.ops.logs import printable
from shared.wire.reasons import Action, Reason, action_of

log = logging.getLogger(__name__)

#: Adapter payloads travel in chunks of this size (NVFlare streams 1 MiB; a FAM is ~0.3-2 MB).
CHUNK_BYTES = 1024 * 1024
#: The smallest chunk a node sends, whatever the aggregator advertises (tiny chunks cost a message each).
MIN_CHUNK_BYTES = 16 * 1024
#: Largest single gRPC message either end accepts: one chunk plus headroom for the header.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Largest whole payload (sum of chunks) either end accepts; the codec has its own caps too.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

# Keepalive: local training can leave a channel idle for a while (Flower uses 210 s on the server
# for that reason). Pings every 60 s keep NAT/conntrack entries alive; a peer that does not answer
# a ping within 20 s is declared gone, so a lost connection never turns into a silent hang.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def _common_options() -> list[tuple[str, int]]:
    """Size limits and keepalive, the same on both ends."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


#: A connection that has not finished its TLS handshake by then is closed (gRPC's default: 120 s).
SERVER_HANDSHAKE_TIMEOUT_MS = 20_000
#: A connection with no RPC for this long is closed with GOAWAY (a node's heartbeats keep its own busy).
MAX_CONNECTION_IDLE_MS = 600_000


def server_options() -> list[tuple[str, int]]:
    # clients may ping every 30 s without being told GOAWAY (too_many_pings). The limits on what one node
    # holds are the aggregator's, per identity (aggregator/limits.py). No per-connection stream cap
    # (grpc.max_concurrent_streams): a stream grpcio fails to release would wedge the connection behind it.
    return _common_options() + [
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        ("grpc.server_handshake_timeout_ms", SERVER_HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
    ]


def channel_options() -> list[tuple[str, int]]:
    # the channel's own reconnect backoff; the node adds its own backoff with jitter on top
    return _common_options() + [
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The payload in slices of at most ``size`` bytes (at least one, even for empty data)."""
    view = memoryview(data)
    if not data:
        yield b""
        return
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


def chunk_size(advertised: int) -> int:
    """The upload chunk size: the aggregator's ``max_chunk_bytes``, within [MIN_CHUNK_BYTES, CHUNK_BYTES] (0: none)."""
    return CHUNK_BYTES if advertised <= 0 else max(MIN_CHUNK_BYTES, min(int(advertised), CHUNK_BYTES))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PayloadAssemblyError(FedMedCLIPError, ValueError):
    """A chunked payload did not arrive as announced (size over the limit or different)."""

    reason = Reason.BAD_STREAM


def assemble(parts: Iterable[bytes], expected_bytes: int, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """Join chunks, refusing more bytes than announced (or than ``limit``) as soon as they arrive."""
    if expected_bytes < 0 or expected_bytes > limit:
        raise PayloadAssemblyError(f"announced payload of {expected_bytes} bytes is outside [0, {limit}]")
    # a payload that came in one chunk (the usual upload: ~0.5 MB in a 1 MiB chunk) is returned as it is, not
    # copied twice; from a second chunk on, one buffer grows (many tiny chunks cost no per-chunk object)
    first: bytes | None = None
    buf: bytearray | None = None
    total = 0
    for part in parts:
        total += len(part)
        if total > expected_bytes:
            raise PayloadAssemblyError(f"payload longer than the announced {expected_bytes} bytes")
        if buf is not None:
            buf += part
        elif first is None:
            first = part
        else:
            buf = bytearray(first)
            buf += part
            first = None
    if total != expected_bytes:
        raise PayloadAssemblyError(f"payload of {total} bytes, {expected_bytes} announced")
    if buf is not None:
        return bytes(buf)
    return first if type(first) is bytes else bytes(first or b"")


# --------------------------------------------------------------------------- client retries
# Which failures are transient is decided in one place: shared.wire.reasons (RETRYABLE_CODES, action_of).


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's 'full jitter')."""

    initial_s: float = 0.5
    maximum_s: float = 10.0
    multiplier: float = 2.0
    give_up_after_s: float = 300.0  # never retry for ever

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.maximum_s, self.initial_s * self.multiplier**attempt))


T = TypeVar("T")


class RetriesExhausted(RuntimeError):
    """A call kept failing with retryable errors for longer than the backoff allows."""


def call_with_retry(
    fn: Callable[[], T],
    what: str,
    backoff: Backoff,
    rng: random.Random,
    on_retry: Callable[[grpc.RpcError], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient gRPC errors (``action_of``: RETRY) with backoff and jitter."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            if action_of(exc) is not Action.RETRY:
                raise
            code = exc.code()
            if time.monotonic() - start > backoff.give_up_after_s:
                raise RetriesExhausted(f"{what}: still {code} after {backoff.give_up_after_s:.0f}s") from exc
            wait = backoff.delay(attempt, rng)
            log.warning("%s failed (%s: %s); retrying in %.2fs", what, code, _details(exc), wait)
            if on_retry is not None:
                on_retry(exc)
            sleep(wait)
            attempt += 1


def _details(exc: grpc.RpcError) -> str:
    """The peer's message, escaped for one log line (the other side may be hostile)."""
    try:
        return printable(str(exc.details()))  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a best-effort log line
        return printable(str(exc))
