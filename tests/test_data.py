"""Input pipelines: packing, shuffling, checkpointable state, TFDS round trip, synthetic tasks, errors."""

import os
import re
import sys
import zlib

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ml_collections import ConfigDict

from subtoken_jax import data, synthetic_tasks
from subtoken_jax.errors import ConfigError, InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "tests", "data", "tinyshakespeare_head.txt")  # in the repository: see tests/data/README.md


class Bytes:
    """UTF-8 bytes plus EOS 256."""

    eos_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode("utf-8"))


class Words:
    """One token per whitespace-separated word or newline: a tokenizer whose lengths differ from bytes."""

    eos_id = 0
    vocab_size = 1000

    def encode(self, text):
        return [1 + zlib.crc32(w.encode()) % 999 for w in re.findall(r"\S+|\n", text)]


def _config(**fields):
    base = dict(source="synthetic", mixture=(), mixture_weights=(), paths=(), tfds_name="", tfds_data_dir="",
                synthetic_tasks=("needle", "variable_tracking", "associative_recall"), max_bytes=100_000,
                eval_batches=2)
    base.update(fields)
    return ConfigDict(base)


def _shakespeare_mixture(**fields):
    return _config(source="mixture", mixture=("text_files", "synthetic"), mixture_weights=(0.75, 0.25),
                   paths=(SHAKESPEARE,), answer_only_loss=True, **fields)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(batches_a, batches_b):
    return all(np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b) for k in a)


# ----------------------------------------------------------------------------- packing


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=40), min_size=1, max_size=12), st.integers(1, 16))
def test_packing_shifts_targets_and_covers_every_token(documents, seq_len):
    tokens = data.pack_documents(documents, Bytes())
    expected = [t for doc in documents for t in list(doc.encode()) + [256]]
    assert tokens.dtype == np.int32 and tokens.tolist() == expected
    chunks = data.PackedSequences(tokens, seq_len)
    assert len(chunks) == (len(tokens) - 1) // seq_len
    covered = [int(tokens[0])] if len(chunks) else []
    for i in range(len(chunks)):
        chunk = chunks[i]
        assert chunk["inputs"].shape == chunk["targets"].shape == (seq_len,)
        np.testing.assert_array_equal(chunk["inputs"][1:], chunk["targets"][:-1])
        assert chunk["loss_mask"].dtype == np.float32 and chunk["loss_mask"].all()
        covered.extend(chunk["targets"].tolist())
    # every token is a target once, in order; only a tail shorter than seq_len is left out
    assert covered == tokens[:len(covered)].tolist() and len(tokens) - len(covered) < seq_len + 1


def test_answer_only_mask_covers_answer_and_eos():
    tok = Bytes()
    example = synthetic_tasks.make_associative_recall_example(np.random.default_rng(0), 60, tok)
    for answer_only in (True, False):
        row = data.qa_lm_example(example, tokenizer=tok, seq_len=64, answer_only_loss=answer_only)
        scored = row["targets"][row["loss_mask"] > 0].tolist()
        full = tok.encode(example["text"]) + [256]
        np.testing.assert_array_equal(row["inputs"][1:len(full) - 1], row["targets"][:len(full) - 2])
        assert scored == (tok.encode(example["answer"]) + [256] if answer_only else full[1:])


# ----------------------------------------------------------------------------- shuffling, mixing, state


def test_shuffle_is_deterministic_per_seed_and_eval_is_one_pass():
    tokens = data.pack_documents(data.text_files(SHAKESPEARE)[:300], Bytes())
    part = data.packed_examples(tokens, 32)

    def first(seed):
        return _take(data.lm_iterator(data.make_lm_dataset([part], 4, seed=seed)), 3)

    assert _same(first(0), first(0))
    assert not _same(first(0), first(1))
    once = data.make_lm_dataset([part], 4, seed=0, train=False)
    assert len(once) == len(part) // 4
    rows = np.concatenate([b["inputs"] for b in data.lm_iterator(once)])
    assert len({r.tobytes() for r in rows}) == len(rows)  # no chunk twice in one pass


def test_mixture_shares_and_state_round_trip():
    train_iter, eval_fn = data.build_datasets(_shakespeare_mixture(), Bytes(), seq_len=64, batch_size=8, seed=0)
    assert isinstance(train_iter, grain.DatasetIterator)
    _take(train_iter, 3)
    state = train_iter.get_state()
    ahead = _take(train_iter, 4)
    train_iter.set_state(state)
    assert _same(ahead, _take(train_iter, 4))
    # answer-only synthetic rows score a few tokens; text rows score all 64
    rows = np.concatenate([b["loss_mask"].sum(1) for b in ahead])
    assert abs(np.mean(rows < 64) - 0.25) <= 0.07
    evals = [list(eval_fn()) for _ in range(2)]
    assert len(evals[0]) == 2 and _same(*evals)


def test_iterator_state_survives_orbax_checkpoint(tmp_path):
    def fresh():
        return data.build_datasets(_shakespeare_mixture(), Bytes(), seq_len=32, batch_size=4, seed=3)[0]

    it = fresh()
    _take(it, 5)
    with ocp.CheckpointManager(str(tmp_path)) as manager:
        manager.save(5, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    ahead = _take(it, 3)
    restored = fresh()
    with ocp.CheckpointManager(str(tmp_path)) as manager:
        manager.restore(5, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(restored)))
    assert _same(ahead, _take(restored, 3))


# ----------------------------------------------------------------------------- TFDS


def test_tfds_builder_round_trip_in_file_order(tmp_path):
    paragraphs = [f"paragraph {i}\nsecond line of {i}" for i in range(20)]
    source = tmp_path / "text.txt"
    source.write_text("\n\n".join(paragraphs) + "\n")
    data.build_text_tfds("subtoken_test_paragraphs", str(source), str(tmp_path / "tfds"), validation_fraction=0.25)
    train = data.tfds_documents("subtoken_test_paragraphs", str(tmp_path / "tfds"), "train")
    valid = data.tfds_documents("subtoken_test_paragraphs", str(tmp_path / "tfds"), "validation")
    assert [train[i] for i in range(len(train))] == paragraphs[:15]
    assert [valid[i] for i in range(len(valid))] == paragraphs[15:]

    config = _config(source="tfds", tfds_name="subtoken_test_paragraphs", tfds_data_dir=str(tmp_path / "tfds"),
                     eval_batches=1)
    train_iter, eval_fn = data.build_datasets(config, Bytes(), seq_len=8, batch_size=2, seed=0)
    assert next(train_iter)["inputs"].shape == (2, 8) and len(list(eval_fn())) == 1
    with pytest.raises(InputError, match="'missing_set'"):
        data.tfds_documents("missing_set", str(tmp_path / "tfds"), "train")
    assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- synthetic tasks


# slack: the longest filler sentence ("The crooked mountain overlooks the patient library.") in each tokenizer
@pytest.mark.parametrize("tokenizer,slack", [(Bytes(), 56), (Words(), 8)], ids=["bytes", "words"])
@pytest.mark.parametrize("task", sorted(synthetic_tasks.TASKS))
def test_synthetic_lengths_follow_the_tokenizer(task, tokenizer, slack):
    for seed, num_tokens in enumerate((300, 1500)):
        example = synthetic_tasks.TASKS[task](np.random.default_rng(seed), num_tokens, tokenizer)
        assert example["text"] == example["context"] + example["question"] + example["answer"]
        assert num_tokens - slack <= synthetic_tasks.example_length(example, tokenizer) <= num_tokens


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_needle_sits_at_requested_depth(depth):
    example = synthetic_tasks.make_needle_example(np.random.default_rng(7), 3000, Bytes(), depth=depth)
    value = example["answer"].strip()
    key = re.search(r"magic number for (\w+)\?", example["question"]).group(1)
    needle = f"The magic number for {key} is {value}."
    context = example["context"]
    assert context.count(needle) == 1 and context.count(value) == 1
    assert abs(context.index(needle) / (len(context) - len(needle)) - depth) < 0.03


def _variables_with_value(context, value):
    """Brute force: run the assignments in order and collect the variables that end up equal to value."""
    env = {}
    for name, ref, literal in re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.", context):
        env[name] = env[ref] if ref else literal
    return {name for name, v in env.items() if v == value}, len(env)


@pytest.mark.parametrize("seed,num_tokens,chains,length", [(0, 2000, 3, 4), (1, 500, 2, 3), (2, 110, 2, 3)])
def test_variable_tracking_answer_matches_brute_force(seed, num_tokens, chains, length):
    example = synthetic_tasks.make_variable_tracking_example(np.random.default_rng(seed), num_tokens, Bytes(),
                                                  num_chains=chains, chain_length=length)
    value = re.search(r"value (\d+)\?", example["question"]).group(1)
    holders, assigned = _variables_with_value(example["context"], value)
    answer = example["answer"].split()
    assert set(answer) == holders and len(answer) >= 2
    if num_tokens >= 500:  # room for every chain: the distractors are there
        assert (len(answer), assigned) == (length, chains * length)


def test_associative_recall_answer_is_the_queried_pair():
    for seed in range(5):
        example = synthetic_tasks.make_associative_recall_example(np.random.default_rng(seed), 400, Bytes())
        key = re.search(r"value of (\w+)\?", example["question"]).group(1)
        pairs = dict(line.split(": ") for line in example["context"].split("\n"))
        assert len(pairs) == example["context"].count("\n") + 1  # keys are unique
        assert pairs[key] == example["answer"].strip()


def test_copy_answer_repeats_the_context():
    example = synthetic_tasks.make_copy_example(np.random.default_rng(0), 200, Bytes())
    assert example["answer"] == " " + example["context"] and re.fullmatch(r"[a-z0-9 ]+", example["context"])


def test_packed_synthetic_sequences():
    """Several whole examples per window, each prompt + answer + EOS; answers weigh answer_weight (copy: 1)."""
    tasks = ["needle", "variable_tracking", "associative_recall", "copy"]
    source = data.PackedSyntheticTasks(tasks, 256, 64, Bytes(), seed=0, length=50, answer_weight=4.0)
    assert np.array_equal(source[7]["inputs"], source[7]["inputs"]) and len(source) == 50
    counts = []
    for i in range(20):
        row = source[i]
        window = np.concatenate([row["inputs"], row["targets"][-1:]])
        mask = np.concatenate([[0.0], row["loss_mask"]])  # mask[t]: weight of predicting window[t]
        assert row["inputs"].shape == (256,) and set(np.unique(mask)) <= {0.0, 1.0, 4.0}
        pieces = bytes(int(t) for t in window if t != 256).decode().split("\nA: ")
        counts.append(len(pieces) - 1)
        ends = np.flatnonzero(window == 256)
        start = 0
        for end in ends:
            if end == start:  # padding
                start = end + 1
                continue
            text = bytes(int(t) for t in window[start:end]).decode()
            question = text.index("\nA:") + len("\nA:")
            assert mask[start] == 0.0 and np.all(mask[start + 1:start + question] == 1.0)
            answer_weight = 1.0 if text.startswith(text[question + 1:]) else 4.0  # a copy answer repeats its context
            assert np.all(mask[start + question:end + 1] == answer_weight), text
            start = end + 1
    assert np.mean(counts) > 1.5  # examples of 64..256 tokens: usually several per window


def test_synthetic_source_is_a_pure_function_of_seed_and_index():
    def source(seed, stream=0):
        return synthetic_tasks.SyntheticTasks(["needle", "associative_recall"], 200, Bytes(), seed=seed, length=10,
                                   stream=stream)

    assert source(0)[3] == source(0)[3] and source(0)[3]["task"] == "associative_recall"
    assert source(0)[3] != source(1)[3] and source(0)[3] != source(0, stream=1)[3]


# ----------------------------------------------------------------------------- embedded corpus and errors


def test_embedded_corpus_is_deterministic_bounded_and_split():
    train = data.embedded_default_corpus("train", max_bytes=300_000)
    assert train and train == data.embedded_default_corpus("train", max_bytes=300_000)
    assert sum(len(doc.encode("utf-8")) for doc in train) <= 300_000
    valid = data.embedded_default_corpus("validation", max_bytes=300_000)
    assert valid and not set(valid) & set(train)


def test_unknown_source_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as error:
        data.build_datasets(_config(source="webtext"), Bytes(), 16, 2, 0)
    message = str(error.value)
    assert "\n" not in message and "'webtext'" in message
    assert all(name in message for name in data.SOURCES)
    with pytest.raises(ConfigError, match="mixture_weights"):
        data.check_data_config(_config(source="mixture", mixture=("embedded", "synthetic"), mixture_weights=(1.0,)))
    with pytest.raises(ConfigError, match="synthetic_tasks"):
        data.check_data_config(_config(synthetic_tasks=("needle", "sudoku")))


def test_missing_text_file_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-*.txt")
    with pytest.raises(InputError, match=re.escape(repr(pattern))):
        data.build_datasets(_config(source="text_files", paths=(pattern,)), Bytes(), 16, 2, 0)


def test_pad_rows_left_and_right():
    ids, mask = data.pad_rows([[1, 2, 3], [4]], pad_id=0, multiple=4)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    ids, mask = data.pad_rows([[1, 2], []], pad_id=9, multiple=4, left=False, at_least=5)
    assert ids.tolist() == [[1, 2] + [9] * 6, [9] * 8] and mask.tolist() == [[1, 1] + [0] * 6, [0] * 8]


@pytest.mark.parametrize("kind,expected", [({"num_keys": 4}, (4, 1, 1)), ({"num_values": 2}, (1, 2, 1)),
                                           ({"num_keys": 2, "asked": 2}, (2, 1, 2))],
                         ids=["multi_key", "multi_value", "two_needles"])
def test_multi_needle_answer_matches_the_context(kind, expected):
    keys_n, values_n, asked_n = expected
    for seed in range(4):
        example = synthetic_tasks.make_multi_needle_example(np.random.default_rng(seed), 1200, Bytes(), **kind)
        found = re.findall(r"magic numbers? for (\w+) is (\d{7})\.", example["context"])  # brute force: read it
        assert len(found) == keys_n * values_n and len({k for k, _ in found}) == keys_n
        asked = re.search(r"for (.+)\?", example["query"]).group(1).split(" and ")
        assert len(asked) == asked_n
        assert example["answer"].split() == [v for k, v in found if k in asked]  # in context order
        assert synthetic_tasks.example_length(example, Bytes()) <= 1200


def test_prose_haystack_is_real_text_in_order():
    text = ("= Title =\n The cat , a small animal , sat @-@ down .\n It was n't happy . Nor was the dog 's owner !\n"
            " Short . The <unk> of it all was a mystery to everyone around .\n")
    sentences = synthetic_tasks.prose_sentences(text)
    assert sentences == ["The cat, a small animal, sat-down.", "Nor was the dog's owner!"]
    long_text = " ".join(f"Sentence number {i} is here." for i in range(200))
    haystack = synthetic_tasks.prose_sentences(long_text)
    example = synthetic_tasks.make_needle_example(np.random.default_rng(3), 600, Bytes(), depth=0.5, haystack=haystack)
    numbers = [int(n) for n in re.findall(r"Sentence number (\d+)", example["context"])]
    assert len(numbers) > 10 and all((b - a) % 200 == 1 for a, b in zip(numbers, numbers[1:]))  # consecutive
    assert "magic number" in example["context"] and "The " not in example["context"].replace("The magic", "")
    with pytest.raises(ConfigError, match="no sentences"):
        synthetic_tasks.make_needle_example(np.random.default_rng(0), 300, Bytes(), haystack=[])
