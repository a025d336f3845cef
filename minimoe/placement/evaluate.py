"""Pass 2: the exact all-to-all traffic of many placements, counted in one pass over the evaluated tokens.

``minimoe.placement.traffic.measure`` counts one placement on an in-memory trace and fills every field of a
``TrafficReport``. A report over a trace larger than memory measures dozens of (placement, request sources)
pairs on the same held-out tokens, so this module reads each batch once and counts, for every ``Job``,
only what the report prints, as integers that add up across batches and workers (``Counts``):

    pairs, GPU-local pairs, node-local pairs            per (token, expert) pair, per layer
    remote GPUs, remote nodes, NVLink hops              de-duplicated per token, per layer
    (token, expert) pairs per GPU                       (L, G): the load balance

Routing is ``Placement.route``'s: the nearest replica, ties by ``token_index % count``. The distinct GPUs a
token reaches are the set bits of one 64-bit word (OR of ``1 << gpu`` over its experts), so de-duplication
is a bitwise OR and a popcount, not a sort (up to 64 GPUs; beyond that the counts come from
``traffic._count_layer``). With ``entry`` = the GPU of the token's rank on another node (where RDMA lands)
and ``src`` its own GPU, the NVLink hops of ``measure`` are the reached GPUs other than ``src`` that are on
``src``'s node or are not an entry GPU: ``popcount(bits & ~(1 << src) & (same_node | ~entries))``.
``Counts.summary`` turns the integers into the fields of ``TrafficReport`` by the same formulas as
``measure``, so both give the same floats (tests/test_streaming.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minimoe.placement.phy2log import Placement
from minimoe.placement.rows import row_or
from minimoe.placement.traffic import _count_layer, _token_bytes

_ONE = np.uint64(1)
_COUNTS = ("pairs", "gpu_local_pairs", "node_local_pairs", "remote_ranks", "remote_nodes", "nvlink_hops")


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    table = np.array([bin(v).count("1") for v in range(256)], np.uint8)
    return table[values.view(np.uint8).reshape(len(values), 8)].sum(axis=1)


@dataclass(eq=False)
class Job:
    """One placement with its request sources, measured on the tokens of the given classes (of
    ``minimoe.traces.stats``; 2 = held-out decode) of the given requests (bool (R,), None = all)."""

    placement: Placement
    sources: np.ndarray          # int (R,) source GPU of every request
    classes: tuple = (2,)
    requests: np.ndarray | None = None

    def key(self) -> bytes:
        """Jobs with the same key count the same traffic (so are counted once)."""
        mask = b"" if self.requests is None else np.packbits(self.requests).tobytes()
        return b"|".join([self.placement.phy2log.tobytes(), str(self.placement.topology).encode(),
                          np.asarray(self.sources, np.int64).tobytes(), bytes(self.classes), mask])


@dataclass(eq=False)
class Counts:
    """The integers of one job, summed over batches; ``+`` merges two parts."""

    num_layers: int
    num_gpus: int
    tokens: int = 0
    per_layer: dict = field(default_factory=dict)  # name -> int64 (L,); "tokens_per_rank" -> (L, G)

    def __post_init__(self):
        for name in _COUNTS:
            self.per_layer.setdefault(name, np.zeros(self.num_layers, np.int64))
        self.per_layer.setdefault("tokens_per_rank", np.zeros((self.num_layers, self.num_gpus), np.int64))

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.num_layers, self.num_gpus, self.tokens + other.tokens,
                      {name: self.per_layer[name] + other.per_layer[name] for name in self.per_layer})

    def summary(self, hidden_size: int = 7168, bytes_per_element: float = 2,
                combine_bytes_per_element: float = 2) -> dict:
        """The TrafficReport fields the experiments read, by ``measure``'s formulas."""
        dispatch, combine = _token_bytes(hidden_size, bytes_per_element, combine_bytes_per_element)
        token_bytes = dispatch + combine
        pl = {name: value.astype(np.float64) for name, value in self.per_layer.items()}
        total_pairs = pl["pairs"].sum()
        load = pl["tokens_per_rank"]
        with np.errstate(invalid="ignore", divide="ignore"):
            balance = load.max(1) / load.mean(1)
            ratio = (lambda a: float(a.sum() / total_pairs)) if total_pairs else (lambda a: float("nan"))
        per_token = max(self.tokens * self.num_layers, 1)
        return dict(num_tokens=self.tokens, pairs=int(total_pairs),
                    inter_node_bytes=float((pl["remote_nodes"] * token_bytes).sum()),
                    intra_node_bytes=float((pl["nvlink_hops"] * token_bytes).sum()),
                    dedup_rank_bytes=float((pl["remote_ranks"] * token_bytes).sum()),
                    pair_bytes_inter=float(((pl["pairs"] - pl["node_local_pairs"]) * token_bytes).sum()),
                    pair_bytes_intra=float(((pl["node_local_pairs"] - pl["gpu_local_pairs"]) * token_bytes).sum()),
                    remote_nodes_per_token=float(pl["remote_nodes"].sum() / per_token),
                    remote_ranks_per_token=float(pl["remote_ranks"].sum() / per_token),
                    pair_gpu_local_fraction=ratio(pl["gpu_local_pairs"]),
                    pair_node_local_fraction=ratio(pl["node_local_pairs"]),
                    load_max_over_mean=float(np.mean(balance)), load_max_over_mean_worst=float(np.max(balance)))


class _Tables:
    """Per layer: the GPU serving (source GPU, expert, token_index % count), and the bit masks of a topology."""

    def __init__(self, placement: Placement):
        topology = placement.topology
        self.num_gpus, self.per_node, self.num_nodes = topology.num_gpus, topology.gpus_per_node, topology.num_nodes
        self.bits = self.num_gpus <= 64
        self.layers = []
        for layer in range(placement.num_layers):
            cand, count = placement.candidate_table(layer)  # (G, E, maxcnt) slots, (G, E)
            gpu = np.where(cand >= 0, placement.gpu_of_slot[np.maximum(cand, 0)], 0)  # (G, E, maxcnt)
            if (count == 1).all() and (gpu[:, :, 0] == gpu[:1, :, 0]).all():
                self.layers.append((gpu[0, :, 0], None, None))  # one GPU per expert, whatever the source
            else:
                self.layers.append((gpu.reshape(-1), count.reshape(-1), gpu.shape[2]))
        gpus = np.arange(self.num_gpus)
        node = gpus // self.per_node
        if self.bits:
            word = np.left_shift(_ONE, gpus.astype(np.uint64))  # (G,) 1 << gpu
            self.node_mask = np.array([np.bitwise_or.reduce(word[node == n]) for n in range(self.num_nodes)],
                                      np.uint64)  # (N,)
            entries = np.array([np.bitwise_or.reduce(word[gpus % self.per_node == g % self.per_node])
                                for g in gpus], np.uint64)  # (G,) the GPUs RDMA lands on for source g
            self.hop_mask = ~word & (self.node_mask[node] | ~entries)  # (G,)

    def ranks(self, layer: int, experts: np.ndarray, source: np.ndarray, token_index: np.ndarray) -> np.ndarray:
        """(T, k) GPU serving every (token, expert); experts must be >= 0."""
        table, count, width = self.layers[layer]
        if count is None:
            return table[experts]
        key = source[:, None] * (len(table) // (self.num_gpus * width)) + experts  # (T, k) flat (src, e)
        return table[key * width + token_index[:, None] % count[key]]

    def count(self, layer: int, experts: np.ndarray, source: np.ndarray, token_index: np.ndarray, out: dict):
        """Add one layer's counts of a chunk of tokens (experts (T, k) int64, -1 = none) into ``out``."""
        valid = experts >= 0
        every = bool(valid.all())
        rank = self.ranks(layer, np.maximum(experts, 0), source, token_index)  # (T, k)
        if not every:
            rank = np.where(valid, rank, source[:, None])  # invalid -> local: counted nowhere below
        src_node = source // self.per_node
        rank_node = rank // self.per_node
        pairs = int(valid.sum())
        out["pairs"][layer] += pairs
        out["gpu_local_pairs"][layer] += int(((rank == source[:, None]) & valid).sum())
        out["node_local_pairs"][layer] += int(((rank_node == src_node[:, None]) & valid).sum())
        out["tokens_per_rank"][layer] += np.bincount(rank[valid] if not every else rank.ravel(),
                                                     minlength=self.num_gpus)
        if not self.bits:  # more than 64 GPUs: the sort-based counts of traffic.measure
            return
        words = np.left_shift(_ONE, rank.astype(np.uint64))
        if not every:
            words[~valid] = 0
        reached = row_or(words)  # (T,) the GPUs each token reaches
        own = np.left_shift(_ONE, source.astype(np.uint64))
        out["remote_ranks"][layer] += int(popcount(reached & ~own).sum())
        out["nvlink_hops"][layer] += int(popcount(reached & self.hop_mask[source]).sum())
        nodes = sum((reached & mask) != 0 for mask in self.node_mask)  # (T,) nodes reached
        out["remote_nodes"][layer] += int(nodes.sum() - ((reached & self.node_mask[src_node]) != 0).sum())


def count_jobs(batch, token_class: np.ndarray, jobs: list[Job], tables: list[_Tables], chunk: int = 1 << 16):
    """Counts of every job on one batch (``minimoe.traces.batches.TraceBatch``); ``token_class`` (n,) its
    tokens' classes, ``tables`` = ``[_Tables(job.placement) for job in jobs]``."""
    selections = {}
    results = []
    for job, table in zip(jobs, tables):
        key = (job.classes, None if job.requests is None else id(job.requests))
        if key not in selections:
            keep = np.isin(token_class, job.classes)
            if job.requests is not None:
                keep &= job.requests[batch.request]
            selections[key] = np.flatnonzero(keep)
        rows = selections[key]
        counts = Counts(job.placement.num_layers, job.placement.num_gpus, tokens=len(rows))
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            source = np.asarray(job.sources, np.int64)[batch.request[part]]
            token_index = batch.start + part.astype(np.int64)
            for layer in range(job.placement.num_layers):
                experts = batch.experts[part, layer].astype(np.int64)
                if table.bits:
                    table.count(layer, experts, source, token_index, counts.per_layer)
                else:
                    exact = _count_layer(job.placement, layer, experts, source, token_index,
                                         job.placement.topology)
                    for name in _COUNTS:
                        counts.per_layer[name][layer] += int(exact[name])
                    counts.per_layer["tokens_per_rank"][layer] += exact["tokens_per_rank"]
        results.append(counts)
    return results
