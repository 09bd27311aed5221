"""Packed KV cache: real bytes and decode-step attention time at each KV budget, against the full cache.

One attention layer, batch 1, 8 KV heads of head_dim 128 (G = 8 groups of 16 channels), 32 query
heads; one decode query at the end of the context, with a dense tail of 16 decoded tokens. Random
keys/values (the timings and bytes do not depend on the values; the masks are exact-count).
A KV budget b keeps tau of the tokens (keys and values) and rho of their value groups:
nominal bytes tau * (1 + rho) / 2 of the full cache. Splits used (tau, rho):
  1.0 = (1, 1), 0.5 = (2/3, 1/2), 0.375 = (1/2, 1/2), 0.25 = (1/3, 1/2).
Layouts (packed_cache.py):
  - global: per-head token selection (top key norm, compact head-major keys) + value groups
    allocated per head (top group norm) under rho, stored as a list of (token, group) entries;
  - fixed-K: tokens shared by the KV heads (top mean key norm) + K = rho * G groups per token, stored
    the way `pack_cache` stores it for the read-out in use: group-major (the global entry format,
    `pack_fixed_k_group_major`) for --impl xla, token-major `FixedKValues` for --impl pallas;
  - fixed_k_token_major: the same masks stored token-major but read by XLA (a one-hot contraction with
    K times the dense read-out's work: what the XLA fixed-K path did before the group-major storage).
Bytes come from `cache_nbytes` (keys, values, indices, positions, counts: all arrays, metadata
included), as a fraction of the dense keys + values. Times are one layer's decode attention over
prefix + tail: `packed_attention` (global; XLA) and `packed_decode_attention` (fixed-K; --impl xla or
pallas, the kernel needs a GPU/TPU), against two dense baselines: the model's own path (`attend` on
a KVCache-layout [B, T, Hkv, D] cache) and the same softmax on a head-major [B, Hkv, T, D] cache,
which XLA reads without transposing it. A third dense row, the KVCache layout through plain einsums
(what `attend` did before its block-diagonal decode form), shows what that form saves. Per context,
each layout's budgets are timed interleaved with the dense baselines (one group per layout: the fixed-K XLA path allocates large temporaries
that would otherwise slow whatever runs after it); ratios are against that group's dense times.

    python bench/kv_cache.py [--contexts 2048 8192 32768 --repeats 10 --dtype float32 --impl xla]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_info, machine_line, markdown_table, time_interleaved, write_json  # noqa: E402
from subtoken_jax.attention import attend, attention_allowed  # noqa: E402
from subtoken_jax.kernels.packed_decode import packed_decode_attention  # noqa: E402
from subtoken_jax.packed_cache import (cache_nbytes, pack_fixed_k_group_major, pack_fixed_k_layer,  # noqa: E402
                                       pack_global, packed_attention)
from subtoken_jax.selectors import allocate_value_groups, select_tokens  # noqa: E402
from subtoken_jax.value_groups import fixed_k_mask, group_norm_scores  # noqa: E402

SPLITS = {1.0: (1.0, 1.0), 0.5: (2 / 3, 0.5), 0.375: (0.5, 0.5), 0.25: (1 / 3, 0.5)}  # budget: (tau, rho)


def dense_einsum(query, q_pos, keys, values, positions, *, head_major: bool):
    """The dense softmax(q k) v of one decode query [B, Hq, D] as one plain einsum per side.

    head_major: the cache is [B, Hkv, S, D], which XLA reads as it is; otherwise it is the KVCache
    layout [B, S, Hkv, D], which XLA copies head-major first (what `attend` did before it learnt the
    block-diagonal decode form). positions [B, S], -1 = empty.
    """
    batch, heads, dim = query.shape
    cache = "bhsd" if head_major else "bshd"
    kv_heads = keys.shape[1 if head_major else 2]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum(f"bhrd,{cache}->bhrs", q, keys).astype(jnp.float32) * dim ** -0.5
    allowed = ((positions >= 0) & (positions <= q_pos[:, None]))[:, None, None, :]
    weights = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1), 0.0)
    return jnp.einsum(f"bhrs,{cache}->bhrd", weights.astype(values.dtype), values).reshape(batch, heads, dim)


def pack_layer(layout, keys, values, positions, budget, groups, impl="xla"):
    """(layer packed in `layout` at this budget's (tau, rho), token keep mask [B, T, Hkv], group mask)."""
    tau, rho = SPLITS[budget]
    key_norm = jnp.linalg.norm(keys.astype(jnp.float32), axis=-1)  # [B, T, Hkv]
    scores = group_norm_scores(values, groups)
    if layout == "global":
        per_head = select_tokens(key_norm, tau, positions)  # [B, T, Hkv], exactly round(tau * T) per head
        group_mask = allocate_value_groups([scores], rho, scope="head", positions=positions,
                                           token_keep_masks=per_head)[0]
        return pack_global(keys, values, positions, per_head, group_mask), per_head, group_mask
    shared = select_tokens(jnp.mean(key_norm, axis=-1), tau, positions)  # [B, T, 1]
    group_mask = fixed_k_mask(scores, rho)  # K = round(rho * G) groups of every token
    group_major = layout == "fixed_k" and impl == "xla"
    pack = pack_fixed_k_group_major if group_major else pack_fixed_k_layer
    layer = pack(keys, values, positions, group_mask, token_keep_mask=shared[..., 0])
    return layer, jnp.broadcast_to(shared, keys.shape[:3]), group_mask


def bench_context(length, args, rng):
    batch, kv_heads, dim, groups, tail = args.batch, args.kv_heads, args.head_dim, args.groups, args.tail
    dtype = jnp.dtype(args.dtype)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    keys, values = normal(batch, length, kv_heads, dim), normal(batch, length, kv_heads, dim)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    tail_keys, tail_values = normal(batch, tail, kv_heads, dim), normal(batch, tail, kv_heads, dim)
    tail_pos = jnp.broadcast_to(jnp.arange(length, length + tail, dtype=jnp.int32), (batch, tail))
    query = normal(batch, args.heads, dim)
    q_pos = jnp.full((batch,), length + tail - 1, jnp.int32)
    dense_bytes = keys.nbytes + values.nbytes

    # the full cache, as DecoderLM holds it (prefix + decoded tokens in one [B, T + L, Hkv, D] cache)
    all_k, all_v = jnp.concatenate([keys, tail_keys], 1), jnp.concatenate([values, tail_values], 1)
    all_pos = jnp.concatenate([positions, tail_pos], 1)
    all_kh, all_vh = jnp.transpose(all_k, (0, 2, 1, 3)), jnp.transpose(all_v, (0, 2, 1, 3))
    dense = jax.jit(lambda q, k, v: attend(q[:, None], k, v, attention_allowed(q_pos[:, None], all_pos))[:, 0])
    dense_hm = jax.jit(lambda q, k, v: dense_einsum(q, q_pos, k, v, all_pos, head_major=True))
    dense_tm = jax.jit(lambda q, k, v: dense_einsum(q, q_pos, k, v, all_pos, head_major=False))
    dense_fns = {"dense (KVCache layout)": lambda: dense(query, all_k, all_v),
                 "dense (head-major)": lambda: dense_hm(query, all_kh, all_vh),
                 "dense (KVCache layout, plain einsum)": lambda: dense_tm(query, all_k, all_v)}
    if args.check:
        for name in ("dense (head-major)", "dense (KVCache layout, plain einsum)"):
            np.testing.assert_allclose(np.asarray(dense_fns[name]()),
                                       np.asarray(dense_fns["dense (KVCache layout)"]()), atol=1e-4)
    tail_kwargs = dict(tail_keys=tail_keys, tail_values=tail_values, tail_positions=tail_pos)
    attention = {
        "global": jax.jit(lambda q, layer: packed_attention(q[:, None], q_pos[:, None], layer, **tail_kwargs)[:, 0]),
        "fixed_k": jax.jit(lambda q, layer: packed_decode_attention(q, q_pos, layer, impl=args.impl, **tail_kwargs)),
        "fixed_k_token_major": jax.jit(lambda q, layer: packed_decode_attention(q, q_pos, layer, impl="xla",
                                                                                **tail_kwargs))}
    rows = []
    for layout in args.layouts:  # one interleaved group per layout, each with the dense baselines
        fns, group = dict(dense_fns), []
        for budget in args.budgets:
            layer, token_mask, group_mask = pack_layer(layout, keys, values, positions, budget, groups, args.impl)
            name = f"{layout} @ {budget:g}"
            fns[name] = (lambda layer=layer, fn=attention[layout]: fn(query, layer))
            if args.check:  # equals attend on the masked dense cache (the tail kept whole)
                ones = jnp.ones((batch, tail, kv_heads), bool)
                allowed = attention_allowed(q_pos[:, None], all_pos, token_keep_mask=jnp.concatenate(
                    [token_mask.astype(bool), ones], 1))
                masks = jnp.concatenate([group_mask, jnp.ones((batch, tail, kv_heads, groups), group_mask.dtype)], 1)
                expected = attend(query[:, None], all_k, all_v, allowed, value_group_mask=masks)[:, 0]
                np.testing.assert_allclose(np.asarray(fns[name]()), np.asarray(expected), atol=1e-5)
            parts = cache_nbytes(layer, by_kind=True)
            tau, rho = SPLITS[budget]
            group.append({"context": length, "budget": budget, "tau": tau, "rho": rho, "layout": layout, "name": name,
                          "bytes": parts["total"], "bytes_fraction": parts["total"] / dense_bytes,
                          "bytes_by_kind": {k: v / dense_bytes for k, v in parts.items()},
                          "nominal_fraction": tau * (1 + rho) / 2})
        timings = time_interleaved(fns, args.repeats, warmup=1)
        if not rows:
            rows += [{"context": length, "layout": name, "bytes": dense_bytes, "bytes_fraction": 1.0,
                      "median_ms": 1e3 * t["median_s"], "min_ms": 1e3 * t["min_s"]}
                     for name, t in timings.items() if name in dense_fns]
        for row in group:
            t = timings[row["name"]]
            row.update(median_ms=1e3 * t["median_s"], min_ms=1e3 * t["min_s"],
                       dense_head_major_ms=1e3 * timings["dense (head-major)"]["median_s"],
                       dense_kvcache_ms=1e3 * timings["dense (KVCache layout)"]["median_s"])
            row["vs_dense_head_major"] = row["median_ms"] / row["dense_head_major_ms"]
            row["vs_dense_kvcache"] = row["median_ms"] / row["dense_kvcache_ms"]
        rows += group
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--budgets", type=float, nargs="+", default=sorted(SPLITS, reverse=True),
                        choices=sorted(SPLITS))
    layouts = ["global", "fixed_k", "fixed_k_token_major"]
    parser.add_argument("--layouts", nargs="+", default=layouts, choices=layouts)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--tail", type=int, default=16, help="decoded tokens in the dense tail")
    parser.add_argument("--dtype", default="float32", help="cache and compute dtype (bfloat16 on GPU/TPU)")
    parser.add_argument("--impl", default="xla", choices=["xla", "pallas"], help="fixed-K decode attention")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check", action="store_true", help="also check every variant against attend on the "
                        "masked dense cache (atol 1e-5)")
    parser.add_argument("--out", default="bench/results/kv_cache.json")
    args = parser.parse_args()
    if args.impl == "pallas" and jax.default_backend() not in ("gpu", "tpu"):
        parser.error("--impl pallas runs the kernel compiled only on GPU/TPU (interpret mode on CPU is not timed)")
    started, rng = time.time(), np.random.default_rng(0)
    rows = []
    for length in args.contexts:
        rows += bench_context(length, args, rng)
        print(f"context {length} done ({time.time() - started:.0f} s)", flush=True)
    info = machine_info()
    write_json(args.out, {"rows": rows, "args": vars(args), "machine": info,
                          "splits": {str(k): v for k, v in SPLITS.items()}, "seconds": time.time() - started})
    print(f"decode attention, batch {args.batch}, {args.heads} query / {args.kv_heads} KV heads, head_dim "
          f"{args.head_dim}, G={args.groups}, {args.dtype}, tail {args.tail}, fixed-K impl {args.impl}; "
          f"{machine_line(info)}")
    table = []
    for r in rows:
        packed = "budget" in r
        table.append([r["context"], f"{r['budget']:g} (tau {r['tau']:.3g}, rho {r['rho']:g})" if packed else "full",
                      r["layout"], f"{100 * r['bytes_fraction']:.2f}%", f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}",
                      f"{r['vs_dense_head_major']:.2f}x" if packed else "",
                      f"{r['vs_dense_kvcache']:.2f}x" if packed else ""])
    print(markdown_table(["context", "KV budget", "layout", "bytes (of full)", "median ms", "min ms",
                          "vs dense head-major", "vs dense KVCache layout"], table))


if __name__ == "__main__":
    main()
