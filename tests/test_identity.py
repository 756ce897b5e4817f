"""Node identity: mTLS between nodes and a running aggregator process, and the provisioning command.

Refused, each against the real aggregator over real gRPC: no client certificate, plaintext, a
certificate from another CA (all three fail the TLS handshake: UNAVAILABLE, before any request is
read), a valid certificate whose CN is not on the allow-list (PERMISSION_DENIED), and a valid,
allowed certificate that claims another node id (PERMISSION_DENIED). Each tries to register and to
upload an update; afterwards the round closes on the two legitimate updates and the global equals,
byte for byte, the one computed from those two alone.
"""

from __future__ import annotations

import stat
import subprocess
import sys

import grpc
import pytest
import yaml

from aggregator.config import AggregatorConfig
from bench.light_client import Federation, LightNode, encode, perturbed, rpc_code
from shared.learning.aggregation import capped_weights, make_aggregator
from shared.learning.rounds import WireConfig, fold_update, publish_global
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.tls import INSECURE_WARNING, TlsMaterial
from tests.services_support import (
    REPO_ROOT,
    Cluster,
    free_port,
    provision_pki,
    read_json,
    scrape,
    service_env,
    start_aggregator_process,
    tls_of,
    total,
    wait_for,
)

FED = Federation(embed_dim=16)


def test_provision_issues_one_ca_and_a_certificate_per_party_named_by_its_node_id(tmp_path):
    """The identities behind mTLS (the kits' layout and file modes: tests/test_provision.py)."""
    out = tmp_path / "pki"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aggregator",
            "provision",
            "--nodes",
            "hospital_1,hospital_2,global",
            "--out",
            str(out),
            "--aggregator-host",
            "localhost,aggregator",
        ],
        cwd=REPO_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    ca = tmp_path / "pki-ca"
    for party in ("aggregator", "hospital_1", "hospital_2", "global"):
        assert stat.S_IMODE((out / party / "key.pem").stat().st_mode) == 0o600
        assert (out / party / "cert.pem").is_file() and (out / party / "ca.pem").read_bytes() == (
            ca / "ca.pem"
        ).read_bytes()
    agg = yaml.safe_load((out / "aggregator" / "aggregator.yaml").read_text())
    assert agg["allowed_nodes"] == ["hospital_1", "hospital_2", "global"]
    node = yaml.safe_load((out / "hospital_1" / "node.yaml").read_text())
    assert node["node_id"] == "hospital_1" and node["aggregator"] == "localhost:50051"
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((out / "aggregator" / "cert.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "aggregator"} <= set(sans.get_values_for_type(x509.DNSName))
    authority = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    for party in ("hospital_1", "hospital_2", "global"):
        leaf = x509.load_pem_x509_certificate((out / party / "cert.pem").read_bytes())
        assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == party
        assert leaf.issuer == authority.subject
        leaf.verify_directly_issued_by(authority)  # raises unless the CA signed it


def test_services_refuse_to_start_without_certificates_unless_insecure(tmp_path):
    run = lambda *args: subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=service_env(),  # noqa: E731
        capture_output=True,
        text=True,
        timeout=120,
    )
    agg = run("-m", "aggregator", "--out-dir", str(tmp_path / "a"), "--listen", "127.0.0.1:0")
    assert agg.returncode == 2 and "refuses to start without TLS" in agg.stderr and "--insecure" in agg.stderr
    node = run("-m", "hospital_node", "run", "--data", str(tmp_path), "--state-dir", str(tmp_path / "n"))
    assert node.returncode == 2 and "refuses to start without TLS" in node.stderr
    cluster = Cluster(tmp_path)
    try:
        out = tmp_path / "insecure"
        port = free_port()
        proc = cluster.add(
            "insecure",
            [
                "-m",
                "aggregator",
                "--insecure",
                "--trust-first-node",
                "true",
                "--listen",
                f"127.0.0.1:{port}",
                "--health-port",
                "0",
                "--metrics-port",
                "0",
                "--out-dir",
                str(out),
                "--embed-dim",
                str(FED.embed_dim),
            ],
        )
        endpoints = wait_for(lambda: read_json(out / "endpoints.json"), 120, "the insecure aggregator", [proc])
        plaintext = LightNode(endpoints["address"], "anyone", None, FED, timeout_s=10)
        try:
            registered = rpc_code(plaintext.register)  # plaintext, no certificate, any node id: admitted
        finally:
            plaintext.close()
    finally:
        cluster.close()
    assert registered == grpc.StatusCode.OK
    assert INSECURE_WARNING.split("%s")[0] in proc.text()  # the operator's warning is part of the product


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    # hospital_x holds a valid certificate of this CA, but the aggregator's allow-list leaves it out
    pki = provision_pki(root / "pki", ["hospital_1", "hospital_2", "hospital_x"])
    rogue = provision_pki(root / "rogue", ["hospital_1"])  # another CA, the same node name
    cluster = Cluster(root)
    try:
        agg = start_aggregator_process(
            cluster,
            pki,
            root / "agg",
            "--allowed-nodes",
            "hospital_1,hospital_2",
            "--rounds",
            "1",
            "--min-nodes",
            "2",
            "--embed-dim",
            str(FED.embed_dim),
            "--round-timeout-s",
            "600",
            "--linger-s",
            "600",
            "--exit-when-done",
            "false",
        )
        yield {"agg": agg, "pki": pki, "rogue": rogue}
    finally:
        cluster.close()


def _attempts(node: LightNode, claimed: str, run_id: str) -> list[grpc.StatusCode]:
    """Register as ``claimed``, then upload a poisoned update as ``claimed``: both status codes."""
    initial = FED.initial_state()
    poison = encode({k: v + 1.0 for k, v in initial.items()}, initial)
    node.run_id = run_id
    return [rpc_code(lambda: node.register(node_id=claimed)), rpc_code(lambda: node.upload(poison, 0, node_id=claimed))]


def test_strangers_and_impostors_are_refused_and_nothing_they_send_reaches_the_aggregate(federation):
    agg, pki = federation["agg"], federation["pki"]
    address = agg["address"]
    legit = {
        n: LightNode(address, n, tls_of(pki, n), FED, num_train=10 * i)
        for i, n in enumerate(("hospital_1", "hospital_2"), start=1)
    }
    ca_only = TlsMaterial(ca=(pki / "hospital_1" / "ca.pem").read_bytes(), cert=b"", key=b"")
    rogue = tls_of(federation["rogue"], "hospital_1")
    parties = {
        "no certificate": LightNode(address, "hospital_1", None, FED, timeout_s=5),  # plaintext
        "server-only TLS": _ca_only_node(address, ca_only),
        "certificate of another CA": LightNode(address, "hospital_1", rogue, FED, timeout_s=5),
        "CN not on the allow-list": LightNode(address, "hospital_x", tls_of(pki, "hospital_x"), FED),
        "CN differs from the claimed node id": LightNode(address, "hospital_2", tls_of(pki, "hospital_2"), FED),
    }
    try:
        legit["hospital_1"].register()
        run_id = legit["hospital_1"].run_id
        before = scrape(agg["metrics"])
        codes = {
            name: _attempts(node, "hospital_x" if "allow-list" in name else "hospital_1", run_id)
            for name, node in parties.items()
        }
        after = scrape(agg["metrics"])
        legit["hospital_2"].register()
        payloads = {
            n: encode(perturbed(FED.initial_state(), 0.01, seed=i), FED.initial_state())
            for i, n in enumerate(legit, start=1)
        }
        for n, node in legit.items():
            assert not node.upload(payloads[n], 0).replayed
        info = legit["hospital_1"].round(1, max_wait_s=20)
        _, data = legit["hospital_1"].fetch(1)
        final = scrape(agg["metrics"])
    finally:
        for node in [*legit.values(), *parties.values()]:
            node.close()
    unavailable = [grpc.StatusCode.UNAVAILABLE] * 2
    denied = [grpc.StatusCode.PERMISSION_DENIED] * 2
    assert codes == {
        "no certificate": unavailable,
        "server-only TLS": unavailable,
        "certificate of another CA": unavailable,
        "CN not on the allow-list": denied,
        "CN differs from the claimed node id": denied,
    }
    rejected = lambda m, reason: total(m, "fedmedclip_requests_rejected_total", reason=reason)  # noqa: E731
    assert rejected(after, "identity_not_allowed") - rejected(before, "identity_not_allowed") == 2
    assert rejected(after, "identity_mismatch") - rejected(before, "identity_mismatch") == 2
    assert total(after, "fedmedclip_updates_accepted_total") == 0
    assert total(final, "fedmedclip_updates_accepted_total") == 2
    assert total(final, "fedmedclip_nodes_registered", role="trainer") == 2
    assert info.phase == pb.ROUND_PHASE_FINISHED
    expected = make_aggregator("weighted")
    defaults = AggregatorConfig()  # the weights the aggregator gives the two legitimate nodes
    weights = capped_weights(
        {n: 10 * i for i, n in enumerate(legit, start=1)},
        max_samples=defaults.max_samples_per_node,
        max_share=defaults.max_weight_share,
    )
    for n in legit:
        fold_update(expected, payloads[n].data, payloads[n].sha256, FED.initial_state(), weights[n], WireConfig())
    assert data == publish_global(expected, FED.initial_state(), WireConfig())[0].data
    assert agg["proc"].alive()


def _ca_only_node(address: str, material: TlsMaterial) -> LightNode:
    """TLS that checks the server but presents no client certificate."""
    node = LightNode(address, "hospital_1", None, FED, timeout_s=5)
    node.channel.close()
    node.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=material.ca))
    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc

    node.stub = pb_grpc.AggregatorServiceStub(node.channel)
    return node
