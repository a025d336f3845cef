"""Expert-parallel dispatch + combine on the GPUs of one host (or gloo CPUs), in one torchrun launch.

    torchrun --nproc_per_node=2 benchmarks/bench_ep.py --out benchmarks/results/ep_h200x2    (any N: 2, 4, 8)
    torchrun --nproc_per_node=4 benchmarks/bench_ep.py --quick --out /tmp/ep                   (gloo smoke run)

1. correctness: a random MoE layer (fp32; capacity off and on; shared expert) expert-parallel against the
   single-process layer, outputs and gradients, every wire format; the bundled model's logits.
2. sweep: uniform top-8 routing over 256 experts, hidden 7168, bf16, contiguous placement; tokens per rank
   chosen so that each rank dispatches 1 MiB ... 1 GiB of rows. Every variant is timed eager and, where its
   shapes are fixed, captured in a CUDA graph; the baseline is the raw collectives moving the same rows
   with ready buffers, also eager and captured: one ``all_to_all_single`` per leg and its reverse (two calls;
   the hierarchical format's own four), all-gather + reduce-scatter for replicate. "before" rows are the
   frozen code of before the sync-free rewrite (``ep_before.py``), at 1, 64 and 1024 MiB.
3. the decode shape (128 tokens per rank) and DeepEP's shape (4096 tokens per rank), every variant, before
   and after.
4. trace replay of the bundled model's trace (benchmarks/results/ep_bundled_trace.npz) per placement method:
   measured bytes (== minimoe.placement.measure) and time, hidden 7168 bf16.
5. profiles: torch.profiler tables of 5 calls per variant, and the host syncs per call.
Times: median over iterations of the slowest rank, each iteration between a barrier and a device sync.
"Nodes": ``--gpus-per-node`` (default: half the ranks when there are 4 or more, else 1 per node).
Column legend: see ``ep_cases.py`` (MiB/rank counts every dispatched row, rows kept local included; GB/s
counts only bytes sent to other ranks, dispatch + combine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ep_cases import HIDDEN, Case, contiguous, sync, time_eager, time_graph  # noqa: E402

from minimoe.parallel import WIRE_FORMATS, destroy_process_group, init_process_group  # noqa: E402
from minimoe.parallel import demo, demo_runs, demo_setup  # noqa: E402
from minimoe.placement import Placement  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# (format, code, static): what runs; the variants with fixed shapes are also captured in a CUDA graph
AFTER = [("token_expert", "after", False), ("token_rank", "after", False), ("hierarchical", "after", False),
         ("replicate", "after", False), ("token_rank", "after", True)]
BEFORE = [("token_expert", "before", False), ("token_rank", "before", False), ("hierarchical", "before", False),
          ("token_rank", "before", True)]


def variant_name(fmt, static) -> str:
    return fmt + (" static" if static else "")


def capturable(fmt, code, static) -> bool:
    return fmt == "replicate" or static


def measure_variant(tokens, fmt, code, static, placement, rank, world, device, iters, graph=True) -> dict:
    """Ours (dispatch alone and dispatch + combine) against the raw collectives with the same sizes."""
    case = Case(tokens, fmt, placement, rank, world, device, code, static)
    ours, only, raw = (time_eager(f, device, iters) for f in (case.ours, case.dispatch_only, case.raw))
    row = dict(format=variant_name(fmt, static), code=code, tokens_per_rank=tokens,
               dispatch_MiB_per_rank=case.sent_bytes / 2**20, dispatch_us=only["total_us"],
               combine_us=ours["total_us"] - only["total_us"], ours_us=ours["total_us"], host_us=ours["host_us"],
               raw_us=raw["total_us"], fraction_of_raw=raw["total_us"] / ours["total_us"],
               ours_GBps=case.remote_bytes / ours["total_us"] / 1e3, raw_GBps=case.remote_bytes / raw["total_us"] / 1e3)
    if graph and device.type == "cuda":
        row["raw_graph_us"] = time_graph(case.raw, device, iters).get("total_us", float("nan"))
        if capturable(fmt, code, static):
            captured = time_graph(case.ours, device, iters)
            row["ours_graph_us"] = captured.get("total_us", float("nan"))
            row["graph_fraction_of_raw"] = row["raw_graph_us"] / row["ours_graph_us"]
            if "error" in captured:
                row["graph_error"] = captured["error"]
    return row


def rows_per_token(fmt, placement, rank, world, device) -> float:
    probe = Case(2048, fmt, placement, rank, world, device)
    return probe.sent_bytes / (2048 * HIDDEN * 2)


def sweep(args, placement, rank, world, device) -> list[dict]:
    sizes = [1 << 20 << i for i in range(0, 11)]  # 1 MiB ... 1 GiB dispatched per rank
    if args.quick:
        sizes = sizes[:5:2]
    rows = []
    for fmt, code, static in AFTER + BEFORE:
        per_token = world if static else rows_per_token(fmt, placement, rank, world, device)
        for size in sizes:
            if code == "before" and size not in (sizes[0], 64 << 20, 1 << 30):
                continue
            tokens = max(1, round(size / (per_token * HIDDEN * 2)))
            iters = 3 if args.quick else 5 if size >= 256 << 20 else 20
            row = measure_variant(tokens, fmt, code, static, placement, rank, world, device, iters,
                                  graph=size <= 256 << 20)
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    return rows


def shapes(args, placement, rank, world, device) -> list[dict]:
    rows = []
    for tokens in ((16, 64) if args.quick else (128, 4096)):
        for fmt, code, static in AFTER + BEFORE:
            iters = 3 if args.quick else 50 if tokens == 128 else 20
            row = measure_variant(tokens, fmt, code, static, placement, rank, world, device, iters)
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    return rows


def profiles(args, placement, rank, world, device) -> dict:
    """torch.profiler tables of 5 dispatch + combine calls per variant (rank 0's view) and host syncs per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables, syncs = {}, []
    for tokens in ((16,) if args.quick else (128, 4096)):
        for fmt, code, static in AFTER + BEFORE:
            case = Case(tokens, fmt, placement, rank, world, device, code, static)
            for _ in range(3):
                case.ours()
            sync(device)
            dist.barrier()
            with profile(activities=activities) as prof:
                for _ in range(5):
                    case.ours()
                sync(device)
            name = f"{variant_name(fmt, static)} ({code}), {tokens} tokens"
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            averages = prof.key_averages()
            tables[name] = averages.table(sort_by=key, row_limit=14, max_name_column_width=60)
            syncs.append(dict(variant=name, host_syncs_per_call=sum(e.count for e in averages
                                                                    if e.key in SYNC_EVENTS) / 5))
    if rank == 0:
        Path(args.out + "_profiles.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in tables.items()))
    return {"written": args.out + "_profiles.txt", "host_syncs": syncs}


def correctness(args, rank, world, device, gpus_per_node) -> list[dict]:
    common = ["--gpus-per-node", str(gpus_per_node), "--iters", "1"]
    results = []
    for extra in (["--experts", "32", "--top-k", "8", "--hidden", "256", "--tokens-per-rank", "256",
                   "--shared-experts", "1", "--replicas", str(32 + 2 * world), "--placement", "eplb"],
                  ["--experts", "16", "--top-k", "2", "--hidden", "128", "--capacity-factor", "1.0",
                   "--tokens-per-rank", "64"]):
        parsed = demo.build_parser().parse_args(common + extra)
        for row in demo_runs.run_layer(parsed, world, rank, device, torch.float32):
            results.append(dict(check="random layer " + " ".join(extra), wire_format=row["wire_format"],
                                max_abs_error=row["max_abs_error"], bytes_match=row["bytes_match"]))
    parsed = demo.build_parser().parse_args(common + ["--model", "bundled", "--tokens-per-rank", "4"])
    for row in demo_runs.run_model(parsed, world, rank, device, torch.float32):
        results.append(dict(check="bundled model logits", wire_format=row["wire_format"],
                            max_abs_error=row["max_abs_error"]))
    results += gradients(rank, world, device, gpus_per_node)
    if rank == 0:
        for row in results:
            print(json.dumps(row), flush=True)
    return results


def gradients(rank, world, device, gpus_per_node) -> list[dict]:
    """Outputs and gradients of input, router and experts against the single-process layer (fp32)."""
    from minimoe.model import MoEConfig, MoELayer
    from minimoe.parallel import ExpertParallelMoE
    from minimoe.parallel.comm import all_reduce_sum

    torch.manual_seed(0)
    moe = MoELayer(64, MoEConfig(num_experts=16, top_k=4, intermediate_size=32, num_shared_experts=1)).to(device)
    tokens = 96
    full = torch.randn(world * tokens, 64, device=device, requires_grad=True)
    reference = moe(full)
    grad_out = torch.randn_like(reference)
    (reference * grad_out).sum().backward()
    rng = np.random.default_rng(0)
    slots = -(-16 // world) * world + world
    placement = Placement(rng.permutation(np.concatenate([np.arange(16), rng.integers(0, 16, slots - 16)]))[None], 16,
                          world // gpus_per_node, gpus_per_node)
    rows, mine = [], slice(rank * tokens, (rank + 1) * tokens)
    for fmt in WIRE_FORMATS:
        layer = ExpertParallelMoE(moe, placement, 0, None, fmt)
        x = full.detach()[mine].clone().requires_grad_()
        out = layer(x, token_index=torch.arange(mine.start, mine.stop, device=device))
        (out * grad_out[mine]).sum().backward()
        router = all_reduce_sum(layer.router.weight.grad.clone())
        gate_up, down = layer.gather_experts(grads=True)
        errors = [(out - reference[mine]).abs().max(), (x.grad - full.grad[mine]).abs().max(),
                  (router - moe.router.weight.grad).abs().max(), (gate_up - moe.gate_up_proj.grad).abs().max(),
                  (down - moe.down_proj.grad).abs().max()]
        worst = torch.stack(errors).max().reshape(1).double()
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        rows.append(dict(check="outputs and gradients (input, router, experts), replicas", wire_format=fmt,
                         max_abs_error=float(worst)))
    return rows


def trace_replay(args, rank, world, device, gpus_per_node) -> list[dict]:
    path = Path(__file__).resolve().parent / "results" / "ep_bundled_trace.npz"
    rows = []
    setups = [(method, grouping) for method in ("contiguous", "round_robin", "eplb", "locality")
              for grouping in ("round_robin", "signature")] + [("grouping+locality", None)]
    for method, grouping in setups:
        parsed = demo.build_parser().parse_args(
            ["--trace", str(path), "--placement", method, "--gpus-per-node", str(gpus_per_node), "--dtype",
             "bfloat16"] + (["--grouping", grouping] if grouping else []))
        for row in demo_runs.run_replay(parsed, world, rank, device, torch.bfloat16):
            rows.append(row)
            if rank == 0:
                print(json.dumps({k: v for k, v in row.items() if k != "pairs_per_rank"}), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench_ep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="file prefix for the .json results")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="ranks per 'node' (see above)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a gloo smoke run)")
    parser.add_argument("--parts", default="correctness,sweep,shapes,replay,profiles",
                        help="comma-separated sections (default: all)")
    args = parser.parse_args()
    device = init_process_group(timeout_s=300)
    rank, world = dist.get_rank(), dist.get_world_size()
    gpus_per_node = args.gpus_per_node or demo_setup.default_gpus_per_node(world)
    placement = contiguous(world, gpus_per_node)
    results = dict(command="torchrun --nproc_per_node=%d %s" % (world, " ".join(sys.argv)), world_size=world,
                   gpus_per_node=gpus_per_node, torch=torch.__version__, python=platform.python_version(),
                   backend=dist.get_backend(), device=torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu",
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None)
    sections = {"correctness": lambda: correctness(args, rank, world, device, gpus_per_node),
                "sweep": lambda: sweep(args, placement, rank, world, device),
                "shapes": lambda: shapes(args, placement, rank, world, device),
                "replay": lambda: trace_replay(args, rank, world, device, gpus_per_node),
                "profiles": lambda: profiles(args, placement, rank, world, device)}
    try:
        for name in args.parts.split(","):
            start = time.perf_counter()
            results[name] = sections[name]()
            results[name + "_seconds"] = time.perf_counter() - start
            if rank == 0:
                Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    finally:
        destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    raise SystemExit(main())
