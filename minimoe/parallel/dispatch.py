"""Dispatch and combine: token rows to the ranks holding their experts and back, in three wire formats.

Rank r holds T tokens x (T, H), each routed to k physical slots (``RouteTable.route``; -1 = none or
dropped) with weights w (T, k). Slot s lives on rank s // slots_per_gpu, node rank // gpus_per_node.
A **leg** is one exchange: pick rows of an input, sorted by destination rank; exchange the per-rank
counts (one all-to-all of G integers, the leg's only host sync); exchange the rows and their routing
metadata (``Exchange``). Every row carries m (slot, weight) entries; the receiver computes
y_n = Σ_j w_nj · E_{s_nj}(x_n) over its valid entries (``minimoe.parallel.experts``), and **combine** runs
the legs backwards, each input row summing the rows that came back for it, so the source ends with
y_t = Σ_j w_tj · E_j(x_t). The sum is a gather and a reduction, not a scatter-add: dispatch remembers
where each (destination, row) pair sits in the send order (a zero row stands for "not sent"), which
avoids atomic additions (slow in bfloat16) and makes the result deterministic.

The three formats differ in what a row is (Megatron-LM's and torchtitan's token dispatchers; DeepEP,
DeepSeek-AI 2025):

* ``token_expert`` — one row per (token, expert) pair, m = 1 (low-latency kernels, Megatron, torchtitan):
  a token with two experts on one rank travels twice.
* ``token_rank`` — one row per (token, destination rank), m = k, the entries of other ranks set to -1
  (DeepEP normal kernels, de-duplicated per rank).
* ``hierarchical`` — leg A sends one row per (token, remote *node*) to the rank with the token's local
  index on that node (the *entry* rank), carrying the global slots of that node; leg B is ``token_rank``
  inside each node over the rows [own tokens; rows received in leg A]. Combine reduces at the entry rank
  before the one return trip over the node boundary. ``gpus_per_node`` comes from the placement, so
  "nodes" may be groups of ranks on one host.

**Static shapes** (``static=True``, ``token_rank`` only, for decode): every rank sends each of its T tokens
to every rank (entries of other ranks -1), so the splits are [T]·G on all ranks — no count exchange, no
host sync, and dispatch + combine can be captured in a CUDA graph (DeepEP's low-latency kernels also use
fixed-size buffers). It moves G·T rows per rank whatever the routing: no more than ``token_rank`` when
almost every token reaches every rank (top-8 over 2 ranks), more otherwise. Every rank must pass the same T.

Rows a rank sends itself go through the all-to-all as a local copy; ``TrafficCounters`` counts what
crosses to another rank, per link class (intra-node, inter-node) and direction: the hidden-state
payload in ``bytes`` (what ``minimoe.placement.measure`` counts), the routing metadata separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minimoe.parallel.comm import all_reduce_sum, exchange, exchange_counts, group_rank_size

WIRE_FORMATS = ("token_expert", "token_rank", "hierarchical")
DIRECTIONS, LINKS = ("dispatch", "combine"), ("intra", "inter")


@dataclass
class TrafficCounters:
    """What this rank sent to *other* ranks: ``bytes[(direction, link)]``, ``rows[(direction, link)]``,
    ``meta_bytes`` (routing metadata, 8 bytes per entry) and ``local_rows[direction]`` (rows kept local)."""

    bytes: dict = field(default_factory=lambda: {(d, link): 0 for d in DIRECTIONS for link in LINKS})
    rows: dict = field(default_factory=lambda: {(d, link): 0 for d in DIRECTIONS for link in LINKS})
    local_rows: dict = field(default_factory=lambda: {d: 0 for d in DIRECTIONS})
    meta_bytes: int = 0

    def add(self, direction: str, splits: list[int], row_bytes: int, rank: int, gpus_per_node: int,
            meta_bytes_per_row: int = 0) -> None:
        for dest, count in enumerate(splits):
            if dest == rank:
                self.local_rows[direction] += count
                continue
            link = "intra" if dest // gpus_per_node == rank // gpus_per_node else "inter"
            self.rows[(direction, link)] += count
            self.bytes[(direction, link)] += count * row_bytes
            self.meta_bytes += count * meta_bytes_per_row

    def merge(self, other: "TrafficCounters") -> "TrafficCounters":
        """Add ``other``'s counts to these (e.g. the layers of a model); returns self."""
        for key in self.bytes:
            self.bytes[key] += other.bytes[key]
            self.rows[key] += other.rows[key]
        for key in self.local_rows:
            self.local_rows[key] += other.local_rows[key]
        self.meta_bytes += other.meta_bytes
        return self

    def link_bytes(self, link: str) -> int:
        """Dispatch + combine bytes over one link class."""
        return self.bytes[("dispatch", link)] + self.bytes[("combine", link)]

    def summed(self, group=None) -> "TrafficCounters":
        """The counters of all ranks added up (a collective)."""
        keys = [(d, link) for d in DIRECTIONS for link in LINKS]
        values = [self.bytes[k] for k in keys] + [self.rows[k] for k in keys] \
            + [self.local_rows[d] for d in DIRECTIONS] + [self.meta_bytes]
        device = "cuda" if dist.is_initialized() and dist.get_backend(group) == "nccl" else "cpu"
        total = all_reduce_sum(torch.tensor(values, dtype=torch.int64, device=device), group, "counter sum").tolist()
        out = TrafficCounters()
        out.bytes = dict(zip(keys, total[:4]))
        out.rows = dict(zip(keys, total[4:8]))
        out.local_rows = dict(zip(DIRECTIONS, total[8:10]))
        out.meta_bytes = total[10]
        return out

    def as_dict(self) -> dict:
        out = {f"{d}_{link}_bytes": v for (d, link), v in self.bytes.items()}
        out.update({f"{d}_{link}_rows": v for (d, link), v in self.rows.items()})
        out.update({f"{d}_local_rows": v for d, v in self.local_rows.items()}, meta_bytes=self.meta_bytes)
        return out


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
    counters: TrafficCounters | None
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
             group=None, counters: TrafficCounters | None = None, requires_grad: bool | None = None,
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
