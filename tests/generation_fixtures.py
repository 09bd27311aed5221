"""The tiny decoder and prompts the generation tests share (two rows, row 1 left-padded by 4 tokens)."""

import jax
import jax.numpy as jnp

from subtoken_jax import ModelConfig, init_params

CONTEXT, QUESTION, NEW = 16, 3, 5


def tiny_config(max_position_embeddings: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, value_groups=4, max_position_embeddings=max_position_embeddings)


def tiny_setup(config: ModelConfig):
    """(model, params, context [2, CONTEXT], question [2, QUESTION], context mask)."""
    model, params = init_params(config, jax.random.key(11))
    context = jax.random.randint(jax.random.key(1), (2, CONTEXT), 0, config.vocab_size)
    question = jax.random.randint(jax.random.key(2), (2, QUESTION), 0, config.vocab_size)
    mask = jnp.ones((2, CONTEXT), jnp.int32).at[1, :4].set(0)
    return model, params, context, question, mask
