"""A light node: the real protocol (mTLS, Register, long-poll GetRound, chunked UploadUpdate) without learning.

The load benchmark runs hundreds of these, and the identity and hostile-input tests drive a running
aggregator with them. A light node registers with the federation's fingerprint, label space,
embedding width and seeded initial adapter, and uploads valid encoded adapter states (the seeded
initial adapter plus noise), so the aggregator does its full work per update: SHA-256, decode,
bounds, fold. Hostile tests use :meth:`LightNode.upload_messages` to send anything at all.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import grpc
import numpy as np
import torch

from hospital_node.secure import Answered, Encoder, SecureLink, SecureUploader
from shared.codec import EncodedPayload
from shared.learning.rounds import WireConfig, encode_adapter, row_masks_of
from shared.learning.training import TrainConfig, build_adapter, get_method
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.protocol import state_digest
from shared.wire.tls import TlsMaterial, secure_channel
from shared.wire.transport import CHUNK_BYTES, Backoff, call_with_retry, channel_options, chunks, sha256_hex


@dataclass(frozen=True)
class Federation:
    """What every party of a federation agrees on (the aggregator pins fingerprint and classes from the first)."""

    method: str = "fedmedclip"
    embed_dim: int = 512
    seed: int = 0
    fingerprint: str = "f" * 64
    class_names: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in _initial(self.method, self.embed_dim, self.seed).items()}

    def initial_sha256(self) -> str:
        return state_digest(_initial(self.method, self.embed_dim, self.seed))


_BUILD = threading.Lock()


@lru_cache(maxsize=8)
def _initial(method: str, dim: int, seed: int) -> dict[str, torch.Tensor]:
    with _BUILD:  # building seeds torch's global generator: one thread at a time
        return build_adapter(get_method(method), dim, TrainConfig(), seed).travel_state()


def perturbed(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """``state`` plus Gaussian noise of standard deviation ``scale`` (what a round of training looks like)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def encode(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], codec: str = "int8") -> EncodedPayload:
    return encode_adapter(state, reference, WireConfig(codec=codec))


class LightNode:
    def __init__(
        self,
        address: str,
        node_id: str,
        tls: TlsMaterial | None,
        fed: Federation = Federation(),
        *,
        num_train: int = 100,
        evaluator: bool = False,
        timeout_s: float = 30.0,
        options: list[tuple[str, object]] | None = None,
    ) -> None:
        self.node_id, self.fed, self.num_train = node_id, fed, num_train
        self.evaluator, self.timeout_s = evaluator, timeout_s
        self.tls = tls
        self.secagg_answered = Answered(None, "")  # kept in memory: a light node never restarts
        self.channel = secure_channel(address, tls, options or channel_options())
        self.stub = pb_grpc.AggregatorServiceStub(self.channel)
        self.run_id = ""

    def close(self) -> None:
        self.channel.close()

    def register(self, node_id: str | None = None, **overrides) -> pb.RegisterResponse:
        fields = dict(
            node_id=node_id or self.node_id,
            role=pb.NODE_ROLE_EVALUATOR if self.evaluator else pb.NODE_ROLE_TRAINER,
            backbone_fingerprint=self.fed.fingerprint,
            class_names=list(self.fed.class_names),
            embed_dim=self.fed.embed_dim,
            method=self.fed.method,
            initial_state_sha256=self.fed.initial_sha256(),
            num_train_samples=0 if self.evaluator else self.num_train,
            num_val_samples=10,
            num_test_samples=10,
        )
        response = self.stub.Register(pb.RegisterRequest(**(fields | overrides)), timeout=self.timeout_s)
        self.run_id = response.round.run_id
        return response

    def round(self, wait_for: int = 0, max_wait_s: float = 0.0) -> pb.RoundInfo:
        request = pb.GetRoundRequest(
            run_id=self.run_id, node_id=self.node_id, wait_for_round=wait_for, max_wait_ms=int(max_wait_s * 1000)
        )
        return self.stub.GetRound(request, timeout=max_wait_s + self.timeout_s).round

    def header(self, payload: EncodedPayload, round_id: int, **overrides) -> pb.PayloadHeader:
        fields = dict(
            run_id=self.run_id,
            round_id=round_id,
            node_id=self.node_id,
            update_id=f"{self.run_id}-{self.node_id}-r{round_id}",
            version=round_id,
            codec=payload.codec,
            raw_bytes=payload.raw_nbytes,
            wire_bytes=len(payload.data),
            sha256=payload.sha256,
            num_train_samples=self.num_train,
        )
        return pb.PayloadHeader(**(fields | overrides))

    def upload(
        self, payload: EncodedPayload, round_id: int, chunk_bytes: int = CHUNK_BYTES, **header_overrides
    ) -> pb.UploadUpdateResponse:
        head = self.header(payload, round_id, **header_overrides)
        return self.upload_messages(
            [pb.UploadUpdateRequest(header=head)]
            + [pb.UploadUpdateRequest(chunk=c) for c in chunks(payload.data, chunk_bytes)]
        )

    def upload_messages(self, messages: Iterable[pb.UploadUpdateRequest]) -> pb.UploadUpdateResponse:
        return self.stub.UploadUpdate(iter(messages), timeout=self.timeout_s)

    def fetch(self, version: int) -> tuple[pb.PayloadHeader, bytes]:
        stream: Iterator[pb.FetchGlobalResponse] = self.stub.FetchGlobal(
            pb.FetchGlobalRequest(run_id=self.run_id, node_id=self.node_id, version=version), timeout=self.timeout_s
        )
        first = next(stream)
        return first.header, b"".join(m.chunk for m in stream)

    # -- secure aggregation (hospital_node/secure.py runs the sessions) ---------------------------
    def secure_round(
        self,
        round_id: int,
        encode: Encoder,
        uploader: type[SecureUploader] = SecureUploader,
        long_poll_s: float = 5.0,
    ) -> bool:
        """Take part in round ``round_id`` under secure aggregation until the round closes: ``encode`` gives
        this node's ring input for a session (:func:`hospital_node.secure.adapter_encoder`), ``uploader`` may
        be a subclass that misbehaves or drops out. Sessions that end without the round closing are joined
        again, as a node daemon does: True when the round closed with this node's input in its sum."""
        rng = random.Random()
        backoff = Backoff(0.1, 1.0, give_up_after_s=120.0)
        link = SecureLink(
            self.node_id,
            self.run_id,
            "",
            self.stub,
            self.tls,
            lambda what, fn: call_with_retry(fn, what, backoff, rng),
            long_poll_s=long_poll_s,
            rpc_timeout_s=self.timeout_s,
            answered=self.secagg_answered,
        )
        upload = lambda masked, session: self.upload_masked(masked, session, round_id, link.call)  # noqa: E731
        return uploader(link, round_id, encode, upload).run()

    def masked_header(self, data: bytes, round_id: int, session: str, **overrides) -> pb.PayloadHeader:
        fields = dict(
            run_id=self.run_id,
            round_id=round_id,
            node_id=self.node_id,
            update_id=f"{self.run_id}-{self.node_id}-r{round_id}-{session}",
            version=round_id,
            codec="secagg",
            raw_bytes=len(data),
            wire_bytes=len(data),
            sha256=sha256_hex(data),
            num_train_samples=self.num_train,
            secagg_session=session,
        )
        return pb.PayloadHeader(**(fields | overrides))

    def upload_masked(
        self, masked: np.ndarray, session: str, round_id: int, call: Callable[[str, Callable], object]
    ) -> None:
        """Send a masked input as a node daemon does: through ``call`` (its retries of transient failures: an
        aggregator that dies before its answer gets the same upload again once it is back); a refusal is
        raised, for :class:`~hospital_node.secure.SecureUploader` to read."""
        data = masked.astype("<u4").tobytes()
        head = self.masked_header(data, round_id, session)
        self.last_masked = data  # what the aggregator received, for the tests
        messages = [pb.UploadUpdateRequest(header=head)] + [pb.UploadUpdateRequest(chunk=c) for c in chunks(data)]
        call("UploadUpdate", lambda: self.upload_messages(messages))


def aggregator_args(
    pki: Path, out: Path, port: int, metrics_port: int, rounds: int, min_nodes: int, dim: int, *extra: str
) -> list[str]:
    """The flags of an aggregator for light nodes (after ``aggregator``): the kit's certificates, loopback, the
    first node pins fingerprint and classes (light nodes bring their own), and it serves until stopped."""
    return [
        "--config",
        str(pki / "aggregator" / "aggregator.yaml"),
        "--listen",
        f"127.0.0.1:{port}",
        "--health-port",
        "0",
        "--metrics-port",
        str(metrics_port),
        "--out-dir",
        str(out),
        "--rounds",
        str(rounds),
        "--min-nodes",
        str(min_nodes),
        "--embed-dim",
        str(dim),
        "--trust-first-node",
        "true",
        "--exit-when-done",
        "false",
        *extra,
    ]


def plain_average(updates: dict[str, dict], reference: dict, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """The plain rule's weighted average in float64, per row over the nodes that sent the row (rows a node's
    mask switched off are not sent): what secure aggregation must reproduce within its error bound."""
    out = {}
    for name, ref in reference.items():
        rows = ref.shape[0]
        num = torch.zeros(rows, ref.numel() // rows, dtype=torch.float64)
        den = torch.zeros(rows, dtype=torch.float64)
        for node, state in updates.items():
            sent = row_masks_of(state).get(name, torch.ones(rows, dtype=torch.bool))
            diff = (state[name].double() - ref.double()).reshape(rows, -1)
            num += weights[node] * diff * sent.unsqueeze(1)
            den += weights[node] * sent
        mean = ref.double().reshape(rows, -1).clone()
        has = den > 0
        mean[has] += num[has] / den[has].unsqueeze(1)
        out[name] = mean.reshape(ref.shape)
    return out


def rpc_code(call) -> grpc.StatusCode:
    """The status code ``call()`` ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
