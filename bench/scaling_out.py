"""Compressed and full-cache generation on SmolLM2-135M-Instruct: one device against meshes of 8 CPU devices.

    python bench/scaling_out.py                     # writes bench/results/scaling_out.{json,md}

Each configuration runs in its own process (8 fake CPU devices need XLA_FLAGS before jax is imported): the
same 8 study prompts (needle, ~1k tokens, left-padded into one batch), greedy, 16 new tokens, with the full
cache and with `Compression(token_fraction=0.5, value_fraction=0.5)` (37.5% of the KV bytes, packed global
layout). Reports whether every mesh gives the tokens of one device and the time of a warm call (after a first,
compiling one). The fake devices share this machine's cores: the ratios show the cost of sharding (collectives,
smaller per-device dots), not a speedup; on GPUs / TPU chips each device is its own hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = os.path.join(ROOT, "bench", "results", "study", "prompts", "needle_1024.jsonl")
MESHES = {  # name: (devices, config.mesh)
    "1 device": (1, None),
    "data 8": (8, {"data": 8, "fsdp": 1, "tensor": 1}),
    "data 4 x fsdp 2": (8, {"data": 4, "fsdp": 2, "tensor": 1}),
    "data 2 x fsdp 2 x tensor 2": (8, {"data": 2, "fsdp": 2, "tensor": 2}),  # SmolLM2's 3 KV heads: not split
}


def child(mesh_config, rows: int, new_tokens: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ml_collections import ConfigDict

    from subtoken_jax import Compression, load_pretrained
    from subtoken_jax import data as data_lib
    from subtoken_jax import sharding
    from subtoken_jax.generate import generate

    model, params, tokenizer = load_pretrained("smollm2-135m-instruct", value_groups=8)
    prompts = [json.loads(line) for line in open(PROMPTS)][:rows]
    pad = tokenizer.pad_id or 0
    context, context_mask = data_lib.pad_rows([p["context"] for p in prompts], pad, 64)
    question, question_mask = data_lib.pad_rows([p["question"] for p in prompts], pad, 8)
    mesh = None if mesh_config is None else sharding.make_mesh(ConfigDict(mesh_config))
    compression = Compression(token_fraction=0.5, value_fraction=0.5)
    calls = {
        "full": lambda: generate(model, params, jnp.concatenate([context, question], 1), max_new_tokens=new_tokens,
                                 attention_mask=jnp.concatenate([context_mask, question_mask], 1), mesh=mesh,
                                 bucket=False),
        "compressed": lambda: generate(model, params, context, attention_mask=context_mask, question_ids=question,
                                       question_mask=question_mask, compression=compression,
                                       max_new_tokens=new_tokens, mesh=mesh),
    }
    out = {"devices": jax.device_count(), "context_tokens": int(context.shape[1])}
    for name, call in calls.items():
        start = time.perf_counter()
        tokens = np.asarray(jax.block_until_ready(call()))
        first = time.perf_counter() - start
        start = time.perf_counter()
        again = np.asarray(jax.block_until_ready(call()))
        out[name] = {"tokens": tokens.tolist(), "first_s": first, "warm_s": time.perf_counter() - start,
                     "repeatable": bool((again == tokens).all())}
    print("RESULT " + json.dumps(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scaling_out"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(json.loads(args.child), args.rows, args.new_tokens)
    if not os.path.isfile(PROMPTS):
        parser.error(f"{PROMPTS} is missing: run bench/query_aware_study.py first (it writes the prompts)")
    from bench.common import machine_info, machine_line, markdown_table

    results = {}
    for name, (devices, mesh_config) in MESHES.items():
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["JAX_PLATFORMS"] = "cpu"
        if devices > 1:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        print(f"{name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(mesh_config), "--rows", str(args.rows),
                               "--new-tokens", str(args.new_tokens)], env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    reference = results["1 device"]
    rows = []
    for name, r in results.items():
        row = [name]
        for kind in ("full", "compressed"):
            same = r[kind]["tokens"] == reference[kind]["tokens"]
            row += ["yes" if same else "**no**", f"{r[kind]['warm_s']:.2f}",
                    f"{r[kind]['warm_s'] / reference[kind]['warm_s']:.2f}x"]
        rows.append(row)
    info = machine_info()
    text = (f"SmolLM2-135M-Instruct, {args.rows} needle prompts of {reference['context_tokens']} context tokens "
            f"(left-padded), greedy, {args.new_tokens} new tokens; compressed = Compression(0.5, 0.5), 37.5% of the "
            f"KV bytes, packed. Warm call times (s) on {machine_line(info)}; 8 fake CPU devices share the cores.\n\n"
            + markdown_table(["mesh", "full: same tokens", "full: s", "full: vs 1", "compressed: same tokens",
                              "compressed: s", "compressed: vs 1"], rows) + "\n")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"machine": info, "results": results}, fh)
    with open(args.out + ".md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
