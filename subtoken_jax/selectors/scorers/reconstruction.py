"""KVzip's reconstruction attention as a value-group scorer: the most attention any query of the model
repeating its context pays a token (per KV head), times the group's norm. Query-agnostic, like KVzip: the
groups it keeps are those the model needs to reproduce the context, whatever the question. Needs the
repetition pass (`capture_prefill_state(..., reconstruct=...)`; generate runs it when a recipe's scorer or
selector is KVzip's)."""

from __future__ import annotations

import dataclasses

from subtoken_jax.errors import InputError
from subtoken_jax.selectors.base import PrefillState
from subtoken_jax.selectors.scorers.base import ValueGroupScorer, value_group_shares


@dataclasses.dataclass(frozen=True)
class ReconstructionAttention(ValueGroupScorer):
    def attention(self, state: PrefillState, layer: int):
        if state.reconstruction is None:
            raise InputError("the kvzip scorer needs the reconstruction pass: capture_prefill_state(..., "
                             "reconstruct=prompt_ids) (generate runs it when the recipe's scorer is 'kvzip')")
        return state.reconstruction[layer]  # [B, Hkv, S]


@dataclasses.dataclass(frozen=True)
class ReconstructionShares(ReconstructionAttention):
    """KVzip's score times each group's share of its value's norm (||v_g|| / ||v||): a token's squared scores sum
    to its squared KVzip score whatever its value's norm, so the joint allocation keeps KVzip's own token ranking
    and only splits each kept token's value by energy. ("kvzip" re-ranks tokens by score x value norm, which on
    SmolLM2 loses to KVzip with or without groups: the study's answer fidelity.)"""

    def group_weights(self, state: PrefillState, layer: int):
        return value_group_shares(state.values[layer], state.value_groups)
