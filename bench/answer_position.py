"""Accuracy by where the answer sits in the context (issue 10, claim (b)): the study's single-answer tasks (needle,
multi-key), each prompt placed by the relative position of its answer's digits in the context, split in quarters.

StreamingLLM keeps the last share of the context, so it answers only prompts whose answer sits in that window; the
scoring methods (SnapKV, the joint allocation, ...) may keep the answer wherever it is. A token method that beats
the combination at some budget does so in some quarters: this says which, ours and kvpress's rows side by side,
and how much of StreamingLLM's accuracy the full cache's right answers inside its window explain. Reads the
study's cells, kvpress's rows and the prompt files (bench/query_aware_study.py); computes nothing on the model.

    python bench/answer_position.py [--tasks needle,multi_key] [--lengths 2048] [--budgets 0.5,0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STUDY = os.path.join(ROOT, "bench", "results", "study")
SINGLE_ANSWER = ("needle", "multi_key")  # one answer span each; the multi-item tasks have several
QUARTERS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
METHODS = ("full", "snapkv", "joint(snapkv)", "streaming", "expected_attention", "kvpress:snapkv",
           "kvpress:streaming", "kvpress:tova", "kvpress:expected_attention")


def answer_start(context, answer_ids):
    """The first index of `answer_ids` in `context` (None if absent)."""
    n = len(answer_ids)
    return next((i for i in range(len(context) - n + 1) if context[i:i + n] == answer_ids), None)


def answer_positions(task: str, length: int, tokenizer) -> dict:
    """{prompt index: the answer's start as a fraction of the context} (prompts whose answer is not found left out)."""
    out = {}
    with open(os.path.join(STUDY, "prompts", f"{task}_{length}.jsonl")) as fh:
        for prompt in map(json.loads, fh):
            start = answer_start(prompt["context"], list(tokenizer.encode(prompt["answer"].strip())))
            if start is not None:
                out[int(prompt["id"].rsplit("_", 1)[1])] = start / len(prompt["context"])
    return out


def quarter_of(position: float) -> int:
    return min(int(position * len(QUARTERS)), len(QUARTERS) - 1)


def by_quarter(rows: dict, positions: dict):
    """[(right, n)] per quarter of answer position over the prompts both `rows` ({index: (correct, kv)}) and
    `positions` hold."""
    counts = [[0, 0] for _ in QUARTERS]
    for index, (correct, _) in rows.items():
        if index in positions:
            q = counts[quarter_of(positions[index])]
            q[0] += correct
            q[1] += 1
    return counts


def window_explains(full_rows: dict, positions: dict, budget: float, common) -> float:
    """The accuracy a recency window of `budget` of the context would have if it answered exactly the prompts the
    full cache answers whose answer starts inside the window (a few sink tokens ignored)."""
    hits = [full_rows[i][0] and positions[i] >= 1 - budget for i in common]
    return sum(hits) / max(len(hits), 1)


def table(task, length, budgets, ours, theirs, positions) -> list:
    rows = {**{k: v for k, v in theirs.items() if k[2] != "full"}, **ours}
    full = rows.get((task, length, "full", 1.0), {})
    sizes = [sum(1 for i in full if i in positions and quarter_of(positions[i]) == q) for q in range(len(QUARTERS))]
    head = " | ".join(f"{int(a * 100)}-{int(b * 100)}% (n={n})" for (a, b), n in zip(QUARTERS, sizes))
    lines = [f"## {task}, {length} tokens", "",
             f"Exact match by where the answer starts in the context (quarters, {sum(sizes)} prompts).", "",
             f"| method | b | all | {head} |", "|---|---|---|" + "---|" * len(QUARTERS)]

    def line(method, budget, cells):
        right, n = sum(c[0] for c in cells), sum(c[1] for c in cells)
        lines.append(f"| {method} | {budget} | {right / max(n, 1):.2f} | "
                     + " | ".join(f"{r / n:.2f}" if n else "-" for r, n in cells) + " |")

    if full:
        line("full cache", 1.0, by_quarter(full, positions))
    for budget in budgets:
        for method in METHODS[1:]:
            got = rows.get((task, length, method, budget))
            if got:
                line(method, budget, by_quarter(got, positions))
    lines.append("")
    for budget in budgets:
        for method in ("streaming", "kvpress:streaming"):
            got = rows.get((task, length, method, budget))
            if got and full:
                common = [i for i in got if i in full and i in positions]
                observed = sum(got[i][0] for i in common) / max(len(common), 1)
                lines.append(f"- {method} at b = {budget}: {observed:.2f} observed; the full cache's right answers "
                             f"that start in the last {budget:.0%} of the context: "
                             f"{window_explains(full, positions, budget, common):.2f}")
    return lines + [""]


def plot(path, task, length, budgets, ours, theirs, positions):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**{k: v for k, v in theirs.items() if k[2] != "full"}, **ours}
    centres = [(a + b) / 2 for a, b in QUARTERS]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 3.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        full = rows.get((task, length, "full", 1.0))
        if full:
            cells = by_quarter(full, positions)
            ax.plot(centres, [r / max(n, 1) for r, n in cells], "k:", marker="o", label="full cache")
        for method in ("snapkv", "joint(snapkv)", "streaming", "kvpress:snapkv", "kvpress:tova"):
            got = rows.get((task, length, method, budget))
            if got:
                cells = by_quarter(got, positions)
                ax.plot(centres, [r / max(n, 1) for r, n in cells], "--" if method.startswith("kvpress:") else "-",
                        marker="o", lw=2.2 if method.startswith("joint") else 1.2, label=method)
        ax.set_title(f"{task}, {length} tokens, b = {budget}")
        ax.set_xlabel("where the answer starts (fraction of the context)")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=list(SINGLE_ANSWER))
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048])
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.75, 0.5, 0.375, 0.25])
    parser.add_argument("--out", default=os.path.join(STUDY, "answer_position.md"))
    args = parser.parse_args()
    multi = [t for t in args.tasks if t not in SINGLE_ANSWER]
    if multi:
        parser.error(f"{multi}: only the single-answer tasks {SINGLE_ANSWER} have one answer position")
    from bench import study_report
    from subtoken_jax.pretrained import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    ours, theirs = study_report.our_rows(STUDY), study_report.kvpress_rows(STUDY)
    lines = ["# Accuracy by answer position (bench/answer_position.py)", "",
             "Question only (no lookahead). Rows: ours, then kvpress's (`kvpress:`); b is the share of the context's "
             "KV bytes kept; each cell pools the prompts whose answer starts in that quarter of the context.", ""]
    for task in args.tasks:
        for length in args.lengths:
            positions = answer_positions(task, length, tokenizer)
            lines += table(task, length, args.budgets, ours, theirs, positions)
            figure = os.path.join(os.path.dirname(args.out), f"answer_position_{task}_{length}.png")
            plot(figure, task, length, [b for b in args.budgets if b in (0.5, 0.25)] or args.budgets[-1:],
                 ours, theirs, positions)
            lines += [f"![{task} {length}]({os.path.basename(figure)})", ""]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
