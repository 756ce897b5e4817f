"""Record-level differential privacy at a hospital: DP-SGD, its accountant and its budget.

What is protected: every parameter a hospital trains, the FAM that leaves it and the private MLP
that stays, is trained with DP-SGD (Abadi et al., CCS 2016): Poisson-sampled batches, each image's
gradient clipped to an L2 norm of ``clip`` over all trained parameters together, Gaussian noise of
standard deviation ``noise_multiplier * clip`` on the clipped sum. The private MLP is noised too,
although it never leaves: the FAM's gradient runs through the distillation term, so an MLP trained
without noise would carry every image's influence into the FAM's next steps and no bound would hold.
For the same reason nothing in a step may mix images: in this mode the MLP normalises each image on
its own (LayerNorm) instead of BatchNorm, and the adaptive KL weight is computed per image.

The logit-adjusted methods need the hospital's class frequencies; under DP they come from a noisy
histogram (the Gaussian mechanism, standard deviation :data:`PRIOR_NOISE`, once per run), and that
release is accounted as well.

Accounting: Google's ``dp-accounting`` (RDP of the Poisson-subsampled Gaussian, add-or-remove-one
adjacency): a guarantee about adding or removing any one training image of this hospital. Its
training-set size is treated as public (the aggregator weighs updates by it). Validation and test
images are not covered: their metrics are released only as ``share_metrics`` says.

The engine computes each image's gradient norm without materialising per-image gradients: a linear
layer's per-image weight gradient is an outer product ``g_i x_i^T`` (plus, for a masked layer, the
straight-through term of its mask), whose norm and clipped sum follow from the layer's inputs and
output gradients ("ghost" norms; Goodfellow 2015, Li et al. 2022). Layers record those in a
:class:`Tape` during the backward pass; :meth:`DPSGD.step` then writes the noisy clipped sums into
``.grad``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import dp_accounting
import numpy as np
import torch
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from torch import nn

PRIOR_NOISE = 20.0  # std of the noisy class histogram (L2 sensitivity 1 under add-or-remove-one)
DELTA_FRACTION = 0.1  # default delta: min(1e-5, DELTA_FRACTION / n)


class PrivacyBudgetSpent(RuntimeError):
    """Training one more round would spend more epsilon than the hospital's budget."""


@dataclass(frozen=True)
class DPConfig:
    """What a hospital asks for. Set ``epsilon`` (a budget for the whole run, from which the noise is
    derived), or ``noise_multiplier`` (then ``epsilon``, if set too, is a cap: training stops there)."""

    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epsilon", "delta", "noise_multiplier"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"dp_{name} must be a positive finite number, got {value!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp_clip must be a positive finite number, got {self.clip!r}")
        if self.delta is not None and self.delta >= 1:
            raise ValueError(f"dp_delta must be below 1, got {self.delta!r}")

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None or self.noise_multiplier is not None

    def delta_for(self, num_train: int) -> float:
        """The delta for a hospital of ``num_train`` training images; ValueError when it is not below 1/n."""
        if num_train < 1:
            raise ValueError("differential privacy needs at least one training image")
        delta = self.delta if self.delta is not None else min(1e-5, DELTA_FRACTION / num_train)
        if delta >= 1.0 / num_train:
            raise ValueError(
                f"dp_delta {delta:g} is not below 1/n = {1.0 / num_train:g} for this hospital's {num_train} training "
                "images: such a delta allows releasing an image outright"
            )
        return delta

    def plan(self, *, num_train: int, batch_size: int, local_epochs: int, rounds: int) -> PrivacyPlan:
        """The noise, sampling rate and steps for a hospital of ``num_train`` images over ``rounds`` rounds."""
        delta = self.delta_for(num_train)
        q = min(1.0, batch_size / num_train)
        steps = local_epochs * math.ceil(num_train / batch_size)
        sigma = self.noise_multiplier
        if sigma is None:
            assert self.epsilon is not None
            sigma = calibrate_noise(self.epsilon, delta, q, steps * rounds)
        return PrivacyPlan(
            noise_multiplier=float(sigma),
            clip=self.clip,
            sample_rate=q,
            steps_per_round=steps,
            delta=delta,
            budget=self.epsilon,
            num_train=num_train,
            expected_batch=q * num_train,
        )


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps_per_round: int
    delta: float
    budget: float | None
    num_train: int
    expected_batch: float

    def to_dict(self) -> dict:
        return asdict(self)


def _rdp(event: dp_accounting.DpEvent) -> tuple[np.ndarray, np.ndarray]:
    """RDP curve of one event over the accountant's orders. With a large sampling rate the library drops the
    fractional orders it cannot evaluate (and warns about each); the other orders still bound epsilon."""
    accountant = RdpAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant.compose(event)
    finally:
        absl.setLevel(level)
    return np.asarray(accountant._orders, dtype=float), np.asarray(accountant._rdp, dtype=float)


def step_event(q: float, sigma: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    return gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def epsilon_of(q: float, sigma: float, steps: int, delta: float, *, prior: bool = True) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps (plus the noisy class histogram when ``prior``),
    by dp-accounting's RDP accountant."""
    orders, per_step = _rdp(step_event(q, sigma))
    return _epsilon(
        orders, per_step, steps, _rdp(dp_accounting.GaussianDpEvent(PRIOR_NOISE))[1] if prior else None, delta
    )


def _epsilon(orders: np.ndarray, per_step: np.ndarray, steps: int, prior: np.ndarray | None, delta: float) -> float:
    """RDP composes by addition: one step's curve times ``steps``, plus the histogram's; then to (epsilon, delta)."""
    total = steps * per_step if steps else np.zeros_like(per_step)  # 0 * inf is not 0 in numpy
    if prior is not None:
        total = total + prior
    if not np.any(total > 0):
        return 0.0
    return float(compute_epsilon(orders, total, delta)[0])


def calibrate_noise(epsilon: float, delta: float, q: float, steps: int) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``steps`` steps spend at most ``epsilon``."""
    low, high = 0.05, 1.0
    while epsilon_of(q, high, steps, delta) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon} with delta {delta}")
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        if epsilon_of(q, mid, steps, delta) > epsilon:
            low = mid
        else:
            high = mid
    return high


class Accountant:
    """What one hospital has spent: steps trained and whether the noisy histogram was released."""

    def __init__(self, plan: PrivacyPlan, steps: int = 0, prior_released: bool = False) -> None:
        self.plan, self.steps, self.prior_released = plan, steps, prior_released
        self._orders, self._per_step = _rdp(step_event(plan.sample_rate, plan.noise_multiplier))
        self._prior = _rdp(dp_accounting.GaussianDpEvent(PRIOR_NOISE))[1]

    def epsilon(self, steps: int | None = None, prior: bool | None = None) -> float:
        steps = self.steps if steps is None else steps
        released = self.prior_released if prior is None else prior
        return _epsilon(self._orders, self._per_step, steps, self._prior if released else None, self.plan.delta)

    def check_round(self, uses_prior: bool) -> None:
        """Raise :class:`PrivacyBudgetSpent` when one more round would pass the budget."""
        if self.plan.budget is None:
            return
        after = self.epsilon(self.steps + self.plan.steps_per_round, self.prior_released or uses_prior)
        if after > self.plan.budget * (1 + 1e-9):
            raise PrivacyBudgetSpent(
                f"privacy budget: one more round would spend epsilon {after:.3f} of the budget "
                f"{self.plan.budget:g} (delta {self.plan.delta:.2g}; {self.epsilon():.3f} spent after "
                f"{self.steps} steps); this hospital trains no further in this run"
            )

    def state(self) -> dict:
        return {"plan": self.plan.to_dict(), "steps": self.steps, "prior_released": self.prior_released}

    @classmethod
    def from_state(cls, state: dict) -> Accountant:
        return cls(PrivacyPlan(**state["plan"]), int(state["steps"]), bool(state["prior_released"]))


def noisy_log_prior(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """log class frequencies from a Gaussian-noised histogram (each count at least 1)."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    noise = torch.randn(num_classes, generator=generator, dtype=torch.float64) * PRIOR_NOISE
    counts = (counts + noise).clamp_min(0.0) + 1.0
    return torch.log(counts / counts.sum()).float()


# -- per-image gradient norms and clipped sums --------------------------------------------------------


class Tape:
    """Per-image pieces of each linear layer's gradient, filled during one backward pass.

    A :class:`~shared.learning.model.MaskedLinear` records ``(x, g, v)`` itself (its autograd function
    skips the summed weight gradient while taping); a plain ``nn.Linear`` is recorded through hooks.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.records: list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.layers: list[nn.Module] = []
        self._handles: list = []
        for module in modules:
            for layer in module.modules():
                if getattr(layer, "supports_tape", False):
                    self.layers.append(layer)
                elif isinstance(layer, nn.Linear):
                    self.layers.append(layer)
                elif any(p.requires_grad for p in layer.parameters(recurse=False)):
                    raise ValueError(
                        f"differential privacy: {type(layer).__name__} has trainable parameters whose per-image "
                        "gradients this engine cannot compute"
                    )

    def record(self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None) -> None:
        if x.dim() != 2:
            raise ValueError("differential privacy needs one feature vector per image ([B, D] inputs)")
        self.records.append((layer, x.detach(), g.detach(), None if v is None else v.detach()))

    def __enter__(self) -> Tape:
        self.records.clear()
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                self._handles.append(layer.register_forward_hook(self._linear_hook))
            else:
                layer.tape = self
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.layers:
            if not isinstance(layer, nn.Linear):
                layer.tape = None

    def _linear_hook(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        if output.requires_grad:
            output.register_hook(lambda g: self.record(layer, x, g, None))


def _pieces(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None):
    """(per-image squared norm [B], a function from clip factors c [B] to {param: clipped sum})."""
    weight, bias = layer.weight, layer.bias
    threshold = getattr(layer, "threshold", None)
    sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    gg = (g * g).sum(1)
    sign = torch.sign(weight.detach()) if weight.requires_grad and v is not None else None
    if weight.requires_grad:
        sq += (gg * (x * x).sum(1)).double()
        if sign is not None:
            vv = v / weight.shape[1]  # d u_r / d W_rj = sign(W_rj) / in
            sq += ((vv * vv) @ sign.abs().sum(1)).double()
            sq += (2 * ((g * vv) * (x @ sign.t())).sum(1)).double()
    if bias is not None and bias.requires_grad:
        sq += gg.double()
    if v is not None and threshold is not None and threshold.requires_grad:
        sq += (v * v).sum(1).double()

    def sums(c: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = {}
        cg = g * c[:, None]
        if weight.requires_grad:
            w = cg.t() @ x
            if sign is not None:
                w.addcmul_(sign, ((c @ v) / weight.shape[1])[:, None])
            out[weight] = w
        if bias is not None and bias.requires_grad:
            out[bias] = cg.sum(0)
        if v is not None and threshold is not None and threshold.requires_grad:
            out[threshold] = -(c @ v)
        return out

    return sq, sums


class DPSGD:
    """Writes the noisy mean of the clipped per-image gradients into ``.grad`` of every trained parameter."""

    def __init__(self, modules: Sequence[nn.Module | None], generator: torch.Generator) -> None:
        self.modules = [m for m in modules if m is not None]
        self.generator = generator
        self.tape = Tape(self.modules)
        self.params = [p for m in self.modules for p in m.parameters() if p.requires_grad]

    def clipped_sums(self, batch_size: int, clip: float) -> dict[nn.Parameter, torch.Tensor]:
        """Sum over the batch of each image's gradient scaled to norm at most ``clip`` (no noise)."""
        sums: dict[nn.Parameter, torch.Tensor] = {p: torch.zeros_like(p) for p in self.params}
        if batch_size == 0 or not self.tape.records:
            return sums
        if len({id(rec[0]) for rec in self.tape.records}) != len(self.tape.records):
            raise ValueError("differential privacy: a layer ran twice in one step; its per-image norms would be wrong")
        parts = [_pieces(*rec) for rec in self.tape.records]
        norms = torch.stack([sq for sq, _ in parts]).sum(0).sqrt()
        c = (clip / (norms + 1e-6)).clamp(max=1.0).to(torch.float32)
        for _, fn in parts:
            for p, s in fn(c).items():
                if p not in sums:
                    raise ValueError("differential privacy: a taped layer's parameter is not trained")
                sums[p] += s
        return sums

    def write_grads(self, batch_size: int, plan: PrivacyPlan) -> None:
        std = plan.noise_multiplier * plan.clip
        for p, s in self.clipped_sums(batch_size, plan.clip).items():
            noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype) * std
            p.grad = (s + noise.to(p.device)) / plan.expected_batch
