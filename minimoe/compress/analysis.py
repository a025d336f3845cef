"""What a trained compressor does and how fast it got there: memory-to-text attention, time to a target.

Memory-to-text attention (PIC's motivation, arXiv 2602.13980): if a memory token of the *global* baseline,
free to read the whole context, ends up reading one contiguous piece of it, a chunked mask only imposes what
training discovers anyway. For every layer we recompute the attention probabilities of the memory rows,

    A[l, j, i] = mean over heads and batch of softmax(q_j k^T / sqrt(d) + mask)[i]      (memory j, text i)

and summarise each memory token's text attention by (renormalised over text columns)
    window mass   the largest share of its attention inside any contiguous window of ``window`` tokens
                  (uniform attention gives window / n);
    centre        sum_i i * A[j, i]: where in the context it looks; ``order`` is the Spearman correlation of
                  memory index j with its centre (1 = memory tokens read the context left to right).

Time to target: the first evaluation (steps and training seconds) at which a dev-F1 curve reaches a target.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from minimoe.compress.compressor import Compressor
from minimoe.compress.masks import MEMORY, TEXT, Layout
from minimoe.model.dense import apply_rope, repeat_kv


@torch.no_grad()
def memory_attention(compressor: Compressor, context_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A (L, k, n) float32: attention of each memory token to each text token, per layer (see module doc)."""
    model = compressor.base
    if model.config.qk_norm is not None:
        raise ValueError("memory_attention supports Llama attention (qk_norm=None) only")
    captured = []
    hooks = [layer.attn.register_forward_pre_hook(lambda module, args: captured.append((module, args)))
             for layer in model.layers]
    try:
        compressor.encode(context_ids, layout)
    finally:
        for hook in hooks:
            hook.remove()
    memory_rows = layout.slots(MEMORY).to(context_ids.device)
    text_columns = layout.slots(TEXT).to(context_ids.device)
    maps = []
    for attn, (x, cos, sin, mask, *_rest) in captured:
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, nh, S, d)
        k = attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # (B, nkv, S, d)
        q, k = apply_rope(q, cos, sin), repeat_kv(apply_rope(k, cos, sin), attn.n_rep)
        scores = (q[:, :, memory_rows].float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)
        scores = scores + mask[:, :, memory_rows].float()  # (B, nh, k, S)
        probs = scores.softmax(-1)[..., text_columns]  # (B, nh, k, n)
        maps.append(probs.mean(dim=(0, 1)))
    return torch.stack(maps).cpu()  # (L, k, n)


def locality(attention: torch.Tensor, window: int) -> dict:
    """Summaries of a (k, n) memory-to-text attention map (see the module docstring)."""
    if attention.ndim != 2 or not 1 <= window <= attention.shape[1]:
        raise ValueError(f"need a (k, n) map and 1 <= window <= n, got {tuple(attention.shape)} and window={window}")
    a = attention.double()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)  # (k, n), each row sums to 1 over the text
    n = a.shape[1]
    cumulative = torch.cat([torch.zeros(a.shape[0], 1, dtype=a.dtype), a.cumsum(-1)], dim=1)  # (k, n + 1)
    window_mass = (cumulative[:, window:] - cumulative[:, :-window]).max(-1).values  # (k,)
    centre = (a * torch.arange(n, dtype=a.dtype)).sum(-1)  # (k,)
    order = float("nan")
    if a.shape[0] > 1:
        ranks = np.argsort(np.argsort(centre.numpy()))
        order = float(np.corrcoef(np.arange(a.shape[0]), ranks)[0, 1])
    return {"window_mass": float(window_mass.mean()), "uniform_window_mass": window / n,
            "centres": [round(float(c), 1) for c in centre], "order": order}


def time_to_target(curve: list[dict], target: float, key: str = "f1") -> dict | None:
    """The first point of ``curve`` (a list of {step, seconds, f1, ...}) with ``key`` >= target, or None."""
    for point in curve:
        if point[key] >= target:
            return {"step": point["step"], "seconds": point["seconds"]}
    return None


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    values = np.asarray(list(values), dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0
