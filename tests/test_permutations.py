"""permutations: the scatter forms give exactly what the sorts they replace gave (numpy's stable argsort)."""

import jax
import numpy as np
import pytest

from subtoken_jax.permutations import inverse_permutation, true_first


def test_inverse_permutation_is_the_argsort_of_the_order():
    rng = np.random.default_rng(0)
    order = np.argsort(rng.random((2, 3, 37)), axis=-1)
    ranks = np.asarray(jax.jit(inverse_permutation)(order))
    np.testing.assert_array_equal(ranks, np.argsort(order, axis=-1))
    np.testing.assert_array_equal(np.take_along_axis(ranks, order, axis=-1), np.broadcast_to(np.arange(37), (2, 3, 37)))


@pytest.mark.parametrize("n", [1, 5, 12, 15])
def test_true_first_is_the_stable_argsort_of_the_false_flags(n):
    rng = np.random.default_rng(n)
    flags = rng.random((2, 3, 12)) < 0.4
    flags[0, 0] = False  # a row with no True entry
    flags[0, 1] = True  # and one with nothing else
    order, ok = jax.jit(true_first, static_argnums=1)(flags, n)
    want = np.argsort(~flags, axis=-1, kind="stable")[..., :n]
    want_ok = np.take_along_axis(flags, want, axis=-1)
    if n > 12:  # past the axis: index 0, not True
        want = np.pad(want, [(0, 0), (0, 0), (0, n - 12)])
        want_ok = np.pad(want_ok, [(0, 0), (0, 0), (0, n - 12)])
    np.testing.assert_array_equal(np.asarray(order), want)
    np.testing.assert_array_equal(np.asarray(ok), want_ok)
    assert order.dtype == np.int32
