"""Value-group masked attention against a brute-force numpy loop; cache decoding against the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subtoken_jax import InputError, KVCache, ModelConfig, init_params
from subtoken_jax import attention as attention_lib
from subtoken_jax.attention import attend, attention_allowed


def brute_force_attention(q, k, v, group_mask, keep=None, window=None):
    """Loop over every (batch, query, head): softmax over allowed keys of q.k, read-out of masked values."""
    batch, q_len, heads, dim = q.shape
    kv_heads, groups = k.shape[2], group_mask.shape[-1]
    out = np.zeros_like(q, dtype=np.float64)
    for b in range(batch):
        for t in range(q_len):
            for h in range(heads):
                kh = h // (heads // kv_heads)
                keys = [s for s in range(t + 1) if (window is None or t - s < window)
                        and (keep is None or keep[b, s])]
                if not keys:  # every key evicted: attention reads nothing
                    continue
                scores = np.array([q[b, t, h] @ k[b, s, kh] / np.sqrt(dim) for s in keys])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                for w, s in zip(weights, keys):
                    value = v[b, s, kh].astype(np.float64).copy()
                    for g in range(groups):
                        if not group_mask[b, s, kh, g]:
                            value[g * dim // groups:(g + 1) * dim // groups] = 0.0
                    out[b, t, h] += w * value
    return out


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.sampled_from([1, 2, 4, 8]), window=st.sampled_from([None, 3]),
       kv_heads=st.sampled_from([1, 2]), use_keep=st.booleans(), query_chunk=st.sampled_from([0, 4]))
def test_masked_attention_equals_brute_force(seed, groups, window, kv_heads, use_keep, query_chunk):
    rng = np.random.default_rng(seed)
    batch, length, heads, dim = 2, 6, 4, 8
    q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, length, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(batch, length, kv_heads, dim)).astype(np.float32)
    group_mask = rng.random((batch, length, kv_heads, groups)) < 0.5
    keep = rng.random((batch, length)) < 0.7 if use_keep else None
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    allowed = attention_allowed(positions, positions, sliding_window=window,
                                token_keep_mask=None if keep is None else jnp.asarray(keep))
    # query_chunk 4: the 6 queries run as two chunks (the second padded), as long prompts do
    ours = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), allowed,
                  value_group_mask=jnp.asarray(group_mask, jnp.float32), query_chunk=query_chunk)
    np.testing.assert_allclose(np.asarray(ours), brute_force_attention(q, k, v, group_mask, keep, window),
                               atol=1e-5)


def test_causal_tiers_skip_only_slots_no_row_can_see():
    # 16 chunks of 128 rows over 2,048 slots: 8 tiers, each seeing up to its last row
    assert attention_lib.causal_tiers(16, 128, 2048) == [(2 * i, 2 * i + 2, 256 * (i + 1)) for i in range(8)]
    # tiers that would see every slot run as one
    assert attention_lib.causal_tiers(16, 128, 600) == [(0, 2, 256), (2, 4, 512), (4, 16, 600)]
    positions = jnp.arange(8)[None]
    tiers = attention_lib.causal_tiers(2, 4, 8)
    assert not attention_lib.sees_past_tiers(attention_allowed(positions, positions), tiers, 4)
    # a chunk written after 3 earlier slots: its first row sees slots beyond its own index
    assert attention_lib.sees_past_tiers(attention_allowed(positions + 3, jnp.arange(11)[None])[..., :8], tiers, 4)


def test_chunked_attention_after_a_prefix_equals_a_dense_softmax():
    """Queries written after earlier slots (a chunked prefill's later chunk) see slots past their row index: the
    chunks must score every slot (the run-time check picks that path), matching a plain numpy softmax."""
    rng = np.random.default_rng(0)
    prefix, length, slots, heads, kv_heads, dim = 5, 8, 16, 4, 2, 8
    q = rng.normal(size=(1, length, heads, dim)).astype(np.float32)
    k = rng.normal(size=(1, slots, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(1, slots, kv_heads, dim)).astype(np.float32)
    kv_positions = np.where(np.arange(slots) < prefix + length, np.arange(slots), -1)[None]
    allowed = attention_allowed(jnp.arange(prefix, prefix + length)[None], jnp.asarray(kv_positions))
    ours = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), allowed, query_chunk=4)
    expected = np.zeros_like(q)
    for t in range(length):
        for h in range(heads):
            seen = np.arange(prefix + t + 1)
            scores = k[0, seen, h // 2] @ q[0, t, h] / np.sqrt(dim)
            weights = np.exp(scores - scores.max())
            expected[0, t, h] = (weights / weights.sum()) @ v[0, seen, h // 2]
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


@pytest.mark.parametrize("max_rows", [0, 10_000])  # 0: the einsum path; 10_000: block-diagonal (CPU)
@pytest.mark.parametrize("q_len,kv_heads", [(1, 4), (3, 2), (2, 1)])
def test_grouped_scores_and_readout_equal_numpy(monkeypatch, max_rows, q_len, kv_heads):
    monkeypatch.setattr(attention_lib, "BLOCK_DIAGONAL_MAX_ROWS", max_rows)
    rng = np.random.default_rng(q_len * 10 + kv_heads)
    batch, length, reps, dim = 2, 9, 3, 8
    q5 = rng.normal(size=(batch, q_len, kv_heads, reps, dim)).astype(np.float32)
    keys = rng.normal(size=(batch, length, kv_heads, dim)).astype(np.float32)
    values = rng.normal(size=(batch, length, kv_heads, dim)).astype(np.float32)
    weights = rng.random((batch, kv_heads, reps, q_len, length)).astype(np.float32)
    expect_scores = np.zeros((batch, kv_heads, reps, q_len, length))
    expect_out = np.zeros((batch, q_len, kv_heads, reps, dim))
    for b, h, r, t in np.ndindex(batch, kv_heads, reps, q_len):
        expect_scores[b, h, r, t] = keys[b, :, h] @ q5[b, t, h, r]
        expect_out[b, t, h, r] = weights[b, h, r, t] @ values[b, :, h]
    np.testing.assert_allclose(attention_lib.grouped_scores(jnp.asarray(q5), jnp.asarray(keys)), expect_scores,
                               atol=1e-5)
    np.testing.assert_allclose(attention_lib.grouped_readout(jnp.asarray(weights), jnp.asarray(values)), expect_out,
                               atol=1e-5)


def test_all_ones_mask_equals_unmasked_and_zero_mask_zeros_output():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32)
    pos = jnp.arange(5)[None]
    allowed = attention_allowed(pos, pos)
    plain = attend(q, k, v, allowed)
    np.testing.assert_array_equal(attend(q, k, v, allowed, value_group_mask=jnp.ones((1, 5, 2, 4))), plain)
    assert float(jnp.abs(attend(q, k, v, allowed, value_group_mask=jnp.zeros((1, 5, 2, 4)))).max()) == 0.0


def test_per_head_token_keep_mask():
    """A [B, S, Hkv] keep mask evicts a token from one KV head only."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 4, 2, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 4, 2, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 4, 2, 4)), jnp.float32)
    pos = jnp.arange(4)[None]
    keep = np.ones((1, 4, 2), bool)
    keep[0, 1, 1] = False
    out = attend(q, k, v, attention_allowed(pos, pos, token_keep_mask=jnp.asarray(keep)))
    ones = np.ones((1, 4, 2, 1), bool)
    head0 = brute_force_attention(np.asarray(q)[:, :, :1], np.asarray(k)[:, :, :1], np.asarray(v)[:, :, :1],
                                  ones[:, :, :1], keep[:, :, 0])
    head1 = brute_force_attention(np.asarray(q)[:, :, 1:], np.asarray(k)[:, :, 1:], np.asarray(v)[:, :, 1:],
                                  ones[:, :, :1], keep[:, :, 1])
    np.testing.assert_allclose(np.asarray(out), np.concatenate([head0, head1], axis=2), atol=1e-5)


def test_mask_shape_errors():
    q = jnp.zeros((1, 3, 2, 8))
    k = v = jnp.zeros((1, 3, 2, 8))
    allowed = attention_allowed(jnp.arange(3)[None], jnp.arange(3)[None])
    with pytest.raises(InputError, match="does not divide head_dim=8"):
        attend(q, k, v, allowed, value_group_mask=jnp.ones((1, 3, 2, 3)))
    with pytest.raises(InputError, match=r"\[batch, kv_length, kv_heads, G\]"):
        attend(q, k, v, allowed, value_group_mask=jnp.ones((1, 4, 2, 2)))


def test_cache_decoding_with_masks_equals_full_pass():
    """Prefill + token-by-token decoding with a value-group mask over the cache equals one masked pass."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, value_groups=4, sliding_windows=(None, 3))
    model, params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 64)
    masks = tuple(jax.random.bernoulli(jax.random.key(10 + i), 0.5, (2, 7, 2, 4)).astype(jnp.float32)
                  for i in range(2))
    full = model.apply({"params": params}, ids, value_group_mask=masks)
    # jitted (one compile per chunk shape): eager decoding dispatches every op of every step separately
    step = jax.jit(lambda chunk, cache: model.apply({"params": params}, chunk, cache=cache, value_group_mask=masks))
    logits, cache = step(ids[:, :4], KVCache.create(cfg, 2, 7))
    steps = [logits]
    for t in range(4, 7):
        step_logits, cache = step(ids[:, t:t + 1], cache)
        steps.append(step_logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache.index) == 7


def test_logits_to_keep_gives_the_last_positions_of_the_full_logits():
    """A prefill that keeps only the last positions' logits (the LM head skipped elsewhere) writes the same cache."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=False)
    model, params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
    full = model.apply({"params": params}, ids)
    np.testing.assert_allclose(model.apply({"params": params}, ids, logits_to_keep=2), full[:, -2:], atol=1e-6)
    last, cache = model.apply({"params": params}, ids, cache=KVCache.create(cfg, 2, 8), logits_to_keep=1)
    every, full_cache = model.apply({"params": params}, ids, cache=KVCache.create(cfg, 2, 8))
    assert last.shape == (2, 1, 64)
    np.testing.assert_allclose(last, every[:, -1:], atol=1e-6)
    np.testing.assert_array_equal(cache.keys[1], full_cache.keys[1])


def test_left_padded_batch_matches_unpadded_rows():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    model, params = init_params(cfg, jax.random.key(0))
    row = jax.random.randint(jax.random.key(2), (1, 5), 0, 64)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), row], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 3)), jnp.ones((1, 5))], axis=1)
    alone = model.apply({"params": params}, row)
    with_pad = model.apply({"params": params}, padded, attention_mask=mask)
    np.testing.assert_allclose(with_pad[:, 3:], alone, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_attending_written_blocks_attends_only_the_written_slots(window):
    """attend_written_blocks (online softmax over blocks of the written slots) against a numpy loop over the first
    `written` slots: left padding, a chunk attending causally to itself, and slots past `written` holding valid
    positions and large keys, which a loop that read them would let dominate."""
    from subtoken_jax.attention import attend_written_blocks

    rng = np.random.default_rng(3)
    batch, slots, kv_heads, heads, dim, chunk, written = 2, 16, 2, 4, 8, 3, 10
    keys = rng.normal(size=(batch, slots, kv_heads, dim)).astype(np.float32)
    values = rng.normal(size=(batch, slots, kv_heads, dim)).astype(np.float32)
    query = rng.normal(size=(batch, chunk, heads, dim)).astype(np.float32)
    positions = np.tile(np.arange(slots), (batch, 1))
    positions[1, :3] = -1  # left padding
    positions[:, written:] = np.arange(slots - written) + 3  # not written yet, with positions a reader would allow
    keys[:, written:] *= 20.0
    q_positions = positions[:, written - chunk:written]
    expected = np.zeros((batch, chunk, heads, dim))
    for b in range(batch):
        for t in range(chunk):
            for h in range(heads):
                kh = h // (heads // kv_heads)
                seen = [s for s in range(written) if 0 <= positions[b, s] <= q_positions[b, t]
                        and (window is None or q_positions[b, t] - positions[b, s] < window)]
                scores = np.array([query[b, t, h] @ keys[b, s, kh] for s in seen]) / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                expected[b, t, h] = (weights / weights.sum()) @ values[b, seen, kh]
    for block in (4, 8):  # written = 10 ends inside a block either way
        ours = attend_written_blocks(jnp.asarray(query), jnp.asarray(q_positions), jnp.asarray(keys),
                                     jnp.asarray(values), jnp.asarray(positions), jnp.asarray(written, jnp.int32),
                                     block=block, sliding_window=window)
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)
