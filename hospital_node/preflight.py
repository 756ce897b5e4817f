"""``fedmedclip node check``: everything a node needs, checked in seconds, before any image is encoded.

Each check gives PASSED or a problem with how to fix it:

identity     the certificate's name is the node id, the CA signed it, it is valid today, the key matches
data         the data folder or manifest is readable, has images, and its classes are the federation's
folders      the state and cache folders can be written
aggregator   the aggregator answers a TLS handshake and accepts this certificate (named cause if not)
registration a dry-run registration: the aggregator would admit this node's backbone, classes and counts
             (loads the backbone, a few seconds; encodes nothing, registers nothing)

``fedmedclip node run`` runs the same checks first (the registration once its backbone is loaded, before
any image is encoded) and stops on the first problem with its message, except an aggregator that
cannot be reached yet: a daemon waits for it (with backoff) instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hospital_node.config import ENV_PREFIX, NodeConfig
from shared.errors import FedMedCLIPError
from shared.ops.command import Command
from shared.ops.exitcodes import ExitCode
from shared.ops.logs import printable
from shared.wire.reasons import Reason, reason_of


class Status(StrEnum):
    PASSED = "PASSED"
    PROBLEM = "PROBLEM"
    UNREACHABLE = "UNREACHABLE"  # the aggregator did not answer: maybe not up yet, maybe a wrong address


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""
    loaded: Any = field(default=None, compare=False, repr=False)  # what the check read, for the next step

    @property
    def ok(self) -> bool:
        return self.status is Status.PASSED


class PreflightError(FedMedCLIPError):
    """A node cannot work as configured; the message says what and how to fix it."""

    reason = "preflight_failed"


def _problem(name: str, detail: str, fix: str) -> Check:
    return Check(name, Status.PROBLEM, detail, fix)


# --------------------------------------------------------------------------- identity


def check_identity(cfg: NodeConfig) -> Check:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if cfg.insecure:
        return Check("identity", Status.PASSED, "insecure mode: no certificate (tests on one machine only)")
    paths = {"tls_ca": cfg.tls_ca, "tls_cert": cfg.tls_cert, "tls_key": cfg.tls_key}
    for key, value in paths.items():
        if not value:
            return _problem("identity", f"{key} is not set", "use the node.yaml of this hospital's startup kit")
        if not Path(value).is_file():
            return _problem("identity", f"{key}: {value} does not exist", "copy the whole startup kit folder")
    try:
        ca = x509.load_pem_x509_certificate(Path(cfg.tls_ca).read_bytes())
        cert = x509.load_pem_x509_certificate(Path(cfg.tls_cert).read_bytes())
        key = serialization.load_pem_private_key(Path(cfg.tls_key).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        return _problem(
            "identity",
            f"a certificate or key file is not valid PEM: {exc}",
            "use the files of this hospital's startup kit, unmodified",
        )
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = names[0].value if names else ""
    if cn != cfg.node_id:
        return _problem(
            "identity",
            f"the certificate is issued to {cn!r}, but node_id is {cfg.node_id!r}",
            "set node_id to the certificate's name, or use this hospital's own kit",
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base with the others
        return _problem(
            "identity",
            f"the certificate was not signed by the CA in {cfg.tls_ca} ({type(exc).__name__})",
            "the certificate and ca.pem come from different federations: use one kit's files",
        )
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return _problem(
            "identity",
            f"the certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not today",
            "ask the federation's operator for a new kit (or check this machine's clock)",
        )
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*fmt) != cert.public_key().public_bytes(*fmt):
        return _problem(
            "identity",
            f"the key {cfg.tls_key} does not belong to the certificate {cfg.tls_cert}",
            "use key.pem and cert.pem from the same kit",
        )
    return Check(
        "identity",
        Status.PASSED,
        f"certificate for {cn!r}, signed by the federation's CA, valid until {cert.not_valid_after_utc:%Y-%m-%d}",
    )


# --------------------------------------------------------------------------- data


def check_data(cfg: NodeConfig) -> Check:
    from hospital_node.data import label_space, load_local
    from shared.data import UnknownClassError

    if not cfg.data:
        return _problem(
            "data",
            "data is not set",
            "set data: to this hospital's ImageFolder "
            "(<folder>/<class>/<images>) or a CSV manifest (path,label[,split])",
        )
    path = Path(cfg.data).expanduser()
    if not path.exists():
        return _problem("data", f"{path} does not exist", "set data: to the folder that holds the class folders")
    federation = label_space(path, cfg.classes)
    try:
        local = load_local(path, cfg.classes, split_seed=cfg.split_seed, evaluator=cfg.role == "evaluator")
    except UnknownClassError as exc:
        return _problem(
            "data",
            str(exc),
            "class folders (or labels) must be named as the federation's classes "
            f"{list(federation or ())}: rename or move that one",
        )
    except FedMedCLIPError as exc:
        return _problem("data", str(exc), "fix the file or folder named above")
    counts = local.dataset.class_counts()
    present = {name: n for name, n in counts.items() if n}
    if not present:
        return _problem("data", f"{path} holds no images", "put the images into one folder per class")
    train, val, test = local.counts()
    missing = [name for name, n in counts.items() if not n]
    detail = (
        f"{len(local.dataset)} images in {len(present)} of {len(counts)} classes "
        f"(train {train} / val {val} / test {test})"
    )
    if federation is None:
        return _problem(
            "data",
            detail + "; the federation's classes are unknown",
            "set classes: to the federation's class names (the kit's node.yaml has them)",
        )
    if missing:
        detail += f"; no images of {missing} here (fine: hospitals differ)"
    dp = cfg.dp_config()
    if dp.enabled and cfg.role == "trainer":
        try:
            detail += f"; differential privacy at delta {dp.delta_for(train):.2g}"
        except ValueError as exc:
            return _problem(
                "data", f"{detail}: {exc}", "set dp_delta below 1 / the training images (or leave it unset)"
            )
    return Check("data", Status.PASSED, detail, loaded=local)  # the node goes on with this listing


# --------------------------------------------------------------------------- folders


def check_folders(cfg: NodeConfig) -> Check:
    for key in ("state_dir", "cache_dir"):
        folder = Path(getattr(cfg, key)).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as exc:
            return _problem(
                "folders",
                f"{key} {folder} cannot be written: {exc.strerror or exc}",
                f"give {key} a folder this user may write to",
            )
    return Check("folders", Status.PASSED, f"state {cfg.state_dir} and cache {cfg.cache_dir} are writable")


# --------------------------------------------------------------------------- aggregator


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "localhost", int(port)


def check_aggregator(cfg: NodeConfig, timeout_s: float = 5.0) -> Check:
    """A TLS handshake with this node's certificate: does the aggregator answer, and accept us?"""
    try:
        host, port = _split_address(cfg.aggregator)
    except ValueError:
        return _problem("aggregator", f"aggregator {cfg.aggregator!r} is not host:port", "set aggregator: host:port")
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return Check(
            "aggregator",
            Status.UNREACHABLE,
            f"{cfg.aggregator} does not answer ({exc.strerror or exc})",
            "start the aggregator, or check the address and the firewall",
        )
    if cfg.insecure:
        sock.close()
        return Check("aggregator", Status.PASSED, f"{cfg.aggregator} answers (plaintext)")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.tls_ca)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(sock, server_hostname=cfg.tls_server_name or host) as tls:
            tls.settimeout(timeout_s)
            # with TLS 1.3 the server judges our certificate after the handshake: it then closes the
            # connection (or sends an alert) when it refuses it, and sends its HTTP/2 settings when not
            accepted = bool(tls.recv(1))
    except ssl.SSLCertVerificationError as exc:
        return _problem(
            "aggregator",
            f"this node does not trust the aggregator's certificate: {exc.verify_message}",
            "the aggregator is not the one this kit's CA signed: check the address, or the kit",
        )
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return _problem(
                "aggregator",
                f"the aggregator refused this certificate: not signed by this federation's CA ({exc.reason})",
                "use the kit the federation's operator issued for this hospital",
            )
        return _problem(
            "aggregator",
            f"the TLS handshake failed: {exc.reason or exc}",
            "check that the address is the aggregator's gRPC port",
        )
    except (TimeoutError, OSError) as exc:
        return Check(
            "aggregator",
            Status.UNREACHABLE,
            f"{cfg.aggregator} accepted the connection but did not finish the handshake ({exc})",
            "check that the address is the aggregator's gRPC port",
        )
    if not accepted:
        return _problem(
            "aggregator",
            "the aggregator refused this certificate: not signed by this federation's CA",
            "use the kit the federation's operator issued for this hospital",
        )
    return Check("aggregator", Status.PASSED, f"{cfg.aggregator} accepted this node's certificate (mTLS)")


# --------------------------------------------------------------------------- registration (dry run)

#: how to fix a registration the aggregator would refuse, by its reason
_REGISTRATION_FIXES = {
    Reason.REGISTRATION_MISMATCH: "this node's classes, backbone, method or seed must be the federation's: "
    "use the kit's node.yaml unchanged, and the same FedMedCLIP version as the aggregator",
    Reason.IDENTITY_NOT_ALLOWED: "this node id is not on the aggregator's allow-list: ask the operator to add it",
    Reason.IDENTITY_MISMATCH: "node_id must be the certificate's name: use this hospital's own kit",
    Reason.SAMPLE_COUNT_CHANGED: "this node joined the current run with other data; restore that data, or wait "
    "for the federation's next run",
    Reason.NODE_ID_TAKEN: "this node id joined the current run in another role: set role: as it was",
}


def check_registration(cfg: NodeConfig, setup=None, tls=None, timeout_s: float = 10.0, data=None) -> Check:
    """A dry-run Register: would the aggregator admit this node, with its backbone, classes and counts?

    Loads the backbone (seconds) unless ``setup`` (:class:`hospital_node.client.Setup`) is given, with the
    data check's listing ``data`` if given; encodes no image. Registers nothing.
    """
    import grpc

    from hospital_node.client import describe_round, load_setup, registration
    from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
    from shared.wire.tls import load_material, secure_channel
    from shared.wire.transport import channel_options

    if setup is None:
        try:
            setup = load_setup(cfg, data)
        except FedMedCLIPError as exc:
            return _problem("registration", str(exc), "fix the data or backbone settings named above")
    if tls is None and not cfg.insecure:
        tls = load_material(
            f"node {cfg.node_id}", cfg.aggregator, insecure=False, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key
        )
    request = registration(cfg, setup, dry_run=True)
    with secure_channel(cfg.aggregator, tls, channel_options(), cfg.tls_server_name) as channel:
        try:
            response = pb_grpc.AggregatorServiceStub(channel).Register(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            reason = reason_of(exc)
            if reason is None and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return Check(
                    "registration",
                    Status.UNREACHABLE,
                    f"{cfg.aggregator} did not answer a dry-run registration ({exc.code().name})",
                    "start the aggregator, or check the address",
                )
            return _problem(
                "registration",
                f"the aggregator would refuse this node ({reason or exc.code().name}): {printable(exc.details(), 500)}",
                _REGISTRATION_FIXES.get(reason, "ask the federation's operator; the aggregator's log says more"),
            )
    r = response.round
    detail = (
        f"the aggregator would admit {cfg.node_id} ({cfg.role}, {len(setup.class_names)} classes, backbone "
        f"{setup.fingerprint[:12]}) to run {printable(r.run_id, 64)}: {describe_round(r)}"
    )
    if r.message:
        detail += f"; {printable(r.message, 300)}"
    return Check("registration", Status.PASSED, detail)


# --------------------------------------------------------------------------- running the checks


def run_checks(cfg: NodeConfig, *, contact_aggregator: bool = True, dry_run: bool = False) -> list[Check]:
    """The checks in order; with ``dry_run`` (``node check``) also a dry-run registration, when every other
    check passed (``node run`` makes that one after loading the backbone it keeps)."""
    checks = [check_identity(cfg), check_data(cfg), check_folders(cfg)]
    if contact_aggregator and checks[0].ok:
        checks.append(check_aggregator(cfg))
        if dry_run and all(c.ok for c in checks):
            checks.append(check_registration(cfg, data=listing(checks)))
    return checks


def listing(checks: list[Check]):
    """The data check's :class:`hospital_node.data.LocalData`, read once for every later step (None: failed)."""
    return next((c.loaded for c in checks if c.name == "data"), None)


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status.value:<11}  {c.detail}")
        if c.fix and not c.ok:
            lines.append(f"{'':<{width}}  {'':<11}  fix: {c.fix}")
    return "\n".join(lines)


def require(cfg: NodeConfig) -> list[Check]:
    """The checks ``node run`` makes first: raises :class:`PreflightError` on the first problem.

    An aggregator that does not answer yet is no problem for a daemon: it retries with backoff.
    """
    checks = run_checks(cfg)
    for c in checks:
        if c.status is Status.PROBLEM:
            raise PreflightError(f"{c.name}: {c.detail} (fix: {c.fix}; `fedmedclip node check` shows every check)")
    return checks


def _check(cfg: NodeConfig, _args: argparse.Namespace) -> int:
    checks = run_checks(cfg, dry_run=True)
    print(render(checks))
    bad = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(bad)} of {len(checks)} checks passed" + (": ready to run" if not bad else ""))
    return ExitCode.OK if not bad else ExitCode.USAGE


CHECK = Command(
    name="check",
    help="check the kit, the data and the connection in seconds, before running",
    run=_check,
    config=NodeConfig,
    env_prefix=ENV_PREFIX,
    description=__doc__.split("\n\n")[0],
)
