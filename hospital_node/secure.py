"""The node's side of secure aggregation: one trained update through one session's four phases.

The cryptography is :class:`shared.secagg.NodeSession`; this module carries its messages over the
aggregator's SecAgg* RPCs and follows the session the aggregator has open. When the aggregator ends
a session (a phase missed its quorum, a node was named, the aggregator restarted) the node joins the
next one with new keys and the same update; a session already past its keys phase is waited out.
Before the update is encoded it is bounded here, at the node, by the federation's update bounds
(the aggregator cannot check a masked input) and clipped to the session's clip.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import grpc
import numpy as np

from shared.learning.rounds import bound_update, row_masks_of
from shared.ops.logs import printable
from shared.secagg import NodeSession, RingLayout, SecAggError, load_signer
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.protocol import roster_from_proto, share_to_proto
from shared.wire.reasons import Action, reason_of
from shared.wire.transport import sha256_hex

if TYPE_CHECKING:
    from hospital_node.client import NodeClient
    from hospital_node.state import PendingUpdate

log = logging.getLogger("fedmedclip.node")

KEYS, SHARES, MASKED, UNMASK, CLOSED = (
    pb.SEC_AGG_PHASE_KEYS,
    pb.SEC_AGG_PHASE_SHARES,
    pb.SEC_AGG_PHASE_MASKED,
    pb.SEC_AGG_PHASE_UNMASK,
    pb.SEC_AGG_PHASE_CLOSED,
)


class SecureUploader:
    """Runs the sessions of one round for one trained update (:meth:`run`)."""

    def __init__(self, client: NodeClient, pending: PendingUpdate) -> None:
        if client.tls is None:
            raise SecAggError("secure aggregation needs the node's certificate and key (mTLS)")
        self.c, self.pending, self.round_id = client, pending, pending.round_id
        self.node = client.cfg.node_id
        self.signer = load_signer(client.tls.key)
        self.trained = {k: v.detach().clone() for k, v in client.learner.adapter_state().items()}

    # -- calls ---------------------------------------------------------------------------------
    def _poll(self, session: str, phase: int, wait: bool) -> pb.SecAggState:
        c = self.c
        wait_s = c.cfg.long_poll_s if wait else 0.0
        request = pb.SecAggPollRequest(
            run_id=c.run_id,
            node_id=self.node,
            session=session,
            wait_for_phase=int(phase),
            max_wait_ms=int(wait_s * 1000),
            session_id=c.session_id,
        )
        return c._call("SecAggPoll", lambda: c.stub.SecAggPoll(request, timeout=wait_s + c.cfg.rpc_timeout_s))

    def _await(self, session: str, phase: int) -> pb.SecAggState:
        """Long-poll until ``session`` reaches ``phase``, or ends, or the round moves on."""
        while True:
            st = self._poll(session, phase, wait=True)
            if st.session != session or st.round_id != self.round_id or st.phase >= phase:
                return st

    def _send(self, what: str, rpc, request) -> bool:
        """Send one message; False when the aggregator has moved on (another session or round)."""
        try:
            self.c._call(what, lambda: rpc(request, timeout=self.c.cfg.rpc_timeout_s))
        except grpc.RpcError as exc:
            reason = reason_of(exc)
            if reason is None or reason.action is not Action.RESYNC:
                raise
            log.warning("round %d: %s not taken (%s): %s", self.round_id + 1, what, reason, printable(exc.details()))
            return False
        return True

    # -- the round ------------------------------------------------------------------------------
    def run(self) -> bool:
        """Take part in the round's sessions until one unmasks with this node's input (True), or the round
        moves on without it (False)."""
        while True:
            st = self._poll("", KEYS, wait=False)
            if st.round_id != self.round_id or st.phase == CLOSED:
                log.warning("round %d: closed before this node's masked input", self.round_id + 1)
                return False
            if st.phase != KEYS:  # a session under way without this node: wait for its end
                log.info("round %d: session %s is past its keys; waiting for the next", self.round_id + 1, st.session)
                self._await(st.session, CLOSED)
                continue
            outcome = self._session(st.session)
            if outcome is not None:
                return outcome

    def _session(self, session: str) -> bool | None:
        """One session; None when it ended without this node's input unmasked (the caller goes on)."""
        c, r = self.c, self.round_id
        ns = NodeSession(self.node, session, self.signer, c.tls.cert, c.tls.ca)
        adv = ns.advertise()
        request = pb.SecAggAdvertiseRequest(
            run_id=c.run_id,
            node_id=self.node,
            round_id=r,
            session=session,
            c_public=adv.c_public,
            s_public=adv.s_public,
            certificate_pem=adv.cert_pem,
            signature=adv.signature,
        )
        if not self._send("SecAggAdvertise", c.stub.SecAggAdvertise, request):
            return None
        st = self._await(session, SHARES)
        if st.session != session or st.round_id != r:
            return None
        roster = roster_from_proto(st)
        if self.node not in roster.members:
            return None
        try:
            dealt = ns.deal(roster)
        except SecAggError as exc:  # a roster that does not hold: this node takes no part in the session
            log.error("round %d: session %s: the roster does not hold (%s); not taking part", r + 1, session, exc)
            self._await(session, CLOSED)
            return None
        request = pb.SecAggShareRequest(
            run_id=c.run_id,
            node_id=self.node,
            round_id=r,
            session=session,
            ciphertexts=dealt.ciphertexts,
            b_commitment=dealt.b_commitment,
            commitment_signature=dealt.commitment_signature,
        )
        if not self._send("SecAggShare", c.stub.SecAggShare, request):
            return None
        st = self._await(session, MASKED)
        if st.session != session or st.round_id != r or self.node not in st.members:
            return None
        bad = ns.receive(dict(st.inbox))
        if bad:
            log.error("round %d: the shares of %s do not open or are not theirs", r + 1, ", ".join(sorted(bad)))
        masked, clipped = self._masked_input(ns, roster, st)
        if clipped:
            log.warning("round %d: %d values of the update were clipped to +-%g", r + 1, clipped, roster.clip)
        if not self._upload(masked, session):
            return None
        st = self._await(session, UNMASK)
        if st.session != session or st.round_id != r:
            return None
        try:
            shares = ns.unmask(list(st.survivors))
        except SecAggError as exc:
            log.error("round %d: session %s: not unmasking (%s)", r + 1, session, exc)
            return None
        request = pb.SecAggUnmaskRequest(
            run_id=c.run_id, node_id=self.node, round_id=r, session=session, shares=[share_to_proto(s) for s in shares]
        )
        if not self._send("SecAggUnmask", c.stub.SecAggUnmask, request):
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

    def _masked_input(self, ns: NodeSession, roster, st: pb.SecAggState) -> tuple[np.ndarray, int]:
        reference = self.c.state.global_state
        update = bound_update(
            self.trained, reference, max_update_norm=st.max_update_norm or None, max_abs_value=st.max_abs_value or None
        )
        present = row_masks_of(update) if self.c.wire.drop_masked_rows else {}
        layout = RingLayout.of(reference)
        weight = roster.weights[self.node]
        vector, clipped = layout.encode(update, reference, present, weight, roster.clip, roster.scale)
        return ns.mask(vector, list(st.members)), clipped

    def _upload(self, masked: np.ndarray, session: str) -> bool:
        data = masked.astype("<u4").tobytes()
        pending = replace(
            self.pending,
            update_id=f"{self.pending.update_id}-{session}",
            payload=data,
            sha256=sha256_hex(data),
            codec="secagg",
        )
        return self.c._upload(pending, secagg_session=session)
