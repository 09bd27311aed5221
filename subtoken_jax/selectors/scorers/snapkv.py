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
    moment: int = 1  # 2: the root of the pooled mean squared attention (window_attention)

    def attention(self, state: PrefillState, layer: int):
        pooled = pool1d(window_attention(state, layer, self.moment), self.kernel_size, self.pooling)
        return pooled if self.moment == 1 else pooled ** (1.0 / self.moment)


@dataclasses.dataclass(frozen=True)
class PooledQuestionAttentionRMS(PooledQuestionAttention):
    """The root mean square of the window's attention, pooled: squared, a score is the read-out error of its
    group summed over the window's queries (and query heads), where the plain mean, squared, is that error only
    when every query reads the token alike. A token one answer query reads hard, as a copied digit is, weighs
    up to the window's length more."""

    moment: int = 2
