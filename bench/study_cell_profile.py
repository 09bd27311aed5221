"""Where the time of one query-aware study cell goes: the batch's prefill, each plan's masks, and generation.

    python bench/study_cell_profile.py [--task needle] [--length 2048] [--prompts 5] [--variant tokens_and_joint]

Runs the variant's evaluation twice over the first PROMPTS prompts (the first run compiles) and prints the wall
time of each part, device work waited for (jax.block_until_ready). Prefill: capture_prefill_state (context,
question, any lookahead draft); masks: every plan's masks; generate: answers from the packed caches; full: the
full cache's reference answers (only with answer_nll).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from bench import query_aware_study as study  # noqa: E402
from subtoken_jax.evaluation import kinds, runner  # noqa: E402
from subtoken_jax.evaluation.kinds import generation, prompt_batches  # noqa: E402

SECONDS = collections.defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        SECONDS[name] += time.perf_counter() - start
        return out
    return wrapper


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="needle")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--variant", default="tokens_and_joint", choices=list(study.VARIANTS), metavar="VARIANT")
    args = parser.parse_args()
    prompt_batches.capture_prefill_state = timed("prefill", prompt_batches.capture_prefill_state)
    generation.generate_from_state = timed("generate", generation.generate_from_state)
    generation.full_cache_answers = timed("full", generation.full_cache_answers)
    settings = argparse.Namespace(dev=False, budgets=list(study.BUDGETS), answer_nll=False,
                                  batch_size=args.prompts, prompts=args.prompts)
    config = study.with_overrides(study.study_config(settings, args.task, args.length), study.VARIANTS[args.variant])
    runner.validate(config)
    source = runner.resolve_source(config, os.path.join(ROOT, "runs", "study_cell_profile"))
    model, params = runner.load_models(config, source)[:2]
    prompts = study.study_prompts(args.task, config, source.tokenizer, source.bos, source.chat, args.prompts)
    plans, _ = runner.make_plans(config, source)
    evaluator = runner.Evaluator(config, source, model, params, None, None, plans)
    evaluator.masks_and_cache = timed("masks", evaluator.masks_and_cache)
    for run in ("first (compiles)", "second"):
        SECONDS.clear()
        start = time.perf_counter()
        kinds.kind_of(args.task).evaluate(evaluator, args.task, prompts)
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in SECONDS.items())
        print(f"{run} run: {time.perf_counter() - start:.1f} s in all; {parts}", flush=True)


if __name__ == "__main__":
    main()
