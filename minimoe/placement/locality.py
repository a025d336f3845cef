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

Algorithm (all counts vectorised with numpy; exact for the fitting tokens). Identical hyperedges are merged
into weights first (``minimoe.placement.hypergraph``); an expert hotter than one GPU's share takes more than
one of its node's slots (``slot_need``: room for the copies the GPU step needs).

1. **Node partition** (``node_partition``), by one of two partitioners on the same hypergraph, load cap and slot
   limits, or both: ``partitioner="auto"`` (the default) runs "fm" and, when it is installed, "mtkahypar" (on a
   uniform sample of at most ``AUTO_MTKAHYPAR_EDGES`` distinct hyperedges: its time grows with the pins, 2.6 s
   for 16k top-8 hyperedges where FM takes 0.4 s), and keeps the partition with the lower km1 on all the fitting
   tokens (one under the load cap first). ``partitioner="fm"`` (ours): starting partitions are (a) with known
   sources, experts in decreasing regret order (best minus second-best demand ``d[e, n]``, the pairs of ``e``
   from tokens of node ``n``) each taking their best node with room under the cap; (b) graph growing on the
   co-activation matrix ``A[e, f]`` (tokens choosing both): every node is seeded with a heavy expert, then the
   least-loaded node repeatedly takes the free expert most co-activated with it; (c) ``restarts`` random balanced
   ones (seeded). All are refined for a few batched rounds on a sample of the hyperedges; the best goes on to
   step 2. ``partitioner="mtkahypar"``: Mt-KaHyPar's multilevel km1 partition (Gottesbüren et al., ACM TOPS 2024)
   with expert loads as vertex weights and one fixed vertex per node for the sources (an optional dependency),
   then the fewest moves that respect the slot limits and the load cap; no step 2.
2. **Refinement** (``minimoe.placement.refinement``). With ``cnt[t, n]`` = experts of ``t`` on ``n`` and
   ``c[t, n] = 0`` if ``n = s(t)`` else 1, moving ``e`` from ``a`` to ``b`` saves
   ``sum_{t ∋ e} [cnt[t,a] = 1] c[t,a] - [cnt[t,b] = 0] c[t,b]``; swapping ``e`` (on ``a``) with ``f``
   (on ``b``) saves the two move gains minus the tokens holding both (for which nothing changes). Batched
   Kernighan–Lin rounds apply the best non-overlapping positive swaps and moves; Fiduccia–Mattheyses passes
   then accept losing moves and roll back to the best prefix, which leaves the local minima the batched
   rounds stop in.
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

from minimoe.placement.fitdata import FitData
from minimoe.placement.hypergraph import (DEFAULT_MTKAHYPAR_PRESET, MTKAHYPAR_PRESETS, Hypergraph, mtkahypar_available,
                                          partition_mtkahypar)
from minimoe.placement.locality_slots import fill_spares, pack_gpus
from minimoe.placement.refinement import fit_slots, improve, refine, repair
from minimoe.placement.topology import Topology


PARTITIONERS = ("auto", "fm", "mtkahypar")
START_ROUNDS, START_EDGES = 8, 4096  # starting partitions are ranked after 8 rounds on <= 4096 hyperedges
AUTO_MTKAHYPAR_EDGES = 2048  # partitioner="auto" gives Mt-KaHyPar a uniform sample of this many hyperedges


def place_locality(trace, topology: Topology, num_slots: int, sources=None, tokens=None, epsilon: float = 0.1,
                   rounds: int = 50, locality_replicas: bool = True, max_fit_tokens: int | None = None,
                   partitioner: str = "auto", seed: int = 0, restarts: int = 4,
                   mtkahypar_preset: str = DEFAULT_MTKAHYPAR_PRESET,
                   cache: dict | None = None):
    """phy2log (L, num_slots) int64 for every layer of ``trace`` (see the module docstring).

    sources: per-request GPU rank (known sources) or None. tokens: bool (N,) mask of fitting tokens.
    epsilon: node/GPU load <= (1 + epsilon) * mean. rounds: refinement rounds per layer.
    locality_replicas: False uses spare slots for balance only. max_fit_tokens: evenly subsample the
    fitting tokens to at most this many (speed). partitioner: "auto" (both below where Mt-KaHyPar is
    installed, the lower km1 kept), "fm" (steps 1-2 of the module docstring,
    ours) or "mtkahypar" (Mt-KaHyPar on the same hypergraph; optional, ``pip install mtkahypar``).
    seed: the partitioners' seed (the random starts of "fm", Mt-KaHyPar's own); the same seed gives the
    same placement. restarts: random starting partitions of "fm" besides the greedy ones.
    mtkahypar_preset: one of ``MTKAHYPAR_PRESETS`` (``minimoe.placement.hypergraph.partition_mtkahypar``);
    the default, "deterministic", gives the same partition for the same input in any process.
    cache: a dict that keeps node partitions across calls, keyed by their whole input (a placement on 2x2 and
    on 2x4 GPUs without spare slots partitions the same hypergraph onto the same 2 nodes); None keeps none.
    Raises ValueError naming a bad option, ImportError when Mt-KaHyPar is asked for and missing.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 10:
        raise ValueError(f"epsilon must be a number in [0, 10), got {epsilon!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner must be one of {list(PARTITIONERS)}, got {partitioner!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 0:
        raise ValueError(f"restarts must be a non-negative int, got {restarts!r}")
    if mtkahypar_preset not in MTKAHYPAR_PRESETS:
        raise ValueError(f"mtkahypar_preset must be one of {list(MTKAHYPAR_PRESETS)}, got {mtkahypar_preset!r}")
    rows = np.arange(trace.experts.shape[0]) if tokens is None else np.flatnonzero(tokens)
    if max_fit_tokens is not None and len(rows) > max_fit_tokens:
        rows = rows[np.linspace(0, len(rows) - 1, max_fit_tokens).astype(np.int64)]
    token_index = trace.token_index[rows] if isinstance(trace, FitData) else rows  # rows of the whole trace
    source_gpu = None
    if sources is not None:
        source_gpu = topology.request_ranks(trace.num_requests, sources)[trace.request[rows]]
    phy2log = np.empty((trace.experts.shape[1], num_slots), dtype=np.int64)
    for layer in range(trace.experts.shape[1]):
        experts = trace.experts[rows, layer].astype(np.int64)
        phy2log[layer] = place_layer(experts, trace.num_experts, topology, num_slots, source_gpu, token_index,
                                     epsilon, rounds, locality_replicas, partitioner, seed, restarts,
                                     mtkahypar_preset, cache)
    return phy2log


def place_layer(experts, num_experts, topology, num_slots, source_gpu, token_index, epsilon=0.1, rounds=50,
                locality_replicas=True, partitioner="auto", seed=0, restarts=4,
                mtkahypar_preset=DEFAULT_MTKAHYPAR_PRESET,
                cache=None):
    """One layer: experts (T, k) (-1 = none), source_gpu (T,) or None, token_index (T,) -> phy2log (R,)."""
    num_nodes = topology.num_nodes
    keep = (experts >= 0).any(axis=1)
    experts, token_index = experts[keep], np.asarray(token_index)[keep]
    source_gpu = None if source_gpu is None else np.asarray(source_gpu)[keep]
    pin = None if source_gpu is None else source_gpu // topology.gpus_per_node
    graph = Hypergraph(experts, num_experts, num_nodes, pin)  # one hyperedge per token (replica routing)
    slots_per_node = num_slots // num_nodes
    cap = (1 + epsilon) * graph.load.sum() / num_nodes
    gpu_cap = (1 + epsilon) * graph.load.sum() / topology.num_gpus
    graph.slot_need = slot_need(graph.load, num_slots, gpu_cap)
    merged, options = graph.merged(), (slots_per_node, cap, partitioner, rounds, seed, restarts, mtkahypar_preset)
    key = None if cache is None else _input_key(merged, options)
    home = None if cache is None or key not in cache else cache[key].copy()
    if home is None:
        home = node_partition(merged, *options, cache=cache)
        if cache is not None:
            cache[key] = home.copy()
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


def _input_key(graph, options, slot_need: bool = True) -> bytes:
    """A digest of everything a node partition depends on (without ``slot_need``: what Mt-KaHyPar sees)."""
    import hashlib

    digest = hashlib.blake2b(repr((options, graph.num_experts, graph.num_nodes)).encode(), digest_size=16)
    arrays = (graph.experts, graph.weight, graph.slot_need if slot_need else np.zeros(0),
              graph.pin if graph.pin is not None else np.zeros(0))
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(repr(array.shape).encode())
    return digest.digest()


def _mtkahypar_home(graph, cap, seed, preset, cache):
    """Mt-KaHyPar's partition of ``graph`` under load ``cap``, before any slot repair, kept in ``cache`` by its
    input: the two slot budgets of one topology hand it the same hypergraph (the slots only enter the repair),
    and with a ``deterministic*`` preset the same input gives the same partition, so the second call is skipped."""
    key = None if cache is None else ("mtkahypar", _input_key(graph, (float(cap), int(seed), preset), False))
    if key is not None and key in cache:
        return cache[key].copy()
    home = partition_mtkahypar(graph, cap, seed=seed, preset=preset)
    if key is not None and preset.startswith("deterministic"):
        cache[key] = home.copy()
    return home


def slot_need(load, num_slots, gpu_cap):
    """(E,) slots each expert needs on its node: one, plus one more copy while its load per copy exceeds a
    GPU's cap and spare slots remain (hottest per copy first, like EPLB's replication)."""
    need = np.ones(len(load), dtype=np.int64)
    for _ in range(num_slots - len(load)):
        expert = int(np.argmax(load / need))
        if load[expert] / need[expert] <= gpu_cap:
            break
        need[expert] += 1
    return need


def node_partition(graph, slots_per_node, cap, partitioner="auto", rounds=50, seed=0, restarts=4,
                   mtkahypar_preset=DEFAULT_MTKAHYPAR_PRESET, cache=None):
    """home (E,) int64: the node of every expert, at most ``slots_per_node`` experts and (where achievable)
    load ``cap`` per node, minimising ``graph.cost`` (steps 1-2 of the module docstring). ``cache``: a dict that
    keeps Mt-KaHyPar's partitions by their input across calls (``_mtkahypar_home``), or None."""
    if graph.num_nodes == 1:
        return np.zeros(graph.num_experts, dtype=np.int64)
    if partitioner == "auto":
        options = (rounds, seed, restarts, mtkahypar_preset)
        homes = [node_partition(graph, slots_per_node, cap, "fm", *options)]
        if mtkahypar_available():  # on at most AUTO_MTKAHYPAR_EDGES hyperedges: its time grows with their pins
            sample = graph.sample(AUTO_MTKAHYPAR_EDGES, np.random.default_rng(seed))
            home = _mtkahypar_home(sample, cap * sample.load.sum() / max(graph.load.sum(), 1e-12), seed,
                                   mtkahypar_preset, cache)
            homes.append(repair(graph, fit_slots(graph, home, slots_per_node, cap), slots_per_node, cap))

        def rank(home):  # under the cap first, then the lower km1; ties keep fm
            over = np.bincount(home, weights=graph.load, minlength=graph.num_nodes).max() > cap + 1e-9
            return over, graph.km1(home)
        return min(homes, key=rank)
    if partitioner == "mtkahypar":
        home = _mtkahypar_home(graph, cap, seed, mtkahypar_preset, cache)
        return repair(graph, fit_slots(graph, home, slots_per_node, cap), slots_per_node, cap)
    if not len(graph.pair_expert):  # no fitting token: nothing to refine
        return _initial_partition(graph, slots_per_node, cap)
    rng = np.random.default_rng(seed)
    sample = graph.sample(START_EDGES, rng)  # the starts are compared on a sample, cheaply
    sample_cap = cap * sample.load.sum() / graph.load.sum()
    starts = [_initial_partition(graph, slots_per_node, cap)]
    if graph.pin is not None:  # the co-activation start too
        starts.append(_initial_partition(graph, slots_per_node, cap, use_sources=False))
    for _ in range(restarts):
        starts.append(_random_partition(graph, slots_per_node, cap, rng))
    starts = [refine(sample, home, slots_per_node, sample_cap, min(rounds, START_ROUNDS)) for home in starts]
    over = [np.bincount(home, weights=sample.load, minlength=graph.num_nodes).max() > sample_cap + 1e-9
            for home in starts]  # a start the repair could not bring under the cap ranks last
    best = starts[min(range(len(starts)), key=lambda i: (over[i], sample.cost(starts[i])))]
    return improve(graph, best, slots_per_node, cap, rounds)


def _random_partition(graph, slots_per_node, cap, rng):
    """Experts in a random, roughly heaviest-first order, each to the least-loaded node with room (balanced,
    unstructured)."""
    target = _slot_targets(graph, slots_per_node)
    home = np.empty(graph.num_experts, dtype=np.int64)
    node_load, node_count = np.zeros(graph.num_nodes), np.zeros(graph.num_nodes, dtype=np.int64)
    for expert in np.argsort(-graph.load * rng.uniform(0.5, 1.0, graph.num_experts), kind="stable"):
        node = _lightest_open(node_load, node_count, target, graph.slot_need[expert])
        home[expert] = node
        node_load[node] += graph.load[expert]
        node_count[node] += graph.slot_need[expert]
    return home


def _slot_targets(graph, slots_per_node):
    """(N,) slots each node fills in a starting partition: the experts' slots spread evenly."""
    total = int(graph.slot_need.sum())
    target = np.full(graph.num_nodes, total // graph.num_nodes)
    target[: total % graph.num_nodes] += 1
    return np.minimum(target, slots_per_node)


def _initial_partition(graph, slots_per_node, cap, use_sources=True):
    num_experts, num_nodes, load = graph.num_experts, graph.num_nodes, graph.load
    need = graph.slot_need
    home = np.full(num_experts, -1, dtype=np.int64)
    node_load, node_count = np.zeros(num_nodes), np.zeros(num_nodes, dtype=np.int64)
    target = _slot_targets(graph, slots_per_node)

    def fits(expert, node):
        return node_count[node] + need[expert] <= target[node] and node_load[node] + load[expert] <= cap

    def assign(expert, node):
        home[expert] = node
        node_load[node] += load[expert]
        node_count[node] += need[expert]

    if graph.pin is not None and use_sources:  # regret greedy on demand
        demand = graph.demand()
        ordered = np.sort(demand, axis=1)
        regret = ordered[:, -1] - (ordered[:, -2] if num_nodes > 1 else 0)
        for expert in np.lexsort((-load, -regret)):
            choices = [n for n in np.argsort(-demand[expert], kind="stable") if fits(expert, n)]
            assign(expert, choices[0] if choices else _lightest_open(node_load, node_count, target, need[expert]))
        return home
    affinity = graph.coactivation()  # simultaneous graph growing, lightest node picks next
    score = np.zeros((num_nodes, num_experts))
    while (home < 0).any():
        node = _lightest_open(node_load, node_count, target)
        free = home < 0
        room = free & (node_count[node] + need <= target[node])
        if node_count[node] == 0:  # seed: the heaviest free expert
            expert = int(np.argmax(np.where(free, load, -1.0)))
        else:
            ok = room & (node_load[node] + load <= cap)
            if ok.any():  # the free expert most co-activated with the node's experts
                expert = int(np.argmax(np.where(ok, score[node], -np.inf)))
            else:  # nothing fits under the cap: the lightest one
                expert = int(np.argmin(np.where(room if room.any() else free, load, np.inf)))
        assign(expert, node)
        score[node] += affinity[expert]
    return home


def _lightest_open(node_load, node_count, target, need=1):
    """The least-loaded node with room for ``need`` more slots (else with any room, else the emptiest)."""
    for room in (node_count + need <= target, node_count < target):
        if room.any():
            return int(np.argmin(np.where(room, node_load, np.inf)))
    return int(np.argmin(node_count))
