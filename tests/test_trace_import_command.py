"""`minimoe import`: every supported source to a trace file, the README's example, clear errors."""

import base64
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
    for flags in (["--field", "colour=c"], ["--moe-layers", "a,b"], ["--num-experts", "0"], ["--dtype", "float32"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(path), "--out", "t.npz", *flags])
        assert exit_info.value.code == 2
        assert flags[0] in capsys.readouterr().err
