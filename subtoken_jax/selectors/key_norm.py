"""KNorm: keep the tokens whose keys have the lowest L2 norm.

Low-norm keys were observed to attract high attention (Devoto et al., 2024), so this is a cheap,
query-agnostic proxy. RoPE is a rotation, so the rotated keys' norms equal the raw keys' norms.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from subtoken_jax.selectors.base import PrefillState, TokenSelector


@dataclasses.dataclass(frozen=True)
class KeyNorm(TokenSelector):
    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        return -jnp.linalg.norm(state.keys[layer].astype(jnp.float32), axis=-1)
