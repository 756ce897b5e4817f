"""Small helpers both services use around the generated protocol (``shared.wire.proto``)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

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
