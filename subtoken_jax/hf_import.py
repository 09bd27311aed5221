"""Llama / Qwen2 / Mistral checkpoints in Hugging Face format from a local folder: config and weights.

    model, params, tokenizer = subtoken_jax.load_pretrained("/path/to/Qwen2.5-0.5B", dtype="bfloat16")
    logits = model.apply({"params": params}, input_ids)

`load_pretrained` (pretrained.py) is the front door for folders, GGUF files and registered names; this
module reads folders: config.json, model.safetensors (or shards with model.safetensors.index.json).
`hf_parameter_layout` is the one table between HF tensor names / layouts and our parameter tree; the
GGUF reader and the HF exporter use it too. Nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from subtoken_jax.errors import CheckpointError
from subtoken_jax.json_files import read_json_object
from subtoken_jax.model import DecoderLM
from subtoken_jax.model_config import LoRAConfig, ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_settings(hf: Dict[str, Any]) -> Tuple[float, Optional[Dict[str, Any]]]:
    """(theta, scaling) from either transformers 5's `rope_parameters` or the older rope_theta/rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in (params or legacy).items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    return theta, (scaling if rope_type != "default" else None)


def _sliding_windows(hf: Dict[str, Any], arch: str, num_layers: int):
    window = hf.get("sliding_window")
    if window is None:
        return None
    if hf.get("layer_types"):
        return tuple(window if kind == "sliding_attention" else None for kind in hf["layer_types"])
    if arch == "mistral":
        return (window,) * num_layers
    if arch == "qwen2" and hf.get("use_sliding_window"):
        first = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return None


def config_from_hf(hf: Dict[str, Any], *, dtype: str = "float32", param_dtype: Optional[str] = None,
                   value_groups: int = 1, lora: LoRAConfig = LoRAConfig()) -> ModelConfig:
    """Translates a Hugging Face config.json dict into a ModelConfig, rejecting what we do not implement."""
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture model_type={arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act={act!r} is not supported (only silu / SwiGLU)")
    theta, scaling = _rope_settings(hf)
    num_layers = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rope_theta=theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
        o_bias=False if arch == "qwen2" else bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_windows=_sliding_windows(hf, arch, num_layers),
        value_groups=value_groups,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        lora=lora,
        architecture=arch,
    )


def hf_parameter_layout(cfg: ModelConfig) -> Iterator[Tuple[str, Tuple[str, ...], Tuple[int, ...], Tuple[int, ...], bool]]:
    """Yields (hf_name, our_path, hf_shape, our_shape, transpose) for every weight of the model.

    HF stores Linear weights as [out, in]; ours are [in..., out...], so those are transposed then reshaped.
    """
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    yield "model.embed_tokens.weight", ("embed", "embedding"), (v, e), (v, e), False
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", (f"layer_{i}",)
        yield hf + "input_layernorm.weight", ours + ("attn_norm", "scale"), (e,), (e,), False
        yield hf + "post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (e,), (e,), False
        for name, heads in (("q", hq), ("k", hkv), ("v", hkv)):
            yield hf + f"self_attn.{name}_proj.weight", ours + ("attn", name, "kernel"), (heads * d, e), (e, heads, d), True
            if cfg.qkv_bias:
                yield hf + f"self_attn.{name}_proj.bias", ours + ("attn", name, "bias"), (heads * d,), (heads, d), False
        yield hf + "self_attn.o_proj.weight", ours + ("attn", "o", "kernel"), (e, hq * d), (hq, d, e), True
        if cfg.o_bias:
            yield hf + "self_attn.o_proj.bias", ours + ("attn", "o", "bias"), (e,), (e,), False
        for name, shape in (("gate", (f, e)), ("up", (f, e)), ("down", (e, f))):
            yield hf + f"mlp.{name}_proj.weight", ours + ("mlp", name, "kernel"), shape, shape[::-1], True
            if cfg.mlp_bias:
                yield hf + f"mlp.{name}_proj.bias", ours + ("mlp", name, "bias"), (shape[0],), (shape[0],), False
    yield "model.norm.weight", ("final_norm", "scale"), (e,), (e,), False
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), (v, e), (e, v), True


def _safetensors_files(path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json_object(index, "a safetensors shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map; is it a safetensors shard index?")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                              "(only safetensors checkpoints are supported)")
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"{path} is missing safetensors shards listed in its index: {missing}")
    return [os.path.join(path, f) for f in files]


def read_hf_config(path: str) -> Dict[str, Any]:
    if not os.path.isdir(path):
        raise CheckpointError(f"model folder {path!r} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model folder?")
    return read_json_object(config_path, "a Hugging Face model folder's config.json")


def load_hf_params(path: str, cfg: ModelConfig):
    """Reads safetensors weights into our nested param dict, checking every name and shape."""
    tensors = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="flax") as fh:  # "flax" also reads bfloat16, which numpy cannot
                for name in fh.keys():
                    tensors[name] = fh.get_tensor(name)
        except Exception as error:  # noqa: BLE001 - safetensors raises SafetensorError / OSError for bad files
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{first}") from None
    return params_from_hf_tensors(tensors, cfg, path)


# Tensors some checkpoints carry that hold nothing the model needs (recomputed buffers).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def _unused_tensors(tensors: Dict[str, Any], wanted_names, cfg: ModelConfig):
    unused = [n for n in tensors if n not in wanted_names and not n.endswith(_IGNORABLE_SUFFIXES)]
    if cfg.tie_word_embeddings and "lm_head.weight" in unused and "model.embed_tokens.weight" in tensors:
        # a tied checkpoint may also store the head; harmless only if it is the embedding
        if np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["model.embed_tokens.weight"])):
            unused.remove("lm_head.weight")
    return sorted(unused)


def params_from_hf_tensors(tensors: Dict[str, Any], cfg: ModelConfig, where: str, implied_by: str = "config.json"):
    """HF-named arrays in HF layout ([out, in] Linear weights) -> our nested param dict in cfg.param_dtype."""
    wanted = list(hf_parameter_layout(cfg))
    missing = [name for name, *_ in wanted if name not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint in {where} lacks {len(missing)} tensors the config implies, "
                              f"e.g. {missing[:3]}")
    unused = _unused_tensors(tensors, {name for name, *_ in wanted}, cfg)
    if unused:
        raise CheckpointError(f"checkpoint in {where} holds {len(unused)} tensors {implied_by} does not account for, "
                              f"e.g. {unused[:3]} (fewer layers configured than stored?)")
    dtype = cfg.weights_dtype
    flat = {}
    for hf_name, ours, hf_shape, our_shape, transpose in wanted:
        array = tensors[hf_name]
        if tuple(array.shape) != hf_shape:
            raise CheckpointError(f"tensor {hf_name} has shape {tuple(array.shape)} but {implied_by} implies "
                                  f"{hf_shape}")
        array = array.T if transpose else array
        flat[ours] = jnp.asarray(array.reshape(our_shape), dtype=dtype)
    return traverse_util.unflatten_dict(flat)


def add_fresh_lora(cfg: ModelConfig, base_params, seed: int = 0):
    """Adds newly initialised LoRA params (B = 0) and routers to a base param tree without re-initialising the base.

    Only the LoRA leaves leave the jitted init, so XLA drops the base weights' initialisation (no
    second copy of a 7B model in memory).
    """
    import flax.linen as nn
    import jax

    from subtoken_jax.lora import combine_params, is_adapter_path, split_params

    model = DecoderLM(cfg)

    def init_lora(rng):
        params = nn.meta.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
        return split_params(params, is_adapter_path)[0]

    return combine_params(base_params, jax.jit(init_lora)(jax.random.key(seed)))
