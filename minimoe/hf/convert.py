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

Trust the tensors, not the flags. A transformers model computes with the tensors and module attributes it
holds, which its config does not always describe (an untied checkpoint whose config.json says
``tie_word_embeddings=True`` loads two different tensors; a config edited after the model was built changes
nothing). So ``from_hf`` reads the head as tied only when ``lm_head.weight`` is the embedding (or equals it and
the config says tied), finds the MoE layers by their modules and each block's routing by its attributes
(``minimoe.hf.moe_blocks.moe_config_of_block``), and raises a ValueError naming the config field when a tensor's
shape, the RoPE frequencies or a norm's epsilon differ from what the config says; ``to_hf`` ties the exported
head only when our head is our embedding. A config flag overruled by the tensors is named in a UserWarning.

No hub access: models are built from configs, or read from a local directory with ``load_hf(path)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from minimoe.hf.llama import LlamaFamily
from minimoe.hf.moe_blocks import load_moe_block_state_from_hf, moe_block_state_to_hf, moe_config_of_block
from minimoe.hf.moe_models import MixtralFamily, OlmoeFamily, Qwen3MoeFamily
from minimoe.model.transformer import ModelConfig, Transformer

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
    config = _config_from_modules(family.config_from_hf(hf_model.config), hf_model, family)
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
    _check_rope_and_norms(model, hf_model, family)
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
    family, settings = _family_for(_config_of_modules(model), model_type)
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


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two parameters are one tensor (tied), not merely equal."""
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


def _config_from_modules(config: ModelConfig, hf_model, family) -> ModelConfig:
    """``config`` (read from the transformers config) corrected to what the model's tensors and modules compute:
    the head tying, which layers are MoE and each MoE block's routing."""
    embed, head = hf_model.get_input_embeddings().weight, hf_model.get_output_embeddings().weight
    tied = _same_tensor(head, embed) or (config.tie_word_embeddings and head.shape == embed.shape
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


def _check_rope_and_norms(model: Transformer, hf_model, family) -> None:
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


def _config_of_modules(model: Transformer) -> ModelConfig:
    """Our config with the head tying our tensors show; ValueError if a router no longer matches config.moe."""
    tied = _same_tensor(model.lm_head.weight, model.embed.weight)
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


def _moe_layer_index(model: Transformer, name: str) -> int | None:
    """The layer index if ``name`` belongs to an MoE feed-forward block, else None."""
    parts = name.split(".", 3)
    if len(parts) >= 3 and parts[0] == "layers" and parts[2] == "ffn" and model.config.is_moe_layer(int(parts[1])):
        return int(parts[1])
    return None
