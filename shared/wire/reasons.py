"""Why the aggregator refuses a request: one table of reasons, each with its gRPC status code and what a node does.

Several reasons share one status code (FAILED_PRECONDITION is a stale round, a round not open yet
or a registration that does not match the federation), so the code alone cannot tell a node what to
do. Every refusal therefore carries a rich status (``google.rpc.Status``) whose details hold one
``google.rpc.ErrorInfo`` with ``domain`` :data:`DOMAIN` and ``reason`` the :class:`Reason`'s name
(UPPER_SNAKE_CASE, as AIP-193 asks of ErrorInfo reasons): the aggregator sends it with :func:`abort`,
the node reads it with :func:`reason_of` and acts on :attr:`Reason.action` (:func:`action_of` also
covers failures that carry no reason, such as an unreachable aggregator). A reason's value (lower
case) is the ``reason`` label of ``fedmedclip_requests_rejected_total`` and
``fedmedclip_updates_rejected_total``.

The error classes of the codec, the update bounds, the aggregation rules and chunk assembly name
their reason in a class attribute ``reason``, so a refused payload is labelled by the class that
refused it. Those classes belong to the learning core, which never imports gRPC
(tests/test_layout.py): this module imports gRPC only inside the functions that talk to it, and the
table names each status code (``grpc.StatusCode`` member name; :attr:`Reason.code` resolves it).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import grpc

DOMAIN = "fedmedclip.v1"

#: Status codes (names) of failures worth retrying: the aggregator restarting, the network, a busy server.
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"})


class Action(StrEnum):
    """What a node does about a failed call."""

    RETRY = "retry"  # transient (no reason, a retryable code): call again after a backoff
    RESYNC = "resync"  # the round moved on: drop this request, follow the current round
    REREGISTER = "reregister"  # the aggregator does not know this node (it restarted afresh): register again
    GIVE_UP = "give_up"  # for good: stop, with the aggregator's message


_A = Action


class Reason(StrEnum):
    """Every refusal the aggregator gives: value (the metrics label), gRPC status code, the node's action."""

    code_name: str
    action: Action

    def __new__(cls, value: str, code_name: str, action: Action) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.code_name = code_name
        member.action = action
        return member

    @property
    def code(self) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self.code_name]

    # who is asking (every RPC)
    WRONG_RUN = "wrong_run", "FAILED_PRECONDITION", _A.GIVE_UP  # the aggregator runs another run now
    UNKNOWN_NODE = "unknown_node", "UNAUTHENTICATED", _A.REREGISTER
    IDENTITY_NOT_ALLOWED = "identity_not_allowed", "PERMISSION_DENIED", _A.GIVE_UP
    NO_CERTIFICATE = "no_certificate", "UNAUTHENTICATED", _A.GIVE_UP
    IDENTITY_MISMATCH = "identity_mismatch", "PERMISSION_DENIED", _A.GIVE_UP
    # Register
    BAD_NODE_ID = "bad_node_id", "INVALID_ARGUMENT", _A.GIVE_UP
    BAD_ROLE = "bad_role", "INVALID_ARGUMENT", _A.GIVE_UP
    BAD_SAMPLE_COUNT = "bad_sample_count", "INVALID_ARGUMENT", _A.GIVE_UP  # out of range, or not the registered one
    REGISTRATION_MISMATCH = "registration_mismatch", "FAILED_PRECONDITION", _A.GIVE_UP
    NODE_ID_TAKEN = "node_id_taken", "ALREADY_EXISTS", _A.GIVE_UP
    # another process registered under this node id (a restart, or a second copy): this session is over
    SESSION_REPLACED = "session_replaced", "FAILED_PRECONDITION", _A.GIVE_UP
    # FetchGlobal, ReportMetrics
    NO_SUCH_VERSION = "no_such_version", "FAILED_PRECONDITION", _A.GIVE_UP
    MISSING_VERSION = "missing_version", "NOT_FOUND", _A.GIVE_UP
    # UploadUpdate: the round
    NOT_TRAINER = "not_trainer", "PERMISSION_DENIED", _A.GIVE_UP
    ROUND_NOT_OPEN = "round_not_open", "FAILED_PRECONDITION", _A.RESYNC
    STALE_ROUND = "stale_round", "FAILED_PRECONDITION", _A.RESYNC
    FUTURE_ROUND = "future_round", "FAILED_PRECONDITION", _A.RESYNC
    CONFLICTING_UPDATE = "conflicting_update", "ALREADY_EXISTS", _A.RESYNC  # the round has another of its updates
    CONFLICTING_REPLAY = "conflicting_replay", "ALREADY_EXISTS", _A.RESYNC  # its id was accepted with other bytes
    BAD_UPDATE_ID = "bad_update_id", "INVALID_ARGUMENT", _A.GIVE_UP
    # UploadUpdate: the stream and the payload
    BAD_STREAM = "bad_stream", "INVALID_ARGUMENT", _A.GIVE_UP  # PayloadAssemblyError, or no header first
    STREAM_BROKEN = "stream_broken", "INVALID_ARGUMENT", _A.GIVE_UP  # gRPC ended the upload stream
    UNDECODABLE = "undecodable", "INTERNAL", _A.GIVE_UP  # not the protobuf message (gRPC answers; counted only)
    CODEC_MISMATCH = "codec_mismatch", "INVALID_ARGUMENT", _A.GIVE_UP
    CODEC = "codec", "INVALID_ARGUMENT", _A.GIVE_UP  # CodecError
    UNKNOWN_CODEC = "unknown_codec", "INVALID_ARGUMENT", _A.GIVE_UP
    CHECKSUM_MISMATCH = "checksum_mismatch", "INVALID_ARGUMENT", _A.GIVE_UP
    SHAPE_MISMATCH = "shape_mismatch", "INVALID_ARGUMENT", _A.GIVE_UP
    NON_FINITE = "non_finite", "INVALID_ARGUMENT", _A.GIVE_UP
    PAYLOAD_TOO_LARGE = "payload_too_large", "INVALID_ARGUMENT", _A.GIVE_UP
    MALFORMED_PAYLOAD = "malformed_payload", "INVALID_ARGUMENT", _A.GIVE_UP
    REFERENCE_REQUIRED = "reference_required", "INVALID_ARGUMENT", _A.GIVE_UP
    UPDATE_OUT_OF_BOUNDS = "update_out_of_bounds", "INVALID_ARGUMENT", _A.GIVE_UP  # UpdateOutOfBoundsError
    UPDATE_NORM_TOO_LARGE = "update_norm_too_large", "INVALID_ARGUMENT", _A.GIVE_UP
    UPDATE_VALUE_TOO_LARGE = "update_value_too_large", "INVALID_ARGUMENT", _A.GIVE_UP
    AGGREGATION = "aggregation", "INVALID_ARGUMENT", _A.GIVE_UP  # AggregationError
    # load limits (aggregator/limits.py): one node's share of the server; the node retries after a backoff
    TOO_MANY_REQUESTS = "too_many_requests", "RESOURCE_EXHAUSTED", _A.RETRY  # max_rpcs_per_node in flight
    TOO_MANY_STREAMS = "too_many_streams", "RESOURCE_EXHAUSTED", _A.RETRY  # max_streams_per_node up/downloads
    TOO_MANY_LONG_POLLS = "too_many_long_polls", "RESOURCE_EXHAUSTED", _A.RETRY  # max_long_polls_per_node
    UPLOAD_SLOTS_BUSY = "upload_slots_busy", "RESOURCE_EXHAUSTED", _A.RETRY  # no slot free within the deadline
    # the stream watchdog cancels the call: the node sees CANCELLED; the reason is the aggregator's log and metrics
    STREAM_DEADLINE = "stream_deadline", "DEADLINE_EXCEEDED", _A.RETRY  # past stream_timeout_s
    STREAM_TOO_SLOW = "stream_too_slow", "DEADLINE_EXCEEDED", _A.RETRY  # under stream_min_rate_bps after the grace
    # trust, part two (docs/trust-model.md): weights, reports, ids, the federation's wire settings
    SAMPLE_COUNT_CHANGED = "sample_count_changed", "FAILED_PRECONDITION", _A.GIVE_UP  # fixed at first registration
    WIRE_MISMATCH = "wire_mismatch", "INVALID_ARGUMENT", _A.GIVE_UP  # another codec/delta: WireMismatchError
    BAD_ROUND_ID = "bad_round_id", "INVALID_ARGUMENT", _A.GIVE_UP  # a round id or version beyond 32 bits
    BAD_REPORT = "bad_report", "INVALID_ARGUMENT", _A.GIVE_UP  # a ReportMetrics field out of its range or format
    CONFLICTING_REPORT = "conflicting_report", "ALREADY_EXISTS", _A.GIVE_UP  # that version has another report of it
    # secure aggregation (shared/secagg.py, docs/secure-aggregation.md)
    SECAGG = "secagg", "INVALID_ARGUMENT", _A.GIVE_UP  # a key, share or masked input that does not hold
    SECAGG_PHASE = "secagg_phase", "FAILED_PRECONDITION", _A.RESYNC  # another session or phase: follow the current one
    SECAGG_EXCLUDED = "secagg_excluded", "PERMISSION_DENIED", _A.RESYNC  # named for breaking the protocol this round


def abort(context: grpc.ServicerContext, reason: Reason, message: str) -> NoReturn:
    """End the RPC with ``reason``'s status code, ``message`` and an ErrorInfo naming ``reason`` (raises)."""
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    status = status_pb2.Status(code=reason.code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason.name, domain=DOMAIN))
    context.abort_with_status(rpc_status.to_status(status))


def reason_of(error: grpc.RpcError) -> Reason | None:
    """The Reason a failed call carries, or None (not the aggregator's refusal, or a reason unknown here)."""
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    if not isinstance(error, grpc.Call):
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # trailers that contradict the status: not ours
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
            return Reason.__members__.get(info.reason)
    return None


def action_of(error: grpc.RpcError) -> Action:
    """What a node does about ``error``: its reason's action; without one, retry the transient codes, else give up."""
    import grpc

    reason = reason_of(error)
    if reason is not None:
        return reason.action
    code = error.code() if isinstance(error, grpc.Call) else None
    return Action.RETRY if code is not None and code.name in RETRYABLE_CODES else Action.GIVE_UP
