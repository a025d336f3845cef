"""The experiment protocol and the main job, on traces whose answer is known."""


import numpy as np
import pytest

from minimoe.placement.experiments import METHODS, compare, decode_index, drift, fit, masks, uniform_baseline
from minimoe.traces import planted_trace, synthetic_trace
from minimoe.placement import Topology
from minimoe.placement import measure


def test_decode_index_and_masks_partition_the_decode_tokens():
    trace = synthetic_trace(num_requests=6, tokens_per_request=10, prefill_fraction=0.4, seed=1)
    index = decode_index(trace)
    for q in range(trace.num_requests):  # brute force: count decode tokens of the request seen so far
        rows = np.flatnonzero(trace.request == q)
        expected = np.cumsum(trace.phase[rows] == 1) - 1
        expected[trace.phase[rows] != 1] = -1
        np.testing.assert_array_equal(index[rows], expected)
    sets = masks(trace, window=2)
    decode = trace.phase == 1
    assert not (sets["online"] & sets["eval"]).any()
    np.testing.assert_array_equal(sets["online"] | sets["eval"], decode)
    np.testing.assert_array_equal(sets["prefill"], trace.phase == 0)
    np.testing.assert_array_equal(sets["oracle"], sets["eval"])
    assert (sets["online"].sum()) == 2 * trace.num_requests


def test_masks_reject_traces_without_held_out_decode():
    trace = synthetic_trace(num_requests=4, tokens_per_request=8, prefill_fraction=0.5)
    with pytest.raises(ValueError, match="online window of 8"):
        masks(trace, window=8)
    prefill_only = trace.select(trace.phase == 0)
    with pytest.raises(ValueError, match="decode tokens"):
        masks(prefill_only)


def test_planted_structure_is_found_by_grouping_plus_locality():
    # each domain uses only its own 8 experts: one domain per node is free of inter-node traffic
    trace = planted_trace(num_domains=4, experts_per_domain=8, num_requests=64, tokens_per_request=24, top_k=4)
    topology = Topology(num_nodes=4, gpus_per_node=2)
    rows = {(r["fit"], r["method"]): r for r in compare(trace, topology, window=2)}
    for mode in ("prefill", "online", "oracle"):
        assert rows[(mode, "grouping+locality")]["inter_node_bytes"] == 0
        assert rows[(mode, "grouping+locality")]["cut_vs_contiguous"] == pytest.approx(1.0)
        assert rows[(mode, "grouping+locality")]["load_max_over_mean"] <= 1.25
    # placement alone puts each domain's experts together on one node (the one most of its randomly placed
    # requests sit on), so every token reaches a single node — but often a remote one
    locality = rows[("prefill", "locality")]
    assert 0 < locality["cut_vs_contiguous"] < 1
    assert 0.25 < locality["remote_nodes_per_token"] <= 0.75


def test_fit_returns_a_valid_placement_and_balanced_sources_for_every_method():
    trace = synthetic_trace(num_requests=32, tokens_per_request=16, num_experts=16, top_k=2, seed=3)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    fit_tokens = trace.phase == 0
    for method in METHODS:
        placement, sources = fit(trace, topology, method, fit_tokens, num_replicas=20)
        placement.validate()
        assert placement.num_slots == 20
        assert np.bincount(sources, minlength=4).tolist() == [8, 8, 8, 8], method
        report = measure(trace, placement, topology, sources=sources, tokens=trace.phase == 1)
        assert report.num_tokens == int((trace.phase == 1).sum())
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        fit(trace, topology, "magic", fit_tokens, 16)


def test_uniform_baseline_matches_the_formula():
    trace = synthetic_trace(num_experts=256, top_k=8, num_requests=2, tokens_per_request=4)
    out = uniform_baseline(trace, Topology(num_nodes=4, gpus_per_node=8))
    assert out["uniform_nodes_per_token"] == pytest.approx(3.614, abs=1e-3)
    assert out["uniform_remote_nodes_per_token"] == pytest.approx(3.614 * 3 / 4, abs=1e-3)


def test_drift_reports_every_method_against_both_baselines():
    trace = synthetic_trace(num_requests=64, tokens_per_request=16, num_domains=4, num_experts=16, top_k=2, seed=5)
    mix_a = {"domain0": 0.4, "domain1": 0.4, "domain2": 0.1, "domain3": 0.1}
    mix_b = {"domain0": 0.1, "domain1": 0.1, "domain2": 0.4, "domain3": 0.4}
    rows = {r["method"]: r for r in drift(trace, Topology(num_nodes=2, gpus_per_node=2), mix_a, mix_b)}
    assert set(rows) == {"contiguous", "eplb", "locality", "grouping+locality"}
    assert rows["contiguous"]["cut_vs_contiguous"] == 0 and rows["eplb"]["cut_vs_eplb"] == 0
    with pytest.raises(ValueError, match="domains"):
        drift(trace, Topology(num_nodes=2, gpus_per_node=2), {"code": 1.0}, mix_b)
