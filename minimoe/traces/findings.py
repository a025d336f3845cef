"""The three findings of the expert-activation paper on a trace, each next to the baseline it has to beat.

("Scaling Multi-Node Mixture-of-Experts Inference Using Expert Activation Patterns", arXiv 2604.23150,
[bambhaniya2026expert] in book/references.bib.)
The paper observes three properties of real MoE serving traces. A number alone proves nothing: a finite
sample of perfectly balanced, domain-blind, memoryless routing also shows some imbalance, some divergence
between domains and some correlation. So every finding below is printed with what chance alone gives.
The statistics themselves are those of ``minimoe.traces.analysis`` (its docstring has the formulas).

(a) Load is imbalanced, and the imbalance varies by layer (and workload).
    Per layer: max/mean load, Gini and normalised entropy, for all tokens, per phase and per domain.
    Baseline 1, *uniform routing*: the same number of tokens each sent to k distinct experts drawn
    uniformly (``uniform_imbalance``: exact draws of the loads, at a cost independent of the number of
    tokens); its max/mean is > 1 only by sampling noise.
    Baseline 2, *resampling noise*: a bootstrap over requests resamples every layer's max/mean (its 2.5-97.5
    percentiles are printed); the most and the least imbalanced layers differ when the first stays above
    the second in at least 97.5% of the resamples (paired, so the upward bias a bootstrap gives a maximum
    affects both alike).
(b) Expert popularity is domain specific.
    Per layer, the Jensen-Shannon divergence (bits) between the expert-popularity vectors of two domains.
    Baseline: JS between two random halves (by request) of ONE domain, over ``num_splits`` random splits of
    every domain (mean and max). Each half holds half the requests, so it is noisier than a whole domain
    and the baseline is, if anything, too high: a conservative bar.
(c) Prefill predicts decode.
    Per request, the Pearson correlation between its prefill and its decode expert histograms (all L·E
    cells). Baseline: the same correlation for shuffled pairs (prefill of one request vs decode of another,
    ``num_shuffles`` random derangements); and a stricter one, shuffled *within* a domain, which keeps
    what the domain alone predicts and removes only what is specific to the request. Reported: mean and
    median of the matched values, the baselines' mean, median and 95th percentile, and the fraction of
    requests whose matched correlation exceeds that 95th percentile (5% by chance).

Everything is computed from the per-request statistics of one pass over the trace
(``minimoe.traces.stats``), so the findings of a trace larger than memory (a Parquet file read in batches,
on one machine or many) are the same numbers as those of the same trace in memory.

A finding that a trace cannot support (one domain label, no decode tokens, a single request, ...) is
returned as ``{"unavailable": reason}`` and printed as "not measured: reason" (``minimoe.traces.findings_table``);
the others are still measured.

``minimoe findings`` records the bundled model's workload (``minimoe.traces.bundled_trace``: held-out prompts
of four domains, prefill + 32 sampled decode tokens) or reads ``--trace FILE`` and prints the table;
``benchmarks/results/findings.txt`` holds the output of the default run.
"""

from __future__ import annotations

import numpy as np

from minimoe.traces.analysis import gini, js_divergence, max_over_mean, normalized_entropy, paired_similarity
from minimoe.traces.format import Trace
from minimoe.traces.layer_ids import known_layer_ids
from minimoe.traces.stats import TraceStats, trace_stats

DEFAULT_REQUESTS_PER_DOMAIN = 500  # x 4 domains = 2000 requests, about 260 K routed tokens
IMBALANCE_STATS = ("max_over_mean", "gini", "entropy")


def as_stats(data: Trace | TraceStats) -> TraceStats:
    """The pass-1 statistics every finding reads: ``data`` itself, or those of an in-memory trace."""
    return trace_stats(data) if isinstance(data, Trace) else data


def request_loads(trace: Trace) -> np.ndarray:
    """int64 (R, L, E): how many of request r's (token, slot) choices went to expert e in layer l."""
    r, l, e = trace.num_requests, trace.num_layers, trace.num_experts
    cells = (trace.request[:, None, None].astype(np.int64) * l + np.arange(l)[None, :, None]) * (e + 1) \
        + trace.experts.astype(np.int64) + 1  # (N, L, k); expert -1 lands in column 0, dropped below
    counts = np.bincount(cells.ravel(), minlength=r * l * (e + 1))
    return counts.reshape(r, l, e + 1)[:, :, 1:]


# ---- (a) imbalance -------------------------------------------------------------------------------------------
def uniform_imbalance(num_tokens: int, num_experts: int, top_k: int, draws: int = 200, seed: int = 0) -> dict:
    """Imbalance statistics (each (draws,)) of ``num_tokens`` tokens routed to k distinct uniform experts.

    Exact draws of the expert loads at O(draws·E·k) cost, whatever ``num_tokens``: go through the experts in
    order; a token that still has ``r`` of its k picks to make among the ``E - e`` experts left picks expert
    ``e`` with probability ``r / (E - e)`` (its k-subset is uniform), so of the ``n_r`` tokens in that state a
    Binomial(n_r, r / (E - e)) number pick ``e`` and move to state ``r - 1``. Expert e's load is the sum over
    states."""
    for name, value in (("num_tokens", num_tokens), ("draws", draws)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    rng = np.random.default_rng(seed)
    waiting = np.zeros((draws, top_k + 1), np.int64)  # [d, r]: tokens with r picks left
    waiting[:, top_k] = num_tokens
    loads = np.empty((draws, num_experts), np.int64)
    picks_left = np.arange(top_k + 1)
    for expert in range(num_experts):
        picked = rng.binomial(waiting, np.minimum(picks_left / (num_experts - expert), 1.0))  # (draws, k+1)
        loads[:, expert] = picked.sum(1)
        waiting -= picked
        waiting[:, :-1] += picked[:, 1:]
    return dict(max_over_mean=max_over_mean(loads), gini=gini(loads), entropy=normalized_entropy(loads))


def bootstrap_max_over_mean(loads: np.ndarray, draws: int = 200, seed: int = 0) -> np.ndarray:
    """(draws, L): each layer's max/mean when the R requests of ``loads`` (R, L, E) are resampled."""
    rng = np.random.default_rng(seed)
    r = loads.shape[0]
    weights = rng.multinomial(r, np.full(r, 1 / r), size=draws).astype(np.float64)  # (draws, R)
    resampled = (weights @ loads.reshape(r, -1)).reshape(draws, *loads.shape[1:])  # (draws, L, E), exact integers
    return max_over_mean(resampled)


PHASE_GROUPS = {"all": (0, 1, -1), "prefill": (0,), "decode": (1,)}  # phases


def _group_loads(stats: TraceStats, name: str) -> tuple[np.ndarray, int]:
    """(request loads (R_g, L, E) of the requests with tokens in the group, the group's tokens)."""
    if name in PHASE_GROUPS:
        tokens = stats.phase_tokens(PHASE_GROUPS[name])
        keep = tokens > 0
        return stats.phase_loads(PHASE_GROUPS[name])[keep], int(tokens.sum())
    keep = stats.domain == name
    return stats.request_loads()[keep], int(stats.class_tokens()[keep].sum())


def _imbalance_group(loads: np.ndarray, num_tokens: int, num_experts: int, top_k: int, seed: int):
    load = loads.sum(0)  # (L, E)
    stats = dict(load=load, max_over_mean=max_over_mean(load), gini=gini(load), entropy=normalized_entropy(load))
    uniform = uniform_imbalance(num_tokens, num_experts, top_k, seed=seed)
    resampled = bootstrap_max_over_mean(loads, seed=seed)  # (draws, L)
    low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
    return dict(tokens=num_tokens, requests=len(loads),
                **{name: stats[name].tolist() for name in IMBALANCE_STATS},
                max_over_mean_ci=[low.tolist(), high.tolist()], hottest_expert=stats["load"].argmax(1).tolist(),
                uniform={name: float(uniform[name].mean()) for name in IMBALANCE_STATS}
                | dict(max_over_mean_p95=float(np.percentile(uniform["max_over_mean"], 95)))), resampled


def imbalance_finding(stats: Trace | TraceStats, seed: int = 0) -> dict:
    stats = as_stats(stats)
    names = list(PHASE_GROUPS) + ([str(d) for d in np.unique(stats.domain)] if stats.has_domain else [])
    result, resampled = {}, None
    for name in names:
        loads, num_tokens = _group_loads(stats, name)
        if num_tokens:
            result[name], draws = _imbalance_group(loads, num_tokens, stats.num_experts, stats.top_k, seed)
            resampled = draws if name == "all" else resampled
        del loads
    overall = result["all"]
    most, least = int(np.argmax(overall["max_over_mean"])), int(np.argmin(overall["max_over_mean"]))
    comparison = dict(most_imbalanced_layer=most, least_imbalanced_layer=least, layers_differ_confidence=None,
                      layers_differ=None, layers_differ_unavailable=None)
    if stats.num_layers < 2:
        comparison["layers_differ_unavailable"] = "comparing layers needs at least 2 MoE layers; the trace has 1"
    elif most == least:  # argmax and argmin agree only when every layer has the same max/mean
        comparison["layers_differ_unavailable"] = (f"the layers tie: max/mean {overall['max_over_mean'][most]:.3f} "
                                                   "in every layer")
    elif stats.num_requests < 2:
        comparison["layers_differ_unavailable"] = ("comparing layers resamples requests and needs at least 2; "
                                                   "the trace has 1")
    else:
        # paired bootstrap: in how many resamples is the most imbalanced layer still above the least one
        confidence = float((resampled[:, most] > resampled[:, least]).mean())
        comparison.update(layers_differ_confidence=confidence, layers_differ=bool(confidence >= 0.975))
    return dict(groups=result, **comparison,
                above_uniform=bool(min(overall["max_over_mean"]) > overall["uniform"]["max_over_mean_p95"]))


# ---- (b) domain specificity ----------------------------------------------------------------------------------
def domain_unavailable(stats: Trace | TraceStats) -> str | None:
    """Why the domain finding cannot be measured (None when it can)."""
    stats = as_stats(stats)
    if not stats.has_domain or stats.num_requests == 0:
        return "the trace has no domain labels"
    labels, counts = np.unique(stats.domain, return_counts=True)
    if len(labels) < 2:
        return f"comparing domains needs at least 2 domain labels; every request is labelled {str(labels[0])!r}"
    if counts.max() < 2:
        return "the random-halves baseline needs a domain with at least 2 requests; every domain has 1"
    return None


def domain_finding(stats: Trace | TraceStats, num_splits: int = 100, seed: int = 0) -> dict:
    """JS divergence between domains vs random halves of one domain; domains with one request are compared
    but give no baseline. Raises ValueError when ``domain_unavailable`` gives a reason."""
    stats = as_stats(stats)
    reason = domain_unavailable(stats)
    if reason:
        raise ValueError(f"the domain finding cannot be measured: {reason}")
    loads = stats.request_loads().astype(np.float64)  # (R, L, E)
    request_domain = stats.domain
    labels = [str(d) for d in np.unique(request_domain)]
    popularity = np.stack([loads[request_domain == d].sum(0) for d in labels])  # (D, L, E)
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    per_pair = {f"{a}-{b}": js_divergence(popularity[labels.index(a)], popularity[labels.index(b)]).tolist()
                for a, b in pairs}  # (L,) each
    rng = np.random.default_rng(seed)
    baseline = {}
    for d in labels:
        members = np.flatnonzero(request_domain == d)
        if len(members) < 2:
            continue  # one request cannot be split in halves: this domain gives no baseline
        splits = np.empty((num_splits, stats.num_layers))
        for split in range(num_splits):
            order = rng.permutation(members)
            half = len(order) // 2
            splits[split] = js_divergence(loads[order[:half]].sum(0), loads[order[half:]].sum(0))
        baseline[d] = splits  # (num_splits, L)
    every_split = np.concatenate(list(baseline.values()))  # (D * num_splits, L)
    between = np.array(list(per_pair.values()))  # (pairs, L)
    return dict(labels=labels, requests={d: int((request_domain == d).sum()) for d in labels},
                baseline_domains=sorted(baseline),
                pairs={name: dict(mean=float(np.mean(v)), per_layer=v) for name, v in per_pair.items()},
                between_per_layer=dict(min=between.min(0).tolist(), mean=between.mean(0).tolist()),
                num_splits=num_splits,
                baseline={d: dict(mean=float(s.mean(1).mean()), max=float(s.mean(1).max()))
                          for d, s in baseline.items()},
                baseline_per_layer=dict(mean=every_split.mean(0).tolist(), max=every_split.max(0).tolist()),
                between_min=float(between.mean(1).min()), between_mean=float(between.mean()),
                baseline_mean=float(every_split.mean()), baseline_max=float(every_split.mean(1).max()),
                above_baseline=bool((between.min(0) > every_split.max(0)).all()))


# ---- (c) prefill predicts decode -----------------------------------------------------------------------------
def _summary(shuffles: list[np.ndarray]) -> dict:
    """Mean, median, p95 of all shuffled values pooled, and the largest mean of one shuffle."""
    values = np.concatenate(shuffles)
    return dict(mean=float(values.mean()), median=float(np.median(values)), p95=float(np.percentile(values, 95)),
                max_shuffle_mean=float(max(s.mean() for s in shuffles)))


def _phase_counts(stats: TraceStats, requests=None):
    """(prefill counts, decode counts (R_sel, L, E), present bool (R_sel,), tokens (R_sel, 3) of prefill, decode and
    unknown phase) of all or the selected requests."""
    rows = slice(None) if requests is None else requests
    tokens = np.stack([stats.phase_tokens(phase)[rows] for phase in (0, 1, -1)], axis=1)
    present = (tokens[:, 0] > 0) & (tokens[:, 1] > 0)
    return stats.phase_loads(0)[rows], stats.phase_loads(1)[rows], present, tokens


def prefill_decode_unavailable(stats: Trace | TraceStats, requests=None) -> str | None:
    """Why prefill -> decode prediction cannot be measured (None when it can); ``requests``: a bool mask
    (R,) of the requests to consider (default: all)."""
    stats = as_stats(stats)
    prefill, decode, present, tokens = _phase_counts(stats, requests)
    if tokens[:, 2].sum() and not tokens[:, :2].sum():
        return ("phases unknown: the source did not say which tokens are prompt and which are generated (give "
                "minimoe import --prompt-lengths for vLLM/SGLang captures, or a phase field in a JSONL log)")
    if not tokens[:, 1].sum():
        return "the trace has no decode tokens (phase 1)"
    if not tokens[:, 0].sum():
        return "the trace has no prefill tokens (phase 0)"
    try:
        paired_similarity(prefill, decode, present, seed=0)
    except ValueError as error:
        return str(error)
    return None


def prefill_decode_finding(stats: Trace | TraceStats, num_shuffles: int = 10, seed: int = 0) -> dict:
    """Matched vs shuffled prefill/decode correlations. Raises ValueError when ``prefill_decode_unavailable``
    gives a reason."""
    stats = as_stats(stats)
    prefill, decode, present, _ = _phase_counts(stats)
    runs = [paired_similarity(prefill, decode, present, seed=seed + s) for s in range(num_shuffles)]
    matched = runs[0].matched  # (n,) the same in every run; only the pairing of the shuffled values changes
    result = dict(metric="pearson", requests=len(matched), num_shuffles=num_shuffles,
                  matched=dict(mean=float(matched.mean()), median=float(np.median(matched))),
                  shuffled=_summary([run.shuffled for run in runs]))
    result["fraction_above_shuffled_p95"] = float((matched > result["shuffled"]["p95"]).mean())
    by_domain = [stats.domain == d for d in np.unique(stats.domain)] if stats.has_domain else []
    by_domain = [part for part in by_domain if prefill_decode_unavailable(stats, part) is None]  # >= 2 usable
    if len(by_domain) >= 2:  # with one domain, shuffling within it is the plain shuffle again
        parts = [_phase_counts(stats, part)[:3] for part in by_domain]
        within = [np.concatenate([paired_similarity(*part, seed=seed + s).shuffled for part in parts])
                  for s in range(num_shuffles)]  # one within-domain shuffle of every request per entry
        result["within_domain"] = _summary(within)
        result["fraction_above_within_domain_p95"] = float((matched > result["within_domain"]["p95"]).mean())
    # a permutation test on the mean: the matched mean beats the mean of every shuffle
    result["above_baseline"] = bool(result["matched"]["mean"] > result["shuffled"]["max_shuffle_mean"])
    return result


def findings(trace: Trace, seed: int = 0, num_splits: int = 100, num_shuffles: int = 10) -> dict:
    """The three findings of ``trace`` with their baselines, as a JSON-ready dict (see the module docstring)."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a minimoe.traces.format.Trace, got {type(trace).__name__}")
    if trace.num_tokens == 0:
        raise ValueError("the trace is empty")
    return findings_of_stats(trace_stats(trace, sample_size=1), seed, num_splits, num_shuffles, trace.layer_ids)


def findings_of_stats(stats: TraceStats, seed: int = 0, num_splits: int = 100, num_shuffles: int = 10,
                      layer_ids=None) -> dict:
    """``findings`` from the statistics of one pass (``minimoe.traces.stats``) over a trace of any size;
    ``layer_ids`` (int (L,), the trace's model layer of each MoE layer, -1 = unknown) name the layers in the table
    when every one is known."""
    if stats.num_tokens == 0:
        raise ValueError("the trace is empty")
    domains = stats.domain
    prefill_tokens, decode_tokens = int(stats.phase_tokens(0).sum()), int(stats.phase_tokens(1).sum())
    domain_reason, paired_reason = domain_unavailable(stats), prefill_decode_unavailable(stats)
    return dict(
        trace=dict(model=stats.model, tokens=stats.num_tokens, requests=stats.num_requests,
                   layers=stats.num_layers, experts=stats.num_experts, top_k=stats.top_k,
                   layer_ids=None if layer_ids is None else known_layer_ids(layer_ids), prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                   requests_per_domain={str(d): int((domains == d).sum()) for d in np.unique(domains)}),
        imbalance=imbalance_finding(stats, seed),
        # a finding the trace cannot support is {"unavailable": why}, and the others are still measured
        domain={"unavailable": domain_reason} if domain_reason else domain_finding(stats, num_splits, seed),
        prefill_decode=({"unavailable": paired_reason} if paired_reason
                        else prefill_decode_finding(stats, num_shuffles, seed)),
    )
