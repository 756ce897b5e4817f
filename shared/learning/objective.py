"""The local objective (docs/method.md, section 5) and the inference ensemble (section 8).

``L = L_con + L_mlp + lambda * L_sim`` where L_sim is the adaptive-KL mutual distillation between
the FAM-CLIP logits and the private MLP logits. Every term can be switched off (the paper's
ablations), and the reference code's behaviours listed in docs/method.md, section 9, are switches too:
``contrastive="batch"`` (per-sample prompts inside the batch), ``kl="class"`` (softmax over the
batch for each class column) and ``kl_weight="fixed"`` (w = 1/2).

Class imbalance (``balance="logit_adjust"``, an option beyond the paper): the two cross-entropy terms
see ``logits + tau_la * log(prior)``, the hospital's own training class prior (Menon et al., "Long-tail
learning via logit adjustment", ICLR 2021). A frequent class must then win by a larger margin, which
trains towards a balanced error; prediction uses the plain logits. The KL term is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CONTRASTIVE_MODES = ("class", "batch")
KL_MODES = ("sample", "class")
KL_WEIGHTS = ("adaptive", "fixed")
BALANCE_MODES = ("none", "logit_adjust")


@dataclass(frozen=True)
class LossConfig:
    use_con: bool = True
    use_mlp: bool = True
    use_sim: bool = True
    lam: float = 0.04
    tau: float = 2.0
    contrastive: str = "class"
    kl: str = "sample"
    kl_weight: str = "adaptive"
    balance: str = "none"  # none | logit_adjust: the cross-entropy terms see the local class prior
    tau_la: float = 1.0  # logit adjustment strength

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.contrastive, CONTRASTIVE_MODES, "contrastive"),
            (self.kl, KL_MODES, "kl"),
            (self.kl_weight, KL_WEIGHTS, "kl_weight"),
            (self.balance, BALANCE_MODES, "balance"),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy of probability vectors along ``dim`` (nats)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=dim)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor, dim: int, per_sample: bool = False) -> torch.Tensor:
    """Mean over the other axis of KL(p || q) along ``dim``, from log-probabilities (``per_sample``: not averaged)."""
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=dim)
    return kl if per_sample else kl.mean()


def mutual_kl(
    sim: torch.Tensor, z: torch.Tensor, cfg: LossConfig, per_sample: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_sim and its weight w. Gradients flow into both heads; w itself is detached.

    ``per_sample``: one loss per image, each with its own weight from its own entropies (differential
    privacy: nothing in an image's loss may depend on another image)."""
    dim = -1 if cfg.kl == "sample" else 0
    if per_sample and cfg.kl != "sample":
        raise ValueError("the class-level KL mixes the images of a batch: not available with differential privacy")
    log_pv = F.log_softmax(sim / cfg.tau, dim=dim)
    log_pm = F.log_softmax(z / cfg.tau, dim=dim)
    if cfg.kl_weight == "fixed":
        w = torch.full((), 0.5, device=sim.device)  # a fill, not a copy from the host: CUDA-graph safe
    else:
        with torch.no_grad():
            h_v = entropy(log_pv.exp(), dim=dim)
            h_m = entropy(log_pm.exp(), dim=dim)
            if not per_sample:
                h_v, h_m = h_v.mean(), h_m.mean()
            w = h_v / (h_v + h_m).clamp_min(1e-12)
    loss = w * kl_divergence(log_pm, log_pv, dim, per_sample) + (1 - w) * kl_divergence(log_pv, log_pm, dim, per_sample)
    return loss, w


def log_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log of the class frequencies of ``labels``, add-one smoothed (a class absent here stays finite)."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double() + 1.0
    return torch.log(counts / counts.sum()).float()


def contrastive_loss(
    adapted: torch.Tensor,
    text: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    mode: str,
    adjust: torch.Tensor | None = None,
    per_sample: bool = False,
) -> torch.Tensor:
    """Image-to-class-prompt cross-entropy ("class", plus ``adjust`` per class if given) or the reference
    code's in-batch version ("batch")."""
    if mode == "class":
        logits = scale * adapted @ text.t()
        return F.cross_entropy(logits if adjust is None else logits + adjust, y, reduction=_reduction(per_sample))
    if per_sample:
        raise ValueError(
            "the in-batch contrastive loss mixes the images of a batch: not available with differential privacy"
        )
    logits = scale * adapted @ text[y].t()  # [B, B]: repeated classes become false negatives
    return F.cross_entropy(logits, torch.arange(len(y), device=y.device))


def local_loss(
    adapted: torch.Tensor,
    z: torch.Tensor | None,
    y: torch.Tensor,
    text: torch.Tensor,
    scale: float,
    cfg: LossConfig,
    prior: torch.Tensor | None = None,
    per_sample: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full objective for one batch; returns the loss and its terms for logging (detached scalar tensors
    on the loss's device: reading them is left to the caller, once per round, so a GPU step never waits for
    the device). ``prior`` (log class frequencies of the hospital's training split, :func:`log_prior`) is used
    with ``balance="logit_adjust"``.

    ``per_sample``: the loss is a vector, one value per image, each depending on its own image only (the
    terms logged are their means)."""
    sim = scale * adapted @ text.t()
    total = torch.zeros(len(y) if per_sample else (), device=adapted.device)
    terms: dict[str, torch.Tensor] = {}
    adjust = None
    if cfg.balance == "logit_adjust":
        if prior is None:
            raise ValueError("balance='logit_adjust' needs the hospital's class prior")
        adjust = cfg.tau_la * prior.to(adapted.device)
    if cfg.use_con:
        l_con = contrastive_loss(adapted, text, y, scale, cfg.contrastive, adjust, per_sample)
        total = total + l_con
        terms["con"] = l_con.detach().mean()
    if z is not None and cfg.use_mlp:
        l_mlp = F.cross_entropy(z if adjust is None else z + adjust, y, reduction=_reduction(per_sample))
        total = total + l_mlp
        terms["mlp"] = l_mlp.detach().mean()
    if z is not None and cfg.use_sim:
        l_sim, w = mutual_kl(sim, z, cfg, per_sample)
        total = total + cfg.lam * l_sim
        terms["sim"] = l_sim.detach().mean()
        terms["w"] = w.detach().mean()
    return total, terms


def _reduction(per_sample: bool) -> str:
    return "none" if per_sample else "mean"


def ensemble_probs(sim: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy-weighted mix: the less certain head gets less weight."""
    p_f = torch.softmax(sim, dim=-1)
    p_m = torch.softmax(z, dim=-1)
    h_f, h_m = entropy(p_f), entropy(p_m)
    w = (h_f / (h_f + h_m).clamp_min(1e-12)).unsqueeze(-1)
    return (1 - w) * p_f + w * p_m
