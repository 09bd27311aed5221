"""H2O (heavy hitters): keep the tokens that received the most attention during the context prefill.

Needs the accumulated observed attention (`capture_prefill_state(..., with_attention=True)`). It is
query-agnostic, so it is the baseline query-aware methods must beat; `recent` also keeps the last
tokens, as H2O pairs heavy hitters with a recency window.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.selectors.base import PrefillState, TokenSelector


@dataclasses.dataclass(frozen=True)
class H2O(TokenSelector):
    recent: int = 0

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        if state.attention is None:
            raise InputError("H2O needs accumulated attention: capture_prefill_state(..., with_attention=True)")
        return jnp.transpose(state.attention[layer], (0, 2, 1))

    def protected(self, state: PrefillState):
        return 0, self.recent
