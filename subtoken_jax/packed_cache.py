"""A KV cache that stores only what compression keeps, with static shapes so it jits.

Compression (token selection and value-group allocation, see selectors/) yields 0/1 masks; this
module turns one layer's dense keys/values plus masks into compact arrays, and attends over them
without ever rebuilding the dense [B, S, Hkv, D] value tensor.

Two value layouts (G groups of gd = D / G channels per KV head):

* fixed-K: every (token, KV head) keeps K of G groups; the layout of `routing.mode = "fixed_k"`, and a
  token selection shared by the KV heads drops the evicted tokens' rows altogether. Stored one of two
  ways, whichever the decode attention reads fastest (`pack_cache(impl=...)`): token-major
  (`FixedKValues`, for the Pallas kernel): values [B, T, Hkv, K, gd] and the kept group of each slot,
  groups [B, T, Hkv, K] (uint8 for G <= 256), slots beyond a row's kept count hold zeros, keys stay
  token-major; or group-major in the global entry format below (`pack_fixed_k_group_major`, for the
  XLA read-out, which would otherwise do K times the dense read-out's work), with a static capacity
  of key slots x K.
* global budget (`GlobalValues`): a fixed-size list of kept (token, group) entries per (batch,
  KV head): values [B, Hkv, P, gd], the entry's token slot tokens [B, Hkv, P] (an index into the
  key axis, smallest unsigned type that holds it: uint8 / uint16 / int32) and its group groups
  [B, Hkv, P] (uint8; G marks an empty slot). The list holds up to C kept pairs (C static, chosen at
  pack time: by default the largest kept count of any head) in P = `entry_slots(C, G)` slots. Any
  mask pattern fits, including per-head budgets that differ from token to token. Entries are
  ordered by group, then token, and each group starts on a whole read-out block of L slots (its
  last block padded with empty slots), so every block holds one group and the attention reads it
  with a plain matmul: no per-entry routing, no per-step bookkeeping of where groups change.

Keys (`PackedKeys`): without token selection they stay as cached, [B, T, Hkv, D] with positions
[B, T]; with token selection (`pack_global(token_keep_mask=...)`) each KV head's kept keys are
compacted to [B, Hkv, Tk, D] with their positions [B, Hkv, Tk] (-1 = empty slot).

Decoding appends new tokens uncompressed to a small dense tail (`PackedCache.tail_*`); attention
takes one softmax over prefix and tail keys together (`packed_attention`). `DecoderLM` decodes from a
PackedCache like from a KVCache (layer_caches.PackedLayerCache is the per-layer view it uses).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from subtoken_jax import sharding
from subtoken_jax.attention import attention_allowed, grouped_readout, grouped_scores
from subtoken_jax.errors import InputError
from subtoken_jax.permutations import true_first
from subtoken_jax.value_groups import per_layer


LAYOUTS = ("global", "fixed_k")
IMPLS = ("auto", "xla", "pallas")  # decode attention of the fixed-K layout (kernels/packed_decode.py)
FILLS = ("zero", "mean")  # what a dropped value group of a kept token reads as


def index_dtype(n: int):
    """Smallest dtype holding indices 0..n-1: uint8 (n <= 256), uint16 (n <= 65536), else int32."""
    if n <= 1 << 8:
        return jnp.uint8
    if n <= 1 << 16:
        return jnp.uint16
    return jnp.int32


# ----------------------------------------------------------------------------- pytrees


@flax.struct.dataclass
class PackedKeys:
    """Keys of one layer: dense [B, T, Hkv, D] + positions [B, T], or compact [B, Hkv, Tk, D] + [B, Hkv, Tk]."""

    keys: jax.Array
    positions: jax.Array  # int32, -1 = empty / padding
    compact: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_slots(self) -> int:
        return self.keys.shape[2] if self.compact else self.keys.shape[1]


@flax.struct.dataclass
class FixedKValues:
    """K kept value groups per (token, KV head): values [B, T, Hkv, K, gd], groups [B, T, Hkv, K]."""

    values: jax.Array
    groups: jax.Array
    num_groups: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def k(self) -> int:
        return self.values.shape[3]


@flax.struct.dataclass
class GlobalValues:
    """Kept (token, group) entries per (batch, KV head), in P slots of blocks of `block` slots.

    values [B, Hkv, P, gd]; tokens [B, Hkv, P] (slot on the layer's key axis); groups [B, Hkv, P]: the
    entry's group, or num_groups for an empty slot (zero values, token 0). Entries are sorted by group,
    then token, and each group's entries start on a block boundary (`pack_global` writes them so), so
    every block holds entries of one group and empty slots: `packed_attention` relies on it.
    """

    values: jax.Array
    tokens: jax.Array
    groups: jax.Array
    num_groups: int = flax.struct.field(pytree_node=False, default=1)
    block: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def capacity(self) -> int:
        """P, the number of entry slots (kept pairs plus block padding)."""
        return self.values.shape[2]

    @property
    def real(self) -> jax.Array:
        """[B, Hkv, P] bool: which slots hold a kept pair."""
        return self.groups.astype(jnp.int32) < self.num_groups


@flax.struct.dataclass
class PackedLayer:
    """One layer's compressed prefix: keys and kept value groups.

    value_mean [B, Hkv, D] (fill "mean", see `pack_cache`): the kept groups are stored centred on it and
    a dropped group of a kept token reads as it, not as zero. None: dropped groups read as zero.
    """

    keys: PackedKeys
    values: Union[FixedKValues, GlobalValues]
    value_mean: Optional[jax.Array] = None

    @property
    def layout(self) -> str:
        return "fixed_k" if isinstance(self.values, FixedKValues) else "global"


@flax.struct.dataclass
class PackedCache:
    """A compressed prefix per layer plus a dense tail of fixed capacity for tokens decoded after it."""

    layers: Tuple[PackedLayer, ...]
    tail_keys: Tuple[jax.Array, ...]  # per layer [B, L, Hkv, D]
    tail_values: Tuple[jax.Array, ...]  # per layer [B, L, Hkv, D]
    tail_positions: jax.Array  # [B, L] int32, -1 = empty
    tail_index: jax.Array  # scalar int32: next tail slot to write
    prefix_end: jax.Array  # [B] int32: the position after the prefix's last real token (evicted ones included)
    impl: str = flax.struct.field(pytree_node=False, default="auto")  # fixed-K decode attention (kernels/)

    @property
    def tail_capacity(self) -> int:
        return self.tail_positions.shape[1]

    def append_to_tail(self, keys: Sequence[jax.Array], values: Sequence[jax.Array], positions: jax.Array
                       ) -> "PackedCache":
        """Writes tokens computed elsewhere (per layer keys / values [B, T, Hkv, D], positions [B, T], -1 = padding)
        at the tail's next T slots, e.g. a question prefilled over the full context."""
        def write(old, new):
            return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), self.tail_index, axis=1)

        return self.replace(tail_keys=tuple(map(write, self.tail_keys, keys)),
                            tail_values=tuple(map(write, self.tail_values, values)),
                            tail_positions=write(self.tail_positions, jnp.asarray(positions, jnp.int32)),
                            tail_index=self.tail_index + positions.shape[1])

    @property
    def next_position(self) -> jax.Array:
        """[B] the position after the last token the cache holds (the prefix's, or the tail's once it has any)."""
        return jnp.maximum(self.prefix_end, jnp.max(self.tail_positions, axis=1) + 1)

    @classmethod
    def with_empty_tail(cls, layers: Sequence[PackedLayer], tail_capacity: int, prefix_end: jax.Array,
                        dtype=None) -> "PackedCache":
        layers = tuple(layers)
        first = layers[0].keys
        batch = first.keys.shape[0]
        kv_heads = first.keys.shape[1] if first.compact else first.keys.shape[2]
        dim = first.keys.shape[-1]
        dtype = dtype or first.keys.dtype
        shape = (batch, tail_capacity, kv_heads, dim)
        return cls(layers=layers, tail_keys=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   tail_values=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   tail_positions=jnp.full((batch, tail_capacity), -1, jnp.int32),
                   tail_index=jnp.zeros((), jnp.int32), prefix_end=jnp.asarray(prefix_end, jnp.int32))


# ----------------------------------------------------------------------------- host-side sizing


def _token_keep(positions, token_keep_mask, kv_heads: int) -> np.ndarray:
    keep = np.broadcast_to((np.asarray(positions) >= 0)[:, :, None],
                           np.shape(positions) + (kv_heads,)).copy()
    if token_keep_mask is not None:
        t = np.asarray(token_keep_mask) != 0
        keep &= t[:, :, None] if t.ndim == 2 else t
    return keep


def key_capacity_of(token_keep_mask, positions, kv_heads: int) -> int:
    """Largest number of kept real tokens of any (batch, KV head): the compact key capacity Tk (host-side)."""
    return max(int(_token_keep(positions, token_keep_mask, kv_heads).sum(axis=1).max(initial=0)), 1)


def global_capacity_of(group_mask, positions=None, token_keep_mask=None) -> int:
    """Largest number of kept (token, group) pairs of any (batch, KV head): the capacity C (host-side)."""
    g = np.asarray(group_mask) != 0
    if positions is None:
        positions = np.zeros(g.shape[:2], np.int32)
    g &= _token_keep(positions, token_keep_mask, g.shape[2])[..., None]
    return max(int(g.sum(axis=(1, 3)).max(initial=0)), 1)


def fixed_k_of(group_mask) -> int:
    """Largest number of kept groups of any (token, KV head): the K of a fixed-K layout (host-side)."""
    return max(int((np.asarray(group_mask) != 0).sum(axis=-1).max(initial=0)), 1)


def _power_of_two(n: int, limit: int) -> int:
    """n rounded up to a power of two, at most limit: the packed sizes a stream of prompts compiles for."""
    return min(int(limit), 1 << max(0, int(n) - 1).bit_length())


def bucketed_sizes(token_masks, group_masks, positions) -> Tuple[int, int]:
    """(capacity, key_capacity) of a global-layout cache holding every layer under these masks, one pair
    for all layers, rounded up to powers of two (host-side).

    Every distinct packed size is a new compilation of the packed decode; sized per layer and per prompt,
    a stream of prompts compiled hundreds of programs and ran the CPU backend out of mappable memory.
    Padding slots are never attended, so the generated tokens do not change.
    """
    return _concrete("capacity and key_capacity", _bucketed_sizes, token_masks, group_masks, positions)


def _bucketed_sizes(token_masks, group_masks, positions) -> Tuple[int, int]:
    positions = np.asarray(positions)
    _, width, heads, groups = np.shape(group_masks[0])
    tokens = [None] * len(group_masks) if token_masks is None else [np.asarray(t) for t in token_masks]
    capacity = max(global_capacity_of(np.asarray(g), positions, t) for g, t in zip(group_masks, tokens))
    keys = max(key_capacity_of(t, positions, heads) for t in tokens)
    return _power_of_two(capacity, width * groups), _power_of_two(keys, width)


def _concrete(what: str, fn, *args):
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(args)):
        raise InputError(f"{what} must be given explicitly when packing inside jit (the masks are traced)")
    return fn(*args)


_MAX_BLOCK = 512  # most entries per read-out block of the global layout


def read_out_block(capacity: int, groups: int = 1) -> int:
    """L, the entries per read-out block for up to C kept pairs of G groups: the largest power of two at most
    512, sqrt(C) and C / (32 G). Bigger blocks read faster (fewer, larger matmuls); the last bound keeps
    the block padding of `entry_slots` under C / 32."""
    limit = min(_MAX_BLOCK, math.isqrt(max(int(capacity), 1)), int(capacity) // (32 * int(groups)))
    return 1 << (max(1, limit).bit_length() - 1)


def entry_slots(capacity: int, groups: int) -> int:
    """P, the slots that hold any C kept pairs of G groups with every group starting on a block of L slots.

    A group of n pairs takes ceil(n / L) blocks, at most n + L - 1 slots, so G groups take at most
    C + G (L - 1) slots, rounded down to whole blocks: about C / 32 more slots than pairs at most
    (`read_out_block`), none with blocks of 1.
    """
    block = read_out_block(capacity, groups)
    return (int(capacity) + int(groups) * (block - 1)) // block * block


# ----------------------------------------------------------------------------- packing


def _first_true(flags: jax.Array, n: int) -> Tuple[jax.Array, jax.Array]:
    """Indices of the first n True entries along the last axis (then the False ones), and whether each is True.

    Pads with index 0 / False when n exceeds the axis.
    """
    return true_first(flags, n)


def _check_groups(values, group_mask):
    if group_mask.ndim != 4 or group_mask.shape[:3] != values.shape[:3]:
        raise InputError(f"group mask {tuple(group_mask.shape)} does not match values {tuple(values.shape[:3])} + (G,)")
    groups = group_mask.shape[-1]
    if values.shape[-1] % groups:
        raise InputError(f"G={groups} value groups do not divide head_dim={values.shape[-1]}")
    if groups > 256:
        raise InputError(f"at most 256 value groups fit a uint8 group index, got G={groups}")
    return groups, values.shape[-1] // groups


def pack_fixed_k(values: jax.Array, group_mask: jax.Array, k: int) -> FixedKValues:
    """values [B, T, Hkv, D], group_mask [B, T, Hkv, G] -> the K kept groups of every (token, KV head).

    A row with fewer than K kept groups pads with zero values; a row with more keeps its first K
    (lowest group indices), so give K >= the largest kept count (`fixed_k_of`) for an exact packing.
    """
    groups, gd = _check_groups(values, group_mask)
    k = int(k)
    if not 1 <= k <= groups:
        raise InputError(f"K={k} kept groups must be in [1, G={groups}]")
    batch, length, heads, _ = values.shape
    order, ok = _first_true(group_mask != 0, k)  # [B, T, Hkv, K]
    grouped = values.reshape(batch, length, heads, groups, gd)
    kept = jnp.take_along_axis(grouped, order[..., None], axis=3) * ok[..., None].astype(values.dtype)
    return FixedKValues(values=kept, groups=order.astype(index_dtype(groups)), num_groups=groups)


def pack_fixed_k_layer(keys: jax.Array, values: jax.Array, positions: jax.Array, group_mask: jax.Array,
                       k: Optional[int] = None, token_keep_mask: Optional[jax.Array] = None, *,
                       key_capacity: Optional[int] = None) -> PackedLayer:
    """A fixed-K layer: keys [B, Tk, Hkv, D] with positions [B, Tk], values packed by `pack_fixed_k`.

    Without token_keep_mask every token stays (Tk = T). token_keep_mask may only be [B, T] (shared by
    all KV heads; use `pack_global` for per-head token selection): the kept tokens of each row move,
    in order, to the first of key_capacity slots (default: the most kept by any row; needs a concrete
    mask), and the slots left over get position -1 and zeros. K defaults to the largest kept count
    (needs concrete masks).
    """
    positions = positions.astype(jnp.int32)
    if token_keep_mask is not None:
        if token_keep_mask.ndim != 2:
            raise InputError("the fixed-K layout shares its token axis across KV heads: token_keep_mask must be "
                             "[B, T]; use pack_global for per-head token selection")
        keep = (token_keep_mask != 0) & (positions >= 0)
        if key_capacity is None:
            key_capacity = _concrete("key_capacity", key_capacity_of, token_keep_mask, positions, 1)
        slots, ok = _first_true(keep, int(key_capacity))  # [B, Tk]
        take = lambda x: jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
        fill = lambda x: x * ok.reshape(ok.shape + (1,) * (x.ndim - 2)).astype(x.dtype)  # noqa: E731
        keys, values, group_mask = fill(take(keys)), fill(take(values)), fill(take(group_mask))
        positions = jnp.where(ok, take(positions), -1)
    if k is None:
        k = _concrete("K", fixed_k_of, group_mask)
    return PackedLayer(keys=PackedKeys(keys, positions), values=pack_fixed_k(values, group_mask, k))


def resolve_impl(impl: str) -> str:
    """"xla" or "pallas": "auto" is the Pallas kernel on GPU/TPU and the XLA read-out elsewhere."""
    if impl not in IMPLS:
        raise InputError(f"unknown attention impl {impl!r}; choose from {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    return impl


def pack_fixed_k_group_major(keys: jax.Array, values: jax.Array, positions: jax.Array, group_mask: jax.Array,
                             k: Optional[int] = None, token_keep_mask: Optional[jax.Array] = None, *,
                             key_capacity: Optional[int] = None) -> PackedLayer:
    """The fixed-K layout (K groups per token, tokens shared by the KV heads) stored in the global entry format.

    Same arguments and kept pairs as `pack_fixed_k_layer` (a token with more than K kept groups keeps its
    first K), but the values are a group-major list per (batch, KV head), as `pack_global` stores them, and
    the keys are head-major. The XLA read-out then reads each kept group once (`_read_global`), where the
    token-major `FixedKValues` needs a one-hot contraction that does K times the dense read-out's work. The
    list's capacity is static, key_capacity x K rounded up to a whole read-out block, so with k and
    key_capacity given this packs inside jit. Costs an entry's token index (uint16 up to 65,536 slots) over
    the token-major form.
    """
    groups, _ = _check_groups(values, group_mask)
    if k is None:
        k = _concrete("K", fixed_k_of, group_mask)
    k = int(k)
    if not 1 <= k <= groups:
        raise InputError(f"K={k} kept groups must be in [1, G={groups}]")
    if token_keep_mask is not None and token_keep_mask.ndim != 2:
        raise InputError("the fixed-K layout shares its token axis across KV heads: token_keep_mask must be "
                         "[B, T]; use pack_global for per-head token selection")
    kept = group_mask != 0
    kept = kept & (jnp.cumsum(kept.astype(jnp.int32), axis=-1) <= k)  # a token's first K groups, like pack_fixed_k
    tokens = jnp.ones(positions.shape, bool) if token_keep_mask is None else token_keep_mask
    if key_capacity is None:
        key_capacity = _concrete("key_capacity", key_capacity_of, tokens, positions, 1)
    return pack_global(keys, values, positions, tokens, kept, int(key_capacity) * k,
                       key_capacity=key_capacity)


def pack_global(keys: jax.Array, values: jax.Array, positions: jax.Array, token_keep_mask: Optional[jax.Array],
                group_mask: Optional[jax.Array], capacity: Optional[int] = None, *,
                key_capacity: Optional[int] = None) -> PackedLayer:
    """The global-budget layout of one layer.

    keys, values [B, T, Hkv, D] (keys RoPE-rotated, as cached); positions [B, T] (-1 = padding);
    token_keep_mask None, [B, T] or [B, T, Hkv]; group_mask [B, T, Hkv, G] (None = all groups).
    With a token_keep_mask, each KV head's kept keys are compacted to key_capacity slots (default: the
    most kept by any head); without one, keys stay dense. capacity C (default: the most kept pairs of
    any head) bounds the kept pairs per (batch, KV head); surplus pairs (later tokens first) are
    dropped. Entries are stored by group, then token, each group from a block boundary, in
    `entry_slots(C, G)` slots (the order `packed_attention` relies on); empty slots carry group G.
    Defaults need concrete masks; inside jit pass both sizes.
    """
    batch, length, heads, dim = values.shape
    if group_mask is None:
        group_mask = jnp.ones((batch, length, heads, 1), jnp.float32)
    _check_groups(values, group_mask)
    positions = positions.astype(jnp.int32)
    valid = jnp.broadcast_to((positions >= 0)[:, :, None], (batch, length, heads))
    head_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, Hkv, ...] -> [B, Hkv, T, ...]
    if token_keep_mask is not None:
        t = token_keep_mask != 0
        if t.ndim == 2:
            t = t[:, :, None]
        elif t.ndim != 3:
            raise InputError(f"token keep mask must be [B, T] or [B, T, Hkv], got {tuple(token_keep_mask.shape)}")
        keep = valid & t
        if key_capacity is None:
            key_capacity = _concrete("key_capacity", key_capacity_of, token_keep_mask, positions, heads)
        if capacity is None:
            capacity = _concrete("capacity", global_capacity_of, group_mask, positions, token_keep_mask)
        return pack_head_major(head_major(keys), head_major(values), jnp.broadcast_to(positions[:, None],
                                                                                      (batch, heads, length)),
                               head_major(keep), head_major(group_mask), int(capacity), int(key_capacity))
    if capacity is None:
        capacity = _concrete("capacity", global_capacity_of, group_mask, positions, None)
    slot_of = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, heads, length))
    entries = _pack_entries(head_major(values), head_major(group_mask != 0) & head_major(valid)[..., None], slot_of,
                            int(capacity), length)
    return PackedLayer(keys=PackedKeys(keys, positions), values=entries)


def pack_head_major(keys: jax.Array, values: jax.Array, positions: jax.Array, keep: jax.Array, group_mask: jax.Array,
                    capacity: int, key_capacity: int) -> PackedLayer:
    """The global layout of one layer from head-major slots, each KV head with its own tokens.

    keys, values [B, Hkv, N, D]; positions [B, Hkv, N] (-1 = empty); keep [B, Hkv, N] (which slots to keep);
    group_mask [B, Hkv, N, G]. Keys are compacted to key_capacity slots per head, entries to capacity (surplus
    later tokens dropped, as in `pack_global`, which is this with positions shared by the heads). A cache
    re-compressed between chunks (`chunked_prefill`) holds different tokens per head, hence this form.
    """
    batch, heads, length, _ = values.shape
    _check_groups(values, group_mask)  # [B, Hkv, N] is as good as [B, T, Hkv] for the shape check
    keep = (keep != 0) & (positions >= 0)
    slots, ok = _first_true(keep, int(key_capacity))  # [B, Hkv, Tk]
    kept_keys = jnp.take_along_axis(keys, slots[..., None], axis=2) * ok[..., None].astype(keys.dtype)
    kept_pos = jnp.where(ok, jnp.take_along_axis(positions.astype(jnp.int32), slots, axis=2), -1)
    packed_keys = PackedKeys(kept_keys, kept_pos.astype(jnp.int32), compact=True)
    slot_of = jnp.cumsum(keep.astype(jnp.int32), axis=-1) - 1  # [B, Hkv, N]: slot -> compact key slot
    entries = _pack_entries(values, (group_mask != 0) & keep[..., None], slot_of, int(capacity), int(key_capacity))
    return PackedLayer(keys=packed_keys, values=entries)


def _pack_entries(values: jax.Array, pairs: jax.Array, slot_of: jax.Array, capacity: int,
                  key_slots: int) -> GlobalValues:
    """values [B, Hkv, N, D], kept pairs [B, Hkv, N, G] -> at most `capacity` entries per (batch, KV head) in
    `entry_slots(capacity, G)` slots, stored by group, then token, each group from a block boundary;
    slot_of [B, Hkv, N] maps a token to its slot on the layer's key axis."""
    batch, heads, length, _ = values.shape
    groups = pairs.shape[-1]
    gd = values.shape[-1] // groups
    block, slots = read_out_block(capacity, groups), entry_slots(capacity, groups)
    pairs_h = pairs.reshape(batch, heads, length * groups)  # token-major
    # surplus pairs beyond C are dropped later tokens first; the survivors are stored group-major
    kept_pairs = pairs_h & (jnp.cumsum(pairs_h.astype(jnp.int32), axis=-1) <= capacity)
    by_group = jnp.transpose(kept_pairs.reshape(batch, heads, length, groups), (0, 1, 3, 2))  # [B, Hkv, G, N]
    count = jnp.sum(by_group, axis=-1, dtype=jnp.int32)  # [B, Hkv, G]
    padded = -(-count // block) * block
    end = jnp.cumsum(padded, axis=-1)
    start = end - padded
    slot = jnp.arange(slots, dtype=jnp.int32)
    group = jnp.sum(slot[:, None] >= end[:, :, None, :], axis=-1, dtype=jnp.int32)  # [B, Hkv, P]; G past the end
    safe = jnp.minimum(group, groups - 1)
    rank = slot - jnp.take_along_axis(start, safe, axis=-1)  # the slot's rank among its group's entries
    real = (group < groups) & (rank < jnp.take_along_axis(count, safe, axis=-1))
    order, _ = _first_true(by_group, length)  # [B, Hkv, G, N]: each group's kept tokens first, in token order
    flat = safe * length + jnp.minimum(rank, length - 1)
    token = jnp.take_along_axis(order.reshape(batch, heads, groups * length), flat, axis=-1)  # [B, Hkv, P]
    grouped = jnp.transpose(values.reshape(batch, heads, length, groups, gd), (0, 1, 3, 2, 4))  # [B, Hkv, G, N, gd]
    kept = jnp.take_along_axis(grouped.reshape(batch, heads, groups * length, gd),
                               (safe * length + token)[..., None], axis=2)
    kept = kept * real[..., None].astype(values.dtype)
    token_slot = jnp.where(real, jnp.take_along_axis(slot_of, token, axis=2), 0)
    return GlobalValues(values=kept, tokens=token_slot.astype(index_dtype(key_slots)),
                        groups=jnp.where(real, group, groups).astype(index_dtype(groups + 1)), num_groups=groups,
                        block=block)


def unpack_dense(packed: Union[FixedKValues, PackedLayer], positions: Optional[jax.Array] = None) -> jax.Array:
    """Rebuilds the masked dense values [B, T, Hkv, D] (zeros where dropped, or the layer's value_mean).
    For tests only: it is the tensor the packed attention never builds.

    A global layer with compacted keys needs the original positions [B, T] to place its tokens.
    """
    if isinstance(packed, FixedKValues):
        batch, length, heads, _, gd = packed.values.shape
        onehot = jax.nn.one_hot(packed.groups.astype(jnp.int32), packed.num_groups, dtype=packed.values.dtype)
        dense = jnp.einsum("bthkg,bthke->bthge", onehot, packed.values)
        return dense.reshape(batch, length, heads, packed.num_groups * gd)
    if packed.value_mean is not None:  # stored centred: dropped groups read as the mean
        centred = unpack_dense(packed.replace(value_mean=None), positions)
        return centred + packed.value_mean[:, None].astype(centred.dtype)
    if isinstance(packed.values, FixedKValues):
        return unpack_dense(packed.values)
    entries, keys = packed.values, packed.keys
    token = entries.tokens.astype(jnp.int32)
    if keys.compact:
        if positions is None:
            raise InputError("unpack_dense of compacted keys needs the original positions [B, T]")
        slot_pos = jnp.take_along_axis(keys.positions, token, axis=2)  # [B, Hkv, C]
        token = jnp.argmax(positions[:, None, None, :] == slot_pos[..., None], axis=-1)
        length = positions.shape[1]
    else:
        length = keys.keys.shape[1]
    dense, _ = entries_to_slots(entries, token, length)
    return jnp.transpose(dense, (0, 2, 1, 3))


def entries_to_slots(entries: GlobalValues, token: jax.Array, slots: int) -> Tuple[jax.Array, jax.Array]:
    """Every stored entry put back at its (token slot, group): head-major values [B, Hkv, slots, G * gd] (zeros
    where nothing is stored) and present [B, Hkv, slots, G]. token [B, Hkv, P]: each entry's slot index."""
    batch, heads, _, gd = entries.values.shape
    groups = entries.num_groups
    real = entries.real  # empty slots carry group G: clamped to a real group, and add nothing
    flat = token * groups + jnp.minimum(entries.groups.astype(jnp.int32), groups - 1)
    b, h = jnp.meshgrid(jnp.arange(batch), jnp.arange(heads), indexing="ij")
    index = (b[..., None], h[..., None], flat)
    values = jnp.zeros((batch, heads, slots * groups, gd), entries.values.dtype)
    values = values.at[index].add(entries.values * real[..., None].astype(values.dtype))
    present = jnp.zeros((batch, heads, slots * groups), bool).at[index].max(real)
    return values.reshape(batch, heads, slots, groups * gd), present.reshape(batch, heads, slots, groups)


# ----------------------------------------------------------------------------- byte accounting

_KINDS = {"keys": "keys", "tail_keys": "keys", "values": "values", "tail_values": "values", "value_mean": "values",
          "tokens": "indices", "groups": "indices", "positions": "positions", "tail_positions": "positions",
          "prefix_end": "positions", "tail_index": "counts"}


def cache_nbytes(packed, by_kind: bool = False) -> Union[int, Dict[str, int]]:
    """Bytes held by every array of a packed cache / layer / piece (values, keys, indices, positions, counts).

    by_kind=True returns {"keys", "values", "indices", "positions", "counts", "total"} (the tail's
    keys and values count as keys and values).
    """
    totals = {kind: 0 for kind in ("keys", "values", "indices", "positions", "counts")}
    for path, leaf in jax.tree_util.tree_flatten_with_path(packed)[0]:
        name = next((p.name for p in reversed(path) if isinstance(p, jax.tree_util.GetAttrKey)), None)
        if name not in _KINDS:
            raise InputError(f"cache_nbytes does not know the array {jax.tree_util.keystr(path)}")
        shape, dtype = np.shape(leaf), np.dtype(leaf.dtype)
        totals[_KINDS[name]] += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    totals["total"] = sum(totals.values())
    return totals if by_kind else totals["total"]


# ----------------------------------------------------------------------------- attention


def key_scores(q5: jax.Array, keys: PackedKeys, q_positions, sliding_window):
    """Scores [B, Hkv, R, Tq, S] of grouped queries [B, Tq, Hkv, R, D] on packed (or dense tail) keys, float32
    and scaled, and which are allowed, [B, Hkv or 1, 1, Tq, S]."""
    if keys.compact:
        scores = jnp.einsum("btkrd,bksd->bkrts", q5, keys.keys.astype(q5.dtype))  # already head-major
    else:
        scores = grouped_scores(q5, keys.keys.astype(q5.dtype))
    allowed = attention_allowed(q_positions, keys.positions, sliding_window=sliding_window)
    return scores.astype(jnp.float32) * q5.shape[-1] ** -0.5, allowed


def _read_fixed_k(weights: jax.Array, entries: FixedKValues) -> jax.Array:
    """weights [B, Hkv, R, Tq, T] -> [B, Tq, Hkv, R, G, gd]: each slot's weighted values added into its group.

    The one-hot of slot groups is [.., K, G]; the dense [.., G, gd] values are never built.
    """
    dtype = entries.values.dtype
    onehot = jax.nn.one_hot(entries.groups.astype(jnp.int32), entries.num_groups, dtype=dtype)  # [B, T, Hkv, K, G]
    routed = weights.astype(dtype)[..., None, None] * jnp.transpose(onehot, (0, 2, 1, 3, 4))[:, :, None, None]
    return jnp.einsum("bhrtskg,bshke->bthrge", routed, entries.values)


def _read_global(weights: jax.Array, entries: GlobalValues) -> jax.Array:
    """weights [B, Hkv, R, Tq, S] -> [B, Tq, Hkv, R, G, gd]: entry values times their token's weight, per group.

    Every block of L entries holds one group (its first slot's; an empty block none), so a block is read
    out with one matmul (weights [R * Tq, L] x values [L, gd]) and added to its group: about R * Tq * gd
    multiply-adds per entry, as in a dense read-out, and nothing per entry but its weight's gather.
    (The matmul pairs entries two by two so its output has 2 * gd columns: XLA's CPU dot is several
    times faster at 16 or 32 columns than at 8 or 16, and on accelerators the extra products are free.)
    """
    batch, heads, reps, q_len, keys = weights.shape
    dtype = entries.values.dtype
    slots, groups, gd, block = entries.capacity, entries.num_groups, entries.values.shape[-1], entries.block
    blocks, rows = slots // block, reps * q_len
    pair = 2 if block % 2 == 0 else 1
    # each entry's weight for every query row: one gather of its token's [R * Tq] weights
    w = jnp.transpose(weights, (0, 1, 4, 2, 3)).reshape(batch, heads, keys, rows)
    w = jnp.take_along_axis(w, entries.tokens.astype(jnp.int32)[..., None], axis=2).astype(dtype)  # [B, Hkv, P, RT]
    w = w.reshape(batch, heads, blocks, block // pair, pair, rows)
    v = entries.values.reshape(batch, heads, blocks, block // pair, pair * gd)
    sums = jnp.einsum("bhnapq,bhnaf->bhnpqf", w, v)  # [B, Hkv, N, pair, RT, pair * gd]
    # keep the matching pairs (the diagonal) by slicing: an einsum diagonal made XLA transpose the product first
    sums = sum(sums[:, :, :, i, :, i * gd:(i + 1) * gd] for i in range(pair))  # [B, Hkv, N, RT, gd]
    # a block's group is its first slot's (empty blocks carry G, whose one-hot is all zeros)
    block_group = jax.nn.one_hot(entries.groups[..., ::block].astype(jnp.int32), groups, dtype=dtype)  # [B, Hkv, N, G]
    out = jnp.einsum("bhng,bhnqe->bhqge", block_group, sums).reshape(batch, heads, reps, q_len, groups, gd)
    return jnp.transpose(out, (0, 3, 1, 2, 4, 5))


def packed_attention(query: jax.Array, q_positions: jax.Array, layer: PackedLayer, *,
                     tail_keys: Optional[jax.Array] = None, tail_values: Optional[jax.Array] = None,
                     tail_positions: Optional[jax.Array] = None, sliding_window: Optional[int] = None) -> jax.Array:
    """Attention of query [B, Tq, Hq, D] (positions [B, Tq]) over a packed prefix and an optional dense tail.

    Equals `attend` on the masked dense cache (prefix values with dropped groups zeroed, evicted tokens
    not allowed; tail uncompressed): one float32 softmax over prefix and tail keys together, rows with
    no allowed key give zeros. The value read-out works on the packed arrays directly.
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_heads = layer.keys.keys.shape[1] if layer.keys.compact else layer.keys.keys.shape[2]
    if num_heads % kv_heads:
        raise InputError(f"{num_heads} query heads are not a multiple of {kv_heads} KV heads")
    reps = num_heads // kv_heads
    # query heads grouped by KV head, split like the cache's KV heads (else XLA may gather a row's keys instead)
    q5 = sharding.constrain(query.reshape(batch, q_len, kv_heads, reps, head_dim), ("batch", "length", "kv_heads"))
    scores, allowed = key_scores(q5, layer.keys, q_positions, sliding_window)
    allowed = jnp.broadcast_to(allowed, (batch, kv_heads, 1, q_len, scores.shape[-1]))
    prefix_len = scores.shape[-1]
    if tail_keys is not None:
        tail_scores, tail_allowed = key_scores(q5, PackedKeys(tail_keys, tail_positions), q_positions, sliding_window)
        tail_allowed = jnp.broadcast_to(tail_allowed, (batch, kv_heads, 1, q_len, tail_keys.shape[1]))
        scores = jnp.concatenate([scores, tail_scores], axis=-1)
        allowed = jnp.concatenate([allowed, tail_allowed], axis=-1)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = jnp.where(allowed, weights, 0.0)
    prefix_w = weights[..., :prefix_len]
    if isinstance(layer.values, FixedKValues):
        if layer.keys.compact:
            raise InputError("a fixed-K layout needs dense keys (its values are indexed by token)")
        out = _read_fixed_k(prefix_w, layer.values)
    else:
        out = _read_global(prefix_w, layer.values)
    out = out.reshape(batch, q_len, kv_heads, reps, head_dim)
    if layer.value_mean is not None:  # centred entries + the mean times the attention mass on the prefix
        mass = jnp.transpose(jnp.sum(prefix_w, axis=-1), (0, 3, 1, 2))  # [B, Tq, Hkv, R]
        out = out + mass[..., None] * layer.value_mean[:, None, :, None, :].astype(jnp.float32)
    out = out.astype(query.dtype)
    if tail_keys is not None:
        tail_w = weights[..., prefix_len:].astype(tail_values.dtype)
        out = out + grouped_readout(tail_w, tail_values).astype(query.dtype)
    return out.reshape(batch, q_len, num_heads, head_dim)


# ----------------------------------------------------------------------------- whole-model packing


def pack_cache(keys: Sequence[jax.Array], values: Sequence[jax.Array], positions: jax.Array, token_keep_masks,
               group_masks, *, layout: str = "global", tail_capacity: int = 1, capacity=None, key_capacity=None,
               k=None, fill: str = "zero", impl: str = "auto") -> PackedCache:
    """Packs every layer of a prefilled cache (keys/values per layer [B, T, Hkv, D], positions [B, T]).

    token_keep_masks / group_masks: None, one array for all layers, or one per layer. layout "global"
    (any masks) or "fixed_k" (token masks, if any, must be [B, T]). capacity / key_capacity / k: None
    (sized from the masks, per layer), an int, or one per layer. fill: what a dropped group of a kept
    token reads as: "zero" (the method as built) or "mean" (the mean of that layer's and KV head's
    context values; stored once per layer, [B, Hkv, D]): zero-filled groups of low-weight tokens pull the
    read-out towards 0, the mean keeps it where the dropped contributions would on average have put it.
    impl: the decode attention the cache will use (`resolve_impl`); it picks how fixed-K values are stored:
    token-major `FixedKValues` for the Pallas kernel, the global entry format for the XLA read-out
    (`pack_fixed_k_group_major`). Returns a PackedCache with an empty dense tail of tail_capacity slots.
    """
    if fill not in FILLS:
        raise InputError(f"unknown value fill {fill!r}; choose from {', '.join(FILLS)}")
    resolve_impl(impl)
    num_layers = len(keys)
    token_keep_masks = per_layer(token_keep_masks, num_layers, "token_keep_masks")
    group_masks = per_layer(group_masks, num_layers, "group_masks")

    def sizes(size, what):
        return per_layer(size, num_layers, what) if isinstance(size, (list, tuple)) else (size,) * num_layers

    capacity, key_capacity, k = sizes(capacity, "capacity"), sizes(key_capacity, "key_capacity"), sizes(k, "k")
    layers = []
    for i in range(num_layers):
        mean = context_value_mean(values[i], positions) if fill == "mean" else None
        layer_values = values[i] if mean is None else values[i] - mean[:, None].astype(values[i].dtype)
        layers.append(_pack_layer(layout, keys[i], layer_values, positions, token_keep_masks[i], group_masks[i],
                                  capacity[i], key_capacity[i], k[i], impl).replace(value_mean=mean))
    prefix_end = jnp.max(positions, axis=1).astype(jnp.int32) + 1
    cache = PackedCache.with_empty_tail(layers, max(int(tail_capacity), 1), prefix_end, dtype=values[0].dtype)
    return cache.replace(impl=impl)


def shard_cache(cache: PackedCache) -> PackedCache:
    """Constrains every leaf of the packed cache to shard by batch and KV head under the active mesh.

    Slot / entry / group axes stay whole on each device, so a device reads its own (batch, KV head)
    entries without gathering anyone else's; the global layout's top-B ran before packing (on the
    masks), so sharding changes no kept entry. A no-op without a mesh; works inside jit.
    """
    def keys_of(keys: PackedKeys) -> PackedKeys:
        if keys.compact:  # [B, Hkv, Tk, D], positions [B, Hkv, Tk]
            return keys.replace(keys=sharding.constrain(keys.keys, ("batch", "kv_heads", "length", "head_dim")),
                                positions=sharding.constrain(keys.positions, ("batch", "kv_heads", "length")))
        return keys.replace(keys=sharding.constrain(keys.keys, ("batch", "length", "kv_heads", "head_dim")),
                            positions=sharding.constrain(keys.positions, ("batch", "length")))

    def values_of(values):
        if isinstance(values, FixedKValues):  # [B, T, Hkv, K, gd], groups [B, T, Hkv, K]
            return values.replace(values=sharding.constrain(values.values, ("batch", "length", "kv_heads")),
                                  groups=sharding.constrain(values.groups, ("batch", "length", "kv_heads")))
        return values.replace(values=sharding.constrain(values.values, ("batch", "kv_heads")),
                              tokens=sharding.constrain(values.tokens, ("batch", "kv_heads")),
                              groups=sharding.constrain(values.groups, ("batch", "kv_heads")))

    def layer_of(layer: PackedLayer) -> PackedLayer:
        mean = None if layer.value_mean is None else sharding.constrain(layer.value_mean, ("batch", "kv_heads"))
        return layer.replace(keys=keys_of(layer.keys), values=values_of(layer.values), value_mean=mean)

    tail = ("batch", "length", "kv_heads", "head_dim")
    return cache.replace(layers=tuple(layer_of(layer) for layer in cache.layers),
                         tail_keys=tuple(sharding.constrain(x, tail) for x in cache.tail_keys),
                         tail_values=tuple(sharding.constrain(x, tail) for x in cache.tail_values),
                         tail_positions=sharding.constrain(cache.tail_positions, ("batch", "length")),
                         prefix_end=sharding.constrain(cache.prefix_end, ("batch",)))


def context_value_mean(values: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, Hkv, D]: the mean of values [B, T, Hkv, D] over each row's real tokens (positions >= 0)."""
    real = (positions >= 0).astype(jnp.float32)[:, :, None, None]
    total = jnp.sum(values.astype(jnp.float32) * real, axis=1)
    return (total / jnp.maximum(jnp.sum(real, axis=1), 1.0)).astype(values.dtype)


def _pack_layer(layout, keys, values, positions, token_keep_mask, group_mask, capacity, key_capacity, k, impl):
    if layout == "global":
        return pack_global(keys, values, positions, token_keep_mask, group_mask, capacity, key_capacity=key_capacity)
    if layout == "fixed_k":
        if group_mask is None:
            group_mask = jnp.ones(values.shape[:3] + (1,), jnp.float32)
        pack = pack_fixed_k_layer if resolve_impl(impl) == "pallas" else pack_fixed_k_group_major
        return pack(keys, values, positions, group_mask, k, token_keep_mask, key_capacity=key_capacity)
    raise InputError(f"unknown packed layout {layout!r}; choose from {', '.join(LAYOUTS)}")
