"""The simulation's Ray backend: the in-process backend's report for the same seed, Ray started and stopped by it."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import ray

from shared import simulation
from shared.learning.cohort import Cohort, LearnerSpec, Member
from shared.learning.rounds import WireConfig
from shared.learning.training import build_adapter, get_method
from shared.simulation import SimConfig, main, prepare, render_markdown, run
from tests.services_support import backend_outcome as outcome


@pytest.fixture(autouse=True)
def no_ray_left_behind():
    """Every test starts without Ray and leaves none running, whatever its outcome."""
    assert not ray.is_initialized()
    try:
        yield
    finally:
        if ray.is_initialized():  # the backend failed to shut down the Ray it started: fail, but clean up
            ray.shutdown()
            pytest.fail("the Ray backend left Ray running")


def in_process(config: SimConfig, prepared) -> dict:
    """The reference: the in-process backend as it runs by default (hospitals on threads, one torch thread each)."""
    report = run(config, prepared)
    assert report["backend"]["workers"] == min(os.cpu_count() or 1, config.n_hospitals)
    return report


def spill_dirs(report: dict) -> list[Path]:
    return [Path(a["spill_dir"]) for a in report["backend"]["actors"] if a["spill_dir"]]


@pytest.fixture(scope="module")
def config(four_hospitals) -> SimConfig:
    return four_hospitals


def test_ray_backend_from_the_command_line_gives_the_in_process_report(config, backbone, tmp_path):
    """4 hospitals on 2 actors; a 16 MB budget keeps one hospital per actor in memory and spills the other."""
    reference = in_process(config, prepare(config, backbone=backbone))
    argv = ["--backend", "ray", "--ray-resident-mb", "16", "--data", config.data_root, "--per-class", "20"]
    argv += ["--hospitals", "4", "--rounds", "3", "--cache-dir", config.cache_dir, "--device", "cpu"]
    assert main([*argv, "--progress", "false", "--out", str(tmp_path / "run")]) == 0
    assert not ray.is_initialized()  # the backend started Ray, and shut it down
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["backend"] == "ray"
    info = report["backend"]
    assert info["backend"] == "ray" and info["started_here"] is True
    actors = info["actors"]
    assert len(actors) == 2 and sorted(a["hospitals"] for a in actors) == [2, 2]  # one actor per CPU
    assert [(a["resident"], a["spilled"]) for a in actors] == [(1, 1), (1, 1)]
    assert all(a["bytes_read"] > 0 for a in actors)  # the spilled hospitals were read back, every round
    assert spill_dirs(report) and not any(p.exists() for p in spill_dirs(report))  # removed at the end
    assert outcome(report) == outcome(reference)  # exactly the in-process report
    assert len(report["history"]) == 3 and report["test"].keys() == reference["test"].keys()
    assert "Backend: Ray" in (tmp_path / "run" / "report.md").read_text()


@pytest.fixture(scope="module")
def many(config) -> SimConfig:
    """20 hospitals on 80 images: a few images each, one none (what 1,000 hospitals on the full set look like)."""
    return replace(config, n_hospitals=20, min_hospital_size=0, rounds=2)


@pytest.fixture(scope="module")
def many_prepared(many, backbone):
    return prepare(many, backbone=backbone)


def test_cohort_spilling_every_hospital_to_disk_changes_nothing(many, many_prepared, tmp_path):
    """What each actor does, in-process: the small hospitals' state on disk between uses, or all in memory."""
    prepared = many_prepared
    training = [h for h in prepared.hospitals if not h.held_out]
    assert any(len(h.split.train) == 0 for h in training) and any(len(h.split.train) > 0 for h in training)
    method = get_method(many.method)
    spec = LearnerSpec(
        method,
        many.train,
        dim=prepared.features.shape[1],
        num_classes=len(prepared.dataset.class_names),
        text_features=prepared.text,
        logit_scale=prepared.backbone.logit_scale,
    )
    members = [Member(i, h.name, h.split.train, h.split.val, h.split.test) for i, h in enumerate(training)]
    held = {h.name: h.split.test for h in prepared.hospitals if h.held_out}
    glob = build_adapter(method, spec.dim, many.train, 0).travel_state()
    runs = []
    for budget in (None, 0):
        cohort = Cohort(
            spec, members, prepared.features, prepared.labels, held, resident_bytes=budget, spill_dir=str(tmp_path)
        )
        seen = []
        for r in range(2):
            cohort.set_global(glob, r)
            ups = [cohort.step(m.index, r, WireConfig()) for m in members]
            seen.append([u.payload.sha256 if u.payload else None for u in ups])
            cohort.set_global(glob, r + 1)
            seen.append(json.dumps([cohort.evaluate(m.index, r).client for m in members], sort_keys=True))
        if budget == 0:
            trained = sum(len(m.train) > 0 for m in members)
            assert cohort.stats.spilled == trained and cohort.stats.resident == 0  # an empty one is rebuilt
            assert cohort.stats.bytes_read > 0
        cohort.close()
        runs.append(seen)
    assert runs[0] == runs[1]
    assert list(tmp_path.iterdir()) == []


def test_hospitals_without_training_data_send_nothing(many, many_prepared):
    report = run(many, many_prepared)
    sizes = {h["name"]: h["train"] for h in report["hospitals"] if not h["held_out"]}
    empty = [n for n, k in sizes.items() if k == 0]
    assert empty and all(report["test"][n]["n"] == 0 for n in empty)
    per_transfer = report["bytes_per_round"]["per_transfer"]
    assert report["bytes_per_round"]["up"] == pytest.approx(per_transfer * sum(k > 0 for k in sizes.values()))
    assert len(report["test"]) == 21 and "the tables show 9 of them" in render_markdown(report)


def test_ray_started_by_the_backend_is_shut_down_when_the_run_fails(config, backbone, monkeypatch, tmp_path):
    prepared = prepare(config, backbone=backbone)

    def broken(*args, **kwargs):
        assert ray.is_initialized()  # the failure comes while Ray runs
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(simulation, "_round_record", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(replace(config, backend="ray", ray_resident_mb=0, ray_spill_dir=str(tmp_path)), prepared)
    assert not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []  # the actors removed their spill folders


def test_ray_address_of_no_cluster_is_a_user_error(config, tmp_path, capsys):
    argv = ["--backend", "ray", "--ray-address", "127.0.0.1:1", "--data", config.data_root, "--per-class", "20"]
    argv += ["--cache-dir", config.cache_dir, "--device", "cpu", "--progress", "false", "--out", str(tmp_path / "run")]
    code = main(argv)
    assert code == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "Traceback" not in err
