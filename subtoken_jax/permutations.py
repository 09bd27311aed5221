"""Integer permutations by one scatter instead of a sort.

Ranking (the rank of every entry, for a budget that may be traced) and packing (the kept entries first, in order)
both need a permutation that is already known or trivially described, yet were written as a sort: argsort(order)
for the ranks of a sorted order, a stable argsort of ~flags for the kept entries first. On XLA:CPU a sort of a
long axis costs tens of times the scatter that writes the same permutation (`python bench/permutations.py`), and
these run per layer and per plan. The results are the same integers. (Measured on XLA:CPU only; no GPU or TPU
has timed it here.)
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp


def _scatter_positions(targets: jax.Array) -> jax.Array:
    """out [..., N] with out[..., targets[..., i]] = i: targets must be a permutation along the last axis."""
    index = jnp.broadcast_to(jnp.arange(targets.shape[-1], dtype=jnp.int32), targets.shape)
    return jnp.put_along_axis(jnp.zeros(targets.shape, jnp.int32), targets.astype(jnp.int32), index, axis=-1,
                              inplace=False)


def inverse_permutation(order: jax.Array) -> jax.Array:
    """The ranks [..., N] of a permutation `order` [..., N] along the last axis (ranks[order[i]] = i), int32:
    jnp.argsort(order, axis=-1) without the sort."""
    return _scatter_positions(order)


def true_first(flags: jax.Array, n: int) -> Tuple[jax.Array, jax.Array]:
    """(indices int32 [..., n] of the True entries along the last axis in index order, then the False ones in index
    order; whether each is True): the first n of a stable argsort of ~flags, without the sort. Past the axis's
    length (n > N) the indices are 0 and the flags False."""
    flags = flags.astype(bool)
    size = flags.shape[-1]
    ones = flags.astype(jnp.int32)
    trues_before = jnp.cumsum(ones, axis=-1) - ones
    total = jnp.sum(ones, axis=-1, keepdims=True)
    falses_before = jnp.arange(size, dtype=jnp.int32) - trues_before
    order = _scatter_positions(jnp.where(flags, trues_before, total + falses_before))[..., :n]
    ok = jnp.arange(order.shape[-1], dtype=jnp.int32) < total
    if n > size:
        pad = [(0, 0)] * (flags.ndim - 1) + [(0, n - size)]
        order, ok = jnp.pad(order, pad), jnp.pad(ok, pad)
    return order, ok
