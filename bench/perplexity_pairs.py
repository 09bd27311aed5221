"""Pairwise comparison of compression methods on perplexity, sequence by sequence, from an eval run.

    python eval.py --config configs/smollm2.py --workdir runs/smollm2_ppl64 --config.tasks='("perplexity",)' \
        --config.methods='("full","snapkv","key_norm","joint")' --config.budgets='(0.75,0.5,0.375,0.25)' \
        --config.perplexity.paths="('../shared/data/wikitext-2/test.txt',)" --config.perplexity.seq_len=512 \
        --config.perplexity.num_sequences=64 --config.perplexity.window=32 --config.batch_size=4 \
        --config.lookahead=0 --config.diagnostic.enabled=False
    python bench/perplexity_pairs.py runs/smollm2_ppl64/eval --method joint --against snapkv,key_norm

Another run on the same sequences joins with --also DIR:LABEL, its methods named METHOD@LABEL; e.g. the G = 1
ablation (the same eval with --config.model.value_groups=1 --config.methods='("joint",)' in runs/smollm2_ppl64_g1):

    python bench/perplexity_pairs.py runs/smollm2_ppl64/eval --also runs/smollm2_ppl64_g1/eval:G1 \
        --method joint --against snapkv,joint@G1

The continuation after a compressed prefix is scored by every method on the same sequences and tokens, so
the per-sequence difference in mean NLL per token is paired: its mean, standard error and the number of
sequences where `--method` is better say whether a gap in perplexity is more than noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict


def per_sequence(examples):
    """{(method, budget): {sequence: (nll, tokens)}} of the perplexity examples."""
    out = defaultdict(dict)
    for e in examples:
        if e.get("task") == "perplexity":
            out[e["method"], float(e["budget"])][int(e["sequence"])] = (e["nll"], e["tokens"])
    return out


def paired(a, b):
    """Mean and standard error of (NLL/token of a - NLL/token of b) over common sequences, and a's wins."""
    common = sorted(set(a) & set(b))
    diffs = [a[s][0] / a[s][1] - b[s][0] / b[s][1] for s in common]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)
    return mean, math.sqrt(var / len(diffs)), sum(d < 0 for d in diffs), len(diffs)


def perplexity(rows):
    return math.exp(sum(n for n, _ in rows.values()) / sum(t for _, t in rows.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dir", help="an eval.py output folder (WORKDIR/eval)")
    parser.add_argument("--method", default="joint")
    parser.add_argument("--against", default="snapkv,key_norm", type=lambda s: s.split(","))
    parser.add_argument("--also", action="append", default=[], metavar="DIR:LABEL",
                        help="another eval folder on the same sequences; its methods are named METHOD@LABEL")
    args = parser.parse_args()
    rows = {}
    for folder, label in [(args.eval_dir, None)] + [tuple(a.rsplit(":", 1)) for a in args.also]:
        path = os.path.join(folder, "examples.jsonl")
        if not os.path.isfile(path):
            parser.error(f"{path} is missing: run eval.py with the perplexity task first")
        found = per_sequence(map(json.loads, open(path)))
        if not found:
            parser.error(f"{path} has no per-sequence perplexity examples (an eval.py older than this script?)")
        rows.update({(m if label is None else f"{m}@{label}", b): v for (m, b), v in found.items()})
    budgets = sorted({b for m, b in rows if m != "full"}, reverse=True)
    full = rows.get(("full", 1.0))
    lines = [f"Perplexity per budget ({len(next(iter(rows.values())))} sequences)"
             + (f"; full cache {perplexity(full):.3f}" if full else ""), "",
             "| budget | " + " | ".join([args.method] + args.against) + " | "
             + " | ".join(f"{args.method} - {o}: dNLL/token (SE), wins" for o in args.against) + " |",
             "|---|" + "---|" * (1 + 2 * len(args.against))]
    for b in budgets:
        mine = rows.get((args.method, b))
        if mine is None:
            continue
        cells = [f"{perplexity(mine):.3f}"] + [f"{perplexity(rows[o, b]):.3f}" if (o, b) in rows else ""
                                               for o in args.against]
        for other in args.against:
            if (other, b) not in rows:
                cells.append("")
                continue
            mean, se, wins, n = paired(mine, rows[other, b])
            cells.append(f"{mean:+.4f} ({se:.4f}), {wins}/{n}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
