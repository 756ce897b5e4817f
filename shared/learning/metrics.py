"""Classification metrics of the evaluation protocol (docs/method.md, section 11)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "ece")

#: The mean validation metrics that can pick the best round (``--select-by``).
SELECT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the finite values (a client with no samples reports NaN); NaN when none is."""
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def mean_metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-metric mean over clients: the paper's AVG when ``rows`` are the clients' test metrics."""
    return {k: nanmean([r[k] for r in rows]) for k in METRIC_KEYS}


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, num_classes: int, *, ece_bins: int = 15
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and expected calibration error of predicted probabilities,
    with what an imbalanced set needs beside them.

    Balanced accuracy and macro-F1 average over the classes present in ``labels`` (a class a
    hospital never sees cannot be recalled); an empty set gives NaN everywhere. Also:
    ``per_class_recall`` (one entry per class, NaN for a class absent from ``labels``),
    ``confusion`` (``[true][predicted]`` counts, ``num_classes`` x ``num_classes``) and
    ``majority_baseline`` (the accuracy of always answering the most frequent true class).
    """
    n = len(labels)
    if n == 0:
        nan = float("nan")
        return {
            "n": 0,
            "accuracy": nan,
            "balanced_accuracy": nan,
            "macro_f1": nan,
            "ece": nan,
            "majority_baseline": nan,
            "per_class_recall": [nan] * num_classes,
            "confusion": [[0] * num_classes for _ in range(num_classes)],
        }
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).float()
    confusion = torch.zeros(num_classes, num_classes)
    confusion.index_put_((labels.long(), pred.long()), torch.ones(n), accumulate=True)
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    tp = confusion.diag()
    present = support > 0
    recall = tp[present] / support[present]
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    full_recall = torch.where(present, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + full_recall > 0,
        2 * precision * full_recall / (precision + full_recall).clamp_min(1e-12),
        torch.zeros_like(tp),
    )
    # ECE: bins (lo, hi] of the confidence; sum over bins of (bin share) * |mean confidence - accuracy| in the bin,
    # i.e. |sum of confidences - number correct| in the bin, over n (a confidence of 0, or one rounded above 1,
    # is in no bin)
    edges = torch.linspace(0, 1, ece_bins + 1)
    bins = torch.bucketize(conf, edges) - 1  # edges[b] < conf <= edges[b + 1]
    inside = (bins >= 0) & (bins < ece_bins)
    gap = torch.zeros(ece_bins, dtype=torch.float64)
    gap.index_add_(0, bins[inside], (conf - correct)[inside].double())
    ece = gap.abs().sum() / n
    return {
        "n": n,
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(recall.mean()),
        "macro_f1": float(f1[present].mean()),
        "ece": float(ece),
        "majority_baseline": float(support.max() / n),
        "per_class_recall": [float(r) if p else float("nan") for r, p in zip(full_recall.tolist(), present.tolist())],
        "confusion": confusion.long().tolist(),
    }
