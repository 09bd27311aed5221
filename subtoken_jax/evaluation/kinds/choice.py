"""Multiple choice (MMLU): the letter whose " A".." D" continuation is most likely after the compressed
context and the question, per plan."""

from __future__ import annotations

from typing import List

import jax.numpy as jnp
import numpy as np

from subtoken_jax import sharding
from subtoken_jax.evaluation import methods as methods_lib
from subtoken_jax.evaluation import tasks as tasks_lib
from subtoken_jax.evaluation.kinds.prompt_batches import prompt_batches
from subtoken_jax.evaluation.kinds.scoring import PlanScores, check_prompt_lengths


class MultipleChoice:
    def inputs(self, task: str, config, source) -> List[tasks_lib.Prompt]:
        return tasks_lib.build_prompts(task, config, source.tokenizer, source.bos, source.chat)

    def check_lengths(self, task: str, prompts, source, config) -> None:
        options = tasks_lib.choice_tokens(source.tokenizer)
        check_prompt_lengths(task, prompts, max(len(o) for o in options), source)

    def evaluate(self, evaluator, task: str, prompts: List[tasks_lib.Prompt]):
        options = tasks_lib.choice_tokens(evaluator.source.tokenizer)
        lengths = tuple(len(o) for o in options)
        padded = np.zeros((len(options), max(lengths)), np.int32)
        for k, o in enumerate(options):
            padded[k, :len(o)] = o
        options_ids = methods_lib.committed(jnp.asarray(padded))
        shared = len(set(lengths)) == 1 and len({tuple(o[:-1]) for o in options}) == 1  # one prefix, one last token
        scores = PlanScores(evaluator.plans)
        for batch in prompt_batches(evaluator, task, prompts, max(lengths)):
            for plan in evaluator.plans:
                model, params, cache, tokens, groups = evaluator.masks_and_cache(plan, batch)
                scores.add_bytes(plan, tokens, groups, batch, model)
                t_masks, g_masks = methods_lib.widen_masks(tokens, groups, batch.capacity)
                loglik = sharding.to_host(methods_lib.choice_loglik(model, params, cache, batch.question,
                                                              batch.state.query_positions, t_masks, g_masks,
                                                              options_ids, lengths, shared))
                for prompt, row in zip(batch.prompts, loglik):
                    predicted = tasks_lib.LETTERS[int(np.argmax(row))]
                    correct = predicted == prompt.answer
                    scores.add(plan, correct, {"task": task, "method": plan.method, "budget": plan.budget,
                                               "prediction": predicted, "answer": prompt.answer,
                                               "correct": bool(correct), "loglik": [round(float(v), 5) for v in row],
                                               **prompt.info})
                batch.tick()
        return scores.records(task, len(prompts)), scores.examples
