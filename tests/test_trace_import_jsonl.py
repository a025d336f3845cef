"""Long-form JSONL routing logs (a meta record, then one record per (token, layer)) rebuild the trace they
were written from; what such a log cannot tell stays unknown."""

import json

import numpy as np
import pytest

from minimoe.traces import Trace, from_jsonl
from test_trace_import import reference

META = {"type": "meta", "model_id": "m", "layers_logged": [3, 7, 11], "top_k": 2, "num_experts": 16}


def profiler_log(trace, prompt, restart_positions=False, names=None, meta=META):
    """Records as a profiler hooked into a server writes them: each request's prompt in one forward pass, then
    decode steps of all unfinished requests batched together; inside a pass, layer by layer."""
    names = names or {"request": "req_id", "position": "token_idx", "layer": "layer", "experts": "topk_ids",
                      "weights": "topk_weights"}
    starts, ends = trace.request_ranges()
    passes = [[(r, list(range(int(starts[r]), int(starts[r]) + int(p))))] for r, p in enumerate(prompt) if p]
    for step in range(int((ends - starts - prompt).max())):
        passes.append([(r, [int(starts[r] + prompt[r] + step)]) for r in range(trace.num_requests)
                       if starts[r] + prompt[r] + step < ends[r]])
    lines = [json.dumps(meta)] if meta else []
    for batch in passes:
        for layer_index, layer in enumerate(META["layers_logged"]):
            for r, rows in batch:
                for i, n in enumerate(rows):
                    lines.append(json.dumps({
                        "type": "route", names["request"]: f"r{r}",
                        names["position"]: i if restart_positions else n - int(starts[r]), names["layer"]: layer,
                        names["experts"]: trace.experts[n, layer_index].tolist(),
                        names["weights"]: trace.weights[n, layer_index].astype(float).tolist()}))
    return lines


def unknown_phases(trace):
    return Trace(experts=trace.experts, request=trace.request, phase=np.full(trace.num_tokens, -1),
                 domain=None, num_experts=trace.num_experts, top_k=trace.top_k, model=trace.model,
                 weights=trace.weights, layer_ids=META["layers_logged"])  # the model's layer numbers are kept


def test_long_form_log_with_a_meta_record_rebuilds_the_trace(tmp_path):
    trace, prompt, _ = reference(7, num_requests=4)
    trace.experts[1, 2, 1], trace.weights[1, 2, 1] = -1, 0.0  # a pair the router dropped, logged as -1
    path = tmp_path / "routes.jsonl"
    path.write_text("\n".join(profiler_log(trace, prompt)) + "\n")
    imported = from_jsonl(path)  # num_experts, top_k, model and the layers all come from the meta record
    assert imported == unknown_phases(trace)
    assert (imported.phase == -1).all()  # the log has no phase: never guessed from positions or passes
    assert from_jsonl(path, num_experts=16, top_k=2, model="other").model == "other"
    lines = path.read_text().splitlines()  # layers_logged in another order: the trace's layers stay in model order
    path.write_text("\n".join([json.dumps({**META, "layers_logged": [11, 3, 7]}), *lines[1:]]) + "\n")
    assert from_jsonl(path) == unknown_phases(trace)


def test_positions_that_restart_at_every_forward_pass():
    trace, prompt, _ = reference(8, num_requests=3)
    lines = profiler_log(trace, prompt, restart_positions=True)
    with pytest.raises(ValueError, match=r"lines \d+ and \d+: request 'r\d' repeats token_idx 0 at layer 3: "
                                         "positions restart.*--positions per_pass"):
        from_jsonl(lines)
    assert from_jsonl(lines, positions="per_pass") == unknown_phases(trace)


def test_field_names_are_mapped_and_metadata_can_be_given_instead_of_a_meta_record():
    trace, prompt, _ = reference(9, num_requests=3)
    names = {"request": "rid", "position": "pos", "layer": "block", "experts": "ids", "weights": "probs"}
    lines = profiler_log(trace, prompt, names=names, meta=None)
    guessed = from_jsonl(lines, fields=names)  # no num_experts anywhere: the largest id + 1, said in the notes
    assert guessed.num_experts == int(trace.experts.max()) + 1
    assert guessed.notes["num_experts"].startswith(f"not recorded: assumed {guessed.num_experts}")
    imported = from_jsonl(lines, num_experts=16, top_k=2, model="m", fields=names)
    assert imported == unknown_phases(trace) and "num_experts" not in imported.notes
    with pytest.raises(ValueError, match=r"line 1: no 'req_id' field \(request; map it with --field request=NAME "
                                         r"\(from Python: fields="):
        from_jsonl(lines, num_experts=16)


def test_a_log_without_request_ids_is_one_stream_only_when_asked():
    lines = [json.dumps({"layer": layer, "token_idx": t, "topk_ids": [t + layer, 5]}) for t in range(3)
             for layer in range(2)]
    with pytest.raises(ValueError, match="no 'req_id' field"):
        from_jsonl(lines, num_experts=8)
    trace = from_jsonl(lines, num_experts=8, fields={"request": None})
    assert trace.num_requests == 1 and (trace.phase == -1).all()
    assert trace.experts.tolist() == [[[t + layer, 5] for layer in range(2)] for t in range(3)]


def test_phase_and_domain_fields_are_read_and_must_agree_across_a_tokens_layers():
    record = {"req_id": 0, "token_idx": 0, "topk_ids": [1], "phase": "decode", "domain": "math"}
    lines = [json.dumps({**record, "layer": 0}), json.dumps({**record, "layer": 1})]
    trace = from_jsonl(lines, num_experts=4)
    assert trace.phase.tolist() == [1] and trace.domain.tolist() == ["math"] and trace.num_layers == 2
    lines[1] = lines[1].replace("decode", "prefill")
    with pytest.raises(ValueError, match="lines 1 and 2: the records of one token disagree on phase"):
        from_jsonl(lines, num_experts=4)


@pytest.mark.parametrize("lines, kwargs, message", [
    ([META, {"type": "route", "req_id": 0, "token_idx": 0, "layer": 3, "topk_ids": [1]}], {},
     r"request 0 position 0 has no record for layers \[7, 11\]"),
    ([META, {"type": "route", "req_id": 0, "token_idx": 0, "layer": 4, "topk_ids": [1]}], {},
     r"layer 4 is not in the meta record's layers_logged \[3, 7, 11\]"),
    ([META], dict(num_experts=8), "--num-experts 8 was passed, but the meta record says num_experts=16"),
    ([META, META], {}, "lines 1 and 2: more than one meta record"),
    ([{"type": "stats", "tokens": 4}], dict(num_experts=8), "unknown record type 'stats'"),
    ([{**META, "dtype": "bf16"}], {}, "the log holds 1 meta record.s. and no route record"),
    ([{**META, "top_k": 8, "layers_logged": [0]}, {"type": "route", "req_id": 0, "token_idx": 0, "layer": 0,
                                                   "topk_ids": [1, 2]}], {},
     r"line 1: the meta record says top_k=8, but no route record lists more than 2 expert ids.*--top-k 2"),
    ([{"type": "route", "req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [1, 2, 3]}], dict(num_experts=8, top_k=2),
     r"line 1 \(layer 0\): 'topk_ids' lists 3 ids where --top-k 2 was passed"),
    # a token's later record is named by its own line and layer, not by the token's first line
    ([{"type": "route", "req_id": 0, "token_idx": 0, "layer": layer, "topk_ids": ids, "topk_weights": w}
      for layer, ids, w in ((3, [1, 2], [0.5, 0.5]), (1, [4, 5], [0.5, 0.5]), (7, [6, 6], [0.5, 0.5]))],
     dict(num_experts=8), r"^line 3 \(layer 7\): 'topk_ids' repeats expert id 6: a router picks top_k distinct"),
    ([{"type": "route", "req_id": 0, "token_idx": 0, "layer": layer, "topk_ids": ids, "topk_weights": w}
      for layer, ids, w in ((0, [1, 2], [0.5, 0.5]), (1, 3, [0.5, 0.5]))],
     dict(num_experts=8), r"^line 2 \(layer 1\): 'topk_ids' must hold a non-empty list of ids per layer, got 3$"),
    ([{"type": "route", "req_id": 0, "token_idx": 0, "layer": layer, "topk_ids": ids, "topk_weights": w}
      for layer, ids, w in ((0, [1, 2], [0.5, 0.5]), (1, [3, 4], [0.6]))],
     dict(num_experts=8), r"^line 2 \(layer 1\): 'topk_weights' lists 1 weight where 'topk_ids' lists 2 ids: one "
                          r"weight per id$"),
    ([{"type": "route", "req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [9]}], dict(num_experts=8),
     "expert id 9 outside"),
    ([{"type": "route", "req_id": 0, "token_idx": 0, "layer": "a", "topk_ids": [1]}], dict(num_experts=8),
     "layer must be a layer index in \\[0, 1024\\), got .a."),
    ([{"type": "route", "req_id": 0, "token_idx": -4, "layer": 0, "topk_ids": [1]}], dict(num_experts=8),
     r"^line 1: 'token_idx' \(position\) must be a whole number >= 0 \(the token's place in its request\), got -4$"),
    ([{"request": 0, "experts": [[1]], "position": -1}], dict(num_experts=8),
     r"^line 1: 'position' must be a whole number >= 0 \(the token's place in its request\), got -1$"),
    ([{**META, "layers_logged": list(range(500))}, {"type": "route", "req_id": 0, "token_idx": 0, "layer": 600,
                                                     "topk_ids": [1]}], {},
     r"layer 600 is not in the meta record's layers_logged \[0, 1, 2, 3, 4, 5, 6, 7, \.\.\. 499\] \(500 in all\)$"),
    ([{"req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [1]}], dict(num_experts=8, positions="time"),
     "positions must be one of"),
    ([{"req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [1]}], dict(num_experts=8, fields={"colour": "c"}),
     r"--field maps unknown names \['colour'\]"),
    ([{"req_id": 0, "token_idx": 0, "layer": -1, "topk_ids": [1]}], dict(num_experts=8),
     r"^line 1: layer must be a layer index in \[0, 1024\), got -1$"),
    ([{**META, "layers_logged": [3, -1]}], {},
     r"layers_logged must be a non-empty list of distinct layer indices in \[0, 1024\)"),
    ([{"req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [1]}], dict(num_experts=8, ignore="weights"),
     r"^ignore must be a list of log keys \(str\), got 'weights'$"),
    ([{"req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [1]}], dict(num_experts=8, fields=["request"]),
     r"^fields must be a dict \{our name: the log's name\}, got \['request'\]$"),
])
def test_long_form_errors_name_the_line_and_the_cause(lines, kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_jsonl([json.dumps(line) for line in lines], **kwargs)


def test_fields_the_importer_does_not_read_are_kept_as_notes_and_never_an_error(tmp_path):
    meta = {**META, "layers_logged": [0], "vllm_version": "0.10.1", "device": "NVIDIA H100", "seed": 1234}
    records = [meta] + [{"type": "route", "req_id": 0, "token_idx": t, "layer": 0, "topk_ids": [t, t + 1],
                         "ts": 0.5 + t, "step": t} for t in range(3)]
    trace = from_jsonl([json.dumps(r) for r in records])
    assert trace.num_tokens == 3 and trace.num_experts == 16
    assert trace.notes == {"meta vllm_version": "0.10.1", "meta device": "NVIDIA H100", "meta seed": "1234",
                           "fields not read": "step (3 lines), ts (3 lines)"}
    assert from_jsonl([json.dumps(r) for r in records], ignore=["ts", "step"]).notes["meta seed"] == "1234"
    assert "fields not read" not in from_jsonl([json.dumps(r) for r in records], ignore=["ts", "step"]).notes
    trace.save(tmp_path / "t.npz")
    assert Trace.load(tmp_path / "t.npz").notes == trace.notes  # stored in the trace file


def test_the_file_is_named_in_errors(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"type": "route", "req_id": 0, "token_idx": 0, "layer": "x", "topk_ids": [1]}) + "\n")
    with pytest.raises(ValueError, match=r"log\.jsonl: line 1: layer must be a layer index in \[0, 1024\)"):
        from_jsonl(path, num_experts=8)
    with pytest.raises(FileNotFoundError):
        from_jsonl(tmp_path / "missing.jsonl", num_experts=8)
    path.write_text(json.dumps({"type": "route", "req_id": 0, "token_idx": -4, "layer": 0, "topk_ids": [1]}) + "\n")
    with pytest.raises(ValueError, match=r"log\.jsonl: line 1: 'token_idx' \(position\) must be a whole number >= 0"):
        from_jsonl(path, num_experts=8)
