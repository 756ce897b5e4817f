"""Wire codec for FAM state: named float32 tensors to bytes and back.

The FAM (feature adaptation module) is the only model state that travels between the
hospitals and the aggregator, in both directions, so this module is the trust boundary
of the federation: whatever arrives here may be truncated, corrupted, hostile or simply
from another model version. Decoding therefore checks, in this order and before any
large allocation:

1. the SHA-256 that travelled beside the payload (when the caller has one);
2. the compressed length, and the size the zstd frame declares: a frame that declares
   none is refused before a byte is decompressed, one that declares more than the cap too;
3. the prefix and the JSON header, read alone through a stream (the header is capped at
   ``MAX_HEADER_BYTES``; integers of more than 18 digits, floats and NaN are refused while
   parsing, so no client string reaches Python's int conversion limit);
4. the tensor names and shapes against the caller's template, exactly; then the declared
   size against the largest body that template allows (every row sent, float32, bitmaps):
   the rest of the frame is read up to that bound plus one byte, so a frame that lies about
   its size is stopped after about one template's worth of output, never the 64 MiB cap;
5. the binary layout (exact body length, bitmaps), then that every value is finite.

Never pickle: a pickle is code, and the aggregator must not run code a hospital sent.

Payload layout (little endian), the whole of it compressed as one zstd frame that
declares its content size and carries zstd's own content checksum::

    b"FMCS"  magic               4 bytes
    version  uint16              currently 1
    hlen     uint32              length of the header in bytes (at most MAX_HEADER_BYTES)
    header   UTF-8 JSON          {"codec": str, "delta": bool,
                                  "tensors": [{"name": str, "shape": [int, ...],
                                               "enc": "f32"|"f16"|"q8"|"q4",
                                               "masked": bool}, ...]}
    body     per tensor, in header order:
             bitmap   ceil(rows / 8) bytes, LSB first, only when "masked"
                      (bit i set: output row i was sent; padding bits must be 0)
             values of the P sent rows (rows = shape[0], a row = the rest of the shape):
               f32: P*R float32
               f16: P*R float16
               q8 : P float16 scales, then P*R int8 in [-127, 127]
               q4 : P float16 scales, then ceil(P*R / 2) bytes, two 4-bit values per
                    byte (low nibble first), each stored as q + 7 in [0, 14];
                    an odd tail is padded with the nibble 7 (q = 0)

Quantisers (``codec`` -> per-tensor ``enc``):

* ``fp32``: every tensor f32 (lossless).
* ``fp16``: every tensor f16; a tensor with a value beyond the float16 range
  (|x| > 65504) falls back to f32 rather than turning into Inf.
* ``int8`` / ``int4``: tensors with two or more dimensions are quantised per output
  row, symmetric, with a float16 scale per row: ``scale_i = max|row_i| / qmax``
  (qmax = 127 or 7), rounded to float16 and then nudged up by one float16 step if
  rounding made it smaller than the exact value, so that no value of the row clips;
  ``q = round(x / scale16)`` uses that rounded scale, which is what the decoder
  multiplies by. An all-zero row gets scale 0 and decodes to exact zeros. The absolute
  error per element is at most ``scale16 / 2``, i.e. about ``max|row| / (2 * qmax)``
  (times ``1 + 2**-10`` for the float16 rounding of the scale, plus ``2**-25`` when the
  scale is in float16's subnormal range). If a scale would overflow float16 the tensor
  falls back to f32.

  One-dimensional tensors (biases, thresholds) are *not* row-quantised: one scale per
  element would cost more than the value, and a single scale per vector would let one
  large bias wipe out the small ones. They are stored as float16 (f32 if out of the
  float16 range): at D = 512 that is 1 KiB per vector, under 1 % of an int8 FAM payload,
  and it keeps thresholds (compared against mean |W| to switch rows on and off) to a
  relative error of about 5e-4.

Delta mode: when the encoder is given ``reference`` (normally the last global FAM
state) it quantises ``state - reference`` instead of ``state``. After a round of local
training the delta is far smaller than the weights, so the same number of bits gives a
far smaller error. The decoder must then be given the same reference and adds it back;
without one it raises :class:`ReferenceRequiredError`.

Masked rows: rows whose ``row_masks`` entry is False are not sent at all (they cost one
bit). The decoder reports which rows were sent in :attr:`DecodedState.present` and fills
the others from its ``reference`` if given, else with zeros. Thresholds always travel: the
caller simply gives no mask for them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from shared import kernels
from shared.errors import FedMedCLIPError
from shared.wire.reasons import Reason

__all__ = [
    "CODECS",
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_HEADER_BYTES",
    "FORMAT_VERSION",
    "CodecError",
    "UnknownCodecError",
    "ChecksumMismatchError",
    "ShapeMismatchError",
    "NonFiniteError",
    "PayloadTooLargeError",
    "MalformedPayloadError",
    "ReferenceRequiredError",
    "EncodedPayload",
    "DecodedState",
    "DecodedRows",
    "decode_rows",
    "encode_state",
    "decode_state",
    "payload_codec",
    "payload_info",
    "PayloadInfo",
    "max_body_nbytes",
]

CODECS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")

#: Cap on the compressed payload a decoder accepts. A full fp32 FAM at D = 512 is about
#: 2.1 MB, so 64 MiB leaves room for much wider models and still bounds memory.
DEFAULT_MAX_PAYLOAD_BYTES: int = 64 * 1024 * 1024
#: Cap on the decompressed payload (declared and actual); the zstd-bomb guard.
DEFAULT_MAX_DECOMPRESSED_BYTES: int = 64 * 1024 * 1024
#: Cap on the JSON header; a few hundred bytes per tensor is plenty.
MAX_HEADER_BYTES: int = 1024 * 1024

FORMAT_VERSION: int = 1
_MAGIC = b"FMCS"
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_FP16_MAX = 65504.0
_READ_CHUNK = 1024 * 1024
_MAX_INT_DIGITS = 18  # header integers are dimensions: int64 at most, far below Python's 4300-digit limit

# Which per-tensor encodings a payload of a given codec may contain.
_ALLOWED_ENCS: dict[str, frozenset[str]] = {
    "fp32": frozenset({"f32"}),
    "fp16": frozenset({"f16", "f32"}),
    "int8": frozenset({"q8", "f16", "f32"}),
    "int4": frozenset({"q4", "f16", "f32"}),
}
_QMAX = {"q8": 127, "q4": 7}


# --------------------------------------------------------------------------- errors


class CodecError(FedMedCLIPError):
    """Base class of every error the codec raises on bad input or a bad payload."""

    reason = Reason.CODEC


class UnknownCodecError(CodecError):
    """The codec name asked for, or named by a payload, is not one of :data:`CODECS`."""

    reason = Reason.UNKNOWN_CODEC


class ChecksumMismatchError(CodecError):
    """The payload's SHA-256 differs from the one that travelled with it."""

    reason = Reason.CHECKSUM_MISMATCH


class ShapeMismatchError(CodecError):
    """Tensor names or shapes differ from the template (or state and reference/masks differ)."""

    reason = Reason.SHAPE_MISMATCH


class NonFiniteError(CodecError):
    """A tensor holds NaN or Inf, on encode or after decode."""

    reason = Reason.NON_FINITE


class PayloadTooLargeError(CodecError):
    """Compressed, declared or decompressed size is over the caller's limit."""

    reason = Reason.PAYLOAD_TOO_LARGE


class MalformedPayloadError(CodecError):
    """The bytes are not a well-formed payload: bad magic, truncated, bad header, garbage."""

    reason = Reason.MALFORMED_PAYLOAD


class ReferenceRequiredError(CodecError):
    """The payload is a delta against a reference, and the decoder was given none."""

    reason = Reason.REFERENCE_REQUIRED


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EncodedPayload:
    """What :func:`encode_state` produces: the wire bytes and their accounting."""

    data: bytes
    """What goes on the wire: one zstd frame."""
    sha256: str
    """Lower-case hex SHA-256 of :attr:`data`; send it beside the payload."""
    codec: str
    """The codec asked for (one of :data:`CODECS`)."""
    raw_nbytes: int
    """Bytes of the same tensors as plain float32, all rows: the 'raw' side of raw vs wire."""

    @property
    def wire_nbytes(self) -> int:
        """Bytes that actually go on the wire."""
        return len(self.data)


@dataclass(frozen=True)
class DecodedState:
    """What :func:`decode_state` produces."""

    tensors: dict[str, torch.Tensor]
    """float32, full template shapes, in template order. Rows not sent come from the
    decoder's ``reference`` if given, else are 0."""
    present: dict[str, torch.Tensor]
    """bool ``[shape[0]]`` per tensor: which rows were sent (all True when not masked)."""


# --------------------------------------------------------------------------- helpers


def _shape_tuple(shape: object, what: str) -> tuple[int, ...]:
    """Normalise a template shape (tuple, list, torch.Size) to a tuple of ints."""
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ShapeMismatchError(f"{what}: shape {shape!r} is not a sequence") from exc
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ShapeMismatchError(f"{what}: bad dimension {d!r} in shape {shape!r}")
        out.append(int(d))
    return tuple(out)


def _row_len(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


def _as_cpu_float32(name: str, t: object, what: str) -> torch.Tensor:
    """Detach and bring a tensor to contiguous CPU float32, refusing non-float input."""
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"{what} {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if not t.is_floating_point():
        raise CodecError(f"{what} {name!r} has dtype {t.dtype}; a floating dtype is required")
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    # A NaN or Inf anywhere makes the sum non-finite, so a finite sum proves the tensor finite in one
    # cheap pass (~5x faster than isfinite().all(), which the aggregator runs twice per tensor per
    # update); only a sum that is not finite (a bad value, or finite values overflowing) is checked
    # element by element.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} {name!r} contains NaN or Inf")


def _fp16_scales(amax: torch.Tensor, qmax: int) -> torch.Tensor | None:
    """Per-row float16 scales such that ``max|row| / scale16 <= qmax``.

    Rounding ``amax / qmax`` to float16 may round *down*; then the largest value of the
    row would need ``|q| > qmax`` and clip, with an error far above ``scale / 2``. So a
    scale that rounded down is moved up one float16 step (positive float16 bit patterns
    are ordered like their values, so that is ``bits + 1``; for a scale that underflowed
    to 0 it gives the smallest subnormal). Returns None when a scale does not fit float16.
    """
    exact = amax / qmax
    if bool((exact > _FP16_MAX).any()):
        return None
    s16 = exact.to(torch.float16)
    low = (s16.to(torch.float32) < exact).to(torch.int16)
    return (s16.view(torch.int16) + low).view(torch.float16)


def _encode_tensor(x: torch.Tensor, codec: str) -> tuple[str, bytes]:
    """Encode the sent rows ``x`` ([P, ...], float32, finite) and return (enc, bytes)."""
    fits_fp16 = x.numel() == 0 or float(x.abs().max()) <= _FP16_MAX
    if codec == "fp32":
        enc = "f32"
    elif codec == "fp16" or x.dim() == 1:
        enc = "f16" if fits_fp16 else "f32"
    else:
        enc = "q8" if codec == "int8" else "q4"

    if enc in ("q8", "q4"):
        rows = x.reshape(x.shape[0], -1)
        if rows.shape[1] == 0:
            enc = "f32"  # nothing to quantise
        else:
            qmax = _QMAX[enc]
            s16 = _fp16_scales(rows.abs().amax(dim=1), qmax)
            if s16 is None:
                enc = "f32"
            else:
                s = s16.to(torch.float32).unsqueeze(1)
                safe = torch.where(s > 0, s, torch.ones_like(s))
                q = torch.where(s > 0, rows / safe, torch.zeros_like(rows))
                q = q.round_().clamp_(-qmax, qmax).to(torch.int8)
                scale_bytes = s16.numpy().astype("<f2").tobytes()
                if enc == "q8":
                    return enc, scale_bytes + q.numpy().tobytes()
                u = (q.reshape(-1).to(torch.int16) + 7).to(torch.uint8)
                if u.numel() % 2:
                    u = torch.cat([u, torch.tensor([7], dtype=torch.uint8)])
                packed = u[0::2] | (u[1::2] << 4)
                return enc, scale_bytes + packed.numpy().tobytes()

    if enc == "f16":
        return enc, x.numpy().astype("<f2").tobytes()
    return "f32", x.numpy().astype("<f4").tobytes()


def _section_nbytes(enc: str, n_rows: int, row_len: int) -> int:
    """Bytes the values of ``n_rows`` sent rows take in the body for encoding ``enc``."""
    n = n_rows * row_len
    if enc == "f32":
        return 4 * n
    if enc == "f16":
        return 2 * n
    if enc == "q8":
        return 2 * n_rows + n
    if enc == "q4":
        return 2 * n_rows + (n + 1) // 2
    raise MalformedPayloadError(f"unknown tensor encoding {enc!r}")


# --------------------------------------------------------------------------- encode


def encode_state(
    state: Mapping[str, torch.Tensor],
    *,
    codec: str = "int8",
    row_masks: Mapping[str, torch.Tensor] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    zstd_level: int = 3,
) -> EncodedPayload:
    """Encode a FAM state for the wire.

    Args:
        state: name -> float tensor, at least 1-D. Row i of a tensor is ``t[i]``.
        codec: one of :data:`CODECS`.
        row_masks: name -> bool ``[shape[0]]``; rows that are False are left out of the
            payload. Names without a mask send every row (give thresholds no mask).
        reference: if given (the last global state, same names and shapes), encode the
            delta ``state - reference``; the receiver must decode with the same reference.
        zstd_level: zstd compression level.

    Raises:
        UnknownCodecError, ShapeMismatchError, NonFiniteError, CodecError.
    """
    if not isinstance(codec, str) or codec not in CODECS:
        raise UnknownCodecError(f"unknown codec {codec!r}; expected one of {CODECS}")
    if (
        isinstance(zstd_level, bool)
        or not isinstance(zstd_level, int)
        or not (1 <= zstd_level <= zstandard.MAX_COMPRESSION_LEVEL)
    ):
        raise CodecError(f"zstd_level must be an int in [1, {zstandard.MAX_COMPRESSION_LEVEL}]")
    masks = dict(row_masks or {})
    unknown = set(masks) - set(state)
    if unknown:
        raise ShapeMismatchError(f"row_masks name tensors not in the state: {sorted(unknown)}")
    if reference is not None and set(reference) != set(state):
        raise ShapeMismatchError(
            "reference and state name different tensors: "
            f"missing {sorted(set(state) - set(reference))}, "
            f"extra {sorted(set(reference) - set(state))}"
        )

    entries: list[dict[str, object]] = []
    body: list[bytes] = []
    raw_nbytes = 0
    for name, tensor in state.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        x = _as_cpu_float32(name, tensor, "state tensor")
        if x.dim() == 0:
            raise ShapeMismatchError(f"state tensor {name!r} is 0-d; tensors need a row axis")
        _check_finite(name, x, "state tensor")
        raw_nbytes += 4 * x.numel()
        if reference is not None:
            ref = _as_cpu_float32(name, reference[name], "reference tensor")
            if ref.shape != x.shape:
                raise ShapeMismatchError(f"reference {name!r} has shape {tuple(ref.shape)}, state {tuple(x.shape)}")
            _check_finite(name, ref, "reference tensor")
            x = x - ref
            _check_finite(name, x, "delta (state - reference) of")

        masked = name in masks
        if masked:
            m = masks[name]
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (x.shape[0],):
                raise ShapeMismatchError(f"row mask {name!r} must be a bool tensor of shape ({x.shape[0]},)")
            m = m.detach().cpu()
            bits = np.packbits(m.numpy().astype(np.uint8), bitorder="little").tobytes()
            body.append(bits)
            x = x[m]
        enc, data = _encode_tensor(x, codec)
        body.append(data)
        entries.append({"name": name, "shape": [int(d) for d in tensor.shape], "enc": enc, "masked": masked})

    header = json.dumps(
        {"codec": codec, "delta": reference is not None, "tensors": entries},
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    if len(header) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(header)} bytes is over {MAX_HEADER_BYTES}")
    raw = b"".join([_PREFIX.pack(_MAGIC, FORMAT_VERSION, len(header)), header, *body])
    compressor = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True, write_content_size=True)
    data = compressor.compress(raw)
    return EncodedPayload(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        codec=codec,
        raw_nbytes=raw_nbytes,
    )


# --------------------------------------------------------------------------- decode


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise MalformedPayloadError(f"payload must be bytes, got {type(data).__name__}")


def _declared_size(data: bytes, limit: int) -> int:
    """The decompressed size the frame declares; refused when it declares none or more than ``limit``."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError(f"not a zstd frame: {exc}") from exc
    if declared == zstandard.CONTENTSIZE_ERROR:
        raise MalformedPayloadError("not a zstd frame")
    if declared < 0 or declared == zstandard.CONTENTSIZE_UNKNOWN:  # python-zstandard says -1 for "unknown"
        # every payload declares its size (encode_state); one that does not is refused before
        # anything is decompressed, whatever it holds
        raise MalformedPayloadError("zstd frame does not declare its content size")
    if declared > limit:
        raise PayloadTooLargeError(f"payload declares {declared} decompressed bytes, over the limit {limit}")
    return int(declared)


def _read_up_to(reader, n: int) -> bytes:
    """Up to ``n`` bytes from a zstd stream reader, in chunks (never more than ``n``)."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        chunk = reader.read(min(_READ_CHUNK, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _check_single_frame(data: bytes) -> None:
    """The input is exactly one complete frame (the stream reader accepts a truncated frame or
    trailing bytes silently). Only called once the frame's output is known to be small."""
    try:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError(f"corrupt zstd data: {exc}") from exc
    if not dobj.eof:
        raise MalformedPayloadError("zstd frame is truncated")
    if dobj.unused_data:
        raise MalformedPayloadError(f"{len(dobj.unused_data)} bytes of trailing data after the frame")


def max_body_nbytes(template: Mapping[str, tuple[int, ...]]) -> int:
    """The largest body a valid payload for ``template`` has: every row sent, float32, with bitmaps."""
    total = 0
    for name, shape in template.items():
        dims = _shape_tuple(shape, f"template {name!r}")
        if not dims:
            raise ShapeMismatchError(f"template {name!r}: a tensor needs at least one dimension")
        total += (dims[0] + 7) // 8 + 4 * math.prod(dims)
    return total


def _parse_prefix(raw: bytes) -> int:
    """Check magic and version; return the header length."""
    if len(raw) < _PREFIX.size:
        raise MalformedPayloadError("payload is shorter than its fixed prefix")
    magic, version, hlen = _PREFIX.unpack_from(raw, 0)
    if magic != _MAGIC:
        raise MalformedPayloadError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise MalformedPayloadError(f"unsupported format version {version}")
    if hlen > MAX_HEADER_BYTES:
        raise MalformedPayloadError(f"header length {hlen} is over {MAX_HEADER_BYTES}")
    return int(hlen)


def _header_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise MalformedPayloadError(f"header holds an integer of {len(text)} characters")
    return int(text)


def _no_float(text: str) -> float:
    raise MalformedPayloadError(f"header holds a number that is not an integer ({text[:20]!r})")


def _parse_header(blob: bytes) -> dict[str, object]:
    """Parse and type-check the JSON header (no tensor data yet)."""
    try:
        header = json.loads(
            blob.decode("utf-8"), parse_int=_header_int, parse_float=_no_float, parse_constant=_no_float
        )
    except MalformedPayloadError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise MalformedPayloadError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"codec", "delta", "tensors"}:
        raise MalformedPayloadError("header must be an object with keys codec, delta, tensors")
    codec = header["codec"]
    if not isinstance(codec, str):
        raise MalformedPayloadError("header codec is not a string")
    if codec not in CODECS:
        raise UnknownCodecError(f"payload uses unknown codec {codec!r}")
    if not isinstance(header["delta"], bool):
        raise MalformedPayloadError("header delta is not a boolean")
    tensors = header["tensors"]
    if not isinstance(tensors, list):
        raise MalformedPayloadError("header tensors is not a list")
    seen: set[str] = set()
    for e in tensors:
        if not isinstance(e, dict) or set(e) != {"name", "shape", "enc", "masked"}:
            raise MalformedPayloadError("bad tensor entry in header")
        name, shape, enc, masked = e["name"], e["shape"], e["enc"], e["masked"]
        if not isinstance(name, str) or not name:
            raise MalformedPayloadError("tensor name is not a non-empty string")
        if name in seen:
            raise MalformedPayloadError(f"tensor {name!r} appears twice")
        seen.add(name)
        if (
            not isinstance(shape, list)
            or not shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)
        ):
            raise MalformedPayloadError(f"tensor {name!r} has a bad shape {shape!r}")
        if not isinstance(masked, bool):
            raise MalformedPayloadError(f"tensor {name!r}: masked is not a boolean")
        if not isinstance(enc, str) or enc not in _ALLOWED_ENCS[codec]:
            raise MalformedPayloadError(f"tensor {name!r}: encoding {enc!r} not valid for {codec}")
        if enc in _QMAX and len(shape) < 2:
            raise MalformedPayloadError(f"tensor {name!r}: {enc} needs at least 2 dimensions")
    return header


@dataclass(frozen=True)
class PayloadInfo:
    """What a payload's header says about it, read without decoding the body (:func:`payload_info`)."""

    codec: str
    delta: bool


def payload_info(data: bytes) -> PayloadInfo:
    """The codec and delta flag a payload's header names, decompressing only its prefix and header.

    A peek for routing and for checking a payload against the federation's settings before it is
    decoded; it verifies nothing else. Use :func:`decode_state` before trusting the payload.
    """
    data = _as_bytes(data)
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        with reader:
            hlen = _parse_prefix(_read_up_to(reader, _PREFIX.size))
            blob = _read_up_to(reader, hlen)
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError(f"corrupt zstd data: {exc}") from exc
    if len(blob) != hlen:
        raise MalformedPayloadError("payload is truncated inside its header")
    header = _parse_header(blob)
    codec, delta = header["codec"], header["delta"]
    assert isinstance(codec, str) and isinstance(delta, bool)
    return PayloadInfo(codec=codec, delta=delta)


def payload_codec(data: bytes) -> str:
    """The codec a payload names (:func:`payload_info`'s ``codec``)."""
    return payload_info(data).codec


def _check_mapping_against_template(
    what: str, names_shapes: Mapping[str, tuple[int, ...]], template: Mapping[str, tuple[int, ...]]
) -> None:
    missing = [n for n in template if n not in names_shapes]
    extra = [n for n in names_shapes if n not in template]
    if missing or extra:
        raise ShapeMismatchError(f"{what} does not match the template: missing {missing}, extra {extra}")
    for n, shape in template.items():
        if names_shapes[n] != shape:
            raise ShapeMismatchError(f"{what}: tensor {n!r} has shape {names_shapes[n]}, template says {shape}")


def _read_streamed(data: bytes, declared: int, tmpl: dict[str, tuple[int, ...]]) -> tuple[bytes, int, dict]:
    """Steps 3 and 4 through a stream, the header alone first: the reference order of every check.

    :func:`_read_payload` takes a one-shot path for a frame that can be valid; this one serves a frame
    that declares more than any payload of the template could be, and any frame the one-shot path
    fails on, so that every refusal is the one, and the same error, that this order gives.
    Returns the decompressed bytes, the header length and the parsed header.
    """
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        with reader:
            head = _read_up_to(reader, _PREFIX.size)
            hlen = _parse_prefix(head)
            start = _PREFIX.size
            if start + hlen > declared:
                raise MalformedPayloadError("payload declares less than its own header")
            blob = _read_up_to(reader, hlen)
            if len(blob) != hlen:
                raise MalformedPayloadError("payload is truncated inside its header")
            header = _parse_header(blob)
            entries: list[dict] = header["tensors"]  # type: ignore[assignment]

            # 4. names and shapes against the template, before allocating anything they size; the
            # body can then be no longer than the template's largest, whatever the frame declares
            _check_mapping_against_template("payload", {e["name"]: tuple(e["shape"]) for e in entries}, tmpl)
            _check_declared_bound(declared, start + hlen, tmpl)
            rest = _read_up_to(reader, declared - start - hlen + 1)
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError(f"corrupt zstd data: {exc}") from exc
    if start + hlen + len(rest) != declared:
        raise MalformedPayloadError(
            f"zstd frame declares {declared} bytes but holds "
            f"{'more' if start + hlen + len(rest) > declared else start + hlen + len(rest)} "
            "(truncated, corrupt or lying)"
        )
    _check_single_frame(data)  # bounded: the frame's output is `declared` bytes, at most `bound`
    return head + blob + rest, hlen, header


def _check_declared_bound(declared: int, head_nbytes: int, tmpl: dict[str, tuple[int, ...]]) -> None:
    bound = head_nbytes + max_body_nbytes(tmpl)
    if declared > bound:
        raise PayloadTooLargeError(
            f"payload declares {declared} decompressed bytes; the template allows at most {bound}"
        )


def _read_payload(data: bytes, declared: int, tmpl: dict[str, tuple[int, ...]]) -> tuple[bytes, int, dict]:
    """Steps 3 and 4: the decompressed payload, its header length and its parsed header.

    A frame that declares at most what a payload of ``tmpl`` with the largest header can hold is
    decompressed in one pass into a buffer of exactly the declared size (zstd refuses a frame whose
    output differs from its declared size, a truncated frame, a bad checksum; python-zstandard
    refuses bytes after the frame), then its prefix and header are checked in the reference order.
    Anything else, and any frame this pass fails on, goes through :func:`_read_streamed`, which
    raises the error the reference order gives. Memory: at most the declared size either way.
    """
    if declared > _PREFIX.size + MAX_HEADER_BYTES + max_body_nbytes(tmpl):
        _read_streamed(data, declared, tmpl)  # refuses it: the header's error, or the template's bound
        raise PayloadTooLargeError(f"payload declares {declared} decompressed bytes, more than the template allows")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError:
        raw = None
    if raw is None or len(raw) != declared:
        _read_streamed(data, declared, tmpl)  # raises the reference order's error for this frame
        raise MalformedPayloadError("corrupt zstd data")  # not reached for a frame that failed above
    hlen = _parse_prefix(raw)
    start = _PREFIX.size
    if start + hlen > declared:
        raise MalformedPayloadError("payload declares less than its own header")
    header = _parse_header(raw[start : start + hlen])
    entries: list[dict] = header["tensors"]  # type: ignore[assignment]
    _check_mapping_against_template("payload", {e["name"]: tuple(e["shape"]) for e in entries}, tmpl)
    _check_declared_bound(declared, start + hlen, tmpl)
    return raw, hlen, header


@dataclass(frozen=True)
class DecodedRows:
    """What :func:`decode_rows` produces: the rows each tensor sent, and nothing else.

    :func:`decode_state` builds its full tensors from this; the streaming aggregator folds it as it is,
    without a full-size copy per tensor (:meth:`shared.learning.aggregation.Aggregator.add_rows`).
    """

    codec: str
    delta: bool
    rows: dict[str, torch.Tensor]
    """float32 ``[n_sent, *shape[1:]]`` per tensor, in template order: the sent rows' values (for a
    delta payload, reference row + delta, as :func:`decode_state` computes them). Finite."""
    present: dict[str, torch.Tensor]
    """bool ``[shape[0]]`` per tensor: which rows were sent."""
    complete: dict[str, bool]
    """Per tensor: every row was sent (``rows`` then has the tensor's full shape)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The full (template) shape of tensor ``name``."""
        return (int(self.present[name].shape[0]), *self.rows[name].shape[1:])


def decode_rows(
    data: bytes,
    *,
    sha256: str | None,
    template: Mapping[str, tuple[int, ...]],
    reference: Mapping[str, torch.Tensor] | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
    out: Mapping[str, torch.Tensor] | None = None,
    compiled: bool = False,
) -> DecodedRows:
    """Decode and fully validate a payload, as :func:`decode_state` does, giving only the rows it sent.

    Every check of :func:`decode_state` is made, in the same order with the same errors, except the
    finiteness of the reference's rows that the payload did not send (they are not part of the result).
    Arguments and errors as :func:`decode_state`, and ``out``: contiguous float32 tensors of the
    template's shapes, one per name, reused from call to call (the aggregator's workspace); each
    tensor's rows are then written to the first rows of its buffer and ``rows`` are views of them,
    valid until the buffers are written again. A payload refused part-way may have written to them.
    ``compiled``: dequantise int8 sections with :func:`shared.kernels.dequantize_q8` (the same values in one
    pass; it loads numba, so only the aggregator's fold asks for it).
    """
    data = _as_bytes(data)
    # 1. integrity
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        claimed = sha256.strip().lower() if isinstance(sha256, str) else ""
        if not claimed.isascii() or not hmac.compare_digest(actual, claimed):
            raise ChecksumMismatchError("payload SHA-256 does not match the one sent with it")
    # 2. sizes
    if len(data) > max_payload_bytes:
        raise PayloadTooLargeError(f"payload of {len(data)} bytes is over the limit {max_payload_bytes}")
    declared = _declared_size(data, max_decompressed_bytes)
    tmpl = {str(n): _shape_tuple(s, f"template {n!r}") for n, s in template.items()}
    if out is not None:
        for n, shape in tmpl.items():
            buf = out.get(n)
            if (
                not isinstance(buf, torch.Tensor)
                or buf.dtype != torch.float32
                or tuple(buf.shape) != shape
                or not buf.is_contiguous()
                or buf.device.type != "cpu"
            ):
                raise ShapeMismatchError(f"out[{n!r}] must be a contiguous CPU float32 tensor of shape {shape}")

    # 3. prefix and header, 4. names and shapes against the template, then the whole (bounded) frame
    raw, hlen, header = _read_payload(data, declared, tmpl)
    entries: list[dict] = header["tensors"]  # type: ignore[assignment]
    offset = _PREFIX.size + hlen
    is_delta = bool(header["delta"])
    if is_delta and reference is None:
        raise ReferenceRequiredError("payload is a delta; decode it with the same reference")
    ref: dict[str, torch.Tensor] | None = None
    if reference is not None:
        ref = {}
        for n, t in reference.items():
            ref[n] = _as_cpu_float32(n, t, "reference tensor")
        _check_mapping_against_template("reference", {n: tuple(t.shape) for n, t in ref.items()}, tmpl)

    # Walk the body: bitmaps first decide how many rows each tensor sent.
    sections: dict[str, tuple[torch.Tensor, str, int, int]] = {}
    for e in entries:
        name, shape, enc = e["name"], tuple(e["shape"]), e["enc"]
        rows, row_len = shape[0], _row_len(shape)
        if e["masked"]:
            nbits = (rows + 7) // 8
            if len(raw) < offset + nbits:
                raise MalformedPayloadError(f"payload is truncated in the row bitmap of {name!r}")
            bitmap = np.frombuffer(raw, dtype=np.uint8, count=nbits, offset=offset)
            bits = np.unpackbits(bitmap, bitorder="little")
            if bits[rows:].any():
                raise MalformedPayloadError(f"row bitmap of {name!r} has padding bits set")
            present = torch.from_numpy(bits[:rows].astype(np.bool_))
            offset += nbits
            n_sent = int(np.count_nonzero(bits[:rows]))
        else:
            present = torch.ones(rows, dtype=torch.bool)
            n_sent = rows
        size = _section_nbytes(enc, n_sent, row_len)
        if len(raw) < offset + size:
            raise MalformedPayloadError(f"payload is truncated in the values of {name!r}")
        sections[name] = (present, enc, offset, n_sent)
        offset += size
    if offset != len(raw):
        raise MalformedPayloadError(f"{len(raw) - offset} unexpected bytes after the body")

    # 5. values
    values: dict[str, torch.Tensor] = {}
    presents: dict[str, torch.Tensor] = {}
    complete: dict[str, bool] = {}
    for name, shape in tmpl.items():
        present, enc, off, n_sent = sections[name]
        row_len = _row_len(shape)
        target = None if out is None else out[name].view(-1)[: n_sent * row_len].numpy()
        sent = _decode_values(raw, name, enc, off, n_sent, row_len, target, compiled).reshape(n_sent, *shape[1:])
        _check_finite(name, sent, "decoded tensor")
        whole = n_sent == shape[0]
        if is_delta:
            assert ref is not None
            base = ref[name] if whole else ref[name][present]
            sent.add_(base)  # float32 sent + base == base + sent, as decode_state's `full[present] += sent`
            _check_finite(name, sent, "decoded tensor")
        values[name] = sent
        presents[name] = present
        complete[name] = whole
    codec = header["codec"]
    assert isinstance(codec, str)
    return DecodedRows(codec=codec, delta=is_delta, rows=values, present=presents, complete=complete)


def decode_state(
    data: bytes,
    *,
    sha256: str | None,
    template: Mapping[str, tuple[int, ...]],
    reference: Mapping[str, torch.Tensor] | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
) -> DecodedState:
    """Decode and fully validate a payload made by :func:`encode_state`.

    Args:
        data: the wire bytes.
        sha256: hex SHA-256 that travelled with the payload; None skips the check (only
            for payloads that never crossed a trust boundary, or whose bytes the caller hashed itself).
        template: name -> shape the receiver expects; the payload must match it exactly.
        reference: the state the sender used as reference (required for delta payloads);
            also the source of rows the payload did not send.
        max_payload_bytes: cap on ``len(data)``.
        max_decompressed_bytes: cap on the decompressed size, declared and actual.

    Raises:
        ChecksumMismatchError, PayloadTooLargeError, MalformedPayloadError,
        UnknownCodecError, ReferenceRequiredError, ShapeMismatchError, NonFiniteError.
    """
    decoded = decode_rows(
        data,
        sha256=sha256,
        template=template,
        reference=reference,
        max_payload_bytes=max_payload_bytes,
        max_decompressed_bytes=max_decompressed_bytes,
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, rows in decoded.rows.items():
        if decoded.complete[name]:
            full = rows  # every row sent: already the full tensor, a fresh one
        else:
            if reference is not None:
                full = _as_cpu_float32(name, reference[name], "reference tensor").clone()
            else:
                full = torch.zeros(decoded.shape(name), dtype=torch.float32)
            full[decoded.present[name]] = rows
            _check_finite(name, full, "decoded tensor")  # the reference's rows too
        tensors[name] = full
    return DecodedState(tensors=tensors, present=decoded.present)


def _decode_values(
    raw: bytes,
    name: str,
    enc: str,
    off: int,
    n_rows: int,
    row_len: int,
    out: np.ndarray | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Turn one tensor's value section back into float32 ``[n_rows * row_len]``: written into ``out``
    (float32, that many elements) when given, else a fresh array; ``compiled``: as :func:`decode_rows`."""
    n = n_rows * row_len
    if out is None:
        out = np.empty(n, dtype=np.float32)
    if enc in ("f32", "f16"):
        np.copyto(out, np.frombuffer(raw, "<f4" if enc == "f32" else "<f2", n, off), casting="same_kind")
        return torch.from_numpy(out)
    scales = np.frombuffer(raw, "<f2", n_rows, off).astype(np.float32)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise NonFiniteError(f"tensor {name!r} has a non-finite or negative scale")
    off += 2 * n_rows
    if enc == "q8":
        q = np.frombuffer(raw, np.int8, n, off).reshape(n_rows, row_len)
        values = out.reshape(n_rows, row_len)
        if compiled:  # the product and the smallest value in one pass
            low = kernels.dequantize_q8(q, scales, values)
        else:  # int8 -> float32 times the row's scale: the same float32 product as a cast, then a multiply
            low = int(q.min()) if n else 0
            if low != -128:
                np.multiply(q, scales[:, None], out=values, dtype=np.float32)
        if low == -128:
            raise MalformedPayloadError(f"tensor {name!r} holds the int8 value -128")
        return torch.from_numpy(out)
    packed = np.frombuffer(raw, np.uint8, (n + 1) // 2, off)
    u = np.empty(2 * packed.size, dtype=np.uint8)
    u[0::2] = packed & 0x0F
    u[1::2] = packed >> 4
    if (u > 14).any():
        raise MalformedPayloadError(f"tensor {name!r} holds an invalid 4-bit value")
    if u.size > n and u[n] != 7:
        raise MalformedPayloadError(f"tensor {name!r} has a non-zero 4-bit padding value")
    qf = u[:n].astype(np.float32) - 7.0
    np.multiply(qf.reshape(n_rows, row_len), scales[:, None], out=out.reshape(n_rows, row_len))
    return torch.from_numpy(out)
