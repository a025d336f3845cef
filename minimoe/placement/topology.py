"""The shape of an expert-parallel cluster: nodes, GPUs per node, expert slots, and links.

Expert parallelism (EP) spreads a MoE layer's experts over ``G = num_nodes * gpus_per_node`` GPUs.
GPU (rank) ``r`` lives on node ``r // gpus_per_node``; ranks are numbered node by node, the way
``torchrun`` numbers them. Every GPU holds the same number of *physical expert slots* per layer; a slot
holds one logical expert, and an expert may hold several slots (replicas).

Two link classes matter for the all-to-all of dispatch/combine:

* **intra-node** (NVLink/NVSwitch): H100/H200 SXM have 18 NVLink-4 links of 25 GB/s per direction,
  i.e. 450 GB/s per GPU per direction (NVIDIA's "900 GB/s bidirectional" [nvidia2024h200]). One-hop latency
  is of the order of 1–2 µs.
* **inter-node** (RDMA): one 400 Gb/s InfiniBand NDR (ConnectX-7) NIC per GPU, as in DGX/HGX H100/H200
  [nvidia2023dgxh100], i.e. 50 GB/s per GPU per direction; end-to-end RDMA latency a few µs.

These are the defaults below (bytes per second, seconds). They are data-sheet peaks: measured NCCL
all-to-all between two H200s reached 324.1 GB/s at 1 GiB and 10.4 GB/s at 1 MiB per rank
(benchmarks/results/alltoall_nccl_h200x2.txt [minimoe2026alltoall]; keys of book/references.bib), so
the time model in ``minimoe.placement.traffic`` is a cross-check, not a prediction.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

NVLINK4_BYTES_PER_S = 450e9  # per GPU per direction: 18 links x 25 GB/s (H100/H200 SXM)
IB_NDR_BYTES_PER_S = 50e9  # one 400 Gb/s NDR NIC per GPU = 50 GB/s per direction
NVLINK_LATENCY_S = 2e-6  # order of magnitude of an NVLink/NVSwitch hop incl. kernel-side overhead
RDMA_LATENCY_S = 5e-6  # order of magnitude of an InfiniBand RDMA write across one switch


def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def _check_latency(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class Topology:
    """``num_nodes`` nodes of ``gpus_per_node`` GPUs each, with per-GPU link bandwidths and latencies.

    ``slots_per_gpu``: physical expert slots per GPU per layer; ``None`` leaves the choice to the
    placement (``num_replicas // num_gpus``). Bandwidths are bytes/s per GPU per direction.
    """

    num_nodes: int
    gpus_per_node: int
    slots_per_gpu: int | None = None
    intra_node_bandwidth: float = NVLINK4_BYTES_PER_S
    inter_node_bandwidth: float = IB_NDR_BYTES_PER_S
    intra_node_latency: float = NVLINK_LATENCY_S
    inter_node_latency: float = RDMA_LATENCY_S

    def __post_init__(self):
        object.__setattr__(self, "num_nodes", _check_count("num_nodes", self.num_nodes))
        object.__setattr__(self, "gpus_per_node", _check_count("gpus_per_node", self.gpus_per_node))
        if self.slots_per_gpu is not None:
            object.__setattr__(self, "slots_per_gpu", _check_count("slots_per_gpu", self.slots_per_gpu))
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            object.__setattr__(self, name, _check_positive(name, getattr(self, name)))
        for name in ("intra_node_latency", "inter_node_latency"):
            object.__setattr__(self, name, _check_latency(name, getattr(self, name)))

    @classmethod
    def from_num_gpus(cls, num_gpus: int, gpus_per_node: int, **links) -> "Topology":
        """Build from a total GPU count; it must be a multiple of ``gpus_per_node``."""
        num_gpus = _check_count("num_gpus", num_gpus)
        gpus_per_node = _check_count("gpus_per_node", gpus_per_node)
        if num_gpus % gpus_per_node:
            raise ValueError(
                f"num_gpus={num_gpus} is not a multiple of gpus_per_node={gpus_per_node}: "
                "the GPUs do not divide into equal nodes")
        return cls(num_nodes=num_gpus // gpus_per_node, gpus_per_node=gpus_per_node, **links)

    @classmethod
    def parse(cls, text: str, **links) -> "Topology":
        """``"4x2"`` -> 4 nodes of 2 GPUs. Raises ValueError naming the text and the expected form."""
        parts = str(text).strip().lower().split("x")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError(f"topology {text!r} is not of the form NODESxGPUS, e.g. 4x2 (4 nodes of 2 GPUs)")
        nodes, gpus = int(parts[0]), int(parts[1])
        if nodes < 1 or gpus < 1:
            raise ValueError(f"topology {text!r} needs at least 1 node and 1 GPU per node")
        return cls(num_nodes=nodes, gpus_per_node=gpus, **links)

    def fits(self, num_experts: int) -> str | None:
        """None if ``num_experts`` experts fill this topology's GPUs evenly (no replicas), else the reason."""
        if num_experts % self.num_gpus:
            return (f"{self} has {self.num_gpus} GPUs, which cannot hold {num_experts} experts evenly "
                    f"(num_experts must be a multiple of nodes x GPUs per node)")
        return None

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of(self, rank):
        """Node index of a GPU rank (int or integer array)."""
        ranks = np.asarray(rank)
        if not np.issubdtype(ranks.dtype, np.integer):
            raise TypeError(f"rank must be integer, got dtype {ranks.dtype}")
        if ranks.size and (ranks.min() < 0 or ranks.max() >= self.num_gpus):
            raise ValueError(f"rank out of range [0, {self.num_gpus}): got {ranks.min()}..{ranks.max()}")
        nodes = ranks // self.gpus_per_node
        return int(nodes) if nodes.ndim == 0 else nodes

    def ranks_of_node(self, node: int) -> np.ndarray:
        """The GPU ranks of one node, in order."""
        if not 0 <= int(node) < self.num_nodes:
            raise ValueError(f"node must be in [0, {self.num_nodes}), got {node}")
        return np.arange(node * self.gpus_per_node, (node + 1) * self.gpus_per_node)

    def request_ranks(self, num_requests: int, sources=None) -> np.ndarray:
        """GPU rank of every request, int64 (num_requests,): ``sources`` checked, or round-robin
        ``request % num_gpus`` when it is None (the default data-parallel spread)."""
        if sources is None:
            return np.arange(num_requests) % self.num_gpus
        sources = np.asarray(sources)
        if sources.ndim != 1 or sources.dtype.kind not in "iu" or len(sources) < num_requests:
            raise ValueError(f"sources must be a 1-d integer array with one GPU rank per request "
                             f"({num_requests}), got dtype {sources.dtype} shape {sources.shape}")
        if sources.size and (sources.min() < 0 or sources.max() >= self.num_gpus):
            raise ValueError(f"sources must be GPU ranks in [0, {self.num_gpus}), "
                             f"got range [{sources.min()}, {sources.max()}]")
        return sources.astype(np.int64)

    def num_slots(self, num_replicas: int | None = None, num_experts: int | None = None) -> int:
        """Physical slots per layer, checked against this topology.

        ``num_replicas`` wins when given (and must agree with ``slots_per_gpu`` if that is set);
        otherwise ``slots_per_gpu * num_gpus``; otherwise ``num_experts`` (no replicas).
        """
        if num_replicas is None:
            if self.slots_per_gpu is not None:
                num_replicas = self.slots_per_gpu * self.num_gpus
            elif num_experts is not None:
                num_replicas = num_experts
            else:
                raise ValueError("num_slots needs num_replicas, slots_per_gpu or num_experts")
        num_replicas = _check_count("num_replicas", num_replicas)
        if num_replicas % self.num_gpus:
            raise ValueError(
                f"num_replicas={num_replicas} is not a multiple of num_gpus={self.num_gpus} "
                f"({self.num_nodes} nodes x {self.gpus_per_node} GPUs): every GPU needs the same slot count")
        if self.slots_per_gpu is not None and num_replicas != self.slots_per_gpu * self.num_gpus:
            raise ValueError(
                f"num_replicas={num_replicas} disagrees with slots_per_gpu={self.slots_per_gpu} x "
                f"num_gpus={self.num_gpus} = {self.slots_per_gpu * self.num_gpus}")
        if num_experts is not None and num_replicas < num_experts:
            raise ValueError(
                f"num_replicas={num_replicas} physical slots cannot hold num_experts={num_experts} experts: "
                f"need at least {num_experts} (a multiple of num_gpus={self.num_gpus})")
        return num_replicas

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Topology":
        if not isinstance(data, dict):
            raise TypeError(f"Topology.from_dict expects a dict, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Topology fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**data)

    def __str__(self) -> str:
        return f"{self.num_nodes}x{self.gpus_per_node}"
