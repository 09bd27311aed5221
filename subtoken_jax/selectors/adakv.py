"""AdaKV: one top-k over all KV heads of a layer, so heads whose attention is concentrated give up slots.

AdaKV (Feng et al., 2024) keeps the layer's budget (round(budget x real tokens) x KV heads) but lets
each head take a different share of it, ranking every (token, head) score of the layer together; a
safeguard keeps each head's own top floor(alpha x per-head budget) tokens (at least one). It wraps a
token selector whose scores are comparable across heads (SnapKV's attention shares, by default).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.model_config import check_budget
from subtoken_jax.selectors.base import PrefillState, TokenSelector, budget_count, ranks_by
from subtoken_jax.selectors.snapkv import SnapKV


@functools.partial(jax.jit, static_argnames=("protect_first", "protect_last"))
def head_adaptive_select(scores, budget, positions, alpha, protect_first: int = 0, protect_last: int = 0):
    """[B, S, Hkv] 0/1 mask: the layer's round(budget n) x Hkv best (token, head) pairs per row, each head
    keeping at least its own top floor(alpha x round(budget n)) (>= 1 when anything is kept)."""
    batch, length, heads = scores.shape
    real = positions >= 0
    k = budget_count(budget, jnp.sum(real, axis=1))  # [B] tokens per head on average
    safe = jnp.floor(alpha * k.astype(jnp.float32)).astype(jnp.int32)
    safe = jnp.where((k > 0) & (alpha > 0), jnp.maximum(safe, 1), 0)
    first = jnp.min(jnp.where(real, positions, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    last = jnp.max(positions, axis=1, keepdims=True)
    protected = real & (((positions - first) < protect_first) | ((last - positions) < protect_last))
    scores = jnp.where(jnp.isnan(scores) | ~real[..., None], -jnp.inf, scores.astype(jnp.float32))
    by_head = lambda x: jnp.moveaxis(jnp.broadcast_to(x, scores.shape), 1, -1)  # noqa: E731  -> [B, Hkv, S]
    head_rank = ranks_by(by_head(real[..., None]), by_head(protected[..., None]), by_head(scores),
                         by_head(positions[..., None]))
    guaranteed = jnp.moveaxis(head_rank < safe[:, None, None], -1, 1) & real[..., None]  # [B, S, Hkv]
    flat = lambda x: jnp.broadcast_to(x, scores.shape).reshape(batch, length * heads)  # noqa: E731
    rank = ranks_by(flat(real[..., None]), flat(protected[..., None]), flat(guaranteed), flat(scores),
                    flat(positions[..., None]))
    keep = (rank < (k * heads)[:, None]).reshape(batch, length, heads) & real[..., None]
    return keep.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class AdaKV(TokenSelector):
    base: TokenSelector = SnapKV()
    alpha: float = 0.2  # the safeguard: the share of its per-head budget each head keeps by its own ranking

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"AdaKV alpha (safeguard) must be in [0, 1], got {self.alpha}")

    @property
    def needs_context_queries(self) -> bool:
        return self.base.needs_context_queries

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        return self.base.scores(state, layer)

    def protected(self, state: PrefillState):
        return self.base.protected(state)

    def masks(self, state: PrefillState, budget) -> Tuple[jax.Array, ...]:
        if isinstance(budget, (int, float)):
            check_budget(budget)
        first, last = self.protected(state)
        return tuple(head_adaptive_select(self.scores(state, layer), budget, state.positions,
                                          jnp.float32(self.alpha), protect_first=int(first), protect_last=int(last))
                     for layer in range(state.num_layers))
