"""Random token selection: the floor every scoring method must clear. Reproducible per (seed, layer)."""

from __future__ import annotations

import dataclasses

import jax

from subtoken_jax.selectors.base import PrefillState, TokenSelector


@dataclasses.dataclass(frozen=True)
class RandomSelector(TokenSelector):
    seed: int = 0

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(self.seed), layer)
        return jax.random.uniform(key, state.keys[layer].shape[:3])
