"""Softmax top-k routing in one Triton kernel (CUDA, when no gradient is needed).

``router.softmax_topk`` runs as five PyTorch kernels after the router's matmul: a cast to float32, the softmax,
``torch.topk``, the sum of the kept weights and the division. At a few hundred tokens each costs the host more
than the GPU, so this kernel does all five for a block of tokens at once:

    p = softmax(logits) in float32          (stored: the load-balancing loss and the trace read it)
    k times: id = argmax p (first index on ties), w = p[id], then p[id] = -1
    w = w / Σ w                              when ``norm_topk_prob``

The same math as ``router.softmax_topk`` (Shazeer et al. 2017; Mixtral, Qwen3-MoE, OLMoE). Where two
probabilities are exactly equal ``torch.topk`` may keep either; this kernel keeps the lower expert id.
"""
from __future__ import annotations

import torch

from minimoe.model.triton_launch import launch

try:  # Triton is optional: without it the PyTorch ops run
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_EXPERTS = 1024  # a block of tokens holds every expert's logit in registers
TILE = 2048  # logits per program: BLOCK_T tokens x E (padded to a power of two)

if triton is not None:
    @triton.jit
    def _softmax_topk_kernel(logits_ptr, probs_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride,
                             TOP_K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr,
                             EP: tl.constexpr):
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols, ks = tl.arange(0, EP), tl.arange(0, KP)
        token_in = tokens[:, None] < num_tokens
        inside = token_in & (cols[None, :] < num_experts)
        logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * stride + cols[None, :], mask=inside,
                         other=-float("inf")).to(tl.float32)  # (BLOCK_T, EP)
        logits = tl.where(token_in, logits, 0.0)  # rows past the end: finite, never stored
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])  # padding columns: exp(-inf) = 0
        probs = shifted / tl.sum(shifted, axis=1)[:, None]
        tl.store(probs_ptr + tokens[:, None].to(tl.int64) * num_experts + cols[None, :], probs, mask=inside)
        remaining = tl.where(cols[None, :] < num_experts, probs, -1.0)
        top_w = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
        top_id = tl.zeros([BLOCK_T, KP], dtype=tl.int64)
        for j in tl.static_range(TOP_K):
            best = tl.argmax(remaining, axis=1, tie_break_left=True)  # (BLOCK_T,) the lowest id among equals
            value = tl.max(remaining, axis=1)
            top_w = tl.where(ks[None, :] == j, value[:, None], top_w)
            top_id = tl.where(ks[None, :] == j, best[:, None].to(tl.int64), top_id)
            remaining = tl.where(cols[None, :] == best[:, None], -1.0, remaining)
        if NORM:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # the unused columns hold 0
        kept = token_in & (ks[None, :] < TOP_K)
        offsets = tokens[:, None].to(tl.int64) * TOP_K + ks[None, :]
        tl.store(weights_ptr + offsets, top_w, mask=kept)
        tl.store(ids_ptr + offsets, top_id, mask=kept)


def usable(logits: torch.Tensor, top_k: int) -> bool:
    """Whether :func:`softmax_topk` serves these logits: a (T, E) CUDA tensor with unit column stride, E at most
    ``MAX_EXPERTS``, Triton installed and no gradient needed."""
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    return (triton is not None and logits.is_cuda and not needs_grad and logits.dim() == 2
            and logits.stride(1) == 1 and 1 <= top_k <= logits.shape[1] <= MAX_EXPERTS
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16))


def softmax_topk(logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True):
    """logits (T, E) float on CUDA -> (expert_ids (T, k) int64, weights (T, k) float32, probs (T, E) float32),
    as ``router.softmax_topk`` computes them (see the module docstring). Raises RuntimeError without Triton."""
    if triton is None:
        raise RuntimeError("softmax_topk needs Triton (pip install triton)")
    num_tokens, num_experts = logits.shape
    probs = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=logits.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens:
        ep = triton.next_power_of_2(num_experts)
        block_t = max(1, TILE // ep)
        launch(_softmax_topk_kernel, (triton.cdiv(num_tokens, block_t),), logits, probs, weights, ids, num_tokens,
               num_experts, logits.stride(0), TOP_K=top_k, KP=triton.next_power_of_2(top_k), NORM=norm_topk_prob,
               BLOCK_T=block_t, EP=ep)
    return ids, weights, probs
