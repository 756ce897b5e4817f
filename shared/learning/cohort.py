"""Simulated hospitals' side of a round: a set of hospitals in one process, their private state in memory or on disk.

Both simulation backends run the node's part of every round through a :class:`Cohort`: the in-process
backend holds all training hospitals in one, the Ray backend (:mod:`shared.simulation_ray`) gives each
actor a cohort of its share. A hospital's step is :func:`shared.learning.rounds.make_update` (load the
global adapter, train, encode); folding the updates stays with the caller, in hospital order, so both
backends aggregate the same payloads in the same order and end in the same global.

A hospital's persistent state (its FAM copy, private MLP and the AdamW moments of both: about 16 MB in
float32 at D = H = 512) lives in memory while the cohort's budget (``resident_bytes``) allows; beyond it,
its :meth:`HospitalLearner.private_state` is written to ``spill_dir`` after each training step and read
back, into one learner object the cohort reuses, before the next use (exact: float32 tensors and the RNG
state round-trip bit for bit). A hospital without training samples never changes, so it is never
written: it is rebuilt from its seed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.codec import EncodedPayload
from shared.learning.privacy import DPConfig, PrivacyBudgetSpent
from shared.learning.rounds import WireConfig, make_update
from shared.learning.training import HospitalLearner, MethodConfig, RoundStats, TrainConfig


@dataclass(frozen=True)
class LearnerSpec:
    """Everything a hospital's learner is built from, but its index (which seeds its MLP and batch order)."""

    method: MethodConfig
    train: TrainConfig
    dim: int
    num_classes: int
    text_features: torch.Tensor
    logit_scale: float
    seed: int = 0
    device: str = "cpu"
    dp: DPConfig | None = None  # differential privacy at every hospital
    rounds: int = 1  # the run's rounds: differential privacy plans its noise for them

    def build(self, index: int) -> HospitalLearner:
        """Hospital ``index``'s learner; its DP noise is seeded (a simulation is reproducible)."""
        return HospitalLearner(
            self.method,
            self.train,
            dim=self.dim,
            num_classes=self.num_classes,
            text_features=self.text_features,
            logit_scale=self.logit_scale,
            seed=self.seed,
            hospital_index=index,
            device=self.device,
            dp=self.dp,
            noise_seed=self.seed * 1000 + 500 + index,
        )


@dataclass(frozen=True)
class Member:
    """One training hospital of a cohort: its position among the training hospitals and its split."""

    index: int
    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class HospitalUpdate:
    """A hospital's part of one round."""

    index: int
    payload: EncodedPayload | None  # None: the method is not federated, or the hospital has no training data
    stats: RoundStats
    seconds: float  # load the global, train, encode
    state_seconds: float  # its private state read from and written to disk
    state: dict[str, torch.Tensor] | None = None  # the trained adapter itself, when asked (secure aggregation)


@dataclass(frozen=True)
class HospitalEvaluation:
    """A hospital's metrics after one round: val, test (the method's head, and every head with an MLP)."""

    index: int
    client: dict
    held_out: dict[str, dict]  # held-out hospital -> this hospital's model's test metrics there (when asked)
    keep_ratios: dict[str, float] | None  # hospital 0 only: the report's keep ratios
    state_seconds: float


def held_out_by_every_model(method: MethodConfig) -> bool:
    """Who tests on a held-out hospital: every training hospital's own model when nothing global exists (a
    trained, non-federated method), else hospital 0 alone with the global FAM and the prompts (``clip``)."""
    return method.trains and not method.federated


def hospital_step(
    learner: HospitalLearner,
    method: MethodConfig,
    global_state: Mapping[str, torch.Tensor] | None,
    features: torch.Tensor,
    labels: torch.Tensor,
    round_index: int,
    wire: WireConfig,
    rounds: int,
) -> tuple[EncodedPayload | None, RoundStats]:
    """A hospital's part of a round: :func:`make_update` when the method federates, else local training.

    A hospital without training data takes no part (nothing to train on, nothing to send), nor does one
    whose privacy budget one more round would pass (its stats say so in ``privacy["stopped"]``)."""
    if len(labels) == 0:
        return None, RoundStats(0, 0.0, float("nan"), {}, {})
    learner.plan_privacy(len(labels), rounds)
    try:
        if method.federated:
            if global_state is None:
                raise RuntimeError("no global adapter for a federated round (set_global first)")
            return make_update(learner, global_state, features, labels, round_index, wire)
        return None, learner.train_round(features, labels, round_index)
    except PrivacyBudgetSpent as exc:
        return None, RoundStats(0, 0.0, float("nan"), {}, {}, privacy=learner.privacy_summary(stopped=str(exc)))


def evaluate_hospital(
    learner: HospitalLearner,
    method: MethodConfig,
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    held_out: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[dict, dict[str, dict]]:
    """(the hospital's client record: val, test and the heads' test accuracies; its model on ``held_out``)."""
    val_metrics = learner.evaluate(*val)
    heads = (method.head, "clip", "mlp", "ensemble") if method.use_mlp else (method.head,)
    test_metrics = learner.evaluate_heads(*test, heads=tuple(dict.fromkeys(heads)))
    client = {"val": val_metrics, "test": test_metrics[method.head]}
    if method.use_mlp:  # both heads, to check the ensemble against them
        client["test_heads"] = {head: test_metrics[head]["accuracy"] for head in ("clip", "mlp", "ensemble")}
    head = None if held_out_by_every_model(method) else "clip"  # clip: a hospital that never trained has no MLP
    return client, {name: learner.evaluate(*part, head=head) for name, part in held_out.items()}


def state_nbytes(learner: HospitalLearner) -> int:
    """A learner's persistent bytes once trained: parameters and buffers, plus two AdamW moments per parameter
    (its gradients are dropped between uses)."""
    modules = [m for m in (learner.adapter, learner.mlp) if m is not None]
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    buffers = sum(b.numel() * b.element_size() for m in modules for b in m.buffers())
    return 3 * params + buffers


def balanced_groups(members: Sequence[Member], workers: int) -> list[list[Member]]:
    """``members`` over at most ``workers`` groups, for processes or actors that each hold one group for a whole
    run (a round ends with the busiest): largest training split first, each to the group with the least
    training so far (ties: the fewest hospitals, then the lowest group). Every group is non-empty and in
    hospital order."""
    n = max(1, min(workers, len(members)))
    groups: list[list[Member]] = [[] for _ in range(n)]
    load = [0] * n
    for m in sorted(members, key=lambda m: (-len(m.train), m.index)):
        k = min(range(n), key=lambda j: (load[j], len(groups[j]), j))
        groups[k].append(m)
        load[k] += len(m.train)
    return [sorted(g, key=lambda m: m.index) for g in groups if g]


@dataclass
class CohortStats:
    """What a cohort holds and moved: learners in memory, on disk, bytes written and read, one learner's bytes."""

    resident: int = 0
    spilled: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    state_nbytes: int = 0
    spill_dir: str | None = None


class Cohort:
    """Training hospitals of one process: builds their learners, runs their steps, keeps or spills their state.

    ``features``/``labels`` are the whole federation's (each member's split indexes them; ``held_out``
    maps a held-out hospital to its test indices). ``resident_bytes`` None keeps every learner in
    memory; otherwise learners are kept while their estimated state fits, and the others spilled to
    ``spill_dir`` (a fresh temporary folder, under the given one or the system's, removed by
    :meth:`close`).
    """

    def __init__(
        self,
        spec: LearnerSpec,
        members: Sequence[Member],
        features: torch.Tensor,
        labels: torch.Tensor,
        held_out: Mapping[str, np.ndarray] | None = None,
        *,
        resident_bytes: int | None = None,
        spill_dir: str | None = None,
    ) -> None:
        self.spec = spec
        self.members = {m.index: m for m in members}
        self.features, self.labels = features, labels
        self.held_out = dict(held_out or {})
        self.resident_bytes = resident_bytes
        self._spill_parent = spill_dir
        self._spill_dir: Path | None = None
        self._resident: dict[int, HospitalLearner] = {}
        self._spare: HospitalLearner | None = None
        self._on_disk: set[int] = set()
        self._global: dict[str, torch.Tensor] | None = None
        self._global_round: int | None = None
        self.stats = CohortStats()

    # -- data ------------------------------------------------------------------------------------
    def part(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(np.array(idx, dtype=np.int64))  # a writable copy
        return self.features[index], self.labels[index]

    # -- the global adapter ----------------------------------------------------------------------
    def set_global(self, state: Mapping[str, torch.Tensor], round_index: int) -> None:
        """The global every member trains from in round ``round_index`` (and is evaluated with after round
        ``round_index - 1``)."""
        self._global = dict(state)
        self._global_round = round_index

    def _check_round(self, round_index: int) -> None:
        if self.spec.method.federated and self._global_round != round_index:
            raise RuntimeError(f"round {round_index}: this cohort holds the global of round {self._global_round}")

    # -- learners in memory or on disk -----------------------------------------------------------
    def build_resident(self) -> None:
        """Build every member's learner now, one after the other (a cohort that keeps them all in memory):
        building seeds torch's global RNG, so learners must not be built by two threads at once; afterwards
        :meth:`step` and :meth:`evaluate` of different members may run on different threads."""
        if self.resident_bytes is not None:
            raise RuntimeError("only a cohort that keeps every learner in memory can run its members on threads")
        for index in sorted(self.members):
            if index not in self._resident:
                self._resident[index] = self.spec.build(index)
        if self._resident and not self.stats.state_nbytes:
            self.stats.state_nbytes = state_nbytes(next(iter(self._resident.values())))
        self.stats.resident = len(self._resident)

    def _path(self, index: int) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="fedmedclip-spill-", dir=self._spill_parent))
            self.stats.spill_dir = str(self._spill_dir)
        return self._spill_dir / f"hospital_{index}.pt"

    def _learner(self, index: int) -> tuple[HospitalLearner, float]:
        """Member ``index``'s learner: its own when resident; else one learner object reused for every spilled
        hospital, holding its private state read back from disk; else (never written) a fresh one from its seed."""
        learner = self._resident.get(index)
        if learner is not None:
            return learner, 0.0
        if index not in self._on_disk:
            learner = self.spec.build(index)
            if not self.stats.state_nbytes:
                self.stats.state_nbytes = state_nbytes(learner)
            return learner, 0.0
        # private_state() is everything that differs between two hospitals' learners (the HospitalLearner
        # contract a node's restart relies on too), so loading it makes any learner object that hospital's;
        # building one costs several times more than reading its state back
        learner, self._spare = self._spare or self.spec.build(index), None
        t0 = time.perf_counter()
        path = self._path(index)
        learner.load_private_state(torch.load(path, map_location=learner.device, weights_only=True))
        self.stats.bytes_read += path.stat().st_size
        return learner, time.perf_counter() - t0

    def _keep(self, index: int, learner: HospitalLearner, changed: bool) -> float:
        """Keep ``learner`` in memory if the budget allows, else write it to disk when it ``changed``; a learner
        not kept becomes the spare object the next spilled hospital is loaded into."""
        for module in (learner.adapter, learner.mlp):  # gradients are set anew every step: 5 MB a learner less
            if module is not None:
                for param in module.parameters():
                    param.grad = None
        if index in self._resident:
            return 0.0
        budget = self.resident_bytes
        if budget is None or (len(self._resident) + 1) * self.stats.state_nbytes <= budget:
            self._resident[index] = learner
            self._on_disk.discard(index)
            self.stats.resident = len(self._resident)
            return 0.0
        self._spare = learner
        if not changed:
            return 0.0
        t0 = time.perf_counter()
        path = self._path(index)
        tmp = path.with_suffix(".tmp")
        torch.save(learner.private_state(), tmp)
        tmp.replace(path)
        self._on_disk.add(index)
        self.stats.spilled = len(self._on_disk)
        self.stats.bytes_written += path.stat().st_size
        return time.perf_counter() - t0

    # -- a round ---------------------------------------------------------------------------------
    def step(self, index: int, round_index: int, wire: WireConfig, keep_state: bool = False) -> HospitalUpdate:
        """Member ``index``'s part of round ``round_index`` (0-based); ``keep_state``: the update carries the
        trained adapter state too (secure aggregation encodes it in its ring instead of the codec's payload)."""
        self._check_round(round_index)
        member = self.members[index]
        learner, load_s = self._learner(index)
        features, labels = self.part(member.train)
        t0 = time.perf_counter()
        payload, stats = hospital_step(
            learner, self.spec.method, self._global, features, labels, round_index, wire, self.spec.rounds
        )
        seconds = time.perf_counter() - t0
        state = learner.adapter_state() if keep_state and payload is not None else None
        save_s = self._keep(index, learner, changed=len(labels) > 0)
        return HospitalUpdate(index, payload, stats, seconds, load_s + save_s, state)

    def evaluate(self, index: int, round_index: int) -> HospitalEvaluation:
        """Member ``index`` after round ``round_index`` (0-based), holding that round's new global."""
        method = self.spec.method
        if method.federated:
            self._check_round(round_index + 1)
        member = self.members[index]
        learner, load_s = self._learner(index)
        if method.federated:
            learner.load_adapter_state(dict(self._global))
        every = held_out_by_every_model(method)
        held_out = {name: self.part(idx) for name, idx in self.held_out.items()} if every or index == 0 else {}
        client, on_held_out = evaluate_hospital(
            learner, method, self.part(member.val), self.part(member.test), held_out
        )
        keep = learner.keep_ratios() if index == 0 else None
        load_s += self._keep(index, learner, changed=False)  # evaluation changes nothing a later round reads
        return HospitalEvaluation(index, client, on_held_out, keep, load_s)

    def close(self) -> None:
        """Drop the learners and remove the spill folder."""
        self._resident.clear()
        self._on_disk.clear()
        self._spare = None
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
