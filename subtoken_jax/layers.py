"""Small building blocks of the Llama-family decoder: RMSNorm, rotary embeddings, SwiGLU MLP."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax.lora import LoRADense
from subtoken_jax.model_config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Hugging Face does, then cast back."""

    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Optional[Mapping[str, Any]] = None) -> np.ndarray:
    """Inverse frequencies of rotary embeddings, with the scalings used by Llama checkpoints.

    Supported `rope_type`s: default, linear, llama3. Others are rejected by the HF importer.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by positions [batch, length] (half-split layout, as HF)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], axis=-1))[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([angles, angles], axis=-1))[:, :, None, :].astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        dense = lambda name, features, axes: LoRADense(  # noqa: E731
            features=features, axes=axes, use_bias=cfg.mlp_bias, lora=cfg.lora if cfg.lora.applies_to(name) else None,
            dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, name=name)
        gate = dense("gate", (cfg.intermediate_size,), ("embed", "mlp"))(x, deterministic=deterministic)
        up = dense("up", (cfg.intermediate_size,), ("embed", "mlp"))(x, deterministic=deterministic)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense("down", (cfg.hidden_size,), ("mlp", "embed"))(hidden, deterministic=deterministic)
