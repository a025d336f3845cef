"""Which tokens a placement is fitted on and which it is measured on, for every trace a user can bring.

The protocol of ``minimoe.placement.experiments`` fits on prefill and measures held-out decode tokens. Traces
from serving logs often do not say which tokens are prompt and which are generated (phase -1); placement is
still a question for them, so the split falls back to what the trace does support, and says which one it used:

    phase     prefill and decode known: fit on prefill (or the first ``window`` decode tokens, "online", or the
              evaluated tokens, "oracle"); measure each request's decode tokens after the window
    time      phases unknown (or one phase only): each request's tokens are in generation order, so its first
              half stands in for the prompt (what is known when the request is placed) and its later tokens
              for decode: fit on the first halves (or the first ``window`` tokens after them, or the evaluated
              tokens), measure each request's tokens after half + window
    request   requests too short to split in time: fit on the earlier half of the requests (in arrival order)
              and measure the later half; a placement is then judged on requests it never saw. Grouping routes
              a request by its own early tokens, which such requests do not have, so only placements are compared,
              and there is no online window

Every split returns boolean token masks with the keys of ``experiments.masks``: "prefill" (the fitting set of
the first fit mode, whatever stands in for prefill), "online", "oracle" and "eval"; a fit mode the split cannot
support maps to None. For a trace read in batches (a Parquet file), ``choose_split`` makes the same choice
from one read of its request, phase and step columns and returns it as a ``StreamSplit``, whose
``minimoe.traces.stats.ClassRule`` puts every token of a batch in its class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minimoe.placement.experiments import FIT_MODES, METHODS, decode_index, default_window, masks
from minimoe.traces.format import Trace
from minimoe.traces.parquet import ParquetTrace
from minimoe.traces.stats import ClassRule

KINDS = ("phase", "time", "request")
PLACEMENT_ONLY = ("contiguous", "round_robin", "eplb", "locality")
LABELS = {  # the column names of the three fit modes under each split
    "phase": {"prefill": "prefill", "online": "online", "oracle": "oracle"},
    "time": {"prefill": "first half", "online": "online", "oracle": "oracle"},
    "request": {"prefill": "earlier requests", "online": "—", "oracle": "oracle"},
}


@dataclass
class Split:
    kind: str                    # one of KINDS
    window: int | None           # the online window (tokens per request), None for "request"
    masks: dict                  # fit mode or "eval" -> bool (N,) mask, or None where unsupported
    description: str             # one sentence for the report
    fit_modes: tuple = FIT_MODES
    methods: tuple = METHODS

    @property
    def labels(self) -> dict:
        return LABELS[self.kind]


def position_index(trace) -> np.ndarray:
    """(N,) position of each token within its request (0 = the request's first token)."""
    starts, _ = trace.request_ranges()
    return np.arange(trace.num_tokens) - starts[trace.request]


def _time_masks(trace, window: int | None):
    """(masks, window) of the time split; masks is None when no request has a token after half + window."""
    starts, ends = trace.request_ranges()
    length = (ends - starts)[trace.request]  # (N,) tokens of each token's request
    head = (length + 1) // 2  # the first half, rounded up: at least one token
    position = position_index(trace)
    after = position - head  # -1.. within the head, 0.. after it
    if window is None:
        longest_tail = int((ends - starts - (ends - starts + 1) // 2).max()) if trace.num_requests else 0
        window = int(min(8, max(1, longest_tail // 4)))
    evaluated = after >= window
    if not evaluated.any():
        return None, window
    return {"prefill": after < 0, "online": (after >= 0) & (after < window), "oracle": evaluated,
            "eval": evaluated}, window


def split(trace, window: int | None = None, kind: str | None = None) -> Split:
    """The split for ``trace`` (see the module docstring): ``kind`` None picks phase, else time, else request.

    ``window`` None picks the default (``experiments.default_window`` for the phase split; a quarter of the
    longest second half, 1 to 8, for the time split). Raises ValueError when the trace supports no split (a
    single token), or when ``kind``/``window`` are given and impossible (the message says why)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"split kind must be one of {KINDS}, got {kind!r}")
    if trace.num_tokens == 0:
        raise ValueError("the trace is empty")
    has_phases = bool((trace.phase == 0).any() and (trace.phase == 1).any())
    if kind == "phase" or (kind is None and has_phases):
        chosen = default_window(trace) if window is None else window
        try:
            token_sets = masks(trace, chosen)
        except ValueError:
            if kind == "phase" or window is not None:
                raise
        else:
            return Split("phase", chosen, token_sets,
                         f"fitted on prefill tokens, measured on each request's decode tokens after the first "
                         f"{chosen}")
    why = ("phases unknown" if (trace.phase == -1).all() else
           "the trace has no decode tokens" if not (trace.phase == 1).any() else
           "the trace has no prefill tokens" if not (trace.phase == 0).any() else
           "no request decodes past the default online window")
    if kind in (None, "time"):
        token_sets, chosen = _time_masks(trace, window)
        if token_sets is not None:
            return Split("time", chosen, token_sets,
                         f"{why}: each request's first half of tokens stands in for its prompt; fitted on those, "
                         f"measured on each request's tokens after its first half and an online window of the next "
                         f"{chosen} (the window the online fit sees)")
        if kind == "time" or window is not None:
            raise ValueError(f"no request has a token after its first half and an online window of {chosen}"
                             + (": use a smaller window" if chosen > 1 else ""))
    if trace.num_requests < 2:
        raise ValueError(f"{why} and the trace holds {trace.num_tokens} token(s) of one request: too little to fit "
                         "a placement on one part and measure it on another")
    earlier = trace.request < trace.num_requests // 2
    return Split("request", None, {"prefill": earlier, "online": None, "oracle": ~earlier, "eval": ~earlier},
                 f"{why} and requests are too short to split in time: fitted on the first "
                 f"{trace.num_requests // 2} requests, measured on the other "
                 f"{trace.num_requests - trace.num_requests // 2} (placements only: grouping needs each request's own "
                 "early tokens)",
                 fit_modes=("prefill", "oracle"), methods=PLACEMENT_ONLY)


__all__ = ["KINDS", "Split", "decode_index", "position_index", "split"]


# ---- the same choice for a trace read in batches ----------------------------------------------------------
@dataclass
class StreamSplit:
    """What a streamed report fits on and measures (``minimoe.placement.splits``), as a rule for batches."""

    kind: str
    window: int | None
    description: str
    fit_modes: tuple
    methods: tuple
    rule: ClassRule


def choose_split(source, window: int | None = None) -> StreamSplit:
    """The split ``minimoe.placement.splits.split`` picks, for an in-memory trace or a Parquet file; for a file
    from one read of its request, phase and step columns (the tokens are never all in memory). Raises
    ValueError as ``split`` does."""
    if isinstance(source, Trace):
        chosen = split(source, window)
        starts, ends = source.request_ranges()
        rule = ClassRule(chosen.kind, chosen.window or 0, (ends - starts + 1) // 2 if chosen.kind == "time" else None,
                         source.num_requests)
        return StreamSplit(chosen.kind, chosen.window, chosen.description, chosen.fit_modes, chosen.methods, rule)
    lengths, prefill, decode, longest = _scan(source)
    num_requests = len(lengths)
    if source.num_tokens == 0:
        raise ValueError("the trace is empty")
    if prefill and decode:
        chosen = min(8, max(1, longest // 4)) if window is None else window
        if chosen < longest:
            return StreamSplit("phase", chosen, f"fitted on prefill tokens, measured on each request's decode tokens "
                               f"after the first {chosen}", FIT_MODES, METHODS, ClassRule("phase", chosen))
        if window is not None:
            raise ValueError(f"no decode token lies after the online window of {window} tokens: the longest request "
                             f"decodes {longest}; use a window of at most {longest - 1}")
    why = ("phases unknown" if not (prefill or decode) else "the trace has no decode tokens" if not decode else
           "the trace has no prefill tokens" if not prefill else "no request decodes past the default online window")
    head = (lengths + 1) // 2
    tail = int((lengths - head).max()) if num_requests else 0
    chosen = int(min(8, max(1, tail // 4))) if window is None else window
    if chosen < tail:
        return StreamSplit("time", chosen, f"{why}: each request's first half of tokens stands in for its prompt; "
                           f"fitted on those, measured on each request's tokens after its first half and an online "
                           f"window of the next {chosen} (the window the online fit sees)", FIT_MODES, METHODS, ClassRule("time", chosen, head, num_requests))
    if window is not None:
        raise ValueError(f"no request has a token after its first half and an online window of {chosen}"
                         + (": use a smaller window" if chosen > 1 else ""))
    if num_requests < 2:
        raise ValueError(f"{why} and the trace holds {source.num_tokens} token(s) of one request: too little to fit "
                         "a placement on one part and measure it on another")
    return StreamSplit("request", None, f"{why} and requests are too short to split in time: fitted on the first "
                       f"{num_requests // 2} requests, measured on the other {num_requests - num_requests // 2} "
                       "(placements only: grouping needs each request's own early tokens)",
                       ("prefill", "oracle"), PLACEMENT_ONLY, ClassRule("request", 0, None, num_requests))


def _scan(source: ParquetTrace):
    """(tokens per request (R,), any prefill token, any decode token, decode tokens of the longest request)."""
    lengths, prefill, decode, longest = np.zeros(0, np.int64), False, False, 0
    for batch in source.records(["request", "phase", "step"]):
        request = batch.column("request").to_numpy()
        phase = batch.column("phase").to_numpy()
        counts = np.bincount(request)
        if len(counts) > len(lengths):
            lengths = np.concatenate([lengths, np.zeros(len(counts) - len(lengths), np.int64)])
        lengths[:len(counts)] += counts
        prefill |= bool((phase == 0).any())
        decode |= bool((phase == 1).any())
        if decode:
            longest = max(longest, int(batch.column("step").to_numpy().max()) + 1)
    return lengths, prefill, decode, longest
