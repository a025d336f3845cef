"""The ``replicate`` wire format: every token to every rank, by all-gather and reduce-scatter.

    dispatch   pad this rank's T tokens to the common block size B (rows with slot -1, weight 0);
               all-gather the (B, H) blocks into (G·B, H) [rank 0's block | rank 1's | ...], together with the
               small (B, k) weights and global slots (one coalesced NCCL launch for the three);
               keep the entries of this rank's slots (others -1)
    experts    each rank runs its experts on the rows that hit them (``minimoe.parallel.experts``)
    combine    reduce-scatter the (G·B, H) results: rank r gets, for each of its tokens, the sum over ranks of
               what they computed for it (NCCL adds); drop the padding rows

No counts and no pack: every shape is fixed once B is (and with B known, no host sync), so the step can be
captured in a CUDA graph. vLLM [kwon2023vllm] and SGLang [zheng2024sglang] ship this exchange as an
expert-parallel backend. The
gradient of an all-gather is a reduce-scatter and vice versa, so backward swaps them (``comm.AllGather``,
``comm.ReduceScatter``).

**Bytes.** A rank sends its block to the G-1 others in dispatch and one block to each of them in combine:
(G-1)·T·row per leg for its T real tokens, whatever the routing (``TrafficCounters`` count that in ``bytes``,
as ``minimoe.placement.measure`` predicts; padding rows go to ``padding_bytes``). The all-to-all formats send
a token only to the ranks it needs: on average ρ(G-1)/G rows per leg, with ρ the expected number of distinct
ranks a token reaches. So replicate moves G/ρ times their bytes; ``minimoe.parallel.formats`` decides.

**Block size B = max_r T_r.** ``static`` (every rank the same T, e.g. a fixed decode batch under a CUDA graph):
B = T, nothing to agree. Otherwise the caller may pass ``tokens_per_rank`` (a serving scheduler knows every
rank's batch before the forward); else the ranks agree with one all-gather of one integer, read on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minimoe.parallel.comm import AllGather, ReduceScatter, all_gather_rows, alone, anchor, gathered, scattered


@dataclass
class Blocks:
    """``tokens_per_rank`` (host list) and the block size B every rank pads to."""

    tokens_per_rank: list[int]
    block: int


def agree_tokens(num_tokens: int, group, device) -> list[int]:
    """Every rank's token count (one all-gather of one integer and a host read: a collective)."""
    mine = torch.full((1,), num_tokens, dtype=torch.int64, device=device)
    return all_gather_rows(mine, group, "token count all-gather").view(-1).tolist()


def replicate_dispatch(x, slots, weights, h, num_gpus: int, static: bool, tokens_per_rank):
    """x (T, H), slots (T, k) global, weights (T, k) float32 -> all ranks' rows (G·B, H), weights (G·B, k) and
    global slots (G·B, k) (see the module docstring); records the block sizes in the handle."""
    num_tokens, top_k = slots.shape
    if tokens_per_rank is None:
        tokens_per_rank = [num_tokens] * num_gpus if static or alone(h.group) else \
            agree_tokens(num_tokens, h.group, x.device)
    tokens_per_rank = [int(t) for t in tokens_per_rank]
    if len(tokens_per_rank) != num_gpus or tokens_per_rank[h.rank] != num_tokens:
        raise ValueError(f"tokens_per_rank must list the {num_gpus} ranks' token counts with {num_tokens} at rank "
                         f"{h.rank}, got {tokens_per_rank}")
    block = max(tokens_per_rank)
    h.legs.append(Blocks(tokens_per_rank, block))
    if h.counters is not None:
        h.counters.add("dispatch", [num_tokens] * num_gpus, x.shape[1] * x.element_size(), h.rank, h.gpus_per_node,
                       12 * top_k, padded_to=block)
    if alone(h.group) or block == 0:
        return x, weights, slots
    pad = block - num_tokens
    if pad:  # pad with rows that hit no slot
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        weights = torch.cat([weights, weights.new_zeros(pad, top_k)])
        slots = torch.cat([slots, slots.new_full((pad, top_k), -1)])
    what = "replicate dispatch (rows, weights, slots)"
    if h.requires_grad:  # one coalesced all-gather of the three: (G·B, H), (G·B, k), (G·B, k)
        return AllGather.apply(anchor(True), h.group, what, x, weights, slots)
    return tuple(gathered([x, weights, slots], h.group, what))


def replicate_combine(expert_out: torch.Tensor, h) -> torch.Tensor:
    """(G·B, H) results for all ranks' rows -> (T, H) this rank's tokens, summed over ranks."""
    blocks = h.legs[0]
    if h.counters is not None:
        h.counters.add("combine", blocks.tokens_per_rank, expert_out.shape[1] * expert_out.element_size(), h.rank,
                       h.gpus_per_node, padded_to=blocks.block)
    if alone(h.group) or blocks.block == 0:
        return expert_out
    what = "replicate combine"
    mine = ReduceScatter.apply(expert_out, anchor(True), h.group, what) if h.requires_grad else \
        scattered(expert_out, h.group, what)
    return mine[:h.num_tokens]
