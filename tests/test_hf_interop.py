"""Our decoder against transformers on tiny random checkpoints of each family."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import subtoken_jax
from subtoken_jax import CheckpointError, LoRAConfig
from subtoken_jax.generate import generate
from subtoken_jax.hf_export import save_pretrained

SEQ = 12  # longer than the Mistral sliding window (5)


def _tokens(batch=2, length=SEQ, seed=0):
    return np.random.default_rng(seed).integers(2, 128, size=(batch, length)).astype(np.int32)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_logits_match_transformers(tiny_hf):
    family, folder, torch_model = tiny_hf
    model, params, tokenizer = subtoken_jax.load_pretrained(folder)
    ids = _tokens()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=0)
    assert model.config.architecture == family
    if family == "mistral":
        assert model.config.sliding_windows == (5, 5)
    assert tokenizer.decode(tokenizer.encode("the lazy fox")) == "the lazy fox"


def test_greedy_generation_matches_transformers(tiny_hf):
    _, folder, torch_model = tiny_hf
    model, params, _ = subtoken_jax.load_pretrained(folder, with_tokenizer=False)
    prompt = _tokens(batch=1, length=6, seed=1)
    ours = np.asarray(generate(model, params, prompt, max_new_tokens=32))
    with torch.no_grad():
        theirs = torch_model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32, do_sample=False,
                                      min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(ours[0], theirs[0, prompt.shape[1]:].numpy())


def test_lora_merged_export_reloads_in_transformers(tiny_hf, tmp_path):
    import transformers

    _, folder, _ = tiny_hf
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    model, params, tokenizer = subtoken_jax.load_pretrained(folder, lora=lora)
    # give the adapters non-zero B so the merge has something to fold in
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 * jax.random.normal(jax.random.key(len(path)), x.shape)
        if path[-1].key == "lora_b" else x, params)
    ids = _tokens()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    out = save_pretrained(str(tmp_path / "export"), model.config, params, tokenizer=tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=1e-4, rtol=0)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_fresh_lora_does_not_change_logits(tiny_hf):
    _, folder, torch_model = tiny_hf
    model, params, _ = subtoken_jax.load_pretrained(folder, lora=LoRAConfig(rank=2, targets=("q", "v", "down")),
                                                    with_tokenizer=False)
    assert "lora_a" in params["layer_0"]["attn"]["q"]
    ids = _tokens()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(ids))),
                               _torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_bfloat16_load_is_close(tiny_hf):
    _, folder, torch_model = tiny_hf
    model, params, _ = subtoken_jax.load_pretrained(folder, dtype="bfloat16", with_tokenizer=False)
    assert params["layer_0"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    ids = _tokens()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    theirs = _torch_logits(torch_model, ids)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99


# ------------------------------------------------------------------------------------------ bad input


def _copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_folder_and_files(tiny_hf, tmp_path):
    _, folder, _ = tiny_hf
    with pytest.raises(CheckpointError, match="does not exist"):
        subtoken_jax.load_pretrained(str(tmp_path / "nope"))
    bad = _copy_folder(folder, tmp_path / "no_config")
    os.remove(os.path.join(bad, "config.json"))
    with pytest.raises(CheckpointError, match="no config.json"):
        subtoken_jax.load_pretrained(bad)
    bad = _copy_folder(folder, tmp_path / "no_weights")
    os.remove(os.path.join(bad, "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        subtoken_jax.load_pretrained(bad)
    bad = _copy_folder(folder, tmp_path / "no_tokenizer")
    os.remove(os.path.join(bad, "tokenizer.json"))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        subtoken_jax.load_pretrained(bad)


def _edit_config(folder, tmp_path, name, **changes):
    bad = _copy_folder(folder, tmp_path / name)
    path = os.path.join(bad, "config.json")
    with open(path) as fh:
        hf = json.load(fh)
    hf.update(changes)
    with open(path, "w") as fh:
        json.dump(hf, fh)
    return bad


def test_unknown_architecture_and_shape_mismatch(tiny_hf, tmp_path):
    _, folder, _ = tiny_hf
    with pytest.raises(CheckpointError, match="unsupported architecture model_type='gpt2'"):
        subtoken_jax.load_pretrained(_edit_config(folder, tmp_path, "arch", model_type="gpt2"))
    with pytest.raises(CheckpointError, match=r"has shape .* but config.json implies"):
        subtoken_jax.load_pretrained(_edit_config(folder, tmp_path, "shape", intermediate_size=48))
    with pytest.raises(subtoken_jax.ConfigError, match="must divide head_dim=8"):
        subtoken_jax.load_pretrained(folder, value_groups=3)


def test_value_basis_rotation_keeps_logits_and_survives_export(tmp_path):
    """PCA value rotation folded into v_proj / o_proj: transformers' own model gives the same logits before
    and after (Qwen2: a v bias to rotate too, and GQA: 2 query heads per KV head), and the rotated values are
    ordered by variance (what makes the first groups of a token the ones worth keeping)."""
    import transformers

    from hf_fixtures import build_tiny_hf_model
    from subtoken_jax.selectors import capture_prefill_state
    from subtoken_jax.value_basis import fit_value_rotations, rotate_value_basis

    folder = str(tmp_path / "qwen2")
    torch_model = build_tiny_hf_model("qwen2", folder)
    model, params, tokenizer = subtoken_jax.load_pretrained(folder)
    ids = _tokens()
    rotated = rotate_value_basis(model.config, params, fit_value_rotations(model, params, ids))
    reference = _torch_logits(torch_model, ids)
    np.testing.assert_allclose(np.asarray(model.apply({"params": rotated}, jnp.asarray(ids))), reference,
                               atol=1e-4, rtol=0)
    values = np.asarray(capture_prefill_state(model, rotated, jnp.asarray(ids), window=1).values[0], np.float64)
    v = values.reshape(-1, *values.shape[2:])
    variance = (v - v.mean(0)).var(0)  # [Hkv, D]
    assert np.all(np.diff(variance, axis=-1) <= 1e-5 * variance.max()), variance  # largest-variance axes first
    out = save_pretrained(str(tmp_path / "rotated"), model.config, rotated, tokenizer=tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, ids), reference, atol=1e-4, rtol=0)
