"""The compose testbed on this engine: ``docker-compose up``, the round table as ``make demo`` prints it, down.

``run_testbed`` is ``make testbed``: engine up (when needed), images (cached after the first build),
``docker-compose up -d`` (a fresh run: an earlier testbed of the same project is removed first, as
``make demo`` starts a new run), ``docker-compose ps``, then the per-round table followed live from
the aggregator's report until the run ends, and the report. The testbed keeps running afterwards
(Prometheus on the host's loopback); ``make testbed-down`` removes it. On a failure or Ctrl-C
nothing is left running: the testbed goes down with its volumes, and the engine too when this
command started it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.engine.daemon import COMPOSE, Engine, EngineError, say

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "deploy" / "compose.yaml"
PROJECT = "fedmedclip"
REPORT = "/var/lib/fedmedclip/aggregator/report.json"  # in the aggregator container (its checkpoint volume)
REPORT_MD = "/var/lib/fedmedclip/aggregator/report.md"
HEADER = f"{'round':>5}  {'mean val acc':>12}  {'up KB':>8}  {'down KB':>8}  {'seconds':>7}  test accuracy"


def round_row(h: dict) -> str:
    """One line of the round table, exactly as ``make demo`` (deploy/local_federation.py) prints it."""
    tests = "  ".join(f"{k} {v:.3f}" for k, v in h["test_accuracy"].items())
    return (
        f"{h['round']:>5}  {h['mean_val_accuracy']:>12.4f}  {(h['bytes_up'] or 0) / 1e3:>8.1f}  "
        f"{(h['bytes_down'] or 0) / 1e3:>8.1f}  {h['seconds'] or 0:>7.3f}  {tests}"
    )


@dataclass
class Testbed:
    """One docker-compose project of deploy/compose.yaml on ``engine``; knobs are compose variables."""

    __test__ = False  # not a pytest class, whatever its name
    engine: Engine
    project: str | None = None
    knobs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.project = self.project or os.environ.get("COMPOSE_PROJECT_NAME") or PROJECT

    def env(self) -> dict[str, str]:
        return self.engine.env() | {k: str(v) for k, v in self.knobs.items()}

    def compose(
        self,
        *args: str,
        check: bool = True,
        capture: bool = True,
        timeout: float | None = 600,
    ) -> subprocess.CompletedProcess:
        cmd = [COMPOSE, "--ansi", "never", "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        result = subprocess.run(cmd, env=self.env(), capture_output=capture, text=True, timeout=timeout, cwd=REPO_ROOT)
        if check and result.returncode != 0:
            out = (result.stdout or "") + (result.stderr or "") if capture else ""
            raise EngineError(f"docker-compose {' '.join(args)} failed (exit {result.returncode}):\n{out[-4000:]}")
        return result

    # ------------------------------------------------------------------ life cycle
    def up(self) -> None:
        """``docker-compose up -d`` with images already built; waits for set-up, health and start-up order."""
        say(
            f"docker-compose up (project {self.project}): set-up, then the aggregator, then the nodes once it is "
            "healthy"
        )
        self.compose("up", "-d", "--no-build", capture=False, timeout=1800)

    def down(self) -> None:
        """``docker-compose down -v``: containers, networks and volumes of this project gone."""
        say(f"docker-compose down -v (project {self.project})")
        self.compose(
            "--profile",
            "grafana",
            "down",
            "-v",
            "--remove-orphans",
            "--timeout",
            "20",
            capture=False,
            check=False,
            timeout=600,
        )

    def exists(self) -> bool:
        return bool(self.leftovers())

    def ps(self) -> str:
        return self.compose("ps").stdout

    def containers(self) -> dict[str, str]:
        """Service -> container id of this project (one replica each), from the engine's labels (one call)."""
        label = f"label=com.docker.compose.project={self.project}"
        out = self.engine.docker_out(
            "ps", "-a", "--no-trunc", "--filter", label, "--format", '{{.Label "com.docker.compose.service"}} {{.ID}}'
        )
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def container(self, service: str) -> str:
        """The container id of ``service``."""
        found = self.containers().get(service)
        if not found:
            raise EngineError(f"no container for service {service} in project {self.project}")
        return found

    def inspect(self, container: str) -> dict:
        return json.loads(self.engine.docker_out("inspect", container))[0]

    def exec(self, service: str, *cmd: str, timeout: float = 60, input: bytes | None = None) -> str:
        result = self.engine.docker("exec", "-i", self.container(service), *cmd, timeout=timeout, input=input)
        return result.stdout.decode()

    def report(self) -> dict | None:
        """The aggregator's report.json (None before its first write, or while it is not running)."""
        result = self.engine.docker("exec", self.container("aggregator"), "cat", REPORT, check=False, timeout=30)
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout.decode())
        except ValueError:
            return None

    def logs(self, service: str, tail: int = 60) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), service, check=False).stdout or ""

    def problems(self) -> list[str]:
        """Services that died, crashed and were restarted, or turned unhealthy (set-up exiting 0 is fine)."""
        ids = self.containers()
        if not ids:
            return []
        bad = []
        for c in json.loads(self.engine.docker_out("inspect", *ids.values())):
            service, state = c["Config"]["Labels"]["com.docker.compose.service"], c["State"]
            if service == "setup":
                if state["Status"] == "exited" and state["ExitCode"] != 0:
                    bad.append(f"setup exited with {state['ExitCode']}")
                continue
            if state["Status"] in ("exited", "dead") or state.get("Restarting"):
                bad.append(f"{service} {state['Status']} (exit {state['ExitCode']})")
            elif c.get("RestartCount"):
                bad.append(f"{service} crashed and was restarted {c['RestartCount']} time(s)")
            elif state.get("Health", {}).get("Status") == "unhealthy":
                bad.append(f"{service} unhealthy")
        return sorted(bad)

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes labelled with this project (empty after ``down``)."""
        if not self.engine.running():
            return []
        label = f"label=com.docker.compose.project={self.project}"
        left = [f"container {c}" for c in self.engine.docker_out("ps", "-a", "-q", "--filter", label).split()]
        left += [f"network {n}" for n in self.engine.docker_out("network", "ls", "-q", "--filter", label).split()]
        left += [f"volume {v}" for v in self.engine.docker_out("volume", "ls", "-q", "--filter", label).split()]
        return left

    # ------------------------------------------------------------------ the run
    def follow(self, timeout_s: float, on_row=print, stop_when=None, poll_s: float = 2.0) -> dict:
        """Print each completed round as ``make demo`` does, until the run ends (or ``stop_when(report)``).

        Raises when a service dies or turns unhealthy, or when the run fails or times out.
        """
        shown = 0
        end = time.monotonic() + timeout_s
        report: dict = {}
        while True:
            report = self.report() or report
            history = report.get("history", [])
            while shown < len(history) and history[shown].get("complete"):
                on_row(round_row(history[shown]))
                shown += 1
            phase = report.get("phase")
            if phase == "failed":
                raise EngineError(f"the run failed: {report.get('message')}\n{self.logs('aggregator')}")
            if phase == "finished" and all(h.get("complete") for h in history[shown:]):
                return report
            if stop_when is not None and stop_when(report):
                return report
            bad = self.problems()
            if bad:
                logs = "\n".join(f"--- {s} ---\n{self.logs(s, 40)}" for s in ("aggregator", "hospital-1", "global"))
                raise EngineError(f"testbed broken: {'; '.join(bad)}\n{logs}")
            if time.monotonic() > end:
                raise EngineError(f"the run did not finish within {timeout_s:.0f}s (phase {phase})")
            time.sleep(poll_s)


def run_testbed(
    engine: Engine,
    *,
    per_class: int | None = None,
    rounds: int | None = None,
    data: str | None = None,
    project: str | None = None,
    timeout_s: float = 4 * 3600.0,
) -> int:
    """``make testbed``; the exit code."""
    from deploy.engine.images import build_all

    knobs = {}
    if per_class:
        knobs["FEDMEDCLIP_PER_CLASS"] = str(per_class)
    if rounds:
        knobs["FEDMEDCLIP_ROUNDS"] = str(rounds)
    if data:
        knobs["FEDMEDCLIP_DATA"] = str(Path(data).resolve())
    started = engine.up()
    testbed = Testbed(engine, project=project, knobs=knobs)
    ok = False
    try:
        build_all(engine)
        if testbed.exists():
            say(f"an earlier testbed of project {testbed.project} is there: removed first (a new run, as make demo)")
            testbed.down()
        t0 = time.monotonic()
        testbed.up()
        print(f"\n$ docker-compose -f deploy/compose.yaml -p {testbed.project} ps\n{testbed.ps()}", flush=True)
        print(
            f"aggregator on aggregator:50051 (mTLS, certificates in per-party volumes); 4 nodes; "
            f"logs: docker-compose -f deploy/compose.yaml -p {testbed.project} logs -f SERVICE",
            flush=True,
        )
        print(HEADER, flush=True)
        report = testbed.follow(timeout_s)
        print(f"\n$ docker-compose -f deploy/compose.yaml -p {testbed.project} ps\n{testbed.ps()}", flush=True)
        print(testbed.exec("aggregator", "cat", REPORT_MD))
        spr = report.get("seconds_per_round", math.nan)
        say(
            f"run {report.get('run_id')} finished in {time.monotonic() - t0:.0f}s from `up` "
            f"({spr:.3f} s per round after the first)"
        )
        port = knobs.get("FEDMEDCLIP_PROMETHEUS_PORT", os.environ.get("FEDMEDCLIP_PROMETHEUS_PORT", "9090"))
        say(
            f"the testbed keeps running: Prometheus on http://127.0.0.1:{port} ; "
            f"DOCKER_HOST={engine.host} docker-compose -f deploy/compose.yaml -p {testbed.project} ps ; "
            "make testbed-down removes it all"
        )
        ok = True
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if not ok:
            say("taking the testbed down after the failure: nothing is left running")
            try:
                testbed.down()
            finally:
                if started:
                    engine.down()
