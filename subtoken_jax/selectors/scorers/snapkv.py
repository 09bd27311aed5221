"""The question's attention pooled over neighbouring tokens, as SnapKV pools it (kernel 5, avg: its and
kvpress's defaults, not tuned here). An answer that copies a span reads the tokens after the ones the
question looked at, so their values must survive too."""

from __future__ import annotations

import dataclasses

from subtoken_jax.selectors.base import PrefillState, window_attention
from subtoken_jax.selectors.scorers.base import ValueGroupScorer
from subtoken_jax.selectors.snapkv import SnapKV, pool1d


@dataclasses.dataclass(frozen=True)
class PooledQuestionAttention(ValueGroupScorer):
    kernel_size: int = SnapKV.kernel_size
    pooling: str = SnapKV.pooling

    def attention(self, state: PrefillState, layer: int):
        return pool1d(window_attention(state, layer), self.kernel_size, self.pooling)
