"""traffic.measure against a brute-force python count of the documented semantics, and the uniform baseline."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.placement import Placement
from minimoe.placement import Topology
from minimoe.traces import Trace
from minimoe.placement import measure, request_sources, uniform_nodes_per_token


def random_trace(rng, num_tokens, num_layers, num_experts, top_k, num_requests, holes=True):
    experts = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)])
                        for _ in range(num_tokens)]).astype(np.int16)
    if holes:  # some (token, layer) slots routed to fewer experts (-1)
        experts[rng.random(experts.shape) < 0.1] = -1
    cuts = np.sort(rng.choice(np.arange(1, num_tokens), num_requests - 1, replace=False))
    request = np.zeros(num_tokens, np.int32)
    request[cuts] = 1
    request = np.cumsum(request).astype(np.int32)
    return Trace(experts=experts, request=request, phase=rng.integers(0, 2, num_tokens).astype(np.int8),
                 domain=None, num_experts=num_experts, top_k=top_k)


def random_placement(rng, num_layers, num_experts, topology, num_slots):
    table = []
    for _ in range(num_layers):
        slots = np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, num_slots - num_experts)])
        table.append(rng.permutation(slots))
    return Placement(np.array(table), num_experts, topology.num_nodes, topology.gpus_per_node)


def brute_force(trace, placement, topology, sources, hidden, bpe, combine_bpe, rows):
    """Independent, loop-by-loop reading of the semantics in minimoe/traffic.py's docstring."""
    G, per_node, N = topology.num_gpus, topology.gpus_per_node, topology.num_nodes
    spg = placement.num_slots // G
    scales = hidden / 128 * 4 if bpe == 1 else 0
    token_bytes = hidden * bpe + scales + hidden * combine_bpe
    out = dict(pairs=0, gpu_local=0, node_local=0, inter_pairs=0, intra_pairs=0, remote_ranks=0, remote_nodes=0,
               nodes_touched=0, nvlink=0, time=0.0)
    rank_matrix, node_matrix = np.zeros((G, G)), np.zeros((N, N))
    lmm, jain = [], []
    for layer in range(placement.num_layers):
        load = [0] * G
        rdma_out, rdma_in, nvl_out, nvl_in = [0] * G, [0] * G, [0] * G, [0] * G
        for t in rows:
            src = int(sources[trace.request[t]])
            dests = set()
            for e in trace.experts[t, layer]:
                if e < 0:
                    continue
                slots = [s for s in range(placement.num_slots) if placement.phy2log[layer, s] == e]
                dist = [0 if s // spg == src else (1 if s // spg // per_node == src // per_node else 2) for s in slots]
                best = [s for s, d in zip(slots, dist) if d == min(dist)]
                gpu = best[t % len(best)] // spg
                out["pairs"] += 1
                out["gpu_local"] += gpu == src
                out["node_local"] += gpu // per_node == src // per_node
                out["intra_pairs"] += gpu != src and gpu // per_node == src // per_node
                out["inter_pairs"] += gpu // per_node != src // per_node
                load[gpu] += 1
                dests.add(gpu)
            out["nodes_touched"] += len({d // per_node for d in dests})
            remote = dests - {src}
            out["remote_ranks"] += len(remote)
            for d in remote:
                rank_matrix[src, d] += token_bytes
            remote_nodes = {d // per_node for d in remote} - {src // per_node}
            out["remote_nodes"] += len(remote_nodes)
            for n in remote_nodes:
                node_matrix[src // per_node, n] += token_bytes
                entry = n * per_node + src % per_node
                rdma_out[src] += 1
                rdma_in[entry] += 1
            for d in remote:
                if d // per_node == src // per_node:
                    hop = (src, d)
                else:
                    entry = d // per_node * per_node + src % per_node
                    hop = None if d == entry else (entry, d)
                if hop:
                    out["nvlink"] += 1
                    node_matrix[d // per_node, d // per_node] += token_bytes
                    nvl_out[hop[0]] += 1
                    nvl_in[hop[1]] += 1
        mean = sum(load) / G
        lmm.append(max(load) / mean)
        jain.append(sum(load) ** 2 / (G * sum(x * x for x in load)))
        for size in (hidden * bpe + scales, hidden * combine_bpe):
            for o, i, bw, lat in ((rdma_out, rdma_in, topology.inter_node_bandwidth, topology.inter_node_latency),
                                  (nvl_out, nvl_in, topology.intra_node_bandwidth, topology.intra_node_latency)):
                busiest = max(max(o), max(i))
                out["time"] += (lat + busiest * size / bw) if busiest else 0.0
    out.update(rank_matrix=rank_matrix, node_matrix=node_matrix, lmm=lmm, jain=jain, token_bytes=token_bytes)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from([(1, 1), (1, 3), (2, 2), (3, 2), (2, 3)]),
       extra_slots=st.integers(0, 2), use_sources=st.booleans(), fp8=st.booleans(), masked=st.booleans())
def test_measure_equals_brute_force(seed, shape, extra_slots, use_sources, fp8, masked):
    rng = np.random.default_rng(seed)
    topology = Topology(num_nodes=shape[0], gpus_per_node=shape[1], inter_node_latency=3e-6)
    num_experts = int(rng.integers(max(2, topology.num_gpus // 2), 12))
    num_slots = (math.ceil(num_experts / topology.num_gpus) + extra_slots) * topology.num_gpus
    top_k = int(rng.integers(1, min(4, num_experts) + 1))
    trace = random_trace(rng, 40, 2, num_experts, top_k, num_requests=int(rng.integers(1, 8)))
    placement = random_placement(rng, 2, num_experts, topology, num_slots)
    sources = rng.integers(0, topology.num_gpus, trace.num_requests) if use_sources else None
    tokens = rng.random(trace.num_tokens) < 0.7 if masked else None
    hidden, bpe = 256, (1 if fp8 else 2)
    report = measure(trace, placement, topology, sources=sources, hidden_size=hidden, bytes_per_element=bpe,
                     tokens=tokens, chunk_tokens=7)  # small chunks exercise the chunked accumulation
    rows = np.arange(trace.num_tokens) if tokens is None else np.flatnonzero(tokens)
    src = np.arange(trace.num_requests) % topology.num_gpus if sources is None else sources
    ref = brute_force(trace, placement, topology, src, hidden, bpe, 2, rows)
    tb, per_token = ref["token_bytes"], len(rows) * placement.num_layers
    assert report.bytes_per_token == tb
    assert report.pairs == ref["pairs"]
    assert report.pair_gpu_local_fraction == pytest.approx(ref["gpu_local"] / ref["pairs"])
    assert report.pair_node_local_fraction == pytest.approx(ref["node_local"] / ref["pairs"])
    assert report.inter_node_pairs_per_token == pytest.approx(ref["inter_pairs"] / per_token)
    assert report.remote_ranks_per_token == pytest.approx(ref["remote_ranks"] / per_token)
    assert report.remote_nodes_per_token == pytest.approx(ref["remote_nodes"] / per_token)
    assert report.nodes_per_token == pytest.approx(ref["nodes_touched"] / per_token)
    assert report.dedup_rank_bytes == pytest.approx(ref["remote_ranks"] * tb)
    assert report.inter_node_bytes == pytest.approx(ref["remote_nodes"] * tb)
    assert report.dedup_node_bytes == report.inter_node_bytes
    assert report.intra_node_bytes == pytest.approx(ref["nvlink"] * tb)
    assert report.pair_bytes_intra == pytest.approx(ref["intra_pairs"] * tb)
    assert report.pair_bytes_inter == pytest.approx(ref["inter_pairs"] * tb)
    # every token to every other GPU and back (the replicate exchange), whatever its routing
    gpn, num_gpus = topology.gpus_per_node, topology.num_gpus
    assert report.replicate_bytes_intra == per_token * (gpn - 1) * tb
    assert report.replicate_bytes_inter == per_token * (num_gpus - gpn) * tb
    np.testing.assert_allclose(report.rank_matrix, ref["rank_matrix"])
    np.testing.assert_allclose(report.node_matrix, ref["node_matrix"])
    assert report.load_max_over_mean == pytest.approx(np.mean(ref["lmm"]))
    assert report.load_max_over_mean_worst == pytest.approx(np.max(ref["lmm"]))
    assert report.jain_index == pytest.approx(np.mean(ref["jain"]))
    sent = ref["rank_matrix"].sum(1)
    assert report.busiest_sender == int(np.argmax(sent))
    assert report.busiest_sender_bytes == pytest.approx(sent.max())
    assert report.time_s == pytest.approx(ref["time"])
    starts = np.bincount([src[trace.request[t]] for t in rows], minlength=topology.num_gpus)
    np.testing.assert_array_equal(report.source_tokens_per_rank, starts)
    if len(rows):
        assert report.source_max_over_mean == pytest.approx(starts.max() / starts.mean())
    # identities between views
    assert report.node_matrix.sum() == pytest.approx(report.intra_node_bytes + report.inter_node_bytes)
    assert report.rank_matrix.sum() == pytest.approx(report.dedup_rank_bytes)
    assert report.per_layer["inter_node_bytes"].sum() == pytest.approx(report.inter_node_bytes)
    totals = report.as_dict()
    assert totals["inter_node_bytes"] == report.inter_node_bytes and "rank_matrix" not in totals


def test_uniform_baseline_published_numbers():
    assert [round(uniform_nodes_per_token(256, 8, g), 3) for g in (2, 4, 8)] == [1.993, 3.614, 5.295]
    assert uniform_nodes_per_token(16, 1, 4) == pytest.approx(1.0)
    assert uniform_nodes_per_token(8, 8, 4) == pytest.approx(4.0)


def test_uniform_baseline_matches_simulation():
    rng = np.random.default_rng(0)
    num_experts, top_k, num_nodes = 24, 3, 4
    picks = np.argsort(rng.random((20000, num_experts)), axis=1)[:, :top_k]
    distinct = np.mean([len(set(row)) for row in (picks * num_nodes // num_experts)])
    assert distinct == pytest.approx(uniform_nodes_per_token(num_experts, top_k, num_nodes), abs=0.02)


def test_fully_local_and_fully_remote_cases():
    topology = Topology(num_nodes=2, gpus_per_node=1)
    trace = Trace(experts=np.array([[[0, 1]], [[2, 3]]], np.int16), request=np.array([0, 1], np.int32),
                  phase=np.zeros(2, np.int8), domain=None, num_experts=4, top_k=2)
    placement = Placement(np.array([[0, 1, 2, 3]]), 4, 2, 1)  # experts 0,1 on node 0; 2,3 on node 1
    local = measure(trace, placement, topology, sources=np.array([0, 1]), hidden_size=10)
    assert local.inter_node_bytes == 0 and local.pair_gpu_local_fraction == 1 and local.time_s == 0
    remote = measure(trace, placement, topology, sources=np.array([1, 0]), hidden_size=10)
    assert remote.inter_node_bytes == 2 * 40 and remote.pair_bytes_inter == 4 * 40
    assert remote.remote_nodes_per_token == 1 and remote.inter_node_pairs_per_token == 2
    np.testing.assert_array_equal(remote.node_matrix, [[0, 40], [40, 0]])


def test_bad_inputs():
    topology = Topology(num_nodes=2, gpus_per_node=2)
    rng = np.random.default_rng(0)
    trace = random_trace(rng, 10, 1, 8, 2, 3)
    placement = Placement(np.arange(8)[None], 8, 2, 2)
    with pytest.raises(ValueError, match="GPU ranks"):
        measure(trace, placement, topology, sources=np.array([0, 1, 4]))
    with pytest.raises(ValueError, match="one GPU rank per request"):
        measure(trace, placement, topology, sources=np.array([0, 1]))
    with pytest.raises(ValueError, match="placement is for"):
        measure(trace, placement, Topology(num_nodes=1, gpus_per_node=4))
    with pytest.raises(ValueError, match="hidden_size"):
        measure(trace, placement, topology, hidden_size=0)
    for value in (float("nan"), float("inf"), -1):  # never a report of NaN or infinite bytes
        with pytest.raises(ValueError, match=f"bytes_per_element must be a positive finite number, got {value}"):
            measure(trace, placement, topology, bytes_per_element=value)
    with pytest.raises(ValueError, match="chunk_tokens must be a whole number >= 1, got 0"):
        measure(trace, placement, topology, chunk_tokens=0)
    with pytest.raises(ValueError, match="layers"):
        measure(trace, Placement(np.arange(8)[None].repeat(2, 0), 8, 2, 2), topology)
    with pytest.raises(TypeError, match="Placement"):
        measure(trace, np.arange(8), topology)
    with pytest.raises(ValueError, match="bool mask"):
        measure(trace, placement, topology, tokens=np.ones(3, bool))
    assert list(request_sources(trace, topology)) == [0, 1, 2]
