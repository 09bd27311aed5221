"""Answer fidelity: how likely each compressed cache keeps the full cache's own answer, paired per prompt.

Every plan of a `--answer-nll` run of the study scores the full cache's greedy answer, teacher-forced after the
question over its compressed cache (`config.answer_nll`; examples' answer_nll, nats summed over the answer).
The same answer tokens for every row of a prompt, so two rows compare prompt by prompt: a continuous measure
where exact match only sees the prompts whose answer flips. Plan and test: bench/results/answer_fidelity/plan.md.

    python bench/query_aware_study.py --answer-nll --prompts 20 --lengths 1024 \\
        --variants "pair(snapkv),pair(snapkv)+look24" --skip-kvpress      # resumable; writes this report too
    python bench/answer_fidelity.py [OUT]                                 # the report again from OUT's cells
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import study_report  # noqa: E402

SIGNIFICANCE = 0.05


def load(out_dir):
    """{(task, length, method, budget): {prompt index: (answer NLL, answer tokens, exact match)}} of OUT's cells."""
    rows = defaultdict(dict)
    for key, index, example, _ in study_report._our_examples(out_dir):
        if "answer_nll" in example:
            rows[key][index] = (float(example["answer_nll"]), int(example["answer_nll_tokens"]),
                                bool(example["correct"]))
    return rows


def per_token(cell):
    """Mean over prompts of each answer's NLL per token (nats): comparable across tasks with longer answers."""
    return sum(nll / max(tokens, 1) for nll, tokens, *_ in cell.values()) / len(cell)


def paired(a, b):
    """a's minus b's answer NLL on the prompts both have: (mean difference, its standard error, prompts a lower,
    prompts b lower, n)."""
    common = sorted(set(a) & set(b))
    diffs = [a[i][0] - b[i][0] for i in common]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se, sum(d < 0 for d in diffs), sum(d > 0 for d in diffs), n


def pooled(cells_a, cells_b):
    """Sign test over prompts of a's minus b's NLL summed over the budgets (each prompt once): (a lower, b lower,
    p, mean summed difference)."""
    from scipy.stats import binomtest

    total = defaultdict(float)
    for a, b in zip(cells_a, cells_b):
        for i in set(a) & set(b):
            total[i] += a[i][0] - b[i][0]
    lower, higher = sum(d < 0 for d in total.values()), sum(d > 0 for d in total.values())
    p = binomtest(lower, lower + higher).pvalue if lower + higher else 1.0
    return lower, higher, p, (sum(total.values()) / len(total) if total else float("nan"))


def agreement(cells_a, cells_b, full):
    """Where exact match tells two rows apart (one answers a prompt right at a budget, the other wrong) on a prompt
    the full cache answers right (so its answer, the one scored, is a right one), does the answer NLL point the
    same way, lower for the right row? (agree, disagree) over every such (prompt, budget)."""
    agree = disagree = 0
    for a, b in zip(cells_a, cells_b):
        for i in set(a) & set(b) & {i for i, row in full.items() if row[2]}:
            (nll_a, _, right_a), (nll_b, _, right_b) = a[i], b[i]
            if right_a != right_b and nll_a != nll_b:
                if (nll_a < nll_b) == right_a:
                    agree += 1
                else:
                    disagree += 1
    return agree, disagree


def verdict(means, pooled_p):
    """The plan's rule: held = lower mean NLL at every budget and pooled p < SIGNIFICANCE; leans = lower everywhere,
    not significant; not held otherwise."""
    if not all(m < 0 for m in means):
        return "not held"
    return "held" if pooled_p < SIGNIFICANCE else "leans its way, not significant"


def pairs_of(methods):
    """(combination, its selector) for every combination row whose selector row is there too; a variant of the
    joint allocation ("joint(snapkv)@rms_centred+look24") against the allocation as built ("joint(snapkv)+look24")
    and against its last change alone ("joint(snapkv)@centred+look24")."""
    pairs = [(m, study_report.selector_of(m)) for m in sorted(methods) if study_report.selector_of(m) in methods]
    for m in sorted(methods):
        found = re.search(r"@(\w+)", m)
        if not found:
            continue
        tag = found.group(1)
        rivals = [m.replace(found.group(), "")] + (
            [m.replace(found.group(), "@" + tag.split("_", 1)[1])] if "_" in tag else [])
        pairs += [(m, rival) for rival in rivals if rival in methods]
    return pairs


def write(out_dir, tasks, lengths, budgets):
    rows = load(out_dir)
    lines = ["# Answer fidelity: NLL of the full cache's own answer over each compressed cache", "",
             "Per answer token, nats, mean over prompts (prompts). Lower is closer to the full cache. Paired: "
             "combination minus selector, mean NLL difference per prompt (nats summed over the answer; SE) "
             "[prompts the combination is lower - prompts the selector is lower]. Plan: plan.md.", ""]
    summary = {"cells": {}, "pairs": []}
    everywhere = defaultdict(lambda: [defaultdict(dict) for _ in budgets])  # pair -> per budget: (task, i) -> nll
    for length in lengths:
        for task in tasks:
            methods = {m for (t, n, m, _) in rows if t == task and n == length}
            if not methods:
                continue
            lines += [f"## {task}, {length} tokens", "", "| method | " + " | ".join(f"b={b:g}" for b in budgets) +
                      " |", "|---|" + "---|" * len(budgets)]
            full = rows.get((task, length, "full", 1.0))
            if full:
                lines.append(f"| full (b=1) | {per_token(full):.4f} ({len(full)}) |" + " |" * (len(budgets) - 1))
            for method in sorted(methods - {"full"}):
                cells = [rows.get((task, length, method, b)) for b in budgets]
                lines.append(f"| {method} | " + " | ".join(f"{per_token(c):.4f} ({len(c)})" if c else ""
                                                           for c in cells) + " |")
                summary["cells"].update({f"{task}|{length}|{method}|{b}": per_token(c)
                                         for b, c in zip(budgets, cells) if c})
            lines.append("")
            for combo, selector in pairs_of(methods):
                a = [rows.get((task, length, combo, b)) or {} for b in budgets]
                b_ = [rows.get((task, length, selector, b)) or {} for b in budgets]
                if not all(x and y for x, y in zip(a, b_)):
                    continue
                stats = [paired(x, y) for x, y in zip(a, b_)]
                lower, higher, p, mean = pooled(a, b_)
                decided = verdict([s[0] for s in stats], p)
                agree, disagree = agreement(a, b_, full or {})
                lines.append(f"- **{combo} vs {selector}**: " + "; ".join(
                    f"b={b:g} {s[0]:+.3f} ({s[1]:.3f}) [{s[2]}-{s[3]}]" for b, s in zip(budgets, stats)) +
                    f"; pooled over budgets {lower}-{higher} prompts, sign test p = {p:.2g}: **{decided}**; where "
                    f"exact match differs on a prompt the full cache gets right, the NLL is lower for the right "
                    f"row in {agree} of {agree + disagree}")
                summary["pairs"].append({"task": task, "length": length, "combination": combo, "selector": selector,
                                         "per_budget": [dict(zip(("mean", "se", "lower", "higher", "n"), s))
                                                        for s in stats],
                                         "pooled": {"lower": lower, "higher": higher, "p": p, "mean": mean},
                                         "exact_match_agreement": {"agree": agree, "disagree": disagree},
                                         "verdict": decided})
                for k, (x, y) in enumerate(zip(a, b_)):
                    for i in set(x) & set(y):
                        everywhere[combo, selector][k][task, length, i] = x[i][0] - y[i][0]
            lines.append("")
    if everywhere:
        lines += ["## Pooled over every task and length (each prompt once, budgets summed)", ""]
        for (combo, selector), per_budget in sorted(everywhere.items()):
            from scipy.stats import binomtest

            total = defaultdict(float)
            for diffs in per_budget:
                for unit, d in diffs.items():
                    total[unit] += d
            lower, higher = sum(d < 0 for d in total.values()), sum(d > 0 for d in total.values())
            p = binomtest(lower, lower + higher).pvalue if lower + higher else 1.0
            means = [sum(d.values()) / len(d) for d in per_budget]
            lines.append(f"- {combo} vs {selector}: mean difference per budget " +
                         " / ".join(f"{m:+.3f}" for m in means) + f" nats; {lower}-{higher} prompts over "
                         f"{len({u[:2] for u in total})} task-lengths, p = {p:.2g}: **{verdict(means, p)}**")
            summary["pairs"].append({"task": "all", "combination": combo, "selector": selector,
                                     "pooled": {"lower": lower, "higher": higher, "p": p}, "means": means,
                                     "verdict": verdict(means, p)})
    with open(os.path.join(out_dir, "answer_fidelity.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "answer_fidelity.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=os.path.join(ROOT, "bench", "results", "answer_fidelity"))
    parser.add_argument("--tasks", default="needle,multi_key,multi_value,two_needles")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--budgets", default="0.75,0.5,0.375,0.25")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.out, "cells")):
        parser.error(f"{args.out}/cells is missing: run the study with --answer-nll first (see this file's docstring)")
    write(args.out, args.tasks.split(","), [int(x) for x in args.lengths.split(",")],
          [float(x) for x in args.budgets.split(",")])


if __name__ == "__main__":
    main()
