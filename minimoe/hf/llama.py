"""Config conversion between transformers' Llama family and our ``ModelConfig``.

A transformers config and a ``ModelConfig`` describe the same decoder with different names:

    LlamaConfig                                  ModelConfig
    num_hidden_layers                            num_layers
    num_attention_heads / num_key_value_heads    num_heads / num_kv_heads
    max_position_embeddings                      max_seq_len
    initializer_range                            init_std
    rope_parameters["rope_theta"]                rope_theta
    rope_parameters (rope_type "llama3")         rope_scaling (factor, low/high_freq_factor,
                                                 original_max_position_embeddings)
    vocab_size, hidden_size, head_dim, intermediate_size, rms_norm_eps,
    tie_word_embeddings, attention_bias          the same names

Only what our model computes is accepted: SiLU gating, RoPE "default" or "llama3" over the whole head,
full (not sliding-window) attention, no MLP biases. Anything else raises a ValueError naming the field,
because a silently different model is worse than no model. The token ids (bos / eos / pad) do not change
the logits; they travel in ``ModelConfig.extra`` so that a round trip keeps them.

The helpers ``rope_from_hf``, ``rope_to_hf``, ``check_hf_common``, ``common_from_hf`` and ``common_to_hf`` are
shared by the MoE families (``minimoe.hf.moe_models``: Mixtral, Qwen3-MoE, OLMoE), whose attention and RoPE
are Llama's.
"""

from __future__ import annotations

from minimoe.model.dense import ROPE_SCALING_KEYS
from minimoe.model.model_config import ModelConfig

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def rope_from_hf(hf_config) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a transformers config's ``rope_parameters``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})  # transformers >= 5 keeps RoPE here
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported, got {params}")
    rope_type = params.get("rope_type", "default")
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported: RoPE must rotate the whole head (1.0)")
    if "rope_theta" not in params:
        raise ValueError(f"rope_parameters has no rope_theta: {params}")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        missing = [key for key in ROPE_SCALING_KEYS if key not in params]
        if missing:
            raise ValueError(f"rope_parameters of type 'llama3' lacks {missing}: {params}")
        return theta, {key: params[key] for key in ROPE_SCALING_KEYS}
    raise ValueError(f"rope_type={rope_type!r} is not supported; expected 'default' or 'llama3'")


def rope_to_hf(config: ModelConfig) -> dict:
    """The transformers ``rope_parameters`` dict for our RoPE settings."""
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    return {"rope_type": "llama3", "rope_theta": float(config.rope_theta),
            **{key: config.rope_scaling[key] for key in ROPE_SCALING_KEYS}}


def check_hf_common(hf_config) -> None:
    """Reject what every family here shares and our model does not compute."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; SwiGLU needs 'silu'")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported: our feed-forward layers have no biases")
    if getattr(hf_config, "use_sliding_window", None) or (
            getattr(hf_config, "use_sliding_window", None) is None and getattr(hf_config, "sliding_window", None)):
        raise ValueError(f"sliding-window attention (sliding_window={hf_config.sliding_window}) is not "
                         "supported; our attention is full causal")
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        raise ValueError(f"layer_types={layer_types} is not supported; every layer must be 'full_attention'")


def common_from_hf(hf_config, qk_norm: str | None) -> dict:
    """The ``ModelConfig`` fields every family here spells the same way (attention, norms, RoPE, sizes)."""
    check_hf_common(hf_config)
    theta, scaling = rope_from_hf(hf_config)
    extra = {"hf_model_type": hf_config.model_type}
    extra.update({key: getattr(hf_config, key, None) for key in TOKEN_ID_KEYS})
    return dict(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        rms_norm_eps=float(hf_config.rms_norm_eps), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qk_norm=qk_norm, attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)), extra=extra,
    )


def common_to_hf(config: ModelConfig) -> dict:
    """The transformers config keyword arguments every family here spells the same way."""
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        hidden_act="silu", max_position_embeddings=config.max_seq_len, initializer_range=config.init_std,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope_to_hf(config), attention_bias=config.attention_bias,
        **{key: config.extra.get(key) for key in TOKEN_ID_KEYS},
    )


class LlamaFamily:
    """``LlamaForCausalLM`` <-> a dense ``Transformer`` (no q/k norm, SwiGLU in every layer).

    A family: ``config_from_hf`` reads a transformers config; ``config_to_hf`` returns the keyword arguments
    of ``hf_config_class`` or raises a ValueError naming what the family cannot hold; ``moe_family`` is the
    ``minimoe.hf.moe_blocks`` name of its MoE blocks (None: dense).
    """

    model_type, hf_class, hf_config_class, moe_family = "llama", "LlamaForCausalLM", "LlamaConfig", None

    @staticmethod
    def config_from_hf(hf_config) -> ModelConfig:
        return ModelConfig(**common_from_hf(hf_config, qk_norm=None), intermediate_size=hf_config.intermediate_size)

    @staticmethod
    def config_to_hf(config: ModelConfig) -> dict:
        if config.moe is not None or config.qk_norm is not None:
            raise ValueError(f"a 'llama' model has no MoE layers and no q/k norm, got "
                             f"moe={'set' if config.moe is not None else None}, qk_norm={config.qk_norm!r}")
        return dict(common_to_hf(config), intermediate_size=config.intermediate_size, mlp_bias=False)
