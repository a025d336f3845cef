"""A trace as a stream of record batches, and the strict checks of ``Trace.load`` applied batch by batch.

A trace too large for memory is read in batches of consecutive tokens (``minimoe.traces.parquet`` reads them
from a Parquet file; ``batches_of`` cuts an in-memory ``Trace`` the same way). A batch is a slice of rows
``start .. start + n`` of the whole trace, with two columns that the ``.npz`` format leaves implicit:

    position[n]  index of the token within its request (0 = the request's first token)
    step[n]      decode step: how many decode tokens of the same request come before it (phase 1 only;
                 -1 for prefill and unknown tokens); step < window is the online fitting window of
                 ``minimoe.placement.experiments``

Both follow from ``request`` and ``phase``, so they are checked, never trusted. Every check of
``Trace.validate`` runs on each batch (dtypes, shapes, id ranges, distinct ids per token and layer, phase
values, dense contiguous requests, one domain per request), and what spans two batches (a request that
continues, its next position and decode step, its domain) is checked where two batches meet
(``check_join``). Batches may be checked in any order, by different workers, and joined afterwards: a
``Span`` summarises one checked run of consecutive rows by its first and last row. Errors are ValueError
naming the file and the row (the global row index, 0-based).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minimoe.traces.format import Trace


@dataclass(eq=False)
class TraceBatch:
    """Rows ``start .. start + n`` of a trace (shapes as in ``minimoe.traces.format``)."""

    start: int                 # global row index of the first token
    experts: np.ndarray        # int16 (n, L, k), -1 = none
    request: np.ndarray        # int32 (n,) global request ids
    phase: np.ndarray          # int8 (n,) 0 prefill, 1 decode, -1 unknown
    position: np.ndarray       # int32 (n,) index of the token within its request
    step: np.ndarray           # int32 (n,) decode step (phase 1), else -1
    domain: np.ndarray         # unicode (n,) or (0,) when the trace has no domain labels
    weights: np.ndarray | None = None   # float16 (n, L, k)

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def rows(self) -> np.ndarray:
        """int64 (n,) global row index of every token."""
        return np.arange(self.start, self.start + self.num_tokens, dtype=np.int64)


def positions_and_steps(request: np.ndarray, phase: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, step), int32 (n,) each, of whole requests (rows start at a request's first token)."""
    n = len(request)
    index = np.arange(n)
    first = np.ones(n, bool)
    first[1:] = request[1:] != request[:-1]
    segment_start = np.maximum.accumulate(np.where(first, index, 0))  # (n,) first row of each token's request
    decode = (phase == 1).astype(np.int64)
    before = np.cumsum(decode) - decode  # decode tokens before each row, over the whole array
    step = np.where(phase == 1, before - before[segment_start], -1)
    return (index - segment_start).astype(np.int32), step.astype(np.int32)


def batches_of(trace: Trace, batch_tokens: int = 1 << 18):
    """The in-memory ``trace`` as TraceBatch views of ``batch_tokens`` rows each (the last may be shorter)."""
    position, step = positions_and_steps(trace.request, trace.phase)
    for start in range(0, trace.num_tokens, batch_tokens):
        rows = slice(start, start + batch_tokens)
        yield TraceBatch(start, trace.experts[rows], trace.request[rows], trace.phase[rows], position[rows],
                         step[rows], trace.domain[rows] if trace.has_domain else trace.domain[:0],
                         None if trace.weights is None else trace.weights[rows])


# ---- checks ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """A checked run of consecutive rows, summarised by what a neighbour must agree with.

    ``lead_base``: decode tokens of the first request that lie before the span (from its first decode step;
    None when no decode row of that request is in the span or the request starts in the span).
    ``last_decode``: decode rows of the last request inside the span; ``last_starts`` whether that request
    starts inside the span (else its decode count continues the left neighbour's)."""

    first_row: int
    last_row: int
    first_request: int
    first_position: int
    first_domain: str | None
    lead_base: int | None
    last_request: int
    last_position: int
    last_domain: str | None
    last_decode: int
    last_starts: bool


def _fail(label: str, row: int, message: str):
    raise ValueError(f"trace file {label}: row {row}: {message}")


def check_batch(batch: TraceBatch, num_experts: int, top_k: int, num_layers: int, label: str) -> Span:
    """Run every check of ``Trace.validate`` on one batch; returns its Span for ``check_join``.

    Raises ValueError naming ``label`` (the file) and the global row of the first problem found."""
    n, start = batch.num_tokens, batch.start
    for name, dtype in (("request", np.int32), ("phase", np.int8), ("position", np.int32), ("step", np.int32)):
        array = getattr(batch, name)
        if array.dtype != dtype or array.shape != (n,):
            _fail(label, start, f"{name} must be {np.dtype(dtype).name} ({n},), got {array.dtype} {array.shape}")
    if batch.experts.dtype != np.int16 or batch.experts.shape != (n, num_layers, top_k):
        _fail(label, start, f"experts must be int16 ({n}, {num_layers}, {top_k}), got {batch.experts.dtype} "
                            f"{batch.experts.shape}")
    if n == 0:
        raise ValueError(f"trace file {label}: an empty batch at row {start}")
    experts = batch.experts
    outside = (experts < -1) | (experts >= num_experts)
    if outside.any():
        token, layer, _ = np.argwhere(outside)[0]
        _fail(label, start + token, f"expert ids must be in [-1, num_experts-1={num_experts - 1}], MoE layer "
                                    f"{layer} has {experts[token, layer].tolist()}")
    if top_k > 1:
        ordered = np.sort(experts, axis=2)
        repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        if repeated.any():
            token, layer, _ = np.argwhere(repeated)[0]
            _fail(label, start + token, f"an expert id repeats in MoE layer {layer}: "
                                        f"{experts[token, layer].tolist()}; top-k ids must be distinct")
    bad = np.flatnonzero((batch.phase < -1) | (batch.phase > 1))
    if bad.size:
        _fail(label, start + bad[0], f"phase must be -1, 0 or 1, got {batch.phase[bad[0]]}")
    if batch.weights is not None:
        if batch.weights.dtype != np.float16 or batch.weights.shape != experts.shape:
            _fail(label, start, f"weights must be float16 {experts.shape}, got {batch.weights.dtype} "
                                f"{batch.weights.shape}")
        finite = np.isfinite(batch.weights).all(axis=(1, 2))
        if not finite.all():
            _fail(label, start + np.flatnonzero(~finite)[0], "weights must be finite (found NaN or inf)")
        negative = (batch.weights < 0).any(axis=(1, 2))
        if negative.any():
            _fail(label, start + np.flatnonzero(negative)[0], "weights must be >= 0 (a router's softmax or sigmoid "
                  "scores)")
    request, position, step, domain = batch.request, batch.position, batch.step, batch.domain
    has_domain = domain.shape == (n,)
    if not has_domain and domain.shape != (0,):
        _fail(label, start, f"domain must have shape ({n},) or (0,), got {domain.shape}")
    # inside the batch: a request changes exactly where a position 0 starts the next one
    change = request[1:] != request[:-1]
    wrong = np.flatnonzero(change & (request[1:] != request[:-1] + 1))
    if wrong.size:
        row = wrong[0] + 1
        _fail(label, start + row, f"request ids must grow by 0 or 1 per token (dense, each request contiguous); "
                                  f"request {request[row]} follows {request[row - 1]}")
    if (request < 0).any():
        _fail(label, start + np.flatnonzero(request < 0)[0], "request ids must be >= 0")
    if has_domain:
        wrong = np.flatnonzero(~change & (domain[1:] != domain[:-1]))
        if wrong.size:
            row = wrong[0] + 1
            _fail(label, start + row, f"domain must be constant within a request; request {request[row]} has "
                                      f"{domain[row - 1]!r} and {domain[row]!r}")
    lead = position[0] != 0  # the first rows continue a request that started before this batch
    expected_position, expected_step = positions_and_steps(request, batch.phase)
    lead_rows = np.flatnonzero(request == request[0]) if lead else np.zeros(0, np.int64)
    expected_position[lead_rows] += position[0]
    wrong = np.flatnonzero(position != expected_position)
    if wrong.size:
        row = wrong[0]
        _fail(label, start + row, f"position {position[row]} of request {request[row]} should be "
                                  f"{expected_position[row]} (0 at a request's first token, then +1 per token)")
    lead_decode = lead_rows[batch.phase[lead_rows] == 1]
    lead_base = int(step[lead_decode[0]]) if lead_decode.size else None
    if lead_base is not None:
        expected_step[lead_decode] += lead_base
    wrong = np.flatnonzero(step != expected_step)
    if wrong.size:
        row = wrong[0]
        _fail(label, start + row, f"decode step {step[row]} of request {request[row]} should be "
                                  f"{expected_step[row]} (-1 unless phase 1; else the decode tokens of the "
                                  f"request before it)")
    if lead_base is not None and lead_base < 0:
        _fail(label, start + lead_decode[0], f"decode step must be >= 0 for a decode token, got {lead_base}")
    last_rows = np.flatnonzero(request == request[-1])
    last_starts = bool(position[last_rows[0]] == 0)
    return Span(first_row=start, last_row=start + n - 1, first_request=int(request[0]),
                first_position=int(position[0]), first_domain=str(domain[0]) if has_domain else None,
                lead_base=lead_base, last_request=int(request[-1]), last_position=int(position[-1]),
                last_domain=str(domain[-1]) if has_domain else None,
                last_decode=int((batch.phase[last_rows] == 1).sum()), last_starts=last_starts)


def check_join(left: Span | None, right: Span, label: str) -> Span:
    """Check that ``right`` continues ``left`` (None: ``right`` starts the trace); returns the joined Span."""
    if left is None:
        if right.first_row != 0:
            raise ValueError(f"trace file {label}: spans must be joined in row order from row 0, got row "
                             f"{right.first_row} first")
        if right.first_request != 0 or right.first_position != 0:
            _fail(label, 0, f"the first token must be position 0 of request 0, got position {right.first_position} "
                            f"of request {right.first_request}")
        return right
    if right.first_row != left.last_row + 1:
        raise ValueError(f"trace file {label}: rows {left.first_row}-{left.last_row} and "
                         f"{right.first_row}-{right.last_row} are not adjacent")
    row = right.first_row
    if (left.first_domain is None) != (right.first_domain is None):
        _fail(label, row, "some rows have domain labels and some do not")
    continues = right.first_position != 0
    if not continues and right.first_request != left.last_request + 1:
        _fail(label, row, f"request {right.first_request} starts after request {left.last_request}; request ids must "
                          f"be dense and in order")
    left_total = left.last_decode if left.last_starts else (
        None if left.lead_base is None else left.lead_base + left.last_decode)
    lead_base = left.lead_base
    if continues:
        if right.first_request != left.last_request or right.first_position != left.last_position + 1:
            _fail(label, row, f"position {right.first_position} of request {right.first_request} does not continue "
                              f"position {left.last_position} of request {left.last_request}")
        if right.first_domain != left.last_domain:
            _fail(label, row, f"domain must be constant within a request; request {right.first_request} has "
                              f"{left.last_domain!r} and {right.first_domain!r}")
        if right.lead_base is not None:
            if left_total is not None and right.lead_base != left_total:
                _fail(label, row, f"decode steps of request {right.first_request} continue at {right.lead_base}, "
                                  f"expected {left_total}")
            if left_total is None:  # the left span is one continuing request without decode rows
                lead_base = right.lead_base
    single = right.last_request == right.first_request and continues  # right holds one continuing request
    return Span(first_row=left.first_row, last_row=right.last_row, first_request=left.first_request,
                first_position=left.first_position, first_domain=left.first_domain, lead_base=lead_base,
                last_request=right.last_request, last_position=right.last_position, last_domain=right.last_domain,
                last_decode=left.last_decode + right.last_decode if single else right.last_decode,
                last_starts=left.last_starts if single else right.last_starts)


def join_runs(spans: list[Span], label: str) -> list[Span]:
    """Spans sorted by row, adjacent ones joined (``check_join``); overlapping ones are an error."""
    runs = []
    for span in sorted(spans, key=lambda s: s.first_row):
        if runs and span.first_row <= runs[-1].last_row:
            raise ValueError(f"trace file {label}: rows {span.first_row}-{span.last_row} were read twice")
        if runs and span.first_row == runs[-1].last_row + 1:
            runs[-1] = check_join(runs[-1], span, label)
        else:
            runs.append(span)
    return runs
