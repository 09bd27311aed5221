"""Shared helpers of the timing benches: machine description, interleaved timing, JSON and markdown output."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from typing import Callable, Dict, List, Sequence

import jax


def machine_info() -> Dict[str, object]:
    """Platform, JAX backend / version, device kind and count, CPU cores."""
    device = jax.devices()[0]
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "jax_version": jax.__version__,
            "backend": jax.default_backend(), "device_kind": device.device_kind, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count()}


def machine_line(info: Dict[str, object]) -> str:
    return (f"{info['backend']} backend, {info['device_kind']} x{info['device_count']}, {info['cpu_count']} CPU cores, "
            f"jax {info['jax_version']}, {info['platform']}")


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, Dict]:
    """Times each fn (which must return jax arrays) `repeats` times, variants interleaved.

    Every fn is called `warmup` times first (compilation). Each call is timed to block_until_ready
    of its result. Each round runs the variants in a fresh (seeded) random order: a variant that
    streams a large cache through memory slows whatever runs right after it, and a fixed order
    would charge that to the same neighbour every round. Returns {name: {"median_s", "min_s",
    "max_s", "times_s"}}.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = random.Random(0)
    names = list(fns)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t}
            for name, t in times.items()}


def write_json(path: str, result: Dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def done_records(path: str, *fields: str) -> set:
    """The (fields...) tuples of the JSON-lines records already in `path`: what a resumed bench skips."""
    if not os.path.exists(path):
        return set()
    with open(path) as fh:
        return {tuple(r[f] for f in fields) for r in map(json.loads, fh)}
