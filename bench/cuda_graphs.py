"""CUDA graphs against eager steps, on a lent GPU machine (not part of the test suite: CI has no GPU).

Two learners of one hospital, same seed and data: one steps eagerly, the other replays each round's captured
full-batch step (``TrainConfig.cuda_graphs``, the default on CUDA). After every round their parameters,
optimiser moments and losses must agree (float tolerance: the same kernels, recorded once); the time per round
of each is reported as a ratio measured in this one run.

Run: ``python -m bench.cuda_graphs --device cuda [--out F.json]``. On a CPU both learners are eager (the
check then only exercises this script).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.learning.training import HospitalLearner, TrainConfig, get_method


def _learner(graphs: bool, device: str, text: torch.Tensor) -> HospitalLearner:
    train = replace(TrainConfig(), cuda_graphs=graphs)
    return HospitalLearner(
        get_method("fedmedclip"), train, dim=text.shape[1], num_classes=len(text), text_features=text,
        logit_scale=100.0, seed=0, device=device,
    )  # fmt: skip


def _differences(a: HospitalLearner, b: HospitalLearner) -> tuple[float, float]:
    """The largest difference between two learners' parameters and BatchNorm buffers, and between their
    optimisers' moments."""
    params = max(
        float((x - y).abs().max())
        for x, y in zip(
            [*a.adapter.parameters(), *a.mlp.parameters(), *a.mlp.buffers()],
            [*b.adapter.parameters(), *b.mlp.parameters(), *b.mlp.buffers()],
            strict=True,
        )
    )
    moments = max(
        float((sa[k] - sb[k]).abs().max())
        for opt_a, opt_b in ((a.opt_adapter, b.opt_adapter), (a.opt_mlp, b.opt_mlp))
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True)
        for k in ("exp_avg", "exp_avg_sq")
    )
    return params, moments


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--images", type=int, default=1070, help="training images of the hospital (a round's batches)")
    p.add_argument("--out", default="cuda_graphs.json")
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(4, 512, generator=gen), dim=-1)
    features = (
        F.normalize(torch.randn(args.images, 512, generator=gen), dim=-1) + 0.3 * text[torch.arange(args.images) % 4]
    )
    labels = torch.arange(args.images) % 4
    features, labels = features.to(args.device), labels.to(args.device)
    learners = {"eager": _learner(False, args.device, text), "graphs": _learner(True, args.device, text)}
    seconds: dict[str, list[float]] = {k: [] for k in learners}
    rounds = []
    for r in range(args.rounds):
        stats = {}
        for name, learner in learners.items():
            _sync(args.device)
            start = time.perf_counter()
            stats[name] = learner.train_round(features, labels, r)
            _sync(args.device)
            seconds[name].append(time.perf_counter() - start)
        a, b = learners["eager"], learners["graphs"]
        with torch.no_grad():
            diff, moments = _differences(a, b)
        rounds.append(
            {
                "round": r,
                "steps": stats["eager"].steps,
                "loss_eager": stats["eager"].loss,
                "loss_graphs": stats["graphs"].loss,
                "max_abs_param_diff": diff,
                "max_abs_moment_diff": moments,
            }
        )
        print(json.dumps(rounds[-1]), flush=True)
    later = {k: sum(v[1:]) / max(1, len(v) - 1) for k, v in seconds.items()}
    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "images": args.images,
        "rounds": rounds,
        "seconds_per_round": later,
        "first_round_seconds": {k: v[0] for k, v in seconds.items()},
        "eager_over_graphs": later["eager"] / later["graphs"],
        "agree": all(r["max_abs_param_diff"] < 1e-4 and abs(r["loss_eager"] - r["loss_graphs"]) < 1e-4 for r in rounds),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
