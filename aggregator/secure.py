"""The aggregator's side of secure aggregation: one session per round, its phases and deadlines.

The protocol and its cryptography are in :mod:`shared.secagg`; this module only collects what the
nodes send, decides when a phase closes, and hands each node what it may see. The engine
(:mod:`aggregator.engine`) holds one :class:`SecureRound` while a round is open and calls it under its
lock; nothing here talks to gRPC.

Phases and when they close (``t``: the threshold, fixed with the roster):

=========  ====================================================  =====================================
phase      closes when                                           or at its deadline, with at least
=========  ====================================================  =====================================
keys       every registered trainer has advertised                ``max(min_nodes, 2)`` advertisements
shares     every roster member has dealt                          ``t`` dealers
masked     every dealer has uploaded its masked input             ``t`` inputs
unmask     every survivor has returned its shares                 ``t`` answers
=========  ====================================================  =====================================

The keys phase's deadline is the round's (training happens before it); the others get
``secagg_phase_timeout_s`` each. A phase that misses its quorum, or an unmasking that names a node
for breaking the protocol (:class:`~shared.secagg.SecAggMisbehaviour`), ends the session: the round
starts a new one with new keys, without the named node. Nothing of an ended session is ever unmasked.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from aggregator.errors import EngineError
from shared.learning.aggregation import capped_weights
from shared.secagg import (
    Advertisement,
    DealtShares,
    RingLayout,
    Roster,
    SecAggError,
    SignedShare,
    UnmaskSession,
    average_error_bound,
    commit_message,
    threshold_for,
    verify_signature,
)
from shared.wire.reasons import Reason

log = logging.getLogger("fedmedclip.aggregator")

MAX_CIPHERTEXT_BYTES = 2048  # one holder's two signed shares, encrypted: about 800 bytes
MAX_CERT_BYTES = 8192


class SecPhase(IntEnum):
    """The wire's SecAggPhase (aggregator.service maps one to the other)."""

    KEYS = 1
    SHARES = 2
    MASKED = 3
    UNMASK = 4
    CLOSED = 5


@dataclass(frozen=True)
class SecureSettings:
    clip: float
    threshold: float
    phase_timeout_s: float
    min_nodes: int
    max_update_norm: float | None
    max_abs_value: float | None
    uniform: bool
    max_samples: int | None
    max_share: float | None


@dataclass
class SecureView:
    """The open session as one node may see it."""

    round_id: int
    session: str
    phase: SecPhase
    deadline: float  # when the phase closes if enough nodes are in (the engine's clock)
    roster: Roster | None = None
    members: tuple[str, ...] = ()
    inbox: dict[str, bytes] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    deadline_unix_ms: int = 0  # the same on the wall clock (the engine sets it)
    message: str = ""


def _refuse(message: str) -> EngineError:
    return EngineError(Reason.SECAGG, message)


class SecureRound:
    """One open round under secure aggregation: its current session and the nodes it excluded."""

    def __init__(
        self,
        round_id: int,
        settings: SecureSettings,
        ca: x509.Certificate,
        template: Mapping[str, torch.Tensor],
        counts: Callable[[], Mapping[str, int]],
        opened: float,
        round_deadline: float,
    ) -> None:
        self.round_id, self.settings, self.ca = round_id, settings, ca
        self.layout = RingLayout.of(template)
        self.counts = counts  # the registered trainers' training samples, read when the roster is fixed
        self.round_deadline = round_deadline
        self.excluded: dict[str, str] = {}  # node -> why (named for breaking the protocol this round)
        self.sessions_started = 0
        self.aborted: list[dict] = []  # the sessions this round ended without unmasking
        self._start(opened)

    # -- sessions ----------------------------------------------------------------------------------
    def _start(self, now: float) -> None:
        self.session = secrets.token_hex(8)
        self.sessions_started += 1
        self.phase = SecPhase.KEYS
        self.deadline = max(self.round_deadline, now + self.settings.phase_timeout_s)
        self.advertised: dict[str, Advertisement] = {}
        self.publics: dict[str, ec.EllipticCurvePublicKey] = {}  # each advertiser's certified key, checked once
        self.roster: Roster | None = None
        self.dealt: dict[str, DealtShares] = {}
        self.unmask: UnmaskSession | None = None
        self.answered: set[str] = set()

    def abort(self, now: float, why: str) -> dict:
        """End the session unopened and start another; the record of what ended, for the audit log."""
        record = {"session": self.session, "phase": self.phase.name.lower(), "why": why}
        self.aborted.append(record)
        log.warning(
            "round %d: secure-aggregation session %s ended in phase %s: %s",
            self.round_id + 1,
            self.session,
            self.phase.name.lower(),
            why,
        )
        self._start(now)
        return record

    def _check(self, session: str, phase: SecPhase, node: str) -> None:
        if node in self.excluded:
            raise EngineError(
                Reason.SECAGG_EXCLUDED, f"{node} is excluded from round {self.round_id + 1}: {self.excluded[node]}"
            )
        if session != self.session:
            raise EngineError(Reason.SECAGG_PHASE, f"session {session[:32]!r} is not the open one ({self.session})")
        if self.phase != phase:
            raise EngineError(
                Reason.SECAGG_PHASE,
                f"session {self.session} is in phase {self.phase.name.lower()}, not {phase.name.lower()}",
            )

    # -- what nodes send ---------------------------------------------------------------------------
    def advertise(self, node: str, session: str, adv: Advertisement) -> int:
        self._check(session, SecPhase.KEYS, node)
        if adv.node != node or len(adv.cert_pem) > MAX_CERT_BYTES:
            raise _refuse("an advertisement names another node, or its certificate is too large")
        old = self.advertised.get(node)
        if old is not None:
            if old == adv:
                return len(self.advertised)
            raise _refuse(f"{node} advertised other keys in this session already")
        try:
            self.publics[node] = adv.verify(self.session, self.ca)
        except SecAggError as exc:
            raise _refuse(str(exc)) from exc
        self.advertised[node] = adv
        return len(self.advertised)

    def share(self, node: str, session: str, dealt: DealtShares) -> int:
        self._check(session, SecPhase.SHARES, node)
        assert self.roster is not None
        if node not in self.roster.members:
            raise EngineError(Reason.SECAGG_PHASE, f"{node} is not in the roster of session {self.session}")
        old = self.dealt.get(node)
        if old is not None:
            if old == dealt:
                return len(self.dealt)
            raise _refuse(f"{node} dealt other shares in this session already")
        holders = set(self.roster.members) - {node}
        if set(dealt.ciphertexts) != holders:
            raise _refuse(f"{node} must deal exactly one ciphertext to each other roster member")
        if any(not 28 < len(c) <= MAX_CIPHERTEXT_BYTES for c in dealt.ciphertexts.values()):
            raise _refuse(f"a ciphertext of {node} is outside (28, {MAX_CIPHERTEXT_BYTES}] bytes")
        if len(dealt.b_commitment) != 64 or any(c not in "0123456789abcdef" for c in dealt.b_commitment):
            raise _refuse("the commitment is a lower-case hex SHA-256")
        public = self.publics[node]  # its certificate was checked when it advertised
        if not verify_signature(
            public, dealt.commitment_signature, commit_message(self.session, node, dealt.b_commitment)
        ):
            raise _refuse(f"{node}'s commitment signature does not verify")
        self.dealt[node] = dealt
        return len(self.dealt)

    def masked_input(self, node: str, session: str, payload: bytes) -> np.ndarray:
        """Check a masked input (the engine records it once it is accepted: :meth:`accept_masked`)."""
        self._check(session, SecPhase.MASKED, node)
        assert self.unmask is not None
        if node not in self.unmask.members:
            raise EngineError(Reason.SECAGG_PHASE, f"{node} dealt no shares in session {self.session}")
        if len(payload) != 4 * self.layout.length:
            raise _refuse(f"a masked input is {4 * self.layout.length} bytes, got {len(payload)}")
        return np.frombuffer(payload, dtype="<u4").astype(np.uint32)

    def accept_masked(self, node: str, vector: np.ndarray) -> int:
        assert self.unmask is not None
        self.unmask.add_masked(node, vector, self.layout.length)
        return len(self.unmask.masked)

    def unmask_shares(self, node: str, session: str, shares: list[SignedShare]) -> int:
        self._check(session, SecPhase.UNMASK, node)
        assert self.unmask is not None
        if node in self.answered:
            return len(self.answered)
        try:
            self.unmask.add_shares(node, shares)
        except SecAggError as exc:
            raise _refuse(str(exc)) from exc
        self.answered.add(node)
        return len(self.answered)

    # -- phases ------------------------------------------------------------------------------------
    def _close_keys(self) -> None:
        nodes = sorted(self.advertised)
        s = self.settings
        if s.uniform:
            raw = dict.fromkeys(nodes, 1.0)
        else:
            counts = self.counts()
            raw = capped_weights({n: counts[n] for n in nodes}, max_samples=s.max_samples, max_share=s.max_share)
        total = sum(raw.values())
        self.roster = Roster(
            dict(self.advertised),
            threshold_for(len(nodes), s.threshold),
            {n: raw[n] / total for n in nodes},
            s.clip,
        )
        self.phase = SecPhase.SHARES

    def _close_shares(self) -> None:
        assert self.roster is not None
        members = tuple(sorted(self.dealt))
        commitments = {n: (d.b_commitment, d.commitment_signature) for n, d in self.dealt.items()}
        self.unmask = UnmaskSession(self.session, self.roster, commitments, members)
        self.phase = SecPhase.MASKED

    def step(self, now: float, trainers: frozenset[str]) -> tuple[str, float]:
        """Advance the session: ``("wait", seconds)``, ``("sum", 0)`` when it can be unmasked, or
        ``("abort", 0)`` with :attr:`abort_reason` set when it missed a quorum."""
        s = self.settings
        self.abort_reason = ""
        expected_keys = trainers - set(self.excluded)
        if self.phase == SecPhase.KEYS:
            have = len(self.advertised)
            if have and expected_keys <= set(self.advertised):
                self._close_keys()
            elif now >= self.deadline:
                if have >= max(s.min_nodes, 2):
                    self._close_keys()
                else:
                    self.abort_reason = f"{have} key advertisements by the deadline, {max(s.min_nodes, 2)} needed"
                    return "abort", 0.0
            else:
                return "wait", self.deadline - now
            self.deadline = now + s.phase_timeout_s
        assert self.roster is not None
        t = self.roster.threshold
        for phase, have, expected, closer in (
            (SecPhase.SHARES, lambda: set(self.dealt), lambda: set(self.roster.members), self._close_shares),
            (SecPhase.MASKED, lambda: set(self.unmask.masked), lambda: set(self.unmask.members), self._close_masked),
        ):
            if self.phase != phase:
                continue
            got = have()
            if got == expected():
                closer()
            elif now >= self.deadline:
                if len(got) >= t:
                    closer()
                else:
                    self.abort_reason = f"{len(got)} nodes in phase {phase.name.lower()} by its deadline, threshold {t}"
                    return "abort", 0.0
            else:
                return "wait", self.deadline - now
            self.deadline = now + s.phase_timeout_s
        if self.phase == SecPhase.UNMASK:
            assert self.unmask is not None
            if self.answered == set(self.unmask.masked) or (now >= self.deadline and len(self.answered) >= t):
                return "sum", 0.0
            if now >= self.deadline:
                self.abort_reason = f"{len(self.answered)} unmasking answers by the deadline, threshold {t}"
                return "abort", 0.0
            return "wait", self.deadline - now
        return "wait", max(0.0, self.deadline - now)

    def _close_masked(self) -> None:
        self.phase = SecPhase.UNMASK

    def result(self, reference: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """The new global from the unmasked sum, and what the round log keeps of it. Raises
        :class:`~shared.secagg.SecAggMisbehaviour` naming a node (the caller excludes it and aborts)."""
        assert self.unmask is not None and self.roster is not None
        total = self.unmask.result(self.layout.length)
        survivors = sorted(self.unmask.masked)
        weights = {n: self.roster.weights[n] for n in survivors}
        info = {
            "session": self.session,
            "sessions": self.sessions_started,
            "threshold": self.roster.threshold,
            "roster": sorted(self.roster.members),
            "members": list(self.unmask.members),
            "survivors": survivors,
            "answered": sorted(self.answered),
            "scale": self.roster.scale,
            "error_bound": average_error_bound(
                self.roster.scale, len(self.roster.members), min(weights.values()), self.roster.clip
            ),
            "excluded": dict(self.excluded),
            "aborted": list(self.aborted),
        }
        return self.layout.decode(total, reference), info

    def view(self, node: str) -> SecureView:
        v = SecureView(self.round_id, self.session, self.phase, self.deadline, excluded=tuple(sorted(self.excluded)))
        if self.phase >= SecPhase.SHARES:
            v.roster = self.roster
        if self.phase >= SecPhase.MASKED and self.unmask is not None:
            v.members = self.unmask.members
            if node in self.unmask.members:
                v.inbox = {d: self.dealt[d].ciphertexts[node] for d in self.unmask.members if d != node}
        if self.phase >= SecPhase.UNMASK and self.unmask is not None:
            v.survivors = tuple(sorted(self.unmask.masked))
        if node in self.excluded:
            v.message = f"excluded from this round: {self.excluded[node]}"
        return v
