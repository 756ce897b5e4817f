"""`make bench-layouts`: imbalance handling and the two contrastive terms, on Dirichlet and natural sites.

Two layouts of the brain tumor MRI set (de-duplicated):

- ``dirichlet``: the accuracy benchmark's protocol (4 hospitals by Dirichlet alpha 0.5 plus a drawn
  held-out one, 50 rounds); each seed draws its own partition.
- ``natural``: the skewed sites of :mod:`bench.natural_sites` (a large mixed site, one 93 % one class,
  a small one where the rare classes are common; the held-out site is 80 % one class); the sites are
  fixed, each seed draws the splits, the initial adapter and the batch order.

Rows: FedMedCLIP, FedCLIP and local-only, each plain (``fedmedclip_paper``, ``fedclip``, ``local``) and
with logit-adjusted cross-entropy terms (``fedmedclip``, the default since this benchmark; ``fedclip_la``,
``local_la``; :mod:`shared.learning.objective`), and the reference code's in-batch contrastive term
(``ref_batch_contrastive``) against our class-level one (``fedmedclip_paper``) with more seeds. Every figure is
the test metric at the round the run selects (``--select-by``, mean over the training hospitals'
validation splits), mean ± std over seeds; AVG is over every hospital, the held-out one included. The
held-out site's majority-class baseline (always answering its most frequent class) is given beside it.

Finished runs are kept in ``layouts.json`` and skipped when started again. Writes
``bench/results/layouts.md`` and ``layouts.json``. The backbone is the offline one (EfficientNet-Lite0 +
MiniLM), not CLIP.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.natural_sites import DEFAULT_SPEC, build_sites
from shared.backbone import load_backbone
from shared.simulation import SimConfig, prepare, run

RESULTS = Path(__file__).resolve().parent / "results"
IMBALANCE_ROWS = [
    ("fedmedclip_paper", "FedMedCLIP, the paper's objective"),
    ("fedmedclip", "FedMedCLIP + logit adjustment (the default)"),
    ("fedclip", "FedCLIP"),
    ("fedclip_la", "FedCLIP + logit adjustment"),
    ("local", "local MLP only"),
    ("local_la", "local MLP only + logit adjustment"),
]
CONTRASTIVE_ROWS = [
    ("fedmedclip_paper", "class-level contrastive (ours)"),
    ("ref_batch_contrastive", "in-batch contrastive (reference code)"),
]
LAYOUTS = ("dirichlet", "natural")
#: paired comparisons (a minus b) and the seeds they use
PAIRS = [
    ("fedmedclip", "fedmedclip_paper", "imbalance"),
    ("fedmedclip", "fedclip", "imbalance"),
    ("fedmedclip", "local", "imbalance"),
    ("fedmedclip_paper", "fedclip", "imbalance"),
    ("ref_batch_contrastive", "fedmedclip_paper", "contrastive"),
]


def _key(layout: str, method: str, seed: int, select_by: str) -> str:
    return f"{layout}|{method}|seed{seed}|{select_by}"


def _majority(prep, hospital) -> float:
    labels = prep.labels.numpy()[hospital.split.test]
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else math.nan


def _summary(report: dict, prep) -> dict:
    held = [h for h in prep.hospitals if h.held_out]
    return {
        "avg": report["avg"],
        "test": {
            n: {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")} for n, m in report["test"].items()
        },
        "held_out": held[0].name if held else None,
        "held_out_majority": _majority(prep, held[0]) if held else math.nan,
        "best_round": report["best_round"],
        "wall_seconds": report["timings"]["wall_seconds"],
    }


def _jobs(layouts, imbalance_seeds, contrastive_seeds, select_by, methods=None):
    """Natural sites first (small, quick), then Dirichlet's contrastive comparison, then its imbalance rows:
    a benchmark cut short still has the comparisons that matter."""
    jobs = []
    if "natural" in layouts:
        jobs += [("natural", m, s) for s in imbalance_seeds for m, _ in IMBALANCE_ROWS]
        jobs += [("natural", m, s) for s in contrastive_seeds for m, _ in CONTRASTIVE_ROWS]
    if "dirichlet" in layouts:
        jobs += [("dirichlet", m, s) for s in contrastive_seeds for m, _ in CONTRASTIVE_ROWS]
        jobs += [("dirichlet", m, s) for s in imbalance_seeds for m, _ in IMBALANCE_ROWS]
    seen, ordered = set(), []
    for job in jobs:
        if job not in seen and (not methods or job[1] in methods):
            seen.add(job)
            ordered.append(job)
    return [(*j, select_by) for j in ordered]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.layouts", description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--imbalance-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--contrastive-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--select-by", default="accuracy", choices=("accuracy", "balanced_accuracy", "macro_f1"))
    p.add_argument("--methods", nargs="+", default=None, help="only these rows (default: every row)")
    p.add_argument(
        "--sites", default=None, help="a natural-site layout (default: bench.natural_sites' into a temp dir)"
    )
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "layouts.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    runs = results.setdefault("runs", {})
    tmp = None
    sites = args.sites
    if "natural" in args.layouts and sites is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedmedclip-sites-")
        sites = str(Path(tmp.name) / "sites")
        build_sites(sites, seed=0)
    results["natural_spec"] = (
        DEFAULT_SPEC if args.sites is None else json.loads((Path(sites) / "sites.json").read_text())
    )
    backbone = load_backbone()
    base = SimConfig(rounds=args.rounds, cache_dir=args.cache_dir, progress=False, select_by=args.select_by)
    layout_cfg = {
        "dirichlet": dict(n_hospitals=4, alpha=0.5, partition="dirichlet", holdout=True),
        "natural": dict(data_root=sites, partition="natural", holdout="site_d"),
    }
    jobs = _jobs(args.layouts, args.imbalance_seeds, args.contrastive_seeds, args.select_by, args.methods)
    todo = [j for j in jobs if _key(*j) not in runs]
    prepared: dict[tuple[str, int], object] = {}
    t0 = time.perf_counter()
    bar = tqdm(todo, desc="layout runs", unit="run")
    try:
        for layout, method, seed, select_by in bar:
            bar.set_postfix_str(f"{layout} {method} seed {seed}")
            cfg = replace(base, method=method, seed=seed, **layout_cfg[layout])
            if (layout, seed) not in prepared:
                prepared[(layout, seed)] = prepare(cfg, backbone=backbone)
            prep = prepared[(layout, seed)]
            runs[_key(layout, method, seed, select_by)] = _summary(run(cfg, prep), prep)
            store.write_text(json.dumps(results, indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()
    results["config"] = vars(args) | {"sites": None if tmp else sites}
    results["last_invocation_wall_seconds"] = time.perf_counter() - t0
    store.write_text(json.dumps(results, indent=1))
    (out / "layouts.md").write_text(render(results, args.select_by))
    print((out / "layouts.md").read_text())
    return 0


def _stats(values: list[float]) -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "-"
    return f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}" + (f" (n={len(v)})" if len(v) != 3 else "")


def _rows(runs: dict, layout: str, method: str, select_by: str, seeds: list[int]) -> list[dict]:
    return [runs[k] for s in seeds if (k := _key(layout, method, s, select_by)) in runs]


def render(results: dict, select_by: str) -> str:
    runs = results["runs"]
    imbalance_seeds = results["config"]["imbalance_seeds"]
    contrastive_seeds = results["config"]["contrastive_seeds"]
    lines = [
        "# Benchmark: layouts, imbalance and the contrastive term (brain tumor MRI, test metrics in %)",
        "",
        "Backbone: the offline EfficientNet-Lite0 + MiniLM towers, **not CLIP**. Made by `make bench-layouts` "
        f"(`python -m bench.layouts`). Model selection: mean validation {select_by} of the training hospitals; "
        "test metrics at the selected round; mean ± std over seeds (n=3 unless stated).",
        "",
    ]
    spec = results.get("natural_spec") or {}
    if spec:
        lines += ["Natural sites (images per class; `site_d` is held out):", ""]
        classes = sorted({c for counts in spec.values() for c in counts})
        lines += ["| site | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
        for site, counts in spec.items():
            lines.append(
                f"| {site} | " + " | ".join(str(counts.get(c, 0)) for c in classes) + f" | {sum(counts.values())} |"
            )
        lines.append("")
    for layout in LAYOUTS:
        if not any(k.startswith(layout + "|") for k in runs):
            continue
        lines += [f"## {layout}", ""]
        lines += [
            "| method | AVG acc. | AVG balanced acc. | AVG macro-F1 | held-out acc. | held-out balanced acc. | "
            "held-out majority baseline |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, label in IMBALANCE_ROWS:
            rows = _rows(runs, layout, method, select_by, imbalance_seeds)
            if not rows:
                continue
            held = [r["test"][r["held_out"]] for r in rows if r["held_out"] in r["test"]]
            lines.append(
                f"| {label} | {_stats([r['avg']['accuracy'] for r in rows])} | "
                f"{_stats([r['avg']['balanced_accuracy'] for r in rows])} | "
                f"{_stats([r['avg']['macro_f1'] for r in rows])} | {_stats([h['accuracy'] for h in held])} | "
                f"{_stats([h['balanced_accuracy'] for h in held])} | "
                f"{_stats([r['held_out_majority'] for r in rows])} |"
            )
        contrastive = [(label, _rows(runs, layout, m, select_by, contrastive_seeds)) for m, label in CONTRASTIVE_ROWS]
        if all(rows for _, rows in contrastive):
            lines += ["", f"Contrastive term ({layout}, seeds {contrastive_seeds} for both):", ""]
            lines += ["| contrastive term | AVG acc. | AVG balanced acc. | AVG macro-F1 |", "|---|---|---|---|"]
        for label, rows in contrastive:
            if rows and all(r for _, r in contrastive):
                lines.append(
                    f"| {label} | {_stats([r['avg']['accuracy'] for r in rows])} | "
                    f"{_stats([r['avg']['balanced_accuracy'] for r in rows])} | "
                    f"{_stats([r['avg']['macro_f1'] for r in rows])} |"
                )
        lines.append("")
    lines += ["## Paired by seed (same partition, splits and initialisation), AVG in points", ""]
    lines += ["| layout | comparison | accuracy, per seed | balanced accuracy, per seed |", "|---|---|---|---|"]
    for layout in LAYOUTS:
        for a, b, seeds in PAIRS:
            seeds = imbalance_seeds if seeds == "imbalance" else contrastive_seeds
            pairs = [(runs.get(_key(layout, a, s, select_by)), runs.get(_key(layout, b, s, select_by))) for s in seeds]
            pairs = [(x, y) for x, y in pairs if x and y]
            if pairs:
                cells = [
                    ", ".join(f"{100 * (x['avg'][m] - y['avg'][m]):+.2f}" for x, y in pairs)
                    for m in ("accuracy", "balanced_accuracy")
                ]
                lines.append(f"| {layout} | {a} minus {b} | {cells[0]} | {cells[1]} |")
    lines.append("")
    total = sum(r["wall_seconds"] for r in runs.values())
    lines.append(f"Sum of the wall times of the {len(runs)} runs: {total / 60:.1f} min (a shared 2-core machine).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
