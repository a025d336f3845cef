"""Config conversion for transformers' MoE language models: Mixtral, Qwen3-MoE and OLMoE.

All three are Llama's decoder with the SwiGLU replaced by a softmax top-k MoE block (converted by
``minimoe.hf.moe_blocks``); they differ in three places:

    family      MoE layers                         q/k RMSNorm                        expert width field
    mixtral     every layer                        none                               intermediate_size
    qwen3_moe   layers not in mlp_only_layers      per head, over head_dim ("head")   moe_intermediate_size
                with (i + 1) % decoder_sparse_step == 0 (the others: a dense SwiGLU of intermediate_size)
    olmoe       every layer                        over the whole projection ("full") intermediate_size

Mixtral always renormalises the top-k weights; Qwen3-MoE and OLMoE do iff ``norm_topk_prob``.
What changes the computed function and has no place in our model is rejected with a ValueError:
sliding windows, OLMoE's ``clip_qkv``, capacity limits (transformers' blocks are dropless), shared
experts or non-softmax routers. Training-only knobs travel where they can (Mixtral's router jitter, the
load-balancing coefficient as ``router_aux_loss_coef`` with ``output_router_logits``); where transformers
cannot hold one, the logits do not change but training would, so a UserWarning names it:

- the load-balancing loss: transformers pools router statistics over all layers (``load_balancing_loss_func``),
  so a model converted from transformers gets ``aux_loss_convention="pooled"`` and keeps the same strength.
  Exporting a "per_layer" model with several MoE layers copies the coefficient, and the balance term of the
  exported model is weaker (by about the number of MoE layers for well-balanced routers);
- the router z-loss (transformers' Mixtral, Qwen3-MoE and OLMoE have none) and router jitter for Qwen3-MoE /
  OLMoE are dropped.
"""

from __future__ import annotations

import warnings

from minimoe.hf.llama import common_from_hf, common_to_hf
from minimoe.model.model_config import ModelConfig


def _moe_config_from_hf(hf_config, family: str):
    from minimoe.hf.moe_blocks import moe_config_from_hf

    return moe_config_from_hf(hf_config, family)


def _check_moe(config: ModelConfig, family: str, qk_norm: str | None, every_layer: bool) -> None:
    """Raise a ValueError naming what a ``family`` model cannot hold."""
    moe = config.moe
    if moe is None:
        raise ValueError(f"a {family!r} model needs MoE layers, this config has moe=None")
    if moe.router != "softmax" or moe.shared_width:
        raise ValueError(f"a {family!r} model has a softmax router and no shared expert, got router={moe.router!r}, "
                         f"num_shared_experts={moe.num_shared_experts}")
    if moe.capacity_factor > 0:
        raise ValueError(f"a {family!r} model is dropless, got capacity_factor={moe.capacity_factor}")
    if config.qk_norm != qk_norm:
        raise ValueError(f"a {family!r} model has qk_norm={qk_norm!r}, got qk_norm={config.qk_norm!r}")
    if every_layer and config.moe_layers is not None and len(config.moe_layers) != config.num_layers:
        raise ValueError(f"every layer of a {family!r} model is MoE, got moe_layers={config.moe_layers}")


def _moe_to_hf(config: ModelConfig, family: str) -> dict:
    moe = config.moe
    lost = []
    num_moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    if moe.aux_loss_coef > 0 and moe.aux_loss_convention == "per_layer" and num_moe_layers > 1:
        lost.append(f"the load-balancing loss sums {num_moe_layers} per-layer losses here (aux_loss_convention="
                    f"'per_layer'), transformers pools them, so router_aux_loss_coef={moe.aux_loss_coef} balances less "
                    "strongly there; set aux_loss_convention='pooled' to train alike")
    if moe.z_loss_coef > 0:
        lost.append(f"transformers has no router z-loss: z_loss_coef={moe.z_loss_coef} is dropped")
    if moe.router_jitter > 0 and family != "mixtral":
        lost.append(f"transformers' {family} has no router jitter: router_jitter={moe.router_jitter} is dropped")
    if lost:
        warnings.warn(f"exporting to {family!r} changes training (not the logits): " + "; ".join(lost),
                      UserWarning, stacklevel=4)
    return dict(num_experts_per_tok=moe.top_k, output_router_logits=moe.aux_loss_coef > 0,
                router_aux_loss_coef=moe.aux_loss_coef if moe.aux_loss_coef > 0 else 0.001)


class MixtralFamily:
    model_type, hf_class, hf_config_class, moe_family = "mixtral", "MixtralForCausalLM", "MixtralConfig", "mixtral"

    @staticmethod
    def config_from_hf(hf_config) -> ModelConfig:
        return ModelConfig(**common_from_hf(hf_config, qk_norm=None), intermediate_size=hf_config.intermediate_size,
                           moe=_moe_config_from_hf(hf_config, "mixtral"))

    @staticmethod
    def config_to_hf(config: ModelConfig) -> dict:
        _check_moe(config, "mixtral", qk_norm=None, every_layer=True)
        if not config.moe.norm_topk_prob:
            raise ValueError("a 'mixtral' model renormalises its top-k weights, got norm_topk_prob=False")
        return dict(common_to_hf(config), **_moe_to_hf(config, "mixtral"),
                    intermediate_size=config.moe.intermediate_size, num_local_experts=config.moe.num_experts,
                    router_jitter_noise=config.moe.router_jitter, sliding_window=None)


class Qwen3MoeFamily:
    model_type, hf_class, hf_config_class = "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig"
    moe_family = "qwen3_moe"

    @staticmethod
    def config_from_hf(hf_config) -> ModelConfig:
        if not hf_config.num_experts:
            raise ValueError(f"a Qwen3-MoE config without experts (num_experts={hf_config.num_experts}) "
                             "is not supported")
        step, dense_only = hf_config.decoder_sparse_step, set(hf_config.mlp_only_layers or [])
        moe_layers = [i for i in range(hf_config.num_hidden_layers) if i not in dense_only and (i + 1) % step == 0]
        return ModelConfig(**common_from_hf(hf_config, qk_norm="head"), intermediate_size=hf_config.intermediate_size,
                           moe=_moe_config_from_hf(hf_config, "qwen3_moe"),
                           moe_layers=None if len(moe_layers) == hf_config.num_hidden_layers else moe_layers)

    @staticmethod
    def config_to_hf(config: ModelConfig) -> dict:
        _check_moe(config, "qwen3_moe", qk_norm="head", every_layer=False)
        dense_layers = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
        return dict(common_to_hf(config), **_moe_to_hf(config, "qwen3_moe"),
                    intermediate_size=config.intermediate_size, moe_intermediate_size=config.moe.intermediate_size,
                    num_experts=config.moe.num_experts, norm_topk_prob=config.moe.norm_topk_prob,
                    decoder_sparse_step=1, mlp_only_layers=dense_layers, use_sliding_window=False)


class OlmoeFamily:
    model_type, hf_class, hf_config_class, moe_family = "olmoe", "OlmoeForCausalLM", "OlmoeConfig", "olmoe"

    @staticmethod
    def config_from_hf(hf_config) -> ModelConfig:
        if getattr(hf_config, "clip_qkv", None) is not None:
            raise ValueError(f"clip_qkv={hf_config.clip_qkv} is not supported; our attention does not clip q/k/v")
        width = hf_config.hidden_size // hf_config.num_attention_heads
        if getattr(hf_config, "head_dim", None) not in (None, width):
            raise ValueError(f"OLMoE's q/k norms assume head_dim = hidden_size // num_attention_heads = {width}, "
                             f"got head_dim={hf_config.head_dim}")
        return ModelConfig(**common_from_hf(hf_config, qk_norm="full"), intermediate_size=hf_config.intermediate_size,
                           moe=_moe_config_from_hf(hf_config, "olmoe"))

    @staticmethod
    def config_to_hf(config: ModelConfig) -> dict:
        _check_moe(config, "olmoe", qk_norm="full", every_layer=True)
        if config.head_dim * config.num_heads != config.hidden_size:
            raise ValueError(f"an 'olmoe' model needs head_dim * num_heads == hidden_size, got head_dim="
                             f"{config.head_dim}, num_heads={config.num_heads}, hidden_size={config.hidden_size}")
        settings = dict(common_to_hf(config), **_moe_to_hf(config, "olmoe"),
                        intermediate_size=config.moe.intermediate_size, num_experts=config.moe.num_experts,
                        norm_topk_prob=config.moe.norm_topk_prob, clip_qkv=None)
        del settings["head_dim"]  # OlmoeConfig derives it
        return settings
