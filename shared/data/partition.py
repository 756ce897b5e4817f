"""Splits and federated partitions: 60/20/20 splits (whole groups), Dirichlet, iid or natural hospitals, subsets."""

from __future__ import annotations

import logging
import re
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
    groups: np.ndarray | Sequence[int] | None = None,
) -> Split:
    """Seeded, per-class stratified train/val/test split of positions ``0..len(labels)-1``.

    Each class is shuffled and cut with largest-remainder rounding, so every
    part gets its fraction of every class to within one sample and class
    balance is the same in train, val and test.

    With ``groups`` (an id per position: a patient, a lesion, a study), every group lands whole in
    one part, stratified as well as the groups allow (:func:`_group_split`).
    """
    y = _as_labels(labels)
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 or not np.isfinite(f) for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataConfigError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    if groups is not None:
        g = _as_labels(groups)
        if len(g) != len(y):
            raise DataConfigError(f"groups must give one id per label: {len(g)} ids for {len(y)} labels")
        return _group_split(y, g, fr, seed)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        bounds = np.cumsum(_largest_remainder(len(members), fr))
        for part, chunk in zip(parts, np.split(members, bounds[:-1])):
            part.append(chunk)
    train, val, test = (np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts)
    return Split(train, val, test)


def _group_split(y: np.ndarray, groups: np.ndarray, fr: tuple[float, ...], seed: int) -> Split:
    """Whole groups into train/val/test, each part's class counts as close to its fraction as groups allow.

    Greedy, largest group first (ties in a seeded random order): a group goes to the part where it
    brings the class counts closest to their targets (``fraction * class total``), each class's
    deviation measured relative to its total so a rare class counts as much as a common one. A
    group is one unit, so no group can ever span two parts.
    """
    uniq, unit = np.unique(groups, return_inverse=True)
    n_classes = int(y.max()) + 1 if len(y) else 0
    counts = np.zeros((len(uniq), n_classes))
    np.add.at(counts, (unit, y), 1.0)
    totals = counts.sum(axis=0)
    scale = 1.0 / np.maximum(totals, 1.0) ** 2
    target = np.outer(fr, totals)
    have = np.zeros_like(target)
    usable = np.array([f > 0 for f in fr])
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    part_of = np.empty(len(uniq), dtype=np.int64)
    for g in order:
        v = counts[g]
        cost = (((have + v - target) ** 2 - (have - target) ** 2) * scale).sum(axis=1)
        cost[~usable] = np.inf
        best = int(np.argmin(cost))
        part_of[g] = best
        have[best] += v
    parts = part_of[unit]
    return Split(*(np.flatnonzero(parts == k) for k in range(3)))


def split_class_counts(labels: np.ndarray, split: Split, num_classes: int) -> dict[str, list[int]]:
    """The class counts a split achieved: ``{"train": [...], "val": [...], "test": [...]}``."""
    y = _as_labels(labels)
    return {
        name: np.bincount(y[getattr(split, name)], minlength=num_classes).tolist() for name in ("train", "val", "test")
    }


def split_dataset(ds: Dataset, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> Split:
    """A train/val/test split of ``ds``: stratified by class, and by whole groups when its samples name any.

    The one split rule of the simulation, ``fedmedclip partition`` and a node reading its own data.
    """
    return split_indices(ds.labels(), fractions, seed, ds.group_ids() if ds.has_groups else None)


def dirichlet_partition(
    labels: np.ndarray | Sequence[int],
    n_parts: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 1000,
    sizes: np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Label-skewed partition of positions ``0..len(labels)-1`` into ``n_parts`` parts.

    The usual non-IID benchmark recipe (Hsu et al. 2019; NIID-Bench): for each
    class, draw part proportions from ``Dir(alpha)`` and cut that class's
    shuffled samples accordingly; a part already holding its fair share
    (``N / n_parts``) gets no more, which keeps sizes reasonable. Draws are
    repeated until every part holds at least ``min_size`` samples. Small
    ``alpha`` means each part is dominated by few classes; large ``alpha``
    approaches IID. Deterministic for a given seed.

    ``sizes`` (default: 1 each) is how many images each position stands for when the positions are
    groups of images: the fair share and ``min_size`` then count images, not groups.
    """
    y = _as_labels(labels)
    n = len(y)
    weight = np.ones(n) if sizes is None else np.asarray(sizes, dtype=np.float64)
    total = float(weight.sum())
    if n_parts < 1:
        raise DataConfigError(f"n_parts must be >= 1, got {n_parts}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataConfigError(f"alpha must be a positive number, got {alpha}")
    if min_size < 0:
        raise DataConfigError(f"min_size must be >= 0, got {min_size}")
    if n_parts * min_size > total:
        raise DataConfigError(f"cannot give {n_parts} parts at least {min_size} samples each from {total:g} samples")
    if n_parts == 1:
        return [frozen_indices(np.arange(n))]

    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for attempt in range(1, max_tries + 1):
        parts: list[list[int]] = [[] for _ in range(n_parts)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(y == cls))
            props = rng.dirichlet(np.full(n_parts, alpha))
            open_parts = np.array([_weight(weight, p) < total / n_parts for p in parts], dtype=np.float64)
            masked = props * open_parts
            if not np.isfinite(masked).all() or masked.sum() <= 0:
                masked = props if np.isfinite(props).all() and props.sum() > 0 else open_parts
            masked = masked / masked.sum()
            cuts = (np.cumsum(masked) * len(members)).astype(np.int64)[:-1]
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(_weight(weight, p) for p in parts) >= min_size:
            logger.debug("dirichlet_partition: alpha=%s accepted after %d draw(s)", alpha, attempt)
            return [frozen_indices(np.sort(np.asarray(p, dtype=np.int64))) for p in parts]
    raise DataConfigError(
        f"no Dirichlet(alpha={alpha}) partition of {n} samples into {n_parts} parts gave every "
        f"part >= {min_size} samples in {max_tries} draws; raise alpha or lower min_size"
    )


def _weight(weight: np.ndarray, positions: list[int]) -> float:
    return float(weight[np.asarray(positions, dtype=np.int64)].sum())


def _iid_partition(n: int, n_parts: int, seed: int) -> list[np.ndarray]:
    if n_parts < 1 or n_parts > n:
        raise DataConfigError(f"cannot split {n} samples into {n_parts} non-empty IID parts")
    perm = np.random.default_rng(seed).permutation(n)
    return [frozen_indices(np.sort(p)) for p in np.array_split(perm, n_parts)]


def _derived_seed(seed: int, *keys: int) -> int:
    """An independent, reproducible seed for one hospital, derived from the run seed."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _majority_labels(labels: np.ndarray, units: np.ndarray, n_units: int, num_classes: int) -> np.ndarray:
    """The most frequent label of each unit (a group), the smallest on ties."""
    counts = np.zeros((n_units, max(num_classes, 1)), dtype=np.int64)
    np.add.at(counts, (units, labels), 1)
    return counts.argmax(axis=1)


def _split_hospital(
    ds: Dataset, name: str, idx: np.ndarray, seed: int, fractions: Sequence[float], held_out: bool
) -> HospitalData:
    """One hospital owning dataset positions ``idx``: split by :func:`split_dataset`, or all test when held out."""
    idx = np.asarray(idx, dtype=np.int64)
    if held_out:
        empty = np.empty(0, np.int64)
        return HospitalData(name, idx, Split(empty, empty, idx), held_out=True)
    local = split_dataset(ds.select(idx), fractions, seed)
    return HospitalData(name, idx, Split(idx[local.train], idx[local.val], idx[local.test]))


def _log_hospitals(ds: Dataset, hospitals: list[HospitalData]) -> None:
    labels = ds.labels()
    for h in hospitals:
        achieved = split_class_counts(labels, h.split, ds.num_classes)
        logger.info(
            "%s%s: %d samples (train %d / val %d / test %d); classes %s: train %s, val %s, test %s",
            h.name,
            " (held out)" if h.held_out else "",
            len(h.indices),
            len(h.split.train),
            len(h.split.val),
            len(h.split.test),
            list(ds.class_names),
            achieved["train"],
            achieved["val"],
            achieved["test"],
        )
        if not h.held_out and (len(h.split.val) == 0 or len(h.split.test) == 0):
            logger.warning("%s: too few samples or groups for a val and a test split", h.name)


def _refuse_duplicates(ds: Dataset) -> None:
    if len(ds) == 0:
        raise EmptyDatasetError(f"dataset from {ds.root} has no samples to partition")
    hashes = ds.hashes()
    if len(set(hashes)) != len(hashes):
        raise DataError(
            f"dataset from {ds.root} holds {len(hashes) - len(set(hashes))} duplicate image(s); "
            "call deduplicate() before partitioning so copies cannot leak across splits"
        )


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

    When samples name groups (patients, lesions, studies), whole groups are dealt out: a group is
    one unit of the partition (labelled by its most frequent class), so it lies in one hospital,
    and in one part of that hospital's split; sizes and ``min_size`` still count images.

    The dataset must be de-duplicated first (see :func:`deduplicate`); a
    dataset with repeated content hashes is refused, because identical images
    in two parts would leak test data into training.
    """
    if n_hospitals < 1:
        raise DataConfigError(f"n_hospitals must be >= 1, got {n_hospitals}")
    _refuse_duplicates(ds)
    n_parts = n_hospitals + (1 if holdout else 0)
    labels = ds.labels()
    units = ds.group_ids()  # 0..n-1 without groups: the partition below is then the per-image one
    n_units = int(units.max()) + 1
    unit_labels = _majority_labels(labels, units, n_units, ds.num_classes)
    if partition == "dirichlet":
        if alpha is None:
            raise DataConfigError("partition 'dirichlet' needs alpha (e.g. 0.1 skewed, 100 near IID)")
        sizes = np.bincount(units, minlength=n_units)
        parts = dirichlet_partition(unit_labels, n_parts, alpha, seed=seed, min_size=min_size, sizes=sizes)
    elif partition == "iid":
        parts = _iid_partition(n_units, n_parts, seed)
    else:
        raise DataConfigError(f"unknown partition {partition!r}; expected 'dirichlet' or 'iid'")

    hospitals: list[HospitalData] = []
    for i, unit_idx in enumerate(parts):
        idx = np.flatnonzero(np.isin(units, unit_idx))
        if holdout and i == n_parts - 1:
            hospitals.append(_split_hospital(ds, "global", idx, seed, fractions, held_out=True))
        else:
            hospitals.append(_split_hospital(ds, f"hospital_{i + 1}", idx, _derived_seed(seed, i), fractions, False))
    _log_hospitals(ds, hospitals)
    return hospitals


#: What a site may be called: it names a hospital node, its manifest and its config file.
SITE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def natural_federation(
    ds: Dataset,
    *,
    holdout: str | None,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> list[HospitalData]:
    """One hospital per site (``Sample.site``): the federation the data came with, as FLamby's natural splits.

    Training sites, in name order, each get a seeded train/val/test split of their own samples
    (:func:`split_dataset`: stratified, whole groups); ``holdout`` names the site returned last, held
    out (test only, never trains), or is None for none. A group found at two sites is refused: it
    would put one patient in two hospitals (prefix site-local ids with the site to keep them apart).
    The dataset must be de-duplicated first.
    """
    _refuse_duplicates(ds)
    by_site: dict[str, list[int]] = {}
    for i, sample in enumerate(ds.samples):
        if sample.site is None:
            raise DataError(f"{sample.path}: no site; a natural partition needs ROOT/<site>/<class>/* or a site column")
        by_site.setdefault(sample.site, []).append(i)
    sites = sorted(by_site)
    bad = [s for s in sites if not SITE_NAME.fullmatch(s)]
    if bad:
        raise DataError(
            f"site name(s) {bad} in {ds.root}: a site names a hospital node and its files, so it must be 1-64 "
            "characters of A-Z a-z 0-9 _ . - (not starting with a dot)"
        )
    if holdout is not None and holdout not in by_site:
        raise DataConfigError(f"held-out site {holdout!r} is not a site of {ds.root}; sites: {sites}")
    site_of_group: dict[str, str] = {}
    for sample in ds.samples:
        if sample.group is not None and site_of_group.setdefault(sample.group, sample.site) != sample.site:
            raise DataError(
                f"group {sample.group!r} lies at sites {site_of_group[sample.group]!r} and {sample.site!r} "
                f"({sample.path}); a group must belong to one site (prefix site-local ids with the site)"
            )
    training = [s for s in sites if s != holdout]
    if not training:
        raise DataConfigError(f"no training site left: {ds.root} holds only the held-out site {holdout!r}")
    hospitals = [
        _split_hospital(ds, site, np.asarray(by_site[site]), _derived_seed(seed, i), fractions, held_out=False)
        for i, site in enumerate(training)
    ]
    if holdout is not None:
        hospitals.append(_split_hospital(ds, holdout, np.asarray(by_site[holdout]), seed, fractions, held_out=True))
    _log_hospitals(ds, hospitals)
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
