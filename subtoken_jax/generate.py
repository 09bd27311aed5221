"""Autoregressive generation through the KV cache (greedy or sampled), optionally from a compressed cache."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from subtoken_jax import sharding
from subtoken_jax.chunked_prefill import chunked_compressed_generate
from subtoken_jax.compressed_generate import compressed_generate, decode_chunks, on_active_mesh
from subtoken_jax.errors import InputError
from subtoken_jax.input_checks import check_ids, check_max_new_tokens
from subtoken_jax.kv_cache import KVCache, TailedKVCache
from subtoken_jax.model import DecoderLM
from subtoken_jax.sampling import check_sampling, hold_eos, pick_token
from subtoken_jax.shape_buckets import full_prefill_plan, left_pad


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill_chunk(model: DecoderLM, params, ids, positions, cache):
    """One chunk of a prompt written into the cache at explicit positions (-1 = padding); last logits [B, V]."""
    logits, cache = model.apply({"params": params}, ids, positions=positions, cache=cache, logits_to_keep=1)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("model",))
def _forward_with_cache(model: DecoderLM, params, ids, cache, attention_mask=None, value_group_mask=None,
                        token_keep_mask=None):
    """(the last position's logits [B, 1, vocab], the cache with ids written)."""
    return model.apply({"params": params}, ids, cache=cache, attention_mask=attention_mask,
                       value_group_mask=value_group_mask, token_keep_mask=token_keep_mask, logits_to_keep=1)


def decode_full_cache(model: DecoderLM, params, cache: KVCache, token, done, rng, steps: int, temperature: float = 0.0,
                      top_k: Optional[int] = None, eos_id: Optional[int] = None):
    """`steps` decode steps over a full KVCache from `token` [B] (already emitted), as one compiled scan.

    Returns (next tokens int32 [B, steps], (cache, last token, done, rng)). One program per `steps`, and no
    host round trip per token (a Python loop of single steps pays one dispatch per token and layer call).
    The loop writes to a `TailedKVCache` (the cache itself read-only) and moves the tail in at the end.
    """
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + steps > cache.capacity:
        raise InputError(f"{steps} decode steps do not fit a KV cache of capacity {cache.capacity} holding "
                         f"{int(cache.index)} slots")
    return _decode_full_cache(model, params, cache, token, done, rng, steps, temperature, top_k, eos_id)


@functools.partial(jax.jit, static_argnames=("model", "steps", "temperature", "top_k", "eos_id"))
def _decode_full_cache(model, params, cache, token, done, rng, steps, temperature, top_k, eos_id):
    tailed = cache.group_masks is None  # a routed model's cache also carries group masks: decoded in place
    if tailed:
        cache = TailedKVCache.open(cache, steps)

    def step(carry, _):
        cache, token, done, rng = carry
        logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
        rng, sub = jax.random.split(rng)
        token, done = hold_eos(pick_token(logits[:, -1], sub, temperature, top_k), done, eos_id)
        return (cache, token, done, rng), token

    (cache, token, done, rng), tokens = jax.lax.scan(step, (cache, token, done, rng), None, length=steps)
    return jnp.transpose(tokens), (cache.close() if tailed else cache, token, done, rng)


def generate(model: DecoderLM, params, prompt_ids, *, max_new_tokens: int, attention_mask=None,
             temperature: float = 0.0, top_k: Optional[int] = None, rng: Optional[jax.Array] = None,
             eos_id: Optional[int] = None, progress: bool = False, compression=None, question_ids=None,
             question_mask=None, bucket: Optional[bool] = None, mesh=None, chunk: int = 64,
             prefill_chunk: Optional[int] = None, compress_every: Optional[int] = None, observe_question: bool = False,
             cache_capacity: Optional[int] = None, **compressed_kwargs):
    """Generates max_new_tokens after prompt_ids [B, T] (left-pad ragged prompts and pass attention_mask).

    Returns int32 [B, max_new_tokens]; after an EOS a row keeps emitting EOS. temperature 0 is greedy.
    compression (a `Compression` or any callable of the prefill state, see compressed_generate.py):
    the prompt's KV cache is compressed and packed after prefill, and question_ids [B, Q] (optional)
    then run over it uncompressed before the answer (left-padded rows: question_mask); compressed_kwargs
    go to `generate_from_state` (layout, impl, capacity, chunk, ...). Without compression, question_ids
    are simply appended to the prompt. bucket: prompts of many lengths share compiled programs; padding is
    masked and changes no token. The full cache: the prompt is left-padded to whole chunks of
    `shape_buckets.PREFILL_CHUNK` tokens (short prompts: to their bucket) and prefilled chunk by chunk into a
    cache of one of two capacities per octave, so one chunk program and one decode program serve every prompt
    whose cache falls in a capacity; cache_capacity pins that capacity for every prompt (rounded up to 128 slots;
    too small for a prompt: an InputError), so a stream of prompts up to it compiles one chunk program and one
    decode program in all, for a cache of that size throughout (`bench/generate_stream.py --pin-capacity`).
    With compression: see `compressed_generate`. None: on for the full cache,
    off with compression. mesh: a `jax.sharding.Mesh` to run on (rows over its batch axes, params by
    the model's logical rules, the cache by batch and KV head); None: an enclosing `sharding.use_mesh`'s, if any.
    chunk: decode steps per compiled scan when progress is shown (without progress, one scan decodes them all).
    prefill_chunk: with compression, the prompt is prefilled this many tokens at a time and compressed after each
    chunk, so the cache never holds more than the budget plus one chunk (`chunked_prefill`; the recipe needs
    scope="head"); observe_question: every chunk is observed through the question, not only the last (when the
    question is known before the context is read). compress_every: with compression, the tokens decoded are compressed into the packed cache
    every this many steps under the same recipe (with a token-count budget, memory stays bounded however long
    the generation; see `chunked_prefill.chunked_compressed_generate`).
    """
    if mesh is not None:
        with sharding.use_mesh(mesh, sharding.active_rules()):
            return generate(model, params, prompt_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                            temperature=temperature, top_k=top_k, rng=rng, eos_id=eos_id, progress=progress,
                            compression=compression, question_ids=question_ids, question_mask=question_mask,
                            bucket=bucket, chunk=chunk, prefill_chunk=prefill_chunk, compress_every=compress_every,
                            observe_question=observe_question, cache_capacity=cache_capacity,
                            **compressed_kwargs)
    check_ids(prompt_ids, "prompt_ids")
    if cache_capacity is not None:
        if compression is not None or bucket is False:
            raise InputError("cache_capacity pins the full cache of a bucketed generate: not with compression= or "
                             "bucket=False")
        if isinstance(cache_capacity, bool) or not isinstance(cache_capacity, (int, np.integer)) or cache_capacity < 1:
            raise InputError(f"cache_capacity must be a positive number of cache slots, got {cache_capacity!r}")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if observe_question and prefill_chunk is None:
        raise InputError("observe_question observes each prefill chunk through the question: give prefill_chunk")
    if prefill_chunk is not None or compress_every is not None:
        if compression is None:
            raise InputError("prefill_chunk / compress_every compress as they go: give them with compression=...")
        if compressed_kwargs:
            raise InputError(f"{', '.join(sorted(compressed_kwargs))} do not apply with prefill_chunk / "
                             "compress_every (the global layout, sized from the masks)")
        chunk_size = prefill_chunk if prefill_chunk is not None else np.shape(prompt_ids)[1]
        return chunked_compressed_generate(model, params, prompt_ids, compression=compression,
                                           chunk_size=chunk_size, max_new_tokens=max_new_tokens,
                                           compress_every=compress_every,
                                           question_ids=question_ids, attention_mask=attention_mask,
                                           question_mask=question_mask, temperature=temperature, top_k=top_k,
                                           rng=rng, eos_id=eos_id, progress=progress, chunk=chunk,
                                           bucket=bool(bucket), observe_question=observe_question)[0]
    if compression is not None:
        return compressed_generate(model, params, prompt_ids, compression=compression, max_new_tokens=max_new_tokens,
                                   question_ids=question_ids, attention_mask=attention_mask, question_mask=question_mask,
                                   temperature=temperature, top_k=top_k, rng=rng, eos_id=eos_id, progress=progress,
                                   bucket=bool(bucket), chunk=chunk, **compressed_kwargs)
    if compressed_kwargs:
        raise InputError(f"{', '.join(sorted(compressed_kwargs))} apply only with compression=...")
    # joined on the host: on the device, every distinct prompt length would compile its own concatenation
    prompt_ids = np.asarray(prompt_ids, np.int32)
    if question_ids is not None:
        check_ids(question_ids, "question_ids")
        question_ids = np.asarray(question_ids, np.int32)
        if attention_mask is not None or question_mask is not None:
            context_mask = np.ones(prompt_ids.shape, np.int32) if attention_mask is None else attention_mask
            q_mask = np.ones(question_ids.shape, np.int32) if question_mask is None else question_mask
            attention_mask = np.concatenate([np.asarray(context_mask, np.int32), np.asarray(q_mask, np.int32)],
                                            axis=1)
        prompt_ids = np.concatenate([prompt_ids, question_ids], axis=1)
    batch, prompt_len = prompt_ids.shape
    capacity = prompt_len + max_new_tokens
    if capacity > model.config.max_position_embeddings:
        raise InputError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    check_sampling(temperature, top_k, rng)
    rng = rng if rng is not None else jax.random.key(0)
    if bucket is None or bucket:
        # a bounded number of programs for prompts of any length: the prompt left-padded to whole chunks, prefilled
        # chunk by chunk into a cache of a coarse capacity bucket (shape_buckets.full_prefill_plan)
        padded, chunk_len, capacity = full_prefill_plan(prompt_len, max_new_tokens,
                                                        model.config.max_position_embeddings,
                                                        cache_capacity)
        ids, mask = left_pad(prompt_ids, attention_mask, padded, on_host=True)
        if not mask.any(axis=1).all():
            raise InputError("attention_mask marks no real token in some prompt row: every row needs one")
        positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)  # default_positions
        params, = on_active_mesh(model, params)
        cache = KVCache.create(model.config, batch, capacity)
        for start in range(0, padded, chunk_len):
            if not mask[:, start:start + chunk_len].any():  # padding only: nothing to write
                continue
            # sliced on the host: a slice of a device array compiles per offset
            piece, piece_positions = sharding.place_batch_leading((ids[:, start:start + chunk_len],
                                                                   positions[:, start:start + chunk_len]))
            last_logits, cache = _prefill_chunk(model, params, piece, piece_positions, cache)
    else:
        params, prompt_ids, attention_mask = on_active_mesh(model, params, prompt_ids, attention_mask)
        cache = KVCache.create(model.config, batch, capacity)
        logits, cache = _forward_with_cache(model, params, prompt_ids, cache, attention_mask)
        last_logits = logits[:, -1]
    rng, first_rng = jax.random.split(rng)
    token, done = hold_eos(pick_token(last_logits, first_rng, temperature, top_k), jnp.zeros((batch,), bool),
                           eos_id)
    pieces = [token[:, None]]
    remaining = max_new_tokens - 1
    sizes = decode_chunks(remaining, chunk, progress)  # with progress, chunks of `chunk` (two programs at most)
    with tqdm(total=max_new_tokens, desc="generate", disable=not progress, leave=False) as bar:
        bar.update(1)
        for steps in sizes:
            tokens, (cache, token, done, rng) = decode_full_cache(model, params, cache, token, done, rng, steps,
                                                                  float(temperature), top_k, eos_id)
            pieces.append(tokens)
            bar.update(steps)
    return jnp.concatenate(pieces, axis=1)
