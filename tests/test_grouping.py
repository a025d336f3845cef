"""Request grouping: balanced for every method, domain and signature structure found, joint mode."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.placement.grouping import METHODS, group, group_and_place
from minimoe.placement import Placement, place
from minimoe.traces import planted_trace, synthetic_trace
from minimoe.placement import Topology
from minimoe.traces import Trace
from minimoe.placement import measure


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nodes=st.integers(1, 3), per_node=st.integers(1, 3),
       requests=st.integers(1, 30), method=st.sampled_from(METHODS), with_placement=st.booleans())
def test_every_method_is_balanced(seed, nodes, per_node, requests, method, with_placement):
    topology = Topology(num_nodes=nodes, gpus_per_node=per_node)
    trace = synthetic_trace(num_requests=requests, tokens_per_request=4, num_experts=6, top_k=2, seed=seed)
    placement = None
    if with_placement and method == "signature":
        placement = place(trace, topology, "round_robin", num_replicas=6 * topology.num_gpus)
    sources = group(trace, topology, method, seed=seed, placement=placement)
    assert sources.shape == (requests,) and sources.dtype == np.int64
    counts = np.bincount(sources, minlength=topology.num_gpus)
    assert counts.max() - counts.min() <= 1 and counts.sum() == requests
    np.testing.assert_array_equal(counts, requests // topology.num_gpus
                                  + (np.arange(topology.num_gpus) < requests % topology.num_gpus))


def test_random_is_seeded():
    trace = synthetic_trace(num_requests=40, seed=0)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    a, b, c = (group(trace, topology, "random", seed=s) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_domain_grouping_keeps_domains_together():
    trace = planted_trace(num_requests=32)
    topology = Topology(num_nodes=4, gpus_per_node=2)
    sources = group(trace, topology, "domain")
    labels = trace.request_domains()
    for node in range(4):
        assert len(set(labels[sources // 2 == node])) == 1  # equal-size domains: one per node
    unlabelled = Trace(experts=np.zeros((2, 1, 1), np.int16), request=np.zeros(2, np.int32),
                       phase=np.zeros(2, np.int8), domain=None, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="domain labels"):
        group(unlabelled, topology, "domain")


def test_signature_grouping_recovers_hidden_domains():
    trace = planted_trace(num_requests=32)
    topology = Topology(num_nodes=4, gpus_per_node=2)
    sources = group(trace, topology, "signature", seed=3)  # never sees the labels
    labels = trace.request_domains()
    for node in range(4):
        assert len(set(labels[sources // 2 == node])) == 1


def test_placement_aware_grouping_sends_requests_to_their_experts():
    trace = planted_trace(num_requests=32)
    topology = Topology(num_nodes=4, gpus_per_node=2)
    placement = place(trace, topology, "locality")  # one domain's experts per node
    sources = group(trace, topology, "signature", placement=placement)
    report = measure(trace, placement, topology, sources=sources)
    assert report.inter_node_bytes == 0
    random = measure(trace, placement, topology, sources=group(trace, topology, "random"))
    assert random.inter_node_bytes > 0


def test_balance_by_tokens():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 24)
    request = np.repeat(np.arange(24), lengths).astype(np.int32)
    experts = np.argsort(rng.random((len(request), 1, 8)), axis=2)[:, :, :2].astype(np.int16)
    trace = Trace(experts=experts, request=request, phase=np.zeros(len(request), np.int8), domain=None,
                  num_experts=8, top_k=2)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    for method in METHODS[:1] + METHODS[2:]:
        sources = group(trace, topology, method, balance="tokens")
        tokens = np.bincount(sources, weights=lengths, minlength=4)
        assert tokens.max() <= len(request) / 4 + lengths.max()


def test_group_and_place_is_no_worse_than_its_first_round():
    trace = synthetic_trace(num_requests=64, tokens_per_request=16, num_experts=32, top_k=4, seed=7)
    topology = Topology(num_nodes=4, gpus_per_node=2)
    fit = trace.phase == 0
    first_sources = group(trace, topology, "signature", tokens=fit)
    first = place(trace, topology, "locality", sources=first_sources, tokens=fit, num_replicas=40)
    sources, placement = group_and_place(trace, topology, rounds=2, tokens=fit, num_replicas=40)
    assert isinstance(placement, Placement) and placement.num_slots == 40
    assert np.bincount(sources, minlength=8).tolist() == [8] * 8
    fitted = measure(trace, placement, topology, sources=sources, tokens=fit).inter_node_bytes
    assert fitted <= measure(trace, first, topology, sources=first_sources, tokens=fit).inter_node_bytes


def test_bad_arguments():
    trace = synthetic_trace(num_requests=8)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    with pytest.raises(ValueError, match="unknown grouping method 'kmeans'"):
        group(trace, topology, "kmeans")
    with pytest.raises(ValueError, match="balance must be"):
        group(trace, topology, "random", balance="bytes")
    with pytest.raises(ValueError, match="bool mask"):
        group(trace, topology, "signature", tokens=np.ones(3, bool))
    with pytest.raises(TypeError, match="Topology"):
        group(trace, 4, "random")
    with pytest.raises(ValueError, match="placement is for"):
        group(trace, topology, "signature", placement=place(trace, Topology(num_nodes=1, gpus_per_node=4), "contiguous"))
    with pytest.raises(ValueError, match="rounds"):
        group_and_place(trace, topology, rounds=-1)
    for other in (synthetic_trace(num_requests=8, num_experts=16), synthetic_trace(num_requests=8, num_layers=3)):
        with pytest.raises(ValueError, match=rf"trace has 2 layers x 32 experts, placement {other.num_layers} x "
                                             rf"{other.num_experts}"):  # a placement fitted on another model
            group(trace, topology, "signature", placement=place(other, topology, "contiguous"))


def test_group_and_place_finds_the_planted_optimum():
    trace = planted_trace(num_requests=32)
    topology = Topology(num_nodes=4, gpus_per_node=2)
    for init in ("domain", "signature", "random"):
        sources, placement = group_and_place(trace, topology, rounds=2, init=init, num_replicas=40)
        report = measure(trace, placement, topology, sources=sources, tokens=trace.phase == 1)
        assert report.inter_node_bytes == 0, init
