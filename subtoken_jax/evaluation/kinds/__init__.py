"""Evaluation task kinds as plug-ins: each builds its inputs, checks their lengths and scores every plan.

    kind = kind_of("needle")                       # Generation(); "perplexity" -> Perplexity(), "mmlu" -> MultipleChoice()
    inputs = kind.inputs("needle", config, source)
    records, examples = kind.evaluate(evaluator, "needle", inputs)

The runner loops over tasks and calls these three; it never branches on a task's name. A new task of an
existing kind is one entry in TASK_KINDS (and its prompts in evaluation/tasks.py); a new kind is one file.
"""

from subtoken_jax.evaluation.kinds.choice import MultipleChoice
from subtoken_jax.evaluation.kinds.generation import Generation
from subtoken_jax.evaluation.kinds.perplexity import Perplexity

TASK_KINDS = {"perplexity": Perplexity, "needle": Generation, "variable_tracking": Generation,
              "multi_key": Generation, "multi_value": Generation, "two_needles": Generation, "mmlu": MultipleChoice}


def kind_of(task: str):
    return TASK_KINDS[task]()


__all__ = ["TASK_KINDS", "Generation", "MultipleChoice", "Perplexity", "kind_of"]
