"""Locality-aware expert placement: keep each token's experts on as few nodes as possible, near the token.

Objective (per MoE layer, on a fitting trace). Token ``t`` starts on node ``s(t)`` (the node its request
was grouped onto) and must reach the nodes serving its ``k`` experts. A de-duplicating (hierarchical)
all-to-all moves it once per distinct remote node, so the inter-node volume is

    cost = sum_t | { node serving e : e in experts(t) } \\ { s(t) } |                        (1)

With sources unknown, ``s(t)`` is uniform over nodes and (1) is, in expectation, ``(1 - 1/N)`` times the
number of distinct nodes a token touches: minimising (1) is partitioning a hypergraph (experts =
vertices, tokens = hyperedges) with the connectivity metric; known sources add one pinned vertex per
hyperedge. Constraints: every node has ``R / N`` slots, every GPU ``R / G``, and the load (token-expert
pairs) of every node and GPU stays ``<= (1 + epsilon) * mean`` whenever that is achievable.

Algorithm (all counts vectorised with numpy; exact for the fitting tokens):

1. **Initial partition** of the experts onto nodes, one home each, ``R / N`` at most per node. Known
   sources: experts in decreasing regret order (best minus second-best demand ``d[e, n]``, the pairs of
   ``e`` from tokens of node ``n``) each take their best node with room under the cap. Unknown: graph
   growing on the co-activation matrix ``A[e, f]`` (tokens choosing both): every node is seeded with a
   heavy expert, then the least-loaded node repeatedly takes the free expert most co-activated with it.
   A repair pass then moves load off any node still over the cap, cheapest moves first.
2. **Refinement** (Kernighan–Lin / Fiduccia–Mattheyses style). With ``cnt[t, n]`` = experts of ``t`` on
   ``n`` and ``c[t, n] = 0`` if ``n = s(t)`` else 1, moving ``e`` from ``a`` to ``b`` saves
   ``sum_{t ∋ e} [cnt[t,a] = 1] c[t,a] - [cnt[t,b] = 0] c[t,b]``; swapping ``e`` (on ``a``) with ``f``
   (on ``b``) saves the two move gains minus the tokens holding both (for which nothing changes). All
   move and swap gains are computed at once; the best non-overlapping feasible ones are applied, and a
   round whose true cost did not drop is undone and retried with only its best operation (whose gain
   is exact). Stops when no feasible operation saves anything.
3. **Replicas** fill the ``R - E`` spare slots. Each node first reserves the spares its GPUs need to
   stay under the GPU cap (copies of its hottest experts, checked by LPT packing). Known sources, with
   the other spares: a copy of ``e`` on node ``n`` makes ``e``
   local to the tokens of ``n``; candidates are ranked by that saving and the best few are evaluated
   exactly under the routing rule of ``Placement.route`` (nearest replica, ties by token index), also
   counting tokens of third nodes that now split between replicas; the best is kept while it saves
   traffic and respects the node load cap. Remaining spares (and all of them when sources are unknown)
   go, like EPLB, to the expert with the largest load per replica on the node that has the free slot.
4. **GPUs inside each node**: slots in decreasing load order, each to the GPU with room and load under
   the cap whose own requests use that expert most (known sources), else the least loaded one; then
   swaps between the busiest and idlest GPU of a node while they lower its maximum.

This is minimoe's own design, in the spirit of Occult [luo2025occult] and ExFlow [yao2024exflow] (experts used
together kept together) with Kernighan-Lin [kernighan1970graph] and Fiduccia-Mattheyses [fiduccia1982linear]
refinement; the expert-activation paper [bambhaniya2026expert] does not publish its algorithm (keys of
book/references.bib).
"""
from __future__ import annotations

import numpy as np

from minimoe.placement.locality_slots import fill_spares, pack_gpus
from minimoe.placement.topology import Topology


def place_locality(trace, topology: Topology, num_slots: int, sources=None, tokens=None, epsilon: float = 0.1,
                   rounds: int = 50, locality_replicas: bool = True, max_fit_tokens: int | None = None):
    """phy2log (L, num_slots) int64 for every layer of ``trace`` (see the module docstring).

    sources: per-request GPU rank (known sources) or None. tokens: bool (N,) mask of fitting tokens.
    epsilon: node/GPU load <= (1 + epsilon) * mean. rounds: refinement rounds per layer.
    locality_replicas: False uses spare slots for balance only. max_fit_tokens: evenly subsample the
    fitting tokens to at most this many (speed).
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 10:
        raise ValueError(f"epsilon must be a number in [0, 10), got {epsilon!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    rows = np.arange(trace.experts.shape[0]) if tokens is None else np.flatnonzero(tokens)
    if max_fit_tokens is not None and len(rows) > max_fit_tokens:
        rows = rows[np.linspace(0, len(rows) - 1, max_fit_tokens).astype(np.int64)]
    source_gpu = None
    if sources is not None:
        num_requests = int(trace.request.max()) + 1 if trace.request.size else 0
        source_gpu = topology.request_ranks(num_requests, sources)[trace.request[rows]]
    phy2log = np.empty((trace.experts.shape[1], num_slots), dtype=np.int64)
    for layer in range(trace.experts.shape[1]):
        experts = trace.experts[rows, layer].astype(np.int64)
        phy2log[layer] = place_layer(experts, trace.num_experts, topology, num_slots, source_gpu, rows,
                                     epsilon, rounds, locality_replicas)
    return phy2log


def place_layer(experts, num_experts, topology, num_slots, source_gpu, token_index, epsilon=0.1, rounds=50,
                locality_replicas=True):
    """One layer: experts (T, k) (-1 = none), source_gpu (T,) or None, token_index (T,) -> phy2log (R,)."""
    num_nodes = topology.num_nodes
    keep = (experts >= 0).any(axis=1)
    experts, token_index = experts[keep], np.asarray(token_index)[keep]
    source_gpu = None if source_gpu is None else np.asarray(source_gpu)[keep]
    pin = None if source_gpu is None else source_gpu // topology.gpus_per_node
    graph = _Hypergraph(experts, num_experts, num_nodes, pin)
    slots_per_node = num_slots // num_nodes
    cap = (1 + epsilon) * graph.load.sum() / num_nodes
    if num_nodes == 1:
        home = np.zeros(num_experts, dtype=np.int64)
    else:
        home = _initial_partition(graph, slots_per_node, cap)
        if len(graph.pair_expert):  # no fitting token: nothing to refine
            home = _refine(graph, home, slots_per_node, cap, rounds)
    gpu_cap = (1 + epsilon) * graph.load.sum() / topology.num_gpus
    gpu_shape = (topology.gpus_per_node, num_slots // topology.num_gpus)
    copies, served = fill_spares(graph, home, slots_per_node, cap, token_index, gpu_shape, gpu_cap,
                                 locality_replicas)
    demand_gpu = None
    if source_gpu is not None:
        valid = experts >= 0
        gpus = np.broadcast_to(source_gpu[:, None], experts.shape)[valid]
        demand_gpu = np.bincount(experts[valid] * topology.num_gpus + gpus,
                                 minlength=num_experts * topology.num_gpus).reshape(num_experts, -1)
    return pack_gpus(copies, served, topology, num_slots // topology.num_gpus, demand_gpu, gpu_cap)


class _Hypergraph:
    """The fitting tokens of one layer as pairs (token, expert) plus the within-token expert pairs."""

    def __init__(self, experts, num_experts, num_nodes, pin):
        self.experts, self.num_experts, self.num_nodes, self.pin = experts, num_experts, num_nodes, pin
        num_tokens, top_k = experts.shape
        valid = experts >= 0
        self.valid = valid
        self.pair_token = np.broadcast_to(np.arange(num_tokens)[:, None], experts.shape)[valid]  # (P,)
        self.pair_expert = experts[valid]  # (P,)
        self.load = np.bincount(self.pair_expert, minlength=num_experts).astype(float)  # (E,)
        first, second = np.nonzero(~np.eye(top_k, dtype=bool))  # ordered position pairs i != j
        both = valid[:, first] & valid[:, second]  # (T, k(k-1))
        self.co_key = (experts[:, first] * num_experts + experts[:, second])[both]
        self.co_position = (np.arange(num_tokens)[:, None] * top_k + first[None, :])[both]  # flat (t, i)
        self.pair_position = np.flatnonzero(valid.ravel())  # flat (t, i) of every pair
        # c[t, n]: 0 for the token's own node (traffic there is free), 1 elsewhere
        self.charge = np.ones((num_tokens, num_nodes))
        if pin is not None:
            self.charge[np.arange(num_tokens), pin] = 0.0

    def counts(self, home):
        """cnt (T, N): experts of each token on each node."""
        num_tokens = self.experts.shape[0]
        return np.bincount(self.pair_token * self.num_nodes + home[self.pair_expert],
                           minlength=num_tokens * self.num_nodes).reshape(num_tokens, self.num_nodes)

    def cost(self, home) -> float:
        return float(((self.counts(home) > 0) * self.charge).sum())

    def coactivation(self) -> np.ndarray:
        return np.bincount(self.co_key, minlength=self.num_experts ** 2).reshape(self.num_experts, -1)

    def gains(self, home):
        """move_gain (E, N) and swap_gain (E, E), exact for a single operation."""
        cnt = self.counts(home)
        flat_cnt, flat_charge = cnt.ravel(), self.charge.ravel()
        where = self.pair_token * self.num_nodes + home[self.pair_expert]  # flat (t, node of e)
        leave = (flat_cnt[where] == 1) * flat_charge[where]  # (P,)
        join = (cnt == 0) * self.charge  # (T, N)
        move = np.stack([np.bincount(self.pair_expert, weights=leave - join[:, n][self.pair_token],
                                     minlength=self.num_experts) for n in range(self.num_nodes)], axis=1)
        leave_at = np.zeros(self.valid.size)
        leave_at[self.pair_position] = leave
        shared = np.bincount(self.co_key, weights=leave_at[self.co_position],
                             minlength=self.num_experts ** 2).reshape(self.num_experts, -1)
        swap = move[:, home].T + move[:, home] - shared - shared.T  # [e, f]: e -> home[f], f -> home[e]
        swap[home[:, None] == home[None, :]] = -np.inf
        move[np.arange(self.num_experts), home] = -np.inf
        return move, swap


def _initial_partition(graph, slots_per_node, cap):
    num_experts, num_nodes, load = graph.num_experts, graph.num_nodes, graph.load
    home = np.full(num_experts, -1, dtype=np.int64)
    node_load, node_count = np.zeros(num_nodes), np.zeros(num_nodes, dtype=np.int64)
    target = np.full(num_nodes, num_experts // num_nodes)
    target[: num_experts % num_nodes] += 1
    target = np.minimum(target, slots_per_node)

    def fits(expert, node):
        return node_count[node] < target[node] and node_load[node] + load[expert] <= cap

    def assign(expert, node):
        home[expert] = node
        node_load[node] += load[expert]
        node_count[node] += 1

    if graph.pin is not None:  # regret greedy on demand
        demand = np.bincount(graph.pair_expert * num_nodes + graph.pin[graph.pair_token],
                             minlength=num_experts * num_nodes).reshape(num_experts, num_nodes).astype(float)
        ordered = np.sort(demand, axis=1)
        regret = ordered[:, -1] - (ordered[:, -2] if num_nodes > 1 else 0)
        for expert in np.lexsort((-load, -regret)):
            choices = [n for n in np.argsort(-demand[expert], kind="stable") if fits(expert, n)]
            assign(expert, choices[0] if choices else _lightest_open(node_load, node_count, target))
        return home
    affinity = graph.coactivation().astype(float)  # simultaneous graph growing, lightest node picks next
    score = np.zeros((num_nodes, num_experts))
    while (home < 0).any():
        node = _lightest_open(node_load, node_count, target)
        free = home < 0
        if node_count[node] == 0:  # seed: the heaviest free expert
            expert = int(np.argmax(np.where(free, load, -1.0)))
        else:
            ok = free & (node_load[node] + load <= cap)
            expert = int(np.argmax(np.where(ok, score[node], -1.0))) if ok.any() else \
                int(np.argmax(np.where(free, -load, -np.inf)))
        assign(expert, node)
        score[node] += affinity[expert]
    return home


def _lightest_open(node_load, node_count, target):
    return int(np.argmin(np.where(node_count < target, node_load, np.inf)))


def _refine(graph, home, slots_per_node, cap, rounds, tolerance=1e-4):
    """Batched KL/FM improvement of ``home`` under slot and load caps (see module docstring, step 2).
    Stops after ``rounds`` rounds or once a round saves less than ``tolerance`` of the cost."""
    load, num_experts = graph.load, graph.num_experts
    home = _repair(graph, home, slots_per_node, cap)
    cost = graph.cost(home)
    batch = max(1, num_experts // 8)
    for round_index in range(rounds):
        if round_index and previous - cost < tolerance * cost:
            break
        previous = cost
        move, swap = graph.gains(home)
        node_load = np.bincount(home, weights=load, minlength=graph.num_nodes)
        node_count = np.bincount(home, minlength=graph.num_nodes)
        candidates = _candidates(move, swap, 4 * num_experts)
        if not candidates:
            break
        trial = _apply(candidates, home, node_load, node_count, load, slots_per_node, cap, batch)
        if trial is None:
            break
        new_cost = graph.cost(trial)
        if new_cost < cost - 1e-9:
            home, cost = trial, new_cost
            continue
        single = _apply(candidates, home, node_load, node_count, load, slots_per_node, cap, 1)
        if single is None or graph.cost(single) >= cost - 1e-9:
            break
        home, cost, batch = single, graph.cost(single), max(1, batch // 2)
    return home


def _candidates(move, swap, limit):
    """Positive-gain operations, best first: (gain, e, f_or_-1, target_node)."""
    ops = []
    flat = swap.ravel()
    positive = np.flatnonzero(flat > 1e-9)
    if positive.size > limit:
        positive = positive[np.argpartition(-flat[positive], limit)[:limit]]
    num_experts = swap.shape[0]
    for index in positive:
        e, f = divmod(int(index), num_experts)
        if e < f:
            ops.append((float(flat[index]), e, f, -1))
    for e, n in np.argwhere(move > 1e-9):
        ops.append((float(move[e, n]), int(e), -1, int(n)))
    ops.sort(key=lambda op: (-op[0], op[1], op[2], op[3]))
    return ops


def _swap_or_move(home, node_load, node_count, e, f, a, b, moved_load) -> None:
    """In place: expert e goes from node a to b and, for a swap (f >= 0), expert f from b to a."""
    home[e] = b
    if f >= 0:
        home[f] = a
    else:
        node_count[a] -= 1
        node_count[b] += 1
    node_load[a] -= moved_load
    node_load[b] += moved_load


def _apply(ops, home, node_load, node_count, load, slots_per_node, cap, limit):
    """Apply up to ``limit`` feasible operations touching distinct experts; None if none applies."""
    home, node_load, node_count = home.copy(), node_load.copy(), node_count.copy()
    touched, applied = set(), 0
    for gain, e, f, target in ops:
        if e in touched or f in touched:
            continue
        a = home[e]
        b = target if f < 0 else home[f]
        delta = load[e] - (0.0 if f < 0 else load[f])  # load moving from a to b
        new_a, new_b = node_load[a] - delta, node_load[b] + delta
        worst = max(new_a, new_b)
        if worst > cap + 1e-9 and worst >= max(node_load[a], node_load[b]):  # only repairs may exceed cap
            continue
        if f < 0 and node_count[b] >= slots_per_node:
            continue
        _swap_or_move(home, node_load, node_count, e, f, a, b, delta)
        touched.update((e, f))
        applied += 1
        if applied >= limit:
            break
    return home if applied else None


def _repair(graph, home, slots_per_node, cap, max_rounds=50):
    """While a node is over the load cap: apply, cheapest first, swaps/moves that lower it and keep the
    receiving node under the cap (gains recomputed between rounds)."""
    load, num_nodes, num_experts = graph.load, graph.num_nodes, graph.num_experts
    home = home.copy()
    for _ in range(max_rounds):
        node_load = np.bincount(home, weights=load, minlength=num_nodes)
        node_count = np.bincount(home, minlength=num_nodes)
        if node_load.max() <= cap + 1e-9:
            break
        move, swap = graph.gains(home)
        over = node_load[home] > cap + 1e-9  # (E,) experts on an overloaded node
        gain = np.concatenate([np.where(over[:, None] & (load[:, None] > load[None, :]), swap, -np.inf).ravel(),
                               np.where(over[:, None], move, -np.inf).ravel()])
        touched, applied = set(), 0
        for index in np.argsort(-gain, kind="stable"):
            if not np.isfinite(gain[index]):
                break
            if index < num_experts ** 2:
                e, f = divmod(int(index), num_experts)
                a, b = home[e], home[f]
                moved = load[e] - load[f]
            else:
                e, b = divmod(int(index) - num_experts ** 2, num_nodes)
                f, a, moved = -1, home[e], load[e]
                if node_count[b] >= slots_per_node:
                    continue
            if e in touched or f in touched or node_load[a] <= cap + 1e-9 or node_load[b] + moved > cap + 1e-9:
                continue
            _swap_or_move(home, node_load, node_count, e, f, a, b, moved)
            touched.update((e, f))
            applied += 1
        if not applied:
            break
    return home
