"""The pre-registered confirmation of claims (b) / (c) (bench/results/study/confirmation_plan.md): joint(snapkv)+look24
against snapkv+look24 on multi-key 2,048-token prompts 20-99, pooled sign test over prompts.

    python bench/study_confirmation.py [--out bench/results/study]
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
    args = parser.parse_args()
    rows = study_report._ours(args.out)
    pairs = []
    for b in BUDGETS:
        fresh = lambda items: {i: v for i, v in items.items() if i >= FIRST_FRESH}  # noqa: E731
        a, s = (study_report._cell(fresh(rows.get((TASK, LENGTH, m, b), {}))) for m in (COMBINATION, SELECTOR))
        if a is None or s is None:
            sys.exit(f"no fresh prompts yet for b={b}: run the study's multi-key 2k cells first")
        a, s = study_report._on_common(a, s)
        print(f"b={b}: {COMBINATION} {a['accuracy']:.3f} vs {SELECTOR} {s['accuracy']:.3f} on {a['n']} fresh prompts, "
              "{}-{} prompts (McNemar p={:.2g})".format(*study_report.paired_test(a, s)))
        pairs.append((a, s))
    gains, losses, p = study_report.pooled_test(pairs)
    significant = p < study_report.SIGNIFICANCE
    verdict = "confirmed" if significant and gains > losses else "contradicted" if significant else "not confirmed"
    print(f"pooled over budgets: the combination gains on {gains} prompts, the selector on {losses}; sign test "
          f"p={p:.3g}: {verdict}")


if __name__ == "__main__":
    main()
