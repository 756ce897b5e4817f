"""The steps of one federated round, free of any transport.

Both the in-process simulation and the gRPC services call these, so a round over the wire does
exactly what a simulated round does:

node:        :func:`make_update`   load the global adapter, train locally, encode the adapter
aggregator:  :func:`fold_update`   validate and decode an update, fold it into the running average
aggregator:  :func:`publish_global` encode the new global; every party holds its *decoded* value

The global a node trains from is always the decoded payload, and the aggregator keeps that same
decoded value as its reference, so both sides stay bit-identical under lossy codecs and deltas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shared import kernels
from shared.codec import (
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    CodecError,
    DecodedRows,
    DecodedState,
    EncodedPayload,
    PayloadInfo,
    decode_rows,
    decode_state,
    encode_state,
    payload_info,
)
from shared.errors import FedMedCLIPError
from shared.learning.aggregation import Aggregator, Workspace
from shared.learning.model import row_scores
from shared.learning.training import HospitalLearner, RoundStats
from shared.wire.reasons import Reason


def row_masks_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows that are on in a masked adapter state: ``mean|W_i| >= k_i`` for weight and bias.

    Works from the tensors alone (what the aggregator has), and agrees with MaskedLinear.
    """
    masks: dict[str, torch.Tensor] = {}
    for name, threshold in state.items():
        if not name.endswith(".threshold"):
            continue
        prefix = name[: -len(".threshold")]
        weight = state.get(f"{prefix}.weight")
        if weight is None:
            continue
        mask = row_scores(weight) >= threshold
        masks[f"{prefix}.weight"] = mask
        if f"{prefix}.bias" in state:
            masks[f"{prefix}.bias"] = mask
    return masks


@dataclass(frozen=True)
class WireConfig:
    """How adapter states travel."""

    codec: str = "int8"
    delta: bool = False  # encode the difference to the last global instead of the state
    drop_masked_rows: bool = True
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES


def encode_adapter(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], wire: WireConfig
) -> EncodedPayload:
    return encode_state(
        state,
        codec=wire.codec,
        row_masks=row_masks_of(state) if wire.drop_masked_rows else None,
        reference=reference if wire.delta else None,
    )


class WireMismatchError(CodecError):
    """A well-formed payload in another codec, or delta mode, than the federation's."""

    reason = Reason.WIRE_MISMATCH


def check_wire(payload: bytes, wire: WireConfig, info: PayloadInfo | None = None) -> None:
    """Refuse (:class:`WireMismatchError`) a payload whose header names another codec or delta flag than
    ``wire``; reads only the payload's prefix and header (``info``: what :func:`shared.codec.payload_info`
    already read of this payload). Both ends call it before decoding."""
    if info is None:
        info = payload_info(payload)
    if info.codec != wire.codec or info.delta != wire.delta:
        raise WireMismatchError(
            f"payload in codec {info.codec}{' (delta)' if info.delta else ''}, the federation "
            f"sends {wire.codec}{' (delta)' if wire.delta else ''}"
        )


def decode_adapter(
    payload: bytes, sha256: str | None, reference: Mapping[str, torch.Tensor], wire: WireConfig
) -> DecodedState:
    """Decode an adapter payload; rows not sent are filled from ``reference`` (the last global)."""
    template = {name: tuple(t.shape) for name, t in reference.items()}
    return decode_state(
        payload,
        sha256=sha256,
        template=template,
        reference=reference,
        max_decompressed_bytes=wire.max_decompressed_bytes,
    )


def decode_adapter_rows(
    payload: bytes,
    sha256: str | None,
    reference: Mapping[str, torch.Tensor],
    wire: WireConfig,
    workspace: Workspace | None = None,
) -> DecodedRows:
    """:func:`decode_adapter`'s validation, giving only the rows the payload sent (what a fold needs; its int8
    values dequantised by the compiled kernel); with ``workspace``, the rows are written into its buffers
    (valid until its next use)."""
    template = {name: tuple(t.shape) for name, t in reference.items()}
    return decode_rows(
        payload,
        sha256=sha256,
        template=template,
        reference=reference,
        max_decompressed_bytes=wire.max_decompressed_bytes,
        out=None if workspace is None else workspace.buffers("rows", template),
        compiled=True,
    )


class UpdateOutOfBoundsError(FedMedCLIPError):
    """A decoded update lies outside the configured bounds (a poisoning guard, not a codec error)."""

    reason = Reason.UPDATE_OUT_OF_BOUNDS


class UpdateNormTooLargeError(UpdateOutOfBoundsError):
    """The update moves the global adapter further than ``max_update_norm``."""

    reason = Reason.UPDATE_NORM_TOO_LARGE


class UpdateValueTooLargeError(UpdateOutOfBoundsError):
    """A value of the update is larger in magnitude than ``max_abs_value``."""

    reason = Reason.UPDATE_VALUE_TOO_LARGE


@dataclass(frozen=True)
class UpdateBounds:
    """Poisoning guard: limits a valid-looking update must also respect (None: no limit).

    ``max_update_norm`` bounds the L2 norm of (update - current global) over every tensor, the step
    one node proposes; ``max_abs_value`` bounds every value of the update. Both are far above what
    local training produces (see README, "Security and trust") and far below what scales the average.
    """

    max_update_norm: float | None = None
    max_abs_value: float | None = None


def check_bounds(decoded: DecodedRows, reference: Mapping[str, torch.Tensor], bounds: UpdateBounds) -> None:
    """Raise an :class:`UpdateOutOfBoundsError` when the decoded update (rows not sent are the reference's)
    breaks ``bounds``, computed from the sent rows alone.

    The values are those of the full decoded tensors (:func:`decode_adapter`'s): the largest magnitude is
    taken over the sent rows and the reference's other rows (exactly); the norm over the sent rows (the other
    rows of the update equal the reference's), in one pass per tensor (:func:`shared.kernels.row_stats`:
    float32 squares summed per row, the rows in float64), equal to the norm of the full difference within
    float32 rounding.
    """
    if bounds.max_abs_value is None and bounds.max_update_norm is None:
        return
    peak, total = 0.0, 0.0
    for name, x in decoded.rows.items():
        ref = kernels.as_rows(reference[name])
        if decoded.complete[name]:
            sent = kernels.all_rows(x.shape[0])
        else:
            present = decoded.present[name].numpy()
            sent = present.nonzero()[0]
            if bounds.max_abs_value is not None:  # the rows not sent are the reference's
                peak = max(peak, kernels.rows_peak(ref, (~present).nonzero()[0])[1])
        finite, x_peak, squares = kernels.row_stats(kernels.as_rows(x), ref, sent)
        if not finite:  # decoded rows never are; rows from elsewhere must not slip past the bounds as NaN
            raise UpdateValueTooLargeError(f"update tensor {name!r} holds NaN or Inf")
        peak, total = max(peak, x_peak), total + squares
    if bounds.max_abs_value is not None and peak > bounds.max_abs_value:
        raise UpdateValueTooLargeError(
            f"an update value of magnitude {peak:.4g} is over the bound {bounds.max_abs_value:g}"
        )
    if bounds.max_update_norm is not None:
        norm = total**0.5
        if norm > bounds.max_update_norm:
            raise UpdateNormTooLargeError(
                f"the update moves the global by an L2 norm of {norm:.4g}, over the bound {bounds.max_update_norm:g}"
            )


def bound_update(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    max_update_norm: float | None = None,
    max_abs_value: float | None = None,
) -> dict[str, torch.Tensor]:
    """``update`` brought within the bounds :func:`check_bounds` checks: values clamped to ``max_abs_value``,
    then the step from ``reference`` scaled down to the norm ``max_update_norm``. A node applies this
    itself when the aggregator cannot check its update (secure aggregation)."""
    out = {k: v.detach().float() for k, v in update.items()}
    if max_abs_value is not None:
        out = {k: v.clamp(-max_abs_value, max_abs_value) for k, v in out.items()}
    if max_update_norm is not None:
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(out[k] - reference[k])) ** 2 for k in out))
        if norm > max_update_norm:
            factor = max_update_norm / norm
            out = {k: reference[k] + (out[k] - reference[k]) * factor for k in out}
    return out


def make_update(
    learner: HospitalLearner,
    global_state: Mapping[str, torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
    round_index: int,
    wire: WireConfig,
) -> tuple[EncodedPayload, RoundStats]:
    """A node's part of a round: start from the global adapter, train, encode what travels."""
    learner.load_adapter_state(dict(global_state))
    stats = learner.train_round(features, labels, round_index)
    return encode_adapter(learner.adapter_state(), global_state, wire), stats


def fold_update(
    aggregator: Aggregator,
    payload: bytes,
    sha256: str | None,
    global_state: Mapping[str, torch.Tensor],
    weight: float,
    wire: WireConfig,
    bounds: UpdateBounds = UpdateBounds(),
    *,
    info: PayloadInfo | None = None,
) -> None:
    """The aggregator's part for one update: every byte is validated, and the values bounded, before it
    touches the average. ``weight``: the node's weight in the ``weighted`` rule
    (:func:`shared.learning.aggregation.capped_weights`); its codec and delta flag must be ``wire``'s.
    ``sha256``: the hash that travelled with the payload, or None when the caller hashed these very
    bytes and compared already (the aggregator hashes an upload while its chunks arrive); ``info``: the
    payload's header as :func:`shared.codec.payload_info` read it, when the caller read it already.

    The update is decoded to the rows it sent (:func:`shared.codec.decode_rows`, no full-size copy per
    tensor) and folded as rows (:meth:`shared.learning.aggregation.Aggregator.add_rows`): the streaming
    rules add each tensor's sent rows into their running sums in one vectorised step, the same result
    as decoding to full tensors and :meth:`~shared.learning.aggregation.Aggregator.add`. The rows are decoded
    into the aggregator's :class:`~shared.learning.aggregation.Workspace`: nothing full-size is allocated per
    update. The rules that keep every update (median, trimmed mean) expand the rows to full tensors."""
    check_wire(payload, wire, info)
    decoded = decode_adapter_rows(payload, sha256, global_state, wire, aggregator.workspace)
    check_bounds(decoded, global_state, bounds)
    aggregator.add_rows(decoded.rows, decoded.present, num_samples=weight)


def publish_global(
    aggregator: Aggregator, global_state: Mapping[str, torch.Tensor], wire: WireConfig
) -> tuple[EncodedPayload, dict[str, torch.Tensor]]:
    """Close a round: the new global's payload, and the decoded value every party will hold."""
    return publish_state(aggregator.result(global_state), global_state, wire)


def publish_state(
    new_state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], wire: WireConfig
) -> tuple[EncodedPayload, dict[str, torch.Tensor]]:
    """The payload of a new global state (however it was computed: the streaming average, or the unmasked
    sum of secure aggregation), and the decoded value every party will hold."""
    payload = encode_adapter(new_state, global_state, wire)
    decoded = decode_adapter(payload.data, payload.sha256, global_state, wire)
    return payload, decoded.tensors
