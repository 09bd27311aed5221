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

STEPS_PER_OCTAVE = 4  # buckets 512, 640, 768, 896, 1024, 1280, ...: padding < 1 / STEPS_PER_OCTAVE of a length
SMALLEST = 16  # below this, one bucket


def bucket_length(n: int) -> int:
    """The smallest bucket >= n: SMALLEST, or 2^k * (1 + j / STEPS_PER_OCTAVE) for j < STEPS_PER_OCTAVE."""
    n = int(n)
    if n <= SMALLEST:
        return SMALLEST
    octave = 1 << (n - 1).bit_length() - 1  # largest power of two < n
    step = octave // STEPS_PER_OCTAVE
    return -(-n // step) * step


def left_pad(ids, mask: Optional[jnp.ndarray], length: int, pad_id: int = 0) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """ids [B, T] (mask [B, T], 1 = real; None = all real) left-padded to [B, length] with mask 0."""
    # on the host: padded on the device, every distinct prompt length would compile its own pad programs
    ids = np.asarray(ids, np.int32)
    mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
    extra = length - ids.shape[1]
    if extra > 0:
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)), constant_values=0)
    return jnp.asarray(ids), jnp.asarray(mask)
