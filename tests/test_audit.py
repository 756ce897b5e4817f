"""The aggregator's signed audit log and its receipts (shared/audit.py, docs/audit.md), in this process.

Pure log tests write real logs with :class:`shared.audit.AuditLog` and change them the ways the issue
names: any single byte of an entry, an entry removed, two entries swapped, another key, a torn tail
(and a torn recovery). Receipts come from the real servicer on a real gRPC server on loopback
(``in_process_aggregator``). The real processes (a SIGKILLed aggregator, a federation of node daemons)
are in tests/test_audit_services.py and tests/test_services_federation.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from shared import audit
from shared.audit import AuditError, AuditLog, PublicKey, SigningKey, keep_receipt, verify_log
from shared.ops.exitcodes import ExitCode
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.reasons import Reason, reason_of
from shared.wire.transport import chunks
from tests.services_support import (
    REPO_ROOT,
    in_process_aggregator,
    register_request,
    service_env,
    update_payload,
)

DIM = 16


# --------------------------------------------------------------------------- logs


def write_log(folder: Path, n: int = 8, key: SigningKey | None = None) -> tuple[Path, SigningKey]:
    """A log of ``n`` entries: log_opened, then accepted updates."""
    key = key or SigningKey.generate()
    log = AuditLog(folder / "audit.log", key)
    for i in range(2, n + 1):
        log.append(
            "update_accepted",
            {
                "run_id": "r1",
                "round_id": i,
                "node": f"h{i}",
                "update_id": f"u{i}",
                "sha256": f"{i:064x}",
                "weight": 1.5,
            },
        )
    return log.path, key


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_an_intact_log_verifies_and_names_its_key(tmp_path):
    path, key = write_log(tmp_path)
    verdict = verify_log(path.read_bytes(), key.public)
    assert verdict.ok and verdict.seq == 8 and [e.seq for e in verdict.entries] == list(range(1, 9))
    first = verdict.entries[0]
    assert first.event == "log_opened" and first.data["key_id"] == key.public.key_id
    assert all(line.endswith(b"\n") and b" " not in line for line in lines_of(path))  # one canonical line each


def test_any_single_byte_changed_in_an_entry_fails_verification_at_that_entry(tmp_path):
    path, key = write_log(tmp_path)
    lines = lines_of(path)
    kinds = set()
    for i in range(len(lines[3]) - 1):  # every byte of entry 4 but its newline
        line = bytearray(lines[3])
        line[i] ^= 0x01  # ASCII stays ASCII; no byte becomes a newline
        data = b"".join([*lines[:3], bytes(line), *lines[4:]])
        verdict = verify_log(data, key.public)
        assert not verdict.ok and verdict.problem.line == 4, (i, verdict.problem)
        assert verdict.seq == 3  # entries 1-3 are still trusted, nothing after
        kinds.add(verdict.problem.kind)
    assert {audit.BAD_HASH, audit.BAD_SIGNATURE, audit.MALFORMED} <= kinds


def test_a_removed_entry_fails_at_the_line_where_it_is_missing(tmp_path):
    path, key = write_log(tmp_path)
    lines = lines_of(path)
    verdict = verify_log(b"".join(lines[:3] + lines[4:]), key.public)
    p = verdict.problem
    assert (p.kind, p.line, p.seq) == (audit.SEQ_GAP, 4, 5)
    assert "entry 4 is missing" in p.describe() and p.describe().startswith("line 4 (seq 5)")


def test_two_swapped_entries_fail_at_the_first_of_them(tmp_path):
    path, key = write_log(tmp_path)
    lines = lines_of(path)
    verdict = verify_log(b"".join([*lines[:3], lines[4], lines[3], *lines[5:]]), key.public)
    p = verdict.problem
    assert (p.kind, p.line, p.seq) == (audit.SEQ_GAP, 4, 5) and verdict.seq == 3


def test_an_entry_from_another_log_under_the_same_key_breaks_the_chain(tmp_path):
    key = SigningKey.generate()
    path, _ = write_log(tmp_path / "a", key=key)
    other, _ = write_log(tmp_path / "b", key=key)  # same key, same seq numbers, another chain
    lines = lines_of(path)
    verdict = verify_log(b"".join([*lines[:5], lines_of(other)[5], *lines[6:]]), key.public)
    assert (verdict.problem.kind, verdict.problem.line) == (audit.BROKEN_LINK, 6)


def test_a_log_checked_with_another_key_fails_at_its_first_entry_naming_the_key(tmp_path):
    path, key = write_log(tmp_path)
    stranger = SigningKey.generate().public
    verdict = verify_log(path.read_bytes(), stranger)
    assert (verdict.problem.kind, verdict.problem.line) == (audit.OTHER_KEY, 1)
    assert key.public.key_id in verdict.problem.detail and stranger.key_id in verdict.problem.detail


def test_cutting_whole_entries_off_the_end_is_invisible_to_the_log_alone(tmp_path):
    """The limit receipts are for (test_receipts_... below): a log cut at an entry boundary still verifies."""
    path, key = write_log(tmp_path)
    assert verify_log(b"".join(lines_of(path)[:5]), key.public).ok


def test_a_torn_tail_is_reported_then_recorded_by_the_next_writer_and_the_chain_goes_on(tmp_path):
    path, key = write_log(tmp_path)
    whole = path.read_bytes()
    last = lines_of(path)[-1]
    torn = whole[: len(whole) - len(last) // 2]  # the last append cut in its middle (no newline)
    path.write_bytes(torn)
    verdict = verify_log(torn, key.public)
    assert (verdict.problem.kind, verdict.problem.line) == (audit.TORN_TAIL, 8) and verdict.seq == 7
    assert "interrupted" in verdict.problem.detail

    log = AuditLog(path, key)  # what a restarted aggregator does
    assert log.recovered is not None and log.recovered.seq == 8 and log.recovered.event == "log_recovered"
    log.append("aggregator_resumed", {"run_id": "r1"})
    after = path.read_bytes()
    assert after.startswith(torn)  # not a byte dropped or rewritten
    verdict = verify_log(after, key.public)
    assert verdict.ok and [e.seq for e in verdict.entries] == list(range(1, 10))
    (rec,) = verdict.recovered
    assert (rec.first_line, rec.offset, rec.by.seq, rec.by.line) == (8, len(whole) - len(last), 8, 9)
    assert rec.sha256 == audit.sha256_hex(torn[rec.offset :] + b"\n")
    assert rec.by.data["last_good_seq"] == 7


def test_a_crash_during_the_recovery_itself_is_recovered_too(tmp_path):
    path, key = write_log(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-60])
    AuditLog(path, key)
    once = path.read_bytes()
    path.write_bytes(once[:-100])  # the recovery entry torn as well: two bad lines at the end
    assert verify_log(path.read_bytes(), key.public).problem.kind == audit.TORN_TAIL
    log = AuditLog(path, key)
    verdict = verify_log(path.read_bytes(), key.public)
    assert verdict.ok and len(verdict.recovered) == 1 and verdict.recovered[0].last_line == 9
    assert log.seq == verdict.seq == 8  # seq 8 is the second recovery; both torn lines lie under it


def test_the_writer_refuses_to_continue_a_log_that_was_altered(tmp_path):
    path, key = write_log(tmp_path)
    lines = lines_of(path)
    path.write_bytes(b"".join([*lines[:3], *lines[4:]]))
    with pytest.raises(AuditError, match=r"does not verify at line 4 \(seq 5\)"):
        AuditLog(path, key)
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match="other key"):
        AuditLog(path, SigningKey.generate())


def test_the_verifier_does_not_import_torch_or_grpc():
    code = "import sys, shared.audit; bad = {'torch', 'grpc'} & set(sys.modules); sys.exit(bool(bad))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=service_env(), timeout=60)
    assert done.returncode == 0


# --------------------------------------------------------------------------- the CLI


def test_audit_verify_exits_0_on_an_intact_log_and_5_naming_the_entry_on_a_tampered_copy(tmp_path, capsys):
    path, key = write_log(tmp_path)
    (tmp_path / "audit.pub").write_bytes(key.public.pem())
    assert audit.main(["verify", str(path)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "OK: 8 entries" in out and "beside the log" in out
    tampered = tmp_path / "copy" / "audit.log"
    tampered.parent.mkdir()
    tampered.write_bytes(path.read_bytes().replace(b'"node":"h5"', b'"node":"h6"'))
    assert audit.main(["verify", str(tampered), "--key", str(tmp_path / "audit.pub")]) == ExitCode.AUDIT_FAILED
    out = capsys.readouterr().out
    assert "FAILED: first bad entry at line 5 (seq 5)" in out and "bad hash" in out
    assert audit.main(["show", str(tampered), "--key", str(tmp_path / "audit.pub")]) == ExitCode.OK
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[4] for r in rows[1:9]] == ["ok"] * 4 + ["BAD"] * 4
    assert rows[-1].startswith("chain: FAILED at line 5 (seq 5)")


def test_the_console_script_runs_audit_verify(tmp_path):
    path, key = write_log(tmp_path)
    exe = Path(sys.executable).with_name("fedmedclip")
    done = subprocess.run([str(exe), "audit", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "named by the log's own first entry" in done.stdout, done.stdout + done.stderr


# --------------------------------------------------------------------------- the aggregator and receipts


def register(stub, node: str) -> pb.RegisterResponse:
    return stub.Register(register_request(node, DIM), timeout=10)


def upload(stub, run_id: str, node: str, p, round_id: int, update_id: str = "") -> pb.UploadUpdateResponse:
    head = pb.PayloadHeader(
        run_id=run_id,
        round_id=round_id,
        node_id=node,
        update_id=update_id or f"{run_id}-{node}-r{round_id}",
        codec=p.codec,
        wire_bytes=len(p.data),
        sha256=p.sha256,
        raw_bytes=p.raw_nbytes,
    )
    messages = [pb.UploadUpdateRequest(header=head)] + [pb.UploadUpdateRequest(chunk=c) for c in chunks(p.data)]
    return stub.UploadUpdate(iter(messages), timeout=10)


def keep(folder: Path, ack: pb.UploadUpdateResponse, key: PublicKey, run_id: str, node: str, r: int, p) -> Path:
    expected = {"run_id": run_id, "round_id": r, "node": node, "update_id": ack.update_id, "sha256": p.sha256}
    path, problem = keep_receipt(folder, ack.receipt, ack.receipt_signature, key, expected)
    assert problem is None, problem
    return path


def test_every_event_is_logged_and_receipts_verify_against_the_log(tmp_path):
    out, nodes = tmp_path / "agg", tmp_path / "nodes"
    with in_process_aggregator(out, rounds=2, embed_dim=DIM) as (engine, stub, _):
        key = PublicKey.from_file(out / "audit.pub")
        run = register(stub, "h1").round.run_id
        register(stub, "h2")
        stub.GetRound(pb.GetRoundRequest(run_id=run, node_id="h1", max_wait_ms=5000), timeout=10)
        receipts = {}
        for node, seed in (("h1", 1), ("h2", 2)):
            ack = upload(stub, run, node, update_payload(seed, DIM), 0)
            receipts[node] = keep(nodes / node, ack, key, run, node, 0, update_payload(seed, DIM))
        stub.GetRound(pb.GetRoundRequest(run_id=run, node_id="h1", wait_for_round=1, max_wait_ms=5000), timeout=10)
        replay = upload(
            stub, run, "h1", update_payload(1, DIM), 0
        )  # a retry of round 0's accepted update: the same receipt
        assert replay.replayed and json.loads(receipts["h1"].read_text())["receipt"] == json.loads(replay.receipt)
        with pytest.raises(grpc.RpcError) as stale:  # refused, and logged with its reason
            upload(stub, run, "h2", update_payload(3, DIM), 0, update_id="late-h2-r0")
        assert reason_of(stale.value) is Reason.STALE_ROUND
        published = (out / "checkpoint" / "globals" / "v000001.fmcs").read_bytes()
    verdict = verify_log((out / "audit.log").read_bytes(), key)
    assert verdict.ok, verdict.problem
    events = [e.event for e in verdict.entries]
    assert events[:4] == ["log_opened", "run_started", "node_registered", "node_registered"]
    assert events[4:8] == ["update_accepted", "update_accepted", "round_closed", "global_published"]
    closed, globl, refused = verdict.entries[6].data, verdict.entries[7].data, verdict.entries[8].data
    assert [(u["node"], u["weight"]) for u in closed["updates"]] == [("h1", 10.0), ("h2", 10.0)]
    assert [u["sha256"] for u in closed["updates"]] == [update_payload(1, DIM).sha256, update_payload(2, DIM).sha256]
    assert globl == {"run_id": run, "version": 1, "sha256": audit.sha256_hex(published), "wire_bytes": len(published)}
    assert (
        refused["node"] == "h2"
        and refused["reason"] == "stale_round"
        and refused["sha256"] == update_payload(3, DIM).sha256
    )
    assert verdict.entries[2].data["certificate"] is None  # plaintext: no certificate to name

    checks = audit.check_receipts(audit.receipt_files(nodes), verdict, key)
    assert [c.problem for c in checks] == [None, None]

    # a forged receipt: another hash for h2's update (the signature no longer covers it)
    body = json.loads(receipts["h2"].read_text())
    body["receipt"]["sha256"] = "0" * 64
    forged = tmp_path / "forged" / "receipt.json"
    forged.parent.mkdir()
    forged.write_text(json.dumps(body))
    (check,) = audit.check_receipts([forged], verdict, key)
    assert "signature does not verify" in check.problem
    # a receipt signed by another key
    (check,) = audit.check_receipts([receipts["h2"]], verdict, SigningKey.generate().public)
    assert "signature does not verify" in check.problem
    # a log cut short at an entry boundary verifies on its own, not against the receipts
    cut = b"".join(lines_of(out / "audit.log")[:5])  # h2's update_accepted (entry 6) is gone
    short = verify_log(cut, key)
    assert short.ok
    problems = [c.problem for c in audit.check_receipts(audit.receipt_files(nodes), short, key)]
    assert problems[0] is None and "names entry 6, which the log lacks" in problems[1]


def test_a_restarted_engine_continues_the_chain_and_gives_the_same_receipt_for_a_replay(tmp_path):
    out = tmp_path / "agg"
    with in_process_aggregator(out, rounds=3, embed_dim=DIM) as (engine, stub, _):
        run = register(stub, "h1").round.run_id
        register(stub, "h2")
        stub.GetRound(pb.GetRoundRequest(run_id=run, node_id="h1", max_wait_ms=5000), timeout=10)
        first = upload(stub, run, "h1", update_payload(1, DIM), 0)
        upload(stub, run, "h2", update_payload(2, DIM), 0)
        stub.GetRound(pb.GetRoundRequest(run_id=run, node_id="h1", wait_for_round=1, max_wait_ms=5000), timeout=10)
    with in_process_aggregator(out, rounds=3, embed_dim=DIM) as (engine, stub, _):  # resumes the checkpoint
        assert engine.run_id == run
        again = upload(stub, run, "h1", update_payload(1, DIM), 0)
        assert again.replayed and (again.receipt, again.receipt_signature) == (first.receipt, first.receipt_signature)
    key = PublicKey.from_file(out / "audit.pub")
    verdict = verify_log((out / "audit.log").read_bytes(), key)
    assert verdict.ok, verdict.problem
    resumed = [e for e in verdict.entries if e.event == "aggregator_resumed"]
    assert len(resumed) == 1 and resumed[0].data == {"run_id": run, "version": 1, "phase": "collecting"}
    assert sum(e.event == "log_opened" for e in verdict.entries) == 1


def test_an_audit_log_that_cannot_be_written_fails_the_run_and_the_update_gets_no_receipt(tmp_path):
    out = tmp_path / "agg"
    with in_process_aggregator(out, rounds=2, embed_dim=DIM) as (engine, stub, _):
        run = register(stub, "h1").round.run_id
        register(stub, "h2")
        stub.GetRound(pb.GetRoundRequest(run_id=run, node_id="h1", max_wait_ms=5000), timeout=10)
        (out / "audit.log").rename(out / "audit.log.saved")
        (out / "audit.log").mkdir()  # every later open for writing fails (EISDIR), as a dead disk would
        with pytest.raises(grpc.RpcError) as refused:
            upload(stub, run, "h1", update_payload(1, DIM), 0)
        assert reason_of(refused.value) is Reason.ROUND_NOT_OPEN
        assert "audit log" in refused.value.details() and "cannot be written" in refused.value.details()
        info = stub.GetRound(pb.GetRoundRequest(run_id=run, node_id="h2"), timeout=10).round
        assert info.phase == pb.ROUND_PHASE_FAILED and "audit log" in info.message
        assert engine.audit.broken is not None and not engine.ledger.open  # nothing accepted
