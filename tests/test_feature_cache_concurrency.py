"""One feature cache folder shared by several encoding processes (the demo's nodes): nothing is lost."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch

from shared.data import scan_image_folder, subset
from shared.data.features import FeatureCache, encode_samples

PER_CLASS = 8  # 4 classes: 32 real images


def _images(root: Path):
    return subset(scan_image_folder(root / "Training"), PER_CLASS, seed=3).samples


def _encode_part(root: str, cache_dir: str, part: list[int], start, results) -> None:
    """One encoder process: its own backbone, its part of the images, the shared cache folder."""
    from shared.backbone import load_backbone

    torch.set_num_threads(1)
    samples = _images(Path(root))
    backbone = load_backbone(device="cpu")
    start.wait(timeout=300)  # every process reads the (empty) cache at the same moment
    _, stats = encode_samples(backbone, [samples[i] for i in part], cache_dir, num_workers=0, progress=False)
    results.put((tuple(part), stats.n_encoded))


def test_concurrent_encoders_on_one_cache_lose_nothing(backbone, brain_tumor_root, tmp_path):
    samples = _images(brain_tumor_root)
    n = len(samples)
    assert n == 4 * PER_CLASS
    half = n // 2
    parts = [
        list(range(half)),  # disjoint halves ...
        list(range(half, n)),
        list(range(half // 2, half + half // 2)),  # ... and one overlapping both
    ]
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(len(parts)), ctx.Queue()
    cache_dir = tmp_path / "cache"
    procs = [
        ctx.Process(target=_encode_part, args=(str(brain_tumor_root), str(cache_dir), part, start, results))
        for part in parts
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * len(parts)
    encoded = dict(results.get(timeout=5) for _ in parts)
    assert all(encoded[tuple(part)] > 0 for part in parts)  # each process did encode (they raced on an empty cache)

    cached = FeatureCache(cache_dir, backbone.image_fingerprint()).load()
    assert {s.sha256 for s in samples} <= set(cached)
    again, stats = encode_samples(backbone, samples, cache_dir, progress=False)
    assert stats.n_encoded == 0 and stats.n_cached == n
    direct, _ = encode_samples(backbone, samples, None, progress=False)  # each row belongs to its image
    assert torch.allclose(again, direct, atol=1e-3, rtol=1e-3)
