"""One GPU, world size 1 over NCCL: the host and copy overheads of expert-parallel dispatch + combine and of the
MoE layer, before and after the sync-free rewrite, in one call.

    PYTHONPATH=. python benchmarks/ep_host_overhead.py --out $OUT/ep_host_overhead          (one GPU, < 8 min)
    PYTHONPATH=. python benchmarks/ep_host_overhead.py --device cpu --tiny --out /tmp/ep   (gloo smoke run)

With one rank there is no wire: what remains is what the formats cost on the card and on the host, the part
that does not shrink on more GPUs. "before" is the frozen code of ``ep_before.py`` / ``moe_before.py``;
"after" the package as it is. Sections (``--parts``):

1. ``decode``   128 tokens, hidden 7168, top-8 of 256 experts, bf16: host µs and total µs of eager dispatch +
                combine per format, before and after; after also with the collectives forced to run at one
                rank (``collectives_at_one_rank``: what a multi-GPU step pays for its NCCL calls); the raw
                collectives eager and CUDA-graph captured, and the formats that can be captured, captured.
2. ``large``    64 MiB, 256 MiB, 1 GiB of dispatched rows: ours eager against the raw exchange of the same rows
                (two ``all_to_all_single`` per leg; replicate: all-gather + reduce-scatter), before and after.
3. ``replicate`` replicate (collectives forced) against its own raw all-gather + reduce-scatter, eager and
                captured, at decode size, 64 MiB and 1 GiB.
4. ``profile``  torch.profiler around 5 calls of each format: host syncs per call (cudaStreamSynchronize,
                cudaDeviceSynchronize, cudaEventSynchronize, synchronous cudaMemcpy) as a table, and a timeline
                of one call of token_rank (before, after) and replicate (after): host ops, syncs and kernels with
                their start and length, for chapter 5's figure.
5. ``moe``      the MoE layer (Mixtral-8x7B shapes, bf16) at 512 / 4096 / 16384 tokens, after and before, eager
                and captured, against transformers' grouped_mm (``bench_moe.before_after``).

Writes PREFIX.json (everything), PREFIX.md (the tables) and PREFIX_timeline.json; prints the summary.
The column legend is ``ep_cases``'s docstring.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ep_cases import HIDDEN, TOP_K, Case, contiguous, sync, time_eager, time_graph  # noqa: E402

from minimoe.parallel import collectives_at_one_rank, destroy_process_group, init_process_group  # noqa: E402

AFTER = ("token_expert", "token_rank", "hierarchical", "replicate")
BEFORE = ("token_expert", "token_rank", "hierarchical")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaMemcpyAsync",
            "cudaMemsetAsync")  # what the host pays per kernel or copy it enqueues


class Sizes:
    def __init__(self, tiny: bool):
        self.hidden, self.experts = (64, 16) if tiny else (HIDDEN, 256)
        self.top_k = 4 if tiny else TOP_K
        self.decode = 16 if tiny else 128
        self.large_mib = (1, 4) if tiny else (64, 256, 1024)
        self.iters = 5 if tiny else 50


def case(sizes, tokens, fmt, device, impl="after", static=False):
    return Case(tokens, fmt, contiguous(1, 1, sizes.experts), 0, 1, device, impl, static, sizes.hidden,
                top_k=sizes.top_k)


def variants():
    """(label, format, impl, static, forced collectives)"""
    out = [(f"{f} before", f, "before", False, False) for f in BEFORE]
    out += [("token_rank static before", "token_rank", "before", True, False)]
    out += [(f"{f} after", f, "after", False, False) for f in AFTER]
    out += [("token_rank static after", "token_rank", "after", True, False)]
    out += [(f"{f} after, collectives forced", f, "after", False, True) for f in AFTER]
    out += [("replicate after, block size known, collectives forced", "replicate", "after", True, True)]
    return out


def _run(fn, forced):
    if not forced:
        return fn()
    with collectives_at_one_rank():
        return fn()


def decode(sizes, device) -> list[dict]:
    rows = []
    for label, fmt, impl, static, forced in variants():
        c = case(sizes, sizes.decode, fmt, device, impl, static)
        ours = (lambda c=c, forced=forced: _run(c.ours, forced))
        row = dict(variant=label, tokens=sizes.decode, MiB_per_rank=c.sent_bytes / 2**20,
                   **time_eager(ours, device, sizes.iters))
        if static or fmt == "replicate":
            row["graph_total_us"] = time_graph(ours, device, sizes.iters).get("total_us", float("nan"))
        rows.append(row)
    for label, fmt in (("raw all_to_all_single pair (token_rank splits)", "token_rank"),
                       ("raw all_gather + reduce_scatter (replicate)", "replicate")):
        c = case(sizes, sizes.decode, fmt, device)
        with collectives_at_one_rank():
            eager = time_eager(c.raw, device, sizes.iters)
            graph = time_graph(c.raw, device, sizes.iters)
        rows.append(dict(variant=label, tokens=sizes.decode, MiB_per_rank=c.sent_bytes / 2**20, **eager,
                         graph_total_us=graph.get("total_us", float("nan"))))
    return rows


def large(sizes, device) -> list[dict]:
    rows = []
    per_token = {"token_expert": sizes.top_k, "token_rank": 1, "hierarchical": 1, "replicate": 1}
    for mib in sizes.large_mib:
        tokens = max(1, round(mib * 2**20 / (sizes.hidden * 2)))
        iters = 10 if mib >= 256 else 20
        for fmt in AFTER:
            for impl in ("before", "after"):
                if impl == "before" and fmt == "replicate":
                    continue
                # replicate: collectives forced (at one rank it does nothing without them), block size known
                forced = fmt == "replicate"
                c = case(sizes, max(1, tokens // per_token[fmt]), fmt, device, impl, static=forced)
                ours = time_eager(lambda: _run(c.ours, forced), device, iters)["total_us"]
                with collectives_at_one_rank():
                    raw = time_eager(c.raw, device, iters)["total_us"]
                rows.append(dict(format=fmt, impl=impl, MiB_per_rank=c.sent_bytes / 2**20, ours_us=ours, raw_us=raw,
                                 raw_over_ours=raw / ours))
                del c
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def replicate_vs_raw(sizes, device) -> list[dict]:
    rows = []
    for tokens in (sizes.decode, *(max(1, round(m * 2**20 / (sizes.hidden * 2))) for m in sizes.large_mib[::2])):
        c = case(sizes, tokens, "replicate", device, static=True)  # block size known: nothing to agree
        agreed = case(sizes, tokens, "replicate", device)
        with collectives_at_one_rank():
            iters = 10 if tokens > 20000 else sizes.iters
            out = dict(tokens=tokens, MiB_per_rank=c.sent_bytes / 2**20)
            for name, fn in (("ours", c.ours), ("raw", c.raw)):
                out[f"{name}_eager_us"] = time_eager(fn, device, iters)["total_us"]
                out[f"{name}_graph_us"] = time_graph(fn, device, iters).get("total_us", float("nan"))
            out["ours_agreed_eager_us"] = time_eager(agreed.ours, device, iters)["total_us"]
        out["eager_raw_over_ours"] = out["raw_eager_us"] / out["ours_eager_us"]
        out["graph_raw_over_ours"] = out["raw_graph_us"] / out["ours_graph_us"]
        rows.append(out)
    return rows


def profile(sizes, device, out_prefix) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows, timelines = [], {}
    with torch_profile(activities=activities) as empty:  # what the profiler and the closing sync count by themselves
        sync(device)
    baseline = {key: sum(e.count for e in empty.key_averages() if e.key == key) for key in SYNC_EVENTS}
    for label, fmt, impl, static, forced in variants():
        c = case(sizes, sizes.decode, fmt, device, impl, static)
        fn = (lambda c=c, forced=forced: _run(c.ours, forced))
        for _ in range(3):
            fn()
        sync(device)
        with torch_profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            sync(device)
        events = prof.key_averages()
        syncs = {key: (sum(e.count for e in events if e.key == key) - baseline[key]) / 5 for key in SYNC_EVENTS}
        rows.append(dict(variant=label, host_syncs_per_call=sum(syncs.values()), **syncs,
                         nccl_calls_per_call=sum(e.count for e in events if "nccl" in e.key.lower()
                                                 and e.device_type.name == "CPU") / 5,
                         top_level_ops_per_call=sum(1 for e in prof.events() if e.cpu_parent is None
                                                    and e.key.startswith("aten::")) / 5,
                         launches_per_call=sum(e.count for e in events if e.key in LAUNCHES) / 5))
        if label in ("token_rank before", "token_rank after", "replicate after, block size known, collectives forced"):
            with torch_profile(activities=activities) as one:
                fn()
                sync(device)
            timelines[label] = timeline(one)
    Path(out_prefix + "_timeline.json").write_text(json.dumps(timelines, indent=0) + "\n")
    return rows


def timeline(prof) -> list[dict]:
    """Host ops (top level), host syncs and device kernels of one profiled call: name, lane, start µs, length µs."""
    events = [e for e in prof.events() if e.time_range.elapsed_us() >= 0]
    start = min((e.time_range.start for e in events), default=0)
    rows = []
    for e in events:
        device = e.device_type.name != "CPU"
        if device or e.key in SYNC_EVENTS or (e.cpu_parent is None and e.key.startswith(("aten::", "nccl", "c10d"))):
            rows.append(dict(name=e.key[:60], lane="device" if device else ("sync" if e.key in SYNC_EVENTS else "host"),
                             start_us=round(e.time_range.start - start, 1), length_us=round(e.time_range.elapsed_us(), 1)))
    return sorted(rows, key=lambda r: r["start_us"])


def moe(device, tiny) -> dict:
    import bench_moe

    rows, meta = bench_moe.before_after(device.type, tokens_list=[32, 64] if tiny else None,
                                        reps=3 if tiny else None)
    return dict(rows=rows, meta=meta, table=bench_moe.format_before_after(rows, meta))


def tables(results) -> str:
    out = [f"# Expert-parallel host overhead on one GPU (world size 1), {results['device']}",
           f"command: `{results['command']}`; torch {results['torch']}; {results['date']}", ""]
    if "decode" in results:
        out += ["## Decode size: eager dispatch + combine", "",
                "| variant | MiB/rank | host µs | total µs | CUDA graph µs |", "|---|---:|---:|---:|---:|"]
        out += [f"| {r['variant']} | {r['MiB_per_rank']:.2f} | {r['host_us']:.0f} | {r['total_us']:.0f} | "
                f"{r.get('graph_total_us', float('nan')):.0f} |" for r in results["decode"]]
    if "large" in results:
        out += ["", "## Large: ours eager against the raw exchange of the same rows", "",
                "| format | code | MiB/rank | ours µs | raw µs | raw/ours |", "|---|---|---:|---:|---:|---:|"]
        out += [f"| {r['format']} | {r['impl']} | {r['MiB_per_rank']:.0f} | {r['ours_us']:.0f} | {r['raw_us']:.0f} | "
                f"{r['raw_over_ours']:.2f} |" for r in results["large"]]
    if "replicate" in results:
        out += ["", "## Replicate against its own raw all-gather + reduce-scatter (collectives forced)", "",
                "Block size known (every rank the same T, as under a CUDA graph or a scheduler that knows the batch); "
                "the last column agrees it first (one all-gather of one integer, read on the host).", "",
                "| tokens | MiB/rank | ours eager µs | raw eager µs | raw/ours | ours graph µs | raw graph µs | raw/ours "
                "| ours eager µs, size agreed |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['tokens']} | {r['MiB_per_rank']:.1f} | {r['ours_eager_us']:.0f} | {r['raw_eager_us']:.0f} | "
                f"{r['eager_raw_over_ours']:.2f} | {r['ours_graph_us']:.0f} | {r['raw_graph_us']:.0f} | "
                f"{r['graph_raw_over_ours']:.2f} | {r.get('ours_agreed_eager_us', float('nan')):.0f} |"
                for r in results["replicate"]]
    if "profile" in results:
        out += ["", "## Host syncs per dispatch + combine (torch.profiler, 5 calls)", "",
                "| variant | host syncs | cudaEventSynchronize | cudaStreamSynchronize | cudaMemcpy | NCCL calls | "
                "top-level aten ops | kernel launches and async copies |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['variant']} | {r['host_syncs_per_call']:g} | {r['cudaEventSynchronize']:g} | "
                f"{r['cudaStreamSynchronize']:g} | {r['cudaMemcpy']:g} | {r['nccl_calls_per_call']:g} | "
                f"{r['top_level_ops_per_call']:g} | {r.get('launches_per_call', float('nan')):g} |"
                for r in results["profile"]]
    if "moe" in results:
        out += ["", "## The MoE layer", "", results["moe"]["table"]]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "ep_host_overhead"),
                        help="file prefix (default: $OUT/ep_host_overhead)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small sizes (a CPU smoke run)")
    parser.add_argument("--parts", default="decode,large,replicate,profile,moe")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else 4)
    folder = tempfile.mkdtemp(prefix="ep_host_")
    device = init_process_group("nccl" if args.device == "cuda" else "gloo", 300, f"file://{folder}/rendezvous", 0, 1)
    sizes = Sizes(args.tiny)
    results = dict(command="python " + " ".join(sys.argv), device=torch.cuda.get_device_name(device)
                   if device.type == "cuda" else platform.processor() or "cpu", torch=torch.__version__,
                   python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   sizes=vars(sizes), nccl=".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda"
                   else None)
    sections = {"decode": lambda: decode(sizes, device), "large": lambda: large(sizes, device),
                "replicate": lambda: replicate_vs_raw(sizes, device),
                "profile": lambda: profile(sizes, device, args.out), "moe": lambda: moe(device, args.tiny)}
    try:
        for name in args.parts.split(","):
            start = time.perf_counter()
            try:
                results[name] = sections[name]()
            except Exception as error:  # noqa: BLE001 - recorded; the other sections still run
                import traceback

                results[name + "_error"] = traceback.format_exc()[-3000:]
                print(f"-- {name} FAILED: {error!r}", flush=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                continue
            results[name + "_seconds"] = round(time.perf_counter() - start, 1)
            print(f"-- {name} done in {results[name + '_seconds']} s", flush=True)
            Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
            Path(args.out + ".md").write_text(tables(results) + "\n")
    finally:
        destroy_process_group()
    print(tables(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    raise SystemExit(main())
