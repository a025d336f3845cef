"""transformers interop: the same weights, two implementations, identical logits.

``from_hf(hf_model) -> Transformer`` and ``to_hf(model) -> transformers model`` move a model across by
renaming tensors; no tensor is transposed, permuted or re-rounded, so a round trip is exact
(``torch.equal`` for every tensor). transformers' decoder-only families all share Llama's layout:

    ours                            transformers
    embed.weight                    model.embed_tokens.weight
    layers.{i}.attn_norm.*          model.layers.{i}.input_layernorm.*
    layers.{i}.attn.{q,k,v,o}_proj  model.layers.{i}.self_attn.{q,k,v,o}_proj   (weights, optional biases)
    layers.{i}.attn.{q,k}_norm      model.layers.{i}.self_attn.{q,k}_norm       (Qwen3-MoE, OLMoE)
    layers.{i}.ffn_norm.*           model.layers.{i}.post_attention_layernorm.*
    layers.{i}.ffn.{gate,up,down}_proj  model.layers.{i}.mlp.{gate,up,down}_proj   (a dense SwiGLU layer)
    norm.weight                     model.norm.weight
    lm_head.weight                  lm_head.weight                              (tied: the embedding)

What differs between families is the config and the MoE feed-forward block, so the conversion dispatches
on ``config.model_type`` to a *family* object (``minimoe.hf_llama.LlamaFamily`` is the model):
``config_from_hf``, ``config_to_hf``, ``matches`` and ``moe_family`` (None for dense models, else the
name ``minimoe.hf_moe`` uses to convert that family's MoE blocks). ``FAMILIES`` lists the supported ones.

No hub access: models are built from configs, or read from a local directory with ``load_hf(path)``.
"""

from __future__ import annotations

import torch

from .hf_llama import LlamaFamily
from .model import ModelConfig, Transformer

FAMILIES = {family.model_type: family for family in (LlamaFamily,)}

TOP_LEVEL_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "lm_head.weight": "lm_head.weight"}
LAYER_PREFIXES = (("attn_norm.", "input_layernorm."), ("attn.", "self_attn."),
                  ("ffn_norm.", "post_attention_layernorm."), ("ffn.", "mlp."))


def hf_name(name: str) -> str:
    """The transformers name of one of our parameter names (see the table in the module docstring)."""
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    parts = name.split(".", 2)  # "layers", i, rest
    if len(parts) == 3 and parts[0] == "layers":
        for ours, theirs in LAYER_PREFIXES:
            if parts[2].startswith(ours):
                return f"model.layers.{parts[1]}.{theirs}{parts[2][len(ours):]}"
    raise ValueError(f"no transformers name for parameter {name!r}")


def family_of(model_type: str):
    """The conversion family for a transformers ``model_type``; a ValueError lists the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _moe_module():
    try:
        from . import hf_moe
    except ImportError as err:
        raise ValueError(f"MoE conversion needs minimoe.hf_moe, which could not be imported ({err})") from None
    return hf_moe


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------


def config_from_hf(hf_config) -> ModelConfig:
    """Our ``ModelConfig`` for a transformers config (ValueError for anything we cannot compute)."""
    return family_of(getattr(hf_config, "model_type", None)).config_from_hf(hf_config)


def config_to_hf(config: ModelConfig, model_type: str | None = None):
    """A transformers config for ours. ``model_type`` picks the family; by default the one recorded when
    the model came from transformers, else the first family that can hold the config."""
    import transformers

    family = _family_for(config, model_type)
    config_class = getattr(transformers, family.hf_config_class)
    return config_class(**family.config_to_hf(config))


def _family_for(config: ModelConfig, model_type: str | None):
    if model_type is None:
        model_type = config.extra.get("hf_model_type")
    if model_type is not None:
        family = family_of(model_type)
        if not family.matches(config):
            raise ValueError(f"a {model_type!r} model cannot hold this config (moe={config.moe}, "
                             f"qk_norm={config.qk_norm!r})")
        return family
    for family in FAMILIES.values():
        if family.matches(config):
            return family
    raise ValueError(f"no supported transformers family holds this config (moe={config.moe}, "
                     f"qk_norm={config.qk_norm!r}); supported: {sorted(FAMILIES)}")


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


def from_hf(hf_model) -> Transformer:
    """Our ``Transformer`` with the weights (copied, same dtype and device) of a transformers causal LM."""
    if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "config"):
        raise TypeError(f"from_hf expects a transformers model, got {type(hf_model).__name__}")
    family = family_of(getattr(hf_model.config, "model_type", None))
    if type(hf_model).__name__ != family.hf_class:
        raise TypeError(f"from_hf expects a {family.hf_class} (a causal LM with its head), "
                        f"got {type(hf_model).__name__}")
    config = family.config_from_hf(hf_model.config)
    reference = hf_model.get_input_embeddings().weight
    model = Transformer(config).to(device=reference.device, dtype=reference.dtype)

    hf_state = hf_model.state_dict()
    used, state = set(), {}
    for name in model.state_dict():
        index = _moe_layer_index(model, name)
        if index is not None:
            continue  # MoE blocks are converted as a whole below
        theirs = hf_name(name)
        if theirs not in hf_state:
            raise ValueError(f"{family.hf_class} has no tensor {theirs!r} (for our {name!r})")
        state[name] = hf_state[theirs].detach().clone()
        used.add(theirs)
    for index, layer in enumerate(model.layers):
        if config.is_moe_layer(index):
            hf_block = hf_model.model.layers[index].mlp
            layer.ffn = _moe_module().moe_from_hf_block(hf_block, family.moe_family).to(
                device=reference.device, dtype=reference.dtype)
            used.update(f"model.layers.{index}.mlp.{key}" for key in hf_block.state_dict())
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ValueError(f"{family.hf_class} holds tensors our model has no place for: {unused[:8]}")
    model.load_state_dict(state, strict=False)  # strict=False only for the MoE blocks, set above
    return model.train(hf_model.training)


def to_hf(model: Transformer, model_type: str | None = None, attn_implementation: str = "sdpa"):
    """A transformers causal LM with our weights (copied, same dtype and device).

    ``attn_implementation`` is passed to transformers ("eager" for bit-level comparisons, "sdpa" default).
    """
    import transformers

    if not isinstance(model, Transformer):
        raise TypeError(f"to_hf expects a minimoe Transformer, got {type(model).__name__}")
    family = _family_for(model.config, model_type)
    hf_config = config_to_hf(model.config, family.model_type)
    hf_config._attn_implementation = attn_implementation
    hf_model = getattr(transformers, family.hf_class)(hf_config)
    state = state_to_hf(model, family.model_type)
    expected = hf_model.state_dict()
    wrong = sorted(set(expected) ^ set(state)) + [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"our weights do not fit {family.hf_class}: {wrong[:8]}")
    with torch.no_grad():
        # replace each parameter's data: dtype and device follow ours, tied parameters stay one object, and
        # transformers' float32 RoPE buffers are not rounded (hf_model.to(bfloat16) would round them)
        for name, parameter in hf_model.named_parameters():
            parameter.data = state[name]
    hf_config.dtype = model.embed.weight.dtype
    return hf_model.to(device=model.embed.weight.device).train(model.training)


def state_to_hf(model: Transformer, model_type: str | None = None) -> dict[str, torch.Tensor]:
    """Our weights under transformers names (detached copies), ready for ``load_state_dict``."""
    family = _family_for(model.config, model_type)
    state = {}
    for name, tensor in model.state_dict().items():
        if _moe_layer_index(model, name) is None:
            state[hf_name(name)] = tensor.detach().clone()
    for index, layer in enumerate(model.layers):
        if model.config.is_moe_layer(index):
            block_state = _moe_module().moe_block_state_to_hf(layer.ffn, family.moe_family)
            state.update({f"model.layers.{index}.mlp.{key}": value.detach().clone()
                          for key, value in block_state.items()})
    return state


def load_hf(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on a local directory only (never the hub)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a local directory holding a transformers checkpoint")
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)


def _moe_layer_index(model: Transformer, name: str) -> int | None:
    """The layer index if ``name`` belongs to an MoE feed-forward block, else None."""
    parts = name.split(".", 3)
    if len(parts) >= 3 and parts[0] == "layers" and parts[2] == "ffn" and model.config.is_moe_layer(int(parts[1])):
        return int(parts[1])
    return None
