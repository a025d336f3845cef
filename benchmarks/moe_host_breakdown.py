"""Where the eager MoE layer's host time goes, at Mixtral-8x7B shapes (bf16, CUDA only).

    PYTHONPATH=. python benchmarks/moe_host_breakdown.py --tokens 512 --out $OUT/moe_host_breakdown

An eager layer keeps the GPU idle until its first grouped product is enqueued: everything the host does before
that (the router's linear, the fused softmax top-k + row layout, the gather, the product's own launch) adds to
the layer's time one for one, while the host work after it hides behind the products. This script wraps the
layer's steps in host timers (``time.perf_counter_ns`` around each call, no synchronisation inside the layer)
and prints the median µs of each step over 50 calls, the host time until the first ``torch._grouped_mm`` call
or the Triton experts' first kernel begins, and the layer's total (CUDA events). Transformers' Mixtral block
with its grouped_mm experts runs the same way for comparison. The timers add about 1 µs per wrapped call. Writes PREFIX.json and PREFIX.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimoe.hf.moe_blocks import moe_from_hf_block  # noqa: E402
from minimoe.model import bag_sum_triton, experts_triton, grouped, moe, route_layout_triton, router  # noqa: E402
from minimoe.model import swiglu_triton  # noqa: E402

CALLS, WARMUP = 50, 10
times: dict[str, list[float]] = {}
first_product = {}


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter_ns()
        result = fn(*args, **kwargs)
        times.setdefault(name, []).append((time.perf_counter_ns() - start) / 1e3)
        return result
    return wrapper


def wrap_steps(started: list[int]) -> None:
    """Host timers around the layer's steps (module attributes, so the layer's own calls go through them)."""
    grouped_mm = torch._grouped_mm

    def first_grouped_mm(*args, **kwargs):
        first_product.setdefault("us", (time.perf_counter_ns() - started[0]) / 1e3)
        return grouped_mm(*args, **kwargs)

    torch._grouped_mm = timed("torch._grouped_mm", first_grouped_mm)
    gate_up = experts_triton._gate_up_kernel  # the Triton experts' first kernel streams weights like a product
    gate_up_run = gate_up.run

    def first_gate_up(*args, **kwargs):
        first_product.setdefault("us", (time.perf_counter_ns() - started[0]) / 1e3)
        return gate_up_run(*args, **kwargs)

    gate_up.run = timed("  of which the gate_up launch", first_gate_up)
    experts_triton.swiglu_experts = timed("swiglu_experts (Triton, both kernels)", experts_triton.swiglu_experts)
    F.linear = timed("router linear (F.linear)", F.linear)
    moe.layout_request = timed("layout_request", grouped.layout_request)
    route_layout_triton.softmax_topk_layout = timed("softmax_topk_layout", route_layout_triton.softmax_topk_layout)
    kernel = route_layout_triton._route_layout_kernel
    kernel.run = timed("  of which the Triton launch", kernel.run)
    router.Router.forward = timed("Router.forward", router.Router.forward)
    moe.grouped_experts = timed("grouped_experts", grouped.grouped_experts)
    bag_sum_triton.gather_rows = timed("gather_rows", bag_sum_triton.gather_rows)
    grouped.grouped_matmul = timed("grouped_matmul", grouped.grouped_matmul)
    swiglu_triton.silu_mul = timed("silu_mul", swiglu_triton.silu_mul)
    bag_sum_triton.bag_sum_triton = timed("bag_sum_triton (combine)", bag_sum_triton.bag_sum_triton)
    moe.MoELayer._aux_loss = timed("_aux_loss", moe.MoELayer._aux_loss)


def one_call(fn, x, started: list[int]) -> tuple[float, float]:
    """(host µs until fn returns, total µs by CUDA events) of one call that starts on an idle GPU."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    started[0] = time.perf_counter_ns()
    start.record()
    fn(x)
    end.record()
    host = (time.perf_counter_ns() - started[0]) / 1e3
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_host_breakdown.py: needs a CUDA GPU (it times the layer's CUDA path)", file=sys.stderr)
        return 2
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)
    block = block.to("cuda", torch.bfloat16).eval()
    ours = moe_from_hf_block(block, "mixtral").eval()
    x = torch.randn(1, args.tokens, 4096, device="cuda", dtype=torch.bfloat16)
    started = [0]
    result = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "calls": CALLS}
    with torch.no_grad():
        def hf(v):
            config._experts_implementation = "grouped_mm"
            return block(v)
        for _ in range(WARMUP):
            one_call(hf, x, started)
        hf_runs = [one_call(hf, x, started) for _ in range(CALLS)]
        wrap_steps(started)
        for _ in range(WARMUP):
            one_call(ours, x, started)
        times.clear()
        runs, firsts = [], []
        for _ in range(CALLS):
            first_product.clear()
            runs.append(one_call(ours, x, started))
            firsts.append(first_product["us"])
    result.update({"ours host us": statistics.median(r[0] for r in runs),
                   "ours total us": statistics.median(r[1] for r in runs),
                   "ours host until the first grouped product us": statistics.median(firsts),
                   "steps": {name: [statistics.median(v), len(v) / CALLS] for name, v in times.items()},
                   "transformers grouped_mm host us": statistics.median(r[0] for r in hf_runs),
                   "transformers grouped_mm total us": statistics.median(r[1] for r in hf_runs)})
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(format_table(result) + "\n")
    return 0


def format_table(result: dict) -> str:
    lines = [f"# Eager MoE layer: host µs per step, {result['tokens']} tokens, {result['device']}", "",
             "| step | host µs (median) | calls per forward |", "|---|---:|---:|"]
    lines += [f"| {name} | {us:.1f} | {per:g} |" for name, (us, per) in result["steps"].items()]
    lines += ["", f"Host time until the first grouped product is enqueued: "
                  f"{result['ours host until the first grouped product us']:.0f} µs; whole forward on the host "
                  f"{result['ours host us']:.0f} µs; layer total {result['ours total us']:.0f} µs. Transformers' "
                  f"grouped_mm block: host {result['transformers grouped_mm host us']:.0f} µs, total "
                  f"{result['transformers grouped_mm total us']:.0f} µs."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
