"""De-duplication by content hash, so equal bytes never land on two sides of a split."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

from shared.data.records import Dataset, DuplicateReport

logger = logging.getLogger(__name__)


def _top_level(path: Path, root: Path) -> str:
    """The first folder below ``root`` holding ``path`` (its own folder if outside ``root``)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return path.parent.as_posix()
    return rel.parts[0] if len(rel.parts) > 1 else ""


def deduplicate(ds: Dataset, root: Path | str | None = None) -> tuple[Dataset, DuplicateReport]:
    """Keep one sample per content hash so equal bytes can never leak across a split.

    Within each group of byte-identical samples, the one with the smallest
    path is kept. A group whose members carry different labels is dropped
    entirely: no label for it can be trusted. "Cross-folder" groups are those
    whose members lie under different top-level folders of ``root`` (default:
    ``ds.root``, else the common folder of all samples), e.g. Training vs
    Testing. The surviving samples keep their original order.
    """
    if root is not None:
        base = Path(root).expanduser().resolve()
    elif ds.root is not None:
        base = ds.root
    elif len(ds):
        base = Path(os.path.commonpath([str(s.path) for s in ds.samples]))
    else:
        base = Path(".")

    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(ds.samples):
        by_hash[s.sha256].append(i)

    keep: set[int] = set()
    groups: list[tuple[Path, ...]] = []
    conflicting: list[tuple[Path, ...]] = []
    n_cross = 0
    n_conflicting_files = 0
    for members in by_hash.values():
        if len(members) == 1:
            keep.add(members[0])
            continue
        members = sorted(members, key=lambda i: ds.samples[i].path.as_posix())
        paths = tuple(ds.samples[i].path for i in members)
        groups.append(paths)
        if len({_top_level(p, base) for p in paths}) > 1:
            n_cross += 1
        if len({ds.samples[i].label for i in members}) > 1:
            conflicting.append(paths)
            n_conflicting_files += len(members)
            logger.warning("dropping %d identical files with conflicting labels: %s", len(paths), paths)
            continue
        keep.add(members[0])

    groups.sort(key=lambda g: g[0].as_posix())
    conflicting.sort(key=lambda g: g[0].as_posix())
    kept = tuple(s for i, s in enumerate(ds.samples) if i in keep)
    report = DuplicateReport(
        n_files=len(ds),
        n_unique=len(by_hash),
        n_groups=len(groups),
        n_removed=len(ds) - len(kept),
        n_cross_folder_groups=n_cross,
        n_conflicting_groups=len(conflicting),
        n_conflicting_files=n_conflicting_files,
        groups=tuple(groups),
        conflicting_groups=tuple(conflicting),
    )
    logger.info("deduplicate: %s", report.summary())
    return Dataset(kept, ds.class_names, ds.root), report
