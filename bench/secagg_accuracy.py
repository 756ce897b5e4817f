"""The accuracy of the brain tumor protocol with and without secure aggregation (``make bench-secagg-accuracy``).

The full protocol (4 training hospitals + the held-out one, Dirichlet alpha 0.5, 50 rounds), in process
with the features cached, for each seed, in four configurations: the plain weighted average and secure
aggregation (shared/secagg.py: masks, Shamir shares, fixed point in Z/2^32, every step run), each with
the fp32 codec (updates travel exactly) and the default int8 codec (the plain mode then rounds every
update to 8 bits; secure aggregation's fixed point does not). Same seeds, so the same partitions,
initial adapters and data order. Reported: AVG and balanced AVG at the selected round, the largest
difference of any round's mean validation and test accuracy between the two modes, the largest
fixed-point error bound of any round, and how many update values the clip cut. Writes
``bench/results/secagg_accuracy.md``, ``.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODECS = ("fp32", "int8")


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def _gap(a: dict, b: dict) -> tuple[float, float]:
    """The largest difference between two runs' per-round mean validation accuracy and per-client test accuracy."""
    val = max(abs(x["mean_val_accuracy"] - y["mean_val_accuracy"]) for x, y in zip(a["history"], b["history"]))
    test = max(
        abs(x["test_accuracy"][c] - y["test_accuracy"][c])
        for x, y in zip(a["history"], b["history"])
        for c in x["test_accuracy"]
    )
    return val, test


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.secagg_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--per-class", type=int, default=None, help="a stratified subset (quick runs); default: all")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "features"))
    p.add_argument("--out", default="bench/results/secagg_accuracy.md")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from shared.data import default_data_root
    from shared.simulation import SimConfig, prepare, run

    seeds, codecs = [int(s) for s in args.seeds.split(",")], args.codecs.split(",")
    base = SimConfig(
        data_root=str(Path(default_data_root()).resolve()),
        per_class=args.per_class,
        rounds=args.rounds,
        cache_dir=args.cache_dir,
        progress=False,
    )
    runs: list[dict] = []
    total, t0 = len(seeds) * len(codecs) * 2, time.perf_counter()
    threads = torch.get_num_threads()
    for seed in seeds:
        prepared = prepare(replace(base, seed=seed))
        for codec in codecs:
            pair = {}
            for secure in (False, True):
                cfg = replace(base, seed=seed, wire=replace(base.wire, codec=codec), secure_aggregation=secure)
                report = run(cfg, prepared)
                torch.set_num_threads(threads)
                pair[secure] = report
                rounds = [
                    h["secure_aggregation"] for h in report["history"] if "scale" in h.get("secure_aggregation", {})
                ]
                runs.append(
                    {
                        "seed": seed,
                        "codec": codec,
                        "secure": secure,
                        "avg": report["avg"]["accuracy"],
                        "bal": report["avg"]["balanced_accuracy"],
                        "best_round": report["best_round"],
                        "mean_val": [h["mean_val_accuracy"] for h in report["history"]],
                        "error_bound": max((r["error_bound"] for r in rounds), default=None),
                        "clipped": sum(r["clipped_values"] for r in rounds),
                        "s_round": report["timings"]["seconds_per_round"],
                    }
                )
                r = runs[-1]
                print(
                    f"[{len(runs)}/{total}, {time.perf_counter() - t0:.0f}s] seed {seed} {codec} "
                    f"{'secure' if secure else 'plain'}: AVG {100 * r['avg']:.2f}, best round {r['best_round']}",
                    flush=True,
                )
            runs[-1]["gap_val"], runs[-1]["gap_test"] = _gap(pair[False], pair[True])
    text = render(runs, seeds, codecs, args, argv)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    plot(runs, codecs, seeds[0], out.with_suffix(".png"))
    print(text)
    return 0


def render(runs: list[dict], seeds, codecs, args, argv) -> str:
    command = "make bench-secagg-accuracy" + (f' ARGS="{shlex.join(argv)}"' if argv else "")
    lines = [
        "# Accuracy with and without secure aggregation",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Backbone: the offline one (EfficientNet-Lite0 + MiniLM), **not CLIP**.",
        "",
        f"{'The whole brain tumor set' if args.per_class is None else f'{args.per_class} images per class'} "
        f"(de-duplicated), 4 training hospitals + the held-out one (Dirichlet alpha 0.5), {args.rounds} rounds, "
        f"seeds {seeds}, features cached, in process. Secure aggregation runs every step of the protocol "
        "(keys, signed and encrypted Shamir shares, masks, unmasking) with the defaults: clip 1.0, threshold "
        "more than half of the roster. AVG: mean test accuracy over the training hospitals and the held-out "
        "one at the selected round (best mean validation accuracy).",
        "",
        "| codec | mode | AVG accuracy (%) | balanced AVG (%) | best rounds | first round that differs "
        "| largest round gap, val / test (points) | largest error bound | values clipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for codec in codecs:
        for secure in (False, True):
            rs = [r for r in runs if r["codec"] == codec and r["secure"] == secure]
            gap = (
                f"{100 * max(r['gap_val'] for r in rs):.2f} / {100 * max(r['gap_test'] for r in rs):.2f}"
                if secure
                else "-"
            )
            bound = max((r["error_bound"] for r in rs if r["error_bound"] is not None), default=None)
            first = ", ".join(str(_first_difference(runs, r)) for r in rs) if secure else "-"
            lines.append(
                f"| {codec} | {'secure aggregation' if secure else 'plain'} | {_mean_std([r['avg'] for r in rs])} "
                f"| {_mean_std([r['bal'] for r in rs])} | {', '.join(str(r['best_round']) for r in rs)} | {first} "
                f"| {gap} "
                f"| {'-' if bound is None else f'{bound:.2g}'} | {sum(r['clipped'] for r in rs) if secure else '-'} |"
            )
    lines += [
        "",
        "First round that differs: per seed, the first round whose mean validation accuracy is not the same in "
        "the plain and the secure run. Largest round gap: over all rounds and seeds, the largest difference "
        "between the plain and the secure run of one seed, in the mean validation accuracy and in any client's "
        "test accuracy. With fp32 the plain mode sends every update exactly, so the two runs' globals differ "
        "only by secure aggregation's fixed point: at most the error bound per value in a round. Local training "
        "amplifies such differences over the rounds (images near a decision boundary change their prediction), "
        "so the gaps are those of two runs whose globals first differed in the eighth decimal, not a systematic "
        "loss. With int8 the plain mode also rounds every update to 8 bits per value and secure aggregation "
        "does not. Every run: secagg_accuracy.json.",
        "",
        "![mean validation accuracy per round, plain and secure](secagg_accuracy.png)",
        "",
    ]
    return "\n".join(lines)


def _first_difference(runs: list[dict], secure: dict) -> int | str:
    plain = next(r for r in runs if r["seed"] == secure["seed"] and r["codec"] == secure["codec"] and not r["secure"])
    pairs = zip(plain["mean_val"], secure["mean_val"], strict=True)
    return next((i for i, (a, b) in enumerate(pairs, start=1) if a != b), "none")


def plot(runs: list[dict], codecs, seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(codecs), figsize=(5.2 * len(codecs), 3.8), squeeze=False)
    for ax, codec in zip(axes[0], codecs):
        for secure, style in ((False, "-"), (True, "--")):
            r = next(x for x in runs if x["seed"] == seed and x["codec"] == codec and x["secure"] == secure)
            ax.plot(
                range(1, len(r["mean_val"]) + 1),
                [100 * v for v in r["mean_val"]],
                style,
                label="secure aggregation" if secure else "plain",
            )
        ax.set_title(f"codec {codec}, seed {seed}", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("mean validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Plain and secure aggregation, round by round (offline backbone, not CLIP)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
