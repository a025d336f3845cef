"""MoE layer forward: minimoe's MoELayer against transformers' MixtralSparseMoeBlock.

Both run the same weights on the same inputs (our layer is converted from the transformers
block with ``minimoe.hf.moe_blocks``). Work counted: 6·T·k·H·F FLOPs (three H×F matmuls per (token,
expert) pair); the router and the permutations are not counted. The matmul ceiling is a
measured dense matmul in the layer's dtype (bf16 8192³ on CUDA; on CPU the layer's dtype at
2048³). transformers is timed with its two expert implementations: "eager" (a loop over
experts; what a block built from a config runs) and "grouped_mm" (what a model loaded with
``from_pretrained`` picks in transformers 5 when torch supports it).

    PYTHONPATH=. python benchmarks/bench_moe.py --device cpu                 # small fp32 shapes
    PYTHONPATH=. python benchmarks/bench_moe.py --device cuda --ablations    # Mixtral-8x7B shapes, bf16
    PYTHONPATH=. python benchmarks/bench_moe.py --device cuda --before-after --out $OUT/moe_before_after

``--before-after``: the layer as it is ("after") and as it was before the capturable small-batch rewrite
("before", ``benchmarks/moe_before.py``: per-expert matmuls after a host read of the offsets at few rows per
expert), each eager and captured in a CUDA graph, next to transformers' grouped_mm implementation (eager and
captured), in the same run on the same weights; with the weight-streaming floor (the routed experts' bytes
at the measured device copy rate) and the host syncs counted in a profile of one call.

Timing: warm-up calls first, then the median of ``--reps`` calls, each bracketed by CUDA events
(CPU: perf_counter), the variants taking turns call by call; inputs rotate among three
random sets. Results go to stdout and, with
``--out PREFIX``, to PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from minimoe.hf.moe_blocks import moe_from_hf_block, transformers_dropped_group_value
from minimoe.model.moe import MoEConfig, MoELayer, choose_backend


def one_call_ms(fn, x, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn, inputs, reps: int, warmup: int, device: str) -> float:
    return interleaved_median_ms({"fn": fn}, inputs, reps, warmup, device)["fn"]


def interleaved_median_ms(fns: dict, inputs, reps: int, warmup: int, device: str) -> dict:
    """Median time of each function, taking turns call by call (so load from elsewhere hits all alike)."""
    for i in range(warmup):
        for fn in fns.values():
            fn(inputs[i % len(inputs)])
    times = {name: [] for name in fns}
    for i in range(reps):
        for name, fn in fns.items():
            times[name].append(one_call_ms(fn, inputs[i % len(inputs)], device))
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_tflops(device: str, dtype: torch.dtype, n: int, reps: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    ms = median_ms(lambda x: x @ b, [a], reps, 3, device)
    return 2 * n**3 / ms / 1e9


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default: 512 4096 16384 (cuda), 64 256 1024 (cpu)")
    p.add_argument("--hidden", type=int, default=None, help="default 4096 (cuda), 512 (cpu)")
    p.add_argument("--ffn", type=int, default=None, help="default 14336 (cuda), 1024 (cpu)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="default 30 (cuda), 10 (cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--ablations", action="store_true", help="also time variants of our layer")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one call of ours")
    p.add_argument("--check", action="store_true", help="first check the fast path on this device (values, grads)")
    p.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    p.add_argument("--before-after", action="store_true",
                   help="only the before/after table: eager and CUDA-graph captured, vs transformers' grouped_mm")
    args = p.parse_args(argv)
    if args.before_after:
        rows, meta = before_after(args.device, args.tokens, args.reps, args.hidden, args.ffn, args.experts, args.top_k)
        write(format_before_after(rows, meta), meta, rows, args.out)
        return 0
    if args.check:
        print("\n".join(device_checks(args.device)), flush=True)
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tokens_list = args.tokens or ([512, 4096, 16384] if cuda else [64, 256, 1024])
    hidden, ffn = args.hidden or (4096 if cuda else 512), args.ffn or (14336 if cuda else 1024)
    reps = args.reps or (30 if cuda else 10)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k)  # fmt: skip
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)  # transformers' Mixtral initializer_range
    block = block.to(device=args.device, dtype=dtype).eval()
    ours = moe_from_hf_block(block, "mixtral").eval()
    variants = {
        "ours": lambda x: ours(x),
        "hf eager": lambda x: _hf_call(block, config, "eager", x),
        "hf grouped_mm": lambda x: _hf_call(block, config, "grouped_mm", x),
    }
    if args.ablations:
        variants["ours, B column-major"] = _ours_variant(ours, block, column_major=True)
        variants["ours, always grouped_mm"] = _ours_variant(ours, block, backend="grouped_mm")
        variants["ours, always per-expert mm"] = _ours_variant(ours, block, backend="per_group")
        variants["ours, loop path"] = _ours_variant(ours, block, impl="loop")
        fused = FusedGateUpLayer(hidden, ours.config).to(device=args.device, dtype=dtype).eval()
        fused.load_state_dict(ours.state_dict())
        variants["ours, one gate_up product + bmm combine"] = lambda x: fused(x)

    matmul_n = 8192 if cuda else 2048
    with torch.inference_mode():
        ceiling = matmul_tflops(args.device, dtype, matmul_n, 10 if cuda else 3)
        rows = []
        for num_tokens in tokens_list:
            gen = torch.Generator(device=args.device).manual_seed(num_tokens)
            inputs = [torch.randn(1, num_tokens, hidden, device=args.device, dtype=dtype, generator=gen) for _ in range(3)]
            reference = block.float()(inputs[0].float()) if num_tokens <= 16384 else None  # fp32 eager reference
            block.to(dtype)
            row = {"tokens": num_tokens}
            for name, fn in variants.items():
                out = fn(inputs[0])
                row[f"err {name}"] = None if reference is None else relative_error(out, reference)
            for name, ms in interleaved_median_ms(variants, inputs, reps, 5, args.device).items():
                row[f"ms {name}"] = ms
            if args.ablations and cuda:
                row["ms launch ours (CPU side)"] = launch_ms(lambda: ours(inputs[0]), reps)
                row["ms ours as CUDA graph"] = graph_replay_ms(ours, inputs[0], reps)
            flops = 6 * num_tokens * args.top_k * hidden * ffn
            row["tflops ours"] = flops / row["ms ours"] / 1e9
            rows.append(row)
            del reference
            if args.profile and cuda:
                print(f"-- profile of ours at {num_tokens} tokens", flush=True)
                print(profile_table(lambda: ours(inputs[0])), flush=True)
        ceiling = max(ceiling, matmul_tflops(args.device, dtype, matmul_n, 10 if cuda else 3))  # again, after
    for row in rows:
        row["pct of matmul"] = 100 * row["tflops ours"] / ceiling

    meta = {
        "command": "python " + " ".join(sys.argv if argv is None else ["benchmarks/bench_moe.py", *argv]),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "threads": None if cuda else args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
        "hidden": hidden, "ffn": ffn, "experts": args.experts, "top_k": args.top_k, "reps": reps,
        "matmul": f"{matmul_n}^3 {dtype}", "matmul_tflops": ceiling,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }  # fmt: skip
    write(format_table(rows, list(variants), meta), meta, rows, args.out)
    return 0


def write(table: str, meta: dict, rows: list[dict], out: str | None) -> None:
    """Print the table; with ``--out PREFIX`` also write PREFIX.json (meta and rows) and PREFIX.md (the table)."""
    print(table)
    if out:
        with open(out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(table + "\n")


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def count_host_syncs(fn, calls: int = 3) -> float:
    """Host syncs per call of fn in a torch.profiler trace: CUDA runtime calls that block the host
    (cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize, synchronous cudaMemcpy)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
    found = sum(e.count for e in prof.key_averages() if e.key in SYNC_EVENTS)
    torch.cuda.synchronize()
    return found / calls


def copy_tbps(device: str, gib: float = 1.0) -> float:
    """Device copy rate, bytes read + written per second (TB/s), median of 10 copies."""
    a = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    ms = median_ms(lambda _: b.copy_(a), [a], 10, 3, device)
    return 2 * a.numel() * 2 / ms / 1e9


def before_after(device: str, tokens_list=None, reps=None, hidden=None, ffn=None, experts=8, top_k=2):
    """The layer after / before the rewrite and transformers' grouped_mm, eager and captured (see --before-after).
    Returns (rows, meta)."""
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_before import BeforeMoELayer

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens_list = tokens_list or ([512, 4096, 16384] if cuda else [32, 64])
    hidden, ffn = hidden or (4096 if cuda else 64), ffn or (14336 if cuda else 128)
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    with torch.device(device):
        block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)
    block = block.to(dtype).eval()
    after = moe_from_hf_block(block, "mixtral").eval()
    before = BeforeMoELayer.of(after)
    weight_bytes = (after.gate_up_proj.numel() + after.down_proj.numel()) * after.gate_up_proj.element_size()
    bandwidth = copy_tbps(device) if cuda else float("nan")
    variants = {"after": lambda x: after(x), "before": lambda x: before(x),
                "hf grouped_mm": lambda x: _hf_call(block, config, "grouped_mm", x)}
    if cuda:  # the after layer with one choice pinned: which backend "auto" should pick, measured
        def pinned(backend):
            def run(x):
                after.grouped_backend = backend
                try:
                    return after(x)
                finally:
                    after.grouped_backend = "auto"
            return run

        variants.update({"after, grouped_mm": pinned("grouped_mm"), "after, grouped_mm_t": pinned("grouped_mm_t"),
                         "after, triton": pinned("triton"), "after, per-expert mm (syncs)": pinned("per_group")})
    rows = []
    with torch.inference_mode():
        for num_tokens in tokens_list:
            reps_here = reps or (30 if num_tokens <= 4096 else 10)
            gen = torch.Generator(device=device).manual_seed(num_tokens)
            inputs = [torch.randn(1, num_tokens, hidden, device=device, dtype=dtype, generator=gen) for _ in range(3)]
            want = variants["hf grouped_mm"](inputs[0]).float()
            row = {"tokens": num_tokens}
            for name, fn in variants.items():
                row[f"rel err {name} vs hf grouped_mm"] = ((fn(inputs[0]).float() - want).norm() / want.norm()).item()
            for name, ms in interleaved_median_ms(variants, inputs, reps_here, 3, device).items():
                row[f"eager ms {name}"] = ms
            if cuda:
                for name, fn in variants.items():
                    row[f"graph ms {name}"] = graph_replay_ms(fn, inputs[0], reps_here)
                row["host enqueue ms after"] = launch_ms(lambda: after(inputs[0]), reps_here)
                row["host syncs per call after"] = count_host_syncs(lambda: after(inputs[0]))
                row["host syncs per call before"] = count_host_syncs(lambda: before(inputs[0]))
            row["floor ms"] = weight_bytes / (bandwidth * 1e12) * 1e3 if cuda else float("nan")
            rows.append(row)
    meta = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                torch=torch.__version__, transformers=transformers.__version__, dtype=str(dtype), hidden=hidden,
                ffn=ffn, experts=experts, top_k=top_k, weight_bytes=weight_bytes, copy_TBps=bandwidth,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return rows, meta


def format_before_after(rows, meta) -> str:
    lines = [f"MoE layer before/after, {meta['device']}, {meta['dtype']}, torch {meta['torch']}, transformers "
             f"{meta['transformers']}; H={meta['hidden']} F={meta['ffn']} E={meta['experts']} k={meta['top_k']}; "
             f"routed weights {meta['weight_bytes'] / 1e9:.2f} GB, device copy {meta['copy_TBps']:.2f} TB/s "
             f"(read + write); floor = weights / copy rate",
             "", "| tokens | eager after | eager before | eager hf grouped_mm | hf / after (eager) | graph after "
             "| graph before | graph hf grouped_mm | floor | after % of floor (graph) | host syncs after / before |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        graph = [r.get(f"graph ms {n}", float("nan")) for n in ("after", "before", "hf grouped_mm")]
        lines.append(f"| {r['tokens']} | {r['eager ms after']:.3f} | {r['eager ms before']:.3f} | "
                     f"{r['eager ms hf grouped_mm']:.3f} | {r['eager ms hf grouped_mm'] / r['eager ms after']:.2f}x | "
                     + " | ".join(f"{g:.3f}" for g in graph)
                     + f" | {r['floor ms']:.3f} | {100 * r['floor ms'] / graph[0]:.0f}% | "
                     f"{r.get('host syncs per call after', float('nan')):g} / "
                     f"{r.get('host syncs per call before', float('nan')):g} |")
    lines.append("\n(ms, median; nan = capture failed; 'before' reads the offsets on the host at few rows per expert)")
    pinned = [k[len("eager ms "):] for k in rows[0] if k.startswith("eager ms after, ")]
    if pinned:
        lines += ["", "The after layer with its grouped-product backend pinned (without a gradient auto picks triton on CUDA "
                  "at <= 256 rows per expert, grouped_mm above):", "",
                  "| tokens | " + " | ".join(f"{p} eager / graph" for p in pinned) + " |", "|---:|" + "---:|" * len(pinned)]
        for r in rows:
            lines.append(f"| {r['tokens']} | " + " | ".join(f"{r[f'eager ms {p}']:.3f} / "
                                                           f"{r.get(f'graph ms {p}', float('nan')):.3f}"
                                                           for p in pinned) + " |")
    return "\n".join(lines)


def launch_ms(fn, reps: int) -> float:
    """CPU time to enqueue one call (the GPU idle at the start), median."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def graph_replay_ms(layer, x, reps: int) -> float:
    """The same forward captured once as a CUDA graph and replayed: no CPU launch overhead."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            layer(static_x)
    except Exception as err:  # noqa: BLE001 - reported in the table as NaN
        print(f"CUDA graph capture failed: {str(err).splitlines()[0]}", flush=True)
        return float("nan")
    return median_ms(lambda _: graph.replay(), [static_x], reps, 3, "cuda")


class FusedGateUpLayer(MoELayer):
    """Ablation: run 1's grouped path (one (S, 2F) gate_up product, index_copy + bmm combine)."""

    def _layout_request(self, tokens):
        return None  # the router did not lay out the rows in run 1

    def _experts_grouped(self, x, routing, kept):
        (T, H), k, E, Fe = x.shape, routing.top_k, self.config.num_experts, self.config.intermediate_size
        sorted_ids, order = torch.sort(routing.expert_ids.reshape(-1), stable=True)
        group_ends = torch.searchsorted(sorted_ids, torch.arange(1, E + 1, device=x.device)).to(torch.int32)
        rows = x.index_select(0, order // k)
        gate_up = torch._grouped_mm(rows, self.gate_up_proj, offs=group_ends)
        expert_out = torch._grouped_mm(F.silu(gate_up[:, :Fe]) * gate_up[:, Fe:], self.down_proj, offs=group_ends)
        pair_out = torch.empty_like(expert_out).index_copy_(0, order, expert_out).view(T, k, H)
        return torch.bmm(routing.weights.to(x.dtype).unsqueeze(1), pair_out).squeeze(1)


def device_checks(device: str) -> list[str]:
    """torch._grouped_mm support here, and loop == grouped (values and gradients) on this device."""
    lines = [f"transformers {transformers.__version__}: DeepSeek-V3 dropped groups = {transformers_dropped_group_value()}"]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 32, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(4, 32, 48, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([16, 16, 40, 64], device=device, dtype=torch.int32)
        try:
            y = torch._grouped_mm(x, w, offs=offs)
            want = torch.cat([x[:16] @ w[0], x[16:40] @ w[2], x[40:] @ w[3]])
            gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
            wx, ww = torch.autograd.grad(want, (x, w), torch.ones_like(y))
            errs = [relative_error(a, b) for a, b in ((y, want), (gx, wx), (gw, ww))]
            lines.append(f"torch._grouped_mm {dtype} on {device}: runs; rel. err out/dx/dw {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e}")
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            lines.append(f"torch._grouped_mm {dtype} on {device}: fails: {str(err).splitlines()[0]}")
    for dtype, backend in ((torch.float32, "auto"), (torch.bfloat16, "grouped_mm"), (torch.bfloat16, "per_group")):
        for router, capacity_factor in (("softmax", 0.0), ("softmax", 0.8), ("deepseek_v3", 0.0), ("llama4", 1.0)):
            groups = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5) if router == "deepseek_v3" else {}
            config = MoEConfig(num_experts=16, top_k=1 if router == "llama4" else 4, intermediate_size=96, router=router,
                               num_shared_experts=1, capacity_factor=capacity_factor, aux_loss_coef=0.01, **groups)
            torch.manual_seed(0)
            layer = MoELayer(128, config).to(device=device, dtype=dtype)
            layer.reset_parameters(std=0.1)
            layer.grouped_backend = backend
            x = torch.randn(300, 128, device=device, dtype=dtype)
            results = []
            for impl in ("loop", "grouped"):
                layer.impl = impl
                xi = x.clone().requires_grad_(True)
                out = layer(xi)
                grads = torch.autograd.grad((out.float() ** 2).sum() + layer.aux_loss, [xi, *layer.parameters()])
                results.append((out, grads, layer.dropped_tokens))
            (out_l, grads_l, drop_l), (out_g, grads_g, drop_g) = results
            worst = max(relative_error(a, b) for a, b in zip(grads_g, grads_l))
            used = choose_backend(backend, x, [layer.down_proj])
            lines.append(f"loop vs grouped ({used}) {dtype} {router} capacity {capacity_factor}: "
                         f"out {relative_error(out_g, out_l):.1e}, worst grad {worst:.1e}, dropped {drop_l}/{drop_g}")
    return lines


def profile_table(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)


def _hf_call(block, config, implementation, x):
    config._experts_implementation = implementation
    return block(x)


def _ours_variant(ours, block, column_major=False, backend="auto", impl="grouped"):
    """A copy of our layer with one knob changed (the same weights)."""
    variant = moe_from_hf_block(block, "mixtral").eval()
    variant.grouped_backend, variant.impl = backend, impl
    if column_major:  # the same values, stored like transformers' [E, 2F, H] / [E, H, F]
        with torch.no_grad():
            variant.gate_up_proj.data = ours.gate_up_proj.detach().transpose(1, 2).contiguous().transpose(1, 2)
            variant.down_proj.data = ours.down_proj.detach().transpose(1, 2).contiguous().transpose(1, 2)
    return lambda x: variant(x)


def format_table(rows, names, meta) -> str:
    lines = [
        f"MoE forward, {meta['device']}, {meta['dtype']}, torch {meta['torch']}, transformers {meta['transformers']}",
        f"H={meta['hidden']} F={meta['ffn']} E={meta['experts']} k={meta['top_k']}; matmul ceiling "
        f"{meta['matmul']}: {meta['matmul_tflops']:.3g} TFLOP/s; median of {meta['reps']} calls; {meta['date']}",
        f"command: {meta['command']}",
        "",
        "| tokens | ms ours | ms transformers (eager) | ratio | ms transformers (grouped_mm) | ratio "
        "| TFLOP/s ours | % of matmul | rel. err ours / hf eager vs fp32 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        errs = "n/a" if r["err ours"] is None else f"{r['err ours']:.1e} / {r['err hf eager']:.1e}"
        lines.append(
            f"| {r['tokens']} | {r['ms ours']:.3f} | {r['ms hf eager']:.3f} | {r['ms hf eager'] / r['ms ours']:.2f}x "
            f"| {r['ms hf grouped_mm']:.3f} | {r['ms hf grouped_mm'] / r['ms ours']:.2f}x | {r['tflops ours']:.3g} "
            f"| {r['pct of matmul']:.0f}% | {errs} |"
        )
    main_columns = {"ms ours", "ms hf eager", "ms hf grouped_mm"}
    extra = [key for key in rows[0] if key.startswith("ms ") and key not in main_columns]
    if extra:
        lines += ["", "| tokens | " + " | ".join(extra) + " |", "|---:|" + "---:|" * len(extra)]
        for r in rows:
            lines.append(f"| {r['tokens']} | " + " | ".join(f"{r[key]:.3f}" for key in extra) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
