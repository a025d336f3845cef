"""Which model layer each row of a placement (or of a load file) is, and which layers an engine's file must cover.

A placement has L rows, one per MoE layer it places (axis 0 of ``phy2log``); a load file likewise. A serving
engine lays its file out over the model (``minimoe.placement.export`` has the table): SGLang one row per decoder
layer, TensorRT-LLM one key per MoE layer (its model index), vLLM and EPLB one row per MoE layer numbered 0..M-1
over the model's M MoE layers. Three things can say which model layers the L rows are:

    recorded      ``Placement.layer_ids`` / ``LoadTrace.layer_ids``: the trace it was fitted on said (a routing
                  log's logged layers, a capture's kept layers, the recorded model's MoE layers)
    --moe-layers  the user's list, one model index per row; it must agree with ``recorded``
    --config      the model's config.json: every MoE layer of the model (``minimoe.traces.layers``); ``recorded``
                  must be among them, and without ``recorded`` there must be L of them

Without ``--config`` nothing says how many MoE layers the model has, so the rules are:

    sglang   rows at their model index; the table has --num-layers rows, else the last row's layer + 1 (said)
    trtllm   TensorRT-LLM wants every MoE layer: rows recorded as other than 0..L-1 need --config (or
             --moe-layers, the user's word that these are all of them)
    vllm, eplb   rows are MoE layers 0..L-1; rows recorded as other model layers need --config
    (trtllm, vllm and eplb then take rows 0..L-1 as every MoE layer of the model, and the output line says so)

and with ``--config`` every MoE layer the rows do not cover is filled: the identity placement (slot s holds
expert s mod E) for a placement, zero counts for a load file (``spread``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minimoe.traces.inputs import plural
from minimoe.traces.layers import ModelLayers, layer_list


@dataclass
class EngineLayers:
    """``rows``: the model layer of each of the L rows (None: nothing says); ``model_moe``: every MoE layer of the
    model as far as known (the config's, else ``rows``); ``num_layers``: the decoder layers an SGLang table has,
    ``guessed`` when it is only the last row's layer + 1; ``assumed`` when an engine that wants every MoE layer
    takes the rows as all of them because nothing (no --config, no --moe-layers) says otherwise."""

    rows: list[int] | None
    model_moe: list[int] | None
    num_layers: int | None
    guessed: bool = False
    assumed: bool = False

    @property
    def assumption(self) -> str:
        """" (its rows taken as every MoE layer of the model: ...)" when ``assumed``, else ""."""
        return " (its rows taken as every MoE layer of the model: --config MODEL/config.json checks that)" \
            if self.assumed else ""

    @property
    def partial(self) -> bool:
        """Whether the rows cover only some of the model's known MoE layers (the others must be filled)."""
        return self.rows is not None and self.model_moe is not None and len(self.model_moe) > len(self.rows)

    def covered(self, others: str) -> str:
        """" (2 of the model's 16 MoE layers given; the others OTHERS)" when ``partial``, else ""."""
        if not self.partial:
            return ""
        return f" ({len(self.rows)} of the model's {len(self.model_moe)} MoE layers given; the others {others})"


def check_count(what: str, num_rows: int, named_by: str, named: list[int]) -> list[int]:
    """``named`` (by ``named_by``: --moe-layers, --config FILE) as ints, refused when their count is not ``what``'s
    (the placement, the load file) number of rows or they are not distinct, increasing and >= 0."""
    named = [int(i) for i in named]
    if len(named) != num_rows:
        raise ValueError(f"{what} has {plural(num_rows, 'MoE layer')}, but {named_by} names {len(named)} "
                         f"({layer_list(named)})")
    if sorted(set(named)) != named or (named and named[0] < 0):
        raise ValueError(f"MoE layer indices must be distinct, increasing and >= 0, got {layer_list(named)}")
    return named


def model_rows(what: str, num_rows: int, recorded: list[int] | None, layers: ModelLayers | None) -> list[int] | None:
    """The model layer of each of ``what``'s ``num_rows`` rows, from --moe-layers, ``recorded`` or --config (see
    the module docstring); None when nothing says. Raises ValueError naming the source that disagrees."""
    if layers is not None and layers.source == "--moe-layers":
        named = check_count(what, num_rows, "--moe-layers", layers.moe_layers)
        if recorded is not None and named != recorded:
            raise ValueError(f"--moe-layers {layer_list(named)} disagrees with the model layers {what} records, "
                             f"{layer_list(recorded)} (those of the trace it comes from)")
        return named
    if recorded is not None:
        dense = [] if layers is None else [i for i in recorded if i not in layers.moe_layers]
        if dense:
            raise ValueError(f"{what} records model layers {layer_list(recorded)}, but by {layers.source} layers "
                             f"{layer_list(dense)} are not MoE layers (its MoE layers: "
                             f"{layer_list(layers.moe_layers)})")
        return recorded
    return None if layers is None else check_count(what, num_rows, layers.source, layers.moe_layers)


def engine_layers(fmt: str, what: str, num_rows: int, recorded: list[int] | None, layers: ModelLayers | None,
                  num_layers: int | None = None) -> EngineLayers:
    """Where ``what``'s rows go in ``fmt``'s file (the rules of the module docstring): raises ValueError, naming
    the flag that would settle it, when they cannot be placed."""
    rows = model_rows(what, num_rows, recorded, layers)
    from_config = layers is not None and layers.source != "--moe-layers"
    renumbered = rows is not None and rows != list(range(num_rows))
    if fmt in ("sglang", "trtllm") and rows is None:
        raise ValueError(f"--format {fmt} needs the model layer index of each MoE layer, and {what} does not record "
                         "them (its trace did not say): give --moe-layers or --config (the model's config.json)")
    if fmt == "trtllm" and renumbered and layers is None:
        raise ValueError(f"{what} covers model layers {layer_list(rows)}; TensorRT-LLM wants an assignment for every "
                         "MoE layer, which only the model's config lists: give --config MODEL/config.json (the others "
                         "get slot s -> expert s mod E), or --moe-layers if these are all of them")
    if fmt in ("vllm", "eplb") and renumbered and not from_config:
        raise ValueError(f"{what} covers model layers {layer_list(rows)}; --format {fmt} numbers the model's MoE "
                         "layers 0..M-1, which only the model's config tells: give --config MODEL/config.json")
    model_moe = list(layers.moe_layers) if from_config else rows
    guessed = False
    if layers is not None:
        num_layers = layers.num_layers
    elif rows is not None:
        if num_layers is not None and rows[-1] >= num_layers:
            raise ValueError(f"--num-layers {num_layers}: {what} covers model layer {rows[-1]}, so the model has at "
                             f"least {rows[-1] + 1} layers")
        num_layers, guessed = (num_layers, False) if num_layers is not None else (rows[-1] + 1, True)
    return EngineLayers(rows, model_moe, num_layers, guessed, assumed=fmt != "sglang" and layers is None)


def spread(values: np.ndarray, rows: list[int], model_moe: list[int], fill: np.ndarray) -> np.ndarray:
    """values (L, X), one row per model layer ``rows`` -> (M, X) over the model's MoE layers ``model_moe`` (each
    of ``rows`` among them), ``fill`` (X,) where no row is given."""
    out = np.tile(np.asarray(fill, values.dtype), (len(model_moe), 1))
    out[[model_moe.index(i) for i in rows]] = values
    return out
