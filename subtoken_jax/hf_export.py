"""Write a model back as a Hugging Face folder (LoRA merged) that transformers loads."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from subtoken_jax.hf_import import hf_parameter_layout
from subtoken_jax.lora import merge_lora
from subtoken_jax.model_config import ModelConfig

_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32", extra: Optional[Dict[str, Any]] = None):
    """A transformers config.json for cfg (written in transformers 5's form, with legacy rope keys too)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope.update(dict(cfg.rope_scaling or ()))
    windows = [w for w in (cfg.sliding_windows or ()) if w is not None]
    hf = {
        "architectures": [_HF_CLASS[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if cfg.architecture == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = cfg.mlp_bias
    if windows:
        hf["sliding_window"] = windows[0]
        hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows]
        hf["use_sliding_window"] = True
    elif cfg.architecture in ("mistral", "qwen2"):
        hf["sliding_window"] = None
    hf.update(extra or {})
    return hf


def hf_state_dict(cfg: ModelConfig, params) -> Dict[str, jax.Array]:
    """Our params (LoRA merged, routers dropped) as HF-named arrays in HF layout."""
    if cfg.lora.enabled:
        params = merge_lora(params, cfg.lora.alpha)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for hf_name, ours, hf_shape, _, transpose in hf_parameter_layout(cfg):
        array = flat[ours]
        if transpose:  # ours is [in..., out...]; HF's Linear weight is [out, in]
            array = array.reshape(hf_shape[1], hf_shape[0]).T
        out[hf_name] = jnp.asarray(array).reshape(hf_shape)
    return out


def save_pretrained(folder: str, cfg: ModelConfig, params, *, tokenizer=None, dtype: str = "float32",
                    extra_config: Optional[Dict[str, Any]] = None) -> str:
    """Writes config.json, model.safetensors and (if given) tokenizer.json into folder."""
    from safetensors.flax import save_file

    os.makedirs(folder, exist_ok=True)
    target = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
    tensors = {k: jnp.asarray(v, target) for k, v in hf_state_dict(cfg, params).items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    extra = dict(extra_config or {})
    if tokenizer is not None:
        extra.setdefault("bos_token_id", tokenizer.bos_id)
        extra.setdefault("eos_token_id", tokenizer.eos_id)
        if hasattr(tokenizer, "save"):
            tokenizer.save(folder)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(hf_config_dict(cfg, dtype, extra), fh, indent=2)
    return folder
