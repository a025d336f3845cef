"""Softmax top-k routing and the grouped experts' row layout in one Triton program (CUDA, small batches).

At a few hundred tokens the MoE layer is host-bound: the GPU waits while the host enqueues the router, the
layout and the gather before the first grouped product can start, and each Triton launch costs the host far
more than the GPU. When the whole batch's router scores fit one program (tokens x experts, each padded to a
power of two, ≤ ``MAX_CELLS``: up to 1,024 tokens of 8 experts), this kernel does in one launch what
``router_triton`` and ``grouped_layout_triton`` do in three:

    p = softmax(logits);  k times: id = argmax p (lowest id on ties), w = p[id], p[id] = -1
    w /= Σ w                                                            when ``norm_topk_prob``
    chosen[t, e] = 1 if token t picked e                               (T, E), a token picks e at most once
    padded[e]    = ceil(Σ_t chosen[t, e] / align) · align;   starts = exclusive cumsum of padded
    place(t, j)  = starts[e] + Σ_{t' < t} chosen[t', e]   with e = id(t, j)
    source[place(t, j)] = t;   every other row below ``size`` reads the zero row T

Because a token picks each expert at most once, "earlier tokens that chose e" is the same stable order
(entries of a group in batch order) as ``grouped_layout_triton``'s counting sort, so the outputs are equal
(``tests/test_gpu_paths.py``). This path is dropless only: no entry is "no expert".

One program runs on one streaming multiprocessor, which is why the batch must be small: at 512 tokens of 8
experts it takes 9 µs on an H100 against 15 µs for the three kernels, and 47 µs of host time against 93
(``benchmarks/results/moe_kernels_h100.md``). It is compiled once per power-of-two token count, so the first call
at each new batch size pays Triton's compile.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from minimoe.model import router_triton
from minimoe.model.triton_launch import launch

try:  # Triton is optional: without it the router and the layout run their own paths
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class RowLayout(NamedTuple):
    """The grouped experts' row layout, built by the kernel below for the ids the router chose (carried in
    ``RoutingResult.layout``, read by ``minimoe.model.grouped.grouped_experts``)."""

    place: torch.Tensor  # (T·k,) int64: the product row of entry (t, j) = t·k + j
    group_ends: torch.Tensor  # (E,) int32: where each expert's (padded) rows end
    source: torch.Tensor  # (S',) int64: the input row of each product row, T for a zero row
    expert_ids: torch.Tensor  # (T, k): the ids it was built for
    ids_version: int | None  # expert_ids._version then (None under inference mode, which keeps no counter)

    def matches(self, expert_ids: torch.Tensor) -> bool:
        """Whether this layout still describes ``expert_ids``: the same tensor, not edited in place since. A
        forward hook or a learner's ablation that replaces the routing gets a fresh layout, not a stale one.
        Under ``torch.inference_mode`` tensors keep no version counter, so there an in-place edit of the ids
        goes unseen: replace ``expert_ids`` instead of editing it."""
        if expert_ids is not self.expert_ids:
            return False
        return self.ids_version is None or expert_ids._version == self.ids_version


def ids_version(expert_ids: torch.Tensor) -> int | None:
    """``expert_ids._version``, or None for an inference tensor (it keeps no version counter)."""
    return None if expert_ids.is_inference() else expert_ids._version


MAX_CELLS = 8192  # tokens x experts (both padded to powers of two) one program holds in registers
NUM_WARPS = 8  # 32 cells per thread at MAX_CELLS: several (T, E) tensors stay live without spilling

if triton is not None:
    @triton.jit
    def _route_layout_kernel(logits_ptr, stride, num_tokens, num_experts, align, size, probs_ptr, weights_ptr,
                             ids_ptr, place_ptr, source_ptr, ends_ptr, TOP_K: tl.constexpr, KP: tl.constexpr,
                             NORM: tl.constexpr, BLOCK_T: tl.constexpr, EP: tl.constexpr, PAD: tl.constexpr):
        tokens, cols, ks = tl.arange(0, BLOCK_T), tl.arange(0, EP), tl.arange(0, KP)
        token_in = tokens < num_tokens
        is_expert = cols < num_experts
        inside = token_in[:, None] & is_expert[None, :]
        # the router: softmax in float32, then k rounds of argmax
        logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * stride + cols[None, :], mask=inside,
                         other=-float("inf")).to(tl.float32)  # (BLOCK_T, EP)
        logits = tl.where(token_in[:, None], logits, 0.0)  # rows past the end: finite, never stored
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = shifted / tl.sum(shifted, axis=1)[:, None]
        tl.store(probs_ptr + tokens[:, None].to(tl.int64) * num_experts + cols[None, :], probs, mask=inside)
        remaining = tl.where(is_expert[None, :], probs, -1.0)
        chosen = tl.zeros([BLOCK_T, EP], dtype=tl.int32)
        top_w = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
        top_id = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.argmax(remaining, axis=1, tie_break_left=True)  # (BLOCK_T,)
            top_w = tl.where(ks[None, :] == j, tl.max(remaining, axis=1)[:, None], top_w)
            top_id = tl.where(ks[None, :] == j, best[:, None], top_id)
            hit = cols[None, :] == best[:, None]
            chosen += hit.to(tl.int32)
            remaining = tl.where(hit, -1.0, remaining)
        if NORM:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        kept = token_in[:, None] & (ks[None, :] < TOP_K)
        cells = tokens[:, None].to(tl.int64) * TOP_K + ks[None, :]
        tl.store(weights_ptr + cells, top_w, mask=kept)
        tl.store(ids_ptr + cells, top_id.to(tl.int64), mask=kept)
        # the layout: a counting sort by expert, columns = experts
        chosen = tl.where(token_in[:, None], chosen, 0)
        whole = tl.sum(chosen, axis=0)  # (EP,) entries per expert
        padded = tl.where(is_expert, (whole + align - 1) // align * align, 0)
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        tl.store(ends_ptr + cols, ends, mask=is_expert)
        position = starts[None, :] + tl.cumsum(chosen, axis=0) - chosen  # (BLOCK_T, EP) if t chose e
        for j in tl.static_range(TOP_K):
            id_j = tl.sum(tl.where(ks[None, :] == j, top_id, 0), axis=1)  # (BLOCK_T,)
            place = tl.sum(tl.where(cols[None, :] == id_j[:, None], position, 0), axis=1)
            tl.store(place_ptr + tokens.to(tl.int64) * TOP_K + j, place.to(tl.int64), mask=token_in)
            tl.store(source_ptr + place, tokens.to(tl.int64), mask=token_in)
        for j in range(0, align):  # a group's padding rows [start + entries, end) read the zero row
            tl.store(source_ptr + starts + whole + j, (num_tokens + cols * 0).to(tl.int64),
                     mask=is_expert & (starts + whole + j < ends))
        for tail in range(tl.sum(padded, axis=0), size, PAD):  # and so do the rows after the last group
            rows = tail + tl.arange(0, PAD)
            tl.store(source_ptr + rows, (num_tokens + rows * 0).to(tl.int64), mask=rows < size)


def usable(logits: torch.Tensor, top_k: int) -> bool:
    """Whether :func:`softmax_topk_layout` serves these logits: ``router_triton.usable`` holds and the (T, E)
    scores, padded to powers of two, fit one program (``MAX_CELLS``)."""
    if triton is None or not router_triton.usable(logits, top_k):
        return False
    return triton.next_power_of_2(max(1, logits.shape[0])) * triton.next_power_of_2(logits.shape[1]) <= MAX_CELLS


def softmax_topk_layout(logits: torch.Tensor, top_k: int, norm_topk_prob: bool, align: int, size: int):
    """logits (T, E) float on CUDA -> (expert_ids (T, k) int64, weights (T, k) float32, probs (T, E) float32,
    place (T·k,) int64, group_ends (E,) int32, source (size,) int64): ``router_triton.softmax_topk`` followed by
    ``grouped_layout_triton.grouped_layout_triton(expert_ids, E, T, align, size)``, in one launch. ``size`` must
    bound the padded rows, T·k + (align - 1)·E. Raises RuntimeError without Triton, ValueError for an ``align``
    below 1 or a ``size`` below that bound."""
    num_tokens, num_experts = logits.shape
    bound = num_tokens * top_k + (align - 1) * num_experts  # the rows the layout may fill
    if align < 1 or size < bound:  # (checked here: the kernel would write past the end of source)
        raise ValueError(f"align must be >= 1 and size >= T·k + (align - 1)·E = {bound}, got align={align}, "
                         f"size={size}")
    if triton is None:
        raise RuntimeError("softmax_topk_layout needs Triton (pip install triton)")
    device = logits.device
    probs = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    place = torch.empty(num_tokens * top_k, dtype=torch.int64, device=device)
    source = torch.empty(size, dtype=torch.int64, device=device)  # every row written by the kernel
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    launch(_route_layout_kernel, (1,), logits, logits.stride(0), num_tokens, num_experts, align, size, probs, weights,
           ids, place, source, ends, TOP_K=top_k, KP=triton.next_power_of_2(top_k), NORM=norm_topk_prob,
           BLOCK_T=triton.next_power_of_2(max(1, num_tokens)), EP=triton.next_power_of_2(num_experts), PAD=1024,
           num_warps=NUM_WARPS)
    return ids, weights, probs, place, ends, source
