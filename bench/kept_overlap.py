"""Which context tokens our selectors and kvpress's presses keep, on the study's real prompts (issue 10: "our
SnapKV / ExpectedAttention / StreamingLLM agree with kvpress's ... kept-set overlap").

Two steps, one per venv, on the same token ids (bench/results/study/prompts/*.jsonl):

    .venv-bench/bin/python bench/kept_overlap.py kvpress --prompts 10      # kvpress's kept sets -> JSON
    .venv/bin/python bench/kept_overlap.py ours --prompts 10               # ours, the overlap table

kvpress's side prefills context + question under the press exactly as bench/kvpress_study.py does (SnapKV's
window is the question; the compression ratio leaves b of the context) and reads which context positions are
left in each layer's cache: each kept key row is matched to the nearest key of an uncompressed prefill of the
same ids (the press prunes the cache after each layer's forward, so the kept keys are copies of those rows;
the largest match distance is printed). Ours: `Compression(token_fraction=b, selector=...)` over
`capture_prefill_state` with the question as the observation window, selectors set as the study sets them.
Overlap per (prompt, layer, KV head): |ours & kvpress's| / |kvpress's| over the context's tokens; the table
gives its mean and its 5th percentile over all of them, per press and budget.

Both sides run as the study runs them, so ExpectedAttention's settings differ on purpose here: ours averages
16 future positions and keeps no sinks (configs/eval.py), kvpress's press its defaults (512 positions, 4
sinks), and so does where the query statistics come from (ours: the question; kvpress's press: every prefilled
position of context + question). The press `expected_attention_our_settings` (kvpress's at 16 positions, no sinks)
and our row "expected_attention (ours at kvpress's settings)" (`ExpectedAttention(n_future=512, n_sink=4,
observe="prefill")`) match the two from either side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = os.path.join(ROOT, "bench", "results", "study", "prompts", "multi_key_1024.jsonl")
OUT = os.path.join(ROOT, "bench", "results", "kept_overlap")
PRESSES = ("snapkv", "streaming", "expected_attention", "expected_attention_our_settings")
BUDGETS = (0.75, 0.5, 0.375, 0.25)


def read_prompts(path: str, count: int):
    with open(path) as fh:
        return [json.loads(line) for _, line in zip(range(count), fh)]


def kvpress_side(args):
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from bench.kvpress_study import load, make_press

    torch.set_num_threads(args.threads)
    model = load("eager")
    records, worst = [], 0.0
    prompts = read_prompts(args.prompts_file, args.prompts)
    with tqdm(total=len(prompts) * len(args.presses) * len(args.budgets), desc="kvpress kept sets") as bar:
        for prompt in prompts:
            context, question = prompt["context"], prompt["question"]
            ids = torch.tensor([context + question])
            full = DynamicCache(config=model.config)
            with torch.inference_mode():
                model(input_ids=ids, past_key_values=full, use_cache=True)
            for name in args.presses:
                for budget in args.budgets:
                    ratio = (1 - budget) * len(context) / (len(context) + len(question))
                    cache = DynamicCache(config=model.config)
                    with torch.inference_mode(), make_press(name, ratio, len(question))(model):
                        model(input_ids=ids, past_key_values=cache, use_cache=True)
                    kept = []
                    for layer in range(len(cache.layers)):
                        reference = full.layers[layer].keys[0]  # [Hkv, S + Q, D]
                        pruned = cache.layers[layer].keys[0]  # [Hkv, kept, D]
                        distance = torch.cdist(pruned, reference)  # [Hkv, kept, S + Q]
                        nearest, index = distance.min(dim=-1)
                        worst = max(worst, float(nearest.max()))
                        kept.append([sorted(int(i) for i in row if i < len(context)) for row in index])
                    records.append({"id": prompt["id"], "press": name, "budget": budget, "kept": kept})
                    bar.update()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kvpress_kept.json"), "w") as fh:
        json.dump(records, fh)
    print(f"largest distance of a kept key to its matched row: {worst:.3g}")


def our_selectors(press: str):
    """{row label: our selector} compared with a press: ours as configs/eval.py sets them for the study (SnapKV
    kernel 5, 4 sinks, expected attention over 16 positions from the question), and against kvpress's
    ExpectedAttention also ours at the press's own settings (statistics over the whole prefill, 512 positions,
    4 sinks)."""
    from subtoken_jax.selectors import TOKEN_SELECTORS, ExpectedAttention

    settings = {"snapkv": dict(kernel_size=5), "streaming": dict(n_sink=4),
                "expected_attention": dict(n_future=16, n_sink=0)}
    name = "expected_attention" if press == "expected_attention_our_settings" else press  # the press matched to ours
    rows = {press: TOKEN_SELECTORS[name](**settings[name])}
    if press == "expected_attention":
        rows["expected_attention (ours at kvpress's settings)"] = ExpectedAttention(n_future=512, n_sink=4,
                                                                                    observe="prefill")
    return rows


def ours_side(args):
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    import subtoken_jax
    from subtoken_jax.compression import Compression
    from subtoken_jax.pretrained import REGISTRY
    from subtoken_jax.selectors import capture_prefill_state

    path = os.path.join(args.out, "kvpress_kept.json")
    if not os.path.isfile(path):
        sys.exit(f"{path} is missing: run the kvpress step first (.venv-bench/bin/python {__file__} kvpress)")
    with open(path) as fh:
        theirs = json.load(fh)
    prompts = {p["id"]: p for p in read_prompts(args.prompts_file, 10 ** 6)}
    model, params, _ = subtoken_jax.load_pretrained(REGISTRY["smollm2-135m-instruct"].path(), value_groups=8)
    overlaps, states = {}, {}  # states: the current prompt's captured prefill only (records come prompt by prompt)
    for record in tqdm(theirs, desc="ours"):
        prompt = prompts[record["id"]]
        if record["id"] not in states:
            states = {record["id"]: capture_prefill_state(model, params, jnp.asarray([prompt["context"]]),
                                                          jnp.asarray([prompt["question"]]),
                                                          keep_context_queries=True)}
        state = states[record["id"]]
        for row, selector in our_selectors(record["press"]).items():
            tokens, _ = Compression(token_fraction=record["budget"], selector=selector)(state)
            for layer, heads in enumerate(record["kept"]):
                mask = np.asarray(tokens[layer][0])  # [S, Hkv]
                for head, kept in enumerate(heads):
                    share = float(mask[kept, head].sum()) / max(len(kept), 1)
                    overlaps.setdefault((row, record["budget"]), []).append(share)
    rows = [{"press": press, "budget": budget, "mean": float(np.mean(v)), "p5": float(np.percentile(v, 5)),
             "cases": len(v)} for (press, budget), v in sorted(overlaps.items())]
    lines = ["| selector (ours vs kvpress's) | b | mean overlap | 5th percentile | (prompt, layer, KV head) cases |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['press']} | {r['budget']} | {r['mean']:.3f} | {r['p5']:.3f} | {r['cases']} |" for r in rows]
    with open(os.path.join(args.out, "overlap.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    with open(os.path.join(args.out, "overlap.md"), "w") as fh:
        fh.write(f"Kept-set overlap |ours & kvpress's| / |kvpress's| on {len({r['id'] for r in theirs})} "
                 f"prompts of {os.path.basename(args.prompts_file)} (`python bench/kept_overlap.py`)\n\n"
                 + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("side", choices=("kvpress", "ours"))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--prompts-file", default=PROMPTS)
    parser.add_argument("--presses", type=lambda s: s.split(","), default=list(PRESSES))
    parser.add_argument("--budgets", type=lambda s: [float(b) for b in s.split(",")], default=list(BUDGETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    (kvpress_side if args.side == "kvpress" else ours_side)(args)


if __name__ == "__main__":
    main()
