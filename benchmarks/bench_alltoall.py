"""Raw all-to-all bandwidth between the GPUs of one machine: ``torch.distributed.all_to_all_single`` (NCCL).

Every rank holds an input buffer of S bytes, split evenly over the W ranks (S/W for each, itself included),
and receives as much. The time of one exchange is the slowest rank's (CUDA events, median of the repeats).
The bandwidth printed is what one rank sends to the *other* ranks, S·(W-1)/W, divided by that time: the
bytes that actually cross a link (NVLink inside one machine).

    torchrun --nproc-per-node 2 benchmarks/bench_alltoall.py            # prints the table
    torchrun --nproc-per-node 2 benchmarks/bench_alltoall.py --out FILE # and writes it to FILE

This is the ceiling that any expert-parallel dispatch or combine running over NCCL works under; the link
peaks that ``minimoe.placement.Topology`` assumes are data-sheet numbers, which NCCL approaches only for
large messages.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess

import torch
import torch.distributed as dist

SIZES_MIB = (1, 4, 16, 64, 256, 1024)


def time_exchange(size_bytes: int, repeats: int, warmup: int = 5) -> float:
    """Median seconds of one all_to_all_single of ``size_bytes`` per rank (the slowest rank's time)."""
    world = dist.get_world_size()
    elements = size_bytes // 2 // world * world  # bf16, divisible by the world size
    send = torch.ones(elements, dtype=torch.bfloat16, device="cuda")
    receive = torch.empty_like(send)
    times = []
    for step in range(warmup + repeats):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_to_all_single(receive, send)
        end.record()
        torch.cuda.synchronize()
        seconds = torch.tensor([start.elapsed_time(end) / 1e3], device="cuda")
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        if step >= warmup:
            times.append(seconds.item())
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--repeats", type=int, default=20, help="timed exchanges per size (default 20)")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    for mib in SIZES_MIB:
        size = mib * 2**20
        seconds = time_exchange(size, args.repeats)
        crossing = size * (world - 1) / world
        rows.append(f"{mib:>8d} MiB  {seconds * 1e6:>10.1f} us  {crossing / seconds / 1e9:>8.1f} GB/s")
    if rank == 0:
        try:
            topology = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
            topology = re.sub(r"\x1b\[[0-9;]*m", "", topology)  # no terminal colour codes in the file
        except OSError:
            topology = "(nvidia-smi not found)\n"
        header = [f"$ torchrun --nproc-per-node {world} benchmarks/bench_alltoall.py",
                  f"# {datetime.date.today()}, {world} x {torch.cuda.get_device_name()}, Python "
                  f"{platform.python_version()}, torch {torch.__version__}, NCCL "
                  f"{'.'.join(map(str, torch.cuda.nccl.version()))}",
                  f"# all_to_all_single, bf16, median of {args.repeats} exchanges (slowest rank) after 5 warm-up;",
                  f"# GB/s = bytes a rank sends to the other {world - 1} rank(s), S*(W-1)/W, per second", "",
                  f"{'per rank S':>12s}  {'time':>13s}  {'bandwidth':>13s}"]
        table = "\n".join(header + rows) + "\n\n# nvidia-smi topo -m\n" + topology
        print(table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
