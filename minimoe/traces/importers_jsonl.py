"""JSONL routing logs (one JSON object per line), converted to a minimoe `Trace`.

Two layouts are read; blank lines are skipped. Lenient where logs vary, strict where numbers are at stake:
fields this module does not read (a ``timestamp``, a ``step``, a meta record's ``vllm_version`` or ``device``)
are kept as the trace's ``notes`` (meta values, and the names of unread route fields) and are never an error,
while missing, malformed or contradictory routing (expert ids, layers, requests, positions) raises ValueError
naming the file, the line and the field, and the ``minimoe import`` flag that fixes it.

Per token (one line per token, every MoE layer on it):

    {"request": 7, "phase": "decode", "domain": "math", "position": 12,
     "experts": [[3, 17], [5, 1], ...], "weights": [[0.61, 0.39], [0.7, 0.3], ...]}

Long form (one line per (token, layer), as profilers hooked into a serving engine write them), optionally
led by a meta record:

    {"type": "meta", "model_id": "Qwen/Qwen3-30B-A3B", "layers_logged": [0, 1], "top_k": 8, "num_experts": 128}
    {"type": "route", "req_id": "r0", "token_idx": 0, "layer": 0, "topk_ids": [...], "topk_weights": [...]}

The long form is recognised by a ``type`` key or a layer field; its records are grouped back into tokens by
(request, position) and the layers of a token are ordered by layer number, the model's order, whatever order
``layers_logged`` lists them in. The meta record gives ``model_id`` (or ``model``), ``num_experts``, ``top_k`` and ``layers_logged``;
arguments of `from_jsonl` that contradict it raise ValueError, and so does a ``top_k`` larger than every record's
list of ids. Without ``num_experts`` anywhere, the largest expert id + 1 is assumed and said in the notes (a
model may have experts the log never saw: pass ``--num-experts``).

Fields. ``fields`` maps our names to the log's: the defaults are our names for the per-token layout and
{"request": "req_id", "position": "token_idx", "layer": "layer", "experts": "topk_ids",
"weights": "topk_weights"} for the long form. Keys a log has and we do not read are listed in the notes;
keys in ``ignore`` are dropped before reading (use it when a key holds something else under one of our names).

    request   int or str: requests may interleave (as a server batches them); they are numbered in order of
              first appearance. Mapped to None: the log names no requests, and every token is put in one
              request 0, in log order -- per-request analyses of such a trace mean nothing
    experts   expert ids (one list per layer per token, or one list per record), in [0, num_experts) or -1 for
              a pair the router dropped; every list holds top_k ids (the meta record's, --top-k, else the first
              record's count): a list of another length is refused, since the baselines count top_k per token.
              A layer that holds only -1 (a dense layer) is refused
    position  int: orders tokens within a request (per-token layout: default the order of lines)
    phase     "prefill" / "decode" / "unknown" or 0 / 1 / -1; absent: unknown (never guessed)
    domain    str; if any line has one, every line must
    weights   same nesting as experts, finite and >= 0; if any line has weights, every line must

What a log cannot tell is left unknown, never invented: without a phase field every phase is -1 (a token's
position or its first forward pass says nothing reliable about prefill and decode: prompts are prefilled in
chunks and cached prefixes are skipped). When ``token_idx`` restarts at every forward pass (the index of the
token in the batch, not in its request), (request, position, layer) repeats: that is an error, unless
``positions="per_pass"`` says so; then the n-th record of a (request, position, layer) belongs to the
request's n-th forward pass and tokens are ordered by (pass, position), which is their order only if the log
was written in time order.

This module reads the records and groups them into tokens; ``minimoe.traces.jsonl_tokens`` checks every token's
lists and stacks them into the Trace.
"""

from __future__ import annotations

import json
import os

from minimoe.traces.format import MAX_EXPERTS, Trace, _as_count
from minimoe.traces.inputs import parse_json, read_text
from minimoe.traces.jsonl_tokens import field_label, fix, is_int, tokens_to_trace
from minimoe.traces.layers import MAX_LAYERS, layer_list

OUR_FIELDS = ("request", "position", "layer", "experts", "weights", "phase", "domain")
LONG_FORM_FIELDS = {"request": "req_id", "position": "token_idx", "layer": "layer", "experts": "topk_ids",
                    "weights": "topk_weights", "phase": "phase", "domain": "domain"}
META_KEYS = ("type", "model_id", "model", "num_experts", "top_k", "layers_logged")
POSITIONS = ("field", "per_pass")


def from_jsonl(path_or_lines, num_experts: int | None = None, top_k: int | None = None, model: str | None = None,
               fields: dict | None = None, positions: str = "field", ignore=()) -> Trace:
    """A JSONL routing log (either layout of the module docstring) as a Trace.

    path_or_lines: a path or an iterable of lines. num_experts, top_k, model: None = from the meta record
    (num_experts: else the largest id + 1, noted; top_k: else the first record's count of ids; model: else "").
    fields: {our name: the log's name, or None for an absent request field}. positions: "field" or
    "per_pass". ignore: log keys to drop before reading. Fields not read go to ``trace.notes``.
    Raises ValueError naming the file, line and field; FileNotFoundError for a missing path.
    """
    if isinstance(ignore, (str, bytes)) or not all(isinstance(key, str) for key in ignore):
        raise ValueError(f"ignore must be a list of log keys (str), got {ignore!r}")
    if fields is not None and not isinstance(fields, dict):
        raise ValueError(f"fields must be a dict {{our name: the log's name}}, got {fields!r}")
    source, lines = "", path_or_lines
    if isinstance(path_or_lines, (str, bytes)) or hasattr(path_or_lines, "__fspath__"):
        source = f"{os.fsdecode(path_or_lines)}: "
        lines = read_text(path_or_lines, "a JSONL routing log").splitlines()
    try:
        return _from_lines(lines, num_experts, top_k, model, fields, positions, set(ignore))
    except ValueError as error:
        raise ValueError(f"{source}{error}") from None


def _from_lines(lines, num_experts, top_k, model, fields, positions, ignore) -> Trace:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r} "
                         f"({fix('--positions', 'positions=')})")
    records = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        record = parse_json(text, f"line {number}")
        if not isinstance(record, dict):
            raise ValueError(f"line {number}: expected a JSON object, got {text[:80]!r}")
        records.append((number, {key: value for key, value in record.items() if key not in ignore}))
    if not records:
        raise ValueError("the routing log has no records")
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(OUR_FIELDS))
    if unknown:
        raise ValueError(f"--field maps unknown names {unknown}; our names are {list(OUR_FIELDS)} "
                         "(from Python: fields=)")
    long_form = any("type" in rec or LONG_FORM_FIELDS["layer"] in rec or fields.get("layer", "") in rec
                    for _, rec in records)
    names = {**(LONG_FORM_FIELDS if long_form else {f: f for f in OUR_FIELDS}), **fields}
    meta = _meta(records) if long_form else {"notes": {}}
    num_experts = _agree("num_experts", num_experts, meta.get("num_experts"), "--num-experts")
    top_k = _agree("top_k", top_k, meta.get("top_k"), "--top-k")
    model = model if model is not None else meta.get("model", "")
    routes = [(n, rec) for n, rec in records if rec.get("type", "route") != "meta"]
    if not routes:
        raise ValueError(f"the log holds {len(records)} meta record(s) and no route record: there is no routing "
                         "to import")
    notes = dict(meta["notes"])
    tokens, unread, layers = _tokens(routes, names, long_form, positions, meta.get("layers_logged"))
    if unread:
        notes["fields not read"] = ", ".join(f"{name} ({count} lines)" for name, count in sorted(unread.items()))
    if num_experts is None:
        largest, line = _largest_id(tokens)
        if largest < 0:
            raise ValueError("num_experts is unknown and no record holds an expert id: pass "
                             + fix("--num-experts E", "num_experts=") + " or give it in a meta record")
        if largest >= MAX_EXPERTS:
            raise ValueError(f"line {line}: expert id {largest} is outside [0, {MAX_EXPERTS}), the ids a trace holds")
        num_experts = largest + 1
        notes["num_experts"] = (f"not recorded: assumed {num_experts}, the largest expert id + 1 (pass --num-experts "
                                "if the model has more experts than the log used)")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts={num_experts} is more than a trace holds ({MAX_EXPERTS})")
    trace = tokens_to_trace(tokens, names, num_experts, top_k, model, meta.get("top_k_line"), layers)
    trace.notes = notes
    return trace


def _largest_id(tokens) -> tuple[int, int]:
    """(the largest int expert id of any record, its line); (-1, 0) when there is none."""
    found = [(v, t["line"]) for t in tokens if isinstance(t["experts"][1], list) for row in t["experts"][1]
             if isinstance(row, list) for v in row if is_int(v)]
    return max(found, default=(-1, 0))


def _agree(name: str, given, said, flag: str):
    if given is not None:
        given = _as_count(name, given)
        if given < 1:
            raise ValueError(f"{flag} must be a positive int, got {given}")
        if said is not None and said != given:
            raise ValueError(f"{flag} {given} was passed, but the meta record says {name}={said}")
        return given
    return said


def _meta(records) -> dict:
    """The meta record's contents (model, num_experts, top_k, layers_logged) and its other keys as "notes"."""
    metas = [(n, rec) for n, rec in records if rec.get("type") == "meta"]
    if len(metas) > 1:
        raise ValueError(f"lines {metas[0][0]} and {metas[1][0]}: more than one meta record")
    for number, rec in records:
        if rec.get("type", "route") not in ("meta", "route"):
            raise ValueError(f"line {number}: unknown record type {rec['type']!r}; expected 'meta' or 'route'")
    if not metas:
        return {"notes": {}}
    number, rec = metas[0]
    meta = {"notes": {f"meta {key}": value if isinstance(value, str) else json.dumps(value)
                      for key, value in rec.items() if key not in META_KEYS}}
    if "model_id" in rec or "model" in rec:
        meta["model"] = rec.get("model_id", rec.get("model"))
        if not isinstance(meta["model"], str):
            raise ValueError(f"line {number}: model_id must be a str, got {meta['model']!r}")
    for key in ("num_experts", "top_k"):
        if key in rec:
            if not is_int(rec[key]) or rec[key] < 1:
                raise ValueError(f"line {number}: the meta record's {key} must be a positive int, got {rec[key]!r}")
            meta[key] = rec[key]
    meta["top_k_line"] = number if "top_k" in rec else None
    if "layers_logged" in rec:
        layers = rec["layers_logged"]
        if not isinstance(layers, list) or not layers or not all(is_int(x) and 0 <= x < MAX_LAYERS for x in layers) \
                or len(set(layers)) != len(layers):
            raise ValueError(f"line {number}: layers_logged must be a non-empty list of distinct layer indices in "
                             f"[0, {MAX_LAYERS}), got {layer_list(layers)}")
        meta["layers_logged"] = layers
    return meta


def _get(rec: dict, names: dict, field: str, number: int, required: bool):
    name = names.get(field)
    if name is None or name not in rec:
        if required:
            raise ValueError(f"line {number}: no {name!r} field ({field}; map it with "
                             + fix(f"--field {field}=NAME", f"fields={{{field!r}: NAME}}")
                             + f"); the record has keys {sorted(rec)}")
        return None
    return rec[name]


def _tokens(routes, names, long_form, positions, layers_logged) -> tuple[list[dict], dict]:
    """Group records into tokens: [{"request", "order", "line", "experts": {layer: ids}, ...}] in file order,
    {key: lines} for the keys no field reads, and the logged layers in order (None for the per-token layout)."""
    read = {names[f] for f in OUR_FIELDS if names.get(f) is not None} | ({"type"} if long_form else set())
    tokens, seen, with_position, unread = {}, {}, set(), {}
    for number, rec in routes:
        request = 0 if names.get("request") is None else _get(rec, names, "request", number, True)
        if not isinstance(request, (int, str)) or isinstance(request, bool):
            raise ValueError(f"line {number}: request must be an int or str, got {request!r}")
        position = _get(rec, names, "position", number, long_form and names.get("request") is not None)
        with_position.add(position is not None)
        if len(with_position) > 1:
            raise ValueError(f"line {number}: {field_label(names, 'position')} is given on some lines and missing on "
                             "others: give it on all or none (or drop it with "
                             + fix(f"--ignore {names['position']}", "ignore=") + ")")
        if position is None:
            position = number  # the order of lines
        if not is_int(position) or position < 0:
            raise ValueError(f"line {number}: {field_label(names, 'position')} must be a whole number >= 0 (the token's "
                             f"place in its request), got {repr(position)[:80]}")
        layer = _get(rec, names, "layer", number, True) if long_form else None
        if long_form and not (is_int(layer) and 0 <= layer < MAX_LAYERS):
            raise ValueError(f"line {number}: layer must be a layer index in [0, {MAX_LAYERS}), got {layer!r}")
        if long_form and layers_logged is not None and layer not in layers_logged:
            raise ValueError(f"line {number}: layer {layer} is not in the meta record's layers_logged "
                             f"{layer_list(layers_logged)}")
        key = (request, position, layer)
        passes = seen.setdefault(key, [])
        if passes and positions == "field":
            what = "position" if not long_form else f"{names['position']} {position} at layer"
            raise ValueError(f"lines {passes[0]} and {number}: request {request!r} repeats {what} "
                             f"{position if not long_form else layer}: positions restart (e.g. at every forward "
                             "pass) or records repeat; if the log was written in time order, pass "
                             + fix("--positions per_pass", "positions='per_pass'"))
        order = (len(passes), position)  # (forward pass, position)
        passes.append(number)
        token = tokens.setdefault((request, order), {"request": request, "order": order, "line": number,
                                                     "experts": {}, "weights": {}, "phase": [], "domain": []})
        experts = _get(rec, names, "experts", number, True)
        for key in set(rec) - read:
            unread[key] = unread.get(key, 0) + 1
        token["experts"][layer] = experts if long_form else (number, experts)
        token.setdefault("lines", {})[layer] = number  # the record of each layer, for messages
        if names.get("weights") in rec:
            token["weights"][layer] = rec[names["weights"]] if long_form else (number, rec[names["weights"]])
        for field in ("phase", "domain"):
            if names.get(field) in rec:
                token[field].append((number, rec[names[field]]))
    tokens = list(tokens.values())
    if long_form:
        layers = sorted(layers_logged if layers_logged is not None else {l for t in tokens for l in t["experts"]})
        for token in tokens:
            missing = [layer for layer in layers if layer not in token["experts"]]
            if missing:
                raise ValueError(f"line {token['line']}: request {token['request']!r} position {token['order'][1]} "
                                 f"has no record for layers {layer_list(missing)} (the log covers layers "
                                 f"{layer_list(layers)}); every "
                                 "token needs one record per logged layer")
            lines = [(token["lines"][layer], f"layer {layer}") for layer in layers]  # per layer: its record
            token["experts"] = (lines, [token["experts"][layer] for layer in layers])
            if token["weights"]:
                if len(token["weights"]) != len(layers):
                    raise ValueError(f"line {token['line']}: weights are given for some layers of a token only")
                token["weights"] = (lines, [token["weights"][layer] for layer in layers])
    else:
        layers = None
        for token in tokens:
            token["experts"] = token["experts"][None]
            token["weights"] = token["weights"].get(None, {})
    return tokens, unread, layers
