"""Quest (Tang et al., 2024): query-aware page selection at every decode step, alone or with value groups.

    tokens = quest_generate(model, params, context_ids, question_ids, max_new_tokens=32, token_fraction=0.25)
    tokens = quest_generate(..., compression=Compression(value_fraction=0.5, scorer="snapkv"))  # + value groups

The context is cut into pages of `page_size` positions, each summarised by the elementwise minimum and maximum
of its keys (per KV head). At a decode step a query q bounds a page's attention logit from above by
sum_d max(q_d min_d, q_d max_d); the pages with the highest bounds (for a KV head, the highest over its query
heads), about token_fraction of the context's tokens, are read, and the rest of the context is not attended. The
question and the answer so far are always read (as every other method here reads its uncompressed tail), and the
prompt (context and question) is prefilled with full attention, as Quest does. Quest keeps the whole cache, so it
frees no memory: it saves reads. With `compression`, a recipe's value-group masks (token masks must keep every
token: Quest picks the tokens) also prune the values inside every page, which does free memory (the packed value
groups); both are reported in bytes by the study.

Here the page summaries are recomputed from the keys at every step (the selection is Quest's; a production
kernel would keep them beside the cache and read only the chosen pages).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax.errors import InputError
from subtoken_jax.input_checks import check_ids, check_max_new_tokens
from subtoken_jax.kv_cache import KVCache, QuestKVCache
from subtoken_jax.model import DecoderLM, default_positions
from subtoken_jax.model_config import check_budget
from subtoken_jax.quest_pages import pages_for
from subtoken_jax.sampling import hold_eos, pick_token
from subtoken_jax.shape_buckets import bucket_length, left_pad


@functools.partial(jax.jit, static_argnames=("model",))
def _feed(model, params, ids, positions, cache):
    logits, cache = model.apply({"params": params}, ids, positions=positions, cache=cache, logits_to_keep=1)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("model", "steps", "eos_id"))
def _decode(model, params, cache, token, position, done, steps: int, eos_id: Optional[int]):
    def step(carry, _):
        cache, token, position, done = carry
        logits, cache = model.apply({"params": params}, token[:, None], positions=position[:, None], cache=cache)
        token, done = hold_eos(pick_token(logits[:, -1], None, 0.0, None), done, eos_id)
        return (cache, token, position + 1, done), token

    _, tokens = jax.lax.scan(step, (cache, token, position, done), None, length=steps)
    return jnp.transpose(tokens)


def quest_generate(model: DecoderLM, params, context_ids, question_ids, *, max_new_tokens: int,
                   token_fraction: float, page_size: int = 16, compression=None, eos_id: Optional[int] = None):
    """Greedy answer [B, max_new_tokens] to question_ids [B, Q] after context_ids [B, P], each decode step reading
    about token_fraction of the context's tokens chosen page by page (see the module docstring). compression: a
    recipe (`Compression`) whose value-group masks prune the context's values too; its token masks must keep
    every token. Rows are not padded (one prompt per row of equal length)."""
    check_budget(token_fraction, "token_fraction")
    if not isinstance(page_size, int) or page_size < 1:
        raise InputError(f"page_size must be a whole number of tokens >= 1, got {page_size!r}")
    context_ids = np.asarray(check_ids(context_ids, "context_ids"), np.int32)
    question_ids = np.asarray(check_ids(question_ids, "question_ids"), np.int32)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    cfg = model.config
    batch, length = context_ids.shape
    q_len = question_ids.shape[1]
    limit = cfg.max_position_embeddings
    if length + q_len + max_new_tokens > limit:
        raise InputError(f"context ({length}) + question ({q_len}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_position_embeddings={limit}")
    group_masks = None
    if compression is not None:
        from subtoken_jax.selectors import capture_prefill_state

        state = capture_prefill_state(model, params, context_ids, question_ids, window=compression.window,
                                      lookahead=compression.lookahead)
        token_masks, group_masks = compression(state)
        if not all(bool(jnp.all(t > 0)) for t in token_masks):
            raise InputError("Quest picks the tokens: give a compression that keeps every token (token_fraction=1)")
    # left-padded to bucketed lengths (pad slots at position -1, never attended): prompts of many lengths share
    # programs, and the page budget is traced, so budgets do too
    padded = max(length, min(bucket_length(length), limit - q_len - max_new_tokens))
    context_ids, context_mask = left_pad(context_ids, None, padded)
    capacity = min(bucket_length(padded + q_len + max_new_tokens), limit)
    if group_masks is not None:  # context slots (after the padding), then ones for the question and the answer
        group_masks = tuple(jnp.pad(g, ((0, 0), (padded - length, capacity - padded), (0, 0), (0, 0)),
                                    constant_values=1) for g in group_masks)
    cache = KVCache.create(cfg, batch, capacity)
    _, cache = _feed(model, params, jnp.asarray(context_ids),
                     default_positions(jnp.asarray(context_ids), jnp.asarray(context_mask)), cache)
    pages = jnp.full((batch,), pages_for(token_fraction, length, page_size), jnp.int32)
    cache = QuestKVCache(cache=cache, group_masks=group_masks, page_size=page_size, pages=pages,
                         context_end=jnp.full((batch,), length, jnp.int32))
    q_positions = default_positions(jnp.asarray(question_ids), offset=length)
    logits, cache = _feed(model, params, jnp.asarray(question_ids), q_positions, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    done = jnp.zeros((batch,), bool) if eos_id is None else token == eos_id
    pieces = [token[:, None]]
    if max_new_tokens > 1:
        position = jnp.full((batch,), length + q_len, jnp.int32)
        pieces.append(_decode(model, params, cache, token, position, done, max_new_tokens - 1, eos_id))
    return jnp.concatenate(pieces, axis=1)
