"""A Llama 3 style language model whose feed-forward layers can be dense or Mixture-of-Experts.

    tokens (B, T) -> embed -> [ block_0 ... block_{L-1} ] -> RMSNorm -> lm_head -> logits (B, T, V)
    block:  h = x + attn(attn_norm(x));  out = h + ffn(ffn_norm(h))        (pre-norm, "Llama 3 Herd", §2)

Its settings are a ``minimoe.model.model_config.ModelConfig``. ``ffn`` is a SwiGLU ``FeedForward`` or, for the
layers listed in ``ModelConfig.moe_layers``, a ``minimoe.model.moe.MoELayer`` (Llama 4 interleaves them;
DeepSeek-V3 keeps its first layers dense).
The same weights give the same logits as transformers' ``LlamaForCausalLM`` (see ``minimoe.hf.convert``).
Checkpoints are a directory with ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from minimoe.model.dense import Attention, FeedForward, KVCache, RMSNorm, build_attention_mask, rope_cos_sin, rope_inv_freq
from minimoe.model.model_config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class Block(nn.Module):
    """Pre-norm transformer block: attention then feed-forward, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, layer_idx,
                              c.qk_norm, c.rms_norm_eps, c.attention_bias)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.is_moe_layer(layer_idx):
            from minimoe.model.moe import MoELayer

            self.ffn = MoELayer(c.hidden_size, c.moe)
        else:
            self.ffn = FeedForward(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)  # (B, T, H)
        return h + self.ffn(self.ffn_norm(h))  # (B, T, H)


class Transformer(nn.Module):
    """The language model: ``model(input_ids) -> logits (B, T, vocab_size)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # RoPE frequencies: a plain float32 tensor (not a buffer) so `model.to(bfloat16)` cannot round them
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens (default: max_seq_len)."""
        c, weight = self.config, self.embed.weight
        return KVCache(c.num_layers, batch_size, max_len or c.max_seq_len, c.num_kv_heads, c.head_dim,
                       weight.dtype, weight.device)

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) (or (B, 1, V) with ``last_only``).

        input_ids (B, T) int, or inputs_embeds (B, T, H); attention_mask: (B, past + T) with 1 = token,
        0 = padding, or a 4D (B, 1, T, past + T) mask (bool: True = may attend; float: added to scores);
        position_ids (B, T) default past..past+T-1; cache: a ``KVCache`` that is read and extended.
        """
        x = self._embed(input_ids, inputs_embeds)  # (B, T, H)
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        if past + t > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + t} tokens is longer than max_seq_len={self.config.max_seq_len}")
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"the cache was made for batch size {cache.batch_size}, got a batch of {b}")
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device).expand(b, t)
        elif position_ids.shape != (b, t) or position_ids.is_floating_point():
            raise ValueError(f"position_ids must be an integer tensor of shape {(b, t)}, got "
                             f"{tuple(position_ids.shape)} {position_ids.dtype}")
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)  # (B, T, head_dim)
        mask = self._mask(attention_mask, b, t, past, x)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(t)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, T, V)

    def _embed(self, input_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            h = self.config.hidden_size
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != h or not inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be a float tensor (B, T, {h}), got "
                                 f"{tuple(inputs_embeds.shape)} {inputs_embeds.dtype}")
            return inputs_embeds
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point() \
                or input_ids.dtype == torch.bool:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor (B, T), got {shape}"
                             f"{' ' + str(input_ids.dtype) if isinstance(input_ids, torch.Tensor) else ''}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = high if high >= self.config.vocab_size else low
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return self.embed(input_ids)

    def _mask(self, attention_mask, b, t, past, x):
        if attention_mask is None:
            return build_attention_mask(None, t, past, x.dtype, x.device, b)
        if attention_mask.ndim == 2:
            if attention_mask.shape != (b, past + t):
                raise ValueError(f"attention_mask must have shape {(b, past + t)} (past + new tokens), "
                                 f"got {tuple(attention_mask.shape)}")
            return build_attention_mask(attention_mask, t, past, x.dtype, x.device, b)
        if attention_mask.ndim == 4:
            if attention_mask.shape[-2:] != (t, past + t) or attention_mask.shape[0] not in (1, b):
                raise ValueError(f"a 4D attention_mask must have shape ({b}, 1, {t}, {past + t}), "
                                 f"got {tuple(attention_mask.shape)}")
            if attention_mask.dtype == torch.bool:
                zeros = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
                return zeros.masked_fill(~attention_mask, torch.finfo(x.dtype).min)
            return attention_mask.to(x.dtype)
        raise ValueError(f"attention_mask must be 2D (B, S) or 4D (B, 1, T, S), got {attention_mask.ndim}D")

    def moe_aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE layers' auxiliary loss from the last forward, combined under ``MoEConfig.aux_loss_convention``
        (``minimoe.model.aux_losses.moe_aux_loss``; attention_mask (B, T): padding left out); 0 for a dense model."""
        from minimoe.model.aux_losses import moe_aux_loss

        layers = [layer.ffn for layer in self.layers if hasattr(layer.ffn, "aux_loss")]
        return moe_aux_loss(layers, attention_mask) if layers else torch.zeros((), device=self.embed.weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints: config.json + model.safetensors -----------------------------------------------
    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            if self.lm_head.weight is not self.embed.weight:  # the head was replaced after the model was built
                raise ValueError("config.tie_word_embeddings is True but lm_head.weight is not embed.weight: "
                                 "tie them again, or set tie_word_embeddings=False to save both")
            del state["lm_head.weight"]  # stored once, as embed.weight
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        mask = os.umask(0)  # safetensors writes the file readable by its owner only: give it the usual mode
        os.umask(mask)
        os.chmod(directory / WEIGHTS_FILE, 0o666 & ~mask)

    @classmethod
    def load(cls, directory, device="cpu", dtype: torch.dtype | None = None) -> "Transformer":
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: a checkpoint holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        model = cls(ModelConfig.load(directory / CONFIG_FILE))
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except Exception as error:  # SafetensorError (a damaged header or truncated file) is not a ValueError
            raise ValueError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file "
                             f"({str(error).strip()[:200]})") from None
        expected = {k: v for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        problems = [f"missing {k}" for k in sorted(set(expected) - set(tensors))]
        problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(expected))]
        problems += [f"{k}: shape {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} in the config"
                     for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
        if problems:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not match {CONFIG_FILE}: " + "; ".join(problems[:10])
                             + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
        model.load_state_dict(tensors, strict=False)  # strict=False only for the tied lm_head, checked above
        return model.to(device=device, dtype=dtype)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift: bool = True) -> torch.Tensor:
    """Next-token cross-entropy; ``ignore_index`` labels are skipped; mean over the scored tokens.

    ``shift=True`` (transformers' convention, ``labels`` = the input ids): logits[:, t] predicts labels[:, t + 1].
    ``shift=False`` (``labels`` already hold each position's next token, as ``tokenizer.batch_iterator`` yields
    them): logits[:, t] predicts labels[:, t].
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    vocab = logits.shape[-1]
    valid = labels != ignore_index
    out_of_range = labels[valid][(labels[valid] < 0) | (labels[valid] >= vocab)]
    if out_of_range.numel():
        raise ValueError(f"label {int(out_of_range[0])} is invalid: labels must be in [0, {vocab}) or {ignore_index}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=ignore_index)
