"""Imbalance-aware metrics, the round selection by a chosen metric, and the report helpers built on them."""

from __future__ import annotations

import math

import pytest
import torch

from shared.learning.metrics import classification_metrics
from shared.ops.report import best_round_table, build_report, confusion_table, file_stem, per_class_table
from shared.ops.report import render_markdown as aggregator_markdown
from shared.simulation import SimulateConfig, best_round


def _onehot(pred: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), num_classes).float()


def test_confusion_recall_and_majority_baseline_of_an_imbalanced_set():
    # 8 of class 0, 2 of class 1, none of class 2; a model that answers 0 for everything but one class-1 image
    labels = torch.tensor([0] * 8 + [1, 1])
    m = classification_metrics(_onehot([0] * 8 + [1, 0], 3), labels, 3)
    assert m["confusion"] == [[8, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert m["per_class_recall"][:2] == [1.0, 0.5] and math.isnan(m["per_class_recall"][2])
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.75)  # over the classes present
    assert m["majority_baseline"] == pytest.approx(0.8)
    always_majority = classification_metrics(_onehot([0] * 10, 3), labels, 3)
    assert always_majority["accuracy"] == pytest.approx(0.8) and always_majority["balanced_accuracy"] == 0.5
    empty = classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3)
    assert empty["confusion"] == [[0] * 3] * 3 and all(math.isnan(r) for r in empty["per_class_recall"])


def _round(r: int, acc: float, bal: float, f1: float) -> dict:
    return {"round": r, "mean_val": {"accuracy": acc, "balanced_accuracy": bal, "macro_f1": f1}}


def test_expected_calibration_error_by_hand():
    # confidences 0.9, 0.9 (one right, one wrong), 0.7 (right) and 0.5 (wrong), 15 bins (lo, hi]:
    # bin (13/15, 14/15] holds both 0.9s: share 2/4, |0.9 - 0.5|; bin (10/15, 11/15] the 0.7: 1/4 * |0.7 - 1|;
    # 0.5 is in bin (7/15, 8/15]: 1/4 * |0.5 - 0|. ECE = 0.2 + 0.075 + 0.125
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 1])  # argmax of the last row is class 0 (the first of a tie): wrong
    assert classification_metrics(probs, labels, 2)["ece"] == pytest.approx(0.4)
    # a confidence exactly on a bin's upper edge belongs to that bin; perfectly calibrated certainty costs 0
    assert classification_metrics(_onehot([0, 1], 2), torch.tensor([0, 1]), 2)["ece"] == pytest.approx(0.0)
    assert classification_metrics(_onehot([0, 1], 2), torch.tensor([1, 0]), 2)["ece"] == pytest.approx(1.0)
    # a mixture's probability may round a hair above 1: in no bin (as a 0 is), never an error
    above = torch.tensor([[1.0 + 1e-6, 0.0], [0.9, 0.1]])
    assert classification_metrics(above, torch.tensor([0, 1]), 2)["ece"] == pytest.approx(0.9 / 2)


def test_best_round_follows_the_selection_metric():
    history = [_round(1, 0.90, 0.50, 0.40), _round(2, 0.85, 0.80, 0.60), _round(3, 0.80, 0.70, 0.75)]
    assert [best_round(history, k)["round"] for k in ("accuracy", "balanced_accuracy", "macro_f1")] == [1, 2, 3]
    tied = [_round(1, float("nan"), 0.5, 0.5), _round(2, 0.7, 0.5, 0.5), _round(3, 0.7, 0.5, 0.5)]
    assert best_round(tied, "accuracy")["round"] == 2  # NaN never wins, the earliest of equals does
    with pytest.raises(ValueError, match="select_by"):
        SimulateConfig(select_by="auc")


def test_report_helpers_show_per_class_recall_and_name_the_selection_metric():
    metrics = {
        "n": 10,
        "accuracy": 0.9,
        "balanced_accuracy": 0.75,
        "macro_f1": 0.6,
        "ece": 0.1,
        "majority_baseline": 0.8,
        "per_class_recall": [1.0, 0.5, float("nan")],
        "confusion": [[8, 0, 0], [1, 1, 0], [0, 0, 0]],
    }
    report = {
        "best_round": 4,
        "best_mean_val": 0.7,
        "best_mean_val_accuracy": 0.9,
        "select_by": "balanced_accuracy",
        "test": {"site_a": metrics},
        "avg": metrics,
        "classes": ["a", "b", "c"],
    }
    assert best_round_table(report)[0].startswith("Best round 4 by mean val balanced accuracy (0.7000)")
    table = per_class_table(report)
    assert table[2].endswith("| majority baseline | balanced acc. | macro-F1 | recall a | recall b | recall c |")
    assert table[4] == "| site_a | 10 | 0.9000 | 0.8000 | 0.7500 | 0.6000 | 1.0000 | 0.5000 | - |"
    assert confusion_table(metrics["confusion"], report["classes"])[3] == "| b | 1 | 1 | 0 |"
    assert file_stem("site a/../x") == "site_a_.._x" and file_stem("..hidden") == "hidden"


def test_the_aggregators_report_keeps_its_shape_without_per_class_metrics():
    scalar = {"n": 20, "accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.4, "ece": 0.2}
    report = build_report(
        run_id="r1",
        phase="finished",
        message="",
        method="fedmedclip",
        rounds=1,
        nodes={"h1": {"role": "trainer"}, "g": {"role": "evaluator"}},
        reports={"1": {"h1": {"val": scalar, "test": scalar}, "g": {"test": scalar}}},
        rounds_log=[],
    )
    text = aggregator_markdown(report)
    assert "Best round 1 by mean val accuracy (0.5000)" in text and "| h1 | 0.5000 |" in text
    assert per_class_table(report | {"classes": ["a", "b"]}) == []
