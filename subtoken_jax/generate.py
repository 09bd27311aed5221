"""Autoregressive generation through the KV cache (greedy or sampled)."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from subtoken_jax.errors import InputError
from subtoken_jax.kv_cache import KVCache
from subtoken_jax.model import DecoderLM


@functools.partial(jax.jit, static_argnames=("model",))
def _forward_with_cache(model: DecoderLM, params, ids, cache, attention_mask=None, value_group_mask=None,
                        token_keep_mask=None):
    return model.apply({"params": params}, ids, cache=cache, attention_mask=attention_mask,
                       value_group_mask=value_group_mask, token_keep_mask=token_keep_mask)


def _pick(logits, rng, temperature: float, top_k: Optional[int]):
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def generate(model: DecoderLM, params, prompt_ids, *, max_new_tokens: int, attention_mask=None,
             temperature: float = 0.0, top_k: Optional[int] = None, rng: Optional[jax.Array] = None,
             eos_id: Optional[int] = None, progress: bool = False):
    """Generates max_new_tokens after prompt_ids [B, T] (left-pad ragged prompts and pass attention_mask).

    Returns int32 [B, max_new_tokens]; after an EOS a row keeps emitting EOS. temperature 0 is greedy.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    batch, prompt_len = prompt_ids.shape
    capacity = prompt_len + max_new_tokens
    if capacity > model.config.max_position_embeddings:
        raise InputError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    if temperature > 0 and rng is None:
        raise InputError("sampling (temperature > 0) needs an rng key")
    rng = rng if rng is not None else jax.random.key(0)
    cache = KVCache.create(model.config, batch, capacity)
    logits, cache = _forward_with_cache(model, params, prompt_ids, cache, attention_mask)
    tokens = []
    done = jnp.zeros((batch,), bool)
    next_logits = logits[:, -1]
    for _ in tqdm(range(max_new_tokens), desc="generate", disable=not progress, leave=False):
        rng, step_rng = jax.random.split(rng)
        token = _pick(next_logits, step_rng, temperature, top_k)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        logits, cache = _forward_with_cache(model, params, token[:, None], cache)
        next_logits = logits[:, -1]
    return jnp.stack(tokens, axis=1)
