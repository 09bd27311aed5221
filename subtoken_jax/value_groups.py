"""Value groups: each KV head's value vector split into G equal slices that can be kept or dropped.

A value-group mask is an array [batch, kv_length, kv_heads, G] (1 keep, 0 drop); a model-wide mask is
a plain pytree: a tuple with one such array (or None) per layer. Keys and queries are never masked,
so attention weights are unchanged and only the value read-out is sparsified.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.permutations import inverse_permutation

PerLayer = Union[None, jax.Array, Sequence[Optional[jax.Array]]]


def expand_group_mask(group_mask: jax.Array, head_dim: int) -> jax.Array:
    """[..., G] -> [..., head_dim]: each group's flag repeated over its head_dim // G channels."""
    groups = group_mask.shape[-1]
    if head_dim % groups:
        raise InputError(f"value-group mask has G={groups} groups, which does not divide head_dim={head_dim}")
    return jnp.repeat(group_mask, head_dim // groups, axis=-1)


def mask_values(values: jax.Array, group_mask: Optional[jax.Array]) -> jax.Array:
    """Zeros the dropped groups of values [batch, kv_length, kv_heads, head_dim]."""
    if group_mask is None:
        return values
    if group_mask.ndim != 4 or group_mask.shape[:3] != values.shape[:3]:
        raise InputError(
            f"value-group mask shape {tuple(group_mask.shape)} does not match values {tuple(values.shape[:3])} + (G,)"
            " [batch, kv_length, kv_heads, G]")
    return values * expand_group_mask(group_mask, values.shape[-1]).astype(values.dtype)


def per_layer(masks: PerLayer, num_layers: int, what: str):
    """Normalises None / one array for all layers / a per-layer sequence into a tuple of length num_layers."""
    if masks is None or hasattr(masks, "shape"):
        return (masks,) * num_layers
    masks = tuple(masks)
    if len(masks) != num_layers:
        raise InputError(f"{what} has {len(masks)} entries but the model has {num_layers} layers")
    return masks


def kept_fraction(masks: PerLayer) -> jax.Array:
    """Fraction of value groups kept over all given (non-None) layer masks."""
    leaves = [m for m in jax.tree.leaves(masks)]
    kept = sum(jnp.sum(m.astype(jnp.float32)) for m in leaves)
    total = sum(m.size for m in leaves)
    return kept / total


# ----------------------------------------------------------------------------- query-independent routing
#
# A router scores each (token, KV head, value group) from the token's own hidden state; a budget rho
# turns scores into a hard 0/1 mask. The forward pass uses the hard mask; gradients reach the router
# through a sigmoid relaxation around the keep threshold (straight-through estimator).


def group_norm_scores(values: jax.Array, groups: int) -> jax.Array:
    """log ||v_g|| for values [B, S, Hkv, D] -> [B, S, Hkv, G] (the keep-largest-norm heuristic's score)."""
    batch, length, heads, dim = values.shape
    grouped = values.reshape(batch, length, heads, groups, dim // groups).astype(jnp.float32)
    return 0.5 * jnp.log(jnp.sum(jnp.square(grouped), axis=-1) + 1e-12)


def _straight_through(hard: jax.Array, scores: jax.Array, threshold: jax.Array, temperature: float):
    soft = jax.nn.sigmoid((scores - threshold) / temperature)
    return hard + (soft - jax.lax.stop_gradient(soft))  # forward value is exactly `hard`


_PAIRWISE_MAX_GROUPS = 32  # fixed_k_mask ranks by pairwise compares up to this G, by sorting above


def fixed_k_mask(scores: jax.Array, budget, temperature: float = 1.0) -> jax.Array:
    """Keeps exactly K = round(budget * G) (at least 1) groups of every token and head.

    `budget` may be a traced scalar: ranks do not depend on it, so one compilation serves every budget.
    Ties go to the lower group index.
    The relaxation's threshold sits halfway between the K-th and (K+1)-th score.
    """
    groups = scores.shape[-1]
    k = jnp.clip(jnp.round(jnp.asarray(budget, jnp.float32) * groups), 1, groups).astype(jnp.int32)
    next_index = jnp.minimum(k, groups - 1)
    s = jax.lax.stop_gradient(scores)
    if groups <= _PAIRWISE_MAX_GROUPS:
        # rank = how many groups beat this one (higher score, or equal score at a lower index): the
        # same ranks as a stable descending sort, from G x G compares, which XLA runs much faster
        # than a sort of short rows (17x on CPU at G=8)
        index = jnp.arange(groups)
        beats = (s[..., None, :] > s[..., :, None]) | ((s[..., None, :] == s[..., :, None])
                                                       & (index[None, :] < index[:, None]))
        ranks = jnp.sum(beats, axis=-1)
        score_at = lambda rank: jnp.max(jnp.where(ranks == rank, s, -jnp.inf), axis=-1, keepdims=True)  # noqa: E731
        kth, after = score_at(k - 1), score_at(next_index)
    else:
        order = jnp.argsort(-s, axis=-1)
        ranks = inverse_permutation(order)
        ranked = -jnp.sort(-s, axis=-1)
        kth = jnp.take_along_axis(ranked, jnp.broadcast_to(k - 1, scores.shape[:-1])[..., None], axis=-1)
        after = jnp.take_along_axis(ranked, jnp.broadcast_to(next_index, scores.shape[:-1])[..., None], axis=-1)
    hard = (ranks < k).astype(scores.dtype)
    after = jnp.where(k >= groups, kth - 1.0, after)
    threshold = jax.lax.stop_gradient(0.5 * (kth + after))
    return _straight_through(hard, scores, threshold, temperature)


def _causal_threshold(scores: jax.Array, budget, valid: Optional[jax.Array], prefix_stats: Optional[jax.Array]):
    """The adaptive rule's per-token threshold [B, S, Hkv, 1] and the running statistics after this chunk."""
    budget = jnp.asarray(budget, jnp.float32)
    weight = jnp.ones(scores.shape[:2], jnp.float32) if valid is None else valid.astype(jnp.float32)
    w = weight[:, :, None, None]
    s = jax.lax.stop_gradient(scores.astype(jnp.float32))
    running = jnp.cumsum(jnp.concatenate([jnp.broadcast_to(w * scores.shape[-1], s[..., :1].shape),
                                          jnp.sum(w * s, -1, keepdims=True),
                                          jnp.sum(w * s * s, -1, keepdims=True)], axis=-1), axis=1)
    if prefix_stats is not None:
        running = running + prefix_stats[:, None]
    count = jnp.maximum(running[..., :1], 1.0)
    mean = running[..., 1:2] / count
    std = jnp.sqrt(jnp.maximum(running[..., 2:3] / count - mean * mean, 1e-12))
    z = jax.scipy.stats.norm.ppf(1.0 - jnp.clip(budget, 1e-4, 1.0 - 1e-4))
    threshold = jnp.where(budget >= 1.0, -jnp.inf, mean + z * std)
    return threshold, running[:, -1]


def adaptive_mask(scores: jax.Array, budget, temperature: float = 1.0, valid: Optional[jax.Array] = None,
                  prefix_stats: Optional[jax.Array] = None):
    """Keeps a variable number of groups per token, about `budget` of all groups on average.

    Causal: token t's threshold is the normal quantile of the scores of tokens 0..t (per sequence and
    KV head), mean + z * std with z = Phi^-1(1 - budget), from running sums. A token whose groups
    score high relative to what came before keeps more groups. The training loss adds a budget term
    so the realised fraction tracks `budget` however the learned scores are distributed.

    scores [B, S, Hkv, G]; valid [B, S] marks real tokens (padding does not enter the statistics);
    prefix_stats [B, Hkv, 3] (count, sum, sum of squares) of earlier chunks, for incremental decoding.
    Returns (mask, stats including this chunk).
    """
    threshold, stats = _causal_threshold(scores, budget, valid, prefix_stats)
    hard = (scores >= threshold).astype(scores.dtype)
    return _straight_through(hard, scores, threshold, temperature), stats


def calibrated_adaptive_mask(scores: jax.Array, budget, temperature: float = 1.0,
                             valid: Optional[jax.Array] = None, prefix_stats: Optional[jax.Array] = None):
    """The adaptive rule with its budget met exactly over a chunk: (mask, stats) like `adaptive_mask`.

    Every token keeps the pairs whose score clears its causal threshold by the most: a top-B over the margins
    score - threshold (B = round(budget x valid pairs) per sequence and KV head), which is the trained rule
    with one shift of all thresholds, just large enough to land on B. Ranking the raw scores over the chunk
    instead (`exact_budget_mask` on scores) throws away the per-position normalisation the router trained
    under, and on SmolLM2 cost 14% perplexity at rho = 0.75 against the causal rule.
    Not causal (the shift depends on the whole chunk): for a context compressed once it is known.
    """
    threshold, stats = _causal_threshold(scores, budget, valid, prefix_stats)
    margin = jnp.where(jnp.isfinite(threshold), scores - threshold, scores)
    return exact_budget_mask(margin, budget, temperature, valid), stats


def exact_budget_mask(scores: jax.Array, budget, temperature: float = 1.0,
                      valid: Optional[jax.Array] = None) -> jax.Array:
    """Keeps exactly round(budget * valid pairs) (token, group) pairs per sequence and KV head: adaptive span
    with its budget met by construction (a top-B over the chunk), however the scores are distributed.

    Not causal: a token's groups depend on the scores of the whole chunk. That is right when a known context
    is compressed after its prefill (eval's compressed prefix, generation from a prompt); training and
    token-by-token decoding use the causal running threshold of `adaptive_mask`. Ties go to the earlier token,
    then the lower group. scores [B, S, Hkv, G]; valid [B, S].
    """
    batch, length, heads, groups = scores.shape
    weight = jnp.ones((batch, length), bool) if valid is None else valid.astype(bool)
    s = jax.lax.stop_gradient(scores.astype(jnp.float32))
    flat = jnp.where(weight[:, :, None, None], s, -jnp.inf).transpose(0, 2, 1, 3).reshape(batch, heads, -1)
    n = (jnp.sum(weight, axis=1) * groups)[:, None]  # [B, 1] valid pairs per head
    k = jnp.clip(jnp.round(jnp.asarray(budget, jnp.float32) * n.astype(jnp.float32)).astype(jnp.int32), 0, n)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    ranks = inverse_permutation(order)
    ranked = jnp.take_along_axis(flat, order, axis=-1)
    at = lambda i: jnp.take_along_axis(ranked, jnp.clip(i, 0, flat.shape[-1] - 1)[..., None], axis=-1)  # noqa: E731
    kth, after = at(k - 1), at(k)
    kth = jnp.where((k > 0)[..., None], kth, after + 1.0)
    after = jnp.where((k < n)[..., None], after, kth - 1.0)
    threshold = 0.5 * (kth + after)  # [B, Hkv, 1]: the relaxation's centre, between the kept and the dropped
    hard = (ranks < k[..., None]).reshape(batch, heads, length, groups).transpose(0, 2, 1, 3)
    hard = (hard & weight[:, :, None, None]).astype(scores.dtype)
    threshold = jnp.where(jnp.isfinite(threshold), threshold, 0.0).reshape(batch, 1, heads, 1)
    return _straight_through(hard, scores, threshold, temperature)


def route_value_groups(scores: jax.Array, budget, mode: str, temperature: float = 1.0,
                       valid: Optional[jax.Array] = None, prefix_stats: Optional[jax.Array] = None,
                       exact_budget: bool = False, exact_rule: str = "calibrated"):
    """Scores [B, S, Hkv, G] -> (mask, adaptive stats or None); the mask is hard in value, straight-through in gradient.

    exact_budget (adaptive only): a chunk of several tokens keeps exactly `budget` of its pairs
    (`calibrated_adaptive_mask`); the running statistics are still carried, so later tokens decoded one by one
    use the causal threshold. exact_rule="topb" ranks the raw scores instead (`exact_budget_mask`, an ablation).
    """
    if mode == "fixed_k":
        return fixed_k_mask(scores, budget, temperature), prefix_stats
    if mode == "adaptive":
        if not exact_budget or scores.shape[1] == 1:
            return adaptive_mask(scores, budget, temperature, valid, prefix_stats)
        if exact_rule == "topb":
            _, stats = _causal_threshold(scores, budget, valid, prefix_stats)
            return exact_budget_mask(scores, budget, temperature, valid), stats
        return calibrated_adaptive_mask(scores, budget, temperature, valid, prefix_stats)
    raise InputError(f"unknown routing mode {mode!r}; use fixed_k or adaptive")


def realised_budget(mask: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """Fraction of value groups kept over real tokens; mask [B, S, Hkv, G], valid [B, S].

    Differentiable through a straight-through mask, so a loss on it moves the router's threshold.
    """
    hard = mask.astype(jnp.float32)
    if valid is None:
        return jnp.mean(hard)
    w = valid.astype(jnp.float32)[:, :, None, None]
    return jnp.sum(hard * w) / jnp.maximum(jnp.sum(w) * mask.shape[2] * mask.shape[3], 1.0)
