"""The MoE layer's grouped path as it was before the capturable small-batch rewrite, kept for before/after timing.

A frozen copy (commit 9b7f343) of ``MoELayer._experts_grouped`` and of the "auto" backend rule it used: on CUDA,
with at most 256 rows per expert on average, one matmul per expert after reading the group offsets on the host
(a sync; not capturable), else ``torch._grouped_mm``; weights multiplied into the expert rows, then a gather
back to (token, slot) order and a sum over the k slots. ``BeforeMoELayer.of(layer)`` shares ``layer``'s weights;
its router runs softmax top-k as PyTorch ops, as before the one-kernel router, and it does not ask the router for
the row layout.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from minimoe.model.grouped import grouped_matmul, grouped_mm_supported
from minimoe.model.moe import MoELayer
from minimoe.model.router import Router, RoutingResult, softmax_topk

PER_GROUP_MAX_ROWS_PER_GROUP = 256


def choose_backend_before(requested: str, x: torch.Tensor, weights: list[torch.Tensor]) -> str:
    if requested != "auto":
        return requested
    if not all(grouped_mm_supported(x, w) for w in weights):
        return "per_group"
    few_rows = x.shape[0] <= PER_GROUP_MAX_ROWS_PER_GROUP * weights[0].shape[0]
    return "per_group" if x.device.type == "cuda" and few_rows else "grouped_mm"


class BeforeMoELayer(MoELayer):
    """``MoELayer`` with the grouped path of before the rewrite."""

    @classmethod
    def of(cls, layer: MoELayer) -> "BeforeMoELayer":
        before = copy.copy(layer)  # shares the parameters
        before.__class__ = cls
        before._modules = dict(layer._modules)  # its own table of submodules: the router below is its own
        router = copy.copy(layer.router)
        router.__class__ = BeforeRouter
        before.router = router
        return before

    def _layout_request(self, tokens: torch.Tensor) -> None:
        """The router did not lay out the expert rows then."""
        return None

    def _experts_grouped(self, x: torch.Tensor, routing: RoutingResult, kept: torch.Tensor | None) -> torch.Tensor:
        """Fast path: sort (token, slot) pairs by expert, grouped matmuls, weighted sum."""
        (T, H), k, E, Fe = x.shape, routing.top_k, self.config.num_experts, self.config.intermediate_size
        flat_ids = routing.expert_ids.reshape(-1)  # (S,) S = T·k, pair p = (token p // k, slot p % k)
        if kept is not None:  # dropped pairs get the id E, so they sort after every expert
            flat_ids = flat_ids.masked_fill(~kept.reshape(-1), E)
        sorted_ids, order = torch.sort(flat_ids, stable=True)  # row r of the expert-sorted list is pair order[r]
        experts = torch.arange(1, E + 1, device=x.device)
        group_ends = torch.searchsorted(sorted_ids, experts).to(torch.int32)  # (E,) end of each expert's rows
        rows = x.index_select(0, order // k)  # (S, H) token rows in expert order
        row_weight = routing.weights.reshape(-1, 1)[order].to(x.dtype)  # (S, 1)
        if routing.scales_input:
            rows = rows * row_weight
        row_kept = None if kept is None else (sorted_ids < E).unsqueeze(-1)  # (S, 1)
        if row_kept is not None:  # zero the tail rows (also zeroes their gradient)
            rows = rows.where(row_kept, 0.0)
        # gate and up as two products on column slices of gate_up_proj: contiguous outputs keep
        # silu and * on PyTorch's vectorised kernels (one (S, 2F) product would leave them strided)
        gate_w, up_w = self.gate_up_proj[:, :, :Fe], self.gate_up_proj[:, :, Fe:]  # (E, H, F) views
        backend = choose_backend_before(self.grouped_backend, rows, [gate_w, up_w, self.down_proj])
        ends = group_ends if backend == "grouped_mm" else group_ends.tolist()  # per_group: one host sync
        gate = grouped_matmul(rows, gate_w, ends, backend)  # (S, F)
        up = grouped_matmul(rows, up_w, ends, backend)  # (S, F)
        expert_out = grouped_matmul(F.silu(gate) * up, self.down_proj, ends, backend)  # (S, H)
        if row_kept is not None:
            expert_out = expert_out.where(row_kept, 0.0)
        if not routing.scales_input:
            expert_out = expert_out * row_weight
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        pair_out = expert_out.index_select(0, rank)  # (S, H) back in (token, slot) order: a gather
        return pair_out.view(T, k, H).sum(dim=1)  # (T, H)


class BeforeRouter(Router):
    """The router as it was: softmax top-k as PyTorch ops (five kernels after the matmul)."""

    def forward(self, x: torch.Tensor) -> RoutingResult:
        if self.family == "softmax":
            return softmax_topk(F.linear(x, self.weight), self.top_k, self.norm_topk_prob)
        return super().forward(x)
