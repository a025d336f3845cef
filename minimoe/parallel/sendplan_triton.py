"""A leg's send plan in two Triton kernels (CUDA), the same plan ``sendplan.plan`` builds from a dozen PyTorch ops.

On a GPU every eager op costs the host microseconds to launch (2-10 µs for a PyTorch op on an H100 host, 14-35
µs for a Triton launch, depending on the host), far more than the kernel takes at decode size, and
the plan is about a dozen of them (the grid, its column-major cumulative sum, the counts, the positions, the
send list). DeepEP computes its dispatch layout in one kernel for the same reason; this is that idea in
miniature. The units are cut into blocks of ``BLOCK_U``, one program per block:

    kernel 1   totals[b, c] = hit cells of block b in column c (columns in ``rank_first`` order: this rank,
               then the others in rank order)
    kernel 2   every program sums the totals: whole[c] over all blocks, before[c] over the blocks before its own
               (a leg of at most ``BLOCK_U`` units, a decode batch say, is one block: kernel 1 is skipped);
               the column starts in the return table are the exclusive cumsum of whole, so
               position[u, c] = start[c] + before[c] + (hit cells of column c before unit u in the block)
               send[(position - n_self) mod n_total] = u              the send list [for other ranks | kept]
               and block 0 writes ``counts`` (= whole) in rank order, for the count exchange

Unit u hits rank d when one of its entries ``dest[u, j] // divisor`` equals d (entries < 0 are none); cells not
hit get position 0. The outputs equal ``sendplan.plan`` exactly (``tests/test_gpu_paths.py``).
"""
from __future__ import annotations

import torch

from minimoe.model.triton_launch import launch

BLOCK_U = 256
SCAN_BLOCKS = 64
MAX_SCAN = 1 << 16  # block totals each program of the second kernel reads


try:  # Triton is optional: without it (or without CUDA) the PyTorch ops in ``sendplan`` build every plan
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _hits(dest_ptr, units, divisor, num_units, col_rank, M: tl.constexpr, BLOCK: tl.constexpr,
              GP: tl.constexpr):
        """(BLOCK, GP) int32: does unit u (of ``units``) reach the rank of column c."""
        hit = tl.zeros([BLOCK, GP], dtype=tl.int32)
        for j in tl.static_range(M):
            dest = tl.load(dest_ptr + units.to(tl.int64) * M + j, mask=units < num_units, other=-1)
            rank = tl.where(dest >= 0, dest // divisor, -1)
            hit = tl.maximum(hit, (rank[:, None] == col_rank[None, :]).to(tl.int32))
        return hit

    @triton.jit
    def _columns(rank, num_gpus, GP: tl.constexpr):
        cols = tl.arange(0, GP)
        col_rank = tl.where(cols == 0, rank, tl.where(cols <= rank, cols - 1, cols))  # rank_first order
        return cols, tl.where(cols < num_gpus, col_rank, -2)  # padding columns match nothing

    @triton.jit
    def _block_totals_kernel(dest_ptr, divisor, num_units, rank, num_gpus, totals_ptr, M: tl.constexpr,
                             BLOCK: tl.constexpr, GP: tl.constexpr):
        block = tl.program_id(0)
        cols, col_rank = _columns(rank, num_gpus, GP)
        units = block * BLOCK + tl.arange(0, BLOCK)
        hit = _hits(dest_ptr, units, divisor, num_units, col_rank, M, BLOCK, GP)
        tl.store(totals_ptr + block * GP + cols, tl.sum(hit, axis=0))

    @triton.jit
    def _plan_kernel(dest_ptr, divisor, num_units, rank, num_gpus, totals_ptr, num_blocks, counts_ptr, position_ptr,
                     mask_ptr, send_ptr, one_position_ptr, one_mask_ptr, send_rows_ptr, M: tl.constexpr,
                     BLOCK: tl.constexpr, GP: tl.constexpr, SCAN: tl.constexpr, PAIRS: tl.constexpr,
                     ONE_BLOCK: tl.constexpr):
        block = tl.program_id(0)
        cols, col_rank = _columns(rank, num_gpus, GP)
        col_ok = cols < num_gpus
        units = block * BLOCK + tl.arange(0, BLOCK)
        hit = _hits(dest_ptr, units, divisor, num_units, col_rank, M, BLOCK, GP)
        whole = tl.zeros([GP], dtype=tl.int32)  # hit cells per column, all blocks
        before = tl.zeros([GP], dtype=tl.int32)  # ... in the blocks before this one
        if ONE_BLOCK:  # one program sees every unit: no totals to read (and no first kernel)
            whole = tl.sum(hit, axis=0)
        else:
            for start in range(0, num_blocks, SCAN):
                ids = start + tl.arange(0, SCAN)
                totals = tl.load(totals_ptr + ids[:, None] * GP + cols[None, :], mask=ids[:, None] < num_blocks,
                                 other=0)
                whole += tl.sum(totals, axis=0)
                before += tl.sum(tl.where(ids[:, None] < block, totals, 0), axis=0)
        n_self = tl.sum(tl.where(cols == 0, whole, 0), axis=0)
        n_total = tl.sum(whole, axis=0)
        tl.store(counts_ptr + col_rank, whole.to(tl.int64), mask=col_ok & (cols * 0 + block == 0))  # block 0 only
        running = tl.cumsum(whole, axis=0) - whole + before  # the column's start in the table + earlier blocks
        position = running[None, :] + tl.cumsum(hit, axis=0) - hit
        cell = units[:, None].to(tl.int64) * num_gpus + cols[None, :]
        inside = (units[:, None] < num_units) & col_ok[None, :]
        tl.store(position_ptr + cell, tl.where(hit > 0, position, 0).to(tl.int64), mask=inside)
        tl.store(mask_ptr + cell, hit.to(tl.int8), mask=inside)
        send = tl.where(position >= n_self, position - n_self, position + n_total - n_self)
        tl.store(send_ptr + send, tl.broadcast_to(units[:, None], (BLOCK, GP)).to(tl.int64), mask=inside & (hit > 0))
        if PAIRS > 0:  # units are the PAIRS pairs of each row, each reaching one rank at most
            tl.store(send_rows_ptr + send, tl.broadcast_to(units[:, None] // PAIRS, (BLOCK, GP)).to(tl.int64),
                     mask=inside & (hit > 0))
            one = units < num_units
            tl.store(one_position_ptr + units, tl.sum(tl.where(hit > 0, position, 0), axis=1).to(tl.int64), mask=one)
            tl.store(one_mask_ptr + units, tl.max(hit, axis=1).to(tl.int8), mask=one)


def usable(dest: torch.Tensor, num_gpus: int) -> bool:
    """Whether :func:`plan_triton` serves this leg: a CUDA tensor, Triton installed, and a scan of the block
    totals small enough for every program to read (blocks x ranks ≤ ``MAX_SCAN``; larger legs are bound by
    their payload and keep the PyTorch ops)."""
    if not dest.is_cuda or triton is None:
        return False
    return -(-dest.shape[0] // BLOCK_U) * triton.next_power_of_2(num_gpus) <= MAX_SCAN


def plan_triton(dest: torch.Tensor, divisor: int, num_gpus: int, rank: int, pairs_of: int = 0):
    """dest (U, m) integer entries (< 0 = none), unit u reaching rank ``dest[u, j] // divisor`` -> the leg's
    (counts (G,) int64 in rank order, mask (U, G) bool and position (U, G) int64 in ``rank_first`` column order,
    send list (U·G,) int64 whose first n_total entries are [for other ranks | kept], extra), all on the device in
    two launches, one for at most ``BLOCK_U`` units (``sendplan.plan_for`` wraps them in a ``Plan``).
    ``pairs_of`` = k > 0 says the units are the k pairs of each row, each reaching one rank at most (m = 1);
    extra is then (position (U, 1) int64 and mask (U, 1) bool of each unit's one cell, the send list's rows =
    units // k), else None. Raises RuntimeError without Triton."""
    if triton is None:
        raise RuntimeError("plan_triton needs Triton (pip install triton)")
    num_units, m = dest.shape
    device = dest.device
    gp = triton.next_power_of_2(num_gpus)
    num_blocks = max(1, -(-num_units // BLOCK_U))
    cells = num_units * num_gpus
    pairs, row_cells = (num_units, cells) if pairs_of else (0, 0)  # the extras' sizes
    sizes = [num_gpus, cells, cells, pairs, row_cells]  # one allocation for the int64 outputs (every op costs the host)
    counts, position, send, one_position, send_rows = torch.empty(sum(sizes), dtype=torch.int64,
                                                                  device=device).split(sizes)
    position = position.view(num_units, num_gpus)
    mask, one_mask = torch.empty(cells + pairs, dtype=torch.bool, device=device).split([cells, pairs])
    mask, one_mask = mask.view(num_units, num_gpus), one_mask.view(pairs, 1)
    dest = dest if dest.is_contiguous() else dest.contiguous()
    totals = counts  # one block: the plan kernel reads no totals (any pointer will do)
    if num_blocks > 1:
        totals = torch.empty(num_blocks, gp, dtype=torch.int32, device=device)
        launch(_block_totals_kernel, (num_blocks,), dest, divisor, num_units, rank, num_gpus, totals, M=m,
               BLOCK=BLOCK_U, GP=gp)
    launch(_plan_kernel, (num_blocks,), dest, divisor, num_units, rank, num_gpus, totals, num_blocks, counts,
           position, mask.view(torch.int8), send, one_position, one_mask.view(torch.int8), send_rows, M=m,
           BLOCK=BLOCK_U, GP=gp, SCAN=SCAN_BLOCKS, PAIRS=pairs_of, ONE_BLOCK=num_blocks == 1)
    extra = ((one_position.view(num_units, 1), one_mask), send_rows) if pairs_of else None
    return counts, mask, position, send, extra
