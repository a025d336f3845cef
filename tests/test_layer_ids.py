"""The model's layer numbers travel with a trace from import to the engine's file.

A routing log of some layers (the shipped OLMoE log covers layers 0 and 15 of 16) becomes a trace of L = 2 MoE
layers whose ``layer_ids`` are [0, 15]; a placement the report fits on it records them, and ``minimoe export``
writes each row at its model layer: SGLang's row 15, TensorRT-LLM's key 15, and, with the model's config, vLLM's
and EPLB's MoE layer 15, every MoE layer the log does not cover with the identity placement (slot s -> expert
s mod E). Each engine's file is read back here by its own rule, as ``test_engine_files`` does.
"""
import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from minimoe.cli import main
from minimoe.placement import Placement
from minimoe.traces import Trace, synthetic_trace
from minimoe.traces.format import concat
from minimoe.traces.parquet import ParquetTrace
from minimoe.traces.parquet_writer import write_parquet
from batches import run_cli

LOG = Path(__file__).parent / "data" / "vllm_moe_routes.jsonl"  # OLMoE, 64 experts, top-8, layers 0 and 15
OLMOE = {"model_type": "olmoe", "num_hidden_layers": 16, "num_experts": 64, "num_experts_per_tok": 8}


def named(trace: Trace, layer_ids) -> Trace:
    return dataclasses.replace(trace, layer_ids=layer_ids)  # built again: every check of Trace runs


def test_a_trace_keeps_its_layer_ids_in_both_files_and_through_selection(tmp_path):
    trace = named(synthetic_trace(num_requests=6, num_layers=3, seed=1), [3, 7, 11])
    trace.save(tmp_path / "t.npz")
    assert Trace.load(tmp_path / "t.npz").layer_ids.tolist() == [3, 7, 11]
    write_parquet(trace, tmp_path / "t.parquet")
    assert ParquetTrace(tmp_path / "t.parquet").layer_ids.tolist() == [3, 7, 11]
    assert ParquetTrace(tmp_path / "t.parquet").read() == trace
    assert trace.layers([0, 2]).layer_ids.tolist() == [3, 11]
    with pytest.raises(ValueError, match=r"layer ids \[2, 0\] reorder the MoE layers of a trace that records them"):
        trace.layers([2, 0])  # the model's order is kept; a trace that does not know it may be reordered
    assert trace.where(phase="decode").layer_ids.tolist() == [3, 7, 11]
    assert concat([trace, trace]).layer_ids.tolist() == [3, 7, 11]
    unknown = synthetic_trace(num_requests=6, num_layers=3, seed=1)
    assert unknown.layer_ids.tolist() == [-1, -1, -1] and unknown != trace  # == compares the layers too
    with pytest.raises(ValueError, match=r"concat: trace 1 has layer_ids \[-1, -1, -1\], trace 0 has \[3, 7, 11\]"):
        concat([trace, unknown])
    unknown.save(tmp_path / "u.npz")  # nothing known: no array written, files stay as they were
    assert "layer_ids.npy" not in zipfile.ZipFile(tmp_path / "u.npz").namelist()


@pytest.mark.parametrize("ids, message", [
    ([7, 3, 11], r"distinct and increasing \(the model's order\), got \[7, 3, 11\]"),
    ([3, 3, 11], "distinct and increasing"),
    ([3, -2, 11], r"model layer indices in \[0, 1024\) \(-1 = unknown\), got \[3, -2, 11\]"),
    ([3, 7], r"must be \(3,\) model layer indices"),
    ([0.5, 1, 2], "layer_ids must hold integers"),
    (np.array([0, 1, 2**63], np.uint64), r"model layer indices in \[0, 1024\), got \[0, 1, 9223372036854775808\]"),
])
def test_bad_layer_ids_are_refused(ids, message):
    with pytest.raises(ValueError, match=message):
        named(synthetic_trace(num_requests=2, num_layers=3, seed=0), ids)


def test_a_damaged_layer_ids_array_or_metadata_names_the_file(tmp_path):
    trace = named(synthetic_trace(num_requests=2, num_layers=3, seed=0), [1, 2, 3])
    trace.save(tmp_path / "t.npz")
    arrays = dict(np.load(tmp_path / "t.npz"))
    np.savez(tmp_path / "float.npz", **{**arrays, "layer_ids": np.array([1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match=r"float.npz.*layer_ids must be a 1-d integer array"):
        Trace.load(tmp_path / "float.npz")
    np.savez(tmp_path / "order.npz", **{**arrays, "layer_ids": np.array([3, 2, 1])})
    with pytest.raises(ValueError, match=r"order.npz.*distinct and increasing"):
        Trace.load(tmp_path / "order.npz")
    import pyarrow.parquet as pq
    write_parquet(trace, tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    meta = json.loads(table.schema.metadata[b"minimoe"])
    pq.write_table(table.replace_schema_metadata({"minimoe": json.dumps({**meta, "layer_ids": [5, 1, 2]})}),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet'?: metadata layer_ids must be distinct and increasing"):
        ParquetTrace(tmp_path / "bad.parquet")


def test_placement_files_record_layer_ids_and_old_files_still_load(tmp_path):
    table = np.tile(np.arange(8), (2, 1))
    placement = Placement(table, 8, 2, 2, "contiguous", layer_ids=[0, 15])
    placement.save(tmp_path / "p.json")
    assert Placement.load(tmp_path / "p.json").layer_ids == [0, 15] and Placement.load(tmp_path / "p.json") == placement
    plain = Placement(table, 8, 2, 2, "contiguous")
    plain.save(tmp_path / "old.json")  # what earlier versions wrote: no layer_ids key
    assert "layer_ids" not in json.loads((tmp_path / "old.json").read_text())
    assert Placement.load(tmp_path / "old.json").layer_ids is None
    assert plain.with_layer_ids([-1, -1]).layer_ids is None  # unknown stays unknown
    data = json.loads((tmp_path / "p.json").read_text())
    for bad, message in ((["0", "15"], "layer_ids must be a list of model layer indices"),
                         ([15, 0], "distinct and increasing"), ([0, 1, 2], r"must be \(2,\)")):
        (tmp_path / "bad.json").write_text(json.dumps({**data, "layer_ids": bad}))
        with pytest.raises(ValueError, match=f"bad.json.*{message}"):
            Placement.load(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def report_of_the_log(tmp_path_factory):
    """The README's loop on the shipped log: import, then report on 4x2; returns the folder."""
    folder = tmp_path_factory.mktemp("loop")
    assert main(["import", str(LOG), "--out", str(folder / "trace.npz")]) == 0
    assert Trace.load(folder / "trace.npz").layer_ids.tolist() == [0, 15]  # the meta record's layers_logged
    assert main(["report", "--trace", str(folder / "trace.npz"), "--topologies", "4x2", "--out",
                 str(folder / "report")]) == 0
    (folder / "config.json").write_text(json.dumps(OLMOE))
    return folder


def test_the_report_says_and_saves_the_logs_layers(report_of_the_log):
    folder = report_of_the_log
    text = (folder / "report" / "report.txt").read_text()
    assert "the files record their rows' model layers, [0, 15]; sglang can do without --config, given --num-layers N" \
        in text
    assert "2 MoE layers (numbered as in the model)" in text  # the findings name the log's layers 0 and 15
    header = next(line for line in text.splitlines() if line.strip().startswith("layer 0"))
    assert header.split()[:4] == ["layer", "0", "layer", "15"]
    placement = Placement.load(folder / "report" / "placement-4x2.json")
    assert placement.layer_ids == [0, 15] and placement.num_layers == 2


def test_each_engine_file_places_the_rows_at_the_logged_layers(report_of_the_log, capsys):
    folder = report_of_the_log
    placement = Placement.load(folder / "report" / "placement-4x2.json")
    rows, identity = placement.phy2log, np.arange(placement.num_slots) % 64
    source, config = str(folder / "report" / "placement-4x2.json"), str(folder / "config.json")

    def export(fmt, out, *flags):
        status, text, err = run_cli(main, capsys, "export", source, "--format", fmt, "--out", str(folder / out),
                                    *flags)
        assert status == 0, err
        return text

    # SGLang: one row per decoder layer, the log's layers at 0 and 15 (without a config the table ends at the last
    # placed layer, and the line says so)
    assert "16 layers (the last placed layer + 1: --num-layers N or --config for a model with more), placed: [0, 15]" \
        in export("sglang", "a.json")
    table = np.array(json.loads((folder / "a.json").read_text())["physical_to_logical_map"])
    assert table.shape == (16, 72) and (table[[0, 15]] == rows).all() and (table[1:15] == identity).all()
    # TensorRT-LLM wants every MoE layer: the config lists them (or --moe-layers, the user's word that these are all)
    status, _, err = run_cli(main, capsys, "export", source, "--format", "trtllm", "--out", str(folder / "a.yaml"))
    assert status == 2 and "TensorRT-LLM wants an assignment for every MoE layer" in err
    export("trtllm", "a.yaml", "--moe-layers", "0,15")
    assert yaml.safe_load((folder / "a.yaml").read_text())["initial_global_assignments"] == {
        0: rows[0].tolist(), 15: rows[1].tolist()}
    assert "2 of the model's 16 MoE layers given; the others keep slot s -> expert s mod E" in export(
        "trtllm", "b.yaml", "--config", config)
    keys = yaml.safe_load((folder / "b.yaml").read_text())["initial_global_assignments"]
    assert sorted(keys) == list(range(16)) and keys[15] == rows[1].tolist() and keys[7] == identity.tolist()
    # vLLM and EPLB number the model's MoE layers: refused without the config, at their places with it
    for fmt, out in (("vllm", "v.jsonl"), ("eplb", "e.pt")):
        status, _, err = run_cli(main, capsys, "export", source, "--format", fmt, "--out", str(folder / out))
        assert status == 2 and "covers model layers [0, 15]" in err and "give --config" in err
        export(fmt, out, "--config", config)
    mapping = json.loads((folder / "v.jsonl").read_text())["initial_global_assignments"]
    assert sorted(map(int, mapping)) == list(range(16))
    assert mapping["0"] == rows[0].tolist() and mapping["15"] == rows[1].tolist() and mapping["3"] == identity.tolist()
    eplb = torch.load(folder / "e.pt")
    assert eplb["phy2log"].shape == (16, 72) and (eplb["phy2log"][[0, 15]].numpy() == rows).all()


def test_moe_layers_and_config_must_agree_with_the_recorded_layers(report_of_the_log, capsys, tmp_path):
    source = str(report_of_the_log / "report" / "placement-4x2.json")
    status, _, err = run_cli(main, capsys, "export", source, "--format", "sglang", "--moe-layers", "0,1", "--out",
                             str(tmp_path / "x.json"))
    assert status == 2 and "--moe-layers [0, 1] disagrees with the model layers the placement records, [0, 15]" in err
    (tmp_path / "deepseek.json").write_text(json.dumps({  # layers 0-2 dense: layer 0 cannot hold a placement
        "model_type": "deepseek_v3", "num_hidden_layers": 16, "n_routed_experts": 64, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3}))
    status, _, err = run_cli(main, capsys, "export", source, "--format", "trtllm", "--config",
                             str(tmp_path / "deepseek.json"), "--out", str(tmp_path / "x.yaml"))
    assert status == 2 and "layers [0] are not MoE layers" in err
    status, _, err = run_cli(main, capsys, "export", source, "--format", "sglang", "--num-layers", "12", "--out",
                             str(tmp_path / "x.json"))
    assert status == 2 and "--num-layers 12: the placement covers model layer 15, so the model has at least 16" in err


def test_the_python_api_uses_the_recorded_layers_and_refuses_to_renumber_them():
    table = np.tile(np.arange(8), (2, 1))
    placement = Placement(table, 8, 2, 2, "contiguous", layer_ids=[0, 15])
    assert np.array(placement.to_sglang()["physical_to_logical_map"]).shape == (16, 8)
    assert sorted(placement.to_trtllm()["initial_global_assignments"]) == [0, 15]
    with pytest.raises(ValueError, match=r"moe_layers \[0, 1\] disagrees with the model layers this placement records"):
        placement.to_sglang([0, 1], 16)
    for method, engine in ((placement.to_vllm, "vLLM"), (placement.to_eplb, "EPLB")):
        with pytest.raises(ValueError, match=f"{engine} numbers the model's MoE layers 0..M-1, and this placement's "
                                             r"rows are model layers \[0, 15\]"):
            method()
    plain = Placement(table, 8, 2, 2, "contiguous")  # nothing recorded: as before
    assert sorted(plain.to_vllm()["initial_global_assignments"]) == ["0", "1"] and plain.to_eplb()[0].shape == (2, 8)
    with pytest.raises(ValueError, match="SGLang needs the model layer index of each MoE layer"):
        plain.to_sglang()


def test_a_load_file_of_some_layers_exports_at_its_layers(tmp_path, capsys):
    from minimoe.traces.loads import LoadTrace

    counts = np.random.default_rng(0).integers(0, 50, (3, 2, 16))  # 3 steps, MoE layers 1 and 3, 16 experts
    LoadTrace(counts=counts, num_experts=16, layer_ids=[1, 3], top_k=2).save(tmp_path / "loads.npz")
    (tmp_path / "config.json").write_text(json.dumps({  # DeepSeek-style: layer 0 dense, MoE layers 1..3
        "model_type": "deepseek_v3", "num_hidden_layers": 4, "n_routed_experts": 16, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1}))
    source = str(tmp_path / "loads.npz")
    status, _, err = run_cli(main, capsys, "export", source, "--format", "eplb", "--out", str(tmp_path / "w.pt"))
    assert status == 2 and "the load file covers model layers [1, 3]" in err and "give --config" in err
    status, out, err = run_cli(main, capsys, "export", source, "--format", "eplb", "--config",
                               str(tmp_path / "config.json"), "--out", str(tmp_path / "w.pt"))
    assert status == 0 and "2 of the model's 3 MoE layers given; the others hold no tokens" in out, err
    weight = torch.load(tmp_path / "w.pt")["weight"].numpy()  # MoE layers 1, 2, 3 -> rows 0, 1, 2
    assert weight.shape == (3, 16) and (weight[[0, 2]] == counts.sum(0)).all() and not weight[1].any()
    status, out, err = run_cli(main, capsys, "export", source, "--format", "sglang", "--out", str(tmp_path / "s.json"))
    table = np.array(json.loads((tmp_path / "s.json").read_text())["logical_count"])
    assert status == 0 and table.shape == (4, 16) and (table[[1, 3]] == counts.sum(0)).all() and not table[[0, 2]].any()


def test_logged_layers_beyond_any_model_are_named_by_their_field(tmp_path):
    from minimoe.traces import from_jsonl

    lines = [json.dumps({"type": "meta", "layers_logged": [0, 2000], "top_k": 1, "num_experts": 4}),
             json.dumps({"type": "route", "req_id": "a", "token_idx": 0, "layer": 0, "topk_ids": [1]})]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 1: layers_logged must be a non-empty list of distinct layer indices in "
                                         r"\[0, 1024\), got \[0, 2000\]"):
        from_jsonl(tmp_path / "log.jsonl")


def test_rows_0_to_l_are_taken_as_the_whole_model_only_out_loud(tmp_path, capsys):
    placement = Placement(np.tile(np.arange(8), (2, 1)), 8, 2, 2, "contiguous", layer_ids=[0, 1])
    placement.save(tmp_path / "p.json")
    for fmt, out in (("trtllm", "t.yaml"), ("vllm", "v.jsonl"), ("eplb", "e.pt")):
        status, text, err = run_cli(main, capsys, "export", str(tmp_path / "p.json"), "--format", fmt, "--out",
                                    str(tmp_path / out))
        assert status == 0 and "its rows taken as every MoE layer of the model: --config MODEL/config.json checks " \
                               "that" in text, err
    (tmp_path / "config.json").write_bytes(b"\x87\x00binary")  # a weights file given as the config
    status, _, err = run_cli(main, capsys, "export", str(tmp_path / "p.json"), "--format", "vllm", "--config",
                             str(tmp_path / "config.json"), "--out", str(tmp_path / "v.jsonl"))
    assert status == 2 and f"{tmp_path / 'config.json'} is not text (byte 0x87 at offset 0): expected a model's " \
                           "config.json" in err, err
