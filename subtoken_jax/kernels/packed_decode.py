"""Single-token decode attention over a fixed-K packed prefix, as a Pallas kernel.

Inference only: there is no custom VJP, and jax.grad through the Pallas path fails (use impl="xla"
if a gradient is ever needed; that path is plain XLA and differentiable).

The kernel runs one program per (batch row, KV head). It reads the R = Hq / Hkv query heads of that
KV head, the row's prefix keys [T, D], its packed values [T, K * gd] and their group indices
[T, K], and writes the normalised prefix read-out [R, D] together with the softmax statistics
(row max m and sum l). The wrapper merges these with the dense decode tail in XLA (the usual
log-sum-exp combination), so the result is one softmax over prefix and tail keys, exactly as
`packed_attention` computes it. The read-out never forms dense values: for each group g and slot k it
adds (weights * [group of slot k == g]) @ values of slot k into output group g, all 2-D ops.

On CPU Pallas runs only in interpret mode; impl="auto" picks the kernel on GPU/TPU and the XLA path
(`packed_attention`) elsewhere. The kernel has been checked in interpret mode only. For Triton (GPU),
whose blocks must have power-of-two sizes and whose dots need >= 16 rows, the wrapper pads the token
axis, the K slots and the R query heads of each KV head (pad_pow2, on by default on GPU); head_dim
and the group size are used as they are (powers of two in practice). The wrapper also transposes the
prefix to head-major blocks per call; a head-major packed layout would avoid that copy.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from subtoken_jax.attention import attention_allowed, grouped_readout
from subtoken_jax.errors import InputError
from subtoken_jax.packed_cache import IMPLS  # noqa: F401  (re-exported: it used to live here)
from subtoken_jax.packed_cache import (FixedKValues, PackedKeys, PackedLayer, key_scores, packed_attention,
                                       resolve_impl)


def _kernel(q_ref, k_ref, mask_ref, v_ref, g_ref, o_ref, m_ref, l_ref, *, num_groups: int, k_slots: int,
            group_dim: int, scale: float):
    q = q_ref[...].astype(jnp.float32)  # [R, D]
    keys = k_ref[...].astype(jnp.float32)  # [T, D]
    valid = mask_ref[...] > 0  # [1, T]
    scores = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ()))) * scale  # [R, T]
    scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
    m = jnp.max(scores, axis=-1, keepdims=True)  # [R, 1]
    p = jnp.exp(scores - m) * valid.astype(jnp.float32)
    l = jnp.sum(p, axis=-1, keepdims=True)  # [R, 1]
    w = p / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)
    values = v_ref[...].astype(jnp.float32)  # [T, K * gd]
    groups = g_ref[...].astype(jnp.int32)  # [T, K]
    for g in range(num_groups):
        acc = jnp.zeros((q.shape[0], group_dim), jnp.float32)
        for slot in range(k_slots):
            routed = w * (groups[:, slot] == g).astype(jnp.float32)[None, :]  # [R, T]
            acc = acc + jax.lax.dot_general(routed, values[:, slot * group_dim:(slot + 1) * group_dim],
                                            (((1,), (0,)), ((), ())))
        o_ref[:, g * group_dim:(g + 1) * group_dim] = acc.astype(o_ref.dtype)
    m_ref[...] = m
    l_ref[...] = l


def _prefix_pallas(q4, keys_h, mask, values_h, groups_h, *, num_groups: int, interpret: bool):
    """q4 [B, Hkv, R, D]; keys_h [B, Hkv, T, D]; mask [B, 1, T]; values_h [B, Hkv, T, K*gd]; groups_h [B, Hkv, T, K].

    Returns (out [B, Hkv, R, D] float32 normalised over the prefix, m [B, Hkv, R, 1], l [B, Hkv, R, 1]).
    """
    batch, heads, reps, dim = q4.shape
    length = keys_h.shape[2]
    k_slots = groups_h.shape[-1]
    kernel = functools.partial(_kernel, num_groups=num_groups, k_slots=k_slots, group_dim=dim // num_groups,
                               scale=dim ** -0.5)
    head_block = lambda *tail: pl.BlockSpec((None, None) + tail, lambda b, h: (b, h) + (0,) * len(tail))  # noqa: E731
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((batch, heads, reps, dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, reps, 1), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, reps, 1), jnp.float32)),
        grid=(batch, heads),
        in_specs=[head_block(reps, dim), head_block(length, dim),
                  pl.BlockSpec((None, 1, length), lambda b, h: (b, 0, 0)),
                  head_block(length, values_h.shape[-1]), head_block(length, k_slots)],
        out_specs=(head_block(reps, dim), head_block(reps, 1), head_block(reps, 1)),
        interpret=interpret,
    )(q4, keys_h, mask, values_h, groups_h)


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def _pad(x, axis: int, size: int):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def packed_decode_attention(query: jax.Array, q_positions: jax.Array, layer: PackedLayer, *,
                            tail_keys: Optional[jax.Array] = None, tail_values: Optional[jax.Array] = None,
                            tail_positions: Optional[jax.Array] = None, sliding_window: Optional[int] = None,
                            impl: str = "auto", interpret: Optional[bool] = None,
                            pad_pow2: Optional[bool] = None) -> jax.Array:
    """One decode token per row: query [B, Hq, D] at q_positions [B] over a fixed-K packed layer (+ dense tail).

    impl: "xla" (`packed_attention`), "pallas" (the kernel; interpret mode by default off GPU/TPU), or
    "auto" (pallas on GPU/TPU, xla elsewhere). pad_pow2 (default: on GPU) pads the kernel's token, slot
    and query-head axes to powers of two (query heads to >= 16); padding is masked out and changes
    nothing. Returns [B, Hq, D]. Inference only: no custom VJP, not differentiable through Pallas.
    """
    impl = resolve_impl(impl)
    backend = jax.default_backend()
    if impl == "xla":
        out = packed_attention(query[:, None], q_positions[:, None], layer, tail_keys=tail_keys,
                               tail_values=tail_values, tail_positions=tail_positions, sliding_window=sliding_window)
        return out[:, 0]
    if not isinstance(layer.values, FixedKValues) or layer.keys.compact:
        raise InputError("the Pallas decode kernel handles the fixed-K layout with dense keys; use impl='xla'")
    if interpret is None:
        interpret = backend not in ("gpu", "tpu")
    if pad_pow2 is None:
        pad_pow2 = backend == "gpu"
    entries = layer.values
    batch, num_heads, dim = query.shape
    _, length, kv_heads, k_slots, group_dim = entries.values.shape
    reps = num_heads // kv_heads
    if num_heads % kv_heads:
        raise InputError(f"{num_heads} query heads are not a multiple of {kv_heads} KV heads")
    allowed = attention_allowed(q_positions[:, None], layer.keys.positions, sliding_window=sliding_window)
    q4 = query.reshape(batch, kv_heads, reps, dim)
    mask = allowed.reshape(batch, 1, length).astype(jnp.int32)
    keys, values, groups = layer.keys.keys, entries.values, entries.groups
    if pad_pow2:  # padded tokens are masked, padded slots hold zeros, padded query rows are dropped
        padded_len = _pow2(length)
        q4 = _pad(q4, 2, _pow2(reps, 16))
        mask, keys = _pad(mask, 2, padded_len), _pad(keys, 1, padded_len)
        values = _pad(_pad(values, 1, padded_len), 3, _pow2(k_slots))
        groups = _pad(_pad(groups, 1, padded_len), 3, _pow2(k_slots))
    out, m, l = _prefix_pallas(
        q4, jnp.transpose(keys, (0, 2, 1, 3)), mask,
        jnp.transpose(values.reshape(values.shape[:3] + (-1,)), (0, 2, 1, 3)),
        jnp.transpose(groups, (0, 2, 1, 3)), num_groups=entries.num_groups, interpret=interpret)
    out, m, l = out[:, :, :reps], m[:, :, :reps], l[:, :, :reps]
    prefix_mass = (l > 0).astype(jnp.float32)  # the attention mass on the prefix (1 without a tail)
    if tail_keys is not None:
        q5 = query.reshape(batch, 1, kv_heads, reps, dim)
        scores, ok = key_scores(q5, PackedKeys(tail_keys, tail_positions), q_positions[:, None], sliding_window)
        scores, ok = scores[:, :, :, 0], ok[:, :, :, 0]  # [B, Hkv, R, L], [B, 1, 1, L]
        scores = jnp.where(ok, scores, jnp.finfo(jnp.float32).min)
        m_tail = jnp.max(scores, axis=-1, keepdims=True)
        p_tail = jnp.exp(scores - m_tail) * ok.astype(jnp.float32)
        l_tail = jnp.sum(p_tail, axis=-1, keepdims=True)
        tail_out = grouped_readout(p_tail[:, :, :, None].astype(tail_values.dtype), tail_values)  # [B, 1, Hkv, R, D]
        tail_out = tail_out[:, 0].astype(jnp.float32)
        top = jnp.maximum(m, m_tail)
        prefix_scale = l * jnp.exp(m - top)  # prefix out is normalised: undo with its l
        tail_scale = jnp.exp(m_tail - top)  # tail_out is unnormalised
        total = prefix_scale + l_tail * tail_scale
        total = jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
        out = (out * prefix_scale + tail_out * tail_scale) / total
        prefix_mass = prefix_scale / total
    if layer.value_mean is not None:  # entries are stored centred (pack_cache fill="mean")
        out = out + prefix_mass * layer.value_mean[:, :, None, :].astype(jnp.float32)
    return out.reshape(batch, num_heads, dim).astype(query.dtype)
