"""LoRA for any projection of the decoder, and helpers to train, merge and export it.

`LoRADense` is a DenseGeneral (it contracts the input's last dims, so attention's per-head kernels
[embed, heads, head_dim] and [heads, head_dim, embed] fit) with an optional low-rank delta:

    y = x . W + b + (alpha / r) * ((dropout(x) . A) * gate) . B

`B` starts at zero so a fresh adapter changes nothing. `gate` ([..., r], optional) scales each rank
component per token: routed subspace LoRA passes a 0/1 (or soft) gate that activates some subspaces.
Parameters are plain leaves named `kernel`, `bias`, `lora_a`, `lora_b`, so trees can be split,
merged and checkpointed with ordinary pytree tools.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from subtoken_jax.errors import ConfigError
from subtoken_jax.model_config import LoRAConfig

LORA_PARAM_NAMES = ("lora_a", "lora_b")


def _contract(x, kernel, num_in: int):
    """x [..., *in] . kernel [*in, *out] -> [..., *out]."""
    axes_x = tuple(range(x.ndim - num_in, x.ndim))
    return jax.lax.dot_general(x, kernel, ((axes_x, tuple(range(num_in))), ((), ())))


class LoRADense(nn.Module):
    """A DenseGeneral with logical axis names and an optional (routed) LoRA delta."""

    features: Tuple[int, ...]  # output shape
    axes: Tuple[Optional[str], ...]  # logical names of kernel axes: input axes then output axes
    use_bias: bool = False
    lora: Optional[LoRAConfig] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x, deterministic: bool = True, gate: Optional[jax.Array] = None):
        features = tuple(self.features)
        num_in = len(self.axes) - len(features)
        in_shape = x.shape[x.ndim - num_in:]
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            in_shape + features, self.param_dtype)
        x = x.astype(self.dtype)
        y = _contract(x, kernel.astype(self.dtype), num_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[num_in:]),
                              features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is None or not self.lora.enabled:
            if gate is not None:
                raise ValueError(f"{self.name}: a LoRA gate was given but this projection has no LoRA")
            return y
        rank = self.lora.rank
        fan_in = 1
        for size in in_shape:
            fan_in *= size
        lora_a = self.param(
            "lora_a",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=fan_in ** -0.5),
                                         self.axes[:num_in] + ("lora_rank",)),
            in_shape + (rank,), self.param_dtype)
        lora_b = self.param(
            "lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + self.axes[num_in:]),
            (rank,) + features, self.param_dtype)
        if self.lora.dropout > 0.0:
            x = nn.Dropout(rate=self.lora.dropout)(x, deterministic=deterministic)
        a = lora_a.astype(self.dtype)
        routed = self.lora.num_subspaces > 1 and gate is None
        router = self.subspace_router(in_shape, num_in) if routed else None
        if routed and jnp.dtype(self.dtype) == jnp.float32:
            # one contraction for A and the router (float32 either way): x is read once, forward and backward
            both = _contract(x, jnp.concatenate([a, router], axis=-1), num_in)
            low_rank, logits = both[..., :rank], both[..., rank:]
        else:
            low_rank = _contract(x, a, num_in)  # [..., r]
            logits = _contract(x.astype(jnp.float32), router, num_in) if routed else None
        if routed:
            gate = self.subspace_gate(logits)
        if gate is not None:
            low_rank = low_rank * gate.astype(self.dtype)
        delta = _contract(low_rank, lora_b.astype(self.dtype), 1)
        return y + delta * (self.lora.alpha / rank)

    def subspace_router(self, in_shape, num_in):
        """The subspace router's weights [*in, S] (float32)."""
        return self.param("subspace_router",
                          nn.with_logical_partitioning(nn.initializers.normal(stddev=0.01),
                                                       self.axes[:num_in] + ("router",)),
                          in_shape + (self.lora.num_subspaces,), jnp.float32)

    def subspace_gate(self, logits):
        """Routed subspace LoRA: from router logits [..., S], a per-token gate activating k of S rank subspaces.

        The forward gate is exactly 0/1 per subspace; the router learns through straight-through
        softmax probabilities. A Switch-style load-balancing loss S * sum_s f_s P_s (1 when balanced)
        is sown into the "routing" collection.
        """
        num, active = self.lora.num_subspaces, self.lora.active_subspaces
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top = jax.lax.top_k(probs, active)[1]
        hard = jnp.sum(jax.nn.one_hot(top, num, dtype=probs.dtype), axis=-2)
        gate = hard + (probs - jax.lax.stop_gradient(probs))  # forward value is exactly `hard`
        tokens_share = jnp.mean(hard.reshape(-1, num), axis=0) / active
        prob_share = jnp.mean(probs.reshape(-1, num), axis=0)
        self.sow("routing", "lora_subspaces", hard)
        self.sow("routing", "lora_balance_loss", num * jnp.sum(tokens_share * prob_share))
        return jnp.repeat(gate, self.lora.rank // num, axis=-1)


# ----------------------------------------------------------------------------- parameter-tree helpers


def is_lora_path(path: Sequence[str]) -> bool:
    return path[-1] in LORA_PARAM_NAMES


def is_adapter_path(path: Sequence[str]) -> bool:
    """What adaptation trains: LoRA factors and every router (value-group and subspace routers)."""
    return is_lora_path(path) or any(str(key).endswith("router") for key in path)


def split_params(params, is_trainable: Callable[[Tuple[str, ...]], bool] = is_lora_path):
    """Splits a param tree into (trainable, frozen) nested dicts by a predicate on the key path."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine_params(*trees):
    """Inverse of `split_params`: merges disjoint nested dicts into one tree."""
    flat = {}
    for tree in trees:
        for key, value in traverse_util.flatten_dict(tree).items():
            if key in flat:
                raise ValueError(f"parameter {'/'.join(key)} appears in more than one tree")
            flat[key] = value
    return traverse_util.unflatten_dict(flat)


def _kernel_delta(lora_a, lora_b, alpha: float):
    rank = lora_a.shape[-1]
    num_in = lora_a.ndim - 1
    a = lora_a.astype(jnp.float32).reshape(-1, rank)
    b = lora_b.astype(jnp.float32).reshape(rank, -1)
    delta = (a @ b) * (alpha / rank)
    return delta.reshape(lora_a.shape[:num_in] + lora_b.shape[1:])


def _map_lora_modules(params, fn):
    """Applies fn(module_dict) -> module_dict to every module that has LoRA params."""
    if not isinstance(params, dict):
        return params
    if "lora_a" in params and "kernel" in params:
        return fn(dict(params))
    return {name: _map_lora_modules(child, fn) for name, child in params.items()}


def merge_lora(params, alpha: float):
    """Folds every adapter into its kernel (W + alpha/r A B) and drops the LoRA params."""

    def merge(module):
        if "subspace_router" in module:
            raise ConfigError("routed subspace LoRA gates each token differently and cannot be merged into "
                              "static weights; export the base, or train plain LoRA (lora.num_subspaces=1)")
        delta = _kernel_delta(module.pop("lora_a"), module.pop("lora_b"), alpha)
        module["kernel"] = (module["kernel"].astype(jnp.float32) + delta).astype(module["kernel"].dtype)
        return module

    return _map_lora_modules(params, merge)


def unmerge_lora(merged_params, lora_params, alpha: float):
    """Inverse of `merge_lora`: subtracts the adapters from merged kernels and restores the LoRA params."""
    flat_lora = traverse_util.flatten_dict(lora_params)
    flat = dict(traverse_util.flatten_dict(merged_params))
    modules = {k[:-1] for k in flat_lora}
    for module in modules:
        a, b = flat_lora[module + ("lora_a",)], flat_lora[module + ("lora_b",)]
        kernel = flat[module + ("kernel",)]
        flat[module + ("kernel",)] = (kernel.astype(jnp.float32) - _kernel_delta(a, b, alpha)).astype(kernel.dtype)
        flat[module + ("lora_a",)], flat[module + ("lora_b",)] = a, b
    return traverse_util.unflatten_dict(flat)


def count_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
