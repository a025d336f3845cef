"""Auxiliary losses that train a router to spread its tokens over the experts.

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

They read a router's ``RoutingResult`` (``minimoe.model.router``); ``MoELayer`` computes its own layer's loss
and ``Transformer.moe_aux_loss`` combines the layers with :func:`moe_aux_loss`. The load-balancing loss, per
layer and pooled, is tested equal to transformers' ``load_balancing_loss_func``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minimoe.model.router import RoutingResult

AUX_LOSS_CONVENTIONS = ("per_layer", "pooled")  # how a model combines its layers' load-balancing losses


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
