"""Balanced assignment: items (requests) into bins (nodes or GPUs) under size capacities, the step that
request grouping (``minimoe.placement.grouping``) repeats.

An item ``i`` of size ``s_i`` scores ``score[i, b]`` in bin ``b``; the assignment maximises Σ_i score[i, bin(i)]
with each bin's total size within its capacity (equal counts for unit sizes, else equal shares of the total
size plus one item's slack). With unit sizes this is a transportation problem, solvable exactly in polynomial
time (min-cost flow); with sizes it is a special case of the generalised assignment problem, NP-hard. :func:`assign`
is a heuristic for both: items with the largest *regret* (best score minus second best) first, each into its best
bin with room (optimal already for two bins of unit-size items), then rounds of pairwise exchanges between every
two bins while one gains, at most ``passes`` rounds (with unit sizes, once they stop gaining no exchange of two
items gains). :func:`balanced_kmeans` clusters points with it: k-means++ seeding [arthur2007kmeanspp] (a key
of book/references.bib), then Lloyd steps whose assignment step is :func:`assign` with score ``-|x - c|²`` (plus
``|x|²``, the same for every bin of a point).

Shapes: ``score`` (items, bins) float64; ``size`` (items,) float64 (all ones for equal counts); ``capacity``
(bins,) float64 (what :func:`capacity_of` returns); ``points`` (items, d) float. :func:`assign`, :func:`cut` and
:func:`balanced_kmeans` return a bin per item, (items,) int64.
"""
from __future__ import annotations

import numpy as np


def capacity_of(size, num_bins):
    """Target total size per bin: equal counts (unit sizes) or equal shares of the total."""
    if np.all(size == 1):
        count = len(size)
        return (count // num_bins + (np.arange(num_bins) < count % num_bins)).astype(float)
    return np.full(num_bins, size.sum() / num_bins)


def cut(order, size, num_bins):
    """Bin of each item when ``order`` is cut into consecutive chunks of the target sizes."""
    capacity = capacity_of(size, num_bins)
    bins = np.empty(len(order), dtype=np.int64)
    if np.all(size == 1):
        bins[order] = np.repeat(np.arange(num_bins), capacity.astype(np.int64))
        return bins
    centre = np.cumsum(size[order]) - size[order] / 2  # an item goes to the chunk holding its middle
    bins[order] = np.minimum((centre / capacity[0]).astype(np.int64), num_bins - 1)
    return bins


def assign(score, capacity, size, passes=10):
    """Bin per item maximising sum score[i, bin[i]] with each bin's total size within its capacity."""
    num_items, num_bins = score.shape
    exact = np.all(size == 1)
    limit = capacity if exact else capacity + size.max()  # token balance: allow one request of slack
    ordered = np.sort(score, axis=1)
    regret = ordered[:, -1] - (ordered[:, -2] if num_bins > 1 else 0)
    # greedy, largest regret first: each item takes its best bin with room (plain Python: one item at a time)
    preference = np.argsort(-score, axis=1, kind="stable").tolist()  # bins best first, ties by bin index
    room, sizes, used, chosen = (limit + 1e-9).tolist(), size.tolist(), [0.0] * num_bins, [0] * num_items
    for item in np.lexsort((-size, -regret)).tolist():
        for choice in preference[item]:
            if used[choice] + sizes[item] <= room[choice]:
                break
        else:  # no bin has room: the least overfull one
            choice = int(np.argmin(np.array(used) - limit))
        chosen[item] = choice
        used[choice] += sizes[item]
    bins, used = np.array(chosen, dtype=np.int64), np.array(used)
    for _ in range(passes):  # pairwise exchanges between bins a and b
        improved = False
        for a in range(num_bins):
            for b in range(a + 1, num_bins):
                in_a, in_b = np.flatnonzero(bins == a), np.flatnonzero(bins == b)
                want_b = score[in_a, b] - score[in_a, a]
                want_a = score[in_b, a] - score[in_b, b]
                order_a = in_a[np.argsort(-want_b, kind="stable")]  # stable: ties in item order on every CPU
                order_b = in_b[np.argsort(-want_a, kind="stable")]
                if exact:  # unit sizes: the best exchanges pair the i-th most eager of a with the i-th of b
                    pairs = min(len(order_a), len(order_b))
                    gain = np.sort(want_b)[::-1][:pairs] + np.sort(want_a)[::-1][:pairs]
                    count = int(np.argmin(gain > 1e-12)) if (gain <= 1e-12).any() else pairs
                    bins[order_a[:count]], bins[order_b[:count]] = b, a
                    improved |= count > 0
                    continue
                for i, j in zip(order_a, order_b):
                    gain = score[i, b] - score[i, a] + score[j, a] - score[j, b]
                    if gain <= 1e-12:
                        break
                    moved = size[i] - size[j]
                    if not exact and (used[b] + moved > limit[b] + 1e-9 or used[a] - moved > limit[a] + 1e-9):
                        continue
                    bins[i], bins[j] = b, a
                    used[a] -= moved
                    used[b] += moved
                    improved = True
        if not improved:
            break
    return bins


def balanced_kmeans(points, capacity, size, rng, iterations=20):
    """Balanced k-means: cluster per point (n,), clusters sized by ``capacity`` (k,)."""
    num_points, num_clusters = len(points), len(capacity)
    if num_clusters == 1 or num_points == 0:
        return np.zeros(num_points, dtype=np.int64)
    centres = [points[rng.integers(num_points)]]
    for _ in range(1, num_clusters):  # k-means++ seeding
        distance = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        total = distance.sum()
        pick = rng.choice(num_points, p=distance / total) if total > 0 else rng.integers(num_points)
        centres.append(points[pick])
    centres = np.stack(centres)
    labels = None
    for _ in range(iterations):
        # -|x - c|^2 + |x|^2. np.einsum sums in one fixed order on every machine; a BLAS matmul (points @ centres.T)
        # picks its kernel by CPU, and the last-bit differences flipped near-tied assignments between machines
        score = 2 * np.einsum("ij,kj->ik", points, centres) - (centres ** 2).sum(1)[None, :]
        new = assign(score.astype(np.float64), capacity, size)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(num_clusters):
            if (labels == c).any():
                centres[c] = points[labels == c].mean(0)
    return labels
