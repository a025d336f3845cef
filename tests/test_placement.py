"""Placements: valid for every method on random traces/topologies, export, files, routing, errors."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.placement.eplb import eplb_numpy
from minimoe.placement.methods import MAX_SLOTS_PER_EXPERT, METHODS, place, trace_loads
from minimoe.placement.phy2log import Placement
from minimoe.traces import synthetic_trace
from minimoe.placement import Topology
from minimoe.traces import Trace


def small_trace(seed, num_experts=12, top_k=3, num_layers=2, requests=6):
    return synthetic_trace(num_requests=requests, tokens_per_request=8, num_layers=num_layers,
                           num_experts=num_experts, top_k=top_k, seed=seed)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nodes=st.integers(1, 3), per_node=st.integers(1, 3),
       num_experts=st.integers(2, 20), top_k=st.integers(1, 4), extra=st.integers(0, 2),
       method=st.sampled_from(METHODS), with_sources=st.booleans(), holes=st.booleans())
def test_every_method_gives_a_valid_placement(seed, nodes, per_node, num_experts, top_k, extra, method,
                                              with_sources, holes):
    top_k = min(top_k, num_experts)
    topology = Topology(num_nodes=nodes, gpus_per_node=per_node)
    trace = small_trace(seed, num_experts, top_k)
    if holes:  # unused experts and tokens with fewer than k experts must still be placed/handled
        experts = trace.experts.copy()
        experts[np.random.default_rng(seed).random(experts.shape) < 0.3] = -1
        trace = Trace(experts=experts, request=trace.request, phase=trace.phase, domain=trace.domain,
                      num_experts=num_experts, top_k=top_k)
    most = max(num_experts * topology.num_gpus, MAX_SLOTS_PER_EXPERT * num_experts)  # place's bound on the slots
    num_slots = min(-(-num_experts // topology.num_gpus) + extra, most // topology.num_gpus) * topology.num_gpus
    options = dict(num_replicas=num_slots)
    if method == "locality" and with_sources:
        options["sources"] = np.random.default_rng(seed).integers(0, topology.num_gpus, trace.num_requests)
    placement = place(trace, topology, method, **options)
    assert placement.phy2log.shape == (trace.num_layers, num_slots)
    counts = placement.replica_counts()
    assert (counts >= 1).all() and (counts.sum(1) == num_slots).all()
    assert placement.validate() is placement
    if method in ("contiguous", "round_robin") and num_slots == num_experts:
        assert (counts == 1).all()


def test_static_layouts():
    trace = small_trace(0, num_experts=8, top_k=2)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    contiguous = place(trace, topology, "contiguous")
    np.testing.assert_array_equal(contiguous.phy2log, np.tile(np.arange(8), (2, 1)))
    round_robin = place(trace, topology, "round_robin")
    np.testing.assert_array_equal(round_robin.phy2log[0], [0, 4, 1, 5, 2, 6, 3, 7])
    spare = place(trace, topology, "contiguous", num_replicas=12)  # one copy per GPU of the hottest experts
    loads = trace_loads(trace)
    for layer in range(2):
        copied = np.flatnonzero(spare.replica_counts()[layer] > 1)
        assert set(copied) <= set(np.argsort(-loads[layer])[:4])


def test_eplb_method_is_the_eplb_function_on_trace_loads():
    trace = small_trace(1, num_experts=16, top_k=4)
    topology = Topology(num_nodes=2, gpus_per_node=4)
    loads = trace_loads(trace)
    for policy, groups, nodes in (("global", 1, 1), ("hierarchical", 4, 2)):
        placement = place(trace, topology, "eplb", num_replicas=24, policy=policy, num_groups=groups)
        np.testing.assert_array_equal(placement.phy2log, eplb_numpy(loads, 24, groups, nodes, 8)[0])


def test_to_eplb_export_matches_phy2log():
    placement = Placement([[0, 1, 2, 0, 3, 2], [3, 3, 2, 1, 0, 0]], num_experts=4, num_nodes=1, gpus_per_node=2)
    phy2log, log2phy, logcnt = placement.to_eplb()
    assert phy2log.tolist() == placement.phy2log.tolist()
    assert logcnt.tolist() == [[2, 1, 2, 1], [2, 1, 1, 2]]
    assert log2phy.tolist() == [[[0, 3], [1, -1], [2, 5], [4, -1]], [[4, 5], [3, -1], [2, -1], [0, 1]]]


def test_save_load_round_trip(tmp_path):
    trace = small_trace(2, num_experts=8)
    placement = place(trace, Topology(num_nodes=2, gpus_per_node=2), "locality", num_replicas=12)
    path = tmp_path / "placement.json"
    placement.save(path)
    again = Placement.load(path)
    assert again == placement and again.method == "locality" and again.slots_per_gpu == 3
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        Placement.load(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    data["phy2log"][0][0] = 99
    (tmp_path / "range.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"expected \[0, 7\]"):
        Placement.load(tmp_path / "range.json")
    del data["method"]
    (tmp_path / "keys.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="minimoe.placement.methods/1"):
        Placement.load(tmp_path / "keys.json")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nodes=st.integers(1, 3), per_node=st.integers(1, 3), extra=st.integers(0, 3))
def test_route_is_nearest_first_with_token_index_ties(seed, nodes, per_node, extra):
    rng = np.random.default_rng(seed)
    num_gpus, num_experts = nodes * per_node, 5
    num_slots = (-(-num_experts // num_gpus) + extra) * num_gpus
    table = rng.permutation(np.concatenate([np.arange(num_experts),
                                            rng.integers(0, num_experts, num_slots - num_experts)]))
    placement = Placement(table[None], num_experts, nodes, per_node)
    spg = num_slots // num_gpus
    experts = rng.integers(-1, num_experts, (30, 2))
    sources = rng.integers(0, num_gpus, 30)
    index = rng.integers(0, 1000, 30)
    slots = placement.route(0, experts, sources, index)
    for t in range(30):
        for j in range(2):
            e = experts[t, j]
            if e < 0:
                assert slots[t, j] == -1
                continue
            own = [s for s in range(num_slots) if table[s] == e]
            distance = [0 if s // spg == sources[t] else 1 if s // spg // per_node == sources[t] // per_node else 2
                        for s in own]
            nearest = [s for s, d in zip(own, distance) if d == min(distance)]
            assert slots[t, j] == nearest[index[t] % len(nearest)]


def test_placement_rejects_unplaced_expert_and_bad_shapes():
    with pytest.raises(ValueError, match="expert 3 of layer 0 has no slot"):
        Placement([[0, 1, 2, 2]], num_experts=4, num_nodes=1, gpus_per_node=2)
    with pytest.raises(ValueError, match="do not divide over 2 GPUs"):
        Placement([[0, 1, 2]], num_experts=3, num_nodes=1, gpus_per_node=2)
    with pytest.raises(ValueError, match="cannot hold 5 experts"):
        Placement([[0, 1, 2, 3]], num_experts=5, num_nodes=1, gpus_per_node=2)
    with pytest.raises(ValueError, match="2-D integer array"):
        Placement([0, 1], num_experts=2, num_nodes=1, gpus_per_node=1)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        Placement([[0]], num_experts=0, num_nodes=1, gpus_per_node=1)


def test_place_errors():
    trace = small_trace(3, num_experts=8)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    with pytest.raises(ValueError, match="unknown placement method 'greedy'"):
        place(trace, topology, "greedy")
    with pytest.raises(ValueError, match="num_replicas=10 is not a multiple of num_gpus=4"):
        place(trace, topology, "eplb", num_replicas=10)
    with pytest.raises(ValueError, match="cannot hold num_experts=8"):
        place(trace, topology, "contiguous", num_replicas=4)
    with pytest.raises(ValueError, match="num_experts=16 does not match the trace's num_experts=8"):
        place(trace, topology, "locality", num_experts=16)
    with pytest.raises(ValueError, match="not a multiple of num_gpus=3"):
        place(trace, Topology(num_nodes=3, gpus_per_node=1), "contiguous")  # 8 experts on 3 GPUs
    with pytest.raises(ValueError, match=r"unknown options \['epsilon'\] for method 'contiguous'"):
        place(trace, topology, "contiguous", epsilon=0.1)
    with pytest.raises(ValueError, match=r"unknown options \['eps'\] for method 'locality'"):
        place(trace, topology, "locality", eps=0.1)
    with pytest.raises(ValueError, match="eplb policy"):
        place(trace, topology, "eplb", policy="local")
    with pytest.raises(ValueError, match="hierarchical eplb needs num_groups=1"):
        place(trace, topology, "eplb", policy="hierarchical")
    with pytest.raises(ValueError, match="bool mask"):
        place(trace, topology, "eplb", tokens=np.ones(3, bool))
    with pytest.raises(TypeError, match="Topology"):
        place(trace, (2, 2), "eplb")
    with pytest.raises(TypeError, match="Trace"):
        place(np.zeros((4, 1, 2)), topology, "eplb")
    with pytest.raises(ValueError, match="epsilon"):
        place(trace, topology, "locality", epsilon=-0.5)
    with pytest.raises(ValueError, match="GPU ranks"):
        place(trace, topology, "locality", sources=np.full(trace.num_requests, 9))


@pytest.mark.parametrize("method", METHODS)
def test_no_fitting_tokens_still_places_every_expert(method):
    trace = small_trace(4, num_experts=2, top_k=1)
    topology = Topology(num_nodes=3, gpus_per_node=2)  # fewer experts than nodes
    for sources in (None, np.arange(trace.num_requests) % 6):
        options = dict(sources=sources) if method == "locality" else {}
        placement = place(trace, topology, method, num_replicas=6, tokens=np.zeros(trace.num_tokens, bool), **options)
        assert (placement.replica_counts() >= 1).all()


def test_more_replicas_than_any_use_are_refused_before_fitting():
    trace = synthetic_trace(num_requests=4, num_experts=16)
    with pytest.raises(ValueError, match=r"num_replicas=16000: expected at most 128 physical slots per layer \(every "
                                         r"GPU holding each of the 16 experts, or 8 copies of each\)"):
        place(trace, Topology(num_nodes=2, gpus_per_node=2), "eplb", num_replicas=16000)
    one = synthetic_trace(num_requests=4, num_experts=1, top_k=1)  # one expert on each of 16 GPUs: above 8 copies
    assert place(one, Topology(num_nodes=4, gpus_per_node=4), "contiguous", num_replicas=16).num_slots == 16
