"""Training-step time of routed adaptation against plain LoRA, same model, same batch, one run.

Variants (the base frozen, adapters train, as the `adapt` stage does):
  - plain LoRA: rank r on q, k, v, o, up, down; no routing;
  - routed fixed-K: value-group routing on the KV path (learned router, keep round(rho * G) groups)
    + routed subspace LoRA (S subspaces of rank r / S, k active per token);
  - routed adaptive: the same with causal adaptive routing.
Each step is `objectives.train_step` (loss, value_and_grad, AdamW from `trainer.make_optimizer`),
jitted with the trainable params and optimizer state donated, at rho = 0.375. Variants are timed
interleaved round-robin after a warm-up compile; the median step is reported, with routed / plain.

    python bench/train_step.py [--hidden 256 --layers 4 --seq 256 --batch 8 --repeats 10]
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
from configs.default import get_config  # noqa: E402
from subtoken_jax import trainer  # noqa: E402
from subtoken_jax.hf_import import add_fresh_lora  # noqa: E402
from subtoken_jax.lora import count_params, is_adapter_path, split_params  # noqa: E402
from subtoken_jax.model import DecoderLM  # noqa: E402
from subtoken_jax.model_config import LoRAConfig, ModelConfig, RoutingConfig  # noqa: E402
from subtoken_jax.objectives import LossWeights, train_step  # noqa: E402


def variants(args):
    targets = ("q", "k", "v", "o", "up", "down")
    plain = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=targets)
    routed = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=targets, num_subspaces=args.subspaces,
                        active_subspaces=args.active)
    return {"plain LoRA": (plain, RoutingConfig()),
            "routed fixed-K + routed LoRA": (routed, RoutingConfig(mode="fixed_k", temperature=0.5)),
            "routed adaptive + routed LoRA": (routed, RoutingConfig(mode="adaptive", temperature=0.5))}


def make_step(base_cfg, base_params, lora, routing, args, batch):
    """A closure running one donated, jitted train step of this variant; it keeps its own state."""
    cfg = base_cfg.replace(lora=lora, routing=routing)
    model = DecoderLM(cfg)
    trainable, frozen = split_params(add_fresh_lora(cfg, base_params, seed=0), is_adapter_path)
    stage = get_config().adapt
    tx = trainer.make_optimizer(stage, 1000, 1.0)
    step = jax.jit(lambda t, f, o, b, budget, rng: train_step(model, tx, LossWeights(), t, f, o, b, budget, rng),
                   donate_argnums=(0, 2))
    state = {"t": trainable, "o": jax.jit(tx.init)(trainable), "i": 0}
    budget = jnp.float32(args.budget)

    def run():
        rng = jax.random.fold_in(jax.random.key(0), state["i"])
        state["t"], state["o"], metrics = step(state["t"], frozen, state["o"], batch, budget, rng)
        state["i"] += 1
        return state["t"], metrics["loss"]

    n_adapter = count_params(trainable)
    return run, n_adapter


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8, help="G value groups per KV head")
    parser.add_argument("--vocab", type=int, default=259)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--subspaces", type=int, default=4)
    parser.add_argument("--active", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.375, help="value budget rho of the routed steps")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()
    started = time.time()

    base_cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                           num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                           value_groups=args.groups, max_position_embeddings=max(args.seq, 1024),
                           tie_word_embeddings=True, dtype=args.dtype)
    _, base_params = trainer.fresh_params(base_cfg, 0, args.seq)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.seq + 1))
    batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
             "loss_mask": jnp.ones((args.batch, args.seq), jnp.float32)}

    fns, adapter_params = {}, {}
    for name, (lora, routing) in variants(args).items():
        fns[name], adapter_params[name] = make_step(base_cfg, base_params, lora, routing, args, batch)
    timings = time_interleaved(fns, args.repeats, warmup=2)

    plain = timings["plain LoRA"]["median_s"]
    rows = [{"variant": name, "median_ms": 1e3 * t["median_s"], "min_ms": 1e3 * t["min_s"],
             "max_ms": 1e3 * t["max_s"], "ratio_vs_plain": t["median_s"] / plain,
             "tokens_per_s": args.batch * args.seq / t["median_s"], "adapter_params": adapter_params[name]}
            for name, t in timings.items()]
    info = machine_info()
    write_json(args.out, {"rows": rows, "args": vars(args), "machine": info, "target_ratio": 1.15,
                          "timings_s": {k: v["times_s"] for k, v in timings.items()},
                          "seconds": time.time() - started})
    print(f"train step, d={args.hidden} x {args.layers} layers, {args.heads}/{args.kv_heads} heads, G={args.groups}, "
          f"batch {args.batch} x seq {args.seq}, rho={args.budget}; {machine_line(info)}")
    print(markdown_table(["variant", "median step (ms)", "min-max (ms)", "tokens/s", "vs plain LoRA"],
                         [[r["variant"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
                           f"{r['tokens_per_s']:.0f}", f"{r['ratio_vs_plain']:.3f}x"] for r in rows]))


if __name__ == "__main__":
    main()
