"""The batch loop shared by the prompt kinds (generation, multiple choice): context + question per row,
prefilled and captured once per batch, then every plan's masks over it."""

from __future__ import annotations

import dataclasses
from typing import Iterator, List

import jax.numpy as jnp
from tqdm.auto import tqdm

from subtoken_jax import data as data_lib
from subtoken_jax import sharding
from subtoken_jax.evaluation import methods as methods_lib
from subtoken_jax.evaluation import tasks as tasks_lib
from subtoken_jax.selectors import PrefillState, capture_prefill_state


@dataclasses.dataclass
class PromptBatch:
    prompts: List[tasks_lib.Prompt]  # the real rows (the padded batch repeats the last one)
    context: jnp.ndarray
    context_mask: jnp.ndarray
    question: jnp.ndarray
    question_mask: jnp.ndarray
    state: PrefillState
    capacity: int  # context + question + answer slots
    bar: object = None  # the task's progress bar: one tick per plan evaluated

    def tick(self) -> None:
        self.bar.update()

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def real_tokens(self) -> float:
        return float((self.context_mask[:self.rows] > 0).sum())


def prompt_batches(evaluator, task: str, prompts: List[tasks_lib.Prompt], answer_slots: int) -> Iterator[PromptBatch]:
    """Batches of config.batch_size prompts (a short last batch repeats its last prompt: one compilation for all
    batches), with a progress bar over batches x plans (the caller ticks it per plan)."""
    config = evaluator.config
    size = sharding.batch_rows(min(config.batch_size, len(prompts)))  # whole rows per device under a mesh
    batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    with tqdm(total=len(batches) * len(evaluator.plans), desc=task, dynamic_ncols=True) as bar:
        for batch in batches:
            padded = batch + [batch[-1]] * (size - len(batch))
            context, context_mask = data_lib.pad_rows([p.context for p in padded], evaluator.pad_id,
                                                      config.pad_multiple)
            question, question_mask = data_lib.pad_rows([p.question for p in padded], evaluator.pad_id, 8)
            context, context_mask, question, question_mask = methods_lib.committed(
                (jnp.asarray(context), jnp.asarray(context_mask), jnp.asarray(question), jnp.asarray(question_mask)))
            state = methods_lib.committed(capture_prefill_state(
                evaluator.base_model, evaluator.base_params, context, question, context_mask=context_mask,
                question_mask=question_mask, with_attention=evaluator.with_attention,
                lookahead=config.get("lookahead", 0), reconstruct=evaluator.reconstruct,
                keep_context_queries=evaluator.keep_context_queries))
            capacity = context.shape[1] + question.shape[1] + answer_slots
            evaluator.maybe_diagnose(state, context, context_mask, len(batch), capacity)
            yield PromptBatch(batch, context, context_mask, question, question_mask, state, capacity, bar)

