"""Evaluation tasks: what is fed to the model and how its output is scored.

Every prompt is a context followed by a question; KV compression applies to the context only.

  perplexity         packed text chunks of perplexity.seq_len + 1 tokens; the first prefix_fraction
                     of each chunk is the (compressible) context, the rest is the continuation whose
                     next-token perplexity is reported (see kinds/perplexity.py)
  needle             needle in a haystack over needle.lengths x needle.depths (synthetic_tasks.make_needle_example);
                     exact match = the needle's number is contained in the first generated line
  variable_tracking  RULER-style chains (synthetic_tasks.make_variable_tracking_example); exact match = every
                     expected variable name appears as a word in the first generated line
  mmlu               MMLU-format CSV rows (question, A, B, C, D, answer letter); the context is the
                     subject header, optional few-shot rows and the question with its options, the
                     question part is "Answer:"; the prediction is the letter whose continuation
                     (" A" .. " D") has the highest log-likelihood; metric accuracy
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from subtoken_jax import data as data_lib
from subtoken_jax import synthetic_tasks
from subtoken_jax.errors import ConfigError, InputError

# RULER-style needle variants (synthetic_tasks.make_multi_needle_example): distractor keys, several values per key, and
# two facts far apart that the answer must both recall.
MULTI_NEEDLE = {"multi_key": dict(num_keys=4), "multi_value": dict(num_values=2),
                "two_needles": dict(num_keys=2, asked=2)}
TASKS = ("perplexity", "needle", "variable_tracking", "mmlu") + tuple(MULTI_NEEDLE)
METRICS = {"perplexity": "perplexity", "needle": "exact_match", "variable_tracking": "exact_match",
           "mmlu": "accuracy", **{t: "exact_match" for t in MULTI_NEEDLE}}
HIGHER_IS_BETTER = {"perplexity": False, "exact_match": True, "accuracy": True}
LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass
class Prompt:
    """One question over one context, as token ids (the context includes BOS when the model uses one)."""

    context: List[int]
    question: List[int]
    answer: str  # the reference answer (generation tasks) or the correct letter (mmlu)
    info: dict  # task-specific details kept in examples.jsonl (depth, length, subject, ...)
    answer_tokens: int = 0  # tokens of the reference answer (generation tasks)

    @property
    def prompt_tokens(self) -> int:
        return len(self.context) + len(self.question)

    @property
    def answer_items(self) -> int:
        """Items of the reference answer (its words: two numbers, three names); at least 1."""
        return max(1, len(self.answer.split()))


def new_tokens(prompt: Prompt, extra: int) -> int:
    """How many tokens a prompt's answer may take: its reference answer (with the question an instruct model
    restates) and `extra` tokens per answer item. Per item, because an answer of several items is usually a
    list, and each item's separator and numbering ("\n2. ") takes tokens that a single-item answer does not: on
    the study's development prompts (WikiText-2 valid, seed 1234) 4 of 20 multi-value full-cache answers and 1 of
    20 two-needle ones recalled their last item 1-3 tokens past a flat budget of 4 extra tokens (covered now), and
    one more of each 16 and 7 tokens past it (still cut: a budget that long lets rambling answers list the
    context's numbers)."""
    return prompt.answer_tokens + extra * prompt.answer_items


# ----------------------------------------------------------------------------- scoring


def first_line(text: str) -> str:
    """The generated answer proper: leading whitespace dropped, cut at the first newline."""
    return text.lstrip().split("\n", 1)[0]


def needle_correct(generated: str, answer: str) -> bool:
    """Exact match by containment: the needle's value appears in the first generated line."""
    return answer.strip() in first_line(generated)


def variable_tracking_correct(generated: str, answer: str) -> bool:
    """Exact match: every expected variable name is a word of the first generated line (order free)."""
    words = set(re.findall(r"\w+", first_line(generated)))
    return set(answer.split()) <= words


def all_values_correct(generated: str, answer: str) -> bool:
    """Exact match: every expected value (space-separated in `answer`) appears in the generated answer, on
    any line (an instruct model may list them one per line)."""
    return all(value in generated for value in answer.split())


SCORERS = {"needle": needle_correct, "variable_tracking": variable_tracking_correct,
           **{t: all_values_correct for t in MULTI_NEEDLE}}


def score(task: str, generated: str, answer: str, chat: bool = False) -> bool:
    """Whether a generated answer is correct. chat: an instruct model's answer is its whole turn (it often
    leads in with a line such as "The variables assigned to 12345 are:"), so variable tracking reads every
    line; otherwise (a base model continuing "A:") only the first line counts."""
    if chat and task == "variable_tracking":
        return set(answer.split()) <= set(re.findall(r"\w+", generated))
    return SCORERS[task](generated, answer)


# ----------------------------------------------------------------------------- prompt builders


def _encode(tokenizer, text: str, bos: bool) -> List[int]:
    ids = list(tokenizer.encode(text))
    return ([tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []) + ids


def _qa_prompt(example: dict, tokenizer, bos: bool, info: dict, chat: bool = False) -> Prompt:
    answer_tokens = len(tokenizer.encode(example["answer"]))
    if chat:
        context, question = chat_split(tokenizer, example["context"], example["query"])
        # an instruct model answers in a sentence that restates the question ("The magic number for X is N."):
        # room for that, so the generated line is not cut before the answer
        return Prompt(context=context, question=question, answer=example["answer"], info=info,
                      answer_tokens=answer_tokens + len(tokenizer.encode(example["query"])))
    return Prompt(context=_encode(tokenizer, example["context"], bos), question=_encode(tokenizer, example["question"],
                                                                                         False),
                  answer=example["answer"], info=info, answer_tokens=answer_tokens)


def chat_split(tokenizer, document: str, query: str) -> Tuple[List[int], List[int]]:
    """One user turn "document + blank line + query" rendered by the model's chat template, cut where the
    document ends: (context ids = template head + document, question ids = query + the assistant's turn start).

    Only the context is compressed; the template's own tokens before the document (system prompt, role
    markers) are part of it, as they would be in a served conversation.
    """
    rendered = tokenizer.chat([{"role": "user", "content": f"{document}\n\n{query}"}], add_generation_prompt=True)
    cut = rendered.index(document) + len(document)
    return list(tokenizer.encode(rendered[:cut])), list(tokenizer.encode(rendered[cut:]))


def repeat_prompt(tokenizer, chat: bool) -> Tuple[int, ...]:
    """KVzip's reconstruction prompt as token ids: its instruction, closing the user's turn when the model
    chats (the instruction then the assistant's turn start, as kvpress renders it)."""
    from subtoken_jax.selectors.kvzip import REPEAT_INSTRUCTION

    if chat:
        return tuple(chat_split(tokenizer, "Context.", REPEAT_INSTRUCTION.strip())[1])
    return tuple(tokenizer.encode(REPEAT_INSTRUCTION))


def read_haystack(path: str) -> Optional[List[str]]:
    """Sentences of the text file `path` for needle haystacks (synthetic_tasks.prose_sentences); "" = generated filler."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise ConfigError(f"haystack={path!r} is not a file: give a text file of prose, or '' for generated filler")
    with open(path, encoding="utf-8") as fh:
        sentences = synthetic_tasks.prose_sentences(fh.read())
    if len(sentences) < 10:
        raise ConfigError(f"haystack={path!r} holds only {len(sentences)} sentences of prose; give a longer text")
    return sentences


def needle_prompts(cfg, tokenizer, seed: int, bos: bool, chat: bool = False,
                   haystack: Optional[Sequence[str]] = None) -> List[Prompt]:
    """needle.samples prompts per (length, depth) cell; cell (i, j), sample s is seeded by (seed, i, j, s)."""
    prompts = []
    for i, length in enumerate(cfg.lengths):
        for j, depth in enumerate(cfg.depths):
            for s in range(cfg.samples):
                rng = np.random.default_rng([seed, 11, i, j, s])
                example = synthetic_tasks.make_needle_example(rng, int(length), tokenizer, depth=float(depth),
                                                       haystack=haystack)
                prompts.append(_qa_prompt(example, tokenizer, bos, {"length": int(length), "depth": float(depth)},
                                          chat))
    return prompts


def variable_tracking_prompts(cfg, tokenizer, seed: int, bos: bool, chat: bool = False,
                              haystack: Optional[Sequence[str]] = None) -> List[Prompt]:
    prompts = []
    for i, length in enumerate(cfg.lengths):
        for s in range(cfg.samples):
            rng = np.random.default_rng([seed, 13, i, s])
            example = synthetic_tasks.make_variable_tracking_example(rng, int(length), tokenizer, num_chains=cfg.num_chains,
                                                              chain_length=cfg.chain_length, haystack=haystack)
            prompts.append(_qa_prompt(example, tokenizer, bos, {"length": int(length)}, chat))
    return prompts


def multi_needle_prompts(task: str, cfg, tokenizer, seed: int, bos: bool, chat: bool = False,
                         haystack: Optional[Sequence[str]] = None) -> List[Prompt]:
    """cfg.samples prompts per length of one MULTI_NEEDLE task; sample s of length i is seeded by (seed, k, i, s)
    with k the task's own stream (no two tasks share a draw)."""
    stream = 17 + sorted(MULTI_NEEDLE).index(task)
    prompts = []
    for i, length in enumerate(cfg.lengths):
        for s in range(cfg.samples):
            rng = np.random.default_rng([seed, stream, i, s])
            example = synthetic_tasks.make_multi_needle_example(rng, int(length), tokenizer, haystack=haystack,
                                                         **MULTI_NEEDLE[task])
            prompts.append(_qa_prompt(example, tokenizer, bos, {"length": int(length)}, chat))
    return prompts


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: Tuple[str, str, str, str]
    answer: str  # one of LETTERS
    subject: str
    where: str  # file:line


def mmlu_files(patterns: Sequence[str]) -> List[str]:
    """The CSV files named by mmlu.files (paths or globs), each pattern matching at least one file."""
    if not ([patterns] if isinstance(patterns, str) else list(patterns)):
        raise ConfigError("task mmlu needs mmlu.files: MMLU-format CSV files (question, A, B, C, D, answer)")
    return data_lib.matching_files(patterns, "mmlu.files")


def subject_of(path: str) -> str:
    """'high_school_physics_test.csv' -> 'high school physics'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"_(test|dev|val|validation|train)$", "", stem)
    return stem.replace("_", " ")


def read_mmlu_csv(path: str) -> List[MCQuestion]:
    """Rows of an MMLU-format CSV (no header, or a header row whose answer column is not a letter)."""
    rows: List[MCQuestion] = []
    subject = subject_of(path)
    with open(path, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.reader(fh), 1):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != 6:
                raise InputError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip().upper()
            if answer not in LETTERS:
                if line == 1 and not rows:
                    continue  # a header row
                raise InputError(f"{path}:{line}: the answer must be one of A, B, C, D, got {row[5]!r}")
            rows.append(MCQuestion(row[0].strip(), tuple(c.strip() for c in row[1:5]), answer, subject,
                                   f"{path}:{line}"))
    if not rows:
        raise InputError(f"{path} holds no MMLU question")
    return rows


def _format_question(q: MCQuestion) -> str:
    return q.question + "\n" + "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, q.choices))


def mmlu_prompts(cfg, tokenizer, bos: bool) -> List[Prompt]:
    """The first mmlu.num_shots rows of each file are its few-shot examples (not scored); then up to
    mmlu.max_examples (0 = all) questions per file."""
    prompts = []
    for path in mmlu_files(cfg.files):
        rows = read_mmlu_csv(path)
        shots, questions = rows[:cfg.num_shots], rows[cfg.num_shots:]
        if not questions:
            raise InputError(f"{path}: all {len(rows)} rows are used as few-shot examples (mmlu.num_shots="
                             f"{cfg.num_shots}); none is left to score")
        if cfg.max_examples:
            questions = questions[:cfg.max_examples]
        header = f"The following are multiple choice questions (with answers) about {questions[0].subject}.\n\n"
        few_shot = "".join(_format_question(s) + f"Answer: {s.answer}\n\n" for s in shots)
        for q in questions:
            context = _encode(tokenizer, header + few_shot + _format_question(q), bos)
            prompts.append(Prompt(context=context, question=_encode(tokenizer, "Answer:", False), answer=q.answer,
                                  info={"subject": q.subject, "where": q.where}))
    return prompts


def choice_tokens(tokenizer) -> List[List[int]]:
    """Token ids of the continuations " A" .. " D" whose log-likelihoods are compared."""
    return [list(tokenizer.encode(" " + letter)) for letter in LETTERS]


# ----------------------------------------------------------------------------- perplexity text


def perplexity_sequences(cfg, tokenizer) -> np.ndarray:
    """[N, seq_len + 1] token chunks: perplexity.paths (files / globs) or the embedded corpus validation split.

    Chunks are evenly spaced over the packed text, so a few sequences still cover many documents.
    """
    if cfg.paths:
        paths = [cfg.paths] if isinstance(cfg.paths, str) else list(cfg.paths)
        documents = data_lib.text_files(paths)
        what = "perplexity.paths"
    else:
        documents = data_lib.embedded_default_corpus("validation", cfg.max_bytes)
        what = "the embedded corpus validation split"
    tokens = data_lib.pack_documents(documents, tokenizer)
    chunks = data_lib.PackedSequences(tokens, cfg.seq_len)
    if len(chunks) == 0:
        raise InputError(f"{what} has {len(tokens)} tokens, fewer than one sequence of perplexity.seq_len+1="
                         f"{cfg.seq_len + 1}; give more text or lower perplexity.seq_len")
    picks = np.unique(np.linspace(0, len(chunks) - 1, min(cfg.num_sequences, len(chunks))).round().astype(int))
    return np.stack([np.concatenate([chunks[i]["inputs"], chunks[i]["targets"][-1:]]) for i in picks]).astype(np.int32)


def prefix_length(seq_len: int, fraction: float) -> int:
    """Tokens of a perplexity chunk that form the compressed context (at least 1, leaving at least 1 to score)."""
    return int(min(max(round(seq_len * fraction), 1), seq_len - 1))


def build_prompts(task: str, config, tokenizer, bos: bool, chat: bool = False) -> Optional[List[Prompt]]:
    """The prompts of a generation / choice task (None for perplexity, which has sequences instead).

    chat: needle and variable tracking are asked as one user turn of the model's chat template.
    """
    haystack = read_haystack(config.get("haystack", ""))
    if task == "needle":
        return needle_prompts(config.needle, tokenizer, config.seed, bos, chat, haystack)
    if task == "variable_tracking":
        return variable_tracking_prompts(config.variable_tracking, tokenizer, config.seed, bos, chat, haystack)
    if task in MULTI_NEEDLE:
        return multi_needle_prompts(task, config.multi_needle, tokenizer, config.seed, bos, chat, haystack)
    if task == "mmlu":
        return mmlu_prompts(config.mmlu, tokenizer, bos)
    return None
