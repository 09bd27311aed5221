"""Quest's page selection and decoding (subtoken_jax.quest_pages, quest) against numpy brute force and the full cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subtoken_jax import Compression, InputError, ModelConfig, generate, init_params
from subtoken_jax.layer_caches import DenseLayerCache, QuestLayerCache
from subtoken_jax.quest import quest_generate
from subtoken_jax.quest_pages import page_bounds

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     value_groups=4, max_position_embeddings=96)


def brute_force_quest_attention(query, keys, values, positions, context_end, page_size, pages, group_mask):
    """numpy: per KV head, the context pages (positions p*page .. (p+1)*page - 1) with the highest upper bound (max
    over the head's queries of sum_d max(q min, q max)), plus every slot from context_end on, then softmax
    attention over those slots only, the values under the group mask."""
    batch, length, heads, dim = keys.shape
    rep = query.shape[1] // heads
    out = np.zeros((batch, query.shape[1], dim))
    for b in range(batch):
        q_position = positions[b].max()
        for h in range(heads):
            bounds = {}
            for s in range(length):
                if 0 <= positions[b, s] < context_end:
                    bounds.setdefault(positions[b, s] // page_size, []).append(s)
            scored = {p: max(np.maximum(query[b, h * rep + r] * keys[b, slots, h].min(0),
                                        query[b, h * rep + r] * keys[b, slots, h].max(0)).sum() for r in range(rep))
                      for p, slots in bounds.items()}
            chosen = sorted(scored, key=lambda p: -scored[p])[:pages]
            keep = [s for s in range(length) if 0 <= positions[b, s] <= q_position
                    and (positions[b, s] >= context_end or positions[b, s] // page_size in chosen)]
            for r in range(rep):
                q = query[b, h * rep + r]
                logits = np.array([q @ keys[b, s, h] for s in keep]) / np.sqrt(dim)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                masked = values[b, keep, h] * np.repeat(group_mask[b, keep, h], dim // group_mask.shape[-1], axis=-1)
                out[b, h * rep + r] = w @ masked
    return out


@pytest.mark.parametrize("pages", [1, 2])
def test_a_decode_step_reads_the_best_bounded_pages(pages):
    rng = np.random.default_rng(0)
    batch, length, heads, dim, page, context_end = 2, 22, 2, 8, 4, 17
    keys = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    values = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    query = rng.normal(size=(batch, 2 * heads, dim)).astype(np.float32) * 2
    positions = np.broadcast_to(np.arange(length), (batch, length)).copy()
    positions[1] = np.arange(length) - 3  # row 1: three left-padding slots (pages follow positions, not slots)
    positions[1, :3] = -1
    group_mask = (rng.random((batch, length, heads, 4)) < 0.7).astype(np.float32)
    layer = QuestLayerCache(DenseLayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions),
                                            jnp.asarray(length)), jnp.asarray(group_mask), page_size=page,
                            pages=jnp.full((batch,), pages), context_end=jnp.full((batch,), context_end))
    q_position = positions.max(axis=1)
    got = layer.attend(jnp.asarray(query)[:, None], jnp.asarray(q_position)[:, None])[:, 0]
    want = brute_force_quest_attention(query, keys, values, positions, context_end, page, pages, group_mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_page_bounds_bound_every_logit_in_the_page():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(1, 12, 1, 8)).astype(np.float32)
    query = rng.normal(size=(1, 2, 8)).astype(np.float32)
    bounds = np.asarray(page_bounds(jnp.asarray(query), jnp.asarray(keys), jnp.arange(12)[None], 4,
                                    jnp.asarray([12])))[0, 0]
    logits = np.einsum("rd,sd->rs", query[0], keys[0, :, 0]).max(axis=0).reshape(3, 4).max(axis=1)
    assert np.all(bounds >= logits - 1e-5)


@pytest.fixture(scope="module")
def setup():
    model, params = init_params(CONFIG, jax.random.key(3))
    context = jax.random.randint(jax.random.key(1), (2, 24), 0, CONFIG.vocab_size)
    question = jax.random.randint(jax.random.key(2), (2, 3), 0, CONFIG.vocab_size)
    return model, params, context, question


def test_quest_reading_every_page_is_the_full_cache(setup):
    model, params, context, question = setup
    full = generate(model, params, jnp.concatenate([context, question], axis=1), max_new_tokens=6)
    quest = quest_generate(model, params, context, question, max_new_tokens=6, token_fraction=1.0, page_size=4)
    np.testing.assert_array_equal(quest, full)


def test_quest_with_value_groups_and_bad_inputs(setup):
    model, params, context, question = setup
    groups = Compression(value_fraction=0.5, scorer="snapkv")
    few = quest_generate(model, params, context, question, max_new_tokens=4, token_fraction=0.25, page_size=4,
                         compression=groups)
    assert few.shape == (2, 4)
    with pytest.raises(InputError, match="keeps every token"):
        quest_generate(model, params, context, question, max_new_tokens=2, token_fraction=0.5,
                       compression=Compression(token_fraction=0.5))
    with pytest.raises(InputError, match="page_size"):
        quest_generate(model, params, context, question, max_new_tokens=2, token_fraction=0.5, page_size=0)
    with pytest.raises(InputError, match="max_position_embeddings"):
        quest_generate(model, params, context, question, max_new_tokens=80, token_fraction=0.5)


def test_quest_reading_every_page_with_value_groups_is_the_packed_cache(setup):
    """Every page read and half the value groups dropped: the same answer as one-shot compression to those groups
    (a 25-token context, left-padded inside quest_generate to its length bucket)."""
    model, params, context, question = setup
    context = jnp.concatenate([context, context[:, :1]], axis=1)
    groups = Compression(value_fraction=0.5, scorer="snapkv")
    packed = generate(model, params, context, question_ids=question, compression=groups, max_new_tokens=5)
    quest = quest_generate(model, params, context, question, max_new_tokens=5, token_fraction=1.0, page_size=4,
                           compression=groups)
    np.testing.assert_array_equal(quest, packed)
