"""What every kind accumulates per plan: its scores, its realised KV bytes (weighted by real context
tokens) and its examples; and the length check of prompt tasks."""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from subtoken_jax.compression import realised_kv_bytes
from subtoken_jax.errors import InputError
from subtoken_jax.evaluation import report as report_lib
from subtoken_jax.evaluation import tasks as tasks_lib


class _Accumulator:
    def __init__(self):
        self.values: List[float] = []
        self.weight = 0.0
        self.bytes = {"total": 0.0, "keys": 0.0, "values": 0.0, "index": 0.0}

    def add_bytes(self, accounting: Dict[str, float], real_tokens: float) -> None:
        for key in self.bytes:
            self.bytes[key] += accounting[key] * real_tokens
        self.weight += real_tokens

    def accounting(self) -> Dict[str, float]:
        return {k: v / max(self.weight, 1e-9) for k, v in self.bytes.items()}


class PlanScores:
    """Per (method, budget) plan: scores, realised bytes and examples; `records` gives report rows."""

    def __init__(self, plans):
        self.plans = plans
        self._acc = {(p.method, p.budget): _Accumulator() for p in plans}
        self.examples: List[dict] = []

    def add_bytes(self, plan, tokens, groups, batch, model) -> None:
        """The realised KV bytes of a prompt batch's masks (its real rows)."""
        self.add_accounting(plan, realised_kv_bytes(tokens, groups, batch.state.positions, model.config, batch.rows),
                            batch.real_tokens)

    def add_accounting(self, plan, accounting: Dict[str, float], real_tokens: float) -> None:
        self._acc[plan.method, plan.budget].add_bytes(accounting, real_tokens)

    def add(self, plan, value: float, example: dict = None) -> None:
        self._acc[plan.method, plan.budget].values.append(float(value))
        if example is not None:
            self.examples.append(example)

    def records(self, task: str, num_examples: int, values: Dict = None) -> List[dict]:
        """values: a plan's final metric when it is not the mean of its scores (perplexity)."""
        rows = []
        for p in self.plans:
            acc = self._acc[p.method, p.budget]
            value = values[p.method, p.budget] if values is not None else float(np.mean(acc.values))
            rows.append(report_lib.record(task, p.method, p.budget, acc.accounting(), p.token_fraction,
                                          p.value_fraction, tasks_lib.METRICS[task], value, num_examples))
        return rows


def check_prompt_lengths(task: str, prompts, answer_slots: int, source) -> None:
    """One-line InputError when a prompt plus its answer does not fit the model's positions."""
    limit = source.base_cfg.max_position_embeddings
    for prompt in prompts:
        if prompt.prompt_tokens + answer_slots > limit:
            raise InputError(f"{task}: a prompt of {prompt.prompt_tokens} tokens plus {answer_slots} answer tokens "
                             f"exceeds the model's max_position_embeddings={limit}; use shorter {task} inputs")
