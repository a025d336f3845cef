"""Serving engines' expert-load dumps, read into a ``LoadTrace`` (``minimoe.traces.loads``).

Each engine counts tokens per expert in its own file and layer numbering (the table of ``minimoe import --help``):

1. SGLang ``--expert-distribution-recorder-mode stat``: ``torch.save`` of a dict whose ``logical_count`` is an
   integer tensor (steps, num_hidden_layers, num_experts), all-reduced over ranks, over **every** decoder layer
   (dense layers are rows of zeros). The step axis is a ring buffer (``--expert-distribution-recorder-buffer-size``)
   that starts over once full and is never rotated back, so its order is not time order: only totals are kept
   meaningful (``ordered=False``). ``from_sglang_stat``.
2. SGLang ``per_pass``: one ``torch.save`` file per rank holding ``{"records": [{forward_pass_id, rank,
   gatherer_key, global_physical_count (L, P)}, ...], "last_physical_to_logical_map": (L, P)}``: counts per
   physical slot of the tokens that rank routed. Summed over ranks per forward pass, then folded to logical
   experts with the map (slot s serves expert map[l, s]). ``from_sglang_per_pass``.
3. TensorRT-LLM expert statistics (``EXPERT_STATISTIC_ITER_RANGE``, ``EXPERT_STATISTIC_PATH``): a folder with
   ``meta_info.json`` ({num_experts, num_experts_per_token[, ep_size]}) and ``rank{r}.safetensors`` whose keys
   ``"{iter}_{layer}"`` hold the counts (num_experts,) of the tokens rank r routed in that iteration and model
   layer; some revisions add ``cooccurrence_rank{r}.safetensors`` with (E, E) per key (co-activation). Summed
   over ranks. ``minimoe.traces.load_dumps_trtllm.from_trtllm``.
4. vLLM offline-EPLB statistics, JSONL, one record per step: ``{"record_type": "eplb_load_stats", "version": 1,
   "step", "num_ranks", "expert_load": [[L x P]], "p2l_map": [[L x P]]}`` over the MoE layers only, folded to
   logical experts with each record's own map. This follows an interface still under review upstream (vLLM pull
   request 41141); other record types in the file are skipped and counted in the notes. ``from_vllm_eplb``.

Layer numbering: SGLang's rows are all decoder layers, TensorRT-LLM's keys are model layer indices, vLLM's rows
are the MoE layers in order. ``moe_layers`` (the model index of every MoE layer, from ``--moe-layers`` or
``--config``) maps them; without it SGLang's MoE layers are its rows holding counts (a dense layer cannot hold
any) and vLLM's layer indices stay unknown (-1).

Every file is opened without executing code: ``torch.load(weights_only=True)``, safetensors, JSON. Anything
malformed (wrong shapes, negative counts, a map that misses slots or experts, a pickle ``weights_only`` refuses)
raises ValueError naming the file and the field.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from minimoe.traces.inputs import parse_json, plural, read_text
from minimoe.traces.layers import layer_list
from minimoe.traces.loads import MAX_COUNT, LoadTrace


# ---- reading files safely -------------------------------------------------------------------------------------
def torch_file(path) -> object:
    """``torch.load(path, weights_only=True)`` on CPU; ValueError naming the file when it refuses or fails."""
    import pickle

    import torch

    try:
        return torch.load(os.fspath(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if found:
            raise ValueError(f"{path}: torch.load(weights_only=True) refuses it: it pickles a {found[1]} object; only "
                             "plain tensors, lists, dicts and numbers are read, never arbitrary objects") from None
        raise ValueError(f"{path}: not a readable torch.save file (torch.load(weights_only=True) cannot parse it)") \
            from None
    except FileNotFoundError:
        raise
    except Exception as error:  # a damaged or non-torch file: RuntimeError, EOFError, zipfile errors...
        raise ValueError(f"{path}: not a readable torch.save file ({type(error).__name__}: "
                         f"{str(error).strip()[:160]})") from None


def count_array(value, where: str, ndim: int, what: str = "counts") -> np.ndarray:
    """An int64 array of ``ndim`` dimensions from a tensor, list or array of ``what`` (counts, or the expert ids
    of a map): whole numbers >= 0; counts summing to less than ``MAX_COUNT``. ValueError naming ``where``."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: not a rectangular array") from None
    if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and np.isfinite(array).all()
                                             and (array == np.round(array)).all() and array.size):
        raise ValueError(f"{where}: expected integer counts, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{where}: expected {ndim} dimensions, got shape {array.shape}")
    if array.size and array.min() < 0:
        index = tuple(int(i) for i in np.argwhere(array < 0)[0])
        raise ValueError(f"{where}: {what} must be >= 0, got {array[index]} at index {index}")
    total = float(array.sum(dtype=np.float64))  # in float64: an int64 sum could wrap around unseen
    if total >= MAX_COUNT:
        raise ValueError(f"{where}: the {what} sum to about {total:.3g}, more than {MAX_COUNT:.3g}: not the "
                         "record of a real run")
    return array.astype(np.int64)


def _pick_layers(counts: np.ndarray, moe_layers, where: str, all_layers: bool):
    """(counts (S, L_moe, E), layer_ids (L_moe,), note) from counts over the source's rows (S, rows, E).

    all_layers: the rows are every decoder layer (SGLang); else the rows are the MoE layers in order (vLLM)."""
    rows = counts.shape[1]
    if all_layers:
        if moe_layers is None:
            used = np.flatnonzero(counts.any(axis=(0, 2)))
            if not used.size:
                raise ValueError(f"{where}: every count is zero: the recorder saw no token")
            return counts[:, used], used, (f"MoE layers taken as the {used.size} rows holding counts (a dense layer "
                                           "holds none); name them with --moe-layers or --config to be sure")
        ids = np.asarray(moe_layers, np.int64)
        if ids.max() >= rows:
            raise ValueError(f"{where}: --moe-layers/--config name layer {int(ids.max())}, but the dump has {rows} "
                             "layers (SGLang counts every decoder layer)")
        dense = np.setdiff1d(np.arange(rows), ids)
        if dense.size and counts[:, dense].any():
            layer = int(dense[np.flatnonzero(counts[:, dense].any(axis=(0, 2)))[0]])
            raise ValueError(f"{where}: layer {layer} holds counts but is not among the MoE layers "
                             f"{layer_list(ids.tolist())} from --moe-layers/--config: the layer list does not "
                             "match the model")
        return counts[:, ids], ids, None
    if moe_layers is None:
        return counts, np.full(rows, -1, np.int64), "model layer index of each MoE layer unknown (give --moe-layers " \
                                                    "or --config to map them)"
    if len(moe_layers) != rows:
        raise ValueError(f"{where}: --moe-layers/--config name {len(moe_layers)} MoE layers, the dump has {rows}")
    return counts, np.asarray(moe_layers, np.int64), None


def _fold(physical: np.ndarray, phy2log: np.ndarray, num_experts: int | None, where: str) -> tuple[np.ndarray, int]:
    """(S, L, P) per-slot counts -> (S, L, E) per logical expert, with map (L, P); checks the map covers every
    slot and expert."""
    if phy2log.shape != physical.shape[1:]:
        raise ValueError(f"{where}: the physical-to-logical map has shape {phy2log.shape}, the counts have "
                         f"(layers, slots) = {physical.shape[1:]}: the map misses slots")
    if (phy2log < 0).any():
        layer, slot = np.argwhere(phy2log < 0)[0]
        raise ValueError(f"{where}: the physical-to-logical map leaves slot {slot} of layer {layer} without an "
                         f"expert ({phy2log[layer, slot]})")
    experts = int(phy2log.max()) + 1 if num_experts is None else num_experts
    if phy2log.max() >= experts:
        raise ValueError(f"{where}: the map names expert {int(phy2log.max())}, but there are {experts} experts")
    for layer, row in enumerate(phy2log):
        missing = np.setdiff1d(np.arange(experts), row)
        if missing.size and int(row.max()) > missing[0]:
            raise ValueError(f"{where}: the map names expert {int(row.max())} in layer {layer} while expert "
                             f"{int(missing[0])} has no slot: {int(row.max())} is out of range (ids run 0..E-1, each "
                             f"with a slot), or {missing.size} experts below it are unplaced")
        if missing.size:
            raise ValueError(f"{where}: the map gives expert {int(missing[0])} of layer {layer} no slot; every "
                             "expert needs one")
    steps, layers, slots = physical.shape
    logical = np.zeros((steps, layers, experts), np.int64)
    for layer in range(layers):
        np.add.at(logical[:, layer], (slice(None), phy2log[layer]), physical[:, layer])
    return logical, experts


# ---- SGLang ---------------------------------------------------------------------------------------------------
def from_sglang_stat(path, moe_layers=None, model: str = "") -> LoadTrace:
    """SGLang ``stat`` mode dump (see the module docstring) as a LoadTrace (totals; ``ordered=False``)."""
    data = torch_file(path)
    if not isinstance(data, dict) or "logical_count" not in data:
        raise ValueError(f"{path}: expected SGLang's stat dump, a dict with 'logical_count'; got "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    if np.ndim(data["logical_count"]) not in (2, 3):
        raise ValueError(f"{path}: logical_count: expected shape (steps, layers, experts) or (layers, experts), got "
                         f"{tuple(np.shape(data['logical_count']))}")
    counts = count_array(data["logical_count"], f"{path}: logical_count", np.ndim(data["logical_count"]))
    counts = counts if counts.ndim == 3 else counts[None]
    counts, ids, note = _pick_layers(counts, moe_layers, f"{path}: logical_count", all_layers=True)
    notes = {"steps": "SGLang's stat buffer is a ring that restarts when full and is not rotated back: its step "
                      "order is not time order, so only the totals are used"}
    if note:
        notes["layers"] = note
    return LoadTrace(counts=counts, num_experts=counts.shape[2], layer_ids=ids, ordered=False, model=model,
                     source="sglang stat", notes=notes)


def _dump_files(path) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.pt")))
        if not files:
            raise ValueError(f"{path}: a folder without .pt files (expected SGLang's per-rank dumps)")
        return files
    return [os.fspath(path)]


def from_sglang_per_pass(path, moe_layers=None, model: str = "") -> LoadTrace:
    """SGLang ``per_pass`` dumps (one file per rank, or a folder of them) as a LoadTrace, one step per pass."""
    passes, phy2log, first = {}, None, None
    for file in _dump_files(path):
        data = torch_file(file)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list) \
                or "last_physical_to_logical_map" not in data:
            raise ValueError(f"{file}: expected SGLang's per_pass dump, a dict with 'records' (a list) and "
                             f"'last_physical_to_logical_map'")
        mapping = count_array(data["last_physical_to_logical_map"], f"{file}: last_physical_to_logical_map", 2,
                         "expert ids")
        if phy2log is None:
            phy2log, first = mapping, file
        elif not np.array_equal(mapping, phy2log):
            raise ValueError(f"{file}: last_physical_to_logical_map differs from the one in {first}: the dumps "
                             "come from different runs or a rebalance happened between them")
        for index, record in enumerate(data["records"]):
            where = f"{file}: records[{index}]"
            if not isinstance(record, dict) or not {"forward_pass_id", "rank", "global_physical_count"} <= set(record):
                raise ValueError(f"{where}: expected forward_pass_id, rank and global_physical_count")
            key = (record["forward_pass_id"], record["rank"], record.get("gatherer_key", "primary"))
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in key[:2]) or not isinstance(key[2], str):
                raise ValueError(f"{where}: forward_pass_id and rank must be ints (gatherer_key a str), got "
                                 f"{list(key)}")
            counts = count_array(record["global_physical_count"], f"{where}: global_physical_count", 2)
            step = passes.setdefault(key[0], {})
            if key[1:] in step:
                raise ValueError(f"{where}: forward pass {key[0]} of rank {key[1]} appears twice")
            step[key[1:]] = counts
    if not passes:
        raise ValueError(f"{path}: the dumps hold no records")
    shapes = {c.shape for step in passes.values() for c in step.values()}
    if len(shapes) > 1:
        raise ValueError(f"{path}: global_physical_count has several shapes {sorted(shapes)}: expected (layers, slots)")
    order = sorted(passes)
    physical = np.stack([sum(passes[p].values()) for p in order])  # (S, L_all, P)
    logical, experts = _fold(physical, phy2log, None, f"{path}: last_physical_to_logical_map")
    counts, ids, note = _pick_layers(logical, moe_layers, f"{path}: global_physical_count", all_layers=True)
    ranks = len({r for p in passes.values() for r, _ in p})
    notes = {"steps": f"{plural(len(order), 'forward pass', 'forward passes')} ({order[0]}..{order[-1]}), summed "
                      f"over {plural(ranks, 'rank')}"}
    if note:
        notes["layers"] = note
    return LoadTrace(counts=counts, num_experts=experts, layer_ids=ids, ordered=True, model=model,
                     source="sglang per_pass", notes=notes)


# ---- vLLM -----------------------------------------------------------------------------------------------------
def from_vllm_eplb(path, moe_layers=None, model: str = "") -> LoadTrace:
    """vLLM offline-EPLB statistics JSONL (see the module docstring) as a LoadTrace, one step per record."""
    steps, skipped, experts = [], {}, None
    for number, text in enumerate(read_text(path, "JSON lines").splitlines(), 1):
        if not text.strip():
            continue
        record = parse_json(text, f"{path}: line {number}")
        kind = record.get("record_type") if isinstance(record, dict) else None
        if kind != "eplb_load_stats":
            skipped[str(kind)] = skipped.get(str(kind), 0) + 1
            continue
        where = f"{path}: line {number}"
        if record.get("version") != 1:
            raise ValueError(f"{where}: version {record.get('version')!r}; this reader knows version 1")
        for key in ("step", "expert_load", "p2l_map"):
            if key not in record:
                raise ValueError(f"{where}: no {key!r} field")
        load = count_array(record["expert_load"], f"{where}: expert_load", 2)
        mapping = count_array(record["p2l_map"], f"{where}: p2l_map", 2, "expert ids")
        logical, seen = _fold(load[None], mapping, experts, f"{where}: p2l_map")
        if experts is not None and seen != experts:
            raise ValueError(f"{where}: the map covers {seen} experts, earlier records {experts}")
        experts = seen
        if steps and logical.shape[1:] != steps[0][1].shape:
            raise ValueError(f"{where}: expert_load covers {logical.shape[1]} layers, earlier records "
                             f"{steps[0][1].shape[0]}")
        num_ranks = record.get("num_ranks")
        if num_ranks is not None and (not isinstance(num_ranks, int) or num_ranks < 1 or load.shape[1] % num_ranks):
            raise ValueError(f"{where}: num_ranks={num_ranks!r} does not divide the {load.shape[1]} slots")
        if not isinstance(record["step"], int) or isinstance(record["step"], bool):
            raise ValueError(f"{where}: step must be an int, got {record['step']!r}")
        steps.append((record["step"], logical[0]))
    if not steps:
        raise ValueError(f"{path}: no 'eplb_load_stats' record" + (f" (found {skipped})" if skipped else ""))
    if len({s for s, _ in steps}) != len(steps):
        raise ValueError(f"{path}: a step appears twice")
    steps.sort(key=lambda item: item[0])
    counts, ids, note = _pick_layers(np.stack([c for _, c in steps]), moe_layers, f"{path}: expert_load",
                                     all_layers=False)
    notes = {"interface": "vLLM's offline-EPLB statistics follow an interface still under review upstream"}
    if skipped:
        notes["records skipped"] = ", ".join(f"{k} ({v})" for k, v in sorted(skipped.items()))
    if note:
        notes["layers"] = note
    return LoadTrace(counts=counts, num_experts=experts, layer_ids=ids, ordered=True, model=model,
                     source="vllm eplb_load_stats", notes=notes)
