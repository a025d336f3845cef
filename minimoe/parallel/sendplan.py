"""Send plans on the device: which rows go to which rank and where each one's result comes back, no host sync.

A leg of dispatch moves *units* (a token row, or one (token, expert) pair) to ranks. Its plan starts from a
boolean grid ``hit`` (U, G): unit u goes to rank d. Reorder the columns so that this rank's own column comes
first, then the others in rank order (``rank_first``); everything else follows from one cumulative sum over
the grid read column by column:

    counts[d]          = Σ_u hit[u, d]                                  rows for rank d (this rank included)
    position[u, c]     = (number of hit cells before (u, c), column-major) = cumsum - 1
    send list          = the hit cells in that same order (``nonzero_static`` with the now-known size)

That order is the layout of the **return table** [rows this rank keeps | rows it sent to rank 0, 1, ...
(itself skipped)], so combine finds the result for (unit u, rank c) at ``table[position[u, c]]`` and sums a
unit's results with one ``embedding_bag`` (a fused gather and weighted sum; the weight is the hit mask, 0 for
cells not sent): no sort, no bincount, no inverse permutation, no scatter-add. The rows a rank keeps never go
through the collective; the send buffer holds only the rows for other ranks, in rank order.

The grids of the three all-to-all formats (slots are global slot ids, -1 = none; slot s lives on rank
s // slots_per_gpu):

* ``hit_per_pair``  (T·k, G): one unit per (token, expert) pair, to the rank of its slot (``token_expert``).
* ``hit_per_rank``  (T, G): one unit per (token, destination rank) (``token_rank``).
* ``hit_per_node``  (T, G): one unit per (token, remote node), to the rank with the same local index on that
  node, its *entry* rank (leg A of ``hierarchical``).

``plan_for`` is what a leg of dispatch calls (``minimoe.parallel.legs``): these ops on the CPU, and on CUDA with Triton the same plan from two
kernels (``minimoe.parallel.sendplan_triton``, tested equal), since a dozen small ops cost the host more than
the GPU spends on them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=64)
def rank_first(num_gpus: int, rank: int, device: str) -> torch.Tensor:
    """(G,) int64 column order [rank, 0, 1, ..., rank-1, rank+1, ...], built once per (G, rank, device)."""
    ranks = torch.arange(num_gpus, device=device)
    return torch.cat([ranks[rank:rank + 1], ranks[:rank], ranks[rank + 1:]])


def _grid(dest: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """dest (U, m) int64 destination ranks, -1 = none -> (U, G) bool: does unit u go to rank d."""
    hit = torch.zeros(dest.shape[0], num_gpus + 1, dtype=torch.bool, device=dest.device)
    return hit.scatter_(1, dest.remainder(num_gpus + 1), True)[:, :num_gpus]  # -1 lands in the dropped column G


def hit_per_rank(slots: torch.Tensor, num_gpus: int, slots_per_gpu: int) -> torch.Tensor:
    """slots (T, k) -> (T, G) bool: the ranks holding each token's valid slots."""
    return _grid(slots.div(slots_per_gpu, rounding_mode="floor"), num_gpus)


def hit_per_pair(slots: torch.Tensor, num_gpus: int, slots_per_gpu: int) -> torch.Tensor:
    """slots (T, k) -> (T·k, G) bool: unit p = (token p // k, expert p % k) goes to the rank of its slot."""
    return _grid(slots.reshape(-1, 1).div(slots_per_gpu, rounding_mode="floor"), num_gpus)


def entry_ranks(slots: torch.Tensor, slots_per_gpu: int, gpus_per_node: int, rank: int) -> torch.Tensor:
    """slots (T, k) -> (T, k) int64: the entry rank (node · gpus_per_node + rank % gpus_per_node) of the node of
    each valid slot on another node, -1 for slots on this rank's node and for none."""
    node = slots.div(slots_per_gpu * gpus_per_node, rounding_mode="floor")  # (T, k), -1 = none
    remote = (node >= 0) & (node != rank // gpus_per_node)
    return torch.where(remote, node * gpus_per_node + rank % gpus_per_node, -1)


def hit_per_node(slots: torch.Tensor, num_gpus: int, slots_per_gpu: int, gpus_per_node: int,
                 rank: int) -> torch.Tensor:
    """slots (T, k) -> (T, G) bool: the entry rank of every *other* node holding one of the token's valid slots."""
    return _grid(entry_ranks(slots, slots_per_gpu, gpus_per_node, rank), num_gpus)


@dataclass
class Plan:
    """A leg's plan. ``counts`` (G,) int64 rows per destination (device); ``mask`` (U, G) bool the grid with this
    rank's column first; ``position`` (U, G) int64 row of each cell in the return table (0 where not hit)."""

    counts: torch.Tensor
    mask: torch.Tensor
    position: torch.Tensor
    columns: torch.Tensor | None = None  # (G·U,) the mask read column by column, contiguous
    send_list: torch.Tensor | None = None  # (>= n_total,) the send list, already built (``sendplan_triton``)
    one_bags: tuple | None = None  # ((U, 1) position, (U, 1) mask): ``bags(one_destination=True)``, already built
    send_rows: torch.Tensor | None = None  # (>= n_total,) the send list's units // k, already built

    def send_units(self, n_self: int, n_total: int) -> torch.Tensor:
        """(n_total,) the unit of each row to gather, in the order [rows for other ranks | rows kept here]
        (one gather fills the send buffer and, right after it, the rows this rank keeps)."""
        if self.send_list is not None:
            return self.send_list[:n_total]
        by_column = self.mask.T if self.columns is None else self.columns.view(self.mask.shape[1], self.mask.shape[0])
        cells = torch.nonzero_static(by_column, size=n_total)  # (n, 2) [column, unit], table order
        units = cells[:, 1]
        return units if n_self in (0, n_total) else torch.cat([units[n_self:], units[:n_self]])

    def bags(self, one_destination: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(position, mask) per unit, (U, G); with ``one_destination`` (a pair goes to one rank at most) summed
        over the ranks to (U, 1)."""
        if not one_destination:
            return self.position, self.mask
        if self.one_bags is not None:
            return self.one_bags
        return (self.position * self.mask).sum(1, keepdim=True), self.mask.any(1, keepdim=True)

    def rows_of(self, units: torch.Tensor, pairs_of: int) -> torch.Tensor:
        """The input row of each unit of the send list ``units`` when the units are the ``pairs_of`` pairs of
        each row: units // pairs_of."""
        if self.send_rows is not None:
            return self.send_rows[:units.shape[0]]
        return units.div(pairs_of, rounding_mode="floor")


def plan(hit: torch.Tensor, rank: int) -> Plan:
    """The plan of a (U, G) grid for ``rank`` (see the module docstring)."""
    num_units, num_gpus = hit.shape
    mask = hit if rank == 0 else hit.index_select(1, rank_first(num_gpus, rank, str(hit.device)))  # own column first
    columns = mask.T.reshape(-1)  # (G·U,) column-major
    index = columns.cumsum(0) - 1  # place of each cell among the hit cells
    return Plan(hit.sum(0), mask, index.view(num_gpus, num_units).T.clamp_min(0), columns)


def plan_for(dest: torch.Tensor, divisor: int, num_gpus: int, rank: int, pairs_of: int = 0) -> Plan:
    """The plan of a leg whose unit u reaches rank ``dest[u, j] // divisor`` for each entry j (< 0 = none):
    dest (U, m) integer; ``pairs_of`` = k > 0: the units are the k pairs of each row (m = 1). On CUDA with
    Triton two kernels build it (``sendplan_triton``; with ``pairs_of`` also the one-destination bags and the
    rows to send), elsewhere the ops above."""
    if dest.is_cuda:  # imported only here: it loads Triton
        from minimoe.parallel import sendplan_triton

        if sendplan_triton.usable(dest, num_gpus):
            counts, mask, position, send, extra = sendplan_triton.plan_triton(dest, divisor, num_gpus, rank,
                                                                              pairs_of)
            one_bags, send_rows = extra if extra is not None else (None, None)
            return Plan(counts, mask, position, send_list=send, one_bags=one_bags, send_rows=send_rows)
    return plan(_grid(dest.div(divisor, rounding_mode="floor"), num_gpus), rank)


def plan_every_rank(num_units: int, num_gpus: int, device) -> Plan:
    """Every unit to every rank (fixed shapes, no count exchange): all cells hit, built without a cumsum; its
    send list is ``every_rank_units``."""
    mask = torch.ones(num_units, num_gpus, dtype=torch.bool, device=device)
    position = torch.arange(num_gpus * num_units, device=device).view(num_gpus, num_units).T
    return Plan(torch.full((num_gpus,), num_units, device=device), mask, position)


def every_rank_units(num_units: int, num_gpus: int, device) -> torch.Tensor:
    """The send list of ``plan_every_rank``: every chunk is all units in order, (G·U,)."""
    return torch.arange(num_units, device=device).repeat(num_gpus)
