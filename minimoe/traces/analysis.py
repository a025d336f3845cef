"""Analysis of expert-activation traces: the three properties of the expert-activation paper, each with its
baseline.

("Scaling Multi-Node Mixture-of-Experts Inference Using Expert Activation Patterns", arXiv 2604.23150,
[bambhaniya2026expert]; the keys in brackets are entries of book/references.bib.)
Notation: a trace has N tokens, L MoE layers, E experts, top-k routing; `experts[n, l, s]` is the expert of
token n in layer l at slot s (-1 = none, ignored everywhere below).

1. Load imbalance. load[l, e] = #{(n, s): experts[n, l, s] = e}. For one layer with loads x_1..x_E (mean μ):
       max/mean      = max_e x_e / μ                    (1 = perfectly balanced; what the slowest GPU waits for)
       Gini          = Σ_i Σ_j |x_i - x_j| / (2 E² μ)   (0 = equal, → 1 = one expert takes everything)
       entropy       = -Σ p_e log p_e / log E,  p = x / Σx   (1 = uniform, 0 = a single expert)
2. Domain specificity. popularity_d[l] = load of the tokens of domain d, normalised per layer. Two domains
   differ by the Jensen-Shannon divergence [lin1991divergence] (base 2, in [0, 1]), averaged over layers:
       JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = (p + q) / 2,  0·log 0 = 0.
   Finite samples make JS > 0 even for identical distributions, so the baseline is the JS between two
   random halves (by request) of one domain: a real domain effect must clearly exceed it.
3. Prefill predicts decode. For each request, h_prefill and h_decode are its expert histograms over all
   (layer, expert) cells; their Pearson correlation (or cosine similarity) is compared with the same
   quantity for mismatched pairs (prefill of one request vs decode of another, a random derangement).
4. Structure used by placement: co-activation C[l, i, j] = #tokens choosing both i and j in layer l (i ≠ j;
   the diagonal holds load[l, i]); transitions T[l, i, j] = #(token, slot, slot') with expert i in layer l
   and expert j in layer l + 1 (k² pairs per token), the inter-layer affinity of ExFlow-style placement
   [yao2024exflow].

Everything is vectorised with numpy bincount over flattened indices; only loops over layers or slot pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minimoe.traces.format import Trace


def _grouped_counts(group, ids, num_groups: int, num_values: int) -> np.ndarray:
    """(num_groups, num_values) counts of `ids` per `group` (arrays that broadcast together), ids of -1 ignored.

    One bincount over the cells group·(V+1) + (id+1): the -1 ids land in column 0, which is dropped, so no
    boolean mask (and no copy of the selected entries) is needed.
    """
    dtype = np.int32 if num_groups * (num_values + 1) < 2**31 else np.int64
    cells = np.asarray(group, dtype) * (num_values + 1) + (np.asarray(ids, dtype) + 1)
    counts = np.bincount(cells.ravel(), minlength=num_groups * (num_values + 1))
    return counts.reshape(num_groups, num_values + 1)[:, 1:]


def _pair_counts(group, first, second, num_groups: int, num_experts: int) -> np.ndarray:
    """(num_groups, E, E) counts of (first, second) expert pairs per group; pairs with a -1 ignored."""
    pair = (np.asarray(first, np.int64) + 1) * (num_experts + 1) + (np.asarray(second, np.int64) + 1)
    counts = _grouped_counts(group, pair, num_groups, (num_experts + 1) ** 2)  # (G, (E+1)²)
    return counts.reshape(num_groups, num_experts + 1, num_experts + 1)[:, 1:, 1:]


# ---- 1. load imbalance -----------------------------------------------------------------------------------------
def expert_load(trace: Trace) -> np.ndarray:
    """int64 (L, E): how many (token, slot) choices went to each expert in each layer."""
    layer = np.arange(trace.num_layers)[None, :, None]  # broadcasts against experts (N, L, k)
    return _grouped_counts(layer, trace.experts, trace.num_layers, trace.num_experts)


def _check_counts(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim < 1 or counts.shape[-1] < 1 or (counts < 0).any():
        raise ValueError(f"counts must be a non-negative array (..., E), got shape {counts.shape}")
    if (counts.sum(-1) == 0).any():  # counts are (..., L, E) in every table of a trace: the layer is axis -2
        index = np.argwhere(counts.sum(-1) == 0)[0]
        where = f" of MoE layer {index[-1]}" if counts.ndim >= 2 else ""
        raise ValueError(f"the row of counts{where} sums to 0 (no routed token there): imbalance is undefined; a "
                         "layer that holds only -1 ids is a dense layer")
    return counts


def max_over_mean(counts) -> np.ndarray:
    """max_e x_e / mean_e x_e over the last axis."""
    counts = _check_counts(counts)
    return counts.max(-1) / counts.mean(-1)


def gini(counts) -> np.ndarray:
    """Gini coefficient over the last axis, via the sorted form Σ_i (2i - E - 1) x_(i) / (E Σ x), i = 1..E."""
    counts = np.sort(_check_counts(counts), axis=-1)
    e = counts.shape[-1]
    rank_weight = 2 * np.arange(1, e + 1) - e - 1  # (E,)
    return (counts * rank_weight).sum(-1) / (e * counts.sum(-1))


def normalized_entropy(counts) -> np.ndarray:
    """Shannon entropy of counts / Σ counts, divided by log E (1 = uniform); 1.0 when E = 1."""
    counts = _check_counts(counts)
    p = counts / counts.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    e = counts.shape[-1]
    return h / np.log(e) if e > 1 else np.ones_like(h)


def layer_imbalance(trace: Trace) -> dict[str, np.ndarray]:
    """Per-layer load (L, E) and its max/mean, Gini and normalised entropy (each (L,))."""
    load = expert_load(trace)
    return dict(load=load, max_over_mean=max_over_mean(load), gini=gini(load), entropy=normalized_entropy(load))


# ---- 2. domain specificity -------------------------------------------------------------------------------------
def js_divergence(p, q) -> np.ndarray:
    """Jensen-Shannon divergence in bits between distributions on the last axis (normalised here)."""
    p, q = _check_counts(p), _check_counts(q)
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    m = (p + q) / 2

    def kl(a):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / m), 0.0).sum(-1)
    return np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0)


def domain_popularity(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(labels (D,), popularity (D, L, E)): each domain's expert load, normalised to sum 1 per layer."""
    if not trace.has_domain:
        raise ValueError("the trace has no domain labels")
    labels, index = np.unique(trace.domain, return_inverse=True)
    group = index[:, None, None] * trace.num_layers + np.arange(trace.num_layers)[None, :, None]  # (N, L, 1)
    load = _grouped_counts(group, trace.experts, len(labels) * trace.num_layers, trace.num_experts)
    load = load.reshape(len(labels), trace.num_layers, trace.num_experts).astype(np.float64)
    return labels, load / np.maximum(load.sum(-1, keepdims=True), 1)


def domain_divergence(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(labels (D,), JS (D, D)): layer-averaged JS divergence between every pair of domains."""
    labels, popularity = domain_popularity(trace)
    js = js_divergence(popularity[:, None], popularity[None, :])  # (D, D, L)
    return labels, js.mean(-1)


def split_divergence(trace: Trace, domain: str, num_splits: int = 20, seed: int = 0) -> np.ndarray:
    """Baseline (num_splits,): layer-averaged JS between two random halves of one domain's requests."""
    requests = np.flatnonzero(trace.request_domains() == domain) if trace.has_domain else np.zeros(0, int)
    if len(requests) < 2:
        raise ValueError(f"domain {domain!r} has {len(requests)} requests; a random split needs at least 2")
    rng = np.random.default_rng(seed)
    out = np.empty(num_splits)
    for split in range(num_splits):
        order = rng.permutation(requests)
        half = len(order) // 2
        a, b = expert_load(trace.requests(order[:half])), expert_load(trace.requests(order[half:]))
        out[split] = js_divergence(a, b).mean()
    return out


# ---- 3. prefill predicts decode --------------------------------------------------------------------------------
class PairedSimilarity(NamedTuple):
    requests: np.ndarray  # (n,) ids of the requests compared (both phases present, histograms not constant)
    matched: np.ndarray  # (n,) similarity of each request's prefill histogram and its own decode histogram
    shuffled: np.ndarray  # (n,) similarity of its prefill histogram and another request's decode histogram


def phase_request_counts(trace: Trace, phase: int) -> np.ndarray:
    """int64 (R, L, E): each request's expert histogram over its tokens of one phase (zeros without any)."""
    rows = trace.phase == phase
    group = trace.request[rows][:, None, None].astype(np.int64) * trace.num_layers \
        + np.arange(trace.num_layers)[None, :, None]  # (n, L, 1)
    counts = _grouped_counts(group, trace.experts[rows], trace.num_requests * trace.num_layers, trace.num_experts)
    return counts.reshape(trace.num_requests, trace.num_layers, trace.num_experts)


def _similarity(metric, cells, sx, sxx, sy, syy, sxy):
    """Pearson correlation or cosine similarity of vectors of length `cells`, from their sums."""
    if metric == "cosine":
        return sxy / np.sqrt(sxx * syy)
    return (cells * sxy - sx * sy) / np.sqrt((cells * sxx - sx ** 2) * (cells * syy - sy ** 2))


def prefill_decode_similarity(trace: Trace, metric: str = "pearson", seed: int = 0) -> PairedSimilarity:
    """Similarity of each request's prefill and decode expert histograms (over all L·E cells), vs shuffled pairs
    (``paired_similarity`` on the trace's per-request histograms)."""
    present = np.zeros((2, trace.num_requests), bool)
    for phase in (0, 1):
        present[phase, trace.request[trace.phase == phase]] = True
    return paired_similarity(phase_request_counts(trace, 0), phase_request_counts(trace, 1), present.all(0),
                             metric, seed)


def paired_similarity(prefill, decode, present, metric: str = "pearson", seed: int = 0) -> PairedSimilarity:
    """Similarity of each request's prefill histogram ``prefill[q]`` and decode histogram ``decode[q]`` (both
    (R, L, E) counts), for the requests where ``present`` (bool (R,)) says both phases have tokens.

    Sums x, x², y, y², xy per request (x = prefill histogram, y = decode histogram), all integers, so the
    result does not depend on the order of summation; requests whose histograms are constant (similarity
    undefined) are left out. The shuffled baseline pairs each remaining request's prefill with the decode of
    the next request in a random cycle (``seed``).
    """
    if metric not in ("pearson", "cosine"):
        raise ValueError(f"metric must be 'pearson' or 'cosine', got {metric!r}")
    requests = np.flatnonzero(present)
    cells = int(np.prod(prefill.shape[1:]))
    x = prefill[requests].reshape(len(requests), cells).astype(np.float64)  # (n, L*E)
    y = decode[requests].reshape(len(requests), cells).astype(np.float64)
    sx, sxx, sy, syy, sxy = x.sum(1), (x * x).sum(1), y.sum(1), (y * y).sum(1), (x * y).sum(1)
    spread = (sxx > 0) & (syy > 0) if metric == "cosine" else (cells * sxx > sx ** 2) & (cells * syy > sy ** 2)
    requests, x, y, sx, sxx, sy, syy, sxy = (a[spread] for a in (requests, x, y, sx, sxx, sy, syy, sxy))
    if len(requests) < 2:
        raise ValueError(f"need at least 2 requests with both prefill and decode tokens (and non-constant "
                         f"histograms), found {len(requests)}")
    cycle = np.random.default_rng(seed).permutation(len(requests))
    partner = np.empty(len(requests), int)
    partner[cycle] = cycle[np.r_[1:len(cycle), 0]]  # a derangement: no request is paired with itself
    sxy_partner = (x * y[partner]).sum(1)
    matched = _similarity(metric, cells, sx, sxx, sy, syy, sxy)
    shuffled = _similarity(metric, cells, sx, sxx, sy[partner], syy[partner], sxy_partner)
    return PairedSimilarity(requests, matched, shuffled)


# ---- 4. co-activation and layer-to-layer transitions -----------------------------------------------------------
def coactivation(trace: Trace) -> np.ndarray:
    """int64 (L, E, E): C[l, i, j] = tokens that chose both i and j in layer l; C[l, i, i] = load[l, i]."""
    e, k = trace.num_experts, trace.top_k
    layer = np.arange(trace.num_layers)[None, :]  # broadcasts against (N, L)
    out = np.zeros((trace.num_layers, e, e), np.int64)
    for a in range(k):
        for b in range(a + 1, k):  # slots a < b; top-k ids are distinct, so i != j
            out += _pair_counts(layer, trace.experts[:, :, a], trace.experts[:, :, b], trace.num_layers, e)
    out += out.transpose(0, 2, 1)
    out[:, np.arange(e), np.arange(e)] = expert_load(trace)
    return out


def layer_transitions(trace: Trace) -> np.ndarray:
    """int64 (L-1, E, E): T[l, i, j] = (token, slot in l, slot in l+1) triples going from expert i to j."""
    e, k, steps = trace.num_experts, trace.top_k, trace.num_layers - 1
    layer = np.arange(steps)[None, :]  # broadcasts against (N, L-1)
    out = np.zeros((steps, e, e), np.int64)
    for a in range(k):
        for b in range(k):
            out += _pair_counts(layer, trace.experts[:, :-1, a], trace.experts[:, 1:, b], steps, e)
    return out
