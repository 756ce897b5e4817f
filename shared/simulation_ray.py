"""The simulation's Ray backend: hospitals' steps and evaluations in a pool of Ray actors.

``fedmedclip simulate --backend ray`` (:func:`shared.simulation.run`) hands every training hospital's
part of a round to an actor: the pool has one actor per CPU Ray offers (this machine's cores, or a
cluster's with ``--ray-address``), each with one torch thread and a
:class:`~shared.learning.cohort.Cohort` of the hospitals :func:`~shared.learning.cohort.balanced_groups` gives
it (largest training split first, to the actor with the least training so far). The
federation's feature matrix goes into Ray's object store once (``ray.put``) and every actor maps it
(zero-copy on its node); an actor builds its hospitals' learners and keeps their private state in
memory up to ``resident_mb``, spilling the rest to its node's disk between uses. The driver keeps the
aggregator's part: it consumes the updates in hospital order (a window of calls per actor in flight,
so the actors never wait and at most a few payloads are held), folds them, and publishes the global
to every actor once per round. Same steps, same order: the report equals the in-process backend's.

Ray is started on this machine (``num_cpus`` = its cores, a small object store, no dashboard) and
shut down at the end, errors included; with ``address`` the driver joins a running cluster and only
disconnects from it. Ray is imported here only: ``pip install ray==2.60.0`` (requirements.txt) is
needed for this backend alone.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict

import numpy as np
import torch

from shared.errors import FedMedCLIPError
from shared.learning.cohort import Cohort, HospitalEvaluation, HospitalUpdate, LearnerSpec, Member, balanced_groups
from shared.learning.rounds import WireConfig

log = logging.getLogger("fedmedclip.simulation")

#: Calls in flight per actor: enough that an actor never waits for the driver's fold.
WINDOW_PER_ACTOR = 4
#: Ray's shared-memory object store when this backend starts Ray: the features plus this much
#: (a round's payloads in flight are a few MB).
OBJECT_STORE_HEADROOM = 192 * 1024**2


class RayUnavailableError(FedMedCLIPError):
    """``--backend ray`` without Ray installed, or a cluster that cannot be reached."""


class CohortActor:
    """One Ray actor: a :class:`Cohort` of the hospitals assigned to it (wrapped by ``ray.remote`` at start)."""

    def __init__(
        self,
        spec: LearnerSpec,
        members: Sequence[Member],
        features: np.ndarray,
        labels: np.ndarray,
        held_out: Mapping[str, np.ndarray],
        resident_bytes: int,
        spill_dir: str | None,
    ) -> None:
        torch.set_num_threads(1)  # one CPU per actor; the in-process backend's equal with one thread
        with warnings.catch_warnings():  # the object store's array is read-only; it is only ever read
            warnings.simplefilter("ignore", UserWarning)
            feats = torch.from_numpy(features)
        self.cohort = Cohort(
            spec,
            members,
            feats,
            torch.from_numpy(np.array(labels)),
            held_out,
            resident_bytes=resident_bytes,
            spill_dir=spill_dir,
        )

    def where(self) -> dict:
        return {"node": socket.gethostname(), "pid": os.getpid(), "hospitals": len(self.cohort.members)}

    def set_global(self, state: dict[str, torch.Tensor], round_index: int) -> None:
        self.cohort.set_global(state, round_index)

    def step(self, index: int, round_index: int, wire: WireConfig) -> HospitalUpdate:
        return self.cohort.step(index, round_index, wire)

    def evaluate(self, index: int, round_index: int) -> HospitalEvaluation:
        return self.cohort.evaluate(index, round_index)

    def stats(self) -> dict:
        return {
            **self.where(),
            **asdict(self.cohort.stats),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    def close(self) -> None:
        self.cohort.close()


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(
            "--backend ray needs Ray: pip install -c requirements.txt ray (requirements.txt pins it)"
        ) from exc
    return ray


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse a HOST:PORT nobody listens on at once (``ray.init`` would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray://...: Ray's own resolution
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayUnavailableError(
            f"no Ray cluster at {address}: {exc} (start one with `ray start --head --port {port}`)"
        ) from exc


class RayBackend:
    """The hospitals of a simulation as Ray actors (see the module's description)."""

    def __init__(
        self,
        spec: LearnerSpec,
        members: Sequence[Member],
        features: torch.Tensor,
        labels: torch.Tensor,
        held_out: Mapping[str, np.ndarray],
        *,
        address: str | None = None,
        resident_mb: int = 1024,
        spill_dir: str | None = None,
    ) -> None:
        ray = self._ray = _import_ray()
        self.actors: list = []
        self._connected = False  # this backend called ray.init, so it calls ray.shutdown
        self._started_here = False
        self.indices = [m.index for m in members]
        feature_array = features.detach().cpu().numpy()
        label_array = labels.detach().cpu().numpy()
        if not ray.is_initialized():
            kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
            if address:
                _check_reachable(address)
                try:
                    ray.init(address=address, **kwargs)
                except (ConnectionError, RuntimeError) as exc:
                    raise RayUnavailableError(f"no Ray cluster at {address}: {exc}") from exc
            else:
                ray.init(
                    num_cpus=os.cpu_count() or 1,
                    include_dashboard=False,
                    object_store_memory=int(feature_array.nbytes + label_array.nbytes + OBJECT_STORE_HEADROOM),
                    **kwargs,
                )
                self._started_here = True
            self._connected = True
        try:
            cpus = int(ray.available_resources().get("CPU", 0))
            groups = balanced_groups(members, cpus or 1)
            self.actor_of = {m.index: k for k, group in enumerate(groups) for m in group}
            features_ref, labels_ref = ray.put(feature_array), ray.put(label_array)  # once, not per task
            actor = ray.remote(num_cpus=1)(CohortActor)
            self.actors = [
                actor.remote(
                    spec,
                    group,
                    features_ref,
                    labels_ref,
                    dict(held_out),
                    resident_mb * 1024**2,
                    spill_dir,
                )
                for group in groups
            ]
            self.placement = ray.get([a.where.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        nodes = sorted({p["node"] for p in self.placement})
        log.info(
            "ray: %d hospitals on %d actors (%d CPUs offered) on %d node(s): %s; up to %d MB of hospital state "
            "in memory per actor, the rest spilled to disk",
            len(members),
            len(self.actors),
            cpus,
            len(nodes),
            ", ".join(nodes),
            resident_mb,
        )

    def _in_order(self, method: str, *args) -> Iterator:
        """``actor.method(index, *args)`` for every hospital, results in hospital order, a window in flight."""
        ray = self._ray
        window = WINDOW_PER_ACTOR * len(self.actors)
        todo = iter(self.indices)
        pending: deque = deque()

        def submit() -> None:
            index = next(todo, None)
            if index is not None:
                pending.append(getattr(self.actors[self.actor_of[index]], method).remote(index, *args))

        for _ in range(window):
            submit()
        while pending:
            ref = pending.popleft()
            result = ray.get(ref)
            submit()
            yield result

    def set_global(self, state: dict[str, torch.Tensor], round_index: int) -> None:
        ref = self._ray.put(state)  # once per round; every actor reads the same object
        self._ray.get([a.set_global.remote(ref, round_index) for a in self.actors])

    def updates(self, round_index: int, wire: WireConfig) -> Iterator[HospitalUpdate]:
        return self._in_order("step", round_index, wire)

    def evaluations(self, round_index: int) -> list[HospitalEvaluation]:
        return list(self._in_order("evaluate", round_index))

    def info(self) -> dict:
        actors = self._ray.get([a.stats.remote() for a in self.actors])
        return {
            "backend": "ray",
            "ray_version": self._ray.__version__,
            "started_here": self._started_here,
            "nodes": sorted({a["node"] for a in actors}),
            "actors": actors,
        }

    def close(self) -> None:
        """Remove the actors' spill folders, end the actors, and shut down the Ray this backend started."""
        ray = self._ray
        try:
            if self.actors:
                try:
                    ray.get([a.close.remote() for a in self.actors], timeout=120)
                except Exception as exc:  # noqa: BLE001 - a dead actor cannot clean up; its temp folder stays
                    log.warning("ray: an actor could not remove its spill folder: %s", exc)
                for a in self.actors:
                    ray.kill(a)
                self.actors = []
        finally:
            if self._connected:
                ray.shutdown()  # stops the Ray started here; with an address, only disconnects from the cluster
                self._connected = False
