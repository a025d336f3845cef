"""Expert-activation traces: which experts every token was routed to, in every MoE layer.

A trace is the raw material of the expert-activation paper ("Scaling Multi-Node Mixture-of-Experts Inference
Using Expert Activation Patterns", arXiv 2604.23150): for N tokens, L MoE layers and top-k routing it holds

    experts[n, l, :]  the k expert ids token n was sent to in MoE layer l   (-1 = no expert)
    weights[n, l, :]  the routing weights of those experts (optional)
    request[n]        the request (prompt) the token belongs to; ids 0..R-1, each request's tokens
                      contiguous and in generation order
    phase[n]          0 = prefill (prompt token), 1 = decode (generated token), -1 = unknown
    domain[n]         a label of the request's workload ("code", "math", ...), or an empty array

Everything downstream (analysis, placement, grouping, traffic) reads only this type. The file is an .npz
archive, readable by ``numpy.load(path, allow_pickle=False)``, holding exactly these arrays:

| array         | dtype, shape             | meaning                                                         |
|---------------|--------------------------|-----------------------------------------------------------------|
| ``experts``   | int16 (N, L, k)          | expert ids of each token at each MoE layer; -1 = none           |
| ``request``   | int32 (N,)               | request id of each token: 0..R-1, each request contiguous, in order |
| ``phase``     | int8 (N,)                | 0 prefill, 1 decode, -1 unknown                                 |
| ``domain``    | unicode (N,), () or (0,) | workload label of each token, constant within a request; a 0-d  |
|               |                          | string labels every token (one workload per file); (0,) = none  |
| ``weights``   | float16 (N, L, k), optional | routing weights                                              |
| ``model``     | unicode ()               | the model's name (may be empty)                                 |
| ``num_experts``, ``top_k`` | integer ()  | routed experts per MoE layer, experts chosen per token          |
| ``notes``     | unicode (), optional     | a JSON object of str -> str: what the source said that no array |
|               |                          | holds (an engine's version, fields a log had and minimoe did not |
|               |                          | read, assumptions an importer made); never used in a computation |
| ``layer_ids`` | int64 (L,), optional     | the model's layer index of each MoE layer, increasing; -1 (or no |
|               |                          | array) where the source does not say                             |

Only MoE layers belong in ``experts``: dense layers of models that interleave them (DeepSeek-V3's first
layers, Llama 4) are left out, so axis 1 counts MoE layers, and ``layer_ids`` says which model layers they are (a log of
layers 0 and 15 of a 16-layer model holds L = 2 and ``layer_ids`` [0, 15]): placements fitted on the trace
carry them to ``minimoe export``. (A minimoe that predates ``layer_ids`` refuses a file holding them: it accepts no
array it does not know.) A 0-d ``domain`` is expanded to one label per
token when loaded (and saved that way). Loading trusts nothing: every array's dtype and shape
(``minimoe.traces.trace_file``), every id range and metadata field are checked, object arrays and pickles are
refused, and any damaged file raises ValueError naming the file and what was wrong (for an expert id out of
range: the token and layer). ``minimoe.traces.importers`` converts serving-system logs (vLLM, SGLang, JSONL) to
this format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minimoe.traces.layer_ids import as_layer_ids, check_layer_ids
from minimoe.traces.npz import file_label
from minimoe.traces.trace_file import trace_fields, write_trace

MAX_EXPERTS = 32768  # ids must fit int16: 0 .. 32767
PHASES = {"prefill": 0, "decode": 1, "unknown": -1}


def _as_int(name: str, values, dtype) -> np.ndarray:
    """Convert integer-valued input to `dtype`, refusing floats/bools and values that would not fit."""
    array = np.asarray(values)
    if array.dtype == dtype:
        return array
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise ValueError(f"{name} must hold integers ({np.dtype(dtype).name}), got dtype {array.dtype}")
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"{name} values must fit {np.dtype(dtype).name} [{info.min}, {info.max}], "
                         f"got range [{array.min()}, {array.max()}]")
    return array.astype(dtype)


def _as_count(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


@dataclass(eq=False)
class Trace:
    experts: np.ndarray        # int16 (N, L, k): expert ids per token and MoE layer, -1 = none
    request: np.ndarray        # int32 (N,): request id of each token, dense 0..R-1, contiguous, in order
    phase: np.ndarray          # int8 (N,): 0 prefill, 1 decode, -1 unknown
    domain: np.ndarray         # unicode (N,); a str (or 0-d array) labels every token; shape (0,) = unknown
    num_experts: int
    top_k: int
    model: str = ""
    weights: np.ndarray | None = None   # float16 (N, L, k)
    notes: dict | None = None           # str -> str: provenance only (not compared by ==, never computed on)
    layer_ids: np.ndarray | None = None  # int64 (L,): model layer index of each MoE layer, -1 = unknown

    def __post_init__(self):
        # Convenience conversions for in-memory construction (files are checked strictly in `load`).
        self.experts = _as_int("experts", self.experts, np.int16)
        self.request = _as_int("request", self.request, np.int32)
        self.phase = _as_int("phase", self.phase, np.int8)
        self.domain = np.zeros(0, "<U1") if self.domain is None else np.asarray(self.domain)
        if self.domain.ndim == 0 and self.domain.dtype.kind == "U":  # one label for the whole trace
            self.domain = np.full(self.experts.shape[0] if self.experts.ndim else 0, self.domain)
        if self.domain.size == 0 and self.domain.ndim == 1:
            self.domain = self.domain.astype("<U1")
        self.num_experts = _as_count("num_experts", self.num_experts)
        self.top_k = _as_count("top_k", self.top_k)
        if self.weights is not None:
            self.weights = np.asarray(self.weights)
            if self.weights.dtype.kind == "f" and self.weights.dtype != np.float16:
                with np.errstate(over="ignore"):
                    self.weights = self.weights.astype(np.float16)
        self.notes = {} if self.notes is None else dict(self.notes)
        self.layer_ids = as_layer_ids(self.layer_ids, self.experts.shape[1] if self.experts.ndim == 3 else 0)
        self.validate()

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def num_requests(self) -> int:
        return int(self.request[-1]) + 1 if self.request.size else 0

    @property
    def has_domain(self) -> bool:
        return self.domain.shape[0] == self.num_tokens and self.num_tokens > 0

    # ---- validation --------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError unless every array has the documented dtype, shape and value range."""
        if not isinstance(self.model, str):
            raise ValueError(f"model must be a str, got {type(self.model).__name__}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.notes.items()):
            raise ValueError(f"notes must map str to str, got {self.notes!r:.200}")
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        for name, dtype in (("experts", np.int16), ("request", np.int32), ("phase", np.int8)):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name} must be a numpy {np.dtype(dtype).name} array, got "
                                 f"{getattr(array, 'dtype', type(array).__name__)}")
        if self.experts.ndim != 3 or self.experts.shape[1] < 1 or self.experts.shape[2] != self.top_k:
            raise ValueError(f"experts must have shape (N, L>=1, top_k={self.top_k}), got {self.experts.shape}")
        check_layer_ids(self.layer_ids, self.num_layers)
        n = self.num_tokens
        for name in ("request", "phase"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) like experts, got {getattr(self, name).shape}")
        if self.domain.dtype.kind != "U" or self.domain.ndim != 1 or self.domain.shape[0] not in (0, n):
            raise ValueError(f"domain must be a unicode array of shape ({n},), a single string, or shape (0,), "
                             f"got dtype {self.domain.dtype} shape {self.domain.shape}")
        if self.weights is not None:
            if not isinstance(self.weights, np.ndarray) or self.weights.dtype != np.float16:
                raise ValueError(f"weights must be a float16 array, got {getattr(self.weights, 'dtype', None)}")
            if self.weights.shape != self.experts.shape:
                raise ValueError(f"weights must have the shape of experts {self.experts.shape}, "
                                 f"got {self.weights.shape}")
            if not np.isfinite(self.weights).all():
                raise ValueError("weights must be finite (found NaN or inf, e.g. a value beyond float16 range)")
            if (self.weights < 0).any():
                token = int(np.argwhere(self.weights < 0)[0][0])
                raise ValueError(f"weights must be >= 0 (a router's softmax or sigmoid scores), got "
                                 f"{float(self.weights.min()):g} at token {token}")
        if n == 0:
            return
        outside = (self.experts < -1) | (self.experts >= self.num_experts)
        if outside.any():
            token, layer, _ = np.argwhere(outside)[0]
            raise ValueError(f"experts ids must be in [-1, num_experts-1={self.num_experts - 1}]: token {token} "
                             f"(request {self.request[token]}) has {self.experts[token, layer].tolist()} in MoE "
                             f"layer {layer}; the whole trace spans [{self.experts.min()}, {self.experts.max()}]")
        ordered = np.sort(self.experts, axis=2)  # (N, L, k)
        repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        if repeated.any():
            token, layer, _ = np.argwhere(repeated)[0]
            raise ValueError(f"experts repeats an expert id within token {token}, layer {layer}: "
                             f"{self.experts[token, layer].tolist()}; top-k ids must be distinct")
        if not np.isin(self.phase, (-1, 0, 1)).all():
            raise ValueError(f"phase values must be -1, 0 or 1, got {np.unique(self.phase).tolist()}")
        step = np.diff(self.request)
        if self.request[0] != 0 or ((step != 0) & (step != 1)).any():
            bad = int(np.flatnonzero((step != 0) & (step != 1))[0]) + 1 if self.request[0] == 0 else 0
            raise ValueError(f"request ids must start at 0 and grow by 0 or 1 per token (dense ids, each "
                             f"request contiguous and in order); token {bad} has request {self.request[bad]}"
                             f" after {self.request[bad - 1] if bad else 'nothing'}")
        if self.has_domain:
            changed = (self.domain[1:] != self.domain[:-1]) & (step == 0)
            if changed.any():
                bad = int(np.flatnonzero(changed)[0]) + 1
                raise ValueError(f"domain must be constant within a request; request {self.request[bad]} "
                                 f"has {str(self.domain[bad - 1])!r} and {str(self.domain[bad])!r}")

    def __eq__(self, other) -> bool:
        """Same routing, requests, phases, domains, weights, layer ids and metadata (``notes`` are not compared)."""
        if not isinstance(other, Trace):
            return NotImplemented
        same_meta = (self.model, self.num_experts, self.top_k) == (other.model, other.num_experts, other.top_k)
        arrays = [(a, b) for a, b in ((self.experts, other.experts), (self.request, other.request),
                                      (self.phase, other.phase), (self.domain, other.domain),
                                      (self.layer_ids, other.layer_ids))]
        if (self.weights is None) != (other.weights is None):
            return False
        if self.weights is not None:
            arrays.append((self.weights, other.weights))
        return same_meta and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in arrays)

    def __repr__(self) -> str:
        return (f"Trace(model={self.model!r}, tokens={self.num_tokens}, layers={self.num_layers}, "
                f"requests={self.num_requests}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"domains={sorted(set(self.domain.tolist()))}, weights={self.weights is not None}, "
                f"layer_ids={self.layer_ids.tolist()})")

    # ---- per-request views -------------------------------------------------------------------------------
    def request_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends), int64 (R,): tokens of request r are rows starts[r]:ends[r]."""
        ids = np.arange(self.num_requests)
        return np.searchsorted(self.request, ids, "left"), np.searchsorted(self.request, ids, "right")

    def request_domains(self) -> np.ndarray:
        """Domain label of each request, unicode (R,); shape (0,) when the trace has no domains."""
        if not self.has_domain:
            return self.domain[:0]
        return self.domain[self.request_ranges()[0]]

    # ---- selection ---------------------------------------------------------------------------------------
    def select(self, token_mask) -> Trace:
        """Keep the tokens where `token_mask` (bool (N,)) is True; request ids are renumbered densely."""
        mask = np.asarray(token_mask)
        if mask.dtype != np.bool_ or mask.shape != (self.num_tokens,):
            raise ValueError(f"token_mask must be a bool array of shape ({self.num_tokens},), "
                             f"got dtype {mask.dtype} shape {mask.shape}")
        request = self.request[mask]
        starts = np.ones(request.shape, np.int32)  # 1 where a new request begins
        starts[1:] = request[1:] != request[:-1]
        return Trace(experts=self.experts[mask], request=np.cumsum(starts, dtype=np.int32) - 1,
                     phase=self.phase[mask], domain=self.domain[mask] if self.has_domain else self.domain,
                     num_experts=self.num_experts, top_k=self.top_k, model=self.model,
                     weights=None if self.weights is None else self.weights[mask], notes=self.notes,
                     layer_ids=self.layer_ids)

    def where(self, phase: int | str | None = None, domain: str | list[str] | None = None) -> Trace:
        """Tokens of one phase (0/1/-1 or "prefill"/"decode"/"unknown") and/or of the given domain(s)."""
        mask = np.ones(self.num_tokens, bool)
        if phase is not None:
            code = PHASES.get(phase, phase) if isinstance(phase, str) else phase
            if code not in (-1, 0, 1):
                raise ValueError(f"phase must be one of {list(PHASES)} or -1/0/1, got {phase!r}")
            mask &= self.phase == code
        if domain is not None:
            if not self.has_domain and self.num_tokens:
                raise ValueError("this trace has no domain labels, cannot select by domain")
            mask &= np.isin(self.domain, [domain] if isinstance(domain, str) else list(domain))
        return self.select(mask)

    def requests(self, ids) -> Trace:
        """Tokens of the given request ids (kept in their original order, then renumbered 0..len-1)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0
                                           or ids.max() >= self.num_requests)):
            raise ValueError(f"request ids must be a 1-d integer array in [0, {self.num_requests}), got {ids!r}")
        return self.select(np.isin(self.request, ids))

    def layers(self, ids) -> Trace:
        """Keep only the given MoE layers (indices into axis 1 of experts), in the given order; a trace whose
        ``layer_ids`` are known keeps the model's order, so its ``ids`` must increase."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu" or ids.min() < 0 \
                or ids.max() >= self.num_layers:
            raise ValueError(f"layer ids must be a non-empty 1-d integer array in [0, {self.num_layers}), "
                             f"got {ids!r}")
        if (self.layer_ids >= 0).any() and (np.diff(ids) <= 0).any():
            raise ValueError(f"layer ids {ids.tolist()} reorder the MoE layers of a trace that records them as model "
                             f"layers {self.layer_ids.tolist()}: give them in increasing order")
        return Trace(experts=self.experts[:, ids], request=self.request, phase=self.phase,
                     domain=self.domain, num_experts=self.num_experts, top_k=self.top_k, model=self.model,
                     weights=None if self.weights is None else self.weights[:, ids], notes=self.notes,
                     layer_ids=self.layer_ids[ids])

    # ---- files (the .npz layout and its checks: ``minimoe.traces.trace_file``) --------------------------------
    def save(self, path) -> None:
        """Write the trace as a compressed .npz at exactly `path` (or into a seekable binary file object). Raises
        ValueError for a path ending in .parquet (``minimoe.traces.parquet_writer.save_trace`` writes that format)."""
        write_trace(self, path)

    @classmethod
    def load(cls, path) -> Trace:
        """Read and validate a trace file (a path or a binary file object).

        Raises FileNotFoundError for a missing path, and ValueError naming the file for anything else.
        """
        fields = trace_fields(path)
        try:
            return cls(**fields)
        except ValueError as error:
            raise ValueError(f"trace file {file_label(path)}: {error}") from None


def concat(traces: list[Trace]) -> Trace:
    """Join traces of the same model one after another; requests are renumbered to stay dense 0..R-1."""
    traces = list(traces)
    if not traces:
        raise ValueError("concat needs at least one trace")
    first = traces[0]
    for index, trace in enumerate(traces[1:], 1):
        for attr in ("model", "num_experts", "top_k", "num_layers"):
            if getattr(trace, attr) != getattr(first, attr):
                raise ValueError(f"concat: trace {index} has {attr}={getattr(trace, attr)!r}, "
                                 f"trace 0 has {getattr(first, attr)!r}")
        if not np.array_equal(trace.layer_ids, first.layer_ids):
            raise ValueError(f"concat: trace {index} has layer_ids {trace.layer_ids.tolist()}, trace 0 has "
                             f"{first.layer_ids.tolist()}")
    nonempty = [t for t in traces if t.num_tokens]
    if len({t.has_domain for t in nonempty}) > 1:
        raise ValueError("concat: some traces have domain labels and some do not")
    if len({t.weights is None for t in traces}) > 1:
        raise ValueError("concat: some traces have weights and some do not (drop them with weights=None)")
    offsets = np.cumsum([0] + [t.num_requests for t in traces[:-1]])
    has_domain = bool(nonempty) and nonempty[0].has_domain
    return Trace(experts=np.concatenate([t.experts for t in traces]),
                 request=np.concatenate([t.request + np.int32(o) for t, o in zip(traces, offsets)]),
                 phase=np.concatenate([t.phase for t in traces]),
                 domain=np.concatenate([t.domain for t in traces]) if has_domain else None,
                 num_experts=first.num_experts, top_k=first.top_k, model=first.model,
                 weights=None if first.weights is None else np.concatenate([t.weights for t in traces]),
                 notes=first.notes, layer_ids=first.layer_ids)

