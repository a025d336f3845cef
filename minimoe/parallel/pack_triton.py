"""Fill a leg's send buffer in one Triton kernel (CUDA): the three gathers of ``legs._send`` in one launch.

Row i of the packed buffer [slots int64 | weights float32 | row | pad] holds unit ``units[i]``'s entries and row
``rows[i]`` of x. PyTorch fills the three parts with three ``index_select`` calls, each a launch the host pays
2-10 µs for (on an H100 host) while the GPU copies a few kilobytes at decode size; this kernel gives each program
one buffer row and a block of ``BLOCK`` columns of x (the first block also copies the entries):

    out_rows[i, c] = x[rows[i], c]          out_slots[i, j] = slots[units[i], j]     out_weights[i, j] = weights[units[i], j]

Tested equal to the ``index_select`` calls (``tests/test_gpu_paths.py``).
"""
from __future__ import annotations

import torch

from minimoe.model.triton_launch import launch

try:  # Triton is optional: without it ``legs._send`` runs the three gathers
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 1024

if triton is not None:
    @triton.jit
    def _pack_kernel(units_ptr, rows_ptr, slots_ptr, weights_ptr, x_ptr, out_slots_ptr, out_weights_ptr,
                     out_rows_ptr, m, hidden, slots_stride, weights_stride, x_stride, out_slots_stride,
                     out_weights_stride, out_rows_stride, BLOCK: tl.constexpr, MP: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        row = tl.load(rows_ptr + i).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < hidden
        values = tl.load(x_ptr + row * x_stride + columns, mask=inside)
        tl.store(out_rows_ptr + i * out_rows_stride + columns, values, mask=inside)
        if tl.program_id(1) == 0:
            unit = tl.load(units_ptr + i).to(tl.int64)
            entries = tl.arange(0, MP)
            used = entries < m
            slots = tl.load(slots_ptr + unit * slots_stride + entries, mask=used)
            tl.store(out_slots_ptr + i * out_slots_stride + entries, slots, mask=used)
            weights = tl.load(weights_ptr + unit * weights_stride + entries, mask=used)
            tl.store(out_weights_ptr + i * out_weights_stride + entries, weights, mask=used)


def usable(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether :func:`pack` serves these: CUDA, Triton installed, and unit column strides."""
    return (triton is not None and x.is_cuda and x.stride(1) == 1 and slots.stride(1) == 1
            and weights.stride(1) == 1)


def pack(units: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, x: torch.Tensor,
         out_slots: torch.Tensor, out_weights: torch.Tensor, out_rows: torch.Tensor) -> None:
    """units, rows (n,) int64; slots (U, m) int64, weights (U, m) float32, x (R, H) -> writes out_slots (n, m),
    out_weights (n, m) and out_rows (n, H), views with unit column stride (the parts of a packed buffer).
    Raises RuntimeError without Triton."""
    if triton is None:
        raise RuntimeError("pack needs Triton (pip install triton)")
    count, hidden, m = units.shape[0], x.shape[1], slots.shape[1]
    if count == 0:
        return
    launch(_pack_kernel, (count, max(1, triton.cdiv(hidden, BLOCK))), units, rows, slots, weights, x, out_slots,
           out_weights, out_rows, m, hidden, slots.stride(0), weights.stride(0), x.stride(0), out_slots.stride(0),
           out_weights.stride(0), out_rows.stride(0), BLOCK=BLOCK, MP=triton.next_power_of_2(max(1, m)))
