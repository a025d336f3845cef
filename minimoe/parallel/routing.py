"""Which physical slot serves each (token, expert) pair, and which pairs the capacity keeps — on the device.

**Replica choice.** ``minimoe.placement.Placement.route`` fixes the rule (nearest replica first: same GPU,
then same node, then any; among equally near replicas the one at ``token_index % count``, candidates in slot
order). :class:`RouteTable` precomputes ``Placement.candidate_table`` for one layer as tensors, so routing
a batch is three gathers on the token's device with no host sync:

    count = count_table[src, e]          pick = token_index % count          slot = cand[src, e, pick]

and the slot lives on rank ``slot // slots_per_gpu`` as its local slot ``slot % slots_per_gpu``. Because
traffic accounting (``minimoe.placement.measure``) uses the same rule, the bytes the real exchange moves
equal the bytes it predicts.

**Capacity across ranks.** The single-process MoE layer keeps a (token, expert) pair iff fewer than
C = ceil(T·k/E · capacity_factor) earlier pairs (in token order) chose the same expert, T being all tokens
of the batch (GShard, Lepikhin et al. 2020). With the batch split over ranks in rank order, rank r keeps its
pair iff

    (pairs of expert e on ranks < r) + (earlier pairs of e on rank r) < C,    T = Σ_r T_r,

so every rank all-gathers one vector [T_r, count_r(e) for each e] (E + 1 integers) and the expert-parallel
layer drops exactly the pairs the single-process layer drops, before they travel.
"""
from __future__ import annotations

import numpy as np
import torch

from minimoe.parallel.comm import all_gather_rows


class RouteTable:
    """``Placement.route`` for one layer as tensors on ``device``.

    ``cand`` (G, E, maxcnt) int64 (-1 padded) and ``count`` (G, E) int64 are ``Placement.candidate_table``;
    ``slots_per_gpu`` and ``gpus_per_node`` come from the placement.
    """

    def __init__(self, placement, layer: int, device=None):
        if not 0 <= layer < placement.num_layers:
            raise ValueError(f"layer={layer} is not a layer of the placement (it has {placement.num_layers})")
        cand, count = placement.candidate_table(layer)
        self.cand = torch.as_tensor(cand, dtype=torch.int64, device=device)
        self.count = torch.as_tensor(count, dtype=torch.int64, device=device)
        self.num_gpus, self.num_experts = placement.num_gpus, placement.num_experts
        self.slots_per_gpu, self.gpus_per_node = placement.slots_per_gpu, placement.gpus_per_node
        self.layer = layer
        self.slot_experts = torch.as_tensor(np.asarray(placement.phy2log[layer]), dtype=torch.int64, device=device)

    def to(self, device) -> "RouteTable":
        for name in ("cand", "count", "slot_experts"):
            setattr(self, name, getattr(self, name).to(device))
        self._lookups = {}
        return self

    def slot_lookup(self, rank: int | None = None, node: int | None = None) -> torch.Tensor:
        """(R + 1,) int64 table: global slot s -> its local id on ``rank`` (or s itself when it lives on ``node``),
        -1 otherwise; entry R (reached by s = -1) is -1. Built once per rank / node and device."""
        key = (rank, node)
        lookups = self.__dict__.setdefault("_lookups", {})
        if key not in lookups:
            slots = torch.arange(len(self.slot_experts), device=self.slot_experts.device)
            if rank is not None:
                mine = slots // self.slots_per_gpu == rank
                table = torch.where(mine, slots - rank * self.slots_per_gpu, -1)
            else:
                table = torch.where(slots // (self.slots_per_gpu * self.gpus_per_node) == node, slots, -1)
            lookups[key] = torch.cat([table, table.new_full((1,), -1)])
        return lookups[key]

    def route(self, expert_ids: torch.Tensor, source_rank: int, token_index: torch.Tensor) -> torch.Tensor:
        """Global slot of each pair: expert_ids (T, k) int (-1 = none), token_index (T,) int -> (T, k) int64.

        -1 where the expert id is -1. Equals ``Placement.route(layer, expert_ids, source, token_index)``.
        """
        if not 0 <= source_rank < self.num_gpus:
            raise ValueError(f"source_rank={source_rank} is not a rank of the placement's {self.num_gpus} GPUs")
        experts = expert_ids.to(torch.int64)
        valid = experts >= 0
        safe = experts.clamp(min=0)  # (T, k)
        count = self.count[source_rank][safe]  # (T, k) equally near replicas
        pick = token_index.to(torch.int64).unsqueeze(1) % count  # (T, k)
        slots = self.cand[source_rank][safe, pick]  # (T, k)
        return slots.masked_fill(~valid, -1)

    def rank_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Rank holding each slot (-1 stays -1)."""
        return torch.where(slots >= 0, slots // self.slots_per_gpu, -1)


def capacity_kept(expert_ids: torch.Tensor, num_experts: int, top_k: int, capacity_factor: float,
                  group=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(T, k) bool keep-mask of this rank's pairs under the global capacity, and C as a 0-d float tensor on the
    device (None, None if dropless); nothing is read on the host. ``int(C)`` equals
    ``minimoe.model.moe.expert_capacity`` of the whole batch.

    Collective (when ``capacity_factor > 0``): every rank of ``group`` must call it, in the same order.
    """
    if capacity_factor <= 0:
        return None, None
    flat = expert_ids.reshape(-1).to(torch.int64)  # (S,), pairs in token order
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts[0] = expert_ids.shape[0]
    counts[1:].scatter_add_(0, flat, torch.ones_like(flat))  # (E + 1,) [T_r, count_r(e)...]; no bincount sync
    everyone = all_gather_rows(counts, group, "capacity count all-gather")  # (G, E + 1)
    rank = 0 if not torch.distributed.is_initialized() else torch.distributed.get_rank(group)
    # C = ceil(T·k·factor/E - 1e-9) in float64, operation for operation as expert_capacity computes it on the host
    capacity = (everyone[:, 0].sum().double() * top_k * capacity_factor / num_experts - 1e-9).ceil()
    before = everyone[:rank, 1:].sum(0)  # (E,) pairs of each expert on earlier ranks
    sorted_ids, order = torch.sort(flat, stable=True)  # token order kept inside each expert
    starts = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=flat.device))  # (E,)
    place_sorted = torch.arange(flat.numel(), device=flat.device) - starts[sorted_ids] + before[sorted_ids]
    place = torch.empty_like(place_sorted).scatter_(0, order, place_sorted)  # (S,) global place within expert
    return (place < capacity).view_as(expert_ids), capacity


# ---- global slot ids -> the ids a rank or node uses ------------------------------------------------------
def on_node(slots: torch.Tensor, layout, node: int) -> torch.Tensor:
    """Global slots (int64) on ``node`` kept, the others -1."""
    if hasattr(layout, "slot_lookup"):  # a RouteTable: one gather in a cached table (-1 reads its last entry)
        return torch.take(layout.slot_lookup(node=node), slots)
    per_node = layout.slots_per_gpu * layout.gpus_per_node
    slots = slots.to(torch.int64)
    return torch.where(slots.div(per_node, rounding_mode="floor") == node, slots, -1)


def local_slots(slots: torch.Tensor, layout, rank: int) -> torch.Tensor:
    """Global slot ids (int64) -> this rank's local slot ids (int64), -1 for slots of other ranks."""
    if hasattr(layout, "slot_lookup"):  # a RouteTable: one gather in a cached table (-1 reads its last entry)
        return torch.take(layout.slot_lookup(rank=rank), slots)
    spg = layout.slots_per_gpu
    slots = slots.to(torch.int64)
    return torch.where(slots.div(spg, rounding_mode="floor") == rank, slots - rank * spg, -1)
