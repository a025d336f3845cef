"""The CUDA-only paths: the transposed grouped products, CUDA-graph capture of the MoE layer and of the replicate
exchange, the pinned-memory count exchange, and the host syncs each format pays (one process, NCCL, one rank).

Skipped without a CUDA device; on one GPU: ``PYTHONPATH=. python -m pytest -q tests/test_gpu_paths.py``.
"""
from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import pytest
import torch

from minimoe.model import MoEConfig, MoELayer
from minimoe.parallel import RouteTable, collectives_at_one_rank, combine, destroy_process_group, dispatch
from minimoe.parallel import init_process_group
from minimoe.parallel.comm import CountExchange, gathered
from minimoe.placement import Placement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


@pytest.fixture(scope="module")
def nccl():
    folder = tempfile.mkdtemp()
    device = init_process_group("nccl", 60, f"file://{folder}/rendezvous", 0, 1)
    yield device
    destroy_process_group()


def _layer(tokens=300, hidden=256):
    torch.manual_seed(0)
    layer = MoELayer(hidden, MoEConfig(num_experts=8, top_k=2, intermediate_size=512)).cuda().to(torch.bfloat16)
    layer.reset_parameters(std=0.05)
    return layer, torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)


def _captured(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _profiled_syncs(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in SYNCS)


def _syncs(fn) -> int:
    """Host syncs of one call of ``fn``: the profiler's count less what it counts around a call that does nothing
    (stopping the profiler synchronizes the device itself)."""
    return _profiled_syncs(fn) - _profiled_syncs(lambda: None)


@pytest.mark.parametrize("backend", ["grouped_mm_t", "grouped_mm", "auto"])
def test_grouped_backends_on_cuda_equal_the_loop(backend):
    layer, x = _layer()
    x = x.requires_grad_()
    layer.impl = "loop"
    want = layer(x)
    want_grad = torch.autograd.grad(want.float().square().sum(), [x, layer.gate_up_proj])
    layer.impl, layer.grouped_backend = "grouped", backend
    got = layer(x)
    got_grad = torch.autograd.grad(got.float().square().sum(), [x, layer.gate_up_proj])
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for a, b in zip(got_grad, want_grad):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def test_the_moe_layer_is_captured_in_a_cuda_graph_and_syncs_nowhere():
    layer, x = _layer(tokens=512)
    with torch.inference_mode():
        eager = layer(x)
        graph, out = _captured(lambda: layer(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager)
        assert _syncs(lambda: layer(x)) == 0


def test_the_count_exchange_reads_the_counts_once(nccl):
    counts = torch.tensor([3, 0, 5], device=nccl)
    with collectives_at_one_rank():
        send, recv = CountExchange(counts[:1]).wait()
    assert (send, recv) == ([3], [3])
    exchange = CountExchange(counts[:1])
    assert exchange.host.is_pinned() and exchange.wait() == ([3], [3])


def test_gathered_moves_blocks_of_every_dtype_in_one_coalesced_call(nccl):
    rows = torch.randn(5, 3, device=nccl, dtype=torch.bfloat16)
    weights = torch.rand(2, 5, device=nccl).T  # not contiguous
    slots = torch.arange(10, device=nccl).view(5, 2)
    empty = torch.empty(0, 4, device=nccl)
    with collectives_at_one_rank():
        outs = gathered([rows, weights, slots, empty])
    for out, block in zip(outs, (rows, weights, slots, empty)):
        assert out.dtype == block.dtype and out.shape == block.shape
        assert torch.equal(out, block)


def _case(device, tokens=128):
    table = RouteTable(Placement(np.arange(64)[None], 64, 1, 1), 0, device)
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.rand(tokens, 64, generator=generator, device=device).topk(8, dim=1).indices
    slots = table.route(ids, 0, torch.arange(tokens, device=device))
    weights = torch.full((tokens, 8), 1 / 8, device=device)
    x = torch.randn(tokens, 256, device=device, dtype=torch.bfloat16)
    return table, x, slots, weights


@pytest.mark.parametrize("fmt, syncs", [("replicate", 0), ("token_rank", 1), ("token_expert", 1),
                                        ("hierarchical", 1)])  # one node: leg B only
def test_host_syncs_per_dispatch_and_combine(nccl, fmt, syncs):
    table, x, slots, weights = _case(nccl)

    def step():
        with collectives_at_one_rank():
            sent = dispatch(x, slots, weights, table, fmt, static=fmt == "replicate")
            expert_out = sent.rows * (sent.weights * (sent.slots >= 0)).sum(1, keepdim=True).to(x.dtype)
            return combine(expert_out, sent.handle)

    torch.testing.assert_close(step(), x * weights.sum(1, keepdim=True).to(x.dtype), rtol=2e-2, atol=2e-2)
    assert _syncs(step) == syncs


def test_replicate_and_static_token_rank_are_captured_in_a_cuda_graph(nccl):
    table, x, slots, weights = _case(nccl)
    for fmt in ("replicate", "token_rank"):
        def step():
            with collectives_at_one_rank():
                sent = dispatch(x, slots, weights, table, fmt, static=True)
                return combine(sent.rows * sent.weights.sum(1, keepdim=True).to(x.dtype), sent.handle)

        eager = step()
        graph, out = _captured(step)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3, 11, 100), (300, 8, 900, 7168), (1, 1, 1, 1), (0, 2, 3, 64)])
def test_the_triton_bag_sum_equals_embedding_bag(dtype, shape):
    from minimoe.model.bag_sum_triton import bag_sum_triton

    pytest.importorskip("triton")
    num_rows, m, table_rows, columns = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(table_rows, columns, device="cuda", generator=g).to(dtype)
    index = torch.randint(0, table_rows, (num_rows, m), device="cuda", generator=g)
    weights = torch.rand(num_rows, m, device="cuda", generator=g)
    weights[weights < 0.3] = 0
    for w in (weights, weights > 0, None):
        want = torch.nn.functional.embedding_bag(index, table.float(), mode="sum",
                                                 per_sample_weights=None if w is None else w.float())
        got = bag_sum_triton(index, table, w)
        assert got.dtype == dtype and got.shape == (num_rows, columns)
        torch.testing.assert_close(got.float(), want, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_the_triton_bag_sum_reads_nothing_where_the_weight_is_zero():
    from minimoe.model.bag_sum_triton import bag_sum_triton

    pytest.importorskip("triton")
    table = torch.ones(4, 64, device="cuda")
    table[3] = float("nan")
    index = torch.tensor([[0, 3], [3, 1]], device="cuda")
    for layout in (table, table.T.contiguous().T):  # row-major, column-major
        out = bag_sum_triton(index, layout, torch.tensor([[2.0, 0.0], [0.0, 1.0]], device="cuda"))
        torch.testing.assert_close(out, torch.tensor([[2.0], [1.0]], device="cuda").expand(2, 64))


def test_the_triton_send_plan_equals_the_pytorch_ops():
    from minimoe.parallel.sendplan import Plan, _grid, plan
    from minimoe.parallel.sendplan_triton import plan_triton

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    for case in range(60):
        num_gpus, m, spg = 1 + case % 8, 1 + case % 9, 1 + case % 3
        pairs_of = (0, 1, 8)[case % 3]  # the units are the pairs of each row (token_expert): m = 1
        m = 1 if pairs_of else m
        units = [0, 1, 255, 256, 257, 700, 5000, 40000][case % 8] * max(1, pairs_of)
        rank = case % num_gpus
        dest = torch.randint(-1, num_gpus * spg, (units, m), device="cuda", generator=g)
        want = plan(_grid(dest.div(spg, rounding_mode="floor"), num_gpus), rank)
        counts, mask, position, send, extra = plan_triton(dest, spg, num_gpus, rank, pairs_of)
        got = Plan(counts, mask, position, send_list=send, one_bags=extra and extra[0], send_rows=extra and extra[1])
        n_self, n_total = int(want.counts[rank]), int(want.counts.sum())
        assert torch.equal(got.counts, want.counts) and torch.equal(got.mask, want.mask)
        assert torch.equal(got.position * got.mask, want.position * want.mask)
        assert torch.equal(got.send_units(n_self, n_total), want.send_units(n_self, n_total))
        if pairs_of:
            units_sent = want.send_units(n_self, n_total)
            assert all(torch.equal(a, b) for a, b in zip(got.bags(True), want.bags(True)))
            assert torch.equal(got.rows_of(units_sent, pairs_of), units_sent // pairs_of)
        else:
            assert extra is None


@pytest.mark.parametrize("backend", ["grouped_mm_t", "grouped_mm"])
@pytest.mark.parametrize("scales_input", [False, True])
def test_the_counted_layout_equals_the_sorted_one(backend, scales_input, monkeypatch):
    from minimoe.model import grouped, grouped_layout_triton

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    experts, hidden, width = 8, 128, 256
    gate_up = (0.05 * torch.randn(experts, hidden, 2 * width, device="cuda", generator=g)).bfloat16()
    down = (0.05 * torch.randn(experts, width, hidden, device="cuda", generator=g)).bfloat16()
    for tokens in (1, 37, 600):
        x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
        ids = torch.randint(0, experts + 1, (tokens, 2), device="cuda", generator=g)  # id E: no expert
        weights = torch.rand(tokens, 2, device="cuda", generator=g)
        assert grouped_layout_triton.usable(ids, experts)
        got = grouped.grouped_experts(x, ids, weights, gate_up, down, scales_input, backend)
        monkeypatch.setattr(grouped_layout_triton, "usable", lambda *args: False)
        want = grouped.grouped_experts(x, ids, weights, gate_up, down, scales_input, backend)
        monkeypatch.undo()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def _float_experts(x, ids, weights, gate_up, down):
    """The grouped experts in float32, one token at a time: the reference for the Triton kernels."""
    width = down.shape[1]
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up_t = x[t].float() @ gate_up[e].float()
            hidden = torch.nn.functional.silu(gate_up_t[:width]) * gate_up_t[width:]
            out[t] += weights[t, j] * (hidden @ down[e].float())
    return out


@pytest.mark.parametrize("tokens", [1, 37, 600])
def test_the_triton_experts_equal_float32_experts(tokens):
    """Row blocks past the first (every token picks expert 0: more rows than one program's block holds, so a
    program loops), empty experts, and sizes that are not multiples of the tiles (H 200, F 304)."""
    from minimoe.model import experts_triton, grouped

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(2)
    experts, hidden, width = 8, 200, 304
    gate_up = (0.1 * torch.randn(experts, hidden, 2 * width, device="cuda", generator=g)).bfloat16()
    down = (0.1 * torch.randn(experts, width, hidden, device="cuda", generator=g)).bfloat16()
    x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
    second = torch.randint(1, 5, (tokens,), device="cuda", generator=g)  # experts 5-7 stay empty
    ids = torch.stack([torch.zeros_like(second), second], 1)  # every token picks expert 0
    weights = torch.rand(tokens, 2, device="cuda", generator=g)
    assert experts_triton.usable(x, gate_up, down)
    with torch.no_grad():
        got = grouped.grouped_experts(x, ids, weights, gate_up, down, backend="triton", has_invalid=False)
        torch_path = grouped.grouped_experts(x, ids, weights, gate_up, down, backend="grouped_mm", has_invalid=False)
    want = _float_experts(x, ids, weights, gate_up, down)
    assert ((got.float() - want).norm() / want.norm()) < 1e-2
    assert ((torch_path.float() - want).norm() / want.norm()) < 1e-2  # the same precision as torch's products


def test_auto_takes_the_triton_experts_for_a_small_batch_without_a_gradient():
    from minimoe.model import grouped

    pytest.importorskip("triton")
    layer, x = _layer(tokens=512)
    weights = [layer.gate_up_proj, layer.down_proj]
    with torch.inference_mode():
        assert grouped.choose_backend("auto", x, weights, num_rows=512 * 2) == "triton"
        assert grouped.choose_backend("auto", x, weights, num_rows=8 * 257) != "triton"  # many rows per expert
    assert grouped.choose_backend("auto", x, weights, num_rows=512 * 2) != "triton"  # a gradient: torch's products
    with torch.inference_mode():  # float16: torch's grouped products cannot run, so neither is "triton" chosen
        half = [w.half() for w in weights]
        assert grouped.choose_backend("auto", x.half(), half, num_rows=512 * 2) == "per_group"


def test_an_explicit_triton_backend_where_it_cannot_run_is_a_clear_error():
    layer, x = _layer(tokens=64)
    layer.grouped_backend = "triton"
    with torch.inference_mode():
        wide = torch.cat([x, x], 1)[:, :x.shape[1]]  # rows that are not contiguous
        with pytest.raises(ValueError, match="the rows are not contiguous"):
            layer(wide)
        layer.float()
        with pytest.raises(ValueError, match="must all be bfloat16 or float16"):
            layer(x.float())


def test_the_triton_bag_sum_reads_a_column_major_table():
    from minimoe.model.bag_sum_triton import bag_sum_triton, usable

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(1)
    table = torch.randn(1088, 4096, device="cuda", generator=g).bfloat16()
    column_major = table.T.contiguous().T
    index = torch.randint(0, 1088, (512, 2), device="cuda", generator=g)
    weights = torch.rand(512, 2, device="cuda", generator=g)
    assert usable(index, column_major, weights)
    torch.testing.assert_close(bag_sum_triton(index, column_major, weights), bag_sum_triton(index, table, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_silu_mul_equals_pytorch(dtype):
    from minimoe.model.swiglu_triton import silu_mul

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(2)
    gate, up = (torch.randn(3, 1000, 77, device="cuda", generator=g).to(dtype) for _ in range(2))
    want = torch.nn.functional.silu(gate.float()) * up.float()
    torch.testing.assert_close(silu_mul(gate, up).float(), want, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("shape", [(1, 8, 2), (512, 8, 2), (300, 128, 8), (5, 1000, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_router_equals_softmax_topk(shape, dtype):
    from minimoe.model import router_triton
    from minimoe.model.router import softmax_topk

    pytest.importorskip("triton")
    tokens, experts, top_k = shape
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(tokens, experts, device="cuda", generator=g).to(dtype)
    for norm in (True, False):
        want = softmax_topk(logits, top_k, norm)
        assert router_triton.usable(logits, top_k)
        ids, weights, probs = router_triton.softmax_topk(logits, top_k, norm)
        torch.testing.assert_close(probs, want.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights, want.weights, rtol=1e-5, atol=1e-6)
        # equal (or within rounding equal) probabilities may be kept in another order: what is kept must agree
        torch.testing.assert_close(want.scores.gather(1, ids), want.scores.gather(1, want.expert_ids), rtol=1e-5,
                                   atol=1e-6)
        assert (ids.sort(1).values.diff(dim=1) > 0).all()  # k distinct experts
    ids, _, _ = router_triton.softmax_topk(torch.zeros(3, 8, device="cuda"), 2)
    assert ids.tolist() == [[0, 1]] * 3  # ties keep the lower id


def test_gather_rows_reads_a_zero_row_outside_the_table():
    from minimoe.model.bag_sum_triton import gather_rows

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(4)
    table = torch.randn(50, 4100, device="cuda", generator=g).bfloat16()
    index = torch.tensor([3, 50, -1, 0, 49, 77, 3], device="cuda")
    want = torch.cat([table, table.new_zeros(1, 4100)])[torch.where((index >= 0) & (index < 50), index, 50)]
    assert torch.equal(gather_rows(table, index), want)
    assert torch.equal(gather_rows(table.T.contiguous().T, index), want)


_EMPTY = torch.empty


def _poisoned_empty(*args, **kwargs):
    """``torch.empty`` whose int64 memory reads -7: a kernel that leaves a row unwritten shows."""
    out = _EMPTY(*args, **kwargs)
    return out.fill_(-7) if out.dtype == torch.int64 else out


def test_the_counted_layout_writes_every_row(monkeypatch):
    from minimoe.model.grouped_layout_triton import grouped_layout_triton

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(5)
    for tokens, experts, align in ((1, 8, 8), (600, 8, 8), (77, 60, 1), (3000, 16, 8)):
        ids = torch.randint(0, experts + 1, (tokens, 2), device="cuda", generator=g)
        size = tokens * 2 + (align - 1) * experts
        size += -size % align
        monkeypatch.setattr(torch, "empty", _poisoned_empty)
        place, ends, source = grouped_layout_triton(ids, experts, tokens, align, size)
        monkeypatch.undo()
        assert (source >= 0).all() and (source <= tokens).all() and (place >= 0).all()
        flat = ids.reshape(-1)
        valid = flat < experts
        assert torch.equal(source[place[valid]], torch.arange(tokens * 2, device="cuda")[valid] // 2)
        assert (source[place[~valid]] == tokens).all()
        assert int((source < tokens).sum()) == int(valid.sum())  # every other row reads the zero row
        assert torch.equal(ends.long(), ((torch.bincount(flat, minlength=experts + 1)[:experts]
                                          + torch.nn.functional.one_hot(torch.tensor(experts - 1), experts).cuda()
                                          * int((~valid).sum()) + align - 1) // align * align).cumsum(0))


def test_the_fused_router_layout_equals_the_router_then_the_layout(monkeypatch):
    from minimoe.model import route_layout_triton, router_triton
    from minimoe.model.grouped_layout_triton import grouped_layout_triton

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(6)
    for tokens, experts, top_k, align, norm in ((1, 8, 2, 8, True), (512, 8, 2, 8, True), (1024, 8, 2, 8, False),
                                                (33, 60, 6, 8, True), (64, 128, 8, 1, True), (5, 2, 2, 8, True)):
        logits = torch.randn(tokens, experts, device="cuda", generator=g).bfloat16()
        logits[:, 1] = logits[:, 0]  # ties: the lower id is kept first
        size = tokens * top_k + (align - 1) * experts
        size += -size % align
        assert route_layout_triton.usable(logits, top_k)
        monkeypatch.setattr(torch, "empty", _poisoned_empty)
        got = route_layout_triton.softmax_topk_layout(logits, top_k, norm, align, size)
        monkeypatch.undo()
        ids, weights, probs = router_triton.softmax_topk(logits, top_k, norm)
        torch.testing.assert_close(got[2], probs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[1], weights, rtol=1e-6, atol=1e-7)
        assert torch.equal(got[0], ids)  # the same argmax rounds on the same probabilities: lowest id on ties
        want = grouped_layout_triton(got[0], experts, tokens, align, size)  # the layout of the ids it chose
        for name, a, b in zip(("place", "group_ends", "source"), got[3:], want):
            assert torch.equal(a, b), name
    assert not route_layout_triton.usable(torch.zeros(2048, 8, device="cuda"), 2)  # past one program: no


def test_the_moe_layer_without_a_gradient_equals_the_loop():
    layer, x = _layer(tokens=512)
    with torch.inference_mode():
        got = layer(x)  # the Triton router and layout (one kernel), gather, silu·mul and sum
        routing = layer.last_routing
        assert routing.layout is not None
        layer.impl = "loop"
        want = layer(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(routing.weights.sum(1), torch.ones(512, device="cuda"))

    def replaced(module, args, routing):  # an ablation: other experts than the router chose
        return dataclasses.replace(routing, expert_ids=routing.expert_ids.roll(1, dims=0))

    def edited(module, args, routing):  # the same, in place (seen outside inference mode)
        routing.expert_ids.copy_(routing.expert_ids.roll(1, dims=0))

    x = x[:64]
    for hook, mode in ((replaced, torch.inference_mode), (edited, torch.no_grad)):
        handle = layer.router.register_forward_hook(hook)
        with mode():
            layer.impl = "grouped"
            got = layer(x)  # the router's layout no longer describes the ids: the layer lays them out again
            layer.impl = "loop"
            want = layer(x)
        handle.remove()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    with torch.inference_mode():  # past one program of the fused kernel: the router, then the layout
        layer.impl = "grouped"
        x = torch.randn(3000, x.shape[1], device="cuda", dtype=x.dtype)
        got = layer(x)
        assert layer.last_routing.layout is None
        layer.impl = "loop"
        torch.testing.assert_close(got.float(), layer(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_pack_equals_three_index_selects(dtype):
    from minimoe.parallel.legs import _layout
    from minimoe.parallel.pack_triton import pack, usable

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(6)
    for units_total, num_rows, m, hidden, count in ((10, 10, 2, 37, 15), (64, 8, 1, 7168, 64), (300, 100, 8, 2050, 0)):
        x = torch.randn(num_rows, hidden, device="cuda", generator=g).to(dtype)
        slots = torch.randint(-1, 50, (units_total, m), device="cuda", generator=g)
        weights = torch.rand(units_total, m, device="cuda", generator=g)
        units = torch.randint(0, units_total, (count,), device="cuda", generator=g)
        rows = torch.randint(0, num_rows, (count,), device="cuda", generator=g)
        widths = _layout(m, hidden, x.element_size())
        buffer = x.new_full((count + 3, sum(widths)), 7)
        slot_part, weight_part, row_part, _ = buffer.split(widths, 1)
        slot_part, weight_part = slot_part.view(torch.int64), weight_part.view(torch.float32)[:, :m]
        assert usable(x, slots, weights)
        pack(units, rows, slots, weights, x, slot_part, weight_part, row_part)
        assert torch.equal(slot_part[:count], slots[units]) and torch.equal(weight_part[:count], weights[units])
        assert torch.equal(row_part[:count], x[rows]) and (row_part[count:] == 7).all()


def test_the_fast_triton_launch_picks_the_kernel_triton_picks_and_computes_the_same():
    """``triton_launch.launch`` keys its own cache: for every mix of aligned and misaligned tensors and of integers
    Triton specialises differently (1, a multiple of 16, other, wider than 32 bits), the compiled kernel it runs is
    the one Triton's ``warmup`` returns, and the output equals ``kernel[grid](...)``'s."""
    pytest.importorskip("triton")
    from minimoe.model import bag_sum_triton
    from minimoe.model import triton_launch
    from minimoe.model.triton_launch import compiled_for, launch

    kernel = bag_sum_triton._kernel()
    g = torch.Generator(device="cuda").manual_seed(8)
    base = torch.randn(70, 48, device="cuda", generator=g)
    for offset, columns in ((0, 32), (1, 17), (0, 1), (3, 16)):  # offset 1: the table starts 4 bytes past 16
        table = base.view(-1)[offset:offset + 64 * columns].view(64, columns)
        index = torch.randint(0, 64, (5, 3), device="cuda", generator=g)
        weights = torch.rand(5, 3, device="cuda", generator=g)
        for num_table_rows in (64, 1, 1 << 40):
            outs = []
            for fast in (True, False):
                out = torch.full((5, columns), float("nan"), device="cuda")
                args = (index, weights, table, out, 3, columns, table.stride(0), table.stride(1), out.stride(0),
                        num_table_rows)
                constexprs = dict(HAS_WEIGHTS=True, ZERO_OUTSIDE=False, BLOCK=32)
                if fast:
                    launch(kernel, (5, -(-columns // 32)), *args, **constexprs)
                    picked = compiled_for(kernel, *args, **constexprs)
                    if triton_launch._FAST:  # else this Triton release launches through kernel[grid]
                        assert picked is kernel.warmup(*args, grid=(5, 1), **constexprs)
                else:
                    kernel[(5, -(-columns // 32))](*args, **constexprs)
                outs.append(out)
            assert torch.equal(outs[0], outs[1]) and not outs[0].isnan().any()
    if triton_launch._FAST:  # with a launch hook set (a profiler), a launch goes through kernel[grid], which calls it
        from triton import knobs

        seen = []
        knobs.runtime.launch_enter_hook.add(seen.append)
        try:
            launch(kernel, (5, 1), *args, **constexprs)
        finally:
            knobs.runtime.launch_enter_hook.remove(seen.append)
        assert len(seen) == 1
    # a Parameter is keyed by its dtype and address, not as an object: after .data changes dtype, the kernel
    # compiled for the new dtype runs
    table = torch.nn.Parameter(base[:64, :32].clone(), requires_grad=False)
    index, weights = torch.randint(0, 64, (5, 3), device="cuda", generator=g), torch.rand(5, 3, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        table.data = table.data.to(dtype)
        out = torch.empty(5, 32, device="cuda", dtype=dtype)
        args = (index, weights, table, out, 3, 32, table.stride(0), table.stride(1), out.stride(0), 64)
        launch(kernel, (5, 1), *args, HAS_WEIGHTS=True, ZERO_OUTSIDE=False, BLOCK=32)
        want = (weights[:, :, None] * table.detach().float()[index]).sum(1)
        torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
