"""Locality placement: exact gains, exact replica routing, planted structure recovered, balance kept."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.placement import group
from minimoe.placement.hypergraph import Hypergraph
from minimoe.placement.locality_slots import _Routing
from minimoe.placement import Placement, place
from minimoe.traces import planted_trace, synthetic_trace
from minimoe.placement import Topology
from minimoe.traces import Trace
from minimoe.placement import measure


def brute_cost(experts, home, pin, weight=None):
    """sum over tokens of distinct nodes (other than the token's own, if pinned) its experts live on, each token
    counted ``weight[t]`` times (default once)."""
    total = 0
    for t, row in enumerate(experts):
        nodes = {int(home[e]) for e in row if e >= 0}
        if pin is not None:
            nodes.discard(int(pin[t]))
        total += len(nodes) * (1 if weight is None else weight[t])
    return total


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), num_nodes=st.integers(2, 4), pinned=st.booleans(), weighted=st.booleans())
def test_move_and_swap_gains_are_exact(seed, num_nodes, pinned, weighted):
    rng = np.random.default_rng(seed)
    num_experts, top_k = 8, 3
    experts = np.argsort(rng.random((30, num_experts)), axis=1)[:, :top_k]
    experts[rng.random(experts.shape) < 0.15] = -1
    experts[experts == num_experts - 1] = -1  # one expert no token holds
    pin = rng.integers(0, num_nodes, 30) if pinned else None
    weight = rng.integers(1, 5, 30) if weighted else None  # merged hyperedges stand for several tokens
    graph = Hypergraph(experts, num_experts, num_nodes, pin, weight)
    home = rng.integers(0, num_nodes, num_experts)
    base = brute_cost(experts, home, pin, weight)
    assert graph.cost(home) == base
    move, swap = graph.gains(home)
    assert np.array_equal(graph.gains(home, swaps=False)[0], move) and graph.gains(home, swaps=False)[1] is None
    for e in range(num_experts):
        for n in range(num_nodes):
            moved = home.copy()
            moved[e] = n
            assert move[e, n] == (-np.inf if n == home[e] else base - brute_cost(experts, moved, pin, weight))
        for f in range(num_experts):
            swapped = home.copy()
            swapped[e], swapped[f] = home[f], home[e]
            assert swap[e, f] == (-np.inf if home[f] == home[e] else base - brute_cost(experts, swapped, pin, weight))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), num_nodes=st.integers(2, 3), per_node=st.integers(1, 2))
def test_replica_routing_matches_placement_route(seed, num_nodes, per_node):
    """The node-level routing the replica search optimises is exactly what Placement.route does."""
    rng = np.random.default_rng(seed)
    num_experts, top_k, num_tokens = 6, 2, 40
    experts = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]
    source_gpu = rng.integers(0, num_nodes * per_node, num_tokens)
    token_index = rng.integers(0, 500, num_tokens)
    graph = Hypergraph(experts, num_experts, num_nodes, source_gpu // per_node)
    home = rng.integers(0, num_nodes, num_experts)
    copies = np.zeros((num_experts, num_nodes), dtype=np.int64)
    copies[np.arange(num_experts), home] = 1
    routing = _Routing(graph, copies, token_index)
    for _ in range(4):
        expert, node = int(rng.integers(num_experts)), int(rng.integers(num_nodes))
        saved, shift, new = routing.try_copy(expert, node)
        before = brute_cost(routing.nodes, np.arange(num_nodes), graph.pin)
        routing.commit(expert, node, new)
        assert before - brute_cost(routing.nodes, np.arange(num_nodes), graph.pin) == saved
        assert shift.sum() == 0
    # lay the copies out node-major, pad every GPU with extra copies of expert 0, and route for real
    slots_per_node = int(copies.sum(0).max())
    slots_per_node += -slots_per_node % per_node
    layout = []
    for n in range(num_nodes):
        held = list(np.repeat(np.arange(num_experts), copies[:, n]))
        layout += held + [held[0] if held else 0] * (slots_per_node - len(held))
    padded = copies.copy()
    for n in range(num_nodes):
        held = np.flatnonzero(copies[:, n])
        padded[held[0] if len(held) else 0, n] += slots_per_node - copies[:, n].sum()
    placement = Placement(np.array([layout]), num_experts, num_nodes, per_node)
    routing = _Routing(graph, np.eye(num_nodes, dtype=np.int64)[home], token_index)
    for expert in range(num_experts):
        for node in range(num_nodes):
            for _ in range(padded[expert, node] - (home[expert] == node)):
                routing.commit(expert, node, routing.try_copy(expert, node)[2])
    slots = placement.route(0, experts, source_gpu, token_index)
    np.testing.assert_array_equal(placement.node_of_slot[slots], routing.nodes)


def test_planted_partition_is_recovered():
    trace = planted_trace()
    topology = Topology(num_nodes=4, gpus_per_node=2)
    without_sources = place(trace, topology, "locality")
    assert measure(trace, without_sources, topology).nodes_per_token == 1.0  # each domain on one node
    sources = group(trace, topology, "signature")
    with_sources = place(trace, topology, "locality", sources=sources)
    report = measure(trace, with_sources, topology, sources=sources, tokens=trace.phase == 1)
    assert report.inter_node_bytes == 0 and report.load_max_over_mean < 1.1


def test_single_node_and_determinism():
    trace = synthetic_trace(num_requests=12, tokens_per_request=8, num_experts=8, top_k=2, seed=3)
    one_node = Topology(num_nodes=1, gpus_per_node=4)
    a = place(trace, one_node, "locality", num_replicas=12, sources=np.arange(12) % 4)
    b = place(trace, one_node, "locality", num_replicas=12, sources=np.arange(12) % 4)
    assert a == b and a.num_slots == 12


@pytest.mark.parametrize("num_replicas", [64, 72])
def test_locality_beats_load_only_placements_on_structured_traces(num_replicas):
    trace = synthetic_trace(num_requests=128, tokens_per_request=32, num_layers=2, num_experts=64, top_k=8, seed=1)
    topology = Topology(num_nodes=4, gpus_per_node=2)
    fit, held_out = trace.phase == 0, trace.phase == 1
    sources = group(trace, topology, "signature", tokens=fit)

    def inter(method, **options):
        placement = place(trace, topology, method, num_replicas=num_replicas, tokens=fit, **options)
        return measure(trace, placement, topology, sources=sources, tokens=held_out)

    contiguous, eplb, locality = inter("contiguous"), inter("eplb"), inter("locality", sources=sources)
    assert locality.inter_node_bytes < 0.85 * min(contiguous.inter_node_bytes, eplb.inter_node_bytes)
    assert locality.load_max_over_mean < 1.25


def test_node_loads_respect_epsilon_on_the_fitting_tokens():
    trace = synthetic_trace(num_requests=64, tokens_per_request=32, num_layers=2, num_experts=64, top_k=4, seed=5)
    topology = Topology(num_nodes=4, gpus_per_node=1)
    for epsilon in (0.02, 0.1):
        placement = place(trace, topology, "locality", epsilon=epsilon)
        load = measure(trace, placement, topology).per_layer["tokens_per_rank"]  # (L, 4) = per node here
        assert (load.max(1) / load.mean(1) <= 1 + epsilon + 1e-9).all()
