"""A placement in the file each serving engine loads at start-up (the ``minimoe export`` command is
``minimoe.placement.export_command``).

Every engine stores a placement as physical-to-logical tables: slot ``s`` of a layer holds one expert and lives on
expert-parallel rank ``s // (P / ep_size)`` (P slots per layer), as ``Placement.phy2log`` does with ep_size = the
placement's GPUs. What differs is the container and the layer numbering:

    format  file                      what it holds                                   layers
    sglang  --init-expert-location    {"physical_to_logical_map": [num_hidden_layers  every decoder layer: MoE rows
            FILE.json or FILE.pt      x P]} (nothing else: SGLang passes the keys as  scattered to their model
                                      arguments); P = E + --ep-num-redundant-experts  index, dense rows the identity
                                                                                      (slot s -> expert s mod E)
    trtllm  moe_load_balancer.yaml    num_slots: P, initial_global_assignments:       model layer index of each
                                      {layer: [P expert ids]}, layer_updates_per_     MoE layer
                                      iter: 0 (a static placement)
    vllm    eplb_initial_mapping      {"record_type": "eplb_initial_mapping",         the model's MoE layers
            .jsonl (one line)         "version": 1, "num_redundant_experts": P - E,
                                      "num_slots": P, "initial_global_assignments":    0..M-1
                                      {"0": [P expert ids], ...}} (an interface still
                                      under review upstream, vLLM pull request 41141)
    eplb    .pt (torch.save)          DeepSeek EPLB's tensors {"phy2log" [M, P],      the model's MoE layers
                                                                                      0..M-1
                                      "log2phy" [M, E, maxcnt] (-1 padded),
                                      "logcnt" [M, E]}

Which model layer each row of a placement is (what it records, ``--moe-layers``, ``--config``) and what an
engine's file must then cover follow the rules of ``minimoe.placement.engine_layers``: a placement of some of the
model's MoE layers (a log of layers 0 and 15 of 16) is written at their places, and with ``--config`` every MoE
layer it does not cover gets the identity placement (slot s holds expert s mod E).
``export_command.FLAGS`` says which flags each format reads (``minimoe export --help`` prints it); another is
refused in one line. A load trace (``minimoe import`` of an engine's load dump) exports its totals where an engine
takes loads instead of a placement: SGLang's ``{"logical_count": [num_hidden_layers x E]}`` (SGLang then runs its
own EPLB) and EPLB's ``weight`` [M, E], by the same rules (MoE layers it does not cover hold zero counts); the
counts are written exactly. A hand-edited placement file with a field of the wrong type is refused in one line
naming the file and the field.

Every ``placement`` argument is a ``minimoe.placement.Placement``: this module reads its ``phy2log``, sizes and
``layer_ids`` and does not import the type, whose ``to_sglang``, ``to_trtllm``, ``to_vllm`` and ``to_eplb`` call
the functions here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minimoe.placement.engine_layers import check_count, engine_layers, spread
from minimoe.traces.layer_ids import known_layer_ids, layer_list
from minimoe.traces.layers import ModelLayers, check_experts

FORMATS = ("sglang", "trtllm", "vllm", "eplb")
SUFFIXES = {"sglang": (".json", ".pt"), "trtllm": (".yaml", ".yml"), "vllm": (".jsonl",), "eplb": (".pt",)}


def sglang_map(placement, moe_layers, num_layers: int) -> np.ndarray:
    """(num_layers, P) int64: MoE rows from ``phy2log`` at their model index ``moe_layers`` (one per row), the other
    rows the identity (slot s -> expert s mod E)."""
    rows = check_count("the placement", placement.num_layers, "the layer list", moe_layers)
    if rows and rows[-1] >= num_layers:
        raise ValueError(f"MoE layer {rows[-1]} is beyond the model's {num_layers} layers")
    table = np.tile(np.arange(placement.num_slots) % placement.num_experts, (num_layers, 1))
    table[rows] = placement.phy2log
    return table


def to_sglang(placement, moe_layers, num_layers: int) -> dict:
    """SGLang's ``--init-expert-location`` object: exactly ``{"physical_to_logical_map": [[...]]}``."""
    return {"physical_to_logical_map": sglang_map(placement, moe_layers, num_layers).tolist()}


def to_trtllm(placement, moe_layers) -> dict:
    """TensorRT-LLM's ``moe_load_balancer`` config: a static placement keyed by model layer index ``moe_layers``."""
    rows = check_count("the placement", placement.num_layers, "the layer list", moe_layers)
    return {"num_slots": int(placement.num_slots),
            "initial_global_assignments": {layer: placement.phy2log[i].tolist() for i, layer in enumerate(rows)},
            "layer_updates_per_iter": 0}


def to_vllm(placement) -> dict:
    """vLLM's ``eplb_initial_mapping`` record: row l of ``phy2log`` as MoE layer l (keys "0".."L-1")."""
    return {"record_type": "eplb_initial_mapping", "version": 1,
            "num_redundant_experts": int(placement.num_slots - placement.num_experts),
            "num_slots": int(placement.num_slots),
            "initial_global_assignments": {str(i): row.tolist() for i, row in enumerate(placement.phy2log)}}


def eplb_tensors(placement):
    """DeepSeek EPLB's form as torch int64 tensors, row l of ``phy2log`` as MoE layer l: ``phy2log [L, R]``,
    ``log2phy [L, E, maxcnt]`` (slots of each expert in slot order, -1 padded), ``logcnt [L, E]``."""
    import torch

    counts = placement.replica_counts()
    log2phy = np.full((placement.num_layers, placement.num_experts, int(counts.max())), -1, dtype=np.int64)
    for layer in range(placement.num_layers):
        order = np.argsort(placement.phy2log[layer], kind="stable")
        rank = np.arange(placement.num_slots) - np.repeat(np.cumsum(counts[layer]) - counts[layer], counts[layer])
        log2phy[layer, placement.phy2log[layer, order], rank] = order
    return tuple(torch.from_numpy(a) for a in (placement.phy2log.copy(), log2phy, counts.astype(np.int64)))


def over_model(placement, rows: list[int], model_moe: list[int]):
    """The placement over every MoE layer ``model_moe`` of the model (its ``layer_ids``): its rows at the model
    layers ``rows``, the identity (slot s -> expert s mod E) for the MoE layers it does not cover."""
    if list(rows) == list(model_moe):
        return placement
    identity = np.arange(placement.num_slots) % placement.num_experts
    return type(placement)(spread(placement.phy2log, rows, model_moe, identity), placement.num_experts,
                           placement.num_nodes, placement.gpus_per_node, placement.method, model_moe)


# ---- writing the engines' files ---------------------------------------------------------------------------
def write(placement, fmt: str, path, layers: ModelLayers | None = None, num_layers: int | None = None) -> str:
    """Write ``placement`` as ``fmt`` to ``path``; returns one line saying what was written and how to use it.
    Its rows' model layers come from what it records, ``layers`` (``--moe-layers`` or ``--config``, may be None)
    and ``num_layers`` (``--num-layers``, SGLang's rows without a config), by ``engine_layers``'s rules."""
    path = Path(path)
    if layers is not None:
        check_experts(layers, "the placement", placement.num_experts)
    at = engine_layers(fmt, "the placement", placement.num_layers, placement.layer_ids, layers, num_layers)
    if at.partial:
        placement = over_model(placement, at.rows, at.model_moe)
    ranks, per_rank = placement.num_gpus, placement.slots_per_gpu
    spare = placement.num_slots - placement.num_experts
    where = f"{placement.num_experts} experts on {placement.num_slots} slots per layer over {ranks} ranks " \
            f"(slot s on rank s // {per_rank})"
    filled = at.covered("keep slot s -> expert s mod E") + at.assumption
    if fmt == "sglang":
        table = sglang_map(placement, at.model_moe, at.num_layers)
        if path.suffix == ".pt":
            import torch

            torch.save({"physical_to_logical_map": torch.from_numpy(table)}, path)
        else:
            path.write_text(json.dumps({"physical_to_logical_map": table.tolist()}) + "\n")
        size = f"{at.num_layers} layers" + (" (the last placed layer + 1: --num-layers N or --config for a model with "
                                            "more)" if at.guessed else "")
        return (f"{path}: SGLang --init-expert-location, {size}, placed: {layer_list(at.rows)}{filled}, {where}; "
                f"start SGLang with --ep-num-redundant-experts {spare} and expert parallelism over {ranks} ranks")
    if fmt == "trtllm":
        import yaml

        path.write_text(yaml.safe_dump(to_trtllm(placement, at.model_moe), default_flow_style=None, width=1 << 20))
        return (f"{path}: TensorRT-LLM moe_load_balancer (static), model layers {layer_list(at.model_moe)}{filled}, "
                f"{where}; run with moe_expert_parallel_size {ranks}")
    if fmt == "vllm":
        path.write_text(json.dumps(to_vllm(placement)) + "\n")
        return (f"{path}: vLLM eplb_initial_mapping, {placement.num_layers} MoE layers{filled}, {where} ({spare} "
                "redundant)")
    import torch

    phy2log, log2phy, logcnt = eplb_tensors(placement)
    torch.save({"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt}, path)
    return (f"{path}: DeepSeek EPLB tensors phy2log {tuple(phy2log.shape)}, log2phy {tuple(log2phy.shape)}, "
            f"logcnt {tuple(logcnt.shape)}{filled}; {where}")


def write_loads(loads, fmt: str, path, layers: ModelLayers | None = None, num_layers: int | None = None) -> str:
    """Write a ``LoadTrace``'s totals where an engine takes loads (SGLang ``logical_count``, EPLB ``weight``), its
    rows at their model layers by ``engine_layers``'s rules (MoE layers it does not cover: zero counts);
    ``layers`` (--moe-layers or --config) must agree with the layers and experts the load file records."""
    if fmt not in ("sglang", "eplb"):
        raise ValueError(f"--format {fmt} takes a placement, not loads: run minimoe report --trace on the load file "
                         "and export the placement it recommends")
    if layers is not None:
        check_experts(layers, "the load file", loads.num_experts)
    what = "the load file"
    at = engine_layers(fmt, what, loads.num_layers, known_layer_ids(loads.layer_ids), layers, num_layers)
    totals = loads.counts.sum(axis=0)  # (L, E) int64, exact
    zeros = np.zeros(loads.num_experts, np.int64)
    if fmt == "eplb":
        import torch

        weight = spread(totals, at.rows, at.model_moe, zeros) if at.partial else totals
        torch.save({"weight": torch.from_numpy(weight)}, path)
        return (f"{path}: EPLB weight {tuple(weight.shape)} (tokens per expert, summed over {loads.num_steps} "
                f"steps){at.covered('hold no tokens')}{at.assumption}")
    table = spread(totals, at.rows, list(range(at.num_layers)), zeros)  # every decoder layer; dense rows zero
    if Path(path).suffix == ".pt":
        import torch

        torch.save({"logical_count": torch.from_numpy(table)}, path)
    else:
        Path(path).write_text(json.dumps({"logical_count": table.tolist()}) + "\n")
    return (f"{path}: SGLang --init-expert-location logical_count {table.shape} (SGLang runs its EPLB on it at "
            f"start-up), {int(totals.sum()):,} (token, expert) pairs")
