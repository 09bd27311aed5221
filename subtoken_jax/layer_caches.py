"""One layer's KV cache as `Attention` sees it: a small protocol with a dense and a packed implementation.

    layer_cache = layer_cache.write(key, value, positions)     # this chunk's keys/values [B, T, Hkv, D]
    out = layer_cache.attend(query, positions, sliding_window=..., value_group_mask=..., token_keep_mask=...)

`DenseLayerCache` is a slice of the dense `KVCache` (every slot, optional explicit masks, and the
routing state of a query-independent routed model); `PackedLayerCache` is a compressed prefix
(`packed_cache.PackedLayer`: compact keys, kept value groups) plus a dense tail that new tokens are
written to, attended with one softmax over both. `Attention` only calls `write` and `attend`, so the
decoder (`DecoderLM`), or anyone's Flax model built on our `Attention`, decodes from either cache.

`TailedLayerCache` is a read-only dense prefix plus such a tail (`kv_cache.TailedKVCache`, what a compiled
full-cache decode loop writes to). `layer_view(cache, i)` / `reassemble(cache, views)` go between a whole-model
cache (`KVCache`, `PackedCache`, `TailedKVCache`) and its per-layer views; `next_positions(cache)` is where the next token of each row goes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp

from subtoken_jax.attention import attend, attend_cache_and_chunk, attend_written_blocks, attention_allowed
from subtoken_jax.errors import InputError
from subtoken_jax.kernels.packed_decode import packed_decode_attention
from subtoken_jax.kv_cache import KVCache, QuestKVCache, TailedKVCache
from subtoken_jax.packed_cache import IMPLS, FixedKValues, PackedCache, PackedLayer, packed_attention
from subtoken_jax.quest_pages import quest_keep


# A chunk of at most this many tokens (decode steps, a short question) is attended apart from the cache it
# is written into; a longer one (a prefill) attends over the written cache, with attend's query chunking.
CHUNK_APART_MAX = 64
# A prefill chunk of at most this many tokens attends block by block over the slots written so far
# (attention.attend_written_blocks), in blocks of the largest of WRITTEN_BLOCKS that divides the capacity.
WRITTEN_BLOCKS_MAX_CHUNK = 512
WRITTEN_BLOCKS = (256, 128)


def _written_block(chunk: int, slots: int) -> int:
    """The key block of a prefill chunk's attention over the written slots only (0: attend every slot).

    Chunks of a chunked prefill (more rows than CHUNK_APART_MAX, at most WRITTEN_BLOCKS_MAX_CHUNK) in a cache of
    whole blocks; a one-shot prefill keeps `attend`'s query chunking over its own, exactly sized cache."""
    if not CHUNK_APART_MAX < chunk <= WRITTEN_BLOCKS_MAX_CHUNK:
        return 0
    return next((b for b in WRITTEN_BLOCKS if slots % b == 0 and slots > b), 0)


def _write_at(old: jax.Array, new: jax.Array, index) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), index, axis=1)


def _append_to_tail(cache, key, value, positions):
    """A packed or tailed layer cache with this chunk written to its tail at `index`."""
    return cache.replace(tail_keys=_write_at(cache.tail_keys, key, cache.index),
                         tail_values=_write_at(cache.tail_values, value, cache.index),
                         tail_positions=_write_at(cache.tail_positions, positions, cache.index),
                         index=cache.index + key.shape[1])


@flax.struct.dataclass
class DenseLayerCache:
    """Every slot of one layer: keys / values [B, L, Hkv, D], positions [B, L] (-1 empty), next slot `index`.

    A routed model (config.routing) also keeps each cached token's value-group mask [B, L, Hkv, G] and
    the adaptive router's running statistics [B, Hkv, 3]."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    index: jax.Array
    group_mask: Optional[jax.Array] = None
    route_stats: Optional[jax.Array] = None
    # after `write` of a short chunk: (keys, values, positions) before it and the chunk's own (keys, values,
    # positions); `attend` reads these instead of the written arrays (see attention.attend_cache_and_chunk)
    pending: Optional[Tuple[jax.Array, ...]] = None

    @property
    def routed(self) -> bool:
        return self.group_mask is not None

    @property
    def mask_slots(self) -> int:
        """Explicit masks cover every slot."""
        return self.keys.shape[1]

    def write(self, key, value, positions, *, group_mask=None, route_stats=None) -> "DenseLayerCache":
        """Writes a chunk at `index` (and, for a routed model, its routed group mask) and advances it."""
        pending = None
        if key.shape[1] <= CHUNK_APART_MAX and not self.routed:
            # the chunk as the cache will hold it (its dtype), so attending apart equals attending the written cache
            pending = (self.keys, self.values, self.positions, key.astype(self.keys.dtype),
                       value.astype(self.values.dtype), positions)
        new = self.replace(keys=_write_at(self.keys, key, self.index), values=_write_at(self.values, value, self.index),
                           positions=_write_at(self.positions, positions, self.index),
                           index=self.index + key.shape[1], pending=pending)
        if self.routed and group_mask is not None:
            new = new.replace(group_mask=_write_at(self.group_mask, group_mask, self.index), route_stats=route_stats)
        return new

    def attend(self, query, q_positions, *, sliding_window=None, value_group_mask=None, token_keep_mask=None,
               layer: int = 0):
        """Attention of query [B, T, Hq, D] over every slot; explicit masks cover the L slots (the routed
        masks of the cached tokens when value_group_mask is None)."""
        if self.pending is not None and value_group_mask is None and token_keep_mask is None:
            keys, values, positions, chunk_keys, chunk_values, chunk_positions = self.pending
            return attend_cache_and_chunk(
                query, keys.astype(query.dtype), values.astype(query.dtype),
                attention_allowed(q_positions, positions, sliding_window=sliding_window),
                chunk_keys.astype(query.dtype), chunk_values.astype(query.dtype),
                attention_allowed(q_positions, chunk_positions, sliding_window=sliding_window))
        block = _written_block(query.shape[1], self.keys.shape[1])
        if block and value_group_mask is None and token_keep_mask is None and not self.routed:
            return attend_written_blocks(query, q_positions, self.keys, self.values, self.positions, self.index,
                                         block=block, sliding_window=sliding_window)
        allowed = attention_allowed(q_positions, self.positions, sliding_window=sliding_window,
                                    token_keep_mask=token_keep_mask)
        mask = value_group_mask if value_group_mask is not None else self.group_mask
        return attend(query, self.keys.astype(query.dtype), self.values.astype(query.dtype), allowed,
                      value_group_mask=mask)


@flax.struct.dataclass
class PackedLayerCache:
    """One layer of a `PackedCache`: the packed prefix and the dense tail (keys / values [B, L, Hkv, D],
    positions [B, L], next slot `index`). impl: the fixed-K prefix's single-token attention ("auto": the
    Pallas kernel on GPU/TPU, XLA elsewhere; see kernels/packed_decode.py)."""

    prefix: PackedLayer
    tail_keys: jax.Array
    tail_values: jax.Array
    tail_positions: jax.Array
    index: jax.Array
    impl: str = flax.struct.field(pytree_node=False, default="auto")

    routed = False  # value groups were chosen at pack time; a routed model's own router is not consulted
    mask_slots = None  # explicit masks are not taken: the compression is in the prefix

    def write(self, key, value, positions, **_) -> "PackedLayerCache":
        """Appends a chunk to the dense tail (the prefix never changes) and advances the tail index."""
        return _append_to_tail(self, key, value, positions)

    def attend(self, query, q_positions, *, sliding_window=None, value_group_mask=None, token_keep_mask=None,
               layer: int = 0):
        """One softmax over the packed prefix and the tail; the compression is already in the prefix."""
        if value_group_mask is not None or token_keep_mask is not None:
            raise InputError(f"layer {layer}: a packed cache holds its compression already; pass no value_group_mask "
                             "or token_keep_mask with it")
        tail = dict(tail_keys=self.tail_keys.astype(query.dtype), tail_values=self.tail_values.astype(query.dtype),
                    tail_positions=self.tail_positions, sliding_window=sliding_window)
        if isinstance(self.prefix.values, FixedKValues) and query.shape[1] == 1:  # the decode kernel's case
            return packed_decode_attention(query[:, 0], q_positions[:, 0], self.prefix, impl=self.impl, **tail)[:, None]
        return packed_attention(query, q_positions, self.prefix, **tail)


@flax.struct.dataclass
class TailedLayerCache:
    """One layer of a `TailedKVCache`: a read-only dense prefix and the tail new tokens are written to."""

    keys: jax.Array  # prefix [B, S, Hkv, D]
    values: jax.Array
    positions: jax.Array  # [B, S]
    tail_keys: jax.Array  # [B, L, Hkv, D]
    tail_values: jax.Array
    tail_positions: jax.Array  # [B, L]
    index: jax.Array  # next tail slot

    routed = False
    mask_slots = None  # no explicit masks: like a packed cache, a tail is for plain decoding

    def write(self, key, value, positions, **_) -> "TailedLayerCache":
        """Appends a chunk to the tail (the prefix never changes) and advances the tail index."""
        return _append_to_tail(self, key, value, positions)

    def attend(self, query, q_positions, *, sliding_window=None, value_group_mask=None, token_keep_mask=None,
               layer: int = 0):
        """One softmax over the prefix and the tail (this chunk included)."""
        if value_group_mask is not None or token_keep_mask is not None:
            raise InputError(f"layer {layer}: a tailed KV cache takes no value_group_mask or token_keep_mask")
        return attend_cache_and_chunk(
            query, self.keys.astype(query.dtype), self.values.astype(query.dtype),
            attention_allowed(q_positions, self.positions, sliding_window=sliding_window),
            self.tail_keys.astype(query.dtype), self.tail_values.astype(query.dtype),
            attention_allowed(q_positions, self.tail_positions, sliding_window=sliding_window))


@flax.struct.dataclass
class QuestLayerCache:
    """One layer of a `QuestKVCache`: a dense layer cache whose single-token steps read only Quest's pages."""

    dense: DenseLayerCache
    group_mask: Optional[jax.Array] = None  # [B, L, Hkv, G] value groups kept, None = all
    page_size: int = flax.struct.field(pytree_node=False, default=16)
    pages: jax.Array = None  # [B] (or an int): context pages read per step
    context_end: jax.Array = None  # [B]: positions from here on (question, answer) are always read

    routed = False
    mask_slots = None  # the selection is Quest's own: no explicit masks

    def write(self, key, value, positions, **_) -> "QuestLayerCache":
        return self.replace(dense=self.dense.write(key, value, positions))

    def attend(self, query, q_positions, *, sliding_window=None, value_group_mask=None, token_keep_mask=None,
               layer: int = 0):
        """A decode step (one query token) attends to its pages; a longer chunk (the prompt) to every slot."""
        if value_group_mask is not None or token_keep_mask is not None:
            raise InputError(f"layer {layer}: a Quest cache selects its own tokens; pass no explicit masks")
        keep = None
        if query.shape[1] == 1:
            keep = quest_keep(query[:, 0], self.dense.keys, self.dense.positions, self.page_size, self.pages,
                              self.context_end)
        if keep is None and self.group_mask is None:
            return self.dense.attend(query, q_positions, sliding_window=sliding_window)
        mask = self.group_mask
        if mask is None:  # explicit masks take the dense path that reads the written cache
            mask = jnp.ones(self.dense.keys.shape[:3] + (1,), jnp.float32)
        return self.dense.replace(pending=None).attend(query, q_positions, sliding_window=sliding_window,
                                                       value_group_mask=mask, token_keep_mask=keep)


LayerCache = Union[DenseLayerCache, PackedLayerCache, TailedLayerCache, QuestLayerCache]
WholeCache = Union[KVCache, PackedCache, TailedKVCache, QuestKVCache]


def layer_view(cache: WholeCache, i: int) -> LayerCache:
    """Layer i of a whole-model cache, as `Attention` takes it (a packed one with the cache's own `impl`)."""
    if isinstance(cache, KVCache):
        routed = cache.group_masks is not None
        return DenseLayerCache(cache.keys[i], cache.values[i], cache.positions, cache.index,
                               cache.group_masks[i] if routed else None, cache.route_stats[i] if routed else None)
    if isinstance(cache, TailedKVCache):
        prefix = cache.prefix
        return TailedLayerCache(prefix.keys[i], prefix.values[i], prefix.positions, cache.tail_keys[i],
                                cache.tail_values[i], cache.tail_positions, cache.tail_index)
    if isinstance(cache, QuestKVCache):
        masks = cache.group_masks
        return QuestLayerCache(layer_view(cache.cache, i), None if masks is None else masks[i], cache.page_size,
                               cache.pages, cache.context_end)
    if isinstance(cache, PackedCache):
        if cache.impl not in IMPLS:
            raise InputError(f"unknown attention impl {cache.impl!r}; choose from {', '.join(IMPLS)}")
        return PackedLayerCache(cache.layers[i], cache.tail_keys[i], cache.tail_values[i], cache.tail_positions,
                                cache.tail_index, cache.impl)
    raise InputError(f"cache must be a KVCache, a PackedCache or a TailedKVCache, got {type(cache).__name__}")


def reassemble(cache: WholeCache, views: Sequence[LayerCache]) -> WholeCache:
    """The whole-model cache after every layer wrote its chunk (positions and index from the last view)."""
    last = views[-1]
    if isinstance(cache, QuestKVCache):
        return cache.replace(cache=reassemble(cache.cache, [v.dense for v in views]))
    if isinstance(cache, KVCache):
        routed = cache.group_masks is not None
        return cache.replace(keys=tuple(v.keys for v in views), values=tuple(v.values for v in views),
                             positions=last.positions, index=last.index,
                             group_masks=tuple(v.group_mask for v in views) if routed else None,
                             route_stats=tuple(v.route_stats for v in views) if routed else None)
    # a packed or a tailed cache: only the tail changed
    return cache.replace(tail_keys=tuple(v.tail_keys for v in views), tail_values=tuple(v.tail_values for v in views),
                         tail_positions=last.tail_positions, tail_index=last.index)


def room(cache: WholeCache) -> int:
    """Slots a chunk may fill: the dense cache's capacity, or the packed cache's tail capacity."""
    if isinstance(cache, QuestKVCache):
        return room(cache.cache)
    if isinstance(cache, KVCache):
        return cache.capacity
    return cache.tail_positions.shape[1]


def next_positions(cache: WholeCache) -> jax.Array:
    """[B, 1] int32: each row's next position (after the last real cached token, left padding included)."""
    if isinstance(cache, QuestKVCache):
        return next_positions(cache.cache)
    if isinstance(cache, KVCache):
        return jnp.max(cache.positions, axis=1, keepdims=True) + 1
    if isinstance(cache, TailedKVCache):
        prefix_end = next_positions(cache.prefix)
    else:
        prefix_end = cache.prefix_end[:, None]
    return jnp.maximum(prefix_end, jnp.max(cache.tail_positions, axis=1, keepdims=True) + 1)
