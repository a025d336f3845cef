"""Text generation with a KV cache: one prefill pass over the prompt, then one token per step.

    prefill:  logits = model(prompt)                  (B, T) tokens, cache filled with T keys/values
    decode:   next = pick(logits[:, -1]);  logits = model(next)   one token, attends to the cache

``pick`` is argmax (greedy, ``temperature=0``) or a sample from softmax(logits / temperature) restricted
to the smallest set of tokens whose probability mass reaches ``top_p`` (nucleus sampling, Holtzman et al.
2020). Batches of different prompt lengths are left-padded; positions count real tokens only, as in
transformers' ``generate``, so greedy decoding gives the same tokens as ``generate(do_sample=False)``.
"""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from the last-position logits (B, V)."""
    if not 0 <= temperature < float("inf") or not 0 < top_p <= 1:  # (NaN fails both comparisons)
        raise ValueError(f"need a finite temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, "
                         f"top_p={top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1:
        # the k most probable tokens in descending order (torch.topk: the head of probs.sort(descending=True), and
        # far cheaper than sorting the vocabulary); k grows until every row's nucleus ends inside them
        k = min(probs.shape[-1], 256)
        while True:
            sorted_probs, order = probs.topk(k, dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
            if k == probs.shape[-1] or bool((mass_before[:, -1] >= top_p).all()):
                break
            k = min(probs.shape[-1], 4 * k)
        sorted_probs[mass_before >= top_p] = 0.0  # keep the smallest prefix that reaches top_p (>= 1 token)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt (B, T) -> prompt and continuation (B, T + n), n <= max_new_tokens.

    ``attention_mask`` (B, T) marks left padding with 0. After a sequence emits ``eos_token_id`` it is padded
    with ``pad_token_id`` (default: the eos id); generation stops once every sequence has finished. Raises
    ValueError for a prompt that is not (B, T), a mask of another shape or not of the form 0...0 1...1 per row,
    or more tokens than ``max_seq_len``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    batch, prompt_len = input_ids.shape
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, prompt_len):
            raise ValueError(f"attention_mask must have input_ids' shape {(batch, prompt_len)}, got "
                             f"{tuple(attention_mask.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()) or \
                not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
            raise ValueError("attention_mask must be 0 for left padding then 1 for every prompt token (no padding on "
                             "the right or in the middle: generation continues after the last column)")
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # nothing is padded: the model's causal mask is all we need (and it is faster)
    if attention_mask is None:
        positions = torch.arange(prompt_len, device=input_ids.device).expand(batch, prompt_len)  # (B, T)
    else:  # positions count only real tokens, so a left-padded prompt starts at position 0
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
    cache = model.new_cache(batch, total)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, last_only=True)

    tokens, finished = input_ids, torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    for _ in range(max_new_tokens):
        next_ids = sample_next(logits[:, -1], temperature, top_p, generator)  # (B,)
        if eos_token_id is not None:
            next_ids = next_ids.masked_fill(finished, pad)
            finished |= next_ids == eos_token_id
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        if eos_token_id is not None and bool(finished.all()):
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1  # (B, 1)
        logits = model(next_ids[:, None], attention_mask=attention_mask, position_ids=positions, cache=cache)
    return tokens
