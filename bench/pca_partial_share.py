"""Does a PCA basis for the values make the joint allocation keep tokens partially, and buy more tokens?

    python bench/pca_partial_share.py                       # 3 development multi-key prompts at 1k
    python bench/pca_partial_share.py --task needle --prompts 5

For the study's development prompts (WikiText-2 valid haystack, seed 1234: never the reported prompts), prefills
context + question with SmolLM2-135M-Instruct (observation window: the question + 24 drafted answer tokens, the
main job's), runs JointCompression(kv_budget=b, scorer="snapkv") at each budget on the model as loaded and on the
same model with its values rotated to their per-head principal axes (fitted on WikiText-2 valid, as the study's
`+pca` variants), and counts over (token, layer, KV head) entries: the share that keep their key, the share of
those that keep only some of their G groups, and how many groups a partial one keeps. Writes
bench/results/pca_partial_share.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def entry_counts(model, params, prompts, budget, lookahead):
    """Groups kept per real (token, layer, KV head) entry, 0 = evicted, over the prompts."""
    import jax.numpy as jnp

    from subtoken_jax.compression import JointCompression
    from subtoken_jax.selectors import capture_prefill_state

    counts = []
    for prompt in prompts:
        state = capture_prefill_state(model, params, jnp.asarray([prompt.context]), jnp.asarray([prompt.question]),
                                      lookahead=lookahead)
        tokens, groups = JointCompression(kv_budget=budget, scorer="snapkv")(state)
        real = np.asarray(state.positions) >= 0
        counts += [(np.asarray(g) * np.asarray(t)[..., None]).sum(-1)[real].ravel() for t, g in zip(tokens, groups)]
    return np.concatenate(counts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="multi_key", choices=("needle", "multi_key", "multi_value", "two_needles"))
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--budgets", default="0.375,0.125,0.0625")
    parser.add_argument("--lookahead", type=int, default=24)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "pca_partial_share.json"))
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]

    from bench import query_aware_study as study
    from subtoken_jax.evaluation import runner

    if not os.path.isfile(study.CALIBRATION):
        parser.error(f"the calibration text {study.CALIBRATION} is missing (../shared/data beside the checkout)")
    dev = types.SimpleNamespace(dev=True, budgets=budgets, batch_size=1, prompts=args.prompts)
    config = study.study_config(dev, args.task, args.length)
    source = runner.resolve_source(config, os.path.join(ROOT, "bench", "results", "study_dev"))
    model, params = runner.load_models(config, source)[:2]
    rotated = runner.rotated_value_basis(model, params, source.tokenizer, study.CALIBRATION,
                                         config.value_basis.tokens)
    prompts = study.study_prompts(args.task, config, source.tokenizer, source.bos, source.chat, args.prompts)
    groups = model.config.value_groups
    rows = []
    for basis, weights in (("as loaded", params), ("PCA", rotated)):
        for budget in budgets:
            c = entry_counts(model, weights, prompts, budget, args.lookahead)
            kept, partial = c > 0, (c > 0) & (c < groups)
            rows.append({"basis": basis, "budget": budget, "kept_entries": float(kept.mean()),
                         "partial_among_kept": float(partial.sum() / max(kept.sum(), 1)),
                         "groups_of_a_partial": float(c[partial].mean()) if partial.any() else None})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"task": args.task, "length": args.length, "prompts": args.prompts, "lookahead": args.lookahead,
                   "value_groups": groups, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
