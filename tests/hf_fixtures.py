"""Tiny random-weight Hugging Face checkpoints built locally with transformers (no downloads)."""

from __future__ import annotations

import os

VOCAB = 128

FAMILIES = {
    # Qwen2 with q/k/v biases, tied embeddings and GQA
    "qwen2": dict(cls="Qwen2", kwargs=dict(tie_word_embeddings=True)),
    # Llama with GQA and llama3 rope scaling
    "llama": dict(cls="Llama", kwargs=dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, max_position_embeddings=256)),
    # Mistral with a sliding window (5) shorter than the test sequences
    "mistral": dict(cls="Mistral", kwargs=dict(sliding_window=5)),
}


def train_tiny_tokenizer(folder: str) -> None:
    """A small byte-level BPE tokenizer.json trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    text = ["the quick brown fox jumps over the lazy dog " * 3, "sub token routing keeps some value groups"] * 5
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))


def build_tiny_hf_model(family: str, folder: str, seed: int = 0):
    """Saves a random tiny model of `family` with save_pretrained and returns the torch model (eval, fp32)."""
    import torch
    import transformers

    spec = FAMILIES[family]
    config_cls = getattr(transformers, f"{spec['cls']}Config")
    model_cls = getattr(transformers, f"{spec['cls']}ForCausalLM")
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                        **spec["kwargs"])
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random biases and norm scales too, so a dropped one would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    train_tiny_tokenizer(folder)
    return model
