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

Auxiliary losses for training:
load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4; GShard)
    L_aux = E · Σ_e f_e · P_e,  f_e = (number of (token, slot) choices of e) / T,
    P_e = mean over tokens of the router probability of e. With k slots Σ f_e = k, so a
    perfectly uniform router gives L_aux = k (this is transformers' Mixtral convention).
Over L MoE layers the load-balancing loss has two conventions, and they differ in scale:
    "per_layer"  Σ_l L_aux(layer l): each layer balanced on its own, as the Switch Transformer loss is
                 applied per layer (Megatron-core, minimoe's training default);
    "pooled"     E · Σ_e f̄_e · P̄_e with f̄_e, P̄_e averaged over the tokens of *all* layers: transformers'
                 ``load_balancing_loss_func`` (Mixtral, Qwen3-MoE, OLMoE) concatenates every layer's router
                 logits before computing f and P. L identical layers give one layer's value, where
                 "per_layer" gives L times it, so a coefficient copied between conventions changes strength.
router z-loss (ST-MoE, Zoph et al. 2022, eq. 5)
    L_z = mean over tokens of logsumexp(logits)².
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
AUX_LOSS_CONVENTIONS = ("per_layer", "pooled")  # how a model combines its layers' load-balancing losses
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
# Auxiliary losses.
# ---------------------------------------------------------------------------------------------
def router_probabilities(result: RoutingResult) -> torch.Tensor:
    """The per-expert probability P used by the load-balancing loss, (T, E) float32.

    softmax(logits) for the softmax and Llama 4 routers; for DeepSeek-V3 the sigmoid scores
    normalised to sum to one per token (the affinities of DeepSeek-V3's eq. 19).
    """
    if result.family == "deepseek_v3":
        sigmoid = torch.sigmoid(result.logits.float())  # (T, E)
        return sigmoid / sigmoid.sum(dim=-1, keepdim=True)
    return torch.softmax(result.logits.float(), dim=-1)


def load_balancing_loss(router_probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss E · Σ_e f_e · P_e (0 for an empty batch)."""
    if router_probs.dim() != 2 or router_probs.shape[1] != num_experts:
        raise ValueError(f"router_probs must have shape (T, {num_experts}), got {tuple(router_probs.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != router_probs.shape[0]:
        raise ValueError(f"expert_ids must have shape (T={router_probs.shape[0]}, k), got {tuple(expert_ids.shape)}")
    num_tokens = router_probs.shape[0]
    if num_tokens == 0:
        return router_probs.new_zeros((), dtype=torch.float32)
    choices = F.one_hot(expert_ids, num_experts).float()  # (T, k, E)
    fraction_routed = choices.sum(dim=(0, 1)) / num_tokens  # (E,) f_e, sums to k
    mean_prob = router_probs.float().mean(dim=0)  # (E,) P_e
    return num_experts * (fraction_routed * mean_prob).sum()


def pooled_load_balancing_loss(router_probs: list[torch.Tensor], expert_ids: list[torch.Tensor],
                               num_experts: int) -> torch.Tensor:
    """transformers' convention over several layers: E · Σ_e f̄_e · P̄_e on the rows of all layers together.

    router_probs: one (T_l, E) float tensor per layer; expert_ids: one (T_l, k) long tensor per layer. Equals
    ``load_balancing_loss`` of the concatenated rows (what ``load_balancing_loss_func`` computes with no
    attention mask). Returns a float32 scalar; ValueError for no layers or mismatched lists.
    """
    if not router_probs or len(router_probs) != len(expert_ids):
        raise ValueError(f"need one router_probs and one expert_ids tensor per layer, got {len(router_probs)} "
                         f"and {len(expert_ids)}")
    return load_balancing_loss(torch.cat(list(router_probs)), torch.cat(list(expert_ids)), num_experts)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)² (0 for an empty batch)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (tokens, experts), got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def moe_aux_loss(layers: list, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The auxiliary loss of a model's MoE layers (``minimoe.model.moe.MoELayer``, each holding ``config``,
    ``last_routing`` and ``aux_loss`` from its last forward pass), a float32 scalar (0 for no layers).

    Under "per_layer" it is Σ_l (aux_loss_coef·L_aux^l + z_loss_coef·L_z^l) (Switch Transformer's loss in every
    layer); under "pooled" it is aux_loss_coef·L_aux(rows of all layers) + Σ_l z_loss_coef·L_z^l, the
    convention of transformers' ``load_balancing_loss_func`` (its models have no z-loss). token_mask: (T,) or
    (B, T) bool over the layers' tokens (False = padding, left out like transformers' ``attention_mask``).
    ValueError if the layers disagree on the convention or, when pooled, on the coefficient.
    """
    if not layers:
        return torch.zeros(())
    configs, routings = [layer.config for layer in layers], [layer.last_routing for layer in layers]
    conventions = {c.aux_loss_convention for c in configs}
    if len(conventions) > 1:
        raise ValueError(f"the MoE layers use different aux_loss_convention values {sorted(conventions)}")
    if any(r is None for r in routings):
        raise ValueError("moe_aux_loss needs a forward pass first: a layer has no routing yet")
    if token_mask is None and conventions == {"per_layer"}:
        return torch.stack([layer.aux_loss for layer in layers]).sum()  # what each layer computed
    if token_mask is not None:
        keep = token_mask.reshape(-1).bool()  # (T,), the layers' rows are the (B, T) tokens flattened
        if keep.shape[0] != routings[0].num_tokens:
            raise ValueError(f"token_mask has {keep.shape[0]} entries, the layers routed {routings[0].num_tokens} tokens")
        routings = [RoutingResult(r.expert_ids[keep], r.weights[keep], r.logits[keep], r.scores[keep], r.family)
                    for r in routings]
    total = torch.zeros((), device=routings[0].logits.device)
    for c, r in zip(configs, routings):
        if c.z_loss_coef > 0:
            total = total + c.z_loss_coef * router_z_loss(r.logits)
        if c.aux_loss_coef > 0 and conventions == {"per_layer"}:
            total = total + c.aux_loss_coef * load_balancing_loss(router_probabilities(r), r.expert_ids, c.num_experts)
    if conventions == {"pooled"}:
        coefs = {c.aux_loss_coef for c in configs}
        if len(coefs) > 1:
            raise ValueError(f"a pooled load-balancing loss needs one aux_loss_coef for all layers, got {sorted(coefs)}")
        if configs[0].aux_loss_coef > 0:
            balance = pooled_load_balancing_loss([router_probabilities(r) for r in routings],
                                                 [r.expert_ids for r in routings], configs[0].num_experts)
            total = total + configs[0].aux_loss_coef * balance
    return total


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
