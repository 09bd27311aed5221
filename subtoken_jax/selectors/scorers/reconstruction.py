"""KVzip's reconstruction attention as a value-group scorer: the most attention any query of the model
repeating its context pays a token (per KV head), times the group's norm. Query-agnostic, like KVzip: the
groups it keeps are those the model needs to reproduce the context, whatever the question. Needs the
repetition pass (`capture_prefill_state(..., reconstruct=...)`; generate runs it when a recipe's scorer or
selector is KVzip's)."""

from __future__ import annotations

import dataclasses

from subtoken_jax.errors import InputError
from subtoken_jax.selectors.base import PrefillState
from subtoken_jax.selectors.scorers.base import ValueGroupScorer


@dataclasses.dataclass(frozen=True)
class ReconstructionAttention(ValueGroupScorer):
    def attention(self, state: PrefillState, layer: int):
        if state.reconstruction is None:
            raise InputError("the kvzip scorer needs the reconstruction pass: capture_prefill_state(..., "
                             "reconstruct=prompt_ids) (generate runs it when the recipe's scorer is 'kvzip')")
        return state.reconstruction[layer]  # [B, Hkv, S]
