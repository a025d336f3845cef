"""The column-by-column row reductions equal numpy's own reductions along axis 1."""
import numpy as np
import pytest

from minimoe.placement.rows import row_count, row_or


@pytest.mark.parametrize("k", [0, 1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_row_or_equals_numpy(k, dtype):
    rng = np.random.default_rng(k)
    values = rng.integers(0, 2 ** 62, size=(257, k)).astype(dtype)
    got = row_or(values)
    assert got.dtype == dtype and got.shape == (257,)
    np.testing.assert_array_equal(got, np.bitwise_or.reduce(values, axis=1))


@pytest.mark.parametrize("k", [0, 1, 2, 5, 8])
def test_row_count_equals_numpy(k):
    mask = np.random.default_rng(k).random((300, k)) < 0.4
    got = row_count(mask)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, mask.sum(axis=1))


def test_row_or_does_not_touch_its_input():
    values = np.array([[1, 2], [4, 8]], dtype=np.int64)
    row_or(values)
    np.testing.assert_array_equal(values, [[1, 2], [4, 8]])
