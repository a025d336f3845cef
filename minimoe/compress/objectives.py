"""Training objectives and answer generation for a compressor whose output a frozen decoder reads.

Every objective is one (context, prompt, target) triple (ICAE, Ge et al. 2024, §3): the compressor turns the
context into memory, the frozen decoder reads ``[bos, memory, prompt]`` and is scored on ``target``:

    autoencoding   context = x,        prompt = an "repeat" cue,   target = x + [eos]   (reconstruct the context)
    continuation   context = x[:c],    prompt = [],                target = x[c:]       (language modelling)
    QA             context = document, prompt = question,          target = answer + [eos]

    loss = - mean over target tokens of log p_decoder(target_t | bos, memory, prompt, target_<t)

Only the decoder's *inputs* change between objectives, never its weights. Sequences of different lengths are
right-padded for training (causal attention never reads the padding after a token) and left-padded for
generation (positions count real slots only, as transformers' ``generate`` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimoe.compress.compressor import final_hidden, kv_cache_from, to_device
from minimoe.model.transformer import Transformer

IGNORE = -100


def autoencoding_example(context: list[int], cue: list[int], eos_id: int) -> tuple[list[int], list[int], list[int]]:
    """(context, prompt, target) asking the decoder to reproduce the context after a cue."""
    return list(context), list(cue), list(context) + [eos_id]


def continuation_example(tokens: list[int], split: int) -> tuple[list[int], list[int], list[int]]:
    """(tokens[:split], [], tokens[split:]): continue the text the memory stands for."""
    if not 0 < split < len(tokens):
        raise ValueError(f"split must lie inside the {len(tokens)} tokens, got {split}")
    return list(tokens[:split]), [], list(tokens[split:])


def qa_example(context: list[int], question: list[int], answer: list[int], eos_id: int):
    """(context, question, answer + [eos])."""
    return list(context), list(question), list(answer) + [eos_id]


def decoder_loss(model: Transformer, prefix: torch.Tensor, prompts: list[list[int]], targets: list[list[int]],
                 pad_id: int, memory_kv=None) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` for a decoder reading ``prefix`` (B, P, H) embeddings, then the prompt.

    prefix: what replaces the context (``[bos, memory]``, ``[bos, context]`` embedded, or just ``[bos]``).
    memory_kv: optional (keys, values, start) of ``Compressor.memory_kv``, one row per prefix row: the decoder
    then reads the memory's keys/values in every layer before the prefix (500xCompressor), and the prefix starts
    at position ``start``. Returns a 0-dim float32 tensor (nats per target token). Raises ValueError for a row
    count that differs between prefix, prompts, targets and memory_kv, or more positions than ``max_seq_len``.
    """
    logits, labels, _ = decoder_target_logits(model, prefix, prompts, targets, pad_id, memory_kv)
    return F.cross_entropy(logits.float(), labels)  # mean over the N target tokens


def decoder_target_logits(model: Transformer, prefix: torch.Tensor, prompts: list[list[int]],
                          targets: list[list[int]], pad_id: int, memory_kv=None):
    """The decoder's logits at every target token, teacher-forced: the pieces of ``decoder_loss``.

    Same inputs and errors as ``decoder_loss``. Returns (logits (N, V), labels (N,) int64, rows (N,) int64): the
    N target tokens of all rows in row-major order, the logits that predict each, and the row each belongs to.
    Per-token losses, argmax accuracy and "every token of a row right" all follow from these.
    """
    if len(prompts) != prefix.shape[0] or len(targets) != prefix.shape[0]:
        raise ValueError(f"need one prompt and one target per row: {prefix.shape[0]} rows, {len(prompts)} prompts, "
                         f"{len(targets)} targets")
    if memory_kv is not None and memory_kv[0][0].shape[0] != prefix.shape[0]:
        raise ValueError(f"memory_kv holds {memory_kv[0][0].shape[0]} rows for {prefix.shape[0]} prefix rows")
    b, p = prefix.shape[:2]
    longest = max(len(q) + len(t) for q, t in zip(prompts, targets))
    ids = torch.full((b, longest), pad_id, dtype=torch.long)
    labels = torch.full((b, p + longest), IGNORE, dtype=torch.long)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        ids[row, :len(prompt) + len(target)] = torch.tensor(prompt + target)
        labels[row, p + len(prompt):p + len(prompt) + len(target)] = torch.tensor(target)
    device = prefix.device
    x = torch.cat([prefix, model.embed(to_device(ids, device)).to(prefix.dtype)], dim=1)  # (B, P + T, H)
    t = x.shape[1]
    if memory_kv is None:
        h = final_hidden(model, x, None, torch.arange(t, device=device)[None])  # (B, P + T, H), causal
    else:
        if memory_kv[2] + t > model.config.max_seq_len:
            raise ValueError(f"positions {memory_kv[2]}..{memory_kv[2] + t - 1} exceed max_seq_len="
                             f"{model.config.max_seq_len}")
        cache, k = kv_cache_from(model, memory_kv, t), memory_kv[0][0].shape[2]
        mask = torch.ones(t, k + t, dtype=torch.bool, device=device).tril(k)  # all memory, then causal
        h = final_hidden(model, x, mask[None, None], memory_kv[2] + torch.arange(t, device=device)[None], cache)
    labels = labels[:, 1:]  # shift: position t predicts token t + 1
    scored = torch.nonzero(labels.reshape(-1) != IGNORE).squeeze(1)  # (N,) on the host: only target tokens reach
    # the LM head (not memory, prompt, padding); indices found on the host keep the GPU queue running
    rows = to_device(scored // labels.shape[1], device)  # (N,)
    hidden = h[:, :-1].reshape(b * labels.shape[1], -1)[to_device(scored, device)]  # (N, H)
    return model.lm_head(hidden), to_device(labels.reshape(-1)[scored], device), rows  # (N, V), (N,), (N,)


@torch.no_grad()
def greedy_from_embeds(model: Transformer, prefixes: list[torch.Tensor], max_new_tokens: int,
                       stop_ids: set[int], memory_kv=None) -> list[list[int]]:
    """Greedy continuations of a batch of embedded prompts (each (P_i, H)), left-padded, with a KV cache.

    memory_kv: optional (keys, values, start) as in ``decoder_loss``, one row per prefix (cast to the prefixes'
    dtype): every row first reads its memory's keys/values, then its prompt from position ``start``. Returns the
    generated ids of every row, cut before the first id in ``stop_ids``. Raises ValueError for more positions
    than ``max_seq_len`` or a memory_kv whose rows differ from the prefixes'.
    """
    if memory_kv is not None and memory_kv[0][0].shape[0] != len(prefixes):
        raise ValueError(f"memory_kv holds {memory_kv[0][0].shape[0]} rows for {len(prefixes)} prefixes")
    b, longest = len(prefixes), max(len(prefix) for prefix in prefixes)
    past, start = (0, 0) if memory_kv is None else (memory_kv[0][0].shape[2], memory_kv[2])
    total = start + longest + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({start + longest}) + max_new_tokens ({max_new_tokens}) = {total} positions "
                         f"exceed max_seq_len={model.config.max_seq_len}")
    first = prefixes[0]
    x = first.new_zeros(b, longest, first.shape[-1])  # (B, P, H), left-padded
    attention = torch.zeros(b, longest, dtype=torch.long, device=first.device)
    for row, prefix in enumerate(prefixes):
        x[row, longest - len(prefix):] = prefix
        attention[row, longest - len(prefix):] = 1
    positions = start + (attention.cumsum(-1) - 1).clamp(min=0)  # (B, P): real slots count from start
    if memory_kv is None:
        cache = model.new_cache(b, total)
        cache.keys = [k.to(x.dtype) for k in cache.keys]
        cache.values = [v.to(x.dtype) for v in cache.values]
    else:
        keys, values, _ = memory_kv
        cache = kv_cache_from(model, ([k.to(x.dtype) for k in keys], [v.to(x.dtype) for v in values], start),
                              longest + max_new_tokens)
        attention = torch.cat([attention.new_ones(b, past), attention], dim=1)  # (B, k + P): memory is real
    mask = None if bool(attention.all()) and past == 0 else attention
    logits = model(inputs_embeds=x, attention_mask=mask, position_ids=positions, cache=cache, last_only=True)
    generated, finished = [], torch.zeros(b, dtype=torch.bool, device=x.device)
    stops = torch.tensor(sorted(stop_ids), device=x.device)
    for _ in range(max_new_tokens):
        next_ids = logits[:, -1].argmax(-1)  # (B,)
        generated.append(next_ids)
        finished |= torch.isin(next_ids, stops)
        if bool(finished.all()):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(next_ids[:, None], attention_mask=mask, position_ids=positions, cache=cache)
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(b)]
    out = []
    for row in rows:
        cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        out.append(row[:cut])
    return out
