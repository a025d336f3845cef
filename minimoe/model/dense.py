"""The Llama 3 dense block, piece by piece ("The Llama 3 Herd of Models", Meta 2024).

Read top to bottom:

1. ``RMSNorm``        y = x / sqrt(mean(x^2) + eps) * w, computed in float32, cast back, then scaled.
2. RoPE              inv_freq_i = theta^(-2i/d) for i < d/2 (theta = 500 000 in Llama 3). A vector at
                     position m is rotated pair-wise by the angles m * inv_freq. We rotate *halves*
                     (pairs (i, i + d/2)), the layout transformers uses; Meta's original code rotates
                     interleaved pairs, which is the same rotation after permuting the rows of wq/wk.
   Llama 3.1 scaling (``rope_type="llama3"``): with wavelength w = 2 pi / inv_freq and original
                     context L, frequencies with w < L / high_freq_factor stay, those with
                     w > L / low_freq_factor are divided by ``factor``, and the band in between is
                     blended: s = (L / w - low) / (high - low), f = (1 - s) f / factor + s f.
3. ``Attention``      grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads).
                     An optional ``KVCache`` keeps past keys/values so decoding one token costs O(T), not O(T^2).
                     Optional q/k RMSNorm covers Qwen3 ("head": per head) and OLMoE ("full": over the projection).
4. ``FeedForward``    SwiGLU: down(silu(gate(x)) * up(x)); Meta sizes the hidden layer with ``ffn_hidden_size``.

The pre-norm block and the full language model live in ``minimoe.model.transformer``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------
# 1. RMSNorm
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # the statistics are always taken in float32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# --------------------------------------------------------------------------------------------------
# 2. Rotary position embedding (RoPE) with the Llama 3.1 frequency scaling
# --------------------------------------------------------------------------------------------------

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_inv_freq(head_dim: int, theta: float = 500000.0, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, on CPU; ``scaling`` applies Llama 3.1's rule."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # 2i/d
    inv_freq = 1.0 / (theta**exponents)  # (d/2,)
    if scaling is None:
        return inv_freq
    missing = [key for key in ROPE_SCALING_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling is missing {missing}; expected the keys {list(ROPE_SCALING_KEYS)}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    if not high > low > 0 or factor <= 0:
        raise ValueError(f"rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {scaling}")

    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`; short ones stay as they are
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    # the band between the two thresholds is blended smoothly
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables (B, T, head_dim) for integer ``position_ids`` (B, T); angles computed in float32."""
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, d): the same angle for the pair (i, i + d/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90 degree turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, d) by the angles in cos/sin (B, T, d)."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------
# 3. Grouped-query attention with a KV cache
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values for every layer: ``keys[layer]`` is (B, n_kv_heads, max_len, head_dim).

    ``length`` tokens are stored. Each layer writes its new keys/values at [length, length + T) with
    ``update``; the model calls ``advance(T)`` once all layers have run.
    """

    def __init__(self, num_layers, batch_size, max_len, num_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v (B, n_kv, T, d) after the cached tokens; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} were requested")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, S, d) -> (B, n_kv * n_rep, S, d), each KV head repeated n_rep times in place (repeat_interleave)."""
    if n_rep == 1:
        return x
    b, n_kv, s, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)


class Attention(nn.Module):
    """Causal grouped-query self-attention: softmax(q k^T / sqrt(d) + mask) v, with RoPE on q and k.

    ``qk_norm``: None (Llama), "head" (RMSNorm over each head's d, Qwen3) or "full" (RMSNorm over the whole
    projection before splitting into heads, OLMoE).
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, layer_idx=0, qk_norm=None,
                 norm_eps=1e-5, bias=False):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.n_rep, self.layer_idx = num_heads // num_kv_heads, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, norm_eps), RMSNorm(head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(num_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(num_kv_heads * head_dim, norm_eps)
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {qk_norm!r}")

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        """x (B, T, H); cos/sin (B, T, d); mask: None (plain causal) or additive (B, 1, T, S) float."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, heads * d)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, d)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, d)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, d) with S = past + T
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # (B, nh, S, d)
        # One fused kernel for softmax(q k^T / sqrt(d) + mask) v. mask=None means no padding and either
        # nothing cached (the plain causal mask, S == T, which the kernel builds itself) or one new token.
        is_causal = mask is None and t > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, nh, T, d)
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(y)


def build_attention_mask(padding_mask, num_new, num_past, dtype, device, batch_size):
    """The additive mask (B, 1, T, S) for T new tokens after ``num_past`` cached ones (S = past + T).

    ``padding_mask`` (B, S) holds 1 for real tokens and 0 for padding, or is None. Entry (i, j) is 0 when new
    token i may read key j (j <= past + i and j is not padding) and the most negative float otherwise. A padding
    query may read itself only: a row with nothing to read would make softmax's backward pass (which subtracts
    two huge logsumexps) return exploding gradients. Real tokens never read padding, so their outputs are the
    same either way; outputs at padding positions are meaningless and differ from transformers'.
    Returns None when no mask is needed beyond the kernel's own causal one (no padding, and either nothing
    cached or a single new token).
    """
    if padding_mask is None and (num_past == 0 or num_new == 1):
        return None  # plain causal (nothing cached), or one new token that may read everything before it
    if padding_mask is not None and not bool(((padding_mask == 0) | (padding_mask == 1)).all()):
        raise ValueError("a 2D attention_mask must hold only 0 (padding) and 1 (token)")
    total = num_past + num_new
    query_pos = torch.arange(num_past, total, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :].bool()  # (B, 1, T, S)
        allowed = allowed | (key_pos == query_pos)[None, None]  # a padding query reads itself (see above)
    allowed = allowed.expand(batch_size, 1, num_new, total)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------------
# 4. SwiGLU feed-forward
# --------------------------------------------------------------------------------------------------


def ffn_hidden_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule: int(2 * 4 * dim / 3), times ffn_dim_multiplier, rounded up to multiple_of.

    Llama 3 8B: dim 4096, multiplier 1.3, multiple_of 1024 -> 14336.
    """
    if dim <= 0 or multiple_of <= 0:
        raise ValueError(f"dim and multiple_of must be positive, got dim={dim}, multiple_of={multiple_of}")
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)); x (..., H) -> (..., H)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
