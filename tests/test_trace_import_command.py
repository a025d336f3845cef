"""`minimoe import`: every supported source to a trace file, the README's example, clear errors."""

import base64
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from minimoe.cli import main as cli_main
from minimoe.traces import Trace, from_jsonl, from_sglang, from_vllm
from minimoe.traces.convert import main
from test_trace_import import reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example(tmp_path, capsys, monkeypatch):
    text = README.read_text()
    log = re.search(r"```jsonl\n(.*?)```", text, re.S).group(1)
    shown = re.search(r"```console\n\$ minimoe import routes.jsonl --out trace.npz\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    Path("routes.jsonl").write_text(log)
    assert cli_main(["import", "routes.jsonl", "--out", "trace.npz"]) == 0
    assert capsys.readouterr().out == shown
    trace = Trace.load("trace.npz")
    assert trace == from_jsonl("routes.jsonl")
    assert trace.experts.tolist() == [[[3, 5], [0, 7]], [[3, 2], [7, 0]], [[1, 2], [6, 4]]]  # a's 2 tokens, then b
    assert trace.request.tolist() == [0, 0, 1] and (trace.phase == -1).all() and trace.model == "my-moe"


def test_vllm_npz_with_prompt_lengths_and_moe_layers(tmp_path, capsys):
    trace, prompt, _ = reference(10, num_layers=3)
    starts, ends = trace.request_ranges()
    arrays = []
    for s, e in zip(starts, ends):
        rows = np.zeros((e - s, 4, 2), np.uint8)  # layer 0 dense: zeros, as the capture buffer holds it
        rows[:, 1:] = trace.experts[s:e]
        arrays.append(rows)
    np.savez(tmp_path / "routed.npz", *arrays, prompt_lengths=prompt)
    assert main([str(tmp_path / "routed.npz"), "--out", str(tmp_path / "t.npz"), "--num-experts", "16",
                 "--moe-layers", "1,2,3", "--domain", "code", "--model", "m"]) == 0
    out = capsys.readouterr().out
    assert "phases: " in out and "prefill" in out and "domains: code" in out
    loaded = Trace.load(tmp_path / "t.npz")
    assert loaded == from_vllm(arrays, 16, prompt, "code", [1, 2, 3], model="m")
    assert np.array_equal(loaded.experts, trace.experts) and np.array_equal(loaded.phase, trace.phase)
    with pytest.raises(ValueError, match=r"routed\.npz \(vllm\): .*dense layer"):
        main([str(tmp_path / "routed.npz"), "--out", str(tmp_path / "t.npz"), "--num-experts", "16"])


def test_sglang_text_of_payloads_and_meta_info(tmp_path):
    trace, prompt, _ = reference(11, num_layers=2)
    starts, ends = trace.request_ranges()
    lines = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        rows = np.zeros((e - s, 3, 2), np.uint16)
        rows[:, [0, 2]] = trace.experts[s:e]  # layer 1 is dense (zeros)
        payload = base64.b64encode(rows.astype("<u2").tobytes()).decode()
        lines.append(json.dumps({"meta_info": {"routed_experts": payload, "routed_experts_dtype": "uint16"}})
                     if i % 2 else payload)  # a bare payload has no dtype: --dtype says it
    path = tmp_path / "sglang.txt"
    path.write_text("\n".join(lines) + "\n")
    common = [str(path), "--out", str(tmp_path / "t.npz"), "--num-experts", "16", "--num-layers", "3", "--top-k", "2"]
    assert main(common + ["--moe-layers", "0,2", "--dtype", "uint16",
                          "--prompt-lengths", ",".join(map(str, prompt))]) == 0
    loaded = Trace.load(tmp_path / "t.npz")
    assert np.array_equal(loaded.experts, trace.experts) and np.array_equal(loaded.phase, trace.phase)
    payloads = [json.loads(line)["meta_info"] if line.startswith("{") else line for line in lines]
    assert loaded == from_sglang(payloads, 3, 2, 16, prompt, None, [0, 2], dtype="uint16")
    with pytest.raises(ValueError, match=r"payloads\[0\].*int32.*dtype="):  # the bare payload, read as int32
        main(common + ["--moe-layers", "0,2"])


def test_errors_name_the_flag_or_file(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found"):
        main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t.npz")])
    path = tmp_path / "log.bin"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"log\.bin: cannot tell the format from the suffix '\.bin'"):
        main([str(path), "--out", str(tmp_path / "t.npz")])
    with pytest.raises(ValueError, match="--num-layers is required to read"):
        main([str(path), "--out", str(tmp_path / "t.npz"), "--format", "sglang", "--num-experts", "8"])
    with pytest.raises(FileNotFoundError, match="--out .*: the directory .* does not exist"):
        main([str(path), "--out", str(tmp_path / "no" / "t.npz")])
    with pytest.raises(FileNotFoundError, match=r"--out .*: .*log\.bin is a file, not a folder"):
        main([str(path), "--out", str(path / "t.npz")])
    for flags in (["--field", "colour=c"], ["--moe-layers", "a,b"], ["--num-experts", "0"], ["--dtype", "float32"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(path), "--out", "t.npz", *flags])
        assert exit_info.value.code == 2
        assert flags[0] in capsys.readouterr().err


# ---- hostile or mismatched sources: one line naming the file (or flag), exit status 2, no traceback ---------------
def _route(layer, ids, position=0):
    return json.dumps({"type": "route", "req_id": "a", "token_idx": position, "layer": layer, "topk_ids": ids})


def _trtllm(folder, meta=None, ranks=None):
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps(meta or {"num_experts": 8, "num_experts_per_token": 2}))
    for name, tensors in (ranks or {"rank0.safetensors": {"0_1": np.arange(8, dtype=np.int32)}}).items():
        save_file(tensors, str(folder / name))
    return folder


def _per_pass(path, forward_pass_id=0, slot_map=None):
    import torch

    counts = torch.ones(2, 8, dtype=torch.int64)
    record = {"forward_pass_id": forward_pass_id, "rank": 0, "global_physical_count": counts}
    torch.save({"records": [record], "last_physical_to_logical_map": torch.tensor(
        slot_map if slot_map is not None else [list(range(8))] * 2)}, path)
    return path


def _source(case, tmp_path):
    """(the source path, extra flags) of one hostile case."""
    import torch

    path = tmp_path / "src"
    if case == "stray rank file":
        return _trtllm(path, ranks={"rank0.safetensors": {"0_1": np.arange(8, dtype=np.int32)},
                                    "rank_backup.safetensors": {"0_1": np.arange(8, dtype=np.int32)}}), []
    if case == "rank file without counts":
        return _trtllm(path, ranks={"rank0.safetensors": {}}), []
    if case == "top_k above experts":
        return _trtllm(path, meta={"num_experts": 8, "num_experts_per_token": 40}), []
    if case == "string forward pass":
        return _per_pass(tmp_path / "d.pt", forward_pass_id="a"), []
    if case == "negative slot map":
        return _per_pass(tmp_path / "d.pt", slot_map=[[-1, *range(1, 8)]] * 2), []
    if case == "map names expert 99":
        record = {"record_type": "eplb_load_stats", "version": 1, "step": 0, "expert_load": [[1] * 8],
                  "p2l_map": [[0, 1, 2, 3, 4, 5, 6, 99]]}
        (tmp_path / "e.jsonl").write_text(json.dumps(record) + "\n")
        return tmp_path / "e.jsonl", []
    if case == "counts beyond int64":
        torch.save({"logical_count": torch.full((2, 4, 8), 2**62, dtype=torch.int64)}, tmp_path / "s.pt")
        return tmp_path / "s.pt", []
    if case in ("flag of another format", "flag for a trace file"):
        torch.save({"logical_count": torch.ones(2, 4, 8, dtype=torch.int64)}, tmp_path / "s.pt")
        if case == "flag of another format":
            return tmp_path / "s.pt", ["--num-experts", "64"]
        main([str(tmp_path / "s.pt"), "--out", str(tmp_path / "l.npz")])
        return tmp_path / "l.npz", ["--domain", "math"]
    lines = {"huge expert id": [_route(0, [1, 2**70]), _route(0, [1, 2], 1)],
             "deeply nested line": ["[" * 100000 + "]" * 100000],
             "dense layer in a log": [_route(0, [1, 2]), _route(5, [-1, -1])],
             "jsonl with --prompt-lengths": [_route(0, [1, 2])], "empty log": [],
             "negative position": [_route(0, [1, 2]), _route(0, [3, 4], -4)],
             "jsonl with --moe-layers all": [_route(0, [1, 2])]}
    flags = {"jsonl with --prompt-lengths": ["--prompt-lengths", "1"], "jsonl with --moe-layers all": [
        "--moe-layers", "all"]}
    if case in lines:
        (tmp_path / "r.jsonl").write_text("".join(line + "\n" for line in lines[case]))
        return tmp_path / "r.jsonl", flags.get(case, [])
    if case == "not UTF-8":
        (tmp_path / "n.jsonl").write_bytes(b"\xff\xfe{}\n")
        return tmp_path / "n.jsonl", []
    if case == "capture without tokens":
        np.savez(tmp_path / "v.npz", np.zeros((0, 4, 2), np.uint8))
        return tmp_path / "v.npz", ["--num-experts", "16"]
    if case == "float prompt lengths":
        np.savez(tmp_path / "v.npz", np.array([[[1, 2]], [[3, 4]]], np.uint8), prompt_lengths=np.array([1.0]))
        return tmp_path / "v.npz", ["--num-experts", "16"]
    vllm = {"unsorted layers": ["--moe-layers", "3,2,1"], "huge layer range": ["--moe-layers", "0-99999999999"],
            "long layer list": ["--moe-layers", "1-999"], "vllm with --positions field": ["--positions", "field"]}
    if case in vllm:
        np.savez(tmp_path / "v.npz", np.array([[[1, 2], [3, 4], [5, 6], [7, 1]]] * 2, np.uint8))  # 4 layers, top-2
        return tmp_path / "v.npz", ["--num-experts", "16", *vllm[case]]
    payload = base64.b64encode(np.array([[[1, 2], [3, 4]], [[5, 6], [7, 1]]], "<i4").tobytes()).decode()
    (tmp_path / "p.txt").write_text(payload + "\n")
    common = ["--format", "sglang", "--num-layers", "2", "--top-k", "2", "--num-experts", "8"]
    sglang = {"wrong wire dtype": ["--dtype", "uint8", "--moe-layers", "0,1"],
              "sglang with --positions field": ["--positions", "field"],
              "sglang long layer list": ["--moe-layers", "0-500"]}
    return tmp_path / "p.txt", common + sglang[case]


@pytest.mark.parametrize("case, expected", [
    ("rank file without counts", r"src: the rank files hold no counts"),
    ("top_k above experts", r"src/meta_info.json: num_experts_per_token=40 is more than num_experts=8"),
    ("string forward pass", r"d.pt: records\[0\]: forward_pass_id and rank must be ints"),
    ("negative slot map", r"d.pt: last_physical_to_logical_map: expert ids must be >= 0, got -1"),
    ("map names expert 99", r"e.jsonl: line 1: p2l_map: the map names expert 99 in layer 0 while expert 7 has no "
                            r"slot: 99 is out of range"),
    ("counts beyond int64", r"s.pt: logical_count: the counts sum to about 2.95e\+20"),
    ("flag of another format", r"--num-experts does not apply to --format sglang-stat \(it reads --moe-layers"),
    ("flag for a trace file", r"--domain does not apply to --format trace"),
    ("jsonl with --prompt-lengths", r"--prompt-lengths does not apply to --format jsonl"),
    ("huge expert id", r"r.jsonl: line 1: expert id 1180591620717411303424 is outside \[0, 32768\)"),
    ("deeply nested line", r"r.jsonl: line 1: not valid JSON here \(nested more deeply"),
    ("dense layer in a log", r"r.jsonl: layer 5 holds no expert id \(all -1\): a dense layer"),
    ("empty log", r"r.jsonl is empty"),
    ("not UTF-8", r"n.jsonl: not UTF-8 text \(byte 0xff at offset 0\)"),
    ("capture without tokens", r"v.npz \(vllm\): the capture holds no token"),
    ("float prompt lengths", r"v.npz: its prompt_lengths array has dtype float64"),
    ("unsorted layers", r"argument --moe-layers: expected increasing layer indices .* got '3,2,1'"),
    ("huge layer range", r"argument --moe-layers: layer index 99999999999 is above 1023: no model has that many "
                         r"layers, got '0-99999999999'; or 'auto' or 'all' \(see"),
    ("long layer list", r"v.npz \(vllm\): --moe-layers \(from Python: moe_layers=\) must name distinct layers in "
                        r"\[0, 4\) \(the capture has 4 layers per token\), got \[1, 2, 3, 4, 5, 6, 7, 8, \.\.\. 999\] "
                        r"\(999 in all\)$"),
    ("sglang long layer list", r"p.txt \(sglang\): --moe-layers \(from Python: moe_layers=\) must name distinct "
                               r"layers in \[0, 2\) \(the capture has 2 layers per token\), got \[0, 1, 2, 3, 4, 5, 6, "
                               r"7, \.\.\. 500\] \(501 in all\) \[payloads decoded as int32"),
    ("vllm with --positions field", r"--positions does not apply to --format vllm \(it reads --num-experts, "
                                    r"--moe-layers, --keep-degenerate, --prompt-lengths, --domain, --model\)$"),
    ("sglang with --positions field", r"--positions does not apply to --format sglang \(it reads "),
    ("jsonl with --moe-layers all", r"--moe-layers does not apply to --format jsonl \(it reads "),
    ("negative position", r"r.jsonl: line 2: 'token_idx' \(position\) must be a whole number >= 0 \(the token's "
                          r"place in its request\), got -4$"),
    ("wrong wire dtype", r"p.txt \(sglang\): .*repeats an expert id.*\[payloads decoded as uint8; a wrong wire "
                         r"dtype .*--dtype"),
])
def test_hostile_sources_are_refused_in_one_line(case, expected, tmp_path, capsys):
    from batches import run_cli

    source, flags = _source(case, tmp_path)
    capsys.readouterr()
    status, _, err = run_cli(cli_main, capsys, "import", source, "--out", tmp_path / "t.npz", *flags)
    assert status == 2 and err.count("\n") == 1 and len(err) < 700 and "Traceback" not in err, err
    assert re.search(expected, err.rstrip("\n")), err


def test_an_empty_domain_label_is_refused_and_an_unnamed_model_said(tmp_path, capsys):
    from batches import run_cli

    source = tmp_path / "r.jsonl"
    source.write_text('{"request": 0, "experts": [[1, 2]]}\n{"request": 1, "experts": [[3, 4]]}\n')
    for label in ("", " code"):
        with pytest.raises(SystemExit):
            cli_main(["import", str(source), "--out", str(tmp_path / "t.npz"), "--domain", label])
        assert f"argument --domain: expected a domain label such as code, without surrounding spaces, got {label!r}" \
            in capsys.readouterr().err
    status, out, err = run_cli(cli_main, capsys, "import", source, "--out", tmp_path / "t.npz", "--num-experts", "8")
    assert status == 0 and "model unnamed (--model NAME names it)" in out, err


def test_stray_files_are_noted_and_minimoe_load_traces_recognised(tmp_path, capsys):
    from batches import run_cli

    source, _ = _source("stray rank file", tmp_path)
    status, out, err = run_cli(cli_main, capsys, "import", source, "--out", tmp_path / "l.npz")
    assert status == 0, err
    assert "note: files ignored: rank_backup.safetensors" in out and "1 step, 1 MoE layer " in out
    status, out, err = run_cli(cli_main, capsys, "import", tmp_path / "l.npz", "--out", tmp_path / "again.npz")
    assert status == 0 and "per-token routing: none" in out, err  # a load trace, read as --format trace


def test_report_names_the_trace_file_that_holds_no_token_or_a_dense_layer(tmp_path):
    from minimoe.traces import read_trace_file

    experts = np.array([[[1, 2], [-1, -1]], [[3, 4], [-1, -1]]])
    Trace(experts=experts, request=[0, 0], phase=[0, 1], domain=None, num_experts=8, top_k=2).save(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"d.npz': MoE layer 1 holds no expert id \(all -1\)"):
        read_trace_file(tmp_path / "d.npz")
    Trace(experts=np.zeros((0, 1, 2)), request=[], phase=[], domain=None, num_experts=8, top_k=2).save(
        tmp_path / "e.npz")
    with pytest.raises(ValueError, match=r"e.npz' holds no token"):
        read_trace_file(tmp_path / "e.npz")


@pytest.mark.parametrize("name, content, flags, expected", [
    ("g.jsonl", b"garbage here\n", (),
     r"g.jsonl: line 1 is neither a JSON record nor a base64 payload \('garbage here'\)"),
    ("t.npz", b"hello\n", (), r"t.npz is not a .npz archive \(not a zip file\)"),
    ("t.npz", b"hello\n", ("--format", "vllm", "--num-experts", "8"), r"t.npz is not a .npz archive"),
    ("t.npy", b"hello\n", ("--num-experts", "8"), r"t.npy is not a .npy array \(no NumPy header\)"),
    ("r.jsonl.gz", gzip.compress(b"{}\n", mtime=0), ("--format", "jsonl"),  # mtime=0: the same bytes (test id) in
     r"r.jsonl.gz is gzip-compressed: decompress it"),                        # every pytest-xdist worker
    ("r.jsonl.gz", gzip.compress(b"{}\n", mtime=0), (), r"r.jsonl.gz is compressed: decompress it first"),
])
def test_a_file_that_is_not_what_its_name_says_is_named_in_one_line(name, content, flags, expected, tmp_path, capsys):
    from batches import run_cli

    (tmp_path / name).write_bytes(content)
    status, _, err = run_cli(cli_main, capsys, "import", tmp_path / name, "--out", tmp_path / "o.npz", *flags)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(expected, err), err


def test_a_byte_order_mark_is_read_past_and_a_log_given_to_findings_points_to_import(tmp_path, capsys):
    from batches import run_cli

    log = (Path(__file__).parent / "data" / "vllm_moe_routes.jsonl").read_bytes()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + log)  # what some Windows editors write first
    (tmp_path / "plain.jsonl").write_bytes(log)
    assert from_jsonl(tmp_path / "bom.jsonl") == from_jsonl(tmp_path / "plain.jsonl")
    status, _, err = run_cli(cli_main, capsys, "findings", "--trace", tmp_path / "plain.jsonl")
    assert status == 2 and "becomes a trace with minimoe import FILE --out trace.npz" in err, err
    status, out, _ = run_cli(cli_main, capsys, "import", tmp_path / "plain.jsonl", "--out", tmp_path / "t.npz")
    assert status == 0 and "2 MoE layers (model layers [0, 15])" in out and "note: num_experts" in out
    status, out, _ = run_cli(cli_main, capsys, "import", tmp_path / "t.npz", "--out", tmp_path / "t.parquet")
    assert status == 0 and "note: num_experts" not in out  # said at import; a conversion lists the notes it keeps
    assert "notes: 6 kept from the import" in out, out
