"""Quest's page selection (Tang et al., 2024): per-page key bounds and the pages a decode query reads.

Pure functions of one query and the cached keys, used by `layer_caches.QuestLayerCache` at every decode step;
`quest.quest_generate` is the generation that uses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def page_bounds(query: jax.Array, keys: jax.Array, positions: jax.Array, page_size: int) -> jax.Array:
    """Upper bounds [B, Hkv, pages] of each page's attention logit for one query per row.

    query [B, Hq, D]; keys [B, S, Hkv, D]; positions [B, S] (-1 = empty). A page with no real slot gets -inf.
    """
    batch, length, heads, dim = keys.shape
    pages = -(-length // page_size)
    pad = pages * page_size - length
    real = jnp.pad(positions >= 0, ((0, 0), (0, pad)))
    keys = jnp.pad(keys.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    paged = keys.reshape(batch, pages, page_size, heads, dim)
    real_paged = real.reshape(batch, pages, page_size)[..., None, None]
    low = jnp.min(jnp.where(real_paged, paged, jnp.inf), axis=2)  # [B, pages, Hkv, D]
    high = jnp.max(jnp.where(real_paged, paged, -jnp.inf), axis=2)
    q = query.astype(jnp.float32).reshape(batch, heads, -1, dim)  # [B, Hkv, R, D]
    low, high = jnp.swapaxes(low, 1, 2)[:, :, None], jnp.swapaxes(high, 1, 2)[:, :, None]  # [B, Hkv, 1, pages, D]
    bound = jnp.sum(jnp.maximum(q[:, :, :, None] * low, q[:, :, :, None] * high), axis=-1)  # [B, Hkv, R, pages]
    bound = jnp.max(bound, axis=2)
    return jnp.where(jnp.any(real.reshape(batch, pages, page_size), axis=-1)[:, None], bound, -jnp.inf)


def quest_keep(query: jax.Array, q_position: jax.Array, keys: jax.Array, positions: jax.Array, page_size: int,
               pages: int) -> jax.Array:
    """[B, S, Hkv] bool: the slots of the `pages` best-bounded pages of each KV head, and the newest page_size
    tokens (the query's own page) for every head. query [B, Hq, D], q_position [B]; pages an int or [B]."""
    bound = page_bounds(query, keys, positions, page_size)  # [B, Hkv, P]
    # ranks rather than top_k, so `pages` may be traced (one program for every budget)
    rank = jnp.argsort(jnp.argsort(-bound, axis=-1, stable=True), axis=-1, stable=True)
    picked = rank < jnp.asarray(pages)[..., None, None] if jnp.ndim(pages) else rank < pages  # [B, Hkv, P]
    slot_page = jnp.arange(keys.shape[1]) // page_size
    keep = jnp.take(picked, slot_page, axis=2) & jnp.isfinite(jnp.take(bound, slot_page, axis=2))  # [B, Hkv, S]
    recent = (q_position[:, None] - positions) < page_size  # [B, S]
    return jnp.swapaxes(keep, 1, 2) | recent[:, :, None]


def pages_for(token_fraction: float, context_tokens: int, page_size: int) -> int:
    """Pages read per step besides the newest one: about token_fraction of the context's tokens in all."""
    return max(int(np.floor(token_fraction * context_tokens / page_size + 1e-6)) - 1, 1)
