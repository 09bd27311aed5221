"""Sub-token scores by name: the registered value-group scorers (selectors/scorers/) as functions.

    scorer = value_group_scorer("snapkv")          # (state, layer) -> [B, S, Hkv, G]
    scores = value_group_scores(state, "attention")  # every layer
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Tuple

import jax

from subtoken_jax.errors import InputError
from subtoken_jax.selectors.base import PrefillState
from subtoken_jax.selectors.scorers import VALUE_GROUP_SCORERS, value_group_norms

METHODS = tuple(VALUE_GROUP_SCORERS)

__all__ = ["METHODS", "layer_value_group_scores", "value_group_norms", "value_group_scorer", "value_group_scores"]


def value_group_scorer(method: str = "attention", **kwargs) -> Callable[[PrefillState, int], jax.Array]:
    """The registered scorer `method` ("attention": the question's attention; "snapkv": that attention pooled
    as SnapKV pools it; "expected": closed-form expected attention; "kvzip": the attention of the model
    repeating its context, query-agnostic), built with those of kwargs it takes
    (e.g. n_future, which only "expected" uses), as a (state, layer) -> [B, S, Hkv, G] callable. A keyword
    no registered scorer takes is an error."""
    if method not in VALUE_GROUP_SCORERS:
        raise InputError(f"unknown value-group scoring method {method!r}; choose one of {METHODS}")
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in VALUE_GROUP_SCORERS.items()}
    unknown = sorted(set(kwargs) - set().union(*fields.values()))
    if unknown:
        raise InputError(f"value-group scorers take no option {unknown}")
    return VALUE_GROUP_SCORERS[method](**{k: v for k, v in kwargs.items() if k in fields[method]})


def layer_value_group_scores(state: PrefillState, layer: int, method: str = "attention", **kwargs) -> jax.Array:
    """[B, S, Hkv, G] scores of one layer by the registered scorer `method`."""
    return value_group_scorer(method, **kwargs)(state, layer)


def value_group_scores(state: PrefillState, method: str = "attention", **kwargs) -> Tuple[jax.Array, ...]:
    """`layer_value_group_scores` for every layer: a tuple of [B, S, Hkv, G]."""
    scorer = value_group_scorer(method, **kwargs)
    return tuple(scorer(state, layer) for layer in range(state.num_layers))
