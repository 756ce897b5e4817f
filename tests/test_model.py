"""MaskedLinear, FAM, private MLP, the objective and the ensemble (method.md sections 3-5, 8)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from shared.learning.model import FAM, FedCLIPAdapter, MaskedLinear, PrivateMLP
from shared.learning.objective import LossConfig, ensemble_probs, entropy, local_loss, mutual_kl
from shared.learning.rounds import row_masks_of


def test_threshold_receives_gradient_through_straight_through_estimator():
    torch.manual_seed(0)
    layer = MaskedLinear(16, 8)
    out = layer(torch.randn(4, 16))
    out.pow(2).sum().backward()
    assert layer.threshold.grad is not None
    assert layer.threshold.grad.abs().sum() > 0
    assert layer.weight.grad.abs().sum() > 0


def _masked_linear_by_definition(layer: MaskedLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer as method.md writes it: ``(W * m) x + b * m``, m hard forward, sigmoid gradient backward."""
    margin = layer.weight.abs().mean(dim=1) - layer.threshold
    soft = torch.sigmoid(margin / layer.tau)
    m = (margin >= 0).float() + soft - soft.detach()
    return F.linear(x, layer.weight * m[:, None], layer.bias * m)


@pytest.mark.parametrize("shape", [(6, 24), (3, 5, 24)])
def test_fast_masked_linear_equals_the_definition_in_values_and_gradients(shape):
    torch.manual_seed(1)
    layer = MaskedLinear(24, 12, tau=0.05)
    with torch.no_grad():  # some rows off, some near the threshold (non-zero sigmoid gradient)
        scores = layer.weight.abs().mean(dim=1)
        layer.threshold.copy_(scores + torch.linspace(-0.08, 0.08, 12))
    x = torch.randn(*shape, requires_grad=True)
    target = torch.randn(*shape[:-1], 12)
    grads = []
    for forward in (layer, lambda v: _masked_linear_by_definition(layer, v)):
        layer.zero_grad()
        x.grad = None
        out = forward(x)
        (out - target).pow(2).sum().backward()
        grads.append((out.detach(), x.grad.clone(), *(p.grad.clone() for p in layer.parameters())))
    assert 0 < layer.keep_ratio() < 1
    assert grads[0][-1].abs().sum() > 0, "the thresholds must receive gradient"
    for fast, reference in zip(*grads):
        assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-6)


def test_forward_uses_the_hard_mask():
    torch.manual_seed(0)
    layer = MaskedLinear(16, 8)
    with torch.no_grad():
        layer.threshold[:3] = 10.0  # rows 0..2 off
    y = layer(torch.randn(5, 16))
    assert torch.all(y[:, :3] == 0)
    assert torch.all(y[:, 3:] != 0)
    assert layer.keep_ratio() == pytest.approx(5 / 8)


def test_thresholds_learn_to_switch_off_units_the_data_does_not_want():
    """A target that needs half of the output units silent: training alone drives keep ratio below 1."""
    torch.manual_seed(0)
    layer = MaskedLinear(32, 16, tau=0.01)
    teacher = torch.randn(16, 32) * 0.2
    teacher[8:] = 0  # the data says: units 8..15 must output nothing
    opt = torch.optim.Adam(layer.parameters(), lr=2e-3)
    for _ in range(400):
        x = torch.randn(64, 32)
        loss = F.mse_loss(layer(x), x @ teacher.t())
        opt.zero_grad()
        loss.backward()
        opt.step()
    on = layer.hard_mask()
    assert layer.keep_ratio() < 1.0
    assert on[:8].all(), "units the target needs must stay on"
    assert (~on[8:]).sum() >= 4, f"most silent units should be masked off, mask={on.tolist()}"
    # the aggregator computes the same mask from the tensors alone
    state = {f"l.{k}": v.detach() for k, v in layer.named_parameters()}
    assert torch.equal(row_masks_of(state)["l.weight"], on)


def test_fam_output_is_unit_norm_and_has_about_526k_parameters():
    fam = FAM(512)
    f = torch.randn(7, 512) * 3
    out = fam(f)
    assert out.shape == (7, 512)
    assert torch.allclose(out.norm(dim=-1), torch.ones(7), atol=1e-5)
    n = sum(p.numel() for p in fam.parameters())
    assert 520_000 < n < 530_000
    assert set(fam.travel_state()) == {f"fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias", "threshold")}


def test_fam_norm_matches_instance_norm_of_reference_code():
    """Norm over the D features of each sample without affine parameters = InstanceNorm1d on [B, D]."""
    h = torch.randn(4, 512)
    ours = F.layer_norm(h, (512,), eps=1e-5)
    reference = F.instance_norm(h.unsqueeze(0)).squeeze(0)  # what InstanceNorm1d does to [B, D]
    assert torch.allclose(ours, reference, atol=1e-5)


def test_adapter_state_round_trip_and_name_check():
    a, b = FAM(32), FAM(32)
    b.load_travel_state(a.travel_state())
    x = torch.randn(3, 32)
    assert torch.allclose(a(x), b(x))
    with pytest.raises(ValueError):
        b.load_travel_state(FedCLIPAdapter(32).travel_state() | {"extra": torch.zeros(1)})


def test_private_mlp_shape():
    mlp = PrivateMLP(32, 4, hidden=16)
    assert mlp(torch.randn(5, 32)).shape == (5, 4)


def test_adaptive_weight_follows_entropies():
    sim = torch.tensor([[10.0, 0, 0, 0]] * 4)  # confident FAM-CLIP head
    z = torch.zeros(4, 4)  # uniform MLP
    cfg = LossConfig()
    _, w = mutual_kl(sim, z, cfg)
    pv, pm = F.softmax(sim / 2, -1), F.softmax(z / 2, -1)
    expected = entropy(pv).mean() / (entropy(pv).mean() + entropy(pm).mean())
    assert float(w) == pytest.approx(float(expected))
    assert float(w) < 0.5
    _, w_fixed = mutual_kl(sim, z, LossConfig(kl_weight="fixed"))
    assert float(w_fixed) == 0.5


def test_mutual_kl_sends_gradient_into_both_heads_and_is_zero_when_they_agree():
    sim = torch.randn(6, 4, requires_grad=True)
    z = torch.randn(6, 4, requires_grad=True)
    loss, _ = mutual_kl(sim, z, LossConfig())
    loss.backward()
    assert sim.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    same = torch.randn(6, 4)
    assert float(mutual_kl(same, same.clone(), LossConfig())[0]) == pytest.approx(0.0, abs=1e-6)


def test_loss_switches_remove_terms():
    torch.manual_seed(0)
    adapted = F.normalize(torch.randn(8, 16), dim=-1)
    text = F.normalize(torch.randn(4, 16), dim=-1)
    z = torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    full, terms = local_loss(adapted, z, y, text, 14.3, LossConfig())
    assert set(terms) == {"con", "mlp", "sim", "w"}
    assert float(full) == pytest.approx(float(terms["con"] + terms["mlp"] + 0.04 * terms["sim"]), rel=1e-5)
    _, terms = local_loss(adapted, z, y, text, 14.3, LossConfig(use_sim=False, use_mlp=False))
    assert set(terms) == {"con"}
    batch, _ = local_loss(adapted, None, y, text, 14.3, LossConfig(contrastive="batch"))
    cls, _ = local_loss(adapted, None, y, text, 14.3, LossConfig())
    assert not math.isclose(float(batch), float(cls))
    with pytest.raises(ValueError):
        LossConfig(kl="nonsense")


def test_ensemble_gives_less_weight_to_the_less_certain_head():
    sim = torch.tensor([[4.0, 0.0, 0.0]])  # confident: class 0
    z = torch.tensor([[0.1, 0.3, 0.0]])  # nearly uniform, leaning to class 1
    p = ensemble_probs(sim, z)
    assert p.argmax().item() == 0
    assert torch.allclose(p.sum(-1), torch.ones(1))


def test_log_prior_is_smoothed_and_logit_adjustment_needs_it():
    from shared.learning.objective import log_prior

    prior = log_prior(torch.tensor([0, 0, 0, 1]), 3)  # class 2 absent: still finite
    assert torch.isfinite(prior).all() and torch.allclose(prior.exp().sum(), torch.tensor(1.0))
    assert prior[0] > prior[1] > prior[2]
    adapted = F.normalize(torch.randn(4, 8), dim=-1)
    cfg = LossConfig(balance="logit_adjust")
    with pytest.raises(ValueError, match="class prior"):
        local_loss(adapted, None, torch.tensor([0, 0, 0, 1]), F.normalize(torch.randn(3, 8), dim=-1), 10.0, cfg)
    with pytest.raises(ValueError, match="balance"):
        LossConfig(balance="reweight-everything")


def test_logit_adjustment_raises_balanced_accuracy_on_an_imbalanced_hospital():
    """Two overlapping classes, 95 % / 5 % in training: the plain loss gives the rare class up, the
    logit-adjusted one recovers it on a balanced test set (same data, seed and steps)."""
    from dataclasses import replace

    from shared.learning.training import METHODS, HospitalLearner, TrainConfig

    g = torch.Generator().manual_seed(0)
    dim = 16
    centre = F.normalize(torch.randn(2, dim, generator=g), dim=-1)

    def draw(n0: int, n1: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
        x = centre[y] + 2.0 * torch.randn(len(y), dim, generator=g) / dim**0.5
        return F.normalize(x, dim=-1), y

    train_x, train_y = draw(380, 20)
    test_x, test_y = draw(200, 200)
    text = F.normalize(torch.randn(2, dim, generator=g), dim=-1)  # uninformative prompts
    balanced = {}
    for name in ("local", "local_la"):
        learner = HospitalLearner(
            METHODS[name],
            replace(TrainConfig(), local_epochs=1),
            dim=dim,
            num_classes=2,
            text_features=text,
            logit_scale=10.0,
            seed=0,
        )
        for r in range(10):
            learner.train_round(train_x, train_y, r)
        balanced[name] = learner.evaluate(test_x, test_y)["balanced_accuracy"]
    assert balanced["local_la"] > balanced["local"] + 0.05, balanced


def test_a_state_saved_by_a_gpu_learner_resumes_on_a_cpu():
    """A learner on CUDA saves its optimisers as capturable (CUDA graphs); read on a CPU, it must train on and
    continue exactly as the learner that never stopped."""
    from shared.learning.training import HospitalLearner, TrainConfig, get_method

    torch.manual_seed(0)
    text = F.normalize(torch.randn(4, 16), dim=-1)
    f, y = torch.randn(70, 16), torch.arange(70) % 4

    def learner() -> HospitalLearner:
        return HospitalLearner(
            get_method("fedmedclip"), TrainConfig(mlp_hidden=8), dim=16, num_classes=4, text_features=text,
            logit_scale=10.0,
        )  # fmt: skip

    first = learner()
    first.train_round(f, y, 0)
    saved = copy.deepcopy(first.private_state())  # as read back from disk: no tensor shared with `first`
    for key in ("opt_adapter", "opt_mlp"):
        for group in saved[key]["param_groups"]:
            assert group["capturable"] is False
            group["capturable"] = True  # what a learner on CUDA writes
    resumed = learner()
    resumed.load_private_state(saved)
    assert [g["capturable"] for g in resumed.opt_mlp.param_groups] == [False, False]
    a, b = first.train_round(f, y, 1), resumed.train_round(f, y, 1)
    assert a.loss == b.loss
    for p, q in zip(first.mlp.parameters(), resumed.mlp.parameters(), strict=True):
        assert torch.equal(p, q)
