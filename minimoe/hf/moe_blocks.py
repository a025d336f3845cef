"""Block-level interop with transformers 5 MoE blocks: configs and weights, both ways.

Families and the transformers block each one converts (transformers >= 5.17):

| family        | block                      | keys (relative to the block) and transformers' shapes      |
|---------------|----------------------------|-------------------------------------------------------------|
| "mixtral"     | ``MixtralSparseMoeBlock``  | ``gate.weight`` (E, H), ``experts.gate_up_proj`` (E, 2F, H), |
| "qwen3_moe"   | ``Qwen3MoeSparseMoeBlock`` | ``experts.down_proj`` (E, H, F)                              |
| "olmoe"       | ``OlmoeSparseMoeBlock``    |                                                             |
| "deepseek_v3" | ``DeepseekV3MoE``          | the same plus ``gate.e_score_correction_bias`` (E,) and      |
|               |                            | ``shared_experts.{gate,up,down}_proj.weight``               |
| "llama4"      | ``Llama4TextMoe``          | ``router.weight`` (E, H), ``experts.gate_up_proj`` (E, H, 2F),|
|               |                            | ``experts.down_proj`` (E, F, H), ``shared_expert.*``         |

transformers stores the fused gate/up projection with the gate in the first F rows (columns
for Llama 4), like ``minimoe.model.moe``; only the transposition differs (see the layout in moe.py).

Scope: this module converts MoE *blocks*. Full-model conversion of Mixtral, Qwen3-MoE and
OLMoE lives in ``minimoe.hf.convert`` and ``minimoe.hf.trust``, which use these functions; DeepSeek-V3
(multi-head latent attention) and Llama 4 (chunked attention, no-RoPE layers, qk-norm) are converted at block
level only: their attention variants are out of scope for minimoe.

DeepSeek-V3's dropped-group convention is a property of the installed transformers code, not
of the config: ``transformers_dropped_group_value()`` measures it on a four-expert router
(transformers 5.17 and 5.24 both fill dropped groups with -inf, like DeepSeek's own code).

Trust the modules, not the flags: a transformers block computes with the attributes and tensors
it was built with (``gate.top_k``, ``gate.norm_topk_prob``, the weights' shapes), which a config
edited afterwards no longer describes. ``moe_config_of_block`` reads those; a config passed
along contributes only the training knobs, and a flag that disagrees with the block is reported
with a warning. The load-balancing loss follows transformers: Mixtral, Qwen3-MoE and OLMoE pool
it over layers (``aux_loss_convention="pooled"``, coefficient ``router_aux_loss_coef`` when
``output_router_logits``); transformers' DeepSeek-V3 and Llama 4 compute none (coefficient 0).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.model.moe import MoEConfig, MoELayer

FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "llama4")
_SOFTMAX_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")
_SHARED_PREFIX = {"deepseek_v3": "shared_experts", "llama4": "shared_expert"}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def transformers_dropped_group_value() -> str:
    """'-inf' or 'zero': how the installed transformers' DeepSeek-V3 router fills dropped groups.

    Four experts in two groups, all logits 0 (s = 0.5), bias [0, -0.8, -0.6, -0.6]: biased
    scores [0.5, -0.3, -0.1, -0.1]; group 0 (sum 0.2) is kept, group 1 (-0.2) dropped. With -inf
    the top-2 is {0, 1}; with 0.0 it is expert 0 and one expert of the dropped group.
    """
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(
        hidden_size=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0,
    )  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.zero_()
        router.e_score_correction_bias.copy_(torch.tensor([0.0, -0.8, -0.6, -0.6]))
        expert_ids = router(torch.ones(1, 1))[2]
    return "-inf" if set(expert_ids[0].tolist()) == {0, 1} else "zero"


def moe_config_from_hf(hf_config, family: str) -> MoEConfig:
    """The MoEConfig of one MoE block of a transformers config of the given family."""
    _check_family(family)
    if hasattr(hf_config, "get_text_config"):
        hf_config = hf_config.get_text_config()  # Llama 4's composite config -> its text config
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"only SwiGLU (hidden_act='silu') experts are supported, got {hf_config.hidden_act!r}")
    balanced = family in _SOFTMAX_FAMILIES and getattr(hf_config, "output_router_logits", False)
    aux_loss_coef = float(hf_config.router_aux_loss_coef) if balanced else 0.0  # as transformers trains it
    common = dict(top_k=hf_config.num_experts_per_tok, aux_loss_coef=aux_loss_coef, aux_loss_convention="pooled")
    if family == "mixtral":
        return MoEConfig(
            num_experts=hf_config.num_local_experts, intermediate_size=hf_config.intermediate_size,
            router="softmax", norm_topk_prob=True, router_jitter=float(hf_config.router_jitter_noise), **common,
        )  # fmt: skip
    if family in ("qwen3_moe", "olmoe"):
        width = hf_config.moe_intermediate_size if family == "qwen3_moe" else hf_config.intermediate_size
        return MoEConfig(
            num_experts=hf_config.num_experts, intermediate_size=width, router="softmax",
            norm_topk_prob=bool(hf_config.norm_topk_prob), **common,
        )  # fmt: skip
    if family == "deepseek_v3":
        return MoEConfig(
            num_experts=hf_config.n_routed_experts, intermediate_size=hf_config.moe_intermediate_size,
            router="deepseek_v3", norm_topk_prob=bool(hf_config.norm_topk_prob),
            num_shared_experts=hf_config.n_shared_experts or 0, n_group=hf_config.n_group,
            topk_group=hf_config.topk_group, routed_scaling_factor=float(hf_config.routed_scaling_factor),
            dropped_group_value=transformers_dropped_group_value(), **common,
        )  # fmt: skip
    return MoEConfig(  # llama4: one shared expert as wide as a routed one
        num_experts=hf_config.num_local_experts, intermediate_size=hf_config.intermediate_size,
        router="llama4", num_shared_experts=1, **common,
    )  # fmt: skip


def _check_silu(module: nn.Module, what: str) -> None:
    act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
    probe = torch.linspace(-4, 4, 9)
    if act is None or not torch.allclose(act(probe), F.silu(probe)):
        raise ValueError(f"only SwiGLU (silu) experts are supported, the block's {what} uses {act}")


def moe_config_from_hf_block(hf_block: nn.Module, family: str) -> MoEConfig:
    """The MoEConfig read off a transformers MoE block's own attributes and weight shapes.

    No training knobs: aux_loss_coef is 0 (the convention is transformers', "pooled")."""
    _check_family(family)
    experts = hf_block.experts
    _check_silu(experts, "experts")
    if family == "llama4":
        _check_silu(hf_block.shared_expert, "shared expert")
        return MoEConfig(
            num_experts=hf_block.router.weight.shape[0], top_k=hf_block.router.top_k,
            intermediate_size=experts.gate_up_proj.shape[2] // 2, router="llama4", num_shared_experts=1,
            aux_loss_convention="pooled",
        )  # fmt: skip
    gate, width = hf_block.gate, experts.gate_up_proj.shape[1] // 2
    if family == "deepseek_v3":
        _check_silu(hf_block.shared_experts, "shared experts")
        shared = hf_block.shared_experts.gate_proj.weight.shape[0]  # n_shared_experts · moe_intermediate_size
        return MoEConfig(
            num_experts=gate.weight.shape[0], top_k=gate.top_k, intermediate_size=width, router="deepseek_v3",
            norm_topk_prob=bool(gate.norm_topk_prob), n_group=gate.num_group, topk_group=gate.topk_group,
            routed_scaling_factor=float(gate.routed_scaling_factor),
            dropped_group_value=transformers_dropped_group_value(), aux_loss_convention="pooled",
            num_shared_experts=shared // width if shared % width == 0 else 1,
            shared_intermediate_size=None if shared % width == 0 else shared,
        )  # fmt: skip
    return MoEConfig(
        num_experts=gate.weight.shape[0], top_k=gate.top_k, intermediate_size=width,
        router="softmax", norm_topk_prob=bool(getattr(gate, "norm_topk_prob", True)),  # Mixtral always renormalises
        router_jitter=float(getattr(hf_block, "jitter_noise", 0.0)), aux_loss_convention="pooled",
    )  # fmt: skip


TRAINING_FIELDS = ("aux_loss_coef", "aux_loss_convention", "z_loss_coef", "capacity_factor")


def moe_config_of_block(hf_block: nn.Module, family: str, hf_config=None) -> MoEConfig:
    """The MoEConfig a transformers block computes with: its modules' attributes and weight shapes, plus the
    training knobs (``TRAINING_FIELDS``) of ``hf_config`` when given. A config flag that disagrees with the block
    is named in a UserWarning; the block wins, because it is what transformers runs."""
    computed = moe_config_from_hf_block(hf_block, family)
    if hf_config is None:
        return computed
    flags = moe_config_from_hf(hf_config, family)
    differ = [f"{f.name}={getattr(flags, f.name)!r} in the config, {getattr(computed, f.name)!r} in the block"
              for f in dataclasses.fields(MoEConfig) if f.name not in TRAINING_FIELDS
              and f.name not in ("num_shared_experts", "shared_intermediate_size")
              and getattr(flags, f.name) != getattr(computed, f.name)]
    if flags.shared_width != computed.shared_width:
        differ.append(f"shared expert width {flags.shared_width} in the config, {computed.shared_width} in the block")
    if differ:
        warnings.warn(f"{type(hf_block).__name__}: the config does not describe the block it built ("
                      + "; ".join(differ) + "): converted as the block computes", UserWarning, stacklevel=2)
    return dataclasses.replace(computed, **{name: getattr(flags, name) for name in TRAINING_FIELDS})


def _hf_shapes(layer: MoELayer, family: str) -> dict[str, tuple[int, ...]]:
    """The state-dict keys (relative to the block) and shapes transformers uses for this layer."""
    c, H = layer.config, layer.hidden_size
    E, Fe = c.num_experts, c.intermediate_size
    if family in _SOFTMAX_FAMILIES:
        if c.router != "softmax" or c.shared_width:
            raise ValueError(f"family {family!r} needs router='softmax' and no shared expert, got {c.router!r}, "
                             f"{c.num_shared_experts} shared")  # fmt: skip
        return {"gate.weight": (E, H), "experts.gate_up_proj": (E, 2 * Fe, H), "experts.down_proj": (E, H, Fe)}
    if c.router != family:
        raise ValueError(f"family {family!r} needs router={family!r}, the layer has router={c.router!r}")
    if family == "llama4" and c.shared_width != Fe:
        raise ValueError(f"llama4 needs one shared expert of width {Fe}, the layer has width {c.shared_width}")
    shapes = {
        "deepseek_v3": {"gate.weight": (E, H), "gate.e_score_correction_bias": (E,),
                        "experts.gate_up_proj": (E, 2 * Fe, H), "experts.down_proj": (E, H, Fe)},
        "llama4": {"router.weight": (E, H), "experts.gate_up_proj": (E, H, 2 * Fe), "experts.down_proj": (E, Fe, H)},
    }[family]  # fmt: skip
    if c.shared_width:
        prefix, S = _SHARED_PREFIX[family], c.shared_width
        shapes.update({f"{prefix}.gate_proj.weight": (S, H), f"{prefix}.up_proj.weight": (S, H),
                       f"{prefix}.down_proj.weight": (H, S)})  # fmt: skip
    return shapes


def _ours(layer: MoELayer, family: str) -> dict[str, tuple[torch.Tensor, bool]]:
    """HF key -> (our tensor, whether HF stores it transposed in its last two dims)."""
    transposed = family != "llama4"
    router_key = "router.weight" if family == "llama4" else "gate.weight"
    ours = {
        router_key: (layer.router.weight, False),
        "experts.gate_up_proj": (layer.gate_up_proj, transposed),
        "experts.down_proj": (layer.down_proj, transposed),
    }
    if family == "deepseek_v3":
        ours["gate.e_score_correction_bias"] = (layer.router.e_score_correction_bias, False)
    if layer.shared_expert is not None:
        prefix = _SHARED_PREFIX[family]
        for name in ("gate_proj", "up_proj", "down_proj"):
            ours[f"{prefix}.{name}.weight"] = (getattr(layer.shared_expert, name).weight, False)
    return ours


def moe_block_state_to_hf(layer: MoELayer, family: str) -> dict[str, torch.Tensor]:
    """A state dict for the transformers block of ``family`` (keys relative to the block)."""
    _check_family(family)
    _hf_shapes(layer, family)  # validates that the family can hold this layer
    state = {}
    for key, (tensor, transposed) in _ours(layer, family).items():
        value = tensor.detach().transpose(-2, -1) if transposed else tensor.detach()
        state[key] = value.contiguous().clone()
    return state


def load_moe_block_state_from_hf(layer: MoELayer, state: dict[str, torch.Tensor], family: str) -> None:
    """Copy a transformers block's state dict into ``layer`` (in place), checking every shape."""
    _check_family(family)
    expected = _hf_shapes(layer, family)
    unknown, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unknown or missing:
        raise ValueError(f"{family} block state has unknown keys {unknown} and missing keys {missing}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{family} tensor {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
    with torch.no_grad():
        for key, (tensor, transposed) in _ours(layer, family).items():
            value = state[key].transpose(-2, -1) if transposed else state[key]
            tensor.copy_(value)


def moe_from_hf_block(hf_block: nn.Module, family: str, hf_config=None) -> MoELayer:
    """A MoELayer holding a copy of a transformers MoE block's weights (same dtype and device).

    The computation follows the block's own attributes and weights (``moe_config_of_block``); ``hf_config``, when
    given, adds the training knobs (the load-balancing coefficient and convention).
    """
    _check_family(family)
    config = moe_config_of_block(hf_block, family, hf_config)
    state = dict(hf_block.state_dict())
    router_key = "router.weight" if family == "llama4" else "gate.weight"
    if router_key not in state or state[router_key].dim() != 2:
        raise ValueError(f"{type(hf_block).__name__} has no 2-D {router_key!r}; is it a {family} block?")
    hidden_size = state[router_key].shape[1]
    expert_weight = state["experts.gate_up_proj"]
    layer = MoELayer(hidden_size, config).to(device=expert_weight.device, dtype=expert_weight.dtype)
    # the router keeps transformers' dtypes (DeepSeek-V3 holds its gate and bias in float32)
    layer.router.weight.data = layer.router.weight.data.to(state[router_key].dtype)
    if family == "deepseek_v3":
        layer.router.e_score_correction_bias.data = layer.router.e_score_correction_bias.data.float()
    load_moe_block_state_from_hf(layer, state, family)
    return layer
