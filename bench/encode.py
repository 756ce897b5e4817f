"""Encoding speed on this CPU: decode, preprocessing and forward pass apart, then end to end (``make bench-encode``).

Three configurations of the offline default backbone encode the same real brain tumor images:

* ``before``: the former path, kept here as it was: eager PyTorch (NCHW), a torch DataLoader with
  2 worker processes calling the torchvision transform image by image, batches of 64;
* ``torch``: eager PyTorch (channels-last) in the new pipeline (:func:`shared.data.features.encode_samples`:
  a reader thread, the transform's per-pixel tail as a lookup table);
* ``onnxruntime``: the same pipeline, the image tower in ONNX Runtime (the default on a CPU).

Each trial measures, back to back, the forward pass alone (preprocessed batches in memory) and then
end to end (files on disk to features, nothing cached); trials alternate between configurations and
the table gives medians, so a neighbour's load on the shared cores hits every figure alike. The ratio
end to end / forward-only is taken within each trial. Then the whole de-duplicated set is encoded
cold by each new runtime and compared with eager PyTorch's features: the feature cache's (float16,
when its fingerprint is the eager tower's) or computed here. Writes ``bench/results/encode.md``.
Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from shared.backbone import Backbone, BackboneSpec, load_backbone, runtime_version
from shared.data import deduplicate, default_data_root, load_image, scan_image_folder
from shared.data.features import FeatureCache, _ImageFiles, default_read_threads, encode_samples
from shared.data.images import decode_image
from shared.data.preprocess import ArrayPreprocess
from shared.data.records import Sample

GOAL_RATIO = 0.90  # end to end at least 90 % of the forward-only rate (issue 13)
GOAL_COSINE = 0.9999
NEW_RUNTIMES = ("torch", "onnxruntime")
STAGE_REPEATS = 3
T = TypeVar("T")
READERS = (1, 0)  # reader threads beside the forward pass; 0: read in the calling thread


def _rate(n: int, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


# ---------------------------------------------------------------- the former path, as it was


def _before_forward(backbone: Backbone, batches: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in batches:
            backbone.model.encode_image(batch).float().numpy()


def _before_end_to_end(backbone: Backbone, samples: Sequence[Sample]) -> np.ndarray:
    workers = min(2, os.cpu_count() or 1)
    loader = DataLoader(_ImageFiles(samples, backbone.preprocess), batch_size=64, num_workers=workers)
    out = []
    with torch.no_grad():
        for batch in loader:
            out.append(backbone.model.encode_image(batch).float().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- measurements


def _best_of(fn: Callable[[], T], repeats: int = STAGE_REPEATS) -> tuple[float, T]:
    """The shortest of ``repeats`` timed calls (the first one also pays for fresh memory), and its result."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result  # type: ignore[return-value]


def profile_stages(backbones: dict[str, Backbone], samples: Sequence[Sample], batch_size: int) -> list[tuple]:
    """Per-image cost of each stage, one after the other in this thread (ms / image); decoding and
    preprocessing: the best of :data:`STAGE_REPEATS` passes over the images."""
    fast = ArrayPreprocess.from_transform(backbones["onnxruntime"].preprocess)
    transform = backbones["onnxruntime"].preprocess
    paths = [s.path for s in samples]
    n = len(paths)
    rows = []

    def new_preprocess() -> list[np.ndarray]:
        arrays = []
        for img in grays:
            for step in fast.pil_stage:
                img = step(img)
            arrays.append(np.asarray(img))
        # in batches of the pipeline's size, as it fills them
        return [fast.batch(arrays[i : i + batch_size]) for i in range(0, n, batch_size)]

    seconds, images = _best_of(lambda: [load_image(p) for p in paths])
    rows.append(("decode to RGB (PIL, former)", seconds / n))
    seconds, grays = _best_of(lambda: [decode_image(p, keep_gray=True) for p in paths])
    rows.append(("decode, grayscale kept (PIL, new)", seconds / n))
    seconds, tensors = _best_of(lambda: [transform(img) for img in images])
    rows.append(("preprocess: torchvision transform per image (former)", seconds / n))
    seconds, filled = _best_of(new_preprocess)
    rows.append((f"preprocess: PIL resize/crop + lookup table, batches of {batch_size} (new)", seconds / n))
    batch = np.concatenate(filled)
    if not np.array_equal(batch, torch.stack(tensors).numpy()):
        raise SystemExit("the lookup-table preprocessing differs from the torchvision transform")
    chunks = [batch[i : i + batch_size] for i in range(0, n, batch_size)]
    before = backbones["before"]
    before_chunks = [torch.from_numpy(c) for c in chunks]
    _before_forward(before, before_chunks[:1])
    start = time.perf_counter()
    _before_forward(before, before_chunks)
    rows.append(("forward: eager PyTorch, NCHW (former)", (time.perf_counter() - start) / n))
    for name in NEW_RUNTIMES:
        backbone = backbones[name]
        backbone.encode_arrays(chunks[0])
        start = time.perf_counter()
        for c in chunks:
            backbone.encode_arrays(c)
        rows.append((f"forward: {name}", (time.perf_counter() - start) / n))
    return [(label, seconds * 1000.0) for label, seconds in rows]


def _config(runtime: str, readers: int) -> str:
    return f"{runtime}, {readers} reader thread{'s' if readers != 1 else ''}"


def throughput(
    backbones: dict[str, Backbone], samples: Sequence[Sample], batch_size: int, trials: int
) -> dict[str, dict[str, list[float]]]:
    """Forward-only and end-to-end images/s per configuration, trials interleaved: the former path, and each
    new runtime with images read by one thread beside the forward pass, or read in the calling thread between
    batches (0 reader threads). A runtime's forward rate is measured once per trial for both."""
    fast = ArrayPreprocess.from_transform(backbones["onnxruntime"].preprocess)
    n = len(samples)
    arrays = fast([s.path for s in samples])
    before_batches = [torch.from_numpy(arrays[i : i + 64]) for i in range(0, n, 64)]
    new_batches = [arrays[i : i + batch_size] for i in range(0, n, batch_size)]
    results: dict[str, dict[str, list[float]]] = {"before": {"forward": [], "end_to_end": []}}
    for name in NEW_RUNTIMES:
        for readers in READERS:
            results[_config(name, readers)] = {"forward": [], "end_to_end": []}
    _before_forward(backbones["before"], before_batches[:1])  # warm-up
    for name in NEW_RUNTIMES:
        backbones[name].encode_arrays(new_batches[0])

    def record(trial: int, key: str, fwd: float, e2e: float) -> None:
        results[key]["forward"].append(fwd)
        results[key]["end_to_end"].append(e2e)
        print(f"trial {trial + 1}/{trials} {key}: forward {fwd:.1f} img/s, end to end {e2e:.1f} img/s", file=sys.stderr)

    for trial in range(trials):
        bb = backbones["before"]
        fwd = _rate(n, lambda bb=bb: _before_forward(bb, before_batches))
        record(trial, "before", fwd, _rate(n, lambda bb=bb: _before_end_to_end(bb, samples)))
        for name in NEW_RUNTIMES:
            bb = backbones[name]
            fwd = _rate(n, lambda bb=bb: [bb.encode_arrays(b) for b in new_batches])
            for readers in READERS:
                e2e = _rate(
                    n,
                    lambda bb=bb, readers=readers: encode_samples(
                        bb, samples, None, batch_size=batch_size, progress=False, num_workers=readers
                    ),
                )
                record(trial, _config(name, readers), fwd, e2e)
    return results


def cosines(reference: np.ndarray, features: np.ndarray) -> np.ndarray:
    a = reference.astype(np.float64)
    b = features.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def full_set(
    backbones: dict[str, Backbone], samples: Sequence[Sample], reference_cache: Path | None, batch_size: int
) -> tuple[str, dict[str, dict[str, float]]]:
    """Encode the whole set cold with each new runtime; cosine against eager PyTorch's features."""
    eager = backbones["before"]
    reference = None
    source = ""
    if reference_cache is not None:
        entries = FeatureCache(reference_cache, eager.image_fingerprint()).load()
        if all(s.sha256 in entries for s in samples):
            reference = np.stack([entries[s.sha256] for s in samples]).astype(np.float32)
            source = (
                f"the feature cache {reference_cache} (eager PyTorch, fingerprint "
                f"{eager.image_fingerprint()[:12]}, stored as float16)"
            )
    if reference is None:
        print("computing the eager PyTorch reference (no complete cache)", file=sys.stderr, flush=True)
        reference = _before_end_to_end(eager, samples)
        source = "eager PyTorch (NCHW, float32) computed by this run"
    out = {}
    for name in NEW_RUNTIMES:
        start = time.perf_counter()
        feats, _ = encode_samples(backbones[name], samples, None, batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - start
        cos = cosines(reference, feats.numpy())
        out[name] = {"min": float(cos.min()), "mean": float(cos.mean()), "seconds": seconds, "n": len(samples)}
        print(f"full set {name}: {len(samples)} images in {seconds:.1f}s, min cosine {cos.min():.7f}", file=sys.stderr)
    return source, out


# ---------------------------------------------------------------- report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write_report(
    out: Path,
    command: str,
    args: argparse.Namespace,
    stages: list[tuple],
    rates: dict[str, dict[str, list[float]]],
    defaults: dict[str, int],
    full: tuple[str, dict[str, dict[str, float]]] | None,
    n_set: int,
    loads: tuple[str, str],
    seconds: float,
) -> str:
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in rates.items()}
    ratio = {
        k: statistics.median(e / f for f, e in zip(r["forward"], r["end_to_end"], strict=True))
        for k, r in rates.items()
    }
    lines = [
        "# Encoding speed on the CPU (issue 13)",
        "",
        f"Command: `{command}` ({seconds:.0f} s). Machine: {_cpu_name()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}, {runtime_version('torch')}, "
        f"{runtime_version('onnxruntime')}. Load average at start {loads[0]}, at the end {loads[1]} "
        "(the 2 cores are shared with other work: compare figures of one run, not across runs).",
        "",
        f"Timing set: {args.images} de-duplicated brain tumor images (every k-th of the sorted set), "
        f"{args.trials} interleaved trials, medians. New pipeline batches of {args.batch_size}; the former "
        "path's of 64.",
        "",
        "## Stages, one after the other in one thread",
        "",
        f"Decoding and preprocessing: the best of {STAGE_REPEATS} passes over {min(args.images, 256)} images (a first "
        "pass also pays for memory the process never touched); forward passes: one pass after a warm-up batch.",
        "",
        "| stage | ms / image |",
        "|---|---|",
        *[f"| {label} | {ms:.2f} |" for label, ms in stages],
        "",
        "## Throughput",
        "",
        "| configuration | forward only, img/s | end to end, img/s | end to end / forward | goal >= 90 % |",
        "|---|---|---|---|---|",
    ]
    default = {name: _config(name, readers) for name, readers in defaults.items()}

    def label(key: str) -> str:
        if key == "before":
            return "before: eager PyTorch NCHW, DataLoader (2 processes), transform per image"
        runtime = key.split(",")[0]
        mark = " (the default on a CPU)" if default[runtime] == key else ""
        return f"after, runtime {key}{mark}: lookup-table preprocessing" + (
            ", channels-last" if runtime == "torch" else ""
        )

    for name in rates:
        met = "met" if ratio[name] >= GOAL_RATIO else "NOT met"
        lines.append(
            f"| {label(name)} | {med[name]['forward']:.1f} | {med[name]['end_to_end']:.1f} | "
            f"{ratio[name] * 100:.0f} % | {met} |"
        )
    chosen = default["onnxruntime"]
    speedup = med[chosen]["end_to_end"] / med["before"]["end_to_end"]
    lines += [
        "",
        f"End to end, the default on a CPU ({chosen}) / before: {speedup:.1f}x "
        f"({med['before']['end_to_end']:.1f} -> {med[chosen]['end_to_end']:.1f} img/s). Reader threads: one "
        "thread reads and preprocesses the next batches while the forward pass runs; 0 reads each batch in the "
        "calling thread between forward passes.",
        "",
        "Per trial (forward / end to end, img/s): "
        + "; ".join(
            f"{name} " + ", ".join(f"{f:.0f}/{e:.0f}" for f, e in zip(r["forward"], r["end_to_end"], strict=True))
            for name, r in rates.items()
        ),
    ]
    if full is not None:
        source, per_runtime = full
        lines += [
            "",
            f"## The whole de-duplicated set ({n_set} images), encoded cold, against eager PyTorch",
            "",
            f"Reference: {source}.",
            "",
            "| runtime | min cosine | mean cosine | goal min >= 0.9999 | encode time, s | img/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in per_runtime.items():
            met = "met" if r["min"] >= GOAL_COSINE else "NOT met"
            lines.append(
                f"| {name} | {r['min']:.7f} | {r['mean']:.7f} | {met} | {r['seconds']:.1f} | "
                f"{r['n'] / r['seconds']:.1f} |"
            )
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="image folder (default: the brain tumor MRI set)")
    p.add_argument("--images", type=int, default=384, help="images in the timing set")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="the new pipeline's batch size")
    p.add_argument("--reference-cache", default=".cache/features", help="feature cache holding eager PyTorch's")
    p.add_argument("--runtime-cache", default=None, help="exported towers (default .cache/runtime)")
    p.add_argument("--no-full-set", action="store_true", help="skip the whole-set cosine check")
    p.add_argument("--out", default="bench/results/encode.md")
    args = p.parse_args(argv)
    command = " ".join([".venv/bin/python -m bench.encode", *(sys.argv[1:] if argv is None else argv)])
    began = time.perf_counter()
    load_start = _load()

    root = Path(args.data) if args.data else default_data_root()
    dataset, _ = deduplicate(scan_image_folder(root))
    samples = list(dataset.samples)
    step = max(1, len(samples) // args.images)
    timing = samples[::step][: args.images]

    backbones = {
        "before": load_backbone(BackboneSpec(runtime="torch"), "cpu"),
        "torch": load_backbone(BackboneSpec(runtime="torch"), "cpu"),
        "onnxruntime": load_backbone(BackboneSpec(runtime="onnxruntime"), "cpu", runtime_cache=args.runtime_cache),
    }
    backbones["before"].model.visual.to(memory_format=torch.contiguous_format)  # as it was: NCHW

    stages = profile_stages(backbones, timing[: min(len(timing), 256)], args.batch_size)
    rates = throughput(backbones, timing, args.batch_size, args.trials)
    full = None
    if not args.no_full_set:
        reference = Path(args.reference_cache) if args.reference_cache else None
        full = full_set(backbones, samples, reference, args.batch_size)
    text = write_report(
        Path(args.out),
        command,
        args,
        stages,
        rates,
        {name: default_read_threads(backbones[name]) for name in NEW_RUNTIMES},
        full,
        len(samples),
        (load_start, _load()),
        time.perf_counter() - began,
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
