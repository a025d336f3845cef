"""Importers: vLLM routed-experts arrays and JSONL routing logs reproduce the trace they were written from."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimoe.traces import from_jsonl, from_sglang, from_vllm
from minimoe.traces import Trace

FUZZ = settings(max_examples=25, deadline=None)


def reference(seed=0, num_requests=4, num_layers=3, num_experts=16, top_k=2):
    """A trace whose requests are a prompt (phase 0) followed by decode steps (phase 1)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 6, num_requests)
    decode = rng.integers(0, 4, num_requests)
    lengths = prompt + decode
    n = int(lengths.sum())
    experts = np.argsort(rng.random((n, num_layers, num_experts)), axis=2)[..., :top_k]
    phase = np.concatenate([np.repeat([0, 1], [p, d]) for p, d in zip(prompt, decode)])
    labels = rng.choice(["code", "math", "chat"], num_requests)
    trace = Trace(experts=experts, request=np.repeat(np.arange(num_requests), lengths), phase=phase,
                  domain=np.repeat(labels, lengths), num_experts=num_experts, top_k=top_k, model="m",
                  weights=rng.random((n, num_layers, top_k)))
    return trace, prompt, labels


def test_from_vllm_rebuilds_requests_phases_and_domains():
    trace, prompt, labels = reference(1)
    starts, ends = trace.request_ranges()
    arrays = [trace.experts[s:e].astype(np.int16) for s, e in zip(starts, ends)]
    imported = from_vllm(arrays, num_experts=16, prompt_lengths=prompt, domains=list(labels), model="m")
    trace.weights = None
    assert imported == trace
    unknown = from_vllm(arrays, num_experts=16)
    assert (unknown.phase == -1).all() and unknown.domain.shape == (0,)


def test_from_vllm_keeps_only_moe_layers_and_drops_empty_requests():
    trace, prompt, _ = reference(2, num_layers=4)
    starts, ends = trace.request_ranges()
    arrays = [trace.experts[s:e] for s, e in zip(starts, ends)]
    arrays.insert(1, np.zeros((0, 4, 2), np.int16))  # a request with no rows
    imported = from_vllm(arrays, num_experts=16, moe_layers=[1, 3])
    np.testing.assert_array_equal(imported.experts, trace.experts[:, [1, 3]])
    np.testing.assert_array_equal(imported.request, trace.request)


@pytest.mark.parametrize("kwargs, message", [
    (dict(routed_experts=[]), "empty"),
    (dict(routed_experts=[np.zeros((2, 3), int)]), "routed_experts\\[0\\]"),
    (dict(routed_experts=[np.zeros((2, 3, 2), float)]), "integer"),
    (dict(routed_experts=[np.zeros((2, 3, 2), int), np.zeros((2, 4, 2), int)]), "routed_experts\\[1\\]"),
    (dict(routed_experts=[np.full((2, 3, 2), 16)]), "experts ids"),
    (dict(routed_experts=[np.zeros((2, 3, 2), int)]), "repeats"),
    (dict(routed_experts=[np.array([[[0, 1]]])], prompt_lengths=[2]), "prompt_lengths"),
    (dict(routed_experts=[np.array([[[0, 1]]])], domains=["a", "b"]), "domains"),
    (dict(routed_experts=[np.array([[[0, 1]]])], moe_layers=[1]), "moe_layers"),
])
def test_from_vllm_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_vllm(num_experts=16, **kwargs)


def to_jsonl(trace, rng, drop_padding=True):
    """Write one line per token, requests interleaved at random, each line carrying its position."""
    starts, _ = trace.request_ranges()
    lines = []
    for n in range(trace.num_tokens):
        r = int(trace.request[n])
        experts = trace.experts[n].tolist()
        weights = trace.weights[n].astype(float).tolist()
        if drop_padding:  # write only the real ids; the importer pads with -1 / 0.0
            weights = [[w for w, e in zip(wr, er) if e >= 0] for wr, er in zip(weights, experts)]
            experts = [[e for e in er if e >= 0] for er in experts]
        lines.append(json.dumps(dict(request=f"req-{r}", phase=["prefill", "decode"][trace.phase[n]],
                                     domain=str(trace.domain[n]), position=n - int(starts[r]),
                                     experts=experts, weights=weights)))
    order = rng.permutation(len(lines))
    # requests must keep their first-appearance order: put each request's first token in order first
    firsts = [int(s) for s in starts]
    rest = [i for i in order if i not in set(firsts)]
    return [lines[i] for i in firsts + rest]


def test_from_jsonl_round_trip(tmp_path):
    trace, _, _ = reference(3, num_requests=5)
    trace.experts[0, 1, 1] = -1  # a token that used fewer than top_k experts in one layer
    trace.weights[0, 1, 1] = 0.0
    path = tmp_path / "routes.jsonl"
    path.write_text("\n".join(to_jsonl(trace, np.random.default_rng(0))) + "\n\n")
    imported = from_jsonl(path, num_experts=16, top_k=2, model="m")
    assert imported == trace
    assert from_jsonl(path.read_text().splitlines(), num_experts=16, model="m") == trace  # top_k inferred


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not valid JSON"),
    ("[" * 100000, "line 1: not valid JSON"),
    ('[1, 2]', "line 1: expected an object"),
    ('{"request": 0}', "line 1: expected an object"),
    ('{"request": 0, "experts": [[1, 2]], "colour": 1}', "unknown keys"),
    ('{"request": true, "experts": [[1, 2]]}', "request must be"),
    ('{"request": 0, "experts": [1, 2]}', "per-layer lists"),
    ('{"request": 0, "experts": []}', "per-layer lists"),
    ('{"request": 0, "experts": [[1, 99]]}', "expert id 99"),
    ('{"request": 0, "experts": [[1, 1e400]]}', "must hold ints"),
    ('{"request": 0, "experts": [[1, 2, 3]]}', "more than top_k=2"),
    ('{"request": 0, "experts": [[1, 2]], "phase": "warmup"}', "phase"),
    ('{"request": 0, "experts": [[1, 2]], "domain": 3}', "domain must be a str"),
    ('{"request": 0, "experts": [[1, 2]], "position": 1.5}', "position"),
    ('{"request": 0, "experts": [[1, 2]], "weights": [[NaN, 1]]}', "finite"),
    ('{"request": 0, "experts": [[1, 2]], "weights": [[1]]}', "same nesting"),
    ('{"request": 0, "experts": [[1, 2]], "weights": [["a", 1]]}', "must hold numbers"),
])
def test_from_jsonl_rejects_bad_lines(line, message):
    with pytest.raises(ValueError, match=message):
        from_jsonl([line], num_experts=16, top_k=2)


def test_from_jsonl_rejects_inconsistent_files():
    a = '{"request": 0, "position": 0, "experts": [[1, 2]], "domain": "code"}'
    with pytest.raises(ValueError, match="'domain' is given on some lines"):
        from_jsonl([a, '{"request": 0, "position": 1, "experts": [[1, 2]]}'], num_experts=16)
    with pytest.raises(ValueError, match="repeats position 0"):
        from_jsonl([a, a], num_experts=16)
    with pytest.raises(ValueError, match="2 layers"):
        from_jsonl([a, '{"request": 1, "position": 0, "experts": [[1, 2], [3, 4]], "domain": "code"}'],
                   num_experts=16)
    with pytest.raises(ValueError, match="constant within a request"):
        from_jsonl([a, a.replace('"position": 0', '"position": 1').replace("code", "math")], num_experts=16)
    with pytest.raises(ValueError, match="no records"):
        from_jsonl(["", "  "], num_experts=16)


@FUZZ
@given(lines=st.lists(st.one_of(st.text(max_size=40), st.from_regex(r'\{"request": [0-9], "experts": .{0,20}\}',
                                                                     fullmatch=True)), max_size=5))
def test_from_jsonl_fuzz_only_value_errors(lines):
    try:
        trace = from_jsonl(lines, num_experts=8)
    except ValueError:
        return
    trace.validate()


def test_from_sglang_decodes_base64_and_drops_dense_layers():
    import base64
    trace, prompt, labels = reference(4, num_layers=2)
    starts, ends = trace.request_ranges()
    payloads = []
    for s, e in zip(starts, ends):
        rows = np.full((e - s, 3, 2), -1, np.int32)  # layer 0 is dense: all -1
        rows[:, 1:] = trace.experts[s:e]
        payloads.append(base64.b64encode(rows.astype("<i4").tobytes()).decode())
    imported = from_sglang(payloads, num_layers=3, top_k=2, num_experts=16, prompt_lengths=prompt,
                           domains=list(labels), model="m")
    trace.weights = None
    assert imported == trace
    with pytest.raises(ValueError, match="not base64"):
        from_sglang(["@@@"], num_layers=3, top_k=2, num_experts=16)
    with pytest.raises(ValueError, match="multiple of"):
        from_sglang([np.zeros(5, np.int32)], num_layers=3, top_k=2, num_experts=16)
