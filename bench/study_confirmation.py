"""The pre-registered confirmations of claims (b) / (c) (bench/results/study/confirmation_plan.md), a pooled sign
test over prompts: by default joint(snapkv)+look24 against snapkv+look24 on multi-key 2,048-token prompts 20-99.

    python bench/study_confirmation.py [--out bench/results/study]
    python bench/study_confirmation.py --task needle --length 1024 --first-fresh 30 --combination "joint(snapkv)" \
        --selector snapkv
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import study_report  # noqa: E402

TASK, LENGTH, FIRST_FRESH = "multi_key", 2048, 20
COMBINATION, SELECTOR = "joint(snapkv)+look24", "snapkv+look24"
BUDGETS = (0.75, 0.5, 0.375, 0.25)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "study"))
    parser.add_argument("--task", default=TASK)
    parser.add_argument("--length", type=int, default=LENGTH)
    parser.add_argument("--first-fresh", type=int, default=FIRST_FRESH, help="the first prompt not seen before")
    parser.add_argument("--combination", default=COMBINATION)
    parser.add_argument("--selector", default=SELECTOR)
    args = parser.parse_args()
    rows = study_report.our_rows(args.out)
    pairs = []
    for b in BUDGETS:
        fresh = lambda items: {i: v for i, v in items.items() if i >= args.first_fresh}  # noqa: E731
        a, s = (study_report._cell(fresh(rows.get((args.task, args.length, m, b), {})))
                for m in (args.combination, args.selector))
        if a is None or s is None:
            sys.exit(f"no fresh prompts yet for b={b}: run the study cells the plan names first")
        a, s = study_report._on_common(a, s)
        print(f"b={b}: {args.combination} {a['accuracy']:.3f} vs {args.selector} {s['accuracy']:.3f} on {a['n']} fresh prompts, "
              "{}-{} prompts (McNemar p={:.2g})".format(*study_report.paired_test(a, s)))
        pairs.append((a, s))
    gains, losses, p = study_report.pooled_test(pairs)
    significant = p < study_report.SIGNIFICANCE
    verdict = "confirmed" if significant and gains > losses else "contradicted" if significant else "not confirmed"
    print(f"pooled over budgets: the combination gains on {gains} prompts, the selector on {losses}; sign test "
          f"p={p:.3g}: {verdict}")


if __name__ == "__main__":
    main()
