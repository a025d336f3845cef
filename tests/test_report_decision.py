"""The practitioner's loop: a serving log in, a placement recommended and saved, the saved file replays exactly.

Traces without phases (most serving logs) still get placements, split in time or by request; the report ends
with a decision per topology; the placement files it writes measure back to the report's numbers; what a new
user tried first is refused in one line.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from minimoe.cli import main
from minimoe.placement import Placement, Topology, measure
from minimoe.placement.decision import LOAD_TOLERANCE, recommend
from minimoe.placement.deployment import Deployment
from minimoe.placement.report import run_report, save_decision
from minimoe.placement.report_text import format_report
from minimoe.placement.splits import split
from minimoe.traces import Trace, planted_trace, synthetic_trace
from batches import run_cli

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "tests" / "data" / "vllm_moe_routes.jsonl"


def run(capsys, *argv):
    return run_cli(main, capsys, *argv)


def unknown_phases(trace: Trace) -> Trace:
    return Trace(experts=trace.experts, request=trace.request, phase=np.full(trace.num_tokens, -1, np.int8),
                 domain=None, num_experts=trace.num_experts, top_k=trace.top_k, model=trace.model)


# ---- a realistic serving log, no flags ------------------------------------------------------------------------
def test_the_shipped_routing_log_is_what_its_script_writes():
    sys.path.insert(0, str(LOG.parent))
    try:
        import make_vllm_moe_routes
    finally:
        sys.path.pop(0)
    assert LOG.read_text() == "\n".join(make_vllm_moe_routes.lines()) + "\n"


def test_a_realistic_routing_log_imports_with_no_flags_and_the_report_says_what_to_deploy(tmp_path, capsys):
    status, out, err = run(capsys, "import", LOG, "--out", tmp_path / "trace.npz")
    assert status == 0, err
    assert "271 tokens, 12 requests, 2 MoE layers (model layers [0, 15]), top-8 of 64 experts" in out
    assert "note: meta vllm_version: 0.6.6.post1" in out and "note: fields not read: step (542 lines), timestamp" in out
    assert "note: num_experts: not recorded: assumed 64" in out
    status, out, err = run(capsys, "report", "--trace", tmp_path / "trace.npz", "--topologies", "2x2,4x2",
                           "--out", tmp_path / "report")
    assert status == 0, err
    assert "(c) Prefill predicts decode: not measured: phases unknown" in out and "no decode tokens" not in out
    assert "phases unknown: each request's first half of tokens stands in for its prompt" in out
    assert "2x2: deploy " in out and "4x2: deploy " in out and "minimoe export " in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["split"]["kind"] == "time" and len(report["rows"]) == 2 * 2 * 6 * 3
    saved = Placement.load(tmp_path / "report" / "placement-4x2.json")
    assert (saved.num_layers, saved.num_experts, saved.num_gpus) == (2, 64, 8)
    status, out, err = run(capsys, "export", tmp_path / "report" / "placement-4x2.json", "--format", "sglang",
                           "--moe-layers", "0,15", "--num-layers", "16", "--out", tmp_path / "init.json")
    assert status == 0, err
    table = np.array(json.loads((tmp_path / "init.json").read_text())["physical_to_logical_map"])
    assert np.array_equal(table[[0, 15]], saved.phy2log)


# ---- the decision and the files it saves ----------------------------------------------------------------------
@pytest.mark.parametrize("phases", ["known", "unknown"])
def test_every_saved_placement_measures_back_to_the_reports_numbers(phases, tmp_path):
    trace = planted_trace(num_domains=4, experts_per_domain=8, num_requests=24, tokens_per_request=20, seed=3)
    trace = trace if phases == "known" else unknown_phases(trace)
    topologies = [Topology(2, 2), Topology(4, 2)]
    fitted = {}
    result = run_report(trace, topologies, seed=5, fitted=fitted)
    names = save_decision(trace, result, topologies, tmp_path, seed=5, fitted=fitted)  # the fits the rows measured
    (tmp_path / "again").mkdir()
    refitted = save_decision(trace, result, topologies, tmp_path / "again", seed=5)  # without them: refitted
    assert refitted == names and all(Deployment.load(tmp_path / "again" / n).to_dict()
                                     == Deployment.load(tmp_path / n).to_dict() for n in names)
    assert result["split"]["kind"] == ("phase" if phases == "known" else "time")
    assert names and set(names) == {f for d in result["decision"] for f in d["files"]}
    for name in names:
        deployment = Deployment.load(tmp_path / name)
        topology = next(t for t in topologies if name.startswith(f"placement-{t}"))
        placement, sources, held_out = deployment.replay_inputs(trace)
        row = next(r for r in result["rows"] if r["topology"] == str(topology) and r["fit"] == "prefill"
                   and r["method"] == deployment.method and r["num_replicas"] == placement.num_slots)
        report = measure(trace, placement, topology, sources=sources, tokens=held_out)
        assert report.inter_node_bytes == row["inter_node_bytes"] == deployment.measured["inter_node_bytes"]
        assert report.load_max_over_mean == pytest.approx(row["load_max_over_mean"], abs=1e-12)
        assert (deployment.steering is not None) == deployment.method.startswith("grouping")
        assert Placement.load(tmp_path / name) == placement
    text = format_report(result, "out")
    assert "Decision" in text and "Methods:" in text and "minimoe export out/placement-2x2" in text
    for d in result["decision"]:
        assert d["headline"] in text and "fewer inter-node bytes than contiguous" in d["headline"]


def test_a_deployment_refuses_a_trace_it_was_not_fitted_on(tmp_path):
    trace = synthetic_trace(num_requests=8, tokens_per_request=12, num_layers=2, num_experts=8, top_k=2, seed=1)
    topologies = [Topology(2, 2)]
    result = run_report(trace, topologies)
    name = save_decision(trace, result, topologies, tmp_path)[0]
    other = synthetic_trace(num_requests=9, tokens_per_request=12, num_layers=2, num_experts=8, top_k=2, seed=1)
    with pytest.raises(ValueError, match="tokens 96 in the file, 108 in the trace"):
        Deployment.load(tmp_path / name).replay_inputs(other)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "minimoe.deployment/1"}))
    with pytest.raises(ValueError, match="bad.json.*must be a minimoe.deployment/1 object"):
        Deployment.load(tmp_path / "bad.json")


def test_requests_too_short_to_split_in_time_are_split_by_request():
    base = synthetic_trace(num_requests=40, tokens_per_request=1, num_layers=2, num_experts=8, top_k=2, seed=2)
    trace = unknown_phases(base)
    chosen = split(trace)
    assert chosen.kind == "request" and chosen.masks["online"] is None
    assert chosen.masks["prefill"].sum() == 20 and not (chosen.masks["prefill"] & chosen.masks["eval"]).any()
    result = run_report(trace, [Topology(2, 2)])
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"contiguous", "round_robin", "eplb", "locality"}  # grouping needs a request's own tokens
    assert {r["fit"] for r in result["rows"]} == {"prefill", "oracle"}
    text = format_report(result)
    assert "too short to split in time" in text and "earlier requests" in text
    assert result["decision"][0]["recommended"]["method"] in methods


def test_a_single_token_trace_says_why_no_placement_is_measured(tmp_path, capsys):
    trace = unknown_phases(synthetic_trace(num_requests=1, tokens_per_request=1, num_layers=1, num_experts=4,
                                           top_k=2, seed=0))
    trace.save(tmp_path / "t.npz")
    status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--topologies", "2x2",
                           "--out", tmp_path / "r")
    assert status == 0, err
    assert "Placement and grouping: not measured: phases unknown and the trace holds 1 token(s) of one request" in out


def test_the_rule_keeps_load_within_tolerance_of_eplb_and_prefers_fewer_bytes():
    def row(method, slots, nbytes, load, topology="4x2"):
        return dict(topology=topology, fit="prefill", method=method, num_replicas=slots, inter_node_bytes=nbytes,
                    load_max_over_mean=load, cut_vs_contiguous=None, cut_vs_eplb=None)
    rows = [row("contiguous", 32, 100.0, 1.3), row("eplb", 32, 101.0, 1.0), row("locality", 32, 80.0, 1.09),
            row("grouping+locality", 32, 50.0, 1.0 * LOAD_TOLERANCE + 0.01), row("eplb", 40, 99.0, 1.0),
            row("locality", 40, 80.0, 1.05), row("grouping+locality", 40, 60.0, 1.02)]
    choice = recommend(rows, "4x2")
    assert (choice["recommended"]["method"], choice["recommended"]["num_replicas"]) == ("grouping+locality", 40)
    assert (choice["placement_only"]["method"], choice["placement_only"]["num_replicas"]) == ("locality", 40)
    one_node = [row("contiguous", 8, 0.0, 1.2, "1x8"), row("eplb", 8, 0.0, 1.01, "1x8"),
                row("locality", 8, 0.0, 1.05, "1x8")]
    assert recommend(one_node, "1x8")["recommended"]["method"] == "eplb"  # no bytes to save: the lowest load
    assert recommend(rows, "2x2") is None


def test_default_topologies_that_cannot_hold_the_experts_are_skipped_and_said(tmp_path, capsys):
    synthetic_trace(num_requests=8, tokens_per_request=16, num_layers=1, num_experts=12, top_k=2,
                    seed=0).save(tmp_path / "t.npz")
    status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--out", tmp_path / "r")
    assert status == 0, err
    assert "skipping 4x2, 2x4, 4x4: their GPUs cannot hold 12 experts evenly" in err and "2x2: deploy" in out
    status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--topologies", "4x2",
                           "--out", tmp_path / "r2")
    assert status == 2 and "4x2 has 8 GPUs, which cannot hold 12 experts evenly" in err


def test_a_load_dump_with_steps_out_of_order_is_measured_in_sample(tmp_path, capsys):
    import torch

    counts = np.random.default_rng(0).integers(0, 40, (5, 3, 8))
    full = np.zeros((5, 4, 8), np.int32)
    full[:, [1, 2, 3]] = counts
    torch.save({"rank": 0, "logical_count": torch.from_numpy(full)}, tmp_path / "stat.pt")
    assert run(capsys, "import", tmp_path / "stat.pt", "--out", tmp_path / "loads.npz")[0] == 0
    status, out, err = run(capsys, "report", "--trace", tmp_path / "loads.npz", "--topologies", "2x2",
                           "--out", tmp_path / "r")
    assert status == 0, err
    assert "in-sample: the steps are not in time order" in out and "2x2: deploy " in out
    assert "all-to-all bytes, request grouping and prefill -> decode prediction: not measured" in out
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    eplb = min(r["load_max_over_mean"] for r in rows if r["method"] == "eplb")
    assert eplb <= min(r["load_max_over_mean"] for r in rows if r["method"] == "contiguous")
    status, _, err = run(capsys, "findings", "--trace", tmp_path / "loads.npz")
    assert status == 2 and "a load trace (counts per expert only)" in err


# ---- what a new user tried first ------------------------------------------------------------------------------
def _bundled_copy(folder: Path) -> Path:
    source = ROOT / "checkpoints" / "moe-4domain"
    folder.mkdir()
    for name in ("config.json", "train_config.json", "tokenizer.json"):
        shutil.copy(source / name, folder / name)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return folder


META_ONLY = '{"type": "meta", "model_id": "m", "num_experts": 8, "top_k": 2}\n'
WIDE_META = META_ONLY + '{"type": "route", "req_id": 0, "token_idx": 0, "layer": 0, "topk_ids": [1]}\n'


@pytest.mark.parametrize("argv, expected", [
    (["trace", "--model", "corrupt", "--requests-per-domain", "2", "--new-tokens", "2", "--out", "t.npz"],
     "corrupt/model.safetensors is not a readable safetensors file"),
    (["import", "meta.jsonl", "--out", "t.npz"], "meta.jsonl: the log holds 1 meta record(s) and no route record"),
    (["import", "wide.jsonl", "--out", "t.npz"], "line 1: the meta record says top_k=2, but no route record lists "
                                                 "more than 1 expert ids"),
    (["trace", "--model", "empty", "--out", "t.npz"], "--model empty: empty/config.json is empty"),
    (["report", "--seed", "-1"], "argument --seed: expected a whole number from 0 to 4294967295, got -1"),
    (["report", "--new-tokens", "1"], "--new-tokens 1: the report fits on the first decode tokens"),
    (["report", "--threads", "999"], "argument --threads: expected at most"),
    (["import", "wide.jsonl", "--out", "x.txt"], "--out x.txt: a trace file ends in .npz"),
])
def test_what_a_new_user_tried_is_refused_in_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _bundled_copy(tmp_path / "corrupt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("")
    (tmp_path / "meta.jsonl").write_text(META_ONLY)
    (tmp_path / "wide.jsonl").write_text(WIDE_META)
    before = set(tmp_path.iterdir())
    status, out, err = run(capsys, *argv)
    assert status == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert set(tmp_path.iterdir()) == before, "a failed command left files behind"
