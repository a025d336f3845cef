"""A small batch's SwiGLU experts in two Triton kernels that stream each expert's weights once (CUDA, no gradient).

At a few hundred tokens every expert's weights must be read (Mixtral-8x7B: 2.8 GB per layer) while the tokens
are a few MB, so the grouped experts are bound by the weights' bytes, and the best a kernel can do is read them
once at the card's copy rate. ``torch._grouped_mm``'s transposed products read them at 2.1-2.3 TB/s on an H100
whose copy runs at 3.0 TB/s (``benchmarks/results/moe_experts_kernels_h100.md``) and need three more kernels
around them (the gather of the rows, silu·mul, and the products' own setup). Here each expert's rows
[start_e, end_e) of the row layout (``grouped_layout_triton`` / ``route_layout_triton``) meet its weights in two
kernels:

    gate_up   hidden[s, :] = silu(x[source[s]] W_g^e) ⊙ (x[source[s]] W_u^e)      rows s of expert e
    down      out[s, :]    = hidden[s] W_d^e

A program owns one expert, one block of output columns and one block of at most ``MAX_BLOCK_M`` of the expert's
rows; for its rows it streams the matching columns of the expert's weights along K, accumulating in float32
(``tl.dot``). The host sizes the row blocks from the average rows per expert (``row_blocks``: 1.5x the average,
so most experts fit), and the programs of one block of columns, launched next to each other, read the same
weights at about the same time, so that the later reads can come from L2 cache rather than memory. An expert with more rows than its programs cover loops over further blocks. One program holding all of an
expert's rows would read the weights once too, but its 256-row tile makes the products compute-bound at 512
tokens (1.39 ms against 1.18 ms for the split blocks, measured in two leases of an H100, each kernel form at its
best tile).

The gather of the token rows is folded into ``gate_up``'s loads (``source``: a row index, T for a zero row),
and silu·mul into its epilogue, so gate and up never reach memory. The kernels compute in float32 and round
``hidden`` once, where the PyTorch path rounds gate and up to bfloat16 first: the two agree to bfloat16's
precision (``tests/test_gpu_paths.py``).

Each kernel is compiled for each row block size (a power of two) and for what Triton specializes integer
arguments on (divisibility by 16, the value 1), so the first call at a new batch size may pay Triton's compile:
warm up before capturing a CUDA graph. vLLM's fused MoE kernel [kwon2023vllm] tiles a small batch's experts the same way; this one
keeps only what a reader needs to follow it.
"""
from __future__ import annotations

import functools

import torch

from minimoe.model.triton_launch import launch

try:  # Triton is optional: without it the grouped products run through torch._grouped_mm
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Tiles per kernel: at most MAX_BLOCK_M rows of one expert per program, BLOCK_N output columns, BLOCK_K of the
# inner dimension per step, pipeline stages, warps: the fastest of a sweep at 512 tokens on an H100
# (``benchmarks/moe_experts_kernels.py --sweep``)
GATE_UP_TILES = dict(MAX_BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_stages=4, num_warps=8)
DOWN_TILES = dict(MAX_BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_stages=3, num_warps=8)

if triton is not None:
    @triton.jit
    def _expert_tile(ends_ptr, w_ptr, num_columns, stride_we, stride_wk, stride_wn, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """This program's expert rows [start, end), its block of output columns, and the (BLOCK_K, BLOCK_N)
        pointers of that expert's weights at k = 0 (grid: splits x column blocks x experts)."""
        expert = tl.program_id(2)
        end = tl.load(ends_ptr + expert)
        start = tl.load(ends_ptr + tl.maximum(expert - 1, 0)) * (expert > 0)  # expert 0 starts at row 0
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        return start, end, cols, cols < num_columns, ks, w_ptrs

    @triton.jit
    def _gate_up_kernel(x_ptr, source_ptr, ends_ptr, w_ptr, out_ptr, num_tokens, hidden, width,
                        stride_we, stride_wk, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        split, num_splits = tl.program_id(0), tl.num_programs(0)
        start, end, cols, col_in, ks, gate_ptrs = _expert_tile(ends_ptr, w_ptr, width, stride_we, stride_wk,
                                                               stride_wn, BLOCK_N, BLOCK_K)
        up_ptrs = gate_ptrs + width * stride_wn  # columns [F, 2F) of gate_up_proj
        for first in range(start + split * BLOCK_M, end, num_splits * BLOCK_M):  # this program's row blocks
            rows = first + tl.arange(0, BLOCK_M)
            source = tl.load(source_ptr + rows, mask=rows < end, other=num_tokens)
            token_in = source < num_tokens  # padding rows and rows past the group read zeros
            x_ptrs = x_ptr + source[:, None].to(tl.int64) * hidden + ks[None, :]
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, hidden, BLOCK_K):
                if EVEN_K:
                    a = tl.load(x_ptrs + k, mask=token_in[:, None], other=0.0)
                    w_gate = tl.load(gate_ptrs + k * stride_wk, mask=col_in[None, :], other=0.0)
                    w_up = tl.load(up_ptrs + k * stride_wk, mask=col_in[None, :], other=0.0)
                else:
                    k_in = (k + ks) < hidden
                    a = tl.load(x_ptrs + k, mask=token_in[:, None] & k_in[None, :], other=0.0)
                    w_gate = tl.load(gate_ptrs + k * stride_wk, mask=k_in[:, None] & col_in[None, :], other=0.0)
                    w_up = tl.load(up_ptrs + k * stride_wk, mask=k_in[:, None] & col_in[None, :], other=0.0)
                gate = tl.dot(a, w_gate, gate)
                up = tl.dot(a, w_up, up)
            hidden_tile = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up, in float32
            tl.store(out_ptr + rows[:, None].to(tl.int64) * width + cols[None, :],
                     hidden_tile.to(out_ptr.dtype.element_ty), mask=(rows < end)[:, None] & col_in[None, :])

    @triton.jit
    def _down_kernel(h_ptr, ends_ptr, w_ptr, out_ptr, width, hidden, stride_we, stride_wk, stride_wn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        split, num_splits = tl.program_id(0), tl.num_programs(0)
        start, end, cols, col_in, ks, w_ptrs = _expert_tile(ends_ptr, w_ptr, hidden, stride_we, stride_wk, stride_wn,
                                                            BLOCK_N, BLOCK_K)
        for first in range(start + split * BLOCK_M, end, num_splits * BLOCK_M):  # this program's row blocks
            rows = first + tl.arange(0, BLOCK_M)
            row_in = rows < end
            h_ptrs = h_ptr + rows[:, None].to(tl.int64) * width + ks[None, :]
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, width, BLOCK_K):
                if EVEN_K:
                    a = tl.load(h_ptrs + k, mask=row_in[:, None], other=0.0)
                    w = tl.load(w_ptrs + k * stride_wk, mask=col_in[None, :], other=0.0)
                else:
                    k_in = (k + ks) < width
                    a = tl.load(h_ptrs + k, mask=row_in[:, None] & k_in[None, :], other=0.0)
                    w = tl.load(w_ptrs + k * stride_wk, mask=k_in[:, None] & col_in[None, :], other=0.0)
                total = tl.dot(a, w, total)
            tl.store(out_ptr + rows[:, None].to(tl.int64) * hidden + cols[None, :],
                     total.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


def why_not(x: torch.Tensor, *weights: torch.Tensor) -> str | None:
    """None when :func:`swiglu_experts` can serve rows x with these weights, else what stops it: Triton, CUDA
    (compute capability 8.0 or newer), bfloat16 or float16 throughout, contiguous rows, no gradient needed (the
    kernels have no backward)."""
    if triton is None:
        return "Triton is not installed"
    if not x.is_cuda:
        return f"the rows are on {x.device.type}, not CUDA"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)):
        return "a gradient is needed and the kernels have no backward"
    if x.dtype not in (torch.bfloat16, torch.float16) or any(w.dtype != x.dtype for w in weights):
        return f"the rows and weights must all be bfloat16 or float16, got {x.dtype} and {[w.dtype for w in weights]}"
    if not x.is_contiguous():
        return "the rows are not contiguous"
    if _capability(x.device) < (8, 0):
        return f"compute capability {_capability(x.device)} is below 8.0"
    return None


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether :func:`swiglu_experts` serves rows x with these weights (:func:`why_not` says why not)."""
    return why_not(x, *weights) is None


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def row_blocks(num_entries: int, num_experts: int, most: int) -> tuple[int, int]:
    """(``BLOCK_M``, splits) for ``num_entries`` (token, expert) entries over ``num_experts`` experts: enough
    rows for 1.5x the average rows per expert, cut into ``splits`` blocks of ``BLOCK_M`` rows (a power of two
    from 16, ``tl.dot``'s smallest tile, to ``most``), one program each. The programs of one block of
    columns run side by side and read the same weights, so the second read comes from L2 cache."""
    want = max(1, -(-num_entries // max(1, num_experts)) * 3 // 2)
    block = max(16, min(most, triton.next_power_of_2(want)))
    return block, -(-want // block)


def swiglu_experts(x: torch.Tensor, source: torch.Tensor, group_ends: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, num_entries: int, gate_up_tiles: dict | None = None,
                   down_tiles: dict | None = None) -> torch.Tensor:
    """x (T, H) token rows, source (S',) int64 (the token of each product row, T for a zero row), group_ends (E,)
    int32 (where each expert's rows end, as ``grouped_layout_triton`` builds them), gate_up_proj (E, H, 2F),
    down_proj (E, F, H) -> out (S', H) in x's dtype: row s is expert e's SwiGLU of x[source[s]] for the e whose
    rows hold s; rows after group_ends[-1] are left undefined. ``num_entries``: the (token, expert) entries laid
    out (T·k), which sets the row block. ``gate_up_tiles`` / ``down_tiles``: tiles other than ``GATE_UP_TILES`` /
    ``DOWN_TILES`` (the benchmark's sweep). The caller checks :func:`usable` first (CUDA, bf16 or fp16, contiguous
    x) and passes the layout's tensors as built. Raises RuntimeError without Triton."""
    if triton is None:
        raise RuntimeError("swiglu_experts needs Triton (pip install triton)")
    num_experts, hidden, width = gate_up_proj.shape[0], gate_up_proj.shape[1], down_proj.shape[1]
    size = source.shape[0]
    inner = torch.empty(size, width, dtype=x.dtype, device=x.device)  # (S', F)
    out = torch.empty(size, hidden, dtype=x.dtype, device=x.device)  # (S', H)
    if size == 0:
        return out
    tiles = dict(GATE_UP_TILES if gate_up_tiles is None else gate_up_tiles)
    block_m, splits = row_blocks(num_entries, num_experts, tiles.pop("MAX_BLOCK_M"))
    launch(_gate_up_kernel, (splits, triton.cdiv(width, tiles["BLOCK_N"]), num_experts), x, source, group_ends,
           gate_up_proj, inner, x.shape[0], hidden, width, *gate_up_proj.stride(), BLOCK_M=block_m,
           EVEN_K=hidden % tiles["BLOCK_K"] == 0, **tiles)
    tiles = dict(DOWN_TILES if down_tiles is None else down_tiles)
    block_m, splits = row_blocks(num_entries, num_experts, tiles.pop("MAX_BLOCK_M"))
    launch(_down_kernel, (splits, triton.cdiv(hidden, tiles["BLOCK_N"]), num_experts), inner, group_ends, down_proj,
           out, width, hidden, *down_proj.stride(), BLOCK_M=block_m, EVEN_K=width % tiles["BLOCK_K"] == 0, **tiles)
    return out
