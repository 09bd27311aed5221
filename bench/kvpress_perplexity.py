"""kvpress on the perplexity probe: the same SmolLM2 weights (transformers' GGUF loader) and the same token ids.

    .venv/bin/python bench/kvpress_perplexity.py --write-sequences        # ours: the eval's 64 sequences, as ids
    .venv-bench/bin/python bench/kvpress_perplexity.py                    # kvpress: per-sequence NLL under presses
    python bench/perplexity_pairs.py bench/results/kvpress_perplexity --method joint --against kvpress:snapkv

The sequences are eval.py's (`tasks.perplexity_sequences` with the settings of bench/perplexity_pairs.py's
command: WikiText-2 test, 64 sequences of 512 tokens). Each sequence's first half is prefilled under the press
(SnapKV observes its last 32 tokens, as ours does), the second half then runs over the compressed cache and is
scored exactly as eval.py scores it. Writes OUT/examples.jsonl in eval.py's format, with our own per-sequence
rows (from --ours) added, so perplexity_pairs compares both sides on the same sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "bench", "results", "kvpress_perplexity")
SEQUENCES = os.path.join(OUT, "sequences.json")
BUDGETS = (0.75, 0.5, 0.375, 0.25)


def write_sequences():
    from ml_collections import ConfigDict

    from subtoken_jax.evaluation import tasks as tasks_lib
    from subtoken_jax.pretrained import load_tokenizer

    cfg = ConfigDict({"paths": (os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt"),),
                      "seq_len": 512, "num_sequences": 64, "max_bytes": 400_000})
    sequences = tasks_lib.perplexity_sequences(cfg, load_tokenizer("smollm2-135m-instruct"))
    os.makedirs(OUT, exist_ok=True)
    with open(SEQUENCES, "w") as fh:
        json.dump({"sequences": sequences.tolist(), "prefix": tasks_lib.prefix_length(sequences.shape[1] - 1, 0.5),
                   "window": 32}, fh)
    print(f"{len(sequences)} sequences -> {SEQUENCES}")


def nll_under_press(model, press, seq, prefix: int):
    """(summed NLL, tokens) of seq[prefix + 1:] given seq[:prefix] prefilled under `press` (None: full cache)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    length = len(seq) - 1
    context = torch.tensor([seq[:prefix]], dtype=torch.long)
    inputs = torch.tensor([seq[prefix:length]], dtype=torch.long)
    targets = torch.tensor(seq[prefix + 1:length + 1], dtype=torch.long)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        with press(model) if press is not None else contextlib.nullcontext():
            model(input_ids=context, past_key_values=cache, use_cache=True)
        # positions (RoPE) continue the context's; cache slots (and so the causal mask) follow the kept entries.
        # Giving cache_position = the positions instead lets the chunk's tokens see later ones once the cache
        # is shorter than the context (perplexity then drops below the full cache's)
        kept = cache.get_seq_length()
        logits = model(input_ids=inputs, past_key_values=cache, use_cache=True,
                       position_ids=torch.arange(prefix, length)[None],
                       cache_position=torch.arange(kept, kept + length - prefix)).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return float(nll), int(targets.numel())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-sequences", action="store_true")
    parser.add_argument("--ours", default=os.path.join(ROOT, "runs", "smollm2_ppl64", "eval", "examples.jsonl"))
    parser.add_argument("--presses", default="snapkv", type=lambda s: s.split(","),
                        help="comma-separated: snapkv, key_norm, streaming")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                        type=lambda s: tuple(float(b) for b in s.split(",")), help="fractions of the KV bytes kept")
    parser.add_argument("--out", default=OUT, help="folder for examples.jsonl")
    parser.add_argument("--no-full", action="store_true", help="skip transformers' full-cache row")
    args = parser.parse_args()
    if args.write_sequences:
        return write_sequences()
    if not os.path.isfile(SEQUENCES):
        parser.error(f"{SEQUENCES} is missing: run this script with --write-sequences in the package's venv first")
    import kvpress
    from tqdm.auto import tqdm

    from bench.kvpress_study import load

    spec = json.load(open(SEQUENCES))
    model = load("eager")
    presses = {"snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r, window_size=spec["window"], kernel_size=5),
               "key_norm": lambda r: kvpress.KnormPress(compression_ratio=r),
               "streaming": lambda r: kvpress.StreamingLLMPress(compression_ratio=r, n_sink=4)}
    unknown = sorted(set(args.presses) - set(presses))
    if unknown:
        parser.error(f"unknown press(es) {unknown}; choose from {sorted(presses)}")
    rows = []
    jobs = ([] if args.no_full else [("full", 1.0)]) + [(p, b) for p in args.presses for b in args.budgets]
    for name, budget in tqdm(jobs, desc="kvpress perplexity"):
        press = None if name == "full" else presses[name](1.0 - budget)
        for i, seq in enumerate(spec["sequences"]):
            nll, tokens = nll_under_press(model, press, seq, spec["prefix"])
            rows.append({"task": "perplexity", "method": "full (transformers)" if name == "full" else f"kvpress:{name}",
                         "budget": budget, "sequence": i, "nll": nll, "tokens": tokens})
    if os.path.isfile(args.ours):
        rows += [r for r in map(json.loads, open(args.ours)) if r.get("task") == "perplexity"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "examples.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} rows -> {os.path.join(args.out, 'examples.jsonl')}")


if __name__ == "__main__":
    main()
