"""Importers: the routed-experts arrays of serving systems, converted to a minimoe `Trace`.

1. vLLM routed experts (`enable_return_routed_experts=True`, the "rollout router replay" capture). For each
   request vLLM returns one integer array `routed_experts` of shape (S - 1, num_layers, top_k): S is the
   prompt length plus the number of generated tokens, and the last generated token has no row because it was
   never fed back through the model. Rows 0..P-1 are the prompt (prefill), rows P.. the decode steps.
   `from_vllm` takes the list of those arrays, in any integer dtype (vLLM picks uint8 for up to 256 experts).

2. SGLang `return_routed_experts`: `meta_info["routed_experts"]` is a base64 string of the same values,
   flattened in (token, layer, slot) order. The wire dtype is int32 unless the producer says otherwise (a
   proposed SGLang option writes uint16 or uint8 and names it in `meta_info["routed_experts_dtype"]`).
   `from_sglang` decodes each payload with that dtype, reshapes it to (tokens, num_layers, top_k) and hands
   over to `from_vllm`. An error about a payload always says which dtype it was decoded as (a wrong dtype can
   look like repeated or constant ids, so those errors name it too).

Dense layers. Both systems capture into buffers that start as zeros and that only MoE layers write, so a
model with dense layers (DeepSeek-V3's first `first_k_dense_replace` layers, Llama 4's interleaved ones)
reports them as rows of **0**, not -1: "every token chose expert 0". Nothing in the values tells such a
layer from a router that really sent every token to expert 0, so the importers never guess:

    moe_layers=[...]     the MoE layers, by index into axis 1 (the model config knows them): the safe choice
    moe_layers="auto"    drop the layers that hold only -1 (an explicit "no expert"); a layer where every
                         token has the same ids (all 0 included) is ambiguous and raises ValueError
    moe_layers=None      keep every layer
and, whichever is chosen, a kept layer whose routing is degenerate (at least two tokens, every token the same
ids) is refused unless `keep_degenerate=True`; a row that repeats an id (top-k > 1 over a zero-filled
layer) is refused with that cause named. With a single token and top-1, a zero-filled layer cannot be told
from routing: pass `moe_layers`. Axis 1 of a capture is every decoder layer, so the kept indices are the model's
layer numbers: they become the trace's ``layer_ids``, which placements fitted on it carry to ``minimoe export``.

Routing logs written as text (JSONL) are read by `minimoe.traces.importers_jsonl`.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from minimoe.traces.format import Trace, _as_count
from minimoe.traces.layers import layer_list

DENSE_LAYER_CAUSE = ("SGLang and vLLM capture routed experts into zero-filled buffers that dense layers never "
                     "write, so a dense layer arrives as expert 0 for every token")


def from_vllm(routed_experts, num_experts: int, prompt_lengths=None, domains=None, moe_layers=None,
              keep_degenerate: bool = False, model: str = "") -> Trace:
    """Requests' vLLM `routed_experts` arrays as one Trace (request r = array r; arrays without rows vanish).

    routed_experts: one integer array (S-1, num_layers, top_k) per request, any integer dtype.
    num_experts: routed experts per MoE layer. prompt_lengths: (R,) ints, the prompt rows of each request
    (rows before it are prefill, after it decode); None marks every phase unknown. domains: one label per
    request, a single str for all, or None. moe_layers: a list of layer indices to keep, "auto" or None
    (see the module docstring for dense layers); keep_degenerate: keep a layer where every token has the same
    ids. Raises ValueError naming the request, row and layer of a bad value.
    """
    num_experts = _as_count("num_experts", num_experts)
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
        outside = (array < -1) | (array >= num_experts)
        if outside.any():
            row, layer, _ = np.argwhere(outside)[0]
            raise ValueError(f"routed_experts[{index}] row {row}, layer {layer} holds {array[row, layer].tolist()}: "
                             f"expert ids must be in [-1, num_experts-1={num_experts - 1}]")
    lengths = np.array([a.shape[0] for a in arrays])
    if not lengths.any():
        raise ValueError(f"the capture holds no token: all {len(arrays)} routed_experts arrays have 0 rows")
    experts = np.concatenate([a.astype(np.int64) for a in arrays])  # (N, num_layers, top_k)
    layer_ids = _moe_layer_ids(experts, moe_layers, keep_degenerate)  # axis 1 of a capture: every decoder layer
    experts = experts[:, layer_ids]
    _check_rows(experts, lengths, keep_degenerate)
    phase = np.full(len(experts), -1, np.int8)
    if prompt_lengths is not None:
        prompt_lengths = np.asarray(prompt_lengths)
        if prompt_lengths.shape != lengths.shape or prompt_lengths.dtype.kind not in "iu" \
                or (prompt_lengths < 0).any() or (prompt_lengths > lengths).any():
            raise ValueError(f"the prompt lengths (--prompt-lengths, prompt_lengths=, or a vLLM .npz's prompt_lengths "
                             f"array) must give, for each of the {len(arrays)} requests, a whole count in [0, rows of "
                             f"its array] = {lengths.tolist()}, got {prompt_lengths.tolist()}")
        position = np.arange(len(experts)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        phase[:] = position >= np.repeat(prompt_lengths, lengths)
    domain = None
    if isinstance(domains, str):
        domain = domains  # one label for every token
    elif domains is not None:
        if len(domains) != len(arrays):
            raise ValueError(f"domains must have one label per request ({len(arrays)}), got {len(domains)}")
        domain = np.repeat(np.asarray(domains, dtype=str), lengths)
    keep = lengths > 0  # requests without rows vanish; ids stay dense
    request = np.repeat(np.cumsum(keep) - 1, lengths)
    return Trace(experts=experts, request=request, phase=phase, domain=domain, num_experts=num_experts,
                 top_k=experts.shape[2], model=model, layer_ids=layer_ids)


def _degenerate(layer: np.ndarray) -> bool:
    """Whether at least two tokens and all of them carry the same ids: layer (N, k)."""
    return layer.shape[0] >= 2 and bool((layer == layer[:1]).all())


def _moe_layer_ids(experts: np.ndarray, moe_layers, keep_degenerate: bool) -> np.ndarray:
    """The indices (axis 1 of experts (N, L, k)) of the layers to keep."""
    num_layers = experts.shape[1]
    if isinstance(moe_layers, str) and moe_layers == "auto":
        ids = []
        for layer in range(num_layers):
            values = experts[:, layer]
            if values.size and (values == -1).all():
                continue  # the explicit "no expert" marker: a dense layer
            if not keep_degenerate and values.size and (_degenerate(values) or not values.any()):
                raise ValueError(
                    f"moe_layers='auto' cannot tell whether layer {layer} is a dense layer: every token has expert "
                    f"ids {values[0].tolist()} ({DENSE_LAYER_CAUSE}); list the MoE layers with --moe-layers 1,2,... "
                    "(from Python: moe_layers=[...]), or pass --keep-degenerate (keep_degenerate=True) if this really "
                    "is the routing")
            ids.append(layer)
        if not ids:
            raise ValueError(f"moe_layers='auto' found no MoE layer: all {num_layers} layers hold only -1")
        return np.array(ids)
    if moe_layers is None:
        return np.arange(num_layers)
    flag = "--moe-layers (from Python: moe_layers=)"
    if isinstance(moe_layers, str):
        raise ValueError(f"{flag} must list layer indices, or be 'auto' or 'all' (None), got {layer_list(moe_layers)}")
    ids = np.asarray(moe_layers)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= num_layers \
            or len(set(ids.tolist())) != ids.size:
        raise ValueError(f"{flag} must name distinct layers in [0, {num_layers}) (the capture has "
                         f"{num_layers} layers per token), got {layer_list(moe_layers)}")
    return ids


def _check_rows(experts: np.ndarray, lengths: np.ndarray, keep_degenerate: bool) -> None:
    """Refuse kept layers that cannot be routing: all -1, repeated ids in a row, or (unless kept) degenerate."""
    starts = np.cumsum(lengths) - lengths

    def where(token: int) -> str:
        request = int(np.searchsorted(starts, token, side="right")) - 1
        while lengths[request] == 0:
            request -= 1
        return f"routed_experts[{request}] row {token - starts[request]}"

    for layer in range(experts.shape[1]):
        values = experts[:, layer]  # (N, k)
        if values.size == 0:
            continue
        if (values == -1).all():
            raise ValueError(f"layer {layer} holds no expert id (all -1): a dense layer; leave it out with "
                             "--moe-layers 1,2,... or --moe-layers auto (from Python: moe_layers=[...] or 'auto')")
        ordered = np.sort(values, axis=1)
        repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(axis=1)
        if repeated.any():
            token = int(np.flatnonzero(repeated)[0])
            zeros = " (all 0: " + DENSE_LAYER_CAUSE + "; list the MoE layers with --moe-layers (moe_layers=))" \
                if not values[token].any() else ""
            raise ValueError(f"{where(token)}, layer {layer} repeats an expert id: {values[token].tolist()}{zeros}; "
                             "top-k ids must be distinct")
        if _degenerate(values) and not keep_degenerate:
            raise ValueError(f"layer {layer}: every one of the {len(values)} tokens has expert ids "
                             f"{values[0].tolist()}; this is a dense layer if the ids are all 0 ({DENSE_LAYER_CAUSE}) "
                             "or a collapsed router: leave it out with --moe-layers 1,2,... (moe_layers=[...]), or "
                             "pass --keep-degenerate (keep_degenerate=True)")


WIRE_DTYPES = ("int32", "int16", "uint16", "uint8", "int64")


def _wire_dtype(name) -> np.dtype:
    if str(name) not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {WIRE_DTYPES} (the payload's integer wire dtype), got {name!r}")
    return np.dtype(str(name)).newbyteorder("<")


def from_sglang(payloads, num_layers: int, top_k: int, num_experts: int, prompt_lengths=None, domains=None,
                moe_layers="auto", keep_degenerate: bool = False, dtype: str | None = None,
                model: str = "") -> Trace:
    """SGLang routed-experts payloads, one per request, as a Trace.

    A payload is a base64 string (or bytes), an already-decoded integer array, or SGLang's ``meta_info`` dict
    holding ``routed_experts`` (and optionally ``routed_experts_dtype``). dtype: the wire dtype of base64
    payloads, one of WIRE_DTYPES, little-endian; None = the payload's ``routed_experts_dtype`` or int32.
    The other arguments are those of `from_vllm`. Raises ValueError naming the payload and the dtype assumed.
    """
    num_layers, top_k = _as_count("num_layers", num_layers), _as_count("top_k", top_k)
    num_experts = _as_count("num_experts", num_experts)
    if num_layers < 1 or top_k < 1:
        raise ValueError(f"num_layers and top_k must be >= 1, got num_layers={num_layers}, top_k={top_k}")
    if dtype is not None:
        _wire_dtype(dtype)
    arrays, decoded = [], set()
    for index, payload in enumerate(payloads):
        assumed = "the array's own dtype"
        if isinstance(payload, dict):
            if "routed_experts" not in payload:
                raise ValueError(f"payloads[{index}] is a dict without 'routed_experts' (keys {sorted(payload)})")
            said = payload.get("routed_experts_dtype")
            if said is not None and dtype is not None and str(said) != str(dtype):
                raise ValueError(f"payloads[{index}] says routed_experts_dtype={said!r}, but dtype={dtype!r} was "
                                 "passed")
            wire, payload = _wire_dtype(said or dtype or "int32"), payload["routed_experts"]
        else:
            wire = _wire_dtype(dtype or "int32")
        if isinstance(payload, (str, bytes)):
            assumed = wire.name
            try:
                raw = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as error:
                raise ValueError(f"payloads[{index}] is not base64 ({error}; to be decoded as {assumed})") from None
            if len(raw) % wire.itemsize:
                raise ValueError(f"payloads[{index}] holds {len(raw)} bytes, not a whole number of {assumed} values "
                                 f"({wire.itemsize} bytes each): pass the producer's wire dtype with --dtype "
                                 "(from Python: dtype=)")
            payload = np.frombuffer(raw, dtype=wire)
        flat = np.asarray(payload).reshape(-1)
        if flat.size % (num_layers * top_k):
            hint = "" if assumed == "the array's own dtype" else \
                "; if the producer used another wire dtype, pass it with --dtype (from Python: dtype=)"
            raise ValueError(f"payloads[{index}] (decoded as {assumed}) has {flat.size} ids, not a multiple of "
                             f"num_layers·top_k = {num_layers}·{top_k}{hint}")
        rows = flat.reshape(-1, num_layers, top_k)
        if rows.dtype.kind in "iu":
            outside = (rows.astype(np.int64) < -1) | (rows.astype(np.int64) >= num_experts)
            if outside.any():
                row, layer, _ = np.argwhere(outside)[0]
                hint = " (or -1 written in an unsigned dtype)" if rows.dtype.kind == "u" else ""
                raise ValueError(f"payloads[{index}] decoded as {assumed}: token {row}, layer {layer} holds "
                                 f"{rows[row, layer].tolist()}, outside [-1, num_experts-1={num_experts - 1}]{hint}; "
                                 f"if the producer used another wire dtype ({', '.join(WIRE_DTYPES)}; uint8 and "
                                 "uint16 are common for up to 256 / 65536 experts) pass it with --dtype (from Python: "
                                 "dtype=)")
        arrays.append(rows)
        decoded.add(assumed)
    try:
        return from_vllm(arrays, num_experts, prompt_lengths, domains, moe_layers, keep_degenerate, model)
    except ValueError as error:  # say the dtype: a wrong one also gives repeated, constant or zero ids
        raise ValueError(f"{error} [payloads decoded as {', '.join(sorted(decoded))}; a wrong wire dtype gives "
                         "repeated or constant ids too: pass the producer's with --dtype (from Python: dtype=)]") \
            from None
