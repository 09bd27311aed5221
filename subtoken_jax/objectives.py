"""Losses and pure train / eval steps (jit them with shardings in trainer.py).

A step is a pure function of (trainable params, frozen params, optimizer state, batch, budget, rng):
the base model can stay frozen while LoRA and routers train, or everything trains from scratch
(then `frozen` is empty).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from subtoken_jax.lora import combine_params
from subtoken_jax.model import DecoderLM


class LossWeights(NamedTuple):
    budget: float = 1.0  # (realised value budget - rho)^2, summed over layers
    balance: float = 0.01  # routed subspace LoRA load balancing, averaged over projections


def token_cross_entropy(logits, targets, loss_mask):
    """Mean next-token cross-entropy over masked positions, and the number of those positions."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weight = loss_mask.astype(jnp.float32)
    count = jnp.sum(weight)
    return jnp.sum(nll * weight) / jnp.maximum(count, 1.0), count


def _collect(routing, name):
    """All values sown under `name` anywhere in the routing pytree."""
    found = []

    def visit(tree):
        for key, value in tree.items():
            if key == name:
                found.extend(value)
            elif isinstance(value, dict):
                visit(value)

    visit(routing)
    return found


def routing_losses(routing, budget):
    """(budget gap loss, load-balance loss, mean realised budget) from the sown routing pytree."""
    kept = _collect(routing, "value_budget")
    balance = _collect(routing, "lora_balance_loss")
    zero = jnp.zeros((), jnp.float32)
    budget_loss = sum((k - budget) ** 2 for k in kept) if kept else zero
    balance_loss = sum(balance) / len(balance) if balance else zero
    realised = jax.lax.stop_gradient(sum(kept) / len(kept)) if kept else jnp.ones((), jnp.float32)
    return budget_loss, balance_loss, realised


def lm_loss(model: DecoderLM, weights: LossWeights, trainable, frozen, batch, budget, rng, deterministic=False):
    params = combine_params(trainable, frozen)
    logits, state = model.apply({"params": params}, batch["inputs"], value_budget=budget, mutable=["routing"],
                                deterministic=deterministic, rngs={"dropout": rng})
    ce, tokens = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    budget_loss, balance_loss, realised = routing_losses(state.get("routing", {}), budget)
    total = ce + weights.budget * budget_loss + weights.balance * balance_loss
    metrics = {"loss": total, "ce": ce, "budget_loss": budget_loss, "balance_loss": balance_loss,
               "value_budget": realised, "tokens": tokens}
    return total, metrics


def train_step(model: DecoderLM, tx: optax.GradientTransformation, weights: LossWeights,
               trainable, frozen, opt_state, batch, budget, rng):
    """One optimizer step on the trainable params; returns (trainable, opt_state, metrics)."""
    grad_fn = jax.value_and_grad(lambda t: lm_loss(model, weights, t, frozen, batch, budget, rng), has_aux=True)
    (_, metrics), grads = grad_fn(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return trainable, opt_state, metrics


def eval_step(model: DecoderLM, params, batch, budget):
    """Summed NLL, token count and realised value budget of a batch at a value budget (deterministic)."""
    logits, state = model.apply({"params": params}, batch["inputs"], value_budget=budget, mutable=["routing"])
    ce, tokens = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    _, _, realised = routing_losses(state.get("routing", {}), budget)
    return ce * tokens, tokens, realised
