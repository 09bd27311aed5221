"""Result records and their files: results.json, results.csv, results.md, examples.jsonl.

A record is one (task, method, budget) cell:

  task, method        names (tasks.TASKS, methods.METHODS)
  budget              requested fraction of the context's KV bytes
  kv_budget           realised fraction of KV bytes (keys + values + index metadata, kv_bytes_fraction)
  key_fraction        realised fraction of the keys kept
  value_fraction      realised fraction of the values kept (value groups of kept tokens)
  index_fraction      the metadata's share of the full cache (token indices, value-group flags)
  tau, rho            the method's split of the budget: fraction of tokens kept, and of their value groups
  metric, value       e.g. "exact_match" 0.75, "perplexity" 12.3, "accuracy" 0.5
  num_examples        prompts (or sequences) scored
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Sequence

FIELDS = ("task", "method", "budget", "kv_budget", "key_fraction", "value_fraction", "index_fraction", "tau", "rho",
          "metric", "value", "num_examples")


def record(task: str, method: str, budget: float, accounting: Dict[str, float], tau, rho, metric: str,
           value: float, num_examples: int) -> dict:
    """tau / rho None (a method that splits per token): the realised key fraction and values per kept key."""
    if tau is None:
        tau = accounting["keys"]
    if rho is None:
        rho = accounting["values"] / max(accounting["keys"], 1e-12)
    return {"task": task, "method": method, "budget": float(budget), "kv_budget": float(accounting["total"]),
            "key_fraction": float(accounting["keys"]), "value_fraction": float(accounting["values"]),
            "index_fraction": float(accounting["index"]), "tau": float(tau), "rho": float(rho), "metric": metric,
            "value": float(value), "num_examples": int(num_examples)}


def write_json(path: str, records: Sequence[dict]) -> None:
    with open(path, "w") as fh:
        json.dump(list(records), fh, indent=2)


def write_csv(path: str, records: Sequence[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def write_examples(path: str, examples: Sequence[dict]) -> None:
    with open(path, "w") as fh:
        for example in examples:
            fh.write(json.dumps(example) + "\n")


def _cell(value: float, kv: float) -> str:
    text = f"{value:.3f}" if math.isfinite(value) else str(value)
    return f"{text} ({kv:.2f})"


def column_name(budget: float) -> str:
    """A fraction of KV bytes (<= 1) as "b=0.5"; a token-count budget (> 1) as "256 tok"."""
    return f"b={budget:g}" if budget <= 1 else f"{int(budget)} tok"


def budget_table(rows: Sequence[dict], methods: Sequence[str], columns: Sequence[float],
                 budgets: Sequence[float]) -> List[str]:
    """Markdown lines of one task's records: a row per method, a column per budget in `columns`.

    A cell is `value (realised KV-bytes fraction)`; "n/a" marks a requested budget the method could not
    fit; `full` has only its budget-1 cell.
    """
    lines = ["| method | " + " | ".join(column_name(b) for b in columns) + " |", "|---|" + "---|" * len(columns)]
    for method in methods:
        cells = {r["budget"]: r for r in rows if r["method"] == method}
        if not cells:
            continue
        shown = []
        for b in columns:
            if b in cells:
                shown.append(_cell(cells[b]["value"], cells[b]["kv_budget"]))
            else:
                shown.append("" if method == "full" or b not in budgets else "n/a")
        lines.append(f"| {method} | " + " | ".join(shown) + " |")
    return lines


def markdown(records: Sequence[dict], tasks: Sequence[str], methods: Sequence[str], budgets: Sequence[float],
             notes: Sequence[str] = ()) -> str:
    """One table per task: methods x requested budgets; a cell is `value (realised KV-bytes fraction)`.

    `full` appears at budget 1 only; "n/a" marks a method that cannot fit a budget (see the notes).
    """
    fractions = sorted({float(b) for b in budgets if b <= 1} | {1.0}, reverse=True)
    columns = fractions + sorted({float(b) for b in budgets if b > 1}, reverse=True)
    lines: List[str] = ["# Evaluation results", "",
                        "Cells: metric value (realised fraction of the context's KV bytes, index metadata included).",
                        ""]
    for task in tasks:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        metric = rows[0]["metric"]
        lines += [f"## {task} ({metric}, {rows[0]['num_examples']} examples)", ""]
        lines += budget_table(rows, methods, columns, budgets) + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def write_markdown(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def write_all(folder: str, records: Sequence[dict], examples: Sequence[dict], markdown_text: str) -> Dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, name) for name in ("results.json", "results.csv", "results.md",
                                                            "examples.jsonl")}
    write_json(paths["results.json"], records)
    write_csv(paths["results.csv"], records)
    write_markdown(paths["results.md"], markdown_text)
    write_examples(paths["examples.jsonl"], examples)
    return paths
