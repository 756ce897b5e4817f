"""``fedmedclip provision``: a startup kit per party of a federation, and its certificate authority.

One command, in the spirit of NVFlare's startup kits::

    fedmedclip provision --nodes hospital_1,hospital_2,hospital_3,global --evaluators global --out kits \\
        [--classes-file classes.txt] [--aggregator-host fl.example.org] [--listen 0.0.0.0:50051]

writes, whatever the umask (folders 0700, private keys 0600, scripts 0700, the rest 0644)::

    kits-ca/ca.pem, ca.key        the federation's certificate authority (apart from the kits: keep it offline)
    kits/aggregator/              ca.pem, cert.pem, key.pem, audit.key, audit.pub, aggregator.yaml, README.md,
                                  start.sh, stop.sh
    kits/<node>/                  ca.pem, cert.pem (CN = node id), key.pem, aggregator_audit.pub, node.yaml,
                                  README.md, start.sh, stop.sh

Each kit is all that party needs and works wherever it is copied: the paths in its config are
relative to the config file. Hand ``kits/hospital_1/`` to hospital 1 only. Given the federation's
class names, the aggregator's config pins them and the backbone fingerprint they give, so no node
can set the label space by registering first; each node's config carries the same class names.
The aggregator listens on loopback unless ``--listen`` names a public address. Running the command
again on the same folders reuses the CA and the existing certificates, issues what is missing and
rewrites the configs: that is how a hospital is added (list every node again). Keys are ECDSA P-256.
``audit.key`` (Ed25519) signs the aggregator's audit log and receipts (docs/audit.md); its public half
goes into every node's kit, so a hospital checks its receipts against a key it got with its kit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.audit import KEY_NAME as AUDIT_KEY
from shared.audit import SigningKey
from shared.ops.command import Command, main_for
from shared.ops.config import ConfigError
from shared.pki import cert_pem, issue, key_pem, make_ca

DEFAULT_PORT = 50051
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _write(path: Path, data: bytes | str, mode: int) -> None:
    """Write ``path`` with exactly ``mode``, whatever the umask and whatever mode it had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def _party_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _load_or_make_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_dir.chmod(0o700)
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cert, key, False  # type: ignore[return-value]
    cert, key = make_ca()
    _write(cert_path, cert_pem(cert), 0o644)
    _write(key_path, key_pem(key), 0o600)
    return cert, key, True


def _issue_into(folder: Path, ca_cert, ca_key, common_name: str, *, server: bool, hosts: list[str] = ()) -> bool:
    """Write ca.pem, cert.pem and key.pem into ``folder`` unless a certificate is already there."""
    _write(folder / "ca.pem", cert_pem(ca_cert), 0o644)
    if (folder / "cert.pem").exists() and (folder / "key.pem").exists():
        return False
    cert, key = issue(ca_cert, ca_key, common_name, server=server, hosts=hosts)
    _write(folder / "key.pem", key_pem(key), 0o600)
    _write(folder / "cert.pem", cert_pem(cert), 0o644)
    return True


def _audit_key(folder: Path) -> SigningKey:
    """The aggregator's audit signing key in its kit (kept when provisioning again), its public half beside it."""
    path = folder / AUDIT_KEY
    key = SigningKey.load(path) if path.exists() else SigningKey.generate()
    key.save(path)  # key 0600, audit.pub 0644, whatever the umask
    return key


def _write_config(path: Path, header: str, values: dict) -> None:
    _write(path, f"# {header}\n" + yaml.safe_dump(values, sort_keys=False), 0o644)


_SCRIPTS = {
    # the daemon in the foreground (for a terminal, systemd or a container); its pid is in its lock file
    "start.sh": """#!/bin/sh
# Start this party's FedMedCLIP daemon with the settings in {config} (add flags to override them).
cd "$(dirname "$0")" && exec fedmedclip {command} --config {config} "$@"
""",
    "stop.sh": """#!/bin/sh
# Stop the daemon start.sh started (SIGTERM: it saves its state and leaves cleanly).
cd "$(dirname "$0")" || exit 1
lock={lock}
[ -s "$lock" ] || {{ echo "not running (no $lock)"; exit 0; }}
kill -TERM "$(cat "$lock")" 2>/dev/null && echo "stopped pid $(cat "$lock")" || echo "not running"
""",
}

_NODE_README = """# FedMedCLIP startup kit: {node}

Issued on {date} by the federation's operator. Keep this folder private: `key.pem` is this
hospital's identity. Everything in `node.yaml` is relative to this folder.

| file | what it is |
|---|---|
| `node.yaml` | settings: node id `{node}`, the aggregator `{aggregator}`, certificates{classes_line} |
| `cert.pem`, `key.pem` | this hospital's certificate (CN = `{node}`) and private key (mode 0600) |
| `ca.pem` | the federation's certificate authority: only an aggregator it signed is trusted |
| `aggregator_audit.pub` | the aggregator's audit key (id `{audit_key_id}`): the node checks every receipt with it |
| `start.sh`, `stop.sh` | start the node daemon in the foreground; stop it (SIGTERM) |

1. Set `data:` in `node.yaml` to this hospital's images: an ImageFolder (`<folder>/<class>/*.png`,
   class folders named as the federation's classes) or a CSV manifest `path,label[,split]`.
   Without a split column, 60 % of the images train, 20 % validate and 20 % test (seeded): 40 % are
   never trained on.
2. `fedmedclip node check --config node.yaml` checks the kit, the data and the connection in seconds.
3. `./start.sh` runs the node; `state/` keeps its private model, `cache/` its image features.
   When a run ends the node archives its state (`state/archive/<run id>/`) and waits for the
   federation's next run (`--once true`: it exits instead); `http://127.0.0.1:9101/healthz` says
   what it does. `./stop.sh` stops it. `fedmedclip predict --config node.yaml --images DIR`
   classifies images.
4. `share_metrics:` in `node.yaml` sets which evaluations leave this hospital: `all`, `val_accuracy`
   or `none`; every evaluation stays in `state/evaluations.jsonl` whatever is shared.
5. Every accepted update comes back with the aggregator's signed receipt, kept in
   `state/receipts/<run id>/`. `fedmedclip audit verify <the aggregator's audit.log> --key
   aggregator_audit.pub --receipts state/receipts` checks the aggregator's log against them.
"""

_AGGREGATOR_README = """# FedMedCLIP startup kit: the aggregator

Issued on {date}. Keep this folder private: `key.pem` is the aggregator's identity.

| file | what it is |
|---|---|
| `aggregator.yaml` | settings: listen address `{listen}`, certificates, the allow-list ({n} nodes){pins} |
| `cert.pem`, `key.pem` | the aggregator's certificate (names: {hosts}) and private key (mode 0600) |
| `audit.key`, `audit.pub` | the key that signs the audit log and receipts (id `{audit_key_id}`), its public half |
| `ca.pem` | the federation's certificate authority, which signed every node's certificate |
| `start.sh`, `stop.sh` | start the aggregator in the foreground; stop it (SIGTERM) |

`./start.sh --rounds 30 --min-nodes 3` runs a federation; its checkpoint, globals, report and signed
audit log (`runs/audit.log`; `fedmedclip audit verify runs/audit.log --key audit.pub`) go to `runs/`.
A new run needs a new `--out-dir`.
"""


def _fingerprint(classes: list[str], cfg: ProvisionConfig) -> tuple[str, str]:
    """The pinned backbone fingerprint, and the image tower runtime it was made with (``auto`` resolved on a CPU:
    the nodes' kits name it, since features of two runtimes are never mixed)."""
    from shared.backbone import DEFAULT_TEMPLATES, BackboneSpec, load_backbone  # torch: only when pinning

    spec = BackboneSpec(
        kind=cfg.backbone,
        arch=cfg.arch,
        pretrained=cfg.pretrained,
        templates=tuple(cfg.templates) if cfg.templates else DEFAULT_TEMPLATES,
        runtime=cfg.runtime,
    )
    backbone = load_backbone(spec, "cpu")
    return backbone.fingerprint(classes), backbone.runtime


def _kit(folder: Path, config_name: str, command: str, lock: str, readme: str) -> None:
    for name, text in _SCRIPTS.items():
        _write(folder / name, text.format(config=config_name, command=command, lock=lock), 0o700)
    _write(folder / "README.md", readme, 0o644)


def provision(cfg: ProvisionConfig) -> dict[str, Path]:
    """Write (or extend) the kits in ``cfg.out`` and the CA in ``cfg.ca_dir``; returns each party's config."""
    nodes = list(cfg.nodes or ())
    bad = [n for n in nodes if not _NODE_ID.fullmatch(n) or n in ("ca", "aggregator")]
    if bad or not nodes or len(set(nodes)) != len(nodes):
        raise ConfigError(
            f"nodes: node ids must be distinct, 1-64 characters [A-Za-z0-9_.-], not 'ca' or "
            f"'aggregator': {bad or nodes}"
        )
    unknown = sorted(set(cfg.evaluators or ()) - set(nodes))
    if unknown:
        raise ConfigError(f"evaluators: {unknown} are not among the nodes {nodes}")
    classes = _classes(cfg)
    hosts = [h for h in cfg.aggregator_host if h] or ["localhost"]
    root = Path(cfg.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ca_dir = Path(cfg.ca_dir).resolve() if cfg.ca_dir else root.with_name(root.name + "-ca")
    if ca_dir == root or root in ca_dir.parents:
        raise ConfigError(f"ca_dir {ca_dir} lies inside the kits' folder {root}: keep the CA key apart")
    ca_cert, ca_key, _ = _load_or_make_ca(ca_dir)
    date = dt.date.today().isoformat()
    stamp = f"written by `fedmedclip provision` on {date}"
    listen = cfg.listen or f"127.0.0.1:{cfg.port}"
    configs: dict[str, Path] = {}
    agg = _party_dir(root, "aggregator")
    _issue_into(agg, ca_cert, ca_key, "aggregator", server=True, hosts=hosts)
    audit = _audit_key(agg)
    pins: dict = {}
    if classes:
        fingerprint, runtime = _fingerprint(classes, cfg)
        pins = {"class_names": classes, "backbone_fingerprint": fingerprint}
    configs["aggregator"] = agg / "aggregator.yaml"
    _write_config(
        configs["aggregator"],
        f"FedMedCLIP aggregator, {stamp}; key.pem is private (mode 0600)",
        {
            "listen": listen,
            "tls_ca": "ca.pem",
            "tls_cert": "cert.pem",
            "tls_key": "key.pem",
            "allowed_nodes": nodes,
            "audit_key": AUDIT_KEY,
            "out_dir": "runs",
            **pins,
        }
        | ({"secure_aggregation": True} if cfg.secure_aggregation else {}),
    )
    _kit(
        agg,
        "aggregator.yaml",
        "aggregator",
        "runs/aggregator.lock",
        _AGGREGATOR_README.format(
            date=date,
            listen=listen,
            n=len(nodes),
            hosts=", ".join(hosts),
            audit_key_id=audit.public.key_id,
            pins=f"; the class names {classes} and the backbone fingerprint" if pins else "",
        ),
    )
    for node in nodes:
        folder = _party_dir(root, node)
        _issue_into(folder, ca_cert, ca_key, node, server=False)
        _write(folder / "aggregator_audit.pub", audit.public.pem(), 0o644)
        configs[node] = folder / "node.yaml"
        values = {
            "node_id": node,
            "aggregator": f"{hosts[0]}:{cfg.port}",
            "tls_ca": "ca.pem",
            "tls_cert": "cert.pem",
            "tls_key": "key.pem",
            "audit_pub": "aggregator_audit.pub",
            "state_dir": "state",
            "cache_dir": "cache",
        }
        if node in (cfg.evaluators or ()):
            values["role"] = "evaluator"
        if cfg.secure_aggregation:
            values["secure_aggregation"] = True
        if classes:
            values["classes"] = classes
            values["runtime"] = runtime  # the runtime behind the pinned fingerprint
        _write_config(configs[node], f"FedMedCLIP node {node}, {stamp}; key.pem is private (mode 0600)", values)
        _kit(
            folder,
            "node.yaml",
            "node run",
            "state/node.lock",
            _NODE_README.format(
                node=node,
                date=date,
                aggregator=values["aggregator"],
                audit_key_id=audit.public.key_id,
                classes_line=f", the federation's classes {classes}" if classes else "",
            ),
        )
    return configs


def _classes(cfg: ProvisionConfig) -> list[str] | None:
    if cfg.classes and cfg.classes_file:
        raise ConfigError("give classes or classes_file, not both")
    if cfg.classes_file:
        path = Path(cfg.classes_file)
        if not path.is_file():
            raise ConfigError(f"classes_file {path} does not exist")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = list(cfg.classes or ())
    if cfg.classes_file and not names:
        raise ConfigError(f"classes_file {cfg.classes_file} names no class")
    if len(set(names)) != len(names):
        raise ConfigError(f"class names must be distinct: {names}")
    return names or None


@dataclass(frozen=True)
class ProvisionConfig:
    nodes: list[str] | None = None  # node ids, comma-separated (each becomes a certificate's CN); required
    out: str = "pki"  # the kits' folder, one sub-folder per party (reused: existing certificates are kept)
    aggregator_host: list[str] = field(default_factory=lambda: ["localhost"])  # its names/IPs: the first goes in kits
    port: int = DEFAULT_PORT  # the aggregator's gRPC port
    listen: str | None = None  # the aggregator's address (default 127.0.0.1:<port>; 0.0.0.0:<port>: the network)
    ca_dir: str | None = None  # the CA's folder (default: <out>-ca, beside the kits and never inside them)
    evaluators: list[str] | None = None  # nodes that only evaluate (held-out hospitals): role evaluator in their kit
    classes: list[str] | None = None  # the federation's classes: pinned with the fingerprint in every kit
    classes_file: str | None = None  # the class names, one a line (e.g. a partition's classes.txt)
    backbone: str = "effnet-lite0-minilm"  # the backbone the nodes run (for the pinned fingerprint)
    arch: str = "ViT-B-32"  # open_clip architecture (backbone: openclip)
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint (backbone: openclip)
    templates: list[str] | None = None  # prompt templates, as the nodes set them (default: the project's)
    runtime: str = "auto"  # image tower runtime of every node: auto (onnxruntime on a CPU), torch (GPU nodes too)
    secure_aggregation: bool = False  # every kit runs secure aggregation (docs/secure-aggregation.md)

    def __post_init__(self) -> None:
        if self.runtime != "auto":  # the default needs no check, and no torch (shared.backbone imports it)
            from shared.backbone import RUNTIMES

            if self.runtime not in RUNTIMES:
                raise ValueError(f"runtime must be one of {list(RUNTIMES)}")


def _run(cfg: ProvisionConfig, _args: argparse.Namespace) -> int:
    if not cfg.nodes:
        raise ConfigError("nodes: give the node ids, e.g. --nodes hospital_1,hospital_2")
    configs = provision(cfg)
    root = Path(cfg.out).resolve()
    ca_dir = Path(cfg.ca_dir).resolve() if cfg.ca_dir else root.with_name(root.name + "-ca")
    print(f"startup kits in {root}, one folder per party: hand each its own folder only")
    print(f"certificate authority in {ca_dir} (keep ca.key offline); allow-list {list(cfg.nodes)}")
    if not (cfg.classes or cfg.classes_file):
        print(
            "note: no class names given (--classes or --classes-file): the aggregator's kit pins no label space, "
            "so it starts only with trust_first_node: true (the first node to register sets it)"
        )
    for party, path in configs.items():
        print(f"  {party:>12}: {path.parent}/start.sh  (settings: {path.name})")
    return 0


COMMAND = Command(
    name="provision",
    help="make a federation's CA, certificates and configs",
    run=_run,
    config=ProvisionConfig,
    env_prefix="FEDMEDCLIP_PROVISION_",
    description=__doc__.split("\n\n")[0],
)


def main(argv: list[str] | None = None) -> int:
    return main_for(COMMAND, argv, "python -m aggregator provision")
