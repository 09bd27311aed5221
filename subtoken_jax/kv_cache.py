"""An explicit KV cache pytree for incremental decoding.

Plain arrays, no hidden module state: a cache can be inspected, compressed between prefill and
decode, sharded, or passed across jit boundaries like any other pytree. `layer_caches` gives the
per-layer view the attention layers write to and read from.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.model_config import ModelConfig


@flax.struct.dataclass
class KVCache:
    keys: Tuple[jax.Array, ...]  # per layer [batch, capacity, kv_heads, head_dim], RoPE applied
    values: Tuple[jax.Array, ...]  # per layer [batch, capacity, kv_heads, head_dim]
    positions: jax.Array  # [batch, capacity] int32 position of each slot; -1 = empty or padding
    index: jax.Array  # scalar int32: the next slot to write
    # Query-independent routing (models with routing.mode != "none"): each token's value-group mask is
    # decided when it is cached and kept here; adaptive routing also carries its running statistics.
    group_masks: Optional[Tuple[jax.Array, ...]] = None  # per layer [batch, capacity, kv_heads, G]
    route_stats: Optional[Tuple[jax.Array, ...]] = None  # per layer [batch, kv_heads, 3]

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int, dtype=None) -> "KVCache":
        dtype = dtype or config.compute_dtype
        shape = (batch, capacity, config.num_kv_heads, config.resolved_head_dim)
        layers = range(config.num_layers)
        group_masks = route_stats = None
        if config.routing.enabled:
            mask_shape = (batch, capacity, config.num_kv_heads, config.value_groups)
            group_masks = tuple(jnp.zeros(mask_shape, jnp.float32) for _ in layers)
            route_stats = tuple(jnp.zeros((batch, config.num_kv_heads, 3), jnp.float32) for _ in layers)
        return cls(keys=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   values=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   positions=jnp.full((batch, capacity), -1, jnp.int32), index=jnp.zeros((), jnp.int32),
                   group_masks=group_masks, route_stats=route_stats)

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    def nbytes(self) -> int:
        """Bytes held by the cache arrays (keys, values, positions)."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


@flax.struct.dataclass
class TailedKVCache:
    """A KVCache read-only during decoding, plus a small dense tail that decoded tokens are written to.

    In a compiled decode loop, writing each token into the big cache while attending over it made XLA
    copy every layer's cache every step (SmolLM2 at 4k tokens on CPU: 61.6 ms per step, 28.5 ms with the
    tail); the loop writes into the tail instead and `close` moves it into the cache once. Dense models only (a
    routed model's cache also carries per-token group masks; decode it through the KVCache).
    """

    prefix: KVCache
    tail_keys: Tuple[jax.Array, ...]  # per layer [B, L, Hkv, D]
    tail_values: Tuple[jax.Array, ...]
    tail_positions: jax.Array  # [B, L] int32, -1 = empty
    tail_index: jax.Array  # scalar int32: the next tail slot

    @classmethod
    def open(cls, cache: KVCache, tail: int) -> "TailedKVCache":
        """An empty tail of `tail` slots in front of `cache` (which must have room to take it back)."""
        if cache.group_masks is not None:
            raise InputError("a routed model's KV cache carries group masks per token: decode it without a tail")
        shape = (cache.positions.shape[0], int(tail)) + cache.keys[0].shape[2:]
        zeros = tuple(jnp.zeros(shape, k.dtype) for k in cache.keys)
        return cls(prefix=cache, tail_keys=zeros, tail_values=zeros,
                   tail_positions=jnp.full(shape[:2], -1, jnp.int32), tail_index=jnp.zeros((), jnp.int32))

    def close(self) -> KVCache:
        """The cache with the tail's slots written after its own (slots the tail did not fill stay empty)."""
        at = self.prefix.index
        write = lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), at, axis=1)  # noqa: E731
        return self.prefix.replace(keys=tuple(map(write, self.prefix.keys, self.tail_keys)),
                                   values=tuple(map(write, self.prefix.values, self.tail_values)),
                                   positions=write(self.prefix.positions, self.tail_positions),
                                   index=at + self.tail_index)


@flax.struct.dataclass
class QuestKVCache:
    """A full KVCache read the Quest way at decode steps: each step attends only to its best context pages and
    the tokens after the context (`quest`).

    group_masks (per layer [B, capacity, Hkv, G], optional): value groups kept inside every page (Quest + value
    groups). page_size and pages (pages read per step besides the newest one) are static.
    """

    cache: KVCache
    group_masks: Optional[Tuple[jax.Array, ...]] = None
    page_size: int = flax.struct.field(pytree_node=False, default=16)
    pages: jax.Array = None  # [B] int32 context pages read per step (traced: one program for every budget)
    context_end: jax.Array = None  # [B] int32: positions from here on (question, answer) are always read
