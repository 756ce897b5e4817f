"""The trainable parts: MaskedLinear, the FAM, the private MLP, the FedCLIP adapter (docs/method.md, sections 3-4).

Only the adapter (FAM or FedCLIP's) travels between hospitals; its state is
:meth:`Adapter.travel_state` and the rows that are masked off are :func:`shared.learning.rounds.row_masks_of`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def row_scores(weight: torch.Tensor) -> torch.Tensor:
    """``u_i = mean_j |W_ij|``; the layer and the aggregator's row masks both use it (bit-identical masks)."""
    return weight.abs().mean(dim=1)


class _MaskedLinearFn(torch.autograd.Function):
    """``y = m * (x W^T + b)`` with ``m = 1[u >= k]``, ``u_i = mean_j |W_ij|``, and the straight-through gradient
    of ``sigmoid((u - k) / tau)`` for the mask (see :class:`MaskedLinear`).

    Masking the output rather than the weight gives the same values and gradients as ``(W * m) x + b * m``
    without building ``W * m``; the only full-matrix passes per step are ``|W|``'s row means (forward) and
    ``sign(W)`` for the mask's gradient into the weights (backward), both skipped where nothing needs them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, threshold, tau: float, layer=None, tape=None):  # noqa: ANN001 (autograd)
        pre = torch.addmm(bias, x, weight.t()) if x.dim() == 2 else F.linear(x, weight, bias)
        if threshold is None:  # an unmasked layer, taped for differential privacy
            hard = margin = None
            out = pre
        else:
            margin = row_scores(weight) - threshold
            hard = (margin >= 0).to(weight.dtype)
            out = pre * hard
        ctx.save_for_backward(x, weight, hard, margin, pre)
        ctx.tau, ctx.layer, ctx.tape = tau, layer, tape
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, weight, hard, margin, pre = ctx.saved_tensors
        g = grad if hard is None else grad * hard
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        if ctx.tape is not None:  # differential privacy: per-image pieces; the engine writes the clipped sums
            v = None  # per image and row: d loss / d margin (the mask's straight-through gradient)
            if hard is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
                soft = torch.sigmoid(margin / ctx.tau)
                v = grad * pre * (soft * (1 - soft) / ctx.tau)
            ctx.tape.record(ctx.layer, x, g, v)
            return grad_x, None, None, None, None, None, None
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = g2.t() @ x2 if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.needs_input_grad[2] else None
        grad_k = None
        if hard is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
            # d loss / d m_i = sum_batch g_i * (x W^T + b)_i; d sigmoid(margin / tau) / d margin
            soft = torch.sigmoid(margin / ctx.tau)
            d_margin = (grad * pre).reshape(-1, pre.shape[-1]).sum(0) * soft * (1 - soft) / ctx.tau
            if ctx.needs_input_grad[3]:
                grad_k = -d_margin
            if grad_w is not None:  # d u_i / d W_ij = sign(W_ij) / in
                grad_w.addcmul_(torch.sign(weight), (d_margin / weight.shape[1])[:, None])
        return grad_x, grad_w, grad_b, grad_k, None, None, None


class MaskedLinear(nn.Module):
    """A linear layer whose output units switch off when their weights fall below a learned threshold.

    Row score ``u_i = mean_j |W_ij|``; mask ``m_i = 1[u_i >= k_i]``; output ``(W * m) x + b * m``.
    The hard step has no gradient, so the backward pass uses the derivative of
    ``sigmoid((u_i - k_i) / tau)`` (a straight-through estimator): the threshold ``k`` and the
    weights both receive gradient, and a unit whose output hurts the loss can be switched off.
    """

    def __init__(self, in_features: int, out_features: int, *, tau: float = 0.01, masked: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tau = tau
        self.masked = masked
        layer = nn.Linear(in_features, out_features)  # nn.Linear's initialisation
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.threshold = nn.Parameter(torch.zeros(out_features), requires_grad=masked)

    def hard_mask(self) -> torch.Tensor:
        """Which output rows are on (bool), as the forward pass sees them."""
        with torch.no_grad():
            if not self.masked:
                return torch.ones(self.out_features, dtype=torch.bool, device=self.weight.device)
            return row_scores(self.weight) >= self.threshold

    def keep_ratio(self) -> float:
        return float(self.hard_mask().float().mean().item())

    supports_tape = True  # differential privacy: records its per-image gradient pieces (shared.learning.privacy)
    tape = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tape is None and not self.masked:
            return F.linear(x, self.weight, self.bias)
        threshold = self.threshold if self.masked else None
        return _MaskedLinearFn.apply(x, self.weight, self.bias, threshold, self.tau, self, self.tape)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, masked={self.masked}, tau={self.tau}"


class Adapter(nn.Module):
    """Base of the travelling module: maps a raw image feature f to a unit-norm adapted feature."""

    def travel_state(self) -> dict[str, torch.Tensor]:
        """Every tensor that travels (weights, biases, thresholds), detached, float32, on the CPU."""
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in self.named_parameters()}

    def load_travel_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        if set(own) != set(state):
            raise ValueError(f"adapter state names differ: expected {sorted(own)}, got {sorted(state)}")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state[name].to(param.device, param.dtype))

    def keep_ratios(self) -> dict[str, float]:
        return {prefix: m.keep_ratio() for prefix, m in self.named_modules() if isinstance(m, MaskedLinear)}


class FAM(Adapter):
    """Feature Adaptation Module: ``a = softmax(L2(relu(norm(L1 f))))``, ``f^ = a*f / ||a*f||``.

    ``norm`` normalises each sample over its D features without affine parameters (what the
    reference code's InstanceNorm1d does on a [B, D] tensor). About 526k parameters at D = 512.
    """

    def __init__(self, dim: int, *, masked: bool = True, tau: float = 0.01) -> None:
        super().__init__()
        self.fc1 = MaskedLinear(dim, dim, masked=masked, tau=tau)
        self.fc2 = MaskedLinear(dim, dim, masked=masked, tau=tau)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.fc1(f)
        h = F.layer_norm(h, (h.shape[-1],), eps=1e-5)
        a = torch.softmax(self.fc2(F.relu(h)), dim=-1)
        adapted = a * f
        return adapted / adapted.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class FedCLIPAdapter(Adapter):
    """FedCLIP's attention adapter ``Linear-Tanh-Linear-Softmax``, for the baseline of that name."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.fc2(torch.tanh(self.fc1(f))), dim=-1)
        adapted = a * f
        return adapted / adapted.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class IdentityAdapter(Adapter):
    """No adaptation: the L2-normalised raw feature (zero-shot CLIP, local MLP without FAM)."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class PrivateMLP(nn.Module):
    """``MaskedLinear(D,H) -> BatchNorm -> ReLU`` three times, then ``MaskedLinear(H,C)``. Never travels.

    ``per_image_norm``: LayerNorm (no affine) instead of BatchNorm, for differential privacy."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        hidden: int = 512,
        masked: bool = True,
        tau: float = 0.01,
        per_image_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(3):
            # BatchNorm mixes the images of a batch; differential privacy needs each image on its own
            norm = nn.LayerNorm(hidden, elementwise_affine=False) if per_image_norm else nn.BatchNorm1d(hidden)
            layers += [MaskedLinear(width, hidden, masked=masked, tau=tau), norm, nn.ReLU()]
            width = hidden
        layers.append(MaskedLinear(width, num_classes, masked=masked, tau=tau))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def clip_logits(adapted: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """FAM-CLIP logits ``s * f^ @ T.t()`` (T is L2-normalised)."""
    return logit_scale * adapted @ text_features.t()
