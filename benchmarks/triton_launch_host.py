"""What launching Triton kernels through ``minimoe.model.triton_launch.launch`` saves the host, on one GPU.

    PYTHONPATH=. NCCL_NVLS_ENABLE=0 python benchmarks/triton_launch_host.py > triton_launch_host.txt   (~1 min)

Every row runs twice in the same process, taking turns: with ``launch`` calling the compiled kernel's ``run``
("launch") and with every launch going through ``kernel[grid](...)`` ("kernel[grid]"), by switching
``triton_launch._FAST``. Rows:

1. one launch of the send-buffer pack kernel at decode size (128 rows of 7168 bf16): host µs per launch;
2. eager dispatch + combine at world size 1 over NCCL (``token_rank``, ``token_expert``; 128 tokens, and 64 MiB
   of rows), hidden 7168, top-8 of 256, bf16: host µs (until the call returns) and total µs (until the GPU is
   done), and the raw exchange of the same rows for the ratio raw/ours (``ep_cases``; column legend there);
3. the MoE layer's eager forward at 512 tokens, Mixtral-8x7B shapes (8 experts, top-2, H 4096, F 14336, bf16):
   host µs and total µs.
Medians of interleaved calls.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ep_cases import Case, contiguous  # noqa: E402

from minimoe.model import MoEConfig, MoELayer, triton_launch  # noqa: E402
from minimoe.parallel import collectives_at_one_rank, init_process_group  # noqa: E402

MODES = {"launch": True, "kernel[grid]": False}


def timed(fn, device, iters: int = 60) -> dict:
    """Median host µs and total µs of ``fn`` in each mode, the modes taking turns call by call."""
    host = {mode: [] for mode in MODES}
    total = {mode: [] for mode in MODES}
    for i in range(iters + 5):
        for mode, fast in MODES.items():
            triton_launch._FAST = fast
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            returned = time.perf_counter()
            torch.cuda.synchronize(device)
            if i >= 5:
                host[mode].append(returned - start)
                total[mode].append(time.perf_counter() - start)
    triton_launch._FAST = True
    return {mode: (1e6 * statistics.median(host[mode]), 1e6 * statistics.median(total[mode])) for mode in MODES}


def per_launch(fn, device, calls: int = 400) -> dict:
    """Host µs per call of ``fn`` issued back to back, in each mode."""
    out = {}
    for mode, fast in MODES.items():
        triton_launch._FAST = fast
        for _ in range(10):
            fn()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out[mode] = 1e6 * (time.perf_counter() - start) / calls
        torch.cuda.synchronize(device)
    triton_launch._FAST = True
    return out


def main() -> int:
    folder = tempfile.mkdtemp()
    device = init_process_group("nccl", 300, f"file://{folder}/rendezvous", 0, 1)
    import triton

    from minimoe.parallel import pack_triton

    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, Triton {triton.__version__}")
    x = torch.randn(128, 7168, device=device, dtype=torch.bfloat16)
    units = torch.arange(128, device=device)
    slots = torch.zeros(128, 8, dtype=torch.int64, device=device)
    weights = torch.rand(128, 8, device=device)
    buffer = torch.empty(128, 7216, dtype=torch.bfloat16, device=device)
    slot_part, weight_part, row_part, _ = buffer.split([32, 16, 7168, 0], 1)
    slot_part, weight_part = slot_part.view(torch.int64), weight_part.view(torch.float32)
    row = per_launch(lambda: pack_triton.pack(units, units, slots, weights, x, slot_part, weight_part, row_part),
                     device)
    print("\n1. one pack launch, host µs:", ", ".join(f"{mode} {us:.1f}" for mode, us in row.items()))

    print("\n2. eager dispatch + combine, world size 1 (µs)\n")
    print("| format | tokens | MiB/rank | mode | host | total | raw total | raw/ours |\n|---|---:|---:|---|---:|---:|---:|---:|")
    for fmt in ("token_rank", "token_expert"):
        for tokens in (128, 4681 if fmt == "token_rank" else 4681 // 8):  # 4681 rows: 64 MiB
            case = Case(tokens, fmt, contiguous(1, 1), 0, 1, device)
            results = timed(case.ours, device)
            with collectives_at_one_rank():
                raw = timed(case.raw, device)["launch"][1]  # (no Triton kernel in it)
            for mode, (host, total) in results.items():
                print(f"| {fmt} | {case.x.shape[0]} | {case.sent_bytes / 2**20:.1f} | {mode} | {host:.0f} | "
                      f"{total:.0f} | {raw:.0f} | {raw / total:.2f} |")

    print("\n3. MoE layer forward, 512 tokens, Mixtral-8x7B shapes, eager (µs)\n")
    torch.manual_seed(0)
    layer = MoELayer(4096, MoEConfig(num_experts=8, top_k=2, intermediate_size=14336)).to(device, torch.bfloat16)
    layer.reset_parameters(std=0.02)
    tokens = torch.randn(512, 4096, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        results = timed(lambda: layer(tokens), device)
    print("| mode | host | total |\n|---|---:|---:|")
    for mode, (host, total) in results.items():
        print(f"| {mode} | {host:.0f} | {total:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
