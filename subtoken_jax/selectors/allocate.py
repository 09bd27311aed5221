"""Budget allocation of value groups, and the token x sub-token combination with its byte accounting.

Scores of (token, KV head, value group) pairs are comparable within a head, a layer, or the whole
model, so the budget can be spent at any of these scopes: "head" gives every (layer, row, KV head)
the same share (uniform, like fixed per-head caches); "layer" lets heads of a layer compete; "global"
lets layers compete too (the score's scale must then be comparable across layers). Every scope keeps
exactly round(budget * valid pairs) pairs; padding and evicted tokens are not valid and never kept.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax.errors import InputError
from subtoken_jax.model_config import check_budget
from subtoken_jax.permutations import inverse_permutation
from subtoken_jax.selectors.base import PrefillState, TokenSelector, budget_count

SCOPES = ("head", "layer", "global")


def _valid_pairs(shape, positions, token_keep_mask) -> jax.Array:
    """[B, S, Hkv, G] booleans: pairs of real (and kept) tokens."""
    valid = jnp.ones(shape, bool)
    if positions is not None:
        valid &= (positions >= 0)[:, :, None, None]
    if token_keep_mask is not None:
        keep = jnp.asarray(token_keep_mask).astype(bool)
        keep = keep[:, :, None, None] if keep.ndim == 2 else keep[..., None]
        valid &= keep
    return valid


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 whose unsigned order is the floats' order (-inf lowest; -0.0 taken as 0.0)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


@jax.jit
def _top_pairs(scores: jax.Array, valid: jax.Array, budget) -> jax.Array:
    """Along the last axis: keep the round(budget * n_valid) valid entries of highest score (NaN = -inf).

    Ties go to the lower flat index (earlier layer, then slot, head, group): deterministic.
    The k-th largest score is found by bisection over its 32 bits (32 counting passes, O(32 n)),
    not by sorting: a global scope ranks every pair of the model, and on CPU a sort of that many
    entries cost more than the predictor itself (bench/selector_cost.py).
    """
    k = budget_count(budget, jnp.sum(valid, axis=-1))[..., None]
    key = _ordered_bits(jnp.where(valid & ~jnp.isnan(scores), scores.astype(jnp.float32), -jnp.inf))

    def halve(_, bounds):  # invariant: count(key >= lo) >= k; the answer lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # upper middle; hi - lo + 1 would overflow uint32
        enough = jnp.sum(key >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    kth, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros(k.shape, jnp.uint32), jnp.full(k.shape, 0xFFFFFFFF, jnp.uint32)))
    above = valid & (key > kth)
    tied = valid & (key == kth)
    room = k - jnp.sum(above, axis=-1, keepdims=True)
    return (above | (tied & (jnp.cumsum(tied, axis=-1) <= room))) & (k > 0)


def allocate_value_groups(scores: Sequence[jax.Array], budget, *, scope: str = "head", positions=None,
                          token_keep_masks=None) -> Tuple[jax.Array, ...]:
    """Per-layer value-group masks [B, S, Hkv, G] (0/1 float32) keeping the top pairs within each scope unit.

    scores: per layer [B, S, Hkv, G]; positions [B, S] (-1 = padding); token_keep_masks: None, one
    [B, S] / [B, S, Hkv] mask, or one per layer (pairs of evicted tokens are excluded from the count).
    """
    if scope not in SCOPES:
        raise InputError(f"unknown allocation scope {scope!r}; choose one of {SCOPES}")
    if isinstance(budget, (int, float)):
        check_budget(budget)
    scores = [jnp.asarray(s, jnp.float32) for s in scores]
    if token_keep_masks is None or hasattr(token_keep_masks, "shape"):
        token_keep_masks = [token_keep_masks] * len(scores)
    valid = [_valid_pairs(s.shape, positions, m) for s, m in zip(scores, token_keep_masks)]
    if scope == "head":  # unit = (layer, row, head): rank over [B, Hkv, S * G]
        def per_head(s, v):
            b, n, h, g = s.shape
            flat = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b, h, n * g)  # noqa: E731
            keep = _top_pairs(flat(s), flat(v), budget)
            return jnp.transpose(keep.reshape(b, h, n, g), (0, 2, 1, 3))
        masks = [per_head(s, v) for s, v in zip(scores, valid)]
    elif scope == "layer":  # unit = (layer, row)
        masks = [_top_pairs(s.reshape(s.shape[0], -1), v.reshape(v.shape[0], -1), budget).reshape(s.shape)
                 for s, v in zip(scores, valid)]
    else:  # unit = row, across all layers
        flat_s = jnp.concatenate([s.reshape(s.shape[0], -1) for s in scores], axis=1)
        flat_v = jnp.concatenate([v.reshape(v.shape[0], -1) for v in valid], axis=1)
        keep = _top_pairs(flat_s, flat_v, budget)
        sizes = np.cumsum([s[0].size for s in scores])[:-1]
        masks = [part.reshape(s.shape) for part, s in zip(jnp.split(keep, sizes, axis=1), scores)]
    return tuple(m.astype(jnp.float32) for m in masks)


def _energy(scores: jax.Array) -> jax.Array:
    """Squared scores (NaN = 0): the read-out error a group's loss causes; ranks groups and prices them."""
    return jnp.square(jnp.nan_to_num(scores.astype(jnp.float32)))


def _joint_choice(utility: jax.Array, valid: jax.Array, lam: jax.Array):
    """Per item: (groups kept k in 0..G, its cost) maximising U(k) - lam * cost(k); k = 0 evicts the token.

    utility [U, M, G]: U(k) for k = 1..G; valid [U, M]; lam [U, 1]. A kept token costs its key (G units: a
    key is as large as a value) plus one unit per kept group.
    """
    groups = utility.shape[-1]
    cost = groups + jnp.arange(1, groups + 1, dtype=jnp.float32)
    gain = utility - lam[..., None] * cost
    take = valid & (jnp.max(gain, axis=-1) > 0)
    kept = jnp.where(take, jnp.argmax(gain, axis=-1) + 1, 0)
    return kept, jnp.where(take, groups + kept, 0).astype(jnp.float32)


@jax.jit
def _joint_keep(scores: jax.Array, valid: jax.Array, budget: jax.Array, forced: jax.Array,
                eviction: Optional[jax.Array] = None) -> jax.Array:
    """Groups kept per item [U, M] (0 = evicted), each unit's cost within budget [U] * 2G * its valid items.

    forced [U, M]: valid items that keep their key and all G groups whatever they score; their bytes come out of
    the unit's budget first (all of it, if they need more) and the rest is allocated over the other items.

    U(k), an item's utility with k groups, is the squared read-out error keeping them avoids: its eviction error
    [U, M] less the squared scores of the G - k groups it still drops (None: the sum of all its squared scores,
    so U(k) is the sum of its k largest). Every item takes the k maximising U(k) - lam * cost(k) (the
    Lagrangian of "most utility for the bytes"); lam, found by bisection over its float32 bits (cost falls
    as lam grows), is the smallest whose total cost fits. An item whose best groups hold most of its
    energy keeps just those; one whose energy is spread keeps all or nothing, as its key costs a value.
    """
    groups = scores.shape[-1]
    energy = jnp.sort(_energy(scores), axis=-1)[..., ::-1]
    kept_energy = jnp.cumsum(energy, axis=-1)
    utility = kept_energy if eviction is None else eviction[..., None] - (kept_energy[..., -1:] - kept_energy)
    limit = budget.reshape(-1, 1) * 2 * groups * jnp.sum(valid, axis=-1, keepdims=True)
    forced = forced & valid
    limit = jnp.maximum(limit - 2 * groups * jnp.sum(forced, axis=-1, keepdims=True), 0.0)
    valid = valid & ~forced

    def halve(_, bounds):  # invariant: lam = hi fits; the answer lies in (lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        cost = _joint_choice(utility, valid, jax.lax.bitcast_convert_type(mid, jnp.float32))[1]
        ok = jnp.sum(cost, axis=-1, keepdims=True) <= limit
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    start = (jnp.zeros(limit.shape, jnp.uint32), jnp.full(limit.shape, 0x7F800000, jnp.uint32))  # +inf keeps none
    _, hi = jax.lax.fori_loop(0, 32, halve, start)  # non-negative floats order as their bits
    kept = _joint_choice(utility, valid, jax.lax.bitcast_convert_type(hi, jnp.float32))[0]
    return jnp.where(forced, groups, kept)


def allocate_joint(scores: Sequence[jax.Array], budget, *, scope: str = "head", positions=None,
                   protect_last: int = 0, eviction: Optional[Sequence[jax.Array]] = None
                   ) -> Tuple[Tuple[jax.Array, ...], Tuple[jax.Array, ...]]:
    """Tokens and value groups from one KV-bytes budget: per-layer (token masks [B, S, Hkv], group masks [B, S, Hkv, G]).

    scores: per layer [B, S, Hkv, G], a group's expected contribution to the read-out (e.g. the question's
    attention on the token x the group's norm): magnitudes >= 0, not log-scores. Instead of a fixed split (tau of the tokens, rho of their
    groups), each (token, KV head) keeps its key and its k best groups, or nothing, for the k that buys the
    most squared read-out error per byte under one price per scope unit (`_joint_keep`): the split adapts to
    each token. budget is the fraction of the context's key + value bytes kept (index metadata aside);
    scope as in allocate_value_groups. protect_last: the last that many real tokens of each row (by position) keep
    their keys and every group, paid from the same budget (an in-context observation window, as SnapKV keeps
    its own; in decoding-time compression, the tokens just written).
    eviction: per layer [B, S, Hkv], the squared read-out error of evicting each (token, KV head) (e.g.
    `centred_eviction_error`); None prices an eviction as losing every group (the sum of squared scores). An
    evicted token's attention moves to the others, so its loss is its value's distance from the read-out, not
    its whole value, while a dropped group (read as zero) loses all of it.
    """
    if scope not in SCOPES:
        raise InputError(f"unknown allocation scope {scope!r}; choose one of {SCOPES}")
    if isinstance(budget, (int, float)):
        check_budget(budget)
    scores = [jnp.asarray(s, jnp.float32) for s in scores]
    b, n, h, g = scores[0].shape
    real = jnp.ones((b, n), bool) if positions is None else jnp.asarray(positions) >= 0
    stacked = jnp.stack(scores)  # [L, B, S, Hkv, G]
    layers = stacked.shape[0]
    valid = jnp.broadcast_to(real[None, :, :, None], stacked.shape[:4])
    if positions is None:
        recent = jnp.arange(n)[None, :] >= n - int(protect_last)
    else:
        last = jnp.max(jnp.asarray(positions), axis=1, keepdims=True)
        recent = real & (last - jnp.asarray(positions) < int(protect_last))
    forced = jnp.broadcast_to(recent[None, :, :, None], stacked.shape[:4])
    # items of one unit on axis 1: head -> (layer, row, head); layer -> (layer, row); global -> row
    order = {"head": (0, 1, 3, 2, 4), "layer": (0, 1, 2, 3, 4), "global": (1, 0, 2, 3, 4)}[scope]
    moved_s, moved_v = jnp.transpose(stacked, order), jnp.transpose(valid, order[:4])
    moved_f = jnp.transpose(forced, order[:4])
    moved_e = None if eviction is None else \
        jnp.transpose(jnp.nan_to_num(jnp.stack([jnp.asarray(e, jnp.float32) for e in eviction])), order[:4])
    row_budget = jnp.broadcast_to(jnp.asarray(budget, jnp.float32).reshape(-1), (b,))
    unit_budget = {"head": jnp.broadcast_to(row_budget[None, :, None], (layers, b, h)),
                   "layer": jnp.broadcast_to(row_budget[None, :], (layers, b)), "global": row_budget}[scope]
    units = unit_budget.size
    kept = _joint_keep(moved_s.reshape(units, -1, g), moved_v.reshape(units, -1), unit_budget.reshape(units),
                       moved_f.reshape(units, -1), None if moved_e is None else moved_e.reshape(units, -1))
    inverse = tuple(int(i) for i in np.argsort(order[:4]))
    kept = jnp.transpose(kept.reshape(moved_v.shape), inverse)  # [L, B, S, Hkv]
    # the k groups kept are the k of most energy, those the utility counted (0 = best group)
    rank = inverse_permutation(jnp.argsort(-_energy(stacked), axis=-1, stable=True))
    groups = (rank < kept[..., None]).astype(jnp.float32)
    tokens = (kept > 0).astype(jnp.float32)
    return tuple(tokens[i] for i in range(layers)), tuple(groups[i] for i in range(layers))


def combine(state: PrefillState, token_selector: Optional[TokenSelector], token_fraction,
            subtoken_scores_fn: Callable[[PrefillState, int], jax.Array], value_budget, scope: str = "head"):
    """Token eviction then value-group allocation: returns (token keep masks, value-group masks), per layer.

    Keeps `token_fraction` (tau) of the real context tokens with token_selector (None: keep all), then
    `value_budget` (rho) of the surviving (token, head, group) pairs, so about tau * rho of the values
    and tau of the keys remain.
    """
    if token_selector is None:
        token_masks = tuple(jnp.broadcast_to((state.positions >= 0)[..., None], k.shape[:3]).astype(jnp.float32)
                            for k in state.keys)
    else:
        token_masks = token_selector.masks(state, token_fraction)
    scores = [subtoken_scores_fn(state, layer) for layer in range(state.num_layers)]
    group_masks = allocate_value_groups(scores, value_budget, scope=scope, positions=state.positions,
                                        token_keep_masks=token_masks)
    return token_masks, group_masks


def kv_bytes_fraction(token_keep_masks, group_masks, G: int, index_bytes: float = 4.0, *, head_dim: int = 128,
                      dtype_bytes: float = 2.0, group_bits: float = 1.0, positions=None) -> Dict[str, float]:
    """Fractions of the full cache's bytes a compressed cache holds: {"total", "keys", "values", "index"}.

    Per (layer, real token, KV head) the full cache holds a key and a value of head_dim elements.
    Kept: keys of kept tokens; values of kept groups of kept tokens; metadata: a token index
    (`index_bytes`, int32) per kept (token, head) when tokens are evicted, and a `group_bits` bitmap
    per group of each kept (token, head) when value groups are dropped. "total" is relative to keys +
    values; "keys"/"values" to their own full size; "index" is the metadata's share of the full size.
    Masks are per layer (or one shared): token [B, S] / [B, S, Hkv] (None = all kept), groups [B, S, Hkv, G].
    """
    layers = max(len(m) if isinstance(m, (list, tuple)) else 1 for m in (token_keep_masks, group_masks))
    as_list = lambda m: [m] * layers if m is None or hasattr(m, "shape") else list(m)  # noqa: E731
    tokens, groups = as_list(token_keep_masks), as_list(group_masks)
    full = kept_keys = kept_values = meta = 0.0
    for t, g in zip(tokens, groups):
        if t is None and g is None:
            raise InputError("kv_bytes_fraction needs a token keep mask or a value-group mask per layer")
        ref = g[..., 0] if g is not None else (t if np.ndim(t) == 3 else np.asarray(t)[..., None])
        shape = np.shape(ref)  # [B, S, Hkv]
        real = np.ones(shape, bool)
        if positions is not None:
            real = np.broadcast_to(np.asarray(positions)[..., None] >= 0, shape)
        keep = real.copy()
        if t is not None:
            t = np.asarray(t, bool)
            keep &= np.broadcast_to(t[..., None] if t.ndim == 2 else t, shape)
        if g is not None and np.shape(g)[-1] != G:
            raise InputError(f"value-group masks have {np.shape(g)[-1]} groups but G={G}")
        n_real, n_kept = real.sum(), keep.sum()
        full += n_real * 2 * head_dim * dtype_bytes
        kept_keys += n_kept * head_dim * dtype_bytes
        if g is None:
            kept_values += n_kept * head_dim * dtype_bytes
        else:
            g = np.asarray(g, bool) & keep[..., None]
            kept_values += g.sum() * (head_dim // G) * dtype_bytes
            meta += n_kept * G * group_bits / 8.0
        if t is not None:
            meta += n_kept * index_bytes
    half = full / 2.0
    return {"total": float((kept_keys + kept_values + meta) / full), "keys": float(kept_keys / half),
            "values": float(kept_values / half), "index": float(meta / full)}
