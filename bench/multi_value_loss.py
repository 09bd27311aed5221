"""Why SnapKV + lookahead 24 loses multi-value prompts the full cache answers (issue 10, claim (a)): for each such
prompt at b = 0.75 (and a few it keeps), the share of the two values' (token, layer, KV head) entries SnapKV keeps,
overall and in its sparest layer. Reads the study's cells and prompts (bench/query_aware_study.py).

    python bench/multi_value_loss.py [--budget 0.75] [--kept-examples 4]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STUDY = os.path.join(ROOT, "bench", "results", "study")


def examples(variant: str):
    out = []
    for path in sorted(glob.glob(os.path.join(STUDY, "cells", f"multi_value_1024_*_{variant}.json"))):
        with open(path) as fh:
            out += json.load(fh)["examples"]
    return out


def span(context, tokenizer, value: str):
    for candidate in (tokenizer.encode(" " + value), tokenizer.encode(value)):
        n = len(candidate)
        for start in range(len(context) - n + 1):
            if context[start:start + n] == list(candidate):
                return list(range(start, start + n))
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.75)
    parser.add_argument("--kept-examples", type=int, default=4)
    args = parser.parse_args()

    import jax.numpy as jnp
    import numpy as np

    import subtoken_jax
    from subtoken_jax.pretrained import REGISTRY
    from subtoken_jax.selectors import SnapKV, capture_prefill_state

    full = examples("full")
    compressed = [e for e in examples("tokens+look24") if e["method"] == "snapkv+look24" and e["budget"] == args.budget]
    lost = [i for i, (f, c) in enumerate(zip(full, compressed)) if f["correct"] and not c["correct"]]
    kept = [i for i, (f, c) in enumerate(zip(full, compressed)) if f["correct"] and c["correct"]]
    with open(os.path.join(STUDY, "prompts", "multi_value_1024.jsonl")) as fh:
        prompts = [json.loads(line) for line in fh]
    model, params, tokenizer = subtoken_jax.load_pretrained(REGISTRY["smollm2-135m-instruct"].path())
    print(f"b={args.budget}: {len(lost)} of {len(lost) + len(kept)} full-cache-right prompts lost")
    for i in lost + kept[:args.kept_examples]:
        prompt = prompts[i]
        state = capture_prefill_state(model, params, jnp.asarray([prompt["context"]]),
                                      jnp.asarray([prompt["question"]]), lookahead=24)
        masks = np.stack([np.asarray(m) for m in SnapKV().masks(state, args.budget)])[:, 0]  # [L, S, Hkv]
        parts = []
        for value in prompt["answer"].split():
            where = span(prompt["context"], tokenizer, value)
            if where is None:
                parts.append(f"{value}: not found as tokens")
                continue
            parts.append(f"{value}: kept {masks[:, where].mean():.2f} (sparest layer "
                         f"{masks[:, where].mean(axis=(1, 2)).min():.2f})")
        print(f"prompt {i} ({'lost' if i in lost else 'kept'}): " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
