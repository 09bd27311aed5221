"""Query-independent routing on the real model (issue 11): SmolLM2-135M-Instruct adapted on WikiText-2 *valid*,
token-level perplexity of WikiText-2 *test* continuations over a compressed prefix at each value budget rho.

    python bench/routing_smollm2.py                 # every stage; each resumes and skips what is done
    python bench/routing_smollm2.py --stage train   # or export, eval, masks, report
    .venv-bench/bin/python bench/kvpress_perplexity.py --presses key_norm --no-full \\
        --budgets 0.875,0.75,0.6875,0.625 --out bench/results/routing_smollm2/kvpress   # kvpress rows (bench venv)

Stages:
  train   train.py --config configs/smollm2_adapt.py for each adapted row (workdirs under runs/, resumable: an
          interrupted run continues from its last checkpoint when this is rerun);
  export  the plain LoRA run merged into the base, as a Hugging Face folder (runs/smollm2_plain_norm/hf), so that
          token eviction can run on an adapted model too;
  eval    eval.py's perplexity probe on each workdir (64 sequences of 512 tokens spread over WikiText-2 test, the
          first half compressed, the second half scored; the same sequences as bench/kvpress_perplexity.py), and the
          unadapted base under every baseline. A value budget rho keeps every key and rho of the value groups,
          (1 + rho) / 2 of the KV bytes; token methods keep that fraction of whole tokens;
  masks   realised kept fraction per layer of the adaptive router (exact budget, and the causal threshold it
          trained with, trained and untrained), and what it keeps per layer, head and token (a plot);
  report  bench/results/routing_smollm2/report.md + results.json + perplexity.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.perplexity_pairs import paired, per_sequence, perplexity  # noqa: E402

OUT = os.path.join(ROOT, "bench", "results", "routing_smollm2")
RUNS = os.path.join(ROOT, "runs")
RHOS = (1.0, 0.75, 0.5, 0.375, 0.25)  # value budgets; KV bytes (1 + rho) / 2
PROBE = {"tasks": ("perplexity",), "perplexity.paths": ("../shared/data/wikitext-2/test.txt",),
         "perplexity.seq_len": 512, "perplexity.num_sequences": 64, "perplexity.window": 32, "batch_size": 4,
         "lookahead": 0, "diagnostic.enabled": False}

# adapted rows: (label, workdir under runs/, train.py overrides, value budgets evaluated)
ADAPTED = (
    ("routed adaptive + routed LoRA", "smollm2_adaptive", {}, RHOS),
    ("routed fixed-K + routed LoRA", "smollm2_fixed_k", {"adapt.routing.mode": "fixed_k"}, RHOS),
    ("plain LoRA + keep-largest-norm groups", "smollm2_plain_norm",
     {"adapt.routing.mode": "fixed_k", "adapt.routing.scorer": "norm", "adapt.lora.num_subspaces": 1,
      "adapt.lora.active_subspaces": 1}, RHOS),
    ("routed adaptive, adapter trained at rho = 0.5 only", "smollm2_adaptive_rho05", {"adapt.budgets": (0.5,)},
     (0.5,)),
)
# the same adapter evaluated another way: (label, trained workdir, alias workdir under runs/, eval method, value
# budgets, eval overrides). The adaptive router trained with its causal threshold; the exact budget (the causal
# thresholds shifted onto rho) is what the first ADAPTED row evaluates; a top-B of the raw scores was the exact rule
# before (an ablation now). Both axes, query-independent: the router's groups at rho = 0.5 plus key-norm token
# eviction on its own keys (eval method routed_tokens: tau = 2b / 1.5), below KV 0.75 where routing alone runs out
ALIAS_ROWS = (
    ("routed adaptive + routed LoRA, causal threshold as trained (budget met on average)", "smollm2_adaptive",
     "smollm2_adaptive_causal", "routed", RHOS[1:], {"routed.exact_budget": False}),
    ("routed adaptive + routed LoRA, exact budget by a top-B of raw scores (ablation)", "smollm2_adaptive",
     "smollm2_adaptive_topb", "routed", RHOS[1:], {"routed.exact_rule": "topb"}),
    ("routed adaptive (rho = 0.5) + key-norm tokens on its keys", "smollm2_adaptive",
     "smollm2_adaptive_tokens", "routed_tokens", (0.375, 0.25), {}),
)
# the unadapted base: (label, eval method)
BASE_ROWS = (
    ("keep-largest-norm groups (base)", "norm_groups"),
    ("random groups (base)", "random_groups"),
    ("largest-norm (token, group) pairs over the context (base)", "norm_span"),
    ("StreamingLLM tokens (base)", "streaming"),
    ("key-norm tokens (base)", "key_norm"),
)
KVPRESS_ROWS = (("kvpress KnormPress (key-norm tokens)", "kvpress:key_norm"),)
BASE_WORKDIR = "smollm2_routing_base"
# token eviction on an adapted model: does routing beat adaptation + token eviction? The plain LoRA run (one
# subspace, so static weights) is merged into the base and written as a Hugging Face folder (stage export), then
# evaluated like the base: its full cache at rho = 1 and token methods at equal KV bytes
MERGED_FROM = "smollm2_plain_norm"
MERGED_WORKDIR = "smollm2_plain_lora_tokens"
MERGED_ROWS = (("plain LoRA (merged): full cache", "full"), ("plain LoRA (merged) + key-norm tokens", "key_norm"),
               ("plain LoRA (merged) + StreamingLLM tokens", "streaming"))


def kv_bytes(rho: float) -> float:
    return (1.0 + rho) / 2.0


def _flag(value) -> str:
    return repr(tuple(value)) if isinstance(value, tuple) else str(value)


def _run(cmd) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def train() -> None:
    for label, name, overrides, _ in ADAPTED:
        if os.path.isfile(os.path.join(RUNS, name, "summary.json")):
            continue
        _run([sys.executable, "train.py", "--config", "configs/smollm2_adapt.py", "--workdir",
              os.path.join("runs", name)] + [f"--config.{k}={_flag(v)}" for k, v in overrides.items()])


def merged_folder() -> str:
    return os.path.join(RUNS, MERGED_FROM, "hf")


def _trained_adapter(workdir: str, stage: str):
    """(train config, base params, adapted model config, adapted params) of a finished train.py workdir."""
    from subtoken_jax import workdir as workdir_lib

    if not os.path.isfile(os.path.join(workdir, "summary.json")):
        sys.exit(f"{stage}: {workdir} has not finished training (stage train)")
    train_cfg = workdir_lib.read_workdir_config(workdir)
    base_cfg = workdir_lib.base_model_config(train_cfg)
    base_params, _ = workdir_lib.load_base(train_cfg.model.checkpoint, base_cfg)
    adapted_cfg = workdir_lib.adapted_model_config(train_cfg, base_cfg)
    params = workdir_lib.restore_adapter(adapted_cfg, base_params, train_cfg,
                                         os.path.join(workdir, "adapt", "checkpoints"))
    return train_cfg, base_params, adapted_cfg, params


def export() -> None:
    """Merges the plain LoRA run into the base and writes it (with the tokenizer) as a Hugging Face folder."""
    from subtoken_jax import save_pretrained
    from subtoken_jax.pretrained import load_tokenizer

    folder = merged_folder()
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return
    train_cfg, _, adapted_cfg, params = _trained_adapter(os.path.join(RUNS, MERGED_FROM), "export")
    save_pretrained(folder, adapted_cfg, params, tokenizer=load_tokenizer(train_cfg.model.checkpoint))
    print(f"-> {folder} (LoRA merged, routers dropped)")


def eval_folder(name: str) -> str:
    """Where a row's eval outputs are: runs/<name>/eval once evaluated here, else the committed copy under OUT/evals
    (runs/ is not committed; delete OUT/evals/<name> to evaluate a row again)."""
    fresh = os.path.join(RUNS, name, "eval")
    return fresh if os.path.isfile(os.path.join(fresh, "results.json")) else os.path.join(OUT, "evals", name)


def _eval(workdir: str, methods, budgets, **extra) -> None:
    if os.path.isfile(os.path.join(eval_folder(os.path.basename(workdir)), "results.json")):
        return
    overrides = {**PROBE, "methods": tuple(methods), "budgets": tuple(budgets), **extra}
    _run([sys.executable, "eval.py", "--config", "configs/smollm2.py", "--workdir", workdir]
         + [f"--config.{k}={_flag(v)}" for k, v in overrides.items()])


def _alias_workdir(trained: str, alias: str) -> None:
    """A workdir that links to a trained one's record and adapter, so a second eval writes its own alias/eval."""
    os.makedirs(alias, exist_ok=True)
    for name in ("config.json", "summary.json", "adapt"):
        if not os.path.exists(os.path.join(alias, name)):
            os.symlink(os.path.join(trained, name), os.path.join(alias, name))


def evaluate() -> None:
    _eval(os.path.join(RUNS, BASE_WORKDIR), ("full",) + tuple(m for _, m in BASE_ROWS), [kv_bytes(r) for r in RHOS[1:]])
    for label, name, _, rhos in ADAPTED:
        workdir = os.path.join(RUNS, name)
        if not os.path.isfile(os.path.join(workdir, "summary.json")):
            print(f"skipped {label}: {workdir} has not finished training (stage train)")
            continue
        _eval(workdir, ("routed",), [kv_bytes(r) for r in rhos])
    for label, trained, alias, method, rhos, overrides in ALIAS_ROWS:
        if os.path.isfile(os.path.join(RUNS, trained, "summary.json")):
            _alias_workdir(os.path.join(RUNS, trained), os.path.join(RUNS, alias))
            _eval(os.path.join(RUNS, alias), (method,), [kv_bytes(r) for r in rhos], **overrides)
    if os.path.isfile(os.path.join(merged_folder(), "model.safetensors")):
        _eval(os.path.join(RUNS, MERGED_WORKDIR), tuple(m for _, m in MERGED_ROWS), [kv_bytes(r) for r in RHOS[1:]],
              **{"model.checkpoint": merged_folder()})
    else:
        print(f"skipped the merged plain LoRA rows: {merged_folder()} is missing (stage export)")


# ----------------------------------------------------------------------------- masks: budgets met, what is kept


def masks() -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from subtoken_jax import workdir as workdir_lib
    from subtoken_jax.evaluation import methods as methods_lib
    from subtoken_jax.model import DecoderLM

    spec = json.load(open(os.path.join(ROOT, "bench", "results", "kvpress_perplexity", "sequences.json")))
    context = jnp.asarray(np.asarray(spec["sequences"])[:8, :spec["prefix"]])
    valid = jnp.ones(context.shape, jnp.int32)
    result = {"sequences": int(context.shape[0]), "prefix_tokens": int(context.shape[1]), "routers": {}}
    train_cfg, base_params, routed_cfg, trained = _trained_adapter(os.path.join(RUNS, ADAPTED[0][1]), "masks")
    trainable, frozen, _ = workdir_lib.fresh_adapter(routed_cfg, base_params, train_cfg)
    from subtoken_jax.lora import combine_params

    for label, params in (("trained", trained), ("untrained", combine_params(trainable, frozen))):
        rows = {}
        for rule, exact in (("exact", True), ("causal", False)):
            model = DecoderLM(routed_cfg.replace(routing=dataclasses.replace(routed_cfg.routing, exact_budget=exact)))
            for rho in RHOS[1:]:
                _, groups = methods_lib.routed_prefill(model, params, context, valid, jnp.float32(rho),
                                                       int(context.shape[1]))
                per_layer = [float(np.asarray(g).mean()) for g in groups]
                entry = {"per_layer": per_layer, "overall": float(np.mean(per_layer)),
                         "max_abs_error_points": 100 * max(abs(f - rho) for f in per_layer)}
                if exact and rho == 0.5:
                    g = np.stack([np.asarray(x) for x in groups])  # [L, B, S, H, G]
                    entry["per_layer_head"] = g.mean(axis=(1, 2, 4)).tolist()  # [L, H]
                    counts = g.sum(-1)  # groups kept per (layer, row, token, head)
                    entry["groups_per_token_histogram"] = np.bincount(counts.astype(int).ravel(),
                                                                      minlength=g.shape[-1] + 1).tolist()
                    entry["groups_per_token_by_position"] = counts.mean(axis=(0, 1, 3)).tolist()  # [S]
                rows[f"{rule}@{rho:g}"] = entry
        result["routers"][label] = rows
        jax.clear_caches()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "masks.json"), "w") as fh:
        json.dump(result, fh)
    print(f"-> {os.path.join(OUT, 'masks.json')}")
    _plot_masks(result)


def _plot_masks(result) -> None:
    trained = result["routers"].get("trained", {}).get("exact@0.5")
    if trained is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    grid = np.asarray(trained["per_layer_head"]).T
    im = axes[0].imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes[0].set(xlabel="layer", ylabel="KV head", title="share of value groups kept (rho = 0.5)")
    fig.colorbar(im, ax=axes[0])
    hist = np.asarray(trained["groups_per_token_histogram"], float)
    axes[1].bar(range(len(hist)), hist / hist.sum())
    axes[1].set(xlabel="groups kept of G = 8", ylabel="share of (layer, token, head)", title="groups kept per token")
    axes[2].plot(trained["groups_per_token_by_position"])
    axes[2].set(xlabel="context position", ylabel="mean groups kept", title="by position (8 sequences)")
    fig.suptitle("SmolLM2-135M-Instruct, trained adaptive router, 8 WikiText-2 test prefixes of "
                 f"{result['prefix_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "routing_masks.png"), dpi=110)


# ----------------------------------------------------------------------------- report


def _records(folder: str):
    path = os.path.join(folder, "results.json")
    return json.load(open(path)) if os.path.isfile(path) else []


def _read_rows(table, folder: str, label: str, method: str, rhos) -> None:
    """Adds folder's per-sequence rows of `method` at each rho's KV bytes to table[label] (when evaluated)."""
    if not os.path.isfile(os.path.join(folder, "examples.jsonl")):
        return
    rows = per_sequence(map(json.loads, open(os.path.join(folder, "examples.jsonl"))))
    records = {(r["method"], r["budget"]): r for r in _records(folder)}
    for rho in rhos:
        b = kv_bytes(rho)
        if (method, b) in rows:
            r = records.get((method, b), {})
            table.setdefault(label, {})[rho] = (rows[method, b], r.get("value_fraction"), r.get("kv_budget", b))


def collect():
    """{label: {rho: (per-sequence NLL rows, realised value fraction, realised KV bytes)}} and the full cache."""
    table = {}
    base = eval_folder(BASE_WORKDIR)
    full = (per_sequence(map(json.loads, open(os.path.join(base, "examples.jsonl")))).get(("full", 1.0))
            if os.path.isfile(os.path.join(base, "examples.jsonl")) else None)
    for label, method in BASE_ROWS:
        _read_rows(table, base, label, method, RHOS[1:])
    for label, method in MERGED_ROWS:
        _read_rows(table, eval_folder(MERGED_WORKDIR), label, method,
                   (1.0,) if method == "full" else RHOS[1:])
    for label, name, _, rhos in ADAPTED:
        _read_rows(table, eval_folder(name), label, "routed", rhos)
    for label, _, alias, method, rhos, _ in ALIAS_ROWS:
        _read_rows(table, eval_folder(alias), label, method, rhos)
    for label, method in KVPRESS_ROWS:
        _read_rows(table, os.path.join(OUT, "kvpress"), label, method, RHOS[1:])
    return table, full


def _keep_eval_outputs() -> None:
    """Copies each eval's results.json / examples.jsonl under OUT/evals/ (runs/ is not committed)."""
    import shutil

    for name in (BASE_WORKDIR, MERGED_WORKDIR) + tuple(row[2] for row in ALIAS_ROWS) + tuple(row[1] for row in ADAPTED):
        folder = os.path.join(RUNS, name, "eval")
        for file in ("results.json", "examples.jsonl"):
            if os.path.isfile(os.path.join(folder, file)):
                os.makedirs(os.path.join(OUT, "evals", name), exist_ok=True)
                shutil.copy(os.path.join(folder, file), os.path.join(OUT, "evals", name, file))


def report() -> None:
    table, full = collect()
    if full is None:
        sys.exit("report: run the eval stage first (no full-cache row yet)")
    os.makedirs(OUT, exist_ok=True)
    _keep_eval_outputs()
    ppl = {label: {rho: perplexity(v[0]) for rho, v in cells.items()} for label, cells in table.items()}
    best = {rho: min((p[rho] for p in ppl.values() if rho in p), default=None) for rho in RHOS}
    full_ppl = perplexity(full)
    lines = [f"Token-level perplexity of WikiText-2 test continuations (256 tokens) over a compressed 256-token prefix, "
             f"{len(full)} sequences, SmolLM2-135M-Instruct; full cache {full_ppl:.3f}. Cells: perplexity "
             "[realised fraction of the value bytes kept / realised KV bytes]; best per column in bold.", "",
             "| method | " + " | ".join(f"rho={r:g} (KV {kv_bytes(r):g})" for r in RHOS) + " |",
             "|---|" + "---|" * len(RHOS)]
    for label, cells in table.items():
        out = []
        for rho in RHOS:
            if rho not in cells:
                out.append("")
                continue
            value = ppl[label][rho]
            text = f"{value:.3f}"
            if best[rho] is not None and value <= best[rho] + 1e-9:
                text = f"**{text}**"
            _, vf, kv = cells[rho]
            if vf is not None or kv is not None:
                text += f" [{'' if vf is None else f'{vf:.3f}'}/{'' if kv is None else f'{kv:.3f}'}]"
            out.append(text)
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    # paired: the routed adaptive row against every other row, per budget
    mine = table.get(ADAPTED[0][0], {})
    if mine:
        lines += ["", f"Paired against {ADAPTED[0][0]}: mean NLL/token difference (its minus the other's) over the "
                  "same sequences (SE), and the sequences where routed adaptive is better.", "",
                  "| other | " + " | ".join(f"rho={r:g}" for r in RHOS[1:]) + " |", "|---|" + "---|" * len(RHOS[1:])]
        for label, cells in table.items():
            if label == ADAPTED[0][0]:
                continue
            out = []
            for rho in RHOS[1:]:
                if rho in cells and rho in mine:
                    mean, se, wins, n = paired(mine[rho][0], cells[rho][0])
                    out.append(f"{mean:+.4f} ({se:.4f}), {wins}/{n}")
                else:
                    out.append("")
            lines.append(f"| {label} | " + " | ".join(out) + " |")
    masks_path = os.path.join(OUT, "masks.json")
    if os.path.isfile(masks_path):
        m = json.load(open(masks_path))
        lines += ["", f"Realised value fraction per layer ({m['sequences']} prefixes of {m['prefix_tokens']} tokens): "
                  "largest |realised - rho| over the 30 layers, in points.", "",
                  "| router | rule | " + " | ".join(f"rho={r:g}" for r in RHOS[1:]) + " |",
                  "|---|---|" + "---|" * len(RHOS[1:])]
        for label, rows in m["routers"].items():
            for rule in ("exact", "causal"):
                cells = [f"{rows[f'{rule}@{r:g}']['max_abs_error_points']:.2f}" for r in RHOS[1:]
                         if f"{rule}@{r:g}" in rows]
                lines.append(f"| {label} | {rule} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "report.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(OUT, "results.json"), "w") as fh:
        json.dump({"full_cache": full_ppl, "sequences": len(full),
                   "rows": {label: {str(rho): {"perplexity": ppl[label][rho], "value_fraction": cells[rho][1],
                                               "kv_bytes": cells[rho][2]} for rho in cells}
                            for label, cells in table.items()}}, fh, indent=2)
    _plot(ppl, full_ppl, table)
    print(text)


def _plot(ppl, full_ppl, table) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, cells in ppl.items():
        rhos = sorted(cells)
        if len(rhos) < 2:
            continue
        style = "-" if "routed" in label or "LoRA" in label else "--" if "kvpress" in label else ":"
        # realised KV bytes where recorded: the causal rule meets rho only on average
        x = [table[label][r][2] if table[label][r][2] is not None else kv_bytes(r) for r in rhos]
        ax.plot(x, [cells[r] for r in rhos], style, marker="o", label=label)
    ax.axhline(full_ppl, color="black", lw=0.8, label=f"full cache ({full_ppl:.2f})")
    ax.set(xlabel="fraction of the prefix's KV bytes kept", ylabel="perplexity of the continuation",
           title="SmolLM2-135M-Instruct, WikiText-2 test: query-independent routing vs baselines")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "perplexity.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("all", "train", "export", "eval", "masks", "report"), default="all")
    args = parser.parse_args()
    for stage, fn in (("train", train), ("export", export), ("eval", evaluate), ("masks", masks), ("report", report)):
        if args.stage in ("all", stage):
            fn()


if __name__ == "__main__":
    main()
