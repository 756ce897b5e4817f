"""A hospital's local data: partition a pooled set into per-hospital manifests, and load one.

``partition`` runs the simulation's own pipeline (:func:`shared.data.pipeline.prepare_federation`:
scan, de-duplicate, optional stratified subset, partition) and writes one CSV manifest per hospital
(``path,label,split``; absolute paths), ``global.csv`` for the held-out one, ``classes.txt`` (the
federation's label space, one name a line) and a ready-made node config per hospital. A node that
reads such a manifest trains on exactly the samples, split and order the simulation uses.
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
    split_indices,
)
from shared.data.pipeline import prepare_federation
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
    holdout: bool = True,
) -> dict:
    """Write the manifests of a simulated federation; returns the summary written to ``federation.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fed = prepare_federation(
        data_root, hospitals=hospitals, alpha=alpha, seed=seed, per_class=per_class, holdout=holdout
    )
    ds = fed.dataset
    (out / CLASSES_FILE).write_text("\n".join(ds.class_names) + "\n", encoding="utf-8")
    summary = {
        "data_root": str(data_root),
        "seed": seed,
        "alpha": alpha,
        "per_class": per_class,
        "duplicates_removed": fed.duplicates.n_removed,
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
            writer.writerow(["path", "label", "split"])
            for i in sorted(split_of):
                sample = ds.samples[i]
                writer.writerow([sample.path.as_posix(), ds.class_names[sample.label], split_of[i]])
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
            }
        )
    (out / "federation.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


@dataclass(frozen=True)
class PartitionConfig:
    data: str | None = None  # the pooled ImageFolder (default: $FEDMEDCLIP_DATA, else the team's brain tumor set)
    out: str = "runs/partition"  # output folder: <hospital>.csv, <hospital>.yaml, classes.txt, federation.json
    hospitals: int = 3  # training hospitals
    alpha: float = 0.5  # Dirichlet label skew (smaller: more skewed); 0 or less: iid
    seed: int = 0  # seeds the partition, the splits and the subset
    per_class: int | None = None  # a stratified subset of N images per class (quick runs)
    holdout: bool = True  # add the held-out 'global' hospital (test only)


def _partition(cfg: PartitionConfig, _args: argparse.Namespace) -> int:
    summary = partition(
        cfg.data or default_data_root(),
        cfg.out,
        hospitals=cfg.hospitals,
        alpha=cfg.alpha if cfg.alpha > 0 else None,
        seed=cfg.seed,
        per_class=cfg.per_class,
        holdout=cfg.holdout,
    )
    for h in summary["hospitals"]:
        print(
            f"{h['name']:>12}: train {h['train']:4d}  val {h['val']:4d}  test {h['test']:4d}  "
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

    An evaluator (held-out hospital) tests on everything it has when the data names no split.
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
            split = split_indices(ds.labels(), seed=split_seed)
    return LocalData(ds, split)
