"""Conversion follows what the model computes (its tensors and modules), not config flags that no longer
describe it; and the load-balancing loss keeps transformers' strength across conversion."""

import warnings

import pytest
import torch
from transformers import (DeepseekV3Config, Llama4TextConfig, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                          MixtralForCausalLM)

from minimoe.hf import from_hf, moe_config_from_hf, moe_from_hf_block, to_hf
from minimoe.model import lm_loss
from test_hf_moe_blocks import _hf, _hf_forward
from test_hf_moe_models import COMMON, HF_MODELS, left_padded_batch, make_hf, ours_to_hf_model

TOL = dict(rtol=1e-5, atol=1e-5)


def untie(hf_model, seed=5):
    """What an untied checkpoint under a config saying tie_word_embeddings=True loads as: two tensors."""
    head = hf_model.lm_head.weight
    hf_model.lm_head.weight = torch.nn.Parameter(torch.randn(head.shape, generator=torch.Generator().manual_seed(seed)))
    assert hf_model.config.tie_word_embeddings and hf_model.lm_head.weight is not hf_model.model.embed_tokens.weight
    return hf_model


def assert_same_logits(model, hf_model, ids):
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert theirs.abs().max() > 1.0
    # float32 rounding grows with the logits' scale (and the grouped GEMM sums in another order than the loop)
    torch.testing.assert_close(ours, theirs, rtol=TOL["rtol"], atol=TOL["atol"] * float(theirs.abs().max()))


# ---- tie_word_embeddings=True over different tensors, both directions, every family ------------------------------
def test_llama_config_says_tied_but_the_head_differs():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf_model = untie(LlamaForCausalLM(config).eval())
    with pytest.warns(UserWarning, match="tie_word_embeddings=True, but lm_head.weight differs"):
        model = from_hf(hf_model)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.embed.weight
    assert torch.equal(model.embed.weight, hf_model.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, hf_model.lm_head.weight)
    assert_same_logits(model, hf_model, torch.randint(0, 50, (2, 9)))
    again = to_hf(model)
    assert not again.config.tie_word_embeddings and again.lm_head.weight is not again.model.embed_tokens.weight
    assert_same_logits(model, again.eval(), torch.randint(0, 50, (2, 9)))


@pytest.mark.parametrize("name", ["mixtral_tied_llama3", "qwen3_moe_dense_layer", "olmoe"])
def test_moe_families_config_says_tied_but_the_head_differs(name):
    hf_model = make_hf(name)
    hf_model.config.tie_word_embeddings = True
    hf_model = untie(hf_model)
    with pytest.warns(UserWarning, match="converted untied"):
        model = from_hf(hf_model)
    assert not model.config.tie_word_embeddings
    ids, _ = left_padded_batch(lengths=(8, 8))
    assert_same_logits(model, hf_model, ids)


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "qwen3_moe", "olmoe"])
def test_to_hf_ties_the_head_only_when_our_head_is_our_embedding(model_type):
    if model_type == "llama":
        from test_hf_llama import make_model
        model = make_model(tie_word_embeddings=True)
    else:
        model = ours_to_hf_model(model_type)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.embed.weight
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape) * 0.5)  # a new head
    with pytest.warns(UserWarning, match="is not embed.weight: exported untied"):
        hf_model = to_hf(model, attn_implementation="eager").eval()
    assert not hf_model.config.tie_word_embeddings
    ids = torch.randint(3, 96, (2, 10))
    assert_same_logits(model.eval(), hf_model, ids)
    model.config.tie_word_embeddings = False  # and the other way: the flag says untied, the tensors are one
    model.lm_head.weight = model.embed.weight
    with pytest.warns(UserWarning, match="is embed.weight: exported tied"):
        hf_model = to_hf(model, attn_implementation="eager").eval()
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    assert_same_logits(model, hf_model, ids)


# ---- other flags read instead of the modules --------------------------------------------------------------------
def test_moe_flags_edited_after_the_model_was_built_follow_the_modules():
    hf_model = make_hf("qwen3_moe_dense_layer")  # top-3, norm_topk_prob=False, layer 1 dense
    hf_model.config.num_experts_per_tok = 2  # transformers' routers keep the values they were built with
    hf_model.config.norm_topk_prob = True
    hf_model.config.mlp_only_layers = []
    with pytest.warns(UserWarning) as record:
        model = from_hf(hf_model)
    messages = " ".join(str(w.message) for w in record)
    assert "top_k=2 in the config, 3 in the block" in messages and "norm_topk_prob=True in the config" in messages
    assert "MoE blocks in layers [0]" in messages
    assert (model.config.moe.top_k, model.config.moe.norm_topk_prob, model.config.moe_layers) == (3, False, [0])
    ids, _ = left_padded_batch(lengths=(8, 8))
    assert_same_logits(model, hf_model, ids)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.rope_parameters.update(rope_theta=10000.0), "RoPE frequencies"),
    (lambda c: setattr(c, "rms_norm_eps", 1e-3), "uses eps=1e-05, its config says rms_norm_eps=0.001"),
    (lambda c: setattr(c, "head_dim", 8), r"q_proj.weight' has shape \(64, 64\), but its config gives \(32, 64\)"),
    (lambda c: setattr(c, "attention_bias", True), "has no tensor 'model.layers.0.self_attn.q_proj.bias'"),
])
def test_config_fields_that_do_not_describe_the_tensors_are_named(change, message):
    hf_model = make_hf("mixtral")
    change(hf_model.config)
    with pytest.raises(ValueError, match=message):
        from_hf(hf_model)


def test_to_hf_refuses_a_config_changed_after_our_model_was_built():
    model = ours_to_hf_model("mixtral")
    model.config.moe.top_k = 3
    with pytest.raises(ValueError, match="router has top_k=2, but config.moe says 3"):
        to_hf(model)


@pytest.mark.parametrize("family, change", [
    ("deepseek_v3", dict(num_experts_per_tok=2, routed_scaling_factor=1.0, n_shared_experts=1)),
    ("llama4", dict(num_experts_per_tok=2)),
    ("qwen3_moe", dict(norm_topk_prob=True)),
])
def test_blocks_follow_their_modules_when_the_config_passed_along_disagrees(family, change):
    config, block = _hf(family)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.warns(UserWarning, match="converted as the block computes"):
        layer = moe_from_hf_block(block, family, config)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _hf_forward(block, family, x.clone())[0], **TOL)


@pytest.mark.parametrize("config", [
    DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                     n_group=4, topk_group=2, output_router_logits=True),
    Llama4TextConfig(hidden_size=32, intermediate_size=16, num_local_experts=8, output_router_logits=True,
                     router_aux_loss_coef=0.01),
])
def test_blocks_whose_transformers_model_has_no_balance_loss_convert_with_none(config):
    family = "deepseek_v3" if isinstance(config, DeepseekV3Config) else "llama4"
    assert moe_config_from_hf(config, family).aux_loss_coef == 0.0  # transformers trains them without one


# ---- the load-balancing loss keeps transformers' strength --------------------------------------------------------
@pytest.mark.parametrize("name, layers", [("mixtral", 3), ("qwen3_moe_norm", 3), ("qwen3_moe_dense_layer", 3)])
def test_converted_model_trains_with_transformers_loss(name, layers):
    model_class, make_config = HF_MODELS[name]
    config = make_config()
    config.num_hidden_layers, config.output_router_logits, config.router_aux_loss_coef = layers, True, 0.02
    if name == "qwen3_moe_dense_layer":
        config.mlp_only_layers = [1]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = model_class(config).train()  # dropout is 0; train mode computes the loss transformers trains with
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.normal_(0, 0.15)
    model = from_hf(hf_model)
    assert model.config.moe.aux_loss_convention == "pooled" and model.config.moe.aux_loss_coef == 0.02
    ids, mask = left_padded_batch(lengths=(9, 5))
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(2), mask.argmax(-1)] = -100  # nothing is predicted from padding
    for attention_mask in (None, mask):
        output = hf_model(ids, attention_mask=attention_mask, labels=labels)
        logits = model(ids, attention_mask=attention_mask)
        aux = model.moe_aux_loss(attention_mask)
        torch.testing.assert_close(aux / 0.02, output.aux_loss, **TOL)
        torch.testing.assert_close(lm_loss(logits, labels) + aux, output.loss, **TOL)
    # the same coefficient under minimoe's per-layer convention is a much stronger balance term
    for layer in model.layers:
        if hasattr(layer.ffn, "config"):
            layer.ffn.config.aux_loss_convention = "per_layer"
    model(ids)
    assert model.moe_aux_loss() > 1.5 * aux


def test_exporting_a_per_layer_balance_loss_says_so():
    model = ours_to_hf_model("mixtral", aux_loss_coef=0.01)
    with pytest.warns(UserWarning, match="sums 3 per-layer losses here.*balances less strongly"):
        to_hf(model)
    pooled = ours_to_hf_model("mixtral", aux_loss_coef=0.01, aux_loss_convention="pooled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_model = to_hf(pooled)
    assert hf_model.config.output_router_logits and hf_model.config.router_aux_loss_coef == 0.01
    with pytest.warns(UserWarning, match="no router z-loss: z_loss_coef=0.001 is dropped"):
        to_hf(ours_to_hf_model("olmoe", z_loss_coef=0.001))
    with pytest.warns(UserWarning, match="qwen3_moe has no router jitter: router_jitter=0.1 is dropped"):
        to_hf(ours_to_hf_model("qwen3_moe", router_jitter=0.1))


def test_a_tied_mixtral_checkpoint_round_trips_without_warnings():
    hf_model = MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                                tie_word_embeddings=True)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = from_hf(hf_model)
        again = to_hf(model)
    assert model.lm_head.weight is model.embed.weight and again.lm_head.weight is again.model.embed_tokens.weight
