"""Expert-parallel dispatch + combine on the GPUs of one host (or gloo CPUs), in one torchrun launch.

    torchrun --nproc_per_node=2 benchmarks/bench_ep.py --out benchmarks/results/ep_h200x2    (any N: 2, 4, 8)
    torchrun --nproc_per_node=4 benchmarks/bench_ep.py --quick --out /tmp/ep                   (gloo smoke run)

1. correctness: a random MoE layer (fp32; capacity off and on; shared expert) expert-parallel against the
   single-process layer, outputs and gradients, every wire format; the bundled model's logits.
2. sweep: uniform top-8 routing over 256 experts, hidden 7168, bf16, contiguous placement; tokens per rank
   chosen so that each rank dispatches 1 MiB ... 1 GiB of rows. dispatch + combine (no expert compute: the
   combine input is a fresh buffer of the received shape) against two raw ``all_to_all_single`` calls with
   the same split sizes, buffers ready (per leg for the hierarchical format).
3. the decode shape (128 tokens per rank) and DeepEP's shape (4096 tokens per rank), per wire format.
4. trace replay of the bundled model's trace (benchmarks/results/ep_bundled_trace.npz) per placement method:
   measured bytes (== minimoe.placement.measure) and time, hidden 7168 bf16.
Times: median over iterations of the slowest rank, each iteration between a barrier and a device sync.
"Nodes": ``--gpus-per-node`` (default: half the ranks when there are 4 or more, else 1 per node).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimoe.parallel import (WIRE_FORMATS, RouteTable, combine, destroy_process_group, dispatch,  # noqa: E402
                              init_process_group)
from minimoe.parallel import demo  # noqa: E402
from minimoe.placement import Placement  # noqa: E402

HIDDEN, EXPERTS, TOP_K = 7168, 256, 8


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int = 3) -> float:
    """Median seconds of fn() over iters (slowest rank)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    value = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def uniform_routing(tokens: int, rank: int, device, seed: int = 0):
    """(T, 8) distinct experts uniform over 256 and their softmax-like weights, per rank."""
    generator = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    scores = torch.rand(tokens, EXPERTS, generator=generator, device=device)
    weights, experts = scores.topk(TOP_K, dim=1)
    return experts, (weights / weights.sum(1, keepdim=True)).float()


class Shape:
    """One shape: our dispatch + combine, and raw all-to-alls with the same splits."""

    def __init__(self, tokens, fmt, placement, rank, world, device, dtype=torch.bfloat16, static=False):
        self.table = RouteTable(placement, 0, device)
        experts, self.weights = uniform_routing(tokens, rank, device)
        self.slots = self.table.route(experts, rank, torch.arange(tokens, device=device))
        self.x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
        self.fmt, self.rank, self.world, self.device, self.static = fmt, rank, world, device, static
        sent = self.dispatch_only()
        self.legs = [(leg.send_splits, leg.recv_splits) for leg in sent.handle.legs]
        self.recv_rows = sent.rows.shape[0]
        self.raw = [(torch.empty(sum(s), HIDDEN, device=device, dtype=dtype),
                     torch.empty(sum(r), HIDDEN, device=device, dtype=dtype)) for s, r in self.legs]
        row = HIDDEN * self.x.element_size()
        self.sent_bytes = sum(sum(s) for s, _ in self.legs) * row  # dispatch rows per rank, self included
        self.remote_bytes = 2 * sum(sum(c for d, c in enumerate(s) if d != rank) for s, _ in self.legs) * row

    def ours(self):
        sent = self.dispatch_only()
        return combine(torch.empty(sent.rows.shape, device=self.device, dtype=self.x.dtype), sent.handle)

    def dispatch_only(self):
        return dispatch(self.x, self.slots, self.weights, self.table, self.fmt, requires_grad=False,
                        static=self.static)

    def raw_pair(self):
        for (send, recv), (out_buf, in_buf) in zip(self.legs, self.raw):
            dist.all_to_all_single(in_buf, out_buf, recv, send)
        for (send, recv), (out_buf, in_buf) in zip(reversed(self.legs), reversed(self.raw)):
            dist.all_to_all_single(out_buf, in_buf, send, recv)


def graphed(fn, device):
    """fn captured in a CUDA graph (after warm-up on a side stream); returns the replay function."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


VARIANTS = [(fmt, False, False) for fmt in WIRE_FORMATS] + [("token_rank", True, False), ("token_rank", True, True)]


def variant_name(fmt, static, graph) -> str:
    return fmt + (" static" if static else "") + (" CUDA graph" if graph else "")


def measure_variant(tokens, fmt, static, graph, placement, rank, world, device, iters) -> dict | None:
    """Our dispatch + combine (and dispatch alone) against raw all-to-alls with the same splits."""
    case = Shape(tokens, fmt, placement, rank, world, device, static=static)
    ours, only = case.ours, case.dispatch_only
    if graph:
        if device.type != "cuda":
            return None
        try:
            ours, only = graphed(case.ours, device), graphed(case.dispatch_only, device)
        except Exception as error:  # record why capture failed instead of stopping the run
            return dict(format=variant_name(fmt, static, graph), tokens_per_rank=tokens, error=repr(error)[:300])
    both, dispatch_time = timed(ours, device, iters), timed(only, device, iters)
    raw = timed(case.raw_pair, device, iters)
    return dict(format=variant_name(fmt, static, graph), tokens_per_rank=tokens,
                dispatch_MiB_per_rank=case.sent_bytes / 2**20, dispatch_us=dispatch_time * 1e6,
                combine_us=(both - dispatch_time) * 1e6, ours_us=both * 1e6, raw_us=raw * 1e6,
                fraction_of_raw=raw / both, ours_GBps=case.remote_bytes / both / 1e9,
                raw_GBps=case.remote_bytes / raw / 1e9)


def contiguous(world, gpus_per_node):
    return Placement(np.arange(EXPERTS)[None], EXPERTS, world // gpus_per_node, gpus_per_node, "contiguous")


def rows_per_token(fmt, placement, rank, world, device) -> float:
    probe = Shape(2048, fmt, placement, rank, world, device)
    return probe.sent_bytes / (2048 * HIDDEN * 2)


def sweep(args, placement, rank, world, device) -> list[dict]:
    sizes = [1 << 20 << i for i in range(0, 11)]  # 1 MiB ... 1 GiB dispatched per rank
    if args.quick:
        sizes = sizes[:5:2]
    rows = []
    for fmt, static, graph in VARIANTS:
        per_token = rows_per_token(fmt if not static else "token_rank", placement, rank, world, device) \
            if not static else world
        for size in sizes:
            if graph and size > 64 << 20:
                continue
            tokens = max(1, round(size / (per_token * HIDDEN * 2)))
            row = measure_variant(tokens, fmt, static, graph, placement, rank, world, device,
                                  5 if size >= 256 << 20 else 20)
            if row is not None:
                rows.append(row)
                if rank == 0:
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def shapes(args, placement, rank, world, device) -> list[dict]:
    rows = []
    for tokens in (128, 4096):
        for fmt, static, graph in VARIANTS:
            row = measure_variant(tokens, fmt, static, graph, placement, rank, world, device,
                                  50 if tokens == 128 else 20)
            if row is not None:
                rows.append(row)
                if rank == 0:
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def profiles(args, placement, rank, world, device) -> dict:
    """torch.profiler tables of 5 dispatch + combine calls per wire format (rank 0's view)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for tokens in (128, 4096):
        for fmt, static, _ in VARIANTS[:4]:
            case = Shape(tokens, fmt, placement, rank, world, device, static=static)
            for _ in range(3):
                case.ours()
            sync(device)
            dist.barrier()
            with profile(activities=activities) as prof:
                for _ in range(5):
                    case.ours()
                sync(device)
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            tables[f"{variant_name(fmt, static, False)}, {tokens} tokens"] = prof.key_averages().table(
                sort_by=key, row_limit=14, max_name_column_width=60)
    if rank == 0:
        Path(args.out + "_profiles.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in tables.items()))
    return {"written": args.out + "_profiles.txt"}


def correctness(args, rank, world, device, gpus_per_node) -> list[dict]:
    common = ["--gpus-per-node", str(gpus_per_node), "--iters", "1"]
    results = []
    for extra in (["--experts", "32", "--top-k", "8", "--hidden", "256", "--tokens-per-rank", "256",
                   "--shared-experts", "1", "--replicas", str(32 + 2 * world), "--placement", "eplb"],
                  ["--experts", "16", "--top-k", "2", "--hidden", "128", "--capacity-factor", "1.0",
                   "--tokens-per-rank", "64"]):
        parsed = demo.build_parser().parse_args(common + extra)
        for row in demo.run_layer(parsed, world, rank, device, torch.float32):
            results.append(dict(check="random layer " + " ".join(extra), wire_format=row["wire_format"],
                                max_abs_error=row["max_abs_error"], bytes_match=row["bytes_match"]))
    parsed = demo.build_parser().parse_args(common + ["--model", "bundled", "--tokens-per-rank", "4"])
    for row in demo.run_model(parsed, world, rank, device, torch.float32):
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
    for method in ("contiguous", "round_robin", "eplb", "locality"):
        for grouping in ("round_robin", "signature"):
            parsed = demo.build_parser().parse_args(
                ["--trace", str(path), "--placement", method, "--grouping", grouping, "--gpus-per-node",
                 str(gpus_per_node), "--dtype", "bfloat16"])
            for row in demo.run_replay(parsed, world, rank, device, torch.bfloat16):
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
    gpus_per_node = args.gpus_per_node or (world // 2 if world >= 4 else 1)
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
