"""The ``Placement``: which GPU slots hold which experts, in every MoE layer, and which replica serves a token.

A placement of ``E`` logical experts on ``G`` GPUs with ``R`` physical slots per layer (``R >= E``,
``R`` a multiple of ``G``) is the table ``phy2log[l, s]`` = the expert held by slot ``s`` of layer ``l``;
slot ``s`` lives on GPU ``s // (R / G)`` and node ``GPU // gpus_per_node`` (DeepSeek-EPLB's convention,
also used by vLLM and SGLang). Experts with several slots are *replicas*; ``R - E`` slots are spares.

Which replica serves a token (``Placement.route``) is fixed here so that traffic accounting and the
expert-parallel layer agree: **nearest first** — a replica on the token's own GPU, else one on its
node, else any; among equally near replicas the token takes ``candidates[token_index % count]``
(candidates in slot order), which spreads tokens evenly, like vLLM's ``position % replica_count``.

``layer_ids`` (optional) is the model's layer index of each of the L MoE layers, taken from the trace the
placement was fitted on when its source said (``minimoe.traces.format``): it tells ``minimoe export`` where each
row goes in the engine's file. Files: ``save`` writes JSON tagged ``"format": "minimoe.placement.methods/1"``
(the tag files have always carried; ``layer_ids`` only when known); ``load`` also reads the placement inside a ``minimoe report`` deployment file. ``to_sglang``,
``to_trtllm``, ``to_vllm`` and ``to_eplb`` give the serving engines' own forms (``minimoe.placement.export``).
:func:`minimoe.placement.methods.place` fits one.
"""
from __future__ import annotations

import json
import os

import numpy as np

from minimoe.placement import export
from minimoe.placement.topology import Topology
from minimoe.traces.inputs import parse_json, read_text
from minimoe.traces.layer_ids import as_layer_ids, check_layer_ids, known_layer_ids, layer_list

FORMAT = "minimoe.placement.methods/1"  # the tag of a placement file (the tag files have always carried)


class Placement:
    """``phy2log`` (L, R) int64 on ``num_nodes x gpus_per_node`` GPUs; ``layer_ids`` the model layer index of
    each MoE layer (L ints, increasing) or None (not known); validated on construction."""

    def __init__(self, phy2log, num_experts: int, num_nodes: int, gpus_per_node: int, method: str = "",
                 layer_ids=None):
        phy2log = np.asarray(phy2log)
        if phy2log.ndim != 2 or phy2log.dtype.kind not in "iu":
            raise ValueError(f"phy2log must be a 2-D integer array [num_layers, num_slots], "
                             f"got dtype {phy2log.dtype} shape {phy2log.shape}")
        self.phy2log = phy2log.astype(np.int64)
        self.topology = Topology(num_nodes=num_nodes, gpus_per_node=gpus_per_node)
        if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        self.num_experts = int(num_experts)
        self.method = str(method)
        self.layer_ids = None
        if layer_ids is not None:
            ids = as_layer_ids(layer_ids, self.phy2log.shape[0])
            check_layer_ids(ids, self.phy2log.shape[0])
            self.layer_ids = known_layer_ids(ids)  # None when any is unknown (-1)
        self.validate()

    # ---- shape --------------------------------------------------------------------------------------------
    num_layers = property(lambda self: self.phy2log.shape[0])
    num_slots = property(lambda self: self.phy2log.shape[1])
    num_gpus = property(lambda self: self.topology.num_gpus)
    num_nodes = property(lambda self: self.topology.num_nodes)
    gpus_per_node = property(lambda self: self.topology.gpus_per_node)
    slots_per_gpu = property(lambda self: self.num_slots // self.num_gpus)

    @property
    def gpu_of_slot(self) -> np.ndarray:
        return np.arange(self.num_slots) // self.slots_per_gpu  # (R,)

    @property
    def node_of_slot(self) -> np.ndarray:
        return self.gpu_of_slot // self.gpus_per_node  # (R,)

    def replica_counts(self) -> np.ndarray:
        """(L, E) number of slots of each expert."""
        offsets = (np.arange(self.num_layers) * self.num_experts)[:, None]
        return np.bincount((self.phy2log + offsets).ravel(),
                           minlength=self.num_layers * self.num_experts).reshape(self.num_layers, -1)

    def hosts(self, level: str = "node") -> np.ndarray:
        """(L, E, nodes or GPUs) bool: does that node/GPU hold a replica of the expert?"""
        owner = self.node_of_slot if level == "node" else self.gpu_of_slot
        size = self.num_nodes if level == "node" else self.num_gpus
        table = np.zeros((self.num_layers, self.num_experts, size), dtype=bool)
        layers = np.repeat(np.arange(self.num_layers), self.num_slots)
        table[layers, self.phy2log.ravel(), np.tile(owner, self.num_layers)] = True
        return table

    # ---- checks -------------------------------------------------------------------------------------------
    def validate(self) -> "Placement":
        """Raise ValueError unless every expert has a slot and every GPU the same slot count."""
        if self.num_slots == 0 or self.num_layers == 0:
            raise ValueError(f"phy2log must have at least one layer and one slot, got shape {self.phy2log.shape}")
        if self.num_slots % self.num_gpus:
            raise ValueError(f"{self.num_slots} slots per layer do not divide over {self.num_gpus} GPUs "
                             f"({self.num_nodes} nodes x {self.gpus_per_node}); slots per GPU must be equal")
        if self.num_slots < self.num_experts:
            raise ValueError(f"{self.num_slots} slots cannot hold {self.num_experts} experts")
        low, high = int(self.phy2log.min()), int(self.phy2log.max())
        if low < 0 or high >= self.num_experts:
            raise ValueError(f"phy2log holds expert ids in [{low}, {high}], expected [0, {self.num_experts - 1}]")
        counts = self.replica_counts()
        if (counts == 0).any():
            layer, expert = np.argwhere(counts == 0)[0]
            raise ValueError(f"expert {expert} of layer {layer} has no slot (unplaced); "
                             f"every expert needs at least one")
        assert (counts.sum(1) == self.num_slots).all()  # replicas counted: every slot holds one expert
        return self

    def check_topology(self, topology: Topology) -> None:
        if (topology.num_nodes, topology.gpus_per_node) != (self.num_nodes, self.gpus_per_node):
            raise ValueError(f"placement is for {self.num_nodes}x{self.gpus_per_node} GPUs, "
                             f"topology is {topology.num_nodes}x{topology.gpus_per_node}")
        if topology.slots_per_gpu is not None and topology.slots_per_gpu != self.slots_per_gpu:
            raise ValueError(f"placement has {self.slots_per_gpu} slots per GPU, topology {topology.slots_per_gpu}")

    def check_trace(self, trace) -> None:
        """Raise ValueError unless ``trace`` (a Trace or FitData) has this placement's layers and experts."""
        if trace.num_experts != self.num_experts or trace.experts.shape[1] != self.num_layers:
            raise ValueError(f"trace has {trace.experts.shape[1]} layers x {trace.num_experts} experts, placement "
                             f"{self.num_layers} x {self.num_experts}")

    # ---- routing: which replica serves a token ------------------------------------------------------------
    def candidate_table(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """For source GPU g and expert e: the nearest replicas ``cand[g, e, :count[g, e]]`` in slot order.

        Returns ``cand`` (G, E, maxcnt) int64 (-1 padded) and ``count`` (G, E) int64.
        """
        slot_of = np.argsort(self.phy2log[layer], kind="stable")  # slots grouped by expert, in slot order
        counts = np.bincount(self.phy2log[layer], minlength=self.num_experts)  # (E,)
        max_count = int(counts.max())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        column = np.arange(max_count)
        valid = column[None, :] < counts[:, None]  # (E, maxcnt)
        slots = np.where(valid, slot_of[np.minimum(starts[:, None] + column, self.num_slots - 1)], -1)
        gpus = np.arange(self.num_gpus)
        slot_gpu = self.gpu_of_slot[slots]  # (E, maxcnt)
        distance = np.where(slot_gpu[None] == gpus[:, None, None], 0,
                            np.where(slot_gpu[None] // self.gpus_per_node
                                     == (gpus // self.gpus_per_node)[:, None, None], 1, 2))  # (G, E, maxcnt)
        distance = np.where(valid[None], distance, 3)
        best = distance == distance.min(axis=2, keepdims=True)
        order = np.argsort(~best, axis=2, kind="stable")  # nearest first, slot order kept
        cand = np.take_along_axis(np.broadcast_to(slots, distance.shape), order, axis=2)
        count = best.sum(axis=2)
        cand = np.where(column[None, None, :] < count[..., None], cand, -1)
        return cand, count

    def route(self, layer: int, experts: np.ndarray, source_gpu: np.ndarray, token_index: np.ndarray):
        """Slot serving each (token, expert): experts (T, k) (-1 = none), source_gpu (T,), token_index (T,).

        Returns (T, k) int64 slots, -1 where the expert is -1.
        """
        cand, count = self.candidate_table(layer)
        experts = np.asarray(experts, dtype=np.int64)
        safe = np.maximum(experts, 0)
        source = np.asarray(source_gpu, dtype=np.int64)[:, None]
        pick = np.asarray(token_index, dtype=np.int64)[:, None] % count[source, safe]
        return np.where(experts >= 0, cand[source, safe, pick], -1)

    # ---- export -------------------------------------------------------------------------------------------
    def to_eplb(self):
        """DeepSeek-EPLB form as torch int64 tensors (``minimoe.placement.export.eplb_tensors``): ``phy2log [L, R]``,
        ``log2phy [L, E, maxcnt]`` (slots of each expert in slot order, -1 padded), ``logcnt [L, E]``, row l as MoE
        layer l. Raises ValueError when the rows are recorded as other model layers (``_as_moe_layers``)."""
        self._as_moe_layers("EPLB")
        return export.eplb_tensors(self)

    def to_dict(self) -> dict:
        data = dict(format=FORMAT, method=self.method, num_experts=self.num_experts,
                    num_nodes=self.num_nodes, gpus_per_node=self.gpus_per_node, phy2log=self.phy2log.tolist())
        if self.layer_ids is not None:
            data["layer_ids"] = list(self.layer_ids)
        return data

    def with_layer_ids(self, layer_ids) -> "Placement":
        """The same placement, its rows named as the model layers ``layer_ids`` (L ints, -1 or None = unknown)."""
        return Placement(self.phy2log, self.num_experts, self.num_nodes, self.gpus_per_node, self.method,
                         layer_ids if layer_ids is None else known_layer_ids(layer_ids))

    def to_sglang(self, moe_layers=None, num_layers: int | None = None) -> dict:
        """SGLang's ``--init-expert-location`` object (``minimoe.placement.export.to_sglang``): rows at the model
        layers ``moe_layers`` (default: the recorded ``layer_ids``) of ``num_layers`` (default: the last + 1)."""
        rows = self._model_rows(moe_layers, "SGLang")
        return export.to_sglang(self, rows, rows[-1] + 1 if num_layers is None else num_layers)

    def to_trtllm(self, moe_layers=None) -> dict:
        """TensorRT-LLM's ``moe_load_balancer`` config (``minimoe.placement.export.to_trtllm``), keyed by the model
        layers ``moe_layers`` (default: the recorded ``layer_ids``)."""
        return export.to_trtllm(self, self._model_rows(moe_layers, "TensorRT-LLM"))

    def to_vllm(self) -> dict:
        """vLLM's ``eplb_initial_mapping`` record (``minimoe.placement.export.to_vllm``), row l as MoE layer l; raises
        ValueError when the rows are recorded as other model layers (``_as_moe_layers``)."""
        self._as_moe_layers("vLLM")
        return export.to_vllm(self)

    def _model_rows(self, moe_layers, engine: str) -> list[int]:
        """The model layer of each row: ``moe_layers`` (which must agree with the recorded ``layer_ids``), else
        ``layer_ids``; ValueError when neither says or they disagree."""
        if moe_layers is None:
            if self.layer_ids is None:
                raise ValueError(f"{engine} needs the model layer index of each MoE layer, and this placement does not "
                                 "record them: pass moe_layers")
            return list(self.layer_ids)
        moe_layers = [int(i) for i in moe_layers]
        if self.layer_ids is not None and moe_layers != self.layer_ids:
            raise ValueError(f"moe_layers {layer_list(moe_layers)} disagrees with the model layers this placement "
                             f"records, {layer_list(self.layer_ids)}")
        return moe_layers

    def _as_moe_layers(self, engine: str) -> None:
        """vLLM and EPLB take row l as the model's MoE layer l: refuse rows recorded as other model layers (a log
        of some layers), which only the model's config can number (``minimoe.placement.export.write``)."""
        if self.layer_ids is not None and self.layer_ids != list(range(self.num_layers)):
            raise ValueError(f"{engine} numbers the model's MoE layers 0..M-1, and this placement's rows are model "
                             f"layers {layer_list(self.layer_ids)}: write it with minimoe export --config "
                             "MODEL/config.json (minimoe.placement.export.write with the config's layers)")

    def save(self, path) -> None:
        with open(path, "w") as file:
            json.dump(self.to_dict(), file)

    @classmethod
    def from_dict(cls, data) -> "Placement":
        """The inverse of ``to_dict``; ValueError for anything else (a field of the wrong type named first)."""
        _check_fields(data)
        keys = {"format", "method", "num_experts", "num_nodes", "gpus_per_node", "phy2log"}
        if not isinstance(data, dict) or set(data) - {"layer_ids"} != keys or data["format"] != FORMAT:
            raise ValueError(f"expected a minimoe.placement.methods/1 object with keys {sorted(keys)} (and "
                             "optionally layer_ids)")
        table = np.asarray(data["phy2log"])
        if table.dtype.kind not in "iu":
            raise ValueError("phy2log must be a 2-D list of ints")
        return cls(table, data["num_experts"], data["num_nodes"], data["gpus_per_node"], data["method"],
                   data.get("layer_ids"))

    @classmethod
    def load(cls, path) -> "Placement":
        """A placement file (``save``), or the placement inside a deployment file that ``minimoe report`` wrote
        (``minimoe.placement.deployment``); ValueError naming the file and the field for anything else."""
        where = f"placement file {os.fspath(path)}"
        text = read_text(path, "a placement file (JSON) from minimoe report, or a load trace .npz")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error})") from None
        except RecursionError:
            data = parse_json(text, where)  # raises its one line: nested more deeply than Python's recursion limit
        if isinstance(data, dict) and data.get("format") == "minimoe.deployment/1":
            data, where = data.get("placement"), f"{where}: placement"
        try:
            return cls.from_dict(data)
        except _FieldError as error:
            raise ValueError(f"{where}: {error}") from None
        except ValueError as error:
            raise ValueError(f"{where}: {error} (or a minimoe.deployment/1 file from minimoe report)") from None

    def __eq__(self, other) -> bool:
        return (isinstance(other, Placement) and self.to_dict() == other.to_dict())

    def __repr__(self) -> str:
        return (f"Placement(method={self.method!r}, layers={self.num_layers}, experts={self.num_experts}, "
                f"slots={self.num_slots}, gpus={self.num_nodes}x{self.gpus_per_node})")


class _FieldError(ValueError):
    """A placement object's field of the wrong type (``_check_fields``)."""


def _check_fields(data) -> None:
    """Refuse a placement object whose fields have the wrong types (a hand-edited file), naming the field;
    ``Placement.from_dict`` then checks the keys and the table itself."""
    if not isinstance(data, dict):
        return
    for key in ("num_experts", "num_nodes", "gpus_per_node"):
        value = data.get(key)
        if key in data and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _FieldError(f"{key} must be a whole number >= 1, got {value!r}")
    if "method" in data and not isinstance(data["method"], str):
        raise _FieldError(f"method must be a str, got {data['method']!r}")
    ids = data.get("layer_ids")
    if "layer_ids" in data and not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                  and i >= 0 for i in ids)):
        raise _FieldError(f"layer_ids must be a list of model layer indices (ints >= 0), one per MoE layer, got "
                          f"{str(ids)[:80]}")
    table = data.get("phy2log")
    rows = table if isinstance(table, list) else [None]
    if "phy2log" in data and not (rows and all(isinstance(row, list) and len(row) == len(rows[0]) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in row) for row in rows)):
        raise _FieldError("phy2log must be a list of equally long lists of expert ids (ints), one per MoE layer")
