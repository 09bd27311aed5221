"""Evaluation of KV-cache compression: tasks x methods x KV-bytes budgets (eval.py's library).

    from subtoken_jax.evaluation import runner
    summary = runner.run(config, workdir)        # writes workdir/eval/results.{json,csv,md} and PNGs

Modules: tasks (inputs and scoring), methods (budget splits, masks, decoding through the KV cache),
report (records and files), plots (PNG figures), runner (model loading and the evaluation loop).
"""

from subtoken_jax.evaluation.methods import METHODS
from subtoken_jax.evaluation.tasks import TASKS

__all__ = ["METHODS", "TASKS"]
