"""The settings of a model (``ModelConfig``): every size and switch of ``minimoe.model.transformer.Transformer``.

The fields follow transformers' Llama config where one exists: ``vocab_size``, ``hidden_size``, ``num_layers``
(``num_hidden_layers``), ``num_heads`` and ``num_kv_heads`` (grouped-query attention), ``head_dim``,
``intermediate_size`` (by default Meta's rule, ``minimoe.model.dense.ffn_hidden_size``), ``rms_norm_eps``,
``rope_theta`` and Llama 3.1's ``rope_scaling``, ``tie_word_embeddings``, ``attention_bias``; ``qk_norm`` adds
Qwen3-MoE's and OLMoE's query/key norms, ``moe`` (a ``minimoe.model.moe_config.MoEConfig``) and ``moe_layers``
which layers are MoE. Every field is checked when the config is built; a checkpoint's config.json holds
``to_dict()``, and :meth:`ModelConfig.from_dict` refuses unknown and missing keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from minimoe.model.dense import ffn_hidden_size, rope_inv_freq
from minimoe.model.moe_config import MoEConfig


@dataclass
class ModelConfig:
    """Every size and switch of the model. Defaults describe a tiny Llama 3 that runs anywhere."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: Meta's rule, ffn_hidden_size(hidden_size, ffn_multiple_of, ...)
    ffn_multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # Llama 3.1: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    qk_norm: str | None = None  # None | "head" (Qwen3) | "full" (OLMoE)
    attention_bias: bool = False
    moe: object | None = None  # a minimoe.model.moe_config.MoEConfig (or its dict) for the MoE layers
    moe_layers: list[int] | None = None  # which layers are MoE; None: all layers when `moe` is set
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the tokenizer used); not read by the model

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "ffn_multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                                 "pick a divisor or set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must be positive and divide num_heads={self.num_heads}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number (RoPE rotates pairs), got {self.head_dim}")
        if self.intermediate_size is None:
            self.intermediate_size = ffn_hidden_size(self.hidden_size, self.ffn_multiple_of, self.ffn_dim_multiplier)
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {self.qk_norm!r}")
        if self.rope_scaling is not None:
            rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # validates the keys
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if self.moe_layers is not None:
            if self.moe is None:
                raise ValueError(f"moe_layers={self.moe_layers} given but moe is None")
            bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"moe_layers {bad} are not layer indices in [0, {self.num_layers})")
            self.moe_layers = sorted(set(self.moe_layers))

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and (self.moe_layers is None or index in self.moe_layers)

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["moe"] = None if self.moe is None else self.moe.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Strict: every field must be present and no other key may be (a config file is a contract)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"model config: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "ModelConfig":
        """Read a config.json; raises ValueError naming ``path`` when it is not JSON or not a valid config."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:  # a missing or unknown key, or a value of the wrong kind
            raise ValueError(f"{path}: {error}") from None
