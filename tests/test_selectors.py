"""KV selectors against brute-force numpy loops; exact budgets of top-k and allocation; lossless budget 1.0;
expected attention against realised attention on a tiny random model."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subtoken_jax import InputError, KVCache, ModelConfig, init_params
from subtoken_jax.layers import rope_inverse_frequencies
from subtoken_jax.selectors import (H2O, SCOPES, TOKEN_SELECTORS, TOVA, AdaKV, ExpectedAttention, KeyNorm,
                                    PrefillState, PyramidKV, RandomSelector, SnapKV, StreamingLLM,
                                    accumulated_attention, pyramid_fractions,
                                    allocate_joint, allocate_value_groups, capture_prefill_state, combine, kv_bytes_fraction,
                                    pad_to_capacity, select_tokens, value_group_scorer, value_group_scores,
                                    window_attention)
from subtoken_jax.selectors.expected_attention import expected_attention_weights

# ----------------------------------------------------------------------------- brute-force references


def random_state(seed=0, batch=2, length=10, window=3, heads=4, kv_heads=2, dim=8, groups=4, layers=2,
                 pads=(0, 3), in_context=False):
    """A PrefillState of random arrays; row b is left-padded with pads[b] slots."""
    rng = np.random.default_rng(seed)
    positions = np.full((batch, length), -1, np.int32)
    for b in range(batch):
        positions[b, pads[b]:] = np.arange(length - pads[b])
    if in_context:
        q_positions = positions[:, -window:].copy()
    else:
        q_positions = positions.max(1, keepdims=True) + 1 + np.arange(window)[None]
        q_positions[-1, -1] = -1  # a padded question slot
    arr = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    return PrefillState(
        keys=tuple(arr(batch, length, kv_heads, dim) for _ in range(layers)),
        values=tuple(arr(batch, length, kv_heads, dim) for _ in range(layers)),
        queries=tuple(arr(batch, window, heads, dim) for _ in range(layers)),
        positions=jnp.asarray(positions), query_positions=jnp.asarray(q_positions),
        inv_freq=jnp.asarray(rope_inverse_frequencies(dim, 10000.0)),
        attention=tuple(jnp.asarray(rng.random((batch, kv_heads, length)).astype(np.float32)) for _ in range(layers)),
        value_groups=groups, window_in_context=in_context,
        context_queries=tuple(arr(batch, length, heads, dim) for _ in range(layers)))


def np_state(state, layer):
    n = lambda x: np.asarray(x, np.float64)  # noqa: E731
    return (n(state.queries[layer]), n(state.keys[layer]), n(state.values[layer]), np.asarray(state.positions),
            np.asarray(state.query_positions))


def ref_window_attention(state, layer, moment=1):
    q, k, _, pos, qpos = np_state(state, layer)
    batch, window, heads, dim = q.shape
    kv_heads, length = k.shape[2], k.shape[1]
    rep = heads // kv_heads
    out = np.zeros((batch, kv_heads, length))
    for b in range(batch):
        valid_t = [t for t in range(window) if qpos[b, t] >= 0]
        for h in range(heads):
            for t in valid_t:
                seen = [s for s in range(length) if 0 <= pos[b, s] <= qpos[b, t]]
                logits = np.array([q[b, t, h] @ k[b, s, h // rep] / np.sqrt(dim) for s in seen])
                w = np.exp(logits - logits.max())
                for s, ws in zip(seen, w / w.sum()):
                    out[b, h // rep, s] += ws ** moment / (len(valid_t) * rep)
    return out


def ref_last_query_attention(state, layer):
    """TOVA: softmax of each row's latest window query over the keys it may see, mean over all query heads."""
    q, k, _, pos, qpos = np_state(state, layer)
    batch, _, heads, dim = q.shape
    rep = heads // k.shape[2]
    out = np.zeros(k.shape[:2])
    for b in range(batch):
        t = int(np.argmax(qpos[b]))
        seen = [s for s in range(k.shape[1]) if 0 <= pos[b, s] <= qpos[b, t]]
        for h in range(heads):
            logits = np.array([q[b, t, h] @ k[b, s, h // rep] / np.sqrt(dim) for s in seen])
            w = np.exp(logits - logits.max())
            out[b, seen] += w / w.sum() / heads
    return np.broadcast_to(out[..., None], k.shape[:3])


def ref_pool(x, kernel, mode):
    out = np.zeros_like(x)
    half = kernel // 2
    for idx in np.ndindex(x.shape[:-1]):
        for s in range(x.shape[-1]):
            window = [x[idx + (j,)] for j in range(s - half, s + half + 1) if 0 <= j < x.shape[-1]]
            out[idx + (s,)] = sum(window) / kernel if mode == "avg" else max(window)
    return out


def rope_matrix(p, inv_freq):
    """Explicit D x D rotation of the half-split layout at position p."""
    half = len(inv_freq)
    m = np.zeros((2 * half, 2 * half))
    for i, f in enumerate(np.asarray(inv_freq, np.float64)):
        c, s = np.cos(p * f), np.sin(p * f)
        m[i, i], m[i, i + half], m[i + half, i + half], m[i + half, i] = c, -s, c, s
    return m


def ref_expected(state, layer, n_future, use_cov, use_vnorm, observe="window", n_sink=0):
    """observe="prefill": statistics over the context's queries from position n_sink on, then the question's (as
    kvpress's ExpectedAttentionPress takes them from one prefill of context + question). The first n_sink keys are
    left out of the softmax, as kvpress's press cuts them before it (score 0 here; they are kept regardless)."""
    q, k, v, pos, qpos = np_state(state, layer)
    batch, window, heads, dim = q.shape
    kv_heads, length = k.shape[2], k.shape[1]
    rep = heads // kv_heads
    inv = np.asarray(state.inv_freq)
    out = np.zeros((batch, length, kv_heads))
    for b in range(batch):
        observed = [(qpos[b, t], q[b, t]) for t in range(window) if qpos[b, t] >= 0]
        if observe == "prefill":
            context_q = np.asarray(state.context_queries[layer], np.float64)
            observed = [(pos[b, s], context_q[b, s]) for s in range(length) if pos[b, s] >= n_sink] + \
                ([] if state.window_in_context else observed)
        start = max(qpos[b].max(), pos[b].max()) + 1
        r_bar = np.mean([rope_matrix(start + i, inv) for i in range(n_future)], axis=0)
        real = [s for s in range(length) if pos[b, s] >= n_sink]  # sinks (kept anyway) left out of the softmax
        for h in range(heads):
            raw = np.stack([rope_matrix(p, inv).T @ query[h] for p, query in observed])
            mu = r_bar @ raw.mean(0)
            cov = r_bar @ np.cov(raw.T, bias=True).reshape(dim, dim) @ r_bar.T
            logits = np.array([mu @ k[b, s, h // rep] / np.sqrt(dim)
                               + (use_cov * k[b, s, h // rep] @ cov @ k[b, s, h // rep] / (2 * dim)) for s in real])
            w = np.exp(logits - logits.max())
            for s, ws in zip(real, w / w.sum()):
                out[b, s, h // rep] += ws / rep
        if use_vnorm:
            out[b] *= np.linalg.norm(v[b], axis=-1)
    return out


def ref_scores(name, selector, state, layer):
    q, k, v, pos, qpos = np_state(state, layer)
    if name == "snapkv":
        return ref_pool(ref_window_attention(state, layer), selector.kernel_size, selector.pooling).transpose(0, 2, 1)
    if name == "h2o":
        return np.asarray(state.attention[layer]).transpose(0, 2, 1)
    if name == "streaming":
        return np.broadcast_to(pos[..., None], k.shape[:3]).astype(np.float64)
    if name == "key_norm":
        return -np.sqrt(np.sum(k ** 2, axis=-1))
    if name == "random":
        return np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.key(selector.seed), layer), k.shape[:3]))
    if name == "tova":
        return ref_last_query_attention(state, layer)
    if name == "expected_attention":
        return ref_expected(state, layer, selector.n_future, selector.use_covariance, selector.use_vnorm,
                            selector.observe, selector.n_sink)
    raise AssertionError(name)


def ref_select(scores, budget, positions, protect_first=0, protect_last=0):
    """Per (row, head): sort real tokens by (protected, score, position) descending, keep the first k."""
    batch, length, heads = scores.shape
    mask = np.zeros(scores.shape, np.float32)
    for b in range(batch):
        real = [s for s in range(length) if positions[b, s] >= 0]
        k = int(np.round(np.float32(budget) * np.float32(len(real))))
        first, last = min(positions[b, s] for s in real), max(positions[b, s] for s in real)
        for h in range(heads):
            def prot(s, b=b, first=first, last=last):
                return positions[b, s] - first < protect_first or last - positions[b, s] < protect_last
            order = sorted(real, key=lambda s: (not prot(s), -scores[b, s, h], -positions[b, s], s))
            mask[b, order[:k], h] = 1.0
    return mask


def ref_allocate(scores, budget, scope, valid):
    """Sort every scope unit's valid (layer, slot, head, group) pairs by score desc, then flat index asc."""
    layers = len(scores)
    batch, length, heads, groups = scores[0].shape
    masks = [np.zeros(s.shape, np.float32) for s in scores]
    units = {}
    for l in range(layers):
        for b, s, h, g in np.ndindex(batch, length, heads, groups):
            if valid[l][b, s, h, g]:
                unit = {"head": (l, b, h), "layer": (l, b), "global": (b,)}[scope]
                score = -np.inf if np.isnan(scores[l][b, s, h, g]) else scores[l][b, s, h, g]
                units.setdefault(unit, []).append((-score, (l, s, h, g), b))
    totals = {}
    for l in range(layers):
        for b, s, h, g in np.ndindex(batch, length, heads, groups):
            unit = {"head": (l, b, h), "layer": (l, b), "global": (b,)}[scope]
            totals.setdefault(unit, 0)
            totals[unit] += int(valid[l][b, s, h, g])
    for unit, entries in units.items():
        k = int(np.round(np.float32(budget) * np.float32(totals[unit])))
        for _, (l, s, h, g), b in sorted(entries)[:k]:
            masks[l][b, s, h, g] = 1.0
    return masks


# ----------------------------------------------------------------------------- token-level selectors

SELECTOR_CASES = [("snapkv", SnapKV()), ("snapkv", SnapKV(kernel_size=3, pooling="max")), ("h2o", H2O(recent=2)),
                  ("streaming", StreamingLLM(n_sink=2)), ("key_norm", KeyNorm()), ("random", RandomSelector(seed=3)),
                  ("expected_attention", ExpectedAttention(n_future=4)), ("tova", TOVA()),
                  ("expected_attention", ExpectedAttention(n_future=3, use_covariance=False, use_vnorm=False,
                                                           n_sink=1)),
                  ("expected_attention", ExpectedAttention(n_future=5, n_sink=2, observe="prefill"))]


@pytest.mark.parametrize("in_context", [False, True])
@pytest.mark.parametrize("name,selector", SELECTOR_CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_selector_matches_brute_force(name, selector, in_context):
    state = random_state(seed=len(name), in_context=in_context)
    first, last = selector.protected(state)
    masks = selector.masks(state, 0.4)
    for layer in range(state.num_layers):
        ours = np.asarray(selector.scores(state, layer))
        np.testing.assert_allclose(ours, ref_scores(name, selector, state, layer), rtol=1e-4, atol=1e-6)
        expected = ref_select(ours, 0.4, np.asarray(state.positions), first, last)
        np.testing.assert_array_equal(np.asarray(masks[layer]), expected)


def test_expected_attention_over_the_prefill_needs_the_context_queries():
    state = random_state().replace(context_queries=None)
    with pytest.raises(InputError, match="keep_context_queries=True"):
        ExpectedAttention(observe="prefill").scores(state, 0)
    with pytest.raises(InputError, match="observe must be one of window, prefill"):
        ExpectedAttention(observe="context")
    assert ExpectedAttention(observe="prefill").needs_context_queries and not SnapKV().needs_context_queries
    # a wrapper passes its base's need on, and the helper reads it from a recipe, a selector or neither
    from subtoken_jax import Compression
    from subtoken_jax.selectors import needs_context_queries

    wrapped = AdaKV(base=ExpectedAttention(observe="prefill"))
    assert wrapped.needs_context_queries and needs_context_queries(Compression(0.5, selector=wrapped))
    assert not any(needs_context_queries(x) for x in (None, Compression(0.5, selector="expected_attention"),
                                                      AdaKV(), ExpectedAttention()))


def test_tova_keeps_the_same_tokens_in_every_kv_head_and_the_current_query():
    state = random_state(seed=5, in_context=True)
    for mask in TOVA().masks(state, 0.3):
        mask = np.asarray(mask)
        assert (mask == mask[..., :1]).all()
        assert (mask[:, -1] == 1).all()  # the last context token is the query TOVA scores with


@pytest.mark.parametrize("budget, layers, beta", [(0.4, 5, 20.0), (0.7, 4, 20.0), (0.25, 3, 1.0), (0.3, 1, 20.0)])
def test_pyramid_fractions_are_linear_with_the_budget_as_mean(budget, layers, beta):
    f = np.asarray(pyramid_fractions(budget, layers, beta), np.float64)
    assert f.shape == (layers,) and abs(f.mean() - budget) < 1e-6 and (f >= 0).all() and (f <= 1 + 1e-6).all()
    if layers > 2:
        assert np.allclose(np.diff(f, 2), 0, atol=1e-6) and (np.diff(f) <= 1e-6).all()  # linear, non-increasing
    if layers > 1 and 2 * budget - budget / beta <= 1:  # uncapped: last = budget / beta, first = 2 budget - last
        assert f[-1] == pytest.approx(budget / beta) and f[0] == pytest.approx(2 * budget - budget / beta)
    if 2 * budget - budget / beta > 1 and layers > 1:
        assert f[0] == pytest.approx(1.0)
    with pytest.raises(InputError, match="beta"):
        pyramid_fractions(0.5, 4, 0.5)


def test_pyramidkv_is_snapkv_at_each_layers_fraction():
    state = random_state(seed=7, layers=4, length=12, pads=(0, 2))
    selector = PyramidKV(beta=4.0)
    fractions = pyramid_fractions(0.5, 4, 4.0)
    for layer, mask in enumerate(selector.masks(state, 0.5)):
        scores = ref_scores("snapkv", SnapKV(), state, layer)
        np.testing.assert_array_equal(np.asarray(mask), ref_select(scores, np.float32(fractions[layer]),
                                                                   np.asarray(state.positions)))


def test_pyramidkv_takes_a_budget_per_row():
    """The recipes pass one rounded-down budget per row: each row's masks equal that row under its own scalar."""
    state = random_state(seed=7, layers=4, length=12, pads=(0, 2))
    budgets = jnp.asarray([0.5, 0.25], jnp.float32)
    assert pyramid_fractions(budgets, 4, 4.0).shape == (4, 2)
    per_row = PyramidKV(beta=4.0).masks(state, budgets)
    for row, budget in enumerate((0.5, 0.25)):
        for mask, alone in zip(per_row, PyramidKV(beta=4.0).masks(state, budget)):
            np.testing.assert_array_equal(np.asarray(mask)[row], np.asarray(alone)[row])


def ref_head_adaptive(scores, budget, positions, alpha, protect_first=0, protect_last=0):
    """AdaKV by sorting: each head's top floor(alpha k) (>= 1) guaranteed, then the best k x heads pairs."""
    batch, length, heads = scores.shape
    mask = np.zeros(scores.shape, np.float32)
    for b in range(batch):
        real = [s for s in range(length) if positions[b, s] >= 0]
        k = int(np.round(np.float32(budget) * np.float32(len(real))))
        safe = max(1, int(np.floor(np.float32(alpha) * np.float32(k)))) if k > 0 and alpha > 0 else 0
        first, last = min(positions[b, s] for s in real), max(positions[b, s] for s in real)

        def prot(s, b=b, first=first, last=last):
            return positions[b, s] - first < protect_first or last - positions[b, s] < protect_last
        guaranteed = set()
        for h in range(heads):
            order = sorted(real, key=lambda s: (not prot(s), -scores[b, s, h], -positions[b, s], s))
            guaranteed |= {(s, h) for s in order[:safe]}
        pairs = sorted(((s, h) for s in real for h in range(heads)),
                       key=lambda p: (not prot(p[0]), p not in guaranteed, -scores[b, p[0], p[1]], -positions[b, p[0]],
                                      p[0] * heads + p[1]))
        for s, h in pairs[:k * heads]:
            mask[b, s, h] = 1.0
    return mask


@pytest.mark.parametrize("alpha, in_context", [(0.2, False), (0.0, True), (0.5, True)])
def test_adakv_matches_brute_force_and_keeps_the_layer_budget(alpha, in_context):
    state = random_state(seed=11, length=12, kv_heads=4, heads=8, pads=(0, 3), in_context=in_context)
    selector = AdaKV(alpha=alpha)
    first, last = selector.protected(state)
    for layer, mask in enumerate(selector.masks(state, 0.35)):
        mask = np.asarray(mask)
        scores = np.asarray(selector.scores(state, layer))
        np.testing.assert_array_equal(mask, ref_head_adaptive(scores, 0.35, np.asarray(state.positions), alpha,
                                                              first, last))
        real = np.asarray(state.positions) >= 0
        k = np.round(np.float32(0.35) * real.sum(1).astype(np.float32))
        np.testing.assert_array_equal(mask.sum((1, 2)), k * 4)  # the layer's budget, shared unevenly by heads
    # alpha = 1: every head keeps its own top k, which is SnapKV's per-head selection
    for ada, snap in zip(AdaKV(alpha=1.0).masks(state, 0.35), SnapKV().masks(state, 0.35)):
        np.testing.assert_array_equal(np.asarray(ada), np.asarray(snap))
    with pytest.raises(InputError, match="alpha"):
        AdaKV(alpha=1.5)


@pytest.mark.parametrize("method", ["attention", "snapkv", "snapkv_rms"])
def test_value_group_scores_match_brute_force(method):
    """attention x group norm, SnapKV's pooled attention (avg, kernel 5) x group norm, and the root of the pooled
    mean squared attention x group norm, against numpy loops."""
    state = random_state(seed=11)
    kernel = 1 if method == "attention" else 5
    moment = 2 if method == "snapkv_rms" else 1
    for layer in range(state.num_layers):
        attention = ref_pool(ref_window_attention(state, layer, moment), kernel, "avg") ** (1 / moment)
        values = np.asarray(state.values[layer], np.float64)
        batch, length, heads, dim = values.shape
        groups = state.value_groups
        expected = np.zeros((batch, length, heads, groups))
        for b, t, h, g in np.ndindex(batch, length, heads, groups):
            span = values[b, t, h, g * dim // groups:(g + 1) * dim // groups]
            expected[b, t, h, g] = attention[b, h, t] * np.sqrt(np.sum(span ** 2))
        ours = np.asarray(value_group_scorer(method)(state, layer))
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_snapkv_keeps_an_in_context_window():
    state = random_state(in_context=True, window=3)
    masks = SnapKV().masks(state, 0.5)  # 5 and 4 tokens kept, more than the window
    assert np.all(np.asarray(masks[0])[:, -3:] == 1.0)
    assert SnapKV().protected(random_state(in_context=False)) == (0, 0)


def test_accumulated_attention_matches_brute_force():
    state = random_state(window=10, in_context=True, length=10, seed=5)
    ours = accumulated_attention(state.queries[0], state.keys[0], state.positions, state.positions, chunk=4)
    q, k, _, pos, _ = np_state(state, 0)
    ref = np.zeros(ours.shape)
    for b, t, h in np.ndindex(q.shape[0], q.shape[1], q.shape[2]):
        seen = [s for s in range(k.shape[1]) if 0 <= pos[b, s] <= pos[b, t]]
        if not seen:
            continue
        logits = np.array([q[b, t, h] @ k[b, s, h // 2] / np.sqrt(q.shape[-1]) for s in seen])
        w = np.exp(logits - logits.max())
        ref[b, h // 2, seen] += w / w.sum() / 2
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-6)


def test_h2o_needs_attention():
    with pytest.raises(InputError, match="with_attention"):
        H2O().scores(random_state().replace(attention=None), 0)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), length=st.integers(1, 12), heads=st.integers(1, 3),
       budget=st.floats(0.01, 1.0), protect_first=st.integers(0, 3), protect_last=st.integers(0, 3),
       ties=st.booleans())
def test_select_tokens_exact_budget_and_top_k(data, batch, length, heads, budget, protect_first, protect_last, ties):
    pads = [data.draw(st.integers(0, length - 1)) for _ in range(batch)]
    positions = np.full((batch, length), -1, np.int32)
    for b, p in enumerate(pads):
        positions[b, p:] = np.arange(length - p)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    scores = (rng.integers(0, 3, (batch, length, heads)) if ties else rng.normal(size=(batch, length, heads)))
    scores = scores.astype(np.float32)
    mask = np.asarray(select_tokens(jnp.asarray(scores), budget, jnp.asarray(positions), protect_first=protect_first,
                                    protect_last=protect_last))
    counts = np.round(np.float32(budget) * np.float32((positions >= 0).sum(1)))
    np.testing.assert_array_equal(mask.sum(1), np.broadcast_to(counts[:, None], (batch, heads)))
    assert not np.any(mask[positions < 0])
    np.testing.assert_array_equal(mask, ref_select(scores, budget, positions, protect_first, protect_last))


# ----------------------------------------------------------------------------- value-group allocation


@settings(max_examples=30, deadline=None)
@given(data=st.data(), layers=st.integers(1, 3), batch=st.integers(1, 2), length=st.integers(1, 6),
       heads=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]), scope=st.sampled_from(SCOPES),
       budget=st.floats(0.01, 1.0), evict=st.sampled_from([None, "shared", "per_head"]), ties=st.booleans(),
       special=st.booleans())
def test_allocator_keeps_exactly_the_top_budget(data, layers, batch, length, heads, groups, scope, budget, evict,
                                                 ties, special):
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    shape = (batch, length, heads, groups)
    scores = [(rng.integers(0, 3, shape) if ties else rng.normal(size=shape)).astype(np.float32)
              for _ in range(layers)]
    if special:  # NaN ranks as -inf; -0.0 ties with 0.0
        for s in scores:
            where = rng.random(shape) < 0.3
            s[where] = rng.choice(np.array([np.nan, -np.inf, np.inf, -0.0, 0.0], np.float32), int(where.sum()))
    positions = np.full((batch, length), -1, np.int32)
    for b in range(batch):
        pad = data.draw(st.integers(0, length))
        positions[b, pad:] = np.arange(length - pad)
    keeps = None
    if evict == "shared":
        keeps = [rng.random((batch, length)) < 0.6 for _ in range(layers)]
    elif evict == "per_head":
        keeps = [rng.random((batch, length, heads)) < 0.6 for _ in range(layers)]
    masks = allocate_value_groups([jnp.asarray(s) for s in scores], budget, scope=scope,
                                  positions=jnp.asarray(positions),
                                  token_keep_masks=None if keeps is None else [jnp.asarray(k) for k in keeps])
    valid = []
    for l in range(layers):
        v = np.broadcast_to((positions >= 0)[:, :, None, None], shape)
        if keeps is not None:
            k = keeps[l][:, :, None, None] if keeps[l].ndim == 2 else keeps[l][..., None]
            v = v & k
        valid.append(v)
    masks = [np.asarray(m) for m in masks]
    for m, v in zip(masks, valid):
        assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
        assert not np.any(m[~v])
    # exactly round(budget * valid pairs) per scope unit, never more
    if scope == "global":
        kept = sum(m.sum((1, 2, 3)) for m in masks)
        count = sum(v.sum((1, 2, 3)) for v in valid)
    elif scope == "layer":
        kept = np.stack([m.sum((1, 2, 3)) for m in masks])
        count = np.stack([v.sum((1, 2, 3)) for v in valid])
    else:
        kept = np.stack([m.sum((1, 3)) for m in masks])
        count = np.stack([v.sum((1, 3)) for v in valid])
    np.testing.assert_array_equal(kept, np.round(np.float32(budget) * count.astype(np.float32)))
    for ours, ref in zip(masks, ref_allocate(scores, budget, scope, valid)):
        np.testing.assert_array_equal(ours, ref)


def _best_utility(energy, limit, eviction=None):
    """Brute force over every (evict, keep 1..G best groups) choice per token: the most utility within limit.
    Keeping k groups is worth the eviction error less the energy of the groups still dropped (eviction None: the
    token's whole energy, so the k best groups' energy)."""
    length, groups = energy.shape
    cumulative = np.concatenate([np.zeros((length, 1)), np.cumsum(-np.sort(-energy, axis=1), axis=1)], axis=1)
    if eviction is not None:
        cumulative = eviction[:, None] - (cumulative[:, -1:] - cumulative)
        cumulative[:, 0] = 0.0
    best = 0.0
    for ks in itertools.product(range(groups + 1), repeat=length):
        if sum(groups + k for k in ks if k) <= limit:
            best = max(best, sum(cumulative[i, k] for i, k in enumerate(ks)))
    return best


def test_joint_allocation_is_optimal_for_the_bytes_it_spends():
    """Brute force on 5 tokens x 2 groups: within budget, and no choice of (evict / keep k groups) per token
    spending at most the same bytes saves more squared read-out error (the Lagrangian's guarantee)."""
    rng = np.random.default_rng(3)
    for budget in (0.25, 0.375, 0.5, 0.75, 1.0):
        for _ in range(4):
            scores = (rng.random((1, 5, 1, 2)) ** 3).astype(np.float32)
            tokens, groups = allocate_joint([jnp.asarray(scores)], budget)
            t, g = np.asarray(tokens[0])[0, :, 0], np.asarray(groups[0])[0, :, 0]
            cost = 2 * t.sum() + g.sum()  # a key costs G = 2 group units
            assert cost <= budget * 2 * 2 * 5 + 1e-6
            assert np.all(g.sum(1)[t == 0] == 0) and np.all(g.sum(1)[t == 1] >= 1)
            energy = np.square(scores[0, :, 0])
            assert (energy * g).sum() >= _best_utility(energy, cost) - 1e-6
            lowest_kept = np.where(g == 1, energy, np.inf).min(1)
            highest_dropped = np.where(g == 0, energy, -np.inf).max(1)
            assert np.all(lowest_kept >= highest_dropped)  # a token keeps its best groups


def test_joint_allocation_with_eviction_errors_is_optimal():
    """With its own eviction errors (a token's loss when evicted, below its whole energy when its value is close to
    the read-out), the allocation still saves the most error for its bytes (brute force, 5 tokens x 2 groups); the
    errors equal to the whole energy give the default's masks."""
    rng = np.random.default_rng(5)
    for budget in (0.25, 0.375, 0.5, 0.75):
        for _ in range(4):
            scores = (rng.random((1, 5, 1, 2)) ** 3).astype(np.float32)
            energy = np.square(scores[0, :, 0])
            eviction = (energy.sum(1) * rng.random(5) * 1.2).astype(np.float32)
            tokens, groups = allocate_joint([jnp.asarray(scores)], budget,
                                            eviction=[jnp.asarray(eviction)[None, :, None]])
            t, g = np.asarray(tokens[0])[0, :, 0], np.asarray(groups[0])[0, :, 0]
            cost = 2 * t.sum() + g.sum()
            assert cost <= budget * 2 * 2 * 5 + 1e-6
            saved = np.where(t == 1, eviction - (energy * (1 - g)).sum(1), 0.0).sum()
            assert saved >= _best_utility(energy, cost, eviction) - 1e-6
            whole = allocate_joint([jnp.asarray(scores)], budget,
                                   eviction=[jnp.asarray(energy.sum(1))[None, :, None]])
            default = allocate_joint([jnp.asarray(scores)], budget)
            for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(default)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_centred_eviction_error_is_the_read_out_shift_of_an_eviction():
    """Brute force: the read-out sum_i a_i v_i moves by exactly sqrt(centred_eviction_error) when token j leaves
    and its attention is renormalised over the rest (padding excluded)."""
    from subtoken_jax.selectors.scorers.base import centred_eviction_error

    rng = np.random.default_rng(6)
    batch, length, heads, dim = 2, 7, 2, 4
    positions = np.tile(np.arange(length), (batch, 1)).astype(np.int32)
    positions[1, :2] = -1
    logits = rng.normal(size=(batch, heads, length))
    logits[:, :, :][np.broadcast_to((positions < 0)[:, None, :], logits.shape)] = -np.inf
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    values = rng.normal(size=(batch, length, heads, dim)) + 2.0  # a common direction, as real values have
    error = np.asarray(centred_eviction_error(jnp.asarray(attention, jnp.float32), jnp.asarray(values, jnp.float32),
                                              jnp.asarray(positions)))
    for b in range(batch):
        for h in range(heads):
            a, v = attention[b, h], values[b, :, h]
            out = a @ v
            for j in range(length):
                if positions[b, j] < 0:
                    assert error[b, j, h] == 0.0
                    continue
                rest = np.delete(np.arange(length), j)
                moved = a[rest] @ v[rest] / a[rest].sum()
                assert error[b, j, h] == pytest.approx(np.square(moved - out).sum(), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("scope", SCOPES)
def test_joint_allocation_budget_per_scope_unit_and_padding(scope):
    rng = np.random.default_rng(4)
    layers, batch, length, heads, groups = 2, 2, 6, 2, 4
    scores = [jnp.asarray(rng.random((batch, length, heads, groups)), jnp.float32) for _ in range(layers)]
    positions = np.tile(np.arange(length), (batch, 1)).astype(np.int32)
    positions[1, :2] = -1
    budget = jnp.asarray([0.5, 0.3], jnp.float32)  # one per row
    tokens, group_masks = allocate_joint(scores, budget, scope=scope, positions=jnp.asarray(positions))
    cost = np.stack([groups * np.asarray(t) + np.asarray(g).sum(-1) for t, g in zip(tokens, group_masks)])
    assert not np.any(cost[:, positions < 0])  # padding never kept
    axes = {"head": (2,), "layer": (2, 3), "global": (0, 2, 3)}[scope]
    spent = cost.sum(axis=axes)
    real = (positions >= 0).sum(1)
    per_item = {"head": 1, "layer": heads, "global": heads * layers}[scope]
    limit = np.asarray(budget)[:, None] * 2 * groups * real[:, None] * per_item if scope == "head" else \
        np.asarray(budget) * 2 * groups * real * per_item
    assert np.all(spent <= np.broadcast_to(limit, spent.shape) + 1e-4)
    # generic scores: one price leaves less than one whole token (key + all groups) unspent per unit
    assert np.all(spent > np.broadcast_to(limit, spent.shape) - 2 * groups)


def test_allocator_rejects_unknown_scope():
    with pytest.raises(InputError, match="scope"):
        allocate_value_groups([jnp.zeros((1, 2, 1, 2))], 0.5, scope="row")
    with pytest.raises(InputError, match=r"take no option \['n_futur'\]"):
        value_group_scorer("expected", n_futur=4)
    assert value_group_scorer("attention", n_future=4) == value_group_scorer("attention")  # only expected uses it


def test_combine_and_byte_accounting():
    state = random_state(seed=7, groups=4)
    tokens, groups = combine(state, SnapKV(), 0.5, value_group_scorer("attention"), 0.5, scope="layer")
    real = np.asarray(state.positions) >= 0
    for t, g in zip(tokens, groups):
        t, g = np.asarray(t), np.asarray(g)
        np.testing.assert_array_equal(t.sum(1), np.round(np.float32(0.5) * real.sum(1))[:, None].repeat(2, 1))
        assert not np.any(g * (1 - t[..., None]))  # no group of an evicted token
        np.testing.assert_array_equal(g.sum((1, 2, 3)), np.round(np.float32(0.5) * t.sum((1, 2)) * 4))
    frac = kv_bytes_fraction(tokens, groups, 4, head_dim=8, dtype_bytes=2, positions=state.positions)
    n_real = real.sum() * 2 * 2  # tokens x heads x layers
    n_kept = sum(np.asarray(t).sum() for t in tokens)
    n_groups = sum(np.asarray(g).sum() for g in groups)
    assert frac["keys"] == pytest.approx(n_kept / n_real)
    assert frac["values"] == pytest.approx(n_groups / (n_real * 4))
    meta = n_kept * (4 + 4 / 8)
    assert frac["index"] == pytest.approx(meta / (n_real * 32))
    assert frac["total"] == pytest.approx((n_kept * 16 + n_groups * 4 + meta) / (n_real * 32))
    # hand-checked: keep 2 of 4 tokens, 2 of their 4 groups; D = 8, 2 bytes per element
    t = jnp.asarray([[1.0, 0.0, 1.0, 0.0]])
    g = jnp.asarray([[[[1, 1, 0, 0]], [[1, 1, 1, 1]], [[0, 1, 0, 1]], [[1, 1, 1, 1]]]], jnp.float32)
    frac = kv_bytes_fraction([t], [g], 4, head_dim=8, dtype_bytes=2)
    assert frac == pytest.approx({"keys": 0.5, "values": 0.25, "index": 9 / 128, "total": (32 + 16 + 9) / 128})
    assert kv_bytes_fraction(None, [jnp.ones((1, 4, 1, 4))], 4, head_dim=8)["values"] == 1.0


# ----------------------------------------------------------------------------- the real model

CONTEXT, QUESTION, FUTURE, PAD = 48, 16, 16, 5


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model; the question and the future (answer) tokens share a small 'topic' vocabulary,
    so future queries resemble the question's, as in real question answering."""
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, value_groups=4)
    model, params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    topic = rng.choice(128, 8, replace=False)
    context = jnp.asarray(rng.integers(0, 128, (2, CONTEXT)), jnp.int32)
    context_mask = jnp.asarray([[1] * CONTEXT, [0] * PAD + [1] * (CONTEXT - PAD)], jnp.int32)
    question_future = jnp.asarray(rng.choice(topic, (2, QUESTION + FUTURE)), jnp.int32)
    question = question_future[:, :QUESTION]
    state = capture_prefill_state(model, params, context, question, context_mask=context_mask, with_attention=True,
                                  reconstruct=(1, 2))  # KVzip's pass too, so every selector can run on it
    return model, params, context, context_mask, question, question_future, state


def test_capture_matches_a_single_forward_pass(tiny):
    model, params, context, context_mask, question, _, state = tiny
    ids = jnp.concatenate([context, question], axis=1)
    mask = jnp.concatenate([context_mask, jnp.ones_like(question)], axis=1)
    _, variables = model.apply({"params": params}, ids, attention_mask=mask, mutable=["prefill"])
    real = np.asarray(context_mask, bool)
    for layer in range(2):
        full_q = variables["prefill"][f"layer_{layer}"]["attn"]["queries"][0]
        np.testing.assert_allclose(np.asarray(state.queries[layer]), np.asarray(full_q[:, CONTEXT:]), atol=2e-5)
        received = np.asarray(state.attention[layer]).sum(-1)  # every real context query spends weight 1
        np.testing.assert_allclose(received, np.broadcast_to(real.sum(1)[:, None], received.shape), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.query_positions)[:, 0], [CONTEXT, CONTEXT - PAD])
    assert state.context_queries is None  # only kept when asked for
    kept = capture_prefill_state(model, params, context, question, context_mask=context_mask,
                                 keep_context_queries=True)
    for layer in range(2):
        full_q = variables["prefill"][f"layer_{layer}"]["attn"]["queries"][0]
        np.testing.assert_allclose(np.asarray(kept.context_queries[layer])[real], np.asarray(full_q[:, :CONTEXT])[real],
                                   atol=2e-5)
    in_context = capture_prefill_state(model, params, context, context_mask=context_mask, window=3)
    assert in_context.window_in_context and in_context.window == 3
    np.testing.assert_array_equal(np.asarray(in_context.query_positions), np.asarray(state.positions)[:, -3:])
    np.testing.assert_allclose(np.asarray(in_context.keys[1]), np.asarray(state.keys[1]), atol=1e-6)


@functools.partial(jax.jit, static_argnames=("model",))
def _decode(model, params, context, context_mask, question, keep, groups):
    """Prefills the context, then runs the question over it with the (padded) masks."""
    cache = KVCache.create(model.config, context.shape[0], context.shape[1] + question.shape[1])
    _, cache = model.apply({"params": params}, context, attention_mask=context_mask, cache=cache)
    logits, _ = model.apply({"params": params}, question, cache=cache,
                            token_keep_mask=pad_to_capacity(keep, cache.capacity),
                            value_group_mask=pad_to_capacity(groups, cache.capacity))
    return logits


def test_budget_one_keeps_everything_and_equals_the_full_cache(tiny):
    model, params, context, context_mask, question, _, state = tiny
    real = np.asarray(context_mask, bool)
    ones_t = tuple(jnp.ones((2, CONTEXT, 2)) for _ in range(2))
    ones_g = tuple(jnp.ones((2, CONTEXT, 2, 4)) for _ in range(2))
    full = np.asarray(_decode(model, params, context, context_mask, question, ones_t, ones_g))
    all_real_t = np.broadcast_to(real[..., None], (2, CONTEXT, 2)).astype(np.float32)
    all_real_g = np.broadcast_to(real[..., None, None], (2, CONTEXT, 2, 4)).astype(np.float32)
    for i, selector in enumerate(cls() for cls in TOKEN_SELECTORS.values()):
        method, scope = ("attention", "expected")[i % 2], SCOPES[i % 3]
        keep, groups = combine(state, selector, 1.0, value_group_scorer(method), 1.0, scope)
        for t, g in zip(keep, groups):
            np.testing.assert_array_equal(np.asarray(t), all_real_t)
            np.testing.assert_array_equal(np.asarray(g), all_real_g)
        ours = _decode(model, params, context, context_mask, question, keep, groups)
        np.testing.assert_allclose(np.asarray(ours), full, atol=1e-5)
    for method in ("attention", "expected"):
        for scope in SCOPES:
            groups = allocate_value_groups(value_group_scores(state, method), 1.0, scope=scope,
                                           positions=state.positions)
            for g in groups:
                np.testing.assert_array_equal(np.asarray(g), all_real_g)
    # a real compression does change the output (the masks reach the model)
    keep, groups = combine(state, SnapKV(), 0.5, value_group_scorer("attention"), 0.5)
    assert np.abs(np.asarray(_decode(model, params, context, context_mask, question, keep, groups)) - full).max() > 1e-4


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_expected_attention_correlates_with_realised_attention(tiny):
    """Expected attention from the question's queries predicts where the next (answer) queries attend."""
    model, params, context, context_mask, _, question_future, state = tiny
    both = capture_prefill_state(model, params, context, question_future, context_mask=context_mask)
    future = both.replace(queries=tuple(q[:, QUESTION:] for q in both.queries),
                          query_positions=both.query_positions[:, QUESTION:])
    expected_groups = value_group_scores(state, "expected", n_future=FUTURE)
    realised_groups = value_group_scores(future, "attention")
    real = np.asarray(context_mask, bool)
    token, group, snap = [], [], []
    for layer in range(2):
        ea = np.asarray(expected_attention_weights(state, layer, n_future=FUTURE))
        ra = np.asarray(window_attention(future, layer))
        qa = np.asarray(window_attention(state, layer))  # SnapKV's raw statistic, for comparison
        eg, rg = np.asarray(expected_groups[layer]), np.asarray(realised_groups[layer])
        for b, h in np.ndindex(2, 2):
            r = real[b]
            token.append(_corr(ea[b, h, r], ra[b, h, r]))
            snap.append(_corr(qa[b, h, r], ra[b, h, r]))
            group.append(_corr(eg[b, r, h].ravel(), rg[b, r, h].ravel()))
    print(f"\ncorrelation with realised future attention over context tokens (mean / min over layer, row, KV head): "
          f"expected attention {np.mean(token):.3f} / {min(token):.3f}; question attention (SnapKV) "
          f"{np.mean(snap):.3f} / {min(snap):.3f}; value-group expected scores {np.mean(group):.3f} / {min(group):.3f}")
    # Value-group scores multiply attention by group norms; at random init attention is nearly uniform, so
    # their correlation is dominated by the (shared) norms and is only printed. The token level is the test.
    assert np.mean(token) > 0.4 and min(token) > 0.0


def ref_global_select(scores, budget, positions, protect_first):
    """scores [L, B, S, H]: per row, one ranking of every real (layer, token, head) by (protected, score, position)
    descending, then flat index; keeps round(budget x real tokens) x H x L of them."""
    layers, batch, length, heads = scores.shape
    mask = np.zeros(scores.shape, np.float32)
    for b in range(batch):
        real = [s for s in range(length) if positions[b, s] >= 0]
        k = int(np.round(np.float32(budget) * np.float32(len(real)))) * heads * layers
        triples = [(l, s, h) for l in range(layers) for s in real for h in range(heads)]
        order = sorted(triples, key=lambda t: (positions[b, t[1]] >= protect_first, -scores[t[0], b, t[1], t[2]],
                                               -positions[b, t[1]], (t[0] * length + t[1]) * heads + t[2]))
        for l, s, h in order[:k]:
            mask[l, b, s, h] = 1.0
    return mask


def test_kvzip_matches_a_brute_force_reconstruction(tiny):
    """KVzip's statistic from one dense forward over context + instruction + context again (numpy softmax over every
    key a repeated token sees, max over its queries and the group's heads), then one global ranking of
    (layer, token, head) with the sinks kept; the layerwise variant ranks per layer and head."""
    from subtoken_jax.selectors import KVzip

    model, params, context, context_mask, question, _, _ = tiny
    prompt = (3, 9, 27)
    state = capture_prefill_state(model, params, context, question, context_mask=context_mask, reconstruct=prompt)
    batch = context.shape[0]
    ids = jnp.concatenate([context, jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (batch, 3)), context], axis=1)
    mask = jnp.concatenate([context_mask, jnp.ones((batch, 3), jnp.int32), context_mask], axis=1)
    cache = KVCache.create(model.config, batch, ids.shape[1], jnp.float32)
    (_, cache), variables = model.apply({"params": params}, ids, attention_mask=mask, cache=cache, mutable=["prefill"])
    pos = np.asarray(cache.positions)
    heads, kv_heads = model.config.num_heads, model.config.num_kv_heads
    rep, dim = heads // kv_heads, model.config.resolved_head_dim
    for layer in range(2):
        q = np.asarray(variables["prefill"][f"layer_{layer}"]["attn"]["queries"][0], np.float64)
        k = np.asarray(cache.keys[layer], np.float64)
        want = np.zeros((batch, kv_heads, CONTEXT))
        for b in range(batch):
            for t in range(CONTEXT, ids.shape[1]):
                if pos[b, t] < 0:
                    continue
                seen = [s for s in range(ids.shape[1]) if 0 <= pos[b, s] <= pos[b, t]]
                for h in range(heads):
                    logits = np.array([q[b, t, h] @ k[b, s, h // rep] for s in seen]) / np.sqrt(dim)
                    w = np.exp(logits - logits.max())
                    w /= w.sum()
                    for s, ws in zip(seen, w):
                        if s < CONTEXT:
                            want[b, h // rep, s] = max(want[b, h // rep, s], ws)
        np.testing.assert_allclose(np.asarray(state.reconstruction[layer]), want, atol=2e-5)
    scores = np.stack([np.transpose(np.asarray(r), (0, 2, 1)) for r in state.reconstruction])
    positions = np.asarray(state.positions)
    got = np.stack([np.asarray(m) for m in KVzip(prompt).masks(state, 0.4)])
    np.testing.assert_array_equal(got, ref_global_select(scores, 0.4, positions, 4))
    for layer, m in enumerate(KVzip(prompt, layerwise=True).masks(state, 0.4)):
        np.testing.assert_array_equal(np.asarray(m), ref_select(scores[layer], 0.4, positions, protect_first=4))
    with pytest.raises(InputError, match="KVzip needs the reconstruction pass"):
        KVzip().masks(capture_prefill_state(model, params, context, question, context_mask=context_mask), 0.4)


def test_kvzip_through_generate(tiny):
    """generate runs KVzip's reconstruction for a recipe that names it (by name or instance); chunked prefill,
    which never holds the whole context, refuses it."""
    from subtoken_jax import Compression, generate
    from subtoken_jax.selectors import KVzip

    model, params, context, context_mask, question, _, _ = tiny
    by_name = generate(model, params, context, attention_mask=context_mask, question_ids=question, max_new_tokens=3,
                       compression=Compression(0.5, selector="kvzip"))
    by_instance = generate(model, params, context, attention_mask=context_mask, question_ids=question,
                           max_new_tokens=3, compression=Compression(0.5, selector=KVzip()))
    np.testing.assert_array_equal(np.asarray(by_name), np.asarray(by_instance))
    with pytest.raises(InputError, match="repeats the whole context"):
        generate(model, params, context, attention_mask=context_mask, question_ids=question, max_new_tokens=3,
                 compression=Compression(0.5, selector=KVzip(), scope="head"), prefill_chunk=16)


def test_expected_attention_over_the_prefill_through_generate(tiny):
    """generate keeps the context's queries for a selector that reads them: its answer is the one decoded from
    the masks of a state captured with them."""
    from subtoken_jax import Compression, generate
    from subtoken_jax.compressed_generate import generate_from_state

    model, params, context, context_mask, question, _, _ = tiny
    recipe = Compression(0.5, selector=ExpectedAttention(n_future=8, n_sink=1, observe="prefill"))
    got = generate(model, params, context, attention_mask=context_mask, question_ids=question, max_new_tokens=3,
                   compression=recipe, bucket=False)
    state = capture_prefill_state(model, params, context, question, context_mask=context_mask,
                                  keep_context_queries=True)
    want, _ = generate_from_state(model, params, state, recipe(state), max_new_tokens=3, question_ids=question)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(InputError, match="a chunked prefill never holds them"):
        generate(model, params, context, attention_mask=context_mask, question_ids=question, max_new_tokens=3,
                 compression=dataclasses.replace(recipe, scope="head"), prefill_chunk=16)


def _kvzip_terms(state, layer):
    """numpy: values [B, S, Hkv, D], each group's norm [B, S, Hkv, G], KVzip's score [B, S, Hkv]."""
    values = np.asarray(state.values[layer], np.float64)
    b, s, h, d = values.shape
    groups = state.value_groups
    norms = np.sqrt((values.reshape(b, s, h, groups, d // groups) ** 2).sum(-1))
    return values, norms, np.transpose(np.asarray(state.reconstruction[layer], np.float64), (0, 2, 1))


def test_kvzip_value_group_scorer(tiny):
    """The "kvzip" group scorer is the reconstruction attention x each group's norm (numpy norms); a recipe
    that scores groups with it gets the repetition pass from generate, by name or instance alike."""
    from subtoken_jax import JointCompression, generate
    from subtoken_jax.selectors import value_group_scorer
    from subtoken_jax.selectors.scorers import ReconstructionAttention

    model, params, context, context_mask, question, _, _ = tiny
    state = capture_prefill_state(model, params, context, question, context_mask=context_mask, reconstruct=(3, 9))
    for layer in range(2):
        _, norms, score = _kvzip_terms(state, layer)
        want = score[..., None] * norms
        np.testing.assert_allclose(np.asarray(value_group_scorer("kvzip")(state, layer)), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="kvzip scorer needs the reconstruction pass"):
        value_group_scorer("kvzip")(capture_prefill_state(model, params, context, question,
                                                          context_mask=context_mask), 0)
    by_name = generate(model, params, context, attention_mask=context_mask, question_ids=question, max_new_tokens=3,
                       compression=JointCompression(0.5, scorer="kvzip"))
    by_instance = generate(model, params, context, attention_mask=context_mask, question_ids=question,
                           max_new_tokens=3, compression=JointCompression(0.5, scorer=ReconstructionAttention()))
    np.testing.assert_array_equal(np.asarray(by_name), np.asarray(by_instance))


def test_kvzip_shares_scorer_keeps_kvzip_scores_per_token(tiny):
    """"kvzip_shares": KVzip's score x each group's share of its value's norm (numpy), so a token's squared scores
    sum to its squared KVzip score; generate gives a recipe naming it the repetition pass, as it does "kvzip"."""
    from subtoken_jax import JointCompression, generate
    from subtoken_jax.selectors import value_group_scorer

    model, params, context, context_mask, question, _, _ = tiny
    state = capture_prefill_state(model, params, context, question, context_mask=context_mask, reconstruct=(3, 9))
    for layer in range(2):
        values, norms, score = _kvzip_terms(state, layer)
        want = score[..., None] * norms / np.linalg.norm(values, axis=-1)[..., None]
        got = np.asarray(value_group_scorer("kvzip_shares")(state, layer))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose((got.astype(np.float64) ** 2).sum(-1), score ** 2, rtol=1e-4, atol=1e-9)
    out = generate(model, params, context, attention_mask=context_mask, question_ids=question, max_new_tokens=3,
                   compression=JointCompression(0.5, scorer="kvzip_shares"))
    assert np.asarray(out).shape == (context.shape[0], 3)


def test_joint_allocation_keeps_the_protected_recent_tokens_whole():
    """protect_last: the last real tokens of a row keep their key and every group even when they score nothing,
    paid from the same budget; the other tokens get exactly what an allocation over them alone with the rest of
    the budget gives (a brute force re-derivation, not the same call)."""
    rng = np.random.default_rng(5)
    batch, length, heads, groups, protect = 2, 8, 2, 4, 2
    scores = rng.random((batch, length, heads, groups)).astype(np.float32)
    positions = np.tile(np.arange(length), (batch, 1)).astype(np.int32)
    positions[1, :3] = -1
    scores[:, -protect:] = 0.0  # the protected tokens would be evicted first on their scores
    tokens, group_masks = allocate_joint([jnp.asarray(scores)], 0.5, positions=jnp.asarray(positions),
                                         protect_last=protect)
    t, g = np.asarray(tokens[0]), np.asarray(group_masks[0])
    assert np.all(t[:, -protect:] == 1) and np.all(g[:, -protect:] == 1)
    assert not np.any(t[1, :3])  # padding is never kept, nor counted as recent
    for row in range(batch):
        real = positions[row] >= 0
        rest = real.copy()
        rest[-protect:] = False
        for head in range(heads):
            # the same row without its protected tokens, with the budget they leave: what the plain allocator keeps
            limit = 0.5 * 2 * groups * real.sum() - 2 * groups * protect
            budget_rest = limit / (2 * groups * rest.sum())
            sub_t, sub_g = allocate_joint([jnp.asarray(scores[row:row + 1, rest][:, :, head:head + 1])], budget_rest)
            np.testing.assert_array_equal(t[row, rest, head], np.asarray(sub_t[0])[0, :, 0])
            np.testing.assert_array_equal(g[row, rest, head], np.asarray(sub_g[0])[0, :, 0])
            spent = 2 * groups * protect + groups * t[row, rest, head].sum() + g[row, rest, head].sum()
            assert spent <= 0.5 * 2 * groups * real.sum() + 1e-6


def test_joint_compression_keeps_an_in_context_window_whole():
    """JointCompression on a state whose window is the last context tokens (chunked-prefill and decoding rounds)
    keeps those tokens' keys and every group, on every layer and KV head; a question window protects nothing."""
    from subtoken_jax.compression import JointCompression

    window = 3
    for in_context in (True, False):
        state = random_state(seed=11, window=window, in_context=in_context)
        tokens, groups = JointCompression(kv_budget=0.25)(state)
        whole = [np.asarray(t)[:, -window:].all() and np.asarray(g)[:, -window:].all() for t, g in zip(tokens, groups)]
        if in_context:
            assert all(whole)
        else:  # at 0.25 of the bytes, the plain allocation does not keep the last tokens whole everywhere
            assert not all(whole)
