"""Per-round wall time over gRPC against in-process, and bytes per round by codec (``make bench-rounds``).

The same federation (4 training hospitals + the held-out one, same seed and partition) runs
in-process (:mod:`shared.simulation`) and as real processes over gRPC on loopback
(:mod:`deploy.local_federation`). Both after caching: the features are encoded before timing.
Writes ``bench/results/rounds.md``. Not part of ``make test``.

Round time, in-process: one loop over the hospitals (train, encode, fold) + publish + validation.
Round time, gRPC: the aggregator's ``fedmedclip_round_duration_seconds`` (round open to global
published), which covers every node's fetch, evaluation of the previous global, training, encode
and upload, the nodes running as parallel processes.
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from deploy.local_federation import run_federation
from shared.codec import CODECS
from shared.learning.rounds import WireConfig
from shared.simulation import SimConfig, prepare, run

log = logging.getLogger("fedmedclip.bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rounds", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--per-class",
        type=int,
        default=0,
        help="stratified subset per class (0, the default: the whole set, the protocol's data; a small subset "
        "shows the per-round fixed costs instead: --per-class 150 gives 600 images)",
    )
    p.add_argument("--hospitals", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--grpc-codec", default="int8")
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--out", default="bench/results/rounds.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # like each node process (the in-process run gives each hospital one thread as well)
    per_class = args.per_class or None
    base = SimConfig(
        per_class=per_class, n_hospitals=args.hospitals, rounds=args.rounds, cache_dir=args.cache_dir, progress=False
    )
    prepared = prepare(base)  # encodes what the cache lacks: nothing below is timed with encoding
    rows = {}
    for codec in args.codecs.split(","):
        t0 = time.perf_counter()
        report = run(replace(base, wire=WireConfig(codec=codec)), prepared)
        rows[codec] = report
        print(
            f"in-process {codec}: {report['timings']['seconds_per_round']:.3f} s/round "
            f"({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="bench-rounds-") as tmp:
        grpc_report = run_federation(
            Path(tmp),
            hospitals=args.hospitals,
            rounds=args.rounds,
            per_class=per_class,
            codec=args.grpc_codec,
            cache_dir=args.cache_dir,
            quiet=True,
            threads=1,
        )
    inproc = rows[args.grpc_codec]
    again = run(replace(base, wire=WireConfig(codec=args.grpc_codec)), prepared)  # after, too: the CPU is shared
    t_in = min(inproc["timings"]["seconds_per_round"], again["timings"]["seconds_per_round"])
    t_grpc = grpc_report["seconds_per_round"]
    print(f"gRPC {args.grpc_codec}: {t_grpc:.3f} s/round", flush=True)
    n = len(prepared.labels)
    lines = [
        "# Rounds: gRPC against in-process, and bytes per round by codec",
        "",
        "Made by `make bench-rounds`" + (f' ARGS="{" ".join(argv)}"' if argv else "") + ".",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{__import__('os').cpu_count()} cores; Python {platform.python_version()}. "
        f"Data: {n} de-duplicated brain tumor images ({per_class or 'all'} per class), {args.hospitals} training "
        f"hospitals + the held-out one, Dirichlet alpha 0.5, seed 0, {args.rounds} rounds, features cached. "
        "Round times are means over rounds 2.. (the first round warms up); the in-process figure is the "
        "better of a run before and one after the gRPC run (the machine's 2 cores are shared).",
        "",
        "## Wall time per round",
        "",
        "| run | codec | s / round | phases (in-process, s / round) |",
        "|---|---|---|---|",
    ]
    phases = inproc["timings"]["phase_seconds_per_round"]
    lines.append(
        f"| in-process (one process, hospitals on {inproc['backend']['workers']} threads, one torch thread each) | "
        f"{args.grpc_codec} | {t_in:.3f} | " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()) + " |"
    )
    lines.append(
        f"| gRPC, aggregator + {args.hospitals + 1} node processes on loopback (1 thread each) | "
        f"{args.grpc_codec} | {t_grpc:.3f} | - |"
    )
    overhead = t_grpc / t_in - 1 if t_in > 0 else float("nan")
    lines += [
        "",
        f"gRPC / in-process: {t_grpc / t_in:.2f}x ({overhead:+.0%}); goal: at most +10 %, "
        f"and a round within 1 s: {'met' if t_grpc <= 1.0 else 'NOT met'} for the round time, "
        f"{'met' if overhead <= 0.10 else 'NOT met'} for the overhead.",
        f"Same result: best round {grpc_report.get('best_round')} vs {inproc['best_round']}, "
        f"AVG accuracy {grpc_report.get('avg', {}).get('accuracy', float('nan')):.4f} vs "
        f"{inproc['avg']['accuracy']:.4f}.",
        "",
        "## Bytes per round by codec (in-process; the gRPC run sends the same payloads)",
        "",
        "| codec | up / round KB | down / round KB | per transfer KB | raw fp32 per transfer KB | raw / wire "
        "| AVG acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for codec, rep in rows.items():
        b = rep["bytes_per_round"]
        per = b["per_transfer"]
        raw = b["up_raw"] / args.hospitals
        lines.append(
            f"| {codec} | {b['up'] / 1e3:.1f} | {b['down'] / 1e3:.1f} | {per / 1e3:.1f} | {raw / 1e3:.1f} | "
            f"{raw / per:.2f} | {rep['avg']['accuracy']:.4f} |"
        )
    g = grpc_report["bytes_per_round"]
    lines += [
        "",
        f"gRPC ({args.grpc_codec}), from the aggregator's accounting: up {g['bytes_up'] / 1e3:.1f} KB, "
        f"down {g['bytes_down'] / 1e3:.1f} KB per round.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
