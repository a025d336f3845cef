"""The soft-prompt compressor: base LM + LoRA + k learned memory tokens -> k embeddings a frozen LM reads.

ICAE (Ge et al. 2024, "In-context Autoencoder for Context Compression in a Large Language Model"):

    encoder:  h = LM_lora( layout(embed(context) (B, n, H), memory (k, H)) ; mask, position_ids )   (B, S, H)
              memory_out = h[:, memory slots]                                                      (B, k, H)
    decoder:  logits = LM( [embed(bos), memory_out, embed(prompt), embed(target)] )   the same LM, adapters off
    loss:     cross-entropy of the target tokens only

Only the LoRA matrices (peft; Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") and the
memory embeddings train; the base weights are frozen and shared by encoder and decoder (the decoder runs
with the adapters disabled). ``h`` is the output of the final RMSNorm (the last hidden state transformers
returns). The mask and position ids come from ``minimoe.compress.masks`` and are the only thing that differs
between ICAE-global and PIC.

500xCompressor (Li et al. 2025, "500xCompressor: Generalized Prompt Compression for Large Language Models")
hands the decoder the memory tokens' keys and values of every layer instead of the last hidden states:
``memory_kv`` returns them (differentiable, for training), ``memory_cache`` as a ``KVCache`` the frozen decoder
continues from.

``encode_chunk_by_chunk`` is the readable reference for PIC: it compresses one chunk at a time, carrying the
memory of earlier chunks as keys/values in a cache; the single masked pass of ``encode`` must agree with it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from minimoe.compress.masks import MEMORY, TEXT, Layout
from minimoe.model.dense import KVCache, rope_cos_sin
from minimoe.model.transformer import Transformer

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = may read) -> float mask added to the attention scores (0 or the most negative float)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without stalling the GPU: a copy from pageable memory waits for every
    kernel queued before it, a copy from pinned memory does not."""
    if x.device == device or device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def final_hidden(model: Transformer, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """The model's blocks and final RMSNorm without the LM head: (B, T, H) -> (B, T, H).

    attention_mask: bool (B or 1, 1, T, past + T), or already additive (float, ``additive_mask``), or None
    (causal); position_ids int (B or 1, T). The model's RoPE frequencies move to the device it runs on (once).
    """
    b, t, _ = inputs_embeds.shape
    device = inputs_embeds.device
    past = cache.length if cache is not None else 0
    if past + t > model.config.max_seq_len:
        raise ValueError(f"{past + t} positions are longer than the model's max_seq_len={model.config.max_seq_len}")
    if model.inv_freq.device != device:
        model.inv_freq = model.inv_freq.to(device)  # float32 either way; keeps every later call off the host
    position_ids = to_device(position_ids, device).expand(b, t)
    cos, sin = rope_cos_sin(model.inv_freq, position_ids, inputs_embeds.dtype)  # (B, T, head_dim)
    if attention_mask is None or attention_mask.is_floating_point():
        mask = None if attention_mask is None else attention_mask.to(device, inputs_embeds.dtype)
    else:
        mask = additive_mask(to_device(attention_mask, device), inputs_embeds.dtype)
    x = inputs_embeds
    for layer in model.layers:
        x = layer(x, cos, sin, mask, cache)
    if cache is not None:
        cache.advance(t)
    return model.norm(x)


def kv_cache_from(model: Transformer, memory_kv, extra: int) -> KVCache:
    """A decoder cache holding the memory keys/values (500xCompressor) with room for ``extra`` more tokens.

    memory_kv: (keys, values, start) with keys[layer] / values[layer] (B, n_kv_heads, k, head_dim) from
    ``Compressor.memory_kv`` (rows already matched to the decoder's rows) and ``start``, the position the
    decoder continues at: the tokens fed after the cache must get position ids ``start, start + 1, ...`` (the
    cache does not store them). The cache has the keys' dtype and device; the copy is out of place, so gradients
    reach the encoder through it. Raises ValueError when the layers do not match the model's.
    """
    keys, values, _ = memory_kv
    if len(keys) != model.config.num_layers or len(values) != len(keys):
        raise ValueError(f"memory_kv holds {len(keys)} layers of keys and {len(values)} of values; the model has "
                         f"{model.config.num_layers}")
    b, heads, k, dim = keys[0].shape
    cache = KVCache(0, b, k + extra, heads, dim)  # no layers allocated: filled below
    room = keys[0].new_zeros(b, heads, extra, dim)
    cache.keys = [torch.cat([key, room], dim=2) for key in keys]  # (B, n_kv, k + extra, d)
    cache.values = [torch.cat([value, room], dim=2) for value in values]
    cache.length = k
    return cache


class Compressor(nn.Module):
    """Compress a context (B, n) into ``num_memory`` embeddings (B, k, H) for the frozen ``base`` to read.

    base: a minimoe ``Transformer`` (its weights are frozen in place); lora_rank / lora_alpha: the peft
    ``LoraConfig`` on ``target_modules`` of every block; seed: initialises the memory embeddings
    (normal, std = the base embedding's std). Trainable: LoRA A/B and ``memory`` (k, H).
    reader_lora: also adapt the decoder with its own LoRA of the same rank (PCC and LLoCO adapt their
    decoder; ICAE and 500xCompressor keep it frozen): the decoder is then a copy of the base with its own
    adapters, trained with the rest. Default False: the decoder is the untouched base.
    """

    def __init__(self, base: Transformer, num_memory: int, lora_rank: int = 8, lora_alpha: float = 16.0,
                 target_modules=LORA_TARGETS, seed: int = 0, reader_lora: bool = False):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if isinstance(num_memory, bool) or not isinstance(num_memory, int) or num_memory < 1:
            raise ValueError(f"num_memory must be a positive int, got {num_memory!r}")
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive int, got {lora_rank!r}")
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(target_modules))
        reader = copy.deepcopy(base) if reader_lora else None  # before peft touches `base`
        self.peft = get_peft_model(base, config)  # LoRA layers injected into `base` in place
        self.base = base
        self.reader_peft = None if reader is None else get_peft_model(reader, copy.deepcopy(config))
        self.reader = reader  # the adapted decoder, or None: the decoder is `base` with its adapters off
        self.num_memory = num_memory
        self._on_device: dict = {}  # layout -> its slot order, memory slots, positions and mask on a device
        generator = torch.Generator().manual_seed(seed)
        std = float(base.embed.weight.detach().float().std())
        weight = torch.randn(num_memory, base.config.hidden_size, generator=generator) * std
        self.memory = nn.Parameter(weight.to(base.embed.weight.device, base.embed.weight.dtype))  # (k, H)

    # ---- encoder -------------------------------------------------------------------------------------
    def _check(self, context_ids: torch.Tensor, layout: Layout) -> None:
        if context_ids.ndim != 2 or context_ids.is_floating_point():
            raise ValueError(f"context_ids must be an integer tensor (B, n), got {tuple(context_ids.shape)}")
        if context_ids.shape[1] != layout.num_text or layout.num_memory != self.num_memory:
            raise ValueError(f"the layout holds {layout.num_text} text and {layout.num_memory} memory tokens; got a "
                             f"context of {context_ids.shape[1]} tokens and a compressor of {self.num_memory}")
        size, limit = layout.kind.numel(), self.base.config.max_seq_len
        if size > limit:
            raise ValueError(f"context ({layout.num_text}) + memory ({layout.num_memory}) = {size} slots, longer than "
                             f"the model's max_seq_len={limit}")
        if int(layout.position_ids.max()) >= limit:
            raise ValueError(f"the layout uses position {int(layout.position_ids.max())}, beyond the model's "
                             f"max_seq_len={limit}")

    def _device_layout(self, layout: Layout, device: torch.device) -> dict:
        """What a pass needs of ``layout``, on ``device``, computed once per (layout, device): the slot order
        (slot -> row of [text, memory]), the memory slots, the position ids, the mask, and where the decoder
        continues (one past the largest position)."""
        key = (id(layout.attention_mask), device)
        if key not in self._on_device:
            order = torch.where(layout.kind == MEMORY, layout.source + layout.num_text, layout.source)
            self._on_device[key] = {"layout": layout, "order": order.to(device), "memory": layout.slots(MEMORY).to(device),
                                    "positions": layout.position_ids.to(device),
                                    "mask": layout.attention_mask.to(device), "start": int(layout.position_ids.max()) + 1}
        return self._on_device[key]

    def _laid_out(self, context_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
        """(B, S, H): the text embeddings and the memory embeddings in the layout's slot order."""
        b = context_ids.shape[0]
        text = self.base.embed(context_ids)  # (B, n, H)
        memory = self.memory[None].expand(b, -1, -1).to(text.dtype)  # (B, k, H)
        stacked = torch.cat([text, memory], dim=1)  # (B, n + k, H): text first, then memory
        return stacked[:, self._device_layout(layout, stacked.device)["order"]]

    def encode(self, context_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
        """One masked pass: context (B, n) int -> memory embeddings (B, k, H), in memory-token order."""
        self._check(context_ids, layout)
        on = self._device_layout(layout, context_ids.device)
        h = final_hidden(self.base, self._laid_out(context_ids, layout), on["mask"], on["positions"])
        return h[:, on["memory"]]  # (B, k, H)

    def memory_kv(self, context_ids: torch.Tensor, layout: Layout):
        """500xCompressor: the memory tokens' keys and values of every layer, from one masked encoder pass.

        context_ids (B, n) int64. Returns (keys, values, start): keys[layer] / values[layer]
        (B, n_kv_heads, k, head_dim) in memory-token order, RoPE already applied at the layout's positions, in the
        dtype attention computes in (the autocast dtype under autocast, else the embeddings'); ``start`` is the
        position the decoder continues at (one past the layout's largest). Differentiable: gradients reach LoRA
        and ``memory``. Raises ValueError when the context does not fit the layout or the model's positions.
        """
        self._check(context_ids, layout)
        x = self._laid_out(context_ids, layout)
        device_type, c = x.device.type, self.base.config
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        full = KVCache(c.num_layers, x.shape[0], layout.kind.numel(), c.num_kv_heads, c.head_dim, dtype,
                       x.device)  # in the dtype attention computes keys/values in
        on = self._device_layout(layout, x.device)
        final_hidden(self.base, x, on["mask"], on["positions"], full)
        keys = [k[:, :, on["memory"]] for k in full.keys]  # (B, n_kv, k, d) each: a gathered copy
        values = [v[:, :, on["memory"]] for v in full.values]
        return keys, values, on["start"]

    def memory_cache(self, context_ids: torch.Tensor, layout: Layout, extra: int) -> tuple[KVCache, int]:
        """``memory_kv`` in a ``KVCache`` (per layer (B, n_kv_heads, k + extra, head_dim), ``length`` = k) and
        ``start``: feed the decoder's next tokens with ``position_ids`` from ``start`` (see ``kv_cache_from``)."""
        memory_kv = self.memory_kv(context_ids, layout)
        return kv_cache_from(self.base, memory_kv, extra), memory_kv[2]

    def encode_chunk_by_chunk(self, context_ids: torch.Tensor, layout: Layout, mem_sees_prev_mem: bool) -> torch.Tensor:
        """The reference loop for a PIC layout: chunk j's text and memory run in one forward call whose cache
        holds only earlier chunks' memory keys/values; its text keys/values are dropped afterwards."""
        self._check(context_ids, layout)
        b = context_ids.shape[0]
        text = self.base.embed(context_ids)  # (B, n, H)
        cache = self.base.new_cache(b, layout.kind.numel())
        outputs = []
        for j in range(int(layout.chunk.max()) + 1):
            text_slots = torch.nonzero((layout.chunk == j) & (layout.kind == TEXT)).squeeze(1)
            memory_slots = torch.nonzero((layout.chunk == j) & (layout.kind == MEMORY)).squeeze(1)
            length, count, past = len(text_slots), len(memory_slots), cache.length
            x = torch.cat([text[:, layout.source[text_slots]],
                           self.memory[layout.source[memory_slots]][None].expand(b, -1, -1).to(text.dtype)], dim=1)
            positions = layout.position_ids[:, torch.cat([text_slots, memory_slots])]  # (1, L + m)
            mask = torch.ones(length + count, past + length + count, dtype=torch.bool).tril(past)  # causal
            mask[:length, :past] = False  # text never reads earlier memory
            mask[length:, :past] = mem_sees_prev_mem  # memory reads earlier memory if allowed
            h = final_hidden(self.base, x, mask[None, None].to(x.device), positions, cache)
            outputs.append(h[:, length:])  # (B, m, H)
            for layer in range(len(cache.keys)):  # keep this chunk's memory keys/values, drop its text
                for store in (cache.keys[layer], cache.values[layer]):
                    store[:, :, past:past + count] = store[:, :, past + length:past + length + count].clone()
            cache.length = past + count
        return torch.cat(outputs, dim=1)  # (B, k, H)

    # ---- decoder -------------------------------------------------------------------------------------
    @contextmanager
    def decoder(self):
        """Context manager yielding the decoder: ``self.base`` with its LoRA adapters off (the frozen base LM), or
        the adapted copy when the compressor was built with ``reader_lora=True``."""
        if self.reader is not None:
            yield self.reader
            return
        with self.peft.disable_adapter():
            yield self.base
