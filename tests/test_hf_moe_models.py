"""Full MoE language models against transformers: Mixtral, Qwen3-MoE and OLMoE, both directions."""

import json

import pytest
import torch
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from minimoe.model import generate
from minimoe.hf.convert import config_from_hf, config_to_hf, from_hf, load_hf, state_to_hf, to_hf
from minimoe.model import ModelConfig, Transformer, lm_loss
from minimoe.model import MoEConfig
from batches import left_padded

TOL = dict(rtol=1e-5, atol=1e-5)
COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

HF_MODELS = {  # name: (causal LM class, config); every switch that changes the computation
    "mixtral": (MixtralForCausalLM, lambda: MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                                          num_experts_per_tok=2)),
    "mixtral_tied_llama3": (MixtralForCausalLM, lambda: MixtralConfig(
        **COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=3, tie_word_embeddings=True,
        rope_parameters=LLAMA3)),
    "qwen3_moe_dense_layer": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(
        **COMMON, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=False, mlp_only_layers=[1], attention_bias=True)),
    "qwen3_moe_norm": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True)),
    "olmoe": (OlmoeForCausalLM, lambda: OlmoeConfig(**COMMON, intermediate_size=48, num_experts=8,
                                                    num_experts_per_tok=2)),
    "olmoe_norm_llama3": (OlmoeForCausalLM, lambda: OlmoeConfig(
        **COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=4, norm_topk_prob=True,
        rope_parameters=LLAMA3)),
}


def make_hf(name, seed=0, attn="eager"):
    """A tiny random transformers MoE model with weights large enough that routing and mistakes matter."""
    model_class, make_config = HF_MODELS[name]
    config = make_config()
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0, 0.15)
    return model


def left_padded_batch(lengths=(11, 6, 2), vocab=96, seed=1):
    return left_padded(lengths, vocab, seed, low=3)


def moe_layers(model):
    return [layer.ffn for i, layer in enumerate(model.layers) if model.config.is_moe_layer(i)]


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_logits_and_expert_sets_equal_transformers(name):
    hf_model = make_hf(name)
    model = from_hf(hf_model)
    assert model.config.extra["hf_model_type"] == hf_model.config.model_type
    ids, mask = left_padded_batch()
    with torch.no_grad():
        real = mask.bool()
        ours = model(ids, attention_mask=mask)
        theirs = hf_model(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours[real], theirs[real], **TOL)
        assert ours.abs().max() > 1.0
        # expert sets, token by token, from transformers' own router logits (unpadded: every token is real)
        ours = model(ids[:1])
        output = hf_model(ids[:1], output_router_logits=True)
        torch.testing.assert_close(ours, output.logits, **TOL)
    layers = moe_layers(model)
    assert len(layers) == len(output.router_logits) >= 1
    top_k = model.config.moe.top_k
    for layer, router_logits in zip(layers, output.router_logits):
        theirs_ids = router_logits.float().topk(top_k, dim=-1).indices  # softmax keeps the order
        ours_ids = layer.last_routing.expert_ids
        assert [set(row) for row in ours_ids.tolist()] == [set(row) for row in theirs_ids.tolist()]
        assert len({tuple(sorted(row)) for row in ours_ids.tolist()}) > 1  # tokens do go to different experts


@pytest.mark.parametrize("name", ["mixtral_tied_llama3", "qwen3_moe_dense_layer", "olmoe"])
def test_weights_round_trip_exactly(name):
    hf_model = make_hf(name)
    model = from_hf(hf_model)
    again = to_hf(model)
    assert type(again) is type(hf_model)
    theirs, returned = hf_model.state_dict(), again.state_dict()
    assert theirs.keys() == returned.keys()
    assert all(torch.equal(theirs[key], returned[key]) for key in theirs)
    back = from_hf(again)
    assert all(torch.equal(value, back.state_dict()[key]) for key, value in model.state_dict().items())
    tied = hf_model.config.tie_word_embeddings
    assert (back.lm_head.weight is back.embed.weight) == tied == (again.lm_head.weight is again.model.embed_tokens.weight)


def ours_to_hf_model(model_type, **moe_overrides):
    """A model built on our side first, exported to transformers."""
    moe = dict(num_experts=8, top_k=2, intermediate_size=32, norm_topk_prob=model_type == "mixtral")
    moe.update(moe_overrides)
    qk_norm = {"mixtral": None, "qwen3_moe": "head", "olmoe": "full"}[model_type]
    torch.manual_seed(2)
    config = ModelConfig(vocab_size=96, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=80,
                         max_seq_len=64, qk_norm=qk_norm, moe=MoEConfig(**moe), init_std=0.15,
                         moe_layers=[0, 2] if model_type == "qwen3_moe" else None)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif "proj" in name and parameter.dim() == 3:
                parameter.normal_(0, 0.15)
    return model


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe"])
def test_ours_exported_gives_the_same_logits_loss_and_gradients(model_type):
    model = ours_to_hf_model(model_type).train()
    hf_model = to_hf(model, model_type=model_type, attn_implementation="eager").train()
    assert hf_model.config.model_type == model_type
    if model_type == "qwen3_moe":
        assert hf_model.config.mlp_only_layers == [1]
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(3), mask.argmax(-1)] = -100  # nothing is predicted from padding
    logits = model(ids, attention_mask=mask)
    output = hf_model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(logits[mask.bool()], output.logits[mask.bool()], **TOL)
    loss = lm_loss(logits, labels)
    torch.testing.assert_close(loss, output.loss, **TOL)
    loss.backward()
    output.loss.backward()
    # our gradients, put under transformers' names and layouts by the same converter as the weights
    grads = Transformer(model.config)
    for name, grad_holder in grads.named_parameters():
        assert model.get_parameter(name).grad is not None, name
        grad_holder.data = model.get_parameter(name).grad
    ours = state_to_hf(grads, model_type)
    hf_parameters = dict(hf_model.named_parameters())
    assert len(hf_parameters) == len(list(model.parameters()))
    for name, parameter in hf_parameters.items():
        torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_config_round_trip_and_moe_fields():
    model = ours_to_hf_model("qwen3_moe", norm_topk_prob=True, aux_loss_coef=0.01, aux_loss_convention="pooled")
    hf_config = config_to_hf(model.config, "qwen3_moe")
    assert (hf_config.num_experts, hf_config.num_experts_per_tok, hf_config.moe_intermediate_size) == (8, 2, 32)
    assert hf_config.output_router_logits and hf_config.router_aux_loss_coef == 0.01
    back = config_from_hf(hf_config)
    assert back.moe == model.config.moe and back.moe_layers == [0, 2] and back.qk_norm == "head"
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "rms_norm_eps", "rope_theta", "max_seq_len", "tie_word_embeddings"):
        assert getattr(back, field) == getattr(model.config, field), field


def test_kv_cache_and_greedy_generation_equal_transformers():
    hf_model = make_hf("qwen3_moe_dense_layer")
    model = from_hf(hf_model)
    ids, mask = left_padded_batch(lengths=(7, 4, 1))
    ids = ids[:, :7]
    mask = mask[:, -7:]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions)
        cache = model.new_cache(3, 7)
        pieces = [model(ids[:, :4], attention_mask=mask[:, :4], position_ids=positions[:, :4], cache=cache)]
        for t in range(4, 7):
            pieces.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                                cache=cache))
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], **TOL)
    ours = generate(model, ids, 12, attention_mask=mask)
    theirs = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_bfloat16_smoke_and_save_pretrained(tmp_path):
    hf_model = make_hf("mixtral")
    ids, _ = left_padded_batch(lengths=(9, 9))
    with torch.no_grad():
        reference = hf_model(ids).logits
        hf_bf16 = hf_model.to(torch.bfloat16)
        model = from_hf(hf_bf16)
        assert model.embed.weight.dtype == model.layers[0].ffn.gate_up_proj.dtype == torch.bfloat16
        ours, theirs = model(ids).float(), hf_bf16(ids).logits.float()
    scale = reference.abs().max().item()
    assert (ours - reference).abs().max().item() < 0.05 * scale
    assert (ours - theirs).abs().max().item() < 0.05 * scale
    to_hf(model.float()).save_pretrained(tmp_path)
    loaded = from_hf(load_hf(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("make_config, message", [
    (lambda: OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, clip_qkv=8.0), "clip_qkv=8.0"),
    (lambda: MixtralConfig(**COMMON, num_local_experts=4, sliding_window=16), "sliding_window=16"),
    (lambda: Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, use_sliding_window=True,
                            sliding_window=16), "sliding_window=16"),
    (lambda: Qwen3MoeConfig(**COMMON, num_experts=0), "num_experts=0"),
    (lambda: MixtralConfig(**COMMON, num_local_experts=4, hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda: MixtralConfig(**COMMON, num_local_experts=4, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6,
                                                                           "factor": 4.0}), "rope_type='yarn'"),
])
def test_unsupported_hf_configs_are_rejected(make_config, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(make_config())


@pytest.mark.parametrize("model_type, moe_overrides, message", [
    ("mixtral", dict(capacity_factor=1.25), "a 'mixtral' model is dropless, got capacity_factor=1.25"),
    ("qwen3_moe", dict(num_shared_experts=1), "no shared expert, got router='softmax', num_shared_experts=1"),
    ("olmoe", dict(router="deepseek_v3", n_group=2, topk_group=1), "got router='deepseek_v3'"),
    ("mixtral", dict(norm_topk_prob=False), "renormalises its top-k weights, got norm_topk_prob=False"),
])
def test_unsupported_exports_are_rejected(model_type, moe_overrides, message):
    with pytest.raises(ValueError, match=message):
        to_hf(ours_to_hf_model(model_type, **moe_overrides), model_type=model_type)


def test_export_to_the_wrong_family_is_rejected():
    qwen = ours_to_hf_model("qwen3_moe")
    with pytest.raises(ValueError, match="a 'olmoe' model has qk_norm='full', got qk_norm='head'"):
        to_hf(qwen, model_type="olmoe")
    with pytest.raises(ValueError, match=r"every layer of a 'mixtral' model is MoE, got moe_layers=\[0, 2\]"):
        config_to_hf(ModelConfig(**{**qwen.config.to_dict(), "qk_norm": None}), "mixtral")
    with pytest.raises(ValueError, match="a 'llama' model has no MoE layers"):
        to_hf(qwen, model_type="llama")
    assert to_hf(qwen).config.model_type == "qwen3_moe"  # the only family that holds it is found


def test_a_config_routing_to_more_experts_than_it_has_is_named(tmp_path):
    Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_experts_per_tok=20)))
    with pytest.raises(ValueError, match=r"config.json: num_experts_per_tok=20 is more than the 4 experts "
                                         r"\(num_(local_)?experts=4\); expected at most 4"):
        load_hf(tmp_path)
