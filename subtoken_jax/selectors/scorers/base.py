"""The value-group scorer interface: how much each (context token, KV head, value group) matters to the answer.

Dropping value group g of token j for head h removes a_j * v_{j,h,g} from every read-out, where a_j is
the attention it receives; a scorer estimates a_j (`attention`) and the group's expected contribution
is a_j * ||v_{j,h,g}||. Keys are never dropped by these scores, so attention weights are unchanged.
A scorer is a small frozen dataclass, registered by name in scorers/__init__.py (like the token
selectors); any (state, layer) -> [B, S, Hkv, G] callable, such as a trained predictor's, works too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.selectors.base import PrefillState


def value_group_norms(values: jax.Array, groups: int) -> jax.Array:
    """L2 norm of each value group: values [B, S, Hkv, D] -> [B, S, Hkv, G]."""
    batch, length, heads, dim = values.shape
    if dim % groups:
        raise InputError(f"G={groups} value groups do not divide head_dim={dim}")
    grouped = values.astype(jnp.float32).reshape(batch, length, heads, groups, dim // groups)
    return jnp.linalg.norm(grouped, axis=-1)


@dataclasses.dataclass(frozen=True)
class ValueGroupScorer:
    """Subclasses implement `attention`; calling the scorer gives attention x group norm."""

    def attention(self, state: PrefillState, layer: int) -> jax.Array:
        """[B, Hkv, S]: the estimated attention the answer pays to each context token (per KV head)."""
        raise NotImplementedError

    def __call__(self, state: PrefillState, layer: int) -> jax.Array:
        """[B, S, Hkv, G] = attention on token j x ||v_{j,h,g}||."""
        norms = value_group_norms(state.values[layer], state.value_groups)
        return jnp.transpose(self.attention(state, layer), (0, 2, 1))[..., None] * norms
