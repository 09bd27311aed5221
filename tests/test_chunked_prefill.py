"""Chunked prefill with compression between chunks (subtoken_jax.chunked_prefill) against one-shot compression and
a dense cache under brute-force masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subtoken_jax import Compression, InputError, JointCompression, KVCache, generate
from subtoken_jax.chunked_prefill import chunked_compressed_generate, join, chunk_slots, prefix_slots
from subtoken_jax.packed_cache import pack_head_major
from generation_fixtures import CONTEXT, NEW, QUESTION, tiny_config, tiny_setup

CONFIG = tiny_config(max_position_embeddings=96)


@pytest.fixture(scope="module")
def setup():
    return tiny_setup(CONFIG)


@pytest.mark.parametrize("compression", [
    Compression(token_fraction=0.5, value_fraction=0.5, selector="snapkv", scope="head"),
    JointCompression(kv_budget=0.375, lookahead=2),
])
def test_one_chunk_is_one_shot_compression(setup, compression):
    model, params, context, question, mask = setup
    one_shot = generate(model, params, context, question_ids=question, attention_mask=mask, compression=compression,
                        max_new_tokens=NEW)
    chunked = generate(model, params, context, question_ids=question, attention_mask=mask, compression=compression,
                       max_new_tokens=NEW, prefill_chunk=CONTEXT)
    np.testing.assert_array_equal(chunked, one_shot)


def streaming_keep(candidates, seen: int, fraction: float, sinks: int = 4):
    """Brute force: the positions StreamingLLM keeps of the candidates (survivors + chunk) when `seen` context
    tokens have gone by: floor(fraction * seen) of them (at least 1), sinks first, then the most recent."""
    k = max(int(np.floor(fraction * seen + 1e-6)), 1)
    return sorted(sorted(candidates, key=lambda p: (p >= sinks, -p))[:k])


@pytest.mark.parametrize("chunk, bucket", [(4, False), (6, False), (6, True)])
def test_chunked_streaming_equals_dense_cache_under_brute_force_masks(setup, chunk, bucket):
    """Each chunk attends to the survivors of the earlier rounds only: a dense cache with the brute-force kept
    positions as token masks, run chunk by chunk, gives the same answer. bucket: the context is left-padded to
    whole chunks (the remainder is the first chunk) and the question to its bucket; the padding changes nothing."""
    model, params, context, question, _ = setup
    fraction = 0.375
    compression = Compression(token_fraction=fraction, selector="streaming", scope="head")
    tokens, packed, rounds = chunked_compressed_generate(model, params, context, question_ids=question,
                                                         compression=compression, chunk_size=chunk,
                                                         max_new_tokens=NEW, bucket=bucket)
    capacity = CONTEXT + QUESTION + NEW
    cache = KVCache.create(CONFIG, 2, capacity)
    keep = np.ones(capacity, np.float32)
    survivors = []

    def run(ids, cache):
        mask = jnp.broadcast_to(jnp.asarray(keep)[None, :, None], (2, capacity, CONFIG.num_kv_heads))
        return model.apply({"params": params}, ids, cache=cache, token_keep_mask=mask)

    ends = list(range(CONTEXT % chunk if bucket else chunk, CONTEXT, chunk)) + [CONTEXT]
    ends = [e for e in ends if e > 0]
    for start, seen in zip([0] + ends[:-1], ends):
        _, cache = run(context[:, start:seen], cache)
        survivors = streaming_keep(survivors + list(range(start, seen)), seen, fraction)
        keep[:seen] = 0
        keep[survivors] = 1
    logits, cache = run(question, cache)
    expected = [jnp.argmax(logits[:, -1], -1)]
    for _ in range(NEW - 1):
        logits, cache = run(expected[-1][:, None].astype(jnp.int32), cache)
        expected.append(jnp.argmax(logits[:, -1], -1))
    np.testing.assert_array_equal(tokens, jnp.stack(expected, axis=1))
    assert [r["tokens_seen"] for r in rounds] == ends
    # the final prefix holds the brute-force kept positions, in every layer and KV head
    for layer in packed.layers:  # (with bucket, slots beyond the survivors are empty: position -1)
        held = np.asarray(layer.keys.positions).reshape(-1, layer.keys.positions.shape[-1])
        assert all(sorted(row[row >= 0]) == survivors for row in held)


def test_the_cache_holds_the_budget_plus_one_chunk(setup):
    """48 context tokens in chunks of 8 at a quarter of the tokens: the cache arrays never hold more than the
    survivors (12 tokens at most) and one chunk, metadata included, while a full cache grows to 48 tokens."""
    model, params, _, question, _ = setup
    context = jax.random.randint(jax.random.key(5), (2, 48), 0, CONFIG.vocab_size)
    compression = Compression(token_fraction=0.25, selector="snapkv", scope="head")
    _, packed, rounds = chunked_compressed_generate(model, params, context, question_ids=question,
                                                    compression=compression, chunk_size=8, max_new_tokens=2)
    per_token = rounds[0]["full_bytes"] // 8  # dense keys + values of one token (every layer, both rows)
    for r in rounds:
        survivors = int(np.floor(0.25 * (r["tokens_seen"] - 8)))
        # keys, values, positions and group indices of survivors + chunk; the group indices and counts are the
        # metadata a global layout adds (at most one byte per kept group)
        assert r["held_bytes"] <= (survivors + 8 + QUESTION) * per_token * 1.3, r
        assert r["kept_bytes"] <= int(np.floor(0.25 * r["tokens_seen"])) * per_token * 1.3, r
    assert rounds[-1]["full_bytes"] == 48 * per_token
    assert rounds[-1]["held_bytes"] < 0.5 * rounds[-1]["full_bytes"]
    assert all(layer.keys.keys.shape[2] == 12 for layer in packed.layers)  # floor(0.25 * 48) key slots per head


def test_survivors_round_trip_through_the_packed_layout():
    """prefix_slots(pack_head_major(...)) gives back the kept slots' keys, the kept groups' values and zeros for the
    dropped ones (numpy brute force); joining a chunk keeps positions increasing."""
    rng = np.random.default_rng(0)
    batch, heads, slots, dim, groups = 2, 2, 6, 8, 4
    keys = rng.normal(size=(batch, heads, slots, dim)).astype(np.float32)
    values = rng.normal(size=(batch, heads, slots, dim)).astype(np.float32)
    positions = np.broadcast_to(np.arange(slots), (batch, heads, slots)).copy()
    positions[1, :, 0] = -1  # an empty slot
    keep = rng.random((batch, heads, slots)) < 0.6
    group_mask = rng.random((batch, heads, slots, groups)) < 0.5
    layer = pack_head_major(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions), jnp.asarray(keep),
                            jnp.asarray(group_mask), capacity=slots * groups, key_capacity=slots)
    back = prefix_slots(layer)
    for b in range(batch):
        for h in range(heads):
            kept = [s for s in range(slots) if keep[b, h, s] and positions[b, h, s] >= 0]
            n = len(kept)
            np.testing.assert_array_equal(np.asarray(back.positions[b, h, :n]), positions[b, h, kept])
            assert np.all(np.asarray(back.positions[b, h, n:]) == -1)
            np.testing.assert_allclose(np.asarray(back.keys[b, h, :n]), keys[b, h, kept])
            held = group_mask[b, h, kept]  # [n, G]
            want = (values[b, h, kept].reshape(n, groups, -1) * held[..., None]).reshape(n, dim)
            np.testing.assert_allclose(np.asarray(back.values[b, h, :n]), want)
            np.testing.assert_array_equal(np.asarray(back.present[b, h, :n]), held)
    chunk = chunk_slots(jnp.zeros((batch, 3, heads, dim)), jnp.zeros((batch, 3, heads, dim)),
                        jnp.broadcast_to(jnp.arange(6, 9), (batch, 3)), groups)
    joined = join(back, chunk)
    assert joined.keys.shape == (batch, heads, slots + 3, dim) and bool(jnp.all(joined.present[:, :, slots:]))


def test_bad_chunked_inputs(setup):
    model, params, context, question, _ = setup
    run = lambda compression, **kw: generate(model, params, context, question_ids=question, max_new_tokens=2,  # noqa
                                             compression=compression, **kw)
    with pytest.raises(InputError, match="scope='head'"):
        run(Compression(token_fraction=0.5), prefill_chunk=4)  # the default scope is global
    with pytest.raises(InputError, match="moves budget across heads"):
        run(Compression(token_fraction=0.5, selector="adakv", scope="head"), prefill_chunk=4)
    with pytest.raises(InputError, match="value_fill"):
        run(JointCompression(kv_budget=0.5, value_fill="mean"), prefill_chunk=4)
    with pytest.raises(InputError, match=">= 1 token"):
        run(JointCompression(kv_budget=0.5), prefill_chunk=0)
    with pytest.raises(InputError, match="give them with compression"):
        generate(model, params, context, max_new_tokens=2, prefill_chunk=4)


def test_decoding_time_compression_equals_dense_cache_under_brute_force_masks(setup):
    """compress_every=4 with a 6-token StreamingLLM budget: after the context, and after every 4 decoded tokens,
    the cache keeps the sinks and the most recent of its survivors + tail; a dense cache under those brute-force
    masks decodes the same tokens, and no compression round keeps more than 6 keys per head."""
    model, params, context, question, _ = setup
    kept, every, new = 6, 4, 13
    compression = Compression(kept_tokens=kept, selector="streaming", scope="head")
    tokens, packed, rounds = chunked_compressed_generate(model, params, context, question_ids=question,
                                                         compression=compression, chunk_size=CONTEXT,
                                                         max_new_tokens=new, compress_every=every)
    capacity = CONTEXT + QUESTION + new
    cache = KVCache.create(CONFIG, 2, capacity)
    keep = np.ones(capacity, np.float32)

    def run(ids, cache):
        mask = jnp.broadcast_to(jnp.asarray(keep)[None, :, None], (2, capacity, CONFIG.num_kv_heads))
        return model.apply({"params": params}, ids, cache=cache, token_keep_mask=mask)

    def compress(candidates, fed):
        survivors = sorted(sorted(candidates, key=lambda p: (p >= 4, -p))[:kept])
        keep[:fed] = 0
        keep[survivors] = 1
        return survivors

    _, cache = run(context, cache)
    survivors = compress(list(range(CONTEXT)), CONTEXT)
    logits, cache = run(question, cache)
    expected = [jnp.argmax(logits[:, -1], -1).astype(jnp.int32)]
    fed = CONTEXT + QUESTION
    intervals = [min(every, new - 1 - i) for i in range(0, new - 1, every)]
    for n, steps in enumerate(intervals):
        for _ in range(steps):
            logits, cache = run(expected[-1][:, None], cache)
            expected.append(jnp.argmax(logits[:, -1], -1).astype(jnp.int32))
        if n + 1 < len(intervals):
            start = CONTEXT if n == 0 else fed
            fed = CONTEXT + QUESTION + sum(intervals[:n + 1])
            survivors = compress(survivors + list(range(start, fed)), fed)
    np.testing.assert_array_equal(tokens, jnp.stack(expected, axis=1))
    assert [r["phase"] for r in rounds] == ["prefill"] + ["decode"] * (len(intervals) - 1)
    for layer in packed.layers:
        np.testing.assert_array_equal(np.sort(np.asarray(layer.keys.positions), axis=-1),
                                      np.broadcast_to(survivors, layer.keys.positions.shape))
    # held: at most 6 survivors + the tail (question and 4 tokens in the first interval, 4 later)
    per_token = rounds[0]["full_bytes"] // CONTEXT
    assert all(r["held_bytes"] <= (kept + QUESTION + every) * per_token * 1.3 for r in rounds[1:])


def test_without_decoding_compression_the_answer_is_unchanged(setup):
    """compress_every longer than the answer compresses nothing after the context: the same tokens as one-shot."""
    model, params, context, question, mask = setup
    compression = JointCompression(kv_budget=0.5)
    one_shot = generate(model, params, context, question_ids=question, attention_mask=mask, compression=compression,
                        max_new_tokens=NEW)
    late = generate(model, params, context, question_ids=question, attention_mask=mask, compression=compression,
                    max_new_tokens=NEW, compress_every=NEW)
    np.testing.assert_array_equal(late, one_shot)
    with pytest.raises(InputError, match="compress_every must be >= 1"):
        generate(model, params, context, question_ids=question, compression=compression, max_new_tokens=3,
                 compress_every=0)


def test_observe_question_every_round_equals_a_brute_force(setup):
    """observe_question: each round keeps the tokens the question attends to most when read over that round's
    survivors + chunk. Brute force: a dense cache under per-(layer, head) keep masks, the question's queries taken
    from the model, softmax over the candidate slots, mean over the group's heads and the question's tokens."""
    from subtoken_jax.selectors import SnapKV

    model, params, context, question, _ = setup
    chunk, fraction = 8, 0.5
    compression = Compression(token_fraction=fraction, selector=SnapKV(kernel_size=1), scope="head")
    _, packed, _ = chunked_compressed_generate(model, params, context, question_ids=question, compression=compression,
                                               chunk_size=chunk, max_new_tokens=2, observe_question=True)
    layers, heads, rep = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.num_heads // CONFIG.num_kv_heads
    capacity = CONTEXT + QUESTION
    keep = np.ones((layers, 2, capacity, heads), np.float32)
    cache = KVCache.create(CONFIG, 2, capacity, jnp.float32)
    survivors = [[[[] for _ in range(heads)] for _ in range(2)] for _ in range(layers)]
    for start in range(0, CONTEXT, chunk):
        masks = tuple(jnp.asarray(m) for m in keep)
        _, cache = model.apply({"params": params}, context[:, start:start + chunk], cache=cache, token_keep_mask=masks)
        positions = jnp.broadcast_to(jnp.arange(QUESTION, dtype=jnp.int32) + start + chunk, (2, QUESTION))
        (_, asked), variables = model.apply({"params": params}, question, positions=positions, cache=cache,
                                            token_keep_mask=masks, mutable=["prefill"])
        seen = start + chunk
        for layer in range(layers):
            q = np.asarray(variables["prefill"][f"layer_{layer}"]["attn"]["queries"][0], np.float64)
            k = np.asarray(asked.keys[layer], np.float64)
            for b in range(2):
                for h in range(heads):
                    slots = survivors[layer][b][h] + list(range(start, seen))
                    score = np.zeros(len(slots))
                    for r in range(rep):
                        logits = q[b, :, h * rep + r] @ k[b, slots, h].T / np.sqrt(k.shape[-1])  # [Q, slots]
                        w = np.exp(logits - logits.max(axis=1, keepdims=True))
                        score += (w / w.sum(axis=1, keepdims=True)).sum(axis=0) / (rep * QUESTION)
                    order = sorted(range(len(slots)), key=lambda i: (-score[i], -slots[i]))
                    survivors[layer][b][h] = sorted(slots[i] for i in order[:int(np.floor(fraction * seen))])
                    keep[layer, b, :seen, h] = 0
                    keep[layer, b, survivors[layer][b][h], h] = 1
    for layer in range(layers):
        held = np.asarray(packed.layers[layer].keys.positions)
        for b in range(2):
            for h in range(heads):
                assert sorted(held[b, h][held[b, h] >= 0]) == survivors[layer][b][h], (layer, b, h)
    with pytest.raises(InputError, match="give prefill_chunk"):
        generate(model, params, context, question_ids=question, compression=compression, max_new_tokens=2,
                 observe_question=True)
    with pytest.raises(InputError, match="observe_question observes every chunk through the question"):
        chunked_compressed_generate(model, params, context, compression=compression, chunk_size=chunk,
                                    max_new_tokens=2, observe_question=True)
