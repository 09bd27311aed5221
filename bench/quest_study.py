"""Quest and Quest + value groups on the query-aware study's prompts (SmolLM2-135M-Instruct; issue 14, item 3).

    python bench/quest_study.py                  # resumable: bench/results/quest/records.jsonl, then report.md
    python bench/quest_study.py --report-only

The study's prompts (bench/results/study/prompts: the same token ids ours and kvpress's rows ran), greedy answers,
scored as the study scores them. At a budget b of the KV bytes *read* per decode step:
  quest          reads the best pages (16 tokens each) holding about b of the context's tokens; holds the whole
                 cache (frees no memory)
  quest+groups   the study's fixed split (rho = 0.5 of the value groups, by SnapKV-pooled question attention x group
                 norm, configs/eval.py combined.value_fraction; never tuned here): reads tau = 2b / 1.5 of the
                 tokens' pages, holds every key and half the values (0.75 of the bytes, packed value groups)
Both columns of bytes are in the report: what a step reads and what the cache holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402

PROMPTS = os.path.join(ROOT, "bench", "results", "study", "prompts")
OUT = os.path.join(ROOT, "bench", "results", "quest")
PAGE = 16
RHO = 0.5


def plan(method: str, budget: float):
    """(token fraction read, value fraction kept, KV bytes held) of a method at a read budget."""
    if method == "quest":
        return budget, 1.0, 1.0
    tau = min(1.0, 2 * budget / (1 + RHO))
    return tau, RHO, (1 + RHO) / 2


def run(args):
    import numpy as np
    from tqdm.auto import tqdm

    from subtoken_jax import Compression
    from subtoken_jax.evaluation.tasks import score
    from subtoken_jax.pretrained import load_pretrained
    from subtoken_jax.quest import quest_generate

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "records.jsonl")
    done = common.done_records(path, "id", "method", "budget")
    model, params, tokenizer = load_pretrained("smollm2-135m-instruct", value_groups=8)
    prompts = []
    for task in args.tasks:
        with open(os.path.join(PROMPTS, f"{task}_{args.length}.jsonl")) as fh:
            prompts += [json.loads(line) for line in fh][:args.prompts]
    jobs = [(p, m, b) for p in prompts for m in args.methods for b in args.budgets if (p["id"], m, b) not in done]
    for prompt, method, budget in tqdm(jobs, desc="quest"):
        tau, rho, held = plan(method, budget)
        groups = None if rho >= 1 else Compression(value_fraction=rho, scorer="snapkv", scope="head")
        tokens = quest_generate(model, params, np.asarray([prompt["context"]], np.int32),
                                np.asarray([prompt["question"]], np.int32), max_new_tokens=prompt["max_new_tokens"],
                                token_fraction=tau, page_size=PAGE, compression=groups, eos_id=prompt["eos_id"])
        ids = [int(t) for t in np.asarray(tokens)[0]]
        text = tokenizer.decode(ids[:ids.index(prompt["eos_id"])] if prompt["eos_id"] in ids else ids)
        with open(path, "a") as fh:
            fh.write(json.dumps({"id": prompt["id"], "task": prompt["task"], "method": method, "budget": budget,
                                 "read": tau * (1 + rho) / 2, "held": held, "generated": text,
                                 "correct": bool(score(prompt["task"], text, prompt["answer"], chat=True))}) + "\n")


def report():
    with open(os.path.join(OUT, "records.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    budgets = sorted({r["budget"] for r in records}, reverse=True)
    lines = ["# Quest and Quest + value groups on the study's prompts (SmolLM2-135M-Instruct)", "",
             "Cells: exact match (prompts) [KV bytes read per step / held]. Budget b = bytes read per decode step.", ""]
    for task in sorted({r["task"] for r in records}):
        lines += [f"## {task}", "", "| method | " + " | ".join(f"b={b}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for method in sorted({r["method"] for r in records}):
            cells = []
            for b in budgets:
                rows = [r for r in records if r["task"] == task and r["method"] == method and r["budget"] == b]
                cells.append(f"{sum(r['correct'] for r in rows) / len(rows):.2f} ({len(rows)}) "
                             f"[{rows[0]['read']:.3f} / {rows[0]['held']:.2f}]" if rows else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(os.path.join(OUT, "report.md"), "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=["needle", "multi_key"])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["quest", "quest+groups"])
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.75, 0.5, 0.375, 0.25])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        run(args)
    report()


if __name__ == "__main__":
    main()
