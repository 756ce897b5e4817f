"""The one pipeline from a pooled image folder to simulated hospitals: scan, de-duplicate, subset, partition.

The simulation (:func:`shared.simulation.prepare`) and ``fedmedclip partition`` (which writes the
result as one manifest per hospital for the services) both call :func:`prepare_federation`, so a
node reading its manifest trains on exactly the samples, split and order the simulation uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from shared.data.dedup import deduplicate
from shared.data.partition import build_federation, subset
from shared.data.records import Dataset, DuplicateReport, HospitalData
from shared.data.scan import scan_image_folder

log = logging.getLogger("fedmedclip.data")


@dataclass(frozen=True)
class Federation:
    """A de-duplicated (and optionally subsetted) dataset and the hospitals that share it."""

    dataset: Dataset
    duplicates: DuplicateReport
    hospitals: list[HospitalData]


def prepare_federation(
    root: Path | str,
    *,
    hospitals: int,
    alpha: float | None,
    seed: int = 0,
    per_class: int | None = None,
    holdout: bool = True,
) -> Federation:
    """Scan ``root`` (an ImageFolder), drop duplicate files, take ``per_class`` images a class if given,
    and split it among ``hospitals`` training hospitals (Dirichlet ``alpha``, or iid when None) plus a
    held-out one when ``holdout``."""
    ds, report = deduplicate(scan_image_folder(root), root)
    log.info(
        "data: %d unique images after removing %d duplicates (%d groups, %d across top-level folders, "
        "%d with conflicting labels)",
        len(ds.samples),
        report.n_removed,
        report.n_groups,
        report.n_cross_folder_groups,
        report.n_conflicting_groups,
    )
    if per_class:
        ds = subset(ds, per_class, seed=seed)
    parts = build_federation(
        ds,
        n_hospitals=hospitals,
        alpha=alpha,
        holdout=holdout,
        seed=seed,
        partition="dirichlet" if alpha is not None else "iid",
    )
    return Federation(ds, report, parts)
