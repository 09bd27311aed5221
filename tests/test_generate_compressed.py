"""subtoken_jax.generate(..., compression=...): packed-cache generation against the masked dense KV-cache path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from xla_test_env import compilations

from subtoken_jax import Compression, ConfigError, InputError, JointCompression, KVCache, ModelConfig, generate, init_params
from subtoken_jax.attention import Attention
from subtoken_jax import layer_caches
from subtoken_jax.layer_caches import PackedLayerCache, layer_view
from subtoken_jax.compressed_generate import compressed_generate, generate_from_state
from subtoken_jax.packed_cache import bucketed_sizes, pack_cache
from subtoken_jax.selectors import capture_prefill_state, pad_to_capacity
from subtoken_jax.shape_buckets import bucket_length
from generation_fixtures import CONTEXT, NEW, QUESTION, tiny_config, tiny_setup

CONFIG = tiny_config(max_position_embeddings=64)


@pytest.fixture(scope="module")
def setup():
    return tiny_setup(CONFIG)


def masked_dense_answer(model, params, context, question, mask, masks, new_tokens, question_over="compressed"):
    """Reference: a dense KVCache; the question (one chunk) and the answer attend under the masks (question_over
    "full": the question attends to the whole context, only the answer under the masks)."""
    token_masks, group_masks = masks
    capacity = CONTEXT + QUESTION + new_tokens
    layers = CONFIG.num_layers
    token_masks = pad_to_capacity(token_masks, capacity)
    group_masks = pad_to_capacity(group_masks, capacity)
    cache = KVCache.create(CONFIG, 2, capacity)
    _, cache = model.apply({"params": params}, context, cache=cache, attention_mask=mask)
    step = lambda ids, cache: model.apply({"params": params}, ids, cache=cache, value_group_mask=group_masks,  # noqa
                                          token_keep_mask=token_masks)
    if question_over == "full":
        logits, cache = model.apply({"params": params}, question, cache=cache)
    else:
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
    JointCompression(kv_budget=0.375, lookahead=3),  # observed by the question and a 3-token draft
])
def test_query_aware_compression_equals_masked_dense(setup, compression):
    model, params, context, question, mask = setup
    tokens = generate(model, params, context, question_ids=question, attention_mask=mask, compression=compression,
                      max_new_tokens=NEW)
    state = capture_prefill_state(model, params, context, question, context_mask=mask,
                                  lookahead=compression.lookahead)
    expected = masked_dense_answer(model, params, context, question, mask, compression(state), NEW)
    np.testing.assert_array_equal(tokens, expected)


def test_question_prefilled_over_the_full_context_equals_masked_dense(setup):
    """kvpress's protocol (question_over="full"): the question's keys, values and first logits come from its
    prefill over the whole context (a lookahead draft's do not reach the tail); only the answer reads the compressed
    context. The default reads the question over the compressed context: its last layer's question keys differ."""
    model, params, context, question, mask = setup
    compression = JointCompression(kv_budget=0.375, lookahead=3)
    run = lambda over: compressed_generate(model, params, context, question_ids=question, attention_mask=mask,  # noqa
                                           compression=compression, max_new_tokens=NEW, return_cache=True,
                                           question_over=over)
    (tokens, packed), (_, packed_compressed) = run("full"), run("compressed")
    state = capture_prefill_state(model, params, context, question, context_mask=mask, lookahead=3)
    expected = masked_dense_answer(model, params, context, question, mask, compression(state), NEW,
                                   question_over="full")
    np.testing.assert_array_equal(tokens, expected)
    over_full = state.question.keys[-1].astype(packed.tail_keys[-1].dtype)
    np.testing.assert_array_equal(packed.tail_keys[-1][:, :QUESTION], over_full)
    assert not np.allclose(packed_compressed.tail_keys[-1][:, :QUESTION], over_full, atol=1e-3)


def test_question_over_full_needs_a_question_and_takes_it_from_the_state(setup):
    model, params, context, question, mask = setup
    compression = Compression(token_fraction=0.5, value_fraction=0.5)
    with pytest.raises(InputError, match="give question_ids"):
        generate(model, params, context, compression=compression, max_new_tokens=2, question_over="full")
    with pytest.raises(InputError, match="unknown question_over"):
        generate(model, params, context, question_ids=question, compression=compression, max_new_tokens=2,
                 question_over="dense")
    state = capture_prefill_state(model, params, context, question, context_mask=mask)
    with pytest.raises(InputError, match="neither question_ids nor first_logits"):
        generate_from_state(model, params, state, compression(state), max_new_tokens=2, question_ids=question,
                            question_over="full")
    no_question = capture_prefill_state(model, params, context, context_mask=mask)
    with pytest.raises(InputError, match="capture the state with question_ids"):
        generate_from_state(model, params, no_question, compression(no_question), max_new_tokens=2,
                            question_over="full")


def test_lookahead_window_is_the_greedy_full_cache_draft(setup):
    """The draft's queries are those of the answer generated over the full cache: the same as capturing with
    question + draft as the question; the draft itself is greedy generation without compression."""
    model, params, context, question, mask = setup
    draft = generate(model, params, context, question_ids=question, attention_mask=mask, max_new_tokens=3)
    looked = capture_prefill_state(model, params, context, question, context_mask=mask, lookahead=3)
    direct = capture_prefill_state(model, params, context, jnp.concatenate([question, draft], axis=1),
                                   context_mask=mask)
    np.testing.assert_array_equal(looked.query_positions, direct.query_positions)
    for a, b in zip(looked.queries, direct.queries):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(InputError, match="drafts an answer to a question"):
        generate(model, params, context, attention_mask=mask, max_new_tokens=2,
                 compression=Compression(token_fraction=0.5, lookahead=2))
    with pytest.raises(InputError, match="lookahead must be"):
        JointCompression(lookahead=-1)


def test_packed_sizes_are_bucketed_powers_of_two(setup):
    """generate_from_state(bucket=True)'s sizes: powers of two covering every layer's kept pairs and keys (a
    stream of prompts compiles a bounded number of programs); bucketed answers are compared with unbucketed below."""
    model, params, context, question, mask = setup
    state = capture_prefill_state(model, params, context, question, context_mask=mask)
    tokens, groups = JointCompression(kv_budget=0.3)(state)
    capacity, key_capacity = bucketed_sizes(tokens, groups, state.positions)
    kept_pairs = max(int((np.asarray(g) * np.asarray(t)[..., None]).sum((1, 3)).max()) for t, g in zip(tokens, groups))
    kept_keys = max(int(np.asarray(t).sum(1).max()) for t in tokens)
    assert capacity >= kept_pairs and capacity & (capacity - 1) == 0 and capacity < 2 * kept_pairs
    assert key_capacity >= kept_keys and key_capacity & (key_capacity - 1) == 0 and key_capacity < 2 * kept_keys


@pytest.mark.parametrize("compression", [None, JointCompression(kv_budget=0.375)])
def test_bucketed_padding_changes_no_token(setup, compression):
    """A prompt of 21 tokens is left-padded to the bucket 24 (questions of 3 to 16): the same tokens as unpadded
    generation, with and without compression."""
    model, params, _, question, _ = setup
    for length in (21,):
        context = jax.random.randint(jax.random.key(length), (2, length), 0, CONFIG.vocab_size)
        mask = jnp.ones((2, length), jnp.int32).at[1, :5].set(0)
        run = lambda bucket: generate(model, params, context, question_ids=question, attention_mask=mask,  # noqa
                                      compression=compression, max_new_tokens=NEW, bucket=bucket)
        np.testing.assert_array_equal(run(True), run(False))
    assert bucket_length(21) == 24 and bucket_length(27) == 28 and bucket_length(3) == 16


@pytest.mark.parametrize("compression", [None, Compression(token_fraction=0.5, value_fraction=0.5, scorer="snapkv")])
def test_a_prompt_of_a_new_length_in_a_seen_bucket_compiles_nothing(setup, compression):
    """After a prompt of 22 tokens, prompts of 23 and 24 (the same buckets: 24 for the context, 28 with the question)
    compile no new XLA program, full cache or compressed (bucket=True): every stage runs as bucketed programs."""
    model, params, _, question, _ = setup
    with compilations() as compiles:
        for length in (22, 23, 24):
            context = np.random.default_rng(length).integers(0, CONFIG.vocab_size, (2, length))  # host ids
            before = len(compiles)
            kwargs = dict(compression=compression, bucket=True) if compression is not None else {}
            jax.block_until_ready(generate(model, params, context, question_ids=np.asarray(question),
                                           max_new_tokens=NEW, **kwargs))
            if length != 22:
                assert len(compiles) == before, f"{len(compiles) - before} compilations for a {length}-token prompt"
        before = len(compiles)
        jax.jit(lambda x: x * 3 + length)(np.zeros(5))  # a fresh program: the listener does see compilations
        assert len(compiles) == before + 1


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


class _UsersModel(nn.Module):
    """Someone else's Flax model: its own embedding and head around one of our Attention layers."""

    config: ModelConfig

    @nn.compact
    def __call__(self, ids, positions, cache, **masks):
        x = nn.Embed(self.config.vocab_size, self.config.hidden_size)(ids)
        out, cache = Attention(self.config)(x, positions, cache=cache, **masks)
        return nn.Dense(self.config.vocab_size)(x + out), cache


def test_a_users_own_flax_model_decodes_from_the_packed_cache():
    """The cache protocol of layer_caches: a model that is not DecoderLM, built on our Attention, reads a
    packed compressed prefix (global layout, per-head token eviction) exactly as its dense cache under masks."""
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      value_groups=4, max_position_embeddings=32)
    context_len, question_len, batch = 10, 3, 2
    model = _UsersModel(cfg)
    context = jax.random.randint(jax.random.key(0), (batch, context_len), 0, cfg.vocab_size)
    question = jax.random.randint(jax.random.key(1), (batch, question_len), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(context_len + question_len), (batch, context_len + question_len))
    capacity = context_len + question_len
    dense = layer_view(KVCache.create(cfg.replace(num_layers=1), batch, capacity), 0)
    params = model.init(jax.random.key(2), context, positions[:, :context_len], dense)["params"]
    _, dense = model.apply({"params": params}, context, positions[:, :context_len], dense)
    rng = np.random.default_rng(0)
    token_keep = rng.random((batch, context_len, cfg.num_kv_heads)) < 0.6
    groups = (rng.random((batch, context_len, cfg.num_kv_heads, cfg.value_groups)) < 0.5) & token_keep[..., None]
    packed = pack_cache([dense.keys[:, :context_len]], [dense.values[:, :context_len]], positions[:, :context_len],
                        [jnp.asarray(token_keep, jnp.float32)], [jnp.asarray(groups, jnp.float32)],
                        tail_capacity=question_len)
    packed_logits, packed_layer = model.apply({"params": params}, question, positions[:, context_len:],
                                              layer_view(packed, 0))
    pad = lambda m: jnp.concatenate([jnp.asarray(m, jnp.float32), jnp.ones((batch, question_len) + m.shape[2:])], 1)  # noqa
    dense_logits, _ = model.apply({"params": params}, question, positions[:, context_len:], dense,
                                  token_keep_mask=pad(token_keep), value_group_mask=pad(groups))
    np.testing.assert_allclose(packed_logits, dense_logits, atol=1e-5)
    assert isinstance(packed_layer, PackedLayerCache) and int(packed_layer.index) == question_len
    assert layer_view(packed.replace(impl="pallas"), 0).impl == "pallas"  # the cache's impl reaches the layers
    with pytest.raises(InputError, match="holds its compression"):
        model.apply({"params": params}, question, positions[:, context_len:], layer_view(packed, 0),
                    token_keep_mask=pad(token_keep))


def test_recipes_round_kept_counts_down(setup):
    """Compression's one rounding rule (what eval measures too): floor(tau * n) tokens per (row, head), at
    least one, then floor(rho * kept pairs) per head; JointCompression spends at most its budget per head."""
    model, params, context, question, mask = setup
    state = capture_prefill_state(model, params, context, question, context_mask=mask)
    real = np.asarray(mask).sum(1)  # 16 and 12 real tokens
    tokens, groups = Compression(token_fraction=0.3, value_fraction=0.3, scope="head")(state)
    for t, g in zip(tokens, groups):
        kept = np.asarray(t).sum(1)  # [B, Hkv]
        np.testing.assert_array_equal(kept, np.floor(0.3 * real)[:, None].repeat(CONFIG.num_kv_heads, 1))
        pairs = kept * CONFIG.value_groups
        np.testing.assert_array_equal(np.asarray(g).sum((1, 3)), np.floor(np.float32(0.3) * pairs + 1e-6))
    tokens, _ = Compression(token_fraction=0.01, value_fraction=1.0)(state)
    assert np.all(np.asarray(tokens[0]).sum(1) == 1)  # at least one token
    tokens, groups = JointCompression(kv_budget=0.3)(state)
    for t, g in zip(tokens, groups):
        spent = CONFIG.value_groups * np.asarray(t).sum(1) + np.asarray(g).sum((1, 3))  # key = G group units
        assert np.all(spent <= 0.3 * 2 * CONFIG.value_groups * real[:, None] + 1e-4)


def test_budgets_given_as_token_counts(setup):
    """kept_tokens / kv_tokens: the same count per row whatever its length (16 and 12 real tokens), all of a row's
    tokens when it has fewer; the same masks as the fraction a count amounts to; refused with a fraction too."""
    model, params, context, question, mask = setup
    state = capture_prefill_state(model, params, context, question, context_mask=mask)
    for count in (1, 5, 7, 12, 40):
        tokens, groups = Compression(kept_tokens=count, value_fraction=0.5, scope="head")(state)
        for t in tokens:
            np.testing.assert_array_equal(np.asarray(t).sum(1), np.minimum(count, [[16], [12]]).repeat(2, 1))
    # a row of 16 keeping 8 tokens: the masks of token_fraction 0.5 on that row
    by_count = Compression(kept_tokens=8, value_fraction=0.5)(state)
    by_fraction = Compression(token_fraction=0.5, value_fraction=0.5)(state)
    for a, b in zip(by_count[0] + by_count[1], by_fraction[0] + by_fraction[1]):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
    tokens, groups = JointCompression(kv_tokens=6)(state)
    for t, g in zip(tokens, groups):
        spent = CONFIG.value_groups * np.asarray(t).sum(1) + np.asarray(g).sum((1, 3))  # key = G group units
        assert np.all(spent <= 6 * 2 * CONFIG.value_groups + 1e-4) and np.all(spent > 4 * 2 * CONFIG.value_groups)
    with pytest.raises(InputError, match="not both"):
        Compression(kept_tokens=8, token_fraction=0.5)
    for bad in (0, 2.5, True, "8"):
        with pytest.raises(InputError, match="whole number of tokens"):
            JointCompression(kv_tokens=bad)


def test_full_cache_decode_loop_writes_a_tail_and_equals_a_per_token_loop(setup, monkeypatch):
    """decode_full_cache (a scan writing to a TailedKVCache, moved into the cache at the end) against the plain
    loop over model.apply on the KVCache (each token written into the cache, attended over the written cache):
    same tokens, same logits within float tolerance, and the same final cache; a sliding-window model too."""
    from subtoken_jax.generate import decode_full_cache

    model, params, context, _, mask = setup
    for window_model in (False, True):
        if window_model:
            cfg = CONFIG.replace(sliding_windows=(5, None))
            model, params = init_params(cfg, jax.random.key(11))
        cache = KVCache.create(model.config, 2, CONTEXT + NEW + 2)
        logits, cache = model.apply({"params": params}, context, cache=cache, attention_mask=mask)
        first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        tokens, (scanned, last, _, _) = decode_full_cache(model, params, cache, first, jnp.zeros((2,), bool),
                                                          jax.random.key(0), NEW)
        expected, loop_cache, token = [], cache, first
        monkeypatch.setattr(layer_caches, "CHUNK_APART_MAX", 0)  # the reference attends over the written cache
        for _ in range(NEW):
            step_logits, loop_cache = model.apply({"params": params}, token[:, None], cache=loop_cache)
            token = jnp.argmax(step_logits[:, -1], -1).astype(jnp.int32)
            expected.append(token)
        np.testing.assert_array_equal(tokens, jnp.stack(expected, axis=1))
        np.testing.assert_array_equal(last, expected[-1])
        assert int(scanned.index) == int(loop_cache.index) == CONTEXT + NEW
        np.testing.assert_array_equal(scanned.positions, loop_cache.positions)
        for ours, theirs in zip(scanned.keys + scanned.values, loop_cache.keys + loop_cache.values):
            np.testing.assert_allclose(ours, theirs, atol=1e-5)
        monkeypatch.undo()
    with pytest.raises(InputError, match="do not fit a KV cache"):  # the tail must fit: no silent overwrite
        decode_full_cache(model, params, cache, first, jnp.zeros((2,), bool), jax.random.key(0), CONTEXT)


def test_attending_a_chunk_apart_equals_attending_the_written_cache():
    """attend_cache_and_chunk (the cache before the write + the chunk) against attend on the written cache,
    with padding slots, a sliding window and a 3-token chunk attending causally to itself."""
    from subtoken_jax.attention import attend, attend_cache_and_chunk, attention_allowed

    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    keys, values, chunk_k, chunk_v, query = f(2, 10, 2, 8), f(2, 10, 2, 8), f(2, 3, 2, 8), f(2, 3, 2, 8), f(2, 3, 4, 8)
    positions = np.where(np.arange(10) < 6, np.arange(10), -1)[None].repeat(2, 0)
    positions[1, :2] = -1  # left padding
    chunk_pos = jnp.asarray([[6, 7, 8]] * 2, jnp.int32)
    written_pos = jnp.asarray(positions).at[:, 6:9].set(chunk_pos)
    written_k, written_v = keys.at[:, 6:9].set(chunk_k), values.at[:, 6:9].set(chunk_v)
    for window in (None, 4):
        apart = attend_cache_and_chunk(query, keys, values, attention_allowed(chunk_pos, jnp.asarray(positions),
                                                                              sliding_window=window),
                                       chunk_k, chunk_v, attention_allowed(chunk_pos, chunk_pos, sliding_window=window))
        whole = attend(query, written_k, written_v, attention_allowed(chunk_pos, written_pos, sliding_window=window))
        np.testing.assert_allclose(apart, whole, atol=1e-5)


@pytest.mark.parametrize("compression,length", [(None, 58), (JointCompression(kv_budget=0.5), 57)])
def test_a_prompt_that_fits_is_not_refused_for_its_bucket(setup, compression, length):
    """A prompt (+ question) and 4 new tokens that fit max_position_embeddings=64, though their buckets (64 for 57
    or 58 tokens) plus the rest would not: the buckets are capped at the model's positions, and the tokens equal
    the unbucketed run's."""
    model, params, _, question, _ = setup
    prompt = jax.random.randint(jax.random.key(9), (2, length), 0, CONFIG.vocab_size)
    kwargs = {} if compression is None else {"compression": compression, "question_ids": question}
    bucketed = generate(model, params, prompt, max_new_tokens=4, bucket=True, **kwargs)
    plain = generate(model, params, prompt, max_new_tokens=4, bucket=False, **kwargs)
    np.testing.assert_array_equal(bucketed, plain)


def ragged_prompt(length: int, masked: int):
    """Two rows of `length` random host ids (seeded by the length), the second left-padded by `masked` (mask 0)."""
    context = np.random.default_rng(length).integers(0, CONFIG.vocab_size, (2, length))
    mask = np.ones((2, length), np.int32)
    mask[1, :masked] = 0
    return context, mask


@pytest.mark.parametrize("written_blocks", [False, True])
def test_full_cache_prefill_in_chunks_equals_one_shot_and_compiles_per_capacity(setup, monkeypatch, written_blocks):
    """With prefill chunks of 8 tokens, prompts of 17 to 23 tokens (padded to 24, capacity 32 with the question and
    the new tokens) give the unbucketed tokens, and after the first, the others compile nothing. written_blocks:
    each chunk attends block by block over the slots written so far (attend_written_blocks, blocks of 8), as
    SmolLM2's 256-token chunks do; the unbucketed reference attends over every slot."""
    from subtoken_jax import attention, shape_buckets

    monkeypatch.setattr(shape_buckets, "PREFILL_CHUNK", 8)
    blocks_used = []
    jax.clear_caches()  # the patched constants are read when a program is traced
    if written_blocks:
        monkeypatch.setattr(layer_caches, "CHUNK_APART_MAX", 4)
        monkeypatch.setattr(layer_caches, "WRITTEN_BLOCKS", (8,))
        real = attention.attend_written_blocks
        monkeypatch.setattr(layer_caches, "attend_written_blocks",
                            lambda *a, **k: blocks_used.append(k["block"]) or real(*a, **k))
    model, params, _, question, _ = setup
    assert shape_buckets.full_prefill_plan(17, NEW, 64) == (24, 8, 32)
    with compilations() as compiles:
        for length in (17, 20, 23):
            context, mask = ragged_prompt(length, masked=6)
            before = len(compiles)
            chunked = generate(model, params, context, attention_mask=mask, max_new_tokens=NEW, bucket=True)
            if length != 17:
                assert len(compiles) == before, f"{len(compiles) - before} compilations for a {length}-token prompt"
            with monkeypatch.context() as plain:
                plain.setattr(layer_caches, "WRITTEN_BLOCKS", ())
                np.testing.assert_array_equal(chunked, generate(model, params, context, attention_mask=mask,
                                                                max_new_tokens=NEW, bucket=False))
    assert bool(blocks_used) == written_blocks
    assert [shape_buckets.capacity_bucket(n) for n in (16, 17, 24, 25, 33, 48, 49)] == [16, 24, 24, 32, 48, 48, 64]


def test_a_pinned_cache_capacity_serves_every_length_with_one_set_of_programs(setup, monkeypatch):
    """cache_capacity=40 (rounded up to blocks of 8): prompts of 9, 17 and 27 tokens, whose own capacity buckets
    differ (16, 32, 48 with the new tokens), give the unbucketed tokens, and after the first compile nothing; a
    prompt too long for the pinned cache is refused before any compute."""
    from subtoken_jax import shape_buckets

    monkeypatch.setattr(shape_buckets, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(shape_buckets, "CAPACITY_STEP", 8)
    jax.clear_caches()
    model, params, _, _, _ = setup
    assert [shape_buckets.full_prefill_plan(n, NEW, 64)[2] for n in (9, 17, 27)] == [24, 32, 48]
    assert shape_buckets.full_prefill_plan(9, NEW, 64, capacity=37) == (16, 8, 40)
    with compilations() as compiles:
        for length in (9, 17, 27):
            context, mask = ragged_prompt(length, masked=3)
            before = len(compiles)
            pinned = generate(model, params, context, attention_mask=mask, max_new_tokens=NEW, cache_capacity=37)
            if length != 9:
                assert len(compiles) == before, f"{len(compiles) - before} compilations for a {length}-token prompt"
            np.testing.assert_array_equal(pinned, generate(model, params, context, attention_mask=mask,
                                                           max_new_tokens=NEW, bucket=False))
    too_long = np.zeros((1, 35), np.int32)  # padded to 40, + NEW new tokens > 40
    with pytest.raises(InputError, match="cache_capacity 40 is too small"):
        generate(model, params, too_long, max_new_tokens=NEW, cache_capacity=37)
    with pytest.raises(InputError, match="positive number of cache slots"):
        generate(model, params, too_long, max_new_tokens=NEW, cache_capacity=0)
    with pytest.raises(InputError, match="not with compression"):
        generate(model, params, too_long, max_new_tokens=NEW, cache_capacity=64,
                 compression=JointCompression(kv_budget=0.5))
