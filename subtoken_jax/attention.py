"""Grouped-query attention whose value read-out can be sparsified per (token, KV head, value group).

`attend` is a pure function usable from any Flax model; `Attention` is the linen module of the decoder,
with optional LoRA on q/k/v/o, rotary embeddings and an explicit KV cache for incremental decoding.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from subtoken_jax import sharding
from subtoken_jax.errors import InputError
from subtoken_jax.input_checks import check_mask
from subtoken_jax.layers import apply_rope, rope_inverse_frequencies
from subtoken_jax.lora import LoRADense
from subtoken_jax.model_config import ModelConfig
from subtoken_jax.value_groups import group_norm_scores, mask_values, realised_budget, route_value_groups


def attention_allowed(q_positions, kv_positions, *, sliding_window: Optional[int] = None,
                      token_keep_mask: Optional[jax.Array] = None) -> jax.Array:
    """Which keys each query may attend to: [batch, kv_heads|1, 1, q_len, kv_len] booleans.

    kv_positions [batch, kv_len], or [batch, kv_heads, kv_len] when each KV head holds its own slots
    (the packed cache's compacted keys). A kv slot with a negative position is empty (padding or
    unused cache). Causal by positions; a sliding window of w lets query i see keys i-w+1..i (Hugging
    Face's convention). token_keep_mask ([batch, kv_len] or [batch, kv_len, kv_heads]) evicts whole tokens.
    """
    q = q_positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
    kv = kv_positions[:, None, None, None, :] if kv_positions.ndim == 2 else kv_positions[:, :, None, None, :]
    allowed = (kv >= 0) & (kv <= q)  # [B, 1 or Hkv, 1, T, S]
    if sliding_window is not None:
        allowed &= (q - kv) < sliding_window
    if token_keep_mask is not None:
        keep = token_keep_mask.astype(bool)
        if keep.ndim == 2:
            keep = keep[:, None, None, None, :]
        elif keep.ndim == 3:
            keep = jnp.transpose(keep, (0, 2, 1))[:, :, None, None, :]
        else:
            raise InputError(f"token keep mask must be [batch, kv_len] or [batch, kv_len, kv_heads], got {keep.shape}")
        allowed = allowed & keep
    return allowed


# Queries are processed in chunks of this many rows once there are more than QUERY_CHUNK_FROM of them:
# the [rows, kv_len] score block of a chunk stays in cache, where one [q_len, kv_len] block per head is
# tens of MB at q_len = kv_len = 1024 and its softmax becomes memory bound (measured on the CPU backend:
# a 1024-token forward of bench/vs_reference.py's model takes 0.56x the time with 128-row chunks).
QUERY_CHUNK = 128
QUERY_CHUNK_FROM = 512
# A causal prefill's chunk c can only see the first (c + 1) * QUERY_CHUNK key slots, so the chunks run in up to
# CAUSAL_TIERS tiers, each scored against only the key slots its last chunk can see (SmolLM2's 2,048-token forward
# on 2 CPU cores: 0.59x the time of scoring every chunk against every slot; bench/smollm2_vs_transformers.py).
# CAUSAL_TIERS = 1 turns the tiers off: its one tier sees only the slots its last chunk can see, which may be
# fewer than the cache holds, and `attend` scores every chunk against every slot whenever there is one tier.
CAUSAL_TIERS = 8


def attend(query, key, value, allowed, *, value_group_mask: Optional[jax.Array] = None,
           return_weights: bool = False, query_chunk: Optional[int] = None):
    """softmax(q k^T / sqrt(d)) (v * group mask), with grouped-query heads.

    query [B, T, Hq, D]; key, value [B, S, Hkv, D]; allowed from `attention_allowed`;
    value_group_mask [B, S, Hkv, G]. Softmax runs in float32. Rows with no allowed key give zeros.
    Queries run in chunks of query_chunk rows when there are more (default None: chunks of QUERY_CHUNK
    beyond QUERY_CHUNK_FROM rows; 0: never), with the same result. When no query row may see a key slot
    beyond its own row index (a causal prefill into slots 0..T-1: checked at run time, not assumed), the
    chunks skip the slots none of their rows can see.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    if num_heads % num_kv_heads:
        raise InputError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    value = mask_values(value, value_group_mask)
    threshold = QUERY_CHUNK_FROM if query_chunk is None else query_chunk
    query_chunk = QUERY_CHUNK if query_chunk is None else query_chunk
    if return_weights or not query_chunk or q_len <= max(query_chunk, threshold):
        return _attend_block(query, key, value, allowed, return_weights)
    chunks = -(-q_len // query_chunk)
    pad = chunks * query_chunk - q_len
    allowed = jnp.broadcast_to(allowed, allowed.shape[:3] + (q_len, key.shape[1]))
    # padded query rows attend to nothing (zeros) and are cut off below
    query = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0)))
    allowed = jnp.pad(allowed, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    tiers = causal_tiers(chunks, query_chunk, key.shape[1])
    every_slot = [(0, chunks, key.shape[1])]
    if len(tiers) == 1:
        out = _attend_chunks(query, key, value, allowed, query_chunk, every_slot)
    else:
        out = jax.lax.cond(sees_past_tiers(allowed, tiers, query_chunk),
                           lambda: _attend_chunks(query, key, value, allowed, query_chunk, every_slot),
                           lambda: _attend_chunks(query, key, value, allowed, query_chunk, tiers))
    return out[:, :q_len]


def causal_tiers(chunks: int, chunk: int, slots: int):
    """[(first chunk, end chunk, key slots its rows may see)]: up to CAUSAL_TIERS runs of query chunks, each seeing
    the key slots up to its last chunk's last row (one run when every tier would see every slot)."""
    per = -(-chunks // min(CAUSAL_TIERS, chunks))
    tiers = [(start, min(chunks, start + per), min(slots, min(chunks, start + per) * chunk))
             for start in range(0, chunks, per)]
    while len(tiers) > 1 and tiers[-2][2] == slots:  # the tiers that see every slot run as one
        tiers[-2:] = [(tiers[-2][0], chunks, slots)]
    return tiers


def sees_past_tiers(allowed, tiers, chunk: int) -> jax.Array:
    """Whether any query row of `allowed` [..., rows, slots] may see a key slot beyond its tier's (then every chunk
    must score every slot): a scalar boolean, computed on the device."""
    return jnp.any(jnp.stack([jnp.any(allowed[..., start * chunk:end * chunk, slots:]) for start, end, slots in tiers]))


def _attend_chunks(query, key, value, allowed, chunk: int, tiers):
    """`_attend_block` over query chunks of `chunk` rows, tier by tier against the first `slots` key slots."""
    batch, _, num_heads, head_dim = query.shape
    outs = []
    for start, end, slots in tiers:
        rows = slice(start * chunk, end * chunk)
        q = jnp.moveaxis(query[:, rows].reshape(batch, end - start, chunk, num_heads, head_dim), 1, 0)
        seen = allowed[..., rows, :slots]
        seen = jnp.moveaxis(seen.reshape(seen.shape[:3] + (end - start, chunk, slots)), 3, 0)
        out = jax.lax.map(lambda qa: _attend_block(qa[0], key[:, :slots], value[:, :slots], qa[1], False), (q, seen))
        outs.append(jnp.moveaxis(out, 0, 1).reshape(batch, (end - start) * chunk, num_heads, head_dim))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


# Decode on the CPU backend: a dot over a token-major [B, S, Hkv, D] cache with the KV head as batch
# axis makes XLA copy the whole cache head-major first, which costs several times the dot itself.
# For a few query rows it is cheaper to run one [S, Hkv * D] x [Hkv * D, rows] dot against block-
# diagonal queries (Hkv times the multiply-adds, no copy) and keep the diagonal blocks: at 32k tokens,
# 8 KV heads, 32 query heads on 2 CPU cores, a decode step's attention takes 0.30x the time
# (bench/kv_cache.py: "dense (KVCache layout)" against its "plain einsum" row).
BLOCK_DIAGONAL_MAX_ROWS = 64  # most Tq * Hq query rows per batch row for that form


def _use_block_diagonal(rows: int, kv_heads: int) -> bool:
    # not with KV heads split over devices: the one dot mixes every KV head, so each device would gather them
    return (jax.default_backend() == "cpu" and kv_heads > 1 and rows <= BLOCK_DIAGONAL_MAX_ROWS
            and sharding.split_ways("kv_heads", kv_heads) == 1)


def grouped_scores(q5: jax.Array, key: jax.Array) -> jax.Array:
    """q5 [B, Tq, Hkv, R, D] . key [B, S, Hkv, D] -> unscaled scores [B, Hkv, R, Tq, S]."""
    batch, q_len, kv_heads, reps, dim = q5.shape
    if not _use_block_diagonal(q_len * kv_heads * reps, kv_heads):
        return jnp.einsum("btkrd,bskd->bkrts", q5, key)
    eye = jnp.eye(kv_heads, dtype=q5.dtype)
    q_blocks = jnp.einsum("hi,bthrd->bidhrt", eye, q5).reshape(batch, kv_heads * dim, kv_heads * reps * q_len)
    # the cache stays the dot's left operand ([S, Hkv * D] as stored); only the small result is transposed
    scores = jnp.einsum("bsx,bxy->bsy", key.reshape(batch, key.shape[1], kv_heads * dim), q_blocks)
    return jnp.swapaxes(scores, 1, 2).reshape(batch, kv_heads, reps, q_len, key.shape[1])


def grouped_readout(weights: jax.Array, value: jax.Array) -> jax.Array:
    """weights [B, Hkv, R, Tq, S] . value [B, S, Hkv, D] -> [B, Tq, Hkv, R, D]."""
    batch, kv_heads, reps, q_len, length = weights.shape
    dim = value.shape[-1]
    if not _use_block_diagonal(q_len * kv_heads * reps, kv_heads):
        return jnp.einsum("bkrts,bskd->btkrd", weights, value)
    every = jnp.einsum("bys,bsx->byx", weights.reshape(batch, kv_heads * reps * q_len, length),
                       value.reshape(batch, length, kv_heads * dim))
    every = every.reshape(batch, kv_heads, reps, q_len, kv_heads, dim)
    heads = jnp.arange(kv_heads)
    out = every[:, heads, :, :, heads]  # [Hkv, B, R, Tq, D]: the diagonal blocks (selected, not multiplied)
    return jnp.transpose(out, (1, 3, 0, 2, 4))


def _attend_block(query, key, value, allowed, return_weights: bool):
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    q = query.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = grouped_scores(q, key).astype(jnp.float32) * (head_dim ** -0.5)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = jnp.where(allowed, weights, 0.0)  # fully masked rows: zeros, not a uniform average
    out = grouped_readout(weights.astype(value.dtype), value)
    out = out.reshape(batch, q_len, num_heads, head_dim)
    return (out, weights) if return_weights else out


def attend_cache_and_chunk(query, cache_keys, cache_values, cache_allowed, chunk_keys, chunk_values, chunk_allowed):
    """One softmax over a cache's slots and a chunk that is being written into its empty slots.

    Equals `attend` over the cache with the chunk written in, but reads the cache as it was before the
    write, so XLA keeps the written copy out of the attention's dots: attending over the freshly written
    cache made it materialise a copy of every layer's cache per call (one SmolLM2 decode step at 4k tokens
    on CPU: 76 ms, against 29 ms this way).
    query [B, T, Hq, D]; cache_* [B, S, Hkv, D] with cache_allowed [B, 1, 1, T, S]; chunk_* [B, T, Hkv, D]
    with chunk_allowed [B, 1, 1, T, T]. No value-group or token masks (use `attend` for those).
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_heads = cache_keys.shape[2]
    q = query.reshape(batch, q_len, kv_heads, num_heads // kv_heads, head_dim)
    scores = jnp.concatenate([grouped_scores(q, cache_keys), grouped_scores(q, chunk_keys)], axis=-1)
    scores = scores.astype(jnp.float32) * (head_dim ** -0.5)
    shape = scores.shape[:1] + (1, 1) + scores.shape[3:4]
    allowed = jnp.concatenate([jnp.broadcast_to(cache_allowed, shape + cache_keys.shape[1:2]),
                               jnp.broadcast_to(chunk_allowed, shape + chunk_keys.shape[1:2])], axis=-1)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jnp.where(allowed, jax.nn.softmax(scores, axis=-1), 0.0).astype(cache_values.dtype)
    slots = cache_keys.shape[1]
    out = grouped_readout(weights[..., :slots], cache_values) + grouped_readout(weights[..., slots:], chunk_values)
    return out.reshape(batch, q_len, num_heads, head_dim)


def attend_written_blocks(query, q_positions, keys, values, kv_positions, written, *, block: int,
                          sliding_window: Optional[int] = None):
    """`attend` over only the first `written` slots of a cache, `block` slots at a time (one online softmax).

    A prefill chunk written into a cache of a coarse capacity bucket would otherwise score every slot of the
    capacity, empty ones included (up to 1.5x the prompt, and twice the causal work); this loop stops after the
    blocks written so far, whatever the capacity, so one compiled program serves every chunk of a capacity.
    query [B, T, Hq, D], q_positions [B, T]; keys / values [B, S, Hkv, D] with S a multiple of `block`,
    kv_positions [B, S] (-1 empty); written: scalar, the slots filled (the chunk included). No masks.
    """
    batch, q_len, num_heads, head_dim = query.shape
    slots, kv_heads = keys.shape[1], keys.shape[2]
    if slots % block:
        raise ValueError(f"cache slots {slots} are not a multiple of block {block}")
    reps = num_heads // kv_heads
    q = query.reshape(batch, q_len, kv_heads, reps, head_dim)
    floor = jnp.finfo(jnp.float32).min

    def body(i, carry):
        top, total, acc = carry  # running max / sum [B, Hkv, R, T], unnormalised output [B, T, Hkv, R, D]
        start = i * block
        k = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=1).astype(query.dtype)
        v = jax.lax.dynamic_slice_in_dim(values, start, block, axis=1).astype(query.dtype)
        allowed = attention_allowed(q_positions, jax.lax.dynamic_slice_in_dim(kv_positions, start, block, axis=1),
                                    sliding_window=sliding_window)
        allowed &= (start + jnp.arange(block)) < written  # the last block's slots past `written`
        scores = jnp.where(allowed, grouped_scores(q, k).astype(jnp.float32) * (head_dim ** -0.5), floor)
        new_top = jnp.maximum(top, scores.max(axis=-1))
        weights = jnp.where(allowed, jnp.exp(scores - new_top[..., None]), 0.0)
        rescale = jnp.exp(top - new_top)
        total = total * rescale + weights.sum(axis=-1)
        rescale_out = jnp.transpose(rescale, (0, 3, 1, 2))[..., None]  # [B, T, Hkv, R, 1]
        acc = acc * rescale_out + grouped_readout(weights.astype(v.dtype), v).astype(jnp.float32)
        return new_top, total, acc

    stats = jnp.full((batch, kv_heads, reps, q_len), floor, jnp.float32)
    init = (stats, jnp.zeros_like(stats), jnp.zeros((batch, q_len, kv_heads, reps, head_dim), jnp.float32))
    count = (jnp.minimum(written, slots) + block - 1) // block
    _, total, acc = jax.lax.fori_loop(0, count, body, init)
    total = jnp.transpose(total, (0, 3, 1, 2))[..., None]
    out = jnp.where(total > 0, acc / jnp.where(total > 0, total, 1.0), 0.0)  # fully masked rows: zeros
    return out.reshape(batch, q_len, num_heads, head_dim).astype(query.dtype)


class Attention(nn.Module):
    """Self-attention of one decoder layer (GQA, RoPE, optional sliding window, LoRA, KV cache)."""

    config: ModelConfig
    layer_index: int = 0

    def setup(self):
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim

        def dense(name, features, axes, bias):
            return LoRADense(features=features, axes=axes, use_bias=bias,
                             lora=cfg.lora if cfg.lora.applies_to(name) else None,
                             dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, name=name)

        self.q = dense("q", (heads, head_dim), ("embed", "heads", "head_dim"), cfg.qkv_bias)
        self.k = dense("k", (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), cfg.qkv_bias)
        self.v = dense("v", (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), cfg.qkv_bias)
        self.o = dense("o", (cfg.hidden_size,), ("heads", "head_dim", "embed"), cfg.o_bias)
        if cfg.routing.enabled and cfg.routing.scorer == "router":
            self.value_router = nn.Dense(kv_heads * cfg.value_groups, dtype=jnp.float32, param_dtype=jnp.float32,
                                         kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                                  ("embed", "router")),
                                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("router",)),
                                         name="value_router")
        self.inv_freq = rope_inverse_frequencies(head_dim, cfg.rope_theta,
                                                 dict(cfg.rope_scaling) if cfg.rope_scaling else None)

    def project_kv(self, x, positions, deterministic: bool = True):
        """Keys (rotated) and values of x: each [B, T, Hkv, D]."""
        key = apply_rope(self.k(x, deterministic=deterministic), positions, self.inv_freq)
        value = self.v(x, deterministic=deterministic)
        key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "head_dim"))
        value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "head_dim"))
        return key, value

    def route(self, x, value, positions, budget, prefix_stats=None):
        """Query-independent value-group mask of these tokens: (mask [B, T, Hkv, G], adaptive stats)."""
        cfg = self.config
        batch, length, kv_heads, _ = value.shape
        groups = cfg.value_groups
        scorer = cfg.routing.scorer
        if scorer == "random":  # fixed per layer, token position and group: a reproducible baseline
            key = jax.random.fold_in(jax.random.key(0), self.layer_index)
            noise = jax.random.normal(key, (cfg.max_position_embeddings, kv_heads, groups))
            scores = noise[jnp.clip(positions, 0, cfg.max_position_embeddings - 1)]
        else:
            scores = jnp.zeros((batch, length, kv_heads, groups), jnp.float32)
            if scorer == "router":
                scores = self.value_router(x).reshape(batch, length, kv_heads, groups).astype(jnp.float32)
            if scorer == "norm" or cfg.routing.norm_prior:
                scores = scores + jax.lax.stop_gradient(group_norm_scores(value, groups))
        valid = positions >= 0
        mask, stats = route_value_groups(scores, budget, cfg.routing.mode, cfg.routing.temperature, valid,
                                         prefix_stats, exact_budget=cfg.routing.exact_budget,
                                         exact_rule=cfg.routing.exact_rule)
        self.sow("routing", "value_scores", scores)
        self.sow("routing", "value_group_mask", jax.lax.stop_gradient(mask))
        self.sow("routing", "value_budget", realised_budget(mask, valid))
        return mask, stats

    def __call__(self, x, positions, *, cache=None, value_group_mask=None, token_keep_mask=None, value_budget=None,
                 deterministic: bool = True):
        """x [B, T, E]; positions [B, T] (negative = padding).

        Without a cache, attends over x itself. With a layer cache (`layer_caches`: a dense slice of a
        KVCache, or a packed, compressed prefix with a dense tail), writes this chunk into it and attends
        over everything it holds; explicit masks then cover a dense cache's slots (a packed cache carries
        its compression). A routed model computes its own value-group mask unless one is given.
        Returns (output [B, T, E], updated layer cache or None).
        """
        cfg = self.config
        query = apply_rope(self.q(x, deterministic=deterministic), positions, self.inv_freq)
        query = nn.with_logical_constraint(query, ("batch", "length", "heads", "head_dim"))
        key, value = self.project_kv(x, positions, deterministic)
        # KV selectors read the (rotated) queries of a prefill: apply with mutable=["prefill"] to get them
        self.sow("prefill", "queries", query)
        routed_mask = stats = None
        if cfg.routing.enabled and value_group_mask is None and (cache is None or cache.routed):
            routed_mask, stats = self.route(x, value, positions, value_budget,
                                            None if cache is None else cache.route_stats)
        if cache is not None:
            cache = cache.write(key, value, positions, group_mask=routed_mask, route_stats=stats)
        slots = key.shape[1] if cache is None else cache.mask_slots  # what explicit masks cover (None: none allowed)
        if slots is not None:
            check_mask(value_group_mask, "value_group_mask", batch=key.shape[0], keys=slots, kv_heads=cfg.num_kv_heads,
                       groups=cfg.value_groups, layer=self.layer_index)
            check_mask(token_keep_mask, "token_keep_mask", batch=key.shape[0], keys=slots, kv_heads=cfg.num_kv_heads,
                       layer=self.layer_index)
        window = cfg.sliding_window(self.layer_index)
        if cache is None:
            allowed = attention_allowed(positions, positions, sliding_window=window, token_keep_mask=token_keep_mask)
            mask = value_group_mask if value_group_mask is not None else routed_mask
            out = attend(query, key.astype(query.dtype), value.astype(query.dtype), allowed, value_group_mask=mask)
        else:
            out = cache.attend(query, positions, sliding_window=window, value_group_mask=value_group_mask,
                               token_keep_mask=token_keep_mask, layer=self.layer_index)
            if getattr(cache, "pending", None) is not None:  # a dense cache's pre-write arrays: not part of its state
                cache = cache.replace(pending=None)
        return self.o(out, deterministic=deterministic), cache
