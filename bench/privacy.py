"""The accuracy price of differential privacy (``make bench-privacy``): the full brain tumor protocol (4
training hospitals + the held-out one, Dirichlet alpha 0.5, 50 rounds) for each target epsilon, FedMedCLIP
and FedCLIP alike, 3 seeds; AVG and balanced AVG at the selected round, mean and std over seeds.

Every hospital trains with DP-SGD (shared/learning/privacy.py) calibrated so that the whole run spends at
most the target epsilon at delta = min(1e-5, 0.1 / its training images); "inf" is the same protocol without
differential privacy. Runs in-process with the features cached; writes ``bench/results/privacy.md`` and
``bench/results/privacy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("fedmedclip", "fedclip")


def _parse_eps(text: str) -> list[float]:
    return [math.inf if e.strip() in ("inf", "∞") else float(e) for e in text.split(",")]


def _label(eps: float) -> str:
    return "∞ (no DP)" if math.isinf(eps) else f"{eps:g}"


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", default="1,3,8,inf", help="target epsilons; inf: no differential privacy")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--per-class", type=int, default=None, help="a stratified subset (quick runs); default: all")
    p.add_argument("--data", default=None, help="image folder (default: the bundled brain tumor set)")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "features"))
    p.add_argument("--out", default="bench/results/privacy.md")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from shared.data import default_data_root
    from shared.learning.privacy import DPConfig
    from shared.simulation import SimConfig, prepare, run

    epsilons, methods = _parse_eps(args.epsilons), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = SimConfig(
        data_root=str(Path(args.data or default_data_root()).resolve()),
        per_class=args.per_class,
        rounds=args.rounds,
        cache_dir=args.cache_dir,
        progress=False,
    )
    results: dict[tuple[str, float], list[dict]] = {}
    total, done, t0 = len(seeds) * len(methods) * len(epsilons), 0, time.perf_counter()
    threads = torch.get_num_threads()
    for seed in seeds:
        prepared = prepare(replace(base, seed=seed))
        for method in methods:
            for eps in epsilons:
                dp = DPConfig() if math.isinf(eps) else DPConfig(epsilon=eps)
                cfg = replace(base, seed=seed, method=method, dp=dp)
                report = run(cfg, prepared)
                torch.set_num_threads(threads)
                privacy = report.get("privacy") or {}
                hospitals = privacy.get("hospitals", {})
                results.setdefault((method, eps), []).append(
                    {
                        "avg": report["avg"]["accuracy"],
                        "bal": report["avg"]["balanced_accuracy"],
                        "spent": privacy.get("max_epsilon", math.inf),
                        "sigma": [h["noise_multiplier"] for h in hospitals.values()],
                        "delta": [h["delta"] for h in hospitals.values()],
                        "s_round": report["timings"]["seconds_per_round"],
                    }
                )
                done += 1
                r = results[(method, eps)][-1]
                print(
                    f"[{done}/{total}, {time.perf_counter() - t0:.0f}s] seed {seed} {method} epsilon {_label(eps)}: "
                    f"AVG {100 * r['avg']:.2f}, balanced {100 * r['bal']:.2f}, spent "
                    f"{r['spent']:.3f}, {r['s_round']:.2f} s/round",
                    flush=True,
                )
    text = render(results, epsilons, methods, seeds, args, argv)
    Path(args.out).write_text(text)
    runs = [{"method": m, "epsilon": None if math.isinf(e) else e, "runs": rs} for (m, e), rs in results.items()]
    Path(args.out).with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    plot(results, epsilons, methods, Path(args.out).with_suffix(".png"))
    print(text)
    return 0


def render(results, epsilons, methods, seeds, args, argv) -> str:
    command = "make bench-privacy" + (f' ARGS="{shlex.join(argv)}"' if argv else "")
    lines = [
        "# The accuracy price of differential privacy",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Backbone: the offline one (EfficientNet-Lite0 + MiniLM), **not CLIP**.",
        "",
        f"{'The whole brain tumor set' if args.per_class is None else f'{args.per_class} images per class'} "
        f"(de-duplicated), 4 training hospitals + the held-out one (Dirichlet alpha 0.5), {args.rounds} rounds, "
        f"seeds {seeds}, features cached. Each hospital's DP-SGD is calibrated so that the whole run spends at "
        "most the target epsilon (record level: adding or removing one training image of that hospital), "
        "delta = min(1e-5, 0.1 / its training images), per-image clip norm 1, Poisson sampling with the "
        "batch size 32 as its expected size. The FedMedCLIP rows include the noisy class histogram of its "
        "logit adjustment in the same budget. AVG: the paper's mean test accuracy over the training "
        "hospitals and the held-out one at the selected round (best mean validation accuracy).",
        "",
        "| method | target epsilon | AVG accuracy (%) | balanced AVG (%) | epsilon spent (max over hospitals) "
        "| noise multiplier | s / round |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        for eps in epsilons:
            runs = results[(method, eps)]
            sigmas = [s for r in runs for s in r["sigma"]]
            spent = max(r["spent"] for r in runs)
            lines.append(
                f"| {method} | {_label(eps)} | {_mean_std([r['avg'] for r in runs])} "
                f"| {_mean_std([r['bal'] for r in runs])} | {'-' if math.isinf(spent) else f'{spent:.3f}'} "
                f"| {f'{min(sigmas):.2f} to {max(sigmas):.2f}' if sigmas else '-'} "
                f"| {statistics.mean(r['s_round'] for r in runs):.2f} |"
            )
    lines += [
        "",
        "s / round: the mean wall time of a round, measured while other work shared the machine's 2 cores "
        "(indicative only). Every run's numbers: privacy.json.",
        "",
        'What this bounds, and what it does not, is in the README ("Privacy and audit").',
        "",
        "![AVG accuracy against epsilon](privacy.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results, epsilons, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    finite = [e for e in epsilons if not math.isinf(e)]
    x_inf = max(finite) * 3 if finite else 1.0
    for method in methods:
        xs = [x_inf if math.isinf(e) else e for e in epsilons]
        runs = [results[(method, e)] for e in epsilons]
        means = [100 * statistics.mean(r["avg"] for r in rs) for rs in runs]
        sds = [100 * (statistics.stdev([r["avg"] for r in rs]) if len(rs) > 1 else 0.0) for rs in runs]
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ticks = [x_inf if math.isinf(e) else e for e in epsilons]
    ax.set_xticks(ticks, [_label(e).split(" ")[0] for e in epsilons])
    ax.set_xlabel("target epsilon per hospital for the whole run (∞: no DP)")
    ax.set_ylabel("AVG test accuracy (%)")
    ax.set_title("AVG accuracy against epsilon (offline backbone, not CLIP)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
