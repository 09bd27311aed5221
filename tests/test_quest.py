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


def brute_force_quest_attention(query, keys, values, positions, q_position, page_size, pages, group_mask):
    """numpy: per KV head, the pages with the highest upper bound (max over the head's queries of
    sum_d max(q min, q max)) plus the newest page_size tokens, then softmax attention over those slots only."""
    batch, length, heads, dim = keys.shape
    rep = query.shape[1] // heads
    out = np.zeros((batch, query.shape[1], dim))
    for b in range(batch):
        for h in range(heads):
            bounds = []
            for start in range(0, length, page_size):
                slots = [s for s in range(start, min(start + page_size, length)) if positions[b, s] >= 0]
                if not slots:
                    bounds.append(-np.inf)
                    continue
                low, high = keys[b, slots, h].min(0), keys[b, slots, h].max(0)
                bounds.append(max(np.maximum(query[b, h * rep + r] * low, query[b, h * rep + r] * high).sum()
                                  for r in range(rep)))
            chosen = np.argsort(-np.asarray(bounds), kind="stable")[:pages]
            for r in range(rep):
                q = query[b, h * rep + r]
                keep = [s for s in range(length) if positions[b, s] >= 0 and positions[b, s] <= q_position[b]
                        and (s // page_size in chosen and np.isfinite(bounds[s // page_size])
                             or q_position[b] - positions[b, s] < page_size)]
                logits = np.array([q @ keys[b, s, h] for s in keep]) / np.sqrt(dim)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                masked = values[b, keep, h] * np.repeat(group_mask[b, keep, h], dim // group_mask.shape[-1], axis=-1)
                out[b, h * rep + r] = w @ masked
    return out


@pytest.mark.parametrize("pages", [1, 2])
def test_a_decode_step_reads_the_best_bounded_pages(pages):
    rng = np.random.default_rng(0)
    batch, length, heads, dim, page = 2, 22, 2, 8, 4
    keys = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    values = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    query = rng.normal(size=(batch, 2 * heads, dim)).astype(np.float32) * 2
    positions = np.broadcast_to(np.arange(length), (batch, length)).copy()
    positions[0, 20:] = -1  # row 0: two empty slots at the end
    q_position = positions.max(axis=1)
    group_mask = (rng.random((batch, length, heads, 4)) < 0.7).astype(np.float32)
    layer = QuestLayerCache(DenseLayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions),
                                            jnp.asarray(length)), jnp.asarray(group_mask), page_size=page, pages=pages)
    got = layer.attend(jnp.asarray(query)[:, None], jnp.asarray(q_position)[:, None])[:, 0]
    want = brute_force_quest_attention(query, keys, values, positions, q_position, page, pages, group_mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_page_bounds_bound_every_logit_in_the_page():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(1, 12, 1, 8)).astype(np.float32)
    query = rng.normal(size=(1, 2, 8)).astype(np.float32)
    bounds = np.asarray(page_bounds(jnp.asarray(query), jnp.asarray(keys), jnp.arange(12)[None], 4))[0, 0]
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
