"""Generation tasks (needle and its RULER variants, variable tracking): a greedy answer per plan, from the
packed cache (generation="packed") or a dense cache under the masks ("masked"), scored by exact match; with
config answer_nll, also how likely each plan's cache keeps the full cache's own answer (teacher-forced NLL)."""

from __future__ import annotations

from typing import List

import jax.numpy as jnp
import numpy as np

from subtoken_jax.compressed_generate import generate_from_state
from subtoken_jax import sharding
from subtoken_jax.evaluation import methods as methods_lib
from subtoken_jax.evaluation import tasks as tasks_lib
from subtoken_jax.evaluation.kinds.prompt_batches import prompt_batches
from subtoken_jax.evaluation.kinds.scoring import PlanScores, check_prompt_lengths
from subtoken_jax.model import default_positions
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
        fidelity = bool(config.get("answer_nll", False))
        for batch in prompt_batches(evaluator, task, prompts, new_tokens):
            reference = full_cache_answers(evaluator, batch, new_tokens) if fidelity else None
            for plan in evaluator.plans:
                packed = plan.method not in methods_lib.ROUTER_METHODS and config.generation == "packed"
                model, params, cache, tokens, groups = evaluator.masks_and_cache(plan, batch, need_cache=not packed)
                scores.add_bytes(plan, tokens, groups, batch, model)
                if packed:
                    capacity, key_capacity = bucketed_sizes(tokens, groups, batch.state.positions)
                    over = config.get("question_over", "compressed")
                    # "full": the state's question, prefilled over the full context, goes to the tail as it is
                    question = (dict(question_ids=batch.question, question_mask=batch.question_mask)
                                if over == "compressed" else {})
                    out, _ = generate_from_state(model, params, batch.state, (tokens, groups), max_new_tokens=new_tokens,
                                                 capacity=capacity, key_capacity=key_capacity,
                                                 value_fill=config.get("value_fill", "zero"), question_over=over,
                                                 **question)
                else:
                    t_masks, g_masks = methods_lib.widen_masks(tokens, groups, batch.capacity)
                    out = methods_lib.greedy_answer(model, params, cache, batch.question, question_positions(batch),
                                                    t_masks, g_masks, new_tokens)
                nll = answer_likelihood(model, params, cache, tokens, groups, batch, reference) if fidelity else None
                for i, (prompt, row) in enumerate(zip(batch.prompts, sharding.to_host(out))):
                    text = evaluator.decode(own_budget(row, prompt, config))
                    correct = tasks_lib.score(task, text, prompt.answer, evaluator.source.chat)
                    extra = {} if nll is None else {"answer_nll": float(nll[i]),
                                                    "answer_nll_tokens": int(reference[2][i])}
                    scores.add(plan, correct, {"task": task, "method": plan.method, "budget": plan.budget,
                                               "prediction": text, "answer": prompt.answer, "correct": bool(correct),
                                               **extra, **prompt.info})
                batch.tick()
        return scores.records(task, len(prompts)), scores.examples


def question_positions(batch):
    """The question's positions [B, Q] after the context (left padding: -1), as the prefill gave them. Not
    state.query_positions: with a lookahead that window also holds the drafted tokens' positions."""
    return default_positions(batch.question, batch.question_mask,
                             jnp.max(batch.state.positions, axis=1, keepdims=True) + 1)


def full_cache_answers(evaluator, batch, new_tokens: int):
    """The full cache's greedy answers of a batch, the reference of `answer_likelihood`: (ids [B, new_tokens],
    question positions [B, Q], lengths [B]: each row's own budget, cut after its first end-of-sequence token)."""
    model, params, state = evaluator.base_model, evaluator.base_params, batch.state
    q_positions = question_positions(batch)
    cache = methods_lib.cache_from_state(state, model.config, batch.capacity)
    t_masks, g_masks = methods_lib.widen_masks(*methods_lib.real_masks(state), batch.capacity)
    ids = methods_lib.greedy_answer(model, params, cache, batch.question, q_positions, t_masks, g_masks, new_tokens)
    rows = sharding.to_host(ids)
    eos = getattr(evaluator.source.tokenizer, "eos_id", None)
    padded = batch.prompts + [batch.prompts[-1]] * (len(rows) - batch.rows)
    lengths = []
    for prompt, row in zip(padded, rows):
        length = tasks_lib.new_tokens(prompt, evaluator.config.extra_new_tokens)
        ended = np.flatnonzero(row[:length] == eos) if eos is not None else []
        lengths.append(int(ended[0]) + 1 if len(ended) else length)
    return ids, q_positions, np.asarray(lengths, np.int32)


def answer_likelihood(model, params, cache, tokens, groups, batch, reference):
    """Summed NLL [B] (host) of the full cache's answer (`full_cache_answers`) over one plan's masked cache.
    A continuous, paired measure of what a compression changes, where exact match only sees a flipped answer."""
    ids, q_positions, lengths = reference
    if cache is None:  # packed generation builds no dense cache; the masked one is the same attention
        cache = methods_lib.cache_from_state(batch.state, model.config, batch.capacity)
    t_masks, g_masks = methods_lib.widen_masks(tokens, groups, batch.capacity)
    return sharding.to_host(methods_lib.answer_nll(model, params, cache, batch.question, q_positions, ids,
                                                   jnp.asarray(lengths), t_masks, g_masks))


def own_budget(row, prompt, config):
    """A generated row cut to its prompt's own budget (`tasks.new_tokens`): the task's prompts are
    generated for the longest budget among them, and greedy decoding is causal, so the cut is exactly what a run
    of this prompt alone generates. Without it an answer would depend on which prompts it was evaluated with
    (and differ from another implementation's, e.g. kvpress's, given the prompt's own budget)."""
    return row[:tasks_lib.new_tokens(prompt, config.extra_new_tokens)]
