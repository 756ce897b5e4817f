"""Differential privacy at a hospital (shared/learning/privacy.py): the clipping engine against per-image
gradients computed one image at a time, the accountant against a second implementation, the budget, the noise."""

from __future__ import annotations

import math

import pytest
import torch

from shared.learning.objective import local_loss
from shared.learning.privacy import (
    PRIOR_NOISE,
    DPConfig,
    PrivacyBudgetSpent,
    Tape,
    calibrate_noise,
    epsilon_of,
)
from shared.learning.training import HospitalLearner, TrainConfig, get_method

DIM, CLASSES = 48, 4


def learner(method: str = "fedmedclip", dp: DPConfig | None = None, seed: int = 0, **train) -> HospitalLearner:
    gen = torch.Generator().manual_seed(123)
    text = torch.nn.functional.normalize(torch.randn(CLASSES, DIM, generator=gen), dim=-1)
    return HospitalLearner(
        get_method(method),
        TrainConfig(mlp_hidden=32, **train),
        dim=DIM,
        num_classes=CLASSES,
        text_features=text,
        logit_scale=30.0,
        dp=dp,
        noise_seed=seed,
    )


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def per_image_losses(lrn: HospitalLearner, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    adapted = lrn.adapter(f)
    z = lrn.mlp(adapted) if lrn.mlp is not None else None
    prior = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])) if lrn.method.loss.balance != "none" else None
    return local_loss(adapted, z, y, lrn.text, lrn.scale, lrn.method.loss, prior, per_sample=True)[0]


@pytest.mark.parametrize("method", ["fedmedclip", "fedclip", "ablation_unmasked"])
def test_clipped_sum_equals_the_sum_of_each_images_own_clipped_gradient(method):
    """The engine's per-image norms and clipped sums (from layer inputs and output gradients) equal, for
    every trained parameter, what clipping each image's own gradient (one image per backward) gives."""
    torch.manual_seed(0)
    lrn = learner(method, DPConfig(noise_multiplier=1.0, clip=0.05))
    for layer in [*lrn.adapter.modules(), *(lrn.mlp.modules() if lrn.mlp else [])]:
        if getattr(layer, "masked", False):  # rows near their thresholds: the mask's gradient matters
            with torch.no_grad():
                layer.threshold.copy_(layer.weight.abs().mean(1) + 0.002 * torch.randn(layer.out_features))
    lrn.plan_privacy(100, 5)
    engine = lrn.dp_engine
    f, y = data(9)
    with engine.tape:
        per_image_losses(lrn, f, y).sum().backward()
    sums = engine.clipped_sums(len(y), 0.05)

    expected = {p: torch.zeros_like(p) for p in engine.params}
    clipped = 0
    for i in range(len(y)):
        for p in engine.params:
            p.grad = None
        per_image_losses(lrn, f[i : i + 1], y[i : i + 1]).sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in engine.params]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        c = min(1.0, 0.05 / (norm + 1e-6))
        clipped += c < 1.0
        for p, g in zip(engine.params, grads):
            expected[p] += c * g
    assert clipped >= 5  # the bound is active for most images: clipping is really exercised
    assert set(sums) == set(engine.params)
    for p in engine.params:
        torch.testing.assert_close(sums[p], expected[p], rtol=1e-4, atol=1e-7)


def test_the_noise_has_the_stated_scale_and_covers_every_trained_parameter():
    lrn = learner(dp=DPConfig(noise_multiplier=2.0, clip=0.5))
    plan = lrn.plan_privacy(400, 10)
    engine = lrn.dp_engine
    f, y = data(32)
    with engine.tape:
        per_image_losses(lrn, f, y).sum().backward()
    clean = {p: s / plan.expected_batch for p, s in engine.clipped_sums(32, plan.clip).items()}
    engine.write_grads(32, plan)
    noise = torch.cat([(p.grad - clean[p]).flatten() for p in engine.params])
    want = plan.noise_multiplier * plan.clip / plan.expected_batch
    assert noise.numel() > 8_000
    assert abs(float(noise.std()) / want - 1) < 0.02
    assert abs(float(noise.mean())) < 0.02 * want
    trained = {id(p) for m in (lrn.adapter, lrn.mlp) for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in engine.params} == trained


def test_a_dp_update_differs_from_another_seeds_by_the_noise_and_training_is_reproducible():
    f, y = data(200)
    updates = []
    for seed in (1, 1, 2):
        lrn = learner(dp=DPConfig(noise_multiplier=1.0), seed=seed)
        lrn.plan_privacy(200, 3)
        lrn.train_round(f, y, 0)
        updates.append(torch.cat([t.flatten() for t in lrn.adapter_state().values()]))
    assert torch.equal(updates[0], updates[1])  # the same noise seed: the same update
    assert not torch.allclose(updates[0], updates[2])  # another seed: other sampling and noise


def test_accountant_matches_a_second_implementation():
    """The classic DP-SGD configuration (MNIST: 60,000 images, batches of 256, noise 1.1, 15 epochs, delta 1e-5).
    Opacus 1.6's RDPAccountant, an independent implementation, gives 1.2811442759635 for it (computed while
    writing this test); dp-accounting's must agree."""
    q, steps = 256 / 60_000, 15 * 60_000 // 256
    assert epsilon_of(q, 1.1, steps, 1e-5, prior=False) == pytest.approx(1.2811442759635, rel=1e-6)
    # more noise, less epsilon; more steps, more
    assert epsilon_of(q, 2.0, steps, 1e-5, prior=False) < 1.28 < epsilon_of(q, 1.1, 2 * steps, 1e-5, prior=False)


def test_calibrated_noise_reaches_the_target_epsilon():
    q, steps = 32 / 1300, 41 * 50
    sigma = calibrate_noise(3.0, 1e-5, q, steps)
    assert epsilon_of(q, sigma, steps, 1e-5) <= 3.0
    assert epsilon_of(q, sigma / 1.002, steps, 1e-5) > 3.0  # the smallest such noise, to 0.1 %
    plan = DPConfig(epsilon=3.0).plan(num_train=1300, batch_size=32, local_epochs=1, rounds=50)
    assert plan.noise_multiplier == pytest.approx(sigma)
    assert plan.delta == 1e-5 and plan.sample_rate == pytest.approx(q)


def test_the_class_histogram_release_is_accounted():
    """The logit-adjusted method's class prior is a noisy histogram: its Gaussian release costs epsilon too."""
    q, steps = 0.05, 100
    alone = epsilon_of(1.0, PRIOR_NOISE, 1, 1e-5, prior=False)
    assert (
        0 < alone < epsilon_of(q, 1.0, steps, 1e-5, prior=True) - epsilon_of(q, 1.0, steps, 1e-5, prior=False) + alone
    )


def test_a_budget_stops_training_before_it_is_passed():
    f, y = data(120)
    lrn = learner(dp=DPConfig(noise_multiplier=2.0, epsilon=6.0))
    lrn.plan_privacy(120, 1000)
    spent = []
    with pytest.raises(PrivacyBudgetSpent, match="budget"):
        for r in range(1000):
            stats = lrn.train_round(f, y, r)
            spent.append(stats.privacy["epsilon"])
    assert 2 <= len(spent) < 1000
    assert spent == sorted(spent) and spent[-1] <= 6.0
    before = {k: v.clone() for k, v in lrn.adapter_state().items()}
    with pytest.raises(PrivacyBudgetSpent):
        lrn.train_round(f, y, len(spent))
    after = lrn.adapter_state()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a refused round trains nothing
    assert lrn.accountant.epsilon(lrn.accountant.steps + lrn.accountant.plan.steps_per_round) > 6.0


def test_a_resumed_learner_continues_exactly_with_its_plan_spending_and_noise():
    f, y = data(150)
    whole = learner(dp=DPConfig(epsilon=4.0), seed=7)
    whole.plan_privacy(150, 4)
    for r in range(3):
        whole.train_round(f, y, r)

    first = learner(dp=DPConfig(epsilon=4.0), seed=7)
    first.plan_privacy(150, 4)
    first.train_round(f, y, 0)
    saved = first.private_state()
    resumed = learner(dp=DPConfig(epsilon=4.0), seed=99)  # another seed: the state's generator must win
    resumed.load_adapter_state(first.adapter_state())
    resumed.load_private_state(saved)
    resumed.plan_privacy(150, 4)
    for r in (1, 2):
        resumed.train_round(f, y, r)
    assert resumed.epsilon() == pytest.approx(whole.epsilon())
    for k, v in whole.adapter_state().items():
        assert torch.equal(v, resumed.adapter_state()[k])


def test_settings_that_would_void_the_guarantee_are_refused():
    with pytest.raises(ValueError, match="1/n"):
        DPConfig(epsilon=1.0, delta=0.01).plan(num_train=500, batch_size=32, local_epochs=1, rounds=5)
    with pytest.raises(ValueError, match="dp_clip"):
        DPConfig(epsilon=1.0, clip=0.0)
    with pytest.raises(ValueError, match="dp_epsilon"):
        DPConfig(epsilon=float("inf"))
    with pytest.raises(ValueError, match="mixes the images"):  # the reference code's in-batch contrastive loss
        lrn = learner("ref_batch_contrastive", DPConfig(noise_multiplier=1.0))
        lrn.plan_privacy(64, 2)
        lrn.train_round(*data(64), 0)
    with pytest.raises(ValueError, match="BatchNorm1d"):  # BatchNorm mixes a batch's images: no per-image gradient
        Tape([learner().mlp])
    with pytest.raises(ValueError, match="without differential privacy"):
        learner(dp=DPConfig(epsilon=1.0)).load_private_state(learner().private_state())


def test_without_dp_nothing_changes():
    """DP off: BatchNorm in the MLP, the same steps as before, no privacy record."""
    lrn = learner()
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in lrn.mlp.modules())
    stats = lrn.train_round(*data(100), 0)
    assert stats.privacy is None and stats.steps == math.ceil(100 / 32)
    assert lrn.plan_privacy(100, 5) is None
