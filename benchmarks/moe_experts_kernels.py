"""A small batch's grouped experts on the GPU: torch's grouped products against the two Triton kernels of
``minimoe.model.experts_triton`` (Mixtral-8x7B shapes, bf16, CUDA only).

    PYTHONPATH=. python benchmarks/moe_experts_kernels.py --out $OUT/moe_experts_kernels [--sweep]

For each batch size, with the rows laid out by the router's kernel (``route_layout_triton``):

* torch:  gather the rows (``bag_sum_triton.gather_rows``), the transposed grouped product of gate and up
          (``torch._grouped_mm``), silu·mul (``swiglu_triton``), the transposed down product: what "auto" ran
          before the Triton kernels;
* triton: ``experts_triton.swiglu_experts`` (gate_up with the gather and silu·mul folded in, then down).

GPU µs: calls captured in one CUDA graph and replayed (no host in the way), median. The weights' rate is the
bytes of every expert's three matrices over that time, beside the card's copy rate (read + write of 1 GiB).
Both paths are checked against each other (relative error of the outputs). ``--sweep`` first times each
kernel alone at 512 tokens for every tile in ``TILES`` and reports the fastest (the package's constants are
set from it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernels import gpu_us  # noqa: E402

from minimoe.model import bag_sum_triton, experts_triton, grouped, route_layout_triton, swiglu_triton  # noqa: E402

HIDDEN, WIDTH, EXPERTS, TOP_K = 4096, 14336, 8, 2
TILES = [dict(BLOCK_N=n, BLOCK_K=k, num_stages=s, num_warps=w)
         for n, k, s, w in itertools.product((32, 64, 128), (32, 64), (3, 4), (4, 8))]
MAX_BLOCK_M = (64, 128)  # most rows of one expert per program: below its rows, programs share each weight tile


def weights(seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gate_up = torch.empty(EXPERTS, HIDDEN, 2 * WIDTH, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02,
                                                                                                   generator=g)
    down = torch.empty(EXPERTS, WIDTH, HIDDEN, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
    return gate_up, down


def layout(tokens: int, align: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, EXPERTS, device="cuda", generator=g)
    size = grouped._padded_rows(tokens * TOP_K, EXPERTS, align)
    ids, top_w, _, place, ends, source = route_layout_triton.softmax_topk_layout(logits, TOP_K, True, align, size)
    return ids, top_w, place, ends, source


def torch_path(x, ends, source, gate_up, down):
    rows = bag_sum_triton.gather_rows(x, source)
    gate_up_out = grouped.grouped_matmul(rows, gate_up, ends, "grouped_mm_t").T  # (2F, S')
    hidden = swiglu_triton.silu_mul(gate_up_out[:WIDTH], gate_up_out[WIDTH:]).T
    return grouped.grouped_matmul(hidden, down, ends, "grouped_mm_t")  # (S', H) column-major


def sweep(x, gate_up, down, tokens: int = 512) -> dict:
    """Each kernel alone for every tile of ``TILES``: GPU µs, or the error that stopped it (too much shared
    memory, too many registers)."""
    _, _, _, ends, source = layout(tokens, 1)
    size = source.shape[0]
    inner = torch.empty(size, WIDTH, dtype=x.dtype, device="cuda")
    out = torch.empty(size, HIDDEN, dtype=x.dtype, device="cuda")
    results = {"gate_up": [], "down": []}
    for tiles, most in itertools.product(TILES, MAX_BLOCK_M):
        block_m, splits = experts_triton.row_blocks(tokens * TOP_K, EXPERTS, most)
        tiles = dict(tiles, MAX_BLOCK_M=most)

        def gate_up_only(tiles=tiles, block_m=block_m, splits=splits):
            experts_triton._gate_up_kernel[(splits, -(-WIDTH // tiles["BLOCK_N"]), EXPERTS)](
                x, source, ends, gate_up, inner, tokens, HIDDEN, WIDTH, *gate_up.stride(), BLOCK_M=block_m,
                EVEN_K=HIDDEN % tiles["BLOCK_K"] == 0, **_launch(tiles))

        def down_only(tiles=tiles, block_m=block_m, splits=splits):
            experts_triton._down_kernel[(splits, -(-HIDDEN // tiles["BLOCK_N"]), EXPERTS)](
                inner, ends, down, out, WIDTH, HIDDEN, *down.stride(), BLOCK_M=block_m,
                EVEN_K=WIDTH % tiles["BLOCK_K"] == 0, **_launch(tiles))

        for name, fn in (("gate_up", gate_up_only), ("down", down_only)):
            try:
                results[name].append(dict(tiles=tiles, gpu_us=gpu_us(fn, calls=10)))
            except Exception as error:  # noqa: BLE001 - recorded: a tile the card cannot hold
                torch.cuda.synchronize()
                results[name].append(dict(tiles=tiles, error=repr(error)[:200]))
            print(name, tiles, results[name][-1].get("gpu_us", "failed"), flush=True)
    best = {name: min((r for r in rows if "gpu_us" in r), key=lambda r: r["gpu_us"]) for name, rows in results.items()}
    return dict(rows=results, best=best)


def _launch(tiles: dict) -> dict:
    return {k: v for k, v in tiles.items() if k != "MAX_BLOCK_M"}


def compare(x_full, gate_up, down, sizes, gate_up_tiles=None, down_tiles=None) -> list[dict]:
    weight_bytes = (gate_up.numel() + down.numel()) * gate_up.element_size()
    rows = []
    for tokens in sizes:
        x = x_full[:tokens]
        ids, top_w, place_t, ends_t, source_t = layout(tokens, grouped.row_alignment(x))
        _, _, place, ends, source = layout(tokens, 1)
        triton_fn = lambda: experts_triton.swiglu_experts(x, source, ends, gate_up, down, tokens * TOP_K,  # noqa
                                                          gate_up_tiles, down_tiles)
        torch_fn = lambda: torch_path(x, ends_t, source_t, gate_up, down)  # noqa: E731
        got = bag_sum_triton.bag_sum_triton(place.view(tokens, TOP_K), triton_fn(), top_w).float()
        want = bag_sum_triton.bag_sum_triton(place_t.view(tokens, TOP_K), torch_fn(), top_w).float()
        calls = 5 if tokens <= 1024 else 2
        row = dict(tokens=tokens, torch_us=gpu_us(torch_fn, calls), triton_us=gpu_us(triton_fn, calls),
                   rel_err=float((got - want).norm() / want.norm()))
        row["torch_TBps"] = weight_bytes / row["torch_us"] / 1e6
        row["triton_TBps"] = weight_bytes / row["triton_us"] / 1e6
        rows.append(row)
        print(row, flush=True)
    return rows


def copy_rate() -> float:
    """The card's copy rate in TB/s: bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")  # (a byte-wise copy runs slower)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / gpu_us(lambda: dst.copy_(src), calls=5) / 1e6


def markdown(result: dict) -> str:
    lines = [f"# A small batch's grouped experts: torch's products against the Triton kernels",
             "", f"{result['device']}, torch {result['torch']}, Triton {result['triton']}, {result['date']}; "
             f"Mixtral-8x7B shapes (H {HIDDEN}, F {WIDTH}, {EXPERTS} experts, top-{TOP_K}), bf16; weights "
             f"{result['weight_gb']:.2f} GB; copy rate {result['copy_TBps']:.2f} TB/s (read + write). "
             f"Command: `{result['command']}`", "",
             "| tokens | torch µs | Triton µs | torch TB/s | Triton TB/s | torch / Triton | relative difference |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["compare"]:
        lines.append(f"| {r['tokens']} | {r['torch_us']:.0f} | {r['triton_us']:.0f} | {r['torch_TBps']:.2f} | "
                     f"{r['triton_TBps']:.2f} | {r['torch_us'] / r['triton_us']:.2f}x | {r['rel_err']:.1e} |")
    if "sweep" in result:
        lines += ["", "Tile sweep at 512 tokens, GPU µs of each kernel alone:", "",
                  "| most rows per program | BLOCK_N | BLOCK_K | stages | warps | gate_up µs | down µs |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for a, b in zip(result["sweep"]["rows"]["gate_up"], result["sweep"]["rows"]["down"]):
            t = a["tiles"]
            lines.append(f"| {t['MAX_BLOCK_M']} | {t['BLOCK_N']} | {t['BLOCK_K']} | {t['num_stages']} | {t['num_warps']} | "
                         f"{a.get('gpu_us', float('nan')):.0f} | {b.get('gpu_us', float('nan')):.0f} |")
        lines += ["", f"Fastest: gate_up {result['sweep']['best']['gate_up']['tiles']}, "
                      f"down {result['sweep']['best']['down']['tiles']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "moe_experts_kernels"))
    parser.add_argument("--sweep", action="store_true", help="time every tile at 512 tokens first")
    parser.add_argument("--sizes", default="64,256,512,1024", help="batch sizes, comma-separated")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or experts_triton.triton is None:
        print("moe_experts_kernels: needs a CUDA device and Triton", file=sys.stderr)
        return 2
    import triton

    sizes = [int(s) for s in args.sizes.split(",")]
    gate_up, down = weights()
    x = torch.randn(max(sizes + [512]), HIDDEN, device="cuda", dtype=torch.bfloat16)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command="python benchmarks/moe_experts_kernels.py "
                  + " ".join(argv if argv is not None else sys.argv[1:]),
                  weight_gb=(gate_up.numel() + down.numel()) * 2 / 1e9)
    with torch.inference_mode():
        result["copy_TBps"] = copy_rate()
        tiles = (None, None)
        if args.sweep:
            result["sweep"] = sweep(x[:512], gate_up, down)
            tiles = (result["sweep"]["best"]["gate_up"]["tiles"], result["sweep"]["best"]["down"]["tiles"])
        result["compare"] = compare(x, gate_up, down, sizes, *tiles)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
