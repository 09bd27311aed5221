"""Query-aware KV compression on retrieval: token selectors, the sub-token predictor, and their combination.

A small byte-level model is trained here (configs/retrieval.py: synthetic retrieval tasks mixed with text,
in three warm-started phases: short copy-heavy sequences (WORKDIR/warmup), the full mixture on 256-token
sequences (WORKDIR/main), the same at half the learning rate (WORKDIR itself)) until it solves needle in a
haystack with a full cache. Then, at total KV budgets
b = 1, 0.75, 0.5, 0.375, 0.25 (fractions of the context's KV bytes, index metadata included), eval.py's
runner scores:
  - every token-level selector alone (snapkv, h2o, streaming, key_norm, random, expected_attention);
  - subtoken: the learned value-group predictor alone (all keys kept, rho = 2b - 1 of the value groups;
    only b > 0.5 fits, so n/a below);
  - combined: a token selector keeps tau of the tokens, then the predictor keeps rho of their value
    groups (tau (1 + rho) / 2 = b; by default rho = 0.5 with snapkv, expected_attention and streaming,
    rho = 0.25 with snapkv and streaming, and the closed-form expected scorer in place of the predictor).
The predictor (subtoken_jax/selectors/predictor.py) is trained on this model against the realised
attention of question + answer queries times value-group norms, on text-task prompts disjoint from the
eval prompts. Answers are generated greedily from the packed cache. The script also measures how well
expected attention (the closed-form estimate from the
question's queries) correlates with the attention the answer's queries actually pay to the context.

    python bench/query_aware.py                       # train (resumes), train the predictor, evaluate
    python bench/query_aware.py --skip-train          # reuse WORKDIR's trained model and predictor
    python bench/query_aware.py --quick               # a few steps only, to check the script runs

Writes bench/results/query_aware.json (+ .md) and copies eval's PNG plots to bench/results/query_aware_*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import eval as eval_configs  # noqa: E402
from configs import predictor as predictor_configs  # noqa: E402
from configs import retrieval as retrieval_configs  # noqa: E402

BUDGETS = (1.0, 0.75, 0.5, 0.375, 0.25)
TOKEN_SELECTORS = ("snapkv", "h2o", "streaming", "key_norm", "random", "expected_attention")
TASKS = ("needle", "variable_tracking")
CLAIM_BUDGET = 0.375


def train_config(quick: bool, variant: str = "", init_from: str = ""):
    c = retrieval_configs.get_config(variant)
    c.pretrain.init_from = init_from
    if quick:
        c.pretrain.steps, c.checkpoint_every, c.batch_size = 4, 4, 2
        c.data.eval_batches = 1
    return c


def predictor_config(workdir: str, quick: bool, lengths):
    c = predictor_configs.get_config()
    c.model.workdir = workdir
    c.data.source = "tasks"
    c.data.lengths = tuple(lengths)
    c.train.steps = 2 if quick else 1000
    c.train.batch_size = 2 if quick else 8
    c.train.scope = "global"  # eval allocates value groups globally (configs/eval.py allocation_scope)
    c.eval.scope = "global"
    c.eval.batches = 1 if quick else 4
    c.eval.value_budget = 0.5
    return c


def eval_config(predictor_dir: str, selector: str, quick: bool, lengths, value_fraction: float = 0.5):
    c = eval_configs.get_config()
    c.tasks = TASKS
    c.methods = ("full",) + TOKEN_SELECTORS + ("subtoken", "combined")
    c.budgets = BUDGETS
    c.subtoken.scorer = "predictor"
    c.combined.scorer = "predictor"
    c.combined.selector = selector
    c.combined.value_fraction = value_fraction  # rho of the combination; tau = 2b / (1 + rho), capped at 1
    c.predictor.workdir = predictor_dir
    c.needle.lengths = c.variable_tracking.lengths = tuple(lengths)
    c.needle.samples = 10  # per (length, depth): 100 prompts
    c.variable_tracking.samples = 50  # per length: 100 prompts
    if quick:
        c.needle.depths, c.needle.samples, c.variable_tracking.samples = (0.0, 1.0), 1, 2
        c.budgets = (1.0, 0.375)
    return c


# ----------------------------------------------------------------------------- expected vs realised attention


def _spearman(x, y, valid):
    """Spearman rank correlation of x and y over the valid entries (last axis); NaN if constant."""
    x, y = x[valid], y[valid]
    if len(x) < 3:
        return np.nan
    rx, ry = np.argsort(np.argsort(x)).astype(np.float64), np.argsort(np.argsort(y)).astype(np.float64)
    return _pearson(rx, ry, np.ones(len(rx), bool))


def _pearson(x, y, valid):
    x, y = np.asarray(x, np.float64)[valid], np.asarray(y, np.float64)[valid]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return np.nan
    return float(np.corrcoef(x, y)[0, 1])


def attention_correlation(workdir: str, predictor_dir: str, lengths, prompts_per_task: int, n_future: int,
                          seed: int = 12345):
    """Correlation, per (layer, KV head), between estimates from the question and the attention the answer's
    queries really pay to the context (teacher-forced reference answer), over the context tokens.

    Token level: expected attention (closed form from the question's query statistics, rotated to the next
    n_future positions) and, as a reference, the question's own observed attention, against the answer
    queries' realised attention (mean over answer positions and a KV group's query heads). Value-group
    level: the value-group scores the sub-token methods rank by (expected, question attention, the trained
    predictor) against the realised targets a_j * ||v_{j,h,g}||.
    """
    from subtoken_jax import data as data_lib
    from subtoken_jax import trainer
    from subtoken_jax.evaluation import tasks as tasks_lib
    from subtoken_jax.selectors import capture_prefill_state, expected_attention_weights, window_attention
    from subtoken_jax.selectors.predictor import load_predictor, predictor_layer_scores
    from subtoken_jax.selectors.subtoken import layer_value_group_scores

    model, params, tokenizer, _, _ = trainer.load_workdir_base(workdir)
    predictor, predictor_params = load_predictor(predictor_dir, model.config) if predictor_dir else (None, None)
    cfg = eval_configs.get_config()
    cfg.seed = seed  # prompts disjoint from the eval's (seed 0)
    cfg.needle.lengths = cfg.variable_tracking.lengths = tuple(lengths)
    cfg.needle.samples = max(1, prompts_per_task // (len(lengths) * len(cfg.needle.depths)))
    cfg.variable_tracking.samples = max(1, prompts_per_task // len(lengths))
    layers, heads = model.config.num_layers, model.config.num_kv_heads
    stats = {k: [[[] for _ in range(heads)] for _ in range(layers)] for k in
             ("expected_spearman", "expected_pearson", "question_spearman", "question_pearson",
              "groups_expected_spearman", "groups_question_spearman", "groups_predictor_spearman")}
    for task in TASKS:
        prompts = tasks_lib.build_prompts(task, cfg, tokenizer, False)
        for start in range(0, len(prompts), 4):
            batch = prompts[start:start + 4]
            context, context_mask = data_lib.pad_rows([p.context for p in batch], 0, 32)
            question, question_mask = data_lib.pad_rows([p.question for p in batch], 0, 8)
            answers = [tokenizer.encode(p.answer) for p in batch]
            width = max(len(a) for a in answers)
            answer = np.zeros((len(batch), width), np.int32)
            answer_mask = np.zeros((len(batch), width), np.int32)
            for i, a in enumerate(answers):
                answer[i, :len(a)], answer_mask[i, :len(a)] = a, 1
            full = capture_prefill_state(model, params, context, np.concatenate([question, answer], 1),
                                         context_mask=context_mask,
                                         question_mask=np.concatenate([question_mask, answer_mask], 1))
            n_q = question.shape[1]
            asked = full.replace(queries=tuple(q[:, :n_q] for q in full.queries),
                                 query_positions=full.query_positions[:, :n_q])
            future = full.replace(queries=tuple(q[:, n_q:] for q in full.queries),
                                  query_positions=full.query_positions[:, n_q:])
            real = np.asarray(full.positions) >= 0  # [B, S]
            for layer in range(layers):
                realised = np.asarray(window_attention(future, layer))  # [B, Hkv, S]
                expected = np.asarray(expected_attention_weights(asked, layer, n_future))
                observed = np.asarray(window_attention(asked, layer))
                targets = np.asarray(layer_value_group_scores(future, layer, "attention"))  # [B, S, Hkv, G]
                groups = {"expected": np.asarray(layer_value_group_scores(asked, layer, "expected",
                                                                          n_future=n_future)),
                          "question": np.asarray(layer_value_group_scores(asked, layer, "attention"))}
                if predictor is not None:
                    groups["predictor"] = np.asarray(predictor_layer_scores(predictor, predictor_params, asked, layer))
                for b in range(len(batch)):
                    for h in range(heads):
                        s = stats
                        s["expected_spearman"][layer][h].append(_spearman(expected[b, h], realised[b, h], real[b]))
                        s["expected_pearson"][layer][h].append(_pearson(expected[b, h], realised[b, h], real[b]))
                        s["question_spearman"][layer][h].append(_spearman(observed[b, h], realised[b, h], real[b]))
                        s["question_pearson"][layer][h].append(_pearson(observed[b, h], realised[b, h], real[b]))
                        valid = np.repeat(real[b][:, None], targets.shape[-1], 1).ravel()
                        for name, scores in groups.items():
                            s[f"groups_{name}_spearman"][layer][h].append(
                                _spearman(scores[b, :, h].ravel(), targets[b, :, h].ravel(), valid))
    summary = {}
    for key, grid in stats.items():
        if not any(grid[0][0]):
            continue
        per = np.array([[np.nanmean(cell) for cell in row] for row in grid])  # [layers, heads]
        summary[key] = {"mean": float(np.nanmean(per)), "min": float(np.nanmin(per)), "max": float(np.nanmax(per)),
                        "per_layer_head": per.round(4).tolist()}
    summary["prompts"] = {task: len(tasks_lib.build_prompts(task, cfg, tokenizer, False)) for task in TASKS}
    summary["n_future"] = n_future
    return summary


# ----------------------------------------------------------------------------- the report


def table(records, task, methods):
    from subtoken_jax.evaluation.report import budget_table

    rows = [r for r in records if r["task"] == task]
    full = next(r["value"] for r in rows if r["method"] == "full")
    heading = f"### {task} (exact match; full cache {full:.3f}, {rows[0]['num_examples']} prompts)"
    return "\n".join([heading, ""] + budget_table(rows, methods, BUDGETS, BUDGETS))


def claim_check(records, budget=CLAIM_BUDGET):
    """At `budget`: combined's share of full-cache accuracy, and its margin over the best token selector."""
    out = {}
    for task in TASKS:
        rows = {(r["method"], r["budget"]): r["value"] for r in records if r["task"] == task}
        full = rows["full", 1.0]
        combined = [(m, v) for (m, b), v in rows.items() if m.startswith("combined") and b == budget]
        tokens = {m: rows[m, budget] for m in TOKEN_SELECTORS if (m, budget) in rows}
        best_token = max(tokens.items(), key=lambda kv: kv[1])
        out[task] = {"full": full, "best_token_selector": best_token[0], "best_token_value": best_token[1],
                     "combined": {m: {"value": v, "share_of_full": v / full if full else float("nan"),
                                      "beats_every_token_selector": v > best_token[1]} for m, v in combined}}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/query_aware", help="training workdir (resumed if present)")
    parser.add_argument("--out", default="bench/results/query_aware.json")
    parser.add_argument("--skip-train", action="store_true", help="use WORKDIR's model and predictor as they are")
    parser.add_argument("--lengths", default="128,256",
                        help="needle / variable tracking prompt lengths (tokens; the model trains on 256)")
    parser.add_argument("--combined", default="snapkv:0.5,expected_attention:0.5,streaming:0.5,snapkv:0.25,"
                                              "streaming:0.25,expected_attention:0.5:expected,streaming:0.5:expected",
                        help="SELECTOR:RHO[:SCORER] (scorer default predictor): token selector keeping tau, then "
                             "SCORER's top RHO of the survivors' value groups (tau = 2b / (1 + RHO), capped at 1); one "
                             "eval pass each; a scorer's first pass also gives its subtoken-alone row")
    parser.add_argument("--correlation-prompts", type=int, default=16, help="per task")
    parser.add_argument("--quick", action="store_true", help="a few steps only, to check the script runs")
    args = parser.parse_args()
    started = time.time()
    lengths = tuple(int(n) for n in args.lengths.split(",")) if not args.quick else (128,)
    workdir = args.workdir
    predictor_dir = os.path.join(workdir, "predictor")
    timings = {}

    from subtoken_jax import trainer
    from subtoken_jax.evaluation import runner
    from subtoken_jax import predictor_training

    if not args.skip_train:
        previous = ""  # each phase warm-starts from the previous one's parameters; finished phases resume at once
        for variant, folder in (("warmup", os.path.join(workdir, "warmup")), ("", os.path.join(workdir, "main")),
                                ("anneal", workdir)):
            t = time.time()
            print(trainer.format_summary(trainer.run(train_config(args.quick, variant, previous), folder)), flush=True)
            timings[f"train_{variant or 'main'}_s"] = time.time() - t
            previous = folder
        t = time.time()
        print("predictor:", predictor_training.run(predictor_config(workdir, args.quick, lengths), predictor_dir),
              flush=True)
        timings["train_predictor_s"] = time.time() - t
    with open(os.path.join(predictor_dir, "predictor_eval.json")) as fh:
        predictor_eval = json.load(fh)

    records, notes = [], []
    combos = []  # (selector, rho, scorer)
    for spec in filter(None, args.combined.split(",")):
        parts = spec.split(":")
        combos.append((parts[0], float(parts[1]), parts[2] if len(parts) > 2 else "predictor"))
    names = [f"combined ({sel} + {scorer}, rho={rho:g})" for sel, rho, scorer in combos]
    out_dir = os.path.dirname(args.out) or "."
    os.makedirs(out_dir, exist_ok=True)
    subtoken_rows = {}  # scorer -> name of its subtoken row
    for i, ((selector, rho, scorer), name) in enumerate(zip(combos, names)):
        t = time.time()
        config = eval_config(predictor_dir, selector, args.quick, lengths, rho)
        config.subtoken.scorer = config.combined.scorer = scorer
        if i:  # the token selectors are the same in every pass: only the combination (and subtoken) re-run
            config.methods = ("full", "combined") + (("subtoken",) if scorer not in subtoken_rows else ())
            config.diagnostic.enabled = False
        summary = runner.run(config, workdir)
        timings[f"eval_{selector}_{rho:g}_{scorer}_s"] = time.time() - t
        if scorer not in subtoken_rows:
            subtoken_rows[scorer] = "subtoken" if scorer == "predictor" else f"subtoken ({scorer})"
            keep_subtoken = True
        else:
            keep_subtoken = False
        for r in summary["records"]:
            if r["method"] == "combined":
                r = {**r, "method": name}
            elif r["method"] == "subtoken":
                if not keep_subtoken:
                    continue
                r = {**r, "method": subtoken_rows[scorer]}
            elif i:
                continue
            records.append(r)
        notes += [n for n in summary["notes"] if n not in notes]
        if i == 0:
            for png in ("value_groups.png", "needle_grid.png"):
                source = os.path.join(workdir, "eval", png)
                if os.path.exists(source):
                    shutil.copyfile(source, os.path.join(out_dir, f"query_aware_{png}"))
    from subtoken_jax.evaluation import plots as plots_lib

    for task in TASKS:  # every method of every pass in one plot
        plots_lib.quality_vs_budget(records, task, os.path.join(out_dir, f"query_aware_quality_{task}.png"))
    t = time.time()
    correlation = attention_correlation(workdir, predictor_dir, lengths, 4 if args.quick else args.correlation_prompts,
                                        eval_configs.get_config().selectors.n_future)
    timings["correlation_s"] = time.time() - t

    methods = ["full", *TOKEN_SELECTORS] + list(subtoken_rows.values()) + names
    text = ["## Query-aware KV compression: exact match by KV budget", "",
            "Cells: exact match (realised fraction of the context's KV bytes, index metadata included). subtoken = "
            "the trained predictor alone (all keys kept: n/a at b <= 0.5); combined = token selector keeping tau, "
            "then the predictor keeping rho of the survivors' value groups, tau (1 + rho) / 2 = b (tau capped at "
            "1, then rho = 2b - 1).", ""]
    for task in TASKS:
        text += [table(records, task, methods), ""]
    claim = claim_check(records)
    text += [f"### Claim at b={CLAIM_BUDGET}", ""]
    for task, c in claim.items():
        for name, v in c["combined"].items():
            text.append(f"- {task}: {name} {v['value']:.3f} = {v['share_of_full']:.1%} of full ({c['full']:.3f}); "
                        f"best token selector {c['best_token_selector']} {c['best_token_value']:.3f}; beats every "
                        f"token selector: {v['beats_every_token_selector']}")
    text += ["", "### Expected attention vs realised (answer queries' attention on the context)", "",
             "| estimate | mean | min | max |", "|---|---|---|---|"]
    for key, v in correlation.items():
        if isinstance(v, dict) and "mean" in v:
            text.append(f"| {key} | {v['mean']:.3f} | {v['min']:.3f} | {v['max']:.3f} |")
    text += ["", f"predictor held-out: {json.dumps({k: round(v, 4) for k, v in predictor_eval.items()})}"]
    if notes:
        text += ["", "Notes:"] + [f"- {n}" for n in notes]
    markdown = "\n".join(text)

    result = {"records": records, "claim": claim, "correlation": correlation, "predictor_eval": predictor_eval,
              "notes": notes, "timings_s": timings, "seconds": time.time() - started,
              "config": {"train_warmup": train_config(args.quick, "warmup").to_dict(),
                         "train": train_config(args.quick, "", os.path.join(workdir, "warmup")).to_dict(),
                         "train_anneal": train_config(args.quick, "anneal", os.path.join(workdir, "main")).to_dict(),
                         "predictor": predictor_config(workdir, args.quick, lengths).to_dict(),
                         "eval": eval_config(predictor_dir, combos[0][0], args.quick, lengths, combos[0][1]).to_dict(),
                         "eval_note": "per pass: combined.selector / value_fraction / scorer as in 'combined'",
                         "combined": combos, "workdir": workdir},
              "machine": f"{os.cpu_count()} CPU cores, backend {jax.default_backend()}", "markdown": markdown}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2, default=list)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(markdown + "\n")
    print(markdown)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
