"""Frozen image features, computed once and cached on disk.

The encoders never change, so each image is encoded exactly once: every round then trains on the
cached features. The cache is keyed by the backbone's image fingerprint (architecture, weights,
preprocessing) and by each file's content hash, so a second run encodes nothing, a changed file is
encoded again, and another backbone never reads this one's features.

On disk: ``<cache_dir>/<image fingerprint>/features.npz`` holding ``hashes`` (unicode) and
``features`` (float16 [N, D]); no pickle. Several processes may share one cache folder (the demo's
nodes do): a writer merges its new entries into the file as it is on disk now, under an exclusive lock
(``features.npz.lock``), so no process drops another's entries; writes are atomic (temp file, then
rename), so readers take no lock. An encoder saves what it has every ``save_every_s`` and when it is
interrupted, so work done is never lost.

Encoding overlaps reading with the forward pass: threads decode the next batches (PIL and numpy
release the GIL) while the backbone runs the current one, and preprocessing is the backbone's own
transform with its per-pixel tail replaced by a lookup table (:mod:`shared.data.preprocess`,
bit-identical tensors). A transform that cannot be split that way, or ``pipeline="dataloader"``,
takes the former path: a torch DataLoader calling the transform image by image.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from shared.backbone import Backbone
from shared.data import Sample, load_image
from shared.data.errors import DataError
from shared.data.preprocess import ArrayPreprocess

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 120.0  # a merge takes well under a second; a lock held this long is a stuck process
SAVE_EVERY_S = 60.0
PIPELINES = ("auto", "threads", "dataloader")


class FeatureCacheBusyError(DataError):
    """Another process held the feature cache's lock for longer than the timeout."""


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


@dataclass(frozen=True)
class EncodeProgress:
    """Where one :func:`encode_samples` call stands, in distinct images (a file's copies count once)."""

    n_images: int
    n_cached: int  # found in the cache
    n_encoded: int  # encoded so far by this call

    @property
    def n_pending(self) -> int:
        return self.n_images - self.n_cached - self.n_encoded


class _ImageFiles(TorchDataset):
    def __init__(self, samples: Sequence[Sample], preprocess) -> None:
        self.samples = samples
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_image(self.samples[index].path))


class FeatureCache:
    """Content-addressed store of one backbone's image features, safe to share between processes."""

    def __init__(self, cache_dir: Path | str, image_fingerprint: str, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.dir = Path(cache_dir) / image_fingerprint[:32]
        self.path = self.dir / "features.npz"
        self.lock_path = self.dir / "features.npz.lock"
        self.lock_timeout_s = lock_timeout_s

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
        """Add ``entries`` to the cache, keeping every entry already in it (other processes' too)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(self.lock_path, timeout=self.lock_timeout_s):
                merged = self.load()  # as it is now: another process may have added entries since we read it
                merged.update(entries)
                self._write(merged)
        except Timeout as exc:
            raise FeatureCacheBusyError(
                f"feature cache {self.path}: another process held {self.lock_path} for over "
                f"{self.lock_timeout_s:.0f}s (a stuck encoder? a network file system without locks?)"
            ) from exc

    def _write(self, entries: dict[str, np.ndarray]) -> None:
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
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    on_progress: Callable[[EncodeProgress], None] | None = None,
    save_every_s: float = SAVE_EVERY_S,
    pipeline: str = "auto",
) -> tuple[torch.Tensor, EncodeStats]:
    """Features [N, D] float32 for ``samples``, in order, encoding only what the cache lacks.

    ``progress`` shows a progress bar; ``on_progress`` is called once the cache is read and after every
    batch (a node feeds its metrics from it). The cache is read here, as late as possible, so entries
    that other processes saved meanwhile are used.

    ``pipeline``: ``threads`` (what ``auto`` picks when the transform allows it) reads images in
    ``num_workers`` threads (default: :func:`default_read_threads`; 0 reads in the calling thread);
    ``dataloader`` is the former path, a DataLoader with
    ``num_workers`` processes (default up to 2) applying the transform image by image.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}")
    cache = FeatureCache(cache_dir, backbone.image_fingerprint()) if cache_dir is not None else None
    entries = cache.load() if cache else {}
    distinct: dict[str, Sample] = {}  # one sample per content
    for sample in samples:
        distinct.setdefault(sample.sha256, sample)
    todo = [s for h, s in distinct.items() if h not in entries]
    n_found = len(distinct) - len(todo)
    if on_progress is not None:
        on_progress(EncodeProgress(len(distinct), n_found, 0))
    start = time.perf_counter()
    if todo:
        fast = ArrayPreprocess.from_transform(backbone.preprocess) if pipeline != "dataloader" else None
        if fast is None:
            if pipeline == "threads":
                raise ValueError(f"pipeline threads: cannot split the transform {backbone.preprocess!r}")
            batches = _dataloader_batches(backbone, todo, batch_size, num_workers)
        else:
            batches = _threaded_batches(backbone, fast, todo, batch_size, num_workers)
        done = 0
        unsaved: dict[str, np.ndarray] = {}
        last_save = time.monotonic()
        bar = tqdm(
            total=len(todo),
            desc=f"encoding images ({backbone.device.type}, {backbone.runtime})",
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for batch in batches:
                feats = _encode_batch(backbone, batch).astype(np.float16)
                for row, sample in zip(feats, todo[done : done + len(feats)]):
                    entries[sample.sha256] = unsaved[sample.sha256] = row
                done += len(feats)
                bar.update(len(feats))
                if on_progress is not None:
                    on_progress(EncodeProgress(len(distinct), n_found, done))
                if cache and time.monotonic() - last_save >= save_every_s:
                    to_save, unsaved = unsaved, {}
                    cache.save(to_save)  # a crash loses a minute at most; other processes see these now
                    last_save = time.monotonic()
        finally:
            batches.close()  # stops the readers
            bar.close()
            if cache and unsaved:
                cache.save(unsaved)  # also when interrupted: the images encoded so far stay encoded
    seconds = time.perf_counter() - start
    encoded = {s.sha256 for s in todo}
    features = (
        torch.from_numpy(np.stack([entries[s.sha256] for s in samples]).astype(np.float32))
        if samples
        else torch.zeros((0, 0))
    )
    stats = EncodeStats(
        n_images=len(samples),
        n_cached=len(samples) - sum(1 for s in samples if s.sha256 in encoded),
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


def _encode_batch(backbone: Backbone, batch: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(batch, np.ndarray):
        return backbone.encode_arrays(batch)
    return backbone.encode_images(batch).numpy()


def _dataloader_batches(
    backbone: Backbone, todo: Sequence[Sample], batch_size: int, num_workers: int | None
) -> Iterator[torch.Tensor]:
    """The former path: worker processes apply the transform image by image, torch collates."""
    workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    loader = DataLoader(
        _ImageFiles(todo, backbone.preprocess),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=backbone.device.type == "cuda",
    )
    yield from loader


def default_read_threads(backbone: Backbone) -> int:
    """Threads reading images beside the forward pass, by default: up to 8 on a GPU; on a CPU one for the
    torch runtime, none for ONNX Runtime (each batch is then read in the calling thread between forward passes).

    ONNX Runtime splits every operator over all the cores, so a reader thread beside it competes with its
    threads; on 2 cores reading each batch between forward passes measured faster (94 % of the forward-only
    rate against 89 %; bench/results/encode.md measures both placements for both runtimes)."""
    if backbone.device.type != "cpu":
        return min(8, os.cpu_count() or 1)
    return 0 if backbone.runtime == "onnxruntime" else 1


def _threaded_batches(
    backbone: Backbone, fast: ArrayPreprocess, todo: Sequence[Sample], batch_size: int, num_workers: int | None
) -> Iterator[np.ndarray]:
    """float32 batches in order, read by ``num_workers`` threads a few batches ahead of the forward pass."""
    chunks = [[s.path for s in todo[i : i + batch_size]] for i in range(0, len(todo), batch_size)]
    if num_workers is None:
        num_workers = default_read_threads(backbone)
    if num_workers <= 0:
        for paths in chunks:
            yield fast(paths)
        return
    ahead = num_workers + 1  # batches read or being read while the backbone runs one
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="encode-read") as pool:
        pending: list[Future] = []
        try:
            for paths in chunks:
                pending.append(pool.submit(fast, paths))
                if len(pending) > ahead:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()
