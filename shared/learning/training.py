"""Local training and evaluation of one hospital, on cached features.

:class:`HospitalLearner` is what both the in-process simulation and the hospital-node daemon
drive: load the global adapter, train one round, hand back the adapter state, evaluate. Methods
and ablations are presets of :class:`MethodConfig` (see :data:`METHODS`).
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from shared.learning.metrics import classification_metrics
from shared.learning.model import FAM, Adapter, FedCLIPAdapter, IdentityAdapter, PrivateMLP, clip_logits
from shared.learning.objective import LossConfig, ensemble_probs, local_loss, log_prior
from shared.learning.privacy import DPSGD, Accountant, DPConfig, PrivacyPlan, noisy_log_prior

ADAPTERS = ("fam", "fedclip", "none")
HEADS = ("ensemble", "clip", "mlp")


@dataclass(frozen=True)
class MethodConfig:
    """What one method trains, sends and predicts with."""

    name: str
    adapter: str = "fam"  # fam | fedclip | none
    use_mlp: bool = True
    federated: bool = True  # the adapter is averaged across hospitals
    head: str = "ensemble"  # how a training hospital predicts
    masked: bool = True  # MaskedLinear thresholds active
    loss: LossConfig = field(default_factory=LossConfig)
    trains: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}")
        if self.head in ("ensemble", "mlp") and not self.use_mlp:
            raise ValueError(f"{self.name}: head {self.head!r} needs the MLP")


_ALL = LossConfig()
METHODS: dict[str, MethodConfig] = {
    m.name: m
    for m in (
        MethodConfig(
            "fedmedclip",
            loss=replace(_ALL, balance="logit_adjust"),
            description="the paper's method, its cross-entropy terms logit-adjusted by the local class prior "
            "(the default: bench/results/layouts.md)",
        ),
        MethodConfig(
            "fedmedclip_paper", description="FAM + private MLP, L_con + L_mlp + lambda L_sim, ensemble (the paper)"
        ),
        MethodConfig(
            "fedclip",
            adapter="fedclip",
            use_mlp=False,
            head="clip",
            masked=False,
            loss=replace(_ALL, use_mlp=False, use_sim=False),
            description="FedCLIP: Linear-Tanh-Linear-Softmax adapter, contrastive loss only",
        ),
        MethodConfig(
            "local",
            adapter="none",
            federated=False,
            head="mlp",
            loss=replace(_ALL, use_con=False, use_sim=False),
            description="private MLP on the frozen features, no federation (ablation 'MLP only, local')",
        ),
        MethodConfig(
            "zeroshot",
            adapter="none",
            use_mlp=False,
            federated=False,
            head="clip",
            trains=False,
            description="frozen image features against the class prompts, no training",
        ),
        MethodConfig(
            "ablation_con_only",
            use_mlp=False,
            head="clip",
            loss=replace(_ALL, use_mlp=False, use_sim=False),
            description="FAM, contrastive loss only (ablation 'contrastive only')",
        ),
        MethodConfig(
            "ablation_con_mlp",
            loss=replace(_ALL, use_sim=False),
            description="FAM + MLP without the KL term (ablation '+ MLP')",
        ),
        MethodConfig(
            "ablation_no_aggregation",
            federated=False,
            description="all terms, each hospital keeps its own FAM (ablation 'no aggregation')",
        ),
        MethodConfig(
            "ablation_unmasked", masked=False, description="all terms, plain linear layers (no learned masks)"
        ),
        MethodConfig(
            "fedclip_la",
            adapter="fedclip",
            use_mlp=False,
            head="clip",
            masked=False,
            loss=replace(_ALL, use_mlp=False, use_sim=False, balance="logit_adjust"),
            description="FedCLIP with a logit-adjusted contrastive term (imbalance)",
        ),
        MethodConfig(
            "local_la",
            adapter="none",
            federated=False,
            head="mlp",
            loss=replace(_ALL, use_con=False, use_sim=False, balance="logit_adjust"),
            description="local MLP only with a logit-adjusted cross-entropy (imbalance)",
        ),
        MethodConfig(
            "ref_batch_contrastive",
            loss=replace(_ALL, contrastive="batch"),
            description="reference code: per-sample prompts inside the batch",
        ),
        MethodConfig(
            "ref_class_kl",
            loss=replace(_ALL, kl="class"),
            description="reference code: class-level KL (softmax over the batch)",
        ),
        MethodConfig(
            "ref_fixed_weight",
            loss=replace(_ALL, kl_weight="fixed"),
            description="reference code: fixed KL weight 1/2 instead of the adaptive one",
        ),
    )
}


def get_method(name: str) -> MethodConfig:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation defaults (docs/method.md, section 6)."""

    lr_adapter: float = 5e-4
    lr_mlp: float = 1e-4
    lr_decay: float = 0.97  # per round, both optimisers
    batch_size: int = 32
    local_epochs: int = 1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.02
    mlp_hidden: int = 512
    mask_tau: float = 0.01
    # on CUDA, replay each round's full-batch step as a CUDA graph (one launch instead of hundreds: a step of
    # these small layers is launch-bound on a GPU); no effect on a CPU
    cuda_graphs: bool = True
    # on a CPU, run each full batch's forward pass and loss as one torch.compile'd graph (inductor: fused elementwise
    # kernels; its backward compiled too): about a quarter less time per step once compiled, at a one-off compile
    # of seconds per process (tens of seconds with an empty inductor cache). Off by default: it pays for long
    # training, not for short runs (bench/results/training.md). No effect on a GPU or with differential privacy.
    compile: bool = False


class _GraphedStep:
    """A learner's full-batch step (forward, loss, backward, both optimisers) captured once as a CUDA graph and
    replayed for every later full batch of the round: each batch is copied into the graph's input tensors and
    the whole step is one launch. The step computes what the eager one computes; the learning rates in force
    at capture are part of the graph, hence one graph per round. The round's first full batch captures (the
    learner's very first full batch is an eager warm-up step on the capture stream instead, which also creates
    the optimisers' state); the gradients the graph writes live in its own memory pool, so eager steps in
    between (a last, smaller batch) do not disturb it.
    """

    def __init__(self, learner: HospitalLearner, prior: torch.Tensor | None) -> None:
        self.learner, self.prior = learner, prior
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.out: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def step(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        learner = self.learner
        if learner._graph_stream is None:  # the optimisers' state, cuBLAS's handle and workspace for the capture
            # stream: made by one eager step on that stream, before any capture
            learner._graph_stream = side = torch.cuda.Stream(device=f.device)
            side.wait_stream(torch.cuda.current_stream(f.device))
            with torch.cuda.stream(side):
                out = learner._train_step(f, y, self.prior)
            torch.cuda.current_stream(f.device).wait_stream(side)
            return out
        if self.graph is None:
            self.inputs = (f.clone(), y.clone())
            self.graph = torch.cuda.CUDAGraph()
            learner._zero_grad()  # gradients are then allocated in the capture, from the graph's pool
            # Captured on the side stream (never the default one). Not torch.cuda.graph(): it also empties the
            # allocator's cache and synchronises, for every capture. The capture records and runs nothing (the
            # replay below runs this batch); thread_local: other threads' CUDA work is no error.
            side = learner._graph_stream
            side.wait_stream(torch.cuda.current_stream(f.device))
            with torch.cuda.stream(side):
                self.graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self.out = learner._train_step(*self.inputs, self.prior)
                finally:
                    self.graph.capture_end()
            torch.cuda.current_stream(f.device).wait_stream(side)
        else:
            self.inputs[0].copy_(f)
            self.inputs[1].copy_(y)
        with torch.cuda.device(f.device):  # replays on the current stream of the graph's own device
            self.graph.replay()
        if self.out is None:
            return None
        loss, terms = self.out  # the graph's own outputs, overwritten by the next replay: copied
        return loss.clone(), {k: v.clone() for k, v in terms.items()}


def _forward_loss(
    adapter: Adapter,
    mlp: PrivateMLP | None,
    f: torch.Tensor,
    y: torch.Tensor,
    text: torch.Tensor,
    scale: float,
    cfg: LossConfig,
    prior: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch's forward pass and loss (``local_loss``) with its terms: what a training step differentiates."""
    adapted = adapter(f)
    z = mlp(adapted) if mlp is not None else None
    return local_loss(adapted, z, y, text, scale, cfg, prior)


@functools.cache
def compiled_forward_loss():  # noqa: ANN201 (torch.compile's wrapper)
    """:func:`_forward_loss` compiled once per process and shared by every learner: the modules are arguments,
    so hospitals of the same shapes reuse one graph (a batch of another size compiles another)."""
    return torch.compile(_forward_loss, dynamic=False)


def _add_terms(sums: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> None:
    for key, value in terms.items():
        sums[key] = sums[key] + value if key in sums else value


@dataclass(frozen=True)
class RoundStats:
    steps: int
    seconds: float
    loss: float
    terms: dict[str, float]
    keep_ratios: dict[str, float]
    privacy: dict | None = None  # differential privacy: HospitalLearner.privacy_summary() after the round


def build_adapter(method: MethodConfig, dim: int, train: TrainConfig, seed: int) -> Adapter:
    """The initial adapter; every hospital and the aggregator build it from the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method.adapter == "fam":
            return FAM(dim, masked=method.masked, tau=train.mask_tau)
        if method.adapter == "fedclip":
            return FedCLIPAdapter(dim)
        return IdentityAdapter()


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Thresholds, biases and norm parameters are not decayed (decay would pin thresholds at 0)."""
    decay, no_decay = [], []
    for _name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]


class HospitalLearner:
    """One hospital's trainable state: its copy of the adapter, its private MLP, their optimisers."""

    def __init__(
        self,
        method: MethodConfig,
        train: TrainConfig,
        *,
        dim: int,
        num_classes: int,
        text_features: torch.Tensor,
        logit_scale: float,
        seed: int = 0,
        hospital_index: int = 0,
        device: str | torch.device = "cpu",
        dp: DPConfig | None = None,
        noise_seed: int | None = None,
    ) -> None:
        """``dp``: train with differential privacy (:mod:`shared.learning.privacy`); then ``noise_seed`` seeds its
        sampling and noise: given in simulations (reproducible), else drawn from the OS (a node: nobody else
        may know it, or the noise could be subtracted)."""
        self.method, self.train_cfg = method, train
        self.dp = dp if dp is not None and dp.enabled else None
        self.device = torch.device(device)
        self.text = text_features.to(self.device, torch.float32)
        self.scale = float(logit_scale)
        self.num_classes = num_classes
        self.adapter = build_adapter(method, dim, train, seed).to(self.device)
        self.mlp: PrivateMLP | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + 17 + hospital_index)
            if method.use_mlp:
                self.mlp = PrivateMLP(
                    dim,
                    num_classes,
                    hidden=train.mlp_hidden,
                    masked=method.masked,
                    tau=train.mask_tau,
                    per_image_norm=self.dp is not None,
                ).to(self.device)
        self.generator = torch.Generator().manual_seed(seed * 1000 + hospital_index)
        self.graphed = self.device.type == "cuda" and train.cuda_graphs
        self.compiled = self.device.type == "cpu" and train.compile and self.dp is None and method.trains
        self._graph_stream: torch.cuda.Stream | None = None  # where warm-up and captures run (not the default)
        # fused: one kernel per step (~20% faster on CPU); capturable: its step count on the device, so a CUDA
        # graph can replay the step
        opt_kw = {"betas": train.betas, "eps": train.eps, "fused": True, "capturable": self.graphed}
        adapter_groups = _param_groups(self.adapter, train.weight_decay)
        self.opt_adapter = torch.optim.AdamW(adapter_groups, lr=train.lr_adapter, **opt_kw) if adapter_groups else None
        self.opt_mlp = (
            torch.optim.AdamW(_param_groups(self.mlp, train.weight_decay), lr=train.lr_mlp, **opt_kw)
            if self.mlp is not None
            else None
        )
        self.rounds_trained = 0
        self.accountant: Accountant | None = None  # set by plan_privacy
        self.dp_prior: torch.Tensor | None = None  # the noisy class prior, released once
        self.dp_generator = torch.Generator().manual_seed(
            noise_seed if noise_seed is not None else secrets.randbits(63)
        )
        self.dp_engine = DPSGD([self.adapter, self.mlp], self.dp_generator) if self.dp else None

    # -- differential privacy ----------------------------------------------------------------
    def plan_privacy(self, num_train: int, rounds: int) -> PrivacyPlan | None:
        """Fix this run's noise from the hospital's training-set size and the run's rounds (once: a learner
        resumed from its private state keeps the plan it had). None without differential privacy."""
        if self.dp is None:
            return None
        if self.accountant is None:
            plan = self.dp.plan(
                num_train=num_train,
                batch_size=self.train_cfg.batch_size,
                local_epochs=self.train_cfg.local_epochs,
                rounds=rounds,
            )
            self.accountant = Accountant(plan)
        elif self.accountant.plan.num_train != num_train:
            raise ValueError(
                f"differential privacy: the plan is for {self.accountant.plan.num_train} training images, "
                f"this hospital now has {num_train}"
            )
        return self.accountant.plan

    def epsilon(self) -> float | None:
        """Epsilon spent in this run so far (None without differential privacy)."""
        return self.accountant.epsilon() if self.accountant is not None else None

    def privacy_summary(self, stopped: str | None = None) -> dict | None:
        """Epsilon spent so far with what it was computed from (None without differential privacy); ``stopped``:
        why training stopped (the budget)."""
        if self.accountant is None:
            return None
        plan = self.accountant.plan
        return {
            "epsilon": self.accountant.epsilon(),
            "delta": plan.delta,
            "budget": plan.budget,
            "noise_multiplier": plan.noise_multiplier,
            "clip": plan.clip,
            "sample_rate": plan.sample_rate,
            "steps": self.accountant.steps,
            "stopped": stopped,
        }

    # -- the adapter that travels ------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self.adapter.travel_state()

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_travel_state(state)

    # -- training ----------------------------------------------------------------------------
    def train_round(self, features: torch.Tensor, labels: torch.Tensor, round_index: int) -> RoundStats:
        """One round of local training (``local_epochs`` epochs) with the round's decayed rates."""
        start = time.perf_counter()
        if not self.method.trains or len(labels) == 0:
            return RoundStats(0, 0.0, float("nan"), {}, self.adapter.keep_ratios())
        decay = self.train_cfg.lr_decay**round_index
        for opt, base in ((self.opt_adapter, self.train_cfg.lr_adapter), (self.opt_mlp, self.train_cfg.lr_mlp)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = base * decay
        self.adapter.train()
        if self.mlp is not None:
            self.mlp.train()
        features = features.to(self.device, torch.float32)
        labels = labels.to(self.device)
        uses_prior = self.method.loss.balance != "none"
        if self.dp is not None:
            return self._train_round_dp(features, labels, start, uses_prior)
        prior = log_prior(labels, self.num_classes).to(self.device) if uses_prior else None
        steps, loss_sum, term_sums = 0, torch.zeros((), device=self.device), {}
        batch = self.train_cfg.batch_size
        # this round's rates are baked into the graph: a new one each round, freed with the round
        graph = _GraphedStep(self, prior) if self.graphed else None
        for _ in range(self.train_cfg.local_epochs):
            order = torch.randperm(len(labels), generator=self.generator).to(self.device)
            for start_i in range(0, len(order), batch):
                idx = order[start_i : start_i + batch]
                if len(idx) < 2 and self.mlp is not None:
                    continue  # BatchNorm cannot train on a single sample
                f, y = features[idx], labels[idx]
                full = len(idx) == batch
                if graph is not None and full:
                    out = graph.step(f, y)
                else:  # a last, smaller batch runs eagerly: no second compile for a shape seen once a round
                    out = self._train_step(f, y, prior, compiled=self.compiled and full)
                if out is None:
                    continue
                steps += 1
                loss_sum += out[0]  # summed on the device: read once, at the end of the round
                _add_terms(term_sums, out[1])
        return self._finish_round(start, steps, loss_sum, term_sums)

    def _train_step(
        self, f: torch.Tensor, y: torch.Tensor, prior: torch.Tensor | None, *, compiled: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """One optimisation step on one batch: its detached loss and terms, or None when nothing trains.
        ``compiled``: the forward pass and loss by :func:`compiled_forward_loss`."""
        forward = compiled_forward_loss() if compiled else _forward_loss
        loss, terms = forward(self.adapter, self.mlp, f, y, self.text, self.scale, self.method.loss, prior)
        if not loss.requires_grad:
            return None
        self._zero_grad()
        loss.backward()
        self._step()
        return loss.detach(), terms

    def _zero_grad(self) -> None:
        for opt in (self.opt_adapter, self.opt_mlp):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def _step(self) -> None:
        if self.method.adapter != "none" and self.opt_adapter is not None:
            self.opt_adapter.step()
        if self.opt_mlp is not None:
            self.opt_mlp.step()

    def _train_round_dp(
        self, features: torch.Tensor, labels: torch.Tensor, start: float, uses_prior: bool
    ) -> RoundStats:
        """DP-SGD: Poisson-sampled batches, per-image clipping, Gaussian noise (:mod:`shared.learning.privacy`)."""
        if self.accountant is None or self.dp_engine is None:
            raise RuntimeError("differential privacy: call plan_privacy(num_train, rounds) before training")
        plan = self.accountant.plan
        if len(labels) != plan.num_train:
            raise ValueError(f"differential privacy: planned for {plan.num_train} training images, got {len(labels)}")
        self.accountant.check_round(uses_prior)  # raises PrivacyBudgetSpent: nothing is trained
        if uses_prior and self.dp_prior is None:
            self.dp_prior = noisy_log_prior(labels, self.num_classes, self.dp_generator)
            self.accountant.prior_released = True
        prior = self.dp_prior if uses_prior else None
        steps, loss_sum, term_sums = 0, torch.zeros((), device=self.device), {}
        for _ in range(plan.steps_per_round):
            take = torch.rand(len(labels), generator=self.dp_generator) < plan.sample_rate
            idx = take.nonzero().squeeze(1).to(self.device)
            self._zero_grad()
            if len(idx):
                f, y = features[idx], labels[idx]
                with self.dp_engine.tape:
                    adapted = self.adapter(f)
                    z = self.mlp(adapted) if self.mlp is not None else None
                    losses, terms = local_loss(
                        adapted, z, y, self.text, self.scale, self.method.loss, prior, per_sample=True
                    )
                    if losses.requires_grad:
                        losses.sum().backward()
                loss_sum += losses.detach().mean()
                _add_terms(term_sums, terms)
            self.dp_engine.write_grads(len(idx), plan)  # an empty batch still takes a step: noise only
            self._step()
            steps += 1
            self.accountant.steps += 1
        return self._finish_round(start, steps, loss_sum, term_sums)

    def _finish_round(
        self, start: float, steps: int, loss_sum: torch.Tensor, term_sums: dict[str, torch.Tensor]
    ) -> RoundStats:
        self.rounds_trained += 1
        names = list(term_sums)
        sums = torch.stack([loss_sum, *(term_sums[k] for k in names)]).tolist()  # the round's one device read
        return RoundStats(
            steps=steps,
            seconds=time.perf_counter() - start,
            loss=sums[0] / max(steps, 1),
            terms={k: v / max(steps, 1) for k, v in zip(names, sums[1:], strict=True)},
            keep_ratios=self.keep_ratios(),
            privacy=self.privacy_summary(),
        )

    def keep_ratios(self) -> dict[str, float]:
        ratios = {f"adapter.{k}": v for k, v in self.adapter.keep_ratios().items()}
        if self.mlp is not None:
            ratios.update(
                {
                    f"mlp.{k}": v
                    for k, v in ((n, m.keep_ratio()) for n, m in self.mlp.named_modules() if hasattr(m, "keep_ratio"))
                }
            )
        return ratios

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, features: torch.Tensor, *, mlp: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(FAM-CLIP logits, MLP logits or None) in eval mode; ``mlp=False``: without the MLP's (None)."""
        self.adapter.eval()
        features = features.to(self.device, torch.float32)
        adapted = self.adapter(features)
        sim = clip_logits(adapted, self.text, self.scale)
        z = None
        if self.mlp is not None and mlp:
            self.mlp.eval()
            z = self.mlp(adapted)
        return sim.cpu(), (z.cpu() if z is not None else None)

    @torch.no_grad()
    def predict_probs(self, features: torch.Tensor, head: str | None = None) -> torch.Tensor:
        """Class probabilities with ``head`` (default: the method's own)."""
        return self._probs(*self.logits(features), head or self.method.head)

    def _probs(self, sim: torch.Tensor, z: torch.Tensor | None, head: str) -> torch.Tensor:
        if head == "clip":
            return torch.softmax(sim, dim=-1)
        if z is None:
            raise ValueError(f"head {head!r} needs the private MLP, which method {self.method.name} does not have")
        if head == "mlp":
            return torch.softmax(z, dim=-1)
        return ensemble_probs(sim, z)

    def evaluate(self, features: torch.Tensor, labels: torch.Tensor, head: str | None = None) -> dict[str, float]:
        return self.evaluate_heads(features, labels, (head or self.method.head,))[head or self.method.head]

    def evaluate_heads(self, features: torch.Tensor, labels: torch.Tensor, heads: tuple[str, ...]) -> dict[str, dict]:
        """Metrics of several heads from one forward pass."""
        if len(labels) == 0:
            return {
                h: classification_metrics(torch.zeros(0, self.num_classes), labels, self.num_classes) for h in heads
            }
        sim, z = self.logits(features, mlp=any(h != "clip" for h in heads))  # the clip head alone needs no MLP
        return {h: classification_metrics(self._probs(sim, z, h), labels.cpu(), self.num_classes) for h in heads}

    # -- private state that stays on the node ------------------------------------------------
    def private_state(self) -> dict:
        """Everything needed to resume this hospital after a restart (MLP, optimisers, RNG)."""
        return {
            "adapter": self.adapter.state_dict(),
            "mlp": self.mlp.state_dict() if self.mlp else None,
            "opt_adapter": self.opt_adapter.state_dict() if self.opt_adapter else None,
            "opt_mlp": self.opt_mlp.state_dict() if self.opt_mlp else None,
            "generator": self.generator.get_state(),
            "rounds_trained": self.rounds_trained,
            "privacy": None
            if self.dp is None
            else {
                "accountant": self.accountant.state() if self.accountant is not None else None,
                "prior": self.dp_prior,
                "generator": self.dp_generator.get_state(),
            },
        }

    def load_private_state(self, state: dict) -> None:
        privacy = state.get("privacy")
        if (privacy is not None) != (self.dp is not None):
            raise ValueError(
                "the saved state was trained "
                + ("with" if privacy is not None else "without")
                + " differential privacy; this node is configured otherwise"
            )
        self.adapter.load_state_dict(state["adapter"])
        if self.mlp is not None and state["mlp"] is not None:
            self.mlp.load_state_dict(state["mlp"])
        if self.opt_adapter is not None and state["opt_adapter"] is not None:
            self.opt_adapter.load_state_dict(state["opt_adapter"])
        if self.opt_mlp is not None and state["opt_mlp"] is not None:
            self.opt_mlp.load_state_dict(state["opt_mlp"])
        for opt in (o for o in (self.opt_adapter, self.opt_mlp) if o is not None):
            for group in opt.param_groups:  # the saved groups' settings came with the state: one saved on another
                group["capturable"] = self.graphed  # device (a GPU node's, read on a CPU) keeps this learner's
        self.generator.set_state(state["generator"])
        self.rounds_trained = int(state["rounds_trained"])
        if privacy is not None:
            self.accountant = Accountant.from_state(privacy["accountant"]) if privacy["accountant"] else None
            self.dp_prior = privacy["prior"]
            self.dp_generator.set_state(privacy["generator"])
