"""Expected attention: closed-form attention of *future* queries, from statistics of the observed ones.

Treat a future query (before RoPE) as Gaussian q ~ N(mu, Sigma), estimated from the un-rotated window
queries (RoPE is removed so the statistics do not smear over the window's positions). The next
`n_future` positions rotate it by R_p; we use the averaged rotation R = mean_p R_p, i.e. mean R mu and
covariance R Sigma R^T. For a Gaussian, E[exp(q.k / sqrt(d))] = exp(mu.k / sqrt(d) + k^T Sigma k / (2d)),
so the unnormalised expected attention of key k_j is that exponential; normalising over the context
keys per query head gives expected attention weights. The token score averages them over the query
heads of a KV group and, optionally, multiplies by ||v_j|| (a token's contribution to the output scales
with its value). Idea after kvpress's ExpectedAttentionPress; this is an independent implementation.

Which queries the statistics come from (`observe`): "window" (default) the observation window, i.e. the question
(and a drafted answer with lookahead) in query-aware use; "prefill" every prefilled position from the n_sink-th on,
context and question together, as kvpress's press does when it compresses context + question in one prefill (the
state must then carry the context's queries: `capture_prefill_state(..., keep_context_queries=True)`). Over a
prefill of a long context the statistics are mostly the context's own queries, whatever the question asks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from subtoken_jax.errors import InputError
from subtoken_jax.layers import apply_rope
from subtoken_jax.selectors.base import PrefillState, TokenSelector


def query_statistics(queries, query_positions, inv_freq):
    """Mean [B, Hq, D] and covariance [B, Hq, D, D] (divided by n) of the un-rotated valid window queries."""
    raw = apply_rope(queries.astype(jnp.float32), -query_positions, inv_freq)  # inverse rotation
    w = (query_positions >= 0).astype(jnp.float32)[:, :, None, None]  # [B, W, 1, 1]
    n = jnp.maximum(jnp.sum(w, axis=1), 1.0)  # [B, 1, 1]
    mean = jnp.sum(raw * w, axis=1) / n
    centred = (raw - mean[:, None]) * w
    cov = jnp.einsum("bwhd,bwhe->bhde", centred, centred) / n[..., None]
    return mean, cov


def _rotate(x, cos, sin):
    """Applies the (averaged) rotation with per-row cos/sin [B, D] to the last axis of x [B, ..., D]."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    first, second = jnp.split(x, 2, axis=-1)
    return x * cos.reshape(shape) + jnp.concatenate([-second, first], axis=-1) * sin.reshape(shape)


def future_statistics(mean, cov, start, n_future: int, inv_freq):
    """Rotates the statistics to positions start..start+n_future-1 (start [B]) with the averaged rotation."""
    offsets = start[:, None].astype(jnp.float32) + jnp.arange(n_future, dtype=jnp.float32)  # [B, n]
    angles = offsets[..., None] * jnp.asarray(inv_freq)  # [B, n, D/2]
    cos = jnp.mean(jnp.cos(angles), axis=1)
    sin = jnp.mean(jnp.sin(angles), axis=1)
    cos, sin = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
    mean = _rotate(mean, cos, sin)
    cov = _rotate(cov, cos, sin)  # Sigma R^T
    cov = jnp.swapaxes(_rotate(jnp.swapaxes(cov, -1, -2), cos, sin), -1, -2)  # R Sigma R^T
    return mean, cov


OBSERVED = ("window", "prefill")


def observed_queries(state: PrefillState, layer: int, observe: str = "window", n_sink: int = 0):
    """(queries [B, T, Hq, D], positions [B, T]) the statistics are taken over: the observation window, or (observe
    "prefill") every context position from n_sink on and then the window (the window alone when it lies inside the
    context already)."""
    if observe == "window":
        return state.queries[layer], state.query_positions
    if observe != "prefill":
        raise InputError(f"observe must be one of {', '.join(OBSERVED)}, got {observe!r}")
    if state.context_queries is None:
        raise InputError('observe="prefill" needs the context\'s queries: capture the state with '
                         'capture_prefill_state(..., keep_context_queries=True)')
    positions = jnp.where(state.positions >= n_sink, state.positions, -1)  # sinks' queries are outliers
    if state.window_in_context:
        return state.context_queries[layer], positions
    return (jnp.concatenate([state.context_queries[layer], state.queries[layer]], axis=1),
            jnp.concatenate([positions, state.query_positions], axis=1))


def expected_attention_weights(state: PrefillState, layer: int, n_future: int = 16,
                               use_covariance: bool = True, observe: str = "window", n_sink: int = 0) -> jax.Array:
    """Expected attention of the next n_future queries on the context keys, [B, Hkv, S].

    Per query head normalised over the real context keys from position n_sink on (the sinks, always kept, would
    otherwise take most of some heads' mass and so reweigh the heads of a group; kvpress's press cuts them before its
    softmax too), then averaged over the heads of each KV group. Sinks get weight 0.
    """
    queries, query_positions = observed_queries(state, layer, observe, n_sink)
    return _expected_weights(queries, query_positions, state.keys[layer], state.positions, state.inv_freq, n_future,
                             use_covariance, n_sink)


@functools.partial(jax.jit, static_argnames=("n_future", "use_covariance", "n_sink"))
def _expected_weights(queries, query_positions, keys, positions, inv_freq, n_future, use_covariance, n_sink=0):
    mean, cov = query_statistics(queries, query_positions, inv_freq)
    start = jnp.maximum(jnp.max(query_positions, axis=1), jnp.max(positions, axis=1)) + 1
    mean, cov = future_statistics(mean, cov, start, n_future, inv_freq)
    keys = keys.astype(jnp.float32)  # [B, S, Hkv, D]
    batch, _, kv_heads, dim = keys.shape
    mean = mean.reshape(batch, kv_heads, -1, dim)
    logits = jnp.einsum("bkrd,bskd->bkrs", mean, keys) / jnp.sqrt(dim)
    if use_covariance:
        cov = cov.reshape(batch, kv_heads, -1, dim, dim)
        logits = logits + jnp.einsum("bkrde,bskd,bske->bkrs", cov, keys, keys) / (2 * dim)
    real = (positions >= n_sink)[:, None, None, :]
    logits = jnp.where(real, logits, -jnp.inf)
    weights = jnp.where(real, jax.nn.softmax(logits, axis=-1), 0.0)
    return jnp.mean(weights, axis=2)


@dataclasses.dataclass(frozen=True)
class ExpectedAttention(TokenSelector):
    """n_future: how many upcoming positions the rotation is averaged over; n_sink first tokens always kept (and,
    observing the prefill, left out of the statistics); observe: "window" or "prefill" (module docstring)."""

    n_future: int = 16
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0  # added before the value-norm factor, so zero-norm values are not all tied at 0
    n_sink: int = 0
    observe: str = "window"

    def __post_init__(self):
        if self.observe not in OBSERVED:
            raise InputError(f"ExpectedAttention observe must be one of {', '.join(OBSERVED)}, got {self.observe!r}")

    @property
    def needs_context_queries(self) -> bool:
        return self.observe == "prefill"

    def scores(self, state: PrefillState, layer: int) -> jax.Array:
        weights = jnp.transpose(expected_attention_weights(state, layer, self.n_future, self.use_covariance,
                                                           self.observe, self.n_sink),
                                (0, 2, 1))  # [B, S, Hkv]
        if self.use_vnorm:
            weights = (weights + self.epsilon) * jnp.linalg.norm(state.values[layer].astype(jnp.float32), axis=-1)
        return weights

    def protected(self, state: PrefillState):
        return self.n_sink, 0
