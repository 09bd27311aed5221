"""eval.py end to end on a tiny model: output files and record fields, budget 1.0 = no compression for every
method, reported KV bytes within the requested budget (+ index metadata), and one-line errors on bad inputs."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subtoken_jax import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"task", "method", "budget", "kv_budget", "key_fraction", "value_fraction", "index_fraction", "tau", "rho",
          "metric", "value", "num_examples"}
# end to end: one task per scoring path (variable tracking shares needle's generation path and runs end to end
# in test_packed_generation_equals_masked_dense; its scoring is tested in test_combined_split_and_exact_match)
TASKS = ("perplexity", "needle", "mmlu")
# small shapes: one batch per task, a few seconds of compilation each on 2 cores
SMALL = {"batch_size": 2, "pad_multiple": 32, "perplexity.seq_len": 48, "perplexity.num_sequences": 2,
         "perplexity.max_bytes": 20000, "perplexity.window": 4, "needle.lengths": (80,), "needle.depths": (0.0, 1.0),
         "needle.samples": 1, "variable_tracking.lengths": (80,), "variable_tracking.samples": 2,
         "mmlu.num_shots": 1}

MMLU_ROWS = [
    ("question", "A", "B", "C", "D", "answer"),  # a header row is skipped
    ("What is 2 + 2?", "3", "4", "5", "6", "B"),
    ("Which color is a clear sky?", "green", "red", "blue", "black", "C"),
    ("The capital of France is", "Paris", "Rome", "Berlin", "Madrid", "A"),
    ("Water freezes at, in degrees Celsius,", "10", "-5", "100", "0", "D"),
]


def _byte_tokenizer():
    """A byte-level tokenizer.json (every byte a token, no merges) plus an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from subtoken_jax import HFTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    return HFTokenizer(tok, eos_id=tok.token_to_id("</s>"))


def _tiny_config():
    from configs.default import get_config

    c = get_config()
    c.model.update(dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, value_groups=4, max_position_embeddings=256))
    c.adapt.lora.update(dict(rank=4, num_subspaces=2, active_subspaces=1))
    c.adapt.routing.mode = "adaptive"  # eval meets its rho exactly over each context (routed.exact_budget)
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir as train.py leaves it: config.json, the pretrain stage's final params (the whole
    model) and an adapt-stage checkpoint (fresh routed LoRA + routers on that base, LoRA B = 0)."""
    from subtoken_jax import trainer
    from subtoken_jax.checkpoint import Checkpointer, fingerprint
    from subtoken_jax.hf_import import add_fresh_lora
    from subtoken_jax.lora import is_adapter_path, split_params

    folder = tmp_path_factory.mktemp("workdir")
    config = _tiny_config()
    base_cfg = trainer.base_model_config(config)
    _, params = trainer.fresh_params(base_cfg, 0, 8)
    with Checkpointer(folder / "pretrain" / "checkpoints") as ckpt:
        ckpt.save(config.pretrain.steps, trainable=params, metric=1.0)
    adapted = trainer.adapted_model_config(config, base_cfg)
    trainable, frozen = split_params(add_fresh_lora(adapted, params, config.seed), is_adapter_path)
    with Checkpointer(folder / "adapt" / "checkpoints") as ckpt:
        ckpt.save(config.adapt.steps, trainable=trainable, metric=1.0,
                  base_fingerprint=fingerprint(frozen, source="pretrain stage"))
    with open(folder / "config.json", "w") as fh:
        json.dump(config.to_dict(), fh, default=list)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A fresh random model saved as a Hugging Face folder with a byte-level tokenizer.json."""
    from subtoken_jax import ModelConfig, init_params, save_pretrained

    folder = str(tmp_path_factory.mktemp("hf"))
    tokenizer = _byte_tokenizer()
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, value_groups=4, max_position_embeddings=256)
    _, params = init_params(cfg, jax.random.key(1))
    save_pretrained(folder, cfg, params, tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="module")
def mmlu_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("mmlu") / "elementary_facts_test.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(MMLU_ROWS)
    return str(path)


def _flag(value):
    return repr(tuple(value)) if isinstance(value, tuple) else str(value)


def _eval_cli(workdir, **overrides):
    args = [f"--config.{k}={_flag(v)}" for k, v in overrides.items()]
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--config", os.path.join(ROOT, "configs/eval.py"),
           "--workdir", str(workdir), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _config(**overrides):
    from configs.eval import get_config

    c = get_config()
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
    return c


def test_eval_end_to_end(workdir, mmlu_csv):
    # two budgets keep the suite short: b = 0.75 exercises every method (routed and subtoken fit only b > 1/2)
    proc = _eval_cli(workdir, **SMALL, tasks=TASKS, budgets=(1.0, 0.75), **{"mmlu.files": (mmlu_csv,)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = workdir / "eval"
    for name in ["results.json", "results.csv", "results.md", "examples.jsonl", "needle_grid.png", "value_groups.png",
                 *(f"quality_{task}.png" for task in TASKS)]:
        assert (out / name).stat().st_size > 0, name
    records = json.load(open(out / "results.json"))
    assert all(set(r) == FIELDS for r in records)
    with open(out / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(records)
    markdown = open(out / "results.md").read()
    assert all(f"## {task}" in markdown for task in TASKS)
    for task in TASKS:
        rows = {(r["method"], r["budget"]): r for r in records if r["task"] == task}
        # every method of the default list (the group baselines and the token methods beyond it have their own
        # tests); routed comes from workdir/adapt
        assert {m for m, _ in rows} == set(_config().methods), task
        full = rows["full", 1.0]
        for (method, budget), r in rows.items():
            # bytes: never above the budget by more than the index metadata (token indices, group flags)
            assert r["kv_budget"] <= budget + r["index_fraction"] + 1e-6, r
            assert r["key_fraction"] <= r["tau"] + 1e-6 and r["num_examples"] == full["num_examples"], r
            if budget == 1.0:  # nothing to drop: the same as no compression
                assert r["kv_budget"] == 1.0 and r["value"] == pytest.approx(full["value"], rel=1e-5), r
        assert rows["subtoken", 0.75]["key_fraction"] == 1.0
        assert rows["subtoken", 0.75]["value_fraction"] <= 0.5 + 1e-6
        assert ("subtoken", 0.5) not in rows and ("routed", 0.5) not in rows  # keys alone are half the bytes
        assert rows["routed", 0.75]["value_fraction"] == pytest.approx(0.5, abs=0.005)  # the asked rho, met
        assert rows["snapkv", 0.75]["key_fraction"] <= 0.75
        combined = rows["combined", 0.75]
        assert combined["tau"] * (1 + combined["rho"]) / 2 == pytest.approx(0.75)
    # the generated answers / chosen letters, not just the scores, are those of `full`
    examples = [json.loads(line) for line in open(out / "examples.jsonl")]
    for task in ("needle", "mmlu"):
        reference = [e["prediction"] for e in examples if e["task"] == task and e["method"] == "full"]
        assert len(reference) == full_count(records, task)
        for method in sorted(_config().methods):
            got = [e["prediction"] for e in examples if e["task"] == task and e["method"] == method
                   and e["budget"] == 1.0]
            assert got == reference, (task, method)
    # perplexity lists every sequence's NLL, and they add up to the reported perplexity
    for r in (r for r in records if r["task"] == "perplexity"):
        rows = [e for e in examples if e["task"] == "perplexity" and e["method"] == r["method"]
                and e["budget"] == r["budget"]]
        assert sorted(e["sequence"] for e in rows) == list(range(r["num_examples"]))
        assert np.exp(sum(e["nll"] for e in rows) / sum(e["tokens"] for e in rows)) == pytest.approx(r["value"])
    assert "error" not in proc.stderr.lower()


def test_packed_generation_equals_masked_dense(workdir, tmp_path):
    """Answers generated from the packed cache (default) are those of the dense cache under the same masks; with a
    lookahead window, whose query positions are longer than the question's."""
    from subtoken_jax.evaluation import runner

    answers = {}
    for generation in ("packed", "masked"):
        config = _config(**SMALL, tasks=("variable_tracking",), budgets=(0.625,),
                         methods=("snapkv", "subtoken", "combined", "joint"), generation=generation, lookahead=3)
        config.diagnostic.enabled = False
        out = tmp_path / generation
        records = runner.run(config, str(out), str(workdir))["records"]
        answers[generation] = [(e["task"], e["method"], e["budget"], e["prediction"])
                               for e in map(json.loads, open(out / "eval" / "examples.jsonl"))]
        for r in records:  # joint reports its realised split; its keys + values stay within the budget
            if r["method"] == "joint":
                kv = r["kv_budget"] - r["index_fraction"]
                assert kv <= r["budget"] + 1e-6 and r["tau"] == pytest.approx(r["key_fraction"]), r
    # 2 prompts x 4 methods (b = 0.625: subtoken fits, the others drop tokens)
    assert len(answers["packed"]) == 8
    assert answers["packed"] == answers["masked"]


def test_an_answer_does_not_depend_on_the_prompts_evaluated_with_it(workdir, tmp_path, monkeypatch):
    """A task's prompts are generated for the longest budget among them; each answer is cut to its own prompt's
    budget, so the first prompt answers the same alone as beside a prompt with a longer budget."""
    import dataclasses

    from subtoken_jax.evaluation import runner
    from subtoken_jax.evaluation import tasks as tasks_lib

    build = tasks_lib.build_prompts

    def second_answer_longer(*args, **kwargs):  # the tiny tasks' answers are all one length
        prompts = build(*args, **kwargs)
        return prompts[:1] + [dataclasses.replace(p, answer_tokens=p.answer_tokens + 8) for p in prompts[1:]]

    monkeypatch.setattr(tasks_lib, "build_prompts", second_answer_longer)
    predictions = {}
    for samples in (2, 1):
        config = _config(**{**SMALL, "variable_tracking.samples": samples}, tasks=("variable_tracking",),
                         budgets=(0.5,), methods=("snapkv",))
        config.diagnostic.enabled = False
        runner.run(config, str(tmp_path / str(samples)), str(workdir))
        predictions[samples] = [e["prediction"] for e in map(json.loads, open(tmp_path / str(samples) / "eval" /
                                                                              "examples.jsonl"))]
    first = build("variable_tracking", config, *_byte_source(config, workdir))[0]
    assert len(predictions[2]) == 2 and predictions[1] == predictions[2][:1]
    # one byte, one token; variable tracking's answer has two items (names), each with extra_new_tokens of room
    assert first.answer_items == 2
    assert len(predictions[1][0].encode()) <= tasks_lib.new_tokens(first, config.extra_new_tokens) == \
        first.answer_tokens + 2 * config.extra_new_tokens


def _byte_source(config, workdir):
    from subtoken_jax.evaluation import runner

    source = runner.resolve_source(config, str(workdir))
    return source.tokenizer, source.bos, source.chat


def test_token_count_budgets_equal_the_same_fraction(workdir, tmp_path):
    """token_budgets=(N,) on prompts of L tokens keeps what budgets=(N / L,) keeps: the same answers and bytes, by
    the count path (kept_tokens / kv_tokens) instead of the fraction path; methods that keep every key say why."""
    from subtoken_jax.evaluation import runner

    from subtoken_jax.evaluation import tasks as tasks_lib

    config = _config(**SMALL, tasks=("needle",))
    source = runner.resolve_source(config, str(workdir))
    lengths = {len(p.context) for p in tasks_lib.build_prompts("needle", config, source.tokenizer, source.bos,
                                                                source.chat)}
    assert len(lengths) == 1, lengths  # the needle prompts of one length have one context length
    length = lengths.pop()
    count = length // 4
    got = {}
    for name, budgets in (("fraction", dict(budgets=(count / length,))), ("tokens", dict(budgets=(),
                                                                                        token_budgets=(count,)))):
        config = _config(**SMALL, tasks=("needle",), methods=("snapkv", "joint", "subtoken"), **budgets)
        config.diagnostic.enabled = False
        result = runner.run(config, str(tmp_path / name), str(workdir))
        got[name] = result
    examples = {name: [(e["method"], e["prediction"]) for e in map(json.loads, open(tmp_path / name / "eval" /
                                                                                   "examples.jsonl"))]
                for name in got}
    assert len(examples["tokens"]) == 4 and examples["tokens"] == examples["fraction"]
    for a, b in zip(got["fraction"]["records"], got["tokens"]["records"]):
        assert b["budget"] == count and a["method"] == b["method"]
        assert b["kv_budget"] == pytest.approx(a["kv_budget"]) and b["key_fraction"] == pytest.approx(a["key_fraction"])
    snapkv = next(r for r in got["tokens"]["records"] if r["method"] == "snapkv")
    assert snapkv["key_fraction"] == pytest.approx(count / length)
    assert any("subtoken keeps every key: give its budget as a fraction" in n for n in got["tokens"]["notes"])
    assert f"| {count} tok |" in got["tokens"]["markdown"]


def test_group_baselines_match_a_dense_brute_force(workdir, tmp_path):
    """norm_groups / random_groups / norm_span on the base: the masks their routers build during the prefill, checked
    against a dense full-sequence forward under numpy-built masks (keep-largest-norm per token), and the budgets."""
    from subtoken_jax.evaluation import runner
    from subtoken_jax.evaluation import tasks as tasks_lib
    from subtoken_jax.kv_cache import KVCache
    from subtoken_jax.workdir import load_workdir_base, make_tokenizer, read_workdir_config

    config = _config(**SMALL, tasks=("perplexity",), budgets=(1.0, 0.75),
                     methods=("full", "norm_groups", "random_groups", "norm_span", "routed"))
    config.diagnostic.enabled = False
    records = {(r["method"], r["budget"]): r for r in runner.run(config, str(tmp_path), str(workdir))["records"]}
    for method in ("norm_groups", "random_groups", "norm_span", "routed"):  # every key, 2 of G = 4 groups a token
        assert records[method, 0.75]["key_fraction"] == 1.0, method
        assert records[method, 0.75]["value_fraction"] == pytest.approx(0.5, abs=0.005), method  # adaptive: exact
        assert records[method, 1.0]["value"] == pytest.approx(records["full", 1.0]["value"], rel=1e-5), method

    model, params, *_ = load_workdir_base(str(workdir))
    sequences = np.asarray(tasks_lib.perplexity_sequences(config.perplexity, make_tokenizer(read_workdir_config(
        str(workdir)))))
    length = sequences.shape[1] - 1
    prefix = tasks_lib.prefix_length(length, config.perplexity.prefix_fraction)
    inputs, targets = sequences[:, :length], sequences[:, 1:]
    # a routed prefill writes each layer's masked values before the next layer runs, so the prefix's own queries
    # read them too (as the model trained): layer l's norms come from a prefill under the masks of layers < l
    context, keep = jnp.asarray(inputs[:, :prefix]), []
    for layer in range(model.config.num_layers):
        ones = [jnp.ones((len(inputs), prefix, model.config.num_kv_heads, 4))] * (model.config.num_layers - layer)
        _, cache = model.apply({"params": params}, context, cache=KVCache.create(model.config, len(inputs), prefix),
                               value_group_mask=tuple(keep + ones))
        v = np.asarray(cache.values[layer], np.float64)  # [B, prefix, Hkv, D] -> the 2 largest-norm of 4 groups
        norms = np.square(v.reshape(*v.shape[:3], 4, -1)).sum(-1)
        top = np.zeros(norms.shape)
        np.put_along_axis(top, np.argsort(-norms, axis=-1, kind="stable")[..., :2], 1.0, axis=-1)
        keep.append(jnp.asarray(top, jnp.float32))
    masks = [jnp.concatenate([k, jnp.ones((len(inputs), length - prefix) + k.shape[2:])], axis=1) for k in keep]

    def dense_perplexity(group_masks):
        logits = model.apply({"params": params}, jnp.asarray(inputs), value_group_mask=group_masks)
        log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
        nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0][:, prefix:]
        return float(np.exp(nll.mean()))

    assert records["full", 1.0]["value"] == pytest.approx(dense_perplexity(None), rel=1e-4)
    assert records["norm_groups", 0.75]["value"] == pytest.approx(dense_perplexity(tuple(masks)), rel=1e-4)


def test_routed_tokens_evicts_by_the_routed_cache_keys():
    """routed_tokens' token masks: key-norm over the keys the routed prefill cached (not the base capture's), the
    floor(tau n) lowest-norm tokens per layer, row and KV head (brute force), at the combined split of the budget."""
    from subtoken_jax.evaluation import methods as methods_lib
    from subtoken_jax.kv_cache import KVCache
    from subtoken_jax.selectors import PrefillState

    rng = np.random.default_rng(0)
    layers, batch, length, heads, dim = 2, 2, 12, 2, 8
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    positions = np.tile(np.arange(length), (batch, 1))
    positions[1, :3] = -1  # left padding in the second row
    state = PrefillState(keys=tuple(normal(batch, length, heads, dim) for _ in range(layers)),
                         values=tuple(normal(batch, length, heads, dim) for _ in range(layers)),
                         queries=tuple(normal(batch, 1, 4, dim) for _ in range(layers)),
                         positions=jnp.asarray(positions, jnp.int32), query_positions=jnp.full((batch, 1), length),
                         inv_freq=jnp.ones((dim // 2,)), value_groups=4)
    cached = [np.asarray(rng.normal(size=(batch, length + 4, heads, dim)), np.float32) for _ in range(layers)]
    cache = KVCache(keys=tuple(map(jnp.asarray, cached)), values=tuple(map(jnp.asarray, cached)),
                    positions=jnp.zeros((batch, length + 4), jnp.int32), index=jnp.asarray(length, jnp.int32))
    config = _config(methods=("routed_tokens",))
    plan, _ = methods_lib.plan_method("routed_tokens", 0.625, config)
    assert (plan.token_fraction, plan.value_fraction) == (pytest.approx(0.625 * 2 / 1.5), 0.5)
    high, _ = methods_lib.plan_method("routed_tokens", 0.875, config)
    assert (high.token_fraction, high.value_fraction) == (1.0, 0.75)  # b >= 3/4: every token, routed alone
    # the router's groups: about 7 of 8 pairs kept, so the survivors hold more than rho of theirs and are trimmed
    routed = [(rng.random((batch, length, heads, 4)) < 0.875).astype(np.float32) for _ in range(layers)]
    masks, groups = methods_lib.routed_token_masks(state, cache, tuple(map(jnp.asarray, routed)), plan, config,
                                                   methods_lib.make_selectors(config))
    for layer in range(layers):
        norms = np.linalg.norm(cached[layer][:, :length].astype(np.float64), axis=-1)
        group_norms = np.linalg.norm(cached[layer][:, :length].reshape(batch, length, heads, 4, 2), axis=-1)
        for b in range(batch):
            real = np.flatnonzero(positions[b] >= 0)
            keep = max(1, int(np.floor(plan.token_fraction * len(real) + 1e-6)))
            for h in range(heads):
                expected = np.zeros(length)
                expected[real[np.argsort(norms[b, real, h], kind="stable")[:keep]]] = 1
                np.testing.assert_array_equal(np.asarray(masks[layer])[b, :, h], expected)
                # groups: the router's on surviving tokens, the largest-norm ones up to floor(rho x kept x G)
                held = [(t, g) for t in range(length) for g in range(4) if expected[t] and routed[layer][b, t, h, g]]
                allowed = int(np.floor(0.5 * keep * 4 + 1e-6))
                assert len(held) > allowed
                best = sorted(held, key=lambda p: -group_norms[b, p[0], h, p[1]])[:allowed]
                want = np.zeros((length, 4))
                for t, g in best:
                    want[t, g] = 1
                np.testing.assert_array_equal(np.asarray(groups[layer])[b, :, h], want)


def test_routed_tokens_end_to_end(workdir, tmp_path):
    from subtoken_jax.evaluation import runner

    config = _config(**SMALL, tasks=("perplexity",), budgets=(0.75, 0.625), methods=("routed", "routed_tokens"))
    config.diagnostic.enabled = False
    records = {(r["method"], r["budget"]): r for r in runner.run(config, str(tmp_path), str(workdir))["records"]}
    assert records["routed_tokens", 0.75]["value"] == pytest.approx(records["routed", 0.75]["value"], rel=1e-6)
    both = records["routed_tokens", 0.625]
    assert both["key_fraction"] < 0.85 and both["value_fraction"] <= 0.5 * both["key_fraction"] + 1e-6
    assert both["kv_budget"] - both["index_fraction"] <= 0.625 + 1e-6
    assert ("routed", 0.625) in records  # routed alone spends the same bytes on values only
    with pytest.raises(ConfigError, match="routed.token_selector='snapkv' must be a selector that needs no question"):
        runner.run(_config(**SMALL, tasks=("perplexity",), budgets=(0.625,), methods=("routed_tokens",),
                           **{"routed.token_selector": "snapkv"}), str(tmp_path / "bad"), str(workdir))


def full_count(records, task):
    return next(r["num_examples"] for r in records if r["task"] == task and r["method"] == "full")


def test_trained_predictor_as_value_group_scorer(workdir, tmp_path):
    """subtoken / combined with scorer "predictor": a ValueGroupPredictor trained (2 steps) on the workdir's base
    with text-task prompts, saved by predictor_training.run, loaded by eval; bad predictor settings fail in one line."""
    from configs import predictor as predictor_config
    from subtoken_jax.errors import ConfigError, InputError
    from subtoken_jax.evaluation import runner
    from subtoken_jax import predictor_training
    from subtoken_jax.selectors import predictor as predictor_lib

    pc = predictor_config.get_config()
    pc.model.workdir = str(workdir)
    pc.data.update(dict(source="tasks", lengths=(80,)))
    pc.train.update(dict(steps=2, batch_size=2, scope="global"))
    pc.eval.update(dict(batches=1, scope="global"))
    folder = tmp_path / "predictor"
    result = predictor_training.run(pc, str(folder))
    assert np.isfinite(result["loss"]) and (folder / "config.json").exists()

    overrides = {"tasks": ("needle",), "methods": ("full", "subtoken", "combined"), "budgets": (1.0, 0.75),
                 "subtoken.scorer": "predictor", "combined.scorer": "predictor", "predictor.workdir": str(folder),
                 "needle.lengths": (80,), "needle.depths": (0.5,), "needle.samples": 2, "batch_size": 2}
    records = runner.run(_config(**overrides), str(workdir))["records"]
    rows = {(r["method"], r["budget"]): r for r in records}
    assert set(rows) == {("full", 1.0), ("subtoken", 1.0), ("subtoken", 0.75), ("combined", 1.0), ("combined", 0.75)}
    assert rows["subtoken", 0.75]["key_fraction"] == 1.0 and rows["subtoken", 0.75]["value_fraction"] <= 0.5 + 1e-6
    for (method, budget), r in rows.items():
        assert r["kv_budget"] <= budget + r["index_fraction"] + 1e-6, r
        if budget == 1.0:
            assert r["value"] == rows["full", 1.0]["value"] and r["kv_budget"] == 1.0, r

    with pytest.raises(ConfigError, match="needs predictor.workdir"):
        runner.run(_config(**{**overrides, "predictor.workdir": ""}), str(workdir))
    with pytest.raises(InputError, match="holds no trained predictor"):
        runner.run(_config(**{**overrides, "predictor.workdir": str(tmp_path / "none")}), str(workdir))
    with pytest.raises(ConfigError, match="perplexity task has none"):
        runner.run(_config(**{**overrides, "tasks": ("perplexity", "needle")}), str(workdir))
    from subtoken_jax import trainer

    with pytest.raises(InputError, match="trained for a base of 2 layers"):
        predictor_lib.load_predictor(str(folder), trainer.base_model_config(_tiny_config()).replace(num_layers=3))


def test_hugging_face_folder(hf_folder, mmlu_csv, tmp_path):
    """model.checkpoint: weights and tokenizer from a Hugging Face folder; no adapter, so routed is skipped."""
    from subtoken_jax.evaluation import runner

    config = _config(**{"model.checkpoint": hf_folder, "model.value_groups": 4, "tasks": ("mmlu",),
                        "methods": ("full", "key_norm", "tova", "pyramidkv", "adakv", "subtoken", "routed"),
                        "budgets": (1.0, 0.75), "mmlu.files": (mmlu_csv,), "diagnostic.enabled": False})
    summary = runner.run(config, str(tmp_path))
    records = {(r["method"], r["budget"]): r for r in summary["records"]}
    token_methods = ("key_norm", "tova", "pyramidkv", "adakv", "subtoken")
    assert set(records) == {("full", 1.0)} | {(m, b) for m in token_methods for b in (1.0, 0.75)}
    for method in token_methods:  # nothing dropped at b = 1; a real fraction of the bytes at b = 0.75
        assert records[method, 1.0]["value"] == pytest.approx(records["full", 1.0]["value"], rel=1e-5), method
        assert records[method, 0.75]["kv_budget"] <= 0.75 + records[method, 0.75]["index_fraction"] + 1e-6, method
    assert any("routed: skipped" in note for note in summary["notes"])
    assert os.path.exists(tmp_path / "eval" / "results.md")


@pytest.mark.parametrize("overrides,message", [
    ({"tasks": ("needle", "trivia")}, "unknown task(s) ['trivia']; choose from: perplexity, needle"),
    ({"methods": ("full", "magic")}, "unknown method(s) ['magic']; choose from: full, snapkv, h2o"),
    ({"budgets": (0.5, 1.5)}, "config.budgets=(0.5, 1.5): each value must be a number > 0 and <= 1"),
    ({"budgets": (0.0,)}, "config.budgets=(0.0,): each value must be a number > 0 and <= 1"),
    ({"token_budgets": (16.5,)}, "config.token_budgets=(16.5,): each value must be an integer >= 1"),
    ({"tasks": ("needle",), "needle.lengths": (1000,)}, "exceeds the model's max_position_embeddings=256"),
    ({"tasks": ("perplexity",), "perplexity.seq_len": 300}, "exceeds the model's max_position_embeddings=256"),
    ({"tasks": ("mmlu",), "mmlu.files": ("/nonexistent/mmlu_test.csv",)}, "no file matches"),
    ({"tasks": ("mmlu",)}, "task mmlu needs mmlu.files"),
    ({"combined.scorer": "oracle"}, "combined.scorer='oracle' is unknown"),
    ({"joint.scorer": "predictor"}, "joint.scorer='predictor': the predictor's scores are log-relevance"),
    ({"generation": "dense"}, "generation must be 'packed' or 'masked'"),
    ({"tasks": ("needle",), "haystack": "/nonexistent/prose.txt"}, "haystack='/nonexistent/prose.txt' is not a file"),
    ({"tasks": ("multi_key",), "multi_needle.samples": 0}, "config.multi_needle.samples=0: must be an integer >= 1"),
    ({"tasks": ("multi_key",), "multi_needle.lengths": ()}, "multi_needle.lengths is empty"),
    ({"tasks": ("needle",), "value_fill": "median"}, "value_fill='median': choose one of zero, mean"),
    ({"lookahead": -2}, "lookahead=-2: must be an integer >= 0"),
    ({"tasks": ("perplexity", "needle"), "value_fill": "mean"}, "perplexity score through the masked dense cache"),
    ({"tasks": ("needle",), "value_fill": "mean", "generation": "masked"}, "generation=masked score through"),
    ({"tasks": ("needle",), "value_fill": "mean", "answer_nll": True}, "answer_nll score through the masked dense"),
    ({"tasks": ("needle",), "question_over": "both"}, "question_over='both': choose one of compressed, full"),
    ({"tasks": ("needle",), "question_over": "full", "generation": "masked"}, "generation=masked read the question"),
    ({"tasks": ("needle",), "value_basis.calibration": "/nonexistent.txt"}, "is not a file"),
    ({"combined.selector": "predictor"}, "the predictor (scorer or selector) needs predictor.workdir"),
])
def test_bad_inputs_fail_before_compute(workdir, overrides, message):
    from subtoken_jax.errors import CheckpointError, ConfigError, InputError
    from subtoken_jax.evaluation import runner

    with pytest.raises((ConfigError, InputError, CheckpointError)) as error:
        runner.run(_config(**overrides), str(workdir))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_workdir_or_checkpoint_fails(tmp_path, workdir):
    from subtoken_jax.errors import CheckpointError
    from subtoken_jax.evaluation import runner

    with pytest.raises(CheckpointError, match="does not exist"):
        runner.run(_config(), str(tmp_path / "no_such_run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        runner.run(_config(), str(tmp_path / "empty"))
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="pretrain/checkpoints holds no checkpoint"):
        runner.run(_config(), str(tmp_path / "untrained"))
    with pytest.raises(CheckpointError, match="does not exist"):
        runner.run(_config(**{"model.checkpoint": str(tmp_path / "no_model")}), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "eval").exists()


def test_combined_split_and_exact_match():
    from subtoken_jax.errors import ConfigError
    from subtoken_jax.evaluation.methods import combined_split
    from subtoken_jax.evaluation.tasks import needle_correct, variable_tracking_correct

    for budget in (1.0, 0.75, 0.5, 0.3, 0.1):
        tau, rho = combined_split(budget, 0.5)
        assert 0 < tau <= 1 and 0 < rho <= 1 and tau * (1 + rho) / 2 == pytest.approx(budget)
    assert combined_split(0.75, 0.5) == (1.0, 0.5) and combined_split(0.25, 0.5) == pytest.approx((1 / 3, 0.5))
    assert combined_split(0.3, 0.5, (1.0, 0.5, 0.25)) == pytest.approx((0.5, 0.2))  # largest tau in [b, 2b)
    with pytest.raises(ConfigError, match="no tau"):
        combined_split(0.3, 0.5, (1.0, 0.75))
    assert needle_correct(" 4967319 is it\nQ: x", " 4967319") and not needle_correct(" 42\n4967319", " 4967319")
    assert variable_tracking_correct(" QWERT ASDFG, ZXCVB", " ZXCVB QWERT ASDFG")
    assert not variable_tracking_correct(" QWERT ASDFGH ZXCVB", " QWERT ASDFG ZXCVB")
    from subtoken_jax.evaluation.tasks import score

    lead_in = "The variables assigned to 12345 are:\n- QWERT\n- ASDFG"
    assert score("variable_tracking", lead_in, " QWERT ASDFG", chat=True)  # an instruct model's whole turn
    assert not score("variable_tracking", lead_in, " QWERT ASDFG", chat=False)  # a base model's first line
    assert score("two_needles", "A is 1234567.\nB is 7654321.", " 7654321 1234567")
    assert not score("multi_value", "1234567 and 765432", " 1234567 7654321")


def test_cli_prints_one_line_errors(workdir, tmp_path):
    proc = _eval_cli(workdir, methods=("full", "magic"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and lines and "choose from: full, snapkv" in lines[-1], proc.stderr
    proc = _eval_cli(tmp_path / "missing", **{"mmlu.files": ("/nonexistent/x.csv",), "tasks": ("mmlu",)})
    assert proc.returncode != 0 and "error: mmlu.files: no file matches" in proc.stderr, proc.stderr


def test_checkpoint_flag_resolves_workdir_or_hf_folder(workdir, hf_folder, tmp_path):
    """eval.py --checkpoint: a train.py workdir is read as the model source, an HF folder sets model.checkpoint."""
    import importlib.util

    from subtoken_jax.errors import InputError

    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    config = _config()
    assert eval_cli.resolve_checkpoint(config, str(workdir)) == str(workdir) and config.model.checkpoint == ""
    assert eval_cli.resolve_checkpoint(config, hf_folder) is None and config.model.checkpoint == hf_folder
    with pytest.raises(InputError, match="no config.json there"):
        eval_cli.resolve_checkpoint(config, str(tmp_path))


def test_answer_nll_is_the_full_forward_nll_of_the_full_cache_answer(workdir, tmp_path):
    """answer_nll (config): the full cache's greedy answer, found and scored again here by plain forwards over
    context + question + answer (no cache, no masks, no padding); every method scores it alike at b = 1, and a
    compressed cache scores it differently."""
    from subtoken_jax.evaluation import runner
    from subtoken_jax.evaluation import tasks as tasks_lib
    from subtoken_jax.workdir import load_workdir_base

    config = _config(**SMALL, tasks=("needle",), budgets=(1.0, 0.5), methods=("full", "snapkv", "joint"),
                     answer_nll=True)
    config.diagnostic.enabled = False
    runner.run(config, str(tmp_path), str(workdir))
    examples = [json.loads(line) for line in open(tmp_path / "eval" / "examples.jsonl")]
    nll = {(e["method"], e["budget"], e["depth"]): (e["answer_nll"], e["answer_nll_tokens"]) for e in examples}

    model, params, *_ = load_workdir_base(str(workdir))
    tokenizer, bos, chat = _byte_source(config, workdir)
    prompts = tasks_lib.build_prompts("needle", config, tokenizer, bos, chat)
    width = max(len(p.context) + len(p.question) for p in prompts) + 32
    forward = jax.jit(lambda ids: jax.nn.log_softmax(model.apply({"params": params}, ids).astype(jnp.float32)))
    for prompt in prompts:
        ids = list(prompt.context) + list(prompt.question)
        budget = tasks_lib.new_tokens(prompt, config.extra_new_tokens)
        total, count = 0.0, 0
        for _ in range(budget):  # causal: right padding changes no logit before it
            log_probs = np.asarray(forward(jnp.asarray([ids + [0] * (width - len(ids))])))[0, len(ids) - 1]
            token = int(np.argmax(log_probs))
            total, count = total - float(log_probs[token]), count + 1
            ids.append(token)
            if token == tokenizer.eos_id:
                break
        depth = prompt.info["depth"]
        assert nll["full", 1.0, depth] == pytest.approx((total, count), rel=1e-4), depth
        for method in ("snapkv", "joint"):
            assert nll[method, 1.0, depth] == pytest.approx(nll["full", 1.0, depth], rel=1e-5), (method, depth)
    changed = [abs(nll[m, 0.5, d][0] - nll["full", 1.0, d][0]) for m in ("snapkv", "joint") for (_, b, d) in nll
               if b == 0.5]
    assert max(changed) > 1e-3
