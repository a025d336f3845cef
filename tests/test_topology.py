import numpy as np
import pytest

from minimoe.placement import Topology


def test_shape_and_ranks():
    topology = Topology(num_nodes=4, gpus_per_node=2)
    assert topology.num_gpus == 8 and str(topology) == "4x2"
    assert [topology.node_of(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(topology.node_of(np.arange(8)), np.arange(8) // 2)
    np.testing.assert_array_equal(topology.ranks_of_node(2), [4, 5])
    assert Topology.from_num_gpus(16, 8) == Topology(num_nodes=2, gpus_per_node=8)


def test_defaults_are_documented_hardware_numbers():
    topology = Topology(num_nodes=2, gpus_per_node=8)
    assert topology.intra_node_bandwidth == 450e9  # NVLink 4: 18 links x 25 GB/s per direction
    assert topology.inter_node_bandwidth == 50e9  # 400 Gb/s InfiniBand NDR per GPU
    assert 0 < topology.intra_node_latency < topology.inter_node_latency


def test_num_slots():
    topology = Topology(num_nodes=2, gpus_per_node=2)
    assert topology.num_slots(num_experts=8) == 8
    assert topology.num_slots(12, num_experts=8) == 12
    assert Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3).num_slots(num_experts=8) == 12
    with pytest.raises(ValueError, match="not a multiple of num_gpus=4"):
        topology.num_slots(10, num_experts=8)
    with pytest.raises(ValueError, match="cannot hold num_experts=8"):
        topology.num_slots(4, num_experts=8)
    with pytest.raises(ValueError, match="not a multiple of num_gpus=4"):
        topology.num_slots(num_experts=6)  # default (no replicas) must divide too
    with pytest.raises(ValueError, match="disagrees with slots_per_gpu"):
        Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3).num_slots(8, num_experts=8)


@pytest.mark.parametrize("text", ["4x", "x2", "4x2x1", "4*2", "\u0664x2", "4x\u00b2", "-1x2"])
def test_parse_refuses_anything_but_two_ascii_counts(text):
    with pytest.raises(ValueError, match="is not of the form NODESxGPUS"):
        Topology.parse(text)


def test_dict_round_trip():
    topology = Topology(num_nodes=3, gpus_per_node=4, slots_per_gpu=2, inter_node_bandwidth=25e9)
    assert Topology.from_dict(topology.to_dict()) == topology
    with pytest.raises(ValueError, match="unknown Topology fields"):
        Topology.from_dict({"num_nodes": 1, "gpus_per_node": 1, "nvlink": 3})


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_nodes=0, gpus_per_node=2), ValueError, "num_nodes must be >= 1"),
    (dict(num_nodes=2, gpus_per_node=-1), ValueError, "gpus_per_node must be >= 1"),
    (dict(num_nodes=2.0, gpus_per_node=2), TypeError, "num_nodes must be an integer"),
    (dict(num_nodes=True, gpus_per_node=2), TypeError, "num_nodes must be an integer"),
    (dict(num_nodes=2, gpus_per_node=2, slots_per_gpu=0), ValueError, "slots_per_gpu must be >= 1"),
    (dict(num_nodes=2, gpus_per_node=2, inter_node_bandwidth=0), ValueError, "inter_node_bandwidth must be positive"),
    (dict(num_nodes=2, gpus_per_node=2, intra_node_bandwidth=float("nan")), ValueError, "positive and finite"),
    (dict(num_nodes=2, gpus_per_node=2, inter_node_latency=-1e-6), ValueError, "inter_node_latency must be >= 0"),
])
def test_bad_topologies(kwargs, error, message):
    with pytest.raises(error, match=message):
        Topology(**kwargs)


def test_gpus_that_do_not_divide_into_nodes():
    with pytest.raises(ValueError, match="num_gpus=12 is not a multiple of gpus_per_node=8"):
        Topology.from_num_gpus(12, 8)


def test_bad_ranks():
    topology = Topology(num_nodes=2, gpus_per_node=2)
    with pytest.raises(ValueError, match=r"rank out of range \[0, 4\)"):
        topology.node_of(4)
    with pytest.raises(TypeError, match="rank must be integer"):
        topology.node_of(1.5)
    with pytest.raises(ValueError, match=r"node must be in \[0, 2\)"):
        topology.ranks_of_node(2)
