"""Which form of the global layout's pure-block read-out XLA runs fastest on this backend.

`packed_cache._read_global` reads a pure block (entries of one group) as weights [R * Tq, L] x values [L, gd].
On XLA's CPU backend a 16-column dot is slow, so it pairs entries (pair 2: 32 columns, keeping the diagonal of
a 2 x 2 product, i.e. twice the multiply-adds it needs). This times that against the forms that do no extra
work, side by side in one process on the shapes of `bench/kv_cache.py` at 32k tokens, b = 0.375
(C = 64k entries per KV head, blocks of 256, gd = 16, 8 KV heads, 4 query heads each), after checking that
every form gives the same numbers.

    python bench/global_readout_forms.py [--entries 65536] [--repeats 15]
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def paired(pair, shape):
    batch, heads, reps, q_len, blocks, block, gd = shape

    @jax.jit
    def read(w, v):
        ww = w.reshape(batch, heads, reps, q_len, blocks, block // pair, pair)
        vv = v.reshape(batch, heads, blocks, block // pair, pair * gd)
        s = jnp.einsum("bhrtnap,bhnaf->bhnrtpf", ww, vv).reshape(batch, heads, blocks, reps, q_len, pair, pair, gd)
        return jnp.einsum("bhnrtppe->bhnrte", s)
    return read


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=65536)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    batch, heads, reps, q_len, gd = 1, 8, 4, 1, 16
    blocks = args.entries // args.block
    shape = (batch, heads, reps, q_len, blocks, args.block, gd)
    key_w, key_v = jax.random.split(jax.random.key(0))
    w = jax.random.uniform(key_w, (batch, heads, reps, q_len, blocks, args.block))
    v = jax.random.normal(key_v, (batch, heads, blocks, args.block, gd))
    v_minor = jnp.swapaxes(v, -1, -2)  # values stored [gd, L] per block: the reduction over the minor axis
    forms = {
        "pair 2 (packed_cache today)": (paired(2, shape), v),
        "pair 1 (plain 16-column dot)": (paired(1, shape), v),
        "pair 4": (paired(4, shape), v),
        "multiply + sum over entries": (jax.jit(lambda w, v: jnp.sum(
            jnp.moveaxis(w, (2, 3), (3, 4))[..., None] * v[:, :, :, None, None], axis=-2)), v),
        "values [gd, L], dot": (jax.jit(lambda w, vt: jnp.einsum("bhrtnl,bhnel->bhnrte", w, vt)), v_minor),
    }
    reference = np.einsum("bhrtnl,bhnle->bhnrte", np.asarray(w, np.float64), np.asarray(v, np.float64))
    times = {}
    for name, (fn, values) in forms.items():
        np.testing.assert_allclose(np.asarray(fn(w, values)), reference, rtol=1e-4, atol=1e-3)
        times[name] = []
    for _ in range(args.repeats):  # interleaved, so load on the machine hits every form alike
        for name, (fn, values) in forms.items():
            start = time.perf_counter()
            fn(w, values).block_until_ready()
            times[name].append(time.perf_counter() - start)
    base = np.median(times["pair 2 (packed_cache today)"])
    print(f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
          f"{args.entries} entries per KV head, blocks of {args.block}")
    print("| form | median ms | / pair 2 |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {1e3 * np.median(ts):.2f} | {np.median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
