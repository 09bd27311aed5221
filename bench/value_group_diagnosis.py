"""Why does dropping value groups hurt SmolLM2, and what fixes it? (issue 10, step 2)

Every variant keeps the same share b of the KV bytes (--budget, default 0.75: every key and half of the
value groups), value groups chosen by the question's attention x the norm of what dropping loses, on the
same chat-templated needle prompts (seed 1234: disjoint from eval.py's, which use seed 0). A variant is
named [selector:tau/]fill[+pca][@scope][~pool][!oracle][#layer]:

  selector:tau  a token selector (snapkv, streaming, ...) keeps tau of the tokens first, and the groups then
           keep rho = 2b / tau - 1 of the survivors' pairs; "snapkv:0.375" alone is the selector at tau = b

  fill     zero: a dropped group reads as 0 (the method as built); mean: it reads as the context's mean
           of that group (per layer and KV head), and the score uses ||v - mean||
  +pca     values rotated per layer and KV head by the principal axes of values on WikiText-2 valid
           (largest-variance axes first), groups cut in that basis. The rotation is exact (v R with R
           orthogonal, R^T folded into the read-out), so it is applied to the cached values directly:
           v' = unrotate(fill(rotate(v)))
  @scope   the budget is allocated over all (layer, head) pairs ("global", the default), per layer, or
           per KV head
  ~pool    the question's attention average-pooled over +-2 tokens first (SnapKV's kernel 5; the "snapkv"
           value-group scorer)
  !oracle  scored with the attention of the question *and the full-cache answer*: an upper bound for any
           predictor of the attention to come
  #layer   only that layer's values are pruned (--per-layer VARIANT runs it for every layer)

Answers are generated greedily from a dense cache holding the variant's values (the masked-dense
reference path). Also reported: the relative error of each layer's attention read-out of the question.

    python bench/value_group_diagnosis.py [--prompts 10] [--length 512] [--variants zero,zero@head,...]
    python bench/value_group_diagnosis.py --budget 0.375 --variants "snapkv:0.375,snapkv:0.5/mean@head"
    python bench/value_group_diagnosis.py --variants "" --per-layer zero --out bench/results/per_layer.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from configs import eval as eval_config  # noqa: E402

import subtoken_jax  # noqa: E402
from subtoken_jax import data as data_lib  # noqa: E402
from subtoken_jax.evaluation import methods as methods_lib  # noqa: E402
from subtoken_jax.evaluation import tasks as tasks_lib  # noqa: E402
from subtoken_jax.selectors import capture_prefill_state  # noqa: E402
from subtoken_jax.selectors.allocate import allocate_value_groups  # noqa: E402
from subtoken_jax.selectors.base import window_attention  # noqa: E402

WIKI = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")


def fit_rotations(model, params, tokenizer, tokens=2048):
    """Per layer: [Hkv, D, D] principal axes (columns, largest variance first) of values on WikiText-2 valid."""
    text = open(WIKI, encoding="utf-8").read()[:40_000]
    ids = jnp.asarray([tokenizer.encode(text)[:tokens]])
    state = capture_prefill_state(model, params, ids, window=8)
    rotations = []
    for values in state.values:
        v = np.asarray(values[0], np.float64)  # [S, Hkv, D]
        per_head = []
        for h in range(v.shape[1]):
            x = v[:, h] - v[:, h].mean(0)
            eigval, eigvec = np.linalg.eigh(x.T @ x)
            per_head.append(eigvec[:, ::-1])
        rotations.append(jnp.asarray(np.stack(per_head), jnp.float32))
    return rotations


def split_tokens(name: str, budget: float):
    """"snapkv:0.5/mean@head" -> ("snapkv", 0.5, "mean@head", rho): the token selector keeps tau = 0.5 of the
    tokens, then the groups keep rho = 2b / tau - 1 of the survivors' pairs (tau (1 + rho) / 2 = b). No prefix:
    every key kept (tau = 1). "snapkv:0.375" alone (no groups part) is the selector at tau = b."""
    if ":" not in name:
        return None, 1.0, name, 2 * budget - 1
    selector, rest = name.split(":", 1)
    tau, _, groups = rest.partition("/")
    tau = float(tau)
    return selector, tau, groups, (min(2 * budget / tau - 1, 1.0) if groups else 1.0)


def parse_variant(name: str):
    """"mean+pca@head~pool" -> (fill, rotate, scope, pool): fill zero|mean, pca rotation, allocation scope
    (global default), and ~pool = the question's attention average-pooled over +-2 tokens (SnapKV's kernel 5).
    A trailing "!oracle" scores with the attention of the question *and the full-cache answer* (an upper
    bound for any predictor of future attention; see main)."""
    name = name.split("!")[0]
    name, pool = (name.split("~")[0], True) if "~" in name else (name, False)
    name, scope = name.split("@") if "@" in name else (name, "global")
    parts = name.split("+")
    return ("mean" if "mean" in parts else "zero"), "pca" in parts, scope, pool


def variant_values(state, rotations, variant, rho, token_masks=None):
    """Per-layer cached values after dropping (1 - rho) of the groups (of the kept tokens), the variant's way."""
    fill, rotate, scope, pool = parse_variant(variant)
    groups = state.value_groups
    real = (state.positions >= 0)[:, :, None, None]
    bases, fills, scores = [], [], []
    for layer, values in enumerate(state.values):
        v = jnp.einsum("bshd,hde->bshe", values, rotations[layer]) if rotate else values
        count = jnp.maximum(real.sum(axis=1, keepdims=True), 1)
        mean = (v * real).sum(axis=1, keepdims=True) / count if fill == "mean" else jnp.zeros_like(v[:, :1])
        attention = window_attention(state, layer)  # [B, Hkv, S]: the question's attention, mean over its heads
        if pool:  # the library's "snapkv" scorer: SnapKV's own pooling (kernel 5, avg)
            from subtoken_jax.selectors.snapkv import SnapKV, pool1d

            attention = pool1d(attention, SnapKV.kernel_size, SnapKV.pooling)
        residual = (v - mean).reshape(v.shape[:3] + (groups, -1))
        score = jnp.transpose(attention, (0, 2, 1))[..., None] * jnp.linalg.norm(residual, axis=-1)
        bases.append(v)
        fills.append(mean)
        scores.append(score)
    masks = allocate_value_groups(scores, rho, scope=scope, positions=state.positions,
                                  token_keep_masks=token_masks)
    out = []
    for layer, (v, mean, mask) in enumerate(zip(bases, fills, masks)):
        m = jnp.repeat(mask.astype(v.dtype), v.shape[-1] // groups, axis=-1)
        kept = v * m + mean * (1 - m)
        out.append(jnp.einsum("bshe,hde->bshd", kept, rotations[layer]) if rotate else kept)
    return out, masks


def output_error(state, layer, values):
    """Relative error of the question's attention read-out of layer `layer` with values replaced."""
    from subtoken_jax.attention import attend, attention_allowed

    allowed = attention_allowed(state.query_positions, state.positions)
    exact = attend(state.queries[layer], state.keys[layer], state.values[layer], allowed)
    approx = attend(state.queries[layer], state.keys[layer], values, allowed)
    return float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--budget", type=float, default=0.75, help="KV-bytes fraction every variant keeps")
    parser.add_argument("--seed", type=int, default=1234, help="prompt seed (eval.py uses 0: keep them apart)")
    parser.add_argument("--variants", default="zero,mean,zero+pca,mean+pca",
                        help="comma-separated [selector:tau/]fill[+pca][@global|layer|head][~pool][!oracle][#layer] "
                             "(see split_tokens, parse_variant; #L prunes layer L only)")
    parser.add_argument("--per-layer", default="", help="a variant to run once per layer, that layer only (#L)")
    parser.add_argument("--haystack", default="", help="a prose file for the haystacks ('' = generated filler), e.g. "
                                                      "../shared/data/wikitext-2/valid.txt (the study uses test.txt)")
    parser.add_argument("--out", default="bench/results/value_group_diagnosis.json")
    args = parser.parse_args()
    model, params, tokenizer = subtoken_jax.load_pretrained("smollm2-135m-instruct", value_groups=8)
    rotations = fit_rotations(model, params, tokenizer) if "pca" in args.variants else None
    cfg = ConfigDict({"lengths": (args.length,), "depths": tuple(np.linspace(0, 1, args.prompts)), "samples": 1})
    prompts = tasks_lib.needle_prompts(cfg, tokenizer, seed=args.seed, bos=False, chat=True,
                                       haystack=tasks_lib.read_haystack(args.haystack))
    selectors = methods_lib.make_selectors(eval_config.get_config())
    variants = [v for v in args.variants.split(",") if v]
    if args.per_layer:
        variants += [f"{args.per_layer}#{layer}" for layer in range(model.config.num_layers)]
    results = {v: {"correct": 0, "errors": []} for v in ["full"] + variants}
    for prompt in prompts:
        context, context_mask = data_lib.pad_rows([prompt.context], tokenizer.pad_id, 64)
        question = jnp.asarray([prompt.question])
        context, context_mask = jnp.asarray(context), jnp.asarray(context_mask)
        state = capture_prefill_state(model, params, context, question, context_mask=context_mask)
        capacity = context.shape[1] + question.shape[1] + prompt.answer_tokens + 14
        oracle_state, full_answer = None, None  # "full" runs first: its answer is the oracle's
        for variant in results:
            if variant.endswith("!oracle") and oracle_state is None:  # the full cache's answer is known by now
                answer_ids = jnp.asarray([tokenizer.encode(full_answer)])
                oracle_state = capture_prefill_state(model, params, context, jnp.concatenate([question, answer_ids], 1),
                                                     context_mask=context_mask)
            scored = oracle_state if variant.endswith("!oracle") else state
            name, _, only = variant.partition("#")  # "...#L": only layer L's values are pruned
            selector, tau, group_part, rho = split_tokens(name, args.budget)
            tokens = None if selector is None else selectors[selector].masks(state, tau)
            if variant == "full" or not group_part:
                values = list(state.values)
            else:
                values = variant_values(scored, rotations, group_part, rho, tokens)[0]
                if only:
                    values = [v if i == int(only) else u for i, (u, v) in enumerate(zip(state.values, values))]
            cache = methods_lib.cache_from_state(state.replace(values=tuple(values)), model.config, capacity)
            token_masks = None if tokens is None else methods_lib.widen_masks(tokens, (), capacity)[0]
            out = methods_lib.greedy_answer(model, params, cache, question, state.query_positions, token_masks, None,
                                            prompt.answer_tokens + 14)
            text = tokenizer.decode(np.asarray(out[0]))
            if variant == "full":
                full_answer = tasks_lib.first_line(text)
            ok = tasks_lib.needle_correct(text, prompt.answer)
            results[variant]["correct"] += int(ok)
            if variant != "full" and tokens is None:
                results[variant]["errors"].append([output_error(state, i, values[i]) for i in range(len(values))])
            print(f"{variant:10s} {'ok ' if ok else 'BAD'} {text[:60]!r}", flush=True)
    summary = {}
    for variant, r in results.items():
        errors = np.asarray(r["errors"]) if r["errors"] else None
        summary[variant] = {"exact_match": r["correct"] / len(prompts),
                            "output_error_mean": None if errors is None else float(errors.mean()),
                            "output_error_per_layer": None if errors is None else errors.mean(0).round(4).tolist()}
        print(variant, summary[variant]["exact_match"], summary[variant]["output_error_mean"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"budget": args.budget, "seed": args.seed, "prompts": len(prompts), "length": args.length, "results": summary}, fh, indent=2)


if __name__ == "__main__":
    main()
