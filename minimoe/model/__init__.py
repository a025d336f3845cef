"""The model: a Llama 3 decoder whose feed-forward can be a Mixture-of-Experts layer.

Read in this order: ``dense`` (RMSNorm, RoPE with Llama 3.1 scaling, grouped-query attention with a KV cache,
SwiGLU; chapter 1), ``router``, ``aux_losses``, ``moe_config`` and ``moe`` (top-k routers, the load-balancing and
z-losses, the MoE layer's settings and the layer; chapter 2; on CUDA the ``*_triton`` kernels),
``model_config`` and ``transformer`` (the whole language model's settings, the model, its loss and checkpoints)
and ``generate`` (sampling).
Everything else in minimoe builds on this part; it imports nothing from the others.
"""

from minimoe.model.dense import Attention, FeedForward, KVCache, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from minimoe.model.generate import generate
from minimoe.model.moe import MoEConfig, MoELayer, expert_capacity
from minimoe.model.aux_losses import load_balancing_loss, router_z_loss
from minimoe.model.router import Router, RoutingResult
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Block, Transformer, lm_loss

__all__ = ["Attention", "Block", "FeedForward", "KVCache", "ModelConfig", "MoEConfig", "MoELayer", "RMSNorm",
           "Router", "RoutingResult", "Transformer", "apply_rope", "expert_capacity", "generate",
           "lm_loss", "load_balancing_loss", "rope_cos_sin", "rope_inv_freq", "router_z_loss"]
