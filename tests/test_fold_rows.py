"""The aggregator's fast fold (decode to sent rows, fold rows into the running sums) against references.

:func:`shared.learning.rounds.fold_update` decodes each update to the rows it sent
(:func:`shared.codec.decode_rows`, written into the aggregator's reusable workspace), bounds it from those
rows (:func:`shared.learning.rounds.check_bounds`) and folds them (:meth:`Aggregator.add_rows`). These
tests hold it to (1) a straightforward reference written here from the wire format alone (numpy, one row at
a time), (2) the full-tensor path (:func:`shared.codec.decode_state` + :meth:`Aggregator.add`), bit for
bit, and (3) the hostile cases: every refusal leaves the running average exactly as it was.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import zstandard

from shared.codec import (
    ChecksumMismatchError,
    MalformedPayloadError,
    NonFiniteError,
    ShapeMismatchError,
    decode_rows,
    decode_state,
    encode_state,
)
from shared.learning.aggregation import make_aggregator
from shared.learning.rounds import (
    UpdateBounds,
    UpdateNormTooLargeError,
    UpdateValueTooLargeError,
    WireConfig,
    WireMismatchError,
    check_bounds,
    decode_adapter,
    decode_adapter_rows,
    fold_update,
    row_masks_of,
)

D = 48  # rows of the FAM-like weights; big enough for masks and several int8 rows, small enough to be quick


def fam_state(seed: int, d: int = D) -> dict[str, torch.Tensor]:
    """A FAM-shaped state whose thresholds switch some rows off (so masked rows are left out of payloads)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in ("fc1", "fc2"):
        w = torch.randn(d, d, generator=g) * torch.rand(d, 1, generator=g)
        state[f"{layer}.weight"] = w
        state[f"{layer}.bias"] = torch.randn(d, generator=g) * 0.1
        score = w.abs().mean(dim=1)
        state[f"{layer}.threshold"] = torch.full((d,), float(score.quantile(0.25)))  # about a quarter off
    return state


def payloads(n: int, codec: str, delta: bool, reference: dict[str, torch.Tensor]) -> list:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in reference.items()}
        out.append(
            encode_state(state, codec=codec, row_masks=row_masks_of(state), reference=reference if delta else None)
        )
    return out


def reference_decode(data: bytes, reference: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The wire format read by hand: name -> (present rows, float32 full tensor with the reference's other rows)."""
    raw = zstandard.ZstdDecompressor().decompress(data)
    magic, version, hlen = struct.unpack_from("<4sHI", raw, 0)
    assert (magic, version) == (b"FMCS", 1)
    header = json.loads(raw[10 : 10 + hlen])
    off = 10 + hlen
    out = {}
    for e in header["tensors"]:
        shape = tuple(e["shape"])
        rows, row_len = shape[0], int(np.prod(shape[1:], dtype=np.int64))
        if e["masked"]:
            nb = (rows + 7) // 8
            present = np.unpackbits(np.frombuffer(raw, np.uint8, nb, off), bitorder="little")[:rows].astype(bool)
            off += nb
        else:
            present = np.ones(rows, dtype=bool)
        full = reference[e["name"]].numpy().astype(np.float32).reshape(rows, row_len).copy()
        k = int(present.sum())
        for j, i in enumerate(np.flatnonzero(present)):  # one row at a time: the plainest reading
            if e["enc"] == "q8":
                scale = np.frombuffer(raw, "<f2", 1, off + 2 * j).astype(np.float32)[0]
                q = np.frombuffer(raw, np.int8, row_len, off + 2 * k + j * row_len).astype(np.float32)
                value = (q * scale).astype(np.float32)
            elif e["enc"] == "q4":
                scale = np.frombuffer(raw, "<f2", 1, off + 2 * j).astype(np.float32)[0]
                packed = np.frombuffer(raw, np.uint8, (k * row_len + 1) // 2, off + 2 * k)
                nib = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[: k * row_len]
                value = ((nib[j * row_len : (j + 1) * row_len].astype(np.float32) - 7.0) * scale).astype(np.float32)
            else:
                size = 4 if e["enc"] == "f32" else 2
                value = np.frombuffer(raw, "<f4" if size == 4 else "<f2", row_len, off + size * j * row_len)
                value = value.astype(np.float32)
            full[i] = (full[i] + value) if header["delta"] else value
        n_vals = k * row_len
        off += {"q8": 2 * k + n_vals, "q4": 2 * k + (n_vals + 1) // 2, "f32": 4 * n_vals, "f16": 2 * n_vals}[e["enc"]]
        out[e["name"]] = (present, full.reshape(shape))
    assert off == len(raw)
    return out


def reference_weighted_mean(
    decoded: list[dict[str, tuple[np.ndarray, np.ndarray]]], weights: list[float], previous: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The weighted mean per row over the updates that sent it, in float64; rows nobody sent keep ``previous``."""
    out = {}
    for name, prev in previous.items():
        num = np.zeros(prev.shape, dtype=np.float64)
        den = np.zeros(prev.shape[0], dtype=np.float64)
        for upd, w in zip(decoded, weights):
            present, full = upd[name]
            num[present] += w * full[present].astype(np.float64)
            den[present] += w
        mean = num / np.where(den > 0, den, 1.0).reshape(-1, *([1] * (num.ndim - 1)))
        keep = (den > 0).reshape(-1, *([1] * (num.ndim - 1)))
        out[name] = torch.from_numpy(np.where(keep, mean.astype(np.float32), prev.numpy()))
    return out


@pytest.mark.parametrize(("codec", "delta"), [("int8", False), ("int8", True), ("int4", False), ("fp16", True)])
def test_fast_fold_equals_a_plain_reference_and_the_full_tensor_path_bit_for_bit(codec, delta):
    g0 = fam_state(0)
    wire = WireConfig(codec=codec, delta=delta)
    ps = payloads(7, codec, delta, g0)
    weights = [float(37 + 11 * i) for i in range(len(ps))]
    fast, full = make_aggregator("weighted"), make_aggregator("weighted")
    for p, w in zip(ps, weights):
        fold_update(fast, p.data, p.sha256, g0, w, wire)
        decoded = decode_adapter(p.data, p.sha256, g0, wire)
        full.add(decoded.tensors, decoded.present, num_samples=w)
    assert any(not bool(pres.all()) for pres in decoded.present.values())  # masked rows were exercised
    got, old = fast.result(g0), full.result(g0)
    plain = reference_weighted_mean([reference_decode(p.data, g0) for p in ps], weights, g0)
    for name in g0:
        assert torch.equal(got[name], old[name]), name  # the same float64 arithmetic, bit for bit
        torch.testing.assert_close(got[name], plain[name], rtol=0, atol=0)  # and the plain reading exactly
    assert fast.count == full.count == len(ps)


def test_decode_rows_gives_the_sent_rows_of_decode_state_and_reuses_the_buffers():
    g0 = fam_state(1)
    p = payloads(1, "int8", True, g0)[0]
    template = {k: tuple(v.shape) for k, v in g0.items()}
    state = decode_state(p.data, sha256=p.sha256, template=template, reference=g0)
    buffers = {k: torch.full(s, float("nan")) for k, s in template.items()}
    rows = decode_rows(p.data, sha256=p.sha256, template=template, reference=g0, out=buffers)
    for name, t in state.tensors.items():
        assert torch.equal(rows.present[name], state.present[name])
        assert torch.equal(rows.rows[name], t[state.present[name]])
        assert rows.rows[name].data_ptr() == buffers[name].data_ptr()  # written in place, no new tensor
        assert rows.complete[name] == bool(state.present[name].all())
        assert rows.shape(name) == template[name]
    with pytest.raises(ShapeMismatchError):
        decode_rows(p.data, sha256=None, template=template, reference=g0, out={k: torch.zeros(2) for k in template})


def test_bounds_from_the_sent_rows_equal_those_of_the_full_decoded_tensors():
    g0 = fam_state(2)
    wire = WireConfig()
    for p in payloads(4, "int8", False, g0):
        full = decode_adapter(p.data, p.sha256, g0, wire).tensors
        rows = decode_adapter_rows(p.data, p.sha256, g0, wire)
        peak = max(float(t.abs().max()) for t in full.values())
        norm = sum(float(torch.linalg.vector_norm(full[k] - g0[k])) ** 2 for k in full) ** 0.5
        for bounds, error in (
            (UpdateBounds(max_abs_value=peak * (1 - 1e-6)), UpdateValueTooLargeError),
            (UpdateBounds(max_update_norm=norm * (1 - 1e-5)), UpdateNormTooLargeError),
        ):
            with pytest.raises(error):
                check_bounds(rows, g0, bounds)
        fine = UpdateBounds(max_abs_value=peak, max_update_norm=norm * (1 + 1e-5))
        check_bounds(rows, g0, fine)
        name = next(iter(rows.rows))
        rows.rows[name][0, 0] = float("nan")  # a NaN compares false with any bound: it is refused by name
        with pytest.raises(UpdateValueTooLargeError, match="NaN or Inf"):
            check_bounds(rows, g0, fine)


def _nan_payload(g0: dict[str, torch.Tensor]) -> bytes:
    """A well-formed int8 payload whose float16 threshold holds NaN (past the encoder's own check)."""
    state = {k: v.clone() for k, v in g0.items()}
    state["fc1.threshold"][3] = float("nan")
    from unittest import mock

    with mock.patch("shared.codec._check_finite", lambda *a, **k: None):
        return encode_state(state, codec="int8").data


def test_refused_updates_leave_the_running_average_exactly_as_it_was():
    """Malformed, wrong shape, wrong codec, NaN, out of bounds: the typed error, and no trace in the average,
    though a refused payload may have been decoded part-way into the workspace the next fold reuses."""
    g0 = fam_state(3)
    wire = WireConfig()
    good = payloads(3, "int8", False, g0)
    bounds = UpdateBounds(max_update_norm=50.0, max_abs_value=100.0)
    big = {k: v.clone() for k, v in g0.items()}
    big["fc2.weight"][0, 0] = 500.0  # over max_abs_value
    far = {k: v + 2.0 for k, v in g0.items()}  # moves the global by far more than max_update_norm
    other_shape = {k: (v[:-1] if k.startswith("fc2") else v) for k, v in g0.items()}
    hostile = [
        (good[1].data[: len(good[1].data) // 2], MalformedPayloadError),
        (good[1].data + b"\0", MalformedPayloadError),
        (_nan_payload(g0), NonFiniteError),
        (encode_state(other_shape, codec="int8").data, ShapeMismatchError),
        (encode_state(g0, codec="fp16").data, WireMismatchError),
        (encode_state(big, codec="int8").data, UpdateValueTooLargeError),
        (encode_state(far, codec="int8").data, UpdateNormTooLargeError),
    ]
    agg = make_aggregator("weighted")
    fold_update(agg, good[0].data, good[0].sha256, g0, 10.0, wire, bounds)
    before = agg.result(g0)
    for data, error in hostile:
        with pytest.raises(error):
            fold_update(agg, data, None, g0, 10.0, wire, bounds)
        assert agg.count == 1
        after = agg.result(g0)
        assert all(torch.equal(after[k], before[k]) for k in g0)
    with pytest.raises(ChecksumMismatchError):  # a wrong hash: refused as well
        fold_update(agg, good[1].data, "0" * 64, g0, 10.0, wire, bounds)
    for p in good[1:]:
        fold_update(agg, p.data, p.sha256, g0, 10.0, wire, bounds)
    clean = make_aggregator("weighted")
    for p in good:
        fold_update(clean, p.data, p.sha256, g0, 10.0, wire, bounds)
    got, expected = agg.result(g0), clean.result(g0)
    assert all(torch.equal(got[k], expected[k]) for k in g0)


@pytest.mark.parametrize("rule", ["uniform", "median", "trimmed_mean"])
def test_every_rule_folds_rows_as_it_folds_full_tensors(rule):
    g0 = fam_state(4)
    wire = WireConfig()
    rows_agg, full_agg = make_aggregator(rule), make_aggregator(rule)
    for i, p in enumerate(payloads(5, "int8", False, g0)):
        fold_update(rows_agg, p.data, p.sha256, g0, 5.0 + i, wire)
        decoded = decode_adapter(p.data, p.sha256, g0, wire)
        full_agg.add(decoded.tensors, decoded.present, num_samples=5.0 + i)
    got, expected = rows_agg.result(g0), full_agg.result(g0)
    assert all(torch.equal(got[k], expected[k]) for k in g0)
