"""Checks of API inputs at the boundary (ids, masks, lengths), each failing with one InputError line.

Shape checks run at trace time (shapes are static under jit); checks that need values (a mask
holding only 0 / 1) run only on concrete arrays, i.e. when called eagerly, as the public generate()
and Compression paths do: under jit they are skipped rather than forcing a host transfer.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax.errors import InputError


def check_ids(ids, what: str = "input_ids"):
    """An int32 [batch, length] array, length >= 1; a 1-D sequence gets told to add the batch axis."""
    shape = np.shape(ids)
    if len(shape) == 1:
        raise InputError(f"{what} must be [batch, length], got a 1-D shape {shape}: add a batch axis (ids[None])")
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise InputError(f"{what} must be a non-empty [batch, length] array, got shape {shape}")
    dtype = getattr(ids, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
        raise InputError(f"{what} must hold integer token ids, got dtype {dtype}")
    return ids


def check_max_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return int(max_new_tokens)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_mask(mask, what: str, *, batch: int, keys: int, kv_heads: int, groups: Optional[int] = None,
               layer: Optional[int] = None) -> None:
    """A 0/1 mask over [B, S(, Hkv)(, G)] (each axis may also be 1, broadcast); values checked when concrete.

    groups given: a value_group_mask [B, S, Hkv, G]; else a token_keep_mask [B, S] or [B, S, Hkv].
    """
    if mask is None:
        return
    where = what if layer is None else f"{what}[{layer}]"
    shape = tuple(np.shape(mask))
    if groups is not None:
        expected, names = (batch, keys, kv_heads, groups), "[batch, keys, kv_heads, G]"
        fits = len(shape) == 4 and shape[3] == groups and all(s in (1, e) for s, e in zip(shape[:3], expected))
    else:
        expected, names = (batch, keys, kv_heads), "[batch, keys] or [batch, keys, kv_heads]"
        fits = len(shape) in (2, 3) and all(s in (1, e) for s, e in zip(shape, expected))
    if not fits:
        wanted = expected if groups is not None else f"{expected[:2]} or {expected}"
        raise InputError(f"{where} has shape {shape}; this model and input need {names} = {wanted}")
    if _concrete(mask) and getattr(mask, "dtype", None) != jnp.bool_:
        values = np.asarray(mask)
        if values.size and not np.all((values == 0) | (values == 1)):
            bad = values[(values != 0) & (values != 1)].reshape(-1)[0].item()
            raise InputError(f"{where} must hold only 0 (drop) and 1 (keep); found {bad!r}")
