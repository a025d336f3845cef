"""Reductions along the short k axis of (tokens, k) arrays, column by column.

numpy reduces ``axis=1`` of a (T, k) array one short row at a time; with k a top-k (2-8) it is about ten times
faster to combine the k columns with k - 1 vectorised operations. The placement fits and the traffic counts
run these on every fitting and held-out token, many times per fit.
"""
from __future__ import annotations

import numpy as np


def row_or(values: np.ndarray) -> np.ndarray:
    """(T,) bitwise OR of each row of a (T, k) integer array, k small (top-k): one vectorised pass per column.
    Equal to ``np.bitwise_or.reduce(values, axis=1)``, which walks each short row on its own and is about ten
    times slower here."""
    out = values[:, 0].copy() if values.shape[1] else np.zeros(len(values), values.dtype)
    for column in range(1, values.shape[1]):
        out |= values[:, column]
    return out


def row_count(mask: np.ndarray) -> np.ndarray:
    """(T,) int64 True entries of each row of a (T, k) bool array, k small: ``mask.sum(axis=1)``, column by
    column as ``row_or``."""
    out = np.zeros(len(mask), np.int64)
    for column in range(mask.shape[1]):
        out += mask[:, column]
    return out
