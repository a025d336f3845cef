"""Attention masks for soft-prompt compression: causal, ICAE-global, PIC-chunked and gist.

A compressor reads ``n`` context tokens and ``k = n / ratio`` learned *memory* tokens in one forward pass;
the final hidden states at the memory positions are the compressed context. Which tokens each position may
read is the whole difference between the methods, so each builder returns a ``Layout``: the order of the
slots, a boolean attention mask (True = the query row may read the key column) and the position ids RoPE sees.

- causal:  the plain language-model mask, slot ``s`` reads slots ``<= s``.
- global (ICAE, Ge et al. 2024, "In-context Autoencoder for Context Compression in a Large Language
  Model"): ``[t_0 .. t_{n-1}, m_0 .. m_{k-1}]`` with the causal mask, so every memory token reads the whole
  context (and the memory before it). Positions ``"continue"``: memory ``j`` sits at ``n + j``; or
  ``"spread"`` (Zhao et al. 2024, "Position IDs Matter"): memory ``j`` sits at ``floor((j + 1) n / k) - 1``,
  the position of the last text token of the j-th of k equal stretches, a soft locality prior (RoPE makes
  near tokens easier to attend to) with the mask unchanged: PIC's hard prior made soft.
- PIC (Parallelized Iterative Compression, "Cognitive Chunking for Soft Prompts: Accelerating Compressor
  Learning via Block-wise Causal Masking", arXiv 2602.13980): the context is cut into ``c = n / L`` chunks of
  ``L`` tokens and each chunk gets ``L / ratio`` memory tokens. Chunk ``j``'s text reads only chunk ``j``'s
  text (causally); chunk ``j``'s memory reads chunk ``j``'s text and the memory of chunk ``j`` before it.
  The paper's mask details are not public, so the open choices are options:
    * ``layout``: ``"append"`` (all text, then all memory: the same token order as ICAE) or
      ``"interleave"`` (``T_1 M_1 T_2 M_2 ...``: each chunk's memory right after it);
    * ``mem_sees_prev_mem``: chunk ``j``'s memory also reads the memory of chunks ``< j`` (iterative
      compression: each summary may build on the summary so far, as in Compressed Context Memory,
      Kim et al. 2024, and Activation Beacon, Zhang et al. 2024);
    * ``positions``: ``"continue"`` (a slot's position is its index in the laid-out sequence) or
      ``"restart"`` (every chunk counts from 0: text ``0 .. L-1``, its memory ``L .. L + L/ratio - 1``).
    * ``text_sees``: ``"chunk"`` (text reads only its own chunk's text: chunks are compressed independently)
      or ``"all"`` (text reads all earlier text, causally, as in ICAE; only the memory is chunk-local).
  Under ``"restart"`` the two layouts give the same outputs (the mask connects the same pairs and RoPE sees
  the same positions), so ``layout`` matters only with ``"continue"``.
- gist (Mu et al. 2023, "Learning to Compress Prompts with Gist Tokens"): ``[text, gist, after]`` in one
  model; the tokens after the gist read only the gist (and each other), never the text.

A slot never reads a later slot (every mask is causal in slot order), so the single masked pass can be
replayed chunk by chunk with a KV cache (``minimoe.compress.compressor.encode_chunk_by_chunk``).
Every row of a mask must read something: a row of all False would make softmax divide by zero, so the
builders (and ``check_mask``) raise instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

TEXT, MEMORY, AFTER = 0, 1, 2  # slot kinds
LAYOUTS = ("append", "interleave")
POSITIONS = ("continue", "restart")
GLOBAL_POSITIONS = ("continue", "spread")
TEXT_SEES = ("chunk", "all")
VARIANTS = ("global", "pic")


class Layout(NamedTuple):
    """One compression pass laid out as S = n + k (+ suffix) slots.

    attention_mask  bool (1, 1, S, S): True where query slot i may read key slot j (the 4D mask minimoe's
                    ``Transformer`` and transformers' Llama accept; broadcast it over the batch).
    position_ids    int64 (1, S): the RoPE position of every slot.
    kind            int64 (S,): TEXT, MEMORY or AFTER (gist's suffix).
    source          int64 (S,): which text token (for TEXT), memory token (MEMORY) or suffix token (AFTER).
    chunk           int64 (S,): the chunk a slot belongs to (0 for global, gist and causal).
    """

    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    kind: torch.Tensor
    source: torch.Tensor
    chunk: torch.Tensor

    @property
    def num_text(self) -> int:
        return int((self.kind == TEXT).sum())

    @property
    def num_memory(self) -> int:
        return int((self.kind == MEMORY).sum())

    def slots(self, kind: int) -> torch.Tensor:
        """Slot indices (count,) of the tokens of one kind, in the order of their ``source`` index."""
        where = torch.nonzero(self.kind == kind).squeeze(1)
        return where[torch.argsort(self.source[where])]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_mask(mask: torch.Tensor, kind: torch.Tensor | None = None) -> None:
    """Raise ValueError if ``mask`` (..., S, S) bool has a query row that reads nothing (softmax over no key)."""
    if mask.dtype != torch.bool or mask.ndim < 2 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"an attention mask must be a square bool tensor (..., S, S), got "
                         f"{tuple(mask.shape)} {mask.dtype}")
    empty = torch.nonzero(~mask.reshape(-1, *mask.shape[-2:]).any(-1))
    if len(empty):
        row = int(empty[0, 1])
        what = "" if kind is None else f" (a {('text', 'memory', 'after')[int(kind[row])]} token)"
        raise ValueError(f"query row {row}{what} of the attention mask reads no key: {len(empty)} row(s) "
                         "have nothing to attend to; every token must at least read itself")


def _finish(allowed, positions, kind, source, chunk) -> Layout:
    check_mask(allowed, kind)
    return Layout(allowed[None, None], positions[None].long(), kind.long(), source.long(), chunk.long())


def memory_count(num_text: int, ratio: int) -> int:
    """k = n / ratio memory tokens; ValueError unless ratio divides n and 1 <= k <= n."""
    _check_int("num_text", num_text, 1)
    _check_int("ratio", ratio, 1)
    if num_text % ratio:
        raise ValueError(f"compression ratio {ratio} does not divide the context of {num_text} tokens")
    return num_text // ratio


def causal_mask(num_tokens: int) -> Layout:
    """The plain language-model mask over ``num_tokens`` text slots, positions 0 .. n-1."""
    _check_int("num_tokens", num_tokens, 1)
    allowed = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()  # (S, S)
    zeros = torch.zeros(num_tokens, dtype=torch.long)
    return _finish(allowed, torch.arange(num_tokens), zeros, torch.arange(num_tokens), zeros)


def global_mask(num_text: int, num_memory: int, positions: str = "continue") -> Layout:
    """ICAE: ``[text (n), memory (k)]`` under the causal mask; every memory token reads the whole context.

    positions: ``"continue"`` (memory j at n + j) or ``"spread"`` (memory j at floor((j + 1) n / k) - 1, over the
    text it would summarise; the mask is the same). Raises ValueError for an unknown policy or k > n.
    """
    _check_int("num_text", num_text, 1)
    _check_int("num_memory", num_memory, 1)
    if positions not in GLOBAL_POSITIONS:
        raise ValueError(f"the global mask's positions must be one of {GLOBAL_POSITIONS}, got {positions!r}")
    if num_memory > num_text:
        raise ValueError(f"{num_memory} memory tokens for a context of {num_text} tokens: compression needs "
                         "at most as many memory tokens as context tokens")
    size = num_text + num_memory
    kind = torch.cat([torch.full((num_text,), TEXT), torch.full((num_memory,), MEMORY)])
    source = torch.cat([torch.arange(num_text), torch.arange(num_memory)])
    allowed = torch.ones(size, size, dtype=torch.bool).tril()
    position_ids = torch.arange(size)
    if positions == "spread":
        position_ids[num_text:] = (torch.arange(1, num_memory + 1) * num_text) // num_memory - 1
    return _finish(allowed, position_ids, kind, source, torch.zeros(size, dtype=torch.long))


def pic_mask(num_text: int, chunk_size: int, ratio: int, layout: str = "append", mem_sees_prev_mem: bool = False,
             positions: str = "continue", text_sees: str = "chunk") -> Layout:
    """PIC: chunk-local memory. ``n / chunk_size`` chunks, each with ``chunk_size / ratio`` memory tokens.

    Raises ValueError when chunk_size does not divide num_text, ratio does not divide chunk_size, an option
    is unknown, or ``text_sees="all"`` meets ``positions="restart"`` (text would read earlier chunks' text at
    positions that count again from 0). With ``chunk_size == num_text`` (one chunk) and ``positions="continue"``
    this is exactly ``global_mask(num_text, num_text // ratio)``.
    """
    _check_int("num_text", num_text, 1)
    _check_int("chunk_size", chunk_size, 1)
    _check_int("ratio", ratio, 1)
    if layout not in LAYOUTS or positions not in POSITIONS or text_sees not in TEXT_SEES:
        raise ValueError(f"layout must be one of {LAYOUTS}, positions one of {POSITIONS} and text_sees one of "
                         f"{TEXT_SEES}, got layout={layout!r}, positions={positions!r}, text_sees={text_sees!r}")
    if text_sees == "all" and positions == "restart":
        raise ValueError('text_sees="all" needs positions="continue": with "restart" text would read earlier '
                         "chunks' text at positions that count again from 0")
    if num_text % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the context of {num_text} tokens")
    if chunk_size % ratio:
        raise ValueError(f"compression ratio {ratio} does not divide the chunk of {chunk_size} tokens "
                         f"(each chunk needs a whole number of memory tokens, chunk_size / ratio)")
    num_chunks, per_chunk = num_text // chunk_size, chunk_size // ratio

    # per-token descriptions, chunk by chunk: (kind, source index, chunk, position within the chunk)
    text = [(TEXT, j * chunk_size + i, j, i) for j in range(num_chunks) for i in range(chunk_size)]
    memory = [(MEMORY, j * per_chunk + i, j, chunk_size + i) for j in range(num_chunks) for i in range(per_chunk)]
    if layout == "append":
        order = text + memory
    else:  # interleave: T_0 M_0 T_1 M_1 ...
        order = []
        for j in range(num_chunks):
            order += text[j * chunk_size:(j + 1) * chunk_size] + memory[j * per_chunk:(j + 1) * per_chunk]
    kind, source, chunk, local = (torch.tensor(column) for column in zip(*order))  # each (S,)
    size = len(order)

    earlier = torch.ones(size, size, dtype=torch.bool).tril()  # slot j <= slot i
    same_chunk = chunk[:, None] == chunk[None, :]
    query_text, key_text = (kind == TEXT)[:, None], (kind == TEXT)[None, :]
    query_mem, key_mem = (kind == MEMORY)[:, None], (kind == MEMORY)[None, :]
    allowed = (same_chunk if text_sees == "chunk" else True) & query_text & key_text  # text reads text
    allowed |= same_chunk & query_mem  # memory reads its own chunk's text and memory
    if mem_sees_prev_mem:
        allowed |= query_mem & key_mem & (chunk[None, :] < chunk[:, None])  # ... and earlier chunks' memory
    allowed &= earlier  # never a later slot
    position_ids = torch.arange(size) if positions == "continue" else local
    return _finish(allowed, position_ids, kind, source, chunk)


def gist_mask(num_text: int, num_gist: int, num_after: int) -> Layout:
    """Gist tokens: ``[text (n), gist (g), after (a)]``; the ``after`` tokens read the gist and each other only."""
    _check_int("num_text", num_text, 1)
    _check_int("num_gist", num_gist, 1)
    _check_int("num_after", num_after, 0)
    if num_gist > num_text:
        raise ValueError(f"{num_gist} gist tokens for {num_text} text tokens: a gist must be shorter than its text")
    base = global_mask(num_text, num_gist)
    size = num_text + num_gist + num_after
    kind = torch.cat([base.kind, torch.full((num_after,), AFTER)])
    source = torch.cat([base.source, torch.arange(num_after)])
    allowed = torch.ones(size, size, dtype=torch.bool).tril()
    allowed[num_text + num_gist:, :num_text] = False  # the bottleneck: after-gist tokens never read the text
    return _finish(allowed, torch.arange(size), kind, source, torch.zeros(size, dtype=torch.long))


def build_layout(variant: str, num_text: int, ratio: int, chunk_size: int | None = None, **options) -> Layout:
    """The encoder layout of a compression ``variant``: ``"global"`` (ICAE; option ``positions``, see global_mask)
    or ``"pic"`` (options: see pic_mask)."""
    if variant == "global":
        if set(options) - {"positions"}:
            raise ValueError(f"the global mask takes only the positions option, got {sorted(options)}")
        return global_mask(num_text, memory_count(num_text, ratio), **options)
    if variant == "pic":
        if chunk_size is None:
            raise ValueError("the pic variant needs chunk_size")
        memory_count(num_text, ratio)
        return pic_mask(num_text, chunk_size, ratio, **options)
    raise ValueError(f"unknown compression variant {variant!r}; choose from {VARIANTS}")


def show_mask(layout: Layout, max_slots: int = 48) -> str:
    """The mask as text: one row per query slot, ``#`` = may read, ``.`` = may not; slot names t3 / m1 / a0."""
    size = layout.kind.numel()
    if size > max_slots:
        raise ValueError(f"the mask has {size} slots; show_mask prints at most max_slots={max_slots}")
    names = [f"{'tma'[int(k)]}{int(i)}" for k, i in zip(layout.kind, layout.source)]
    width = max(len(name) for name in names)
    mask, positions = layout.attention_mask[0, 0], layout.position_ids[0]
    lines = [" " * (width + 6) + " ".join(name[0] for name in names),
             " " * (width + 6) + " ".join(name[1:][-1] for name in names)]
    for i, name in enumerate(names):
        cells = " ".join("#" if allowed else "." for allowed in mask[i].tolist())
        lines.append(f"{name:>{width}} p{int(positions[i]):<3} {cells}")
    return "\n".join(lines)
