"""Chunked prefill with compression between chunks: the cache never holds more than the budget plus one chunk.

    tokens, packed, rounds = chunked_compressed_generate(
        model, params, context_ids, question_ids=question_ids, max_new_tokens=32, chunk_size=512,
        compression=Compression(token_fraction=0.5, value_fraction=0.5, scope="head"))
    # or generate(..., compression=..., prefill_chunk=512)

The context is prefilled `chunk_size` tokens at a time. Each chunk attends to the packed survivors of the
earlier chunks plus itself (the packed cache's dense tail); then survivors and chunk are compressed together
into a new packed prefix under the budget, measured against every context token seen so far
(`PrefillState.context_tokens`). The observation window of a round is the chunk's last `window` tokens (the
question is not known yet); the last round's is the question (and `lookahead` drafted answer tokens, drafted
over survivors + last chunk), as in one-shot compression, so a chunk as long as the context gives one-shot
compression. When the question is known before the context is read (a served question over a retrieved
document), `observe_question=True` makes every round's window the question itself, run over that round's
survivors + chunk (its keys and values are not kept; the question is read once more at the end). Contexts
longer than a full cache would fit become possible.

Each KV head of each layer keeps its own tokens, so between rounds a layer's slots are head-major (`HeadSlots`),
and a round's recipe sees them folded: one layer with one KV head per (layer, row, KV head) row
(`fold_state`). Hence what the recipe may be: budgets spent per (layer, KV head) (scope "head"), and selectors
and scorers that score each head from its own slots (not H2O, which needs every query of the prefill; not AdaKV
or PyramidKV, whose budgets move across heads or layers; not the trained predictor, which is per layer). A value
group dropped in one round is gone in the next (kept masks are cut to the groups still present). SnapKV's
pooling runs over a head's surviving slots, which after evictions are not all neighbours in the text.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax.compressed_generate import _check_lengths, _compiled_compression, answer_from_cache, on_active_mesh
from subtoken_jax.compression import Compression, JointCompression
from subtoken_jax.errors import InputError
from subtoken_jax.kv_cache import KVCache
from subtoken_jax.layer_caches import next_positions
from subtoken_jax.layers import rope_inverse_frequencies
from subtoken_jax.model import DecoderLM, default_positions
from subtoken_jax.packed_cache import (PackedCache, PackedLayer, _power_of_two, cache_nbytes, entries_to_slots,
                                       pack_head_major)
from subtoken_jax.selectors import KVzip, PrefillState, needs_context_queries
from subtoken_jax.selectors.base import _draft_queries, _prefill
from subtoken_jax.shape_buckets import bucket_length, left_pad

# selectors whose decisions need more than one head's slots, or every query of the prefill
_NOT_PER_HEAD = {"h2o": "needs every prefill query's attention", "adakv": "moves budget across heads",
                 "pyramidkv": "moves budget across layers", "predictor": "scores with per-layer parameters",
                 "kvzip": "repeats the whole context, which a chunked prefill never holds"}


@flax.struct.dataclass
class HeadSlots:
    """One layer's cached tokens, head-major: each KV head its own slots (they differ once tokens are evicted)."""

    keys: jax.Array  # [B, Hkv, N, D], RoPE applied
    values: jax.Array  # [B, Hkv, N, D], a dropped group reads as zero
    positions: jax.Array  # [B, Hkv, N] int32, -1 = empty
    present: jax.Array  # [B, Hkv, N, G] bool: value groups still held


def check_chunked_recipe(compression) -> None:
    """Raises unless the recipe can compress between chunks (see the module docstring)."""
    if not isinstance(compression, (Compression, JointCompression)):
        raise InputError("prefill_chunk takes a Compression or a JointCompression recipe (their budgets are "
                         "measured against every context token seen, see PrefillState.context_tokens)")
    if compression.scope != "head":
        raise InputError(f"prefill_chunk compresses each KV head of each layer on its own: give the recipe "
                         f"scope='head' (got {compression.scope!r})")
    if compression.value_fill != "zero":
        raise InputError("prefill_chunk keeps dropped value groups as zero (value_fill='mean' needs the whole "
                         "context's mean value, which a chunked prefill never holds)")
    for part in ("selector", "scorer"):
        name = getattr(compression, part, None)
        name = "kvzip" if isinstance(name, KVzip) else name
        if isinstance(name, str) and name in _NOT_PER_HEAD:
            raise InputError(f"prefill_chunk cannot use {part} {name!r}: it {_NOT_PER_HEAD[name]}")
    if needs_context_queries(compression):
        raise InputError("prefill_chunk cannot use a selector that reads every context query (e.g. "
                         "ExpectedAttention(observe='prefill')): a chunked prefill never holds them")


def chunk_slots(keys: jax.Array, values: jax.Array, positions: jax.Array, groups: int) -> HeadSlots:
    """A freshly prefilled chunk (keys / values [B, C, Hkv, D], positions [B, C]) as head-major slots."""
    batch, length, heads, _ = keys.shape
    head_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    return HeadSlots(head_major(keys), head_major(values), jnp.broadcast_to(positions[:, None], (batch, heads, length)),
                     jnp.ones((batch, heads, length, groups), bool))


def prefix_slots(layer: PackedLayer) -> HeadSlots:
    """A packed global-layout layer's survivors as head-major slots (its compact keys, its entries put back)."""
    keys, entries = layer.keys, layer.values
    if not keys.compact:
        raise InputError("chunked prefill re-compresses packed layers with compacted keys (pack_head_major)")
    values, present = entries_to_slots(entries, entries.tokens.astype(jnp.int32), keys.keys.shape[2])
    return HeadSlots(keys.keys, values, keys.positions, present)


def join(first: HeadSlots, second: HeadSlots) -> HeadSlots:
    """Slots of `first` then of `second` (the survivors, then the new chunk: positions stay increasing)."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=2), first, second)


def pad_slots(slots: HeadSlots, length: int) -> HeadSlots:
    """Slots padded with empty ones (position -1, no groups) to `length`: layers sized apart fold together."""
    extra = length - slots.positions.shape[-1]
    if extra <= 0:
        return slots
    pad = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3),  # noqa: E731
                                   constant_values=value)
    return HeadSlots(pad(slots.keys, 0), pad(slots.values, 0), pad(slots.positions, -1), pad(slots.present, False))


def fold_state(slots: Sequence[HeadSlots], queries: Sequence[jax.Array], query_positions: jax.Array,
               context_tokens: jax.Array, inv_freq: jax.Array, window_in_context: bool) -> PrefillState:
    """Every layer's slots as one PrefillState of one layer and one KV head per (layer, row, KV head) row.

    queries per layer [B, W, Hq, D] (query head j reads KV head j // (Hq / Hkv)); query_positions [B, W];
    context_tokens [B]. Rows are ordered layer, then batch row, then KV head (`unfold_masks` undoes it).
    """
    layers = len(slots)
    batch, heads, length, dim = slots[0].keys.shape
    groups = slots[0].present.shape[-1]
    rows = layers * batch * heads
    stack = lambda xs: jnp.stack(xs).reshape((rows,) + xs[0].shape[2:])  # noqa: E731
    window = queries[0].shape[1]
    per_head = [jnp.swapaxes(q.reshape(batch, window, heads, -1, dim), 1, 2) for q in queries]  # [B, Hkv, W, R, D]
    everywhere = lambda x: jnp.broadcast_to(x[None, :, None], (layers, batch, heads) + x.shape[1:]).reshape(  # noqa: E731
        (rows,) + x.shape[1:])
    return PrefillState(keys=(stack([s.keys for s in slots])[:, :, None],),
                        values=(stack([s.values for s in slots])[:, :, None],),
                        queries=(stack(per_head),), positions=stack([s.positions for s in slots]),
                        query_positions=everywhere(query_positions), inv_freq=inv_freq, attention=None,
                        value_groups=groups, window_in_context=window_in_context,
                        context_tokens=everywhere(context_tokens))


def unfold_masks(masks, layers: int, batch: int, heads: int):
    """A folded state's (token masks, group masks) back per layer: [B, Hkv, N] and [B, Hkv, N, G]."""
    tokens, groups = masks
    token = jnp.reshape(tokens[0], (layers, batch, heads, -1))
    group = jnp.reshape(groups[0], (layers, batch, heads) + groups[0].shape[1:2] + groups[0].shape[-1:])
    return [token[i] for i in range(layers)], [group[i] for i in range(layers)]


@functools.partial(jax.jit, static_argnames=("sizes", "dtype"))
def _pack_layers(slots, keeps, group_masks, sizes, dtype):
    return tuple(pack_head_major(s.keys.astype(dtype), s.values.astype(dtype), s.positions, keep,
                                 (group != 0) & s.present, capacity, key_capacity)
                 for s, keep, group, (capacity, key_capacity) in zip(slots, keeps, group_masks, sizes))


def _sizes(slots, keeps, group_masks, bucket: bool):
    """Per layer (capacity, key_capacity): its kept pairs and keys, over its heads (host-side; powers of two with
    bucket). Sized per layer, as one-shot packing is: layers keep very different numbers of tokens per head."""
    sizes = []
    for s, keep, group in zip(slots, keeps, group_masks):
        kept = (np.asarray(keep) != 0) & (np.asarray(s.positions) >= 0)
        keys = max(int(kept.sum(axis=-1).max(initial=0)), 1)
        held = (np.asarray(group) != 0) & np.asarray(s.present) & kept[..., None]
        pairs = max(int(held.sum(axis=(-1, -2)).max(initial=0)), 1)
        length, groups = s.positions.shape[-1], s.present.shape[-1]
        sizes.append((_power_of_two(pairs, length * groups), _power_of_two(keys, length)) if bucket
                     else (pairs, keys))
    if bucket:  # one size for every layer: a tuple of per-layer sizes would compile the model per combination
        sizes = [tuple(max(size[i] for size in sizes) for i in range(2))] * len(sizes)
    return tuple(sizes)


def compress_round(compression, slots: List[HeadSlots], queries, query_positions, context_tokens, inv_freq,
                   window_in_context: bool, dtype, bucket: bool = False) -> List[PackedLayer]:
    """One round: every layer's slots compressed by the recipe into packed layers (groups not present stay out)."""
    batch, heads = slots[0].positions.shape[:2]
    length = max(s.positions.shape[-1] for s in slots)
    slots = [pad_slots(s, length) for s in slots]
    state = _fold(slots, queries, query_positions, context_tokens, inv_freq, window_in_context)
    keeps, group_masks = _unfold(_compiled_compression(compression, state), len(slots), batch, heads)
    return list(_pack_layers(slots, keeps, group_masks, _sizes(slots, keeps, group_masks, bucket), jnp.dtype(dtype)))


# each round's reshaping as one compiled program: run op by op, every op compiled per round shape, and on the CPU
# backend the compiled code of a long chunked prefill stayed resident
_fold = jax.jit(fold_state, static_argnames=("window_in_context",))
_unfold = jax.jit(unfold_masks, static_argnames=("layers", "batch", "heads"))


@functools.partial(jax.jit, static_argnames=("width", "groups"))
def _round_slots(layers, cache, positions, width: int, groups: int) -> List[HeadSlots]:
    """Per layer: the survivors (packed `layers`, None in the first round), then the chunk of `width` tokens the
    cache just wrote (at `positions` [B, width]), as head-major slots."""
    keys, values = _chunk_kv(cache, width)
    new = [chunk_slots(k, v, positions, groups) for k, v in zip(keys, values)]
    return new if layers is None else [join(prefix_slots(layer), s) for layer, s in zip(layers, new)]


def _chunk_kv(cache, length: int):
    """The keys / values a chunk of `length` tokens just wrote: a dense cache's first slots, or a packed tail's."""
    if isinstance(cache, KVCache):
        return [k[:, :length] for k in cache.keys], [v[:, :length] for v in cache.values]
    return [k[:, :length] for k in cache.tail_keys], [v[:, :length] for v in cache.tail_values]


def chunked_compressed_generate(model: DecoderLM, params, context_ids, *, compression: Callable, chunk_size: int,
                                max_new_tokens: int, question_ids=None, attention_mask=None, question_mask=None,
                                temperature: float = 0.0, top_k: Optional[int] = None, rng=None,
                                eos_id: Optional[int] = None, progress: bool = False, chunk: int = 64,
                                bucket: bool = False, compress_every: Optional[int] = None,
                                observe_question: bool = False):
    """Generates after context_ids [B, P] (+ question_ids [B, Q]) prefilled chunk_size tokens at a time, the
    cache compressed by `compression` (a `Compression` / `JointCompression` with scope "head") after every
    chunk. attention_mask / question_mask: left-padded rows. bucket: for streams of prompts of many lengths, the
    context is left-padded to a whole number of chunks (every chunk then has one shape), the question to a bucketed
    length (`shape_buckets`) and packed sizes rounded up to one power of two for all layers: a bounded number of
    compiled programs, for up to twice the packed slots. Other arguments as `compressed_generate`.

    observe_question: every round observes through the question (run over that round's survivors + chunk,
    then dropped), not only the last; needs question_ids.

    compress_every N: decoding-time compression too: every N decoded tokens, the tail (the question and the
    tokens decoded since) is compressed with the prefix under the same recipe, the window being the last decoded
    tokens (kvpress's DecodingPress behaves so). With a token-count budget (`kept_tokens` / `kv_tokens`) the cache
    then never holds more than the budget plus N tail tokens, however long the generation; a fraction budget is
    a fraction of every token seen, so it grows with them.

    Returns (int32 [B, max_new_tokens], the final PackedCache, rounds): one dict per chunk (and per decoding
    interval, "phase": "decode") with the tokens seen, `held_bytes` (the cache's arrays while the chunk was in it: survivors + chunk), `kept_bytes`
    (after compressing) and `full_bytes` (a dense cache of the tokens seen, same dtype).
    """
    check_chunked_recipe(compression)
    chunk_size = int(chunk_size)
    window = min(compression.window, chunk_size)
    if chunk_size < 1:
        raise InputError(f"prefill_chunk must be >= 1 token, got {chunk_size}")
    if compress_every is not None and (isinstance(compress_every, bool) or int(compress_every) < 1):
        raise InputError(f"compress_every must be >= 1 decoded token, got {compress_every!r}")
    context_ids = np.asarray(context_ids, np.int32)
    _check_lengths(model, context_ids, question_ids, max_new_tokens)
    if bucket:  # padding is masked: no position, never attended, never kept
        room = model.config.max_position_embeddings - max_new_tokens - compression.lookahead
        if question_ids is not None:
            q_len = question_ids.shape[1]
            q_len = max(q_len, min(bucket_length(q_len), room - context_ids.shape[1]))
            question_ids, question_mask = left_pad(question_ids, question_mask, q_len)
            room -= q_len
        whole = -(-context_ids.shape[1] // chunk_size) * chunk_size
        context_ids, attention_mask = left_pad(context_ids, attention_mask, max(context_ids.shape[1],
                                                                                 min(whole, room)))
        context_ids, attention_mask = np.asarray(context_ids), np.asarray(attention_mask)
    cfg = model.config
    batch, length = context_ids.shape
    mask = np.ones_like(context_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    positions = np.asarray(default_positions(jnp.asarray(context_ids), jnp.asarray(mask)))
    q_len = 0 if question_ids is None else question_ids.shape[1]
    lookahead = compression.lookahead
    if observe_question and question_ids is None:
        raise InputError("observe_question observes every chunk through the question: give question_ids")
    if lookahead and question_ids is None:
        raise InputError(f"lookahead={lookahead} drafts an answer to a question: give question_ids")
    params, = on_active_mesh(model, params)
    inv_freq = jnp.asarray(rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta,
                                                    dict(cfg.rope_scaling) if cfg.rope_scaling else None))
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    layers, rounds, logits, prefix_end = None, [], None, None
    starts = list(range(0, length, chunk_size))
    for start in starts:
        ids, pos = context_ids[:, start:start + chunk_size], positions[:, start:start + chunk_size]
        width = ids.shape[1]
        last = start == starts[-1]
        room = width + (q_len + lookahead if last and question_ids is not None else q_len if observe_question else 0)
        if layers is None:  # the first chunk: a dense cache of its own size (float32, as one-shot capture keeps it)
            cache = KVCache.create(cfg, batch, room, jnp.float32)
        else:
            cache = PackedCache.with_empty_tail(layers, room, prefix_end)
        cache, queries, logits = _prefill(model, params, jnp.asarray(ids), jnp.asarray(pos), cache)
        held = cache.nbytes() if isinstance(cache, KVCache) else cache_nbytes(cache)
        slots = _round_slots(layers, cache, jnp.asarray(pos), width, cfg.value_groups)
        prefix_end = jnp.asarray(np.max(positions[:, :start + width], axis=1) + 1, jnp.int32)
        seen = jnp.asarray((positions[:, :start + width] >= 0).sum(axis=1), jnp.float32)
        if last and question_ids is not None:  # the question (and the draft) read over survivors + last chunk
            q_mask = jnp.ones((batch, q_len), jnp.int32) if question_mask is None else \
                jnp.asarray(question_mask, jnp.int32)
            q_positions = default_positions(jnp.asarray(question_ids, jnp.int32), q_mask, prefix_end[:, None])
            cache, queries, q_logits = _prefill(model, params, jnp.asarray(question_ids, jnp.int32), q_positions,
                                                cache)
            if lookahead:
                queries, q_positions = _draft_queries(model, params, cache, queries, q_positions, q_logits, lookahead)
            in_context = False
        elif observe_question:  # the question over survivors + this chunk; the slots above hold the chunk only
            q_mask = jnp.ones((batch, q_len), jnp.int32) if question_mask is None else \
                jnp.asarray(question_mask, jnp.int32)
            q_positions = default_positions(jnp.asarray(question_ids, jnp.int32), q_mask, prefix_end[:, None])
            _, queries, _ = _prefill(model, params, jnp.asarray(question_ids, jnp.int32), q_positions, cache)
            in_context = False
        else:
            queries = tuple(q[:, -window:] for q in queries)
            q_positions, in_context = jnp.asarray(pos[:, -window:]), True
        layers = compress_round(compression, slots, queries, q_positions, seen, inv_freq, in_context,
                                cfg.compute_dtype, bucket)
        rounds.append(_round("prefill", seen, held, layers, batch * per_token))
    if compress_every is None:
        tail, recompress = max(q_len + max_new_tokens - 1, 1), None
    else:
        tail = q_len + min(int(compress_every), max(max_new_tokens - 1, 1))
        seen_box = [seen]

        def recompress(packed, queries, q_positions):
            width = int(packed.tail_index)
            tail_positions = packed.tail_positions[:, :width]
            slots = _round_slots(packed.layers, packed, tail_positions, width, cfg.value_groups)
            seen_box[0] = seen_box[0] + jnp.sum(tail_positions >= 0, axis=1).astype(jnp.float32)
            layers = compress_round(compression, slots, queries, q_positions, seen_box[0], inv_freq, True,
                                    cfg.compute_dtype, bucket)
            rounds.append(_round("decode", seen_box[0], cache_nbytes(packed), layers, batch * per_token))
            return PackedCache.with_empty_tail(layers, int(compress_every), next_positions(packed)[:, 0])
    packed = PackedCache.with_empty_tail(layers, tail, prefix_end)
    tokens, packed = answer_from_cache(model, params, packed, max_new_tokens=max_new_tokens, question_ids=question_ids,
                                       question_mask=question_mask,
                                       first_logits=None if question_ids is not None else logits,
                                       temperature=temperature, top_k=top_k, rng=rng, eos_id=eos_id,
                                       progress=progress, chunk=chunk, compress_every=compress_every,
                                       recompress=recompress, window=compression.window)
    return tokens, packed, rounds


def _round(phase: str, seen, held: int, layers, full_per_token: int) -> dict:
    """What one compression round held and kept (bytes of the cache's own arrays) against a dense cache."""
    seen = int(np.max(np.asarray(seen)))
    return {"phase": phase, "tokens_seen": seen, "held_bytes": int(held),
            "kept_bytes": int(sum(cache_nbytes(layer) for layer in layers)), "full_bytes": seen * full_per_token}
