"""The grouped experts' row layout in two Triton kernels (CUDA): a counting sort by expert, no ``torch.sort``.

``grouped.grouped_experts`` puts the P = N·m entries in expert order before its grouped products: expert e's
entries in rows [start_e, end_e), each group padded to a multiple of ``align`` rows (``grouped_mm_t`` needs
16-byte aligned groups). In PyTorch that is a sort, a search, and some twenty small ops, each a kernel launch
the host pays 15-35 µs for: at a few hundred tokens the host, not the GPU, sets the pace. A counting sort
does it in two launches, as the send plan of expert parallelism does (``minimoe.parallel.sendplan_triton``),
with the experts as the columns. Entries are cut into blocks of ``BLOCK`` (one program each):

    kernel 1   totals[b, e] = entries of block b with id e (id E = no expert: column E)
    kernel 2   whole[e] (all blocks) and before[e] (blocks before this one); padded group sizes
               padded[e] = ceil(whole[e] / align) · align, where the last expert's group also holds the
               no-expert entries (after its own); starts = exclusive cumsum of padded; then
               place[p] = starts[e] + before[e] + (entries of id e before p in the block)   (stable: the order
               of the entries inside a group is their order in the batch, as a stable sort gives)
               source[place[p]] = p // m, or the zero row N for a no-expert entry; group_ends = cumsum(padded)

Rows of a group beyond its entries read the zero row (the first program writes N there, and after the last
group), and so do the no-expert entries: every product row is computed and those rows come out 0, so nothing
needs masking. The rows themselves are gathered by ``bag_sum_triton.gather_rows`` (N: a zero row).
"""
from __future__ import annotations

import torch

from minimoe.model.triton_launch import launch

try:  # Triton is optional: without it ``grouped.grouped_experts`` sorts with PyTorch ops
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_SCAN = 1 << 16  # block totals each program of the second kernel reads

if triton is not None:
    @triton.jit
    def _ids(ids_ptr, entries, num_entries, num_experts, cols):
        """(BLOCK, EP) int32: does entry p (of ``entries``) have the id of column c (c = E: no expert)."""
        ids = tl.load(ids_ptr + entries, mask=entries < num_entries, other=-1)
        ids = tl.where((ids < 0) | (ids > num_experts), -1, ids)  # padding lanes: no column
        return (ids[:, None] == cols[None, :]).to(tl.int32)

    @triton.jit
    def _totals_kernel(ids_ptr, num_entries, num_experts, totals_ptr, BLOCK: tl.constexpr, EP: tl.constexpr):
        block = tl.program_id(0)
        cols = tl.arange(0, EP)
        hit = _ids(ids_ptr, block * BLOCK + tl.arange(0, BLOCK), num_entries, num_experts, cols)
        tl.store(totals_ptr + block * EP + cols, tl.sum(hit, axis=0))

    @triton.jit
    def _layout_kernel(ids_ptr, num_entries, num_experts, m, num_rows, align, size, totals_ptr, num_blocks,
                       place_ptr, source_ptr, ends_ptr, BLOCK: tl.constexpr, EP: tl.constexpr, SCAN: tl.constexpr):
        block = tl.program_id(0)
        cols = tl.arange(0, EP)
        whole = tl.zeros([EP], dtype=tl.int32)
        before = tl.zeros([EP], dtype=tl.int32)
        for start in range(0, num_blocks, SCAN):
            ids = start + tl.arange(0, SCAN)
            totals = tl.load(totals_ptr + ids[:, None] * EP + cols[None, :], mask=ids[:, None] < num_blocks, other=0)
            whole += tl.sum(totals, axis=0)
            before += tl.sum(tl.where(ids[:, None] < block, totals, 0), axis=0)
        invalid = tl.sum(tl.where(cols == num_experts, whole, 0), axis=0)
        group = whole + tl.where(cols == num_experts - 1, invalid, 0)  # the last group also holds no-expert rows
        padded = tl.where(cols < num_experts, (group + align - 1) // align * align, 0)
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        if block == 0:  # the group ends, and the zero row for every row no entry lands in
            tl.store(ends_ptr + cols, ends, mask=cols < num_experts)
            for j in range(0, align):  # a group's padding: rows [start + entries, end)
                tl.store(source_ptr + starts + group + j, (num_rows + cols * 0).to(tl.int64),
                         mask=(cols < num_experts) & (starts + group + j < ends))
            for tail in range(tl.sum(tl.where(cols == num_experts - 1, ends, 0), axis=0), size, BLOCK):
                rows = tail + tl.arange(0, BLOCK)  # after the last group
                tl.store(source_ptr + rows, (num_rows + rows * 0).to(tl.int64), mask=rows < size)
        last = tl.sum(tl.where(cols == num_experts - 1, starts + whole, 0), axis=0)  # after the last expert's own
        starts = tl.where(cols == num_experts, last, starts)
        entries = block * BLOCK + tl.arange(0, BLOCK)
        hit = _ids(ids_ptr, entries, num_entries, num_experts, cols)
        position = starts[None, :] + before[None, :] + tl.cumsum(hit, axis=0) - hit  # (BLOCK, EP)
        place = tl.sum(tl.where(hit > 0, position, 0), axis=1)  # (BLOCK,) each entry hits one column
        inside = entries < num_entries
        tl.store(place_ptr + entries, place.to(tl.int64), mask=inside)
        valid = tl.sum(tl.where(cols[None, :] < num_experts, hit, 0), axis=1) > 0
        tl.store(source_ptr + place, tl.where(valid, entries // m, num_rows).to(tl.int64), mask=inside)


def usable(expert_ids: torch.Tensor, num_experts: int) -> bool:
    """Whether :func:`grouped_layout_triton` serves this batch: CUDA, Triton installed, and a scan of the block
    totals small enough for every program to read (blocks x experts ≤ ``MAX_SCAN``; larger batches keep the
    sort, whose host cost they amortise)."""
    if not expert_ids.is_cuda or triton is None:
        return False
    num_blocks = -(-expert_ids.numel() // _block(num_experts))
    return num_blocks * triton.next_power_of_2(num_experts + 1) <= MAX_SCAN


def _block(num_experts: int) -> int:
    return max(32, 8192 // triton.next_power_of_2(num_experts + 1))


def grouped_layout_triton(expert_ids: torch.Tensor, num_experts: int, num_rows: int, align: int, size: int):
    """expert_ids (N, m) int64 in [0, E] (E = no expert) -> (place (N·m,) int64 the product row of each entry,
    group_ends (E,) int32, source (size,) int64 the input row of each product row, N for a zero row).
    ``size`` must bound the padded rows: N·m + (align - 1)·E. Raises RuntimeError without Triton."""
    if triton is None:
        raise RuntimeError("grouped_layout_triton needs Triton (pip install triton)")
    flat = expert_ids.reshape(-1).contiguous()
    num_entries, m = flat.numel(), expert_ids.shape[1]
    ep, block = triton.next_power_of_2(num_experts + 1), _block(num_experts)
    num_blocks = max(1, -(-num_entries // block))
    device = flat.device
    totals = torch.empty(num_blocks, ep, dtype=torch.int32, device=device)
    place = torch.empty(num_entries, dtype=torch.int64, device=device)
    source = torch.empty(size, dtype=torch.int64, device=device)  # every row written by the second kernel
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    launch(_totals_kernel, (num_blocks,), flat, num_entries, num_experts, totals, BLOCK=block, EP=ep)
    launch(_layout_kernel, (num_blocks,), flat, num_entries, num_experts, m, num_rows, align, size, totals,
           num_blocks, place, source, ends, BLOCK=block, EP=ep, SCAN=64)
    return place, ends, source
