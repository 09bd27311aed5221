"""Full-cache generation on SmolLM2-135M-Instruct: prefill chunks attending over the written slots only, against
every slot of the cache's capacity bucket (the previous behaviour), side by side in one process.

`generate` prefills a prompt in chunks of 256 tokens into a cache of a coarse capacity (two per octave, up to 1.5x
the prompt plus the new tokens). `layer_caches.WRITTEN_BLOCKS` makes each chunk attend block by block over the slots
written so far (`attention.attend_written_blocks`); set to () the chunk scores every slot of the capacity.
Per prompt length: the warm time of one generation (16 new tokens) for each variant, interleaved repeats, median.

    python bench/prefill_written_blocks.py [--lengths 700,1300,1900 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import machine_info, machine_line, markdown_table, write_json  # noqa: E402

VARIANTS = {"written blocks": (256, 128), "every slot": ()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[700, 1300, 1900])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/prefill_written_blocks.json")
    args = parser.parse_args()

    import jax
    import numpy as np

    from subtoken_jax import generate, layer_caches, shape_buckets
    from subtoken_jax.pretrained import load_pretrained

    model, params, _ = load_pretrained("smollm2-135m-instruct", value_groups=8)
    rng = np.random.default_rng(0)
    rows = []
    for length in args.lengths:
        ids = rng.integers(0, model.config.vocab_size, (1, length)).astype(np.int32)
        times = {name: [] for name in VARIANTS}
        outputs = {}
        for _ in range(args.repeats):
            for name, blocks in VARIANTS.items():
                layer_caches.WRITTEN_BLOCKS = blocks
                jax.clear_caches()  # the constant is read when the programs are traced
                jax.block_until_ready(generate(model, params, ids, max_new_tokens=16))  # compile
                start = time.perf_counter()
                outputs[name] = np.asarray(jax.block_until_ready(generate(model, params, ids, max_new_tokens=16)))
                times[name].append(time.perf_counter() - start)
        same = bool(np.array_equal(outputs["written blocks"], outputs["every slot"]))
        _, _, capacity = shape_buckets.full_prefill_plan(length, 16, model.config.max_position_embeddings)
        medians = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"prompt_tokens": length, "capacity": capacity, **{f"{k} s": v for k, v in medians.items()},
                     "speed-up": medians["every slot"] / medians["written blocks"], "same tokens": same})
        print(rows[-1], flush=True)
    layer_caches.WRITTEN_BLOCKS = VARIANTS["written blocks"]
    write_json(args.out, {"rows": rows, "args": vars(args), "machine": machine_info()})
    print(machine_line(machine_info()))
    header = list(rows[0])
    print(markdown_table(header, [[f"{r[k]:.2f}" if isinstance(r[k], float) else r[k] for k in header] for r in rows]))


if __name__ == "__main__":
    main()
