"""The compose testbed for real: a Docker engine, images built without a registry, ``docker-compose up``.

One test, the way an operator uses the testbed (``make testbed``), end to end, always cleaned up:

1. this project's own engine up (``deploy/engine``: Debian's docker.io, its own data root; installed and
   started when needed), the images built (base image by debootstrap, project and Prometheus images;
   cached after the first run: the first run on a fresh machine is the cold one);
2. ``docker-compose up`` of deploy/compose.yaml on a small subset of the brain tumor set (100 images per
   class: every node encodes several batches with two DataLoader workers, through /dev/shm; project
   ``fedmedclip-test``), with the quorum at 2 of the 3 hospitals and a 20 s round deadline (compose
   knobs; every other argument is the command ``make demo`` runs), and more rounds than the test needs;
3. 3 completed rounds, read from the aggregator's report;
4. from inside the compose network (``docker exec`` in the aggregator container, ``http://prometheus:9090``):
   every dashboard panel query and every rule of tests/test_deploy_prometheus.py's lists returns data
   (the stalled-round alert: its operands return data, itself nothing while rounds advance; two
   malformed uploads sent from hospital-1's container with its own certificate give the
   rejected-updates panel its series, as that test does on loopback);
5. ``docker kill`` of hospital-2 mid-run: the node-silent and target-down alert expressions return data,
   the open round closes at its deadline with the quorum (2 updates, hospital_2 missing); ``docker
   start`` of the same container: it registers again and its update is in a later round;
6. ``docker-compose down -v``: no container, network or volume of the project is left; the engine is
   stopped (when this test started it) and leaves no bridge, netfilter chain or mount behind.

Everything started is stopped by id in ``finally``, whatever happens. Phase timings are printed and
written to .cache/testbed/last_run.md (never asserted).
"""

from __future__ import annotations

import json
import math
import re
import signal
import time

from deploy.engine import Engine
from deploy.engine.images import build_all
from deploy.engine.testbed import HEADER, Testbed, round_row
from tests.services_support import RATE_INTERVAL, REPO_ROOT, free_port, panel_queries, rules, show

#: metric families only nodes with an opt-in feature export (differential privacy: fedmedclip_dp_*)
OPT_IN_METRICS = re.compile(r"\bfedmedclip_dp_")

PROJECT = "fedmedclip-test"
PER_CLASS = 100  # enough for each node to encode several batches at once (/dev/shm, shm_size)
ROUNDS = 5000  # never reached: the test stops the testbed once it has what it needs
MIN_NODES = 2
ROUND_TIMEOUT_S = 20
VICTIM = ("hospital-2", "hospital_2")  # (service, node id)
RECORD = REPO_ROOT / ".cache" / "testbed" / "last_run.md"
WAIT_S = 900  # the longest any single wait of the run may take (a cold first encode included)

QUERY_SCRIPT = """
import json, sys, urllib.parse, urllib.request
def get(path, **params):
    url = "http://prometheus:9090" + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=20) as r:
        body = json.loads(r.read().decode())
    return body.get("data") if body.get("status") == "success" else {"error": body}
req = json.loads(sys.stdin.read())
out = {"queries": {e: get("/api/v1/query", query=e) for e in req.get("queries", [])}}
for path in req.get("paths", []):
    out[path] = get(path)
print(json.dumps(out))
"""
# an upload that starts with a chunk instead of a header, sent with hospital_1's own certificate from its
# container (as tests/test_deploy_prometheus.py does on loopback): the rejected-updates panel gets a series
REJECT_SCRIPT = """
import grpc
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
tls = "/etc/fedmedclip/tls/hospital_1/"
read = lambda name: open(tls + name, "rb").read()
creds = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"), private_key=read("key.pem"),
                                     certificate_chain=read("cert.pem"))
with grpc.secure_channel("aggregator:50051", creds) as channel:
    try:
        pb_grpc.AggregatorServiceStub(channel).UploadUpdate(iter([pb.UploadUpdateRequest(chunk=b"not a header")]),
                                                            timeout=10)
        print("ACCEPTED")
    except grpc.RpcError as err:
        print(err.code().name)
"""


def reject_one_update(testbed: Testbed) -> None:
    assert testbed.exec("hospital-1", "python", "-c", REJECT_SCRIPT, timeout=60).strip() == "INVALID_ARGUMENT"


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.last = self.t0
        self.rows: list[tuple[str, float, float]] = []

    def mark(self, what: str) -> None:
        now = time.monotonic()
        self.rows.append((what, now - self.last, now - self.t0))
        print(f"[testbed test] {now - self.t0:7.1f}s  {what} ({now - self.last:.1f}s)", flush=True)
        self.last = now


def wait(predicate, timeout: float, what: str, testbed: Testbed, interval: float = 1.0):
    """Poll until truthy; a dead or unhealthy service, or the timeout, fails with the services' logs."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        bad = [p for p in testbed.problems() if VICTIM[0] not in p]
        if bad or time.monotonic() > end:
            logs = "\n".join(
                f"--- {s} ---\n{testbed.logs(s, 40)}"
                for s in ("setup", "aggregator", "hospital-1", VICTIM[0], "global", "prometheus")
            )
            why = f"services broken: {'; '.join(bad)}" if bad else f"timed out after {timeout:.0f}s"
            raise AssertionError(f"{why} waiting for {what}\n{logs}")
        time.sleep(interval)


def prometheus(testbed: Testbed, queries: list[str] = (), paths: list[str] = ()) -> dict:
    """Queries sent from inside the compose network: the aggregator's container asks http://prometheus:9090."""
    out = testbed.exec(
        "aggregator",
        "python",
        "-c",
        QUERY_SCRIPT,
        timeout=120,
        input=json.dumps({"queries": list(queries), "paths": list(paths)}).encode(),
    )
    return json.loads(out)


def vector(data: dict) -> list[dict]:
    assert isinstance(data, dict) and data.get("resultType") == "vector", data
    return data["result"]


def finite(result: list[dict]) -> list[dict]:
    return [s for s in result if math.isfinite(float(s["value"][1]))]


def closed_rounds(testbed: Testbed) -> list[dict]:
    return (testbed.report() or {}).get("rounds_log", [])


def test_compose_testbed_runs_for_real_and_leaves_nothing_behind(brain_tumor_root):
    timeline = Timeline()
    engine = Engine()
    started = False
    prom_port = free_port()
    testbed = Testbed(
        engine,
        project=PROJECT,
        knobs={
            "FEDMEDCLIP_DATA": str(brain_tumor_root),
            "FEDMEDCLIP_PER_CLASS": str(PER_CLASS),
            "FEDMEDCLIP_ROUNDS": str(ROUNDS),
            "FEDMEDCLIP_MIN_NODES": str(MIN_NODES),
            "FEDMEDCLIP_ROUND_TIMEOUT_S": str(ROUND_TIMEOUT_S),
            "FEDMEDCLIP_PROMETHEUS_PORT": str(prom_port),
        },
    )
    record: dict = {}
    left_in_project: list[str] = []
    # a SIGTERM (a CI time limit) unwinds through the finally below like Ctrl-C, so nothing is left running
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        started = engine.up()
        timeline.mark(f"engine up ({'started by this test' if started else 'already running'})")
        record["build"] = build_all(engine, timeout_s=WAIT_S * 2)
        timeline.mark(
            "images built"
            + (" (base image built: cold)" if record["build"]["base"]["built"] else " (base image reused)")
        )
        if testbed.exists():
            testbed.down()  # an earlier, interrupted run of this test
        testbed.up()
        timeline.mark("docker-compose up -d returned (set-up done, aggregator healthy, nodes started)")
        reject_one_update(testbed)  # the first rejection: the series appears at 1
        record["ps"] = testbed.ps()
        print(record["ps"], flush=True)
        for service in ("aggregator", "hospital-1", "hospital-2", "hospital-3", "global", "prometheus"):
            config = testbed.inspect(testbed.container(service))["HostConfig"]
            assert config["Init"] is True, service  # init: true, so SIGTERM reaches the service and down is quick

        # ---------------------------------------------------------------- 3 completed rounds
        def three_full_rounds():
            r = testbed.report()
            if not r or r.get("trainers") != ["hospital_1", "hospital_2", "hospital_3"]:
                return None  # the quorum is 2: the first rounds may open before the third hospital registers
            full = [e["round"] for e in r["rounds_log"] if e["updates"] == 3]
            complete = {h["round"] for h in r["history"] if h["complete"]}
            return r if len([n for n in full if n in complete]) >= 3 else None

        report = wait(
            three_full_rounds, WAIT_S, "3 completed rounds of all three hospitals in the aggregator's report", testbed
        )
        record["rows"] = [round_row(h) for h in report["history"] if h["complete"]]
        assert report["evaluators"] == ["global"]
        timeline.mark(f"3 completed rounds of all three hospitals (report: {len(report['rounds_log'])} closed)")

        # ---------------------------------------------------------------- Prometheus, inside the network
        wait(
            lambda: finite(
                vector(
                    prometheus(testbed, ['fedmedclip_round_current{job="aggregator"} >= 3'])["queries"][
                        'fedmedclip_round_current{job="aggregator"} >= 3'
                    ]
                )
            ),
            120,
            "Prometheus to see round 3",
            testbed,
            interval=2,
        )
        reject_one_update(testbed)  # the second: an increase inside the rate window
        time.sleep(12)  # two more scrapes (5 s): every rate window holds an increase
        panels = panel_queries()
        exprs = [e.replace("$__rate_interval", RATE_INTERVAL) for *_, e in panels]
        all_rules = rules()
        records = [r["record"] for r in all_rules if "record" in r]
        stalled = next(r for r in all_rules if r.get("alert") == "FedMedCLIPRoundStalled")
        # its operands: the recording rule fedmedclip:round_changes:15m (among ``records``) and this one
        stalled_parts = ['fedmedclip_nodes_connected{job="aggregator"} > 0']
        answer = prometheus(
            testbed, exprs + records + [stalled["expr"]] + stalled_parts, ["/api/v1/targets", "/api/v1/rules"]
        )
        rows, failures = [], []
        for (_, panel, ref, expr), sent in zip(panels, exprs, strict=True):
            result = vector(answer["queries"][sent])
            rows.append((f"panel {panel} ({ref})", expr, show(result)))
            if OPT_IN_METRICS.search(expr):
                # series only nodes with an opt-in feature export: the testbed runs without it, so none may be
                # here (with DP they are checked on a live Prometheus by tests/test_deploy_prometheus.py)
                if result:
                    failures.append((panel, expr, result))
            elif not finite(result):
                failures.append((panel, expr, result))
        for name in records + stalled_parts:
            result = vector(answer["queries"][name])
            rows.append(
                (f"rule {name}" if name in records else "alert FedMedCLIPRoundStalled, operand", name, show(result))
            )
            if not finite(result):
                failures.append((name, name, result))
        assert vector(answer["queries"][stalled["expr"]]) == [], "rounds advance: the stalled-round alert is quiet"
        rows.append(("alert FedMedCLIPRoundStalled", stalled["expr"], "no series: rounds advance, not firing"))
        assert not failures, "queries without data (or with data where none may be):\n" + "\n".join(
            f"{p}: {e} -> {r}" for p, e, r in failures
        )
        targets = answer["/api/v1/targets"]["activeTargets"]
        health = {t["labels"].get("hospital") or t["labels"]["job"]: t["health"] for t in targets}
        record["targets"] = health
        assert {k: v for k, v in health.items() if k != "grafana"} == {
            "aggregator": "up",
            "hospital_1": "up",
            "hospital_2": "up",
            "hospital_3": "up",
            "global": "up",
            "prometheus": "up",
        }, health  # grafana: its profile is off by default, so its target is down
        groups = answer["/api/v1/rules"]["groups"]
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
        assert len([r for g in groups for r in g["rules"]]) == len(all_rules)
        timeline.mark(f"{len(exprs)} panel queries and {len(all_rules)} rules answered inside the network")

        # ---------------------------------------------------------------- a hospital dies mid-run
        victim = testbed.container(VICTIM[0])
        before_kill = len(closed_rounds(testbed))
        engine.docker("kill", victim)
        killed_at = time.time()
        assert testbed.inspect(victim)["State"]["Running"] is False
        timeline.mark(f"docker kill {VICTIM[0]} ({victim[:12]}) after {before_kill} closed rounds")
        for name in ("FedMedCLIPTargetDown", "FedMedCLIPNodeSilent"):
            rule = next(r for r in all_rules if r.get("alert") == name)
            expr = rule["expr"]
            result = wait(
                lambda expr=expr: finite(vector(prometheus(testbed, [expr])["queries"][expr])),
                180,
                f"{name}'s expression to return data",
                testbed,
                interval=3,
            )
            rows.append((f"alert {name} (after docker kill {VICTIM[0]})", rule["expr"], show(result)))
        alerts = wait(
            lambda: (
                {
                    a["labels"]["alertname"]
                    for a in prometheus(testbed, paths=["/api/v1/alerts"])["/api/v1/alerts"]["alerts"]
                }
                >= {"FedMedCLIPTargetDown", "FedMedCLIPNodeSilent"}
            ),
            60,
            "the two alerts to be pending",
            testbed,
            interval=3,
        )
        assert alerts
        timeline.mark("node-silent and target-down alert expressions return data; both alerts pending")

        def deadline_round():
            for entry in closed_rounds(testbed)[before_kill:]:
                if VICTIM[1] not in entry["nodes"]:
                    return entry
            return None

        closed = wait(deadline_round, WAIT_S, f"a round to close without {VICTIM[1]}", testbed)
        assert closed["updates"] == MIN_NODES and sorted(closed["nodes"]) == ["hospital_1", "hospital_3"], closed
        assert closed["seconds"] >= ROUND_TIMEOUT_S, closed  # it waited for its deadline, then closed with the quorum
        agg_log = testbed.logs("aggregator", 400)
        assert (
            f"round {closed['round']}: deadline passed, closing with 2 of 3 trainers (['{VICTIM[1]}'] missing)"
            in agg_log
        ), agg_log[-3000:]
        record["deadline_round"] = closed
        timeline.mark(
            f"round {closed['round']} closed at its deadline with the quorum "
            f"({closed['seconds']:.1f}s, nodes {closed['nodes']})"
        )

        # ---------------------------------------------------------------- and comes back
        engine.docker("start", victim)
        restarted_round = len(closed_rounds(testbed))
        timeline.mark(
            f"docker start {VICTIM[0]} ({victim[:12]}) after {restarted_round} closed rounds "
            f"({time.time() - killed_at:.0f}s after the kill)"
        )

        def took_part_again():
            return next((e for e in closed_rounds(testbed)[restarted_round:] if VICTIM[1] in e["nodes"]), None)

        back = wait(took_part_again, WAIT_S, f"{VICTIM[1]} to take part in a round again", testbed)
        assert testbed.container(VICTIM[0]) == victim  # the same container, restarted, with its volumes
        assert testbed.inspect(victim)["State"]["Running"] is True
        assert back["updates"] == 3, back
        record["back_round"] = back
        timeline.mark(f"{VICTIM[1]} took part again in round {back['round']} (updates {back['nodes']})")
        report = testbed.report()
        record["rows"] = [round_row(h) for h in report["history"] if h["complete"]]
        record["rounds_log"] = [
            (r["round"], r["updates"], r["nodes"], round(r["seconds"], 3)) for r in report["rounds_log"]
        ]
        record["queries"] = rows
        assert report["phase"] == "collecting", report["phase"]  # still running: the quorum held throughout
    finally:
        try:
            try:
                testbed.down()
            finally:
                left_in_project = testbed.leftovers()  # asked before the engine goes
                timeline.mark("docker-compose down -v")
        finally:
            if started:
                engine.down()
                timeline.mark("engine down")
            _write_record(record, timeline, started, left_in_project)
            signal.signal(signal.SIGTERM, previous_sigterm)
    assert left_in_project == [], left_in_project
    if started:
        assert not engine.running() and engine.pid() is None
        assert engine.leftovers() == [], engine.leftovers()
    else:  # an operator's engine was already up: it stays up, only this test's project is gone
        assert engine.running()


def _write_record(record: dict, timeline: Timeline, started: bool, left: list[str]) -> None:
    lines = [
        f"# Testbed test run, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| phase | seconds | since start |",
        "|---|---|---|",
    ]
    lines += [f"| {what} | {d:.1f} | {t:.1f} |" for what, d, t in timeline.rows]
    build = record.get("build")
    if build:
        lines += ["", "| build step | seconds | size |", "|---|---|---|"]
        for key in ("base", "wheelhouse", "project", "prometheus"):
            item = build.get(key, {})
            size = f"{item['size'] / 1e6:.0f} MB" if "size" in item else f"{item.get('wheels', '')} wheels"
            lines.append(
                f"| {key} {'(built)' if item.get('built', True) else '(reused)'} | "
                f"{item.get('seconds', 0):.1f} | {size} |"
            )
    if record.get("ps"):
        lines += ["", "```", "$ docker-compose ps", record["ps"].rstrip(), "```"]
    if record.get("rows"):
        lines += ["", "```", HEADER, *record["rows"], "```"]
    if record.get("rounds_log"):
        lines += ["", "| round | updates | nodes | seconds |", "|---|---|---|---|"]
        lines += [f"| {r} | {u} | {', '.join(n)} | {s} |" for r, u, n, s in record["rounds_log"]]
    if record.get("queries"):
        lines += ["", "| what | query | value |", "|---|---|---|"]
        lines += [f"| {w} | `{q.replace('|', '∣')}` | {v or '(no data)'} |" for w, q, v in record["queries"]]
    lines += ["", f"Engine started by the test: {started}; left in the project after down: {left or 'nothing'}."]
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text("\n".join(lines) + "\n")
    print("\n" + RECORD.read_text(), flush=True)
