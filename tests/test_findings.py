"""minimoe.traces.findings: planted traces whose answer is known by construction, then the bundled model.

The planted traces are built with ``Trace`` directly. Each token of request r (domain d) picks its k experts
in layer l by sampling without replacement (Gumbel top-k) from

    log p[e] ∝ skew[l]·[e == 0] + domain_strength[l]·D[l, d, e] + request_strength·Q[l, r, e]

with D, Q standard normal, and the same table for prompt (prefill) and generated (decode) tokens. Turning a
knob on or off decides what each finding must report: a skewed layer, domain-specific layers, prefill that
predicts decode through the domain only or through the request itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from minimoe.traces import analysis
from minimoe.cli import main
from minimoe.traces.findings import findings, request_loads, uniform_imbalance
from minimoe.traces.findings_table import format_findings
from minimoe.traces import Trace
from minimoe.traces import bundled_trace


def planted(seed=0, num_domains=4, requests_per_domain=30, prompt_len=24, decode_len=16, num_experts=16, top_k=2,
            skew=(0.0, 0.0, 0.0), domain_strength=(0.0, 0.0, 0.0), request_strength=0.0) -> Trace:
    rng = np.random.default_rng(seed)
    num_layers, num_requests = len(skew), num_domains * requests_per_domain
    request_domain = rng.permutation(np.repeat(np.arange(num_domains), requests_per_domain))
    length = prompt_len + decode_len
    request = np.repeat(np.arange(num_requests), length)
    experts = np.empty((len(request), num_layers, top_k), np.int16)
    for layer in range(num_layers):
        logits = np.zeros((num_requests, num_experts))  # (R, E)
        logits[:, 0] += skew[layer]
        logits += domain_strength[layer] * rng.normal(size=(num_domains, num_experts))[request_domain]
        logits += request_strength * rng.normal(size=(num_requests, num_experts))
        scores = logits[request] + rng.gumbel(size=(len(request), num_experts))  # (N, E)
        experts[:, layer] = np.argsort(-scores, axis=1)[:, :top_k]
    phase = np.tile(np.r_[np.zeros(prompt_len), np.ones(decode_len)].astype(np.int8), num_requests)
    labels = np.array(["code", "math", "chat", "general", "x", "y"])[:num_domains]
    return Trace(experts=experts, request=request, phase=phase, domain=labels[request_domain[request]],
                 num_experts=num_experts, top_k=top_k, model="planted")


def test_request_loads_match_a_python_count():
    trace = planted(seed=1, requests_per_domain=3, prompt_len=3, decode_len=2, num_experts=5)
    expected = np.zeros((trace.num_requests, trace.num_layers, trace.num_experts), np.int64)
    for n in range(trace.num_tokens):
        for l in range(trace.num_layers):
            for e in trace.experts[n, l]:
                expected[trace.request[n], l, e] += 1
    np.testing.assert_array_equal(request_loads(trace), expected)


def test_uniform_baseline_picks_distinct_experts_and_converges_to_balance():
    every = uniform_imbalance(1000, num_experts=6, top_k=6, draws=3)  # k = E: each token takes every expert once
    np.testing.assert_allclose(every["max_over_mean"], 1.0)
    np.testing.assert_allclose(every["gini"], 0.0, atol=1e-12)
    big = uniform_imbalance(400_000, num_experts=8, top_k=2, draws=3)
    assert (big["max_over_mean"] < 1.01).all() and (big["max_over_mean"] > 1.0).all()
    with pytest.raises(ValueError, match="top_k"):
        uniform_imbalance(10, num_experts=4, top_k=5)


def test_findings_reuse_the_analysis_statistics():
    trace = planted(skew=(0.0, 1.0, 0.0), domain_strength=(0.0, 1.0, 2.0), request_strength=1.0)
    result = findings(trace)
    stats = analysis.layer_imbalance(trace)
    for name in ("max_over_mean", "gini", "entropy"):
        np.testing.assert_allclose(result["imbalance"]["groups"]["all"][name], stats[name])
    decode = analysis.layer_imbalance(trace.where(phase="decode"))
    np.testing.assert_allclose(result["imbalance"]["groups"]["decode"]["max_over_mean"], decode["max_over_mean"])
    labels, js = analysis.domain_divergence(trace)
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            if f"{a}-{b}" in result["domain"]["pairs"]:
                assert result["domain"]["pairs"][f"{a}-{b}"]["mean"] == pytest.approx(js[i, j], abs=1e-12)
    matched = analysis.prefill_decode_similarity(trace).matched
    assert result["prefill_decode"]["matched"]["mean"] == pytest.approx(matched.mean(), abs=1e-12)
    assert result["trace"]["requests"] == 120 and result["trace"]["decode_tokens"] == 120 * 16


def test_imbalance_finds_the_skewed_layer():
    result = findings(planted(skew=(0.0, 2.0, 0.0)))["imbalance"]
    groups = result["groups"]["all"]
    assert result["most_imbalanced_layer"] == 1 and groups["hottest_expert"][1] == 0
    assert groups["max_over_mean"][1] > 3.0  # exp(2) times the odds of the others
    for layer in (0, 2):  # uniform layers: inside the uniform-routing baseline
        assert groups["max_over_mean"][layer] < groups["uniform"]["max_over_mean_p95"] + 0.02
    assert result["layers_differ"] and result["layers_differ_confidence"] == 1.0
    assert not result["above_uniform"]


def test_balanced_layers_do_not_differ():
    result = findings(planted())["imbalance"]
    assert not result["layers_differ"] and not result["above_uniform"]


def test_layers_that_tie_are_said_to_tie_not_compared_with_themselves():
    experts = np.tile(np.array([[[0, 1], [0, 1]], [[2, 3], [2, 3]]]), (4, 1, 1))  # both layers route alike
    trace = Trace(experts=experts, request=np.repeat(np.arange(4), 2), phase=np.tile([0, 1], 4), domain=None,
                  num_experts=4, top_k=2)
    result = findings(trace)
    assert result["imbalance"]["layers_differ"] is None
    text = format_findings(result)
    assert "layers not compared (the layers tie: max/mean 1.000 in every layer)" in text
    assert "layer 0 above layer 0" not in text


def test_domain_blind_routing_stays_within_the_random_split_baseline():
    result = findings(planted(request_strength=0.5))["domain"]
    assert not result["above_baseline"]
    assert result["between_mean"] < 2 * result["baseline_mean"]  # measured ratio: about 1
    assert result["between_min"] < result["baseline_max"]


def test_domain_specific_layer_is_found_layer_by_layer():
    result = findings(planted(domain_strength=(0.0, 0.0, 2.0)))["domain"]
    between, baseline = result["between_per_layer"], result["baseline_per_layer"]
    assert between["min"][2] > 10 * baseline["max"][2]  # the planted layer
    for layer in (0, 1):
        assert between["min"][layer] < baseline["max"][layer]
    assert not result["above_baseline"]  # it needs every layer


def test_memoryless_decode_is_not_predicted():
    result = findings(planted())["prefill_decode"]
    assert abs(result["matched"]["mean"] - result["shuffled"]["mean"]) < 0.05
    assert result["fraction_above_shuffled_p95"] < 0.15


def test_domain_only_prediction_is_explained_by_the_within_domain_baseline():
    result = findings(planted(domain_strength=(2.0, 2.0, 2.0)))["prefill_decode"]
    assert result["above_baseline"]
    assert result["matched"]["mean"] > result["shuffled"]["max_shuffle_mean"] + 0.3
    assert abs(result["matched"]["mean"] - result["within_domain"]["mean"]) < 0.05


def test_request_specific_prediction_beats_both_baselines():
    result = findings(planted(domain_strength=(1.0, 1.0, 1.0), request_strength=2.0))["prefill_decode"]
    assert result["matched"]["mean"] > result["within_domain"]["max_shuffle_mean"] + 0.2
    assert result["fraction_above_within_domain_p95"] > 0.5


def test_the_command_reads_a_trace_and_writes_json(tmp_path, capsys):
    trace = planted(domain_strength=(0.0, 1.0, 1.0))
    trace.save(tmp_path / "t.npz")
    assert main(["findings", "--trace", str(tmp_path / "t.npz"), "--out", str(tmp_path / "f.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(format_findings(findings(trace)))
    assert json.loads((tmp_path / "f.json").read_text()) == json.loads(json.dumps(findings(trace)))
    with pytest.raises(SystemExit):
        main(["findings", "--requests-per-domain", "1"])


def test_tiny_traces_print_no_empty_interval_label_or_ratio():
    one = planted(num_domains=1, requests_per_domain=1)
    text = format_findings(findings(one))
    assert ": 1 request (" in text and "1 requests" not in text
    assert "all: bootstrap 2.5-97.5%    not measured: one request" in text
    trace = planted(num_domains=2, requests_per_domain=4)
    unlabelled = Trace(experts=trace.experts, request=trace.request, phase=trace.phase,
                       domain=np.full(trace.num_tokens, ""), num_experts=trace.num_experts, top_k=trace.top_k)
    text = format_findings(findings(unlabelled))
    assert "8 requests ((empty label) 8)" in text and "\n  (empty label) (" in text
    same = np.zeros_like(trace.experts)
    same[..., 1] = 1  # every token of every domain routes to experts 0 and 1: every JS is 0
    text = format_findings(findings(Trace(experts=same, request=trace.request, phase=trace.phase, domain=trace.domain,
                                          num_experts=trace.num_experts, top_k=trace.top_k)))
    assert "largest random-split JS 0.0000: ratio not measured (both are 0)" in text and "infinitely" not in text


def test_save_trace_is_refused_with_a_saved_trace(tmp_path, capsys):
    planted().save(tmp_path / "t.npz")
    assert main(["findings", "--trace", str(tmp_path / "t.npz"), "--save-trace", str(tmp_path / "copy.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minimoe findings: error: --save-trace ") and "is a saved trace already" in err
    assert err.count("\n") == 1 and not (tmp_path / "copy.npz").exists()


def test_bad_input():
    with pytest.raises(TypeError, match="Trace"):
        findings("trace.npz")


# ---- the bundled model: a small held-out workload (20 requests per domain, a few seconds) ----------------------
@pytest.fixture(scope="module")
def bundled():
    trace = bundled_trace(20)
    return trace, findings(trace)


def test_same_seed_same_trace_same_findings(bundled):
    trace, result = bundled
    again = bundled_trace(20)
    assert again == trace
    assert findings(again) == result


def test_bundled_model_shows_the_three_findings(bundled):
    # margins are about half of what was measured on this trace (see benchmarks/results/findings.txt for 2000)
    trace, result = bundled
    assert trace.num_requests == 80 and result["trace"]["requests_per_domain"] == dict.fromkeys(
        ["chat", "code", "general", "math"], 20)
    groups = result["imbalance"]["groups"]
    assert min(groups["all"]["max_over_mean"]) > groups["all"]["uniform"]["max_over_mean_p95"] + 0.05  # 1.25 vs 1.11
    for domain in ("chat", "code", "general", "math"):  # one domain alone is far less balanced than the mix
        assert np.mean(groups[domain]["max_over_mean"]) > 1.5 * np.mean(groups["all"]["max_over_mean"])  # >= 2.1x
    domain = result["domain"]
    assert domain["between_min"] > 3 * domain["baseline_mean"]  # measured 6.6x
    assert domain["between_mean"] > 7 * domain["baseline_mean"]  # measured 14x
    paired = result["prefill_decode"]
    assert paired["above_baseline"]
    assert paired["matched"]["mean"] > paired["shuffled"]["max_shuffle_mean"] + 0.25  # 0.50 vs 0.03
    assert paired["fraction_above_shuffled_p95"] > 0.2  # 0.39
    assert paired["matched"]["mean"] > paired["within_domain"]["mean"] + 0.05  # 0.50 vs 0.36
