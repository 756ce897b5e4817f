"""Frozen image features, computed once and cached on disk.

The encoders never change, so each image is encoded exactly once: every round then trains on the
cached features. The cache is keyed by the backbone's image fingerprint (architecture, weights,
preprocessing) and by each file's content hash, so a second run encodes nothing, a changed file is
encoded again, and another backbone never reads this one's features.

On disk: ``<cache_dir>/<image fingerprint>/features.npz`` holding ``hashes`` (unicode) and
``features`` (float16 [N, D]); no pickle. Writes are atomic (temp file, then rename).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from shared.backbone import Backbone
from shared.data import Sample, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeStats:
    n_images: int
    n_cached: int
    n_encoded: int
    seconds: float
    device: str

    @property
    def images_per_second(self) -> float:
        return self.n_encoded / self.seconds if self.n_encoded and self.seconds > 0 else 0.0


class _ImageFiles(TorchDataset):
    def __init__(self, samples: Sequence[Sample], preprocess) -> None:
        self.samples = samples
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_image(self.samples[index].path))


class FeatureCache:
    """Content-addressed store of one backbone's image features."""

    def __init__(self, cache_dir: Path | str, image_fingerprint: str) -> None:
        self.dir = Path(cache_dir) / image_fingerprint[:32]
        self.path = self.dir / "features.npz"

    def load(self) -> dict[str, np.ndarray]:
        if not self.path.exists():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as data:
                hashes, feats = data["hashes"], data["features"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("feature cache %s unreadable (%s): it will be rebuilt", self.path, exc)
            return {}
        return {str(h): feats[i] for i, h in enumerate(hashes)}

    def save(self, entries: dict[str, np.ndarray]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        hashes = np.array(sorted(entries))
        feats = (
            np.stack([entries[h] for h in hashes]).astype(np.float16) if len(hashes) else np.zeros((0, 0), np.float16)
        )
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, hashes=hashes, features=feats)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def encode_samples(
    backbone: Backbone,
    samples: Sequence[Sample],
    cache_dir: Path | str | None,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, EncodeStats]:
    """Features [N, D] float32 for ``samples``, in order, encoding only what the cache lacks."""
    cache = FeatureCache(cache_dir, backbone.image_fingerprint()) if cache_dir is not None else None
    entries = cache.load() if cache else {}
    todo_hashes: dict[str, Sample] = {}
    for sample in samples:
        if sample.sha256 not in entries and sample.sha256 not in todo_hashes:
            todo_hashes[sample.sha256] = sample
    todo = list(todo_hashes.values())
    start = time.perf_counter()
    if todo:
        workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
        loader = DataLoader(
            _ImageFiles(todo, backbone.preprocess),
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=backbone.device.type == "cuda",
        )
        done = 0
        bar = tqdm(
            total=len(todo),
            desc=f"encoding images ({backbone.device.type})",
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for batch in loader:
                feats = backbone.encode_images(batch).numpy().astype(np.float16)
                for row, sample in zip(feats, todo[done : done + len(feats)]):
                    entries[sample.sha256] = row
                done += len(feats)
                bar.update(len(feats))
        finally:
            bar.close()
        if cache:
            cache.save(entries)
    seconds = time.perf_counter() - start
    features = (
        torch.from_numpy(np.stack([entries[s.sha256] for s in samples]).astype(np.float32))
        if samples
        else torch.zeros((0, 0))
    )
    stats = EncodeStats(
        n_images=len(samples),
        n_cached=len(samples) - sum(1 for s in samples if s.sha256 in todo_hashes),
        n_encoded=len(todo),
        seconds=seconds,
        device=backbone.device.type,
    )
    log.info(
        "features: %d images, %d from cache, %d encoded in %.1fs",
        stats.n_images,
        stats.n_cached,
        stats.n_encoded,
        seconds,
    )
    return features, stats
