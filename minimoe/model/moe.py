"""The Mixture-of-Experts layer: a router, E SwiGLU experts, optional shared experts.

For a token x (size H) the router (``minimoe.model.router``) picks k experts e_1..e_k with weights
w_1..w_k, and the layer returns

    y = Σ_j w_j · E_{e_j}(x) + S(x),        E_e(x) = (silu(x W_g^e) ⊙ x W_u^e) W_d^e

(Llama 4 puts the weight on the input instead: Σ_j E_{e_j}(w_j · x)). S is the shared
expert(s), a SwiGLU that every token goes through (DeepSeekMoE, arXiv 2401.06066; Llama 4);
n shared experts of width F_s are one SwiGLU of width n·F_s, since a sum of SwiGLUs over the
same input is the SwiGLU of their concatenated weights.

Expert weights are stacked, in "input-major" layout so that a row of tokens multiplies them
directly (x @ W):
    gate_up_proj  (E, H, 2F)   columns [0, F) are W_g (gate), columns [F, 2F) are W_u (up)
    down_proj     (E, F, H)
(transformers' Mixtral/Qwen3-MoE/OLMoE/DeepSeek-V3 store the transposes [E, 2F, H] and
[E, H, F]; Llama 4 stores this layout. ``minimoe.hf.moe_blocks`` converts.)

Two ways to compute the same thing (a test proves they agree, values and gradients):
``impl="loop"``     the reference: for each expert, gather its tokens, run it, add back.
``impl="grouped"``  the fast path (MegaBlocks, Gale et al. 2022, "dropless MoE";
    ``minimoe.model.grouped``): flatten the T·k (token, slot) pairs, sort them by expert (one
    stable sort), gather the token rows in that order, run grouped matrix multiplies for gate,
    up and down (``torch._grouped_mm``, which takes the int32 end offset of each expert's rows
    on the device), and gather each token's k results back with their weights in one
    ``embedding_bag``. No host sync on the default backend, so a forward can be captured in a
    CUDA graph. With few rows per expert (decode) the products are computed transposed, weights
    as the left operand, so each expert's weights stream from memory about once. Where
    ``torch._grouped_mm`` cannot run (old torch, float64, sizes not multiples of 16 bytes,
    CUDA before sm80), one matmul per expert computes the same after reading the offsets.
    On CUDA without a gradient a small batch's softmax router also lays the rows out by expert in
    its own kernel (``route_layout_triton``), and the experts run in two Triton kernels that stream
    each expert's weights once (``experts_triton``): at a few hundred tokens the weights' bytes and
    the host's cost of each launch, not the arithmetic, set the layer's pace.

Capacity (GShard, Lepikhin et al. 2020): by default the layer is dropless. With
``capacity_factor > 0`` each expert takes at most C = ceil(T·k/E · capacity_factor) pairs;
pairs beyond C are dropped in token order (the first C tokens that chose an expert keep it),
contribute nothing, and are counted in ``dropped_tokens``.

The layer's settings are a ``MoEConfig`` (``minimoe.model.moe_config``).

Auxiliary losses (``minimoe.model.aux_losses``): each layer computes its own ``aux_loss`` (load balancing and
z-loss); ``moe_aux_loss(layers)`` combines the layers of a model under ``MoEConfig.aux_loss_convention``:
"per_layer" sums the layers' losses, "pooled" computes the load-balancing term once on the router statistics
of all layers together (transformers' ``load_balancing_loss_func``). For a single layer both are the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.model.dense import FeedForward  # the shared expert is a plain SwiGLU
from minimoe.model.grouped import (  # noqa: F401  (grouped_matmul and friends are also used from here)
    BACKENDS,
    choose_backend,
    grouped_experts,
    grouped_matmul,
    grouped_mm_supported,
    layout_request,
)
from minimoe.model.aux_losses import load_balancing_loss, router_probabilities, router_z_loss
from minimoe.model.moe_config import MoEConfig
from minimoe.model.router import Router, RoutingResult


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int | None:
    """C = ceil(T·k/E · capacity_factor), or None (dropless) when capacity_factor is 0.

    A 1e-9 tolerance absorbs float rounding (80·1.1/8 gives 11, not 12).
    """
    if capacity_factor <= 0:
        return None
    return math.ceil(num_tokens * top_k * capacity_factor / num_experts - 1e-9)


# ---------------------------------------------------------------------------------------------
# The layer.
# ---------------------------------------------------------------------------------------------
class MoELayer(nn.Module):
    """Routed SwiGLU experts (+ shared experts). forward: (B, T, H) or (T, H) -> same shape.

    After each forward: ``last_routing`` (RoutingResult), ``last_kept`` ((T, k) bool, False =
    dropped by capacity; None when dropless), ``capacity`` (int or None), ``dropped_tokens``
    (int: dropped (token, expert) pairs; in capacity mode reading it syncs with the device) and
    ``aux_loss`` (float32 scalar, aux_loss_coef·load-balancing + z_loss_coef·z-loss; zero when
    both coefficients are 0). ``impl`` ("grouped" or "loop") and ``grouped_backend`` ("auto",
    "grouped_mm", "grouped_mm_t", "triton" (forward only), "per_group"; every one but "per_group" can be
    captured in a CUDA graph, "triton" after a warm-up call at that batch size) can be changed at any time.
    """

    def __init__(self, hidden_size: int, config: MoEConfig, impl: str = "grouped", init_std: float = 0.02):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size, self.config = hidden_size, config
        self.impl = impl
        self.grouped_backend = "auto"  # one of BACKENDS: see minimoe.model.grouped
        E, H, Fe = config.num_experts, hidden_size, config.intermediate_size
        self.router = Router(
            H, E, config.top_k, family=config.router, norm_topk_prob=config.norm_topk_prob,
            n_group=config.n_group, topk_group=config.topk_group,
            routed_scaling_factor=config.routed_scaling_factor,
            dropped_group_value=config.dropped_group_value, jitter=config.router_jitter,
        )  # fmt: skip
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * Fe))  # (E, H, 2F): [gate | up]
        self.down_proj = nn.Parameter(torch.empty(E, Fe, H))  # (E, F, H)
        self.shared_expert = FeedForward(H, config.shared_width) if config.shared_width else None
        self.reset_parameters(init_std)
        self.last_routing: RoutingResult | None = None
        self.last_kept: torch.Tensor | None = None
        self.capacity: int | None = None
        self.dropped_tokens = 0
        self.aux_loss = torch.zeros(())

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=std)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in ("loop", "grouped"):
            raise ValueError(f"impl must be 'loop' or 'grouped', got {value!r}")
        self._impl = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MoELayer expects (B, T, {self.hidden_size}) or (T, {self.hidden_size}), got {shape}")
        if x.dtype != self.gate_up_proj.dtype:
            raise TypeError(f"input dtype {x.dtype} differs from the expert weights' dtype {self.gate_up_proj.dtype}")
        tokens = x.reshape(-1, self.hidden_size)  # (T, H)
        request = self._layout_request(tokens)  # (align, size, backend): the router may lay out the rows too
        if request is None:
            routing = self.router(tokens)
        else:
            align, size, backend = request
            routing = self.router(tokens, layout_request=(align, size))
        kept = self._capacity_mask(routing.expert_ids)  # (T, k) bool, or None when dropless
        if self.impl == "loop":
            out = self._experts_loop(tokens, routing, kept)
        elif request is not None and kept is None and routing.layout is not None and \
                routing.layout.matches(routing.expert_ids):  # the router's layout still describes its ids
            out = grouped_experts(tokens, routing.expert_ids, routing.weights, self.gate_up_proj, self.down_proj,
                                  scales_input=routing.scales_input, backend=backend, has_invalid=False,
                                  layout=routing.layout[:3])
        else:
            out = self._experts_grouped(tokens, routing, kept)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        self.last_routing, self.last_kept = routing, kept
        self.dropped_tokens = 0 if kept is None else int((~kept).sum())
        self.aux_loss = self._aux_loss(routing, tokens.device)
        return out.reshape(x.shape)

    def _capacity_mask(self, expert_ids: torch.Tensor) -> torch.Tensor | None:
        """(T, k) bool: a pair is kept iff fewer than C earlier tokens chose the same expert."""
        cfg = self.config
        self.capacity = expert_capacity(expert_ids.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
        if self.capacity is None:
            return None
        flat_ids = expert_ids.reshape(-1)  # (S,), pairs in token order
        sorted_ids, order = torch.sort(flat_ids, stable=True)  # token order kept inside each expert
        experts = torch.arange(cfg.num_experts, device=flat_ids.device)
        group_starts = torch.searchsorted(sorted_ids, experts)  # (E,)
        rank_sorted = torch.arange(flat_ids.numel(), device=flat_ids.device) - group_starts[sorted_ids]
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (S,) place within expert
        return (rank < self.capacity).view_as(expert_ids)

    def _experts_loop(self, x: torch.Tensor, routing: RoutingResult, kept: torch.Tensor | None) -> torch.Tensor:
        """Reference path: one expert at a time."""
        chosen = routing.expert_ids if kept is None else routing.expert_ids.masked_fill(~kept, -1)
        out = torch.zeros_like(x)  # (T, H)
        Fe = self.config.intermediate_size
        for e in range(self.config.num_experts):
            token_idx, slot = torch.where(chosen == e)  # tokens that chose e, and in which slot
            if token_idx.numel() == 0:
                continue
            weight = routing.weights[token_idx, slot].unsqueeze(-1).to(x.dtype)  # (n, 1)
            expert_in = x[token_idx] * weight if routing.scales_input else x[token_idx]  # (n, H)
            gate_up = expert_in @ self.gate_up_proj[e]  # (n, 2F)
            expert_out = (F.silu(gate_up[:, :Fe]) * gate_up[:, Fe:]) @ self.down_proj[e]  # (n, H)
            if not routing.scales_input:
                expert_out = expert_out * weight
            out = out.index_add(0, token_idx, expert_out)
        return out

    def _layout_request(self, tokens: torch.Tensor) -> tuple[int, int, str] | None:
        """(align, size, backend) of the grouped experts' row layout, for a softmax router on CUDA to build in its
        own kernel (one launch instead of three, ``route_layout_triton``); None where that cannot apply."""
        cfg = self.config
        if not tokens.is_cuda or self.impl != "grouped" or cfg.router != "softmax" or cfg.capacity_factor > 0:
            return None
        if torch.is_grad_enabled() and self.router.weight.requires_grad:  # the fused kernel is forward-only
            return None
        return layout_request(tokens, tokens.shape[0] * cfg.top_k, self.gate_up_proj, self.down_proj,
                              self.grouped_backend)

    def _experts_grouped(self, x: torch.Tensor, routing: RoutingResult, kept: torch.Tensor | None) -> torch.Tensor:
        """Fast path: sort (token, slot) pairs by expert, grouped matmuls, weighted gather-sum."""
        expert_ids = routing.expert_ids
        if kept is not None:  # dropped pairs get the id E: "no expert"
            expert_ids = expert_ids.masked_fill(~kept, self.config.num_experts)
        return grouped_experts(x, expert_ids, routing.weights, self.gate_up_proj, self.down_proj,
                               routing.scales_input, self.grouped_backend, has_invalid=kept is not None)

    def _aux_loss(self, routing: RoutingResult, device: torch.device) -> torch.Tensor:
        cfg = self.config
        loss = torch.zeros((), device=device)
        if cfg.aux_loss_coef > 0:
            probs = router_probabilities(routing)
            loss = loss + cfg.aux_loss_coef * load_balancing_loss(probs, routing.expert_ids, cfg.num_experts)
        if cfg.z_loss_coef > 0:
            loss = loss + cfg.z_loss_coef * router_z_loss(routing.logits)
        return loss

    def extra_repr(self) -> str:
        c = self.config
        return f"hidden_size={self.hidden_size}, num_experts={c.num_experts}, top_k={c.top_k}, impl={self.impl!r}"
