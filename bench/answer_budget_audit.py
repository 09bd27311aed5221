"""Would our stored study answers score differently if each were cut to its own prompt's budget?

Before eval cut every answer to its prompt's own budget (`evaluation.kinds.generation.own_budget`; the budget
kvpress's side generates, the max_new_tokens of the study's prompt files), a task's answers were all generated
for the longest budget among the prompts of a cell. This re-tokenises each stored prediction, cuts it to its own
budget and scores it again; cells whose scores change must be rerun (re-tokenising is not exact: about 1.4% of
kvpress's generated answers do not round-trip, so this is an audit, not a substitute for a rerun).

    .venv/bin/python bench/answer_budget_audit.py [--out bench/results/study]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "study"))
    args = parser.parse_args()

    import study_report
    from subtoken_jax.evaluation import tasks as tasks_lib
    from subtoken_jax.pretrained import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    budget = {}
    for path in glob.glob(os.path.join(args.out, "prompts", "*.jsonl")):
        with open(path) as fh:
            for r in map(json.loads, fh):
                budget[r["task"], int(r["length"]), int(r["id"].rsplit("_", 1)[1])] = r["max_new_tokens"]
    answers, longer, changed = Counter(), Counter(), Counter()
    for key, index, example, _ in study_report._our_examples(args.out):
        own = budget.get((key[0], key[1], index))
        if own is None:
            continue
        ids = tokenizer.encode(example["prediction"])
        answers[key[:2]] += 1
        if len(ids) > own:
            longer[key[:2]] += 1
            cut = tokenizer.decode(ids[:own])
            changed[key[:2]] += tasks_lib.score(key[0], cut, example["answer"], chat=True) != bool(example["correct"])
    for task, length in sorted(answers):
        print(f"{task} {length}: {answers[task, length]} answers, {longer[task, length]} longer than their own "
              f"budget, {changed[task, length]} would score differently")


if __name__ == "__main__":
    main()
