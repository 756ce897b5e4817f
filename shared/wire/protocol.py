"""Small helpers both services use around the generated protocol (``shared.wire.proto``)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from shared.secagg import Advertisement, Roster, SecAggError, SignedShare
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb

SERVICE_NAME = "fedmedclip.v1.AggregatorService"
METRIC_FIELDS = ("accuracy", "balanced_accuracy", "macro_f1", "ece")


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and float32 bytes of an adapter state, in order.

    Two parties that built the initial adapter from the same method, width and seed get the same
    digest; anything else (another seed, method or width) is caught at registration.
    """
    h = hashlib.sha256()
    for name, tensor in state.items():
        arr = np.ascontiguousarray(tensor.detach().cpu().to(torch.float32).numpy())
        h.update(name.encode("utf-8"))
        h.update(repr(tuple(arr.shape)).encode("ascii"))
        h.update(arr.astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def raw_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the state as plain float32, all rows (the codec's 'raw' figure)."""
    return sum(int(t.numel()) * 4 for t in state.values())


def metrics_to_proto(metrics: Mapping[str, float] | None) -> pb.EvalMetrics | None:
    """The metrics ``metrics`` holds (a node sharing less holds fewer); the others stay unset."""
    if metrics is None:
        return None
    return pb.EvalMetrics(
        num_samples=int(metrics.get("n", 0)), **{k: float(metrics[k]) for k in METRIC_FIELDS if k in metrics}
    )


def metrics_from_proto(message: pb.EvalMetrics) -> dict[str, float]:
    """``n`` and each metric that is set."""
    out: dict[str, float] = {"n": int(message.num_samples)}
    out.update({k: float(getattr(message, k)) for k in METRIC_FIELDS if message.HasField(k)})
    return out


# -- secure aggregation messages (shared/secagg.py) <-> protobuf ----------------------------------

SHARE_Y_BYTES = 66  # a share of GF(2^521 - 1), big-endian


def advertisement_from_proto(msg) -> Advertisement:
    """An Advertisement from a SecAggAdvertiseRequest or a SecAggMember."""
    return Advertisement(
        msg.node_id, bytes(msg.c_public), bytes(msg.s_public), bytes(msg.certificate_pem), bytes(msg.signature)
    )


def member_to_proto(adv: Advertisement, weight: float) -> pb.SecAggMember:
    return pb.SecAggMember(
        node_id=adv.node,
        c_public=adv.c_public,
        s_public=adv.s_public,
        certificate_pem=adv.cert_pem,
        signature=adv.signature,
        weight=weight,
    )


def share_to_proto(share: SignedShare) -> pb.SecAggShare:
    return pb.SecAggShare(
        dealer=share.dealer,
        kind=share.kind,
        x=share.x,
        y=share.y.to_bytes(SHARE_Y_BYTES, "big"),
        signature=share.signature,
    )


def share_from_proto(msg: pb.SecAggShare) -> SignedShare:
    """A share as a holder returned it; a malformed one is a :class:`SecAggError`."""
    if len(msg.y) != SHARE_Y_BYTES or msg.kind not in ("b", "s") or not 1 <= msg.x <= 1_000_000:
        raise SecAggError(f"a malformed share of {msg.dealer[:64]!r}")
    return SignedShare(msg.dealer, msg.kind, msg.x, int.from_bytes(msg.y, "big"), bytes(msg.signature))


def roster_from_proto(state: pb.SecAggState) -> Roster:
    members = {m.node_id: advertisement_from_proto(m) for m in state.roster}
    if len(members) != len(state.roster):
        raise SecAggError("the roster names a node twice")
    return Roster(members, state.threshold, {m.node_id: m.weight for m in state.roster}, state.clip)
