"""Where the per (token, rank) format's time goes on one GPU (world size 1, NCCL): what each piece of an eager
dispatch + combine costs the host, and the kernels at 64 MiB.

    PYTHONPATH=. NCCL_NVLS_ENABLE=0 python benchmarks/ep_host_pieces.py > ep_host_pieces.txt     (one GPU, ~1 min)

For each size (128 tokens, and 4,681 tokens = 64 MiB of rows; hidden 7168, top-8 of 256, bf16): host µs per call
of the send plan (``sendplan.plan_for``), the count exchange and its wait, the pack kernel's launch, the weighted
sum's launch, the whole dispatch + combine, and two one-op baselines (``torch.empty``, ``x.add(1)``), each the
mean over 200 calls issued back to back ("host"), then synchronised ("host+gpu"). Then a ``torch.profiler``
table and one call's timeline at 64 MiB (the profiler inflates host times; read it for the kernels), and a
``cProfile`` of 300 calls at decode size (token_rank and token_expert), by own time: where the Python goes.
"""
import sys
import tempfile
import time

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from ep_cases import Case, contiguous, time_eager  # noqa: E402

from minimoe.parallel import init_process_group  # noqa: E402
from minimoe.parallel import pack_triton, sendplan  # noqa: E402
from minimoe.parallel.comm import CountExchange  # noqa: E402
from minimoe.model import bag_sum_triton  # noqa: E402

folder = tempfile.mkdtemp()
device = init_process_group("nccl", 300, f"file://{folder}/r", 0, 1)
sync = torch.cuda.synchronize


def host_per_call(fn, n=200):
    for _ in range(5):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    h = (time.perf_counter() - t) / n
    sync()
    t2 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return 1e6 * h, 1e6 * (time.perf_counter() - t2) / n


def pieces(tokens, label):
    c = Case(tokens, "token_rank", contiguous(1, 1), 0, 1, device)
    slots = c.slots
    print(f"== {label}: {tokens} tokens", flush=True)
    rows = {}
    rows["plan_for"] = host_per_call(lambda: sendplan.plan_for(slots, 256, 1, 0))
    plan = sendplan.plan_for(slots, 256, 1, 0)
    rows["CountExchange+wait"] = host_per_call(lambda: CountExchange(plan.counts).wait())
    units = plan.send_units(tokens, tokens)
    buf = torch.empty(tokens, 7216, dtype=torch.bfloat16, device=device)
    sp, wp, rp, _ = buf.split([32, 16, 7168, 0], 1)
    sp, wp = sp.view(torch.int64), wp.view(torch.float32)
    rows["pack"] = host_per_call(lambda: pack_triton.pack(units, units, slots, c.weights, c.x, sp, wp, rp))
    pos, mask = plan.bags()
    rows["bag_sum_triton"] = host_per_call(lambda: bag_sum_triton.bag_sum_triton(pos, rp, mask))
    rows["ours (dispatch+combine)"] = host_per_call(c.ours, 100)
    rows["torch.empty"] = host_per_call(lambda: torch.empty(10, device=device))
    rows["x.add(1)"] = host_per_call(lambda: c.x.add(1))
    for k, (h, t) in rows.items():
        print(f"  {k:28s} host {h:8.1f} us   host+gpu (pipelined) {t:8.1f} us", flush=True)
    return c


def kernels(c, label):
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        c.ours()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            c.ours()
        sync()
    print(f"-- {label}: profiler table (3 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as one:
        c.ours()
        sync()
    ev = [e for e in one.events()]
    start = min(e.time_range.start for e in ev)
    print(f"-- {label}: one call's timeline (us from start)")
    for e in sorted(ev, key=lambda e: e.time_range.start):
        dev = e.device_type.name != "CPU"
        if dev or e.cpu_parent is None:
            print(f"  {'GPU ' if dev else 'host'} {e.time_range.start - start:8.1f} {e.time_range.elapsed_us():8.1f}  "
                  f"{e.key[:70]}")


def python_profile(fmt):
    import cProfile
    import io
    import pstats
    c = Case(128, fmt, contiguous(1, 1), 0, 1, device)
    for _ in range(20):
        c.ours()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        c.ours()
    prof.disable()
    sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    print(f"-- {fmt}, decode size: cProfile of 300 calls, by own time")
    print(text.getvalue())


pieces(128, "decode")
big = pieces(4681, "64 MiB")
print("64 MiB total (time_eager):", time_eager(big.ours, device, 20), flush=True)
kernels(big, "token_rank 64 MiB")
python_profile("token_rank")
python_profile("token_expert")
print("triton", __import__("triton").__version__, "torch", torch.__version__)
