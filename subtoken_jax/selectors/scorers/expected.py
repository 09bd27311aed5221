"""Closed-form expected attention of the next n_future queries (see selectors/expected_attention.py)."""

from __future__ import annotations

import dataclasses

from subtoken_jax.selectors.base import PrefillState
from subtoken_jax.selectors.expected_attention import expected_attention_weights
from subtoken_jax.selectors.scorers.base import ValueGroupScorer


@dataclasses.dataclass(frozen=True)
class ExpectedAttentionScores(ValueGroupScorer):
    n_future: int = 16
    use_covariance: bool = True

    def attention(self, state: PrefillState, layer: int):
        return expected_attention_weights(state, layer, self.n_future, self.use_covariance)
