"""Load Llama / Qwen2 / Mistral models from a llama.cpp GGUF file.

    model, params, tokenizer = subtoken_jax.load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")

The file is read with `gguf`, ggml-org's own reader, which also dequantises every tensor type it
knows (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ types): nothing here parses bytes. The
architecture and hyper-parameters come from the GGUF metadata; the tensors are renamed to their
Hugging Face names (with gguf's own name map) and go through the same layout table as an HF folder
(`hf_import.params_from_hf_tensors`), so both paths build identical parameter trees.

Two llama.cpp conventions are undone here: the q/k projections of `llama` files are stored with the
rows of each head permuted for llama.cpp's rotary layout (qwen2 files are not), and a file without
`output.weight` ties the LM head to the token embedding. Mistral models are written by llama.cpp
under architecture "llama" and load as such. Every check (architecture, tensor types, names and
shapes, file length) runs on the header before a tensor is dequantised.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional

import numpy as np

from subtoken_jax.errors import CheckpointError
from subtoken_jax.hf_import import hf_parameter_layout, params_from_hf_tensors
from subtoken_jax.model_config import LoRAConfig, ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
# llama.cpp permutes the q/k rows of llama files (convert_hf_to_gguf's LlamaModel) for its rotary layout; a
# "mistral" file is read as llama (config_from_gguf), so ModelConfig.architecture is "llama" for both
_PERMUTED_QK = ("llama",)


def _gguf():
    try:
        import gguf
    except ImportError as error:  # declared in setup.py; only a broken environment lacks it
        raise CheckpointError("reading GGUF files needs the `gguf` package: pip install gguf") from error
    return gguf


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime: float, size: int):
    """One parsed header per file version (config, tokenizer and weights all read the same reader)."""
    del mtime  # part of the cache key only
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {error}") from None
    for tensor in reader.tensors:  # the reader maps the file lazily; a short file shows up here
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(f"{path} is truncated: tensor {tensor.name} ends at byte "
                                  f"{tensor.data_offset + tensor.n_bytes:,} of a {size:,}-byte file")
    return reader


def open_gguf(path: str):
    """The `gguf.GGUFReader` of a file, with one-line errors for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path!r} does not exist")
    stat = os.stat(path)
    return _reader(os.path.abspath(path), stat.st_mtime, stat.st_size)


def gguf_metadata(reader) -> Dict[str, Any]:
    """Every key-value field of the header as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def architecture_of(metadata: Dict[str, Any], path: str = "GGUF file") -> str:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _rope_scaling(metadata: Dict[str, Any], arch: str, path: str):
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    if kind == "linear":
        return (("factor", float(metadata[f"{arch}.rope.scaling.factor"])), ("rope_type", "linear"))
    raise CheckpointError(f"{path}: rope scaling {kind!r} is not supported (only none and linear)")


def config_from_gguf(metadata: Dict[str, Any], tensor_names, *, path: str = "GGUF file", dtype: str = "float32",
                     param_dtype: Optional[str] = None, value_groups: int = 1,
                     lora: LoRAConfig = LoRAConfig()) -> ModelConfig:
    """The ModelConfig a GGUF header describes (tensor_names: names of the tensors the file holds)."""
    arch = architecture_of(metadata, path)

    def get(key: str, default: Any = None, required: bool = True):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None and required:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: per-frequency rope factors (rope_freqs.weight, Llama 3.1 scaling) are not "
                              "supported from GGUF; load the model's Hugging Face folder instead")
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: key and value head sizes differ; not a Llama-family model")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count="
                              f"{get('rope.dimension_count')} < head_dim={head_dim}) are not supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if tokens else None)
    window = get("attention.sliding_window", required=False)
    num_layers = int(get("block_count"))
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(metadata, arch, path),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        sliding_windows=(int(window),) * num_layers if window else None,
        value_groups=value_groups,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        lora=lora,
        architecture="llama" if arch == "mistral" else arch,
    )


def read_gguf_config(path: str, **kwargs) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its header only (kwargs: dtype, param_dtype, value_groups, lora)."""
    reader = open_gguf(path)
    return config_from_gguf(gguf_metadata(reader), {t.name for t in reader.tensors}, path=path, **kwargs)


def supported_tensor_types():
    """The tensor types `gguf.quants` can dequantise (plain floats plus one class per quantisation)."""
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    return {types.F32, types.F16} | {t for t in types if isinstance(getattr(gguf.quants, t.name, None), type)}


def _unpermute_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row order of a q/k projection ([heads * head_dim, ...] in HF row order)."""
    shape = array.shape
    return array.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensor_plan(reader, cfg: ModelConfig, path: str):
    """{hf_name: ReaderTensor} for every weight the model needs, checked (names, types, shapes) before compute."""
    gguf = _gguf()
    arch = gguf.MODEL_ARCH.QWEN2 if cfg.architecture == "qwen2" else gguf.MODEL_ARCH.LLAMA
    name_map = gguf.get_tensor_name_map(arch, cfg.num_layers)
    by_name = {t.name: t for t in reader.tensors}
    supported = supported_tensor_types()
    plan, used = {}, set()
    for hf_name, _, hf_shape, _, _ in hf_parameter_layout(cfg):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        tensor = by_name.get(gguf_name)
        if tensor is None:
            raise CheckpointError(f"{path} lacks tensor {gguf_name} ({hf_name}) that its metadata implies")
        if tensor.tensor_type not in supported:
            raise CheckpointError(f"{path}: tensor {gguf_name} has type {tensor.tensor_type.name}, which the gguf "
                                  "package cannot dequantise")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest-varying dimension first
        if shape != hf_shape:
            raise CheckpointError(f"{path}: tensor {gguf_name} has shape {shape} but the metadata implies {hf_shape}")
        plan[hf_name] = tensor
        used.add(gguf_name)
    unused = sorted(set(by_name) - used)
    if unused:
        raise CheckpointError(f"{path} holds {len(unused)} tensors this loader would ignore (e.g. {unused[:3]}); "
                              "it is not a plain Llama-family model")
    return plan


def load_gguf_params(path: str, cfg: ModelConfig):
    """Dequantises a GGUF file's tensors into our nested param dict (cfg: from read_gguf_config, in
    cfg.param_dtype)."""
    gguf = _gguf()
    plan = gguf_tensor_plan(open_gguf(path), cfg, path)
    permuted = cfg.architecture in _PERMUTED_QK
    tensors = {}
    for hf_name, tensor in plan.items():
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        if permuted and ".q_proj." in hf_name:
            array = _unpermute_rows(array, cfg.num_heads)
        elif permuted and ".k_proj." in hf_name:
            array = _unpermute_rows(array, cfg.num_kv_heads)
        tensors[hf_name] = array
    return params_from_hf_tensors(tensors, cfg, path, implied_by="its GGUF metadata")
