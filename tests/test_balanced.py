"""Balanced assignment against brute force: exact capacities, optimal for two bins, no improving swap, exchanges
that only ever gain."""
import itertools

import numpy as np
import pytest

from minimoe.placement.balanced import assign, balanced_kmeans, capacity_of, cut


def _total(score, bins):
    return score[np.arange(len(bins)), bins].sum()


def _brute_force_best(score, capacity):
    """The highest total score over every assignment whose bin counts equal ``capacity`` (unit sizes)."""
    num_items, num_bins = score.shape
    best = -np.inf
    for bins in itertools.product(range(num_bins), repeat=num_items):
        if np.array_equal(np.bincount(bins, minlength=num_bins), capacity):
            best = max(best, score[np.arange(num_items), bins].sum())
    return best


@pytest.mark.parametrize("seed", range(30))
def test_two_bins_with_unit_sizes_reach_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    num_items = int(rng.integers(1, 9))
    score, size = rng.normal(size=(num_items, 2)), np.ones(num_items)
    capacity = capacity_of(size, 2)
    bins = assign(score, capacity, size)  # the greedy step alone is optimal for two bins of unit-size items
    assert bins.min() >= 0 and bins.max() < 2
    assert np.array_equal(np.bincount(bins, minlength=2), capacity)
    assert _total(score, bins) == pytest.approx(_brute_force_best(score, capacity.astype(int)))


@pytest.mark.parametrize("seed", range(30))
def test_unit_sizes_fill_every_bin_exactly_and_leave_no_improving_swap(seed):
    rng = np.random.default_rng(seed)
    num_items, num_bins = int(rng.integers(1, 25)), int(rng.integers(1, 5))
    score, size = rng.normal(size=(num_items, num_bins)), np.ones(num_items)
    capacity = capacity_of(size, num_bins)
    bins = assign(score, capacity, size, passes=100)
    assert bins.min() >= 0 and bins.max() < num_bins
    assert np.array_equal(np.bincount(bins, minlength=num_bins), capacity)
    for i, j in itertools.combinations(range(num_items), 2):  # every exchange of two items' bins
        a, b = bins[i], bins[j]
        assert score[i, b] + score[j, a] <= score[i, a] + score[j, b] + 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_sized_items_stay_within_one_item_of_equal_shares(seed):
    rng = np.random.default_rng(seed)
    num_items, num_bins = int(rng.integers(2, 30)), int(rng.integers(1, 5))
    size = rng.integers(1, 50, num_items).astype(float)
    score = rng.normal(size=(num_items, num_bins))
    bins = assign(score, capacity_of(size, num_bins), size)
    assert bins.min() >= 0 and bins.max() < num_bins
    totals = np.bincount(bins, weights=size, minlength=num_bins)
    assert totals.max() <= size.sum() / num_bins + size.max() + 1e-9
    assert _total(score, bins) >= _total(score, assign(score, capacity_of(size, num_bins), size, passes=0)) - 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_exchanges_only_ever_gain_with_unit_sizes(seed):
    rng = np.random.default_rng(seed)
    num_items, num_bins = int(rng.integers(2, 30)), int(rng.integers(2, 5))
    score, size = rng.normal(size=(num_items, num_bins)), np.ones(num_items)
    greedy = assign(score, capacity_of(size, num_bins), size, passes=0)
    exchanged = assign(score, capacity_of(size, num_bins), size)
    assert np.array_equal(np.bincount(exchanged, minlength=num_bins), np.bincount(greedy, minlength=num_bins))
    assert _total(score, exchanged) >= _total(score, greedy) - 1e-9


def test_cut_gives_consecutive_chunks_of_the_target_sizes():
    order = np.array([4, 0, 3, 1, 2, 5, 6])
    bins = cut(order, np.ones(7), 3)  # counts 3, 2, 2 in the given order
    assert bins[order].tolist() == [0, 0, 0, 1, 1, 2, 2]
    sized = cut(np.arange(4), np.array([1.0, 1.0, 1.0, 5.0]), 2)  # halves of 8: the big item's middle is past 4
    assert sized.tolist() == [0, 0, 0, 1]


def test_balanced_kmeans_finds_separated_clusters_of_the_given_sizes():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat(np.arange(3), 5)  # equal clusters: the capacities (5 each) can hold each whole
    points = centres[truth] + rng.normal(scale=0.3, size=(15, 2))
    size = np.ones(15)
    labels = balanced_kmeans(points, capacity_of(size, 3), size, np.random.default_rng(1))
    assert np.bincount(labels, minlength=3).tolist() == [5, 5, 5]
    for cluster in range(3):  # each found cluster is one true cluster
        assert len(set(truth[labels == cluster].tolist())) == 1
