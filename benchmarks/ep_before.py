"""The expert-parallel dispatch + combine as it was before the sync-free rewrite, kept for before/after timing.

A frozen copy (commit 9b7f343) of minimoe.parallel.comm's packed all-to-all and minimoe.parallel.dispatch:
per leg, an all-to-all of the counts and one blocking host read of the split sizes, an argsort send list, the
rows and their metadata packed into a strided byte buffer, the reverse exchange into a padded buffer and a
(G, T, H) gather + sum. Only the benchmarks import it; dispatch/combine here take the same arguments as
the package's (formats token_expert, token_rank, hierarchical; static for token_rank).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from minimoe.parallel.comm import group_rank_size

WIRE_FORMATS = ("token_expert", "token_rank", "hierarchical")

# ---- plain collectives (no autograd) --------------------------------------------------------------------
def all_to_all(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
               what: str = "all-to-all", pad_rows: int = 0) -> torch.Tensor:
    """Rows (sum(send_splits), ...) -> (sum(recv_splits) + pad_rows, ...): chunk d of ``rows`` goes to rank d;
    ``pad_rows`` zero rows follow the received ones (a row that gathers can point at for "nothing").

    With one rank (or no process group) the rows stay where they are. Raises RuntimeError naming ``what`` when
    a peer fails or times out.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return torch.cat([rows, rows.new_zeros(pad_rows, *rows.shape[1:])]) if pad_rows else rows
    received = sum(recv_splits)
    out = rows.new_empty((received + pad_rows, *rows.shape[1:]))
    if pad_rows:
        out[received:].zero_()
    dist.all_to_all_single(out[:received], rows.contiguous(), recv_splits, send_splits, group=group)
    return out


def exchange_counts(send_counts: torch.Tensor, group=None) -> tuple[list[int], list[int]]:
    """Tell every rank how many rows it will get: (G,) counts -> (send_splits, recv_splits) as host lists.

    One all-to-all of G integers, then one copy to the host (the only host sync of a leg: the row exchange
    needs its sizes on the host).
    """
    send_counts = send_counts.to(torch.int64)
    recv_counts = all_to_all(send_counts, [1] * len(send_counts), [1] * len(send_counts), group, "count exchange")
    both = torch.cat([send_counts, recv_counts]).tolist()
    return both[:len(send_counts)], both[len(send_counts):]


# ---- the differentiable exchange ------------------------------------------------------------------------
def _layout(specs: list[tuple[torch.dtype, int]]) -> tuple[list[int], int]:
    """Byte offset of each (dtype, columns) part in a packed row (8-byte aligned) and the row width (16-aligned)."""
    offsets, width = [], 0
    for dtype, columns in specs:
        width = -(-width // 8) * 8
        offsets.append(width)
        width += columns * torch.empty((), dtype=dtype).element_size()
    return offsets, -(-width // 16) * 16


def packed_all_to_all(parts: list[tuple[torch.Tensor, torch.Tensor | None]], send_splits, recv_splits, group=None,
                      what: str = "all-to-all") -> list[torch.Tensor]:
    """Exchange several row-aligned tensors in ONE all-to-all: each row of a byte buffer holds row n of every part.

    parts: (tensor (R, c), index (N,) or None): row n of the part is ``tensor[index[n]]`` (gathered straight
    into the buffer) or ``tensor[n]``. Returns one (N', c) view per part into the received buffer.
    """
    specs = [(t.dtype, t.shape[1]) for t, _ in parts]
    offsets, width = _layout(specs)
    first, index = parts[0]
    rows = first.shape[0] if index is None else index.shape[0]
    buffer = torch.empty(rows, width, dtype=torch.uint8, device=first.device)
    size = [torch.empty((), dtype=d).element_size() for d, _ in specs]
    for (tensor, index), offset, (dtype, columns), nbytes in zip(parts, offsets, specs, size):
        view = buffer[:, offset:offset + columns * nbytes].view(dtype)  # (N, c), strided
        if index is None:
            view.copy_(tensor)
        else:
            torch.index_select(tensor, 0, index, out=view)
    out = all_to_all(buffer, send_splits, recv_splits, group, what)
    return [out[:, o:o + c * b].view(d) for o, (d, c), b in zip(offsets, specs, size)]


class Exchange(torch.autograd.Function):
    """One leg of dispatch or combine: rows of x, and optionally their routing metadata, to other ranks.

    forward(x (R, H), src_row (N,) int64 or None, weights (N, m) float32 or None, slots (N, m) int or None,
    send_splits, recv_splits, group, what, anchor, pad_rows) -> (x[src_row] exchanged: (N', H), plus
    ``pad_rows`` zero rows when there is no metadata; weights (N', m) float32 or None; slots (N', m) int64 or
    None). With metadata, the gather writes into one packed buffer and a single all-to-all moves everything.
    backward: the same exchange with the splits swapped, for the rows' gradient and then the weights' (two
    all-to-alls in that order, on every rank), and the gather's adjoint (index_add into x's rows).
    """

    @staticmethod
    def forward(ctx, x, src_row, weights, slots, send_splits, recv_splits, group, what, anchor, pad_rows=0):
        ctx.splits, ctx.group, ctx.what, ctx.pad_rows = (send_splits, recv_splits), group, what, pad_rows
        ctx.has_weights, ctx.num_rows = weights is not None, x.shape[0]
        ctx.save_for_backward(src_row)
        if weights is None:
            rows = x if src_row is None else x.index_select(0, src_row)
            return all_to_all(rows, send_splits, recv_splits, group, f"{what} (rows)", pad_rows), None, None
        out_rows, out_weights, out_slots = packed_all_to_all(
            [(x, src_row), (weights.float(), None), (slots.to(torch.int32), None)], send_splits, recv_splits,
            group, what)
        out_slots = out_slots.to(torch.int64)
        ctx.mark_non_differentiable(out_slots)
        return out_rows, out_weights, out_slots

    @staticmethod
    def backward(ctx, grad_rows, grad_weights, _grad_slots):
        send, recv = ctx.splits
        (src_row,) = ctx.saved_tensors
        grad_rows = grad_rows[:grad_rows.shape[0] - ctx.pad_rows]  # the zero rows were no one's
        grad_x = all_to_all(grad_rows.contiguous(), recv, send, ctx.group, f"{ctx.what} backward (rows)")
        if src_row is not None:
            grad_x = grad_x.new_zeros(ctx.num_rows, grad_x.shape[1]).index_add_(0, src_row, grad_x)
        grad_w = None
        if ctx.has_weights:
            grad_w = all_to_all(grad_weights.contiguous(), recv, send, ctx.group, f"{ctx.what} backward (weights)")
        return grad_x, None, grad_w, None, None, None, None, None, None, None


def exchange(x, send_splits, recv_splits, group=None, src_row=None, weights=None, slots=None, requires_grad=False,
             what="exchange", pad_rows: int = 0):
    """Differentiable all-to-all of ``x[src_row]`` (all of x when src_row is None) and routing metadata; see
    :class:`Exchange`. ``requires_grad`` must be the same on every rank: True ties the outputs to the autograd
    graph even where the local inputs need no gradient, so every rank runs the reverse exchange in backward.
    """
    anchor = torch.zeros((), requires_grad=True) if requires_grad else None
    if weights is not None and (slots is None or weights.shape != slots.shape):
        raise ValueError(f"weights and slots must have the same shape (N, m), got {tuple(weights.shape)} and "
                         f"{None if slots is None else tuple(slots.shape)}")
    return Exchange.apply(x, src_row, weights, slots, send_splits, recv_splits, group, what, anchor, pad_rows)

@dataclass
class Leg:
    """One exchange: ``src_row`` (N,) rows of the leg's input in send order, the host split lists, the input's
    row count, and ``position`` (A, B) int64: where each (destination, input row) pair landed in the send order
    (N = nowhere), summed over dimension ``sum_dim`` to return one row per input row."""

    src_row: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_rows: int
    position: torch.Tensor | None = None
    sum_dim: int = 0


@dataclass
class Handle:
    """What combine needs to undo a dispatch (DeepEP calls it the handle)."""

    wire_format: str
    legs: list[Leg]
    num_tokens: int
    group: object
    requires_grad: bool
    rank: int
    gpus_per_node: int
    counters: object
    static: bool = False


@dataclass
class Dispatched:
    """Rows received by this rank: ``rows`` (N, H), ``slots`` (N, m) int64 local slot ids (-1 = not for this
    rank), ``weights`` (N, m) float32, and the ``handle`` for :func:`combine`."""

    rows: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    handle: Handle


# ---- send lists: which input rows go to which rank, sorted by destination -------------------------------
# Each builder returns (src_row (P,), counts (G,), meta (P, m), order (P,), grid): the first N = Σ counts
# entries are the rows to send, in destination order; ``order`` maps send position -> cell of the
# (destination, input row) grid of shape ``grid`` whose cells are the candidate (row, destination) pairs.
def _by_destination(hit: torch.Tensor):
    """hit (R, D) bool -> order (D·R,) of the grid cells (d, r), True cells first, sorted by d then r."""
    return torch.argsort((~hit).T.reshape(-1).to(torch.uint8), stable=True)


def per_pair(slots, num_gpus, slots_per_gpu):
    """``token_expert``: one row per valid (token, expert) pair; grid (R, k), meta = local slot (P, 1)."""
    k = slots.shape[1]
    dest = torch.where(slots >= 0, slots // slots_per_gpu, num_gpus).reshape(-1)  # (R·k,), none -> G
    order = torch.argsort(dest, stable=True)
    counts = torch.bincount(dest, minlength=num_gpus + 1)[:num_gpus]
    return order // k, counts, (slots.reshape(-1)[order] % slots_per_gpu).unsqueeze(1), order, (slots.shape[0], k)


def per_rank(slots, num_gpus, slots_per_gpu):
    """``token_rank``: one row per (token, destination rank); grid (G, R), meta = local slots there, else -1."""
    rows = slots.shape[0]
    dest = torch.where(slots >= 0, slots // slots_per_gpu, num_gpus)  # (R, m)
    hit = torch.zeros(rows, num_gpus + 1, dtype=torch.bool, device=slots.device).scatter_(1, dest, True)[:, :-1]
    order = _by_destination(hit)
    src_row, dest_row = order % rows, order // rows
    meta = torch.where(dest[src_row] == dest_row.unsqueeze(1), slots[src_row] % slots_per_gpu, -1)
    return src_row, hit.sum(0), meta, order, (num_gpus, rows)


def every_rank(slots, num_gpus, slots_per_gpu):
    """``static`` send list: every row to every rank; meta = local slots on that rank, else -1."""
    rows = slots.shape[0]
    src_row = torch.arange(rows, device=slots.device).repeat(num_gpus)  # (G·R,)
    dest_row = torch.arange(num_gpus, device=slots.device).repeat_interleave(rows)
    dest = torch.where(slots >= 0, slots // slots_per_gpu, -1)
    meta = torch.where(dest[src_row] == dest_row.unsqueeze(1), slots[src_row] % slots_per_gpu, -1)
    return src_row, meta


def per_node(slots, num_gpus, slots_per_gpu, gpus_per_node, rank):
    """``hierarchical`` leg A: one row per (token, remote node) to the entry rank; grid (nodes, R);
    meta = global slots on that node, else -1."""
    rows, num_nodes = slots.shape[0], num_gpus // gpus_per_node
    node = torch.where(slots >= 0, slots // slots_per_gpu // gpus_per_node, num_nodes)  # (R, m)
    remote = torch.where(node == rank // gpus_per_node, num_nodes, node)
    hit = torch.zeros(rows, num_nodes + 1, dtype=torch.bool, device=slots.device).scatter_(1, remote, True)[:, :-1]
    order = _by_destination(hit)
    src_row, node_row = order % rows, order // rows
    entry = torch.arange(num_nodes, device=slots.device) * gpus_per_node + rank % gpus_per_node
    counts = torch.zeros(num_gpus, dtype=torch.int64, device=slots.device).index_add_(0, entry, hit.sum(0))
    meta = torch.where(node[src_row] == node_row.unsqueeze(1), slots[src_row], -1)
    return src_row, counts, meta, order, (num_nodes, rows)


# ---- legs ----------------------------------------------------------------------------------------------
def _send(rows, weights, send_list, h: Handle, what: str, pairs: bool = False, splits=None):
    src_row, counts, meta, order, grid = send_list
    send, recv = exchange_counts(counts, h.group) if splits is None else (splits, splits)
    n = sum(send)
    src_row, meta = src_row[:n], meta[:n]
    sent_weights = weights.reshape(-1)[order[:n]].unsqueeze(1) if pairs else weights[src_row]
    recv_rows, recv_weights, recv_slots = exchange(rows, send, recv, h.group, src_row=src_row, weights=sent_weights,
                                                   slots=meta, requires_grad=h.requires_grad, what=what)
    if h.counters is not None:
        h.counters.add("dispatch", send, rows.shape[1] * rows.element_size(), h.rank, h.gpus_per_node,
                       8 * meta.shape[1])
    position = None
    if order is not None:  # inverse permutation: send position of every grid cell; cells not sent -> n
        cell = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        position = cell.clamp_max(n).view(grid)
    h.legs.append(Leg(src_row, send, recv, rows.shape[0], position, 1 if pairs else 0))
    return recv_rows, recv_weights, recv_slots


def _return(out_rows: torch.Tensor, leg: Leg, h: Handle, what: str) -> torch.Tensor:
    """Send the rows back and add up, per input row, the rows that came back (a gather and a sum: no atomics)."""
    back = exchange(out_rows, leg.recv_splits, leg.send_splits, h.group, requires_grad=h.requires_grad, what=what,
                    pad_rows=0 if h.static else 1)[0]  # (N [+ 1 zero row], H) in send order
    if h.counters is not None:
        h.counters.add("combine", leg.recv_splits, out_rows.shape[1] * out_rows.element_size(), h.rank,
                       h.gpus_per_node)
    hidden = back.shape[1]
    if h.static:  # row t of every chunk is token t
        return back.view(-1, leg.num_rows, hidden).sum(0)
    gathered = back.index_select(0, leg.position.reshape(-1)).view(*leg.position.shape, hidden)
    return gathered.sum(leg.sum_dim)


def dispatch(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, layout, wire_format: str = "token_rank",
             group=None, counters=None, requires_grad: bool | None = None,
             static: bool = False) -> Dispatched:
    """Send this rank's token rows to the ranks holding their slots (a collective: every rank calls it).

    x (T, H) float on the backend's device; slots (T, k) int64 global slot ids (-1 = none); weights (T, k)
    float32; ``layout``: the ``Placement`` or ``RouteTable`` (for slots_per_gpu, gpus_per_node, num_gpus);
    ``requires_grad`` (default: whether x or weights need a gradient) must agree on all ranks; ``static``:
    fixed shapes, no host sync (``token_rank`` only; every rank must pass the same T).
    Raises ValueError on bad shapes, an unknown ``wire_format`` or a group that is not the placement's size.
    """
    if wire_format not in WIRE_FORMATS:
        raise ValueError(f"wire_format must be one of {WIRE_FORMATS}, got {wire_format!r}")
    if x.dim() != 2 or slots.shape != weights.shape or slots.dim() != 2 or slots.shape[0] != x.shape[0]:
        raise ValueError(f"dispatch needs x (T, H), slots (T, k) and weights (T, k); got {tuple(x.shape)}, "
                         f"{tuple(slots.shape)}, {tuple(weights.shape)}")
    rank, size = group_rank_size(group)
    num_gpus, spg, gpn = layout.num_gpus, layout.slots_per_gpu, layout.gpus_per_node
    if size != num_gpus:
        raise ValueError(f"the placement is for {num_gpus} GPUs but the process group has {size} ranks")
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad)
    if static and wire_format != "token_rank":
        raise ValueError(f"static=True needs wire_format='token_rank', got {wire_format!r}")
    h = Handle(wire_format, [], x.shape[0], group, bool(requires_grad), rank, gpn, counters, static)
    weights = weights.float()
    if static:
        src_row, meta = every_rank(slots, num_gpus, spg)
        rows, w, s = _send(x, weights, (src_row, None, meta, None, None), h, "dispatch",
                           splits=[x.shape[0]] * num_gpus)
    elif wire_format == "token_expert":
        rows, w, s = _send(x, weights, per_pair(slots, num_gpus, spg), h, "dispatch", pairs=True)
    elif wire_format == "token_rank":
        rows, w, s = _send(x, weights, per_rank(slots, num_gpus, spg), h, "dispatch")
    else:
        rows_a, w_a, s_a = _send(x, weights, per_node(slots, num_gpus, spg, gpn, rank), h,
                                 "dispatch leg A (inter-node)")
        here = torch.where(slots >= 0, slots // spg // gpn, -1) == rank // gpn
        slots_b = torch.cat([torch.where(here, slots, -1), s_a])  # (T + N_A, k) global slots on this node
        inputs = torch.cat([x, rows_a]), torch.cat([weights, w_a])
        rows, w, s = _send(*inputs, per_rank(slots_b, num_gpus, spg), h, "dispatch leg B (intra-node)")
    return Dispatched(rows, s, w, h)


def combine(expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
    """Return each received row's expert output to its source and sum per token: (N, H) -> (T, H).

    ``expert_out`` row n must be Σ_j w_nj E_{s_nj}(rows_n) for the rows of the matching :func:`dispatch`.
    A collective, like dispatch.
    """
    h = handle
    if h.wire_format != "hierarchical":
        return _return(expert_out, h.legs[0], h, "combine")
    leg_a, leg_b = h.legs
    partial = _return(expert_out, leg_b, h, "combine leg B (intra-node)")  # (T + N_A, H)
    return partial[:h.num_tokens] + _return(partial[h.num_tokens:], leg_a, h, "combine leg A (inter-node)")
