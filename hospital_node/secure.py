"""The node's side of secure aggregation: one trained update through one session's four phases.

The cryptography is :class:`shared.secagg.NodeSession`; this module carries its messages over the
aggregator's SecAgg* RPCs and follows the session the aggregator has open. When the aggregator ends
a session (a phase missed its quorum, a node was named, the aggregator restarted) the node joins the
next one with new keys and the same update; a session already past its keys phase is waited out.
Before the update is encoded it is bounded here, at the node, by the federation's update bounds
(the aggregator cannot check a masked input) and clipped to the session's clip.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from shared.learning.rounds import bound_update, row_masks_of
from shared.ops.atomic import atomic_write
from shared.ops.logs import printable
from shared.secagg import NodeSession, RingLayout, Roster, SecAggError, load_signer
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.protocol import roster_from_proto, share_to_proto
from shared.wire.reasons import Action, Reason, reason_of
from shared.wire.tls import TlsMaterial

log = logging.getLogger("fedmedclip.node")

KEYS, SHARES, MASKED, UNMASK, CLOSED = (
    pb.SEC_AGG_PHASE_KEYS,
    pb.SEC_AGG_PHASE_SHARES,
    pb.SEC_AGG_PHASE_MASKED,
    pb.SEC_AGG_PHASE_UNMASK,
    pb.SEC_AGG_PHASE_CLOSED,
)


class Answered:
    """Round -> the survivors of the session whose unmasking this node answered. A later session of the same
    round is answered only for those survivors less the nodes the aggregator excluded: two unmasked sums over
    different sets, subtracted, would give away the inputs of the nodes in one and not the other. With a
    ``path`` it is kept on disk (written before the answer leaves), so a restarted node keeps the guard."""

    def __init__(self, path: Path | None, run_id: str) -> None:
        self.path, self.run_id = path, run_id
        self._rounds: dict[int, frozenset[str]] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("run_id") == run_id:
                    self._rounds = {int(r): frozenset(nodes) for r, nodes in data["rounds"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # a damaged guard file must not silently drop the guard: refuse to go on without it
                raise SecAggError(f"{path} cannot be read ({exc}); remove it only if no round was answered") from exc

    def get(self, round_id: int) -> frozenset[str] | None:
        return self._rounds.get(round_id)

    def record(self, round_id: int, survivors: frozenset[str]) -> None:
        self._rounds[round_id] = survivors
        if self.path is not None:
            data = {"run_id": self.run_id, "rounds": {str(r): sorted(n) for r, n in sorted(self._rounds.items())}}
            atomic_write(self.path, json.dumps(data).encode())


@dataclass(frozen=True)
class SecureLink:
    """What a session needs of the node it runs for: who it is, its stub and certificate, how it calls
    (``call(what, fn)``: the node's retries and refusal handling) and how long it waits."""

    node: str
    run_id: str
    session_id: str
    stub: Any
    tls: TlsMaterial
    call: Callable[[str, Callable[[], Any]], Any]
    long_poll_s: float = 30.0
    rpc_timeout_s: float = 30.0
    #: the survivors of the sessions whose unmasking this node answered, by round (:class:`Answered`)
    answered: Answered = field(default_factory=lambda: Answered(None, ""))


#: ``encode(roster, state)``: the node's input in the ring for this session (its weight is in the roster)
#: and how many values the clip cut
Encoder = Callable[[Roster, pb.SecAggState], tuple[np.ndarray, int]]
#: ``upload(masked, session)``: send the masked input (an UploadUpdate, codec "secagg") with the node's retries;
#: False, or a refusal whose action is RESYNC: not taken (the session or round moved on)
Uploader = Callable[[np.ndarray, str], bool | None]


def adapter_encoder(node: str, trained, reference, drop_masked_rows: bool) -> Encoder:
    """The encoder of a trained adapter: bounded at the node by the federation's update bounds (the
    aggregator cannot check a masked input), rows its mask switched off left out, clipped, weighted."""

    def encode(roster: Roster, st: pb.SecAggState) -> tuple[np.ndarray, int]:
        update = bound_update(
            trained, reference, max_update_norm=st.max_update_norm or None, max_abs_value=st.max_abs_value or None
        )
        present = row_masks_of(update) if drop_masked_rows else {}
        layout = RingLayout.of(reference)
        return layout.encode(update, reference, present, roster.weights[node], roster.clip, roster.scale)

    return encode


class Excluded(Exception):
    """The aggregator excluded this node from the round (it named it for breaking the protocol)."""


class SecureUploader:
    """Runs the sessions of one round for one node's input (:meth:`run`). Tests and benchmarks make
    nodes that misbehave or drop out by overriding :meth:`new_session` or :meth:`unmask`."""

    def __init__(self, link: SecureLink, round_id: int, encode: Encoder, upload: Uploader) -> None:
        self.link, self.round_id, self.encode, self.upload = link, round_id, encode, upload
        self.node = link.node
        self.signer = load_signer(link.tls.key)

    # -- calls ---------------------------------------------------------------------------------
    def _poll(self, session: str, phase: int, wait: bool) -> pb.SecAggState:
        link = self.link
        wait_s = link.long_poll_s if wait else 0.0
        request = pb.SecAggPollRequest(
            run_id=link.run_id,
            node_id=self.node,
            session=session,
            wait_for_phase=phase,
            max_wait_ms=int(wait_s * 1000),
            session_id=link.session_id,
        )
        return link.call("SecAggPoll", lambda: link.stub.SecAggPoll(request, timeout=wait_s + link.rpc_timeout_s).state)

    def _await(self, session: str, phase: int) -> pb.SecAggState:
        """Long-poll until ``session`` reaches ``phase``, or ends, or the round moves on."""
        while True:
            st = self._poll(session, phase, wait=True)
            if st.session != session or st.round_id != self.round_id or st.phase >= phase:
                return st

    def _taken(self, what: str, send: Callable[[], object]) -> bool:
        """Run ``send`` (one message to the aggregator); False when it was not taken because the aggregator has
        moved on (``send`` said so, or a refusal whose action is RESYNC: another session or round)."""
        try:
            result = send()
        except grpc.RpcError as exc:
            reason = reason_of(exc)
            if reason is Reason.SECAGG_EXCLUDED:
                raise Excluded(printable(exc.details())) from exc
            if reason is None or reason.action is not Action.RESYNC:
                raise
            log.warning("round %d: %s not taken (%s): %s", self.round_id + 1, what, reason, printable(exc.details()))
            return False
        return result is not False

    def _send(self, what: str, rpc, request) -> bool:
        """Send one message through the node's retries (:meth:`_taken`)."""
        return self._taken(what, lambda: self.link.call(what, lambda: rpc(request, timeout=self.link.rpc_timeout_s)))

    # -- hooks -----------------------------------------------------------------------------------
    def new_session(self, session: str) -> NodeSession:
        return NodeSession(self.node, session, self.signer, self.link.tls.cert, self.link.tls.ca)

    def unmask(self, ns: NodeSession, survivors: list[str]):
        return ns.unmask(survivors)

    # -- the round ------------------------------------------------------------------------------
    def run(self) -> bool:
        """Take part in the round's sessions until the round closes: True when it closed with a session this
        node answered the unmasking of (its input is in the sum), False when it moved on without it."""
        while True:
            st = self._poll("", KEYS, wait=False)
            if st.round_id != self.round_id or st.phase == CLOSED:
                log.warning("round %d: closed before this node's masked input", self.round_id + 1)
                return False
            if st.phase != KEYS:  # a session under way without this node: wait for its end
                log.info("round %d: session %s is past its keys; waiting for the next", self.round_id + 1, st.session)
                self._await(st.session, CLOSED)
                continue
            try:
                outcome = self._session(st.session)
            except Excluded as exc:  # named for breaking the protocol: out of this round, back in the next
                log.error("round %d: excluded by the aggregator: %s", self.round_id + 1, exc)
                while st.round_id == self.round_id and st.phase != CLOSED:
                    st = self._await(st.session, CLOSED)
                return False
            except SecAggError as exc:
                # what the aggregator sent does not hold (a roster naming a node twice, a masking set outside the
                # roster or below the threshold, weights that are not a share of one): this node takes no part in
                # the session, keeps its update, and joins the next one
                log.error("round %d: session %s: %s; not taking part in it", self.round_id + 1, st.session, exc)
                self._await(st.session, CLOSED)
                continue
            if outcome is not None:
                return outcome

    def _session(self, session: str) -> bool | None:
        """One session; None when it ended without this node's input unmasked (the caller goes on)."""
        link, r = self.link, self.round_id
        ids = {"run_id": link.run_id, "node_id": self.node, "round_id": r, "session": session}
        ns = self.new_session(session)
        adv = ns.advertise()
        request = pb.SecAggAdvertiseRequest(
            **ids, c_public=adv.c_public, s_public=adv.s_public, certificate_pem=adv.cert_pem, signature=adv.signature
        )
        if not self._send("SecAggAdvertise", link.stub.SecAggAdvertise, request):
            return None
        st = self._await(session, SHARES)
        if st.session != session or st.round_id != r:
            return None
        roster = roster_from_proto(st)
        if self.node not in roster.members:
            return None
        dealt = ns.deal(roster)  # a roster that does not hold: SecAggError (run takes it)
        request = pb.SecAggShareRequest(
            **ids,
            ciphertexts=dealt.ciphertexts,
            b_commitment=dealt.b_commitment,
            commitment_signature=dealt.commitment_signature,
        )
        if not self._send("SecAggShare", link.stub.SecAggShare, request):
            return None
        st = self._await(session, MASKED)
        if st.session != session or st.round_id != r or self.node not in st.members:
            return None
        bad = ns.receive(dict(st.inbox))
        if bad:
            log.error("round %d: the shares of %s do not open or are not theirs", r + 1, ", ".join(sorted(bad)))
        vector, clipped = self.encode(roster, st)
        if clipped:
            log.warning("round %d: %d values of the update were clipped to +-%g", r + 1, clipped, roster.clip)
        masked = ns.mask(vector, list(st.members))
        if not self._taken("UploadUpdate", lambda: self.upload(masked, session)):
            return None
        st = self._await(session, UNMASK)
        if st.session != session or st.round_id != r:
            return None
        survivors = frozenset(st.survivors)
        before = link.answered.get(r)
        if before is not None and survivors != before - set(st.excluded):
            log.error(
                "round %d: session %s asks to unmask the sum of %s; this node answered the round for %s before, and "
                "the two sums would give away the difference: not answering",
                r + 1,
                session,
                sorted(survivors),
                sorted(before),
            )
            return None
        shares = self.unmask(ns, list(st.survivors))  # fewer survivors than t, or a set not masked with: SecAggError
        link.answered.record(r, survivors)  # on disk before the answer leaves
        request = pb.SecAggUnmaskRequest(**ids, shares=[share_to_proto(s) for s in shares])
        if not self._send("SecAggUnmask", link.stub.SecAggUnmask, request):
            return None
        st = self._await(session, CLOSED)  # the round closes with this session, or it ends and another begins
        if st.round_id == r and st.phase != CLOSED:
            log.warning("round %d: session %s ended before the round closed; joining the next", r + 1, session)
            return None
        log.info(
            "round %d: secure aggregation: session %s, %d of %d roster members masked, %d survived, threshold %d",
            r + 1,
            session,
            len(st.members),
            len(roster.members),
            len(st.survivors),
            roster.threshold,
        )
        return True
