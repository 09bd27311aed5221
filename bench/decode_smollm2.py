"""SmolLM2-135M-Instruct decode speed: full cache, packed caches, and transformers, side by side in one run.

For each context length (4,096 and 8,192 tokens of WikiText-2 test, ../shared/data) the context is prefilled
once (batch 1) and its cache copied to every batch size. Then, per batch size, these decode the next
`--steps` tokens greedily, timed interleaved in shuffled order (bench/common.time_interleaved):

  full (ours)       `generate.decode_full_cache`: one compiled scan over a KVCache of context + steps slots;
  packed b, layout  the packed cache at KV-bytes budget b (tau, rho) = 0.5: (2/3, 1/2), 0.375: (1/2, 1/2),
                    0.25: (1/3, 1/2): the tau tokens of largest mean key norm (shared by the KV heads, so both
                    layouts hold the same pairs) and K = rho * G groups of largest norm per token, packed by
                    `pack_cache` in the global or the fixed-K layout (`impl="auto"`: on CPU the fixed-K
                    values are stored group-major), decoded by the compressed path's own compiled scan;
  transformers      the same GGUF through transformers (float32, sdpa attention), its DynamicCache prefilled
                    with the same ids, `steps` forward calls of one token (what its `generate` loop does),
                    cropped back to the context after each repeat.

Only decode is timed (prefill and packing happen once, before). Speeds are tokens/s of the whole batch;
ratios come from the same interleaved run. Which tokens are kept does not change the time, only how many.
`--memory` instead runs two fresh processes (a full-cache and a compressed `generate` of the 8k context at
b = 0.375) and reports each one's peak resident memory beside the bytes of the cache it decodes from.

    python bench/decode_smollm2.py [--contexts 4096 8192 --batches 1 4 --steps 32 --repeats 3]
    python bench/decode_smollm2.py --memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import machine_info, machine_line, markdown_table, time_interleaved, write_json  # noqa: E402

TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")
SPLITS = {0.5: (2 / 3, 0.5), 0.375: (0.5, 0.5), 0.25: (1 / 3, 0.5)}  # KV budget: (tau, rho), as bench/kv_cache.py


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def context_ids(tokenizer, length: int) -> np.ndarray:
    if not os.path.isfile(TEXT):
        sys.exit(f"the context text {TEXT} is missing (this bench reads ../shared/data beside the checkout)")
    with open(TEXT) as fh:
        ids = tokenizer.encode(fh.read(length * 8))
    if len(ids) < length:
        sys.exit(f"{TEXT} gives only {len(ids)} tokens, fewer than {length}")
    return np.asarray(ids[:length], np.int32)[None]


def masks_for(state, budget):
    """Per layer: tau of the tokens by mean key norm over KV heads ([B, T], shared) and K = rho * G groups by norm."""
    from subtoken_jax.selectors import select_tokens
    from subtoken_jax.value_groups import fixed_k_mask, group_norm_scores

    tau, rho = SPLITS[budget]
    tokens, groups = [], []
    for keys, values in zip(state.keys, state.values):
        norm = jnp.mean(jnp.linalg.norm(keys, axis=-1), axis=-1)  # [B, T]
        tokens.append(select_tokens(norm[..., None], tau, state.positions)[..., 0])
        groups.append(fixed_k_mask(group_norm_scores(values, state.value_groups), rho))
    return tokens, groups


def full_cache(model, state, steps: int):
    from subtoken_jax.kv_cache import KVCache

    pad = lambda x: jnp.pad(x, ((0, 0), (0, steps + 1), (0, 0), (0, 0)))  # noqa: E731
    positions = jnp.pad(state.positions, ((0, 0), (0, steps + 1)), constant_values=-1)
    dtype = model.config.compute_dtype
    return KVCache(keys=tuple(pad(k).astype(dtype) for k in state.keys),
                   values=tuple(pad(v).astype(dtype) for v in state.values), positions=positions,
                   index=jnp.asarray(state.positions.shape[1], jnp.int32))


def tile(tree, batch: int):
    return jax.tree.map(lambda x: jnp.repeat(x, batch, axis=0) if getattr(x, "ndim", 0) >= 1 else x, tree)


def bench_context(model, params, tokenizer, reference, length, args):
    import torch
    from transformers import DynamicCache

    from subtoken_jax.compressed_generate import _decode  # the compressed path's compiled decode scan
    from subtoken_jax.generate import decode_full_cache
    from subtoken_jax.packed_cache import cache_nbytes, pack_cache
    from subtoken_jax.selectors import capture_prefill_state

    # SmolLM2 holds 8,192 positions: the "8k" context leaves room for the decoded tokens
    length = min(length, model.config.max_position_embeddings - args.steps - 1)
    ids = context_ids(tokenizer, length)
    started = time.time()
    state, logits = capture_prefill_state(model, params, ids, window=8, return_logits=True)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    log(f"{length}: prefilled in {time.time() - started:.0f} s")
    masks = {b: masks_for(state, b) for b in args.budgets}
    their_cache = None
    if reference is not None:
        their_cache = DynamicCache(config=reference.config)
        with torch.inference_mode():
            reference(input_ids=torch.tensor(ids, dtype=torch.long), past_key_values=their_cache, use_cache=True)
    rows = []
    for batch in args.batches:
        rng = jax.random.key(0)
        token, done = jnp.repeat(first, batch), jnp.zeros((batch,), bool)
        full = tile(full_cache(model, state, args.steps), batch)
        fns = {"full (ours)": lambda full=full: decode_full_cache(model, params, full, token, done, rng, args.steps)[0]}
        sizes = {"full (ours)": full.nbytes() - full.positions.nbytes}
        for budget in args.budgets:
            tokens, groups = masks[budget]
            for layout in args.layouts:
                packed = pack_cache(state.keys, state.values, state.positions, tokens, groups, layout=layout,
                                    tail_capacity=args.steps + 1)
                packed = tile(packed, batch)
                position = jnp.full((batch,), length, jnp.int32)
                name = f"packed {budget:g} {layout}"
                fns[name] = (lambda packed=packed, position=position:
                             _decode(model, params, packed, token, position, done, rng, args.steps, 0.0, None, None)[0])
                sizes[name] = sum(cache_nbytes(layer) for layer in packed.layers)
        if their_cache is not None:
            theirs = DynamicCache(config=reference.config)
            for i, layer in enumerate(their_cache.layers):
                theirs.update(layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1), i)

            def run_theirs(cache=theirs, batch=batch):
                tok = torch.full((batch, 1), int(first[0]), dtype=torch.long)
                with torch.inference_mode():
                    for _ in range(args.steps):
                        out = reference(input_ids=tok, past_key_values=cache, use_cache=True)
                        tok = out.logits[:, -1].argmax(-1, keepdim=True)
                cache.crop(-args.steps)  # drop the decoded tokens again
            fns["full (transformers)"] = run_theirs
        for name, fn in fns.items():  # compile (and check) before timing
            jax.block_until_ready(fn())
        times = time_interleaved({k: (lambda fn=fn: jax.block_until_ready(fn())) for k, fn in fns.items()},
                                 args.repeats, warmup=0)
        full_tps = batch * args.steps / times["full (ours)"]["median_s"]
        for name in fns:
            tps = batch * args.steps / times[name]["median_s"]
            row = {"context": length, "batch": batch, "method": name, "steps": args.steps,
                   "median_s": times[name]["median_s"], "min_s": times[name]["min_s"], "tokens_per_s": tps,
                   "vs_full_ours": tps / full_tps, "cache_bytes": sizes.get(name)}
            if name != "full (transformers)":
                row["cache_fraction"] = sizes[name] / sizes["full (ours)"]
            rows.append(row)
            log(f"{length} x{batch} {name}: {tps:.1f} tokens/s ({row['vs_full_ours']:.2f}x ours full)")
    return rows


def memory_child(mode: str, length: int, steps: int):
    """One fresh process: a full or compressed generate of the context; prints its peak RSS as JSON."""
    import subtoken_jax
    from subtoken_jax.pretrained import REGISTRY

    model, params, tokenizer = subtoken_jax.load_pretrained(REGISTRY["smollm2-135m-instruct"].path(), value_groups=8)
    length = min(length, model.config.max_position_embeddings - steps - 1)
    ids = jnp.asarray(context_ids(tokenizer, length))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "full":
        out = subtoken_jax.generate(model, params, ids, max_new_tokens=steps, bucket=False)
        cache_bytes = sum(2 * length * model.config.num_kv_heads * model.config.resolved_head_dim * 4
                          for _ in range(model.config.num_layers))
    else:
        recipe = subtoken_jax.Compression(token_fraction=0.5, value_fraction=0.5, selector="key_norm", scorer="attention")
        out, packed = subtoken_jax.compressed_generate(model, params, ids, compression=recipe, max_new_tokens=steps,
                                                       return_cache=True)
        from subtoken_jax.packed_cache import cache_nbytes
        cache_bytes = sum(cache_nbytes(layer) for layer in packed.layers)
    jax.block_until_ready(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "context": length, "peak_rss_mib": peak / 1024, "after_load_rss_mib": base / 1024,
                      "prefix_cache_mib": cache_bytes / 2 ** 20}))


def memory(args):
    rows = []
    for mode in ("full", "compressed"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--contexts", str(max(args.contexts)),
                              "--steps", str(args.steps)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log(rows[-1])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--budgets", type=float, nargs="+", default=sorted(SPLITS, reverse=True),
                        choices=sorted(SPLITS))
    parser.add_argument("--layouts", nargs="+", default=["global", "fixed_k"], choices=["global", "fixed_k"])
    parser.add_argument("--steps", type=int, default=32, help="decoded tokens per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak memory of a full vs a compressed generate")
    parser.add_argument("--memory-child", choices=["full", "compressed"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/decode_smollm2.json")
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, max(args.contexts), args.steps)
    info = machine_info()
    if args.memory:
        rows = memory(args)
        write_json(args.out.replace(".json", "_memory.json"), {"rows": rows, "machine": info, "args": vars(args)})
        print(markdown_table(["generate", "context", "peak RSS (MiB)", "RSS after loading (MiB)",
                              "prefix cache decoded from (MiB)"],
                             [[r["mode"], r["context"], f"{r['peak_rss_mib']:.0f}", f"{r['after_load_rss_mib']:.0f}",
                               f"{r['prefix_cache_mib']:.1f}"] for r in rows]))
        return
    import torch
    import transformers

    import subtoken_jax
    from subtoken_jax.pretrained import REGISTRY

    torch.set_num_threads(os.cpu_count() or 1)
    path = REGISTRY["smollm2-135m-instruct"].path()
    model, params, tokenizer = subtoken_jax.load_pretrained(path, value_groups=8)  # G = 8 of 8 channels, as configs/smollm2.py
    reference = None
    if not args.skip_transformers:
        transformers.utils.logging.set_verbosity_error()
        folder, name = os.path.split(path)
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa").eval()
    started, rows = time.time(), []
    for length in args.contexts:
        rows += bench_context(model, params, tokenizer, reference, length, args)
    write_json(args.out, {"rows": rows, "args": vars(args), "machine": info, "seconds": time.time() - started})
    print(machine_line(info))
    print(markdown_table(["context", "batch", "decode", "cache (of full)", "tokens/s", "vs our full cache"],
                         [[r["context"], r["batch"], r["method"],
                           f"{100 * r['cache_fraction']:.1f}%" if "cache_fraction" in r else "",
                           f"{r['tokens_per_s']:.1f}", f"{r['vs_full_ours']:.2f}x"] for r in rows]))


if __name__ == "__main__":
    main()
