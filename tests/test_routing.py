"""Query-independent value-group routing and routed subspace LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subtoken_jax import ConfigError, KVCache, LoRAConfig, ModelConfig, init_params
from subtoken_jax.lora import combine_params, is_adapter_path, split_params
from subtoken_jax.model_config import RoutingConfig
from subtoken_jax.value_groups import adaptive_mask, calibrated_adaptive_mask, exact_budget_mask, fixed_k_mask

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            value_groups=4)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), groups=st.sampled_from([2, 4, 8]), budget=st.sampled_from([0.25, 0.375, 0.5, 0.75, 1.0]))
def test_fixed_k_keeps_exactly_k_largest(seed, groups, budget):
    scores = jax.random.normal(jax.random.key(seed), (2, 5, 3, groups))
    mask = np.asarray(fixed_k_mask(scores, budget))
    k = max(1, round(budget * groups))
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert (mask.sum(-1) == k).all()
    # the kept groups are the k highest-scoring ones (brute force per token and head)
    s = np.asarray(scores)
    for index in np.ndindex(*s.shape[:-1]):
        assert set(np.flatnonzero(mask[index])) == set(np.argsort(-s[index])[:k])


@pytest.mark.parametrize("budget", [0.25, 0.375, 0.5, 0.75])
def test_adaptive_meets_budget_and_varies_per_token(budget):
    scores = jax.random.normal(jax.random.key(0), (4, 256, 2, 8)) + jax.random.normal(jax.random.key(1), (4, 256, 2, 1))
    mask, _ = adaptive_mask(scores, budget)
    mask = np.asarray(mask)
    assert abs(mask.mean() - budget) < 0.03
    per_token = mask.sum(-1)
    assert per_token.min() < per_token.max()  # a variable number of groups per token


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.sampled_from([0.25, 0.375, 0.5, 0.75, 1.0]), ties=st.booleans())
def test_exact_budget_keeps_the_top_pairs_of_each_sequence_and_head(seed, budget, ties):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(2, 7, 3, 4)).astype(np.float32)
    if ties:
        scores = np.round(scores)  # many equal scores: ties go to the earlier token, then the lower group
    valid = np.ones((2, 7), bool)
    valid[1, :2] = False  # left padding never counts and is never kept
    mask = np.asarray(exact_budget_mask(jnp.asarray(scores), budget, valid=jnp.asarray(valid)))
    for b in range(2):
        for h in range(3):
            tokens = np.flatnonzero(valid[b])
            pairs = [(t, g) for t in tokens for g in range(4)]
            k = int(np.round(np.float32(budget) * len(pairs)))  # round half to even, as jnp.round
            best = sorted(pairs, key=lambda p: (-scores[b, p[0], h, p[1]], p[0], p[1]))[:k]  # brute force
            expected = np.zeros((7, 4))
            for t, g in best:
                expected[t, g] = 1
            np.testing.assert_array_equal(mask[b, :, h], expected)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.sampled_from([0.25, 0.375, 0.5, 0.75]))
def test_calibrated_adaptive_is_the_causal_rule_shifted_onto_the_budget(seed, budget):
    """Brute force: per-token thresholds from a loop over the prefix (mean + z std of every earlier real
    token's scores), then the round(budget x pairs) largest margins score - threshold per sequence and head."""
    from scipy.stats import norm
    rng = np.random.default_rng(seed)
    scores = (rng.normal(size=(2, 9, 2, 4)) + np.linspace(-2, 2, 9)[None, :, None, None]).astype(np.float32)
    valid = np.ones((2, 9), bool)
    valid[1, :3] = False
    mask, _ = calibrated_adaptive_mask(jnp.asarray(scores), budget, valid=jnp.asarray(valid))
    mask = np.asarray(mask)
    causal, _ = adaptive_mask(jnp.asarray(scores), budget, valid=jnp.asarray(valid))
    z = norm.ppf(1.0 - budget)
    for b in range(2):
        for h in range(2):
            margins = {}
            for t in np.flatnonzero(valid[b]):
                seen = scores[b, [u for u in range(t + 1) if valid[b, u]], h].astype(np.float64).ravel()
                threshold = seen.mean() + z * seen.std()
                for g in range(4):
                    margins[t, g] = scores[b, t, h, g] - threshold
            k = int(np.round(np.float32(budget) * len(margins)))
            best = sorted(margins, key=lambda p: (-margins[p], p))[:k]
            expected = np.zeros((9, 4))
            for t, g in best:
                expected[t, g] = 1
            np.testing.assert_array_equal(mask[b, :, h], expected)
    # a shift of the causal rule: it only adds pairs (when the causal rule kept too few) or only removes them
    keeps_more = (mask >= np.asarray(causal)).all(axis=(1, 3))
    keeps_fewer = (mask <= np.asarray(causal)).all(axis=(1, 3))
    assert (keeps_more | keeps_fewer).all()


def test_exact_budget_untrained_router_meets_rho_on_every_layer():
    """The issue-11 requirement: realised = asked to within 0.5 points, by construction, even untrained."""
    cfg = ModelConfig(**BASE, routing=RoutingConfig(mode="adaptive", exact_budget=True))
    model, params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 48), 0, 64)
    for budget in (0.375, 0.75):
        _, state = model.apply({"params": params}, ids, value_budget=budget, mutable=["routing"])
        for layer in range(cfg.num_layers):
            mask = np.asarray(state["routing"][f"layer_{layer}"]["attn"]["value_group_mask"][0])
            assert abs(mask.mean() - budget) < 0.005, (budget, layer, mask.mean())
            assert mask.sum(-1).min() < mask.sum(-1).max()  # still a variable number of groups per token
    with pytest.raises(ConfigError, match="exact_budget is for mode adaptive"):
        RoutingConfig(mode="fixed_k", exact_budget=True)


def test_adaptive_is_causal():
    scores = jax.random.normal(jax.random.key(0), (1, 16, 2, 4))
    changed = scores.at[:, 10:].set(5.0)
    a, _ = adaptive_mask(scores, 0.5)
    b, _ = adaptive_mask(changed, 0.5)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])


@pytest.mark.parametrize("mode", ["fixed_k", "adaptive"])
def test_gradients_reach_value_router(mode):
    cfg = ModelConfig(**BASE, routing=RoutingConfig(mode=mode, budget=0.5))
    model, params = init_params(cfg, jax.random.key(0))
    trainable, frozen = split_params(params, is_adapter_path)
    assert "value_router" in trainable["layer_0"]["attn"]
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)

    def loss(t):
        logits = model.apply({"params": combine_params(t, frozen)}, ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(trainable)  # jitted: eager op-by-op autodiff costs ~10x more here
    router_grad = grads["layer_0"]["attn"]["value_router"]["kernel"]
    assert float(jnp.abs(router_grad).max()) > 0


@pytest.mark.parametrize("mode", ["fixed_k", "adaptive"])
def test_routing_pytree_is_returned_and_budget_exact(mode):
    cfg = ModelConfig(**BASE, routing=RoutingConfig(mode=mode))
    model, params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 64), 0, 64)
    _, state = model.apply({"params": params}, ids, value_budget=0.5, mutable=["routing"])
    routing = state["routing"]
    mask = routing["layer_0"]["attn"]["value_group_mask"][0]
    assert mask.shape == (2, 64, 2, 4)
    budget = float(routing["layer_1"]["attn"]["value_budget"][0])
    if mode == "fixed_k":
        assert budget == 0.5 and (np.asarray(mask).sum(-1) == 2).all()
    else:
        assert abs(budget - 0.5) < 0.1


def test_explicit_mask_overrides_router():
    cfg = ModelConfig(**BASE, routing=RoutingConfig(mode="fixed_k"))
    model, params = init_params(cfg, jax.random.key(0))
    plain, _ = init_params(cfg.replace(routing=RoutingConfig()), jax.random.key(0))
    _, base = split_params(params, is_adapter_path)
    ids = jax.random.randint(jax.random.key(1), (1, 9), 0, 64)
    ones = jnp.ones((1, 9, 2, 4))
    np.testing.assert_allclose(model.apply({"params": params}, ids, value_group_mask=ones, value_budget=0.25),
                               plain.apply({"params": base}, ids), atol=1e-6)


@pytest.mark.parametrize("mode", ["fixed_k", "adaptive"])
def test_routed_cache_decoding_equals_full_pass(mode):
    cfg = ModelConfig(**BASE, routing=RoutingConfig(mode=mode))
    model, params = init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(  # a non-trivial router
        lambda p, x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape) if "value_router" in str(p) else x,
        params)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    full = model.apply({"params": params}, ids, value_budget=0.5)
    decode = jax.jit(lambda chunk, cache: model.apply({"params": params}, chunk, cache=cache, value_budget=0.5))
    logits, cache = decode(ids[:, :5], KVCache.create(cfg, 2, 9))
    steps = [logits]
    for t in range(5, 9):
        step, cache = decode(ids[:, t:t + 1], cache)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_routed_lora_with_all_subspaces_equals_plain_lora():
    routed_cfg = ModelConfig(**BASE, lora=LoRAConfig(rank=8, targets=("q", "v", "up"), num_subspaces=4,
                                                     active_subspaces=4))
    model, params = init_params(routed_cfg, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape) if "lora_b" in str(p) else x, params)
    plain_cfg = routed_cfg.replace(lora=LoRAConfig(rank=8, targets=("q", "v", "up")))
    plain, _ = init_params(plain_cfg, jax.random.key(0))
    plain_params = split_params(params, lambda path: path[-1] == "subspace_router")[1]
    ids = jax.random.randint(jax.random.key(1), (2, 10), 0, 64)
    np.testing.assert_allclose(model.apply({"params": params}, ids), plain.apply({"params": plain_params}, ids),
                               atol=1e-6)


def test_routed_lora_activates_k_subspaces_and_trains_router():
    cfg = ModelConfig(**BASE, lora=LoRAConfig(rank=8, targets=("q",), num_subspaces=4, active_subspaces=1))
    model, params = init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape) if "lora_b" in str(p) else x, params)
    trainable, frozen = split_params(params, is_adapter_path)
    ids = jax.random.randint(jax.random.key(1), (2, 10), 0, 64)

    def loss(t):
        logits, state = model.apply({"params": combine_params(t, frozen)}, ids, mutable=["routing"])
        balance = state["routing"]["layer_0"]["attn"]["q"]["lora_balance_loss"][0]
        return jnp.mean(logits ** 2) + balance, balance

    (_, balance), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    assert float(balance) >= 1.0 - 1e-6  # S * sum f P >= 1, equality when balanced
    assert float(jnp.abs(grads["layer_0"]["attn"]["q"]["subspace_router"]).max()) > 0
    _, state = model.apply({"params": params}, ids, mutable=["routing"])
    chosen = np.asarray(state["routing"]["layer_0"]["attn"]["q"]["lora_subspaces"][0])
    assert chosen.shape == (2, 10, 4) and (chosen.sum(-1) == 1).all()


def test_bad_routing_config():
    with pytest.raises(ConfigError, match="routing.mode='topk' is unknown"):
        RoutingConfig(mode="topk")
    with pytest.raises(ConfigError, match=r"out of range.*\(0, 1\]"):
        RoutingConfig(mode="fixed_k", budget=1.5)
    with pytest.raises(ConfigError, match="out of range"):
        RoutingConfig(mode="fixed_k", budget=0.0)
    with pytest.raises(ConfigError, match=r"routing.k=5 must be in \[1, G=4\]"):
        ModelConfig(**BASE, routing=RoutingConfig(mode="fixed_k", k=5))
    with pytest.raises(ConfigError, match="routing.k is for mode fixed_k"):
        RoutingConfig(mode="adaptive", k=2)
    cfg = ModelConfig(**BASE, routing=RoutingConfig(mode="fixed_k"))
    model, params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ConfigError, match="value_budget=1.2 is out of range"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), value_budget=1.2)
