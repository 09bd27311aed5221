"""The evaluation behind eval.py: resolve the model, build every task's inputs, check them, then evaluate.

Order of work (every bad input fails with one line before any model compute):
  1. validate the config (tasks, methods, budgets, task options, files);
  2. resolve the model: a training workdir (DIR/config.json; base = the pretrain stage's final params in
     DIR/pretrain/checkpoints, or the Hugging Face base it adapted) or a Hugging Face folder
     (model.checkpoint); the routed model = DIR/adapt/checkpoints when present;
  3. build prompts / text chunks and check their lengths against max_position_embeddings;
  4. load weights, then for each task and batch: capture_prefill_state(context, question) once, and for
     each (method, budget): masks, then the answer generated from the context packed under them
     (generate_from_state: only the kept keys and value groups are stored; question and answer tokens
     uncompressed), or with generation="masked" through a dense KVCache holding the context under the
     masks (the reference path; the routed model always uses it, its masks come from its own routers);
  5. write DIR/eval/: results.json / .csv / .md, examples.jsonl, PNG plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from subtoken_jax import packed_cache
from subtoken_jax import sharding
from subtoken_jax import workdir as workdir_lib
from subtoken_jax.compressed_generate import QUESTION_OVER
from subtoken_jax.config_checks import check_ranges
from subtoken_jax.errors import CheckpointError, ConfigError
from subtoken_jax.evaluation import kinds
from subtoken_jax.evaluation import methods as methods_lib
from subtoken_jax.evaluation import plots as plots_lib
from subtoken_jax.evaluation import report as report_lib
from subtoken_jax.evaluation import tasks as tasks_lib
from subtoken_jax.model import DecoderLM
from subtoken_jax.model_config import ModelConfig, check_budget
from subtoken_jax.selectors import needs_context_queries
from subtoken_jax.selectors import predictor as predictor_lib
from subtoken_jax.workdir import WorkdirLock

# ----------------------------------------------------------------------------- config checks


def validate(config: ConfigDict) -> None:
    """One-line ConfigError / InputError for anything unusable in the eval config."""
    check_ranges(config)  # every numeric field in its range (subtoken_jax/config_checks.py)
    unknown = [t for t in config.tasks if t not in tasks_lib.TASKS]
    if unknown or not config.tasks:
        raise ConfigError(f"unknown task(s) {unknown or '(none given)'}; choose from: {', '.join(tasks_lib.TASKS)}")
    methods_lib.check_method_config(config)
    if not config.budgets and not config.get("token_budgets"):
        raise ConfigError("budgets is empty; give fractions of KV bytes kept, in (0, 1] (or token_budgets)")
    for budget in config.budgets:
        check_budget(budget, "budget")
    if "combined" in config.methods:
        for budget in config.budgets:
            methods_lib.combined_split(float(budget), config.combined.value_fraction,
                                       tuple(config.combined.token_fractions))
    if config.generation not in ("packed", "masked"):
        raise ConfigError(f"generation must be 'packed' or 'masked', got {config.generation!r}")
    if "value_basis" in config and config.value_basis.calibration:
        if not os.path.isfile(config.value_basis.calibration):
            raise ConfigError(f"value_basis.calibration={config.value_basis.calibration!r} is not a file")
    fill = config.get("value_fill", "zero")
    if fill not in packed_cache.FILLS:
        raise ConfigError(f"value_fill={fill!r}: choose one of {', '.join(packed_cache.FILLS)}")
    # the answer NLL is teacher-forced over the masked dense cache, where dropped groups read as zero
    scored_dense = sorted(set(config.tasks) & {"perplexity", "mmlu"}) + ["answer_nll"] * bool(config.get("answer_nll"))
    if fill != "zero" and (config.generation != "packed" or scored_dense):
        raise ConfigError(f"value_fill={fill!r} applies to answers generated from the packed cache "
                          f"(generation='packed'); {', '.join(scored_dense) or 'generation=masked'} score through "
                          f"the masked dense cache: drop them or use value_fill='zero'")
    over = config.get("question_over", "compressed")
    if over not in QUESTION_OVER:
        raise ConfigError(f"question_over={over!r}: choose one of {', '.join(QUESTION_OVER)}")
    if over != "compressed" and (config.generation != "packed" or scored_dense):
        raise ConfigError(f"question_over={over!r} applies to answers generated from the packed cache "
                          f"(generation='packed'); {', '.join(scored_dense) or 'generation=masked'} read the question "
                          f"over the masked dense cache: drop them or use question_over='compressed'")
    for task in ("needle", "variable_tracking") + tuple(tasks_lib.MULTI_NEEDLE):
        if task in config.tasks:
            name = "multi_needle" if task in tasks_lib.MULTI_NEEDLE else task
            section = config[name]
            if not section.lengths:
                raise ConfigError(f"{name}.lengths is empty; give context lengths in tokens")
    if "needle" in config.tasks and not config.needle.depths:
        raise ConfigError("needle.depths is empty")
    if set(config.tasks) - {"perplexity", "mmlu"}:
        tasks_lib.read_haystack(config.get("haystack", ""))  # a missing or empty file fails here, before any compute
    if methods_lib.uses_predictor(config):
        if "perplexity" in config.tasks:
            raise ConfigError("the predictor scores against a question, and the perplexity task has none: drop "
                              "perplexity from tasks, or use scorer expected / attention there")
        folder = config.predictor.workdir
        predictor_lib.check_predictor_folder(folder, f"predictor.workdir={folder!r}")
    if "mmlu" in config.tasks:
        tasks_lib.mmlu_files(config.mmlu.files)  # every pattern must match a file


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Source:
    """Where the model comes from, known before any weight is read."""

    base_cfg: ModelConfig
    tokenizer: Any
    bos: bool
    chat: bool  # generation tasks are rendered with the tokenizer's chat template
    hf_folder: str  # the pretrained base: HF folder, GGUF file or registered name ("" = the workdir's pretrain stage)
    pretrain_dir: str  # DIR/pretrain/checkpoints when the base was trained here
    train_cfg: Optional[ConfigDict]  # DIR/config.json
    routed_cfg: Optional[ModelConfig]  # the adapted model, when DIR/adapt holds a checkpoint
    adapt_dir: str
    notes: List[str]


def resolve_source(config: ConfigDict, workdir: str) -> Source:
    from subtoken_jax.pretrained import load_tokenizer, pretrained_config, resolve_checkpoint

    notes: List[str] = []
    train_cfg = workdir_lib.read_workdir_config(workdir)
    pretrain_dir = ""
    if config.model.checkpoint:
        hf_folder = config.model.checkpoint
        base_cfg = pretrained_config(hf_folder, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                     value_groups=config.model.value_groups)
        tokenizer = load_tokenizer(hf_folder)
    else:
        if not os.path.isdir(workdir):
            raise CheckpointError(f"workdir {workdir!r} does not exist; train a model there with train.py, or set "
                                  "model.checkpoint to a Hugging Face folder")
        if train_cfg is None:
            raise CheckpointError(f"{workdir} has no config.json (train.py writes it); is it a training workdir? "
                                  "Or set model.checkpoint to a Hugging Face folder")
        base_cfg = workdir_lib.base_model_config(train_cfg)
        tokenizer = workdir_lib.make_tokenizer(train_cfg)
        hf_folder = train_cfg.model.checkpoint
        if hf_folder:
            resolve_checkpoint(hf_folder)  # the base the workdir adapted must still be there
        else:
            pretrain_dir = workdir_lib.pretrain_checkpoints(workdir)
    routed_cfg, adapt_dir = None, os.path.join(workdir, "adapt", "checkpoints")
    if any(m in config.methods for m in methods_lib.ROUTED_METHODS):
        if train_cfg is None or not workdir_lib.has_checkpoint_steps(adapt_dir):
            notes.append(f"routed: skipped, {adapt_dir} holds no adapted model")
        else:
            routed_cfg = workdir_lib.adapted_model_config(train_cfg, base_cfg)
            if not routed_cfg.routing.enabled:
                notes.append("routed: skipped, the adapted model has routing.mode='none'")
                routed_cfg = None
            elif routed_cfg.routing.mode == "adaptive" and config.get("routed", {}).get("exact_budget", True):
                # the context is known when it is compressed: meet rho exactly over it (per sequence and KV head)
                # rather than on average by the causal running threshold the router trained with
                rule = config.get("routed", {}).get("exact_rule", "calibrated")
                routed_cfg = routed_cfg.replace(routing=dataclasses.replace(routed_cfg.routing, exact_budget=True,
                                                                            exact_rule=rule))
                notes.append(f"routed (adaptive): rho met exactly over each context (routing.exact_budget, {rule})")
    bos = config.add_bos
    if bos is None:  # models trained here saw no BOS; a Hugging Face base gets one if its tokenizer adds it
        bos = bool(hf_folder) and _tokenizer_adds_bos(tokenizer)
    chat = config.get("chat_template")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ConfigError("chat_template=True but the model's tokenizer has no chat template")
    chat = has_template and bool(hf_folder) if chat is None else bool(chat)
    if hf_folder:
        notes.append(f"model: {hf_folder} ({base_cfg.architecture}, {base_cfg.num_layers} layers, "
                     f"G={base_cfg.value_groups} value groups per KV head)"
                     + ("; prompts rendered with its chat template" if chat else ""))
    return Source(base_cfg, tokenizer, bool(bos), chat, hf_folder, pretrain_dir, train_cfg, routed_cfg, adapt_dir,
                  notes)


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Whether a tokenizer.json's own post-processor prepends BOS (Llama's does, Qwen2's does not)."""
    inner, bos = getattr(tokenizer, "_tok", None), getattr(tokenizer, "bos_id", None)
    if inner is None or bos is None:
        return False
    ids = inner.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos


def load_models(config: ConfigDict, source: Source):
    """(base model, base params, routed model or None, routed params or None)."""
    base_model = DecoderLM(source.base_cfg)
    base_params, step = workdir_lib.load_base(source.hf_folder, source.base_cfg, source.pretrain_dir)
    planned = source.train_cfg.get("pretrain", {}).get("steps") if source.train_cfg and not source.hf_folder else None
    if planned and step < planned:
        source.notes.append(f"the pretrain stage is unfinished: evaluated its step {step} of {planned}")
    routed_model = routed_params = None
    if source.routed_cfg is not None:
        routed_model = DecoderLM(source.routed_cfg)
        routed_params = workdir_lib.restore_adapter(source.routed_cfg, base_params, source.train_cfg, source.adapt_dir)
    calibration = config.value_basis.calibration if "value_basis" in config else ""
    if calibration:  # after the routed model took the unrotated base: its adapters were trained on that basis
        base_params = rotated_value_basis(base_model, base_params, source.tokenizer, calibration,
                                          config.value_basis.tokens)
        source.notes.append(f"values of the base model rotated to their principal axes on {calibration} "
                            f"({config.value_basis.tokens} tokens; subtoken_jax/value_basis.py); routed unrotated")
    return base_model, base_params, routed_model, routed_params


def rotated_value_basis(model: DecoderLM, params, tokenizer, path: str, tokens: int):
    """params with PCA value rotations fitted on the first `tokens` tokens of a text file (same model function)."""
    from subtoken_jax.value_basis import fit_value_rotations, rotate_value_basis

    with open(path, encoding="utf-8") as fh:
        text = fh.read(max(64, tokens) * 16)  # ample characters for `tokens` tokens
    ids = tokenizer.encode(text)[: min(tokens, model.config.max_position_embeddings)]
    return rotate_value_basis(model.config, params, fit_value_rotations(model, params, jnp.asarray([ids])))


# ----------------------------------------------------------------------------- batching helpers


def _decode_text(tokenizer, ids) -> str:
    ids = [int(i) for i in ids]
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode(ids)


@dataclasses.dataclass
class Evaluator:
    config: ConfigDict
    source: Source
    base_model: DecoderLM
    base_params: Any
    routed_model: Optional[DecoderLM]
    routed_params: Any
    plans: List[methods_lib.Plan]
    diagnostic: Any = None  # (masks by name, layer, head, title) for plots.value_group_diagnostic

    def __post_init__(self):
        self.selectors = methods_lib.make_selectors(self.config)
        self.scorers = {}
        if methods_lib.uses_predictor(self.config):
            module, params = predictor_lib.load_predictor(self.config.predictor.workdir, self.base_model.config)
            predictor = (module, sharding.replicate(params))  # small: every device holds it
            self.scorers["predictor"] = predictor_lib.predictor_scorer(*predictor)
            self.selectors["predictor"] = predictor_lib.PredictorSelector(*predictor)
        names = {p.method for p in self.plans}
        self.group_baselines = {m: methods_lib.group_baseline_model(m, self.base_model.config)
                                for m in names & set(methods_lib.GROUP_BASELINES)}
        self.with_attention = "h2o" in names or ("combined" in names and self.config.combined.selector == "h2o")
        self.reconstruct = (tasks_lib.repeat_prompt(self.source.tokenizer, self.source.chat)
                            if methods_lib.uses_kvzip(self.config, names) else None)
        selector_names = names | ({self.config.combined.selector} if "combined" in names else set())
        self.keep_context_queries = any(needs_context_queries(self.selectors.get(n)) for n in selector_names)
        self.pad_id = self.source.tokenizer.pad_id if getattr(self.source.tokenizer, "pad_id", None) is not None else 0

    # ----------------------------------------------------------- per plan: masks and the cache they apply to

    def plan_masks_and_cache(self, plan, state, context, context_mask, capacity, need_cache: bool = True):
        """(model, params, cache, context token masks, context group masks) of one plan (cache None unless
        need_cache: packed generation builds its own)."""
        if plan.method in methods_lib.ROUTER_METHODS:
            model, params = ((self.routed_model, self.routed_params) if plan.method in methods_lib.ROUTED_METHODS
                             else (self.group_baselines[plan.method], self.base_params))
            cache, groups = methods_lib.routed_prefill(model, params, context, context_mask,
                                                       methods_lib.committed(jnp.float32(plan.value_fraction)),
                                                       capacity)
            tokens, _ = methods_lib.real_masks(state)
            if plan.method == "routed_tokens":
                tokens, groups = methods_lib.routed_token_masks(state, cache, groups, plan, self.config, self.selectors)
            return model, params, cache, tokens, groups
        tokens, groups = methods_lib.build_masks(state, plan, self.config, self.selectors, self.scorers)
        cache = methods_lib.cache_from_state(state, self.base_model.config, capacity) if need_cache else None
        return self.base_model, self.base_params, cache, tokens, groups

    def masks_and_cache(self, plan, batch, need_cache: bool = True):
        """plan_masks_and_cache over a prompt batch (kinds.prompt_batches.PromptBatch)."""
        return self.plan_masks_and_cache(plan, batch.state, batch.context, batch.context_mask, batch.capacity,
                                         need_cache)

    def decode(self, ids) -> str:
        return _decode_text(self.source.tokenizer, ids)

    def maybe_diagnose(self, state, context, context_mask, rows: int, capacity: int):
        """Keeps the value-group masks of the first batch for plots.value_group_diagnostic."""
        if self.diagnostic is not None or not self.config.diagnostic.enabled:
            return
        rho = float(self.config.diagnostic.value_budget)
        masks = {}
        plan = methods_lib.Plan("subtoken", (1 + rho) / 2, 1.0, rho)
        _, groups = methods_lib.build_masks(state, plan, self.config, self.selectors, self.scorers)
        positions = np.asarray(state.positions)[:rows]
        masks[f"subtoken ({self.config.subtoken.scorer}, query-aware)"] = ([np.asarray(g)[:rows] for g in groups],
                                                                          positions)
        if self.routed_model is not None:
            _, routed = methods_lib.routed_prefill(self.routed_model, self.routed_params, context, context_mask,
                                                   methods_lib.committed(jnp.float32(rho)), capacity)
            masks["routed (query-independent)"] = ([np.asarray(g)[:rows] for g in routed], positions)
        layer = self.config.diagnostic.layer % state.num_layers
        head = min(self.config.diagnostic.head, state.num_kv_heads - 1)
        title = (f"value groups kept at rho={rho:g} ({self.config.allocation_scope} allocation) over "
                 f"{int((positions >= 0).sum())} context tokens of {len(positions)} sequence(s); "
                 "maps: the first sequence")
        self.diagnostic = (masks, layer, head, title)


# ----------------------------------------------------------------------------- the whole evaluation


def all_budgets(config) -> List[float]:
    """The report's columns: fractions of KV bytes, then token counts (as floats > 1, shown as "N tok")."""
    return [float(b) for b in config.budgets] + [float(n) for n in config.get("token_budgets", ())]


def make_plans(config: ConfigDict, source: Source) -> Tuple[List[methods_lib.Plan], List[str]]:
    plans, notes = [], []
    budgets = sorted({float(b) for b in config.budgets}, reverse=True)
    for method in dict.fromkeys(config.methods):
        if method in methods_lib.ROUTED_METHODS and source.routed_cfg is None:
            continue
        for budget in ([1.0] if method == "full" else budgets):  # the full cache is one point, at b = 1
            plan, why = methods_lib.plan_method(method, budget, config, source.base_cfg, source.routed_cfg)
            if plan is None:
                notes.append(why)
            else:
                plans.append(plan)
        for tokens in sorted({int(n) for n in config.get("token_budgets", ())}, reverse=True):
            if method == "full":
                continue
            plan, why = methods_lib.plan_token_budget(method, tokens, config)
            if plan is None:
                notes.append(why)
            else:
                plans.append(plan)
    return plans, list(dict.fromkeys(notes))


def run(config: ConfigDict, workdir: str, source_dir: Optional[str] = None) -> Dict[str, Any]:
    """Evaluates the configured grid; returns {"records", "notes", "paths", "markdown"}.

    The model comes from source_dir (a training workdir; default: workdir itself) or model.checkpoint;
    results go to workdir/eval.
    """
    validate(config)
    sharding.maybe_initialize_distributed(config)
    sharding.check_config_mesh(config, config.batch_size)  # before any compute
    source = resolve_source(config, source_dir or workdir)
    inputs = {}
    for task in config.tasks:  # every task's inputs built and checked before any model is loaded
        kind = kinds.kind_of(task)
        inputs[task] = kind.inputs(task, config, source)
        kind.check_lengths(task, inputs[task], source, config)
    plans, notes = make_plans(config, source)
    out_dir = os.path.join(workdir, "eval")
    primary = jax.process_index() == 0  # the process that locks and writes WORKDIR/eval
    with WorkdirLock(out_dir) if primary else contextlib.nullcontext(), sharding.config_mesh(config, config.batch_size) as mesh:
        if mesh is not None:
            notes.append(f"mesh: {dict(mesh.shape)} over {mesh.size} devices ({jax.process_count()} process(es))")
        return _evaluate(config, source, inputs, plans, notes, out_dir, primary)


def _evaluate(config, source, inputs, plans, notes, out_dir, primary: bool = True) -> Dict[str, Any]:
    base_model, base_params, routed_model, routed_params = load_models(config, source)
    base_params = sharding.place_params(base_model, base_params)  # no-ops without a mesh
    if routed_model is not None:
        routed_params = sharding.place_params(routed_model, routed_params)
    notes = source.notes + list(dict.fromkeys(notes))
    logging.info("evaluating %d (method, budget) plans on %s", len(plans), list(config.tasks))
    evaluator = Evaluator(config, source, base_model, base_params, routed_model, routed_params, plans)
    records, examples = [], []
    for task in config.tasks:
        rows, more = kinds.kind_of(task).evaluate(evaluator, task, inputs[task])
        records += rows
        examples += more
        jax.clear_caches()  # a task's compiled programs are not reused by the next (different shapes)
    method_order = list(dict.fromkeys(config.methods))
    text = report_lib.markdown(records, list(config.tasks), method_order, all_budgets(config), notes)
    if not primary:  # every process computed the same records; process 0 writes them
        return {"records": records, "notes": notes, "paths": {}, "markdown": text}
    paths = report_lib.write_all(out_dir, records, examples, text)
    pngs = plots_lib.write_plots(out_dir, records, examples, all_budgets(config), evaluator.diagnostic)
    return {"records": records, "notes": notes, "paths": {**paths, **{os.path.basename(p): p for p in pngs}},
            "markdown": text}
