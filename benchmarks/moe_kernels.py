"""The MoE layer's small-batch kernels one at a time, at 512 tokens of Mixtral-8x7B shapes (bf16, CUDA only).

    PYTHONPATH=. python benchmarks/moe_kernels.py --out $OUT/moe_kernels

* combine's weighted sum on the transposed grouped product's column-major (S', H) output: the kernel with one
  output row per program, a row-major copy first, and the tiled kernel at nine tile shapes (the package uses
  the fastest, ``bag_sum_triton.TILE_ROWS`` x ``TILE_COLUMNS``);
* the gather of the rows in expert order: ``bag_sum_triton.gather_rows`` against ``index_select``;
* softmax top-k plus the row layout: three kernels (``router_triton``, then ``grouped_layout_triton``) against
  one (``route_layout_triton``).

GPU µs: a CUDA graph of 50 calls, replayed ten times, the median replay divided by 50 (no host in the way).
Host µs: the median time until one call returns, the host's cost of enqueuing it. Every tile's result is
checked against the row-major sum (equal bits). Writes PREFIX.md and PREFIX.json with ``--out PREFIX``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ep_cases import graphed  # noqa: E402
from minimoe.model import bag_sum_triton, route_layout_triton, router_triton  # noqa: E402
from minimoe.model.grouped_layout_triton import grouped_layout_triton  # noqa: E402

TILES = [(16, 64), (32, 64), (64, 64), (64, 128), (128, 64), (32, 128), (16, 128), (128, 32), (32, 256)]


def gpu_us(fn, calls: int = 50) -> float:
    """Median GPU µs per call: ``calls`` calls captured in one CUDA graph (``ep_cases.graphed``), replayed ten
    times."""
    replay = graphed(lambda: [fn() for _ in range(calls)], torch.device("cuda"))
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[5]


def host_us(fn, calls: int = 200) -> float:
    """Median host µs until one call returns (the queue drained every 20 calls)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
        if i % 20 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return sorted(times)[calls // 2]


def measure(tokens: int = 512, hidden: int = 4096, experts: int = 8, top_k: int = 2) -> dict:
    torch.manual_seed(0)
    align = 8  # grouped_mm_t's group alignment in bf16
    size = tokens * top_k + (align - 1) * experts  # the padded rows, as the layer bounds them
    size += -size % align
    table = torch.randn(hidden, size, device="cuda", dtype=torch.bfloat16).T  # column-major (S', H)
    logits = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
    ids, weights, _, place, _, source = route_layout_triton.softmax_topk_layout(logits, top_k, True, align, size)
    index = place.view(tokens, top_k)
    want = bag_sum_triton.bag_sum_triton(index, table.contiguous(), weights)
    out = {}

    def one_row_per_program():
        result = table.new_empty(tokens, hidden)
        bag_sum_triton._kernel()[(tokens, -(-hidden // bag_sum_triton.BLOCK_C))](
            index, weights, table, result, top_k, hidden, table.stride(0), table.stride(1), result.stride(0), size,
            HAS_WEIGHTS=True, ZERO_OUTSIDE=False, BLOCK=bag_sum_triton.BLOCK_C)
        return result

    with torch.inference_mode():
        out["combine, one row per program"] = gpu_us(one_row_per_program)
        out["combine, row-major copy + one row per program"] = gpu_us(
            lambda: bag_sum_triton.bag_sum_triton(index, table.contiguous(), weights))
        chosen = bag_sum_triton.TILE_ROWS, bag_sum_triton.TILE_COLUMNS
        best = None
        try:
            for tile in TILES:
                bag_sum_triton.TILE_ROWS, bag_sum_triton.TILE_COLUMNS = tile
                if not torch.equal(bag_sum_triton.bag_sum_triton(index, table, weights), want):
                    raise AssertionError(f"the tiled sum with tile {tile} differs from the row-major sum")
                us = gpu_us(lambda: bag_sum_triton.bag_sum_triton(index, table, weights))
                out[f"combine tiled {tile}"] = us
                best = (tile, us) if best is None or us < best[1] else best
        finally:
            bag_sum_triton.TILE_ROWS, bag_sum_triton.TILE_COLUMNS = chosen
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        clamped = lambda: x.index_select(0, source.clamp(max=tokens - 1))  # noqa: E731 (the zero row: clamped)
        out["gather, gather_rows, GPU"] = gpu_us(lambda: bag_sum_triton.gather_rows(x, source))
        out["gather, index_select, GPU"] = gpu_us(clamped)
        out["gather, gather_rows, host"] = host_us(lambda: bag_sum_triton.gather_rows(x, source))
        out["gather, index_select, host"] = host_us(clamped)

        def three_kernels():
            expert_ids, _, _ = router_triton.softmax_topk(logits, top_k, True)
            return grouped_layout_triton(expert_ids, experts, tokens, align, size)

        def one_kernel():
            return route_layout_triton.softmax_topk_layout(logits, top_k, True, align, size)

        out["router + layout, three kernels, GPU"] = gpu_us(three_kernels)
        out["router + layout, one kernel, GPU"] = gpu_us(one_kernel)
        out["router + layout, three kernels, host"] = host_us(three_kernels)
        out["router + layout, one kernel, host"] = host_us(one_kernel)
        out["torch.empty, host"] = host_us(lambda: torch.empty(1024, device="cuda"))
    return dict(results_us=out, best_tile=list(best[0]), package_tile=list(chosen), device=torch.cuda.get_device_name(),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "moe_kernels"),
                        help="output prefix: PREFIX.md and PREFIX.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or route_layout_triton.triton is None:
        print("moe_kernels.py: needs a CUDA device and Triton (these kernels do not run on the CPU)", file=sys.stderr)
        return 2
    result = measure()
    lines = [f"# The MoE layer's small-batch kernels (512 tokens, Mixtral-8x7B shapes, bf16), {result['device']}", "",
             f"command: `python benchmarks/moe_kernels.py`; torch {result['torch']}; {result['date']}", "",
             "| what | µs |", "|---|---:|"]
    lines += [f"| {name} | {us:.2f} |" for name, us in result["results_us"].items()]
    lines += ["", f"Fastest tile of the column-major sum: {tuple(result['best_tile'])} (rows x columns); the package "
                  f"uses {tuple(result['package_tile'])}."]
    print("\n".join(lines))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
