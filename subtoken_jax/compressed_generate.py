"""Generation from a compressed (packed) KV cache: greedy or sampled.

    compression = Compression(token_fraction=0.5, value_fraction=0.5, selector="snapkv")  # 37.5% of KV bytes
    tokens = compressed_generate(model, params, context_ids, question_ids=question_ids,
                                 compression=compression, max_new_tokens=32)

1. Prefill the context and capture what selectors read (`selectors.capture_prefill_state`; with
   question_ids the question's queries are the observation window: query-aware compression).
2. `compression(state) -> (token_keep_masks, group_masks)`: per-layer 0/1 masks (None, one array
   for all layers, or one per layer): tokens [B, P] / [B, P, Hkv], groups [B, P, Hkv, G].
   `compression.Compression` is the ready-made recipe (token selector, then value groups under a
   budget), `compression.JointCompression` the one that spends a single byte budget on keys and
   groups per token; any callable with that signature works.
3. Pack every layer (`packed_cache.pack_cache`); the dense prefill arrays are dropped.
4. The question (if any) runs as one chunk over the packed context, then the answer is decoded one
   token per step: both are `DecoderLM` itself applied with the PackedCache as its cache (each
   `Attention` writes the new keys/values to the dense tail and attends over the packed prefix and the
   tail with one softmax; layer_caches.PackedLayerCache), so there is one decoder for dense and
   compressed caches, and it matches DecoderLM on a dense cache under the equivalent masks.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from subtoken_jax import sharding
from subtoken_jax.compression import Compression, JointCompression
from subtoken_jax.errors import InputError
from subtoken_jax.input_checks import check_ids, check_max_new_tokens
from subtoken_jax.model import DecoderLM, default_positions
from subtoken_jax.packed_cache import IMPLS, LAYOUTS, PackedCache, bucketed_sizes, pack_cache, shard_cache
from subtoken_jax.sampling import check_sampling, hold_eos, pick_token
from subtoken_jax.selectors import PrefillState, capture_prefill_state, needs_context_queries, reconstruction_prompt
from subtoken_jax.shape_buckets import bucket_length, capacity_bucket, left_pad

# how the question reaches the answer: read over the compressed context (ours), or prefilled over the full context
# before compression and kept uncompressed (kvpress's question-aware protocol); see generate_from_state
QUESTION_OVER = ("compressed", "full")


def check_question_over(question_over: str) -> str:
    if question_over not in QUESTION_OVER:
        raise InputError(f"unknown question_over {question_over!r}; choose from {', '.join(QUESTION_OVER)}")
    return question_over


def packed_decode_step(model: DecoderLM, params, cache: PackedCache, token: jax.Array, position: jax.Array):
    """One decode step: token [B] at position [B] -> (logits [B, vocab] float32, updated cache).

    The decoder itself (`DecoderLM` over the PackedCache): the token's keys/values go to the dense
    tail, attention covers prefix + tail jointly (cache.impl picks the fixed-K attention).
    """
    logits, cache = model.apply({"params": params}, token[:, None], positions=position[:, None].astype(jnp.int32),
                                cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("model",))
def _feed(model, params, cache, tokens, positions):
    """Runs tokens [B, Q] at positions [B, Q] through the packed cache as one chunk; the last logits [B, vocab]."""
    logits, cache = model.apply({"params": params}, tokens, positions=positions, cache=cache, logits_to_keep=1)
    return logits[:, -1], shard_cache(cache)


@functools.partial(jax.jit, static_argnames=("model", "steps", "temperature", "top_k", "eos_id"))
def _decode(model, params, cache, token, position, done, rng, steps: int, temperature: float,
            top_k: Optional[int], eos_id: Optional[int]):
    """`steps` decode steps from `token` (already emitted) at `position`; returns the next tokens [B, steps]."""
    def step(carry, _):
        cache, token, position, done, rng = carry
        logits, cache = packed_decode_step(model, params, cache, token, position)
        cache = shard_cache(cache)  # keeps the carry's sharding fixed across steps
        rng, sub = jax.random.split(rng)
        token, done = hold_eos(pick_token(logits, sub, temperature, top_k), done, eos_id)
        return (cache, token, position + 1, done, rng), token

    carry, tokens = jax.lax.scan(step, (cache, token, position, done, rng), None, length=steps)
    return jnp.transpose(tokens), carry


def decode_chunks(steps: int, chunk: int, progress: bool):
    """How many decode steps each compiled scan runs: all in one, or (progress shown) chunks of `chunk`."""
    if not progress:
        return [steps] if steps else []
    return [min(chunk, steps - i) for i in range(0, steps, chunk)]


def on_active_mesh(model: DecoderLM, params, *arrays):
    """(params, *arrays) placed on the active mesh: params by the model's rules, arrays batch-split.

    Unchanged without a mesh. Arrays may be None.
    """
    if sharding.active_mesh() is None:
        return (params,) + arrays
    return (sharding.place_params(model, params),) + tuple(sharding.place_batch_leading(arrays))


def compressed_generate(model: DecoderLM, params, prompt_ids, *, compression: Callable, max_new_tokens: int,
                        question_ids=None, attention_mask=None, question_mask=None, return_cache: bool = False,
                        bucket: bool = False, mesh=None, **kwargs):
    """Generates max_new_tokens after prompt_ids [B, P] (+ question_ids [B, Q]) through a packed, compressed cache.

    compression(state: PrefillState) -> (token_keep_masks, group_masks), e.g. `Compression(...)`; it
    compresses the prompt (the context) only. With question_ids the question's queries guide query-aware
    selectors and the question then runs over the compressed context (question_over="full": the question's keys,
    values and logits from its prefill over the full context are kept instead, kvpress's protocol); without, the
    prompt's last logits (from the full prefill) give the first token. attention_mask / question_mask mark real tokens of
    left-padded rows. bucket: the prompt and the question are left-padded to bucketed lengths
    (`shape_buckets`; masked: `Compression` recipes and the tokens do not change) and the packed sizes
    bucketed (see `generate_from_state`), so a stream of prompts of many lengths shares compiled programs.
    Off by default: a custom `compression` callable then sees padding slots (positions -1) it must not count,
    and the packed cache holds up to twice the slots its masks need. kwargs: see `generate_from_state`.
    mesh: a `jax.sharding.Mesh` (e.g. `sharding.make_mesh(config.mesh)`) to run on; rows are split over its
    batch axes, params by the model's logical rules, and the packed cache by batch and KV head (no device
    gathers it). None: the mesh of an enclosing `sharding.use_mesh`, if any, else one device.
    Returns int32 [B, max_new_tokens] (and the PackedCache when return_cache).
    """
    if mesh is not None:
        with sharding.use_mesh(mesh, sharding.active_rules()):
            return compressed_generate(model, params, prompt_ids, compression=compression,
                                       max_new_tokens=max_new_tokens, question_ids=question_ids,
                                       attention_mask=attention_mask, question_mask=question_mask,
                                       return_cache=return_cache, bucket=bucket, **kwargs)
    prompt_ids = np.asarray(prompt_ids, np.int32)  # on the host: a cast on the device compiles per prompt length
    _check_lengths(model, prompt_ids, question_ids, max_new_tokens)
    question_over = check_question_over(kwargs.get("question_over", "compressed"))
    if question_over == "full" and question_ids is None:
        raise InputError("question_over='full' keeps the question as read over the full context: give question_ids")
    if bucket:
        # buckets never past the model's positions: a prompt that fits must not be refused for its bucket
        room = model.config.max_position_embeddings - max_new_tokens - getattr(compression, "lookahead", 0)
        prompt_len, question_len = prompt_ids.shape[1], 0 if question_ids is None else question_ids.shape[1]
        if question_ids is not None:
            question_len = max(question_len, min(bucket_length(question_len), room - prompt_len))
            question_ids, question_mask = left_pad(question_ids, question_mask, question_len)
        # two buckets per octave: the capture, the recipe and the packing each compile once per bucket, and a
        # compilation costs more than the padded tokens' compute (20 prompts of 20 lengths, bench/generate_stream.py)
        padded = max(prompt_len, min(capacity_bucket(prompt_len), room - question_len))
        prompt_ids, attention_mask = left_pad(prompt_ids, attention_mask, padded)
        kwargs.setdefault("bucket", True)
    params, prompt_ids, attention_mask, question_ids, question_mask = on_active_mesh(
        model, params, prompt_ids, attention_mask, question_ids, question_mask)
    window = getattr(compression, "window", 8)
    lookahead = getattr(compression, "lookahead", 0)  # capture_prefill_state refuses it without a question
    capture = _compiled_capture if bucket else capture_prefill_state
    state, logits = capture(model, params, prompt_ids, question_ids, context_mask=attention_mask,
                            question_mask=question_mask, window=min(window, prompt_ids.shape[1]), return_logits=True,
                            lookahead=lookahead, reconstruct=reconstruction_prompt(compression),
                            keep_context_queries=needs_context_queries(compression))
    masks = _compiled_compression(compression, state) if bucket else compression(state)
    kwargs.setdefault("value_fill", getattr(compression, "value_fill", "zero"))
    if question_over == "full":  # the state carries the question: pass nothing else
        tokens, packed = generate_from_state(model, params, state, masks, max_new_tokens=max_new_tokens, **kwargs)
    else:
        tokens, packed = generate_from_state(model, params, state, masks, max_new_tokens=max_new_tokens,
                                             question_ids=question_ids, question_mask=question_mask,
                                             first_logits=None if question_ids is not None else logits, **kwargs)
    return (tokens, packed) if return_cache else tokens


# With bucketed shapes, each stage before decoding runs as one compiled program per bucket: run op by op,
# the capture, the recipe and the packing compiled several hundred small programs over a stream of 20 prompts.
_compiled_capture = jax.jit(capture_prefill_state, static_argnames=(
    "model", "window", "with_attention", "chunk", "return_logits", "lookahead", "reconstruct",
    "keep_context_queries"))


@functools.partial(jax.jit, static_argnames=("compression",))
def _jitted_compression(compression, state):
    return compression(state)


def _compiled_compression(compression, state):
    """compression(state) as one compiled program for the package's own recipes (frozen, hashable, traceable);
    any other callable runs op by op (it may read masks on the host, or be a new object every call)."""
    if isinstance(compression, (Compression, JointCompression)) and isinstance(compression.scorer, str) \
            and isinstance(getattr(compression, "selector", ""), str):  # named parts: hashes by value
        return _jitted_compression(compression, state)
    return compression(state)


_compiled_pack = jax.jit(pack_cache, static_argnames=("layout", "tail_capacity", "capacity", "key_capacity", "k",
                                                       "fill", "impl"))


def _check_lengths(model, prompt_ids, question_ids, max_new_tokens):
    check_max_new_tokens(max_new_tokens)
    batch, prompt_len = check_ids(prompt_ids, "prompt_ids").shape
    question_len = 0
    if question_ids is not None:
        shape = jnp.shape(question_ids)
        if len(shape) != 2 or shape[0] != batch or shape[1] < 1:
            raise InputError(f"question_ids must be [batch={batch}, Q >= 1], got shape {shape}")
        question_len = shape[1]
    limit = model.config.max_position_embeddings
    if prompt_len + question_len + max_new_tokens > limit:
        raise InputError(f"prompt ({prompt_len}) + question ({question_len}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings={limit}")


def generate_from_state(model: DecoderLM, params, state: PrefillState, masks, *, max_new_tokens: int,
                        question_ids=None, question_mask=None, first_logits=None, temperature: float = 0.0,
                        top_k: Optional[int] = None, rng: Optional[jax.Array] = None, eos_id: Optional[int] = None,
                        layout: str = "global", capacity=None, key_capacity=None, k=None, impl: str = "auto",
                        progress: bool = False, chunk: int = 64, value_fill: str = "zero", bucket: bool = False,
                        question_over: str = "compressed"):
    """Packs a captured context under masks = (token_keep_masks, group_masks), then answers from it.

    question_over "compressed": the question_ids [B, Q] (left-padded rows: question_mask) run over the packed
    context first; without a question, first_logits [B, vocab] (the context's last logits) give the first token.
    "full" (kvpress's question-aware protocol): the question as the state's capture prefilled it over the full
    context (`state.question`: its keys and values go to the tail uncompressed, its last logits give the first
    token); give neither question_ids nor first_logits. layout "global"
    (any masks) or "fixed_k" (token masks, if any, [B, P]); capacity / key_capacity / k: packed sizes
    (None: from the masks; with bucket, the global layout's rounded up to powers of two and the dense tail to a
    `shape_buckets` length, so a stream of prompts compiles a bounded number of programs, at the cost of up to
    twice the packed slots; padding slots are never attended). value_fill: what a dropped group reads as
    ("zero" | "mean", see `pack_cache`).
    impl: attention for the fixed-K layout (and so how its values are stored, see `pack_cache`). temperature 0 is greedy; after eos_id
    a row keeps emitting eos_id. Returns (int32 [B, max_new_tokens], the final PackedCache).
    """
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if impl not in IMPLS:
        raise InputError(f"unknown attention impl {impl!r}; choose from {', '.join(IMPLS)}")
    if layout not in LAYOUTS:
        raise InputError(f"unknown packed layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if check_question_over(question_over) == "full":
        if state.question is None:
            raise InputError("question_over='full' answers after the question as prefilled over the full context: "
                             "capture the state with question_ids")
        if question_ids is not None or first_logits is not None:
            raise InputError("question_over='full' takes the question from the state: give neither question_ids "
                             "nor first_logits")
    elif (question_ids is None) == (first_logits is None):
        raise InputError("give exactly one of question_ids (run over the packed context) and first_logits")
    check_sampling(temperature, top_k, rng)
    cfg = model.config
    question_len = (state.question.positions.shape[1] if question_over == "full" else
                    0 if question_ids is None else question_ids.shape[1])
    token_masks, group_masks = masks
    cast = lambda arrays: tuple(a.astype(cfg.compute_dtype) for a in arrays)  # noqa: E731  capture keeps float32
    tail = question_len + max_new_tokens - 1
    if bucket:
        if layout == "global" and capacity is None and key_capacity is None:
            capacity, key_capacity = bucketed_sizes(token_masks, group_masks, state.positions)
        tail = bucket_length(tail)  # question and answer lengths vary per prompt
    sized = all(isinstance(size, int) for size in (capacity, key_capacity)) and layout == "global"
    pack = _compiled_pack if sized else pack_cache  # sizes known (bucketed or given): one program per size
    packed = pack(cast(state.keys), cast(state.values), state.positions, token_masks, group_masks, layout=layout,
                  tail_capacity=tail, capacity=capacity, key_capacity=key_capacity, k=k, fill=value_fill, impl=impl)
    if question_over == "full":
        question = state.question
        packed = packed.append_to_tail(cast(question.keys), cast(question.values), question.positions)
        first_logits = question.logits
    return answer_from_cache(model, params, packed, max_new_tokens=max_new_tokens, question_ids=question_ids,
                             question_mask=question_mask, first_logits=first_logits, temperature=temperature,
                             top_k=top_k, rng=rng, eos_id=eos_id, progress=progress, chunk=chunk)


def answer_from_cache(model: DecoderLM, params, packed: PackedCache, *, max_new_tokens: int, question_ids=None,
                      question_mask=None, first_logits=None, temperature: float = 0.0, top_k: Optional[int] = None,
                      rng: Optional[jax.Array] = None, eos_id: Optional[int] = None, progress: bool = False,
                      chunk: int = 64, compress_every: Optional[int] = None,
                      recompress: Optional[Callable] = None, window: int = 8):
    """The question (if any) over a packed context, then max_new_tokens decoded from it (see
    `generate_from_state`; the packed cache's tail must hold the question and max_new_tokens - 1 tokens).

    Decoding-time compression: with recompress, decoding runs compress_every steps at a time (the tail must hold
    the question and compress_every tokens) and between them `recompress(packed, queries, query_positions)` (the
    last `window` decoded tokens' queries per layer [B, W, Hq, D] and positions [B, W]) returns the cache to go on
    with (`chunked_prefill` packs prefix + tail into a new prefix under the recipe's budget).
    Returns (int32 [B, max_new_tokens], the final PackedCache)."""
    batch = packed.prefix_end.shape[0]
    question_len = 0 if question_ids is None else question_ids.shape[1]
    needed = max_new_tokens - 1 if recompress is None else min(int(compress_every), max_new_tokens - 1)
    used = int(packed.tail_index)  # e.g. a question prefilled over the full context (question_over="full")
    if used + question_len + needed > packed.tail_capacity:
        raise InputError(f"a question of {question_len} and {max_new_tokens} new tokens do not fit the packed "
                         f"cache's tail of {packed.tail_capacity}" + (f" ({used} slots already used)" if used else ""))
    packed = jax.jit(shard_cache)(packed) if sharding.active_mesh() is not None else packed
    next_position = packed.next_position  # after the prefix, or after tokens already in the tail
    logits = first_logits
    if question_ids is not None:
        q_mask = jnp.ones((batch, question_len), jnp.int32) if question_mask is None else \
            jnp.asarray(question_mask, jnp.int32)
        # left padding: pad slots get position -1, so they are never attended and attend to nothing
        positions = default_positions(question_ids, q_mask, next_position[:, None])
        logits, packed = _feed(model, params, packed, jnp.asarray(question_ids, jnp.int32), positions)
        next_position = next_position + jnp.sum(q_mask, axis=1).astype(jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    rng, first_rng = jax.random.split(rng)
    token, done = hold_eos(pick_token(logits, first_rng, temperature, top_k), jnp.zeros((batch,), bool), eos_id)
    pieces = [token[:, None]]
    remaining = max_new_tokens - 1
    if recompress is None:
        sizes = decode_chunks(remaining, chunk, progress)
    else:
        sizes = [min(int(compress_every), remaining - i) for i in range(0, remaining, int(compress_every))]
    with tqdm(total=max_new_tokens, desc="generate (compressed)", disable=not progress, leave=False) as bar:
        bar.update(1)
        for i, steps in enumerate(sizes):
            rng, step_rng = jax.random.split(rng)
            args = (model, params, packed, token, next_position, done, step_rng, steps, float(temperature), top_k,
                    eos_id)
            if recompress is None:
                tokens, (packed, token, next_position, done, _) = _decode(*args)
            else:
                tokens, (packed, token, next_position, done, _), queries, q_positions = _decode_observed(
                    *args, min(window, steps))
                if i + 1 < len(sizes):
                    packed = recompress(packed, queries, q_positions)
            pieces.append(tokens)
            bar.update(steps)
    return jnp.concatenate(pieces, axis=1), packed


@functools.partial(jax.jit, static_argnames=("model", "steps", "temperature", "top_k", "eos_id", "window"))
def _decode_observed(model, params, cache, token, position, done, rng, steps: int, temperature: float,
                     top_k: Optional[int], eos_id: Optional[int], window: int):
    """`_decode`, also returning the last `window` steps' queries per layer [B, W, Hq, D] and positions [B, W]."""
    layers = model.config.num_layers

    def step(carry, _):
        cache, token, position, done, rng = carry
        (logits, cache), variables = model.apply({"params": params}, token[:, None],
                                                 positions=position[:, None].astype(jnp.int32), cache=cache,
                                                 mutable=["prefill"])
        queries = tuple(variables["prefill"][f"layer_{i}"]["attn"]["queries"][0][:, 0] for i in range(layers))
        rng, sub = jax.random.split(rng)
        next_token, done = hold_eos(pick_token(logits[:, -1], sub, temperature, top_k), done, eos_id)
        return (shard_cache(cache), next_token, position + 1, done, rng), (next_token, queries, position)

    carry, (tokens, queries, positions) = jax.lax.scan(step, (cache, token, position, done, rng), None, length=steps)
    window_queries = tuple(jnp.swapaxes(q[-window:], 0, 1) for q in queries)
    return jnp.transpose(tokens), carry, window_queries, jnp.transpose(positions[-window:]).astype(jnp.int32)
