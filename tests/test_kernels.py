"""The compiled per-update loops (:mod:`shared.kernels`) against the numpy arithmetic they replace.

The float64 fold must be bit-identical; magnitudes exact; finiteness right for every kind of NaN and Inf;
the squared norm equal to a float64 reference within float32 rounding. numba checks no index, so each
kernel's own guards are tested too: a bad index or shape raises and writes nothing. And a process that
never folds (a node) never loads numba.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import kernels
from shared.codec import MalformedPayloadError, decode_rows, encode_state

F32_MAX = np.finfo(np.float32).max


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), length=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_dequantize_q8_is_numpys_float32_product_bit_for_bit(rows, length, seed):
    g = _rng(seed)
    q = g.integers(-127, 128, (rows, length)).astype(np.int8)
    scales = (g.random(rows) * 3).astype(np.float16).astype(np.float32)
    out = np.full((rows, length), np.nan, dtype=np.float32)
    low = kernels.dequantize_q8(q, scales, out)
    assert np.array_equal(out, np.multiply(q, scales[:, None], dtype=np.float32))
    assert low == min(0, int(q.min()) if q.size else 0)


def test_dequantize_q8_reports_minus_128_and_refuses_mismatched_shapes():
    q = np.zeros((3, 4), dtype=np.int8)
    q[2, 1] = -128
    assert kernels.dequantize_q8(q, np.ones(3, np.float32), np.empty((3, 4), np.float32)) == -128
    with pytest.raises(ValueError, match="shape"):
        kernels.dequantize_q8(q, np.ones(3, np.float32), np.empty((3, 5), np.float32))
    with pytest.raises(ValueError, match="scales"):
        kernels.dequantize_q8(q, np.ones(2, np.float32), np.empty((3, 4), np.float32))


def test_the_compiled_decoding_gives_the_same_rows_and_refuses_the_same_payloads():
    reference = {"w": torch.randn(6, 5), "b": torch.randn(6)}
    state = {k: v + 0.1 * torch.randn(v.shape) for k, v in reference.items()}
    template = {k: tuple(v.shape) for k, v in reference.items()}
    payload = encode_state(state, codec="int8")
    numpy_rows = decode_rows(payload.data, sha256=payload.sha256, template=template, reference=reference)
    compiled_rows = decode_rows(payload.data, sha256=None, template=template, reference=reference, compiled=True)
    assert all(torch.equal(numpy_rows.rows[k], compiled_rows.rows[k]) for k in template)
    # one int8 value made -128, and the payload framed again: only that value is wrong (the int8 section of a
    # lone two-dimensional tensor ends the body)
    weights = {"w": state["w"]}
    raw = bytearray(zstandard.ZstdDecompressor().decompress(encode_state(weights, codec="int8").data))
    raw[-1] = 0x80
    bad = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(raw))
    for compiled in (False, True):
        with pytest.raises(MalformedPayloadError, match="-128"):
            decode_rows(bad, sha256=None, template={"w": (6, 5)}, compiled=compiled)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 30), sent=st.integers(0, 30), length=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_row_stats_gives_the_exact_peak_and_the_norm_of_the_difference(rows, sent, length, seed):
    g = _rng(seed)
    reference = g.standard_normal((rows, length)).astype(np.float32)
    index = np.sort(g.choice(rows, size=min(sent, rows), replace=False)).astype(np.int64)
    x = (g.standard_normal((index.size, length)) * 10).astype(np.float32)
    finite, peak, squares = kernels.row_stats(x, reference, index)
    assert finite
    assert peak == (np.abs(x).max() if x.size else 0.0)  # exact: magnitudes are compared, not summed
    expected = ((x.astype(np.float64) - reference[index].astype(np.float64)) ** 2).sum()
    assert squares == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_row_stats_and_rows_peak_see_every_nan_and_inf(bad):
    x = np.ones((4, 9), dtype=np.float32)
    x[3, 8] = bad
    rows = kernels.all_rows(4)
    assert not kernels.row_stats(x, np.zeros((4, 9), np.float32), rows)[0]
    assert not kernels.rows_peak(x, rows)[0]
    assert kernels.rows_peak(x, rows[:3]) == (True, 1.0)  # the bad row not among those asked for


def test_the_largest_finite_values_and_subnormals_are_finite():
    x = np.array([[F32_MAX, -F32_MAX, np.float32(1e-45), -0.0]], dtype=np.float32)
    finite, peak = kernels.rows_peak(x, kernels.all_rows(1))
    assert finite and peak == F32_MAX
    assert kernels.row_stats(x, np.zeros_like(x), kernels.all_rows(1))[:2] == (True, F32_MAX)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 30),
    length=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    weights=st.lists(st.floats(0.01, 1e4), min_size=1, max_size=4),
)
def test_fold_rows_is_the_plain_float64_sum_bit_for_bit(rows, length, seed, weights):
    g = _rng(seed)
    sums, row_weights = np.zeros((rows, length)), np.zeros(rows)
    expected, expected_weights = np.zeros((rows, length)), np.zeros(rows)
    for w in weights:
        index = np.sort(g.choice(rows, size=int(g.integers(0, rows + 1)), replace=False)).astype(np.int64)
        x = g.standard_normal((index.size, length)).astype(np.float32)
        kernels.fold_rows(sums, row_weights, x, index, w)
        expected[index] += w * x.astype(np.float64)  # a rounded product, then a rounded sum: no fused multiply-add
        expected_weights[index] += w
    assert np.array_equal(sums, expected) and np.array_equal(row_weights, expected_weights)


def test_a_row_index_outside_the_arrays_raises_and_writes_nothing():
    sums, weights = np.zeros((3, 2)), np.zeros(3)
    x = np.ones((2, 2), dtype=np.float32)
    for index in ([0, 3], [-1, 0]):
        with pytest.raises(IndexError):
            kernels.fold_rows(sums, weights, x, np.array(index, dtype=np.int64), 1.0)
        with pytest.raises(IndexError):
            kernels.row_stats(x, np.zeros((3, 2), np.float32), np.array(index, dtype=np.int64))
        with pytest.raises(IndexError):
            kernels.rows_peak(np.zeros((3, 2), np.float32), np.array(index, dtype=np.int64))
    assert not sums.any() and not weights.any()
    with pytest.raises(ValueError):
        kernels.fold_rows(sums, weights, x, np.array([0], dtype=np.int64), 1.0)  # fewer indices than rows
    with pytest.raises(ValueError):
        kernels.fold_rows(sums, weights, np.ones((2, 3), np.float32), np.array([0, 1], dtype=np.int64), 1.0)
    with pytest.raises(ValueError):
        kernels.row_stats(x, np.zeros((3, 5), np.float32), np.array([0, 1], dtype=np.int64))
    assert not sums.any() and not weights.any()


def test_as_rows_views_a_tensor_by_its_rows():
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    view = kernels.as_rows(t)
    assert view.shape == (2, 12) and np.shares_memory(view, t.numpy())
    assert kernels.as_rows(torch.arange(5, dtype=torch.float32)).shape == (5, 1)
    assert kernels.as_rows(torch.zeros(0, 7)).shape == (0, 7)
    assert kernels.as_rows(torch.ones(2, 2, dtype=torch.float64)).dtype == np.float32  # a copy, for reading


def test_a_kernel_without_a_writable_cache_location_is_still_compiled():
    # numba finds no cache location for code without a source file: the case of a read-only install with no
    # writable home, where the decorator raises; the kernel must then compile in memory instead
    namespace: dict = {}
    exec("def double(x):\n    return 2 * x\n", namespace)  # noqa: S102 (a function with no source file)
    with pytest.raises(RuntimeError, match="cannot cache"):
        __import__("numba").njit(cache=True)(namespace["double"])
    assert kernels._compile()(namespace["double"])(21) == 42


def test_a_node_decoding_globals_never_loads_numba():
    # numba and LLVM cost a process about 100 MB: only a process that folds may load them
    script = textwrap.dedent(
        """
        import sys
        import hospital_node.client  # everything a node daemon imports
        from bench.light_client import Federation, encode, perturbed
        from shared.learning.rounds import WireConfig, decode_adapter

        reference = Federation().initial_state()
        payload = encode(perturbed(reference, 0.01, 0), reference)
        decode_adapter(payload.data, payload.sha256, reference, WireConfig())  # what a node does with a global
        assert "numba" not in sys.modules, "a node loaded numba"

        from shared import kernels
        kernels.warm_up()  # the aggregator's start-up
        assert "numba" in sys.modules
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
