"""A bottom-k sample: a uniform sample without replacement that merges across workers.

Each token gets a hash that is a fixed function of its global row: SplitMix64's [steele2014splitmix] first
output from the state ``row + seed·γ`` (``row_hash``), a bijection of 64-bit integers. The sample is the ``size``
tokens with the smallest hashes. The union of two samples of disjoint rows, cut back to the ``size`` smallest
hashes, is the sample of the union of their tokens, so partial samples built by any number of workers, over rows
split among them in any way and merged in any order, equal the sample of one pass, bit for bit. Bottom-k
sketches are Cohen and Kaplan's [cohen2007bottomk]. For a fixed seed the sample is deterministic; over seeds it
behaves as a uniform sample without replacement, as far as SplitMix64's output behaves as a random function.
Keys in brackets are entries of book/references.bib.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def row_hash(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """SplitMix64 [steele2014splitmix] of ``rows + seed * golden``: uint64 (n,), a bijection of the row."""
    z = np.asarray(rows, np.uint64) + np.uint64((seed + 1) * 0x9E3779B97F4A7C15 % (1 << 64))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass(eq=False)
class BottomK:
    """The ``size`` tokens with the smallest hashes among those offered: a uniform sample without replacement
    that merges (union, keep the smallest) across workers. Arrays are sorted by hash."""

    size: int
    hash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))   # uint64 (K,)
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))     # int64 (K,) global row
    request: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # int32 (K,)
    token_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # int8 (K,)
    experts: np.ndarray | None = None                                           # int16 (K, L, k)

    def offer(self, hashes, rows, request, token_class, experts) -> "BottomK":
        """A new sample holding the smallest ``size`` of the current and the offered tokens."""
        if self.experts is not None and len(self.hash) == self.size:  # only hashes below the current largest
            keep = hashes < self.hash[-1]
            hashes, rows, request, token_class, experts = (a[keep] for a in (hashes, rows, request, token_class,
                                                                               experts))
        if self.experts is not None:
            hashes, rows, request, token_class, experts = (
                np.concatenate([a, b]) for a, b in ((self.hash, hashes), (self.row, rows), (self.request, request),
                                                    (self.token_class, token_class), (self.experts, experts)))
        if len(hashes) > self.size:
            chosen = np.argpartition(hashes, self.size - 1)[:self.size]
            hashes, rows, request, token_class, experts = (a[chosen] for a in (hashes, rows, request, token_class,
                                                                               experts))
        order = np.argsort(hashes)  # hashes are distinct: the order is unique
        return BottomK(self.size, hashes[order], rows[order], request[order], token_class[order], experts[order])

    def merge(self, other: "BottomK") -> "BottomK":
        if other.experts is None:
            return self
        return self.offer(other.hash, other.row, other.request, other.token_class, other.experts)
