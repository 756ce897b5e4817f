"""Aggregator settings: YAML < ``FEDMEDCLIP_AGGREGATOR_*`` environment < flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from shared.codec import CODECS
from shared.learning.aggregation import AGGREGATION_RULES
from shared.learning.metrics import SELECT_METRICS
from shared.learning.training import METHODS
from shared.secagg import check_settings

ENV_PREFIX = "FEDMEDCLIP_AGGREGATOR_"


@dataclass(frozen=True)
class AggregatorConfig:
    # relative paths in a YAML file are relative to that file (a startup kit works wherever it is copied)
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("tls_cert", "tls_key", "tls_ca", "out_dir", "audit_key")

    # network
    listen: str = "127.0.0.1:50051"  # host:port the AggregatorService listens on (loopback by default)
    # identity (mTLS; see shared/tls.py): the server certificate, its key, the federation's CA that signs
    # the nodes' client certificates, and the node ids (certificate CNs) allowed in
    tls_cert: str | None = None  # the aggregator's certificate (PEM)
    tls_key: str | None = None  # its private key (PEM; keep it mode 0600)
    tls_ca: str | None = None  # the federation's CA, which signs the nodes' certificates
    allowed_nodes: list[str] | None = None  # required with TLS; in insecure mode it limits the claimed ids
    insecure: bool = False  # plaintext, no identity: tests on one machine only (a loud warning at start)
    health_port: int = 50052  # grpc.health.v1 on its own port (0: pick a free one)
    metrics_port: int = 9100  # Prometheus /metrics (0: pick a free one)
    metrics_addr: str = "127.0.0.1"  # address /metrics binds to (0.0.0.0: reachable by a Prometheus elsewhere)
    reflection: bool = False  # server reflection on the service port (for grpcurl)
    max_workers: int = 64  # each node waiting for the next round holds one worker: keep it above the nodes
    upload_slots: int = 4  # uploads received at once (each holds its payload); the rest wait: memory stays flat
    shutdown_grace_s: float = 10.0  # SIGTERM: in-flight RPCs get this long
    # load limits (aggregator/limits.py): one node's share of the server, stream deadlines, overload
    max_rpcs_per_node: int = 8  # RPCs one node may have in flight at once, all kinds (at most half of max_workers)
    max_streams_per_node: int = 2  # uploads and downloads one node may run at once (the upload slots it can hold)
    max_long_polls_per_node: int = 2  # GetRound long polls one node may have waiting at once
    max_concurrent_rpcs: int = 0  # RPCs running or queued, all nodes; gRPC refuses more (0: 4 x max_workers)
    stream_timeout_s: float = 150.0  # server-side deadline of one upload or download stream, from its start
    stream_min_rate_bps: float = 16384.0  # a stream moving fewer bytes/s than this after stream_grace_s is cancelled
    stream_grace_s: float = 10.0  # a stream's rate is judged after this long (waiting for an upload slot excluded)
    overload_ratio: float = 0.75  # health says overloaded (service NOT_SERVING) with this fraction of max_workers busy
    overload_hold_s: float = 5.0  # ... and for this long after that, or after a refusal for a load limit
    # run
    out_dir: str = "runs/aggregator"  # checkpoint, published globals, report
    # the Ed25519 key that signs the audit log and receipts (docs/audit.md; fedmedclip provision writes audit.key
    # into the kit and its public half into every node's kit); unset: <out_dir>/audit.key, made on first start
    audit_key: str | None = None  # the audit log's signing key (PEM, Ed25519); unset: <out_dir>/audit.key
    rounds: int = 50  # communication rounds of the run
    min_nodes: int = 2  # quorum: a round may close at its deadline with this many updates
    round_timeout_s: float = 120.0  # deadline of a round, from its opening
    quorum_timeout_s: float = 300.0  # after the deadline, wait at most this long for the quorum, then fail
    registration_timeout_s: float = 900.0  # wait at most this long for min_nodes to register
    linger_s: float = 60.0  # after the last round, wait at most this long for the final reports
    exit_when_done: bool = True  # False: keep serving after the run until SIGTERM
    heartbeat_interval_s: float = 5.0  # how often nodes are asked to send a heartbeat
    node_timeout_s: float = 30.0  # a node not heard from for this long is not 'connected'
    # learning (must match the nodes; checked at registration and against the checkpoint)
    method: str = "fedmedclip"  # the method every node must run (checked at registration)
    seed: int = 0  # seeds the initial global FAM (every node must use the same)
    embed_dim: int = 512  # width of the backbone's embeddings (every node must match)
    codec: str = "int8"  # fp32, fp16, int8 or int4: how the adapter travels
    delta: bool = False  # updates travel as differences to the last global
    drop_masked_rows: bool = True  # rows the learned mask switches off are not sent
    aggregation: str = "weighted"  # weighted | uniform | median | trimmed_mean (robust to a few bad updates)
    trim_ratio: float = 0.1  # trimmed_mean: fraction cut at each end per coordinate
    # poisoning guard: an update beyond these bounds is refused before it touches the average (None: off)
    max_update_norm: float | None = 50.0  # L2 norm of (update - current global), all tensors
    max_abs_value: float | None = 100.0  # largest |value| in the update
    class_names: list[str] | None = None  # the federation's label space (fedmedclip provision --classes pins it)
    backbone_fingerprint: str | None = None  # the backbone every node must run (pinned by provision with the classes)
    trust_first_node: bool = False  # True: without both pins, the first node to register sets them
    # weights of the weighted rule (docs/trust-model.md, section 5): a node's count is fixed at its first registration
    max_samples_per_node: int | None = 1_000_000  # a node's stated training samples weigh at most this (None: no cut)
    max_weight_share: float | None = 0.5  # no node's share of the weighted average above this, water-filled (None: off)
    select_by: str = "accuracy"  # mean val metric that picks the best round: accuracy, balanced_accuracy, macro_f1
    # secure aggregation (docs/secure-aggregation.md): the aggregator sees only the sum of the updates
    secure_aggregation: bool = False  # every node must run it too (checked at registration); needs mTLS
    secagg_clip: float = 1.0  # each value of (update - global) is clipped to this at the node before masking
    secagg_threshold: float = 0.5  # Shamir threshold t: more than this fraction of a round's roster
    secagg_phase_timeout_s: float = 30.0  # each phase after the keys (shares, masked inputs, unmasking) gets this long

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}")
        if not METHODS[self.method].federated:
            raise ValueError(f"method {self.method} does not federate an adapter")
        if self.select_by not in SELECT_METRICS:
            raise ValueError(f"select_by must be one of {list(SELECT_METRICS)}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {list(CODECS)}")
        if self.aggregation not in AGGREGATION_RULES:
            raise ValueError(f"aggregation must be one of {list(AGGREGATION_RULES)}")
        if not 0.0 <= self.trim_ratio < 0.5:
            raise ValueError("trim_ratio must be in [0, 0.5)")
        for name in ("max_update_norm", "max_abs_value"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (or null: off)")
        if self.max_samples_per_node is not None and self.max_samples_per_node < 1:
            raise ValueError("max_samples_per_node must be >= 1 (or null: no cut)")
        if self.max_weight_share is not None and not 0.0 < self.max_weight_share <= 1.0:
            raise ValueError("max_weight_share must be in (0, 1] (or null: off)")
        if self.upload_slots < 1 or self.max_workers < 1:
            raise ValueError("upload_slots and max_workers must be >= 1")
        for name in ("max_rpcs_per_node", "max_streams_per_node", "max_long_polls_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_rpcs_per_node < max(self.max_streams_per_node, self.max_long_polls_per_node):
            raise ValueError("max_rpcs_per_node must be >= max_streams_per_node and max_long_polls_per_node")
        if 2 * self.max_rpcs_per_node > self.max_workers:
            raise ValueError(
                f"max_rpcs_per_node ({self.max_rpcs_per_node}) must be at most half of max_workers "
                f"({self.max_workers}): one node must never hold the server"
            )
        if self.max_concurrent_rpcs < 0:
            raise ValueError("max_concurrent_rpcs must be >= 0 (0: 4 x max_workers)")
        for name in ("stream_timeout_s", "stream_grace_s", "overload_hold_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.stream_min_rate_bps < 0:
            raise ValueError("stream_min_rate_bps must be >= 0 (0: no minimum rate)")
        if not 0.0 < self.overload_ratio <= 1.0:
            raise ValueError("overload_ratio must be in (0, 1]")
        if self.secure_aggregation:
            check_settings(self.aggregation, self.secagg_clip, self.secagg_threshold)
            if self.insecure or not self.tls_ca:
                raise ValueError("secure aggregation needs mTLS: the nodes sign their keys with their certificates")
        if not self.secagg_phase_timeout_s > 0:
            raise ValueError("secagg_phase_timeout_s must be > 0")
        if self.rounds < 1 or self.min_nodes < 1:
            raise ValueError("rounds and min_nodes must be >= 1")
        for name in (
            "round_timeout_s",
            "quorum_timeout_s",
            "registration_timeout_s",
            "linger_s",
            "heartbeat_interval_s",
            "node_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
