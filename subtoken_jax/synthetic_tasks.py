"""Synthetic long-context tasks over generated (or real, "haystack") prose: needle in a haystack and its
RULER-style variants, variable tracking, associative recall and copying.

Shared by training (data.py's synthetic source), evaluation (evaluation/tasks.py) and the predictor's
training prompts. Every generator takes (rng, num_tokens, tokenizer) and returns {"task", "context",
"question", "answer", "text", "query"} with text = context + question + answer. Its length is
example_length(example) = tokens(context + question) + tokens(answer): the prompt an evaluator feeds
plus the answer it scores. Filler is added while that stays <= num_tokens, so the length lands within
one filler sentence (or key-value pair) of num_tokens; an example whose essential part alone is longer
than num_tokens comes out at that minimum.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Optional, Sequence

import numpy as np

from subtoken_jax.errors import ConfigError
from subtoken_jax.tokenization import Tokenizer

_ADJECTIVES = ("quiet", "distant", "small", "golden", "narrow", "ancient", "busy", "gentle", "hollow", "bright",
               "silent", "crooked", "patient", "heavy", "pale", "green")
_NOUNS = ("river", "garden", "lantern", "village", "mountain", "window", "harbor", "meadow", "bridge", "forest",
          "library", "orchard", "tower", "market", "valley", "road")
_VERBS = ("follows", "crosses", "watches", "circles", "shelters", "faces", "borders", "reflects", "overlooks",
          "touches", "hides", "greets")
_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "ni", "pa", "qui", "zo", "bel", "ta", "ros", "fen")
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = "abcdefghijklmnopqrstuvwxyz"


def example_length(example: dict, tokenizer: Tokenizer) -> int:
    """Tokens of the prompt (context + question) plus tokens of the answer."""
    return len(tokenizer.encode(example["context"] + example["question"])) + len(tokenizer.encode(example["answer"]))


def make_needle_example(rng: np.random.Generator, num_tokens: int, tokenizer: Tokenizer, *,
                        depth: Optional[float] = None, haystack: Optional[Sequence[str]] = None) -> dict:
    """Needle in a haystack: one "magic number" sentence at `depth` (0 = start, 1 = end; drawn
    from rng when None) of filler sentences, measured in characters of the filler.

    haystack: sentences of real prose to draw the filler from (a run of consecutive ones from a random
    start, see prose_sentences); default: generated filler sentences."""
    depth = float(rng.uniform()) if depth is None else depth
    key, value = _word(rng), str(rng.integers(1_000_000, 10_000_000))
    needle = f"The magic number for {key} is {value}."
    query = f"What is the magic number for {key}?"
    question, answer = f"\nQ: {query}\nA:", f" {value}"

    def render(filler: list[str]) -> dict:
        return _example("needle", " ".join(_insert_at_depths(filler, [needle], [depth])), question, answer, query)

    return _fill_to_budget(render, _filler(rng, haystack), " ", num_tokens, tokenizer)


def make_multi_needle_example(rng: np.random.Generator, num_tokens: int, tokenizer: Tokenizer, *,
                              num_keys: int = 1, num_values: int = 1, asked: int = 1,
                              haystack: Optional[Sequence[str]] = None) -> dict:
    """RULER-style needles: `num_keys` keys with `num_values` magic numbers each, every needle sentence at
    its own uniform depth; the question asks for all values of `asked` of the keys (the answer lists them,
    space-separated, in context order).

    num_keys = 4, asked = 1: multi-key (distractor needles); num_values = 2: multi-value; num_keys = 2,
    asked = 2: two facts far apart that the answer must both recall.
    """
    if not 1 <= asked <= num_keys or num_values < 1:
        raise ConfigError(f"multi-needle needs 1 <= asked <= num_keys and num_values >= 1, got asked={asked}, "
                          f"num_keys={num_keys}, num_values={num_values}")
    keys = _unique(rng, lambda: _word(rng), num_keys)
    values = _unique(rng, lambda: str(rng.integers(1_000_000, 10_000_000)), num_keys * num_values)
    needles = [(k, values[i * num_values + j]) for i, k in enumerate(keys) for j in range(num_values)]
    order = rng.permutation(len(needles))
    depths = np.sort(rng.uniform(size=len(needles)))
    placed = [needles[i] for i in order]
    asked_keys = keys[:asked]
    answer_values = [v for k, v in placed if k in asked_keys]
    names = " and ".join(asked_keys)
    query = (f"What {'is the magic number' if num_values == 1 and asked == 1 else 'are the magic numbers'} "
             f"for {names}?")
    question, answer = f"\nQ: {query}\nA:", " " + " ".join(answer_values)
    sentences = [f"One of the magic numbers for {k} is {v}." if num_values > 1 else f"The magic number for {k} is {v}."
                 for k, v in placed]

    def render(filler: list[str]) -> dict:
        return _example("multi_needle", " ".join(_insert_at_depths(filler, sentences, list(depths))), question,
                        answer, query)

    return _fill_to_budget(render, _filler(rng, haystack), " ", num_tokens, tokenizer)


def _insert_at_depths(filler: list[str], items: list[str], depths: list[float]) -> list[str]:
    """filler with items[i] inserted at relative character depth depths[i] (sorted)."""
    done = np.cumsum([0] + [len(s) for s in filler])  # characters before each sentence
    out, start = [], 0
    for item, depth in zip(items, depths):
        at = int(np.searchsorted(done, depth * done[-1]))
        out += filler[start:at] + [item]
        start = max(start, at)
    return out + filler[start:]


def prose_sentences(text: str, min_chars: int = 20) -> list[str]:
    """Sentences of real prose for haystacks: `text` split after . ! ?, keeping those of at least min_chars
    characters. WikiText's markup is undone (heading lines, @-@ joins, spaces before punctuation and
    clitics) and sentences with its <unk> placeholder are dropped."""
    text = re.sub(r"^\s*=+[^=\n]*=+\s*$", " ", text, flags=re.MULTILINE)  # WikiText headings
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" ([,.;:!?)\]]|'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b)", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in sentences if len(s) >= min_chars and "<unk>" not in s]


def _filler(rng: np.random.Generator, haystack: Optional[Sequence[str]]) -> Callable[[], str]:
    """Draws filler sentences: generated ones, or consecutive sentences of `haystack` from a random start."""
    if haystack is None:
        return functools.partial(_filler_sentence, rng)
    if not haystack:
        raise ConfigError("the haystack holds no sentences")
    position = [int(rng.integers(len(haystack)))]

    def next_sentence() -> str:
        sentence = haystack[position[0] % len(haystack)]
        position[0] += 1
        return sentence

    return next_sentence


def make_variable_tracking_example(rng: np.random.Generator, num_tokens: int, tokenizer: Tokenizer, *,
                                   num_chains: int = 2, chain_length: int = 3,
                                   haystack: Optional[Sequence[str]] = None) -> dict:
    """RULER-style variable tracking: chains `VAR A = 12345.`, `VAR B = VAR A.`, ... hidden in filler.

    The question asks for every variable holding the first chain's value; the others are
    distractors with different values. Statements keep their order within a chain. When the
    statements alone exceed num_tokens, distractor chains and then hops are dropped (down to one
    chain of two variables) so the answer stays derivable from the context.
    """
    if num_chains < 1 or chain_length < 2:
        raise ConfigError(f"variable tracking needs num_chains >= 1 and chain_length >= 2, got {num_chains}, "
                          f"{chain_length}")
    names = _unique(rng, lambda: "".join(rng.choice(list(_UPPER), 5)), num_chains * chain_length)
    values = _unique(rng, lambda: str(rng.integers(10_000, 100_000)), num_chains)
    chains = [names[c * chain_length:(c + 1) * chain_length] for c in range(num_chains)]
    interleave = rng.permutation(np.repeat(np.arange(num_chains), chain_length))
    slots = np.sort(rng.uniform(size=len(interleave)))

    def statements(shape: tuple[int, int]) -> list[str]:
        kept, length = shape
        written, out = [0] * kept, []  # variables of each chain written so far
        for c in interleave:
            if c < kept and written[c] < length:
                i = written[c]
                out.append(f"VAR {chains[c][i]} = {values[c] if i == 0 else 'VAR ' + chains[c][i - 1]}.")
                written[c] += 1
        return out

    query = f"Which variables are assigned the value {values[0]}?"
    question = f"\nQ: {query}\nA:"

    def render_shape(shape: tuple[int, int], filler: list[str]) -> dict:
        placed = statements(shape)
        where = np.round(slots[np.linspace(0, len(slots) - 1, len(placed)).astype(int)] * len(filler)).astype(int)
        pieces = list(filler)
        for offset, (at, statement) in enumerate(zip(where, placed)):
            pieces.insert(int(at) + offset, statement)
        answer = " " + " ".join(chains[0][:shape[1]])
        return _example("variable_tracking", " ".join(pieces), question, answer, query)

    shapes = [(c, n) for n in range(chain_length, 1, -1) for c in range(num_chains, 0, -1)]
    shape = next((s for s in shapes if example_length(render_shape(s, []), tokenizer) <= num_tokens), (1, 2))
    return _fill_to_budget(functools.partial(render_shape, shape), _filler(rng, haystack), " ", num_tokens,
                           tokenizer)


def make_associative_recall_example(rng: np.random.Generator, num_tokens: int, tokenizer: Tokenizer) -> dict:
    """Associative recall: lines `key: value` (unique 4-letter keys); the question names one key,
    chosen at a uniform position in the list."""
    position = float(rng.uniform())
    seen: set[str] = set()

    def new_pair() -> str:
        key = _unique_one(rng, lambda: "".join(rng.choice(list(_LOWER), 4)), seen)
        return f"{key}: {rng.integers(10_000, 100_000)}"

    def render(pairs: list[str]) -> dict:
        key, value = pairs[min(int(position * len(pairs)), len(pairs) - 1)].split(": ")
        return _example("associative_recall", "\n".join(pairs), f"\nQ: What is the value of {key}?\nA:", f" {value}")

    first = new_pair()  # the list is never empty, so there is always a key to ask for
    return _fill_to_budget(lambda more: render([first] + more), new_pair, "\n", num_tokens, tokenizer)


def make_copy_example(rng: np.random.Generator, num_tokens: int, tokenizer: Tokenizer) -> dict:
    """Copy: a run of random "words" (2-6 lowercase letters, or 3-7 digit numbers, a third of them), and
    the answer repeats it verbatim.

    Almost every answer token is predictable only by looking back at the context (an induction
    head), so a whole-text loss on these examples is a dense training signal for the copying that
    the retrieval tasks need, where it is otherwise one answer per example. Numbers matter: with
    10 symbols, a digit's predecessor alone rarely says which digit comes next, so copying them
    takes a longer match than copying letters.
    """
    question = "\nQ: Repeat the text.\nA:"

    def render(words: list[str]) -> dict:
        return _example("copy", " ".join(words), question, " " + " ".join(words))

    def word() -> str:
        if rng.uniform() < 1 / 3:
            return str(rng.integers(100, 10_000_000))
        return "".join(rng.choice(list(_LOWER), int(rng.integers(2, 7))))

    words: list[str] = [word()]
    while True:
        more = words + [word()]
        if example_length(render(more), tokenizer) > num_tokens:
            return render(words)
        words = more


TASKS: dict[str, Callable[..., dict]] = {
    "needle": make_needle_example,
    "variable_tracking": make_variable_tracking_example,
    "associative_recall": make_associative_recall_example,
    "copy": make_copy_example,
}
# Tasks whose answers are long and dense (scored like text: answer_weight does not apply to them).
DENSE_ANSWER_TASKS = ("copy",)
# Longest example of a task in packed synthetic sequences: short copies (an induction head has few
# positions to search) are learnt within a few hundred steps, 250-token ones not in 500.
PACKED_MAX_TOKENS = {"copy": 96}


def _example(task: str, context: str, question: str, answer: str, query: Optional[str] = None) -> dict:
    """query: the bare question (no "Q:" / "A:" scaffolding), for chat-templated prompts."""
    return {"task": task, "context": context, "question": question, "answer": answer,
            "text": context + question + answer, "query": query}


def _fill_to_budget(render: Callable[[list[str]], dict], new_item: Callable[[], str], sep: str, num_tokens: int,
                    tokenizer: Tokenizer) -> dict:
    """render(items) with as many new items as fit num_tokens.

    Items are counted one by one (each with its separator), which is exact for byte tokenizers and
    close for BPE; the rendered example is then measured exactly and trailing items are dropped
    until it fits.
    """
    budget = num_tokens - example_length(render([]), tokenizer)
    items: list[str] = []
    while True:
        item = new_item()
        cost = len(tokenizer.encode(sep + item))
        if cost > budget:
            break
        items.append(item)
        budget -= cost
    example = render(items)
    while items and example_length(example, tokenizer) > num_tokens:
        items.pop()
        example = render(items)
    return example


def _filler_sentence(rng: np.random.Generator) -> str:
    a, b = rng.choice(_ADJECTIVES, 2)
    n, m = rng.choice(_NOUNS, 2)
    return f"The {a} {n} {rng.choice(_VERBS)} the {b} {m}."


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(_SYLLABLES, 3)).capitalize()


def _unique(rng: np.random.Generator, draw: Callable[[], str], count: int) -> list[str]:
    seen: set[str] = set()
    return [_unique_one(rng, draw, seen) for _ in range(count)]


def _unique_one(rng: np.random.Generator, draw: Callable[[], str], seen: set[str]) -> str:
    value = draw()
    while value in seen:
        value = draw()
    seen.add(value)
    return value


class SyntheticTasks:
    """Random access to synthetic examples; element i is a pure function of (seed, stream, i).

    Tasks take turns (element i is task i mod len(tasks)). Use different `stream`s for training
    and evaluation so that they never share an example.
    """

    def __init__(self, tasks: Sequence[str], num_tokens: int, tokenizer: Tokenizer, *, seed: int, length: int,
                 stream: int = 0):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ConfigError(f"synthetic tasks {list(tasks)} must be a non-empty list of: {', '.join(TASKS)}")
        self._tasks, self._num_tokens, self._tokenizer = list(tasks), num_tokens, tokenizer
        self._seed, self._length, self._stream = seed, length, stream

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self._seed, self._stream, index])
        return TASKS[self._tasks[index % len(self._tasks)]](rng, self._num_tokens, self._tokenizer)
