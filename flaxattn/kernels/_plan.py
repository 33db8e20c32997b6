"""The block plan: which (query block, key block) pairs are empty, partial or full.

Tiled implementations work on blocks of `bq` queries × `bk` keys. A block is

- `EMPTY`: no query of the block sees a key of it; it is skipped, never loaded;
- `PARTIAL`: some pairs are visible; the mask is applied;
- `FULL`: every pair is visible; no mask is evaluated.

This module works that out once, and the blocked kernel, the Pallas kernels and ring attention
all consume its result:

- `classify(visibility, limits, q_lo, q_hi, k_lo, k_hi)` gives the state of query positions
  `[q_lo, q_hi)` against key positions `[k_lo, k_hi)` under the structured masks (causal,
  window, lengths), on broadcast arrays, so it also runs inside kernels and index maps.
  It is exact: each query row sees one contiguous key interval whose ends never decrease with
  the row (lengths, causal and windows all have this shape), so the union of a block's rows is
  an interval and the four corners decide whether the block is full.
- `BlockPlan` lists, for every query block, the key blocks to visit (ascending) and whether
  each is full, and the transpose (for every key block, the query blocks that see it) for
  backward passes that iterate over key blocks. Counts and indices are arrays of static shape,
  so a plan can depend on traced data (this batch's lengths) inside `jit`.
- `plan_blocks(...)` builds a `BlockPlan` from the structured masks; a dense `mask` or a
  `mask_mod`, which the plan cannot see inside, caps every visited block at `PARTIAL`.

States combine by `min` (`EMPTY < PARTIAL < FULL`): a pair is visible under several masks iff
it is visible under each ("and"). The block masks of `mask_mod`s and segment ids are built the
same way and combine with these by `combine_states`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Int

from flaxattn.kernels._visibility import Limits, Visibility

EMPTY, PARTIAL, FULL = 0, 1, 2


def classify(
    visibility: Visibility,
    limits: Limits,
    q_lo: ArrayLike,
    q_hi: ArrayLike,
    k_lo: ArrayLike,
    k_hi: ArrayLike,
) -> Int[Array, "..."]:
    """`EMPTY`, `PARTIAL` or `FULL` for queries `[q_lo, q_hi)` against keys `[k_lo, k_hi)`.

    Args:
      visibility: the static structure (causal, window, alignment); its length arrays are
        not used: lengths come in `limits`.
      limits: `q_len`, `kv_len`, `offset`, broadcastable against the ranges.
      q_lo, q_hi, k_lo, k_hi: integer bounds (half-open), broadcastable against each other.

    Returns:
      int32 states of the broadcast shape. Ranges of strided positions (a striped ring) may be
      passed as their hulls: then `EMPTY` stays exact and the rest is conservative.
    """
    lo, hi = visibility.key_range(q_lo, q_hi, limits)
    nonempty = jnp.maximum(lo, k_lo) < jnp.minimum(hi, k_hi)
    q_last, k_last = q_hi - 1, k_hi - 1
    corners = [
        visibility.visible(qi, ki, limits) for qi in (q_lo, q_last) for ki in (k_lo, k_last)
    ]
    full = functools.reduce(jnp.logical_and, corners) & (q_hi > q_lo) & (k_hi > k_lo)
    return jnp.where(full, FULL, jnp.where(nonempty, PARTIAL, EMPTY)).astype(jnp.int32)


def combine_states(*states: ArrayLike) -> Array:
    """The state of a block under several masks at once ("and"): the smallest."""
    return functools.reduce(jnp.minimum, states)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_count", "kv_index", "kv_full", "q_count", "q_index", "q_full"],
    meta_fields=["block_q", "block_k"],
)
@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Which blocks to visit, from both sides (a pytree: usable under `jit` and `vmap`).

    `P` is the plan's batch axis: the batch size, or 1 when every example shares the plan.
    Indices past a count repeat the last valid one (or are 0 when there is none), so a
    pipeline that prefetches by index (Pallas on TPU) sees the same block again and copies
    nothing.

    Attributes:
      block_q, block_k: the block sizes (static).
      kv_count: `[P, nq]` int32: key blocks each query block visits.
      kv_index: `[P, nq, nk]` int32: their indices, ascending.
      kv_full: `[P, nq, nk]` bool: the visited block is full (no mask needed).
      q_count: `[P, nk]` int32: query blocks that see each key block.
      q_index: `[P, nk, nq]` int32: their indices, ascending.
      q_full: `[P, nk, nq]` bool: as `kv_full`, for the transposed lists.
    """

    # Shapes in the docstring, not as checked annotations: JAX rebuilds pytrees with other
    # leaves (None, sentinels) in transformations.
    kv_count: Any
    kv_index: Any
    kv_full: Any
    q_count: Any
    q_index: Any
    q_full: Any
    block_q: int
    block_k: int

    @property
    def num_q_blocks(self) -> int:
        return self.kv_count.shape[1]

    @property
    def num_k_blocks(self) -> int:
        return self.q_count.shape[1]

    def example(self, b: ArrayLike) -> BlockPlan:
        """The plan of example `b` (with a leading axis of 1; any `b` if the plan is shared)."""
        if self.kv_count.shape[0] == 1:
            return self
        take = lambda x: jax.lax.dynamic_index_in_dim(x, b, 0, keepdims=True)
        return dataclasses.replace(self, **{f: take(getattr(self, f)) for f in _DATA_FIELDS})

    def visited_fraction(self) -> Array:
        """The fraction of blocks visited (1 - the fraction skipped), per plan example `[P]`."""
        return self.kv_count.sum(-1) / (self.num_q_blocks * self.num_k_blocks)


_DATA_FIELDS = ("kv_count", "kv_index", "kv_full", "q_count", "q_index", "q_full")


def _lists(states: Int[ArrayLike, "P r c"]) -> tuple[Array, Array, Array]:
    """Per row: how many blocks to visit, their indices (ascending), whether each is full."""
    visit = states != EMPTY
    # Stable: the visited columns first, each group in ascending order.
    order = jnp.argsort(~visit, axis=-1, stable=True).astype(jnp.int32)
    count = visit.sum(-1).astype(jnp.int32)
    n = jnp.arange(states.shape[-1]).reshape((1,) * (states.ndim - 1) + (-1,))
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    last = jnp.where(count[..., None] > 0, last, 0)
    index = jnp.where(n < count[..., None], order, last)
    full = jnp.take_along_axis(states == FULL, index, axis=-1) & (n < count[..., None])
    return count, index, full


def plan_from_states(states: Int[ArrayLike, "P nq nk"], block_q: int, block_k: int) -> BlockPlan:
    """The `BlockPlan` of per-block states `[P, nq, nk]` (`EMPTY`, `PARTIAL`, `FULL`)."""
    kv_count, kv_index, kv_full = _lists(states)
    q_count, q_index, q_full = _lists(jnp.swapaxes(states, 1, 2))
    return BlockPlan(kv_count, kv_index, kv_full, q_count, q_index, q_full, block_q, block_k)


def block_states(
    visibility: Visibility, limits: Limits, T: int, S: int, block_q: int, block_k: int
) -> Int[Array, "P nq nk"]:
    """The state of every block of a `[T, S]` problem (padded up to whole blocks).

    Args:
      visibility: causal / window / alignment (static).
      limits: `[B]` int32 `q_len`, `kv_len`, `offset`.
      T, S: the (padded) lengths; `nq = ceil(T / block_q)`, `nk = ceil(S / block_k)`.
      block_q, block_k: the block sizes.

    Returns:
      `[B, nq, nk]` int32 states.
    """
    nq, nk = -(-T // block_q), -(-S // block_k)
    q0 = (jnp.arange(nq) * block_q)[None, :, None]  # [1, nq, 1]
    k0 = (jnp.arange(nk) * block_k)[None, None, :]  # [1, 1, nk]
    per_example = Limits(*(jnp.asarray(x)[:, None, None] for x in limits))  # [B, 1, 1]
    return classify(visibility, per_example, q0, q0 + block_q, k0, k0 + block_k)


def plan_blocks(
    visibility: Visibility,
    limits: Limits,
    T: int,
    S: int,
    block_q: int,
    block_k: int,
    *,
    masked: bool = False,
    shared: bool = False,
) -> BlockPlan:
    """The `BlockPlan` of the structured masks (causal, window, `limits`) of a `[T, S]` problem.

    Args:
      visibility: causal / window / alignment (static).
      limits: `[B]` int32 `q_len`, `kv_len`, `offset` (e.g. `Visibility.limits`).
      T, S: lengths, padded to multiples of the blocks (positions past the limits are hidden).
      block_q, block_k: the block sizes.
      masked: a dense mask or a `mask_mod` also applies: no block is known to be full.
      shared: every example has the same limits (no length arrays): one plan serves them all.

    Returns:
      The plan, with a batch axis of 1 when `shared`.
    """
    if shared:
        limits = Limits(*(jnp.asarray(x)[:1] for x in limits))
    states = block_states(visibility, limits, T, S, block_q, block_k)
    if masked:
        states = combine_states(states, jnp.int32(PARTIAL))
    return plan_from_states(states, block_q, block_k)
