"""A weighted gather-sum in one Triton kernel, for CUDA when no gradient is needed.

    out[i, :] = Σ_j w[i, j] · table[index[i, j], :]        index (N, m) int64, w (N, m), table (R, C) -> (N, C)

``torch.nn.functional.embedding_bag`` (mode "sum" with per-sample weights) computes the same thing and is what
the package uses everywhere else, but its CUDA kernel reads the table one element per thread: on wide rows
(C in the thousands, bf16) it runs well below the card's bandwidth, and combine sums every token's rows with
it. This kernel gives each program one output row and a block of ``BLOCK_C`` columns, loads whole vectors of a
table row at a time and accumulates in float32. Cells whose weight is 0 are skipped, so they read nothing
(``embedding_bag`` multiplies them by 0, which turns an inf or NaN in an unrelated row into NaN).

A column-major table (the transposed grouped product's output, ``grouped_mm_t``) is summed by a second kernel
that gives each program a tile of ``TILE_ROWS`` output rows x ``TILE_COLUMNS`` columns: one output row reads one
element per 32-byte sector of such a table, while a tile's rows point at neighbouring table rows (the entries of
one expert sit side by side in token order), so one sector serves several of them.

``gather_rows`` runs the row kernel with one cell per row and no weights, a position outside the table
reading a zero row: the grouped experts gather their rows in expert order with it.

The kernels are forward-only; training keeps ``embedding_bag``, whose backward PyTorch provides. Their results equal
``embedding_bag``'s up to float32 summation order (``tests/test_gpu_paths.py``).
"""
from __future__ import annotations

import functools

import torch

from minimoe.model.triton_launch import launch

BLOCK_C = 1024
COLUMN_MAJOR_MAX_BYTES = 16 << 20
TILE_ROWS, TILE_COLUMNS = 128, 32  # the column-major kernel's tile (the fastest of nine at 512 tokens on an H100)


@functools.lru_cache(maxsize=1)
def _kernel():
    """The compiled kernel, or None when Triton is not installed (imported on first use: Triton is optional)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def bag_sum_kernel(index_ptr, weight_ptr, table_ptr, out_ptr, m, num_columns, row_stride, column_stride,
                       out_stride, num_table_rows, HAS_WEIGHTS: tl.constexpr, ZERO_OUTSIDE: tl.constexpr,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < num_columns
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(m):
            position = tl.load(index_ptr + row * m + j).to(tl.int64)
            weight = tl.load(weight_ptr + row * m + j).to(tl.float32) if HAS_WEIGHTS else 1.0
            if ZERO_OUTSIDE:  # a position outside the table reads a zero row
                weight = tl.where((position >= 0) & (position < num_table_rows), weight, 0.0)
            if weight != 0.0:  # a cell not sent: read nothing
                values = tl.load(table_ptr + position * row_stride + columns * column_stride, mask=inside, other=0.0)
                total += weight * values.to(tl.float32)
        tl.store(out_ptr + row * out_stride + columns, total.to(out_ptr.dtype.element_ty), mask=inside)

    return bag_sum_kernel


@functools.lru_cache(maxsize=1)
def _tiled_kernel():
    """The column-major kernel (a tile of output rows x columns per program), or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def bag_sum_tiled_kernel(index_ptr, weight_ptr, table_ptr, out_ptr, num_rows, m, num_columns, row_stride,
                             column_stride, out_stride, HAS_WEIGHTS: tl.constexpr, ROWS: tl.constexpr,
                             COLUMNS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        columns = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
        row_in, column_in = rows < num_rows, columns < num_columns
        total = tl.zeros([ROWS, COLUMNS], dtype=tl.float32)
        for j in range(m):
            cell = rows.to(tl.int64) * m + j
            position = tl.load(index_ptr + cell, mask=row_in, other=0).to(tl.int64)
            weight = tl.load(weight_ptr + cell, mask=row_in, other=0).to(tl.float32) if HAS_WEIGHTS else \
                tl.where(row_in, 1.0, 0.0)
            read = (weight[:, None] != 0.0) & column_in[None, :]  # a cell not sent (or past the end): no read
            values = tl.load(table_ptr + position[:, None] * row_stride + columns[None, :] * column_stride,
                             mask=read, other=0.0)
            total += weight[:, None] * values.to(tl.float32)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * out_stride + columns[None, :],
                 total.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & column_in[None, :])

    return bag_sum_tiled_kernel


def usable(index: torch.Tensor, table: torch.Tensor, weights: torch.Tensor | None) -> bool:
    """Whether :func:`bag_sum_triton` can run here: CUDA tensors, Triton installed, no gradient needed, and a
    table whose rows are contiguous or small enough to stay in L2 cache (a column-major table, such as the
    transposed grouped product's output, is read in scattered sectors even by the tiled kernel)."""
    needs_grad = torch.is_grad_enabled() and (table.requires_grad or (weights is not None and weights.requires_grad))
    small = table.numel() * table.element_size() <= COLUMN_MAJOR_MAX_BYTES
    return (table.is_cuda and not needs_grad and table.dim() == 2 and (table.stride(1) == 1 or small)
            and table.dtype in (torch.float32, torch.bfloat16, torch.float16) and _kernel() is not None)


def bag_sum_triton(index: torch.Tensor, table: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = Σ_j weights[i, j] · table[index[i, j]] (no weights: a plain sum); index (N, m) integer, table
    (R, C) with any strides, weights (N, m) float or bool -> (N, C) in table's dtype. Positions must lie in
    [0, R) wherever the weight is not 0. Raises RuntimeError when Triton is not installed."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("bag_sum_triton needs Triton (pip install triton)")
    num_rows, m = index.shape
    out = table.new_empty(num_rows, table.shape[1])
    if num_rows == 0 or table.shape[1] == 0:
        return out
    index = index if index.is_contiguous() else index.contiguous()  # (checked first: every op costs the host)
    weights_arg = index if weights is None else weights if weights.is_contiguous() else weights.contiguous()
    if weights_arg.dtype == torch.bool:
        weights_arg = weights_arg.view(torch.uint8)
    if table.stride(0) == 1 and table.shape[1] > 1:  # column-major: tiles of rows share the sectors they read
        grid = (-(-num_rows // TILE_ROWS), -(-table.shape[1] // TILE_COLUMNS))
        launch(_tiled_kernel(), grid, index, weights_arg, table, out, num_rows, m, table.shape[1], table.stride(0),
               table.stride(1), out.stride(0), HAS_WEIGHTS=weights is not None, ROWS=TILE_ROWS, COLUMNS=TILE_COLUMNS)
        return out
    grid = (num_rows, -(-table.shape[1] // BLOCK_C))
    launch(kernel, grid, index, weights_arg, table, out, m, table.shape[1], table.stride(0), table.stride(1),
           out.stride(0), table.shape[0], HAS_WEIGHTS=weights is not None, ZERO_OUTSIDE=False, BLOCK=BLOCK_C)
    return out


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = table[index[i]], or a zero row where index[i] lies outside [0, R): table (R, C) with any
    strides, index (S,) integer -> (S, C) in table's dtype. One kernel where ``torch.cat`` of a zero row and
    ``index_select`` take three. Raises RuntimeError when Triton is not installed."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("gather_rows needs Triton (pip install triton)")
    out = table.new_empty(index.shape[0], table.shape[1])
    if index.shape[0] and table.shape[1]:
        index = index if index.is_contiguous() else index.contiguous()
        launch(kernel, (index.shape[0], -(-table.shape[1] // BLOCK_C)), index, index, table, out, 1, table.shape[1],
               table.stride(0), table.stride(1), out.stride(0), table.shape[0], HAS_WEIGHTS=False, ZERO_OUTSIDE=True,
               BLOCK=BLOCK_C)
    return out
