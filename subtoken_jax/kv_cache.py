"""An explicit KV cache pytree for incremental decoding.

Plain arrays, no hidden module state: a cache can be inspected, compressed between prefill and
decode, sharded, or passed across jit boundaries like any other pytree.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

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

    def layer(self, i: int) -> dict:
        """Layer i's view: {"keys", "values", "positions"[, "group_mask", "route_stats"]}."""
        view = {"keys": self.keys[i], "values": self.values[i], "positions": self.positions}
        if self.group_masks is not None:
            view["group_mask"] = self.group_masks[i]
            view["route_stats"] = self.route_stats[i]
        return view

    @classmethod
    def from_layers(cls, layers, index) -> "KVCache":
        """Reassembles a cache from the per-layer views returned by the attention layers."""
        routed = "group_mask" in layers[0]
        return cls(keys=tuple(l["keys"] for l in layers), values=tuple(l["values"] for l in layers),
                   positions=layers[-1]["positions"], index=index,
                   group_masks=tuple(l["group_mask"] for l in layers) if routed else None,
                   route_stats=tuple(l["route_stats"] for l in layers) if routed else None)

    def nbytes(self) -> int:
        """Bytes held by the cache arrays (keys, values, positions)."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))
