"""`make bench`: every method, ablation and codec on the full brain tumor MRI set.

4 hospitals by Dirichlet alpha 0.5 plus 1 held-out, 50 rounds, 3 seeds (each seed draws its own
partition). Writes ``bench/results/accuracy.md`` (a table shaped like the paper's, docs/method.md section 12, mean
and std over seeds), ``accuracy.json`` with every run's summary, and ``accuracy.png``.

Finished runs are kept in ``accuracy.json`` and skipped when the benchmark is started again,
so an interrupted benchmark resumes. ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.backbone import load_backbone
from shared.data.features import encode_samples
from shared.learning.rounds import WireConfig
from shared.simulation import SimConfig, prepare, run

METHOD_ROWS = [
    ("zeroshot", "zero-shot (frozen features vs prompts)"),
    ("local", "local MLP only, no federation"),
    ("fedclip", "FedCLIP (Tanh adapter, contrastive only)"),
    ("ablation_con_only", "ablation: FAM, contrastive only"),
    ("ablation_con_mlp", "ablation: FAM + MLP, no KL"),
    ("ablation_no_aggregation", "ablation: all terms, no aggregation"),
    ("ablation_unmasked", "ablation: all terms, no learned masks"),
    ("ref_batch_contrastive", "reference code: in-batch contrastive"),
    ("ref_class_kl", "reference code: class-level KL"),
    ("ref_fixed_weight", "reference code: fixed KL weight 1/2"),
    ("fedmedclip_paper", "FedMedCLIP, the paper's objective (ours: int8 + zstd)"),
    ("fedmedclip", "FedMedCLIP default: + logit adjustment (int8 + zstd)"),
]
CODEC_ROWS = [("fp32", False), ("fp16", False), ("int8", False), ("int8", True), ("int4", False), ("int4", True)]
RESULTS = Path(__file__).resolve().parent / "results"


def _key(method: str, codec: str, delta: bool, seed: int) -> str:
    return f"{method}|{codec}{'+delta' if delta else ''}|seed{seed}"


def _summary(report: dict) -> dict:
    return {
        "test_accuracy": {k: v["accuracy"] for k, v in report["test"].items()},
        "avg": report["avg"],
        "best_round": report["best_round"],
        "bytes_per_round": report["bytes_per_round"],
        "seconds_per_round": report["timings"]["seconds_per_round"],
        "phase_seconds_per_round": report["timings"]["phase_seconds_per_round"],
        "wall_seconds": report["timings"]["wall_seconds"],
        "keep_ratio_fc1_last": report["history"][-1]["keep_ratios"].get("adapter.fc1"),
        "bytes_up_last_round": report["history"][-1]["bytes_up"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--hospitals", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--fresh", action="store_true", help="ignore finished runs in accuracy.json")
    p.add_argument("--encode-images", type=int, default=256, help="images encoded without cache for the speed figure")
    p.add_argument("--timing-rounds", type=int, default=10, help="rounds of the dedicated seconds-per-round run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "accuracy.json"
    results: dict = {} if args.fresh or not store.exists() else json.loads(store.read_text())
    runs = results.setdefault("runs", {})

    t0 = time.perf_counter()
    backbone = load_backbone(device=args.device)
    base = SimConfig(
        n_hospitals=args.hospitals,
        alpha=args.alpha,
        rounds=args.rounds,
        cache_dir=args.cache_dir,
        device=args.device,
        progress=True,
    )
    jobs = [(m, "int8", False, s) for s in args.seeds for m, _ in METHOD_ROWS]
    # codecs in order of interest, so a benchmark cut short still has the comparisons that matter
    priority = [("fp32", False), ("int4", True), ("int8", True), ("int4", False), ("fp16", False)]
    jobs += [("fedmedclip_paper", c, d, s) for c, d in priority for s in args.seeds]  # the codec study
    todo = [j for j in jobs if _key(*j) not in runs]
    prepared: dict[int, object] = {}
    bar = tqdm(todo, desc="bench runs", unit="run")
    for method, codec, delta, seed in bar:
        bar.set_postfix_str(f"{method} {codec}{'+delta' if delta else ''} seed {seed}")
        cfg = replace(base, method=method, seed=seed, wire=WireConfig(codec=codec, delta=delta))
        if seed not in prepared:
            prepared[seed] = prepare(cfg, backbone=backbone)
            enc = prepared[seed].encode
            if enc.n_encoded:
                results["encode"] = {
                    "images": enc.n_encoded,
                    "seconds": enc.seconds,
                    "device": enc.device,
                    "images_per_second": enc.images_per_second,
                }
            results["backbone"] = prepared[seed].backbone_record
            results["duplicates"] = prepared[seed].duplicates
        runs[_key(method, codec, delta, seed)] = _summary(run(cfg, prepared[seed]))
        store.write_text(json.dumps(results, indent=1))
    # speed figures, measured anew on every invocation (cheap), not taken from the accuracy runs,
    # which may have shared the machine with other work
    sample_cfg = replace(base, seed=args.seeds[0])
    prep = prepared.get(args.seeds[0]) or prepare(sample_cfg, backbone=backbone)
    _, enc = encode_samples(backbone, prep.dataset.samples[: args.encode_images], None, progress=False)
    results["encode"] = {
        "images": enc.n_encoded,
        "seconds": enc.seconds,
        "device": enc.device,
        "images_per_second": enc.images_per_second,
    }
    timing = run(replace(sample_cfg, rounds=args.timing_rounds), prep)
    results["timing"] = {
        "rounds": args.timing_rounds,
        "seconds_per_round": timing["timings"]["seconds_per_round"],
        "phase_seconds_per_round": timing["timings"]["phase_seconds_per_round"],
    }
    results["last_invocation_wall_seconds"] = time.perf_counter() - t0
    gpu = out / "gpu_encode.json"  # written by bench/gpu_encode.py on a lent GPU machine
    if gpu.exists():
        results["gpu_encode"] = json.loads(gpu.read_text())
    results["config"] = {"seeds": args.seeds, "rounds": args.rounds, "hospitals": args.hospitals, "alpha": args.alpha}
    store.write_text(json.dumps(results, indent=1))
    (out / "accuracy.md").write_text(render(results))
    plot(results, out / "accuracy.png")
    print((out / "accuracy.md").read_text())
    return 0


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    return (float(np.mean(values)) * 100, float(np.std(values)) * 100) if values else (float("nan"), float("nan"))


def _fmt(values: list[float]) -> str:
    mean, std = _stats(values)
    return f"{mean:.2f} ± {std:.2f}"


def render(results: dict) -> str:
    runs, cfg = results["runs"], results["config"]
    seeds = cfg["seeds"]
    clients = [f"hospital_{i + 1}" for i in range(cfg["hospitals"])] + ["global"]
    b = results["backbone"]
    lines = [
        "# Benchmark: brain tumor MRI, accuracy (%)",
        "",
        f"Backbone: **{b['description']}**. Not CLIP: zero-shot is chance by construction.",
        f"Setting: {results['duplicates']['n_unique']} de-duplicated images, {cfg['hospitals']} hospitals by "
        f"Dirichlet alpha {cfg['alpha']} + 1 held-out ('global'), {cfg['rounds']} rounds, seeds {seeds} "
        "(each seed its own partition); model selection on mean val accuracy; test accuracy at the selected "
        "round; mean ± std over seeds. AVG = unweighted mean over the training hospitals and the global one "
        "(the paper's AVG). Made by `make bench`.",
        "",
        "| method | "
        + " | ".join(c.replace("hospital_", "C") for c in clients)
        + " | AVG | balanced AVG | macro-F1 AVG |",
        "|---|" + "---|" * (len(clients) + 3),
    ]
    for method, label in METHOD_ROWS:
        rows = [runs.get(_key(method, "int8", False, s)) for s in seeds]
        rows = [r for r in rows if r]
        if not rows:
            continue
        cells = [_fmt([r["test_accuracy"][c] for r in rows]) for c in clients]
        label = label if len(rows) == len(seeds) else f"{label} (n={len(rows)} seeds)"
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | **{_fmt([r['avg']['accuracy'] for r in rows])}** | "
            f"{_fmt([r['avg']['balanced_accuracy'] for r in rows])} | {_fmt([r['avg']['macro_f1'] for r in rows])} |"
        )
    lines += [
        "",
        "## Codecs (FedMedCLIP, the paper's objective)",
        "",
        "Bytes of one adapter transfer (node to aggregator, wire), mean over rounds; raw = the same tensors "
        "as float32. Rows masked off by the learned thresholds are not sent, so transfers shrink as masks "
        "close (last-round figure).",
        "",
        "| codec | bytes/transfer (mean) | last round | raw fp32 | AVG (%) | AVG change vs fp32 (points) |",
        "|---|---|---|---|---|---|",
    ]
    fp32 = [runs.get(_key("fedmedclip_paper", "fp32", False, s)) for s in seeds]
    for codec, delta in CODEC_ROWS:
        rows = [runs.get(_key("fedmedclip_paper", codec, delta, s)) for s in seeds]
        pairs = [(r, f) for r, f in zip(rows, fp32) if r and f]
        rows = [r for r in rows if r]
        if not rows:
            continue
        per = [r["bytes_per_round"]["per_transfer"] for r in rows]
        last = [r["bytes_up_last_round"] / cfg["hospitals"] for r in rows]
        raw = rows[0]["bytes_per_round"]["up_raw"] / cfg["hospitals"]
        change = ""
        if pairs:  # paired by seed: same partition, same initialisation
            diffs = [(r["avg"]["accuracy"] - f["avg"]["accuracy"]) * 100 for r, f in pairs]
            change = f"{np.mean(diffs):+.2f} ± {np.std(diffs):.2f} (n={len(pairs)})"
        lines.append(
            f"| {codec}{' + delta' if delta else ''} + zstd | {np.mean(per) / 1e6:.3f} MB | "
            f"{np.mean(last) / 1e6:.3f} MB | {raw / 1e6:.3f} MB | {_fmt([r['avg']['accuracy'] for r in rows])} "
            f"(n={len(rows)}) | {change} |"
        )
    fed_keys = [_key("fedmedclip_paper", "int8", False, s) for s in seeds]
    fed = [runs[k] for k in fed_keys if k in runs]
    lines += ["", "## Time", ""]
    if "encode" in results:
        e = results["encode"]
        lines.append(
            f"- Encoding (once per image, then cached): {e['images']} images in {e['seconds']:.1f} s on {e['device']}, "
            f"{e['images_per_second']:.1f} images/s (JPEG decode, preprocessing, forward)."
        )
    if "timing" in results:
        t = results["timing"]
        phases = ", ".join(f"{k} {v:.3f}" for k, v in t["phase_seconds_per_round"].items())
        lines.append(
            f"- FedMedCLIP, seconds per round after caching ({cfg['hospitals']} hospitals, one process, all "
            f"phases; dedicated {t['rounds']}-round run): {t['seconds_per_round']:.3f} s ({phases})."
        )
    if fed:
        lines.append(
            f"- FedMedCLIP, wall time of one {cfg['rounds']}-round run in the accuracy table: "
            f"{np.mean([r['wall_seconds'] for r in fed]):.1f} s (these runs may have shared the machine)."
        )
    total = sum(r["wall_seconds"] for r in runs.values())
    lines.append(f"- Sum of the wall times of all {len(runs)} runs: {total / 60:.1f} min.")
    if "gpu_encode" in results:
        g = results["gpu_encode"]
        lines.append(
            f"- CUDA encode ({g['device_name']}, torch {g['torch']}, `bench/gpu_encode.py`): "
            f"{g['images_per_second']:.0f} images/s end to end over {g['images']} real images (JPEG decode and "
            f"preprocessing in {g['workers']} workers, batch {g['batch_size']}), "
            f"{g['forward_only_images_per_second']:.0f} "
            f"images/s for the forward pass alone; features match the CPU's (min cosine "
            f"{g.get('min_cosine_vs_cpu', float('nan')):.6f}, "
            f"max abs diff {g.get('max_abs_diff_vs_cpu', float('nan')):.4f} "
            "on features of mean magnitude "
            f"{g.get('feature_scale', float('nan')):.3f})."
        )
    lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, seeds = results["runs"], results["config"]["seeds"]
    labels, means, stds = [], [], []
    for method, _ in METHOD_ROWS:
        rows = [runs[_key(method, "int8", False, s)] for s in seeds if _key(method, "int8", False, s) in runs]
        if rows:
            m, s = _stats([r["avg"]["accuracy"] for r in rows])
            labels.append(method)
            means.append(m)
            stds.append(s)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(labels, means, xerr=stds, color=["tab:red" if m.startswith("fedmedclip") else "tab:blue" for m in labels])
    ax.set(xlabel="AVG test accuracy (%)", title="Brain tumor MRI, 4 hospitals + held-out, mean ± std over seeds")
    ax.set_xlim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
