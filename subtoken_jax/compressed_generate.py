"""Generation from a compressed (packed) KV cache: greedy or sampled.

    compression = Compression(token_fraction=0.5, value_fraction=0.5, selector="snapkv")  # 37.5% of KV bytes
    tokens = compressed_generate(model, params, context_ids, question_ids=question_ids,
                                 compression=compression, max_new_tokens=32)

1. Prefill the context and capture what selectors read (`selectors.capture_prefill_state`; with
   question_ids the question's queries are the observation window: query-aware compression).
2. `compression(state) -> (token_keep_masks, group_masks)`: per-layer 0/1 masks (None, one array
   for all layers, or one per layer): tokens [B, P] / [B, P, Hkv], groups [B, P, Hkv, G].
   `Compression` is the ready-made recipe (token selector, then value groups under a global budget),
   `JointCompression` the one that spends a single byte budget on keys and groups per token; any
   callable with that signature works.
3. Pack every layer (`packed_cache.pack_cache`); the dense prefill arrays are dropped.
4. The question (if any) runs token by token over the packed context, then the answer is decoded:
   `packed_decode_step` runs the decoder on one new token per row against the packed prefix plus a
   dense tail holding the question's and generated tokens' keys and values uncompressed.

The decode step reuses the model's own modules and parameters: each layer's RMSNorms, MLP and the
Attention module's projections (q/k/v/o with their LoRA adapters and biases) and rotary embedding
are applied by binding the module classes to that layer's parameter subtree; only the attention over
the cache is replaced by `packed_attention` (or the Pallas decode kernel for the fixed-K layout on
GPU/TPU). So it matches DecoderLM decoding with the equivalent masks on a dense cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from subtoken_jax.attention import Attention
from subtoken_jax.errors import InputError
from subtoken_jax.input_checks import check_ids, check_max_new_tokens
from subtoken_jax.kernels.packed_decode import IMPLS, packed_decode_attention
from subtoken_jax.layers import MLP, RMSNorm, apply_rope
from subtoken_jax.model import DecoderLM, default_positions
from subtoken_jax.model_config import check_budget
from subtoken_jax.packed_cache import (FILLS, LAYOUTS, FixedKValues, PackedCache, advance_tail, append_tail,
                                       pack_cache, packed_attention, write_tail_positions)
from subtoken_jax.sampling import check_sampling, hold_eos, pick_token
from subtoken_jax.selectors import (SCOPES, TOKEN_SELECTORS, PrefillState, TokenSelector, allocate_joint,
                                    capture_prefill_state, combine, value_group_scorer)


@dataclasses.dataclass(frozen=True)
class Compression:
    """Query-aware compression of the context: keep token_fraction (tau) of its tokens, then value_fraction
    (rho) of the survivors' value groups, so about tau * (1 + rho) / 2 of the KV bytes remain.

    selector: a token selector name (selectors.TOKEN_SELECTORS) or instance; scorer: a value-group
    scoring method ("attention": the question's realised attention x group norm; "snapkv": that attention
    pooled over 5 tokens as SnapKV pools it, which keeps the values of the tokens an answer copies after
    the attended ones; "expected": closed-form expected attention) or a (state, layer) -> [B, S, Hkv, G]
    callable such as a trained predictor's.
    scope: the value-group budget is shared per "head", per "layer" or "global"ly. window: the last
    context tokens that act as the observation window when no question is given. value_fill: a dropped
    group of a kept token reads as "zero" or as the context's "mean" value of its layer and KV head.
    """

    token_fraction: float = 1.0
    value_fraction: float = 1.0
    selector: Union[str, TokenSelector] = "snapkv"
    scorer: Union[str, Callable[[PrefillState, int], jax.Array]] = "attention"
    scope: str = "global"
    window: int = 8
    value_fill: str = "zero"  # what a dropped group reads as in the packed cache: "zero" | "mean" (pack_cache)

    def __post_init__(self):
        check_budget(self.token_fraction, "token_fraction")
        check_budget(self.value_fraction, "value_fraction")
        if isinstance(self.selector, str) and self.selector not in TOKEN_SELECTORS:
            raise InputError(f"unknown token selector {self.selector!r}; choose from {', '.join(TOKEN_SELECTORS)}")
        if isinstance(self.scorer, str):
            value_group_scorer(self.scorer)  # raises on an unknown name
        if self.scope not in SCOPES:
            raise InputError(f"unknown allocation scope {self.scope!r}; choose from {', '.join(SCOPES)}")
        if self.window < 1:
            raise InputError(f"window must be >= 1, got {self.window}")
        if self.value_fill not in FILLS:
            raise InputError(f"unknown value_fill {self.value_fill!r}; choose from {', '.join(FILLS)}")

    @property
    def kv_budget(self) -> float:
        """Fraction of the context's key + value bytes kept (before index metadata)."""
        return self.token_fraction * (1.0 + self.value_fraction) / 2.0

    def __call__(self, state: PrefillState):
        selector = None
        if self.token_fraction < 1.0:
            selector = TOKEN_SELECTORS[self.selector]() if isinstance(self.selector, str) else self.selector
        scorer = value_group_scorer(self.scorer) if isinstance(self.scorer, str) else self.scorer
        return combine(state, selector, self.token_fraction, scorer, self.value_fraction, scope=self.scope)


@dataclasses.dataclass(frozen=True)
class JointCompression:
    """Query-aware compression to kv_budget of the context's KV bytes with no fixed token / group split.

    Every (token, KV head) keeps its key and its k best value groups, or nothing; k is chosen per token
    by the squared read-out error it saves per byte (`selectors.allocate_joint`), so tokens the question
    relies on keep whole values, tokens whose value energy sits in a few groups keep those, and the rest
    are evicted. scorer, scope, window and value_fill as in `Compression`; "snapkv" scores (the question's
    pooled attention x group norm) by default.
    """

    kv_budget: float = 0.375
    scorer: Union[str, Callable[[PrefillState, int], jax.Array]] = "snapkv"
    scope: str = "head"
    window: int = 8
    value_fill: str = "zero"

    def __post_init__(self):
        check_budget(self.kv_budget, "kv_budget")
        Compression(scorer=self.scorer, scope=self.scope, window=self.window, value_fill=self.value_fill)  # checks

    def __call__(self, state: PrefillState):
        scorer = value_group_scorer(self.scorer) if isinstance(self.scorer, str) else self.scorer
        scores = [scorer(state, layer) for layer in range(state.num_layers)]
        return allocate_joint(scores, self.kv_budget, scope=self.scope, positions=state.positions)


def _embed(module, ids):
    return module.embed(ids)


def _lm_head(module, x):
    x = module.final_norm(x)
    logits = module.embed.attend(x) if module.config.tie_word_embeddings else module.lm_head(x)
    return logits.astype(jnp.float32)


def _qkv(module, x, positions):
    query = apply_rope(module.q(x), positions, module.inv_freq)
    key, value = module.project_kv(x, positions)
    return query, key, value


def _output(module, out):
    return module.o(out)


def packed_decode_step(model: DecoderLM, params, cache: PackedCache, token: jax.Array, position: jax.Array, *,
                       impl: str = "auto"):
    """One greedy-decode step: token [B] at position [B] -> (logits [B, vocab] float32, updated cache).

    The token's keys/values are appended to the dense tail; attention covers prefix + tail jointly.
    impl picks the fixed-K attention ("auto", "xla", "pallas"); the global layout always uses XLA.
    """
    cfg = model.config
    ids, positions = token[:, None], position[:, None].astype(jnp.int32)
    cache = write_tail_positions(cache, positions)
    x = model.apply({"params": params}, ids, method=_embed)
    norm = RMSNorm(cfg.rms_norm_eps, cfg.weights_dtype)
    for i, layer in enumerate(cache.layers):
        lp = params[f"layer_{i}"]
        attn = Attention(cfg, i)
        attn_vars = {"params": lp["attn"]}
        query, key, value = attn.apply(attn_vars, norm.apply({"params": lp["attn_norm"]}, x), positions,
                                       method=_qkv)
        cache = append_tail(cache, i, key, value)
        kwargs = dict(tail_keys=cache.tail_keys[i].astype(query.dtype),
                      tail_values=cache.tail_values[i].astype(query.dtype), tail_positions=cache.tail_positions,
                      sliding_window=cfg.sliding_window(i))
        if isinstance(layer.values, FixedKValues):  # the kernel on GPU/TPU; its impl="xla" is packed_attention
            out = packed_decode_attention(query[:, 0], positions[:, 0], layer, impl=impl, **kwargs)[:, None]
        else:
            out = packed_attention(query, positions, layer, **kwargs)
        x = x + attn.apply(attn_vars, out, method=_output)
        x = x + MLP(cfg).apply({"params": lp["mlp"]}, norm.apply({"params": lp["mlp_norm"]}, x))
    logits = model.apply({"params": params}, x, method=_lm_head)
    return logits[:, -1], advance_tail(cache, 1)


@functools.partial(jax.jit, static_argnames=("model", "impl"))
def _feed(model, params, cache, tokens, positions, impl: str):
    """Teacher-forces tokens [B, Q] at positions [B, Q] through the packed cache; the last step's logits."""
    def step(cache, inputs):
        token, position = inputs
        logits, cache = packed_decode_step(model, params, cache, token, position, impl=impl)
        return cache, logits

    cache, logits = jax.lax.scan(step, cache, (jnp.transpose(tokens), jnp.transpose(positions)))
    return logits[-1], cache


@functools.partial(jax.jit, static_argnames=("model", "steps", "impl", "temperature", "top_k", "eos_id"))
def _decode(model, params, cache, token, position, done, rng, steps: int, impl: str, temperature: float,
            top_k: Optional[int], eos_id: Optional[int]):
    """`steps` decode steps from `token` (already emitted) at `position`; returns the next tokens [B, steps]."""
    def step(carry, _):
        cache, token, position, done, rng = carry
        logits, cache = packed_decode_step(model, params, cache, token, position, impl=impl)
        rng, sub = jax.random.split(rng)
        token, done = hold_eos(pick_token(logits, sub, temperature, top_k), done, eos_id)
        return (cache, token, position + 1, done, rng), token

    carry, tokens = jax.lax.scan(step, (cache, token, position, done, rng), None, length=steps)
    return jnp.transpose(tokens), carry


def compressed_generate(model: DecoderLM, params, prompt_ids, *, compression: Callable, max_new_tokens: int,
                        question_ids=None, attention_mask=None, question_mask=None, return_cache: bool = False,
                        **kwargs):
    """Generates max_new_tokens after prompt_ids [B, P] (+ question_ids [B, Q]) through a packed, compressed cache.

    compression(state: PrefillState) -> (token_keep_masks, group_masks), e.g. `Compression(...)`; it
    compresses the prompt (the context) only. With question_ids the question's queries guide query-aware
    selectors and the question then runs over the compressed context; without, the prompt's last logits
    (from the full prefill) give the first token. attention_mask / question_mask mark real tokens of
    left-padded rows. kwargs: see `generate_from_state`. Returns int32 [B, max_new_tokens] (and the
    PackedCache when return_cache).
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    _check_lengths(model, prompt_ids, question_ids, max_new_tokens)
    window = getattr(compression, "window", 8)
    state, logits = capture_prefill_state(model, params, prompt_ids, question_ids, context_mask=attention_mask,
                                          question_mask=question_mask, window=min(window, prompt_ids.shape[1]),
                                          return_logits=True)
    masks = compression(state)
    kwargs.setdefault("value_fill", getattr(compression, "value_fill", "zero"))
    tokens, packed = generate_from_state(model, params, state, masks, max_new_tokens=max_new_tokens,
                                         question_ids=question_ids, question_mask=question_mask,
                                         first_logits=None if question_ids is not None else logits, **kwargs)
    return (tokens, packed) if return_cache else tokens


def _check_lengths(model, prompt_ids, question_ids, max_new_tokens):
    check_max_new_tokens(max_new_tokens)
    batch, prompt_len = check_ids(prompt_ids, "prompt_ids").shape
    question_len = 0
    if question_ids is not None:
        shape = jnp.shape(question_ids)
        if len(shape) != 2 or shape[0] != batch or shape[1] < 1:
            raise InputError(f"question_ids must be [batch={batch}, Q >= 1], got shape {shape}")
        question_len = shape[1]
    limit = model.config.max_position_embeddings
    if prompt_len + question_len + max_new_tokens > limit:
        raise InputError(f"prompt ({prompt_len}) + question ({question_len}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings={limit}")


def generate_from_state(model: DecoderLM, params, state: PrefillState, masks, *, max_new_tokens: int,
                        question_ids=None, question_mask=None, first_logits=None, temperature: float = 0.0,
                        top_k: Optional[int] = None, rng: Optional[jax.Array] = None, eos_id: Optional[int] = None,
                        layout: str = "global", capacity=None, key_capacity=None, k=None, impl: str = "auto",
                        progress: bool = False, chunk: int = 64, value_fill: str = "zero"):
    """Packs a captured context under masks = (token_keep_masks, group_masks), then answers from it.

    The question_ids [B, Q] (left-padded rows: question_mask) run over the packed context first; without
    a question, first_logits [B, vocab] (the context's last logits) give the first token. layout "global"
    (any masks) or "fixed_k" (token masks, if any, [B, P]); capacity / key_capacity / k: packed sizes
    (None: from the masks). value_fill: what a dropped group reads as ("zero" | "mean", see `pack_cache`).
    impl: attention for the fixed-K layout. temperature 0 is greedy; after eos_id
    a row keeps emitting eos_id. Returns (int32 [B, max_new_tokens], the final PackedCache).
    """
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if impl not in IMPLS:
        raise InputError(f"unknown attention impl {impl!r}; choose from {', '.join(IMPLS)}")
    if layout not in LAYOUTS:
        raise InputError(f"unknown packed layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if (question_ids is None) == (first_logits is None):
        raise InputError("give exactly one of question_ids (run over the packed context) and first_logits")
    check_sampling(temperature, top_k, rng)
    cfg = model.config
    batch = state.positions.shape[0]
    question_len = 0 if question_ids is None else question_ids.shape[1]
    token_masks, group_masks = masks
    cast = lambda arrays: tuple(a.astype(cfg.compute_dtype) for a in arrays)  # noqa: E731  capture keeps float32
    packed = pack_cache(cast(state.keys), cast(state.values), state.positions, token_masks, group_masks,
                        layout=layout, tail_capacity=question_len + max_new_tokens - 1, capacity=capacity,
                        key_capacity=key_capacity, k=k, fill=value_fill)
    next_position = jnp.max(state.positions, axis=1).astype(jnp.int32) + 1
    logits = first_logits
    if question_ids is not None:
        q_mask = jnp.ones((batch, question_len), jnp.int32) if question_mask is None else \
            jnp.asarray(question_mask, jnp.int32)
        # left padding: pad slots get position -1, so they are never attended and attend to nothing
        positions = default_positions(question_ids, q_mask, next_position[:, None])
        logits, packed = _feed(model, params, packed, jnp.asarray(question_ids, jnp.int32), positions, impl)
        next_position = next_position + jnp.sum(q_mask, axis=1).astype(jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    rng, first_rng = jax.random.split(rng)
    token, done = hold_eos(pick_token(logits, first_rng, temperature, top_k), jnp.zeros((batch,), bool), eos_id)
    pieces = [token[:, None]]
    remaining = max_new_tokens - 1
    sizes = [min(chunk, remaining - i) for i in range(0, remaining, chunk)] if progress else [remaining] * bool(remaining)
    with tqdm(total=max_new_tokens, desc="generate (compressed)", disable=not progress, leave=False) as bar:
        bar.update(1)
        for steps in sizes:
            rng, step_rng = jax.random.split(rng)
            tokens, (packed, token, next_position, done, _) = _decode(
                model, params, packed, token, next_position, done, step_rng, steps, impl, float(temperature), top_k,
                eos_id)
            pieces.append(tokens)
            bar.update(steps)
    return jnp.concatenate(pieces, axis=1), packed
