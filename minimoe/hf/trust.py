"""Trust the tensors, not the flags: the configuration a model's tensors and modules compute.

A transformers model computes with the tensors and module attributes it holds, which its config does not always
describe: an untied checkpoint whose config.json says ``tie_word_embeddings=True`` loads two different tensors,
and a config edited after the model was built changes nothing. ``minimoe.hf.convert`` therefore converts what
these functions read from the modules: the head is tied only when ``lm_head.weight`` is the embedding (or equals
it and the config says tied), the MoE layers are those whose block holds experts, each block's routing is read
from its attributes (``minimoe.hf.moe_blocks.moe_config_of_block``), and RoPE frequencies and norm epsilons must
be those of the config (``config_from_modules``, ``check_rope_and_norms``). The other way, ``to_hf`` exports
the head tied only when our ``lm_head.weight`` is our embedding, and refuses a model whose routers no longer
match ``config.moe`` (``config_of_modules``). A flag the tensors overrule is named in a UserWarning; a
difference the conversion cannot carry raises a ValueError naming the config field.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from minimoe.hf.moe_blocks import moe_config_of_block
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Transformer


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two parameters are one tensor (tied), not merely equal."""
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


def config_from_modules(config: ModelConfig, hf_model, family) -> ModelConfig:
    """``config`` (read from the transformers config) corrected to what the model's tensors and modules compute:
    the head tying, which layers are MoE and each MoE block's routing."""
    embed, head = hf_model.get_input_embeddings().weight, hf_model.get_output_embeddings().weight
    tied = same_tensor(head, embed) or (config.tie_word_embeddings and head.shape == embed.shape
                                         and torch.equal(head, embed))
    if config.tie_word_embeddings and not tied:
        warnings.warn(f"{family.hf_class}: the config says tie_word_embeddings=True, but lm_head.weight differs "
                      "from model.embed_tokens.weight: converted untied, as transformers computes",
                      UserWarning, stacklevel=3)
    changes = dict(tie_word_embeddings=tied)
    layers = hf_model.model.layers
    moe_ids = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts")]  # MoE blocks hold experts
    flagged = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    if family.moe_family is None or not moe_ids:
        if moe_ids or flagged:
            raise ValueError(f"{family.hf_class} has MoE blocks in layers {moe_ids}, its config expects {flagged}")
        return dataclasses.replace(config, **changes)
    if moe_ids != flagged:
        warnings.warn(f"{family.hf_class}: the config's MoE layers are {flagged}, the model's modules have MoE "
                      f"blocks in layers {moe_ids}: converted as the modules are", UserWarning, stacklevel=3)
    blocks = {i: moe_config_of_block(layers[i].mlp, family.moe_family, hf_model.config) for i in moe_ids}
    first = blocks[moe_ids[0]]
    odd = [i for i in moe_ids if blocks[i] != first]
    if odd:
        other = blocks[odd[0]]
        fields = [f.name for f in dataclasses.fields(first) if getattr(first, f.name) != getattr(other, f.name)]
        raise ValueError(f"{family.hf_class}: MoE layer {odd[0]} routes differently from layer {moe_ids[0]} "
                         f"({fields}); minimoe holds one MoE configuration for all layers")
    changes.update(moe=first, moe_layers=None if len(moe_ids) == config.num_layers else moe_ids)
    return dataclasses.replace(config, **changes)


def check_rope_and_norms(model: Transformer, hf_model, family) -> None:
    """ValueError if transformers' RoPE frequencies or RMSNorm epsilons are not those of our config."""
    rotary = getattr(hf_model.model, "rotary_emb", None)
    if rotary is not None:
        theirs = rotary.inv_freq.detach().float().cpu()
        rtol = max(1e-6, torch.finfo(rotary.inv_freq.dtype).eps)  # hf_model.to(bfloat16) rounds the buffer
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        if theirs.shape != model.inv_freq.shape or not torch.allclose(theirs, model.inv_freq, rtol=rtol) \
                or scaling != 1.0:
            raise ValueError(f"{family.hf_class}'s RoPE frequencies (model.rotary_emb.inv_freq, attention_scaling="
                             f"{scaling}) are not those its config's rope_parameters give "
                             f"(rope_theta={model.config.rope_theta}, scaling={model.config.rope_scaling})")
    for name, module in hf_model.named_modules():
        eps = getattr(module, "variance_epsilon", None)
        if eps is not None and eps != model.config.rms_norm_eps:
            raise ValueError(f"{family.hf_class} norm {name!r} uses eps={eps}, its config says "
                             f"rms_norm_eps={model.config.rms_norm_eps}")


def config_of_modules(model: Transformer) -> ModelConfig:
    """Our config with the head tying our tensors show; ValueError if a router no longer matches config.moe."""
    tied = same_tensor(model.lm_head.weight, model.embed.weight)
    if tied != model.config.tie_word_embeddings:
        warnings.warn(f"the model's config says tie_word_embeddings={model.config.tie_word_embeddings}, but lm_head."
                      f"weight {'is' if tied else 'is not'} embed.weight: exported {'tied' if tied else 'untied'}",
                      UserWarning, stacklevel=3)
    moe = model.config.moe
    for index, layer in enumerate(model.layers):
        if not model.config.is_moe_layer(index):
            continue
        router = layer.ffn.router
        for attr, want in (("num_experts", moe.num_experts), ("top_k", moe.top_k), ("family", moe.router),
                           ("norm_topk_prob", moe.norm_topk_prob), ("jitter", moe.router_jitter)):
            if getattr(router, attr) != want:
                raise ValueError(f"layer {index}'s router has {attr}={getattr(router, attr)!r}, but config.moe says "
                                 f"{want!r}: the config was changed after the model was built; rebuild the model")
    return dataclasses.replace(model.config, tie_word_embeddings=tied)
