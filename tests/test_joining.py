"""README, "Joining a federation as a hospital", followed literally.

The two shell blocks of that section are read from README.md and run as written: the operator's
block provisions the kits and starts the aggregator from its kit; each hospital's block unpacks its
kit in another folder, checks, encodes, starts its node and, once a round is done, predicts. Only
what cannot be literal on a test machine is changed: the image folders (``/data/mri``, ``/data/new``)
point at small real subsets, and ports come from the environment (free ones) instead of the defaults.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
SECTION = "## Joining a federation as a hospital"


def _blocks() -> tuple[list[str], list[str]]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the section holds the operator's block and the hospital's block"
    lines = [[ln for ln in b.splitlines() if ln.strip()] for b in blocks]
    return lines[0], lines[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_images(src: Path, dest: Path, classes: dict[str, int], skip: int = 0) -> None:
    for cls, n in classes.items():
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / cls).iterdir())[skip : skip + n]:
            shutil.copy(f, dest / cls / f.name)


class Shell:
    """Runs README lines one by one, keeping the working folder and the exports between them."""

    def __init__(self, cwd: Path, env: dict[str, str], paths: dict[str, str], logs: Path) -> None:
        self.cwd, self.env, self.paths, self.logs = cwd, env, paths, logs
        self.daemons: list[subprocess.Popen] = []

    def log_tail(self, index: int = 0, lines: int = 40) -> str:
        """The last lines a background command wrote (stdout and stderr), for a failure's message."""
        return "\n".join((self.logs / f"{self.cwd.name}-{index}.log").read_text().splitlines()[-lines:])

    def _literal(self, line: str) -> str:
        for readme_path, real in self.paths.items():
            line = line.replace(readme_path, real)
        return line

    def run(self, line: str, *, background: bool = False, timeout: float = 300):
        line = self._literal(line)
        command = line.split(" #", 1)[0].strip()
        if command.startswith("export "):
            key, _, value = command.removeprefix("export ").partition("=")
            self.env[key] = value
            return None
        cd = re.search(r"&& cd (\S+)$", command)
        if background:  # its output in a file beside the test's other folders (never in a kit)
            self.logs.mkdir(exist_ok=True)
            with open(self.logs / f"{self.cwd.name}-{len(self.daemons)}.log", "wb") as out:
                proc = subprocess.Popen(
                    ["bash", "-c", command],
                    cwd=self.cwd,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.daemons.append(proc)
            return proc
        done = subprocess.run(
            ["bash", "-c", command], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        if cd:
            self.cwd = (self.cwd / cd.group(1)).resolve()
        return done


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def test_a_hospital_joins_from_its_kit_alone(tmp_path, brain_tumor_root, feature_cache):
    operator_lines, hospital_lines = _blocks()
    port = _free_port()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}:{os.environ['PATH']}",
        FEDMEDCLIP_PROVISION_PORT=str(port),
        FEDMEDCLIP_AGGREGATOR_METRICS_PORT="0",
        FEDMEDCLIP_AGGREGATOR_HEALTH_PORT="0",
        FEDMEDCLIP_NODE_METRICS_PORT="0",
        FEDMEDCLIP_NODE_PROGRESS="false",
    )
    train = brain_tumor_root / "Training"
    data = {"hospital_a": tmp_path / "site-a" / "mri", "hospital_b": tmp_path / "site-b" / "mri"}
    _copy_images(train, data["hospital_a"], {"glioma": 12, "notumor": 12, "pituitary": 6})
    _copy_images(train, data["hospital_b"], {"meningioma": 12, "pituitary": 12, "glioma": 6}, skip=20)
    new_images = tmp_path / "new"
    _copy_images(brain_tumor_root / "Testing", new_images, {"glioma": 2, "notumor": 2})

    operator = Shell(tmp_path / "operator", dict(env), {}, tmp_path / "logs")
    operator.cwd.mkdir()
    provision, tar, start_aggregator = operator_lines
    operator.run(provision)
    operator.run(tar)
    operator.run(tar.replace("hospital_a", "hospital_b"))  # the same step for the second hospital
    assert not list((operator.cwd / "kits").rglob("ca.key"))
    aggregator = operator.run(start_aggregator, background=True)
    runs = operator.cwd / "kits" / "aggregator" / "runs"
    report = runs / "report.json"
    deadline = time.monotonic() + 300  # the operator waits for "aggregator serving on ..." before telling the sites
    while not (runs / "endpoints.json").exists():
        assert aggregator.poll() is None, "the aggregator exited"
        assert time.monotonic() < deadline, "the aggregator did not start serving"
        time.sleep(0.2)
    hospitals: dict[str, Shell] = {}
    try:
        for name in ("hospital_a", "hospital_b"):
            site = data[name].parent
            shutil.copy(operator.cwd / f"{name}.tar", site / f"{name}.tar")  # the kit leaves the operator
            shell = Shell(
                site, dict(env), {"/data/mri": str(data[name]), "/data/new": str(new_images)}, tmp_path / "logs"
            )
            hospitals[name] = shell
            for line in hospital_lines:
                line = line.replace("hospital_a", name)
                if line.startswith("./start.sh"):
                    shell.run(line, background=True)
                    break
                done = shell.run(line)
                if "node check" in line:
                    assert done.stdout.count("PASSED") == 5, done.stdout  # with the dry-run registration
            assert shell.cwd == site / "fedmedclip" / name
        # the first round, with both hospitals' updates
        deadline = time.monotonic() + 600
        while True:
            history = json.loads(report.read_text()).get("history", []) if report.exists() else []
            if history and history[0].get("complete"):
                break
            assert aggregator.poll() is None, "the aggregator exited"
            assert all(p.poll() is None for s in hospitals.values() for p in s.daemons), "a node exited"
            assert time.monotonic() < deadline, "no round completed"
            time.sleep(0.5)
        assert history[0]["updates"] == 2
        shell = hospitals["hospital_a"]
        predict = next(line for line in hospital_lines if line.startswith("fedmedclip predict"))
        shell.run(predict)
        rows = (shell.cwd / "predictions.csv").read_text().splitlines()
        assert len(rows) == 1 + 4 and rows[0].startswith("path,prediction,confidence")
        for shell in hospitals.values():  # ./stop.sh, as the README says
            stopped = subprocess.run(["./stop.sh"], cwd=shell.cwd, capture_output=True, text=True, timeout=30)
            assert stopped.returncode == 0 and "stopped pid" in stopped.stdout, stopped.stdout
            try:
                code = shell.daemons[0].wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{shell.cwd.name} did not stop within 60 s of ./stop.sh; it wrote:\n{shell.log_tail()}")
            assert code == 0, shell.log_tail()
            assert (shell.cwd / "state" / "node.lock").read_text() == ""
        subprocess.run([str(operator.cwd / "kits" / "aggregator" / "stop.sh")], check=True, timeout=30)
        assert aggregator.wait(timeout=60) in (0, 1)  # stopped mid-run: a clean exit
    finally:
        for shell in [*hospitals.values(), operator]:
            for proc in shell.daemons:
                _stop(proc)
    args = shlex.split(start_aggregator)
    assert args[0] == "kits/aggregator/start.sh"
