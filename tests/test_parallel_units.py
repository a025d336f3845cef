"""The pieces of expert parallelism in one process, each against an independent reference, and the command.

Routing on the device equals ``Placement.route``; the send lists equal a brute-force loop; a rank's experts
equal ``MoELayer``; capacity across ranks equals the single-process mask; the layer with no process group
equals ``MoELayer`` (values and gradients, every wire format); bad inputs raise clear errors; ``minimoe
ep-demo`` runs under ``torchrun`` with 2 gloo ranks and reports bytes equal to the accounting.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minimoe.model import ModelConfig, MoEConfig, MoELayer, Transformer
from minimoe.parallel import (WIRE_FORMATS, ExpertParallelMoE, RouteTable, TrafficCounters, capacity_kept, combine,
                              dispatch, expert_parallel, local_experts)
from minimoe.parallel.checks import check_fingerprint, fingerprint, placement_hash
from minimoe.parallel.demo import main as ep_demo
from minimoe.parallel.sendplan import hit_per_node, hit_per_pair, hit_per_rank, plan
from minimoe.parallel.replay import replay_steps
from minimoe.placement import Placement
from minimoe.traces import Trace, synthetic_trace

TOL = dict(rtol=1e-5, atol=1e-5)
ROOT = Path(__file__).resolve().parents[1]


def random_placement(rng, num_experts, num_nodes, gpus_per_node, extra_per_gpu=0, layers=1):
    num_gpus = num_nodes * gpus_per_node
    slots = (-(-num_experts // num_gpus) + extra_per_gpu) * num_gpus
    rows = [rng.permutation(np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, slots - num_experts)]))
            for _ in range(layers)]
    return Placement(np.stack(rows), num_experts, num_nodes, gpus_per_node)


@pytest.mark.parametrize("seed", range(6))
def test_route_table_equals_placement_route(seed):
    rng = np.random.default_rng(seed)
    placement = random_placement(rng, int(rng.integers(3, 20)), int(rng.integers(1, 3)), int(rng.integers(1, 4)),
                                 extra_per_gpu=int(rng.integers(0, 3)), layers=2)
    experts = rng.integers(-1, placement.num_experts, size=(50, 3))
    token_index = rng.integers(0, 1000, size=50)
    for layer in range(2):
        table = RouteTable(placement, layer)
        for source in range(placement.num_gpus):
            expected = placement.route(layer, experts, np.full(50, source), token_index)
            got = table.route(torch.as_tensor(experts), source, torch.as_tensor(token_index)).numpy()
            np.testing.assert_array_equal(got, expected)


def brute_force_send_list(slots, num_gpus, spg, gpn, rank, unit):
    """(src_row, destination rank, meta row) by loops, sorted by destination then row (then pair)."""
    sends = []
    for row, row_slots in enumerate(slots.tolist()):
        if unit == "pair":
            sends += [(s // spg, row, j, [s % spg]) for j, s in enumerate(row_slots) if s >= 0]
        elif unit == "rank":
            for d in sorted({s // spg for s in row_slots if s >= 0}):
                sends.append((d, row, 0, [s % spg if s >= 0 and s // spg == d else -1 for s in row_slots]))
        else:  # node: to the entry rank of each remote node
            for n in sorted({s // spg // gpn for s in row_slots if s >= 0} - {rank // gpn}):
                meta = [s if s >= 0 and s // spg // gpn == n else -1 for s in row_slots]
                sends.append((n * gpn + rank % gpn, row, 0, meta))
    sends.sort(key=lambda item: item[:3])
    return sends


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("unit", ["pair", "rank", "node"])
def test_send_plans_equal_a_brute_force_loop(seed, unit):
    """Counts, send list and return-table positions built on the device equal a loop over the tokens."""
    rng = np.random.default_rng(seed)
    num_nodes, gpn, spg = 2, int(rng.integers(1, 4)), int(rng.integers(1, 4))
    num_gpus = num_nodes * gpn
    slots = rng.integers(-1, num_gpus * spg, size=(int(rng.integers(0, 12)), int(rng.integers(1, 5))))
    rank = int(rng.integers(num_gpus))
    t = torch.as_tensor(slots)
    hit = {"pair": lambda: hit_per_pair(t, num_gpus, spg), "rank": lambda: hit_per_rank(t, num_gpus, spg),
           "node": lambda: hit_per_node(t, num_gpus, spg, gpn, rank)}[unit]()
    leg = plan(hit, rank)
    expected = brute_force_send_list(slots, num_gpus, spg, gpn, rank, unit)  # (dest, row, j, meta), sorted
    cells = [(d, row * slots.shape[1] + j if unit == "pair" else row) for d, row, j, _ in expected]
    counts = np.bincount([d for d, _ in cells], minlength=num_gpus)
    assert leg.counts.tolist() == counts.tolist()
    kept = [u for d, u in cells if d == rank]
    table = kept + [u for d, u in cells if d != rank]  # [kept | sent to rank 0, 1, ... (this rank skipped)]
    sent_first = [u for d, u in cells if d != rank] + kept
    assert leg.send_units(len(kept), len(cells)).tolist() == sent_first
    column = {d: 0 if d == rank else d + (d < rank) for d in range(num_gpus)}  # this rank's column first
    table_cells = [c for c in cells if c[0] == rank] + [c for c in cells if c[0] != rank]
    for index, (d, u) in enumerate(table_cells):
        assert leg.mask[u, column[d]] and int(leg.position[u, column[d]]) == index
    assert int(leg.mask.sum()) == len(table)


def test_local_experts_equal_the_moe_layer_values_and_gradients():
    torch.manual_seed(0)
    moe = MoELayer(16, MoEConfig(num_experts=6, top_k=3, intermediate_size=8))
    phy2log = torch.tensor([3, 0, 5, 1, 2, 4, 0, 5])  # 8 local slots, experts 0 and 5 twice
    x = torch.randn(11, 16, requires_grad=True)
    routing = moe.router(x)
    replica = {e: [s for s in range(8) if phy2log[s] == e] for e in range(6)}
    slots = torch.tensor([[replica[e][t % len(replica[e])] for e in row]
                          for t, row in enumerate(routing.expert_ids.tolist())])
    gate_up = moe.gate_up_proj[phy2log]
    down = moe.down_proj[phy2log]
    out = local_experts(x, slots, routing.weights, gate_up, down)
    reference = moe._experts_loop(x, routing, None)
    torch.testing.assert_close(out, reference, **TOL)
    grads = torch.autograd.grad(out.square().sum(), [x, moe.gate_up_proj], retain_graph=True)
    expected = torch.autograd.grad(reference.square().sum(), [x, moe.gate_up_proj])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **TOL)


def test_local_experts_skip_entries_of_other_ranks():
    torch.manual_seed(1)
    rows, gate_up, down = torch.randn(4, 8), torch.randn(2, 8, 12), torch.randn(2, 6, 8)
    slots = torch.tensor([[0, -1], [-1, -1], [1, 0], [-1, 1]])
    weights = torch.rand(4, 2)
    out = local_experts(rows, slots, weights, gate_up, down)

    def expert(s, v):
        h = v @ gate_up[s]
        return (torch.nn.functional.silu(h[:6]) * h[6:]) @ down[s]

    expected = torch.stack([sum((weights[n, j] * expert(s, rows[n]) for j, s in enumerate(slots[n].tolist()) if s >= 0),
                                torch.zeros(8)) for n in range(4)])
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_in_one_process_equals_the_moe_layer_mask(factor):
    torch.manual_seed(2)
    moe = MoELayer(8, MoEConfig(num_experts=4, top_k=2, intermediate_size=4, capacity_factor=factor))
    moe(torch.randn(30, 8))
    kept, capacity = capacity_kept(moe.last_routing.expert_ids, 4, 2, factor)
    assert int(capacity) == moe.capacity
    assert torch.equal(kept, moe.last_kept)
    assert capacity_kept(moe.last_routing.expert_ids, 4, 2, 0.0) == (None, None)


@pytest.mark.parametrize("wire_format, static", [(f, False) for f in WIRE_FORMATS] + [("token_rank", True)])
def test_the_layer_without_a_process_group_equals_the_moe_layer(wire_format, static):
    torch.manual_seed(3)
    moe = MoELayer(12, MoEConfig(num_experts=5, top_k=2, intermediate_size=6, num_shared_experts=1))
    placement = Placement(np.array([[0, 1, 2, 3, 4, 2]]), 5, 1, 1)
    layer = ExpertParallelMoE(moe, placement, 0, None, wire_format, static=static)
    x = torch.randn(2, 7, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(layer(x2), moe(x), **TOL)
    layer(x2).sum().backward()
    moe(x).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    torch.testing.assert_close(layer.router.weight.grad, moe.router.weight.grad, **TOL)
    gate_up, down = layer.gather_experts(grads=True)
    torch.testing.assert_close(gate_up, moe.gate_up_proj.grad, **TOL)
    assert layer.counters.bytes == {key: 0 for key in layer.counters.bytes}  # one rank: nothing leaves it


def test_expert_parallel_swaps_every_moe_layer_and_keeps_the_logits():
    torch.manual_seed(4)
    config = ModelConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24,
                         moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=8), moe_layers=[0, 2])
    model = Transformer(config).eval()
    ids = torch.randint(0, 50, (2, 9))
    reference = model(ids)
    placement = Placement(np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), 4, 1, 1)
    parallel = expert_parallel(model, placement)
    assert sum(isinstance(b.ffn, ExpertParallelMoE) for b in parallel.layers) == 2
    torch.testing.assert_close(parallel(ids), reference, **TOL)
    with pytest.raises(ValueError, match="3 MoE layers|2 MoE layers but the placement has 1"):
        expert_parallel(Transformer(config), Placement(np.array([[0, 1, 2, 3]]), 4, 1, 1))


def test_bad_inputs_raise_clear_errors():
    moe = MoELayer(8, MoEConfig(num_experts=4, top_k=2, intermediate_size=4))
    one_gpu = Placement(np.array([[0, 1, 2, 3]]), 4, 1, 1)
    with pytest.raises(ValueError, match="placement is for 2 GPUs .* process group has 1 ranks"):
        ExpertParallelMoE(moe, Placement(np.array([[0, 1, 2, 3]]), 4, 2, 1))
    with pytest.raises(ValueError, match="placement has 5 experts, the MoE layer 4"):
        ExpertParallelMoE(moe, Placement(np.array([[0, 1, 2, 3, 4]]), 5, 1, 1))
    with pytest.raises(ValueError, match="wire_format must be one of"):
        ExpertParallelMoE(moe, one_gpu, wire_format="per_token")
    with pytest.raises(ValueError, match="static=True .*token_rank"):
        ExpertParallelMoE(moe, one_gpu, wire_format="token_expert", static=True)
    layer = ExpertParallelMoE(moe, one_gpu)
    with pytest.raises(ValueError, match=r"expects \(B, T, 8\) or \(T, 8\), got \(3, 5\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype torch.float64 differs"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    table = RouteTable(one_gpu, 0)
    with pytest.raises(ValueError, match="layer=1 is not a layer of the placement"):
        RouteTable(one_gpu, 1)
    with pytest.raises(ValueError, match="dispatch needs x"):
        dispatch(torch.randn(3, 8), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), table)
    with pytest.raises(ValueError, match="wire_format must be one of"):
        dispatch(torch.randn(2, 8), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), table, "rows")
    with pytest.raises(ValueError, match="in \\['torch.float32'"):
        fingerprint(4, 2, 8, torch.int8, one_gpu, 0, 1, 0, 0.0)
    num_slots = one_gpu.num_slots
    for bad in (num_slots, -5):  # a slot id no rank holds: refused, not dropped (on the CPU, where it costs no sync)
        for fmt in WIRE_FORMATS:
            with pytest.raises(ValueError, match=rf"slots must be global slot ids in \[0, {num_slots}\) or -1 \(none\), "
                                                 rf"got ids in \[{min(bad, 0)}, {max(bad, 1)}\]"):
                dispatch(torch.randn(2, 8), torch.tensor([[0, bad], [0, 1]]), torch.ones(2, 2), table, fmt)
    with pytest.raises(ValueError, match="slots must hold integer slot ids, got dtype torch.float32"):
        dispatch(torch.randn(2, 8), torch.tensor([[0.7, 1.0]] * 2), torch.ones(2, 2), table)
    weights = torch.randn(num_slots, 8, 8), torch.randn(num_slots, 4, 8)
    with pytest.raises(ValueError, match=rf"slots must be local slot ids in \[0, {num_slots}\) or -1, got ids in "
                                         rf"\[0, {num_slots}\]"):
        local_experts(torch.randn(2, 8), torch.tensor([[0], [num_slots]]), torch.ones(2, 1), *weights)
    for fmt in WIRE_FORMATS:  # combine takes back exactly the (N, H) rows dispatch delivered, before any exchange
        sent = dispatch(torch.randn(3, 8), torch.tensor([[0, 1], [1, -1], [0, 1]]), torch.ones(3, 2), table, fmt)
        rows = sent.rows.shape[0]
        for shape in ((rows + 1, 8), (rows - 1, 8), (rows, 9)):
            with pytest.raises(ValueError, match=rf"combine needs expert_out of shape \(N, H\) = \({rows}, 8\), the "
                                                 "rows dispatch delivered to this rank, got " + re.escape(str(shape))):
                combine(torch.ones(shape), sent.handle)
    with pytest.raises(TypeError, match=r"layout must be a Placement or a RouteTable \(num_gpus, slots_per_gpu, "
                                        r"gpus_per_node\), got NoneType"):
        dispatch(torch.randn(2, 8), torch.tensor([[0, 1]] * 2), torch.ones(2, 2), None)
    with pytest.raises(TypeError, match=r"combine needs the handle of a dispatch \(Dispatched.handle\), got NoneType"):
        combine(torch.ones(2, 8), None)


def test_fingerprints_and_placement_hashes():
    a = Placement(np.array([[0, 1, 2, 3]]), 4, 1, 2)
    b = Placement(np.array([[1, 0, 2, 3]]), 4, 1, 2)
    assert placement_hash(a, 0) == placement_hash(Placement(np.array([[0, 1, 2, 3]]), 4, 1, 2), 0)
    assert placement_hash(a, 0) != placement_hash(b, 0)
    check_fingerprint(fingerprint(4, 2, 8, torch.float32, a, 0, 1, 1, 0.0))  # one process: nothing to disagree


def test_the_format_rule():
    from minimoe.parallel import choose_wire_format, expected_ranks_per_token

    assert [round(expected_ranks_per_token(256, 8, g), 3) for g in (2, 4, 8)] == [1.993, 3.614, 5.295]
    picks = {g: choose_wire_format(256, 8, g).wire_format for g in (1, 2, 4, 8)}
    assert picks == {1: "replicate", 2: "replicate", 4: "replicate", 8: "token_rank"}
    assert choose_wire_format(256, 8, 8, graph=True).wire_format == "replicate"
    assert choose_wire_format(256, 8, 16, gpus_per_node=8).wire_format == "hierarchical"
    assert choose_wire_format(256, 8, 8, rho=7.5).wire_format == "replicate"  # a measured rho decides
    choice = choose_wire_format(256, 8, 8)
    assert choice.bytes_ratio == pytest.approx(8 / 5.295, abs=1e-3) and "rho = 5.29" in choice.reason
    with pytest.raises(ValueError, match="max_extra_bytes must be >= 0"):
        choose_wire_format(256, 8, 8, max_extra_bytes=-1)
    for rho in (0, float("nan"), 100):  # distinct ranks per token: between 1 and min(G, top_k)
        with pytest.raises(ValueError, match=r"rho must be a number of distinct ranks per token in \[1, min\(num_gpus, "
                                             r"top_k\) = 8\], got"):
            choose_wire_format(256, 8, 16, rho=rho)
    with pytest.raises(ValueError, match="gpus_per_node=5 does not divide num_gpus=16 into whole nodes"):
        choose_wire_format(256, 8, 16, gpus_per_node=5)
    layer = ExpertParallelMoE(MoELayer(8, MoEConfig(num_experts=4, top_k=2, intermediate_size=4)),
                              Placement(np.array([[0, 1, 2, 3]]), 4, 1, 1))
    assert layer.wire_format == "replicate" and layer.format_choice.reason == "one rank: nothing moves"


def test_traffic_counters_classify_links_and_add_up():
    counters = TrafficCounters()
    counters.add("dispatch", [3, 5, 7, 11], row_bytes=10, rank=1, gpus_per_node=2, meta_bytes_per_row=8)
    assert counters.local_rows["dispatch"] == 5
    assert counters.rows[("dispatch", "intra")] == 3 and counters.rows[("dispatch", "inter")] == 18
    assert counters.bytes[("dispatch", "inter")] == 180 and counters.meta_bytes == 8 * 21
    total = TrafficCounters().merge(counters).merge(counters)
    assert total.link_bytes("intra") == 60 and total.as_dict()["dispatch_local_rows"] == 10
    padded = TrafficCounters()
    padded.add("combine", [2, 4, 1], row_bytes=10, rank=0, gpus_per_node=1, padded_to=4)  # blocks of 4 rows
    assert padded.bytes[("combine", "inter")] == 50 and padded.padding_bytes == (4 - 4 + 4 - 1) * 10


def test_replay_steps_cover_every_row_once_and_decode_steps_one_token_per_request():
    trace = synthetic_trace(num_requests=12, num_experts=8, top_k=2, num_layers=2, seed=0)
    steps = replay_steps(trace, max_step_tokens=7)
    rows = np.concatenate(steps)
    assert sorted(rows.tolist()) == list(range(trace.num_tokens))
    for step in steps:
        if (trace.phase[step] == 1).all():
            assert len(set(trace.request[step].tolist())) == len(step)
        else:
            assert len(step) <= 7
    with pytest.raises(ValueError, match="max_step_tokens must be a positive int"):
        replay_steps(trace, max_step_tokens=0)


def test_the_command_checks_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ep_demo(["--gpus-per-node", "0"])
    assert exit_info.value.code == 2 and "expected a whole number >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # shorter than a second fails the ranks' rendezvous itself
        ep_demo(["--timeout", "0.001"])
    assert "argument --timeout: expected a finite number >= 1, got 0.001" in capsys.readouterr().err
    for flag, value, expected in (("--experts", "100000", "from 1 to 32768"), ("--hidden", "10000000", "from 1 to 65536"),
                                  ("--tokens-per-rank", "100000000", "from 1 to 1048576"),
                                  ("--requests-per-domain", "1000000", "from 1 to 100000")):
        with pytest.raises(SystemExit):  # sizes that would only exhaust memory are refused before anything runs
            ep_demo([flag, value])
        assert f"argument {flag}: expected a whole number {expected}, got {value}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--experts 2000 x --hidden 64 x --intermediate 60000 .* the random layer "
                                         "would take 92.2 GB per rank; expected at most 8 GB"):
        ep_demo(["--experts", "2000", "--intermediate", "60000", "--top-k", "1"])
    for replicas, expected in (("3", "from the 16 experts to 128 "), ("100000", "from the 16 experts to 128 ")):
        with pytest.raises(ValueError, match=f"--replicas {replicas}: expected physical slots per layer {expected}"):
            ep_demo(["--replicas", replicas])
    with pytest.raises(ValueError, match="--gpus-per-node 3 does not divide the 1 ranks"):
        ep_demo(["--gpus-per-node", "3", "--experts", "4", "--top-k", "2", "--hidden", "8"])
    with pytest.raises(SystemExit):
        ep_demo(["--placement", "nearest"])
    assert "expected one of contiguous, round_robin, eplb, locality, grouping, grouping+locality" in \
        capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--model '/no/such/dir'"):
        ep_demo(["--model", "/no/such/dir"])
    with pytest.raises(FileNotFoundError, match="--trace '/no/such.npz'"):
        ep_demo(["--trace", "/no/such.npz"])
    with pytest.raises(ValueError, match="give one of them"):
        ep_demo(["--model", "bundled", "--trace", "bundled"])


def test_the_command_refuses_nccl_without_cuda_and_an_unwritable_json_before_running(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--backend nccl: NCCL needs CUDA GPUs and none is visible here"):
        ep_demo(["--backend", "nccl"])
    with pytest.raises(ValueError, match="--json .*x.json: the folder .*no_such_dir does not exist"):
        ep_demo(["--json", str(tmp_path / "no_such_dir" / "x.json")])


def test_the_command_refuses_a_dense_model_and_a_top_k_above_the_experts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "moe": None}))
    with pytest.raises(ValueError, match=f"--model {tmp_path}: a dense model .* has no experts to trace or place"):
        ep_demo(["--model", str(tmp_path)])
    with pytest.raises(ValueError, match="--top-k 99: a token picks top_k of the --experts 16: expected at most 16"):
        ep_demo(["--top-k", "99"])


def test_the_command_replays_a_parquet_trace_as_its_npz(capsys, tmp_path):
    from minimoe.traces.parquet_writer import write_parquet

    trace = Trace.load(ROOT / "benchmarks" / "results" / "ep_bundled_trace.npz")
    write_parquet(trace, tmp_path / "t.parquet")
    flags = ["--hidden", "8", "--iters", "1", "--wire-format", "token_rank"]
    assert ep_demo(["--trace", str(tmp_path / "t.parquet"), *flags]) == 0
    untimed = lambda text: re.sub(r"[0-9.]+ ms", "", text)  # noqa: E731 - timings differ between runs
    from_parquet = untimed(capsys.readouterr().out)
    assert ep_demo(["--trace", str(ROOT / "benchmarks" / "results" / "ep_bundled_trace.npz"), *flags]) == 0
    assert untimed(capsys.readouterr().out) == from_parquet and "local rows 16384" in from_parquet
    decode = int((trace.phase == 1).sum())  # the placement fits on prefill; the decode tokens are replayed
    assert (f"trace: {trace.num_tokens:,} tokens, {trace.num_requests:,} requests, {trace.num_layers} MoE layers, "
            f"top-{trace.top_k} of {trace.num_experts}; replaying its decode tokens (the placement fitted on prefill): "
            f"{decode:,} tokens") in from_parquet


def test_the_command_in_one_process(capsys, tmp_path):
    assert ep_demo(["--experts", "6", "--top-k", "2", "--hidden", "8", "--tokens-per-rank", "5", "--iters", "1",
                    "--json", str(tmp_path / "one.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "one.json").read_text())["rows"]
    assert [r["wire_format"] for r in rows] == list(WIRE_FORMATS) and out.count(": equal") == 4
    assert all(r["max_abs_error"] <= 1e-6 for r in rows)
    assert "format rule (eager) picks replicate: one rank" in out


@pytest.mark.parametrize("method", ["round_robin", "grouping", "grouping+locality", "file"])
def test_the_command_takes_every_fit_of_the_report_and_a_placement_file(capsys, tmp_path, method):
    flags = ["--experts", "8", "--top-k", "2", "--hidden", "8", "--tokens-per-rank", "6", "--iters", "1",
             "--wire-format", "auto"]
    if method == "file":
        Placement(np.array([[7, 6, 5, 4, 3, 2, 1, 0]]), 8, 1, 1).save(tmp_path / "p.json")
        method = str(tmp_path / "p.json")
    assert ep_demo(flags + ["--placement", method]) == 0
    out = capsys.readouterr().out
    assert f"placement {method}" in out and "replicate  max |EP - one process| 0.00e+00" in out
    with pytest.raises(ValueError, match="places 1 layer.* x 4 experts on 1 GPUs; this run needs 1 x 8 on 1"):
        Placement(np.array([[0, 1, 2, 3]]), 4, 1, 1).save(tmp_path / "small.json")
        ep_demo(flags + ["--placement", str(tmp_path / "small.json")])


def test_default_nodes_make_traffic_between_nodes_visible():
    from minimoe.parallel.demo_setup import default_gpus_per_node, nodes_line

    assert [default_gpus_per_node(w) for w in (1, 2, 3, 4, 6, 8)] == [1, 1, 1, 2, 3, 4]
    assert nodes_line(None, 4).startswith("2 node(s) of 2 rank(s) (the default")
    assert nodes_line(4, 4) == "1 node(s) of 4 rank(s)"


def test_an_error_under_torchrun_prints_one_line_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for bad in (["--placement", "nowhere"], ["--model", "/no/such/dir"]):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                   "minimoe", "ep-demo", "--backend", "gloo", *bad]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode != 0
        ours = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("minimoe ep-demo: error")]
        assert len(ours) == 1, done.stdout[-2000:] + done.stderr[-3000:]


def test_torchrun_ep_demo_on_two_gloo_ranks(tmp_path):
    """``torchrun -m minimoe ep-demo``: two ranks as two "nodes", every wire format, results as JSON."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minimoe",
               "ep-demo", "--backend", "gloo", "--gpus-per-node", "1", "--experts", "8", "--top-k", "3", "--hidden",
               "16", "--replicas", "10", "--placement", "eplb", "--capacity-factor", "1.0", "--iters", "1",
               "--timeout", "60", "--json", str(tmp_path / "out.json")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["world_size"] == 2 and [r["wire_format"] for r in result["rows"]] == list(WIRE_FORMATS)
    assert result["rows"][0]["format_rule"].startswith("format rule (eager) picks replicate: rho = ")
    for row in result["rows"]:
        assert row["max_abs_error"] <= 1e-5 and row["bytes_match"], row
        assert row["dispatch_inter_bytes"] > 0 and row["dispatch_intra_bytes"] == 0  # one GPU per "node"


def test_a_report_deployment_file_is_recognised_for_replay(tmp_path):
    from minimoe.parallel.demo_setup import saved_deployment
    from minimoe.placement import Deployment, Topology, place
    from minimoe.traces import synthetic_trace

    placement = place(synthetic_trace(num_requests=8, num_layers=1, seed=0), Topology(num_nodes=2, gpus_per_node=2),
                      "contiguous")
    Deployment(placement=placement, method="grouping+locality").save(tmp_path / "deploy.json")
    placement.save(tmp_path / "plain.json")
    loaded = saved_deployment(str(tmp_path / "deploy.json"))
    assert loaded is not None and loaded.method == "grouping+locality"
    assert saved_deployment(str(tmp_path / "plain.json")) is None and saved_deployment("locality") is None
