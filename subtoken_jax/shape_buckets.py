"""Few shapes for many prompts: lengths rounded up to buckets, prompts left-padded to them.

Every distinct array shape is a new XLA compilation, and on CPU enough compiled executables exhaust the
process's mappable memory (LLVM "Unable to allocate section memory"). `generate` therefore left-pads a
prompt to `bucket_length` of its length (padding is masked: it has no position, is never attended and
is never kept by a selector), so a stream of prompts of any lengths compiles at most four programs per
octave of length, for at most 25% padding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

from subtoken_jax.errors import InputError

STEPS_PER_OCTAVE = 4  # buckets 512, 640, 768, 896, 1024, 1280, ...: padding < 1 / STEPS_PER_OCTAVE of a length
SMALLEST = 16  # below this, one bucket
# the full-cache prefill of a longer prompt runs in chunks of this many tokens into a cache of a coarse capacity
# bucket (`capacity_bucket`): one compiled chunk program and one decode program per capacity, whatever the length
PREFILL_CHUNK = 256


def bucket_length(n: int) -> int:
    """The smallest bucket >= n: SMALLEST, or 2^k * (1 + j / STEPS_PER_OCTAVE) for j < STEPS_PER_OCTAVE."""
    n = int(n)
    if n <= SMALLEST:
        return SMALLEST
    octave = 1 << (n - 1).bit_length() - 1  # largest power of two < n
    step = octave // STEPS_PER_OCTAVE
    return -(-n // step) * step


def capacity_bucket(n: int) -> int:
    """The smallest of SMALLEST, 2^k and 3 x 2^(k-1) that is >= n: two cache capacities per octave."""
    n = int(n)
    if n <= SMALLEST:
        return SMALLEST
    power = 1 << (n - 1).bit_length()  # smallest power of two >= n
    return power * 3 // 4 if power * 3 // 4 >= n else power


# a pinned cache capacity is rounded up to whole blocks of this many slots, so chunks attend block by block over
# the written slots only (layer_caches.WRITTEN_BLOCKS)
CAPACITY_STEP = 128


def full_prefill_plan(length: int, new_tokens: int, limit: int, capacity: Optional[int] = None
                      ) -> Tuple[int, int, int]:
    """(padded prompt length, prefill chunk, cache capacity) of a full-cache generation with bucketing.

    Up to PREFILL_CHUNK tokens: one chunk of the prompt's bucket_length. Longer: a whole number of PREFILL_CHUNK
    chunks (the first carries the left padding). Never past the model's `limit` positions: a prompt that fits is
    not refused for its bucket (its chunks then cover it unevenly). capacity: the cache's size for every prompt
    (rounded up to CAPACITY_STEP slots, at most `limit`) instead of the prompt's capacity_bucket, so a stream of
    prompts compiles one chunk program and one decode program in all; an InputError if the padded prompt and the
    new tokens do not fit it."""
    room = limit - new_tokens
    if length <= PREFILL_CHUNK:
        padded = max(length, min(bucket_length(length), room))
        chunk = padded
    else:
        padded = max(length, min(-(-length // PREFILL_CHUNK) * PREFILL_CHUNK, room))
        chunk = PREFILL_CHUNK
    if capacity is None:
        return padded, chunk, min(capacity_bucket(padded + new_tokens), limit)
    capacity = min(-(-int(capacity) // CAPACITY_STEP) * CAPACITY_STEP, limit)
    if padded + new_tokens > capacity:
        raise InputError(f"cache_capacity {capacity} is too small for this prompt: {length} tokens (padded to "
                         f"{padded}) + max_new_tokens {new_tokens}; pin it to the longest prompt of the stream plus "
                         f"{PREFILL_CHUNK} + max_new_tokens, or leave it None")
    return padded, chunk, capacity


def left_pad(ids, mask: Optional[jnp.ndarray], length: int, pad_id: int = 0, on_host: bool = False
             ) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """ids [B, T] (mask [B, T], 1 = real; None = all real) left-padded to [B, length] with mask 0. on_host: numpy
    arrays back (a device copy compiles a small staging program per new shape)."""
    # on the host: padded on the device, every distinct prompt length would compile its own pad programs
    ids = np.asarray(ids, np.int32)
    mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
    extra = length - ids.shape[1]
    if extra > 0:
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)), constant_values=0)
    return (ids, mask) if on_host else (jnp.asarray(ids), jnp.asarray(mask))
