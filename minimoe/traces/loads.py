"""Load-only traces: how many tokens each expert received, without which token went where.

Serving engines record expert load as counts, not per-token routing (``minimoe.traces.load_dumps`` reads them).
A ``LoadTrace`` holds those counts in minimoe's layer numbering:

    counts[s, l, e]      (token, expert) pairs routed to expert e of MoE layer l in step s       int64 (S, L, E)
    layer_ids[l]         the model's layer index of MoE layer l (-1 where the source does not say)  int64 (L,)
    ordered              True when axis 0 is in time order (forward passes, iterations); False for a ring
                         buffer read out of order (SGLang's ``stat`` mode): then only totals mean anything
    coactivation[l,e,f]  tokens that chose both e and f in layer l (optional, TensorRT-LLM)         int64 (L, E, E)
    num_experts, top_k   routed experts per layer; experts per token (0 = the source does not say)
    model, source        names; ``notes`` str -> str what the source said that no array holds

What counts support: load imbalance, EPLB and load-aware placement, and (with co-activation) placement that keeps
experts used together on one node. What they cannot support: anything per token or per request (all-to-all
bytes, grouping, prefill -> decode); ``minimoe report`` says so in one line.

The file is an .npz (``LoadTrace.save`` / ``LoadTrace.load``, no pickles) marked by a 0-d ``kind = "loads"``;
``read_trace_file`` opens either kind of trace file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from minimoe.traces.format import MAX_EXPERTS, Trace
from minimoe.traces.npz import file_label, read_npz
from minimoe.traces.inputs import plural
from minimoe.traces.layer_ids import check_layer_ids

KIND = "loads"
MAX_COUNT = 2**53  # (token, expert) pairs a load trace may count in all: far beyond any run, exact in float64
_ARRAYS = ("kind", "counts", "layer_ids", "ordered", "num_experts", "top_k", "model", "source", "notes")


@dataclass(eq=False)
class LoadTrace:
    counts: np.ndarray                  # int64 (S, L, E)
    num_experts: int
    layer_ids: np.ndarray | None = None  # int64 (L,); None: -1 (unknown) for every layer
    ordered: bool = True
    top_k: int = 0
    model: str = ""
    source: str = ""
    coactivation: np.ndarray | None = None  # int64 (L, E, E)
    notes: dict | None = None

    def __post_init__(self):
        self.counts = _integers("counts", self.counts)
        if self.counts.ndim == 2:  # totals only: one step
            self.counts = self.counts[None]
        self.layer_ids = (np.full(self.counts.shape[1] if self.counts.ndim == 3 else 0, -1, np.int64)
                          if self.layer_ids is None else _integers("layer_ids", self.layer_ids))
        if self.coactivation is not None:
            self.coactivation = _integers("coactivation", self.coactivation)
        self.notes = {} if self.notes is None else dict(self.notes)
        self.validate()

    num_steps = property(lambda self: int(self.counts.shape[0]))
    num_layers = property(lambda self: int(self.counts.shape[1]))

    def validate(self) -> None:
        """Raise ValueError unless shapes, ranges and metadata are consistent."""
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {self.num_experts}")
        if not 0 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [0, num_experts] (0 = unknown), got {self.top_k}")
        if self.counts.ndim != 3 or self.counts.shape[0] < 1 or self.counts.shape[1] < 1 \
                or self.counts.shape[2] != self.num_experts:
            raise ValueError(f"counts must have shape (steps >= 1, MoE layers >= 1, num_experts={self.num_experts}), "
                             f"got {self.counts.shape}")
        if (self.counts < 0).any():
            step, layer, expert = np.argwhere(self.counts < 0)[0]
            raise ValueError(f"counts must be >= 0: step {step}, layer {layer}, expert {expert} holds "
                             f"{self.counts[step, layer, expert]}")
        if not self.counts.any():
            raise ValueError("counts are all zero: the source recorded no token")
        total = float(self.counts.sum(dtype=np.float64))  # an int64 sum could wrap around unseen
        if total >= MAX_COUNT:
            raise ValueError(f"counts sum to about {total:.3g} (token, expert) pairs, more than {MAX_COUNT:.3g}: "
                             "not the record of a real run")
        check_layer_ids(self.layer_ids, self.num_layers)
        if self.coactivation is not None:
            shape = (self.num_layers, self.num_experts, self.num_experts)
            if self.coactivation.shape != shape or (self.coactivation < 0).any():
                raise ValueError(f"coactivation must be non-negative with shape {shape}, "
                                 f"got shape {self.coactivation.shape}")
        if not isinstance(self.model, str) or not isinstance(self.source, str) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.notes.items()):
            raise ValueError("model and source must be str, notes a dict of str -> str")

    def loads(self, steps=None) -> np.ndarray:
        """(L, E) float64 pairs per expert, summed over all steps or over the bool mask ``steps`` (S,). Raises
        ValueError for a mask that is not bool (S,)."""
        if steps is not None:
            steps = np.asarray(steps)
            if steps.dtype != bool or steps.shape != (self.num_steps,):
                raise ValueError(f"steps must be a bool mask of shape ({self.num_steps},), got dtype {steps.dtype} "
                                 f"shape {steps.shape}")
        counts = self.counts if steps is None else self.counts[steps]
        return counts.sum(axis=0).astype(np.float64)

    def __eq__(self, other) -> bool:
        if not isinstance(other, LoadTrace):
            return NotImplemented
        same = (self.num_experts, self.top_k, self.model, self.source, self.ordered) == \
            (other.num_experts, other.top_k, other.model, other.source, other.ordered)
        co = (self.coactivation is None and other.coactivation is None) or (
            self.coactivation is not None and other.coactivation is not None
            and np.array_equal(self.coactivation, other.coactivation))
        return same and co and np.array_equal(self.counts, other.counts) and np.array_equal(self.layer_ids,
                                                                                             other.layer_ids)

    def __repr__(self) -> str:
        return (f"LoadTrace(source={self.source!r}, model={self.model!r}, steps={self.num_steps}, "
                f"layers={self.layer_ids.tolist()}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"ordered={self.ordered}, coactivation={self.coactivation is not None})")

    def summary(self) -> str:
        """What the counts hold and what they cannot tell, in a few lines (``minimoe import`` prints it)."""
        pairs = int(self.counts.sum())
        tokens = f", about {pairs // (self.top_k * self.num_layers):,} tokens" if self.top_k else ""
        lines = [f"{self.source or 'load counts'}: {plural(self.num_steps, 'step')}, "
                 f"{plural(self.num_layers, 'MoE layer')} (model layers "
                 f"{_ranges(self.layer_ids)}), {self.num_experts} experts, {pairs:,} (token, expert) pairs{tokens}",
                 "steps: in time order" if self.ordered else
                 "steps: not in time order (a ring buffer): only the totals are used",
                 "co-activation: " + ("yes (pairs of experts chosen together)" if self.coactivation is not None
                                      else "no"),
                 "per-token routing: none (counts only): all-to-all bytes, grouping and prefill/decode findings "
                 "need a routing capture"]
        lines += [f"note: {key}: {value}" for key, value in self.notes.items()]
        return "\n".join(lines)

    # ---- files -------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write an .npz (no pickles) that ``LoadTrace.load`` and ``read_trace_file`` read back exactly."""
        arrays = dict(kind=np.array(KIND), counts=self.counts, layer_ids=self.layer_ids,
                      ordered=np.array(bool(self.ordered)), num_experts=np.array(self.num_experts, np.int64),
                      top_k=np.array(self.top_k, np.int64), model=np.array(self.model), source=np.array(self.source),
                      notes=np.array(json.dumps(self.notes, sort_keys=True)))
        if self.coactivation is not None:
            arrays["coactivation"] = self.coactivation
        with open(path, "wb") as file:
            np.savez_compressed(file, **arrays)

    @classmethod
    def load(cls, path) -> "LoadTrace":
        return _from_arrays(read_npz(path), path)


def _from_arrays(arrays: dict, path) -> LoadTrace:
    missing = [name for name in _ARRAYS if name not in arrays]
    unknown = sorted(set(arrays) - set(_ARRAYS) - {"coactivation"})
    if missing or unknown or str(arrays["kind"]) != KIND:
        raise ValueError(f"load trace file {file_label(path)}: missing arrays {missing}, unexpected {unknown}; "
                         f"expected "
                         f"{list(_ARRAYS)} (kind='{KIND}') and optionally coactivation")
    try:
        scalars = {name: arrays[name].item() for name in ("num_experts", "top_k", "model", "source", "ordered")}
        if any(arrays[name].shape != () for name in scalars):
            raise ValueError("num_experts, top_k, model, source and ordered must be 0-d arrays")
        notes = json.loads(str(arrays["notes"]))
        if not isinstance(notes, dict):
            raise ValueError("notes must hold a JSON object")
        return LoadTrace(counts=arrays["counts"], layer_ids=arrays["layer_ids"],
                         coactivation=arrays.get("coactivation"), notes=notes,
                         num_experts=int(scalars["num_experts"]), top_k=int(scalars["top_k"]),
                         model=str(scalars["model"]), source=str(scalars["source"]), ordered=bool(scalars["ordered"]))
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"load trace file {file_label(path)}: {error}") from None


def read_trace_file(path) -> Trace | LoadTrace:
    """A per-token ``Trace`` or a ``LoadTrace``, whichever the .npz file holds (both checked strictly). A
    per-token trace must hold a token and, in every MoE layer, an expert id: ValueError naming the file."""
    arrays = read_npz(path)
    if "kind" in arrays:
        return _from_arrays(arrays, path)
    trace = Trace.load(path)
    if trace.num_tokens == 0:
        raise ValueError(f"trace file {file_label(path)} holds no token: there is nothing to measure")
    empty = np.flatnonzero((trace.experts < 0).all(axis=(0, 2)))
    if empty.size:
        raise ValueError(f"trace file {file_label(path)}: MoE layer {int(empty[0])} holds no expert id (all -1): "
                         f"a dense "
                         "layer, or a layer the capture never wrote")
    return trace


def _integers(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and np.isfinite(array).all()
                                             and (array == np.round(array)).all()):
        raise ValueError(f"{name} must hold whole numbers, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds values beyond int64")
    return array.astype(np.int64)


def _ranges(ids: np.ndarray) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"; -1 (unknown) -> "unknown"."""
    ids = [int(i) for i in ids]
    if any(i < 0 for i in ids):
        return "unknown"
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            parts.append(str(ids[start]) if i - 1 == start else f"{ids[start]}-{ids[i - 1]}")
            start = i
    return ", ".join(parts)
