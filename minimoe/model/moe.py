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

Auxiliary losses: each layer computes its own ``aux_loss`` (``minimoe.model.router``: load balancing and
z-loss); ``minimoe.model.aux_losses.moe_aux_loss(layers)`` combines the layers of a model under ``MoEConfig.aux_loss_convention``:
"per_layer" sums the layers' losses, "pooled" computes the load-balancing term once on the router statistics
of all layers together (transformers' ``load_balancing_loss_func``). For a single layer both are the same.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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
from minimoe.model.aux_losses import AUX_LOSS_CONVENTIONS, load_balancing_loss, router_probabilities, router_z_loss
from minimoe.model.router import DROPPED_GROUP_VALUES, ROUTER_FAMILIES, Router, RoutingResult


@dataclass
class MoEConfig:
    """Everything that defines an MoE layer except the model width (passed to MoELayer)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # F, width of each routed expert
    router: str = "softmax"  # "softmax" (Mixtral, Qwen3-MoE, OLMoE), "deepseek_v3" or "llama4"
    norm_topk_prob: bool = True  # renormalise the k weights to sum to 1 (softmax, deepseek_v3)
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None  # width of each shared expert; None = intermediate_size
    n_group: int = 1  # deepseek_v3: expert groups
    topk_group: int = 1  # deepseek_v3: groups kept per token
    routed_scaling_factor: float = 1.0  # deepseek_v3: multiplies the routed weights
    dropped_group_value: str = "-inf"  # deepseek_v3: "-inf" (DeepSeek) or "zero" (older transformers)
    capacity_factor: float = 0.0  # 0 = dropless; > 0: C = ceil(T·k/E · capacity_factor)
    aux_loss_coef: float = 0.0  # weight of the load-balancing loss in aux_loss
    aux_loss_convention: str = "per_layer"  # over layers: "per_layer" (sum) or "pooled" (transformers), see router.py
    z_loss_coef: float = 0.0  # weight of the router z-loss in aux_loss
    router_jitter: float = 0.0  # multiplicative router-input noise in training, in [0, 1)

    def __post_init__(self):
        for name in ("num_experts", "top_k", "intermediate_size", "num_shared_experts", "n_group", "topk_group"):
            _require_int(name, getattr(self, name))
        if self.shared_intermediate_size is not None:
            _require_int("shared_intermediate_size", self.shared_intermediate_size)
        for name in ("routed_scaling_factor", "capacity_factor", "aux_loss_coef", "z_loss_coef", "router_jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"MoEConfig.{name} must be a finite number, got {value!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise TypeError(f"MoEConfig.norm_topk_prob must be a bool, got {self.norm_topk_prob!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.intermediate_size < 1:
            raise ValueError(f"intermediate_size={self.intermediate_size} must be >= 1")
        if self.router not in ROUTER_FAMILIES:
            raise ValueError(f"router={self.router!r} must be one of {ROUTER_FAMILIES}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.shared_intermediate_size is not None and self.shared_intermediate_size < 1:
            raise ValueError(f"shared_intermediate_size={self.shared_intermediate_size} must be >= 1")
        if self.n_group < 1 or self.num_experts % self.n_group != 0:
            raise ValueError(f"n_group={self.n_group} must be >= 1 and divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
        kept_experts = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > kept_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {kept_experts} experts in topk_group={self.topk_group} "
                f"of n_group={self.n_group} groups"
            )
        if self.router != "deepseek_v3" and (self.n_group, self.topk_group, self.routed_scaling_factor) != (1, 1, 1.0):
            raise ValueError(
                f"n_group/topk_group/routed_scaling_factor are DeepSeek-V3 options, got n_group={self.n_group}, "
                f"topk_group={self.topk_group}, routed_scaling_factor={self.routed_scaling_factor} "
                f"with router={self.router!r}"
            )
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor} must be > 0")
        if self.dropped_group_value not in DROPPED_GROUP_VALUES:
            raise ValueError(f"dropped_group_value={self.dropped_group_value!r} must be one of {sorted(DROPPED_GROUP_VALUES)}")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be >= 0 (0 means dropless)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"router_jitter={self.router_jitter} must be in [0, 1)")
        if self.aux_loss_convention not in AUX_LOSS_CONVENTIONS:
            raise ValueError(f"aux_loss_convention={self.aux_loss_convention!r} must be one of {AUX_LOSS_CONVENTIONS}")

    @property
    def shared_width(self) -> int:
        """Width of the one SwiGLU that holds all shared experts (0 = none)."""
        return self.num_shared_experts * (self.shared_intermediate_size or self.intermediate_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        """Build from ``to_dict()`` output; every field must be present, no other key allowed (except the fields
        added later, in LATER_FIELDS: a file written before one existed means its default)."""
        if not isinstance(d, dict):
            raise TypeError(f"MoEConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d) - LATER_FIELDS)
        if unknown or missing:
            raise ValueError(f"MoEConfig dict has unknown keys {unknown} and missing keys {missing}")
        return cls(**d)


LATER_FIELDS = {"aux_loss_convention"}  # checkpoints written before it trained with "per_layer", its default


def _require_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MoEConfig.{name} must be an int, got {value!r}")


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
