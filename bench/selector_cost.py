"""Cost of query-aware selection as a fraction of the prefill it follows, same model and context.

Prefill: the model's jitted forward over the context, filling a KVCache (what every generation pays).
Selection, from the captured PrefillState (context KV + the question's queries, W = 8 question tokens),
each variant one jitted function:
  - predictor + allocation (head / global scope): the learned value-group predictor
    (selectors/predictor.py; an untrained one costs the same) scoring every layer, then
    `allocate_value_groups` keeping rho = 0.5 of the (token, head, group) pairs;
  - SnapKV + predictor + allocation: SnapKV keeps tau = 0.5 of the tokens, then the predictor
    allocates rho = 0.5 of the survivors' groups (`combine`, 37.5% of the KV bytes);
  - attention scorer + allocation: the question's realised attention x group norm (no learned part).
Models: the embedded default's shape (configs/default.py) and a bigger one; random weights (costs do
not depend on the values). All variants of one (model, context) are timed interleaved.

    python bench/selector_cost.py [--contexts 512 2048 --batch 1 --repeats 10]
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
from configs.default import get_config as default_config  # noqa: E402
from configs.predictor import get_config as predictor_config  # noqa: E402
from subtoken_jax import trainer  # noqa: E402
from subtoken_jax.kv_cache import KVCache  # noqa: E402
from subtoken_jax.model_config import ModelConfig  # noqa: E402
from subtoken_jax.selectors import SnapKV, allocate_value_groups, capture_prefill_state, combine  # noqa: E402
from subtoken_jax.selectors import value_group_scorer  # noqa: E402
from subtoken_jax.selectors.predictor import init_predictor, make_predictor, predictor_scorer  # noqa: E402


def model_configs():
    d = default_config().model
    small = dict(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                 num_layers=d.num_layers, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads,
                 value_groups=d.value_groups, tie_word_embeddings=True)
    big = dict(small, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4)
    return {f"default (d={small['hidden_size']}, {small['num_layers']} layers)": small,
            f"bigger (d={big['hidden_size']}, {big['num_layers']} layers)": big}


def selection_fns(predictor, pparams, rho: float, tau: float):
    scorer = predictor_scorer(predictor, pparams)

    def predictor_alloc(scope):
        return jax.jit(lambda state: allocate_value_groups([scorer(state, i) for i in range(state.num_layers)], rho,
                                                           scope=scope, positions=state.positions))

    return {"predictor + allocation (head)": predictor_alloc("head"),
            "predictor + allocation (global)": predictor_alloc("global"),
            "SnapKV + predictor + allocation": jax.jit(lambda state: combine(state, SnapKV(), tau, scorer, rho)),
            "attention scorer + allocation": jax.jit(
                lambda state: combine(state, None, 1.0, value_group_scorer("attention"), rho))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--question", type=int, default=8, help="question tokens (the observation window)")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/selector_cost.json")
    args = parser.parse_args()
    started, rng = time.time(), np.random.default_rng(0)
    models, max_len = model_configs(), max(args.contexts) + args.question
    rows = []
    for model_name, fields in models.items():
        cfg = ModelConfig(**fields, max_position_embeddings=max_len, dtype=args.dtype)
        model, params = trainer.fresh_params(cfg, 0, 8)
        predictor = make_predictor(predictor_config(), cfg)
        prefill = jax.jit(lambda params, ids: model.apply({"params": params}, ids,
                                                          cache=KVCache.create(cfg, ids.shape[0], ids.shape[1])))
        for length in args.contexts:
            context = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, length)), jnp.int32)
            question = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.question)), jnp.int32)
            state = capture_prefill_state(model, params, context, question)
            pparams = init_predictor(predictor, state)
            fns = {"prefill": lambda: prefill(params, context)}
            for name, fn in selection_fns(predictor, pparams, args.rho, args.tau).items():
                fns[name] = (lambda fn=fn: fn(state))
            timings = time_interleaved(fns, args.repeats, warmup=1)
            base = timings["prefill"]["median_s"]
            for name, t in timings.items():
                rows.append({"model": model_name, "context": length, "variant": name, "median_ms": 1e3 * t["median_s"],
                             "min_ms": 1e3 * t["min_s"], "fraction_of_prefill": t["median_s"] / base})
            print(f"{model_name}, context {length} done ({time.time() - started:.0f} s)", flush=True)
    info = machine_info()
    write_json(args.out, {"rows": rows, "args": vars(args), "machine": info, "target_fraction": 0.10,
                          "seconds": time.time() - started})
    print(f"selection cost vs prefill, batch {args.batch}, question {args.question} tokens, tau {args.tau}, "
          f"rho {args.rho}, {args.dtype}; {machine_line(info)}")
    print(markdown_table(["model", "context", "variant", "median ms", "min ms", "of prefill"],
                         [[r["model"], r["context"], r["variant"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}",
                           "" if r["variant"] == "prefill" else f"{100 * r['fraction_of_prefill']:.1f}%"]
                          for r in rows]))


if __name__ == "__main__":
    main()
