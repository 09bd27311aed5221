"""Value groups in a better basis: a per-layer, per-KV-head orthogonal rotation of the values, folded
exactly into v_proj and o_proj, so the full-cache model computes the same function.

Cutting a value vector into G contiguous groups is arbitrary: the channels of a head have no order. In
the principal axes of the values (PCA over calibration text, largest variance first), group 0 holds the
directions with the most energy, so keeping a few groups of a token keeps more of its value. For one
KV head with rotation R (orthogonal, D x D):

    v' = v R                       (v_proj's kernel and bias times R)
    o' = (sum_j p_j v'_j) R^T      (R^T folded into the o_proj rows of every query head reading that KV head)

so attention outputs, hence logits, are unchanged; only what a value *group* means changes. RoPE never
touches values, so any rotation is exact. Rotate the base before adding adapters (LoRA on v / o would
need rotating too); the rotated params export to Hugging Face like any others (same shapes).

    rotations = fit_value_rotations(model, params, calibration_ids)     # [L] x [Hkv, D, D]
    params = rotate_value_basis(model.config, params, rotations)
"""

from __future__ import annotations

from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax.errors import InputError
from subtoken_jax.model import DecoderLM
from subtoken_jax.model_config import ModelConfig


def value_covariances(model: DecoderLM, params, ids, attention_mask=None) -> List[np.ndarray]:
    """Per layer [Hkv, D, D]: the (centred) second moment of the cached values of ids [B, T] over real tokens."""
    from subtoken_jax.selectors import capture_prefill_state

    ids = jnp.asarray(ids, jnp.int32)
    state = capture_prefill_state(model, params, ids, context_mask=attention_mask, window=1)
    real = np.asarray(state.positions) >= 0  # [B, T]
    covariances = []
    for values in state.values:
        v = np.asarray(values, np.float64)[real]  # [N, Hkv, D]
        v = v - v.mean(axis=0, keepdims=True)
        covariances.append(np.einsum("nhd,nhe->hde", v, v) / max(len(v), 1))
    return covariances


def principal_rotations(covariances: Sequence[np.ndarray]) -> List[jax.Array]:
    """Per layer [Hkv, D, D] orthogonal matrices whose columns are the principal axes, largest variance first."""
    rotations = []
    for cov in covariances:
        _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues, per head
        rotations.append(jnp.asarray(vectors[..., ::-1].copy(), jnp.float32))
    return rotations


def fit_value_rotations(model: DecoderLM, params, ids, attention_mask=None) -> List[jax.Array]:
    """PCA rotations of the values on calibration ids [B, T] (use text disjoint from any evaluation)."""
    return principal_rotations(value_covariances(model, params, ids, attention_mask))


def _check(cfg: ModelConfig, params, rotations) -> None:
    if len(rotations) != cfg.num_layers:
        raise InputError(f"{len(rotations)} rotations given for a model of {cfg.num_layers} layers")
    d = cfg.resolved_head_dim
    for i, r in enumerate(rotations):
        if tuple(np.shape(r)) != (cfg.num_kv_heads, d, d):
            raise InputError(f"rotation {i} has shape {tuple(np.shape(r))}; need [Hkv, D, D] = "
                             f"{(cfg.num_kv_heads, d, d)}")
        error = np.abs(np.einsum("hdk,hdl->hkl", np.asarray(r, np.float64), np.asarray(r, np.float64))
                       - np.eye(d)).max()
        if error > 1e-4:
            raise InputError(f"rotation {i} is not orthogonal (|R^T R - I| = {error:.2e})")
    for i in range(cfg.num_layers):
        attn = params[f"layer_{i}"]["attn"]
        adapted = [name for name in ("v", "o") if set(attn[name]) - {"kernel", "bias"}]
        if adapted:
            raise InputError(f"layer {i} has adapters on {adapted}: rotate the base before adding LoRA")


def rotate_value_basis(cfg: ModelConfig, params, rotations: Sequence[jax.Array]):
    """params with v_proj -> v_proj R and o_proj -> R^T o_proj per (layer, KV head): the same model function."""
    _check(cfg, params, rotations)
    reps = cfg.num_heads // cfg.num_kv_heads
    out = dict(params)
    for i, rotation in enumerate(rotations):
        layer = dict(out[f"layer_{i}"])
        attn = dict(layer["attn"])
        r = jnp.asarray(rotation, jnp.float32)
        v = dict(attn["v"])
        dtype = v["kernel"].dtype
        v["kernel"] = jnp.einsum("ehd,hdk->ehk", v["kernel"].astype(jnp.float32), r).astype(dtype)
        if "bias" in v:
            v["bias"] = jnp.einsum("hd,hdk->hk", v["bias"].astype(jnp.float32), r).astype(v["bias"].dtype)
        o = dict(attn["o"])
        r_q = jnp.repeat(r, reps, axis=0)  # query head q reads KV head q // reps
        o["kernel"] = jnp.einsum("qdk,qde->qke", r_q, o["kernel"].astype(jnp.float32)).astype(o["kernel"].dtype)
        attn["v"], attn["o"] = v, o
        layer["attn"] = attn
        out[f"layer_{i}"] = layer
    return out
