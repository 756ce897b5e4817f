"""``fedmedclip provision``: certificates and ready-to-use configs for a whole federation.

One command, as ``nvflare provision`` does it::

    fedmedclip provision --nodes hospital_1,hospital_2,hospital_3,global --out pki \\
        [--aggregator-host localhost,aggregator] [--port 50051] [--mount /pki]

writes (private keys mode 0600, the CA's folder 0700)::

    pki/ca/ca.pem, ca.key            the federation's certificate authority (keep ca.key offline)
    pki/aggregator/                  ca.pem, cert.pem, key.pem, aggregator.yaml (listen, TLS, allow-list)
    pki/<node>/                      ca.pem, cert.pem (CN = node id), key.pem, node.yaml (node id, address, TLS)

Each party's folder is all that party needs: hand ``pki/hospital_1/`` to hospital 1 only. Run with
``--config pki/aggregator/aggregator.yaml`` and ``--config pki/hospital_1/node.yaml`` (a node takes
its data settings from a second ``--config`` or from flags). Running the command again on the same
folder reuses the CA and the existing certificates, issues what is missing and rewrites the configs:
that is how a hospital is added (list every node again). Keys are ECDSA P-256.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.ops.command import Command, main_for
from shared.ops.config import ConfigError
from shared.wire.tls import write_private

DEFAULT_PORT = 50051
CA_DAYS = 3650
LEAF_DAYS = 730
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedMedCLIP federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def make_ca(common_name: str = "FedMedCLIP CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    cert = (_builder(_name(common_name), _name(common_name), key.public_key(), CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *, server: bool,
          hosts: list[str] = ()) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate: the aggregator's (server auth, SANs for ``hosts``) or a node's (client auth)."""
    key = _new_key()
    builder = (_builder(_name(common_name), ca_cert.subject, key.public_key(), LEAF_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _party_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_or_make_ca(root: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    ca_dir = _party_dir(root, "ca")
    ca_dir.chmod(0o700)
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cert, key, False  # type: ignore[return-value]
    cert, key = make_ca()
    cert_path.write_bytes(_cert_pem(cert))
    write_private(key_path, _key_pem(key))
    return cert, key, True


def _issue_into(folder: Path, ca_cert, ca_key, common_name: str, *, server: bool, hosts: list[str] = ()) -> bool:
    """Write ca.pem, cert.pem and key.pem into ``folder`` unless a certificate is already there."""
    (folder / "ca.pem").write_bytes(_cert_pem(ca_cert))
    if (folder / "cert.pem").exists() and (folder / "key.pem").exists():
        return False
    cert, key = issue(ca_cert, ca_key, common_name, server=server, hosts=hosts)
    write_private(folder / "key.pem", _key_pem(key))
    (folder / "cert.pem").write_bytes(_cert_pem(cert))
    return True


def _write_config(path: Path, header: str, values: dict) -> None:
    path.write_text(f"# {header}\n" + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def provision(out: Path | str, nodes: list[str], *, aggregator_hosts: list[str] = ("localhost",),
              port: int = DEFAULT_PORT, mount: str | None = None) -> dict[str, Path]:
    """Provision (or extend) a federation in ``out``; returns each party's config file."""
    bad = [n for n in nodes if not _NODE_ID.fullmatch(n) or n in ("ca", "aggregator")]
    if bad or not nodes or len(set(nodes)) != len(nodes):
        raise ValueError(f"node ids must be distinct, 1-64 characters [A-Za-z0-9_.-], not 'ca' or 'aggregator': "
                         f"{bad or nodes}")
    hosts = [h for h in aggregator_hosts if h] or ["localhost"]
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    seen = Path(mount) if mount else root  # where the parties will find these files

    def at(folder: str, name: str) -> str:
        return str(seen / folder / name)

    ca_cert, ca_key, _ = _load_or_make_ca(root)
    configs: dict[str, Path] = {}
    stamp = f"written by `fedmedclip provision` on {dt.date.today().isoformat()}"
    agg = _party_dir(root, "aggregator")
    _issue_into(agg, ca_cert, ca_key, "aggregator", server=True, hosts=hosts)
    configs["aggregator"] = agg / "aggregator.yaml"
    _write_config(configs["aggregator"], f"FedMedCLIP aggregator, {stamp}; key.pem is private (mode 0600)",
                  {"listen": f"0.0.0.0:{port}", "tls_ca": at("aggregator", "ca.pem"),
                   "tls_cert": at("aggregator", "cert.pem"), "tls_key": at("aggregator", "key.pem"),
                   "allowed_nodes": list(nodes)})
    for node in nodes:
        folder = _party_dir(root, node)
        _issue_into(folder, ca_cert, ca_key, node, server=False)
        configs[node] = folder / "node.yaml"
        _write_config(configs[node], f"FedMedCLIP node {node}, {stamp}; key.pem is private (mode 0600)",
                      {"node_id": node, "aggregator": f"{hosts[0]}:{port}", "tls_ca": at(node, "ca.pem"),
                       "tls_cert": at(node, "cert.pem"), "tls_key": at(node, "key.pem")})
    return configs


@dataclass(frozen=True)
class ProvisionConfig:
    nodes: list[str] | None = None  # node ids, comma-separated (each becomes a certificate's CN); required
    out: str = "pki"  # output folder (reused: the existing CA and certificates are kept)
    aggregator_host: list[str] = field(default_factory=lambda: ["localhost"])  # the aggregator's host names or IPs; the first goes into the node configs (localhost and 127.0.0.1 are always in its certificate)
    port: int = DEFAULT_PORT  # the aggregator's gRPC port
    mount: str | None = None  # write the configs' paths as seen under this folder (e.g. /pki in a container)


def _run(cfg: ProvisionConfig, _args: argparse.Namespace) -> int:
    if not cfg.nodes:
        raise ConfigError("nodes: give the node ids, e.g. --nodes hospital_1,hospital_2")
    try:
        configs = provision(cfg.out, list(cfg.nodes), aggregator_hosts=list(cfg.aggregator_host), port=cfg.port,
                            mount=cfg.mount)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    root = Path(cfg.out).resolve()
    print(f"federation in {root}: CA ca/ca.pem (keep ca/ca.key offline); allow-list {list(cfg.nodes)}")
    for party, path in configs.items():
        print(f"  {party:>12}: --config {path}")
    return 0


COMMAND = Command(name="provision", help="make a federation's CA, certificates and configs", run=_run,
                  config=ProvisionConfig, env_prefix="FEDMEDCLIP_PROVISION_", description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    return main_for(COMMAND, argv, "python -m aggregator provision")
