"""All-to-all traffic of expert parallelism, counted on a trace (per (token, expert) and per destination node, as
DeepEP's low-latency and normal kernels send it [deepseek2025deepep]; keys of book/references.bib).

For MoE layer ``l`` every token ``t`` starts on its source GPU ``src(t)`` (the GPU its request was
grouped onto) and is sent to the GPUs holding its ``k`` experts; each (token, expert) *pair* is served
by the replica ``Placement.route`` picks (nearest first, ties by ``token_index % count``, where the token
index is the token's row in the trace). With ``node(r) = r // gpus_per_node``:

* **pair locality**: fractions of pairs served on ``src`` (GPU-local) / on ``node(src)`` (node-local);
  inter-node pairs per token.
* **per-pair bytes** (low-latency kernels send one copy per pair): ``pair_bytes_intra`` counts pairs on
  another GPU of the source node, ``pair_bytes_inter`` pairs on another node.
* **de-duplicated bytes** (DeepEP "normal" kernels send a token once per destination): let ``D_t`` be the
  distinct GPUs ``!= src`` the token must reach. ``dedup_rank_bytes = sum_t |D_t|`` (one copy per
  remote GPU). The hierarchical kernel sends one RDMA copy per distinct remote node, to the GPU with the
  same local index as ``src`` there (the *entry* GPU), which forwards it over NVLink to the other GPUs of
  ``D_t`` on that node; GPUs of ``D_t`` on ``src``'s own node get an NVLink copy from ``src``. So
  ``inter_node_bytes = sum_t (distinct remote nodes)`` and ``intra_node_bytes = sum_t (NVLink hops)``.
  Every count is multiplied by the bytes one token moves: dispatch ``hidden * bytes_per_element`` (fp8,
  i.e. 1 byte, adds ``hidden / 128 * 4`` bytes of scales) plus combine ``hidden * combine_bytes_per_element``.
* **replicated bytes** (all-gather / reduce-scatter exchange, ``minimoe.parallel``'s ``replicate`` format):
  every token goes to every other GPU and one partial result comes back from each, whatever the routing:
  ``replicate_bytes_intra`` = tokens · (gpus_per_node − 1) copies, ``replicate_bytes_inter`` = tokens ·
  (num_gpus − gpus_per_node) copies.
* **balance**: ``tokens_per_rank`` = pairs each GPU computes; ``load_max_over_mean``, its inverse and
  Jain's index ``(sum x)^2 / (G sum x^2)``; ``sent_bytes_per_rank`` (de-duplicated per GPU) and the
  busiest sender; ``source_tokens_per_rank`` = evaluated tokens starting on each GPU (the grouping's
  balance) and ``source_max_over_mean``.
* **matrices**: ``rank_matrix[a, b]`` de-duplicated bytes GPU a sends GPU b (one copy per remote GPU);
  ``node_matrix[m, n]`` hierarchical bytes: RDMA from node m to node n off the diagonal, NVLink hops
  inside node n on the diagonal (so it sums to ``intra_node_bytes + inter_node_bytes``).
* **time** (a cross-check, not a prediction): for dispatch and again for combine, per link class
  ``latency + max over GPUs of max(bytes out, bytes in) / bandwidth``, RDMA then NVLink, no overlap;
  all tokens of the trace form one batch per layer.

Totals sum over layers, except fractions (ratios of sums), per-token rates (per token per layer) and
balance figures (mean over layers; ``load_max_over_mean_worst`` is the worst layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import comb

import numpy as np

from minimoe.placement.phy2log import Placement
from minimoe.placement.topology import Topology

_PER_LAYER = ("pairs", "gpu_local_pairs", "node_local_pairs", "remote_ranks", "remote_nodes", "nodes_touched",
              "nvlink_hops", "intra_pairs", "inter_pairs", "replicate_intra", "replicate_inter")


def uniform_nodes_per_token(num_experts: int, top_k: int, num_nodes: int) -> float:
    """Expected distinct nodes a token touches when its k experts are uniform without replacement and
    the E experts are spread as evenly as possible over the nodes: sum_n 1 - C(E - E_n, k) / C(E, k).
    With E_n = E / G for all n this is G (1 - C(E - E/G, k) / C(E, k)) (chapter 6 of the book derives it)."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if top_k > num_experts or num_nodes > num_experts:
        raise ValueError(f"need top_k={top_k} <= num_experts={num_experts} and num_nodes={num_nodes} <= num_experts")
    per_node = np.full(num_nodes, num_experts // num_nodes)
    per_node[: num_experts % num_nodes] += 1
    total = comb(num_experts, top_k)
    return float(sum(1 - comb(num_experts - int(n), top_k) / total for n in per_node))


@dataclass
class TrafficReport:
    """Totals as attributes; ``per_layer[name]`` holds the (L,) arrays (and (L, G) / (L, G, G) ones)."""

    num_tokens: int
    num_layers: int
    bytes_per_token: float
    pairs: int
    pair_gpu_local_fraction: float
    pair_node_local_fraction: float
    inter_node_pairs_per_token: float
    remote_ranks_per_token: float
    remote_nodes_per_token: float
    nodes_per_token: float
    dedup_rank_bytes: float
    intra_node_bytes: float
    inter_node_bytes: float
    pair_bytes_intra: float
    pair_bytes_inter: float
    replicate_bytes_intra: float
    replicate_bytes_inter: float
    load_max_over_mean: float
    load_max_over_mean_worst: float
    load_mean_over_max: float
    jain_index: float
    busiest_sender: int
    busiest_sender_bytes: float
    time_s: float
    source_tokens_per_rank: np.ndarray
    source_max_over_mean: float
    rank_matrix: np.ndarray
    node_matrix: np.ndarray
    per_layer: dict = field(repr=False)

    @property
    def dedup_node_bytes(self) -> float:  # the de-duplicated per-node volume is the inter-node volume
        return self.inter_node_bytes

    def as_dict(self) -> dict:
        """The scalar totals (JSON-ready); matrices and per-layer arrays stay on the object."""
        return {name: value for name, value in vars(self).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}

    def summary(self) -> str:
        gb = 1e9
        return (f"tokens {self.num_tokens} x layers {self.num_layers}: pair local GPU "
                f"{self.pair_gpu_local_fraction:.3f} node {self.pair_node_local_fraction:.3f}; "
                f"remote nodes/token {self.remote_nodes_per_token:.3f}; inter {self.inter_node_bytes / gb:.4f} GB, "
                f"intra {self.intra_node_bytes / gb:.4f} GB (dedup); pair inter {self.pair_bytes_inter / gb:.4f} GB; "
                f"load max/mean {self.load_max_over_mean:.3f}; time {self.time_s * 1e3:.3f} ms")


def request_sources(trace, topology: Topology, sources=None) -> np.ndarray:
    """Source GPU of every request (R,) int64; ``None`` = round-robin ``request % num_gpus``."""
    return topology.request_ranks(int(trace.request.max()) + 1 if trace.request.size else 0, sources)


def _token_bytes(hidden_size, bytes_per_element, combine_bytes_per_element) -> tuple[float, float]:
    for name, value in (("hidden_size", hidden_size), ("bytes_per_element", bytes_per_element),
                        ("combine_bytes_per_element", combine_bytes_per_element)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or \
                not 0 < value < float("inf"):  # NaN fails both comparisons
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    scales = hidden_size / 128 * 4 if bytes_per_element == 1 else 0.0  # fp8 per-128-channel scales
    return hidden_size * bytes_per_element + scales, hidden_size * combine_bytes_per_element


def _link_time(out_tokens, in_tokens, token_bytes, bandwidth, latency) -> float:
    busiest = max(out_tokens.max(), in_tokens.max())
    return (latency + busiest * token_bytes / bandwidth) if busiest > 0 else 0.0


def _count_layer(placement, layer, experts, source, token_index, topology):
    """Counts for one layer and a chunk of tokens. experts (T, k), source (T,), token_index (T,)."""
    num_gpus, per_node, num_nodes = topology.num_gpus, topology.gpus_per_node, topology.num_nodes
    valid = experts >= 0
    slots = placement.route(layer, experts, source, token_index)  # (T, k)
    rank = np.where(valid, placement.gpu_of_slot[np.maximum(slots, 0)], source[:, None])  # invalid -> local
    src_node = source // per_node
    out = dict(pairs=valid.sum(), gpu_local_pairs=(valid & (rank == source[:, None])).sum())
    node_local = valid & (rank // per_node == src_node[:, None])
    out["node_local_pairs"] = node_local.sum()
    out["intra_pairs"] = out["node_local_pairs"] - out["gpu_local_pairs"]
    out["inter_pairs"] = out["pairs"] - out["node_local_pairs"]
    out["replicate_intra"] = len(source) * (per_node - 1)  # every token to every other GPU
    out["replicate_inter"] = len(source) * (num_gpus - per_node)
    out["tokens_per_rank"] = np.bincount(rank[valid], minlength=num_gpus)

    ranks = np.sort(rank, axis=1)  # (T, k): distinct destinations are the first of each run
    first = np.ones(ranks.shape, dtype=bool)
    first[:, 1:] = ranks[:, 1:] != ranks[:, :-1]
    remote = first & (ranks != source[:, None])  # one entry per distinct remote GPU
    nodes = ranks // per_node  # sorted too
    first_node = np.ones(ranks.shape, dtype=bool)
    first_node[:, 1:] = nodes[:, 1:] != nodes[:, :-1]
    remote_node = first_node & (nodes != src_node[:, None])
    same_node = nodes == src_node[:, None]
    entry = nodes * per_node + (source % per_node)[:, None]  # RDMA landing GPU on each node
    local_hop = remote & same_node
    forward_hop = remote & ~same_node & (ranks != entry)
    out["remote_ranks"] = remote.sum()
    out["remote_nodes"] = remote_node.sum()
    out["nodes_touched"] = _nodes_touched(rank, valid, per_node)  # incl. the source node when used
    out["nvlink_hops"] = local_hop.sum() + forward_hop.sum()

    src_rows = np.broadcast_to(source[:, None], ranks.shape)
    out["rank_pairs"] = np.bincount((src_rows * num_gpus + ranks)[remote], minlength=num_gpus * num_gpus)
    node_rows = np.broadcast_to(src_node[:, None], ranks.shape)
    node_flows = np.bincount((node_rows * num_nodes + nodes)[remote_node], minlength=num_nodes * num_nodes)
    node_flows += np.bincount((node_rows * (num_nodes + 1))[local_hop], minlength=num_nodes * num_nodes)
    node_flows += np.bincount((nodes * (num_nodes + 1))[forward_hop], minlength=num_nodes * num_nodes)
    out["node_flows"] = node_flows
    # per-GPU hop counts for the time model
    entry_hit = entry[remote_node]
    out["rdma_out"] = np.bincount(src_rows[remote_node], minlength=num_gpus)
    out["rdma_in"] = np.bincount(entry_hit, minlength=num_gpus)
    out["nvl_out"] = (np.bincount(src_rows[local_hop], minlength=num_gpus)
                      + np.bincount(entry[forward_hop], minlength=num_gpus))
    out["nvl_in"] = np.bincount(ranks[local_hop | forward_hop], minlength=num_gpus)
    return out


def _nodes_touched(rank, valid, per_node):
    """Distinct nodes reached by each token's valid pairs, summed over tokens."""
    nodes = np.where(valid, rank // per_node, -1)
    nodes = np.sort(nodes, axis=1)
    first = np.ones(nodes.shape, dtype=bool)
    first[:, 1:] = nodes[:, 1:] != nodes[:, :-1]
    return (first & (nodes >= 0)).sum()


def measure(trace, placement: Placement, topology: Topology, sources=None, hidden_size: int = 7168,
            bytes_per_element: float = 2, combine_bytes_per_element: float = 2, tokens=None,
            chunk_tokens: int = 1 << 18) -> TrafficReport:
    """Count the traffic of ``trace`` under ``placement`` (see the module docstring).

    ``sources``: per-request GPU rank (None: round-robin). ``hidden_size`` defaults to DeepSeek-V3's 7168.
    ``tokens``: optional bool (N,) mask of the tokens to evaluate (request ids and token indices stay those
    of ``trace``).
    """
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a minimoe.placement.Placement, got {type(placement).__name__}")
    placement.check_topology(topology)
    placement.check_trace(trace)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, (int, np.integer)) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a whole number >= 1, got {chunk_tokens!r}")
    dispatch_bytes, combine_bytes = _token_bytes(hidden_size, bytes_per_element, combine_bytes_per_element)
    token_bytes = dispatch_bytes + combine_bytes
    request_gpu = request_sources(trace, topology, sources)
    rows = np.arange(trace.experts.shape[0])
    if tokens is not None:
        tokens = np.asarray(tokens)
        if tokens.dtype != bool or tokens.shape != rows.shape:
            raise ValueError(f"tokens must be a bool mask of shape {rows.shape}, got {tokens.dtype} {tokens.shape}")
        rows = rows[tokens]
    num_layers, num_gpus, num_nodes = placement.num_layers, topology.num_gpus, topology.num_nodes
    per_layer = {name: np.zeros(num_layers) for name in _PER_LAYER}
    per_layer["tokens_per_rank"] = np.zeros((num_layers, num_gpus))
    per_layer["rank_pairs"] = np.zeros((num_layers, num_gpus * num_gpus))
    per_layer["node_flows"] = np.zeros((num_layers, num_nodes * num_nodes))
    per_layer["time_s"] = np.zeros(num_layers)
    for layer in range(num_layers):
        hops = {name: np.zeros(num_gpus) for name in ("rdma_out", "rdma_in", "nvl_out", "nvl_in")}
        for start in range(0, len(rows), chunk_tokens):
            chunk = rows[start:start + chunk_tokens]
            counts = _count_layer(placement, layer, trace.experts[chunk, layer].astype(np.int64),
                                  request_gpu[trace.request[chunk]], chunk, topology)
            for name, value in counts.items():
                if name in hops:
                    hops[name] += value
                else:
                    per_layer[name][layer] += value
        per_layer["time_s"][layer] = sum(
            _link_time(hops["rdma_out"], hops["rdma_in"], size, topology.inter_node_bandwidth,
                       topology.inter_node_latency)
            + _link_time(hops["nvl_out"], hops["nvl_in"], size, topology.intra_node_bandwidth,
                         topology.intra_node_latency)
            for size in (dispatch_bytes, combine_bytes))

    pl = per_layer
    pl["rank_matrix"] = pl.pop("rank_pairs").reshape(num_layers, num_gpus, num_gpus) * token_bytes
    pl["node_matrix"] = pl.pop("node_flows").reshape(num_layers, num_nodes, num_nodes) * token_bytes
    for name, count in (("dedup_rank_bytes", "remote_ranks"), ("inter_node_bytes", "remote_nodes"),
                        ("intra_node_bytes", "nvlink_hops"), ("pair_bytes_intra", "intra_pairs"),
                        ("pair_bytes_inter", "inter_pairs"), ("replicate_bytes_intra", "replicate_intra"),
                        ("replicate_bytes_inter", "replicate_inter")):
        pl[name] = pl[count] * token_bytes
    with np.errstate(invalid="ignore", divide="ignore"):
        pl["pair_gpu_local_fraction"] = pl["gpu_local_pairs"] / pl["pairs"]
        pl["pair_node_local_fraction"] = pl["node_local_pairs"] / pl["pairs"]
        load = pl["tokens_per_rank"]
        pl["load_max_over_mean"] = load.max(1) / load.mean(1)
        pl["load_mean_over_max"] = load.mean(1) / load.max(1)
        pl["jain_index"] = load.sum(1) ** 2 / (num_gpus * (load ** 2).sum(1))
    num_tokens = len(rows)
    per_token = max(num_tokens * num_layers, 1)
    pl["sent_bytes_per_rank"] = pl["rank_matrix"].sum(2)  # (L, G)
    sent = pl["sent_bytes_per_rank"].sum(0)
    total_pairs = pl["pairs"].sum()
    source_tokens = np.bincount(request_gpu[trace.request[rows]], minlength=num_gpus)
    source_ratio = float(source_tokens.max() / source_tokens.mean()) if num_tokens else float("nan")
    ratio = (lambda a: float(a.sum() / total_pairs)) if total_pairs else (lambda a: float("nan"))
    return TrafficReport(
        num_tokens=num_tokens, num_layers=num_layers, bytes_per_token=token_bytes, pairs=int(total_pairs),
        pair_gpu_local_fraction=ratio(pl["gpu_local_pairs"]), pair_node_local_fraction=ratio(pl["node_local_pairs"]),
        inter_node_pairs_per_token=float(pl["inter_pairs"].sum() / per_token),
        remote_ranks_per_token=float(pl["remote_ranks"].sum() / per_token),
        remote_nodes_per_token=float(pl["remote_nodes"].sum() / per_token),
        nodes_per_token=float(pl["nodes_touched"].sum() / per_token),
        dedup_rank_bytes=float(pl["dedup_rank_bytes"].sum()), intra_node_bytes=float(pl["intra_node_bytes"].sum()),
        inter_node_bytes=float(pl["inter_node_bytes"].sum()), pair_bytes_intra=float(pl["pair_bytes_intra"].sum()),
        pair_bytes_inter=float(pl["pair_bytes_inter"].sum()),
        replicate_bytes_intra=float(pl["replicate_bytes_intra"].sum()),
        replicate_bytes_inter=float(pl["replicate_bytes_inter"].sum()),
        load_max_over_mean=float(np.mean(pl["load_max_over_mean"])),
        load_max_over_mean_worst=float(np.max(pl["load_max_over_mean"])),
        load_mean_over_max=float(np.mean(pl["load_mean_over_max"])), jain_index=float(np.mean(pl["jain_index"])),
        busiest_sender=int(np.argmax(sent)), busiest_sender_bytes=float(sent.max()),
        time_s=float(pl["time_s"].sum()), source_tokens_per_rank=source_tokens, source_max_over_mean=source_ratio,
        rank_matrix=pl["rank_matrix"].sum(0), node_matrix=pl["node_matrix"].sum(0),
        per_layer=pl)
