"""The aggregator's signed, append-only audit log and the receipts it gives nodes (docs/audit.md).

One module for the format, the signing, the writer and the verifier; it imports neither torch nor gRPC,
so ``fedmedclip audit verify`` starts in a fraction of a second.

**Format.** ``audit.log`` holds one entry per line, each canonical JSON (:func:`canonical`: sorted keys,
no spaces, ASCII) with exactly the fields ``seq`` (1, 2, ...), ``time`` (UTC, ISO 8601), ``event``,
``data``, ``prev`` (the previous entry's hash; :data:`GENESIS` for the first), ``hash`` (SHA-256 of the
canonical entry without ``hash`` and ``sig``) and ``sig`` (hex Ed25519 signature of
:data:`ENTRY_DOMAIN` + the 32 hash bytes). A line that is not exactly the canonical form of its own
content does not verify, so any changed byte is caught: by the JSON parser, the canonical check, the
hash or the signature; a removed, inserted or reordered entry breaks ``seq`` or ``prev``.

**Key.** The aggregator signs with a dedicated Ed25519 key (:class:`SigningKey`): ``audit.key`` in its
startup kit (``fedmedclip provision`` writes it and puts ``audit.pub`` into every node's kit), else
``<out_dir>/audit.key``, made on first start. ``audit.pub`` is written beside the log. The first entry,
``log_opened``, names the key's id (SHA-256 of its raw public bytes); a verifier checks every signature
against the key it is *given*, and says where that key came from.

**Crash safety.** :class:`AuditLog` appends one whole line per entry with one ``write`` and fsyncs (the
folder too, when it creates the file). A kill or a power cut in the middle of an append leaves a torn
tail: bytes after the last good entry that hold no complete JSON line. At the next start the writer does
not drop or rewrite them: it appends a ``log_recovered`` entry that chains from the last good entry and
names the torn bytes (offset, length, SHA-256). They stay in the file, and :func:`verify_log` reports
them as "torn, recovered by entry N", apart from tampering. Anything else that does not verify stops the
writer (:class:`AuditError`): it never appends to a broken chain.

**Receipts.** With every accepted upload (and the same again for a replay) the aggregator returns
:func:`make_receipt`: canonical JSON naming the run, round, node, update id, the update's SHA-256 and the
``update_accepted`` entry (seq and hash), signed with :data:`RECEIPT_DOMAIN`. The node keeps each one
(:func:`keep_receipt`); :func:`check_receipts` holds them against the log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import FedMedCLIPError
from shared.ops.atomic import atomic_write
from shared.ops.command import Command, main_for
from shared.ops.config import ConfigError
from shared.ops.exitcodes import ExitCode
from shared.ops.logs import printable

log = logging.getLogger("fedmedclip.audit")

FORMAT = 1
LOG_NAME = "audit.log"
KEY_NAME = "audit.key"
PUB_NAME = "audit.pub"
GENESIS = "0" * 64
ENTRY_DOMAIN = b"fedmedclip-audit-entry-v1\x00"
RECEIPT_DOMAIN = b"fedmedclip-audit-receipt-v1\x00"
RECEIPT_TYPE = "fedmedclip-receipt"
FIELDS = frozenset({"seq", "time", "event", "data", "prev", "hash", "sig"})
RECEIPT_FIELDS = frozenset(
    {"type", "format", "run_id", "round_id", "node", "update_id", "sha256", "seq", "entry_hash", "key_id"}
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")

# what can be wrong with a line (Problem.kind)
MALFORMED = "malformed"
NOT_CANONICAL = "not_canonical"
BAD_HASH = "bad_hash"
BAD_SIGNATURE = "bad_signature"
OTHER_KEY = "other_key"
SEQ_GAP = "seq_gap"
OUT_OF_ORDER = "out_of_order"
BROKEN_LINK = "broken_link"
TORN_TAIL = "torn_tail"


class AuditError(FedMedCLIPError):
    """The audit log cannot be opened, continued or written (the message names the file and the problem)."""


def canonical(value: Any) -> bytes:
    """The one byte form of a JSON value that is hashed and signed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- keys


class PublicKey:
    """An Ed25519 public key that checks the log's and the receipts' signatures."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self.key = key
        self.raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = sha256_hex(self.raw)

    @classmethod
    def from_pem(cls, data: bytes, source: str = "the key") -> PublicKey:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise ConfigError(f"{source} is not a PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{source} is not an Ed25519 public key (the audit key is Ed25519)")
        return cls(key)

    @classmethod
    def from_file(cls, path: Path | str) -> PublicKey:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the audit public key {path}: {exc.strerror or exc}") from exc
        return cls.from_pem(data, str(path))

    @classmethod
    def from_hex(cls, raw_hex: str) -> PublicKey:
        return cls(Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw_hex)))

    def pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, signature_hex: object, message: bytes) -> bool:
        if not isinstance(signature_hex, str) or not _HEX128.fullmatch(signature_hex):
            return False
        try:
            self.key.verify(bytes.fromhex(signature_hex), message)
            return True
        except InvalidSignature:
            return False


class SigningKey:
    """The aggregator's Ed25519 audit key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public = PublicKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path | str) -> SigningKey:
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the audit key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"the audit key {path} is not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path | str) -> SigningKey:
        """The key in ``path``; a new one written there (mode 0600) when the file does not exist."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        log.info("new audit key %s (id %s), public key in %s", path, key.public.key_id, path.with_suffix(".pub"))
        return key

    def save(self, private_path: Path | str) -> None:
        """``private_path`` (mode 0600, atomically) and its public half beside it as ``.pub`` (0644)."""
        private_path = Path(private_path)
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(private_path, pem)  # mkstemp makes it 0600, whatever the umask
        os.chmod(private_path, 0o600)
        write_public(private_path.with_suffix(".pub"), self.public)

    def sign(self, message: bytes) -> str:
        return self.key.sign(message).hex()


def write_public(path: Path | str, key: PublicKey) -> None:
    """Write ``key`` as PEM to ``path`` (mode 0644), unless it holds exactly that already."""
    path = Path(path)
    pem = key.pem()
    if path.exists() and path.read_bytes() == pem:
        return
    atomic_write(path, pem)
    os.chmod(path, 0o644)


# --------------------------------------------------------------------------- entries


def seal(body: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """``body`` (seq, time, event, data, prev) with its hash and signature."""
    digest = hashlib.sha256(canonical(body)).digest()
    return body | {"hash": digest.hex(), "sig": key.sign(ENTRY_DOMAIN + digest)}


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line number in the file
    offset: int  # byte offset of its first byte
    raw: bytes  # without the newline
    terminated: bool  # ended by a newline

    @property
    def end(self) -> int:
        return self.offset + len(self.raw) + (1 if self.terminated else 0)


def split_lines(data: bytes) -> list[Line]:
    lines, pos, number = [], 0, 1
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            lines.append(Line(number, pos, data[pos:], False))
            break
        lines.append(Line(number, pos, data[pos:end], True))
        pos, number = end + 1, number + 1
    return lines


def _json_object(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Entry:
    line: int
    offset: int
    value: dict[str, Any]  # every field, hash and sig included

    @property
    def seq(self) -> int:
        return self.value["seq"]

    @property
    def event(self) -> str:
        return self.value["event"]

    @property
    def data(self) -> dict[str, Any]:
        return self.value["data"]

    @property
    def hash(self) -> str:
        return self.value["hash"]


@dataclass(frozen=True)
class Problem:
    """The first thing wrong in a log: where (line, byte offset, seq if the line names one), what, why."""

    kind: str
    line: int
    offset: int
    seq: int | None
    detail: str
    length: int = 0  # torn tail: its bytes

    def describe(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}, byte {self.offset}: {self.kind.replace('_', ' ')}: {self.detail}"


@dataclass(frozen=True)
class Recovered:
    """Torn bytes an interrupted append left, recorded by a ``log_recovered`` entry."""

    first_line: int
    last_line: int
    offset: int
    length: int
    sha256: str
    by: Entry


@dataclass
class Verdict:
    entries: list[Entry] = field(default_factory=list)  # every entry that verifies, in order
    recovered: list[Recovered] = field(default_factory=list)
    problem: Problem | None = None  # the first problem; nothing from there on is trusted
    size: int = 0
    unterminated: bool = False  # the last entry verifies but its newline is missing (the append was cut there)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def head(self) -> str:
        return self.entries[-1].hash if self.entries else GENESIS

    @property
    def seq(self) -> int:
        return self.entries[-1].seq if self.entries else 0


def _check(line: Line, key: PublicKey, seq: int, prev: str) -> tuple[dict | None, Problem | None]:
    """Line ``line`` as entry ``seq`` chained to ``prev``: its value, or the first thing wrong with it."""

    def problem(kind: str, detail: str, named: int | None = None) -> tuple[dict | None, Problem]:
        return value, Problem(kind, line.number, line.offset, named, detail)

    value = _json_object(line.raw)
    if value is None or set(value) != FIELDS:
        return problem(MALFORMED, f"not an entry (a JSON object with exactly the fields {', '.join(sorted(FIELDS))})")
    named = value["seq"] if isinstance(value["seq"], int) and not isinstance(value["seq"], bool) else None
    try:
        body = {k: v for k, v in value.items() if k not in ("hash", "sig")}
        if canonical(value) != line.raw:
            return problem(NOT_CANONICAL, "the line is not in canonical form: it was edited by hand", named)
        digest = hashlib.sha256(canonical(body)).hexdigest()
    except (TypeError, ValueError):  # NaN and the like: never written by the aggregator
        return problem(MALFORMED, "a value that canonical JSON cannot hold", named)
    if value["hash"] != digest:
        return problem(BAD_HASH, "its content does not match its hash: it was changed after it was written", named)
    if not key.verify(value["sig"], ENTRY_DOMAIN + bytes.fromhex(digest)):
        opened = value["event"] == "log_opened" and isinstance(value["data"], dict)
        if opened and value["data"].get("key_id") != key.key_id:
            return problem(
                OTHER_KEY,
                f"the log was opened with key {printable(value['data'].get('key_id'), 64)}, not with the key "
                f"used to check it ({key.key_id})",
                named,
            )
        return problem(BAD_SIGNATURE, f"the signature does not verify with key {key.key_id[:16]}...", named)
    if named != seq:
        if isinstance(named, int) and named > seq:
            return problem(
                SEQ_GAP,
                f"seq {named} where seq {seq} was expected: "
                + (f"entry {seq} is" if named == seq + 1 else f"entries {seq}-{named - 1} are")
                + " missing (removed) or out of order",
                named,
            )
        detail = f"seq {value['seq']!r} where seq {seq} was expected: out of order or repeated"
        return problem(OUT_OF_ORDER, detail, named)
    if value["prev"] != prev:
        return problem(
            BROKEN_LINK,
            "its prev is not the hash of the entry before it: the chain is broken (an entry replaced or inserted)",
            named,
        )
    return value, None


def _recovery(lines: list[Line], i: int, data: bytes, key: PublicKey, seq: int, prev: str) -> tuple[int, Recovered]:
    """The ``log_recovered`` entry that records the bad bytes starting at line ``i``, if there is one."""
    start = lines[i].offset
    for j in range(i + 1, len(lines)):
        candidate = _json_object(lines[j].raw)  # cheap first: only a recovery entry in the right place is checked
        if candidate is None or candidate.get("event") != "log_recovered" or candidate.get("seq") != seq:
            continue
        value, problem = _check(lines[j], key, seq, prev)
        if problem is not None or value["event"] != "log_recovered":
            continue
        d = value["data"]
        length = lines[j].offset - start
        if (
            isinstance(d, dict)
            and d.get("torn_offset") == start
            and d.get("torn_length") == length
            and d.get("torn_sha256") == sha256_hex(data[start : lines[j].offset])
        ):
            entry = Entry(lines[j].number, lines[j].offset, value)
            return j, Recovered(lines[i].number, lines[j - 1].number, start, length, d["torn_sha256"], entry)
    return -1, None  # type: ignore[return-value]


def verify_log(data: bytes, key: PublicKey) -> Verdict:
    """Check every entry of a log's bytes: form, hash, signature (with ``key``), seq and chain link."""
    verdict = Verdict(size=len(data))
    lines = split_lines(data)
    seq, prev, i = 1, GENESIS, 0
    while i < len(lines):
        line = lines[i]
        value, problem = _check(line, key, seq, prev)
        if problem is None:
            verdict.entries.append(Entry(line.number, line.offset, value))
            verdict.unterminated = not line.terminated
            seq, prev, i = seq + 1, value["hash"], i + 1
            continue
        j, recovered = _recovery(lines, i, data, key, seq, prev)
        if j >= 0:
            verdict.recovered.append(recovered)
            verdict.entries.append(recovered.by)
            verdict.unterminated = not lines[j].terminated
            seq, prev, i = seq + 1, recovered.by.hash, j + 1
            continue
        if all(_json_object(rest.raw) is None for rest in lines[i:]):
            length = len(data) - line.offset
            verdict.problem = Problem(
                TORN_TAIL,
                line.number,
                line.offset,
                None,
                f"the log ends in {length} bytes that are not a complete entry (lines {line.number}-"
                f"{lines[-1].number}): an append was interrupted (kill -9, power loss) and no aggregator "
                "has started on this log since to record them",
                length,
            )
        else:
            verdict.problem = problem
        break
    return verdict


# --------------------------------------------------------------------------- the writer


class AuditLog:
    """The aggregator's side: opens (and if need be recovers) ``path``, then appends signed entries.

    Thread-safe. :meth:`append` writes one line; with ``sync`` it is durable (fsync) before it returns,
    otherwise :meth:`sync` makes every entry so far durable (one fsync for many: the engine appends an
    accepted update under its lock and syncs outside it, before the receipt leaves). A failed write
    marks the log broken: every later append raises :class:`AuditError`.
    """

    def __init__(self, path: Path | str, key: SigningKey, *, wall: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.key = key
        self.wall = wall
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self.broken: BaseException | None = None
        self.recovered: Entry | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.close(fd)
            _fsync_dir(self.path.parent)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise AuditError(f"cannot read the audit log {self.path}: {exc.strerror or exc}") from exc
        verdict = verify_log(data, key.public)
        if verdict.problem is not None and verdict.problem.kind != TORN_TAIL:
            raise AuditError(
                f"the audit log {self.path} does not verify at {verdict.problem.describe()}. The aggregator "
                "does not append to a broken chain: keep the file (it is evidence), move it away or use a new "
                "out_dir, and check it with `fedmedclip audit verify`"
            )
        self.existing: list[Entry] = verdict.entries  # what the log held (the engine reads it once at start)
        self.seq, self.head = verdict.seq, verdict.head
        self._synced = self.seq
        self._newline = verdict.unterminated  # the last entry lacks its newline: the next append starts with one
        if verdict.problem is not None:
            self._recover(data, verdict.problem)
        if not any(e.event == "log_opened" for e in self.existing):
            opened = {"format": FORMAT, "key_id": key.public.key_id, "public_key": key.public.raw.hex()}
            self.append("log_opened", opened)

    def _recover(self, data: bytes, problem: Problem) -> None:
        """Record a torn tail: the bytes stay, a ``log_recovered`` entry names them and the chain goes on."""
        tail = data[problem.offset :]
        covered = tail if tail.endswith(b"\n") else tail + b"\n"
        entry = self.append(
            "log_recovered",
            {
                "torn_offset": problem.offset,
                "torn_length": len(covered),
                "torn_sha256": sha256_hex(covered),
                "torn_line": problem.line,
                "last_good_seq": self.seq,
            },
            prefix=covered[len(tail) :],
        )
        self.recovered = entry
        log.error(
            "AUDIT LOG %s ended in a torn entry: %d bytes at line %d (byte %d, SHA-256 %s) that are not a complete "
            "entry, left by an interrupted append (kill -9 or power loss). They stay in the file; entry %d "
            "(log_recovered) records them and the chain goes on from entry %d. `fedmedclip audit verify` reports "
            "them as torn and recovered",
            self.path,
            len(tail),
            problem.line,
            problem.offset,
            sha256_hex(covered),
            entry.seq,
            entry.seq - 1,
        )

    def append(self, event: str, data: dict[str, Any], *, sync: bool = True, prefix: bytes = b"") -> Entry:
        with self._lock:
            if self.broken is not None:
                raise AuditError(f"the audit log {self.path} cannot be written: {self.broken}")
            value = seal(
                {"seq": self.seq + 1, "time": utc_time(self.wall()), "event": event, "data": data, "prev": self.head},
                self.key,
            )
            line = (b"\n" if self._newline else b"") + prefix + canonical(value) + b"\n"
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                try:
                    offset = os.lseek(fd, 0, os.SEEK_END)
                    view = memoryview(line)
                    while view:
                        view = view[os.write(fd, view) :]
                    if sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.broken = exc
                log.critical("AUDIT LOG %s cannot be written (%s): the run stops", self.path, exc)
                raise AuditError(f"the audit log {self.path} cannot be written: {exc}") from exc
            self._newline = False
            self.seq, self.head = value["seq"], value["hash"]
            if sync:
                self._synced = self.seq
            return Entry(0, offset + len(line) - len(canonical(value)) - 1, value)

    def sync(self, seq: int | None = None) -> None:
        """Make every entry up to ``seq`` (default: all) durable; one fsync covers whatever was written before."""
        with self._sync_lock:
            target = self.seq
            if self._synced >= (target if seq is None else seq):
                return
            if self.broken is not None:
                raise AuditError(f"the audit log {self.path} cannot be written: {self.broken}")
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.broken = exc
                log.critical("AUDIT LOG %s cannot be synced (%s): the run stops", self.path, exc)
                raise AuditError(f"the audit log {self.path} cannot be synced: {exc}") from exc
            self._synced = max(self._synced, target)

    def close(self) -> None:
        """The last fsync (refusals are appended without one); a failure is logged, not raised."""
        try:
            self.sync()
        except AuditError as exc:
            log.critical("%s", exc)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_for_aggregator(out_dir: Path | str, key_path: str | None, wall: Callable[[], float] = time.time) -> AuditLog:
    """The aggregator's log ``<out_dir>/audit.log``, signed with ``key_path`` (a kit's ``audit.key``) or else
    ``<out_dir>/audit.key`` (made on first start); the public key goes beside the log as ``audit.pub``."""
    out = Path(out_dir)
    if key_path:
        if not Path(key_path).is_file():
            raise ConfigError(f"audit_key {key_path} does not exist (fedmedclip provision writes audit.key)")
        key = SigningKey.load(key_path)
    else:
        key = SigningKey.load_or_create(out / KEY_NAME)
    write_public(out / PUB_NAME, key.public)
    return AuditLog(out / LOG_NAME, key, wall=wall)


# --------------------------------------------------------------------------- receipts


def make_receipt(key: SigningKey, run_id: str, entry: Entry) -> tuple[str, str]:
    """The signed receipt of the ``update_accepted`` entry ``entry``: (canonical JSON, hex signature)."""
    d = entry.data
    receipt = {
        "type": RECEIPT_TYPE,
        "format": FORMAT,
        "run_id": run_id,
        "round_id": d["round_id"],
        "node": d["node"],
        "update_id": d["update_id"],
        "sha256": d["sha256"],
        "seq": entry.seq,
        "entry_hash": entry.hash,
        "key_id": key.public.key_id,
    }
    text = canonical(receipt)
    return text.decode(), key.sign(RECEIPT_DOMAIN + hashlib.sha256(text).digest())


def receipt_problem(receipt: object, signature: object, key: PublicKey | None) -> str | None:
    """What is wrong with a receipt on its own (form; signature when ``key`` is given), or None."""
    if not isinstance(receipt, dict) or set(receipt) != RECEIPT_FIELDS or receipt.get("type") != RECEIPT_TYPE:
        return f"not a receipt (a JSON object with exactly the fields {', '.join(sorted(RECEIPT_FIELDS))})"
    if not all(isinstance(receipt[k], int) and not isinstance(receipt[k], bool) for k in ("round_id", "seq")):
        return "round_id and seq must be integers"
    if key is not None:
        try:
            message = RECEIPT_DOMAIN + hashlib.sha256(canonical(receipt)).digest()
        except (TypeError, ValueError):
            return "a value that canonical JSON cannot hold"
        if not key.verify(signature, message):
            return f"the signature does not verify with key {key.key_id[:16]}...: forged, altered or another key"
    return None


def _safe(name: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:64].lstrip(".") or "unknown"


def keep_receipt(
    state_dir: Path | str, receipt_text: str, signature: str, key: PublicKey | None, expected: dict[str, Any]
) -> tuple[Path, str | None]:
    """A node's side: check a receipt (form, ``expected`` fields, signature if ``key``) and store it, whatever
    the outcome (it is evidence), atomically as ``<state_dir>/receipts/<run id>/round-<r>-entry-<seq>.json``.
    Returns the file and what is wrong (None: nothing)."""
    receipt = _json_object(receipt_text.encode("utf-8", "replace"))
    problem = receipt_problem(receipt, signature, key)
    if problem is None:
        wrong = [k for k, v in expected.items() if receipt.get(k) != v]
        if wrong:
            problem = "it does not name this update: " + ", ".join(
                f"{k} {printable(repr(receipt.get(k)), 80)} (expected {v!r})" for k, v in wrong
            )
    seq = receipt["seq"] if receipt_problem(receipt, signature, None) is None else "unknown"
    folder = Path(state_dir) / "receipts" / _safe(expected.get("run_id"))
    path = folder / f"round-{_safe(expected.get('round_id'))}-entry-{_safe(seq)}.json"
    body = {"receipt": receipt if receipt is not None else receipt_text, "signature": signature}
    atomic_write(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
    return path, problem


@dataclass(frozen=True)
class ReceiptCheck:
    path: Path
    problem: str | None  # None: signature, form and the log's entry all agree
    skipped: str | None = None  # not held against this log (another run), with why
    past_bad: bool = False  # names an entry after the log's first bad entry: cannot be checked


def check_receipts(paths: Iterable[Path], verdict: Verdict, key: PublicKey) -> list[ReceiptCheck]:
    """Each receipt file against the log: its signature, and the entry it names (seq, hash, content)."""
    by_seq = {e.seq: e for e in verdict.entries}
    runs = {e.data.get("run_id") for e in verdict.entries if e.event == "run_started"}
    last = verdict.seq
    out = []
    for path in paths:
        body = _json_object(path.read_bytes()) if path.is_file() else None
        if body is None or "receipt" not in body:
            out.append(ReceiptCheck(path, "not a receipt file (JSON with receipt and signature)"))
            continue
        receipt, signature = body.get("receipt"), body.get("signature")
        problem = receipt_problem(receipt, signature, key)
        if problem is None and receipt["run_id"] not in runs:
            out.append(ReceiptCheck(path, None, f"run {printable(receipt['run_id'], 64)} is not in this log"))
            continue
        if problem is None:
            entry = by_seq.get(receipt["seq"])
            if entry is None and verdict.problem is not None and receipt["seq"] > last:
                where = f"line {verdict.problem.line}"
                out.append(
                    ReceiptCheck(
                        path, f"it names entry {receipt['seq']}, after the first bad entry ({where})", past_bad=True
                    )
                )
                continue
            if entry is None:
                problem = (
                    f"it names entry {receipt['seq']}, which the log lacks (the log's verified entries end at "
                    f"{last}): the log was cut short or the entry was lost"
                )
            elif entry.hash != receipt["entry_hash"] or entry.event != "update_accepted":
                problem = (
                    f"it names entry {receipt['seq']} with hash {receipt['entry_hash'][:16]}..., the log's entry "
                    f"{entry.seq} (line {entry.line}) is {entry.event} with hash {entry.hash[:16]}...: the log was "
                    "rewritten or the entry lost"
                )
            else:
                named = ("run_id", "round_id", "node", "update_id", "sha256")
                wrong = [k for k in named if entry.data.get(k) != receipt[k]]
                if wrong:
                    problem = f"the log's entry {entry.seq} differs in {', '.join(wrong)}"
        out.append(ReceiptCheck(path, problem))
    return out


def receipt_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.json") if p.is_file())


# --------------------------------------------------------------------------- fedmedclip audit


@dataclass(frozen=True)
class AuditVerifyConfig:
    key: str | None = None  # the aggregator's audit public key (PEM; a node's kit holds it as aggregator_audit.pub)
    receipts: str | None = None  # a folder (searched recursively) or file of a node's receipts, checked against the log


@dataclass(frozen=True)
class AuditShowConfig:
    key: str | None = None  # the aggregator's audit public key (PEM); default: audit.pub beside the log


def _log_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", metavar="LOG", help="the aggregator's audit.log (in its out_dir)")


def _resolve_key(log_path: Path, key: str | None, data: bytes) -> tuple[PublicKey, str]:
    """The key to check with and, in words, where it came from (and what that proves)."""
    if key:
        return PublicKey.from_file(key), f"from {key} (given with --key)"
    beside = log_path.with_name(PUB_NAME)
    if beside.is_file():
        return PublicKey.from_file(beside), (
            f"from {beside}, beside the log: whoever could change the log could change it too; pass --key "
            "with the key from your startup kit to check who signed"
        )
    first = (_json_object(split_lines(data)[0].raw) if data else None) or {}
    opened = first.get("data") if first.get("event") == "log_opened" else None
    raw = opened.get("public_key") if isinstance(opened, dict) else None
    if isinstance(raw, str) and _HEX64.fullmatch(raw):
        return PublicKey.from_hex(raw), (
            "named by the log's own first entry (no --key, no audit.pub): this proves the log is consistent, "
            "not who wrote it; pass --key with the key from your startup kit"
        )
    raise ConfigError(f"no key to check {log_path} with: pass --key (the aggregator's audit.pub)")


def _read_log(path: str) -> tuple[Path, bytes]:
    log_path = Path(path)
    try:
        return log_path, log_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {log_path}: {exc.strerror or exc}") from exc


def _summary(verdict: Verdict) -> str:
    runs = [e.data.get("run_id") for e in verdict.entries if e.event == "run_started"]
    ended = [e for e in verdict.entries if e.event in ("run_finished", "run_failed")]
    closed = sum(1 for e in verdict.entries if e.event == "round_closed")
    tail = f"last event {ended[-1].event} (seq {ended[-1].seq})" if ended else "no run_finished or run_failed yet"
    return f"run(s) {', '.join(map(str, runs)) or 'none'}; {closed} rounds closed; {tail}"


def _verify(cfg: AuditVerifyConfig, args: argparse.Namespace) -> int:
    log_path, data = _read_log(args.log)
    key, source = _resolve_key(log_path, cfg.key, data)
    verdict = verify_log(data, key)
    print(f"audit log {log_path}: {len(split_lines(data))} lines, {verdict.size} bytes")
    print(f"key {key.key_id} {source}")
    for r in verdict.recovered:
        lines = f"line {r.first_line}" if r.first_line == r.last_line else f"lines {r.first_line}-{r.last_line}"
        print(
            f"WARNING: torn entry at {lines} (byte {r.offset}, {r.length} bytes, SHA-256 {r.sha256[:16]}...), left by "
            f"an interrupted append (kill -9, power loss), recovered by entry seq {r.by.seq} (line {r.by.line}, "
            "log_recovered): the chain goes on from the entry before it"
        )
    failed = False
    if verdict.ok:
        print(
            f"OK: {len(verdict.entries)} entries; every hash, signature, seq and chain link verifies; "
            f"head seq {verdict.seq} hash {verdict.head}"
        )
        print(_summary(verdict))
    else:
        failed = True
        p = verdict.problem
        if verdict.entries:
            print(f"entries 1-{verdict.seq} verify (head {verdict.head}); nothing from line {p.line} on is trusted")
        print(f"FAILED: first bad entry at {p.describe()}")
    if cfg.receipts:
        root = Path(cfg.receipts)
        if not root.exists():
            raise ConfigError(f"receipts {root} does not exist")
        checks = check_receipts(receipt_files(root), verdict, key)
        bad = [c for c in checks if c.problem]
        held = [c for c in checks if c.skipped is None]
        past = [c for c in bad if c.past_bad]
        for c in bad:
            if not c.past_bad:
                print(f"FAILED receipt {c.path}: {c.problem}")
        skipped = len(checks) - len(held)
        print(
            f"receipts in {root}: {len(held)} checked, {len(held) - len(bad)} match the log"
            + (f", {len(past)} name entries after the log's first bad entry (not checkable)" if past else "")
            + (f"; {skipped} of other runs not checked" if skipped else "")
        )
        if bad or not held:
            failed = True
            if not held:
                print("FAILED: no receipt of this log's run(s) found")
    return ExitCode.AUDIT_FAILED if failed else ExitCode.OK


def _details(event: str, d: dict[str, Any]) -> str:
    def short(h: object) -> str:
        return str(h)[:12] if h else "-"

    if event == "log_opened":
        return f"key {short(d.get('key_id'))}"
    if event == "run_started":
        return f"run {d.get('run_id')}, {d.get('rounds')} rounds, {d.get('method')}, {d.get('aggregation')}"
    if event == "aggregator_resumed":
        return f"run {d.get('run_id')} at version {d.get('version')} ({d.get('phase')})"
    if event == "log_recovered":
        sha = short(d.get("torn_sha256"))
        return f"torn bytes at byte {d.get('torn_offset')} ({d.get('torn_length')} bytes, {sha})"
    if event == "node_registered":
        cert = d.get("certificate")
        return f"{d.get('node')} {d.get('role')}, {d.get('num_train')} train" + (f", cert CN {cert}" if cert else "")
    if event == "update_accepted":
        return f"round {d.get('round_id')} {d.get('node')} {short(d.get('sha256'))} weight {d.get('weight')}"
    if event == "update_refused":
        return f"round {d.get('round_id')} {d.get('node')} {d.get('reason')}"
    if event == "round_closed":
        ups = ", ".join(f"{u.get('node')} {short(u.get('sha256'))} w{u.get('weight')}" for u in d.get("updates", []))
        return f"round {d.get('round_id')} -> v{d.get('version')}: {ups}" + (
            " (recorded at resume)" if d.get("recorded_at_resume") else ""
        )
    if event == "global_published":
        return f"v{d.get('version')} {short(d.get('sha256'))} {d.get('wire_bytes')} bytes"
    if event in ("run_finished", "run_failed"):
        return f"run {d.get('run_id')} at version {d.get('version')}: {d.get('message')}"
    return json.dumps(d, sort_keys=True)[:120]


def _show(cfg: AuditShowConfig, args: argparse.Namespace) -> int:
    log_path, data = _read_log(args.log)
    key, source = _resolve_key(log_path, cfg.key, data)
    verdict = verify_log(data, key)
    good = {e.line for e in verdict.entries}
    torn = {n for r in verdict.recovered for n in range(r.first_line, r.last_line + 1)}
    print(f"{'line':>5}  {'seq':>5}  {'time':<24}  {'event':<18}  {'check':<5}  details")
    for line in split_lines(data):
        value = _json_object(line.raw)
        check = "ok" if line.number in good else ("torn" if line.number in torn else "BAD")
        if value is None or not isinstance(value.get("data"), dict):
            print(f"{line.number:>5}  {'-':>5}  {'-':<24}  {'(not an entry)':<18}  {check:<5}  {len(line.raw)} bytes")
            continue
        details = printable(_details(str(value.get("event")), value["data"]), 160)
        print(
            f"{line.number:>5}  {printable(value.get('seq'), 5):>5}  {printable(value.get('time'), 24):<24}  "
            f"{printable(value.get('event'), 18):<18}  {check:<5}  {details}"
        )
    state = "intact" if verdict.ok else f"FAILED at {verdict.problem.describe()}"
    print(f"chain: {state} (key {key.key_id[:16]}... {source.split(':')[0]})")
    return ExitCode.OK


VERIFY = Command(
    name="verify",
    help="check an audit log's chain and signatures, and receipts against it",
    run=_verify,
    config=AuditVerifyConfig,
    env_prefix="FEDMEDCLIP_AUDIT_",
    arguments=_log_argument,
    description="Check the aggregator's audit log: every entry's form, hash, signature, seq and chain link, "
    "and (--receipts) a node's receipts against it. Exit 0 when intact, 5 otherwise; the first bad entry is "
    "named by line and seq. A torn entry an interrupted append left, and that a restart recorded, is a warning.",
)
SHOW = Command(
    name="show",
    help="print an audit log as a table",
    run=_show,
    config=AuditShowConfig,
    env_prefix="FEDMEDCLIP_AUDIT_",
    arguments=_log_argument,
    description="Print the aggregator's audit log as a table, one row per line, each marked ok, torn or BAD.",
)
COMMAND = Command(
    name="audit",
    help="verify or show the aggregator's signed audit log",
    subcommands=(VERIFY, SHOW),
    description="The aggregator's signed, hash-chained audit log (docs/audit.md): `audit verify LOG "
    "[--key PUB] [--receipts DIR]`, `audit show LOG`.",
)


def main(argv: list[str] | None = None) -> int:
    return main_for(COMMAND, argv if argv is not None else sys.argv[1:], "python -m shared.audit")


if __name__ == "__main__":
    raise SystemExit(main())
