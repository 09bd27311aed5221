"""KV-compression methods at a KV-bytes budget: how each splits the budget, which public recipe builds its masks
(subtoken_jax.compression), and the decode.

The budget b is the fraction of the context's KV bytes kept. Keys and values are half the bytes each,
so a method keeping a fraction tau of the tokens and, among them, a fraction rho of the value groups
holds tau * (1 + rho) / 2 of the bytes, plus index metadata (kv_bytes_fraction: an int32 index per
kept (token, head) when tokens are evicted, a 1-bit flag per value group when groups are dropped).

  full                no compression (budget 1)
  snapkv, h2o, streaming, key_norm, random, expected_attention
                      token selectors alone: tau = b, rho = 1
  subtoken            all keys kept, query-aware value groups: rho = 2b - 1 (feasible for b > 1/2),
                      allocated by value_group_scorer(subtoken.scorer) over the allocation scope, or by a
                      trained ValueGroupPredictor (subtoken.scorer = "predictor", predictor.workdir)
  combined            combined.selector keeps tau of the tokens, then rho of the survivors' value groups
                      with tau * (1 + rho) / 2 = b (see combined_split)
  joint               tokens and groups from the one budget b, split per (token, KV head) (JointCompression)
  routed              the adapted model's query-independent router at value_budget rho = 2b - 1
  norm_groups, random_groups, norm_span
                      the base model (no adapter) keeping every key and, per token and KV head, the K = floor(rho G)
                      value groups of largest norm / random ones (parameter-free fixed-K routers), or (norm_span)
                      rho of each KV head's (token, group) pairs of largest norm over the context, rho = 2b - 1

Kept counts are rounded down by the recipes (compression.floor_budget: at least one token), so the kept
bytes never exceed b plus the index metadata; with b = 1 every method builds exactly the masks of `full`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from subtoken_jax import sharding
from subtoken_jax.compression import EVICTIONS, Compression, JointCompression, keep_everything
from subtoken_jax.errors import ConfigError
from subtoken_jax.kv_cache import KVCache
from subtoken_jax.model import DecoderLM
from subtoken_jax.model_config import EXACT_RULES, ModelConfig, RoutingConfig
from subtoken_jax.permutations import inverse_permutation
from subtoken_jax.selectors import SCOPES, TOKEN_SELECTORS, PrefillState, pad_to_capacity, value_group_scorer
from subtoken_jax.selectors.expected_attention import OBSERVED
from subtoken_jax.selectors.scorers import RECONSTRUCTION_SCORERS, VALUE_GROUP_SCORERS

TOKEN_METHODS = tuple(TOKEN_SELECTORS)
# query-independent baselines: the base model under a parameter-free router (RoutingConfig fields). norm_span
# keeps the context's largest-norm (token, group) pairs, rho of them per sequence and KV head (a variable number
# per token, ranked over the whole context)
GROUP_BASELINES = {"norm_groups": dict(mode="fixed_k", scorer="norm"),
                   "random_groups": dict(mode="fixed_k", scorer="random"),
                   "norm_span": dict(mode="adaptive", scorer="norm", exact_budget=True, exact_rule="topb")}
# methods whose value-group masks come from a router during the prefill (routed_prefill), not from a recipe.
# routed_tokens: both axes, query-independent: the router keeps rho of the value groups, then a query-independent
# token selector (routed.token_selector, on the routed model's own cached keys) keeps tau of the tokens
ROUTED_METHODS = ("routed", "routed_tokens")  # the adapted model of WORKDIR/adapt
ROUTER_METHODS = ROUTED_METHODS + tuple(GROUP_BASELINES)
# token selectors that need no question (they run on the routed cache, which has no observation window)
QUERY_FREE_SELECTORS = ("key_norm", "streaming", "random")
METHODS = ("full",) + TOKEN_METHODS + ("subtoken", "combined", "joint") + ROUTER_METHODS
# every registered closed-form scorer (selectors/scorers), plus predictor: a trained ValueGroupPredictor
# (predictor.workdir)
SCORERS = tuple(VALUE_GROUP_SCORERS) + ("predictor",)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a method spends a requested budget: keep tau of the tokens and rho of their value groups."""

    method: str
    budget: float  # requested fraction of KV bytes
    token_fraction: Optional[float]  # tau (None: decided per token, as "joint" does; reported as realised)
    value_fraction: Optional[float]  # rho, among the kept tokens
    kept_tokens: Optional[int] = None  # a token-count budget: the KV bytes of this many whole tokens per prompt


def combined_split(budget: float, value_fraction: float, token_fractions: Sequence[float] = ()) -> Tuple[float, float]:
    """(tau, rho) with tau * (1 + rho) / 2 = budget for the combined method.

    With `token_fractions` (candidates for tau): the largest candidate tau <= 1 whose rho = 2b/tau - 1 is
    in (0, 1], i.e. b <= tau < 2b. Otherwise rho is fixed at `value_fraction` and tau = 2b / (1 + rho);
    when that tau exceeds 1, tau = 1 and rho = 2b - 1 (all tokens survive; only values are dropped).
    """
    if token_fractions:
        fits = [t for t in sorted(token_fractions, reverse=True) if 0 < t <= 1 and 0 < 2 * budget / t - 1 <= 1 + 1e-12]
        if not fits:
            raise ConfigError(f"combined.token_fractions={tuple(token_fractions)} has no tau in [b, 2b) for budget "
                              f"b={budget}: add one, or leave it empty to derive tau from combined.value_fraction")
        tau = fits[0]
        return tau, min(2 * budget / tau - 1, 1.0)
    tau = 2 * budget / (1 + value_fraction)
    if tau >= 1:
        return 1.0, min(2 * budget - 1, 1.0)
    return tau, value_fraction


def plan_token_budget(method: str, tokens: int, config) -> Tuple[Optional[Plan], str]:
    """(plan, "") or (None, why) for a budget of the KV bytes of `tokens` whole tokens per prompt.

    The plan's budget is the count (reports show it as "N tok"); its realised KV-bytes fraction depends on each
    prompt's length and is measured from the masks like any other."""
    if method in TOKEN_METHODS:
        return Plan(method, float(tokens), None, 1.0, kept_tokens=tokens), ""
    if method == "joint":
        return Plan(method, float(tokens), None, None, kept_tokens=tokens), ""
    if method == "combined":
        if config.combined.token_fractions:
            return None, "combined with combined.token_fractions splits fractions only: leave token_budgets empty"
        rho = config.combined.value_fraction  # tau * (1 + rho) / 2 = budget, in tokens: kept = 2N / (1 + rho)
        return Plan(method, float(tokens), None, rho, kept_tokens=math.floor(2 * tokens / (1 + rho) + 1e-9)), ""
    return None, f"{method} keeps every key: give its budget as a fraction (budgets), not as a token count"


def plan_method(method: str, budget: float, config, model_cfg: Optional[ModelConfig] = None,
                routed_cfg: Optional[ModelConfig] = None) -> Tuple[Optional[Plan], str]:
    """(plan, "") or (None, why the method cannot meet this budget)."""
    if method == "full":
        return (Plan(method, 1.0, 1.0, 1.0), "") if budget == 1.0 else (None, "full is evaluated at budget 1 only")
    if method in TOKEN_METHODS:
        return Plan(method, budget, budget, 1.0), ""
    if method == "joint":  # tokens and groups from one byte budget (allocate_joint): no fixed split
        return Plan(method, budget, None, None), ""
    if method == "combined":
        tau, rho = combined_split(budget, config.combined.value_fraction, tuple(config.combined.token_fractions))
        return Plan(method, budget, tau, rho), ""
    if method == "routed_tokens":  # the combined method's split: rho = routed.value_fraction, tau the rest
        tau, rho = combined_split(budget, config.routed.value_fraction)
    else:
        tau, rho = 1.0, 2 * budget - 1  # keys are all kept: (1 + rho) / 2 = budget
    fixed_k = (GROUP_BASELINES.get(method, {}).get("mode") == "fixed_k"
               or (method in ROUTED_METHODS and routed_cfg is not None and routed_cfg.routing.mode == "fixed_k"))
    if fixed_k and rho > 0:
        groups = (routed_cfg if method in ROUTED_METHODS else model_cfg).value_groups
        kept = math.floor(rho * groups + 1e-9)  # fixed-K keeps round(rho * G) >= 1 groups: stay at or under
        if kept < 1:
            return None, (f"{method} (fixed-K) keeps every key and at least 1 of G={groups} value groups per token: "
                          f"it cannot fit budgets below {(1 + 1 / groups) / 2:g}")
        rho = kept / groups
        if method == "routed_tokens":
            tau = min(1.0, 2 * budget / (1 + rho))
    if rho <= 0:
        return None, f"{method} keeps every key, i.e. half the KV bytes: it cannot fit budgets <= 0.5"
    return Plan(method, budget, tau, rho), ""


def committed(tree):
    """Places every array of `tree` on the default device as a committed array (batch-split on the mesh).

    jit keys its compilation cache on whether inputs are committed, and outputs of earlier jitted calls
    are while fresh jnp arrays are not; committing everything once keeps one compilation per shape.
    Under an active mesh (eval's config.mesh) the arrays are split on their leading (batch) dim instead:
    prompts, masks, prefill states and caches are all [batch, ...].
    """
    if sharding.active_mesh() is not None:
        return sharding.place_batch_leading(tree)
    return jax.device_put(tree, jax.devices()[0])


# ----------------------------------------------------------------------------- masks


def make_selectors(config) -> Dict[str, object]:
    s = config.selectors
    kwargs = {"snapkv": dict(kernel_size=s.snapkv_kernel_size), "h2o": dict(recent=s.h2o_recent),
              "streaming": dict(n_sink=s.streaming_sinks), "key_norm": {}, "random": dict(seed=config.seed),
              "expected_attention": dict(n_future=s.n_future, n_sink=s.expected_attention_sinks,
                                         observe=s.get("expected_attention_observe", "window")),
              "pyramidkv": dict(kernel_size=s.snapkv_kernel_size),
              "adakv": dict(base=TOKEN_SELECTORS["snapkv"](kernel_size=s.snapkv_kernel_size))}
    return {name: cls(**kwargs.get(name, {})) for name, cls in TOKEN_SELECTORS.items()}


def real_masks(state: PrefillState) -> Tuple[Tuple[jax.Array, ...], Tuple[jax.Array, ...]]:
    """The masks of no compression (compression.keep_everything), committed."""
    return committed(keep_everything(state))


def uses_predictor(config) -> bool:
    """Whether a configured method scores value groups (or, as combined.selector, tokens) with the trained
    predictor."""
    return (("subtoken" in config.methods and config.subtoken.scorer == "predictor")
            or ("combined" in config.methods and "predictor" in (config.combined.scorer, config.combined.selector)))


def uses_kvzip(config, methods=None) -> bool:
    """Whether one of `methods` (default: config.methods) needs KVzip's reconstruction pass: KVzip as the token
    selector, or its reconstruction attention as a value-group scorer."""
    methods = config.methods if methods is None else methods
    return ("kvzip" in methods
            or ("combined" in methods and (config.combined.selector == "kvzip"
                                           or config.combined.scorer in RECONSTRUCTION_SCORERS))
            or ("joint" in methods and config.joint.scorer in RECONSTRUCTION_SCORERS)
            or ("subtoken" in methods and config.subtoken.scorer in RECONSTRUCTION_SCORERS))


def _group_scorer(name: str, config, scorers: Optional[Dict[str, Callable]]) -> Callable:
    if scorers and name in scorers:
        return scorers[name]
    return value_group_scorer(name, n_future=config.selectors.n_future)


def recipe(plan: Plan, config, selectors: Dict[str, object], scorers: Optional[Dict[str, Callable]] = None):
    """The public compression recipe (subtoken_jax.compression) a plan runs, or None for the full cache.

    selectors: token selectors by name, configured (make_selectors); scorers: value-group scorers by name
    that value_group_scorer does not build, e.g. {"predictor": predictor_scorer(...)}.
    """
    scope = config.allocation_scope
    if plan.method == "full":
        return None
    counted = plan.kept_tokens is not None
    if plan.method == "joint":
        return JointCompression(1.0 if counted else plan.budget, kv_tokens=plan.kept_tokens,
                                scorer=_group_scorer(config.joint.scorer, config, scorers), scope=scope,
                                eviction=config.joint.get("eviction", "whole"))
    tau = 1.0 if counted else plan.token_fraction
    if plan.method in TOKEN_METHODS:
        return Compression(plan.budget if not counted else 1.0, 1.0, selector=selectors[plan.method], scope=scope,
                           kept_tokens=plan.kept_tokens)
    section = config.combined if plan.method == "combined" else config.subtoken
    selector = selectors[config.combined.selector] if plan.method == "combined" else "snapkv"
    return Compression(tau, plan.value_fraction, selector=selector, kept_tokens=plan.kept_tokens,
                       scorer=_group_scorer(section.scorer, config, scorers), scope=scope)


def build_masks(state: PrefillState, plan: Plan, config, selectors: Dict[str, object],
                scorers: Optional[Dict[str, Callable]] = None):
    """Per-layer context masks (token keep [B, S, Hkv], value groups [B, S, Hkv, G]) of a query-aware method:
    those of its public recipe (`recipe`), so eval measures what `generate(..., compression=...)` does."""
    compression = recipe(plan, config, selectors, scorers)
    if compression is None:
        return real_masks(state)
    return committed(compression(state))


# ----------------------------------------------------------------------------- caches and decoding


def cache_from_state(state: PrefillState, model_cfg: ModelConfig, capacity: int) -> KVCache:
    """A decode cache holding the captured context (its KV exactly as prefilled), room for `capacity` slots."""
    pad = capacity - state.positions.shape[1]
    widen = lambda x: jnp.pad(x.astype(model_cfg.compute_dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
    return committed(KVCache(keys=tuple(widen(k) for k in state.keys), values=tuple(widen(v) for v in state.values),
                             positions=jnp.pad(state.positions, ((0, 0), (0, pad)), constant_values=-1),
                             index=jnp.asarray(state.positions.shape[1], jnp.int32)))


def group_baseline_model(method: str, base_cfg: ModelConfig) -> DecoderLM:
    """The base model under the parameter-free router of a group baseline (norm_groups, random_groups, norm_span)."""
    return DecoderLM(base_cfg.replace(routing=RoutingConfig(**GROUP_BASELINES[method])))


def routed_state(state: PrefillState, cache: KVCache) -> PrefillState:
    """`state` (the base model's capture of the same context) with the keys and values a routed prefill cached."""
    length = state.positions.shape[1]
    return state.replace(keys=tuple(k[:, :length] for k in cache.keys),
                         values=tuple(v[:, :length] for v in cache.values))


def routed_token_masks(state: PrefillState, cache: KVCache, groups, plan: Plan, config, selectors: Dict[str, object]):
    """routed_tokens' per-layer (token keep [B, S, Hkv], value groups [B, S, Hkv, G]) context masks.

    routed.token_selector keeps tau of the context's tokens, scored on the keys the routed model cached (its LoRA
    moves them). The router chose rho of the groups over every token; where the survivors hold more than rho of
    their own pairs (per row and KV head), their smallest-norm groups are dropped, so the bytes never exceed b.
    """
    if plan.token_fraction >= 1.0:
        return real_masks(state)[0], groups
    evict = Compression(plan.token_fraction, 1.0, selector=selectors[config.routed.token_selector],
                        scope=config.allocation_scope)
    tokens, _ = evict(routed_state(state, cache))
    length = state.positions.shape[1]
    trimmed = tuple(_keep_largest_norm(g * t[..., None], jnp.sum(t, axis=1), v[:, :length], plan.value_fraction)
                    for g, t, v in zip(groups, tokens, cache.values))
    return committed(tokens), committed(trimmed)


@jax.jit
def _keep_largest_norm(kept, tokens, values, fraction):
    """kept [B, S, Hkv, G] (0/1) trimmed to at most floor(fraction x tokens x G) pairs per row and KV head, dropping
    the kept groups of smallest norm; tokens [B, Hkv] kept tokens; values [B, S, Hkv, D]."""
    batch, length, heads, groups = kept.shape
    norms = jnp.sum(jnp.square(values.astype(jnp.float32).reshape(batch, length, heads, groups, -1)), axis=-1)
    allowed = jnp.floor(fraction * tokens * groups + 1e-6).astype(jnp.int32)
    flat = jnp.where(kept > 0, norms, -1.0).transpose(0, 2, 1, 3).reshape(batch, heads, -1)
    ranks = inverse_permutation(jnp.argsort(-flat, axis=-1, stable=True))
    keep = (ranks < allowed[..., None]).reshape(batch, heads, length, groups).transpose(0, 2, 1, 3)
    return (keep & (kept > 0)).astype(kept.dtype)


@functools.partial(jax.jit, static_argnames=("model", "capacity"))
def routed_prefill(model: DecoderLM, params, context, context_mask, value_budget, capacity: int):
    """Prefills a routed model (its router decides each context token's groups at value_budget).

    Returns (cache, per-layer context value-group masks [B, S, Hkv, G]).
    """
    cache = KVCache.create(model.config, context.shape[0], capacity)
    _, cache = model.apply({"params": params}, context, attention_mask=context_mask, cache=cache,
                           value_budget=value_budget)
    return cache, tuple(g[:, :context.shape[1]] for g in cache.group_masks)


def _apply(model, params, ids, positions, cache, token_masks, group_masks):
    return model.apply({"params": params}, ids, positions=positions, cache=cache, token_keep_mask=token_masks,
                       value_group_mask=group_masks)


@functools.partial(jax.jit, static_argnames=("model", "max_new"))
def greedy_answer(model: DecoderLM, params, cache, question, q_positions, token_masks, group_masks, max_new: int):
    """Runs the question over the (masked) cache, then generates max_new tokens greedily: [B, max_new].

    Masks cover the cache's capacity (context masks padded with ones): the question and answer tokens
    are cached uncompressed.
    """
    logits, cache = _apply(model, params, question, q_positions, cache, token_masks, group_masks)

    def step(carry, _):
        token, cache = carry
        positions = jnp.max(cache.positions, axis=1, keepdims=True) + 1
        logits, cache = _apply(model, params, token[:, None], positions, cache, token_masks, group_masks)
        return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache), token

    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    _, tokens = jax.lax.scan(step, (first, cache), None, length=max_new)
    return jnp.transpose(tokens)


@functools.partial(jax.jit, static_argnames=("model",))
def continuation_nll(model: DecoderLM, params, cache, inputs, positions, targets, token_masks, group_masks):
    """Summed next-token NLL of `targets` when `inputs` run over the (masked) cache: ([B], tokens per row)."""
    logits, _ = _apply(model, params, inputs, positions, cache, token_masks, group_masks)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll, axis=1), jnp.full((inputs.shape[0],), inputs.shape[1], jnp.float32)


@functools.partial(jax.jit, static_argnames=("model",))
def answer_nll(model: DecoderLM, params, cache, question, q_positions, answer, answer_lengths, token_masks,
               group_masks):
    """Summed NLL [B] of each row's first answer_lengths[b] tokens of `answer` [B, N], teacher-forced after the
    (left-padded) question over the (masked) cache: how likely the compressed cache keeps a given answer."""
    n = answer.shape[1]
    start = jnp.max(q_positions, axis=1, keepdims=True) + 1
    inputs = jnp.concatenate([question, answer[:, :-1]], axis=1)
    positions = jnp.concatenate([q_positions, start + jnp.arange(n - 1, dtype=jnp.int32)], axis=1)
    logits, _ = _apply(model, params, inputs, positions, cache, token_masks, group_masks)
    # the question's last position predicts the answer's first token (left padding: it is the last column)
    log_probs = jax.nn.log_softmax(logits[:, -n:].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, answer[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(jnp.arange(n)[None] < answer_lengths[:, None], nll, 0.0), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "lengths", "shared_prefix"))
def choice_loglik(model: DecoderLM, params, cache, question, q_positions, token_masks, group_masks, options,
                  lengths: Tuple[int, ...], shared_prefix: bool = False):
    """Log-likelihood [B, K] of each option's tokens (options [K, n], right-padded) after the question.

    shared_prefix: all options have n tokens and share the first n - 1 (" A" as [" ", "A"] in a byte
    tokenizer, or one token each): those run once and the options differ in their last token only.
    """
    logits, cache = _apply(model, params, question, q_positions, cache, token_masks, group_masks)
    first = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)  # [B, V]
    start = jnp.max(cache.positions, axis=1, keepdims=True) + 1
    if shared_prefix:
        n = lengths[0]
        if n == 1:
            return first[:, options[:, 0]]
        ids = jnp.broadcast_to(options[0, :n - 1], (question.shape[0], n - 1))
        more, _ = _apply(model, params, ids, start + jnp.arange(n - 1), cache, token_masks, group_masks)
        log_probs = jax.nn.log_softmax(more.astype(jnp.float32), axis=-1)
        common = first[:, options[0, 0]] + jnp.sum(log_probs[:, jnp.arange(n - 2), options[0, 1:n - 1]], axis=1)
        return common[:, None] + log_probs[:, -1][:, options[:, n - 1]]
    scores = []
    for k, length in enumerate(lengths):
        total = first[:, options[k, 0]]
        if length > 1:
            ids = jnp.broadcast_to(options[k, :length - 1], (question.shape[0], length - 1))
            more, _ = _apply(model, params, ids, start + jnp.arange(length - 1), cache, token_masks, group_masks)
            log_probs = jax.nn.log_softmax(more.astype(jnp.float32), axis=-1)
            total = total + jnp.sum(log_probs[:, jnp.arange(length - 1), options[k, 1:length]], axis=1)
        scores.append(total)
    return jnp.stack(scores, axis=1)


def widen_masks(token_masks, group_masks, capacity: int):
    """Context masks padded with ones to the cache capacity, as DecoderLM takes them."""
    return committed((pad_to_capacity(token_masks, capacity), pad_to_capacity(group_masks, capacity)))


def check_method_config(config) -> None:
    """One-line ConfigErrors for the method options (run before any compute)."""
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise ConfigError(f"unknown method(s) {unknown or '(none given)'}; choose from: {', '.join(METHODS)}")
    if config.allocation_scope not in SCOPES:
        raise ConfigError(f"allocation_scope={config.allocation_scope!r} is unknown; choose one of {SCOPES}")
    for section in ("subtoken", "combined", "joint"):
        if section not in config:
            continue
        if config[section].scorer not in SCORERS:
            raise ConfigError(f"{section}.scorer={config[section].scorer!r} is unknown; choose one of {SCORERS}")
    observe = config.get("selectors", {}).get("expected_attention_observe", "window")
    if observe not in OBSERVED:
        raise ConfigError(f"selectors.expected_attention_observe={observe!r} is unknown; choose one of {OBSERVED}")
    routed = config.get("routed", {})
    if routed.get("exact_rule", "calibrated") not in EXACT_RULES:
        raise ConfigError(f"routed.exact_rule={routed.get('exact_rule')!r} is unknown; choose one of {EXACT_RULES}")
    if "routed_tokens" in config.methods and routed.get("token_selector") not in QUERY_FREE_SELECTORS:
        raise ConfigError(f"routed.token_selector={routed.get('token_selector')!r} must be a selector that needs no "
                          f"question: one of {QUERY_FREE_SELECTORS}")
    if "joint" in config and config.joint.get("eviction", "whole") not in EVICTIONS:
        raise ConfigError(f"joint.eviction={config.joint.eviction!r} is unknown; choose one of {EVICTIONS}")
    if "joint" in config.methods and config.joint.scorer == "predictor":
        raise ConfigError("joint.scorer='predictor': the predictor's scores are log-relevance, and the joint "
                          "allocation prices contributions (>= 0); use attention, snapkv or expected")
    if uses_predictor(config) and not config.get("predictor", {}).get("workdir"):
        raise ConfigError("the predictor (scorer or selector) needs predictor.workdir: a shipped predictor's name "
                          "or a folder written by train.py --config configs/predictor.py")
    if config.combined.selector not in TOKEN_SELECTORS and config.combined.selector != "predictor":
        raise ConfigError(f"combined.selector={config.combined.selector!r} is unknown; choose one of "
                          f"{', '.join(TOKEN_SELECTORS)} or predictor")
    if not 0 < config.combined.value_fraction <= 1:
        raise ConfigError(f"combined.value_fraction={config.combined.value_fraction} must be in (0, 1]")
