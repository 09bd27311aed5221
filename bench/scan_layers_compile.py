"""Would scanning over layers cut generate's compile time? A measurement for issue 13, not a feature.

`DecoderLM` unrolls its layers, so every program that runs the model holds 30 copies of a SmolLM2 layer and XLA
compiles each one; `jax.lax.scan` over layer-stacked parameters compiles one. This builds the scanned form of
generate's full-cache decode loop (the layers' parameters and read-only cache prefixes stacked, each layer's
tail carried out of the layer scan) beside `generate._decode_full_cache`, and prints, per cache capacity, the
backend-compile seconds, the decode seconds of a warm call, and whether both decode the same tokens.

    python bench/scan_layers_compile.py [--capacities 1024,2048,4096] [--steps 15]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import machine_info, machine_line, write_json  # noqa: E402


def stack_layers(model, params, cache):
    """The layers' parameters and cache prefixes stacked on a leading layer axis (once, outside the program: a
    scanned model would store them so)."""
    import jax
    import jax.numpy as jnp

    layers = [params[f"layer_{i}"] for i in range(model.config.num_layers)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers), jnp.stack(cache.keys), jnp.stack(cache.values)


def scanned_decode(model, params, stacked, prefix_keys, prefix_values, cache, token, steps):
    """Greedy decode of `steps` tokens with the layers as one lax.scan (dense models, no routing); `stacked`,
    `prefix_keys` / `prefix_values` from `stack_layers` (cache then only gives positions and index)."""
    import jax
    import jax.numpy as jnp

    from subtoken_jax.kv_cache import TailedKVCache
    from subtoken_jax.layer_caches import TailedLayerCache
    from subtoken_jax.layers import RMSNorm
    from subtoken_jax.model import DecoderBlock

    cfg = model.config
    block = DecoderBlock(cfg, 0)  # the layer index only names errors and picks a sliding window: none here
    tailed = TailedKVCache.open(cache, steps)
    embedding = params["embed"]["embedding"]
    norm = RMSNorm(cfg.rms_norm_eps, cfg.weights_dtype)

    def step(carry, _):
        tail_keys, tail_values, tail_positions, tail_index, token = carry
        positions = jnp.maximum(jnp.max(tailed.prefix.positions, axis=1, keepdims=True) + 1,
                                jnp.max(tail_positions, axis=1, keepdims=True) + 1)
        x = jnp.take(embedding, token[:, None], axis=0).astype(cfg.compute_dtype)

        def layer(x, xs):
            layer_params, keys, values, t_keys, t_values = xs
            view = TailedLayerCache(keys, values, tailed.prefix.positions, t_keys, t_values, tail_positions,
                                    tail_index)
            x, view = block.apply({"params": layer_params}, x, positions, cache=view)
            return x, (view.tail_keys, view.tail_values)

        x, (tail_keys, tail_values) = jax.lax.scan(layer, x, (stacked, prefix_keys, prefix_values, tail_keys,
                                                              tail_values))
        x = norm.apply({"params": params["final_norm"]}, x)
        logits = (x @ embedding.T.astype(x.dtype)).astype(jnp.float32)  # SmolLM2 ties its embeddings
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        tail_positions = jax.lax.dynamic_update_slice_in_dim(tail_positions, positions, tail_index, axis=1)
        return (tail_keys, tail_values, tail_positions, tail_index + 1, token), token

    init = (jnp.stack(tailed.tail_keys), jnp.stack(tailed.tail_values), tailed.tail_positions, tailed.tail_index,
            token)
    _, tokens = jax.lax.scan(step, init, None, length=steps)
    return jnp.transpose(tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacities", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scan_layers_compile.json"))
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import subtoken_jax
    from subtoken_jax.generate import _decode_full_cache, _prefill_chunk
    from subtoken_jax.kv_cache import KVCache
    from subtoken_jax.pretrained import REGISTRY

    model, params, _ = subtoken_jax.load_pretrained(REGISTRY["smollm2-135m-instruct"].path())
    unrolled = lambda p, c, t: _decode_full_cache(model, p, c, t, jnp.zeros(t.shape, bool), jax.random.key(0),  # noqa: E731
                                                  args.steps, 0.0, None, None)[0]
    scanned = jax.jit(functools.partial(scanned_decode, model), static_argnames=("steps",))
    rows = []
    for capacity in args.capacities:
        filled = capacity - args.steps - 1
        ids = np.random.default_rng(capacity).integers(100, 20000, (1, filled)).astype(np.int32)
        cache = KVCache.create(model.config, 1, capacity)
        _, cache = _prefill_chunk(model, params, jnp.asarray(ids), jnp.arange(filled, dtype=jnp.int32)[None], cache)
        token = jnp.asarray(ids[:, -1])
        row = {"capacity": capacity}
        stacked = stack_layers(model, params, cache)
        arguments = {"unrolled": (params, cache, token), "scanned": (params, *stacked, cache, token)}
        for name, fn in (("unrolled", lambda: jax.jit(unrolled).trace(*arguments["unrolled"])),
                         ("scanned", lambda: scanned.trace(*arguments["scanned"], steps=args.steps))):
            start = time.perf_counter()
            lowered = fn().lower()
            traced = time.perf_counter()
            compiled = lowered.compile()
            done = time.perf_counter()
            out = compiled(*arguments[name])
            jax.block_until_ready(out)
            warm = time.perf_counter()
            out = compiled(*arguments[name])
            jax.block_until_ready(out)
            row[name] = {"trace_lower_s": traced - start, "compile_s": done - traced,
                         "decode_s": time.perf_counter() - warm, "tokens": np.asarray(out).tolist()}
        row["same_tokens"] = row["unrolled"]["tokens"] == row["scanned"]["tokens"]
        rows.append(row)
        print(f"capacity {capacity}: compile unrolled {row['unrolled']['compile_s']:.2f} s / scanned "
              f"{row['scanned']['compile_s']:.2f} s; trace+lower {row['unrolled']['trace_lower_s']:.2f} / "
              f"{row['scanned']['trace_lower_s']:.2f} s; warm decode of {args.steps} tokens "
              f"{row['unrolled']['decode_s']:.3f} / {row['scanned']['decode_s']:.3f} s; same tokens "
              f"{row['same_tokens']}", flush=True)
    write_json(args.out, {"machine": machine_line(machine_info()), "steps": args.steps, "rows": rows})
    print(json.dumps({"out": args.out}))


if __name__ == "__main__":
    main()
