"""KVzip: query-agnostic token importance by context reconstruction (Kim et al., 2025).

After the context is prefilled, the model is asked to repeat it: a short instruction, then the context
itself, run over the context's cache. A key matters as much as the most attention any query of that
repetition (and any query head of its KV group) pays it; keys the model needs to reproduce its context
are the keys any later question may need, so the scores do not depend on the question. As in kvpress's
default, one ranking spans every layer and KV head (layers and heads take different shares of the
budget) and the first `n_sink` tokens are always kept. The repetition costs about one more prefill of
the context; `capture_prefill_state(..., reconstruct=prompt_ids)` runs it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.model_config import check_budget
from subtoken_jax.selectors.base import PrefillState, TokenSelector, budget_count, ranks_by

# kvpress's instruction for the first (and here only) reconstruction chunk
REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."


@functools.partial(jax.jit, static_argnames=("protect_first",))
def layer_adaptive_select(scores, budget, positions, protect_first: int = 0):
    """scores [L, B, S, Hkv] -> 0/1 masks [L, B, S, Hkv]: per row, the round(budget x n) x Hkv x L best
    (layer, token, head) triples of one ranking (positions below protect_first first; ties to the later token)."""
    layers, batch, length, heads = scores.shape
    real = positions >= 0
    k = budget_count(budget, jnp.sum(real, axis=1)) * heads * layers  # [B]
    protected = real & (positions < protect_first)
    scores = jnp.where(jnp.isnan(scores) | ~real[None, ..., None], -jnp.inf, scores.astype(jnp.float32))
    flat = lambda x: jnp.moveaxis(jnp.broadcast_to(x, scores.shape), 0, 1).reshape(batch, -1)  # noqa: E731
    rank = ranks_by(flat(real[None, ..., None]), flat(protected[None, ..., None]), flat(scores),
                    flat(positions[None, ..., None]))
    keep = (rank < k[:, None]).reshape(batch, layers, length, heads) & real[:, None, :, None]
    return jnp.moveaxis(keep, 1, 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class KVzip(TokenSelector):
    """prompt_ids: the reconstruction instruction as token ids, e.g. the tokenizer's encoding of
    REPEAT_INSTRUCTION plus the chat template's end of the user turn (); () repeats the context bare.
    layerwise: each layer keeps its own share of the budget (per KV head) instead of one global ranking."""

    prompt_ids: Tuple[int, ...] = ()
    n_sink: int = 4
    layerwise: bool = False

    def __post_init__(self):
        if not isinstance(self.prompt_ids, tuple) or not all(isinstance(t, int) and t >= 0 for t in self.prompt_ids):
            raise InputError(f"KVzip prompt_ids must be a tuple of token ids, got {self.prompt_ids!r}")
        if self.n_sink < 0:
            raise InputError(f"KVzip n_sink must be >= 0, got {self.n_sink}")

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        if state.reconstruction is None:
            raise InputError("KVzip needs the reconstruction pass: capture_prefill_state(..., reconstruct=prompt_ids)"
                             " (generate / compressed_generate run it when the recipe's selector is KVzip)")
        return jnp.transpose(state.reconstruction[layer], (0, 2, 1))

    def protected(self, state: PrefillState):
        return self.n_sink, 0

    def masks(self, state: PrefillState, budget) -> Tuple[jax.Array, ...]:
        if self.layerwise:
            return super().masks(state, budget)
        if isinstance(budget, (int, float)):
            check_budget(budget)
        scores = jnp.stack([self.scores(state, layer) for layer in range(state.num_layers)])
        return tuple(layer_adaptive_select(scores, budget, state.positions, protect_first=self.n_sink))


def reconstruction_prompt(compression) -> Tuple[int, ...] | None:
    """The token ids a recipe's KVzip selector repeats the context after (None: the recipe needs no repetition);
    a recipe whose value-group scorer is "kvzip" repeats it bare, as a plain `KVzip()` selector does."""
    selector = getattr(compression, "selector", None)
    if isinstance(selector, KVzip):
        return selector.prompt_ids
    # scorers import selectors
    from subtoken_jax.selectors.scorers import RECONSTRUCTION_SCORERS, ReconstructionAttention

    scorer = getattr(compression, "scorer", None)
    if selector == "kvzip" or scorer in RECONSTRUCTION_SCORERS or isinstance(scorer, ReconstructionAttention):
        return KVzip().prompt_ids
    return None
