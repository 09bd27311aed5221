"""Where the joint allocation spends the bytes on the real model: per budget, the share of (token, KV head)
pairs that keep their key, how many value groups a kept one keeps, and how that varies across layers.

    python bench/joint_allocation_profile.py                  # the development prompts of the study (--dev)
    python bench/joint_allocation_profile.py --prompts bench/results/study/prompts/needle_1024.jsonl
    python bench/joint_allocation_profile.py --eviction centred   # evictions priced as the read-out's shift
    python bench/joint_allocation_profile.py --scorer kvzip_shares --scope global   # the study's joint(kvzip)@shares_global

Reads the token ids the study wrote (bench/query_aware_study.py writes OUT/prompts/<task>_<length>.jsonl),
prefills each context + question with SmolLM2-135M-Instruct and runs JointCompression(kv_budget=b) at each
budget; also, for the same prompts, where the kept tokens lie relative to the needle (for needle prompts:
the share of the needle's own tokens that keep their key, and the groups they keep). Writes
bench/results/joint_allocation_profile.json and a plot (groups kept per kept token, by layer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

BUDGETS = (0.75, 0.5, 0.375, 0.25)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=os.path.join(ROOT, "bench", "results", "study_dev", "prompts",
                                                          "needle_1024.jsonl"))
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--value-groups", type=int, default=8, help="G, as configs/smollm2.py (head_dim 64)")
    parser.add_argument("--eviction", default="whole", choices=("whole", "centred"),
                        help="JointCompression's pricing of an evicted token (compression.EVICTIONS)")
    parser.add_argument("--scorer", default="snapkv", help="JointCompression's value-group scorer (a name of "
                        "selectors.scorers.VALUE_GROUP_SCORERS; KVzip's run its repetition pass)")
    parser.add_argument("--scope", default="head", help="JointCompression's budget scope (head, layer, global)")
    parser.add_argument("--out", default=None,
                        help="default bench/results/joint_allocation_profile[_centred][_SCORER_SCOPE].json")
    args = parser.parse_args()
    if args.out is None:
        suffix = "" if args.eviction == "whole" else f"_{args.eviction}"
        suffix += "" if (args.scorer, args.scope) == ("snapkv", "head") else f"_{args.scorer}_{args.scope}"
        args.out = os.path.join(ROOT, "bench", "results", f"joint_allocation_profile{suffix}.json")
    if not os.path.isfile(args.prompts):
        parser.error(f"{args.prompts} is missing: run bench/query_aware_study.py (--dev) first, it writes the prompts")

    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from subtoken_jax import JointCompression, load_pretrained
    from subtoken_jax.selectors import capture_prefill_state
    from subtoken_jax.selectors.kvzip import reconstruction_prompt

    recipe = lambda b: JointCompression(kv_budget=b, eviction=args.eviction, scorer=args.scorer,  # noqa: E731
                                        scope=args.scope)

    model, params, tokenizer = load_pretrained("smollm2-135m-instruct", value_groups=args.value_groups)
    rows = [json.loads(line) for line in open(args.prompts)][:args.limit]
    groups = model.config.value_groups
    layers = model.config.num_layers
    # per budget: histogram of k (0 = evicted .. G) over all (layer, token, head), and per layer
    hist = {b: np.zeros(groups + 1) for b in BUDGETS}
    per_layer = {b: np.zeros((layers, groups + 1)) for b in BUDGETS}
    needle_keys = {b: [] for b in BUDGETS}
    for row in tqdm(rows, desc="prompts"):
        context = jnp.asarray([row["context"]], jnp.int32)
        question = jnp.asarray([row["question"]], jnp.int32)
        state = capture_prefill_state(model, params, context, question, reconstruct=reconstruction_prompt(recipe(1.0)))
        answer_ids = set(tokenizer.encode(str(row["answer"])))
        needle = np.asarray([i in answer_ids for i in row["context"]])  # the digits' tokens (and their repeats)
        for b in BUDGETS:
            tokens, masks = recipe(b)(state)
            for layer, g in enumerate(masks):
                k = np.asarray(g)[0].sum(-1).astype(int)  # [S, Hkv]
                counts = np.bincount(k.ravel(), minlength=groups + 1)
                hist[b] += counts
                per_layer[b][layer] += counts
                if needle.any():
                    needle_keys[b].append(float((k[needle] > 0).mean()))
    report = {"prompts": args.prompts, "n": len(rows), "value_groups": groups, "eviction": args.eviction,
              "scorer": args.scorer, "scope": args.scope, "budgets": {}}
    for b in BUDGETS:
        h = hist[b] / hist[b].sum()
        kept = h[1:].sum()
        report["budgets"][str(b)] = {
            "keys_kept": float(kept),
            "groups_per_kept_token": {str(k): float(h[k] / max(kept, 1e-12)) for k in range(1, groups + 1)},
            "whole_values_share_of_kept": float(h[groups] / max(kept, 1e-12)),
            "keys_kept_per_layer": [float(x) for x in 1 - per_layer[b][:, 0] / per_layer[b].sum(1)],
            "mean_groups_per_kept_token_per_layer": [
                float((per_layer[b][l, 1:] * np.arange(1, groups + 1)).sum() / max(per_layer[b][l, 1:].sum(), 1))
                for l in range(layers)],
            "needle_tokens_keeping_their_key": float(np.mean(needle_keys[b])) if needle_keys[b] else None,
        }
        r = report["budgets"][str(b)]
        print(f"b={b}: keys kept {r['keys_kept']:.3f}; of kept tokens {r['whole_values_share_of_kept']:.3f} keep the "
              f"whole value; groups per kept token: "
              + " ".join(f"{k}:{v:.2f}" for k, v in r["groups_per_kept_token"].items())
              + (f"; needle tokens keeping their key {r['needle_tokens_keeping_their_key']:.3f}"
                 if r["needle_tokens_keeping_their_key"] is not None else ""))
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    plot(report, args.out.replace(".json", ".png"))
    print("wrote", args.out)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for b, r in report["budgets"].items():
        axes[0].plot(r["keys_kept_per_layer"], label=f"b={b}")
        axes[1].plot(r["mean_groups_per_kept_token_per_layer"], label=f"b={b}")
    axes[0].set(xlabel="layer", ylabel="share of (token, KV head) keeping its key", title="joint: keys kept")
    axes[1].set(xlabel="layer", ylabel=f"mean groups kept (of {report['value_groups']})",
                title="joint: groups per kept token")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {report['n']} prompts ({os.path.basename(report['prompts'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
