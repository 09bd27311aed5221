"""The sorts that `subtoken_jax.permutations` replaces, timed beside the scatters that replace them, on the
shapes one study batch packs and ranks (5 prompts of 2,048 tokens, 3 KV heads, G = 8), with the results checked
equal.

    python bench/permutations.py [--rows 5] [--tokens 2048] [--repeats 20]

Prints the median time of each over interleaved repeats and the ratio; writes bench/results/permutations.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from subtoken_jax.permutations import inverse_permutation, true_first  # noqa: E402


def sorted_inverse(order):
    return jnp.argsort(order, axis=-1)


def sorted_true_first(flags, n):
    order = jnp.argsort(jnp.logical_not(flags).astype(jnp.int8), axis=-1, stable=True)[..., :n]
    return order.astype(jnp.int32), jnp.take_along_axis(flags, order, axis=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    heads, groups = 3, 8
    order = jnp.asarray(np.argsort(rng.random((args.rows, heads, args.tokens * groups)), axis=-1).astype(np.int32))
    kept_pairs = jnp.asarray(rng.random((args.rows, heads, groups, args.tokens)) < 0.4)
    kept_tokens = jnp.asarray(rng.random((args.rows, heads, args.tokens)) < 0.4)
    cases = {  # name: (sort, scatter, arguments)
        "ranks of a (token, group) order (global value budget)": (jax.jit(sorted_inverse),
                                                                   jax.jit(inverse_permutation), (order,)),
        "each group's kept tokens first (packing entries)": (jax.jit(sorted_true_first, static_argnums=1),
                                                             jax.jit(true_first, static_argnums=1),
                                                             (kept_pairs, args.tokens)),
        "kept keys first (packing keys)": (jax.jit(sorted_true_first, static_argnums=1),
                                           jax.jit(true_first, static_argnums=1), (kept_tokens, args.tokens // 2)),
    }
    results = {}
    for name, (by_sort, by_scatter, inputs) in cases.items():
        for want, got in zip(jax.tree.leaves(by_sort(*inputs)), jax.tree.leaves(by_scatter(*inputs))):
            np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
        times = {"sort": [], "scatter": []}
        for _ in range(args.repeats):
            for label, fn in (("sort", by_sort), ("scatter", by_scatter)):
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                times[label].append(time.perf_counter() - start)
        medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
        results[name] = {"sort_ms": medians["sort"], "scatter_ms": medians["scatter"],
                         "scatter_over_sort": medians["scatter"] / medians["sort"]}
        print(f"{name}: sort {medians['sort']:.2f} ms, scatter {medians['scatter']:.2f} ms "
              f"({medians['scatter'] / medians['sort']:.3f}x the time; same integers)")
    out = os.path.join(ROOT, "bench", "results", "permutations.json")
    with open(out, "w") as fh:
        json.dump({"device": str(jax.devices()[0]), "rows": args.rows, "tokens": args.tokens, "results": results},
                  fh, indent=1)


if __name__ == "__main__":
    main()
