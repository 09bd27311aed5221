"""Quest's page selection (Tang et al., 2024): per-page key bounds and the pages a decode query reads.

Pure functions of one query and the cached keys, used by `layer_caches.QuestLayerCache` at every decode step;
`quest.quest_generate` is the generation that uses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax.permutations import inverse_permutation


def page_bounds(query: jax.Array, keys: jax.Array, positions: jax.Array, page_size: int,
                context_end: jax.Array) -> jax.Array:
    """Upper bounds [B, Hkv, pages] of each context page's attention logit for one query per row.

    query [B, Hq, D]; keys [B, S, Hkv, D]; positions [B, S] (-1 = empty); context_end [B]: positions from it on are
    the question and the answer, not paged. Page p holds the context positions p * page_size .. (p + 1) * page_size
    - 1 (by position, so left padding does not shift pages). A KV head's bound is the highest over its query
    heads; a page with no cached slot gets -inf.
    """
    batch, length, heads, dim = keys.shape
    pages = -(-length // page_size)
    paged = (positions >= 0) & (positions < context_end[:, None])
    page = jnp.where(paged, positions // page_size, pages)  # the extra page collects what is not paged
    rows = jnp.arange(batch)[:, None]
    keys = keys.astype(jnp.float32)
    low = jnp.full((batch, pages + 1, heads, dim), jnp.inf).at[rows, page].min(keys)[:, :pages]
    high = jnp.full((batch, pages + 1, heads, dim), -jnp.inf).at[rows, page].max(keys)[:, :pages]
    q = query.astype(jnp.float32).reshape(batch, heads, -1, dim)  # [B, Hkv, R, D]
    low, high = jnp.swapaxes(low, 1, 2)[:, :, None], jnp.swapaxes(high, 1, 2)[:, :, None]  # [B, Hkv, 1, pages, D]
    bound = jnp.max(jnp.sum(jnp.maximum(q[:, :, :, None] * low, q[:, :, :, None] * high), axis=-1), axis=2)
    held = jnp.zeros((batch, pages + 1), bool).at[rows, page].set(True)[:, :pages]
    return jnp.where(held[:, None], bound, -jnp.inf)


def quest_keep(query: jax.Array, keys: jax.Array, positions: jax.Array, page_size: int, pages,
               context_end: jax.Array) -> jax.Array:
    """[B, S, Hkv] bool: the context slots of the `pages` best-bounded pages of each KV head, and every slot at or
    after context_end (the question and the answer so far, read in full as with every other method here).
    query [B, Hq, D]; pages an int or [B] (may be traced)."""
    bound = page_bounds(query, keys, positions, page_size, context_end)  # [B, Hkv, P]
    # ranks rather than top_k, so `pages` may be traced (one program for every budget)
    rank = inverse_permutation(jnp.argsort(-bound, axis=-1, stable=True))
    picked = (rank < jnp.reshape(jnp.asarray(pages), (-1, 1, 1))) & jnp.isfinite(bound)  # [B, Hkv, P]
    page = jnp.clip(positions // page_size, 0, bound.shape[-1] - 1)  # [B, S]
    in_page = jnp.take_along_axis(picked, jnp.broadcast_to(page[:, None], picked.shape[:2] + page.shape[1:]), axis=2)
    context = (positions >= 0) & (positions < context_end[:, None])
    after = positions >= context_end[:, None]
    return (context[:, :, None] & jnp.swapaxes(in_page, 1, 2)) | after[:, :, None]


def pages_for(token_fraction: float, context_tokens: int, page_size: int) -> int:
    """Context pages read per step: token_fraction of the context's tokens, rounded up to whole pages."""
    return max(int(np.ceil(token_fraction * context_tokens / page_size - 1e-6)), 1)
