"""Tables, claims and plots of the query-aware study from its cells (bench/query_aware_study.py writes them).

Accuracy per (task, length, method, budget) is pooled over every prompt done so far (n is printed with it);
the KV bytes are the realised fractions, averaged over prompts (ours: keys + kept value groups + index
metadata, from the masks; kvpress: the share of context tokens left in its cache).

Claims (b) and (c) are paired comparisons: every row answers the same prompts, so each comparison is shown as
"w-l prompts" (prompts only the first row answers, only the second) with an exact McNemar p per budget, and a
sign test over prompts pooled over the budgets decides "held" (p < 0.05 and higher accuracy at every budget) from
"leans its way, not significant" (higher everywhere, p >= 0.05).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections import defaultdict

TOKEN_ONLY = ("snapkv", "expected_attention", "streaming", "key_norm")


def _observation(method: str):
    """A row's observation suffix and the rest: "joint(snapkv)+look24" -> ("joint(snapkv)", "+look24")."""
    found = re.search(r"(\+look\d+|\+qfull)+$", method)
    return (method[:found.start()], found.group()) if found else (method, "")


def selector_of(method: str):
    """The token selector of a combination row (None: not one): "snapkv+groups(snapkv)+mean" -> "snapkv";
    "joint(snapkv)" -> "snapkv" (tokens and groups both chosen from SnapKV's pooled attention); a lookahead
    row is compared with its selector under the same lookahead: "joint(snapkv)+look24" -> "snapkv+look24"."""
    method, observed = _observation(method)
    if method.startswith("joint(") and ")" in method:
        return method[len("joint("):method.index(")")] + observed
    head, sep, _ = method.partition("+groups")
    return head + observed if sep and head else None


def is_token_method(method: str) -> bool:
    """A token selector alone, with or without a lookahead window: "snapkv", "expected_attention+look24"."""
    return _observation(method)[0] in TOKEN_ONLY


def _our_examples(out_dir):
    """(key, prompt index, example, realised kv) of every answer in our cells; key = (task, length, method,
    budget)."""
    for path in sorted(glob.glob(os.path.join(out_dir, "cells", "*.json"))):
        start = int(re.search(r"_\d+_(\d{4})_", os.path.basename(path)).group(1))  # <task>_<length>_<start>_<variant>
        with open(path) as fh:
            cell = json.load(fh)
        kv = {(r["method"], r["budget"]): r["kv_budget"] for r in cell["records"]}
        seen = defaultdict(int)
        for e in cell["examples"]:  # a cell lists each plan's answers in prompt order
            key = (e["task"], int(e["length"]), e["method"], float(e["budget"]))
            yield key, start + seen[key], e, kv[e["method"], e["budget"]]
            seen[key] += 1


def our_rows(out_dir):
    """{(task, length, method, budget): {prompt index: (correct, realised kv)}} of our cells."""
    rows = defaultdict(dict)
    for key, index, example, kv in _our_examples(out_dir):
        rows[key][index] = (int(example["correct"]), kv)
    return rows


def same_as_full(out_dir):
    """{(task, length, method, budget): (share of prompts answered exactly as the full cache answers them, n)}.

    Downstream preservation itself, right or wrong: on a task the model often fails (multi-key: 0.63 with the
    full cache) a method can match the full cache's accuracy while answering different prompts."""
    answers = defaultdict(dict)
    for key, index, example, _ in _our_examples(out_dir):
        answers[key][index] = example["prediction"].strip()
    shares = {}
    for key, rows in answers.items():
        full = answers.get((key[0], key[1], "full", 1.0), {})
        common = [i for i in rows if i in full]
        if key[2] != "full" and common:
            shares[key] = (sum(rows[i] == full[i] for i in common) / len(common), len(common))
    return shares


MULTI_ITEM = ("multi_value", "two_needles", "variable_tracking")  # answers of several items


def items_recalled(answer: str, prediction: str) -> float:
    """RULER's string_match_all for one answer: the share of its items (whitespace-separated) found in the
    prediction, as substrings, case ignored (as RULER and our exact match for these tasks, all_values_correct)."""
    items, text = answer.lower().split(), prediction.lower()
    return sum(item in text for item in items) / len(items)


def item_recall(out_dir):
    """{(task, length, method, budget): {prompt index: share of the answer's items in the prediction}} of our
    cells, multi-item tasks only.

    RULER's string_match_all: partial credit where exact match needs every item (two numbers, three names),
    so a 135M model that copies one of two numbers still shows what compression costs.
    """
    shares = defaultdict(dict)
    for key, index, example, _ in _our_examples(out_dir):
        if key[0] in MULTI_ITEM:
            shares[key][index] = items_recalled(example["answer"], example["prediction"])
    return shares


def _mean_n(shares):
    return sum(shares.values()) / len(shares), len(shares)


def kvpress_rows(out_dir, recall=None):
    """{(task, length, method, budget): {prompt: (correct, kv)}} of kvpress's rows; with a dict `recall`, also
    fills it with the items recalled of the multi-item tasks' answers, as item_recall does for ours."""
    path = os.path.join(out_dir, "kvpress.jsonl")
    rows = defaultdict(dict)
    if not os.path.exists(path):
        return rows
    from subtoken_jax.evaluation import tasks as tasks_lib
    from subtoken_jax.pretrained import load_tokenizer

    prompts = {}
    for p in glob.glob(os.path.join(out_dir, "prompts", "*.jsonl")):
        with open(p) as fh:
            prompts.update({r["id"]: r for r in map(json.loads, fh)})
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    with open(path) as fh:
        for r in map(json.loads, fh):
            p = prompts.get(r["id"])
            if p is None:
                continue
            text = tokenizer.decode(r["generated_ids"])
            method = "full" if r["press"] == "full" else f"kvpress:{r['press']}"
            key = (p["task"], int(p["length"]), method, float(r["budget"]))
            if r["press"].startswith("adakv") or r["press"] == "kvzip":  # masks inside a full-size cache: nominal budget
                kv = float(r["budget"])
            else:
                kv = (r["kept_tokens"] - r["question_tokens"]) / r["context_tokens"]
            index = int(r["id"].rsplit("_", 1)[1])
            rows[key][index] = (int(tasks_lib.score(p["task"], text, p["answer"], chat=True)), kv)
            if recall is not None and p["task"] in MULTI_ITEM:
                recall.setdefault(key if method != "full" else key[:2] + ("full (transformers)", 1.0), {})[index] = \
                    items_recalled(p["answer"], text)
    return rows


QUEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quest", "records.jsonl")


def _quest(path=QUEST):
    """{(task, length, method, budget): {prompt: (correct, kv read per step)}} of bench/quest_study.py's records.

    Quest reads b of the bytes per decode step but frees nothing, so its rows are labelled with what the cache
    holds and stay out of the claims (which compare methods at equal bytes held)."""
    rows = defaultdict(dict)
    if not os.path.exists(path):
        return rows
    with open(path) as fh:
        for r in map(json.loads, fh):
            task_length, index = r["id"].rsplit("_", 1)
            length = int(task_length.rsplit("_", 1)[1])
            method = f"{r['method']} (reads b, holds {r['held']:.2f})"
            rows[r["task"], length, method, float(r["budget"])][int(index)] = (int(r["correct"]), r["read"])
    return rows


def _cell(items, only=None):
    """accuracy, n and mean realised bytes of {prompt: (correct, kv)}, over the prompts in `only` if given."""
    picked = {i: v for i, v in items.items() if only is None or i in only}
    if not picked:
        return None
    return {"accuracy": sum(c for c, _ in picked.values()) / len(picked), "n": len(picked),
            "kv_budget": sum(k for _, k in picked.values()) / len(picked), "items": picked}


def _summary(rows):
    return {k: c for k, c in ((k, _cell(v)) for k, v in rows.items()) if c}


def _on_common(a, b):
    """Two cells compared on the prompts both have (a study grows cell by cell; kvpress's side may lag)."""
    common = set(a["items"]) & set(b["items"])
    return _cell(a["items"], common), _cell(b["items"], common)


def _fmt(cell):
    return "" if cell is None else f"{cell['accuracy']:.2f} ({cell['n']}) [{cell['kv_budget']:.3f}]"


def paired_test(a, b):
    """Exact two-sided McNemar test of two cells on the prompts both have: (a right b wrong, a wrong b right, p).

    The rows of a comparison answer the same prompts, so the test counts only the prompts where they disagree
    (a binomial with p = 1/2 under "no difference"); far stronger than comparing the two marginal accuracies."""
    from scipy.stats import binomtest

    common = set(a["items"]) & set(b["items"])
    wins = sum(a["items"][i][0] > b["items"][i][0] for i in common)
    losses = sum(a["items"][i][0] < b["items"][i][0] for i in common)
    return wins, losses, (binomtest(wins, wins + losses).pvalue if wins + losses else 1.0)


def pooled_test(pairs):
    """Sign test over prompts of a's minus b's correct answers summed over budgets: (prompts a gains, prompts b
    gains, p). pairs: [(a cell, b cell)] one per budget. A budget's cells answer the same prompts as every other
    budget's, so the budgets are not independent samples; the prompts are, and each prompt is counted once."""
    from scipy.stats import binomtest

    total = defaultdict(int)
    for a, b in pairs:
        for i in set(a["items"]) & set(b["items"]):
            total[i] += a["items"][i][0] - b["items"][i][0]
    gains, losses = sum(d > 0 for d in total.values()), sum(d < 0 for d in total.values())
    return gains, losses, (binomtest(gains, gains + losses).pvalue if gains + losses else 1.0)


SIGNIFICANCE = 0.05


def _verdict(accuracies, pooled):
    """held: higher accuracy at every budget and the pooled sign test's p < SIGNIFICANCE; leans: higher at every
    budget, not significant; not held: equal or lower at some budget. accuracies: [(ours, theirs)] per budget."""
    if not accuracies:
        return None
    if not all(a > b for a, b in accuracies):
        return "not held"
    return "held" if pooled[2] < SIGNIFICANCE else "leans its way, not significant"


def _stderr(a, b):
    """Standard error of a difference of two accuracies."""
    return math.sqrt(a["accuracy"] * (1 - a["accuracy"]) / a["n"] + b["accuracy"] * (1 - b["accuracy"]) / b["n"])


def kept_interval(combo, full, won, lost, z=1.96):
    """95% interval of the share of full-cache accuracy a row keeps, from the paired difference on the same prompts
    (Agresti-Min: the Wald interval of a paired difference after adding 1/2 to each cell of the 2 x 2 table, which
    stays honest when few prompts disagree), divided by the full cache's accuracy. Shows whether n prompts can
    tell a row's 95% from 99%."""
    n, base = combo["n"] + 2, max(full["accuracy"], 1e-9)
    won, lost = won + 0.5, lost + 0.5
    diff = (won - lost) / n
    half = z * math.sqrt(won + lost - (won - lost) ** 2 / n) / n
    return (base + diff - half) / base, (base + diff + half) / base


def ratio_interval(row, full, z=1.96):
    """(ratio, low, high): the share of the full cache's mean a row keeps, mean(row) / mean(full) over the same
    prompts, with a 95% delta-method interval for a ratio of paired means (the two are correlated: the same
    prompts, so the interval is far narrower than two independent means would give). row, full: equal-length
    per-prompt values. None when the full cache's mean is 0 (no share to keep)."""
    n = len(full)
    if len(row) != n or n < 2:
        raise ValueError(f"ratio_interval needs two equal-length lists of >= 2 prompts, got {len(row)} and {n}")
    if sum(full) == 0:
        return None
    mean_x, mean_y = sum(row) / n, sum(full) / n
    ratio = mean_x / mean_y
    var = lambda a, b, ma, mb: sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (n - 1)  # noqa: E731
    spread = var(row, row, mean_x, mean_x) - 2 * ratio * var(row, full, mean_x, mean_y) \
        + ratio ** 2 * var(full, full, mean_y, mean_y)
    half = z * math.sqrt(max(spread, 0.0) / n) / mean_y
    return ratio, ratio - half, ratio + half


def claim_a_on_items(recall, tasks, lengths, budget=0.375):
    """Claim (a) with items recalled in place of exact match: among the combination rows with the most prompts in
    common with the full cache, the one recalling the most items on those prompts at `budget`, its share of the
    full cache's items there, and ratio_interval's 95% (conditional on that pick: the best of k rows)."""
    lines = []
    for task in [t for t in tasks if t in MULTI_ITEM]:
        for length in lengths:
            full = recall.get((task, length, "full", 1.0))
            combos = {k[2]: v for k, v in recall.items() if k[:2] == (task, length) and k[3] == budget
                      and selector_of(k[2])}
            if not full or not combos:
                continue
            common = {name: sorted(set(row) & set(full)) for name, row in combos.items()}
            most = max(len(c) for c in common.values())
            if most < 2:
                continue
            shared_mean = lambda name: sum(combos[name][i] for i in common[name]) / most  # noqa: E731
            name = max((n for n in combos if len(common[n]) == most), key=shared_mean)
            row, full_row = [combos[name][i] for i in common[name]], [full[i] for i in common[name]]
            found = ratio_interval(row, full_row)
            head = (f"- **{task}, {length} tokens** (full cache {sum(full_row) / most:.2f} of the items on the "
                    f"{most} prompts the rows share with it; best of {len(combos)} combination rows):")
            if found is None:
                lines.append(f"{head} (a) n/a: the full cache recalls no items there")
                continue
            ratio, low, high = found
            spread = (f"95% interval {100 * low:.0f}-{100 * high:.0f}%, conditional on the pick" if high > low else
                      "no interval: the row recalls exactly what the full cache does on every prompt, which n "
                      "prompts cannot tell from a small loss")
            lines.append(f"{head} (a) {'held' if ratio >= 0.99 else 'not held'}: {name} at {budget} recalls "
                         f"{100 * ratio:.1f}% of the full cache's items ({spread})")
    return lines


def claim_c_pooled(ours, tasks, lengths, budgets):
    """Claim (c) over every (task, length) at once, per combination row in two or more of them: a sign test over
    (task, length, prompt) units of the row's minus its selector's correct answers summed over budgets (each
    prompt counted once, as pooled_test does within one task)."""
    lines = []
    cells = [(t, n) for t in tasks for n in lengths]
    for combo in sorted({k[2] for k in ours if selector_of(k[2])}):
        rival = selector_of(combo)
        pairs, used = [], []
        for task, length in cells:
            here = [(ours.get((task, length, combo, b)), ours.get((task, length, rival, b))) for b in budgets]
            here = [(x, y) for x, y in here if x and y]
            if here:
                used.append(f"{task} {length}")
                tag = lambda c: {"items": {(task, length, i): v for i, v in c["items"].items()}}  # noqa: E731
                pairs += [(tag(x), tag(y)) for x, y in here]
        if len(used) >= 2:
            gains, losses, p = pooled_test(pairs)
            lines.append(f"- {combo} against {rival} over {len(used)} task-lengths ({', '.join(used)}): prompts "
                         f"gained-lost {gains}-{losses}, sign test p={p:.2g}")
    return lines


def best_combination(rows):
    """(name, cell) of the most accurate of [(name, cell)] among those run on the most prompts, or (None, None): a
    row still on its first 20 prompts is not "best" over rows of 100 by the noise of its few."""
    most = max((cell["n"] for _, cell in rows), default=0)
    return max(((m, c) for m, c in rows if c["n"] == most), key=lambda x: x[1]["accuracy"], default=(None, None))


def claims(ours, theirs, tasks, lengths, budgets):
    """The paper's claims (a), (b), (c) per (task, length): held / not held with the numbers."""
    lines = []
    for task in tasks:
        for length in lengths:
            get = lambda m, b, src=ours: src.get((task, length, m, b))  # noqa: E731
            full = get("full", 1.0)
            if full is None:
                continue
            head = f"- **{task}, {length} tokens** (full cache {full['accuracy']:.2f}, n={full['n']}):"
            combined = sorted({k[2] for k in ours if k[:2] == (task, length) and selector_of(k[2])})
            best = {b: best_combination([(m, get(m, b)) for m in combined if get(m, b)]) for b in budgets}
            m, c = best.get(0.375, (None, None))
            if c is not None:
                c_common, full_common = _on_common(c, full)
                ratio = c_common["accuracy"] / max(full_common["accuracy"], 1e-9)
                won, lost, p = paired_test(c, full)
                low, high = kept_interval(c_common, full_common, won, lost)
                head += (f" (a) {'held' if ratio >= 0.99 else 'not held'}: best combination at 0.375 ({m}) keeps "
                         f"{100 * ratio:.1f}% of full-cache accuracy (paired with the full cache: {lost} prompts lost, "
                         f"{won} gained, p={p:.2g}; 95% interval of the share kept {100 * low:.0f}-{100 * high:.0f}%);")
            wins, accuracies, by_rival = [], [], defaultdict(list)
            for b in budgets:
                m, c = best[b]
                if c is None:
                    continue
                rivals = [(k[2], v) for k, v in ours.items() if k[:2] == (task, length) and k[3] == b
                          and is_token_method(k[2])]
                rivals += [(k[2], v) for k, v in theirs.items() if k[:2] == (task, length) and k[3] == b
                           and k[2].startswith("kvpress:")]
                for name, rival in rivals:
                    by_rival[name].append((c, rival))
                if rivals:  # each rival on the prompts both have; the strongest (by its own accuracy there) is shown
                    paired = [(t, r, *_on_common(c, r)) for t, r in rivals]
                    top, rival, mine, theirs_ = max(paired, key=lambda x: x[3]["accuracy"] - x[2]["accuracy"])
                    won, lost, p = paired_test(c, rival)
                    accuracies.append((mine["accuracy"], theirs_["accuracy"]))
                    wins.append(f"b={b}: {m} {mine['accuracy']:.2f} vs {top} {theirs_['accuracy']:.2f} "
                                f"(n={mine['n']}, {won}-{lost} prompts, p={p:.2g})")
            if wins:
                # pooled over budgets against each rival; the rival the combination is least surely above decides
                rival, pooled = max(((t, pooled_test(pairs)) for t, pairs in by_rival.items()), key=lambda x: x[1][2])
                head += (f" (b) {_verdict(accuracies, pooled)}: {'; '.join(wins)}; pooled over budgets against the "
                         f"closest rival ({rival}): {pooled[0]}-{pooled[1]} prompts, p={pooled[2]:.2g};")
            tallies = []
            for combo in combined:
                pairs = [(b, get(combo, b), get(selector_of(combo), b)) for b in budgets
                         if get(combo, b) and get(selector_of(combo), b)]
                if pairs:
                    pooled = pooled_test([(x, y) for _, x, y in pairs])
                    marginal = [tuple(c["accuracy"] for c in _on_common(x, y)) for _, x, y in pairs]
                    per_budget = ", ".join("{}-{}".format(*paired_test(x, y)[:2]) for _, x, y in pairs)
                    tallies.append((combo, _verdict(marginal, pooled),
                                    f"higher at {sum(a > b for a, b in marginal)}/{len(pairs)} budgets, per budget "
                                    f"{per_budget}, pooled {pooled[0]}-{pooled[1]} prompts p={pooled[2]:.2g}"))
            split = []
            for combo in combined:
                rival = selector_of(combo)
                if not all(get(combo, b) and get(rival, b) for b in budgets):
                    continue
                right = {i for i, (c, _) in full["items"].items() if c}
                counts = []
                for b in budgets:
                    x, y = get(combo, b)["items"], get(rival, b)["items"]
                    common = set(x) & set(y) & set(full["items"])
                    lost = lambda z: sum(1 - z[i][0] for i in common & right)  # noqa: E731
                    fixed = lambda z: sum(z[i][0] for i in common - right)  # noqa: E731
                    counts.append(f"{lost(x)}/{lost(y)} lost, {fixed(x)}/{fixed(y)} gained")
                split.append(f"{combo} / {rival}: " + "; ".join(f"b={b} {c}" for b, c in zip(budgets, counts)))
            if tallies:
                held = [c for c, verdict, _ in tallies if verdict == "held"]
                head += (f" (c) {'held by ' + ', '.join(held) if held else 'not held'}: selector + groups against the "
                         f"selector alone: " + "; ".join(f"{c} {verdict} ({detail})" for c, verdict, detail in tallies)
                         + ".")
            lines.append(head)
            if split:  # where a combination's difference from its selector comes from
                lines.append("  - against the full cache (prompts it answers right that each row loses, prompts it "
                             "answers wrong that each row gets right): " + " | ".join(split))
    return lines


def agreement(ours, theirs, tasks, lengths, budgets):
    lines = []
    # our selector -> kvpress's press of the same method (our AdaKV wraps SnapKV, as the study's AdaKV press does)
    pairs = [("snapkv", "snapkv"), ("expected_attention", "expected_attention"),
             ("expected_attention", "expected_attention_our_settings"),
             ("expected_attention+kvpress_settings", "expected_attention"), ("streaming", "streaming"),
             ("key_norm", "key_norm"), ("tova", "tova"), ("adakv", "adakv_snapkv"), ("kvzip", "kvzip"),
             ("pyramidkv", "pyramidkv"),
             # under kvpress's protocol (the question prefilled over the full context, kept uncompressed)
             ("snapkv+qfull", "snapkv"), ("expected_attention+qfull", "expected_attention"),
             ("streaming+qfull", "streaming")]
    for name, press in pairs:
        diffs = []
        for task in tasks:
            for length in lengths:
                for b in budgets:
                    a, t = ours.get((task, length, name, b)), theirs.get((task, length, f"kvpress:{press}", b))
                    if a and t:
                        a, t = _on_common(a, t)
                        diffs.append((a["accuracy"] - t["accuracy"], _stderr(a, t), a["n"]))
        if diffs:
            within = sum(abs(d) <= 2 * max(s, 1e-9) for d, s, _ in diffs)
            mean = sum(d for d, _, _ in diffs) / len(diffs)
            label = name if press in (name, f"{name}_snapkv", _observation(name)[0]) else \
                f"{name} against kvpress:{press}"
            lines.append(f"- {label}: ours - kvpress's accuracy, mean {mean:+.3f} over {len(diffs)} (task, length, "
                         f"budget) cells; within 2 standard errors in {within} of them")
    return lines


def plot(path, task, lengths, summary, budgets):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        # the +mean / +pca rows are in the table; on the plot they would hide the curves they equal
        methods = sorted({k[2] for k in summary if k[:2] == (task, length) and k[2] != "full"
                          and "+mean" not in k[2] and "(reads b" not in k[2]})
        for m in methods:
            pts = sorted((v["kv_budget"], v["accuracy"]) for k, v in summary.items()
                         if k[:2] == (task, length) and k[2] == m)
            style = "--" if m.startswith("kvpress:") else "-"
            width = 2.4 if selector_of(m) or m.startswith("groups") else 1.2
            ax.plot(*zip(*pts), style, marker="o", lw=width, ms=3, label=m)
        full = summary.get((task, length, "full", 1.0))
        if full:
            ax.axhline(full["accuracy"], color="k", lw=0.8, ls=":", label="full cache")
        ax.set_title(f"{task}, {length} tokens (SmolLM2-135M-Instruct)")
        ax.set_xlabel("fraction of KV bytes kept")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out_dir, tasks, lengths, budgets):
    their_recall = {}
    ours, theirs = _summary(our_rows(out_dir)), _summary(kvpress_rows(out_dir, their_recall))
    both = {**theirs, **_summary(_quest()), **ours}
    lines = ["# Query-aware study: SmolLM2-135M-Instruct, ours and kvpress's on the same weights and token ids", "",
             "Cells: exact match (prompts) [realised fraction of KV bytes]. `kvpress:` rows are kvpress's presses; "
             "the full-cache row is ours (kvpress's full cache is listed as `full (transformers)`). Quest rows "
             "(bench/quest_study.py) give the bytes *read* per decode step; their cache holds what the label says.",
             ""]
    for task in tasks:
        for length in lengths:
            methods = sorted({k[2] for k in both if k[:2] == (task, length)},
                             key=lambda m: (m.startswith("kvpress:"), m != "full", m))
            if not methods:
                continue
            lines += [f"## {task}, {length} tokens", "", "| method | " + " | ".join(f"b={b}" for b in budgets) + " |",
                      "|---|" + "---|" * len(budgets)]
            for m in methods:
                if m == "full":
                    cells = [_fmt(ours.get((task, length, "full", 1.0)))] + [""] * (len(budgets) - 1)
                    lines.append("| full (ours, b=1) | " + " | ".join(cells) + " |")
                    t = theirs.get((task, length, "full", 1.0))
                    if t:
                        lines.append("| full (transformers, b=1) | " + " | ".join([_fmt(t)] + [""] * (len(budgets) - 1))
                                     + " |")
                    continue
                if any(both.get((task, length, m, b)) for b in budgets):  # rows with no cell at these budgets stay out
                    lines.append(f"| {m} | " + " | ".join(_fmt(both.get((task, length, m, b))) for b in budgets) + " |")
            lines.append("")
    our_recall = item_recall(out_dir)
    recall = {**their_recall, **our_recall}
    for task in [t for t in tasks if t in MULTI_ITEM]:
        for length in lengths:
            methods = sorted({k[2] for k in recall if k[:2] == (task, length)},
                             key=lambda m: (m.startswith("kvpress:"), not m.startswith("full"), m))
            if not methods:
                continue
            lines += [f"## {task}, {length} tokens: items recalled (RULER string_match_all)", "",
                      "| method | " + " | ".join(f"b={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
            for m in methods:
                whole = m.startswith("full")
                row = [recall.get((task, length, m, 1.0 if whole else b)) for b in budgets]
                row = row[:1] + [None] * (len(budgets) - 1) if whole else row
                lines.append(f"| {'full (ours, b=1)' if m == 'full' else m} | "
                             + " | ".join("" if c is None else "{:.2f} ({})".format(*_mean_n(c)) for c in row) + " |")
            lines.append("")
    agree = same_as_full(out_dir)
    for task in tasks:
        for length in lengths:
            methods = sorted({k[2] for k in agree if k[:2] == (task, length)})
            if not methods:
                continue
            lines += [f"## {task}, {length} tokens: answers identical to the full cache's (ours, right or wrong)", "",
                      "| method | " + " | ".join(f"b={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
            for m in methods:
                row = [agree.get((task, length, m, b)) for b in budgets]
                lines.append(f"| {m} | " + " | ".join("" if c is None else f"{c[0]:.2f} ({c[1]})" for c in row) + " |")
            lines.append("")
    lines += ["## The paper's claims", ""] + claims(ours, theirs, tasks, lengths, budgets)
    lines += ["", "## Claim (c) pooled over every task and length (each prompt once, budgets summed)", ""]
    lines += claim_c_pooled(ours, tasks, lengths, budgets)
    lines += ["", "## Claim (a) on items recalled (multi-item tasks: RULER's own metric for them)", ""]
    lines += claim_a_on_items(our_recall, tasks, lengths)
    lines += ["", "## Our token selectors against kvpress's (same prompts)", ""] + agreement(ours, theirs, tasks,
                                                                                              lengths, budgets)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "study.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "study.json"), "w") as fh:
        plain = lambda v: {x: y for x, y in v.items() if x != "items"}  # noqa: E731
        json.dump([{"task": k[0], "length": k[1], "method": k[2], "budget": k[3], **plain(v)} for k, v in both.items()]
                  + [{"task": k[0], "length": k[1], "method": "full (transformers)", "budget": k[3], **plain(v)}
                     for k, v in theirs.items() if k[2] == "full"], fh, indent=1)
    for task in tasks:
        if any(k[0] == task for k in both):
            plot(os.path.join(out_dir, f"study_{task}.png"), task, [n for n in lengths
                                                                    if any(k[:2] == (task, n) for k in both)],
                 {**both}, budgets)
    print("\n".join(lines))
