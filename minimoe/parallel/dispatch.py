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
  rows that hit them, reduce-scatter sums the results (``minimoe.parallel.replicate``). No counts, no sync.

**An all-to-all leg** (the first three formats) follows its ``minimoe.parallel.sendplan``: the grid of
(unit, destination) cells on the device, one exchange of the (G,) counts with **one host sync**
(``CountExchange``; the plan's positions are computed while the host waits), then one gather of the payload
and its metadata into one buffer [rows for other ranks | rows kept here | rows received], one
``all_to_all_single`` of the first part into the last (rows a rank keeps never go through the collective),
and the receiver reads [kept | received] as one block. Combine sends results back the same way into a return
table [kept | returned] and sums each token's cells with one ``embedding_bag``. Hierarchical pays one sync
per leg: leg B's counts depend on what leg A delivered. On CUDA with Triton the plan is two kernels
(``sendplan_triton``) and, when no gradient is needed, the sum one (``minimoe.model.bag_sum_triton``): on an H100
host a Triton launch costs the host about 14-21 µs and a PyTorch op 2-10 µs
(``benchmarks/results/ep_host_pieces_h100.txt``), so a leg's host time is mostly its number of ops.

**Static shapes** (``static=True``, ``token_rank``): every token to every rank, splits [T]·G known in
advance: no count exchange, no host sync, capturable in a CUDA graph; every rank must pass the same T.
``replicate`` moves the same rows with less metadata and no pack, and is what the format rule picks.

``TrafficCounters`` (``minimoe.parallel.counters``) count what crosses to another rank per link class and
direction; for every format their ``bytes`` equal ``minimoe.placement.measure``'s prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minimoe.model.grouped import bag_sum
from minimoe.parallel.comm import CountExchange, all_to_all, alone, anchor, group_rank_size
from minimoe.parallel.counters import TrafficCounters
from minimoe.parallel.routing import local_slots, on_node
from minimoe.parallel.sendplan import entry_ranks, every_rank_units, plan_every_rank, plan_for

WIRE_FORMATS = ("token_expert", "token_rank", "hierarchical", "replicate")


@dataclass
class Leg:
    """One all-to-all exchange: host splits per rank (this rank's own entry = rows it keeps), and per input row
    the (position, mask) ``bags`` of its cells in the return table [kept | returned] (``unit_bags`` for
    units that are pairs)."""

    send_splits: list[int]
    recv_splits: list[int]
    rank: int
    bags: tuple[torch.Tensor, torch.Tensor]
    unit_bags: tuple[torch.Tensor, torch.Tensor]

    @property
    def kept(self) -> int:
        return self.send_splits[self.rank]

    def others(self, splits: list[int]) -> list[int]:
        return [0 if d == self.rank else n for d, n in enumerate(splits)]


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


# ---- the exchange of a leg and its return --------------------------------------------------------------
def _bag_sum(bags, table: torch.Tensor, num_rows: int) -> torch.Tensor:
    """out[i] = Σ_j mask[i, j] · table[position[i, j]]: one fused gather and weighted sum (embedding_bag);
    bags = (position, mask), both (num_rows, b)."""
    position, mask = bags
    if table.shape[0] == 0:  # nothing kept or returned: zeros that still depend on the table (for backward)
        return table.new_zeros(num_rows, table.shape[1]) + table.sum(0)
    return bag_sum(position, table, mask)


def _back(values: torch.Tensor, leg: Leg, group, what: str) -> torch.Tensor:
    """[kept | received] (N, C) -> return table [kept | returned] (n_kept + n_sent, C), by the reverse exchange."""
    table = values.new_empty(sum(leg.send_splits), *values.shape[1:])
    table[:leg.kept] = values[:leg.kept]
    all_to_all(table[leg.kept:], values[leg.kept:], leg.others(leg.recv_splits), leg.others(leg.send_splits),
               group, what)
    return table


def _forth(table: torch.Tensor, leg: Leg, group, what: str) -> torch.Tensor:
    """The adjoint of ``_back``: return table (n_kept + n_sent, C) -> [kept | received] (N, C)."""
    values = table.new_empty(leg.kept + sum(leg.others(leg.recv_splits)), *table.shape[1:])
    values[:leg.kept] = table[:leg.kept]
    all_to_all(values[leg.kept:], table[leg.kept:], leg.others(leg.send_splits), leg.others(leg.recv_splits),
               group, what)
    return values


def _layout(num_entries: int, hidden: int, size: int) -> list[int]:
    """Column widths (of x's dtype, ``size`` bytes) of a packed row [slots int64 | weights float32 | row | pad]:
    every row 16 bytes wide, a multiple, so the slots can be viewed as int64."""
    slots, weights = 8 * num_entries // size, -(-4 * num_entries // size)
    width = -(-(slots + weights + hidden) * size // 16) * 16 // size
    return [slots, weights, hidden, width - slots - weights - hidden]


def _rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """tensor[start:stop] without an op when that is the whole tensor (every op costs the host microseconds)."""
    return tensor if start == 0 and stop == tensor.shape[0] else tensor[start:stop]


def _send(x, weights, slots, units, rows, leg, group, what):
    """The forward of a leg: gather unit ``units[i]``'s entries and row ``rows[i]`` of x into row i of one buffer
    [for other ranks | kept | received] (three gathers or, on CUDA, one ``pack_triton`` kernel; no concatenation),
    send the first part into the last
    (one all-to-all; nothing to send at one rank). Returns [kept | received] rows (N, H), weights (N, m)
    float32 and global slots (N, m) int64, all views of that buffer."""
    num_entries = weights.shape[1]
    widths = _layout(num_entries, x.shape[1], x.element_size())
    sent, received = sum(leg.others(leg.send_splits)), sum(leg.others(leg.recv_splits))
    buffer = x.new_empty(sent + leg.kept + received, sum(widths))
    slot_part, weight_part, row_part, _ = buffer.split(widths, 1)  # views: (N_all, .) each
    slot_part, weight_part = slot_part.view(torch.int64), weight_part.view(torch.float32)
    if weight_part.shape[1] != num_entries:  # float64 rows and an odd number of entries
        weight_part = weight_part[:, :num_entries]
    gathered, total = len(units), buffer.shape[0]
    if x.is_cuda:  # one Triton kernel for the three gathers (imported here: it loads Triton)
        from minimoe.parallel import pack_triton
    if x.is_cuda and pack_triton.usable(x, slots, weights):
        pack_triton.pack(units, rows, slots, weights, x, slot_part, weight_part, row_part)
    else:
        torch.index_select(slots, 0, units, out=_rows(slot_part, 0, gathered))
        torch.index_select(weights, 0, units, out=_rows(weight_part, 0, gathered))
        torch.index_select(x, 0, rows, out=_rows(row_part, 0, gathered))
    if not alone(group):
        all_to_all(buffer[gathered:], buffer[:sent], leg.others(leg.send_splits), leg.others(leg.recv_splits),
                   group, what)
    # [kept | received]
    return _rows(row_part, sent, total), _rows(weight_part, sent, total), _rows(slot_part, sent, total)


class _Dispatch(torch.autograd.Function):
    """``_send`` with its gradient: x (R, H), per-unit weights (U, m) float32, global slots (U, m) int64 ->
    [kept | received] rows (N, H), weights (N, m), slots (N, m). Backward: the results' way back for rows and
    weights, summed per input row / unit with embedding_bag."""

    @staticmethod
    def forward(ctx, x, weights, anchor_, slots, units, rows, leg, group, what):
        ctx.leg, ctx.group, ctx.what, ctx.shapes = leg, group, what, (x.shape[0], weights.shape[0])
        out_rows, out_weights, out_slots = _send(x, weights, slots, units, rows, leg, group, what)
        ctx.mark_non_differentiable(out_slots)
        return out_rows, out_weights, out_slots

    @staticmethod
    def backward(ctx, grad_rows, grad_weights, _grad_slots):
        leg, (num_rows, num_units) = ctx.leg, ctx.shapes
        if alone(ctx.group):
            rows_table, weights_table = grad_rows, grad_weights
        else:
            rows_table = _back(grad_rows.contiguous(), leg, ctx.group, f"{ctx.what} backward (rows)")
            weights_table = _back(grad_weights.contiguous(), leg, ctx.group, f"{ctx.what} backward (weights)")
        grad_x = _bag_sum(leg.bags, rows_table, num_rows)
        grad_w = _bag_sum(leg.unit_bags, weights_table, num_units)
        return grad_x, grad_w, None, None, None, None, None, None, None


class _Return(torch.autograd.Function):
    """Expert results [kept | received] (N, H) -> return table [kept | returned]; backward: the other way."""

    @staticmethod
    def forward(ctx, expert_out, anchor_, leg, group, what):
        ctx.leg, ctx.group, ctx.what = leg, group, what
        return _back(expert_out.contiguous(), leg, group, what)

    @staticmethod
    def backward(ctx, grad_table):
        return _forth(grad_table.contiguous(), ctx.leg, ctx.group, f"{ctx.what} backward"), None, None, None, None


# ---- legs -----------------------------------------------------------------------------------------------
def _leg(x, weights, slots, dest, h: Handle, what: str, num_gpus: int, divisor: int = 1, pairs_of: int = 0):
    """Run one leg: units are rows of x, or (with ``pairs_of`` = k) the k pairs of each row; weights (U, m)
    float32 and global slots (U, m) int64 per unit; unit u goes to rank ``dest[u, j] // divisor`` for each of
    its entries (< 0 = none), or, with ``dest`` None, every row to each of the ``num_gpus`` ranks.
    Returns [kept | received] rows (N, H), weights (N, m) float32, global slots (N, m) int64."""
    static, rank = dest is None, h.rank
    if static:  # every row to every rank: sizes known, no exchange of counts
        leg_plan, send = plan_every_rank(x.shape[0], num_gpus, x.device), [x.shape[0]] * num_gpus
        pending, recv = None, send
    else:
        leg_plan = plan_for(dest, divisor, num_gpus, rank, pairs_of)
        pending = CountExchange(leg_plan.counts, h.group, f"{what} count exchange")
    bags = leg_plan.bags(one_destination=pairs_of > 0)
    if pending is not None:
        send, recv = pending.wait()  # the leg's host sync
    units = every_rank_units(x.shape[0], num_gpus, x.device) if static else \
        leg_plan.send_units(send[rank], sum(send))
    rows = leg_plan.rows_of(units, pairs_of) if pairs_of else units
    per_row = pairs_of if pairs_of else num_gpus  # cells summed into one input row
    row_bags = bags if bags[0].shape == (x.shape[0], per_row) else \
        (bags[0].reshape(x.shape[0], per_row), bags[1].reshape(x.shape[0], per_row))
    leg = Leg(send, recv, rank, row_bags, bags)
    h.legs.append(leg)
    if h.counters is not None:
        h.counters.add("dispatch", send, x.shape[1] * x.element_size(), rank, h.gpus_per_node, 12 * slots.shape[1])
    if not h.requires_grad:  # no graph to record: skip the autograd node
        return _send(x, weights, slots, units, rows, leg, h.group, what)
    return _Dispatch.apply(x, weights, anchor(True), slots, units, rows, leg, h.group, what)


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
        rows, w, s = _leg(x, weights.reshape(-1, 1), pairs, pairs, h, "dispatch", num_gpus, spg,
                          pairs_of=slots.shape[1])
    elif wire_format == "token_rank" or num_gpus == gpn:  # hierarchical on one node: no leg A, only leg B
        rows, w, s = _leg(x, weights, slots, None if static else slots, h, "dispatch", num_gpus, spg)
    else:
        rows_a, w_a, s_a = _leg(x, weights, slots, entry_ranks(slots, spg, gpn, rank), h,
                                "dispatch leg A (inter-node)", num_gpus)
        node = rank // gpn
        slots_b = torch.cat([on_node(slots, layout, node), on_node(s_a, layout, node)])
        x_b, w_b = torch.cat([x, rows_a]), torch.cat([weights, w_a])
        rows, w, s = _leg(x_b, w_b, slots_b, slots_b, h, "dispatch leg B (intra-node)", num_gpus, spg)
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
        return _return(expert_out, h.legs[0], h, "combine", h.num_tokens)
    leg_a, leg_b = h.legs
    partial = _return(expert_out, leg_b, h, "combine leg B (intra-node)", h.num_tokens + sum(leg_a.recv_splits))
    return partial[:h.num_tokens] + _return(partial[h.num_tokens:], leg_a, h, "combine leg A (inter-node)",
                                            h.num_tokens)


def _return(expert_out: torch.Tensor, leg: Leg, h: Handle, what: str, num_rows: int) -> torch.Tensor:
    """The reverse exchange of one leg, then each input row sums its cells of the return table."""
    if h.counters is not None:
        h.counters.add("combine", leg.recv_splits, expert_out.shape[1] * expert_out.element_size(), h.rank,
                       h.gpus_per_node)
    if alone(h.group):
        table = expert_out
    elif not h.requires_grad:
        table = _back(expert_out.contiguous(), leg, h.group, what)
    else:
        table = _Return.apply(expert_out, anchor(True), leg, h.group, what)
    return _bag_sum(leg.bags, table, num_rows)
