"""The second half of reading a JSONL routing log: the tokens ``importers_jsonl`` grouped, checked and stacked
into a ``Trace``.

Each token arrives as {"request", "order", "line", "experts": (line, per-layer id lists), "weights", "phase",
"domain"}. Here every list is checked (ids in [-1, num_experts), top_k ids per list, weights finite and >= 0, one
phase and one domain per token, a field given on all lines or none), requests are numbered in order of first
appearance, tokens sorted by (request, order), and a layer holding only -1 (a dense layer) is refused. Every
error is a ValueError naming the line and the field, and the ``minimoe import`` flag that fixes it.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from minimoe.traces.format import PHASES, Trace
from minimoe.traces.inputs import plural


def fix(flag: str, keyword: str) -> str:
    """How to fix a problem, said for both users: the ``minimoe import`` flag, then the Python keyword."""
    return f"{flag} (from Python: {keyword})"


def is_int(value) -> bool:
    """An int that is not a bool (JSON true/false parse as bools)."""
    return isinstance(value, int) and not isinstance(value, bool)


def field_label(names: dict, field: str) -> str:
    """How messages name a field: the log's key, and ours when they differ (``'token_idx' (position)``)."""
    return f"'{names.get(field)}'" + ("" if names.get(field) == field else f" ({field})")


def _phase_code(value, line: int) -> int:
    code = PHASES.get(value, value) if isinstance(value, str) else value
    if isinstance(code, bool) or code not in (-1, 0, 1):
        raise ValueError(f"line {line}: phase must be one of {list(PHASES)} or -1/0/1, got {value!r}")
    return code


def _one(values: list, field: str, token: dict):
    """The single value a token's records give for a field (None if none), refusing disagreement."""
    distinct = {json.dumps(v) for _, v in values}
    if len(distinct) > 1:
        raise ValueError(f"lines {values[0][0]} and {values[-1][0]}: the records of one token disagree on {field}: "
                         f"{sorted(distinct)}")
    return values[0][1] if values else None


def _where(line, index: int, count: int) -> str:
    """Where row ``index`` of a token's ``count`` per-layer lists is: its own record's line and layer (long form:
    ``line`` is a list of (line, "layer L") per row), or the token's line and the list's number (one line per
    token)."""
    if isinstance(line, list):
        number, label = line[min(index, len(line) - 1)]
        return f"line {number} ({label})"
    return f"line {line}" + (f" (its list {index + 1} of {count})" if count > 1 else "")


def _rows(rows, line, name: str, kind: str, num_experts: int = 0, width: int | None = None, said: str = ""):
    """Check one token's per-layer lists: ``kind`` "int" (expert ids in [-1, num_experts)) or "number" (finite
    weights >= 0); with ``width``, each list must hold that many ids (``said`` says where the width comes from).
    ``line``: the token's line, or (long form) a list of (line, label) per layer (``_where``)."""
    what = "ids" if kind == "int" else "weights"
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{_where(line, 0, 1)}: {name} must hold a non-empty list of {what} per layer, got "
                         f"{str(rows)[:80]}")
    for index, row in enumerate(rows):
        where = _where(line, index, len(rows))
        if not isinstance(row, list) or not row:
            raise ValueError(f"{where}: {name} must hold a non-empty list of {what} per layer, got {str(row)[:80]}")
        for value in row:
            ok = is_int(value) if kind == "int" else isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"{where}: {name} must hold {kind}s, got {value!r}")
            if kind == "int" and not -1 <= value < num_experts:
                raise ValueError(f"{where}: expert id {value} outside [-1, num_experts-1={num_experts - 1}]")
            if kind == "number" and not 0 <= value <= sys.float_info.max:  # NaN, inf, a huge int: refused
                raise ValueError(f"{where}: {name} must be finite and >= 0, got {value!r}")
        repeated = [v for v in set(row) if kind == "int" and v >= 0 and row.count(v) > 1]
        if repeated:
            raise ValueError(f"{where}: {name} repeats expert id {min(repeated)}: a router picks top_k distinct "
                             "experts")
        if width is not None and len(row) != width:
            raise ValueError(f"{where}: {name} lists {plural(len(row), 'id')} where {said} (every record lists "
                             "top_k ids; write -1 for a pair the router dropped)")
    return rows


def tokens_to_trace(tokens, names, num_experts, top_k, model, top_k_line=None, layers=None) -> Trace:
    """The Trace of the grouped tokens; ``layers``: the logged layer numbers, the trace's ``layer_ids`` (None:
    per-token layout, which does not say)."""
    for field in ("domain", "weights"):
        present = {bool(t[field]) for t in tokens}
        if len(present) > 1:
            raise ValueError(f"{field_label(names, field)} is given on some lines and missing on others: "
                             "give it on all or none (or drop it with " + fix(f"--ignore {names.get(field)}", "ignore=")
                             + ")")
    widest = max((len(r) for t in tokens if isinstance(t["experts"][1], list) for r in t["experts"][1]
                  if isinstance(r, list)), default=None)
    if top_k is not None and widest is not None and top_k > widest:  # -1 everywhere would invent dropped pairs
        said = f"line {top_k_line}: the meta record says top_k={top_k}" if top_k_line else f"--top-k {top_k} was passed"
        raise ValueError(f"{said}, but no route record lists more than {widest} expert ids: the top_k is wrong "
                         f"(pass {fix(f'--top-k {widest}', f'top_k={widest}')} if the log is right)")
    width, said = top_k, (f"the meta record (line {top_k_line}) says top_k={top_k}" if top_k_line
                          else f"--top-k {top_k} was passed")
    experts_name, weights_name = f"'{names['experts']}'", f"'{names.get('weights')}'"
    order: dict = {}  # request key -> dense id in order of first appearance
    rows = []
    for token in tokens:
        where, experts = token["experts"]
        line = token["line"]  # the token's first record
        if width is None and isinstance(experts, list) and experts and isinstance(experts[0], list):
            width, said = len(experts[0]), f"{_where(where, 0, 1)} lists {len(experts[0])}"
        experts = _rows(experts, where, experts_name, "int", num_experts, width, said)
        if rows and len(experts) != len(rows[0][2]):
            raise ValueError(f"line {line}: {len(experts)} layers of experts, earlier lines have {len(rows[0][2])}")
        weights = None
        if token["weights"]:
            weights = _rows(token["weights"][1], token["weights"][0], weights_name, "number")
            lengths = [len(r) for r in weights]
            if len(lengths) != len(experts):
                raise ValueError(f"{_where(token['weights'][0], 0, len(experts))}: {weights_name} lists weights for "
                                 f"{plural(len(lengths), 'layer')} where {experts_name} lists ids for {len(experts)}")
            if lengths != [len(r) for r in experts]:
                bad = next(i for i, r in enumerate(experts) if len(r) != lengths[i])  # the record (or list) at fault
                raise ValueError(f"{_where(token['weights'][0], bad, len(experts))}: {weights_name} lists "
                                 f"{plural(lengths[bad], 'weight')} where {experts_name} lists "
                                 f"{plural(len(experts[bad]), 'id')}: one weight per id")
        domain = _one(token["domain"], "domain", token)
        if domain is not None and not isinstance(domain, str):
            raise ValueError(f"line {line}: domain must be a str, got {domain!r}")
        phase = _one(token["phase"], "phase", token)
        request = order.setdefault(token["request"], len(order))
        rows.append((request, token["order"], experts, weights, -1 if phase is None else _phase_code(phase, line),
                     domain))
    rows.sort(key=lambda row: (row[0], row[1]))
    has_weights = rows[0][3] is not None
    experts = np.array([row[2] for row in rows], dtype=np.int64).reshape(len(rows), -1, width)
    empty = np.flatnonzero((experts < 0).all(axis=(0, 2)))
    if empty.size:
        layer = int(empty[0]) if layers is None else layers[empty[0]]
        raise ValueError(f"layer {layer} holds no expert id (all -1): a dense layer; leave its records out of the "
                         "log (the trace holds MoE layers only)")
    return Trace(experts=experts,
                 request=[row[0] for row in rows], phase=[row[4] for row in rows],
                 domain=[row[5] for row in rows] if rows[0][5] is not None else None,
                 num_experts=num_experts, top_k=width, model=model,
                 weights=np.array([row[3] for row in rows], dtype=np.float64) if has_weights else None,
                 layer_ids=layers)
