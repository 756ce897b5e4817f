"""Splits and federated partitions: 60/20/20 splits, Dirichlet or iid hospitals, stratified subsets."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from shared.data.errors import DataConfigError, DataError, EmptyDatasetError
from shared.data.records import Dataset, HospitalData, Split, frozen_indices

logger = logging.getLogger(__name__)


def _as_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataConfigError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataConfigError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``n`` that are each within 1 of ``n * fraction``."""
    exact = [n * f for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_indices(
    labels: np.ndarray | Sequence[int],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> Split:
    """Seeded, per-class stratified train/val/test split of positions ``0..len(labels)-1``.

    Each class is shuffled and cut with largest-remainder rounding, so every
    part gets its fraction of every class to within one sample and class
    balance is the same in train, val and test.
    """
    y = _as_labels(labels)
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 or not np.isfinite(f) for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataConfigError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        bounds = np.cumsum(_largest_remainder(len(members), fr))
        for part, chunk in zip(parts, np.split(members, bounds[:-1])):
            part.append(chunk)
    train, val, test = (np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts)
    return Split(train, val, test)


def dirichlet_partition(
    labels: np.ndarray | Sequence[int],
    n_parts: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed partition of positions ``0..len(labels)-1`` into ``n_parts`` parts.

    The usual non-IID benchmark recipe (Hsu et al. 2019; NIID-Bench): for each
    class, draw part proportions from ``Dir(alpha)`` and cut that class's
    shuffled samples accordingly; a part already holding its fair share
    (``N / n_parts``) gets no more, which keeps sizes reasonable. Draws are
    repeated until every part holds at least ``min_size`` samples. Small
    ``alpha`` means each part is dominated by few classes; large ``alpha``
    approaches IID. Deterministic for a given seed.
    """
    y = _as_labels(labels)
    n = len(y)
    if n_parts < 1:
        raise DataConfigError(f"n_parts must be >= 1, got {n_parts}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataConfigError(f"alpha must be a positive number, got {alpha}")
    if min_size < 0:
        raise DataConfigError(f"min_size must be >= 0, got {min_size}")
    if n_parts * min_size > n:
        raise DataConfigError(f"cannot give {n_parts} parts at least {min_size} samples each from {n} samples")
    if n_parts == 1:
        return [frozen_indices(np.arange(n))]

    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for attempt in range(1, max_tries + 1):
        parts: list[list[int]] = [[] for _ in range(n_parts)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(y == cls))
            props = rng.dirichlet(np.full(n_parts, alpha))
            open_parts = np.array([len(p) < n / n_parts for p in parts], dtype=np.float64)
            masked = props * open_parts
            if not np.isfinite(masked).all() or masked.sum() <= 0:
                masked = props if np.isfinite(props).all() and props.sum() > 0 else open_parts
            masked = masked / masked.sum()
            cuts = (np.cumsum(masked) * len(members)).astype(np.int64)[:-1]
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            logger.debug("dirichlet_partition: alpha=%s accepted after %d draw(s)", alpha, attempt)
            return [frozen_indices(np.sort(np.asarray(p, dtype=np.int64))) for p in parts]
    raise DataConfigError(
        f"no Dirichlet(alpha={alpha}) partition of {n} samples into {n_parts} parts gave every "
        f"part >= {min_size} samples in {max_tries} draws; raise alpha or lower min_size"
    )


def _iid_partition(n: int, n_parts: int, seed: int) -> list[np.ndarray]:
    if n_parts < 1 or n_parts > n:
        raise DataConfigError(f"cannot split {n} samples into {n_parts} non-empty IID parts")
    perm = np.random.default_rng(seed).permutation(n)
    return [frozen_indices(np.sort(p)) for p in np.array_split(perm, n_parts)]


def _derived_seed(seed: int, *keys: int) -> int:
    """An independent, reproducible seed for one hospital, derived from the run seed."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def build_federation(
    ds: Dataset,
    *,
    n_hospitals: int,
    alpha: float | None,
    holdout: bool = True,
    seed: int = 0,
    partition: str = "dirichlet",
    min_size: int = 10,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> list[HospitalData]:
    """Split one pooled dataset into simulated hospitals.

    ``n_hospitals`` training hospitals (``hospital_1`` ...) each get a seeded
    stratified train/val/test split of their own samples. With ``holdout``,
    one more part is drawn the same way and returned last as ``global``: a
    test-only hospital that never trains, to measure generalisation to an
    unseen site. ``partition`` is ``"dirichlet"`` (label skew, needs
    ``alpha``) or ``"iid"`` (equal-size uniform random parts).

    The dataset must be de-duplicated first (see :func:`deduplicate`); a
    dataset with repeated content hashes is refused, because identical images
    in two parts would leak test data into training.
    """
    if n_hospitals < 1:
        raise DataConfigError(f"n_hospitals must be >= 1, got {n_hospitals}")
    if len(ds) == 0:
        raise EmptyDatasetError(f"dataset from {ds.root} has no samples to partition")
    hashes = ds.hashes()
    if len(set(hashes)) != len(hashes):
        raise DataError(
            f"dataset from {ds.root} holds {len(hashes) - len(set(hashes))} duplicate image(s); "
            "call deduplicate() before build_federation() so copies cannot leak across splits"
        )
    n_parts = n_hospitals + (1 if holdout else 0)
    labels = ds.labels()
    if partition == "dirichlet":
        if alpha is None:
            raise DataConfigError("partition 'dirichlet' needs alpha (e.g. 0.1 skewed, 100 near IID)")
        parts = dirichlet_partition(labels, n_parts, alpha, seed=seed, min_size=min_size)
    elif partition == "iid":
        parts = _iid_partition(len(ds), n_parts, seed)
    else:
        raise DataConfigError(f"unknown partition {partition!r}; expected 'dirichlet' or 'iid'")

    hospitals: list[HospitalData] = []
    for i, idx in enumerate(parts):
        empty = np.empty(0, np.int64)
        if holdout and i == n_parts - 1:
            hospitals.append(HospitalData("global", idx, Split(empty, empty, idx), held_out=True))
            continue
        local = split_indices(labels[idx], fractions, seed=_derived_seed(seed, i))
        split = Split(idx[local.train], idx[local.val], idx[local.test])
        hospitals.append(HospitalData(f"hospital_{i + 1}", idx, split, held_out=False))
    for h in hospitals:
        logger.info(
            "%s: %d samples (train %d / val %d / test %d), classes %s",
            h.name,
            len(h.indices),
            len(h.split.train),
            len(h.split.val),
            len(h.split.test),
            np.bincount(labels[h.indices], minlength=ds.num_classes).tolist(),
        )
    return hospitals


def subset(ds: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """A small stratified sample: up to ``per_class`` random samples of every class.

    Kept in the dataset's order, so a subset of a sorted scan is still sorted.
    """
    if per_class < 1:
        raise DataConfigError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    labels = ds.labels()
    chosen: list[np.ndarray] = []
    for cls in range(ds.num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members):
            chosen.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    if not chosen:
        return Dataset((), ds.class_names, ds.root)
    return ds.select(np.sort(np.concatenate(chosen)))
