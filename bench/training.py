"""Local training speed and accuracy, before and after (``make bench-training``): the in-process round of
4 hospitals on the whole brain tumor set, features cached, and the AVG accuracy of the 50-round protocol.

``before`` is the project as it was at ``--before`` (a git revision), run from a temporary worktree of
it with this checkout's virtual environment; ``after`` is this checkout. Both run the default method
(``fedmedclip``), the same seeds, partition and rounds, each with its own defaults (features cached
first: nothing below times encoding). Per-round time is the mean over rounds 2.. of each run; the
accuracy is the paper's AVG at the selected round, mean and std over seeds. Runs alternate (before,
after, before, ...), so the machine's load hits both alike. Writes ``bench/results/training.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "57d5194"  # the last commit before issue 13's speed work
GOAL_S = 0.5
GOAL_POINTS = 0.3


def _simulate(cwd: Path, seed: int, rounds: int, out: Path, data: str, cache: str) -> dict:
    """One run of ``python -m shared.simulation`` from ``cwd`` (that tree's code); its report."""
    cmd = [sys.executable, "-m", "shared.simulation", "--seed", str(seed), "--rounds", str(rounds)]
    cmd += ["--data", data, "--cache-dir", cache, "--out", str(out), "--progress", "false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(cwd))
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE, help="git revision of the 'before' code")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--data", default=None, help="image folder (default: the bundled brain tumor set)")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "features"))
    p.add_argument("--out", default="bench/results/training.md")
    args = p.parse_args(argv)
    from shared.data import default_data_root

    data = str(Path(args.data or default_data_root()).resolve())
    cache = str(Path(args.cache_dir).resolve())
    seeds = [int(s) for s in args.seeds.split(",")]
    reports: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=REPO, check=True)
        try:
            for seed in seeds:
                for which, tree in (("before", worktree), ("after", REPO)):
                    report = _simulate(tree, seed, args.rounds, Path(tmp) / f"{which}-{seed}", data, cache)
                    reports[which].append(report)
                    t = report["timings"]
                    print(
                        f"{which} seed {seed}: {t['seconds_per_round']:.3f} s/round, "
                        f"AVG {report['avg']['accuracy']:.4f}",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=False)
    per_round = {k: statistics.mean(r["timings"]["seconds_per_round"] for r in v) for k, v in reports.items()}
    local = {
        k: statistics.mean(r["timings"]["phase_seconds_per_round"]["local_train"] for r in v)
        for k, v in reports.items()
    }
    avg = {k: [r["avg"]["accuracy"] for r in v] for k, v in reports.items()}
    bal = {k: [r["avg"]["balanced_accuracy"] for r in v] for k, v in reports.items()}
    delta = 100 * (statistics.mean(avg["after"]) - statistics.mean(avg["before"]))
    after_info = reports["after"][0].get("backend", {})
    first = reports["after"][0]["timings"]
    n_images = first["encode_images"] + first["encode_cached"]
    command = "make bench-training" + (f' ARGS="{shlex.join(argv)}"' if argv else "")
    lines = [
        "# Local training: a round of 4 hospitals, before and after",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Backbone: the offline one (EfficientNet-Lite0 + MiniLM), **not CLIP**; "
        f"image tower by {reports['after'][0]['backbone'].get('runtime', 'torch')} after, torch before.",
        "",
        f"Whole brain tumor set ({n_images} images), 4 training hospitals + the held-out one "
        f"(Dirichlet alpha 0.5), method fedmedclip, {args.rounds} rounds, seeds {seeds}, features cached. "
        f"before = `{args.before}` (one loop over the hospitals, torch's default threads); after = this "
        f"checkout ({after_info.get('workers', '?')} hospitals at once, one torch thread each).",
        "",
        "| code | s / round | local training s / round | AVG accuracy (%) | balanced AVG (%) |",
        "|---|---|---|---|---|",
    ]
    for k in ("before", "after"):
        lines.append(f"| {k} | {per_round[k]:.3f} | {local[k]:.3f} | {_mean_std(avg[k])} | {_mean_std(bal[k])} |")
    lines += [
        "",
        f"Speed-up per round: {per_round['before'] / per_round['after']:.2f}x. "
        f"local_train sums the hospitals' training times (threads overlap: after, it exceeds its share of the "
        f"wall time).",
        "",
        f"Goals: a round in at most {GOAL_S} s: {per_round['after']:.3f} s, "
        + ("met" if per_round["after"] <= GOAL_S else "NOT met")
        + f"; AVG within {GOAL_POINTS} points of before: {delta:+.2f} points, "
        + ("met." if abs(delta) <= GOAL_POINTS else "NOT met."),
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
