"""subtoken-jax: sub-token (value-group) routing for LoRA adaptation and KV-cache compression."""

from subtoken_jax.errors import CheckpointError, ConfigError, InputError
from subtoken_jax.kv_cache import KVCache
from subtoken_jax.model import DecoderLM, init_params
from subtoken_jax.model_config import LoRAConfig, ModelConfig

__all__ = ["CheckpointError", "ConfigError", "DecoderLM", "InputError", "KVCache", "LoRAConfig", "ModelConfig",
           "init_params"]
