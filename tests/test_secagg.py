"""Secure aggregation's core (shared/secagg.py): Shamir shares, the exact ring sum under dropouts, the
decoded average against a plain float64 one, masked inputs that look uniform, misbehaviour named, refusals.

Every party runs in this process; the protocol is driven by hand, phase by phase, as the services drive it
(``secure_average`` runs the same steps without dropouts).
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import replace

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from shared.learning.rounds import row_masks_of
from shared.learning.training import TrainConfig, build_adapter, get_method
from shared.secagg import (
    PRIME,
    NodeSession,
    RingLayout,
    Roster,
    SecAggError,
    SecAggMisbehaviour,
    UnmaskSession,
    average_error_bound,
    reconstruct,
    ring_scale,
    secure_average,
    split,
    threshold_for,
    throwaway_identities,
)

NODES5 = ("h1", "h2", "h3", "h4", "h5")
# chi-square critical value, 255 degrees of freedom (256 byte values), p = 1e-6: a uniform source passes the
# test below with probability 1 - 1e-6 (scipy.stats.chi2.isf(1e-6, 255) = 377.08; scipy is not a dependency)
CHI2_255_P1E6 = 377.08


@pytest.fixture(scope="module")
def ids():
    """One CA and a certificate per node, for the whole module."""
    return throwaway_identities([*NODES5, "stranger"])


# -- helpers ------------------------------------------------------------------------------------


def _lagrange(points: list[tuple[int, int]], at: int) -> int:
    """Our own interpolation over GF(PRIME), to check ``reconstruct`` against."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num, den = num * (at - xj) % PRIME, den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, PRIME - 2, PRIME)) % PRIME
    return total


def _parties(ids, nodes, session="sess", special=None) -> dict[str, NodeSession]:
    """A NodeSession per node (``special``: node -> another NodeSession class for it)."""
    ca, certs = ids
    special = special or {}
    return {n: special.get(n, NodeSession)(n, session, certs[n][0], certs[n][1], ca) for n in nodes}


def _roster(parties, weights=None, fraction=0.5, clip=1.0) -> Roster:
    nodes = sorted(parties)
    weights = weights or {n: 1.0 / len(nodes) for n in nodes}
    return Roster({n: parties[n].advertise() for n in nodes}, threshold_for(len(nodes), fraction), weights, clip)


class Round:
    """One session driven phase by phase; ``vectors`` maps a node to its ring input."""

    def __init__(self, ids, vectors: dict[str, np.ndarray], *, session="sess", parties=None, weights=None):
        self.nodes = sorted(vectors)
        self.vectors = vectors
        self.length = len(next(iter(vectors.values())))
        self.parties = parties or _parties(ids, self.nodes, session)
        self.roster = _roster(self.parties, weights)
        self.dealt = {n: self.parties[n].deal(self.roster) for n in self.nodes}
        for n in self.nodes:
            assert self.parties[n].receive({d: self.dealt[d].ciphertexts[n] for d in self.nodes if d != n}) == []
        self.unmask = UnmaskSession(
            session,
            self.roster,
            {n: (d.b_commitment, d.commitment_signature) for n, d in self.dealt.items()},
            tuple(self.nodes),
        )
        self.masked: dict[str, np.ndarray] = {}

    def send_masked(self, dropped_before=()) -> list[str]:
        """Phase 3: every node but ``dropped_before`` sends its masked input; the survivors (U3)."""
        for n in self.nodes:
            if n not in dropped_before:
                self.masked[n] = self.parties[n].mask(self.vectors[n], self.nodes)
                self.unmask.add_masked(n, self.masked[n], self.length)
        return [n for n in self.nodes if n not in dropped_before]

    def answer(self, survivors, answering) -> None:
        for n in answering:
            self.unmask.add_shares(n, self.parties[n].unmask(survivors))

    def run(self, dropped_before=(), dropped_after=()) -> np.ndarray:
        survivors = self.send_masked(dropped_before)
        self.answer(survivors, [n for n in survivors if n not in dropped_after])
        return self.unmask.result(self.length)

    def expected(self, dropped_before=()) -> np.ndarray:
        total = np.zeros(self.length, dtype=np.uint64)
        for n in self.nodes:
            if n not in dropped_before:
                total += self.vectors[n].astype(np.uint64)
        return (total % (1 << 32)).astype(np.uint32)


def _random_vectors(nodes, length, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 1 << 32, size=length, dtype=np.uint64).astype(np.uint32) for n in nodes}


def _adapter_states(n: int, dim: int = 32, seed: int = 0):
    """A reference adapter (the global) and ``n`` trained-looking ones: small moves, thresholds that switch
    about a third of each layer's rows off (different rows per node), so ``row_masks_of`` drops rows."""
    ref = build_adapter(get_method("fedmedclip"), dim, TrainConfig(), seed).travel_state()
    gen = torch.Generator().manual_seed(seed + 1)
    states = []
    for _ in range(n):
        s = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in ref.items()}
        for prefix in ("fc1", "fc2"):
            scores = s[f"{prefix}.weight"].abs().mean(dim=1)
            s[f"{prefix}.threshold"] = torch.full_like(scores, float(scores.quantile(0.33)))
        states.append(s)
    return ref, states


def _encode_all(layout, states, ref, weights, clip=1.0, n=None):
    scale = ring_scale(clip, n or len(states))
    return [layout.encode(s, ref, row_masks_of(s), w, clip, scale)[0] for s, w in zip(states, weights, strict=True)]


# -- Shamir -------------------------------------------------------------------------------------


def test_any_t_of_n_shares_rebuild_the_secret():
    secret = secrets.randbits(256)
    for n, t in ((5, 3), (4, 2), (6, 6)):
        shares = split(secret, range(1, n + 1), t)
        assert set(shares) == set(range(1, n + 1)) and all(0 <= y < PRIME for y in shares.values())
        for k in range(t, n + 1):
            for xs in itertools.combinations(shares, k):
                assert reconstruct({x: shares[x] for x in xs}, t) == secret, (n, t, xs)
    assert reconstruct(split(0, range(1, 4), 2), 2) == 0
    with pytest.raises(SecAggError):
        split(PRIME, range(1, 4), 2)  # a secret outside the field


def test_t_minus_one_shares_leave_the_secret_open():
    secret, t = secrets.randbits(256), 3
    shares = split(secret, range(1, 6), t)
    known = [(1, shares[1]), (2, shares[2])]  # t - 1 shares
    # any third point gives a value; a wrong one another secret than the dealt one
    assert reconstruct({**dict(known), 3: (shares[3] + 1) % PRIME}, t) != secret
    # and every candidate secret is as consistent with the t - 1 shares as the true one: for each, a third
    # point exists (on the polynomial through the known shares and (0, candidate)) that rebuilds it
    for candidate in (0, 1, secret, secrets.randbits(256)):
        y3 = _lagrange([(0, candidate), *known], 3)
        assert reconstruct({**dict(known), 3: y3}, t) == candidate
    with pytest.raises(SecAggError):
        reconstruct(dict(known), t)  # fewer than t: refused, not guessed


def test_inconsistent_points_rebuild_nothing():
    secret, t = secrets.randbits(256), 3
    shares = split(secret, range(1, 6), t)
    for bad in shares:  # any one point off the polynomial, with more than t points
        points = dict(shares)
        points[bad] = (points[bad] + 1) % PRIME
        assert reconstruct(points, t) is None, bad
    points = {x: shares[x] for x in (1, 2, 3)}
    points[4] = split(secret, [4], t)[4]  # a point of another polynomial with the same secret
    assert reconstruct(points, t) is None


# -- the ring sum is exact ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "dropped_before", "dropped_after"),
    [
        (NODES5[:3], (), ()),
        (NODES5, (), ()),
        (NODES5, ("h3",), ()),  # dealt shares (U2), sent no masked input: its s key is rebuilt
        (NODES5, (), ("h2",)),  # masked input counted (U3), never answers the unmasking
        (NODES5, ("h5",), ("h1",)),  # both: 4 inputs, 3 answers = the threshold
        (NODES5, (), ("h1", "h4")),  # 3 answers = the threshold
    ],
)
def test_unmasked_sum_equals_the_plain_ring_sum(ids, nodes, dropped_before, dropped_after):
    rnd = Round(ids, _random_vectors(nodes, 1000, seed=len(dropped_before) + 3 * len(dropped_after)))
    assert rnd.roster.threshold == threshold_for(len(nodes), 0.5)
    got = rnd.run(dropped_before, dropped_after)
    assert got.dtype == np.uint32 and np.array_equal(got, rnd.expected(dropped_before))
    for n, vector in rnd.masked.items():  # nothing of an input shows in its masked vector
        assert np.mean(vector == rnd.vectors[n]) < 0.01


@pytest.mark.parametrize(("dropped_before", "dropped_after"), [((), ()), (("h2",), ()), ((), ("h4",))])
def test_unmasked_sum_of_encoded_adapters_is_exact(ids, dropped_before, dropped_after):
    ref, states = _adapter_states(5)
    layout = RingLayout.of(ref)
    weights = [0.3, 0.25, 0.2, 0.15, 0.1]
    vectors = dict(zip(NODES5, _encode_all(layout, states, ref, weights), strict=True))
    assert all(v.shape == (layout.length,) and v.dtype == np.uint32 for v in vectors.values())
    rnd = Round(ids, vectors, weights=dict(zip(NODES5, weights, strict=True)))
    got = rnd.run(dropped_before, dropped_after)
    assert np.array_equal(got, rnd.expected(dropped_before))


# -- the decoded average against a plain one ----------------------------------------------------


def _plain_average(states, presents, ref, weights, clip):
    """The float64 weighted average of the clipped differences, per row over the nodes that sent it (rows
    nobody sent keep the reference)."""
    out = {}
    for name, r in ref.items():
        r64 = r.double().reshape(r.shape[0] if r.dim() else 1, -1)
        num = torch.zeros_like(r64)
        den = torch.zeros(r64.shape[0], dtype=torch.float64)
        for s, p, w in zip(states, presents, weights, strict=True):
            sent = p.get(name, torch.ones(r64.shape[0], dtype=torch.bool)).reshape(-1).double()
            diff = (s[name].double().reshape(r64.shape) - r64).clamp(-clip, clip)
            num += w * sent.unsqueeze(1) * diff
            den += w * sent
        mean = r64.clone()
        has = den > 0
        mean[has] += num[has] / den[has].unsqueeze(1)
        out[name] = mean.reshape(r.shape)
    return out


def test_secure_average_matches_the_plain_weighted_average_within_its_bound(ids):
    ref, states = _adapter_states(4, seed=1)
    states[2]["fc2.bias"][:3] += 5.0  # three values beyond the clip: cut to +clip on both sides
    nodes = NODES5[:4]
    weights = {"h1": 120.0, "h2": 80.0, "h3": 40.0, "h4": 10.0}  # sample units, as capped_weights gives
    presents = [row_masks_of(s) for s in states]
    dead_row = 5  # a row of fc1 no node sends: it keeps the reference's value
    for p in presents:
        p["fc1.weight"][dead_row] = p["fc1.bias"][dead_row] = False
    presents[2]["fc2.weight"][:3] = presents[2]["fc2.bias"][:3] = True  # the clipped values are sent
    clip = 1.0
    state, measured = secure_average(
        {n: (s, p) for n, s, p in zip(nodes, states, presents, strict=True)}, ref, weights, clip=clip, identities=ids
    )
    total = sum(weights.values())
    normalised = [weights[n] / total for n in nodes]
    expected = _plain_average(states, presents, ref, normalised, clip)
    # The bound (average_error_bound): each of the n rounded terms of a row's value sum and of its weight sum is
    # off by at most 1/2, so value/weight = (A s + E) / (W s + F) is off from A/W by at most
    # n/2 (1 + |A/W|) / (W s - n/2) with |A/W| <= clip and W >= the smallest normalised weight.
    assert measured.error_bound == average_error_bound(ring_scale(clip, 4), 4, min(normalised), clip)
    assert 0 < measured.error_bound < 1e-7  # about 2 (1 + clip) / (0.04 * 2^31): far below float32 resolution
    assert measured.scale == ring_scale(clip, 4) and measured.threshold == threshold_for(4, 0.5) == 3
    assert measured.clipped_values == 3
    assert measured.masked_bytes_per_node == 4 * RingLayout.of(ref).length
    assert set(state) == set(ref)
    for name, exp in expected.items():
        got = state[name]
        assert got.dtype == torch.float32 and got.shape == ref[name].shape
        # plus the float32 rounding of the result: half an ulp, below 1e-7 of its magnitude
        err = (got.double() - exp).abs()
        assert bool((err <= measured.error_bound + 1e-7 * exp.abs()).all()), (name, float(err.max()))
    assert torch.equal(state["fc1.weight"][dead_row], ref["fc1.weight"][dead_row])
    assert torch.equal(state["fc1.bias"][dead_row], ref["fc1.bias"][dead_row])
    assert float(state["fc2.bias"][:3].sub(ref["fc2.bias"][:3]).max()) <= clip  # the clip bounds the move


# -- masked inputs look uniform -----------------------------------------------------------------


def _chi2_bytes(vector: np.ndarray) -> float:
    counts = np.bincount(np.frombuffer(vector.astype("<u4").tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_inputs_look_uniform_and_uncorrelated_with_the_inputs(ids):
    ref, states = _adapter_states(3, dim=64, seed=2)
    layout = RingLayout.of(ref)
    real = _encode_all(layout, states, ref, [0.5, 0.3, 0.2])
    vectors = {"h1": np.zeros(layout.length, dtype=np.uint32), "h2": real[1], "h3": real[2]}
    rnd = Round(ids, vectors, weights={"h1": 0.5, "h2": 0.3, "h3": 0.2})
    rnd.send_masked()
    assert _chi2_bytes(real[1]) > 10 * CHI2_255_P1E6  # the test can tell: an encoded update is far from uniform
    n_bits = 32 * layout.length
    for node in ("h1", "h2"):
        masked, plain = rnd.masked[node], vectors[node]
        assert _chi2_bytes(masked) < CHI2_255_P1E6, node
        top = np.bincount((masked >> 24).astype(np.int64), minlength=256)  # the top 8 bits alone too
        expected = top.sum() / 256
        assert float(((top - expected) ** 2 / expected).sum()) < CHI2_255_P1E6, node
        # bit by bit, the masked vector agrees with its input half of the time (5 sigma: 2.5 / sqrt(bits))
        agree = np.unpackbits((~(masked ^ plain)).view(np.uint8)).mean()
        assert abs(agree - 0.5) < 2.5 / np.sqrt(n_bits), (node, agree)
    # values: no linear trace of the real input in its masked vector (5 sigma of a correlation: 5 / sqrt(len))
    for signed in (True, False):
        x = real[1].view(np.int32) if signed else real[1]
        r = np.corrcoef(x.astype(np.float64), rnd.masked["h2"].astype(np.float64))[0, 1]
        assert abs(r) < 5 / np.sqrt(layout.length), (signed, r)
    r = np.corrcoef(rnd.masked["h1"].astype(np.float64), rnd.masked["h2"].astype(np.float64))[0, 1]
    assert abs(r) < 5 / np.sqrt(layout.length)
    # and the masks still cancel: the sum is the inputs'
    rnd.answer(rnd.nodes, rnd.nodes)
    assert np.array_equal(rnd.unmask.result(rnd.length), rnd.expected())


# -- misbehaviour is named ----------------------------------------------------------------------


def _skewed_dealer(victim: str, kind: str):
    """A NodeSession that deals ``victim`` a ``kind`` share off its polynomial, signed like every other share:
    the inconsistency is the dealer's own."""

    class SkewedDealer(NodeSession):
        def _split(self, secret, xs, t):
            shares = super()._split(secret, xs, t)
            if (secret == self._b) == (kind == "b"):  # deal() splits b and the s key
                x = self.roster_of_deal.x_of(victim)
                shares[x] = (shares[x] + 1) % PRIME
            return shares

        def deal(self, roster):
            self.roster_of_deal = roster
            return super().deal(roster)

    return SkewedDealer


@pytest.mark.parametrize("answering", [NODES5, ("h1", "h2", "h5")])  # all, and exactly t holding the bad share
def test_a_dealer_of_inconsistent_b_shares_is_named(ids, answering):
    parties = _parties(ids, NODES5, special={"h3": _skewed_dealer("h2", "b")})
    rnd = Round(ids, _random_vectors(NODES5, 100), parties=parties)
    survivors = rnd.send_masked()
    rnd.answer(survivors, answering)
    with pytest.raises(SecAggMisbehaviour) as info:
        rnd.unmask.result(rnd.length)
    assert info.value.node == "h3" and "commitment" in info.value.what


def test_a_bad_share_nobody_returns_harms_nobody(ids):
    parties = _parties(ids, NODES5, special={"h3": _skewed_dealer("h2", "b")})
    rnd = Round(ids, _random_vectors(NODES5, 100), parties=parties)
    assert np.array_equal(rnd.run(dropped_after=("h2",)), rnd.expected())  # h2 never answers


def test_a_dealer_of_inconsistent_s_shares_is_named(ids):
    parties = _parties(ids, NODES5, special={"h4": _skewed_dealer("h1", "s")})
    rnd = Round(ids, _random_vectors(NODES5, 100), parties=parties)
    survivors = rnd.send_masked(dropped_before=("h4",))  # its s key must be rebuilt
    rnd.answer(survivors, survivors)
    with pytest.raises(SecAggMisbehaviour) as info:
        rnd.unmask.result(rnd.length)
    assert info.value.node == "h4" and "public key" in info.value.what


@pytest.mark.parametrize("answering", [NODES5, ("h2", "h3", "h4")])
def test_a_holder_returning_a_changed_share_is_named(ids, answering):
    rnd = Round(ids, _random_vectors(NODES5, 100))
    survivors = rnd.send_masked()
    for n in answering:
        shares = rnd.parties[n].unmask(survivors)
        if n == "h3":  # changes the y of its share of h1's b: the signature no longer matches
            shares = [replace(s, y=(s.y + 1) % PRIME) if s.dealer == "h1" else s for s in shares]
        rnd.unmask.add_shares(n, shares)
    with pytest.raises(SecAggMisbehaviour) as info:
        rnd.unmask.result(rnd.length)
    assert info.value.node == "h3" and "did not sign" in info.value.what


# -- refusals -----------------------------------------------------------------------------------


def test_a_roster_with_a_tampered_advertisement_is_refused(ids):
    parties = _parties(ids, NODES5[:3])
    roster = _roster(parties)
    adv = roster.members["h2"]
    sig = bytearray(adv.signature)
    sig[-1] ^= 1
    for forged in (replace(adv, signature=bytes(sig)), replace(adv, s_public=parties["h3"].advertise().s_public)):
        bad = replace(roster, members={**roster.members, "h2": forged})
        with pytest.raises(SecAggError, match="signature"):
            parties["h1"].deal(bad)
    assert parties["h1"].roster is None  # nothing was dealt
    parties["h1"].deal(roster)  # the untouched roster is fine
    with pytest.raises(SecAggError, match="already"):
        parties["h1"].deal(roster)


def test_a_certificate_of_another_ca_is_refused(ids):
    other_ca, other = throwaway_identities(["h2"])
    parties = _parties(ids, NODES5[:3])
    impostor = NodeSession("h2", "sess", other["h2"][0], other["h2"][1], other_ca)  # valid under its own CA
    roster = _roster(parties)
    bad = replace(roster, members={**roster.members, "h2": impostor.advertise()})
    with pytest.raises(SecAggError, match="CA"):
        parties["h1"].deal(bad)
    # a certificate of ours, but for another node
    h3_as_h2 = replace(roster.members["h3"], node="h2")
    with pytest.raises(SecAggError, match="names another node|signature"):
        parties["h1"].deal(replace(roster, members={**roster.members, "h2": h3_as_h2}))


def test_a_roster_with_other_keys_for_this_node_is_refused(ids):
    parties = _parties(ids, NODES5[:3])
    twin = _parties(ids, ["h1"])["h1"]  # the same certificate, its own fresh keys: a valid advertisement
    roster = _roster(parties)
    with pytest.raises(SecAggError, match="other keys"):
        parties["h1"].deal(replace(roster, members={**roster.members, "h1": twin.advertise()}))


def test_a_validly_signed_low_order_key_is_refused_and_its_node_named(ids):
    """X25519 agrees the all-zero secret with a low-order point: a certified node advertising one is refused when
    the roster is checked (a SecAggError naming it), not by a bare ValueError in the middle of dealing."""
    parties = _parties(ids, NODES5[:3])
    roster = _roster(parties)
    signer = ids[1]["h3"][0]
    for field in ("c_public", "s_public"):
        unsigned = replace(roster.members["h3"], **{field: bytes(32)}, signature=b"")
        signed = replace(unsigned, signature=signer.sign(unsigned.message("sess"), ec.ECDSA(hashes.SHA256())))
        with pytest.raises(SecAggError, match="h3: its . key is a low-order point"):
            parties["h1"].deal(replace(roster, members={**roster.members, "h3": signed}))


def test_a_roster_out_of_range_is_refused(ids):
    parties = _parties(ids, NODES5[:3])
    roster = _roster(parties)
    for bad, what in (
        (replace(roster, threshold=1), "threshold"),
        (replace(roster, threshold=4), "threshold"),
        (replace(roster, weights={"h1": 0.5, "h2": 0.5, "h3": 0.5}), "weights"),
        (replace(roster, weights={"h1": 0.0, "h2": 0.5, "h3": 0.5}), "weights"),
        (replace(roster, members={k: v for k, v in roster.members.items() if k != "h1"}), "not in"),
    ):
        with pytest.raises(SecAggError, match=what):
            parties["h1"].deal(bad)


def test_unmasking_is_refused_out_of_protocol(ids):
    rnd = Round(ids, _random_vectors(NODES5, 50))
    with pytest.raises(SecAggError, match="no masked input"):
        rnd.parties["h1"].unmask(NODES5)  # before masking
    survivors = rnd.send_masked()
    h1 = rnd.parties["h1"]
    with pytest.raises(SecAggError, match="survivors"):
        h1.unmask(["h1", "h2"])  # fewer than t = 3
    with pytest.raises(SecAggError, match="members of the masking set"):
        h1.unmask([*survivors, "stranger"])  # not a subset of U2
    with pytest.raises(SecAggError, match="members of the masking set"):
        h1.unmask(["h2", "h3", "h4"])  # without this node
    h1.unmask(survivors)
    with pytest.raises(SecAggError, match="already"):
        h1.unmask(survivors)  # twice
    with pytest.raises(SecAggError, match="threshold"):
        rnd.parties["h2"].mask(rnd.vectors["h2"], ["h1", "h2"])  # a masking set below t
    with pytest.raises(SecAggError, match="threshold is 3"):
        rnd.unmask.result(rnd.length)  # no answer yet


def test_the_aggregator_refuses_shares_it_did_not_ask_for(ids):
    rnd = Round(ids, _random_vectors(NODES5, 50))
    survivors = rnd.send_masked(dropped_before=("h5",))
    shares = rnd.parties["h1"].unmask(survivors)
    s_of_h5 = next(s for s in shares if s.dealer == "h5")
    assert s_of_h5.kind == "s" and {s.kind for s in shares if s.dealer != "h5"} == {"b"}
    with pytest.raises(SecAggError, match="not asked for"):
        rnd.unmask.add_shares("h1", [*shares, replace(s_of_h5, kind="b")])  # both kinds of h5
    with pytest.raises(SecAggError, match="other kind"):
        rnd.unmask.add_shares("h1", [replace(s, kind="b") if s.dealer == "h5" else s for s in shares])
    b_of_h2 = next(s for s in shares if s.dealer == "h2")
    with pytest.raises(SecAggError, match="other kind"):
        rnd.unmask.add_shares("h1", [replace(b_of_h2, kind="s")])  # an s share of a survivor
    with pytest.raises(SecAggError, match="another point"):
        rnd.unmask.add_shares("h1", [replace(b_of_h2, x=2)])
    with pytest.raises(SecAggError, match="not a survivor"):
        rnd.unmask.add_shares("h5", [])
    assert rnd.unmask.returned == {}  # nothing refused was kept
    rnd.unmask.add_shares("h1", shares)


def test_masked_inputs_of_the_wrong_form_are_refused(ids):
    rnd = Round(ids, _random_vectors(NODES5[:3], 50))
    good = rnd.parties["h1"].mask(rnd.vectors["h1"], rnd.nodes)
    for bad in (good[:-1], np.concatenate([good, good[:1]]), good.astype(np.int64), good.astype(np.float32)):
        with pytest.raises(SecAggError, match="ring elements"):
            rnd.unmask.add_masked("h1", bad, rnd.length)
    with pytest.raises(SecAggError, match="dealt no shares"):
        rnd.unmask.add_masked("stranger", good, rnd.length)
    assert rnd.unmask.masked == {}


def test_encode_refuses_a_bad_weight_or_a_non_finite_update():
    ref, states = _adapter_states(1, dim=8)
    layout = RingLayout.of(ref)
    scale = ring_scale(1.0, 2)
    for weight in (-0.1, 1.5, float("nan")):
        with pytest.raises(SecAggError, match="weight"):
            layout.encode(states[0], ref, {}, weight, 1.0, scale)
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = {k: v.clone() for k, v in states[0].items()}
        bad["fc2.weight"][3, 4] = value
        with pytest.raises(SecAggError, match="not finite"):
            layout.encode(bad, ref, {}, 0.5, 1.0, scale)
    for clip, n in ((0.0, 3), (-1.0, 3), (1.0, 0), (float("nan"), 3), (2.0**31, 3)):
        with pytest.raises(SecAggError):
            ring_scale(clip, n)  # the last: a scale of 0 would encode every value and weight as 0
    assert ring_scale(2.0**30, 3) == 1
    # where a row's rounded weights may sum to 0, no error bound holds
    assert average_error_bound(1, 4, 1.0, 1.0) == float("inf") and average_error_bound(2**20, 4, 0.1, 1.0) < 1e-4


# -- the scale never lets the sum wrap ----------------------------------------------------------


@pytest.mark.parametrize("clip", [0.25, 1.0, 3.0, 1000.0])
@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_n_nodes_at_the_clip_decode_to_the_clip(clip, n):
    ref = {"w": torch.zeros(6, 3), "t": torch.zeros(6)}
    layout = RingLayout.of(ref)
    scale = ring_scale(clip, n)
    rng = np.random.default_rng(n)
    for weights in (np.full(n, 1.0 / n), rng.dirichlet(np.ones(n)), rng.dirichlet(np.full(n, 0.1))):
        weights = np.minimum(weights, 1.0)
        for sign in (1.0, -1.0):
            update = {k: torch.full_like(v, sign * 2 * clip) for k, v in ref.items()}  # beyond the clip
            vectors = [layout.encode(update, ref, {}, float(w), clip, scale)[0] for w in weights]
            ring = np.zeros(layout.length, dtype=np.uint32)
            exact = np.zeros(layout.length, dtype=np.int64)
            for v in vectors:
                ring += v
                exact += v.view(np.int32).astype(np.int64)  # every term is small enough to read as int32
            assert np.abs(exact).max() < 2**31 - 1  # the true integer sum fits the signed ring: no wrap
            assert np.array_equal(ring.view(np.int32).astype(np.int64), exact)
            decoded = layout.decode(ring, ref)
            # every node sent every row: the row's weight is the weights' sum
            bound = average_error_bound(scale, n, float(weights.sum()), clip) + 1e-7 * clip
            for name, t in decoded.items():
                assert float((t.double() - sign * clip).abs().max()) <= bound, (name, clip, n)


def test_a_node_keeps_the_survivors_it_answered_for_on_disk(tmp_path):
    """The re-session guard survives a node restart: what a node answered is on disk before its answer leaves,
    read back for the same run only; a damaged file stops the node rather than drop the guard."""
    from hospital_node.secure import Answered

    path = tmp_path / "secagg_answered.json"
    first = Answered(path, "run-a")
    assert first.get(3) is None
    first.record(3, frozenset({"h1", "h2", "h3"}))
    assert Answered(path, "run-a").get(3) == frozenset({"h1", "h2", "h3"})  # a restarted node reads it back
    assert Answered(path, "run-b").get(3) is None  # another run starts with no answers
    path.write_text('{"run_id": "run-a", "rounds": [1, 2')
    with pytest.raises(SecAggError, match="cannot be read"):
        Answered(path, "run-a")
    assert Answered(None, "run-a").get(3) is None  # in memory only (light nodes)
