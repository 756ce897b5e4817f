"""The `fedmedclip` command: subcommands, help, one way to read settings, one-line user errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.cli import COMMANDS, build_parser, load_command
from shared.ops.command import Command
from shared.ops.config import ConfigError, field_help, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
FEDMEDCLIP = Path(sys.executable).with_name("fedmedclip")


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(
        [str(FEDMEDCLIP), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO_ROOT
    )


def _leaves(cmd: Command) -> list[Command]:
    return [leaf for child in cmd.subcommands for leaf in _leaves(child)] if cmd.subcommands else [cmd]


def test_console_script_lists_every_subcommand():
    done = _cli("--help")
    assert done.returncode == 0, done.stderr
    for name in ("aggregator", "node", "provision", "partition", "encode", "simulate", "predict"):
        assert name in COMMANDS
        assert f"    {name}" in done.stdout
    assert "exit codes:" in done.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_of_every_subcommand_has_a_description(name):
    for cmd in _leaves(load_command(name)):
        assert cmd.config is not None, cmd.name
        helps = field_help(cmd.config)
        missing = [f.name for f in dataclasses.fields(cmd.config) if not helps[f.name]]
        assert not missing, f"{name} {cmd.name}: no description for {missing}"
    extra = {"node": ["run"], "predict": ["--images", "x"], "audit": ["verify", "audit.log"]}.get(name, [])
    args = build_parser(name).parse_args([name, *extra])
    assert args.command.run is not None


def test_subcommand_help_runs_and_names_the_settings():
    done = _cli("node", "run", "--help")
    assert done.returncode == 0, done.stderr
    assert "--state-dir" in done.stdout and "FEDMEDCLIP_NODE_" in done.stdout
    assert "the federation's CA certificate" in done.stdout  # the field's description, not just its name


def test_python_dash_m_entry_points_still_work():
    for module in ("aggregator", "hospital_node"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
        )
        assert done.returncode == 0, done.stderr


def test_settings_come_from_yaml_then_environment_then_flags(tmp_path):
    from hospital_node.config import NodeConfig

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node_id": "from_yaml", "batch_size": 8, "long_poll_s": 3.0}))
    flags = argparse.Namespace(cfg_long_poll_s="7")
    cfg = load_config(
        NodeConfig,
        yaml_path=[path],
        env_prefix="FEDMEDCLIP_NODE_",
        env={"FEDMEDCLIP_NODE_BATCH_SIZE": "16", "FEDMEDCLIP_NODE_LONG_POLL_S": "5"},
        flags=flags,
    )
    assert (cfg.node_id, cfg.batch_size, cfg.long_poll_s) == ("from_yaml", 16, 7.0)


def test_unknown_yaml_keys_and_environment_variables_are_refused(tmp_path):
    from hospital_node.config import NodeConfig

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node_idd": "x"}))
    with pytest.raises(ConfigError, match="node_idd"):
        load_config(NodeConfig, yaml_path=[path], env_prefix="FEDMEDCLIP_NODE_", env={})
    with pytest.raises(ConfigError, match="FEDMEDCLIP_NODE_BATCHSIZE"):
        load_config(NodeConfig, env_prefix="FEDMEDCLIP_NODE_", env={"FEDMEDCLIP_NODE_BATCHSIZE": "3"})
    # the config file's own variable is not a setting, and is allowed
    cfg = load_config(NodeConfig, env_prefix="FEDMEDCLIP_NODE_", env={"FEDMEDCLIP_NODE_CONFIG": str(path)})
    assert cfg.node_id == NodeConfig().node_id


def test_relative_paths_in_a_yaml_file_are_relative_to_that_file(tmp_path):
    from hospital_node.config import NodeConfig

    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "node.yaml").write_text(yaml.safe_dump({"tls_ca": "ca.pem", "state_dir": "state", "data": "/abs/images"}))
    cfg = load_config(
        NodeConfig, yaml_path=[kit / "node.yaml"], env={}, flags=argparse.Namespace(cfg_cache_dir="rel-cache")
    )
    assert cfg.tls_ca == str(kit / "ca.pem") and cfg.state_dir == str(kit / "state")
    assert cfg.data == "/abs/images"
    assert cfg.cache_dir == "rel-cache"  # flags are relative to the working directory, as a shell user expects


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["simulate", "--data", "/no/such/folder"], {}, "/no/such/folder"),
        (["simulate", "--rounds", "many"], {}, "rounds"),
        (["simulate"], {"FEDMEDCLIP_SIMULATE_ROUND": "3"}, "FEDMEDCLIP_SIMULATE_ROUND"),
        (["node", "run", "--insecure"], {}, "data"),
        (["predict", "--images", "/no/such/images", "--state-dir", "/no/such/state"], {}, "no saved state"),
        (["provision", "--nodes", "a b"], {}, "node ids"),
        (["aggregator", "--config", "/no/such.yaml"], {}, "/no/such.yaml"),
    ],
)
def test_a_user_error_is_one_line_and_exit_2(args, env, needle):
    done = _cli(*args, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert needle in last and (last.startswith("error:") or last.startswith("configuration error:")), last


def test_a_second_node_on_the_same_state_folder_stops_at_once(tmp_path, brain_tumor_root):
    """Two daemons must never write one state folder: the second exits 2 naming the first's pid."""
    images = tmp_path / "images"
    for cls in ("glioma", "notumor"):
        (images / cls).mkdir(parents=True)
        for src in sorted((brain_tumor_root / "Training" / cls).iterdir())[:6]:
            shutil.copy(src, images / cls / src.name)
    common = [
        "node",
        "run",
        "--insecure",
        "--data",
        str(images),
        "--classes",
        "glioma,notumor",
        "--state-dir",
        str(tmp_path / "state"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--metrics-port",
        "0",
        "--aggregator",
        "127.0.0.1:9",
        "--give-up-after-s",
        "120",
        "--progress",
        "false",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.Popen(
        [str(FEDMEDCLIP), *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT
    )
    try:
        lock = tmp_path / "state" / "node.lock"
        for _ in range(600):  # the lock is taken before anything slow (backbone, encoding)
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            assert first.poll() is None, "the first node died"
            subprocess.run(["sleep", "0.1"], check=True)
        assert lock.read_text().strip() == str(first.pid)
        second = _cli(*common)
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr and str(tmp_path / "state") in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one is untouched
    finally:
        first.terminate()
        try:
            first.wait(timeout=30)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait(timeout=10)
    assert lock.read_text() == ""  # released: stop.sh would say "not running"


def test_configuration_reference_is_current():
    from shared.ops.configdoc import DOC, render

    assert DOC.read_text(encoding="utf-8") == render(), "docs/configuration.md is stale: python -m shared.ops.configdoc"
