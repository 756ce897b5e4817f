"""Records of the data pipeline: samples, datasets, splits, hospitals, de-duplication reports."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data.errors import DataConfigError, DataError


@dataclass(frozen=True)
class Sample:
    """One labelled image: absolute path, class index and SHA-256 of its bytes.

    ``group`` names what several images can share (a patient, a lesion, a study): a group is never
    cut by a split or a partition; None means the image is a group of its own. ``site`` is the
    hospital the image comes from, for a natural federation (None when the data is pooled).
    """

    path: Path
    label: int
    sha256: str
    group: str | None = None
    site: str | None = None


@dataclass(frozen=True)
class Dataset:
    """An immutable, ordered collection of samples over a fixed label space.

    ``root`` is where the samples were scanned from (``None`` for datasets
    assembled elsewhere); :func:`deduplicate` uses it to tell which top-level
    folder (e.g. ``Training`` vs ``Testing``) each duplicate lies in.
    """

    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    root: Path | None = None

    def __post_init__(self) -> None:
        if len(set(self.class_names)) != len(self.class_names):
            raise DataConfigError(f"class names must be unique, got {list(self.class_names)}")
        n = len(self.class_names)
        for s in self.samples:
            if not 0 <= s.label < n:
                raise DataError(f"{s.path}: label {s.label} is outside the label space of {n} classes")

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self) -> np.ndarray:
        """Class index of every sample, as an ``int64`` array aligned with ``samples``."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    def hashes(self) -> list[str]:
        return [s.sha256 for s in self.samples]

    @property
    def has_groups(self) -> bool:
        """Whether any sample names a group (a manifest's ``group`` column)."""
        return any(s.group is not None for s in self.samples)

    def group_ids(self) -> np.ndarray:
        """An ``int64`` per sample, equal for the samples of one group, numbered in order of first
        appearance; a sample without a group is a group of its own (so ungrouped data gives 0..n-1)."""
        ids: dict[str, int] = {}
        out = np.empty(len(self.samples), dtype=np.int64)
        next_id = 0
        for i, s in enumerate(self.samples):
            if s.group is not None and s.group in ids:
                out[i] = ids[s.group]
                continue
            out[i] = next_id
            if s.group is not None:
                ids[s.group] = next_id
            next_id += 1
        return out

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name, including classes with zero samples."""
        counts = np.bincount(self.labels(), minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def select(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """A new dataset with the samples at ``indices`` (in that order), same label space."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Dataset(tuple(self.samples[int(i)] for i in idx), self.class_names, self.root)


@dataclass
class DuplicateReport:
    """What :func:`deduplicate` found and removed.

    ``n_removed`` counts every sample that did not survive: all but one member
    of each consistent group, plus every member of a conflicting group.
    ``groups`` lists every group of byte-identical files (paths sorted), so an
    audit can see exactly what was dropped.
    """

    n_files: int
    n_unique: int
    n_groups: int
    n_removed: int
    n_cross_folder_groups: int
    n_conflicting_groups: int
    n_conflicting_files: int = 0
    groups: tuple[tuple[Path, ...], ...] = ()
    conflicting_groups: tuple[tuple[Path, ...], ...] = ()

    @property
    def examples(self) -> tuple[tuple[Path, ...], ...]:
        """A few duplicate groups, for log lines and reports."""
        return self.groups[:5]

    def summary(self) -> str:
        return (
            f"{self.n_files} files, {self.n_unique} distinct contents, "
            f"{self.n_groups} duplicate groups ({self.n_cross_folder_groups} spanning top-level "
            f"folders, {self.n_conflicting_groups} with conflicting labels), "
            f"{self.n_removed} samples removed"
        )


def frozen_indices(values: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.array(values, dtype=np.int64).reshape(-1)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Split:
    """Train/val/test indices (sorted, disjoint, read-only arrays).

    Compared by identity: element-wise array comparison has no single truth value.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            object.__setattr__(self, name, frozen_indices(getattr(self, name)))

    def all(self) -> np.ndarray:
        return np.concatenate([self.train, self.val, self.test])


@dataclass(frozen=True, eq=False)
class HospitalData:
    """One simulated hospital: the dataset indices it owns and how they are split.

    ``split`` holds indices into the *dataset* (subsets of ``indices``). A
    held-out hospital never trains: all its indices are in ``split.test``.
    """

    name: str
    indices: np.ndarray
    split: Split
    held_out: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", frozen_indices(self.indices))
