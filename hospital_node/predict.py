"""Classify a folder of images with this hospital's ensemble (global FAM + private MLP); write a CSV."""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import torch

from hospital_node.client import backbone_spec, build_learner, Prepared
from hospital_node.config import NodeConfig
from hospital_node.data import label_space, load_local
from hospital_node.state import StateStore
from shared.backbone import load_backbone
from shared.data import IMAGE_EXTENSIONS, Sample
from shared.data.features import encode_samples

log = logging.getLogger("fedmedclip.node")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def predict_folder(cfg: NodeConfig, images: Path | str, out_csv: Path | str) -> int:
    """Write ``path,prediction,confidence,p_<class>...``; returns the number of images classified."""
    store = StateStore(cfg.state_dir)
    state = store.load()
    if state is None:
        raise FileNotFoundError(f"no saved state in {store.path}: run the node (python -m hospital_node run) first")
    names = label_space(Path(cfg.data), cfg.classes) if cfg.data else (tuple(cfg.classes) if cfg.classes else None)
    if names is None and cfg.data:
        names = load_local(cfg.data, cfg.classes, split_seed=cfg.split_seed).dataset.class_names
    if names is None:
        raise ValueError("the label space is unknown: set classes or data")
    backbone = load_backbone(backbone_spec(cfg), cfg.device)
    if backbone.fingerprint(names) != state.fingerprint:
        raise ValueError("this backbone/label space is not the one the saved state was trained with")
    paths = _images(Path(images))
    if not paths:
        raise FileNotFoundError(f"no images under {images}")
    samples = [Sample(p.resolve(), 0, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    features, _ = encode_samples(backbone, samples, cfg.cache_dir, progress=cfg.progress)
    prep = Prepared(backbone=backbone, data=None, features=features, labels=torch.zeros(len(samples)),  # type: ignore[arg-type]
                    class_names=tuple(names), fingerprint=state.fingerprint,
                    text=backbone.text_features(names), dim=int(features.shape[1]))
    learner = build_learner(cfg, prep)
    if state.learner is not None:
        learner.load_private_state(state.learner)
    learner.load_adapter_state(state.global_state)
    head = "clip" if cfg.role == "evaluator" or learner.mlp is None else None
    probs = learner.predict_probs(features, head=head)
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "prediction", "confidence", *[f"p_{n}" for n in names]])
        for path, row in zip(paths, probs):
            k = int(row.argmax())
            writer.writerow([path.as_posix(), names[k], f"{float(row[k]):.6f}", *[f"{float(p):.6f}" for p in row]])
    log.info("classified %d images with global v%d (%s head) -> %s", len(paths), state.global_version,
             head or "ensemble", out)
    return len(paths)
