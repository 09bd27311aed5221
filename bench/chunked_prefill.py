"""Chunked prefill with compression between chunks on SmolLM2-135M-Instruct (issue 14, item 1).

    python bench/chunked_prefill.py --stage memory     # an ~8k-token context at budget 0.25, chunks of 512
    python bench/chunked_prefill.py --stage memory --bucket   # the same with bucketed shapes (memory_bucketed.json)
    python bench/chunked_prefill.py --stage accuracy   # the study's needle / multi-key prompts: chunked vs one-shot
    python bench/chunked_prefill.py --stage report     # bench/results/chunked_prefill.md from what is done

memory: one needle prompt of ~8,000 context tokens (WikiText-2 test haystack, the study's builder, seed 2026), the
answer generated three ways, each in its own process so that its peak resident memory (ru_maxrss) is its own:
the full cache, one-shot compression (whole context prefilled, then compressed) and chunked compression. The
cache's bytes come from its own arrays (`chunked_prefill` rounds: survivors + chunk while the chunk is held).

accuracy: the study's prompts (bench/results/study/prompts, token ids; the same the study and kvpress ran),
greedy answers from one-shot and from chunked compression (chunks of 256 tokens; "chunked" observes each chunk
through its own last tokens, "chunked+question" through the question: `observe_question`), same recipe and
budget, scored as the study scores them. (Variable tracking is beyond this model: 0.00 of 30 with the full cache,
bench/query_aware_study.py, so the accuracy cost is measured on needle and multi-key.) Resumable: OUT/accuracy.jsonl has one line per (prompt, method, budget, mode).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "bench"))

OUT = os.path.join(ROOT, "bench", "results", "chunked_prefill")
PROMPTS = os.path.join(ROOT, "bench", "results", "study", "prompts")
MEMORY_LENGTH, MEMORY_CHUNK, MEMORY_BUDGET = 8000, 512, 0.25
ACCURACY_CHUNK = 256
MODES = ("one_shot", "chunked", "chunked+question")
MIB = 1 << 20


def recipe(name: str, budget: float):
    from subtoken_jax import Compression, JointCompression

    if name == "snapkv":  # token selection alone, per KV head
        return Compression(token_fraction=budget, selector="snapkv", scope="head")
    if name == "joint(snapkv)":
        return JointCompression(kv_budget=budget, scorer="snapkv")
    if name == "joint(snapkv)+look24":
        return JointCompression(kv_budget=budget, scorer="snapkv", lookahead=24)
    raise ValueError(name)


def load_model():
    from subtoken_jax.pretrained import load_pretrained

    return load_pretrained("smollm2-135m-instruct", value_groups=8)


def memory_prompt(tokenizer):
    import query_aware_study as study

    args = argparse.Namespace(dev=False, budgets=[MEMORY_BUDGET], batch_size=1, prompts=1)
    config = study.study_config(args, "needle", MEMORY_LENGTH)
    return study.study_prompts("needle", config, tokenizer, False, True, 1)[0]


def memory_one(mode: str, bucket: bool):
    """Runs one mode in this process; prints one JSON line (answer, bytes, peak RSS, seconds)."""
    import numpy as np

    from subtoken_jax import generate
    from subtoken_jax.chunked_prefill import chunked_compressed_generate
    from subtoken_jax.evaluation.tasks import new_tokens, score

    model, params, tokenizer = load_model()
    prompt = memory_prompt(tokenizer)
    context, question = np.asarray([prompt.context], np.int32), np.asarray([prompt.question], np.int32)
    new = new_tokens(prompt, 4)
    compression = recipe("joint(snapkv)", MEMORY_BUDGET)
    start = time.perf_counter()
    rounds = None
    if mode == "full":
        tokens = generate(model, params, context, question_ids=question, max_new_tokens=new)
    elif mode == "one_shot":
        tokens = generate(model, params, context, question_ids=question, max_new_tokens=new, compression=compression,
                          bucket=bucket)
    else:  # bucket: a bounded number of compiled programs (their code is part of the peak on CPU), padded sizes
        tokens, _, rounds = chunked_compressed_generate(model, params, context, question_ids=question,
                                                        max_new_tokens=new, compression=compression,
                                                        chunk_size=MEMORY_CHUNK, bucket=bucket)
    text = tokenizer.decode([int(t) for t in np.asarray(tokens)[0]])
    print(json.dumps({"mode": mode, "context_tokens": len(prompt.context), "answer": prompt.answer, "generated": text,
                      "correct": bool(score("needle", text, prompt.answer, chat=True)), "rounds": rounds,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - start}))


def memory_file(bucket: bool) -> str:
    return "memory_bucketed.json" if bucket else "memory.json"


def run_memory(bucket: bool):
    results = []
    for mode in ("full", "one_shot", "chunked"):
        done = subprocess.run([sys.executable, __file__, "--memory-one", mode] + (["--bucket"] if bucket else []), check=True, capture_output=True,
                              text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {results[-1]['peak_rss_mib']:.0f} MiB peak, correct={results[-1]['correct']}", flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, memory_file(bucket)), "w") as fh:
        json.dump({"bucket": bucket, "budget": MEMORY_BUDGET, "chunk": MEMORY_CHUNK, "results": results}, fh, indent=1)


def read_prompts(task: str, length: int, count: int):
    with open(os.path.join(PROMPTS, f"{task}_{length}.jsonl")) as fh:
        return [json.loads(line) for line in fh][:count]


def run_accuracy(args):
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from subtoken_jax import generate
    from subtoken_jax.chunked_prefill import chunked_compressed_generate
    from subtoken_jax.evaluation.tasks import score

    path = os.path.join(OUT, "accuracy.jsonl")
    os.makedirs(OUT, exist_ok=True)
    done = common.done_records(path, "id", "method", "budget", "mode")
    model, params, tokenizer = load_model()
    jobs = [(p, method, budget, mode) for task in args.tasks for p in read_prompts(task, args.length, args.prompts)
            for method in args.methods for budget in args.budgets for mode in args.modes
            if (p["id"], method, budget, mode) not in done]
    for prompt, method, budget, mode in tqdm(jobs, desc="chunked vs one-shot"):
        context, question = np.asarray([prompt["context"]], np.int32), np.asarray([prompt["question"]], np.int32)
        compression = recipe(method, budget)
        if mode == "one_shot":
            tokens = generate(model, params, context, question_ids=question, compression=compression,
                              max_new_tokens=prompt["max_new_tokens"], eos_id=prompt["eos_id"], bucket=True)
        else:
            tokens = chunked_compressed_generate(model, params, context, question_ids=question, compression=compression,
                                                 max_new_tokens=prompt["max_new_tokens"], eos_id=prompt["eos_id"],
                                                 chunk_size=ACCURACY_CHUNK, bucket=True,
                                                 observe_question=mode == "chunked+question")[0]
        ids = [int(t) for t in np.asarray(tokens)[0]]
        text = tokenizer.decode(ids[:ids.index(prompt["eos_id"])] if prompt["eos_id"] in ids else ids)
        with open(path, "a") as fh:
            fh.write(json.dumps({"id": prompt["id"], "task": prompt["task"], "method": method, "budget": budget,
                                 "mode": mode, "generated": text,
                                 "correct": bool(score(prompt["task"], text, prompt["answer"], chat=True))}) + "\n")
        jax.clear_caches()  # compiled programs of earlier prompts: on CPU they pin memory mappings until LLVM runs out


def report():
    lines = ["# Chunked prefill with compression between chunks: SmolLM2-135M-Instruct", ""]
    for bucket in (False, True):
        memory = os.path.join(OUT, memory_file(bucket))
        if not os.path.exists(memory):
            continue
        with open(memory) as fh:
            m = json.load(fh)
        by_mode = {r["mode"]: r for r in m["results"]}
        chunked = by_mode["chunked"]
        rounds = chunked["rounds"]
        full = rounds[-1]["full_bytes"]
        lines += [f"## Memory: one needle prompt of {chunked['context_tokens']} context tokens, JointCompression(snapkv) "
                  f"at {m['budget']} of the KV bytes, chunks of {m['chunk']}"
                  + (", bucketed shapes (--bucket)" if bucket else ""), "",
                  "| mode | answer correct | peak process memory (MiB) | seconds |", "|---|---|---|---|"]
        for mode, r in by_mode.items():
            lines.append(f"| {mode} | {r['correct']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} |")
        chunk_bytes = rounds[1]["full_bytes"] - rounds[0]["full_bytes"]
        lines += ["", f"Cache arrays (from the cache's own arrays, MiB): the full cache of the context holds "
                      f"{full / MIB:.1f}; one chunk of dense keys and values is {chunk_bytes / MIB:.2f}.", "",
                  "| tokens seen | held while the chunk is in (MiB) | budget x seen + one chunk (MiB) | kept after "
                  "compressing (MiB) | kept / full of the tokens seen |", "|---|---|---|---|---|"]
        for prev, r in zip([None] + rounds[:-1], rounds):
            bound = m["budget"] * (prev["full_bytes"] if prev else 0) + (r["full_bytes"] - (prev["full_bytes"]
                                                                                           if prev else 0))
            lines.append(f"| {r['tokens_seen']} | {r['held_bytes'] / MIB:.2f} | {bound / MIB:.2f} | "
                         f"{r['kept_bytes'] / MIB:.2f} | {r['kept_bytes'] / r['full_bytes']:.3f} |")
        lines.append("")
    accuracy = os.path.join(OUT, "accuracy.jsonl")
    if os.path.exists(accuracy):
        with open(accuracy) as fh:
            records = [json.loads(line) for line in fh]
        cells = {}
        for r in records:
            cells.setdefault((r["task"], r["method"], r["budget"], r["mode"]), []).append(r["correct"])
        lines += [f"## Accuracy: the study's prompts, chunks of {ACCURACY_CHUNK} tokens against one-shot compression",
                  "", "| task | method | budget | one-shot | chunked | chunked, question observed every round |",
                  "|---|---|---|---|---|---|"]
        for task, method, budget in sorted({k[:3] for k in cells}):
            row = []
            for mode in MODES:
                got = cells.get((task, method, budget, mode), [])
                row.append(f"{sum(got) / max(len(got), 1):.2f} ({len(got)})")
            lines.append(f"| {task} | {method} | {budget} | " + " | ".join(row) + " |")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("memory", "accuracy", "report"), default="report")
    parser.add_argument("--bucket", action="store_true", help="memory stage: bucketed shapes (bounded programs)")
    parser.add_argument("--memory-one", choices=("full", "one_shot", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=["needle", "multi_key"])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["snapkv", "joint(snapkv)"])
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.375, 0.25])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    args = parser.parse_args()
    if args.memory_one:
        return memory_one(args.memory_one, args.bucket)
    if args.stage == "memory":
        run_memory(args.bucket)
    elif args.stage == "accuracy":
        run_accuracy(args)
    report()


if __name__ == "__main__":
    main()
