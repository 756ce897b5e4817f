"""The in-process federation on a small real subset of the brain tumor MRI set."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from shared.learning.rounds import WireConfig
from shared.learning.training import TrainConfig
from shared.simulation import SimConfig, main, prepare, run, write_outputs

ROUNDS = 15


@pytest.fixture(scope="module")
def config(brain_tumor_root, feature_cache) -> SimConfig:
    return SimConfig(
        data_root=str(brain_tumor_root),
        per_class=80,
        n_hospitals=3,
        alpha=0.5,
        rounds=ROUNDS,
        cache_dir=str(feature_cache),
        device="cpu",
        progress=False,
        train=replace(TrainConfig(), local_epochs=5),
    )  # small data: more steps per round


@pytest.fixture(scope="module")
def prepared(config, backbone):
    return prepare(config, backbone=backbone)


@pytest.fixture(scope="module")
def reports(config, prepared) -> dict[str, dict]:
    return {m: run(replace(config, method=m), prepared) for m in ("fedmedclip", "zeroshot", "fedclip", "local")}


def test_partition_keeps_every_image_on_one_side_of_every_split(prepared):
    seen: dict[str, str] = {}
    for h in prepared.hospitals:
        for part in ("train", "val", "test"):
            for i in getattr(h.split, part):
                sha = prepared.dataset.samples[i].sha256
                assert sha not in seen, f"{sha} in {seen.get(sha)} and {h.name}/{part}"
                seen[sha] = f"{h.name}/{part}"
    assert prepared.duplicates["n_groups"] == 300  # found in the full set before the subset was drawn
    assert [h.held_out for h in prepared.hospitals] == [False, False, False, True]


def test_fedmedclip_beats_zeroshot(reports):
    fed, zero = reports["fedmedclip"]["avg"]["accuracy"], reports["zeroshot"]["avg"]["accuracy"]
    assert fed > zero + 0.15, (fed, zero)
    assert fed > 0.6


def test_ensemble_is_at_least_as_good_as_its_weaker_head(reports):
    heads = reports["fedmedclip"]["test_heads"]
    assert len(heads) == 3
    for name, acc in heads.items():
        assert acc["ensemble"] >= min(acc["clip"], acc["mlp"]) - 1e-9, (name, acc)


def test_model_selection_uses_validation_and_reports_the_paper_avg(reports):
    rep = reports["fedmedclip"]
    best = max(rep["history"], key=lambda h: h["mean_val_accuracy"])
    assert rep["best_mean_val_accuracy"] == best["mean_val_accuracy"]
    assert len(rep["history"]) == ROUNDS
    clients = rep["test"]
    assert set(clients) == {"hospital_1", "hospital_2", "hospital_3", "global"}
    expected_avg = np.mean([c["accuracy"] for c in clients.values()])
    assert rep["avg"]["accuracy"] == pytest.approx(expected_avg)
    for metrics in clients.values():
        assert 0 <= metrics["balanced_accuracy"] <= 1 and 0 <= metrics["ece"] <= 1 and 0 <= metrics["macro_f1"] <= 1


def test_bytes_on_the_wire_are_counted_and_int8_fits_the_budget(reports):
    rep = reports["fedmedclip"]
    per_round = rep["bytes_per_round"]
    assert 0 < per_round["up"] < per_round["up_raw"]
    assert per_round["per_transfer"] <= 0.55e6
    assert per_round["down"] > 0
    assert reports["local"]["bytes_per_round"]["up"] == 0  # nothing travels without federation
    assert reports["zeroshot"]["best_round"] == 1 and len(reports["zeroshot"]["history"]) == 1


def test_report_names_the_backbone_and_is_not_called_clip(reports):
    b = reports["fedmedclip"]["backbone"]
    assert b["is_clip"] is False and "EfficientNet-Lite0" in b["description"]
    assert len(b["fingerprint"]) == 64


def test_same_seed_gives_the_same_run(config, prepared, reports):
    again = run(replace(config, method="fedmedclip"), prepared)
    assert again["avg"] == reports["fedmedclip"]["avg"]
    assert [h["mean_val_accuracy"] for h in again["history"]] == [
        h["mean_val_accuracy"] for h in reports["fedmedclip"]["history"]
    ]


def test_lossless_codec_matches_lossy_closely(config, prepared, reports):
    fp32 = run(replace(config, method="fedmedclip", wire=WireConfig(codec="fp32")), prepared)
    assert fp32["bytes_per_round"]["up"] > 3 * reports["fedmedclip"]["bytes_per_round"]["up"]
    assert abs(fp32["avg"]["accuracy"] - reports["fedmedclip"]["avg"]["accuracy"]) < 0.1


def test_outputs_are_written(reports, tmp_path):
    write_outputs(reports["fedmedclip"], tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["method"] == "fedmedclip" and data["config"]["rounds"] == ROUNDS
    assert "| AVG |" in (tmp_path / "report.md").read_text()
    for png in ("accuracy.png", "bytes.png"):
        blob = (tmp_path / png).read_bytes()
        assert blob.startswith(b"\x89PNG") and len(blob) > 5_000


def test_command_line_runs_end_to_end(brain_tumor_root, feature_cache, tmp_path):
    code = main(
        [
            "--data",
            str(brain_tumor_root),
            "--per-class",
            "80",
            "--hospitals",
            "3",
            "--rounds",
            "2",
            "--cache-dir",
            str(feature_cache),
            "--device",
            "cpu",
            "--codec",
            "int4",
            "--delta",
            "--out",
            str(tmp_path / "run"),
            "--progress",
            "false",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    config = report["config"]  # every flag reached the run
    assert (config["per_class"], config["n_hospitals"], config["rounds"]) == (80, 3, 2)
    assert config["wire"]["codec"] == "int4" and config["wire"]["delta"] is True
    assert [h["round"] for h in report["history"]] == [1, 2]
    assert set(report["test"]) == {h["name"] for h in report["hospitals"]} and len(report["hospitals"]) == 4


def test_command_line_names_a_missing_data_folder_and_exits_2(tmp_path, capsys):
    code = main(["--data", str(tmp_path / "no-such-folder"), "--progress", "false", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no-such-folder" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
