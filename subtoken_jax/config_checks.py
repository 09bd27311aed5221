"""The range of every numeric config field, checked in one place before any compute.

One table serves train.py, eval.py and the predictor's configs: a rule applies to a field when the
config has it (`check_ranges(config)`), so a new config file gets the checks of the fields it shares.
Fields with a closed set of values (data.source, routing.mode, ...) are checked by their owners,
which know the set; misspelled field names are refused by ml_collections' locked ConfigDicts (see
subtoken_jax/cli.py for the one-line message).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

from ml_collections import ConfigDict

from subtoken_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """A number (or, with each=True, every number of a sequence) in [low, high], ends open if asked."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    each: bool = False
    note: str = ""  # why, or what the boundary value means

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = f"{kind} {' and '.join(parts)}".strip()
        return f"{text} ({self.note})" if self.note else text

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.integer and int(value) != value:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def count(low: int = 0, note: str = "") -> Range:
    return Range(low=low, integer=True, note=note)


def positive(note: str = "") -> Range:
    return Range(low=0.0, low_open=True, note=note)


def non_negative(note: str = "") -> Range:
    return Range(low=0.0, note=note)


def fraction(low_open: bool = True, high_open: bool = False, each: bool = False, note: str = "") -> Range:
    return Range(low=0.0, high=1.0, low_open=low_open, high_open=high_open, each=each, note=note)


_SKIPS = "0 skips the stage"
_BUDGET = "the fraction of KV bytes kept"

RULES = {
    # shared
    "seed": count(0),
    "seq_len": count(1),
    "batch_size": count(1),
    "checkpoint_every": count(1, "steps between checkpoints"),
    "keep_checkpoints": count(1),
    "log_every": count(1, "steps between metric lines"),
    "grad_clip": positive("the global gradient-norm clip"),
    # the model (fresh decoders)
    **{f"model.{name}": count(1) for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                               "num_heads", "num_kv_heads", "value_groups",
                                               "max_position_embeddings")},
    # train.py stages
    "pretrain.steps": count(0, _SKIPS),
    "pretrain.learning_rate": positive(),
    "pretrain.warmup_steps": count(0),
    "pretrain.weight_decay": non_negative(),
    "adapt.steps": count(0, _SKIPS + ": the router and LoRA stay untrained"),
    "adapt.learning_rate": positive(),
    "adapt.warmup_steps": count(0),
    "adapt.weight_decay": non_negative(),
    "adapt.lora.rank": count(1),
    "adapt.lora.alpha": positive(),
    "adapt.lora.dropout": fraction(low_open=False, high_open=True),
    "adapt.lora.num_subspaces": count(1),
    "adapt.lora.active_subspaces": count(1),
    "adapt.routing.temperature": positive(),
    "adapt.routing.k": count(1),
    "adapt.budgets": fraction(each=True, note=_BUDGET),
    "adapt.budget_loss_weight": non_negative(),
    "adapt.balance_loss_weight": non_negative(),
    "eval_budgets": fraction(each=True, note=_BUDGET),
    "data.eval_batches": count(1),
    "data.max_bytes": count(1),
    "data.answer_weight": non_negative(),
    "data.synthetic_min_tokens": count(1),
    "data.mixture_weights": Range(low=0.0, each=True),
    # the predictor (configs/predictor.py)
    "train.steps": count(0, "0 evaluates the untrained predictor"),
    "train.batch_size": count(1),
    "train.learning_rate": positive(),
    "train.warmup_steps": count(0),
    "train.weight_decay": non_negative(),
    "train.grad_clip": positive(),
    "train.distinct_batches": count(0, "0 builds a fresh batch per step"),
    "train.log_every": count(1),
    "predictor.hidden_size": count(1),
    "predictor.layer_embed_size": count(1),
    "predictor.bands": count(1),
    "predictor.spread_rank": count(0),
    "predictor.neighbours": count(0),
    "data.context_length": count(2),
    "data.num_queries": count(1),
    "data.lengths": Range(low=1, integer=True, each=True),
    "data.answer_tokens": count(1),
    "eval.value_budget": fraction(note="the fraction of (token, head, group) pairs kept"),
    "eval.batches": count(1),
    # eval.py
    "budgets": fraction(each=True, note=_BUDGET),
    "token_budgets": Range(low=1, integer=True, each=True, note="KV bytes of this many whole tokens per prompt"),
    "pad_multiple": count(1),
    "extra_new_tokens": count(0),
    "lookahead": count(0, "answer tokens drafted over the full cache to observe; 0 = the question alone"),
    "selectors.snapkv_kernel_size": count(1),
    "selectors.h2o_recent": count(0),
    "selectors.streaming_sinks": count(0),
    "selectors.expected_attention_sinks": count(0),
    "selectors.n_future": count(1),
    "combined.value_fraction": fraction(),
    "routed.value_fraction": fraction(),
    "combined.token_fractions": fraction(each=True),
    "perplexity.max_bytes": count(1),
    "perplexity.seq_len": count(2),
    "perplexity.num_sequences": count(1),
    "perplexity.prefix_fraction": fraction(high_open=True),
    "perplexity.window": count(1),
    "needle.lengths": Range(low=1, integer=True, each=True),
    "needle.depths": fraction(low_open=False, each=True),
    "needle.samples": count(1),
    "multi_needle.lengths": Range(low=1, integer=True, each=True),
    "multi_needle.samples": count(1),
    "variable_tracking.lengths": Range(low=1, integer=True, each=True),
    "variable_tracking.samples": count(1),
    "variable_tracking.num_chains": count(1),
    "variable_tracking.chain_length": count(1),
    "mmlu.num_shots": count(0),
    "mmlu.max_examples": count(0, "0 = all"),
    "diagnostic.value_budget": fraction(),
    "value_basis.tokens": count(2),
}

# Mesh axes: -1 (all remaining devices) or a positive size.
_MESH_AXES = ("mesh.data", "mesh.fsdp", "mesh.tensor")


def _lookup(config: ConfigDict, path: str):
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, ConfigDict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def check_ranges(config: ConfigDict, rules=None) -> None:
    """ConfigError (one line, naming the field and its range) for the first field out of its range."""
    for path, rule in (RULES if rules is None else rules).items():
        present, value = _lookup(config, path)
        if not present or value is None:  # absent from this config, or an unset placeholder
            continue
        values = tuple(value) if rule.each and isinstance(value, (tuple, list)) else (value,)
        if rule.each and not isinstance(value, (tuple, list)):
            raise ConfigError(f"config.{path}={value!r} must be a sequence, each {rule.describe()}")
        for item in values:
            if not rule.holds(item):
                what = f"each value must be {rule.describe()}" if rule.each else f"must be {rule.describe()}"
                raise ConfigError(f"config.{path}={value!r}: {what}")
    for path in _MESH_AXES:
        present, value = _lookup(config, path)
        if present and (isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1)):
            raise ConfigError(f"config.{path}={value!r}: must be -1 (all remaining devices) or a size >= 1")
