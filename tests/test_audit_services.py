"""The audit log of a real aggregator process (mTLS, real gRPC) killed with SIGKILL, its log torn, restarted.

Two light clients with real certificates (hospital_1, hospital_2 of the suite's kits) drive a 3-round run
with small adapters. The aggregator is SIGKILLed right after it acknowledged hospital_1's round-2 update,
so the last line of its log is that update's entry, whose receipt hospital_1 holds. An append torn by the
kill is then made real the honest way: the last line of that real log is cut in its middle (a kill -9
cannot be aimed inside one write(2)). ``fedmedclip audit verify`` names the torn tail; the restarted
aggregator records it (``log_recovered``), resumes the run on the same chain, and the run ends with a log
that verifies. The receipt of the cut entry no longer matches the log, and ``verify --receipts`` says so:
that is what receipts are for. Finally an aggregator refuses to start on a copy of the log with one byte
changed (exit 2, the entry named).

The federation of real node daemons, whose receipts verify against its aggregator's log, is in
tests/test_services_federation.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from shared.audit import PublicKey, keep_receipt, verify_log
from shared.learning.rounds import WireConfig, encode_adapter
from shared.learning.training import TrainConfig, build_adapter, get_method
from shared.ops.exitcodes import ExitCode
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.protocol import state_digest
from shared.wire.tls import secure_channel
from shared.wire.transport import channel_options, chunks
from tests.services_support import Cluster, service_env, start_aggregator_process, tls_of

DIM = 16
FEDMEDCLIP = Path(sys.executable).with_name("fedmedclip")
NODES = ("hospital_1", "hospital_2")


def initial_state() -> dict[str, torch.Tensor]:
    return build_adapter(get_method("fedmedclip"), DIM, TrainConfig(), 0).travel_state()


class LightNode:
    """A node with a real certificate that sends small hand-made updates and keeps its receipts."""

    def __init__(self, pki: Path, node: str, address: str, receipts: Path, key: PublicKey) -> None:
        self.node, self.receipts, self.key = node, receipts / node, key
        self.channel = secure_channel(address, tls_of(pki, node), channel_options())
        self.stub = pb_grpc.AggregatorServiceStub(self.channel)
        self.run_id = ""

    def register(self) -> pb.RoundInfo:
        response = self.stub.Register(
            pb.RegisterRequest(
                node_id=self.node,
                role=pb.NODE_ROLE_TRAINER,
                backbone_fingerprint="f" * 64,
                class_names=["a", "b", "c"],
                embed_dim=DIM,
                method="fedmedclip",
                initial_state_sha256=state_digest(initial_state()),
                num_train_samples=10,
            ),
            timeout=30,
        )
        self.run_id = response.round.run_id
        return response.round

    def wait_round(self, r: int) -> pb.RoundInfo:
        request = pb.GetRoundRequest(run_id=self.run_id, node_id=self.node, wait_for_round=r, max_wait_ms=20_000)
        info = self.stub.GetRound(request, timeout=30).round
        assert info.round_id == r and info.phase == pb.ROUND_PHASE_COLLECTING, info
        return info

    def upload(self, r: int) -> tuple[pb.UploadUpdateResponse, Path]:
        g = torch.Generator().manual_seed(100 * r + int(self.node[-1]))
        base = initial_state()
        p = encode_adapter(
            {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, base, WireConfig()
        )
        update_id = f"{self.run_id}-{self.node}-r{r}"
        head = pb.PayloadHeader(
            run_id=self.run_id,
            round_id=r,
            node_id=self.node,
            update_id=update_id,
            version=r,
            codec=p.codec,
            wire_bytes=len(p.data),
            sha256=p.sha256,
            raw_bytes=p.raw_nbytes,
        )
        messages = [pb.UploadUpdateRequest(header=head)] + [pb.UploadUpdateRequest(chunk=c) for c in chunks(p.data)]
        ack = self.stub.UploadUpdate(iter(messages), timeout=30)
        expected = {"run_id": self.run_id, "round_id": r, "node": self.node, "update_id": update_id, "sha256": p.sha256}
        path, problem = keep_receipt(self.receipts, ack.receipt, ack.receipt_signature, self.key, expected)
        assert problem is None, problem
        return ack, path

    def close(self) -> None:
        self.channel.close()


def audit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FEDMEDCLIP), "audit", *args], capture_output=True, text=True, timeout=60, env=service_env()
    )


def test_a_sigkilled_aggregator_with_a_torn_log_resumes_one_verifiable_chain(tmp_path, pki):
    cluster = Cluster(tmp_path)
    out, receipts = tmp_path / "agg", tmp_path / "receipts"
    key_file = pki / "aggregator" / "audit.pub"  # the key every node's kit holds (aggregator_audit.pub)
    key = PublicKey.from_file(key_file)
    flags = ("--rounds", "3", "--min-nodes", "2", "--embed-dim", "16", "--round-timeout-s", "120", "--linger-s", "1")
    clients: list[LightNode] = []
    try:
        first = start_aggregator_process(cluster, pki, out, *flags)
        clients = [LightNode(pki, n, first["address"], receipts, key) for n in NODES]
        for c in clients:
            c.register()
        for c in clients:
            c.wait_round(0)
            c.upload(0)
        clients[0].wait_round(1)
        ack, cut_receipt = clients[0].upload(1)  # acknowledged: its entry is on disk, fsynced
        first["proc"].popen.kill()  # SIGKILL
        first["proc"].wait(timeout=30)

        log_path = out / "audit.log"
        whole = log_path.read_bytes()
        before = verify_log(whole, key)
        assert before.ok and before.entries[-1].event == "update_accepted"
        assert before.seq == json.loads(ack.receipt)["seq"]  # the receipt names the log's last entry
        last = whole.splitlines(keepends=True)[-1]
        torn = whole[: len(whole) - len(last) // 2]
        log_path.write_bytes(torn)  # the append torn in its middle: no newline, half an entry
        done = audit_cli("verify", str(log_path), "--key", str(key_file))
        assert done.returncode == ExitCode.AUDIT_FAILED, done.stdout + done.stderr
        assert f"FAILED: first bad entry at line {before.entries[-1].line}" in done.stdout
        assert "torn tail" in done.stdout and "interrupted" in done.stdout

        for c in clients:
            c.close()
        second = start_aggregator_process(cluster, pki, out, *flags, name="aggregator_restarted")
        assert second["run_id"] == first["run_id"]  # resumed from the checkpoint of round 1
        clients = [LightNode(pki, n, second["address"], receipts, key) for n in NODES]
        for c in clients:
            c.run_id = second["run_id"]
        for r in (1, 2):
            for c in clients:
                c.wait_round(r)
                again, _ = c.upload(r)
                assert not again.replayed  # the open round was lost with the process: accepted anew
        assert second["proc"].wait(timeout=60) == 0
        logs = second["proc"].text()
    finally:
        for c in clients:
            c.close()
        cluster.close()
    assert "AUDIT LOG" in logs and "torn entry" in logs

    after = log_path.read_bytes()
    assert after.startswith(torn)  # nothing dropped or rewritten
    verdict = verify_log(after, key)
    assert verdict.ok, verdict.problem
    (recovered,) = verdict.recovered
    assert recovered.by.seq == before.seq and recovered.by.data["last_good_seq"] == before.seq - 1
    events = [e.event for e in verdict.entries[before.seq - 1 :]]
    assert events[:2] == ["log_recovered", "aggregator_resumed"] and events[-1] == "run_finished"
    assert sum(e == "round_closed" for e in (x.event for x in verdict.entries)) == 3

    done = audit_cli("verify", str(log_path), "--key", str(key_file))
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert f"recovered by entry seq {before.seq}" in done.stdout and "OK:" in done.stdout
    # the receipts: every one matches the log but the one whose entry was cut, which is named
    done = audit_cli("verify", str(log_path), "--key", str(key_file), "--receipts", str(receipts))
    assert done.returncode == ExitCode.AUDIT_FAILED, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED receipt")]
    assert len(failed) == 1 and str(cut_receipt) in failed[0] and "log_recovered" in failed[0], done.stdout
    assert "receipts in" in done.stdout and "7 checked, 6 match the log" in done.stdout
    cut_receipt.unlink()
    done = audit_cli("verify", str(log_path), "--key", str(key_file), "--receipts", str(receipts))
    assert done.returncode == ExitCode.OK and "6 checked, 6 match the log" in done.stdout, done.stdout

    # an aggregator does not append to a log that was altered: one byte of entry 5 changed
    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    lines = (altered / "audit.log").read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'"event":"', b'"event":"X', 1)
    (altered / "audit.log").write_bytes(b"".join(lines))
    (altered / "endpoints.json").unlink()
    cluster = Cluster(tmp_path)
    try:
        proc = cluster.add(
            "aggregator_on_altered_log",
            [
                "-m",
                "aggregator",
                "--config",
                str(pki / "aggregator" / "aggregator.yaml"),
                "--trust-first-node",
                "true",
                "--listen",
                "127.0.0.1:0",
                "--health-port",
                "0",
                "--metrics-port",
                "0",
                "--out-dir",
                str(altered),
                *flags,
            ],
        )
        code = proc.wait(timeout=120)
    finally:
        cluster.close()
    assert code == ExitCode.USAGE, proc.text()[-2000:]
    assert "does not verify at line 5 (seq 5)" in proc.text()
