"""One-shot set-up of the compose testbed: every party's certificates and every hospital's own data.

``deploy/compose.yaml`` runs this as its ``setup`` service before anything else starts (it is
idempotent: a second ``docker compose up`` finds the volumes ready and does nothing)::

    python -m deploy.testbed_setup --data /source --volumes /setup [--hospitals 3 --alpha 0.5 --per-class N]

1. ``fedmedclip partition`` (the very command ``make demo`` runs) splits the pooled set into the
   trainers and the held-out hospital, in a scratch folder.
2. Each hospital gets a copy of *its own* images only, in its own data volume
   (``<volumes>/<node>/data``, seen by the node as ``--node-data-dir``): ``images/<class>/...``,
   ``<node>.csv`` (paths as the node sees them), ``classes.txt`` and ``<node>.yaml``. No node can
   read another hospital's images.
3. ``fedmedclip provision`` makes the federation's CA and one certificate per party; each
   party's folder (``ca.pem``, ``cert.pem``, ``key.pem`` mode 0600, its YAML) goes into that party's
   TLS volume (``<volumes>/<party>/tls``; its config names its files relative to itself). The CA key is never
   written to a volume: it dies with this container, so nothing can issue new identities later.
4. Everything is handed to the services' user (``--owner``, the image's uid 10001).

Nothing secret is committed anywhere: keys are made here, at set-up, inside the volumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from deploy.local_federation import REPO_ROOT, node_names, partition_command, provision_command, resolve

log = logging.getLogger("fedmedclip.testbed")
MARKER = ".testbed.json"


def _settings(args: argparse.Namespace) -> dict:
    return {
        "hospitals": args.hospitals,
        "alpha": args.alpha,
        "seed": args.seed,
        "per_class": args.per_class or None,
        "holdout": not args.no_holdout,
        "node_data_dir": args.node_data_dir,
        "aggregator_host": args.aggregator_host,
    }


def _ready(volumes: Path, nodes: list[str], settings: dict) -> bool:
    for node in nodes:
        try:
            if json.loads((volumes / node / "data" / MARKER).read_text()) != settings:
                return False
        except (OSError, ValueError):
            return False
    return True


def _clear(folder: Path) -> None:
    """Empty a volume's mount point (the mount point itself stays)."""
    folder.mkdir(parents=True, exist_ok=True)
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def materialise_node(partition_dir: Path, node: str, target: Path, node_data_dir: str) -> int:
    """Copy ``node``'s images into ``target`` and write its manifest and config as the node will see them."""
    _clear(target)
    rows = []
    with (partition_dir / f"{node}.csv").open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            src = Path(row["path"])
            rel = Path("images") / row["label"] / f"{i:06d}-{src.name}"
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target / rel)
            rows.append({"path": f"{node_data_dir}/{rel.as_posix()}", "label": row["label"], "split": row["split"]})
    with (target / f"{node}.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    shutil.copyfile(partition_dir / "classes.txt", target / "classes.txt")
    config = yaml.safe_load((partition_dir / f"{node}.yaml").read_text(encoding="utf-8"))
    config["data"] = f"{node_data_dir}/{node}.csv"
    (target / f"{node}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return len(rows)


def provision_certificates(volumes: Path, nodes: list[str], *, aggregator_host: str, classes_file: Path) -> None:
    """The CA and every party's startup kit (the command ``make demo`` runs), one TLS volume per party.

    A kit's config names its files relative to itself, so it works wherever its volume is mounted.
    """
    with tempfile.TemporaryDirectory(prefix="pki-") as scratch:
        kits = Path(scratch) / "kits"
        cmd = provision_command(
            str(kits),
            nodes,
            aggregator_hosts=aggregator_host,
            classes_file=str(classes_file),
            ca_dir=str(Path(scratch) / "ca"),
        )
        subprocess.run(resolve(cmd), cwd=REPO_ROOT, check=True)
        for party in ["aggregator", *nodes]:
            target = volumes / party / "tls"
            _clear(target)
            for item in (kits / party).iterdir():
                shutil.copy2(item, target / item.name)  # keeps key.pem at mode 0600
    # the scratch folder, and with it ca/ca.key, is gone: no one can issue a new identity from here


def _chown(path: Path, owner: str | None) -> None:
    if not owner or os.geteuid() != 0:
        return
    uid, gid = (int(x) for x in owner.split(":"))
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
    os.chown(path, uid, gid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.testbed_setup", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the pooled ImageFolder to split among the hospitals")
    p.add_argument(
        "--volumes", required=True, help="where the parties' volumes are mounted: <volumes>/<party>/{data,tls}"
    )
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew; 0 or less = iid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=0, help="stratified subset of N images per class (0: all)")
    p.add_argument("--no-holdout", action="store_true")
    p.add_argument("--node-data-dir", default="/srv/fedmedclip/partition", help="the data volume, as a node sees it")
    p.add_argument("--aggregator-host", default="aggregator", help="the aggregator's host name (certificate SAN)")
    p.add_argument("--owner", default="10001:10001", help="uid:gid the volumes are handed to (when run as root)")
    p.add_argument("--force", action="store_true", help="set up again even when the volumes are ready")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    volumes = Path(args.volumes)
    nodes = node_names(args.hospitals, not args.no_holdout)
    settings = _settings(args)
    if not args.force and _ready(volumes, nodes, settings):
        log.info("volumes already set up for %s: nothing to do (--force to redo)", nodes)
        return 0
    with tempfile.TemporaryDirectory(prefix="partition-") as scratch:
        cmd = partition_command(
            scratch,
            hospitals=args.hospitals,
            seed=args.seed,
            alpha=args.alpha if args.alpha > 0 else None,
            per_class=args.per_class or None,
            holdout=not args.no_holdout,
            data=str(Path(args.data).resolve()),
        )
        subprocess.run(resolve(cmd), cwd=REPO_ROOT, check=True)
        for node in nodes:
            n = materialise_node(Path(scratch), node, volumes / node / "data", args.node_data_dir)
            log.info("%s: %d images in its own data volume", node, n)
        provision_certificates(
            volumes, nodes, aggregator_host=args.aggregator_host, classes_file=Path(scratch) / "classes.txt"
        )
    for node in nodes:  # the marker last: an interrupted set-up is redone
        (volumes / node / "data" / MARKER).write_text(json.dumps(settings), encoding="utf-8")
    for party in ["aggregator", *nodes]:
        for kind in ("data", "tls"):
            if (volumes / party / kind).exists():
                _chown(volumes / party / kind, args.owner)
    log.info("testbed ready: %d nodes, each with its own data and mTLS certificate", len(nodes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
