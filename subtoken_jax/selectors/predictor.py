"""A learned predictor of value-group relevance: which (context token, KV head, value group) pairs the
answer will read, scored from what is known at compression time (the context's KV cache and the question).

    predictor = make_predictor(config, model.config)
    pparams = predictor_training.train_predictor(model, params, associative_recall_prompts(vocab, 16, 32), config)
    # or a shipped / trained one: predictor, pparams = load_predictor(predictor_folder(name), model.config)
    state = capture_prefill_state(model, params, context_ids, question_ids)
    keep, groups = combine(state, None, 1.0, predictor_scorer(predictor, pparams), 0.25)

Targets. For a training prompt (context, question, answer) the target of group g of token j for KV
head h is its expected contribution to the read-outs of the future queries (question + answer
positions): their realised attention on j, averaged over query positions and the query heads of the
group, times ||v_{j,h,g}|| -- `value_group_scores(state, "attention")` with the question + answer as
the window. The predictor only sees the question (the answer is what is being generated), so it has to
anticipate how the answer's queries, at later positions, will attend.

Training (targets, the listwise loss, optax steps, prompts, the workdir): predictor_training.py.

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
import math
import os
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from subtoken_jax.errors import ConfigError, InputError
from subtoken_jax.json_files import read_json_object
from subtoken_jax.model_config import ModelConfig
from subtoken_jax.selectors.base import PrefillState, TokenSelector, window_attention


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


# ----------------------------------------------------------------------------- loss and training


# ----------------------------------------------------------------------------- evaluation


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
    """(ValueGroupPredictor, params) written by predictor_training.run() to `folder` (config.json + predictor_params.msgpack), or
    the shipped predictor of that name (shipped_predictors(), e.g. "smollm2-135m-instruct")."""
    from flax import serialization
    from ml_collections import ConfigDict

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


