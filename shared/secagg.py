"""Secure aggregation: the aggregator learns the sum of the hospitals' adapters, never one hospital's.

The protocol follows SecAgg (Bonawitz et al., CCS 2017), for an honest-but-curious aggregator, with
signatures on what the nodes exchange so that the aggregator can neither substitute keys nor blame
an honest node. One *session* runs per round (a round that has to be redone runs a new session with
new keys). Every party holds the session id; ``U1 ⊇ U2 ⊇ U3`` are the nodes left after each phase.

1. **keys**: each node makes two X25519 key pairs, ``c`` (to encrypt shares) and ``s`` (to agree
   pairwise masks), and sends the public halves signed with its certificate's key. The aggregator
   closes the phase with ``U1`` and sends every node the roster: each member's certificate, keys
   and signature, the threshold ``t`` and each member's weight. A node checks every certificate
   against the federation's CA and every signature before it uses a key.
2. **shares**: each node draws a self-mask seed ``b``, splits ``b`` and its ``s`` private key with
   Shamir's scheme (``t`` of ``|U1|``), and sends each other member its two shares, each signed and
   then encrypted (AES-GCM) under a key only the two of them can agree (``c``). It also sends a
   signed commitment (SHA-256) to ``b``. The aggregator relays the ciphertexts it cannot read: ``U2``.
3. **masked input**: each node of ``U2`` encodes its weighted update in the ring ``Z/2^32``
   (:class:`RingLayout`) and adds ``PRG(b)`` and, for every other member ``v`` of ``U2``, ``±PRG(s_uv)``
   (``+`` when its id sorts first), where ``s_uv`` comes from ``X25519(s_u, s_v)``. The pairwise masks
   cancel in the sum. What the aggregator receives is uniform in the ring: ``U3``.
4. **unmasking**: each node of ``U3`` checks ``|U3| >= t`` and returns, for every survivor, its share
   of the survivor's ``b``, and for every node of ``U2`` that dropped, its share of the dropped node's
   ``s`` key: never both for one node. With ``t`` shares of each, the aggregator rebuilds the secrets
   it needs, removes the masks, and keeps the sum of the weighted updates alone.

A dealer who hands out shares that do not lie on one polynomial, or that rebuild another ``b`` than
it committed to (or an ``s`` key that does not match its public key), is named: its shares carry its
signature, so the inconsistency is its own. A node that returns a share its dealer did not sign is
named too. Signatures are checked lazily: only when the shares do not rebuild a consistent secret.

Fixed point: every node encodes ``w_u * clip(x_u - g, ±clip)`` with the round's one scale
``scale = floor((2^31 - 1 - n) / max(clip, 1))``, so the sum of at most ``n`` weighted terms (weights
normalised to sum to at most 1 over ``U1``) never wraps. Rows the node's mask switched off are sent
as zeros and their row weight as zero, so a row is averaged over the nodes that sent it, as the
plain rule does. :func:`average_error_bound` is the largest error of the result against the exact
weighted average of the clipped updates.

Nothing here talks to a network: the services carry the messages, and the in-process simulation
calls :func:`secure_average` to run the same steps with every hospital in one process.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np
import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from shared.errors import FedMedCLIPError
from shared.wire.reasons import Reason

__all__ = [
    "PRIME",
    "RING_BITS",
    "Advertisement",
    "DealtShares",
    "NodeSession",
    "RingLayout",
    "Roster",
    "SecAggError",
    "SecAggMisbehaviour",
    "SecureRound",
    "SignedShare",
    "UnmaskSession",
    "SECURE_RULES",
    "average_error_bound",
    "check_settings",
    "certified_key",
    "commit_message",
    "commitment",
    "load_signer",
    "prg",
    "reconstruct",
    "ring_scale",
    "secure_average",
    "split",
    "threshold_for",
    "throwaway_identities",
    "verify_signature",
]

RING_BITS = 32
_RING_MASK = (1 << RING_BITS) - 1
PRIME = (1 << 521) - 1  # a Mersenne prime: the field of the Shamir shares (secrets are 256-bit)
_DOMAIN = b"fedmedclip-secagg-v1\0"


class SecAggError(FedMedCLIPError):
    """A secure-aggregation message that does not hold: a bad signature, certificate, size, phase."""

    reason = Reason.SECAGG


class SecAggMisbehaviour(SecAggError):
    """A named node broke the protocol (inconsistent shares, a share its dealer did not sign)."""

    reason = Reason.SECAGG

    def __init__(self, node: str, what: str) -> None:
        super().__init__(f"node {node} {what}")
        self.node = node
        self.what = what


# -- small primitives ---------------------------------------------------------------------------


def _canonical(kind: str, fields: Mapping[str, object]) -> bytes:
    return _DOMAIN + kind.encode() + b"\0" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=_DOMAIN + info).derive(secret)


def _x25519_public(raw: bytes, what: str) -> X25519PublicKey:
    if not isinstance(raw, bytes | bytearray) or len(raw) != 32:
        raise SecAggError(f"{what}: an X25519 public key is 32 bytes")
    return X25519PublicKey.from_public_bytes(bytes(raw))


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` ring elements (uint32) expanded from a 32-byte seed with ChaCha20 (zero nonce: each
    seed is used for one expansion only)."""
    if len(seed) != 32:
        raise SecAggError("a PRG seed is 32 bytes")
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * length)), dtype="<u4").astype(np.uint32, copy=False)


def _pair_seed(own: X25519PrivateKey, peer_public: bytes, session: str, a: str, b: str) -> bytes:
    first, second = sorted((a, b))
    shared = own.exchange(_x25519_public(peer_public, "pairwise key"))
    return _hkdf(shared, f"mask|{session}|{first}|{second}".encode())


def _self_seed(b: int, session: str, node: str) -> bytes:
    return _hkdf(b.to_bytes(32, "big"), f"self|{session}|{node}".encode())


def commitment(b: int, session: str, node: str) -> str:
    return hashlib.sha256(f"{session}|{node}|".encode() + b.to_bytes(32, "big")).hexdigest()


# -- Shamir over GF(PRIME) ----------------------------------------------------------------------


def split(secret: int, xs: Iterable[int], t: int, rng: secrets.SystemRandom | None = None) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` by a random polynomial of degree ``t - 1`` (``f(0) = secret``)."""
    rng = rng or secrets.SystemRandom()
    if not 0 <= secret < PRIME:
        raise SecAggError("a secret must lie in the share field")
    coeffs = [secret] + [rng.randrange(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out[x] = y
    return out


@lru_cache(maxsize=256)
def _weights_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange weights that give ``f(0)`` from ``f`` at ``xs``: the same for every secret of a round whose
    shares come from the same holders, so computed once for them."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


@lru_cache(maxsize=256)
def _parity_check(xs: tuple[int, ...], t: int) -> tuple[int, ...]:
    """A random word of the dual code: the values ``y`` at ``xs`` of any polynomial of degree below ``t`` have
    ``sum(c_j y_j) = 0``, and any other ``y`` has it with probability ``1/PRIME``. The dual of the code of such
    evaluations is the code ``c_j = h(x_j) / prod_{k != j} (x_j - x_k)`` over polynomials ``h`` of degree below
    ``len(xs) - t``; ``h`` is drawn at random (the dealers cannot know it). One check per secret then costs
    ``len(xs)`` multiplications instead of a Lagrange evaluation per extra share."""
    rng = secrets.SystemRandom()
    h = [rng.randrange(PRIME) for _ in range(len(xs) - t)]
    out = []
    for j, xj in enumerate(xs):
        v = 1
        for k, xk in enumerate(xs):
            if k != j:
                v = v * (xj - xk) % PRIME
        hx = 0
        for c in reversed(h):
            hx = (hx * xj + c) % PRIME
        out.append(hx * pow(v, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: Mapping[int, int], t: int) -> int | None:
    """The secret ``f(0)`` when every share lies on one polynomial of degree ``t - 1``, None when they
    do not (fewer than ``t`` shares: :class:`SecAggError`). The check is a random parity check of the
    dual code (:func:`_parity_check`); it misses inconsistent shares with probability ``1/PRIME``."""
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} shares, {t} needed")
    points = sorted(shares.items())
    xs = tuple(x for x, _ in points)
    if len(points) > t and sum(c * y for c, (_, y) in zip(_parity_check(xs, t), points, strict=True)) % PRIME:
        return None
    base = points[:t]
    weights = _weights_at_zero(xs[:t])
    return sum(w * y for w, (_, y) in zip(weights, base, strict=True)) % PRIME


def threshold_for(n: int, fraction: float) -> int:
    """``t`` for a roster of ``n``: more than ``fraction`` of it, at least 2 (never above ``n``)."""
    return min(n, max(2, math.floor(fraction * n) + 1))


# -- fixed-point ring encoding -------------------------------------------------------------------


#: The rules secure aggregation can compute: it reveals a weighted sum, never the updates a median needs.
SECURE_RULES = ("weighted", "uniform")


def check_settings(aggregation: str, clip: float, threshold: float) -> None:
    """Refuse (ValueError) settings secure aggregation cannot run with: the aggregator's and the simulation's."""
    if aggregation not in SECURE_RULES:
        raise ValueError(
            f"secure aggregation hides every single update, and the {aggregation} rule needs to see them: use "
            f"aggregation {' or '.join(SECURE_RULES)} (the update bounds then apply at each node)"
        )
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"secagg_clip must be a finite number > 0, got {clip}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"secagg_threshold must lie in [0, 1), got {threshold}")


def ring_scale(clip: float, n: int) -> int:
    """The round's fixed-point scale: the sum of ``n`` terms, each at most ``max(clip, 1)`` in magnitude
    times a weight, with weights summing to at most 1, stays below ``2^31`` after rounding."""
    if not clip > 0 or n < 1:
        raise SecAggError("the secure-aggregation clip must be > 0 and the roster non-empty")
    scale = int(((1 << (RING_BITS - 1)) - 1 - n) // max(clip, 1.0))
    if scale < 1:  # every value and row weight would encode as 0: the average would silently be the reference
        raise SecAggError(f"a clip of {clip:g} leaves the ring no fixed-point resolution")
    return scale


def average_error_bound(scale: int, n: int, total_weight: float, magnitude: float) -> float:
    """Largest error of one decoded average against the exact weighted average of the clipped updates:
    each of ``n`` terms and row weights is rounded by at most 1/2, so the decoded ``(A s + E) / (W s + F)``
    differs from ``A / W`` by at most ``n/2 (1 + |A/W|) / (W s - n/2)``; ``magnitude`` bounds ``|A/W|``.
    Infinite when ``W s <= n/2`` (a row's rounded weights may sum to 0 there: no bound holds)."""
    denominator = total_weight * scale - 0.5 * n
    return 0.5 * n * (1.0 + magnitude) / denominator if denominator > 0 else math.inf


@dataclass(frozen=True)
class RingLayout:
    """Where each tensor's values and row weights sit in the ring vector: every tensor's values in name
    order, then its per-row weights. Both ends derive it from the adapter's shapes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> RingLayout:
        names = tuple(sorted(state))
        return cls(names, tuple(tuple(state[n].shape) for n in names))

    @property
    def length(self) -> int:
        return sum(math.prod(s) + (s[0] if s else 1) for s in self.shapes)

    def _spans(self):
        at = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            rows = shape[0] if shape else 1
            numel = math.prod(shape)
            yield name, shape, rows, at, at + numel
            at += numel + rows

    def encode(
        self,
        update: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        weight: float,
        clip: float,
        scale: int,
    ) -> tuple[np.ndarray, int]:
        """``round(weight * clip(update - reference) * scale)`` per value of the rows ``present`` says were
        sent (others 0) and ``round(weight * scale)`` per sent row, in the ring; and the number of values
        the clip cut."""
        if not 0.0 <= weight <= 1.0:
            raise SecAggError(f"a node's weight must lie in [0, 1], got {weight}")
        out = np.zeros(self.length, dtype=np.int64)
        clipped = 0
        for name, _shape, rows, a, b in self._spans():
            diff = (update[name].detach().double() - reference[name].double()).reshape(rows, -1)
            if not torch.isfinite(diff).all():
                raise SecAggError(f"{name}: the update is not finite")
            sent = present.get(name)
            sent = torch.ones(rows, dtype=torch.bool) if sent is None else sent.reshape(rows).bool()
            clipped += int((diff.abs() > clip)[sent].sum())
            values = torch.round(diff.clamp(-clip, clip) * (weight * scale)) * sent.unsqueeze(1)
            out[a:b] = values.reshape(-1).numpy().astype(np.int64)
            out[b : b + rows] = sent.numpy().astype(np.int64) * round(weight * scale)
        return (out & _RING_MASK).astype(np.uint32), clipped

    def decode(self, ring_sum: np.ndarray, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted average from the unmasked sum: per row, the reference plus the summed weighted
        differences over the summed weights of the nodes that sent it; a row nobody sent keeps the
        reference's value. The scale cancels."""
        signed = np.asarray(ring_sum, dtype=np.uint32).view(np.int32).astype(np.float64)
        out = {}
        for name, shape, rows, a, b in self._spans():
            ref = reference[name].double().reshape(rows, -1)
            values = torch.from_numpy(signed[a:b].copy()).reshape(rows, -1)
            weights = torch.from_numpy(signed[b : b + rows].copy())
            has = weights > 0
            mean = ref.clone()
            mean[has] += values[has] / weights[has].unsqueeze(1)
            out[name] = mean.reshape(shape).float()
        return out


# -- signing with the node's certificate ---------------------------------------------------------


def load_signer(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError("secure aggregation signs with the node certificate's EC key")
    return key


def _sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_signature(public: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def certified_key(cert_pem: bytes, ca: x509.Certificate, node: str) -> ec.EllipticCurvePublicKey:
    """The public key of ``node``'s certificate, after checking that the federation's CA signed it, that
    it is valid now and that its CN is ``node``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # InvalidSignature, ValueError, TypeError: all mean "not ours"
        raise SecAggError(f"{node}: certificate not signed by the federation's CA ({type(exc).__name__})") from exc
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SecAggError(f"{node}: certificate not valid now")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != node:
        raise SecAggError(f"{node}: the certificate names another node")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise SecAggError(f"{node}: the certificate's key is not an EC key")
    return public


# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Advertisement:
    """Phase 1: a node's two public keys, signed with its certificate's key."""

    node: str
    c_public: bytes
    s_public: bytes
    cert_pem: bytes
    signature: bytes

    def message(self, session: str) -> bytes:
        return _canonical(
            "advertise",
            {"session": session, "node": self.node, "c": self.c_public.hex(), "s": self.s_public.hex()},
        )

    def verify(self, session: str, ca: x509.Certificate) -> ec.EllipticCurvePublicKey:
        """The node's certified key once its certificate and signature hold and both its keys can agree a secret
        (else :class:`SecAggError`)."""
        for raw, what in ((self.c_public, "c key"), (self.s_public, "s key")):
            key = _x25519_public(raw, f"{self.node}: {what}")
            try:  # a low-order point agrees the all-zero secret with every key: X25519 refuses it (ValueError)
                X25519PrivateKey.generate().exchange(key)
            except ValueError as exc:
                raise SecAggError(f"{self.node}: its {what} is a low-order point, no secret can be agreed") from exc
        public = certified_key(self.cert_pem, ca, self.node)
        if not verify_signature(public, self.signature, self.message(session)):
            raise SecAggError(f"{self.node}: the key advertisement's signature does not verify")
        return public


def _share_message(session: str, dealer: str, holder: str, kind: str, x: int, y: int) -> bytes:
    return _canonical("share", {"session": session, "dealer": dealer, "holder": holder, "kind": kind, "x": x, "y": y})


def commit_message(session: str, dealer: str, digest: str) -> bytes:
    return _canonical("commit", {"session": session, "dealer": dealer, "b": digest})


@dataclass(frozen=True)
class SignedShare:
    """One share as the holder returns it: what the dealer signed, and the signature."""

    dealer: str
    kind: str  # "b" (self-mask seed) or "s" (pairwise key)
    x: int
    y: int
    signature: bytes

    def to_json(self) -> dict:
        return {
            "dealer": self.dealer,
            "kind": self.kind,
            "x": self.x,
            "y": format(self.y, "x"),
            "sig": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> SignedShare:
        try:
            share = cls(
                str(data["dealer"]), str(data["kind"]), int(data["x"]), int(data["y"], 16), bytes.fromhex(data["sig"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"a malformed share ({type(exc).__name__})") from exc
        if share.kind not in ("b", "s") or not 0 <= share.y < PRIME or share.x < 1:
            raise SecAggError("a malformed share")
        return share


@dataclass(frozen=True)
class DealtShares:
    """Phase 2, from one dealer: a ciphertext per other member, and the signed commitment to ``b``."""

    dealer: str
    ciphertexts: dict[str, bytes]  # holder -> nonce || AES-GCM ciphertext
    b_commitment: str
    commitment_signature: bytes


def _box_key(own: X25519PrivateKey, peer_public: bytes, session: str, dealer: str, holder: str) -> bytes:
    return _hkdf(own.exchange(_x25519_public(peer_public, "c key")), f"box|{session}|{dealer}|{holder}".encode())


# -- the node's side -----------------------------------------------------------------------------


@dataclass
class Roster:
    """Phase-1 result as a node receives it."""

    members: dict[str, Advertisement]
    threshold: int
    weights: dict[str, float]
    clip: float

    @property
    def scale(self) -> int:
        return ring_scale(self.clip, len(self.members))

    def x_of(self, node: str) -> int:
        return sorted(self.members).index(node) + 1


class NodeSession:
    """One node's part of one session. Its secrets live only here (in memory): a node that restarts
    mid-session has dropped out of it."""

    def __init__(self, node: str, session: str, signer: ec.EllipticCurvePrivateKey, cert_pem: bytes, ca_pem: bytes):
        self.node, self.session = node, session
        self._signer = signer
        self._cert_pem = cert_pem
        self._ca = x509.load_pem_x509_certificate(ca_pem)
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = secrets.randbits(256)
        self.roster: Roster | None = None
        self._survivors: tuple[str, ...] | None = None
        self._held: dict[str, dict[str, SignedShare]] = {}  # dealer -> kind -> share
        self._publics: dict[str, ec.EllipticCurvePublicKey] = {}  # the roster's certified keys, once checked
        self._unmasked = False

    def _split(self, secret: int, xs: Iterable[int], t: int) -> dict[int, int]:
        """Shamir shares of one of this node's secrets (:func:`split`; tests make a cheating dealer here)."""
        return split(secret, xs, t)

    def advertise(self) -> Advertisement:
        c, s = _raw_public(self._c), _raw_public(self._s)
        unsigned = Advertisement(self.node, c, s, self._cert_pem, b"")
        return Advertisement(self.node, c, s, self._cert_pem, _sign(self._signer, unsigned.message(self.session)))

    def deal(self, roster: Roster) -> DealtShares:
        """Check the roster (certificates, signatures, threshold) and deal this node's shares."""
        if self.roster is not None:
            raise SecAggError("shares were dealt already in this session")
        if self.node not in roster.members:
            raise SecAggError("this node is not in the session's roster")
        n = len(roster.members)
        if not 2 <= roster.threshold <= n:
            raise SecAggError(f"threshold {roster.threshold} of {n} is out of range")
        if not 0.0 < roster.weights.get(self.node, 0.0) <= 1.0 or sum(roster.weights.values()) > 1.0 + 1e-9:
            raise SecAggError("the roster's weights are not a share of one")
        for node, adv in roster.members.items():
            if adv.node != node:
                raise SecAggError(f"roster entry {node} advertises {adv.node}")
            self._publics[node] = adv.verify(self.session, self._ca)
        own = roster.members[self.node]
        if own.c_public != _raw_public(self._c) or own.s_public != _raw_public(self._s):
            raise SecAggError("the roster carries other keys for this node than it advertised")
        self.roster = roster
        xs = {v: roster.x_of(v) for v in roster.members}
        s_int = int.from_bytes(_raw_private(self._s), "big")
        b_shares = self._split(self._b, xs.values(), roster.threshold)
        s_shares = self._split(s_int, xs.values(), roster.threshold)
        boxes = {}
        for holder, x in xs.items():
            pair = {
                kind: SignedShare(
                    self.node,
                    kind,
                    x,
                    y,
                    _sign(self._signer, _share_message(self.session, self.node, holder, kind, x, y)),
                )
                for kind, y in (("b", b_shares[x]), ("s", s_shares[x]))
            }
            if holder == self.node:
                self._held[self.node] = pair
                continue
            plain = json.dumps({k: v.to_json() for k, v in pair.items()}).encode()
            nonce = secrets.token_bytes(12)
            key = _box_key(self._c, roster.members[holder].c_public, self.session, self.node, holder)
            boxes[holder] = nonce + AESGCM(key).encrypt(nonce, plain, f"{self.session}|{self.node}|{holder}".encode())
        digest = commitment(self._b, self.session, self.node)
        return DealtShares(
            self.node, boxes, digest, _sign(self._signer, commit_message(self.session, self.node, digest))
        )

    def receive(self, inbox: Mapping[str, bytes]) -> list[str]:
        """Open the shares the other dealers sent this node; the dealers whose box does not open or whose
        shares are not theirs (returned: this node keeps nothing of them)."""
        assert self.roster is not None, "deal first"
        bad = []
        for dealer, box in inbox.items():
            adv = self.roster.members.get(dealer)
            if adv is None or dealer == self.node:
                bad.append(dealer)
                continue
            try:
                key = _box_key(self._c, adv.c_public, self.session, dealer, self.node)
                plain = AESGCM(key).decrypt(box[:12], box[12:], f"{self.session}|{dealer}|{self.node}".encode())
                pair = {k: SignedShare.from_json(v) for k, v in json.loads(plain).items()}
                public = self._publics[dealer]  # verified when the roster was checked (deal)
                x = self.roster.x_of(self.node)
                ok = set(pair) == {"b", "s"} and all(
                    s.dealer == dealer
                    and s.kind == k
                    and s.x == x
                    and verify_signature(
                        public, s.signature, _share_message(self.session, dealer, self.node, k, s.x, s.y)
                    )
                    for k, s in pair.items()
                )
            except (InvalidTag, ValueError, TypeError, SecAggError):
                ok = False
            if ok:
                self._held[dealer] = pair
            else:
                bad.append(dealer)
        return bad

    def mask(self, vector: np.ndarray, members: Iterable[str]) -> np.ndarray:
        """The masked input: ``vector + PRG(b) + sum over the other members v of ±PRG(s_uv)`` in the ring.
        ``members``: ``U2``, the nodes whose shares were relayed (this node among them)."""
        assert self.roster is not None, "deal first"
        members = sorted(set(members))
        if self.node not in members or not set(members) <= set(self.roster.members):
            raise SecAggError("the masking set must hold this node and only roster members")
        if len(members) < self.roster.threshold:
            raise SecAggError(f"{len(members)} members left, the threshold is {self.roster.threshold}")
        out = np.asarray(vector, dtype=np.uint32).copy()
        out += prg(_self_seed(self._b, self.session, self.node), out.size)
        for v in members:
            if v == self.node:
                continue
            p = prg(_pair_seed(self._s, self.roster.members[v].s_public, self.session, self.node, v), out.size)
            if self.node < v:
                out += p
            else:
                out -= p
        self._survivors = tuple(members)
        return out

    def unmask(self, survivors: Iterable[str]) -> list[SignedShare]:
        """Phase 4, once: this node's shares of each survivor's ``b`` and of each dropped member's ``s``
        key. Refused (:class:`SecAggError`) when fewer than ``t`` survive, when the survivors are not a
        subset of the masking set, when this node is not among them, or when asked twice."""
        if self._survivors is None:
            raise SecAggError("this node sent no masked input in this session")
        if self._unmasked:
            raise SecAggError("this node has answered the unmasking of this session already")
        alive = set(survivors)
        members = set(self._survivors)
        assert self.roster is not None
        if not alive <= members or self.node not in alive:
            raise SecAggError("the survivors must be members of the masking set, this node among them")
        if len(alive) < self.roster.threshold:
            raise SecAggError(f"only {len(alive)} survivors, the threshold is {self.roster.threshold}")
        self._unmasked = True
        out = []
        for dealer in sorted(members):
            pair = self._held.get(dealer)
            if pair is not None:
                out.append(pair["b"] if dealer in alive else pair["s"])
        return out


# -- the aggregator's side -----------------------------------------------------------------------


@dataclass
class UnmaskSession:
    """What the aggregator needs to remove the masks: the roster's keys and commitments, the masking set,
    the survivors' masked inputs, and the shares the survivors return."""

    session: str
    roster: Roster
    commitments: dict[str, tuple[str, bytes]]  # dealer -> (digest, signature)
    members: tuple[str, ...]  # U2
    masked: dict[str, np.ndarray] = field(default_factory=dict)  # U3: node -> masked input
    returned: dict[str, list[SignedShare]] = field(default_factory=dict)  # holder -> shares

    def add_masked(self, node: str, vector: np.ndarray, length: int) -> None:
        if node not in self.members:
            raise SecAggError(f"{node} dealt no shares in this session")
        if vector.dtype != np.uint32 or vector.shape != (length,):
            raise SecAggError(f"a masked input is {length} ring elements")
        self.masked[node] = vector

    def add_shares(self, holder: str, shares: list[SignedShare]) -> None:
        """A survivor's shares; checked for form and for asking exactly what was asked (never both kinds
        of one dealer), their content checked at :meth:`result`."""
        if holder not in self.masked:
            raise SecAggError(f"{holder} is not a survivor of this session")
        alive = set(self.masked)
        seen = set()
        for s in shares:
            if s.dealer not in self.members or s.dealer in seen:
                raise SecAggError(f"{holder}: a share of {s.dealer} that was not asked for")
            if s.kind != ("b" if s.dealer in alive else "s"):
                raise SecAggError(f"{holder}: a {s.kind} share of {s.dealer}, the other kind was asked for")
            if s.x != self.roster.x_of(holder):
                raise SecAggError(f"{holder}: a share at another point than its own")
            seen.add(s.dealer)
        self.returned[holder] = shares

    def _secret(self, dealer: str, kind: str) -> int:
        shares = {
            holder: s for holder, got in self.returned.items() for s in got if s.dealer == dealer and s.kind == kind
        }
        points = {s.x: s.y for s in shares.values()}
        value = reconstruct(points, self.roster.threshold) if len(points) >= self.roster.threshold else None
        if value is not None and self._matches(dealer, kind, value):
            return value
        # not consistent, or not the committed secret: check who signed what, lazily
        adv = self.roster.members[dealer]
        public = x509.load_pem_x509_certificate(adv.cert_pem).public_key()
        forged = [
            h
            for h, s in shares.items()
            if not verify_signature(public, s.signature, _share_message(self.session, dealer, h, kind, s.x, s.y))
        ]
        if forged:
            raise SecAggMisbehaviour(forged[0], f"returned a {kind} share of {dealer} that {dealer} did not sign")
        if len(points) < self.roster.threshold:
            raise SecAggError(f"{len(points)} shares of {dealer}'s {kind}, {self.roster.threshold} needed")
        against = "commitment" if kind == "b" else "public key"
        raise SecAggMisbehaviour(dealer, f"dealt {kind} shares that do not rebuild one secret matching its {against}")

    def _matches(self, dealer: str, kind: str, value: int) -> bool:
        if value >= 1 << 256:
            return False
        if kind == "b":
            return commitment(value, self.session, dealer) == self.commitments[dealer][0]
        key = X25519PrivateKey.from_private_bytes(value.to_bytes(32, "big"))
        return _raw_public(key) == self.roster.members[dealer].s_public

    def result(self, length: int) -> np.ndarray:
        """The unmasked sum of the survivors' inputs (uint32); :class:`SecAggMisbehaviour` names a node
        whose shares do not hold, :class:`SecAggError` says what is missing."""
        if len(self.masked) < self.roster.threshold or len(self.returned) < self.roster.threshold:
            raise SecAggError(
                f"{len(self.masked)} masked inputs and {len(self.returned)} unmasking answers, "
                f"the threshold is {self.roster.threshold}"
            )
        total = np.zeros(length, dtype=np.uint32)
        for vector in self.masked.values():
            total += vector
        alive = sorted(self.masked)
        for u in alive:
            total -= prg(_self_seed(self._secret(u, "b"), self.session, u), length)
        for v in sorted(set(self.members) - set(alive)):
            s_v = X25519PrivateKey.from_private_bytes(self._secret(v, "s").to_bytes(32, "big"))
            for u in alive:
                p = prg(_pair_seed(s_v, self.roster.members[u].s_public, self.session, u, v), length)
                if u < v:  # u added +p for v
                    total -= p
                else:
                    total += p
        return total


# -- every party in one process (the simulation, tests) ------------------------------------------


def throwaway_identities(nodes: Iterable[str]) -> tuple[bytes, dict[str, tuple[ec.EllipticCurvePrivateKey, bytes]]]:
    """A CA made for this process alone and a certificate per node: what an in-process run signs with."""
    from shared.pki import cert_pem, issue, make_ca

    ca_cert, ca_key = make_ca("FedMedCLIP in-process CA")
    out = {}
    for node in nodes:
        cert, key = issue(ca_cert, ca_key, node, server=False)
        out[node] = (key, cert_pem(cert))
    return cert_pem(ca_cert), out


@dataclass(frozen=True)
class SecureRound:
    """What one in-process secure round measured: the scale, the error bound, the values the clip cut."""

    scale: int
    threshold: int
    error_bound: float
    clipped_values: int
    masked_bytes_per_node: int


def secure_average(
    updates: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    reference: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    *,
    clip: float,
    threshold_fraction: float = 0.5,
    identities: tuple[bytes, Mapping[str, tuple[ec.EllipticCurvePrivateKey, bytes]]] | None = None,
    session: str | None = None,
) -> tuple[dict[str, torch.Tensor], SecureRound]:
    """Every step of a secure round with every node in this process: ``updates`` maps a node to its
    trained adapter and the rows it sends (``present``), ``weights`` to its (capped) weight. The new
    global: the weighted average of the clipped updates, as the services compute it."""
    nodes = sorted(updates)
    session = session or secrets.token_hex(8)
    ca_pem, ids = identities if identities is not None else throwaway_identities(nodes)
    total = sum(weights[n] for n in nodes)
    parties = {n: NodeSession(n, session, ids[n][0], ids[n][1], ca_pem) for n in nodes}
    roster = Roster(
        {n: parties[n].advertise() for n in nodes},
        threshold_for(len(nodes), threshold_fraction),
        {n: weights[n] / total for n in nodes},
        clip,
    )
    dealt = {n: parties[n].deal(roster) for n in nodes}
    layout = RingLayout.of(reference)
    unmask = UnmaskSession(
        session, roster, {n: (d.b_commitment, d.commitment_signature) for n, d in dealt.items()}, tuple(nodes)
    )
    clipped = 0
    for n in nodes:
        bad = parties[n].receive({d: dealt[d].ciphertexts[n] for d in nodes if d != n})
        if bad:
            raise SecAggError(f"{n} could not open the shares of {bad}")
        vector, cut = layout.encode(updates[n][0], reference, updates[n][1], roster.weights[n], clip, roster.scale)
        clipped += cut
        unmask.add_masked(n, parties[n].mask(vector, nodes), layout.length)
    for n in nodes:
        unmask.add_shares(n, parties[n].unmask(nodes))
    state = layout.decode(unmask.result(layout.length), reference)
    bound = average_error_bound(roster.scale, len(nodes), min(roster.weights.values()), clip)
    return state, SecureRound(roster.scale, roster.threshold, bound, clipped, 4 * layout.length)
