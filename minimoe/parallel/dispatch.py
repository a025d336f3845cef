"""Dispatch and combine: token rows to the ranks holding their experts and back, in four wire formats.

Rank r holds T tokens x (T, H), each routed to k physical slots (``RouteTable.route``; -1 = none or
dropped) with weights w (T, k). Slot s lives on rank s // slots_per_gpu, node rank // gpus_per_node. Every
row on the wire carries m (slot, weight) entries; the receiver computes y_n = Σ_j w_nj · E_{s_nj}(x_n) over
the entries of its own slots (``minimoe.parallel.experts``), and combine returns each y_n to its source,
where a token's results add up to y_t = Σ_j w_tj · E_j(x_t). The formats differ in what a row is
(Megatron-LM's and torchtitan's token dispatchers; DeepEP, DeepSeek-AI 2025; vLLM's all-gather exchange):

* ``token_expert`` — one row per (token, expert) pair, m = 1 (DeepEP's low-latency kernels, Megatron,
  torchtitan): a token with two experts on one rank travels twice.
* ``token_rank`` — one row per (token, destination rank), m = k (DeepEP's *intranode* normal kernels
  de-duplicate per rank like this).
* ``hierarchical`` — leg A sends one row per (token, remote *node*) to the token's *entry* rank there (same
  local index), carrying all k global slots; leg B is ``token_rank`` over [own tokens; rows received in leg
  A], with the slots of this node. Combine sums at the entry rank before the one trip back over the node
  boundary (DeepEP's *internode* normal kernels de-duplicate per node the same way, but pipeline both legs
  inside one kernel; here they run one after the other on the world group). On one node there is no remote
  node for leg A to reach, so only leg B runs: the format is then ``token_rank``.
* ``replicate`` — every token goes to every rank: all-gather the tokens, each rank runs its experts on the
  rows that hit them, reduce-scatter sums the results (``minimoe.parallel.replicate``). No counts, and no host
  sync once every rank's token count is known (``static`` or ``tokens_per_rank``).

**An all-to-all leg** (the first three formats; ``minimoe.parallel.legs``) builds its send plan on the device,
exchanges the (G,) counts with **one host sync**, gathers the payload into one buffer and sends it with one
``all_to_all_single``; combine returns the results the same way and sums each token's cells in one weighted
gather. Hierarchical pays one sync per leg: leg B's counts depend on what leg A delivered.

**Static shapes** (``static=True``, ``token_rank``): every token to every rank, splits [T]·G known in
advance: no count exchange, no host sync, capturable in a CUDA graph; every rank must pass the same T.
``replicate`` moves the same rows with less metadata and no pack, and is what the format rule picks.

``TrafficCounters`` (``minimoe.parallel.counters``) count what crosses to another rank per link class and
direction; for every format their ``bytes`` equal ``minimoe.placement.measure``'s prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minimoe.parallel.comm import group_rank_size
from minimoe.parallel.counters import TrafficCounters
from minimoe.parallel.legs import return_leg, run_leg
from minimoe.parallel.routing import local_slots, on_node
from minimoe.parallel.sendplan import entry_ranks

WIRE_FORMATS = ("token_expert", "token_rank", "hierarchical", "replicate")


@dataclass
class Handle:
    """What combine needs to undo a dispatch (DeepEP calls it the handle)."""

    wire_format: str
    legs: list
    num_tokens: int
    group: object
    requires_grad: bool
    rank: int
    gpus_per_node: int
    counters: TrafficCounters | None
    static: bool = False
    received: tuple = ()  # (N, H): the rows dispatch delivered here, the shape combine takes back


@dataclass
class Dispatched:
    """Rows received by this rank: ``rows`` (N, H), ``slots`` (N, m) int64 local slot ids (-1 = not for this
    rank), ``weights`` (N, m) float32, and the ``handle`` for :func:`combine`."""

    rows: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    handle: Handle


def dispatch(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, layout, wire_format: str = "token_rank",
             group=None, counters: TrafficCounters | None = None, requires_grad: bool | None = None,
             static: bool = False, tokens_per_rank: list[int] | None = None) -> Dispatched:
    """Send this rank's token rows to the ranks holding their slots (a collective: every rank calls it).

    x (T, H) float on the backend's device; slots (T, k) int64 global slot ids in [0, num_slots) (-1 = none;
    checked on the CPU, trusted on a GPU, where checking would cost a host sync); weights (T, k) float32;
    ``layout``: the ``Placement`` or ``RouteTable`` (for slots_per_gpu, gpus_per_node, num_gpus);
    ``requires_grad`` (default: whether x or weights need a gradient) must agree on all ranks; ``static``:
    fixed shapes, no host sync (``token_rank`` and ``replicate``; every rank must pass the same T);
    ``tokens_per_rank``: ``replicate`` only, every rank's T when the caller knows them (else agreed with one
    small all-gather, or, with ``static``, [T]·G). Raises ValueError on bad shapes, an unknown
    ``wire_format`` or a group that is not the placement's size, TypeError for a ``layout`` of another type.
    """
    if wire_format not in WIRE_FORMATS:
        raise ValueError(f"wire_format must be one of {WIRE_FORMATS}, got {wire_format!r}")
    if x.dim() != 2 or slots.shape != weights.shape or slots.dim() != 2 or slots.shape[0] != x.shape[0]:
        raise ValueError(f"dispatch needs x (T, H), slots (T, k) and weights (T, k); got {tuple(x.shape)}, "
                         f"{tuple(slots.shape)}, {tuple(weights.shape)}")
    if not all(hasattr(layout, name) for name in ("num_gpus", "slots_per_gpu", "gpus_per_node")):
        raise TypeError(f"layout must be a Placement or a RouteTable (num_gpus, slots_per_gpu, gpus_per_node), got "
                        f"{type(layout).__name__}")
    rank, size = group_rank_size(group)
    num_gpus, spg, gpn = layout.num_gpus, layout.slots_per_gpu, layout.gpus_per_node
    if size != num_gpus:
        raise ValueError(f"the placement is for {num_gpus} GPUs but the process group has {size} ranks")
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad)
    if static and wire_format not in ("token_rank", "replicate"):
        raise ValueError(f"static=True needs wire_format 'token_rank' or 'replicate', got {wire_format!r}")
    h = Handle(wire_format, [], x.shape[0], group, bool(requires_grad), rank, gpn, counters, static)
    if weights.dtype != torch.float32 or slots.dtype != torch.int64:  # (checked first: a no-op call still costs)
        if slots.is_floating_point():
            raise ValueError(f"slots must hold integer slot ids, got dtype {slots.dtype}")
        weights, slots = weights.float(), slots.long()
    if not slots.is_cuda and slots.numel():  # on a GPU this check would cost a host sync: the ids are trusted there
        low, high, num_slots = int(slots.min()), int(slots.max()), num_gpus * spg
        if low < -1 or high >= num_slots:
            raise ValueError(f"slots must be global slot ids in [0, {num_slots}) or -1 (none), got ids in "
                             f"[{low}, {high}]")
    if wire_format == "replicate":
        from minimoe.parallel.replicate import replicate_dispatch

        rows, w, s = replicate_dispatch(x, slots, weights, h, num_gpus, static, tokens_per_rank)
    elif wire_format == "token_expert":
        pairs = slots.reshape(-1, 1)
        rows, w, s = run_leg(x, weights.reshape(-1, 1), pairs, pairs, h, "dispatch", num_gpus, spg,
                          pairs_of=slots.shape[1])
    elif wire_format == "token_rank" or num_gpus == gpn:  # hierarchical on one node: no leg A, only leg B
        rows, w, s = run_leg(x, weights, slots, None if static else slots, h, "dispatch", num_gpus, spg)
    else:
        rows_a, w_a, s_a = run_leg(x, weights, slots, entry_ranks(slots, spg, gpn, rank), h,
                                "dispatch leg A (inter-node)", num_gpus)
        node = rank // gpn
        slots_b = torch.cat([on_node(slots, layout, node), on_node(s_a, layout, node)])
        x_b, w_b = torch.cat([x, rows_a]), torch.cat([weights, w_a])
        rows, w, s = run_leg(x_b, w_b, slots_b, slots_b, h, "dispatch leg B (intra-node)", num_gpus, spg)
    h.received = (rows.shape[0], x.shape[1])
    return Dispatched(rows, local_slots(s, layout, rank), w, h)


def combine(expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
    """Return each received row's expert output to its source and sum per token: (N, H) -> (T, H).

    ``expert_out`` row n must be Σ_j w_nj E_{s_nj}(rows_n) for the rows of the matching :func:`dispatch`.
    A collective, like dispatch. Raises ValueError (before any exchange) when ``expert_out`` is not (N, H), the
    shape of the rows that dispatch delivered, TypeError when ``handle`` is not a dispatch's ``Handle``.
    """
    h = handle
    if not isinstance(h, Handle):
        raise TypeError(f"combine needs the handle of a dispatch (Dispatched.handle), got {type(h).__name__}")
    if tuple(expert_out.shape) != h.received:
        raise ValueError(f"combine needs expert_out of shape (N, H) = {h.received}, the rows dispatch delivered to "
                         f"this rank, got {tuple(expert_out.shape)}")
    if h.wire_format == "replicate":
        from minimoe.parallel.replicate import replicate_combine

        return replicate_combine(expert_out, h)
    if len(h.legs) == 1:  # one leg (hierarchical on one node too)
        return return_leg(expert_out, h.legs[0], h, "combine", h.num_tokens)
    leg_a, leg_b = h.legs
    partial = return_leg(expert_out, leg_b, h, "combine leg B (intra-node)", h.num_tokens + sum(leg_a.recv_splits))
    return partial[:h.num_tokens] + return_leg(partial[h.num_tokens:], leg_a, h, "combine leg A (inter-node)",
                                            h.num_tokens)
