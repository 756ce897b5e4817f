"""Simulated federation: N hospitals plus a held-out one, R rounds, in one process or on Ray.

It drives the same round steps as the services (:mod:`shared.learning.rounds`): local training, the
codec in both directions, streaming aggregation, with the aggregator's weights
(:func:`shared.learning.aggregation.capped_weights` over the training hospitals' sample counts, with
the same ``max_samples_per_node`` and ``max_weight_share``; every hospital reports every round, so
the weights are those of a round in which no node drops out). Per round it validates every training hospital's
ensemble on its val split and keeps the round with the best mean val metric (``select_by``: accuracy by
default, balanced accuracy or macro-F1); the test metrics of that round are the result (docs/method.md,
section 9), per hospital with per-class recall and a confusion matrix (also as a PNG per hospital).

Hospitals are drawn from pooled data (Dirichlet label skew or iid, plus a drawn held-out 'global' one) or
are the sites the data came from (``partition="natural"``: ``ROOT/<site>/<class>/*`` or a manifest with a
``site`` column; ``holdout`` names the held-out site).

``backend="processes"`` runs the hospitals' steps and evaluations in worker processes of this machine, one per
core (:mod:`shared.simulation_processes`: no GIL between hospitals), and ``backend="ray"`` in Ray actors, one per
CPU of the machine or cluster (:mod:`shared.simulation_ray`); the updates are still folded here in hospital order,
so the report equals the in-process one for the same seed. ``secure_aggregation`` replaces the fold by secure
aggregation (:func:`shared.secagg.secure_average`, every party in this process): each hospital's trained adapter,
clipped to ``secagg_clip`` around the global, enters the round's SecAgg session instead of its codec payload, and
the new global travels in the codec as before (rules weighted and uniform, in-process backend only). Hospitals
without training data (a Dirichlet partition into more hospitals than the data fills, ``min_hospital_size=0``)
train and send nothing.

Run: ``fedmedclip simulate --help`` (``make simulate``; ``python -m shared.simulation`` too).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from shared import __version__
from shared.backbone import BACKBONE_KINDS, RUNTIMES, Backbone, BackboneSpec, load_backbone
from shared.codec import CODECS
from shared.data import Dataset, HospitalData, default_data_root
from shared.data.features import EncodeStats, encode_samples
from shared.data.partition import split_class_counts
from shared.data.pipeline import PARTITIONS, parse_holdout, prepare_federation
from shared.learning.aggregation import AGGREGATION_RULES, capped_weights, make_aggregator
from shared.learning.cohort import (
    Cohort,
    HospitalEvaluation,
    HospitalUpdate,
    LearnerSpec,
    Member,
    held_out_by_every_model,
)
from shared.learning.metrics import SELECT_METRICS, mean_metrics, nanmean
from shared.learning.privacy import DPConfig
from shared.learning.rounds import (
    WireConfig,
    fold_update,
    publish_global,
    publish_state,
    row_masks_of,
)
from shared.learning.training import METHODS, MethodConfig, TrainConfig, build_adapter, get_method
from shared.ops.command import Command, main_for
from shared.ops.report import best_round_table, confusion_table, dumps_strict, file_stem, per_class_table

if TYPE_CHECKING:
    from shared.simulation_processes import ProcessBackend
    from shared.simulation_ray import RayBackend

log = logging.getLogger("fedmedclip.simulation")


@dataclass(frozen=True)
class SimConfig:
    """One simulated federation run."""

    data_root: str = field(default_factory=lambda: str(default_data_root()))
    per_class: int | None = None  # a stratified subset of the de-duplicated data (tests, quick demos)
    n_hospitals: int = 4  # dirichlet and iid; natural: one hospital per site
    alpha: float | None = 0.5  # Dirichlet label skew; None = iid
    holdout: bool | str = True  # True: a drawn 'global' hospital; False: none; a site name (natural)
    partition: str = "dirichlet"  # dirichlet, iid or natural
    select_by: str = "accuracy"  # the mean val metric that picks the best round (SELECT_METRICS)
    rounds: int = 50
    method: str = "fedmedclip"
    wire: WireConfig = field(default_factory=WireConfig)
    aggregation: str = "weighted"
    max_samples_per_node: int | None = 1_000_000  # as the aggregator's: a hospital's count weighs at most this
    max_weight_share: float | None = 0.5  # as the aggregator's: no hospital's share of the weighted average above this
    seed: int = 0
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: str | None = ".cache/features"
    device: str | None = None
    progress: bool = True
    min_hospital_size: int = 10  # dirichlet: every hospital holds at least this many images (0: empty ones allowed)
    backend: str = "inprocess"  # inprocess, processes (shared.simulation_processes) or ray (shared.simulation_ray)
    ray_address: str | None = None  # ray: an existing cluster (HOST:6379); None starts Ray on this machine
    ray_resident_mb: int = 1024  # ray: hospitals' private state each actor keeps in memory; the rest spill to disk
    ray_spill_dir: str | None = None  # ray: where actors spill hospitals' state (None: the system's temp folder)
    workers: int = 0  # inprocess on a CPU: threads running hospitals' steps; processes: worker processes (0: one per
    # core); one torch thread each
    dp: DPConfig = field(default_factory=DPConfig)  # differential privacy at every hospital (off by default)
    secure_aggregation: bool = False  # SecAgg (shared.secagg): the aggregator sees only the sum of the updates
    secagg_clip: float = 1.0  # secure aggregation: every value of a hospital's update is clipped to +-this
    secagg_threshold: float = 0.5  # secure aggregation: more than this share of the hospitals unmasks a round


def check_secure_aggregation(enabled: bool, aggregation: str, backend: str, clip: float, threshold: float) -> None:
    """Refuse (ValueError) a secure-aggregation setting that cannot run (:func:`shared.secagg.check_settings`, as
    the aggregator checks it, and the in-process backend only)."""
    if not enabled:
        return
    from shared.secagg import check_settings

    check_settings(aggregation, clip, threshold)
    if backend != "inprocess":
        raise ValueError("secure aggregation runs with backend inprocess only (the others do not carry it)")


@dataclass
class Prepared:
    """What every method of a benchmark shares: data, features, partition, prompts."""

    dataset: Dataset
    duplicates: dict
    backbone: Backbone
    features: torch.Tensor
    labels: torch.Tensor
    hospitals: list[HospitalData]
    text: torch.Tensor
    encode: EncodeStats
    backbone_record: dict
    seconds: dict[str, float] = field(default_factory=dict)  # data (scan, de-duplicate, partition), backbone load


def prepare(cfg: SimConfig, backbone: Backbone | None = None) -> Prepared:
    """Scan, de-duplicate, encode (cached) and partition the data for ``cfg``."""
    start = time.perf_counter()
    fed = prepare_federation(
        cfg.data_root,
        hospitals=cfg.n_hospitals,
        alpha=cfg.alpha,
        seed=cfg.seed,
        per_class=cfg.per_class,
        holdout=cfg.holdout,
        partition=cfg.partition,
        min_size=cfg.min_hospital_size,
    )
    ds, hospitals = fed.dataset, fed.hospitals
    loaded = time.perf_counter()
    backbone = backbone or load_backbone(cfg.backbone, cfg.device)
    text = backbone.text_features(ds.class_names)  # the first call on a GPU also pays for the device's start
    seconds = {"data_seconds": loaded - start, "backbone_seconds": time.perf_counter() - loaded}
    features, enc = encode_samples(backbone, ds.samples, cfg.cache_dir, progress=cfg.progress)
    dup = {k: v for k, v in asdict(fed.duplicates).items() if isinstance(v, (int, float, str))}
    return Prepared(
        dataset=ds,
        duplicates=dup,
        backbone=backbone,
        features=features,
        labels=torch.from_numpy(ds.labels()),
        hospitals=hospitals,
        text=text,
        encode=enc,
        backbone_record=backbone.record(ds.class_names),
        seconds=seconds,
    )


#: Where the hospitals' steps run: all in this process, in worker processes of this machine
#: (:mod:`shared.simulation_processes`), or as Ray actors (:mod:`shared.simulation_ray`).
BACKENDS = ("inprocess", "processes", "ray")


class InProcessBackend:
    """Every training hospital in one :class:`~shared.learning.cohort.Cohort` of this process, all in memory.

    On a CPU the hospitals' steps and evaluations run on ``workers`` threads (one per core by default), each
    hospital's on one torch thread: hospitals are independent within a round (their own learner, batch-order
    RNG and data; the global is only read), PyTorch and zstd release the GIL while they compute, and the
    updates are still folded in hospital order. Every hospital computes exactly what it computes alone on one
    thread, so the report depends neither on ``workers`` nor on the machine's core count (and equals the Ray
    backend's, whose actors run one thread each). On a GPU one thread drives every hospital (threads were
    measured: no faster, the GIL serialises the launches).
    """

    def __init__(self, cohort: Cohort, workers: int = 1) -> None:
        self.cohort = cohort
        self.workers = max(1, min(workers, len(cohort.members)))
        cohort.build_resident()  # learners seed torch's global RNG as they are built: one at a time, here
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hospital") if self.workers > 1 else None

    def _map(self, fn, indices: list[int]) -> Iterator:
        """``fn`` of every index, yielded in index order; on threads, started largest training split first (the
        round ends with its slowest thread: longest jobs first balances the threads)."""
        if self.pool is None:
            yield from map(fn, indices)
            return
        by_size = sorted(indices, key=lambda i: -len(self.cohort.members[i].train))
        futures = {i: self.pool.submit(fn, i) for i in by_size}
        try:
            for i in indices:
                yield futures[i].result()
        finally:
            for future in futures.values():
                future.cancel()

    def set_global(self, state: dict[str, torch.Tensor], round_index: int) -> None:
        self.cohort.set_global(state, round_index)

    def updates(self, round_index: int, wire: WireConfig, keep_state: bool = False) -> Iterator[HospitalUpdate]:
        return self._map(lambda i: self.cohort.step(i, round_index, wire, keep_state), sorted(self.cohort.members))

    def evaluations(self, round_index: int) -> list[HospitalEvaluation]:
        return list(self._map(lambda i: self.cohort.evaluate(i, round_index), sorted(self.cohort.members)))

    def info(self) -> dict:
        return {"backend": "inprocess", "workers": self.workers, "torch_threads_per_hospital": torch.get_num_threads()}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.cohort.close()


def run(cfg: SimConfig, prepared: Prepared | None = None) -> dict:
    """Run the federation and return the report (also written when ``out_dir`` is given to :func:`main`).

    Each round: every training hospital's step (:func:`shared.learning.cohort.hospital_step`: load the
    global, train, encode) on the chosen backend, folded here in hospital order, then the new global and
    every hospital's evaluation; both backends give the same report for the same seed.
    """
    if cfg.select_by not in SELECT_METRICS:
        raise ValueError(f"select_by must be one of {list(SELECT_METRICS)}, got {cfg.select_by!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {cfg.backend!r}")
    check_secure_aggregation(
        cfg.secure_aggregation, cfg.aggregation, cfg.backend, cfg.secagg_clip, cfg.secagg_threshold
    )
    t_start = time.perf_counter()
    method = get_method(cfg.method)
    torch.manual_seed(cfg.seed)
    prep = prepared or prepare(cfg)
    training = [h for h in prep.hospitals if not h.held_out]
    held_out = [h for h in prep.hospitals if h.held_out]
    device = prep.backbone.device if cfg.device is None else cfg.device
    spec = LearnerSpec(
        method,
        cfg.train,
        dim=prep.features.shape[1],
        num_classes=len(prep.dataset.class_names),
        text_features=prep.text,
        logit_scale=prep.backbone.logit_scale,
        seed=cfg.seed,
        device=str(device) if cfg.backend == "inprocess" else "cpu",
        dp=cfg.dp if cfg.dp.enabled else None,
        rounds=cfg.rounds,
    )
    members = [Member(i, h.name, h.split.train, h.split.val, h.split.test) for i, h in enumerate(training)]
    held = {h.name: h.split.test for h in held_out}
    if cfg.backend == "ray":
        from shared.simulation_ray import RayBackend

        backend = RayBackend(
            spec,
            members,
            prep.features,
            prep.labels,
            held,
            address=cfg.ray_address,
            resident_mb=cfg.ray_resident_mb,
            spill_dir=cfg.ray_spill_dir,
        )
    elif cfg.backend == "processes":
        from shared.simulation_processes import ProcessBackend

        backend = ProcessBackend(spec, members, prep.features, prep.labels, held, workers=cfg.workers)
    else:
        on_cpu = torch.device(spec.device).type == "cpu"
        workers = (cfg.workers or os.cpu_count() or 1) if on_cpu else 1
        backend = InProcessBackend(Cohort(spec, members, prep.features, prep.labels, held), workers)
    threads = torch.get_num_threads()
    if cfg.backend == "inprocess" and torch.device(spec.device).type == "cpu":
        torch.set_num_threads(1)  # one thread per hospital (see InProcessBackend); the process's count comes back
    try:
        history = _rounds(cfg, method, spec, training, held_out, backend)
        info = backend.info()
    finally:
        backend.close()
        torch.set_num_threads(threads)
    report = _report(cfg, method, prep, history, time.perf_counter() - t_start)
    report["backend"] = info
    return report


def _rounds(
    cfg: SimConfig,
    method: MethodConfig,
    spec: LearnerSpec,
    training: list[HospitalData],
    held_out: list[HospitalData],
    backend: InProcessBackend | ProcessBackend | RayBackend,
) -> list[dict]:
    """The rounds: the hospitals' steps on ``backend`` folded here in hospital order, the new global, evaluation."""
    global_state = build_adapter(method, spec.dim, cfg.train, cfg.seed).travel_state()
    senders = [h for h in training if len(h.split.train) > 0]  # a hospital without training data sends nothing
    weights = (
        capped_weights(
            {h.name: len(h.split.train) for h in senders},
            max_samples=cfg.max_samples_per_node,
            max_share=cfg.max_weight_share,
        )
        if senders
        else {}
    )
    if method.federated:
        backend.set_global(global_state, 0)
    secure = cfg.secure_aggregation and method.federated
    identities = None
    if secure:
        if len(senders) < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 training hospitals with data, this run has {len(senders)}"
            )
        from shared.secagg import throwaway_identities

        identities = throwaway_identities([h.name for h in senders])  # one CA and certificate per hospital per run
    rounds = cfg.rounds if method.trains else 1
    history: list[dict] = []
    stopped: dict[int, bool] = {}  # hospitals whose privacy budget ended their training
    for r in range(rounds):
        t_round = time.perf_counter()
        timings = {"local_train": 0.0, "codec": 0.0, "aggregate": 0.0, "validate": 0.0, "state_io": 0.0}
        bytes_up = bytes_up_raw = bytes_down = bytes_down_raw = 0
        aggregator = make_aggregator(cfg.aggregation)
        privacy: dict[str, dict] = {}
        folded = 0
        trained: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}  # secure: state, rows sent
        updates = backend.updates(r, cfg.wire, keep_state=True) if secure else backend.updates(r, cfg.wire)
        for update in updates:
            timings["local_train"] += update.stats.seconds
            timings["state_io"] += update.state_seconds
            if update.stats.privacy is not None:
                privacy[training[update.index].name] = update.stats.privacy
                if update.stats.privacy["stopped"] and not stopped.get(update.index):
                    stopped[update.index] = True
                    log.warning("%s: %s", training[update.index].name, update.stats.privacy["stopped"])
            if update.payload is None:
                continue
            folded += 1
            payload = update.payload
            timings["codec"] += update.seconds - update.stats.seconds
            name = training[update.index].name
            bytes_up_raw += payload.raw_nbytes
            if secure:  # the codec's payload stays home: the trained adapter goes into the ring (below)
                assert update.state is not None
                rows = row_masks_of(update.state) if cfg.wire.drop_masked_rows else {}
                trained[name] = (update.state, rows)
                continue
            t0 = time.perf_counter()
            fold_update(aggregator, payload.data, payload.sha256, global_state, weights[name], cfg.wire)
            timings["aggregate"] += time.perf_counter() - t0
            bytes_up += payload.wire_nbytes
        secure_record = None
        if secure and 0 < folded < 2:
            log.warning("round %d: one hospital sent an update, secure aggregation needs two; the global stays", r + 1)
            secure_record = {"skipped": f"{folded} update, secure aggregation needs 2"}
            folded = 0
        if method.federated and not folded:
            log.warning("round %d: no hospital sent an update; the global stays as it was", r + 1)
            backend.set_global(global_state, r + 1)
        elif method.federated:
            t0 = time.perf_counter()
            if secure:
                assert identities is not None
                new_state, secure_record = _secure_round(cfg, trained, weights, global_state, identities, r)
                bytes_up = secure_record["masked_bytes_per_node"] * len(trained)
                payload, global_state = publish_state(new_state, global_state, cfg.wire)
            else:
                payload, global_state = publish_global(aggregator, global_state, cfg.wire)
            timings["aggregate"] += time.perf_counter() - t0
            bytes_down = payload.wire_nbytes * len(senders)
            bytes_down_raw = payload.raw_nbytes * len(senders)
            backend.set_global(global_state, r + 1)
        t0 = time.perf_counter()
        evaluations = backend.evaluations(r)
        record = _round_record(r, method, training, held_out, evaluations)
        timings["validate"] = time.perf_counter() - t0
        timings["state_io"] += sum(e.state_seconds for e in evaluations)
        record.update(
            bytes_up=bytes_up,
            bytes_up_raw=bytes_up_raw,
            bytes_down=bytes_down,
            bytes_down_raw=bytes_down_raw,
            seconds=time.perf_counter() - t_round,
            timings=timings,
            keep_ratios=(evaluations[0].keep_ratios or {}) if evaluations else {},
        )
        if privacy:
            record["privacy"] = privacy
        if secure_record is not None:
            record["secure_aggregation"] = secure_record
        history.append(record)
        log.info(
            "round %3d/%d  val acc %.4f  bal. acc %.4f  up %8.1f KB  down %8.1f KB  %.2fs",
            r + 1,
            rounds,
            record["mean_val"]["accuracy"],
            record["mean_val"]["balanced_accuracy"],
            bytes_up / 1e3,
            bytes_down / 1e3,
            record["seconds"],
        )
    return history


def _secure_round(
    cfg: SimConfig,
    trained: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
    weights: dict[str, float],
    global_state: dict[str, torch.Tensor],
    identities: tuple,
    r: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One round's aggregation by secure aggregation (:func:`shared.secagg.secure_average`, every party in this
    process): the weighted average of the hospitals' clipped updates, per row over the hospitals that sent it,
    and what the round measured. Each hospital's weight is the plain rule's (capped; 1 for ``uniform``); the
    simulation has no update bounds (its plain fold runs without them), so the clip alone bounds an update."""
    from shared.secagg import secure_average

    uniform = cfg.aggregation == "uniform"
    state, measured = secure_average(
        trained,
        global_state,
        {name: 1.0 if uniform else weights[name] for name in trained},
        clip=cfg.secagg_clip,
        threshold_fraction=cfg.secagg_threshold,
        identities=identities,
        session=f"simulation-round-{r + 1}",
    )
    return state, {
        "nodes": len(trained),
        "clip": cfg.secagg_clip,
        "scale": measured.scale,
        "threshold": measured.threshold,
        "error_bound": measured.error_bound,
        "clipped_values": measured.clipped_values,
        "masked_bytes_per_node": measured.masked_bytes_per_node,
    }


def _round_record(
    r: int,
    method: MethodConfig,
    training: list[HospitalData],
    held_out: list[HospitalData],
    evaluations: list[HospitalEvaluation],
) -> dict:
    """A round's record from the hospitals' evaluations (in hospital order)."""
    clients: dict[str, dict] = {h.name: e.client for h, e in zip(training, evaluations)}
    vals = [e.client["val"] for e in evaluations]
    for h in held_out:
        if held_out_by_every_model(method):
            # nothing global exists: the mean over the training hospitals' own models
            test = mean_metrics([e.held_out[h.name] for e in evaluations])
        else:
            # the global FAM and the class prompts alone (hospital 0's copy): a hospital that never trained has no MLP
            test = evaluations[0].held_out[h.name]
        clients[h.name] = {"test": test}
    mean_val = {k: nanmean([v[k] for v in vals]) for k in SELECT_METRICS}
    return {"round": r + 1, "mean_val_accuracy": mean_val["accuracy"], "mean_val": mean_val, "clients": clients}


def best_round(history: list[dict], select_by: str) -> dict:
    """The round with the best mean val ``select_by`` (the earliest on ties; a round without a value never wins)."""

    def key(rec: dict) -> tuple[float, int]:
        value = rec["mean_val"][select_by]
        return (value if np.isfinite(value) else -np.inf), -rec["round"]

    return max(history, key=key)


def _report(cfg: SimConfig, method: MethodConfig, prep: Prepared, history: list[dict], wall: float) -> dict:
    best = best_round(history, cfg.select_by)
    per_client = {name: c["test"] for name, c in best["clients"].items()}
    avg = mean_metrics(list(per_client.values()))  # the paper's AVG: training clients and the global one
    rounds_after_first = history[1:] or history
    labels = prep.labels.numpy()
    n_classes = len(prep.dataset.class_names)
    return {
        "version": __version__,
        "method": method.name,
        "method_description": method.description,
        "partition": cfg.partition,
        "select_by": cfg.select_by,
        "best_round": best["round"],
        "best_mean_val": best["mean_val"][cfg.select_by],
        "best_mean_val_accuracy": best["mean_val_accuracy"],
        "test": per_client,
        "avg": avg,
        "test_heads": {name: c["test_heads"] for name, c in best["clients"].items() if "test_heads" in c},
        "history": [
            {k: v for k, v in rec.items() if k != "clients"}
            | {
                "test_accuracy": {n: c["test"]["accuracy"] for n, c in rec["clients"].items()},
                "test_balanced_accuracy": {n: c["test"]["balanced_accuracy"] for n, c in rec["clients"].items()},
            }
            for rec in history
        ],
        "bytes_per_round": {
            "up": nanmean([h["bytes_up"] for h in history]),
            "up_raw": nanmean([h["bytes_up_raw"] for h in history]),
            "down": nanmean([h["bytes_down"] for h in history]),
            "down_raw": nanmean([h["bytes_down_raw"] for h in history]),
            "per_transfer": (
                nanmean([h["bytes_up"] for h in history])
                / max(1, sum(not h.held_out and len(h.split.train) > 0 for h in prep.hospitals))
            ),
        },
        "timings": {
            "encode_seconds": prep.encode.seconds,
            "encode_images": prep.encode.n_encoded,
            "encode_cached": prep.encode.n_cached,
            "encode_images_per_second": prep.encode.images_per_second,
            "encode_device": prep.encode.device,
            **prep.seconds,
            "rounds_seconds": float(sum(h["seconds"] for h in history)),
            "seconds_per_round": nanmean([h["seconds"] for h in rounds_after_first]),
            "phase_seconds_per_round": {
                k: nanmean([h["timings"][k] for h in rounds_after_first]) for k in history[0]["timings"]
            },
            "wall_seconds": wall,
        },
        "peak_rss_mb": _peak_rss_mb(),
        "privacy": _privacy_summary(history),
        "secure_aggregation": _secure_summary(cfg, history),
        "hospitals": [
            {
                "name": h.name,
                "held_out": h.held_out,
                "n": len(h.indices),
                "train": len(h.split.train),
                "val": len(h.split.val),
                "test": len(h.split.test),
                "class_counts": np.bincount(labels[h.indices], minlength=n_classes).tolist(),
                "split_class_counts": split_class_counts(labels, h.split, n_classes),
            }
            for h in prep.hospitals
        ],
        "classes": list(prep.dataset.class_names),
        "duplicates": prep.duplicates,
        "backbone": prep.backbone_record,
        "config": _jsonable(asdict(cfg)),
    }


def _privacy_summary(history: list[dict]) -> dict | None:
    """Each hospital's last privacy record (epsilon spent in the run, the plan behind it); None without DP."""
    last: dict[str, dict] = {}
    for rec in history:
        last.update(rec.get("privacy", {}))
    if not last:
        return None
    return {"hospitals": last, "max_epsilon": max(p["epsilon"] for p in last.values())}


def _secure_summary(cfg: SimConfig, history: list[dict]) -> dict | None:
    """The run's secure aggregation: its settings, the rounds it ran, their largest error bound and the values
    the clip cut; None when it was off."""
    if not cfg.secure_aggregation:
        return None
    done = [rec["secure_aggregation"] for rec in history if "scale" in rec.get("secure_aggregation", {})]
    return {
        "clip": cfg.secagg_clip,
        "threshold_fraction": cfg.secagg_threshold,
        "rounds": len(done),
        "max_error_bound": max((d["error_bound"] for d in done), default=None),
        "clipped_values": sum(d["clipped_values"] for d in done),
    }


def _secure_lines(secure: dict | None) -> list[str]:
    if not secure:
        return []
    bound = secure["max_error_bound"]
    return [
        f"Secure aggregation (SecAgg) in {secure['rounds']} rounds: clip {secure['clip']:g}, threshold fraction "
        f"{secure['threshold_fraction']:g}, largest error bound of the average "
        f"{'-' if bound is None else f'{bound:.3g}'}, {secure['clipped_values']} values clipped."
    ]


def _privacy_lines(privacy: dict | None) -> list[str]:
    if not privacy:
        return []
    lines = [
        "",
        "Differential privacy (record level, per training hospital; add or remove one training image):",
        "",
        "| hospital | epsilon spent | delta | budget | noise multiplier | clip | sampling rate | steps | stopped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in privacy["hospitals"].items():
        lines.append(
            f"| {name} | {p['epsilon']:.3f} | {p['delta']:.2g} | {p['budget'] if p['budget'] is not None else '-'} "
            f"| {p['noise_multiplier']:.3f} | {p['clip']:g} | {p['sample_rate']:.4f} | {p['steps']} "
            f"| {'yes: budget' if p['stopped'] else 'no'} |"
        )
    return lines


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_outputs(report: dict, out_dir: Path) -> list[Path]:
    """``report.json``, ``report.md``, the two plots and a confusion matrix per hospital; the confusion PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(dumps_strict(report, indent=2))  # strict JSON: NaN as null
    (out_dir / "report.md").write_text(render_markdown(report))
    plot_history(report, out_dir)
    return plot_confusions(report, out_dir)


def confusion_png(name: str) -> str:
    """The file name of hospital ``name``'s confusion matrix in the output folder."""
    return f"confusion_{file_stem(name)}.png"


#: Above this many hospitals, report.md, the confusion PNGs and the accuracy plot show the first
#: ``DETAIL_SHOWN`` training hospitals and every held-out one; report.json keeps them all.
DETAIL_LIMIT = 16
DETAIL_SHOWN = 8


def shown_hospitals(report: dict) -> list[str]:
    """The hospitals report.md and the plots detail (all of them up to ``DETAIL_LIMIT``)."""
    names = list(report["test"])
    if len(names) <= DETAIL_LIMIT:
        return names
    held = {h["name"] for h in report["hospitals"] if h["held_out"]}
    return [n for n in names if n not in held][:DETAIL_SHOWN] + [n for n in names if n in held]


def render_markdown(report: dict) -> str:
    b = report["backbone"]
    shown = shown_hospitals(report)
    full = report
    report = {
        **report,
        "test": {n: report["test"][n] for n in shown},
        "hospitals": [h for h in report["hospitals"] if h["name"] in set(shown)],
    }
    lines = [
        f"# FedMedCLIP run: {report['method']}",
        "",
        f"{report['method_description']}",
        "",
        f"Backbone: {b['description']} (fingerprint `{b['fingerprint'][:16]}`)"
        + ("" if b["is_clip"] else ". Not CLIP: zero-shot accuracy is chance by construction."),
        "",
        *best_round_table(report),
        *(
            [
                "",
                f"{len(full['test'])} hospitals: the tables show {len(shown)} of them (AVG is over all; "
                "report.json holds every one).",
            ]
            if len(shown) < len(full["test"])
            else []
        ),
        "",
        *_hospital_table(report),
        "",
        *per_class_table(report),
    ]
    for name, m in report["test"].items():
        if "confusion" in m:
            lines += [
                "",
                f"Confusion matrix of {name} (test; rows: true class, columns: predicted; "
                f"[{confusion_png(name)}]({confusion_png(name)})):",
                "",
            ]
            lines += confusion_table(m["confusion"], report["classes"])
    bpr, t = report["bytes_per_round"], report["timings"]
    lines += [
        "",
        f"Bytes per round: up {bpr['up'] / 1e3:.1f} KB (raw {bpr['up_raw'] / 1e3:.1f} KB), "
        f"down {bpr['down'] / 1e3:.1f} KB (raw {bpr['down_raw'] / 1e3:.1f} KB).",
        f"Seconds per round: {t['seconds_per_round']:.3f} "
        f"({', '.join(f'{k} {v:.3f}' for k, v in t['phase_seconds_per_round'].items())}); "
        f"encode: {t['encode_images']} images in {t['encode_seconds']:.1f}s on {t['encode_device']}, "
        f"{t['encode_cached']} from cache; wall {t['wall_seconds']:.1f}s.",
        *_backend_lines(report.get("backend")),
        *_secure_lines(report.get("secure_aggregation")),
        *_privacy_lines(report.get("privacy")),
        f"Duplicates removed: {report['duplicates'].get('n_removed')} "
        f"({report['duplicates'].get('n_groups')} groups, {report['duplicates'].get('n_cross_folder_groups')} "
        "across top-level folders).",
        "",
    ]
    return "\n".join(lines)


def _backend_lines(info: dict | None) -> list[str]:
    if info and info.get("backend") == "processes":
        workers = info["actors"]
        return [
            f"Backend: {len(workers)} worker processes on this machine, "
            f"{', '.join(str(w['hospitals']) for w in workers)} hospitals each; "
            f"peak RSS per worker {max(w['peak_rss_mb'] for w in workers):.0f} MB."
        ]
    if not info or info.get("backend") != "ray":
        return []
    actors = info["actors"]
    return [
        f"Backend: Ray {info['ray_version']}, {len(actors)} actors on {len(info['nodes'])} node(s) "
        f"({', '.join(info['nodes'])}); hospitals' state in memory {sum(a['resident'] for a in actors)}, "
        f"spilled to disk {sum(a['spilled'] for a in actors)} "
        f"({sum(a['bytes_written'] for a in actors) / 1e9:.1f} GB written); "
        f"peak RSS per actor {max(a['peak_rss_mb'] for a in actors):.0f} MB."
    ]


def _hospital_table(report: dict) -> list[str]:
    """Each hospital's data: its split sizes and the class counts each part of its split achieved."""
    classes = report["classes"]
    lines = [
        f"Hospitals ({report['partition']} partition); class counts in the order {', '.join(classes)}:",
        "",
        "| hospital | role | images | train | val | test |",
        "|---|---|---|---|---|---|",
    ]
    for h in report["hospitals"]:
        parts = h["split_class_counts"]
        lines.append(
            f"| {h['name']} | {'held out' if h['held_out'] else 'trains'} | {h['n']} {h['class_counts']} | "
            + " | ".join(f"{h[p]} {parts[p]}" for p in ("train", "val", "test"))
            + " |"
        )
    return lines


def plot_confusions(report: dict, out_dir: Path) -> list[Path]:
    """One PNG per shown hospital (:func:`shown_hospitals`) whose test metrics carry a confusion matrix: counts,
    and recall as the colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = report["classes"]
    written = []
    for name in shown_hospitals(report):
        m = report["test"][name]
        if "confusion" not in m:
            continue
        counts = np.asarray(m["confusion"], dtype=np.float64)
        recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        size = 2.0 + 0.7 * len(classes)
        fig, ax = plt.subplots(figsize=(size + 1.2, size))
        image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    f"{int(counts[i, j])}",
                    ha="center",
                    va="center",
                    color="white" if recall[i, j] > 0.5 else "black",
                    fontsize=8,
                )
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set(xlabel="predicted", ylabel="true")
        ax.set_title(
            f"{name}: acc {m['accuracy']:.3f}, bal. acc {m['balanced_accuracy']:.3f} (round {report['best_round']})",
            fontsize=9,
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="recall (row share)")
        fig.tight_layout()
        path = out_dir / confusion_png(name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_history(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["history"]
    rounds = [h["round"] for h in hist]
    fig, ax = plt.subplots(figsize=(7, 4))
    shown = shown_hospitals(report)
    for name in shown:
        ax.plot(
            rounds,
            [h["test_accuracy"][name] for h in hist],
            label=f"{name} (test)",
            marker="." if len(hist) < 30 else None,
        )
    if len(shown) < len(hist[0]["test_accuracy"]):
        trainers = [h["name"] for h in report["hospitals"] if not h["held_out"]]
        ax.plot(
            rounds,
            [nanmean([h["test_accuracy"][n] for n in trainers]) for h in hist],
            "k-",
            lw=2,
            label=f"mean of all {len(trainers)} training hospitals (test)",
        )
    select_by = report["select_by"]
    ax.plot(rounds, [h["mean_val"][select_by] for h in hist], "k--", label=f"mean val {select_by} (selection)")
    ax.axvline(report["best_round"], color="grey", lw=0.8)
    ax.set(xlabel="round", ylabel="accuracy", title=f"{report['method']}: accuracy per round per hospital")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (
        ("bytes_up", "up (wire)"),
        ("bytes_up_raw", "up (raw fp32)"),
        ("bytes_down", "down (wire)"),
        ("bytes_down_raw", "down (raw fp32)"),
    ):
        ax.plot(rounds, [h[key] / 1e6 for h in hist], label=label)
    ax.set(xlabel="round", ylabel="MB per round", title=f"{report['method']}: bytes per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "bytes.png", dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class SimulateConfig:
    """The settings of ``fedmedclip simulate`` (flat, like every command's): :meth:`sim_config` builds the run."""

    data: str | None = None  # ImageFolder, ROOT/<site>/<class>/* (natural) or CSV manifest (path,label[,group][,site])
    partition: str = "dirichlet"  # dirichlet (label skew, --alpha), iid, or natural (one hospital per site)
    per_class: int | None = None  # a stratified subset of N images per class (quick runs)
    hospitals: int = 4  # training hospitals (dirichlet, iid; natural: one per site)
    alpha: float = 0.5  # Dirichlet label skew (smaller: more skewed); 0 or less: iid
    holdout: str = "true"  # held-out hospital (test only): true (a drawn 'global'), false, or a SITE (natural)
    select_by: str = "accuracy"  # mean val metric that picks the best round: accuracy, balanced_accuracy, macro_f1
    rounds: int = 50  # communication rounds
    method: str = "fedmedclip"  # fedmedclip, fedclip, local, zeroshot, or an ablation (see docs/method.md)
    codec: str = "int8"  # fp32, fp16, int8 or int4: how the adapter travels
    delta: bool = False  # send differences to the last global
    aggregation: str = "weighted"  # weighted, uniform, median or trimmed_mean
    max_samples_per_node: int | None = 1_000_000  # a hospital's training samples weigh at most this (None: no cut)
    max_weight_share: float | None = 0.5  # no hospital's share of the weighted average above this (None: off)
    seed: int = 0  # seeds the partition, the models and the batch order
    backbone: str = BackboneSpec().kind  # effnet-lite0-minilm (offline; not CLIP) or openclip
    arch: str = BackboneSpec().arch  # open_clip architecture (backbone: openclip)
    pretrained: str | None = None  # open_clip pretrained tag or a local checkpoint file (backbone: openclip)
    lr_fam: float = TrainConfig().lr_adapter  # learning rate of the FAM
    lr_mlp: float = TrainConfig().lr_mlp  # learning rate of the private MLP
    compile: bool = False  # on a CPU, torch.compile each full batch's forward pass and loss (pays for long runs)
    cache_dir: str | None = ".cache/features"  # feature cache (None: encode every time)
    device: str | None = None  # cpu or cuda (default: cuda when available)
    out: str = "runs/simulation"  # output folder: report.json, report.md, accuracy.png, bytes.png, confusion_*.png
    progress: bool = True  # progress bars and per-round log lines
    min_hospital_size: int = 10  # dirichlet: redraw until every hospital holds this many images (0: allow empty ones)
    backend: str = "inprocess"  # inprocess (one process), processes (one worker process per core) or ray (Ray actors)
    ray_address: str | None = None  # backend ray: HOST:6379 of a running cluster (default: start Ray here)
    ray_resident_mb: int = 1024  # backend ray: MB of hospital state an actor keeps in memory; the rest spill to disk
    ray_spill_dir: str | None = None  # backend ray: where actors spill hospital state (default: system temp folder)
    workers: int = 0  # inprocess on a CPU, or processes: hospitals trained at once, one torch thread each (0: 1/core)
    runtime: str = "auto"  # image tower: auto (onnxruntime on a CPU, offline backbone), torch or onnxruntime
    dp_epsilon: float | None = None  # differential privacy: each hospital's epsilon budget for the run (sets the noise)
    dp_delta: float | None = None  # differential privacy: delta (default: min(1e-5, 0.1 / training images))
    dp_noise_multiplier: float | None = None  # differential privacy: noise std / clip (with dp_epsilon: a cap)
    dp_clip: float = 1.0  # differential privacy: per-image gradient norm bound
    secure_aggregation: bool = False  # secure aggregation (SecAgg): the aggregator learns only the sum of the updates
    secagg_clip: float = 1.0  # secure aggregation: each value of a hospital's update is clipped to +-this
    secagg_threshold: float = 0.5  # secure aggregation: more than this share of the hospitals must unmask a round

    def __post_init__(self) -> None:
        for name, choices in (
            ("method", METHODS),
            ("codec", CODECS),
            ("aggregation", AGGREGATION_RULES),
            ("backbone", BACKBONE_KINDS),
            ("partition", PARTITIONS),
            ("select_by", SELECT_METRICS),
            ("backend", BACKENDS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}")
        if self.max_samples_per_node is not None and self.max_samples_per_node < 1:
            raise ValueError("max_samples_per_node must be >= 1 (or null: no cut)")
        if self.max_weight_share is not None and not 0.0 < self.max_weight_share <= 1.0:
            raise ValueError("max_weight_share must be in (0, 1] (or null: off)")
        if self.min_hospital_size < 0 or self.ray_resident_mb < 0 or self.workers < 0:
            raise ValueError("min_hospital_size, ray_resident_mb and workers must be >= 0")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {list(RUNTIMES)}")
        if self.ray_address is not None and self.backend != "ray":
            raise ValueError("ray_address needs backend ray")
        self.dp_config()  # refuses a bad privacy setting before anything runs
        check_secure_aggregation(
            self.secure_aggregation, self.aggregation, self.backend, self.secagg_clip, self.secagg_threshold
        )

    def sim_config(self) -> SimConfig:
        return SimConfig(
            data_root=self.data or str(default_data_root()),
            per_class=self.per_class,
            n_hospitals=self.hospitals,
            alpha=self.alpha if self.alpha > 0 else None,
            holdout=parse_holdout(self.holdout),
            partition=self.partition,
            select_by=self.select_by,
            rounds=self.rounds,
            method=self.method,
            wire=WireConfig(codec=self.codec, delta=self.delta),
            aggregation=self.aggregation,
            max_samples_per_node=self.max_samples_per_node,
            max_weight_share=self.max_weight_share,
            seed=self.seed,
            backbone=BackboneSpec(kind=self.backbone, arch=self.arch, pretrained=self.pretrained, runtime=self.runtime),
            train=replace(TrainConfig(), lr_adapter=self.lr_fam, lr_mlp=self.lr_mlp, compile=self.compile),
            cache_dir=self.cache_dir,
            device=self.device,
            progress=self.progress,
            min_hospital_size=self.min_hospital_size,
            backend=self.backend,
            ray_address=self.ray_address,
            ray_resident_mb=self.ray_resident_mb,
            ray_spill_dir=self.ray_spill_dir,
            workers=self.workers,
            dp=self.dp_config(),
            secure_aggregation=self.secure_aggregation,
            secagg_clip=self.secagg_clip,
            secagg_threshold=self.secagg_threshold,
        )

    def dp_config(self) -> DPConfig:
        return DPConfig(
            epsilon=self.dp_epsilon, delta=self.dp_delta, noise_multiplier=self.dp_noise_multiplier, clip=self.dp_clip
        )


def _simulate(cfg: SimulateConfig, _args: argparse.Namespace) -> int:
    if not cfg.progress:
        logging.getLogger().setLevel(logging.WARNING)
    report = run(cfg.sim_config())
    out = Path(cfg.out)
    confusions = write_outputs(report, out)
    print(render_markdown(report))
    print(f"report: {out / 'report.json'}, plots: {out / 'accuracy.png'}, {out / 'bytes.png'}")
    print(f"confusion matrices: {', '.join(str(p) for p in confusions)}")
    return 0


COMMAND = Command(
    name="simulate",
    help="a simulated federation, in one process or on Ray",
    run=_simulate,
    config=SimulateConfig,
    env_prefix="FEDMEDCLIP_SIMULATE_",
    description=__doc__.split("\n\n")[0],
)


def main(argv: Sequence[str] | None = None) -> int:
    return main_for(COMMAND, argv, "python -m shared.simulation")


if __name__ == "__main__":
    raise SystemExit(main())
