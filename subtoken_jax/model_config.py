"""Typed, validated configuration of the decoder and its LoRA adapters.

Configs flow CLI -> ml_collections.ConfigDict -> these frozen dataclasses, which the Flax modules
take as attributes (hashable, so modules stay static under jit). Every check runs at construction,
so a bad value fails with one clear line before any compute.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp

from subtoken_jax.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def resolve_dtype(name: Any):
    """Maps 'float32' / 'bfloat16' / a jnp dtype to a jnp dtype, with a clear error."""
    if not isinstance(name, str):
        return jnp.dtype(name).type
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on chosen projections; `num_subspaces > 1` is routed subspace LoRA."""

    rank: int = 0  # 0 disables LoRA
    alpha: float = 16.0  # delta is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, training only
    targets: Tuple[str, ...] = ("q", "v")  # any of q, k, v, o, gate, up, down
    num_subspaces: int = 1  # S: rank is split into S subspaces of rank // S
    active_subspaces: int = 1  # k of S activated per token by the subspace router

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0, got {self.rank}")
        unknown = set(self.targets) - set(ALL_TARGETS)
        if unknown:
            raise ConfigError(f"lora.targets has unknown entries {sorted(unknown)}; allowed: {ALL_TARGETS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.num_subspaces < 1 or (self.rank and self.rank % self.num_subspaces):
            raise ConfigError(
                f"lora.num_subspaces={self.num_subspaces} must be >= 1 and divide lora.rank={self.rank}")
        if not 1 <= self.active_subspaces <= self.num_subspaces:
            raise ConfigError(
                f"lora.active_subspaces={self.active_subspaces} must be in [1, num_subspaces={self.num_subspaces}]")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def applies_to(self, target: str) -> bool:
        return self.enabled and target in self.targets


ROUTING_MODES = ("none", "fixed_k", "adaptive")
ROUTING_SCORERS = ("router", "norm", "random")
# how exact_budget meets rho over a chunk: calibrated = the causal thresholds shifted onto the budget;
# topb = a top-B of the raw scores over the chunk (an ablation: it ignores the per-position normalisation)
EXACT_RULES = ("calibrated", "topb")


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """Query-independent value-group routing on the KV path (see value_groups.py)."""

    mode: str = "none"  # none | fixed_k (exactly round(rho*G) groups per token and head) | adaptive
    budget: float = 1.0  # rho: fraction of value groups kept when apply() is given no value_budget
    k: Optional[int] = None  # fixed_k only: keep exactly k of G groups by default (overrides budget)
    temperature: float = 1.0  # of the sigmoid relaxation that carries gradients to the router
    norm_prior: bool = True  # add log ||value group|| to the learned score (starts at keep-largest-norm)
    # router: learned per-layer router (+ norm prior); norm / random: parameter-free baselines
    scorer: str = "router"
    # adaptive only: a chunk of several tokens written at once (a prefilled context) keeps exactly `budget` of its
    # (token, group) pairs per sequence and KV head: the causal thresholds shifted by one offset that lands on the
    # budget (value_groups.calibrated_adaptive_mask); for compressing a known context (eval sets it), not training
    exact_budget: bool = False
    exact_rule: str = "calibrated"  # one of EXACT_RULES

    def __post_init__(self):
        if self.mode not in ROUTING_MODES:
            raise ConfigError(f"routing.mode={self.mode!r} is unknown; choose one of {ROUTING_MODES}")
        if self.scorer not in ROUTING_SCORERS:
            raise ConfigError(f"routing.scorer={self.scorer!r} is unknown; choose one of {ROUTING_SCORERS}")
        check_budget(self.budget, "routing.budget")
        if self.temperature <= 0:
            raise ConfigError(f"routing.temperature must be > 0, got {self.temperature}")
        if self.exact_rule not in EXACT_RULES:
            raise ConfigError(f"routing.exact_rule={self.exact_rule!r} is unknown; choose one of {EXACT_RULES}")
        if self.exact_budget and self.mode != "adaptive":
            raise ConfigError(f"routing.exact_budget is for mode adaptive (fixed_k is exact per token), not {self.mode!r}")
        if self.k is not None and self.mode != "fixed_k":
            raise ConfigError(f"routing.k is for mode fixed_k, not {self.mode!r}; use routing.budget")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def check_budget(value: float, what: str = "budget") -> float:
    """Budgets are fractions kept, in (0, 1]."""
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{what}={value} is out of range; a budget is the fraction kept, in (0, 1]")
    return float(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama, Qwen2/Qwen2.5, Mistral are instances of it)."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # defaults to hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[Tuple[Tuple[str, Any], ...]] = None  # HF rope_parameters, as sorted items
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has q/k/v biases
    o_bias: bool = False
    mlp_bias: bool = False
    # Per-layer sliding window (None = full attention). Mistral: all layers; Qwen2: from max_window_layers on.
    sliding_windows: Optional[Tuple[Optional[int], ...]] = None
    value_groups: int = 1  # G: each KV head's value vector is split into G equal groups
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    lora: LoRAConfig = LoRAConfig()
    routing: RoutingConfig = RoutingConfig()
    architecture: str = "llama"  # llama | qwen2 | mistral, used for HF export

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_position_embeddings", "value_groups")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
        if self.resolved_head_dim % self.value_groups:
            raise ConfigError(
                f"model.value_groups={self.value_groups} must divide head_dim={self.resolved_head_dim}")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_layers:
            raise ConfigError(
                f"model.sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers")
        for window in self.sliding_windows or ():
            if window is not None and window < 1:
                raise ConfigError(f"sliding window sizes must be >= 1, got {window}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)
        if not isinstance(self.lora, LoRAConfig):
            object.__setattr__(self, "lora", LoRAConfig(**dict(self.lora)))
        if not isinstance(self.routing, RoutingConfig):
            object.__setattr__(self, "routing", RoutingConfig(**dict(self.routing)))
        if self.routing.k is not None and not 1 <= self.routing.k <= self.value_groups:
            raise ConfigError(f"routing.k={self.routing.k} must be in [1, G={self.value_groups}] "
                              "(K of G value groups kept)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def default_value_budget(self) -> float:
        routing = self.routing
        return routing.k / self.value_groups if routing.k is not None else routing.budget

    @property
    def group_dim(self) -> int:
        return self.resolved_head_dim // self.value_groups

    @property
    def compute_dtype(self):
        return resolve_dtype(self.dtype)

    @property
    def weights_dtype(self):
        return resolve_dtype(self.param_dtype)

    def sliding_window(self, layer: int) -> Optional[int]:
        return None if self.sliding_windows is None else self.sliding_windows[layer]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a plain mapping (e.g. a ConfigDict), rejecting unknown keys."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        if "lora" in values and not isinstance(values["lora"], LoRAConfig):
            lora = dict(values["lora"])
            if "targets" in lora:
                lora["targets"] = tuple(lora["targets"])
            values["lora"] = LoRAConfig(**lora)
        if "routing" in values and not isinstance(values["routing"], RoutingConfig):
            values["routing"] = RoutingConfig(**dict(values["routing"]))
        for key in ("sliding_windows",):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
