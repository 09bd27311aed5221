"""Picking the next token from logits: greedy, or sampled with temperature and optional top-k."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError


def check_sampling(temperature: float, top_k: Optional[int], rng) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1 or None, got {top_k}")
    if temperature > 0 and rng is None:
        raise InputError("sampling (temperature > 0) needs an rng key")


def pick_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: Optional[int]) -> jax.Array:
    """logits [B, vocab] -> int32 [B]; temperature 0 is argmax (rng unused)."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def hold_eos(token: jax.Array, done: jax.Array, eos_id: Optional[int]):
    """After a row has emitted eos_id it keeps emitting it: returns (token, done) after this step."""
    if eos_id is None:
        return token, done
    token = jnp.where(done, eos_id, token)
    return token, done | (token == eos_id)
