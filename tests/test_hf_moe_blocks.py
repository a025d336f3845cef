"""MoE blocks equal transformers' blocks: Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, Llama 4."""

import pytest
import torch
from transformers import DeepseekV3Config, Llama4TextConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from minimoe.hf.moe_blocks import (
    load_moe_block_state_from_hf,
    moe_block_state_to_hf,
    moe_config_from_hf,
    moe_config_from_hf_block,
    moe_from_hf_block,
    transformers_dropped_group_value,
)
from minimoe.model import MoEConfig, MoELayer

H = 32


def _hf(family, **kw):
    """A transformers config and block of ``family`` with random weights (std 0.2)."""
    if family == "mixtral":
        config = MixtralConfig(**{"hidden_size": H, "intermediate_size": 24, "num_local_experts": 8,
                                  "num_experts_per_tok": 2, **kw})  # fmt: skip
        block_cls = MixtralSparseMoeBlock
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(**{"hidden_size": H, "moe_intermediate_size": 16, "num_experts": 16,
                                   "num_experts_per_tok": 4, "norm_topk_prob": False, **kw})  # fmt: skip
        block_cls = Qwen3MoeSparseMoeBlock
    elif family == "olmoe":
        config = OlmoeConfig(**{"hidden_size": H, "intermediate_size": 16, "num_experts": 16, "num_experts_per_tok": 8,
                                "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "vocab_size": 16, **kw})  # fmt: skip
        block_cls = OlmoeSparseMoeBlock
    elif family == "deepseek_v3":
        config = DeepseekV3Config(**{"hidden_size": H, "moe_intermediate_size": 16, "n_routed_experts": 16,
                                     "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "n_shared_experts": 2,
                                     "routed_scaling_factor": 2.5, **kw})  # fmt: skip
        block_cls = DeepseekV3MoE
    else:
        config = Llama4TextConfig(**{"hidden_size": H, "intermediate_size": 16, "num_local_experts": 8,
                                     "num_experts_per_tok": 1, **kw})  # fmt: skip
        block_cls = Llama4TextMoe
    torch.manual_seed(0)
    block = block_cls(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        if family == "deepseek_v3":
            block.gate.e_score_correction_bias.normal_(0, 0.1)
    return config, block


def _hf_forward(block, family, x):
    """transformers' output (B, T, H) and its chosen expert ids (T, k)."""
    captured = {}
    router = block.router if family == "llama4" else block.gate

    def hook(module, args, output):
        if family == "llama4":  # (scores with -inf outside the top-k, logits)
            captured["ids"] = torch.topk(output[1], router.top_k, dim=-1).indices
        else:  # (logits, weights, ids)
            captured["ids"] = output[2]

    handle = router.register_forward_hook(hook)
    out = block(x)
    handle.remove()
    if family == "llama4":
        out = out[0].view_as(x)
    return out, captured["ids"]


CASES = [
    ("mixtral", {}),
    ("mixtral", {"num_experts_per_tok": 1}),
    ("qwen3_moe", {}),
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("olmoe", {}),
    ("deepseek_v3", {}),
    ("deepseek_v3", {"norm_topk_prob": False, "n_shared_experts": 1, "topk_group": 1}),
    ("llama4", {}),
    ("llama4", {"num_experts_per_tok": 2}),
]


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("family,kw", CASES)
def test_block_equals_transformers(family, kw, impl):
    config, block = _hf(family, **kw)
    layer = moe_from_hf_block(block, family)
    layer.impl = impl
    x = torch.randn(3, 7, H)
    with torch.no_grad():
        want, hf_ids = _hf_forward(block, family, x.clone())
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ours = [set(row) for row in layer.last_routing.expert_ids.tolist()]
    assert ours == [set(row) for row in hf_ids.tolist()]
    assert moe_config_from_hf(config, family) == layer.config


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "llama4"])
def test_gradients_equal_transformers(family):
    _, block = _hf(family)
    layer = moe_from_hf_block(block, family)
    x = torch.randn(2, 5, H)
    cotangent = torch.randn(2, 5, H)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    (_hf_forward(block, family, x_hf)[0] * cotangent).sum().backward()
    (layer(x_ours) * cotangent).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-5, atol=1e-5)
    hf_grads = {k: p.grad for k, p in block.named_parameters()}
    grad_layer = MoELayer(H, layer.config)  # reuse the converter to lay our gradients out like transformers'
    for p, g in zip(grad_layer.parameters(), layer.parameters()):
        p.data = g.grad.clone()
    for key, ours in moe_block_state_to_hf(grad_layer, family).items():
        if key in hf_grads:
            torch.testing.assert_close(ours, hf_grads[key], rtol=1e-5, atol=1e-5, msg=key)


def test_deepseek_negative_biased_scores_follow_the_installed_convention():
    config, block = _hf("deepseek_v3")
    with torch.no_grad():  # most biased scores s + b fall below 0
        block.gate.e_score_correction_bias.copy_(torch.linspace(-1.2, -0.5, 16))
    x = torch.randn(4, 50, H)
    with torch.no_grad():
        want, hf_ids = _hf_forward(block, "deepseek_v3", x.clone())
        layer = moe_from_hf_block(block, "deepseek_v3")
        assert layer.config.dropped_group_value == transformers_dropped_group_value()
        got = layer(x)
        ids_matching = layer.last_routing.expert_ids
        biased = layer.last_routing.scores  # (T, E) s + b
        assert (biased < 0).float().mean() > 0.5
        other = "zero" if layer.config.dropped_group_value == "-inf" else "-inf"
        layer_other = MoELayer(H, MoEConfig(**{**layer.config.to_dict(), "dropped_group_value": other}))
        layer_other.load_state_dict(layer.state_dict())
        got_other = layer_other(x)
        ids_other = layer_other.last_routing.expert_ids
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [set(r) for r in ids_matching.tolist()] == [set(r) for r in hf_ids.tolist()]
    # the other convention differs exactly on the tokens whose kept groups hold < k positive scores
    group_scores = biased.view(-1, 4, 4).topk(2, dim=-1).values.sum(-1)  # (T, groups)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(2, dim=-1).indices, True)
    positives_in_kept = ((biased > 0) & kept.repeat_interleave(4, dim=1)).sum(-1)
    predicted = positives_in_kept < 4
    differs = torch.tensor([set(a) != set(b) for a, b in zip(ids_matching.tolist(), ids_other.tolist())])
    assert torch.equal(differs, predicted) and 0 < int(differs.sum()) < differs.numel()
    rows_differ = (got_other - got).reshape(-1, H).abs().amax(-1) > 1e-6
    assert torch.equal(rows_differ, differs)


def test_transformers_convention_probe_is_a_known_value():
    assert transformers_dropped_group_value() in ("-inf", "zero")


@pytest.mark.parametrize("family,kw", CASES)
def test_weights_round_trip_exactly(family, kw):
    config, block = _hf(family, **kw)
    layer = MoELayer(H, moe_config_from_hf(config, family))
    if family == "deepseek_v3":
        layer.router.e_score_correction_bias.normal_(0, 0.1)
    state = moe_block_state_to_hf(layer, family)  # ours -> hf
    block.load_state_dict(state, strict=True)
    back = moe_from_hf_block(block, family)  # hf -> ours
    for (name, a), (_, b) in zip(layer.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    again = moe_block_state_to_hf(back, family)
    assert again.keys() == block.state_dict().keys()
    for key, value in block.state_dict().items():
        assert torch.equal(again[key], value), key


@pytest.mark.parametrize("family,kw", CASES)
def test_config_from_block_equals_config_from_hf_config(family, kw):
    config, block = _hf(family, **kw)
    assert moe_config_from_hf_block(block, family) == moe_config_from_hf(config, family)


def test_bf16_block_keeps_deepseek_router_in_float32():
    _, block = _hf("deepseek_v3")
    block.experts.to(torch.bfloat16)
    block.shared_experts.to(torch.bfloat16)
    layer = moe_from_hf_block(block, "deepseek_v3")
    assert layer.gate_up_proj.dtype == torch.bfloat16
    assert layer.router.weight.dtype == torch.float32 and layer.router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(layer.router.weight, block.gate.weight)


def test_wrong_layouts_and_families_are_rejected():
    config, block = _hf("mixtral")
    layer = MoELayer(H, moe_config_from_hf(config, "mixtral"))
    state = moe_block_state_to_hf(layer, "mixtral")
    transposed = {**state, "experts.gate_up_proj": state["experts.gate_up_proj"].transpose(1, 2)}
    with pytest.raises(ValueError, match=r"'experts.gate_up_proj' has shape \(8, 32, 48\), expected \(8, 48, 32\)"):
        load_moe_block_state_from_hf(layer, transposed, "mixtral")
    with pytest.raises(ValueError, match=r"missing keys \['gate.weight'\]"):
        load_moe_block_state_from_hf(layer, {k: v for k, v in state.items() if k != "gate.weight"}, "mixtral")
    with pytest.raises(ValueError, match=r"unknown keys \['gate.bias'\]"):
        load_moe_block_state_from_hf(layer, {**state, "gate.bias": torch.zeros(8)}, "mixtral")
    with pytest.raises(ValueError, match="family must be one of"):
        moe_block_state_to_hf(layer, "switch")
    with pytest.raises(ValueError, match="needs router='llama4'"):
        moe_block_state_to_hf(layer, "llama4")
    _, llama4_block = _hf("llama4")
    llama4_state = dict(llama4_block.state_dict())
    with pytest.raises(ValueError, match="unknown keys"):
        load_moe_block_state_from_hf(layer, llama4_state, "mixtral")
    shared = MoELayer(H, MoEConfig(num_experts=8, top_k=2, intermediate_size=24, num_shared_experts=1))
    with pytest.raises(ValueError, match="no shared expert"):
        moe_block_state_to_hf(shared, "mixtral")
    with pytest.raises(ValueError, match="hidden_act='silu'"):
        moe_config_from_hf(MixtralConfig(hidden_act="gelu"), "mixtral")
