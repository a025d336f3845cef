"""Refining a partition of experts onto nodes: batched swap/move rounds, then FM passes that may climb.

All of it works on ``minimoe.placement.hypergraph.Hypergraph`` (cost (1) there), under two constraints: the
experts of a node take at most ``slots_per_node`` slots (``Hypergraph.slot_need`` each) and node load stays
``<= cap`` (where achievable). ``home`` (E,) int64 is the node of every expert; every function returns a new
array and leaves its input alone.

* **Batched rounds** (``refine``, Kernighan–Lin style). Every move and swap gain is computed exactly at once
  (``Hypergraph.gains``); the best non-overlapping feasible positive ones are applied together, and a round
  whose true cost did not drop is undone and retried with only its best operation (whose gain is exact).
  Fast, but it stops at the first local minimum: no single move or swap helps.
* **FM passes** (``fm_pass``; Fiduccia and Mattheyses, "A Linear-Time Heuristic for Improving Network
  Partitions", DAC 1982). Move the expert with the best gain *even when that gain is negative*, lock it,
  repeat; then roll back to the best feasible prefix. A sequence of moves that first loses and then gains
  more is how a pass leaves a local minimum of single moves. A move into a full node is paired at once with
  the best move of an unlocked expert of that node back to the first node (a swap made of two moves, each
  with its exact gain). Gains are kept exact incrementally: moving ``e`` changes only the tokens holding
  ``e``, so only their contributions to the move gains of their experts are recomputed (``MoveGains``).
  A pass stops after ``patience`` steps without a new best.
* **Repairs**: ``fit_slots`` moves experts off nodes holding too many (a partitioner that balances load
  only may leave some); ``repair`` moves load off nodes over the cap.
"""
from __future__ import annotations

import numpy as np


def refine(graph, home, slots_per_node, cap, rounds=50, tolerance=1e-4):
    """Batched swap/move rounds on ``home`` under slot and load caps (see the module docstring).
    Stops after ``rounds`` rounds or once a round saves less than ``tolerance`` of the cost."""
    load, num_experts = graph.load, graph.num_experts
    home = repair(graph, home, slots_per_node, cap)
    cost = graph.cost(home)
    batch = max(1, num_experts // 8)
    for round_index in range(rounds):
        if round_index and previous - cost < tolerance * cost:
            break
        previous = cost
        move, swap = graph.gains(home)
        node_load = np.bincount(home, weights=load, minlength=graph.num_nodes)
        node_count = graph.node_slots(home)
        candidates = _candidates(move, swap, 4 * num_experts)
        if not candidates:
            break
        trial = _apply(candidates, home, node_load, node_count, graph, slots_per_node, cap, batch)
        if trial is None:
            break
        new_cost = graph.cost(trial)
        if new_cost < cost - 1e-9:
            home, cost = trial, new_cost
            continue
        single = _apply(candidates, home, node_load, node_count, graph, slots_per_node, cap, 1)
        if single is None or graph.cost(single) >= cost - 1e-9:
            break
        home, cost, batch = single, graph.cost(single), max(1, batch // 2)
    return home


def _candidates(move, swap, limit):
    """Positive-gain operations, best first (ties by expert ids): (gain, e, f_or_-1, target_node)."""
    num_experts = swap.shape[0]
    flat = swap.ravel()
    positive = np.flatnonzero(flat > 1e-9)
    positive = positive[positive // num_experts < positive % num_experts]  # swap gains are symmetric
    if positive.size > limit:  # the best `limit`, ties by index (argpartition's ties differ between CPUs)
        positive = positive[np.lexsort((positive, -flat[positive]))[:limit]]
    mover, node = np.nonzero(move > 1e-9)
    none = np.full(len(mover), -1)
    gain = np.concatenate([flat[positive], move[mover, node]])
    first = np.concatenate([positive // num_experts, mover])
    second = np.concatenate([positive % num_experts, none])
    target = np.concatenate([np.full(len(positive), -1), node])
    order = np.lexsort((target, second, first, -gain))
    return list(zip(gain[order].tolist(), first[order].tolist(), second[order].tolist(), target[order].tolist()))


def _swap_or_move(home, node_load, node_count, e, f, a, b, moved_load, moved_slots) -> None:
    """In place: expert e goes from node a to b and, for a swap (f >= 0), expert f from b to a."""
    home[e] = b
    if f >= 0:
        home[f] = a
    node_count[a] -= moved_slots
    node_count[b] += moved_slots
    node_load[a] -= moved_load
    node_load[b] += moved_load


def _apply(ops, home, node_load, node_count, graph, slots_per_node, cap, limit):
    """Apply up to ``limit`` feasible operations touching distinct experts; None if none applies."""
    load, need = graph.load, graph.slot_need
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
        slots = need[e] - (0 if f < 0 else need[f])  # slots moving from a to b
        if node_count[b] + slots > slots_per_node or node_count[a] - slots > slots_per_node:
            continue
        _swap_or_move(home, node_load, node_count, e, f, a, b, delta, slots)
        touched.update((e, f))
        applied += 1
        if applied >= limit:
            break
    return home if applied else None


def repair(graph, home, slots_per_node, cap, max_rounds=50):
    """While a node is over the load cap: apply, cheapest first, swaps/moves that lower it and keep the
    receiving node under the cap (gains recomputed between rounds)."""
    load, need, num_nodes, num_experts = graph.load, graph.slot_need, graph.num_nodes, graph.num_experts
    home = home.copy()
    for _ in range(max_rounds):
        node_load = np.bincount(home, weights=load, minlength=num_nodes)
        node_count = graph.node_slots(home)
        if node_load.max() <= cap + 1e-9:
            break
        move, swap = graph.gains(home)
        over = node_load[home] > cap + 1e-9  # (E,) experts on an overloaded node
        moved = load[:, None] - load[None, :]  # a swap of e and f moves this much load off e's node
        slots = need[:, None] - need[None, :]
        count = node_count[home]  # (E,) slots taken on each expert's node
        swap_ok = over[:, None] & (moved > 0) & (node_load[home][None, :] + moved <= cap + 1e-9) & \
            (count[None, :] + slots <= slots_per_node) & (count[:, None] - slots <= slots_per_node)
        move_ok = over[:, None] & (node_count[None, :] + need[:, None] <= slots_per_node) & \
            (node_load[None, :] + load[:, None] <= cap + 1e-9)
        gain = np.concatenate([np.where(swap_ok, swap, -np.inf).ravel(), np.where(move_ok, move, -np.inf).ravel()])
        touched, applied = set(), 0
        for index in np.argsort(-gain, kind="stable"):
            if not np.isfinite(gain[index]):
                break
            if index < num_experts ** 2:
                e, f = divmod(int(index), num_experts)
                a, b = home[e], home[f]
                moved, slots = load[e] - load[f], need[e] - need[f]
            else:
                e, b = divmod(int(index) - num_experts ** 2, num_nodes)
                f, a, moved, slots = -1, home[e], load[e], need[e]
            if e in touched or f in touched or node_load[a] <= cap + 1e-9 or node_load[b] + moved > cap + 1e-9 \
                    or node_count[b] + slots > slots_per_node or node_count[a] - slots > slots_per_node:
                continue
            _swap_or_move(home, node_load, node_count, e, f, a, b, moved, slots)
            touched.update((e, f))
            applied += 1
        if not applied:
            break
    return home


def fit_slots(graph, home, slots_per_node, cap):
    """Move experts off nodes whose experts take more than ``slots_per_node`` slots (a partitioner that
    balances load only may leave some), each time the cheapest move (largest gain) into a node with room,
    preferring moves that keep the receiving node under the load cap."""
    home = home.copy()
    load, need = graph.load, graph.slot_need
    while True:
        node_count = graph.node_slots(home)
        if node_count.max() <= slots_per_node:
            return home
        node_load = np.bincount(home, weights=load, minlength=graph.num_nodes)
        move, _ = graph.gains(home, swaps=False)
        allowed = (node_count[home] > slots_per_node)[:, None] & (node_count[None, :] + need[:, None] <= slots_per_node)
        if not allowed.any():
            return home  # no single move helps; the load cap and the replica step take it from here
        fits = node_load[None, :] + load[:, None] <= cap + 1e-9
        score = np.where(allowed, move - np.where(fits, 0.0, np.inf if (allowed & fits).any() else 0.0), -np.inf)
        expert, node = divmod(int(np.argmax(score)), graph.num_nodes)
        home[expert] = node


# ---- FM passes ------------------------------------------------------------------------------------------
class MoveGains:
    """``gain[e, n]`` = the drop of the cost if expert ``e`` alone moved to node ``n`` (for ``n != home[e]``),
    kept exact while experts move. Token ``t`` contributes to the gains of each expert ``f`` it holds
    ``[cnt[t, h] = 1] c[t, h] - [cnt[t, n] = 0] c[t, n]`` (``h = home[f]``), which depends only on ``cnt[t]``
    and ``home[f]``; moving ``e`` changes both only for the tokens holding ``e``."""

    def __init__(self, graph, home):
        self.graph, self.home = graph, home.copy()
        self.cnt = graph.counts(self.home)  # (T, N)
        order = np.argsort(graph.pair_expert, kind="stable")
        bounds = np.searchsorted(graph.pair_expert[order], np.arange(graph.num_experts + 1))
        self.tokens_of = [graph.pair_token[order[bounds[e]:bounds[e + 1]]] for e in range(graph.num_experts)]
        self.gain = np.zeros((graph.num_experts, graph.num_nodes))
        self._add(*self._contributions(np.arange(graph.experts.shape[0])))

    def _contributions(self, tokens):
        """(experts of the tokens' pairs (p,), their contributions (p, N))."""
        experts = self.graph.experts[tokens]  # (n, k)
        valid = experts >= 0
        node = self.home[np.maximum(experts, 0)]  # (n, k) node of each pair's expert
        cnt, charge = self.cnt[tokens], self.graph.charge[tokens]  # (n, N)
        rows = np.arange(len(tokens))[:, None]
        leave = (cnt[rows, node] == 1) * charge[rows, node]  # (n, k)
        join = (cnt == 0) * charge  # (n, N)
        return experts[valid], (leave[:, :, None] - join[:, None, :])[valid]

    def _add(self, experts, rows):
        num_nodes = self.graph.num_nodes
        flat = (experts[:, None] * num_nodes + np.arange(num_nodes)).ravel()
        self.gain += np.bincount(flat, weights=rows.ravel(), minlength=self.gain.size).reshape(self.gain.shape)

    def _leave_join(self, tokens, experts, source, target):
        """Per pair the leave term, per token the join terms of nodes ``source`` and ``target``."""
        node = self.home[np.maximum(experts, 0)]
        rows = np.arange(len(tokens))[:, None]
        charge = self.graph.charge[tokens]
        leave = (self.cnt[tokens[:, None], node] == 1) * charge[rows, node]
        return leave, (self.cnt[tokens, source] == 0) * charge[:, source], \
            (self.cnt[tokens, target] == 0) * charge[:, target]

    def move(self, expert, node):
        """Move ``expert`` to ``node``: only the leave terms of the moved tokens' experts and the join terms
        of the two nodes change."""
        tokens, source = self.tokens_of[expert], self.home[expert]
        experts = self.graph.experts[tokens]  # (n, k)
        valid = experts >= 0
        before = self._leave_join(tokens, experts, source, node)
        self.cnt[tokens, source] -= 1
        self.cnt[tokens, node] += 1
        self.home[expert] = node
        after = self._leave_join(tokens, experts, source, node)
        pair_expert = experts[valid]
        pair_token = np.broadcast_to(np.arange(len(tokens))[:, None], experts.shape)[valid]
        size = self.graph.num_experts
        self.gain += np.bincount(pair_expert, weights=(after[0] - before[0])[valid], minlength=size)[:, None]
        for column, index in ((source, 1), (node, 2)):
            self.gain[:, column] -= np.bincount(pair_expert, weights=(after[index] - before[index])[pair_token],
                                                minlength=size)


def fm_pass(graph, home, slots_per_node, cap, patience=16):
    """One FM pass from ``home`` (see the module docstring): (best home found, its cost).

    Only prefixes with every node within ``slots_per_node`` and ``max(cap, starting peak load)`` count."""
    num_experts, num_nodes, load, need = graph.num_experts, graph.num_nodes, graph.load, graph.slot_need
    state = MoveGains(graph, home)
    node_load = np.bincount(home, weights=load, minlength=num_nodes)
    node_count = graph.node_slots(home)
    limit = max(cap, node_load.max()) + 1e-9
    locked = np.zeros(num_experts, dtype=bool)
    cost = best = graph.cost(home)
    moves, best_length, idle = [], 0, 0

    def move(expert, node):
        source = state.home[expert]
        state.move(expert, node)
        moves.append((expert, node))
        node_load[source] -= load[expert]
        node_load[node] += load[expert]
        node_count[source] -= need[expert]
        node_count[node] += need[expert]

    while idle < patience:
        room = node_count[None, :] + need[:, None] <= slots_per_node
        open_node = room & (node_load[None, :] + load[:, None] <= limit)
        allowed = (~locked)[:, None] & (np.arange(num_nodes)[None, :] != state.home[:, None]) & (open_node | ~room)
        score = np.where(allowed, state.gain, -np.inf)
        if not np.isfinite(score.max()):
            break
        expert, node = divmod(int(np.argmax(score)), num_nodes)
        source, gain = state.home[expert], state.gain[expert, node]
        move(expert, node)
        locked[expert] = True
        if node_count[node] > slots_per_node or node_load[node] > limit:  # pair it with a move back
            back = (state.home == node) & ~locked & (node_load[source] + load <= limit) & \
                (node_load[node] - load <= limit) & (node_count[source] + need <= slots_per_node) & \
                (node_count[node] - need <= slots_per_node)
            if not back.any():
                move(expert, source)
                del moves[-2:]
                continue
            partner = int(np.argmax(np.where(back, state.gain[:, source], -np.inf)))
            gain += state.gain[partner, source]
            move(partner, source)
            locked[partner] = True
        cost -= gain
        idle += 1
        if cost < best - 1e-9 and node_count.max() <= slots_per_node and node_load.max() <= limit:
            best, best_length, idle = cost, len(moves), 0
    home = home.copy()
    for expert, node in moves[:best_length]:
        home[expert] = node
    return home, best


def improve(graph, home, slots_per_node, cap, rounds=50, passes=8, patience=16):
    """Batched rounds, then FM passes while they lower the cost, then batched rounds again."""
    home = refine(graph, home, slots_per_node, cap, rounds)
    cost = graph.cost(home)
    for _ in range(passes):
        trial, trial_cost = fm_pass(graph, home, slots_per_node, cap, patience)
        if trial_cost >= cost - 1e-9:
            break
        home, cost = trial, trial_cost
    return refine(graph, home, slots_per_node, cap, rounds)
