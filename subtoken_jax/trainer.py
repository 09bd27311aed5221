"""The training loop behind train.py: stages, jitted sharded steps, checkpoints, metrics.

A run is a sequence of stages (config.stages):
  pretrain - every parameter of a fresh decoder trains (no routing);
  adapt    - the base is frozen (from the pretrain stage or a Hugging Face folder); LoRA (plain or
             routed subspace) and the value-group routers train under a budget sampled per batch.
Each stage writes DIR/<stage>/: checkpoints, metrics.jsonl, and its final params.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from subtoken_jax import checkpoint as ckpt_lib
from subtoken_jax import data as data_lib
from subtoken_jax import sharding as sharding_lib
from subtoken_jax import workdir as workdir_lib
from subtoken_jax.config_checks import check_ranges
from subtoken_jax.errors import CheckpointError, ConfigError
from subtoken_jax.lora import combine_params
from subtoken_jax.model import DecoderLM
from subtoken_jax.model_config import ModelConfig, RoutingConfig, check_budget
from subtoken_jax.objectives import LossWeights, eval_step, train_step
from subtoken_jax.workdir import (adapted_model_config, base_model_config, fresh_adapter, has_checkpoint_steps,
                                  load_base, load_workdir_base, make_tokenizer)

STAGES = ("pretrain", "adapt")


# ----------------------------------------------------------------------------- config -> typed objects


def validate_config(config: ConfigDict) -> None:
    """Fails fast, with one line, on anything that would otherwise fail (or silently misbehave) later."""
    check_ranges(config)  # every numeric field in its range (subtoken_jax/config_checks.py)
    unknown = set(config.stages) - set(STAGES)
    if unknown or not config.stages:
        raise ConfigError(f"config.stages={tuple(config.stages)} must be a non-empty sequence of {STAGES}")
    if config.model.checkpoint:
        from subtoken_jax.pretrained import resolve_checkpoint

        try:  # an HF folder, a .gguf file or a registered name
            resolve_checkpoint(config.model.checkpoint)
        except CheckpointError as error:
            raise ConfigError(f"model.checkpoint: {error}") from None
    if "pretrain" not in config.stages and not config.model.checkpoint:
        raise ConfigError("stage 'adapt' needs a base: set model.checkpoint to a Hugging Face folder, a .gguf file or a "
                          "registered name, or add 'pretrain' "
                          "to config.stages")
    if "pretrain" in config.stages and config.model.checkpoint:
        raise ConfigError("stage 'pretrain' trains from scratch; drop it from config.stages when model.checkpoint is set")
    for budget in list(config.eval_budgets) + list(config.adapt.budgets):
        check_budget(budget, "budget")
    base = base_model_config(config)
    if config.seq_len > base.max_position_embeddings:
        raise ConfigError(f"seq_len={config.seq_len} exceeds model max_position_embeddings="
                          f"{base.max_position_embeddings}")
    if "adapt" in config.stages:
        adapted_model_config(config, base)  # checks lora and routing fields
    data_lib.check_data_config(config.data)


def make_optimizer(stage: ConfigDict, total_steps: int, grad_clip: float) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, stage.learning_rate, stage.warmup_steps,
                                                  max(total_steps, stage.warmup_steps + 1), stage.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=stage.weight_decay))


def budget_for_step(budgets, seed: int, step: int) -> float:
    """The value budget of a step: drawn from `budgets`, reproducibly from (seed, step) so resume matches."""
    budgets = tuple(budgets)
    return float(budgets[np.random.default_rng([seed, step]).integers(len(budgets))])


# ----------------------------------------------------------------------------- the loop


class MetricsWriter:
    """Metrics as JSON lines in the stage folder, and to TensorBoard if its package is installed."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "metrics.jsonl")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter  # optional

            self._tb = SummaryWriter(os.path.join(folder, "tb"))
        except ImportError:
            pass

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)


class NonFiniteLossError(RuntimeError):
    """Training diverged; the message names the last good checkpoint, which is kept."""


def _diverged(stage: str, what: str, step: int, manager, folder: str) -> NonFiniteLossError:
    manager.wait_until_finished()
    return NonFiniteLossError(f"{stage}: {what} at step {step}; the last good checkpoint (step "
                              f"{manager.latest_step()}) is kept in {folder}. Lower the learning rate or check the data.")


def run_stage(name: str, config: ConfigDict, workdir: str, model: DecoderLM, trainable, frozen, mesh,
              train_iter, eval_fn, *, budgets, base_fingerprint: Optional[Dict[str, Any]] = None):
    """Trains `trainable` (with `frozen` fixed) for config.<name>.steps; resumes from DIR/<name> if present."""
    stage = config[name]
    folder = os.path.join(workdir, name)
    os.makedirs(folder, exist_ok=True)
    tx = make_optimizer(stage, stage.steps, config.grad_clip)
    weights = LossWeights(budget=config.adapt.budget_loss_weight, balance=config.adapt.balance_loss_weight)

    t_sh = sharding_lib.tree_shardings(model, trainable, mesh)
    f_sh = sharding_lib.tree_shardings(model, frozen, mesh)
    # shard_tree copies: device_put may alias its input, and donation would then delete the caller's arrays
    trainable = sharding_lib.shard_tree(trainable, t_sh)
    frozen = sharding_lib.shard_tree(frozen, f_sh)
    o_sh = sharding_lib.opt_state_shardings(tx, trainable, t_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
    b_sh = sharding_lib.batch_sharding(mesh)
    rep = sharding_lib.replicated(mesh)

    step_fn = jax.jit(lambda t, f, o, b, budget, rng: train_step(model, tx, weights, t, f, o, b, budget, rng),
                      in_shardings=(t_sh, f_sh, o_sh, b_sh, rep, rep), out_shardings=(t_sh, o_sh, rep),
                      donate_argnums=(0, 2))

    manager = ckpt_lib.Checkpointer(os.path.join(folder, "checkpoints"), max_to_keep=config.keep_checkpoints)
    start = 0
    if manager.latest_step() is not None:
        restored = manager.restore(trainable=trainable, opt_state=opt_state, data_iterator=train_iter,
                                   base_fingerprint=base_fingerprint)
        trainable, opt_state, start = restored.trainable, restored.opt_state, restored.step
        trainable = sharding_lib.shard_tree(trainable, t_sh)
        opt_state = sharding_lib.shard_tree(opt_state, o_sh)
        logging.info("%s: resumed from step %d", name, start)

    writer = MetricsWriter(folder)
    bar = tqdm(range(start, stage.steps), desc=name, initial=start, total=stage.steps, dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0.0
    for step in bar:
        batch = jax.device_put(next(train_iter), b_sh)
        budget = jnp.float32(budget_for_step(budgets, config.seed, step))
        rng = jax.random.fold_in(jax.random.key(config.seed), step)
        trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state, batch, budget, rng)
        done = step + 1
        if done % config.log_every == 0 or done == stage.steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            if not math.isfinite(metrics["loss"]):
                raise _diverged(name, f"loss became {metrics['loss']}", done, manager, folder)
            window_tokens += metrics["tokens"] * config.log_every
            elapsed = time.perf_counter() - window_start
            metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
            metrics["budget"] = float(budget)
            window_start, window_tokens = time.perf_counter(), 0.0
            writer.write(done, metrics)
            bar.set_postfix(loss=f"{metrics['ce']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                            rho=f"{metrics['value_budget']:.2f}")
        if done % config.checkpoint_every == 0 or done == stage.steps:
            if not ckpt_lib.all_finite(trainable):  # never overwrite good checkpoints with diverged params
                raise _diverged(name, "parameters became non-finite", done, manager, folder)
            eval_loss = evaluate(model, combine_params(trainable, frozen), eval_fn, budget=1.0)["loss"]
            if not math.isfinite(eval_loss):
                raise _diverged(name, f"eval loss became {eval_loss}", done, manager, folder)
            manager.save(done, trainable=trainable, opt_state=opt_state, data_iterator=train_iter,
                         config=config.to_dict(), metric=eval_loss, base_fingerprint=base_fingerprint)
            writer.write(done, {"eval_loss": eval_loss})
    manager.close()
    return trainable


def evaluate(model: DecoderLM, params, eval_fn, budget: float) -> Dict[str, float]:
    """Token-weighted mean loss and perplexity over the evaluation batches at one value budget."""
    step = _jitted_eval(model)
    total, count, kept = 0.0, 0.0, []
    for batch in eval_fn():
        nll, tokens, realised = step(params, batch, jnp.float32(budget))
        total, count = total + float(nll), count + float(tokens)
        kept.append(float(realised))
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count,
            "value_budget": sum(kept) / max(len(kept), 1)}  # realised: adaptive routing meets rho on average


_EVAL_CACHE: Dict[DecoderLM, Any] = {}


def _jitted_eval(model: DecoderLM):
    if model not in _EVAL_CACHE:
        _EVAL_CACHE[model] = jax.jit(lambda p, b, budget: eval_step(model, p, b, budget))
    return _EVAL_CACHE[model]


# ----------------------------------------------------------------------------- whole runs


def fresh_params(cfg: ModelConfig, seed: int, seq_len: int):
    model = DecoderLM(cfg)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))
    return model, nn.meta.unbox(variables["params"])


def run(config: ConfigDict, workdir: str) -> Dict[str, Any]:
    """Runs every configured stage, then evaluates perplexity at each budget; returns the summary.

    Holds WORKDIR's lock for the whole run (one run per workdir; on process 0 of a multi-host job).
    """
    validate_config(config)
    sharding_lib.maybe_initialize_distributed(config)
    primary = jax.process_index() == 0  # the process that locks and writes the workdir's record
    with workdir_lib.WorkdirLock(workdir) if primary else contextlib.nullcontext():
        workdir_lib.check_same_run(config, workdir, has_checkpoints=any(
            has_checkpoint_steps(os.path.join(workdir, stage, "checkpoints")) for stage in STAGES))
        if primary:
            workdir_lib.write_config(config, workdir)
        return _run_stages(config, workdir)


def skipped_stage_notes(config: ConfigDict) -> list:
    """What a run with a stage of 0 steps does instead (config_checks allows steps=0: skip the stage)."""
    notes = []
    if "pretrain" in config.stages and config.pretrain.steps == 0:
        notes.append("pretrain.steps=0: the pretrain stage is skipped; the base keeps its random initialisation")
    if "adapt" in config.stages and config.adapt.steps == 0:
        notes.append("adapt.steps=0: the adapt stage is skipped; its router and LoRA are untrained (the rows say so)")
    return notes


def _run_stages(config: ConfigDict, workdir: str) -> Dict[str, Any]:
    notes = skipped_stage_notes(config)
    for note in notes:
        logging.warning(note)
    mesh = sharding_lib.make_mesh(config.mesh)
    tokenizer = make_tokenizer(config)
    train_iter, eval_fn = data_lib.build_datasets(config.data, tokenizer, config.seq_len, config.batch_size,
                                                  config.seed)
    base_cfg = base_model_config(config)
    summary: Dict[str, Any] = {"workdir": workdir, "notes": notes}

    with sharding_lib.use_mesh(mesh):
        if config.model.checkpoint:
            base_params, _ = load_base(config.model.checkpoint, base_cfg)
            base_model = DecoderLM(base_cfg)
        elif config.pretrain.get("init_from", ""):  # warm start (a resumed stage overrides it)
            init_from = config.pretrain.init_from
            base_model, base_params, _, _, _ = load_workdir_base(init_from)
            if base_model.config != base_cfg:
                raise ConfigError(f"pretrain.init_from={init_from!r} holds a different model ({base_model.config}); "
                                  f"this run's model is {base_cfg}")
        else:  # validate_config: without model.checkpoint, the pretrain stage runs
            base_model, base_params = fresh_params(base_cfg, config.seed, config.seq_len)
        if "pretrain" in config.stages:
            base_params = run_stage("pretrain", config, workdir, base_model, base_params, {}, mesh, train_iter,
                                    eval_fn, budgets=(1.0,))
            summary["pretrain"] = evaluate(base_model, base_params, eval_fn, 1.0)
        if "adapt" in config.stages:
            adapted_cfg = adapted_model_config(config, base_cfg)
            adapted_model = DecoderLM(adapted_cfg)
            trainable, frozen, fingerprint = fresh_adapter(adapted_cfg, base_params, config)
            budgets = (adapted_cfg.default_value_budget,) if adapted_cfg.routing.k else config.adapt.budgets
            trainable = run_stage("adapt", config, workdir, adapted_model, trainable, frozen, mesh, train_iter,
                                  eval_fn, budgets=budgets, base_fingerprint=fingerprint)
            summary["budgets"] = budget_table(config, base_cfg, adapted_cfg, base_params,
                                              combine_params(trainable, frozen), eval_fn)
    with open(os.path.join(workdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def budget_table(config, base_cfg, adapted_cfg, base_params, adapted_params, eval_fn):
    """Eval perplexity at each value budget: the trained router vs parameter-free baselines on the same base."""
    mode = adapted_cfg.routing.mode
    untrained = " (untrained: adapt.steps=0)" if config.adapt.steps == 0 else ""
    methods = {
        f"routed ({mode}) + routed LoRA{untrained}": (DecoderLM(adapted_cfg), adapted_params),
        "keep-largest-norm groups": (DecoderLM(base_cfg.replace(routing=RoutingConfig(mode="fixed_k", scorer="norm"))),
                                     base_params),
        "random groups": (DecoderLM(base_cfg.replace(routing=RoutingConfig(mode="fixed_k", scorer="random"))),
                          base_params),
    }
    rows = []
    for budget in tqdm(config.eval_budgets, desc="eval budgets"):
        for method, (model, params) in methods.items():
            result = evaluate(model, params, eval_fn, budget)
            rows.append({"method": method, "budget": float(budget), **result})
    return rows


def format_summary(summary: Dict[str, Any]) -> str:
    """A markdown table of perplexity by method and budget."""
    lines = [f"note: {note}" for note in summary.get("notes", [])]
    if "pretrain" in summary:
        lines.append(f"base model (pretrain stage): eval perplexity {summary['pretrain']['perplexity']:.3f}")
    rows = summary.get("budgets", [])
    if rows:
        budgets = sorted({r["budget"] for r in rows}, reverse=True)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        lines.append("| method | " + " | ".join(f"rho={b:g}" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for method in methods:
            cells = {r["budget"]: r for r in rows if r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(_cell(cells[b]) for b in budgets) + " |")
        lines.append(routing_verdict(rows))
    return "\n".join(lines)


def _cell(row: Dict[str, Any]) -> str:
    """Perplexity, and the realised kept fraction where it is not the asked budget (adaptive routing)."""
    text = f"{row['perplexity']:.3f}"
    if abs(row.get("value_budget", row["budget"]) - row["budget"]) >= 0.0005:
        text += f" (kept {row['value_budget']:.3f})"
    return text


def routing_verdict(rows) -> str:
    """One line: the budgets where the routed row beats every baseline, and those where it does not."""
    routed = [r for r in rows if r["method"].startswith("routed")]
    if not routed:
        return ""
    wins, losses = [], []
    for r in sorted(routed, key=lambda r: -r["budget"]):
        rivals = [o["perplexity"] for o in rows if o["budget"] == r["budget"] and not o["method"].startswith("routed")]
        (wins if rivals and r["perplexity"] < min(rivals) else losses).append(f"{r['budget']:g}")
    said = f"routing beats every baseline at rho = {', '.join(wins)}" if wins else "routing beats no baseline"
    if losses:
        said += f"; not at rho = {', '.join(losses)}"
        if "1" in losses:
            said += " (at rho = 1 nothing is dropped: the gap there is what the shared adapter costs)"
    return said + "."
