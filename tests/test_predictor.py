"""The learned value-group predictor: held-out loss falls with training, its top-B selection recalls the
expected-attention targets' top-B far better than random, and its scores plug into the allocation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import predictor as predictor_config
from subtoken_jax import ConfigError, DecoderLM, ModelConfig, init_params
from subtoken_jax.selectors import allocate_value_groups, capture_prefill_state, combine, value_group_norms
from subtoken_jax.predictor_training import (associative_recall_prompts, evaluate_predictor, listwise_loss,
                                             predictor_example, train_predictor)
from subtoken_jax.selectors.predictor import (ValueGroupPredictor, init_predictor, make_predictor, predictor_scorer,
                                              predictor_scores, question_summary)

VOCAB, BATCH, CONTEXT = 64, 16, 32
BUDGET = 0.25
HELD_OUT_SEED = 999


def sharpened(params, factor):
    """Scales every q and k kernel: the 0.02-std init gives attention logits ~1e-3, i.e. uniform attention,
    whose targets are just value norms (the untrained prior already ranks them ~perfectly). x20 gives a
    random model with peaked, content- and position-dependent attention."""
    def scale(path, x):
        return x * factor if any(getattr(k, "key", None) in ("q", "k") for k in path) else x
    return jax.tree_util.tree_map_with_path(scale, params)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, value_groups=4)
    model = DecoderLM(cfg)
    params = jax.jit(lambda rng: init_params(cfg, rng)[1])(jax.random.key(0))
    params = sharpened(params, 20.0)
    config = predictor_config.get_config()
    config.train.steps = 150
    config.train.batch_size = BATCH
    config.data.context_length = CONTEXT
    predictor = make_predictor(config, cfg)
    state, _ = predictor_example(model, params, next(associative_recall_prompts(VOCAB, BATCH, CONTEXT)))
    untrained = init_predictor(predictor, state, config.seed)
    trained = train_predictor(model, params, associative_recall_prompts(VOCAB, BATCH, CONTEXT, seed=0), config,
                              predictor_params=untrained)

    def held_out(params_):
        return evaluate_predictor(model, params, predictor, params_,
                                  associative_recall_prompts(VOCAB, BATCH, CONTEXT, seed=HELD_OUT_SEED),
                                  batches=3, budget=BUDGET, seed=1)

    return dict(model=model, params=params, config=config, predictor=predictor, untrained=untrained,
                tmp=tmp_path_factory.mktemp("empty_predictor"),
                trained=trained, before=held_out(untrained), after=held_out(trained))


def test_training_reduces_held_out_loss(setup):
    before, after = setup["before"]["loss"], setup["after"]["loss"]
    print(f"held-out listwise KL: before {before:.4f}, after {after:.4f}")
    assert np.isfinite(after) and after < 0.8 * before


def test_top_budget_recall_beats_random_and_untrained(setup):
    before, after = setup["before"], setup["after"]
    print(f"recall@{BUDGET}: trained {after['recall']:.3f}, untrained prior {before['recall']:.3f}, "
          f"random {after['random_recall']:.3f}; target mass kept {after['mass']:.3f} "
          f"(oracle {after['oracle_mass']:.3f}, random {after['random_mass']:.3f})")
    assert after["random_recall"] == pytest.approx(BUDGET, abs=0.03)  # a random top-B recalls ~B
    assert after["recall"] > after["random_recall"] + 0.2
    assert after["recall"] > before["recall"] + 0.03
    assert after["mass"] > after["random_mass"] + 0.2


def test_scores_plug_into_allocation_with_exact_budgets(setup):
    model, params, predictor, trained = setup["model"], setup["params"], setup["predictor"], setup["trained"]
    rng = np.random.default_rng(3)
    context = rng.integers(0, VOCAB, size=(2, 12))
    mask = np.ones((2, 12), np.int32)
    mask[1, :4] = 0  # a left-padded row
    state = capture_prefill_state(model, params, context, rng.integers(0, VOCAB, size=(2, 3)), context_mask=mask)
    scores = predictor_scores(predictor, trained, state)
    assert len(scores) == 2
    for s in scores:
        assert s.shape == (2, 12, 2, 4)  # [B, S, Hkv, G]
        assert np.all(np.isfinite(np.asarray(s)[mask > 0]))
    real = mask.sum(1)
    for scope in ("head", "layer", "global"):
        masks = allocate_value_groups(scores, BUDGET, scope=scope, positions=state.positions)
        for m in masks:
            assert not np.any(np.asarray(m)[mask == 0])  # padding never kept
        if scope == "head":
            kept = np.stack([np.asarray(m).sum(axis=(1, 3)) for m in masks])  # [L, B, Hkv]
            expected = np.round(BUDGET * real * 4)
            assert np.all(kept == expected[None, :, None])
        elif scope == "global":
            kept = sum(np.asarray(m).sum(axis=(1, 2, 3)) for m in masks)
            assert np.all(kept == np.round(BUDGET * real * 2 * 2 * 4))
    _, groups = combine(state, None, 1.0, predictor_scorer(predictor, trained), BUDGET, scope="head")
    for g, s in zip(groups, allocate_value_groups(scores, BUDGET, positions=state.positions)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(s))


def test_example_keeps_only_the_question_queries(setup):
    model, params = setup["model"], setup["params"]
    batch = next(associative_recall_prompts(VOCAB, 2, 8, seed=5))
    state, targets = predictor_example(model, params, batch)
    alone = capture_prefill_state(model, params, batch["context"], batch["question"])
    assert state.window == batch["question"].shape[1]
    np.testing.assert_array_equal(np.asarray(state.query_positions), np.asarray(alone.query_positions))
    for layer in range(2):
        np.testing.assert_allclose(np.asarray(state.queries[layer]), np.asarray(alone.queries[layer]),
                                   rtol=1e-5, atol=1e-5)
        assert targets[layer].shape == (2, 8, 2, 4)
        # target = question+answer attention on the context (sums to 1 per head) x value-group norm
        attention = np.asarray(targets[layer]) / np.asarray(value_group_norms(state.values[layer], 4))
        np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-4)
    mean, spread = question_summary(state, 0, 2)
    assert mean.shape == (2, 2, 8) and spread.shape == (2, 2, 2, 8)
    mean_q = np.asarray(state.queries[0]).mean(1).reshape(2, 2, 2, 8).mean(2)
    np.testing.assert_allclose(np.asarray(mean), mean_q, rtol=1e-5, atol=1e-6)


def test_listwise_loss_is_a_scale_free_kl():
    rng = np.random.default_rng(0)
    targets = [jnp.asarray(rng.random((2, 5, 2, 3)).astype(np.float32)) for _ in range(2)]
    positions = jnp.asarray(np.array([np.arange(5), [-1, -1, 0, 1, 2]]), jnp.int32)
    perfect = [jnp.log(t) + 7.0 for t in targets]  # any shift per unit leaves the ranking distribution
    for scope in ("head", "layer", "global"):
        assert float(listwise_loss(perfect, targets, positions, scope)) == pytest.approx(0.0, abs=1e-5)
        noisy = [p + jnp.asarray(rng.normal(size=p.shape).astype(np.float32)) for p in perfect]
        assert float(listwise_loss(noisy, targets, positions, scope)) > 1e-3
    # padded slots do not count, whatever their scores
    junk = [p.at[1, :2].set(50.0) for p in perfect]
    assert float(listwise_loss(junk, targets, positions)) == pytest.approx(0.0, abs=1e-5)


def test_associative_recall_prompts():
    batch = next(associative_recall_prompts(VOCAB, 4, 10, num_queries=2, seed=1))
    context, question, answer = batch["context"], batch["question"], batch["answer"]
    assert context.shape == (4, 10) and question.shape == (4, 3) and answer.shape == (4, 2)
    assert np.all(question[:, 0] == VOCAB - 1) and context.max() < VOCAB - 1
    for b in range(4):
        keys, values = context[b, 0::2], context[b, 1::2]
        assert len(set(keys)) == len(keys)
        for key, value in zip(question[b, 1:], answer[b]):
            assert values[list(keys).index(key)] == value
    with pytest.raises(ConfigError):
        next(associative_recall_prompts(8, 1, 20))  # 10 distinct keys do not fit 7 ids


def test_config_builds_the_predictor():
    config = predictor_config.get_config()
    predictor = make_predictor(config, ModelConfig(value_groups=4))
    assert isinstance(predictor, ValueGroupPredictor) and predictor.num_layers == 2
    config.predictor.bands = 3
    with pytest.raises(ConfigError):
        make_predictor(config, ModelConfig(value_groups=4))


def test_neighbour_attention_matches_a_loop():
    from subtoken_jax.selectors.predictor import neighbour_attention

    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 9, 3)).astype(np.float32)
    got = np.asarray(neighbour_attention(jnp.asarray(x), 3))
    assert got.shape == (2, 9, 3, 2)
    for b in range(2):
        for j in range(9):
            for h in range(3):
                before = [x[b, i, h] for i in range(j - 3, j) if i >= 0] or [-30.0]
                after = [x[b, i, h] for i in range(j + 1, j + 4) if i < 9] or [-30.0]
                np.testing.assert_allclose(got[b, j, h], [max(before), max(after)], rtol=1e-6)
    assert neighbour_attention(jnp.asarray(x), 0).shape == (2, 9, 3, 0)


def test_predictor_as_token_selector_and_shipped_names(setup):
    from subtoken_jax.errors import InputError
    from subtoken_jax.selectors.predictor import PredictorSelector, load_predictor, predictor_folder

    model, params, predictor, trained = setup["model"], setup["params"], setup["predictor"], setup["trained"]
    rng = np.random.default_rng(5)
    context = rng.integers(0, VOCAB, size=(2, 16))
    state = capture_prefill_state(model, params, context, rng.integers(0, VOCAB, size=(2, 3)))
    selector = PredictorSelector(predictor, trained)
    keep = selector.masks(state, 0.5)
    scores = predictor_scores(predictor, trained, state)
    for layer, k in enumerate(keep):
        k = np.asarray(k)
        assert k.shape == (2, 16, 2) and np.all(k.sum(axis=1) == 8)
        # the kept tokens are those with the largest predicted mass (logsumexp over their groups)
        mass = np.asarray(jax.nn.logsumexp(scores[layer], axis=-1))
        assert np.all(np.min(np.where(k > 0, mass, np.inf), axis=1) >= np.max(np.where(k > 0, -np.inf, mass), axis=1))
    with pytest.raises(InputError, match="neither a folder nor a shipped predictor"):
        predictor_folder("no-such-predictor")
    with pytest.raises(InputError, match="holds no trained predictor"):
        load_predictor(str(setup["tmp"]), model.config)
