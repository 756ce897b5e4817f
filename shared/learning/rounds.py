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

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shared.codec import (
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    CodecError,
    DecodedState,
    EncodedPayload,
    decode_state,
    encode_state,
    payload_info,
)
from shared.errors import FedMedCLIPError
from shared.learning.aggregation import Aggregator
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
        mask = weight.abs().mean(dim=1) >= threshold
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


def check_wire(payload: bytes, wire: WireConfig) -> None:
    """Refuse (:class:`WireMismatchError`) a payload whose header names another codec or delta flag than
    ``wire``; reads only the payload's prefix and header. Both ends call it before decoding."""
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


def check_bounds(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], bounds: UpdateBounds
) -> None:
    """Raise an :class:`UpdateOutOfBoundsError` when ``state`` breaks ``bounds``."""
    if bounds.max_abs_value is not None:
        peak = max((max(-float(t.min()), float(t.max())) for t in state.values() if t.numel()), default=0.0)
        if peak > bounds.max_abs_value:
            raise UpdateValueTooLargeError(
                f"an update value of magnitude {peak:.4g} is over the bound {bounds.max_abs_value:g}"
            )
    if bounds.max_update_norm is not None:  # float32 is exact enough for a bound
        norm = sum(float(torch.linalg.vector_norm(state[k] - reference[k])) ** 2 for k in state) ** 0.5
        if norm > bounds.max_update_norm:
            raise UpdateNormTooLargeError(
                f"the update moves the global by an L2 norm of {norm:.4g}, over the bound {bounds.max_update_norm:g}"
            )


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
) -> DecodedState:
    """The aggregator's part for one update: every byte is validated, and the values bounded, before it
    touches the average. ``weight``: the node's weight in the ``weighted`` rule
    (:func:`shared.learning.aggregation.capped_weights`); its codec and delta flag must be ``wire``'s."""
    check_wire(payload, wire)
    decoded = decode_adapter(payload, sha256, global_state, wire)
    check_bounds(decoded.tensors, global_state, bounds)
    aggregator.add(decoded.tensors, decoded.present, num_samples=weight)
    return decoded


def publish_global(
    aggregator: Aggregator, global_state: Mapping[str, torch.Tensor], wire: WireConfig
) -> tuple[EncodedPayload, dict[str, torch.Tensor]]:
    """Close a round: the new global's payload, and the decoded value every party will hold."""
    new_state = aggregator.result(global_state)
    payload = encode_adapter(new_state, global_state, wire)
    decoded = decode_adapter(payload.data, payload.sha256, global_state, wire)
    return payload, decoded.tensors
