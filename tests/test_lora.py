"""LoRA: zero-init delta, merge/unmerge, trainable/frozen split, and the delta against a dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subtoken_jax import ConfigError, LoRAConfig, ModelConfig, init_params
from subtoken_jax.lora import LoRADense, combine_params, merge_lora, split_params, unmerge_lora

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  lora=LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
IDS = jnp.arange(10)[None] % 64


def _leaf_names(tree):
    return {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _perturb_b(params, scale=0.1):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + scale * jax.random.normal(jax.random.key(len(str(path))), x.shape)
        if path[-1].key == "lora_b" else x, params)


def test_fresh_adapter_changes_nothing():
    model, params = init_params(CFG, jax.random.key(0))
    _, base = split_params(params)
    base_model, _ = init_params(CFG.replace(lora=LoRAConfig()), jax.random.key(0))
    np.testing.assert_array_equal(model.apply({"params": params}, IDS), base_model.apply({"params": base}, IDS))


def test_lora_delta_equals_dense_reference():
    layer = LoRADense(features=(3, 5), axes=("embed", "heads", "head_dim"), lora=LoRAConfig(rank=2, alpha=4.0))
    x = jax.random.normal(jax.random.key(0), (2, 7))
    params = jax.tree.map(lambda p: p + 0.3, layer.init(jax.random.key(1), x)["params"])
    params = jax.tree.map(lambda p: p.value if hasattr(p, "value") else p, params,
                          is_leaf=lambda p: hasattr(p, "value"))
    w = np.asarray(params["kernel"]).reshape(7, 15)
    a, b = np.asarray(params["lora_a"]), np.asarray(params["lora_b"]).reshape(2, 15)
    expected = np.asarray(x) @ (w + (4.0 / 2) * a @ b)
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)).reshape(2, 15), expected, atol=1e-5)


def test_merge_then_unmerge_roundtrip():
    model, params = init_params(CFG, jax.random.key(0))
    params = _perturb_b(params)
    lora, _ = split_params(params)
    merged = merge_lora(params, CFG.lora.alpha)
    assert not split_params(merged)[0]  # no LoRA leaves left
    base_model, _ = init_params(CFG.replace(lora=LoRAConfig()), jax.random.key(0))
    np.testing.assert_allclose(base_model.apply({"params": merged}, IDS), model.apply({"params": params}, IDS),
                               atol=1e-5)
    restored = unmerge_lora(merged, lora, CFG.lora.alpha)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_split_and_combine_are_inverse():
    _, params = init_params(CFG, jax.random.key(0))
    trainable, frozen = split_params(params)
    assert _leaf_names(trainable) == {"lora_a", "lora_b"}
    assert "lora_a" not in _leaf_names(frozen)
    assert jax.tree.structure(combine_params(trainable, frozen)) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="more than one tree"):
        combine_params(params, frozen)


def test_only_lora_gets_gradients_through_split():
    model, params = init_params(CFG, jax.random.key(0))
    trainable, frozen = split_params(params)

    def loss(t):
        return jnp.mean(model.apply({"params": combine_params(t, frozen)}, IDS) ** 2)

    grads = jax.grad(loss)(_perturb_b(trainable))
    assert _leaf_names(grads) == {"lora_a", "lora_b"}
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=-1), "rank must be >= 0"),
    (dict(rank=4, targets=("q", "attn")), "unknown entries"),
    (dict(rank=4, dropout=1.0), "dropout"),
    (dict(rank=6, num_subspaces=4), "divide lora.rank"),
    (dict(rank=4, num_subspaces=2, active_subspaces=3), "active_subspaces"),
])
def test_bad_lora_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoRAConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=32, num_heads=4, value_groups=3), "must divide head_dim=8"),
    (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(num_layers=2, sliding_windows=(4,)), "1 entries for 2 layers"),
    (dict(dtype="float8"), "unknown dtype"),
    (dict(vocab_size=0), "vocab_size must be >= 1"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_unknown_model_config_key():
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"hidden": 3})
