"""Query-aware KV-cache selectors: token eviction (kvpress-style presses) and sub-token value-group allocation.

    state = capture_prefill_state(model, params, context_ids, question_ids)
    keep = SnapKV().masks(state, 0.25)                                  # per layer [B, S, Hkv]
    keep, groups = combine(state, SnapKV(), 0.5, value_group_scorer("attention"), 0.5, scope="layer")
    model.apply(..., token_keep_mask=pad_to_capacity(keep, L), value_group_mask=pad_to_capacity(groups, L))
"""

from subtoken_jax.selectors.adakv import AdaKV, head_adaptive_select
from subtoken_jax.selectors.allocate import SCOPES, allocate_joint, allocate_value_groups, combine, kv_bytes_fraction
from subtoken_jax.selectors.base import (PrefillState, QuestionPrefill, TokenSelector, accumulated_attention, budget_count,
                                         capture_prefill_state, needs_context_queries, pad_to_capacity, select_tokens,
                                         window_attention)
from subtoken_jax.selectors.expected_attention import (ExpectedAttention, expected_attention_weights,
                                                       future_statistics, query_statistics)
from subtoken_jax.selectors.h2o import H2O
from subtoken_jax.selectors.key_norm import KeyNorm
from subtoken_jax.selectors.kvzip import KVzip, layer_adaptive_select, reconstruction_prompt
from subtoken_jax.selectors.pyramid import PyramidKV, pyramid_fractions
from subtoken_jax.selectors.random_select import RandomSelector
from subtoken_jax.selectors.snapkv import SnapKV, pool1d
from subtoken_jax.selectors.streaming import StreamingLLM
from subtoken_jax.selectors.subtoken import (layer_value_group_scores, value_group_norms, value_group_scorer,
                                             value_group_scores)
from subtoken_jax.selectors.tova import TOVA, last_query_attention

TOKEN_SELECTORS = {"snapkv": SnapKV, "h2o": H2O, "streaming": StreamingLLM, "key_norm": KeyNorm,
                   "random": RandomSelector, "expected_attention": ExpectedAttention, "tova": TOVA,
                   "pyramidkv": PyramidKV, "adakv": AdaKV, "kvzip": KVzip}

__all__ = ["SCOPES", "TOKEN_SELECTORS", "TOVA", "accumulated_attention", "AdaKV", "allocate_joint",
           "allocate_value_groups", "budget_count", "capture_prefill_state", "combine", "expected_attention_weights",
           "ExpectedAttention", "future_statistics", "head_adaptive_select", "KeyNorm", "KVzip", "layer_adaptive_select", "kv_bytes_fraction",
           "last_query_attention", "layer_value_group_scores", "needs_context_queries", "pad_to_capacity", "PrefillState", "pyramid_fractions",
           "QuestionPrefill",
           "PyramidKV", "query_statistics", "RandomSelector", "reconstruction_prompt", "select_tokens", "SnapKV", "StreamingLLM",
           "TokenSelector", "value_group_norms", "value_group_scorer", "value_group_scores", "window_attention"]
