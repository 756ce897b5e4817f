"""The simulation's process backend: the in-process backend's report for the same seed, from worker processes
that it starts and stops whatever happens (a failed run, a worker killed mid-run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace

import numpy as np
import pytest

from shared import simulation, simulation_processes
from shared.learning.cohort import Member, balanced_groups
from shared.simulation import SimConfig, main, prepare, run
from tests.services_support import backend_outcome, service_env


def alive(pid: int) -> bool:
    """The process runs (a zombie, ended but not yet reaped by whoever inherited it, does not)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def worker_pids(monkeypatch) -> list[int]:
    """The pids of the worker processes every ProcessBackend of the test starts, as they start."""
    pids: list[int] = []
    start = simulation_processes.ProcessBackend.__init__

    def recording(self, *args, **kwargs):
        start(self, *args, **kwargs)
        pids.extend(p["pid"] for p in self.placement)

    monkeypatch.setattr(simulation_processes.ProcessBackend, "__init__", recording)
    yield pids
    for pid in pids:  # a failing test still leaves no worker behind
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def config(four_hospitals) -> SimConfig:
    return four_hospitals


@pytest.fixture(scope="module")
def prepared(config, backbone):
    return prepare(config, backbone=backbone)


def test_processes_backend_from_the_command_line_gives_the_in_process_report(config, prepared, worker_pids, tmp_path):
    """4 hospitals on 2 worker processes (one per core of this machine, or 2 asked for elsewhere)."""
    reference = run(config, prepared)
    assert reference["backend"]["backend"] == "inprocess"
    argv = ["--backend", "processes", "--workers", "2", "--data", config.data_root, "--per-class", "20"]
    argv += ["--hospitals", "4", "--rounds", "3", "--cache-dir", config.cache_dir, "--device", "cpu"]
    assert main([*argv, "--progress", "false", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["backend"] == "processes"
    info = report["backend"]
    assert info["backend"] == "processes" and info["workers"] == 2
    assert sorted(a["hospitals"] for a in info["actors"]) == [2, 2]
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert sorted(a["pid"] for a in info["actors"]) == sorted(worker_pids)
    assert not any(alive(pid) for pid in worker_pids)  # stopped at the end of the run
    assert backend_outcome(report) == backend_outcome(reference)  # exactly the in-process report
    assert (
        "Backend: 2 worker processes on this machine, 2, 2 hospitals each"
        in (tmp_path / "run" / "report.md").read_text()
    )


def test_worker_processes_are_stopped_when_the_run_fails(config, prepared, worker_pids, monkeypatch):
    def broken(*args, **kwargs):
        assert worker_pids and all(alive(pid) for pid in worker_pids)  # the failure comes while they run
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(simulation, "_round_record", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(replace(config, backend="processes"), prepared)
    assert not any(alive(pid) for pid in worker_pids)


def test_a_worker_killed_mid_run_fails_the_run_and_the_others_are_stopped(config, prepared, worker_pids, monkeypatch):
    record = simulation._round_record

    def kill_one_worker(*args, **kwargs):
        if len(worker_pids) == 2 and alive(worker_pids[0]):
            os.kill(worker_pids[0], signal.SIGKILL)
        return record(*args, **kwargs)

    monkeypatch.setattr(simulation, "_round_record", kill_one_worker)
    with pytest.raises(BrokenProcessPool):  # the next round's steps on the dead worker
        run(replace(config, backend="processes", workers=2), prepared)
    assert len(worker_pids) == 2 and not any(alive(pid) for pid in worker_pids)


def spawned_children(parent: int) -> list[int]:
    """The pids of ``parent``'s worker processes (multiprocessing's spawned children; not its resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
                command = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:  # gone meanwhile
                continue
            if ppid == parent and b"spawn_main" in command:
                found.append(int(entry))
    return found


def test_workers_end_when_the_driver_is_killed(config, tmp_path):
    """SIGKILL leaves the driver no time to stop its workers: each notices it is orphaned and exits."""
    argv = ["--backend", "processes", "--workers", "2", "--data", config.data_root, "--per-class", "20"]
    argv += ["--rounds", "100000", "--cache-dir", config.cache_dir, "--device", "cpu", "--progress", "false"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "shared.simulation", *argv, "--out", str(tmp_path / "run")],
        env=service_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = spawned_children(driver.pid)
        assert len(workers) == 2, f"the driver did not start 2 workers (exit code {driver.poll()})"
        time.sleep(2)  # into their start-up or the rounds: either way they must end
        driver.kill()
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers)
    finally:
        driver.kill()
        driver.wait(timeout=30)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_hospitals_are_assigned_largest_first_to_the_least_loaded_worker():
    def member(i: int, n: int) -> Member:
        empty = np.zeros(0, dtype=np.int64)
        return Member(i, f"h{i}", np.arange(n), empty, empty)

    sizes = [730, 841, 629, 1070]  # the 4 hospitals of the brain tumor protocol, seed 0
    groups = balanced_groups([member(i, n) for i, n in enumerate(sizes)], 2)
    assert [[m.index for m in g] for g in groups] == [[2, 3], [0, 1]]  # 1699 and 1571 images; round robin: 1359, 1911
    assert [sum(len(m.train) for m in g) for g in groups] == [1699, 1571]
    assert [len(g) for g in balanced_groups([member(0, 5)], 8)] == [1]  # never an idle worker
    # hospitals without training data still cost an evaluation: spread by count when the loads tie
    assert [[m.index for m in g] for g in balanced_groups([member(i, 0) for i in range(4)], 2)] == [[0, 2], [1, 3]]
