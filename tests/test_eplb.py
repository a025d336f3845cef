"""EPLB: DeepSeek's published README example exactly, plus invariants on random loads."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.placement.eplb import balanced_packing, eplb, eplb_numpy, replicate_experts

WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def check_consistent(phy2log, log2phy, logcnt, num_experts, num_replicas):
    phy2log, log2phy, logcnt = (np.asarray(a) for a in (phy2log, log2phy, logcnt))
    num_layers = phy2log.shape[0]
    assert phy2log.shape == (num_layers, num_replicas)
    assert log2phy.shape == (num_layers, num_experts, num_replicas - num_experts + 1)
    for layer in range(num_layers):
        counts = np.bincount(phy2log[layer], minlength=num_experts)
        np.testing.assert_array_equal(counts, logcnt[layer])
        assert (counts >= 1).all()
        for expert in range(num_experts):
            slots = log2phy[layer, expert]
            listed = slots[slots >= 0]
            assert len(listed) == counts[expert] and (slots[len(listed):] == -1).all()  # -1 only pads
            assert sorted(listed) == sorted(np.flatnonzero(phy2log[layer] == expert))


def test_published_example_exact():
    phy2log, log2phy, logcnt = eplb(torch.tensor(WEIGHT), num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert phy2log.tolist() == PHY2LOG
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    check_consistent(phy2log, log2phy, logcnt, 12, 16)
    # the heaviest experts got the copies (README figure): layer 0 replicates 1, 4, 5, 10
    assert np.flatnonzero(logcnt[0].numpy() == 2).tolist() == [1, 4, 5, 10]


def test_numpy_input_and_global_policy_fallback():
    phy2log, _, _ = eplb(np.array(WEIGHT, dtype=float), 16, 4, 2, 8)
    assert phy2log.tolist() == PHY2LOG
    # 3 groups do not divide over 2 nodes -> global policy == one group on one node
    a = eplb_numpy(WEIGHT, 16, 3, 2, 8)
    b = eplb_numpy(WEIGHT, 16, 1, 1, 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.sampled_from([1, 2, 4]), nodes=st.sampled_from([1, 2, 4]),
       gpus_per_node=st.sampled_from([1, 2]), extra=st.integers(0, 3))
def test_random_loads_valid_and_balanced(seed, groups, nodes, gpus_per_node, extra):
    rng = np.random.default_rng(seed)
    num_gpus = nodes * gpus_per_node
    num_experts = 8
    num_replicas = (2 + extra) * num_gpus if 2 * num_gpus >= num_experts else 8
    num_replicas = max(num_replicas, ((num_experts + num_gpus - 1) // num_gpus) * num_gpus)
    weight = rng.gamma(0.7, 10, size=(3, num_experts))
    phy2log, log2phy, logcnt = eplb_numpy(weight, num_replicas, groups, nodes, num_gpus)
    check_consistent(phy2log, log2phy, logcnt, num_experts, num_replicas)
    slots_per_gpu = num_replicas // num_gpus
    for layer in range(3):
        per_slot = weight[layer, phy2log[layer]] / logcnt[layer, phy2log[layer]]
        gpu_load = per_slot.reshape(num_gpus, slots_per_gpu).sum(1)
        # greedy packing bound: no GPU exceeds its node's mean by more than the heaviest slot (the global
        # policy is a single node; the hierarchical one balances nodes only at group granularity)
        packed_nodes = nodes if groups % nodes == 0 else 1
        per_node = gpu_load.reshape(packed_nodes, -1)
        assert (per_node.max(1) <= per_node.mean(1) + per_slot.max() + 1e-9).all()
        assert gpu_load.sum() == pytest.approx(weight[layer].sum())


def test_building_blocks():
    pack, rank = balanced_packing(np.array([[5.0, 1, 4, 2, 3, 3]]), 2)
    loads = np.bincount(pack[0], weights=[5, 1, 4, 2, 3, 3])
    assert sorted(np.bincount(pack[0])) == [3, 3] and sorted(loads) == [9, 9]
    for p in range(2):
        assert sorted(rank[0, pack[0] == p]) == [0, 1, 2]
    slot2log, replica_rank, count = replicate_experts(np.array([[10.0, 1, 4]]), 6)
    # copies go to the largest load per replica: 10 -> 10/2=5 -> 4 -> 10/3=3.33
    assert slot2log[0].tolist() == [0, 1, 2, 0, 0, 2]
    assert replica_rank[0].tolist() == [0, 0, 0, 1, 2, 1]
    assert count[0].tolist() == [3, 1, 2]


@pytest.mark.parametrize("args, message", [
    ((16, 5, 2, 8), "num_groups=5 does not divide"),
    ((16, 4, 3, 8), "num_nodes=3 does not divide"),
    ((12, 4, 2, 8), "not a multiple of num_gpus"),
    ((8, 4, 2, 8), "< num_experts"),
    ((0, 4, 2, 8), "num_replicas must be a positive integer"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        eplb_numpy(WEIGHT, *args)


def test_bad_weight():
    with pytest.raises(ValueError, match="2-D"):
        eplb_numpy([1.0, 2.0], 2, 1, 1, 1)
    with pytest.raises(ValueError, match="non-negative"):
        eplb_numpy([[1.0, -2.0]], 2, 1, 1, 1)
