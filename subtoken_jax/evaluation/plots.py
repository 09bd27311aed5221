"""PNG plots of the evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from subtoken_jax.evaluation.tasks import HIGHER_IS_BETTER  # noqa: E402


def quality_vs_budget(records: Sequence[dict], task: str, path: str) -> str:
    """One line per method: metric against the realised KV-bytes fraction; `full` as a dashed reference."""
    rows = [r for r in records if r["task"] == task]
    metric = rows[0]["metric"]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors  # more methods than the default cycle's 10 colours
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        points = sorted((r["kv_budget"], r["value"]) for r in rows if r["method"] == method)
        xs, ys = zip(*points)
        if method == "full":
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label="full")
            continue
        # token selectors solid, sub-token methods dashed, combinations dash-dot
        style = "-." if method.startswith("combined") else "--" if method.startswith(("subtoken", "routed")) else "-"
        ax.plot(xs, ys, marker="o", linestyle=style, color=colors[i % len(colors)], label=method)
    ax.set_xlabel("fraction of the context's KV bytes kept")
    better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
    ax.set_ylabel(f"{metric} ({better} is better)")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"{task}: quality vs KV budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def needle_grid(examples: Sequence[dict], budget: float, path: str) -> str:
    """Exact match per (depth, length) cell, one panel per method at `budget` (full at budget 1)."""
    rows = [e for e in examples if e["task"] == "needle" and (e["budget"] == budget or e["method"] == "full")]
    methods = list(dict.fromkeys(e["method"] for e in rows))
    lengths = sorted({e["length"] for e in rows})
    depths = sorted({e["depth"] for e in rows})
    cols = min(4, len(methods))
    nrows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    for ax, method in zip(axes.ravel(), methods):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                hits = [e["correct"] for e in rows if e["method"] == method and e["depth"] == depth
                        and e["length"] == length]
                if hits:
                    grid[i, j] = np.mean(hits)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(v) for v in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(method if method == "full" else f"{method} b={budget:g}", fontsize=8)
        ax.set_xlabel("length (tokens)", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
    fig.suptitle("needle in a haystack: exact match by depth and length", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def value_group_diagnostic(masks: Dict[str, Tuple[List[np.ndarray], np.ndarray]], layer: int, head: int,
                           title: str, path: str) -> str:
    """How kept value groups spread across and within tokens (the motivating figure).

    masks: name -> (per-layer [B, S, Hkv, G] 0/1 masks, positions [B, S]). Top row: histogram of kept
    groups per (token, KV head) over all layers (a token-level method could only give 0 or G). Bottom
    rows: for one (layer, head) of the first sequence, the kept-group map (groups x tokens) and kept
    groups per token along the context.
    """
    names = list(masks)
    fig, axes = plt.subplots(1 + 2 * len(names), 1, figsize=(10, 2.6 + 3.4 * len(names)), squeeze=False)
    axes = axes[:, 0]
    groups = next(iter(masks.values()))[0][0].shape[-1]
    bins = np.arange(groups + 2) - 0.5
    for name, (layers, positions) in masks.items():
        real = positions >= 0
        counts = np.concatenate([m.sum(-1)[real].ravel() for m in layers])  # kept groups per (token, head)
        axes[0].hist(counts, bins=bins, alpha=0.6, density=True, label=name)
    axes[0].set_xlabel(f"value groups kept per (token, KV head), of G={groups}")
    axes[0].set_ylabel("share")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    for k, (name, (layers, positions)) in enumerate(masks.items()):
        real = positions[0] >= 0
        mask = layers[layer][0][real][:, head, :]  # [tokens, G]
        heat, line = axes[1 + 2 * k], axes[2 + 2 * k]
        heat.imshow(mask.T, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
        heat.set_ylabel("group")
        heat.set_title(f"{name}: kept value groups of layer {layer}, KV head {head} (black = kept)", fontsize=9)
        line.plot(mask.sum(-1), linewidth=0.8)
        line.set_xlim(0, max(len(mask) - 1, 1))
        line.set_ylim(-0.2, groups + 0.2)
        line.set_xlabel("context token")
        line.set_ylabel("groups kept")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(folder: str, records: Sequence[dict], examples: Sequence[dict], budgets: Sequence[float],
                diagnostic=None) -> List[str]:
    """quality_<task>.png per task, needle_grid.png, value_groups.png; returns the paths written."""
    paths = []
    for task in dict.fromkeys(r["task"] for r in records):
        paths.append(quality_vs_budget(records, task, os.path.join(folder, f"quality_{task}.png")))
    if any(e["task"] == "needle" for e in examples):
        paths.append(needle_grid(examples, min(budgets), os.path.join(folder, "needle_grid.png")))
    if diagnostic is not None:
        paths.append(value_group_diagnostic(*diagnostic, path=os.path.join(folder, "value_groups.png")))
    return paths
