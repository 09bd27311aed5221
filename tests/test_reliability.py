"""Every bad input of docs/reliability.md gets its one-line error, and nothing is written or lost.

Rows run in-process through the same functions train.py / eval.py call (trainer.run, runner.run,
load_pretrained, model.apply, generate), so a row costs milliseconds, not a process start; the CLI's
own one-line formatting is checked in subprocesses at the end (and in tests/test_train.py).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subtoken_jax import (CheckpointError, ConfigError, DecoderLM, InputError, ModelConfig, generate, init_params,
                          load_pretrained)
from subtoken_jax import trainer
from subtoken_jax.config_checks import RULES, check_ranges
from subtoken_jax.evaluation import runner
from subtoken_jax.hf_export import save_pretrained
from subtoken_jax.model_config import RoutingConfig
from subtoken_jax.workdir import WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, **overrides):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def _one_line(error):
    text = str(error)
    assert text and "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- train.py config values


@pytest.mark.parametrize("field,value,message", [
    ("pretrain.steps", -5, "config.pretrain.steps=-5: must be an integer >= 0 (0 skips the stage)"),
    ("adapt.steps", -5, "config.adapt.steps=-5: must be an integer >= 0 (0 skips the stage"),
    ("pretrain.learning_rate", -0.01, "config.pretrain.learning_rate=-0.01: must be a number > 0"),
    ("grad_clip", -1.0, "config.grad_clip=-1.0: must be a number > 0"),
    ("checkpoint_every", 0, "config.checkpoint_every=0: must be an integer >= 1"),
    ("log_every", 0, "config.log_every=0: must be an integer >= 1"),
    ("adapt.lora.dropout", 1.0, "config.adapt.lora.dropout=1.0: must be a number >= 0 and < 1"),
    ("mesh.fsdp", 0, "config.mesh.fsdp=0: must be -1"),
    ("eval_budgets", (1.0, 0.0), "config.eval_budgets=(1.0, 0.0): each value must be a number > 0 and <= 1"),
])
def test_bad_train_value_is_one_line_and_writes_nothing(tmp_path, field, value, message):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        trainer.run(_config("default", **{field: value}), str(workdir))
    assert message in _one_line(info.value)
    assert not workdir.exists()


def test_every_shipped_config_is_in_range_and_every_rule_names_a_real_field():
    names = ("default", "eval", "hf_adapt", "predictor", "predictor_smollm2", "retrieval", "smollm2")
    configs = [_config(name) for name in names]
    for config in configs:
        check_ranges(config)

    def has(config, path):
        node = config
        for key in path.split("."):
            if key not in node:
                return False
            node = node[key]
        return True

    orphans = [path for path in RULES if not any(has(c, path) for c in configs)]
    assert orphans == [], f"rules for fields no config has (misspelled?): {orphans}"


def test_zero_steps_skip_the_stage_and_say_so():
    config = _config("default", **{"pretrain.steps": 0, "adapt.steps": 0})
    notes = trainer.skipped_stage_notes(config)
    assert any("pretrain.steps=0" in n and "skipped" in n for n in notes)
    assert any("adapt.steps=0" in n and "untrained" in n for n in notes)
    assert "note: adapt.steps=0" in trainer.format_summary({"notes": notes})


def test_bad_eval_exact_rule_is_one_line_and_writes_nothing(tmp_path):
    config = _config("eval", tasks=("perplexity",), methods=("routed",), budgets=(0.75,),
                     **{"routed.exact_rule": "sorted"})
    with pytest.raises(ConfigError) as info:
        runner.run(config, str(tmp_path / "out"))
    assert "routed.exact_rule='sorted' is unknown; choose one of ('calibrated', 'topb')" in _one_line(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="routing.exact_rule='sorted' is unknown"):
        RoutingConfig(mode="adaptive", exact_budget=True, exact_rule="sorted")


def test_bad_expected_attention_observation_is_one_line_and_writes_nothing(tmp_path):
    config = _config("eval", tasks=("needle",), methods=("expected_attention",), budgets=(0.5,),
                     **{"selectors.expected_attention_observe": "context"})
    with pytest.raises(ConfigError) as info:
        runner.run(config, str(tmp_path / "out"))
    assert ("selectors.expected_attention_observe='context' is unknown; choose one of ('window', 'prefill')"
            in _one_line(info.value))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- workdirs


def _fake_finished_workdir(workdir, config):
    """A workdir as train.py leaves it (its config.json and a checkpoint step folder), without training."""
    (workdir / "pretrain" / "checkpoints" / "40").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))


def test_rerun_with_another_model_is_refused_before_config_json_changes(tmp_path):
    _fake_finished_workdir(tmp_path, _config("default"))
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ConfigError) as info:
        trainer.run(_config("default", **{"model.num_layers": 2}), str(tmp_path))
    text = _one_line(info.value)
    assert "holds checkpoints of a different run" in text and "model.num_layers: 4 there, 2 now" in text
    assert (tmp_path / "config.json").read_bytes() == before


def test_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(ConfigError) as info:
            trainer.run(_config("default"), str(tmp_path))
        assert f"in use by another run (pid {os.getpid()})" in _one_line(info.value)
    assert not (tmp_path / "config.json").exists()  # the refused run wrote nothing


def test_stale_lock_of_a_killed_run_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\ntime.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            WorkdirLock(str(tmp_path)).__enter__()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock").read_text() == str(holder.pid)  # the dead run's lock file is still there
    with WorkdirLock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ('{"foo": 1}', "is not a train.py record"),
    ("[1, 2]", "holds a JSON list, not an object"),
])
def test_eval_checkpoint_with_a_bad_config_json(tmp_path, content, message):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(content)
    with pytest.raises(CheckpointError) as info:
        runner.run(_config("eval", tasks=("needle",), methods=("full",), budgets=(1.0,)), str(tmp_path / "out"),
                   str(source))
    assert message in _one_line(info.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- model files

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  value_groups=4, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hf"))
    save_pretrained(folder, CFG, init_params(CFG, jax.random.key(0))[1])
    return folder


def _copy(folder, target):
    import shutil

    shutil.copytree(folder, target)
    return str(target)


def test_truncated_safetensors_is_one_checkpoint_error(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder, with_tokenizer=False)
    assert "not a readable safetensors file" in _one_line(info.value)


def test_fewer_layers_configured_than_stored_is_an_error(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "m")
    config = json.load(open(os.path.join(folder, "config.json")))
    config["num_hidden_layers"] = 1
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder, with_tokenizer=False)
    text = _one_line(info.value)
    assert "tensors config.json does not account for" in text and "model.layers.1." in text


def test_intact_folder_loads(hf_folder):
    model, params, _ = load_pretrained(hf_folder, with_tokenizer=False)
    assert model.config.num_layers == 2


# ----------------------------------------------------------------------------- API inputs


@pytest.fixture(scope="module")
def tiny():
    return DecoderLM(CFG), init_params(CFG, jax.random.key(1))[1]


IDS = jnp.ones((1, 6), jnp.int32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(value_group_mask=jnp.ones((1, 6, 2, 8))), "value_group_mask[0] has shape (1, 6, 2, 8)"),
    (dict(value_group_mask=jnp.full((1, 6, 2, 4), 0.5)), "must hold only 0 (drop) and 1 (keep); found 0.5"),
    (dict(token_keep_mask=jnp.ones((1, 5), bool)), "token_keep_mask[0] has shape (1, 5)"),
])
def test_bad_masks(tiny, kwargs, message):
    model, params = tiny
    with pytest.raises(InputError) as info:
        model.apply({"params": params}, IDS, **kwargs)
    assert message in _one_line(info.value)


def test_good_masks_still_apply(tiny):
    model, params = tiny
    full = model.apply({"params": params}, IDS)
    masked = model.apply({"params": params}, IDS, value_group_mask=jnp.ones((1, 6, 2, 4)),
                         token_keep_mask=jnp.ones((1, 6), bool))
    np.testing.assert_allclose(np.asarray(full), np.asarray(masked), atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda m, p: m.apply({"params": p}, jnp.ones((1, 65), jnp.int32)), "65 tokens exceed the model's "
                                                                         "max_position_embeddings=64"),
    (lambda m, p: generate(m, p, IDS, max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (lambda m, p: generate(m, p, jnp.ones((6,), jnp.int32), max_new_tokens=2), "add a batch axis"),
    (lambda m, p: m.apply({"params": p}, jnp.ones((6,), jnp.int32)), "add a batch axis"),
    (lambda m, p: generate(m, p, jnp.ones((1, 6), jnp.float32), max_new_tokens=2), "must hold integer token ids"),
    (lambda m, p: generate(m, p, jnp.ones((2, 6), jnp.int32), attention_mask=jnp.asarray([[1] * 6, [0] * 6]),
                           max_new_tokens=2), "attention_mask marks no real token in some prompt row"),
])
def test_bad_api_inputs(tiny, call, message):
    model, params = tiny
    with pytest.raises(InputError) as info:
        call(model, params)
    assert message in _one_line(info.value)


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv,message", [
    (["--config.adapt.stepz=5"], "error: --config.adapt.stepz: no such config field; did you mean 'steps'?"),
    (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such config file"),
    (["--config.pretrain.steps=-5"], "error: config.pretrain.steps=-5: must be an integer >= 0"),
    (["--config=configs/smollm2_adapt.py", "--config.model.checkpoint=/nowhere/model.gguf"],
     "error: model.checkpoint: model '/nowhere/model.gguf' does not exist: give a Hugging Face folder, a .gguf file, or a registered "
     "name"),
])
def test_command_line_errors_are_one_line(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "train.py", "--workdir", str(tmp_path / "run"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(message) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
