"""Aggregation rules over FAM states (method section 7).

Each round the aggregator receives one FAM state per node that reported in time, as
decoded by :mod:`shared.codec`: full-shape float32 tensors plus, per tensor, a bool
``present`` vector saying which output rows the node actually sent (a node does not
send rows its mask switched off). The rules here turn those updates into the next
global state:

* A row is combined only over the updates that sent it, so a node that switched a row
  off does not drag that row towards whatever filler its decoder put there.
* A row that no update sent keeps its value from ``previous`` (the last global state).
* Thresholds are ordinary tensors here; they always travel, so they are always present.

Rules (:data:`AGGREGATION_RULES`):

``weighted`` (default)
    Mean weighted by each node's number of training samples (FedAvg), after the caps of
    :func:`capped_weights`: no node weighs more than ``max_samples`` samples, and no node's
    share of the average exceeds ``max_share`` (docs/trust-model.md, section 5).
``uniform``
    Plain mean, each update weight 1 (the public code's rule, for comparison).
``median``
    Coordinate-wise median over the updates that sent the row (mean of the two middle
    values for an even count). Unweighted.
``trimmed_mean``
    Coordinate-wise: sort the values of the updates that sent the row, drop
    ``floor(trim_ratio * k)`` from each end (k = number of such updates), average the rest.
    Unweighted.

Memory: ``weighted`` and ``uniform`` are streaming. Each update is folded into a running
float64 per-element weighted sum and a float64 per-row weight sum as it arrives and is
then forgotten, so memory is two buffers the size of one state whatever the number of
nodes. ``median`` and ``trimmed_mean`` cannot be computed from running sums: they keep
every update (float32 values and bool row flags) until :meth:`Aggregator.result`, so
their memory grows linearly with the number of updates (about 2.1 MB per D = 512 FAM
update) and :meth:`Aggregator.result` briefly needs, one tensor at a time, a few copies
of that tensor's stack over all updates (stack, sorted values, sort indices).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from shared import kernels
from shared.errors import FedMedCLIPError
from shared.wire.reasons import Reason

__all__ = [
    "AGGREGATION_RULES",
    "AggregationError",
    "Aggregator",
    "capped_weights",
    "joiner_weight",
    "WeightedMeanAggregator",
    "MedianAggregator",
    "Workspace",
    "TrimmedMeanAggregator",
    "make_aggregator",
]

AGGREGATION_RULES: tuple[str, ...] = ("weighted", "uniform", "median", "trimmed_mean")


class AggregationError(FedMedCLIPError):
    """Bad use of an aggregator: no updates, template mismatch, bad weight, NaN..."""

    reason = Reason.AGGREGATION


class Workspace:
    """Buffers reused from one update to the next, so that folding an update allocates (and page-faults)
    no full-size tensor of its own: each aggregator holds one (:attr:`Aggregator.workspace`), the decoded
    rows of each tensor (about 2 MB at D = 512), made at its first update. Not for two threads at once:
    neither is an aggregator."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str, tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def buffer(self, role: str, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The contiguous CPU buffer for (``role``, ``name``) of that shape and dtype; contents undefined."""
        key = (role, name, tuple(shape), dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype)
        return buf

    def buffers(self, role: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """One float32 buffer per name of ``shapes``, for ``role``."""
        return {n: self.buffer(role, n, shape) for n, shape in shapes.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


def _sent_rows(x: torch.Tensor, present: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The rows of an update tensor that count, as :mod:`shared.kernels` takes them: (float32 values
    ``[n_sent, L]``, their row indices). ``x`` holds either every row (a full tensor: its present rows
    count) or only the sent rows, in order."""
    if x.shape[0] == present.shape[0]:
        if bool(present.all()):
            return kernels.as_rows(x), kernels.all_rows(x.shape[0])
        x = x[present]
    return kernels.as_rows(x), present.numpy().nonzero()[0]


def _check_weight(num_samples: object) -> None:
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, (int, float))
        or not math.isfinite(num_samples)
        or num_samples <= 0
    ):
        raise AggregationError(f"num_samples must be a positive finite number, got {num_samples!r}")


class Aggregator:
    """Base class: validation shared by every rule; subclasses fold and combine.

    The first update fixes the template (names, shapes, order); every later update and
    the ``previous`` state given to :meth:`result` must match it exactly.
    """

    def __init__(self) -> None:
        self._template: dict[str, tuple[int, ...]] | None = None
        self._count = 0
        #: reusable buffers for decoding and folding updates (:func:`shared.learning.rounds.fold_update`)
        self.workspace = Workspace()

    # -- public API ---------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        return self._count

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of tensor memory the aggregator currently holds (for memory checks)."""
        return sum(t.numel() * t.element_size() for t in self._buffers())

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
        *,
        num_samples: float = 1,
    ) -> None:
        """Add one node's update.

        Args:
            tensors: name -> tensor, full shapes (as :class:`shared.codec.DecodedState`
                gives them). Values of rows not present are ignored.
            present: name -> bool ``[shape[0]]``: rows this node sent. A name left out,
                or ``present=None``, means every row was sent.
            num_samples: the update's weight (> 0, finite): the node's number of training
                samples, or its capped weight from :func:`capped_weights`; the weight of the
                ``weighted`` rule, ignored by the others but still validated.
        """
        _check_weight(num_samples)
        values = self._validate_tensors(tensors, "update")
        rows = self._validate_present(present or {}, values)
        self._fold(values, rows, num_samples)
        self._count += 1

    def add_rows(
        self,
        rows: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        *,
        num_samples: float = 1,
    ) -> None:
        """Add one node's update given as the rows it sent (:class:`shared.codec.DecodedRows`).

        The same update as ``add(full, present)`` where ``full[n][present[n]] == rows[n]`` (the values of
        rows not sent do not matter). This base version builds those full tensors (zeros where not sent)
        and calls :meth:`add`; the streaming rule folds the rows as they are, without the copy.

        Args:
            rows: name -> float tensor ``[present[n].sum(), *shape[1:]]``, the sent rows in order.
            present: name -> bool ``[shape[0]]``, every name of ``rows``.
            num_samples: as in :meth:`add`.
        """
        full: dict[str, torch.Tensor] = {}
        for n, x, p in self._checked_rows(rows, present):
            if x.shape[0] == p.shape[0]:
                full[n] = x
            else:
                t = torch.zeros((p.shape[0], *x.shape[1:]), dtype=torch.float32)
                t[p] = x
                full[n] = t
        self.add(full, present, num_samples=num_samples)

    def _checked_rows(
        self, rows: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]
    ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, rows, present) per tensor, checked against each other: what :meth:`add_rows` folds."""
        if not isinstance(rows, Mapping) or not isinstance(present, Mapping) or set(rows) != set(present):
            raise AggregationError("rows and present must be mappings over the same tensor names")
        out = []
        for n, x in rows.items():
            p = present[n]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
                raise AggregationError(f"update: {n!r} is not a floating-point tensor with a row axis")
            if not isinstance(p, torch.Tensor) or p.dtype != torch.bool or p.dim() != 1:
                raise AggregationError(f"present[{n!r}] must be a 1-d bool tensor")
            p = p.detach().cpu()
            # every row sent (the common case) needs no count; otherwise the rows must be as many as the flags
            if x.shape[0] != p.shape[0] and x.shape[0] != int(p.sum()):
                raise AggregationError(f"update: {n!r} holds {x.shape[0]} rows, present flags {int(p.sum())}")
            out.append((n, x.detach().to(device="cpu", dtype=torch.float32), p))
        return out

    def result(self, previous: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the aggregated state (float32, template order); does not reset.

        Args:
            previous: the last global state; the source of rows no update sent.
        """
        if self._count == 0 or self._template is None:
            raise AggregationError("no updates to aggregate")
        prev = self._validate_tensors(previous, "previous state", define=False)
        return self._combine(prev)

    # -- for subclasses -------------------------------------------------------------

    def _fold(self, values: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], weight: float) -> None:
        raise NotImplementedError

    def _combine(self, previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _buffers(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- validation -----------------------------------------------------------------

    def _validate_tensors(
        self, tensors: Mapping[str, torch.Tensor], what: str, *, define: bool = True
    ) -> dict[str, torch.Tensor]:
        """Check names/shapes against the template (fixing it on first use) and finiteness."""
        if not isinstance(tensors, Mapping):
            raise AggregationError(f"{what} must be a mapping of name -> tensor")
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise AggregationError(f"{what}: {name!r} is not a floating-point tensor")
            if t.dim() == 0:
                raise AggregationError(f"{what}: {name!r} is 0-d; tensors need a row axis")
            out[name] = t.detach().to(device="cpu", dtype=torch.float32)
        self._match_template({n: tuple(t.shape) for n, t in out.items()}, what, define=define)
        return {n: out[n] for n in self._template}

    def _match_template(self, shapes: Mapping[str, tuple[int, ...]], what: str, *, define: bool = True) -> None:
        """Check names and full shapes against the template, fixing it on first use (``define``)."""
        if self._template is None:
            if not define:
                raise AggregationError("no template yet")
            if not shapes:
                raise AggregationError(f"{what} holds no tensors")
            self._template = dict(shapes)
        missing = [n for n in self._template if n not in shapes]
        extra = [n for n in shapes if n not in self._template]
        if missing or extra:
            raise AggregationError(f"{what} does not match the template: missing {missing}, extra {extra}")
        for n, shape in self._template.items():
            if tuple(shapes[n]) != shape:
                raise AggregationError(f"{what}: {n!r} has shape {tuple(shapes[n])}, template has {shape}")

    def _validate_present(
        self, present: Mapping[str, torch.Tensor], values: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check row flags; default every row present; refuse NaN/Inf in sent rows."""
        extra = [n for n in present if n not in values]
        if extra:
            raise AggregationError(f"present names tensors not in the update: {extra}")
        rows: dict[str, torch.Tensor] = {}
        for n, t in values.items():
            p = present.get(n)
            if p is None:
                p = torch.ones(t.shape[0], dtype=torch.bool)
            elif not isinstance(p, torch.Tensor) or p.dtype != torch.bool or tuple(p.shape) != (t.shape[0],):
                raise AggregationError(f"present[{n!r}] must be a bool tensor of shape ({t.shape[0]},)")
            p = p.detach().cpu()
            # a finite sum of the whole tensor proves every sent row finite in one pass; else check exactly
            if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t[p]).all()):
                raise AggregationError(f"update tensor {n!r} holds NaN or Inf in a sent row")
            rows[n] = p
        return rows


def _expand_rows(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[rows]`` -> ``[rows, 1, ...]`` so a per-row vector broadcasts over a tensor."""
    return rows.reshape(rows.shape[0], *([1] * (len(shape) - 1)))


class WeightedMeanAggregator(Aggregator):
    """Streaming (weighted or uniform) mean with per-row presence.

    Keeps ``sum_k w_k * p_k,i * x_k`` (float64, full shape) and ``sum_k w_k * p_k,i``
    (float64, per row): memory does not grow with the number of updates. float64 keeps
    the running sums exact enough that folding order does not matter in practice.
    """

    def __init__(self, *, uniform: bool = False) -> None:
        super().__init__()
        self.uniform = uniform
        self._sum: dict[str, torch.Tensor] = {}
        self._weight: dict[str, torch.Tensor] = {}

    def add_rows(
        self,
        rows: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        *,
        num_samples: float = 1,
    ) -> None:
        """:meth:`Aggregator.add_rows` without building full tensors: each tensor's sent rows go straight
        into the running sums (:func:`shared.kernels.fold_rows`, the same float64 arithmetic as :meth:`add`,
        so the result is bit-identical). Everything is checked before anything is folded: an update that
        fails a check leaves the sums as they were."""
        _check_weight(num_samples)
        checked = self._checked_rows(rows, present)
        self._match_template({n: (int(p.shape[0]), *x.shape[1:]) for n, x, p in checked}, "update")
        folds = []
        for n, x, p in checked:
            values, sent = _sent_rows(x, p)
            if not kernels.rows_peak(values, kernels.all_rows(values.shape[0]))[0]:
                raise AggregationError(f"update tensor {n!r} holds NaN or Inf in a sent row")
            folds.append((n, values, sent))
        for n, values, sent in folds:
            self._accumulate(n, values, sent, num_samples)
        self._count += 1

    def _fold(self, values: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], weight: float) -> None:
        for n, x in values.items():  # only the sent rows (x * 0 would still be NaN for a NaN in an unsent row)
            self._accumulate(n, *_sent_rows(x, rows[n]), weight)

    def _accumulate(self, name: str, values: np.ndarray, sent: np.ndarray, weight: float) -> None:
        """Fold rows ``values`` (float32 ``[n, L]``, row ``i`` being tensor row ``sent[i]``) into the sums."""
        shape = self._template[name]
        if name not in self._sum:
            self._sum[name] = torch.zeros(shape, dtype=torch.float64)
            self._weight[name] = torch.zeros(shape[0], dtype=torch.float64)
        sums = self._sum[name].numpy().reshape(shape[0], math.prod(shape[1:]))  # a view: folded in place
        w = 1.0 if self.uniform else float(weight)
        kernels.fold_rows(sums, self._weight[name].numpy(), values, sent, w)

    def _combine(self, previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for n, prev in previous.items():
            wsum = self._weight[n]
            seen = wsum > 0
            mean = self._sum[n] / _expand_rows(torch.where(seen, wsum, 1.0), prev.shape)
            out[n] = torch.where(_expand_rows(seen, prev.shape), mean.to(torch.float32), prev).clone()
        return out

    def _buffers(self) -> list[torch.Tensor]:
        return [*self._sum.values(), *self._weight.values()]


class _BufferingAggregator(Aggregator):
    """Keeps every update; the robust rules need all values of a coordinate at once."""

    def __init__(self) -> None:
        super().__init__()
        self._values: list[dict[str, torch.Tensor]] = []
        self._rows: list[dict[str, torch.Tensor]] = []

    def _fold(self, values: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], weight: float) -> None:
        # Own copies: the caller may reuse or mutate its tensors after add().
        self._values.append({n: t.clone() for n, t in values.items()})
        self._rows.append({n: p.clone() for n, p in rows.items()})

    def _buffers(self) -> list[torch.Tensor]:
        return [t for d in (*self._values, *self._rows) for t in d.values()]

    def _combine(self, previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for n, prev in previous.items():
            stacked = torch.stack([v[n] for v in self._values])  # [N, rows, ...]
            present = torch.stack([r[n] for r in self._rows])  # [N, rows]
            k = present.sum(dim=0)  # [rows] updates that sent each row
            mask = present.reshape(*present.shape, *([1] * (stacked.dim() - 2)))
            # Unsent entries become +inf so that sorting puts them after every sent value:
            # the first k[i] sorted entries of row i are exactly its sent values.
            ordered = torch.where(mask, stacked, float("inf")).sort(dim=0).values
            value = self._reduce_sorted(ordered, k)
            seen = _expand_rows(k > 0, prev.shape)
            out[n] = torch.where(seen, value, prev).clone()
        return out

    def _reduce_sorted(self, ordered: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Combine sorted values ``[N, rows, ...]`` whose first ``k[i]`` along dim 0 count."""
        raise NotImplementedError


class MedianAggregator(_BufferingAggregator):
    """Coordinate-wise median over the updates that sent each row (buffers updates)."""

    def _reduce_sorted(self, ordered: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        kk = k.clamp(min=1)
        shape = (1, *ordered.shape[1:])
        lo = _expand_rows((kk - 1) // 2, ordered.shape[1:]).unsqueeze(0).expand(shape)
        hi = _expand_rows(kk // 2, ordered.shape[1:]).unsqueeze(0).expand(shape)
        a = ordered.gather(0, lo)[0]
        b = ordered.gather(0, hi)[0]
        # Rows nobody sent gathered +inf; the caller replaces them with previous.
        return torch.where(torch.isfinite(a) & torch.isfinite(b), (a + b) / 2, 0.0)


class TrimmedMeanAggregator(_BufferingAggregator):
    """Coordinate-wise trimmed mean over the updates that sent each row (buffers updates).

    With ``trim_ratio`` r and k senders of a row, ``floor(r * k)`` values are dropped from
    each end; r < 0.5 guarantees at least one value remains.
    """

    def __init__(self, trim_ratio: float = 0.1) -> None:
        super().__init__()
        if (
            isinstance(trim_ratio, bool)
            or not isinstance(trim_ratio, (int, float))
            or not (0.0 <= float(trim_ratio) < 0.5)
            or math.isnan(float(trim_ratio))
        ):
            raise AggregationError(f"trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
        self.trim_ratio = float(trim_ratio)

    def _reduce_sorted(self, ordered: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        g = torch.floor(k.to(torch.float64) * self.trim_ratio).to(torch.long)  # dropped per tail
        idx = torch.arange(ordered.shape[0]).reshape(-1, *([1] * (ordered.dim() - 1)))
        lo = _expand_rows(g, ordered.shape[1:]).unsqueeze(0)
        hi = _expand_rows(k - g, ordered.shape[1:]).unsqueeze(0)
        keep = (idx >= lo) & (idx < hi)
        total = torch.where(keep, ordered, 0.0).sum(dim=0, dtype=torch.float64)
        n_kept = _expand_rows((k - 2 * g).clamp(min=1), ordered.shape[1:])
        return (total / n_kept).to(torch.float32)


def make_aggregator(rule: str = "weighted", *, trim_ratio: float = 0.1) -> Aggregator:
    """Build a fresh aggregator for one round.

    Args:
        rule: one of :data:`AGGREGATION_RULES`.
        trim_ratio: fraction dropped from each tail by ``trimmed_mean`` (in [0, 0.5)).
    """
    if rule == "weighted":
        return WeightedMeanAggregator(uniform=False)
    if rule == "uniform":
        return WeightedMeanAggregator(uniform=True)
    if rule == "median":
        return MedianAggregator()
    if rule == "trimmed_mean":
        return TrimmedMeanAggregator(trim_ratio)
    raise AggregationError(f"unknown aggregation rule {rule!r}; expected one of {AGGREGATION_RULES}")


# --------------------------------------------------------------------------- weights


def _check_caps(max_samples: int | None, max_share: float | None) -> None:
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise AggregationError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if max_share is not None and (
        isinstance(max_share, bool) or not isinstance(max_share, (int, float)) or not 0.0 < float(max_share) <= 1.0
    ):
        raise AggregationError(f"max_share must be in (0, 1] or None, got {max_share!r}")


def _capped_count(count: int, max_samples: int | None) -> float:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise AggregationError(f"a sample count must be a positive int, got {count!r}")
    return float(count if max_samples is None else min(count, max_samples))


def capped_weights(
    counts: Mapping[str, int], *, max_samples: int | None = None, max_share: float | None = None
) -> dict[str, float]:
    """The ``weighted`` rule's weight of each node: sample counts no node can inflate.

    1. Each count is cut to ``max_samples`` (None: no cut): ``c_i = min(n_i, max_samples)``.
    2. Water-filling: ``w_i = min(c_i, T)`` with the largest level ``T`` such that no node holds
       more than ``max_share`` of the sum, ``w_i <= max_share * sum_j w_j``. ``T`` is infinite
       (the counts themselves) when no node's share is over ``max_share`` already: the plain
       sample-weighted average (FedAvg) is unchanged whenever the cap does not bind. When the cap
       cannot hold (fewer than ``1 / max_share`` nodes, e.g. two nodes and 0.5 is exactly
       reachable, 0.4 is not), every node gets the same weight, the smallest share possible.

    ``max_share`` None or 1 turns step 2 off. The weights are in sample units (floats); the
    aggregator and the in-process simulation both call this one function, over the trainers
    registered when a round opens (:mod:`aggregator.engine`) or over the simulated hospitals.
    """
    _check_caps(max_samples, max_share)
    capped = {name: _capped_count(n, max_samples) for name, n in counts.items()}
    if max_share is None or max_share >= 1.0 or len(capped) < 2:
        return capped
    s = float(max_share)
    values = sorted(capped.values(), reverse=True)
    total = sum(values)
    if values[0] <= s * total:
        return capped  # the cap does not bind: the counts themselves
    if len(values) * s <= 1.0:
        level = values[-1]  # the cap cannot hold: equal weights
        return {name: level for name in capped}
    # k largest nodes at the level T, the others at their counts: T = s * (k * T + rest), i.e.
    # T = s * rest / (1 - k * s); the first k with values[k] <= T is the solution (k * s < 1 there).
    rest = total
    level = values[0]
    for k in range(1, len(values)):
        rest -= values[k - 1]
        level = s * rest / (1.0 - k * s)
        if values[k] <= level:
            break
    return {name: min(c, level) for name, c in capped.items()}


def joiner_weight(
    count: int, open_total: float, *, max_samples: int | None = None, max_share: float | None = None
) -> float:
    """The weight of a node that joins while a round is open, whose weights were fixed at its opening.

    ``min(c, max_share / (1 - max_share) * open_total)`` with ``c`` the count cut to ``max_samples``
    and ``open_total`` the sum of the weights fixed at the opening: the joiner's share of the round's
    whole weight (``open_total + w``) is at most ``max_share``, and nobody else's share grows.
    """
    _check_caps(max_samples, max_share)
    c = _capped_count(count, max_samples)
    if max_share is None or max_share >= 1.0:
        return c
    if not (math.isfinite(open_total) and open_total > 0):
        raise AggregationError(f"open_total must be a positive finite number, got {open_total!r}")
    s = float(max_share)
    return min(c, s / (1.0 - s) * open_total)
