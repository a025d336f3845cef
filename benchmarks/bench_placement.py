"""Placement runtime on one CPU core: 64 layers x 256 experts on 8 nodes x 8 GPUs (issue 5's budget: < 60 s).

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_placement.py [--quick]
Prints a table and writes benchmarks/results/placement_cpu.txt. The trace is synthetic
(minimoe.traces.synthetic: 4 domains, skewed popularity, per-request preferences), 20 480 tokens, top-8.
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
            ("eplb", dict(policy="hierarchical", num_groups=8)), ("locality", {}),
            ("locality", dict(sources=sources))]
    lines = [f"# bench_placement: {layers} layers x 256 experts, top-8, {trace.num_tokens} tokens, "
             f"topology 8x8, one core (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})",
             f"# machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
             f"numpy {np.__version__}",
             f"# synthetic trace built in {made:.1f} s; signature grouping of {trace.num_requests} requests "
             f"in {grouped:.1f} s",
             f"# uniform-routing baseline: {uniform_nodes_per_token(256, 8, 8):.3f} nodes/token, i.e. "
             f"{uniform_nodes_per_token(256, 8, 8) * 7 / 8:.3f} remote nodes/token from a random source",
             f"{'method':<12} {'options':<34} {'slots':>5} {'seconds':>8} {'remote nodes/token':>19} "
             f"{'load max/mean':>13}"]
    print("\n".join(lines), flush=True)
    for num_replicas in (256, 320):
        for method, options in runs:
            start = time.perf_counter()
            placement = place(trace, topology, method, num_replicas=num_replicas, **options)
            seconds = time.perf_counter() - start
            report = measure(trace, placement, topology, sources=options.get("sources"))
            label = ", ".join(f"{k}={'signature' if k == 'sources' else v}" for k, v in options.items()) or "-"
            line = (f"{method:<12} {label:<34} {num_replicas:>5} {seconds:>8.2f} "
                    f"{report.remote_nodes_per_token:>19.3f} {report.load_max_over_mean:>13.3f}")
            print(line, flush=True)
            lines.append(line)
    start = time.perf_counter()  # the joint mode: 1 regrouping round = 2 groupings + 2 locality placements
    joint_sources, placement = group_and_place(trace, topology, rounds=1, num_replicas=320)
    seconds = time.perf_counter() - start
    report = measure(trace, placement, topology, sources=joint_sources)
    line = (f"{'joint':<12} {'group_and_place(rounds=1)':<34} {320:>5} {seconds:>8.2f} "
            f"{report.remote_nodes_per_token:>19.3f} {report.load_max_over_mean:>13.3f}")
    print(line, flush=True)
    lines.append(line)
    lines.append("# remote nodes/token and load max/mean are on the fitting tokens themselves (no held-out split)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
