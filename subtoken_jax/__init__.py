"""subtoken-jax: sub-token (value-group) routing for LoRA adaptation and KV-cache compression."""

from subtoken_jax.compressed_generate import compressed_generate
from subtoken_jax.compression import Compression, JointCompression
from subtoken_jax.errors import CheckpointError, ConfigError, InputError
from subtoken_jax.generate import generate
from subtoken_jax.hf_export import save_pretrained
from subtoken_jax.pretrained import load_pretrained, load_tokenizer
from subtoken_jax.kv_cache import KVCache
from subtoken_jax.model import DecoderLM, init_params
from subtoken_jax.model_config import LoRAConfig, ModelConfig
from subtoken_jax.tokenization import ByteTokenizer, HFTokenizer

__all__ = ["ByteTokenizer", "CheckpointError", "Compression", "ConfigError", "DecoderLM", "HFTokenizer", "InputError",
           "JointCompression", "KVCache", "LoRAConfig", "ModelConfig", "compressed_generate", "generate", "init_params",
           "load_pretrained", "load_tokenizer", "save_pretrained"]
