"""Compression recipes: a captured prefill state in, per-layer token and value-group masks out.

    masks = Compression(token_fraction=0.5, value_fraction=0.5, selector="snapkv", scorer="snapkv")(state)
    masks = Compression(kept_tokens=512, value_fraction=0.5)(state)   # a token count per row instead
    masks = JointCompression(kv_budget=0.375)(state)          # one byte budget, split per token
    masks = JointCompression(kv_tokens=384)(state)            # the bytes of 384 whole tokens per row
    kv = realised_kv_bytes(*masks, state.positions, model.config)["total"]

The one place that says how a budget becomes kept counts (`floor_budget`: counts round *down*, so a
recipe never keeps more than it was asked for, and a row keeps at least one token), how a value-group
budget is shared (scope "head" / "layer" / "global") and what a result costs: `kv_budget` the nominal
fraction of key + value bytes, `realised_kv_bytes` what the masks really keep, index metadata included.
`generate(..., compression=...)` and eval.py's methods both run these recipes, so eval measures the
public API.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax.errors import InputError
from subtoken_jax.model_config import ModelConfig, check_budget
from subtoken_jax.packed_cache import FILLS
from subtoken_jax.selectors import (SCOPES, TOKEN_SELECTORS, PrefillState, TokenSelector, allocate_joint,
                                    allocate_value_groups, kv_bytes_fraction, value_group_scorer)

Scorer = Union[str, Callable[[PrefillState, int], jax.Array]]


def floor_budget(fraction, counts, minimum: int = 0) -> jax.Array:
    """Per row: the fraction f' with round(f' * n) = clip(floor(fraction * n), minimum, n) for n = counts.

    Selectors and the allocator keep round(f * n); passing them f' makes them keep the floor instead.
    Rows with n = 0 get 1.0 (nothing to keep either way)."""
    counts = jnp.asarray(counts, jnp.float32)
    kept = jnp.minimum(jnp.maximum(jnp.floor(jnp.asarray(fraction, jnp.float32) * counts + 1e-6), minimum), counts)
    return jnp.where(counts > 0, kept / jnp.maximum(counts, 1.0), 1.0)


def check_token_count(value, what: str) -> Optional[int]:
    """None, or a whole number of tokens >= 1 (a budget given as a count instead of a fraction)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{what}={value!r} must be a whole number of tokens >= 1 (or None to give a fraction)")
    return int(value)


def fraction_of_tokens(count: int, positions, *, for_floor: bool = False) -> jax.Array:
    """Per row [B]: the fraction of its real context tokens that `count` tokens are (at most 1).

    for_floor: half a token more, so that `floor_budget` gives back exactly `count` despite float32 rounding.
    """
    real = jnp.sum(jnp.asarray(positions) >= 0, axis=1).astype(jnp.float32)
    share = (count + (0.5 if for_floor else 0.0)) / jnp.maximum(real, 1.0)
    return jnp.where(count < real, share, 1.0)


def share_of_slots(fraction, state: PrefillState):
    """A budget given as a fraction of the context, as a fraction of the state's real slots (per row [B], or the
    fraction itself). They differ when the state holds only survivors of earlier compression plus a new chunk
    (chunked prefill, `state.context_tokens`): keeping tau of the context then keeps more of the slots."""
    if state.context_tokens is None:
        return fraction
    real = jnp.sum(state.positions >= 0, axis=1).astype(jnp.float32)
    return jnp.minimum(1.0, fraction * state.context_tokens.astype(jnp.float32) / jnp.maximum(real, 1.0))


EVICTIONS = ("whole", "centred")


def _check_common(scorer, scope: str, window: int, value_fill: str, lookahead: int = 0) -> None:
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 0:
        raise InputError(f"lookahead must be a whole number of draft tokens >= 0, got {lookahead!r}")
    if isinstance(scorer, str):
        value_group_scorer(scorer)  # raises on an unknown name
    if scope not in SCOPES:
        raise InputError(f"unknown allocation scope {scope!r}; choose from {', '.join(SCOPES)}")
    if window < 1:
        raise InputError(f"window must be >= 1, got {window}")
    if value_fill not in FILLS:
        raise InputError(f"unknown value_fill {value_fill!r}; choose from {', '.join(FILLS)}")


def _scorer(scorer: Scorer) -> Callable[[PrefillState, int], jax.Array]:
    return value_group_scorer(scorer) if isinstance(scorer, str) else scorer


def _all_real(state: PrefillState) -> Tuple[jax.Array, ...]:
    real = (state.positions >= 0).astype(jnp.float32)
    return tuple(jnp.broadcast_to(real[..., None], k.shape[:3]) for k in state.keys)


def _every_group(tokens, groups: int) -> Tuple[jax.Array, ...]:
    return tuple(jnp.broadcast_to(t[..., None], t.shape + (groups,)) for t in tokens)


def keep_everything(state: PrefillState):
    """The masks of no compression: every real token and all its value groups (padding 0), per layer."""
    tokens = _all_real(state)
    return tokens, _every_group(tokens, state.value_groups)


@dataclasses.dataclass(frozen=True)
class Compression:
    """Query-aware compression of the context: keep token_fraction (tau) of its tokens, then value_fraction
    (rho) of the survivors' value groups, so about tau * (1 + rho) / 2 of the KV bytes remain.

    selector: a token selector name (selectors.TOKEN_SELECTORS) or instance; scorer: a registered value-group
    scorer (selectors.scorers: "attention": the question's realised attention x group norm; "snapkv": that
    attention pooled over 5 tokens as SnapKV pools it, which keeps the values of the tokens an answer copies
    after the attended ones; "expected": closed-form expected attention) or a (state, layer) -> [B, S, Hkv, G]
    callable such as a trained predictor's.
    scope: the value-group budget is shared per "head", per "layer" or "global"ly. window: the last
    context tokens that act as the observation window when no question is given. value_fill: a dropped
    group of a kept token reads as "zero" or as the context's "mean" value of its layer and KV head.
    lookahead: the answer's first tokens drafted greedily over the full cache join the question as the
    observation window (`capture_prefill_state(..., lookahead=)`; needs a question; the draft is then
    discarded). Counts round down (`floor_budget`); every row keeps at least one token.
    kept_tokens: the token budget as a count instead, the same for every row whatever its length (a row
    with fewer real tokens keeps them all); give it or token_fraction < 1, not both.
    """

    token_fraction: float = 1.0
    value_fraction: float = 1.0
    selector: Union[str, TokenSelector] = "snapkv"
    scorer: Scorer = "attention"
    scope: str = "global"
    window: int = 8
    value_fill: str = "zero"  # what a dropped group reads as in the packed cache: "zero" | "mean" (pack_cache)
    lookahead: int = 0  # drafted answer tokens whose queries join the question's (0 = the question alone)
    kept_tokens: Optional[int] = None  # the token budget as a count per row (instead of token_fraction)

    def __post_init__(self):
        check_budget(self.token_fraction, "token_fraction")
        if check_token_count(self.kept_tokens, "kept_tokens") is not None and self.token_fraction < 1.0:
            raise InputError(f"give the token budget once: kept_tokens={self.kept_tokens} or token_fraction="
                             f"{self.token_fraction}, not both")
        check_budget(self.value_fraction, "value_fraction")
        if isinstance(self.selector, str) and self.selector not in TOKEN_SELECTORS:
            raise InputError(f"unknown token selector {self.selector!r}; choose from {', '.join(TOKEN_SELECTORS)}")
        _check_common(self.scorer, self.scope, self.window, self.value_fill, self.lookahead)

    @property
    def kv_budget(self) -> float:
        """Fraction of the context's key + value bytes kept (before index metadata). With kept_tokens it depends
        on each row's length: this is then the bytes of a row that keeps all its tokens; measure the masks with
        `realised_kv_bytes`."""
        return self.token_fraction * (1.0 + self.value_fraction) / 2.0

    def __call__(self, state: PrefillState):
        real = jnp.sum(state.positions >= 0, axis=1)
        tokens = _all_real(state)
        fraction = share_of_slots(self.token_fraction, state) if self.kept_tokens is None else \
            fraction_of_tokens(self.kept_tokens, state.positions, for_floor=True)
        if self.kept_tokens is not None or self.token_fraction < 1.0:
            selector = TOKEN_SELECTORS[self.selector]() if isinstance(self.selector, str) else self.selector
            tokens = selector.masks(state, floor_budget(fraction, real, minimum=1))
        if self.value_fraction >= 1.0:  # every group of every kept token: nothing to score
            return tokens, _every_group(tokens, state.value_groups)
        # valid pairs per allocation unit (every layer and KV head keeps the same number of tokens per row)
        kept = jnp.sum(tokens[0][:, :, 0], axis=1)
        per_token = {"head": 1, "layer": state.num_kv_heads, "global": state.num_kv_heads * state.num_layers}
        rho = floor_budget(self.value_fraction, kept * per_token[self.scope] * state.value_groups)
        scorer = _scorer(self.scorer)
        scores = [scorer(state, layer) for layer in range(state.num_layers)]
        groups = allocate_value_groups(scores, rho[:, None] if self.scope == "head" else rho, scope=self.scope,
                                       positions=state.positions, token_keep_masks=tokens)
        return tokens, groups


@dataclasses.dataclass(frozen=True)
class JointCompression:
    """Query-aware compression to kv_budget of the context's KV bytes with no fixed token / group split.

    Every (token, KV head) keeps its key and its k best value groups, or nothing; k is chosen per token
    by the squared read-out error it saves per byte (`selectors.allocate_joint`), so tokens the question
    relies on keep whole values, tokens whose value energy sits in a few groups keep those, and the rest
    are evicted. scorer, scope, window, value_fill and lookahead as in `Compression`; "snapkv" scores (the
    question's pooled attention x group norm) by default. Each scope unit spends at most kv_budget of its bytes.
    kv_tokens: the budget as the KV bytes of this many whole tokens per row instead (kv_budget is then ignored;
    a row with fewer real tokens keeps them all).
    """

    kv_budget: float = 0.375
    scorer: Scorer = "snapkv"
    scope: str = "head"
    window: int = 8
    value_fill: str = "zero"
    lookahead: int = 0
    kv_tokens: Optional[int] = None  # the budget as the bytes of this many whole tokens per row
    # what evicting a token is priced at: "whole" (every group lost, the sum of its squared scores) or "centred"
    # (its attention moves to the tokens left: the read-out moves by a (o - v) / (1 - a), `centred_eviction_error`)
    eviction: str = "whole"

    def __post_init__(self):
        check_budget(self.kv_budget, "kv_budget")
        check_token_count(self.kv_tokens, "kv_tokens")
        _check_common(self.scorer, self.scope, self.window, self.value_fill, self.lookahead)
        if self.eviction not in EVICTIONS:
            raise InputError(f"unknown eviction pricing {self.eviction!r}; choose from {', '.join(EVICTIONS)}")
        if self.eviction == "centred" and not hasattr(_scorer(self.scorer), "eviction_error"):
            raise InputError("eviction='centred' needs a scorer with an attention estimate (a name, or a "
                             "ValueGroupScorer): it prices an eviction from the attention and the values")

    def __call__(self, state: PrefillState):
        scorer = _scorer(self.scorer)
        scores = [scorer(state, layer) for layer in range(state.num_layers)]
        eviction = None if self.eviction == "whole" else \
            [scorer.eviction_error(state, layer) for layer in range(state.num_layers)]
        budget = share_of_slots(self.kv_budget, state) if self.kv_tokens is None else \
            fraction_of_tokens(self.kv_tokens, state.positions)
        # an in-context window (chunked prefill, decoding-time compression) is kept whole, as SnapKV keeps it
        protect = state.window if state.window_in_context else 0
        return allocate_joint(scores, budget, scope=self.scope, positions=state.positions, protect_last=protect,
                              eviction=eviction)


def realised_kv_bytes(token_masks, group_masks, positions, model_cfg: ModelConfig,
                      rows: Optional[int] = None) -> Dict[str, float]:
    """What per-layer context masks really keep (of the first `rows` rows): kv_bytes_fraction with the model's
    head_dim, dtype and G; a mask that keeps everything is not stored (no metadata)."""
    positions = np.asarray(positions)[:rows]
    real = positions >= 0
    tokens = [np.asarray(t, bool)[:rows] for t in token_masks]
    groups = [np.asarray(g, bool)[:rows] for g in group_masks]
    keep = [t & real[..., None] for t in tokens]
    all_tokens = all(np.array_equal(k, np.broadcast_to(real[..., None], k.shape)) for k in keep)
    all_groups = all(np.array_equal(g & k[..., None], np.broadcast_to(k[..., None], g.shape))
                     for g, k in zip(groups, keep))
    if all_tokens and all_groups:
        return {"total": 1.0, "keys": 1.0, "values": 1.0, "index": 0.0}
    return kv_bytes_fraction(None if all_tokens else tokens, None if all_groups else groups,
                             model_cfg.value_groups, head_dim=model_cfg.resolved_head_dim,
                             dtype_bytes=float(jnp.dtype(model_cfg.compute_dtype).itemsize), positions=positions)
