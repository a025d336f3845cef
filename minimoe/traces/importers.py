"""Importers: routing records written by serving systems, converted to a minimoe `Trace`.

1. vLLM routed experts (`enable_return_routed_experts=True`, the "rollout router replay" capture). For each
   request vLLM returns one integer array `routed_experts` of shape (S - 1, num_layers, top_k): S is the
   prompt length plus the number of generated tokens, and the last generated token has no row because it was
   never fed back through the model. Rows 0..P-1 are the prompt (prefill), rows P.. the decode steps.
   `from_vllm` takes the list of those arrays. Which layers are MoE layers is the caller's knowledge
   (`moe_layers`): a model with dense first layers (DeepSeek-V3 `first_k_dense_replace`) or interleaved
   dense/MoE layers (Llama 4) may report rows for every layer; only the MoE ones belong in a trace.

2. SGLang `return_routed_experts`: `meta_info["routed_experts"]` is a base64 string of int32 values ordered
   (token, layer, slot); non-MoE layers hold -1. `from_sglang` decodes and reshapes each payload to
   (tokens, num_layers, top_k) and hands over to `from_vllm` (with moe_layers="auto" by default).

3. JSONL routing logs, one JSON object per line and token:

       {"request": 7, "phase": "decode", "domain": "math", "position": 12,
        "experts": [[3, 17], [5, 1], ...], "weights": [[0.61, 0.39], [0.7, 0.3], ...]}

   request   int or str, required: requests may interleave in the file (as a server batches them); each
             request's tokens are gathered in order of first appearance of the request
   experts   required: one list of expert ids per MoE layer (shorter lists are padded with -1)
   phase     optional: "prefill" / "decode" / "unknown" or 0 / 1 / -1 (default unknown)
   domain    optional str: if any line has one, every line must
   position  optional int: orders tokens within a request (default: order of lines)
   weights   optional: same nesting as experts; if any line has weights, every line must
   Blank lines are skipped; any other malformed line raises ValueError naming its line number.
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np

from minimoe.traces.format import PHASES, Trace, _as_count


def from_vllm(routed_experts, num_experts: int, prompt_lengths=None, domains=None, moe_layers=None,
              model: str = "") -> Trace:
    """Requests' vLLM `routed_experts` arrays, each (S-1, num_layers, top_k), as one Trace (request r = index r).

    prompt_lengths: tokens of each request's prompt (rows before it are prefill, after it decode); None marks
    every phase unknown. domains: one label per request or None. moe_layers: layer indices to keep (axis 1),
    None = all, "auto" = the layers holding at least one expert id (dense layers reported as all -1 go).
    """
    arrays = [np.asarray(a) for a in routed_experts]
    if not arrays:
        raise ValueError("routed_experts is empty: expected one array per request")
    for index, array in enumerate(arrays):
        if array.ndim != 3 or array.dtype.kind not in "iu":
            raise ValueError(f"routed_experts[{index}] must be an integer array (tokens, layers, top_k), "
                             f"got dtype {array.dtype} shape {array.shape}")
        if array.shape[1:] != arrays[0].shape[1:]:
            raise ValueError(f"routed_experts[{index}] has (layers, top_k) = {array.shape[1:]}, "
                             f"request 0 has {arrays[0].shape[1:]}")
    lengths = np.array([a.shape[0] for a in arrays])
    experts = np.concatenate(arrays)  # (N, num_layers, top_k)
    if isinstance(moe_layers, str) and moe_layers == "auto":
        moe_layers = np.flatnonzero((experts >= 0).any(axis=(0, 2)))
    if moe_layers is not None:
        layer_ids = np.asarray(moe_layers)
        if layer_ids.ndim != 1 or layer_ids.dtype.kind not in "iu" or layer_ids.size == 0 or \
                layer_ids.min() < 0 or layer_ids.max() >= experts.shape[1]:
            raise ValueError(f"moe_layers must be layer indices in [0, {experts.shape[1]}), got {moe_layers!r}")
        experts = experts[:, layer_ids]
    phase = np.full(len(experts), -1, np.int8)
    if prompt_lengths is not None:
        prompt_lengths = np.asarray(prompt_lengths)
        if prompt_lengths.shape != lengths.shape or prompt_lengths.dtype.kind not in "iu" \
                or (prompt_lengths < 0).any() or (prompt_lengths > lengths).any():
            raise ValueError(f"prompt_lengths must give, for each of the {len(arrays)} requests, a count in "
                             f"[0, rows of its array] = {lengths.tolist()}, got {prompt_lengths.tolist()}")
        position = np.arange(len(experts)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        phase[:] = position >= np.repeat(prompt_lengths, lengths)
    domain = None
    if domains is not None:
        if len(domains) != len(arrays):
            raise ValueError(f"domains must have one label per request ({len(arrays)}), got {len(domains)}")
        domain = np.repeat(np.asarray(domains, dtype=str), lengths)
    keep = lengths > 0  # requests without rows vanish; ids stay dense
    request = np.repeat(np.cumsum(keep) - 1, lengths)
    return Trace(experts=experts, request=request, phase=phase, domain=domain, num_experts=num_experts,
                 top_k=experts.shape[2], model=model)


def from_sglang(payloads, num_layers: int, top_k: int, num_experts: int, prompt_lengths=None, domains=None,
                moe_layers="auto", model: str = "") -> Trace:
    """SGLang routed-experts payloads (base64 int32, or already-decoded arrays), one per request, as a Trace."""
    arrays = []
    for index, payload in enumerate(payloads):
        if isinstance(payload, (str, bytes)):
            try:
                payload = np.frombuffer(base64.b64decode(payload, validate=True), dtype="<i4")
            except (binascii.Error, ValueError) as error:
                raise ValueError(f"payloads[{index}] is not base64 of int32 values ({error})") from None
        flat = np.asarray(payload).reshape(-1)
        if flat.size % (num_layers * top_k):
            raise ValueError(f"payloads[{index}] has {flat.size} ids, not a multiple of num_layers·top_k = "
                             f"{num_layers}·{top_k}")
        arrays.append(flat.reshape(-1, num_layers, top_k))
    return from_vllm(arrays, num_experts, prompt_lengths, domains, moe_layers, model)


def _phase_code(value, line: int) -> int:
    code = PHASES.get(value, value) if isinstance(value, str) else value
    if isinstance(code, bool) or code not in (-1, 0, 1):
        raise ValueError(f"line {line}: phase must be one of {list(PHASES)} or -1/0/1, got {value!r}")
    return code


def _padded(rows, line: int, name: str, top_k: int, fill, kind, num_experts: int = 0):
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"line {line}: {name} must be a non-empty list of per-layer lists, got {rows!r}")
    for row in rows:
        for value in row:
            ok = isinstance(value, int) and not isinstance(value, bool) if kind == "int" else \
                isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"line {line}: {name} must hold {kind}s, got {value!r}")
            if kind == "int" and not -1 <= value < num_experts:
                raise ValueError(f"line {line}: expert id {value} outside [-1, num_experts-1={num_experts - 1}]")
    if any(len(r) > top_k for r in rows):
        raise ValueError(f"line {line}: {name} has a layer with more than top_k={top_k} entries")
    return [r + [fill] * (top_k - len(r)) for r in rows]


def from_jsonl(path_or_lines, num_experts: int, top_k: int | None = None, model: str = "") -> Trace:
    """A JSONL routing log (schema in the module docstring) as a Trace. top_k: None = widest layer list."""
    num_experts = _as_count("num_experts", num_experts)
    if top_k is not None and _as_count("top_k", top_k) < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    lines = path_or_lines
    if isinstance(path_or_lines, (str, bytes)) or hasattr(path_or_lines, "__fspath__"):
        with open(path_or_lines, encoding="utf-8") as file:
            lines = file.read().splitlines()
    records = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or "request" not in record or "experts" not in record:
            raise ValueError(f"line {number}: expected an object with 'request' and 'experts', got {text[:80]!r}")
        unknown = set(record) - {"request", "phase", "domain", "position", "experts", "weights"}
        if unknown:
            raise ValueError(f"line {number}: unknown keys {sorted(unknown)}")
        if not isinstance(record["request"], (int, str)) or isinstance(record["request"], bool):
            raise ValueError(f"line {number}: request must be an int or str, got {record['request']!r}")
        records.append((number, record))
    if not records:
        raise ValueError("the routing log has no records")
    width = top_k if top_k is not None else max(
        (len(r) for _, rec in records if isinstance(rec["experts"], list)
         for r in rec["experts"] if isinstance(r, list)), default=0)
    num_layers = None
    for key in ("domain", "weights", "position"):
        present = {key in rec for _, rec in records}
        if len(present) > 1:
            raise ValueError(f"'{key}' is given on some lines and missing on others: give it on all or none")
    order: dict = {}  # request key -> dense id in order of first appearance
    rows = []
    for number, rec in records:
        experts = _padded(rec["experts"], number, "experts", width, -1, "int", num_experts)
        num_layers = len(experts) if num_layers is None else num_layers
        if len(experts) != num_layers:
            raise ValueError(f"line {number}: {len(experts)} layers of experts, earlier lines have {num_layers}")
        weights = None
        if "weights" in rec:
            weights = _padded(rec["weights"], number, "weights", width, 0.0, "number")
            if [len(r) for r in rec["weights"]] != [len(r) for r in rec["experts"]]:
                raise ValueError(f"line {number}: weights must have the same nesting as experts")
        if "domain" in rec and not isinstance(rec["domain"], str):
            raise ValueError(f"line {number}: domain must be a str, got {rec['domain']!r}")
        position = rec.get("position", number)
        if not isinstance(position, int) or isinstance(position, bool):
            raise ValueError(f"line {number}: position must be an int, got {position!r}")
        request = order.setdefault(rec["request"], len(order))
        rows.append((request, position, number, experts, weights, _phase_code(rec.get("phase", -1), number),
                     rec.get("domain")))
    rows.sort(key=lambda row: (row[0], row[1]))
    for previous, row in zip(rows, rows[1:]):
        if (previous[0], previous[1]) == (row[0], row[1]):
            raise ValueError(f"lines {previous[2]} and {row[2]}: request {row[0]} repeats position {row[1]}")
    has_weights = "weights" in records[0][1]
    return Trace(experts=np.array([row[3] for row in rows], dtype=np.int64).reshape(len(rows), num_layers, width),
                 request=[row[0] for row in rows], phase=[row[5] for row in rows],
                 domain=[row[6] for row in rows] if "domain" in records[0][1] else None,
                 num_experts=num_experts, top_k=width, model=model,
                 weights=np.array([row[4] for row in rows], dtype=np.float64) if has_weights else None)
