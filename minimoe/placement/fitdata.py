"""What a placement or grouping fit reads: exact per-request expert counts, and a sample of the tokens.

Fitting a placement needs two things of the fitting tokens (e.g. every request's prefill tokens):

* exact **counts**: each request's expert histogram (its signature, for grouping), and their sum over
  requests (the expert loads, for contiguous, round-robin and EPLB placement, and for balance);
* the **hyperedges**: each token's set of experts per layer, for the co-activation (hypergraph) partition of
  the locality placement and for the traffic a request would cause on each node. No sum of counts keeps
  which experts one token chose together, so the hyperedges are a uniform sample: the bottom-k sample of
  ``minimoe.traces.stats`` (every token, when the fitting set is small enough).

``FitData`` holds both with the names of a ``Trace`` (``experts``, ``request``, ``phase``, ``num_experts``,
``top_k``, ``num_layers``, ``num_requests``) plus ``token_index`` (each sampled token's row in the whole
trace: the replica a token is routed to depends on it, ``Placement.route``), ``request_counts`` and
``request_tokens``. ``minimoe.placement.methods.place`` and ``minimoe.placement.grouping.group`` accept it
in place of a trace; with every fitting token sampled they give the same placements as on the trace itself
(tests/test_streaming.py). With a sample, a request's traffic on each node is estimated from its sampled
tokens, scaled by its fitting tokens / sampled tokens; a request with no sampled token is scored by its
remote (token, expert) pairs, which its exact counts give.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minimoe.traces.stats import SAMPLES, TraceStats

FIT_CLASSES = {"prefill": (0,), "online": (1,), "oracle": (2,), "eval": (2,), "all": (0, 1, 2, 3)}
FIT_PAIRS = 1 << 16  # a sampled fitting set: this many (token, expert) pairs, i.e. 65536 / top_k tokens
EXACT_FIT_PAIRS = 1 << 20  # "auto" fits on every token while the whole trace holds at most this many pairs


def auto_fit_tokens(num_tokens: int, top_k: int) -> int | None:
    """``max_fit_tokens="auto"``: None (fit on every token) while the trace holds at most ``EXACT_FIT_PAIRS``
    (token, expert) pairs, else a sample of ``FIT_PAIRS // top_k`` tokens per fitting set. A fit's cost grows
    with its pairs: the bundled trace's 0.5M pairs fit exactly in about half a minute on two cores, while a
    trace of 10^8 tokens would take hours, and its sample costs the same few seconds at any trace size
    (``benchmarks/results/main_job.md`` sets sampled and exact fits side by side on the bundled trace)."""
    return None if num_tokens * top_k <= EXACT_FIT_PAIRS else max(1, FIT_PAIRS // top_k)


@dataclass(eq=False)
class FitData:
    experts: np.ndarray         # int16 (T, L, k): the sampled fitting tokens, in row order
    request: np.ndarray         # int32 (T,) their request ids (ids of the whole trace)
    phase: np.ndarray           # int8 (T,)
    token_index: np.ndarray     # int64 (T,) their rows in the whole trace
    request_counts: np.ndarray  # int32/int64 (R, L, E): exact expert counts of every request's fitting tokens
    request_tokens: np.ndarray  # int64 (R,): fitting tokens of every request
    num_experts: int
    top_k: int
    domain: np.ndarray | None = None  # unicode (R,) request labels (grouping method "domain"), or None

    @property
    def num_layers(self) -> int:
        return int(self.request_counts.shape[1])

    @property
    def num_requests(self) -> int:
        return int(self.request_counts.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    def sampled_tokens(self) -> np.ndarray:
        """int64 (R,): sampled tokens of every request."""
        return np.bincount(self.request, minlength=self.num_requests)

    def loads(self) -> np.ndarray:
        """float64 (L, E): the exact expert loads of the fitting tokens."""
        return self.request_counts.sum(0, dtype=np.int64).astype(float)

    @classmethod
    def of_trace(cls, trace, tokens=None) -> "FitData":
        """Every fitting token of an in-memory trace (``tokens``: bool (N,) mask, default all): no sampling."""
        rows = np.arange(trace.num_tokens) if tokens is None else np.flatnonzero(tokens)
        num_layers, num_experts = trace.num_layers, trace.num_experts
        experts = trace.experts[rows]
        request = trace.request[rows]
        cells = (request[:, None, None].astype(np.int64) * num_layers + np.arange(num_layers)[None, :, None]) \
            * (num_experts + 1) + experts.astype(np.int64) + 1
        counts = np.bincount(cells.ravel(), minlength=trace.num_requests * num_layers * (num_experts + 1))
        counts = counts.reshape(trace.num_requests, num_layers, num_experts + 1)[:, :, 1:]
        domain = trace.request_domains() if trace.has_domain else None
        return cls(experts, request, trace.phase[rows], rows.astype(np.int64), counts,
                   np.bincount(request, minlength=trace.num_requests), num_experts, trace.top_k, domain)

    @classmethod
    def of_stats(cls, stats: TraceStats, fit: str, requests=None) -> "FitData":
        """The fitting set ``fit`` ("prefill", "online", "oracle" or "all") of a trace's statistics;
        ``requests``: bool (R,) mask keeping only some requests' tokens (default all)."""
        if fit not in FIT_CLASSES:
            raise ValueError(f"fit must be one of {list(FIT_CLASSES)}, got {fit!r}")
        classes = FIT_CLASSES[fit]
        sample = stats.samples[fit if fit in SAMPLES else "eval"]
        counts = stats.request_loads(classes, np.int32)  # (R, L, E); int32 halves the largest array of a fit
        tokens = stats.class_tokens(classes)  # (R,)
        keep = np.ones(len(sample.row), bool)
        if requests is not None:
            requests = np.asarray(requests, bool)
            keep = requests[sample.request]
            counts = np.where(requests[:, None, None], counts, np.int32(0))
            tokens = np.where(requests, tokens, 0)
        order = np.flatnonzero(keep)[np.argsort(sample.row[keep], kind="stable")]  # row order, as in the trace
        phase = np.array([0, 1, 1, -1], np.int8)[sample.token_class[order]]
        return cls(sample.experts[order], sample.request[order], phase, sample.row[order], counts, tokens,
                   stats.num_experts, stats.top_k, stats.domain if stats.has_domain else None)
