"""Generation tasks (needle and its RULER variants, variable tracking): a greedy answer per plan, from the
packed cache (generation="packed") or a dense cache under the masks ("masked"), scored by exact match."""

from __future__ import annotations

from typing import List


from subtoken_jax.compressed_generate import generate_from_state
from subtoken_jax import sharding
from subtoken_jax.evaluation import methods as methods_lib
from subtoken_jax.evaluation import tasks as tasks_lib
from subtoken_jax.evaluation.kinds.prompt_batches import prompt_batches
from subtoken_jax.evaluation.kinds.scoring import PlanScores, check_prompt_lengths
from subtoken_jax.packed_cache import bucketed_sizes


class Generation:
    def inputs(self, task: str, config, source) -> List[tasks_lib.Prompt]:
        return tasks_lib.build_prompts(task, config, source.tokenizer, source.bos, source.chat)

    def answer_slots(self, prompts, config, source) -> int:
        """One generation length per task (not per batch): fewer compilations. Each answer is then cut to its own
        prompt's budget (`own_budget`)."""
        return max(tasks_lib.new_tokens(p, config.extra_new_tokens) for p in prompts)

    def check_lengths(self, task: str, prompts, source, config) -> None:
        check_prompt_lengths(task, prompts, self.answer_slots(prompts, config, source), source)

    def evaluate(self, evaluator, task: str, prompts: List[tasks_lib.Prompt]):
        config = evaluator.config
        new_tokens = self.answer_slots(prompts, config, evaluator.source)
        scores = PlanScores(evaluator.plans)
        for batch in prompt_batches(evaluator, task, prompts, new_tokens):
            for plan in evaluator.plans:
                packed = plan.method not in methods_lib.ROUTER_METHODS and config.generation == "packed"
                model, params, cache, tokens, groups = evaluator.masks_and_cache(plan, batch, need_cache=not packed)
                scores.add_bytes(plan, tokens, groups, batch, model)
                if packed:
                    capacity, key_capacity = bucketed_sizes(tokens, groups, batch.state.positions)
                    out, _ = generate_from_state(model, params, batch.state, (tokens, groups), max_new_tokens=new_tokens,
                                                 question_ids=batch.question, question_mask=batch.question_mask,
                                                 capacity=capacity, key_capacity=key_capacity,
                                                 value_fill=config.get("value_fill", "zero"))
                else:
                    t_masks, g_masks = methods_lib.widen_masks(tokens, groups, batch.capacity)
                    out = methods_lib.greedy_answer(model, params, cache, batch.question, batch.state.query_positions,
                                                    t_masks, g_masks, new_tokens)
                for prompt, row in zip(batch.prompts, sharding.to_host(out)):
                    text = evaluator.decode(own_budget(row, prompt, config))
                    correct = tasks_lib.score(task, text, prompt.answer, evaluator.source.chat)
                    scores.add(plan, correct, {"task": task, "method": plan.method, "budget": plan.budget,
                                               "prediction": text, "answer": prompt.answer, "correct": bool(correct),
                                               **prompt.info})
                batch.tick()
        return scores.records(task, len(prompts)), scores.examples


def own_budget(row, prompt, config):
    """A generated row cut to its prompt's own budget (`tasks.new_tokens`): the task's prompts are
    generated for the longest budget among them, and greedy decoding is causal, so the cut is exactly what a run
    of this prompt alone generates. Without it an answer would depend on which prompts it was evaluated with
    (and differ from another implementation's, e.g. kvpress's, given the prompt's own budget)."""
    return row[:tasks_lib.new_tokens(prompt, config.extra_new_tokens)]
