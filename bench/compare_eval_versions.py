"""Does a change alter what eval measures? Runs the same small SmolLM2 eval with two checkouts and compares
every record (value, realised KV bytes, tau, rho) and every generated answer.

    git worktree add /tmp/old <commit> && python bench/compare_eval_versions.py /tmp/old

Each checkout runs in its own process (its own `subtoken_jax` on sys.path); 8 needle prompts of the main
job's kind (512 tokens, chat template), full / SnapKV / StreamingLLM / subtoken / combined at
b = 1, 0.75, 0.5, 0.375, packed generation. Prints the differences (none, when behaviour is unchanged).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE_SIDE = r'''
import json, sys
root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import subtoken_jax
assert subtoken_jax.__file__.startswith(root), subtoken_jax.__file__
from configs import smollm2
from subtoken_jax.evaluation import runner
c = smollm2.get_config()
c.needle.depths = (0.0, 0.33, 0.67, 1.0)
c.budgets = (1.0, 0.75, 0.5, 0.375)
c.methods = ("full", "snapkv", "streaming", "subtoken", "combined")
c.allocation_scope, c.subtoken.scorer, c.combined.scorer = "global", "attention", "attention"
c.diagnostic.enabled = False
res = runner.run(c, out)
rows = {f"{r['method']}@{r['budget']}": [r["value"], round(r["kv_budget"], 6), round(r["tau"], 6), round(r["rho"], 6)]
        for r in res["records"]}
answers = [[e["method"], e["budget"], e["prediction"]] for e in map(json.loads, open(out + "/eval/examples.jsonl"))]
json.dump({"rows": rows, "answers": answers}, open(out + "/compare.json", "w"))
'''


def run_side(root: str) -> dict:
    out = tempfile.mkdtemp(prefix="compare_eval_")
    subprocess.run([sys.executable, "-c", ONE_SIDE, os.path.abspath(root), out], check=True, cwd=root)
    with open(os.path.join(out, "compare.json")) as fh:
        return json.load(fh)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    old = run_side(sys.argv[1])
    new = run_side(sys.argv[2] if len(sys.argv) == 3 else ROOT)
    rows = [k for k in sorted(set(old["rows"]) | set(new["rows"])) if old["rows"].get(k) != new["rows"].get(k)]
    answers = [(a, b) for a, b in zip(old["answers"], new["answers"]) if a != b]
    for k in rows:
        print(f"record {k}: {old['rows'].get(k)} -> {new['rows'].get(k)}")
    for a, b in answers[:20]:
        print(f"answer {a} -> {b}")
    print(f"{len(old['rows'])} records, {len(rows)} differ; {len(old['answers'])} answers, {len(answers)} differ"
          + ("" if len(old["answers"]) == len(new["answers"]) else " (answer counts differ)"))


if __name__ == "__main__":
    main()
