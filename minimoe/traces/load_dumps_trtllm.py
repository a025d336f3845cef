"""TensorRT-LLM's expert statistics, read into a ``LoadTrace`` (the other engines: ``minimoe.traces.load_dumps``).

TensorRT-LLM writes them when ``EXPERT_STATISTIC_ITER_RANGE`` and ``EXPERT_STATISTIC_PATH`` are set: a folder with

    meta_info.json                       {num_experts, num_experts_per_token[, ep_size]}
    rank{r}.safetensors                  keys "{iter}_{layer}": (num_experts,) tokens rank r routed to each expert
                                         in that iteration and model layer
    cooccurrence_rank{r}.safetensors     (some revisions) the same keys, (E, E) co-activation counts

Counts are summed over ranks; the iterations become the trace's steps (they must be consecutive, each with every
layer), the keys' model layer indices its layer ids. Files are read with safetensors and JSON, never by executing
code; anything malformed raises ValueError naming the file and the key.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np

from minimoe.traces.inputs import parse_json, plural, read_text
from minimoe.traces.layers import layer_list
from minimoe.traces.load_dumps import count_array
from minimoe.traces.loads import LoadTrace


def _safetensors(file: str) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(file)
    except Exception as error:  # SafetensorError and friends: a damaged file
        raise ValueError(f"{file}: not a readable safetensors file ({str(error).strip()[:160]})") from None


def _keyed(files: list[str], shape_of, what: str) -> dict:
    """{(iter, layer): summed array} over the rank files; keys must read "{iter}_{layer}"."""
    total = {}
    for file in files:
        for key, value in _safetensors(file).items():
            match = re.fullmatch(r"(\d+)_(\d+)", key)
            if not match:
                raise ValueError(f"{file}: key {key!r} is not '{{iter}}_{{layer}}'")
            array = count_array(value, f"{file}: {key}", len(shape_of))
            if array.shape != shape_of:
                raise ValueError(f"{file}: {key} has shape {array.shape}, expected {shape_of} ({what})")
            index = (int(match[1]), int(match[2]))
            total[index] = total.get(index, 0) + array
    return total


def _rank_files(folder: str, prefix: str) -> tuple[list[str], list[str]]:
    """(the files ``{prefix}{r}.safetensors`` in rank order, the names of other ``{prefix}*.safetensors`` files)."""
    paths = glob.glob(os.path.join(folder, f"{prefix}*.safetensors"))
    ranked = {int(m[1]): p for p in paths if (m := re.fullmatch(rf"{prefix}(\d+)\.safetensors", os.path.basename(p)))}
    others = sorted(os.path.basename(p) for p in paths if p not in ranked.values())
    return [ranked[r] for r in sorted(ranked)], others


def from_trtllm(folder, moe_layers=None, model: str = "") -> LoadTrace:
    """TensorRT-LLM expert statistics (see the module docstring) as a LoadTrace, one step per iteration."""
    folder = os.fspath(folder)
    meta_path = os.path.join(folder, "meta_info.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{folder}: no meta_info.json (expected TensorRT-LLM's EXPERT_STATISTIC_PATH folder)")
    meta = parse_json(read_text(meta_path, "a JSON object"), meta_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object")
    for key in ("num_experts", "num_experts_per_token"):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 1:
            raise ValueError(f"{meta_path}: {key} must be a positive int, got {meta.get(key)!r}")
    experts, top_k = meta["num_experts"], meta["num_experts_per_token"]
    if top_k > experts:
        raise ValueError(f"{meta_path}: num_experts_per_token={top_k} is more than num_experts={experts}")
    rank_files, others = _rank_files(folder, "rank")
    if not rank_files:
        raise ValueError(f"{folder}: no rank{{r}}.safetensors files")
    if "ep_size" in meta and meta["ep_size"] != len(rank_files):
        raise ValueError(f"{meta_path}: ep_size={meta['ep_size']}, but the folder holds {len(rank_files)} rank files")
    counts = _keyed(rank_files, (experts,), "num_experts")
    if not counts:
        raise ValueError(f"{folder}: the rank files hold no counts (no '{{iter}}_{{layer}}' key)")
    iters = sorted({i for i, _ in counts})
    layers = sorted({layer for _, layer in counts})
    if iters != list(range(iters[0], iters[-1] + 1)):
        raise ValueError(f"{folder}: iterations {iters[0]}..{iters[-1]} have gaps")
    missing = [(i, layer) for i in iters for layer in layers if (i, layer) not in counts]
    if missing:
        raise ValueError(f"{folder}: no counts for iteration {missing[0][0]}, layer {missing[0][1]} (every "
                         "iteration needs every layer)")
    table = np.stack([np.stack([counts[(i, layer)] for layer in layers]) for i in iters])  # (S, L, E)
    if moe_layers is not None and list(moe_layers) != layers:
        raise ValueError(f"{folder}: the statistics hold model layers {layer_list(layers)}, but --moe-layers/--config "
                         f"name {layer_list(list(moe_layers))}")
    co_files, co_others = _rank_files(folder, "cooccurrence_rank")
    coactivation = None
    if co_files:
        pairs = _keyed(co_files, (experts, experts), "num_experts x num_experts")
        if {layer for _, layer in pairs} - set(layers):
            raise ValueError(f"{folder}: co-occurrence layers {layer_list(sorted({l for _, l in pairs}))} differ "
                             f"from {layer_list(layers)}")
        coactivation = np.stack([sum((v for (i, l), v in pairs.items() if l == layer), np.zeros((experts, experts),
                                                                                               np.int64))
                                 for layer in layers])
        for layer in range(len(layers)):
            if not np.array_equal(coactivation[layer], coactivation[layer].T):
                raise ValueError(f"{folder}: the co-occurrence of layer {layers[layer]} is not symmetric")
    notes = {"steps": f"iterations {iters[0]}..{iters[-1]}, summed over {plural(len(rank_files), 'rank')}"}
    if others + co_others:
        notes["files ignored"] = ", ".join(others + co_others) + " (not named rank{r} / cooccurrence_rank{r})"
    return LoadTrace(counts=table, num_experts=experts, top_k=top_k, layer_ids=np.array(layers), ordered=True,
                     coactivation=coactivation, model=model, source="trtllm expert statistics", notes=notes)
