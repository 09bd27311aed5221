"""TOVA: keep the tokens the most recent query attends to, averaged over every query head of the layer.

TOVA (Oren et al., 2024) evicts, at each step, the token with the lowest attention from the current
query, averaged over all heads, so every KV head of a layer keeps the same tokens. After a prefill the
current query is the last one observed: the last context token for an in-context window (always kept,
as it is the one asking), or the question's (or lookahead draft's) last token for a query-aware window.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from subtoken_jax.attention import attend, attention_allowed
from subtoken_jax.selectors.base import PrefillState, TokenSelector


@jax.jit
def last_query_attention(queries, keys, q_positions, kv_positions) -> jax.Array:
    """Attention of each row's latest window query on the context keys, mean over all query heads, [B, S]."""
    last = jnp.argmax(q_positions, axis=1)  # the latest position (padding is -1)
    rows = jnp.arange(queries.shape[0])
    query = queries[rows, last][:, None]  # [B, 1, Hq, D]
    allowed = attention_allowed(q_positions[rows, last][:, None], kv_positions)
    key = keys.astype(jnp.float32)
    _, weights = attend(query.astype(jnp.float32), key, key, allowed, return_weights=True)  # [B, Hkv, R, 1, S]
    return jnp.mean(weights[:, :, :, 0], axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class TOVA(TokenSelector):
    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        attn = last_query_attention(state.queries[layer], state.keys[layer], state.query_positions, state.positions)
        return jnp.broadcast_to(attn[..., None], state.keys[layer].shape[:3])

    def protected(self, state: PrefillState):
        """The last context token is the current query when the window is in the context: kept."""
        return 0, 1 if state.window_in_context else 0
