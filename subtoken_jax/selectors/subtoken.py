"""Sub-token scores: how much each (context token, KV head, value group) matters to the coming queries.

Dropping value group g of token j for head h removes a_j * v_{j,h,g} from every read-out, where a_j is
the attention it receives; the group's expected contribution is therefore a_j * ||v_{j,h,g}||. The
attention comes either realised (the question/future queries' actual attention on the context keys)
or in closed form from query statistics (expected attention). Keys are never dropped by these scores,
so attention weights are unchanged and the estimate is exact per group.
"""

from __future__ import annotations

import functools
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.selectors.base import PrefillState, window_attention
from subtoken_jax.selectors.expected_attention import expected_attention_weights
from subtoken_jax.selectors.snapkv import SnapKV, pool1d

METHODS = ("attention", "snapkv", "expected")


def value_group_norms(values: jax.Array, groups: int) -> jax.Array:
    """L2 norm of each value group: values [B, S, Hkv, D] -> [B, S, Hkv, G]."""
    batch, length, heads, dim = values.shape
    if dim % groups:
        raise InputError(f"G={groups} value groups do not divide head_dim={dim}")
    grouped = values.astype(jnp.float32).reshape(batch, length, heads, groups, dim // groups)
    return jnp.linalg.norm(grouped, axis=-1)


def layer_value_group_scores(state: PrefillState, layer: int, method: str = "attention", *, n_future: int = 16,
                             use_covariance: bool = True) -> jax.Array:
    """[B, S, Hkv, G] = attention on token j (mean over window queries and a group's heads) * ||v_{j,h,g}||.

    method "attention": realised attention of the window (question) queries; "snapkv": that attention
    average-pooled over the 5 neighbouring tokens, as SnapKV scores tokens (an answer that copies a span
    reads the tokens after the ones the question looked at, so their values must survive too);
    "expected": the closed-form expected attention of the next n_future queries (see expected_attention.py).
    """
    if method == "attention":
        attn = window_attention(state, layer)
    elif method == "snapkv":  # SnapKV's own pooling (kernel 5, avg: its and kvpress's defaults, not tuned here)
        attn = pool1d(window_attention(state, layer), SnapKV.kernel_size, SnapKV.pooling)
    elif method == "expected":
        attn = expected_attention_weights(state, layer, n_future, use_covariance)
    else:
        raise InputError(f"unknown value-group scoring method {method!r}; choose one of {METHODS}")
    norms = value_group_norms(state.values[layer], state.value_groups)
    return jnp.transpose(attn, (0, 2, 1))[..., None] * norms


def value_group_scores(state: PrefillState, method: str = "attention", **kwargs) -> Tuple[jax.Array, ...]:
    """`layer_value_group_scores` for every layer: a tuple of [B, S, Hkv, G]."""
    return tuple(layer_value_group_scores(state, layer, method, **kwargs) for layer in range(state.num_layers))


def value_group_scorer(method: str = "attention", **kwargs) -> Callable[[PrefillState, int], jax.Array]:
    """A (state, layer) -> [B, S, Hkv, G] scoring function, as `combine` takes."""
    if method not in METHODS:
        raise InputError(f"unknown value-group scoring method {method!r}; choose one of {METHODS}")
    return functools.partial(layer_value_group_scores, method=method, **kwargs)
