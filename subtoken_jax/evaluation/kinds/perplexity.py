"""Perplexity: exp(mean NLL) of each chunk's continuation after its compressed first prefix_fraction
(query-aware selectors observe the prefix's last `window` tokens)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from subtoken_jax.compression import realised_kv_bytes
from subtoken_jax.errors import InputError
from subtoken_jax import sharding
from subtoken_jax.evaluation import methods as methods_lib
from subtoken_jax.evaluation import tasks as tasks_lib
from subtoken_jax.evaluation.kinds.scoring import PlanScores
from subtoken_jax.selectors import capture_prefill_state


class Perplexity:
    def inputs(self, task: str, config, source) -> np.ndarray:
        return tasks_lib.perplexity_sequences(config.perplexity, source.tokenizer)

    def check_lengths(self, task: str, sequences, source, config) -> None:
        limit = source.base_cfg.max_position_embeddings
        if config.perplexity.seq_len > limit:
            raise InputError(f"perplexity.seq_len={config.perplexity.seq_len} exceeds the model's "
                             f"max_position_embeddings={limit}")

    def evaluate(self, evaluator, task: str, sequences: np.ndarray):
        cfg = evaluator.config.perplexity
        length = sequences.shape[1] - 1
        prefix = tasks_lib.prefix_length(length, cfg.prefix_fraction)
        scores = PlanScores(evaluator.plans)
        nll = {(p.method, p.budget): [0.0, 0.0] for p in evaluator.plans}
        size = sharding.batch_rows(min(evaluator.config.batch_size, len(sequences)))  # whole rows per device
        batches = [sequences[i:i + size] for i in range(0, len(sequences), size)]
        bar = tqdm(total=len(batches) * len(evaluator.plans), desc="perplexity", dynamic_ncols=True)
        examples, first = [], 0
        for batch in batches:
            rows = len(batch)  # a short last batch repeats its last sequence: one compilation for all batches
            batch = np.concatenate([batch, np.repeat(batch[-1:], size - rows, axis=0)])
            inputs, targets = batch[:, :length], batch[:, 1:]
            context, context_mask = inputs[:, :prefix], np.ones((len(batch), prefix), np.int32)
            context, context_mask = methods_lib.committed((jnp.asarray(context), jnp.asarray(context_mask)))
            inputs, targets = methods_lib.committed((jnp.asarray(inputs), jnp.asarray(targets)))
            state = methods_lib.committed(capture_prefill_state(
                evaluator.base_model, evaluator.base_params, context, None, window=min(cfg.window, prefix),
                with_attention=evaluator.with_attention, reconstruct=evaluator.reconstruct,
                keep_context_queries=evaluator.keep_context_queries))
            evaluator.maybe_diagnose(state, context, context_mask, rows, length)
            positions = methods_lib.committed(
                jnp.broadcast_to(jnp.arange(prefix, length, dtype=jnp.int32), (len(batch), length - prefix)))
            for plan in evaluator.plans:
                model, params, cache, tokens, groups = evaluator.plan_masks_and_cache(plan, state, context,
                                                                                      context_mask, length)
                scores.add_accounting(plan, realised_kv_bytes(tokens, groups, state.positions,
                                                              model.config, rows), float(rows * prefix))
                t_masks, g_masks = methods_lib.widen_masks(tokens, groups, length)
                total, count = methods_lib.continuation_nll(model, params, cache, inputs[:, prefix:], positions,
                                                            targets[:, prefix:], t_masks, g_masks)
                total, count = sharding.to_host(total)[:rows], sharding.to_host(count)[:rows]
                nll[plan.method, plan.budget][0] += float(total.sum())
                nll[plan.method, plan.budget][1] += float(count.sum())
                # per sequence, so methods can be compared pairwise (same sequences, same tokens)
                examples += [{"task": task, "method": plan.method, "budget": plan.budget, "sequence": first + i,
                              "nll": float(total[i]), "tokens": float(count[i])} for i in range(rows)]
                bar.update()
            first += rows
        bar.close()
        ppl = {key: math.exp(min(total / max(count, 1.0), 50.0)) for key, (total, count) in nll.items()}
        return scores.records(task, len(sequences), ppl), examples
