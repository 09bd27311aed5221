"""Does the question's protocol explain where our token methods and kvpress's differ? (issue 10, fairness)

kvpress prefills context + question under the press, so the question's keys and values are computed over the full
context; ours reads the question over the compressed context by default, and over the full one in the study's
"+qfull" rows (question_over="full"). For each token method both sides run, on the prompts both hold: how many
answers are the same text as kvpress's, and the accuracy, under each of our protocols. Reads the study's cells and
kvpress's rows; computes nothing on the model.

    python bench/question_protocol.py [--tasks needle,multi_key] [--lengths 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STUDY = os.path.join(ROOT, "bench", "results", "study")
METHODS = ("snapkv", "streaming", "expected_attention")
BUDGETS = (0.75, 0.5, 0.375, 0.25)


def our_answers(study_report) -> dict:
    """{(task, length, method, budget): {prompt index: answer text}} of our cells."""
    out = {}
    for key, index, example, _ in study_report._our_examples(STUDY):
        out.setdefault(key, {})[index] = example["prediction"]
    return out


def their_answers(tokenizer) -> dict:
    """{(task, length, press, budget): {prompt index: answer text}} of kvpress's rows."""
    out = {}
    with open(os.path.join(STUDY, "kvpress.jsonl")) as fh:
        for row in map(json.loads, fh):
            task_length, index = row["id"].rsplit("_", 1)
            task, length = task_length.rsplit("_", 1)
            out.setdefault((task, int(length), row["press"], float(row["budget"])), {})[int(index)] = \
                tokenizer.decode(row["generated_ids"])
    return out


def same_text(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def distractor_answers(task, length, ours, correct, tokenizer) -> list:
    """Per method: the prompts the full-context question answers and ours does not, and how many of our answers there
    are another number from the context (a distractor's value) instead of the asked one."""
    import re

    with open(os.path.join(STUDY, "prompts", f"{task}_{length}.jsonl")) as fh:
        prompts = {int(p["id"].rsplit("_", 1)[1]): p for p in map(json.loads, fh)}
    lines = []
    for method in METHODS:
        lost = distractor = 0
        for budget in BUDGETS:
            default = correct.get((task, length, method, budget), {})
            full = correct.get((task, length, f"{method}+qfull", budget), {})
            for i in set(default) & set(full):
                if full[i][0] and not default[i][0]:
                    lost += 1
                    answer = prompts[i]["answer"].strip()
                    said = re.findall(r"\d{%d}" % len(answer), ours[(task, length, method, budget)][i])
                    distractor += bool(said) and said[0] != answer and said[0] in tokenizer.decode(prompts[i]["context"])
        if lost:
            lines.append(f"- {method}: {lost} answers right only with the question over the full context (budgets "
                         f"pooled); {distractor} of ours there give another number from the context")
    return lines + [""] if lines else []


def table(task, length, ours, theirs, correct) -> list:
    lines = [f"## {task}, {length} tokens", "",
             "| method | b | prompts | same answer as kvpress's: question over the compressed context / over the "
             "full context (+qfull) | accuracy: ours / ours +qfull / kvpress's |", "|---|---|---|---|---|"]
    for method in METHODS:
        for budget in BUDGETS:
            default, full = ours.get((task, length, method, budget)), ours.get((task, length, f"{method}+qfull", budget))
            press = theirs.get((task, length, method, budget))
            if not (default and full and press):
                continue
            common = sorted(set(default) & set(full) & set(press))
            if not common:
                continue
            same = [sum(same_text(answers[i], press[i]) for i in common) for answers in (default, full)]
            accuracy = [sum(correct[(task, length, name, budget)][i][0] for i in common) / len(common)
                        for name in (method, f"{method}+qfull", f"kvpress:{method}")]
            lines.append(f"| {method} | {budget} | {len(common)} | {same[0]} / {same[1]} | "
                         + " / ".join(f"{a:.2f}" for a in accuracy) + " |")
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=["needle", "multi_key"])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048])
    parser.add_argument("--out", default=os.path.join(STUDY, "question_protocol.md"))
    args = parser.parse_args()
    from bench import study_report
    from subtoken_jax.pretrained import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    correct = {**study_report.our_rows(STUDY), **study_report.kvpress_rows(STUDY)}
    ours, theirs = our_answers(study_report), their_answers(tokenizer)
    lines = ["# The question's protocol, ours against kvpress's (bench/question_protocol.py)", ""]
    for task in args.tasks:
        for length in args.lengths:
            lines += table(task, length, ours, theirs, correct)
            lines += distractor_answers(task, length, ours, correct, tokenizer)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
