"""The one pipeline from image data to hospitals: read, de-duplicate, subset, partition.

The simulation (:func:`shared.simulation.prepare`) and ``fedmedclip partition`` (which writes the
result as one manifest per hospital for the services) both call :func:`prepare_federation`, so a
node reading its manifest trains on exactly the samples, split and order the simulation uses.

Inputs: a pooled ImageFolder (``root/<class>/*`` or ``root/<split>/<class>/*``), a natural layout
``root/<site>/<class>/*`` (``partition="natural"``), or a CSV manifest (``path,label`` and the
optional ``group`` and ``site`` columns) for either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from shared.data.dedup import deduplicate
from shared.data.errors import DataConfigError
from shared.data.partition import build_federation, natural_federation, subset
from shared.data.records import Dataset, DuplicateReport, HospitalData
from shared.data.scan import read_manifest, scan_image_folder, scan_sites

log = logging.getLogger("fedmedclip.data")

#: How a federation's hospitals come about: a Dirichlet label skew of pooled data, iid parts of it,
#: or the sites the data came from.
PARTITIONS = ("dirichlet", "iid", "natural")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Federation:
    """A de-duplicated (and optionally subsetted) dataset and the hospitals that share it."""

    dataset: Dataset
    duplicates: DuplicateReport
    hospitals: list[HospitalData]


def parse_holdout(value: bool | str | None) -> bool | str:
    """The value of ``--holdout``: True (hold out a drawn 'global' hospital), False (none), or a site name."""
    if isinstance(value, bool):
        return value
    text = (value or "").strip()
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE or not text:
        return False
    return text


def read_source(source: Path | str, *, natural: bool) -> Dataset:
    """The samples of ``source``: a CSV manifest, a natural layout ``root/<site>/<class>/*`` when ``natural``,
    else a pooled ImageFolder."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".csv":
        return read_manifest(path)
    return scan_sites(path) if natural else scan_image_folder(path)


def prepare_federation(
    root: Path | str,
    *,
    hospitals: int,
    alpha: float | None,
    seed: int = 0,
    per_class: int | None = None,
    holdout: bool | str = True,
    partition: str = "dirichlet",
    min_size: int = 10,
) -> Federation:
    """Read ``root``, drop duplicate files, take ``per_class`` images a class if given, and build the hospitals.

    ``partition``: ``dirichlet`` (``hospitals`` training hospitals with label skew ``alpha``; iid when
    ``alpha`` is None), ``iid``, or ``natural`` (one hospital per site). ``holdout``: True adds a held-out
    'global' hospital drawn from pooled data, False none, a site name holds that site out (natural).
    ``min_size``: a Dirichlet draw is repeated until every hospital holds at least this many images; 0 accepts
    the first draw, empty hospitals included (the only way to a federation of more hospitals than images / 10).
    """
    if partition not in PARTITIONS:
        raise DataConfigError(f"unknown partition {partition!r}; expected one of {list(PARTITIONS)}")
    holdout = parse_holdout(holdout)
    natural = partition == "natural"
    if natural and holdout is True:
        raise DataConfigError("partition 'natural' holds out a site: name it (--holdout SITE) or say --holdout false")
    if not natural and isinstance(holdout, str):
        raise DataConfigError(
            f"--holdout {holdout!r} names a site, which only --partition natural has; use true or false"
        )
    ds, report = deduplicate(read_source(root, natural=natural))
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
    if natural:
        parts = natural_federation(ds, holdout=holdout or None, seed=seed)
    else:
        parts = build_federation(
            ds,
            n_hospitals=hospitals,
            alpha=alpha,
            holdout=bool(holdout),
            seed=seed,
            partition="iid" if partition == "iid" or alpha is None else "dirichlet",
            min_size=min_size,
        )
    return Federation(ds, report, parts)
