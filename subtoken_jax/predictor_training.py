"""Training the value-group predictor (selectors/predictor.py) with optax against expected-attention targets.

    python train.py --config configs/predictor.py --workdir runs/predictor     # -> run(config, workdir)

The application side of the predictor: its training prompts (random-id associative recall, or the text
tasks of synthetic_tasks, optionally answered by the base model itself), the targets (the attention the
question + answer queries pay to each (token, KV head, value group) times the group's norm, from one
full-cache prefill), the listwise loss, the jitted train step, held-out evaluation (top-B recall of
target mass) and the workdir it writes. The module itself, its features and its scores are library
code in selectors/predictor.py; this file may import anything.

Loss. The allocation keeps the top-B pairs of a scope unit (allocate_value_groups), so only the order
of the scores inside a unit matters, not their scale. We therefore use a listwise ranking loss: per
unit (default: per (row, layer, KV head), the "head" scope) the targets are normalised into a
distribution over all (token, group) pairs, and the loss is KL(target || softmax(predicted scores)):
errors are weighted by target mass (capacity goes into ordering the few pairs a top-B selection fights
over), it is invariant to each unit's scale (which the features cannot know), and it is zero at a
perfect prediction. The "layer" / "global" scopes make it listwise over a layer / all layers of a row.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from typing import Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm.auto import tqdm

from subtoken_jax import data as data_lib
from subtoken_jax import sharding
from subtoken_jax import synthetic_tasks
from subtoken_jax import workdir as workdir_lib
from subtoken_jax.config_checks import check_ranges
from subtoken_jax.errors import ConfigError, InputError
from subtoken_jax.evaluation.tasks import chat_split
from subtoken_jax.generate import generate
from subtoken_jax.model import DecoderLM, init_params
from subtoken_jax.model_config import ModelConfig, check_budget
from subtoken_jax.pretrained import load_pretrained, resolve_checkpoint
from subtoken_jax.selectors.allocate import SCOPES, allocate_value_groups
from subtoken_jax.selectors.base import PrefillState, capture_prefill_state, window_attention
from subtoken_jax.selectors.predictor import (ValueGroupPredictor, init_predictor, make_predictor, predictor_scores,
                                              question_summary)
from subtoken_jax.selectors.subtoken import value_group_scores

_NEG = -1e30  # score of padded pairs (finite, so softmaxes over a unit stay NaN-free)


DATA_SOURCES = ("random_ids", "tasks")  # training prompts: associative recall over ids, or the text tasks


def associative_recall_prompts(vocab_size: int, batch_size: int, context_length: int, *, num_queries: int = 1,
                               seed: int = 0, low: int = 0,
                               high: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """Endless batches of synthetic associative recall over random token ids, for any vocabulary.

    context = k1 v1 k2 v2 ... (context_length / 2 pairs, keys distinct within a row), question =
    [SEP, k_a, ...] (num_queries keys of the context), answer = [v_a, ...] their values. Ids are drawn
    from [low, high - 1) (high defaults to vocab_size) and SEP = high - 1. Yields int32 arrays
    {"context": [B, S], "question": [B, 1 + num_queries], "answer": [B, num_queries]}.
    """
    high = vocab_size if high is None else high
    pairs = context_length // 2
    if context_length < 2 or context_length % 2:
        raise ConfigError(f"context_length={context_length} must be an even number >= 2 (key, value pairs)")
    if not 0 <= low < high <= vocab_size or high - 1 - low < pairs:
        raise ConfigError(f"ids [{low}, {high - 1}) hold fewer than {pairs} distinct keys (vocab_size={vocab_size})")
    if not 1 <= num_queries <= pairs:
        raise ConfigError(f"num_queries={num_queries} must be in [1, {pairs}]")
    rng = np.random.default_rng(seed)
    sep = high - 1
    while True:
        keys = np.stack([rng.choice(np.arange(low, sep), pairs, replace=False) for _ in range(batch_size)])
        vals = rng.integers(low, sep, size=(batch_size, pairs))
        context = np.stack([keys, vals], axis=-1).reshape(batch_size, context_length)
        asked = np.stack([rng.choice(pairs, num_queries, replace=False) for _ in range(batch_size)])
        question = np.concatenate([np.full((batch_size, 1), sep), np.take_along_axis(keys, asked, 1)], axis=1)
        answer = np.take_along_axis(vals, asked, 1)
        yield {"context": context.astype(np.int32), "question": question.astype(np.int32),
               "answer": answer.astype(np.int32)}


def task_prompts(tokenizer, tasks, lengths, batch_size: int, *, seed: int = 0, pad_id: int = 0,
                 pad_multiple: int = 16, chat: bool = False) -> Iterator[Dict[str, np.ndarray]]:
    """Endless batches of the text retrieval tasks of subtoken_jax.data (needle, variable tracking, ...), as
    token ids of a model's tokenizer, in the layout predictor_example takes.

    Batch k holds examples of one length, lengths[k % len(lengths)] tokens (context + question + answer),
    tasks drawn uniformly. Contexts (to that length) and questions are left-padded, answers right-padded,
    each to a multiple of `pad_multiple` (few shapes to compile); masks mark the real tokens.
    chat: the document and the bare query form one user turn of the tokenizer's chat template, split where
    the document ends (evaluation.tasks.chat_split), as an instruct model is asked.
    """

    unknown = [t for t in tasks if t not in synthetic_tasks.TASKS]
    if unknown or not tasks or not lengths:
        raise ConfigError(f"data.tasks={list(tasks)} must be a non-empty list of {', '.join(synthetic_tasks.TASKS)} and "
                          f"data.lengths={list(lengths)} non-empty")
    rng = np.random.default_rng([seed, 17])

    for k in itertools.count():
        length = int(lengths[k % len(lengths)])
        examples = [synthetic_tasks.TASKS[tasks[int(rng.integers(len(tasks)))]](rng, length, tokenizer)
                    for _ in range(batch_size)]
        encode = lambda key: [tokenizer.encode(e[key]) for e in examples]  # noqa: E731
        if chat:
            split = [chat_split(tokenizer, e["context"], e["query"]) for e in examples]
            contexts, questions = [c for c, _ in split], [q for _, q in split]
        else:
            contexts, questions = encode("context"), encode("question")
        context, context_mask = data_lib.pad_rows(contexts, pad_id, pad_multiple, at_least=length)
        question, question_mask = data_lib.pad_rows(questions, pad_id, pad_multiple)
        answer, answer_mask = data_lib.pad_rows(encode("answer"), pad_id, pad_multiple, left=False)
        yield {"context": context, "question": question, "answer": answer, "context_mask": context_mask,
               "question_mask": question_mask, "answer_mask": answer_mask}


def predictor_example(model: DecoderLM, params, batch) -> Tuple[PrefillState, Tuple[jax.Array, ...]]:
    """(question-window PrefillState, per-layer targets [B, S, Hkv, G]) of a batch of prompts.

    batch: {"context" [B, S], "question" [B, Wq], "answer" [B, Wa]} and optional "context_mask",
    "question_mask", "answer_mask" (1 = real). The targets are value_group_scores(method="attention")
    of the question + answer window; the state keeps only the question's queries (what is known at
    compression time). Queries are causal, so they equal those of a question-only capture.
    """
    ids = [jnp.asarray(batch[k], jnp.int32) for k in ("context", "question", "answer")]
    masks = [None if batch.get(k) is None else jnp.asarray(batch[k], jnp.int32)
             for k in ("context_mask", "question_mask", "answer_mask")]
    return _example(model, params, *sharding.place_batch_leading(ids + masks))  # batch-split under a mesh


@functools.partial(jax.jit, static_argnames=("model",))
def _example(model, params, context, question, answer, context_mask, question_mask, answer_mask):
    ones = lambda x: jnp.ones(x.shape, jnp.int32)  # noqa: E731
    window_mask = None
    if question_mask is not None or answer_mask is not None:
        window_mask = jnp.concatenate([ones(question) if question_mask is None else question_mask,
                                       ones(answer) if answer_mask is None else answer_mask], axis=1)
    full = capture_prefill_state(model, params, context, jnp.concatenate([question, answer], axis=1),
                                 context_mask=context_mask, question_mask=window_mask)
    targets = value_group_scores(full, "attention")
    n_q = question.shape[1]
    state = full.replace(queries=tuple(q[:, :n_q] for q in full.queries), query_positions=full.query_positions[:, :n_q])
    return state, targets


def _units(per_layer, scope: str) -> jax.Array:
    """Per-layer [B, S, Hkv, G] arrays -> [units, pairs]: the scope units the ranking is over."""
    if scope == "head":
        return jnp.concatenate([jnp.transpose(x, (0, 2, 1, 3)).reshape(-1, x.shape[1] * x.shape[3])
                                for x in per_layer], axis=0)
    if scope == "layer":
        return jnp.concatenate([x.reshape(x.shape[0], -1) for x in per_layer], axis=0)
    if scope == "global":
        return jnp.concatenate([x.reshape(x.shape[0], -1) for x in per_layer], axis=1)
    raise InputError(f"unknown scope {scope!r}; choose one of {SCOPES}")


def listwise_loss(scores, targets, positions, scope: str = "head") -> jax.Array:
    """Mean over scope units of KL(normalised targets || softmax(scores)) over the unit's valid pairs.

    scores, targets: per layer [B, S, Hkv, G]; positions [B, S] (-1 = padding, excluded).
    """
    valid = [jnp.broadcast_to((positions >= 0)[:, :, None, None], s.shape) for s in scores]
    s, t, v = _units(scores, scope), _units(targets, scope), _units(valid, scope)
    t = jnp.where(v, jnp.maximum(jnp.asarray(t, jnp.float32), 0.0), 0.0)
    p = t / jnp.maximum(jnp.sum(t, axis=-1, keepdims=True), 1e-30)
    log_q = jax.nn.log_softmax(jnp.where(v, jnp.asarray(s, jnp.float32), _NEG), axis=-1)
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)
    has_mass = jnp.sum(t, axis=-1) > 0
    return jnp.sum(jnp.where(has_mass, kl, 0.0)) / jnp.maximum(jnp.sum(has_mass), 1)


def question_summaries(predictor: ValueGroupPredictor, state: PrefillState) -> Tuple[Tuple[jax.Array, jax.Array], ...]:
    """question_summary of every layer, each computed by its own jitted call.

    They do not depend on the predictor's parameters, so training computes them once per batch, outside
    the differentiated step. This also keeps the eigendecomposition out of the step's program: on the
    CPU backend (jax 0.10.2), a 32 x 32 `eigh` inside the jitted value_and_grad step was seen to hang
    (idle, never returning) while the same `eigh` in its own jit returns at once.
    """
    return tuple(question_summary(state, layer, predictor.spread_rank) for layer in range(state.num_layers))


def predictor_loss(predictor: ValueGroupPredictor, predictor_params, state: PrefillState, targets,
                   scope: str = "head", summaries=None) -> jax.Array:
    """The listwise ranking loss (KL, 0 = perfect ordering by mass) of the predictor on one example.

    summaries: question_summaries(predictor, state), when already computed."""
    summaries = question_summaries(predictor, state) if summaries is None else summaries
    return _predictor_loss(predictor, predictor_params, state, targets, summaries, scope)


@functools.partial(jax.jit, static_argnames=("predictor", "scope"))
def _predictor_loss(predictor, predictor_params, state, targets, summaries, scope):
    attention = [window_attention(state, layer) if predictor.exact_attention else None
                 for layer in range(state.num_layers)]
    scores = [predictor.apply({"params": predictor_params}, *summaries[layer], state.keys[layer], state.values[layer],
                              state.positions, state.query_positions, layer, state.value_groups, attention[layer])
              for layer in range(state.num_layers)]
    return listwise_loss(scores, targets, state.positions, scope)


def make_predictor_train_step(optimizer: optax.GradientTransformation, *, scope: str = "head"):
    """A pure step (predictor, params, opt_state, state, targets) -> (params, opt_state, metrics).

    `predictor` is static (a hashable linen module); metrics hold the loss and gradient norm. The question
    summaries are computed first (question_summaries), then the jitted update runs on them.
    """
    if scope not in SCOPES:
        raise InputError(f"unknown scope {scope!r}; choose one of {SCOPES}")

    @functools.partial(jax.jit, static_argnums=0)
    def update(predictor, predictor_params, opt_state, state, targets, summaries):
        loss, grads = jax.value_and_grad(
            lambda p: _predictor_loss(predictor, p, state, targets, summaries, scope))(predictor_params)
        updates, opt_state = optimizer.update(grads, opt_state, predictor_params)
        predictor_params = optax.apply_updates(predictor_params, updates)
        return predictor_params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def step(predictor, predictor_params, opt_state, state, targets):
        return update(predictor, predictor_params, opt_state, state, targets, question_summaries(predictor, state))

    return step


def make_predictor_optimizer(train) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping (config.train fields)."""
    steps = max(int(train.steps), int(train.warmup_steps) + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, train.warmup_steps, steps,
                                                  train.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(train.grad_clip),
                       optax.adamw(schedule, weight_decay=train.weight_decay))


def train_predictor(model: DecoderLM, params, prompts_iter, config, *, predictor_params=None,
                    progress: bool = True):
    """Trains the predictor on prompts from `prompts_iter` against the frozen base model; returns its params.

    prompts_iter yields predictor_example batches ({"context", "question", "answer"}); config is a
    ConfigDict as configs/predictor.py (uses seed, predictor.*, train.*). predictor_params: start point
    (default: a fresh init from config.seed).
    """
    predictor = make_predictor(config, model.config)
    optimizer = make_predictor_optimizer(config.train)
    step = make_predictor_train_step(optimizer, scope=config.train.scope)
    opt_state = None
    # distinct_batches > 0: that many examples are built (the base model's prefill, and its answers when
    # data.answers = "model": the expensive part on a real model) and then cycled, epoch after epoch
    distinct = int(config.train.get("distinct_batches", 0))
    examples = []
    bar = tqdm(range(config.train.steps), desc="predictor", dynamic_ncols=True, disable=not progress)
    for i in bar:
        if distinct and len(examples) == distinct:
            state, targets = examples[i % distinct]
        else:
            state, targets = predictor_example(model, params, next(prompts_iter))
            if distinct:
                examples.append((state, targets))
        if predictor_params is None:
            predictor_params = init_predictor(predictor, state, config.seed)
        if opt_state is None:  # replicated under a mesh: the loss's batch mean makes XLA all-reduce the grads
            predictor_params = sharding.replicate(predictor_params)
            opt_state = sharding.replicate(optimizer.init(predictor_params))
        predictor_params, opt_state, metrics = step(predictor, predictor_params, opt_state, state, targets)
        if i % max(1, config.train.log_every) == 0 or i == config.train.steps - 1:
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"predictor loss became {loss} at step {i}")
            bar.set_postfix(loss=f"{loss:.4f}")
    if predictor_params is None:  # zero steps
        predictor_params = init_predictor(predictor, predictor_example(model, params, next(prompts_iter))[0],
                                          config.seed)
    return predictor_params


def selection_quality(scores, targets, budget, positions, scope: str = "head") -> Dict[str, float]:
    """How well top-budget selection by `scores` matches the targets' own top-budget selection.

    recall: share of the targets' top pairs also selected; mass: share of the total target mass kept;
    oracle_mass: the mass the targets' own selection keeps (the ceiling of `mass`).
    """
    check_budget(budget)
    chosen = allocate_value_groups(scores, budget, scope=scope, positions=positions)
    best = allocate_value_groups(targets, budget, scope=scope, positions=positions)
    hit = sum(float(jnp.sum(c * b)) for c, b in zip(chosen, best))
    total_best = sum(float(jnp.sum(b)) for b in best)
    mass = sum(float(jnp.sum(c * t)) for c, t in zip(chosen, targets))
    oracle = sum(float(jnp.sum(b * t)) for b, t in zip(best, targets))
    real = (jnp.asarray(positions) >= 0)[:, :, None, None]
    total = sum(float(jnp.sum(jnp.where(real, t, 0.0))) for t in targets)
    return {"recall": hit / max(total_best, 1.0), "mass": mass / max(total, 1e-30),
            "oracle_mass": oracle / max(total, 1e-30)}


def evaluate_predictor(model: DecoderLM, params, predictor: ValueGroupPredictor, predictor_params, prompts_iter,
                       *, batches: int, budget: float, scope: str = "head", seed: int = 0) -> Dict[str, float]:
    """Mean held-out loss and selection quality of the predictor vs random scores over `batches` batches."""
    rng = np.random.default_rng(seed)
    totals: Dict[str, float] = {}
    for _ in range(batches):
        state, targets = predictor_example(model, params, next(prompts_iter))
        summaries = question_summaries(predictor, state)  # shared by the loss and the scores
        results = {"loss": float(predictor_loss(predictor, predictor_params, state, targets, scope, summaries))}
        scores = predictor_scores(predictor, predictor_params, state, summaries)
        results.update(selection_quality(scores, targets, budget, state.positions, scope))
        noise = [jnp.asarray(rng.random(t.shape, np.float32)) for t in targets]
        results.update({f"random_{k}": v for k, v in
                        selection_quality(noise, targets, budget, state.positions, scope).items()})
        for k, v in results.items():
            totals[k] = totals.get(k, 0.0) + v / batches
    return totals


def base_model(config):
    """(DecoderLM, params, tokenizer or None) of config.model: a train.py workdir (model.workdir: its base,
    with its tokenizer), a local HF folder (model.checkpoint) or a fresh random decoder."""
    fields = dict(config.model.to_dict())
    checkpoint = fields.pop("checkpoint", "")
    workdir = fields.pop("workdir", "")
    if workdir:
        model, params, tokenizer, _, _ = workdir_lib.load_workdir_base(workdir)
        return model, params, tokenizer
    if checkpoint:
        model, params, tokenizer = load_pretrained(checkpoint, fields.get("dtype", "float32"),
                                                   value_groups=fields.get("value_groups", 1),
                                                   with_tokenizer=config.data.get("source", "random_ids") == "tasks")
        return model, params, tokenizer
    model_config = ModelConfig.from_dict(fields)
    return (DecoderLM(model_config), jax.jit(lambda rng: init_params(model_config, rng)[1])(jax.random.key(config.seed)),
            None)


def prompt_batches(config, model: DecoderLM, tokenizer, seed: int, params=None) -> Iterator[Dict[str, np.ndarray]]:
    """Training / held-out prompts of config.data: random-id associative recall, or the text tasks."""
    source = config.data.get("source", "random_ids")
    if source == "random_ids":
        return associative_recall_prompts(model.config.vocab_size, config.train.batch_size, config.data.context_length,
                                          num_queries=config.data.num_queries, seed=seed)
    if source == "tasks":
        if tokenizer is None:
            raise ConfigError("data.source='tasks' needs a tokenizer: set model.workdir or model.checkpoint")
        pad_id = getattr(tokenizer, "pad_id", None)
        chat = bool(config.data.get("chat", False))
        batches = task_prompts(tokenizer, tuple(config.data.tasks), tuple(config.data.lengths),
                               config.train.batch_size, seed=seed, pad_id=0 if pad_id is None else pad_id, chat=chat)
        if config.data.get("answers", "reference") == "model":
            return with_model_answers(batches, model, params, tokenizer, config.data.get("answer_tokens", 32))
        return batches
    raise ConfigError(f"data.source={source!r} is unknown; choose {' or '.join(DATA_SOURCES)}")


def with_model_answers(batches: Iterator[Dict[str, np.ndarray]], model: DecoderLM, params, tokenizer,
                       max_new_tokens: int, pad_multiple: int = 16) -> Iterator[Dict[str, np.ndarray]]:
    """The batches with each reference answer replaced by the base model's own greedy full-cache answer (up to
    its end-of-turn, at most max_new_tokens), so the targets are the attention of the tokens a compressed cache
    must reproduce -- an instruct model answers in a sentence ("The magic number for X is N."), or lists
    after a lead-in line, not with the bare value."""

    eos = {i for i in (tokenizer.eos_id, getattr(tokenizer, "pad_id", None)) if i is not None}
    for batch in batches:
        prompt = np.concatenate([batch["context"], batch["question"]], axis=1)
        mask = np.concatenate([batch["context_mask"], batch["question_mask"]], axis=1)
        out = np.asarray(generate(model, params, jnp.asarray(prompt), attention_mask=jnp.asarray(mask),
                                  max_new_tokens=max_new_tokens))
        rows = []
        for ids in out.tolist():
            kept = []
            for token in ids:
                if token in eos:
                    break
                kept.append(token)
            rows.append(kept or ids[:1])
        answer, answer_mask = data_lib.pad_rows(rows, 0, pad_multiple, left=False)
        yield {**batch, "answer": answer, "answer_mask": answer_mask}


def validate_run_config(config) -> None:
    """One-line ConfigError for a predictor training config (configs/predictor.py) before any model is loaded."""
    check_ranges(config)
    for field in ("train.scope", "eval.scope"):
        section, key = field.split(".")
        if config[section][key] not in SCOPES:
            raise ConfigError(f"config.{field}={config[section][key]!r}: choose one of {SCOPES}")
    if config.data.source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source={config.data.source!r} is unknown; choose {' or '.join(DATA_SOURCES)}")
    if config.data.get("answers", "reference") not in ("reference", "model"):
        raise ConfigError(f"config.data.answers={config.data.answers!r}: choose reference or model")
    checkpoint = config.model.get("checkpoint", "")
    if checkpoint:
        resolve_checkpoint(checkpoint)  # a missing folder / file fails here, before the base loads
    workdir = config.model.get("workdir", "")
    if workdir and not os.path.isfile(os.path.join(workdir, "config.json")):
        raise ConfigError(f"config.model.workdir={workdir!r} is not a train.py workdir (no config.json)")


def run(config, workdir: Optional[str] = None) -> Dict[str, float]:
    """Trains a predictor for config's base model on config.data's prompts, then evaluates it on held-out
    prompts (seed + 10000).

    With a workdir, writes predictor_params.msgpack, config.json (this config, plus the base's layer count
    and G, which load_predictor checks) and predictor_eval.json there.
    """
    validate_run_config(config)
    sharding.check_config_mesh(config, config.train.batch_size)
    with sharding.config_mesh(config, config.train.batch_size):
        if workdir:
            with workdir_lib.WorkdirLock(workdir):
                return _train_and_write(config, workdir)
        return _train_and_write(config, workdir)


def _train_and_write(config, workdir: Optional[str]) -> Dict[str, float]:
    model, params, tokenizer = base_model(config)
    params = sharding.place_params(model, params)  # no-op without a mesh
    predictor_params = train_predictor(model, params, prompt_batches(config, model, tokenizer, config.seed, params),
                                       config)
    predictor = make_predictor(config, model.config)
    result = evaluate_predictor(model, params, predictor, predictor_params,
                                prompt_batches(config, model, tokenizer, config.seed + 10_000, params),
                                batches=config.eval.batches, budget=config.eval.value_budget, scope=config.eval.scope,
                                seed=config.seed)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "predictor_params.msgpack"), "wb") as fh:
            fh.write(serialization.to_bytes(predictor_params))
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            json.dump({**config.to_dict(), "base_num_layers": model.config.num_layers,
                       "base_value_groups": model.config.value_groups}, fh, indent=2, default=list)
        with open(os.path.join(workdir, "predictor_eval.json"), "w") as fh:
            json.dump({k: float(v) for k, v in result.items()}, fh, indent=2)
    return result
