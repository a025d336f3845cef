"""The whole model against transformers' LlamaForCausalLM: logits, masks, loss, gradients, cache, conversion."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from minimoe.hf.convert import config_from_hf, config_to_hf, from_hf, hf_name, load_hf, state_to_hf, to_hf
from minimoe.model import ModelConfig, Transformer, lm_loss

TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA31_SMALL = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LLAMA32_SMALL = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CONFIGS = {  # name: ModelConfig overrides; tiny, but every switch that changes the computation
    "mha_untied": dict(num_heads=4, num_kv_heads=4),  # n_rep 1
    "gqa2_tied_llama31": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True, rope_scaling=LLAMA31_SMALL),
    "gqa4_llama32_bias": dict(num_heads=8, num_kv_heads=2, rope_scaling=LLAMA32_SMALL, attention_bias=True),
    "head_dim_16_tied": dict(hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                             rope_theta=10000.0),
}


def make_model(seed=0, **overrides) -> Transformer:
    """A tiny random model with large enough weights (and non-trivial norms) that mistakes show."""
    settings = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, max_seq_len=64,
                    init_std=0.15)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**settings)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model


def left_padded_batch(vocab=128, lengths=(12, 7, 3), seed=1):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=generator)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_llama_for_causal_lm(name):
    model = make_model(**CONFIGS[name])
    hf_model = to_hf(model, attn_implementation="eager").eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses for left padding
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, **TOL)
        for position_ids in (None, positions):
            ours = model(ids, attention_mask=mask, position_ids=position_ids)
            theirs = hf_model(ids, attention_mask=mask, position_ids=position_ids).logits
            real = mask.bool()
            torch.testing.assert_close(ours[real], theirs[real], **TOL)
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero tensors


@pytest.mark.parametrize("name", ["gqa2_tied_llama31", "gqa4_llama32_bias"])
def test_from_hf_of_a_transformers_model(name):
    our_config = make_model(**CONFIGS[name]).config
    hf_config = config_to_hf(our_config)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(3)
    hf_model = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.normal_(0, 0.15)
    model = from_hf(hf_model)
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "rms_norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "tie_word_embeddings", "attention_bias"):
        assert getattr(model.config, field) == getattr(our_config, field), field
    ids, _ = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mha_untied", "gqa2_tied_llama31", "gqa4_llama32_bias"])
def test_weights_round_trip_exactly(name, dtype):
    model = make_model(**CONFIGS[name]).to(dtype)
    hf_model = to_hf(model)
    back = from_hf(hf_model)
    ours, returned, theirs = model.state_dict(), back.state_dict(), hf_model.state_dict()
    assert ours.keys() == returned.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, returned[key]), key
        assert torch.equal(tensor, theirs[hf_name(key)]), key
        assert returned[key].dtype == dtype and returned[key].data_ptr() != tensor.data_ptr()  # copies
    assert len(theirs) == len(ours)
    tied = model.config.tie_word_embeddings
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == tied
    assert (back.lm_head.weight is back.embed.weight) == tied
    assert hf_model.model.rotary_emb.inv_freq.dtype == torch.float32  # transformers' RoPE buffer is not rounded
    # transformers -> ours -> transformers
    again = to_hf(back).state_dict()
    assert all(torch.equal(theirs[key], again[key]) for key in theirs)


def test_custom_4d_mask_and_position_ids():
    """Two documents packed in one row: a block-diagonal causal mask and restarting positions must equal
    running each document alone; transformers takes the same mask as additive floats."""
    model = make_model(**CONFIGS["gqa2_tied_llama31"])
    hf_model = to_hf(model, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(4)
    first, second = torch.randint(0, 128, (2, 5), generator=generator), torch.randint(0, 128, (2, 6), generator=generator)
    packed = torch.cat([first, second], dim=1)  # (2, 11)
    document = torch.tensor([0] * 5 + [1] * 6)
    allowed = (document[:, None] == document[None, :]) & torch.ones(11, 11, dtype=torch.bool).tril()
    allowed = allowed[None, None].expand(2, 1, 11, 11)
    positions = torch.cat([torch.arange(5), torch.arange(6)]).expand(2, 11)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ours_bool = model(packed, attention_mask=allowed, position_ids=positions)
        ours_float = model(packed, attention_mask=additive, position_ids=positions)
        theirs = hf_model(packed, attention_mask=additive, position_ids=positions).logits
        alone = torch.cat([model(first), model(second)], dim=1)
    torch.testing.assert_close(ours_bool, theirs, **TOL)
    torch.testing.assert_close(ours_float, theirs, **TOL)
    torch.testing.assert_close(ours_bool, alone, **TOL)


def test_inputs_embeds_equal_token_ids_and_transformers():
    model = make_model(**CONFIGS["gqa4_llama32_bias"])
    hf_model = to_hf(model, attn_implementation="eager").eval()
    ids, mask = left_padded_batch()
    generator = torch.Generator().manual_seed(5)
    embeds = torch.randn(3, 12, 64, generator=generator)  # embeddings that are no token's
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.embed(ids)), model(ids), rtol=0, atol=0)
        ours = model(inputs_embeds=embeds, attention_mask=mask)
        theirs = hf_model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], **TOL)


@pytest.mark.parametrize("name", ["mha_untied", "gqa2_tied_llama31", "gqa4_llama32_bias"])
def test_loss_and_every_gradient_equal_transformers(name):
    model = make_model(**CONFIGS[name]).train()
    hf_model = to_hf(model, attn_implementation="eager").train()
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(3), mask.argmax(-1)] = -100  # nothing is predicted from padding
    labels[0, 4:6] = -100  # ignored tokens inside a sequence too
    ours = lm_loss(model(ids, attention_mask=mask), labels)
    theirs = hf_model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    hf_parameters = dict(hf_model.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(hf_parameters)
    for our_name, parameter in model.named_parameters():
        their_grad = hf_parameters[hf_name(our_name)].grad
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, our_name
        torch.testing.assert_close(parameter.grad, their_grad, rtol=1e-4, atol=1e-6, msg=our_name)


def test_kv_cache_decoding_equals_full_forward():
    """Left-padded batch: prefill 8 tokens, then 4 one-token steps == one full pass (ours and transformers')."""
    model = make_model(**CONFIGS["gqa2_tied_llama31"])
    hf_model = to_hf(model, attn_implementation="eager").eval()
    ids, mask = left_padded_batch(lengths=(12, 9, 5))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions)
        theirs = hf_model(ids, attention_mask=mask, position_ids=positions).logits
        cache = model.new_cache(3, 12)
        pieces = [model(ids[:, :8], attention_mask=mask[:, :8], position_ids=positions[:, :8], cache=cache)]
        for t in range(8, 12):
            pieces.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                                cache=cache))
    assert cache.length == 12
    stepped, real = torch.cat(pieces, dim=1), mask.bool()
    torch.testing.assert_close(stepped[real], full[real], **TOL)
    torch.testing.assert_close(stepped[real], theirs[real], **TOL)


def test_bfloat16_smoke():
    model = make_model(**CONFIGS["gqa2_tied_llama31"])
    ids, mask = left_padded_batch()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask)
        model_bf16 = model.to(torch.bfloat16)
        hf_bf16 = to_hf(model_bf16, attn_implementation="eager").eval()
        ours = model_bf16(ids, attention_mask=mask)
        theirs = hf_bf16(ids, attention_mask=mask).logits
    real = mask.bool()
    assert ours.dtype == theirs.dtype == torch.bfloat16
    scale = reference.abs().max().item()
    assert (ours[real].float() - theirs[real].float()).abs().max().item() < 0.02 * scale
    assert (ours[real].float() - reference[real]).abs().max().item() < 0.05 * scale
    assert (ours[real].argmax(-1) == reference[real].argmax(-1)).float().mean() > 0.9


def test_save_pretrained_then_load_hf(tmp_path):
    model = make_model(**CONFIGS["gqa4_llama32_bias"])
    model.config.extra.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    to_hf(model).save_pretrained(tmp_path)
    loaded = load_hf(tmp_path, attn_implementation="eager")
    assert loaded.config.rope_parameters["rope_type"] == "llama3" and loaded.config.eos_token_id == 2
    back = from_hf(loaded)
    assert back.config.extra["eos_token_id"] == 2 and back.config.extra["hf_model_type"] == "llama"
    ids, _ = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_hf(tmp_path / "no_such_dir")


def test_config_to_hf_fields():
    model = make_model(**CONFIGS["gqa4_llama32_bias"])
    hf_config = config_to_hf(model.config)
    assert isinstance(hf_config, LlamaConfig)
    assert hf_config.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA32_SMALL}
    assert (hf_config.num_key_value_heads, hf_config.head_dim, hf_config.max_position_embeddings) == (2, 8, 64)
    assert hf_config.rms_norm_eps == 1e-5 and hf_config.attention_bias and not hf_config.mlp_bias
    assert config_from_hf(hf_config).rope_scaling == LLAMA32_SMALL
    assert set(state_to_hf(model)) == set(LlamaForCausalLM(hf_config).state_dict())


def tiny_llama_config(**overrides):
    settings = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    rms_norm_eps=1e-5)
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.mark.parametrize("overrides, message", [
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), "rope_type='linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}), "rope_type='yarn'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor=0.5"),
])
def test_unsupported_llama_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(tiny_llama_config(**overrides))


def test_sliding_window_is_rejected():
    config = tiny_llama_config()
    config.sliding_window = 16  # Llama has none; a config that carries one would be computed differently
    with pytest.raises(ValueError, match="sliding_window=16"):
        config_from_hf(config)


def test_unsupported_models_and_arguments_are_rejected():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: .*'llama', 'mixtral'"):
        from_hf(gpt2)
    with pytest.raises(TypeError, match="expects a LlamaForCausalLM .* got LlamaModel"):
        from_hf(LlamaModel(tiny_llama_config()))
    with pytest.raises(TypeError, match="got str"):
        from_hf("meta-llama/Llama-3.2-1B")
    with pytest.raises(TypeError, match="got LlamaForCausalLM"):
        to_hf(LlamaForCausalLM(tiny_llama_config()))
    head_norm = make_model(qk_norm="head")
    with pytest.raises(ValueError, match="no supported transformers family holds this config: .*qk_norm='head'"):
        to_hf(head_norm)
    with pytest.raises(ValueError, match="a 'llama' model has no MoE layers and no q/k norm, got moe=None, qk_norm='full'"):
        to_hf(make_model(qk_norm="full"), model_type="llama")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        to_hf(make_model(), model_type="gpt2")
