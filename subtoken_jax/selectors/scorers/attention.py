"""The question's realised attention: averaged over its queries and the query heads of each KV head."""

from __future__ import annotations

import dataclasses

from subtoken_jax.selectors.base import PrefillState, window_attention
from subtoken_jax.selectors.scorers.base import ValueGroupScorer


@dataclasses.dataclass(frozen=True)
class QuestionAttention(ValueGroupScorer):
    def attention(self, state: PrefillState, layer: int):
        return window_attention(state, layer)
