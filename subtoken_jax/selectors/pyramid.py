"""PyramidKV: SnapKV's scores under layer-wise budgets that shrink linearly from the first layer to the last.

PyramidKV (Cai et al., 2024) observes that attention is spread wide in lower layers and concentrated
in upper ones, so lower layers get more of the cache. The layers' fractions decrease linearly from
f_max to f_min = budget / beta with mean `budget` (f_max = 2 budget - f_min); when f_max would exceed
1 it is capped at 1 and f_min = 2 budget - 1, so the mean stays the budget. Each layer then keeps
round(f_layer x its real tokens) per KV head, as SnapKV would at that fraction.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.model_config import check_budget
from subtoken_jax.selectors.base import PrefillState, select_tokens
from subtoken_jax.selectors.snapkv import SnapKV


def pyramid_fractions(budget, num_layers: int, beta: float = 20.0) -> jax.Array:
    """Per-layer kept fractions [num_layers] (+ budget's shape), first layer first: linear, mean `budget`, each
    in [0, 1].

    budget may be a traced scalar (eval passes budgets as arrays, so one compiled program serves them all) or
    one per row [B] (the recipes' rounded-down budgets are per row): the result is then [num_layers, B]."""
    if isinstance(budget, (int, float)):
        check_budget(budget)
    if beta < 1:
        raise InputError(f"PyramidKV beta must be >= 1 (1 = the same budget in every layer), got {beta}")
    budget = jnp.asarray(budget, jnp.float32)
    if num_layers == 1:
        return budget[None]
    low = budget / beta
    high = 2 * budget - low
    capped = high > 1.0
    high, low = jnp.where(capped, 1.0, high), jnp.where(capped, 2 * budget - 1.0, low)
    steps = jnp.arange(num_layers, dtype=jnp.float32).reshape((num_layers,) + (1,) * budget.ndim)
    return high - steps * (high - low) / (num_layers - 1)


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    beta: float = 20.0

    def masks(self, state: PrefillState, budget) -> Tuple[jax.Array, ...]:
        first, last = self.protected(state)
        fractions = pyramid_fractions(budget, state.num_layers, self.beta)
        return tuple(select_tokens(self.scores(state, layer), fractions[layer], state.positions, protect_first=first,
                                   protect_last=last) for layer in range(state.num_layers))
