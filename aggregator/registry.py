"""Who is in the federation: the registration checks and the table of registered nodes.

A node is admitted when it shares the federation's backbone fingerprint, label space, embedding
width, method and seeded initial adapter; the configuration may pin fingerprint and label space,
otherwise the first node admitted pins them. A node id keeps its role for the whole run, and its
training sample count too: the count weighs its updates (:func:`shared.learning.aggregation.capped_weights`),
so a registration again with another count is refused (``sample_count_changed``) rather than let a
node re-weigh itself mid-run. Every string a node sends is bounded here before it is kept or logged.
Each node is a :class:`NodeRecord`; checkpoints and reports hold it as a plain dict
(:meth:`NodeRecord.to_dict`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from aggregator.errors import EngineError
from shared import __version__
from shared.ops.logs import printable
from shared.wire.reasons import Reason

log = logging.getLogger("fedmedclip.aggregator")

MAX_SAMPLES = 10**9  # a sample count beyond this is a lie (it would weigh the average), not a hospital
MAX_VERSION_CHARS = 64  # a node's software_version is kept (checkpoint, report) up to this length
MAX_FINGERPRINT_CHARS = 128  # a backbone fingerprint is a hex digest
MAX_CLASSES = 1000  # a label space of more names is not one
MAX_CLASS_NAME_CHARS = 200
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no space: fingerprint, method, digest


class Role(StrEnum):
    TRAINER = "trainer"  # trains, uploads updates, counts for the quorum
    EVALUATOR = "evaluator"  # a held-out hospital: evaluates every global, never trains


@dataclass(frozen=True)
class Registration:
    node_id: str
    role: Role | None  # None: a role this aggregator does not know
    fingerprint: str
    class_names: tuple[str, ...]
    embed_dim: int
    method: str
    initial_sha256: str
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    software_version: str = ""  # the node's FedMedCLIP version ("": not said)


@dataclass
class NodeRecord:
    role: Role
    num_train: int  # weighs the node's updates in the weighted average
    num_val: int = 0
    num_test: int = 0
    software_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"role": self.role.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeRecord:
        """A record as :meth:`to_dict` wrote it (``software_version`` is absent from older checkpoints)."""
        return cls(
            role=Role(data["role"]),
            num_train=int(data["num_train"]),
            num_val=int(data.get("num_val", 0)),
            num_test=int(data.get("num_test", 0)),
            software_version=str(data.get("software_version", "")),
        )


class Registry:
    """The registered nodes and what every node must share with the federation (not thread-safe: the engine locks)."""

    def __init__(
        self,
        *,
        method: str,
        embed_dim: int,
        initial_sha256: str,
        fingerprint: str | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.method, self.embed_dim, self.initial_sha256 = method, embed_dim, initial_sha256
        self.fingerprint = fingerprint
        self.class_names = class_names
        self.nodes: dict[str, NodeRecord] = {}

    def check(self, reg: Registration) -> bool:
        """Every check :meth:`admit` makes, recording nothing (EngineError when refused); True when known."""
        self._check(reg)
        known = self.nodes.get(reg.node_id)
        if known is not None and known.role != reg.role:
            raise EngineError(Reason.NODE_ID_TAKEN, f"node id {reg.node_id} is registered as a {known.role}")
        if known is not None and known.num_train != reg.num_train:
            log.warning(
                "node %s registered again with %d training samples, %d at its first registration: refused",
                reg.node_id,
                reg.num_train,
                known.num_train,
            )
            raise EngineError(
                Reason.SAMPLE_COUNT_CHANGED,
                f"node {reg.node_id} registered with {known.num_train} training samples; the count "
                f"weighs its updates and is fixed for the run (now {reg.num_train})",
            )
        return known is not None

    def admit(self, reg: Registration) -> bool:
        """Check ``reg`` and record the node (EngineError when refused); True when it was registered already."""
        known = self.check(reg)
        if self.fingerprint is None:
            self.fingerprint = reg.fingerprint
        if self.class_names is None:
            self.class_names = tuple(reg.class_names)
        version = reg.software_version[:MAX_VERSION_CHARS]
        if version and version != __version__:
            log.warning("node %s runs FedMedCLIP %r, this aggregator %s", reg.node_id, version, __version__)
        self.nodes[reg.node_id] = NodeRecord(
            role=reg.role, num_train=reg.num_train, num_val=reg.num_val, num_test=reg.num_test, software_version=version
        )
        return known

    def _check(self, reg: Registration) -> None:
        if not _NODE_ID.fullmatch(reg.node_id):
            raise EngineError(Reason.BAD_NODE_ID, "node_id must be 1-64 characters [A-Za-z0-9_.-]")
        if reg.role is None:
            raise EngineError(Reason.BAD_ROLE, "role must be trainer or evaluator")
        if not all(0 <= n <= MAX_SAMPLES for n in (reg.num_train, reg.num_val, reg.num_test)):
            raise EngineError(Reason.BAD_SAMPLE_COUNT, f"sample counts must be in [0, {MAX_SAMPLES}]")
        problems = []
        if not _TOKEN.fullmatch(reg.fingerprint) or len(reg.fingerprint) > MAX_FINGERPRINT_CHARS:
            problems.append(f"backbone fingerprint must be 1-{MAX_FINGERPRINT_CHARS} printable ASCII characters")
        elif self.fingerprint is not None and reg.fingerprint != self.fingerprint:
            problems.append(
                f"backbone fingerprint {reg.fingerprint[:16]}... differs from the federation's "
                f"{self.fingerprint[:16]}..."
            )
        if not (
            0 < len(reg.class_names) <= MAX_CLASSES
            and all(0 < len(c) <= MAX_CLASS_NAME_CHARS and c.isprintable() for c in reg.class_names)
        ):
            problems.append(
                f"label space must be 1-{MAX_CLASSES} names of 1-{MAX_CLASS_NAME_CHARS} printable characters"
            )
        elif self.class_names is not None and tuple(reg.class_names) != self.class_names:
            problems.append(
                f"label space {printable(list(reg.class_names), 300)} differs from the federation's "
                f"{printable(list(self.class_names), 300)}"
            )
        if not _TOKEN.fullmatch(reg.method) or not _TOKEN.fullmatch(reg.initial_sha256):
            problems.append("method and initial_state_sha256 must be 1-128 printable ASCII characters")
        if reg.embed_dim != self.embed_dim:
            problems.append(f"embedding width {reg.embed_dim} differs from the federation's {self.embed_dim}")
        if reg.method != self.method:
            problems.append(f"method {reg.method[:64]!r} differs from the federation's {self.method!r}")
        elif reg.initial_sha256 != self.initial_sha256:
            problems.append("initial adapter differs from the federation's (another seed?)")
        if reg.role == Role.TRAINER and reg.num_train <= 0:
            problems.append("a trainer needs at least one training sample")
        if problems:
            log.warning("refused node %s: %s", reg.node_id, printable("; ".join(problems), 1000))
            raise EngineError(Reason.REGISTRATION_MISMATCH, f"node {reg.node_id} refused: " + "; ".join(problems))

    def trainers(self) -> list[str]:
        return sorted(n for n, rec in self.nodes.items() if rec.role == Role.TRAINER)

    def count(self, role: Role) -> int:
        return sum(1 for rec in self.nodes.values() if rec.role == role)

    def other_versions(self) -> dict[str, str]:
        """Nodes that said they run another FedMedCLIP version than this aggregator: node -> version."""
        return {
            n: rec.software_version
            for n, rec in sorted(self.nodes.items())
            if rec.software_version and rec.software_version != __version__
        }
