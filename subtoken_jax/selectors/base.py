"""Shared pieces of query-aware KV selection: the captured prefill state, the selector interface, top-k.

Every selector reads the same few tensors of one prefill (rotated keys, values, the observation
window's rotated queries, positions), so they are captured once (`capture_prefill_state`) and each
method is a pure function of that state. This keeps methods comparable (same inputs, same top-k),
testable against numpy loops, and independent of how the cache is later compacted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from subtoken_jax.attention import attend, attention_allowed
from subtoken_jax.errors import InputError
from subtoken_jax.kv_cache import KVCache
from subtoken_jax.layers import rope_inverse_frequencies
from subtoken_jax.model import DecoderLM, default_positions
from subtoken_jax.model_config import check_budget
from subtoken_jax.permutations import inverse_permutation


@flax.struct.dataclass
class QuestionPrefill:
    """The question as prefilled over the *full* context (per layer [B, Q, Hkv, D] keys with RoPE and values;
    positions [B, Q], -1 = left padding; the last position's logits [B, vocab]). Answering from a compressed
    cache with these in its tail is kvpress's question-aware protocol: the question read the whole context before
    the context was compressed (`generate_from_state(..., question_over="full")`)."""

    keys: Tuple[jax.Array, ...]
    values: Tuple[jax.Array, ...]
    positions: jax.Array
    logits: jax.Array


@flax.struct.dataclass
class PrefillState:
    """What query-aware selectors see of one prefilled context (all per layer unless noted).

    S context slots, W observation-window queries (the question tokens, or the last W context tokens).
    """

    keys: Tuple[jax.Array, ...]  # [B, S, Hkv, D], RoPE applied (as cached)
    values: Tuple[jax.Array, ...]  # [B, S, Hkv, D]
    queries: Tuple[jax.Array, ...]  # [B, W, Hq, D], RoPE applied: the observation window
    positions: jax.Array  # [B, S] context positions, -1 = padding (shared by all layers)
    query_positions: jax.Array  # [B, W] window positions, -1 = padding
    inv_freq: jax.Array  # [D / 2] rotary inverse frequencies, to un-rotate queries
    attention: Optional[Tuple[jax.Array, ...]] = None  # [B, Hkv, S] accumulated observed attention (H2O)
    value_groups: int = flax.struct.field(pytree_node=False, default=1)  # G
    window_in_context: bool = flax.struct.field(pytree_node=False, default=False)  # window = last W context tokens
    # [B] context tokens the state stands for, evicted ones included (a state of survivors + one chunk in chunked
    # prefill); budgets given as fractions are fractions of these. None: the state's real slots.
    context_tokens: Optional[jax.Array] = None
    # KVzip: [B, Hkv, S] per layer, the most attention each context key got from any query head of its group while
    # the model repeated the context (`capture_prefill_state(..., reconstruct=...)`); None when not captured
    reconstruction: Optional[Tuple[jax.Array, ...]] = None
    # [B, S, Hq, D] per layer, RoPE applied: every context position's queries (`capture_prefill_state(...,
    # keep_context_queries=True)`), for statistics over the whole prefill (ExpectedAttention(observe="prefill"))
    context_queries: Optional[Tuple[jax.Array, ...]] = None
    # the question's keys, values and last logits over the full context (set whenever a question is given)
    question: Optional[QuestionPrefill] = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_heads(self) -> int:
        return self.queries[0].shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.keys[0].shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[3]

    @property
    def window(self) -> int:
        return self.queries[0].shape[1]


# ----------------------------------------------------------------------------- attention helpers


def window_attention(state: PrefillState, layer: int, moment: int = 1) -> jax.Array:
    """Attention of the window queries on the context keys, [B, Hkv, S].

    Softmax over the context keys each query may see (all real ones for a question window, causal for
    an in-context window), averaged over the valid window positions and the query heads of each KV group.
    moment 2: the mean of the squared weights instead (not its root), the expected squared attention a token
    gets from one of those queries: a squared read-out error summed over queries weighs a token that one query
    reads hard more than the squared mean says.
    """
    return _window_attention(state.queries[layer], state.keys[layer], state.query_positions, state.positions,
                             moment)


@functools.partial(jax.jit, static_argnames=("moment",))
def _window_attention(queries, keys, q_positions, kv_positions, moment: int = 1):
    allowed = attention_allowed(q_positions, kv_positions)
    key = keys.astype(jnp.float32)
    _, weights = attend(queries.astype(jnp.float32), key, key, allowed, return_weights=True)  # [B, Hkv, R, W, S]
    n_valid = jnp.maximum(jnp.sum(q_positions >= 0, axis=1), 1).astype(jnp.float32)
    return jnp.mean(jnp.sum(weights ** moment, axis=3), axis=2) / n_valid[:, None, None]


def accumulated_attention(queries, keys, q_positions, kv_positions, *, sliding_window: Optional[int] = None,
                          chunk: int = 256) -> jax.Array:
    """H2O's statistic: attention each key received, summed over queries, mean over a group's heads, [B, Hkv, S].

    Queries go in chunks so the [B, Hq, T, S] weights never materialise at once for long contexts.
    """
    total = 0.0
    for start in range(0, queries.shape[1], chunk):
        total = total + _attention_received(queries[:, start:start + chunk], keys, q_positions[:, start:start + chunk],
                                            kv_positions, sliding_window)
    return total


@functools.partial(jax.jit, static_argnames=("sliding_window",))
def _attention_received(queries, keys, q_positions, kv_positions, sliding_window):
    allowed = attention_allowed(q_positions, kv_positions, sliding_window=sliding_window)
    key = keys.astype(jnp.float32)
    _, weights = attend(queries.astype(jnp.float32), key, key, allowed, return_weights=True)  # [B, Hkv, R, T, S]
    return jnp.mean(jnp.sum(weights, axis=3), axis=2)


def max_attention_received(queries, keys, q_positions, kv_positions, context_len: int, *, chunk: int = 256):
    """KVzip's statistic: the largest attention weight each of the first `context_len` keys receives from any
    query and any query head of its KV group, [B, Hkv, context_len]. The softmax runs over every key a query may
    see (`keys` may extend past the context); queries go in chunks so their weights never materialise at once."""
    best = None
    for start in range(0, queries.shape[1], chunk):
        part = _max_received(queries[:, start:start + chunk], keys, q_positions[:, start:start + chunk], kv_positions,
                             context_len)
        best = part if best is None else jnp.maximum(best, part)
    return best


@functools.partial(jax.jit, static_argnames=("context_len",))
def _max_received(queries, keys, q_positions, kv_positions, context_len):
    allowed = attention_allowed(q_positions, kv_positions)
    key = keys.astype(jnp.float32)
    _, weights = attend(queries.astype(jnp.float32), key, key, allowed, return_weights=True)  # [B, Hkv, R, T, S']
    weights = jnp.where((q_positions >= 0)[:, None, None, :, None], weights[..., :context_len], 0.0)
    return jnp.max(weights, axis=(2, 3))


def _reconstruction(model: DecoderLM, params, keys, values, positions, context_ids, context_mask, prompt_ids,
                    chunk: int):
    """Runs prompt_ids + the context again on top of the context's cache (the model asked to repeat it) and
    returns each layer's max_attention_received over the context keys."""
    batch, ctx_len = context_ids.shape
    prompt = jnp.broadcast_to(jnp.asarray(prompt_ids, jnp.int32)[None], (batch, len(prompt_ids)))
    ids = jnp.concatenate([prompt, context_ids], axis=1)
    mask = jnp.concatenate([jnp.ones(prompt.shape, jnp.int32),
                            jnp.ones((batch, ctx_len), jnp.int32) if context_mask is None else
                            jnp.asarray(context_mask, jnp.int32)], axis=1)
    q_positions = default_positions(ids, mask, jnp.max(positions, axis=1, keepdims=True) + 1)
    extra = ids.shape[1]
    grow = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))  # noqa: E731
    cache = KVCache(keys=tuple(grow(k) for k in keys), values=tuple(grow(v) for v in values),
                    positions=jnp.pad(positions, ((0, 0), (0, extra)), constant_values=-1),
                    index=jnp.asarray(ctx_len, jnp.int32))
    cache, queries, _ = _prefill(model, params, ids, q_positions, cache)
    return tuple(max_attention_received(queries[i], cache.keys[i], q_positions, cache.positions, ctx_len, chunk=chunk)
                 for i in range(model.config.num_layers))


# ----------------------------------------------------------------------------- capture


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill(model: DecoderLM, params, ids, positions, cache):
    (logits, cache), variables = model.apply({"params": params}, ids, positions=positions, cache=cache,
                                             mutable=["prefill"], logits_to_keep=1)
    queries = tuple(variables["prefill"][f"layer_{i}"]["attn"]["queries"][0] for i in range(model.config.num_layers))
    return cache, queries, logits[:, -1]


def capture_prefill_state(model: DecoderLM, params, context_ids, question_ids=None, *, context_mask=None,
                          question_mask=None, window: int = 8, with_attention: bool = False,
                          chunk: int = 256, return_logits: bool = False, lookahead: int = 0,
                          reconstruct: Optional[Tuple[int, ...]] = None, keep_context_queries: bool = False):
    """Prefills the context into a KV cache and captures what selectors need.

    context_ids [B, S] (left-pad ragged rows, context_mask 1 = real). With question_ids [B, W] the
    question is run on top of the full context cache and its queries form the observation window
    (query-aware selection); without, the last `window` context tokens do. with_attention also
    accumulates each layer's observed attention over the context prefill (for H2O). return_logits also
    returns the last position's logits [B, vocab] (of the context, or of the question over the full
    context), as (state, logits). With a question, `state.question` keeps its keys, values and last logits over
    the full context (`QuestionPrefill`), for answering as kvpress does (`question_over="full"`).

    lookahead L > 0 (with a question): the answer's first L tokens are drafted greedily over the *full*
    cache and their queries join the observation window. The question says what is asked; the draft's
    queries are the ones that will read the answer (after a question the model first restates it, then
    copies the span that follows what the question matched, which the question itself barely attends
    to). The draft is discarded: the answer is generated afresh from the compressed cache. Costs L
    decode steps on the full cache, which exists at this point anyway.

    reconstruct (token ids, e.g. a "Repeat the previous context" turn; () for none): KVzip's pass. The prompt
    then the whole context run again over the context's cache, and each context key's largest attention from
    those queries is kept as `state.reconstruction` (query-agnostic: the question plays no part in it).

    keep_context_queries: every context position's queries are kept as `state.context_queries` ([B, S, Hq, D] per
    layer: as large as the keys times the query heads per KV head), for selectors whose statistics cover the whole
    prefill rather than the observation window.
    """
    cfg = model.config
    context_ids = jnp.asarray(context_ids, jnp.int32)
    batch, ctx_len = context_ids.shape
    q_len = 0 if question_ids is None else question_ids.shape[1]
    lookahead = int(lookahead)
    if lookahead < 0:
        raise InputError(f"lookahead must be >= 0 draft tokens, got {lookahead}")
    if lookahead and question_ids is None:
        raise InputError(f"lookahead={lookahead} drafts an answer to a question: give question_ids")
    positions = default_positions(context_ids, context_mask)
    cache = KVCache.create(cfg, batch, ctx_len + q_len + lookahead, jnp.float32)
    cache, ctx_queries, last_logits = _prefill(model, params, context_ids, positions, cache)
    keys = tuple(k[:, :ctx_len] for k in cache.keys)
    values = tuple(v[:, :ctx_len] for v in cache.values)
    if question_ids is not None:
        q_mask = jnp.ones((batch, q_len), jnp.int32) if question_mask is None else jnp.asarray(question_mask, jnp.int32)
        q_positions = default_positions(question_ids, q_mask, jnp.max(positions, axis=1, keepdims=True) + 1)
        cache, queries, last_logits = _prefill(model, params, jnp.asarray(question_ids, jnp.int32), q_positions,
                                               cache)
        asked = slice(ctx_len, ctx_len + q_len)  # the question's slots (a lookahead draft goes after them)
        question = QuestionPrefill(keys=tuple(k[:, asked] for k in cache.keys),
                                   values=tuple(v[:, asked] for v in cache.values), positions=q_positions,
                                   logits=last_logits)
        if lookahead:
            queries, q_positions = _draft_queries(model, params, cache, queries, q_positions, last_logits, lookahead)
    else:
        if not 1 <= window <= ctx_len:
            raise InputError(f"observation window {window} must be in [1, context length {ctx_len}]")
        queries = tuple(q[:, -window:] for q in ctx_queries)
        q_positions = positions[:, -window:]
        question = None
    reconstruction = None
    if reconstruct is not None:
        if model.config.routing.enabled:
            raise InputError("reconstruct (KVzip) needs a dense model: a routed model's cache carries group masks")
        reconstruction = _reconstruction(model, params, keys, values, positions, context_ids, context_mask,
                                         tuple(int(t) for t in reconstruct), chunk)
    attention = None
    if with_attention:
        attention = tuple(accumulated_attention(ctx_queries[i], keys[i], positions, positions,
                                                sliding_window=cfg.sliding_window(i), chunk=chunk)
                          for i in range(cfg.num_layers))
    inv_freq = jnp.asarray(rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta,
                                                    dict(cfg.rope_scaling) if cfg.rope_scaling else None))
    state = PrefillState(keys=keys, values=values, queries=queries, positions=positions, query_positions=q_positions,
                         inv_freq=inv_freq, attention=attention, value_groups=cfg.value_groups,
                         window_in_context=question_ids is None, reconstruction=reconstruction,
                         context_queries=ctx_queries if keep_context_queries else None, question=question)
    return (state, last_logits) if return_logits else state


def _draft_queries(model, params, cache, queries, q_positions, logits, steps: int):
    """Greedy-drafts `steps` tokens after the question over the full cache; window queries + the draft's."""
    position = jnp.max(q_positions, axis=1, keepdims=True)  # [B, 1]
    drafted = [queries]
    drafted_positions = [q_positions]
    for _ in range(steps):
        position = position + 1
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
        cache, step_queries, logits = _prefill(model, params, token, position, cache)
        drafted.append(step_queries)
        drafted_positions.append(position)
    queries = tuple(jnp.concatenate([q[layer] for q in drafted], axis=1) for layer in range(len(queries)))
    return queries, jnp.concatenate(drafted_positions, axis=1)


# ----------------------------------------------------------------------------- top-k token selection


def budget_count(budget, n) -> jax.Array:
    """round(budget * n) in float32 (half to even), clipped to [0, n]: the one rounding rule of all selectors."""
    if isinstance(budget, (int, float)):
        check_budget(budget)
    n = jnp.asarray(n)
    k = jnp.round(jnp.asarray(budget, jnp.float32) * n.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(k, 0, n.astype(jnp.int32))


def ranks_by(*keys) -> jax.Array:
    """Rank (0 = best) of each entry along the last axis under lexicographic keys, most important first.

    Each key is sorted descending; the entry index (ascending) breaks remaining ties, so ranks are a
    deterministic permutation. Integer keys stay integers, so long flattened axes break ties exactly.
    """
    def descending(k):
        k = jnp.asarray(k)
        return -(k.astype(jnp.int32) if k.dtype == jnp.bool_ else k)

    index = jnp.broadcast_to(jnp.arange(keys[0].shape[-1], dtype=jnp.int32), keys[0].shape)
    # jnp.lexsort: the last key is primary, each sorted ascending
    order = jnp.lexsort((index,) + tuple(descending(k) for k in reversed(keys)), axis=-1)
    return inverse_permutation(order)


def select_tokens(scores, budget, positions, *, protect_last: int = 0, protect_first: int = 0) -> jax.Array:
    """Keeps exactly round(budget * n_real) tokens per (batch row, KV head): a [B, S, Hkv] 0/1 float mask.

    scores [B, S, Hkv] (or [B, S]); positions [B, S] with -1 = padding, which is never kept. Priority:
    protected tokens (positions below `protect_first` and the last `protect_last` real tokens, e.g. attention sinks
    or SnapKV's in-context window), then higher score, then the more recent position.
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim == 2:
        scores = scores[..., None]
    positions = jnp.asarray(positions)
    if scores.shape[:2] != positions.shape:
        raise InputError(f"scores {scores.shape} do not match positions {positions.shape} [batch, length]")
    if isinstance(budget, (int, float)):
        check_budget(budget)
    return _select_tokens(scores, budget, positions, int(protect_last), int(protect_first))


@functools.partial(jax.jit, static_argnames=("protect_last", "protect_first"))
def _select_tokens(scores, budget, positions, protect_last, protect_first):
    real = positions >= 0
    k = budget_count(budget, jnp.sum(real, axis=1))  # [B]
    # the first tokens by position (a context counts from 0), so after chunked prefill evicted some, the sinks are
    # still the context's first tokens and not the earliest survivors
    last = jnp.max(positions, axis=1, keepdims=True)
    protected = real & ((positions < protect_first) | ((last - positions) < protect_last))
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    shape = scores.shape
    move = lambda x: jnp.moveaxis(jnp.broadcast_to(x, shape), 1, -1)  # noqa: E731  -> [B, Hkv, S]
    ranks = ranks_by(move(real[..., None]), move(protected[..., None]), move(scores), move(positions[..., None]))
    keep = (ranks < k[:, None, None]) & move(real[..., None])
    return jnp.moveaxis(keep, -1, 1).astype(jnp.float32)


def pad_to_capacity(masks, capacity: int):
    """Extends per-layer context masks [B, S, ...] with ones to a cache's capacity, for DecoderLM's mask inputs."""
    def pad(m):
        widths = [(0, 0)] * m.ndim
        widths[1] = (0, capacity - m.shape[1])
        return jnp.pad(m, widths, constant_values=1)
    return tuple(None if m is None else pad(m) for m in masks)


@dataclasses.dataclass(frozen=True)
class TokenSelector:
    """A token-level KV compression method: one score per (context token, KV head); higher = keep.

    Subclasses implement `scores`; `protected` names tokens a method always keeps (sinks, windows).
    """

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        """[B, S, Hkv] importance of each context token for each KV head of `layer`."""
        raise NotImplementedError

    def protected(self, state: PrefillState) -> Tuple[int, int]:
        """(first, last): how many leading / trailing real tokens are always kept."""
        return 0, 0

    @property
    def needs_context_queries(self) -> bool:
        """Whether `scores` reads state.context_queries (capture with keep_context_queries=True)."""
        return False

    def masks(self, state: PrefillState, budget) -> Tuple[jax.Array, ...]:
        """Per-layer token keep masks [B, S, Hkv] keeping `budget` of the real context tokens."""
        first, last = self.protected(state)
        return tuple(select_tokens(self.scores(state, layer), budget, state.positions, protect_first=first,
                                   protect_last=last) for layer in range(state.num_layers))


def needs_context_queries(recipe_or_selector) -> bool:
    """Whether a token selector, or a compression recipe's, reads every context query (so the prefill must keep
    them); False for None, a selector named by a string (their defaults never do) and a recipe without one."""
    selector = getattr(recipe_or_selector, "selector", recipe_or_selector)
    return bool(getattr(selector, "needs_context_queries", False))
