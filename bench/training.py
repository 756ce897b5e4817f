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


#: (label, runs the "before" tree, extra arguments of ``shared.simulation``): each runs every seed
VARIANTS = (
    ("before", True, []),
    ("after: threads (default)", False, []),
    ("after: threads, compile", False, ["--compile", "true"]),
    ("after: processes", False, ["--backend", "processes"]),
    ("after: processes, compile", False, ["--backend", "processes", "--compile", "true"]),
)


def _simulate(cwd: Path, seed: int, rounds: int, out: Path, data: str, cache: str, extra: list[str]) -> dict:
    """One run of ``python -m shared.simulation`` from ``cwd`` (that tree's code); its report."""
    cmd = [sys.executable, "-m", "shared.simulation", "--seed", str(seed), "--rounds", str(rounds)]
    cmd += ["--data", data, "--cache-dir", cache, "--out", str(out), "--progress", "false", *extra]
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
    reports: dict[str, list[dict]] = {label: [] for label, _, _ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=REPO, check=True)
        try:
            for seed in seeds:  # variants alternate within a seed: the machine's load hits them alike
                for k, (label, before, extra) in enumerate(VARIANTS):
                    tree = worktree if before else REPO
                    report = _simulate(tree, seed, args.rounds, Path(tmp) / f"{k}-{seed}", data, cache, extra)
                    reports[label].append(report)
                    t = report["timings"]
                    print(
                        f"{label} seed {seed}: {t['seconds_per_round']:.3f} s/round, "
                        f"AVG {report['avg']['accuracy']:.4f}, wall {t['wall_seconds']:.1f} s",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=False)

    def mean_of(label: str, key) -> float:  # noqa: ANN001
        return statistics.mean(key(r) for r in reports[label])

    per_round = {k: mean_of(k, lambda r: r["timings"]["seconds_per_round"]) for k in reports}
    local = {k: mean_of(k, lambda r: r["timings"]["phase_seconds_per_round"]["local_train"]) for k in reports}
    validate = {k: mean_of(k, lambda r: r["timings"]["phase_seconds_per_round"]["validate"]) for k in reports}
    wall = {k: mean_of(k, lambda r: r["timings"]["wall_seconds"]) for k in reports}
    avg = {k: [r["avg"]["accuracy"] for r in v] for k, v in reports.items()}
    bal = {k: [r["avg"]["balanced_accuracy"] for r in v] for k, v in reports.items()}
    delta = {k: 100 * (statistics.mean(avg[k]) - statistics.mean(avg["before"])) for k in reports}
    first = reports["before"][0]["timings"]
    n_images = first["encode_images"] + first["encode_cached"]
    command = "make bench-training" + (f' ARGS="{shlex.join(argv)}"' if argv else "")
    default = VARIANTS[1][0]
    best = min((k for k in reports if k != "before"), key=lambda k: per_round[k])
    lines = [
        "# Local training: a round of 4 hospitals, before and after",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Backbone: the offline one (EfficientNet-Lite0 + MiniLM), **not CLIP**; "
        f"image tower by {reports[default][0]['backbone'].get('runtime', 'torch')} after, torch before.",
        "",
        f"Whole brain tumor set ({n_images} images), 4 training hospitals + the held-out one "
        f"(Dirichlet alpha 0.5), method fedmedclip, {args.rounds} rounds, seeds {seeds}, features cached. "
        f"before = `{args.before}` (one loop over the hospitals, torch's default threads). After, this checkout: "
        "threads = `--backend inprocess` (the default: one thread per core, each hospital on one torch thread); "
        "processes = `--backend processes` (one worker process per core, one torch thread each); compile = "
        "`--compile true` (each full batch's forward pass and loss torch.compile'd; off by default).",
        "",
        "| code | s / round | local training s / round | validation s / round | run wall s | AVG accuracy (%) "
        "| balanced AVG (%) | AVG vs before (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in reports:
        lines.append(
            f"| {k} | {per_round[k]:.3f} | {local[k]:.3f} | {validate[k]:.3f} | {wall[k]:.1f} | {_mean_std(avg[k])} "
            f"| {_mean_std(bal[k])} | {delta[k]:+.2f} |"
        )
    lines += [
        "",
        "s / round: mean over rounds 2.. (the first holds the compile, where there is one); run wall: the whole "
        "command, start-up, worker processes and compiling included. local training sums the hospitals' training "
        "times (they overlap on threads and processes, so it exceeds its share of the wall time).",
        "",
        "Speed-up per round against before: "
        + ", ".join(f"{k} {per_round['before'] / per_round[k]:.2f}x" for k in reports if k != "before")
        + ".",
        "",
        f"Goals: a round in at most {GOAL_S} s: fastest {best} {per_round[best]:.3f} s, "
        + ("met" if per_round[best] <= GOAL_S else "NOT met")
        + f" (the default {per_round[default]:.3f} s); AVG within {GOAL_POINTS} points of before: "
        + ", ".join(
            f"{k} {delta[k]:+.2f} ({'met' if abs(delta[k]) <= GOAL_POINTS else 'NOT met'})"
            for k in reports
            if k != "before"
        )
        + ".",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
