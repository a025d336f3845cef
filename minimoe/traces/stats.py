"""Pass 1 over a trace of any size: small statistics that merge by addition, from batches read in any order.

Every token falls in one *class*, by a ``ClassRule``: with phases known, 0 prefill, 1 online (decode step <
``window``: the online fitting window of ``minimoe.placement.experiments``), 2 held out (decode step >=
``window``), 3 unknown phase; without them, the time or request split of ``minimoe.placement.splits`` (0 what
stands in for prefill, 1 the online window, 2 held out, 3 neither). One pass over the batches of a trace
(``minimoe.traces.batches``) fills

    counts[q, c, l, e]   routed (token, slot) choices of request q's class-c tokens to expert e in layer l
                         (request q's expert signature, per class: prefill/decode sums and every load
                         per layer x expert x group x window follow by summing rows)
    tokens[q, c]         tokens of request q in class c;  domain[q]  its label
    phase counts         the same per phase (prefill, decode, unknown), kept apart only when the classes are
                         not the phases (the findings read phases)
    coactivation[c, l]   (E, E): tokens of class c choosing both i and j in layer l (diagonal: load)
    samples[name]        a bottom-k sample of the class's tokens (``minimoe.traces.bottomk``): each token keeps its row,
                         request and every layer's experts; a uniform sample of at most ``sample_size``
                         tokens per class ("prefill", "online", "eval") and of all tokens ("all")

Merging two partial results adds counts, tokens and co-activation and keeps the ``sample_size`` smallest
hashes of both samples. The hash of a token is a fixed function of its global row (SplitMix64 of
row + seed), so the sample does not depend on how the rows were split among workers or in which order
partial results merge: statistics computed in one process, on many, or in one pass over an in-memory trace
are identical, bit for bit. Memory: O(R·4·L·E) for the signatures plus O(4·L·E²) and the samples,
independent of the number of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minimoe.traces.batches import TraceBatch, batches_of
from minimoe.traces.bottomk import BottomK, row_hash
from minimoe.traces.format import Trace

CLASSES = ("prefill", "online", "eval", "unknown")
SAMPLES = ("prefill", "online", "eval", "all")  # the fitting sets of the placement experiments, and all tokens
DEFAULT_SAMPLE_SIZE = 1 << 15


def token_classes(phase: np.ndarray, step: np.ndarray, window: int) -> np.ndarray:
    """int8 (n,): 0 prefill, 1 online (decode step < window), 2 held out, 3 unknown phase."""
    return np.where(phase == 0, 0, np.where(phase == 1, np.where(step < window, 1, 2), 3)).astype(np.int8)


@dataclass(frozen=True, eq=False)
class ClassRule:
    """Which class each token falls in (the splits of ``minimoe.placement.splits``, batch by batch):

    "phase"    ``token_classes(phase, step, window)``
    "time"     a request's first ``head[q]`` tokens (its first half) -> 0, the next ``window`` -> 1, the rest -> 2
    "request"  every token of the first ``num_requests // 2`` requests -> 0, of the others -> 2
    """

    kind: str = "phase"
    window: int = 8
    head: np.ndarray | None = None  # int64 (R,) for "time"
    num_requests: int = 0           # for "request"

    def classes(self, batch: TraceBatch) -> np.ndarray:
        if self.kind == "phase":
            return token_classes(batch.phase, batch.step, self.window)
        if self.kind == "time":
            after = batch.position.astype(np.int64) - self.head[batch.request]
            return np.where(after < 0, 0, np.where(after < self.window, 1, 2)).astype(np.int8)
        if self.kind == "request":
            return np.where(batch.request < self.num_requests // 2, 0, 2).astype(np.int8)
        raise ValueError(f"ClassRule kind must be phase, time or request, got {self.kind!r}")


def as_rule(rule) -> ClassRule:
    """A ClassRule as given, or the phase rule whose online window is the given int."""
    return ClassRule("phase", int(rule)) if isinstance(rule, (int, np.integer)) else rule


def phase_index(phase: np.ndarray) -> np.ndarray:
    """int64 (n,): 0 prefill, 1 decode, 2 unknown."""
    return np.where(phase == 0, 0, np.where(phase == 1, 1, 2))


@dataclass(eq=False)
class TraceStats:
    """The statistics of one pass (see the module docstring); partial results ``merge`` into the whole."""

    num_experts: int
    top_k: int
    num_layers: int
    model: str
    rule: ClassRule
    sample_size: int
    seed: int
    has_domain: bool
    num_tokens: int = 0
    blocks: list = field(default_factory=list)  # [(first request, counts (r, 4, L, E), tokens (r, 4), domain (r,),
    #                                              phase counts (r, 3, L, E) and tokens (r, 3), or None)]
    coactivation: np.ndarray | None = None      # int64 (4, L, E, E)
    samples: dict = field(default_factory=dict)  # name -> BottomK
    runs: list = field(default_factory=list)     # Spans of the rows read (minimoe.traces.batches), for the
    #                                              file-level check of ParquetTrace.check_runs

    # ---- building -----------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_experts, top_k, num_layers, model="", rule: ClassRule | int = 8,
              sample_size=DEFAULT_SAMPLE_SIZE, seed=0, has_domain=True) -> "TraceStats":
        """No tokens yet; ``rule``: a ClassRule, or an int: the phase rule with that online window."""
        rule = as_rule(rule)
        stats = cls(num_experts, top_k, num_layers, model, rule, sample_size, seed, has_domain)
        stats.coactivation = np.zeros((len(CLASSES), num_layers, num_experts, num_experts), np.int64)
        stats.samples = {name: BottomK(sample_size) for name in SAMPLES}
        return stats

    @property
    def window(self) -> int:
        return self.rule.window

    def _request_counts(self, local, group, num_groups, num_requests, experts):
        """(r, groups, L, E) int32 counts and (r, groups) tokens: one bincount over (request, group, layer,
        expert + 1); expert -1 lands in column 0, which is dropped."""
        num_layers, num_experts = self.num_layers, self.num_experts
        row_key = (local * num_groups + group) * num_layers  # (n,)
        cells = (row_key[:, None, None] + np.arange(num_layers)[None, :, None]) * (num_experts + 1) \
            + experts.astype(np.int64) + 1  # (n, L, k)
        counts = np.bincount(cells.ravel(), minlength=num_requests * num_groups * num_layers * (num_experts + 1))
        counts = counts.reshape(num_requests, num_groups, num_layers, num_experts + 1)[..., 1:].astype(np.int32)
        tokens = np.bincount(local * num_groups + group, minlength=num_requests * num_groups)
        return counts, tokens.reshape(num_requests, num_groups)

    def add(self, batch: TraceBatch) -> "TraceStats":
        """Add one batch (in place)."""
        n, num_layers, top_k, num_experts = batch.num_tokens, self.num_layers, self.top_k, self.num_experts
        if n == 0:
            return self
        token_class = self.rule.classes(batch)  # (n,)
        first = int(batch.request[0])
        local = (batch.request - first).astype(np.int64)  # (n,) request within the batch
        num_requests = int(local[-1]) + 1
        counts, tokens = self._request_counts(local, token_class, len(CLASSES), num_requests, batch.experts)
        by_phase = None
        if self.rule.kind != "phase":  # the classes are not the phases: keep the phases apart for the findings
            by_phase = self._request_counts(local, phase_index(batch.phase), 3, num_requests, batch.experts)
        domain = np.zeros(num_requests, "<U1")
        if self.has_domain:
            starts = np.searchsorted(local, np.arange(num_requests))
            domain = batch.domain[starts]
        self.blocks.append((first, counts, tokens, domain, by_phase))
        # co-activation: pairs of slots a < b, both valid (top-k ids are distinct, so i != j)
        group = token_class[:, None].astype(np.int64) * num_layers + np.arange(num_layers)[None, :]  # (n, L)
        size = len(CLASSES) * num_layers * (num_experts + 1) ** 2
        pairs = np.zeros(size, np.int64)
        for a in range(top_k):
            for b in range(a + 1, top_k):
                key = (group * (num_experts + 1) + batch.experts[:, :, a] + 1) * (num_experts + 1) \
                    + batch.experts[:, :, b] + 1
                pairs += np.bincount(key.ravel(), minlength=size)
        pairs = pairs.reshape(len(CLASSES), num_layers, num_experts + 1, num_experts + 1)[:, :, 1:, 1:]
        load = counts.sum(0, dtype=np.int64)  # (4, L, E)
        coactivation = pairs + pairs.transpose(0, 1, 3, 2)
        diagonal = np.arange(num_experts)
        coactivation[:, :, diagonal, diagonal] = load
        self.coactivation += coactivation
        # samples: the tokens of each class, and all tokens
        rows = batch.rows
        hashes = row_hash(rows, self.seed)
        for name in SAMPLES:
            chosen = slice(None) if name == "all" else np.flatnonzero(token_class == SAMPLES.index(name))
            self.samples[name] = self.samples[name].offer(hashes[chosen], rows[chosen], batch.request[chosen],
                                                          token_class[chosen], batch.experts[chosen])
        self.num_tokens += n
        return self

    def merge(self, other: "TraceStats") -> "TraceStats":
        """The statistics of both parts (a new object; addition, so any order gives the same result)."""
        same = ("num_experts", "top_k", "num_layers", "model", "sample_size", "seed", "has_domain")
        for name in same:
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot merge statistics with {name}={getattr(self, name)!r} and "
                                 f"{getattr(other, name)!r}")
        a, b = self.rule, other.rule
        if (a.kind, a.window, a.num_requests) != (b.kind, b.window, b.num_requests) or \
                (a.head is not b.head and not np.array_equal(a.head, b.head)):
            raise ValueError("cannot merge statistics of tokens classed by different rules")
        merged = TraceStats(**{name: getattr(self, name) for name in same}, rule=self.rule)
        merged.num_tokens = self.num_tokens + other.num_tokens
        merged.blocks = self.blocks + other.blocks
        merged.coactivation = self.coactivation + other.coactivation
        merged.samples = {name: self.samples[name].merge(other.samples[name]) for name in SAMPLES}
        merged.runs = self.runs + other.runs
        return merged

    def finish(self) -> "TraceStats":
        """Combine the per-batch blocks into one dense block per array (in place; call once all is merged)."""
        if len(self.blocks) <= 1:
            return self
        self.blocks.sort(key=lambda block: block[0])
        num_requests = max(block[0] + len(block[1]) for block in self.blocks)
        shape = (self.num_layers, self.num_experts)
        counts = np.zeros((num_requests, len(CLASSES), *shape), np.int32)
        tokens = np.zeros((num_requests, len(CLASSES)), np.int64)
        domain = np.zeros(num_requests, dtype=np.result_type(*[block[3].dtype for block in self.blocks]))
        by_phase = None
        if self.rule.kind != "phase":
            by_phase = (np.zeros((num_requests, 3, *shape), np.int32), np.zeros((num_requests, 3), np.int64))
        while self.blocks:
            first, block_counts, block_tokens, block_domain, block_phase = self.blocks.pop(0)
            rows = slice(first, first + len(block_counts))
            counts[rows] += block_counts
            tokens[rows] += block_tokens
            domain[rows] = block_domain
            if by_phase is not None:
                by_phase[0][rows] += block_phase[0]
                by_phase[1][rows] += block_phase[1]
        self.blocks = [(0, counts, tokens, domain, by_phase)]
        return self

    # ---- what the findings and fits read ------------------------------------------------------------------
    def _block(self, index):
        if self.blocks:
            return self.finish().blocks[0][index]
        empty = (0, np.zeros((0, len(CLASSES), self.num_layers, self.num_experts), np.int32),
                 np.zeros((0, len(CLASSES)), np.int64), np.zeros(0, "<U1"),
                 None if self.rule.kind == "phase" else (np.zeros((0, 3, self.num_layers, self.num_experts), np.int32),
                                                         np.zeros((0, 3), np.int64)))
        return empty[index]

    @property
    def counts(self) -> np.ndarray:
        """int32 (R, 4, L, E): expert counts per request and class."""
        return self._block(1)

    @property
    def tokens(self) -> np.ndarray:
        """int64 (R, 4): tokens per request and class."""
        return self._block(2)

    @property
    def domain(self) -> np.ndarray:
        """unicode (R,): each request's domain label (shape (0,) when the trace has none)."""
        return self._block(3) if self.has_domain else np.zeros(0, "<U1")

    @property
    def num_requests(self) -> int:
        return len(self.tokens)

    def request_loads(self, classes=(0, 1, 2, 3), dtype=np.int64) -> np.ndarray:
        """(R, L, E) of ``dtype``: each request's expert counts over the given classes."""
        counts = self.counts
        if len(classes) == 1:
            return counts[:, classes[0]].astype(dtype)
        return counts[:, list(classes)].sum(1, dtype=dtype)

    def class_tokens(self, classes=(0, 1, 2, 3)) -> np.ndarray:
        """int64 (R,): tokens of each request in the given classes."""
        return self.tokens[:, list(classes)].sum(1)

    def _phase_rows(self, phases) -> list[int]:
        phases = (phases,) if isinstance(phases, (int, np.integer)) else tuple(phases)
        return [{0: 0, 1: 1, -1: 2}[p] for p in phases]

    def phase_loads(self, phases=(0, 1, -1)) -> np.ndarray:
        """int64 (R, L, E): each request's expert counts over its tokens of the given phases (0, 1, -1)."""
        rows = self._phase_rows(phases)
        if self.rule.kind == "phase":  # the classes are the phases, decode split at the window
            return self.request_loads(tuple(c for r in rows for c in ((0,), (1, 2), (3,))[r]))
        return self._block(4)[0][:, rows].sum(1, dtype=np.int64)

    def phase_tokens(self, phases=(0, 1, -1)) -> np.ndarray:
        """int64 (R,): tokens of each request in the given phases."""
        rows = self._phase_rows(phases)
        if self.rule.kind == "phase":
            return self.class_tokens(tuple(c for r in rows for c in ((0,), (1, 2), (3,))[r]))
        return self._block(4)[1][:, rows].sum(1)


def trace_stats(trace: Trace, rule: ClassRule | int = 8, sample_size: int | None = DEFAULT_SAMPLE_SIZE,
                seed: int = 0, batch_tokens: int = 1 << 18) -> TraceStats:
    """Pass 1 over an in-memory trace (the same partial function as for files, batch by batch). ``rule``: a
    ClassRule, or the online window of the phase rule; ``sample_size=None`` keeps every token in the samples."""
    size = max(trace.num_tokens, 1) if sample_size is None else sample_size
    stats = TraceStats.empty(trace.num_experts, trace.top_k, trace.num_layers, trace.model, rule, size, seed,
                             trace.has_domain)
    for batch in batches_of(trace, batch_tokens):
        stats.add(batch)
    return stats.finish()
