"""An explicit KV cache pytree for incremental decoding.

Plain arrays, no hidden module state: a cache can be inspected, compressed between prefill and
decode, sharded, or passed across jit boundaries like any other pytree.
"""

from __future__ import annotations

from typing import Tuple

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

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int, dtype=None) -> "KVCache":
        dtype = dtype or config.compute_dtype
        shape = (batch, capacity, config.num_kv_heads, config.resolved_head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   positions=jnp.full((batch, capacity), -1, jnp.int32), index=jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    def layer(self, i: int):
        return self.keys[i], self.values[i], self.positions

    def nbytes(self) -> int:
        """Bytes held by the cache arrays (keys, values, positions)."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))
