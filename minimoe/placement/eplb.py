"""DeepSeek's expert-parallel load balancer (EPLB), rebuilt in numpy from its published description.

EPLB (DeepSeek-V3 report; github.com/deepseek-ai/EPLB README) balances *load only*: given the
estimated load ``weight[l, e]`` of every logical expert in every layer, it chooses ``R`` physical slots
(``R - E`` of them redundant copies of heavy experts) and packs them onto GPUs so that every GPU gets
the same number of slots and about the same load. It ignores which experts fire together.

Hierarchical policy (used when ``num_nodes`` divides ``num_groups``; DeepSeek-V3 routes each token to a
limited number of expert *groups*, so keeping a group on one node bounds inter-node traffic):

1. Pack the ``num_groups`` expert groups onto nodes, ``num_groups / num_nodes`` groups per node,
   heaviest group first, each into the lightest node that still has room (greedy "balanced packing").
2. Inside each node, grow its ``E / num_nodes`` experts to ``R / num_nodes`` slots: repeatedly give
   one more replica to the expert with the largest load per replica, ``weight / count``.
3. Pack each node's slots (each carrying ``weight / count``) onto the node's GPUs with the same
   balanced packing, ``R / num_gpus`` slots per GPU.

Global policy (otherwise): the same with a single group and a single node.

Outputs, as in DeepSeek's ``rebalance_experts``: ``phy2log[l, s]`` the logical expert in physical slot
``s`` (slot ``s`` lives on GPU ``s // (R / num_gpus)``), ``log2phy[l, e, j]`` the slots of expert ``e``
(padded with -1 to ``maxcnt = R - E + 1`` columns, listed by replica rank), ``logcnt[l, e]`` its replica
count. Ties are broken deterministically: sorting is stable (equal loads keep their index order) and
the lightest pack/heaviest expert is the first one in index order. This reproduces the README example.
"""
from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` weighted items per row into ``num_packs`` packs of exactly ``n / num_packs`` items.

    weight: (X, n). Returns ``pack_index`` (X, n) and ``rank_in_pack`` (X, n) (position inside the pack).
    Greedy: heaviest item first, into the lightest pack that is not full.
    """
    num_rows, num_items = weight.shape
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:  # nothing to decide: item i is pack i (the reference's convention)
        return np.tile(np.arange(num_items), (num_rows, 1)), np.zeros((num_rows, num_items), dtype=np.int64)
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    for row in range(num_rows):
        pack_load = np.zeros(num_packs)
        pack_count = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[row], kind="stable"):
            open_load = np.where(pack_count < items_per_pack, pack_load, np.inf)
            pack = int(np.argmin(open_load))  # first lightest open pack
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_count[pack]
            pack_load[pack] += weight[row, item]
            pack_count[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow ``n`` logical experts per row to ``num_slots`` slots, one replica at a time.

    weight: (X, n). Returns ``slot2log`` (X, num_slots), ``replica_rank`` (X, num_slots) (0 for the
    original, 1 for the first copy, ...) and ``count`` (X, n). Each new slot copies the expert with
    the largest load per replica.
    """
    num_rows, num_log = weight.shape
    slot2log = np.tile(np.arange(num_slots), (num_rows, 1))
    replica_rank = np.zeros((num_rows, num_slots), dtype=np.int64)
    count = np.ones((num_rows, num_log), dtype=np.int64)
    rows = np.arange(num_rows)
    for slot in range(num_log, num_slots):
        hottest = np.argmax(weight / count, axis=1)  # (X,) first maximum per row
        slot2log[:, slot] = hottest
        replica_rank[:, slot] = count[rows, hottest]
        count[rows, hottest] += 1
    return slot2log, replica_rank, count


def _inverse(permutation: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a batch of permutations (X, n)."""
    inverse = np.empty_like(permutation)
    np.put_along_axis(inverse, permutation, np.arange(permutation.shape[1])[None, :], axis=1)
    return inverse


def _hierarchical(weight: np.ndarray, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int):
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_slots // num_gpus
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_slots // num_nodes

    # 1. groups -> nodes. "node-major" expert order: node 0's groups first, each group's experts in order
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(-1)  # (L, groups)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    first_position = (group_node * groups_per_node + group_rank) * group_size  # (L, groups)
    log2nm = (first_position[:, :, None] + np.arange(group_size)).reshape(num_layers, num_experts)
    nm2log = _inverse(log2nm)

    # 2. replicas inside each node (rows = (layer, node) pairs)
    load_nm = np.take_along_axis(weight, nm2log, axis=1).reshape(num_layers * num_nodes, experts_per_node)
    slot2nm, slot_rank, count_nm = replicate_experts(load_nm, slots_per_node)

    # 3. slots -> GPUs of the node; each slot carries its expert's load split evenly over replicas
    slot_load = np.take_along_axis(load_nm / count_nm, slot2nm, axis=1)
    gpu, rank_on_gpu = balanced_packing(slot_load, num_gpus // num_nodes)
    final2slot = _inverse(gpu * slots_per_gpu + rank_on_gpu)  # final slot order within the node
    final2nm = np.take_along_axis(slot2nm, final2slot, axis=1).reshape(num_layers, num_nodes, slots_per_node)
    final2nm = (final2nm + (np.arange(num_nodes) * experts_per_node)[None, :, None]).reshape(num_layers, num_slots)
    phy2log = np.take_along_axis(nm2log, final2nm, axis=1)
    phy_rank = np.take_along_axis(slot_rank, final2slot, axis=1).reshape(num_layers, num_slots)
    logcnt = np.take_along_axis(count_nm.reshape(num_layers, num_experts), log2nm, axis=1)
    return phy2log, phy_rank, logcnt


def check_eplb_arguments(num_layers_experts, num_replicas, num_groups, num_nodes, num_gpus) -> None:
    """Raise ValueError naming the first argument that makes EPLB infeasible."""
    num_layers, num_experts = num_layers_experts
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide num_experts={num_experts}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_nodes={num_nodes} does not divide num_gpus={num_gpus}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas={num_replicas} < num_experts={num_experts}: every expert needs a slot")


def eplb_numpy(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """numpy version of :func:`eplb`; returns int64 arrays."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2 or weight.shape[1] == 0:
        raise ValueError(f"weight must be 2-D [num_layers, num_experts], got shape {weight.shape}")
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("weight must be finite and non-negative")
    check_eplb_arguments(weight.shape, num_replicas, num_groups, num_nodes, num_gpus)
    num_layers, num_experts = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phy_rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:  # global policy: one group, one node
        phy2log, phy_rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_count = num_replicas - num_experts + 1
    log2phy = np.full((num_layers, num_experts * max_count), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * max_count + phy_rank,
                      np.tile(np.arange(num_replicas), (num_layers, 1)), axis=1)
    return phy2log.astype(np.int64), log2phy.reshape(num_layers, num_experts, max_count), logcnt.astype(np.int64)


def eplb(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """DeepSeek's ``rebalance_experts``: weight [L, E] (torch tensor or array) -> torch int64 tensors
    ``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]`` (-1 padded), ``logcnt [L, E]``."""
    import torch

    if isinstance(weight, torch.Tensor):
        weight = weight.detach().float().cpu().numpy()
    arrays = eplb_numpy(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
