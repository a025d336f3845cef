"""Each part of the Llama 3 block alone, against transformers' own classes on the same weights."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from minimoe.model.dense import (Attention, FeedForward, KVCache, RMSNorm, apply_rope, build_attention_mask,
                           ffn_hidden_size, repeat_kv, rope_cos_sin, rope_inv_freq)

TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                    num_key_value_heads=8, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    settings.update(overrides)
    config = LlamaConfig(**settings)
    config._attn_implementation = "eager"
    return config


def hf_rope_parameters(theta, scaling):
    return {"rope_type": "default" if scaling is None else "llama3", "rope_theta": theta, **(scaling or {})}


# ---- RMSNorm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_equals_llama_rmsnorm(dtype, eps):
    generator = torch.Generator().manual_seed(0)
    ours, theirs = RMSNorm(48, eps), LlamaRMSNorm(48, eps)
    weight = torch.randn(48, generator=generator)
    with torch.no_grad():
        ours.weight.copy_(weight), theirs.weight.copy_(weight)
    x = (3 * torch.randn(2, 5, 48, generator=generator)).to(dtype)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    # and against the formula, in float64
    x64 = x.double()
    expected = weight.double() * (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
    torch.testing.assert_close(ours(x).double(), expected, **(TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


# ---- RoPE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("scaling", [None, LLAMA31, LLAMA32, dict(LLAMA31, original_max_position_embeddings=64)])
def test_inv_freq_equals_transformers(head_dim, theta, scaling):
    config = llama_config(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
                          rope_parameters=hf_rope_parameters(theta, scaling))
    ours = rope_inv_freq(head_dim, theta, scaling)
    if scaling is None:
        theirs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours, LlamaRotaryEmbedding(config).inv_freq, rtol=0, atol=0)


def test_llama3_scaling_bands_follow_the_rule():
    """Brute force in float64: high frequencies kept, low ones divided by the factor, a blend between."""
    head_dim, theta, s = 128, 500000.0, LLAMA31
    plain, scaled = rope_inv_freq(head_dim, theta).double(), rope_inv_freq(head_dim, theta, s).double()
    context = s["original_max_position_embeddings"]
    for f, g in zip(plain.tolist(), scaled.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < context / s["high_freq_factor"]:
            expected = f
        elif wavelen > context / s["low_freq_factor"]:
            expected = f / s["factor"]
        else:
            smooth = (context / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            expected = (1 - smooth) * f / s["factor"] + smooth * f
        assert g == pytest.approx(expected, rel=1e-6)
    assert (scaled < plain).any() and (scaled == plain).any()


@pytest.mark.parametrize("scaling", [None, LLAMA31])
def test_cos_sin_at_arbitrary_positions_equal_transformers(scaling):
    config = llama_config(rope_parameters=hf_rope_parameters(500000.0, scaling))
    generator = torch.Generator().manual_seed(1)
    position_ids = torch.randint(0, 100000, (3, 7), generator=generator)  # unsorted, large, repeated is fine
    x = torch.zeros(3, 7, 64)
    ours = rope_cos_sin(rope_inv_freq(8, 500000.0, scaling), position_ids, torch.float32)
    theirs = LlamaRotaryEmbedding(config)(x, position_ids)
    for a, b in zip(ours, theirs):
        assert a.shape == (3, 7, 8)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rope_is_a_relative_rotation():
    """q_m . k_n depends only on m - n: the defining property of RoPE."""
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, 16, generator=generator), torch.randn(1, 1, 1, 16, generator=generator)
    inv_freq = rope_inv_freq(16, 10000.0)

    def score(m, n):
        cos_m, sin_m = rope_cos_sin(inv_freq, torch.tensor([[m]]), torch.float32)
        cos_n, sin_n = rope_cos_sin(inv_freq, torch.tensor([[n]]), torch.float32)
        return (apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum().item()

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)


def test_rope_rejects_bad_settings():
    with pytest.raises(ValueError, match="even head_dim, got 7"):
        rope_inv_freq(7)
    with pytest.raises(ValueError, match="missing.*original_max_position_embeddings"):
        rope_inv_freq(8, scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    with pytest.raises(ValueError, match="high_freq_factor > low_freq_factor"):
        rope_inv_freq(8, scaling=dict(LLAMA31, high_freq_factor=1.0))


# ---- attention ------------------------------------------------------------------------------------


def copy_attention(ours: Attention, theirs: torch.nn.Module, generator):
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            value = torch.randn(parameter.shape, generator=generator) * (0.3 if "norm" not in name else 1.0)
            parameter.copy_(value)
            ours.get_parameter(name).copy_(value)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("num_kv_heads", [8, 4, 2])  # n_rep 1, 2, 4
@pytest.mark.parametrize("bias", [False, True])
def test_attention_layer_equals_llama_attention(num_kv_heads, bias):
    generator = torch.Generator().manual_seed(3)
    config = llama_config(num_key_value_heads=num_kv_heads, attention_bias=bias)
    theirs = LlamaAttention(config, layer_idx=0).eval()
    ours = Attention(64, 8, num_kv_heads, 8, bias=bias).eval()
    assert ours.n_rep == 8 // num_kv_heads
    copy_attention(ours, theirs, generator)
    b, t = 3, 6
    x = torch.randn(b, t, 64, generator=generator)
    position_ids = torch.randint(0, 5000, (b, t), generator=generator)
    cos, sin = rope_cos_sin(rope_inv_freq(8, 500000.0, LLAMA31), position_ids, torch.float32)
    padding = torch.tensor([[1] * t, [0, 0] + [1] * (t - 2), [0] * (t - 1) + [1]])  # left padding, a 1-token row
    mask = build_attention_mask(padding, t, 0, torch.float32, "cpu", b)  # (B, 1, T, T)
    causal = additive_mask(torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t))
    with torch.no_grad():
        expected_padded = theirs(x, position_embeddings=(cos, sin), attention_mask=mask)[0]
        expected_causal = theirs(x, position_embeddings=(cos, sin), attention_mask=causal)[0]
        got_padded, got_causal = ours(x, cos, sin, mask), ours(x, cos, sin, None)  # None: the kernel's causal mask
    real = padding.bool()
    torch.testing.assert_close(got_padded[real], expected_padded[real], **TOL)
    torch.testing.assert_close(got_causal, expected_causal, **TOL)
    assert torch.isfinite(got_padded).all()  # padding queries see nothing, yet stay finite


def test_attention_with_cache_equals_one_pass():
    """Prefill 5 tokens, then 3 single-token steps through the KV cache == one causal pass over 8."""
    generator = torch.Generator().manual_seed(4)
    attention = Attention(32, 4, 2, 8).eval()
    x = torch.randn(2, 8, 32, generator=generator)
    cos, sin = rope_cos_sin(rope_inv_freq(8, 10000.0), torch.arange(8).expand(2, 8), torch.float32)
    with torch.no_grad():
        full = attention(x, cos, sin)
        cache = KVCache(1, 2, 8, 2, 8)
        steps = [attention(x[:, :5], cos[:, :5], sin[:, :5], build_attention_mask(None, 5, 0, torch.float32, "cpu", 2), cache)]
        cache.advance(5)
        for i in range(5, 8):
            mask = build_attention_mask(None, 1, i, torch.float32, "cpu", 2)
            steps.append(attention(x[:, i:i + 1], cos[:, i:i + 1], sin[:, i:i + 1], mask, cache))
            cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    with pytest.raises(ValueError, match="holds 8 tokens; 9 were requested"):
        cache.update(0, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))


def test_repeat_kv_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(repeat_kv(x, 4), x.repeat_interleave(4, dim=1), rtol=0, atol=0)


def test_attention_mask_builder_brute_force():
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 1]])
    mask = build_attention_mask(padding, 2, 3, torch.float32, "cpu", 2)  # 2 new tokens after 3 cached
    assert mask.shape == (2, 1, 2, 5)
    for b in range(2):
        for i in range(2):
            for j in range(5):
                allowed = (j <= 3 + i and padding[b, j] == 1) or j == 3 + i  # a padding query reads itself
                assert (mask[b, 0, i, j] == 0) == allowed
    assert build_attention_mask(None, 4, 0, torch.float32, "cpu", 1) is None
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        build_attention_mask(torch.tensor([[0, 2]]), 2, 0, torch.float32, "cpu", 1)


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=8"):
        Attention(64, 8, 3, 8)
    with pytest.raises(ValueError, match="qk_norm must be None, 'head' or 'full', got 'layer'"):
        Attention(64, 8, 8, 8, qk_norm="layer")


def test_qk_norm_head_equals_qwen3_moe_attention():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

    generator = torch.Generator().manual_seed(5)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                            num_hidden_layers=1, rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2)
    config._attn_implementation = "eager"
    theirs, ours = Qwen3MoeAttention(config, 0).eval(), Attention(64, 8, 2, 16, qk_norm="head", norm_eps=1e-6).eval()
    copy_attention(ours, theirs, generator)
    x = torch.randn(2, 5, 64, generator=generator)
    cos, sin = rope_cos_sin(rope_inv_freq(16, 1e6), torch.arange(5).expand(2, 5), torch.float32)
    causal = additive_mask(torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cos, sin), theirs(x, (cos, sin), causal)[0], **TOL)


def test_qk_norm_full_equals_olmoe_attention():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeAttention

    generator = torch.Generator().manual_seed(6)
    config = OlmoeConfig(vocab_size=64, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                         num_hidden_layers=1, rms_norm_eps=1e-5, num_experts=4, num_experts_per_tok=2,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    theirs, ours = OlmoeAttention(config, 0).eval(), Attention(64, 8, 4, 8, qk_norm="full").eval()
    copy_attention(ours, theirs, generator)
    x = torch.randn(2, 5, 64, generator=generator)
    cos, sin = rope_cos_sin(rope_inv_freq(8, 10000.0), torch.arange(5).expand(2, 5), torch.float32)
    causal = additive_mask(torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cos, sin), theirs(x, (cos, sin), causal)[0], **TOL)


# ---- SwiGLU feed-forward --------------------------------------------------------------------------


def test_feedforward_equals_llama_mlp():
    generator = torch.Generator().manual_seed(7)
    theirs, ours = LlamaMLP(llama_config()), FeedForward(64, 96)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            value = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(value)
            ours.get_parameter(name).copy_(value)
    x = torch.randn(2, 5, 64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        by_hand = torch.nn.functional.silu(x @ ours.gate_proj.weight.T) * (x @ ours.up_proj.weight.T) @ ours.down_proj.weight.T
        torch.testing.assert_close(ours(x), by_hand, **TOL)


@pytest.mark.parametrize("dim, multiplier, multiple_of, expected", [
    (4096, 1.3, 1024, 14336),  # Llama 3 8B
    (8192, 1.3, 4096, 28672),  # Llama 3 70B
    (16384, 1.2, 4096, 53248),  # Llama 3 405B
    (4096, None, 256, 11008),  # Llama 2 7B
])
def test_meta_ffn_hidden_size(dim, multiplier, multiple_of, expected):
    assert ffn_hidden_size(dim, multiple_of, multiplier) == expected


def test_ffn_hidden_size_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple_of=0"):
        ffn_hidden_size(64, 0)
    with pytest.raises(ValueError, match="dim=-4"):
        ffn_hidden_size(-4)
