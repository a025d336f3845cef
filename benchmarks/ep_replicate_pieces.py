"""What the replicate exchange costs beyond its two raw collectives, piece by piece, on one GPU (world size 1,
NCCL, collectives forced), at decode size (128 tokens) and at 64 MiB (4,681 tokens); hidden 7168, bf16, top-8.

    PYTHONPATH=. NCCL_NVLS_ENABLE=0 python benchmarks/ep_replicate_pieces.py > ep_replicate_pieces.txt   (~10 s)

Rows, each timed eager (host µs until the call returns, total µs until the GPU is done; medians of 50) and
captured in a CUDA graph (total µs per replay):

    raw AG + RS                   all_gather_into_tensor of the rows, reduce_scatter_tensor back
    raw + slot lookup             ... plus the local-slot lookup (one ``torch.take``) dispatch returns
    manager: AG x3 + RS           rows, weights and slot ids gathered as one coalesced launch through
                                  ``torch.distributed._coalescing_manager`` (what ``comm.gathered`` called before)
    direct:  AG x3 + RS           the same launch through the process group's coalesced all-gather (what
                                  ``comm.gathered`` calls now); these two rows differ only in the API path
    comm.gathered + lookup + RS   the package's gather (its checks and allocations included) and slot lookup
    packed: cat + AG + RS         the alternative: copy [slots | weights | row] into one buffer, one all-gather
    package dispatch + combine    ``dispatch(..., "replicate", static=True)`` + ``combine``
"""
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from ep_cases import Case, contiguous, time_eager, time_graph  # noqa: E402

from minimoe.parallel import init_process_group  # noqa: E402
from minimoe.parallel.comm import collectives_at_one_rank, gathered  # noqa: E402
from minimoe.parallel.routing import local_slots  # noqa: E402

folder = tempfile.mkdtemp()
device = init_process_group("nccl", 300, f"file://{folder}/r", 0, 1)
world = dist.group.WORLD
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # what comm uses
reduce_scatter = dist.reduce_scatter_tensor
print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
for tokens in (128, 4681):
    case = Case(tokens, "replicate", contiguous(1, 1), 0, 1, device, static=True)
    x, weights, slots, table = case.x, case.weights, case.slots, case.table
    everyone, mine = torch.empty_like(x), torch.empty_like(x)
    blocks = (slots, weights, x)
    packed = torch.empty(tokens, sum(b.shape[1] * b.element_size() for b in blocks), dtype=torch.uint8,
                         device=device)
    packed_everyone = torch.empty_like(packed)

    def raw():
        all_gather(everyone, x)
        reduce_scatter(mine, everyone)

    def raw_lookup():
        all_gather(everyone, x)
        local_slots(slots, table, 0)
        reduce_scatter(mine, everyone)

    def manager():
        outs = [torch.empty_like(b) for b in blocks]
        with distributed_c10d._coalescing_manager():
            for out, block in zip(outs, blocks):
                all_gather(out.view(torch.uint8), block.view(torch.uint8))
        reduce_scatter(mine, outs[2])

    def direct():
        outs = [torch.empty_like(b) for b in blocks]
        world.allgather_into_tensor_coalesced([o.view(torch.uint8) for o in outs],
                                              [b.view(torch.uint8) for b in blocks]).wait()
        reduce_scatter(mine, outs[2])

    def package_gather_lookup():
        got_slots, _, rows = gathered(list(blocks))
        local_slots(got_slots, table, 0)
        reduce_scatter(mine, rows)

    def packed_one():
        torch.cat([b.view(torch.uint8) for b in blocks], 1, out=packed)
        all_gather(packed_everyone, packed)
        reduce_scatter(mine, everyone)

    with collectives_at_one_rank():
        for name, fn in (("raw AG + RS", raw), ("raw + slot lookup", raw_lookup),
                         ("manager: AG x3 + RS", manager), ("direct:  AG x3 + RS", direct),
                         ("comm.gathered + lookup + RS", package_gather_lookup), ("packed: cat + AG + RS", packed_one),
                         ("package dispatch + combine", case.ours)):
            eager, graph = time_eager(fn, device, 50), time_graph(fn, device, 50)
            print(f"{tokens:5d} tokens  {name:28s} eager host {eager['host_us']:6.1f} µs  total "
                  f"{eager['total_us']:6.1f} µs   graph {graph.get('total_us', float('nan')):6.1f} µs", flush=True)
dist.destroy_process_group()
