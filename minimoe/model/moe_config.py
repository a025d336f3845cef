"""The settings of an MoE layer (``MoEConfig``): everything but the model width, each field checked.

The fields follow transformers' configs of the same models: ``num_experts``, ``top_k``, ``intermediate_size``
(each routed expert's width F), ``norm_topk_prob``, shared experts (DeepSeekMoE, Llama 4), DeepSeek-V3's
group-limited routing (``n_group``, ``topk_group``, ``routed_scaling_factor``), GShard's ``capacity_factor``
(0 = dropless), and the auxiliary losses' coefficients and convention (``minimoe.model.aux_losses``). A checkpoint's
config.json holds ``to_dict()``; :meth:`MoEConfig.from_dict` refuses unknown and missing keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minimoe.model.aux_losses import AUX_LOSS_CONVENTIONS
from minimoe.model.router import DROPPED_GROUP_VALUES, ROUTER_FAMILIES


@dataclass
class MoEConfig:
    """Everything that defines an MoE layer except the model width (passed to MoELayer)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # F, width of each routed expert
    router: str = "softmax"  # "softmax" (Mixtral, Qwen3-MoE, OLMoE), "deepseek_v3" or "llama4"
    norm_topk_prob: bool = True  # renormalise the k weights to sum to 1 (softmax, deepseek_v3)
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None  # width of each shared expert; None = intermediate_size
    n_group: int = 1  # deepseek_v3: expert groups
    topk_group: int = 1  # deepseek_v3: groups kept per token
    routed_scaling_factor: float = 1.0  # deepseek_v3: multiplies the routed weights
    dropped_group_value: str = "-inf"  # deepseek_v3: "-inf" (DeepSeek) or "zero" (older transformers)
    capacity_factor: float = 0.0  # 0 = dropless; > 0: C = ceil(T·k/E · capacity_factor)
    aux_loss_coef: float = 0.0  # weight of the load-balancing loss in aux_loss
    aux_loss_convention: str = "per_layer"  # over layers: "per_layer" (sum) or "pooled" (transformers), see aux_losses.py
    z_loss_coef: float = 0.0  # weight of the router z-loss in aux_loss
    router_jitter: float = 0.0  # multiplicative router-input noise in training, in [0, 1)

    def __post_init__(self):
        for name in ("num_experts", "top_k", "intermediate_size", "num_shared_experts", "n_group", "topk_group"):
            _require_int(name, getattr(self, name))
        if self.shared_intermediate_size is not None:
            _require_int("shared_intermediate_size", self.shared_intermediate_size)
        for name in ("routed_scaling_factor", "capacity_factor", "aux_loss_coef", "z_loss_coef", "router_jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"MoEConfig.{name} must be a finite number, got {value!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise TypeError(f"MoEConfig.norm_topk_prob must be a bool, got {self.norm_topk_prob!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.intermediate_size < 1:
            raise ValueError(f"intermediate_size={self.intermediate_size} must be >= 1")
        if self.router not in ROUTER_FAMILIES:
            raise ValueError(f"router={self.router!r} must be one of {ROUTER_FAMILIES}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.shared_intermediate_size is not None and self.shared_intermediate_size < 1:
            raise ValueError(f"shared_intermediate_size={self.shared_intermediate_size} must be >= 1")
        if self.n_group < 1 or self.num_experts % self.n_group != 0:
            raise ValueError(f"n_group={self.n_group} must be >= 1 and divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
        kept_experts = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > kept_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {kept_experts} experts in topk_group={self.topk_group} "
                f"of n_group={self.n_group} groups"
            )
        if self.router != "deepseek_v3" and (self.n_group, self.topk_group, self.routed_scaling_factor) != (1, 1, 1.0):
            raise ValueError(
                f"n_group/topk_group/routed_scaling_factor are DeepSeek-V3 options, got n_group={self.n_group}, "
                f"topk_group={self.topk_group}, routed_scaling_factor={self.routed_scaling_factor} "
                f"with router={self.router!r}"
            )
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor} must be > 0")
        if self.dropped_group_value not in DROPPED_GROUP_VALUES:
            raise ValueError(f"dropped_group_value={self.dropped_group_value!r} must be one of {sorted(DROPPED_GROUP_VALUES)}")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be >= 0 (0 means dropless)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"router_jitter={self.router_jitter} must be in [0, 1)")
        if self.aux_loss_convention not in AUX_LOSS_CONVENTIONS:
            raise ValueError(f"aux_loss_convention={self.aux_loss_convention!r} must be one of {AUX_LOSS_CONVENTIONS}")

    @property
    def shared_width(self) -> int:
        """Width of the one SwiGLU that holds all shared experts (0 = none)."""
        return self.num_shared_experts * (self.shared_intermediate_size or self.intermediate_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        """Build from ``to_dict()`` output; every field must be present, no other key allowed (except the fields
        added later, in LATER_FIELDS: a file written before one existed means its default)."""
        if not isinstance(d, dict):
            raise TypeError(f"MoEConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d) - LATER_FIELDS)
        if unknown or missing:
            raise ValueError(f"MoEConfig dict has unknown keys {unknown} and missing keys {missing}")
        return cls(**d)


LATER_FIELDS = {"aux_loss_convention"}  # checkpoints written before it trained with "per_layer", its default


def _require_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MoEConfig.{name} must be an int, got {value!r}")
