"""Serving engines' files, both ways, with no engine installed.

Placements out: each engine's reading rule is re-implemented here from its documented semantics (slot s of a
layer on rank s // (P / ep_size); SGLang's rows are every decoder layer, TensorRT-LLM's keys model layer
indices, vLLM's the MoE layers) and must give back the placement that was exported. Loads in: fixtures in every
engine's dump format, written here, import to exactly their counts, and import -> export keeps them exactly.
Hostile variants are refused in one line naming the file and the field. The MoE-layer rules of
``minimoe.traces.layers`` are checked against the modules transformers builds.
"""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file

from minimoe.cli import main
from minimoe.placement import Placement, Topology
from minimoe.placement.eplb import eplb_numpy
from minimoe.placement.export import to_sglang, to_trtllm, to_vllm
from minimoe.traces.layers import layers_from_config, parse_layers
from minimoe.traces.load_dumps import from_sglang_per_pass, from_sglang_stat, from_vllm_eplb
from minimoe.traces.load_dumps_trtllm import from_trtllm
from minimoe.traces import BUNDLED_MODEL, synthetic_trace
from minimoe.traces.loads import LoadTrace, read_trace_file
from batches import run_cli

E, L_ALL, MOE = 8, 5, [1, 2, 4]  # 8 experts; a 5-layer model whose layers 0 and 3 are dense


def a_placement(seed=0, num_slots=12, nodes=2, gpus=2) -> Placement:
    """A placement with replicas (EPLB on random loads): 3 MoE layers, 8 experts, 12 slots on 2x2 GPUs."""
    loads = np.random.default_rng(seed).integers(1, 100, (len(MOE), E)).astype(float)
    phy2log, _, _ = eplb_numpy(loads, num_slots, 1, nodes, nodes * gpus)
    return Placement(phy2log, E, nodes, gpus, method="eplb")


def ranks_view(table, ep_size):
    """The engines' rule: rank r holds slots r*P/ep .. (r+1)*P/ep - 1 of every row."""
    per_rank = table.shape[1] // ep_size
    return [[list(row[r * per_rank:(r + 1) * per_rank]) for r in range(ep_size)] for row in table]


def run(capsys, *argv):
    return run_cli(main, capsys, *argv)


# ---- placements out -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_sglang_reads_back_the_same_placement(tmp_path, capsys, suffix):
    placement = a_placement()
    placement.save(tmp_path / "p.json")
    config = {"model_type": "deepseek_v3", "num_hidden_layers": L_ALL, "n_routed_experts": E,
              "first_k_dense_replace": 1, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps({**config}))
    # layers 1, 2, 3, 4 would be MoE under that config; this model has 3 MoE layers: name them instead
    status, out, err = run(capsys, "export", tmp_path / "p.json", "--format", "sglang", "--moe-layers", "1,2,4",
                           "--num-layers", L_ALL, "--out", tmp_path / f"init{suffix}")
    assert status == 0, err
    assert "--ep-num-redundant-experts 4" in out and "over 4 ranks" in out and "5 layers, placed: [1, 2, 4]" in out
    if suffix == ".json":
        data = json.loads((tmp_path / "init.json").read_text())
    else:
        data = {k: v.tolist() for k, v in torch.load(tmp_path / "init.pt", weights_only=True).items()}
    assert set(data) == {"physical_to_logical_map"}  # SGLang passes the keys as arguments: nothing else
    table = np.array(data["physical_to_logical_map"])
    assert table.shape == (L_ALL, 12)
    for dense in (0, 3):
        assert table[dense].tolist() == [s % E for s in range(12)]  # SGLang's trivial mapping
    # SGLang's rule: physical expert s of layer l on rank s // (P / ep_size); MoE layer i is model layer MOE[i]
    rebuilt = Placement(table[MOE], E, 2, 2, method="eplb")
    assert rebuilt == placement
    assert ranks_view(table[MOE], 4) == [[list(placement.phy2log[i][placement.gpu_of_slot == r]) for r in range(4)]
                                         for i in range(3)]
    assert to_sglang(placement, MOE, L_ALL) == {"physical_to_logical_map": table.tolist()}


def test_trtllm_yaml_reads_back_the_same_placement(tmp_path, capsys):
    placement = a_placement(seed=1)
    placement.save(tmp_path / "p.json")
    status, out, err = run(capsys, "export", tmp_path / "p.json", "--format", "trtllm", "--moe-layers", "1-2,4",
                           "--out", tmp_path / "moe_load_balancer.yaml")
    assert status == 0, err
    config = yaml.safe_load((tmp_path / "moe_load_balancer.yaml").read_text())
    assert config["num_slots"] == 12 and config["layer_updates_per_iter"] == 0
    assigned = config["initial_global_assignments"]
    assert sorted(assigned) == MOE and all(isinstance(k, int) for k in assigned)  # model layer indices
    rebuilt = Placement(np.array([assigned[layer] for layer in MOE]), E, 2, 2, method="eplb")
    assert rebuilt == placement and to_trtllm(placement, MOE)["initial_global_assignments"] == assigned
    # TensorRT-LLM: rank r's local experts are assignments[r * slots_per_rank:(r + 1) * slots_per_rank]
    assert ranks_view(np.array([assigned[l] for l in MOE]), 4)[0][3] == list(placement.phy2log[0][9:12])


def test_vllm_and_eplb_files_read_back_the_same_placement(tmp_path, capsys):
    placement = a_placement(seed=2)
    placement.save(tmp_path / "p.json")
    assert run(capsys, "export", tmp_path / "p.json", "--format", "vllm", "--out", tmp_path / "map.jsonl")[0] == 0
    record = json.loads((tmp_path / "map.jsonl").read_text())
    assert record["record_type"] == "eplb_initial_mapping" and record["version"] == 1
    assert record["num_slots"] == 12 and record["num_redundant_experts"] == 4
    rows = [record["initial_global_assignments"][str(i)] for i in range(3)]  # MoE layers 0..L-1
    assert Placement(np.array(rows), E, 2, 2, method="eplb") == placement and record == to_vllm(placement)
    assert run(capsys, "export", tmp_path / "p.json", "--format", "eplb", "--out", tmp_path / "eplb.pt")[0] == 0
    tensors = torch.load(tmp_path / "eplb.pt", weights_only=True)
    assert np.array_equal(tensors["phy2log"].numpy(), placement.phy2log)
    for layer in range(3):
        for expert in range(E):
            slots = tensors["log2phy"][layer, expert, :tensors["logcnt"][layer, expert]].tolist()
            assert sorted(slots) == np.flatnonzero(placement.phy2log[layer] == expert).tolist()


def test_export_from_a_report_deployment_file_and_with_a_transformers_config(tmp_path, capsys):
    from transformers import DeepseekV3Config

    placement = a_placement()
    deployment = {"format": "minimoe.deployment/1", "placement": placement.to_dict(), "method": "eplb",
                  "sources": None, "steering": None, "split": {}, "seed": 0, "measured": {}, "trace": {}}
    (tmp_path / "placement-2x2.json").write_text(json.dumps(deployment))
    config = DeepseekV3Config(num_hidden_layers=4, n_routed_experts=E, first_k_dense_replace=1).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    status, out, err = run(capsys, "export", tmp_path / "placement-2x2.json", "--format", "trtllm", "--config",
                           tmp_path / "config.json", "--out", tmp_path / "lb.yaml")
    assert status == 0, err  # first_k_dense_replace=1 of 4 layers: MoE layers 1, 2, 3
    assert sorted(yaml.safe_load((tmp_path / "lb.yaml").read_text())["initial_global_assignments"]) == [1, 2, 3]


@pytest.mark.parametrize("argv, expected", [
    (["--format", "sglang", "--out", "x.json"], "--format sglang needs the model layer index of each MoE layer"),
    (["--format", "sglang", "--moe-layers", "1,2", "--out", "x.json"],
     "the placement has 3 MoE layers, but --moe-layers names 2 ([1, 2])"),
    (["--format", "trtllm", "--config", "two.json", "--out", "x.yaml"],
     "the placement has 3 MoE layers, but --config two.json names 2 ([0, 1])"),
    (["--format", "sglang", "--moe-layers", "1,2,7", "--num-layers", "7", "--out", "x.json"],
     "--moe-layers [1, 2, 7] names layer 7, but --num-layers 7 gives the model layers 0..6: the MoE layers must be "
     "below --num-layers"),
    (["--format", "sglang", "--moe-layers", "0-1023", "--out", "x.json"],
     "the placement has 3 MoE layers, but --moe-layers names 1024 ([0, 1, 2, 3, 4, 5, 6, 7, ... 1023] (1024 in all))"),
    (["--format", "sglang", "--moe-layers", "0-99999999999", "--out", "x.json"],
     "argument --moe-layers: layer index 99999999999 is above 1023: no model has that many layers, got "
     "'0-99999999999'"),
    (["--format", "sglang", "--config", "huge.json", "--out", "x.json"],
     "huge.json: num_hidden_layers=99999999999 is more than 1024 (no model has that many layers)"),
    (["--format", "sglang", "--moe-layers", "1,2,4", "--num-layers", "99999999999", "--out", "x.json"],
     "argument --num-layers: expected a whole number from 1 to 1024, got 99999999999"),
    (["--format", "vllm", "--moe-layers", "0,15", "--out", "x.jsonl"],
     "--moe-layers does not apply to --format vllm (it reads --config); it numbers the model's MoE layers 0..M-1: "
     "give --config to place a placement of some of them"),
    (["--format", "eplb", "--moe-layers", "0,1", "--out", "x.pt"], "--moe-layers does not apply to --format eplb"),
    (["--format", "trtllm", "--moe-layers", "1,2,4", "--num-layers", "16", "--out", "x.yaml"],
     "--num-layers does not apply to --format trtllm (it reads --moe-layers, --config); --num-layers sizes sglang's "
     "rows over every decoder layer"),
    (["--format", "vllm", "--config", "other.json", "--out", "x.jsonl"],  # vllm reads --config: a check
     "--config other.json: the model has 16 experts per layer, the placement 8"),
    (["--format", "trtllm", "--moe-layers", "1,a", "--out", "x.yaml"],
     "argument --moe-layers: expected increasing layer indices"),
    (["--format", "trtllm", "--moe-layers", "1,2,4", "--out", "x.json"], "--out x.json: --format trtllm writes .yaml"),
    (["--format", "sglang", "--config", "empty.json", "--out", "x.json"], "empty.json is empty"),
    (["--format", "sglang", "--config", "dense.json", "--out", "x.json"], "dense.json: no routed experts"),
    (["--format", "sglang", "--config", "other.json", "--out", "x.json"],  # 16 experts (and 3 layers): named
     "--config other.json: the model has 16 experts per layer, the placement 8"),
    (["--format", "rocm", "--out", "x.json"], "argument --format: invalid choice"),
    (["--format", "sglang", "--moe-layers", "0-2", "--out", "p.json"],
     "--out p.json: is the input file p.json; writing there would destroy it"),
    (["--format", "vllm", "--out", "/proc/x.jsonl"], "--out /proc/x.jsonl: cannot write there"),
    (["--format", "vllm", "--out", "empty.json/x.jsonl"], "--out empty.json/x.jsonl: empty.json is a file, not a folder"),
    (["--format", "vllm", "--out", "nowhere/x.jsonl"], "--out nowhere/x.jsonl: the folder nowhere does not exist"),
])
def test_export_refuses_bad_input_in_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a_placement().save("p.json")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "dense.json").write_text(json.dumps({"num_hidden_layers": 4, "intermediate_size": 64}))
    (tmp_path / "other.json").write_text(json.dumps({"num_hidden_layers": 3, "num_local_experts": 16}))
    (tmp_path / "two.json").write_text(json.dumps({"num_hidden_layers": 2, "num_local_experts": E}))
    (tmp_path / "huge.json").write_text(json.dumps({"num_hidden_layers": 99999999999, "num_local_experts": E}))
    status, out, err = run(capsys, "export", "p.json", *argv)
    assert status == 2 and err.count("\n") == 1 and len(err) < 400 and "Traceback" not in err, err
    assert err.startswith(f"minimoe export: error: {expected}"), err
    assert Placement.load("p.json") == a_placement()  # the input is never touched


def test_import_refuses_to_write_over_its_input_or_where_it_cannot_write(tmp_path, capsys):
    source = tmp_path / "t.npz"
    synthetic_trace(num_requests=4, tokens_per_request=8, num_experts=8, top_k=2).save(source)
    before = source.read_bytes()
    (tmp_path / "link.npz").symlink_to(source)
    for out, expected in ((source, f"--out {source}: is the input file {source}; writing there would destroy it"),
                          (tmp_path / "link.npz", "is the input file"),
                          ("/proc/x.npz", "--out /proc/x.npz: cannot write there")):
        status, _, err = run(capsys, "import", source, "--out", out)
        assert status == 2 and err.count("\n") == 1 and expected in err, err
    assert source.read_bytes() == before


def test_export_of_a_grouping_placement_says_it_needs_request_steering(tmp_path, capsys):
    plain = a_placement()
    for method, steered in (("eplb", False), ("grouping+locality", True)):
        Placement(plain.phy2log, E, 2, 2, method=method).save(tmp_path / "p.json")
        status, out, err = run(capsys, "export", tmp_path / "p.json", "--format", "vllm", "--out", tmp_path / "x.jsonl")
        assert status == 0, err
        assert ("note: grouping+locality was measured with request steering" in out) == steered, out


def test_a_minimoe_config_without_num_experts_is_named():
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert layers_from_config(config, "c.json").num_experts == config["moe"]["num_experts"]
    for value in (None, 0):  # never an export whose expert count goes unchecked
        with pytest.raises(ValueError, match=rf'c.json: its "moe" section has no num_experts >= 1 \(got {value}\)'):
            layers_from_config(dict(config, moe=dict(config["moe"], num_experts=value)), "c.json")


def test_a_load_trace_refuses_a_steps_mask_of_another_shape():
    loads = LoadTrace(counts=true_counts(), num_experts=E, layer_ids=MOE, top_k=2)
    for steps in (np.ones(loads.num_steps + 1, bool), np.ones(loads.num_steps, int)):
        with pytest.raises(ValueError, match=rf"steps must be a bool mask of shape \({loads.num_steps},\)"):
            loads.loads(steps)
    assert np.array_equal(loads.loads(np.ones(loads.num_steps, bool)), loads.loads())


def test_export_names_a_folder_given_as_the_placement_file(tmp_path, capsys):
    status, _, err = run(capsys, "export", tmp_path, "--format", "vllm", "--out", tmp_path / "x.jsonl")
    assert status == 2 and err == (f"minimoe export: error: {tmp_path} is a folder: expected a placement file from "
                                   "minimoe report (placement-NODESxGPUS.json) or a load file from minimoe import\n")


def test_export_flags_are_checked_as_given_and_listed_per_format_in_help(tmp_path, capsys):
    from minimoe.placement.export_command import FLAGS

    a_placement().save(tmp_path / "p.json")
    status, _, err = run(capsys, "export", tmp_path / "p.json", "--format", "vllm", "--num-layers", "3", "--out",
                         tmp_path / "x.jsonl")
    assert status == 2 and "--num-layers does not apply to --format vllm (it reads --config)" in err, err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "flags each format reads (another is refused):" in text
    for name, flags in FLAGS.items():
        assert f"  {name:7s} {', '.join(flags)}\n" in text, name


@pytest.mark.parametrize("edit, argv, expected", [
    ({"num_nodes": 4.0}, ["--format", "vllm", "--out", "x.jsonl"], "p.json: num_nodes must be a whole number >= 1, "
                                                                    "got 4.0"),
    ({"num_experts": "8"}, ["--format", "vllm", "--out", "x.jsonl"], "p.json: num_experts must be a whole number"),
    ({"phy2log": [[0, 1], [2]]}, ["--format", "vllm", "--out", "x.jsonl"], "p.json: phy2log must be a list of equally "
                                                                           "long lists"),
    ("deep", ["--format", "vllm", "--out", "x.jsonl"], "placement file p.json: not valid JSON here"),
    ("binary", ["--format", "vllm", "--out", "x.jsonl"], "p.json: not UTF-8 text"),
    ({}, ["--format", "sglang", "--moe-layers", "4,2,1", "--out", "x.json"], "got '4,2,1'"),
    ({}, ["--format", "sglang", "--moe-layers", "1,2,4", "--num-layers", "0", "--out", "x.json"],
     "argument --num-layers: expected a whole number from 1 to 1024, got 0"),
])
def test_export_refuses_hand_edited_placement_files_naming_the_field(edit, argv, expected, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = a_placement().to_dict()
    text = {"deep": "[" * 100000 + "]" * 100000, "binary": "\udcff"}.get(edit) if isinstance(edit, str) else None
    if text is None:
        (tmp_path / "p.json").write_text(json.dumps({**data, **edit}))
    else:
        (tmp_path / "p.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    status, _, err = run(capsys, "export", "p.json", *argv)
    assert status == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_export_of_a_load_file_checks_its_layers_and_experts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    LoadTrace(counts=true_counts(), num_experts=E, layer_ids=MOE, top_k=2).save(tmp_path / "l.npz")
    (tmp_path / "cfg.json").write_text(json.dumps({"num_hidden_layers": 5, "num_local_experts": 16}))
    for fmt, out, argv, expected in (
            ("sglang", "x.json", ["--config", "cfg.json"], "--config cfg.json: the model has 16 experts per layer, "
                                                           "the load file 8"),
            ("eplb", "x.pt", ["--config", "cfg.json"], "--config cfg.json: the model has 16 experts per layer, the "
                                                       "load file 8"),
            ("sglang", "x.json", ["--moe-layers", "0-2"], "--moe-layers [0, 1, 2] disagrees with the model layers "
                                                          "the load file records, [1, 2, 4]"),
            ("eplb", "x.pt", [], "the load file covers model layers [1, 2, 4]; --format eplb numbers the model's MoE "
                                 "layers 0..M-1, which only the model's config tells: give --config"),
            ("sglang", "x.json", ["--num-layers", "4"], "--num-layers 4: the load file covers model layer 4, so the "
                                                        "model has at least 5 layers"),
            ("sglang", "x.json", ["--moe-layers", "1"], "the load file has 3 MoE layers, but --moe-layers names 1 "
                                                        "([1])"),
            ("eplb", "x.pt", ["--moe-layers", "1,2,4"], "--moe-layers does not apply to --format eplb")):
        status, _, err = run(capsys, "export", "l.npz", "--format", fmt, *argv, "--out", out)
        assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"minimoe export: error: {expected}"), err


# ---- which layers are MoE: the config rules against the modules transformers builds ---------------------------
def _hf_moe_layers(model) -> list[int]:
    layers = model.model.layers
    return [i for i, layer in enumerate(layers) if any(hasattr(m, "experts") for m in layer.modules())]


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe", "llama4", "mixtral"])
def test_moe_layers_from_a_config_match_the_model_transformers_builds(name):
    import transformers as tf

    small = dict(vocab_size=32, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16)
    config = {
        "deepseek_v3": lambda: tf.DeepseekV3Config(**small, num_hidden_layers=5, first_k_dense_replace=2,
                                                   n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                                   n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=8,
                                                   qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**small, num_hidden_layers=6, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=8, decoder_sparse_step=2, mlp_only_layers=[3]),
        "llama4": lambda: tf.Llama4TextConfig(**small, num_hidden_layers=4, num_local_experts=4,
                                              interleave_moe_layer_step=2, intermediate_size_mlp=16),
        "mixtral": lambda: tf.MixtralConfig(**small, num_hidden_layers=3, num_local_experts=4),
    }[name]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    ours = layers_from_config(json.loads(config.to_json_string()), name)
    assert list(ours.moe_layers) == _hf_moe_layers(model)
    assert ours.num_layers == config.num_hidden_layers and ours.num_experts == 4
    assert ours.moe_layers != tuple(range(ours.num_layers)) or name == "mixtral"  # the rule mattered


def test_layer_lists_parse_ranges_and_refuse_nonsense():
    assert parse_layers("0,3-5") == [0, 3, 4, 5] and parse_layers("1020-1023") == [1020, 1021, 1022, 1023]
    for bad in ("a", "3-1", "1,1", "-2"):
        with pytest.raises(ValueError, match="expected increasing layer indices >= 0"):
            parse_layers(bad)
    with pytest.raises(ValueError, match=r"^layer index 1024 is above 1023: no model has that many layers, got "
                                         r"'0,1024'$"):
        parse_layers("0,1024")
    with pytest.raises(ValueError) as error:  # a huge index is refused before any range is built, and not echoed
        parse_layers("0-" + "9" * 5000)
    assert len(str(error.value)) < 200, str(error.value)


def test_layer_lists_in_messages_show_a_short_prefix():
    from minimoe.traces.layers import layer_list

    assert layer_list([5]) == "[5]" and layer_list(range(9)) == "[0, 1, 2, 3, 4, 5, 6, 7, 8]"
    assert layer_list(np.arange(10**6)) == "[0, 1, 2, 3, 4, 5, 6, 7, ... 999999] (1000000 in all)"
    assert layer_list("3,2") == "'3,2'" and layer_list(7) == "7"


# ---- loads in ---------------------------------------------------------------------------------------------------
def true_counts(steps=6, seed=0):
    """(steps, MoE layers, E) counts that a model with MoE layers MOE routed."""
    return np.random.default_rng(seed).integers(0, 50, (steps, len(MOE), E))


def write_sglang_stat(path, counts):
    full = np.zeros((counts.shape[0], L_ALL, E), np.int32)
    full[:, MOE] = counts
    torch.save({"rank": 0, "logical_count": torch.from_numpy(full), "average_utilization_rate_over_window": None},
               path)


def write_sglang_per_pass(folder, counts, ranks=2, slots=12):
    """Per-rank dumps: each rank routed part of every pass's tokens, counted per physical slot of a map."""
    phy2log = np.stack([np.arange(slots) % E for _ in range(L_ALL)])  # slots 8..11 copy experts 0..3
    rng = np.random.default_rng(1)
    per_rank = [[] for _ in range(ranks)]
    for step, layer_counts in enumerate(counts):
        full = np.zeros((L_ALL, E), np.int64)
        full[MOE] = layer_counts
        shares = [np.zeros((L_ALL, slots), np.int64) for _ in range(ranks)]
        for layer in range(L_ALL):
            for expert in range(E):
                for _ in range(full[layer, expert]):  # each token: a rank and one of the expert's slots
                    slot = rng.choice(np.flatnonzero(phy2log[layer] == expert))
                    shares[rng.integers(ranks)][layer, slot] += 1
        for rank in range(ranks):
            per_rank[rank].append({"forward_pass_id": 100 + step, "rank": rank, "gatherer_key": "primary",
                                   "global_physical_count": torch.from_numpy(shares[rank])})
    for rank in range(ranks):
        torch.save({"records": per_rank[rank], "last_physical_to_logical_map": torch.from_numpy(phy2log)},
                   folder / f"expert_distribution_recorder_1700000000.0_{rank}.pt")


def write_trtllm(folder, counts, ranks=2, coactivation=None):
    folder.mkdir(exist_ok=True)
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": 2}))
    for rank in range(ranks):
        share = counts // ranks + (counts % ranks > rank)  # the ranks' shares sum to the counts
        save_file({f"{10 + s}_{layer}": share[s, i].astype(np.int32) for s in range(len(counts))
                   for i, layer in enumerate(MOE)}, str(folder / f"rank{rank}.safetensors"))
        if coactivation is not None:
            part = coactivation // ranks + (coactivation % ranks > rank)
            save_file({f"10_{layer}": part[i].astype(np.int32) for i, layer in enumerate(MOE)},
                      str(folder / f"cooccurrence_rank{rank}.safetensors"))


def write_vllm(path, counts, slots=12):
    phy2log = np.stack([(np.arange(slots) + 3 * layer) % E for layer in range(len(MOE))])
    lines = [json.dumps({"record_type": "eplb_initial_mapping", "version": 1})]
    for step, layer_counts in enumerate(counts):
        physical = np.zeros((len(MOE), slots), np.int64)
        for layer in range(len(MOE)):
            for expert in range(E):
                slots_of = np.flatnonzero(phy2log[layer] == expert)
                physical[layer, slots_of[0]] += layer_counts[layer, expert] - layer_counts[layer, expert] // 2
                physical[layer, slots_of[-1]] += layer_counts[layer, expert] // 2
        lines.append(json.dumps({"record_type": "eplb_load_stats", "version": 1, "step": 7 * step, "num_ranks": 4,
                                 "expert_load": physical.tolist(), "p2l_map": phy2log.tolist()}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["sglang-stat", "sglang-per-pass", "trtllm-stats", "vllm-eplb-stats"])
def test_every_load_dump_imports_to_exactly_its_counts_and_exports_them_exactly(fmt, tmp_path, capsys):
    counts = true_counts(steps=3 if fmt == "sglang-per-pass" else 6)
    source = {"sglang-stat": tmp_path / "stat.pt", "sglang-per-pass": tmp_path / "dumps",
              "trtllm-stats": tmp_path / "expert_statistic", "vllm-eplb-stats": tmp_path / "eplb.jsonl"}[fmt]
    if fmt == "sglang-stat":
        write_sglang_stat(source, counts)
    elif fmt == "sglang-per-pass":
        source.mkdir()
        write_sglang_per_pass(source, counts)
    elif fmt == "trtllm-stats":
        write_trtllm(source, counts)
    else:
        write_vllm(source, counts)
    flags = ["--moe-layers", "1,2,4"] if fmt == "vllm-eplb-stats" else []
    status, out, err = run(capsys, "import", source, "--out", tmp_path / "loads.npz", *flags)  # format guessed
    assert status == 0, err
    assert "per-token routing: none" in out
    loads = read_trace_file(tmp_path / "loads.npz")
    assert isinstance(loads, LoadTrace) and loads.layer_ids.tolist() == MOE
    if fmt == "sglang-stat":  # a ring buffer: totals only
        assert not loads.ordered and np.array_equal(loads.counts.sum(0), counts.sum(0))
    else:
        assert loads.ordered and np.array_equal(loads.counts, counts)
    # import -> export: SGLang's logical_count over every decoder layer, the counts exactly
    status, out, err = run(capsys, "export", tmp_path / "loads.npz", "--format", "sglang", "--num-layers", L_ALL,
                           "--moe-layers", "1,2,4", "--out", tmp_path / "count.json")
    assert status == 0, err
    exported = np.array(json.loads((tmp_path / "count.json").read_text())["logical_count"])
    expected = np.zeros((L_ALL, E), np.int64)
    expected[MOE] = counts.sum(0)
    assert np.array_equal(exported, expected)


def test_trtllm_coactivation_is_read_and_used_by_the_report(tmp_path, capsys):
    counts = true_counts(steps=4)
    rng = np.random.default_rng(3)
    co = rng.integers(0, 20, (len(MOE), E, E))
    co = co + co.transpose(0, 2, 1)
    write_trtllm(tmp_path / "stats", counts, coactivation=co)
    loads = from_trtllm(tmp_path / "stats")
    assert np.array_equal(loads.coactivation, co) and loads.top_k == 2 and loads.layer_ids.tolist() == MOE
    loads.save(tmp_path / "loads.npz")
    status, out, err = run(capsys, "report", "--trace", tmp_path / "loads.npz", "--topologies", "2x2",
                           "--out", tmp_path / "r")
    assert status == 0, err
    assert "fitted on the first half of the steps, measured on the second" in out
    assert "pairs" in out and "locality" in out and "all-to-all bytes, request grouping" in out
    assert "2x2: deploy" in out and (tmp_path / "r" / "placement-2x2.json").is_file()
    placement = Placement.load(tmp_path / "r" / "placement-2x2.json")
    assert placement.num_layers == 3 and placement.num_experts == E


def test_load_trace_files_round_trip_and_refuse_damage(tmp_path):
    loads = LoadTrace(counts=true_counts(), num_experts=E, layer_ids=MOE, top_k=2, model="m", source="s",
                      notes={"a": "b"})
    loads.save(tmp_path / "l.npz")
    again = LoadTrace.load(tmp_path / "l.npz")
    assert again == loads and again.notes == {"a": "b"}
    with pytest.raises(ValueError, match="counts must be >= 0"):
        LoadTrace(counts=-true_counts(), num_experts=E)
    with pytest.raises(ValueError, match="counts are all zero"):
        LoadTrace(counts=np.zeros((1, 2, E)), num_experts=E)


class NotATensor:  # a pickled object torch.load(weights_only=True) must refuse
    pass


@pytest.mark.parametrize("case, expected", [
    ("wrong shape", r"logical_count: expected shape \(steps, layers, experts\) or \(layers, experts\), got \(8,\)"),
    ("negative", r"counts must be >= 0"),
    ("pickle", r"torch.load\(weights_only=True\) refuses it: it pickles a test_engine_files.NotATensor object"),
    ("not torch", r"not a readable torch.save file"),
    ("no key", r"a .pt file without 'logical_count' \(SGLang stat\) or 'records'"),
    ("map misses slots", r"the physical-to-logical map has shape \(5, 10\).*misses slots"),
    ("map misses expert", r"gives expert 7 of layer 0 no slot"),
    ("trtllm corrupt", r"rank1.safetensors: not a readable safetensors file"),
    ("trtllm shape", r"has shape \(7,\), expected \(8,\)"),
    ("trtllm ep_size", r"ep_size=4, but the folder holds 2 rank files"),
    ("vllm negative", r"line 2: expert_load: counts must be >= 0"),
    ("vllm version", r"line 2: version 2"),
    ("moe layers disagree", r"logical_count: layer 4 holds counts but is not among the MoE layers \[1, 2\]"),
])
def test_hostile_load_dumps_are_refused_in_one_line_naming_file_and_field(case, expected, tmp_path, capsys):
    counts = true_counts(steps=2)
    path = tmp_path / "dump.pt"
    flags = []
    if case == "wrong shape":
        torch.save({"logical_count": torch.zeros(E, dtype=torch.int32)}, path)
    elif case == "negative":
        write_sglang_stat(path, -counts - 1)
    elif case == "pickle":
        torch.save({"logical_count": NotATensor()}, path)
    elif case == "not torch":
        path.write_bytes(b"\x00garbage")
    elif case == "no key":
        torch.save({"counts": torch.zeros(2)}, path)
    elif case.startswith("map"):
        path = tmp_path / "dumps"
        path.mkdir()
        write_sglang_per_pass(path, counts[:1])
        file = next(path.glob("*_0.pt"))
        data = torch.load(file, weights_only=True)
        if case == "map misses slots":
            data["last_physical_to_logical_map"] = data["last_physical_to_logical_map"][:, :10]
        else:
            data["last_physical_to_logical_map"][0] = torch.arange(12) % 7
        torch.save(data, file)
        for other in path.glob("*_1.pt"):
            other.unlink()
    elif case.startswith("trtllm"):
        path = tmp_path / "stats"
        write_trtllm(path, counts)
        if case == "trtllm corrupt":
            (path / "rank1.safetensors").write_bytes(b"{}{}junk")
        elif case == "trtllm shape":
            save_file({"10_1": np.ones(7, np.int32)}, str(path / "rank1.safetensors"))
        else:
            meta = json.loads((path / "meta_info.json").read_text())
            (path / "meta_info.json").write_text(json.dumps({**meta, "ep_size": 4}))
    elif case.startswith("vllm"):
        path = tmp_path / "eplb.jsonl"
        write_vllm(path, counts)
        lines = path.read_text().splitlines()
        record = json.loads(lines[1])
        if case == "vllm negative":
            record["expert_load"][0][0] = -5
        else:
            record["version"] = 2
        lines[1] = json.dumps(record)
        path.write_text("\n".join(lines) + "\n")
    else:
        write_sglang_stat(path, counts)
        flags = ["--moe-layers", "1,2"]
    status, out, err = run(capsys, "import", path, "--out", tmp_path / "t.npz", *flags)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(expected, err), err
    assert str(path.name) in err or case == "moe layers disagree" and "dump.pt" in err
    assert not (tmp_path / "t.npz").exists()


def test_readers_take_python_objects_too(tmp_path):
    counts = true_counts(steps=2)
    write_sglang_stat(tmp_path / "s.pt", counts)
    stat = from_sglang_stat(tmp_path / "s.pt", moe_layers=MOE)
    assert np.array_equal(stat.counts.sum(0), counts.sum(0)) and "ring" in stat.notes["steps"]
    auto = from_sglang_stat(tmp_path / "s.pt")  # MoE layers = the rows holding counts, said in the notes
    assert auto.layer_ids.tolist() == MOE and "rows holding counts" in auto.notes["layers"]
    (tmp_path / "d").mkdir()
    write_sglang_per_pass(tmp_path / "d", counts)
    assert np.array_equal(from_sglang_per_pass(tmp_path / "d").counts, counts)
    write_vllm(tmp_path / "v.jsonl", counts)
    vllm = from_vllm_eplb(tmp_path / "v.jsonl")
    assert vllm.layer_ids.tolist() == [-1, -1, -1] and "eplb_initial_mapping (1)" in vllm.notes["records skipped"]


def test_help_and_readme_list_every_format_with_its_source_and_layers(capsys):
    from pathlib import Path

    from minimoe.placement.export import FORMATS as EXPORTS
    from minimoe.traces.convert import SOURCES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for argv in (["import", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        names = SOURCES if argv[0] == "import" else EXPORTS
        for name in names:
            assert f"  {name} " in text, (argv, name)
            assert f"| `{name}` |" in readme, name
        if argv[0] == "import":
            for name, (_, origin, layers) in SOURCES.items():
                assert f"from: {origin}; layers: {layers}" in " ".join(text.split()), name
    flat = " ".join(text.split())  # export --help: each engine's layer numbering
    for said in ("over every decoder layer", "keyed by model layer index", "MoE layers 0..M-1", "the placement's layers are "
                 "written at their places"):
        assert said in flat, said
