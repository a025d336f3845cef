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
    vllm    eplb_initial_mapping      {"record_type": "eplb_initial_mapping",         MoE layers 0..L-1
            .jsonl (one line)         "version": 1, "num_redundant_experts": P - E,
                                      "num_slots": P, "initial_global_assignments":
                                      {"0": [P expert ids], ...}} (an interface still
                                      under review upstream, vLLM pull request 41141)
    eplb    .pt (torch.save)          DeepSeek EPLB's tensors {"phy2log" [L, P],      as the placement (MoE layers)
                                      "log2phy" [L, E, maxcnt] (-1 padded),
                                      "logcnt" [L, E]}

The MoE layers' model indices come from the placement itself when the trace it was fitted on named them
(``Placement.layer_ids``: a routing log's logged layers, a capture's kept layers), from ``--moe-layers``, or from
the model's ``--config`` (``minimoe.traces.layers``), which also lists every MoE layer of the model. A placement
of some of those layers (a log of layers 0 and 15 of a 16-layer model) is written at its layers' places, and
every MoE layer it does not cover gets the identity placement (slot s holds expert s mod E), so the engine's file
covers the whole model. vLLM and EPLB number the MoE layers 0..M-1 over the model's MoE layers, so a placement
whose model layers are known but are not 0..L-1 needs ``--config`` to be numbered.
``export_command.FLAGS`` says which flags each format reads (``minimoe export --help`` prints it); another is refused in one line.
A load trace (``minimoe import`` of an engine's load dump) exports its totals where an engine takes loads
instead of a placement: SGLang's ``{"logical_count": [num_hidden_layers x E]}`` (SGLang then runs its own EPLB)
and EPLB's ``weight`` [L, E]; the counts are written exactly. Its layers and experts are checked against
``--moe-layers`` / ``--config`` as a placement's are. A hand-edited placement file with a field of the wrong type
is refused in one line naming the file and the field.

Every ``placement`` argument is a ``minimoe.placement.Placement``: this module reads its ``phy2log``, sizes and
``to_eplb`` and does not import the type, whose ``to_sglang``, ``to_trtllm`` and ``to_vllm`` call the functions here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minimoe.traces.inputs import plural
from minimoe.traces.layers import ModelLayers, check_experts, layer_list

FORMATS = ("sglang", "trtllm", "vllm", "eplb")
SUFFIXES = {"sglang": (".json", ".pt"), "trtllm": (".yaml", ".yml"), "vllm": (".jsonl",), "eplb": (".pt",)}


def _moe_rows(placement, moe_layers, named_by: str = "the layer list") -> list[int]:
    """``moe_layers``, the model index of each of the placement's MoE layers, as ints; ValueError naming
    ``named_by`` (--moe-layers, --config FILE) when their count is not the placement's or they do not increase."""
    moe_layers = [int(i) for i in moe_layers]
    _check_count("the placement", placement.num_layers, named_by, moe_layers)
    if sorted(set(moe_layers)) != moe_layers or (moe_layers and moe_layers[0] < 0):
        raise ValueError(f"MoE layer indices must be distinct, increasing and >= 0, got {layer_list(moe_layers)}")
    return moe_layers


def _check_count(what: str, num_layers: int, named_by: str, named: list[int]) -> None:
    """Refuse a layer list ``named`` (by ``named_by``) whose length is not ``what``'s (the placement or the load
    file) number of MoE layers."""
    if len(named) != num_layers:
        raise ValueError(f"{what} has {plural(num_layers, 'MoE layer')}, but {named_by} names {len(named)} "
                         f"({layer_list(named)})")


def sglang_map(placement, moe_layers, num_layers: int) -> np.ndarray:
    """(num_layers, P) int64: MoE rows from ``phy2log`` at their model index, dense rows ``s mod E``."""
    rows = _moe_rows(placement, moe_layers)
    if rows and rows[-1] >= num_layers:
        raise ValueError(f"MoE layer {rows[-1]} is beyond the model's {num_layers} layers")
    table = np.tile(np.arange(placement.num_slots) % placement.num_experts, (num_layers, 1))
    table[rows] = placement.phy2log
    return table


def to_sglang(placement, moe_layers, num_layers: int) -> dict:
    """SGLang's ``--init-expert-location`` object: exactly ``{"physical_to_logical_map": [[...]]}``."""
    return {"physical_to_logical_map": sglang_map(placement, moe_layers, num_layers).tolist()}


def to_trtllm(placement, moe_layers) -> dict:
    """TensorRT-LLM's ``moe_load_balancer`` config: a static placement keyed by model layer index."""
    rows = _moe_rows(placement, moe_layers)
    return {"num_slots": int(placement.num_slots),
            "initial_global_assignments": {layer: placement.phy2log[i].tolist() for i, layer in enumerate(rows)},
            "layer_updates_per_iter": 0}


def to_vllm(placement) -> dict:
    """vLLM's ``eplb_initial_mapping`` record (MoE layers 0..L-1, as strings)."""
    return {"record_type": "eplb_initial_mapping", "version": 1,
            "num_redundant_experts": int(placement.num_slots - placement.num_experts),
            "num_slots": int(placement.num_slots),
            "initial_global_assignments": {str(i): row.tolist() for i, row in enumerate(placement.phy2log)}}


# ---- which model layers the placement's rows are ------------------------------------------------------------
def model_moe_layers(placement, layers: ModelLayers | None) -> list[int] | None:
    """The model layer index of each of the placement's rows: ``--moe-layers`` (which must agree with the layers
    the placement records), else the placement's own ``layer_ids``, else (with ``--config``) the config's MoE
    layers, which must then be as many as the rows; None when nothing says. Raises ValueError naming the source."""
    recorded = placement.layer_ids
    if layers is not None and layers.source == "--moe-layers":
        named = _moe_rows(placement, layers.moe_layers, "--moe-layers")
        if recorded is not None and named != recorded:
            raise ValueError(f"--moe-layers {layer_list(named)} disagrees with the model layers the placement "
                             f"records, {layer_list(recorded)} (those of the trace it was fitted on)")
        return named
    if recorded is not None:
        if layers is not None:
            dense = [i for i in recorded if i not in layers.moe_layers]
            if dense:
                raise ValueError(f"the placement records model layers {layer_list(recorded)}, but by {layers.source} "
                                 f"layers {layer_list(dense)} are not MoE layers (its MoE layers: "
                                 f"{layer_list(layers.moe_layers)})")
        return recorded
    return None if layers is None else _moe_rows(placement, layers.moe_layers, layers.source)


def over_model(placement, rows: list[int], model_moe: list[int]):
    """The placement over every MoE layer ``model_moe`` of the model: its rows where ``rows`` place them, the
    identity (slot s -> expert s mod E) for the MoE layers it does not cover."""
    if list(rows) == list(model_moe):
        return placement
    identity = np.arange(placement.num_slots) % placement.num_experts
    table = np.tile(identity, (len(model_moe), 1))
    table[[model_moe.index(i) for i in rows]] = placement.phy2log
    return type(placement)(table, placement.num_experts, placement.num_nodes, placement.gpus_per_node,
                           placement.method, model_moe)


# ---- writing the engines' files ---------------------------------------------------------------------------
def write(placement, fmt: str, path, layers: ModelLayers | None = None, num_layers: int | None = None) -> str:
    """Write ``placement`` as ``fmt`` to ``path``; returns one line saying what was written and how to use it.
    The model layers come from ``model_moe_layers``; ``layers`` (``--moe-layers`` or ``--config``) may be None
    when the placement records them; ``num_layers`` (``--num-layers``) sizes sglang's table without a config."""
    path = Path(path)
    if layers is not None:
        check_experts(layers, "the placement", placement.num_experts)
    rows = model_moe_layers(placement, layers)
    if fmt in ("sglang", "trtllm") and rows is None:
        raise ValueError(f"--format {fmt} needs the model layer index of each MoE layer, and the placement does not "
                         "record them (its trace did not say): give --moe-layers or --config (the model's config.json)")
    from_config = layers is not None and layers.source != "--moe-layers"
    model_moe = list(layers.moe_layers) if from_config else rows
    if fmt in ("vllm", "eplb") and rows is not None and not from_config and rows != list(range(len(rows))):
        raise ValueError(f"the placement places model layers {layer_list(rows)}; --format {fmt} numbers the model's "
                         "MoE layers 0..M-1, which only the model's config tells: give --config MODEL/config.json")
    covered = ""
    if model_moe is not None and len(model_moe) > len(rows):
        covered = (f" ({len(rows)} of the model's {len(model_moe)} MoE layers placed; the others keep slot s -> "
                   "expert s mod E)")
        placement = over_model(placement, rows, model_moe)
    ranks, per_rank = placement.num_gpus, placement.slots_per_gpu
    spare = placement.num_slots - placement.num_experts
    where = f"{placement.num_experts} experts on {placement.num_slots} slots per layer over {ranks} ranks " \
            f"(slot s on rank s // {per_rank})"
    if fmt == "sglang":
        if layers is None:
            num_layers = num_layers or model_moe[-1] + 1
            if model_moe[-1] >= num_layers:
                raise ValueError(f"--num-layers {num_layers}: the placement places model layer {model_moe[-1]}")
        else:
            num_layers = layers.num_layers
        table = sglang_map(placement, model_moe, num_layers)
        if path.suffix == ".pt":
            import torch

            torch.save({"physical_to_logical_map": torch.from_numpy(table)}, path)
        else:
            path.write_text(json.dumps({"physical_to_logical_map": table.tolist()}) + "\n")
        return (f"{path}: SGLang --init-expert-location, {num_layers} layers, placed: {layer_list(rows)}{covered}, "
                f"{where}; start SGLang with --ep-num-redundant-experts {spare} and expert parallelism over {ranks} "
                "ranks")
    if fmt == "trtllm":
        import yaml

        path.write_text(yaml.safe_dump(to_trtllm(placement, model_moe), default_flow_style=None, width=1 << 20))
        return (f"{path}: TensorRT-LLM moe_load_balancer (static), model layers {layer_list(model_moe)}{covered}, "
                f"{where}; run with moe_expert_parallel_size {ranks}")
    if fmt == "vllm":
        path.write_text(json.dumps(to_vllm(placement)) + "\n")
        return (f"{path}: vLLM eplb_initial_mapping, {placement.num_layers} MoE layers{covered}, {where} ({spare} "
                "redundant)")
    import torch

    phy2log, log2phy, logcnt = placement.to_eplb()
    torch.save({"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt}, path)
    return (f"{path}: DeepSeek EPLB tensors phy2log {tuple(phy2log.shape)}, log2phy {tuple(log2phy.shape)}, "
            f"logcnt{covered}; {where}")


def write_loads(loads, fmt: str, path, layers: ModelLayers | None = None, num_layers: int | None = None) -> str:
    """Write a ``LoadTrace``'s totals where an engine takes loads (SGLang ``logical_count``, EPLB ``weight``);
    ``layers`` (from --moe-layers or --config) must agree with the layers and experts the load file records;
    ``num_layers`` (``--num-layers``) sizes SGLang's table when no config does."""
    if fmt not in ("sglang", "eplb"):
        raise ValueError(f"--format {fmt} takes a placement, not loads: run minimoe report --trace on the load file "
                         "and export the placement it recommends")
    if layers is not None:
        _check_load_layers(loads, layers)
    totals = loads.counts.sum(axis=0)  # (L, E) int64, exact
    if fmt == "eplb":
        import torch

        torch.save({"weight": torch.from_numpy(totals)}, path)
        return f"{path}: EPLB weight {tuple(totals.shape)} (tokens per expert, summed over {loads.num_steps} steps)"
    # one id per MoE layer: _check_load_layers refused another count of layers, and LoadTrace checks its layer_ids
    ids = list(layers.moe_layers) if layers is not None else [int(i) for i in loads.layer_ids]
    if any(i < 0 for i in ids):
        raise ValueError("the load file does not say which model layers its rows are: give --moe-layers or --config")
    num_layers = layers.num_layers if layers is not None else num_layers or max(ids) + 1
    if max(ids) >= num_layers:
        raise ValueError(f"--num-layers {num_layers}: the load file records model layer {max(ids)}")
    table = np.zeros((num_layers, loads.num_experts), np.int64)
    table[ids] = totals
    if Path(path).suffix == ".pt":
        import torch

        torch.save({"logical_count": torch.from_numpy(table)}, path)
    else:
        Path(path).write_text(json.dumps({"logical_count": table.tolist()}) + "\n")
    return (f"{path}: SGLang --init-expert-location logical_count {table.shape} (SGLang runs its EPLB on it at "
            f"start-up), {int(totals.sum()):,} (token, expert) pairs")


def _check_load_layers(loads, layers: ModelLayers) -> None:
    """The checks a placement gets: the config's expert count, and the model layers the load file records."""
    check_experts(layers, "the load file", loads.num_experts)
    named, recorded = list(layers.moe_layers), loads.layer_ids.tolist()
    _check_count("the load file", loads.num_layers, layers.source, named)
    if all(i >= 0 for i in recorded) and named != recorded:
        raise ValueError(f"the load file records model layers {layer_list(recorded)}, but {layers.source} names "
                         f"{layer_list(named)}")
