"""``fedmedclip predict``: classify a folder of images with this hospital's ensemble; ``fedmedclip encode``.

``predict`` uses the model of the run's best round (its global FAM and the private MLP as they were
when the node evaluated that global; the last global when no round is selected yet), from the run
going on, else the last run that ended (``state/archive/<run id>/``), says which, and writes
``path,prediction,confidence,p_<class>...``. ``encode`` builds the node's feature cache ahead of
time (the slow, one-off part of joining a federation), from the same settings as ``node run``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
from pathlib import Path

import torch

from hospital_node.client import Prepared, backbone_spec, build_learner
from hospital_node.config import ENV_PREFIX, NodeConfig
from hospital_node.data import label_space, load_local
from hospital_node.state import NodeState, Snapshot, StateStore
from shared.backbone import load_backbone
from shared.data import IMAGE_EXTENSIONS, MissingInputError, Sample
from shared.data.features import FeatureCache, encode_samples
from shared.ops.command import Command
from shared.ops.config import ConfigError

log = logging.getLogger("fedmedclip.node")


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def chosen_model(cfg: NodeConfig) -> tuple[NodeState, Path, Snapshot, str]:
    """The saved state (the run going on, else the last run that ended), its file, and the model to predict
    with: the snapshot of the run's best version, else the last global; and a sentence saying which."""
    store = StateStore(cfg.state_dir)
    path = store.latest()
    state = store.load(path) if path is not None else None
    if state is None:
        raise MissingInputError(f"no saved state in {store.dir}: run the node (fedmedclip node run) first")
    best = StateStore.load_snapshot(path, state.best_version) if state.best_version else None
    if best is not None:
        return (
            state,
            path,
            best,
            (
                f"run {state.run_id}: the global of round {best.version}, the run's best by its selection "
                f"(the last is {state.global_version})"
            ),
        )
    last = Snapshot(state.run_id, state.global_version, state.global_state, state.learner)
    why = "the run has selected no round yet" if not state.best_version else "its best round's model is not here"
    return state, path, last, f"run {state.run_id}: the last global, round {state.global_version} ({why})"


def predict_folder(cfg: NodeConfig, images: Path | str, out_csv: Path | str) -> tuple[int, str]:
    """Write ``path,prediction,confidence,p_<class>...``; the number of images classified and which model."""
    state, path, model, which = chosen_model(cfg)
    log.info("predicting with %s", which)
    names = label_space(Path(cfg.data), cfg.classes) if cfg.data else (tuple(cfg.classes) if cfg.classes else None)
    if names is None and cfg.data:
        names = load_local(cfg.data, cfg.classes, split_seed=cfg.split_seed).dataset.class_names
    if names is None:
        raise ConfigError("the label space is unknown: set classes or data")
    backbone = load_backbone(backbone_spec(cfg), cfg.device)
    if backbone.fingerprint(names) != state.fingerprint:
        raise ConfigError(
            "this backbone or label space is not the one the saved state in "
            f"{path} was trained with: use the node's own settings"
        )
    if not Path(images).is_dir():
        raise MissingInputError(f"image folder {images} does not exist")
    paths = _images(Path(images))
    if not paths:
        raise MissingInputError(f"no images under {images}")
    samples = [Sample(p.resolve(), 0, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    features, _ = encode_samples(backbone, samples, cfg.cache_dir, progress=cfg.progress)
    prep = Prepared(
        backbone=backbone,
        data=None,
        features=features,
        labels=torch.zeros(len(samples)),  # type: ignore[arg-type]
        class_names=tuple(names),
        fingerprint=state.fingerprint,
        text=backbone.text_features(names),
        dim=int(features.shape[1]),
    )
    learner = build_learner(cfg, prep)
    if model.learner is not None:
        learner.load_private_state(model.learner)
    learner.load_adapter_state(model.global_state)
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
    log.info("classified %d images with global v%d (%s head) -> %s", len(paths), model.version, head or "ensemble", out)
    return len(paths), which


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of images to classify (searched recursively)")
    parser.add_argument("--out", default="predictions.csv", help="the CSV to write (default: predictions.csv)")


def _predict(cfg: NodeConfig, args: argparse.Namespace) -> int:
    n, which = predict_folder(cfg, args.images, args.out)
    print(f"{n} images classified with {which} -> {args.out}")
    return 0


def _encode(cfg: NodeConfig, _args: argparse.Namespace) -> int:
    if not cfg.data:
        raise ConfigError("data: set the images to encode (an ImageFolder or a CSV manifest)")
    if not cfg.cache_dir:
        raise ConfigError("cache_dir: set the feature cache folder to fill")
    data = load_local(cfg.data, cfg.classes, split_seed=cfg.split_seed, evaluator=cfg.role == "evaluator")
    backbone = load_backbone(backbone_spec(cfg), cfg.device)
    _, stats = encode_samples(backbone, data.dataset.samples, cfg.cache_dir, progress=cfg.progress)
    cache = FeatureCache(cfg.cache_dir, backbone.image_fingerprint())
    rate = f" ({stats.images_per_second:.1f} images/s on {stats.device})" if stats.n_encoded else ""
    print(
        f"{len(data.dataset)} images of {cfg.data}: {stats.n_encoded} encoded in {stats.seconds:.1f}s{rate}, "
        f"{stats.n_cached} already cached; {cache.path} now holds {len(cache.load())} images"
    )
    return 0


PREDICT = Command(
    name="predict",
    help="classify a folder of images, write a CSV",
    run=_predict,
    config=NodeConfig,
    env_prefix=ENV_PREFIX,
    arguments=_predict_arguments,
    description="Classify a folder of images with this hospital's ensemble (the node's settings: --config node.yaml).",
)
ENCODE = Command(
    name="encode",
    help="build a node's feature cache ahead of time",
    run=_encode,
    config=NodeConfig,
    env_prefix=ENV_PREFIX,
    description="Encode a node's images into its feature cache ahead of time (the node's settings: "
    "--config node.yaml; data and cache_dir matter). `node run` then starts in seconds.",
)
