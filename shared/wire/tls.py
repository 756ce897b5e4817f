"""Node identity: mutual TLS between the hospital nodes and the aggregator.

A federation has its own certificate authority, made by ``fedmedclip provision``
(:mod:`aggregator.provision`). The aggregator presents a server certificate and demands a client
certificate signed by that CA; a node's identity is the common name (CN) of its certificate. The
aggregator checks that CN against its allow-list and against the node id every request claims
(``AggregatorServicer._authorize``), so one hospital cannot speak for another.

Plaintext exists only behind an explicit ``insecure: true`` / ``--insecure`` with no certificate
configured, and logs a loud warning; a configuration with neither certificates nor that flag, or
with both, refuses to start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from shared.ops.config import ConfigError

log = logging.getLogger("fedmedclip.tls")

INSECURE_WARNING = (
    "INSECURE MODE: plaintext gRPC and no node identity. Anyone who can reach %s can read the "
    "adapters and speak for any hospital. For tests on one machine only; never with real data. "
    "Make certificates with `fedmedclip provision`."
)


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of one party: the federation's CA, its own certificate and private key."""

    ca: bytes
    cert: bytes
    key: bytes


def load_material(
    who: str, address: str, *, insecure: bool, ca: str | None, cert: str | None, key: str | None
) -> TlsMaterial | None:
    """The party's certificates, or None in insecure mode (after a loud warning).

    Raises :class:`ConfigError` when certificates are missing and insecure mode was not asked for,
    or when a file is missing: a service refuses to start rather than fall back to plaintext.
    """
    paths = {"tls_ca": ca, "tls_cert": cert, "tls_key": key}
    if insecure:
        given = [name for name, value in paths.items() if value]
        if given:  # e.g. FEDMEDCLIP_*_INSECURE=true slipped into a provisioned set-up: never downgrade silently
            raise ConfigError(
                f"{who}: insecure is set, but so is TLS material ({', '.join(given)}): plaintext "
                "only without any certificate configured; drop insecure (or the certificates)"
            )
        log.warning(INSECURE_WARNING, address)
        return None
    missing = [name for name, value in paths.items() if not value]
    if missing:
        raise ConfigError(
            f"{who} refuses to start without TLS: {', '.join(missing)} not set. Provision a "
            "federation with `fedmedclip provision --nodes ... --out DIR` and use the "
            "config it writes, or pass --insecure for a plaintext test setup"
        )
    data = {}
    for name, value in paths.items():
        path = Path(value)  # type: ignore[arg-type]
        if not path.is_file():
            raise ConfigError(f"{name}: {path} does not exist")
        data[name] = path.read_bytes()
    key_mode = Path(key).stat().st_mode & 0o077  # type: ignore[arg-type]
    if key_mode:
        log.warning(
            "private key %s is readable by group or others (mode %o); chmod 600 it",
            key,
            Path(key).stat().st_mode & 0o777,
        )  # type: ignore[arg-type]
    return TlsMaterial(ca=data["tls_ca"], cert=data["tls_cert"], key=data["tls_key"])


def party_material(folder: Path | str) -> TlsMaterial:
    """The material of one party's folder as ``fedmedclip provision`` writes it."""
    folder = Path(folder)
    return TlsMaterial(
        ca=(folder / "ca.pem").read_bytes(),
        cert=(folder / "cert.pem").read_bytes(),
        key=(folder / "key.pem").read_bytes(),
    )


def server_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    """TLS that demands a client certificate signed by the federation's CA."""
    return grpc.ssl_server_credentials(
        [(material.key, material.cert)], root_certificates=material.ca, require_client_auth=True
    )


def secure_channel(
    address: str, material: TlsMaterial | None, options: list[tuple[str, object]], server_name: str | None = None
) -> grpc.Channel:
    """A channel to the aggregator: mTLS with this party's certificate, or plaintext when ``material`` is None."""
    if material is None:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
    )
    if server_name:  # the aggregator's certificate names another host than the one dialled
        options = [*options, ("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(address, creds, options=options)


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The CN of the client certificate the TLS handshake verified, or None (plaintext, no certificate)."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode("utf-8", "replace") if names else None


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (mode 0600, whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: set it
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
