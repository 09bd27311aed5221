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


def value_group_shares(values: jax.Array, groups: int) -> jax.Array:
    """Each value group's norm over its token's value norm, [B, S, Hkv, G]: squared, they sum to 1 per token."""
    norms = value_group_norms(values, groups)
    return norms / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(norms), axis=-1, keepdims=True)), 1e-30)


@dataclasses.dataclass(frozen=True)
class ValueGroupScorer:
    """Subclasses implement `attention`; calling the scorer gives attention x group norm."""

    def attention(self, state: PrefillState, layer: int) -> jax.Array:
        """[B, Hkv, S]: the estimated attention the answer pays to each context token (per KV head)."""
        raise NotImplementedError

    def group_weights(self, state: PrefillState, layer: int) -> jax.Array:
        """[B, S, Hkv, G]: what each group's attention is multiplied by, by default its norm ||v_{j,h,g}||."""
        return value_group_norms(state.values[layer], state.value_groups)

    def __call__(self, state: PrefillState, layer: int) -> jax.Array:
        """[B, S, Hkv, G] = attention on token j x its group weights (||v_{j,h,g}|| by default)."""
        return jnp.transpose(self.attention(state, layer), (0, 2, 1))[..., None] * self.group_weights(state, layer)

    def eviction_error(self, state: PrefillState, layer: int) -> jax.Array:
        """[B, S, Hkv]: the squared read-out error of evicting each token under the same attention estimate
        (`centred_eviction_error`), the price `JointCompression(eviction="centred")` weighs groups against."""
        return centred_eviction_error(self.attention(state, layer), state.values[layer], state.positions)


@jax.jit
def centred_eviction_error(attention: jax.Array, values: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, S, Hkv] = (a_j / (1 - a_j))^2 ||v_j - o||^2 per KV head: attention [B, Hkv, S], values [B, S, Hkv, D].

    Evicting token j moves its attention a_j to the tokens left, so the read-out o (here the attention-weighted
    mean of the context's values) becomes (o - a_j v_j) / (1 - a_j): it moves by a_j (o - v_j) / (1 - a_j), not by
    a_j v_j. A dropped value group, read as zero, loses all of a_j v_{j,g}. Values that share a common direction
    (most heads' do) therefore cost less to evict than their norm says.
    """
    real = (positions >= 0)[:, None, :]
    a = jnp.where(real, attention.astype(jnp.float32), 0.0)  # [B, Hkv, S]
    weights = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-30)
    v = values.astype(jnp.float32)
    centre = jnp.einsum("bhs,bshd->bhd", weights, v)
    distance = jnp.sum(jnp.square(v - centre[:, None]), axis=-1)  # [B, S, Hkv]
    share = jnp.transpose(a, (0, 2, 1))
    return jnp.square(share / (1.0 - jnp.minimum(share, 0.99))) * distance
