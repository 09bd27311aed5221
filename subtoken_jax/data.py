"""Input pipelines on grain: document sources, packing, mixing (synthetic tasks: synthetic_tasks.py).

The path of one batch:

    documents (list of str, or a TFDS split)  --pack_documents-->  one flat int32 token array
        --packed_examples-->  chunk i = tokens[i*L : i*L + L + 1]  (stride L = seq_len, so every
        adjacent token pair is predicted exactly once)  -->  {"inputs", "targets", "loss_mask"}
    synthetic tasks (generated from (seed, stream, index))  --synthetic_examples-->  one example
        per sequence, padded, loss on the answer only or on the whole text
    --make_lm_dataset-->  shuffle each part, repeat (training), mix by weights, batch

Everything up to the batch is a grain MapDataset (random access), so the training iterator's
state is one integer ({"next_index": k}) that grain.checkpoint.CheckpointSave stores in orbax.
Text is small here, so it is tokenized once up front; nothing imports TensorFlow (TFDS is used
only through its array_record data sources).

Documents: `text_files` splits files into paragraphs at blank lines (the blank lines become the
EOS between documents); `embedded_default_corpus` keeps one document per standard-library file,
since code is full of blank lines that do not end a document.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
import sysconfig
import types
from typing import Callable, Iterator, Optional, Sequence

import grain
import numpy as np

from subtoken_jax.errors import ConfigError, InputError
from subtoken_jax.synthetic_tasks import DENSE_ANSWER_TASKS, PACKED_MAX_TOKENS, TASKS, SyntheticTasks
from subtoken_jax.tokenization import Tokenizer

SOURCES = ("embedded", "text_files", "tfds", "synthetic", "mixture")


# ----------------------------------------------------------------------------- document sources


def matching_files(patterns: str | Sequence[str], what: str) -> list[str]:
    """The files named by `patterns` (paths or globs, `**` recursing), sorted per pattern, without repeats.

    A pattern that matches no file is an error rather than an empty list, because a typo would
    otherwise train or evaluate on nothing; `what` names the setting in that error.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise InputError(f"{what} needs at least one path or glob")
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise InputError(f"{what}: no file matches {pattern!r}")
        files.extend(m for m in matches if m not in files)
    return files


def text_files(patterns: str | Sequence[str]) -> list[str]:
    """Paragraphs (separated by blank lines) of the files matching `patterns`, in sorted file order."""
    files = matching_files(patterns, "text_files")
    documents: list[str] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            documents.extend(_paragraphs(fh.read()))
    return documents


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


# Machine-specific (site-packages), bulky test fixtures, or GUI code: left out so the corpus is the
# same on every install of one Python version.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def embedded_default_corpus(split: str = "train", max_bytes: int = 4_000_000) -> list[str]:
    """The Python standard library's `.py` sources: text on every machine with Python, no download.

    One document per file, files in sorted relative-path order, at most `max_bytes` bytes (the last
    file is cut). A file is in the "validation" split when the SHA-256 of its relative path is
    0 mod 20 (about 5% of files), so the split does not move when `max_bytes` changes.
    """
    if split not in ("train", "validation") or max_bytes < 1:
        raise ConfigError(f"embedded corpus needs split 'train' or 'validation' and max_bytes >= 1, got "
                          f"split={split!r}, max_bytes={max_bytes}")
    root = sysconfig.get_paths()["stdlib"]
    documents, remaining = [], max_bytes
    for rel in _stdlib_sources(root):
        if remaining <= 0:
            break
        if (_path_bucket(rel) == 0) != (split == "validation"):
            continue
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read(remaining)
        if data.strip():  # many __init__.py files are empty
            remaining -= len(data)
            documents.append(data.decode("utf-8", errors="ignore"))
    if not documents:
        raise InputError(f"found no Python sources under {root}; use data.source=text_files instead")
    return documents


def _stdlib_sources(root: str) -> list[str]:
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        paths.extend(os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py"))
    return sorted(paths)


def _path_bucket(rel_path: str) -> int:
    return int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:4], "big") % 20


class TfdsText:
    """Random access to one text feature of a prepared TFDS split, decoded (TFDS returns bytes)."""

    def __init__(self, source, key: str = "text"):
        self._source, self._key = source, key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return self._source[index][self._key].decode("utf-8")


def tfds_documents(name: str, data_dir: Optional[str], split: str, key: str = "text") -> TfdsText:
    """A TFDS split prepared as array_record, read through `tfds.data_source` (never downloads)."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, data_dir=data_dir or None, split=split, download=False)
    except (ValueError, RuntimeError, OSError) as error:  # DatasetNotFoundError is a ValueError
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"cannot read TFDS dataset {name!r} split {split!r} from {data_dir or 'the default dir'}: "
                         f"{first_line} (prepare it with build_text_tfds or download_and_prepare("
                         f"file_format='array_record'))") from error
    return TfdsText(source, key)


def build_text_tfds(name: str, files: str | Sequence[str], data_dir: str, validation_fraction: float = 0.1):
    """Prepares the paragraphs of local text files as TFDS dataset `name` in `data_dir` (array_record).

    Records are {"text": paragraph} in file order (shuffling disabled); the last
    `validation_fraction` of paragraphs form the "validation" split, the rest "train". A dataset
    already prepared under that name and version is reused as it is. Returns the builder.
    """
    import tensorflow_datasets as tfds

    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    documents = text_files(files)
    if len(documents) < 2:
        raise InputError(f"{files!r} holds {len(documents)} paragraph(s); a train and a validation split need 2")
    cut = min(max(round(len(documents) * (1.0 - validation_fraction)), 1), len(documents) - 1)
    builder = _text_builder_class(tfds, name)(documents=documents, cut=cut, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder


def _text_builder_class(tfds, name: str):
    """A GeneratorBasedBuilder subclass named `name`.

    Made per call and left unregistered (skip_registration), so several names can be built in one
    process; `tfds.data_source` finds the result by its folder. The info comes from
    `tfds.core.DatasetInfo(builder=self, ...)`, because `dataset_info_from_configs` looks for
    metadata files next to a package-style builder and fails for a class defined in a module, and
    `disable_shuffling` must be passed there (a class attribute is ignored) to keep file order.
    """

    class TextParagraphs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, documents: list[str], cut: int, **kwargs):
            self._documents, self._cut = documents, cut
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                         features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, self._cut),
                    "validation": self._generate_examples(self._cut, len(self._documents))}

        def _generate_examples(self, start: int, stop: int):
            for index in range(start, stop):
                yield index, {"text": self._documents[index]}

    return types.new_class(f"TextParagraphs_{name}", (TextParagraphs,), {"skip_registration": True},
                           lambda namespace: namespace.update(name=name))


# ----------------------------------------------------------------------------- packing and batching


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 8, *, left: bool = True,
             at_least: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (ids [B, W], mask [B, W] marking real tokens), W = the longest row (at least
    `at_least`) rounded up to a multiple of `multiple`, so few shapes reach the compiler. Rows sit at the
    right end (left padding, for prompts) or at the left end (right padding, for answers)."""
    width = -(-max([len(r) for r in rows] + [at_least]) // multiple) * multiple
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where], mask[i, where] = row, 1
    return ids, mask


def pack_documents(documents: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """All documents tokenized and concatenated, each followed by EOS (when the tokenizer has one)."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    ids: list[int] = []
    for index in range(len(documents)):
        ids.extend(tokenizer.encode(documents[index]))
        ids.extend(eos)
    return np.asarray(ids, dtype=np.int32)


class PackedSequences:
    """Chunk i of a flat token array: tokens[i*L : i*L + L + 1] as inputs/targets shifted by one.

    Chunks overlap by one token, so the last target of chunk i is the first input of chunk i+1
    and every token after the first is a target exactly once; a tail shorter than L is dropped.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self._tokens, self._seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self._tokens) - 1) // self._seq_len)

    def __getitem__(self, index: int) -> dict:
        start = index * self._seq_len
        window = self._tokens[start:start + self._seq_len + 1]
        return {"inputs": window[:-1], "targets": window[1:], "loss_mask": np.ones(self._seq_len, np.float32)}


def packed_examples(tokens: np.ndarray, seq_len: int, what: str = "the text") -> grain.MapDataset:
    """A MapDataset of the packed chunks of `tokens`; `what` names the text in the error."""
    if len(tokens) < seq_len + 1:
        raise InputError(f"{what} has {len(tokens)} tokens, fewer than one sequence of seq_len+1={seq_len + 1}; "
                         "give more text or lower seq_len")
    return grain.MapDataset.source(PackedSequences(tokens, seq_len))


def qa_lm_example(example: dict, *, tokenizer: Tokenizer, seq_len: int, answer_only_loss: bool,
                  answer_weight: float = 1.0) -> dict:
    """One synthetic example as one sequence: prompt + answer + EOS, padded to seq_len + 1.

    An example longer than the window loses the start of its context (the answer is always
    kept). loss_mask covers the answer and its EOS, or every real token when answer_only_loss is
    False; padding (EOS, or 0 without one) is never in the loss. The answer and its EOS weigh
    `answer_weight` in the loss mask (the loss is a mask-weighted mean), so a whole-text loss can
    still put most of an example's gradient on the retrieval.
    """
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    answer = tokenizer.encode(example["answer"]) + eos
    tokens = (tokenizer.encode(example["context"] + example["question"]) + answer)[-(seq_len + 1):]
    window = np.full(seq_len + 1, eos[0] if eos else 0, np.int32)
    window[:len(tokens)] = tokens
    mask = np.zeros(seq_len, np.float32)
    answer_start = max(len(tokens) - len(answer) - 1, 0)
    first = answer_start if answer_only_loss else 0
    mask[first:len(tokens) - 1] = 1.0
    mask[answer_start:len(tokens) - 1] = answer_weight
    return {"inputs": window[:-1], "targets": window[1:], "loss_mask": mask}


class PackedSyntheticTasks:
    """Random access to sequences packed with several synthetic examples of random lengths.

    Sequence i is a pure function of (seed, stream, i): examples (task drawn uniformly from `tasks`)
    of num_tokens drawn uniformly from [min_tokens, room left], each prompt + answer + EOS, are laid
    end to end in a window of seq_len + 1 tokens until fewer than min_tokens + 1 are left (an
    example that would leave less than that takes the whole rest; one whose essential part alone
    overflows the room left is dropped, and the rest is padding). Short examples teach retrieval at
    short range cheaply; the first one spans up to the full window, so long range is trained too.
    The loss mask follows qa_lm_example for each example; the few trailing slots are padding.
    """

    def __init__(self, tasks: Sequence[str], seq_len: int, min_tokens: int, tokenizer: Tokenizer, *, seed: int,
                 length: int, stream: int = 0, answer_only_loss: bool = False, answer_weight: float = 1.0):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ConfigError(f"synthetic tasks {list(tasks)} must be a non-empty list of: {', '.join(TASKS)}")
        if tokenizer.eos_id is None:
            raise ConfigError("packed synthetic sequences need a tokenizer with an EOS token (between examples)")
        if not 1 <= min_tokens <= seq_len:
            raise ConfigError(f"data.synthetic_min_tokens={min_tokens} must be in [1, seq_len={seq_len}]")
        self._tasks, self._seq_len, self._min, self._tokenizer = list(tasks), seq_len, min_tokens, tokenizer
        self._seed, self._length, self._stream = seed, length, stream
        self._answer_only, self._answer_weight = answer_only_loss, answer_weight

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self._seed, self._stream, index, 1])
        window = np.full(self._seq_len + 1, self._tokenizer.eos_id, np.int32)
        weight = np.zeros(self._seq_len + 1, np.float32)  # weight[t]: of the prediction of token t
        at = 0
        while self._seq_len + 1 - at >= self._min + 1:
            most = self._seq_len - at  # prompt + answer tokens that fit before the EOS
            task = self._tasks[int(rng.integers(len(self._tasks)))]
            num_tokens = int(rng.integers(self._min, most + 1))
            if most - num_tokens < self._min + 1:
                num_tokens = most
            num_tokens = min(num_tokens, max(PACKED_MAX_TOKENS.get(task, num_tokens), self._min))
            example = TASKS[task](rng, num_tokens, self._tokenizer)
            prompt = self._tokenizer.encode(example["context"] + example["question"])
            answer = self._tokenizer.encode(example["answer"]) + [self._tokenizer.eos_id]
            tokens = prompt + answer
            if len(tokens) > most + 1:  # its essential part alone does not fit the room left: pad instead
                break
            window[at:at + len(tokens)] = tokens
            answer_start = at + len(tokens) - len(answer)
            weight[at + 1 if not self._answer_only else answer_start:at + len(tokens)] = 1.0
            if task not in DENSE_ANSWER_TASKS:
                weight[answer_start:at + len(tokens)] = self._answer_weight
            at += len(tokens)
        return {"inputs": window[:-1], "targets": window[1:], "loss_mask": weight[1:]}


def synthetic_examples(tasks: Sequence[str], tokenizer: Tokenizer, seq_len: int, *, seed: int, length: int,
                       stream: int = 0, answer_only_loss: bool = False, answer_weight: float = 1.0,
                       min_tokens: Optional[int] = None) -> grain.MapDataset:
    """A MapDataset of synthetic tasks (generated when read): one example filling each sequence, or, with
    min_tokens, several examples of random lengths packed into each (PackedSyntheticTasks)."""
    if min_tokens:
        return grain.MapDataset.source(PackedSyntheticTasks(
            tasks, seq_len, min_tokens, tokenizer, seed=seed, length=length, stream=stream,
            answer_only_loss=answer_only_loss, answer_weight=answer_weight))
    num_tokens = seq_len if tokenizer.eos_id is not None else seq_len + 1
    source = SyntheticTasks(tasks, num_tokens, tokenizer, seed=seed, length=length, stream=stream)
    return grain.MapDataset.source(source).map(
        functools.partial(qa_lm_example, tokenizer=tokenizer, seq_len=seq_len, answer_only_loss=answer_only_loss,
                          answer_weight=answer_weight))


def make_lm_dataset(parts: Sequence[grain.MapDataset], batch_size: int, *, seed: int,
                    weights: Optional[Sequence[float]] = None, train: bool = True) -> grain.MapDataset:
    """Batches of sequences from one or more parts, mixed by `weights` (shares of sequences).

    Each part is shuffled with its own seed first (grain's mix interleaves in a fixed pattern, so
    shuffling after mixing would distort the shares). Training repeats every part forever, each
    epoch in a new order; evaluation is one finite pass that ends when a part runs out. The last
    partial batch is dropped so every batch has the same shape.
    """
    shuffled = [part.shuffle(seed=seed + i) for i, part in enumerate(parts)]
    if train:
        shuffled = [part.repeat() for part in shuffled]
    mixed = shuffled[0] if len(shuffled) == 1 else grain.MapDataset.mix(shuffled, weights)
    return mixed.batch(batch_size, drop_remainder=True)


def lm_iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
    """A checkpointable iterator (get_state/set_state) with a small prefetch in one thread."""
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


# ----------------------------------------------------------------------------- config-driven entry


def check_data_config(config) -> None:
    """Raises ConfigError for an unusable data config; cheap, so it runs before any work."""
    if config.source not in SOURCES:
        raise ConfigError(f"data.source={config.source!r} is not one of: {', '.join(SOURCES)}")
    names = _source_names(config)
    if config.source == "mixture":
        leaves = [s for s in SOURCES if s != "mixture"]
        if not names or any(n not in leaves for n in names):
            raise ConfigError(f"data.mixture={names} must be a non-empty list of: {', '.join(leaves)}")
        weights = list(config.get("mixture_weights", ()))
        if len(weights) != len(names) or any(not w > 0 for w in weights):
            raise ConfigError(f"data.mixture_weights={weights} must be {len(names)} positive numbers, one per "
                              f"entry of data.mixture={names}")
    if "text_files" in names and not _paths(config):
        raise ConfigError("data.source text_files needs data.paths (files or globs)")
    if "text_files" in names and not 0.0 < config.get("validation_fraction", 0.1) < 1.0:
        raise ConfigError(f"data.validation_fraction must be in (0, 1), got {config.validation_fraction}")
    if "tfds" in names and not config.get("tfds_name"):
        raise ConfigError("data.source tfds needs data.tfds_name (a dataset prepared as array_record)")
    if "synthetic" in names:
        tasks = list(config.get("synthetic_tasks", ()))
        if not tasks or any(t not in TASKS for t in tasks):
            raise ConfigError(f"data.synthetic_tasks={tasks} must be a non-empty list of: {', '.join(TASKS)}")
        if not config.get("answer_weight", 1.0) > 0:
            raise ConfigError(f"data.answer_weight must be > 0, got {config.answer_weight}")
    if "embedded" in names and config.get("max_bytes", 1) < 1:
        raise ConfigError(f"data.max_bytes must be >= 1, got {config.max_bytes}")
    if config.get("eval_batches", 1) < 1:
        raise ConfigError(f"data.eval_batches must be >= 1, got {config.eval_batches}")


def build_datasets(config, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                   seed: int) -> tuple[grain.DatasetIterator, Callable[[], Iterator[dict]]]:
    """(training iterator, eval_batches_fn) from the `data` section of a run config.

    The training iterator never ends and checkpoints through grain; eval_batches_fn() returns a
    fresh iterator over the same first `data.eval_batches` evaluation batches every time (fewer
    when the evaluation text is short).
    """
    check_data_config(config)
    names = _source_names(config)
    weights = list(config.mixture_weights) if config.source == "mixture" else None
    eval_examples = config.get("eval_batches", 8) * batch_size
    parts = [_train_eval_parts(name, config, tokenizer, seq_len, seed, eval_examples) for name in names]
    train = make_lm_dataset([p[0] for p in parts], batch_size, seed=seed, weights=weights, train=True)
    evaluation = make_lm_dataset([p[1] for p in parts], batch_size, seed=seed, weights=weights, train=False)
    evaluation = evaluation[:config.get("eval_batches", 8)]
    if len(evaluation) == 0:
        raise InputError(f"the evaluation data of {'+'.join(names)} does not fill one batch of {batch_size} "
                         f"sequences of {seq_len} tokens; lower batch_size or seq_len, or give more text")
    return lm_iterator(train), lambda: lm_iterator(evaluation)


def _source_names(config) -> list[str]:
    return list(config.get("mixture", ())) if config.source == "mixture" else [config.source]


def _paths(config) -> list[str]:
    paths = config.get("paths", ())
    return [paths] if isinstance(paths, str) else list(paths)


def _train_eval_parts(name: str, config, tokenizer: Tokenizer, seq_len: int, seed: int,
                      eval_examples: int) -> tuple[grain.MapDataset, grain.MapDataset]:
    """The training and evaluation parts of one source.

    text_files: the token stream is cut at 1 - validation_fraction (the convention of "first 90%
    to train, last 10% to evaluate"); embedded: its own hash split; tfds: data.split and
    data.eval_split; synthetic: two disjoint streams of the same generator.
    """
    if name == "synthetic":
        tasks, answer_only = list(config.synthetic_tasks), config.get("answer_only_loss", False)
        make = functools.partial(synthetic_examples, tasks, tokenizer, seq_len, seed=seed,
                                 answer_only_loss=answer_only, answer_weight=config.get("answer_weight", 1.0),
                                 min_tokens=config.get("synthetic_min_tokens", 0))
        return make(length=2**40, stream=0), make(length=eval_examples, stream=1)
    if name == "embedded":
        max_bytes = config.get("max_bytes", 4_000_000)
        train, held_out = (pack_documents(embedded_default_corpus(s, max_bytes), tokenizer)
                           for s in ("train", "validation"))
    elif name == "text_files":
        tokens = pack_documents(text_files(_paths(config)), tokenizer)
        cut = int(len(tokens) * (1.0 - config.get("validation_fraction", 0.1)))
        train, held_out = tokens[:cut], tokens[cut:]
    else:
        tfds_args = (config.tfds_name, config.get("tfds_data_dir", ""))
        train, held_out = (pack_documents(tfds_documents(*tfds_args, split), tokenizer)
                           for split in (config.get("split", "train"), config.get("eval_split", "validation")))
    return (packed_examples(train, seq_len, f"the {name} training split"),
            packed_examples(held_out, seq_len, f"the {name} evaluation split"))
