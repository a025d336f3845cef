"""transformers interop: the same weights, two implementations, identical logits.

``from_hf(hf_model) -> Transformer`` and ``to_hf(model) -> transformers model`` move a model across by
renaming tensors (and transposing stacked expert weights, see ``minimoe.hf.moe_blocks``); no value is permuted or
re-rounded, so a round trip is exact (``torch.equal`` for every tensor) in any dtype. Both copy the tensors
and keep their dtype and device. transformers' decoder-only families all share Llama's layout:

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
on ``config.model_type`` to a *family* (``minimoe.hf.llama.LlamaFamily`` documents the interface;
``minimoe.hf.moe_models`` holds Mixtral, Qwen3-MoE and OLMoE). An MoE layer's block (``mlp.gate``,
``mlp.experts.*``) is converted as a whole by ``minimoe.hf.moe_blocks``. ``FAMILIES`` lists what is supported.
DeepSeek-V3 and Llama 4 convert at block level only (``minimoe.hf.moe_blocks``): their attention is out of scope.

Trust the tensors, not the flags (``minimoe.hf.trust``): ``from_hf`` converts the configuration the model's
tensors and modules compute, which its config does not always describe (head tying, which layers are MoE, each
block's routing), and raises a ValueError naming the config field when a tensor's shape, the RoPE frequencies or
a norm's epsilon differ from what the config says; ``to_hf`` ties the exported head only when our head is our
embedding. A config flag overruled by the tensors is named in a UserWarning.

No hub access: models are built from configs, or read from a local directory with ``load_hf(path)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimoe.hf.llama import LlamaFamily
from minimoe.hf.moe_blocks import load_moe_block_state_from_hf, moe_block_state_to_hf
from minimoe.hf.moe_models import MixtralFamily, OlmoeFamily, Qwen3MoeFamily
from minimoe.hf.trust import check_rope_and_norms, config_from_modules, config_of_modules
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Transformer

FAMILIES = {family.model_type: family for family in (LlamaFamily, MixtralFamily, Qwen3MoeFamily, OlmoeFamily)}

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

    family, settings = _family_for(config, model_type)
    return getattr(transformers, family.hf_config_class)(**settings)


def _family_for(config: ModelConfig, model_type: str | None):
    """(family, its transformers config keyword arguments); a ValueError says why no family fits."""
    if model_type is None:
        model_type = config.extra.get("hf_model_type")
    if model_type is not None:
        family = family_of(model_type)
        return family, family.config_to_hf(config)
    reasons = []
    for family in FAMILIES.values():
        try:
            return family, family.config_to_hf(config)
        except ValueError as err:
            reasons.append(str(err))
    raise ValueError("no supported transformers family holds this config: " + "; ".join(reasons))


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
    config = config_from_modules(family.config_from_hf(hf_model.config), hf_model, family)
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
        if hf_state[theirs].shape != model.state_dict()[name].shape:
            c = config
            raise ValueError(f"{family.hf_class} tensor {theirs!r} has shape {tuple(hf_state[theirs].shape)}, but its "
                             f"config gives {tuple(model.state_dict()[name].shape)} (hidden_size={c.hidden_size}, "
                             f"num_attention_heads={c.num_heads}, num_key_value_heads={c.num_kv_heads}, head_dim="
                             f"{c.head_dim}, intermediate_size={c.intermediate_size}, vocab_size={c.vocab_size}): "
                             "the config does not describe these tensors")
        state[name] = hf_state[theirs].detach().clone()
        used.add(theirs)
    for index, layer in enumerate(model.layers):
        if config.is_moe_layer(index):
            block_state = hf_model.model.layers[index].mlp.state_dict()
            load_moe_block_state_from_hf(layer.ffn, block_state, family.moe_family)  # checks every key and shape
            used.update(f"model.layers.{index}.mlp.{key}" for key in block_state)
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ValueError(f"{family.hf_class} holds tensors our model has no place for: {unused[:8]}")
    check_rope_and_norms(model, hf_model, family)
    model.load_state_dict(state, strict=False)  # strict=False only for the MoE blocks, loaded above
    return model.train(hf_model.training)


def to_hf(model: Transformer, model_type: str | None = None, attn_implementation: str = "sdpa"):
    """A transformers causal LM with our weights (copied, same dtype and device).

    ``attn_implementation`` is passed to transformers ("eager" for bit-level comparisons, "sdpa" default).
    The head is exported tied iff ``model.lm_head.weight`` is ``model.embed.weight``. Raises ValueError when no
    family holds the model or when an MoE layer's router no longer matches ``config.moe``; warns (UserWarning)
    about training settings transformers cannot hold (see ``minimoe.hf.moe_models``).
    """
    import transformers

    if not isinstance(model, Transformer):
        raise TypeError(f"to_hf expects a minimoe Transformer, got {type(model).__name__}")
    family, settings = _family_for(config_of_modules(model), model_type)
    hf_config = getattr(transformers, family.hf_config_class)(**settings)
    hf_config._attn_implementation = attn_implementation
    hf_model = getattr(transformers, family.hf_class)(hf_config)
    state = state_to_hf(model, family.model_type)
    expected = hf_model.state_dict()
    wrong = sorted(set(expected) ^ set(state))
    wrong += [key for key in state if key in expected and state[key].shape != expected[key].shape]
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
    family, _ = _family_for(model.config, model_type)
    state = {}
    for name, tensor in model.state_dict().items():
        if _moe_layer_index(model, name) is None:
            state[hf_name(name)] = tensor.detach().clone()
    for index, layer in enumerate(model.layers):
        if model.config.is_moe_layer(index):
            block_state = moe_block_state_to_hf(layer.ffn, family.moe_family)
            state.update({f"model.layers.{index}.mlp.{key}": value.detach().clone()
                          for key, value in block_state.items()})
    return state


def load_hf(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on a local directory only (never the hub). Raises
    FileNotFoundError for a path that is not a folder, ValueError for a config that routes to more experts than
    it has (``check_routing_config``)."""
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a local directory holding a transformers checkpoint")
    check_routing_config(Path(path) / "config.json")
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # the families' names for it


def check_routing_config(path) -> None:
    """A transformers config.json routes to no more experts than it has: raises ValueError naming the file when
    ``num_experts_per_tok`` exceeds the expert count (the router's top-k would fail mid-forward)."""
    import json

    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return  # a missing or damaged file is reported by from_pretrained
    if not isinstance(config, dict):
        return
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    top_k = config.get("num_experts_per_tok")
    for key in EXPERT_COUNT_KEYS:
        count = config.get(key)
        if isinstance(top_k, int) and isinstance(count, int) and count > 0 and top_k > count:
            raise ValueError(f"{path}: num_experts_per_tok={top_k} is more than the {count} experts ({key}={count}); "
                             f"expected at most {count}")


def _moe_layer_index(model: Transformer, name: str) -> int | None:
    """The layer index if ``name`` belongs to an MoE feed-forward block, else None."""
    parts = name.split(".", 3)
    if len(parts) >= 3 and parts[0] == "layers" and parts[2] == "ffn" and model.config.is_moe_layer(int(parts[1])):
        return int(parts[1])
    return None
