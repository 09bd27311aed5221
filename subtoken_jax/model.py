"""The decoder: a functional Flax linen model of the Llama family (Llama, Qwen2/Qwen2.5, Mistral).

    logits = model.apply({"params": params}, input_ids)
    logits, cache = model.apply({"params": params}, ids, cache=cache)       # incremental decoding
    logits, packed = model.apply({"params": params}, ids, cache=packed)     # from a compressed PackedCache

Optional inputs route inside tokens: `value_group_mask` (per layer [B, S, Hkv, G], 1 keep / 0 drop)
and `token_keep_mask` (per layer or shared, [B, S] or [B, S, Hkv]), where S is the number of key
slots attended to (the sequence itself, or the cache capacity when decoding). A `PackedCache`
(packed_cache.pack_cache) carries its compression and takes no masks; new tokens go to its dense tail.
"""

from __future__ import annotations

from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from subtoken_jax import layer_caches
from subtoken_jax.attention import Attention
from subtoken_jax.errors import InputError
from subtoken_jax.input_checks import check_ids
from subtoken_jax.kv_cache import KVCache, QuestKVCache, TailedKVCache
from subtoken_jax.layers import MLP, RMSNorm
from subtoken_jax.model_config import ModelConfig, check_budget
from subtoken_jax.packed_cache import PackedCache
from subtoken_jax.value_groups import per_layer

Cache = Union[KVCache, PackedCache, TailedKVCache, QuestKVCache]


class DecoderBlock(nn.Module):
    config: ModelConfig
    layer_index: int = 0

    @nn.compact
    def __call__(self, x, positions, *, cache=None, value_group_mask=None, token_keep_mask=None, value_budget=None,
                 deterministic: bool = True):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.weights_dtype, name=name)  # noqa: E731
        attn_out, new_cache = Attention(cfg, self.layer_index, name="attn")(
            norm("attn_norm")(x), positions, cache=cache, value_group_mask=value_group_mask,
            token_keep_mask=token_keep_mask, value_budget=value_budget, deterministic=deterministic)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x), deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


def default_positions(input_ids, attention_mask=None, offset=0):
    """Positions 0..T-1 (+offset), or, with a padding mask, counted over real tokens with pads at -1."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1 + offset, -1).astype(jnp.int32)


class DecoderLM(nn.Module):
    """Token embedding, N decoder blocks, final norm and LM head (tied to the embedding if configured)."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          ("vocab", "embed")))
        self.blocks = [DecoderBlock(cfg, i, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.weights_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                    param_dtype=cfg.weights_dtype,
                                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                             ("embed", "vocab")))

    def __call__(self, input_ids, *, positions=None, attention_mask=None, cache: Optional[Cache] = None,
                 value_group_mask=None, token_keep_mask=None, value_budget=None, deterministic: bool = True,
                 logits_to_keep: int = 0):
        """input_ids [B, T] -> logits [B, T, vocab] (float32); with a cache, returns (logits, new cache).

        logits_to_keep n > 0: the logits of the last n positions only, [B, n, vocab] (a prefill that only needs
        the next token skips the LM head over the prompt: SmolLM2 at 2,048 tokens, 0.95x the time on 2 CPU cores,
        bench/smollm2_vs_transformers.py).

        cache: a dense KVCache or a compressed PackedCache (see layer_caches). value_budget: fraction of
        value groups a routed model keeps (default: config.routing.budget). Apply with
        mutable=["routing"] to get the routing pytree (scores, masks, realised budgets).
        """
        cfg = self.config
        check_ids(input_ids)
        limit = cfg.max_position_embeddings
        if cache is None and input_ids.shape[1] > limit:
            raise InputError(f"{input_ids.shape[1]} tokens exceed the model's max_position_embeddings={limit}")
        if isinstance(cache, KVCache) and cache.capacity > limit:
            raise InputError(f"a KV cache of capacity {cache.capacity} exceeds the model's max_position_embeddings="
                             f"{limit}")
        if cache is not None and input_ids.shape[1] > layer_caches.room(cache):
            raise InputError(f"{input_ids.shape[1]} tokens do not fit a {type(cache).__name__} with room for "
                             f"{layer_caches.room(cache)}")
        if positions is None:
            offset = 0
            if cache is not None:  # a KVCache prefilled with a padding mask counts from its write index
                offset = cache.index if isinstance(cache, KVCache) and attention_mask is not None else \
                    layer_caches.next_positions(cache)
            positions = default_positions(input_ids, attention_mask, offset)
        if value_budget is None:
            value_budget = cfg.default_value_budget
        elif isinstance(value_budget, (int, float)):
            check_budget(value_budget, "value_budget")
        vg_masks = per_layer(value_group_mask, cfg.num_layers, "value_group_mask")
        keep_masks = per_layer(token_keep_mask, cfg.num_layers, "token_keep_mask")

        x = self.embed(input_ids)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        new_layers = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else layer_caches.layer_view(cache, i)
            x, layer_cache = block(x, positions, cache=layer_cache, value_group_mask=vg_masks[i],
                                   token_keep_mask=keep_masks[i], value_budget=value_budget,
                                   deterministic=deterministic)
            new_layers.append(layer_cache)
        if logits_to_keep:  # the norm and the head act per position: later positions are exact
            x = x[:, -logits_to_keep:]
        x = self.final_norm(x)
        if cfg.tie_word_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, layer_caches.reassemble(cache, new_layers)


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """Fresh, unboxed parameters of a DecoderLM (logical-axis metadata stripped)."""
    model = DecoderLM(config)
    variables = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    return model, nn.meta.unbox(variables["params"])
