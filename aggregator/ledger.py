"""The replay ledger: every accepted update by round and node, with its update id and SHA-256.

A retry of an accepted update (same node, same update id, same bytes) gets the same answer and is
never counted twice; other bytes under an accepted id are refused (``conflicting_replay``). "Same
bytes" means the SHA-256 of the bytes that arrived, computed by the engine before it asks the
ledger (:meth:`Ledger.replay`), never the hash a node claims: an accepted id with its original hash
and other bytes is refused (``checksum_mismatch``) before the ledger is consulted. The
closed rounds are part of the checkpoint, as ``{round: {node: {"update_id", "sha256"}}}``
(:meth:`Ledger.to_dict`), so a retry after an aggregator restart is still recognised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from aggregator.errors import EngineError
from shared.wire.reasons import Reason


@dataclass(frozen=True)
class Accepted:
    update_id: str
    sha256: str


class Ledger:
    """Accepted updates of the closed rounds and of the open one (not thread-safe: the engine locks)."""

    def __init__(self, closed: Mapping[str, Mapping[str, Mapping[str, str]]] | None = None) -> None:
        self.closed: dict[int, dict[str, Accepted]] = {
            int(r): {node: Accepted(**entry) for node, entry in by_node.items()}
            for r, by_node in (closed or {}).items()
        }
        self.open: dict[str, Accepted] = {}  # the open round: node -> its accepted update

    def replay(self, node_id: str, update_id: str, payload_sha256: str, open_round: int) -> tuple[int, int] | None:
        """(round, updates in that round) when ``update_id`` of ``node_id`` was accepted already, else None.

        ``payload_sha256``: the SHA-256 the caller computed over the bytes it received (never a claimed one).
        """
        for round_id, by_node in [*self.closed.items(), (open_round, self.open)]:
            entry = by_node.get(node_id)
            if entry is not None and entry.update_id == update_id:
                if entry.sha256 != payload_sha256:
                    raise EngineError(Reason.CONFLICTING_REPLAY, f"update {update_id} was accepted with other content")
                return round_id, len(by_node)
        return None

    def accept(self, node_id: str, update_id: str, payload_sha256: str) -> None:
        """Record an accepted update by the SHA-256 of its bytes (as computed by the caller)."""
        self.open[node_id] = Accepted(update_id, payload_sha256)

    def discard_open(self) -> None:
        """Forget the open round's updates (secure aggregation: an ended session's masked inputs can never be
        unmasked, so they are not the round's; their nodes send again in the next session, under new ids)."""
        self.open = {}

    def close(self, round_id: int) -> None:
        """The open round's updates become round ``round_id``'s; the next round starts empty."""
        self.closed[round_id] = self.open
        self.open = {}

    def accepted_in(self, node_id: str, round_id: int) -> bool:
        """Whether ``node_id`` has an accepted update in the open round or in closed round ``round_id``."""
        return node_id in self.open or node_id in self.closed.get(round_id, {})

    def to_dict(self) -> dict[str, dict[str, dict[str, str]]]:
        return {str(r): {node: asdict(entry) for node, entry in by_node.items()} for r, by_node in self.closed.items()}
