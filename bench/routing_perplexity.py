"""Query-independent routing on WikiText-2: perplexity at each value budget, method against method.

One small byte-level base is pretrained on WikiText-2 *valid* (../shared/data); every method then
runs on that same base and is scored on WikiText-2 *test*:
  - routed fixed-K and routed adaptive value groups, each trained with routed subspace LoRA;
  - keep-largest-norm groups and random groups (no training);
  - plain LoRA fine-tuned with random group dropping (budget sampled per batch, as the routed ones);
  - token-level eviction of equal KV bytes: keys + values of (1 + rho) / 2 of the tokens, the ones
    with the lowest key norm (KNorm), 4 attention sinks always kept.
At budget rho a value-group method keeps all keys and rho of the values: (1 + rho) / 2 of the KV
bytes (the 1-bit-per-group mask is left out here; packed_cache reports it).

    python bench/routing_perplexity.py --out bench/results/routing_perplexity.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.default import get_config  # noqa: E402
from subtoken_jax import data as data_lib  # noqa: E402
from subtoken_jax import trainer  # noqa: E402
from subtoken_jax.kv_cache import KVCache  # noqa: E402
from subtoken_jax.lora import combine_params, is_adapter_path, split_params  # noqa: E402
from subtoken_jax.model import DecoderLM  # noqa: E402
from subtoken_jax.model_config import RoutingConfig  # noqa: E402
from subtoken_jax.hf_import import add_fresh_lora  # noqa: E402
from subtoken_jax.objectives import token_cross_entropy  # noqa: E402
from subtoken_jax.selectors import select_tokens  # noqa: E402
from subtoken_jax.tokenization import ByteTokenizer  # noqa: E402

WIKITEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                        "wikitext-2")
BUDGETS = (1.0, 0.75, 0.5, 0.375, 0.25)


def bench_config(quick: bool):
    c = get_config()
    c.data.source = "text_files"
    c.data.paths = (os.path.join(WIKITEXT, "valid.txt"),)
    c.seq_len = 256
    c.batch_size = 8
    c.pretrain.steps = 200 if quick else 2000
    c.adapt.steps = 50 if quick else 600
    c.checkpoint_every = 10_000  # checkpoints at the end of each stage only
    return c


def test_batches(tokenizer, seq_len, batch_size, num_batches):
    tokens = data_lib.pack_documents(data_lib.text_files(os.path.join(WIKITEXT, "test.txt")), tokenizer)
    dataset = data_lib.make_lm_dataset([data_lib.packed_examples(tokens, seq_len, "WikiText-2 test")], batch_size,
                                       seed=0, train=False)
    batches = [dataset[i] for i in range(min(num_batches, len(dataset)))]
    return lambda: iter(batches)


def adapt(config, workdir, name, base_cfg, base_params, mesh, train_iter, eval_fn, *, lora, routing):
    """Trains LoRA + routers on the frozen base under the budget schedule; returns (model, params)."""
    config = config.copy_and_resolve_references()
    config.adapt.lora.update(lora)
    config.adapt.routing.update(routing)
    cfg = trainer.adapted_model_config(config, base_cfg)
    trainable, frozen = split_params(add_fresh_lora(cfg, base_params, config.seed), is_adapter_path)
    model = DecoderLM(cfg)
    trainable = trainer.run_stage("adapt", config, os.path.join(workdir, name), model, trainable, frozen, mesh,
                                  train_iter, eval_fn, budgets=config.adapt.budgets)
    return model, combine_params(trainable, frozen)


def eviction_perplexity(model, params, eval_fn, token_fraction, sinks=4):
    """Perplexity when each layer keeps only `token_fraction` of tokens, lowest key norm first (KNorm)."""

    @jax.jit
    def step(params, batch):
        ids = batch["inputs"]
        cache = KVCache.create(model.config, ids.shape[0], ids.shape[1])
        _, cache = model.apply({"params": params}, ids, cache=cache)
        keep = tuple(select_tokens(-jnp.linalg.norm(k, axis=-1), token_fraction, cache.positions, protect_first=sinks)
                     for k in cache.keys)
        logits = model.apply({"params": params}, ids, token_keep_mask=keep)
        ce, tokens = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return ce * tokens, tokens

    total = count = 0.0
    for batch in eval_fn():
        nll, tokens = step(params, batch)
        total, count = total + float(nll), count + float(tokens)
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/routing_perplexity.json")
    parser.add_argument("--workdir", default="runs/bench_routing")
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a few steps only, to check the script runs")
    args = parser.parse_args()
    started = time.time()

    config = bench_config(args.quick)
    trainer.validate_config(config)
    tokenizer = ByteTokenizer()
    mesh = trainer.sharding_lib.make_mesh(config.mesh)
    train_iter, dev_fn = data_lib.build_datasets(config.data, tokenizer, config.seq_len, config.batch_size,
                                                 config.seed)
    eval_fn = test_batches(tokenizer, config.seq_len, config.batch_size, args.eval_batches)
    base_cfg = trainer.base_model_config(config)

    rows = []
    with trainer.sharding_lib.use_mesh(mesh):
        base_model, base_params = trainer.fresh_params(base_cfg, config.seed, config.seq_len)
        base_params = trainer.run_stage("pretrain", config, args.workdir, base_model, base_params, {}, mesh,
                                        train_iter, dev_fn, budgets=(1.0,))
        methods = {
            "routed fixed-K + routed LoRA": adapt(config, args.workdir, "fixed_k", base_cfg, base_params, mesh,
                                                  train_iter, dev_fn, lora={}, routing={"mode": "fixed_k"}),
            "routed adaptive + routed LoRA": adapt(config, args.workdir, "adaptive", base_cfg, base_params, mesh,
                                                   train_iter, dev_fn, lora={}, routing={"mode": "adaptive"}),
            "plain LoRA + random group dropping": adapt(
                config, args.workdir, "plain_random", base_cfg, base_params, mesh, train_iter, dev_fn,
                lora={"num_subspaces": 1, "active_subspaces": 1}, routing={"mode": "fixed_k", "scorer": "random"}),
            "keep-largest-norm groups": (DecoderLM(base_cfg.replace(routing=RoutingConfig(mode="fixed_k",
                                                                                          scorer="norm"))),
                                         base_params),
            "random groups": (DecoderLM(base_cfg.replace(routing=RoutingConfig(mode="fixed_k", scorer="random"))),
                              base_params),
        }
        for budget in BUDGETS:
            for name, (model, params) in methods.items():
                result = trainer.evaluate(model, params, eval_fn, budget)
                rows.append({"method": name, "value_budget": budget, "realised_value_budget": result["value_budget"],
                             "kv_bytes": (1 + result["value_budget"]) / 2, "perplexity": result["perplexity"],
                             "tokens": result["tokens"]})
            fraction = (1 + budget) / 2
            rows.append({"method": "token eviction, equal KV bytes (KNorm)", "value_budget": budget,
                         "realised_value_budget": budget, "kv_bytes": fraction, "perplexity": eviction_perplexity(base_model, base_params, eval_fn,
                                                                                 fraction)})
            print(f"budget {budget}: " + ", ".join(f"{r['method']}={r['perplexity']:.3f}" for r in rows[-6:]),
                  flush=True)

    result = {"rows": rows, "config": {"seq_len": config.seq_len, "pretrain_steps": config.pretrain.steps,
                                       "adapt_steps": config.adapt.steps, "eval_batches": args.eval_batches,
                                       "split": "train on WikiText-2 valid, evaluate on WikiText-2 test",
                                       "tokenizer": "bytes"},
              "seconds": time.time() - started, "machine": f"{os.cpu_count()} CPU cores, backend "
                                                          f"{jax.default_backend()}"}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(markdown_table(rows))


def markdown_table(rows):
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(f"rho={b:g} (KV {(1 + b) / 2:.0%})" for b in BUDGETS) + " |",
             "|---|" + "---|" * len(BUDGETS)]
    for method in methods:
        ppl = {r["value_budget"]: r["perplexity"] for r in rows if r["method"] == method}
        best = [min(r["perplexity"] for r in rows if r["value_budget"] == b) for b in BUDGETS]
        kept = {r["value_budget"]: r["realised_value_budget"] for r in rows if r["method"] == method}
        cells = [(f"**{ppl[b]:.3f}**" if ppl[b] == best[i] else f"{ppl[b]:.3f}")
                 + (f" (kept {kept[b]:.3f})" if abs(kept[b] - b) > 5e-4 else "") for i, b in enumerate(BUDGETS)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
