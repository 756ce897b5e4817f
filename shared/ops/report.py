"""The report of a federation run over the services, in the shape of the simulation's report.

The aggregator collects every node's evaluation of every global version (docs/method.md, section 11:
validate the ensemble on every training node's val split after each aggregation, keep the round
with the best mean val accuracy, report test metrics at that round). Held-out evaluator nodes
report test metrics only; they count in AVG like the simulation's "global" client.

``report.json`` is strict JSON (RFC 8259): a value that is not a finite number (a round without every
evaluation has no mean, a metric of an empty split none) is written as ``null``
(:func:`strict_json`), never as a bare ``NaN`` that strict parsers refuse.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.learning.metrics import mean_metrics, nanmean
from shared.ops.atomic import atomic_write


def strict_json(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, Inf) replaced by None: ``json.dumps(...,
    allow_nan=False)`` then writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (non-finite numbers as null)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def best_round_table(report: Mapping[str, Any]) -> list[str]:
    """The report's headline in Markdown: the best round and its test metrics per client and AVG.

    One table for the simulation's report and the aggregator's, so the two read the same. The round
    was selected by the mean val ``select_by`` metric (accuracy when the report names none).
    """
    select_by = report.get("select_by", "accuracy")
    value = report.get("best_mean_val", report["best_mean_val_accuracy"])
    lines = [
        f"Best round {report['best_round']} by mean val {select_by.replace('_', ' ')} ({_num(value)}); "
        "test metrics at that round:",
        "",
        "| client | accuracy | balanced acc. | macro-F1 | ECE |",
        "|---|---|---|---|---|",
    ]
    for name, m in list(report["test"].items()) + [("AVG", report["avg"])]:
        lines.append(
            f"| {name} | {_num(m['accuracy'])} | {_num(m['balanced_accuracy'])} | {_num(m['macro_f1'])} | "
            f"{_num(m['ece'])} |"
        )
    return lines


def per_class_table(report: Mapping[str, Any]) -> list[str]:
    """Per client: accuracy beside the majority-class baseline, balanced accuracy, macro-F1 and the recall of
    every class, in Markdown; empty when no client's test metrics carry per-class recall."""
    rows = {n: m for n, m in report["test"].items() if m.get("per_class_recall") is not None}
    if not rows:
        return []
    classes = report["classes"]
    lines = [
        "Per-class recall (test; '-': the class is absent from that test set); majority baseline: the accuracy "
        "of always answering the test set's most frequent class:",
        "",
        "| client | n | accuracy | majority baseline | balanced acc. | macro-F1 | "
        + " | ".join(f"recall {c}" for c in classes)
        + " |",
        "|---" * (6 + len(classes)) + "|",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m['n']} | {_num(m['accuracy'])} | {_num(m.get('majority_baseline'))} | "
            f"{_num(m['balanced_accuracy'])} | {_num(m['macro_f1'])} | "
            + " | ".join(_num(r) for r in m["per_class_recall"])
            + " |"
        )
    return lines


def confusion_table(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> list[str]:
    """A confusion matrix (``[true][predicted]`` counts) as a Markdown table, true classes as rows."""
    lines = ["| true / predicted | " + " | ".join(classes) + " |", "|---" * (1 + len(classes)) + "|"]
    lines += [f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |" for c, row in zip(classes, confusion)]
    return lines


def file_stem(name: str) -> str:
    """``name`` (a hospital, a site) as a safe file name part: anything but ``A-Za-z0-9_.-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"


def _num(value: Any, fmt: str = ".4f") -> str:
    """A number for a Markdown table; '-' for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def build_report(
    *,
    run_id: str,
    phase: str,
    message: str,
    method: str,
    rounds: int,
    nodes: Mapping[str, Mapping[str, Any]],
    reports: Mapping[str, Mapping[str, Any]],
    rounds_log: list[dict[str, Any]],
    extra: Mapping[str, Any] | None = None,
    select_by: str = "accuracy",
) -> dict[str, Any]:
    """The aggregator's report: per version the trainers' mean val ``select_by`` (over those that share it)
    once every trainer has reported; the best such version and every node's test metrics there."""
    trainers = sorted(n for n, r in nodes.items() if r["role"] == "trainer")
    evaluators = sorted(n for n, r in nodes.items() if r["role"] == "evaluator")
    history = []
    for version in sorted((int(v) for v in reports), key=int):
        by_node = reports[str(version)]
        vals = [by_node[n]["val"].get(select_by) for n in trainers if n in by_node and by_node[n].get("val")]
        accs = [by_node[n]["val"]["accuracy"] for n in trainers if n in by_node and by_node[n].get("val")]
        complete = all(n in by_node for n in trainers)
        log = next((r for r in rounds_log if r["round"] == version), {})
        history.append(
            {
                "round": version,
                "complete": complete,
                "mean_val_accuracy": nanmean(accs) if complete else float("nan"),
                "mean_val": nanmean(vals) if complete else float("nan"),
                "test_accuracy": {
                    n: by_node[n]["test"]["accuracy"]
                    for n in trainers + evaluators
                    if n in by_node and by_node[n].get("test")
                },
                "test": {
                    n: by_node[n]["test"] for n in trainers + evaluators if n in by_node and by_node[n].get("test")
                },
                **{
                    k: log.get(k)
                    for k in ("bytes_up", "bytes_up_raw", "bytes_down", "bytes_down_raw", "seconds", "updates")
                },
                "traffic_up": (log.get("traffic") or {}).get("up"),
                "traffic_down": (log.get("traffic") or {}).get("down"),
                # differential privacy: the epsilon each node stated with its update of this round
                "dp_epsilon": {n: p["dp_epsilon"] for n, p in (log.get("privacy") or {}).items() if "dp_epsilon" in p},
            }
        )
    candidates = [h for h in history if h["complete"] and not math.isnan(h["mean_val"])]
    report: dict[str, Any] = {
        "run_id": run_id,
        "phase": phase,
        "message": message,
        "method": method,
        "rounds": rounds,
        "trainers": trainers,
        "evaluators": evaluators,
        "nodes": dict(nodes),
        "select_by": select_by,
        **dict(extra or {}),
    }
    if candidates:
        best = max(candidates, key=lambda h: (h["mean_val"], -h["round"]))
        per_client = {n: best["test"][n] for n in trainers + evaluators if n in best["test"]}
        report.update(
            best_round=best["round"],
            best_mean_val=best["mean_val"],
            best_mean_val_accuracy=best["mean_val_accuracy"],
            test=per_client,
            avg=mean_metrics(list(per_client.values())),
        )
    report["history"] = [{k: v for k, v in h.items() if k != "test"} for h in history]
    done = rounds_log[1:] or rounds_log
    report["bytes_per_round"] = (
        {k: nanmean([r[k] for r in rounds_log]) for k in ("bytes_up", "bytes_up_raw", "bytes_down", "bytes_down_raw")}
        if rounds_log
        else {}
    )
    report["seconds_per_round"] = nanmean([r["seconds"] for r in done]) if done else float("nan")
    report["rounds_log"] = rounds_log
    return report


_KB_COLUMNS = ("bytes_up", "bytes_down", "traffic_up", "traffic_down")


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# FedMedCLIP federation run {report['run_id']}: {report['method']}",
        "",
        f"Status: {report['phase']}" + (f" ({report['message']})" if report.get("message") else "") + ".",
        f"Trainers: {', '.join(report['trainers']) or '-'}; held-out evaluators: "
        f"{', '.join(report['evaluators']) or '-'}.",
        "",
    ]
    if "best_round" in report:
        lines += best_round_table(report)
    elif any(h["complete"] for h in report["history"]):
        metric = str(report.get("select_by", "accuracy")).replace("_", " ")
        lines.append(f"No trainer shares its validation {metric} (share_metrics): no round could be selected.")
    else:
        lines.append("No complete round of evaluations yet.")
    lines += [
        "",
        "| round | mean val acc. | adapters up KB | adapters down KB | all RPCs up KB | all RPCs down KB | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in report["history"]:
        kb = [_num(h.get(k) / 1e3 if h.get(k) is not None else None, ".1f") for k in _KB_COLUMNS]
        sec = h.get("seconds")
        lines.append(f"| {h['round']} | {_num(h['mean_val_accuracy'])} | {' | '.join(kb)} | {_num(sec, '.3f')} |")
    lines += _privacy_table(report)
    lines += _secure_table(report)
    b = report.get("bytes_per_round") or {}
    if b:
        lines += [
            "",
            f"Bytes per round: up {b['bytes_up'] / 1e3:.1f} KB (raw {b['bytes_up_raw'] / 1e3:.1f} KB), "
            f"down {b['bytes_down'] / 1e3:.1f} KB (raw {b['bytes_down_raw'] / 1e3:.1f} KB); "
            f"{_num(report['seconds_per_round'], '.3f')} s per round after the first.",
        ]
    return "\n".join(lines) + "\n"


def _secure_table(report: Mapping[str, Any]) -> list[str]:
    """Secure aggregation per round: who was in the roster and in the sum, sessions, exclusions, the error bound."""
    rows = [(r["round"], r["secure_aggregation"]) for r in report.get("rounds_log", []) if r.get("secure_aggregation")]
    if not rows:
        return []
    lines = [
        "",
        "Secure aggregation: the aggregator saw masked inputs only; each round's global is the unmasked weighted "
        "average of the survivors' updates (error bound: fixed point, against the exact average):",
        "",
        "| round | roster | in the sum | not in the sum | sessions | excluded | threshold | error bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for round_no, e in rows:
        dropped = sorted(set(e["roster"]) - set(e["survivors"]))
        lines.append(
            f"| {round_no} | {len(e['roster'])} | {len(e['survivors'])} | {', '.join(dropped) or '-'} | "
            f"{e['sessions']} | {', '.join(sorted(e['excluded'])) or '-'} | {e['threshold']} | {e['error_bound']:.2g} |"
        )
    return lines


def _privacy_table(report: Mapping[str, Any]) -> list[str]:
    """Epsilon per node and round, as each node stated it with its update (nodes training without DP: absent)."""
    rows = [h for h in report["history"] if h.get("dp_epsilon")]
    if not rows:
        return []
    nodes = sorted({n for h in rows for n in h["dp_epsilon"]})
    deltas = sorted(
        {
            p["dp_delta"]
            for r in report.get("rounds_log", [])
            for p in (r.get("privacy") or {}).values()
            if "dp_delta" in p
        }
    )
    lines = [
        "",
        "Differential privacy: epsilon each node has spent in this run after the round, as it states it "
        f"(delta {', '.join(f'{d:.2g}' for d in deltas) or '-'}; '-': no update or no DP):",
        "",
        f"| round | {' | '.join(nodes)} |",
        f"|---|{'---|' * len(nodes)}",
    ]
    for h in rows:
        lines.append(f"| {h['round']} | {' | '.join(_num(h['dp_epsilon'].get(n), '.3f') for n in nodes)} |")
    return lines


def write_report(report: Mapping[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "report.json", dumps_strict(report, indent=2).encode("utf-8"), durable=False)
    atomic_write(out_dir / "report.md", render_markdown(report).encode("utf-8"), durable=False)
