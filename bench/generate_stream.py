"""A stream of prompts of many lengths through `generate`: compile counts and time, and a long soak.

Prompts are consecutive tokens of WikiText-2 test (../shared/data) from different offsets, on
SmolLM2-135M-Instruct (G = 8). Each phase runs in a fresh process, so it pays for its own compilations:

  one length    N prompts of one length (the middle of the range), `--new-tokens` greedy tokens each;
  many lengths  N prompts of N distinct lengths drawn from [--min, --max] (seeded);

both through the full cache (`generate`, bucketed by default; with `--pin-capacity`, every prompt's cache is
pinned to one capacity, `generate(..., cache_capacity=--max + PREFILL_CHUNK + --new-tokens)`) and through the
compressed cache
(`generate(..., compression=Compression(0.5, 0.5, selector="key_norm"), bucket=True)`: KV budget 0.375).
Printed per phase: total seconds, XLA compilations (jax.monitoring's backend-compile events, eager ops
included) and the ratio many / one. `--repeats R` runs the phases R times in turn (one, many, one, many, ...):
this VM's speed drifts by 20% between runs minutes apart, so each ratio is taken within a repeat (adjacent
runs) and the median over repeats is reported beside every repeat's. `--soak N` runs N compressed generations of random lengths in
[--soak-min, --soak-max] in one process and samples its resident memory (RSS) every 10 generations.

    python bench/generate_stream.py [--prompts 20 --min 500 --max 2000] [--repeats 3] [--pin-capacity] [--soak 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import machine_info, machine_line, markdown_table, write_json  # noqa: E402

TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(args):
    """One phase in this (fresh) process; prints a JSON line."""
    import jax
    import jax.monitoring
    import numpy as np

    import subtoken_jax
    from subtoken_jax.pretrained import REGISTRY
    from subtoken_jax.shape_buckets import PREFILL_CHUNK

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    model, params, tokenizer = subtoken_jax.load_pretrained(REGISTRY["smollm2-135m-instruct"].path(), value_groups=8)
    if not os.path.isfile(TEXT):
        sys.exit(f"the prompt text {TEXT} is missing (this bench reads ../shared/data beside the checkout)")
    with open(TEXT) as fh:
        corpus = np.asarray(tokenizer.encode(fh.read()), np.int32)
    rng = np.random.default_rng(args.seed)
    if args.phase == "soak":
        lengths = rng.integers(args.soak_min, args.soak_max + 1, size=args.soak)
    elif args.phase.endswith("one"):
        lengths = np.full(args.prompts, (args.min + args.max) // 2)
    else:
        lengths = rng.choice(np.arange(args.min, args.max + 1), size=args.prompts, replace=False)
    compressed = args.phase != "full_one" and args.phase != "full_many"
    recipe = subtoken_jax.Compression(token_fraction=0.5, value_fraction=0.5, selector="key_norm")
    loaded = len(compiles)
    started, samples = time.perf_counter(), []
    for i, length in enumerate(lengths):
        start = int(rng.integers(0, len(corpus) - length))
        ids = corpus[None, start:start + length]
        if compressed:
            out = subtoken_jax.generate(model, params, ids, max_new_tokens=args.new_tokens, compression=recipe,
                                        bucket=True)
        else:
            out = subtoken_jax.generate(model, params, ids, max_new_tokens=args.new_tokens,
                                        cache_capacity=args.max + PREFILL_CHUNK + args.new_tokens
                                        if args.pin_capacity else None)
        jax.block_until_ready(out)
        if (i + 1) % 10 == 0 or i + 1 == len(lengths):
            samples.append({"generations": i + 1, "rss_mib": rss_mib(), "compiles": len(compiles) - loaded,
                            "seconds": time.perf_counter() - started})
            if args.phase == "soak":
                log(samples[-1])
    print(json.dumps({"phase": args.phase, "prompts": len(lengths), "distinct_lengths": len(set(lengths.tolist())),
                      "seconds": time.perf_counter() - started, "compiles": len(compiles) - loaded,
                      "compile_seconds": sum(compiles[loaded:]), "samples": samples}))


def run_phase(args, phase: str):
    command = [sys.executable, __file__, "--child", phase] + [f"--{k.replace('_', '-')}={v}" for k, v in (
        ("prompts", args.prompts), ("min", args.min), ("max", args.max), ("new_tokens", args.new_tokens),
        ("seed", args.seed), ("soak", args.soak), ("soak_min", args.soak_min), ("soak_max", args.soak_max))]
    command += ["--pin-capacity"] if args.pin_capacity else []
    log(f"phase {phase} ...")
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"phase {phase}: {row['seconds']:.0f} s, {row['compiles']} compilations")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--min", type=int, default=500)
    parser.add_argument("--max", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soak", type=int, default=0, help="compressed generations in one process (0: no soak)")
    parser.add_argument("--soak-min", type=int, default=100)
    parser.add_argument("--soak-max", type=int, default=1000)
    parser.add_argument("--phases", default="full_one,full_many,compressed_one,compressed_many")
    parser.add_argument("--pin-capacity", action="store_true",
                        help="the full cache of every prompt pinned to one capacity (generate's cache_capacity)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every phase, in turn (ratios per repeat)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/generate_stream.json")
    args = parser.parse_args()
    if args.child:
        args.phase = args.child
        return child(args)
    phases = [p for p in args.phases.split(",") if p]
    runs = [{phase: run_phase(args, phase) for phase in phases} for _ in range(args.repeats)]
    rows = dict(runs[0])
    if args.soak:
        rows["soak"] = run_phase(args, "soak")
    info = machine_info()
    write_json(args.out, {"rows": rows, "repeats": runs, "args": vars(args), "machine": info})
    print(machine_line(info))
    table = []
    for cache in ("full", "compressed"):
        pairs = [(run[f"{cache}_one"], run[f"{cache}_many"]) for run in runs
                 if f"{cache}_one" in run and f"{cache}_many" in run]
        for i, (one, many) in enumerate(pairs):
            label = cache if len(pairs) == 1 else f"{cache}, run {i + 1}"
            table.append([label, f"{one['seconds']:.0f} s / {one['compiles']}",
                          f"{many['seconds']:.0f} s / {many['compiles']}", f"{many['seconds'] / one['seconds']:.2f}x"])
        if len(pairs) > 1:
            ratio = statistics.median(many["seconds"] / one["seconds"] for one, many in pairs)
            table.append([f"{cache}, median of {len(pairs)}", "", "", f"{ratio:.2f}x"])
    if table:
        print(markdown_table(["cache", f"{args.prompts} prompts, one length: time / compilations",
                              f"{args.prompts} distinct lengths in [{args.min}, {args.max}]", "many / one"], table))
    if "soak" in rows:
        samples = rows["soak"]["samples"]
        print(markdown_table(["generations", "RSS (MiB)", "compilations so far", "seconds"],
                             [[s["generations"], f"{s['rss_mib']:.0f}", s["compiles"], f"{s['seconds']:.0f}"]
                              for s in samples]))


if __name__ == "__main__":
    main()
