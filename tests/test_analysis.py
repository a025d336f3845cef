"""Every analysis function against a brute-force python computation on small random traces."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimoe.traces import analysis
from minimoe.traces import Trace

FUZZ = settings(max_examples=25, deadline=None)


def random_trace(seed, num_requests=6, num_layers=3, num_experts=6, top_k=2, holes=0.1):
    rng = np.random.default_rng(seed)
    prompt, decode = rng.integers(1, 6, num_requests), rng.integers(1, 5, num_requests)
    lengths = prompt + decode
    n = int(lengths.sum())
    experts = np.argsort(rng.random((n, num_layers, num_experts)) ** rng.uniform(0.2, 3, num_experts), axis=2)
    experts = experts[..., :top_k]
    experts[rng.random(experts.shape) < holes] = -1
    labels = rng.choice(["code", "math", "chat"], num_requests)
    return Trace(experts=experts, request=np.repeat(np.arange(num_requests), lengths),
                 phase=np.concatenate([np.repeat([0, 1], [p, d]) for p, d in zip(prompt, decode)]),
                 domain=np.repeat(labels, lengths), num_experts=num_experts, top_k=top_k)


def brute_load(trace, rows=None):
    load = [[0] * trace.num_experts for _ in range(trace.num_layers)]
    for n in range(trace.num_tokens) if rows is None else rows:
        for l in range(trace.num_layers):
            for e in trace.experts[n, l]:
                if e >= 0:
                    load[l][e] += 1
    return np.array(load)


seeds = st.integers(0, 10**6)
shapes = dict(num_requests=st.integers(2, 7), num_layers=st.integers(1, 4), num_experts=st.integers(2, 9))


@FUZZ
@given(seed=seeds, **shapes)
def test_load_and_imbalance_match_brute_force(seed, num_requests, num_layers, num_experts):
    trace = random_trace(seed, num_requests, num_layers, num_experts, top_k=min(2, num_experts))
    load = brute_load(trace)
    np.testing.assert_array_equal(analysis.expert_load(trace), load)
    stats = analysis.layer_imbalance(trace)
    for l, row in enumerate(load):
        if sum(row) == 0:
            continue
        mean = sum(row) / len(row)
        assert stats["max_over_mean"][l] == pytest.approx(max(row) / mean)
        pairs = sum(abs(a - b) for a in row for b in row)
        assert stats["gini"][l] == pytest.approx(pairs / (2 * len(row) ** 2 * mean), abs=1e-12)
        entropy = -sum(x / sum(row) * math.log(x / sum(row)) for x in row if x)
        assert stats["entropy"][l] == pytest.approx(entropy / math.log(len(row)), abs=1e-12)


def test_imbalance_known_values_and_errors():
    assert analysis.gini([5, 5, 5, 5]) == 0 and analysis.gini([0, 0, 0, 8]) == pytest.approx(0.75)
    assert analysis.max_over_mean([1, 3]) == pytest.approx(1.5)
    assert analysis.normalized_entropy([2, 2, 2, 2]) == pytest.approx(1.0)
    assert analysis.normalized_entropy([0, 7, 0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="sums to 0"):
        analysis.gini([[1, 2], [0, 0]])
    with pytest.raises(ValueError, match="non-negative"):
        analysis.max_over_mean([1, -1])


def brute_js(p, q):
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a: sum(x * math.log2(x / y) for x, y in zip(a, m) if x > 0)
    return 0.5 * kl(p) + 0.5 * kl(q)


@FUZZ
@given(seed=seeds, **shapes)
def test_domain_popularity_and_divergence_match_brute_force(seed, num_requests, num_layers, num_experts):
    trace = random_trace(seed, num_requests, num_layers, num_experts, top_k=min(2, num_experts), holes=0.0)
    labels, popularity = analysis.domain_popularity(trace)
    assert labels.tolist() == sorted(set(trace.domain.tolist()))
    for d, label in enumerate(labels):
        load = brute_load(trace, [n for n in range(trace.num_tokens) if trace.domain[n] == label])
        np.testing.assert_allclose(popularity[d], load / load.sum(1, keepdims=True))
    labels, js = analysis.domain_divergence(trace)
    for a, b in itertools.product(range(len(labels)), repeat=2):
        expected = np.mean([brute_js(popularity[a, l], popularity[b, l]) for l in range(num_layers)])
        assert js[a, b] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(np.diag(js), 0, atol=1e-12)


def test_split_divergence_matches_brute_force_halves():
    trace = random_trace(4, num_requests=20)
    domain = trace.request_domains()[0]
    baseline = analysis.split_divergence(trace, domain, num_splits=3, seed=7)
    rng = np.random.default_rng(7)  # the same draws, done by hand
    members = [r for r in range(trace.num_requests) if trace.request_domains()[r] == domain]
    for split in range(3):
        order = rng.permutation(np.array(members))
        halves = [set(order[:len(order) // 2].tolist()), set(order[len(order) // 2:].tolist())]
        loads = [brute_load(trace, [n for n in range(trace.num_tokens) if trace.request[n] in h]) for h in halves]
        expected = np.mean([brute_js(loads[0][l], loads[1][l]) for l in range(trace.num_layers)])
        assert baseline[split] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        analysis.split_divergence(trace, "nothing")


def brute_similarity(x, y, metric):
    if metric == "cosine":
        return sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


@FUZZ
@given(seed=seeds, metric=st.sampled_from(["pearson", "cosine"]), **shapes)
def test_prefill_decode_similarity_matches_brute_force(seed, metric, num_requests, num_layers, num_experts):
    trace = random_trace(seed, num_requests, num_layers, num_experts, top_k=min(2, num_experts - 1))

    def histogram(r, phase):
        rows = [n for n in range(trace.num_tokens) if trace.request[n] == r and trace.phase[n] == phase]
        return brute_load(trace, rows).reshape(-1).tolist()

    def defined(h):
        return any(h) if metric == "cosine" else len(set(h)) > 1
    qualifying = [r for r in range(trace.num_requests) if defined(histogram(r, 0)) and defined(histogram(r, 1))]
    if len(qualifying) < 2:
        with pytest.raises(ValueError, match="at least 2"):
            analysis.prefill_decode_similarity(trace, metric=metric, seed=seed)
        return
    result = analysis.prefill_decode_similarity(trace, metric=metric, seed=seed)
    assert result.requests.tolist() == qualifying
    for i, r in enumerate(result.requests):
        x, y = histogram(r, 0), histogram(r, 1)
        assert result.matched[i] == pytest.approx(brute_similarity(x, y, metric), abs=1e-9)
        # the shuffled value is the similarity with some other compared request's decode histogram
        candidates = [s for s in result.requests if s != r and
                      abs(brute_similarity(x, histogram(s, 1), metric) - result.shuffled[i]) < 1e-9]
        assert candidates
    assert np.isfinite(result.matched).all() and np.isfinite(result.shuffled).all()


def test_prefill_decode_similarity_separates_real_from_shuffled():
    """Requests whose decode reuses their prefill experts: matched ≈ 1, shuffled much lower."""
    rng = np.random.default_rng(0)
    rows, request, phase = [], [], []
    for r in range(30):
        favourite = rng.permutation(16)[:2]  # each request uses its own two experts in both phases
        for p, count in ((0, 6), (1, 4)):
            rows += [np.tile(favourite, (2, 1))] * count
            request += [r] * count
            phase += [p] * count
    trace = Trace(experts=np.array(rows), request=request, phase=phase, domain=None, num_experts=16, top_k=2)
    result = analysis.prefill_decode_similarity(trace)
    np.testing.assert_allclose(result.matched, 1.0)
    assert result.shuffled.mean() < 0.3
    with pytest.raises(ValueError, match="metric"):
        analysis.prefill_decode_similarity(trace, metric="spearman")
    with pytest.raises(ValueError, match="at least 2"):
        analysis.prefill_decode_similarity(trace.where(phase=0))


@FUZZ
@given(seed=seeds, top_k=st.integers(1, 3), **shapes)
def test_coactivation_and_transitions_match_brute_force(seed, top_k, num_requests, num_layers, num_experts):
    top_k = min(top_k, num_experts)
    trace = random_trace(seed, num_requests, num_layers, num_experts, top_k=top_k)
    e = num_experts
    co = np.zeros((num_layers, e, e), int)
    tr = np.zeros((num_layers - 1, e, e), int)
    for n in range(trace.num_tokens):
        for l in range(num_layers):
            chosen = [x for x in trace.experts[n, l] if x >= 0]
            for i in chosen:
                for j in chosen:
                    co[l, i, j] += 1  # i == j adds the token once to the diagonal: the load
            if l + 1 < num_layers:
                for i in chosen:
                    for j in trace.experts[n, l + 1]:
                        if j >= 0:
                            tr[l, i, j] += 1
    np.testing.assert_array_equal(analysis.coactivation(trace), co)
    np.testing.assert_array_equal(analysis.layer_transitions(trace), tr)


def test_empty_selection_is_handled():
    trace = random_trace(1)
    empty = trace.where(domain="nothing")
    np.testing.assert_array_equal(analysis.expert_load(empty), 0)
    assert analysis.coactivation(empty).sum() == 0 and analysis.layer_transitions(empty).sum() == 0
    with pytest.raises(ValueError, match="sums to 0"):
        analysis.layer_imbalance(empty)
