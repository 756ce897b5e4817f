"""``TrainConfig.compile``: full batches through the torch.compile'd forward pass and loss train as eager ones do."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shared.learning import training
from shared.learning.training import HospitalLearner, TrainConfig, get_method
from shared.simulation import prepare


@pytest.fixture(scope="module")
def prepared(four_hospitals, backbone):
    return prepare(four_hospitals, backbone=backbone)


def learner(prepared, compile_: bool) -> HospitalLearner:
    return HospitalLearner(
        get_method("fedmedclip"),
        replace(TrainConfig(), compile=compile_),
        dim=prepared.features.shape[1],
        num_classes=len(prepared.dataset.class_names),
        text_features=prepared.text,
        logit_scale=prepared.backbone.logit_scale,
        seed=3,
    )


def test_compiled_full_batches_train_as_eager_ones(prepared, monkeypatch):
    real = training.compiled_forward_loss()
    batches: list[int] = []

    def counting(adapter, mlp, f, *args):  # noqa: ANN001, ANN202
        batches.append(len(f))
        return real(adapter, mlp, f, *args)

    monkeypatch.setattr(training, "compiled_forward_loss", lambda: counting)
    features, labels = prepared.features[:80], prepared.labels[:80]  # 2 full batches of 32 and one of 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager, compiled = learner(prepared, False), learner(prepared, True)
        assert not eager.compiled and compiled.compiled
        for r in range(3):
            a = eager.train_round(features, labels, r)
            b = compiled.train_round(features, labels, r)
            assert a.steps == b.steps == 3
            assert b.loss == pytest.approx(a.loss, rel=1e-4)
    finally:
        torch.set_num_threads(threads)
    assert batches == [32, 32] * 3  # the full batches compiled, the last one of 16 eager
    # the adapter (what travels) to within float32 rounding; the MLP by what it computes: the bias of a layer
    # before BatchNorm has no gradient but rounding noise, which AdamW scales up to steps of the learning rate
    # in either run, and BatchNorm takes it out again
    theirs = eager.adapter_state()
    for name, value in compiled.adapter_state().items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    (sim_a, z_a), (sim_b, z_b) = eager.logits(prepared.features), compiled.logits(prepared.features)
    torch.testing.assert_close(sim_b, sim_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z_b, z_a, rtol=1e-4, atol=1e-4)
    assert compiled.adapter.keep_ratios() == eager.adapter.keep_ratios()
