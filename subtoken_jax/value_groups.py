"""Value groups: each KV head's value vector split into G equal slices that can be kept or dropped.

A value-group mask is an array [batch, kv_length, kv_heads, G] (1 keep, 0 drop); a model-wide mask is
a plain pytree: a tuple with one such array (or None) per layer. Keys and queries are never masked,
so attention weights are unchanged and only the value read-out is sparsified.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError

PerLayer = Union[None, jax.Array, Sequence[Optional[jax.Array]]]


def expand_group_mask(group_mask: jax.Array, head_dim: int) -> jax.Array:
    """[..., G] -> [..., head_dim]: each group's flag repeated over its head_dim // G channels."""
    groups = group_mask.shape[-1]
    if head_dim % groups:
        raise InputError(f"value-group mask has G={groups} groups, which does not divide head_dim={head_dim}")
    return jnp.repeat(group_mask, head_dim // groups, axis=-1)


def mask_values(values: jax.Array, group_mask: Optional[jax.Array]) -> jax.Array:
    """Zeros the dropped groups of values [batch, kv_length, kv_heads, head_dim]."""
    if group_mask is None:
        return values
    if group_mask.ndim != 4 or group_mask.shape[:3] != values.shape[:3]:
        raise InputError(
            f"value-group mask shape {tuple(group_mask.shape)} does not match values {tuple(values.shape[:3])} + (G,)"
            " [batch, kv_length, kv_heads, G]")
    return values * expand_group_mask(group_mask, values.shape[-1]).astype(values.dtype)


def per_layer(masks: PerLayer, num_layers: int, what: str):
    """Normalises None / one array for all layers / a per-layer sequence into a tuple of length num_layers."""
    if masks is None or hasattr(masks, "shape"):
        return (masks,) * num_layers
    masks = tuple(masks)
    if len(masks) != num_layers:
        raise InputError(f"{what} has {len(masks)} entries but the model has {num_layers} layers")
    return masks


def kept_fraction(masks: PerLayer) -> jax.Array:
    """Fraction of value groups kept over all given (non-None) layer masks."""
    leaves = [m for m in jax.tree.leaves(masks)]
    kept = sum(jnp.sum(m.astype(jnp.float32)) for m in leaves)
    total = sum(m.size for m in leaves)
    return kept / total
