"""The whole brain tumor protocol from cold: scan, de-duplicate, encode every image (empty feature cache),
partition, 50 rounds, the report and its plots; its wall time beside the reference code's.

Run: ``make bench-protocol`` (``python -m bench.protocol [--device cuda] [--rounds 50]``). Writes
``bench/results/protocol.md`` (``--out`` to change) and the run's own report under ``runs/bench-protocol``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from shared import simulation

# The reference FedMedCLIP code on this machine kind (2 CPU cores), brain tumor protocol: about 249 s per round,
# because it encodes every image again in every round (measured in an earlier session; see issue 13).
REFERENCE_S_PER_ROUND_CPU = 249.0
GOAL_S_CPU = 180.0
GOAL_S_GPU = 30.0


def _machine(device: str) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{cpu}; GPU {torch.cuda.get_device_name(0)}"
    return cpu


def _backbone(record: dict) -> str:
    runtime = record.get("runtime", "torch")
    clip = "" if record.get("is_clip") else "; **not CLIP**"
    return f"{record['spec']['kind']} ({record['description']}), image tower run by {runtime}{clip}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/protocol.md")
    parser.add_argument("--run-dir", default="runs/bench-protocol")
    args = parser.parse_args(argv)
    command = "make bench-protocol" + (f' ARGS="{shlex.join(argv)}"' if argv else "")
    with tempfile.TemporaryDirectory(prefix="fedmedclip-cold-cache-") as cache:
        sim_args = [
            "--rounds",
            str(args.rounds),
            "--seed",
            str(args.seed),
            "--device",
            args.device,
            "--cache-dir",
            cache,  # empty: every image is decoded and encoded
            "--out",
            args.run_dir,
        ]
        start = time.perf_counter()
        code = simulation.main(sim_args)
        wall = time.perf_counter() - start
    if code != 0:
        print(f"the simulation failed (exit {code})", file=sys.stderr)
        return code
    report = json.loads((Path(args.run_dir) / "report.json").read_text())
    t = report["timings"]
    rounds = len(report["history"])
    on_gpu = args.device.startswith("cuda")
    goal = GOAL_S_GPU if on_gpu else GOAL_S_CPU
    reference_total = REFERENCE_S_PER_ROUND_CPU * rounds
    rounds_s = t["rounds_seconds"]
    parts = t["data_seconds"] + t["backbone_seconds"] + t["encode_seconds"] + rounds_s
    lines = [
        "# The whole protocol, from cold",
        "",
        f"Command: `{command}`. Machine: {_machine(args.device)}; Python {platform.python_version()}, "
        f"torch {torch.__version__}. Backbone: {_backbone(report['backbone'])}.",
        "",
        f"Brain tumor set, {t['encode_images']} de-duplicated images encoded from an empty feature cache, "
        f"{sum(not h['held_out'] for h in report['hospitals'])} training hospitals + the held-out one "
        f"(Dirichlet alpha 0.5, seed {args.seed}), method {report['method']}, {rounds} rounds, in one process.",
        "",
        "| part | seconds |",
        "|---|---|",
        f"| scan, de-duplicate and partition the set | {t['data_seconds']:.1f} |",
        f"| load the backbone, encode the class prompts (on a GPU: the device's start too) | "
        f"{t['backbone_seconds']:.1f} |",
        f"| encode {t['encode_images']} images ({t['encode_images_per_second']:.1f} images/s on "
        f"{t['encode_device']}) | {t['encode_seconds']:.1f} |",
        f"| {rounds} rounds ({t['seconds_per_round']:.3f} s per round after the first) | {rounds_s:.1f} |",
        f"| report, plots (the rest) | {max(0.0, wall - parts):.1f} |",
        f"| **whole protocol, wall** | **{wall:.1f}** |",
        "",
        f"Result: AVG accuracy {report['avg']['accuracy']:.4f}, balanced {report['avg']['balanced_accuracy']:.4f} "
        f"(best round {report['best_round']}).",
        "",
        f"The reference code: about {REFERENCE_S_PER_ROUND_CPU:.0f} s per round on this machine kind's CPU, "
        f"{reference_total / 3600:.1f} h for {rounds} rounds; this run: {wall:.1f} s in all, "
        f"{reference_total / wall:.0f} times less"
        + (" (the reference figure is a CPU one; the GPU run is compared with it only as a ratio)" if on_gpu else "")
        + ".",
        "",
        f"Goal: under {goal:.0f} s on {'GPU' if on_gpu else 'this CPU'}: "
        + ("met." if wall < goal else f"NOT met ({wall:.1f} s)."),
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    reference = f"reference code: {REFERENCE_S_PER_ROUND_CPU:.0f} s per round"
    print(f"bench-protocol: {wall:.1f} s from cold to the final report ({reference})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
