"""subtoken_jax.generate(..., compression=...): packed-cache generation against the masked dense KV-cache path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subtoken_jax import Compression, ConfigError, InputError, JointCompression, KVCache, ModelConfig, generate, init_params
from subtoken_jax.selectors import capture_prefill_state, pad_to_capacity

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     value_groups=4, max_position_embeddings=64)
CONTEXT, QUESTION, NEW = 16, 3, 5


@pytest.fixture(scope="module")
def setup():
    model, params = init_params(CONFIG, jax.random.key(11))
    context = jax.random.randint(jax.random.key(1), (2, CONTEXT), 0, CONFIG.vocab_size)
    question = jax.random.randint(jax.random.key(2), (2, QUESTION), 0, CONFIG.vocab_size)
    mask = jnp.ones((2, CONTEXT), jnp.int32).at[1, :4].set(0)  # row 1 left-padded
    return model, params, context, question, mask


def masked_dense_answer(model, params, context, question, mask, masks, new_tokens):
    """Reference: a dense KVCache; the question (one chunk) and the answer attend under the masks."""
    token_masks, group_masks = masks
    capacity = CONTEXT + QUESTION + new_tokens
    layers = CONFIG.num_layers
    token_masks = pad_to_capacity(token_masks, capacity)
    group_masks = pad_to_capacity(group_masks, capacity)
    cache = KVCache.create(CONFIG, 2, capacity)
    _, cache = model.apply({"params": params}, context, cache=cache, attention_mask=mask)
    step = lambda ids, cache: model.apply({"params": params}, ids, cache=cache, value_group_mask=group_masks,  # noqa
                                          token_keep_mask=token_masks)
    logits, cache = step(question, cache)
    tokens = [jnp.argmax(logits[:, -1], -1).astype(jnp.int32)]
    for _ in range(new_tokens - 1):
        logits, cache = step(tokens[-1][:, None], cache)
        tokens.append(jnp.argmax(logits[:, -1], -1).astype(jnp.int32))
    assert len(token_masks) == layers
    return jnp.stack(tokens, axis=1)


@pytest.mark.parametrize("compression", [
    Compression(token_fraction=0.5, value_fraction=0.5, selector="snapkv", scorer="attention"),
    Compression(token_fraction=0.75, value_fraction=0.25, selector="key_norm", scorer="expected", scope="head"),
    JointCompression(kv_budget=0.375),  # per-(token, head) keys and group counts
])
def test_query_aware_compression_equals_masked_dense(setup, compression):
    model, params, context, question, mask = setup
    tokens = generate(model, params, context, question_ids=question, attention_mask=mask, compression=compression,
                      max_new_tokens=NEW)
    state = capture_prefill_state(model, params, context, question, context_mask=mask)
    expected = masked_dense_answer(model, params, context, question, mask, compression(state), NEW)
    np.testing.assert_array_equal(tokens, expected)


def test_full_budget_equals_uncompressed_generation(setup):
    model, params, context, question, mask = setup
    full = Compression(token_fraction=1.0, value_fraction=1.0)
    compressed = generate(model, params, context, question_ids=question, attention_mask=mask, compression=full,
                          max_new_tokens=NEW)
    plain = generate(model, params, context, question_ids=question, attention_mask=mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(compressed, plain)


def test_sampling_progress_and_eos(setup):
    model, params, context, question, mask = setup
    comp = Compression(token_fraction=0.5, value_fraction=0.5)
    greedy = generate(model, params, context, question_ids=question, compression=comp, max_new_tokens=NEW)
    # top_k=1 sampling is greedy whatever the key; chunked decoding (progress) changes nothing
    top1 = generate(model, params, context, question_ids=question, compression=comp, max_new_tokens=NEW,
                    temperature=0.7, top_k=1, rng=jax.random.key(5), progress=True, chunk=2)
    np.testing.assert_array_equal(top1, greedy)
    one = generate(model, params, context, question_ids=question, compression=comp, max_new_tokens=NEW,
                   temperature=1.0, rng=jax.random.key(5))
    again = generate(model, params, context, question_ids=question, compression=comp, max_new_tokens=NEW,
                     temperature=1.0, rng=jax.random.key(5))
    np.testing.assert_array_equal(one, again)
    other = [generate(model, params, context, question_ids=question, compression=comp, max_new_tokens=NEW,
                      temperature=5.0, rng=jax.random.key(s)) for s in range(4)]
    assert any(not np.array_equal(other[0], o) for o in other[1:])  # sampling does sample
    eos = int(greedy[0, 1])  # the first row emits it at step 1: everything after must be eos too
    stopped = generate(model, params, context, question_ids=question, compression=comp, max_new_tokens=NEW,
                       eos_id=eos)
    assert np.all(np.asarray(stopped[0, 1:]) == eos)


def test_bad_inputs(setup):
    model, params, context, question, _ = setup
    with pytest.raises(ConfigError, match="token_fraction"):
        Compression(token_fraction=0.0)
    with pytest.raises(InputError, match="unknown token selector"):
        Compression(selector="nope")
    with pytest.raises(InputError, match="scope"):
        Compression(scope="nope")
    with pytest.raises(ConfigError, match="kv_budget"):
        JointCompression(kv_budget=1.5)
    with pytest.raises(InputError, match="only with compression"):
        generate(model, params, context, max_new_tokens=2, layout="global")
    with pytest.raises(InputError, match="max_position_embeddings"):
        generate(model, params, context, question_ids=question, compression=Compression(), max_new_tokens=60)
    with pytest.raises(InputError, match="rng"):
        generate(model, params, context, compression=Compression(), max_new_tokens=2, temperature=1.0)


def test_left_padded_question_equals_unpadded(setup):
    """Row 1's question is left-padded by 2 in the batch: its answer equals that row generated alone, unpadded."""
    model, params, context, question, mask = setup
    comp = Compression(token_fraction=0.5, value_fraction=0.5, selector="key_norm")
    padded = question.at[1, :2].set(0)
    q_mask = jnp.ones_like(question).at[1, :2].set(0)
    batch = generate(model, params, context, attention_mask=mask, question_ids=padded, question_mask=q_mask,
                     compression=comp, max_new_tokens=NEW)
    alone = generate(model, params, context[1:], attention_mask=mask[1:], question_ids=question[1:, 2:],
                     compression=comp, max_new_tokens=NEW)
    np.testing.assert_array_equal(batch[1], alone[0])
    dense = generate(model, params, context[1:], attention_mask=mask[1:], question_ids=question[1:, 2:],
                     max_new_tokens=NEW)
    dense_padded = generate(model, params, context, attention_mask=mask, question_ids=padded, question_mask=q_mask,
                            max_new_tokens=NEW)
    np.testing.assert_array_equal(dense_padded[1], dense[0])
