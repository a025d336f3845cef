"""Workload-aware request grouping: which GPU (data-parallel rank) each request runs on.

A request's tokens start their all-to-all on the request's GPU. The finding of the expert-activation paper
[bambhaniya2026expert] that the experts a request uses in prefill predict those it uses in decode (which ELDR
[choi2026eldr] also uses; keys of book/references.bib) means
that requests with similar prefill *signatures* can share a node with the experts they will need.

The signature of request ``q`` is its expert histogram over the fitting tokens (by default its prefill
tokens), one distribution per layer: ``x[q, l, e] = (pairs of q routed to e in layer l) / tokens of q``.

Methods of :func:`group` (all *balanced*: with ``balance="requests"`` GPU ``g`` gets exactly
``Q // G + (g < Q % G)`` requests; with ``balance="tokens"`` GPUs get about equal fitting tokens):

* ``random``    a seeded random balanced assignment (the baseline);
* ``domain``    requests sorted by domain label then id, cut into consecutive GPU chunks, so each node
                serves few domains;
* ``signature`` without a placement: balanced k-means of the signatures (k-means++ start, then
                Lloyd steps whose assignment step respects the capacities) into one cluster per node,
                then again inside each node into its GPUs. With ``placement=``: each request goes to the
                node where, under that placement and the routing rule of ``Placement.route``, its
                fitting tokens reach the fewest remote nodes, then to the GPU of that node holding most of
                its experts.

The balanced assignment (``minimoe.placement.balanced``) maximises the summed score greedily (requests with
the largest regret first), then improves it by pairwise exchanges between every two bins. :func:`group_and_place`
alternates signature grouping and locality placement and keeps the best round by fitted traffic.

Typical protocol (fit on prefill, evaluate on held-out decode of the same requests)::

    prefill, decode = trace.phase == 0, trace.phase == 1
    sources, placement = group_and_place(trace, topology, tokens=prefill, num_replicas=R)
    report = measure(trace, placement, topology, sources=sources, tokens=decode)

New requests against a fixed placement: ``group(new_trace, topology, placement=placement)``.
Masks (``tokens=``) keep request ids aligned, unlike ``Trace.select``, which renumbers requests.
"""
from __future__ import annotations

import numpy as np

from minimoe.placement.balanced import assign, balanced_kmeans, capacity_of, cut
from minimoe.placement.evaluate import _Tables, popcount
from minimoe.placement.rows import row_count, row_or
from minimoe.placement.fitdata import FitData
from minimoe.placement.methods import place
from minimoe.placement.phy2log import Placement
from minimoe.placement.topology import Topology

METHODS = ("random", "domain", "signature")


def group(trace, topology: Topology, method: str = "signature", seed: int = 0, placement: Placement | None = None,
          tokens=None, balance: str = "requests") -> np.ndarray:
    """Source GPU rank of every request, int64 (num_requests,). See the module docstring."""
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a minimoe.placement.topology.Topology, got {type(topology).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown grouping method {method!r}; expected one of {list(METHODS)}")
    if balance not in ("requests", "tokens"):
        raise ValueError(f"balance must be 'requests' or 'tokens', got {balance!r}")
    num_requests = trace.num_requests
    rows = _fit_rows(trace, tokens)
    size = np.ones(num_requests) if balance == "requests" else _fit_tokens(trace, rows).astype(float)
    num_gpus = topology.num_gpus
    rng = np.random.default_rng(seed)
    if method in ("random", "domain"):
        if method == "random":
            order = rng.permutation(num_requests)
        else:
            if isinstance(trace, FitData):
                if trace.domain is None:
                    raise ValueError("grouping method 'domain' needs a trace with domain labels")
                labels = trace.domain
            elif not (trace.domain.shape[0] == trace.experts.shape[0] and trace.experts.shape[0] > 0):
                raise ValueError("grouping method 'domain' needs a trace with domain labels")
            else:
                labels = trace.domain[np.searchsorted(trace.request, np.arange(num_requests))]
            order = np.lexsort((np.arange(num_requests), labels))
        return cut(order, size, num_gpus)
    gpu_capacity = capacity_of(size, num_gpus)
    node_capacity = gpu_capacity.reshape(topology.num_nodes, -1).sum(1)
    if placement is not None:
        placement.check_topology(topology)
        placement.check_trace(trace)
        node_score = -_remote_cost(trace, placement, rows, num_requests)
        node = assign(node_score, node_capacity, size)
        gpu_score = _hosted_pairs(trace, placement, rows, num_requests)
    else:
        signature = _signatures(trace, rows, num_requests)
        node = balanced_kmeans(signature, node_capacity, size, rng)
    sources = np.empty(num_requests, dtype=np.int64)
    for n in range(topology.num_nodes):
        members = np.flatnonzero(node == n)
        capacity = gpu_capacity[n * topology.gpus_per_node:(n + 1) * topology.gpus_per_node]
        if placement is not None:
            local = assign(gpu_score[members][:, n * topology.gpus_per_node:(n + 1) * topology.gpus_per_node],
                            capacity, size[members])
        else:
            local = balanced_kmeans(signature[members], capacity, size[members], rng)
        sources[members] = n * topology.gpus_per_node + local
    return sources


def group_and_place(trace, topology: Topology, rounds: int = 2, seed: int = 0, tokens=None,
                    balance: str = "requests", init: str = "signature", **place_options):
    """Alternate grouping and locality placement; returns (sources, placement) of the round with the least
    fitted inter-node traffic. Round 0 groups with method ``init`` (placement-free), then places with
    sources; each further round regroups against the placement (``group(..., placement=)``) and places
    again. ``place_options`` go to ``place(..., method="locality")`` (e.g. ``num_replicas``, ``epsilon``)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    rows = _fit_rows(trace, tokens)
    mask = np.zeros(trace.experts.shape[0], dtype=bool)
    mask[rows] = True
    num_requests = trace.num_requests
    sources = group(trace, topology, init, seed=seed, tokens=mask, balance=balance)
    placement = place(trace, topology, "locality", sources=sources, tokens=mask, **place_options)
    cost_of = _remote_cost(trace, placement, rows, num_requests)
    best = (cost_of[np.arange(num_requests), sources // topology.gpus_per_node].sum(), sources, placement)
    for _ in range(rounds):
        regrouped = group(trace, topology, "signature", seed=seed, placement=placement, tokens=mask, balance=balance)
        if np.array_equal(regrouped, sources):  # a fixed point: every further round would repeat this one
            break
        sources = regrouped
        placement = place(trace, topology, "locality", sources=sources, tokens=mask, **place_options)
        cost_of = _remote_cost(trace, placement, rows, num_requests)
        cost = cost_of[np.arange(num_requests), sources // topology.gpus_per_node].sum()
        if cost < best[0]:
            best = (cost, sources, placement)
    return best[1], best[2]


# ---- fitting data -----------------------------------------------------------------------------------------
def _fit_rows(trace, tokens):
    """Row indices of the fitting tokens: the mask if given, else prefill tokens, else all tokens (a FitData:
    all its tokens are fitting tokens)."""
    if tokens is not None:
        tokens = np.asarray(tokens)
        if tokens.dtype != bool or tokens.shape != (trace.experts.shape[0],):
            raise ValueError(f"tokens must be a bool mask of shape ({trace.experts.shape[0]},), "
                             f"got dtype {tokens.dtype} shape {tokens.shape}")
        if isinstance(trace, FitData) and not tokens.all():
            raise ValueError("a FitData holds only fitting tokens: tokens must be None or all True")
        return np.flatnonzero(tokens)
    if isinstance(trace, FitData):
        return np.arange(trace.num_tokens)
    prefill = np.flatnonzero(trace.phase == 0)
    return prefill if prefill.size else np.arange(trace.experts.shape[0])


def _fit_tokens(trace, rows) -> np.ndarray:
    """(Q,) fitting tokens of every request (exact for a FitData, whose rows may be a sample)."""
    if isinstance(trace, FitData):
        return trace.request_tokens
    return np.bincount(trace.request[rows], minlength=trace.num_requests)


def _fit_counts(trace, rows) -> np.ndarray:
    """(Q, L, E) int64 expert counts of every request's fitting tokens."""
    if isinstance(trace, FitData):
        return trace.request_counts.astype(np.int64)
    experts = trace.experts[rows].astype(np.int64)  # (T, L, k)
    num_layers, num_experts = experts.shape[1], trace.num_experts
    column = np.arange(num_layers)[None, :, None] * num_experts + experts
    request = np.broadcast_to(trace.request[rows][:, None, None], experts.shape)
    valid = experts >= 0
    width = num_layers * num_experts
    counts = np.bincount(request[valid] * width + column[valid], minlength=trace.num_requests * width)
    return counts.reshape(trace.num_requests, num_layers, num_experts)


def _signatures(trace, rows, num_requests):
    """(Q, L*E) float64: per request and layer, the expert histogram divided by the request's tokens."""
    signature = _fit_counts(trace, rows).reshape(num_requests, -1).astype(np.float32)
    return signature / np.maximum(_fit_tokens(trace, rows), 1)[:, None]


def _remote_cost(trace, placement, rows, num_requests):
    """(Q, N): remote nodes summed over a request's fitting tokens and layers, if it ran on node n.

    On a FitData (whose tokens may be a sample) the cost is the request's remote (token, expert) pairs, exact
    from its counts, minus the pairs that share a remote node with another pair of the same token (what
    de-duplication saves), estimated from its sampled tokens and scaled by fitting / sampled tokens; with every
    token sampled this is the exact count, and a request with no sampled token keeps its pair count."""
    per_node, num_nodes = placement.gpus_per_node, placement.num_nodes
    cost = np.zeros((num_requests, num_nodes))
    pairs = np.zeros((num_requests, num_nodes))  # remote pairs of the same tokens
    request = trace.request[rows]
    token_index = trace.token_index[rows] if isinstance(trace, FitData) else rows
    tables = _Tables(placement)  # the GPU serving each (source, expert, token_index % count), as measured
    node_bit = np.left_shift(np.uint64(1), np.arange(min(num_nodes, 64), dtype=np.uint64))
    for layer in range(placement.num_layers):
        experts = trace.experts[rows, layer].astype(np.int64)
        valid = experts >= 0
        same_everywhere = tables.layers[layer][1] is None  # no replicas: the serving GPU ignores the source
        for node in range(num_nodes):
            if node == 0 or not same_everywhere:
                source = np.full(len(rows), node * per_node)
                nodes = tables.ranks(layer, np.maximum(experts, 0), source, token_index) // per_node  # (T, k)
                valid_pairs = row_count(valid)
                if num_nodes <= 64:  # the nodes each token reaches, as bits of one word
                    reached = row_or(np.where(valid, node_bit[nodes], np.uint64(0)))
            if num_nodes <= 64:
                remote = popcount(reached & ~node_bit[node])
            else:  # distinct remote nodes by sorting
                ordered = np.sort(np.where(valid, nodes, node), axis=1)
                first = np.ones(ordered.shape, dtype=bool)
                first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
                remote = (first & (ordered != node)).sum(axis=1)
            remote_pairs = valid_pairs - row_count(valid & (nodes == node))
            cost[:, node] += np.bincount(request, weights=remote, minlength=num_requests)
            pairs[:, node] += np.bincount(request, weights=remote_pairs, minlength=num_requests)
    if isinstance(trace, FitData):
        away = ~placement.hosts("node")  # (L, E, N): the expert has no replica on node n
        # (Q, N) remote pairs of every fitting token; integers far below 2**53, so the float product is exact
        exact = trace.request_counts.reshape(num_requests, -1).astype(np.float64) @ \
            away.reshape(-1, num_nodes).astype(np.float64)
        sampled, fitted = np.bincount(request, minlength=num_requests), trace.request_tokens
        scale = np.where(sampled > 0, fitted / np.maximum(sampled, 1), 0.0)[:, None]
        cost = exact - scale * (pairs - cost)
    return cost


def _hosted_pairs(trace, placement, rows, num_requests):
    """(Q, G): fitting pairs of each request whose expert has a replica on GPU g (from the exact counts)."""
    hosts = placement.hosts("gpu").reshape(-1, placement.num_gpus).astype(np.float64)  # (L*E, G)
    counts = _fit_counts(trace, rows).reshape(num_requests, -1).astype(np.float64)  # (Q, L*E)
    return counts @ hosts  # integers far below 2**53: exact in any summation order
