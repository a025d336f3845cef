"""Importers: vLLM routed-experts arrays and JSONL routing logs reproduce the trace they were written from."""

import json
import re

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
    assert imported.layer_ids.tolist() == [0, 1, 2]  # axis 1 of a capture: the model's decoder layers
    trace.layer_ids = imported.layer_ids
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
    (dict(routed_experts=[np.full((2, 3, 2), 16)]), r"routed_experts\[0\] row 0, layer 0 holds \[16, 16\]"),
    (dict(routed_experts=[np.zeros((2, 3, 2), int)]), r"repeats an expert id: \[0, 0\] \(all 0: SGLang and vLLM"),
    (dict(routed_experts=[np.array([[[0, 1]]])], prompt_lengths=[2]), "prompt_lengths"),
    (dict(routed_experts=[np.array([[[0, 1]]])], domains=["a", "b"]), "domains"),
    (dict(routed_experts=[np.array([[[0, 1]]])], moe_layers=[1]), "moe_layers"),
])
def test_from_vllm_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_vllm(num_experts=16, **kwargs)


def to_jsonl(trace, rng):
    """Write one line per token, requests interleaved at random, each line carrying its position."""
    starts, _ = trace.request_ranges()
    lines = []
    for n in range(trace.num_tokens):
        r = int(trace.request[n])
        lines.append(json.dumps(dict(request=f"req-{r}", phase=["prefill", "decode"][trace.phase[n]],
                                     domain=str(trace.domain[n]), position=n - int(starts[r]),
                                     experts=trace.experts[n].tolist(),
                                     weights=trace.weights[n].astype(float).tolist())))
    order = rng.permutation(len(lines))
    # requests must keep their first-appearance order: put each request's first token in order first
    firsts = [int(s) for s in starts]
    rest = [i for i in order if i not in set(firsts)]
    return [lines[i] for i in firsts + rest]


def test_from_jsonl_round_trip(tmp_path):
    trace, _, _ = reference(3, num_requests=5)
    trace.experts[0, 1, 1] = -1  # a pair the router dropped: written as -1, every list holds top_k ids
    trace.weights[0, 1, 1] = 0.0
    path = tmp_path / "routes.jsonl"
    path.write_text("\n".join(to_jsonl(trace, np.random.default_rng(0))) + "\n\n")
    imported = from_jsonl(path, num_experts=16, top_k=2, model="m")
    assert imported == trace
    assert from_jsonl(path.read_text().splitlines(), num_experts=16, model="m") == trace  # top_k inferred


def test_from_jsonl_refuses_lists_of_another_length_than_top_k():
    lines = ['{"request": 0, "experts": [[1, 2]]}', '{"request": 0, "experts": [[1, 2, 3]]}']
    with pytest.raises(ValueError, match=r"^line 2: 'experts' lists 3 ids where line 1 lists 2 \(every record"):
        from_jsonl(lines, num_experts=16)
    with pytest.raises(ValueError, match=r"^line 1: 'experts' lists 1 id where --top-k 2 was passed"):
        from_jsonl(['{"request": 0, "experts": [[1]]}', '{"request": 0, "experts": [[1, 2]]}'], num_experts=16,
                   top_k=2)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not valid JSON"),
    ("[" * 100000, "line 1: not valid JSON"),
    ('[1, 2]', "line 1: expected a JSON object"),
    ('{"request": 0}', "line 1: no 'experts' field"),
    ('{"request": true, "experts": [[1, 2]]}', "request must be"),
    ('{"request": 0, "experts": [1, 2]}', r"line 1 \(its list 1 of 2\): 'experts' must hold a non-empty list of "
                                          r"ids per layer, got 1$"),
    ('{"request": 0, "experts": []}', r"line 1: 'experts' must hold a non-empty list of ids per layer, got \[\]$"),
    ('{"request": 0, "experts": 3}', r"line 1: 'experts' must hold a non-empty list of ids per layer, got 3$"),
    ('{"request": 0, "experts": [[1, 2], [3, 3]]}', r"line 1 \(its list 2 of 2\): 'experts' repeats expert id 3"),
    ('{"request": 0, "experts": [[1, 99]]}', "expert id 99"),
    ('{"request": 0, "experts": [[1, 1e400]]}', "must hold ints"),
    ('{"request": 0, "experts": [[1, 2, 3]]}', "lists 3 ids where --top-k 2 was passed"),
    ('{"request": 0, "experts": [[1, 2]], "weights": [[-0.3, 1.3]]}', r"line 1: 'weights' must be finite and >= 0, "
                                                                     r"got -0\.3"),
    ('{"request": 0, "experts": [[-1, -1]]}', r"layer 0 holds no expert id \(all -1\): a dense layer"),
    ('{"request": 0, "experts": [[1, 2]], "phase": "warmup"}', "phase"),
    ('{"request": 0, "experts": [[1, 2]], "domain": 3}', "domain must be a str"),
    ('{"request": 0, "experts": [[1, 2]], "position": 1.5}', "position"),
    ('{"request": 0, "experts": [[1, 2]], "weights": [[NaN, 1]]}', "finite"),
    ('{"request": 0, "experts": [[1, 2]], "weights": [[1]]}', r"line 1: 'weights' lists 1 weight where 'experts' "
                                                              r"lists 2 ids: one weight per id"),
    ('{"request": 0, "experts": [[1, 2]], "weights": [[1, 1], [1, 1]]}', r"line 1: 'weights' lists weights for 2 "
                                                                        r"layers where 'experts' lists ids for 1"),
    ('{"request": 0, "experts": [[1, 2]], "weights": [["a", 1]]}', "must hold numbers"),
])
def test_from_jsonl_rejects_bad_lines(line, message):
    with pytest.raises(ValueError, match=message):
        from_jsonl([line], num_experts=16, top_k=2)


def test_from_jsonl_keeps_unread_keys_as_notes():
    trace = from_jsonl(['{"request": 0, "experts": [[1, 2]], "colour": 1}'], num_experts=16, top_k=2)
    assert trace.num_tokens == 1 and trace.notes == {"fields not read": "colour (1 lines)"}


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
    assert imported.layer_ids.tolist() == [1, 2]  # decoder layer 0 is dense and dropped
    trace.layer_ids = imported.layer_ids
    assert imported == trace
    with pytest.raises(ValueError, match="not base64"):
        from_sglang(["@@@"], num_layers=3, top_k=2, num_experts=16)
    with pytest.raises(ValueError, match="multiple of"):
        from_sglang([np.zeros(5, np.int32)], num_layers=3, top_k=2, num_experts=16)


# ---- dense layers that arrive as 0, not -1 (SGLang and vLLM capture buffers start as zeros) --------------------
def zero_dense_layer(top_k=1):
    """4 tokens, 2 layers: layer 0 is dense (never written: all 0), layer 1 routes to [3, 5, 7, 1] (+ 2, 4, ...)."""
    rows = np.zeros((4, 2, top_k), np.int32)
    rows[:, 1, 0] = [3, 5, 7, 1]
    if top_k == 2:
        rows[:, 1, 1] = [2, 4, 6, 0]
    return rows


def b64(array, dtype="<i4"):
    import base64
    return base64.b64encode(np.asarray(array).astype(dtype).tobytes()).decode()


@pytest.mark.parametrize("top_k", [1, 2])
def test_sglang_dense_layer_of_zeros_is_dropped_when_told_and_named_when_not(top_k):
    rows = zero_dense_layer(top_k)
    payload = b64(rows)
    told = from_sglang([payload], num_layers=2, top_k=top_k, num_experts=8, moe_layers=[1])
    assert told.num_layers == 1 and told.experts[:, 0].tolist() == rows[:, 1].tolist()
    assert told.experts[:, 0, 0].tolist() == [3, 5, 7, 1]
    for moe_layers in ("auto", None):  # guessing is refused, and the error names the cause
        with pytest.raises(ValueError, match="dense layer") as error:
            from_sglang([payload], num_layers=2, top_k=top_k, num_experts=8, moe_layers=moe_layers)
        assert "zero-filled buffers" in str(error.value) and "moe_layers" in str(error.value)
    if top_k == 1:  # asked to keep it, the degenerate layer is kept as routing
        kept = from_sglang([payload], num_layers=2, top_k=1, num_experts=8, keep_degenerate=True)
        assert kept.num_layers == 2 and (kept.experts[:, 0] == 0).all()


def test_vllm_dense_layers_zero_or_minus_one_and_degenerate_routing():
    rows = zero_dense_layer()
    requests = [rows[:3], rows[3:]]  # the degenerate check looks at all requests together
    with pytest.raises(ValueError, match="cannot tell whether layer 0 is a dense layer"):
        from_vllm(requests, num_experts=8, moe_layers="auto")
    with pytest.raises(ValueError, match="layer 0: every one of the 4 tokens has expert ids \\[0\\]"):
        from_vllm(requests, num_experts=8)
    trace = from_vllm([r.astype(np.uint8) for r in requests], num_experts=8, moe_layers=[1])  # vLLM's uint8 ids
    assert trace.experts[:, 0, 0].tolist() == [3, 5, 7, 1] and trace.request.tolist() == [0, 0, 0, 1]
    marked = rows.copy()
    marked[:, 0] = -1  # an explicit "no expert": auto drops it, keeping every layer refuses it
    assert from_vllm([marked], num_experts=8, moe_layers="auto") == from_vllm([marked], num_experts=8, moe_layers=[1])
    with pytest.raises(ValueError, match="layer 0 holds no expert id"):
        from_vllm([marked], num_experts=8)
    collapsed = rows.copy()
    collapsed[:, 1] = 6  # a router that sent every token to expert 6
    with pytest.raises(ValueError, match="keep_degenerate=True"):
        from_vllm([collapsed], num_experts=8, moe_layers=[1])
    assert (from_vllm([collapsed], num_experts=8, moe_layers=[1], keep_degenerate=True).experts == 6).all()
    named = "--moe-layers (from Python: moe_layers=) must name distinct layers in [0, 2) (the capture has 2 layers"
    with pytest.raises(ValueError, match=re.escape(f"{named} per token), got [1, 1]")):
        from_vllm([rows], num_experts=8, moe_layers=[1, 1])
    with pytest.raises(ValueError, match=re.escape("got [0, 1, 2, 3, 4, 5, 6, 7, ... 999] (1000 in all)")):
        from_vllm([rows], num_experts=8, moe_layers=np.arange(1000))  # a long list: its first entries and its last


# ---- narrow wire dtypes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_narrow_wire_dtypes_decode_when_named_and_errors_say_which_dtype_was_assumed(dtype):
    trace, prompt, _ = reference(5, num_layers=2, num_experts=16)
    starts, ends = trace.request_ranges()
    arrays = [trace.experts[s:e] for s, e in zip(starts, ends)]
    payloads = [b64(a, "<" + np.dtype(dtype).str[1:]) for a in arrays]
    imported = from_sglang(payloads, num_layers=2, top_k=2, num_experts=16, prompt_lengths=prompt, dtype=dtype,
                           moe_layers=None)
    assert np.array_equal(imported.experts, trace.experts) and np.array_equal(imported.phase, trace.phase)
    as_meta = [{"routed_experts": p, "routed_experts_dtype": dtype} for p in payloads]  # the dtype travels along
    assert from_sglang(as_meta, num_layers=2, top_k=2, num_experts=16, prompt_lengths=prompt, moe_layers=None) \
        == imported
    with pytest.raises(ValueError, match=f"says routed_experts_dtype='{dtype}', but dtype='int32'"):
        from_sglang(as_meta, num_layers=2, top_k=2, num_experts=16, dtype="int32")
    with pytest.raises(ValueError, match=r"payloads\[0\].*(decoded as int32|int32 values).*dtype="):
        from_sglang(payloads[:1], num_layers=2, top_k=2, num_experts=16, moe_layers=None)


def test_wire_dtype_errors():
    two_int32s = r"\[16843009, 16843009\]"  # eight uint8 ones read as two int32 values
    with pytest.raises(ValueError, match=rf"payloads\[0\] decoded as int32: token 0, layer 0 holds {two_int32s}"):
        from_sglang([b64(np.ones(8, np.uint8), "u1")], num_layers=1, top_k=2, num_experts=16)
    with pytest.raises(ValueError, match="3 bytes, not a whole number of uint16 values"):
        from_sglang([b64([1, 2, 3], "u1")], num_layers=1, top_k=1, num_experts=16, dtype="uint16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        from_sglang([b64([1], "u1")], num_layers=1, top_k=1, num_experts=16, dtype="float32")
    with pytest.raises(ValueError, match="or -1 written in an unsigned dtype"):
        from_sglang([b64([255, 1], "u1")], num_layers=1, top_k=2, num_experts=16, dtype="uint8")
    with pytest.raises(ValueError, match="dict without 'routed_experts'"):
        from_sglang([{"prompt_tokens": 3}], num_layers=1, top_k=1, num_experts=16)


def test_one_domain_label_for_every_request():
    trace, prompt, _ = reference(6)
    starts, ends = trace.request_ranges()
    imported = from_vllm([trace.experts[s:e] for s, e in zip(starts, ends)], num_experts=16, domains="code")
    assert imported.has_domain and set(imported.domain.tolist()) == {"code"}
