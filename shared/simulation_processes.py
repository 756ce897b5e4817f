"""The simulation's process backend: hospitals' steps and evaluations in worker processes of this machine.

``fedmedclip simulate --backend processes`` (:func:`shared.simulation.run`) starts ``workers`` processes (one
per core by default), each with one torch thread and a :class:`~shared.learning.cohort.Cohort` of the
hospitals assigned to it, and keeps every hospital's learner in its process's memory for the whole run. The
in-process backend's threads share one interpreter, so its hospitals take turns at the GIL between kernels
(a training step is many small kernels); processes do not, which is what makes a round faster on a CPU with
more than one core (``bench/results/training.md``). Hospitals are assigned once, largest training split first,
each to the process with the least training so far, since a round ends with its busiest process.

The driver keeps the aggregator's part, as with the other backends: it hands every process its hospitals'
calls at once, consumes the results in hospital order, folds them and sends the new global to every process
once per round. Same steps, same order, one thread per hospital: the report equals the in-process backend's.
Processes are started with ``spawn`` (a fork of a process that holds torch's thread pools is unsafe) and
stopped by :meth:`ProcessBackend.close`, errors and Ctrl-C included (workers leave Ctrl-C to the driver); a
worker whose driver is gone without stopping it (killed) exits by itself within a second. Workers train on the
CPU, as Ray's actors do (on a GPU, use ``inprocess``), and keep every hospital in memory (for thousands of
hospitals whose state does not fit, use ``ray``, which spills it to disk).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch

from shared.learning.cohort import HospitalEvaluation, HospitalUpdate, LearnerSpec, Member, balanced_groups
from shared.learning.rounds import WireConfig
from shared.simulation_ray import CohortActor

log = logging.getLogger("fedmedclip.simulation")

#: How long a worker may take to drop its hospitals at the end before it is killed.
CLOSE_TIMEOUT_S = 60.0
#: How often a worker checks that the driver that started it still runs.
PARENT_POLL_S = 0.5

_actor: CohortActor | None = None  # in a worker process: its hospitals


def _start(parent: int, *args: object) -> None:
    """A worker's start: its hospitals, Ctrl-C left to the driver (which stops the workers), and a watch that
    ends the worker when the driver is gone (killed, or dead before it could stop them)."""
    global _actor
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_without, args=(parent,), name="driver-watch", daemon=True).start()
    _actor = CohortActor(*args)  # type: ignore[arg-type]


def _exit_without(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # orphaned: nobody will ever read this worker's results


def _call(method: str, *args: object) -> object:
    assert _actor is not None, "worker process not started"
    return getattr(_actor, method)(*args)


class ProcessBackend:
    """The hospitals of a simulation in worker processes of this machine (see the module's description)."""

    def __init__(
        self,
        spec: LearnerSpec,
        members: Sequence[Member],
        features: torch.Tensor,
        labels: torch.Tensor,
        held_out: Mapping[str, np.ndarray],
        *,
        workers: int = 0,
    ) -> None:
        groups = balanced_groups(members, workers or os.cpu_count() or 1)
        self.indices = [m.index for m in members]
        self.worker_of = {m.index: k for k, group in enumerate(groups) for m in group}
        context = multiprocessing.get_context("spawn")
        feature_array, label_array = features.detach().cpu().numpy(), labels.detach().cpu().numpy()
        self.pools: list[ProcessPoolExecutor] = []
        try:
            for group in groups:  # one process each: a hospital's learner lives in its process for the whole run
                self.pools.append(
                    ProcessPoolExecutor(
                        1,
                        mp_context=context,
                        initializer=_start,
                        initargs=(os.getpid(), spec, group, feature_array, label_array, dict(held_out), None, None),
                    )
                )
            self.placement = [f.result() for f in [pool.submit(_call, "where") for pool in self.pools]]
        except BaseException:
            self.close()
            raise
        log.info(
            "processes: %d hospitals on %d worker processes (%s training images each)",
            len(members),
            len(groups),
            ", ".join(str(sum(len(m.train) for m in g)) for g in groups),
        )

    def _in_order(self, method: str, *args: object) -> Iterator:
        """``method(index, *args)`` of every hospital, all handed out at once, the results in hospital order."""
        futures: dict[int, Future] = {
            i: self.pools[self.worker_of[i]].submit(_call, method, i, *args) for i in self.indices
        }
        try:
            for i in self.indices:
                yield futures[i].result()
        finally:
            for future in futures.values():
                future.cancel()

    def set_global(self, state: dict[str, torch.Tensor], round_index: int) -> None:
        for future in [pool.submit(_call, "set_global", state, round_index) for pool in self.pools]:
            future.result()

    def updates(self, round_index: int, wire: WireConfig) -> Iterator[HospitalUpdate]:
        return self._in_order("step", round_index, wire)

    def evaluations(self, round_index: int) -> list[HospitalEvaluation]:
        return list(self._in_order("evaluate", round_index))

    def info(self) -> dict:
        workers = [f.result() for f in [pool.submit(_call, "stats") for pool in self.pools]]
        return {"backend": "processes", "workers": len(self.pools), "torch_threads_per_hospital": 1, "actors": workers}

    def close(self) -> None:
        """Stop every worker process (each drops its learners first); a worker that already died is just gone."""
        for pool in self.pools:
            processes = list((getattr(pool, "_processes", None) or {}).values())  # the executor's record of its worker
            try:
                pool.submit(_call, "close").result(timeout=CLOSE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a broken or stuck worker is stopped below all the same
                log.warning("processes: a worker could not close its hospitals: %s", exc)
                for process in processes:
                    process.kill()
            pool.shutdown(wait=True, cancel_futures=True)
        self.pools = []
