"""Hospital-node settings: YAML < ``FEDMEDCLIP_NODE_*`` environment < flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from shared.backbone import BACKBONE_KINDS, OFFLINE_DEFAULT, RUNTIMES
from shared.learning.privacy import DPConfig
from shared.learning.training import METHODS, TrainConfig

ENV_PREFIX = "FEDMEDCLIP_NODE_"
#: what a node's evaluation reports hold (README, "What leaves your hospital"): every metric and the
#: training summary; the validation accuracy of each global only; nothing but "evaluated"
SHARE_METRICS = ("all", "val_accuracy", "none")
_T = TrainConfig()


@dataclass(frozen=True)
class NodeConfig:
    # relative paths in a YAML file are relative to that file (a startup kit works wherever it is copied)
    PATH_FIELDS: ClassVar[tuple[str, ...]] = (
        "tls_cert",
        "tls_key",
        "tls_ca",
        "data",
        "state_dir",
        "cache_dir",
        "audit_pub",
    )

    # identity and connection
    node_id: str = "hospital_1"  # this hospital's id: the CN of its certificate, on the aggregator's allow-list
    aggregator: str = "127.0.0.1:50051"  # host:port of the aggregator
    # identity (mTLS; see shared/tls.py): this node's certificate (CN = node_id) and key, the federation's CA
    tls_cert: str | None = None  # this node's certificate (PEM; CN = node_id)
    tls_key: str | None = None  # its private key (PEM; keep it mode 0600)
    tls_ca: str | None = None  # the federation's CA certificate (PEM)
    audit_pub: str | None = None  # the aggregator's audit public key (PEM, from the kit): receipts are checked with it
    tls_server_name: str | None = None  # the aggregator's name in its certificate, if not the host dialled
    insecure: bool = False  # plaintext, no identity: tests on one machine only (a loud warning at start)
    role: str = "trainer"  # trainer | evaluator (a held-out hospital: evaluates every global, never trains)
    rpc_timeout_s: float = 30.0  # deadline of every unary RPC
    transfer_timeout_s: float = 120.0  # deadline of a whole upload or download stream
    long_poll_s: float = 20.0  # how long one GetRound may wait for the next round
    retry_initial_s: float = 0.5  # reconnect backoff: exponential with full jitter
    retry_max_s: float = 10.0  # the longest wait between two reconnection attempts
    give_up_after_s: float = 600.0  # an aggregator unreachable for this long ends the node (exit 1)
    once: bool = False  # exit when a run ends (default: archive its state, wait for the federation's next run)
    metrics_port: int = 9101  # Prometheus /metrics (0: pick a free one)
    metrics_addr: str = "127.0.0.1"  # address /metrics and /healthz bind to (0.0.0.0: reachable from elsewhere)
    share_metrics: str = "all"  # evaluations sent to the aggregator: all | val_accuracy | none (kept locally)
    # data and state
    data: str = ""  # a CSV manifest (path,label[,split]) or an ImageFolder
    classes: list[str] | None = None  # the federation's label space; default: classes.txt beside the manifest
    split_seed: int = 0  # seeds the 60/20/20 split when the data has no split column
    state_dir: str = "runs/node"  # private MLP, optimiser state, last global, pending update
    cache_dir: str = ".cache/features"  # the feature cache: each image is encoded once
    progress: bool = True  # a progress bar while encoding
    # learning (method, seed and codec must match the federation: checked at registration)
    method: str = "fedmedclip"  # must match the federation's (checked at registration)
    seed: int = 0  # the federation's seed (initial FAM, private MLP, batch order)
    hospital_index: int = 0  # seeds the private MLP and the batch order (position among training hospitals)
    lr_fam: float = _T.lr_adapter  # learning rate of the FAM
    lr_mlp: float = _T.lr_mlp  # learning rate of the private MLP
    batch_size: int = _T.batch_size  # local mini-batch size
    local_epochs: int = _T.local_epochs  # passes over the local training split per round
    compile: bool = _T.compile  # on a CPU, torch.compile the training step: steps a quarter shorter, seconds to compile
    backbone: str = OFFLINE_DEFAULT  # offline (EfficientNet-Lite0 + MiniLM, not CLIP) or openclip
    arch: str = "ViT-B-32"  # open_clip architecture (backbone: openclip)
    pretrained: str | None = None  # open_clip pretrained tag or a local checkpoint file (air-gapped sites)
    templates: list[str] | None = None  # prompt templates, default "a picture of a {}"
    runtime: str = "auto"  # image tower: auto (onnxruntime on a CPU, offline backbone), torch or onnxruntime
    device: str = "cpu"  # cpu or cuda (encoding and training)
    threads: int = 0  # torch CPU threads (0: torch's default)
    # differential privacy (README, "Privacy and audit"): off unless dp_epsilon or dp_noise_multiplier is set
    dp_epsilon: float | None = None  # this hospital's epsilon budget for a run: sets the noise; training stops there
    dp_delta: float | None = None  # delta of the guarantee (default: min(1e-5, 0.1 / training images))
    dp_noise_multiplier: float | None = None  # noise std / clip, given directly (dp_epsilon, if set too: a cap)
    dp_clip: float = 1.0  # each training image's gradient is clipped to this L2 norm
    # secure aggregation (docs/secure-aggregation.md): must equal the federation's setting; needs mTLS
    secure_aggregation: bool = False  # the node's updates travel masked; the aggregator sees only their sum

    def __post_init__(self) -> None:
        if self.role not in ("trainer", "evaluator"):
            raise ValueError("role must be trainer or evaluator")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}")
        if self.share_metrics not in SHARE_METRICS:
            raise ValueError(f"share_metrics must be one of {list(SHARE_METRICS)}")
        if self.backbone not in BACKBONE_KINDS:
            raise ValueError(f"backbone must be one of {list(BACKBONE_KINDS)}")
        self.dp_config()  # refuses a bad privacy setting at start
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {list(RUNTIMES)}")
        if self.secure_aggregation and self.insecure:
            raise ValueError("secure aggregation needs mTLS: the node signs its keys with its certificate")
        for name in (
            "rpc_timeout_s",
            "transfer_timeout_s",
            "long_poll_s",
            "retry_initial_s",
            "retry_max_s",
            "give_up_after_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    def dp_config(self) -> DPConfig:
        return DPConfig(
            epsilon=self.dp_epsilon, delta=self.dp_delta, noise_multiplier=self.dp_noise_multiplier, clip=self.dp_clip
        )
