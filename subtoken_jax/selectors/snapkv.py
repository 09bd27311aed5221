"""SnapKV: keep the context tokens the observation window attends to, smoothed by 1D pooling.

The window's attention (question tokens, or the last W context tokens) is averaged over window
positions and the query heads of each KV group; pooling over neighbouring positions keeps whole
spans around attended tokens rather than isolated ones, which preserves local context for the answer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.selectors.base import PrefillState, TokenSelector, window_attention


@functools.partial(jax.jit, static_argnames=("kernel_size", "pooling"))
def pool1d(x: jax.Array, kernel_size: int, pooling: str = "avg") -> jax.Array:
    """Same-length pooling over the last axis with stride 1 and kernel_size // 2 padding on each side.

    avg counts the zero padding (torch's avg_pool1d default); max ignores positions outside the sequence.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"pooling kernel_size must be a positive odd number, got {kernel_size}")
    pad = [(0, 0)] * (x.ndim - 1) + [(kernel_size // 2, kernel_size // 2)]
    dims = (1,) * (x.ndim - 1) + (kernel_size,)
    strides = (1,) * x.ndim
    if pooling == "avg":
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad) / kernel_size
    if pooling == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pad)
    raise InputError(f"unknown pooling {pooling!r}; use avg or max")


@dataclasses.dataclass(frozen=True)
class SnapKV(TokenSelector):
    """kernel_size 5 with avg pooling, as SnapKV's and kvpress's defaults; kernel_size 1 disables pooling."""

    kernel_size: int = 5
    pooling: str = "avg"

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        attn = window_attention(state, layer)  # [B, Hkv, S]
        return jnp.transpose(pool1d(attn, self.kernel_size, self.pooling), (0, 2, 1))

    def protected(self, state: PrefillState):
        """An in-context observation window is always kept, as in SnapKV."""
        return 0, state.window if state.window_in_context else 0
