"""Packed (compressed) KV cache: layouts, byte accounting, attention, Pallas decode kernel, generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subtoken_jax import InputError, KVCache, ModelConfig, init_params
from subtoken_jax.attention import attend, attention_allowed
from subtoken_jax.compressed_generate import compressed_generate
from subtoken_jax.kernels.packed_decode import packed_decode_attention
from subtoken_jax.packed_cache import (FixedKValues, GlobalValues, PackedCache, cache_nbytes, fixed_k_of,
                                       entry_slots, global_capacity_of, index_dtype, pack_fixed_k, pack_fixed_k_group_major,
                                       pack_fixed_k_layer, pack_global, packed_attention, unpack_dense)
from subtoken_jax.selectors.allocate import allocate_value_groups
from subtoken_jax.value_groups import group_norm_scores


def _case(seed, batch, length, kv_heads, reps, groups, group_dim, q_len, tail_len):
    """Random keys/values/queries with a padded first slot in row 0, and optional dense tail."""
    rng = np.random.default_rng(seed)
    dim = groups * group_dim
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    positions = np.broadcast_to(np.arange(length), (batch, length)).copy()
    positions[0, 0] = -1  # a padding slot
    case = dict(keys=f(batch, length, kv_heads, dim), values=f(batch, length, kv_heads, dim),
                positions=jnp.asarray(positions, jnp.int32), query=f(batch, q_len, kv_heads * reps, dim),
                q_positions=jnp.broadcast_to(jnp.arange(q_len) + length + tail_len - q_len, (batch, q_len)))
    if tail_len:
        tail_pos = np.broadcast_to(np.arange(length, length + tail_len), (batch, tail_len)).copy()
        tail_pos[-1, -1] = -1  # an unwritten tail slot
        case.update(tail_keys=f(batch, tail_len, kv_heads, dim), tail_values=f(batch, tail_len, kv_heads, dim),
                    tail_positions=jnp.asarray(tail_pos, jnp.int32))
    return rng, case


def _dense_reference(case, group_mask, token_keep=None, window=None):
    """attend on the masked dense cache: prefix (+ tail with all-ones masks)."""
    keys, values, positions = case["keys"], case["values"], case["positions"]
    if token_keep is not None and token_keep.ndim == 2:
        token_keep = jnp.broadcast_to(token_keep[..., None], keys.shape[:3])
    if token_keep is None:
        token_keep = jnp.ones(keys.shape[:3], bool)
    if "tail_keys" in case:
        tail = case["tail_keys"].shape[:3]
        keys = jnp.concatenate([keys, case["tail_keys"]], axis=1)
        values = jnp.concatenate([values, case["tail_values"]], axis=1)
        positions = jnp.concatenate([positions, case["tail_positions"]], axis=1)
        group_mask = jnp.concatenate([group_mask, jnp.ones(tail + group_mask.shape[-1:], group_mask.dtype)], axis=1)
        token_keep = jnp.concatenate([token_keep, jnp.ones(tail, bool)], axis=1)
    allowed = attention_allowed(case["q_positions"], positions, sliding_window=window, token_keep_mask=token_keep)
    return attend(case["query"], keys, values, allowed, value_group_mask=group_mask)


def _tail_kwargs(case):
    return {k: case[k] for k in ("tail_keys", "tail_values", "tail_positions") if k in case}


# A few shape configurations, so that eager ops compile once per shape (compiling dominates the cost
# of these tiny cases); hypothesis varies the data, masks, K, capacities, token selection and window.
# (batch, length, kv_heads, reps, groups, group_dim, q_len, tail_len)
SHAPES = [(2, 7, 2, 2, 4, 2, 1, 3), (1, 5, 1, 1, 2, 3, 3, 0), (2, 6, 2, 1, 1, 2, 2, 2)]
cases = dict(seed=st.integers(0, 2 ** 16), shape=st.sampled_from(SHAPES), window=st.sampled_from([None, 4]))


@settings(max_examples=5, deadline=None)  # each example compiles its own shapes (~3 s)
@given(**cases, data=st.data())
def test_fixed_k_attention_equals_masked_dense(seed, shape, window, data):
    batch, length, kv_heads, reps, groups, group_dim, q_len, tail_len = shape
    rng, case = _case(seed, *shape)
    k = data.draw(st.sampled_from(sorted({1, max(groups // 2, 1), groups})), label="K")
    # at most K kept groups per (token, head), some rows fewer (none at all included)
    scores = rng.random((batch, length, kv_heads, groups))
    ranks = np.argsort(np.argsort(-scores, axis=-1), axis=-1)
    kept = rng.integers(0, k + 1, size=(batch, length, kv_heads, 1))
    group_mask = jnp.asarray(ranks < kept, jnp.float32)
    layer = pack_fixed_k_layer(case["keys"], case["values"], case["positions"], group_mask, k)
    assert layer.values.values.shape == (batch, length, kv_heads, k, group_dim)
    assert layer.values.groups.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_dense(layer), np.asarray(case["values"]) *
                                  np.repeat(np.asarray(group_mask), group_dim, axis=-1))
    ours = packed_attention(case["query"], case["q_positions"], layer, sliding_window=window, **_tail_kwargs(case))
    np.testing.assert_allclose(ours, _dense_reference(case, group_mask, window=window), atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(**cases, token_mode=st.sampled_from(["none", "shared", "per_head"]), exact=st.sampled_from([False, False, True]))
def test_global_attention_equals_masked_dense(seed, shape, window, token_mode, exact):
    batch, length, kv_heads, reps, groups, group_dim, q_len, tail_len = shape
    rng, case = _case(seed, *shape)
    group_mask = jnp.asarray(rng.random((batch, length, kv_heads, groups)) < rng.random(), jnp.float32)
    token_keep = {"none": None, "shared": rng.random((batch, length)) < 0.6,
                  "per_head": rng.random((batch, length, kv_heads)) < 0.6}[token_mode]
    token_keep = None if token_keep is None else jnp.asarray(token_keep)
    if exact:  # the sizes of this mask: the fullest head fills every slot
        capacity, key_capacity = global_capacity_of(group_mask, case["positions"], token_keep), None
    else:  # room for everything (padding entries and key slots); one compilation per shape
        capacity, key_capacity = length * groups, length
    layer = pack_global(case["keys"], case["values"], case["positions"], token_keep, group_mask, capacity,
                        key_capacity=key_capacity)
    keep = np.ones((batch, length, kv_heads), bool) if token_keep is None else np.asarray(token_keep, bool)
    keep = (keep if keep.ndim == 3 else keep[..., None]) & (np.asarray(case["positions"]) >= 0)[..., None]
    entries = layer.values
    assert entries.values.shape == (batch, kv_heads, entry_slots(capacity, groups), group_dim)
    assert entries.groups.dtype == jnp.uint8 and entries.tokens.dtype == jnp.uint8
    _assert_blocks_pure(entries, np.sum(np.asarray(group_mask) * keep[..., None], axis=(1, 3)))
    assert layer.keys.compact == (token_keep is not None)
    expected = np.asarray(case["values"]) * np.repeat(np.asarray(group_mask) * keep[..., None], group_dim, -1)
    np.testing.assert_array_equal(unpack_dense(layer, case["positions"]), expected)
    ours = packed_attention(case["query"], case["q_positions"], layer, sliding_window=window, **_tail_kwargs(case))
    np.testing.assert_allclose(ours, _dense_reference(case, group_mask, token_keep, window), atol=1e-5)


def _intermediate_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _intermediate_shapes(inner)


@pytest.mark.parametrize("layout", ["fixed_k", "global"])
def test_packed_attention_never_builds_dense_values(layout):
    """Distinct sizes: T=11 prefix (+2 tail = 13) slots, G=5, gd=3, D=15, C=55. No intermediate may span the
    token axis (11 or 13) and D, or the token axis, G and gd: the dense value tensor is never formed."""
    rng, case = _case(0, 1, 11, 2, 1, 5, 3, 1, 2)
    group_mask = jnp.asarray(np.argsort(rng.random((1, 11, 2, 5)), axis=-1) < 2, jnp.float32)  # 2 of 5 kept
    if layout == "fixed_k":
        layer = pack_fixed_k_layer(case["keys"], case["values"], case["positions"], group_mask, 2)
    else:
        layer = pack_global(case["keys"], case["values"], case["positions"], None, group_mask, 11 * 5)
    dense_like = lambda shape: bool({11, 13} & set(shape)) and (15 in shape or {5, 3} <= set(shape))  # noqa: E731
    reference = lambda q: _dense_reference(dict(case, query=q), group_mask)  # noqa: E731
    assert any(dense_like(s) for s in _intermediate_shapes(jax.make_jaxpr(reference)(case["query"]).jaxpr))
    packed = lambda q: packed_attention(q, case["q_positions"], layer, **_tail_kwargs(case))  # noqa: E731
    assert not any(dense_like(s) for s in _intermediate_shapes(jax.make_jaxpr(packed)(case["query"]).jaxpr))
    np.testing.assert_allclose(packed(case["query"]), reference(case["query"]), atol=1e-5)


def _assert_blocks_pure(entries, kept_pairs):
    """The global entry list as `packed_attention` reads it: real entries sorted by group, each group starting on a
    block boundary (so every block holds one group and empty slots), empty slots zero; kept_pairs [B, Hkv] (or
    None) is how many real entries each list must hold."""
    groups, values = np.asarray(entries.groups, int), np.asarray(entries.values)
    real = groups < entries.num_groups
    assert entries.capacity % entries.block == 0
    for b in range(groups.shape[0]):
        for h in range(groups.shape[1]):
            g = groups[b, h][real[b, h]]
            assert np.all(np.diff(g) >= 0)  # sorted by group
            for block in groups[b, h].reshape(-1, entries.block):
                assert len(set(block[block < entries.num_groups])) <= 1  # one group per block
            starts = np.flatnonzero(real[b, h] & (np.r_[-1, groups[b, h][:-1]] != groups[b, h]))
            assert np.all(starts % entries.block == 0)  # every group starts a block
            assert not values[b, h][~real[b, h]].any()
            if kept_pairs is not None:
                assert real[b, h].sum() == int(kept_pairs[b, h])


def test_global_blocked_read_out_with_unbalanced_groups():
    """A list long enough for many blocks (C=1024 pairs, blocks of 32), groups kept with very different frequencies
    (one never): every block holds one group, every kept pair is stored once, and attention equals masked dense."""
    rng, case = _case(5, 2, 160, 2, 2, 8, 2, 2, 3)
    keep_rate = np.array([0.05, 0.9, 0.0, 0.5, 0.7, 0.2, 1.0, 0.4])
    group_mask = jnp.asarray(rng.random((2, 160, 2, 8)) < keep_rate, jnp.float32)
    layer = jax.jit(lambda *a: pack_global(*a, None, group_mask, 1024))(case["keys"], case["values"],
                                                                        case["positions"])
    real = np.asarray(case["positions"]) >= 0
    _assert_blocks_pure(layer.values, np.sum(np.asarray(group_mask) * real[:, :, None, None], axis=(1, 3)))
    ours = jax.jit(lambda q, l: packed_attention(q, case["q_positions"], l, **_tail_kwargs(case)))(case["query"], layer)
    np.testing.assert_allclose(ours, jax.jit(lambda c: _dense_reference(c, group_mask))(case), atol=1e-5)


def test_entry_slots_hold_the_worst_block_padding():
    """C = 129 pairs of G = 2 groups in blocks of 2, split 65 / 64: group 0's odd count pads its last block, the
    tightest case of `entry_slots` (130 slots). Every pair is kept, blocks stay pure, attention equals masked dense."""
    rng, case = _case(7, 1, 66, 1, 2, 2, 2, 1, 0)  # slot 0 is padding: 65 real tokens
    group_mask = np.ones((1, 66, 1, 2), np.float32)
    group_mask[0, 1, 0, 1] = 0.0  # group 1 loses one token: 65 + 64 pairs
    group_mask = jnp.asarray(group_mask)
    layer = pack_global(case["keys"], case["values"], case["positions"], None, group_mask, 129)
    assert layer.values.block == 2 and layer.values.capacity == entry_slots(129, 2) == 130
    _assert_blocks_pure(layer.values, np.array([[129]]))
    ours = packed_attention(case["query"], case["q_positions"], layer)
    np.testing.assert_allclose(ours, _dense_reference(case, group_mask), atol=1e-5)


def test_fixed_k_with_shared_token_selection_drops_evicted_rows():
    rng, case = _case(2, 2, 9, 2, 2, 4, 2, 1, 2)
    group_mask = jnp.asarray(np.argsort(rng.random((2, 9, 2, 4)), axis=-1) < 2, jnp.float32)
    keep = jnp.asarray(np.array([[1, 0, 1, 1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 1, 0, 0, 1, 0]], bool))
    layer = jax.jit(lambda *a: pack_fixed_k_layer(*a, group_mask, 2, keep, key_capacity=4))(
        case["keys"], case["values"], case["positions"])
    # row 0 keeps 5 slots but slot 0 is padding: 4 real tokens, the most of any row
    assert layer.keys.keys.shape == (2, 4, 2, 8) and layer.values.values.shape == (2, 4, 2, 2, 2)
    np.testing.assert_array_equal(layer.keys.positions, [[2, 3, 6, 8], [1, 4, 7, -1]])
    ours = jax.jit(lambda q, l: packed_attention(q, case["q_positions"], l, **_tail_kwargs(case)))(case["query"], layer)
    np.testing.assert_allclose(ours, jax.jit(lambda c: _dense_reference(c, group_mask, keep))(case), atol=1e-5)


def test_fixed_k_group_major_keeps_the_same_pairs_as_token_major():
    """The XLA storage of fixed-K: same kept pairs (a row with more than K keeps its first K), static capacity
    key slots x K, entries sorted by group; attention equals the token-major layer's and the masked dense one."""
    rng, case = _case(4, 2, 9, 2, 2, 4, 2, 1, 2)
    group_mask = rng.random((2, 9, 2, 4)) < 0.5
    group_mask[0, 3, 1] = True  # 4 kept groups: K = 2 keeps groups 0 and 1
    group_mask = jnp.asarray(group_mask, jnp.float32)
    first_k = group_mask * (jnp.cumsum(group_mask, axis=-1) <= 2)
    keep = jnp.asarray(rng.random((2, 9)) < 0.7)
    pack = jax.jit(lambda *a: pack_fixed_k_group_major(*a, group_mask, 2, keep, key_capacity=9))
    layer = pack(case["keys"], case["values"], case["positions"])
    token_major = pack_fixed_k_layer(case["keys"], case["values"], case["positions"], group_mask, 2, keep,
                                     key_capacity=9)
    assert isinstance(layer.values, GlobalValues) and layer.values.capacity >= 9 * 2 and layer.keys.compact
    _assert_blocks_pure(layer.values, None)
    np.testing.assert_array_equal(unpack_dense(layer, case["positions"]),
                                  np.asarray(case["values"]) * np.repeat(np.asarray(first_k) * np.asarray(
                                      keep & (case["positions"] >= 0))[..., None, None], 2, axis=-1))
    ours = packed_attention(case["query"], case["q_positions"], layer, **_tail_kwargs(case))
    np.testing.assert_allclose(ours, packed_attention(case["query"], case["q_positions"], token_major,
                                                      **_tail_kwargs(case)), atol=1e-5)
    np.testing.assert_allclose(ours, _dense_reference(case, first_k, keep), atol=1e-5)
    with pytest.raises(InputError, match="pack_global"):
        pack_fixed_k_group_major(case["keys"], case["values"], case["positions"], group_mask, 2,
                                 jnp.ones((2, 9, 2), bool))


def test_packing_jits_with_static_sizes_index_dtypes_and_shared_token_masks():
    rng, case = _case(0, 2, 6, 2, 1, 4, 2, 1, 0)
    group_mask = jnp.asarray(rng.random((2, 6, 2, 4)) < 0.5, jnp.float32)
    keep = jnp.asarray(rng.random((2, 6, 2)) < 0.5)
    eager = pack_global(case["keys"], case["values"], case["positions"], keep, group_mask, 24, key_capacity=6)
    jitted = jax.jit(lambda *a: pack_global(*a, 24, key_capacity=6))(case["keys"], case["values"],
                                                                     case["positions"], keep, group_mask)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="capacity"):
        jax.jit(lambda *a: pack_global(*a, None))(case["keys"], case["values"], case["positions"], None, group_mask)
    assert jax.jit(lambda v, m: pack_fixed_k(v, m, 2))(case["values"], group_mask).values.shape == (2, 6, 2, 2, 2)
    assert (index_dtype(256), index_dtype(257), index_dtype(65536), index_dtype(65537)) == (
        jnp.uint8, jnp.uint16, jnp.uint16, jnp.int32)
    with pytest.raises(InputError):
        pack_fixed_k(case["values"], group_mask, 5)
    # fixed-K with a token mask shared by the KV heads: evicted tokens become empty slots (position -1)
    shared = jnp.asarray(rng.random((2, 6)) < 0.5)
    layer = pack_fixed_k_layer(case["keys"], case["values"], case["positions"], group_mask, None, shared)
    assert layer.values.k == fixed_k_of(group_mask)
    np.testing.assert_allclose(packed_attention(case["query"], case["q_positions"], layer),
                               _dense_reference(case, group_mask, shared), atol=1e-5)
    with pytest.raises(InputError, match="pack_global"):
        pack_fixed_k_layer(case["keys"], case["values"], case["positions"], group_mask, 4, keep)


def test_bytes_are_real_and_a_37_5_percent_budget_costs_37_5_percent():
    """D=128, G=8, 2048 tokens, 4 KV heads, bfloat16: keep 50% tokens (per head), then 50% of their groups.

    Nominal keys + values = 0.5 + 0.5 * 0.5 of the values -> (0.5 + 0.25) / 2 = 37.5% of the dense cache.
    Real bytes add the index (uint16 token slot + uint8 group per entry), compact key positions and the block
    padding of the entry list (`entry_slots`).
    """
    batch, length, kv_heads, dim, groups = 1, 2048, 4, 128, 8
    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.normal(size=(batch, length, kv_heads, dim)), jnp.bfloat16)
    values = jnp.asarray(rng.normal(size=(batch, length, kv_heads, dim)), jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    token_keep = jnp.asarray(np.argsort(rng.random((batch, length, kv_heads)), axis=1) < length // 2)
    group_mask = allocate_value_groups([group_norm_scores(values, groups)], 0.5, scope="head", positions=positions,
                                       token_keep_masks=token_keep)[0]
    layer = pack_global(keys, values, positions, token_keep, group_mask)
    entries = layer.values
    capacity = entry_slots(length // 2 * groups // 2, groups)  # the kept pairs, each group from a whole block
    assert entries.capacity == capacity and layer.keys.keys.shape == (batch, kv_heads, length // 2, dim)
    assert entries.tokens.dtype == jnp.uint16 and entries.groups.dtype == jnp.uint8
    parts = cache_nbytes(layer, by_kind=True)
    assert parts["total"] == cache_nbytes(layer) == sum(x.nbytes for x in jax.tree.leaves(layer))
    assert parts == {"keys": batch * kv_heads * (length // 2) * dim * 2,
                     "values": batch * kv_heads * capacity * (dim // groups) * 2,
                     "indices": batch * kv_heads * capacity * (2 + 1),
                     "positions": batch * kv_heads * (length // 2) * 4, "counts": 0, "total": parts["total"]}
    dense = keys.nbytes + values.nbytes
    kept = int(np.sum(entries.real)) * (dim // groups) * 2  # bytes of the kept groups' values, padding aside
    assert kept == values.nbytes // 4 and parts["values"] - kept <= parts["values"] / 32
    nominal = (parts["keys"] + kept) / dense
    real = parts["total"] / dense
    assert nominal == pytest.approx(0.375)
    assert abs(real - 0.375) < 0.02, real  # measured: 0.3943 (index 1.20 pp, positions 0.39 pp, block padding)
    # a fixed-K layout at K = 4 of 8 (no token selection): values 50% + 1 byte index per kept group
    ranks = jnp.argsort(jnp.argsort(-group_norm_scores(values, groups), axis=-1), axis=-1)
    fixed = pack_fixed_k_layer(keys, values, positions, (ranks < 4).astype(jnp.float32), 4)
    assert cache_nbytes(fixed) == sum(x.nbytes for x in jax.tree.leaves(fixed))
    fixed_parts = cache_nbytes(fixed, by_kind=True)
    assert fixed_parts["values"] == values.nbytes // 2
    assert fixed_parts["indices"] == batch * length * kv_heads * 4  # one uint8 per kept group
    # a whole PackedCache with its tail counts every array too
    cache = PackedCache.with_empty_tail([layer, fixed], tail_capacity=16, prefix_end=jnp.full((batch,), length))
    assert cache_nbytes(cache) == sum(x.nbytes for x in jax.tree.leaves(cache))


@pytest.mark.parametrize("tail_len,window,pad", [(0, None, False), (4, None, False), (4, 3, True)])
def test_pallas_decode_kernel_interpret_equals_xla(tail_len, window, pad):
    batch, length, kv_heads, reps, groups, group_dim, k = 2, 6, 2, 3, 4, 2, 3
    rng, case = _case(1, batch, length, kv_heads, reps, groups, group_dim, 1, tail_len)
    scores = rng.random((batch, length, kv_heads, groups))
    group_mask = jnp.asarray(np.argsort(np.argsort(-scores, -1), -1) < k, jnp.float32)
    group_mask = group_mask.at[1, 3, 0].set(0.0)  # a (token, head) with nothing kept
    layer = pack_fixed_k_layer(case["keys"], case["values"], case["positions"], group_mask, k)
    query, q_pos = case["query"][:, 0], case["q_positions"][:, 0]
    kwargs = dict(sliding_window=window, **_tail_kwargs(case))
    xla = packed_decode_attention(query, q_pos, layer, impl="xla", **kwargs)
    pallas = packed_decode_attention(query, q_pos, layer, impl="pallas", interpret=True, pad_pow2=pad, **kwargs)
    np.testing.assert_allclose(pallas, xla, atol=1e-5)
    np.testing.assert_allclose(xla, _dense_reference(case, group_mask, window=window)[:, 0], atol=1e-5)
    assert jax.default_backend() != "cpu" or np.array_equal(
        packed_decode_attention(query, q_pos, layer, impl="auto", **kwargs), xla)
    with pytest.raises(InputError):
        packed_decode_attention(query, q_pos, pack_global(case["keys"], case["values"], case["positions"], None,
                                                          group_mask), impl="pallas")


# ----------------------------------------------------------------------------- generation

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     value_groups=4)


def _masked_dense_generate(model, params, prompt, masks, max_new_tokens, attention_mask=None):
    """DecoderLM + KVCache, masks padded to the cache capacity with ones for the generated tokens."""
    token_masks, group_masks = masks
    batch, prompt_len = prompt.shape
    capacity = prompt_len + max_new_tokens
    pad = lambda m: None if m is None else jnp.concatenate(  # noqa: E731
        [m, jnp.ones((batch, max_new_tokens) + m.shape[2:], m.dtype)], axis=1)
    token_masks = [pad(m) for m in token_masks] if token_masks is not None else None
    group_masks = [pad(m) for m in group_masks]
    cache = KVCache.create(model.config, batch, capacity)
    logits, cache = model.apply({"params": params}, prompt, cache=cache, attention_mask=attention_mask)
    step = jax.jit(lambda ids, cache: model.apply({"params": params}, ids, cache=cache, value_group_mask=group_masks,
                                                  token_keep_mask=token_masks))
    tokens = [jnp.argmax(logits[:, -1], -1).astype(jnp.int32)]
    for _ in range(max_new_tokens - 1):
        logits, cache = step(tokens[-1][:, None], cache)
        tokens.append(jnp.argmax(logits[:, -1], -1).astype(jnp.int32))
    return jnp.stack(tokens, axis=1)


def _norm_compression(token_fraction):
    """Keeps the tokens of largest key norm per head (token_fraction) then half the value groups by norm."""
    def compression(cache):
        positions = cache.positions
        token_masks = None
        if token_fraction is not None:
            token_masks = []
            for keys in cache.keys:
                norms = jnp.where((positions >= 0)[..., None], jnp.linalg.norm(keys, axis=-1), -jnp.inf)
                ranks = jnp.argsort(jnp.argsort(-norms, axis=1), axis=1)
                token_masks.append(ranks < round(token_fraction * keys.shape[1]))
        scores = [group_norm_scores(v, CONFIG.value_groups) for v in cache.values]
        groups = allocate_value_groups(scores, 0.5, scope="head", positions=positions, token_keep_masks=token_masks)
        return (None if token_masks is None else tuple(token_masks)), groups
    return compression


def _fixed_k_compression(cache):
    """K = 2 of 4 groups per (token, head) by value norm: the fixed-K layout, no token selection."""
    groups = []
    for v in cache.values:
        scores = group_norm_scores(v, CONFIG.value_groups)
        groups.append((jnp.argsort(jnp.argsort(-scores, -1), -1) < 2).astype(jnp.float32))
    return None, tuple(groups)


@pytest.fixture(scope="module")
def tiny_model():
    return init_params(CONFIG, jax.random.key(3))


@pytest.mark.parametrize("layout,compression,impl", [
    ("global", _norm_compression(0.5), "auto"),
    ("global", _norm_compression(None), "auto"),
    ("fixed_k", _fixed_k_compression, "xla"),
    ("fixed_k", _fixed_k_compression, "pallas"),
])
def test_compressed_generation_equals_masked_dense(tiny_model, layout, compression, impl):
    model, params = tiny_model
    prompt = jax.random.randint(jax.random.key(7), (2, 12), 0, CONFIG.vocab_size)
    attention_mask = jnp.ones((2, 12), jnp.int32).at[1, :3].set(0)  # row 1 left-padded
    new = 6
    tokens, packed = compressed_generate(model, params, prompt, compression=compression, max_new_tokens=new,
                                         attention_mask=attention_mask, layout=layout, impl=impl, return_cache=True)
    prefill = KVCache.create(CONFIG, 2, 12)
    _, prefill = model.apply({"params": params}, prompt, cache=prefill, attention_mask=attention_mask)
    expected = _masked_dense_generate(model, params, prompt, compression(prefill), new, attention_mask)
    np.testing.assert_array_equal(tokens, expected)
    assert tokens.shape == (2, new) and tokens.dtype == jnp.int32
    # fixed-K values are stored token-major for the Pallas kernel, group-major for the XLA read-out
    assert isinstance(packed.layers[0].values, FixedKValues if impl == "pallas" else GlobalValues)
    assert int(packed.tail_index) == new - 1
    dense_bytes = sum(x.nbytes for x in prefill.keys + prefill.values)
    prefix_bytes = cache_nbytes(packed.layers[0]) + cache_nbytes(packed.layers[1])
    assert prefix_bytes < dense_bytes


def _mean_filled_reference(case, group_mask, token_keep):
    """attend over dense values where a dropped group of a kept token holds the context mean (numpy loop)."""
    values, positions = np.asarray(case["values"]), np.asarray(case["positions"])
    batch, length, heads, dim = values.shape
    groups = group_mask.shape[-1]
    filled = values.copy()
    for b in range(batch):
        real = positions[b] >= 0
        mean = values[b, real].mean(axis=0)  # [Hkv, D]
        for t in range(length):
            for h in range(heads):
                for g in range(groups):
                    if not group_mask[b, t, h, g]:
                        span = slice(g * dim // groups, (g + 1) * dim // groups)
                        filled[b, t, h, span] = mean[h, span]
    ones = jnp.ones(group_mask.shape, jnp.float32)
    return _dense_reference({**case, "values": jnp.asarray(filled)}, ones, token_keep)


@pytest.mark.parametrize("layout", ["global", "fixed_k"])
def test_mean_fill_reads_dropped_groups_as_the_context_mean(layout):
    from subtoken_jax.packed_cache import pack_cache

    rng, case = _case(3, 2, 7, 2, 2, 4, 2, 2, 3)
    group_mask = jnp.asarray(rng.random((2, 7, 2, 4)) < 0.5, jnp.float32)
    token_keep = rng.random((2, 7) if layout == "fixed_k" else (2, 7, 2)) < 0.7
    token_keep[:, -1] = True
    impl = "pallas" if layout == "fixed_k" else "auto"  # fixed-K token-major (the group-major one reads as global)
    cache = pack_cache([case["keys"]], [case["values"]], case["positions"], [jnp.asarray(token_keep)], [group_mask],
                       layout=layout, fill="mean", impl=impl)
    layer = cache.layers[0]
    assert layer.value_mean.shape == (2, 2, 8)
    got = packed_attention(case["query"], case["q_positions"], layer, **_tail_kwargs(case))
    np.testing.assert_allclose(got, _mean_filled_reference(case, np.asarray(group_mask), jnp.asarray(token_keep)),
                               atol=1e-5)
    zero = pack_cache([case["keys"]], [case["values"]], case["positions"], [jnp.asarray(token_keep)], [group_mask],
                      layout=layout, impl=impl)
    assert cache_nbytes(cache) - cache_nbytes(zero) == layer.value_mean.nbytes  # one mean per (row, layer, head)
    if layout == "fixed_k":  # the Pallas decode kernel adds the mean the same way
        query, q_pos = case["query"][:, 0], case["q_positions"][:, 0]
        xla = packed_decode_attention(query, q_pos, layer, impl="xla", **_tail_kwargs(case))
        pallas = packed_decode_attention(query, q_pos, layer, impl="pallas", interpret=True, **_tail_kwargs(case))
        np.testing.assert_allclose(pallas, xla, atol=1e-5)
    with pytest.raises(InputError, match="unknown value fill"):
        pack_cache([case["keys"]], [case["values"]], case["positions"], None, [group_mask], fill="median")
