"""From a node partition to slots: replicas in the spare slots, then experts onto the GPUs of each node.

Steps 3 and 4 of the locality placement (``minimoe.placement.locality`` explains the objective). The node a
(token, expert) pair is served on follows ``Placement.route`` exactly at node granularity: the token's
own node if it holds a replica, else the replicas in slot order (node order) picked by
``token_index % count``. ``copies[e, n]`` counts the slots of expert ``e`` on node ``n``; ``served[e, n]``
is the number of fitting pairs node ``n`` computes for ``e``.
"""
from __future__ import annotations

import numpy as np

from minimoe.placement.rows import row_count, row_or


class _Routing:
    """Node that serves every fitting pair under ``copies``, with incremental updates per expert."""

    def __init__(self, graph, copies, token_index):
        self.graph, self.copies = graph, copies
        self.token_index = np.asarray(token_index, dtype=np.int64)
        rows, cols = np.nonzero(graph.valid)  # pair p sits at experts[rows[p], cols[p]] (same order as pairs)
        self.rows, self.cols = rows, cols
        keys = graph.pair_expert.astype(np.int16) if graph.num_experts < 2 ** 15 else graph.pair_expert
        order = np.argsort(keys, kind="stable")  # (stable sorts of 16-bit keys are radix sorts: several times faster)
        bounds = np.searchsorted(graph.pair_expert[order], np.arange(graph.num_experts + 1))
        self.pairs_of = [order[bounds[e]:bounds[e + 1]] for e in range(graph.num_experts)]
        assert (copies.sum(axis=1) == 1).all(), "routing starts from one copy per expert"
        self.nodes = np.broadcast_to(graph.pin[:, None], graph.valid.shape).copy()  # invalid -> own node
        self.nodes[rows, cols] = np.argmax(copies, axis=1)[graph.pair_expert]  # the only copy serves all

    def route(self, expert, copies_row):
        pairs = self.pairs_of[expert]
        pin = self.graph.pin[self.rows[pairs]]
        replica_nodes = np.repeat(np.arange(len(copies_row)), copies_row)  # slot order = node order
        remote = replica_nodes[self.token_index[self.rows[pairs]] % len(replica_nodes)]
        return np.where(copies_row[pin] > 0, pin, remote)

    def remote_nodes(self, rows, nodes):
        """Distinct nodes other than the token's own, per row of ``nodes`` (n, k) (node ids < 63)."""
        bits = row_or(np.left_shift(np.int64(1), nodes))
        return _popcount(bits & ~np.left_shift(np.int64(1), self.graph.pin[rows]))

    def try_copy(self, expert, node):
        """(traffic saved, new node loads delta (N,), new nodes of the expert's pairs) for one more copy."""
        pairs = self.pairs_of[expert]
        rows, cols = self.rows[pairs], self.cols[pairs]
        row = self.copies[expert].copy()
        row[node] += 1
        new = self.route(expert, row)
        before = self.nodes[rows]
        after = before.copy()
        after[np.arange(len(rows)), cols] = new
        saved = int(self.remote_nodes(rows, before).sum() - self.remote_nodes(rows, after).sum())
        num_nodes = self.graph.num_nodes
        shift = np.bincount(new, minlength=num_nodes) - np.bincount(before[np.arange(len(rows)), cols],
                                                                      minlength=num_nodes)
        return saved, shift, new

    def commit(self, expert, node, new):
        self.copies[expert, node] += 1
        pairs = self.pairs_of[expert]
        self.nodes[self.rows[pairs], self.cols[pairs]] = new

    def lone_saving(self):
        """(E, N) rough saving of a copy: pairs of tokens of node n whose serving node serves nothing else."""
        nodes, graph = self.nodes, self.graph
        same = np.stack([row_count(nodes == nodes[:, [j]]) for j in range(nodes.shape[1])], axis=1)  # (T, k)
        lone = (same == 1) & (nodes != graph.pin[:, None]) & graph.valid
        return np.bincount(graph.pair_expert * graph.num_nodes + graph.pin[graph.pair_token],
                           weights=lone[graph.valid], minlength=graph.num_experts * graph.num_nodes
                           ).reshape(graph.num_experts, graph.num_nodes)

    def served(self):
        graph = self.graph
        return np.bincount(graph.pair_expert * graph.num_nodes + self.nodes[graph.valid],
                           minlength=graph.num_experts * graph.num_nodes).reshape(graph.num_experts, -1)


_BYTE_BITS = np.array([bin(value).count("1") for value in range(256)], dtype=np.int64)


def _popcount(values):
    """Set bits of each non-negative int64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values).astype(np.int64)
    return _BYTE_BITS[values.astype(np.uint64).view(np.uint8).reshape(len(values), 8)].sum(axis=1)


def _served_uniform(copies, load):
    """Expected pairs served per (expert, node) when sources are uniform over nodes."""
    num_nodes = copies.shape[1]
    present = copies > 0
    share = copies / copies.sum(1, keepdims=True)
    remote_fraction = (~present).sum(1, keepdims=True) / num_nodes
    return load[:, None] * (present / num_nodes + remote_fraction * share)


def fill_spares(graph, home, slots_per_node, cap, token_index, gpu_shape, gpu_cap, locality_replicas=True,
                candidates=8):
    """copies (E, N) with every node's slots filled, and served (E, N) float.

    gpu_shape = (gpus_per_node, slots_per_gpu); gpu_cap: the GPU load the packing should stay under.
    Each node first reserves the spare slots its GPUs need to meet ``gpu_cap`` (``_reserve``)."""
    num_experts, num_nodes = graph.num_experts, graph.num_nodes
    copies = np.zeros((num_experts, num_nodes), dtype=np.int64)
    copies[np.arange(num_experts), home] = 1
    free = slots_per_node - copies.sum(axis=0)  # (N,)
    routing = _Routing(graph, copies, token_index) if graph.pin is not None else None
    if routing is not None and locality_replicas and free.sum():
        served = routing.served()
        reserve = np.array([_reserve(served[:, n], copies[:, n], free[n], *gpu_shape, gpu_cap)
                            for n in range(num_nodes)])
        node_load = np.bincount(routing.nodes[graph.valid], minlength=num_nodes).astype(float)
        stale = 0
        saving = routing.lone_saving()
        while (free > reserve).any():
            if stale >= 8:
                saving, stale = routing.lone_saving(), 0
            score = np.where((copies == 0) & (free > reserve)[None, :], saving, 0.0)
            order = np.argsort(-score, axis=None, kind="stable")[:candidates]
            best = None
            for index in order:
                expert, node = divmod(int(index), num_nodes)
                if score[expert, node] <= 0:
                    break
                saved, shift, new = routing.try_copy(expert, node)
                new_load = node_load + shift
                if saved <= 0 or (new_load.max() > cap and new_load.max() > node_load.max()):
                    continue
                if best is None or saved > best[0]:
                    best = (saved, expert, node, shift, new)
            if best is None:
                if stale == 0:
                    break
                stale = 8  # refresh the rough savings once before giving up
                continue
            _, expert, node, shift, new = best
            routing.commit(expert, node, new)
            node_load += shift
            free[node] -= 1
            saving[expert] = 0.0  # its savings changed; refreshed later
            stale += 1
    for node in np.repeat(np.arange(num_nodes), free):  # balance: hottest load per replica on the node
        served = routing.served() if routing is not None else _served_uniform(copies, graph.load)
        per_copy = np.where(copies[:, node] > 0, served[:, node] / np.maximum(copies[:, node], 1), -1.0)
        if per_copy.max() < 0:  # the node holds nothing yet: copy the globally hottest per replica
            per_copy = graph.load / copies.sum(axis=1)
        expert = int(np.argmax(per_copy))
        if routing is not None:
            routing.commit(expert, node, routing.try_copy(expert, node)[2])
        else:
            copies[expert, node] += 1
    served = routing.served() if routing is not None else _served_uniform(copies, graph.load)
    return copies, served.astype(float)


def _lpt_peak(loads, num_bins, per_bin):
    """Largest bin load of longest-processing-time-first packing with at most ``per_bin`` items a bin."""
    bins, counts = np.zeros(num_bins), np.zeros(num_bins, dtype=np.int64)
    for load in np.sort(loads)[::-1]:
        choice = int(np.argmin(np.where(counts < per_bin, bins, np.inf)))
        bins[choice] += load
        counts[choice] += 1
    return bins.max()


def _reserve(served, copies, free, gpus_per_node, slots_per_gpu, gpu_cap):
    """Spare slots a node must keep for copies of its hottest experts so its GPUs can stay <= gpu_cap."""
    copies = copies.copy()
    for reserved in range(free + 1):
        held = np.flatnonzero(copies)
        per_copy = np.repeat(served[held] / copies[held], copies[held])
        if reserved == free or _lpt_peak(per_copy, gpus_per_node, slots_per_gpu) <= gpu_cap:
            return reserved
        copies[int(np.argmax(np.where(copies > 0, served / np.maximum(copies, 1), -1.0)))] += 1
    return free


def pack_gpus(copies, served, topology, slots_per_gpu, demand_gpu=None, gpu_cap=np.inf):
    """phy2log (R,) from node contents: balanced, affinity-aware packing of each node's slots onto its GPUs."""
    per_node = topology.gpus_per_node
    phy2log = []
    for node in range(topology.num_nodes):
        experts = np.repeat(np.arange(copies.shape[0]), copies[:, node])
        loads = served[experts, node] / copies[experts, node]
        order = np.lexsort((experts, -loads))
        experts, loads = experts[order], loads[order]
        gpu_load, gpu_slots = np.zeros(per_node), [[] for _ in range(per_node)]
        cap = gpu_cap
        gpus = np.arange(node * per_node, (node + 1) * per_node)
        for expert, load in zip(experts, loads):
            room = np.array([len(s) < slots_per_gpu for s in gpu_slots])
            fresh = room & np.array([expert not in s for s in gpu_slots])
            allowed = fresh if fresh.any() else room
            under = allowed & (gpu_load + load <= cap)
            if demand_gpu is not None and under.any():
                affinity = np.where(under, demand_gpu[expert, gpus], -1.0)
                best = np.flatnonzero(affinity == affinity.max())
                choice = best[np.argmin(gpu_load[best])]
            else:
                choice = int(np.argmin(np.where(allowed, gpu_load, np.inf)))
            gpu_slots[choice].append(int(expert))
            gpu_load[choice] += load
        _balance_swaps(gpu_slots, gpu_load, dict(zip(experts.tolist(), loads.tolist())))
        phy2log.extend(sorted(s) for s in gpu_slots)
    return np.concatenate(phy2log).astype(np.int64)


def _balance_swaps(gpu_slots, gpu_load, load_of, max_steps=64):
    """Swap one slot between the busiest and the idlest GPU while that lowers the busiest."""
    for _ in range(max_steps):
        busy, idle = int(np.argmax(gpu_load)), int(np.argmin(gpu_load))
        if busy == idle:
            return
        best = None
        for i, a in enumerate(gpu_slots[busy]):
            for j, b in enumerate(gpu_slots[idle]):
                moved = load_of[a] - load_of[b]
                if moved <= 0 or (a != b and (a in gpu_slots[idle] or b in gpu_slots[busy])):
                    continue
                peak = max(gpu_load[busy] - moved, gpu_load[idle] + moved)
                if peak < gpu_load[busy] - 1e-9 and (best is None or peak < best[0]):
                    best = (peak, i, j, moved)
        if best is None:
            return
        _, i, j, moved = best
        gpu_slots[busy][i], gpu_slots[idle][j] = gpu_slots[idle][j], gpu_slots[busy][i]
        gpu_load[busy] -= moved
        gpu_load[idle] += moved
