"""The placement experiments of the expert-activation paper [bambhaniya2026expert] (book/references.bib), on
any trace: fit on one part of the traffic, measure on held-out decode.

Protocol (chapter 7 of the book draws it). Each request has prefill tokens and ``D`` decode tokens. The first ``window``
decode tokens of every request are the *online window*; the evaluated tokens are the decode tokens after it,
the same for every method and fitting mode, so every number below is measured on traffic no method saw,
except the oracle, which is fitted on exactly those tokens (the upper bound of what a static layout can do):

    fit mode   fitted on                                   question it answers
    prefill    every request's prefill tokens              does prefill predict decode? (the paper's premise)
    online     the first `window` decode tokens            refit as decode goes: prediction error shrinks
    oracle     the evaluated tokens themselves             how much structure is there at all?

Methods, each giving a placement (expert -> GPU slots) and sources (request -> GPU):

    contiguous, round_robin, eplb   placement only; requests spread by random balanced grouping
    locality                        co-activation-aware placement; random grouping (placement alone)
    grouping                        signature grouping against the contiguous placement (grouping alone)
    grouping+locality               grouping and locality placement fitted jointly (group_and_place)

``compare_partitioners`` sets the locality placement's two node partitioners side by side (minimoe's FM
refinement and Mt-KaHyPar) on the same hypergraph, slot budget and load cap.

All methods of one comparison get the same replica budget ``num_replicas`` (slots per layer). The headline
metric is de-duplicated inter-node bytes (a token crosses to a node once however many of its experts live
there, as hierarchical all-to-all kernels send it); per-(token, expert) inter-node bytes are reported too.
"""

from __future__ import annotations

import time

import numpy as np

from minimoe.placement.grouping import group, group_and_place
from minimoe.placement.methods import place
from minimoe.placement.topology import Topology
from minimoe.placement.traffic import measure, uniform_nodes_per_token

METHODS = ("contiguous", "round_robin", "eplb", "locality", "grouping", "grouping+locality")
FIT_MODES = ("prefill", "online", "oracle")
PARTITIONERS = ("fm", "mtkahypar")  # node partitioners of the locality placement (minimoe.placement.locality)
DEFAULT_TOPOLOGIES = ((2, 2), (4, 2), (2, 4), (4, 4))


def decode_index(trace) -> np.ndarray:
    """(N,) position of each token among its request's decode tokens (-1 for prefill/unknown tokens)."""
    decode = trace.phase == 1
    index = np.full(trace.num_tokens, -1, dtype=np.int64)
    rows = np.flatnonzero(decode)
    if rows.size:
        # the first decode row of each request: the minimum row index among its decode rows
        first = np.full(trace.num_requests, np.iinfo(np.int64).max)
        np.minimum.at(first, trace.request[rows], rows)
        index[rows] = rows - first[trace.request[rows]]
    return index


def default_window(trace, largest: int = 8) -> int:
    """The online window used when none is given: a quarter of the longest request's decode, 1 to ``largest``.

    32 decode tokens per request give the window of 8 used throughout the book; a trace recorded with 8 decode
    tokens gets 2, so the default always leaves held-out decode tokens to evaluate on.
    """
    index = decode_index(trace)
    longest = int(index.max()) + 1 if index.size and index.max() >= 0 else 0
    return int(min(largest, max(1, longest // 4)))


def masks(trace, window: int = 8) -> dict[str, np.ndarray]:
    """Boolean token masks: the fitting set of each fit mode and the evaluated set ("eval").

    Raises ValueError when ``window`` < 1 or no decode token lies after it (the message names the longest
    decode so the window can be chosen)."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"the online window must be an integer >= 1 (decode tokens per request to fit on), "
                         f"got {window!r}")
    if trace.num_tokens == 0 or not (trace.phase == 1).any():
        raise ValueError("the experiments need a trace with decode tokens (phase 1)")
    index = decode_index(trace)
    evaluated = index >= window
    if not evaluated.any():
        raise ValueError(f"no decode token lies after the online window of {window} tokens: the longest request "
                         f"decodes {int(index.max()) + 1}; use a window of at most {int(index.max())}")
    return {"prefill": trace.phase == 0, "online": (index >= 0) & (index < window), "oracle": evaluated,
            "eval": evaluated}


def cut(method_bytes: float, baseline_bytes: float) -> float | None:
    """The fraction of the baseline's bytes a method saves, ``1 - method / baseline`` (<= 1; negative when the
    method moves more). None when the baseline moves nothing (one node has no inter-node traffic): a saving
    of nothing is undefined, not 100%."""
    if baseline_bytes <= 0:
        return None
    return 1.0 - method_bytes / baseline_bytes


def fit(trace, topology: Topology, method: str, fit_tokens: np.ndarray, num_replicas: int, seed: int = 0,
        partitioner: str | None = None, cache: dict | None = None):
    """(placement, sources) of one method fitted on the tokens in ``fit_tokens``. ``partitioner``: the node
    partitioner of the locality placements ("auto", "fm" or "mtkahypar"; None = ``place``'s default, "auto");
    ``cache``: node partitions to reuse (``minimoe.placement.locality.place_locality``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    random_sources = group(trace, topology, "random", seed=seed)
    if method in ("contiguous", "round_robin", "eplb"):
        return place(trace, topology, method, tokens=fit_tokens, num_replicas=num_replicas), random_sources
    chosen = {} if partitioner is None else dict(partitioner=partitioner)
    chosen |= {} if cache is None else dict(cache=cache)
    if method == "locality":
        placement = place(trace, topology, "locality", tokens=fit_tokens, num_replicas=num_replicas,
                          sources=random_sources, **chosen)
        return placement, random_sources
    if method == "grouping":
        placement = place(trace, topology, "contiguous", tokens=fit_tokens, num_replicas=num_replicas)
        sources = group(trace, topology, "signature", seed=seed, placement=placement, tokens=fit_tokens)
        return placement, sources
    sources, placement = group_and_place(trace, topology, seed=seed, tokens=fit_tokens, num_replicas=num_replicas,
                                         **chosen)
    return placement, sources


def compare_partitioners(trace, topology: Topology, num_replicas: int | None = None, partitioners=PARTITIONERS,
                         window: int = 8, seed: int = 0, hidden_size: int = 7168, token_sets=None) -> list[dict]:
    """Locality placement with each node partitioner, next to contiguous and EPLB: one row per method
    (``locality[fm]``, ``locality[mtkahypar]``), all fitted on prefill with the same random request sources,
    slot budget and node load cap, and measured on the held-out decode tokens. Raises ImportError (how to
    install it) when ``partitioners`` names Mt-KaHyPar and it is missing. ``token_sets``: the masks of
    ``minimoe.placement.splits`` (default: ``masks(trace, window)``)."""
    token_sets = masks(trace, window) if token_sets is None else token_sets
    num_replicas = num_replicas or trace.num_experts
    reports, seconds = {}, {}
    for method in ("contiguous", "eplb", *(f"locality[{p}]" for p in partitioners)):
        start = time.perf_counter()
        partitioner = method[len("locality["):-1] if method.startswith("locality[") else None
        placement, sources = fit(trace, topology, "locality" if partitioner else method, token_sets["prefill"],
                                 num_replicas, seed, partitioner)
        seconds[method] = time.perf_counter() - start
        reports[method] = measure(trace, placement, topology, sources=sources, tokens=token_sets["eval"],
                                  hidden_size=hidden_size)
    return [dict(topology=f"{topology.num_nodes}x{topology.gpus_per_node}", num_replicas=num_replicas, fit="prefill",
                 method=method, inter_node_bytes=report.inter_node_bytes,
                 load_max_over_mean=report.load_max_over_mean, fit_seconds=seconds[method],
                 cut_vs_contiguous=cut(report.inter_node_bytes, reports["contiguous"].inter_node_bytes),
                 cut_vs_eplb=cut(report.inter_node_bytes, reports["eplb"].inter_node_bytes))
            for method, report in reports.items()]


def compare(trace, topology: Topology, num_replicas: int | None = None, fit_modes=FIT_MODES, methods=METHODS,
            window: int = 8, seed: int = 0, hidden_size: int = 7168, token_sets=None, fitted=None) -> list[dict]:
    """One row per (fit mode, method): traffic of the evaluated tokens, and reductions vs the baselines.
    ``token_sets``: the masks of ``minimoe.placement.splits`` (default: ``masks(trace, window)``). ``fitted``: a
    dict that receives ``(topology, num_replicas, method) -> (placement, sources)`` of the "prefill" fits."""
    token_sets = masks(trace, window) if token_sets is None else token_sets
    num_replicas = num_replicas or trace.num_experts
    rows = []
    for mode in fit_modes:
        reports = {}
        for method in methods:
            placement, sources = fit(trace, topology, method, token_sets[mode], num_replicas, seed)
            if fitted is not None and mode == "prefill":
                fitted[(str(topology), num_replicas, method)] = (placement, sources)
            reports[method] = measure(trace, placement, topology, sources=sources, tokens=token_sets["eval"],
                                      hidden_size=hidden_size)
        for method, report in reports.items():
            row = dict(topology=f"{topology.num_nodes}x{topology.gpus_per_node}", num_replicas=num_replicas,
                       fit=mode, method=method, inter_node_bytes=report.inter_node_bytes,
                       pair_bytes_inter=report.pair_bytes_inter, intra_node_bytes=report.intra_node_bytes,
                       remote_nodes_per_token=report.remote_nodes_per_token,
                       pair_node_local_fraction=report.pair_node_local_fraction,
                       load_max_over_mean=report.load_max_over_mean)
            for base in ("contiguous", "eplb"):
                if base in reports:
                    row[f"cut_vs_{base}"] = cut(report.inter_node_bytes, reports[base].inter_node_bytes)
                    row[f"pair_cut_vs_{base}"] = cut(report.pair_bytes_inter, reports[base].pair_bytes_inter)
            rows.append(row)
    return rows


def uniform_baseline(trace, topology: Topology) -> dict:
    """Nodes a token reaches if routing were uniform (chapter 6 derives it) — and what contiguous placement sees."""
    nodes = uniform_nodes_per_token(trace.num_experts, trace.top_k, topology.num_nodes)
    return dict(topology=f"{topology.num_nodes}x{topology.gpus_per_node}", uniform_nodes_per_token=nodes,
                uniform_remote_nodes_per_token=nodes * (topology.num_nodes - 1) / topology.num_nodes)


def drift_requests(domains, fit_mix: dict, eval_mix: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The drift test's requests: bool (R,) masks of the history drawn by ``fit_mix`` from a random half and of the
    new traffic drawn by ``eval_mix`` from the other half (``domains``: each request's domain). Raises ValueError
    for a domain the trace lacks or too few requests."""
    rng = np.random.default_rng(seed)
    num_requests = len(domains)
    half = rng.permutation(num_requests) < num_requests // 2
    picked = {}
    for name, mix, pool in (("fit", fit_mix, half), ("eval", eval_mix, ~half)):
        unknown = sorted(set(mix) - set(domains))
        if unknown:
            raise ValueError(f"{name}_mix names domains {unknown} that the trace does not have")
        weights = np.array([mix.get(d, 0.0) for d in domains]) * pool
        count = int(min(pool.sum(), (weights > 0).sum()) * 0.5)
        if count < 1:
            raise ValueError(f"too few requests to draw the {name} half of the drift test "
                             f"({num_requests} requests in the trace)")
        picked[name] = rng.choice(num_requests, size=count, replace=False, p=weights / weights.sum())
    return tuple(np.isin(np.arange(num_requests), picked[n]) for n in ("fit", "eval"))


def drift(trace, topology: Topology, fit_mix: dict[str, float], eval_mix: dict[str, float],
          num_replicas: int | None = None, seed: int = 0, hidden_size: int = 7168) -> list[dict]:
    """Fit on requests drawn with one domain mix, evaluate on other requests drawn with another.

    Half the requests (random) form the history, the other half the new traffic. Placements are fitted on all
    tokens of history requests sampled by ``fit_mix`` (domain -> weight); new requests sampled by ``eval_mix``
    are grouped by their own prefill against that placement, and their decode tokens are measured.
    """
    fit_requests, eval_requests = drift_requests(trace.request_domains(), fit_mix, eval_mix, seed)
    fit_tokens = fit_requests[trace.request]
    evaluated = eval_requests[trace.request] & (trace.phase == 1)
    prefill_new = eval_requests[trace.request] & (trace.phase == 0)
    num_replicas = num_replicas or trace.num_experts
    rows, reports = [], {}
    random_sources = group(trace, topology, "random", seed=seed)
    for method in ("contiguous", "eplb", "locality", "grouping+locality"):
        base = "locality" if method == "grouping+locality" else method
        placement = place(trace, topology, base, tokens=fit_tokens, num_replicas=num_replicas,
                          sources=random_sources if base == "locality" else None)
        sources = random_sources
        if method == "grouping+locality":
            sources = group(trace, topology, "signature", seed=seed, placement=placement, tokens=prefill_new)
        reports[method] = measure(trace, placement, topology, sources=sources, tokens=evaluated,
                                  hidden_size=hidden_size)
    for method, report in reports.items():
        rows.append(dict(method=method, inter_node_bytes=report.inter_node_bytes,
                         cut_vs_contiguous=cut(report.inter_node_bytes, reports["contiguous"].inter_node_bytes),
                         cut_vs_eplb=cut(report.inter_node_bytes, reports["eplb"].inter_node_bytes),
                         load_max_over_mean=report.load_max_over_mean))
    return rows
