"""A hospital's local data: partition image data into per-hospital manifests, and load one.

``partition`` runs the simulation's own pipeline (:func:`shared.data.pipeline.prepare_federation`:
read, de-duplicate, optional stratified subset, partition: Dirichlet, iid or the natural sites) and
writes one CSV manifest per hospital (``path,label,split``, plus ``group`` when the data names groups;
absolute paths) named after the hospital (``global.csv`` for a drawn held-out one, the site's name for
natural sites), ``classes.txt`` (the federation's label space, one name a line) and a ready-made node
config per hospital. A node that reads such a manifest trains on exactly the samples, split and order
the simulation uses.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from shared.data import (
    Dataset,
    Split,
    deduplicate,
    default_data_root,
    read_split_manifest,
    scan_image_folder,
    split_class_counts,
    split_dataset,
)
from shared.data.pipeline import PARTITIONS, prepare_federation
from shared.ops.command import Command

log = logging.getLogger("fedmedclip.node")

CLASSES_FILE = "classes.txt"


def partition(
    data_root: Path | str,
    out_dir: Path | str,
    *,
    hospitals: int,
    alpha: float | None,
    seed: int = 0,
    per_class: int | None = None,
    holdout: bool | str = True,
    partition: str = "dirichlet",
) -> dict:
    """Write the manifests of a federation; returns the summary written to ``federation.json``."""
    out = Path(out_dir)
    fed = prepare_federation(
        data_root,
        hospitals=hospitals,
        alpha=alpha,
        seed=seed,
        per_class=per_class,
        holdout=holdout,
        partition=partition,
    )
    out.mkdir(parents=True, exist_ok=True)
    ds = fed.dataset
    (out / CLASSES_FILE).write_text("\n".join(ds.class_names) + "\n", encoding="utf-8")
    summary = {
        "data_root": str(data_root),
        "partition": partition,
        "seed": seed,
        "alpha": alpha if partition != "natural" else None,
        "per_class": per_class,
        "duplicates_removed": fed.duplicates.n_removed,
        "grouped": ds.has_groups,
        "classes": list(ds.class_names),
        "hospitals": [],
    }
    training = [h for h in fed.hospitals if not h.held_out]
    for h in fed.hospitals:
        manifest = out / f"{h.name}.csv"
        split_of = {
            int(i): name
            for name, idx in (("train", h.split.train), ("val", h.split.val), ("test", h.split.test))
            for i in idx
        }
        with manifest.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "split"] + (["group"] if ds.has_groups else []))
            for i in sorted(split_of):
                sample = ds.samples[i]
                row = [sample.path.as_posix(), ds.class_names[sample.label], split_of[i]]
                writer.writerow(row + ([sample.group or ""] if ds.has_groups else []))
        node = {
            "node_id": h.name,
            "data": str(manifest.resolve()),
            "role": "evaluator" if h.held_out else "trainer",
            "hospital_index": training.index(h) if not h.held_out else 0,
            "seed": seed,
        }
        (out / f"{h.name}.yaml").write_text(yaml.safe_dump(node, sort_keys=False), encoding="utf-8")
        summary["hospitals"].append(
            {
                "name": h.name,
                "held_out": h.held_out,
                "manifest": str(manifest),
                "train": len(h.split.train),
                "val": len(h.split.val),
                "test": len(h.split.test),
                "class_counts": np.bincount(ds.labels()[h.indices], minlength=ds.num_classes).tolist(),
                "split_class_counts": split_class_counts(ds.labels(), h.split, ds.num_classes),
            }
        )
    (out / "federation.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


@dataclass(frozen=True)
class PartitionConfig:
    data: str | None = None  # ImageFolder, ROOT/<site>/<class>/* (natural) or CSV manifest (path,label[,group][,site])
    out: str = "runs/partition"  # output folder: <hospital>.csv, <hospital>.yaml, classes.txt, federation.json
    partition: str = "dirichlet"  # dirichlet (label skew, --alpha), iid, or natural (one hospital per site)
    hospitals: int = 3  # training hospitals (dirichlet, iid; natural: one per site)
    alpha: float = 0.5  # Dirichlet label skew (smaller: more skewed); 0 or less: iid
    seed: int = 0  # seeds the partition, the splits and the subset
    per_class: int | None = None  # a stratified subset of N images per class (quick runs)
    holdout: str = "true"  # held-out hospital (test only): true (a drawn 'global'), false, or a SITE (natural)

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {list(PARTITIONS)}")


def _partition(cfg: PartitionConfig, _args: argparse.Namespace) -> int:
    summary = partition(
        cfg.data or default_data_root(),
        cfg.out,
        hospitals=cfg.hospitals,
        alpha=cfg.alpha if cfg.alpha > 0 else None,
        seed=cfg.seed,
        per_class=cfg.per_class,
        holdout=cfg.holdout,
        partition=cfg.partition,
    )
    for h in summary["hospitals"]:
        name = h["name"] + (" (held out)" if h["held_out"] else "")
        print(
            f"{name:>22}: train {h['train']:4d}  val {h['val']:4d}  test {h['test']:4d}  "
            f"classes {h['class_counts']}  -> {h['manifest']}"
        )
    return 0


PARTITION = Command(
    name="partition",
    help="write per-hospital manifests of a simulated federation",
    run=_partition,
    config=PartitionConfig,
    env_prefix="FEDMEDCLIP_PARTITION_",
    description=__doc__.split("\n\n")[0],
)


@dataclass(frozen=True)
class LocalData:
    dataset: Dataset
    split: Split

    def counts(self) -> tuple[int, int, int]:
        return len(self.split.train), len(self.split.val), len(self.split.test)


def label_space(data: Path, classes: list[str] | None) -> tuple[str, ...] | None:
    """The configured label space, else ``classes.txt`` beside the manifest (or inside the folder)."""
    if classes:
        return tuple(classes)
    candidate = (data.parent if data.is_file() else data) / CLASSES_FILE
    if candidate.is_file():
        return tuple(line.strip() for line in candidate.read_text(encoding="utf-8").splitlines() if line.strip())
    return None


def load_local(
    data: Path | str, classes: list[str] | None = None, *, split_seed: int = 0, evaluator: bool = False
) -> LocalData:
    """A manifest (with or without a split column) or an ImageFolder, split 60/20/20 when not given.

    The split is the simulation's (:func:`shared.data.split_dataset`): stratified, and by whole groups
    when the manifest has a ``group`` column. An evaluator (held-out hospital) tests on everything it
    has when the data names no split.
    """
    path = Path(data).expanduser()
    names = label_space(path, classes)
    if path.suffix.lower() == ".csv":
        ds, split = read_split_manifest(path, names)
    else:
        ds, report = deduplicate(scan_image_folder(path, names))
        if report.n_removed:
            log.warning("%s: %s", path, report.summary())
        split = None
    if split is None:
        if evaluator:
            empty = np.empty(0, np.int64)
            split = Split(empty, empty, np.arange(len(ds)))
        else:
            split = split_dataset(ds, seed=split_seed)
            log.info("%s: split %s", path, split_class_counts(ds.labels(), split, ds.num_classes))
    return LocalData(ds, split)
