"""What the exchanges of expert parallelism put on the wire, per link class and direction.

Every wire format of ``minimoe.parallel.dispatch`` adds, per leg, the rows it sends to each destination rank
(``TrafficCounters.add``). Rows a rank keeps for itself never cross a link and count as ``local_rows``; the
others count as ``intra`` (same node: rank // gpus_per_node) or ``inter`` (another node). ``bytes`` is the
hidden-state payload, what ``minimoe.placement.measure`` predicts for the same tokens and placement;
routing metadata (12 bytes per carried entry: an int64 slot id and a float32 weight) is ``meta_bytes``;
rows that only pad a block to a common size (the replicate format, when ranks bring different token counts)
are ``padding_bytes``: in dispatch each padding row with its k entries of metadata, in combine the row alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minimoe.parallel.comm import all_reduce_sum

DIRECTIONS, LINKS = ("dispatch", "combine"), ("intra", "inter")


@dataclass
class TrafficCounters:
    """What this rank sent to *other* ranks: ``bytes[(direction, link)]``, ``rows[(direction, link)]``,
    ``meta_bytes`` (routing metadata, 12 bytes per entry), ``padding_bytes`` (rows that only pad a block, with
    their metadata in dispatch) and
    ``local_rows[direction]`` (rows kept local)."""

    bytes: dict = field(default_factory=lambda: {(d, link): 0 for d in DIRECTIONS for link in LINKS})
    rows: dict = field(default_factory=lambda: {(d, link): 0 for d in DIRECTIONS for link in LINKS})
    local_rows: dict = field(default_factory=lambda: {d: 0 for d in DIRECTIONS})
    meta_bytes: int = 0
    padding_bytes: int = 0

    def add(self, direction: str, splits: list[int], row_bytes: int, rank: int, gpus_per_node: int,
            meta_bytes_per_row: int = 0, padded_to: int | None = None) -> None:
        """``splits[d]`` rows of ``row_bytes`` sent to rank d (d == rank: kept local). ``padded_to``: every
        destination actually receives that many rows; the rest are padding."""
        for dest, count in enumerate(splits):
            if dest == rank:
                self.local_rows[direction] += count
                continue
            link = "intra" if dest // gpus_per_node == rank // gpus_per_node else "inter"
            self.rows[(direction, link)] += count
            self.bytes[(direction, link)] += count * row_bytes
            self.meta_bytes += count * meta_bytes_per_row
            if padded_to is not None:
                self.padding_bytes += (padded_to - count) * (row_bytes + meta_bytes_per_row)

    def merge(self, other: "TrafficCounters") -> "TrafficCounters":
        """Add ``other``'s counts to these (e.g. the layers of a model); returns self."""
        for key in self.bytes:
            self.bytes[key] += other.bytes[key]
            self.rows[key] += other.rows[key]
        for key in self.local_rows:
            self.local_rows[key] += other.local_rows[key]
        self.meta_bytes += other.meta_bytes
        self.padding_bytes += other.padding_bytes
        return self

    def link_bytes(self, link: str) -> int:
        """Dispatch + combine bytes over one link class."""
        return self.bytes[("dispatch", link)] + self.bytes[("combine", link)]

    def summed(self, group=None) -> "TrafficCounters":
        """The counters of all ranks added up (a collective)."""
        keys = [(d, link) for d in DIRECTIONS for link in LINKS]
        values = [self.bytes[k] for k in keys] + [self.rows[k] for k in keys] \
            + [self.local_rows[d] for d in DIRECTIONS] + [self.meta_bytes, self.padding_bytes]
        device = "cuda" if dist.is_initialized() and dist.get_backend(group) == "nccl" else "cpu"
        total = all_reduce_sum(torch.tensor(values, dtype=torch.int64, device=device), group, "counter sum").tolist()
        out = TrafficCounters()
        out.bytes = dict(zip(keys, total[:4]))
        out.rows = dict(zip(keys, total[4:8]))
        out.local_rows = dict(zip(DIRECTIONS, total[8:10]))
        out.meta_bytes, out.padding_bytes = total[10], total[11]
        return out

    def as_dict(self) -> dict:
        out = {f"{d}_{link}_bytes": v for (d, link), v in self.bytes.items()}
        out.update({f"{d}_{link}_rows": v for (d, link), v in self.rows.items()})
        out.update({f"{d}_local_rows": v for d, v in self.local_rows.items()}, meta_bytes=self.meta_bytes,
                   padding_bytes=self.padding_bytes)
        return out
