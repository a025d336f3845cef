"""Routers: which experts each token goes to, and with what weight.

A router is a linear map from a token's hidden state x (size H) to one logit per expert,
``logits = x @ W_r^T`` (shape (T, E)), followed by a *selection rule* that keeps k experts per
token and a *weighting rule* that says how much each kept expert counts. Real models differ
only in those two rules (as implemented in transformers 5: ``MixtralSparseMoeBlock``, ``DeepseekV3MoE``,
``Llama4TextMoe``):

softmax top-k (Mixtral, Qwen3-MoE, OLMoE; Shazeer et al. 2017, "Outrageously Large NNs")
    p = softmax(logits) in float32;  ids = top-k of p;  w = p[ids], divided by Σ w when
    ``norm_topk_prob`` (Mixtral always renormalises; Qwen3-MoE/OLMoE per config).
DeepSeek-V3 (arXiv 2412.19437, §2.1.2 "auxiliary-loss-free load balancing")
    s = sigmoid(logits) in float32;  s' = s + b  (b = ``e_score_correction_bias``, used for
    *selection only*). Experts form ``n_group`` equal groups; a group's score is the sum of its
    two largest s'; the ``topk_group`` best groups are kept; ids = top-k of s' inside kept
    groups, where experts of dropped groups get the value -inf (DeepSeek's code, and
    transformers from 5.17 on) or 0.0 (older transformers and some serving engines). The two
    differ only when fewer than k experts of the kept groups have s' > 0. Then
    w = s[ids] (unbiased), divided by Σ w if ``norm_topk_prob``, times ``routed_scaling_factor``.
Llama 4 (Meta 2025, transformers ``Llama4TextMoe``)
    ids = top-k (k=1) of the raw logits;  w = sigmoid(logits[ids]).  The weight multiplies
    the expert's *input*: out = shared(x) + Σ E_id(w·x).  (The MoE layer reads
    ``RoutingResult.scales_input`` to know which side the weight goes on.) transformers' block
    applies every expert to every token (non-chosen ones to a zero input); we run only the chosen.

The auxiliary losses that train a router to balance its experts are in ``minimoe.model.aux_losses``.

Jitter (Switch Transformer §2.4): in training mode the router input is multiplied by noise
uniform in [1 - eps, 1 + eps]; the experts still see the clean input. (transformers' Mixtral
multiplies the whole hidden state, experts included; the difference only exists in training.)

On CUDA without a gradient, softmax top-k runs as one Triton kernel (``router_triton``) instead of five
PyTorch ops; ``softmax_topk`` below is the reference it is tested against. Asked for a layout (an MoE layer
about to run its grouped experts), a small batch also gets its rows laid out by expert in that same kernel
(``route_layout_triton``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from minimoe.model.route_layout_triton import RowLayout

ROUTER_FAMILIES = ("softmax", "deepseek_v3", "llama4")
DROPPED_GROUP_VALUES = {"-inf": float("-inf"), "zero": 0.0}


@dataclass
class RoutingResult:
    """What a router decided for T tokens over E experts, keeping k per token."""

    expert_ids: torch.Tensor  # (T, k) long: the chosen experts
    weights: torch.Tensor  # (T, k) float32: each choice's weight
    logits: torch.Tensor  # (T, E): the router logits x @ W_r^T
    scores: torch.Tensor  # (T, E) float32: the values the selection ranked
    family: str = "softmax"  # which selection rule produced it (one of ROUTER_FAMILIES)
    # the grouped experts' row layout, when the router was asked for it and built it in the same kernel; else None
    layout: RowLayout | None = None

    @property
    def scales_input(self) -> bool:
        """True for Llama 4: the weights scale the expert's input, not its output."""
        return self.family == "llama4"

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]


# ---------------------------------------------------------------------------------------------
# Selection rules, as plain functions of the logits (the router module below adds W_r).
# ---------------------------------------------------------------------------------------------
def softmax_topk(logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True) -> RoutingResult:
    """Mixtral / Qwen3-MoE / OLMoE routing: top-k of softmax(logits), optionally renormalised."""
    _check_logits(logits, top_k)
    probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
    top_probs, expert_ids = torch.topk(probs, top_k, dim=-1)  # (T, k)
    if norm_topk_prob:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return RoutingResult(expert_ids, top_probs, logits, probs, "softmax")


def deepseek_v3_topk(
    logits: torch.Tensor,
    top_k: int,
    e_score_correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    dropped_group_value: str = "-inf",
) -> RoutingResult:
    """DeepSeek-V3 routing: sigmoid scores, bias for selection only, group-limited top-k."""
    _check_logits(logits, top_k)
    num_tokens, num_experts = logits.shape
    if dropped_group_value not in DROPPED_GROUP_VALUES:
        raise ValueError(f"dropped_group_value must be one of {sorted(DROPPED_GROUP_VALUES)}, got {dropped_group_value!r}")
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"n_group={n_group} must be >= 1 and divide num_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    scores = torch.sigmoid(logits.float())  # (T, E)
    biased = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if topk_group < n_group:  # group-limited selection (otherwise every group is kept)
        experts_per_group = num_experts // n_group
        grouped = biased.view(num_tokens, n_group, experts_per_group)  # (T, G, E/G)
        group_scores = grouped.topk(min(2, experts_per_group), dim=-1).values.sum(dim=-1)  # (T, G)
        kept_groups = torch.topk(group_scores, topk_group, dim=-1).indices  # (T, topk_group)
        group_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        expert_kept = group_kept.repeat_interleave(experts_per_group, dim=1)  # (T, E)
        fill = DROPPED_GROUP_VALUES[dropped_group_value]
        choice = biased.masked_fill(~expert_kept, fill)
    else:
        choice = biased
    expert_ids = torch.topk(choice, top_k, dim=-1).indices  # (T, k)
    weights = scores.gather(1, expert_ids)  # the unbiased scores of the chosen experts
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return RoutingResult(expert_ids, weights, logits, biased, "deepseek_v3")


def llama4_topk(logits: torch.Tensor, top_k: int = 1) -> RoutingResult:
    """Llama 4 routing: top-k of the raw logits, weight sigmoid(logit), applied to the input."""
    _check_logits(logits, top_k)
    top_logits, expert_ids = torch.topk(logits, top_k, dim=-1)  # (T, k)
    weights = torch.sigmoid(top_logits.float())
    return RoutingResult(expert_ids, weights, logits, logits.float(), "llama4")


def _check_logits(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"router logits must be 2-D (tokens, experts), got shape {tuple(logits.shape)}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={logits.shape[1]}]")


# ---------------------------------------------------------------------------------------------
# The router module: W_r plus one of the selection rules.
# ---------------------------------------------------------------------------------------------
class Router(nn.Module):
    """Linear router ``logits = x @ weight^T`` followed by a family's selection rule.

    ``weight`` is (E, H) like ``nn.Linear``. For ``family="deepseek_v3"`` the module also holds
    the buffer ``e_score_correction_bias`` (E,) float32 and computes the logits in float32,
    as DeepSeek-V3 does.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        family: str = "softmax",
        norm_topk_prob: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        dropped_group_value: str = "-inf",
        jitter: float = 0.0,
    ):
        super().__init__()
        if family not in ROUTER_FAMILIES:
            raise ValueError(f"router family must be one of {ROUTER_FAMILIES}, got {family!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter={jitter} must be in [0, 1)")
        self.hidden_size, self.num_experts, self.top_k, self.family = hidden_size, num_experts, top_k, family
        self.norm_topk_prob = norm_topk_prob
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.dropped_group_value = dropped_group_value
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # (E, H)
        nn.init.normal_(self.weight, std=0.02)
        if family == "deepseek_v3":
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor, layout_request: tuple[int, int] | None = None) -> RoutingResult:
        """x: (T, H) -> RoutingResult over the T tokens. ``layout_request`` = (align, size): the MoE layer's
        grouped experts want their row layout (``grouped.layout_request``); the softmax router builds it in the
        same kernel where it can (``RoutingResult.layout``; None where it does not)."""
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"router input must have shape (T, {self.hidden_size}), got {tuple(x.shape)}")
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        if self.family == "softmax":
            logits = F.linear(x, self.weight)  # (T, E)
            if logits.is_cuda:  # one Triton kernel instead of five when no gradient is needed
                from minimoe.model import router_triton  # here: it loads Triton

                if layout_request is not None:
                    from minimoe.model import route_layout_triton

                    if route_layout_triton.usable(logits, self.top_k):
                        ids, weights, probs, place, ends, source = route_layout_triton.softmax_topk_layout(
                            logits, self.top_k, self.norm_topk_prob, *layout_request)
                        version = route_layout_triton.ids_version(ids)
                        layout = route_layout_triton.RowLayout(place, ends, source, ids, version)
                        return RoutingResult(ids, weights, logits, probs, "softmax", layout=layout)
                if router_triton.usable(logits, self.top_k):  # (checks the shape and top_k as softmax_topk does)
                    ids, weights, probs = router_triton.softmax_topk(logits, self.top_k, self.norm_topk_prob)
                    return RoutingResult(ids, weights, logits, probs, "softmax")
            return softmax_topk(logits, self.top_k, self.norm_topk_prob)
        if self.family == "llama4":
            return llama4_topk(F.linear(x, self.weight), self.top_k)
        logits = F.linear(x.float(), self.weight.float())  # (T, E) float32
        return deepseek_v3_topk(
            logits,
            self.top_k,
            self.e_score_correction_bias,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            dropped_group_value=self.dropped_group_value,
        )

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, family={self.family!r}"
