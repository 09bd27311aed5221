"""A learned predictor of value-group relevance: which (context token, KV head, value group) pairs the
answer will read, scored from what is known at compression time (the context's KV cache and the question).

    predictor = make_predictor(config, model.config)
    pparams = train_predictor(model, params, associative_recall_prompts(vocab, 16, 32), config)
    state = capture_prefill_state(model, params, context_ids, question_ids)
    keep, groups = combine(state, None, 1.0, predictor_scorer(predictor, pparams), 0.25)

Targets. For a training prompt (context, question, answer) the target of group g of token j for KV
head h is its expected contribution to the read-outs of the future queries (question + answer
positions): their realised attention on j, averaged over query positions and the query heads of the
group, times ||v_{j,h,g}|| -- `value_group_scores(state, "attention")` with the question + answer as
the window. The predictor only sees the question (the answer is what is being generated), so it has to
anticipate how the answer's queries, at later positions, will attend.

Loss. The allocation keeps the top-B pairs of a scope unit (allocate_value_groups), so only the order
of the scores inside a unit matters, not their scale. We therefore use a listwise ranking loss: per
unit (default: per (row, layer, KV head), the "head" scope) the targets are normalised into a
distribution over all (token, group) pairs, and the loss is KL(target || softmax(predicted scores)).
Compared with regressing log-targets, (i) errors are weighted by target mass, so capacity goes into
ordering the few pairs that carry the attention (the ones a top-B selection fights over) instead of
fitting the log-magnitude of thousands of negligible pairs, which a log-regression weights equally
and whose log-targets are dominated by noise near zero; (ii) it is invariant to each unit's overall
scale, which the features cannot know anyway (how much the answer attends to the context at all);
(iii) it is exactly zero at a perfect prediction, so its value is readable. The "layer" / "global"
scopes make the loss listwise over a whole layer / all layers of a row, for the matching allocation
scopes, where scores must also be comparable across heads and layers; the predictor's base term is a
normalised log-attention, so it starts calibrated across heads and layers.

Cost. Per layer and row the predictor does O(S * Hkv * ((1 + r) * D + G * h)) work: one dot product
of the question summary with each key (its split into frequency bands reuses the same products), r
more with the question's top spread directions (r = 2 by default), the value-group norms (D per token
and head), and a one-hidden-layer MLP of width h per (token, head, group) whose token-level part is
computed once per (token, head). The question statistics cost O(min(N, D)^3 + N * D^2) per head for the
N = W * Hq / Hkv question queries, independent of S. There is no S x S (or S x question) attention, so
it stays small next to the prefill, which costs O(S * (E^2 + S * Hq * D)) per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from subtoken_jax.errors import ConfigError, InputError
from subtoken_jax.model import DecoderLM
from subtoken_jax.model_config import ModelConfig, check_budget
from subtoken_jax.selectors.allocate import SCOPES, allocate_value_groups
from subtoken_jax.selectors.base import PrefillState, TokenSelector, capture_prefill_state, window_attention
from subtoken_jax.selectors.subtoken import value_group_scores

DATA_SOURCES = ("random_ids", "tasks")  # training prompts: associative recall over ids, or the text tasks

_EPS = 1e-6
_NEG = -1e30  # score of padded pairs (finite, so softmaxes over a unit stay NaN-free)


# ----------------------------------------------------------------------------- features


def question_summary(state: PrefillState, layer: int, spread_rank: int = 0) -> Tuple[jax.Array, jax.Array]:
    """The question's query summary per KV head: (mean [B, Hkv, D], spread [B, Hkv, spread_rank, D]).

    mean: the window's rotated queries averaged over valid positions and the query heads of each KV
    group; by linearity, mean . k_j / sqrt(D) is exactly token j's mean attention logit. spread: the
    top principal directions of those queries around the mean, scaled by the root of their variance
    (sqrt(lambda_i) u_i), so sum_i (spread_i . k)^2 is a rank-r k^T Sigma k, the second-moment term of
    expected attention (E exp(q.k/sqrt(D)) = exp(mu.k/sqrt(D) + k^T Sigma k / 2D) for Gaussian q).
    Cost is independent of the context length.
    """
    return _question_summary(state.queries[layer], state.query_positions, state.num_kv_heads, spread_rank)


@functools.partial(jax.jit, static_argnames=("kv_heads", "spread_rank"))
def _question_summary(queries, query_positions, kv_heads, spread_rank):
    batch, window, heads, dim = queries.shape
    group = heads // kv_heads
    x = jnp.transpose(queries.astype(jnp.float32).reshape(batch, window, kv_heads, group, dim), (0, 2, 1, 3, 4))
    x = x.reshape(batch, kv_heads, window * group, dim)  # the group's queries, pooled over heads and positions
    w = jnp.repeat((query_positions >= 0).astype(jnp.float32), group, axis=1)[:, None, :, None]  # [B, 1, N, 1]
    n = jnp.maximum(jnp.sum(w, axis=2), 1.0)  # [B, 1, 1]
    mean = jnp.sum(x * w, axis=2) / n
    centred = (x - mean[:, :, None]) * w / jnp.sqrt(n)[:, :, None]  # rows r: Sigma = centred^T centred
    rank = spread_rank
    if rank == 0:
        return mean, jnp.zeros((batch, kv_heads, 0, dim), jnp.float32)
    points = window * group
    if points <= dim:  # eigenvectors v of the small Gram matrix: sqrt(lambda) u = centred^T v
        _, vecs = jnp.linalg.eigh(jnp.einsum("bhnd,bhmd->bhnm", centred, centred))
        top = vecs[..., ::-1][..., :min(rank, points)]  # [B, Hkv, N, r]
        spread = jnp.einsum("bhnd,bhnr->bhrd", centred, top)
    else:
        lam, vecs = jnp.linalg.eigh(jnp.einsum("bhnd,bhne->bhde", centred, centred))
        lam, vecs = lam[..., ::-1][..., :rank], vecs[..., ::-1][..., :rank]
        spread = jnp.swapaxes(vecs * jnp.sqrt(jnp.maximum(lam, 0.0))[..., None, :], -1, -2)
    if spread.shape[2] < rank:
        spread = jnp.pad(spread, ((0, 0), (0, 0), (0, rank - spread.shape[2]), (0, 0)))
    return mean, spread


_PAD_LOG_ATTN = -30.0  # centred log-attention given to padding before neighbours are pooled (below any real token)


def neighbour_attention(centred_log_attn: jax.Array, width: int) -> jax.Array:
    """[B, S, Hkv, 2] max over the `width` tokens before / after each token of the centred log-attention.

    Why: an answer that copies a span reads the tokens *after* the one the question matches (induction:
    the answer's query at step i looks for the token following its previous output), so a token right
    after a strongly matched one is likely read even when the question itself barely attends to it; and
    the token before a matched one carries the context the match was made in. width 0 gives [B, S, Hkv, 0].
    """
    if width <= 0:
        return jnp.zeros(centred_log_attn.shape + (0,), centred_log_attn.dtype)
    x = jnp.transpose(centred_log_attn, (0, 2, 1))  # [B, Hkv, S]
    pad = jnp.full(x.shape[:2] + (width,), _PAD_LOG_ATTN, x.dtype)
    wide = jnp.concatenate([pad, x, pad], axis=-1)
    length = x.shape[-1]
    before = jnp.max(jnp.stack([wide[..., width - k:width - k + length] for k in range(1, width + 1)]), axis=0)
    after = jnp.max(jnp.stack([wide[..., width + k:width + k + length] for k in range(1, width + 1)]), axis=0)
    return jnp.transpose(jnp.stack([before, after], axis=-1), (0, 2, 1, 3))


def _masked_mean_std(x, valid, axis):
    """Mean and std of x over `axis` where valid (broadcastable), keepdims."""
    w = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w, axis=axis, keepdims=True), 1.0)
    mean = jnp.sum(x * w, axis=axis, keepdims=True) / n
    var = jnp.sum(((x - mean) * w) ** 2, axis=axis, keepdims=True) / n
    return mean, jnp.sqrt(var + _EPS)


# ----------------------------------------------------------------------------- the module


class ValueGroupPredictor(nn.Module):
    """Scores each (context token, KV head, value group) for relevance to the coming queries: [B, S, Hkv, G].

    One module serves every layer of the base model. The set of layers is small (tens), and what makes
    a group relevant -- a high attention logit against the question, a large value norm, recency, how
    the match is spread over RoPE frequency bands (which decides whether it survives the shift to the
    answer's positions) -- is the same kind of evidence in every layer, so sharing keeps the predictor
    tiny (a few thousand parameters) and lets it generalise from few prompts; a learned per-layer
    embedding (and per-layer weights of the two prior terms) lets layers differ where they do.

    score = c1[l] * log a_j + c2[l] * log ||v_{j,g}|| + MLP(features, layer embedding)

    where a_j = softmax_j(summary . k_j / sqrt(D)) over the real context tokens is the attention-logit
    prior, computed exactly from the question summary (log a_j is its log-softmax; c1 = c2 = 1 and the
    MLP's zero-initialised output make the untrained predictor the closed-form prior
    a_j * ||v_{j,g}||). The MLP (one hidden layer of width `hidden_size`) sees per token: log a_j
    (+ log n, so uniform = 0), the standardised logit, the logit's split over `bands` RoPE frequency
    bands (standardised), the rank-r second-moment terms (spread_i . k_j)^2 / 2D (standardised: where
    the question's queries disagree, the mean logit underrates keys that one of them matches strongly),
    log ||k_j||, log ||v_j||, recency (log distance to the question, relative position) and a
    first-token flag (attention sinks); per group: log ||v_{j,g}|| (centred per head) and its share of
    the token's value norm. Token features go through the first layer once per (token, head) and are
    broadcast over groups, so the cost is O(S * Hkv * ((1 + r) * D + G * h)) per layer.
    """

    num_layers: int  # of the base model (size of the layer embedding table)
    hidden_size: int = 32  # h: width of the MLP's hidden layer
    layer_embed_size: int = 8  # dimension of the learned per-layer embedding
    bands: int = 4  # RoPE frequency bands the logit is split into (must divide head_dim / 2)
    spread_rank: int = 2  # r: principal directions of the question's queries used (0 = the mean only)
    neighbours: int = 0  # w: also see the attention prior of the w tokens before and after each token (0 = off)
    # the prior a_j is the question's exact attention (mean over its queries of their softmaxes, as SnapKV
    # reads it; O(S * W) per layer) instead of the softmax of the mean query's logits (O(S))
    exact_attention: bool = False

    @nn.compact
    def __call__(self, q_summary, q_spread, keys, values, positions, query_positions, layer, value_groups: int,
                 question_attention=None):
        """q_summary [B, Hkv, D], q_spread [B, Hkv, r, D] (question_summary); keys, values [B, S, Hkv, D]
        (keys rotated); positions [B, S] (-1 = pad); query_positions [B, W]; layer: int (or int array);
        question_attention [B, Hkv, S] (window_attention; needed when exact_attention).
        Returns scores [B, S, Hkv, G]; padded slots get -1e30."""
        batch, length, kv_heads, dim = keys.shape
        half = dim // 2
        if dim % 2 or half % self.bands:
            raise InputError(f"bands={self.bands} must divide head_dim/2={half}")
        if dim % value_groups:
            raise InputError(f"G={value_groups} value groups do not divide head_dim={dim}")
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        q, k, v = f32(q_summary), f32(keys), f32(values)
        real = positions >= 0  # [B, S]
        real_h = real[:, :, None]  # [B, S, 1]

        # attention-logit prior, exact: z_j = summary . k_j / sqrt(D), split over frequency bands
        prod = k * q[:, None]  # [B, S, Hkv, D]
        per_freq = prod[..., :half] + prod[..., half:]  # the two halves of a RoPE pair share a frequency
        band_logits = jnp.sum(per_freq.reshape(batch, length, kv_heads, self.bands, -1), -1) / math.sqrt(dim)
        z = jnp.sum(band_logits, axis=-1)  # [B, S, Hkv]
        if self.exact_attention:
            if question_attention is None:
                raise InputError("this predictor (exact_attention) needs the question's attention: "
                                 "question_attention=window_attention(state, layer)")
            log_attn = jnp.log(jnp.transpose(f32(question_attention), (0, 2, 1)) + 1e-9)
        else:
            log_attn = jax.nn.log_softmax(jnp.where(real_h, z, _NEG), axis=1)
        log_attn = jnp.where(real_h, log_attn, 0.0)
        n_real = jnp.maximum(jnp.sum(real, axis=1), 1).astype(jnp.float32)  # [B]
        z_mean, z_std = _masked_mean_std(z, real_h, axis=1)
        band_mean, _ = _masked_mean_std(band_logits, real_h[..., None], axis=1)
        # second moment of the question's queries along their top directions: rank-r k^T Sigma k / 2D
        proj = jnp.einsum("bhrd,bshd->bshr", f32(q_spread), k) ** 2 / (2 * dim)  # [B, S, Hkv, r]
        proj_mean, proj_std = _masked_mean_std(proj, real_h[..., None], axis=1)
        proj_c = (proj - proj_mean) / proj_std

        # value groups
        grouped = v.reshape(batch, length, kv_heads, value_groups, dim // value_groups)
        log_vg = 0.5 * jnp.log(jnp.sum(grouped ** 2, axis=-1) + _EPS)  # [B, S, Hkv, G]
        log_v = 0.5 * jnp.log(jnp.sum(v ** 2, axis=-1) + _EPS)  # [B, S, Hkv]
        log_k = 0.5 * jnp.log(jnp.sum(k ** 2, axis=-1) + _EPS)
        vg_mean, _ = _masked_mean_std(log_vg, real[:, :, None, None], axis=(1, 3))
        v_mean, _ = _masked_mean_std(log_v, real_h, axis=1)
        k_mean, _ = _masked_mean_std(log_k, real_h, axis=1)

        # position: distance to the question's first token, relative position, first real token
        q_start = jnp.min(jnp.where(query_positions >= 0, query_positions, jnp.iinfo(jnp.int32).max), axis=1)
        last = jnp.max(positions, axis=1)
        q_start = jnp.where(q_start == jnp.iinfo(jnp.int32).max, last + 1, q_start)  # no valid question slot
        first = jnp.min(jnp.where(real, positions, jnp.iinfo(jnp.int32).max), axis=1)
        dist = jnp.maximum(q_start[:, None] - positions, 1).astype(jnp.float32)  # [B, S]
        rel = (positions - first[:, None]).astype(jnp.float32) / jnp.maximum(last - first, 1)[:, None]
        is_first = (positions == first[:, None]).astype(jnp.float32)
        per_token = lambda x: jnp.broadcast_to(x[:, :, None], (batch, length, kv_heads))  # noqa: E731
        centred_log_attn = jnp.where(real_h, log_attn + jnp.log(n_real)[:, None, None], _PAD_LOG_ATTN)

        token_features = jnp.concatenate([
            (log_attn + jnp.log(n_real)[:, None, None])[..., None],
            ((z - z_mean) / z_std)[..., None],
            (band_logits - band_mean) / z_std[..., None],
            proj_c,
            (log_k - k_mean)[..., None],
            (log_v - v_mean)[..., None],
            per_token(jnp.log(dist))[..., None],
            per_token(rel)[..., None],
            per_token(is_first)[..., None],
            neighbour_attention(centred_log_attn, self.neighbours),
        ], axis=-1)  # [B, S, Hkv, F_tok]
        group_features = jnp.stack([log_vg - vg_mean, log_vg - log_v[..., None]], axis=-1)  # [B, S, Hkv, G, 2]
        token_features = jnp.where(real_h[..., None], token_features, 0.0)
        group_features = jnp.where(real_h[..., None, None], group_features, 0.0)

        layer = jnp.asarray(layer, jnp.int32)
        layer_embedding = nn.Embed(self.num_layers, self.layer_embed_size, name="layer_embedding")(layer)
        prior_weights = nn.Embed(self.num_layers, 2, embedding_init=nn.initializers.ones,
                                 name="prior_weights")(layer)
        hidden = (nn.Dense(self.hidden_size, name="token_in")(token_features)[:, :, :, None, :]
                  + nn.Dense(self.hidden_size, use_bias=False, name="group_in")(group_features)
                  + nn.Dense(self.hidden_size, use_bias=False, name="layer_in")(layer_embedding))
        residual = nn.Dense(1, kernel_init=nn.initializers.zeros, name="out")(nn.gelu(hidden))[..., 0]
        score = prior_weights[0] * log_attn[..., None] + prior_weights[1] * log_vg + residual
        return jnp.where(real[:, :, None, None], score, _NEG)


def make_predictor(config, model_config: ModelConfig) -> ValueGroupPredictor:
    """The predictor module for a base model, from a ConfigDict with a `predictor` section (configs/predictor.py)."""
    p = config.predictor
    half = model_config.resolved_head_dim // 2
    if p.hidden_size < 1 or p.layer_embed_size < 1:
        raise ConfigError("predictor.hidden_size and predictor.layer_embed_size must be >= 1")
    if p.bands < 1 or half % p.bands:
        raise ConfigError(f"predictor.bands={p.bands} must divide head_dim/2={half}")
    if p.spread_rank < 0:
        raise ConfigError(f"predictor.spread_rank must be >= 0, got {p.spread_rank}")
    neighbours = p.get("neighbours", 0)
    if neighbours < 0:
        raise ConfigError(f"predictor.neighbours must be >= 0, got {neighbours}")
    return ValueGroupPredictor(num_layers=model_config.num_layers, hidden_size=p.hidden_size,
                               layer_embed_size=p.layer_embed_size, bands=p.bands, spread_rank=p.spread_rank,
                               neighbours=neighbours, exact_attention=bool(p.get("exact_attention", False)))


# ----------------------------------------------------------------------------- scoring a prefill


def _layer_inputs(predictor: ValueGroupPredictor, state: PrefillState, layer: int, summary=None):
    """The module's array inputs for one layer: (summary, spread, keys, values, positions, query positions,
    question attention or None)."""
    summary = question_summary(state, layer, predictor.spread_rank) if summary is None else summary
    attention = window_attention(state, layer) if predictor.exact_attention else None
    return (*summary, state.keys[layer], state.values[layer], state.positions, state.query_positions, attention)


@functools.partial(jax.jit, static_argnames=("predictor", "groups"))
def _apply_layer(predictor, predictor_params, inputs, layer, groups):
    return predictor.apply({"params": predictor_params}, *inputs[:6], layer, groups, inputs[6])


def predictor_layer_scores(predictor: ValueGroupPredictor, predictor_params, state: PrefillState,
                           layer: int, summary=None) -> jax.Array:
    """[B, S, Hkv, G] predicted relevance of layer `layer`'s value groups (state: question window).

    summary: that layer's question_summary, when already computed."""
    if state.window_in_context:
        raise InputError("the predictor scores against a question: capture the state with question_ids")
    inputs = _layer_inputs(predictor, state, layer, summary)
    return _apply_layer(predictor, predictor_params, inputs, jnp.asarray(layer, jnp.int32), state.value_groups)


def predictor_scores(predictor: ValueGroupPredictor, predictor_params, state: PrefillState,
                     summaries=None) -> Tuple[jax.Array, ...]:
    """Per-layer predicted scores [B, S, Hkv, G], ready for `allocate_value_groups`.

    summaries: question_summaries(predictor, state), when already computed."""
    return tuple(predictor_layer_scores(predictor, predictor_params, state, layer,
                                        None if summaries is None else summaries[layer])
                 for layer in range(state.num_layers))


def predictor_scorer(predictor: ValueGroupPredictor, predictor_params) -> Callable[[PrefillState, int], jax.Array]:
    """A (state, layer) -> [B, S, Hkv, G] function, as `combine` takes (subtoken_scores_fn)."""
    return functools.partial(predictor_layer_scores, predictor, predictor_params)


@dataclasses.dataclass(frozen=True, eq=False)
class PredictorSelector(TokenSelector):
    """Token eviction by a trained predictor: a token's score is its predicted relevance summed over its value
    groups (logsumexp of the pair scores), so one predictor ranks both tokens and the groups inside them."""

    predictor: ValueGroupPredictor
    params: object

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        return jax.nn.logsumexp(predictor_layer_scores(self.predictor, self.params, state, layer), axis=-1)


def init_predictor(predictor: ValueGroupPredictor, state: PrefillState, seed: int = 0):
    """Fresh predictor parameters (shapes from one layer of `state`)."""
    return _init(predictor, jax.random.key(seed), _layer_inputs(predictor, state, 0), state.value_groups)


@functools.partial(jax.jit, static_argnames=("predictor", "groups"))
def _init(predictor, rng, inputs, groups):
    return predictor.init(rng, *inputs[:6], jnp.zeros((), jnp.int32), groups, inputs[6])["params"]


# ----------------------------------------------------------------------------- training examples


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
    from subtoken_jax import data as data_lib
    from subtoken_jax.evaluation.tasks import chat_split

    unknown = [t for t in tasks if t not in data_lib.TASKS]
    if unknown or not tasks or not lengths:
        raise ConfigError(f"data.tasks={list(tasks)} must be a non-empty list of {', '.join(data_lib.TASKS)} and "
                          f"data.lengths={list(lengths)} non-empty")
    rng = np.random.default_rng([seed, 17])

    for k in itertools.count():
        length = int(lengths[k % len(lengths)])
        examples = [data_lib.TASKS[tasks[int(rng.integers(len(tasks)))]](rng, length, tokenizer)
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
    return _example(model, params, *ids, *masks)


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


# ----------------------------------------------------------------------------- loss and training


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
        if opt_state is None:
            opt_state = optimizer.init(predictor_params)
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


# ----------------------------------------------------------------------------- evaluation


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
    from subtoken_jax.model import init_params

    fields = dict(config.model.to_dict())
    checkpoint = fields.pop("checkpoint", "")
    workdir = fields.pop("workdir", "")
    if workdir:
        from subtoken_jax import trainer

        model, params, tokenizer, _, _ = trainer.load_workdir_base(workdir)
        return model, params, tokenizer
    if checkpoint:
        from subtoken_jax.pretrained import load_pretrained

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
    from subtoken_jax import data as data_lib
    from subtoken_jax.generate import generate

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


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "predictors")


def shipped_predictors() -> Tuple[str, ...]:
    """Names of the trained predictors that ship with the package (subtoken_jax/predictors/<name>/)."""
    if not os.path.isdir(SHIPPED_DIR):
        return ()
    return tuple(sorted(n for n in os.listdir(SHIPPED_DIR) if os.path.isfile(os.path.join(SHIPPED_DIR, n,
                                                                                           "config.json"))))


def predictor_folder(name_or_folder: str) -> str:
    """A predictor folder: `name_or_folder` itself when it is a directory, else the shipped predictor of that name."""
    if os.path.isdir(name_or_folder) or os.sep in name_or_folder:
        return name_or_folder
    if name_or_folder in shipped_predictors():
        return os.path.join(SHIPPED_DIR, name_or_folder)
    raise InputError(f"predictor {name_or_folder!r} is neither a folder nor a shipped predictor "
                     f"({', '.join(shipped_predictors()) or 'none shipped'})")


def check_predictor_folder(folder: str, label: Optional[str] = None) -> Tuple[str, str]:
    """The (config.json, predictor_params.msgpack) paths run() wrote to `folder` (or of the shipped predictor of
    that name); an InputError if either is missing. label names the folder in that error (default: itself)."""
    folder = predictor_folder(folder)
    paths = tuple(os.path.join(folder, name) for name in ("config.json", "predictor_params.msgpack"))
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise InputError(f"{label or folder} holds no trained predictor (missing {', '.join(missing)}); "
                         "train one with train.py --config configs/predictor.py")
    return paths


def load_predictor(folder: str, model_config: ModelConfig):
    """(ValueGroupPredictor, params) written by run() to `folder` (config.json + predictor_params.msgpack), or
    the shipped predictor of that name (shipped_predictors(), e.g. "smollm2-135m-instruct")."""
    from flax import serialization
    from ml_collections import ConfigDict

    from subtoken_jax.workdir import read_json_object

    paths = check_predictor_folder(folder)
    config = ConfigDict(read_json_object(paths[0], "train.py --config configs/predictor.py writes it"))
    trained_layers = config.get("base_num_layers", model_config.num_layers)
    if trained_layers != model_config.num_layers or config.get("base_value_groups",
                                                               model_config.value_groups) != model_config.value_groups:
        raise InputError(f"the predictor in {folder} was trained for a base of {trained_layers} layers and "
                         f"G={config.get('base_value_groups')}; this model has {model_config.num_layers} layers and "
                         f"G={model_config.value_groups}")
    predictor = make_predictor(config, model_config)
    with open(paths[1], "rb") as fh:
        raw = serialization.msgpack_restore(fh.read())
    return predictor, jax.tree.map(jnp.asarray, raw)


def validate_run_config(config) -> None:
    """One-line ConfigError for a predictor training config (configs/predictor.py) before any model is loaded."""
    from subtoken_jax.config_checks import check_ranges

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
        from subtoken_jax.pretrained import resolve_checkpoint

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
    if workdir:
        from subtoken_jax.workdir import WorkdirLock

        with WorkdirLock(workdir):
            return _train_and_write(config, workdir)
    return _train_and_write(config, workdir)


def _train_and_write(config, workdir: Optional[str]) -> Dict[str, float]:
    model, params, tokenizer = base_model(config)
    predictor_params = train_predictor(model, params, prompt_batches(config, model, tokenizer, config.seed, params),
                                       config)
    predictor = make_predictor(config, model.config)
    result = evaluate_predictor(model, params, predictor, predictor_params,
                                prompt_batches(config, model, tokenizer, config.seed + 10_000, params),
                                batches=config.eval.batches, budget=config.eval.value_budget, scope=config.eval.scope,
                                seed=config.seed)
    if workdir:
        from flax import serialization

        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "predictor_params.msgpack"), "wb") as fh:
            fh.write(serialization.to_bytes(predictor_params))
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            json.dump({**config.to_dict(), "base_num_layers": model.config.num_layers,
                       "base_value_groups": model.config.value_groups}, fh, indent=2, default=list)
        with open(os.path.join(workdir, "predictor_eval.json"), "w") as fh:
            json.dump({k: float(v) for k, v in result.items()}, fh, indent=2)
    return result
