"""Tests of shared.codec: round trips, error bounds, masks, deltas, sizes, hostile input."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import (
    CODECS,
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    ChecksumMismatchError,
    CodecError,
    DecodedState,
    EncodedPayload,
    MalformedPayloadError,
    NonFiniteError,
    PayloadTooLargeError,
    ReferenceRequiredError,
    ShapeMismatchError,
    UnknownCodecError,
    decode_state,
    encode_state,
    max_body_nbytes,
    payload_codec,
    payload_info,
)
from shared.errors import FedMedCLIPError

D = 512
FP16_SCALE_SLACK = 1.0 + 2.0**-10  # a float16 scale may sit one float16 step above exact
TINY = 2.0**-25  # half of float16's smallest subnormal: bound slack for underflowing scales


def fam_like_state(seed: int = 0, d: int = D) -> dict[str, torch.Tensor]:
    """Two DxD layers initialised like nn.Linear, plus biases and zero thresholds."""
    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for prefix in ("fam.fc1", "fam.fc2"):
        layer = torch.nn.Linear(d, d)
        state[f"{prefix}.weight"] = layer.weight.detach().clone()
        state[f"{prefix}.bias"] = layer.bias.detach().clone()
        state[f"{prefix}.threshold"] = torch.zeros(d)
    return state


def template_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in state.items()}


def roundtrip(state, **kwargs) -> tuple[EncodedPayload, DecodedState]:
    ref = kwargs.get("reference")
    payload = encode_state(state, **kwargs)
    decoded = decode_state(payload.data, sha256=payload.sha256, template=template_of(state), reference=ref)
    return payload, decoded


def craft(header: dict, body: bytes, *, magic: bytes = b"FMCS", version: int = 1) -> bytes:
    """Hand-build a payload in the documented wire format (for hostile-input tests)."""
    hb = json.dumps(header).encode()
    raw = struct.pack("<4sHI", magic, version, len(hb)) + hb + body
    return zstandard.ZstdCompressor(write_content_size=True).compress(raw)


# ----------------------------------------------------------------------- round trips


def test_fp32_round_trip_is_exact_and_present_all_true():
    state = fam_like_state()
    _, dec = roundtrip(state, codec="fp32")
    assert list(dec.tensors) == list(state)
    for n, t in state.items():
        assert dec.tensors[n].dtype == torch.float32
        assert torch.equal(dec.tensors[n], t)
        assert dec.present[n].dtype == torch.bool and bool(dec.present[n].all())


def test_fp16_round_trip_relative_error_within_1e_3():
    torch.manual_seed(1)
    state = {"w": torch.randn(64, 32) * 3, "b": torch.randn(64)}
    _, dec = roundtrip(state, codec="fp16")
    for n, t in state.items():
        err = (dec.tensors[n] - t).abs()
        assert bool((err <= 1e-3 * t.abs() + 1e-7).all()), n


@pytest.mark.parametrize("codec,qmax", [("int8", 127), ("int4", 7)])
def test_int_codecs_per_row_error_within_half_a_step(codec, qmax):
    torch.manual_seed(2)
    # rows of very different magnitude, one all-zero row
    w = torch.randn(200, 300) * torch.logspace(-4, 2, 200).unsqueeze(1)
    w[17] = 0.0
    state = {"w": w}
    _, dec = roundtrip(state, codec=codec)
    bound = w.abs().amax(dim=1, keepdim=True) / (2 * qmax) * FP16_SCALE_SLACK + TINY
    err = (dec.tensors["w"] - w).abs()
    assert bool((err <= bound).all())
    assert bool((dec.tensors["w"][17] == 0).all())
    # and the quantiser is not trivially lossless: int4 visibly loses precision
    if codec == "int4":
        assert float(err.max()) > 0


def test_int8_error_bound_on_fam_like_state():
    state = fam_like_state()
    _, dec = roundtrip(state, codec="int8")
    for n in ("fam.fc1.weight", "fam.fc2.weight"):
        w = state[n]
        bound = w.abs().amax(dim=1, keepdim=True) / 254 * FP16_SCALE_SLACK + TINY
        assert bool(((dec.tensors[n] - w).abs() <= bound).all())


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_one_dimensional_tensors_are_stored_as_float16_under_int_codecs(codec):
    torch.manual_seed(3)
    bias = torch.randn(512) * 0.05
    bias[0] = 40.0  # one large entry must not wipe out the small ones (no shared scale)
    _, dec = roundtrip({"bias": bias}, codec=codec)
    err = (dec.tensors["bias"] - bias).abs()
    assert bool((err <= 2.0**-11 * bias.abs() + 1e-7).all())


def test_scale_that_underflows_float16_is_nudged_up_so_no_value_clips():
    # amax/127 = 1.4 * 2**-24 rounds down to 2**-24 in float16; without the nudge the
    # largest value would need q = 178 and clip to 127, a 30 % error.
    amax = 127 * 1.4 * 2.0**-24
    w = torch.tensor([[amax, -amax / 3, amax / 7, 0.0]])
    _, dec = roundtrip({"w": w}, codec="int8")
    err = (dec.tensors["w"] - w).abs()
    assert bool((err <= amax / 254 * 1.01 + TINY).all())


def test_huge_values_fall_back_to_float32_instead_of_overflowing_float16():
    w = torch.tensor([[1e9, -2.5e9, 3.0], [1.0, 2.0, 3.0]])
    v = torch.tensor([1e6, -7e5])
    for codec in CODECS:
        _, dec = roundtrip({"w": w, "v": v}, codec=codec)
        assert bool(torch.isfinite(dec.tensors["w"]).all())
        assert torch.equal(dec.tensors["v"], v)
        if codec in ("fp32", "fp16"):
            assert torch.equal(dec.tensors["w"], w)


def test_higher_dimensional_tensor_rows_are_its_first_axis():
    torch.manual_seed(4)
    t = torch.randn(6, 3, 5)
    mask = torch.tensor([True, False, True, True, False, True])
    _, dec = roundtrip({"t": t}, codec="int8", row_masks={"t": mask})
    assert dec.tensors["t"].shape == t.shape
    assert torch.equal(dec.present["t"], mask)
    assert bool((dec.tensors["t"][~mask] == 0).all())
    bound = t[mask].abs().flatten(1).amax(1).reshape(-1, 1, 1) / 254 * FP16_SCALE_SLACK + TINY
    assert bool(((dec.tensors["t"][mask] - t[mask]).abs() <= bound).all())


def test_encoding_is_deterministic_and_not_a_pickle():
    state = fam_like_state()
    a = encode_state(state, codec="int8")
    b = encode_state(state, codec="int8")
    assert a.data == b.data and a.sha256 == b.sha256
    assert a.sha256 == hashlib.sha256(a.data).hexdigest()
    raw = zstandard.ZstdDecompressor().decompress(a.data)
    assert raw[:4] == b"FMCS"
    assert b"\x80\x04" not in raw[:2]  # pickle protocol marker
    assert payload_codec(a.data) == "int8"


def test_int8_of_512x512_is_one_byte_per_value_and_re_encodes_to_the_same_bytes():
    state = {"w": torch.nn.Linear(D, D).weight.detach().clone()}
    p = encode_state(state, codec="int8")
    dec = decode_state(p.data, sha256=p.sha256, template=template_of(state))
    raw = zstandard.ZstdDecompressor().decompress(p.data)
    _, _, header_len = struct.unpack_from("<4sHI", raw)
    assert len(raw) - struct.calcsize("<4sHI") - header_len == D * 2 + D * D  # a float16 scale per row, int8 codes
    assert p.raw_nbytes == 4 * D * D
    # the decoded values are exact multiples of their row's scale: quantising them again changes nothing
    assert encode_state(dec.tensors, codec="int8").data == p.data


# ----------------------------------------------------------------------- delta mode


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_delta_mode_beats_plain_encoding_when_state_is_close_to_reference(codec):
    reference = fam_like_state(seed=0)
    torch.manual_seed(5)
    state = {n: t + 1e-3 * torch.randn_like(t) for n, t in reference.items()}
    _, plain = roundtrip(state, codec=codec)
    _, delta = roundtrip(state, codec=codec, reference=reference)
    for n in ("fam.fc1.weight", "fam.fc2.weight"):
        e_plain = float((plain.tensors[n] - state[n]).abs().max())
        e_delta = float((delta.tensors[n] - state[n]).abs().max())
        assert e_delta < e_plain / 4, (n, e_plain, e_delta)


def test_delta_payload_without_reference_raises():
    reference = fam_like_state()
    state = {n: t + 0.01 for n, t in reference.items()}
    p = encode_state(state, codec="int8", reference=reference)
    with pytest.raises(ReferenceRequiredError) as exc:
        decode_state(p.data, sha256=p.sha256, template=template_of(state))
    assert isinstance(exc.value, CodecError)


def test_delta_fp32_round_trip_is_exact_up_to_float_rounding():
    reference = fam_like_state(seed=0)
    state = fam_like_state(seed=1)
    _, dec = roundtrip(state, codec="fp32", reference=reference)
    for n, t in state.items():
        assert torch.allclose(dec.tensors[n], t, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------- masked rows


def test_masked_rows_are_left_out_and_filled_from_reference():
    reference = fam_like_state(seed=0)
    state = fam_like_state(seed=1)
    torch.manual_seed(6)
    masks = {
        "fam.fc1.weight": torch.rand(D) < 0.5,
        "fam.fc1.bias": torch.rand(D) < 0.5,
    }
    full = encode_state(state, codec="int8")
    part = encode_state(state, codec="int8", row_masks=masks)
    assert part.wire_nbytes < full.wire_nbytes * 0.85
    assert part.raw_nbytes == full.raw_nbytes  # raw accounting counts all rows

    dec = decode_state(part.data, sha256=part.sha256, template=template_of(state), reference=reference)
    for n, m in masks.items():
        assert torch.equal(dec.present[n], m)
        assert torch.equal(dec.tensors[n][~m], reference[n][~m])
        assert not torch.equal(dec.tensors[n][m], reference[n][m])
    assert bool(dec.present["fam.fc1.threshold"].all())

    no_ref = decode_state(part.data, sha256=part.sha256, template=template_of(state))
    m = masks["fam.fc1.weight"]
    assert bool((no_ref.tensors["fam.fc1.weight"][~m] == 0).all())


def test_masked_rows_in_delta_mode_come_back_as_reference():
    reference = fam_like_state(seed=0)
    state = {n: t + 0.01 for n, t in reference.items()}
    mask = torch.zeros(D, dtype=torch.bool)
    mask[:10] = True
    _, dec = roundtrip(state, codec="fp32", reference=reference, row_masks={"fam.fc2.weight": mask})
    w = dec.tensors["fam.fc2.weight"]
    assert torch.equal(w[10:], reference["fam.fc2.weight"][10:])
    assert torch.allclose(w[:10], state["fam.fc2.weight"][:10], atol=1e-6)


def test_all_rows_masked_off_costs_almost_nothing():
    state = {"w": torch.randn(D, D)}
    p = encode_state(state, codec="fp32", row_masks={"w": torch.zeros(D, dtype=torch.bool)})
    assert p.wire_nbytes < 300
    dec = decode_state(p.data, sha256=p.sha256, template=template_of(state))
    assert not bool(dec.present["w"].any())


def test_bad_row_mask_is_rejected():
    state = {"w": torch.randn(4, 3)}
    with pytest.raises(ShapeMismatchError):
        encode_state(state, row_masks={"w": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ShapeMismatchError):
        encode_state(state, row_masks={"w": torch.ones(4)})
    with pytest.raises(ShapeMismatchError):
        encode_state(state, row_masks={"nope": torch.ones(4, dtype=torch.bool)})


# ----------------------------------------------------------------------- wire sizes


def test_wire_sizes_of_a_fam_like_state(capsys):
    state = fam_like_state()
    sizes = {c: encode_state(state, codec=c) for c in CODECS}
    with capsys.disabled():
        print()
        for c, p in sizes.items():
            print(f"  FAM D={D} {c:>5}: wire {p.wire_nbytes:>9,d} B  raw {p.raw_nbytes:>9,d} B")
    assert sizes["int8"].wire_nbytes <= 0.55e6
    assert sizes["fp32"].wire_nbytes > sizes["fp16"].wire_nbytes > sizes["int8"].wire_nbytes > sizes["int4"].wire_nbytes
    assert all(p.raw_nbytes == 4 * sum(t.numel() for t in state.values()) for p in sizes.values())


# ----------------------------------------------------------------------- typed errors


def test_all_codec_errors_derive_from_project_base():
    for cls in (
        UnknownCodecError,
        ChecksumMismatchError,
        ShapeMismatchError,
        NonFiniteError,
        PayloadTooLargeError,
        MalformedPayloadError,
        ReferenceRequiredError,
    ):
        assert issubclass(cls, CodecError) and issubclass(cls, FedMedCLIPError)


def test_wrong_sha256_raises_checksum_mismatch():
    state = fam_like_state()
    p = encode_state(state)
    with pytest.raises(ChecksumMismatchError):
        decode_state(p.data, sha256="0" * 64, template=template_of(state))
    flipped = bytearray(p.data)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(ChecksumMismatchError):
        decode_state(bytes(flipped), sha256=p.sha256, template=template_of(state))


def test_corruption_without_sha256_is_still_caught_by_the_frame_checksum():
    state = fam_like_state()
    p = encode_state(state, codec="fp32")
    flipped = bytearray(p.data)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(MalformedPayloadError):
        decode_state(bytes(flipped), sha256=None, template=template_of(state))


def test_wrong_shape_in_template_raises_shape_mismatch():
    state = fam_like_state(d=16)
    p = encode_state(state)
    tmpl = template_of(state)
    tmpl["fam.fc1.weight"] = (16, 17)
    with pytest.raises(ShapeMismatchError):
        decode_state(p.data, sha256=p.sha256, template=tmpl)


def test_missing_or_extra_tensor_name_raises_shape_mismatch():
    state = fam_like_state(d=16)
    p = encode_state(state)
    missing = template_of(state)
    del missing["fam.fc2.threshold"]  # payload has a tensor the receiver does not expect
    with pytest.raises(ShapeMismatchError):
        decode_state(p.data, sha256=p.sha256, template=missing)
    extra = template_of(state)
    extra["fam.fc3.weight"] = (16, 16)  # receiver expects a tensor the payload lacks
    with pytest.raises(ShapeMismatchError):
        decode_state(p.data, sha256=p.sha256, template=extra)


def test_reference_that_does_not_match_template_raises_shape_mismatch():
    state = fam_like_state(d=16)
    p = encode_state(state)
    bad_ref = dict(state)
    bad_ref["fam.fc1.bias"] = torch.zeros(15)
    with pytest.raises(ShapeMismatchError):
        decode_state(p.data, sha256=p.sha256, template=template_of(state), reference=bad_ref)
    with pytest.raises(ShapeMismatchError):
        encode_state(state, reference=bad_ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_state_is_refused_on_encode(bad):
    state = fam_like_state(d=16)
    state["fam.fc1.weight"][3, 4] = bad
    for codec in CODECS:
        with pytest.raises(NonFiniteError):
            encode_state(state, codec=codec)


def test_delta_that_overflows_float32_is_refused_on_encode():
    state = {"w": torch.full((2, 2), 3e38)}
    reference = {"w": torch.full((2, 2), -3e38)}
    with pytest.raises(NonFiniteError):
        encode_state(state, codec="fp32", reference=reference)


@pytest.mark.parametrize(
    "enc,body",
    [
        ("f32", np.array([1.0, np.nan, 2.0, 3.0], "<f4").tobytes()),
        ("f32", np.array([1.0, np.inf, 2.0, 3.0], "<f4").tobytes()),
        ("f16", np.array([1.0, 2.0, -np.inf, 3.0], "<f2").tobytes()),
        # int8 with a NaN scale on row 1
        ("q8", np.array([0.5, np.nan], "<f2").tobytes() + bytes([1, 2, 3, 4])),
        # int8 with an Inf scale on row 0
        ("q8", np.array([np.inf, 0.5], "<f2").tobytes() + bytes([1, 2, 3, 4])),
    ],
)
def test_non_finite_values_in_a_crafted_payload_raise_on_decode(enc, body):
    codec = {"f32": "fp32", "f16": "fp16", "q8": "int8"}[enc]
    header = {
        "codec": codec,
        "delta": False,
        "tensors": [{"name": "w", "shape": [2, 2], "enc": enc, "masked": False}],
    }
    data = craft(header, body)
    with pytest.raises(NonFiniteError):
        decode_state(data, sha256=hashlib.sha256(data).hexdigest(), template={"w": (2, 2)})


def test_crafted_well_formed_payload_decodes():
    """The hand-crafting helper matches the format, so the hostile tests test what they claim."""
    header = {
        "codec": "fp32",
        "delta": False,
        "tensors": [{"name": "w", "shape": [2, 2], "enc": "f32", "masked": False}],
    }
    data = craft(header, np.array([1, 2, 3, 4], "<f4").tobytes())
    dec = decode_state(data, sha256=None, template={"w": (2, 2)})
    assert torch.equal(dec.tensors["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def _zero_bomb(total: int, *, declare: bool) -> bytes:
    """zstd frame of ``total`` zero bytes, built in 1 MiB steps (never 200 MB in memory)."""
    cctx = zstandard.ZstdCompressor(level=1)
    cobj = cctx.compressobj(size=total) if declare else cctx.compressobj()
    chunk = bytes(1 << 20)
    parts = [cobj.compress(chunk) for _ in range(total // len(chunk))]
    parts.append(cobj.flush())
    return b"".join(parts)


@pytest.mark.parametrize("declare", [True, False])
def test_zstd_bomb_is_refused_without_allocating_it(declare):
    """Declared: over the cap, refused from its frame header. Undeclared: refused before a byte is decompressed
    (every payload declares its size), not after 64 MiB of output."""
    bomb = _zero_bomb(200 * (1 << 20), declare=declare)
    assert len(bomb) < 100_000
    sha = hashlib.sha256(bomb).hexdigest()
    error = PayloadTooLargeError if declare else MalformedPayloadError
    tracemalloc.start()
    try:
        with pytest.raises(error):
            decode_state(bomb, sha256=sha, template={"w": (2, 2)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < DEFAULT_MAX_DECOMPRESSED_BYTES + 8 * (1 << 20) < 200 * (1 << 20)
    # and a tight caller limit keeps the peak tight too
    tracemalloc.start()
    try:
        with pytest.raises(error):
            decode_state(bomb, sha256=None, template={"w": (2, 2)}, max_decompressed_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * (1 << 20)
    if not declare:  # nothing was decompressed at all
        assert peak < 1 << 20


def _valid_prefix_and_header(template: dict[str, tuple[int, ...]]) -> bytes:
    entries = [{"name": n, "shape": list(s), "enc": "f32", "masked": False} for n, s in template.items()]
    hb = json.dumps({"codec": "fp32", "delta": False, "tensors": entries}).encode()
    return struct.pack("<4sHI", b"FMCS", 1, len(hb)) + hb


def _frame(raw_head: bytes, zeros: int, declared: int | None) -> bytes:
    """A zstd frame of ``raw_head`` then ``zeros`` zero bytes, declaring ``declared`` (None: the true size)."""
    total = len(raw_head) + zeros
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=total)
    chunk = bytes(1 << 20)
    parts = [cobj.compress(raw_head)] + [cobj.compress(chunk) for _ in range(zeros // len(chunk))]
    parts += [cobj.compress(bytes(zeros % len(chunk))), cobj.flush()]
    data = bytearray(b"".join(parts))
    if declared is not None:  # lie: rewrite the Frame_Content_Size field of the frame header
        fhd = data[4]
        assert fhd >> 6 == 2, "a 4-byte content size field"
        offset = 5 + (0 if fhd & 0x20 else 1) + [0, 1, 2, 4][fhd & 0x03]
        data[offset : offset + 4] = struct.pack("<I", declared)
    assert zstandard.frame_content_size(bytes(data)) == (declared if declared is not None else total)
    return bytes(data)


def test_decompression_is_bounded_by_the_template_not_by_the_64_mib_cap():
    template = {"w": (16, 16), "b": (16,)}
    head = _valid_prefix_and_header(template)
    bound = len(head) + max_body_nbytes(template)
    assert max_body_nbytes(template) == 2 + 4 * 256 + 2 + 4 * 16
    # honest about a size far over what the template allows: refused after reading the header alone
    big = _frame(head, 30 << 20, None)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLargeError, match="template allows"):
            decode_state(big, sha256=None, template=template)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # lying: declares a size the template allows, holds 96 MiB: stopped one byte past the declared size
    liar = _frame(head, 96 << 20, bound)
    tracemalloc.start()
    try:
        with pytest.raises((MalformedPayloadError, PayloadTooLargeError)):
            decode_state(liar, sha256=None, template=template)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("number", ["9" * 5000, "-" + "9" * 5000, "1" * 19, "1.5", "1e400", "NaN", "Infinity"])
def test_a_header_number_that_is_not_a_small_integer_is_malformed_not_a_crash(number):
    """A 5,000-digit integer once hit Python's int-string limit (ValueError, not a CodecError)."""
    header = (
        '{"codec":"fp32","delta":false,"tensors":[{"name":"w","shape":[' + number + ',2],"enc":"f32","masked":false}]}'
    ).encode()
    data = zstandard.ZstdCompressor().compress(
        struct.pack("<4sHI", b"FMCS", 1, len(header)) + header + np.zeros(4, "<f4").tobytes()
    )
    with pytest.raises(MalformedPayloadError):
        decode_state(data, sha256=None, template={"w": (2, 2)})
    with pytest.raises(MalformedPayloadError):
        payload_info(data)


def test_payload_info_reads_codec_and_delta_from_the_header_alone():
    state = fam_like_state(d=16)
    assert payload_info(encode_state(state, codec="int4").data) == payload_info(encode_state(state, codec="int4").data)
    info = payload_info(encode_state(state, codec="fp16", reference=state).data)
    assert (info.codec, info.delta) == ("fp16", True)
    assert payload_codec(encode_state(state).data) == "int8"


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_a_mutated_payload_raises_a_codec_error_and_nothing_else(data):
    """Any change to a valid payload's decompressed bytes ends in a typed CodecError (or decodes)."""
    state = fam_like_state(d=8)
    codec = data.draw(st.sampled_from(CODECS))
    raw = bytearray(zstandard.ZstdDecompressor().decompress(encode_state(state, codec=codec).data))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(raw) - 1))
        raw[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(raw)))
        raw = raw[:cut] + bytearray(data.draw(st.binary(max_size=64)))
    payload = zstandard.ZstdCompressor().compress(bytes(raw))
    try:
        decode_state(payload, sha256=None, template=template_of(state), reference=state)
    except CodecError:
        pass
    try:
        payload_info(payload)
    except CodecError:
        pass


def test_compressed_payload_over_limit_raises_payload_too_large():
    state = fam_like_state(d=64)
    p = encode_state(state, codec="fp32")
    with pytest.raises(PayloadTooLargeError):
        decode_state(p.data, sha256=p.sha256, template=template_of(state), max_payload_bytes=1000)


@pytest.mark.parametrize("cut", [1, 5, 20, 0.5])
def test_truncated_payload_raises_malformed(cut):
    state = fam_like_state(d=32)
    p = encode_state(state, codec="fp32")
    n = int(len(p.data) * cut) if isinstance(cut, float) else len(p.data) - cut
    with pytest.raises(MalformedPayloadError):
        decode_state(p.data[:n], sha256=None, template=template_of(state))


def test_trailing_bytes_after_the_frame_raise_malformed():
    state = fam_like_state(d=16)
    p = encode_state(state)
    for tail in (b"\x00", b"\x28\xb5\x2f", p.data):
        with pytest.raises(MalformedPayloadError):
            decode_state(p.data + tail, sha256=None, template=template_of(state))


def test_random_bytes_raise_malformed():
    rng = np.random.default_rng(7)
    for n in (0, 3, 64, 4096):
        junk = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        with pytest.raises(MalformedPayloadError):
            decode_state(junk, sha256=None, template={"w": (2, 2)})
    with pytest.raises(MalformedPayloadError):
        payload_codec(os.urandom(50))


def test_valid_zstd_with_bad_magic_version_or_header_raises_malformed():
    good_header = {
        "codec": "fp32",
        "delta": False,
        "tensors": [{"name": "w", "shape": [2, 2], "enc": "f32", "masked": False}],
    }
    body = np.zeros(4, "<f4").tobytes()
    bad = [
        craft(good_header, body, magic=b"PKL\x00"),
        craft(good_header, body, version=99),
        craft(good_header, body + b"\x00"),  # body too long
        craft(good_header, body[:-1]),  # body too short
        craft({**good_header, "extra": 1}, body),
        craft({**good_header, "delta": "yes"}, body),
        craft({**good_header, "tensors": [{"name": "w", "shape": [2, 2], "enc": "q8", "masked": False}]}, body),
        craft({**good_header, "tensors": [{"name": "w", "shape": [-2, 2], "enc": "f32", "masked": False}]}, body),
        craft({**good_header, "tensors": good_header["tensors"] * 2}, body + body),
        zstandard.ZstdCompressor().compress(b"FMCS\x01\x00\xff\xff\xff\x7f"),  # huge header length
        zstandard.ZstdCompressor().compress(b"FMCS\x01\x00\x05\x00\x00\x00{bad}"),
    ]
    for data in bad:
        with pytest.raises(MalformedPayloadError):
            decode_state(data, sha256=None, template={"w": (2, 2)})


def test_int_payload_with_out_of_range_codes_raises_malformed():
    scales = np.array([0.5, 0.5], "<f2").tobytes()
    h8 = {"codec": "int8", "delta": False, "tensors": [{"name": "w", "shape": [2, 2], "enc": "q8", "masked": False}]}
    with pytest.raises(MalformedPayloadError):
        decode_state(craft(h8, scales + bytes([0x80, 1, 2, 3])), sha256=None, template={"w": (2, 2)})
    h4 = {**h8, "codec": "int4", "tensors": [{"name": "w", "shape": [2, 2], "enc": "q4", "masked": False}]}
    with pytest.raises(MalformedPayloadError):
        decode_state(craft(h4, scales + bytes([0xF7, 0x77])), sha256=None, template={"w": (2, 2)})


def test_unknown_codec_raises_on_encode_and_on_decode():
    with pytest.raises(UnknownCodecError):
        encode_state({"w": torch.zeros(2, 2)}, codec="int3")
    header = {
        "codec": "bf16",
        "delta": False,
        "tensors": [{"name": "w", "shape": [2, 2], "enc": "f32", "masked": False}],
    }
    data = craft(header, np.zeros(4, "<f4").tobytes())
    with pytest.raises(UnknownCodecError):
        decode_state(data, sha256=None, template={"w": (2, 2)})
    with pytest.raises(UnknownCodecError):
        payload_codec(data)


def test_non_float_or_scalar_tensors_are_refused_on_encode():
    with pytest.raises(CodecError):
        encode_state({"w": torch.zeros(2, 2, dtype=torch.int64)})
    with pytest.raises(ShapeMismatchError):
        encode_state({"w": torch.tensor(1.0)})


def test_decompressed_limit_is_inclusive_and_exact():
    state = fam_like_state(d=16)
    p = encode_state(state, codec="fp32")
    size = len(zstandard.ZstdDecompressor().decompress(p.data))
    tmpl = template_of(state)
    decode_state(p.data, sha256=p.sha256, template=tmpl, max_decompressed_bytes=size)
    with pytest.raises(PayloadTooLargeError):
        decode_state(p.data, sha256=p.sha256, template=tmpl, max_decompressed_bytes=size - 1)
