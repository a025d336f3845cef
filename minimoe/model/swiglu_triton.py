"""SwiGLU's elementwise step, silu(gate) ⊙ up, in one Triton kernel (CUDA, when no gradient is needed).

PyTorch runs ``F.silu(gate) * up`` as two kernels and writes the silu in between: three reads and two writes
of an (S, F) tensor where one read of each input and one write suffice. At a few hundred tokens the grouped
experts are bound by their weights, and these passes are a few percent of the layer. The kernel computes
in float32 and rounds once (PyTorch rounds the silu to the input dtype before the product), so in bfloat16
the two differ by about one unit in the last place.
"""
from __future__ import annotations

import torch

from minimoe.model.triton_launch import launch

try:  # Triton is optional: without it the PyTorch ops run
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 2048

if triton is not None:
    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, size, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < size
        gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty), mask=inside)


def usable(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether :func:`silu_mul` serves these: contiguous CUDA tensors of one shape, Triton, no gradient."""
    needs_grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    return (triton is not None and gate.is_cuda and not needs_grad and gate.shape == up.shape
            and gate.is_contiguous() and up.is_contiguous() and gate.dtype == up.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for contiguous tensors of one shape and dtype -> a new contiguous tensor of that shape.
    Raises RuntimeError without Triton."""
    if triton is None:
        raise RuntimeError("silu_mul needs Triton (pip install triton)")
    out = torch.empty_like(gate)
    if gate.numel():
        launch(_silu_mul_kernel, (triton.cdiv(gate.numel(), BLOCK),), gate, up, out, gate.numel(), BLOCK=BLOCK)
    return out
