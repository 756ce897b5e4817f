"""Compiled loops (numba) for the aggregator's per-update hot path.

An update is about 0.5 M values. Checked and folded with numpy and torch, each step was a pass of its own
over a float32 or float64 copy: dequantise, look for -128, look for NaN/Inf (twice), find the largest
magnitude, subtract the reference, take the norm, widen to float64, add. The kernels here do those steps in
one pass each group, without the GIL: :func:`dequantize_q8` (the fold's decoding), :func:`row_stats` (the
bounds), :func:`rows_peak` (finiteness, and the magnitude of rows not sent), :func:`fold_rows` (the
streaming average).

Arrays are C-contiguous and two-dimensional: a tensor of shape ``[rows, *rest]`` is viewed as
``[rows, prod(rest)]`` (a one-dimensional tensor as ``[rows, 1]``), since rows are what a node sends
or masks (:func:`as_rows`). The callers (:mod:`shared.codec`, :mod:`shared.learning.rounds`,
:mod:`shared.learning.aggregation`) keep every check and error of their own; these functions only compute,
and check their own indices (numba checks none). The dequantised values are numpy's float32 product, bit for
bit; the float64 sums are a rounded product, then a rounded sum, as numpy computes them (never a fused
multiply-add); magnitudes are exact; the bounds' norm is summed in another order, as any norm may be
(``tests/test_kernels.py``).

numba is imported, and a kernel compiled, at the kernel's first call, not with this module: a process that
never folds (a hospital node decoding globals, the command line) never loads it (LLVM: about 100 MB). Compiled code is
cached next to this file, else in ``NUMBA_CACHE_DIR`` or numba's user-wide cache; where none can be written
it is compiled in memory once per process. :func:`warm_up` compiles every kernel ahead of the first update
(the aggregator calls it at start-up).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

_COMPILING = threading.Lock()
# Reductions may be reordered (vectorised); NaN and Inf keep their meaning (no "nnan"/"ninf"), which
# the finiteness checks rely on.
_REORDER = {"reassoc", "nsz", "contract"}


class _Kernel:
    """A function compiled by ``numba.njit`` (without the GIL) at its first call."""

    def __init__(self, fn: Callable, options: dict[str, Any]) -> None:
        functools.update_wrapper(self, fn)
        self._fn, self._options = fn, options
        self._compiled: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        compiled = self._compiled
        if compiled is None:
            compiled = self._build()
        return compiled(*args)

    def _build(self) -> Callable:
        with _COMPILING:
            if self._compiled is None:
                from numba import njit  # here, not at import: see the module's docstring

                try:
                    self._compiled = njit(nogil=True, cache=True, **self._options)(self._fn)
                except RuntimeError:  # no writable cache location (read-only install, no home directory)
                    self._compiled = njit(nogil=True, cache=False, **self._options)(self._fn)
            return self._compiled


def _compile(**options: Any) -> Callable[[Callable], _Kernel]:
    """Decorator: the function as a :class:`_Kernel` with these ``numba.njit`` options."""
    return lambda fn: _Kernel(fn, options)


@_compile()
def dequantize_q8(q: np.ndarray, scales: np.ndarray, out: np.ndarray) -> int:
    """``out[i, j] = float32(q[i, j]) * scales[i]`` (int8 ``q``, float32 ``scales`` and ``out``), the float32
    product numpy gives; returns the smaller of 0 and ``q``'s smallest value: -128 exactly when ``q`` holds
    it (a valid section never does)."""
    n, length = q.shape
    if out.shape != q.shape or scales.shape[0] != n:
        raise ValueError("dequantize_q8: out must have q's shape, scales one value per row")
    low = np.int32(0)
    for i in range(n):
        s = scales[i]
        row_low = np.int32(0)
        for j in range(length):
            v = np.int32(q[i, j])
            row_low = min(row_low, v)
            out[i, j] = np.float32(v) * s
        low = min(low, row_low)
    return low


_MAGNITUDE = np.int32(0x7FFFFFFF)  # a float32's bits without the sign
_FINITE_MAX = np.int32(0x7F7FFFFF)  # the bits of the largest finite float32; Inf and NaN compare above


@_compile(fastmath=_REORDER)
def row_stats(x: np.ndarray, reference: np.ndarray, rows: np.ndarray) -> tuple[bool, float, float]:
    """One pass over float32 ``x`` ``[n, L]`` whose row ``i`` stands for row ``rows[i]`` of float32
    ``reference`` ``[R, L]``: (every value finite, the largest magnitude, the squared L2 norm of
    ``x - reference[rows]``, summed in float64 over rows of float32 sums). With a value not finite the
    other two are meaningless.

    Magnitudes are compared as the integers of their bits (for non-negative floats the same order, with
    Inf and NaN above every finite value), which vectorises where a float maximum cannot."""
    n, length = x.shape
    if rows.shape[0] != n or reference.shape[1] != length:
        raise ValueError("row_stats: one row index per row of x, reference rows as long as x's")
    bits = x.view(np.int32)
    top = np.int32(0)
    total = 0.0
    for i in range(n):
        r = rows[i]
        if r < 0 or r >= reference.shape[0]:
            raise IndexError("row_stats: a row index outside the reference")
        row_top = np.int32(0)
        acc = np.float32(0.0)
        for j in range(length):
            row_top = max(row_top, bits[i, j] & _MAGNITUDE)
            d = x[i, j] - reference[r, j]
            acc += d * d
        top = max(top, row_top)
        total += acc
    peak = np.array([top], dtype=np.int32).view(np.float32)[0]
    return top <= _FINITE_MAX, peak, total


@_compile()
def rows_peak(t: np.ndarray, rows: np.ndarray) -> tuple[bool, float]:
    """Over rows ``rows`` of float32 ``t`` ``[R, L]``: (every value finite, the largest magnitude (0 for
    none), meaningless when a value is not finite)."""
    bits = t.view(np.int32)
    top = np.int32(0)
    for r in rows:
        if r < 0 or r >= t.shape[0]:
            raise IndexError("rows_peak: a row index outside the tensor")
        row_top = np.int32(0)
        for j in range(t.shape[1]):
            row_top = max(row_top, bits[r, j] & _MAGNITUDE)
        top = max(top, row_top)
    return top <= _FINITE_MAX, np.array([top], dtype=np.int32).view(np.float32)[0]


@_compile()
def fold_rows(sums: np.ndarray, weights: np.ndarray, x: np.ndarray, rows: np.ndarray, w: float) -> None:
    """``sums[rows[i]] += w * float64(x[i])`` and ``weights[rows[i]] += w`` for every row ``i`` of
    float32 ``x``: the streaming average's fold (float64 ``sums`` ``[R, L]`` and ``weights`` ``[R]``), a rounded
    product then a rounded sum. Every index is checked before anything is written."""
    n, length = x.shape
    if rows.shape[0] != n or sums.shape[1] != length or weights.shape[0] != sums.shape[0]:
        raise ValueError("fold_rows: one row index per row of x, sums' rows as long as x's, one weight per row")
    for i in range(n):
        if rows[i] < 0 or rows[i] >= sums.shape[0]:
            raise IndexError("fold_rows: a row index outside the sums")
    for i in range(n):
        r = rows[i]
        for j in range(length):
            sums[r, j] += w * np.float64(x[i, j])
        weights[r] += w


def as_rows(t: torch.Tensor) -> np.ndarray:
    """Tensor ``t`` ``[rows, *rest]`` as the float32 numpy ``[rows, prod(rest)]`` these kernels read: a view of
    a contiguous CPU float32 tensor, else a copy (never for writing)."""
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return t.numpy().reshape(t.shape[0], math.prod(t.shape[1:]))


@functools.lru_cache(maxsize=64)
def all_rows(n: int) -> np.ndarray:
    """``arange(n)`` (int64; shared, never written): the row indices of a tensor sent whole."""
    return np.arange(n, dtype=np.int64)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the types the callers pass (the codec's int8 values
    are a read-only view of the payload: numba compiles read-only arrays apart)."""
    x = np.zeros((2, 3), dtype=np.float32)
    rows = np.arange(2, dtype=np.int64)
    dequantize_q8(np.frombuffer(bytes(6), dtype=np.int8).reshape(2, 3), np.ones(2, dtype=np.float32), x)
    row_stats(x, x, rows)
    rows_peak(x, rows)
    fold_rows(np.zeros((2, 3)), np.zeros(2), x, rows, 1.0)
