"""A trace's ``layer_ids``, the model's layer number of each of its MoE layers, and how messages show them.

A trace or a placement counts MoE layers only (axis 1 of ``experts``, axis 0 of ``phy2log``); ``layer_ids[l]`` is
the model's decoder-layer index of MoE layer l, or -1 where the source did not say. Known ids increase, in model
order, and stay below ``MAX_LAYERS``. Which layers of a model are MoE layers is ``minimoe.traces.layers``; this
module only checks the numbers, so the trace format can use it without knowing of models.
"""
from __future__ import annotations

import numbers

import numpy as np

MAX_LAYERS = 1024  # bounds every layer index and count read here: no model has that many decoder layers


def layer_list(values, limit: int = 8) -> str:
    """A layer list as messages show it: whole when short, else its first ``limit`` entries and its last,
    ``[0, 1, 2, 3, 4, 5, 6, 7, ... 999] (1000 in all)``; never more than a short line."""
    if isinstance(values, (str, bytes)):
        return clip(repr(values))
    try:
        items = [int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v for v in values]
    except TypeError:  # not a list at all
        return clip(repr(values))
    if len(items) <= limit + 1:
        return clip(repr(items))
    return clip(f"[{', '.join(map(repr, items[:limit]))}, ... {items[-1]!r}] ({len(items)} in all)")


def as_layer_ids(values, num_layers: int) -> np.ndarray:
    """A trace's ``layer_ids``: the model layer index of each of its ``num_layers`` MoE layers, as int64 (L,),
    -1 where the source does not say (``values`` None: -1 for every layer). Integer arrays and lists only
    (ValueError otherwise); :func:`check_layer_ids` checks the values."""
    if values is None:
        return np.full(num_layers, -1, np.int64)
    array = np.asarray(values)
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"layer_ids must hold integers, got {layer_list(np.ravel(array).tolist())} "
                         f"(dtype {array.dtype})")
    if array.size and array.dtype.kind == "u" and array.max() >= MAX_LAYERS:  # before int64 could wrap it round
        raise ValueError(f"layer_ids must be model layer indices in [0, {MAX_LAYERS}), got "
                         f"{layer_list(np.ravel(array).tolist())}")
    return array.astype(np.int64)


def check_layer_ids(layer_ids: np.ndarray, num_layers: int) -> None:
    """Raise ValueError unless ``layer_ids`` is (num_layers,), every id is -1 (unknown) or in [0, MAX_LAYERS),
    and the known ids are distinct and increasing (MoE layers are stored in model order)."""
    if layer_ids.shape != (num_layers,) or (layer_ids < -1).any() or (layer_ids >= MAX_LAYERS).any():
        raise ValueError(f"layer_ids must be ({num_layers},) model layer indices in [0, {MAX_LAYERS}) (-1 = "
                         f"unknown), got {layer_list(layer_ids.tolist())}")
    known = layer_ids[layer_ids >= 0]
    if (np.diff(known) <= 0).any():
        raise ValueError(f"layer_ids must be distinct and increasing (the model's order), got "
                         f"{layer_list(layer_ids.tolist())}")


def known_layer_ids(layer_ids) -> list[int] | None:
    """The model layer indices as a list when every one is known, else None."""
    ids = [int(i) for i in layer_ids]
    return ids if ids and min(ids) >= 0 else None


def clip(text: str, width: int = 160) -> str:
    """``text`` cut to ``width`` characters for a one-line message."""
    return text if len(text) <= width else text[:width - 3] + "..."
