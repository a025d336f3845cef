"""Placement runtime on one CPU core: 64 layers x 256 experts on 8 nodes x 8 GPUs (a DeepSeek-V3-sized fit).

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_placement.py [--quick]
Prints a table and writes benchmarks/results/placement_cpu.txt. The trace is synthetic
(minimoe.traces.synthetic: 4 domains, skewed popularity, per-request preferences), 20 480 tokens, top-8.
The locality placement runs with both node partitioners: minimoe's FM refinement (the default) and
Mt-KaHyPar (``pip install mtkahypar``; skipped with a note when it is missing), at full size and on an even
sample of 4096 fitting tokens per layer (``max_fit_tokens``).
"""
import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from minimoe.placement import group, group_and_place  # noqa: E402
from minimoe.placement import place  # noqa: E402
from minimoe.traces import synthetic_trace  # noqa: E402
from minimoe.placement import Topology  # noqa: E402
from minimoe.placement import measure, uniform_nodes_per_token  # noqa: E402
from minimoe.placement.hypergraph import mtkahypar_available  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="8 layers instead of 64 (smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "placement_cpu.txt"))
    args = parser.parse_args()
    layers = 8 if args.quick else 64
    start = time.perf_counter()
    trace = synthetic_trace(num_requests=640, tokens_per_request=32, num_layers=layers, num_experts=256, top_k=8,
                            seed=0)
    made = time.perf_counter() - start
    topology = Topology(num_nodes=8, gpus_per_node=8)
    start = time.perf_counter()
    sources = group(trace, topology, "signature")
    grouped = time.perf_counter() - start
    runs = [("contiguous", {}), ("round_robin", {}), ("eplb", dict(policy="global")),
            ("eplb", dict(policy="hierarchical", num_groups=8)), ("locality", dict(partitioner="fm")),
            ("locality", dict(sources=sources, partitioner="fm"))]
    if mtkahypar_available():
        for fit_tokens in (None, 4096):
            for options in ({}, dict(sources=sources)):
                limit = {} if fit_tokens is None else dict(max_fit_tokens=fit_tokens)
                runs.append(("locality", dict(options, partitioner="mtkahypar", **limit)))
    lines = [f"# bench_placement: {layers} layers x 256 experts, top-8, {trace.num_tokens} tokens, "
             f"topology 8x8, one core (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}); the machine is shared, "
             "so wall seconds vary: CPU seconds are this process's own",
             f"# command: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_placement.py{' --quick' * args.quick}",
             f"# machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
             f"numpy {np.__version__}, mtkahypar {_version('mtkahypar')}",
             f"# synthetic trace built in {made:.1f} s; signature grouping of {trace.num_requests} requests "
             f"in {grouped:.1f} s",
             f"# uniform-routing baseline: {uniform_nodes_per_token(256, 8, 8):.3f} nodes/token, i.e. "
             f"{uniform_nodes_per_token(256, 8, 8) * 7 / 8:.3f} remote nodes/token from a random source",
             f"{'method':<12} {'options':<62} {'slots':>5} {'seconds':>8} {'CPU s':>7} {'remote nodes/token':>19} "
             f"{'load max/mean':>13}"]
    if not mtkahypar_available():
        lines.insert(1, "# Mt-KaHyPar is not installed (pip install mtkahypar): its rows are missing")
    print("\n".join(lines), flush=True)
    for num_replicas in (256, 320):
        for method, options in runs:
            start, cpu = time.perf_counter(), time.process_time()
            placement = place(trace, topology, method, num_replicas=num_replicas, **options)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            report = measure(trace, placement, topology, sources=options.get("sources"))
            label = ", ".join(f"{k}={'signature' if k == 'sources' else v}" for k, v in options.items()) or "-"
            line = (f"{method:<12} {label:<62} {num_replicas:>5} {seconds:>8.2f} {cpu:>7.2f} "
                    f"{report.remote_nodes_per_token:>19.3f} {report.load_max_over_mean:>13.3f}")
            print(line, flush=True)
            lines.append(line)
    start, cpu = time.perf_counter(), time.process_time()  # joint: 1 regrouping round = 2 groupings + 2 placements
    joint_sources, placement = group_and_place(trace, topology, rounds=1, num_replicas=320)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = measure(trace, placement, topology, sources=joint_sources)
    line = (f"{'joint':<12} {'group_and_place(rounds=1)':<62} {320:>5} {seconds:>8.2f} {cpu:>7.2f} "
            f"{report.remote_nodes_per_token:>19.3f} {report.load_max_over_mean:>13.3f}")
    print(line, flush=True)
    lines.append(line)
    lines.append("# remote nodes/token and load max/mean are on the fitting tokens themselves (no held-out split)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as file:
        file.write("\n".join(lines) + "\n")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
