"""One all-to-all leg of dispatch, and its way back in combine (the ``token_expert``, ``token_rank`` and
``hierarchical`` formats of ``minimoe.parallel.dispatch``).

A leg follows its send plan (``minimoe.parallel.sendplan``): the grid of
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

A leg's units are rows of x, or (``token_expert``) the k (token, expert) pairs of each row. :func:`run_leg`
sends them and records a :class:`Leg` in the dispatch's handle; :func:`return_leg` brings the expert results back
and sums each input row's cells. Both are autograd-aware: the gradient of the exchange is the reverse exchange
(``_Dispatch``, ``_Return``), and a rank whose inputs need no gradient still takes part through an ``anchor``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minimoe.model.grouped import bag_sum
from minimoe.parallel.comm import CountExchange, all_to_all, alone, anchor
from minimoe.parallel.sendplan import every_rank_units, plan_every_rank, plan_for


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


# ---- a leg, and its way back -----------------------------------------------------------------------------
def run_leg(x, weights, slots, dest, h, what: str, num_gpus: int, divisor: int = 1, pairs_of: int = 0):
    """Run one leg for the dispatch whose ``Handle`` is ``h`` (it records the leg there): units are rows of x, or
    (with ``pairs_of`` = k) the k pairs of each row; weights (U, m)
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


def return_leg(expert_out: torch.Tensor, leg: Leg, h, what: str, num_rows: int) -> torch.Tensor:
    """The reverse exchange of one leg of the dispatch whose ``Handle`` is ``h``, then each input row sums its cells
    of the return table: (N, H) expert results -> (num_rows, H)."""
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
