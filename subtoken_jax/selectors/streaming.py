"""StreamingLLM: the first `n_sink` tokens (attention sinks) plus the most recent tokens filling the budget.

Query- and content-agnostic: a positional baseline that shows how much the scoring methods add.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from subtoken_jax.selectors.base import PrefillState, TokenSelector


@dataclasses.dataclass(frozen=True)
class StreamingLLM(TokenSelector):
    n_sink: int = 4

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        """Recency: the position itself (sinks come from `protected`)."""
        shape = state.keys[layer].shape[:3]
        return jnp.broadcast_to(state.positions[..., None], shape).astype(jnp.float32)

    def protected(self, state: PrefillState):
        return self.n_sink, 0
